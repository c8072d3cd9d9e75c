package k8s

// The path deploy/kubevirt-vm.yaml takes: a pod (the virt-launcher) names the
// shipped ResourceClaimTemplate, the kube-controller-manager's resource-claim
// controller (k8s.io/kubernetes/pkg/controller/resourceclaim, run in-process on
// informers against the test API server) makes the claim, the allocator allocates
// it, and the kubelet's DRA manager prepares it; the plugin must put the KEP-5304
// metadata where KubeVirt looks for template claims:
// .../resourceclaimtemplates/<podClaimName>/<request>/<driver>-metadata.json.

import (
	"context"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
)

func (e *prepareEnv) testTemplateClaim(t *testing.T) {
	c := e.c
	ctx, cancel := context.WithCancel(klog.NewContext(context.Background(), klog.Background().WithName("resourceclaim-controller")))
	// Only while this test runs: the controller also prunes reservedFor entries of
	// pods it considers gone, which no other test should have to account for.
	defer cancel()
	if err := startClaimController(ctx, c.client); err != nil {
		t.Fatalf("resourceclaim.NewController: %v", err)
	}

	tmpl := c.kubevirtTemplate(t)
	tmpl.Namespace = testNS
	if _, err := c.client.ResourceV1().ResourceClaimTemplates(testNS).Create(ctx, tmpl, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("the API server refuses the shipped template: %v", err)
	}
	// The virt-launcher pod as KubeVirt renders spec.resourceClaims of the VM:
	// pod claim "gpu-claim" from template "one-passthrough-gpu", used by the
	// compute container.
	const podClaim = "gpu-claim"
	tmplName := tmpl.Name
	pod, err := c.client.CoreV1().Pods(testNS).Create(ctx, &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "virt-launcher-gpu-vm-tmpl"},
		Spec: v1.PodSpec{
			NodeName:       e.node.Name,
			ResourceClaims: []v1.PodResourceClaim{{Name: podClaim, ResourceClaimTemplateName: &tmplName}},
			Containers: []v1.Container{{
				Name: "compute", Image: "virt-launcher:test",
				Resources: v1.ResourceRequirements{Claims: []v1.ResourceClaim{{Name: podClaim}}},
			}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating the virt-launcher pod: %v", err)
	}

	// The controller creates the claim and records its name in the pod status.
	var claimName string
	eventually(t, 30*time.Second, "the resource-claim controller's claim for "+pod.Name, func() (bool, error) {
		p, err := c.client.CoreV1().Pods(testNS).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, s := range p.Status.ResourceClaimStatuses {
			if s.Name == podClaim && s.ResourceClaimName != nil {
				claimName = *s.ResourceClaimName
				pod = p
				return true, nil
			}
		}
		return false, nil
	})
	claim, err := c.client.ResourceV1().ResourceClaims(testNS).Get(ctx, claimName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("controller made claim %s (generateName %q, annotations %v)", claim.Name, claim.GenerateName, claim.Annotations)
	if got := claim.Annotations[podClaimNameAnnotation]; got != podClaim {
		t.Errorf("claim annotation %s = %q, want %q", podClaimNameAnnotation, got, podClaim)
	}
	if want := pod.Name + "-" + podClaim + "-"; claim.GenerateName != want || !strings.HasPrefix(claim.Name, want) {
		t.Errorf("claim name %q (generateName %q), want generated from %q", claim.Name, claim.GenerateName, want)
	}
	if o := metav1.GetControllerOf(claim); o == nil || o.Kind != "Pod" || o.UID != pod.UID {
		t.Errorf("claim controller owner %+v, want pod %s", o, pod.UID)
	}

	res := c.allocate(t, claim, e.node)
	if res == nil || len(res.Devices.Results) != 1 {
		t.Fatalf("the template's request gets one GPU, got %v", allocatedDevices(res))
	}
	device := res.Devices.Results[0].Device
	bdf := bdfOf(device)
	before := e.dirs.hostDriver(t, bdf)
	claim = c.bind(t, claim, res, pod)

	// The kubelet resolves the claim name from the pod's status, as for a real pod.
	info := e.k.prepare(t, pod)
	ids := cdiIDs(info)
	t.Logf("%s (%s): CDI %v", device, bdf, ids)
	e.wantDriver(t, bdf, "vfio-pci")
	// Metadata at resourceclaimtemplates/gpu-claim/gpu/..., decoded in 1.36+
	// with podClaimName "gpu-claim".
	e.checkPrepared(t, claim, device, ids)

	e.k.unprepare(t, pod)
	e.wantDriver(t, bdf, before)
	if _, err := resolveCDI(e.dirs.cdiDir, ids); err == nil {
		t.Errorf("CDI IDs %v still resolve after unprepare", ids)
	}
	cancel()
	c.forceDelete(t, claim)
}
