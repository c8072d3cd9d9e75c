#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! M8: the simulated kernel follows `kernel-vfio.md` where the engine's
//! correctness depends on it: link timing of blocked unbinds and binds,
//! reads that block on `device_lock`, nvidia's unbind lock and procfs
//! directory, remove/rescan, zero-length writes, `/dev/vfio` nodes.

mod common;

use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use vfio_gpu_engine::kernel::{Kernel, SysfsWrite};
use vfio_gpu_engine::sim::{
    BlockHandle, Fault, FaultAction, LockedReads, SimKernel, VfioNodes, errno,
};
use vfio_gpu_host::DriverName;
use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};

fn drv(name: &str) -> DriverName {
    DriverName::new(name).unwrap()
}

fn write(k: &SimKernel, op: SysfsWrite) {
    k.write(&op).unwrap_or_else(|e| panic!("{op}: {e}"));
}

fn override_to(k: &SimKernel, b: &str, d: Option<&str>) {
    write(
        k,
        SysfsWrite::DriverOverride {
            bdf: bdf(b),
            driver: d.map(str::to_string),
        },
    );
}

/// Moves `b` from `from` to vfio-pci (override, unbind, bind).
fn to_vfio(k: &SimKernel, b: &str, from: &str) {
    override_to(k, b, Some("vfio-pci"));
    write(
        k,
        SysfsWrite::Unbind {
            bdf: bdf(b),
            driver: drv(from),
        },
    );
    write(
        k,
        SysfsWrite::Bind {
            bdf: bdf(b),
            driver: drv("vfio-pci"),
        },
    );
}

/// Runs `op` on a thread; the receiver gets its result.
fn spawn_write(k: &SimKernel, op: SysfsWrite) -> mpsc::Receiver<std::io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    let k = k.clone();
    thread::spawn(move || {
        let _ = tx.send(k.write(&op));
    });
    rx
}

fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(5), "never: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, SimKernel) {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    (dir, host, k)
}

fn nvidia_proc(host: &Path, b: &str) -> std::path::PathBuf {
    host.join("proc/driver/nvidia/gpus").join(b)
}

/// (a) `driver_sysfs_remove()` runs before `remove()`: a hung unbind shows
/// the device driverless at once.
#[test]
fn blocked_unbind_removes_the_driver_link_before_blocking() {
    let (_d, host, k) = setup();
    let gate = BlockHandle::new();
    k.inject(Fault::on(
        "unbind",
        bdf(B),
        FaultAction::Block(gate.clone()),
    ));
    let done = spawn_write(
        &k,
        SysfsWrite::Unbind {
            bdf: bdf(B),
            driver: drv("nvidia"),
        },
    );
    eventually("driver link gone during the blocked unbind", || {
        driver_of(&host, B).is_none()
    });
    assert!(done.try_recv().is_err(), "the unbind is still blocked");
    gate.release();
    done.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(driver_of(&host, B), None);
}

/// (a) `really_probe` links the driver before `probe()`: a slow probe shows
/// the device bound, its vfio nodes appear when the probe returns.
#[test]
fn blocked_bind_links_the_driver_before_probe_returns() {
    let (_d, host, k) = setup();
    override_to(&k, B, Some("vfio-pci"));
    write(
        &k,
        SysfsWrite::Unbind {
            bdf: bdf(B),
            driver: drv("nvidia"),
        },
    );
    let gate = BlockHandle::new();
    k.inject(Fault::on("bind", bdf(B), FaultAction::Block(gate.clone())));
    let done = spawn_write(
        &k,
        SysfsWrite::Bind {
            bdf: bdf(B),
            driver: drv("vfio-pci"),
        },
    );
    eventually("driver link during the blocked probe", || {
        driver_of(&host, B).as_deref() == Some("vfio-pci")
    });
    assert!(done.try_recv().is_err(), "the bind is still blocked");
    assert!(!host.join("dev/vfio/12").exists(), "probe has not finished");
    gate.release();
    done.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert!(host.join("dev/vfio/12").exists());
}

/// (b) While an unbind holds `device_lock`, reads of `sriov_numvfs` block,
/// and of `driver_override` on older kernels; the binding read does not
/// block on 6.12 semantics.
#[test]
fn reads_of_device_lock_attributes_block_during_a_hung_unbind() {
    let (_d, host, k) = setup();
    let mut h = FixtureHost::open(&host);
    let g = "0000:70:00.0";
    h.add_function(
        &FunctionSpec::new(bdf(g), 0x10de, 0x2330, 0x030200)
            .driver("nvidia")
            .group(20)
            .sriov(4, 0),
    )
    .unwrap();
    let gate = BlockHandle::new();
    k.inject(Fault::on(
        "unbind",
        bdf(g),
        FaultAction::Block(gate.clone()),
    ));
    let done = spawn_write(
        &k,
        SysfsWrite::Unbind {
            bdf: bdf(g),
            driver: drv("nvidia"),
        },
    );
    eventually("device_lock held", || k.device_locked(bdf(g)));
    // 6.12 semantics: driver_override reads do not take device_lock.
    assert_eq!(k.read_binding(bdf(g)).unwrap().driver, None);
    let (tx, rx) = mpsc::channel();
    let k2 = k.clone();
    thread::spawn(move || {
        let _ = tx.send(k2.read_function(bdf(g)).map(|f| f.driver));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the sriov_numvfs read must block"
    );
    // Older kernels: the override read blocks too.
    k.set_locked_reads(LockedReads {
        driver_override: true,
        sriov_numvfs: true,
    });
    let (tx2, rx2) = mpsc::channel();
    let k3 = k.clone();
    thread::spawn(move || {
        let _ = tx2.send(k3.read_binding(bdf(g)).map(|b| b.driver));
    });
    assert!(rx2.recv_timeout(Duration::from_millis(300)).is_err());
    gate.release();
    done.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap(),
        None
    );
    assert_eq!(
        rx2.recv_timeout(Duration::from_secs(5)).unwrap().unwrap(),
        None
    );
    // Other devices were never blocked.
    assert!(k.read_function(bdf(B)).is_ok());
}

/// (b) An explicit read fault, healed on request.
#[test]
fn read_faults_fail_reads_until_healed() {
    let (_d, _host, k) = setup();
    k.fail_reads(bdf(B), Some(errno::EIO));
    let e = k.read_function(bdf(B)).unwrap_err().to_string();
    assert!(e.contains("injected read fault"), "{e}");
    assert!(k.read_binding(bdf(B)).is_err());
    assert!(k.read_binding(bdf(A)).is_ok());
    k.fail_reads(bdf(B), None);
    assert!(k.read_binding(bdf(B)).is_ok());
}

/// (c) nvidia grants its unbind lock only with no clients; the procfs
/// directory goes with the unbind and comes back (lock released) on bind.
#[test]
fn nvidia_unbind_lock_needs_zero_clients_and_procfs_follows_the_binding() {
    let (_d, host, k) = setup();
    let h = FixtureHost::open(&host);
    h.write("proc/driver/nvidia/gpus/0000:66:00.0/unbindLock", "0\n")
        .unwrap();
    h.write(
        "proc/driver/nvidia/gpus/0000:66:00.0/information",
        "Device Minor: 3\n",
    )
    .unwrap();
    let lock_file = nvidia_proc(&host, B).join("unbindLock");
    let read = || {
        std::fs::read_to_string(&lock_file)
            .unwrap()
            .trim()
            .to_string()
    };
    k.set_clients(bdf(B), 1);
    write(
        &k,
        SysfsWrite::NvidiaUnbindLock {
            bdf: bdf(B),
            take: true,
        },
    );
    assert_eq!(read(), "0", "refused while a client has the GPU open");
    k.set_clients(bdf(B), 0);
    write(
        &k,
        SysfsWrite::NvidiaUnbindLock {
            bdf: bdf(B),
            take: true,
        },
    );
    assert_eq!(read(), "1", "granted with no clients");
    write(
        &k,
        SysfsWrite::Unbind {
            bdf: bdf(B),
            driver: drv("nvidia"),
        },
    );
    assert!(!nvidia_proc(&host, B).exists(), "removed by nv_pci_remove");
    write(
        &k,
        SysfsWrite::Bind {
            bdf: bdf(B),
            driver: drv("nvidia"),
        },
    );
    assert_eq!(read(), "0", "a fresh instance: lock released");
    assert_eq!(
        std::fs::read_to_string(nvidia_proc(&host, B).join("information")).unwrap(),
        "Device Minor: 3\n"
    );
}

/// (c) nvidia's remove() waits while clients hold the GPU (link already gone).
#[test]
fn nvidia_unbind_blocks_while_clients_hold_the_gpu() {
    let (_d, host, k) = setup();
    k.set_clients(bdf(B), 2);
    let done = spawn_write(
        &k,
        SysfsWrite::Unbind {
            bdf: bdf(B),
            driver: drv("nvidia"),
        },
    );
    assert!(done.recv_timeout(Duration::from_millis(300)).is_err());
    assert_eq!(driver_of(&host, B), None);
    assert!(k.device_locked(bdf(B)));
    k.set_clients(bdf(B), 0);
    done.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert!(!k.device_locked(bdf(B)));
}

/// (d) Hot-unplug and rescan: the override is lost and the default rules
/// re-probe (nvidia for B; vfio-pci's command-line dynid for C's model).
#[test]
fn remove_and_rescan_lose_the_override_and_reprobe_by_default_rules() {
    let (_d, host, k) = setup();
    to_vfio(&k, B, "nvidia");
    assert!(host.join("dev/vfio/12").exists());
    k.remove_device(bdf(B)).unwrap();
    assert!(!host.join("sys/bus/pci/devices").join(B).exists());
    assert!(!host.join("dev/vfio/12").exists(), "last vfio member gone");
    assert!(k.read_binding(bdf(B)).is_err() || k.read_function(bdf(B)).is_err());
    k.remove_device(bdf(D)).unwrap();
    assert_eq!(k.rescan().unwrap(), vec![bdf(B), bdf(D)]);
    assert_eq!(state_of(&host, B), (Some("nvidia".into()), None));
    // D (10de:2330) is named by vfio-pci.ids on the command line: vfio-pci wins.
    assert_eq!(state_of(&host, D), (Some("vfio-pci".into()), None));
    assert!(
        host.join("sys/kernel/iommu_groups/12/devices")
            .join(B)
            .exists()
    );
}

/// (e) m21: sysfs drops a zero-length write; "\n" clears.
#[test]
fn zero_length_override_write_is_a_no_op() {
    let (_d, host, k) = setup();
    override_to(&k, B, Some("vfio-pci"));
    override_to(&k, B, Some(""));
    assert_eq!(state_of(&host, B).1.as_deref(), Some("vfio-pci"));
    override_to(&k, B, Some("\n"));
    assert_eq!(state_of(&host, B).1, None);
}

/// (f) Without CONFIG_VFIO_GROUP there is no `/dev/vfio/<group>`; the device
/// cdev appears with the bind and goes with the unbind.
#[test]
fn vfio_nodes_follow_the_kernel_configuration() {
    let (_d, host, k) = setup();
    k.set_vfio_nodes(VfioNodes {
        group: false,
        cdev: true,
    });
    to_vfio(&k, B, "nvidia");
    assert!(!host.join("dev/vfio/12").exists());
    let v = k.read_binding(bdf(B)).unwrap().vfio_dev.unwrap();
    let cdev = host.join("dev/vfio/devices").join(&v);
    assert!(cdev.exists(), "{}", cdev.display());
    write(
        &k,
        SysfsWrite::Unbind {
            bdf: bdf(B),
            driver: drv("vfio-pci"),
        },
    );
    assert!(!cdev.exists());
}
