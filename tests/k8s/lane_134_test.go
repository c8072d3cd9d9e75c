//go:build !k8s136 && !k8s137

package k8s

// Lane 1.34 (oldest supported): the version-specific calls, nothing else.

import (
	"context"
	"errors"
	"io"
	"testing"

	v1 "k8s.io/api/core/v1"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"
	"k8s.io/dynamic-resource-allocation/structured"
	"k8s.io/klog/v2"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
	pluginwatcherapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"k8s.io/kubernetes/pkg/controller/resourceclaim"
	"k8s.io/kubernetes/pkg/features"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

const lane = "1.34"

// DRADeviceTaints is alpha and off in 1.34: the API server prunes device taints, so the plugin leaves a quarantined GPU out.
const laneKeepsDeviceTaints = false

func newDRAManager(logger klog.Logger, client kubernetes.Interface, stateDir string) (*dra.Manager, error) {
	return dra.NewManager(logger, client, stateDir)
}

func startDRAManager(ctx context.Context, mgr *dra.Manager, activePods func() []*v1.Pod, getNode func(context.Context) (*v1.Node, error), ready allReady) error {
	return mgr.Start(ctx, activePods, func() (*v1.Node, error) { return getNode(ctx) }, ready)
}

func runPluginManager(ctx context.Context, regDir string, handler cache.PluginHandler) {
	pm := pluginmanager.NewPluginManager(regDir, record.NewFakeRecorder(1000))
	pm.AddHandler(pluginwatcherapi.DRAPlugin, handler)
	go pm.Run(allReady{}, ctx.Done())
}

// The scheduler's allocator features with 1.34's default feature gates
// (DRAAdminAccess, DRAPrioritizedList, DRAResourceClaimDeviceStatus beta/on).
func allocatorFeatures() structured.Features {
	return structured.Features{AdminAccess: true, PrioritizedList: true, DeviceStatus: true}
}

// Health: ResourceHealthStatus is alpha/off in 1.34, the kubelet never opens the
// stream (and v1.ResourceHealth has no message yet): health_test.go is 1.36+.
func (e *prepareEnv) testHealth(t *testing.T) {
	t.Skipf("lane %s: ResourceHealthStatus is alpha and off, the kubelet opens no health stream", lane)
}

func testUnhealthyTaint(t *testing.T, _ *cluster) {
	t.Skipf("lane %s: DRADeviceTaints is alpha and off; tainted GPUs are hidden (the Quarantine test checks that)", lane)
}

// startClaimController runs the kube-controller-manager's resource-claim
// controller with its features from the gates, as kube-controller-manager 1.34 does.
func startClaimController(ctx context.Context, client kubernetes.Interface) error {
	f := informers.NewSharedInformerFactory(client, 0)
	ctrl, err := resourceclaim.NewController(klog.FromContext(ctx), resourceclaim.Features{
		AdminAccess:     utilfeature.DefaultFeatureGate.Enabled(features.DRAAdminAccess),
		PrioritizedList: utilfeature.DefaultFeatureGate.Enabled(features.DRAPrioritizedList),
	}, client, f.Core().V1().Pods(),
		f.Resource().V1().ResourceClaims(), f.Resource().V1().ResourceClaimTemplates())
	if err != nil {
		return err
	}
	f.Start(ctx.Done())
	go ctrl.Run(ctx, 1)
	return nil
}

var errNoMetadataAPI = errors.New("KEP-5304 metadata types (k8s.io/dynamic-resource-allocation/api/metadata) first ship in v0.36: decoded in the 1.36 lane")

// decodeMetadata decodes a KEP-5304 metadata stream with the upstream consumer code.
func decodeMetadata(r io.Reader) (*deviceMetadata, error) { return nil, errNoMetadataAPI }

// 1.34 has no resourceclaims/driver authorization (DRAResourceClaimGranularStatusAuthorization is 1.36+).
func laneRBACChecks() []rbacCheck { return nil }

// The gogo-generated protos of 1.34 name the field CDIDeviceIDs.
func protoCDIDeviceIDs(d *drapbv1.Device) []string { return d.GetCDIDeviceIDs() }

func protoClaim(namespace, uid, name string) *drapbv1.Claim {
	return &drapbv1.Claim{Namespace: namespace, UID: uid, Name: name}
}
