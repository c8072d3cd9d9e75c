//! Node-level facts for `vfio-gpu-dra doctor`: IOMMU hardware units, IOMMU
//! groups, the CPU vendor and where the vfio-pci module lives. Read-only, and
//! every path is built from literals or validated directory entries under the
//! [`HostRoot`].

use std::io::ErrorKind;

use crate::root::is_safe_component;
use crate::{HostError, HostRoot};

/// What kind of IOMMU a `sys/class/iommu/<unit>` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuKind {
    /// Intel VT-d remapping unit (`dmarN`, with an `intel-iommu/` directory).
    IntelVtd,
    /// AMD-Vi unit (`ivhdN`, with an `amd-iommu/` directory).
    AmdVi,
    /// Anything else (ARM SMMU, virtio-iommu, …).
    Other,
}

/// One IOMMU hardware unit from `sys/class/iommu`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuUnit {
    /// The unit's name, e.g. `dmar0`.
    pub name: String,
    /// Its kind.
    pub kind: IommuKind,
    /// Intel only: the VT-d extended capability register
    /// (`intel-iommu/ecap`, hex); `None` when absent or unparsable.
    pub ecap: Option<u64>,
}

impl IommuUnit {
    /// VT-d ECAP bit 3 (IR): the unit supports interrupt remapping.
    /// `None` for non-Intel units or an unreadable register.
    pub fn supports_interrupt_remapping(&self) -> Option<bool> {
        self.ecap.map(|e| e & (1 << 3) != 0)
    }
}

/// The CPU vendor from `proc/cpuinfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD` (or `HygonGenuine`, which uses AMD-Vi).
    Amd,
    /// Another vendor or no `vendor_id` line (e.g. ARM).
    Other,
}

/// What `proc/cpuinfo` says that matters for the IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuInfo {
    /// Vendor; `None` when `proc/cpuinfo` is missing.
    pub vendor: Option<CpuVendor>,
    /// The `hypervisor` flag: this node is itself a virtual machine.
    pub hypervisor: bool,
}

/// Lists `sys/class/iommu`: empty when the directory is missing (no IOMMU
/// driver registered any unit).
pub fn iommu_units(root: &HostRoot) -> Result<Vec<IommuUnit>, HostError> {
    let dir = root.rel("sys/class/iommu");
    let entries = match root.read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(HostError::io(&dir, e)),
    };
    let mut units = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| HostError::io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // A directory entry is one component already; refuse anything odd anyway.
        if !is_safe_component(&name) {
            continue;
        }
        let unit = dir.join(&name);
        let (kind, ecap) = if root.is_dir(&unit.join("intel-iommu")) {
            let ecap = root
                .read_opt(&unit.join("intel-iommu/ecap"))?
                .and_then(|s| parse_hex_u64(&s));
            (IommuKind::IntelVtd, ecap)
        } else if root.is_dir(&unit.join("amd-iommu")) {
            (IommuKind::AmdVi, None)
        } else {
            (IommuKind::Other, None)
        };
        units.push(IommuUnit { name, kind, ecap });
    }
    units.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(units)
}

/// The number of IOMMU groups in `sys/kernel/iommu_groups` (0 when the
/// directory is missing or empty: the IOMMU is off).
pub fn iommu_group_count(root: &HostRoot) -> Result<usize, HostError> {
    let dir = root.iommu_groups_dir();
    match root.read_dir(&dir) {
        Ok(entries) => {
            let mut n = 0;
            for e in entries {
                let e = e.map_err(|err| HostError::io(&dir, err))?;
                if e.file_name().to_string_lossy().parse::<u32>().is_ok() {
                    n += 1;
                }
            }
            Ok(n)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
        Err(e) => Err(HostError::io(&dir, e)),
    }
}

/// Reads `proc/cpuinfo` (the first `vendor_id` and `flags` lines).
pub fn cpu_info(root: &HostRoot) -> Result<CpuInfo, HostError> {
    let Some(text) = root.read_opt(&root.rel("proc/cpuinfo"))? else {
        return Ok(CpuInfo {
            vendor: None,
            hypervisor: false,
        });
    };
    Ok(parse_cpuinfo(&text))
}

fn parse_cpuinfo(text: &str) -> CpuInfo {
    let field = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let vendor = match field("vendor_id").as_deref() {
        Some("GenuineIntel") => CpuVendor::Intel,
        Some("AuthenticAMD" | "HygonGenuine") => CpuVendor::Amd,
        _ => CpuVendor::Other,
    };
    let hypervisor =
        field("flags").is_some_and(|f| f.split_whitespace().any(|w| w == "hypervisor"));
    CpuInfo {
        vendor: Some(vendor),
        hypervisor,
    }
}

/// Where the vfio-pci module can come from on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioModuleFiles {
    /// The running kernel release, if known.
    pub release: Option<String>,
    /// The `modules.dep` entry naming vfio-pci (e.g.
    /// `kernel/drivers/vfio/pci/vfio-pci.ko.zst`), if any.
    pub modules_dep_entry: Option<String>,
    /// True when `modules.dep` could be read at all.
    pub modules_dep_read: bool,
    /// The `.ko` file found under `lib/modules/<release>/kernel/drivers/vfio/pci/`.
    pub ko_file: Option<String>,
}

impl VfioModuleFiles {
    /// True when modprobe could load vfio-pci.
    pub fn loadable(&self) -> bool {
        self.modules_dep_entry.is_some() || self.ko_file.is_some()
    }
}

/// Looks for vfio-pci in `lib/modules/<release>/modules.dep` and for its
/// `.ko` (any compression) in the kernel's module tree.
pub fn vfio_module_files(root: &HostRoot) -> Result<VfioModuleFiles, HostError> {
    let release = root.kernel_release()?;
    let mut out = VfioModuleFiles {
        release,
        modules_dep_entry: None,
        modules_dep_read: false,
        ko_file: None,
    };
    if let Some(path) = root.modules_file("modules.dep")?
        && let Some(text) = read_large(root, &path)?
    {
        out.modules_dep_read = true;
        out.modules_dep_entry = text.lines().find_map(|l| {
            let module = l.split(':').next()?.trim();
            is_vfio_pci_ko(module).then(|| module.to_string())
        });
    }
    for name in [
        "vfio-pci.ko",
        "vfio-pci.ko.xz",
        "vfio-pci.ko.zst",
        "vfio-pci.ko.gz",
    ] {
        if let Some(dir) = root.modules_file("kernel/drivers/vfio/pci")?
            && root.metadata(&dir.join(name)).is_ok_and(|m| m.is_file())
        {
            out.ko_file = Some(format!("kernel/drivers/vfio/pci/{name}"));
            break;
        }
    }
    Ok(out)
}

/// Why this kernel cannot serve VFIO's iommufd interface (`/dev/iommu` plus
/// `/dev/vfio/devices/vfioN`), or `None` when it can or nothing rules it out.
///
/// Meant to run before a GPU moves: a function's cdev appears only once it is on
/// vfio-pci, so what can be known beforehand is the kernel's build configuration
/// (`boot/config-<release>`), else the `/dev/iommu` node or an iommufd module.
pub fn iommufd_unsupported(root: &HostRoot) -> Result<Option<String>, HostError> {
    let release = root.kernel_release()?;
    if let Some(rel) = &release
        && let Some(config) = read_large(root, &root.rel("boot").join(format!("config-{rel}")))?
    {
        let enabled = |option: &str| {
            config.lines().any(|l| {
                l.strip_prefix(option)
                    .and_then(|v| v.strip_prefix('='))
                    .is_some_and(|v| v == "y" || v == "m")
            })
        };
        if !enabled("CONFIG_IOMMUFD") {
            return Ok(Some(format!(
                "kernel {rel} is built without CONFIG_IOMMUFD (no /dev/iommu)"
            )));
        }
        if !enabled("CONFIG_VFIO_DEVICE_CDEV") {
            return Ok(Some(format!(
                "kernel {rel} is built without CONFIG_VFIO_DEVICE_CDEV (no /dev/vfio/devices/vfioN)"
            )));
        }
        return Ok(None);
    }
    if root.exists_lossy(&root.rel("dev/iommu")) {
        return Ok(None);
    }
    // iommufd as a module (or built in): loading vfio brings it.
    for file in ["modules.builtin", "modules.dep"] {
        if let Some(path) = root.modules_file(file)?
            && let Some(text) = read_large(root, &path)?
            && text
                .lines()
                .any(|l| is_iommufd_ko(l.split(':').next().unwrap_or_default()))
        {
            return Ok(None);
        }
    }
    Ok(Some(format!(
        "kernel {} has no /dev/iommu and no iommufd module (the iommufd backend needs Linux >= 6.6 with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV)",
        release.as_deref().unwrap_or("(release unknown)")
    )))
}

/// `…/iommufd.ko`, compressed or not.
fn is_iommufd_ko(path: &str) -> bool {
    let base = path.trim().rsplit('/').next().unwrap_or("");
    matches!(
        base,
        "iommufd.ko" | "iommufd.ko.xz" | "iommufd.ko.zst" | "iommufd.ko.gz"
    )
}

/// `…/vfio-pci.ko` or `…/vfio_pci.ko`, compressed or not.
fn is_vfio_pci_ko(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or("");
    let stem = base
        .strip_suffix(".xz")
        .or_else(|| base.strip_suffix(".zst"))
        .or_else(|| base.strip_suffix(".gz"))
        .unwrap_or(base);
    matches!(stem, "vfio-pci.ko" | "vfio_pci.ko")
}

/// `modules.dep` is far larger than a sysfs attribute (hundreds of KiB);
/// cap it well above any real one.
fn read_large(root: &HostRoot, path: &std::path::Path) -> Result<Option<String>, HostError> {
    const MAX: u64 = 32 << 20;
    Ok(root
        .read_bytes_limited(path, MAX)?
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
}

fn parse_hex_u64(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    u64::from_str_radix(t, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_vendor_and_hypervisor() {
        let i = parse_cpuinfo(
            "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vmx hypervisor\n",
        );
        assert_eq!(i.vendor, Some(CpuVendor::Intel));
        assert!(i.hypervisor);
        let a = parse_cpuinfo("vendor_id : AuthenticAMD\nflags : fpu svm\n");
        assert_eq!(a.vendor, Some(CpuVendor::Amd));
        assert!(!a.hypervisor);
        assert_eq!(
            parse_cpuinfo("CPU implementer : 0x41\n").vendor,
            Some(CpuVendor::Other)
        );
    }

    #[test]
    fn ecap_interrupt_remapping_bit() {
        let unit = |ecap| IommuUnit {
            name: "dmar0".into(),
            kind: IommuKind::IntelVtd,
            ecap,
        };
        // 0x66 = 0b0110_0110: bit 3 clear; 0x…ef has bit 3 set.
        assert_eq!(unit(Some(0x66)).supports_interrupt_remapping(), Some(false));
        assert_eq!(
            unit(Some(0xf0205ef)).supports_interrupt_remapping(),
            Some(true)
        );
        assert_eq!(unit(None).supports_interrupt_remapping(), None);
        assert_eq!(parse_hex_u64("f0205ef\n"), Some(0xf0205ef));
    }

    #[test]
    fn vfio_pci_ko_names() {
        assert!(is_vfio_pci_ko("kernel/drivers/vfio/pci/vfio-pci.ko.zst"));
        assert!(is_vfio_pci_ko("kernel/drivers/vfio/pci/vfio-pci.ko"));
        assert!(!is_vfio_pci_ko("kernel/drivers/vfio/pci/vfio-pci-core.ko"));
        assert!(!is_vfio_pci_ko("kernel/drivers/vfio/vfio.ko"));
    }

    #[test]
    fn iommufd_support_from_config_node_or_module() {
        let dir = tempfile::tempdir().unwrap();
        let h = crate::fixture::FixtureHost::create(dir.path()).unwrap();
        let root = HostRoot::open(dir.path()).unwrap();
        let rel = root
            .kernel_release()
            .unwrap()
            .expect("fixture has a release");
        let why = iommufd_unsupported(&root)
            .unwrap()
            .expect("nothing says iommufd");
        assert!(why.contains("no /dev/iommu"), "{why}");
        h.write(
            &format!("lib/modules/{rel}/modules.dep"),
            "kernel/drivers/iommu/iommufd/iommufd.ko.zst:\n",
        )
        .unwrap();
        assert_eq!(iommufd_unsupported(&root).unwrap(), None);
        // The build configuration, when readable, is the authority.
        h.write(
            &format!("boot/config-{rel}"),
            "CONFIG_IOMMUFD=m\n# CONFIG_VFIO_DEVICE_CDEV is not set\n",
        )
        .unwrap();
        let why = iommufd_unsupported(&root).unwrap().expect("no cdev");
        assert!(why.contains("CONFIG_VFIO_DEVICE_CDEV"), "{why}");
        h.write(
            &format!("boot/config-{rel}"),
            "CONFIG_IOMMUFD=y\nCONFIG_VFIO_DEVICE_CDEV=y\n",
        )
        .unwrap();
        assert_eq!(iommufd_unsupported(&root).unwrap(), None);
        h.write(&format!("boot/config-{rel}"), "CONFIG_VFIO_DEVICE_CDEV=y\n")
            .unwrap();
        assert!(
            iommufd_unsupported(&root)
                .unwrap()
                .unwrap()
                .contains("CONFIG_IOMMUFD")
        );
    }
}
