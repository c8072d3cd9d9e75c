package k8s

// Scenario 4, Prepare: the kubelet's DRA manager prepares and unprepares pods'
// claims through the plugin; the runtime's CDI library resolves what comes back;
// the simulated host shows where each GPU went.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
)

const (
	movableSelector  = `device.attributes["vfio-gpu.dra.dev"].keepOnVfio == false`
	metadataCDIClass = driverName + "/metadata"
	containerRoot    = "/var/run/kubernetes.io/dra-device-attributes"
	// Set by the resource-claim controller on claims it makes from a template.
	podClaimNameAnnotation = "resource.kubernetes.io/pod-claim-name"
)

// prepareEnv is one node with a kubelet and a plugin.
type prepareEnv struct {
	c    *cluster
	node *v1.Node
	dirs *nodeDirs
	k    *kubelet
	p    *pluginProc
}

func bdfOf(device string) string {
	s := strings.ReplaceAll(strings.TrimPrefix(device, "gpu-"), "-", ":")
	return s[:len(s)-2] + "." + s[len(s)-1:]
}

func (e *prepareEnv) iommuGroup(t *testing.T, bdf string) string {
	link, err := os.Readlink(filepath.Join(e.dirs.demoDir, "host", "sys", "bus", "pci", "devices", bdf, "iommu_group"))
	if err != nil {
		t.Fatalf("iommu group of %s: %v", bdf, err)
	}
	return filepath.Base(link)
}

// claimAndPod creates, allocates and reserves a claim for a new pod on the node.
func (e *prepareEnv) claimAndPod(t *testing.T, name, class string, selectors ...string) (*resourceapi.ResourceClaim, *v1.Pod, string) {
	t.Helper()
	claim := e.c.newClaim(t, name, class, 1, selectors...)
	res := e.c.allocate(t, claim, e.node)
	if res == nil {
		t.Fatalf("claim %s (%s %v) cannot be allocated on %s", name, class, selectors, e.node.Name)
	}
	pod := e.c.newPod(t, name, e.node.Name, claim.Name)
	claim = e.c.bind(t, claim, res, pod)
	return claim, pod, res.Devices.Results[0].Device
}

// checkPrepared checks what the kubelet got back for a prepared claim, as a
// container runtime (CDI) and KubeVirt (KEP-5304 metadata) would use it.
func (e *prepareEnv) checkPrepared(t *testing.T, claim *resourceapi.ResourceClaim, device string, ids []string) {
	t.Helper()
	bdf := bdfOf(device)
	if len(ids) == 0 {
		t.Fatalf("no CDI devices for claim %s", claim.Name)
	}
	for _, id := range ids {
		if !strings.HasPrefix(id, driverName+"/") {
			t.Errorf("CDI ID %q is not of vendor %s", id, driverName)
		}
	}
	r, err := resolveCDI(e.dirs.cdiDir, ids)
	if err != nil {
		t.Fatalf("CDI: %v", err)
	}
	group := e.iommuGroup(t, bdf)
	for _, want := range []string{"/dev/vfio/vfio", "/dev/vfio/" + group} {
		if !slices.Contains(r.deviceNodes, want) {
			t.Errorf("CDI device nodes %v lack %s", r.deviceNodes, want)
		}
	}
	// KEP-5304 metadata, the way KubeVirt finds it: the metadata CDI device mounts
	// one file per request at a path fixed by the claim and request names.
	// Claims made from a template (the resource-claim controller's annotation) are
	// found by the pod's claim name instead (KEP-5304).
	podClaimName := claim.Annotations[podClaimNameAnnotation]
	want := fmt.Sprintf("%s/resourceclaims/%s/%s/%s-metadata.json", containerRoot, claim.Name, "gpu", driverName)
	if podClaimName != "" {
		want = fmt.Sprintf("%s/resourceclaimtemplates/%s/%s/%s-metadata.json", containerRoot, podClaimName, "gpu", driverName)
	}
	var hostFile string
	for _, m := range r.mounts {
		if m.ContainerPath == want {
			hostFile = m.HostPath
		}
	}
	if hostFile == "" {
		t.Fatalf("no CDI mount at %s (mounts: %+v)", want, r.mounts)
	}
	f, err := os.Open(hostFile)
	if err != nil {
		t.Fatalf("metadata file: %v", err)
	}
	defer f.Close()
	md, err := decodeMetadata(f)
	if err == errNoMetadataAPI {
		// Older lane: at least a JSON stream holding the v1alpha1 object (after the
		// v1beta1 one) that KubeVirt reads.
		t.Logf("%v", err)
		f.Seek(0, 0)
		dec := json.NewDecoder(f)
		var versions []any
		for dec.More() {
			var obj map[string]any
			if err := dec.Decode(&obj); err != nil {
				t.Errorf("metadata stream: %v", err)
				return
			}
			versions = append(versions, obj["apiVersion"])
		}
		if !slices.Contains(versions, any("metadata.resource.k8s.io/v1alpha1")) {
			t.Errorf("metadata stream versions %v lack v1alpha1", versions)
		}
		return
	}
	if err != nil {
		t.Fatalf("decoding metadata with the upstream consumer code: %v", err)
	}
	if md.ClaimName != claim.Name {
		t.Errorf("metadata claim %q, want %q", md.ClaimName, claim.Name)
	}
	if md.PodClaimName != podClaimName {
		t.Errorf("metadata podClaimName %q, want %q", md.PodClaimName, podClaimName)
	}
	// KubeVirt: exactly one device per request, its PCI address from pciBusID.
	if len(md.Requests) != 1 || md.Requests[0].Name != "gpu" || len(md.Requests[0].Devices) != 1 {
		t.Fatalf("metadata requests %+v, want one request gpu with one device", md.Requests)
	}
	d := md.Requests[0].Devices[0]
	if d.Driver != driverName || d.Name != device || d.Pool != e.node.Name {
		t.Errorf("metadata device %s/%s/%s, want %s/%s/%s", d.Driver, d.Pool, d.Name, driverName, e.node.Name, device)
	}
	if got := d.Attributes["resource.kubernetes.io/pciBusID"]; got != bdf {
		t.Errorf("metadata pciBusID %q, want %q", got, bdf)
	}
}

func (e *prepareEnv) wantDriver(t *testing.T, bdf, want string) {
	t.Helper()
	if got := e.dirs.hostDriver(t, bdf); got != want {
		t.Errorf("%s is on %q, want %q", bdf, got, want)
	}
}

func dedup(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return sortedStrings(out)
}

func testPrepare(t *testing.T, c *cluster) {
	const node = "prep-node"
	e := &prepareEnv{c: c, node: c.createNode(t, node), dirs: c.newNodeDirs(t, node)}
	owner := t
	e.k = c.startKubelet(t, nil, node, e.dirs.regDir, e.dirs.kubeletDir)
	// A short stale-claim cleanup period, so a plugin that unprepares claims behind
	// the kubelet's back is caught within the test.
	e.p = c.startPlugin(t, node, e.dirs, pluginOpts{args: []string{"--cleanup-interval", "2"}})
	e.k.waitRegistered(t, 1, 30*time.Second)
	c.waitForSlices(t, e.p, 30*time.Second)

	t.Run("MovesAndRestores", func(t *testing.T) {
		claim, pod, device := e.claimAndPod(t, "prep-move", classAll, movableSelector)
		bdf := bdfOf(device)
		before := e.dirs.hostDriver(t, bdf)
		if before == "vfio-pci" || before == "" {
			t.Fatalf("test bug: %s starts on %q", bdf, before)
		}
		info := e.k.prepare(t, pod)
		ids := cdiIDs(info)
		t.Logf("%s (%s): CDI %v", device, bdf, ids)
		e.wantDriver(t, bdf, "vfio-pci")
		e.checkPrepared(t, claim, device, ids)

		t.Run("RetriedPrepareIdempotent", func(t *testing.T) {
			// A kubelet retry after a timeout sends the same claim again.
			req := &drapbv1.NodePrepareResourcesRequest{Claims: []*drapbv1.Claim{protoClaim(claim.Namespace, string(claim.UID), claim.Name)}}
			for i := 0; i < 2; i++ {
				resp, err := e.k.plugin().NodePrepareResources(context.Background(), req)
				if err != nil {
					t.Fatalf("retry %d: %v", i, err)
				}
				r := resp.Claims[string(claim.UID)]
				if r == nil || r.Error != "" {
					t.Fatalf("retry %d: %+v", i, r)
				}
				var again []string
				for _, d := range r.Devices {
					again = append(again, protoCDIDeviceIDs(d)...)
				}
				if strings.Join(sortedStrings(again), ",") != strings.Join(sortedStrings(ids), ",") {
					t.Errorf("retry %d: CDI %v, first prepare %v", i, again, ids)
				}
			}
			e.wantDriver(t, bdf, "vfio-pci")
		})

		e.k.unprepare(t, pod)
		e.wantDriver(t, bdf, before)
		if _, err := resolveCDI(e.dirs.cdiDir, ids); err == nil {
			t.Errorf("CDI IDs %v still resolve after unprepare", ids)
		}
		c.forceDelete(t, claim)
	})

	t.Run("Health", func(t *testing.T) { e.testHealth(t) })

	t.Run("TemplateClaim", func(t *testing.T) { e.testTemplateClaim(t) })

	t.Run("AdminKeptStaysOnVfio", func(t *testing.T) {
		claim, pod, device := e.claimAndPod(t, "prep-kept", classPrebound)
		bdf := bdfOf(device)
		if !slices.Contains(demoPrebound, device) {
			t.Fatalf("%s allocated for %s", device, classPrebound)
		}
		info := e.k.prepare(t, pod)
		e.wantDriver(t, bdf, "vfio-pci")
		e.checkPrepared(t, claim, device, cdiIDs(info))
		e.k.unprepare(t, pod)
		e.wantDriver(t, bdf, "vfio-pci")
		c.forceDelete(t, claim)
	})

	t.Run("RestartedKubeletSameStateIdempotent", func(t *testing.T) {
		claim, pod, device := e.claimAndPod(t, "prep-restart", classAll, movableSelector)
		bdf := bdfOf(device)
		before := e.dirs.hostDriver(t, bdf)
		ids := cdiIDs(e.k.prepare(t, pod))
		e.wantDriver(t, bdf, "vfio-pci")
		oldSlices := map[string]bool{}
		for _, uid := range e.sliceUIDs(t) {
			oldSlices[uid] = true
		}

		// Kubelet restart: a new DRA manager on the same checkpoint directory, the
		// pod still running (known to it before its reconcile loop runs). It
		// restores the claim from the checkpoint, wipes the node's slices at start
		// (the plugin must publish them again) and, as kubelet does, sends the
		// restored claim's NodePrepareResources again: the plugin must answer
		// with the same devices without preparing anything twice.
		running := e.k.activePods()
		e.k.stop()
		e.k = c.startKubelet(t, owner, node, e.dirs.regDir, e.dirs.kubeletDir, running...)
		e.k.waitRegistered(t, 1, 30*time.Second)
		calls := grpcCalls(t, "NodePrepareResources")
		info := e.k.prepare(t, pod)
		n := grpcCalls(t, "NodePrepareResources") - calls
		t.Logf("the restarted kubelet called NodePrepareResources %d time(s) for the checkpointed claim", n)
		// Kubelets 1.34-1.37 keep no "prepared" flag in their checkpoint: a restored
		// claim is sent to the plugin exactly once more.
		if n != 1 {
			t.Errorf("the restarted kubelet called NodePrepareResources %d times for the restored claim, want 1", n)
		}
		if got := dedup(cdiIDs(info)); strings.Join(got, ",") != strings.Join(dedup(ids), ",") {
			t.Errorf("CDI after restart %v, before %v", got, ids)
		}
		e.wantDriver(t, bdf, "vfio-pci")
		e.checkPrepared(t, claim, device, dedup(cdiIDs(info)))
		t.Run("SlicesRepublishedAfterKubeletWipe", func(t *testing.T) {
			// The new manager's startup wipe deletes every slice of the node (its
			// DRAPluginManager wipes at start), the plugin must publish new ones:
			// within the time, none of the slices from before the restart is left,
			// and a complete pool of new slices offers every GPU again.
			eventually(t, 45*time.Second, "the pre-restart slices of "+node+" wiped", func() (bool, error) {
				for _, uid := range e.sliceUIDs(t) {
					if oldSlices[uid] {
						return false, nil
					}
				}
				return true, nil
			})
			devices := c.waitForSlices(t, e.p, 45*time.Second)
			for _, uid := range e.sliceUIDs(t) {
				if oldSlices[uid] {
					t.Errorf("slice %s from before the kubelet restart is back", uid)
				}
			}
			if got := deviceNames(devices); strings.Join(got, ",") != strings.Join(demoOffered, ",") {
				t.Errorf("republished devices %v, want %v", got, demoOffered)
			}
		})
		// One unprepare undoes it: nothing was prepared twice.
		e.k.unprepare(t, pod)
		e.wantDriver(t, bdf, before)
		if _, err := resolveCDI(e.dirs.cdiDir, ids); err == nil {
			t.Errorf("CDI IDs %v still resolve after unprepare", ids)
		}
		c.forceDelete(t, claim)
	})

	t.Run("DeletedClaimStaysPreparedUntilUnprepare", func(t *testing.T) {
		claim, pod, device := e.claimAndPod(t, "prep-deleted", classAll, movableSelector)
		bdf := bdfOf(device)
		before := e.dirs.hostDriver(t, bdf)
		ids := cdiIDs(e.k.prepare(t, pod))
		vmExits := e.holdGroup(t, bdf)
		c.forceDelete(t, claim)
		// Several of the plugin's cleanup periods: the pod's VM still holds the
		// group, the GPU stays.
		time.Sleep(8 * time.Second)
		e.wantDriver(t, bdf, "vfio-pci")
		if _, err := resolveCDI(e.dirs.cdiDir, ids); err != nil {
			t.Errorf("CDI of the running pod's deleted claim: %v", err)
		}
		vmExits()
		e.k.unprepare(t, pod)
		e.wantDriver(t, bdf, before)
	})

	t.Run("DeletedIdleClaimReleasedByCleanup", func(t *testing.T) {
		// A prepare that finished after the kubelet's unprepare (or a claim deleted
		// with nothing using it): the kubelet never unprepares it again, so the
		// cleanup releases it once two of its periods (2 s) found no process on
		// the group, with the real API server answering 404 for the claim.
		claim, pod, device := e.claimAndPod(t, "prep-orphan", classAll, movableSelector)
		bdf := bdfOf(device)
		before := e.dirs.hostDriver(t, bdf)
		e.k.prepare(t, pod)
		c.forceDelete(t, claim)
		deadline := time.Now().Add(20 * time.Second)
		for e.dirs.hostDriver(t, bdf) != before {
			if time.Now().After(deadline) {
				t.Fatalf("%s still on %s 20 s after its idle claim was deleted", bdf, e.dirs.hostDriver(t, bdf))
			}
			time.Sleep(200 * time.Millisecond)
		}
		// Already released: the kubelet's unprepare is a no-op success.
		e.k.unprepare(t, pod)
		e.wantDriver(t, bdf, before)
	})
}

// sliceUIDs lists the UIDs of the node's slices of the driver.
func (e *prepareEnv) sliceUIDs(t *testing.T) []string {
	t.Helper()
	slices, err := e.c.nodeSlices(e.node.Name)
	if err != nil {
		t.Fatalf("listing the slices of %s: %v", e.node.Name, err)
	}
	var out []string
	for _, s := range slices {
		out = append(out, string(s.UID))
	}
	return out
}

// holdGroup makes a process of the simulated host hold /dev/vfio/<group> of bdf,
// as a running VM does (the plugin's holder scan reads <host>/proc/*/fd); the
// returned func closes it.
func (e *prepareEnv) holdGroup(t *testing.T, bdf string) func() {
	t.Helper()
	host := filepath.Join(e.dirs.demoDir, "host")
	fdDir := filepath.Join(host, "proc", "4242", "fd")
	if err := os.MkdirAll(fdDir, 0o755); err != nil {
		t.Fatalf("simulated VM process: %v", err)
	}
	fd := filepath.Join(fdDir, "30")
	if err := os.Symlink(filepath.Join(host, "dev", "vfio", e.iommuGroup(t, bdf)), fd); err != nil {
		t.Fatalf("simulated VM fd: %v", err)
	}
	return func() {
		if err := os.Remove(fd); err != nil {
			t.Errorf("closing the simulated VM fd: %v", err)
		}
	}
}
