#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! Between tenants: a released GPU is reset and verified before it is
//! offered again; a GPU whose reset, verification or scrub hook fails is
//! quarantined (kept from every tenant) until an administrator's reset
//! clears it; every hand-over leaves an audit record; a crash at any step
//! is finished by reconcile.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use vfio_gpu_engine::ledger::QuarantineCause;
use vfio_gpu_engine::sim::{Fault, FaultAction, ResetEffect, SimKernel};
use vfio_gpu_engine::{Action, Engine, EngineConfig, EngineError, Holder};
use vfio_gpu_host::{GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;

fn claim(uid: &str) -> Holder {
    Holder::Claim {
        uid: uid.into(),
        namespace: "vms".into(),
        name: format!("vm-{uid}"),
    }
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, SimKernel, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    let e = engine(&k, &dir.path().join("state"));
    (dir, host, k, e)
}

/// A process (a VM) holding `/dev/vfio/<group>`, as the holder scan sees it.
fn vm_holds_group(host: &std::path::Path, pid: u32, group: u32) {
    let node = host.join(format!("dev/vfio/{group}"));
    assert!(
        std::fs::symlink_metadata(&node).is_ok(),
        "group node {group} exists"
    );
    std::fs::create_dir_all(host.join(format!("proc/{pid}/fd"))).unwrap();
    std::fs::write(host.join(format!("proc/{pid}/comm")), "qemu-kvm\n").unwrap();
    std::os::unix::fs::symlink(&node, host.join(format!("proc/{pid}/fd/20"))).unwrap();
}

fn position(
    log: &[vfio_gpu_engine::kernel::SysfsWrite],
    want: &vfio_gpu_engine::kernel::SysfsWrite,
) -> usize {
    log.iter()
        .position(|l| l == want)
        .unwrap_or_else(|| panic!("{want} not in {log:?}"))
}

#[test]
fn a_release_resets_every_function_on_vfio_before_returning_it_and_records_the_handover() {
    let (_d, host, k, e) = setup();
    e.configure(bdf(A), claim("u1")).unwrap();
    let start = k.log().len();
    let out = e.unconfigure(bdf(A), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
    let log = k.log()[start..].to_vec();
    // Both functions reset, while still on vfio, before the first unbind.
    let first_unbind = position(&log, &write::unbind(A, "vfio-pci"));
    assert!(position(&log, &write::reset(A)) < first_unbind, "{log:?}");
    assert!(
        position(&log, &write::reset(A_AUDIO)) < first_unbind,
        "{log:?}"
    );
    assert_eq!((k.resets(bdf(A)), k.resets(bdf(A_AUDIO))), (1, 1));
    assert_eq!(driver_of(&host, A).as_deref(), Some("nvidia"));
    let ledger = e.ledger();
    assert!(ledger.gpus.is_empty() && ledger.quarantined.is_empty());
    let audit = &ledger.handovers[..];
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0].gpu, bdf(A));
    assert!(audit[0].released_by.contains("vms/vm-u1"), "{audit:?}");
    assert_eq!(audit[0].verification, "clean");
    assert!(
        audit[0].reset_method.contains("reset attribute"),
        "{audit:?}"
    );
    assert!(audit[0].finished_at >= audit[0].released_at);
    // The next tenant gets it.
    e.configure(bdf(A), claim("u2")).unwrap();
}

#[test]
fn a_failed_reset_quarantines_the_gpu_on_vfio_until_the_admin_resets_it() {
    let (_d, host, k, e) = setup();
    e.configure(bdf(A), claim("u1")).unwrap();
    fail_reset_of_a(&k);
    let out = e.unconfigure(bdf(A), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Quarantined, "{}", out.detail);
    // Nothing went back to a host driver: a GPU that failed its reset stays on vfio.
    assert_eq!(driver_of(&host, A).as_deref(), Some("vfio-pci"));
    assert_eq!(driver_of(&host, A_AUDIO).as_deref(), Some("vfio-pci"));
    let q = e.ledger().quarantined[&bdf(A)].clone();
    assert!(q.reason.contains("reset of 0000:65:00.0"), "{q:?}");
    assert_eq!(q.cause, QuarantineCause::ResetFailed, "{q:?}");
    assert!(e.ledger().handovers[0].verification.starts_with("failed"));
    // No tenant gets it; reconcile leaves it alone (twice: it writes nothing).
    let refused = e.configure(bdf(A), claim("u2")).unwrap_err();
    assert!(
        matches!(refused, EngineError::Quarantined { .. }),
        "{refused}"
    );
    let before = k.log().len();
    for _ in 0..2 {
        for r in e.reconcile().unwrap() {
            assert!(r.is_ok(), "{r:?}");
        }
    }
    let touched: Vec<_> = k.log()[before..]
        .iter()
        .filter(|w| w.to_string().contains("0000:65:00"))
        .cloned()
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
    let view = e.discover().unwrap().0;
    assert!(
        view.iter()
            .any(|v| v.gpu.bdf() == bdf(A) && v.quarantine.is_some())
    );
    // The admin's reset works this time: out of quarantine, and reconcile
    // returns it to its host driver.
    let cleared = e.reset_gpu(bdf(A)).unwrap();
    assert_eq!(cleared.action, Action::Reset, "{}", cleared.detail);
    assert!(e.ledger().quarantined.is_empty());
    for r in e.reconcile().unwrap() {
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(driver_of(&host, A).as_deref(), Some("nvidia"));
    assert!(!e.ledger().gpus.contains_key(&bdf(A)));
    e.configure(bdf(A), claim("u2")).unwrap();
}

/// A prepare whose move never finished (its vfio bind failed, and so did the
/// way back) gave the GPU to nobody: its claim's release owes no reset, and
/// the GPU goes back to its host driver (model counterexample, session 11:
/// the owed reset failed and the release reported it "kept on vfio" while it
/// had no driver).
#[test]
fn a_release_after_a_prepare_that_never_finished_owes_no_reset() {
    let (_d, host, k, e) = setup();
    let fail = |driver: &str| Fault {
        kind: Some(vfio_gpu_engine::kernel::WriteKind::Bind),
        bdf: Some(bdf(A)),
        driver: Some(driver.into()),
        nth: 0,
        action: FaultAction::Fail(5),
    };
    for driver in ["vfio-pci", "vfio-pci", "nvidia"] {
        k.inject(fail(driver));
    }
    e.configure(bdf(A), claim("u1")).unwrap_err();
    assert_eq!(driver_of(&host, A), None, "left driverless by the faults");
    // Were a reset owed, this one would fail and quarantine the GPU.
    fail_reset_of_a(&k);
    let out = e.unconfigure(bdf(A), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
    assert_eq!(k.resets(bdf(A)), 0);
    assert_eq!(driver_of(&host, A).as_deref(), Some("nvidia"));
    let ledger = e.ledger();
    assert!(
        ledger.gpus.is_empty() && ledger.quarantined.is_empty(),
        "{ledger:?}"
    );
    assert!(ledger.handovers.is_empty(), "{:?}", ledger.handovers);
}

/// A tenant's GPU whose re-drive back to vfio fails (its audio function was
/// moved off meanwhile, and vfio-pci refuses it) is rolled back to its host
/// drivers: it leaves the tenant, so it is reset first, as a release would.
#[test]
fn a_tenants_gpu_rolled_back_after_a_failed_redrive_is_reset_first() {
    let (_d, host, k, e) = setup();
    e.configure(bdf(A), claim("u1")).unwrap();
    admin_moves_audio_home(&k);
    fail_audio_once(&k, vfio_gpu_engine::kernel::WriteKind::Bind, "vfio-pci");
    let start = k.log().len();
    e.configure(bdf(A), claim("u1")).unwrap_err();
    let log = k.log()[start..].to_vec();
    assert_eq!(driver_of(&host, A).as_deref(), Some("nvidia"), "{log:?}");
    let back = position(&log, &write::unbind(A, "vfio-pci"));
    assert!(position(&log, &write::reset(A)) < back, "{log:?}");
    let audit = &e.ledger().handovers;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(audit[0].released_by.contains("vms/vm-u1"), "{audit:?}");
}

/// The same failed re-drive with a reset that fails too: the GPU is
/// quarantined where it is (its GPU function on vfio), and reconcile leaves
/// no unfinished record behind.
#[test]
fn a_failed_reset_after_a_failed_redrive_quarantines_and_settles() {
    let (_d, host, k, e) = setup();
    e.configure(bdf(A), claim("u1")).unwrap();
    admin_moves_audio_home(&k);
    fail_audio_once(&k, vfio_gpu_engine::kernel::WriteKind::Bind, "vfio-pci");
    fail_reset_of_a(&k);
    e.configure(bdf(A), claim("u1")).unwrap_err();
    // Quarantined on vfio, the audio function the failed bind left driverless
    // parked there too; never sent to a host driver unreset.
    let q = e.ledger().quarantined[&bdf(A)].clone();
    assert_eq!(q.cause, QuarantineCause::ResetFailed, "{q:?}");
    for f in [A, A_AUDIO] {
        assert_eq!(driver_of(&host, f).as_deref(), Some("vfio-pci"), "{f}");
    }
    let rec = e.ledger().gpus[&bdf(A)].clone();
    assert_eq!(
        rec.state,
        vfio_gpu_engine::ledger::OpState::Prebound,
        "{rec:?}"
    );
    assert_eq!(rec.holder, None);
    quarantine_holds_until_the_admin_resets(&k, &e);
    assert_eq!(driver_of(&host, A).as_deref(), Some("nvidia"));
    assert_eq!(driver_of(&host, A_AUDIO).as_deref(), Some("snd_hda_intel"));
}

/// A quarantined A: reconcile (twice) leaves it, writing nothing; the
/// admin's reset clears it and the next reconcile sends it home.
fn quarantine_holds_until_the_admin_resets(k: &SimKernel, e: &Engine) {
    let before = k.log().len();
    for _ in 0..2 {
        for r in e.reconcile().unwrap() {
            assert!(r.is_ok(), "{r:?}");
        }
    }
    assert_eq!(k.log().len(), before, "{:?}", &k.log()[before..]);
    assert_eq!(e.reset_gpu(bdf(A)).unwrap().action, Action::Reset);
    for r in e.reconcile().unwrap() {
        assert!(r.is_ok(), "{r:?}");
    }
}

/// The next `kind` write of A's audio function to `driver` fails with EIO.
fn fail_audio_once(k: &SimKernel, kind: vfio_gpu_engine::kernel::WriteKind, driver: &str) {
    k.inject(Fault {
        kind: Some(kind),
        bdf: Some(bdf(A_AUDIO)),
        driver: Some(driver.into()),
        nth: 0,
        action: FaultAction::Fail(5),
    });
}

/// The next reset of A fails with EIO.
fn fail_reset_of_a(k: &SimKernel) {
    k.inject(Fault::on(
        vfio_gpu_engine::kernel::WriteKind::Reset,
        bdf(A),
        FaultAction::Fail(5),
    ));
}

/// The admin moves the audio function of A (held by u1) back to its host driver.
fn admin_moves_audio_home(k: &SimKernel) {
    use vfio_gpu_engine::kernel::Kernel;
    k.write(&write::unbind(A_AUDIO, "vfio-pci")).unwrap();
    k.write(&vfio_gpu_engine::kernel::SysfsWrite::DriverOverride {
        bdf: bdf(A_AUDIO),
        driver: None,
    })
    .unwrap();
    k.write(&write::bind(A_AUDIO, "snd_hda_intel")).unwrap();
}

/// A failed re-drive whose unbind of the audio function from its host driver
/// fails (after our override was written), then a failed reset: quarantined
/// with the GPU function on vfio and the audio function on its host driver
/// without our override, which would otherwise read as the admin's later.
#[test]
fn a_quarantine_after_a_failed_redrive_leaves_no_override_of_ours_behind() {
    let (_d, host, k, e) = setup();
    e.configure(bdf(A), claim("u1")).unwrap();
    admin_moves_audio_home(&k);
    fail_audio_once(
        &k,
        vfio_gpu_engine::kernel::WriteKind::Unbind,
        "snd_hda_intel",
    );
    fail_reset_of_a(&k);
    e.configure(bdf(A), claim("u1")).unwrap_err();
    assert!(e.ledger().quarantined.contains_key(&bdf(A)));
    assert_eq!(state_of(&host, A).0.as_deref(), Some("vfio-pci"));
    assert_eq!(
        state_of(&host, A_AUDIO),
        (Some("snd_hda_intel".into()), None)
    );
    quarantine_holds_until_the_admin_resets(&k, &e);
    // Home, nothing of ours left.
    assert_eq!(state_of(&host, A), (Some("nvidia".into()), None));
    assert_eq!(
        state_of(&host, A_AUDIO),
        (Some("snd_hda_intel".into()), None)
    );
    assert!(!e.ledger().gpus.contains_key(&bdf(A)));
}

/// A tenant's re-drive interrupted by a crash at every step, then the same
/// claim's prepare on a restarted engine whose owed reset fails while
/// finishing that record first: the GPU it quarantined goes to nobody, its
/// holder included.
#[test]
fn a_gpu_quarantined_while_a_prepare_finishes_a_crashed_redrive_is_refused() {
    let mut refused = 0;
    for n in 1..40 {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        build_host(&host);
        let k = sim(&host);
        let state = dir.path().join("state");
        engine(&k, &state).configure(bdf(A), claim("u1")).unwrap();
        admin_moves_audio_home(&k);
        let crashed = engine_with(
            &k,
            &state,
            EngineConfig {
                crash_after_step: Some(n),
                ..config()
            },
        )
        .configure(bdf(A), claim("u1"));
        if !matches!(crashed, Err(EngineError::SimulatedCrash(_))) {
            break;
        }
        fail_reset_of_a(&k);
        let e = engine(&k, &state);
        let again = e.configure(bdf(A), claim("u1"));
        let quarantined = e.ledger().quarantined.contains_key(&bdf(A));
        if quarantined {
            refused += 1;
            assert!(
                matches!(again, Err(EngineError::Quarantined { .. })),
                "crash after step {n}: {again:?}"
            );
            let rec = &e.ledger().gpus[&bdf(A)];
            assert_ne!(
                rec.state,
                vfio_gpu_engine::ledger::OpState::Configured,
                "step {n}"
            );
        }
    }
    assert!(
        refused > 0,
        "no step left a record whose finish owed a reset"
    );
}

/// B on a 16 GT/s link, held by claim u1; its next reset trains the link
/// back at 2.5 GT/s (a release then quarantines it).
fn held_with_a_link_that_trains_back_degraded(k: &SimKernel, e: &Engine) {
    k.set_link(bdf(B), "16.0 GT/s PCIe", 16).unwrap();
    e.configure(bdf(B), claim("u1")).unwrap();
    k.on_reset(
        bdf(B),
        ResetEffect::DegradedLink {
            speed: "2.5 GT/s PCIe".into(),
            width: 16,
        },
    );
}

#[test]
fn a_link_that_trains_back_degraded_is_quarantined_after_the_bind() {
    let (_d, host, k, e) = setup();
    held_with_a_link_that_trains_back_degraded(&k, &e);
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Quarantined, "{}", out.detail);
    assert!(
        out.detail.contains("2.5 GT/s PCIe of 16.0 GT/s PCIe"),
        "{}",
        out.detail
    );
    assert_eq!(
        e.ledger().quarantined[&bdf(B)].cause,
        QuarantineCause::VerificationFailed
    );
    // Returned to its host driver first, verified there.
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
    assert!(e.ledger().gpus.is_empty());
    assert!(matches!(
        e.configure(bdf(B), claim("u2")),
        Err(EngineError::Quarantined { .. })
    ));
    // The admin's reset retrains the link (no fault left): cleared.
    assert_eq!(e.reset_gpu(bdf(B)).unwrap().action, Action::Reset);
    e.configure(bdf(B), claim("u2")).unwrap();
}

#[test]
fn a_gpu_that_answers_with_another_device_id_stays_quarantined_through_the_admin_reset() {
    let (_d, _host, k, e) = setup();
    e.configure(bdf(B), claim("u1")).unwrap();
    k.on_reset(bdf(B), ResetEffect::ChangedDeviceId(0x1eb8));
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Quarantined, "{}", out.detail);
    assert!(out.detail.contains("10de:1eb8"), "{}", out.detail);
    // Verified against what it was when found, not against its failed state.
    let again = e.reset_gpu(bdf(B)).unwrap_err();
    assert!(matches!(again, EngineError::Quarantined { .. }), "{again}");
    assert_eq!(
        e.ledger().quarantined[&bdf(B)].cause,
        QuarantineCause::VerificationFailed
    );
    assert_eq!(e.ledger().handovers.len(), 2);
}

#[test]
fn lost_bars_and_a_gpu_without_any_reset_method_are_quarantined() {
    let (_d, _host, k, e) = setup();
    // A 16 MiB memory BAR, as `resource` lists one.
    let bar = "0x0000100000000000 0x0000100000ffffff 0x000000000014220c\n";
    let none = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
    std::fs::write(
        _host.join(format!("sys/bus/pci/devices/{B}/resource")),
        format!("{bar}{}", none.repeat(6)),
    )
    .unwrap();
    e.configure(bdf(B), claim("u1")).unwrap();
    k.on_reset(bdf(B), ResetEffect::LostBars);
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Quarantined, "{}", out.detail);
    assert!(out.detail.contains("BARs total 0 bytes"), "{}", out.detail);
    e.configure(bdf(D), claim("u2")).unwrap();
    k.without_reset(bdf(D));
    let out = e.unconfigure(bdf(D), Some(&claim("u2"))).unwrap();
    assert_eq!(out.action, Action::Quarantined, "{}", out.detail);
    assert!(out.detail.contains("no reset method"), "{}", out.detail);
    assert_eq!(
        e.ledger().quarantined[&bdf(D)].cause,
        QuarantineCause::ResetFailed
    );
}

#[test]
fn a_hung_reset_leaves_the_gpu_stuck_and_quarantined_until_it_returns() {
    let (_dir, host, k, e) = world_with(EngineConfig {
        bind_deadline: Duration::from_millis(200),
        ..config()
    });
    e.configure(bdf(B), claim("u1")).unwrap();
    let gate = vfio_gpu_engine::sim::BlockHandle::new();
    k.inject(Fault::on(
        vfio_gpu_engine::kernel::WriteKind::Reset,
        bdf(B),
        FaultAction::Block(gate.clone()),
    ));
    let err = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap_err();
    assert!(matches!(err, EngineError::Stuck { .. }), "{err}");
    assert_eq!(
        e.ledger().quarantined[&bdf(B)].cause,
        QuarantineCause::ResetHung
    );
    assert_eq!(driver_of(&host, B).as_deref(), Some("vfio-pci"));
    gate.release();
    std::thread::sleep(Duration::from_millis(300));
    // Returned: still quarantined (a reset that hung proves nothing), kept on vfio.
    for r in e.reconcile().unwrap() {
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(driver_of(&host, B).as_deref(), Some("vfio-pci"));
    assert!(e.ledger().quarantined.contains_key(&bdf(B)));
    assert_eq!(e.reset_gpu(bdf(B)).unwrap().action, Action::Reset);
}

#[test]
fn a_kept_gpu_a_vm_still_holds_is_not_reset_under_it_and_goes_to_nobody_until_it_is() {
    let (_d, host, k, e) = setup();
    // C is pre-bound by vfio-pci.ids (group 13): kept on vfio at release.
    e.configure(bdf(C), claim("u1")).unwrap();
    k.set_vfio_user(13, true);
    vm_holds_group(&host, 4242, 13);
    let out = e.unconfigure(bdf(C), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::LeftOnVfio, "{}", out.detail);
    assert!(out.detail.contains("reset waits"), "{}", out.detail);
    assert_eq!(k.resets(bdf(C)), 0);
    let refused = e.configure(bdf(C), claim("u2")).unwrap_err();
    assert!(
        matches!(refused, EngineError::HandoverPending { .. }),
        "{refused}"
    );
    // Reconcile while the VM holds it: still no reset.
    for r in e.reconcile().unwrap() {
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(k.resets(bdf(C)), 0);
    k.set_vfio_user(13, false);
    std::fs::remove_dir_all(host.join("proc/4242")).unwrap();
    for r in e.reconcile().unwrap() {
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(k.resets(bdf(C)), 1);
    assert!(k.resets_under_a_user().is_empty());
    assert_eq!(driver_of(&host, C).as_deref(), Some("vfio-pci"));
    assert_eq!(e.ledger().handovers.len(), 1);
    e.configure(bdf(C), claim("u2")).unwrap();
}

fn engine_with_policy(
    k: &SimKernel,
    state: &std::path::Path,
    policy: &str,
    commands: Arc<dyn vfio_gpu_engine::commands::HostCommands>,
) -> Engine {
    let policy = Policy::parse(policy, std::path::Path::new("/policy.toml")).unwrap();
    Engine::open_with_commands(
        Arc::new(k.clone()),
        commands,
        state,
        GpuSelector::default(),
        policy,
        config(),
    )
    .unwrap()
    .0
}

/// Stands in for the host's programs: the scrub hook answers `answer`.
struct Hook {
    answer: Result<String, String>,
    calls: std::sync::Mutex<Vec<String>>,
}

impl vfio_gpu_engine::commands::HostCommands for Hook {
    fn run(&self, _root: &HostRoot, program: &str, args: &[&str]) -> Result<String, String> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{program} {}", args.join(" ")));
        if program == "/usr/sbin/scrub-gpu" {
            self.answer.clone()
        } else {
            Ok(String::new())
        }
    }
}

#[test]
fn sanitize_off_hands_over_without_a_reset_and_says_so() {
    let (dir, host, k, _) = setup();
    let hook = Arc::new(Hook {
        answer: Ok(String::new()),
        calls: Default::default(),
    });
    let e = engine_with_policy(
        &k,
        &dir.path().join("state2"),
        "[sanitize]\nmode = \"off\"\n",
        hook,
    );
    e.configure(bdf(B), claim("u1")).unwrap();
    e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(k.resets(bdf(B)), 0);
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
    let audit = &e.ledger().handovers[0];
    assert_eq!(audit.reset_method, "none (sanitize = off)");
}

#[test]
fn the_scrub_hook_runs_after_the_reset_and_a_failing_one_quarantines() {
    let (dir, _host, k, _) = setup();
    let policy = "[sanitize]\nmode = \"reset+hook\"\nhook = \"/usr/sbin/scrub-gpu\"\n";
    let ok = Arc::new(Hook {
        answer: Ok("scrubbed 80 GiB\n".into()),
        calls: Default::default(),
    });
    let e = engine_with_policy(&k, &dir.path().join("s1"), policy, ok.clone());
    e.configure(bdf(B), claim("u1")).unwrap();
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Restored, "{}", out.detail);
    assert!(
        ok.calls
            .lock()
            .unwrap()
            .contains(&format!("/usr/sbin/scrub-gpu {B}"))
    );
    assert_eq!(e.ledger().handovers[0].hook, "ok: scrubbed 80 GiB");
    drop(e);
    let failing = Arc::new(Hook {
        answer: Err("ECC errors while clearing".into()),
        calls: Default::default(),
    });
    let e = engine_with_policy(&k, &dir.path().join("s2"), policy, failing);
    e.configure(bdf(B), claim("u2")).unwrap();
    let out = e.unconfigure(bdf(B), Some(&claim("u2"))).unwrap();
    assert_eq!(out.action, Action::Quarantined, "{}", out.detail);
    let audit = &e.ledger().handovers[0];
    assert!(audit.hook.contains("ECC errors"), "{audit:?}");
    assert_eq!(
        e.ledger().quarantined[&bdf(B)].cause,
        QuarantineCause::HookFailed
    );
}

/// Crash after every mutation of a resetting release (ledger commits and
/// host writes alike), open a fresh engine, reconcile: the GPU is back on
/// its host driver, reset at least once, no hand-over left owed, an audit
/// record written, and a second reconcile writes nothing.
/// Unprepares `gpu` (held by claim u1) on an engine that crashes after step
/// `n`. `None`: the release finished before that step, with `finished` as its
/// action. Otherwise a restarted engine after its reconcile, every result Ok.
fn unprepare_crashing_after(
    k: &SimKernel,
    state: &std::path::Path,
    gpu: &str,
    n: u64,
    finished: Action,
) -> Option<Engine> {
    let crashed = engine_with(
        k,
        state,
        EngineConfig {
            crash_after_step: Some(n),
            ..config()
        },
    )
    .unconfigure(bdf(gpu), Some(&claim("u1")));
    let ctx = format!("crash after step {n}");
    match crashed {
        Ok(out) => {
            assert_eq!(out.action, finished, "{ctx}: {}", out.detail);
            return None;
        }
        Err(EngineError::SimulatedCrash(_)) => {}
        Err(other) => panic!("{ctx}: {other}"),
    }
    let e = engine(k, state);
    for r in e.reconcile().unwrap() {
        assert!(r.is_ok(), "{ctx}: {r:?}");
    }
    Some(e)
}

#[test]
fn a_crash_at_every_step_of_a_resetting_release_is_finished_by_reconcile() {
    let mut swept = 0;
    for n in 1.. {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        build_host(&host);
        let k = sim(&host);
        let state = dir.path().join("state");
        {
            let e = engine(&k, &state);
            e.configure(bdf(A), claim("u1")).unwrap();
        }
        let ctx = format!("crash after step {n}");
        let Some(e) = unprepare_crashing_after(&k, &state, A, n, Action::Restored) else {
            break;
        };
        let ledger = e.ledger();
        let handed_over = ledger.handovers.len() == 1;
        if handed_over {
            assert!(k.resets(bdf(A)) >= 1, "{ctx}: audit without a reset");
            assert_eq!(driver_of(&host, A).as_deref(), Some("nvidia"), "{ctx}");
            assert!(
                !ledger.gpus.contains_key(&bdf(A)),
                "{ctx}: {:?}",
                ledger.gpus
            );
        } else {
            // Crashed before the release was written: still held, untouched.
            assert_eq!(k.resets(bdf(A)), 0, "{ctx}");
            assert_eq!(driver_of(&host, A).as_deref(), Some("vfio-pci"), "{ctx}");
        }
        assert!(ledger.quarantined.is_empty(), "{ctx}");
        assert!(
            ledger.gpus.values().all(|r| r.handover.is_none()),
            "{ctx}: a hand-over is still owed"
        );
        let before = k.log().len();
        for r in e.reconcile().unwrap() {
            assert!(r.is_ok(), "{ctx}: {r:?}");
        }
        assert_eq!(k.log().len(), before, "{ctx}: second reconcile wrote");
        swept += 1;
    }
    assert!(swept >= 8, "swept {swept} crash points");
}

/// The same sweep for a release whose verification fails after the bind (the
/// link trains back degraded): wherever it crashes, reconcile finishes the
/// release (the GPU back on its host driver, its record gone) and the GPU is
/// quarantined unless a resumed reset retrained it; a second reconcile
/// writes nothing.
#[test]
fn a_crash_at_every_step_of_a_release_that_fails_verification_ends_quarantined() {
    let mut swept = 0;
    for n in 1.. {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        build_host(&host);
        let k = sim(&host);
        k.set_link(bdf(B), "16.0 GT/s PCIe", 16).unwrap();
        let state = dir.path().join("state");
        {
            let e = engine(&k, &state);
            e.configure(bdf(B), claim("u1")).unwrap();
        }
        k.on_reset(
            bdf(B),
            ResetEffect::DegradedLink {
                speed: "16.0 GT/s PCIe".into(),
                width: 8,
            },
        );
        let ctx = format!("crash after step {n}");
        let Some(e) = unprepare_crashing_after(&k, &state, B, n, Action::Quarantined) else {
            break;
        };
        let ledger = e.ledger();
        if k.resets(bdf(B)) == 0 {
            // Crashed before the release was written: still held, untouched.
            assert_eq!(driver_of(&host, B).as_deref(), Some("vfio-pci"), "{ctx}");
        } else {
            assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"), "{ctx}");
            assert!(
                !ledger.gpus.contains_key(&bdf(B)),
                "{ctx}: {:?}",
                ledger.gpus
            );
            // A crash before the reset was recorded done resumes it with a
            // second reset, which (the fault spent) retrains the link: clean.
            // Otherwise the degraded link is found and quarantined.
            let resets = k.resets(bdf(B));
            assert_eq!(
                ledger.quarantined.contains_key(&bdf(B)),
                resets == 1,
                "{ctx}: {resets} resets, {:?}",
                ledger.handovers
            );
            assert_eq!(ledger.handovers.len(), 1, "{ctx}");
        }
        let before = k.log().len();
        for r in e.reconcile().unwrap() {
            assert!(r.is_ok(), "{ctx}: {r:?}");
        }
        assert_eq!(k.log().len(), before, "{ctx}: second reconcile wrote");
        swept += 1;
    }
    assert!(swept >= 8, "swept {swept} crash points");
}

/// The administrator's reset reaches a running engine through its admin
/// socket (the state lock stays with the engine): a quarantined GPU comes
/// out, each GPU gets its own answer, and a request naming a bad address or
/// too much is refused whole, with nothing reset.
#[test]
fn the_admin_socket_resets_a_quarantined_gpu_in_the_running_engine_and_refuses_bad_requests() {
    use std::io::{Read, Write};
    use vfio_gpu_engine::admin_socket::{
        ADMIN_SOCKET_FILE, AdminSocket, AdminSocketError, MAX_REQUEST_BYTES, request_reset,
    };
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    let state = dir.path().join("state");
    let e = Arc::new(engine(&k, &state));
    assert!(matches!(
        request_reset(&state, &[bdf(B)]),
        Err(AdminSocketError::NotRunning { .. })
    ));
    held_with_a_link_that_trains_back_degraded(&k, &e);
    let out = e.unconfigure(bdf(B), Some(&claim("u1"))).unwrap();
    assert_eq!(out.action, Action::Quarantined, "{}", out.detail);

    let socket = AdminSocket::start(Arc::clone(&e), &state).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join(ADMIN_SOCKET_FILE))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let resets = k.resets(bdf(B));
    // Raw requests: a bad address, and an oversize body, change nothing.
    let raw = |body: &[u8]| {
        let mut s = std::os::unix::net::UnixStream::connect(state.join(ADMIN_SOCKET_FILE)).unwrap();
        let _ = s.write_all(body);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        // An oversize request may be cut off (reset) after the refusal.
        s.read_to_string(&mut answer).map(|_| answer)
    };
    let bad = raw(br#"{"reset":["0000:3b:00.0","../../etc"]}"#).unwrap();
    assert!(
        bad.contains("refused") && bad.contains("GPU address"),
        "{bad}"
    );
    if let Ok(big) = raw(&vec![b' '; MAX_REQUEST_BYTES as usize + 10]) {
        assert!(big.contains("refused") && big.contains("bytes"), "{big}");
    }
    let unknown = raw(br#"{"reset":["0000:3b:00.0"],"rebind":true}"#).unwrap();
    assert!(unknown.contains("refused"), "{unknown}");
    assert_eq!(
        k.resets(bdf(B)),
        resets,
        "nothing reset by a refused request"
    );
    assert!(!e.ledger().quarantined.is_empty());

    // The real request: B is reset and verified and leaves quarantine; A
    // (never quarantined, on its host driver) gets its own answer.
    let results = request_reset(&state, &[bdf(B), bdf(A)]).unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].gpu, bdf(B));
    let o = results[0].outcome.as_ref().expect("B reset");
    assert_eq!(o["action"], "reset", "{o}");
    assert!(e.ledger().quarantined.is_empty());
    assert_eq!(results[1].gpu, bdf(A));
    assert!(results[1].outcome.is_some() || results[1].error.is_some());
    e.configure(bdf(B), claim("u2")).unwrap();

    // Stopped: the file is gone and a request finds nobody.
    drop(socket);
    assert!(!state.join(ADMIN_SOCKET_FILE).exists());
    assert!(matches!(
        request_reset(&state, &[bdf(B)]),
        Err(AdminSocketError::NotRunning { .. })
    ));
}

/// The ledger keeps the recent hand-overs, never losing a GPU's last one to
/// another GPU's churn, so its size (paid by every commit) stays bounded.
#[test]
fn the_audit_keeps_the_recent_hand_overs_and_every_gpus_last_one() {
    use vfio_gpu_engine::ledger::HANDOVER_AUDIT_KEPT;
    let (_d, _host, _k, e) = setup();
    e.configure(bdf(B), claim("b")).unwrap();
    e.unconfigure(bdf(B), Some(&claim("b"))).unwrap();
    for n in 0..HANDOVER_AUDIT_KEPT + 5 {
        let h = claim(&format!("a{n}"));
        e.configure(bdf(A), h.clone()).unwrap();
        e.unconfigure(bdf(A), Some(&h)).unwrap();
    }
    let audit = e.ledger().handovers;
    assert_eq!(audit.len(), HANDOVER_AUDIT_KEPT, "bounded");
    assert_eq!(
        audit.iter().filter(|h| h.gpu == bdf(B)).count(),
        1,
        "B's only hand-over is kept"
    );
    let last_a = audit.iter().rfind(|h| h.gpu == bdf(A)).unwrap();
    assert!(
        last_a
            .released_by
            .contains(&format!("a{}", HANDOVER_AUDIT_KEPT + 4)),
        "{last_a:?}"
    );
}
