package k8s

// deploy/kubevirt-vm.yaml's ResourceClaimTemplate against the real API server and
// allocator: the template validates as shipped, and a claim made from it (as the
// resource-claim controller does for the virt-launcher pod) is allocated one GPU of
// the plugin with the KubeVirt DeviceClass's opaque configuration attached, which is
// what the plugin's iommufd refusal reads at prepare.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// kubevirtTemplate is the ResourceClaimTemplate of deploy/kubevirt-vm.yaml.
func (c *cluster) kubevirtTemplate(t *testing.T) *resourceapi.ResourceClaimTemplate {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(c.repo, "deploy", "kubevirt-vm.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			t.Fatalf("kubevirt-vm.yaml: %v", err)
		}
		var meta metav1.TypeMeta
		if err := json.Unmarshal(raw, &meta); err != nil {
			t.Fatal(err)
		}
		if meta.Kind != "ResourceClaimTemplate" {
			continue
		}
		var tmpl resourceapi.ResourceClaimTemplate
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&tmpl); err != nil {
			t.Fatalf("kubevirt-vm.yaml ResourceClaimTemplate: %v", err)
		}
		return &tmpl
	}
	t.Fatal("kubevirt-vm.yaml has no ResourceClaimTemplate")
	return nil
}

func testKubeVirtTemplate(t *testing.T, c *cluster, n *v1.Node) {
	ctx := context.Background()
	tmpl := c.kubevirtTemplate(t)
	tmpl.Namespace = testNS
	created, err := c.client.ResourceV1().ResourceClaimTemplates(testNS).Create(ctx, tmpl, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("the API server refuses the shipped template: %v", err)
	}
	claim, err := c.client.ResourceV1().ResourceClaims(testNS).Create(ctx, &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{
			Name:        "virt-launcher-gpu-vm-gpu-claim",
			Annotations: map[string]string{"resource.kubernetes.io/pod-claim-name": "gpu-claim"},
		},
		Spec: created.Spec.Spec,
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	res := c.allocate(t, claim, n)
	if res == nil || len(res.Devices.Results) != 1 {
		t.Fatalf("the template's request gets one GPU, got %v", allocatedDevices(res))
	}
	if r := res.Devices.Results[0]; r.Driver != driverName || r.Request != "gpu" {
		t.Errorf("result %+v", r)
	}
	var consumer []string
	for _, cfg := range res.Devices.Config {
		if cfg.Source != resourceapi.AllocationConfigSourceClass || cfg.Opaque == nil || cfg.Opaque.Driver != driverName {
			continue
		}
		var p map[string]any
		if err := json.Unmarshal(cfg.Opaque.Parameters.Raw, &p); err != nil {
			t.Fatal(err)
		}
		if s, ok := p["consumer"].(string); ok {
			consumer = append(consumer, s)
		}
	}
	if len(consumer) != 1 || consumer[0] != "kubevirt" {
		t.Errorf("allocation config from the class: consumer %v, want [kubevirt] (config %+v)", consumer, res.Devices.Config)
	}
}
