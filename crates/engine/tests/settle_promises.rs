#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! The promise at every path that settles a record (release, the finish of
//! an interrupted release, rollback, reconcile): intent read at that instant
//! decides, a state the plugin produced is never admin intent, budgets never
//! starve putting things back, and an untrusted ledger never answers. Each
//! test names the review finding (engine review 2026-12-04) it reproduces.

mod common;

use std::time::Duration;

use common::*;
use vfio_gpu_engine::kernel::{SysfsWrite, WriteKind};
use vfio_gpu_engine::ledger::OpState;
use vfio_gpu_engine::sim::{Fault, FaultAction};
use vfio_gpu_engine::{Action, EngineConfig, EngineError, StateLockMode};

const EIO: i32 = 5;
const ENODEV: i32 = 19;

fn fail_bind(b: &str, driver: &str, errno: i32) -> Fault {
    Fault {
        driver: Some(driver.into()),
        ..Fault::on(WriteKind::Bind, bdf(b), FaultAction::Fail(errno))
    }
}

/// n10: a release interrupted after its decision (nvidia refused the bind,
/// B parked on vfio) is finished by reconcile with intent read again: a
/// driverctl file the admin wrote meanwhile keeps B on vfio.
#[test]
fn reconcile_finishing_a_release_asks_intent_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let h = build_host(&root);
    let k = sim(&root);
    let e = engine(&k, &dir.path().join("state"));
    e.configure(bdf(B), claim("u1")).unwrap();
    k.inject(fail_bind(B, "nvidia", EIO));
    assert!(e.unconfigure(bdf(B), Some(&claim("u1"))).is_err());
    assert_eq!(driver_of(&root, B).as_deref(), Some("vfio-pci"), "parked");
    assert_eq!(e.ledger().gpus[&bdf(B)].state, OpState::Releasing);
    h.write(&format!("etc/driverctl.d/pci-{B}"), "vfio-pci\n")
        .unwrap();
    k.clear_faults();
    let results = e.reconcile().unwrap();
    let b = results
        .iter()
        .flatten()
        .find(|o| o.bdf == bdf(B))
        .expect("B reconciled");
    assert_eq!(b.action, Action::LeftOnVfio, "{}", b.detail);
    assert_eq!(driver_of(&root, B).as_deref(), Some("vfio-pci"));
    assert_eq!(e.ledger().gpus[&bdf(B)].state, OpState::Prebound);
    // The record keeps where B came from.
    let rec = &e.ledger().gpus[&bdf(B)];
    assert_eq!(
        rec.functions[0]
            .original_driver
            .as_ref()
            .map(|d| d.as_str()),
        Some("nvidia")
    );
}

/// n10, the defence in depth: whatever path asks, a bind to a host driver is
/// refused while intent says keep. A crash between the Releasing commit and
/// the restore, then a driverctl file, then reconcile: still on vfio.
#[test]
fn a_crash_mid_release_then_intent_keeps_the_gpu_on_vfio() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let h = build_host(&root);
    let k = sim(&root);
    let state = dir.path().join("state");
    let e = engine(&k, &state);
    e.configure(bdf(B), claim("u1")).unwrap();
    let steps = e.steps();
    drop(e);
    // The first mutation of the release is the Releasing commit.
    let e = engine_with(
        &k,
        &state,
        EngineConfig {
            crash_after_step: Some(1),
            ..config()
        },
    );
    let _ = steps;
    assert!(matches!(
        e.unconfigure(bdf(B), Some(&claim("u1"))),
        Err(EngineError::SimulatedCrash(_))
    ));
    drop(e);
    h.write(&format!("etc/driverctl.d/pci-{B}"), "vfio-pci\n")
        .unwrap();
    let e = engine(&k, &state);
    for r in e.reconcile().unwrap() {
        r.unwrap();
    }
    assert_eq!(driver_of(&root, B).as_deref(), Some("vfio-pci"));
    assert!(
        !k.log().contains(&write::bind(B, "nvidia")),
        "{:?}",
        k.log()
    );
}

/// n2: a rollback that could not bind nvidia parks B on vfio; a later release
/// must see that as the plugin's own doing (not "bound before us") and, once
/// nvidia works, return B there.
#[test]
fn a_failed_rollback_is_not_relabelled_admin_owned() {
    let (_dir, root, k, e) = world();
    k.inject(fail_bind(B, "vfio-pci", ENODEV));
    k.inject(fail_bind(B, "nvidia", EIO));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(
        matches!(err, EngineError::RollbackIncomplete { .. }),
        "{err}"
    );
    assert_eq!(driver_of(&root, B).as_deref(), Some("vfio-pci"), "parked");
    k.clear_faults();
    let out = e.unconfigure(bdf(B), None).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
    assert_eq!(driver_of(&root, B).as_deref(), Some("nvidia"));
    assert!(!e.ledger().gpus.contains_key(&bdf(B)));
}

/// n3: a prepare whose budget is spent by a slow vfio `remove()` while it
/// finishes an earlier release first must still bind the host driver back:
/// putting things back is never cut short, and no function is left driverless.
#[test]
fn a_spent_budget_never_starves_finishing_a_release() {
    let (_dir, root, k, e) = world_with(EngineConfig {
        operation_budget: Duration::from_millis(300),
        ..config()
    });
    e.configure(bdf(A), claim("u1")).unwrap();
    k.inject(fail_bind(A, "nvidia", EIO));
    assert!(e.unconfigure(bdf(A), Some(&claim("u1"))).is_err());
    assert_eq!(e.ledger().gpus[&bdf(A)].state, OpState::Releasing);
    k.clear_faults();
    k.set_latency(WriteKind::Unbind, "vfio-pci", Duration::from_millis(400));
    let _ = e.configure(bdf(A), claim("u2"));
    for f in [A, A_AUDIO] {
        assert!(
            driver_of(&root, f).is_some(),
            "{f} left without a driver: {:?}",
            state_of(&root, f)
        );
    }
}

/// n9: when the ledger another instance wrote cannot be understood, an
/// unprepare must fail (retryable) rather than answer "not moved by us"
/// from an empty ledger; once the file is readable again it works.
#[test]
fn an_unreadable_ledger_never_answers_a_release() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let k = sim(&root);
    let state = dir.path().join("state");
    let e = engine_with(
        &k,
        &state,
        EngineConfig {
            state_lock_mode: StateLockMode::PerOperation,
            ..config()
        },
    );
    e.configure(bdf(B), claim("u1")).unwrap();
    let path = state.join("ledger.json");
    let good = std::fs::read(&path).unwrap();
    let newer = String::from_utf8(good.clone())
        .unwrap()
        .replacen("format=1", "format=2", 1);
    std::fs::write(&path, newer).unwrap();
    let r = e.unconfigure(bdf(B), Some(&claim("u1")));
    assert!(r.is_err(), "answered from an empty ledger: {r:?}");
    assert_eq!(driver_of(&root, B).as_deref(), Some("vfio-pci"));
    std::fs::write(&path, good).unwrap();
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
}

/// n4: a write still blocked in another live process (its `stuck_on` in the
/// shared ledger) is not cleared, nor its device written, by this process's
/// reconcile.
#[test]
fn another_process_s_blocked_write_is_left_alone() {
    use vfio_gpu_engine::sim::BlockHandle;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let k = sim(&root);
    let state = dir.path().join("state");
    let shared = EngineConfig {
        state_lock_mode: StateLockMode::PerOperation,
        unbind_deadline: Duration::from_millis(200),
        ..config()
    };
    let serve = engine_with(&k, &state, shared.clone());
    let gate = BlockHandle::new();
    k.inject(Fault::on(
        WriteKind::Unbind,
        bdf(B),
        FaultAction::Block(gate.clone()),
    ));
    let err = serve.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(matches!(err, EngineError::Stuck { .. }), "{err}");
    assert!(serve.ledger().gpus[&bdf(B)].stuck_on.is_some());
    let before = k.log().len();
    let cli = engine_with(&k, &state, shared);
    let results = cli.reconcile().unwrap();
    let b = results.iter().find(|r| match r {
        Ok(o) => o.bdf == bdf(B),
        Err((b, _)) => *b == bdf(B),
    });
    assert!(
        matches!(b, Some(Err((_, EngineError::Stuck { .. })))),
        "{b:?}"
    );
    let b_writes: Vec<SysfsWrite> = k.log()[before..]
        .iter()
        .filter(|w| w.bdf() == bdf(B))
        .cloned()
        .collect();
    assert!(b_writes.is_empty(), "wrote to a stuck device: {b_writes:?}");
    assert!(cli.ledger().gpus[&bdf(B)].stuck_on.is_some());
    gate.release();
}

/// n13: a group member that cannot be read is neither moved nor silently
/// left out: the move is refused before any host write.
#[test]
fn an_unreadable_group_member_blocks_the_move() {
    let (_dir, root, k, e) = world();
    k.fail_reads(bdf(A_AUDIO), Some(EIO));
    let err = e.configure(bdf(A), claim("u1")).unwrap_err();
    assert!(
        matches!(err, EngineError::ForeignGroupMembers { .. }),
        "{err}"
    );
    assert!(k.log().is_empty(), "{:?}", k.log());
    assert_eq!(driver_of(&root, A).as_deref(), Some("nvidia"));
}

/// n8: a prepare's budget starts once the locks are its own: waiting for
/// another instance's operation is not its work.
#[test]
fn waiting_for_the_state_lock_does_not_spend_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let k = sim(&root);
    let state = dir.path().join("state");
    let shared = EngineConfig {
        state_lock_mode: StateLockMode::PerOperation,
        operation_budget: Duration::from_millis(300),
        ..config()
    };
    let other = engine_with(&k, &state, shared.clone());
    let e = engine_with(&k, &state, shared);
    let held = other.hold().unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        drop(held);
    });
    let out = e.configure(bdf(B), claim("u1")).unwrap();
    assert_eq!(out.action, Action::Moved, "{}", out.detail);
    releaser.join().unwrap();
}

/// n15: with the ledger kept read-only (a newer version's file), reconcile
/// repairs nothing from it, not even GPUs it seems to have no record of.
#[test]
fn reconcile_on_a_read_only_ledger_writes_nothing_to_the_host() {
    let (_dir, _root, k, state, e) = world_and_state();
    e.configure(bdf(B), claim("u1")).unwrap();
    drop(e);
    let path = state.join("ledger.json");
    let newer = String::from_utf8(std::fs::read(&path).unwrap())
        .unwrap()
        .replacen("format=1", "format=2", 1);
    std::fs::write(&path, newer).unwrap();
    let before = k.log().len();
    let e = engine(&k, &state);
    assert!(e.reconcile().is_err());
    assert_eq!(k.log()[before..], [], "no host write");
    assert!(e.unconfigure(bdf(B), None).is_err(), "no release either");
}

/// n15 (b): a GPU this plugin never moved and finds without a driver was
/// unbound by someone else (an admin's maintenance, another tool mid-way):
/// reconcile leaves it as found and says so, instead of probing it back to
/// nvidia (the rebind this project exists to avoid), whatever the intent.
#[test]
fn reconcile_leaves_a_driverless_gpu_it_never_moved_as_found() {
    for keep in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("host");
        let h = build_host(&root);
        if keep {
            h.write(&format!("etc/driverctl.d/pci-{B}"), "vfio-pci\n")
                .unwrap();
        }
        let k = sim(&root);
        // Someone else unbinds B before serve starts.
        vfio_gpu_engine::kernel::Kernel::write(&k, &write::unbind(B, "nvidia")).unwrap();
        let before = k.log().len();
        let e = engine(&k, &dir.path().join("state"));
        let results = e.reconcile().unwrap();
        let b = results
            .iter()
            .flatten()
            .find(|o| o.bdf == bdf(B))
            .expect("B reconciled");
        assert_eq!(b.action, Action::Noted, "keep={keep}: {}", b.detail);
        assert!(b.detail.contains("left as found"), "{}", b.detail);
        assert_eq!(driver_of(&root, B), None, "keep={keep}");
        assert_eq!(k.log()[before..], [], "keep={keep}: no host write");
        assert!(!e.ledger().gpus.contains_key(&bdf(B)), "no record made");
    }
}

/// n17: a driverctl `none` pin written while the GPU is held decides its
/// release: left unbound, as the admin asked, not bound back to nvidia.
#[test]
fn a_pin_to_no_driver_written_while_held_is_honoured_at_release() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let h = build_host(&root);
    let k = sim(&root);
    let e = engine(&k, &dir.path().join("state"));
    e.configure(bdf(B), claim("u1")).unwrap();
    h.write(&format!("etc/driverctl.d/pci-{B}"), "none\n")
        .unwrap();
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
    assert_eq!(driver_of(&root, B), None, "{}", out.detail);
    assert!(
        !k.log().contains(&write::bind(B, "nvidia")),
        "{:?}",
        k.log()
    );
}

/// n12: a release never assumes nobody holds a function it could not read:
/// with the companion unreadable, nothing is unbound, and once it reads
/// again the release goes through.
#[test]
fn a_release_with_an_unreadable_function_touches_nothing() {
    let (_dir, root, k, e) = world();
    e.configure(bdf(A), claim("u1")).unwrap();
    let before = k.log().len();
    k.fail_reads(bdf(A_AUDIO), Some(EIO));
    assert!(e.unconfigure(bdf(A), Some(&claim("u1"))).is_err());
    assert_eq!(k.log()[before..], [], "nothing written");
    assert_eq!(driver_of(&root, A).as_deref(), Some("vfio-pci"));
    k.fail_reads(bdf(A_AUDIO), None);
    let out = e.unconfigure(bdf(A), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
}
