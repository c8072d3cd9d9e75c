//! Target `parse_intent`: arbitrary bytes to every intent parser and to a
//! whole evaluation (whatever a host's /proc/cmdline or modprobe.d holds).
//! Property: nothing panics, and a verdict keeps the GPU on vfio exactly when
//! it gives a reason.

use std::path::Path;

use vfio_gpu_host::{Bdf, DriverName, FunctionRole, Gpu, GpuFunction, PciFunction, PciIdentity};
use vfio_gpu_intent::modprobe::{parse_file, parse_initramfs_modules};
use vfio_gpu_intent::{
    Driverctl, DriverctlSetting, IntentSources, ModprobeConfig, NoRecords, Policy,
    effective_vfio_ids, evaluate, kernel_params, kmod_options, parse_ids,
};
fn gpu(driver: &str, driver_override: Option<String>) -> Option<Gpu> {
    let bdf: Bdf = "0000:65:00.0".parse().ok()?;
    let identity = PciIdentity {
        vendor: 0x10de,
        device: 0x2330,
        subsystem_vendor: 0x10de,
        subsystem_device: 0x16c1,
        class: 0x030200,
    };
    let driver = DriverName::new(driver).ok();
    Some(Gpu {
        function: PciFunction {
            bdf,
            identity,
            revision: 0xa1,
            driver: driver.clone(),
            driver_override: driver_override.clone(),
            iommu_group: Some(1),
            numa_node: None,
            pcie_root: None,
            sriov_total_vfs: None,
            sriov_num_vfs: None,
            is_virtual_function: false,
            is_bridge: false,
            vfio_dev: None,
            modalias: None,
            bar_bytes: 0,
            bar_prefetchable64_bytes: 0,
            nvlink_management: false,
        },
        functions: vec![GpuFunction {
            bdf,
            role: FunctionRole::Gpu,
            identity,
            driver,
            driver_override,
            vfio_dev: None,
        }],
        iommu_group_members: Vec::new(),
        unreadable_members: Vec::new(),
        product_name: None,
    })
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);

    let kmod = kmod_options(&text);
    // Only panics are findings here: every parser must take any text.
    let _ = kernel_params(&text);
    let _ = parse_ids(&text);
    let _ = DriverctlSetting::classify(&text);
    let _ = Policy::parse(&text, Path::new("/fuzz/policy.toml"));

    let mut cfg = ModprobeConfig::default();
    cfg.absorb(parse_file(&text, "/etc/modprobe.d/fuzz.conf"));
    cfg.initramfs_options = parse_initramfs_modules(&text, "/etc/initramfs-tools/modules");
    // Only a panic is a finding; any answer is valid.
    let _ = effective_vfio_ids(&cfg, &kmod);

    let builtin = match selector % 3 {
        0 => Some(true),
        1 => Some(false),
        _ => None,
    };
    let sources =
        IntentSources::from_parts(&text, cfg, builtin, Driverctl::default(), Policy::default());
    let driver = if selector & 4 != 0 {
        "vfio-pci"
    } else {
        "nvidia"
    };
    let over = (selector & 8 != 0).then(|| text.chars().take(16).collect());
    if let Some(g) = gpu(driver, over) {
        let v = evaluate(&sources, &g, &NoRecords);
        assert_eq!(v.keep_on_vfio, !v.reasons.is_empty());
    }
}
