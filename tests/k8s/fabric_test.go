package k8s

// Fabric (issue 21): NVLink partitions on the HGX demo host (`serve --demo --hgx`:
// 8 × H100 SXM, NVSwitches, a simulated Fabric Manager whose state is the JSON file
// <demo-dir>/fabric-manager.json). The real allocator places 2-, 4- and 8-GPU claims
// tied by `matchAttribute: vfio-gpu.dra.dev/partitionN` only on valid partitions; the
// real kubelet DRA manager prepares them and FM then has exactly that partition
// active, none after unprepare; a claim no partition covers is refused at prepare
// with nothing moved. The expected table and module order are written here, not
// asked from the plugin.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// hgxModules is the HGX demo host's module map (crates/host/src/demo.rs,
// HGX_MODULE_MAP): device → module id, deliberately not in PCI order.
var hgxModules = map[string]int{
	"gpu-0000-18-00-0": 5,
	"gpu-0000-2a-00-0": 7,
	"gpu-0000-3a-00-0": 6,
	"gpu-0000-5d-00-0": 8,
	"gpu-0000-9a-00-0": 1,
	"gpu-0000-ab-00-0": 3,
	"gpu-0000-ba-00-0": 2,
	"gpu-0000-db-00-0": 4,
}

// h100Partitions is Fabric Manager's HGX H100/H200 partition table
// (shared/reference/fabric-manager.md §5): id → member modules. The 2-GPU pairs
// are not neighbours; ids 7–14 are the 1-GPU partitions of modules 1–8.
var h100Partitions = func() map[int][]int {
	p := map[int][]int{
		0: {1, 2, 3, 4, 5, 6, 7, 8},
		1: {1, 2, 3, 4},
		2: {5, 6, 7, 8},
		3: {1, 3},
		4: {2, 4},
		5: {5, 7},
		6: {6, 8},
	}
	for m := 1; m <= 8; m++ {
		p[6+m] = []int{m}
	}
	return p
}()

// partitionOf is the id of the partition whose modules are exactly devices', or -1.
func partitionOf(devices []string) int {
	var mods []int
	for _, d := range devices {
		m, ok := hgxModules[d]
		if !ok {
			return -1
		}
		mods = append(mods, m)
	}
	slices.Sort(mods)
	for id, members := range h100Partitions {
		if slices.Equal(members, mods) {
			return id
		}
	}
	return -1
}

// containing is the id of the partition of size that holds module m.
func containing(m, size int) int {
	for id, members := range h100Partitions {
		if len(members) == size && slices.Contains(members, m) {
			return id
		}
	}
	return -1
}

// fmState is what the test reads of the simulated FM's state file
// (crates/fabric/src/sim.rs SimState, camelCase JSON).
type fmState struct {
	Active []int `json:"active"`
	Log    []struct {
		Call       string `json:"call"`
		Partitions []int  `json:"partitions"`
		Code       int    `json:"code"`
	} `json:"log"`
}

func (d *nodeDirs) fmState(t *testing.T) fmState {
	t.Helper()
	path := filepath.Join(d.demoDir, "fabric-manager.json")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("simulated Fabric Manager state: %v", err)
	}
	var s fmState
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatalf("simulated Fabric Manager state %s: %v", path, err)
	}
	slices.Sort(s.Active)
	return s
}

// activations counts the FM log's calls that activate partitions (any outcome;
// crates/fabric Call names in camelCase).
func (s fmState) activations() int {
	n := 0
	for _, e := range s.Log {
		if e.Call == "activate" || e.Call == "setActivatedPartitions" {
			n++
		}
	}
	return n
}

// kernelWrites is the simulated kernel's write log of the demo host (one line
// per sysfs write, from every process on it); "" before the first write.
func (d *nodeDirs) kernelWrites(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(d.demoDir, "kernel.log"))
	if os.IsNotExist(err) {
		return ""
	}
	if err != nil {
		t.Fatalf("simulated kernel log: %v", err)
	}
	return string(b)
}

// newPartitionClaim creates a claim of size GPUs the way a KubeVirt VM asks for
// them (deploy/fabric/kubevirt-vm-nvlink.yaml): one request per GPU (gpu0, gpu1,
// ...: KubeVirt maps one request to one PCI device), all tied by one
// matchAttribute on partition<size> (constrained=false: no constraint).
func (c *cluster) newPartitionClaim(t *testing.T, name string, size int64, constrained bool, selectors ...string) *resourceapi.ResourceClaim {
	t.Helper()
	var spec resourceapi.ResourceClaimSpec
	var names []string
	for i := int64(0); i < size; i++ {
		req := &resourceapi.ExactDeviceRequest{DeviceClassName: classAll, AllocationMode: resourceapi.DeviceAllocationModeExactCount, Count: 1}
		for _, s := range selectors {
			req.Selectors = append(req.Selectors, resourceapi.DeviceSelector{CEL: &resourceapi.CELDeviceSelector{Expression: s}})
		}
		names = append(names, fmt.Sprintf("gpu%d", i))
		spec.Devices.Requests = append(spec.Devices.Requests, resourceapi.DeviceRequest{Name: names[i], Exactly: req})
	}
	if constrained {
		attr := resourceapi.FullyQualifiedName(fmt.Sprintf("%s/partition%d", driverName, size))
		spec.Devices.Constraints = []resourceapi.DeviceConstraint{{Requests: names, MatchAttribute: &attr}}
	}
	claim, err := c.client.ResourceV1().ResourceClaims(testNS).Create(context.Background(), &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       spec,
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating claim %s: %v", name, err)
	}
	return claim
}

// partitionClaimAndPod creates, allocates (real allocator) and reserves a claim
// for a new pod; nil claim when the allocator finds no placement.
func (e *prepareEnv) partitionClaimAndPod(t *testing.T, name string, size int64, constrained bool, selectors ...string) (*resourceapi.ResourceClaim, *v1.Pod, []string) {
	t.Helper()
	claim := e.c.newPartitionClaim(t, name, size, constrained, selectors...)
	res := e.c.allocate(t, claim, e.node)
	if res == nil {
		e.c.forceDelete(t, claim)
		return nil, nil, nil
	}
	pod := e.c.newPod(t, name, e.node.Name, claim.Name)
	claim = e.c.bind(t, claim, res, pod)
	return claim, pod, allocatedDevices(res)
}

func (e *prepareEnv) dropClaim(t *testing.T, claim *resourceapi.ResourceClaim, pod *v1.Pod) {
	t.Helper()
	e.c.forceDelete(t, claim)
	if err := e.c.client.CoreV1().Pods(testNS).Delete(context.Background(), pod.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatalf("deleting pod %s: %v", pod.Name, err)
	}
}

// waitAllOffered waits until the node's complete pool offers all 8 HGX GPUs
// again and returns how long that took. The plugin re-lists its devices every
// 10 s; a list taken while a claim's GPUs were being released hides them until
// the next one, and the allocator only sees what the slices offer.
func (e *prepareEnv) waitAllOffered(t *testing.T) time.Duration {
	t.Helper()
	t0 := time.Now()
	eventually(t, 30*time.Second, "all HGX GPUs offered on "+e.node.Name, func() (bool, error) {
		devices := e.c.waitForSlices(t, e.p, 30*time.Second)
		for d := range hgxModules {
			if _, ok := devices[d]; !ok {
				return false, nil
			}
		}
		return true, nil
	})
	return time.Since(t0)
}

// hgxDrivers is the host driver of every HGX GPU.
func (e *prepareEnv) hgxDrivers(t *testing.T) map[string]string {
	out := map[string]string{}
	for d := range hgxModules {
		out[d] = e.dirs.hostDriver(t, bdfOf(d))
	}
	return out
}

func testFabric(t *testing.T, c *cluster) {
	const node = "hgx-node"
	e := &prepareEnv{c: c, node: c.createNode(t, node), dirs: c.newNodeDirs(t, node)}
	e.k = c.startKubelet(t, nil, node, e.dirs.regDir, e.dirs.kubeletDir)
	e.p = c.startPlugin(t, node, e.dirs, pluginOpts{args: []string{"--hgx"}})
	e.k.waitRegistered(t, 1, 30*time.Second)
	devices := c.waitForSlices(t, e.p, 30*time.Second)

	// The attributes a matchAttribute constraint ties: gpuModuleID and the id of
	// the partition of each size that holds the GPU, for all 8 GPUs.
	t.Run("PartitionAttributes", func(t *testing.T) {
		if len(devices) != len(hgxModules) {
			t.Fatalf("HGX node offers %v, want the 8 GPUs of %v", deviceNames(devices), hgxModules)
		}
		for name, m := range hgxModules {
			d, ok := devices[name]
			if !ok {
				t.Errorf("%s not offered", name)
				continue
			}
			want := map[string]string{
				"gpuModuleID":   fmt.Sprint(m),
				"fabricManaged": "true",
				"nvlinkFabric":  "nvl4",
			}
			for _, size := range []int{1, 2, 4, 8} {
				want[fmt.Sprintf("partition%d", size)] = fmt.Sprint(containing(m, size))
			}
			for k, v := range want {
				a, ok := d.Attributes[resourceapi.QualifiedName(k)]
				if !ok {
					t.Errorf("%s: no attribute %s", name, k)
				} else if got := renderAttribute(a); got != v {
					t.Errorf("%s: %s = %s, want %s", name, k, got, v)
				}
			}
		}
	})

	// The allocator alone. On this host the PCI order happens to pair GPUs the
	// way the table does, so a 1-GPU claim first takes module 7 (the second GPU in
	// PCI order): an allocator that ignored the constraint would now pick
	// neighbours that are no partition (the control below shows it does).
	// Then claims of N GPUs are allocated and kept one after the other until none
	// fits: every allocation is exactly one partition without module 7, none
	// twice, and every such partition gets used (3 pairs, 1 quad, no octet).
	t.Run("AllocatorPlacesOnPartitions", func(t *testing.T) {
		for _, size := range []int{2, 4, 8} {
			t.Run(fmt.Sprint(size), func(t *testing.T) {
				e.waitAllOffered(t)
				const heldModule = 7
				held, heldPod, _ := e.partitionClaimAndPod(t, fmt.Sprintf("fab-held-%d", size), 1, false,
					fmt.Sprintf(`device.attributes["vfio-gpu.dra.dev"].gpuModuleID == %d`, heldModule))
				if held == nil {
					t.Fatalf("module %d cannot be allocated", heldModule)
				}
				defer e.dropClaim(t, held, heldPod)
				want := 0
				for _, members := range h100Partitions {
					if len(members) == size && !slices.Contains(members, heldModule) {
						want++
					}
				}
				if size < 8 {
					// Control: the same claim without the constraint lands on no partition.
					free := e.c.newPartitionClaim(t, fmt.Sprintf("fab-free-%d", size), int64(size), false)
					res := e.c.allocate(t, free, e.node)
					e.c.forceDelete(t, free)
					if res == nil {
						t.Fatalf("unconstrained %d-GPU claim cannot be allocated", size)
					}
					if id := partitionOf(allocatedDevices(res)); id >= 0 {
						t.Fatalf("test bug: unconstrained %d GPUs %v are partition %d, the control proves nothing", size, allocatedDevices(res), id)
					}
				}
				seen := map[int]bool{}
				for i := 0; ; i++ {
					claim, pod, got := e.partitionClaimAndPod(t, fmt.Sprintf("fab-alloc-%d-%d", size, i), int64(size), true)
					if claim == nil {
						break
					}
					defer e.dropClaim(t, claim, pod)
					id := partitionOf(got)
					if id < 0 {
						t.Errorf("allocation %d of %d GPUs %v is no partition", i, size, got)
						continue
					}
					if seen[id] {
						t.Errorf("partition %d allocated twice", id)
					}
					seen[id] = true
					if i >= want {
						t.Fatalf("more than %d allocations of %d GPUs", want, size)
					}
				}
				if len(seen) != want {
					t.Errorf("%d-GPU claims placed on partitions %v, want all %d of that size without module %d", size, seen, want, heldModule)
				}
			})
		}
	})

	// Through the kubelet: FM has exactly the claim's partition active while it
	// is prepared, none after unprepare; the claim's GPUs (and only they) moved.
	t.Run("PrepareActivatesExactly", func(t *testing.T) {
		for _, size := range []int{2, 4, 8} {
			t.Run(fmt.Sprint(size), func(t *testing.T) {
				e.waitAllOffered(t)
				before := e.hgxDrivers(t)
				claim, pod, got := e.partitionClaimAndPod(t, fmt.Sprintf("fab-prep-%d", size), int64(size), true)
				if claim == nil {
					t.Fatalf("a %d-GPU partition claim cannot be allocated", size)
				}
				defer e.dropClaim(t, claim, pod)
				id := partitionOf(got)
				if id < 0 {
					t.Fatalf("allocated %v: no partition", got)
				}
				if s := e.dirs.fmState(t); len(s.Active) != 0 {
					t.Fatalf("FM active %v before prepare, want none", s.Active)
				}
				e.k.prepare(t, pod)
				if s := e.dirs.fmState(t); !slices.Equal(s.Active, []int{id}) {
					t.Errorf("FM active %v after preparing %v, want exactly partition %d", s.Active, got, id)
				}
				for d, drv := range e.hgxDrivers(t) {
					want := before[d]
					if slices.Contains(got, d) {
						want = "vfio-pci"
					}
					if drv != want {
						t.Errorf("%s on %q after prepare, want %q", d, drv, want)
					}
				}
				e.k.unprepare(t, pod)
				if s := e.dirs.fmState(t); len(s.Active) != 0 {
					t.Errorf("FM active %v after unprepare, want none", s.Active)
				}
				if after := e.hgxDrivers(t); !mapsEqual(after, before) {
					t.Errorf("drivers after unprepare %v, want %v", after, before)
				}
			})
		}
	})

	// Two GPUs the allocator may pick without the constraint but that are no
	// partition (modules 1 and 2: H100 pairs are {1,3} {2,4} {5,7} {6,8}): the
	// plugin refuses at prepare, says why and what to do, and nothing moved — no
	// sysfs write, no FM activation.
	t.Run("UncoveredRefused", func(t *testing.T) {
		e.waitAllOffered(t)
		claim, pod, got := e.partitionClaimAndPod(t, "fab-uncovered", 2, false,
			`device.attributes["vfio-gpu.dra.dev"].gpuModuleID == 1 || device.attributes["vfio-gpu.dra.dev"].gpuModuleID == 2`)
		if claim == nil {
			t.Fatal("the unconstrained claim of modules 1 and 2 cannot be allocated")
		}
		defer e.dropClaim(t, claim, pod)
		if partitionOf(got) >= 0 {
			t.Fatalf("test bug: %v is a partition", got)
		}
		drivers, writes, fm := e.hgxDrivers(t), e.dirs.kernelWrites(t), e.dirs.fmState(t)
		e.k.waitNodeSees(t, claim)
		e.k.setActive(pod, true)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
		err := e.k.mgr.PrepareResources(ctx, pod)
		cancel()
		if err == nil {
			t.Fatalf("PrepareResources of %v (no partition) succeeded", got)
		}
		t.Logf("refused: %v", err)
		for _, want := range []string{"not exactly one Fabric Manager partition", "matchAttribute: vfio-gpu.dra.dev/partition2"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error lacks %q", want)
			}
		}
		if after := e.hgxDrivers(t); !mapsEqual(after, drivers) {
			t.Errorf("drivers after the refused prepare %v, want %v", after, drivers)
		}
		if w := e.dirs.kernelWrites(t); w != writes {
			t.Errorf("sysfs writes during the refused prepare:\n%s", strings.TrimPrefix(w, writes))
		}
		s := e.dirs.fmState(t)
		if len(s.Active) != 0 || s.activations() != fm.activations() {
			t.Errorf("FM after the refused prepare: active %v, %d activations (before: %d)", s.Active, s.activations(), fm.activations())
		}
		e.k.unprepare(t, pod)
	})
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
