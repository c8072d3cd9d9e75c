//! Target `sysfs`: host files the kernel (or a broken or hostile host) writes
//! — PCI attributes (`vendor`, `class`, `resource`, `numa_node`, …),
//! `modules.alias`, `pci.ids`, driverctl files, the policy file, GPU id
//! rules — read through the same code a node uses, from a real fixture tree.
//!
//! Input: one selector byte choosing the file, then its content (raw bytes:
//! sysfs can hold non-UTF-8). Properties: every rejection names the file it
//! came from; every accepted attribute reads back the same from its
//! canonical spelling; a chosen vfio driver comes from the alias file.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};
use vfio_gpu_host::{
    Bdf, GpuSelector, HostError, HostRoot, IdMatch, PciFunction, PciHost, PciIdsDb, discover_gpus,
};
use vfio_gpu_intent::{Driverctl, DriverctlSetting, Policy};

/// The fixture every exec reuses.
struct Host {
    root: HostRoot,
    gpu: Bdf,
    dir: PathBuf,
    alias: PathBuf,
}

const GPU: &str = "0000:65:00.0";
const KERNEL: &str = "6.1.0-fixture";

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let path = crate::scratch::dir("sysfs");
        // A leftover of an earlier run, or none: rebuilt below either way.
        let _ = fs::remove_dir_all(&path);
        let gpu: Bdf = GPU.parse().expect("fixture address");
        let audio = Bdf::new(0, 0x65, 0, 1).expect("fixture address");
        let mut fx = FixtureHost::create(&path).expect("fixture host");
        fx.add_function(
            &FunctionSpec::new(gpu, 0x10de, 0x2330, 0x03_0200)
                .subsystem(0x10de, 0x16c1)
                .driver("nvidia")
                .group(7)
                .bars(&[16 << 20, 64 << 30, 32 << 20])
                .sriov(4, 0),
        )
        .expect("fixture GPU");
        fx.add_function(&FunctionSpec::new(audio, 0x10de, 0x22a3, 0x04_0300).group(7))
            .expect("fixture audio function");
        let alias = path.join(format!("lib/modules/{KERNEL}/modules.alias"));
        fx.write("proc/sys/kernel/osrelease", &format!("{KERNEL}\n"))
            .expect("fixture osrelease");
        fx.write(&format!("lib/modules/{KERNEL}/modules.alias"), "")
            .expect("fixture modules.alias");
        let root = HostRoot::open(&path).expect("fixture root");
        // The path the reader uses (through the bus symlink), so errors compare equal.
        let dir = root.pci_device_dir(&gpu);
        Host {
            root,
            gpu,
            dir,
            alias,
        }
    })
}

/// Attributes of the GPU's sysfs directory, and how each canonical value
/// is spelled (`None`: free text, no canonical form).
const ATTRS: &[&str] = &[
    "vendor",
    "device",
    "subsystem_vendor",
    "subsystem_device",
    "class",
    "revision",
    "numa_node",
    "sriov_totalvfs",
    "sriov_numvfs",
    "resource",
    "modalias",
    "driver_override",
];

/// The attribute files as the kernel would write `f`'s values.
fn canonical(attr: &str, f: &PciFunction) -> Option<String> {
    let id = &f.identity;
    Some(match attr {
        "vendor" => format!("0x{:04x}\n", id.vendor),
        "device" => format!("0x{:04x}\n", id.device),
        "subsystem_vendor" => format!("0x{:04x}\n", id.subsystem_vendor),
        "subsystem_device" => format!("0x{:04x}\n", id.subsystem_device),
        "class" => format!("0x{:06x}\n", id.class),
        "revision" => format!("0x{:02x}\n", f.revision),
        "numa_node" => format!("{}\n", f.numa_node.map_or(-1, i64::from)),
        "sriov_totalvfs" => format!("{}\n", f.sriov_total_vfs?),
        "sriov_numvfs" => format!("{}\n", f.sriov_num_vfs?),
        "driver_override" => format!("{}\n", f.driver_override.as_deref().unwrap_or("(null)")),
        "modalias" => format!("{}\n", f.modalias.as_deref()?),
        _ => return None,
    })
}

/// One PCI attribute of the GPU holds `content`.
fn check_attr(h: &Host, attr: &str, content: &[u8]) {
    let path = h.dir.join(attr);
    let original = fs::read(&path).expect("fixture attribute");
    fs::write(&path, content).expect("writing the attribute");
    match PciFunction::read(&h.root, h.gpu) {
        Ok(f) => {
            if let Some(text) = canonical(attr, &f) {
                fs::write(&path, text.as_bytes()).expect("writing the attribute");
                let again = PciFunction::read(&h.root, h.gpu);
                assert!(
                    matches!(&again, Ok(g) if *g == f),
                    "{attr}: {content:?} read as {f:?}, its canonical form {text:?} as {again:?}"
                );
                fs::write(&path, content).expect("writing the attribute");
            }
            // The whole scan and grouping must take whatever the attribute held.
            let selector = GpuSelector::default();
            if let Ok(pci) = PciHost::scan(&h.root, &selector) {
                // Only a panic is a finding; an error is a valid answer.
                let _ = discover_gpus(&pci, &selector, None);
            }
        }
        Err(HostError::Parse { path: p, .. } | HostError::Io { path: p, .. }) => {
            assert_eq!(
                p, path,
                "the error names another file than the one at fault"
            );
        }
        Err(e) => panic!("{attr}: unexpected error kind: {e}"),
    }
    fs::write(&path, original).expect("restoring the attribute");
}

/// `modules.alias` decides the vfio variant driver.
fn check_alias(h: &Host, text: &str) {
    fs::write(&h.alias, text).expect("writing modules.alias");
    let Ok(f) = PciFunction::read(&h.root, h.gpu) else {
        panic!("the fixture GPU must read");
    };
    let d = vfio_gpu_engine::preflight::choose_vfio_driver(&h.root, &f);
    let name = d.as_str();
    let from_alias = text.lines().any(|l| {
        let mut it = l.split_whitespace();
        it.next() == Some("alias")
            && it.next().is_some_and(|p| p.starts_with("vfio_pci:"))
            && it
                .next()
                .is_some_and(|m| m == name || m.replace('_', "-") == name)
    });
    assert!(
        name == "vfio-pci" || from_alias,
        "driver {name:?} is neither vfio-pci nor a module of a vfio_pci alias"
    );
}

/// `pci.ids`: a name is only ever one the file gives.
fn check_pci_ids(text: &str) {
    let db = PciIdsDb::from_text(text);
    for name in db.names([(0x10de, 0x2330), (0x1002, 0x74a1)]).values() {
        assert!(
            text.contains(name.as_str()),
            "name {name:?} not in the file"
        );
    }
}

/// One driverctl file: first line is its name, the rest its content.
fn check_driverctl(h: &Host, data: &[u8]) {
    let dir = h.root.rel(vfio_gpu_intent::driverctl::DRIVERCTL_DIR);
    // A leftover of the previous input, or none: recreated below either way.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("driverctl dir");
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let name = String::from_utf8_lossy(&data[..split]);
    let content = data.get(split + 1..).unwrap_or_default();
    // Only names a directory entry can have.
    if name.is_empty()
        || name.contains(['/', '\0'])
        || name == "."
        || name == ".."
        || name.len() > 255
    {
        return;
    }
    fs::write(dir.join(name.as_ref()), content).expect("writing the driverctl file");
    let dc = Driverctl::load(&h.root);
    let canonical = name
        .strip_prefix("pci-")
        .and_then(|d| d.parse::<Bdf>().ok().filter(|b| b.to_string() == d));
    match canonical {
        Some(bdf) => {
            let entry = dc.entries.get(&bdf);
            assert!(entry.is_some(), "{name}: canonical driverctl file ignored");
            if let (Some(e), Ok(text)) = (entry, std::str::from_utf8(content)) {
                assert_eq!(e.setting, DriverctlSetting::classify(text), "{name}");
            }
        }
        None => assert!(dc.entries.is_empty(), "{name}: non-canonical file applied"),
    }
    // Scratch cleanup; the next input removes it again anyway.
    let _ = fs::remove_dir_all(&dir);
}

/// The policy file: accepted or rejected with the path named.
fn check_policy(text: &str) {
    let path = Path::new("/etc/vfio-gpu-dra/policy.toml");
    if let Err(e) = Policy::parse(text, path) {
        let msg = e.to_string();
        assert!(
            msg.contains("policy.toml"),
            "policy error does not name the file: {msg}"
        );
    }
}

/// `--gpu-id` / `--gpu-class` rules (from the command line or the chart).
fn check_id_rules(text: &str) {
    for r in [IdMatch::parse_id(text), IdMatch::parse_class(text)] {
        match r {
            Ok(_) => {}
            Err(HostError::Parse { content, .. }) => {
                assert!(
                    text.starts_with(&content),
                    "error quotes {content:?}, not the input"
                );
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let Some((&selector, content)) = data.split_first() else {
        return;
    };
    let h = host();
    let text = String::from_utf8_lossy(content);
    let n = ATTRS.len();
    match usize::from(selector) % (n + 5) {
        i if i < n => check_attr(h, ATTRS[i], content),
        i if i == n => check_alias(h, &text),
        i if i == n + 1 => check_pci_ids(&text),
        i if i == n + 2 => check_driverctl(h, content),
        i if i == n + 3 => check_policy(&text),
        _ => check_id_rules(&text),
    }
}
