//! Single host writes under deadlines, and the small write sequences the operations share.

use super::Engine;
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use vfio_gpu_host::{Bdf, Binding, DriverName, Gpu, HostError, HostRoot, PciFunction, PciHost};

use crate::deadline::{StuckSet, Timed, read_with_deadline, run_with_deadline};
use crate::error::{EngineError, Step, Verification};
use crate::kernel::Kernel;
use crate::kernel::{SysfsWrite, nvidia_unbind_lock_path};
use crate::ledger::GpuRecord;
use crate::preflight::{NodeHolder, device_nodes_with};
use crate::state::IntentNow;

impl Engine {
    /// Runs one host write with its deadline. `Err(Stuck)` past it. Inside
    /// an operation whose budget is spent ([`OperationBudget`]) the write is
    /// not started and fails, so the operation rolls back.
    pub(super) fn write(&self, gpu: Bdf, op: SysfsWrite) -> Result<io::Result<()>, EngineError> {
        self.check_alive()?;
        if let Some(budget) = OperationBudget::spent() {
            return Ok(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "not started: the operation's {}s budget is spent",
                    budget.as_secs_f64()
                ),
            )));
        }
        if let Some(why) = self.refused_by_intent(gpu, &op)? {
            return Ok(Err(io::Error::new(io::ErrorKind::PermissionDenied, why)));
        }
        let deadline = match op {
            SysfsWrite::Unbind { .. } => self.config.unbind_deadline,
            // drivers_probe runs a driver's probe, as a bind does.
            SysfsWrite::Bind { .. } | SysfsWrite::DriversProbe { .. } => self.config.bind_deadline,
            // A reset waits for the device to come back (up to the kernel's
            // 60 s ready poll after a bus reset): the longer deadline too.
            SysfsWrite::Reset { .. } => self.config.bind_deadline,
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
                if let Err(e) = self.update_record(gpu, |r| r.stuck_on = Some(text.clone())) {
                    tracing::warn!(%gpu, error = %e, "could not record the stuck write in the ledger");
                }
                Err(EngineError::Stuck {
                    bdf: gpu,
                    op: text,
                    secs: waited.as_secs_f64(),
                })
            }
        }
    }

    /// Defence in depth for the core promise: a write that could hand a
    /// function to a host driver (a bind to a non-vfio driver, a
    /// `drivers_probe`) is refused when the admin's intent read at this
    /// instant says keep, whatever path asked for it.
    fn refused_by_intent(&self, gpu: Bdf, op: &SysfsWrite) -> Result<Option<String>, EngineError> {
        let to_host = match op {
            SysfsWrite::Bind { driver, .. } => !driver.is_vfio(),
            SysfsWrite::DriversProbe { .. } => true,
            _ => false,
        };
        if !to_host {
            return Ok(None);
        }
        // A GPU that cannot be read now cannot be shown to be free of keep
        // intent: refused as a failed step, so the caller parks the function
        // back on vfio rather than leave it without a driver.
        let gpu_now = match self.load_gpu(gpu) {
            Ok(g) => g,
            Err(e) => {
                return Ok(Some(format!(
                    "refused: {op} needs admin intent read first, and {gpu} cannot be read ({e})"
                )));
            }
        };
        let rec = self.gpu_record(gpu);
        Ok(match self.intent_now(&gpu_now, rec.as_ref()).0 {
            IntentNow::Keep(why) => Some(format!(
                "refused: {op} would take it off vfio, and admin intent keeps {gpu} there ({why})"
            )),
            IntentNow::Unknown(why) => Some(format!(
                "refused: {op} would take it off vfio, and admin intent cannot be read ({why})"
            )),
            IntentNow::Restore { .. } => None,
        })
    }

    /// Reads one function under the read deadline: some attributes take the
    /// device lock, which a blocked unbind holds. Past the deadline the
    /// device is quarantined until the read returns.
    pub(super) fn read_bounded(&self, bdf: Bdf) -> Result<PciFunction, HostError> {
        let kernel = Arc::clone(&self.kernel);
        self.bounded(bdf, "read", move || kernel.read_function(bdf))
    }

    /// Runs `read` (a read of `bdf` outside the engine, e.g. a health check of its
    /// config space) like the engine's own bounded reads: on a worker thread, at most
    /// the read deadline. Past it the device is quarantined (stuck) until the read
    /// returns; while an earlier read of it is blocked, refuses at once. `Err` says
    /// what blocked.
    pub fn read_device_bounded<T: Send + 'static>(
        &self,
        bdf: Bdf,
        what: &str,
        read: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        read_with_deadline(&self.stuck, bdf, what, self.config.read_deadline, read)
    }

    /// Reads the PCI tree (the listing of `sys/bus/pci/devices`, IOMMU
    /// groups, slot siblings, and each function under the read deadline) as
    /// one read under the command deadline: a listing on a hung sysfs must
    /// not hang an operation. `one` narrows it to one GPU and its relatives.
    /// While an earlier listing is still blocked, refuses at once.
    pub(super) fn scan_pci(&self, one: Option<Bdf>) -> Result<PciHost, HostError> {
        let kernel = Arc::clone(&self.kernel);
        let root = self.root.clone();
        let selector = self.selector.clone();
        let stuck = self.stuck.clone();
        let read_deadline = self.config.read_deadline;
        let scan = move || {
            let read = |bdf: Bdf| {
                let kernel = Arc::clone(&kernel);
                bounded_function_read(&stuck, &root, read_deadline, bdf, move || {
                    kernel.read_function(bdf)
                })
            };
            match one {
                None => PciHost::scan_with(&root, &selector, &read),
                Some(bdf) => PciHost::scan_one_with(&root, &selector, bdf, &read),
            }
        };
        read_with_deadline(
            &self.stuck,
            pci_tree_key(),
            "listing of the PCI tree",
            self.config.command_deadline,
            scan,
        )
        .unwrap_or_else(|blocked| {
            Err(HostError::Io {
                path: self.root.pci_devices_dir(),
                source: io::Error::new(io::ErrorKind::TimedOut, blocked),
            })
        })
    }

    fn bounded<T: Send + 'static>(
        &self,
        bdf: Bdf,
        what: &str,
        read: impl FnOnce() -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, HostError> {
        let label = format!("{what} of {bdf}");
        read_with_deadline(&self.stuck, bdf, &label, self.config.read_deadline, read)
            .unwrap_or_else(|blocked| {
                Err(HostError::Io {
                    path: self.root.pci_device_dir(&bdf),
                    source: io::Error::new(io::ErrorKind::TimedOut, blocked),
                })
            })
    }

    /// A device whose read blocked is reported stuck, like a blocked write.
    fn stuck_or(&self, bdf: Bdf, e: HostError) -> EngineError {
        match self.stuck.stuck_on(bdf) {
            Some(op) => EngineError::Stuck { bdf, op, secs: 0.0 },
            None => e.into(),
        }
    }

    /// Runs a host program under the command deadline; a hang quarantines `gpu`.
    pub(super) fn run_program(
        &self,
        gpu: Bdf,
        program: &'static str,
        args: Vec<String>,
    ) -> Result<String, String> {
        let commands = Arc::clone(&self.commands);
        let root = self.root.clone();
        let label = format!("{program} {}", args.join(" "));
        let limit = self.config.command_deadline + std::time::Duration::from_secs(1);
        read_with_deadline(
            &self.stuck,
            gpu,
            &label,
            self.config.command_deadline,
            move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                // Killed a little after the caller stops waiting, so neither
                // the program nor this thread lingers (review n11).
                commands.run_for(&root, program, &args, limit)
            },
        )
        .unwrap_or_else(Err)
    }

    /// Processes holding any of `nodes`, from the shared scanner under the
    /// command deadline. A scan that cannot answer in time or fails counts
    /// as a holder (fail closed), so the caller answers "busy, retry"; the GPU
    /// is not quarantined for it (security review M1).
    pub(super) fn holders_of(
        &self,
        _gpu: Bdf,
        nodes: Vec<PathBuf>,
    ) -> Result<Vec<NodeHolder>, EngineError> {
        let mut holders = self
            .scanner
            .holders(nodes, self.config.command_deadline)
            .unwrap_or_else(|why| {
                vec![NodeHolder {
                    pid: 0,
                    comm: String::new(),
                    node: why,
                    program: None,
                }]
            });
        // One entry per process, as reports have always listed them.
        let mut seen = std::collections::HashSet::new();
        holders.retain(|h| seen.insert(h.pid));
        Ok(holders)
    }

    /// The device nodes of `f` (nvidia's minor comes from procfs, whose read
    /// takes RM locks and hangs on a wedged GPU, n5), under the read deadline:
    /// past it the function is quarantined like any blocked read.
    pub(super) fn nodes_of(&self, f: &PciFunction) -> Result<Vec<PathBuf>, EngineError> {
        let func = f.clone();
        self.host_read(f.bdf, "read of nvidia's procfs information", move |k| {
            Ok(device_nodes_with(k.root(), &func, &|p| {
                k.read_text(p).ok().flatten()
            }))
        })
    }

    /// One host read through the kernel edge under the read deadline, keyed
    /// by `bdf`: past it the device is quarantined until this read returns
    /// (and only this read lifts it). Every engine read of the host that is
    /// not a function or binding read goes through here.
    pub(super) fn host_read<T: Send + 'static>(
        &self,
        bdf: Bdf,
        what: &str,
        read: impl FnOnce(&dyn Kernel) -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let kernel = Arc::clone(&self.kernel);
        read_with_deadline(
            &self.stuck,
            bdf,
            what,
            self.config.read_deadline,
            move || read(kernel.as_ref()),
        )
        .map_err(|op| EngineError::Stuck {
            bdf,
            op,
            secs: self.config.read_deadline.as_secs_f64(),
        })?
        .map_err(EngineError::from)
    }

    /// nvidia's unbind lock reads "1" (held), read under the read deadline.
    fn unbind_lock_held(&self, bdf: Bdf, path: PathBuf) -> bool {
        self.host_read(bdf, "read of nvidia's unbindLock", move |k| {
            k.read_text(&path)
        })
        .is_ok_and(|v| v.is_some_and(|v| v.trim() == "1"))
    }

    /// Processes holding each GPU's host-driver nodes, from one `/proc` scan
    /// under the command deadline. A scan that blocks or fails reports no
    /// holders here: listings stay available, and a move still checks for itself.
    pub(super) fn host_holders(&self, gpus: &[Gpu]) -> HashMap<Bdf, Vec<NodeHolder>> {
        // The GPU function's own nodes (nvidia, DRM): what a host workload
        // opens. A GPU whose nodes cannot be read in time is quarantined (and
        // so not offered) by the bounded read itself.
        let nodes: Vec<(Bdf, Vec<PathBuf>)> = gpus
            .iter()
            .map(|g| {
                let n = if g.function.on_vfio() {
                    Vec::new()
                } else {
                    self.nodes_of(&g.function).unwrap_or_default()
                };
                (g.bdf(), n)
            })
            .collect();
        let shown = |n: &PathBuf| {
            n.strip_prefix(self.root.path())
                .map(|r| format!("/{}", r.display()))
                .unwrap_or_else(|_| n.display().to_string())
        };
        let per_gpu: Vec<(Bdf, Vec<String>)> = nodes
            .iter()
            .map(|(b, n)| (*b, n.iter().map(shown).collect()))
            .collect();
        let all: Vec<PathBuf> = nodes.into_iter().flat_map(|(_, n)| n).collect();
        if all.is_empty() {
            return HashMap::new();
        }
        // One pass for every GPU; no new thread per call (review n11).
        let found = match self.scanner.holders(all, self.config.command_deadline) {
            Ok(found) => found,
            Err(_) => return HashMap::new(),
        };
        let exception = self.commands.exists(&self.root, "nvidia-smi");
        per_gpu
            .into_iter()
            .filter_map(|(bdf, nodes)| {
                let held: Vec<NodeHolder> = found
                    .iter()
                    .filter(|h| nodes.contains(&h.node))
                    .cloned()
                    .collect();
                let only_persistenced = held.iter().all(|h| h.is_nvidia_persistenced());
                let movable_anyway = held.is_empty() || (only_persistenced && exception);
                (!movable_anyway).then_some((bdf, held))
            })
            .collect()
    }

    pub(super) fn read(&self, bdf: Bdf) -> Result<PciFunction, EngineError> {
        self.read_bounded(bdf).map_err(|e| self.stuck_or(bdf, e))
    }

    pub(super) fn binding(&self, bdf: Bdf) -> Result<Binding, EngineError> {
        let kernel = Arc::clone(&self.kernel);
        self.bounded(bdf, "read of the binding", move || kernel.read_binding(bdf))
            .map_err(|e| self.stuck_or(bdf, e))
    }

    /// A write whose outcome the caller judges by reading the host back
    /// afterwards: a failure is logged, not returned.
    pub(super) fn step_best_effort(&self, gpu: Bdf, op: SysfsWrite) {
        if let Err(e) = self.step(gpu, op) {
            tracing::warn!(%gpu, error = %e, "best-effort host write failed; the state read back decides");
        }
    }

    pub(super) fn step(&self, gpu: Bdf, op: SysfsWrite) -> Result<(), StepError> {
        let step = Step::Write(op.clone());
        match self.write(gpu, op)? {
            Ok(()) => Ok(()),
            Err(source) => Err(StepError::Step { step, source }),
        }
    }

    /// nvidia's unbind lock file for a function on nvidia, when the driver offers one.
    pub(super) fn unbind_lock_path(&self, f: &PciFunction) -> Option<PathBuf> {
        let path = nvidia_unbind_lock_path(&self.root, &f.bdf);
        if f.driver.as_ref().is_none_or(|d| d.as_str() != "nvidia") {
            return None;
        }
        let p = path.clone();
        self.host_read(f.bdf, "read of nvidia's procfs", move |k| k.exists(&p))
            .unwrap_or(false)
            .then_some(path)
    }

    pub(super) fn take_unbind_lock(&self, gpu: Bdf, f: &PciFunction) -> Result<bool, StepError> {
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
            if self.unbind_lock_held(f.bdf, path.clone()) {
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

    /// `driver_override` ← `target`, then unbind from `current`: the override
    /// goes first so that no auto-probe can take the device in between.
    pub(super) fn steer_and_unbind(
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

    pub(super) fn park_on_vfio(&self, gpu: Bdf, bdf: Bdf, vfio: &DriverName) {
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
            self.step_best_effort(
                gpu,
                SysfsWrite::Bind {
                    bdf,
                    driver: vfio.clone(),
                },
            );
        }
    }

    /// Releases nvidia's unbind lock on functions still bound to the nvidia
    /// instance it was taken on. The lock is a flag of that instance: an unbind
    /// drops it with the instance, and a re-probed instance starts unlocked, so
    /// a lock seen there is somebody else's and is left alone. Call this before
    /// anything is re-probed.
    pub(super) fn release_unbind_locks_still_held(&self, gpu: Bdf, rec: &GpuRecord) {
        if !rec.changes.unbind_lock_taken {
            return;
        }
        for fr in &rec.functions {
            let on_nvidia = self
                .binding(fr.bdf)
                .is_ok_and(|b| b.driver.is_some_and(|d| d.as_str() == "nvidia"));
            let path = nvidia_unbind_lock_path(&self.root, &fr.bdf);
            if on_nvidia && self.unbind_lock_held(fr.bdf, path) {
                self.step_best_effort(
                    gpu,
                    SysfsWrite::NvidiaUnbindLock {
                        bdf: fr.bdf,
                        take: false,
                    },
                );
            }
        }
    }
}

/// Errors inside a multi-step operation: an engine error (stop), or a
/// failed host write (roll back).
pub(super) enum StepError {
    Engine(EngineError),
    /// A step failed; `source` keeps the kernel's errno.
    Step {
        step: Step,
        source: io::Error,
    },
}

impl StepError {
    /// A verification that found the host not as the step left it.
    pub(super) fn verify(check: Verification, found: String) -> StepError {
        StepError::Step {
            step: Step::Verify(check),
            source: io::Error::other(found),
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Engine(e) => e.fmt(f),
            StepError::Step { step, source } => write!(f, "{step} failed: {source}"),
        }
    }
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

thread_local! {
    /// The budget of the operation running on this thread: its start and length.
    static BUDGET: std::cell::Cell<Option<(std::time::Instant, std::time::Duration)>> =
        const { std::cell::Cell::new(None) };
}

/// The budget of the operation on this thread, while this guard lives. Every
/// operation of a batch runs on its own thread, so each has its own budget.
pub(super) struct OperationBudget {
    outer: Option<(std::time::Instant, std::time::Duration)>,
}

impl OperationBudget {
    /// Starts a budget of `length` from now.
    pub(super) fn start(length: std::time::Duration) -> Self {
        let outer = BUDGET.replace(Some((std::time::Instant::now(), length)));
        OperationBudget { outer }
    }

    /// No budget while this guard lives: putting things back (rollback) is
    /// never cut short, each of its writes still has its own deadline.
    pub(super) fn suspend() -> Self {
        OperationBudget {
            outer: BUDGET.replace(None),
        }
    }

    /// The budget's length, when it is spent.
    fn spent() -> Option<std::time::Duration> {
        BUDGET
            .get()
            .filter(|(start, length)| start.elapsed() >= *length)
            .map(|(_, length)| length)
    }
}

impl Drop for OperationBudget {
    fn drop(&mut self) {
        BUDGET.set(self.outer);
    }
}

/// The quarantine key of the PCI tree listing: an address no device has
/// (below [`Bdf::HIGHEST`], the key of the intent sources).
pub(super) fn pci_tree_key() -> Bdf {
    Bdf::new(0xffff, 0xff, 0x1f, 6).unwrap_or(Bdf::HIGHEST)
}

/// One function read under the read deadline, keyed by its address (as
/// [`Engine::bounded`] does, for a reader that must own what it uses).
fn bounded_function_read(
    stuck: &StuckSet,
    root: &HostRoot,
    deadline: std::time::Duration,
    bdf: Bdf,
    read: impl FnOnce() -> Result<PciFunction, HostError> + Send + 'static,
) -> Result<PciFunction, HostError> {
    read_with_deadline(stuck, bdf, &format!("read of {bdf}"), deadline, read).unwrap_or_else(
        |blocked| {
            Err(HostError::Io {
                path: root.pci_device_dir(&bdf),
                source: io::Error::new(io::ErrorKind::TimedOut, blocked),
            })
        },
    )
}
