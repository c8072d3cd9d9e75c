//! configure / unconfigure / reconcile.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use vfio_gpu_host::{
    Bdf, Binding, DriverName, FunctionRole, Gpu, GpuSelector, HostError, HostRoot, PciFunction,
    PciHost, PciIdsDb, discover_gpus,
};
use vfio_gpu_intent::{IntentSources, OwnRecords, Policy, Verdict, VfioDriverChoice, evaluate};

use crate::commands::{HostCommands, RealCommands};
use crate::deadline::{StuckSet, Timed, run_with_deadline};
use crate::error::{EngineError, FunctionState};
use crate::kernel::{Kernel, SysfsWrite, nvidia_unbind_lock_path};
use crate::ledger::{
    Changes, FunctionRecord, GpuRecord, Holder, LedgerBody, LedgerFile, LedgerProblem, OpState, now,
};
use crate::lock::StateLock;
use crate::preflight::{choose_vfio_driver, device_nodes, find_holders};

/// What to do when the crash hook fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// `abort()` the process (the CLI's fault-injection variable).
    Abort,
    /// Return [`EngineError::SimulatedCrash`] and refuse all further work
    /// (in-process crash tests: open a new engine on the same state).
    Return,
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Deadline for `unbind` (blocks while a driver's remove() waits for clients).
    pub unbind_deadline: Duration,
    /// Deadline for `bind` (nvidia probe with NVLink training can take 30 s+).
    pub bind_deadline: Duration,
    /// Deadline for other writes (`driver_override`, `drivers_probe`, unbind lock).
    pub write_deadline: Duration,
    /// How often to try nvidia's unbind lock.
    pub unbind_lock_attempts: u32,
    /// Pause between unbind lock attempts (doubles each time).
    pub unbind_lock_backoff: Duration,
    /// Crash after this many mutations (ledger commits and host writes).
    pub crash_after_step: Option<u64>,
    /// How to crash.
    pub crash_mode: CrashMode,
    /// How long to wait for the state directory lock.
    pub state_lock_wait: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            // Well below kubelet's 45 s call deadline, leaving room for the rest of the call.
            unbind_deadline: Duration::from_secs(10),
            bind_deadline: Duration::from_secs(20),
            write_deadline: Duration::from_secs(5),
            unbind_lock_attempts: 5,
            unbind_lock_backoff: Duration::from_millis(100),
            crash_after_step: None,
            crash_mode: CrashMode::Abort,
            state_lock_wait: Duration::from_secs(30),
        }
    }
}

/// What an operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Moved to vfio.
    Moved,
    /// Already on vfio: nothing changed, state recorded.
    AlreadyOnVfio,
    /// Already configured for this holder (idempotent repeat).
    AlreadyConfigured,
    /// Released but kept on vfio (admin intent or it was there before).
    LeftOnVfio,
    /// Returned to the original drivers.
    Restored,
    /// Nothing recorded, nothing to do.
    NothingToDo,
    /// Reconcile: an interrupted move to vfio was rolled back.
    RolledBack,
    /// Reconcile: an interrupted release was finished.
    FinishedRelease,
    /// Reconcile: a driverless GPU was given a driver again.
    Rebound,
    /// Reconcile: recorded as admin-owned (bound at start).
    RecordedPrebound,
    /// Reconcile: left as is, with a note.
    Noted,
}

/// The result of one operation on one GPU.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// GPU.
    #[serde(rename = "pciBusID")]
    pub bdf: Bdf,
    /// What happened.
    pub action: Action,
    /// In words, with the reasons.
    pub detail: String,
    /// Where every function is now.
    pub functions: Vec<FunctionState>,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
    /// `vfio-dev/vfioN` of each function on vfio (iommufd cdev names).
    pub vfio_devices: Vec<String>,
    /// Milliseconds the operation took.
    pub millis: u64,
}

/// A GPU with its verdict and record, for listings.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuView {
    /// The GPU.
    #[serde(flatten)]
    pub gpu: Gpu,
    /// The admin-intent verdict.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The ledger record, if any.
    pub record: Option<GpuRecord>,
    /// A write still running past its deadline, if any.
    pub stuck: Option<String>,
}

/// What opening the engine found.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenReport {
    /// The ledger was untrusted and moved aside.
    pub ledger_problem: Option<LedgerProblem>,
    /// Records from an earlier boot that were dropped (hints only).
    pub earlier_boot_records: Vec<String>,
}

/// The ledger as the intent evaluation sees it.
struct Records<'a>(&'a LedgerBody);

impl OwnRecords for Records<'_> {
    fn wrote_override(&self, bdf: Bdf, value: &str) -> bool {
        self.0.gpus.values().any(|r| {
            r.function(bdf)
                .and_then(|f| f.override_written.as_deref())
                .is_some_and(|w| w == value)
        })
    }
    fn bound_by_us(&self, bdf: Bdf) -> bool {
        self.0
            .gpus
            .values()
            .any(|r| r.state != OpState::Prebound && r.function(bdf).is_some_and(|f| f.bound_by_us))
    }
    fn recorded_prebound(&self, bdf: Bdf) -> bool {
        self.0
            .gpus
            .values()
            .any(|r| (r.state == OpState::Prebound || r.was_on_vfio) && r.function(bdf).is_some())
    }
}

/// One GPU's reconcile result; an error names the GPU.
pub type ReconcileResult = Result<Outcome, (Bdf, EngineError)>;

/// A read-only view of the host, its GPUs, their verdicts and the ledger,
/// made without taking the state lock (safe while a plugin is serving).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    /// GPUs with verdicts and records.
    pub gpus: Vec<GpuView>,
    /// Functions that could not be read.
    pub problems: Vec<String>,
    /// Why the ledger could not be used, if so.
    pub ledger_problem: Option<String>,
}

/// Reads the host and the ledger (if `state_dir` holds one) without changing anything.
pub fn inspect(
    root: &HostRoot,
    selector: &GpuSelector,
    policy: &Policy,
    state_dir: Option<&Path>,
) -> Result<Inspection, EngineError> {
    let boot_id = root.boot_id()?.unwrap_or_default();
    let (mut ledger, ledger_problem) = match state_dir.map(|d| d.join(crate::ledger::LEDGER_FILE)) {
        Some(path) => match fs::read(&path) {
            Ok(bytes) => match crate::ledger::decode(&bytes) {
                Ok(body) => (body, None),
                Err(e) => (
                    LedgerBody::default(),
                    Some(format!("{}: {e}", path.display())),
                ),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => (LedgerBody::default(), None),
            Err(e) => (
                LedgerBody::default(),
                Some(format!("{}: {e}", path.display())),
            ),
        },
        None => (LedgerBody::default(), None),
    };
    ledger.gpus.retain(|_, r| r.boot_id == boot_id);
    let host = PciHost::scan(root, selector)?;
    let ids = PciIdsDb::load(root).ok().flatten();
    let sources = IntentSources::load(root, policy);
    let gpus = discover_gpus(&host, selector, ids.as_ref())
        .into_iter()
        .map(|gpu| GpuView {
            verdict: evaluate(&sources, &gpu, &Records(&ledger)),
            record: ledger.gpus.get(&gpu.bdf()).cloned(),
            stuck: None,
            gpu,
        })
        .collect();
    Ok(Inspection {
        gpus,
        problems: host.problems().to_vec(),
        ledger_problem,
    })
}

/// The binding engine. Share it behind an `Arc`; every method may be called
/// from several threads.
pub struct Engine {
    kernel: Arc<dyn Kernel>,
    root: HostRoot,
    selector: GpuSelector,
    policy: Policy,
    sources: RwLock<IntentSources>,
    /// Product names, read once: pci.ids is megabytes and does not change under us.
    pci_ids: Option<PciIdsDb>,
    file: LedgerFile,
    ledger: Mutex<LedgerBody>,
    boot_id: String,
    groups: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    stuck: StuckSet,
    commands: Arc<dyn HostCommands>,
    steps: AtomicU64,
    crashed: AtomicBool,
    config: EngineConfig,
    _lock: StateLock,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking thread must not wedge every later operation.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Opens the engine: takes the state directory lock, loads the ledger
    /// (moving an untrusted one aside) and reads the intent sources.
    pub fn open(
        kernel: Arc<dyn Kernel>,
        state_dir: &Path,
        selector: GpuSelector,
        policy: Policy,
        config: EngineConfig,
    ) -> Result<(Engine, OpenReport), EngineError> {
        let root = kernel.root().clone();
        let file = LedgerFile::new(state_dir)?;
        let state_lock = StateLock::acquire(state_dir, config.state_lock_wait)
            .map_err(|_| EngineError::StateLocked(state_dir.display().to_string()))?;
        let boot_id = root.boot_id()?.unwrap_or_default();
        let (mut body, problem) = file.load();
        let mut report = OpenReport {
            ledger_problem: problem,
            ..OpenReport::default()
        };
        // Drivers were re-probed at boot: what an earlier boot recorded is a hint only.
        body.gpus.retain(|bdf, rec| {
            if rec.boot_id == boot_id {
                true
            } else {
                report.earlier_boot_records.push(format!(
                    "{bdf}: {:?} for {} (boot {})",
                    rec.state,
                    rec.holder
                        .as_ref()
                        .map(|h| h.to_string())
                        .unwrap_or_else(|| "nobody".into()),
                    rec.boot_id
                ));
                false
            }
        });
        body.boot_id = boot_id.clone();
        let sources = IntentSources::load(&root, &policy);
        let pci_ids = PciIdsDb::load(&root).ok().flatten();
        let engine = Engine {
            kernel,
            root,
            selector,
            policy,
            sources: RwLock::new(sources),
            pci_ids,
            file,
            ledger: Mutex::new(body),
            boot_id,
            groups: Mutex::new(HashMap::new()),
            stuck: StuckSet::default(),
            commands: Arc::new(RealCommands),
            steps: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
            config,
            _lock: state_lock,
        };
        if report.ledger_problem.is_some() || !report.earlier_boot_records.is_empty() {
            let body = lock(&engine.ledger).clone();
            engine.file.store(&body)?;
        }
        Ok((engine, report))
    }

    /// The host root.
    pub fn root(&self) -> &HostRoot {
        &self.root
    }

    /// The GPU selector.
    pub fn selector(&self) -> &GpuSelector {
        &self.selector
    }

    /// Re-reads the intent sources (command line, modprobe.d, driverctl, policy).
    pub fn refresh_intent(&self) {
        let fresh = IntentSources::load(&self.root, &self.policy);
        *self.sources.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    }

    /// A copy of the ledger.
    pub fn ledger(&self) -> LedgerBody {
        lock(&self.ledger).clone()
    }

    /// Path of the ledger file.
    pub fn ledger_path(&self) -> PathBuf {
        self.file.path()
    }

    /// Every GPU with its verdict and record.
    pub fn discover(&self) -> Result<(Vec<GpuView>, Vec<String>), EngineError> {
        let host = PciHost::scan(&self.root, &self.selector)?;
        let gpus = discover_gpus(&host, &self.selector, self.pci_ids.as_ref());
        let ledger = self.ledger();
        let sources = self.sources.read().unwrap_or_else(|p| p.into_inner());
        let views = gpus
            .into_iter()
            .map(|gpu| {
                let verdict = evaluate(&sources, &gpu, &Records(&ledger));
                let bdf = gpu.bdf();
                GpuView {
                    record: ledger.gpus.get(&bdf).cloned(),
                    stuck: gpu
                        .functions
                        .iter()
                        .find_map(|f| self.stuck.stuck_on(f.bdf)),
                    gpu,
                    verdict,
                }
            })
            .collect();
        Ok((views, host.problems().to_vec()))
    }

    fn verdict(&self, gpu: &Gpu) -> Verdict {
        let ledger = self.ledger();
        let sources = self.sources.read().unwrap_or_else(|p| p.into_inner());
        evaluate(&sources, gpu, &Records(&ledger))
    }

    fn load_gpu(&self, bdf: Bdf) -> Result<Gpu, EngineError> {
        let host = PciHost::scan_one(&self.root, &self.selector, bdf)?;
        // No product names: pci.ids is megabytes and a move does not need them.
        discover_gpus(&host, &self.selector, None)
            .into_iter()
            .find(|g| g.bdf() == bdf)
            .ok_or(EngineError::UnknownGpu(bdf))
    }

    /// Operations on one IOMMU group are serialised; different groups run in parallel.
    fn group_guard(&self, bdf: Bdf) -> Arc<Mutex<()>> {
        let key = match self
            .root
            .link_name(&self.root.pci_attr(&bdf, "iommu_group"))
        {
            Ok(Some(g)) => format!("group-{g}"),
            _ => format!("device-{bdf}"),
        };
        Arc::clone(lock(&self.groups).entry(key).or_default())
    }

    fn check_alive(&self) -> Result<(), EngineError> {
        if self.crashed.load(Ordering::SeqCst) {
            return Err(EngineError::SimulatedCrash(
                self.steps.load(Ordering::SeqCst),
            ));
        }
        Ok(())
    }

    /// Counts a mutation and fires the crash hook.
    fn mutation_done(&self) -> Result<(), EngineError> {
        let n = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
        if self.config.crash_after_step == Some(n) {
            match self.config.crash_mode {
                CrashMode::Abort => {
                    eprintln!("vfio-gpu-dra: crash injected after step {n}");
                    std::process::abort();
                }
                CrashMode::Return => {
                    self.crashed.store(true, Ordering::SeqCst);
                    return Err(EngineError::SimulatedCrash(n));
                }
            }
        }
        Ok(())
    }

    /// Mutations made so far (ledger commits plus host writes).
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::SeqCst)
    }

    fn commit(&self, update: impl FnOnce(&mut LedgerBody)) -> Result<(), EngineError> {
        self.check_alive()?;
        {
            let mut body = lock(&self.ledger);
            update(&mut body);
            self.file.store(&body)?;
        }
        self.mutation_done()
    }

    fn new_operation(&self) -> u64 {
        let mut body = lock(&self.ledger);
        body.next_operation += 1;
        body.next_operation
    }

    /// The record of a GPU that was already on vfio when we looked: nothing of
    /// ours to undo, so no override written and no changes.
    fn found_on_vfio_record(
        &self,
        gpu: &Gpu,
        funcs: &[PciFunction],
        state: OpState,
        holder: Option<Holder>,
    ) -> GpuRecord {
        GpuRecord {
            state,
            holder,
            vfio_driver: gpu.function.driver.clone(),
            was_on_vfio: true,
            functions: funcs.iter().map(function_record).collect(),
            changes: Changes::default(),
            stuck_on: None,
            boot_id: self.boot_id.clone(),
            operation: self.new_operation(),
            updated: 0,
            extra: BTreeMap::new(),
        }
    }

    fn set_record(&self, bdf: Bdf, rec: Option<GpuRecord>) -> Result<(), EngineError> {
        self.commit(|b| match rec {
            Some(mut r) => {
                r.updated = now();
                b.gpus.insert(bdf, r);
            }
            None => {
                b.gpus.remove(&bdf);
            }
        })
    }

    fn update_record(&self, bdf: Bdf, f: impl FnOnce(&mut GpuRecord)) -> Result<(), EngineError> {
        self.commit(|b| {
            if let Some(r) = b.gpus.get_mut(&bdf) {
                f(r);
                r.updated = now();
            }
        })
    }

    /// Runs one host write with its deadline. `Err(Stuck)` past it.
    fn write(&self, gpu: Bdf, op: SysfsWrite) -> Result<io::Result<()>, EngineError> {
        self.check_alive()?;
        let deadline = match op {
            SysfsWrite::Unbind { .. } => self.config.unbind_deadline,
            SysfsWrite::Bind { .. } => self.config.bind_deadline,
            _ => self.config.write_deadline,
        };
        tracing::debug!(%op, "host write");
        match run_with_deadline(&self.kernel, &op, deadline, &self.stuck) {
            Timed::Done(r) => {
                self.mutation_done()?;
                Ok(r)
            }
            Timed::Stuck { waited } => {
                tracing::warn!(%op, "write outlived its deadline; device marked stuck");
                let text = op.to_string();
                // Recording may fail (ledger unwritable); the stuck error matters more.
                let _ = self.update_record(gpu, |r| r.stuck_on = Some(text.clone()));
                Err(EngineError::Stuck {
                    bdf: gpu,
                    op: text,
                    secs: waited.as_secs_f64(),
                })
            }
        }
    }

    fn read(&self, bdf: Bdf) -> Result<PciFunction, EngineError> {
        Ok(self.kernel.read_function(bdf)?)
    }

    fn binding(&self, bdf: Bdf) -> Result<Binding, EngineError> {
        Ok(self.kernel.read_binding(bdf)?)
    }

    fn states(&self, bdfs: &[Bdf], expected: &BTreeMap<Bdf, Option<String>>) -> Vec<FunctionState> {
        bdfs.iter()
            .map(|b| match self.kernel.read_binding(*b) {
                Ok(f) => {
                    let driver = f.driver.map(|d| d.to_string());
                    let exp = expected.get(b).cloned().flatten();
                    FunctionState {
                        bdf: *b,
                        expected: match (&exp, &driver) {
                            (Some(e), Some(d)) if e == d => None,
                            (None, None) => None,
                            (e, _) if expected.contains_key(b) => {
                                Some(e.clone().unwrap_or_else(|| "no driver".into()))
                            }
                            _ => None,
                        },
                        driver,
                        driver_override: f.driver_override,
                    }
                }
                Err(e) => FunctionState {
                    bdf: *b,
                    driver: None,
                    driver_override: None,
                    expected: Some(format!("unreadable: {e}")),
                },
            })
            .collect()
    }

    fn outcome(&self, gpu: &Gpu, action: Action, detail: String, started: Instant) -> Outcome {
        let bdfs: Vec<Bdf> = gpu.functions.iter().map(|f| f.bdf).collect();
        let functions = self.states(&bdfs, &BTreeMap::new());
        let vfio_devices = bdfs
            .iter()
            .filter_map(|b| self.kernel.read_binding(*b).ok().and_then(|f| f.vfio_dev))
            .collect();
        Outcome {
            bdf: gpu.bdf(),
            action,
            detail,
            functions,
            iommu_group: gpu.function.iommu_group,
            vfio_devices,
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    // ---------------------------------------------------------------- configure

    /// Moves a GPU (every endpoint function of its IOMMU group) to vfio for `holder`.
    pub fn configure(&self, bdf: Bdf, holder: Holder) -> Result<Outcome, EngineError> {
        self.check_alive()?;
        let started = Instant::now();
        let guard = self.group_guard(bdf);
        let _g = lock(&guard);
        let gpu = self.load_gpu(bdf)?;
        for f in &gpu.functions {
            if let Some(op) = self.stuck.stuck_on(f.bdf) {
                return Err(EngineError::Stuck { bdf, op, secs: 0.0 });
            }
        }
        if let Some(rec) = self.ledger().gpus.get(&bdf).cloned() {
            if let Some(op) = &rec.stuck_on {
                return Err(EngineError::Stuck {
                    bdf,
                    op: op.clone(),
                    secs: 0.0,
                });
            }
            match rec.state {
                OpState::Configured if rec.holder.as_ref() == Some(&holder) => {
                    if gpu
                        .functions
                        .iter()
                        .all(|f| f.driver.as_ref().is_some_and(|d| d.is_vfio()))
                    {
                        return Ok(self.outcome(
                            &gpu,
                            Action::AlreadyConfigured,
                            format!("already on vfio for {holder}"),
                            started,
                        ));
                    }
                    // Someone moved it since: fall through and configure again.
                }
                OpState::Prebound | OpState::ReleasedUnbound => {}
                OpState::Configuring | OpState::Releasing
                    if rec.holder.is_none() || rec.holder.as_ref() == Some(&holder) =>
                {
                    // Interrupted earlier: put it back first, then start clean.
                    self.reconcile_record(&gpu, rec)?;
                }
                _ => {
                    if let Some(h) = rec.holder {
                        return Err(EngineError::HeldByOther { bdf, holder: h });
                    }
                }
            }
        }
        let gpu = self.load_gpu(bdf)?;
        let verdict = self.verdict(&gpu);
        if let Some(pin) = &verdict.pinned {
            return Err(EngineError::Pinned {
                bdf,
                detail: pin_text(pin),
            });
        }
        let group = gpu.function.iommu_group.ok_or(EngineError::NoIommu(bdf))?;
        let mut movable: Vec<Bdf> = gpu.functions.iter().map(|f| f.bdf).collect();
        let blocking: Vec<String> = gpu
            .blocking_members()
            .map(|m| {
                format!(
                    "{} ({}, {})",
                    m.bdf,
                    m.identity.vendor_device(),
                    m.driver.as_ref().map(|d| d.as_str()).unwrap_or("no driver")
                )
            })
            .collect();
        if !blocking.is_empty() {
            if !self.policy.binding.allow_foreign_group_members {
                return Err(EngineError::ForeignGroupMembers {
                    bdf,
                    members: blocking.join(", "),
                });
            }
            movable.extend(gpu.blocking_members().map(|m| m.bdf));
        }
        let mut funcs = Vec::new();
        for b in &movable {
            let f = self.read(*b)?;
            if let Some(n) = f.sriov_num_vfs.filter(|n| *n > 0) {
                return Err(EngineError::VfsEnabled { bdf: *b, count: n });
            }
            funcs.push(f);
        }
        let was_on_vfio = funcs.iter().all(|f| f.on_vfio());
        let vfio_driver = self.vfio_driver_for(&gpu.function)?;
        if was_on_vfio {
            let rec =
                self.found_on_vfio_record(&gpu, &funcs, OpState::Configured, Some(holder.clone()));
            self.set_record(bdf, Some(rec))?;
            return Ok(self.outcome(
                &gpu,
                Action::AlreadyOnVfio,
                format!("already on vfio; recorded for {holder}"),
                started,
            ));
        }
        // No process may still use it on its host driver.
        let nodes: Vec<PathBuf> = funcs
            .iter()
            .filter(|f| !f.on_vfio())
            .flat_map(|f| device_nodes(&self.root, f))
            .collect();
        let holders = find_holders(&self.root, &nodes);
        // nvidia-persistenced alone keeps the GPU open while persistence mode is
        // on: turn it off (and back on at release) when the host has nvidia-smi.
        let only_persistenced = !holders.is_empty()
            && holders.iter().all(|h| h.comm == "nvidia-persistenced")
            && self.commands.exists(&self.root, "nvidia-smi");
        if !holders.is_empty() && !only_persistenced {
            return Err(EngineError::Busy { bdf, holders });
        }
        let persistence_disabled: Vec<Bdf> = if only_persistenced {
            funcs
                .iter()
                .filter(|f| f.driver.as_ref().is_some_and(|d| d.as_str() == "nvidia"))
                .map(|f| f.bdf)
                .collect()
        } else {
            Vec::new()
        };

        // Write-ahead: the record exists before the host changes, and already
        // names the override we will write and the lock we will take, so one
        // fsync'd commit covers the whole move.
        let functions = funcs
            .iter()
            .map(|f| FunctionRecord {
                override_written: (!f.on_vfio()).then(|| vfio_driver.to_string()),
                ..function_record(f)
            })
            .collect();
        let changes = Changes {
            unbind_lock_taken: funcs.iter().any(|f| self.unbind_lock_path(f).is_some()),
            persistence_disabled: persistence_disabled.clone(),
            ..Changes::default()
        };
        let rec = GpuRecord {
            state: OpState::Configuring,
            holder: Some(holder.clone()),
            vfio_driver: Some(vfio_driver.clone()),
            was_on_vfio: false,
            functions,
            changes,
            stuck_on: None,
            boot_id: self.boot_id.clone(),
            operation: self.new_operation(),
            updated: 0,
            extra: BTreeMap::new(),
        };
        self.set_record(bdf, Some(rec))?;

        if !persistence_disabled.is_empty() {
            let mut failed = None;
            for b in &persistence_disabled {
                if let Err(e) = self.set_persistence(*b, false) {
                    failed = Some(e);
                    break;
                }
                self.mutation_done()?;
            }
            let still = find_holders(&self.root, &nodes);
            if failed.is_some() || !still.is_empty() {
                let _ = self.rollback(bdf);
                return match failed {
                    Some(detail) => Err(EngineError::Persistence { bdf, detail }),
                    None => Err(EngineError::Busy {
                        bdf,
                        holders: still,
                    }),
                };
            }
        }

        match self.move_to_vfio(&gpu, &funcs, &vfio_driver, group) {
            Ok(()) => {
                let moved: Vec<Bdf> = funcs
                    .iter()
                    .filter(|f| !f.on_vfio())
                    .map(|f| f.bdf)
                    .collect();
                self.update_record(bdf, |r| {
                    r.state = OpState::Configured;
                    for fr in r.functions.iter_mut().filter(|fr| moved.contains(&fr.bdf)) {
                        fr.bound_by_us = true;
                    }
                })?;
                Ok(self.outcome(
                    &gpu,
                    Action::Moved,
                    format!("moved to {vfio_driver} for {holder}"),
                    started,
                ))
            }
            Err(StepError::Engine(e @ EngineError::Stuck { .. })) => {
                // Put back what is not stuck; the stuck function stays as it is.
                let _ = self.rollback(bdf);
                Err(e)
            }
            Err(StepError::Engine(e)) => Err(e),
            Err(StepError::Step { step, cause }) => {
                let expected: BTreeMap<Bdf, Option<String>> = funcs
                    .iter()
                    .map(|f| (f.bdf, f.driver.as_ref().map(|d| d.to_string())))
                    .collect();
                match self.rollback(bdf) {
                    Ok(()) => Err(EngineError::RolledBack {
                        step,
                        cause,
                        functions: self.states(&movable, &expected),
                    }),
                    Err(rb) => Err(EngineError::RollbackIncomplete {
                        step,
                        cause,
                        rollback: rb.to_string(),
                        functions: self.states(&movable, &expected),
                    }),
                }
            }
        }
    }

    fn vfio_driver_for(&self, f: &PciFunction) -> Result<DriverName, EngineError> {
        let driver = match &self.policy.binding.vfio_driver {
            VfioDriverChoice::Named(name) => name.clone(),
            VfioDriverChoice::Auto => choose_vfio_driver(&self.root, f),
        };
        if self.root.pci_driver_dir(&driver).is_dir() {
            return Ok(driver);
        }
        let module = driver.as_str().replace('-', "_");
        if self.policy.binding.load_vfio_module {
            self.modprobe(&module)?;
            if self.root.pci_driver_dir(&driver).is_dir() {
                return Ok(driver);
            }
        }
        Err(EngineError::VfioDriverMissing {
            driver: driver.to_string(),
            module,
        })
    }

    fn modprobe(&self, module: &str) -> Result<(), EngineError> {
        // The host's own modprobe and configuration, under the host root.
        self.commands
            .run(&self.root, "modprobe", &[module])
            .map(|_| ())
            .map_err(|detail| EngineError::Modprobe {
                module: module.into(),
                detail,
            })
    }

    /// Replaces how host programs are run (tests stand in for `nvidia-smi`).
    pub fn set_commands(&mut self, commands: Arc<dyn HostCommands>) {
        self.commands = commands;
    }

    /// Sets nvidia persistence mode of one GPU with the host's `nvidia-smi`.
    fn set_persistence(&self, bdf: Bdf, on: bool) -> Result<(), String> {
        let id = bdf.to_string();
        let mode = if on { "1" } else { "0" };
        self.commands
            .run(&self.root, "nvidia-smi", &["-i", &id, "-pm", mode])
            .map(|_| ())
    }

    /// Turns persistence mode back on where configure turned it off.
    fn restore_persistence(&self, rec: &GpuRecord) {
        for b in &rec.changes.persistence_disabled {
            if let Err(e) = self.set_persistence(*b, true) {
                tracing::warn!(gpu = %b, error = %e, "could not turn persistence mode back on");
            }
        }
    }

    fn step(&self, gpu: Bdf, op: SysfsWrite) -> Result<(), StepError> {
        let text = op.to_string();
        match self.write(gpu, op)? {
            Ok(()) => Ok(()),
            Err(e) => Err(StepError::Step {
                step: text,
                cause: e.to_string(),
            }),
        }
    }

    /// nvidia's unbind lock file for a function on nvidia, when the driver offers one.
    fn unbind_lock_path(&self, f: &PciFunction) -> Option<PathBuf> {
        let path = nvidia_unbind_lock_path(&self.root, &f.bdf);
        (f.driver.as_ref().is_some_and(|d| d.as_str() == "nvidia") && path.exists()).then_some(path)
    }

    fn take_unbind_lock(&self, gpu: Bdf, f: &PciFunction) -> Result<bool, StepError> {
        let Some(path) = self.unbind_lock_path(f) else {
            return Ok(false);
        };
        let mut pause = self.config.unbind_lock_backoff;
        for _ in 0..self.config.unbind_lock_attempts {
            self.step(
                gpu,
                SysfsWrite::NvidiaUnbindLock {
                    bdf: f.bdf,
                    take: true,
                },
            )?;
            // nvidia grants it only with no clients: read back "1".
            if matches!(self.root.read_opt(&path), Ok(Some(v)) if v.trim() == "1") {
                return Ok(true);
            }
            std::thread::sleep(pause);
            pause = pause.saturating_mul(2);
        }
        Err(StepError::Engine(EngineError::UnbindLock {
            bdf: f.bdf,
            attempts: self.config.unbind_lock_attempts,
        }))
    }

    fn move_to_vfio(
        &self,
        gpu: &Gpu,
        funcs: &[PciFunction],
        vfio: &DriverName,
        group: u32,
    ) -> Result<(), StepError> {
        let gb = gpu.bdf();
        for f in funcs {
            if f.on_vfio() {
                continue;
            }
            self.take_unbind_lock(gb, f)?;
            self.steer_and_unbind(gb, f.bdf, vfio, f.driver.as_ref())?;
            self.step(
                gb,
                SysfsWrite::Bind {
                    bdf: f.bdf,
                    driver: vfio.clone(),
                },
            )?;
            let now_on = self.binding(f.bdf)?.driver;
            if now_on.as_ref() != Some(vfio) {
                return Err(StepError::Step {
                    step: format!("verify {} on {vfio}", f.bdf),
                    cause: format!(
                        "driver is {}",
                        now_on.map(|d| d.to_string()).unwrap_or("none".into())
                    ),
                });
            }
        }
        // The group node appears with the first vfio member; a VM needs it.
        if !self.root.dev_vfio_group(group).exists() {
            return Err(StepError::Step {
                step: format!("verify /dev/vfio/{group}"),
                cause: "the group node did not appear".into(),
            });
        }
        // Viable: every member unbound or on a driver that manages DMA itself.
        for m in gpu.iommu_group_members.iter().map(|m| m.bdf) {
            let f = self.binding(m)?;
            if let Some(d) = &f.driver
                && !(d.is_vfio() || d.as_str() == "pci-stub" || d.as_str() == "pcieport")
            {
                return Err(StepError::Step {
                    step: format!("verify group {group} viable"),
                    cause: format!("{m} is on {d}"),
                });
            }
        }
        Ok(())
    }

    /// `driver_override` ← `target`, then unbind from `current`: the override
    /// goes first so that no auto-probe can take the device in between.
    fn steer_and_unbind(
        &self,
        gpu: Bdf,
        bdf: Bdf,
        target: &DriverName,
        current: Option<&DriverName>,
    ) -> Result<(), StepError> {
        self.step(
            gpu,
            SysfsWrite::DriverOverride {
                bdf,
                driver: Some(target.to_string()),
            },
        )?;
        if let Some(d) = current {
            self.step(
                gpu,
                SysfsWrite::Unbind {
                    bdf,
                    driver: d.clone(),
                },
            )?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- restore

    /// Puts one function back where its record says it came from.
    fn restore_function(
        &self,
        gpu: Bdf,
        fr: &FunctionRecord,
        vfio: Option<&DriverName>,
    ) -> Result<(), StepError> {
        let cur = self.binding(fr.bdf)?;
        let at_origin = cur.driver == fr.original_driver;
        if !at_origin {
            match &fr.original_driver {
                Some(orig) => {
                    // An explicit override also beats a stray vfio-pci dynid on re-probe.
                    self.steer_and_unbind(gpu, fr.bdf, orig, cur.driver.as_ref())?;
                    let bound = self.step(
                        gpu,
                        SysfsWrite::Bind {
                            bdf: fr.bdf,
                            driver: orig.clone(),
                        },
                    );
                    let now_on = self.binding(fr.bdf)?.driver;
                    if now_on.as_ref() != Some(orig) {
                        let cause = match bound {
                            Err(StepError::Step { cause, .. }) => cause,
                            Err(e) => return Err(e),
                            Ok(()) => format!(
                                "driver is {}",
                                now_on.map(|d| d.to_string()).unwrap_or("none".into())
                            ),
                        };
                        // Never leave it without a driver: back to vfio.
                        if let Some(v) = vfio {
                            self.park_on_vfio(gpu, fr.bdf, v);
                        }
                        return Err(StepError::Step {
                            step: format!("bind {} to {orig}", fr.bdf),
                            cause,
                        });
                    }
                }
                None => {
                    if let Some(d) = &cur.driver {
                        // A manual unbind does not re-probe: it stays driverless, as it was.
                        self.step(
                            gpu,
                            SysfsWrite::Unbind {
                                bdf: fr.bdf,
                                driver: d.clone(),
                            },
                        )?;
                    }
                }
            }
        }
        let cur = self.binding(fr.bdf)?;
        if cur.driver_override != fr.original_override {
            self.step(
                gpu,
                SysfsWrite::DriverOverride {
                    bdf: fr.bdf,
                    driver: fr.original_override.clone(),
                },
            )?;
        }
        Ok(())
    }

    fn park_on_vfio(&self, gpu: Bdf, bdf: Bdf, vfio: &DriverName) {
        let ok = self
            .step(
                gpu,
                SysfsWrite::DriverOverride {
                    bdf,
                    driver: Some(vfio.to_string()),
                },
            )
            .is_ok();
        if ok && self.binding(bdf).is_ok_and(|f| f.driver.is_none()) {
            let _ = self.step(
                gpu,
                SysfsWrite::Bind {
                    bdf,
                    driver: vfio.clone(),
                },
            );
        }
    }

    /// Returns every function of a record to its origin (a failed or
    /// interrupted configure) and drops the record.
    fn rollback(&self, bdf: Bdf) -> Result<(), EngineError> {
        let Some(rec) = self.ledger().gpus.get(&bdf).cloned() else {
            return Ok(());
        };
        let mut first_err = None;
        for fr in &rec.functions {
            if self.stuck.stuck_on(fr.bdf).is_some() {
                continue;
            }
            if let Err(e) = self.restore_function(bdf, fr, rec.vfio_driver.as_ref()) {
                first_err.get_or_insert(e);
            }
        }
        self.release_unbind_lock(bdf, &rec);
        if first_err.is_none() {
            self.restore_persistence(&rec);
        }
        match first_err {
            None => {
                if rec
                    .functions
                    .iter()
                    .any(|f| self.stuck.stuck_on(f.bdf).is_some())
                {
                    return Ok(());
                }
                self.set_record(bdf, None)?;
                Ok(())
            }
            Some(StepError::Engine(e)) => Err(e),
            Some(StepError::Step { step, cause }) => Err(EngineError::RestoreFailed {
                bdf,
                cause: format!("{step}: {cause}"),
                functions: self.states(
                    &rec.functions.iter().map(|f| f.bdf).collect::<Vec<_>>(),
                    &BTreeMap::new(),
                ),
            }),
        }
    }

    fn release_unbind_lock(&self, gpu: Bdf, rec: &GpuRecord) {
        if !rec.changes.unbind_lock_taken {
            return;
        }
        for fr in &rec.functions {
            if nvidia_unbind_lock_path(&self.root, &fr.bdf).exists() {
                let _ = self.step(
                    gpu,
                    SysfsWrite::NvidiaUnbindLock {
                        bdf: fr.bdf,
                        take: false,
                    },
                );
            }
        }
    }

    // ---------------------------------------------------------------- unconfigure

    /// Releases a GPU: back to its original drivers, unless admin intent (or
    /// its own history) keeps it on vfio. `holder`: only release if held by
    /// this holder (`None`: whoever holds it).
    pub fn unconfigure(&self, bdf: Bdf, holder: Option<&Holder>) -> Result<Outcome, EngineError> {
        self.check_alive()?;
        let started = Instant::now();
        let guard = self.group_guard(bdf);
        let _g = lock(&guard);
        let gpu = self.load_gpu(bdf)?;
        let rec = self.ledger().gpus.get(&bdf).cloned();
        let verdict = self.verdict(&gpu);
        let Some(rec) = rec else {
            let (action, detail) = if gpu.function.on_vfio() {
                (
                    Action::LeftOnVfio,
                    format!("not moved by us; stays on vfio: {}", reasons_text(&verdict)),
                )
            } else {
                (
                    Action::NothingToDo,
                    "no record: not moved by us".to_string(),
                )
            };
            return Ok(self.outcome(&gpu, action, detail, started));
        };
        if let (Some(want), Some(have)) = (holder, rec.holder.as_ref())
            && want != have
        {
            return Err(EngineError::HeldByOther {
                bdf,
                holder: have.clone(),
            });
        }
        if let Some(op) = &rec.stuck_on {
            return Err(EngineError::Stuck {
                bdf,
                op: op.clone(),
                secs: 0.0,
            });
        }
        if rec.state == OpState::ReleasedUnbound {
            return Ok(self.outcome(
                &gpu,
                Action::NothingToDo,
                "already released".into(),
                started,
            ));
        }
        if rec.state == OpState::Prebound {
            return Ok(self.outcome(
                &gpu,
                Action::LeftOnVfio,
                format!("admin-owned; stays on vfio: {}", reasons_text(&verdict)),
                started,
            ));
        }
        let suppressed = rec.functions.iter().find_map(|f| {
            f.original_driver.as_ref().filter(|d| {
                verdict
                    .host_driver_suppressed
                    .iter()
                    .any(|s| s == d.as_str())
            })
        });
        if verdict.keep_on_vfio || rec.was_on_vfio || suppressed.is_some() {
            let why = if verdict.keep_on_vfio {
                reasons_text(&verdict)
            } else if rec.was_on_vfio {
                "it was on vfio before we touched it".to_string()
            } else {
                format!(
                    "its host driver {} is blacklisted or blocked by the admin",
                    suppressed.map(|d| d.as_str()).unwrap_or("?")
                )
            };
            let on_vfio = gpu.function.on_vfio();
            let mut kept = rec.clone();
            kept.state = OpState::Prebound;
            kept.holder = None;
            kept.was_on_vfio = true;
            self.set_record(bdf, on_vfio.then_some(kept))?;
            return Ok(self.outcome(
                &gpu,
                Action::LeftOnVfio,
                format!("released; stays on vfio: {why}"),
                started,
            ));
        }
        // Never unbind vfio while a VM still has the group open.
        let nodes: Vec<PathBuf> = rec
            .functions
            .iter()
            .filter_map(|f| self.read(f.bdf).ok())
            .filter(|f| f.on_vfio())
            .flat_map(|f| device_nodes(&self.root, &f))
            .collect();
        let holders = find_holders(&self.root, &nodes);
        if !holders.is_empty() {
            return Err(EngineError::Busy { bdf, holders });
        }
        self.update_record(bdf, |r| {
            r.state = OpState::Releasing;
            r.holder = None;
        })?;
        self.finish_release(&gpu, &rec, started, Action::Restored)
    }

    fn finish_release(
        &self,
        gpu: &Gpu,
        rec: &GpuRecord,
        started: Instant,
        action: Action,
    ) -> Result<Outcome, EngineError> {
        let bdf = gpu.bdf();
        let mut failure = None;
        for fr in &rec.functions {
            if let Err(e) = self.restore_function(bdf, fr, rec.vfio_driver.as_ref()) {
                failure.get_or_insert(e);
            }
        }
        match failure {
            None => {
                self.release_unbind_lock(bdf, rec);
                self.restore_persistence(rec);
                // A GPU found without a driver goes back to none; remember that
                // it is meant to be so, or reconcile would probe a driver for it.
                let unbound = rec
                    .functions
                    .first()
                    .is_some_and(|f| f.original_driver.is_none());
                let tombstone = unbound.then(|| GpuRecord {
                    state: OpState::ReleasedUnbound,
                    holder: None,
                    stuck_on: None,
                    ..rec.clone()
                });
                self.set_record(bdf, tombstone)?;
                let back: Vec<String> = rec
                    .functions
                    .iter()
                    .map(|f| {
                        format!(
                            "{} → {}",
                            f.bdf,
                            f.original_driver
                                .as_ref()
                                .map(|d| d.as_str())
                                .unwrap_or("no driver")
                        )
                    })
                    .collect();
                Ok(self.outcome(
                    gpu,
                    action,
                    format!("returned to original drivers: {}", back.join(", ")),
                    started,
                ))
            }
            Some(StepError::Engine(e)) => Err(e),
            Some(StepError::Step { step, cause }) => Err(EngineError::RestoreFailed {
                bdf,
                cause: format!("{step}: {cause}"),
                functions: self.states(
                    &rec.functions.iter().map(|f| f.bdf).collect::<Vec<_>>(),
                    &BTreeMap::new(),
                ),
            }),
        }
    }

    // ---------------------------------------------------------------- reconcile

    fn reconcile_record(&self, gpu: &Gpu, rec: GpuRecord) -> Result<Outcome, EngineError> {
        let started = Instant::now();
        let bdf = gpu.bdf();
        match rec.state {
            OpState::Configuring => {
                self.rollback(bdf)?;
                Ok(self.outcome(
                    gpu,
                    Action::RolledBack,
                    "an interrupted move to vfio was rolled back".into(),
                    started,
                ))
            }
            OpState::Releasing => self.finish_release(gpu, &rec, started, Action::FinishedRelease),
            OpState::Configured => {
                let drift: Vec<String> = gpu
                    .functions
                    .iter()
                    .filter(|f| !f.driver.as_ref().is_some_and(|d| d.is_vfio()))
                    .map(|f| f.bdf.to_string())
                    .collect();
                let detail = match (&rec.holder, drift.is_empty()) {
                    (Some(h), true) => format!("held by {h}, on vfio"),
                    (Some(h), false) => format!(
                        "held by {h}, but {} left vfio since (changed outside vfio-gpu-dra)",
                        drift.join(", ")
                    ),
                    (None, _) => "configured without holder".into(),
                };
                Ok(self.outcome(gpu, Action::Noted, detail, started))
            }
            OpState::ReleasedUnbound => {
                if gpu.function.driver.is_some() {
                    self.set_record(bdf, None)?;
                    return Ok(self.outcome(
                        gpu,
                        Action::Noted,
                        "released unbound earlier, has a driver now: record dropped".into(),
                        started,
                    ));
                }
                Ok(self.outcome(
                    gpu,
                    Action::Noted,
                    "released to no driver, as it was found".into(),
                    started,
                ))
            }
            OpState::Prebound => {
                if !gpu.function.on_vfio() {
                    self.set_record(bdf, None)?;
                    return Ok(self.outcome(
                        gpu,
                        Action::Noted,
                        "was admin-owned on vfio, now on another driver: record dropped".into(),
                        started,
                    ));
                }
                Ok(self.outcome(gpu, Action::Noted, "admin-owned, on vfio".into(), started))
            }
        }
    }

    /// Brings host and ledger back in line: finishes or rolls back
    /// interrupted operations, gives driverless GPUs a driver, records GPUs
    /// found on vfio without a record of ours as admin-owned.
    pub fn reconcile(&self) -> Result<Vec<ReconcileResult>, EngineError> {
        self.check_alive()?;
        let (views, _) = self.discover()?;
        let mut out = Vec::new();
        let ledger_gpus: Vec<Bdf> = self.ledger().gpus.keys().copied().collect();
        for bdf in ledger_gpus {
            if !views.iter().any(|v| v.gpu.bdf() == bdf) {
                out.push(Err((bdf, EngineError::UnknownGpu(bdf))));
            }
        }
        for view in views {
            let bdf = view.gpu.bdf();
            out.push(self.reconcile_one(bdf).map_err(|e| (bdf, e)));
        }
        Ok(out)
    }

    fn reconcile_one(&self, bdf: Bdf) -> Result<Outcome, EngineError> {
        let started = Instant::now();
        let guard = self.group_guard(bdf);
        let _g = lock(&guard);
        let gpu = self.load_gpu(bdf)?;
        if let Some(mut rec) = self.ledger().gpus.get(&bdf).cloned() {
            if let Some(op) = rec.stuck_on.clone() {
                if gpu
                    .functions
                    .iter()
                    .any(|f| self.stuck.stuck_on(f.bdf).is_some())
                {
                    return Err(EngineError::Stuck { bdf, op, secs: 0.0 });
                }
                // The blocked write has returned (or the process that made it is gone).
                rec.stuck_on = None;
                self.update_record(bdf, |r| r.stuck_on = None)?;
            }
            return self.reconcile_record(&gpu, rec);
        }
        let verdict = self.verdict(&gpu);
        if gpu.function.on_vfio() {
            let funcs: Vec<PciFunction> = gpu
                .functions
                .iter()
                .filter_map(|f| self.read(f.bdf).ok())
                .collect();
            let rec = self.found_on_vfio_record(&gpu, &funcs, OpState::Prebound, None);
            self.set_record(bdf, Some(rec))?;
            return Ok(self.outcome(
                &gpu,
                Action::RecordedPrebound,
                format!(
                    "on vfio without a record of ours: admin-owned ({})",
                    reasons_text(&verdict)
                ),
                started,
            ));
        }
        let driverless: Vec<Bdf> = gpu
            .functions
            .iter()
            .filter(|f| f.driver.is_none())
            .map(|f| f.bdf)
            .collect();
        if driverless.is_empty() || verdict.pinned.is_some() {
            return Ok(self.outcome(&gpu, Action::Noted, "nothing to do".into(), started));
        }
        for b in &driverless {
            let f = self.read(*b)?;
            if verdict.keep_on_vfio {
                let vfio = self.vfio_driver_for(&f)?;
                let _ = self.step(
                    bdf,
                    SysfsWrite::DriverOverride {
                        bdf: *b,
                        driver: Some(vfio.to_string()),
                    },
                );
                let _ = self.step(
                    bdf,
                    SysfsWrite::Bind {
                        bdf: *b,
                        driver: vfio,
                    },
                );
            } else {
                // Let the kernel pick the driver it would pick at boot.
                let _ = self.step(bdf, SysfsWrite::DriversProbe { bdf: *b });
            }
        }
        let still: Vec<String> = driverless
            .iter()
            .filter(|b| self.binding(**b).is_ok_and(|f| f.driver.is_none()))
            .map(|b| b.to_string())
            .collect();
        let detail = if still.is_empty() {
            "driverless functions given a driver again".to_string()
        } else {
            format!("no driver matches {}: left unbound", still.join(", "))
        };
        Ok(self.outcome(&gpu, Action::Rebound, detail, started))
    }

    // ---------------------------------------------------------------- batches

    /// Configures several GPUs concurrently (different IOMMU groups in
    /// parallel, one group at a time). Results in input order.
    pub fn configure_many(&self, reqs: &[(Bdf, Holder)]) -> Vec<Result<Outcome, EngineError>> {
        in_parallel(reqs, |(b, _)| *b, |(b, h)| self.configure(*b, h.clone()))
    }

    /// Releases several GPUs concurrently.
    pub fn unconfigure_many(
        &self,
        reqs: &[(Bdf, Option<Holder>)],
    ) -> Vec<Result<Outcome, EngineError>> {
        in_parallel(reqs, |(b, _)| *b, |(b, h)| self.unconfigure(*b, h.as_ref()))
    }

    /// GPUs held by `holder`, from the ledger.
    pub fn held_by(&self, holder: &Holder) -> Vec<Bdf> {
        self.ledger()
            .gpus
            .iter()
            .filter(|(_, r)| r.holder.as_ref() == Some(holder))
            .map(|(b, _)| *b)
            .collect()
    }

    /// Whether `role` functions would move; exposed for listings.
    pub fn moves_with_gpu(role: FunctionRole) -> bool {
        matches!(role, FunctionRole::Gpu | FunctionRole::Companion)
    }
}

/// Runs `op` on every item on its own thread; results in input order. A
/// thread that panicked is reported for its GPU instead of taking the batch down.
fn in_parallel<T: Sync>(
    items: &[T],
    bdf_of: impl Fn(&T) -> Bdf,
    op: impl Fn(&T) -> Result<Outcome, EngineError> + Sync,
) -> Vec<Result<Outcome, EngineError>> {
    let op = &op;
    std::thread::scope(|s| {
        let handles: Vec<_> = items.iter().map(|it| s.spawn(move || op(it))).collect();
        handles
            .into_iter()
            .zip(items)
            .map(|(h, it)| {
                h.join()
                    .unwrap_or_else(|_| Err(EngineError::Panicked(bdf_of(it))))
            })
            .collect()
    })
}

/// Errors inside a multi-step operation: an engine error (stop), or a
/// failed host write (roll back).
enum StepError {
    Engine(EngineError),
    Step { step: String, cause: String },
}

impl From<EngineError> for StepError {
    fn from(e: EngineError) -> Self {
        StepError::Engine(e)
    }
}

impl From<HostError> for StepError {
    fn from(e: HostError) -> Self {
        StepError::Engine(e.into())
    }
}

fn function_record(f: &PciFunction) -> FunctionRecord {
    FunctionRecord {
        bdf: f.bdf,
        original_driver: f.driver.clone(),
        original_override: f.driver_override.clone(),
        override_written: None,
        bound_by_us: false,
        extra: BTreeMap::new(),
    }
}

/// The kebab-case name of an intent source (`kernel-cmdline`, …).
pub fn source_name(s: vfio_gpu_intent::Source) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{s:?}"))
}

/// A pin in words.
pub fn pin_text(p: &vfio_gpu_intent::Pin) -> String {
    format!("{}: {}", source_name(p.source), p.detail)
}

fn reasons_text(v: &Verdict) -> String {
    if v.reasons.is_empty() {
        return "no admin intent found".into();
    }
    v.reasons
        .iter()
        .map(|r| format!("{}: {}", source_name(r.source), r.detail))
        .collect::<Vec<_>>()
        .join("; ")
}
