//! Module id ↔ BDF map: ranked sources, conflicts, the admin map file, FM
//! BDF parsing; endpoint parsing.

use std::collections::BTreeSet;
use std::path::Path;

use vfio_gpu_fabric::{
    Endpoint, FmError, ModuleId, ModuleMapBuilder, ModuleMapError, ModuleSource, Partition,
    PartitionGpu, PartitionId, PartitionList, Platform, parse_fm_bdf,
};
use vfio_gpu_host::Bdf;

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// KubeSwift's fixture: module → PCI-ordered index; module ids do not follow PCI order.
const KUBESWIFT: [(u32, usize); 8] = [
    (1, 4),
    (2, 6),
    (3, 5),
    (4, 7),
    (5, 0),
    (6, 2),
    (7, 1),
    (8, 3),
];
const PCI_ORDER: [&str; 8] = [
    "0000:18:00.0",
    "0000:2a:00.0",
    "0000:3a:00.0",
    "0000:5d:00.0",
    "0000:9a:00.0",
    "0000:ab:00.0",
    "0000:ba:00.0",
    "0000:db:00.0",
];

#[test]
fn non_pci_order_map_selects_the_right_partition() {
    let mut b = ModuleMapBuilder::new();
    for (module, idx) in KUBESWIFT {
        b.add(
            ModuleSource::AdminMap,
            bdf(PCI_ORDER[idx]),
            ModuleId(module),
        )
        .unwrap();
    }
    let map = b.build().unwrap();
    assert_eq!(map.len(), 8);
    // The first two GPUs in PCI order are modules 5 and 7: H100 pair partition 5.
    let modules = map
        .modules_of(&[bdf(PCI_ORDER[0]), bdf(PCI_ORDER[1])])
        .unwrap();
    assert_eq!(modules, BTreeSet::from([ModuleId(5), ModuleId(7)]));
    assert_eq!(
        Platform::HgxH100.topology().exact(&modules),
        Some(PartitionId(5))
    );
    // ... and no B200 pair (B200 pairs are adjacent: {5,6}, {7,8}).
    assert_eq!(Platform::HgxB200.topology().exact(&modules), None);
    assert_eq!(map.bdf_of(ModuleId(1)), Some(bdf(PCI_ORDER[4])));
    assert_eq!(
        map.modules_of(&[bdf(PCI_ORDER[0]), bdf("0000:01:00.0")]),
        Err(vec![bdf("0000:01:00.0")])
    );
}

#[test]
fn higher_source_wins_over_a_stale_ledger_hint() {
    let mut b = ModuleMapBuilder::new();
    b.add(ModuleSource::Ledger, bdf("0000:18:00.0"), ModuleId(3))
        .unwrap();
    b.add(ModuleSource::Nvml, bdf("0000:18:00.0"), ModuleId(5))
        .unwrap();
    b.add(ModuleSource::AdminMap, bdf("0000:2a:00.0"), ModuleId(7))
        .unwrap();
    let map = b.build().unwrap();
    let e = map.module_of(bdf("0000:18:00.0")).unwrap();
    assert_eq!((e.module, e.source), (ModuleId(5), ModuleSource::Nvml));
    assert_eq!(map.superseded().len(), 1);
    assert_eq!(map.superseded()[0].dropped.source, ModuleSource::Ledger);
    assert_eq!(
        map.module_of(bdf("0000:2a:00.0")).map(|e| e.source),
        Some(ModuleSource::AdminMap)
    );
}

#[test]
fn agreeing_sources_are_fine() {
    let mut b = ModuleMapBuilder::new();
    b.add(ModuleSource::Nvml, bdf("0000:18:00.0"), ModuleId(5))
        .unwrap();
    b.add(ModuleSource::AdminMap, bdf("0000:18:00.0"), ModuleId(5))
        .unwrap();
    b.add(ModuleSource::AdminMap, bdf("0000:18:00.0"), ModuleId(5))
        .unwrap();
    let map = b.build().unwrap();
    assert_eq!(
        map.module_of(bdf("0000:18:00.0")).map(|e| e.source),
        Some(ModuleSource::Nvml)
    );
    assert!(map.superseded().is_empty());
}

#[test]
fn conflicts_are_errors() {
    // One source, one BDF, two modules.
    let mut b = ModuleMapBuilder::new();
    b.add(ModuleSource::AdminMap, bdf("0000:18:00.0"), ModuleId(1))
        .unwrap();
    assert!(matches!(
        b.add(ModuleSource::AdminMap, bdf("0000:18:00.0"), ModuleId(2)),
        Err(ModuleMapError::TwoModules { .. })
    ));
    // NVML and the admin map disagree: the map is wrong, fail closed.
    let mut b = ModuleMapBuilder::new();
    b.add(ModuleSource::Nvml, bdf("0000:18:00.0"), ModuleId(1))
        .unwrap();
    b.add(ModuleSource::AdminMap, bdf("0000:18:00.0"), ModuleId(2))
        .unwrap();
    assert!(matches!(
        b.build(),
        Err(ModuleMapError::SourcesDisagree { .. })
    ));
    // One module on two BDFs, whatever the sources.
    let mut b = ModuleMapBuilder::new();
    b.add(ModuleSource::Nvml, bdf("0000:18:00.0"), ModuleId(1))
        .unwrap();
    b.add(ModuleSource::AdminMap, bdf("0000:2a:00.0"), ModuleId(1))
        .unwrap();
    match b.build() {
        Err(e @ ModuleMapError::TwoBdfs { .. }) => {
            let t = e.to_string();
            assert!(
                t.contains("0000:18:00.0") && t.contains("0000:2a:00.0"),
                "{t}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Module 0 is NVML's "unknown".
    assert!(matches!(
        ModuleMapBuilder::new().add(ModuleSource::Nvml, bdf("0000:18:00.0"), ModuleId(0)),
        Err(ModuleMapError::ZeroModule { .. })
    ));
}

#[test]
fn admin_map_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("modules.json");
    std::fs::write(&path, r#"{"0000:18:00.0": 5, "0000:2a:00.0": 7}"#).unwrap();
    let mut b = ModuleMapBuilder::new();
    b.add_admin_map_file(&path).unwrap();
    let map = b.build().unwrap();
    assert_eq!(
        map.module_of(bdf("0000:2a:00.0")).map(|e| e.module),
        Some(ModuleId(7))
    );

    for bad in [
        r#"{"0000:18:00": 5}"#,
        r#"{"0000:18:00.0": -1}"#,
        "[1,2]",
        "{",
    ] {
        let mut b = ModuleMapBuilder::new();
        assert!(
            matches!(
                b.add_admin_map(Path::new("x"), bad),
                Err(ModuleMapError::BadFile { .. })
            ),
            "{bad}"
        );
    }
    let mut b = ModuleMapBuilder::new();
    assert!(matches!(
        b.add_admin_map_file(&dir.path().join("absent")),
        Err(ModuleMapError::BadFile { .. })
    ));
    let big = dir.path().join("big.json");
    std::fs::write(&big, vec![b' '; 2 << 20]).unwrap();
    assert!(matches!(
        b.add_admin_map_file(&big),
        Err(ModuleMapError::BadFile { .. })
    ));
}

#[test]
fn fm_reported_bdfs() {
    assert_eq!(parse_fm_bdf("00000000:1B:00.0"), Some(bdf("0000:1b:00.0")));
    assert_eq!(parse_fm_bdf("0001:1b:00.1"), Some(bdf("0001:1b:00.1")));
    assert_eq!(parse_fm_bdf("00000000:00:00.0"), None, "all-zero = absent");
    assert_eq!(parse_fm_bdf(""), None);
    assert_eq!(parse_fm_bdf("00010000:1b:00.0"), None, "domain > 16 bits");
    assert_eq!(parse_fm_bdf("zz:1b:00.0"), None);

    let gpu = |m, b: &str| PartitionGpu {
        physical_id: ModuleId(m),
        uuid: String::new(),
        pci_bus_id: b.into(),
        num_nvlinks_available: 0,
        max_num_nvlinks: 0,
        nvlink_line_rate_mbps: 0,
    };
    let list = PartitionList {
        partitions: vec![Partition {
            id: PartitionId(1),
            is_active: false,
            gpus: vec![gpu(1, "00000000:18:00.0"), gpu(2, "00000000:00:00.0")],
        }],
        max_num_partitions: 64,
    };
    let mut b = ModuleMapBuilder::new();
    assert_eq!(b.add_fm_list(&list).unwrap(), 1);
    let map = b.build().unwrap();
    assert_eq!(
        map.module_of(bdf("0000:18:00.0")).map(|e| e.source),
        Some(ModuleSource::Fm)
    );
}

#[test]
fn endpoints_parse_and_build_connect_params() {
    let u: Endpoint = "unix:/run/nvidia-fabricmanager/socket".parse().unwrap();
    assert_eq!(u, Endpoint::default_unix());
    assert_eq!(u.to_string(), "unix:/run/nvidia-fabricmanager/socket");
    let p = u.connect_params_v2(1000).unwrap();
    assert_eq!(
        (p.address_type, p.address_is_unix_socket, p.timeout_ms),
        (2, 1, 1000)
    );

    let t: Endpoint = "tcp:127.0.0.1".parse().unwrap();
    assert_eq!(t.address_info(), "127.0.0.1:6666");
    let p = t.connect_params_v2(5).unwrap();
    assert_eq!((p.address_type, p.address_is_unix_socket), (1, 0));
    assert!(t.connect_params_v1(5).is_ok());

    let v: Endpoint = "vsock:3:6666".parse().unwrap();
    assert_eq!(v.address_info(), "3:6666");
    assert_eq!(v.connect_params_v2(5).unwrap().address_type, 3);
    assert!(matches!(
        v.connect_params_v1(5),
        Err(FmError::Endpoint { .. })
    ));

    for bad in [
        "tcp:fm.example:6666",
        "tcp:127.0.0.1:99999",
        "vsock:3",
        "unix:relative",
        "http://x",
        &format!("/{}", "a".repeat(300)),
    ] {
        assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
    }
}
