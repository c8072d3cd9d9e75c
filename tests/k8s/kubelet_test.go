package k8s

// The kubelet side, made of the kubelet's own code: its plugin manager (plugin
// watcher on the registration directory, the grpc-go registration dial,
// GetInfo/NotifyRegistrationStatus) and its DRA manager (DRAPluginManager with
// version choice and slice wiping, PrepareResources/UnprepareResources, the
// claim-info checkpoint). Only the pod lifecycle around it is the harness's.

import (
	"context"
	"reflect"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/component-base/metrics/legacyregistry"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	draplugin "k8s.io/kubernetes/pkg/kubelet/cm/dra/plugin"
	kubeletmetrics "k8s.io/kubernetes/pkg/kubelet/metrics"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

// regEvent is one call of the plugin manager into the DRA handler.
type regEvent struct {
	op       string // "validate", "register", "deregister"
	name     string
	endpoint string
	versions []string
	err      error
	at       time.Time
}

// recordingHandler passes every call to the kubelet's DRA handler and records it.
type recordingHandler struct {
	inner cache.PluginHandler
	mu    sync.Mutex
	evs   []regEvent
}

func (h *recordingHandler) add(e regEvent) {
	h.mu.Lock()
	defer h.mu.Unlock()
	e.at = time.Now()
	h.evs = append(h.evs, e)
}

// ValidatePlugin, RegisterPlugin, DeRegisterPlugin: handler_pre137_test.go (no
// context before 1.37) and lane_137_test.go.

func (h *recordingHandler) events() []regEvent {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]regEvent(nil), h.evs...)
}

func (h *recordingHandler) count(op string) int {
	n := 0
	for _, e := range h.events() {
		if e.op == op && e.err == nil {
			n++
		}
	}
	return n
}

type kubelet struct {
	node     string
	client   kubernetes.Interface
	mgr      *dra.Manager
	handler  *recordingHandler
	cancel   context.CancelFunc
	stopOnce sync.Once
	mu       sync.Mutex
	pods     map[types.UID]*v1.Pod
}

// startKubelet starts a DRA manager with its checkpoint in stateDir and a plugin
// manager watching regDir, both as kubelet wires them (pkg/kubelet/kubelet.go,
// cm/container_manager_linux.go), with the kubelet's node identity.
// owner is the test whose end stops it (nil: t). active are the pods running on
// the node when it starts (a restarted kubelet knows them from its pod sources
// before its DRA reconcile loop runs, which unprepares the claims of other pods).
func (c *cluster) startKubelet(t, owner *testing.T, node, regDir, stateDir string, active ...*v1.Pod) *kubelet {
	t.Helper()
	registerKubeletMetrics()
	ctx, cancel := context.WithCancel(context.Background())
	logger := klog.Background().WithName("kubelet").WithValues("node", node)
	ctx = klog.NewContext(ctx, logger)
	k := &kubelet{node: node, client: c.nodeClient(node), cancel: cancel, pods: map[types.UID]*v1.Pod{}}
	for _, p := range active {
		k.pods[p.UID] = p
	}
	mgr, err := newDRAManager(logger, k.client, stateDir)
	if err != nil {
		cancel()
		t.Fatalf("dra.NewManager: %v", err)
	}
	k.mgr = mgr
	getNode := func(ctx context.Context) (*v1.Node, error) {
		return k.client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	}
	if err := startDRAManager(ctx, mgr, k.activePods, getNode, allReady{}); err != nil {
		cancel()
		t.Fatalf("dra.Manager.Start: %v", err)
	}
	k.handler = &recordingHandler{inner: mgr.GetWatcherHandler()}
	runPluginManager(ctx, regDir, k.handler)
	if owner == nil {
		owner = t
	}
	owner.Cleanup(k.stop)
	return k
}

// stop ends the kubelet: its contexts are cancelled, the DRA plugin manager stops.
func (k *kubelet) stop() {
	k.stopOnce.Do(k.doStop)
}

func (k *kubelet) doStop() {
	k.cancel()
	if pm, ok := k.mgr.GetWatcherHandler().(*draplugin.DRAPluginManager); ok {
		pm.Stop()
	}
}

// setActive adds or removes a pod from the kubelet's active pods (what the
// reconcile loop unprepares claims of when it disappears).
func (k *kubelet) setActive(pod *v1.Pod, active bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if active {
		k.pods[pod.UID] = pod
	} else {
		delete(k.pods, pod.UID)
	}
}

func (k *kubelet) activePods() []*v1.Pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]*v1.Pod, 0, len(k.pods))
	for _, p := range k.pods {
		out = append(out, p)
	}
	return out
}

// plugin returns the kubelet's registered plugin of the driver, or nil.
func (k *kubelet) plugin() *draplugin.DRAPlugin {
	pm, ok := k.mgr.GetWatcherHandler().(*draplugin.DRAPluginManager)
	if !ok {
		return nil
	}
	p, err := pm.GetPlugin(driverName)
	if err != nil {
		return nil
	}
	return p
}

// chosenService is the DRA service version the kubelet picked for p (an
// unexported field of the kubelet's DRAPlugin, read without changing it).
func chosenService(p *draplugin.DRAPlugin) string {
	v := reflect.ValueOf(p).Elem().FieldByName("chosenService")
	if !v.IsValid() {
		return "<unknown: kubelet's DRAPlugin has no chosenService field>"
	}
	return v.String()
}

// chosenHealthService is the DRAResourceHealth service version the kubelet picked
// for p ("" = none; a kubelet before 1.37 has no such field and opens the stream anyway).
func chosenHealthService(p *draplugin.DRAPlugin) string {
	v := reflect.ValueOf(p).Elem().FieldByName("chosenHealthService")
	if !v.IsValid() {
		return "<unknown: kubelet's DRAPlugin has no chosenHealthService field>"
	}
	return v.String()
}

// waitRegistered waits until the kubelet's handler registered the driver n times.
func (k *kubelet) waitRegistered(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	eventually(t, timeout, "kubelet registration of the plugin", func() (bool, error) {
		return k.handler.count("register") >= n && k.plugin() != nil, nil
	})
}

type allReady struct{}

func (allReady) AddSource(string)                 {}
func (allReady) AllReady() bool                   { return true }
func (allReady) SourceForPodReady(types.UID) bool { return true }

var metricsOnce sync.Once

func registerKubeletMetrics() {
	metricsOnce.Do(func() { legacyregistry.MustRegister(kubeletmetrics.DRAGRPCOperationsDuration) })
}

// grpcCalls counts the kubelet's DRA gRPC calls of a method (e.g.
// "NodePrepareResources") so far, from the kubelet's own metric.
func grpcCalls(t *testing.T, method string) uint64 {
	t.Helper()
	mfs, err := legacyregistry.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, mf := range mfs {
		if mf.GetName() != kubeletmetrics.DRASubsystem+"_"+kubeletmetrics.DRAGRPCOperationsDurationKey {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "method_name" && len(l.GetValue()) >= len(method) && l.GetValue()[len(l.GetValue())-len(method):] == method {
					n += m.GetHistogram().GetSampleCount()
				}
			}
		}
	}
	return n
}
