package k8s

// Quarantine (issue 22): a GPU whose verification fails after a release is
// published with a device taint where the API server keeps taints (1.36 beta/on,
// 1.37 GA) and left out of the slice where it does not (1.34, alpha/off); the real
// allocator does not give it to a claim without a toleration and does with one; the
// Node gets a GPUQuarantined Event; the admin's `vfio-gpu-dra reset` clears it.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const quarantineTaintKey = driverName + "/quarantined"

// claimFor creates a claim for exactly the GPU at bdf, tolerating the
// quarantine taint when tolerate.
func (c *cluster) claimFor(t *testing.T, name, bdf string, tolerate bool) *resourceapi.ResourceClaim {
	t.Helper()
	key := ""
	if tolerate {
		key = quarantineTaintKey
	}
	return c.claimForGPU(t, name, bdf, key)
}

// claimForGPU creates a claim for exactly the GPU at bdf, tolerating the
// NoSchedule taint with key taintKey unless it is empty; deleted at cleanup.
func (c *cluster) claimForGPU(t *testing.T, name, bdf, taintKey string) *resourceapi.ResourceClaim {
	t.Helper()
	req := &resourceapi.ExactDeviceRequest{
		DeviceClassName: classAll,
		AllocationMode:  resourceapi.DeviceAllocationModeExactCount,
		Count:           1,
		Selectors: []resourceapi.DeviceSelector{{CEL: &resourceapi.CELDeviceSelector{
			Expression: fmt.Sprintf(`device.attributes["resource.kubernetes.io"].pciBusID == %q`, bdf),
		}}},
	}
	if taintKey != "" {
		req.Tolerations = []resourceapi.DeviceToleration{{
			Key: taintKey, Operator: resourceapi.DeviceTolerationOpExists,
			Effect: resourceapi.DeviceTaintEffectNoSchedule,
		}}
	}
	claim, err := c.client.ResourceV1().ResourceClaims(testNS).Create(context.Background(), &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{
			Requests: []resourceapi.DeviceRequest{{Name: "gpu", Exactly: req}},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating claim %s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = c.client.ResourceV1().ResourceClaims(testNS).Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	return claim
}

// publishedDevice waits until the node's complete pool holds (present) or lacks
// (!present) device, and returns it.
func (c *cluster) publishedDevice(t *testing.T, p *pluginProc, device string, present bool, cond func(resourceapi.Device) bool) resourceapi.Device {
	t.Helper()
	var got resourceapi.Device
	eventually(t, 60*time.Second, fmt.Sprintf("%s published=%v as wanted", device, present), func() (bool, error) {
		devices := c.waitForSlices(t, p, 30*time.Second)
		d, ok := devices[device]
		if ok != present {
			return false, nil
		}
		got = d
		return !present || cond(d), nil
	})
	return got
}

func testQuarantineTaint(t *testing.T, c *cluster) {
	const node = "taint-node"
	e := &prepareEnv{c: c, node: c.createNode(t, node), dirs: c.newNodeDirs(t, node)}
	e.k = c.startKubelet(t, nil, node, e.dirs.regDir, e.dirs.kubeletDir)
	e.p = c.startPlugin(t, node, e.dirs, pluginOpts{})
	e.k.waitRegistered(t, 1, 30*time.Second)
	c.waitForSlices(t, e.p, 30*time.Second)

	// A tenant uses a movable GPU; while it has it, the device's BARs change
	// (a GPU that comes back from its reset without its VRAM BAR).
	claim, pod, device := e.claimAndPod(t, "taint-tenant", classAll, movableSelector)
	bdf := bdfOf(device)
	e.k.prepare(t, pod)
	resource := filepath.Join(e.dirs.demoDir, "host", "sys", "bus", "pci", "devices", bdf, "resource")
	original, err := os.ReadFile(resource)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(original), "\n")
	lost := lines[0] + strings.Repeat("0x0000000000000000 0x0000000000000000 0x0000000000000000\n", len(lines)-2)
	if err := os.WriteFile(resource, []byte(lost), 0o644); err != nil {
		t.Fatal(err)
	}
	e.k.unprepare(t, pod)
	c.forceDelete(t, claim)
	// The device is whole again, but quarantine holds until the admin's reset.
	if err := os.WriteFile(resource, original, 0o644); err != nil {
		t.Fatal(err)
	}

	if laneKeepsDeviceTaints {
		d := c.publishedDevice(t, e.p, device, true, func(d resourceapi.Device) bool { return len(d.Taints) > 0 })
		if len(d.Taints) != 1 {
			t.Fatalf("%s taints %+v, want one", device, d.Taints)
		}
		taint := d.Taints[0]
		if taint.Key != quarantineTaintKey || taint.Value != "VerificationFailed" ||
			taint.Effect != resourceapi.DeviceTaintEffectNoSchedule || taint.TimeAdded == nil {
			t.Errorf("%s taint %+v, want %s=VerificationFailed:NoSchedule with timeAdded", device, taint, quarantineTaintKey)
		}
		if res := c.allocate(t, c.claimFor(t, "taint-no-toleration", bdf, false), e.node); res != nil {
			t.Errorf("the allocator gave quarantined %s to a claim without a toleration: %v", device, allocatedDevices(res))
		}
		res := c.allocate(t, c.claimFor(t, "taint-tolerated", bdf, true), e.node)
		if got := allocatedDevices(res); len(got) != 1 || got[0] != device {
			t.Errorf("a claim tolerating %s got %v, want [%s]", quarantineTaintKey, got, device)
		}
	} else {
		c.publishedDevice(t, e.p, device, false, nil)
		if res := c.allocate(t, c.claimFor(t, "taint-hidden", bdf, true), e.node); res != nil {
			t.Errorf("lane %s: quarantined %s allocated: %v", lane, device, allocatedDevices(res))
		}
		if !strings.Contains(e.p.logs(), "drops ResourceSlice device taints") {
			t.Errorf("lane %s: the plugin did not log why it hides the GPU", lane)
		}
	}

	// The Node says why.
	eventually(t, 30*time.Second, "GPUQuarantined Event on "+node, func() (bool, error) {
		l, err := c.client.EventsV1().Events("default").List(context.Background(), metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		for _, ev := range l.Items {
			if ev.Reason == "GPUQuarantined" && ev.Regarding.Kind == "Node" && ev.Regarding.Name == node &&
				ev.Type == "Warning" && strings.Contains(ev.Note, bdf) && strings.Contains(ev.Note, "VerificationFailed") {
				return true, nil
			}
		}
		return false, nil
	})

	// The admin's reset (the alternative to a reboot) clears it: published
	// untainted, allocatable without a toleration. Admin commands that write
	// need the state lock, which serve holds: the plugin is stopped for it
	// (as draining the node's DaemonSet pod would) and started again.
	e.p.stop(t)
	cmd := exec.Command(c.bin, "reset", bdf, "--demo", "--demo-dir", e.dirs.demoDir,
		"--policy", filepath.Join(e.dirs.dir, "no-policy.toml"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("vfio-gpu-dra reset %s: %v\n%s", bdf, err, out)
	}
	e.p = c.startPlugin(t, node, e.dirs, pluginOpts{})
	c.publishedDevice(t, e.p, device, true, func(d resourceapi.Device) bool { return len(d.Taints) == 0 })
	res := c.allocate(t, c.claimFor(t, "taint-cleared", bdf, false), e.node)
	if got := allocatedDevices(res); len(got) != 1 || got[0] != device {
		t.Errorf("after the reset a claim for %s got %v", device, got)
	}
}
