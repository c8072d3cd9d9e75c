//go:build k8s136 || k8s137

package k8s

// Unhealthy taints (issue 22): a GPU the plugin's health scan finds unhealthy
// (here: its config space reads 0xffff on the demo host) is published with the
// device taint vfio-gpu.dra.dev/unhealthy=NotResponding, which the API server
// keeps (1.36 beta/on, 1.37 GA); the real allocator does not give it to a claim
// without a toleration and does with one; the taint goes once the GPU answers
// again. With `serve --unhealthy-taint-effect NoExecute` the effect is NoSchedule
// while nobody holds the GPU and NoExecute while a prepared claim's VM would be
// left with a dead device. Lane 1.34 (gate alpha/off) hides tainted GPUs, which
// the Quarantine test covers.

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
)

const unhealthyTaintKey = driverName + "/unhealthy"

// unhealthyTaint is the device's unhealthy taint, if any.
func unhealthyTaint(d resourceapi.Device) *resourceapi.DeviceTaint {
	for i := range d.Taints {
		if d.Taints[i].Key == unhealthyTaintKey {
			return &d.Taints[i]
		}
	}
	return nil
}

// rescan makes the plugin scan its devices now: every prepare call does, even
// one for a claim that does not exist (the scan interval is 30 s).
func (e *prepareEnv) rescan(t *testing.T) {
	t.Helper()
	req := &drapbv1.NodePrepareResourcesRequest{Claims: []*drapbv1.Claim{
		protoClaim(testNS, "00000000-0000-4000-8000-000000000000", "no-such-claim"),
	}}
	if _, err := e.k.plugin().NodePrepareResources(context.Background(), req); err != nil {
		t.Fatalf("prepare call to trigger a device scan: %v", err)
	}
}

// claimTolerating creates a claim for exactly the GPU at bdf that tolerates the
// unhealthy taint (NoSchedule).
func (c *cluster) claimTolerating(t *testing.T, name, bdf string) *resourceapi.ResourceClaim {
	t.Helper()
	return c.claimForGPU(t, name, bdf, unhealthyTaintKey)
}

func testUnhealthyTaint(t *testing.T, c *cluster) {
	const node = "unhealthy-node"
	e := &prepareEnv{c: c, node: c.createNode(t, node), dirs: c.newNodeDirs(t, node)}
	e.k = c.startKubelet(t, nil, node, e.dirs.regDir, e.dirs.kubeletDir)
	e.p = c.startPlugin(t, node, e.dirs, pluginOpts{args: []string{"--unhealthy-taint-effect", "NoExecute"}})
	e.k.waitRegistered(t, 1, 30*time.Second)
	c.waitForSlices(t, e.p, 30*time.Second)

	// Which GPU: what the allocator gives a movable claim (then given back unused).
	probe := c.newClaim(t, "unhealthy-probe", classAll, 1, movableSelector)
	res := c.allocate(t, probe, e.node)
	if res == nil {
		t.Fatalf("no movable GPU on %s", node)
	}
	device := res.Devices.Results[0].Device
	bdf := bdfOf(device)
	cfg := filepath.Join(e.dirs.demoDir, "host", "sys", "bus", "pci", "devices", bdf, "config")
	answers := func() {
		t.Helper()
		if err := os.Remove(cfg); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		e.rescan(t)
	}
	stopsAnswering := func() {
		t.Helper()
		if err := os.WriteFile(cfg, []byte{0xff, 0xff, 0xff, 0xff}, 0o644); err != nil {
			t.Fatalf("making %s unhealthy on the demo host: %v", bdf, err)
		}
		e.rescan(t)
	}
	t.Cleanup(func() { _ = os.Remove(cfg) })

	// Idle and unhealthy: tainted NoSchedule whatever the policy (nobody to evict).
	stopsAnswering()
	d := c.publishedDevice(t, e.p, device, true, func(d resourceapi.Device) bool { return unhealthyTaint(d) != nil })
	taint := unhealthyTaint(d)
	if taint.Value != "NotResponding" || taint.Effect != resourceapi.DeviceTaintEffectNoSchedule || taint.TimeAdded == nil {
		t.Errorf("%s taint %+v, want %s=NotResponding:NoSchedule with timeAdded", device, *taint, unhealthyTaintKey)
	}
	if res := c.allocate(t, c.claimFor(t, "unhealthy-no-toleration", bdf, false), e.node); res != nil {
		t.Errorf("the allocator gave unhealthy %s to a claim without a toleration: %v", device, allocatedDevices(res))
	}
	if got := allocatedDevices(c.allocate(t, c.claimTolerating(t, "unhealthy-tolerated", bdf), e.node)); len(got) != 1 || got[0] != device {
		t.Errorf("a claim tolerating %s got %v, want [%s]", unhealthyTaintKey, got, device)
	}

	// Healthy again: untainted, allocatable without a toleration.
	answers()
	c.publishedDevice(t, e.p, device, true, func(d resourceapi.Device) bool { return len(d.Taints) == 0 })
	if got := allocatedDevices(c.allocate(t, c.claimFor(t, "unhealthy-recovered", bdf, false), e.node)); len(got) != 1 || got[0] != device {
		t.Errorf("after recovery a claim for %s got %v", device, got)
	}

	// A VM holds it when it stops answering: NoExecute, as the policy says.
	claim := c.claimFor(t, "unhealthy-tenant", bdf, false)
	res = c.allocate(t, claim, e.node)
	if got := allocatedDevices(res); len(got) != 1 || got[0] != device {
		t.Fatalf("tenant claim got %v, want [%s]", got, device)
	}
	tenantPod := c.newPod(t, "unhealthy-tenant", node, claim.Name)
	claim = c.bind(t, claim, res, tenantPod)
	e.k.prepare(t, tenantPod)
	stopsAnswering()
	d = c.publishedDevice(t, e.p, device, true, func(d resourceapi.Device) bool {
		tt := unhealthyTaint(d)
		return tt != nil && tt.Effect == resourceapi.DeviceTaintEffectNoExecute
	})
	if tt := unhealthyTaint(d); tt.Value != "NotResponding" || tt.TimeAdded == nil {
		t.Errorf("%s taint %+v, want %s=NotResponding:NoExecute with timeAdded", device, *tt, unhealthyTaintKey)
	}
	// It answers again before the release (a GPU that does not would be
	// quarantined by the release's verification): the taint goes.
	answers()
	c.publishedDevice(t, e.p, device, true, func(d resourceapi.Device) bool { return len(d.Taints) == 0 })
	e.k.unprepare(t, tenantPod)
	c.forceDelete(t, claim)
}
