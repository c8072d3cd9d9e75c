package k8s

// HelmChart: the Helm chart's renders through the real API server. run.sh renders the
// chart (deploy/helm/vfio-gpu-dra) for a few value sets with tests/k8s/helmrender — its
// own Go module with Helm's packages, so the lanes' go.mod files stay free of Helm —
// into K8S_HELM_RENDERED/<set>/; this test sends every object of every set to the API
// server. The defaults are deploy/*.yaml (helmrender's TestDefaultsAreDeploy), already
// created for real by startCluster.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
)

func testHelmChart(t *testing.T, c *cluster) {
	dir := os.Getenv("K8S_HELM_RENDERED")
	if dir == "" {
		t.Skip("K8S_HELM_RENDERED unset: tests/k8s/run.sh renders the chart's value sets")
	}
	sets, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(sets) == 0 {
		t.Fatalf("no rendered value sets in %s", dir)
	}
	for _, set := range sets {
		t.Run(set.Name(), func(t *testing.T) { c.dryRunChart(t, filepath.Join(dir, set.Name())) })
	}
}

// dryRunChart creates the set's Namespace for real (a namespaced object's dry run
// needs its namespace), then server-side applies every other object with dryRun=All:
// decoding, defaulting, validation and the admission chain (the ValidatingAdmissionPolicy's
// CEL is compiled and type-checked when the policy is written) run, nothing is stored,
// and objects that already exist (from deploy/*.yaml) are checked as updates.
func (c *cluster) dryRunChart(t *testing.T, dir string) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s (%v)", dir, err)
	}
	sort.Strings(files)
	var objs []*unstructured.Unstructured
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
		for {
			obj := &unstructured.Unstructured{}
			if err := dec.Decode(&obj.Object); err != nil {
				if errors.Is(err, io.EOF) {
					break
				}
				t.Fatalf("%s: %v", f, err)
			}
			if len(obj.Object) > 0 {
				objs = append(objs, obj)
			}
		}
	}
	ctx := context.Background()
	dc := discovery.NewDiscoveryClientForConfigOrDie(c.admin)
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	kinds := map[string]int{}
	for _, pass := range []bool{true, false} { // Namespaces first
		for _, obj := range objs {
			if (obj.GetKind() == "Namespace") != pass {
				continue
			}
			gvk := obj.GroupVersionKind()
			m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			if err != nil {
				t.Fatalf("%s: %v", gvk, err)
			}
			var ri dynamic.ResourceInterface = c.dyn.Resource(m.Resource)
			if m.Scope.Name() == meta.RESTScopeNameNamespace {
				ri = c.dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
			}
			if pass {
				if _, err := ri.Create(ctx, obj, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
					t.Fatalf("creating Namespace %s: %v", obj.GetName(), err)
				}
				kinds[gvk.Kind]++
				continue
			}
			body, err := json.Marshal(obj.Object)
			if err != nil {
				t.Fatal(err)
			}
			force := true
			if _, err := ri.Patch(ctx, obj.GetName(), types.ApplyPatchType, body, metav1.PatchOptions{
				DryRun: []string{metav1.DryRunAll}, FieldManager: "vfio-gpu-dra-chart-check", Force: &force,
				FieldValidation: "Strict",
			}); err != nil {
				t.Errorf("%s %s/%s: %v", gvk.Kind, obj.GetNamespace(), obj.GetName(), err)
				continue
			}
			kinds[gvk.Kind]++
		}
	}
	t.Logf("%s: the API server accepted %v", filepath.Base(dir), kinds)
}
