#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! Every engine read of the host goes through the kernel edge with a
//! deadline, so the simulated kernel can block or fail any of them: nvidia's
//! procfs (review n5), the `/proc` holder scan, `/dev/vfio`, the driver
//! directories. A read that blocks quarantines only its device; a read that
//! fails (EMFILE, ENOMEM) stops a move before its first host write.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vfio_gpu_engine::sim::{BlockHandle, FaultAction, SimKernel};
use vfio_gpu_engine::{Action, Engine, EngineConfig, EngineError};

const EMFILE: i32 = 24;

fn quick() -> EngineConfig {
    EngineConfig {
        read_deadline: Duration::from_millis(200),
        command_deadline: Duration::from_millis(200),
        ..config()
    }
}

/// The common host under a simulated kernel and an engine with short deadlines.
fn quick_world() -> (tempfile::TempDir, std::path::PathBuf, SimKernel, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let k = sim(&root);
    let e = engine_with(&k, &dir.path().join("state"), quick());
    (dir, root, k, e)
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
    let (_dir, _root, k, e) = quick_world();
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

/// The admin's intent sources are read under a deadline too: a policy file
/// on a hung mount makes a prepare fail and a release keep the GPU on vfio,
/// never guess "restore". (A FIFO in its place is not read at all: not a
/// regular file, so a configuration problem, which keeps.)
#[test]
fn intent_that_cannot_be_read_in_time_never_restores() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let h = build_host(&root);
    h.write("etc/vfio-gpu-dra/policy.toml", "").unwrap();
    let k = sim(&root);
    let policy = root.join("etc/vfio-gpu-dra/policy.toml");
    let e = engine_with(
        &k,
        &dir.path().join("state"),
        EngineConfig {
            policy_file: Some(policy.clone()),
            ..quick()
        },
    );
    e.configure(bdf(B), claim("u1")).unwrap();
    let gate = BlockHandle::new();
    k.fault_reads_under("etc/vfio-gpu-dra", FaultAction::Block(gate.clone()));
    let err = e.configure(bdf(A), claim("u2")).unwrap_err();
    assert!(matches!(err, EngineError::IntentUnreadable(_)), "{err}");
    let out = e.unconfigure(bdf(B), Some(&claim("u1")));
    assert_eq!(driver_of(&root, B).as_deref(), Some("vfio-pci"), "{out:?}");
    assert!(
        matches!(out, Err(EngineError::IntentUnreadable(_))),
        "never recorded as admin-owned: {out:?}"
    );
    // The mount answers again, and intent reads again.
    k.clear_faults();
    gate.release();
    std::thread::sleep(Duration::from_millis(50));
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
}

/// A FIFO where the policy file should be is never opened (it would block
/// forever): a configuration problem, which keeps the GPU on vfio.
#[test]
fn a_fifo_in_place_of_the_policy_file_is_a_problem_not_a_hang() {
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
    let t = Instant::now();
    let out = e.unconfigure(bdf(B), Some(&claim("u1")));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(driver_of(&root, B).as_deref(), Some("vfio-pci"), "{out:?}");
    std::fs::remove_file(&policy).unwrap();
    e.reconcile().unwrap();
    assert_eq!(driver_of(&root, B).as_deref(), Some("nvidia"));
}

/// Every source of admin intent is read through the kernel edge (item 3 of
/// the core-promise issue): an EIO on any of them is seen by the engine,
/// which then never sends the GPU back to its host driver. Before the intent
/// crate read through the host root, these reads bypassed the simulated
/// kernel and B went back to nvidia.
#[test]
fn an_unreadable_intent_source_keeps_a_released_gpu_on_vfio() {
    const EIO: i32 = 5;
    for source in [
        "proc/cmdline",
        "etc/modprobe.d",
        "etc/driverctl.d",
        "etc/vfio-gpu-dra",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("host");
        let h = build_host(&root);
        h.write(
            "etc/modprobe.d/local.conf",
            "options snd_hda_intel index=0\n",
        )
        .unwrap();
        h.write("etc/driverctl.d/.keep", "").unwrap();
        let policy = root.join("etc/vfio-gpu-dra/policy.toml");
        h.write("etc/vfio-gpu-dra/policy.toml", "").unwrap();
        let k = sim(&root);
        let e = engine_with(
            &k,
            &dir.path().join("state"),
            EngineConfig {
                policy_file: Some(policy),
                ..quick()
            },
        );
        e.configure(bdf(B), claim("u1")).unwrap();
        k.fault_reads_under(source, FaultAction::Fail(EIO));
        let out = e.unconfigure(bdf(B), Some(&claim("u1")));
        assert_eq!(
            driver_of(&root, B).as_deref(),
            Some("vfio-pci"),
            "{source} unreadable: {out:?}"
        );
        assert!(
            !k.log().iter().any(|w| matches!(
                w,
                vfio_gpu_engine::kernel::SysfsWrite::Bind { driver, .. } if driver.as_str() == "nvidia"
            )),
            "{source}: {:?}",
            k.log()
        );
        // Readable again: the GPU goes home.
        k.clear_faults();
        e.reconcile().unwrap();
        assert_eq!(
            driver_of(&root, B).as_deref(),
            Some("nvidia"),
            "{source} readable again"
        );
    }
}

/// A driverctl directory on a hung mount blocks its listing: the intent read
/// gives up at the command deadline and the release keeps the GPU on vfio.
#[test]
fn a_blocked_intent_directory_listing_times_out_and_keeps_the_gpu_on_vfio() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let h = build_host(&root);
    h.write("etc/driverctl.d/.keep", "").unwrap();
    let k = sim(&root);
    let e = engine_with(&k, &dir.path().join("state"), quick());
    e.configure(bdf(B), claim("u1")).unwrap();
    let gate = BlockHandle::new();
    k.fault_reads_under("etc/driverctl.d", FaultAction::Block(gate.clone()));
    let t = Instant::now();
    let out = e.unconfigure(bdf(B), Some(&claim("u1")));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        matches!(out, Err(EngineError::IntentUnreadable(_))),
        "{out:?}"
    );
    assert_eq!(driver_of(&root, B).as_deref(), Some("vfio-pci"));
    gate.release();
}

/// The listing of `sys/bus/pci/devices` on a hung sysfs: discovery answers
/// at the command deadline instead of hanging, and works again once the
/// listing returns.
#[test]
fn a_blocked_pci_tree_listing_times_out_instead_of_hanging_discovery() {
    let (_dir, _root, k, e) = quick_world();
    let gate = BlockHandle::new();
    k.fault_reads_under("sys/bus/pci/devices", FaultAction::Block(gate.clone()));
    let t = Instant::now();
    let err = e.discover().unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(err.to_string().contains("PCI tree"), "{err}");
    k.clear_faults();
    gate.release();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match e.discover() {
            Ok((views, _)) => {
                assert!(views.iter().any(|v| v.gpu.bdf() == bdf(B)));
                break;
            }
            Err(err) if Instant::now() < deadline => {
                let _ = err;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => panic!("discovery never recovered: {err}"),
        }
    }
}

/// What a prepare and a release read, seen from the simulated kernel: the
/// intent files, the module index and the PCI tree all pass the edge.
#[test]
fn intent_files_module_indexes_and_listings_pass_the_kernel_edge() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    let h = build_host(&root);
    h.write("proc/sys/kernel/osrelease", "6.12.0\n").unwrap();
    h.write(
        "lib/modules/6.12.0/modules.alias",
        "alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia\n",
    )
    .unwrap();
    h.write("etc/modprobe.d/local.conf", "options nvidia NVreg_X=1\n")
        .unwrap();
    let k = sim(&root);
    let e = engine_with(&k, &dir.path().join("state"), quick());
    k.record_reads();
    e.discover().unwrap();
    e.configure(bdf(B), claim("u1")).unwrap();
    e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    let reads = k.reads();
    for wanted in [
        "proc/cmdline",
        "etc/modprobe.d/local.conf",
        "lib/modules/6.12.0/modules.alias",
        "sys/bus/pci/devices",
        "sys/kernel/iommu_groups",
    ] {
        assert!(
            reads.iter().any(|p| p == std::path::Path::new(wanted)),
            "{wanted} not read through the edge; read: {reads:?}"
        );
    }
}
