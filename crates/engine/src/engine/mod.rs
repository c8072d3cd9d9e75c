//! The binding engine, one file per operation (as youki's `libcontainer` has one
//! file per container operation). Where to change what:
//!
//! - `configure`: the move to vfio (preflight, write-ahead record, per-function steps, verify).
//! - `release`: unconfigure, and `settle`: the one way a record of ours is released,
//!   finished or rolled back, as `state::decide_settle` says.
//! - `reconcile`: bringing host and ledger back in line after a crash or drift.
//! - `persistence`: nvidia persistence mode around a move.
//! - `steps`: single host writes with deadlines, steer-and-unbind, unbind lock, parking on vfio.
//! - `journal`: ledger commits, record constructors, crash points.
//! - `view`: what operations report (`Outcome`, `GpuView`, `inspect`).
//! - `batch`: several GPUs in parallel.
//! - `admin`: the administrator's release and its guard (a claim's GPU is Kubernetes').
//! - Intent rules live in `vfio-gpu-intent`; the ledger format in `ledger`;
//!   slice attributes in `vfio-gpu-kubelet`'s `slices`.

mod admin;
mod batch;
mod configure;
pub(crate) mod fabric;
pub(crate) mod fabric_learn;
mod handover;
mod journal;
mod persistence;
mod reconcile;
mod release;
mod steps;
mod view;

pub use admin::{ClaimHeld, admin_may_release};
use view::Records;
pub use view::{
    Action, GpuView, Inspection, OpenReport, Outcome, ReconcileResult, inspect, pin_text,
    source_name,
};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vfio_gpu_host::{Bdf, Gpu, GpuSelector, HostRoot, PciIdsDb, discover_gpus};
use vfio_gpu_intent::{IntentSnapshot, LiveIntent, Policy, Verdict, evaluate};

use crate::commands::{HostCommands, RealCommands};
use crate::deadline::{StuckSet, read_with_deadline};
use crate::error::EngineError;
use crate::holder_scan::HolderScanner;
use crate::kernel::Kernel;
use crate::ledger::LedgerError;
use crate::ledger::{Durability, LedgerBody, LedgerFile};
use crate::lock::{LockError, SharedLease, SharedStateLock, StateLock};

/// The stuck-set key of the intent sources: not a device, the highest PCI
/// address (domain ffff, bus ff, device 1f, function 7), which no GPU has.
fn intent_sources_key() -> Bdf {
    Bdf::HIGHEST
}

/// The mirror of one state directory: `<mirror dir>/<hash of its path>/`,
/// with the path itself in `state-dir` (engines with different state
/// directories never overwrite each other's mirror).
// The state directory and its boot mirror are this program's own files.
#[allow(clippy::disallowed_methods)]
fn mirror_dir_for(mirror_root: &Path, state_dir: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let path = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
    mirror_root.join(hex::encode(&digest[..8]))
}

// The state directory and its boot mirror are this program's own files.
#[allow(clippy::disallowed_methods)]
fn open_mirror(mirror_root: &Path, state_dir: &Path) -> Option<LedgerFile> {
    let dir = mirror_dir_for(mirror_root, state_dir);
    let opened = LedgerFile::new(&dir).and_then(|m| {
        let path = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
        std::fs::write(dir.join("state-dir"), path.as_os_str().as_encoded_bytes()).map_err(
            |source| LedgerError::StateDir {
                path: dir.clone(),
                source,
            },
        )?;
        Ok(m)
    });
    match opened {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(error = %e, "no boot mirror of the ledger");
            None
        }
    }
}

/// This boot's records for a state directory found without a ledger: from
/// its own mirror (a wiped hostPath), else from the mirror of a state
/// directory that has no ledger any more (a reinstall with another one).
/// The mirror of a state directory whose ledger still exists is never taken:
/// that ledger is still the truth there.
// The state directory and its boot mirror are this program's own files.
#[allow(clippy::disallowed_methods)]
fn adoptable_mirror(
    mirror_root: &Path,
    state_dir: &Path,
    boot_id: &str,
) -> Option<(LedgerBody, PathBuf)> {
    let own = mirror_dir_for(mirror_root, state_dir);
    let mut candidates = vec![own.clone()];
    if let Ok(entries) = std::fs::read_dir(mirror_root) {
        for e in entries.flatten() {
            let dir = e.path();
            if dir == own {
                continue;
            }
            let Ok(mirrored) = std::fs::read(dir.join("state-dir")) else {
                continue;
            };
            let mirrored = PathBuf::from(String::from_utf8_lossy(&mirrored).into_owned());
            if !mirrored.join("ledger.json").exists() {
                candidates.push(dir);
            }
        }
    }
    candidates.into_iter().find_map(|dir| {
        let m = LedgerFile::new(&dir).ok()?;
        if !m.exists() {
            return None;
        }
        let (kept, problem) = m.load();
        (problem.is_none() && kept.boot_id == boot_id && !kept.gpus.is_empty())
            .then(|| (kept, m.path()))
    })
}

/// What to do when the crash hook fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// `abort()` the process (the CLI's fault-injection variable).
    Abort,
    /// Return [`EngineError::SimulatedCrash`] and refuse all further work
    /// (in-process crash tests: open a new engine on the same state).
    Return,
}

/// How an engine holds the state directory lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StateLockMode {
    /// For the engine's lifetime: one engine per state directory (the CLI,
    /// a single plugin instance). Another process waits `state_lock_wait` at
    /// open and then fails naming the holder.
    #[default]
    Lifetime,
    /// Per operation: configure, unconfigure, reconcile and
    /// [`Engine::hold`] take the lock (joined by concurrent operations of
    /// this process) and re-read the ledger from disk first, so plugin
    /// instances side by side during a rolling update each see what the
    /// other wrote and never write at the same time.
    PerOperation,
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Deadline for `unbind` (blocks while a driver's remove() waits for clients).
    pub unbind_deadline: Duration,
    /// Deadline for `bind` and `drivers_probe` (nvidia probe with NVLink
    /// training can take 30 s+).
    pub bind_deadline: Duration,
    /// Deadline for other writes (`driver_override`, unbind lock).
    pub write_deadline: Duration,
    /// Budget of a whole prepare: no forward step starts once it is spent and
    /// the move is rolled back, so a call ends before the kubelet's 45 s
    /// deadline gives up on it (a step already running keeps its own deadline).
    pub operation_budget: Duration,
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
    /// Whether the state lock is held for the engine's lifetime or per operation.
    pub state_lock_mode: StateLockMode,
    /// The admin's policy file, re-read by every operation (`None`: the
    /// policy given to [`Engine::open`] is fixed).
    pub policy_file: Option<PathBuf>,
    /// A directory on the host's `/run` (tmpfs: it lives exactly as long as
    /// the boot whose bindings it describes) where every commit is mirrored.
    /// A state directory found empty (a reinstall with another state dir, a
    /// wiped hostPath) adopts this boot's records from it, so a GPU we moved
    /// still goes back to its original driver instead of reading our own
    /// `driver_override` as admin intent. `None`: no mirror.
    pub boot_mirror_dir: Option<PathBuf>,
    /// Tests: every ledger write waits at this gate before it reaches the
    /// disk, standing in for a slow fsync.
    pub ledger_write_gate: Option<crate::sim::BlockHandle>,
    /// NVLink partitions through NVIDIA Fabric Manager (`None`: no fabric;
    /// every fabric call is a no-op and nothing else changes).
    pub fabric: Option<fabric::FabricConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            // Well below kubelet's 45 s call deadline, leaving room for the rest of the call.
            unbind_deadline: Duration::from_secs(10),
            bind_deadline: Duration::from_secs(20),
            write_deadline: Duration::from_secs(5),
            // A step started just before it may still run its own deadline.
            operation_budget: Duration::from_secs(20),
            read_deadline: Duration::from_secs(5),
            command_deadline: Duration::from_secs(10),
            unbind_lock_attempts: 5,
            unbind_lock_backoff: Duration::from_millis(100),
            crash_after_step: None,
            crash_mode: CrashMode::Abort,
            state_lock_wait: Duration::from_secs(30),
            state_lock_mode: StateLockMode::Lifetime,
            policy_file: None,
            boot_mirror_dir: None,
            ledger_write_gate: None,
            fabric: None,
        }
    }
}

/// The binding engine. Share it behind an `Arc`; every method may be called
/// from several threads.
///
/// Moving a GPU to vfio-pci and back on the demo host's simulated kernel, as
/// `cargo run -p vfio-gpu-engine --example move_gpu` does
/// (`examples/move_gpu.rs`):
///
/// ```no_run
/// use std::sync::Arc;
///
/// use vfio_gpu_engine::sim::SimKernel;
/// use vfio_gpu_engine::{Engine, EngineConfig, Holder};
/// use vfio_gpu_host::{GpuSelector, HostRoot, demo::build_demo_host};
/// use vfio_gpu_intent::Policy;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let host = dir.path().join("host");
/// build_demo_host(&host)?;
/// // The simulated kernel follows driver-core rules on the fixture's sysfs;
/// // `SysfsKernel` is the same edge on a real host.
/// let kernel = Arc::new(SimKernel::booted(HostRoot::open(&host)?));
/// let (engine, _) = Engine::open(
///     kernel,
///     &dir.path().join("state"),
///     GpuSelector::default(),
///     Policy::default(),
///     EngineConfig::default(),
/// )?;
///
/// let (gpus, _) = engine.discover()?;
/// for view in &gpus {
///     println!("{} keepOnVfio={}", view.gpu.bdf(), view.verdict.keep_on_vfio);
/// }
///
/// let gpu = "0000:ab:00.0".parse()?;
/// let holder = Holder::Claim {
///     uid: "example-uid".into(),
///     namespace: "vms".into(),
///     name: "gpu-claim".into(),
/// };
/// // Write-ahead record, then every function of the IOMMU group to vfio-pci.
/// let moved = engine.configure(gpu, holder.clone())?;
/// println!("configure: {:?}, {}", moved.action, moved.detail);
/// for f in &engine.ledger().gpus[&gpu].functions {
///     let from = f.original_driver.as_ref().map(|d| d.as_str());
///     println!("recorded {}: came from {}", f.bdf, from.unwrap_or("no driver"));
/// }
/// // Back to the recorded drivers (the GPU has no admin intent to keep it on vfio).
/// let released = engine.unconfigure(gpu, Some(&holder))?;
/// println!("unconfigure: {:?}, {}", released.action, released.detail);
/// # Ok(())
/// # }
/// ```
pub struct Engine {
    kernel: Arc<dyn Kernel>,
    root: HostRoot,
    selector: GpuSelector,
    /// Read afresh by every operation: intent changed while serving counts.
    intent: Arc<LiveIntent>,
    /// Product names, read once: pci.ids is megabytes and does not change under us.
    pci_ids: Option<PciIdsDb>,
    file: LedgerFile,
    /// The boot-scoped copy of every commit ([`EngineConfig::boot_mirror_dir`]).
    mirror: Option<LedgerFile>,
    /// The ledger as last committed; held only to read or swap it.
    ledger: Mutex<LedgerBody>,
    /// Held by a commit while it writes the file.
    ledger_writer: Mutex<()>,
    /// Updates staged by concurrent commits, written together (group commit).
    staged: Mutex<journal::StagedCommits>,
    /// Ledger files written by this engine (each write is one or more commits).
    ledger_writes: AtomicU64,
    /// Set while the file another process wrote could not be re-read: the
    /// records in memory may be stale, so no operation answers from them (n9).
    ledger_untrusted: Mutex<Option<String>>,
    boot_id: String,
    groups: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    stuck: StuckSet,
    /// One `/proc` holder scan at a time, shared by the operations waiting.
    scanner: HolderScanner,
    commands: Arc<dyn HostCommands>,
    steps: AtomicU64,
    crashed: AtomicBool,
    config: EngineConfig,
    state_lock: EngineLock,
    /// Fabric Manager state cached between calls (`fabric.rs`).
    fabric: fabric::FabricRuntime,
}

/// The state lock as the engine holds it (see [`StateLockMode`]).
enum EngineLock {
    Lifetime(#[allow(dead_code)] StateLock),
    PerOperation {
        shared: Arc<SharedStateLock>,
        /// The ledger file as last read, to skip re-reading an unchanged one.
        seen: Mutex<Option<FileStamp>>,
    },
}

/// What changes whenever the ledger file is replaced (it is written by
/// rename, so every store is a new inode with a fresh change time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    size: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileStamp {
    #[allow(clippy::disallowed_methods)] // the ledger file: our own
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).ok().map(|m| FileStamp {
            ino: m.ino(),
            size: m.size(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        })
    }
}

/// An operation's hold on the state lock ([`Engine::hold`]); released on drop.
#[derive(Debug)]
pub struct StateHold {
    _lease: Option<SharedLease>,
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
        let mirror = config
            .boot_mirror_dir
            .as_deref()
            .and_then(|dir| open_mirror(dir, state_dir));
        let (mut body, problem) = file.load();
        let mut report = OpenReport {
            ledger_problem: problem,
            ..OpenReport::default()
        };
        if report.ledger_problem.is_none()
            && !file.exists()
            && let Some(dir) = &config.boot_mirror_dir
            && let Some((kept, from)) = adoptable_mirror(dir, state_dir, &boot_id)
        {
            report.adopted_from_mirror = Some(format!(
                "the state directory had no ledger; adopted {} record(s) of this boot from {}",
                kept.gpus.len(),
                from.display()
            ));
            body = kept;
        }
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
        // Fabric partitions of an earlier boot: FM and the switches were reset too.
        report
            .earlier_boot_records
            .extend(body.fabric.drop_earlier_boot(&boot_id));
        body.boot_id = boot_id.clone();
        let intent = match &config.policy_file {
            Some(path) => LiveIntent::from_file(root.clone(), path, policy),
            None => LiveIntent::fixed(root.clone(), policy),
        };
        let pci_ids = PciIdsDb::load(&root).ok().flatten();
        let scanner = HolderScanner::new(Arc::clone(&kernel));
        let engine = Engine {
            kernel,
            root,
            selector,
            intent: Arc::new(intent),
            pci_ids,
            file,
            mirror,
            ledger: Mutex::new(body),
            ledger_writer: Mutex::new(()),
            staged: Mutex::new(journal::StagedCommits::default()),
            ledger_writes: AtomicU64::new(0),
            ledger_untrusted: Mutex::new(None),
            boot_id,
            groups: Mutex::new(HashMap::new()),
            stuck: StuckSet::with_lock_dir(state_dir.to_path_buf()),
            scanner,
            commands,
            steps: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
            state_lock: match config.state_lock_mode {
                StateLockMode::Lifetime => EngineLock::Lifetime(state_lock),
                StateLockMode::PerOperation => EngineLock::PerOperation {
                    shared: SharedStateLock::new(state_dir, config.state_lock_wait),
                    seen: Mutex::new(None),
                },
            },
            config,
            fabric: fabric::FabricRuntime::default(),
        };
        // A ledger this build cannot understand stays as it is (read-only):
        // every change is refused at its first commit instead.
        let read_only = report.ledger_problem.as_ref().is_some_and(|p| p.read_only);
        if !read_only
            && (report.ledger_problem.is_some()
                || !report.earlier_boot_records.is_empty()
                || report.adopted_from_mirror.is_some())
        {
            let body = lock(&engine.ledger).clone();
            engine.file.store(&body)?;
            engine.mirror_commit(&body);
        }
        // Per operation: the lock taken for opening is let go here (the
        // first operation re-reads the ledger).
        Ok((engine, report))
    }

    /// Holds the state lock until the returned value is dropped: with
    /// [`StateLockMode::PerOperation`], takes it (or joins this process's
    /// operations holding it) and, when taking it, re-reads the ledger
    /// (another process may have written it meanwhile); with [`StateLockMode::Lifetime`], the engine holds it
    /// already and this does nothing. Blocks up to `state_lock_wait`. Hold it
    /// across a read of the ledger and the operations that act on what was
    /// read; take it before any lock of the caller's own.
    pub fn hold(&self) -> Result<StateHold, EngineError> {
        let EngineLock::PerOperation { shared, seen } = &self.state_lock else {
            return Ok(StateHold { _lease: None });
        };
        let lease = shared
            .acquire(|| self.reload_ledger(seen, true))
            .map_err(|e| match e {
                e @ LockError::Held { .. } => EngineError::StateLocked(e.to_string()),
                e => EngineError::StateLock(e),
            })?;
        Ok(StateHold {
            _lease: Some(lease),
        })
    }

    /// Replaces the in-memory ledger with the file's, unless the file is
    /// unchanged since it was last read and `always` is false. The caller
    /// holds the state lock, or no operation of this process runs.
    fn reload_ledger(&self, seen: &Mutex<Option<FileStamp>>, always: bool) {
        let path = self.file.path();
        let stamp = FileStamp::of(&path);
        let mut seen = lock(seen);
        if !always && stamp.is_some() && *seen == stamp {
            return;
        }
        let (mut body, problem) = self.file.load();
        if let Some(p) = problem {
            tracing::warn!(reason = %p.reason, moved_to = ?p.moved_to, read_only = p.read_only, "re-reading the ledger another process wrote");
            // Keep the last good records and refuse to answer from them until
            // a later read succeeds: an empty ledger would make every release
            // a false "not moved by us" (n9). The stamp is not taken, so the
            // next operation reads again.
            *lock(&self.ledger_untrusted) = Some(p.reason);
            return;
        }
        *lock(&self.ledger_untrusted) = None;
        body.gpus.retain(|_, rec| rec.boot_id == self.boot_id);
        body.fabric.drop_earlier_boot(&self.boot_id);
        body.boot_id = self.boot_id.clone();
        *lock(&self.ledger) = body;
        *seen = stamp;
    }

    /// Copies a committed body to the boot mirror. A mirror that cannot be
    /// written is removed, so it is never adopted stale.
    pub(super) fn mirror_commit(&self, body: &LedgerBody) {
        let Some(m) = &self.mirror else {
            return;
        };
        // The mirror is boot-scoped (the host's /run): a power loss ends it
        // with the boot, so it needs to survive a process, never the disk.
        if let Err(e) = m.store_with(body, Durability::Process) {
            tracing::warn!(error = %e, "boot mirror of the ledger not written; removing it");
            if let Err(e) = m.discard() {
                tracing::warn!(error = %e, path = %m.path().display(), "stale boot mirror could not be removed");
            }
        }
    }

    /// Fails while the ledger cannot be trusted (kept read-only, or another
    /// process's file could not be re-read): an operation answered from it
    /// could report a GPU it holds as "not moved by us". Nothing is changed.
    pub(super) fn check_ledger_trusted(&self) -> Result<(), EngineError> {
        let reason = lock(&self.ledger_untrusted)
            .clone()
            .or_else(|| self.file.read_only());
        match reason {
            Some(reason) => Err(LedgerError::ReadOnly {
                path: self.file.path(),
                reason,
            }
            .into()),
            None => Ok(()),
        }
    }

    /// How long the last `/proc` holder scan took (it grows with the number
    /// of descriptors open on the node, which any pod controls).
    pub fn last_holder_scan(&self) -> Option<Duration> {
        self.scanner.last_duration()
    }

    /// How many `/proc` holder scans operations asked for since the engine
    /// opened.
    pub fn holder_scans_asked(&self) -> u64 {
        self.scanner.asked()
    }

    /// The host root.
    pub fn root(&self) -> &HostRoot {
        &self.root
    }

    /// The GPU selector.
    pub fn selector(&self) -> &GpuSelector {
        &self.selector
    }

    /// The settings the engine was opened with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// How many times this engine wrote the ledger file: concurrent commits
    /// share a write (group commit), so this can be less than the commits.
    pub fn ledger_writes(&self) -> u64 {
        self.ledger_writes.load(Ordering::SeqCst)
    }

    /// A copy of the ledger. With [`StateLockMode::PerOperation`] and no
    /// operation of this process running, re-read first if the file changed
    /// (the file is replaced atomically, so it is never read half-written).
    pub fn ledger(&self) -> LedgerBody {
        if let EngineLock::PerOperation { shared, seen } = &self.state_lock {
            shared.when_idle(|| self.reload_ledger(seen, false));
        }
        lock(&self.ledger).clone()
    }

    /// `read` applied to the ledger as [`Engine::ledger`] sees it, without
    /// copying it: the hot paths need one record, not the GPU records, audit
    /// and module map a copy carries. `read` must not call back into the
    /// ledger (the lock is held).
    pub(super) fn with_ledger<R>(&self, read: impl FnOnce(&LedgerBody) -> R) -> R {
        if let EngineLock::PerOperation { shared, seen } = &self.state_lock {
            shared.when_idle(|| self.reload_ledger(seen, false));
        }
        read(&lock(&self.ledger))
    }

    /// The ledger's record of `bdf`, copied alone ([`Engine::with_ledger`]).
    pub(super) fn gpu_record(&self, bdf: Bdf) -> Option<crate::ledger::GpuRecord> {
        self.with_ledger(|l| l.gpus.get(&bdf).cloned())
    }

    /// A copy of the ledger's fabric part (module map, partitions) only, as
    /// [`Engine::ledger`] reads it: the prepare path asks for it several
    /// times, and the GPU records and hand-over audit are most of a copy.
    pub(super) fn fabric_ledger(&self) -> crate::fabric_state::FabricLedger {
        if let EngineLock::PerOperation { shared, seen } = &self.state_lock {
            shared.when_idle(|| self.reload_ledger(seen, false));
        }
        lock(&self.ledger).fabric.clone()
    }

    /// Path of the ledger file.
    pub fn ledger_path(&self) -> PathBuf {
        self.file.path()
    }

    /// Every GPU with its verdict and record, and the host processes that
    /// hold those on a host driver.
    pub fn discover(&self) -> Result<(Vec<GpuView>, Vec<String>), EngineError> {
        self.discover_with(true)
    }

    /// [`Engine::discover`] without the `/proc` holder scan (`holders` left
    /// empty): for a prepare's plan, whose moves scan the GPUs they move
    /// themselves, so the whole node's `/proc` is not walked twice.
    pub fn discover_without_holders(&self) -> Result<(Vec<GpuView>, Vec<String>), EngineError> {
        self.discover_with(false)
    }

    fn discover_with(
        &self,
        with_holders: bool,
    ) -> Result<(Vec<GpuView>, Vec<String>), EngineError> {
        // One GPU whose reads block (a device lock held by a hung unbind) is
        // reported as a problem; every other GPU is still seen.
        let host = self.scan_pci(None)?;
        let gpus = discover_gpus(&host, &self.selector, self.pci_ids.as_ref());
        let ledger = self.ledger();
        let intent = self.intent()?;
        let mut holders = if with_holders {
            self.host_holders(&gpus)
        } else {
            HashMap::new()
        };
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
                    persistence_left_off: ledger.persistence_to_restore.get(&bdf).cloned(),
                    fabric: self.gpu_fabric(&ledger, &gpu),
                    quarantine: ledger.quarantined.get(&bdf).cloned(),
                    last_handover: ledger
                        .handovers
                        .iter()
                        .rev()
                        .find(|h| h.gpu == bdf)
                        .cloned(),
                    gpu,
                    verdict,
                }
            })
            .collect();
        Ok((views, host.problems().to_vec()))
    }

    /// The admin's intent as it is on disk now, read under the read deadline
    /// (a policy or driverctl file on a hung mount must not hang an
    /// operation). One read at a time may be blocked; until it returns, every
    /// caller gets the error, and a settle then keeps the GPU on vfio.
    pub(super) fn intent(&self) -> Result<IntentSnapshot, EngineError> {
        let live = Arc::clone(&self.intent);
        read_with_deadline(
            &self.stuck,
            intent_sources_key(),
            "read of the admin's intent sources",
            // Files on disk, some large (modules.dep): the command deadline,
            // not the device-attribute one.
            self.config.command_deadline,
            move || live.read(),
        )
        .map_err(EngineError::IntentUnreadable)
    }

    /// The verdict for `gpu` under `intent` and the ledger as it is now.
    pub(super) fn verdict(&self, intent: &IntentSnapshot, gpu: &Gpu) -> Verdict {
        self.with_ledger(|l| evaluate(&intent.sources, gpu, &Records(l)))
    }

    pub(super) fn load_gpu(&self, bdf: Bdf) -> Result<Gpu, EngineError> {
        let host = self
            .scan_pci(Some(bdf))
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

    /// How every operation that may write starts: this engine alive, the
    /// state lease taken before any group lock (another process may be
    /// mid-operation), and a ledger we trust (an untrusted one hides records
    /// of ours: nothing is decided from it).
    pub(super) fn hold_trusted(&self) -> Result<StateHold, EngineError> {
        self.check_alive()?;
        let hold = self.hold()?;
        self.check_ledger_trusted()?;
        Ok(hold)
    }

    /// [`Engine::hold_trusted`] for an operation on one GPU: also its IOMMU
    /// group's guard (the caller locks it next) and the operation's start.
    pub(super) fn begin_gpu_op(
        &self,
        bdf: Bdf,
    ) -> Result<(StateHold, Arc<Mutex<()>>, Instant), EngineError> {
        let hold = self.hold_trusted()?;
        Ok((hold, self.group_guard(bdf), Instant::now()))
    }

    /// Operations on one IOMMU group are serialised; different groups run in parallel.
    pub(super) fn group_guard(&self, bdf: Bdf) -> Arc<Mutex<()>> {
        // Through the kernel edge but not the quarantine: a readlink in sysfs
        // never takes the device lock, and a quarantined device must still
        // map to its group's guard.
        let key = match self
            .kernel
            .link_name(&self.root.pci_attr(&bdf, "iommu_group"))
        {
            Ok(Some(g)) => format!("group-{g}"),
            _ => format!("device-{bdf}"),
        };
        Arc::clone(lock(&self.groups).entry(key).or_default())
    }
}
