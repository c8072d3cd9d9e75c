package k8s

// The control plane of the suite: embedded etcd and the real kube-apiserver
// (cmd/kube-apiserver/app/testing, what upstream's integration tests use) with the
// authorizers and admission plugins of a production cluster, and deploy/*.yaml
// applied exactly as shipped.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/apiserver/pkg/storage/etcd3/testserver"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	kubeapiservertesting "k8s.io/kubernetes/cmd/kube-apiserver/app/testing"
	"k8s.io/utils/ptr"
)

const (
	driverName      = "vfio-gpu.dra.dev"
	classAll        = "vfio-gpu.dra.dev"
	classPrebound   = "vfio-gpu-prebound.dra.dev"
	driverNS        = "vfio-gpu-dra"
	driverSA        = "vfio-gpu-dra"
	testNS          = "vm-tests"
	vapName         = "vfio-gpu-dra-resourceslices"
	nodeNameExtra   = "authentication.kubernetes.io/node-name"
	deleteFinalizer = "resource.kubernetes.io/delete-protection"
)

// cluster is one API server shared by every scenario of a lane.
type cluster struct {
	admin  *rest.Config
	client kubernetes.Interface
	dyn    dynamic.Interface
	host   string
	caData []byte
	// root is a short temporary directory: Unix socket paths are limited to 108 bytes.
	root string
	bin  string
	repo string
}

func repoRoot(t testing.TB) string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the test sources")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// startCluster starts etcd and kube-apiserver in this process.
func startCluster(t *testing.T) *cluster {
	t.Helper()
	bin := os.Getenv("VFIO_GPU_DRA_BIN")
	if bin == "" {
		t.Fatal("VFIO_GPU_DRA_BIN must name the vfio-gpu-dra binary (tests/k8s/run.sh builds it)")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("VFIO_GPU_DRA_BIN: %v", err)
	}
	root, err := os.MkdirTemp("", "k8s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// K8S_KEEP_TMP=1 keeps a failed test's files; =always keeps them anyway.
		keep := os.Getenv("K8S_KEEP_TMP")
		if keep != "always" && (!t.Failed() || keep == "") {
			os.RemoveAll(root)
		} else {
			t.Logf("kept %s", root)
		}
	})

	etcdCfg := testserver.NewTestConfig(t)
	testserver.RunEtcd(t, etcdCfg)
	storage := storagebackend.NewDefaultConfig("/registry", nil)
	storage.Transport.ServerList = []string{etcdCfg.ListenClientUrls[0].String()}

	flags := []string{
		// Production authorization: the node authorizer for kubelet identities, RBAC
		// for everything else (the test server's default would allow everything).
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		// No controller-manager runs: no service-account token controller, no endpoints.
		"--disable-admission-plugins=ServiceAccount",
		"--endpoint-reconciler-type=none",
		// Only what a default cluster serves (the test server turns on every alpha/beta API).
		"--runtime-config=api/all=false,api/ga=true",
		// No privileged pods (the kube-apiserver default, spelled out): the
		// plugin's DaemonSet runs without (TestK8s/LeastPrivilege, M4).
		"--allow-privileged=false",
	}
	srv := kubeapiservertesting.StartTestServerOrDie(t, kubeapiservertesting.NewDefaultTestServerOptions(), flags, storage)
	t.Cleanup(srv.TearDownFn)

	// The serving certificate: the fixture bundle (leaf + CA) the test server uses
	// for 127.0.0.1; the plugin verifies the server with it like a pod with its CA.
	ca, err := os.ReadFile(filepath.Join(srv.TmpDir, "apiserver.crt"))
	if err != nil {
		matches, _ := filepath.Glob(filepath.Join(srv.ServerOpts.SecureServing.ServerCert.FixtureDirectory, "127.0.0.1_*.crt"))
		if len(matches) == 0 {
			t.Fatalf("no serving certificate found: %v", err)
		}
		if ca, err = os.ReadFile(matches[0]); err != nil {
			t.Fatal(err)
		}
	}
	c := &cluster{
		admin:  srv.ClientConfig,
		client: kubernetes.NewForConfigOrDie(srv.ClientConfig),
		dyn:    dynamic.NewForConfigOrDie(srv.ClientConfig),
		host:   srv.ClientConfig.Host,
		caData: ca,
		root:   root,
		bin:    bin,
		repo:   repoRoot(t),
	}
	ctx := context.Background()
	for _, f := range []string{"rbac.yaml", "deviceclass.yaml", "admission-policy.yaml"} {
		c.apply(t, filepath.Join(c.repo, "deploy", f))
	}
	if _, err := c.client.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: testNS}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return c
}

// apply creates every object of a multi-document manifest, unmodified.
func (c *cluster) apply(t *testing.T, path string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dc := discovery.NewDiscoveryClientForConfigOrDie(c.admin)
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	n := 0
	for {
		var obj unstructured.Unstructured
		if err := dec.Decode(&obj.Object); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			t.Fatalf("%s: %v", path, err)
		}
		if len(obj.Object) == 0 {
			continue
		}
		gvk := obj.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatalf("%s: %s: %v", path, gvk, err)
		}
		var ri dynamic.ResourceInterface = c.dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = c.dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
		}
		if _, err := ri.Create(context.Background(), &obj, metav1.CreateOptions{}); err != nil {
			t.Fatalf("%s: creating %s %s: %v", filepath.Base(path), gvk.Kind, obj.GetName(), err)
		}
		n++
	}
	t.Logf("applied %s (%d objects)", filepath.Join("deploy", filepath.Base(path)), n)
}

// createNode creates a Node object (no kubelet heartbeats are needed: nothing schedules).
func (c *cluster) createNode(t *testing.T, name string) *v1.Node {
	t.Helper()
	n, err := c.client.CoreV1().Nodes().Create(context.Background(), &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/os": "linux"}},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		n, err = c.client.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	}
	if err != nil {
		t.Fatalf("creating node %q: %v", name, err)
	}
	return n
}

func shortHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])[:10]
}

// driverToken returns a token of the driver's ServiceAccount bound to a plugin pod
// on node, as the kubelet mints it for the DaemonSet's projected token volume: the
// API server then adds the node name to the token's user info.
func (c *cluster) driverToken(t *testing.T, node string) string {
	t.Helper()
	ctx := context.Background()
	name := "vfio-gpu-dra-" + shortHash(node)
	pod, err := c.client.CoreV1().Pods(driverNS).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		pod, err = c.client.CoreV1().Pods(driverNS).Create(ctx, &v1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": "vfio-gpu-dra"}},
			Spec: v1.PodSpec{
				NodeName:           node,
				ServiceAccountName: driverSA,
				Containers:         []v1.Container{{Name: "plugin", Image: "vfio-gpu-dra:test"}},
			},
		}, metav1.CreateOptions{})
	}
	if err != nil {
		t.Fatalf("plugin pod for node %q: %v", node, err)
	}
	tr, err := c.client.CoreV1().ServiceAccounts(driverNS).CreateToken(ctx, driverSA, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			ExpirationSeconds: ptr.To[int64](3600),
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for the plugin pod on %q: %v", node, err)
	}
	return tr.Status.Token
}

// unboundDriverToken is a token of the driver's ServiceAccount not bound to any pod.
func (c *cluster) unboundDriverToken(t *testing.T) string {
	t.Helper()
	tr, err := c.client.CoreV1().ServiceAccounts(driverNS).CreateToken(context.Background(), driverSA, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](3600)},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

// tokenConfig is a client config for a bearer token, verifying the server's certificate.
func (c *cluster) tokenConfig(token string) *rest.Config {
	return &rest.Config{
		Host:            c.host,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: c.caData},
		QPS:             100,
		Burst:           200,
	}
}

// writeKubeconfig writes the kubeconfig file the plugin gets with --kubeconfig.
func (c *cluster) writeKubeconfig(t *testing.T, path, token string) {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["test"] = &clientcmdapi.Cluster{Server: c.host, CertificateAuthorityData: c.caData}
	cfg.AuthInfos["vfio-gpu-dra"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "vfio-gpu-dra", Namespace: driverNS}
	cfg.CurrentContext = "test"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
}

// nodeClient is the kubelet's identity on node: system:node:<name> in system:nodes,
// so the node authorizer and NodeRestriction judge every kubelet request.
func (c *cluster) nodeClient(node string) kubernetes.Interface {
	cfg := rest.CopyConfig(c.admin)
	cfg.Impersonate = rest.ImpersonationConfig{
		UserName: "system:node:" + node,
		Groups:   []string{"system:nodes", "system:authenticated"},
	}
	return kubernetes.NewForConfigOrDie(cfg)
}

// eventually polls cond until it returns true or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	var last error
	err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		ok, err := cond()
		if err != nil {
			last = err
			return false, nil
		}
		return ok, nil
	})
	if err != nil {
		if last != nil {
			t.Fatalf("%s: not within %v; last error: %v", what, timeout, last)
		}
		t.Fatalf("%s: not within %v", what, timeout)
	}
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}
