#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! NVLink partitions through a simulated Fabric Manager on the HGX demo
//! host: activation per claim, write-ahead records, crashes at every
//! mutation step followed by a restart, FM restarts, leaks and the
//! open-VFIO-group rule.

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::Arc;

use vfio_gpu_engine::fabric_state::PartitionState;
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{
    CrashMode, Engine, EngineConfig, EngineError, FabricAction, FabricConfig, FabricPolicy, Holder,
};
use vfio_gpu_fabric::{
    Dialect, FmCode, ManualClock, PartitionId, Platform, SimFabricManager, SimState,
};
use vfio_gpu_host::demo::{HGX_MODULE_MAP_FILE, build_hgx_demo_host};
use vfio_gpu_host::fixture::FunctionSpec;
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;

/// Modules 1 and 3: H100 partition 3.
const M1: &str = "0000:9a:00.0";
const M3: &str = "0000:ab:00.0";
/// Modules 2 and 4: H100 partition 4.
const M2: &str = "0000:ba:00.0";
const M4: &str = "0000:db:00.0";
/// IOMMU groups of M1 and M3 on the HGX demo host.
const G1: u32 = 11;

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

fn claim(uid: &str) -> Holder {
    Holder::Claim {
        uid: uid.into(),
        namespace: "vms".into(),
        name: format!("vm-{uid}"),
    }
}

struct Hgx {
    _dir: tempfile::TempDir,
    host: PathBuf,
    state: PathBuf,
    kernel: SimKernel,
    fm: Arc<SimFabricManager>,
    clock: ManualClock,
}

impl Hgx {
    fn new() -> Hgx {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        std::fs::create_dir_all(&host).unwrap();
        build_hgx_demo_host(&host).unwrap();
        let kernel = SimKernel::booted(HostRoot::open(&host).unwrap());
        let clock = ManualClock::at(1_000_000);
        let fm = Arc::new(SimFabricManager::with_state(
            SimState::new(Platform::HgxH100),
            Arc::new(clock.clone()),
        ));
        Hgx {
            state: dir.path().join("state"),
            _dir: dir,
            host,
            kernel,
            fm,
            clock,
        }
    }

    fn fabric(&self, policy: FabricPolicy, agent: bool) -> FabricConfig {
        let mut c = FabricConfig::new(self.fm.clone());
        c.policy = policy;
        c.resiliency_agent = agent;
        c.module_map_file = Some(self.host.join(HGX_MODULE_MAP_FILE));
        c
    }

    fn engine_with(&self, crash: Option<u64>, fabric: FabricConfig) -> Engine {
        let config = EngineConfig {
            crash_mode: CrashMode::Return,
            crash_after_step: crash,
            unbind_lock_backoff: std::time::Duration::from_millis(1),
            state_lock_wait: std::time::Duration::from_secs(5),
            fabric: Some(fabric),
            ..EngineConfig::default()
        };
        Engine::open(
            Arc::new(self.kernel.clone()),
            &self.state,
            GpuSelector::default(),
            Policy::default(),
            config,
        )
        .unwrap()
        .0
    }

    fn engine(&self) -> Engine {
        self.engine_with(None, self.fabric(FabricPolicy::Required, true))
    }

    fn active(&self) -> BTreeSet<u32> {
        self.fm.state().active.iter().map(|p| p.0).collect()
    }

    /// A process (a VM) holding `/dev/vfio/<group>`.
    fn vm_holds(&self, pid: u32, group: u32) {
        let node = self.host.join(format!("dev/vfio/{group}"));
        assert!(node.exists(), "group node {group} exists");
        std::fs::create_dir_all(self.host.join(format!("proc/{pid}/fd"))).unwrap();
        std::fs::write(self.host.join(format!("proc/{pid}/comm")), "qemu-kvm\n").unwrap();
        symlink(&node, self.host.join(format!("proc/{pid}/fd/20"))).unwrap();
    }

    fn vm_gone(&self, pid: u32) {
        std::fs::remove_dir_all(self.host.join(format!("proc/{pid}"))).unwrap();
    }
}

fn prepare(e: &Engine, h: &Holder, gpus: &[&str]) -> Result<FabricAction, EngineError> {
    let bdfs: Vec<Bdf> = gpus.iter().map(|g| bdf(g)).collect();
    e.fabric_preflight(h, &bdfs)?;
    for b in &bdfs {
        e.configure(*b, h.clone())?;
    }
    Ok(e.fabric_activate(h, &bdfs)?.action)
}

fn unprepare(e: &Engine, h: &Holder) -> Result<(), EngineError> {
    e.fabric_deactivate(h)?;
    for b in e.held_by(h) {
        e.unconfigure(b, Some(h))?;
    }
    Ok(())
}

fn ledger_partitions(e: &Engine) -> Vec<(u32, PartitionState)> {
    e.ledger()
        .fabric
        .partitions
        .iter()
        .map(|(id, r)| (id.0, r.state))
        .collect()
}

#[test]
fn a_two_gpu_claim_activates_exactly_its_partition_and_releases_it() {
    let t = Hgx::new();
    let e = t.engine();
    assert!(e.fabric_reconcile().unwrap().is_empty());
    let h = claim("u1");
    assert_eq!(prepare(&e, &h, &[M1, M3]).unwrap(), FabricAction::Activated);
    assert_eq!(t.active(), BTreeSet::from([3]));
    let rec = &e.ledger().fabric.partitions[&PartitionId(3)];
    assert_eq!(rec.state, PartitionState::Active);
    assert_eq!(rec.holder.as_ref(), Some(&h));
    assert_eq!(rec.bdfs, vec![bdf(M1), bdf(M3)]);
    // A retried prepare answers from the ledger and FM's list.
    assert_eq!(
        e.fabric_activate(&h, &[bdf(M1), bdf(M3)]).unwrap().action,
        FabricAction::AlreadyActive
    );
    // The slice view: module ids and partitionN.
    let (views, _) = e.discover().unwrap();
    let v = views.iter().find(|v| v.gpu.bdf() == bdf(M3)).unwrap();
    let f = v.fabric.as_ref().unwrap();
    assert_eq!(f.module_id.map(|m| m.0), Some(3));
    assert_eq!(f.partitions.get(&2).map(|p| p.0), Some(3));
    assert_eq!(f.partitions.get(&1).map(|p| p.0), Some(9));
    assert_eq!(f.nvlink_fabric.as_deref(), Some("nvl4"));
    assert!(f.fabric_managed);
    unprepare(&e, &h).unwrap();
    assert!(t.active().is_empty());
    assert!(e.ledger().fabric.partitions.is_empty());
    // A second reconcile changes nothing.
    let again = e.fabric_reconcile().unwrap();
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn a_set_that_is_not_a_partition_fails_before_any_host_change() {
    let t = Hgx::new();
    let e = t.engine();
    let h = claim("u1");
    // Modules 1 and 2 are adjacent but no H100 pair.
    let err = prepare(&e, &h, &[M1, M2]).unwrap_err().to_string();
    assert!(
        err.contains("not exactly one Fabric Manager partition"),
        "{err}"
    );
    assert!(err.contains("partition2"), "{err}");
    assert!(e.ledger().gpus.is_empty(), "no GPU moved");
    assert!(t.active().is_empty());
    // BestEffort: each GPU its 1-GPU partition.
    let e2 = {
        drop(e);
        t.engine_with(None, t.fabric(FabricPolicy::BestEffort, false))
    };
    assert_eq!(
        prepare(&e2, &h, &[M1, M2]).unwrap(),
        FabricAction::Activated
    );
    assert_eq!(t.active(), BTreeSet::from([7, 8]));
    unprepare(&e2, &h).unwrap();
    assert!(t.active().is_empty());
    // Disabled: no FM call at all.
    drop(e2);
    let e3 = t.engine_with(None, t.fabric(FabricPolicy::Disabled, false));
    let calls = t.fm.state().log.len();
    assert_eq!(prepare(&e3, &h, &[M1, M2]).unwrap(), FabricAction::Disabled);
    assert_eq!(t.fm.state().log.len(), calls);
}

#[test]
fn another_claims_partition_is_never_taken() {
    let t = Hgx::new();
    let e = t.engine();
    prepare(&e, &claim("a"), &[M1, M3]).unwrap();
    // Partition 1 (modules 1–4) overlaps partition 3 held by claim a.
    let err = e
        .fabric_preflight(&claim("b"), &[bdf(M1), bdf(M2), bdf(M3), bdf(M4)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("held by claim vms/vm-a"), "{err}");
    assert_eq!(t.active(), BTreeSet::from([3]));
}

#[test]
fn never_deactivated_while_a_vfio_group_is_open() {
    let t = Hgx::new();
    let e = t.engine();
    let h = claim("u1");
    prepare(&e, &h, &[M1, M3]).unwrap();
    t.vm_holds(4242, G1);
    let err = e.fabric_deactivate(&h).unwrap_err();
    assert!(
        matches!(err, EngineError::FabricBusy { partition: 3, .. }),
        "{err}"
    );
    assert_eq!(t.active(), BTreeSet::from([3]));
    let out = e.fabric_reconcile().unwrap();
    assert_eq!(t.active(), BTreeSet::from([3]), "{out:?}");
    // The GPU the VM does not hold is released; the partition is now a leak
    // of a holder that holds one GPU: still never deactivated under the VM.
    e.unconfigure(bdf(M3), Some(&h)).unwrap();
    let out = e.fabric_reconcile().unwrap();
    assert_eq!(t.active(), BTreeSet::from([3]), "{out:?}");
    t.vm_gone(4242);
    e.fabric_reconcile().unwrap();
    assert!(t.active().is_empty(), "idle now: deactivated");
    assert!(e.ledger().fabric.partitions.is_empty());
}

#[test]
fn idle_leaks_are_deactivated_and_held_ones_left() {
    let t = Hgx::new();
    // Partition 4 (modules 2, 4) active with no record of ours, GPUs idle on nvidia.
    t.fm.with(|s| s.active.insert(PartitionId(4)));
    let e = t.engine();
    let out = e.fabric_reconcile().unwrap();
    assert!(t.active().is_empty(), "{out:?}");
    assert!(e.ledger().fabric.partitions.is_empty());
    // Partition 5 (modules 5, 7 = 18:00.0, 2a:00.0) active; the admin bound
    // both to vfio and a VM holds one.
    t.fm.with(|s| s.active.insert(PartitionId(5)));
    e.configure(bdf("0000:18:00.0"), Holder::Admin).unwrap();
    e.configure(bdf("0000:2a:00.0"), Holder::Admin).unwrap();
    t.vm_holds(99, 3);
    let out = e.fabric_reconcile().unwrap();
    assert_eq!(t.active(), BTreeSet::from([5]), "{out:?}");
    assert!(
        out.iter()
            .any(|o| o.action == FabricAction::Noted && o.detail.contains("in use")),
        "{out:?}"
    );
    // A claim needing an overlapping partition (0 = all 8) fails, naming it.
    let all = [
        M1,
        M2,
        M3,
        M4,
        "0000:18:00.0",
        "0000:2a:00.0",
        "0000:3a:00.0",
        "0000:5d:00.0",
    ];
    let bdfs: Vec<Bdf> = all.iter().map(|b| bdf(b)).collect();
    let err = e
        .fabric_activate(&claim("big"), &bdfs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use") || err.contains("qemu-kvm"), "{err}");
    assert_eq!(t.active(), BTreeSet::from([5]));
}

#[test]
fn a_partition_active_for_exactly_a_claims_gpus_is_adopted() {
    let t = Hgx::new();
    let e = t.engine();
    let h = claim("u1");
    e.configure(bdf(M1), h.clone()).unwrap();
    e.configure(bdf(M3), h.clone()).unwrap();
    t.fm.with(|s| s.active.insert(PartitionId(3)));
    let out = e.fabric_reconcile().unwrap();
    assert!(
        out.iter().any(|o| o.action == FabricAction::Adopted),
        "{out:?}"
    );
    assert_eq!(ledger_partitions(&e), vec![(3, PartitionState::Active)]);
    unprepare(&e, &h).unwrap();
    assert!(t.active().is_empty());
}

#[test]
fn fm_restart_with_replay_keeps_the_partition() {
    let t = Hgx::new();
    let e = t.engine();
    let h = claim("u1");
    prepare(&e, &h, &[M1, M3]).unwrap();
    let now = t.fm.now_ms();
    t.fm.with(|s| s.restart_resilient(now));
    // Every call is rejected until the replay.
    assert!(e.fabric_preflight(&h, &[bdf(M1), bdf(M3)]).is_err());
    let out = e.fabric_reconcile().unwrap();
    assert_eq!(out[0].action, FabricAction::Replayed, "{out:?}");
    assert_eq!(t.active(), BTreeSet::from([3]));
    let log = t.fm.state().log;
    assert!(
        log.iter()
            .any(|l| l.call == vfio_gpu_fabric::Call::SetActivatedPartitions
                && l.partitions == vec![PartitionId(3)]
                && l.code == 0),
        "{log:?}"
    );
    unprepare(&e, &h).unwrap();
    assert!(t.active().is_empty());
}

#[test]
fn the_watch_replays_as_soon_as_fm_waits_for_it() {
    let t = Hgx::new();
    let e = t.engine();
    let h = claim("u1");
    prepare(&e, &h, &[M1, M3]).unwrap();
    assert!(e.fabric_watch().unwrap().is_none(), "nothing pending");
    let now = t.fm.now_ms();
    t.fm.with(|s| s.restart_resilient(now));
    let o = e.fabric_watch().unwrap().expect("replayed");
    assert_eq!(o.action, FabricAction::Replayed);
    assert_eq!(o.partitions, vec![PartitionId(3)]);
    assert_eq!(t.active(), BTreeSet::from([3]));
    assert!(e.fabric_watch().unwrap().is_none());
}

#[test]
fn fm_restart_without_the_agent_is_reported_and_then_repaired_after_a_normal_start() {
    let t = Hgx::new();
    let e = t.engine_with(None, t.fabric(FabricPolicy::Required, false));
    let h = claim("u1");
    prepare(&e, &h, &[M1, M3]).unwrap();
    let now = t.fm.now_ms();
    t.fm.with(|s| s.restart_resilient(now));
    let err = e.fabric_reconcile().unwrap_err().to_string();
    assert!(err.contains("restart replay"), "{err}");
    assert!(t.active().is_empty());
    // Nobody replayed: FM gives up after 60 s; it is started normally.
    t.clock.advance(std::time::Duration::from_secs(61));
    let now = t.fm.now_ms();
    t.fm.with(|s| s.start(now, std::time::Duration::ZERO));
    let out = e.fabric_reconcile().unwrap();
    assert_eq!(t.active(), BTreeSet::from([3]), "re-activated: {out:?}");
    assert_eq!(ledger_partitions(&e), vec![(3, PartitionState::Active)]);
}

#[test]
fn both_return_code_dialects() {
    for dialect in [Dialect::Documented, Dialect::Newer] {
        let t = Hgx::new();
        t.fm.with(|s| s.dialect = dialect);
        let e = t.engine();
        let h = claim("u1");
        prepare(&e, &h, &[M1, M3]).unwrap();
        // FM already has it active while the ledger says activating (a crash
        // between the call and the commit): the retry adopts it.
        e.fabric_activate(&h, &[bdf(M1), bdf(M3)]).unwrap();
        t.fm.with(|s| s.active.clear());
        // Deactivating an inactive partition is success in both dialects.
        unprepare(&e, &h).unwrap();
        assert!(e.ledger().fabric.partitions.is_empty());
    }
}

#[test]
fn an_fm_failure_rolls_the_record_back() {
    let t = Hgx::new();
    let e = t.engine();
    let h = claim("u1");
    for b in [M1, M3] {
        e.configure(bdf(b), h.clone()).unwrap();
    }
    t.fm.with(|s| {
        s.faults.push(vfio_gpu_fabric::Fault {
            call: vfio_gpu_fabric::Call::Activate,
            action: vfio_gpu_fabric::FaultAction::Return(FmCode::NvlinkError.raw()),
            times: Some(1),
        });
    });
    let err = e
        .fabric_activate(&h, &[bdf(M1), bdf(M3)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("activating partition 3"), "{err}");
    assert!(
        e.ledger().fabric.partitions.is_empty(),
        "FM says inactive: record dropped"
    );
    assert!(t.active().is_empty());
}

#[test]
fn an_nvswitch_in_the_group_blocks_the_move_whatever_the_policy() {
    let t = Hgx::new();
    // A mis-grouped NVSwitch (no ACS) in M1's IOMMU group.
    let mut h = vfio_gpu_host::fixture::FixtureHost::open(&t.host);
    h.add_function(
        &FunctionSpec::new(bdf("0000:9a:00.1"), 0x10de, 0x22a3, 0x068000)
            .driver("nvidia")
            .group(G1),
    )
    .unwrap();
    let e = t.engine();
    let (views, _) = e.discover().unwrap();
    assert!(
        views.iter().all(|v| v.gpu.bdf() != bdf("0000:05:00.0")),
        "NVSwitches are never GPUs"
    );
    let err = e.configure(bdf(M1), claim("u1")).unwrap_err();
    assert!(
        matches!(err, EngineError::FabricSwitchInGroup { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("0000:9a:00.1"), "{err}");
}

/// The whole life of a claim: prepare (preflight, 2 × configure, activate)
/// then unprepare (deactivate, 2 × release).
fn lifecycle(e: &Engine, h: &Holder) -> Result<(), EngineError> {
    prepare(e, h, &[M1, M3])?;
    unprepare(e, h)
}

/// [`prepare`] as the plugin orders it: the partition's `activating` record
/// rides with the last move's commit, the `active` mark after the answer.
fn prepare_mark_after(e: &Engine, h: &Holder, gpus: &[&str]) -> Result<(), EngineError> {
    let bdfs: Vec<Bdf> = gpus.iter().map(|g| bdf(g)).collect();
    let plan = e.fabric_preflight(h, &bdfs)?;
    {
        let _ride = e.fabric_ride(&plan);
        for b in &bdfs {
            e.configure(*b, h.clone())?;
        }
    }
    let unmarked = e.fabric_activate_planned(h, &bdfs, &plan)?.unmarked;
    e.fabric_mark_active(&unmarked)
}

fn lifecycle_mark_after(e: &Engine, h: &Holder) -> Result<(), EngineError> {
    prepare_mark_after(e, h, &[M1, M3])?;
    unprepare(e, h)
}

/// After a crash and a restart: reconcile, then check no partition leaked
/// and the ledger agrees with FM.
fn check_consistent(t: &Hgx, e: &Engine, ctx: &str) {
    let ledger = e.ledger();
    for id in t.active() {
        let rec = ledger.fabric.partitions.get(&PartitionId(id));
        let rec = rec.unwrap_or_else(|| panic!("{ctx}: partition {id} active without a record"));
        assert_eq!(rec.state, PartitionState::Active, "{ctx}");
        let h = rec.holder.clone().expect("a holder");
        let mut held = e.held_by(&h);
        held.sort();
        assert_eq!(
            held, rec.bdfs,
            "{ctx}: active partition whose GPUs its holder does not hold"
        );
    }
    for (id, r) in &ledger.fabric.partitions {
        assert_eq!(
            r.state,
            PartitionState::Active,
            "{ctx}: {id} unfinished after reconcile"
        );
        assert!(
            t.active().contains(&id.0),
            "{ctx}: {id} recorded active, FM says inactive"
        );
    }
}

#[test]
fn crash_at_every_step_of_prepare_and_unprepare_then_restart() {
    crash_at_every_step_of(lifecycle);
}

/// The same sweep in the plugin's order, where the `active` mark follows the
/// answer: a crash between the two leaves `activating`.
#[test]
fn crash_at_every_step_of_prepare_with_the_mark_after_the_answer_then_restart() {
    crash_at_every_step_of(lifecycle_mark_after);
}

fn crash_at_every_step_of(lifecycle: fn(&Engine, &Holder) -> Result<(), EngineError>) {
    // Steps of the whole lifecycle without a crash.
    let total = {
        let t = Hgx::new();
        let e = t.engine();
        lifecycle(&e, &claim("u1")).unwrap();
        e.steps()
    };
    assert!(total > 6, "{total}");
    for n in 1..=total {
        for retry_prepare in [false, true] {
            let ctx = format!("crash after step {n}, retry prepare {retry_prepare}");
            let t = Hgx::new();
            let h = claim("u1");
            {
                let e = t.engine_with(Some(n), t.fabric(FabricPolicy::Required, true));
                let r = lifecycle(&e, &h);
                assert!(
                    matches!(r, Err(EngineError::SimulatedCrash(_))),
                    "{ctx}: {r:?}"
                );
            }
            // Restart: reconcile the host, then the fabric.
            let e = t.engine();
            e.reconcile().unwrap();
            e.fabric_reconcile().unwrap();
            check_consistent(&t, &e, &ctx);
            // A second reconcile changes nothing.
            let before = (t.active(), ledger_partitions(&e));
            e.fabric_reconcile().unwrap();
            assert_eq!(
                before,
                (t.active(), ledger_partitions(&e)),
                "{ctx}: not a fixed point"
            );
            // The kubelet retries: prepare again (the pod still wants its VM)
            // or only unprepare (the pod is gone).
            if retry_prepare {
                prepare(&e, &h, &[M1, M3]).unwrap_or_else(|err| panic!("{ctx}: {err}"));
                assert_eq!(t.active(), BTreeSet::from([3]), "{ctx}");
                // The VM runs: a reconcile never deactivates under it.
                t.vm_holds(500, G1);
                e.fabric_reconcile().unwrap();
                assert_eq!(
                    t.active(),
                    BTreeSet::from([3]),
                    "{ctx}: deactivated under a VM"
                );
                assert!(e.fabric_deactivate(&h).is_err(), "{ctx}");
                t.vm_gone(500);
            }
            unprepare(&e, &h).unwrap_or_else(|err| panic!("{ctx}: {err}"));
            assert!(t.active().is_empty(), "{ctx}: partition leaked");
            assert!(
                e.ledger().fabric.partitions.is_empty(),
                "{ctx}: record left"
            );
        }
    }
}

#[test]
fn crash_at_every_step_of_fabric_reconcile_then_restart() {
    // Reconcile has work: an interrupted activation (record activating, FM
    // active), an interrupted release (record deactivating, FM active), and
    // an idle leak.
    let setup = |t: &Hgx| -> Engine {
        let e = t.engine();
        prepare(&e, &claim("b"), &[M2, M4]).unwrap();
        for b in [M1, M3] {
            e.configure(bdf(b), claim("a")).unwrap();
        }
        drop(e);
        // b's unprepare crashed right after its `deactivating` commit.
        let e = t.engine_with(Some(1), t.fabric(FabricPolicy::Required, true));
        assert!(e.fabric_deactivate(&claim("b")).is_err());
        drop(e);
        // a's prepare crashed after FM activated, before the `active` commit.
        let e = t.engine_with(Some(2), t.fabric(FabricPolicy::Required, true));
        assert!(e.fabric_activate(&claim("a"), &[bdf(M1), bdf(M3)]).is_err());
        drop(e);
        // And an idle leak nobody recorded.
        t.fm.with(|s| s.active.insert(PartitionId(5)));
        let e = t.engine();
        assert_eq!(
            ledger_partitions(&e),
            vec![
                (3, PartitionState::Activating),
                (4, PartitionState::Deactivating)
            ]
        );
        assert_eq!(t.active(), BTreeSet::from([3, 4, 5]));
        e
    };
    let total = {
        let t = Hgx::new();
        let e = setup(&t);
        let start = e.steps();
        e.fabric_reconcile().unwrap();
        e.steps() - start
    };
    assert!(total >= 4, "{total}");
    for n in 1..=total {
        let ctx = format!("reconcile crash after step {n}");
        let t = Hgx::new();
        {
            let e = setup(&t);
            drop(e);
            let e = t.engine_with(Some(n), t.fabric(FabricPolicy::Required, true));
            let r = e.fabric_reconcile();
            assert!(
                matches!(r, Err(EngineError::SimulatedCrash(_))),
                "{ctx}: {r:?}"
            );
        }
        let e = t.engine();
        e.fabric_reconcile().unwrap();
        check_consistent(&t, &e, &ctx);
        assert_eq!(t.active(), BTreeSet::from([3]), "{ctx}");
        let before = ledger_partitions(&e);
        e.fabric_reconcile().unwrap();
        assert_eq!(before, ledger_partitions(&e), "{ctx}: not a fixed point");
    }
}

#[test]
fn records_of_an_earlier_boot_are_dropped() {
    let t = Hgx::new();
    {
        let e = t.engine();
        prepare(&e, &claim("u1"), &[M1, M3]).unwrap();
    }
    std::fs::write(
        t.host.join("proc/sys/kernel/random/boot_id"),
        "00000000-0000-4000-8000-000000000001\n",
    )
    .unwrap();
    let (e, report) = Engine::open(
        Arc::new(t.kernel.clone()),
        &t.state,
        GpuSelector::default(),
        Policy::default(),
        EngineConfig {
            fabric: Some(t.fabric(FabricPolicy::Required, true)),
            ..EngineConfig::default()
        },
    )
    .unwrap();
    assert!(
        report
            .earlier_boot_records
            .iter()
            .any(|r| r.contains("fabric partition 3")),
        "{:?}",
        report.earlier_boot_records
    );
    assert!(e.ledger().fabric.partitions.is_empty());
    // The module map stays (a hint, re-verified by device id).
    assert_eq!(e.ledger().fabric.module_map.len(), 8);
}

#[test]
fn the_fabric_section_is_absent_without_a_fabric_and_kept_when_read() {
    use vfio_gpu_engine::ledger::{LedgerBody, decode, encode};
    let body = LedgerBody {
        boot_id: "b".into(),
        ..LedgerBody::default()
    };
    let text = String::from_utf8(encode(&body)).unwrap();
    assert!(!text.contains("fabric"), "{text}");
    // An empty section another version wrote survives a rewrite.
    let json = r#"{"bootId":"b","gpus":{},"nextOperation":0,"fabric":{}}"#;
    let sum = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(json.as_bytes()))
    };
    let bytes = format!("vfio-gpu-dra-ledger format=1 sha256={sum}\n{json}");
    let decoded = decode(bytes.as_bytes()).unwrap();
    let again = String::from_utf8(encode(&decoded)).unwrap();
    assert!(again.contains("\"fabric\""), "{again}");
    assert_eq!(decode(again.as_bytes()).unwrap(), decoded);
}

/// NVML as the engine sees it: module ids for GPUs on `nvidia`, optionally
/// slow, counting its calls.
struct FakeNvml {
    modules: std::collections::BTreeMap<Bdf, u32>,
    delay: std::time::Duration,
    calls: std::sync::atomic::AtomicUsize,
}

impl vfio_gpu_engine::ModuleIdReader for FakeNvml {
    fn module_id(&self, bdf: Bdf) -> Result<Option<vfio_gpu_fabric::ModuleId>, String> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(self.delay);
        Ok(self
            .modules
            .get(&bdf)
            .map(|m| vfio_gpu_fabric::ModuleId(*m)))
    }
}

impl Hgx {
    /// The demo host's module map, as NVML would read it.
    fn true_modules(&self) -> std::collections::BTreeMap<Bdf, u32> {
        let text = std::fs::read_to_string(self.host.join(HGX_MODULE_MAP_FILE)).unwrap();
        let m: std::collections::BTreeMap<String, u32> = serde_json::from_str(&text).unwrap();
        m.into_iter().map(|(k, v)| (bdf(&k), v)).collect()
    }

    fn nvml_fabric(&self, nvml: Arc<FakeNvml>, static_map: bool) -> FabricConfig {
        let mut c = self.fabric(FabricPolicy::Required, true);
        if !static_map {
            c.module_map_file = None;
        }
        c.module_ids = Some(nvml);
        c
    }
}

#[test]
fn nvml_module_ids_are_recorded_with_device_and_boot_id_and_outlive_the_move() {
    let t = Hgx::new();
    let nvml = Arc::new(FakeNvml {
        modules: t.true_modules(),
        delay: std::time::Duration::ZERO,
        calls: 0.into(),
    });
    let e = t.engine_with(None, t.nvml_fabric(nvml.clone(), false));
    e.fabric_reconcile().unwrap();
    let map = e.ledger().fabric.module_map;
    assert_eq!(map.len(), 8, "{map:?}");
    let m1 = &map[&bdf(M1)];
    assert_eq!(m1.module_id.0, 1);
    assert_eq!(m1.source, vfio_gpu_fabric::ModuleSource::Nvml);
    assert_eq!(m1.device_id, "0x2330");
    assert!(!m1.boot_id.is_empty());
    // Once on vfio NVML cannot read them; the ledger's entries carry the
    // claim. Confirmed in this boot, they are not asked for again: the
    // prepare makes no NVML call (it made one per GPU on nvidia, twice).
    let calls = || nvml.calls.load(std::sync::atomic::Ordering::SeqCst);
    let h = claim("u1");
    let before = calls();
    assert_eq!(prepare(&e, &h, &[M1, M3]).unwrap(), FabricAction::Activated);
    assert_eq!(t.active(), BTreeSet::from([3]));
    assert_eq!(calls() - before, 0, "the prepare asks NVML nothing");
    // A restart in the same boot asks nothing either.
    let before = calls();
    drop(e);
    let e = t.engine_with(None, t.nvml_fabric(nvml.clone(), false));
    e.fabric_reconcile().unwrap();
    assert_eq!(calls() - before, 0, "module ids of this boot are known");
    assert_eq!(e.ledger().fabric.module_map[&bdf(M1)].module_id.0, 1);
    // In a new boot (FM and the GPUs as they are; the test ends here) every entry is a hint again: NVML re-reads the six GPUs
    // on nvidia (never the two on vfio) and the entries of those six, and
    // only those, are this boot's.
    drop(e);
    let boot_id = t.host.join("proc/sys/kernel/random/boot_id");
    std::fs::write(&boot_id, "another-boot\n").unwrap();
    let before = calls();
    let e = t.engine_with(None, t.nvml_fabric(nvml.clone(), false));
    e.fabric_reconcile().unwrap();
    assert_eq!(
        calls() - before,
        6,
        "NVML is asked only about GPUs on nvidia"
    );
    let map = e.ledger().fabric.module_map;
    assert_eq!(map[&bdf(M1)].module_id.0, 1);
    let this_boot: BTreeSet<Bdf> = map
        .iter()
        .filter(|(_, r)| r.boot_id == "another-boot")
        .map(|(b, _)| *b)
        .collect();
    assert_eq!(this_boot.len(), 6, "{map:?}");
    assert!(!this_boot.contains(&bdf(M1)) && !this_boot.contains(&bdf(M3)));
}

#[test]
fn nvml_disagreeing_with_the_static_map_fails_before_any_host_change() {
    let t = Hgx::new();
    let mut modules = t.true_modules();
    modules.insert(bdf(M1), 2);
    modules.insert(bdf(M2), 1);
    let nvml = Arc::new(FakeNvml {
        modules,
        delay: std::time::Duration::ZERO,
        calls: 0.into(),
    });
    let e = t.engine_with(None, t.nvml_fabric(nvml, true));
    let err = prepare(&e, &claim("u1"), &[M1, M3])
        .unwrap_err()
        .to_string();
    assert!(err.contains("module map"), "{err}");
    assert!(err.contains("Nvml says module 2"), "{err}");
    assert!(e.ledger().gpus.is_empty(), "no GPU moved");
    assert!(t.active().is_empty());
}

#[test]
fn a_hung_nvml_read_is_cut_by_the_read_deadline() {
    let t = Hgx::new();
    let nvml = Arc::new(FakeNvml {
        modules: t.true_modules(),
        delay: std::time::Duration::from_secs(3),
        calls: 0.into(),
    });
    let mut config = t.nvml_fabric(nvml, true);
    config.policy = FabricPolicy::Required;
    let engine_config = EngineConfig {
        read_deadline: std::time::Duration::from_millis(100),
        state_lock_wait: std::time::Duration::from_secs(5),
        fabric: Some(config),
        ..EngineConfig::default()
    };
    let e = Engine::open(
        Arc::new(t.kernel.clone()),
        &t.state,
        GpuSelector::default(),
        Policy::default(),
        engine_config,
    )
    .unwrap()
    .0;
    let start = std::time::Instant::now();
    e.fabric_reconcile().unwrap();
    // Eight GPUs × 3 s unbounded; bounded, each read gives up after 100 ms
    // (later reads of a quarantined GPU are refused at once).
    assert!(
        start.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // The static map still resolves every GPU.
    let map = e.ledger().fabric.module_map;
    assert_eq!(
        map[&bdf(M1)].source,
        vfio_gpu_fabric::ModuleSource::AdminMap
    );
}

/// A ConnectX-7 function in M1's IOMMU group, with or without the NVLink
/// management mark in its VPD.
fn add_cx7(t: &Hgx, mark: &[u8]) {
    let mut h = vfio_gpu_host::fixture::FixtureHost::open(&t.host);
    let vpd = vfio_gpu_host::vpd::encode_vpd(
        "NVIDIA ConnectX-7",
        &[("PN", b"MCX750500B-0D00"), ("V3", mark), ("RV", &[0])],
    );
    h.add_function(
        &FunctionSpec::new(bdf("0000:9b:00.0"), 0x15b3, 0x1021, 0x020700)
            .driver("mlx5_core")
            .group(G1)
            .vpd(vpd),
    )
    .unwrap();
}

fn engine_allowing_foreign_members(t: &Hgx) -> Engine {
    let config = EngineConfig {
        state_lock_wait: std::time::Duration::from_secs(5),
        fabric: Some(t.fabric(FabricPolicy::Required, true)),
        ..EngineConfig::default()
    };
    let mut policy = Policy::default();
    policy.binding.allow_foreign_group_members = true;
    Engine::open(
        Arc::new(t.kernel.clone()),
        &t.state,
        GpuSelector::default(),
        policy,
        config,
    )
    .unwrap()
    .0
}

#[test]
fn an_nvlink_management_bridge_in_the_group_blocks_the_move_even_when_foreign_members_may_move() {
    let t = Hgx::new();
    add_cx7(&t, b"SW_MNG");
    let e = engine_allowing_foreign_members(&t);
    let (views, _) = e.discover().unwrap();
    let m1 = views.iter().find(|v| v.gpu.bdf() == bdf(M1)).unwrap();
    let cx7 = m1
        .gpu
        .iommu_group_members
        .iter()
        .find(|m| m.bdf == bdf("0000:9b:00.0"))
        .unwrap();
    assert_eq!(cx7.role, vfio_gpu_host::FunctionRole::NvSwitch);
    let err = e.configure(bdf(M1), claim("u1")).unwrap_err();
    assert!(
        matches!(err, EngineError::FabricSwitchInGroup { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("SW_MNG"), "{err}");
    assert!(e.ledger().gpus.is_empty(), "nothing moved");
}

#[test]
fn an_ordinary_connectx_in_the_group_follows_the_foreign_member_policy() {
    let t = Hgx::new();
    add_cx7(&t, b"ETH");
    let e = engine_allowing_foreign_members(&t);
    let (views, _) = e.discover().unwrap();
    let m1 = views.iter().find(|v| v.gpu.bdf() == bdf(M1)).unwrap();
    let cx7 = m1
        .gpu
        .iommu_group_members
        .iter()
        .find(|m| m.bdf == bdf("0000:9b:00.0"))
        .unwrap();
    assert_eq!(cx7.role, vfio_gpu_host::FunctionRole::Foreign);
    e.configure(bdf(M1), claim("u1")).unwrap();
}

/// NVML as on a real host: answers only for GPUs bound to `nvidia` (read
/// from the host tree), and remembers which GPUs it was asked about.
struct HostNvml {
    host: PathBuf,
    modules: std::collections::BTreeMap<Bdf, u32>,
    seen_on_nvidia: std::sync::Mutex<Vec<Bdf>>,
}

impl vfio_gpu_engine::ModuleIdReader for HostNvml {
    fn module_id(&self, bdf: Bdf) -> Result<Option<vfio_gpu_fabric::ModuleId>, String> {
        let link = self.host.join(format!("sys/bus/pci/devices/{bdf}/driver"));
        let driver = std::fs::read_link(&link).map_err(|e| e.to_string())?;
        if driver.file_name().is_none_or(|n| n != "nvidia") {
            return Err(format!("NVML_ERROR_NOT_FOUND: {bdf} is not on nvidia"));
        }
        self.seen_on_nvidia.lock().unwrap().push(bdf);
        Ok(self
            .modules
            .get(&bdf)
            .map(|m| vfio_gpu_fabric::ModuleId(*m)))
    }
}

impl Hgx {
    /// `gpu` on vfio-pci since boot (no record of ours), no static map entry.
    fn on_vfio_since_boot(&self, gpu: &str) {
        let h = vfio_gpu_host::fixture::FixtureHost::open(&self.host);
        h.unlink_driver(bdf(gpu)).unwrap();
        h.link_driver(bdf(gpu), "vfio-pci").unwrap();
        h.add_vfio_dev(bdf(gpu)).unwrap();
        let group = std::fs::read_link(
            self.host
                .join(format!("sys/bus/pci/devices/{gpu}/iommu_group")),
        )
        .unwrap();
        let node = self.host.join("dev/vfio").join(group.file_name().unwrap());
        if !node.exists() {
            std::fs::write(node, "").unwrap();
        }
    }

    fn learn_fabric(&self) -> (FabricConfig, Arc<HostNvml>) {
        let nvml = Arc::new(HostNvml {
            host: self.host.clone(),
            modules: self.true_modules(),
            seen_on_nvidia: Default::default(),
        });
        let mut c = self.fabric(FabricPolicy::Required, true);
        c.module_map_file = None;
        c.module_ids = Some(nvml.clone());
        (c, nvml)
    }

    fn driver_of(&self, gpu: &str) -> String {
        std::fs::read_link(self.host.join(format!("sys/bus/pci/devices/{gpu}/driver")))
            .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

#[test]
fn learn_reads_a_vfio_gpus_module_id_on_nvidia_and_puts_it_back() {
    let t = Hgx::new();
    t.on_vfio_since_boot(M1);
    let (fc, nvml) = t.learn_fabric();
    let e = t.engine_with(None, fc);
    // Before: no module id for M1, so a claim naming it fails.
    e.fabric_reconcile().unwrap();
    assert!(!e.ledger().fabric.module_map.contains_key(&bdf(M1)));
    let err = e
        .fabric_preflight(&claim("u1"), &[bdf(M1), bdf(M3)])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no module id known for 0000:9a:00.0"),
        "{err}"
    );
    let out = e.fabric_learn(bdf(M1)).unwrap();
    assert!(out.visited_nvidia);
    assert_eq!(out.module_id.map(|m| m.0), Some(1));
    assert!(
        nvml.seen_on_nvidia.lock().unwrap().contains(&bdf(M1)),
        "read while on nvidia"
    );
    assert_eq!(t.driver_of(M1), "vfio-pci", "back on vfio");
    let ledger = e.ledger();
    assert!(ledger.fabric.learning.is_none());
    assert!(ledger.gpus.is_empty(), "no GPU record left behind");
    let rec = &ledger.fabric.module_map[&bdf(M1)];
    assert_eq!(
        (rec.module_id.0, rec.source),
        (1, vfio_gpu_fabric::ModuleSource::Nvml)
    );
    // Now the claim resolves to partition 3.
    let plan = e
        .fabric_preflight(&claim("u1"), &[bdf(M1), bdf(M3)])
        .unwrap();
    assert_eq!(
        plan.partitions.keys().map(|p| p.0).collect::<Vec<_>>(),
        vec![3]
    );
    // A GPU on nvidia is read in place.
    let out = e.fabric_learn(bdf(M2)).unwrap();
    assert!(!out.visited_nvidia);
    assert_eq!(t.driver_of(M2), "nvidia");
}

#[test]
fn learn_refuses_a_held_gpu_and_an_open_group_changing_nothing() {
    let t = Hgx::new();
    t.on_vfio_since_boot(M1);
    let (fc, _) = t.learn_fabric();
    let e = t.engine_with(None, fc);
    e.configure(bdf(M3), claim("u1")).unwrap();
    let before = e.ledger();
    let err = e.fabric_learn(bdf(M3)).unwrap_err().to_string();
    assert!(
        err.contains("refused") && err.contains("release it first"),
        "{err}"
    );
    // A VM has M1's group open (outside Kubernetes).
    t.vm_holds(4242, G1);
    let err = e.fabric_learn(bdf(M1)).unwrap_err().to_string();
    assert!(err.contains("holds its VFIO group"), "{err}");
    assert_eq!(t.driver_of(M1), "vfio-pci");
    assert_eq!(t.driver_of(M3), "vfio-pci");
    let after = e.ledger();
    assert_eq!(after.gpus, before.gpus);
    assert_eq!(after.fabric, before.fabric);
}

#[test]
fn a_crash_at_every_step_of_learn_is_finished_by_the_next_reconcile() {
    let mut crashed_at = 0;
    for n in 1.. {
        let t = Hgx::new();
        t.on_vfio_since_boot(M1);
        let (fc, _) = t.learn_fabric();
        let e = t.engine_with(Some(n), fc);
        match e.fabric_learn(bdf(M1)) {
            Ok(_) => break,
            Err(EngineError::SimulatedCrash(_)) => crashed_at = n,
            Err(other) => panic!("step {n}: {other}"),
        }
        drop(e);
        let (fc, _) = t.learn_fabric();
        let e = t.engine_with(None, fc);
        e.fabric_reconcile().unwrap();
        let ledger = e.ledger();
        assert_eq!(
            t.driver_of(M1),
            "vfio-pci",
            "crash after step {n}: back on vfio"
        );
        assert!(ledger.fabric.learning.is_none(), "crash after step {n}");
        assert!(
            ledger.gpus.is_empty(),
            "crash after step {n}: no GPU record"
        );
        // And the learn can simply be run again.
        let out = e.fabric_learn(bdf(M1)).unwrap();
        assert_eq!(out.module_id.map(|m| m.0), Some(1), "crash after step {n}");
        assert_eq!(t.driver_of(M1), "vfio-pci");
    }
    assert!(
        crashed_at >= 5,
        "the sweep covered the visit ({crashed_at} steps)"
    );
}

#[test]
fn an_activating_record_whose_holder_holds_the_gpus_is_activated_by_reconcile() {
    let t = Hgx::new();
    let e = t.engine();
    let h = claim("u1");
    assert_eq!(prepare(&e, &h, &[M1, M3]).unwrap(), FabricAction::Activated);
    drop(e);
    // On file after the prepare: `active` (the CLI's readers see it).
    let e = t.engine();
    assert_eq!(ledger_partitions(&e), vec![(3, PartitionState::Active)]);
    drop(e);
    // FM forgets it and the record is left `activating` (a crash between the
    // write-ahead record and the call, or FM restarting without replay while
    // the claim's VM runs): the claim holds both GPUs, so reconcile activates
    // it rather than dropping the record.
    t.fm.with(|s| s.active.clear());
    let file = vfio_gpu_engine::ledger::LedgerFile::new(&t.state).unwrap();
    let (mut body, problem) = file.load();
    assert!(problem.is_none(), "{problem:?}");
    body.fabric
        .partitions
        .get_mut(&vfio_gpu_fabric::PartitionId(3))
        .unwrap()
        .state = PartitionState::Activating;
    file.store(&body).unwrap();
    drop(file);
    let e = t.engine();
    let out = e.fabric_reconcile().unwrap();
    assert!(
        out.iter().any(|o| o.action == FabricAction::Finished),
        "{out:?}"
    );
    assert_eq!(ledger_partitions(&e), vec![(3, PartitionState::Active)]);
    assert_eq!(t.active(), BTreeSet::from([3]));
}

/// The plugin answers the kubelet before the `active` mark: until it is
/// written the record says `activating` while FM has the partition, which
/// every decision treats as active; the mark lands only on the record it
/// was taken for.
#[test]
fn the_active_mark_after_the_answer_lands_only_on_its_own_record() {
    let t = Hgx::new();
    let e = t.engine();
    let h = claim("u1");
    let bdfs = [bdf(M1), bdf(M3)];
    e.fabric_preflight(&h, &bdfs).unwrap();
    for b in bdfs {
        e.configure(b, h.clone()).unwrap();
    }
    let first = e.fabric_activate_mark_later(&h, &bdfs).unwrap();
    assert_eq!(first.action, FabricAction::Activated);
    assert_eq!(t.active(), BTreeSet::from([3]));
    assert_eq!(ledger_partitions(&e), vec![(3, PartitionState::Activating)]);
    assert_eq!(first.unmarked.len(), 1);
    assert_eq!(first.unmarked[0].partition, PartitionId(3));
    // A retried prepare before the mark: active for this holder, nothing new.
    let again = e.fabric_activate_mark_later(&h, &bdfs).unwrap();
    assert!(again.unmarked.is_empty(), "{again:?}");
    // The kubelet unprepares before the mark is written: the mark finds no
    // record and writes nothing.
    unprepare(&e, &h).unwrap();
    let writes = e.ledger_writes();
    e.fabric_mark_active(&first.unmarked).unwrap();
    assert_eq!(e.ledger_writes(), writes, "a mark without its record wrote");
    assert!(e.ledger().fabric.partitions.is_empty());
    assert!(t.active().is_empty());
    // The partition again, for another claim: the first mark is stale.
    let h2 = claim("u2");
    e.fabric_preflight(&h2, &bdfs).unwrap();
    for b in bdfs {
        e.configure(b, h2.clone()).unwrap();
    }
    let second = e.fabric_activate_mark_later(&h2, &bdfs).unwrap();
    e.fabric_mark_active(&first.unmarked).unwrap();
    assert_eq!(ledger_partitions(&e), vec![(3, PartitionState::Activating)]);
    e.fabric_mark_active(&second.unmarked).unwrap();
    assert_eq!(ledger_partitions(&e), vec![(3, PartitionState::Active)]);
    // A plugin that dies before its mark: the restart's reconcile writes it.
    let h3 = claim("u3");
    let (m2, m4) = (bdf(M2), bdf(M4));
    e.fabric_preflight(&h3, &[m2, m4]).unwrap();
    e.configure(m2, h3.clone()).unwrap();
    e.configure(m4, h3.clone()).unwrap();
    let third = e.fabric_activate_mark_later(&h3, &[m2, m4]).unwrap();
    assert_eq!(third.unmarked[0].partition, PartitionId(4));
    drop(e);
    let e = t.engine();
    assert_eq!(
        ledger_partitions(&e),
        vec![(3, PartitionState::Active), (4, PartitionState::Activating)]
    );
    let out = e.fabric_reconcile().unwrap();
    assert!(
        out.iter()
            .any(|o| o.action == FabricAction::Finished && o.partitions == [PartitionId(4)]),
        "{out:?}"
    );
    assert_eq!(
        ledger_partitions(&e),
        vec![(3, PartitionState::Active), (4, PartitionState::Active)]
    );
    assert_eq!(t.active(), BTreeSet::from([3, 4]));
}

/// The partition's write-ahead record rides with the commit that completes
/// the claim's last GPU move: absent while a GPU is still to move, there
/// (`activating`, this holder) once both are, and the activation then
/// calls FM with no ledger write of its own.
#[test]
fn the_partition_record_rides_with_the_last_move_and_the_activation_writes_none() {
    let t = Hgx::new();
    let e = t.engine();
    // Start-up's reconcile learns the module map (a first activation in a
    // boot writes it with its own record).
    e.fabric_reconcile().unwrap();
    let h = claim("u1");
    let bdfs = [bdf(M1), bdf(M3)];
    let plan = e.fabric_preflight(&h, &bdfs).unwrap();
    {
        let _ride = e.fabric_ride(&plan);
        e.configure(bdfs[0], h.clone()).unwrap();
        assert!(
            ledger_partitions(&e).is_empty(),
            "a record landed before the claim's last move"
        );
        let writes = e.ledger_writes();
        e.configure(bdfs[1], h.clone()).unwrap();
        let ledger = e.ledger();
        let rec = &ledger.fabric.partitions[&PartitionId(3)];
        assert_eq!(rec.state, PartitionState::Activating);
        assert_eq!(rec.holder.as_ref(), Some(&h));
        assert_eq!(rec.bdfs, bdfs.to_vec());
        // The last move's write-ahead and completion commits, nothing more.
        assert_eq!(e.ledger_writes(), writes + 2);
    }
    let writes = e.ledger_writes();
    let o = e.fabric_activate_mark_later(&h, &bdfs).unwrap();
    assert_eq!(o.action, FabricAction::Activated);
    assert_eq!(
        e.ledger_writes(),
        writes,
        "the activation wrote its own record"
    );
    assert_eq!(t.active(), BTreeSet::from([3]));
    assert_eq!(o.unmarked.len(), 1);
    e.fabric_mark_active(&o.unmarked).unwrap();
    assert_eq!(
        e.ledger().fabric.partitions[&PartitionId(3)].state,
        PartitionState::Active
    );
}

/// A ride whose claim does not complete never lands: a failed move (rolled
/// back) or a guard dropped before the last move leaves no record, and the
/// activation after a later complete prepare writes its own.
#[test]
fn a_ride_lands_only_when_every_move_of_the_claim_succeeds() {
    use vfio_gpu_engine::kernel::WriteKind;
    use vfio_gpu_engine::sim::{Fault, FaultAction};
    let t = Hgx::new();
    let e = t.engine();
    let h = claim("u1");
    let bdfs = [bdf(M1), bdf(M3)];
    let plan = e.fabric_preflight(&h, &bdfs).unwrap();
    t.kernel.inject(Fault::on(
        WriteKind::Bind,
        bdfs[1],
        FaultAction::Fail(libc::EIO),
    ));
    {
        let _ride = e.fabric_ride(&plan);
        e.configure(bdfs[0], h.clone()).unwrap();
        assert!(e.configure(bdfs[1], h.clone()).is_err());
    }
    assert!(
        ledger_partitions(&e).is_empty(),
        "a failed claim recorded its partition"
    );
    t.kernel.clear_faults();
    // The guard is gone: a later move completes the claim without a ride.
    e.configure(bdfs[1], h.clone()).unwrap();
    assert!(ledger_partitions(&e).is_empty(), "a withdrawn ride landed");
    let writes = e.ledger_writes();
    assert_eq!(
        e.fabric_activate(&h, &bdfs).unwrap().action,
        FabricAction::Activated
    );
    assert!(
        e.ledger_writes() > writes,
        "no write-ahead record before FM's call"
    );
    assert_eq!(t.active(), BTreeSet::from([3]));
}

/// The plugin's prepare of M1 + M3 for `h`, with `between` run before its
/// activation: the activation's result and FM's calls during it.
fn calls_of_planned_activation(
    t: &Hgx,
    e: &Engine,
    h: &Holder,
    between: impl FnOnce(),
) -> (
    Result<FabricAction, EngineError>,
    Vec<vfio_gpu_fabric::Call>,
) {
    let bdfs = [bdf(M1), bdf(M3)];
    let plan = e.fabric_preflight(h, &bdfs).unwrap();
    {
        let _ride = e.fabric_ride(&plan);
        for b in bdfs {
            e.configure(b, h.clone()).unwrap();
        }
    }
    between();
    let from = t.fm.state().log.len();
    let r = e.fabric_activate_planned(h, &bdfs, &plan).map(|o| o.action);
    // Sessions aside (FM is connected per operation).
    let calls = t.fm.state().log[from..]
        .iter()
        .map(|l| l.call)
        .filter(|c| {
            !matches!(
                c,
                vfio_gpu_fabric::Call::Connect | vfio_gpu_fabric::Call::Disconnect
            )
        })
        .collect();
    (r, calls)
}

/// The plugin's activation after a landed ride is FM's one activate call:
/// no second listing and no ledger write. A plan made before another FM
/// call of this engine (here a deactivation) is stale: the full
/// activation lists FM again, and still activates.
#[test]
fn a_planned_activation_calls_fm_once_unless_its_plan_went_stale() {
    use vfio_gpu_fabric::Call;
    let t = Hgx::new();
    let e = t.engine();
    e.fabric_reconcile().unwrap();
    let h = claim("u1");
    let writes = std::cell::Cell::new(0);
    let (r, calls) = calls_of_planned_activation(&t, &e, &h, || writes.set(e.ledger_writes()));
    assert_eq!(r.unwrap(), FabricAction::Activated);
    assert_eq!(calls, vec![Call::Activate]);
    assert_eq!(e.ledger_writes(), writes.get(), "the activation wrote");
    assert_eq!(t.active(), BTreeSet::from([3]));
    unprepare(&e, &h).unwrap();

    // Stale: another claim's partition came and went after the preflight.
    let other = claim("u2");
    let (r, calls) = calls_of_planned_activation(&t, &e, &h, || {
        prepare(&e, &other, &[M2, M4]).unwrap();
        unprepare(&e, &other).unwrap();
    });
    assert_eq!(r.unwrap(), FabricAction::Activated);
    assert_eq!(calls, vec![Call::GetSupportedPartitions, Call::Activate]);
    assert_eq!(t.active(), BTreeSet::from([3]));
}

/// FM refusing the planned activation: the landed record goes (FM says the
/// partition is inactive) and the error names the partition.
#[test]
fn a_refused_planned_activation_drops_the_landed_record() {
    let t = Hgx::new();
    let e = t.engine();
    e.fabric_reconcile().unwrap();
    let h = claim("u1");
    let (r, _) = calls_of_planned_activation(&t, &e, &h, || {
        t.fm.with(|s| {
            s.faults.push(vfio_gpu_fabric::Fault {
                call: vfio_gpu_fabric::Call::Activate,
                action: vfio_gpu_fabric::FaultAction::Return(FmCode::NvlinkError.raw()),
                times: Some(1),
            });
        });
    });
    let err = r.unwrap_err().to_string();
    assert!(err.contains("activating partition 3"), "{err}");
    assert!(
        ledger_partitions(&e).is_empty(),
        "{:?}",
        ledger_partitions(&e)
    );
    assert!(t.active().is_empty());
}
