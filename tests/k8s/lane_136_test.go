//go:build k8s136

package k8s

// Lane 1.36 (current): the version-specific calls, nothing else.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

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
	"k8s.io/kubernetes/pkg/features"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

const lane = "1.36"

// DRADeviceTaints is beta and on in 1.36: device taints are kept.
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

// The scheduler's allocator features with 1.36's default feature gates (admin
// access, prioritized list GA; binding conditions, device status, taints,
// partitionable devices, consumable capacity beta/on).
func allocatorFeatures() structured.Features {
	return structured.Features{
		AdminAccess: true, PrioritizedList: true, DeviceBindingAndStatus: true,
		DeviceTaints: true, PartitionableDevices: true, ConsumableCapacity: true,
	}
}

// Health: ResourceHealthStatus is beta/on in 1.36; 1.36.3's kubelet opens the
// v1alpha1 stream whether or not the plugin advertises it (no health service choice
// before 1.37, and #141858's backport is not in 1.36.3).
const laneHealthService = ""

func allocatedResourcesStatus(mgr *dra.Manager, pod *v1.Pod, status *v1.PodStatus) {
	mgr.UpdateAllocatedResourcesStatus(pod, status)
}

// startClaimController runs the kube-controller-manager's resource-claim
// controller with its features from the gates, as kube-controller-manager 1.36
// does (PodGroups from scheduling/v1alpha2, only used with DRAWorkloadResourceClaims,
// off by default).
func startClaimController(ctx context.Context, client kubernetes.Interface) error {
	f := informers.NewSharedInformerFactory(client, 0)
	ctrl, err := resourceclaim.NewController(klog.FromContext(ctx), resourceclaim.Features{
		AdminAccess:            utilfeature.DefaultFeatureGate.Enabled(features.DRAAdminAccess),
		PrioritizedList:        utilfeature.DefaultFeatureGate.Enabled(features.DRAPrioritizedList),
		WorkloadResourceClaims: utilfeature.DefaultFeatureGate.Enabled(features.DRAWorkloadResourceClaims),
	}, client, f.Core().V1().Pods(), f.Scheduling().V1alpha2().PodGroups(),
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

// 1.36: claim status writes are authorized per node and driver
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
