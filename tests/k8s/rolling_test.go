package k8s

// Scenario 5, RollingUpdate: two plugin pods of the driver on one node, as the
// DaemonSet's `maxSurge: 1` runs them during an update (`serve --pod-uid`). The
// kubelet's plugin manager registers both (per-pod socket names) and its DRA
// plugin manager calls the newest connected one; a claim prepared through the
// old instance is unprepared through the new one; when the old one stops, the
// kubelet keeps the new registration, calls keep working and the node's slices
// stay (the new instance takes over publishing them).

import (
	"context"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	draplugin "k8s.io/kubernetes/pkg/kubelet/cm/dra/plugin"
)

// deleteNodeSlices deletes the driver's slices of node as an admin would.
func (c *cluster) deleteNodeSlices(t *testing.T, node string) {
	t.Helper()
	slices, err := c.nodeSlices(node)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range slices {
		if err := c.client.ResourceV1().ResourceSlices().Delete(context.Background(), s.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatalf("deleting slice %s: %v", s.Name, err)
		}
	}
}

// pluginEndpoint is the DRA socket the kubelet calls for p (an unexported field
// of the kubelet's DRAPlugin, read without changing it).
func pluginEndpoint(p *draplugin.DRAPlugin) string {
	if p == nil {
		return "<no plugin>"
	}
	v := reflect.ValueOf(p).Elem().FieldByName("endpoint")
	if !v.IsValid() {
		return "<unknown: kubelet's DRAPlugin has no endpoint field>"
	}
	return v.String()
}

func testRollingUpdate(t *testing.T, c *cluster) {
	const node = "roll-node"
	const uidOld = "00000000-0000-4000-8000-0000000000a1"
	const uidNew = "00000000-0000-4000-8000-0000000000b2"
	e := &prepareEnv{c: c, node: c.createNode(t, node), dirs: c.newNodeDirs(t, node)}
	e.k = c.startKubelet(t, nil, node, e.dirs.regDir, e.dirs.kubeletDir)
	endpoint := func(uid string) string {
		return filepath.Join(e.dirs.pluginsDir, driverName, "dra-"+uid+".sock")
	}
	start := func(uid string) *pluginProc {
		return c.startPlugin(t, node, e.dirs, pluginOpts{args: []string{"--pod-uid", uid}})
	}

	old := start(uidOld)
	e.k.waitRegistered(t, 1, 30*time.Second)
	c.waitForSlices(t, old, 30*time.Second)
	if got := pluginEndpoint(e.k.plugin()); got != endpoint(uidOld) {
		t.Fatalf("kubelet calls %s, want the old instance's %s", got, endpoint(uidOld))
	}
	claim1, pod1, dev1 := e.claimAndPod(t, "roll-1", classAll, movableSelector)
	bdf1 := bdfOf(dev1)
	before1 := e.dirs.hostDriver(t, bdf1)
	e.k.prepare(t, pod1)
	e.wantDriver(t, bdf1, "vfio-pci")

	// The new pod starts next to the old one: both registered, the newest called.
	neu := start(uidNew)
	e.k.waitRegistered(t, 2, 30*time.Second)
	eventually(t, 10*time.Second, "the kubelet calling the newest instance", func() (bool, error) {
		return pluginEndpoint(e.k.plugin()) == endpoint(uidNew), nil
	})
	if old.exited() {
		t.Fatalf("the old instance exited when the new one started:\n%s", indent(old.logs()))
	}

	// What the old instance prepared, the new one unprepares.
	e.k.unprepare(t, pod1)
	e.wantDriver(t, bdf1, before1)
	c.forceDelete(t, claim1)

	claim2, pod2, dev2 := e.claimAndPod(t, "roll-2", classAll, movableSelector)
	bdf2 := bdfOf(dev2)
	before2 := e.dirs.hostDriver(t, bdf2)
	e.k.prepare(t, pod2)
	e.wantDriver(t, bdf2, "vfio-pci")

	// The old pod is stopped (SIGTERM): it deregisters, the new one stays the
	// kubelet's plugin and serves the unprepare of a claim prepared before.
	deregs := e.k.handler.count("deregister")
	old.stop(t)
	if old.err != nil {
		t.Errorf("old instance: %v", old.err)
	}
	eventually(t, 20*time.Second, "deregistration of the old instance", func() (bool, error) {
		return e.k.handler.count("deregister") > deregs, nil
	})
	for _, ev := range e.k.handler.events() {
		if ev.op == "deregister" && ev.endpoint != endpoint(uidOld) {
			t.Errorf("kubelet deregistered %s", ev.endpoint)
		}
	}
	if got := pluginEndpoint(e.k.plugin()); got != endpoint(uidNew) {
		t.Fatalf("after the old instance stopped the kubelet calls %s, want %s", got, endpoint(uidNew))
	}
	e.k.unprepare(t, pod2)
	e.wantDriver(t, bdf2, before2)
	c.forceDelete(t, claim2)

	// The slices stay, and the new instance publishes them now: deleted, they
	// come back.
	if s, err := c.nodeSlices(node); err != nil || len(s) == 0 {
		t.Fatalf("slices after the old instance stopped: %d, %v", len(s), err)
	}
	c.deleteNodeSlices(t, node)
	c.waitForSlices(t, neu, 30*time.Second)
}
