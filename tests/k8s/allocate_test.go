package k8s

// Scenario 3, Allocate: the scheduler's allocator, with the real CEL environment,
// over the plugin's published slices and the DeviceClasses of deploy/.

import (
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
		// What the API server stored (gated fields silently dropped would show here).
		for _, name := range demoOffered {
			d, ok := devices[name]
			if !ok {
				t.Errorf("%s not published", name)
				continue
			}
			bdf := strings.ReplaceAll(strings.TrimPrefix(name, "gpu-"), "-", ":")
			bdf = bdf[:len(bdf)-2] + "." + bdf[len(bdf)-1:]
			if a := d.Attributes["resource.kubernetes.io/pciBusID"]; a.StringValue == nil || *a.StringValue != bdf {
				t.Errorf("%s: pciBusID %v, want %s", name, a.StringValue, bdf)
			}
			if a, ok := d.Attributes["keepOnVfio"]; !ok || a.BoolValue == nil {
				t.Errorf("%s: no keepOnVfio attribute", name)
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
