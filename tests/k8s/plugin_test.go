package k8s

// The product under test: the real `vfio-gpu-dra serve --demo` binary, one process
// per node, on its real Unix sockets, authenticated with its ServiceAccount token.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
)

// nodeDirs are the host directories of one simulated node.
type nodeDirs struct {
	dir        string // everything of this node lives below
	regDir     string // kubelet plugins_registry
	pluginsDir string // kubelet plugins
	cdiDir     string // /var/run/cdi
	demoDir    string // the simulated host (sysfs, ledger)
	kubeletDir string // the kubelet DRA manager's state (checkpoint)
}

func (c *cluster) newNodeDirs(t *testing.T, node string) *nodeDirs {
	t.Helper()
	dir, err := os.MkdirTemp(c.root, "n")
	if err != nil {
		t.Fatal(err)
	}
	d := &nodeDirs{
		dir:        dir,
		regDir:     filepath.Join(dir, "reg"),
		pluginsDir: filepath.Join(dir, "plugins"),
		cdiDir:     filepath.Join(dir, "cdi"),
		demoDir:    filepath.Join(dir, "demo"),
		kubeletDir: filepath.Join(dir, "kubelet"),
	}
	for _, p := range []string{d.regDir, d.pluginsDir, d.cdiDir, d.kubeletDir} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

func (d *nodeDirs) draSocket() string { return filepath.Join(d.pluginsDir, driverName, "dra.sock") }
func (d *nodeDirs) regSocket() string { return filepath.Join(d.regDir, driverName+"-reg.sock") }

// hostDriver is the driver a PCI function of the demo host is bound to ("" = none).
func (d *nodeDirs) hostDriver(t *testing.T, bdf string) string {
	t.Helper()
	link, err := os.Readlink(filepath.Join(d.demoDir, "host", "sys", "bus", "pci", "devices", bdf, "driver"))
	if os.IsNotExist(err) {
		return ""
	}
	if err != nil {
		t.Fatalf("demo host %s: %v", bdf, err)
	}
	return filepath.Base(link)
}

type pluginProc struct {
	node string
	dirs *nodeDirs
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

type pluginOpts struct {
	token string   // bearer token; default: a driver token bound to a pod on the node
	args  []string // extra serve flags
	// owner is the test whose end stops the plugin (default: the calling test);
	// a subtest can start a plugin that outlives it.
	owner *testing.T
}

// startPlugin runs `vfio-gpu-dra serve --demo` for node.
func (c *cluster) startPlugin(t *testing.T, node string, dirs *nodeDirs, o pluginOpts) *pluginProc {
	t.Helper()
	if o.token == "" {
		o.token = c.driverToken(t, node)
	}
	kubeconfig := filepath.Join(dirs.dir, "kubeconfig")
	c.writeKubeconfig(t, kubeconfig, o.token)
	logPath := filepath.Join(dirs.dir, fmt.Sprintf("plugin-%d.log", time.Now().UnixNano()))
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"serve", "--demo", "--demo-dir", dirs.demoDir,
		"--node-name", node,
		"--kubeconfig", kubeconfig,
		"--kubelet-registrar-dir", dirs.regDir,
		"--kubelet-plugins-dir", dirs.pluginsDir,
		"--cdi-root", dirs.cdiDir,
		"--policy", filepath.Join(dirs.dir, "no-policy.toml"),
	}
	args = append(args, o.args...)
	cmd := exec.Command(c.bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// A killed or timed-out test binary takes its plugins with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// Nothing of the plugin's configuration comes from the CI environment: the
	// flags above are the only source (clap would read NODE_NAME, KUBECONFIG, ...).
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "KUBECONFIG" || k == "NODE_NAME" || strings.HasPrefix(k, "VFIO_GPU_DRA_") {
			continue
		}
		cmd.Env = append(cmd.Env, kv)
	}
	// K8S_PLUGIN_LOG (e.g. debug, for the prepare phase timings) overrides the level.
	level := "info"
	if v := os.Getenv("K8S_PLUGIN_LOG"); v != "" {
		level = v
	}
	cmd.Env = append(cmd.Env, "VFIO_GPU_DRA_LOG="+level, "RUST_BACKTRACE=1", "NO_COLOR=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &pluginProc{node: node, dirs: dirs, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	owner := o.owner
	if owner == nil {
		owner = t
	}
	owner.Cleanup(func() {
		p.stop(owner)
		// RBAC and the admission policy must allow everything the plugin does.
		if b, _ := os.ReadFile(p.log); strings.Contains(string(b), "Forbidden") || strings.Contains(string(b), "forbidden") {
			owner.Errorf("the API server refused the plugin on %s a request (RBAC or admission policy)", node)
		}
		if owner.Failed() {
			owner.Logf("plugin log (%s):\n%s", node, indent(p.logs()))
		}
	})
	return p
}

func (p *pluginProc) logs() string {
	b, _ := os.ReadFile(p.log)
	s := string(b)
	if len(s) > 8000 {
		s = "...\n" + s[len(s)-8000:]
	}
	return s
}

func (p *pluginProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM (what the kubelet sends a pod) and waits for the exit.
func (p *pluginProc) stop(t *testing.T) {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		t.Errorf("plugin on %s did not stop within 15s of SIGTERM", p.node)
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// kill sends SIGKILL: no cleanup runs, the sockets stay behind.
func (p *pluginProc) kill() {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// nodeSlices lists the driver's slices of node as the admin sees them.
func (c *cluster) nodeSlices(node string) ([]resourceapi.ResourceSlice, error) {
	sel := fields.Set{resourceapi.ResourceSliceSelectorNodeName: node, resourceapi.ResourceSliceSelectorDriver: driverName}
	l, err := c.client.ResourceV1().ResourceSlices().List(context.Background(), metav1.ListOptions{FieldSelector: sel.String()})
	if err != nil {
		return nil, err
	}
	return l.Items, nil
}

// waitForSlices waits until the plugin's pool of node is complete (all
// resourceSliceCount slices of the newest generation) and returns its devices by name.
func (c *cluster) waitForSlices(t *testing.T, p *pluginProc, timeout time.Duration) map[string]resourceapi.Device {
	t.Helper()
	var devices map[string]resourceapi.Device
	eventually(t, timeout, "ResourceSlices of node "+p.node, func() (bool, error) {
		if p.exited() {
			t.Fatalf("plugin on %s exited: %v\n%s", p.node, p.err, indent(p.logs()))
		}
		slices, err := c.nodeSlices(p.node)
		if err != nil || len(slices) == 0 {
			return false, err
		}
		var gen int64
		for _, s := range slices {
			gen = max(gen, s.Spec.Pool.Generation)
		}
		devices = map[string]resourceapi.Device{}
		n := int64(0)
		for _, s := range slices {
			if s.Spec.Pool.Generation != gen {
				continue
			}
			n++
			if n == 1 && s.Spec.Pool.ResourceSliceCount < 1 {
				return false, fmt.Errorf("resourceSliceCount %d", s.Spec.Pool.ResourceSliceCount)
			}
			for _, d := range s.Spec.Devices {
				devices[d.Name] = d
			}
			if n == s.Spec.Pool.ResourceSliceCount && len(devices) > 0 {
				return true, nil
			}
		}
		return false, nil
	})
	return devices
}

func deviceNames(m map[string]resourceapi.Device) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return sortedStrings(out)
}

func sortedStrings(s []string) []string {
	out := append([]string(nil), s...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] < out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}
