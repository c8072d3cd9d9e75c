#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! Shared fixture for engine tests: a small host with the cases that matter.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{CrashMode, Engine, EngineConfig, Holder};
use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;

pub fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// The ResourceClaim holder `vms/claim-<uid>` with UID `uid`.
pub fn claim(uid: &str) -> Holder {
    Holder::Claim {
        uid: uid.into(),
        namespace: "vms".into(),
        name: format!("claim-{uid}"),
    }
}

/// A state directory whose ledger holds B configured for claim `u1`: the
/// temp directory (keep it alive), the state directory, the ledger's bytes.
pub fn configured_ledger() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let (dir, _host, _k, state, e) = world_and_state();
    e.configure(bdf(B), claim("u1")).unwrap();
    drop(e);
    let bytes = std::fs::read(state.join("ledger.json")).unwrap();
    (dir, state, bytes)
}

/// The standard host ([`build_host`]) in a fresh temporary directory, its
/// simulated kernel, and an engine with its state beside the host: the temp
/// directory (keep it alive), the host root, the kernel, the engine.
pub fn world() -> (tempfile::TempDir, std::path::PathBuf, SimKernel, Engine) {
    let (dir, host, k, _state, e) = world_and_state();
    (dir, host, k, e)
}

/// [`world`] with an engine of this configuration: the temp directory, the
/// host root, the kernel, the engine.
pub fn world_with(
    config: EngineConfig,
) -> (tempfile::TempDir, std::path::PathBuf, SimKernel, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    let e = engine_with(&k, &dir.path().join("state"), config);
    (dir, host, k, e)
}

/// [`world`], also giving the engine's state directory (to reopen an engine
/// on it, or to edit its ledger): the temp directory, the host root, the
/// kernel, the state directory, the engine.
pub fn world_and_state() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    SimKernel,
    std::path::PathBuf,
    Engine,
) {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    let state = dir.path().join("state");
    let e = engine(&k, &state);
    (dir, host, k, state, e)
}

/// GPU A: 0000:65:00.0 VGA on nvidia + 0000:65:00.1 HDA on snd_hda_intel (group 11).
pub const A: &str = "0000:65:00.0";
pub const A_AUDIO: &str = "0000:65:00.1";
/// GPU B: 0000:66:00.0 3D on nvidia (group 12).
pub const B: &str = "0000:66:00.0";
/// GPU C: 0000:67:00.0, 10de:2330, pre-bound to vfio-pci by vfio-pci.ids on the command line (group 13).
pub const C: &str = "0000:67:00.0";
/// GPU D: 0000:68:00.0, 10de:2330, named by vfio-pci.ids but currently on nvidia (group 14).
pub const D: &str = "0000:68:00.0";
/// GPU E: 0000:69:00.0 on nvidia, its group holds a NIC 0000:69:01.0 (group 15).
pub const E: &str = "0000:69:00.0";
/// GPU F: 0000:6a:00.0 with no driver at all (group 16).
pub const F: &str = "0000:6a:00.0";

pub fn build_host(root: &Path) -> FixtureHost {
    let mut h = FixtureHost::create(root).unwrap();
    h.write(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on vfio-pci.ids=10de:2330\n",
    )
    .unwrap();
    for d in ["vfio-pci", "nvidia", "snd_hda_intel", "mlx5_core"] {
        h.add_driver(d).unwrap();
    }
    h.add_function(
        &FunctionSpec::new(bdf(A), 0x10de, 0x26b1, 0x030000)
            .driver("nvidia")
            .group(11)
            .numa(0),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new(bdf(A_AUDIO), 0x10de, 0x22ba, 0x040300)
            .driver("snd_hda_intel")
            .group(11),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new(bdf(B), 0x10de, 0x20b2, 0x030200)
            .driver("nvidia")
            .group(12),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new(bdf(C), 0x10de, 0x2330, 0x030200)
            .driver("vfio-pci")
            .group(13),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new(bdf(D), 0x10de, 0x2330, 0x030200)
            .driver("nvidia")
            .group(14),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new(bdf(E), 0x10de, 0x27b8, 0x030200)
            .driver("nvidia")
            .group(15),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:69:01.0"), 0x15b3, 0x101d, 0x020000)
            .driver("mlx5_core")
            .group(15),
    )
    .unwrap();
    h.add_function(&FunctionSpec::new(bdf(F), 0x10de, 0x20b5, 0x030200).group(16))
        .unwrap();
    h
}

pub fn sim(root: &Path) -> SimKernel {
    let root = HostRoot::open(root).unwrap();
    SimKernel::booted(root)
}

pub fn config() -> EngineConfig {
    EngineConfig {
        crash_mode: CrashMode::Return,
        unbind_lock_backoff: std::time::Duration::from_millis(1),
        state_lock_wait: std::time::Duration::from_secs(5),
        ..EngineConfig::default()
    }
}

pub fn engine_with(kernel: &SimKernel, state: &Path, config: EngineConfig) -> Engine {
    Engine::open(
        Arc::new(kernel.clone()),
        state,
        GpuSelector::default(),
        Policy::default(),
        config,
    )
    .unwrap()
    .0
}

pub fn engine(kernel: &SimKernel, state: &Path) -> Engine {
    engine_with(kernel, state, config())
}

/// (driver, driver_override) of a function as sysfs shows it.
pub fn state_of(root: &Path, b: &str) -> (Option<String>, Option<String>) {
    let root = HostRoot::open(root).unwrap();
    let f = vfio_gpu_host::PciFunction::read(&root, bdf(b)).unwrap();
    (f.driver.map(|d| d.to_string()), f.driver_override)
}

pub fn driver_of(root: &Path, b: &str) -> Option<String> {
    state_of(root, b).0
}

/// An engine whose host programs (`nvidia-smi`, `modprobe`) are `commands`.
pub fn engine_with_commands(
    kernel: &SimKernel,
    state: &Path,
    commands: Arc<dyn vfio_gpu_engine::commands::HostCommands>,
) -> Engine {
    Engine::open_with_commands(
        Arc::new(kernel.clone()),
        commands,
        state,
        GpuSelector::default(),
        Policy::default(),
        config(),
    )
    .unwrap()
    .0
}

/// Makes `pid` look like nvidia-persistenced as the kernel shows it: `comm`
/// truncated to 15 characters (TASK_COMM_LEN - 1), `exe` linking to the
/// binary, `cmdline` with argv[0], and fd 4 open on `dev/nvidia<minor>`.
pub fn add_persistenced_process(host: &Path, pid: u32, minor: u32) {
    let p = host.join(format!("proc/{pid}"));
    std::fs::create_dir_all(p.join("fd")).unwrap();
    std::fs::write(p.join("comm"), "nvidia-persiste\n").unwrap();
    std::fs::write(
        p.join("cmdline"),
        "/usr/bin/nvidia-persistenced\0--user\0nvidia-persistenced\0",
    )
    .unwrap();
    std::os::unix::fs::symlink("/usr/bin/nvidia-persistenced", p.join("exe")).unwrap();
    let node = host.join(format!("dev/nvidia{minor}"));
    if !node.exists() {
        std::fs::write(&node, "").unwrap();
    }
    std::os::unix::fs::symlink(&node, p.join("fd/4")).unwrap();
}

/// Gives the function at `b` (on nvidia) the device minor `minor`, as
/// `/proc/driver/nvidia/gpus/<b>/information` reports it, and its `/dev/nvidia<minor>`.
pub fn add_nvidia_minor(h: &FixtureHost, b: &str, minor: u32) {
    h.write(
        &format!("proc/driver/nvidia/gpus/{b}/information"),
        &format!("Device Minor: {minor}\n"),
    )
    .unwrap();
    h.write(&format!("dev/nvidia{minor}"), "").unwrap();
}

/// nvidia's unbind lock file of B, under the host root.
pub const B_UNBIND_LOCK: &str = "proc/driver/nvidia/gpus/0000:66:00.0/unbindLock";

/// The fixture host with B offering nvidia's unbind lock (released), its
/// simulated kernel, and the temp dir holding both.
pub fn host_with_b_unbind_lock() -> (tempfile::TempDir, std::path::PathBuf, SimKernel) {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let h = build_host(&host);
    h.write(B_UNBIND_LOCK, "0\n").unwrap();
    let k = sim(&host);
    (dir, host, k)
}

/// The fixture host with B driverless and its `drivers_probe` held at the
/// returned gate (a probe that takes long, as nvidia's with NVLink training).
pub fn host_with_b_probe_held() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    SimKernel,
    vfio_gpu_engine::sim::BlockHandle,
) {
    use vfio_gpu_engine::kernel::WriteKind;
    use vfio_gpu_engine::sim::{BlockHandle, Fault, FaultAction};
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let h = build_host(&host);
    h.unlink_driver(bdf(B)).unwrap();
    let k = sim(&host);
    let gate = BlockHandle::new();
    k.inject(Fault::on(
        WriteKind::DriversProbe,
        bdf(B),
        FaultAction::Block(gate.clone()),
    ));
    (dir, host, k, gate)
}

/// The simulator's log entries, built from the short names tests use, so a
/// test compares [`vfio_gpu_engine::kernel::SysfsWrite`] values, not text.
pub mod write {
    use vfio_gpu_engine::kernel::SysfsWrite;
    use vfio_gpu_host::DriverName;

    use super::bdf;

    fn driver(name: &str) -> DriverName {
        DriverName::new(name).unwrap()
    }

    /// `drivers/<driver>/bind` ← `b`.
    pub fn bind(b: &str, to: &str) -> SysfsWrite {
        SysfsWrite::Bind {
            bdf: bdf(b),
            driver: driver(to),
        }
    }

    /// `drivers/<driver>/unbind` ← `b`.
    pub fn unbind(b: &str, from: &str) -> SysfsWrite {
        SysfsWrite::Unbind {
            bdf: bdf(b),
            driver: driver(from),
        }
    }

    /// `reset` ← 1 on `b`.
    pub fn reset(b: &str) -> SysfsWrite {
        SysfsWrite::Reset { bdf: bdf(b) }
    }

    /// `drivers_probe` ← `b`.
    pub fn probe(b: &str) -> SysfsWrite {
        SysfsWrite::DriversProbe { bdf: bdf(b) }
    }

    /// `driver_override` of `b` ← `to` (`None` clears).
    pub fn driver_override(b: &str, to: Option<&str>) -> SysfsWrite {
        SysfsWrite::DriverOverride {
            bdf: bdf(b),
            driver: to.map(str::to_string),
        }
    }

    /// nvidia's `unbindLock` of `b` ← take (`true`) or release.
    pub fn unbind_lock(b: &str, take: bool) -> SysfsWrite {
        SysfsWrite::NvidiaUnbindLock { bdf: bdf(b), take }
    }
}
