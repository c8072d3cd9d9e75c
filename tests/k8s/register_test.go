package k8s

// Scenario 2, Register: the kubelet's plugin manager and DRA plugin manager
// register the plugin, pick the service version, notice restarts and deaths, and
// wipe the driver's slices when no plugin is left.

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
	drapbv1beta1 "k8s.io/kubelet/pkg/apis/dra/v1beta1"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// Longer than the kubelet's 30 s wiping delay plus a retry.
const wipeTimeout = 60 * time.Second

func testRegister(t *testing.T, c *cluster) {
	const node = "reg-node"
	c.createNode(t, node)
	dirs := c.newNodeDirs(t, node)
	k := c.startKubelet(t, nil, node, dirs.regDir, dirs.kubeletDir)
	owner := t
	var p *pluginProc

	ok := t.Run("RegistersV1", func(t *testing.T) {
		p = c.startPlugin(t, node, dirs, pluginOpts{owner: owner})
		k.waitRegistered(t, 1, 30*time.Second)
		var reg regEvent
		for _, e := range k.handler.events() {
			if e.op == "register" {
				reg = e
			}
		}
		if reg.name != driverName || reg.endpoint != dirs.draSocket() {
			t.Errorf("registered %q at %q, want %q at %q", reg.name, reg.endpoint, driverName, dirs.draSocket())
		}
		if got := chosenService(k.plugin()); got != drapbv1.DRAPluginService {
			t.Errorf("kubelet chose %q (plugin offered %v), want %q", got, reg.versions, drapbv1.DRAPluginService)
		}
		c.waitForSlices(t, p, 30*time.Second)
		// A call through the kubelet's own client on the registered connection.
		if _, err := k.plugin().NodeUnprepareResources(context.Background(), &drapbv1.NodeUnprepareResourcesRequest{}); err != nil {
			t.Errorf("kubelet NodeUnprepareResources(no claims): %v", err)
		}
	})
	if !ok {
		return
	}

	t.Run("RawPathDial", func(t *testing.T) { testRawPathDial(t, dirs) })

	t.Run("RestartReregisters", func(t *testing.T) {
		p.stop(t)
		eventually(t, 20*time.Second, "deregistration after SIGTERM", func() (bool, error) {
			return k.handler.count("deregister") >= 1, nil
		})
		p = c.startPlugin(t, node, dirs, pluginOpts{owner: owner})
		k.waitRegistered(t, 2, 30*time.Second)
		c.waitForSlices(t, p, 30*time.Second)
		if _, err := k.plugin().NodeUnprepareResources(context.Background(), &drapbv1.NodeUnprepareResourcesRequest{}); err != nil {
			t.Errorf("kubelet call after re-registration: %v", err)
		}
	})

	t.Run("KilledPluginSlicesWiped", func(t *testing.T) {
		// SIGKILL: no cleanup, the sockets stay; the kubelet sees the connection
		// drop and wipes the driver's slices after its wiping delay.
		p.kill()
		start := time.Now()
		eventually(t, wipeTimeout, "the kubelet wiping the slices of the killed plugin", func() (bool, error) {
			s, err := c.nodeSlices(node)
			return err == nil && len(s) == 0, err
		})
		t.Logf("slices wiped %v after SIGKILL", time.Since(start).Round(time.Second))
		// A new plugin replaces the stale sockets, registers and republishes.
		regs := k.handler.count("register")
		p = c.startPlugin(t, node, dirs, pluginOpts{owner: owner})
		k.waitRegistered(t, regs+1, 30*time.Second)
		c.waitForSlices(t, p, 30*time.Second)
	})

	t.Run("StoppedPluginDeregisteredAndWiped", func(t *testing.T) {
		deregs := k.handler.count("deregister")
		p.stop(t)
		eventually(t, 20*time.Second, "deregistration of the stopped plugin", func() (bool, error) {
			return k.handler.count("deregister") > deregs, nil
		})
		eventually(t, 5*time.Second, "the kubelet forgetting the plugin", func() (bool, error) {
			return k.plugin() == nil, nil
		})
		eventually(t, wipeTimeout, "the kubelet wiping the slices of the stopped plugin", func() (bool, error) {
			s, err := c.nodeSlices(node)
			return err == nil && len(s) == 0, err
		})
	})
}

// testRawPathDial dials both sockets the way kubelets 1.32/1.33 (and the plugin
// watcher in every version) do: grpc-go with the raw socket path as target and a
// Unix dialer, so :authority is the percent-encoded path.
func testRawPathDial(t *testing.T, dirs *nodeDirs) {
	dial := func(t *testing.T, path string) *grpc.ClientConn {
		//nolint:staticcheck // grpc.Dial is what the kubelet uses here
		conn, err := grpc.Dial(path,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(ctx context.Context, target string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", target)
			}))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	ctx := func(t *testing.T) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	t.Run("RegistrationSocket", func(t *testing.T) {
		info, err := registerapi.NewRegistrationClient(dial(t, dirs.regSocket())).GetInfo(ctx(t), &registerapi.InfoRequest{})
		if err != nil {
			t.Fatalf("GetInfo over %s: %v", dirs.regSocket(), err)
		}
		if info.Type != registerapi.DRAPlugin || info.Name != driverName {
			t.Errorf("GetInfo = %+v", info)
		}
	})
	t.Run("DRASocketV1beta1", func(t *testing.T) {
		_, err := drapbv1beta1.NewDRAPluginClient(dial(t, dirs.draSocket())).NodeUnprepareResources(ctx(t), &drapbv1beta1.NodeUnprepareResourcesRequest{})
		if err != nil {
			t.Fatalf("v1beta1 NodeUnprepareResources over %s: %v", dirs.draSocket(), err)
		}
	})
	t.Run("DRASocketV1", func(t *testing.T) {
		_, err := drapbv1.NewDRAPluginClient(dial(t, dirs.draSocket())).NodeUnprepareResources(ctx(t), &drapbv1.NodeUnprepareResourcesRequest{})
		if err != nil {
			t.Fatalf("v1 NodeUnprepareResources over %s: %v", dirs.draSocket(), err)
		}
	})
}
