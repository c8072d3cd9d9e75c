package k8s

// Scenario 3, Allocate: the scheduler's allocator, with the real CEL environment,
// over the plugin's published slices and the DeviceClasses of deploy/.

import (
	"fmt"
	"strings"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
)

func allocatedDevices(res *resourceapi.AllocationResult) []string {
	if res == nil {
		return nil
	}
	var out []string
	for _, r := range res.Devices.Results {
		out = append(out, r.Device)
	}
	return sortedStrings(out)
}

// demoGPU is what the demo host (crates/host/src/demo.rs) holds for one offered GPU.
type demoGPU struct {
	deviceID, product, root, driver string
	numa, group                     int64
	keep                            bool
	barBytes                        int64
}

const (
	mi = int64(1) << 20
	gi = int64(1) << 30
)

// The offered GPUs: device IDs, pci.ids names, switch ports (their root complex),
// NUMA nodes and BARs (16 MiB + VRAM BAR + 32 MiB) as the demo builds them; IOMMU
// groups 1-3 are the platform functions, then each switch port and its GPU take
// one group each (5, 7, ...); the five admin-kept GPUs start on vfio-pci.
var demoGPUs = map[string]demoGPU{
	"gpu-0000-18-00-0": {"0x2330", "GH100 [H100 SXM5 80GB]", "pci0000:17", "vfio-pci", 0, 5, true, 48*mi + 128*gi},
	"gpu-0000-2a-00-0": {"0x2330", "GH100 [H100 SXM5 80GB]", "pci0000:29", "vfio-pci", 0, 7, true, 48*mi + 128*gi},
	"gpu-0000-3a-00-0": {"0x2335", "GH100 [H200 SXM 141GB]", "pci0000:39", "vfio-pci", 0, 9, true, 48*mi + 256*gi},
	"gpu-0000-5d-00-0": {"0x2335", "GH100 [H200 SXM 141GB]", "pci0000:5c", "vfio-pci", 0, 11, true, 48*mi + 256*gi},
	"gpu-0000-9a-00-0": {"0x26b9", "AD102GL [L40S]", "pci0000:99", "vfio-pci", 1, 13, true, 48*mi + 64*gi},
	"gpu-0000-ab-00-0": {"0x26b1", "AD102GL [RTX 6000 Ada Generation]", "pci0000:aa", "nvidia", 1, 15, false, 48*mi + 64*gi},
	"gpu-0000-ba-00-0": {"0x20b2", "GA100 [A100 SXM4 80GB]", "pci0000:b9", "nvidia", 1, 17, false, 48*mi + 128*gi},
}

// attributes are the 12 attributes the device must carry, rendered as text.
func (g demoGPU) attributes(name string) map[string]string {
	return map[string]string{
		"resource.kubernetes.io/pciBusID": bdfOf(name),
		"resource.kubernetes.io/pcieRoot": g.root,
		"resource.kubernetes.io/numaNode": fmt.Sprint(g.numa),
		"numaNode":                        fmt.Sprint(g.numa),
		"vendorID":                        "0x10de",
		"deviceID":                        g.deviceID,
		"productName":                     g.product,
		"iommuGroup":                      fmt.Sprint(g.group),
		"driver":                          g.driver,
		"keepOnVfio":                      fmt.Sprint(g.keep),
		"type":                            "vfio",
		// The 64-bit prefetchable BARs: all but BAR0 (16 MiB, 32-bit register space).
		"barPrefetchable64Bytes": fmt.Sprint(g.barBytes - 16*mi),
	}
}

func renderAttribute(a resourceapi.DeviceAttribute) string {
	switch {
	case a.StringValue != nil:
		return *a.StringValue
	case a.IntValue != nil:
		return fmt.Sprint(*a.IntValue)
	case a.BoolValue != nil:
		return fmt.Sprint(*a.BoolValue)
	case a.VersionValue != nil:
		return "version " + *a.VersionValue
	}
	return "<no value>"
}

func sortedKeys(ms ...map[string]string) []string {
	var out []string
	seen := map[string]bool{}
	for _, m := range ms {
		for k := range m {
			if !seen[k] {
				seen[k] = true
				out = append(out, k)
			}
		}
	}
	return sortedStrings(out)
}

func testAllocate(t *testing.T, c *cluster) {
	const node = "alloc-node"
	n := c.createNode(t, node)
	dirs := c.newNodeDirs(t, node)
	p := c.startPlugin(t, node, dirs, pluginOpts{})
	devices := c.waitForSlices(t, p, 45*time.Second)

	t.Run("ForeignGroupNotOffered", func(t *testing.T) {
		if _, ok := devices[demoForeign]; ok {
			t.Errorf("%s (IOMMU group shared with a NIC) is published", demoForeign)
		}
	})

	t.Run("AttributesReadBack", func(t *testing.T) {
		// What the API server stored, compared attribute by attribute and capacity
		// by capacity with the demo host as the suite knows it (demoGPUs): a field
		// dropped by the server, an extra one or a wrong value fails.
		for _, name := range demoOffered {
			d, ok := devices[name]
			if !ok {
				t.Errorf("%s not published", name)
				continue
			}
			g := demoGPUs[name]
			want := g.attributes(name)
			got := map[string]string{}
			for k, a := range d.Attributes {
				got[string(k)] = renderAttribute(a)
			}
			for _, k := range sortedKeys(want, got) {
				if got[k] != want[k] {
					t.Errorf("%s: attribute %s = %q, want %q", name, k, got[k], want[k])
				}
			}
			if len(d.Capacity) != 1 {
				t.Errorf("%s: capacity %v, want only addressableMemory", name, d.Capacity)
			}
			c, ok := d.Capacity["addressableMemory"]
			if !ok || c.Value.Value() != g.barBytes {
				t.Errorf("%s: capacity addressableMemory %v, want %d bytes (its BARs)", name, c.Value.String(), g.barBytes)
			}
		}
	})

	t.Run("ClassAllGetsEveryOfferedGPU", func(t *testing.T) {
		claim := c.newClaim(t, "alloc-all", classAll, 0)
		got := allocatedDevices(c.allocate(t, claim, n))
		if strings.Join(got, ",") != strings.Join(demoOffered, ",") {
			t.Errorf("allocationMode All of %s: %v, want %v", classAll, got, demoOffered)
		}
	})

	t.Run("ClassPreboundGetsOnlyAdminKeptGPUs", func(t *testing.T) {
		claim := c.newClaim(t, "alloc-prebound", classPrebound, 0)
		got := allocatedDevices(c.allocate(t, claim, n))
		if strings.Join(got, ",") != strings.Join(demoPrebound, ",") {
			t.Errorf("allocationMode All of %s: %v, want %v", classPrebound, got, demoPrebound)
		}
	})

	t.Run("ForeignGroupNeverAllocated", func(t *testing.T) {
		// Asking for more GPUs than are offered must fail rather than hand out db:00.0.
		claim := c.newClaim(t, "alloc-eight", classAll, int64(len(demoOffered)+1))
		if res := c.allocate(t, claim, n); res != nil {
			t.Errorf("%d GPUs allocated: %v", len(res.Devices.Results), allocatedDevices(res))
		}
		claim = c.newClaim(t, "alloc-seven", classAll, int64(len(demoOffered)))
		got := allocatedDevices(c.allocate(t, claim, n))
		for _, d := range got {
			if d == demoForeign {
				t.Errorf("allocated %s", demoForeign)
			}
		}
		if len(got) != len(demoOffered) {
			t.Errorf("allocated %v, want all %d offered GPUs", got, len(demoOffered))
		}
	})

	t.Run("KubeVirtTemplateFromDeploy", func(t *testing.T) { testKubeVirtTemplate(t, c, n) })

	t.Run("OtherNodesGPUsNotAllocated", func(t *testing.T) {
		claim := c.newClaim(t, "alloc-one", classAll, 1)
		res := c.allocate(t, claim, n)
		if res == nil || len(res.Devices.Results) != 1 {
			t.Fatalf("one GPU of %s: %v", classAll, allocatedDevices(res))
		}
		if r := res.Devices.Results[0]; r.Pool != node || r.Driver != driverName {
			t.Errorf("allocated %s/%s/%s, want a device of pool %s", r.Driver, r.Pool, r.Device, node)
		}
	})
}
