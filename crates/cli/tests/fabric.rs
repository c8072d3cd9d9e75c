//! The HGX demo host and the `fabric` commands, as an admin runs them.

use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vfio-gpu-dra"));
    c.env_remove("VFIO_GPU_DRA_CRASH_AFTER_STEP")
        .env("VFIO_GPU_DRA_POLICY", "/nonexistent/policy.toml");
    c
}

fn run(args: &[&str]) -> (bool, String, String) {
    let o: Output = bin().args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn demo_hgx_activates_and_releases_the_claims_partition() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run(&["demo", "--hgx", "--dir", dir.path().to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    // Slice attributes: module 1 (9a:00.0) is in 2-GPU partition 3.
    assert!(
        out.contains("gpuModuleID 1 partition1 7 partition2 3 partition4 1 partition8 0 nvlinkFabric nvl4 fabricManaged true"),
        "{out}"
    );
    assert!(
        out.contains("matchAttribute vfio-gpu.dra.dev/partition2"),
        "{out}"
    );
    assert!(
        out.contains("active partitions [3]; calls: fmActivateFabricPartition([3])=0"),
        "{out}"
    );
    assert!(
        out.contains("0000:ab:00.0 module 3: ledger: partition 3 Active"),
        "{out}"
    );
    assert!(
        out.contains("active partitions []; calls: fmActivateFabricPartition([3])=0 fmDeactivateFabricPartition([3])=0"),
        "{out}"
    );
    assert!(out.contains("0000:9a:00.0 on nvidia"), "{out}");
    assert!(
        !out.contains("gpu-0000-05-00-0"),
        "an NVSwitch was offered: {out}"
    );
}

#[test]
fn fabric_status_and_explain_on_the_hgx_demo_host() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().to_str().unwrap();
    let base = ["--demo", "--hgx", "--demo-dir", demo];
    let with = |cmd: &[&str]| {
        let mut v: Vec<&str> = cmd.to_vec();
        v.extend(base);
        run(&v)
    };
    let (ok, out, err) = with(&["fabric", "reconcile"]);
    assert!(ok, "{out}\n{err}");
    let (ok, out, err) = with(&["fabric", "status"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("Fabric Manager: 15 partitions"), "{out}");
    assert!(out.contains("    3 inactive modules 1,3"), "{out}");
    assert!(out.contains("0000:9a:00.0  module 1"), "{out}");
    assert!(out.contains("Ledger partitions:\n  none"), "{out}");
    let (ok, out, err) = with(&["explain", "0000:ab:00.0"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("NVLink: module id 3"), "{out}");
    // NVSwitches are not GPUs: explain refuses them.
    let (ok, _, err) = with(&["explain", "0000:05:00.0"]);
    assert!(!ok, "{err}");
    let (ok, out, err) = with(&["fabric", "status", "-o", "json"]);
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["policy"], "required");
    assert_eq!(
        v["fm"]["Ok"]["partitions"].as_array().map(Vec::len),
        Some(15)
    );
}

/// The fake NVML cdylib (`crates/fabric/fake-nvml`), built on demand.
fn fake_nvml() -> std::path::PathBuf {
    vfio_gpu_fabric::testing::build_fake_library("fake-nvml", "libfake_nvml.so")
}

#[test]
fn fabric_learn_reads_nvml_through_dlopen_and_needs_yes() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let demo_s = demo.to_str().unwrap().to_string();
    let nvml = fake_nvml();
    let state = dir.path().join("nvml.json");
    let run_nvml = |args: &[&str], modules: serde_json::Value| {
        std::fs::write(
            &state,
            serde_json::json!({"modules": modules, "hostRoot": demo.join("host")}).to_string(),
        )
        .unwrap();
        let mut v: Vec<&str> = args.to_vec();
        v.extend(["--demo", "--hgx", "--demo-dir", &demo_s, "--nvml-library"]);
        v.push(nvml.to_str().unwrap());
        let o = bin()
            .args(&v)
            .env("FAKE_NVML_STATE", &state)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let truth = serde_json::json!({"0000:9a:00.0": 1, "0000:ab:00.0": 3});
    // Without --yes: the warning, and nothing done.
    let (ok, _, err) = run_nvml(&["fabric", "learn", "0000:9a:00.0"], truth.clone());
    assert!(!ok);
    assert!(err.contains("WARNING") && err.contains("--yes"), "{err}");
    // With it: 9a:00.0 is on nvidia in the demo, so NVML reads it in place.
    let (ok, out, err) = run_nvml(&["fabric", "learn", "0000:9a:00.0", "--yes"], truth.clone());
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("0000:9a:00.0: module 1 (read on nvidia"),
        "{out}"
    );
    // `serve`'s wiring: status resolves the map with NVML as the source.
    let (ok, out, err) = run_nvml(&["fabric", "status"], truth);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("0000:9a:00.0  module 1  (Nvml)"), "{out}");
    // NVML contradicting the admin's static map is an error, not a guess.
    let wrong = serde_json::json!({"0000:9a:00.0": 2});
    let (ok, out, err) = run_nvml(&["fabric", "learn", "0000:9a:00.0", "--yes"], wrong);
    assert!(!ok, "{out}");
    assert!(err.contains("fix the static map"), "{err}");
}

#[test]
fn doctor_runs_the_fabric_checks_on_the_hgx_demo_host() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().to_str().unwrap();
    let (_, out, err) = run(&["doctor", "--demo", "--hgx", "--demo-dir", demo]);
    for check in ["fabric-manager", "fabric-mode", "nvlsm", "module-map"] {
        let line = out
            .lines()
            .find(|l| l.contains(check))
            .unwrap_or_else(|| panic!("no {check} line:\n{out}\n{err}"));
        assert!(line.starts_with("pass"), "{line}\n{out}");
    }
    assert!(out.contains("all 8 GPUs have a module id"), "{out}");
}
