//! The binary as an admin runs it: real processes, real fixture trees.

use std::path::Path;
use std::process::{Command, Output};

use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vfio-gpu-dra"));
    c.env_remove("VFIO_GPU_DRA_CRASH_AFTER_STEP")
        .env("VFIO_GPU_DRA_POLICY", "/nonexistent/policy.toml");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `args` on the demo host in `demo`, answered as JSON (the command must succeed).
fn demo_json(demo: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--demo", "--demo-dir", demo, "-o", "json"]);
    json(&run(&all))
}

/// A host with one GPU pre-bound by the command line and one on nvidia.
fn host(root: &Path) {
    let mut h = FixtureHost::create(root).unwrap();
    h.write("proc/cmdline", "ro quiet \"vfio_pci.ids=10de:2235\"\n")
        .unwrap();
    h.add_driver("vfio-pci").unwrap();
    h.add_function(
        &FunctionSpec::new("0000:00:06.0".parse().unwrap(), 0x10de, 0x2235, 0x030200)
            .driver("vfio-pci")
            .group(6),
    )
    .unwrap();
    h.add_function(
        &FunctionSpec::new("0000:00:07.0".parse().unwrap(), 0x10de, 0x2330, 0x030200)
            .driver("nvidia")
            .group(7),
    )
    .unwrap();
    // Same device id, other vendor: must not be matched by 10de:2235 (the upstream proposal's bug).
    h.add_function(
        &FunctionSpec::new("0000:00:08.0".parse().unwrap(), 0x1002, 0x2235, 0x030000)
            .driver("amdgpu")
            .group(8),
    )
    .unwrap();
}

#[test]
fn devices_json_has_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    host(dir.path());
    let root = dir.path().to_str().unwrap();
    let v = json(&run(&["devices", "--host-root", root, "--output", "json"]));
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2, "NVIDIA GPUs only by default");
    let g = &arr[0];
    assert_eq!(g["pciBusID"], "0000:00:06.0");
    assert_eq!(g["vendorID"], "0x10de");
    assert_eq!(g["deviceID"], "0x2235");
    assert_eq!(g["driver"], "vfio-pci");
    assert_eq!(g["iommuGroup"], 6);
    assert_eq!(g["keepOnVfio"], true);
    let sources: Vec<&str> = g["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source"].as_str().unwrap())
        .collect();
    assert!(sources.contains(&"kernel-cmdline"), "{sources:?}");
    assert!(
        g["reasons"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("10de:2235")
    );
    let other = &arr[1];
    assert_eq!(other["keepOnVfio"], false);
    assert_eq!(other["reasons"].as_array().unwrap().len(), 0);
    assert_eq!(other["driver"], "nvidia");

    // A custom selector reaches the AMD device; the NVIDIA-only entry does not match it.
    let v = json(&run(&[
        "devices",
        "--host-root",
        root,
        "-o",
        "json",
        "--gpu-id",
        "1002:2235",
    ]));
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["keepOnVfio"], false);
}

#[test]
fn table_fits_80_columns() {
    let o = run(&[
        "devices",
        "--demo",
        "--demo-dir",
        tempfile::tempdir().unwrap().path().to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("0000:18:00.0"));
    for line in out.lines() {
        assert!(line.chars().count() <= 80, "too wide: {line:?}");
    }
}

#[test]
fn explain_lists_every_signal_and_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    host(dir.path());
    let root = dir.path().to_str().unwrap();
    let o = run(&["explain", "0000:00:07.0", "--host-root", root]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("[ ] kernel-cmdline"), "{out}");
    assert!(out.contains("does not match 10de:2330"), "{out}");
    assert!(out.contains("keepOnVfio = false"), "{out}");
    let v = json(&run(&[
        "explain",
        "0000:00:06.0",
        "--host-root",
        root,
        "-o",
        "json",
    ]));
    assert_eq!(v["keepOnVfio"], true);
    assert!(v["signals"].as_array().unwrap().len() >= 4);
    // Unknown and hostile addresses are clear errors.
    let o = run(&["explain", "0000:00:09.0", "--host-root", root]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no GPU at 0000:00:09.0"));
    let o = run(&["explain", "../../etc/passwd", "--host-root", root]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a PCI address"));
}

#[test]
fn explain_names_persistence_mode_left_off_at_a_release() {
    let dir = tempfile::tempdir().unwrap();
    host(dir.path());
    let boot = "4f1c6a2e-0000-4000-8000-000000000001";
    std::fs::write(dir.path().join("proc/sys/kernel/random/boot_id"), boot).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut body = vfio_gpu_engine::ledger::LedgerBody {
        boot_id: boot.into(),
        ..Default::default()
    };
    body.persistence_to_restore.insert(
        "0000:00:07.0".parse().unwrap(),
        vfio_gpu_engine::ledger::PendingPersistence {
            boot_id: boot.into(),
            error: "Unable to set persistence mode".into(),
            since: 1,
            extra: Default::default(),
        },
    );
    std::fs::write(
        state.join("ledger.json"),
        vfio_gpu_engine::ledger::encode(&body),
    )
    .unwrap();
    let root = dir.path().to_str().unwrap();
    let state = state.to_str().unwrap();
    let args = [
        "explain",
        "0000:00:07.0",
        "--host-root",
        root,
        "--state-dir",
        state,
    ];
    let out = stdout(&run(&args));
    assert!(
        out.contains("persistence mode was left off at a release (Unable to set persistence mode)"),
        "{out}"
    );
    let v = json(&run(&[&args[..], &["-o", "json"]].concat()));
    assert_eq!(
        v["persistenceLeftOff"]["error"],
        "Unable to set persistence mode"
    );
    // Another GPU says nothing of it.
    let v = json(&run(&[
        "explain",
        "0000:00:06.0",
        "--host-root",
        root,
        "--state-dir",
        state,
        "-o",
        "json",
    ]));
    assert!(v.get("persistenceLeftOff").is_none(), "{v}");
}

#[test]
fn missing_host_root_is_a_clear_error() {
    let o = run(&["devices", "--host-root", "/nonexistent/root"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/root"), "{err}");
}

#[test]
fn serve_refuses_a_driver_name_that_is_not_one_path_component() {
    // The driver name becomes socket, state and CDI file names: a bad one must be
    // refused before anything is created.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plugins = d.join("plugins");
    let o = bin()
        .env_remove("KUBECONFIG")
        .args(["serve", "--node-name", "n1", "--driver-name", "../escaped"])
        .arg("--kubelet-plugins-dir")
        .arg(&plugins)
        .arg("--kubelet-registrar-dir")
        .arg(d.join("registry"))
        .arg("--cdi-root")
        .arg(d.join("cdi"))
        .arg("--demo")
        .arg("--demo-dir")
        .arg(d.join("demo"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("driver name \"../escaped\""), "{err}");
    assert!(!d.join("escaped").exists());
    assert!(!plugins.exists());
    assert!(!d.join("demo").exists());
}

#[test]
fn bind_release_round_trip_on_the_demo_host() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().to_str().unwrap();
    let v = demo_json(demo, &["bind", "0000:ab:00.0", "0000:18:00.0"]);
    assert_eq!(v[0]["action"], "moved");
    assert_eq!(v[1]["action"], "already-on-vfio");
    let v = demo_json(demo, &["devices"]);
    let ada = v
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["pciBusID"] == "0000:ab:00.0")
        .unwrap();
    assert_eq!(ada["driver"], "vfio-pci");
    assert_eq!(ada["functions"][1]["driver"], "vfio-pci", "HDA moved too");
    let v = demo_json(demo, &["ledger"]);
    assert_eq!(v["gpus"]["0000:ab:00.0"]["state"], "configured");
    let v = demo_json(demo, &["release", "0000:ab:00.0", "0000:18:00.0"]);
    assert_eq!(v[0]["action"], "restored");
    assert_eq!(v[1]["action"], "left-on-vfio");
    let v = demo_json(demo, &["devices"]);
    let find = |b: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|g| g["pciBusID"] == b)
            .unwrap()
            .clone()
    };
    assert_eq!(find("0000:ab:00.0")["driver"], "nvidia");
    assert_eq!(
        find("0000:ab:00.0")["functions"][1]["driver"],
        "snd_hda_intel"
    );
    assert_eq!(find("0000:18:00.0")["driver"], "vfio-pci");
    // A refused GPU makes a non-zero exit and names the blocker.
    let o = run(&["bind", "0000:db:00.0", "--demo", "--demo-dir", demo]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stdout(&o).contains("0000:db:01.0"));
}

#[test]
fn crash_injection_then_reconcile_restores() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().to_str().unwrap();
    // Abort after the 3rd mutation of the bind (mid-move).
    let o = bin()
        .args(["bind", "0000:ba:00.0", "--demo", "--demo-dir", demo])
        .env("VFIO_GPU_DRA_CRASH_AFTER_STEP", "3")
        .output()
        .unwrap();
    assert!(!o.status.success(), "the process must have died");
    let v = demo_json(demo, &["ledger"]);
    assert_eq!(v["gpus"]["0000:ba:00.0"]["state"], "configuring");
    let v = demo_json(demo, &["reconcile"]);
    let r = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pciBusID"] == "0000:ba:00.0")
        .unwrap();
    assert_eq!(r["action"], "rolled-back");
    let v = demo_json(demo, &["devices"]);
    let a100 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["pciBusID"] == "0000:ba:00.0")
        .unwrap();
    assert_eq!(a100["driver"], "nvidia");
    assert_eq!(a100["driverOverride"], serde_json::Value::Null);
}

#[test]
fn demo_runs_the_whole_plugin_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["demo", "--dir", dir.path().to_str().unwrap()]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("kubelet uses v1.DRAPlugin"), "{out}");
    assert!(out.contains("gpu-0000-ab-00-0"), "{out}");
    assert!(out.contains("host: 0000:ab:00.1 is on vfio-pci"), "{out}");
    // The minimum version the content needs: 0.5.0 only when a name starts with a digit.
    assert!(out.contains("\"cdiVersion\": \"0."), "{out}");
    assert!(out.contains("\"path\": \"/dev/vfio/vfio\""), "{out}");
    assert!(out.contains("\"path\": \"/dev/vfio/15\""), "{out}");
    assert!(!out.contains("PCI_RESOURCE_"), "{out}");
    assert!(
        out.contains("0000:ab:00.0 on nvidia, 0000:ab:00.1 on snd_hda_intel"),
        "{out}"
    );
    assert!(out.contains("0000:18:00.0 on vfio-pci"), "{out}");
    assert!(out.contains("stays on vfio-pci: kernel-cmdline"), "{out}");
    assert!(out.contains("CDI specs left: 0"), "{out}");
    assert!(out.contains("sockets removed: true"), "{out}");
}

#[test]
fn demo_iommu_backend_iommufd_names_dev_iommu_and_the_cdevs() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&[
        "demo",
        "--dir",
        dir.path().to_str().unwrap(),
        "--iommu-backend",
        "iommufd",
    ]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("iommuBackend iommufd"), "{out}");
    assert!(out.contains("\"path\": \"/dev/iommu\""), "{out}");
    assert!(out.contains("\"path\": \"/dev/vfio/devices/vfio"), "{out}");
    assert!(!out.contains("\"path\": \"/dev/vfio/15\""), "{out}");
    assert!(out.contains("CDI specs left: 0"), "{out}");
}

/// Review n1: the default policy file is the host's (under the host root, as
/// the DaemonSet's pod sees it), and an entry written while the GPU is bound
/// decides its release.
#[test]
fn a_policy_entry_under_the_host_root_added_while_bound_keeps_the_gpu_on_vfio() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().to_str().unwrap();
    let cli = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vfio-gpu-dra"));
        c.env_remove("VFIO_GPU_DRA_CRASH_AFTER_STEP")
            .env_remove("VFIO_GPU_DRA_POLICY");
        c.args(args)
            .args(["--demo", "--demo-dir", demo, "-o", "json"])
            .output()
            .unwrap()
    };
    assert_eq!(json(&cli(&["bind", "0000:ab:00.0"]))[0]["action"], "moved");
    let etc = dir.path().join("host/etc/vfio-gpu-dra");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("policy.toml"),
        "[keep-on-vfio]\npci-bus-ids = [\"0000:ab:00.0\"]\n",
    )
    .unwrap();
    let v = json(&cli(&["release", "0000:ab:00.0"]));
    assert_eq!(v[0]["action"], "left-on-vfio", "{v}");
    assert!(v[0]["detail"].as_str().unwrap().contains("policy"), "{v}");
}

/// Review n18: `serve` takes the same deadlines and budget as the admin
/// commands (it used the built-in defaults whatever the admin set).
#[test]
fn serve_takes_the_deadlines_and_the_prepare_budget() {
    let out = run(&["serve", "--help"]);
    let help = stdout(&out);
    for flag in [
        "--unbind-timeout",
        "--bind-timeout",
        "--prepare-budget",
        "--policy",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}:\n{help}");
    }
}

/// Between tenants through the CLI on the demo host: a release resets and
/// verifies the GPU and `ledger`/`explain` show the hand-over; a GPU that
/// answers with another device id after its reset is quarantined, `bind`
/// refuses it, and `reset` (once the id is back) clears it.
#[test]
fn release_hands_over_and_reset_clears_a_quarantine() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().to_str().unwrap();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--demo", "--demo-dir", demo, "-o", "json"]);
        run(&all)
    };
    json(&cli(&["bind", "0000:ab:00.0"]));
    let v = json(&cli(&["release", "0000:ab:00.0"]));
    assert_eq!(v[0]["action"], "restored", "{v}");
    let ledger = json(&cli(&["ledger"]));
    let handover = &ledger["handovers"][0];
    assert_eq!(handover["gpu"], "0000:ab:00.0");
    assert_eq!(handover["verification"], "clean", "{ledger}");
    let explained = json(&cli(&["explain", "0000:ab:00.0"]));
    assert_eq!(explained["lastHandover"]["verification"], "clean");

    json(&cli(&["bind", "0000:ab:00.0"]));
    // The device answers with another id from now on (as after a failed reset).
    let device = dir
        .path()
        .join("host/sys/bus/pci/devices/0000:ab:00.0/device");
    let original = std::fs::read_to_string(&device).unwrap();
    std::fs::write(&device, "0x1eb8\n").unwrap();
    let v = json(&cli(&["release", "0000:ab:00.0"]));
    assert_eq!(v[0]["action"], "quarantined", "{v}");
    let ledger = json(&cli(&["ledger"]));
    assert!(
        ledger["quarantined"]["0000:ab:00.0"]["reason"]
            .as_str()
            .unwrap()
            .contains("10de:1eb8"),
        "{ledger}"
    );
    let o = cli(&["bind", "0000:ab:00.0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stdout(&o).contains("quarantined"), "{}", stdout(&o));
    // Still the wrong id: the admin's reset refuses to clear it.
    assert_eq!(cli(&["reset", "0000:ab:00.0"]).status.code(), Some(2));
    std::fs::write(&device, original).unwrap();
    let v = json(&cli(&["reset", "0000:ab:00.0"]));
    assert_eq!(v[0]["action"], "reset", "{v}");
    let ledger = json(&cli(&["ledger"]));
    assert!(ledger.get("quarantined").is_none(), "{ledger}");
    json(&cli(&["bind", "0000:ab:00.0"]));
}
