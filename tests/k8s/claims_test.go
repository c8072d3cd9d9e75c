package k8s

// Claims, allocation and CDI: the scheduler's allocator from
// k8s.io/dynamic-resource-allocation/structured (real CEL over the DeviceClasses of
// deploy/), persisted like the scheduler's DynamicResources plugin does it, and the
// runtime's CDI library resolving the IDs the kubelet returns.

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/dynamic-resource-allocation/cel"
	"k8s.io/dynamic-resource-allocation/structured"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"tags.cncf.io/container-device-interface/pkg/cdi"
	cdispec "tags.cncf.io/container-device-interface/specs-go"
)

type classLister struct{ c *cluster }

func (l classLister) List() ([]*resourceapi.DeviceClass, error) {
	list, err := l.c.client.ResourceV1().DeviceClasses().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	out := make([]*resourceapi.DeviceClass, 0, len(list.Items))
	for i := range list.Items {
		out = append(out, &list.Items[i])
	}
	return out, nil
}

func (l classLister) Get(name string) (*resourceapi.DeviceClass, error) {
	return l.c.client.ResourceV1().DeviceClasses().Get(context.Background(), name, metav1.GetOptions{})
}

// newClaim creates a claim with one request "gpu" for count devices of class
// (count 0 = allocationMode All).
func (c *cluster) newClaim(t *testing.T, name, class string, count int64, selectors ...string) *resourceapi.ResourceClaim {
	t.Helper()
	req := &resourceapi.ExactDeviceRequest{DeviceClassName: class, AllocationMode: resourceapi.DeviceAllocationModeExactCount, Count: count}
	if count == 0 {
		req = &resourceapi.ExactDeviceRequest{DeviceClassName: class, AllocationMode: resourceapi.DeviceAllocationModeAll}
	}
	for _, s := range selectors {
		req.Selectors = append(req.Selectors, resourceapi.DeviceSelector{CEL: &resourceapi.CELDeviceSelector{Expression: s}})
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
	return claim
}

// allocate runs the allocator for claim on node against every slice and class the
// API server has, minus devices of claims already allocated. nil = cannot allocate.
func (c *cluster) allocate(t *testing.T, claim *resourceapi.ResourceClaim, node *v1.Node) *resourceapi.AllocationResult {
	t.Helper()
	ctx := context.Background()
	sl, err := c.client.ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	slices := make([]*resourceapi.ResourceSlice, 0, len(sl.Items))
	for i := range sl.Items {
		slices = append(slices, &sl.Items[i])
	}
	claims, err := c.client.ResourceV1().ResourceClaims("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	state := structured.AllocatedState{
		AllocatedDevices:         sets.New[structured.DeviceID](),
		AllocatedSharedDeviceIDs: sets.New[structured.SharedDeviceID](),
		AggregatedCapacity:       structured.NewConsumedCapacityCollection(),
	}
	for _, cl := range claims.Items {
		if cl.Status.Allocation == nil {
			continue
		}
		for _, r := range cl.Status.Allocation.Devices.Results {
			state.AllocatedDevices.Insert(structured.MakeDeviceID(r.Driver, r.Pool, r.Device))
		}
	}
	alloc, err := structured.NewAllocator(ctx, allocatorFeatures(), state, classLister{c}, slices, cel.NewCache(10, cel.Features{}))
	if err != nil {
		t.Fatalf("structured.NewAllocator: %v", err)
	}
	res, err := alloc.Allocate(ctx, node, []*resourceapi.ResourceClaim{claim})
	if err != nil {
		t.Fatalf("allocating %s on %s: %v", claim.Name, node.Name, err)
	}
	if len(res) == 0 {
		return nil
	}
	return &res[0]
}

// newPod creates a pod on node that uses claim in its only container.
func (c *cluster) newPod(t *testing.T, name, node, claim string) *v1.Pod {
	t.Helper()
	pod, err := c.client.CoreV1().Pods(testNS).Create(context.Background(), &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: v1.PodSpec{
			NodeName:       node,
			ResourceClaims: []v1.PodResourceClaim{{Name: "gpu", ResourceClaimName: &claim}},
			Containers: []v1.Container{{
				Name: "compute", Image: "virt-launcher:test",
				Resources: v1.ResourceRequirements{Claims: []v1.ResourceClaim{{Name: "gpu"}}},
			}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s: %v", name, err)
	}
	return pod
}

// bind persists an allocation the way the scheduler does: finalizer first, then
// status.allocation and status.reservedFor in one status update.
func (c *cluster) bind(t *testing.T, claim *resourceapi.ResourceClaim, res *resourceapi.AllocationResult, pod *v1.Pod) *resourceapi.ResourceClaim {
	t.Helper()
	ctx := context.Background()
	claim, err := c.client.ResourceV1().ResourceClaims(claim.Namespace).Get(ctx, claim.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	claim.Finalizers = append(claim.Finalizers, deleteFinalizer)
	if claim, err = c.client.ResourceV1().ResourceClaims(claim.Namespace).Update(ctx, claim, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("adding the finalizer to %s: %v", claim.Name, err)
	}
	claim.Status.Allocation = res
	claim.Status.ReservedFor = append(claim.Status.ReservedFor, resourceapi.ResourceClaimConsumerReference{Resource: "pods", Name: pod.Name, UID: pod.UID})
	if claim, err = c.client.ResourceV1().ResourceClaims(claim.Namespace).UpdateStatus(ctx, claim, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("writing the allocation of %s: %v", claim.Name, err)
	}
	return claim
}

// forceDelete removes a claim for good (finalizer dropped), as an admin could.
func (c *cluster) forceDelete(t *testing.T, claim *resourceapi.ResourceClaim) {
	t.Helper()
	ctx := context.Background()
	cl, err := c.client.ResourceV1().ResourceClaims(claim.Namespace).Get(ctx, claim.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cl.Finalizers = nil
	if _, err := c.client.ResourceV1().ResourceClaims(claim.Namespace).Update(ctx, cl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.client.ResourceV1().ResourceClaims(claim.Namespace).Delete(ctx, claim.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

// prepare calls the kubelet's PrepareResources, retrying while the node
// authorizer's graph has not seen the pod yet (as the kubelet's pod workers retry).
func (k *kubelet) prepare(t *testing.T, pod *v1.Pod) *dra.ContainerInfo {
	t.Helper()
	k.setActive(pod, true)
	var last error
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
		last = k.mgr.PrepareResources(ctx, pod)
		cancel()
		if last == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("kubelet PrepareResources(%s): %v", pod.Name, last)
		}
		t.Logf("PrepareResources(%s) (will retry): %v", pod.Name, last)
		time.Sleep(time.Second)
	}
	info, err := k.mgr.GetResources(pod, &pod.Spec.Containers[0])
	if err != nil {
		t.Fatalf("kubelet GetResources(%s): %v", pod.Name, err)
	}
	return info
}

func (k *kubelet) unprepare(t *testing.T, pod *v1.Pod) {
	t.Helper()
	k.setActive(pod, false)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	if err := k.mgr.UnprepareResources(ctx, pod); err != nil {
		t.Fatalf("kubelet UnprepareResources(%s): %v", pod.Name, err)
	}
}

func cdiIDs(info *dra.ContainerInfo) []string {
	var ids []string
	for _, d := range info.CDIDevices {
		ids = append(ids, d.Name)
	}
	return ids
}

// resolvedCDI is what a container runtime would get from the CDI IDs.
type resolvedCDI struct {
	deviceNodes []string          // container paths
	env         map[string]string // KEY -> value
	mounts      []*cdispec.Mount
}

// resolveCDI resolves CDI IDs with the runtimes' CDI library over cdiDir. Every ID
// must resolve to a device of a valid spec. (Device nodes are not stat'ed: the
// demo host has no /dev/vfio character devices.)
func resolveCDI(cdiDir string, ids []string) (*resolvedCDI, error) {
	cache, err := cdi.NewCache(cdi.WithSpecDirs(cdiDir), cdi.WithAutoRefresh(false))
	if err != nil {
		return nil, fmt.Errorf("cdi.NewCache: %w", err)
	}
	for path, errs := range cache.GetErrors() {
		if len(errs) > 0 {
			return nil, fmt.Errorf("CDI spec %s: %v", path, errs)
		}
	}
	out := &resolvedCDI{env: map[string]string{}}
	for _, id := range ids {
		dev := cache.GetDevice(id)
		if dev == nil {
			return nil, fmt.Errorf("CDI device %q does not resolve (known: %v)", id, cache.ListDevices())
		}
		for _, edits := range []*cdispec.ContainerEdits{&dev.GetSpec().ContainerEdits, &dev.ContainerEdits} {
			if edits == nil {
				continue
			}
			for _, dn := range edits.DeviceNodes {
				out.deviceNodes = append(out.deviceNodes, dn.Path)
			}
			for _, e := range edits.Env {
				k, v, _ := strings.Cut(e, "=")
				out.env[k] = v
			}
			out.mounts = append(out.mounts, edits.Mounts...)
		}
	}
	return out, nil
}

// deviceMetadata is the lane-neutral view of a decoded KEP-5304 metadata object.
type deviceMetadata struct {
	ClaimName    string
	PodClaimName string
	Requests     []metadataRequest
}

type metadataRequest struct {
	Name    string
	Devices []metadataDevice
}

type metadataDevice struct {
	Driver, Pool, Name string
	Attributes         map[string]string // values rendered as strings
}
