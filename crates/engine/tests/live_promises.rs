#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! The promises a long-running engine keeps (review findings C1–C3, M1, M2,
//! M7, M9): intent read afresh, recorded origins never rewritten from drift,
//! disk before memory, rollback on every error, stuck devices left alone,
//! reconcile at a fixed point.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vfio_gpu_engine::kernel::{Kernel, SysfsWrite, WriteKind};
use vfio_gpu_engine::ledger::OpState;
use vfio_gpu_engine::sim::{BlockHandle, Fault, FaultAction};
use vfio_gpu_engine::{Action, Engine, EngineConfig, EngineError};
use vfio_gpu_host::{DriverName, GpuSelector};
use vfio_gpu_intent::Policy;

/// A process (a VM) holding `/dev/vfio/<group>`, as the holder scan sees it.
fn vm_holds_group(host: &Path, pid: u32, group: u32) {
    let node = host.join(format!("dev/vfio/{group}"));
    assert!(node.exists(), "group node {group} exists");
    fs::create_dir_all(host.join(format!("proc/{pid}/fd"))).unwrap();
    fs::write(host.join(format!("proc/{pid}/comm")), "qemu-kvm\n").unwrap();
    symlink(&node, host.join(format!("proc/{pid}/fd/20"))).unwrap();
}

fn open_with_policy_file(
    k: &vfio_gpu_engine::sim::SimKernel,
    state: &Path,
    policy: &Path,
) -> Engine {
    Engine::open(
        Arc::new(k.clone()),
        state,
        GpuSelector::default(),
        Policy::default(),
        EngineConfig {
            policy_file: Some(policy.to_path_buf()),
            ..config()
        },
    )
    .unwrap()
    .0
}

// ------------------------------------------------------------------ C1

/// Review finding C1.
#[test]
fn driverctl_written_while_prepared_keeps_the_gpu_on_vfio() {
    let (_dir, host, _k, e) = world();
    e.configure(bdf(B), claim("u1")).unwrap();
    fs::create_dir_all(host.join("etc/driverctl.d")).unwrap();
    fs::write(host.join("etc/driverctl.d/pci-0000:66:00.0"), "vfio-pci\n").unwrap();
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::LeftOnVfio, "{}", out.detail);
    assert!(out.detail.contains("driverctl"), "{}", out.detail);
    assert_eq!(driver_of(&host, B).as_deref(), Some("vfio-pci"));
}

/// Review finding C1.
#[test]
fn modprobe_ids_added_while_prepared_keep_the_gpu_on_vfio() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    // vfio-pci as a module, so modprobe.d applies; the command line names nothing.
    fs::write(host.join("proc/cmdline"), "root=/dev/sda1 intel_iommu=on\n").unwrap();
    let k = sim(&host);
    let e = engine(&k, &dir.path().join("state"));
    e.configure(bdf(B), claim("u1")).unwrap();
    fs::create_dir_all(host.join("etc/modprobe.d")).unwrap();
    fs::write(
        host.join("etc/modprobe.d/vfio.conf"),
        "options vfio-pci ids=10de:20b2\n",
    )
    .unwrap();
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::LeftOnVfio, "{}", out.detail);
    assert_eq!(driver_of(&host, B).as_deref(), Some("vfio-pci"));
}

/// Review finding C1.
#[test]
fn policy_file_changed_while_prepared_is_honoured_and_a_broken_one_counts_as_owned() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let policy = dir.path().join("policy.toml");
    let k = sim(&host);
    let e = open_with_policy_file(&k, &dir.path().join("state"), &policy);
    e.configure(bdf(B), claim("u1")).unwrap();
    fs::write(
        &policy,
        "[keep-on-vfio]\npci-bus-ids = [\"0000:66:00.0\"]\n",
    )
    .unwrap();
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::LeftOnVfio, "{}", out.detail);
    assert!(out.detail.contains("policy"), "{}", out.detail);

    // A policy mid-edit (does not parse): unknown intent keeps A on vfio.
    e.configure(bdf(A), claim("u2")).unwrap();
    fs::write(&policy, "[keep-on-vfio\n").unwrap();
    let out = e.unconfigure(bdf(A), Some(&claim("u2"))).unwrap();
    assert_eq!(out.action, Action::LeftOnVfio, "{}", out.detail);
    assert_eq!(driver_of(&host, A).as_deref(), Some("vfio-pci"));
}

/// Review finding C1.
#[test]
fn what_inspect_says_is_what_release_does() {
    let (_dir, host, _k, _state, e) = world_and_state();
    e.configure(bdf(B), claim("u1")).unwrap();
    fs::create_dir_all(host.join("etc/driverctl.d")).unwrap();
    fs::write(host.join("etc/driverctl.d/pci-0000:66:00.0"), "vfio-pci\n").unwrap();
    let (views, _) = e.discover().unwrap();
    let view = views.iter().find(|v| v.gpu.bdf() == bdf(B)).unwrap();
    assert!(view.verdict.keep_on_vfio, "discover sees the new intent");
    let out = e.unconfigure(bdf(B), None).unwrap();
    assert_eq!(out.action == Action::LeftOnVfio, view.verdict.keep_on_vfio);
}

// ------------------------------------------------------------------ C2

/// Review finding C2.
#[test]
fn reprepare_after_drift_keeps_the_recorded_origins() {
    let (_dir, host, k, e) = world();
    for (g, uid) in [(A, "ua"), (B, "ub")] {
        e.configure(bdf(g), claim(uid)).unwrap();
        // Someone unbinds fn0 from vfio-pci while the claim holds it.
        k.write(&SysfsWrite::Unbind {
            bdf: bdf(g),
            driver: DriverName::vfio_pci(),
        })
        .unwrap();
        let out = e.configure(bdf(g), claim(uid)).unwrap();
        assert_eq!(
            driver_of(&host, g).as_deref(),
            Some("vfio-pci"),
            "{}",
            out.detail
        );
        let rec = e.ledger().gpus[&bdf(g)].clone();
        assert_eq!(
            rec.functions[0]
                .original_driver
                .as_ref()
                .map(|d| d.as_str()),
            Some("nvidia"),
            "the original driver survives a re-prepare"
        );
        assert_eq!(rec.functions[0].original_override, None);
        e.unconfigure(bdf(g), Some(&claim(uid))).unwrap();
    }
    e.reconcile().unwrap();
    e.reconcile().unwrap();
    assert_eq!(state_of(&host, B), (Some("nvidia".into()), None));
    assert_eq!(state_of(&host, A), (Some("nvidia".into()), None));
    assert_eq!(
        state_of(&host, A_AUDIO),
        (Some("snd_hda_intel".into()), None)
    );
    let ledger = e.ledger();
    assert!(
        !ledger.gpus.contains_key(&bdf(A)) && !ledger.gpus.contains_key(&bdf(B)),
        "{:?}",
        ledger.gpus
    );
}

/// Review finding n14: the drifted function comes back to vfio-pci *during*
/// the re-prepare (between reading the record and reading the group): the
/// already-on-vfio branch must carry the record, not rebuild it as "found on
/// vfio", or the origins are lost and the release keeps the GPU on vfio. The
/// race is opened by blocking the intent read that sits between the two.
#[test]
fn a_function_back_on_vfio_mid_reprepare_keeps_the_recorded_origins() {
    use vfio_gpu_engine::sim::{BlockHandle, FaultAction};
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    let e = std::sync::Arc::new(engine(&k, &dir.path().join("state")));
    e.configure(bdf(B), claim("ub")).unwrap();
    k.write(&SysfsWrite::Unbind {
        bdf: bdf(B),
        driver: DriverName::vfio_pci(),
    })
    .unwrap();
    let gate = BlockHandle::new();
    k.fault_reads_under("proc/cmdline", FaultAction::Block(gate.clone()));
    let e2 = std::sync::Arc::clone(&e);
    let reprepare = std::thread::spawn(move || e2.configure(bdf(B), claim("ub")));
    while !gate.is_holding() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // The function returns to vfio-pci while the re-prepare reads intent.
    k.write(&SysfsWrite::Bind {
        bdf: bdf(B),
        driver: DriverName::vfio_pci(),
    })
    .unwrap();
    k.clear_read_faults();
    gate.release();
    let out = reprepare.join().unwrap().unwrap();
    assert_eq!(out.action, Action::AlreadyOnVfio, "{}", out.detail);
    let rec = e.ledger().gpus[&bdf(B)].clone();
    assert_eq!(
        rec.functions[0]
            .original_driver
            .as_ref()
            .map(|d| d.as_str()),
        Some("nvidia"),
        "the carried record keeps the origin"
    );
    let out = e.unconfigure(bdf(B), Some(&claim("ub"))).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
}

// ------------------------------------------------------------------ C3

/// Review finding C3.
#[test]
fn a_failed_final_commit_changes_nothing_in_memory_and_rollback_spares_a_held_group() {
    let (_dir, host, k, state, e) = world_and_state();
    let gate = BlockHandle::new();
    k.inject(Fault::on(
        WriteKind::Bind,
        bdf(B),
        FaultAction::Block(gate.clone()),
    ));
    let t = {
        let e = Arc::new(e);
        let e2 = Arc::clone(&e);
        (
            std::thread::spawn(move || e2.configure(bdf(B), claim("u1"))),
            e,
        )
    };
    std::thread::sleep(Duration::from_millis(300));
    // The disk fills up: the final commit cannot be written.
    fs::create_dir(state.join(".ledger.json.tmp")).unwrap();
    gate.release();
    let (h, e) = t;
    let first = h.join().unwrap();
    assert!(
        first.is_err(),
        "the prepare cannot succeed without its record"
    );
    let mem = e.ledger().gpus.get(&bdf(B)).map(|r| r.state);
    let disk = vfio_gpu_engine::ledger::decode(&fs::read(state.join("ledger.json")).unwrap())
        .unwrap()
        .gpus
        .get(&bdf(B))
        .map(|r| r.state);
    assert_eq!(mem, disk, "memory follows disk");
    // A retry does not claim success it never recorded.
    let retry = e.configure(bdf(B), claim("u1"));
    assert!(
        !matches!(&retry, Ok(o) if o.action == Action::AlreadyConfigured),
        "{retry:?}"
    );
    fs::remove_dir(state.join(".ledger.json.tmp")).unwrap();
    drop(e);

    // Whatever is recorded, a group a VM holds is never unbound by reconcile.
    let e = engine(&k, &state);
    e.configure(bdf(B), claim("u1")).unwrap();
    vm_holds_group(&host, 4242, 12);
    let mut body = e.ledger();
    body.gpus.get_mut(&bdf(B)).unwrap().state = OpState::Configuring;
    drop(e);
    vfio_gpu_engine::ledger::LedgerFile::new(&state)
        .unwrap()
        .store(&body)
        .unwrap();
    let before = k.log().len();
    let e = engine(&k, &state);
    let results = e.reconcile().unwrap();
    assert_eq!(
        driver_of(&host, B).as_deref(),
        Some("vfio-pci"),
        "{results:?}"
    );
    let writes = k.log()[before..].to_vec();
    assert!(
        !writes.iter().any(|w| w.bdf() == bdf(B)),
        "no write touches the held GPU: {writes:?}"
    );
}

// ------------------------------------------------------------------ M7

/// Review finding M7.
#[test]
fn a_refused_unbind_lock_rolls_back_everything() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let h = build_host(&host);
    // The unbind lock file exists but the driver never grants it (reads back 0).
    h.write("proc/driver/nvidia/gpus/0000:66:00.0/unbindLock", "0\n")
        .unwrap();
    let k = sim(&host);
    let lock = host.join("proc/driver/nvidia/gpus/0000:66:00.0/unbindLock");
    fs::remove_file(&lock).unwrap();
    symlink("/dev/null", &lock).unwrap();
    let e = engine(&k, &dir.path().join("state"));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(err.to_string().contains("unbind lock"), "{err}");
    assert!(
        !e.ledger().gpus.contains_key(&bdf(B)),
        "no record left behind"
    );
    assert_eq!(state_of(&host, B), (Some("nvidia".into()), None));
    // Another claim can have it now.
    assert!(!matches!(
        e.configure(bdf(B), claim("u2")),
        Err(EngineError::HeldByOther { .. })
    ));
}

// ------------------------------------------------------------------ M2

/// Review finding M2.
#[test]
fn rollback_after_a_stuck_unbind_never_touches_the_stuck_device_again() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let h = build_host(&host);
    h.write("proc/driver/nvidia/gpus/0000:66:00.0/unbindLock", "0\n")
        .unwrap();
    let k = sim(&host);
    let gate = BlockHandle::new();
    k.inject(Fault::on(
        WriteKind::Unbind,
        bdf(B),
        FaultAction::Block(gate.clone()),
    ));
    let e = engine_with(
        &k,
        &dir.path().join("state"),
        EngineConfig {
            unbind_deadline: Duration::from_millis(300),
            ..config()
        },
    );
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(matches!(err, EngineError::Stuck { .. }), "{err}");
    let log = k.log();
    let unbind_at = log
        .iter()
        .position(|w| *w == write::unbind(B, "nvidia"))
        .expect("unbind was attempted");
    assert!(
        log[unbind_at + 1..].iter().all(|w| w.bdf() != bdf(B)),
        "nothing written to the stuck device after its unbind: {log:?}"
    );
    // Still stuck: every further operation refuses it at once.
    let started = Instant::now();
    assert!(matches!(
        e.configure(bdf(B), claim("u2")),
        Err(EngineError::Stuck { .. })
    ));
    assert!(started.elapsed() < Duration::from_millis(250));
    gate.release();
}

// ------------------------------------------------------------------ M1

/// Review finding M1.
#[test]
fn a_read_that_blocks_on_one_gpu_does_not_stall_discovery_or_other_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    let e = Arc::new(engine_with(
        &k,
        &dir.path().join("state"),
        EngineConfig {
            read_deadline: Duration::from_millis(300),
            ..config()
        },
    ));
    // Reads of B's driver_override block, as on a kernel whose device_lock is held.
    let fifo = host.join("sys/bus/pci/devices/0000:66:00.0/driver_override");
    let real = fs::canonicalize(&fifo).unwrap();
    fs::remove_file(&real).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(&real)
        .status()
        .unwrap();
    assert!(status.success());
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let e = Arc::clone(&e);
        std::thread::spawn(move || {
            let views = e.discover().map(|(v, _)| v.len());
            let a = e.configure_many(&[(bdf(A), claim("ua")), (bdf(B), claim("ub"))]);
            let _ = tx.send((views, a.iter().map(|r| r.is_ok()).collect::<Vec<_>>()));
        });
    }
    let (views, batch) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("discovery and the batch return despite the blocked read");
    assert!(views.is_ok());
    assert_eq!(
        batch,
        vec![true, false],
        "A moves, B reports its stuck read"
    );
    assert_eq!(driver_of(&host, A).as_deref(), Some("vfio-pci"));
    // Unblock the reader thread so the process can exit cleanly.
    let _ = fs::OpenOptions::new().write(true).open(&real).map(|mut f| {
        use std::io::Write;
        f.write_all(b"\n")
    });
}

// ------------------------------------------------------------------ M9 / R3

/// Review finding M9.
#[test]
fn rollback_of_a_driverless_gpu_leaves_a_tombstone_so_reconcile_is_a_fixed_point() {
    // Steps of configure(F): write-ahead commit, override, bind; a crash
    // after any of them is rolled back by reconcile.
    for step in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        build_host(&host);
        let k = sim(&host);
        let state = dir.path().join("state");
        let e = engine_with(
            &k,
            &state,
            EngineConfig {
                crash_after_step: Some(step),
                ..config()
            },
        );
        let _ = e.configure(bdf(F), claim("u1"));
        drop(e);
        let e = engine(&k, &state);
        e.reconcile().unwrap();
        let first = (
            state_of(&host, F),
            e.ledger().gpus.get(&bdf(F)).map(|r| r.state),
        );
        e.reconcile().unwrap();
        let second = (
            state_of(&host, F),
            e.ledger().gpus.get(&bdf(F)).map(|r| r.state),
        );
        assert_eq!(
            first, second,
            "crash after step {step}: a second reconcile changes nothing"
        );
        assert_eq!(
            first.0,
            (None, None),
            "F had no driver and goes back to none"
        );
    }
}

// ------------------------------------------------------------------ M3

/// An `nvidia-smi` that hangs, as it does on a wedged GPU.
struct HangingSmi;

impl vfio_gpu_engine::commands::HostCommands for HangingSmi {
    fn run(&self, _: &vfio_gpu_host::HostRoot, _: &str, _: &[&str]) -> Result<String, String> {
        std::thread::sleep(Duration::from_secs(3));
        Ok(String::new())
    }
    fn exists(&self, _: &vfio_gpu_host::HostRoot, program: &str) -> bool {
        program == "nvidia-smi"
    }
}

/// Review finding M3.
#[test]
fn a_hanging_nvidia_smi_is_cut_off_by_its_deadline_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let h = build_host(&host);
    add_nvidia_minor(&h, B, 3);
    add_persistenced_process(&host, 99, 3);
    let k = sim(&host);
    let e = Engine::open_with_commands(
        Arc::new(k.clone()),
        Arc::new(HangingSmi),
        &dir.path().join("state"),
        GpuSelector::default(),
        Policy::default(),
        EngineConfig {
            command_deadline: Duration::from_millis(300),
            ..config()
        },
    )
    .unwrap()
    .0;
    let started = Instant::now();
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered within the deadline, not after nvidia-smi: {err}"
    );
    assert_eq!(state_of(&host, B), (Some("nvidia".into()), None));
    assert!(k.log().is_empty(), "no sysfs write: {:?}", k.log());
}

// ------------------------------------------------------------------ m16

/// Review finding m16.
#[test]
fn a_gpu_that_vanished_is_released_and_forgotten_not_an_error_forever() {
    let (_dir, host, _k, e) = world();
    e.configure(bdf(B), claim("u1")).unwrap();
    e.configure(bdf(A), claim("u2")).unwrap();
    // Hot-unplug: the devices disappear from the bus.
    fs::remove_file(host.join("sys/bus/pci/devices/0000:66:00.0")).unwrap();
    fs::remove_file(host.join("sys/bus/pci/devices/0000:65:00.0")).unwrap();
    fs::remove_file(host.join("sys/bus/pci/devices/0000:65:00.1")).unwrap();
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::NothingToDo, "{}", out.detail);
    assert!(!e.ledger().gpus.contains_key(&bdf(B)));
    let results = e.reconcile().unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert!(!e.ledger().gpus.contains_key(&bdf(A)));
}

// ------------------------------------------------------------------ m1, m2 (open)

#[test]
fn open_names_the_lock_holder_and_refuses_a_host_without_boot_id() {
    let (dir, host, k, state, _first) = world_and_state();
    let second = Engine::open(
        Arc::new(k.clone()),
        &state,
        GpuSelector::default(),
        Policy::default(),
        EngineConfig {
            state_lock_wait: Duration::from_millis(50),
            ..config()
        },
    );
    let err = second.err().expect("the state directory is taken");
    assert!(matches!(err, EngineError::StateLocked(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{err}"
    );

    let other = dir.path().join("state2");
    fs::remove_file(host.join("proc/sys/kernel/random/boot_id")).unwrap();
    let err = Engine::open(
        Arc::new(k.clone()),
        &other,
        GpuSelector::default(),
        Policy::default(),
        config(),
    )
    .err()
    .expect("no boot id: refuse");
    assert!(err.to_string().contains("no boot id"), "{err}");
}

// ------------------------------------------------------------------ m8 (engine side)

#[test]
fn discovery_reports_host_processes_holding_a_gpu_but_not_a_lone_persistenced() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    let h = build_host(&host);
    add_nvidia_minor(&h, B, 3);
    h.write("usr/bin/nvidia-smi", "#!/bin/sh\n").unwrap();
    add_persistenced_process(&host, 99, 3);
    let k = sim(&host);
    let e = engine(&k, &dir.path().join("state"));
    let holders_of_b = |e: &Engine| {
        let (views, _) = e.discover().unwrap();
        views
            .into_iter()
            .find(|v| v.gpu.bdf() == bdf(B))
            .unwrap()
            .holders
    };
    assert!(
        holders_of_b(&e).is_empty(),
        "persistence mode can be turned off"
    );
    fs::create_dir_all(host.join("proc/98/fd")).unwrap();
    fs::write(host.join("proc/98/comm"), "python3\n").unwrap();
    symlink(host.join("dev/nvidia3"), host.join("proc/98/fd/7")).unwrap();
    let mut pids: Vec<u32> = holders_of_b(&e).iter().map(|h| h.pid).collect();
    pids.sort();
    assert_eq!(pids, [98, 99]);
}

// ------------------------------------------------------------------ m10

#[test]
fn an_iommufd_only_kernel_without_group_nodes_still_moves_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    k.set_vfio_nodes(vfio_gpu_engine::sim::VfioNodes {
        group: false,
        cdev: true,
    });
    let e = engine(&k, &dir.path().join("state"));
    let out = e.configure(bdf(B), claim("u1")).unwrap();
    assert_eq!(out.action, Action::Moved, "{}", out.detail);
    assert!(!host.join("dev/vfio/12").exists());
    assert_eq!(out.vfio_devices.len(), 1);
    // Neither node: the move cannot serve a VM and is rolled back.
    k.set_vfio_nodes(vfio_gpu_engine::sim::VfioNodes {
        group: false,
        cdev: false,
    });
    let err = e.configure(bdf(A), claim("u2")).unwrap_err();
    assert!(err.to_string().contains("/dev/vfio/11"), "{err}");
    assert_eq!(driver_of(&host, A).as_deref(), Some("nvidia"));
    assert_eq!(driver_of(&host, A_AUDIO).as_deref(), Some("snd_hda_intel"));
}

// ------------------------------------------------------------------ M3 (budget)

/// Review finding M3.
#[test]
fn a_prepare_that_spent_its_budget_starts_no_further_step_and_rolls_back() {
    // Per-write deadlines added up with nothing bounding their sum, so a prepare
    // could outlive the kubelet's 45 s call. The operation now has a budget,
    // checked before each forward step; past it the move is rolled back.
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    let gate = BlockHandle::new();
    k.inject(Fault::on(
        WriteKind::DriverOverride,
        bdf(B),
        FaultAction::Block(gate.clone()),
    ));
    let e = engine_with(
        &k,
        &dir.path().join("state"),
        EngineConfig {
            operation_budget: Duration::from_millis(300),
            write_deadline: Duration::from_secs(60),
            ..config()
        },
    );
    let err = std::thread::scope(|s| {
        let configure = s.spawn(|| e.configure(bdf(B), claim("u1")));
        std::thread::sleep(Duration::from_millis(600));
        gate.release();
        configure.join().unwrap().unwrap_err()
    });
    assert!(matches!(err, EngineError::RolledBack { .. }), "{err}");
    assert!(err.to_string().contains("budget"), "{err}");
    let log = k.log();
    assert!(
        !log.iter()
            .any(|w| matches!(w, SysfsWrite::Unbind { bdf: b, .. } if *b == bdf(B))),
        "no step after the budget: {log:?}"
    );
    assert_eq!(state_of(&host, B), (Some("nvidia".into()), None));
    assert!(!e.ledger().gpus.contains_key(&bdf(B)));
}

/// Review finding M3.
#[test]
fn a_bind_to_the_host_driver_gets_the_bind_deadline_not_the_short_write_deadline() {
    // A bind runs the driver's probe (nvidia with NVLink training: 30 s+);
    // under the 5 s write deadline such a GPU was declared stuck mid-probe.
    let (_dir, host, k, e) = world_with(EngineConfig {
        write_deadline: Duration::from_millis(200),
        bind_deadline: Duration::from_secs(60),
        ..config()
    });
    e.configure(bdf(B), claim("u1")).unwrap();
    let gate = BlockHandle::new();
    k.inject(Fault {
        driver: Some("nvidia".into()),
        ..Fault::on(WriteKind::Bind, bdf(B), FaultAction::Block(gate.clone()))
    });
    let out = std::thread::scope(|s| {
        let release = s.spawn(|| e.unconfigure(bdf(B), Some(&claim("u1"))));
        std::thread::sleep(Duration::from_millis(800));
        gate.release();
        release.join().unwrap()
    });
    let out = out.unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
}
