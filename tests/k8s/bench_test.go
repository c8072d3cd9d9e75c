package k8s

// The prepare/unprepare benchmark (not part of the suite: runs only with
// K8S_BENCH=1; tests/k8s/bench.sh runs it next to the kubelet emulator's bench).
// One API server, one node, one kubelet DRA manager and one `serve --demo`
// process, set up once; then per iteration a claim + pod is created, allocated and
// reserved, and the kubelet manager's own PrepareResources(pod) and
// UnprepareResources(pod) are timed. Nothing is asserted about the figures.

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// benchWarmup rounds are run and not counted, as in the emulator's bench.
const benchWarmup = 5

// percentile is the emulator bench's definition (crates/kubelet/benches/prepare.rs):
// the sample at index round((n-1)·p) of the sorted samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(float64(len(sorted)-1)*p + 0.5)
	return sorted[min(i, len(sorted)-1)]
}

func benchReport(name string, samples []time.Duration) {
	s := append([]time.Duration(nil), samples...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	ms := func(d time.Duration) float64 { return d.Seconds() * 1e3 }
	// One parseable line per figure on stdout (bench.sh reads them).
	fmt.Printf("BENCH kubelet-manager %-10s n=%d p50=%.3f ms p99=%.3f ms max=%.3f ms\n",
		name, len(s), ms(percentile(s, 0.50)), ms(percentile(s, 0.99)), ms(s[len(s)-1]))
}

// waitNodeSees waits until the kubelet's identity may read the claim (the node
// authorizer's graph has the pod → claim edge), so that the timed
// PrepareResources is never a refused first try.
func (k *kubelet) waitNodeSees(t *testing.T, claim *resourceapi.ResourceClaim) {
	t.Helper()
	eventually(t, 30*time.Second, "node authorizer sees claim "+claim.Name, func() (bool, error) {
		_, err := k.client.ResourceV1().ResourceClaims(claim.Namespace).Get(context.Background(), claim.Name, metav1.GetOptions{})
		return err == nil, err
	})
}

func TestBenchPrepare(t *testing.T) {
	if os.Getenv("K8S_BENCH") != "1" {
		t.Skip("benchmark: set K8S_BENCH=1 (tests/k8s/bench.sh)")
	}
	n := 50
	if v := os.Getenv("K8S_BENCH_N"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("K8S_BENCH_N=%q", v)
		}
	}
	t.Logf("lane %s, %d iterations (+%d warm-up)", lane, n, benchWarmup)
	c := startCluster(t)
	const node = "bench-node"
	e := &prepareEnv{c: c, node: c.createNode(t, node), dirs: c.newNodeDirs(t, node)}
	e.k = c.startKubelet(t, nil, node, e.dirs.regDir, e.dirs.kubeletDir)
	e.p = c.startPlugin(t, node, e.dirs, pluginOpts{})
	e.k.waitRegistered(t, 1, 30*time.Second)
	c.waitForSlices(t, e.p, 30*time.Second)

	var prep, unprep []time.Duration
	for i := 0; i < n+benchWarmup; i++ {
		claim, pod, device := e.claimAndPod(t, fmt.Sprintf("bench-%d", i), classAll, movableSelector)
		bdf := bdfOf(device)
		before := e.dirs.hostDriver(t, bdf)
		e.k.waitNodeSees(t, claim)

		e.k.setActive(pod, true)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
		t0 := time.Now()
		err := e.k.mgr.PrepareResources(ctx, pod)
		dPrep := time.Since(t0)
		cancel()
		if err != nil {
			t.Fatalf("round %d: PrepareResources: %v", i, err)
		}
		if got := e.dirs.hostDriver(t, bdf); got != "vfio-pci" {
			t.Fatalf("round %d: %s on %q after prepare", i, bdf, got)
		}

		e.k.setActive(pod, false)
		ctx, cancel = context.WithTimeout(context.Background(), 50*time.Second)
		t0 = time.Now()
		err = e.k.mgr.UnprepareResources(ctx, pod)
		dUnprep := time.Since(t0)
		cancel()
		if err != nil {
			t.Fatalf("round %d: UnprepareResources: %v", i, err)
		}
		if got := e.dirs.hostDriver(t, bdf); got != before {
			t.Fatalf("round %d: %s on %q after unprepare, want %q", i, bdf, got, before)
		}

		c.forceDelete(t, claim)
		if err := c.client.CoreV1().Pods(testNS).Delete(context.Background(), pod.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
			t.Fatalf("deleting pod %s: %v", pod.Name, err)
		}
		if i >= benchWarmup {
			prep = append(prep, dPrep)
			unprep = append(unprep, dUnprep)
		}
	}
	benchReport("prepare", prep)
	benchReport("unprepare", unprep)
}
