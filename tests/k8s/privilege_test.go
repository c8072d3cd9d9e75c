package k8s

// LeastPrivilege (security review M4): the API server runs with
// --allow-privileged=false, so it admits no privileged pod template at all. The
// shipped deploy/daemonset.yaml is created against it (server-side dry run:
// validation and admission, nothing persisted) and comes back without hostPID,
// not privileged, with no privilege escalation and only the capabilities
// docs/security.md explains; the same DaemonSet made privileged is refused, so the
// policy is live. tests/vm plugin-caps runs the binary with exactly these
// capabilities on a real kernel.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// wantCaps are the DaemonSet's capabilities.add, in order.
var wantCaps = []v1.Capability{"SYS_PTRACE", "DAC_READ_SEARCH", "SYS_CHROOT", "SYS_MODULE"}

func testLeastPrivilege(t *testing.T, c *cluster) {
	ctx := context.Background()
	data, err := os.ReadFile(filepath.Join(c.repo, "deploy", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(data, &ds); err != nil {
		t.Fatalf("deploy/daemonset.yaml: %v", err)
	}
	if _, err := c.client.CoreV1().Namespaces().Get(ctx, ds.Namespace, metav1.GetOptions{}); err != nil {
		if _, err := c.client.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ds.Namespace}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	dry := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}
	got, err := c.client.AppsV1().DaemonSets(ds.Namespace).Create(ctx, &ds, dry)
	if err != nil {
		t.Fatalf("the API server (--allow-privileged=false) refused deploy/daemonset.yaml: %v", err)
	}
	pod := got.Spec.Template.Spec
	if pod.HostPID {
		t.Error("hostPID: true")
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers", len(pod.Containers))
	}
	sc := pod.Containers[0].SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.Capabilities == nil {
		t.Fatalf("securityContext %+v", sc)
	}
	if fmt.Sprint(sc.Capabilities.Drop) != "[ALL]" || fmt.Sprint(sc.Capabilities.Add) != fmt.Sprint(wantCaps) {
		t.Errorf("capabilities drop %v add %v, want [ALL] and %v", sc.Capabilities.Drop, sc.Capabilities.Add, wantCaps)
	}
	privileged := true
	ds.Spec.Template.Spec.Containers[0].SecurityContext = &v1.SecurityContext{Privileged: &privileged}
	_, err = c.client.AppsV1().DaemonSets(ds.Namespace).Create(ctx, &ds, dry)
	if err == nil || !strings.Contains(err.Error(), "privileged") {
		t.Errorf("a privileged DaemonSet: %v, want refused by --allow-privileged=false", err)
	}
}
