use std::fs;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use crate::{Bdf, DriverName, HostError};

/// The root under which every host path is read: sysfs, `/proc`, `/etc`,
/// `/dev`, `/lib/modules`. `/` on a node, `/host-root` in a pod, a fixture
/// directory in tests.
///
/// Paths are built only from fixed relative paths and validated types
/// ([`Bdf`], [`DriverName`], group numbers), never from free-form strings.
#[derive(Clone, Debug)]
pub struct HostRoot {
    root: PathBuf,
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
        let meta = fs::metadata(&root).map_err(|e| bad(e.to_string()))?;
        if !meta.is_dir() {
            return Err(bad("not a directory".into()));
        }
        let pci = root.join("sys/bus/pci/devices");
        match fs::read_dir(&pci) {
            Ok(_) => {}
            Err(e) => {
                return Err(bad(format!(
                    "cannot list sys/bus/pci/devices ({e}); is this a host root with sysfs?"
                )));
            }
        }
        Ok(HostRoot { root })
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
        read_bounded(path, MAX_ATTR)
    }

    /// Reads a binary file (at most `max` bytes). `Ok(None)` when it does not
    /// exist.
    pub fn read_bytes_opt(&self, path: &Path, max: usize) -> Result<Option<Vec<u8>>, HostError> {
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(HostError::io(path, e)),
        };
        let mut bytes = Vec::new();
        file.take(max as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| HostError::io(path, e))?;
        Ok(Some(bytes))
    }

    /// Reads a module index of the running kernel
    /// (`lib/modules/<release>/<file>`, e.g. `modules.alias`) whole.
    /// `Ok(None)` when the release is unknown or the file does not exist.
    pub fn read_module_index(&self, file: &str) -> Result<Option<String>, HostError> {
        match self.modules_file(file)? {
            Some(path) => read_bounded(&path, MAX_MODULE_INDEX),
            None => Ok(None),
        }
    }

    /// The last component of a symlink's target (`driver` → `nvidia`,
    /// `iommu_group` → `12`); `Ok(None)` if the link does not exist.
    pub fn link_name(&self, path: &Path) -> Result<Option<String>, HostError> {
        match fs::read_link(path) {
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

/// Reads at most `max` bytes of a text file, trimmed of the trailing newline.
fn read_bounded(path: &Path, max: u64) -> Result<Option<String>, HostError> {
    let file = match fs::File::open(path) {
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
