package k8s

// TestK8s is the whole suite of one lane: one API server, then every scenario as a
// subtest (go test -run 'TestK8s/Register' runs one group).

import (
	"flag"
	"os"
	"testing"

	"k8s.io/klog/v2"
)

func TestMain(m *testing.M) {
	// Upstream components log through klog; keep the output to warnings unless asked.
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	v := os.Getenv("K8S_KLOG_V")
	if v == "" {
		_ = fs.Set("logtostderr", "false")
		_ = fs.Set("alsologtostderr", "false")
		_ = fs.Set("stderrthreshold", "ERROR")
	} else {
		_ = fs.Set("v", v)
	}
	os.Exit(m.Run())
}

func TestK8s(t *testing.T) {
	t.Logf("lane %s", lane)
	c := startCluster(t)
	t.Run("HelmChart", func(t *testing.T) { testHelmChart(t, c) })
	t.Run("LeastPrivilege", func(t *testing.T) { testLeastPrivilege(t, c) })
	t.Run("Publish", func(t *testing.T) { testPublish(t, c) })
	t.Run("Register", func(t *testing.T) { testRegister(t, c) })
	t.Run("Allocate", func(t *testing.T) { testAllocate(t, c) })
	t.Run("Prepare", func(t *testing.T) { testPrepare(t, c) })
	t.Run("Fabric", func(t *testing.T) { testFabric(t, c) })
	t.Run("Quarantine", func(t *testing.T) { testQuarantineTaint(t, c) })
	t.Run("UnhealthyTaint", func(t *testing.T) { testUnhealthyTaint(t, c) })
	t.Run("RollingUpdate", func(t *testing.T) { testRollingUpdate(t, c) })
}
