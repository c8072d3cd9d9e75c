#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! Resource exhaustion is a fault like any other: for every host write of a
//! prepare and of a release, that write fails with EMFILE, ENOSPC or ENOMEM
//! (once); then no function is without a driver, the error names where each
//! one is, and after a reconcile the GPU is either wholly on vfio for its
//! claim or back where it was, and a second reconcile writes nothing.

mod common;

use common::*;
use vfio_gpu_engine::ledger::OpState;
use vfio_gpu_engine::sim::{Fault, FaultAction};
use vfio_gpu_engine::{Engine, Holder};

const ERRNOS: [(i32, &str); 3] = [(24, "EMFILE"), (28, "ENOSPC"), (12, "ENOMEM")];

fn claim() -> Holder {
    Holder::Claim {
        uid: "u1".into(),
        namespace: "ns".into(),
        name: "vm".into(),
    }
}

fn nth_write_fails(n: usize, errno: i32) -> Fault {
    Fault {
        kind: None,
        bdf: None,
        driver: None,
        nth: n,
        action: FaultAction::Fail(errno),
    }
}

/// Every function of A has a driver; after reconcile A is consistent; a
/// second reconcile writes nothing.
fn check_at_rest(
    e: &Engine,
    k: &vfio_gpu_engine::sim::SimKernel,
    root: &std::path::Path,
    ctx: &str,
) {
    for f in [A, A_AUDIO] {
        assert!(driver_of(root, f).is_some(), "{ctx}: {f} has no driver");
    }
    k.clear_faults();
    for r in e.reconcile().unwrap() {
        assert!(r.is_ok(), "{ctx}: reconcile: {r:?}");
    }
    let on = |f: &str| driver_of(root, f);
    match e.ledger().gpus.get(&bdf(A)).map(|r| r.state) {
        Some(OpState::Configured) => {
            assert_eq!(on(A).as_deref(), Some("vfio-pci"), "{ctx}");
            assert_eq!(on(A_AUDIO).as_deref(), Some("vfio-pci"), "{ctx}");
        }
        None => {
            assert_eq!(state_of(root, A), (Some("nvidia".into()), None), "{ctx}");
            assert_eq!(
                state_of(root, A_AUDIO),
                (Some("snd_hda_intel".into()), None),
                "{ctx}"
            );
        }
        other => panic!("{ctx}: record left {other:?}"),
    }
    let before = k.log().len();
    for r in e.reconcile().unwrap() {
        assert!(r.is_ok(), "{ctx}: second reconcile: {r:?}");
    }
    assert_eq!(k.log().len(), before, "{ctx}: second reconcile wrote");
}

#[test]
fn every_write_of_a_prepare_failing_for_lack_of_resources_leaves_no_gpu_stranded() {
    let mut swept = 0;
    for (errno, name) in ERRNOS {
        for n in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("host");
            build_host(&root);
            let k = sim(&root);
            let e = engine(&k, &dir.path().join("state"));
            k.inject(nth_write_fails(n, errno));
            let r = e.configure(bdf(A), claim());
            let ctx = format!("prepare, write {n} fails with {name}");
            if r.is_ok() && k.log().len() <= n {
                break; // the fault never fired: every write was swept
            }
            if let Err(err) = &r {
                assert!(
                    !err.to_string().contains("on no driver"),
                    "{ctx}: reported a driverless function: {err}"
                );
            }
            check_at_rest(&e, &k, &root, &ctx);
            swept += 1;
        }
    }
    assert!(swept >= 3 * 6, "swept {swept} fault points");
}

#[test]
fn every_write_of_a_release_failing_for_lack_of_resources_leaves_no_gpu_stranded() {
    let mut swept = 0;
    for (errno, name) in ERRNOS {
        for n in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("host");
            build_host(&root);
            let k = sim(&root);
            let e = engine(&k, &dir.path().join("state"));
            e.configure(bdf(A), claim()).unwrap();
            let start = k.log().len();
            k.inject(nth_write_fails(n, errno));
            let r = e.unconfigure(bdf(A), Some(&claim()));
            let ctx = format!("release, write {n} fails with {name}");
            if r.is_ok() && k.log().len() - start <= n {
                break;
            }
            if let Err(err) = &r {
                assert!(
                    !err.to_string().contains("on no driver"),
                    "{ctx}: reported a driverless function: {err}"
                );
            }
            check_at_rest(&e, &k, &root, &ctx);
            // The kubelet retries an unprepare until it succeeds.
            if r.is_err() {
                e.unconfigure(bdf(A), Some(&claim())).unwrap();
                assert_eq!(state_of(&root, A), (Some("nvidia".into()), None), "{ctx}");
            }
            swept += 1;
        }
    }
    assert!(swept >= 3 * 6, "swept {swept} fault points");
}
