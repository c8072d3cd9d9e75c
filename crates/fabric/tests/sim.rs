//! Simulator semantics through the [`FabricManager`] trait: overlap, both
//! dialects normalised, the start-up window, the `--restart` replay window,
//! faults, blocking under a deadline.

use std::sync::Arc;
use std::time::Duration;

use vfio_gpu_fabric::{
    Activated, Call, Deactivated, DeadlineFm, Dialect, FabricManager, Fault, FaultAction, FmCode,
    FmError, ManualClock, PartitionId, Phase, Platform, SimFabricManager, SimState,
};

const P: fn(u32) -> PartitionId = PartitionId;

fn sim(platform: Platform, dialect: Dialect) -> (SimFabricManager, ManualClock) {
    let clock = ManualClock::at(1_000_000);
    let mut state = SimState::new(platform);
    state.dialect = dialect;
    (
        SimFabricManager::with_state(state, Arc::new(clock.clone())),
        clock,
    )
}

fn active(fm: &dyn FabricManager) -> Vec<u32> {
    fm.get_supported_partitions()
        .map(|l| l.active().iter().map(|p| p.0).collect())
        .unwrap_or_default()
}

#[test]
fn activate_deactivate_round_trip_both_platforms() {
    for (platform, pair, other) in [(Platform::HgxH100, 3, 4), (Platform::HgxB200, 4, 5)] {
        let (fm, _) = sim(platform, Dialect::Documented);
        assert_eq!(fm.activate(P(pair)).unwrap(), Activated::Activated);
        assert_eq!(fm.activate(P(other)).unwrap(), Activated::Activated);
        assert_eq!(active(&fm), vec![pair, other]);
        assert_eq!(fm.deactivate(P(pair)).unwrap(), Deactivated::Deactivated);
        assert_eq!(active(&fm), vec![other]);
        let list = fm.get_supported_partitions().unwrap();
        assert_eq!(list.partitions.len(), 15);
        // 1-GPU partitions report no NVLinks; H100+ report no BDF/UUID.
        let single = list.partitions.last().unwrap();
        assert_eq!(single.gpus.len(), 1);
        assert_eq!(single.gpus[0].max_num_nvlinks, 0);
        assert_eq!(single.gpus[0].pci_bus_id, "00000000:00:00.0");
        assert_eq!(single.gpus[0].uuid, "");
    }
}

#[test]
fn idempotency_is_normalised_in_both_dialects() {
    for (dialect, in_use, not_in_use) in [
        (Dialect::Documented, FmCode::InUse, FmCode::Uninitialized),
        (
            Dialect::Newer,
            FmCode::PartitionIdInUse,
            FmCode::PartitionIdNotInUse,
        ),
    ] {
        let (fm, _) = sim(Platform::HgxH100, dialect);
        fm.activate(P(1)).unwrap();
        // Same partition again: AlreadyActive, carrying the dialect's code.
        assert_eq!(fm.activate(P(1)).unwrap(), Activated::AlreadyActive(in_use));
        // Overlapping partition ({1,3} inside 1–4): an error naming the holder.
        match fm.activate(P(3)) {
            Err(FmError::Overlap {
                partition,
                code,
                active,
                ..
            }) => {
                assert_eq!(partition, P(3));
                assert_eq!(code, in_use);
                assert_eq!(active, vec![P(1)]);
            }
            other => panic!("{dialect:?}: {other:?}"),
        }
        assert_eq!(fm.deactivate(P(1)).unwrap(), Deactivated::Deactivated);
        assert_eq!(
            fm.deactivate(P(1)).unwrap(),
            Deactivated::NotActive(not_in_use)
        );
        // The raw codes FM answered, as logged.
        let codes: Vec<i32> = fm.state().log.iter().map(|e| e.code).collect();
        assert!(codes.contains(&in_use.raw()) && codes.contains(&not_in_use.raw()));
    }
}

#[test]
fn overlap_rejection_covers_every_pair() {
    let (fm, _) = sim(Platform::HgxB200, Dialect::Newer);
    let t = Platform::HgxB200.topology();
    for a in t.partitions() {
        for b in t.partitions() {
            fm.with(|s| s.active.clear());
            fm.activate(a.id).unwrap();
            let r = fm.activate(b.id);
            if a.id == b.id {
                assert!(matches!(r, Ok(Activated::AlreadyActive(_))));
            } else if a.modules.is_disjoint(&b.modules) {
                assert_eq!(r.unwrap(), Activated::Activated, "{} {}", a.id, b.id);
            } else {
                assert!(
                    matches!(r, Err(FmError::Overlap { .. })),
                    "{} {}",
                    a.id,
                    b.id
                );
            }
        }
    }
}

#[test]
fn unknown_partition_is_badparam() {
    let (fm, _) = sim(Platform::HgxH100, Dialect::Documented);
    let e = fm.activate(P(15)).unwrap_err();
    assert_eq!(e.code(), Some(FmCode::BadParam));
    // B200 ids start at 1: 0 does not exist there.
    let (fm, _) = sim(Platform::HgxB200, Dialect::Documented);
    assert_eq!(
        fm.deactivate(P(0)).unwrap_err().code(),
        Some(FmCode::BadParam)
    );
}

#[test]
fn not_configured_start_window() {
    for (dialect, code) in [
        (Dialect::Documented, FmCode::NotConfigured),
        (Dialect::Newer, FmCode::NotReady),
    ] {
        let (fm, clock) = sim(Platform::HgxH100, dialect);
        fm.activate(P(0)).unwrap();
        let now = fm.now_ms();
        fm.with(|s| s.start(now, Duration::from_secs(5)));
        let e = fm.get_supported_partitions().unwrap_err();
        assert_eq!(e.code(), Some(code));
        assert!(e.is_retryable());
        assert!(fm.activate(P(0)).unwrap_err().is_retryable());
        clock.advance(Duration::from_secs(5));
        // A normal start forgets every partition.
        assert_eq!(active(&fm), Vec::<u32>::new());
        assert_eq!(fm.activate(P(0)).unwrap(), Activated::Activated);
    }
}

#[test]
fn restart_replay_within_window() {
    let (fm, clock) = sim(Platform::HgxH100, Dialect::Documented);
    fm.activate(P(3)).unwrap();
    fm.activate(P(6)).unwrap();
    let now = fm.now_ms();
    fm.with(|s| s.restart_resilient(now));
    // Everything but the replay is rejected.
    for r in [
        fm.get_supported_partitions().map(|_| ()),
        fm.activate(P(4)).map(|_| ()),
        fm.deactivate(P(3)).map(|_| ()),
    ] {
        assert_eq!(r.unwrap_err().code(), Some(FmCode::NotConfigured));
    }
    assert_eq!(
        fm.get_nvlink_failed_devices().unwrap_err().code(),
        Some(FmCode::NotSupported),
        "failed-device query is unsupported in restart mode"
    );
    // An invalid replay (overlapping ids) is refused and keeps the window open.
    assert_eq!(
        fm.set_activated_partitions(&[P(3), P(1)])
            .unwrap_err()
            .code(),
        Some(FmCode::BadParam)
    );
    clock.advance(Duration::from_secs(59));
    fm.set_activated_partitions(&[P(3), P(6)]).unwrap();
    assert_eq!(fm.state().phase, Phase::Running);
    assert_eq!(active(&fm), vec![3, 6]);
    // Outside a restart the simulator refuses a replay.
    assert_eq!(
        fm.set_activated_partitions(&[]).unwrap_err().code(),
        Some(FmCode::NotSupported)
    );
}

#[test]
fn restart_without_replay_exits_after_60s() {
    let (fm, clock) = sim(Platform::HgxB200, Dialect::Newer);
    let now = fm.now_ms();
    fm.with(|s| {
        s.restart_reject = FmCode::NotReady;
        s.restart_resilient(now);
    });
    assert_eq!(
        fm.get_supported_partitions().unwrap_err().code(),
        Some(FmCode::NotReady)
    );
    clock.advance(Duration::from_millis(60_001));
    let e = fm.set_activated_partitions(&[]).unwrap_err();
    assert!(e.is_connection(), "{e}");
    assert_eq!(fm.state().phase, Phase::Exited);
}

#[test]
fn empty_replay_is_valid() {
    let (fm, _) = sim(Platform::HgxH100, Dialect::Documented);
    let now = fm.now_ms();
    fm.with(|s| s.restart_resilient(now));
    fm.set_activated_partitions(&[]).unwrap();
    assert!(active(&fm).is_empty());
}

#[test]
fn injected_faults() {
    let (fm, _) = sim(Platform::HgxH100, Dialect::Documented);
    fm.with(|s| {
        s.faults.push(Fault {
            call: Call::Activate,
            action: FaultAction::Return(-10),
            times: Some(1),
        });
        s.faults.push(Fault {
            call: Call::Connect,
            action: FaultAction::Return(-9),
            times: Some(1),
        });
        s.faults.push(Fault {
            call: Call::Deactivate,
            action: FaultAction::Return(-77),
            times: None,
        });
    });
    // The connect fault hits first.
    assert!(fm.activate(P(0)).unwrap_err().is_connection());
    assert_eq!(
        fm.activate(P(0)).unwrap_err().code(),
        Some(FmCode::NvlinkError)
    );
    assert_eq!(fm.activate(P(0)).unwrap(), Activated::Activated);
    for _ in 0..2 {
        assert!(matches!(
            fm.deactivate(P(0)),
            Err(FmError::UnknownCode { raw: -77, .. })
        ));
    }
    assert_eq!(active(&fm), vec![0], "a faulted call does not act");
}

#[test]
fn blocked_call_hits_the_deadline_and_later_calls_are_refused() {
    let (fm, _) = sim(Platform::HgxH100, Dialect::Documented);
    let fm = Arc::new(fm);
    fm.hold(Call::Activate);
    let timed = DeadlineFm::new(fm.clone(), Duration::from_millis(100));
    match timed.activate(P(1)) {
        Err(FmError::Deadline { waited, .. }) => assert_eq!(waited, Duration::from_millis(100)),
        other => panic!("{other:?}"),
    }
    assert!(timed.blocked_on().is_some());
    assert!(matches!(
        timed.get_supported_partitions(),
        Err(FmError::Stuck(_))
    ));
    fm.release(Call::Activate);
    // The blocked call finishes on its own; then calls flow again.
    for _ in 0..100 {
        if timed.blocked_on().is_none() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(timed.blocked_on(), None);
    assert_eq!(active(&timed), vec![1]);
    assert_eq!(
        timed.activate(P(1)).unwrap(),
        Activated::AlreadyActive(FmCode::InUse)
    );
}

#[test]
fn slow_call_within_deadline_succeeds() {
    let (fm, _) = sim(Platform::HgxH100, Dialect::Documented);
    fm.with(|s| {
        s.faults.push(Fault {
            call: Call::Activate,
            action: FaultAction::SleepMs(50),
            times: Some(1),
        })
    });
    let timed = DeadlineFm::new(Arc::new(fm), Duration::from_secs(5));
    assert_eq!(timed.activate(P(2)).unwrap(), Activated::Activated);
}

#[test]
fn connect_records_address_type() {
    let (fm, _) = sim(Platform::HgxH100, Dialect::Documented);
    fm.get_supported_partitions().unwrap();
    let c = fm.state().connects;
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].address_type, Some(2));
    assert_eq!(c[0].address_is_unix_socket, 1);
    assert_eq!(c[0].version, 0x0200_0110);
}

#[test]
fn state_round_trips_as_json() {
    let (fm, _) = sim(Platform::HgxB200, Dialect::Newer);
    fm.activate(P(4)).unwrap();
    let s = fm.state();
    let text = serde_json::to_string(&s).unwrap();
    let back: SimState = serde_json::from_str(&text).unwrap();
    assert_eq!(back, s);
}

#[test]
fn ambiguous_codes_are_only_normalised_after_a_requery() {
    let (fm, _) = sim(Platform::HgxH100, Dialect::Documented);
    fm.activate(P(0)).unwrap();
    // −4 from deactivate while FM still lists the partition active: not "not
    // active" (−4 is also "library not initialised", §13.5).
    fm.with(|s| {
        s.faults.push(Fault {
            call: Call::Deactivate,
            action: FaultAction::Return(-4),
            times: Some(1),
        });
    });
    let e = fm.deactivate(P(0)).unwrap_err();
    assert!(
        matches!(
            e,
            FmError::Fm {
                call: Call::Deactivate,
                code: FmCode::Uninitialized
            }
        ),
        "{e}"
    );
    // −4 and the re-query fails too: the original error, never NotActive.
    fm.with(|s| {
        s.active.clear();
        s.faults.push(Fault {
            call: Call::Deactivate,
            action: FaultAction::Return(-4),
            times: Some(1),
        });
        s.faults.push(Fault {
            call: Call::GetSupportedPartitions,
            action: FaultAction::Return(-4),
            times: Some(1),
        });
    });
    let e = fm.deactivate(P(0)).unwrap_err();
    assert!(
        matches!(
            e,
            FmError::Fm {
                call: Call::Deactivate,
                ..
            }
        ),
        "{e}"
    );
    // IN_USE for a partition FM does not list.
    fm.with(|s| {
        s.faults.push(Fault {
            call: Call::Activate,
            action: FaultAction::Return(-7),
            times: Some(1),
        });
    });
    assert!(matches!(fm.activate(P(99)), Err(FmError::UnknownPartition(p)) if p == P(99)));
}

#[test]
fn backends_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<SimFabricManager>();
    check::<vfio_gpu_fabric::NvfmLibrary>();
    check::<DeadlineFm>();
    check::<FmError>();
    check::<vfio_gpu_fabric::NvmlModuleIds>();
}

#[test]
fn concurrent_activations_never_overlap() {
    let (fm, _) = sim(Platform::HgxH100, Dialect::Newer);
    let fm = Arc::new(fm);
    let handles: Vec<_> = (0..15)
        .map(|id| {
            let fm = Arc::clone(&fm);
            std::thread::spawn(move || fm.activate(P(id)).is_ok())
        })
        .collect();
    let _ok: usize = handles
        .into_iter()
        .map(|h| usize::from(h.join().unwrap()))
        .sum();
    let active: Vec<PartitionId> = fm.state().active.into_iter().collect();
    let t = Platform::HgxH100.topology();
    for a in &active {
        assert!(t.overlaps_active(*a, &active).is_empty(), "{active:?}");
    }
    assert!(!active.is_empty());
}

/// Records the thread each list call runs on; `gate` makes calls wait
/// until as many are running (to prove concurrency).
struct ThreadRecorder {
    inner: SimFabricManager,
    threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
    gate: std::sync::Barrier,
}

impl FabricManager for ThreadRecorder {
    fn get_supported_partitions(&self) -> Result<vfio_gpu_fabric::PartitionList, FmError> {
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        self.gate.wait();
        self.inner.get_supported_partitions()
    }
    fn activate(&self, id: PartitionId) -> Result<Activated, FmError> {
        self.inner.activate(id)
    }
    fn deactivate(&self, id: PartitionId) -> Result<Deactivated, FmError> {
        self.inner.deactivate(id)
    }
    fn set_activated_partitions(&self, ids: &[PartitionId]) -> Result<(), FmError> {
        self.inner.set_activated_partitions(ids)
    }
    fn get_nvlink_failed_devices(&self) -> Result<vfio_gpu_fabric::NvlinkFailedDevices, FmError> {
        self.inner.get_nvlink_failed_devices()
    }
    fn get_unsupported_partitions(
        &self,
    ) -> Result<Vec<vfio_gpu_fabric::UnsupportedPartition>, FmError> {
        self.inner.get_unsupported_partitions()
    }
}

fn recorder(parallel: usize) -> Arc<ThreadRecorder> {
    let (fm, _) = sim(Platform::HgxH100, Dialect::Documented);
    Arc::new(ThreadRecorder {
        inner: fm,
        threads: std::sync::Mutex::new(Vec::new()),
        gate: std::sync::Barrier::new(parallel),
    })
}

#[test]
fn sequential_calls_reuse_one_worker_instead_of_starting_a_thread_each() {
    let fm = recorder(1);
    let timed = DeadlineFm::new(fm.clone(), Duration::from_secs(5));
    for _ in 0..20 {
        timed.get_supported_partitions().unwrap();
    }
    let threads = fm.threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 20);
    assert!(
        !threads.contains(&std::thread::current().id()),
        "every call runs off the caller's thread"
    );
    let distinct: std::collections::BTreeSet<_> =
        threads.iter().map(|t| format!("{t:?}")).collect();
    assert_eq!(
        distinct.len(),
        1,
        "one worker serves sequential calls: {threads:?}"
    );
}

#[test]
fn concurrent_calls_still_run_side_by_side() {
    // Each call waits at the barrier until all four run: with workers
    // shared one at a time this would hit the deadline.
    let fm = recorder(4);
    let timed = DeadlineFm::new(fm.clone(), Duration::from_secs(10));
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| timed.get_supported_partitions().unwrap());
        }
    });
    assert_eq!(fm.threads.lock().unwrap().len(), 4);
}
