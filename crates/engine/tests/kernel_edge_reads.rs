//! Every engine read of the host goes through the kernel edge with a
//! deadline, so the simulated kernel can block or fail any of them: nvidia's
//! procfs (review n5), the `/proc` holder scan, `/dev/vfio`, the driver
//! directories. A read that blocks quarantines only its device; a read that
//! fails (EMFILE, ENOMEM) stops a move before its first host write.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vfio_gpu_engine::sim::{BlockHandle, FaultAction};
use vfio_gpu_engine::{Action, EngineConfig, EngineError};

const EMFILE: i32 = 24;

fn quick() -> EngineConfig {
    EngineConfig {
        read_deadline: Duration::from_millis(200),
        command_deadline: Duration::from_millis(200),
        ..config()
    }
}

/// n5: nvidia's `information` file hangs (RM wedged): discovery still
/// returns, B is reported stuck, and A moves meanwhile.
#[test]
fn a_hung_nvidia_procfs_read_quarantines_only_its_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let h = build_host(&root);
    add_nvidia_minor(&h, B, 0);
    let k = sim(&root);
    let e = engine_with(&k, &dir.path().join("state"), quick());
    let gate = BlockHandle::new();
    k.fault_reads_under(
        &format!("proc/driver/nvidia/gpus/{B}/information"),
        FaultAction::Block(gate.clone()),
    );
    let t = Instant::now();
    let (views, _) = e.discover().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let b = views.iter().find(|v| v.gpu.bdf() == bdf(B)).unwrap();
    assert!(b.stuck.is_some(), "B quarantined while its read hangs");
    assert!(matches!(
        e.configure(bdf(B), claim("u1")),
        Err(EngineError::Stuck { .. })
    ));
    let a = e.configure(bdf(A), claim("u2")).unwrap();
    assert_eq!(a.action, Action::Moved);
    gate.release();
}

/// Descriptor exhaustion on a read is an error before any write, never a
/// half-done move.
#[test]
fn emfile_reading_the_driver_directory_stops_the_move_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let k = sim(&root);
    let e = engine_with(&k, &dir.path().join("state"), quick());
    k.fault_reads_under("sys/bus/pci/drivers/vfio-pci", FaultAction::Fail(EMFILE));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(err.to_string().contains("os error 24"), "{err}");
    assert!(k.log().is_empty(), "{:?}", k.log());
    assert!(e.ledger().gpus.is_empty());
    k.clear_faults();
    assert_eq!(
        e.configure(bdf(B), claim("u1")).unwrap().action,
        Action::Moved
    );
}

/// The `/proc` holder scan blocked (a hung fd table): busy, retry; nothing
/// written, no GPU quarantined.
#[test]
fn a_blocked_holder_scan_answers_busy() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let h = build_host(&root);
    add_nvidia_minor(&h, B, 0);
    let k = sim(&root);
    let e = engine_with(&k, &dir.path().join("state"), quick());
    let gate = BlockHandle::new();
    k.fault_reads_under("proc/*", FaultAction::Block(gate.clone()));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(matches!(err, EngineError::Busy { .. }), "{err}");
    assert!(k.log().is_empty());
    gate.release();
}

/// The admin's intent sources are read under the read deadline too: a
/// policy file that hangs (a FIFO standing in for a hung mount) makes a
/// prepare fail and a release keep the GPU on vfio, never guess "restore".
#[test]
fn intent_that_cannot_be_read_in_time_never_restores() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let k = sim(&root);
    let policy = dir.path().join("policy.toml");
    let e = engine_with(
        &k,
        &dir.path().join("state"),
        EngineConfig {
            policy_file: Some(policy.clone()),
            ..quick()
        },
    );
    e.configure(bdf(B), claim("u1")).unwrap();
    let c = std::ffi::CString::new(policy.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = e.configure(bdf(A), claim("u2")).unwrap_err();
    assert!(matches!(err, EngineError::IntentUnreadable(_)), "{err}");
    let out = e.unconfigure(bdf(B), Some(&claim("u1")));
    assert_eq!(driver_of(&root, B).as_deref(), Some("vfio-pci"), "{out:?}");
    assert!(
        matches!(out, Err(EngineError::IntentUnreadable(_))),
        "never recorded as admin-owned: {out:?}"
    );
    // Unblock the hung read (a writer, then EOF), and intent reads again.
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(&policy)
        .unwrap();
    std::fs::remove_file(&policy).unwrap();
    drop(w);
    std::thread::sleep(Duration::from_millis(50));
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
}
