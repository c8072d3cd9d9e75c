#![allow(clippy::disallowed_methods)] // tests read the fixtures they build
//! Host-model tests on real fixture trees (real directories, real symlinks).

use std::fs;
use std::path::Path;

use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec, rel_symlink};
use vfio_gpu_host::{
    Bdf, FunctionRole, GpuSelector, HostRoot, IdMatch, PciHost, PciIdsDb, discover_gpus,
};

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// Builds a tree from the read-only capture of a real H200 host
/// (`tests/data/h200-pci-sysfs.json`, copied into the project).
fn h200_capture_tree(root: &Path) {
    let text = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/h200-pci-sysfs.json"),
    )
    .unwrap();
    let capture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let host = FixtureHost::create(root).unwrap();
    for (name, dev) in capture["devices"].as_object().unwrap() {
        let realpath = dev["realpath"].as_str().unwrap().trim_start_matches('/');
        let dir = root.join(realpath);
        fs::create_dir_all(&dir).unwrap();
        for (attr, value) in dev.as_object().unwrap() {
            match (attr.as_str(), value) {
                ("entries" | "realpath" | "subsystem" | "firmware_node", _) => {}
                ("driver", serde_json::Value::String(target)) => {
                    let drv = Path::new(target).file_name().unwrap().to_str().unwrap();
                    host.add_driver(drv).unwrap();
                    host.link_driver(bdf(name), drv).ok();
                }
                (_, serde_json::Value::String(v)) => {
                    fs::write(dir.join(attr), format!("{v}\n")).unwrap();
                }
                _ => {}
            }
        }
        rel_symlink(&dir, &root.join("sys/bus/pci/devices").join(name)).unwrap();
        if let Some(target) = dev.get("driver").and_then(|d| d.as_str()) {
            let drv = Path::new(target).file_name().unwrap().to_str().unwrap();
            host.link_driver(bdf(name), drv).unwrap();
        }
    }
}

#[test]
fn real_h200_capture() {
    let dir = tempfile::tempdir().unwrap();
    h200_capture_tree(dir.path());
    let root = HostRoot::open(dir.path()).unwrap();
    let selector = GpuSelector::default();
    let host = PciHost::scan(&root, &selector).unwrap();
    assert_eq!(host.addresses().len(), 7);
    assert!(!host.iommu_present());
    let gpus = discover_gpus(&host, &selector, None);
    assert_eq!(gpus.len(), 1, "exactly the H200, not the virtio devices");
    let g = &gpus[0];
    assert_eq!(g.bdf(), bdf("0000:00:06.0"));
    assert_eq!(g.function.identity.vendor, 0x10de);
    assert_eq!(g.function.identity.device, 0x2335);
    assert_eq!(g.function.identity.subsystem_device, 0x18bf);
    assert_eq!(g.function.identity.class, 0x030200);
    assert_eq!(g.function.revision, 0xa1);
    assert_eq!(g.function.driver.as_ref().unwrap().as_str(), "nvidia");
    assert_eq!(g.function.driver_override, None, "(null) means unset");
    assert_eq!(g.function.iommu_group, None);
    assert_eq!(g.function.numa_node, None, "-1 means no NUMA node");
    assert_eq!(g.function.pcie_root.as_deref(), Some("pci0000:00"));
    assert_eq!(g.functions.len(), 1);
    let json = serde_json::to_value(g).unwrap();
    assert_eq!(json["pciBusID"], "0000:00:06.0");
    assert_eq!(json["vendor"], "0x10de");
    assert_eq!(json["class"], "0x030200");
}

fn switch_host(root: &Path) -> FixtureHost {
    let mut h = FixtureHost::create(root).unwrap();
    let port = bdf("0000:64:00.0");
    h.add_function(
        &FunctionSpec::new(port, 0x1000, 0xc030, 0x060400)
            .bridge()
            .driver("pcieport")
            .group(10),
    )
    .unwrap();
    // VGA GPU + HDA audio in one group, behind a switch port.
    h.add_function(
        &FunctionSpec::new(bdf("0000:65:00.0"), 0x10de, 0x26b1, 0x030000)
            .subsystem(0x10de, 0x16a1)
            .driver("nvidia")
            .group(11)
            .numa(1)
            .under(port)
            .bars(&[16 << 20, 64 << 30]),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:65:00.1"), 0x10de, 0x22ba, 0x040300)
            .driver("snd_hda_intel")
            .group(11)
            .under(port),
    )
    .unwrap();
    // A GPU whose group also holds a NIC.
    h.add_function(
        &FunctionSpec::new(bdf("0000:66:00.0"), 0x10de, 0x27b8, 0x030200)
            .driver("nvidia")
            .group(12),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:66:01.0"), 0x15b3, 0x101d, 0x020000)
            .driver("mlx5_core")
            .group(12),
    )
    .unwrap();
    // An AMD GPU and a VF of an NVIDIA GPU: not selected by default.
    h.add_function(&FunctionSpec::new(bdf("0000:67:00.0"), 0x1002, 0x74a1, 0x038000).group(13))
        .unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:68:00.0"), 0x10de, 0x2330, 0x030200)
            .sriov(4, 0)
            .group(14),
    )
    .unwrap();
    let mut vf = FunctionSpec::new(bdf("0000:68:00.4"), 0x10de, 0x2331, 0x030200).group(15);
    vf.physfn = Some(bdf("0000:68:00.0"));
    h.add_function(&vf).unwrap();
    h
}

#[test]
fn companions_groups_roots_and_vfs() {
    let dir = tempfile::tempdir().unwrap();
    switch_host(dir.path());
    let root = HostRoot::open(dir.path()).unwrap();
    let sel = GpuSelector::default();
    let host = PciHost::scan(&root, &sel).unwrap();
    let gpus = discover_gpus(&host, &sel, None);
    let addrs: Vec<String> = gpus.iter().map(|g| g.bdf().to_string()).collect();
    assert_eq!(addrs, ["0000:65:00.0", "0000:66:00.0", "0000:68:00.0"]);

    let vga = &gpus[0];
    assert_eq!(vga.function.pcie_root.as_deref(), Some("pci0000:64"));
    assert_eq!(vga.function.numa_node, Some(1));
    assert_eq!(vga.function.bar_bytes, (16 << 20) + (64u64 << 30));
    let fns: Vec<(String, FunctionRole)> = vga
        .functions
        .iter()
        .map(|f| (f.bdf.to_string(), f.role))
        .collect();
    assert_eq!(
        fns,
        [
            ("0000:65:00.0".to_string(), FunctionRole::Gpu),
            ("0000:65:00.1".to_string(), FunctionRole::Companion)
        ]
    );
    assert_eq!(vga.blocking_members().count(), 0);

    let l4 = &gpus[1];
    let blocking: Vec<String> = l4.blocking_members().map(|m| m.bdf.to_string()).collect();
    assert_eq!(blocking, ["0000:66:01.0"], "the NIC blocks the move");

    let pf = &gpus[2];
    assert_eq!(pf.function.sriov_total_vfs, Some(4));
    assert_eq!(pf.function.sriov_num_vfs, Some(0));
}

#[test]
fn custom_selector_takes_other_vendors_and_vfs_on_request() {
    let dir = tempfile::tempdir().unwrap();
    switch_host(dir.path());
    let root = HostRoot::open(dir.path()).unwrap();
    let sel = GpuSelector::from_rules(vec![IdMatch::parse_id("1002:74a1").unwrap()]);
    let host = PciHost::scan(&root, &sel).unwrap();
    let gpus = discover_gpus(&host, &sel, None);
    assert_eq!(gpus.len(), 1);
    assert_eq!(gpus[0].bdf(), bdf("0000:67:00.0"));

    let mut sel = GpuSelector::from_rules(vec![IdMatch::parse_class("0x030200").unwrap()]);
    sel.include_virtual_functions = true;
    let host = PciHost::scan(&root, &sel).unwrap();
    let n = discover_gpus(&host, &sel, None).len();
    assert_eq!(n, 3, "L4, H100 PF and its VF");
    assert!(IdMatch::parse_id("zz:1").is_err());
    assert!(IdMatch::parse_class("0x1000000").is_err());
}

#[test]
fn bad_roots_are_clear_errors() {
    let err = HostRoot::open("/nonexistent/host-root").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/host-root"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = HostRoot::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("sys/bus/pci/devices"), "{err}");
}

#[test]
fn garbage_attributes_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = FixtureHost::create(dir.path()).unwrap();
    h.add_function(&FunctionSpec::new(
        bdf("0000:65:00.0"),
        0x10de,
        0x2330,
        0x030200,
    ))
    .unwrap();
    let class = h.device_dir(bdf("0000:65:00.0")).unwrap().join("class");
    fs::write(&class, "0xnothex\n").unwrap();
    h.add_function(&FunctionSpec::new(
        bdf("0000:66:00.0"),
        0x10de,
        0x2330,
        0x030200,
    ))
    .unwrap();
    // Entries that are not addresses are ignored.
    fs::create_dir(dir.path().join("sys/bus/pci/devices/not-a-bdf")).unwrap();
    let root = HostRoot::open(dir.path()).unwrap();
    let sel = GpuSelector::default();
    let host = PciHost::scan(&root, &sel).unwrap();
    assert_eq!(host.problems().len(), 1, "{:?}", host.problems());
    assert!(host.problems()[0].contains("0000:65:00.0"));
    assert!(host.problems()[0].contains("class"));
    let gpus = discover_gpus(&host, &sel, None);
    assert_eq!(gpus.len(), 1, "the healthy GPU is still found");
    assert_eq!(gpus[0].bdf(), bdf("0000:66:00.0"));
}

#[test]
fn demo_host_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    vfio_gpu_host::demo::build_demo_host(dir.path()).unwrap();
    let root = HostRoot::open(dir.path()).unwrap();
    let sel = GpuSelector::default();
    let host = PciHost::scan(&root, &sel).unwrap();
    let ids = PciIdsDb::load(&root).unwrap().unwrap();
    let gpus = discover_gpus(&host, &sel, Some(&ids));
    assert_eq!(gpus.len(), 8);
    let on_vfio = gpus.iter().filter(|g| g.function.on_vfio()).count();
    assert_eq!(on_vfio, 5);
    assert!(
        gpus.iter()
            .all(|g| g.function.vfio_dev.is_some() == g.function.on_vfio())
    );
    let ada = gpus
        .iter()
        .find(|g| g.function.identity.device == 0x26b1)
        .unwrap();
    assert_eq!(ada.functions.len(), 2);
    assert_eq!(
        ada.product_name.as_deref(),
        Some("AD102GL [RTX 6000 Ada Generation]")
    );
    assert!(dir.path().join("dev/vfio/5").exists());
}

#[test]
fn proc_bus_prefilter_agrees_with_sysfs() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = switch_host(dir.path());
    // Same bus/devfn in another domain: /proc/bus/pci/devices cannot tell them apart.
    h.add_function(
        &FunctionSpec::new(bdf("0001:65:00.0"), 0x10de, 0x2330, 0x030200)
            .driver("nvidia")
            .group(40),
    )
    .unwrap();
    let root = HostRoot::open(dir.path()).unwrap();
    let sel = GpuSelector::default();
    let with_proc: Vec<Bdf> = discover_gpus(&PciHost::scan(&root, &sel).unwrap(), &sel, None)
        .iter()
        .map(|g| g.bdf())
        .collect();
    assert!(with_proc.contains(&bdf("0001:65:00.0")));
    // Garbage in the procfs list: ignored, sysfs decides.
    fs::write(dir.path().join("proc/bus/pci/devices"), "not\ta list\n").unwrap();
    let garbage: Vec<Bdf> = discover_gpus(&PciHost::scan(&root, &sel).unwrap(), &sel, None)
        .iter()
        .map(|g| g.bdf())
        .collect();
    fs::remove_file(dir.path().join("proc/bus/pci/devices")).unwrap();
    let without: Vec<Bdf> = discover_gpus(&PciHost::scan(&root, &sel).unwrap(), &sel, None)
        .iter()
        .map(|g| g.bdf())
        .collect();
    assert_eq!(with_proc, without);
    assert_eq!(garbage, without);
    assert_eq!(without.len(), 4);
}

/// A group member is the GPU's companion only when it is on the GPU's slot
/// or linked as the GPU's consumer (M6, then review n6: not by vendor). A
/// chipset xHCI or a same-vendor device elsewhere is foreign; an unselected
/// display controller is another GPU.
#[test]
fn only_slot_or_consumer_members_are_companions() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = FixtureHost::create(dir.path()).unwrap();
    for d in ["nvidia", "xhci_hcd", "snd_hda_intel"] {
        h.add_driver(d).unwrap();
    }
    let gpu = bdf("0000:66:00.0");
    h.add_function(
        &FunctionSpec::new(gpu, 0x10de, 0x20b2, 0x030200)
            .driver("nvidia")
            .group(12),
    )
    .unwrap();
    // Intel chipset xHCI in the group: foreign.
    h.add_function(
        &FunctionSpec::new(bdf("0000:00:14.0"), 0x8086, 0xa36d, 0x0c0330)
            .driver("xhci_hcd")
            .group(12),
    )
    .unwrap();
    // Another vendor's HDA on another slot, linked as the GPU's consumer: companion.
    h.add_function(
        &FunctionSpec::new(bdf("0000:00:1f.3"), 0x8086, 0xa348, 0x040300)
            .driver("snd_hda_intel")
            .group(12),
    )
    .unwrap();
    let gdir = h.device_dir(gpu).unwrap();
    let cdir = h.device_dir(bdf("0000:00:1f.3")).unwrap();
    rel_symlink(&cdir, &gdir.join("consumer:pci:0000:00:1f.3")).unwrap();
    // Same vendor on another slot, no consumer link: foreign (review n6: a
    // vendor proves nothing, an Intel GPU's chipset neighbours are 8086 too).
    h.add_function(&FunctionSpec::new(bdf("0000:00:15.0"), 0x10de, 0x1aeb, 0x0c8000).group(12))
        .unwrap();
    // A display controller the selector did not pick: another GPU, never a companion.
    h.add_function(
        &FunctionSpec::new(bdf("0000:00:16.0"), 0x1002, 0x73bf, 0x030000)
            .driver("snd_hda_intel")
            .group(12),
    )
    .unwrap();
    let root = HostRoot::open(dir.path()).unwrap();
    let sel = GpuSelector::default();
    let host = PciHost::scan(&root, &sel).unwrap();
    let gpus = discover_gpus(&host, &sel, None);
    let roles: Vec<(String, FunctionRole)> = gpus[0]
        .iommu_group_members
        .iter()
        .map(|m| (m.bdf.to_string(), m.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("0000:00:14.0".to_string(), FunctionRole::Foreign),
            ("0000:00:15.0".to_string(), FunctionRole::Foreign),
            ("0000:00:16.0".to_string(), FunctionRole::OtherGpu),
            ("0000:00:1f.3".to_string(), FunctionRole::Companion),
            ("0000:66:00.0".to_string(), FunctionRole::Gpu),
        ]
    );
    let blocking: Vec<String> = gpus[0]
        .blocking_members()
        .map(|m| m.bdf.to_string())
        .collect();
    assert_eq!(blocking, ["0000:00:14.0", "0000:00:15.0", "0000:00:16.0"]);
}

#[test]
fn concurrent_vfio_dev_nodes_get_distinct_names() {
    // The simulated kernel binds the GPUs of one claim on their own threads;
    // picking "the lowest free vfioN" and then linking it raced: two binds
    // took the same N and the second failed with EEXIST (an 8-GPU prepare of
    // the HGX demo). The kernel hands out minors atomically, so must the fixture.
    let dir = tempfile::tempdir().unwrap();
    let h = vfio_gpu_host::demo::build_hgx_demo_host(dir.path()).unwrap();
    let gpus: Vec<Bdf> = vfio_gpu_host::demo::HGX_MODULE_MAP
        .iter()
        .map(|(b, _)| b.parse().unwrap())
        .collect();
    for round in 0..20 {
        let names: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = gpus
                .iter()
                .map(|g| {
                    let h = &h;
                    s.spawn(move || h.add_vfio_dev(*g))
                })
                .collect();
            handles
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap()
                        .unwrap_or_else(|e| panic!("round {round}: {e}"))
                })
                .collect()
        });
        let mut distinct = names.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), gpus.len(), "round {round}: {names:?}");
        for g in &gpus {
            h.remove_vfio_dev(*g).unwrap();
        }
    }
}
