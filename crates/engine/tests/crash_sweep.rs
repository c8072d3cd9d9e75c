#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! Crash-point sweep: for every mutation step of configure and unconfigure,
//! "crash" there, open a fresh engine on the same state, reconcile, and check
//! the invariants on the host tree.

mod common;

use common::*;
use vfio_gpu_engine::ledger::OpState;
use vfio_gpu_engine::{Action, EngineConfig, EngineError, Holder};

/// Crash points swept inside reconcile itself.
static RECONCILE_STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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

/// For a GPU admin intent keeps on vfio: each function is where it was, or
/// on vfio-pci; never sent to a host driver it was not on.
fn assert_kept_or_back(host: &std::path::Path, before: &Snapshot, functions: &[&str], ctx: &str) {
    for (b, start) in before
        .iter()
        .filter(|(b, _)| functions.contains(&b.as_str()))
    {
        let now = state_of(host, b);
        assert!(
            now == *start || now.0.as_deref() == Some("vfio-pci"),
            "{ctx}: {b} neither where it was nor on vfio-pci ({now:?})"
        );
    }
    assert_invariants(host, before, &[], ctx);
}

/// A second reconcile changes nothing: neither the host nor the ledger states.
fn assert_fixed_point(e: &vfio_gpu_engine::Engine, host: &std::path::Path, ctx: &str) {
    let states = |e: &vfio_gpu_engine::Engine| {
        e.ledger()
            .gpus
            .iter()
            .map(|(b, r)| (*b, r.state, r.holder.clone()))
            .collect::<Vec<_>>()
    };
    let (host_before, ledger_before) = (snapshot(host), states(e));
    for r in e.reconcile().unwrap() {
        assert!(r.is_ok(), "{ctx}: second reconcile: {r:?}");
    }
    assert_eq!(
        snapshot(host),
        host_before,
        "{ctx}: second reconcile moved a function"
    );
    assert_eq!(
        states(e),
        ledger_before,
        "{ctx}: second reconcile changed the ledger"
    );
}

/// Crashes reconcile itself after each of its steps; a third engine must
/// still bring the host back to the invariants. Returns the steps swept.
fn sweep_reconcile_crash(
    replay: &dyn Fn(&std::path::Path, &std::path::Path) -> SimKernelHandle,
    before: &dyn Fn(&std::path::Path) -> Snapshot,
    functions: &[&str],
    ctx: &str,
) -> u64 {
    let mut m = 1;
    loop {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        let state = dir.path().join("state");
        let k = replay(&host, &state);
        let start = before(&host);
        let e = engine_with(
            &k,
            &state,
            EngineConfig {
                crash_after_step: Some(m),
                ..config()
            },
        );
        let crashed = matches!(e.reconcile(), Err(EngineError::SimulatedCrash(_)))
            || e.reconcile()
                .map(|rs| {
                    rs.iter()
                        .any(|r| matches!(r, Err((_, EngineError::SimulatedCrash(_)))))
                })
                .unwrap_or(true);
        drop(e);
        if !crashed {
            return m - 1;
        }
        let e = engine(&k, &state);
        for r in e.reconcile().unwrap() {
            assert!(r.is_ok(), "{ctx}, reconcile crashed after step {m}: {r:?}");
        }
        let ctx = format!("{ctx}, reconcile crashed after step {m}");
        if functions.contains(&D) {
            assert_kept_or_back(&host, &start, functions, &ctx);
        } else {
            assert_invariants(&host, &start, functions, &ctx);
        }
        assert_fixed_point(&e, &host, &ctx);
        m += 1;
    }
}

type SimKernelHandle = vfio_gpu_engine::sim::SimKernel;

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
            // D is named by vfio-pci.ids: an interrupted move is settled by
            // the same decision as a release, so what reached vfio stays there
            // (never rolled back to nvidia against the admin's intent).
            None | Some(OpState::Prebound) if gpu == D => {
                assert_kept_or_back(&host, &before, functions, &ctx)
            }
            None | Some(OpState::Prebound | OpState::ReleasedUnbound) => {
                assert_invariants(&host, &before, functions, &ctx)
            }
            other => panic!("{ctx}: ledger left in {other:?}"),
        }
        assert_fixed_point(&e, &host, &ctx);
        // The same crash, then reconcile crashing at each of its own steps.
        if !matches!(
            ledger.gpus.get(&bdf(gpu)).map(|r| r.state),
            Some(OpState::Configured)
        ) {
            let replay = |host: &std::path::Path, state: &std::path::Path| {
                build_host(host);
                let k = sim(host);
                let e = engine_with(
                    &k,
                    state,
                    EngineConfig {
                        crash_after_step: Some(n),
                        ..config()
                    },
                );
                let _ = e.configure(bdf(gpu), claim());
                k
            };
            RECONCILE_STEPS.fetch_add(
                sweep_reconcile_crash(&replay, &|_| before.clone(), functions, &ctx),
                std::sync::atomic::Ordering::SeqCst,
            );
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
        assert_fixed_point(&e, &host, &ctx);
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
    let in_reconcile = RECONCILE_STEPS.load(std::sync::atomic::Ordering::SeqCst);
    println!("crash points swept: {total}, crash points inside reconcile: {in_reconcile}");
    assert!(
        in_reconcile >= 10,
        "only {in_reconcile} crash points inside reconcile"
    );
    assert!(
        total >= 30,
        "only {total} crash points: the sweep is not reaching the steps"
    );
}

/// nvidia-smi as the sweep needs it: `-pm 0` makes nvidia-persistenced close
/// the GPU, `-pm 1` makes it open it again; every call is counted.
struct Smi {
    host: std::path::PathBuf,
    calls: std::sync::Mutex<Vec<String>>,
}

impl vfio_gpu_engine::commands::HostCommands for Smi {
    fn run(&self, _: &vfio_gpu_host::HostRoot, _: &str, args: &[&str]) -> Result<String, String> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(args.join(" "));
        let fd = self.host.join("proc/99/fd/4");
        if args.ends_with(&["-pm", "0"]) {
            let _ = std::fs::remove_file(&fd);
        } else if args.ends_with(&["-pm", "1"]) && !fd.exists() {
            let _ = std::os::unix::fs::symlink(self.host.join("dev/nvidia3"), &fd);
        }
        Ok(String::new())
    }
    fn exists(&self, _: &vfio_gpu_host::HostRoot, program: &str) -> bool {
        program == "nvidia-smi"
    }
}

/// GPU B with nvidia's unbind lock and nvidia-persistenced holding it.
fn persistence_host(host: &std::path::Path) {
    let h = build_host(host);
    h.write("proc/driver/nvidia/gpus/0000:66:00.0/unbindLock", "0\n")
        .unwrap();
    add_nvidia_minor(&h, B, 3);
    add_persistenced_process(host, 99, 3);
}

fn open_with_smi(
    k: &vfio_gpu_engine::sim::SimKernel,
    state: &std::path::Path,
    smi: std::sync::Arc<Smi>,
    crash_after_step: Option<u64>,
) -> vfio_gpu_engine::Engine {
    vfio_gpu_engine::Engine::open_with_commands(
        std::sync::Arc::new(k.clone()),
        smi,
        state,
        vfio_gpu_host::GpuSelector::default(),
        vfio_gpu_intent::Policy::default(),
        EngineConfig {
            crash_after_step,
            ..config()
        },
    )
    .unwrap()
    .0
}

/// The persistence-mode and unbind-lock steps (review M9): a crash after
/// any step of configure or unconfigure of a GPU with both leaves, after
/// reconcile, B on nvidia with persistence back on (its daemon holding it
/// again) or fully configured, and a second reconcile changes nothing.
#[test]
fn crash_sweep_covers_persistence_and_unbind_lock_steps() {
    let mut swept = 0;
    for release in [false, true] {
        let mut n = 1;
        loop {
            let dir = tempfile::tempdir().unwrap();
            let host = dir.path().join("host");
            persistence_host(&host);
            let before = snapshot(&host);
            let k = sim(&host);
            let state = dir.path().join("state");
            let smi = std::sync::Arc::new(Smi {
                host: host.clone(),
                calls: Default::default(),
            });
            if release {
                open_with_smi(&k, &state, smi.clone(), None)
                    .configure(bdf(B), claim())
                    .unwrap();
            }
            let e = open_with_smi(&k, &state, smi.clone(), Some(n));
            let r = if release {
                e.unconfigure(bdf(B), Some(&claim()))
            } else {
                e.configure(bdf(B), claim())
            };
            drop(e);
            match r {
                Err(EngineError::SimulatedCrash(_)) => {}
                Ok(_) => break,
                Err(other) => panic!("release={release}: failed at crash point {n}: {other}"),
            }
            let e = open_with_smi(&k, &state, smi.clone(), None);
            for r in e.reconcile().unwrap() {
                assert!(r.is_ok(), "release={release}, crash {n}: {r:?}");
            }
            let ctx = format!("release={release}, crash after step {n}");
            let configured = e
                .ledger()
                .gpus
                .get(&bdf(B))
                .is_some_and(|r| r.state == OpState::Configured);
            if configured {
                assert_eq!(driver_of(&host, B).as_deref(), Some("vfio-pci"), "{ctx}");
            } else {
                assert_invariants(&host, &before, &[B], &ctx);
                assert!(
                    host.join("proc/99/fd/4").exists(),
                    "{ctx}: persistence mode back on (daemon holds the GPU again): {:?}",
                    smi.calls.lock().unwrap()
                );
            }
            assert_fixed_point(&e, &host, &ctx);
            swept += 1;
            n += 1;
        }
    }
    println!("persistence/unbind-lock crash points swept: {swept}");
    assert!(swept >= 8, "only {swept} crash points");
}
