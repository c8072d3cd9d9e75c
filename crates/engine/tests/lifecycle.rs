#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! configure / unconfigure / rollback / deadlines / concurrency on the simulated kernel.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vfio_gpu_engine::kernel::WriteKind;
use vfio_gpu_engine::sim::{BlockHandle, Fault, FaultAction, errno};
use vfio_gpu_engine::{Action, ClaimHeld, EngineConfig, EngineError, Holder, Step, Verification};

#[test]
fn moves_gpu_with_companion_and_returns_both() {
    let (_dir, host, k, e) = world();

    let out = e.configure(bdf(A), claim("u1")).unwrap();
    assert_eq!(out.action, Action::Moved);
    assert_eq!(driver_of(&host, A).as_deref(), Some("vfio-pci"));
    assert_eq!(driver_of(&host, A_AUDIO).as_deref(), Some("vfio-pci"));
    assert!(host.join("dev/vfio/11").exists(), "group node created");
    assert_eq!(out.vfio_devices.len(), 2);
    // Override first, then unbind, then bind: no auto-probe window.
    let log = k.log();
    assert_eq!(
        log[..3],
        [
            write::driver_override(A, Some("vfio-pci")),
            write::unbind(A, "nvidia"),
            write::bind(A, "vfio-pci"),
        ]
    );
    let rec = e.ledger().gpus[&bdf(A)].clone();
    assert_eq!(rec.functions.len(), 2);
    assert_eq!(
        rec.functions[1].original_driver.as_ref().unwrap().as_str(),
        "snd_hda_intel"
    );

    let out = e.unconfigure(bdf(A), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
    assert_eq!(state_of(&host, A), (Some("nvidia".into()), None));
    assert_eq!(
        state_of(&host, A_AUDIO),
        (Some("snd_hda_intel".into()), None)
    );
    assert!(!host.join("dev/vfio/11").exists(), "group node gone");
    assert!(e.ledger().gpus.is_empty());
}

#[test]
fn prebound_gpu_is_a_recorded_noop_and_stays_on_vfio() {
    let (_dir, host, k, e) = world();
    let out = e.configure(bdf(C), claim("u1")).unwrap();
    assert_eq!(out.action, Action::AlreadyOnVfio);
    assert!(k.log().is_empty(), "no host writes: {:?}", k.log());
    assert!(e.ledger().gpus[&bdf(C)].was_on_vfio);
    let out = e.unconfigure(bdf(C), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::LeftOnVfio);
    assert!(out.detail.contains("kernel-cmdline"), "{}", out.detail);
    // Admin-owned and kept on vfio: only the reset between tenants is written.
    assert_eq!(k.log(), vec![write::reset(C)]);
    assert!(out.detail.contains("reset and verified"), "{}", out.detail);
    assert_eq!(driver_of(&host, C).as_deref(), Some("vfio-pci"));
}

#[test]
fn cmdline_named_gpu_on_nvidia_stays_on_vfio_after_release_upstream_1099() {
    let (dir, host, k, e) = world();
    assert_eq!(
        e.configure(bdf(D), claim("u1")).unwrap().action,
        Action::Moved
    );
    let out = e.unconfigure(bdf(D), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::LeftOnVfio);
    assert_eq!(driver_of(&host, D).as_deref(), Some("vfio-pci"));
    // Survives a restart: a new engine on the same state still keeps it.
    drop(e);
    let e = engine(&k, &dir.path().join("state"));
    let out = e.unconfigure(bdf(D), None).unwrap();
    assert_eq!(out.action, Action::LeftOnVfio);
}

#[test]
fn failed_bind_rolls_back_every_function() {
    let (_dir, host, k, e) = world();
    k.inject(Fault::on(
        WriteKind::Bind,
        bdf(A_AUDIO),
        FaultAction::Fail(errno::EBUSY),
    ));
    let err = e.configure(bdf(A), claim("u1")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EngineError::RolledBack { .. }), "{text}");
    // The kernel's error survives as the error's source, not only as text.
    let source = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(|e| e.kind());
    assert_eq!(source, Some(std::io::ErrorKind::ResourceBusy), "{text}");
    assert!(text.contains("bind 0000:65:00.1 to vfio-pci"), "{text}");
    assert!(text.contains("0000:65:00.0 on nvidia"), "{text}");
    assert!(text.contains("0000:65:00.1 on snd_hda_intel"), "{text}");
    assert_eq!(state_of(&host, A), (Some("nvidia".into()), None));
    assert_eq!(
        state_of(&host, A_AUDIO),
        (Some("snd_hda_intel".into()), None)
    );
    assert!(e.ledger().gpus.is_empty());
}

#[test]
fn probe_that_binds_nothing_is_caught_by_verification() {
    let (_dir, host, k, e) = world();
    // The kernel "accepts" the bind write but nothing binds.
    k.inject(Fault::on(
        WriteKind::Bind,
        bdf(B),
        FaultAction::ProbeBindsNothing,
    ));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    let EngineError::RolledBack { step, .. } = &err else {
        panic!("{err}")
    };
    let vfio = vfio_gpu_host::DriverName::new("vfio-pci").unwrap();
    assert_eq!(
        *step,
        Step::Verify(Verification::BoundTo {
            bdf: bdf(B),
            driver: vfio
        })
    );
    // People read the step as they always did.
    assert!(
        err.to_string()
            .starts_with("verify 0000:66:00.0 on vfio-pci failed: driver is none"),
        "{err}"
    );
    assert_eq!(state_of(&host, B), (Some("nvidia".into()), None));
}

#[test]
fn restore_failure_keeps_gpu_on_vfio_never_driverless() {
    let (_dir, host, k, e) = world();
    e.configure(bdf(B), claim("u1")).unwrap();
    k.inject(Fault::on(WriteKind::Bind, bdf(B), FaultAction::Fail(5)));
    let err = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap_err();
    let EngineError::RestoreFailed { step, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*step, Step::Write(write::bind(B, "nvidia")), "{err}");
    assert_eq!(driver_of(&host, B).as_deref(), Some("vfio-pci"));
    // The record stays: reconcile retries later.
    let rec = e.ledger().gpus[&bdf(B)].clone();
    assert_eq!(rec.state, vfio_gpu_engine::ledger::OpState::Releasing);
    let results = e.reconcile().unwrap();
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Ok(o) if o.bdf == bdf(B) && o.action == Action::FinishedRelease))
    );
    assert_eq!(state_of(&host, B), (Some("nvidia".into()), None));
}

#[test]
fn foreign_group_member_is_refused_and_nothing_changes() {
    let (_dir, _host, k, e) = world();
    let err = e.configure(bdf(E), claim("u1")).unwrap_err();
    assert!(
        matches!(err, EngineError::ForeignGroupMembers { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("0000:69:01.0"), "{err}");
    assert!(k.log().is_empty());
    assert!(e.ledger().gpus.is_empty());
}

#[test]
fn pinned_vfs_and_unknown_devices_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let h = build_host(&host);
    h.write("etc/driverctl.d/pci-0000:66:00.0", "nvidia\n")
        .unwrap();
    let k = sim(&host);
    let e = engine(&k, &dir.path().join("state"));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(matches!(err, EngineError::Pinned { .. }), "{err}");
    let err = e.configure(bdf("0000:70:00.0"), claim("u1")).unwrap_err();
    assert!(matches!(err, EngineError::UnknownGpu(_)), "{err}");
    // VFs enabled on D.
    std::fs::write(h.device_dir(bdf(D)).unwrap().join("sriov_numvfs"), "2\n").unwrap();
    let err = e.configure(bdf(D), claim("u1")).unwrap_err();
    assert!(
        matches!(err, EngineError::VfsEnabled { count: 2, .. }),
        "{err}"
    );
    assert!(k.log().is_empty());
}

#[test]
fn process_holding_the_gpu_blocks_the_move() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let h = build_host(&host);
    h.write(
        "proc/driver/nvidia/gpus/0000:66:00.0/information",
        "Model: A100\nDevice Minor: \t 3\n",
    )
    .unwrap();
    h.write("dev/nvidia3", "").unwrap();
    h.write("proc/4242/comm", "dcgm-exporter\n").unwrap();
    std::fs::create_dir_all(host.join("proc/4242/fd")).unwrap();
    std::os::unix::fs::symlink(host.join("dev/nvidia3"), host.join("proc/4242/fd/7")).unwrap();
    let k = sim(&host);
    let e = engine(&k, &dir.path().join("state"));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(
        err.to_string()
            .contains("dcgm-exporter (pid 4242) holds /dev/nvidia3"),
        "{err}"
    );
    assert!(k.log().is_empty());
    std::fs::remove_file(host.join("proc/4242/fd/7")).unwrap();
    assert_eq!(
        e.configure(bdf(B), claim("u1")).unwrap().action,
        Action::Moved
    );
}

#[test]
fn vm_still_attached_blocks_release() {
    let (_dir, host, _k, e) = world();
    e.configure(bdf(B), claim("u1")).unwrap();
    std::fs::create_dir_all(host.join("proc/777/fd")).unwrap();
    std::fs::write(host.join("proc/777/comm"), "qemu-kvm\n").unwrap();
    std::os::unix::fs::symlink(host.join("dev/vfio/12"), host.join("proc/777/fd/30")).unwrap();
    let err = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap_err();
    assert!(
        err.to_string()
            .contains("qemu-kvm (pid 777) holds /dev/vfio/12"),
        "{err}"
    );
    assert_eq!(driver_of(&host, B).as_deref(), Some("vfio-pci"));
}

#[test]
fn nvidia_unbind_lock_is_taken_and_dies_with_the_unbound_instance() {
    // nvidia's unbind lock is a flag of the bound instance: the unbind removes it
    // with /proc/driver/nvidia/gpus/<BDF>, and a re-probe starts unlocked. Writing 0
    // to the new instance on release could only drop a lock somebody else took
    // there (review m19).
    let (dir, host, k) = host_with_b_unbind_lock();
    let e = engine(&k, &dir.path().join("state"));
    e.configure(bdf(B), claim("u1")).unwrap();
    assert_eq!(k.log()[0], write::unbind_lock(B, true), "{:?}", k.log());
    assert!(e.ledger().gpus[&bdf(B)].changes.unbind_lock_taken);
    e.unconfigure(bdf(B), None).unwrap();
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
    assert!(
        !k.log().contains(&write::unbind_lock(B, false)),
        "{:?}",
        k.log()
    );
    let v = std::fs::read_to_string(host.join(B_UNBIND_LOCK)).unwrap();
    assert_eq!(v.trim(), "0");
}

#[test]
fn a_lock_on_a_function_never_unbound_is_released_by_rollback() {
    // The move fails after the lock is taken and before the unbind: the GPU is
    // still on the instance we locked, so rollback must unlock it or nobody
    // (nvidia-smi, CUDA) can open it again.
    let (dir, host, k) = host_with_b_unbind_lock();
    k.inject(Fault::on(
        WriteKind::DriverOverride,
        bdf(B),
        FaultAction::Fail(5),
    ));
    let e = engine(&k, &dir.path().join("state"));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(matches!(err, EngineError::RolledBack { .. }), "{err}");
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
    let log = k.log();
    let taken = log.iter().position(|w| *w == write::unbind_lock(B, true));
    let released = log.iter().position(|w| *w == write::unbind_lock(B, false));
    assert!(
        matches!((taken, released), (Some(t), Some(r)) if t < r),
        "{log:?}"
    );
    let v = std::fs::read_to_string(host.join(B_UNBIND_LOCK)).unwrap();
    assert_eq!(v.trim(), "0");
}

#[test]
fn a_rollback_after_the_unbind_writes_nothing_to_the_re_probed_instance() {
    // The unbind went through and the vfio bind failed: the locked instance is
    // gone, and the one rollback re-probes is not ours to unlock.
    let (dir, host, k) = host_with_b_unbind_lock();
    k.inject(Fault {
        driver: Some("vfio-pci".into()),
        ..Fault::on(WriteKind::Bind, bdf(B), FaultAction::Fail(5))
    });
    let e = engine(&k, &dir.path().join("state"));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(matches!(err, EngineError::RolledBack { .. }), "{err}");
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
    let log = k.log();
    let unbound = log
        .iter()
        .position(|w| *w == write::unbind(B, "nvidia"))
        .expect("unbind happened");
    assert!(
        !log[unbound..].contains(&write::unbind_lock(B, false)),
        "{log:?}"
    );
}

#[test]
fn stuck_unbind_times_out_without_delaying_other_gpus() {
    let (_dir, host, k, e) = world_with(EngineConfig {
        unbind_deadline: Duration::from_millis(300),
        ..config()
    });
    let gate = BlockHandle::new();
    k.inject(Fault::on(
        WriteKind::Unbind,
        bdf(B),
        FaultAction::Block(gate.clone()),
    ));
    let start = Instant::now();
    let results = e.configure_many(&[(bdf(B), claim("u1")), (bdf(A), claim("u2"))]);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "returned in {took:?}");
    let err = results[0].as_ref().unwrap_err();
    assert!(matches!(err, EngineError::Stuck { .. }), "{err}");
    assert_eq!(results[1].as_ref().unwrap().action, Action::Moved);
    // Not touched again while stuck.
    let again = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(matches!(again, EngineError::Stuck { .. }), "{again}");
    assert!(e.ledger().gpus[&bdf(B)].stuck_on.is_some());
    // The write returns; reconcile rolls the interrupted move back.
    gate.release();
    std::thread::sleep(Duration::from_millis(100));
    let res = e.reconcile().unwrap();
    assert!(
        res.iter()
            .any(|r| matches!(r, Ok(o) if o.bdf == bdf(B) && o.action == Action::RolledBack)),
        "{res:?}"
    );
    assert_eq!(state_of(&host, B), (Some("nvidia".into()), None));
}

#[test]
fn same_group_is_serialised_and_second_holder_refused() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    k.set_latency(WriteKind::Unbind, "nvidia", Duration::from_millis(100));
    let e = engine(&k, &dir.path().join("state"));
    let results = e.configure_many(&[(bdf(B), claim("u1")), (bdf(B), claim("u2"))]);
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let held = results
        .iter()
        .filter(|r| matches!(r, Err(EngineError::HeldByOther { .. })))
        .count();
    assert_eq!((ok, held), (1, 1), "{results:?}");
    // Idempotent for the winner.
    let winner = e.ledger().gpus[&bdf(B)].holder.clone().unwrap();
    assert_eq!(
        e.configure(bdf(B), winner).unwrap().action,
        Action::AlreadyConfigured
    );
}

#[test]
fn different_groups_run_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    k.set_latency(WriteKind::Unbind, "nvidia", Duration::from_millis(300));
    let e = engine(&k, &dir.path().join("state"));
    let start = Instant::now();
    let results = e.configure_many(&[
        (bdf(A), claim("u1")),
        (bdf(B), claim("u2")),
        (bdf(D), claim("u3")),
    ]);
    let took = start.elapsed();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    // Serially this would be ≥ 900 ms.
    assert!(took < Duration::from_millis(800), "took {took:?}");
}

#[test]
fn reconcile_records_gpus_found_on_vfio_and_leaves_driverless_ones_as_found() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let h = build_host(&host);
    // B lost its driver (someone unbound it by hand).
    h.unlink_driver(bdf(B)).unwrap();
    let k = sim(&host);
    let e = engine(&k, &dir.path().join("state"));
    let res = e.reconcile().unwrap();
    let find = |b: &str| {
        res.iter()
            .find_map(|r| r.as_ref().ok().filter(|o| o.bdf == bdf(b)).cloned())
            .unwrap()
    };
    assert_eq!(find(C).action, Action::RecordedPrebound);
    // Neither B (unbound by hand) nor F (never had a driver) is ours to
    // repair: no probe that could bind nvidia behind the admin's back (n15).
    for b in [B, F] {
        assert_eq!(find(b).action, Action::Noted, "{}", find(b).detail);
        assert_eq!(driver_of(&host, b), None);
    }
    assert_eq!(k.log(), [], "no host write");
    assert_eq!(
        e.ledger().gpus[&bdf(C)].state,
        vfio_gpu_engine::ledger::OpState::Prebound
    );
}

/// Stands in for the host's nvidia-smi: `-pm 0` makes nvidia-persistenced
/// close the GPU (removes its fd), as the real daemon does.
struct FakeNvidiaSmi {
    host: std::path::PathBuf,
    calls: std::sync::Mutex<Vec<String>>,
    fail: std::sync::atomic::AtomicBool,
}

impl vfio_gpu_engine::commands::HostCommands for FakeNvidiaSmi {
    fn run(
        &self,
        _root: &vfio_gpu_host::HostRoot,
        program: &str,
        args: &[&str],
    ) -> Result<String, String> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{program} {}", args.join(" ")));
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("Unable to set persistence mode".into());
        }
        if args.ends_with(&["-pm", "0"]) {
            let _ = std::fs::remove_file(self.host.join("proc/99/fd/4"));
        }
        Ok(String::new())
    }
}

fn persistenced_host(dir: &std::path::Path) -> std::path::PathBuf {
    let host = dir.join("host");
    let h = build_host(&host);
    h.write(
        "proc/driver/nvidia/gpus/0000:66:00.0/information",
        "Device Minor: 3\n",
    )
    .unwrap();
    h.write("dev/nvidia3", "").unwrap();
    h.write("usr/bin/nvidia-smi", "#!/bin/sh\n").unwrap();
    // As the kernel shows it: comm truncated to "nvidia-persiste".
    add_persistenced_process(&host, 99, 3);
    host
}

/// The persistenced host, its kernel, a stand-in nvidia-smi (failing when
/// `fail`) and an engine using it.
fn persistenced_engine(
    fail: bool,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    vfio_gpu_engine::sim::SimKernel,
    std::sync::Arc<FakeNvidiaSmi>,
    vfio_gpu_engine::Engine,
) {
    let dir = tempfile::tempdir().unwrap();
    let host = persistenced_host(dir.path());
    let k = sim(&host);
    let smi = std::sync::Arc::new(FakeNvidiaSmi {
        host: host.clone(),
        calls: Default::default(),
        fail: fail.into(),
    });
    let e = engine_with_commands(&k, &dir.path().join("state"), smi.clone());
    (dir, host, k, smi, e)
}

#[test]
fn persistence_mode_is_turned_off_for_the_move_and_back_on_at_release() {
    let (_dir, host, _k, smi, e) = persistenced_engine(false);
    assert_eq!(
        e.configure(bdf(B), claim("u1")).unwrap().action,
        Action::Moved
    );
    assert_eq!(
        e.ledger().gpus[&bdf(B)].changes.persistence_disabled,
        vec![bdf(B)]
    );
    e.unconfigure(bdf(B), None).unwrap();
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
    assert_eq!(
        *smi.calls.lock().unwrap(),
        [
            "nvidia-smi -i 0000:66:00.0 -pm 0",
            "nvidia-smi -i 0000:66:00.0 -pm 1"
        ]
    );
}

#[test]
fn persistence_left_off_at_release_is_reported_kept_and_retried_by_reconcile() {
    // Review m14: when `-pm 1` failed at release the record was dropped and the
    // failure only logged, so the GPU stayed without persistence mode for good.
    let (dir, host, k, smi, e) = persistenced_engine(false);
    e.configure(bdf(B), claim("u1")).unwrap();
    smi.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let released = e.unconfigure(bdf(B), None).unwrap();
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
    assert!(
        released.detail.contains("persistence mode is still off")
            && released.detail.contains("Unable to set persistence mode"),
        "{}",
        released.detail
    );
    let pending = &e.ledger().persistence_to_restore;
    assert_eq!(pending.keys().copied().collect::<Vec<_>>(), vec![bdf(B)]);
    // `explain` and the metrics see it on the GPU's view.
    let (views, _) = e.discover().unwrap();
    let view = views.iter().find(|v| v.gpu.bdf() == bdf(B)).unwrap();
    assert!(
        view.persistence_left_off
            .as_ref()
            .is_some_and(|p| p.error.contains("Unable to set persistence mode"))
    );
    // Survives a restart.
    drop(e);
    let e = engine_with_commands(&k, &dir.path().join("state"), smi.clone());
    assert!(e.ledger().persistence_to_restore.contains_key(&bdf(B)));
    // Still failing: kept, with the newest error.
    e.reconcile().unwrap();
    assert!(e.ledger().persistence_to_restore.contains_key(&bdf(B)));
    smi.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    smi.calls.lock().unwrap().clear();
    e.reconcile().unwrap();
    assert!(e.ledger().persistence_to_restore.is_empty());
    assert_eq!(
        *smi.calls.lock().unwrap(),
        ["nvidia-smi -i 0000:66:00.0 -pm 1"]
    );
    // Nothing left to do: the next reconcile runs nothing.
    e.reconcile().unwrap();
    assert_eq!(smi.calls.lock().unwrap().len(), 1);
}

#[test]
fn persistence_failure_or_other_holders_change_nothing() {
    let (_dir, host, k, smi, e) = persistenced_engine(true);
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(matches!(err, EngineError::Persistence { .. }), "{err}");
    assert!(k.log().is_empty(), "no sysfs writes: {:?}", k.log());
    assert!(e.ledger().gpus.is_empty());
    // Another client besides the daemon: refused before anything runs.
    std::fs::create_dir_all(host.join("proc/98/fd")).unwrap();
    std::fs::write(host.join("proc/98/comm"), "cuda-app\n").unwrap();
    std::os::unix::fs::symlink(host.join("dev/nvidia3"), host.join("proc/98/fd/9")).unwrap();
    smi.calls.lock().unwrap().clear();
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(err.to_string().contains("cuda-app (pid 98)"), "{err}");
    assert!(smi.calls.lock().unwrap().is_empty());
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
}

#[test]
fn reconcile_works_on_gpus_side_by_side_so_one_slow_gpu_does_not_hold_the_others() {
    // Review m17: reconcile ran GPUs one after another, so at start a node with
    // one GPU whose bind hangs waited out that deadline before looking at the
    // next. Both A and B have an interrupted release (nvidia refused the
    // bind); at reconcile B's bind blocks, and A must be restored while B is
    // still blocked.
    let (_dir, host, k, e) = world_with(EngineConfig {
        write_deadline: Duration::from_secs(60),
        bind_deadline: Duration::from_secs(60),
        ..config()
    });
    let nvidia_bind = |b: &str, action: FaultAction| Fault {
        driver: Some("nvidia".into()),
        ..Fault::on(WriteKind::Bind, bdf(b), action)
    };
    for (gpu, uid) in [(A, "u1"), (B, "u2")] {
        e.configure(bdf(gpu), claim(uid)).unwrap();
        k.inject(nvidia_bind(gpu, FaultAction::Fail(5)));
        assert!(e.unconfigure(bdf(gpu), Some(&claim(uid))).is_err());
        assert_eq!(driver_of(&host, gpu).as_deref(), Some("vfio-pci"), "parked");
    }
    k.clear_faults();
    let gate = BlockHandle::new();
    k.inject(nvidia_bind(B, FaultAction::Block(gate.clone())));
    std::thread::scope(|s| {
        let reconcile = s.spawn(|| e.reconcile());
        let waited = Instant::now();
        let mut a_restored = false;
        while waited.elapsed() < Duration::from_secs(20) {
            if driver_of(&host, A).as_deref() == Some("nvidia") {
                a_restored = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        gate.release();
        let results = reconcile.join().unwrap().unwrap();
        assert!(a_restored, "A waited for B: {:?}", k.log());
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    });
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
}

#[test]
fn a_slow_ledger_write_does_not_hold_up_readers() {
    // Review m18: commits wrote and fsynced the ledger under the mutex every
    // reader takes, so while one GPU's commit waited on the disk, verdicts,
    // discovery and the slice publisher of every other GPU waited too.
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    let gate = BlockHandle::new();
    let e = engine_with(
        &k,
        &dir.path().join("state"),
        EngineConfig {
            ledger_write_gate: Some(gate.clone()),
            ..config()
        },
    );
    std::thread::scope(|s| {
        let configure = s.spawn(|| e.configure(bdf(B), claim("u1")));
        let waited = Instant::now();
        while !gate.is_holding() {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "no ledger write"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The configure is now waiting in its write-ahead commit.
        let (tx, rx) = std::sync::mpsc::channel();
        let e = &e;
        s.spawn(move || {
            let ledger = e.ledger();
            let seen = e.discover().map(|(views, _)| views.len());
            let _ = tx.send((ledger.gpus.len(), seen));
        });
        let read = rx.recv_timeout(Duration::from_secs(10));
        gate.release();
        let (records, views) = read.expect("readers waited for the ledger write");
        assert_eq!(records, 0, "the write in flight is not visible yet");
        assert!(views.is_ok_and(|n| n > 0));
        assert_eq!(configure.join().unwrap().unwrap().action, Action::Moved);
    });
}

/// Security review L2: a process in a container (another mount namespace
/// than pid 1's) whose binary is named nvidia-persistenced is not the host's
/// daemon: it is a holder like any other, and nothing runs nvidia-smi.
#[test]
fn a_containerised_process_named_nvidia_persistenced_is_a_holder() {
    let (_dir, host, k, smi, e) = persistenced_engine(false);
    let ns = |pid: u32, id: &str| {
        let d = host.join(format!("proc/{pid}/ns"));
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(format!("mnt:[{id}]"), d.join("mnt")).unwrap();
    };
    ns(1, "4026531841");
    ns(99, "4026532999");
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(
        matches!(err, vfio_gpu_engine::EngineError::Busy { .. }),
        "{err}"
    );
    assert!(smi.calls.lock().unwrap().is_empty());
    assert!(k.log().is_empty());
    // The same process in the host's namespace is the daemon again.
    std::fs::remove_file(host.join("proc/99/ns/mnt")).unwrap();
    ns(99, "4026531841");
    assert_eq!(
        e.configure(bdf(B), claim("u1")).unwrap().action,
        Action::Moved
    );
}

/// Security review L3: a GPU the admin keeps on vfio is not handed to a
/// claim while a process (a VM outside Kubernetes) holds its group.
#[test]
fn a_gpu_already_on_vfio_held_by_a_process_is_not_handed_out() {
    let (_dir, host, _k, e) = world();
    // C is on vfio-pci at boot; a qemu process holds its group node.
    let group = std::fs::read_link(host.join(format!("sys/bus/pci/devices/{C}/iommu_group")))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let node = host.join(format!("dev/vfio/{group}"));
    if !node.exists() {
        std::fs::create_dir_all(node.parent().unwrap()).unwrap();
        std::fs::write(&node, "").unwrap();
    }
    let p = host.join("proc/4321");
    std::fs::create_dir_all(p.join("fd")).unwrap();
    std::fs::write(p.join("comm"), "qemu-system-x86\n").unwrap();
    std::os::unix::fs::symlink(&node, p.join("fd/9")).unwrap();
    let err = e.configure(bdf(C), claim("u1")).unwrap_err();
    assert!(
        matches!(err, vfio_gpu_engine::EngineError::Busy { .. }),
        "{err}"
    );
    std::fs::remove_dir_all(&p).unwrap();
    assert_eq!(
        e.configure(bdf(C), claim("u1")).unwrap().action,
        Action::AlreadyOnVfio
    );
}

/// The admin release guard lives in the engine: a GPU a claim holds is
/// refused for the whole request before any write, and released only when
/// the admin forces it.
#[test]
fn an_admin_release_of_a_claim_held_gpu_is_refused_before_any_write() {
    let (_dir, host, k, e) = world();
    e.configure(bdf(A), claim("u1")).unwrap();
    e.configure(bdf(B), Holder::Admin).unwrap();
    let before = k.log().len();

    let err = e
        .release_for_admin(&[bdf(B), bdf(A)], ClaimHeld::Refuse)
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::HeldByClaim { bdf: b, holder } if *b == bdf(A) && *holder == claim("u1")),
        "{err}"
    );
    assert_eq!(k.log()[before..], [], "nothing written, B included");
    assert_eq!(driver_of(&host, B).as_deref(), Some("vfio-pci"));

    let results = e
        .release_for_admin(&[bdf(B), bdf(A)], ClaimHeld::Release)
        .unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(driver_of(&host, A).as_deref(), Some("nvidia"));
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
}
