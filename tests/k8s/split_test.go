package k8s

// More devices than one ResourceSlice may hold (128 without taints or counters):
// the plugin must split its pool, and the real API server must accept every
// slice. The demo host is given 130 more GPUs (copies of its A100 at
// 0000:ba:00.0, each alone in its IOMMU group, on nvidia, so offered) between two
// runs of the plugin on the same demo directory (serve --demo keeps an existing
// host tree).

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const maxDevicesPerSlice = 128 // resource.k8s.io/v1 ResourceSliceMaxDevices

// addDemoGPU adds a copy of the PCI function src of the demo host at root as a
// new root-port device bdf in its own IOMMU group, bound to src's driver.
func addDemoGPU(t *testing.T, root, src, bdf string, group int) {
	t.Helper()
	srcDir, err := filepath.EvalSymlinks(filepath.Join(root, "sys/bus/pci/devices", src))
	if err != nil {
		t.Fatal(err)
	}
	driverLink, err := filepath.EvalSymlinks(filepath.Join(srcDir, "driver"))
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "sys/devices", "pci"+bdf[:7], bdf)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(srcDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(srcDir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	groupDir := filepath.Join(root, "sys/kernel/iommu_groups", fmt.Sprint(group))
	if err := os.MkdirAll(filepath.Join(groupDir, "devices"), 0o755); err != nil {
		t.Fatal(err)
	}
	link := func(at, to string) {
		rel, err := filepath.Rel(filepath.Dir(at), to)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(rel, at); err != nil {
			t.Fatal(err)
		}
	}
	link(filepath.Join(dir, "driver"), driverLink)
	link(filepath.Join(dir, "iommu_group"), groupDir)
	link(filepath.Join(groupDir, "devices", bdf), dir)
	link(filepath.Join(root, "sys/bus/pci/devices", bdf), dir)
	link(filepath.Join(driverLink, bdf), dir)
	// /proc/bus/pci/devices (bus+devfn, no domain): the plugin's vendor pre-filter.
	proc := filepath.Join(root, "proc/bus/pci/devices")
	b, err := os.ReadFile(proc)
	if err != nil {
		t.Fatal(err)
	}
	srcKey, key := src[5:7]+"00\t", bdf[5:7]+"00\t"
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, srcKey) {
			b = append(b, key+strings.TrimPrefix(line, srcKey)+"\n"...)
			break
		}
	}
	if err := os.WriteFile(proc, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func testSliceSplit(t *testing.T, c *cluster) {
	const node = "split-node"
	const extra = 130
	c.createNode(t, node)
	dirs := c.newNodeDirs(t, node)
	p := c.startPlugin(t, node, dirs, pluginOpts{})
	c.waitForSlices(t, p, 45*time.Second)
	p.stop(t)

	want := append([]string(nil), demoOffered...)
	host := filepath.Join(dirs.demoDir, "host")
	for i := 0; i < extra; i++ {
		addDemoGPU(t, host, "0000:ba:00.0", fmt.Sprintf("0001:%02x:00.0", i), 1000+i)
		want = append(want, fmt.Sprintf("gpu-0001-%02x-00-0", i))
	}
	want = sortedStrings(want)

	p = c.startPlugin(t, node, dirs, pluginOpts{})
	var last string
	eventually(t, 60*time.Second, fmt.Sprintf("a complete pool of %d devices on %s", len(want), node), func() (bool, error) {
		if p.exited() {
			t.Fatalf("plugin exited: %v\n%s", p.err, indent(p.logs()))
		}
		slices, err := c.nodeSlices(node)
		if err != nil {
			return false, err
		}
		var gen int64
		for _, s := range slices {
			gen = max(gen, s.Spec.Pool.Generation)
		}
		seen := map[string]string{}
		var sizes []int
		count := int64(-1)
		for _, s := range slices {
			if s.Spec.Pool.Generation != gen {
				continue
			}
			if count >= 0 && s.Spec.Pool.ResourceSliceCount != count {
				return false, fmt.Errorf("slices of generation %d disagree on resourceSliceCount", gen)
			}
			count = s.Spec.Pool.ResourceSliceCount
			sizes = append(sizes, len(s.Spec.Devices))
			for _, d := range s.Spec.Devices {
				if other, dup := seen[d.Name]; dup {
					t.Errorf("device %s in slices %s and %s", d.Name, other, s.Name)
				}
				seen[d.Name] = s.Name
			}
		}
		names := make([]string, 0, len(seen))
		for n := range seen {
			names = append(names, n)
		}
		last = fmt.Sprintf("generation %d: %d slices of %v devices, resourceSliceCount %d", gen, len(sizes), sizes, count)
		if int64(len(sizes)) != count || strings.Join(sortedStrings(names), ",") != strings.Join(want, ",") {
			return false, fmt.Errorf("%s, %d of %d devices", last, len(names), len(want))
		}
		for _, n := range sizes {
			if n > maxDevicesPerSlice {
				t.Errorf("a slice with %d devices", n)
			}
		}
		if count != 2 {
			t.Errorf("%d devices in %d slices, want 2", len(want), count)
		}
		return true, nil
	})
	t.Logf("%s", last)
}
