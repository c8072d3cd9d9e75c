//! Target `doctor_readers`: the node facts `doctor` and `serve` read
//! (`crates/node/src/facts.rs`: the kernel command line, `/proc/cpuinfo`, IOMMU
//! units, `allow_unsafe_interrupts`, the kernel release, `modules.dep`,
//! `modules.builtin`, `modules.alias`, modprobe.d, the initramfs-tools and dracut
//! module lists), and the checks that judge them, on a real fixture tree.
//!
//! Input: records, each a selector byte choosing the file, a 2-byte
//! little-endian length and that many bytes of content (the last record takes
//! what is left). Every exec starts from the fixture's own files.
//!
//! Properties:
//! - reading never writes: the fixture tree is byte for byte the same after;
//! - the kernel release used to find module files is one safe path component
//!   (a release of `../../etc` never leads outside `lib/modules`);
//! - what a reader reports comes from the file: an initramfs or dracut hit names
//!   a file that mentions vfio, `allow_unsafe_interrupts` is on only for `Y`,
//!   `y` or `1`, every kernel parameter's name is in the command line;
//! - the checks are complete and consistent: one isolation and one intent check
//!   per GPU, a fix exactly on the checks that do not pass.

use crate::input::records;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vfio_gpu_engine::inspect;
use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;
use vfio_gpu_node::{NodeFacts, Status, diagnose};

/// The files an input can fill, relative to the host root.
const FILES: &[&str] = &[
    "proc/cmdline",
    "proc/cpuinfo",
    "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
    "lib/modules/6.1.0-fixture/modules.dep",
    "lib/modules/6.1.0-fixture/modules.builtin",
    "lib/modules/6.1.0-fixture/modules.alias",
    "etc/modprobe.d/fuzz.conf",
    "usr/lib/modprobe.d/fuzz.conf",
    "etc/initramfs-tools/modules",
    "etc/dracut.conf.d/fuzz.conf",
    "sys/class/iommu/dmar0/intel-iommu/ecap",
    "proc/sys/kernel/osrelease",
];

struct Host {
    path: PathBuf,
    root: HostRoot,
    /// Each file's fixture content (`None`: absent), restored before every exec.
    originals: Vec<Option<Vec<u8>>>,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let path = crate::scratch::dir("doctor_readers");
        let _ = fs::remove_dir_all(&path);
        let gpu: Bdf = "0000:65:00.0".parse().expect("fixture address");
        let audio = Bdf::new(0, 0x65, 0, 1).expect("fixture address");
        let mut fx = FixtureHost::create(&path).expect("fixture host");
        fx.add_function(
            &FunctionSpec::new(gpu, 0x10de, 0x2330, 0x03_0200)
                .driver("nvidia")
                .group(7),
        )
        .expect("fixture GPU");
        fx.add_function(&FunctionSpec::new(audio, 0x10de, 0x22a3, 0x04_0300).group(7))
            .expect("fixture audio function");
        let files = [
            (
                "proc/cmdline",
                "BOOT_IMAGE=/vmlinuz ro intel_iommu=on iommu=pt\n",
            ),
            (
                "proc/cpuinfo",
                "vendor_id\t: GenuineIntel\nflags\t\t: fpu vmx\n",
            ),
            (FILES[2], "N\n"),
            (
                FILES[3],
                "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/vfio.ko\n",
            ),
            (FILES[4], "kernel/drivers/pci/pcie/portdrv.ko\n"),
            (FILES[5], "alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia\n"),
            (
                FILES[6],
                "options vfio-pci ids=10de:2330\nsoftdep nvidia pre: vfio-pci\n",
            ),
            (FILES[8], "vfio_pci\n"),
            (FILES[10], "f0205ef\n"),
        ];
        for (rel, text) in files {
            fx.write(rel, text).expect("fixture file");
        }
        fs::create_dir_all(path.join("etc/dracut.conf.d")).expect("fixture directory");
        fs::create_dir_all(path.join("usr/lib/modprobe.d")).expect("fixture directory");
        let originals = FILES.iter().map(|f| fs::read(path.join(f)).ok()).collect();
        let root = HostRoot::open(&path).expect("fixture root");
        Host {
            path,
            root,
            originals,
        }
    })
}

/// Every file and symlink under `dir`, with its content or target.
fn snapshot(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(t) = e.file_type() else { continue };
        if t.is_symlink() {
            let target = fs::read_link(&p).map(|t| t.into_os_string().into_encoded_bytes());
            out.insert(p, target.unwrap_or_default());
        } else if t.is_dir() {
            out.insert(p.clone(), Vec::new());
            snapshot(&p, out);
        } else {
            out.insert(p.clone(), fs::read(&p).unwrap_or_default());
        }
    }
}

fn mentions_vfio(path: &Path) -> bool {
    fs::read(path).is_ok_and(|t| {
        String::from_utf8_lossy(&t)
            .to_ascii_lowercase()
            .replace('-', "_")
            .contains("vfio_pci")
    })
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let h = host();
    for (rel, original) in FILES.iter().zip(&h.originals) {
        let p = h.path.join(rel);
        match original {
            Some(bytes) => fs::write(&p, bytes).expect("restoring a fixture file"),
            None => {
                let _ = fs::remove_file(&p);
            }
        }
    }
    for (sel, content) in records(data) {
        let rel = FILES[usize::from(sel) % FILES.len()];
        let p = h.path.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("fixture directory");
        }
        fs::write(&p, content).expect("writing a fixture file");
    }

    let mut before = BTreeMap::new();
    snapshot(&h.path, &mut before);
    let facts = NodeFacts::read(&h.root);
    let view = inspect(&h.root, &GpuSelector::default(), &Policy::default(), None);
    let mut after = BTreeMap::new();
    snapshot(&h.path, &mut after);
    assert!(before == after, "reading the node facts changed the tree");

    let Ok(facts) = facts else {
        return;
    };
    if let Some(release) = &facts.module_files.release {
        assert!(
            !release.is_empty() && !release.contains('/') && release != ".." && release != ".",
            "kernel release {release:?} is not one path component"
        );
    }
    let cmdline = fs::read(h.path.join("proc/cmdline")).unwrap_or_default();
    // The kernel strips quotes from parameters.
    let cmdline = String::from_utf8_lossy(&cmdline).replace('"', "");
    // Names cut inside a UTF-8 sequence (the kernel splits at bytes such as 0xa0)
    // read back with a replacement character: nothing to compare.
    for p in facts.params.iter().filter(|p| !p.name.contains('\u{fffd}')) {
        assert!(
            cmdline.contains(&p.name.replace('"', "")),
            "parameter {:?} is not on the command line",
            p.name
        );
    }
    if facts.allow_unsafe_interrupts == Some(true) {
        let v = fs::read(h.path.join(FILES[2])).unwrap_or_default();
        let v = String::from_utf8_lossy(&v);
        assert!(
            matches!(v.trim(), "Y" | "y" | "1"),
            "allow_unsafe_interrupts on from {v:?}"
        );
    }
    for hit in &facts.early_vfio {
        if let Some(rel) = hit.strip_prefix('/') {
            assert!(
                mentions_vfio(&h.path.join(rel)),
                "{hit} reported as loading vfio-pci early without naming it"
            );
        } else {
            assert!(
                hit.starts_with("rd.driver.pre"),
                "unexpected early-load source {hit:?}"
            );
        }
    }
    let Ok(view) = view else {
        return;
    };
    let checks = diagnose(&facts, &view, &Policy::default(), Path::new("/etc/policy"));
    for c in &checks {
        assert_eq!(
            c.status == Status::Pass,
            c.fix.is_empty(),
            "check {} ({:?}) with fix {:?}",
            c.check,
            c.status,
            c.fix
        );
    }
    for kind in ["gpu-isolation", "intent"] {
        let n = checks.iter().filter(|c| c.check == kind).count();
        assert_eq!(
            n,
            view.gpus.len(),
            "{n} {kind} checks for {} GPUs",
            view.gpus.len()
        );
    }
}
