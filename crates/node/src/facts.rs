//! The node facts the checks judge, read under the host root. Never writes.

use std::collections::BTreeSet;

use vfio_gpu_host::{
    CpuInfo, CpuVendor, DriverName, HostError, HostRoot, IommuKind, IommuUnit, ModuleAliases,
    VfioModuleFiles, cpu_info, iommu_group_count, iommu_units, vfio_module_files,
};
use vfio_gpu_intent::modprobe::{BuiltinStatus, builtin_status, normalize_module};
use vfio_gpu_intent::{KernelParam, ModprobeConfig, kernel_params};

/// Everything the checks read about the node besides the GPUs.
pub struct NodeFacts {
    /// Kernel parameters before a bare `--` (`/proc/cmdline`).
    pub params: Vec<KernelParam>,
    /// `/proc/cpuinfo`.
    pub cpu: CpuInfo,
    /// Directories in `/sys/kernel/iommu_groups`.
    pub groups: usize,
    /// `/sys/class/iommu` units.
    pub units: Vec<IommuUnit>,
    /// `/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts`.
    pub allow_unsafe_interrupts: Option<bool>,
    /// vfio-pci built in or a module, and how we know.
    pub builtin: BuiltinStatus,
    /// vfio-pci in `modules.dep` / the module tree.
    pub module_files: VfioModuleFiles,
    /// Why we believe vfio-pci is loaded (the sysfs path), if it is.
    pub vfio_loaded: Option<&'static str>,
    /// Module names listed in `modules.dep` (normalised); `None` if unreadable.
    pub modules: Option<BTreeSet<String>>,
    /// Merged modprobe.d.
    pub modprobe: ModprobeConfig,
    /// Loaded PCI drivers (`/sys/bus/pci/drivers`), normalised.
    pub pci_drivers: BTreeSet<String>,
    /// Where vfio-pci is loaded early by the initramfs, if anywhere.
    pub early_vfio: Vec<String>,
    /// `modules.alias`: which host modules claim a GPU; `None` if unreadable.
    pub aliases: Option<ModuleAliases>,
    /// Modules built into the kernel (`modules.builtin`), normalised.
    pub builtin_modules: BTreeSet<String>,
}

impl NodeFacts {
    /// Reads the node under `root`. Never writes.
    pub fn read(root: &HostRoot) -> Result<Self, HostError> {
        let cmdline = root
            .read_opt(&root.rel("proc/cmdline"))?
            .unwrap_or_default();
        let params: Vec<KernelParam> = kernel_params(&cmdline)
            .into_iter()
            .filter(|p| !p.after_dashdash)
            .collect();
        let allow_unsafe_interrupts = root
            .read_opt(&root.rel("sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"))?
            .map(|v| matches!(v.trim(), "Y" | "y" | "1"));
        let vfio_loaded = if root.is_dir(&root.pci_driver_dir(&DriverName::vfio_pci())) {
            Some("/sys/bus/pci/drivers/vfio-pci")
        } else if root.is_dir(&root.rel("sys/module/vfio_pci")) {
            Some("/sys/module/vfio_pci")
        } else {
            None
        };
        let pci_drivers = match root.read_dir(&root.pci_drivers_dir()) {
            Ok(entries) => entries
                .flatten()
                .map(|e| normalize_module(&e.file_name().to_string_lossy()))
                .collect(),
            Err(_) => BTreeSet::new(),
        };
        let mut early_vfio = initramfs_vfio(root);
        if let Some(p) = last(&params, "rd.driver.pre")
            && p.split(',').any(|m| normalize_module(m) == "vfio_pci")
        {
            early_vfio.push("rd.driver.pre on the kernel command line".into());
        }
        Ok(NodeFacts {
            cpu: cpu_info(root)?,
            groups: iommu_group_count(root)?,
            units: iommu_units(root)?,
            allow_unsafe_interrupts,
            builtin: builtin_status(root),
            module_files: vfio_module_files(root)?,
            vfio_loaded,
            modules: modules_dep_names(root),
            aliases: ModuleAliases::read(root),
            builtin_modules: builtin_module_names(root),
            modprobe: ModprobeConfig::load(root),
            pci_drivers,
            early_vfio,
            params,
        })
    }

    /// A ready Intel VT-d node (IOMMU on with `intel_iommu=on iommu=pt`,
    /// interrupt remapping, vfio-pci a loaded module): the baseline that
    /// tests of the checks and of their rendering vary one fact of.
    pub fn ready_intel_example() -> Self {
        NodeFacts {
            params: kernel_params("ro intel_iommu=on iommu=pt"),
            cpu: CpuInfo {
                vendor: Some(CpuVendor::Intel),
                hypervisor: false,
            },
            groups: 4,
            units: vec![IommuUnit {
                name: "dmar0".into(),
                kind: IommuKind::IntelVtd,
                ecap: Some(0xf0205ef),
            }],
            allow_unsafe_interrupts: Some(false),
            builtin: BuiltinStatus {
                builtin: Some(false),
                detail: "a module".into(),
            },
            module_files: VfioModuleFiles {
                release: Some("6.1.0".into()),
                modules_dep_entry: Some("kernel/drivers/vfio/pci/vfio-pci.ko".into()),
                modules_dep_read: true,
                ko_file: None,
            },
            vfio_loaded: Some("/sys/bus/pci/drivers/vfio-pci"),
            modules: None,
            modprobe: ModprobeConfig::default(),
            pci_drivers: BTreeSet::new(),
            early_vfio: Vec::new(),
            aliases: None,
            builtin_modules: BTreeSet::new(),
        }
    }

    /// The value of the last `name` on the kernel command line (the
    /// kernel's rule); `Some("")` for a bare flag.
    pub fn param(&self, name: &str) -> Option<&str> {
        last(&self.params, name)
    }
}

/// The value of the last occurrence of a kernel parameter (the kernel's
/// rule for repeated parameters); `Some("")` for a bare flag.
fn last<'a>(params: &'a [KernelParam], name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|p| p.normalized_name == name.replace('-', "_"))
        .map(|p| p.value.as_deref().unwrap_or(""))
}

/// Module names in `modules.dep`, normalised (`-` → `_`), for "is this host
/// driver installed at all".
fn modules_dep_names(root: &HostRoot) -> Option<BTreeSet<String>> {
    let text = root.read_module_index("modules.dep").ok()??;
    Some(
        text.lines()
            .filter_map(|l| l.split(':').next())
            .filter_map(|m| m.rsplit('/').next())
            .filter_map(|b| b.split(".ko").next())
            .map(normalize_module)
            .collect(),
    )
}

/// Module names in `modules.builtin`, normalised: drivers that bind during
/// boot before any module loads.
fn builtin_module_names(root: &HostRoot) -> BTreeSet<String> {
    let Ok(Some(text)) = root.read_module_index("modules.builtin") else {
        return BTreeSet::new();
    };
    text.lines()
        .filter_map(|l| l.trim().rsplit('/').next())
        .filter_map(|b| b.strip_suffix(".ko"))
        .map(normalize_module)
        .collect()
}

/// vfio-pci in the initramfs: `/etc/initramfs-tools/modules` (first word of
/// a line) or dracut's `force_drivers` / `add_drivers` in
/// `/etc/dracut.conf.d/*.conf`. The initramfs loads it before udev loads
/// the GPU's host driver.
fn initramfs_vfio(root: &HostRoot) -> Vec<String> {
    let mut found = Vec::new();
    let names_vfio =
        |w: &str| normalize_module(w.trim_matches(['"', '\'', '(', ')'])) == "vfio_pci";
    if let Ok(Some(text)) = root.read_opt(&root.rel("etc/initramfs-tools/modules"))
        && text.lines().any(|l| {
            !l.trim_start().starts_with('#') && l.split_whitespace().next().is_some_and(names_vfio)
        })
    {
        found.push("/etc/initramfs-tools/modules".into());
    }
    if let Ok(entries) = root.read_dir(&root.rel("etc/dracut.conf.d")) {
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            if path.extension().is_none_or(|e| e != "conf") {
                continue;
            }
            let Ok(Some(text)) = root.read_opt(&path) else {
                continue;
            };
            let hit = text.lines().any(|l| {
                let l = l.trim_start();
                (l.starts_with("force_drivers") || l.starts_with("add_drivers"))
                    && l.split_once('=').is_some_and(|(_, v)| {
                        v.split(|c: char| c.is_whitespace() || c == '"')
                            .any(names_vfio)
                    })
            });
            if hit {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                found.push(format!("/etc/dracut.conf.d/{}", name.unwrap_or_default()));
            }
        }
    }
    found
}
