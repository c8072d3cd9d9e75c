//! A simulated kernel on a fixture tree, following
//! `kernel-vfio.md`: it changes the same `driver` links, `vfio-dev/` entries
//! and `/dev/vfio/<group>` nodes the real driver core changes, so the host
//! model reads the result with the code it uses on a node.
//!
//! Modelled: override-only matching of vfio-pci and its dynamic ids (from
//! the command line and modprobe.d), `driver_override` beating ID tables,
//! `bind` errors (ENODEV, EBUSY, EINVAL), `drivers_probe` succeeding while
//! binding nothing, group viability against a VFIO user, unbind blocking
//! while a VM holds the group. Faults: a failing write, a write that blocks
//! until released, latency per operation and driver.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vfio_gpu_host::fixture::FixtureHost;
use vfio_gpu_host::{Bdf, HostRoot, PciFunction, is_vfio_driver};

use vfio_gpu_intent::IdEntry;

use crate::kernel::{Kernel, SysfsWrite};

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
    /// The write blocks until [`BlockHandle::release`], then proceeds.
    Block(BlockHandle),
    /// `drivers_probe` reports success and binds nothing.
    ProbeBindsNothing,
}

/// Releases a blocked write.
#[derive(Clone, Debug, Default)]
pub struct BlockHandle {
    inner: Arc<(Mutex<bool>, Condvar)>,
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
    fn wait(&self) {
        let (m, c) = &*self.inner;
        let mut open = m.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = c.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A fault rule: the `nth` (0-based) matching write gets `action`.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Operation kind (`unbind`, `bind`, `driver_override`, `drivers_probe`), or any.
    pub kind: Option<&'static str>,
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
    pub fn on(kind: &'static str, bdf: Bdf, action: FaultAction) -> Self {
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

#[derive(Default)]
struct SimState {
    drivers: Vec<SimDriver>,
    faults: Vec<Fault>,
    latency: HashMap<(String, String), Duration>,
    vfio_users: HashSet<u32>,
    log: Vec<String>,
}

/// The simulated kernel. Cheap to clone (shared state).
#[derive(Clone)]
pub struct SimKernel {
    root: HostRoot,
    fixture: FixtureHost,
    state: Arc<Mutex<SimState>>,
    users_changed: Arc<Condvar>,
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
        SimKernel {
            root,
            fixture,
            state: Arc::new(Mutex::new(state)),
            users_changed: Arc::new(Condvar::new()),
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
        fs::remove_dir_all(self.root.pci_drivers_dir().join(name))
    }

    /// Adds a fault rule.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Removes every pending fault rule.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Sets the time an operation (`unbind`, `bind`) takes for a driver.
    pub fn set_latency(&self, kind: &str, driver: &str, latency: Duration) {
        self.lock()
            .latency
            .insert((kind.to_string(), driver.to_string()), latency);
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

    /// Every write performed, in order, as text.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
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
        PciFunction::read(&self.root, bdf).map_err(|e| err(errno::ENODEV, format!("{bdf}: {e}")))
    }

    fn exists(&self, bdf: Bdf) -> bool {
        fs::symlink_metadata(self.root.pci_device_dir(&bdf)).is_ok()
    }

    fn group_members(&self, group: u32) -> Vec<Bdf> {
        fs::read_dir(self.root.iommu_group_devices_dir(group))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Probes `driver` against `f` as `really_probe` would; Ok(()) = bound.
    fn probe(&self, s: &SimState, driver: &SimDriver, f: &PciFunction) -> io::Result<()> {
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
            && s.vfio_users.contains(&g)
        {
            // ≥ 5.19 DMA ownership: a kernel-DMA driver may not join an owned group.
            return Err(err(
                errno::EBUSY,
                format!("{}: group {g} owned by a VFIO user", f.bdf),
            ));
        }
        self.fixture.link_driver(f.bdf, name)?;
        if is_vfio_driver(name) {
            self.fixture.add_vfio_dev(f.bdf)?;
            if let Some(g) = f.iommu_group {
                let node = self.root.dev_vfio_group(g);
                if let Some(dir) = node.parent() {
                    fs::create_dir_all(dir)?;
                }
                fs::write(node, "")?;
            }
        }
        Ok(())
    }

    fn matches_ids(driver: &SimDriver, f: &PciFunction) -> bool {
        driver.dynids.iter().any(|r| r.matches(&f.identity))
            || driver.id_table.iter().any(|r| r.matches(f))
    }

    fn do_write(&self, op: &SysfsWrite) -> io::Result<()> {
        match op {
            SysfsWrite::DriverOverride { bdf, driver } => {
                if !self.exists(*bdf) {
                    return Err(err(errno::ENODEV, format!("{bdf}")));
                }
                let value = match driver {
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
                    self.root.pci_attr(bdf, "driver_override"),
                    format!("{shown}\n"),
                )
            }
            SysfsWrite::Unbind { bdf, driver } => {
                let f = self.read(*bdf)?;
                if f.driver.as_ref() != Some(driver) {
                    return Err(err(
                        errno::ENODEV,
                        format!("{bdf} is not bound to {driver}"),
                    ));
                }
                if driver.is_vfio()
                    && let Some(g) = f.iommu_group
                {
                    // vfio-pci's remove() waits for the user to let go.
                    let mut s = self.lock();
                    while s.vfio_users.contains(&g) {
                        s = self
                            .users_changed
                            .wait(s)
                            .unwrap_or_else(|p| p.into_inner());
                    }
                }
                self.fixture.unlink_driver(*bdf)?;
                if driver.is_vfio() {
                    self.fixture.remove_vfio_dev(*bdf)?;
                    if let Some(g) = f.iommu_group {
                        let still = self.group_members(g).into_iter().any(|m| {
                            m != *bdf
                                && PciFunction::read(&self.root, m)
                                    .map(|mf| mf.on_vfio())
                                    .unwrap_or(false)
                        });
                        if !still {
                            let _ = fs::remove_file(self.root.dev_vfio_group(g));
                        }
                    }
                }
                Ok(())
            }
            SysfsWrite::Bind { bdf, driver } => {
                let s = self.lock();
                let Some(d) = s.drivers.iter().find(|d| d.name == driver.as_str()) else {
                    return Err(err(
                        libc_enoent(),
                        format!("no driver directory for {driver} (module not loaded)"),
                    ));
                };
                if !self.exists(*bdf) {
                    return Err(err(errno::ENODEV, format!("{bdf}")));
                }
                let f = self.read(*bdf)?;
                if f.driver.is_some() {
                    return Err(err(errno::EBUSY, format!("{bdf} already bound")));
                }
                let ok = match &f.driver_override {
                    Some(o) => o == driver.as_str(),
                    // vfio-pci's static table is override-only: ids or dynids needed.
                    None => Self::matches_ids(d, &f),
                };
                if !ok {
                    return Err(err(errno::ENODEV, format!("{driver} does not match {bdf}")));
                }
                self.probe(&s, d, &f)
            }
            SysfsWrite::DriversProbe { bdf } => {
                if !self.exists(*bdf) {
                    return Err(err(errno::ENODEV, format!("{bdf}")));
                }
                let f = self.read(*bdf)?;
                if f.driver.is_some() {
                    return Ok(());
                }
                let s = self.lock();
                let candidates: Vec<&SimDriver> = match &f.driver_override {
                    Some(o) => s.drivers.iter().filter(|d| &d.name == o).collect(),
                    None => s
                        .drivers
                        .iter()
                        .filter(|d| Self::matches_ids(d, &f))
                        .collect(),
                };
                for d in candidates {
                    if self.probe(&s, d, &f).is_ok() {
                        break;
                    }
                }
                // Success whether or not anything bound.
                Ok(())
            }
            SysfsWrite::NvidiaUnbindLock { .. } => {
                let (path, bytes) = op.target(&self.root);
                if !path.exists() {
                    return Err(err(libc_enoent(), format!("{}", path.display())));
                }
                fs::write(path, bytes)
            }
        }
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
        &self.root
    }

    fn write(&self, op: &SysfsWrite) -> io::Result<()> {
        let driver = match op {
            SysfsWrite::Bind { driver, .. } | SysfsWrite::Unbind { driver, .. } => {
                driver.as_str().to_string()
            }
            _ => String::new(),
        };
        let latency = self
            .lock()
            .latency
            .get(&(op.kind().to_string(), driver))
            .copied();
        self.lock().log.push(op.to_string());
        match self.take_fault(op) {
            Some(FaultAction::Fail(code)) => {
                return Err(err(code, format!("injected fault on {op}")));
            }
            Some(FaultAction::Block(h)) => h.wait(),
            Some(FaultAction::ProbeBindsNothing) => return Ok(()),
            None => {}
        }
        if let Some(l) = latency {
            std::thread::sleep(l);
        }
        self.do_write(op)
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
