//! A simulated kernel on a fixture tree, following
//! `kernel-vfio.md`: it changes the same `driver` links, `vfio-dev/` entries
//! and `/dev/vfio/<group>` nodes the real driver core changes, so the host
//! model reads the result with the code it uses on a node.
//!
//! Modelled: override-only matching of vfio-pci and its dynamic ids (from
//! the command line and modprobe.d), `driver_override` beating ID tables,
//! `bind` errors (ENODEV, EBUSY, EINVAL), `drivers_probe` succeeding while
//! binding nothing, group viability against a VFIO user, unbind blocking
//! while a VM holds the group or (host drivers) while clients hold the
//! device, `device_lock` held for a whole bind or unbind (so reads of
//! `sriov_numvfs`, and of `driver_override` on older kernels, block), the
//! `driver` link removed before `remove()` and created before `probe()`,
//! nvidia's unbind lock and `/proc/driver/nvidia/gpus/<BDF>`, zero-length
//! writes dropped, device remove and rescan, and the `/dev/vfio` nodes.
//! Faults: a failing write, a write that blocks until released, latency per
//! operation and driver, a failing read. Resets: `reset` takes `device_lock`,
//! fails with ENOENT on a device without a reset method, and can leave a
//! degraded link, another device id or lost BARs behind ([`ResetEffect`]).

// The simulator is the kernel: it lays out and changes the fixture tree
// with std; what the engine reads goes through `edge_root`.
#![allow(clippy::disallowed_methods)]

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vfio_gpu_host::fixture::{FixtureHost, rel_symlink};
use vfio_gpu_host::{Bdf, Binding, HostError, HostRoot, PciFunction, ReadGate, is_vfio_driver};

use vfio_gpu_intent::IdEntry;

use crate::kernel::{Kernel, SysfsWrite, WriteKind};

/// errno values the simulated kernel returns, as the real one does.
pub mod errno {
    /// No such device / no match / override names another driver.
    pub const ENODEV: i32 = 19;
    /// Already bound; VFs enabled; group owned by a VFIO user.
    pub const EBUSY: i32 = 16;
    /// vfio-pci probe of a bridge or a device without IOMMU group.
    pub const EINVAL: i32 = 22;
    /// Probe deferred.
    pub const EAGAIN: i32 = 11;
    /// Generic I/O error.
    pub const EIO: i32 = 5;
}

/// One entry of a driver's ID table: `None` fields match anything.
#[derive(Clone, Debug, Default)]
pub struct IdRule {
    /// Vendor.
    pub vendor: Option<u16>,
    /// Device.
    pub device: Option<u16>,
    /// `(class, mask)`.
    pub class: Option<(u32, u32)>,
}

impl IdRule {
    fn matches(&self, f: &PciFunction) -> bool {
        self.vendor.is_none_or(|v| v == f.identity.vendor)
            && self.device.is_none_or(|d| d == f.identity.device)
            && self
                .class
                .is_none_or(|(c, m)| (f.identity.class ^ c) & m == 0)
    }
}

#[derive(Clone, Debug)]
struct SimDriver {
    name: String,
    id_table: Vec<IdRule>,
    dynids: Vec<IdEntry>,
    /// Drivers that manage DMA themselves keep a group viable (§6).
    dma_managed: bool,
}

/// What an injected fault does.
#[derive(Clone, Debug)]
pub enum FaultAction {
    /// The write fails with this errno.
    Fail(i32),
    /// The write blocks until [`BlockHandle::release`], then proceeds. An
    /// unbind blocks in the driver's `remove()` (the `driver` link is
    /// already gone, `device_lock` held); a bind blocks in `probe()` (the
    /// link already exists); other writes block before they apply.
    Block(BlockHandle),
    /// `drivers_probe` reports success and binds nothing.
    ProbeBindsNothing,
}

/// Releases a blocked write.
#[derive(Clone, Debug, Default)]
pub struct BlockHandle {
    inner: Arc<(Mutex<bool>, Condvar)>,
    waiting: Arc<AtomicUsize>,
}

impl BlockHandle {
    /// A new, closed gate.
    pub fn new() -> Self {
        Self::default()
    }
    /// Lets the blocked write go on.
    pub fn release(&self) {
        let (m, c) = &*self.inner;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        c.notify_all();
    }
    /// Whether a write is held at the gate now.
    pub fn is_holding(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }
    pub(crate) fn wait(&self) {
        let (m, c) = &*self.inner;
        let mut open = m.lock().unwrap_or_else(|p| p.into_inner());
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while !*open {
            open = c.wait(open).unwrap_or_else(|p| p.into_inner());
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A fault rule: the `nth` (0-based) matching write gets `action`.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Which kind of write it hits, or any.
    pub kind: Option<WriteKind>,
    /// Device, or any.
    pub bdf: Option<Bdf>,
    /// For bind/unbind: the driver, or any.
    pub driver: Option<String>,
    /// Skip this many matching writes first.
    pub nth: usize,
    /// What happens.
    pub action: FaultAction,
}

impl Fault {
    /// A fault on the first matching write of `kind` on `bdf`.
    pub fn on(kind: WriteKind, bdf: Bdf, action: FaultAction) -> Self {
        Fault {
            kind: Some(kind),
            bdf: Some(bdf),
            driver: None,
            nth: 0,
            action,
        }
    }
    fn matches(&self, op: &SysfsWrite) -> bool {
        let driver = match op {
            SysfsWrite::Bind { driver, .. } | SysfsWrite::Unbind { driver, .. } => {
                Some(driver.as_str())
            }
            _ => None,
        };
        self.kind.is_none_or(|k| k == op.kind())
            && self.bdf.is_none_or(|b| b == op.bdf())
            && self
                .driver
                .as_deref()
                .is_none_or(|d| driver.is_some_and(|x| x == d))
    }
}

/// Which per-device attributes take `device_lock` when read, so a read
/// blocks while a bind or unbind of that device is in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockedReads {
    /// `driver_override` (kernels before the driver-core rework, §5.3:
    /// RHEL 9, Ubuntu 22.04/24.04, Debian 12).
    pub driver_override: bool,
    /// `sriov_numvfs` (since "PCI/IOV: Serialize sysfs sriov_numvfs reads vs writes").
    pub sriov_numvfs: bool,
}

impl Default for LockedReads {
    /// `sriov_numvfs` locks, `driver_override` does not (6.12 behaviour).
    fn default() -> Self {
        LockedReads {
            driver_override: false,
            sriov_numvfs: true,
        }
    }
}

/// Which `/dev/vfio` nodes a vfio bind creates (§8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfioNodes {
    /// `/dev/vfio/<group>` (`CONFIG_VFIO_GROUP`).
    pub group: bool,
    /// `/dev/vfio/devices/vfioN` (`CONFIG_VFIO_DEVICE_CDEV`).
    pub cdev: bool,
}

impl Default for VfioNodes {
    fn default() -> Self {
        VfioNodes {
            group: true,
            cdev: true,
        }
    }
}

/// A device taken off the bus by [`SimKernel::remove_device`].
struct Removed {
    /// Its directory under `sys/devices`.
    dir: PathBuf,
    /// Where the directory waits for the rescan.
    stash: PathBuf,
    group: Option<u32>,
}

#[derive(Default)]
struct SimState {
    drivers: Vec<SimDriver>,
    faults: Vec<Fault>,
    latency: HashMap<(WriteKind, String), Duration>,
    vfio_users: HashSet<u32>,
    /// Every write attempted, in order (failed and blocked ones too).
    log: Vec<SysfsWrite>,
    /// Open clients of a device on its host driver (nvidia usage count,
    /// `/dev/snd` openers): its unbind waits for them, nvidia refuses its
    /// unbind lock while any exist.
    clients: HashMap<Bdf, u32>,
    /// Devices whose `device_lock` a bind or unbind holds (a count: the
    /// driver core serialises, but the sim must not lose track).
    device_locked: HashMap<Bdf, u32>,
    locked_reads: LockedReads,
    read_faults: HashMap<Bdf, i32>,
    vfio_nodes: VfioNodes,
    /// `/proc/driver/nvidia/gpus/<BDF>` files of unbound GPUs, recreated on bind.
    nvidia_proc: HashMap<Bdf, Vec<(std::ffi::OsString, Vec<u8>)>>,
    removed: HashMap<Bdf, Removed>,
    /// What the next successful `reset` of a device does to it.
    after_reset: HashMap<Bdf, ResetEffect>,
    /// Devices without any reset method (no `reset` attribute).
    no_reset: HashSet<Bdf>,
    /// Successful resets per device.
    resets: HashMap<Bdf, u32>,
    /// Devices reset while a VFIO user had their group open (a tenant's GPU
    /// reset under it): the engine must never cause one.
    reset_under_user: Vec<Bdf>,
}

/// What a simulated `reset` leaves behind besides a clean device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetEffect {
    /// The link retrains below its maximum (`current_link_speed`/`width`).
    DegradedLink {
        /// Speed it comes back at, e.g. `2.5 GT/s PCIe`.
        speed: String,
        /// Width it comes back at.
        width: u32,
    },
    /// Config space answers with another device id (a GPU that fell back to
    /// its recovery personality, or a different card behind the slot).
    ChangedDeviceId(u16),
    /// The BARs are gone (`resource` reads all zero).
    LostBars,
}

/// Faults on host reads by path prefix (procfs, `/dev/vfio`, driver
/// directories, intent files, module indexes, the `/proc` holder scan): fail
/// with an errno or block. The gate of the edge root: every read made
/// through it, by any crate, passes here.
#[derive(Debug, Default)]
struct PathFaults {
    faults: Mutex<Vec<(PathBuf, FaultAction)>>,
    /// Every path read through the edge, when a test asked to see them.
    seen: Mutex<Option<Vec<PathBuf>>>,
}

impl PathFaults {
    fn lock(&self) -> MutexGuard<'_, Vec<(PathBuf, FaultAction)>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ReadGate for PathFaults {
    fn before_read(&self, path: &Path) -> io::Result<()> {
        if let Some(seen) = self.seen.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            seen.push(path.to_path_buf());
        }
        let action = self
            .lock()
            .iter()
            .find(|(p, _)| path.starts_with(p))
            .map(|(_, a)| a.clone());
        match action {
            Some(FaultAction::Fail(code)) => Err(err(
                code,
                format!("injected read fault on {}", path.display()),
            )),
            Some(FaultAction::Block(h)) => {
                h.wait();
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The simulated kernel. Cheap to clone (shared state).
#[derive(Clone)]
pub struct SimKernel {
    /// The fixture tree as the simulation itself changes it (never gated).
    tree: HostRoot,
    /// The same tree as the engine reads it through the kernel edge: every
    /// read first passes the path faults.
    edge_root: HostRoot,
    path_faults: Arc<PathFaults>,
    fixture: FixtureHost,
    state: Arc<Mutex<SimState>>,
    /// Signalled whenever VFIO users, clients or device locks change.
    users_changed: Arc<Condvar>,
    /// Every write is also appended here (one line each), so processes sharing
    /// one demo host leave one log.
    log_file: Option<Arc<PathBuf>>,
}

fn err(code: i32, what: String) -> io::Error {
    let e = io::Error::from_raw_os_error(code);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl SimKernel {
    /// A simulated kernel over the fixture at `root`, with the ID tables of
    /// common drivers for every driver directory present, and vfio-pci's
    /// dynamic ids taken from `vfio_ids` (as the kernel or kmod applied them
    /// at boot).
    pub fn new(root: HostRoot, vfio_ids: &[IdEntry]) -> Self {
        let fixture = FixtureHost::open(root.path());
        let mut state = SimState::default();
        let mut names: Vec<String> = fs::read_dir(root.pci_drivers_dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        // vfio-pci registers early (the race pre-binding relies on).
        names.sort_by_key(|n| (!is_vfio_driver(n), n.clone()));
        for name in names {
            let id_table = default_id_table(&name);
            state.drivers.push(SimDriver {
                dynids: if is_vfio_driver(&name) {
                    vfio_ids.to_vec()
                } else {
                    Vec::new()
                },
                dma_managed: is_vfio_driver(&name) || name == "pci-stub" || name == "pcieport",
                name,
                id_table,
            });
        }
        let path_faults = Arc::new(PathFaults::default());
        let edge_root = root.clone().with_read_gate(path_faults.clone());
        SimKernel {
            tree: root,
            edge_root,
            path_faults,
            fixture,
            state: Arc::new(Mutex::new(state)),
            users_changed: Arc::new(Condvar::new()),
            log_file: None,
        }
    }

    /// Also appends every write to `path` (created if missing), one line per
    /// write in a single `O_APPEND` write, so several processes on one demo
    /// host interleave whole lines. Failing appends are ignored: the log is
    /// for people and tests, not for the simulation.
    pub fn with_log_file(mut self, path: PathBuf) -> Self {
        self.log_file = Some(Arc::new(path));
        self
    }

    fn append_log(&self, line: &str) {
        use std::io::Write;
        let Some(path) = &self.log_file else { return };
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path.as_path());
        if let Ok(mut f) = file {
            // The log is for people and tests, not the simulation (see above).
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }

    /// A simulated kernel as the host booted: vfio-pci's dynamic ids are
    /// the `ids=` the kernel (built-in) or kmod (module) applied, from the
    /// host's command line and modprobe configuration.
    pub fn booted(root: HostRoot) -> Self {
        let ids = boot_vfio_ids(&root);
        Self::new(root, &ids)
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers (or replaces) a driver with an ID table, creating its directory.
    pub fn register_driver(&self, name: &str, id_table: Vec<IdRule>) -> io::Result<()> {
        self.fixture.add_driver(name)?;
        let mut s = self.lock();
        s.drivers.retain(|d| d.name != name);
        s.drivers.push(SimDriver {
            name: name.to_string(),
            id_table,
            dynids: Vec::new(),
            dma_managed: is_vfio_driver(name) || name == "pci-stub" || name == "pcieport",
        });
        Ok(())
    }

    /// Unregisters a driver (module unloaded): its directory disappears.
    pub fn unload_driver(&self, name: &str) -> io::Result<()> {
        self.lock().drivers.retain(|d| d.name != name);
        fs::remove_dir_all(self.tree.pci_drivers_dir().join(name))
    }

    /// Adds a fault rule.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Removes every pending fault rule.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
        self.path_faults.lock().clear();
    }

    /// Every host read (other than a function's attributes) of a path under
    /// `prefix` (relative to the host root, e.g. `proc/*` for the holder
    /// scan, `proc/driver/nvidia/gpus/<BDF>` for nvidia's procfs) gets `action`:
    /// `Fail(errno)` (EMFILE, ENOMEM, EIO...) or `Block` until released.
    pub fn fault_reads_under(&self, prefix: &str, action: FaultAction) {
        let path = self.tree.rel(prefix);
        self.path_faults.lock().push((path, action));
    }

    /// Removes every read fault set by [`SimKernel::fault_reads_under`]
    /// (write faults stay).
    pub fn clear_read_faults(&self) {
        self.path_faults.lock().clear();
    }

    /// Starts recording every path the engine reads through the kernel edge
    /// (see [`SimKernel::reads`]).
    pub fn record_reads(&self) {
        *self
            .path_faults
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
    }

    /// The paths read through the kernel edge since [`SimKernel::record_reads`],
    /// relative to the host root, in order (empty when not recording).
    pub fn reads(&self) -> Vec<PathBuf> {
        let seen = self
            .path_faults
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        seen.into_iter()
            .map(|p| {
                p.strip_prefix(self.tree.path())
                    .map(Path::to_path_buf)
                    .unwrap_or(p)
            })
            .collect()
    }

    /// Applies a path fault to a read of `path`, if one matches.
    fn gate_path(&self, path: &Path) -> Result<(), HostError> {
        self.path_faults
            .before_read(path)
            .map_err(|source| HostError::Io {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Sets the time a kind of write (an unbind, a bind) takes for a driver.
    pub fn set_latency(&self, kind: WriteKind, driver: &str, latency: Duration) {
        self.lock()
            .latency
            .insert((kind, driver.to_string()), latency);
    }

    /// A VFIO user (a VM) opens or closes an IOMMU group.
    pub fn set_vfio_user(&self, group: u32, open: bool) {
        let mut s = self.lock();
        if open {
            s.vfio_users.insert(group);
        } else {
            s.vfio_users.remove(&group);
        }
        drop(s);
        self.users_changed.notify_all();
    }

    /// Every write attempted, in order, as values (failed and blocked ones
    /// too); each renders for people with `Display`.
    pub fn log(&self) -> Vec<SysfsWrite> {
        self.lock().log.clone()
    }

    /// How many writes [`SimKernel::log`] holds, without copying it.
    pub fn log_len(&self) -> usize {
        self.lock().log.len()
    }

    /// The writes logged after the first `from`.
    pub fn log_since(&self, from: usize) -> Vec<SysfsWrite> {
        let s = self.lock();
        s.log
            .get(from..)
            .map(<[SysfsWrite]>::to_vec)
            .unwrap_or_default()
    }

    /// Sets how many clients hold `bdf` open on its host driver (CUDA
    /// programs, nvidia-persistenced, a sound server on `/dev/snd`): an
    /// unbind from a non-vfio driver waits until they are gone, and nvidia
    /// refuses its unbind lock while any exist.
    pub fn set_clients(&self, bdf: Bdf, clients: u32) {
        let mut s = self.lock();
        if clients == 0 {
            s.clients.remove(&bdf);
        } else {
            s.clients.insert(bdf, clients);
        }
        drop(s);
        self.users_changed.notify_all();
    }

    /// Chooses which attribute reads take `device_lock` (kernel version).
    pub fn set_locked_reads(&self, reads: LockedReads) {
        self.lock().locked_reads = reads;
    }

    /// Makes every read of `bdf` through the [`Kernel`] trait fail with
    /// `errno` (EIO from a device that fell off the bus…); `None` heals it.
    pub fn fail_reads(&self, bdf: Bdf, errno: Option<i32>) {
        let mut s = self.lock();
        match errno {
            Some(e) => s.read_faults.insert(bdf, e),
            None => s.read_faults.remove(&bdf),
        };
    }

    /// Chooses which `/dev/vfio` nodes a vfio bind creates.
    pub fn set_vfio_nodes(&self, nodes: VfioNodes) {
        self.lock().vfio_nodes = nodes;
    }

    /// The next successful `reset` of `bdf` leaves `effect` behind.
    pub fn on_reset(&self, bdf: Bdf, effect: ResetEffect) {
        self.lock().after_reset.insert(bdf, effect);
    }

    /// `bdf` has no reset method at all (no `reset` attribute): a reset
    /// write fails with ENOENT.
    pub fn without_reset(&self, bdf: Bdf) {
        self.lock().no_reset.insert(bdf);
    }

    /// Successful resets of `bdf` so far.
    pub fn resets(&self, bdf: Bdf) -> u32 {
        self.lock().resets.get(&bdf).copied().unwrap_or(0)
    }

    /// Devices reset while a VFIO user held their group, in order.
    pub fn resets_under_a_user(&self) -> Vec<Bdf> {
        self.lock().reset_under_user.clone()
    }

    /// Writes the link attributes of `bdf` (`current_`/`max_link_speed`,
    /// `current_`/`max_link_width`) as a PCIe endpoint shows them.
    pub fn set_link(&self, bdf: Bdf, speed: &str, width: u32) -> io::Result<()> {
        for (name, value) in [
            ("current_link_speed", speed.to_string()),
            ("max_link_speed", speed.to_string()),
            ("current_link_width", width.to_string()),
            ("max_link_width", width.to_string()),
        ] {
            fs::write(self.tree.pci_attr(&bdf, name), format!("{value}\n"))?;
        }
        Ok(())
    }

    /// True while a bind or unbind of `bdf` holds its `device_lock`.
    pub fn device_locked(&self, bdf: Bdf) -> bool {
        self.lock().device_locked.contains_key(&bdf)
    }

    /// Hot-unplug (or `remove`, Xid 79): the driver is unbound without
    /// waiting, and the device disappears from sysfs with its
    /// `driver_override`. [`SimKernel::rescan`] brings it back.
    pub fn remove_device(&self, bdf: Bdf) -> io::Result<()> {
        let f = self.read(bdf)?;
        let dir = fs::canonicalize(self.tree.pci_device_dir(&bdf))?;
        if let Some(d) = &f.driver {
            self.fixture.unlink_driver(bdf)?;
            self.after_unbind(&f, d.as_str())?;
        }
        let stash_dir = self.tree.rel(".sim-removed");
        fs::create_dir_all(&stash_dir)?;
        let stash = stash_dir.join(bdf.dashed());
        fs::rename(&dir, &stash)?;
        fs::remove_file(self.tree.pci_device_dir(&bdf))?;
        if let Some(g) = f.iommu_group {
            // The fixture may not have listed it in its group; gone either way.
            let _ = fs::remove_file(self.tree.iommu_group_devices_dir(g).join(bdf.to_string()));
        }
        let mut s = self.lock();
        s.clients.remove(&bdf);
        s.removed.insert(
            bdf,
            Removed {
                dir,
                stash,
                group: f.iommu_group,
            },
        );
        Ok(())
    }

    /// Rescan: every removed device comes back with its override unset
    /// (`(null)`) and is probed by the default rules (ID tables and dynids),
    /// as `echo 1 > /sys/bus/pci/rescan` does. Returns the re-added devices.
    pub fn rescan(&self) -> io::Result<Vec<Bdf>> {
        let removed: Vec<(Bdf, Removed)> = self.lock().removed.drain().collect();
        let mut added = Vec::new();
        for (bdf, r) in removed {
            fs::rename(&r.stash, &r.dir)?;
            // A new struct device: the override is gone, no driver, no vfio-dev.
            fs::write(r.dir.join("driver_override"), "(null)\n")?;
            // Absent when it had no driver: removing is all that is asked.
            let _ = fs::remove_file(r.dir.join("driver"));
            let _ = fs::remove_dir_all(r.dir.join("vfio-dev"));
            rel_symlink(&r.dir, &self.tree.pci_device_dir(&bdf))?;
            if let Some(g) = r.group {
                rel_symlink(
                    &r.dir,
                    &self.tree.iommu_group_devices_dir(g).join(bdf.to_string()),
                )?;
            }
            self.do_write(&SysfsWrite::DriversProbe { bdf }, None, None)?;
            added.push(bdf);
        }
        added.sort();
        Ok(added)
    }

    fn take_fault(&self, op: &SysfsWrite) -> Option<FaultAction> {
        let mut s = self.lock();
        let mut hit = None;
        for (i, f) in s.faults.iter_mut().enumerate() {
            if f.matches(op) {
                if f.nth == 0 {
                    hit = Some(i);
                    break;
                }
                f.nth -= 1;
            }
        }
        hit.map(|i| s.faults.remove(i).action)
    }

    fn read(&self, bdf: Bdf) -> io::Result<PciFunction> {
        PciFunction::read(&self.tree, bdf).map_err(|e| err(errno::ENODEV, format!("{bdf}: {e}")))
    }

    fn exists(&self, bdf: Bdf) -> bool {
        fs::symlink_metadata(self.tree.pci_device_dir(&bdf)).is_ok()
    }

    fn group_members(&self, group: u32) -> Vec<Bdf> {
        fs::read_dir(self.tree.iommu_group_devices_dir(group))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until no bind or unbind holds `bdf`'s `device_lock`.
    fn wait_unlocked(&self, bdf: Bdf) {
        let mut s = self.lock();
        while s.device_locked.contains_key(&bdf) {
            s = self
                .users_changed
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Takes `bdf`'s `device_lock` (waiting for a holder) until the guard drops.
    fn lock_device(&self, bdf: Bdf) -> DeviceLock<'_> {
        let mut s = self.lock();
        while s.device_locked.contains_key(&bdf) {
            s = self
                .users_changed
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
        *s.device_locked.entry(bdf).or_default() += 1;
        DeviceLock { kernel: self, bdf }
    }

    /// A read through the [`Kernel`] trait: an injected read fault, or a
    /// wait for `device_lock` when the attribute read takes it.
    fn gate_read(
        &self,
        bdf: Bdf,
        takes_lock: impl Fn(&LockedReads) -> bool,
    ) -> Result<(), HostError> {
        let (fault, locks) = {
            let s = self.lock();
            (
                s.read_faults.get(&bdf).copied(),
                takes_lock(&s.locked_reads),
            )
        };
        if let Some(code) = fault {
            return Err(HostError::Io {
                path: self.tree.pci_device_dir(&bdf),
                source: err(code, format!("injected read fault on {bdf}")),
            });
        }
        if locks {
            self.wait_unlocked(bdf);
        }
        Ok(())
    }

    /// Waits for a blocked write's gate, then its latency.
    fn delay(gate: Option<&BlockHandle>, latency: Option<Duration>) {
        if let Some(h) = gate {
            h.wait();
        }
        if let Some(l) = latency {
            std::thread::sleep(l);
        }
    }

    /// `really_probe`: the `driver` link exists before `probe()` runs (a
    /// slow or blocked probe already shows the device bound) and is removed
    /// again when the probe fails. Ok(()) = bound.
    fn probe(
        &self,
        driver: &SimDriver,
        f: &PciFunction,
        gate: Option<&BlockHandle>,
        latency: Option<Duration>,
    ) -> io::Result<()> {
        let name = &driver.name;
        self.fixture.link_driver(f.bdf, name)?;
        Self::delay(gate, latency);
        if let Err(e) = self.probe_checks(driver, f) {
            self.fixture.unlink_driver(f.bdf)?;
            return Err(e);
        }
        if is_vfio_driver(name) {
            let vfio = self.fixture.add_vfio_dev(f.bdf)?;
            let nodes = self.lock().vfio_nodes;
            if nodes.cdev {
                let dir = self.tree.rel("dev/vfio/devices");
                fs::create_dir_all(&dir)?;
                fs::write(dir.join(vfio), "")?;
            }
            if nodes.group
                && let Some(g) = f.iommu_group
            {
                let node = self.tree.dev_vfio_group(g);
                if let Some(dir) = node.parent() {
                    fs::create_dir_all(dir)?;
                }
                fs::write(node, "")?;
            }
        } else if name == "nvidia" {
            self.restore_nvidia_proc(f.bdf)?;
        }
        Ok(())
    }

    /// What a driver's `probe()` refuses.
    fn probe_checks(&self, driver: &SimDriver, f: &PciFunction) -> io::Result<()> {
        let name = &driver.name;
        if is_vfio_driver(name) {
            if f.is_bridge {
                return Err(err(
                    errno::EINVAL,
                    format!("{name} probe of bridge {}", f.bdf),
                ));
            }
            if f.iommu_group.is_none() {
                return Err(err(errno::EINVAL, format!("{}: no IOMMU group", f.bdf)));
            }
            if f.sriov_num_vfs.unwrap_or(0) > 0 {
                return Err(err(errno::EBUSY, format!("{}: VFs enabled", f.bdf)));
            }
        } else if !driver.dma_managed
            && let Some(g) = f.iommu_group
            && self.lock().vfio_users.contains(&g)
        {
            // ≥ 5.19 DMA ownership: a kernel-DMA driver may not join an owned group.
            return Err(err(
                errno::EBUSY,
                format!("{}: group {g} owned by a VFIO user", f.bdf),
            ));
        }
        Ok(())
    }

    fn nvidia_proc_dir(&self, bdf: Bdf) -> PathBuf {
        self.tree
            .rel("proc/driver/nvidia/gpus")
            .join(bdf.to_string())
    }

    /// nvidia removes its procfs directory in `nv_pci_remove`; the files
    /// are kept so a later bind recreates them (the unbind lock starts released).
    fn save_nvidia_proc(&self, bdf: Bdf) -> io::Result<()> {
        let dir = self.nvidia_proc_dir(bdf);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut files = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let content = if name == "unbindLock" {
                b"0\n".to_vec()
            } else {
                fs::read(e.path()).unwrap_or_default()
            };
            files.push((name, content));
        }
        fs::remove_dir_all(&dir)?;
        self.lock().nvidia_proc.insert(bdf, files);
        Ok(())
    }

    fn restore_nvidia_proc(&self, bdf: Bdf) -> io::Result<()> {
        let Some(files) = self.lock().nvidia_proc.remove(&bdf) else {
            return Ok(());
        };
        let dir = self.nvidia_proc_dir(bdf);
        fs::create_dir_all(&dir)?;
        for (name, content) in files {
            fs::write(dir.join(name), content)?;
        }
        Ok(())
    }

    /// What `remove()` tears down once it returns: the vfio class device and
    /// nodes, nvidia's procfs directory.
    fn after_unbind(&self, f: &PciFunction, driver: &str) -> io::Result<()> {
        if is_vfio_driver(driver) {
            if let Some(v) = &f.vfio_dev {
                // A fixture without the cdev node: nothing to remove.
                let _ = fs::remove_file(self.tree.rel("dev/vfio/devices").join(v));
            }
            self.fixture.remove_vfio_dev(f.bdf)?;
            if let Some(g) = f.iommu_group {
                let still = self.group_members(g).into_iter().any(|m| {
                    m != f.bdf
                        && PciFunction::read(&self.tree, m)
                            .map(|mf| mf.on_vfio())
                            .unwrap_or(false)
                });
                if !still {
                    // A fixture without the group node: nothing to remove.
                    let _ = fs::remove_file(self.tree.dev_vfio_group(g));
                }
            }
        } else if driver == "nvidia" {
            self.save_nvidia_proc(f.bdf)?;
        }
        Ok(())
    }

    /// A reset that returned: counted, noted when a VFIO user had the group
    /// open, and any injected after-effect applied to the attributes.
    fn apply_reset(&self, bdf: Bdf) -> io::Result<()> {
        let f = self.read(bdf)?;
        let effect = {
            let mut s = self.lock();
            *s.resets.entry(bdf).or_default() += 1;
            if f.iommu_group.is_some_and(|g| s.vfio_users.contains(&g)) {
                s.reset_under_user.push(bdf);
            }
            s.after_reset.remove(&bdf)
        };
        match effect {
            // A clean reset retrains the link to its maximum.
            None => {
                for (current, max) in [
                    ("current_link_speed", "max_link_speed"),
                    ("current_link_width", "max_link_width"),
                ] {
                    if let Ok(top) = fs::read_to_string(self.tree.pci_attr(&bdf, max)) {
                        fs::write(self.tree.pci_attr(&bdf, current), top)?;
                    }
                }
                Ok(())
            }
            Some(ResetEffect::DegradedLink { speed, width }) => {
                fs::write(
                    self.tree.pci_attr(&bdf, "current_link_speed"),
                    format!("{speed}\n"),
                )?;
                fs::write(
                    self.tree.pci_attr(&bdf, "current_link_width"),
                    format!("{width}\n"),
                )
            }
            Some(ResetEffect::ChangedDeviceId(id)) => {
                fs::write(self.tree.pci_attr(&bdf, "device"), format!("0x{id:04x}\n"))
            }
            Some(ResetEffect::LostBars) => {
                let zero = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
                fs::write(self.tree.pci_attr(&bdf, "resource"), zero.repeat(7))
            }
        }
    }

    fn matches_ids(driver: &SimDriver, f: &PciFunction) -> bool {
        driver.dynids.iter().any(|r| r.matches(&f.identity))
            || driver.id_table.iter().any(|r| r.matches(f))
    }

    fn do_write(
        &self,
        op: &SysfsWrite,
        gate: Option<&BlockHandle>,
        latency: Option<Duration>,
    ) -> io::Result<()> {
        match op {
            SysfsWrite::DriverOverride { bdf, driver } => {
                Self::delay(gate, latency);
                if !self.exists(*bdf) {
                    return Err(err(errno::ENODEV, format!("{bdf}")));
                }
                if self.lock().locked_reads.driver_override {
                    // The older store takes device_lock too.
                    self.wait_unlocked(*bdf);
                }
                let value = match driver {
                    // sysfs drops zero-length writes before the store runs.
                    Some(d) if d.is_empty() => return Ok(()),
                    Some(d) if d.len() >= 4095 => {
                        return Err(err(errno::EINVAL, "override too long".into()));
                    }
                    Some(d) => d.split('\n').next().unwrap_or("").to_string(),
                    None => String::new(),
                };
                let shown = if value.is_empty() {
                    "(null)"
                } else {
                    value.as_str()
                };
                fs::write(
                    self.tree.pci_attr(bdf, "driver_override"),
                    format!("{shown}\n"),
                )
            }
            SysfsWrite::Unbind { bdf, driver } => {
                let _locked = self.lock_device(*bdf);
                let f = self.read(*bdf)?;
                if f.driver.as_ref() != Some(driver) {
                    return Err(err(
                        errno::ENODEV,
                        format!("{bdf} is not bound to {driver}"),
                    ));
                }
                // __device_release_driver: driver_sysfs_remove() runs before
                // remove(), so a hung unbind already shows no driver.
                self.fixture.unlink_driver(*bdf)?;
                Self::delay(gate, latency);
                {
                    let mut s = self.lock();
                    if driver.is_vfio() {
                        // vfio-pci's remove() waits for the user to let go.
                        if let Some(g) = f.iommu_group {
                            while s.vfio_users.contains(&g) {
                                s = self
                                    .users_changed
                                    .wait(s)
                                    .unwrap_or_else(|p| p.into_inner());
                            }
                        }
                    } else {
                        // nv_pci_remove loops while the usage count is not 0;
                        // snd_hda_intel waits for /dev/snd openers.
                        while s.clients.get(bdf).is_some_and(|n| *n > 0) {
                            s = self
                                .users_changed
                                .wait(s)
                                .unwrap_or_else(|p| p.into_inner());
                        }
                    }
                }
                self.after_unbind(&f, driver.as_str())
            }
            SysfsWrite::Bind { bdf, driver } => {
                let d = {
                    let s = self.lock();
                    s.drivers
                        .iter()
                        .find(|d| d.name == driver.as_str())
                        .cloned()
                };
                let Some(d) = d else {
                    return Err(err(
                        libc_enoent(),
                        format!("no driver directory for {driver} (module not loaded)"),
                    ));
                };
                if !self.exists(*bdf) {
                    return Err(err(errno::ENODEV, format!("{bdf}")));
                }
                let _locked = self.lock_device(*bdf);
                let f = self.read(*bdf)?;
                if f.driver.is_some() {
                    return Err(err(errno::EBUSY, format!("{bdf} already bound")));
                }
                let ok = match &f.driver_override {
                    Some(o) => o == driver.as_str(),
                    // vfio-pci's static table is override-only: ids or dynids needed.
                    None => Self::matches_ids(&d, &f),
                };
                if !ok {
                    return Err(err(errno::ENODEV, format!("{driver} does not match {bdf}")));
                }
                self.probe(&d, &f, gate, latency)
            }
            SysfsWrite::DriversProbe { bdf } => {
                Self::delay(gate, latency);
                if !self.exists(*bdf) {
                    return Err(err(errno::ENODEV, format!("{bdf}")));
                }
                let _locked = self.lock_device(*bdf);
                let f = self.read(*bdf)?;
                if f.driver.is_some() {
                    return Ok(());
                }
                let candidates: Vec<SimDriver> = {
                    let s = self.lock();
                    match &f.driver_override {
                        Some(o) => s.drivers.iter().filter(|d| &d.name == o).cloned().collect(),
                        None => s
                            .drivers
                            .iter()
                            .filter(|d| Self::matches_ids(d, &f))
                            .cloned()
                            .collect(),
                    }
                };
                for d in &candidates {
                    if self.probe(d, &f, None, None).is_ok() {
                        break;
                    }
                }
                // Success whether or not anything bound.
                Ok(())
            }
            SysfsWrite::NvidiaUnbindLock { bdf, take } => {
                Self::delay(gate, latency);
                let (path, _) = op.target(&self.tree);
                if !path.exists() {
                    return Err(err(libc_enoent(), format!("{}", path.display())));
                }
                // Granted (reads back 1) only with a usage count of 0.
                let granted = *take && self.lock().clients.get(bdf).is_none_or(|n| *n == 0);
                fs::write(path, if granted { "1\n" } else { "0\n" })
            }
            SysfsWrite::Reset { bdf } => {
                if !self.exists(*bdf) {
                    return Err(err(errno::ENODEV, format!("{bdf}")));
                }
                if self.lock().no_reset.contains(bdf) {
                    return Err(err(
                        libc_enoent(),
                        format!("{bdf} has no reset method (no reset attribute)"),
                    ));
                }
                // pci_reset_function holds device_lock for the whole reset.
                let _locked = self.lock_device(*bdf);
                Self::delay(gate, latency);
                self.apply_reset(*bdf)
            }
        }
    }
}

/// `device_lock` of one device, released on drop.
struct DeviceLock<'a> {
    kernel: &'a SimKernel,
    bdf: Bdf,
}

impl Drop for DeviceLock<'_> {
    fn drop(&mut self) {
        let mut s = self.kernel.lock();
        if let Some(n) = s.device_locked.get_mut(&self.bdf) {
            *n -= 1;
            if *n == 0 {
                s.device_locked.remove(&self.bdf);
            }
        }
        drop(s);
        self.kernel.users_changed.notify_all();
    }
}

fn libc_enoent() -> i32 {
    2
}

/// ID tables of the drivers the demo and tests use, close to the real ones.
fn default_id_table(name: &str) -> Vec<IdRule> {
    let class = |c: u32, m: u32| IdRule {
        class: Some((c, m)),
        ..IdRule::default()
    };
    let vendor_class = |v: u16, c: u32, m: u32| IdRule {
        vendor: Some(v),
        class: Some((c, m)),
        ..IdRule::default()
    };
    match name {
        "nvidia" | "nouveau" => vec![vendor_class(0x10de, 0x03_0000, 0xff_0000)],
        "snd_hda_intel" => vec![class(0x04_0300, 0xff_ff00)],
        "xhci_hcd" => vec![class(0x0c_0330, 0xff_ffff)],
        "nvidia-gpu" => vec![vendor_class(0x10de, 0x0c_8000, 0xff_ff00)],
        "mlx5_core" => vec![IdRule {
            vendor: Some(0x15b3),
            ..IdRule::default()
        }],
        "nvme" => vec![class(0x01_0802, 0xff_ffff)],
        "pcieport" => vec![class(0x06_0400, 0xff_ff00)],
        "e1000e" => vec![IdRule {
            vendor: Some(0x8086),
            device: Some(0x10d3),
            ..IdRule::default()
        }],
        "e1000" => vec![IdRule {
            vendor: Some(0x8086),
            device: Some(0x100e),
            ..IdRule::default()
        }],
        "virtio-pci" => vec![IdRule {
            vendor: Some(0x1af4),
            ..IdRule::default()
        }],
        "amdgpu" => vec![vendor_class(0x1002, 0x03_0000, 0xff_0000)],
        _ => Vec::new(),
    }
}

impl Kernel for SimKernel {
    fn root(&self) -> &HostRoot {
        &self.edge_root
    }

    fn write(&self, op: &SysfsWrite) -> io::Result<()> {
        let driver = match op {
            SysfsWrite::Bind { driver, .. } | SysfsWrite::Unbind { driver, .. } => {
                driver.as_str().to_string()
            }
            _ => String::new(),
        };
        let latency = self.lock().latency.get(&(op.kind(), driver)).copied();
        self.lock().log.push(op.clone());
        self.append_log(&op.to_string());
        let gate = match self.take_fault(op) {
            Some(FaultAction::Fail(code)) => {
                return Err(err(code, format!("injected fault on {op}")));
            }
            Some(FaultAction::Block(h)) => Some(h),
            Some(FaultAction::ProbeBindsNothing) => return Ok(()),
            None => None,
        };
        // The gate and latency stand for the driver's remove()/probe(): the
        // write applies them where the kernel would block.
        self.do_write(op, gate.as_ref(), latency)
    }

    fn read_function(&self, bdf: Bdf) -> Result<PciFunction, HostError> {
        let has_sriov = self.tree.pci_attr(&bdf, "sriov_numvfs").exists();
        self.gate_read(bdf, |r| r.driver_override || (r.sriov_numvfs && has_sriov))?;
        PciFunction::read(&self.edge_root, bdf)
    }

    fn read_binding(&self, bdf: Bdf) -> Result<Binding, HostError> {
        self.gate_read(bdf, |r| r.driver_override)?;
        Binding::read(&self.edge_root, bdf)
    }

    fn read_text(&self, path: &Path) -> Result<Option<String>, HostError> {
        self.edge_root.read_opt(path)
    }

    fn exists(&self, path: &Path) -> Result<bool, HostError> {
        self.edge_root.exists(path)
    }

    fn is_dir(&self, path: &Path) -> Result<bool, HostError> {
        // An injected fault is the read's error, not "not a directory".
        self.gate_path(path)?;
        Ok(self.edge_root.is_dir(path))
    }

    fn scan_holders(
        &self,
        nodes: &[PathBuf],
    ) -> Result<Vec<crate::preflight::NodeHolder>, crate::preflight::HolderScanError> {
        // The scan's own key (a fault under `proc/*` hits the scan, not
        // nvidia's procfs files).
        let proc_dir = self.tree.rel("proc/*/fd");
        self.gate_path(&proc_dir)
            .map_err(|e| crate::preflight::HolderScanError::Proc {
                path: proc_dir.clone(),
                source: io::Error::other(e.to_string()),
            })?;
        crate::preflight::scan_holders(&self.edge_root, nodes)
    }
}

/// The `vfio-pci.ids` entries a host applied at boot: the command line's
/// last `vfio_pci.ids`, or with vfio-pci as a module kmod's effective value
/// (modprobe.d, then the command line).
pub fn boot_vfio_ids(root: &HostRoot) -> Vec<IdEntry> {
    use vfio_gpu_intent::{
        ModprobeConfig, effective_vfio_ids, kernel_params, kmod_options, parse_ids,
    };
    let cmdline = root
        .read_opt(&root.rel("proc/cmdline"))
        .ok()
        .flatten()
        .unwrap_or_default();
    let value = if vfio_gpu_intent::vfio_pci_builtin(root) == Some(true) {
        kernel_params(&cmdline)
            .into_iter()
            .filter(|p| !p.after_dashdash && p.name == "vfio_pci.ids")
            .filter_map(|p| p.value)
            .next_back()
    } else {
        effective_vfio_ids(&ModprobeConfig::load(root), &kmod_options(&cmdline)).map(|(v, _)| v)
    };
    value.map(|v| parse_ids(&v).entries).unwrap_or_default()
}
