#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! A `/proc` holder scan that cannot finish in time (any pod can open
//! hundreds of thousands of descriptors) answers "busy, retry" and never
//! quarantines the GPU; once the scan can finish, the same prepare works
//! (security review M1).

mod common;

use std::ffi::CString;
use std::time::Duration;

use common::*;
use vfio_gpu_engine::{Action, EngineConfig, EngineError, Holder};

fn claim() -> Holder {
    Holder::Claim {
        uid: "u1".into(),
        namespace: "ns".into(),
        name: "vm".into(),
    }
}

#[test]
fn a_scan_past_its_deadline_is_busy_not_stuck_and_the_gpu_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let h = build_host(&root);
    add_nvidia_minor(&h, B, 0);
    // A process with a vfio device fd whose fdinfo read blocks (a FIFO): the
    // scan cannot finish until something writes to it.
    let p = root.join("proc/4242");
    std::fs::create_dir_all(p.join("fd")).unwrap();
    std::fs::create_dir_all(p.join("fdinfo")).unwrap();
    std::os::unix::fs::symlink("anon_inode:[vfio-device]", p.join("fd/7")).unwrap();
    let fifo = p.join("fdinfo/7");
    let c = CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let k = sim(&root);
    let e = engine_with(
        &k,
        &dir.path().join("state"),
        EngineConfig {
            command_deadline: Duration::from_millis(300),
            ..config()
        },
    );
    let err = e.configure(bdf(B), claim()).unwrap_err();
    match &err {
        EngineError::Busy { holders, .. } => {
            assert!(holders[0].node.contains("did not finish"), "{err}")
        }
        other => panic!("expected busy, got {other}"),
    }
    assert!(k.log().is_empty(), "nothing written: {:?}", k.log());
    // Not quarantined: other reads of B go on, and the view shows no stuck op.
    let (views, _) = e.discover().unwrap();
    let b = views.iter().find(|v| v.gpu.bdf() == bdf(B)).unwrap();
    assert_eq!(b.stuck, None);
    // Unblock: a writer for the reader stuck on the FIFO, and a plain file in
    // its place for every later pass; the next prepare then works.
    let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let plain = p.join("fdinfo/.7");
    std::fs::write(&plain, "flags: 02\n").unwrap();
    std::fs::rename(&plain, &fifo).unwrap();
    drop(writer);
    let out = e.configure(bdf(B), claim()).unwrap();
    assert_eq!(out.action, Action::Moved, "{}", out.detail);
}
