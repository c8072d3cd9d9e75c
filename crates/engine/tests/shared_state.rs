#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! Two engines on one state directory with the state lock per operation (two
//! plugin instances during a rolling update): each works on the ledger as the
//! other left it, holds exclude each other, and lifetime engines (the CLI)
//! still fit between operations.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use vfio_gpu_engine::{Action, EngineConfig, EngineError, Holder, StateLockMode};

fn shared() -> EngineConfig {
    EngineConfig {
        state_lock_mode: StateLockMode::PerOperation,
        ..config()
    }
}

fn claim(uid: &str) -> Holder {
    Holder::Claim {
        uid: uid.into(),
        namespace: "ns".into(),
        name: uid.into(),
    }
}

#[test]
fn each_engine_sees_what_the_other_wrote_and_nothing_moves_twice() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let state = dir.path().join("state");
    let kernel = sim(&root);
    let old = engine_with(&kernel, &state, shared());
    // A lifetime engine would wait for `old` here and fail; this one opens.
    let new = engine_with(&kernel, &state, shared());

    let o = old.configure(bdf(A), claim("c1")).unwrap();
    assert_eq!(o.action, Action::Moved);
    // The new instance knows the claim without having prepared it.
    let again = new.configure(bdf(A), claim("c1")).unwrap();
    assert_eq!(again.action, Action::AlreadyConfigured);
    assert_eq!(new.held_by(&claim("c1")), vec![bdf(A)]);
    // And refuses it to another claim.
    assert!(new.configure(bdf(A), claim("c2")).is_err());

    let r = new.unconfigure(bdf(A), Some(&claim("c1"))).unwrap();
    assert_eq!(r.action, Action::Restored);
    assert_eq!(driver_of(&root, A).as_deref(), Some("nvidia"));
    // The old instance sees the release: nothing left to do.
    assert!(old.held_by(&claim("c1")).is_empty());
    let twice = old.unconfigure(bdf(A), Some(&claim("c1"))).unwrap();
    assert_eq!(twice.action, Action::NothingToDo);
    let unbinds = kernel
        .log()
        .iter()
        .filter(|l| l.as_str() == format!("unbind {A} from nvidia"))
        .count();
    assert_eq!(unbinds, 1, "{:?}", kernel.log());
}

#[test]
fn a_hold_excludes_the_other_engine_and_the_cli_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let state = dir.path().join("state");
    let kernel = sim(&root);
    let old = Arc::new(engine_with(&kernel, &state, shared()));
    let new = Arc::new(engine_with(&kernel, &state, shared()));

    let hold = old.hold().unwrap();
    // Concurrent operations of the same engine join the hold.
    let o = old.configure(bdf(B), claim("c1")).unwrap();
    assert_eq!(o.action, Action::Moved);
    // A CLI engine (lifetime lock, no wait) is refused while the hold lasts.
    let cli = vfio_gpu_engine::Engine::open(
        Arc::new(kernel.clone()),
        &state,
        Default::default(),
        Default::default(),
        EngineConfig {
            state_lock_wait: Duration::ZERO,
            ..config()
        },
    );
    assert!(matches!(cli, Err(EngineError::StateLocked(_))));

    // The other engine waits for the hold, then sees the record.
    let done = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (new, done) = (Arc::clone(&new), Arc::clone(&done));
        std::thread::spawn(move || {
            let r = new.unconfigure(bdf(B), Some(&claim("c1")));
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !done.load(Ordering::SeqCst),
        "the other engine ran during the hold"
    );
    drop(hold);
    let r = waiter.join().unwrap().unwrap();
    assert_eq!(r.action, Action::Restored);
    assert_eq!(driver_of(&root, B).as_deref(), Some("nvidia"));

    // Between operations the CLI opens, and what it writes is seen after.
    {
        let cli = engine_with(&kernel, &state, config());
        cli.configure(bdf(A), Holder::Admin).unwrap();
    }
    assert_eq!(old.held_by(&Holder::Admin), vec![bdf(A)]);
    assert!(new.configure(bdf(A), claim("c2")).is_err());
}
