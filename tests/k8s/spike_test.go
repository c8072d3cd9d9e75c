package k8s

import (
	"context"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apiserver/pkg/storage/etcd3/testserver"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	"k8s.io/client-go/kubernetes"
	_ "k8s.io/dynamic-resource-allocation/structured"
	kubeapiservertesting "k8s.io/kubernetes/cmd/kube-apiserver/app/testing"
	_ "k8s.io/kubernetes/pkg/kubelet/cm/dra"
	_ "k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	_ "tags.cncf.io/container-device-interface/pkg/cdi"
)

func TestSpike(t *testing.T) {
	cfg := testserver.NewTestConfig(t)
	testserver.RunEtcd(t, cfg)
	sc := storagebackend.NewDefaultConfig("/registry-spike", nil)
	sc.Transport.ServerList = []string{cfg.ListenClientUrls[0].String()}
	srv := kubeapiservertesting.StartTestServerOrDie(t, kubeapiservertesting.NewDefaultTestServerOptions(),
		[]string{"--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
			"--endpoint-reconciler-type=none", "--disable-admission-plugins=ServiceAccount"}, sc)
	defer srv.TearDownFn()
	c := kubernetes.NewForConfigOrDie(srv.ClientConfig)
	l, err := c.ResourceV1().ResourceSlices().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("slices: %d", len(l.Items))
}
