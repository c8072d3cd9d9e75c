//! The kernel edge: the only host mutations the engine makes, as one narrow
//! trait, with the real sysfs implementation. [`crate::sim::SimKernel`] is
//! the test double.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use vfio_gpu_host::{Bdf, Binding, DriverName, HostError, HostRoot, PciFunction};

/// One sysfs (or procfs) write. Every host mutation the engine makes is one
/// of these, so deadlines, fault injection and crash points apply uniformly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SysfsWrite {
    /// `devices/<BDF>/driver_override` ← a driver name, or `"\n"` to clear.
    DriverOverride {
        /// The PCI function written about.
        bdf: Bdf,
        /// A driver name, or `None` to clear (written as `"\n"`).
        driver: Option<String>,
    },
    /// `drivers/<driver>/unbind` ← BDF. Can block for minutes.
    Unbind {
        /// The PCI function written about.
        bdf: Bdf,
        /// The driver it is bound to.
        driver: DriverName,
    },
    /// `drivers/<driver>/bind` ← BDF. Reports probe errors (ENODEV, EBUSY, EINVAL…).
    Bind {
        /// The PCI function written about.
        bdf: Bdf,
        /// The driver asked to bind it.
        driver: DriverName,
    },
    /// `drivers_probe` ← BDF. Succeeds even when nothing binds.
    DriversProbe {
        /// The PCI function written about.
        bdf: Bdf,
    },
    /// `/proc/driver/nvidia/gpus/<BDF>/unbindLock` ← `1` (take) or `0` (release).
    NvidiaUnbindLock {
        /// The PCI function written about.
        bdf: Bdf,
        /// Take (true) or release (false).
        take: bool,
    },
    /// `devices/<BDF>/reset` ← `1`: the kernel resets the function with the
    /// first method of its `reset_method` that works (FLR, PM, a bus reset
    /// only when nothing else sits below the bridge). ENOENT: no method at all.
    Reset {
        /// Device.
        bdf: Bdf,
    },
}

impl SysfsWrite {
    /// The device written about.
    pub fn bdf(&self) -> Bdf {
        match self {
            SysfsWrite::DriverOverride { bdf, .. }
            | SysfsWrite::Unbind { bdf, .. }
            | SysfsWrite::Bind { bdf, .. }
            | SysfsWrite::DriversProbe { bdf }
            | SysfsWrite::NvidiaUnbindLock { bdf, .. }
            | SysfsWrite::Reset { bdf } => *bdf,
        }
    }

    /// Which kind of write this is, without its operands (what fault rules
    /// and latencies of the simulator match on).
    pub fn kind(&self) -> WriteKind {
        match self {
            SysfsWrite::DriverOverride { .. } => WriteKind::DriverOverride,
            SysfsWrite::Unbind { .. } => WriteKind::Unbind,
            SysfsWrite::Bind { .. } => WriteKind::Bind,
            SysfsWrite::DriversProbe { .. } => WriteKind::DriversProbe,
            SysfsWrite::NvidiaUnbindLock { .. } => WriteKind::NvidiaUnbindLock,
            SysfsWrite::Reset { .. } => WriteKind::Reset,
        }
    }

    /// The path written and the bytes, under `root`.
    pub fn target(&self, root: &HostRoot) -> (PathBuf, Vec<u8>) {
        match self {
            SysfsWrite::DriverOverride { bdf, driver } => (
                root.pci_attr(bdf, "driver_override"),
                // sysfs drops zero-length writes; "\n" is how to clear (an
                // empty name from a hand-edited ledger clears too).
                match driver {
                    Some(d) if !d.is_empty() => d.as_bytes().to_vec(),
                    _ => b"\n".to_vec(),
                },
            ),
            SysfsWrite::Unbind { bdf, driver } => (
                root.pci_driver_dir(driver).join("unbind"),
                bdf.to_string().into_bytes(),
            ),
            SysfsWrite::Bind { bdf, driver } => (
                root.pci_driver_dir(driver).join("bind"),
                bdf.to_string().into_bytes(),
            ),
            SysfsWrite::DriversProbe { bdf } => {
                (root.pci_drivers_probe(), bdf.to_string().into_bytes())
            }
            SysfsWrite::NvidiaUnbindLock { bdf, take } => (
                nvidia_unbind_lock_path(root, bdf),
                if *take { b"1".to_vec() } else { b"0".to_vec() },
            ),
            SysfsWrite::Reset { bdf } => (root.pci_attr(bdf, "reset"), b"1".to_vec()),
        }
    }
}

/// The kind of a [`SysfsWrite`] without its operands: the variants of the
/// write vocabulary, for matching a whole class of writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WriteKind {
    /// [`SysfsWrite::DriverOverride`].
    DriverOverride,
    /// [`SysfsWrite::Unbind`].
    Unbind,
    /// [`SysfsWrite::Bind`].
    Bind,
    /// [`SysfsWrite::DriversProbe`].
    DriversProbe,
    /// [`SysfsWrite::NvidiaUnbindLock`].
    NvidiaUnbindLock,
    /// [`SysfsWrite::Reset`].
    Reset,
}

impl WriteKind {
    /// The name of the file written (`unbind`, `bind`, `unbindLock`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::DriverOverride => "driver_override",
            WriteKind::Unbind => "unbind",
            WriteKind::Bind => "bind",
            WriteKind::DriversProbe => "drivers_probe",
            WriteKind::NvidiaUnbindLock => "unbindLock",
            WriteKind::Reset => "reset",
        }
    }
}

impl fmt::Display for WriteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `proc/driver/nvidia/gpus/<BDF>/unbindLock`: one place for the path the engine
/// checks, writes and releases.
pub(crate) fn nvidia_unbind_lock_path(root: &HostRoot, bdf: &Bdf) -> PathBuf {
    root.rel("proc/driver/nvidia/gpus")
        .join(bdf.to_string())
        .join("unbindLock")
}

impl fmt::Display for SysfsWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SysfsWrite::DriverOverride { bdf, driver } => write!(
                f,
                "driver_override of {bdf} ← {}",
                driver.as_deref().unwrap_or("(clear)")
            ),
            SysfsWrite::Unbind { bdf, driver } => write!(f, "unbind {bdf} from {driver}"),
            SysfsWrite::Bind { bdf, driver } => write!(f, "bind {bdf} to {driver}"),
            SysfsWrite::DriversProbe { bdf } => write!(f, "drivers_probe {bdf}"),
            SysfsWrite::NvidiaUnbindLock { bdf, take } => write!(
                f,
                "{} nvidia unbind lock of {bdf}",
                if *take { "take" } else { "release" }
            ),
            SysfsWrite::Reset { bdf } => write!(f, "reset {bdf}"),
        }
    }
}

/// The host operations of the engine. Implementations must be callable from
/// several threads at once; any call may block (the engine runs each one on
/// a worker with a deadline).
pub trait Kernel: Send + Sync + 'static {
    /// The host root everything is read under.
    fn root(&self) -> &HostRoot;
    /// Performs one write.
    fn write(&self, op: &SysfsWrite) -> io::Result<()>;
    /// Reads one function's current state.
    fn read_function(&self, bdf: Bdf) -> Result<PciFunction, HostError> {
        PciFunction::read(self.root(), bdf)
    }
    /// Reads where one function is bound (driver, override, vfio-dev).
    fn read_binding(&self, bdf: Bdf) -> Result<Binding, HostError> {
        Binding::read(self.root(), bdf)
    }
    /// Reads a small host file under the root (a sysfs or procfs attribute,
    /// nvidia's `information`, its `unbindLock`); `Ok(None)` when absent.
    fn read_text(&self, path: &Path) -> Result<Option<String>, HostError> {
        self.root().read_opt(path)
    }
    /// Whether `path` exists (not following a last symlink: a dangling
    /// link exists).
    fn exists(&self, path: &Path) -> Result<bool, HostError> {
        self.root().exists(path)
    }
    /// Whether `path` is a directory (following links, as a driver's
    /// directory under `bus/pci/drivers` is one).
    fn is_dir(&self, path: &Path) -> Result<bool, HostError> {
        match self.root().metadata(path) {
            Ok(m) => Ok(m.is_dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(HostError::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }
    /// The last component of a symlink's target (`iommu_group` → `12`).
    fn link_name(&self, path: &Path) -> Result<Option<String>, HostError> {
        self.root().link_name(path)
    }
    /// Processes holding any of `nodes`, from one pass over the host's
    /// `/proc` (see [`crate::preflight::scan_holders`]).
    fn scan_holders(
        &self,
        nodes: &[std::path::PathBuf],
    ) -> Result<Vec<crate::preflight::NodeHolder>, crate::preflight::HolderScanError> {
        crate::preflight::scan_holders(self.root(), nodes)
    }
}

/// The real kernel: writes sysfs files under the host root.
#[derive(Clone, Debug)]
pub struct SysfsKernel {
    root: HostRoot,
}

impl SysfsKernel {
    /// A kernel edge writing under `root`.
    pub fn new(root: HostRoot) -> Self {
        SysfsKernel { root }
    }
}

impl Kernel for SysfsKernel {
    fn root(&self) -> &HostRoot {
        &self.root
    }

    fn write(&self, op: &SysfsWrite) -> io::Result<()> {
        let (path, bytes) = op.target(&self.root);
        // Write-only, no create or truncate: sysfs attributes exist or the
        // operation is unsupported. One write(2) = one store call.
        let mut file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
        let n = file
            .write(&bytes)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))?;
        if n != bytes.len() {
            return Err(io::Error::other(format!(
                "short write to {} ({n} of {} bytes)",
                path.display(),
                bytes.len()
            )));
        }
        Ok(())
    }
}
