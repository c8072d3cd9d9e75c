//! The [`FabricManager`] trait, the idempotency normalisation every backend
//! shares, and a deadline wrapper.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Call, FmCode, FmError};
use crate::types::{
    Activated, Deactivated, ModuleId, NvlinkFailedDevices, PartitionId, PartitionList,
    UnsupportedPartition,
};

/// One method per Fabric Manager SDK call we use. Implementations connect per
/// operation (so an FM restart between calls costs nothing) and are `Send +
/// Sync`, so the engine can run any call on a worker thread under a deadline
/// ([`DeadlineFm`]).
///
/// # Idempotency
///
/// FM speaks two dialects (reference §4, §13.2–13.5). Implementations
/// normalise both the same way:
///
/// | FM answer | to | result |
/// |---|---|---|
/// | `IN_USE` (−7) or `PARTITION_ID_IN_USE` (−17) | activate | re-query: partition active → `Ok(AlreadyActive(code))`; inactive → `Err(Overlap)`; unlisted → `Err(UnknownPartition)` |
/// | `UNINITIALIZED` (−4) or `PARTITION_ID_NOT_IN_USE` (−18) | deactivate | re-query: listed and inactive → `Ok(NotActive(code))`; otherwise (still active, or the re-query fails because the library really is uninitialised) the original error |
/// | `NOT_CONFIGURED` (−8) or `NOT_READY` (−22) | any | `Err`, [`FmError::is_retryable`] |
///
/// The re-query runs on the same connection as the call.
pub trait FabricManager: Send + Sync {
    /// `fmGetSupportedFabricPartitions`: every partition with `isActive`.
    fn get_supported_partitions(&self) -> Result<PartitionList, FmError>;
    /// `fmActivateFabricPartition` (Shared NVSwitch mode), normalised.
    fn activate(&self, id: PartitionId) -> Result<Activated, FmError>;
    /// `fmDeactivateFabricPartition`, normalised.
    fn deactivate(&self, id: PartitionId) -> Result<Deactivated, FmError>;
    /// `fmSetActivatedFabricPartitions`: the replay FM waits for (60 s) after
    /// a `--restart`; the list may be empty but must be sent.
    fn set_activated_partitions(&self, ids: &[PartitionId]) -> Result<(), FmError>;
    /// `fmGetNvlinkFailedDevices` (always empty on H100+; `NOT_SUPPORTED`
    /// in `--restart` mode is not a health failure).
    fn get_nvlink_failed_devices(&self) -> Result<NvlinkFailedDevices, FmError>;
    /// `fmGetUnsupportedFabricPartitions` (always empty on H100+).
    fn get_unsupported_partitions(&self) -> Result<Vec<UnsupportedPartition>, FmError>;
}

/// One connected session: the raw calls the normalisation needs.
pub(crate) trait Session {
    fn list(&mut self) -> Result<PartitionList, FmError>;
    fn activate_raw(&mut self, id: PartitionId) -> Result<(), FmError>;
    fn deactivate_raw(&mut self, id: PartitionId) -> Result<(), FmError>;
}

/// Activate with the dialects normalised (see [`FabricManager`]).
pub(crate) fn activate_normalised(
    s: &mut dyn Session,
    id: PartitionId,
) -> Result<Activated, FmError> {
    let err = match s.activate_raw(id) {
        Ok(()) => return Ok(Activated::Activated),
        Err(e) => e,
    };
    let Some(code) = err.code().filter(|c| c.is_in_use_dialect()) else {
        return Err(err);
    };
    let Ok(list) = s.list() else {
        return Err(err);
    };
    let Some(p) = list.get(id) else {
        return Err(FmError::UnknownPartition(id));
    };
    if p.is_active {
        return Ok(Activated::AlreadyActive(code));
    }
    let mine: BTreeSet<ModuleId> = p.modules().collect();
    let active = list
        .partitions
        .iter()
        .filter(|o| o.is_active && o.id != id && o.modules().any(|m| mine.contains(&m)))
        .map(|o| o.id)
        .collect();
    Err(FmError::Overlap {
        call: Call::Activate,
        partition: id,
        code,
        active,
    })
}

/// Deactivate with the dialects normalised (see [`FabricManager`]).
pub(crate) fn deactivate_normalised(
    s: &mut dyn Session,
    id: PartitionId,
) -> Result<Deactivated, FmError> {
    let err = match s.deactivate_raw(id) {
        Ok(()) => return Ok(Deactivated::Deactivated),
        Err(e) => e,
    };
    let Some(code) = err.code().filter(|c| c.is_not_in_use_dialect()) else {
        return Err(err);
    };
    match s.list() {
        Ok(list) => match list.get(id) {
            Some(p) if !p.is_active => Ok(Deactivated::NotActive(code)),
            Some(_) => Err(err),
            None => Err(FmError::UnknownPartition(id)),
        },
        Err(_) => Err(err),
    }
}

/// Checks a partition list FM returned: unique partition ids and no
/// duplicate member within a partition (NVIDIA validates the same).
pub(crate) fn validate_list(call: Call, list: &PartitionList) -> Result<(), FmError> {
    let mut ids = BTreeSet::new();
    for p in &list.partitions {
        if !ids.insert(p.id) {
            return Err(FmError::Abi {
                call,
                detail: format!("partition id {} listed twice", p.id),
            });
        }
        let mut members = BTreeSet::new();
        if let Some(dup) = p.modules().find(|m| !members.insert(*m)) {
            return Err(FmError::Abi {
                call,
                detail: format!("partition {} lists GPU {dup} twice", p.id),
            });
        }
    }
    Ok(())
}

/// Maps a raw code to `Ok`/`Err`; shorthand for [`FmError::check`].
pub(crate) fn check(call: Call, raw: i32) -> Result<(), FmError> {
    FmError::check(call, raw)
}

/// The code FM answered an error with, for logs.
pub fn code_text(e: &FmError) -> String {
    e.code()
        .map_or_else(|| e.to_string(), |c: FmCode| c.to_string())
}

/// Sees every call a [`DeadlineFm`] makes: the call, how long it took and
/// its error (`None`: success). Called on the caller's thread; keep it cheap.
pub type FmObserver = Arc<dyn Fn(Call, Duration, Option<&FmError>) + Send + Sync>;

/// Runs every call of an inner [`FabricManager`] on a worker thread and
/// waits at most a deadline (the kubelet gives a whole Prepare 45 s).
///
/// A call past its deadline keeps running (a C call cannot be cancelled); until
/// it returns, new calls fail at once with [`FmError::Stuck`] rather than
/// queueing behind it.
#[derive(Clone)]
pub struct DeadlineFm {
    inner: Arc<dyn FabricManager>,
    deadline: Duration,
    /// Told about every trait call (metrics).
    observer: Option<FmObserver>,
    /// Calls past their deadline and still running, by token.
    blocked: Arc<Mutex<BTreeMap<u64, String>>>,
    next: Arc<AtomicU64>,
    /// Workers waiting for a call: a thread is started only when none is
    /// idle (a start costs more than the call to a local FM). Dropping the
    /// last clone drops the senders, and the idle workers end.
    idle: Arc<Mutex<Vec<mpsc::Sender<Job>>>>,
}

/// One call, run by a worker with the inner backend; it returns the
/// delivery of its result, which the worker runs once it is idle again (so
/// the caller's next call finds it).
type Job = Box<dyn FnOnce(&dyn FabricManager) -> Delivery + Send>;
type Delivery = Box<dyn FnOnce() + Send>;

/// How many finished workers wait for the next call; more concurrent calls
/// than this start threads that end after their call.
const MAX_IDLE_WORKERS: usize = 2;

/// A worker's life: its first call, then more while it is wanted.
fn run_worker(
    inner: Arc<dyn FabricManager>,
    idle: std::sync::Weak<Mutex<Vec<mpsc::Sender<Job>>>>,
    first: Job,
) {
    let mut job = first;
    loop {
        let deliver = job(inner.as_ref());
        // A fresh channel per wait: the worker holds only the receiver, so it
        // ends when the `DeadlineFm` (and with it the sender) is gone.
        let (tx, rx) = mpsc::channel();
        let queued = idle.upgrade().is_some_and(|idle| {
            let mut idle = lock(&idle);
            idle.len() < MAX_IDLE_WORKERS && {
                idle.push(tx);
                true
            }
        });
        deliver();
        if !queued {
            return;
        }
        match rx.recv() {
            Ok(next) => job = next,
            Err(_) => return,
        }
    }
}

impl DeadlineFm {
    /// Wraps `inner`; each trait call waits at most `deadline`.
    pub fn new(inner: Arc<dyn FabricManager>, deadline: Duration) -> Self {
        DeadlineFm {
            inner,
            deadline,
            observer: None,
            blocked: Arc::new(Mutex::new(BTreeMap::new())),
            next: Arc::new(AtomicU64::new(0)),
            idle: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The same FM, telling `observer` about every trait call: which call,
    /// how long it took (at most the deadline) and its error, if any.
    #[must_use]
    pub fn observed(mut self, observer: FmObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The default deadline.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// A call still running past its deadline, if any.
    pub fn blocked_on(&self) -> Option<String> {
        lock(&self.blocked).values().next().cloned()
    }

    /// Runs `f` against the inner backend on a worker thread, waiting at most
    /// `deadline`.
    pub fn call_within<T, F>(&self, what: &str, deadline: Duration, f: F) -> Result<T, FmError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn FabricManager) -> Result<T, FmError> + Send + 'static,
    {
        if let Some(b) = self.blocked_on() {
            return Err(FmError::Stuck(b));
        }
        let (tx, rx) = mpsc::channel();
        let inner = Arc::clone(&self.inner);
        let blocked = Arc::clone(&self.blocked);
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let job: Job = Box::new(move |fm: &dyn FabricManager| {
            let result = f(fm);
            Box::new(move || {
                // Send under the lock: the caller's timeout path checks the
                // channel under the same lock before it marks the call
                // blocked, so the mark is always cleared here.
                let mut b = lock(&blocked);
                // A caller past its deadline stopped listening; nothing to tell it.
                let _ = tx.send(result);
                if let Some(what) = b.remove(&token) {
                    tracing::warn!(call = %what, after = ?start.elapsed(), "blocked Fabric Manager call returned");
                }
            })
        });
        // An idle worker takes it; else a new one (a worker gone since it
        // queued itself hands the job back).
        let mut job = Some(job);
        while let Some(j) = job.take() {
            let Some(worker) = lock(&self.idle).pop() else {
                job = Some(j);
                break;
            };
            if let Err(mpsc::SendError(j)) = worker.send(j) {
                job = Some(j);
            }
        }
        if let Some(j) = job {
            let idle = Arc::downgrade(&self.idle);
            thread::Builder::new()
                .name("fabric-manager".into())
                .spawn(move || run_worker(inner, idle, j))
                .map_err(|e| FmError::Worker(format!("cannot start a worker thread: {e}")))?;
        }
        match rx.recv_timeout(deadline) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(FmError::Worker(format!("{what}: worker thread died")))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let mut b = lock(&self.blocked);
                // The worker may have finished between the timeout and the lock.
                if let Ok(r) = rx.try_recv() {
                    return r;
                }
                b.insert(token, what.to_string());
                Err(FmError::Deadline {
                    what: what.to_string(),
                    waited: deadline,
                })
            }
        }
    }

    fn call<T, F>(&self, call: Call, f: F) -> Result<T, FmError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn FabricManager) -> Result<T, FmError> + Send + 'static,
    {
        let start = Instant::now();
        let r = self.call_within(call.symbol(), self.deadline, f);
        if let Some(o) = &self.observer {
            o(call, start.elapsed(), r.as_ref().err());
        }
        r
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FabricManager for DeadlineFm {
    fn get_supported_partitions(&self) -> Result<PartitionList, FmError> {
        self.call(Call::GetSupportedPartitions, |fm| {
            fm.get_supported_partitions()
        })
    }
    fn activate(&self, id: PartitionId) -> Result<Activated, FmError> {
        self.call(Call::Activate, move |fm| fm.activate(id))
    }
    fn deactivate(&self, id: PartitionId) -> Result<Deactivated, FmError> {
        self.call(Call::Deactivate, move |fm| fm.deactivate(id))
    }
    fn set_activated_partitions(&self, ids: &[PartitionId]) -> Result<(), FmError> {
        let ids = ids.to_vec();
        self.call(Call::SetActivatedPartitions, move |fm| {
            fm.set_activated_partitions(&ids)
        })
    }
    fn get_nvlink_failed_devices(&self) -> Result<NvlinkFailedDevices, FmError> {
        self.call(Call::GetNvlinkFailedDevices, |fm| {
            fm.get_nvlink_failed_devices()
        })
    }
    fn get_unsupported_partitions(&self) -> Result<Vec<UnsupportedPartition>, FmError> {
        self.call(Call::GetUnsupportedPartitions, |fm| {
            fm.get_unsupported_partitions()
        })
    }
}
