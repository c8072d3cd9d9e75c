//! `vfio-gpu-dra doctor` as an admin runs it: the real binary on fixture
//! hosts, the demo host and a tree built from a real H200 VM's capture.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec, rel_symlink};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vfio-gpu-dra"));
    c.env_remove("VFIO_GPU_DRA_CRASH_AFTER_STEP")
        .env_remove("VFIO_GPU_DRA_STATE_DIR")
        .env("VFIO_GPU_DRA_POLICY", "/nonexistent/policy.toml");
    c
}

fn doctor(root: &Path, extra: &[&str]) -> Output {
    let state = root.join("state");
    bin()
        .args(["doctor", "--host-root"])
        .arg(root)
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .output()
        .unwrap()
}

fn checks(o: &Output) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    v.as_array().unwrap().clone()
}

/// The one entry with this id (and GPU, for per-GPU checks).
fn entry<'a>(cs: &'a [serde_json::Value], id: &str, gpu: Option<&str>) -> &'a serde_json::Value {
    cs.iter()
        .find(|c| c["check"] == id && gpu.is_none_or(|g| c["pciBusID"] == g))
        .unwrap_or_else(|| panic!("no {id} {gpu:?} in {cs:#?}"))
}

/// A ready node: Intel, IOMMU on with interrupt remapping, vfio-pci a loaded
/// module, one GPU (with its audio function) alone in its group.
fn healthy(root: &Path) -> FixtureHost {
    let mut h = FixtureHost::create(root).unwrap();
    h.write(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz ro intel_iommu=on iommu=pt\n",
    )
    .unwrap();
    h.write(
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: GenuineIntel\n",
    )
    .unwrap();
    h.write("sys/class/iommu/dmar0/intel-iommu/ecap", "f0205ef\n")
        .unwrap();
    h.write(
        "lib/modules/6.1.0-fixture/modules.builtin",
        "kernel/drivers/pci/pcie/portdrv.ko\n",
    )
    .unwrap();
    h.write(
        "lib/modules/6.1.0-fixture/modules.dep",
        "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/pci/vfio-pci-core.ko\n\
         updates/dkms/nvidia.ko:\n",
    )
    .unwrap();
    h.add_driver("vfio-pci").unwrap();
    let port = "0000:64:00.0".parse().unwrap();
    h.add_function(
        &FunctionSpec::new(port, 0x1000, 0xc030, 0x060400)
            .bridge()
            .driver("pcieport")
            .group(10),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new("0000:65:00.0".parse().unwrap(), 0x10de, 0x26b1, 0x030000)
            .driver("nvidia")
            .group(11)
            .under(port),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new("0000:65:00.1".parse().unwrap(), 0x10de, 0x22ba, 0x040300)
            .driver("snd_hda_intel")
            .group(11)
            .under(port),
    )
    .unwrap();
    h
}

#[test]
fn healthy_node_passes_every_check() {
    let dir = tempfile::tempdir().unwrap();
    healthy(dir.path());
    let o = doctor(dir.path(), &["--output", "json"]);
    let cs = checks(&o);
    assert!(o.status.success(), "{cs:#?}");
    for id in [
        "iommu",
        "interrupt-remapping",
        "vfio-driver",
        "vfio-load-order",
        "gpu-isolation",
        "intent",
    ] {
        let c = entry(&cs, id, None);
        assert_eq!(c["status"], "pass", "{c:#}");
        assert_eq!(c["fix"], "", "{c:#}");
    }
    for c in &cs {
        let keys: Vec<&str> = c.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        for k in ["check", "status", "detail", "fix"] {
            assert!(keys.contains(&k), "{c:#}");
        }
    }
    let iso = entry(&cs, "gpu-isolation", Some("0000:65:00.0"));
    assert!(
        iso["detail"].as_str().unwrap().contains("0000:65:00.1"),
        "{iso:#}"
    );
    let intent = entry(&cs, "intent", Some("0000:65:00.0"));
    assert!(
        intent["detail"].as_str().unwrap().contains("movable"),
        "{intent:#}"
    );
}

#[test]
fn iommu_off_fails_with_the_vendor_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = FixtureHost::create(dir.path()).unwrap();
    h.write("proc/cpuinfo", "vendor_id\t: GenuineIntel\n")
        .unwrap();
    h.add_driver("vfio-pci").unwrap();
    h.add_function(
        &FunctionSpec::new("0000:65:00.0".parse().unwrap(), 0x10de, 0x2330, 0x030200)
            .driver("nvidia"),
    )
    .unwrap();
    let o = doctor(dir.path(), &["-o", "json"]);
    assert_eq!(o.status.code(), Some(1));
    let cs = checks(&o);
    let c = entry(&cs, "iommu", None);
    assert_eq!(c["status"], "fail");
    assert!(c["detail"].as_str().unwrap().contains("IOMMU off"), "{c:#}");
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains("intel_iommu=on iommu=pt"),
        "{c:#}"
    );
    assert_eq!(
        entry(&cs, "gpu-isolation", Some("0000:65:00.0"))["status"],
        "fail"
    );

    // The same node with an AMD CPU: no Intel parameter in the fix.
    h.write("proc/cpuinfo", "vendor_id\t: AuthenticAMD\n")
        .unwrap();
    let cs = checks(&doctor(dir.path(), &["-o", "json"]));
    let fix = entry(&cs, "iommu", None)["fix"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        fix.contains("AMD-Vi") && !fix.contains("intel_iommu=on"),
        "{fix}"
    );
}

#[test]
fn foreign_device_in_the_group_fails_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = healthy(dir.path());
    h.add_function(
        &FunctionSpec::new("0000:65:01.0".parse().unwrap(), 0x15b3, 0x101d, 0x020000)
            .driver("mlx5_core")
            .group(11),
    )
    .unwrap();
    let o = doctor(dir.path(), &["-o", "json"]);
    assert_eq!(o.status.code(), Some(1));
    let cs = checks(&o);
    let c = entry(&cs, "gpu-isolation", Some("0000:65:00.0"));
    assert_eq!(c["status"], "fail");
    let detail = c["detail"].as_str().unwrap();
    assert!(
        detail.contains("0000:65:01.0 15b3:101d (mlx5_core)"),
        "{detail}"
    );
    assert!(
        !detail.contains("0000:65:00.1"),
        "the audio function is the GPU's own: {detail}"
    );
    let fix = c["fix"].as_str().unwrap();
    assert!(
        fix.contains("ACS") && fix.contains("allow-foreign-group-members"),
        "{fix}"
    );
    assert_eq!(entry(&cs, "iommu", None)["status"], "pass");
}

#[test]
fn vfio_pci_missing_fails() {
    let dir = tempfile::tempdir().unwrap();
    healthy(dir.path());
    fs::remove_dir_all(dir.path().join("sys/bus/pci/drivers/vfio-pci")).unwrap();
    fs::write(
        dir.path().join("lib/modules/6.1.0-fixture/modules.dep"),
        "updates/dkms/nvidia.ko:\n",
    )
    .unwrap();
    let o = doctor(dir.path(), &["-o", "json"]);
    assert_eq!(o.status.code(), Some(1));
    let cs = checks(&o);
    let c = entry(&cs, "vfio-driver", None);
    assert_eq!(c["status"], "fail", "{c:#}");
    assert!(
        c["fix"].as_str().unwrap().contains("CONFIG_VFIO_PCI"),
        "{c:#}"
    );

    // The module is there but not loaded: a warning, exit status 0.
    fs::write(
        dir.path().join("lib/modules/6.1.0-fixture/modules.dep"),
        "kernel/drivers/vfio/pci/vfio-pci.ko.zst:\n",
    )
    .unwrap();
    let o = doctor(dir.path(), &["-o", "json"]);
    let cs = checks(&o);
    assert_eq!(entry(&cs, "vfio-driver", None)["status"], "warn");
    assert!(o.status.success(), "warnings do not fail: {cs:#?}");
}

#[test]
fn ids_in_modprobe_d_need_a_softdep() {
    let dir = tempfile::tempdir().unwrap();
    let h = healthy(dir.path());
    h.write(
        "etc/modprobe.d/vfio.conf",
        "options vfio-pci ids=10de:26b1\n",
    )
    .unwrap();
    // The GPU sits on nvidia: vfio-pci lost the race this boot.
    let o = doctor(dir.path(), &["-o", "json"]);
    assert_eq!(o.status.code(), Some(1));
    let cs = checks(&o);
    let c = entry(&cs, "vfio-load-order", None);
    assert_eq!(c["status"], "fail", "{c:#}");
    let fix = c["fix"].as_str().unwrap();
    assert!(fix.contains("`softdep nvidia pre: vfio-pci`"), "{fix}");
    // modules.dep lists no nouveau here: not asked for.
    assert!(!fix.contains("nouveau"), "{fix}");
    let intent = entry(&cs, "intent", Some("0000:65:00.0"));
    assert!(
        intent["detail"].as_str().unwrap().contains("keepOnVfio"),
        "{intent:#}"
    );

    h.write(
        "etc/modprobe.d/vfio.conf",
        "options vfio-pci ids=10de:26b1\nsoftdep nvidia pre: vfio-pci\n",
    )
    .unwrap();
    let cs = checks(&doctor(dir.path(), &["-o", "json"]));
    assert_eq!(entry(&cs, "vfio-load-order", None)["status"], "pass");
}

#[test]
fn demo_host_table_and_agreement_with_explain() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let demo = demo.to_str().unwrap();
    let o = bin()
        .args(["doctor", "--demo", "--demo-dir", demo])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    // The L4 shares its group with a NIC: one failure.
    assert_eq!(o.status.code(), Some(1), "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("STATUS"), "{table}");
    for l in &lines {
        assert!(l.chars().count() <= 100, "{l:?}");
    }
    for id in [
        "iommu",
        "interrupt-remapping",
        "vfio-driver",
        "vfio-load-order",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("pass") && l.contains(id)),
            "{id}: {table}"
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with("FAIL")
            && l.contains("gpu-isolation")
            && l.contains("0000:db:00.0")),
        "{table}"
    );
    assert!(table.contains("fix: "), "{table}");

    // Every intent entry says what `devices`/`explain` say.
    let o = bin()
        .args(["doctor", "--demo", "--demo-dir", demo, "-o", "json"])
        .output()
        .unwrap();
    let cs = checks(&o);
    let d = bin()
        .args(["devices", "--demo", "--demo-dir", demo, "-o", "json"])
        .output()
        .unwrap();
    let devices: serde_json::Value = serde_json::from_slice(&d.stdout).unwrap();
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), 8);
    for g in devices {
        let bdf = g["pciBusID"].as_str().unwrap();
        let detail = entry(&cs, "intent", Some(bdf))["detail"]
            .as_str()
            .unwrap()
            .to_string();
        if g["keepOnVfio"] == true {
            assert!(detail.contains("keepOnVfio"), "{bdf}: {detail}");
            for r in g["reasons"].as_array().unwrap() {
                assert!(
                    detail.contains(r["detail"].as_str().unwrap()),
                    "{bdf}: {detail}"
                );
            }
        } else if g["pinned"].is_null() {
            assert!(detail.contains("movable"), "{bdf}: {detail}");
        }
    }
}

/// Builds a host tree from the read-only capture of a real H200 VM
/// (`crates/host/tests/data/h200-pci-sysfs.json`, the project's copy of
/// /work/shared/fixtures/h200-vm/pci-sysfs.json). The capture is only read.
fn h200_capture_tree(root: &Path) {
    let capture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/tests/data/h200-pci-sysfs.json");
    let text = fs::read_to_string(capture).unwrap();
    let capture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let host = FixtureHost::create(root).unwrap();
    for (name, dev) in capture["devices"].as_object().unwrap() {
        let realpath = dev["realpath"].as_str().unwrap().trim_start_matches('/');
        let dir = root.join(realpath);
        fs::create_dir_all(&dir).unwrap();
        for (attr, value) in dev.as_object().unwrap() {
            match (attr.as_str(), value) {
                ("entries" | "realpath" | "subsystem" | "firmware_node" | "driver", _) => {}
                (_, serde_json::Value::String(v)) => {
                    fs::write(dir.join(attr), format!("{v}\n")).unwrap();
                }
                _ => {}
            }
        }
        rel_symlink(&dir, &root.join("sys/bus/pci/devices").join(name)).unwrap();
    }
    for (driver, bound) in capture["drivers"].as_object().unwrap() {
        host.add_driver(driver).unwrap();
        for b in bound.as_array().unwrap() {
            host.link_driver(b.as_str().unwrap().parse().unwrap(), driver)
                .unwrap();
        }
    }
}

/// Every path under `root` with its content (symlink targets for links).
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let key = p.strip_prefix(root).unwrap().display().to_string();
            let meta = fs::symlink_metadata(&p).unwrap();
            let value = if meta.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&p).unwrap().display())
            } else if meta.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                String::from_utf8_lossy(&fs::read(&p).unwrap()).into_owned()
            };
            out.insert(key, value);
        }
    }
    out
}

#[test]
fn real_h200_vm_capture_has_the_iommu_off_and_doctor_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    h200_capture_tree(dir.path());
    let before = snapshot(dir.path());
    let o = doctor(dir.path(), &["-o", "json"]);
    assert_eq!(o.status.code(), Some(1));
    let cs = checks(&o);
    let iommu = entry(&cs, "iommu", None);
    assert_eq!(iommu["status"], "fail");
    assert!(
        iommu["detail"].as_str().unwrap().contains("IOMMU off"),
        "{iommu:#}"
    );
    // No CONFIG_VFIO on that kernel.
    assert_eq!(entry(&cs, "vfio-driver", None)["status"], "fail");
    let iso = entry(&cs, "gpu-isolation", Some("0000:00:06.0"));
    assert_eq!(iso["status"], "fail");
    assert!(iso["detail"].as_str().unwrap().contains("no IOMMU group"));
    let intent = entry(&cs, "intent", Some("0000:00:06.0"));
    assert!(
        intent["detail"].as_str().unwrap().contains("on nvidia"),
        "{intent:#}"
    );
    // Table output too, then nothing on the host changed (the state dir was never created).
    let t = doctor(dir.path(), &[]);
    assert_eq!(t.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&t.stdout).contains("IOMMU off"));
    assert_eq!(
        before,
        snapshot(dir.path()),
        "doctor wrote into the host root"
    );
}

/// A node whose "GPU" 8086:10d3 is claimed by `vfio-pci.ids` on the command
/// line but sits on its host driver `driver` (the shape the real-kernel VM
/// showed: doctor must name the driver modules.alias says races vfio-pci,
/// not guess one from the vendor).
fn ids_node_on_host_driver(root: &Path, driver: &str, builtin: &str) -> FixtureHost {
    let mut h = healthy(root);
    h.write(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz ro intel_iommu=on iommu=pt vfio-pci.ids=8086:10d3\n",
    )
    .unwrap();
    h.write(
        "lib/modules/6.1.0-fixture/modules.alias",
        "alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n\
         alias pci:v00008086d*sv*sd*bc03sc*i* i915\n\
         alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n",
    )
    .unwrap();
    h.write(
        "lib/modules/6.1.0-fixture/modules.dep",
        "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/pci/vfio-pci-core.ko\n\
         kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko:\n\
         kernel/drivers/gpu/drm/i915/i915.ko:\n",
    )
    .unwrap();
    h.write("lib/modules/6.1.0-fixture/modules.builtin", builtin)
        .unwrap();
    h.add_driver(driver).unwrap();
    h.add_function(
        &FunctionSpec::new("0000:01:00.0".parse().unwrap(), 0x8086, 0x10d3, 0x020000)
            .driver(driver)
            .group(12),
    )
    .unwrap();
    h
}

#[test]
fn load_order_names_the_driver_modules_alias_gives_not_a_vendor_guess() {
    let dir = tempfile::tempdir().unwrap();
    let _h = ids_node_on_host_driver(dir.path(), "e1000e", "kernel/drivers/pci/pcie/portdrv.ko\n");
    let o = doctor(dir.path(), &["-o", "json", "--gpu-id", "8086:10d3"]);
    let cs = checks(&o);
    let c = entry(&cs, "vfio-load-order", None);
    assert_eq!(c["status"], "fail", "{c:#}");
    let fix = c["fix"].as_str().unwrap();
    assert!(fix.contains("`softdep e1000e pre: vfio-pci`"), "{fix}");
    // i915 claims only display-class (bc03) Intel devices: not this one.
    assert!(!fix.contains("i915"), "{fix}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .contains("0000:01:00.0 came up on the host driver"),
        "{c:#}"
    );
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn a_built_in_host_driver_cannot_be_ordered_and_doctor_says_what_works() {
    let dir = tempfile::tempdir().unwrap();
    // As on Debian's 6.12, where virtio_pci is built in: modules.builtin
    // lists the host driver, so no softdep or initramfs order helps.
    let h = ids_node_on_host_driver(
        dir.path(),
        "e1000e",
        "kernel/drivers/pci/pcie/portdrv.ko\nkernel/drivers/net/ethernet/intel/e1000e/e1000e.ko\n",
    );
    h.write(
        "lib/modules/6.1.0-fixture/modules.dep",
        "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/pci/vfio-pci-core.ko\n",
    )
    .unwrap();
    let cs = checks(&doctor(
        dir.path(),
        &["-o", "json", "--gpu-id", "8086:10d3"],
    ));
    let c = entry(&cs, "vfio-load-order", None);
    assert_eq!(c["status"], "fail", "{c:#}");
    let detail = c["detail"].as_str().unwrap();
    assert!(
        detail.contains("e1000e") && detail.contains("built into the kernel"),
        "{detail}"
    );
    let fix = c["fix"].as_str().unwrap();
    assert!(
        fix.contains("driverctl set-override 0000:01:00.0 vfio-pci"),
        "{fix}"
    );
    assert!(
        !fix.contains("softdep"),
        "a softdep cannot order a built-in driver: {fix}"
    );
}

/// Coexistence: with the plugin's record of GPUs another driver publishes in
/// the state directory, `doctor` warns for exactly those GPUs and `explain`
/// says the GPU is not offered, naming the driver; without a record neither
/// says anything about other drivers.
#[test]
fn doctor_and_explain_report_the_gpus_serve_found_another_driver_publishing() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let demo = demo.to_str().unwrap();
    let run = |args: &[&str]| {
        bin()
            .args(args)
            .args(["--demo", "--demo-dir", demo])
            .output()
            .unwrap()
    };
    let devices: serde_json::Value =
        serde_json::from_slice(&run(&["devices", "-o", "json"]).stdout).unwrap();
    let taken = devices[0]["pciBusID"].as_str().unwrap().to_string();
    let free = devices[1]["pciBusID"].as_str().unwrap().to_string();

    let before = checks(&run(&["doctor", "-o", "json"]));
    assert!(
        before.iter().all(|c| c["check"] != "other-driver"),
        "{before:#?}"
    );
    let explained = String::from_utf8_lossy(&run(&["explain", &taken]).stdout).into_owned();
    assert!(!explained.contains("Not offered"), "{explained}");

    // What serve writes after a sync that found NVIDIA's driver publishing `taken`
    // (serve creates the state directory; the read-only commands above do not).
    let state = dir.path().join("demo/state");
    fs::create_dir_all(&state).unwrap();
    vfio_gpu_node::OtherDrivers {
        observed_at_unix: 1_800_000_000,
        gpus: [(taken.clone(), "gpu.nvidia.com".to_string())].into(),
    }
    .write(&state)
    .unwrap();

    let after = checks(&run(&["doctor", "-o", "json"]));
    let warned: Vec<&serde_json::Value> = after
        .iter()
        .filter(|c| c["check"] == "other-driver")
        .collect();
    assert_eq!(warned.len(), 1, "{after:#?}");
    assert_eq!(warned[0]["status"], "warn");
    assert_eq!(warned[0]["pciBusID"], taken.as_str());
    assert!(
        warned[0]["detail"]
            .as_str()
            .unwrap()
            .contains("gpu.nvidia.com")
    );
    let table = String::from_utf8_lossy(&run(&["doctor"]).stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("warn") && l.contains("other-driver") && l.contains(&taken)),
        "{table}"
    );

    let explained = String::from_utf8_lossy(&run(&["explain", &taken]).stdout).into_owned();
    assert!(
        explained.contains("Not offered: driver gpu.nvidia.com publishes this GPU"),
        "{explained}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&run(&["explain", &taken, "-o", "json"]).stdout).unwrap();
    assert_eq!(json["publishedByOtherDriver"]["driver"], "gpu.nvidia.com");
    let other = String::from_utf8_lossy(&run(&["explain", &free]).stdout).into_owned();
    assert!(!other.contains("Not offered"), "{other}");
}
