//go:build k8s137

package k8s

// Lane 1.37 (newest): the version-specific calls, nothing else.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	v1 "k8s.io/api/core/v1"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"
	"k8s.io/dynamic-resource-allocation/api/metadata"
	"k8s.io/dynamic-resource-allocation/devicemetadata"
	"k8s.io/dynamic-resource-allocation/structured"
	"k8s.io/klog/v2"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
	pluginwatcherapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"k8s.io/kubernetes/pkg/controller/resourceclaim"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
	"k8s.io/kubernetes/pkg/scheduler/framework/plugins/feature"
)

const lane = "1.37"

// DRADeviceTaints is GA in 1.37: device taints are kept.
const laneKeepsDeviceTaints = true

func newDRAManager(logger klog.Logger, client kubernetes.Interface, stateDir string) (*dra.Manager, error) {
	return dra.NewManager(logger, client, stateDir)
}

func startDRAManager(ctx context.Context, mgr *dra.Manager, activePods func() []*v1.Pod, getNode func(context.Context) (*v1.Node, error), ready allReady) error {
	return mgr.Start(ctx, activePods, getNode, ready)
}

func runPluginManager(ctx context.Context, regDir string, handler cache.PluginHandler) {
	pm := pluginmanager.NewPluginManager(regDir, record.NewFakeRecorder(1000))
	pm.AddHandler(pluginwatcherapi.DRAPlugin, handler)
	go pm.Run(ctx, allReady{}, ctx.Done())
}

// The scheduler's allocator features from 1.37's default feature gates, mapped
// exactly as the DynamicResources plugin maps them (dynamicresources.go,
// features from feature.NewSchedulerFeaturesFromGates).
func allocatorFeatures() structured.Features {
	fts := feature.NewSchedulerFeaturesFromGates(utilfeature.DefaultFeatureGate)
	return structured.Features{
		AdminAccess:             fts.EnableDRAAdminAccess,
		PrioritizedList:         fts.EnableDRAPrioritizedList,
		PartitionableDevices:    fts.EnableDRAPartitionableDevices,
		DeviceTaints:            fts.EnableDRADeviceTaints,
		DeviceBindingAndStatus:  fts.EnableDRADeviceBindingConditions && fts.EnableDRAResourceClaimDeviceStatus,
		ConsumableCapacity:      fts.EnableDRAConsumableCapacity,
		FractionalCapacityRange: fts.EnableDRAFractionalCapacityRange,
		ListTypeAttributes:      fts.EnableDRAListTypeAttributes,
		OptionalNodeOperations:  fts.EnableDRAOptionalNodeOperations,
		DerivedAttributes:       fts.EnableDRADerivedAttributes,
		CompatibilityGroups:     fts.EnableDRADeviceCompatibilityGroups,
	}
}

// Health: ResourceHealthStatus is beta/on since 1.36, and 1.37's kubelet opens the
// stream only for a plugin that advertises a health service, the newest both know
// (pickHealthService, kubernetes#139477): v1.DRAResourceHealth.
const laneHealthService = "v1.DRAResourceHealth"

func allocatedResourcesStatus(mgr *dra.Manager, pod *v1.Pod, status *v1.PodStatus) {
	mgr.UpdateAllocatedResourcesStatus(klog.Background(), pod, status)
}

// startClaimController runs the kube-controller-manager's resource-claim
// controller (1.37: no Features argument, gates read inside; PodGroups from
// scheduling/v1beta1, only used with GenericWorkload/DRAWorkloadResourceClaims,
// both off by default).
func startClaimController(ctx context.Context, client kubernetes.Interface) error {
	f := informers.NewSharedInformerFactory(client, 0)
	ctrl, err := resourceclaim.NewController(klog.FromContext(ctx), client,
		f.Core().V1().Pods(), f.Scheduling().V1beta1().PodGroups(),
		f.Resource().V1().ResourceClaims(), f.Resource().V1().ResourceClaimTemplates())
	if err != nil {
		return err
	}
	f.Start(ctx.Done())
	go ctrl.Run(ctx, 1)
	return nil
}

var errNoMetadataAPI = errors.New("unused in this lane")

// decodeMetadata decodes a KEP-5304 metadata stream with the upstream consumer
// code (devicemetadata.DecodeMetadataFromStream into the internal type, as the
// package recommends to consumers like KubeVirt).
func decodeMetadata(r io.Reader) (*deviceMetadata, error) {
	var md metadata.DeviceMetadata
	if err := devicemetadata.DecodeMetadataFromStream(json.NewDecoder(r), &md); err != nil {
		return nil, err
	}
	out := &deviceMetadata{ClaimName: md.Name}
	if md.PodClaimName != nil {
		out.PodClaimName = *md.PodClaimName
	}
	for _, req := range md.Requests {
		r := metadataRequest{Name: req.Name}
		for _, d := range req.Devices {
			md := metadataDevice{Driver: d.Driver, Pool: d.Pool, Name: d.Name, Attributes: map[string]string{}}
			for k, a := range d.Attributes {
				switch {
				case a.StringValue != nil:
					md.Attributes[string(k)] = *a.StringValue
				case a.IntValue != nil:
					md.Attributes[string(k)] = fmt.Sprint(*a.IntValue)
				case a.BoolValue != nil:
					md.Attributes[string(k)] = fmt.Sprint(*a.BoolValue)
				case a.VersionValue != nil:
					md.Attributes[string(k)] = *a.VersionValue
				}
			}
			r.Devices = append(r.Devices, md)
		}
		out.Requests = append(out.Requests, r)
	}
	return out, nil
}

// 1.36+: claim status writes are authorized per node and driver
// (DRAResourceClaimGranularStatusAuthorization); whatever deploy/rbac.yaml grants
// there, it must never be the right to write claims of every node.
func laneRBACChecks() []rbacCheck {
	return []rbacCheck{
		{"resource.k8s.io", "resourceclaims", "driver", "arbitrary-node:update", driverName, false},
		{"resource.k8s.io", "resourceclaims", "driver", "arbitrary-node:patch", driverName, false},
		{"resource.k8s.io", "resourceclaims", "driver", "associated-node:update", "other.example.com", false},
	}
}

func protoClaim(namespace, uid, name string) *drapbv1.Claim {
	return &drapbv1.Claim{Namespace: namespace, Uid: uid, Name: name}
}

// The protoc-gen-go protos of 1.35+ name the field CdiDeviceIds.
func protoCDIDeviceIDs(d *drapbv1.Device) []string { return d.GetCdiDeviceIds() }

// 1.37: the plugin handler's methods take a context.
func (h *recordingHandler) ValidatePlugin(ctx context.Context, name, endpoint string, versions []string) error {
	err := h.inner.ValidatePlugin(ctx, name, endpoint, versions)
	h.add(regEvent{op: "validate", name: name, endpoint: endpoint, versions: versions, err: err})
	return err
}

func (h *recordingHandler) RegisterPlugin(ctx context.Context, name, endpoint string, versions []string, timeout *time.Duration) error {
	err := h.inner.RegisterPlugin(ctx, name, endpoint, versions, timeout)
	h.add(regEvent{op: "register", name: name, endpoint: endpoint, versions: versions, err: err})
	return err
}

func (h *recordingHandler) DeRegisterPlugin(ctx context.Context, name, endpoint string) {
	h.inner.DeRegisterPlugin(ctx, name, endpoint)
	h.add(regEvent{op: "deregister", name: name, endpoint: endpoint})
}
