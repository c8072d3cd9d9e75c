use std::fmt;
use std::fs;
use std::io::{self, ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Bdf, DriverName, HostError};

/// The root under which every host path is read: sysfs, `/proc`, `/etc`,
/// `/dev`, `/lib/modules`. `/` on a node, `/host-root` in a pod, a fixture
/// directory in tests.
///
/// Paths are built only from fixed relative paths and validated types
/// ([`Bdf`], [`DriverName`], group numbers), never from free-form strings.
///
/// Every read of the host (a file, a directory listing, a link, a metadata
/// probe) goes through a method of this type, which asks the [`ReadGate`]
/// first: the simulated kernel can fail or block any of them by path, and
/// `clippy.toml` of the crates that read the host forbids the `std::fs`
/// read calls everywhere else.
#[derive(Clone, Debug)]
pub struct HostRoot {
    root: PathBuf,
    gate: Option<Arc<dyn ReadGate>>,
}

/// The read side of the kernel edge as the simulated kernel sees it: called
/// before every host read made through a [`HostRoot`]. The real host has no
/// gate; `SimKernel` installs one that fails (EMFILE, EIO...) or blocks reads
/// of the paths a test names.
pub trait ReadGate: Send + Sync + fmt::Debug {
    /// Called before `path` is read; an error becomes the read's error. May
    /// block (a hung mount, a device lock) for as long as the test wants.
    fn before_read(&self, path: &Path) -> io::Result<()>;
}

/// The largest attribute we read; sysfs attributes are at most one page.
const MAX_ATTR: u64 = 64 * 1024;

/// The largest module index we read: a distribution kernel's `modules.alias`
/// is about 1.3 MB, far past [`MAX_ATTR`].
const MAX_MODULE_INDEX: u64 = 32 * 1024 * 1024;

impl HostRoot {
    /// Opens a host root, checking that it is an existing directory with a
    /// `sys/bus/pci` tree.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, HostError> {
        let root = root.into();
        let bad = |reason: String| HostError::BadRoot {
            path: root.clone(),
            reason,
        };
        // Before any gate exists: the root itself, once, at start.
        #[allow(clippy::disallowed_methods)]
        let meta = fs::metadata(&root).map_err(|e| bad(e.to_string()))?;
        if !meta.is_dir() {
            return Err(bad("not a directory".into()));
        }
        let pci = root.join("sys/bus/pci/devices");
        #[allow(clippy::disallowed_methods)]
        let listed = fs::read_dir(&pci);
        match listed {
            Ok(_) => {}
            Err(e) => {
                return Err(bad(format!(
                    "cannot list sys/bus/pci/devices ({e}); is this a host root with sysfs?"
                )));
            }
        }
        Ok(HostRoot { root, gate: None })
    }

    /// The same root with every read first passed to `gate` (the simulated
    /// kernel's faults).
    pub fn with_read_gate(mut self, gate: Arc<dyn ReadGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    fn gate(&self, path: &Path) -> io::Result<()> {
        match &self.gate {
            Some(g) => g.before_read(path),
            None => Ok(()),
        }
    }

    /// `stat(2)` following links (through the gate).
    pub fn metadata(&self, path: &Path) -> io::Result<fs::Metadata> {
        self.gate(path)?;
        #[allow(clippy::disallowed_methods)] // the one place that reads
        fs::metadata(path)
    }

    /// `lstat(2)`: the link itself (through the gate).
    pub fn symlink_metadata(&self, path: &Path) -> io::Result<fs::Metadata> {
        self.gate(path)?;
        #[allow(clippy::disallowed_methods)] // the one place that reads
        fs::symlink_metadata(path)
    }

    /// Lists a directory (through the gate).
    pub fn read_dir(&self, path: &Path) -> io::Result<fs::ReadDir> {
        self.gate(path)?;
        #[allow(clippy::disallowed_methods)] // the one place that reads
        fs::read_dir(path)
    }

    /// The names in a directory, unsorted; `Ok(None)` when it does not exist.
    pub fn list_names(&self, path: &Path) -> Result<Option<Vec<String>>, HostError> {
        match self.read_dir(path) {
            Ok(entries) => {
                let mut names = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(|e| HostError::io(path, e))?;
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
                Ok(Some(names))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(HostError::io(path, e)),
        }
    }

    /// A symlink's target (through the gate).
    pub fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        self.gate(path)?;
        #[allow(clippy::disallowed_methods)] // the one place that reads
        fs::read_link(path)
    }

    /// The path with every link resolved (through the gate).
    pub fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        self.gate(path)?;
        #[allow(clippy::disallowed_methods)] // the one place that reads
        fs::canonicalize(path)
    }

    /// Opens a file for reading (through the gate).
    pub fn open_file(&self, path: &Path) -> io::Result<fs::File> {
        self.gate(path)?;
        #[allow(clippy::disallowed_methods)] // the one place that reads
        fs::File::open(path)
    }

    /// Whether `path` exists, not following a last link (a dangling link
    /// exists). Errors other than "not found" are errors, not "absent".
    pub fn exists(&self, path: &Path) -> Result<bool, HostError> {
        match self.symlink_metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(HostError::io(path, e)),
        }
    }

    /// Whether `path` exists, for checks where an unreadable path counts as
    /// absent (probes of optional kernel features).
    pub fn exists_lossy(&self, path: &Path) -> bool {
        self.symlink_metadata(path).is_ok()
    }

    /// Whether `path` is a directory, following links; an unreadable path
    /// is not one.
    pub fn is_dir(&self, path: &Path) -> bool {
        self.metadata(path).is_ok_and(|m| m.is_dir())
    }

    /// The root directory itself.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// A fixed path relative to the root, e.g. `rel("proc/cmdline")`.
    /// Only for literals in this project; never pass untrusted strings.
    pub fn rel(&self, rel: &str) -> PathBuf {
        debug_assert!(!rel.starts_with('/') && !rel.split('/').any(|c| c == ".."));
        self.root.join(rel)
    }

    /// `sys/bus/pci/devices`.
    pub fn pci_devices_dir(&self) -> PathBuf {
        self.rel("sys/bus/pci/devices")
    }
    /// `sys/bus/pci/devices/<BDF>`.
    pub fn pci_device_dir(&self, bdf: &Bdf) -> PathBuf {
        self.pci_devices_dir().join(bdf.to_string())
    }
    /// `sys/bus/pci/devices/<BDF>/<attr>` for a fixed attribute name.
    pub fn pci_attr(&self, bdf: &Bdf, attr: &str) -> PathBuf {
        debug_assert!(!attr.contains('/') || attr == "driver/unbind");
        self.pci_device_dir(bdf).join(attr)
    }
    /// `sys/bus/pci/drivers`.
    pub fn pci_drivers_dir(&self) -> PathBuf {
        self.rel("sys/bus/pci/drivers")
    }
    /// `sys/bus/pci/drivers/<driver>`.
    pub fn pci_driver_dir(&self, driver: &DriverName) -> PathBuf {
        self.pci_drivers_dir().join(driver.as_str())
    }
    /// `sys/bus/pci/drivers_probe`.
    pub fn pci_drivers_probe(&self) -> PathBuf {
        self.rel("sys/bus/pci/drivers_probe")
    }
    /// `sys/kernel/iommu_groups`.
    pub fn iommu_groups_dir(&self) -> PathBuf {
        self.rel("sys/kernel/iommu_groups")
    }
    /// `sys/kernel/iommu_groups/<N>/devices`.
    pub fn iommu_group_devices_dir(&self, group: u32) -> PathBuf {
        self.iommu_groups_dir()
            .join(group.to_string())
            .join("devices")
    }
    /// `dev/vfio/<N>`: the legacy group node.
    pub fn dev_vfio_group(&self, group: u32) -> PathBuf {
        self.rel("dev/vfio").join(group.to_string())
    }

    /// Reads a text file, trimmed of the trailing newline. `Ok(None)` when
    /// it does not exist (a legitimate state for many sysfs attributes).
    pub fn read_opt(&self, path: &Path) -> Result<Option<String>, HostError> {
        self.read_limited(path, MAX_ATTR)
    }

    /// Reads a module index of the running kernel
    /// (`lib/modules/<release>/<file>`, e.g. `modules.alias`) whole.
    /// `Ok(None)` when the release is unknown or the file does not exist.
    pub fn read_module_index(&self, file: &str) -> Result<Option<String>, HostError> {
        match self.modules_file(file)? {
            Some(path) => self.read_limited(&path, MAX_MODULE_INDEX),
            None => Ok(None),
        }
    }

    /// The last component of a symlink's target (`driver` → `nvidia`,
    /// `iommu_group` → `12`); `Ok(None)` if the link does not exist.
    pub fn link_name(&self, path: &Path) -> Result<Option<String>, HostError> {
        match self.read_link(path) {
            Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(HostError::io(path, e)),
        }
    }

    /// The running kernel release (`proc/sys/kernel/osrelease`).
    pub fn kernel_release(&self) -> Result<Option<String>, HostError> {
        Ok(self
            .read_opt(&self.rel("proc/sys/kernel/osrelease"))?
            .map(|s| s.trim().to_string())
            .filter(|s| is_safe_component(s)))
    }

    /// `lib/modules/<release>/<file>` for the running kernel, if the release is known.
    pub fn modules_file(&self, file: &str) -> Result<Option<PathBuf>, HostError> {
        Ok(self
            .kernel_release()?
            .map(|rel| self.rel("lib/modules").join(rel).join(file)))
    }

    /// This boot's id (`proc/sys/kernel/random/boot_id`).
    pub fn boot_id(&self) -> Result<Option<String>, HostError> {
        Ok(self
            .read_opt(&self.rel("proc/sys/kernel/random/boot_id"))?
            .map(|s| s.trim().to_string()))
    }
}

/// True if `s` can be one path component (no `/`, not `.`/`..`, not empty, printable).
pub(crate) fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && !s.contains('/')
        && !s.chars().any(|c| c.is_control())
}

impl HostRoot {
    /// Reads at most `max` bytes of a text file, trimmed of the trailing
    /// newline; `Ok(None)` when it does not exist.
    pub fn read_limited(&self, path: &Path, max: u64) -> Result<Option<String>, HostError> {
        let file = match self.open_file(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(HostError::io(path, e)),
        };
        let mut s = String::new();
        file.take(max)
            .read_to_string(&mut s)
            .map_err(|e| HostError::io(path, e))?;
        if s.ends_with('\n') {
            s.pop();
        }
        Ok(Some(s))
    }

    /// Reads at most `max` bytes of a file as bytes; `Ok(None)` when it
    /// does not exist.
    pub fn read_bytes_limited(&self, path: &Path, max: u64) -> Result<Option<Vec<u8>>, HostError> {
        let file = match self.open_file(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(HostError::io(path, e)),
        };
        let mut buf = Vec::new();
        file.take(max)
            .read_to_end(&mut buf)
            .map_err(|e| HostError::io(path, e))?;
        Ok(Some(buf))
    }
}
