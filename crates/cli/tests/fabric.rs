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
