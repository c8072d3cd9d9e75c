#![allow(clippy::disallowed_methods)] // tests read the fixtures they build
//! Verdicts on real fixture trees (`FixtureHost`), read through the same
//! code paths as on a node.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};
use vfio_gpu_host::{Bdf, Gpu, GpuSelector, HostRoot, PciHost, discover_gpus};
use vfio_gpu_intent::{
    IntentSources, ModprobeConfig, NoRecords, Origin, Policy, Source, Verdict, effective_vfio_ids,
    evaluate, kmod_options, vfio_pci_builtin,
};

const RELEASE: &str = "6.1.0-fixture";

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// A host with one H100 (10de:2330) at 0000:65:00.0 on `driver`, vfio-pci a module.
fn host(dir: &Path, driver: &str) -> FixtureHost {
    let mut h = FixtureHost::create(dir).unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:65:00.0"), 0x10de, 0x2330, 0x030200)
            .subsystem(0x10de, 0x16c1)
            .driver(driver)
            .group(12),
    )
    .unwrap();
    h.write(
        &format!("lib/modules/{RELEASE}/modules.builtin"),
        "kernel/drivers/pci/pcie/portdrv.ko\n",
    )
    .unwrap();
    h
}

fn make_builtin(h: &FixtureHost) {
    h.write(
        &format!("lib/modules/{RELEASE}/modules.builtin"),
        "kernel/drivers/pci/pcie/portdrv.ko\nkernel/drivers/vfio/pci/vfio-pci.ko\n",
    )
    .unwrap();
}

fn gpus(dir: &Path) -> Vec<Gpu> {
    let root = HostRoot::open(dir).unwrap();
    let sel = GpuSelector::default();
    let pci = PciHost::scan(&root, &sel).unwrap();
    discover_gpus(&pci, &sel, None)
}

fn verdict_with(dir: &Path, policy: &Policy) -> Verdict {
    let root = HostRoot::open(dir).unwrap();
    let sources = IntentSources::load(&root, policy);
    let gpus = gpus(dir);
    assert_eq!(gpus.len(), 1);
    evaluate(&sources, &gpus[0], &NoRecords)
}

fn verdict(dir: &Path) -> Verdict {
    verdict_with(dir, &Policy::default())
}

fn has_signal(v: &Verdict, needle: &str) -> bool {
    v.signals.iter().any(|s| s.detail.contains(needle))
}

#[test]
fn plain_host_is_not_kept() {
    let d = tempfile::tempdir().unwrap();
    host(d.path(), "nvidia");
    let v = verdict(d.path());
    assert!(!v.keep_on_vfio, "{v:#?}");
    assert!(v.pinned.is_none());
    assert!(has_signal(&v, "kernel command line has no vfio-pci.ids"));
    assert!(has_signal(&v, "vfio-pci is a module"));
}

#[test]
fn upstream_example_cmdline_ids_keeps_gpu_on_nvidia() {
    let d = tempfile::tempdir().unwrap();
    let h = host(d.path(), "nvidia");
    h.write(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz ro vfio-pci.ids=10de:2330 quiet\n",
    )
    .unwrap();
    let v = verdict(d.path());
    assert!(v.keep_on_vfio);
    assert_eq!(v.reasons.len(), 1);
    assert_eq!(v.reasons[0].source, Source::KernelCmdline);
    assert!(
        v.reasons[0]
            .detail
            .contains("vfio-pci.ids entry 10de:2330 matches 10de:2330 (subsystem any)")
    );
}

#[test]
fn builtin_detection_and_modprobe_ignored_when_builtin() {
    let d = tempfile::tempdir().unwrap();
    let h = host(d.path(), "nvidia");
    h.write(
        "etc/modprobe.d/vfio.conf",
        "options vfio-pci ids=10de:2330\n",
    )
    .unwrap();
    let root = HostRoot::open(d.path()).unwrap();
    assert_eq!(vfio_pci_builtin(&root), Some(false));
    assert!(verdict(d.path()).keep_on_vfio);

    make_builtin(&h);
    assert_eq!(vfio_pci_builtin(&root), Some(true));
    let v = verdict(d.path());
    assert!(!v.keep_on_vfio, "{:#?}", v.reasons);
    assert!(has_signal(
        &v,
        "modprobe.d options ignored: vfio-pci is built into the kernel (\"ids=10de:2330\" at /etc/modprobe.d/vfio.conf:1)"
    ));
}

#[test]
fn builtin_unknown_treats_modprobe_as_applying() {
    let d = tempfile::tempdir().unwrap();
    let h = host(d.path(), "nvidia");
    fs::remove_file(
        d.path()
            .join(format!("lib/modules/{RELEASE}/modules.builtin")),
    )
    .unwrap();
    h.write(
        "etc/modprobe.d/vfio.conf",
        "options vfio-pci ids=10de:2330\n",
    )
    .unwrap();
    let root = HostRoot::open(d.path()).unwrap();
    assert_eq!(vfio_pci_builtin(&root), None);
    let v = verdict(d.path());
    assert!(v.keep_on_vfio);
    assert_eq!(v.reasons[0].source, Source::Modprobe);
    assert!(has_signal(&v, "treated as applying"));
    // sysfs fallback: initstate only exists for a module.
    h.write("sys/module/vfio_pci/initstate", "live\n").unwrap();
    assert_eq!(vfio_pci_builtin(&root), Some(false));
    fs::remove_file(d.path().join("sys/module/vfio_pci/initstate")).unwrap();
    fs::create_dir_all(d.path().join("sys/module/vfio_pci/parameters")).unwrap();
    assert_eq!(vfio_pci_builtin(&root), Some(true));
}

#[test]
fn modprobe_shadowing_and_order_across_dirs() {
    let d = tempfile::tempdir().unwrap();
    let h = host(d.path(), "nvidia");
    // Same name: /etc shadows /usr/lib entirely.
    h.write(
        "usr/lib/modprobe.d/vfio.conf",
        "options vfio-pci ids=10de:2330\n",
    )
    .unwrap();
    h.write("etc/modprobe.d/vfio.conf", "# admin disabled passthrough\n")
        .unwrap();
    let root = HostRoot::open(d.path()).unwrap();
    let cfg = ModprobeConfig::load(&root);
    assert_eq!(cfg.files, vec!["/etc/modprobe.d/vfio.conf"]);
    assert_eq!(cfg.shadowed, vec!["/usr/lib/modprobe.d/vfio.conf"]);
    assert!(!verdict(d.path()).keep_on_vfio);

    // Different names: sorted by file name across directories, so
    // lib/modprobe.d/zz.conf is parsed after etc/modprobe.d/vfio.conf.
    h.write("lib/modprobe.d/zz.conf", "options vfio_pci ids=10de:2330\n")
        .unwrap();
    h.write(
        "etc/modprobe.d/vfio.conf",
        "options vfio_pci ids=10de:9999\n",
    )
    .unwrap();
    h.write("run/modprobe.d/aa.conf", "options vfio_pci ids=10de:1111\n")
        .unwrap();
    let cfg = ModprobeConfig::load(&root);
    assert_eq!(
        cfg.files,
        vec![
            "/run/modprobe.d/aa.conf",
            "/etc/modprobe.d/vfio.conf",
            "/lib/modprobe.d/zz.conf"
        ]
    );
    assert_eq!(
        effective_vfio_ids(&cfg, &[]),
        Some((
            "10de:2330".to_string(),
            Origin::File {
                path: "/lib/modprobe.d/zz.conf".into(),
                line: 1
            }
        ))
    );
    let v = verdict(d.path());
    assert!(v.keep_on_vfio);
    assert!(
        v.reasons[0].detail.contains("/lib/modprobe.d/zz.conf:1"),
        "{}",
        v.reasons[0].detail
    );
    // Other file types are not configuration.
    h.write(
        "etc/modprobe.d/zzz.conf.dpkg-old",
        "options vfio_pci ids=10de:9999\n",
    )
    .unwrap();
    assert!(verdict(d.path()).keep_on_vfio);
}

#[test]
fn cmdline_beats_modprobe_for_a_module() {
    let d = tempfile::tempdir().unwrap();
    let h = host(d.path(), "nvidia");
    h.write(
        "etc/modprobe.d/vfio.conf",
        "options vfio_pci ids=10de:2330\n",
    )
    .unwrap();
    h.write("proc/cmdline", "ro vfio_pci.ids=10de:2335\n")
        .unwrap();
    let root = HostRoot::open(d.path()).unwrap();
    let cfg = ModprobeConfig::load(&root);
    let cmd = kmod_options("ro vfio_pci.ids=10de:2335\n");
    assert_eq!(
        effective_vfio_ids(&cfg, &cmd),
        Some(("10de:2335".to_string(), Origin::KernelCmdline))
    );
    let v = verdict(d.path());
    assert!(!v.keep_on_vfio, "{:#?}", v.reasons);
    assert!(has_signal(
        &v,
        "ids=10de:2330 at /etc/modprobe.d/vfio.conf:1 is overridden"
    ));
}

#[test]
fn initramfs_tools_modules_line() {
    let d = tempfile::tempdir().unwrap();
    let h = host(d.path(), "nvidia");
    h.write(
        "etc/initramfs-tools/modules",
        "# passthrough\nvfio\nvfio-pci ids=10de:2330\n",
    )
    .unwrap();
    let v = verdict(d.path());
    assert!(v.keep_on_vfio);
    assert!(
        v.reasons[0]
            .detail
            .contains("/etc/initramfs-tools/modules:3")
    );
}

#[test]
fn driverctl_vfio_none_host_and_unknown() {
    let d = tempfile::tempdir().unwrap();
    let h = host(d.path(), "nvidia");
    let file = "etc/driverctl.d/pci-0000:65:00.0";

    h.write(file, "vfio-pci\n").unwrap();
    let v = verdict(d.path());
    assert!(v.keep_on_vfio);
    assert_eq!(v.reasons[0].source, Source::Driverctl);
    assert!(v.pinned.is_none());

    h.write(file, "none\n").unwrap();
    let v = verdict(d.path());
    assert!(!v.keep_on_vfio);
    let pin = v.pinned.as_ref().unwrap();
    assert_eq!(pin.driver.as_deref(), Some("none"));
    assert_eq!(pin.source, Source::Driverctl);

    h.write(file, "nvidia\n").unwrap();
    let v = verdict(d.path());
    assert!(!v.keep_on_vfio);
    assert_eq!(v.pinned.as_ref().unwrap().driver.as_deref(), Some("nvidia"));
    assert!(v.admin_owned());

    // A directory where the file should be: content unknown, so owned.
    fs::remove_file(d.path().join(file)).unwrap();
    fs::create_dir_all(d.path().join(file)).unwrap();
    let v = verdict(d.path());
    assert!(v.keep_on_vfio);
    assert!(v.pinned.is_some());
    assert!(
        v.reasons[0]
            .detail
            .contains("unknown configuration counts as admin intent")
    );
}

#[test]
fn unreadable_modprobe_file_counts_as_owned() {
    let d = tempfile::tempdir().unwrap();
    let h = host(d.path(), "nvidia");
    h.write("etc/modprobe.d/keep", "").unwrap();
    // A symlink loop cannot be read, not even by root.
    symlink("loop.conf", d.path().join("etc/modprobe.d/loop.conf")).unwrap();
    let v = verdict(d.path());
    assert!(v.keep_on_vfio, "{v:#?}");
    assert_eq!(v.reasons[0].source, Source::Modprobe);
    assert!(
        v.reasons[0]
            .detail
            .starts_with("cannot read /etc/modprobe.d/loop.conf")
    );
    assert!(
        v.reasons[0]
            .detail
            .contains("unknown configuration counts as admin intent")
    );

    // Built in: modprobe.d cannot claim GPUs, so it is only a warning.
    make_builtin(&h);
    let v = verdict(d.path());
    assert!(!v.keep_on_vfio);
    assert!(v.warnings.iter().any(|w| w.contains("loop.conf")));
}

#[test]
fn directory_named_conf_is_skipped_as_kmod_does() {
    let d = tempfile::tempdir().unwrap();
    host(d.path(), "nvidia");
    fs::create_dir_all(d.path().join("etc/modprobe.d/x.conf")).unwrap();
    let v = verdict(d.path());
    // kmod ignores it ("Directories inside directories are not supported").
    assert!(!v.keep_on_vfio, "{:#?}", v.reasons);
    assert!(v.warnings.iter().any(|w| w.contains("x.conf: a directory")));
}

#[test]
fn chmod_000_file_counts_as_owned_when_not_root() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let h = host(d.path(), "nvidia");
    h.write(
        "etc/modprobe.d/secret.conf",
        "options vfio_pci ids=10de:9999\n",
    )
    .unwrap();
    let p = d.path().join("etc/modprobe.d/secret.conf");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::read(&p).is_ok() {
        // Root (CAP_DAC_OVERRIDE) reads it anyway; nothing to test here.
        return;
    }
    let v = verdict(d.path());
    assert!(v.keep_on_vfio);
    assert!(v.reasons[0].detail.contains("secret.conf"));
}

#[test]
fn unreadable_cmdline_counts_as_owned() {
    let d = tempfile::tempdir().unwrap();
    host(d.path(), "nvidia");
    fs::remove_file(d.path().join("proc/cmdline")).unwrap();
    fs::create_dir_all(d.path().join("proc/cmdline")).unwrap();
    let v = verdict(d.path());
    assert!(v.keep_on_vfio);
    assert_eq!(v.reasons[0].source, Source::KernelCmdline);
    assert!(v.reasons[0].detail.starts_with("cannot read /proc/cmdline"));
}

#[test]
fn driver_override_and_bound_at_start_from_sysfs() {
    let d = tempfile::tempdir().unwrap();
    let mut h = FixtureHost::create(d.path()).unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:65:00.0"), 0x10de, 0x2330, 0x030200)
            .driver("nvidia")
            .driver_override("vfio-pci")
            .group(3),
    )
    .unwrap();
    let v = verdict(d.path());
    assert!(v.keep_on_vfio);
    assert_eq!(v.reasons[0].source, Source::DriverOverride);

    let d = tempfile::tempdir().unwrap();
    let mut h = FixtureHost::create(d.path()).unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:65:00.0"), 0x10de, 0x2330, 0x030200)
            .driver("vfio-pci")
            .group(3),
    )
    .unwrap();
    let v = verdict(d.path());
    assert!(v.keep_on_vfio);
    assert_eq!(v.reasons[0].source, Source::BoundAtStart);
}

#[test]
fn every_function_counts_audio_on_vfio_keeps_the_gpu() {
    let d = tempfile::tempdir().unwrap();
    let mut h = FixtureHost::create(d.path()).unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:ab:00.0"), 0x10de, 0x26b1, 0x030000)
            .driver("nvidia")
            .group(7),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:ab:00.1"), 0x10de, 0x22ba, 0x040300)
            .driver("snd_hda_intel")
            .group(7),
    )
    .unwrap();
    h.write("proc/cmdline", "ro vfio-pci.ids=10de:22ba\n")
        .unwrap();
    let v = verdict(d.path());
    assert!(v.keep_on_vfio, "{v:#?}");
    assert!(
        v.reasons[0]
            .detail
            .starts_with("0000:ab:00.1: vfio-pci.ids entry 10de:22ba matches")
    );
    // The audio function's host driver is covered by suppression facts too.
    h.write("etc/modprobe.d/snd.conf", "blacklist snd-hda-intel\n")
        .unwrap();
    let v = verdict(d.path());
    assert_eq!(v.host_driver_suppressed, vec!["snd_hda_intel"]);
}

#[test]
fn policy_file_keeps_by_bdf() {
    let d = tempfile::tempdir().unwrap();
    host(d.path(), "nvidia");
    let pol = d.path().join("policy.toml");
    fs::write(&pol, "[keep-on-vfio]\npci-bus-ids = [\"0000:65:00.0\"]\n").unwrap();
    let policy = Policy::load(&HostRoot::open(d.path()).unwrap(), &pol).unwrap();
    let v = verdict_with(d.path(), &policy);
    assert!(v.keep_on_vfio);
    assert_eq!(v.reasons[0].source, Source::Policy);
}

#[test]
fn demo_host_verdicts() {
    let d = tempfile::tempdir().unwrap();
    vfio_gpu_host::demo::build_demo_host(d.path()).unwrap();
    let root = HostRoot::open(d.path()).unwrap();
    let src = IntentSources::load(&root, &Policy::default());
    let sel = GpuSelector::default();
    let pci = PciHost::scan(&root, &sel).unwrap();
    let verdicts: Vec<Verdict> = discover_gpus(&pci, &sel, None)
        .iter()
        .map(|g| evaluate(&src, g, &NoRecords))
        .collect();
    let get = |b: &str| verdicts.iter().find(|v| v.gpu == bdf(b)).unwrap();
    // The GPUs on vfio-pci are all admin-owned, whichever source says so...
    for b in [
        "0000:18:00.0",
        "0000:2a:00.0",
        "0000:3a:00.0",
        "0000:5d:00.0",
        "0000:9a:00.0",
    ] {
        assert!(get(b).keep_on_vfio, "{b}");
    }
    // ...the H100s by the cmdline ids=...
    for b in ["0000:18:00.0", "0000:2a:00.0"] {
        assert!(
            get(b)
                .reasons
                .iter()
                .any(|r| r.source == Source::KernelCmdline),
            "{b}"
        );
    }
    // ...and the demo shows every kind of device-specific intent.
    let sources: std::collections::BTreeSet<Source> = verdicts
        .iter()
        .flat_map(|v| v.reasons.iter().map(|r| r.source))
        .collect();
    for s in [
        Source::KernelCmdline,
        Source::Driverctl,
        Source::DriverOverride,
        Source::BoundAtStart,
    ] {
        assert!(sources.contains(&s), "{s:?} missing from {sources:?}");
    }
    // modprobe.d's ids= loses to the cmdline's (kmod applies the cmdline last).
    assert!(
        verdicts
            .iter()
            .all(|v| v.reasons.iter().all(|r| r.source != Source::Modprobe))
    );
    for b in ["0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0"] {
        assert!(!get(b).keep_on_vfio, "{b}: {:#?}", get(b).reasons);
        assert!(get(b).pinned.is_none());
    }
}
