//! The binding engine, one file per operation (as youki's `libcontainer` has one
//! file per container operation). Where to change what:
//!
//! - `configure`: the move to vfio (preflight, write-ahead record, per-function steps, verify).
//! - `release`: unconfigure, finishing a release, restoring functions, rollback.
//! - `reconcile`: bringing host and ledger back in line after a crash or drift.
//! - `persistence`: nvidia persistence mode around a move.
//! - `steps`: single host writes with deadlines, steer-and-unbind, unbind lock, parking on vfio.
//! - `journal`: ledger commits, record constructors, crash points.
//! - `view`: what operations report (`Outcome`, `GpuView`, `inspect`).
//! - `batch`: several GPUs in parallel.
//! - Intent rules live in `vfio-gpu-intent`; the ledger format in `ledger`;
//!   slice attributes in `vfio-gpu-kubelet`'s `slices`.

mod batch;
mod configure;
mod journal;
mod persistence;
mod reconcile;
mod release;
mod steps;
mod view;

use view::Records;
pub use view::{
    Action, GpuView, Inspection, OpenReport, Outcome, ReconcileResult, inspect, pin_text,
    source_name,
};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vfio_gpu_host::{Bdf, Gpu, GpuSelector, HostRoot, PciHost, PciIdsDb, discover_gpus};
use vfio_gpu_intent::{IntentSnapshot, LiveIntent, Policy, Verdict, evaluate};

use crate::commands::{HostCommands, RealCommands};
use crate::deadline::StuckSet;
use crate::error::EngineError;
use crate::kernel::Kernel;
use crate::ledger::LedgerError;
use crate::ledger::{LedgerBody, LedgerFile};
use crate::lock::{LockError, StateLock};

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
    /// Deadline for reads of one device's attributes (some take the device
    /// lock, which a blocked unbind holds).
    pub read_deadline: Duration,
    /// Deadline for host programs (`modprobe`, `nvidia-smi`, which hangs on
    /// a wedged GPU) and for the `/proc` holder scan (an fd on a hung NFS or
    /// FUSE mount blocks it).
    pub command_deadline: Duration,
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
    /// The admin's policy file, re-read by every operation (`None`: the
    /// policy given to [`Engine::open`] is fixed).
    pub policy_file: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            // Well below kubelet's 45 s call deadline, leaving room for the rest of the call.
            unbind_deadline: Duration::from_secs(10),
            bind_deadline: Duration::from_secs(20),
            write_deadline: Duration::from_secs(5),
            read_deadline: Duration::from_secs(5),
            command_deadline: Duration::from_secs(10),
            unbind_lock_attempts: 5,
            unbind_lock_backoff: Duration::from_millis(100),
            crash_after_step: None,
            crash_mode: CrashMode::Abort,
            state_lock_wait: Duration::from_secs(30),
            policy_file: None,
        }
    }
}

/// The binding engine. Share it behind an `Arc`; every method may be called
/// from several threads.
pub struct Engine {
    kernel: Arc<dyn Kernel>,
    root: HostRoot,
    selector: GpuSelector,
    /// Read afresh by every operation: intent changed while serving counts.
    intent: LiveIntent,
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
    /// (moving an untrusted one aside) and reads the intent sources. Host
    /// programs are run as they are (see [`Engine::open_with_commands`]).
    pub fn open(
        kernel: Arc<dyn Kernel>,
        state_dir: &Path,
        selector: GpuSelector,
        policy: Policy,
        config: EngineConfig,
    ) -> Result<(Engine, OpenReport), EngineError> {
        let commands: Arc<dyn HostCommands> = Arc::new(RealCommands);
        Engine::open_with_commands(kernel, commands, state_dir, selector, policy, config)
    }

    /// Like [`Engine::open`], with host programs (`modprobe`, `nvidia-smi`)
    /// run through `commands`: both host edges are fixed at construction.
    pub fn open_with_commands(
        kernel: Arc<dyn Kernel>,
        commands: Arc<dyn HostCommands>,
        state_dir: &Path,
        selector: GpuSelector,
        policy: Policy,
        config: EngineConfig,
    ) -> Result<(Engine, OpenReport), EngineError> {
        let root = kernel.root().clone();
        let file = LedgerFile::new(state_dir)?;
        let state_lock =
            StateLock::acquire(state_dir, config.state_lock_wait).map_err(|e| match e {
                e @ LockError::Held { .. } => EngineError::StateLocked(e.to_string()),
                e => EngineError::StateLock(e),
            })?;
        // Without a boot id, records of an earlier boot would be trusted after a reboot.
        let boot_id = match root.boot_id()? {
            Some(id) if !id.trim().is_empty() => id,
            _ => return Err(LedgerError::NoBootId { path: file.path() }.into()),
        };
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
        let intent = match &config.policy_file {
            Some(path) => LiveIntent::from_file(root.clone(), path, policy),
            None => LiveIntent::fixed(root.clone(), policy),
        };
        let pci_ids = PciIdsDb::load(&root).ok().flatten();
        let engine = Engine {
            kernel,
            root,
            selector,
            intent,
            pci_ids,
            file,
            ledger: Mutex::new(body),
            boot_id,
            groups: Mutex::new(HashMap::new()),
            stuck: StuckSet::default(),
            commands,
            steps: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
            config,
            _lock: state_lock,
        };
        // A ledger this build cannot understand stays as it is (read-only):
        // every change is refused at its first commit instead.
        let read_only = report.ledger_problem.as_ref().is_some_and(|p| p.read_only);
        if !read_only
            && (report.ledger_problem.is_some() || !report.earlier_boot_records.is_empty())
        {
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
        // One GPU whose reads block (a device lock held by a hung unbind) is
        // reported as a problem; every other GPU is still seen.
        let host = PciHost::scan_with(&self.root, &self.selector, &|b| self.read_bounded(b))?;
        let gpus = discover_gpus(&host, &self.selector, self.pci_ids.as_ref());
        let ledger = self.ledger();
        let intent = self.intent.read();
        let mut holders = self.host_holders(&gpus);
        let views = gpus
            .into_iter()
            .map(|gpu| {
                let verdict = evaluate(&intent.sources, &gpu, &Records(&ledger));
                let bdf = gpu.bdf();
                GpuView {
                    record: ledger.gpus.get(&bdf).cloned(),
                    stuck: gpu
                        .functions
                        .iter()
                        .find_map(|f| self.stuck.stuck_on(f.bdf)),
                    holders: holders.remove(&bdf).unwrap_or_default(),
                    gpu,
                    verdict,
                }
            })
            .collect();
        Ok((views, host.problems().to_vec()))
    }

    /// The admin's intent as it is on disk now.
    pub(super) fn intent(&self) -> IntentSnapshot {
        self.intent.read()
    }

    /// The verdict for `gpu` under `intent` and the ledger as it is now.
    pub(super) fn verdict(&self, intent: &IntentSnapshot, gpu: &Gpu) -> Verdict {
        evaluate(&intent.sources, gpu, &Records(&self.ledger()))
    }

    pub(super) fn load_gpu(&self, bdf: Bdf) -> Result<Gpu, EngineError> {
        let host =
            PciHost::scan_one_with(&self.root, &self.selector, bdf, &|b| self.read_bounded(b))
                .map_err(|e| match self.stuck.stuck_on(bdf) {
                    Some(op) => EngineError::Stuck { bdf, op, secs: 0.0 },
                    None => e.into(),
                })?;
        // No product names: pci.ids is megabytes and a move does not need them.
        discover_gpus(&host, &self.selector, None)
            .into_iter()
            .find(|g| g.bdf() == bdf)
            .ok_or(EngineError::UnknownGpu(bdf))
    }

    /// Operations on one IOMMU group are serialised; different groups run in parallel.
    pub(super) fn group_guard(&self, bdf: Bdf) -> Arc<Mutex<()>> {
        let key = match self
            .root
            .link_name(&self.root.pci_attr(&bdf, "iommu_group"))
        {
            Ok(Some(g)) => format!("group-{g}"),
            _ => format!("device-{bdf}"),
        };
        Arc::clone(lock(&self.groups).entry(key).or_default())
    }
}
