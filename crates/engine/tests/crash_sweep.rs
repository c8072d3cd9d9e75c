//! Crash-point sweep: for every mutation step of configure and unconfigure,
//! "crash" there, open a fresh engine on the same state, reconcile, and check
//! the invariants on the host tree.

mod common;

use common::*;
use vfio_gpu_engine::ledger::OpState;
use vfio_gpu_engine::{Action, EngineConfig, EngineError, Holder};

fn claim() -> Holder {
    Holder::Claim {
        uid: "uid-1".into(),
        namespace: "vms".into(),
        name: "vm-gpu".into(),
    }
}

/// (address, (driver, driver_override)) of every function in the fixture.
type Snapshot = Vec<(String, (Option<String>, Option<String>))>;

/// Functions of every GPU in the fixture, with where they started.
fn snapshot(host: &std::path::Path) -> Snapshot {
    [A, A_AUDIO, B, C, D, E, F]
        .iter()
        .map(|b| (b.to_string(), state_of(host, b)))
        .collect()
}

fn assert_invariants(host: &std::path::Path, before: &Snapshot, gpu_functions: &[&str], ctx: &str) {
    let after = snapshot(host);
    for ((b, start), (_, now)) in before.iter().zip(&after) {
        if start.0.is_some() {
            assert!(
                now.0.is_some(),
                "{ctx}: {b} left without a driver ({now:?})"
            );
        }
        // The pre-bound GPU never leaves vfio.
        if b == C {
            assert_eq!(
                now.0.as_deref(),
                Some("vfio-pci"),
                "{ctx}: pre-bound GPU moved"
            );
        }
        if gpu_functions.contains(&b.as_str()) {
            assert_eq!(now, start, "{ctx}: {b} not back where it was");
        }
    }
}

/// Sweeps configure of `gpu` (its functions listed) for every crash point.
fn sweep_configure(gpu: &str, functions: &[&str]) -> u64 {
    let mut n = 1;
    loop {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        build_host(&host);
        let before = snapshot(&host);
        let k = sim(&host);
        let state = dir.path().join("state");
        let e = engine_with(
            &k,
            &state,
            EngineConfig {
                crash_after_step: Some(n),
                ..config()
            },
        );
        let r = e.configure(bdf(gpu), claim());
        drop(e);
        match r {
            Err(EngineError::SimulatedCrash(_)) => {}
            Ok(_) => return n - 1,
            Err(other) => panic!("configure failed at crash point {n}: {other}"),
        }
        let e = engine(&k, &state);
        let results = e.reconcile().unwrap();
        for r in &results {
            assert!(r.is_ok(), "crash point {n}: reconcile: {r:?}");
        }
        let ctx = format!("configure {gpu}, crash after step {n}");
        let ledger = e.ledger();
        match ledger.gpus.get(&bdf(gpu)).map(|r| r.state) {
            // The crash came after the completion was committed: the move stands.
            Some(OpState::Configured) => {
                for f in functions {
                    assert!(
                        driver_of(&host, f).is_some_and(|d| d == "vfio-pci"),
                        "{ctx}: configured but {f} is not on vfio-pci"
                    );
                }
                assert_invariants(&host, &before, &[], &ctx);
            }
            None | Some(OpState::Prebound | OpState::ReleasedUnbound) => {
                assert_invariants(&host, &before, functions, &ctx)
            }
            other => panic!("{ctx}: ledger left in {other:?}"),
        }
        n += 1;
    }
}

/// Sweeps unconfigure of a configured `gpu` for every crash point.
fn sweep_unconfigure(gpu: &str, functions: &[&str], keep: bool) -> u64 {
    let mut n = 1;
    loop {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        build_host(&host);
        let before = snapshot(&host);
        let k = sim(&host);
        let state = dir.path().join("state");
        {
            let e = engine(&k, &state);
            e.configure(bdf(gpu), claim()).unwrap();
        }
        let configured = snapshot(&host);
        let e = engine_with(
            &k,
            &state,
            EngineConfig {
                crash_after_step: Some(n),
                ..config()
            },
        );
        let r = e.unconfigure(bdf(gpu), Some(&claim()));
        drop(e);
        match r {
            Err(EngineError::SimulatedCrash(_)) => {}
            Ok(o) => {
                let expected = if keep {
                    Action::LeftOnVfio
                } else {
                    Action::Restored
                };
                assert_eq!(o.action, expected);
                return n - 1;
            }
            Err(other) => panic!("unconfigure failed at crash point {n}: {other}"),
        }
        let e = engine(&k, &state);
        for r in e.reconcile().unwrap() {
            assert!(r.is_ok(), "crash point {n}: reconcile: {r:?}");
        }
        let ctx = format!("unconfigure {gpu}, crash after step {n}");
        if keep {
            assert_invariants(&host, &configured, functions, &ctx);
        } else {
            assert_invariants(&host, &before, functions, &ctx);
        }
        n += 1;
    }
}

#[test]
fn crash_sweep_covers_every_step() {
    let mut total = 0;
    // Two functions (VGA + HDA), both bound to host drivers.
    total += sweep_configure(A, &[A, A_AUDIO]);
    total += sweep_unconfigure(A, &[A, A_AUDIO], false);
    // Single function on nvidia.
    total += sweep_configure(B, &[B]);
    total += sweep_unconfigure(B, &[B], false);
    // A function with no driver at all: it goes back to no driver.
    total += sweep_configure(F, &[F]);
    total += sweep_unconfigure(F, &[F], false);
    // Named by vfio-pci.ids but on nvidia: released, it stays on vfio.
    total += sweep_configure(D, &[D]);
    total += sweep_unconfigure(D, &[D], true);
    // Already on vfio: recorded, never moved.
    total += sweep_configure(C, &[C]);
    total += sweep_unconfigure(C, &[C], true);
    println!("crash points swept: {total}");
    assert!(
        total >= 30,
        "only {total} crash points: the sweep is not reaching the steps"
    );
}
