package k8s

// The prepare/unprepare benchmark (not part of the suite: runs only with
// K8S_BENCH=1; tests/k8s/bench.sh builds and runs it). One API server, one node
// with the HGX demo host (8 GPUs, simulated kernel and Fabric Manager, both zero
// latency), one kubelet DRA manager and one `serve --demo --hgx` process, set up
// once; then per round a 1-GPU and an 8-GPU claim (each tied to its partition by
// matchAttribute, as the default fabric policy Required needs) are created,
// allocated, reserved, and the kubelet manager's own PrepareResources(pod) and
// UnprepareResources(pod) are timed. Around every call the plugin's
// prepare/unprepare duration histogram is read from its /metrics endpoint: the
// difference of its _sum is the plugin's own time for that claim, beside the
// kubelet-observed time. Nothing is asserted about the figures.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// benchWarmup rounds are run and not counted, as in the emulator's bench.
const benchWarmup = 5

// The plugin's histograms (crates/kubelet/src/metrics.rs), one observation per claim.
const (
	metricPrepare   = "vfio_gpu_dra_prepare_duration_seconds"
	metricUnprepare = "vfio_gpu_dra_unprepare_duration_seconds"
)

// percentile is the emulator bench's definition (crates/kubelet/benches/prepare.rs):
// the sample at index round((n-1)·p) of the sorted samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(float64(len(sorted)-1)*p + 0.5)
	return sorted[min(i, len(sorted)-1)]
}

func sortedCopy(samples []time.Duration) []time.Duration {
	s := append([]time.Duration(nil), samples...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s
}

func ms(d time.Duration) float64 { return d.Seconds() * 1e3 }

// benchReport prints one parseable line per call and size (bench.sh reads them):
// the kubelet-observed p50/p99, the plugin's own p50/p99 (its histogram), and the
// plugin's share of the kubelet-observed time at each percentile.
func benchReport(call string, gpus int, kubelet, plugin []time.Duration) {
	k, p := sortedCopy(kubelet), sortedCopy(plugin)
	k50, k99 := percentile(k, 0.50), percentile(k, 0.99)
	p50, p99 := percentile(p, 0.50), percentile(p, 0.99)
	fmt.Printf("BENCH kubelet-manager %-9s gpus=%d n=%d p50=%.3f ms p99=%.3f ms max=%.3f ms plugin-p50=%.3f ms plugin-p99=%.3f ms share-p50=%.1f %% share-p99=%.1f %%\n",
		call, gpus, len(k), ms(k50), ms(k99), ms(k[len(k)-1]), ms(p50), ms(p99),
		100*p50.Seconds()/k50.Seconds(), 100*p99.Seconds()/k99.Seconds())
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

// freeLocalAddr is a loopback address with a port nothing listens on now.
func freeLocalAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// histogramSum reads <name>_sum and <name>_count from the plugin's /metrics.
func histogramSum(t *testing.T, addr, name string) (time.Duration, int64) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("plugin metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("plugin metrics: %s", resp.Status)
	}
	var sum float64
	count := int64(-1)
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		switch f[0] {
		case name + "_sum":
			if sum, err = strconv.ParseFloat(f[1], 64); err != nil {
				t.Fatalf("%s: %v", f[0], err)
			}
		case name + "_count":
			if count, err = strconv.ParseInt(f[1], 10, 64); err != nil {
				t.Fatalf("%s: %v", f[0], err)
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("plugin metrics: %v", err)
	}
	if count < 0 {
		t.Fatalf("plugin metrics have no %s_count", name)
	}
	return time.Duration(sum * float64(time.Second)), count
}

// timedCall runs call and returns its wall time and the plugin's own time
// for it (the growth of the histogram's sum); ok is false when the histogram
// did not grow by exactly one claim (another call ran meanwhile: no sample).
func timedCall(t *testing.T, addr, metric string, call func(context.Context) error) (wall, plugin time.Duration, ok bool, err error) {
	t.Helper()
	sum0, n0 := histogramSum(t, addr, metric)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	t0 := time.Now()
	err = call(ctx)
	wall = time.Since(t0)
	cancel()
	sum1, n1 := histogramSum(t, addr, metric)
	return wall, sum1 - sum0, n1 == n0+1, err
}

// benchSample is one size's samples.
type benchSample struct {
	prep, unprep, pluginPrep, pluginUnprep []time.Duration
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
	sizes := []int{1, 8}
	t.Logf("lane %s, %d rounds (+%d warm-up) of %v GPUs", lane, n, benchWarmup, sizes)
	c := startCluster(t)
	const node = "bench-node"
	e := &prepareEnv{c: c, node: c.createNode(t, node), dirs: c.newNodeDirs(t, node)}
	e.k = c.startKubelet(t, nil, node, e.dirs.regDir, e.dirs.kubeletDir)
	metrics := freeLocalAddr(t)
	args := []string{"--hgx", "--metrics-addr", metrics}
	// K8S_BENCH_KERNEL_LATENCY gives the simulated kernel a driver's own time for a
	// write (e.g. nvidia's unbind), so the moves wait as on a node instead of being
	// only the simulator's CPU work.
	if v := os.Getenv("K8S_BENCH_KERNEL_LATENCY"); v != "" {
		args = append(args, "--demo-kernel-latency", v)
		t.Logf("simulated kernel latencies: %s", v)
	}
	e.p = c.startPlugin(t, node, e.dirs, pluginOpts{args: args})
	e.k.waitRegistered(t, 1, 30*time.Second)
	c.waitForSlices(t, e.p, 30*time.Second)

	// Rounds that had to wait for the plugin to offer its GPUs again (outside
	// the timed calls), and how long in all.
	var waits, dropped int
	var waited time.Duration
	samples := map[int]*benchSample{}
	for _, s := range sizes {
		samples[s] = &benchSample{}
	}
	// Sizes alternate within a round, so both see the same machine load.
	for i := 0; i < n+benchWarmup; i++ {
		for _, size := range sizes {
			if d := e.waitAllOffered(t); d > 300*time.Millisecond {
				waits++
				waited += d
			}
			claim, pod, devices := e.partitionClaimAndPod(t, fmt.Sprintf("bench-%d-%d", size, i), int64(size), true)
			if claim == nil {
				t.Fatalf("round %d: a %d-GPU claim cannot be allocated", i, size)
			}
			before := map[string]string{}
			for _, d := range devices {
				before[d] = e.dirs.hostDriver(t, bdfOf(d))
			}
			e.k.waitNodeSees(t, claim)

			e.k.setActive(pod, true)
			dPrep, pPrep, okPrep, err := timedCall(t, metrics, metricPrepare, func(ctx context.Context) error { return e.k.mgr.PrepareResources(ctx, pod) })
			if err != nil {
				t.Fatalf("round %d, %d GPUs: PrepareResources: %v", i, size, err)
			}
			for _, d := range devices {
				if got := e.dirs.hostDriver(t, bdfOf(d)); got != "vfio-pci" {
					t.Fatalf("round %d: %s on %q after prepare", i, d, got)
				}
			}

			// The pod stays active until its claims are unprepared: the kubelet's
			// reconcile loop unprepares inactive pods' claims by itself, which
			// would race the timed call.
			dUnprep, pUnprep, okUnprep, err := timedCall(t, metrics, metricUnprepare, func(ctx context.Context) error { return e.k.mgr.UnprepareResources(ctx, pod) })
			if err != nil {
				t.Fatalf("round %d, %d GPUs: UnprepareResources: %v", i, size, err)
			}
			e.k.setActive(pod, false)
			for _, d := range devices {
				if got := e.dirs.hostDriver(t, bdfOf(d)); got != before[d] {
					t.Fatalf("round %d: %s on %q after unprepare, want %q", i, d, got, before[d])
				}
			}
			e.dropClaim(t, claim, pod)
			if !okPrep || !okUnprep {
				// Another prepare or unprepare ran during the timed one.
				dropped++
				continue
			}
			if i >= benchWarmup {
				s := samples[size]
				s.prep = append(s.prep, dPrep)
				s.unprep = append(s.unprep, dUnprep)
				s.pluginPrep = append(s.pluginPrep, pPrep)
				s.pluginUnprep = append(s.pluginUnprep, pUnprep)
			}
		}
	}
	fmt.Printf("BENCH waits for all GPUs offered again: %d of %d claims, %.1f s in all; rounds dropped (another call ran meanwhile): %d\n", waits, len(sizes)*(n+benchWarmup), waited.Seconds(), dropped)
	for _, size := range sizes {
		s := samples[size]
		benchReport("prepare", size, s.prep, s.pluginPrep)
		benchReport("unprepare", size, s.unprep, s.pluginUnprep)
	}
}
