package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
)

const (
	chartDir    = "../../../deploy/helm/vfio-gpu-dra"
	deployDir   = "../../../deploy"
	driver      = "vfio-gpu.dra.dev"
	defaultRoot = "/var/lib/kubelet"
)

// TestDefaultsAreDeploy: deploy/*.yaml are the chart's default render behind the
// generated-file header (the same check as deploy/helm/render.sh --check).
func TestDefaultsAreDeploy(t *testing.T) {
	files, err := Render(chartDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"admission-policy.yaml", "daemonset.yaml", "deviceclass.yaml", "networkpolicy.yaml", "rbac.yaml"}
	if len(files) != len(want) {
		t.Errorf("rendered %d files, want %v", len(files), want)
	}
	for _, name := range want {
		shipped, err := os.ReadFile(filepath.Join(deployDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if string(shipped) != Header+files[name] {
			t.Errorf("deploy/%s differs from the chart's default render: run deploy/helm/render.sh", name)
		}
	}
}

// rendered is one render, decoded strictly into the typed API objects.
type rendered struct {
	files   map[string]string
	objects []runtime.Object
	ds      *appsv1.DaemonSet
	netpol  *networkingv1.NetworkPolicy
	kinds   map[string]int
}

func render(t *testing.T, values map[string]any) *rendered {
	t.Helper()
	files, err := Render(chartDir, values)
	if err != nil {
		t.Fatal(err)
	}
	// Strict: unknown or duplicate fields fail, as kubectl's server-side field
	// validation would reject them.
	dec := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	r := &rendered{files: files, kinds: map[string]int{}}
	for name, text := range files {
		y := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(text)))
		for {
			doc, err := y.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			obj, gvk, err := dec.Decode(doc, nil, nil)
			if err != nil {
				t.Fatalf("%s: %v\n%s", name, err, doc)
			}
			r.kinds[gvk.Kind]++
			r.objects = append(r.objects, obj)
			switch o := obj.(type) {
			case *appsv1.DaemonSet:
				r.ds = o
			case *networkingv1.NetworkPolicy:
				r.netpol = o
			}
		}
	}
	return r
}

func stripComments(doc []byte) []byte {
	var out []byte
	for _, l := range strings.Split(string(doc), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			out = append(out, l...)
			out = append(out, '\n')
		}
	}
	return out
}

// checkCommon: what every value set must keep.
func (r *rendered) checkCommon(t *testing.T, ns string) {
	t.Helper()
	for kind, n := range map[string]int{"ServiceAccount": 1, "ClusterRole": 1, "ClusterRoleBinding": 1, "DeviceClass": 3, "DaemonSet": 1} {
		if r.kinds[kind] != n {
			t.Errorf("%d %s, want %d (%v)", r.kinds[kind], kind, n, r.kinds)
		}
	}
	for _, o := range r.objects {
		switch o := o.(type) {
		case *corev1.ServiceAccount:
			if o.Namespace != ns || o.Name != "vfio-gpu-dra" {
				t.Errorf("ServiceAccount %s/%s", o.Namespace, o.Name)
			}
		case *rbacv1.ClusterRoleBinding:
			if len(o.Subjects) != 1 || o.Subjects[0].Namespace != ns {
				t.Errorf("ClusterRoleBinding subjects %+v, want the account in %s", o.Subjects, ns)
			}
		}
	}
	if r.ds == nil {
		return
	}
	if r.ds.Namespace != ns {
		t.Errorf("DaemonSet namespace %q, want %q", r.ds.Namespace, ns)
	}
	pod := r.ds.Spec.Template.Spec
	// M4: no hostPID in any value set (the holder scan reads /host-root/proc).
	if pod.ServiceAccountName != "vfio-gpu-dra" || pod.HostPID || len(pod.Containers) != 1 {
		t.Errorf("pod spec: sa %q hostPID %v containers %d", pod.ServiceAccountName, pod.HostPID, len(pod.Containers))
	}
	if r.netpol != nil && r.netpol.Namespace != ns {
		t.Errorf("NetworkPolicy namespace %q, want %q", r.netpol.Namespace, ns)
	}
}

// leastPrivilege are the capabilities the non-privileged plugin gets
// (docs/security.md; tests/vm plugin-caps runs the plugin with exactly these).
var leastPrivilege = []corev1.Capability{"SYS_PTRACE", "DAC_READ_SEARCH", "SYS_CHROOT", "SYS_MODULE"}

// checkLeastPrivilege (M4): not privileged, no privilege escalation, every
// capability dropped but leastPrivilege.
func (r *rendered) checkLeastPrivilege(t *testing.T) {
	t.Helper()
	sc := r.container().SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.Capabilities == nil {
		t.Fatalf("securityContext %+v: want privileged false, allowPrivilegeEscalation false, capabilities", sc)
	}
	if d := sc.Capabilities.Drop; len(d) != 1 || d[0] != "ALL" {
		t.Errorf("capabilities.drop %v, want [ALL]", d)
	}
	if a := sc.Capabilities.Add; fmt.Sprint(a) != fmt.Sprint(leastPrivilege) {
		t.Errorf("capabilities.add %v, want %v", a, leastPrivilege)
	}
}

func (r *rendered) container() corev1.Container { return r.ds.Spec.Template.Spec.Containers[0] }

func (r *rendered) env() map[string]string {
	env := map[string]string{}
	for _, e := range r.container().Env {
		if e.ValueFrom == nil {
			env[e.Name] = e.Value
		}
	}
	return env
}

// checkKubeletDirs: registration and plugin directories under root, mounted at the
// same path they have on the host, and serve told where they are.
func (r *rendered) checkKubeletDirs(t *testing.T, root string) {
	t.Helper()
	hostPaths := map[string]string{}
	for _, v := range r.ds.Spec.Template.Spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	mounts := map[string]string{}
	for _, m := range r.container().VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	for vol, want := range map[string]string{
		"plugins-registry": root + "/plugins_registry",
		"plugin-dir":       root + "/plugins/" + driver,
	} {
		if hostPaths[vol] != want || mounts[vol] != want {
			t.Errorf("volume %s: host %q mounted at %q, want %q for both", vol, hostPaths[vol], mounts[vol], want)
		}
	}
	for _, p := range hostPaths {
		if strings.HasPrefix(p, defaultRoot+"/") && root != defaultRoot {
			t.Errorf("host path %s still under %s with kubelet root %s", p, defaultRoot, root)
		}
	}
	env := r.env()
	if root == defaultRoot {
		// serve's defaults (crates/cli/src/serve_cmd.rs) are this root's directories.
		for _, k := range []string{"VFIO_GPU_DRA_KUBELET_REGISTRAR_DIR", "VFIO_GPU_DRA_KUBELET_PLUGINS_DIR"} {
			if _, ok := env[k]; ok {
				t.Errorf("%s set with the default kubelet root", k)
			}
		}
		return
	}
	if env["VFIO_GPU_DRA_KUBELET_REGISTRAR_DIR"] != root+"/plugins_registry" ||
		env["VFIO_GPU_DRA_KUBELET_PLUGINS_DIR"] != root+"/plugins" {
		t.Errorf("serve's kubelet dirs: %v", env)
	}
}

func TestValueSets(t *testing.T) {
	serveCmd, err := os.ReadFile("../../../crates/cli/src/serve_cmd.rs")
	if err != nil {
		t.Fatal(err)
	}
	for _, env := range []string{"VFIO_GPU_DRA_KUBELET_REGISTRAR_DIR", "VFIO_GPU_DRA_KUBELET_PLUGINS_DIR", "VFIO_GPU_DRA_METRICS_ADDR", "VFIO_GPU_DRA_HOST_ROOT"} {
		if env != "VFIO_GPU_DRA_HOST_ROOT" && !bytes.Contains(serveCmd, []byte(`"`+env+`"`)) {
			t.Errorf("serve reads no %s any more", env)
		}
	}

	t.Run("defaults", func(t *testing.T) {
		r := render(t, nil)
		r.checkCommon(t, "vfio-gpu-dra")
		r.checkLeastPrivilege(t)
		r.checkKubeletDirs(t, defaultRoot)
		for kind, n := range map[string]int{"Namespace": 1, "ValidatingAdmissionPolicy": 1, "ValidatingAdmissionPolicyBinding": 1, "NetworkPolicy": 1} {
			if r.kinds[kind] != n {
				t.Errorf("%d %s, want %d", r.kinds[kind], kind, n)
			}
		}
		pod := r.ds.Spec.Template.Spec
		if got := pod.NodeSelector; len(got) != 1 || got[driver+"/enabled"] != "true" {
			t.Errorf("nodeSelector %v", got)
		}
		if c := r.container(); c.Image != "localhost/vfio-gpu-dra:0.1.0" || c.ReadinessProbe == nil || c.LivenessProbe == nil {
			t.Errorf("image %q, probes %v %v", c.Image, c.ReadinessProbe, c.LivenessProbe)
		}
		if r.env()["VFIO_GPU_DRA_METRICS_ADDR"] != "0.0.0.0:9464" {
			t.Errorf("env %v", r.env())
		}
		if _, ok := r.env()["VFIO_GPU_DRA_LOG"]; ok {
			t.Error("VFIO_GPU_DRA_LOG set by default")
		}
		if _, ok := r.env()["VFIO_GPU_DRA_UNHEALTHY_TAINT_EFFECT"]; ok {
			t.Error("VFIO_GPU_DRA_UNHEALTHY_TAINT_EFFECT set by default")
		}
	})

	// NoExecute for unhealthy GPUs a VM holds: serve's env, nothing else changes.
	t.Run("unhealthyTaintEffect", func(t *testing.T) {
		r := render(t, map[string]any{"unhealthyTaintEffect": "NoExecute"})
		r.checkCommon(t, "vfio-gpu-dra")
		if got := r.env()["VFIO_GPU_DRA_UNHEALTHY_TAINT_EFFECT"]; got != "NoExecute" {
			t.Errorf("VFIO_GPU_DRA_UNHEALTHY_TAINT_EFFECT %q, env %v", got, r.env())
		}
		if !bytes.Contains(serveCmd, []byte(`"VFIO_GPU_DRA_UNHEALTHY_TAINT_EFFECT"`)) {
			t.Error("serve reads no VFIO_GPU_DRA_UNHEALTHY_TAINT_EFFECT")
		}
	})

	// privileged: true, for NVIDIA hosts whose nvidia-persistenced the plugin
	// stops with nvidia-smi (a non-privileged container may not open /dev/nvidia*).
	t.Run("privileged", func(t *testing.T) {
		r := render(t, map[string]any{"privileged": true})
		r.checkCommon(t, "vfio-gpu-dra")
		sc := r.container().SecurityContext
		if sc == nil || sc.Privileged == nil || !*sc.Privileged || sc.Capabilities != nil {
			t.Errorf("securityContext %+v, want privileged only", sc)
		}
	})

	t.Run("k0s", func(t *testing.T) {
		root := "/var/lib/k0s/kubelet"
		r := render(t, map[string]any{"kubeletRootDir": root + "/", "namespace": map[string]any{"name": "gpu-system"}})
		r.checkCommon(t, "gpu-system")
		r.checkKubeletDirs(t, root)
	})

	t.Run("microk8s", func(t *testing.T) {
		root := "/var/snap/microk8s/common/var/lib/kubelet"
		r := render(t, map[string]any{"kubeletRootDir": root})
		r.checkCommon(t, "vfio-gpu-dra")
		r.checkKubeletDirs(t, root)
	})

	t.Run("digest", func(t *testing.T) {
		digest := "sha256:" + strings.Repeat("ab", 32)
		r := render(t, map[string]any{
			"image":            map[string]any{"repository": "registry.example/vfio-gpu-dra", "tag": "0.2.0", "digest": digest, "pullPolicy": "IfNotPresent"},
			"imagePullSecrets": []any{map[string]any{"name": "regcred"}},
			"logLevel":         "vfio_gpu_kubelet=debug,info",
			"resources":        map[string]any{"requests": map[string]any{"cpu": "50m", "memory": "128Mi"}, "limits": map[string]any{"memory": "512Mi"}},
		})
		r.checkCommon(t, "vfio-gpu-dra")
		c := r.container()
		if c.Image != "registry.example/vfio-gpu-dra@"+digest || c.ImagePullPolicy != corev1.PullIfNotPresent {
			t.Errorf("image %q pull policy %q", c.Image, c.ImagePullPolicy)
		}
		if s := r.ds.Spec.Template.Spec.ImagePullSecrets; len(s) != 1 || s[0].Name != "regcred" {
			t.Errorf("imagePullSecrets %v", s)
		}
		if r.env()["VFIO_GPU_DRA_LOG"] != "vfio_gpu_kubelet=debug,info" {
			t.Errorf("env %v", r.env())
		}
		if l := c.Resources.Limits.Memory().String(); l != "512Mi" {
			t.Errorf("memory limit %s", l)
		}
		if _, err := Render(chartDir, map[string]any{"image": map[string]any{"digest": "sha256:abc"}}); err == nil {
			t.Error("a digest that is not sha256:<64 hex> rendered")
		}
	})

	t.Run("nfd", func(t *testing.T) {
		r := render(t, map[string]any{
			"nodeTargeting":     map[string]any{"mode": "nfd"},
			"tolerations":       []any{map[string]any{"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}},
			"affinity":          map[string]any{"nodeAffinity": map[string]any{"requiredDuringSchedulingIgnoredDuringExecution": map[string]any{"nodeSelectorTerms": []any{map[string]any{"matchExpressions": []any{map[string]any{"key": "kubernetes.io/arch", "operator": "In", "values": []any{"amd64"}}}}}}}},
			"priorityClassName": "",
		})
		r.checkCommon(t, "vfio-gpu-dra")
		pod := r.ds.Spec.Template.Spec
		if got := pod.NodeSelector; len(got) != 1 || got["feature.node.kubernetes.io/pci-10de.present"] != "true" {
			t.Errorf("nodeSelector %v", got)
		}
		if len(pod.Tolerations) != 1 || pod.Tolerations[0].Value != "true" || pod.Tolerations[0].Key != "nvidia.com/gpu" {
			t.Errorf("tolerations %+v", pod.Tolerations)
		}
		if pod.Affinity == nil || pod.Affinity.NodeAffinity == nil || pod.PriorityClassName != "" {
			t.Errorf("affinity %v priorityClassName %q", pod.Affinity, pod.PriorityClassName)
		}
		c := render(t, map[string]any{"nodeTargeting": map[string]any{"mode": "custom", "nodeSelector": map[string]any{"gpu": "passthrough"}}})
		if got := c.ds.Spec.Template.Spec.NodeSelector; len(got) != 1 || got["gpu"] != "passthrough" {
			t.Errorf("custom nodeSelector %v", got)
		}
		for _, bad := range []map[string]any{
			{"nodeTargeting": map[string]any{"mode": "all"}},
			{"nodeTargeting": map[string]any{"mode": "custom"}},
			{"tolerations": []any{map[string]any{"operater": "Exists"}}},
			{"kubeletRootDir": "var/lib/kubelet"},
			{"unhealthyTaintEffect": "None"},
			{"unhealthyTaintEffect": "noexecute"},
		} {
			if _, err := Render(chartDir, bad); err == nil {
				t.Errorf("%v rendered", bad)
			}
		}
	})

	t.Run("metricsAndNetworkPolicyOff", func(t *testing.T) {
		r := render(t, map[string]any{
			"metrics":         map[string]any{"enabled": false},
			"networkPolicy":   map[string]any{"enabled": false},
			"admissionPolicy": map[string]any{"enabled": false},
			"namespace":       map[string]any{"create": false},
		})
		r.checkCommon(t, "vfio-gpu-dra")
		for _, kind := range []string{"NetworkPolicy", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "Namespace"} {
			if r.kinds[kind] != 0 {
				t.Errorf("%s rendered", kind)
			}
		}
		c := r.container()
		if len(c.Ports) != 0 || c.LivenessProbe != nil || c.ReadinessProbe != nil {
			t.Errorf("metrics off: ports %v probes %v %v", c.Ports, c.LivenessProbe, c.ReadinessProbe)
		}
		if _, ok := r.env()["VFIO_GPU_DRA_METRICS_ADDR"]; ok {
			t.Error("metrics off: VFIO_GPU_DRA_METRICS_ADDR set")
		}
	})

	t.Run("metricsOffNetworkPolicyOn", func(t *testing.T) {
		r := render(t, map[string]any{"metrics": map[string]any{"enabled": false}})
		if r.netpol == nil || len(r.netpol.Spec.Ingress) != 0 {
			t.Fatalf("want a deny-all NetworkPolicy, got %+v", r.netpol)
		}
	})

	t.Run("metricsPortAndMonitoring", func(t *testing.T) {
		r := render(t, map[string]any{
			"metrics":       map[string]any{"address": "[::]", "port": 9500},
			"networkPolicy": map[string]any{"monitoringNamespaceSelector": map[string]any{"matchLabels": map[string]any{"team": "observability"}}},
		})
		if r.env()["VFIO_GPU_DRA_METRICS_ADDR"] != "[::]:9500" || r.container().Ports[0].ContainerPort != 9500 {
			t.Errorf("env %v ports %v", r.env(), r.container().Ports)
		}
		from := r.netpol.Spec.Ingress[0].From[0].NamespaceSelector
		if from == nil || from.MatchLabels["team"] != "observability" {
			t.Errorf("namespaceSelector %v", from)
		}
	})
}
