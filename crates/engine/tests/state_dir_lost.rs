#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! The state directory lost while a GPU is bound (a reinstall with another
//! state dir, a wiped hostPath): the boot mirror under the host's `/run`
//! still knows where the GPU came from, so it goes back to its driver; the
//! admin-intent rule is untouched (our own `driver_override` is ours again).

mod common;

use common::*;
use vfio_gpu_engine::{Action, EngineConfig, Holder};

fn claim() -> Holder {
    Holder::Claim {
        uid: "u1".into(),
        namespace: "ns".into(),
        name: "vm".into(),
    }
}

fn with_mirror(run: &std::path::Path) -> EngineConfig {
    EngineConfig {
        boot_mirror_dir: Some(run.to_path_buf()),
        ..config()
    }
}

#[test]
fn a_wiped_state_dir_adopts_this_boot_s_records_and_the_gpu_returns_to_nvidia() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let k = sim(&root);
    let run = root.join("run/vfio-gpu-dra");
    let state = dir.path().join("state");
    let e = engine_with(&k, &state, with_mirror(&run));
    e.configure(bdf(B), claim()).unwrap();
    drop(e);
    std::fs::remove_dir_all(&state).unwrap();
    let fresh = dir.path().join("other-state");
    let e = engine_with(&k, &fresh, with_mirror(&run));
    assert!(e.ledger().gpus.contains_key(&bdf(B)), "records adopted");
    let out = e.unconfigure(bdf(B), Some(&claim())).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
    assert_eq!(driver_of(&root, B).as_deref(), Some("nvidia"));
    assert_eq!(state_of(&root, B).1, None, "our override is gone too");
}

/// Without the mirror the lost records cannot be told from an admin's
/// `driver_override`: the GPU is kept on vfio (safe, but stranded there).
#[test]
fn without_the_mirror_a_lost_state_dir_keeps_the_gpu_on_vfio() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let k = sim(&root);
    let state = dir.path().join("state");
    let e = engine(&k, &state);
    e.configure(bdf(B), claim()).unwrap();
    drop(e);
    std::fs::remove_dir_all(&state).unwrap();
    let e = engine(&k, &state);
    let out = e.unconfigure(bdf(B), None).unwrap();
    assert_eq!(out.action, Action::LeftOnVfio, "{}", out.detail);
}

/// A mirror of an earlier boot is never adopted.
#[test]
fn a_mirror_from_another_boot_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let h = build_host(&root);
    let k = sim(&root);
    let run = root.join("run/vfio-gpu-dra");
    let e = engine_with(&k, &dir.path().join("s1"), with_mirror(&run));
    e.configure(bdf(B), claim()).unwrap();
    drop(e);
    h.write("proc/sys/kernel/random/boot_id", "another-boot\n")
        .unwrap();
    let e = engine_with(&k, &dir.path().join("s2"), with_mirror(&run));
    assert!(e.ledger().gpus.is_empty());
}

/// Two engines with different state directories on one host (the plugin and
/// an admin's `--state-dir` experiment) keep separate mirrors: losing the
/// first state directory adopts its records, not the other one's.
#[test]
fn each_state_dir_has_its_own_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let k = sim(&root);
    let run = root.join("run/vfio-gpu-dra");
    let first = dir.path().join("s1");
    let e1 = engine_with(&k, &first, with_mirror(&run));
    e1.configure(bdf(B), claim()).unwrap();
    drop(e1);
    let second = dir.path().join("s2");
    let e2 = engine_with(&k, &second, with_mirror(&run));
    e2.configure(bdf(A), claim()).unwrap();
    drop(e2);
    std::fs::remove_dir_all(&first).unwrap();
    let e = engine_with(&k, &first, with_mirror(&run));
    let gpus: Vec<_> = e.ledger().gpus.keys().copied().collect();
    assert_eq!(gpus, [bdf(B)], "its own records, not the other state dir's");
}
