//go:build k8s136 || k8s137

package k8s

// Device health through the kubelet's own DRA manager: the plugin's
// DRAResourceHealth stream feeds the manager's health cache, which the kubelet
// reads into pod.status.containerStatuses[].allocatedResourcesStatus
// (Manager.UpdateAllocatedResourcesStatus) and announces on Manager.Updates() when
// a device of a prepared claim changes. Lanes 1.36+ (1.34: ResourceHealthStatus is
// alpha and off, and v1.ResourceHealth has no message; its lane file skips).

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
)

// podHealth is what the kubelet would write into the pod's container status for
// its claim "gpu": the ResourceHealth entries of resource "claim:gpu".
func (e *prepareEnv) podHealth(pod *v1.Pod) []v1.ResourceHealth {
	status := &v1.PodStatus{ContainerStatuses: []v1.ContainerStatus{{Name: pod.Spec.Containers[0].Name}}}
	allocatedResourcesStatus(e.k.mgr, pod, status)
	for _, rs := range status.ContainerStatuses[0].AllocatedResourcesStatus {
		if rs.Name == "claim:gpu" {
			return rs.Resources
		}
	}
	return nil
}

// waitHealth waits until the pod's only claimed device has the health want (and a
// message containing msg) in the kubelet's view, and returns it.
func (e *prepareEnv) waitHealth(t *testing.T, pod *v1.Pod, want v1.ResourceHealthStatus, msg string, timeout time.Duration) v1.ResourceHealth {
	t.Helper()
	var got []v1.ResourceHealth
	deadline := time.Now().Add(timeout)
	for {
		got = e.podHealth(pod)
		if len(got) == 1 && got[0].Health == want && (msg == "" || got[0].Message != nil && strings.Contains(*got[0].Message, msg)) {
			return got[0]
		}
		if time.Now().After(deadline) {
			var shown []string
			for _, h := range got {
				m := "<no message>"
				if h.Message != nil {
					m = *h.Message
				}
				shown = append(shown, string(h.ResourceID)+"="+string(h.Health)+" ("+m+")")
			}
			t.Fatalf("after %v the kubelet's allocatedResourcesStatus for %s is %v, want one device %s (message with %q)\nplugin log:\n%s",
				timeout, pod.Name, shown, want, msg, indent(e.p.logs()))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (e *prepareEnv) testHealth(t *testing.T) {
	if laneHealthService != "" {
		// 1.37: the kubelet only watches health of a plugin that advertised it.
		if got := chosenHealthService(e.k.plugin()); got != laneHealthService {
			t.Fatalf("kubelet chose health service %q, want %q", got, laneHealthService)
		}
	}
	claim, pod, device := e.claimAndPod(t, "prep-health", classAll, movableSelector)
	bdf := bdfOf(device)
	before := e.dirs.hostDriver(t, bdf)
	ids := cdiIDs(e.k.prepare(t, pod))

	// The demo host's scan finds the prepared GPU healthy: Unknown (the cache's
	// default) must turn Healthy from the plugin's stream.
	h := e.waitHealth(t, pod, v1.ResourceHealthStatusHealthy, "", 30*time.Second)
	if !slices.Contains(ids, string(h.ResourceID)) {
		t.Errorf("health resource ID %q is none of the pod's CDI IDs %v", h.ResourceID, ids)
	}

	// The GPU stops answering: its config space reads 0xffff (what a device that
	// fell off the bus returns). Any prepare makes the plugin rescan soon; a retried
	// prepare of the same claim (idempotent) is the cheapest.
	cfg := filepath.Join(e.dirs.demoDir, "host", "sys", "bus", "pci", "devices", bdf, "config")
	if err := os.WriteFile(cfg, []byte{0xff, 0xff, 0xff, 0xff}, 0o644); err != nil {
		t.Fatalf("making %s unhealthy on the demo host: %v", bdf, err)
	}
	defer os.Remove(cfg)
	drainUpdates(e)
	req := &drapbv1.NodePrepareResourcesRequest{Claims: []*drapbv1.Claim{protoClaim(claim.Namespace, string(claim.UID), claim.Name)}}
	if _, err := e.k.plugin().NodePrepareResources(context.Background(), req); err != nil {
		t.Fatalf("re-prepare: %v", err)
	}
	// The message reaches the pod status with ResourceHealthStatusMessage (beta/on 1.36+).
	h = e.waitHealth(t, pod, v1.ResourceHealthStatusUnhealthy, "0xffff", 45*time.Second)
	t.Logf("%s: %s %q", h.ResourceID, h.Health, *h.Message)
	// And the manager told the kubelet's status loop which pod to update.
	if !e.waitUpdate(pod.UID, 5*time.Second) {
		t.Errorf("no Manager.Updates() notification for pod %s after its device turned unhealthy", pod.UID)
	}

	if err := os.Remove(cfg); err != nil {
		t.Fatal(err)
	}
	e.k.unprepare(t, pod)
	e.wantDriver(t, bdf, before)
	e.c.forceDelete(t, claim)
}

// drainUpdates empties the manager's update channel (nothing else reads it here).
func drainUpdates(e *prepareEnv) {
	for {
		select {
		case <-e.k.mgr.Updates():
		default:
			return
		}
	}
}

// waitUpdate waits for a Manager.Updates() notification naming pod.
func (e *prepareEnv) waitUpdate(pod types.UID, timeout time.Duration) bool {
	deadline := time.After(timeout)
	for {
		select {
		case u := <-e.k.mgr.Updates():
			if slices.Contains(u.PodUIDs, string(pod)) {
				return true
			}
		case <-deadline:
			return false
		}
	}
}
