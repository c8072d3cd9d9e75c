//! M4: one ledger, one lock, one view. `serve` and the admin commands share
//! the state directory; while `serve` holds it, mutating commands fail at
//! once naming the holder, read-only commands still work, and `reset` is
//! done by the running `serve` through its admin socket.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{demo_host_under, kubelet_dirs_under};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vfio-gpu-dra"));
    c.env_remove("VFIO_GPU_DRA_CRASH_AFTER_STEP")
        .env_remove("VFIO_GPU_DRA_STATE_DIR")
        .env_remove("KUBECONFIG")
        .env("VFIO_GPU_DRA_POLICY", "/nonexistent/policy.toml");
    c
}

/// Kills the `serve` child this test started (by its pid) when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_serve(d: &Path) -> Serve {
    // No API server is needed to hold the lock: the client connects lazily.
    std::fs::write(
        d.join("kubeconfig"),
        "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: http://127.0.0.1:9\n\
         users:\n- name: x\n  user: {}\ncontexts:\n- name: x\n  context:\n    cluster: x\n    user: x\n\
         current-context: x\n",
    )
    .unwrap();
    let mut cmd = bin();
    cmd.args(["serve", "--node-name", "n1", "--reconcile-interval", "3600"])
        .arg("--kubeconfig")
        .arg(d.join("kubeconfig"));
    let child = demo_host_under(kubelet_dirs_under(&mut cmd, d), d)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut serve = Serve(child);
    let lock = d.join("demo/state/engine.lock");
    let want = format!("pid={}", serve.0.id());
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(&lock).is_ok_and(|t| t.contains(&want)) {
            return serve;
        }
        if let Ok(Some(status)) = serve.0.try_wait() {
            panic!("serve exited early: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "serve did not take the state lock"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cli(d: &Path, args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let o = bin()
        .args(args)
        .arg("--demo")
        .arg("--demo-dir")
        .arg(d.join("demo"))
        .output()
        .unwrap();
    (o, t.elapsed())
}

#[test]
fn admin_commands_fail_fast_naming_serve_and_read_only_commands_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let serve = start_serve(d);
    let pid = serve.0.id();

    for args in [
        &["bind", "0000:ab:00.0"][..],
        &["release", "0000:ab:00.0"][..],
        &["reconcile"][..],
    ] {
        let (o, took) = cli(d, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            took < Duration::from_secs(10),
            "{args:?} waited {took:?} for the lock"
        );
        assert!(
            err.contains(&format!("locked by pid {pid} (")) && err.contains("serve"),
            "{args:?}: {err}"
        );
    }

    // Read-only commands read the shared ledger without the lock.
    for args in [
        &["ledger", "-o", "json"][..],
        &["devices", "-o", "json"][..],
        &["explain", "0000:ab:00.0", "-o", "json"][..],
    ] {
        let (o, took) = cli(d, args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
    }

    // `reset` is the one admin command the running plugin does itself
    // (through its admin socket): the alternative to stopping it.
    let (o, took) = cli(d, &["reset", "0000:ab:00.0", "-o", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(took < Duration::from_secs(10), "reset took {took:?}");
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out[0]["action"], "reset", "{out}");
    assert_eq!(out[0]["pciBusID"], "0000:ab:00.0", "{out}");
    assert!(d.join("demo/state/admin.sock").exists());

    drop(serve);
    let (o, _) = cli(d, &["bind", "0000:ab:00.0", "-o", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Upgrading from a version that kept serve's ledger under the kubelet
/// plugins directory: serve refuses to start on the new, empty default
/// rather than forget which GPUs it moved.
#[test]
fn serve_refuses_to_orphan_a_ledger_in_the_old_default_dir() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    if Path::new("/var/lib/vfio-gpu-dra/ledger.json").exists() {
        return; // a real node: the new default already has a ledger
    }
    let host = d.join("host");
    vfio_gpu_host::fixture::FixtureHost::create(&host).unwrap();
    let old = d.join("plugins/vfio-gpu.dra.dev");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(
        old.join("ledger.json"),
        "vfio-gpu-dra-ledger format=1 sha256=x\n{}",
    )
    .unwrap();
    let mut cmd = bin();
    cmd.args(["serve", "--node-name", "n1"])
        .arg("--host-root")
        .arg(&host);
    let mut child = kubelet_dirs_under(&mut cmd, d)
        .arg("--kubeconfig")
        .arg(d.join("no-kubeconfig"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve started on a new state directory, orphaning the old ledger");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("a ledger from an earlier version"), "{err}");
    assert!(!Path::new("/var/lib/vfio-gpu-dra/ledger.json").exists());
}

/// m3 as the admin sees it: a corrupt ledger is moved aside and said so; a
/// ledger of a newer format is kept and nothing is moved.
#[test]
fn ledger_problems_are_reported_as_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (o, _) = cli(d, &["devices"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let state = d.join("demo/state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("ledger.json"), "garbage").unwrap();
    let (o, _) = cli(d, &["bind", "0000:ab:00.0", "-o", "json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("ledger corrupt") && err.contains("moved to"),
        "{err}"
    );
    // A newer format: kept byte for byte, reported, nothing recorded over it.
    let newer = "vfio-gpu-dra-ledger format=99 sha256=00\n{}";
    std::fs::write(state.join("ledger.json"), newer).unwrap();
    let (o, _) = cli(d, &["release", "0000:ab:00.0", "-o", "json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("read-only"), "{err}");
    assert_eq!(
        std::fs::read_to_string(state.join("ledger.json")).unwrap(),
        newer
    );
}
