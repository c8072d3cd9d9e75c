// Command metadata-golden writes KEP-5304 device metadata files with the upstream
// Go types and codec (k8s.io/dynamic-resource-allocation/api/metadata), for the
// sample claim of crates/kubelet's golden tests. The encoding is what the Go
// kubelet plugin helper's metadataWriter does: one pretty JSON object per API
// version, in the order given, each followed by a newline. It then decodes every
// file again with devicemetadata.DecodeMetadataFromStream, the upstream reader.
//
//	go run . -out ../../../crates/kubelet/tests/data
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	runtimeserializer "k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/dynamic-resource-allocation/api/metadata"
	"k8s.io/dynamic-resource-allocation/api/metadata/install"
	"k8s.io/dynamic-resource-allocation/devicemetadata"
)

var (
	v1beta1  = schema.GroupVersion{Group: metadata.GroupName, Version: "v1beta1"}
	v1alpha1 = schema.GroupVersion{Group: metadata.GroupName, Version: "v1alpha1"}
)

func str(s string) resourceapi.DeviceAttribute { return resourceapi.DeviceAttribute{StringValue: &s} }
func num(i int64) resourceapi.DeviceAttribute  { return resourceapi.DeviceAttribute{IntValue: &i} }
func flag_(b bool) resourceapi.DeviceAttribute { return resourceapi.DeviceAttribute{BoolValue: &b} }

// sample is the claim of crates/kubelet/src/metadata.rs `golden_claim`/`golden_device`.
func sample(podClaimName *string) *metadata.DeviceMetadata {
	return &metadata.DeviceMetadata{
		ObjectMeta: metav1.ObjectMeta{
			Name:       "vm-1-gpu-x7k2p",
			Namespace:  "vms",
			UID:        "7d6c7a3e-0000-4000-8000-000000000001",
			Generation: 1,
		},
		PodClaimName: podClaimName,
		Requests: []metadata.DeviceMetadataRequest{{
			Name: "gpu",
			Devices: []metadata.Device{{
				Driver: "vfio-gpu.dra.dev",
				Pool:   "node-a",
				Name:   "gpu-0000-ab-00-0",
				Attributes: map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
					"resource.kubernetes.io/pciBusID": str("0000:ab:00.0"),
					"resource.kubernetes.io/pcieRoot": str("pci0000:a0"),
					"resource.kubernetes.io/numaNode": num(1),
					"numaNode":                        num(1),
					"vendorID":                        str("0x10de"),
					"deviceID":                        str("0x26b1"),
					// Go escapes <, > and & in strings: the golden keeps us honest.
					"productName": str("AD102GL [RTX 6000 Ada] <A&B>"),
					"iommuGroup":  num(11),
					"driver":      str("nvidia"),
					"keepOnVfio":  flag_(false),
					"type":        str("vfio"),
				},
			}},
		}},
	}
}

func encode(dm *metadata.DeviceMetadata, versions ...schema.GroupVersion) ([]byte, error) {
	scheme := install.NewScheme()
	codecs := runtimeserializer.NewCodecFactory(scheme)
	info, ok := runtime.SerializerInfoForMediaType(codecs.SupportedMediaTypes(), runtime.ContentTypeJSON)
	if !ok {
		return nil, fmt.Errorf("no JSON serializer")
	}
	var buf bytes.Buffer
	for _, gv := range versions {
		data, err := runtime.Encode(codecs.EncoderForVersion(info.PrettySerializer, gv), dm)
		if err != nil {
			return nil, fmt.Errorf("encode %s: %w", gv, err)
		}
		buf.Write(data)
		buf.WriteByte('\n')
	}
	return buf.Bytes(), nil
}

func main() {
	out := flag.String("out", ".", "directory for the golden files")
	flag.Parse()
	pod := "gpu"
	files := []struct {
		name     string
		dm       *metadata.DeviceMetadata
		versions []schema.GroupVersion
	}{
		// What the plugin writes at the KEP-5304 path: newest version first.
		{"metadata-template-claim.json", sample(&pod), []schema.GroupVersion{v1beta1, v1alpha1}},
		{"metadata-direct-claim.json", sample(nil), []schema.GroupVersion{v1beta1, v1alpha1}},
		// The legacy file for KubeVirt 1.8.0-1.8.2: one v1alpha1 object.
		{"metadata-legacy-kubevirt.json", sample(&pod), []schema.GroupVersion{v1alpha1}},
	}
	for _, f := range files {
		data, err := encode(f.dm, f.versions...)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		var back metadata.DeviceMetadata
		if err := devicemetadata.DecodeMetadataFromStream(json.NewDecoder(bytes.NewReader(data)), &back); err != nil {
			fmt.Fprintf(os.Stderr, "%s: decoding: %v\n", f.name, err)
			os.Exit(1)
		}
		path := filepath.Join(*out, f.name)
		if err := os.WriteFile(path, data, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("wrote", path)
	}
}
