#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! Model-based property test of NVLink partitions (reference
//! `fabric-manager.md` §11, "Property"): random sequences of prepares,
//! unprepares, VMs starting and stopping, force-deleted VMs, crashes at any
//! mutation step followed by a restart, and Fabric Manager restarts (with
//! and without `--restart`), on the HGX demo host with a simulated FM. The
//! invariants are checked against the simulated FM's state and the
//! simulated sysfs, never against the ledger:
//!
//! - P1: no two partitions FM has active share a GPU.
//! - P2: a partition with an open VFIO group (a running VM) is never
//!   deactivated, except by an FM restart.
//! - P3: every GPU of an FM-active partition is on vfio (a partition never
//!   outlives its GPUs' return to `nvidia`), unless FM was restarted.
//! - P4: a claim whose prepare succeeded has exactly its partition active in
//!   FM (after a reconcile with FM running).
//! - P5 (at rest: FM running, every crashed or failed prepare given up, every
//!   stopped claim unprepared, a reconcile): FM's active set is exactly the
//!   partitions of the prepared claims: nothing leaked, nothing lost.
//!
//! The plugin is one long-lived engine (the resiliency agent); a crash runs
//! the one operation on an engine with `crash_after_step`, then a fresh
//! engine reconciles as `serve` does at start. `FABRIC_MODEL_CASES` (default
//! 16, about a minute in debug) cases from a fixed seed; `FABRIC_MODEL_SEED=random` for a search.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{
    CrashMode, Engine, EngineConfig, EngineError, FabricConfig, Holder, StateLockMode,
};
use vfio_gpu_fabric::{ManualClock, Platform, SimFabricManager, SimState};
use vfio_gpu_host::demo::{HGX_MODULE_MAP_FILE, build_hgx_demo_host};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;

/// The claims: each a fixed GPU set. 0: modules {1,3} (partition 3);
/// 1: {2,4} (partition 4); 2: {1,2,3,4} (partition 1); 3: {5} (a 1-GPU
/// partition); 4: {1,2}, no partition (always refused).
const CLAIMS: [&[&str]; 5] = [
    &["0000:9a:00.0", "0000:ab:00.0"],
    &["0000:ba:00.0", "0000:db:00.0"],
    &[
        "0000:9a:00.0",
        "0000:ab:00.0",
        "0000:ba:00.0",
        "0000:db:00.0",
    ],
    &["0000:18:00.0"],
    &["0000:9a:00.0", "0000:ba:00.0"],
];

#[derive(Clone, Debug)]
enum Op {
    Prepare(usize),
    Unprepare(usize),
    StartVm(usize),
    StopVm(usize),
    /// The VM is gone and the kubelet unprepares (a force-deleted pod).
    ForceDelete(usize),
    /// The plugin dies after `step` mutations of a prepare (true) or an
    /// unprepare (false), and restarts.
    Crash(usize, bool, u64),
    /// FM restarts: with `--restart` (true) or normally (false).
    FmRestart(bool),
    Reconcile,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..CLAIMS.len()).prop_map(Op::Prepare),
        3 => (0..CLAIMS.len()).prop_map(Op::Unprepare),
        2 => (0..CLAIMS.len()).prop_map(Op::StartVm),
        2 => (0..CLAIMS.len()).prop_map(Op::StopVm),
        1 => (0..CLAIMS.len()).prop_map(Op::ForceDelete),
        3 => (0..CLAIMS.len(), any::<bool>(), 1..14u64).prop_map(|(c, p, s)| Op::Crash(c, p, s)),
        1 => any::<bool>().prop_map(Op::FmRestart),
        1 => Just(Op::Reconcile),
    ]
}

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

fn holder(c: usize) -> Holder {
    Holder::Claim {
        uid: format!("uid-{c}"),
        namespace: "vms".into(),
        name: format!("vm-{c}"),
    }
}

struct World {
    _dir: tempfile::TempDir,
    host: PathBuf,
    state: PathBuf,
    kernel: SimKernel,
    fm: Arc<SimFabricManager>,
    clock: ManualClock,
    serve: Engine,
    /// Claims whose last prepare succeeded (the kubelet's view).
    prepared: BTreeSet<usize>,
    /// Claims whose prepare failed or crashed and was not yet given up.
    failed: BTreeSet<usize>,
    /// Claims whose unprepare crashed: the kubelet retries the unprepare
    /// (their partition may already be gone: the unprepare had begun).
    unpreparing: BTreeSet<usize>,
    /// Claims with a running VM (a process holding their VFIO groups).
    vms: BTreeSet<usize>,
    /// GPU → module id (the demo's true map).
    modules: BTreeMap<Bdf, u32>,
    /// FM was restarted since the last reconcile with FM running.
    fm_restarted: bool,
}

impl World {
    fn new() -> World {
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
        let text = std::fs::read_to_string(host.join(HGX_MODULE_MAP_FILE)).unwrap();
        let modules: BTreeMap<String, u32> = serde_json::from_str(&text).unwrap();
        let state = dir.path().join("state");
        let w = World {
            serve: open(&kernel, &state, &fm, &host, None),
            _dir: dir,
            host,
            state,
            kernel,
            fm,
            clock,
            prepared: BTreeSet::new(),
            failed: BTreeSet::new(),
            unpreparing: BTreeSet::new(),
            vms: BTreeSet::new(),
            modules: modules.into_iter().map(|(k, v)| (bdf(&k), v)).collect(),
            fm_restarted: false,
        };
        w.serve.fabric_reconcile().unwrap();
        w
    }

    fn engine(&self, crash: Option<u64>) -> Engine {
        open(&self.kernel, &self.state, &self.fm, &self.host, crash)
    }

    fn restart_serve(&mut self) {
        self.serve = self.engine(None);
        let _ = self.serve.reconcile();
        let _ = self.serve.fabric_reconcile();
    }

    fn group(&self, gpu: Bdf) -> String {
        let link = self
            .host
            .join(format!("sys/bus/pci/devices/{gpu}/iommu_group"));
        std::fs::read_link(link)
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    fn vm_pid(c: usize) -> u32 {
        5000 + c as u32
    }

    fn start_vm(&mut self, c: usize) {
        if !self.prepared.contains(&c) || self.vms.contains(&c) {
            return;
        }
        let pid = Self::vm_pid(c);
        let fd = self.host.join(format!("proc/{pid}/fd"));
        std::fs::create_dir_all(&fd).unwrap();
        std::fs::write(self.host.join(format!("proc/{pid}/comm")), "qemu-kvm\n").unwrap();
        for (i, g) in CLAIMS[c].iter().enumerate() {
            let node = self.host.join(format!("dev/vfio/{}", self.group(bdf(g))));
            symlink(&node, fd.join(format!("{}", 20 + i))).unwrap();
        }
        self.vms.insert(c);
    }

    fn stop_vm(&mut self, c: usize) {
        if self.vms.remove(&c) {
            std::fs::remove_dir_all(self.host.join(format!("proc/{}", Self::vm_pid(c)))).unwrap();
        }
    }

    fn driver(&self, gpu: Bdf) -> String {
        std::fs::read_link(self.host.join(format!("sys/bus/pci/devices/{gpu}/driver")))
            .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// FM's active partitions and their module sets (the simulated FM's
    /// state, not the ledger).
    fn fm_active(&self) -> BTreeMap<u32, BTreeSet<u32>> {
        let s = self.fm.state();
        let list = s.list();
        s.active
            .iter()
            .map(|p| {
                let modules = list
                    .get(*p)
                    .map(|part| part.modules().map(|m| m.0).collect())
                    .unwrap_or_default();
                (p.0, modules)
            })
            .collect()
    }

    fn claim_modules(&self, c: usize) -> BTreeSet<u32> {
        CLAIMS[c].iter().map(|g| self.modules[&bdf(g)]).collect()
    }

    /// The GPUs (by module) a running VM holds.
    fn vm_modules(&self) -> BTreeSet<u32> {
        self.vms
            .iter()
            .flat_map(|c| self.claim_modules(*c))
            .collect()
    }
}

impl World {
    /// The kubelet is done with claim `c`.
    fn forget(&mut self, c: usize) {
        self.prepared.remove(&c);
        self.failed.remove(&c);
        self.unpreparing.remove(&c);
    }
}

fn open(
    kernel: &SimKernel,
    state: &std::path::Path,
    fm: &Arc<SimFabricManager>,
    host: &std::path::Path,
    crash: Option<u64>,
) -> Engine {
    let mut fabric = FabricConfig::new(fm.clone());
    fabric.resiliency_agent = true;
    fabric.module_map_file = Some(host.join(HGX_MODULE_MAP_FILE));
    let config = EngineConfig {
        crash_mode: CrashMode::Return,
        crash_after_step: crash,
        unbind_lock_backoff: std::time::Duration::from_millis(1),
        state_lock_wait: std::time::Duration::from_secs(5),
        // Like serve during a rolling update: the crashing engine and serve
        // share the state directory.
        state_lock_mode: StateLockMode::PerOperation,
        fabric: Some(fabric),
        ..EngineConfig::default()
    };
    Engine::open(
        Arc::new(kernel.clone()),
        state,
        GpuSelector::default(),
        Policy::default(),
        config,
    )
    .unwrap()
    .0
}

/// The plugin's prepare: preflight, every GPU to vfio (the partition's
/// `activating` record riding with the last move's commit), activate; on failure
/// the partition and the GPUs this call moved are undone. The partition's
/// `active` mark comes after the answer, as the plugin writes it (a crash
/// step can fall between the two).
fn prepare(e: &Engine, c: usize) -> Result<(), EngineError> {
    let h = holder(c);
    let bdfs: Vec<Bdf> = CLAIMS[c].iter().map(|g| bdf(g)).collect();
    let plan = e.fabric_preflight(&h, &bdfs)?;
    let already = e.held_by(&h);
    let mut failed = None;
    {
        // The partition's record rides with the last move's commit.
        let _ride = e.fabric_ride(&plan);
        for b in &bdfs {
            if let Err(err) = e.configure(*b, h.clone()) {
                failed = Some(err);
                break;
            }
        }
    }
    let mut unmarked = Vec::new();
    if failed.is_none() {
        match e.fabric_activate_planned(&h, &bdfs, &plan) {
            Ok(o) => unmarked = o.unmarked,
            Err(err) => failed = Some(err),
        }
    }
    match failed {
        None => e.fabric_mark_active(&unmarked),
        Some(err @ EngineError::SimulatedCrash(_)) => Err(err),
        Some(err) => {
            let _ = e.fabric_deactivate(&h);
            for b in e.held_by(&h).into_iter().filter(|b| !already.contains(b)) {
                let _ = e.unconfigure(b, Some(&h));
            }
            Err(err)
        }
    }
}

/// The plugin's unprepare: the partition first (refused while a VM runs),
/// then the GPUs.
fn unprepare(e: &Engine, c: usize) -> Result<(), EngineError> {
    let h = holder(c);
    e.fabric_deactivate(&h)?;
    for b in e.held_by(&h) {
        e.unconfigure(b, Some(&h))?;
    }
    Ok(())
}

impl World {
    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let vm_held_before: BTreeMap<u32, BTreeSet<u32>> = {
            let held = self.vm_modules();
            self.fm_active()
                .into_iter()
                .filter(|(_, m)| !m.is_disjoint(&held))
                .collect()
        };
        match op {
            // The kubelet never prepares a claim it is unpreparing.
            Op::Prepare(c) if self.unpreparing.contains(c) => {}
            Op::Prepare(c) => match prepare(&self.serve, *c) {
                Ok(()) => {
                    self.prepared.insert(*c);
                    self.failed.remove(c);
                }
                Err(_) => {
                    if !self.prepared.contains(c) {
                        self.failed.insert(*c);
                    }
                }
            },
            Op::Unprepare(c) => {
                if (self.prepared.contains(c)
                    || self.failed.contains(c)
                    || self.unpreparing.contains(c))
                    && unprepare(&self.serve, *c).is_ok()
                {
                    self.forget(*c);
                }
            }
            Op::StartVm(c) => self.start_vm(*c),
            Op::StopVm(c) => self.stop_vm(*c),
            Op::ForceDelete(c) => {
                self.stop_vm(*c);
                if unprepare(&self.serve, *c).is_ok() {
                    self.forget(*c);
                }
            }
            Op::Crash(c, is_prepare, step) => {
                let e = self.engine(Some(*step));
                let r = if *is_prepare {
                    if self.unpreparing.contains(c) {
                        return Ok(());
                    }
                    prepare(&e, *c)
                } else if self.prepared.contains(c)
                    || self.failed.contains(c)
                    || self.unpreparing.contains(c)
                {
                    unprepare(&e, *c)
                } else {
                    Ok(())
                };
                drop(e);
                match (r, *is_prepare) {
                    (Ok(()), true) => {
                        self.prepared.insert(*c);
                        self.failed.remove(c);
                    }
                    (Ok(()), false) => self.forget(*c),
                    // A crashed unprepare: the kubelet retries it.
                    (Err(EngineError::SimulatedCrash(_)), false) => {
                        self.prepared.remove(c);
                        self.failed.remove(c);
                        self.unpreparing.insert(*c);
                    }
                    // Refused before any change (a VM runs): still prepared.
                    (Err(_), false) => {}
                    (Err(_), true) => {
                        if !self.prepared.contains(c) {
                            self.failed.insert(*c);
                        }
                    }
                }
                self.restart_serve();
            }
            Op::FmRestart(resilient) => {
                let now = self.fm.now_ms();
                if *resilient {
                    self.fm.with(|s| s.restart_resilient(now));
                } else {
                    self.fm.with(|s| s.start(now, std::time::Duration::ZERO));
                }
                self.fm_restarted = true;
                // The plugin's watch replays at once (the agent).
                let _ = self.serve.fabric_watch();
            }
            Op::Reconcile => {
                let _ = self.serve.reconcile();
                if self.serve.fabric_reconcile().is_ok() {
                    self.fm_restarted = false;
                }
            }
        }
        self.check(op, &vm_held_before)
    }

    fn check(&self, op: &Op, vm_held_before: &BTreeMap<u32, BTreeSet<u32>>) -> Result<(), String> {
        let active = self.fm_active();
        // P1
        let ids: Vec<&u32> = active.keys().collect();
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                if !active[*a].is_disjoint(&active[*b]) {
                    return Err(format!("P1: partitions {a} and {b} overlap: {active:?}"));
                }
            }
        }
        // P2: a partition under a running VM stays active (FM restarts aside).
        if !matches!(op, Op::FmRestart(_)) {
            let held = self.vm_modules();
            for (p, m) in vm_held_before {
                if !m.is_disjoint(&held) && !active.contains_key(p) && !self.fm_restarted {
                    return Err(format!("P2: partition {p} deactivated under a running VM"));
                }
            }
        }
        // P3
        if !self.fm_restarted {
            for (p, ms) in &active {
                for m in ms {
                    let gpu = self.modules.iter().find(|(_, v)| *v == m).map(|(b, _)| *b);
                    if let Some(g) = gpu
                        && self.driver(g) != "vfio-pci"
                    {
                        return Err(format!(
                            "P3: partition {p} active but {g} is on {:?}",
                            self.driver(g)
                        ));
                    }
                }
            }
        }
        // P4
        if !self.fm_restarted {
            for c in &self.prepared {
                let want = self.claim_modules(*c);
                if !active.values().any(|m| *m == want) {
                    return Err(format!(
                        "P4: claim {c} is prepared but its partition is not active: {active:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// At rest: FM running, the kubelet gives up every failed prepare and
    /// unprepares what it wants gone, a reconcile; then P5.
    fn settle(&mut self) -> Result<(), String> {
        let now = self.fm.now_ms();
        if !self
            .fm
            .with(|s| matches!(s.phase, vfio_gpu_fabric::Phase::Running))
        {
            self.fm.with(|s| s.start(now, std::time::Duration::ZERO));
        }
        let _ = self.serve.fabric_reconcile();
        let unprepare_now: Vec<usize> = std::mem::take(&mut self.failed)
            .into_iter()
            .chain(std::mem::take(&mut self.unpreparing))
            .collect();
        for c in unprepare_now {
            self.stop_vm(c);
            unprepare(&self.serve, c).map_err(|e| format!("giving up claim {c}: {e}"))?;
        }
        let _ = self.serve.reconcile();
        self.serve
            .fabric_reconcile()
            .map_err(|e| format!("reconcile at rest: {e}"))?;
        self.fm_restarted = false;
        self.check(&Op::Reconcile, &BTreeMap::new())?;
        let active: BTreeSet<BTreeSet<u32>> = self.fm_active().into_values().collect();
        let want: BTreeSet<BTreeSet<u32>> = self
            .prepared
            .iter()
            .map(|c| self.claim_modules(*c))
            .collect();
        if active != want {
            return Err(format!(
                "P5: FM has {active:?} active, the prepared claims {:?} need {want:?}",
                self.prepared
            ));
        }
        Ok(())
    }
}

fn run(ops: &[Op]) -> Result<(), String> {
    let mut w = World::new();
    for (i, op) in ops.iter().enumerate() {
        w.apply(op)
            .map_err(|e| format!("after step {i} {op:?}: {e}"))?;
        // Keep FM's clock moving (restart windows are 60 s).
        w.clock.advance(std::time::Duration::from_secs(1));
    }
    w.settle().map_err(|e| format!("at rest: {e}"))
}

fn cases() -> u32 {
    std::env::var("FABRIC_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

fn seed() -> proptest::test_runner::RngSeed {
    use proptest::test_runner::RngSeed;
    match std::env::var("FABRIC_MODEL_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(n) => n
            .parse()
            .map(RngSeed::Fixed)
            .unwrap_or(RngSeed::Fixed(2104)),
        Err(_) => RngSeed::Fixed(2104),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        rng_seed: seed(),
        max_shrink_iters: 500,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn partitions_never_leak_overlap_or_vanish_under_a_vm(ops in prop::collection::vec(op(), 1..20)) {
        if let Err(e) = run(&ops) {
            prop_assert!(false, "{}", e);
        }
    }
}

#[test]
fn the_checker_can_fail() {
    // Partitions made active behind the plugin's back, on GPUs still on
    // nvidia: P3 (and, with an overlapping pair, P1) must be reported.
    let w = World::new();
    w.fm.with(|s| s.active.insert(vfio_gpu_fabric::PartitionId(3)));
    let e = w.check(&Op::Reconcile, &BTreeMap::new()).unwrap_err();
    assert!(e.starts_with("P3"), "{e}");
    w.fm.with(|s| s.active.insert(vfio_gpu_fabric::PartitionId(1)));
    let e = w.check(&Op::Reconcile, &BTreeMap::new()).unwrap_err();
    assert!(e.starts_with("P1"), "{e}");
    // A prepared claim whose partition FM lost: P4.
    let mut w = World::new();
    prepare(&w.serve, 0).unwrap();
    w.prepared.insert(0);
    w.fm.with(|s| s.active.clear());
    let e = w.check(&Op::Reconcile, &BTreeMap::new()).unwrap_err();
    assert!(e.starts_with("P4"), "{e}");
    // Reconcile repairs it, and the world is at rest again.
    w.settle().unwrap();
}
