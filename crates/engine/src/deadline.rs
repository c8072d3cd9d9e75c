//! Runs host writes that can block (unbind waits for the driver's `remove()`,
//! unkillably) on worker threads with a deadline.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vfio_gpu_host::Bdf;

use crate::kernel::{Kernel, SysfsWrite};
use crate::lock::StateLock;

/// Outcome of a write run with a deadline.
#[derive(Debug)]
pub enum Timed {
    /// The write returned in time.
    Done(io::Result<()>),
    /// The write is still running past the deadline; its device is marked stuck.
    Stuck {
        /// How long we waited.
        waited: Duration,
    },
}

/// What a write that outlived its deadline eventually returned.
#[derive(Clone, Debug)]
pub struct LateResult {
    /// The write.
    pub op: String,
    /// `Ok` or the error text.
    pub result: Result<(), String>,
    /// When it returned.
    pub finished: Instant,
}

/// Devices with a write still running past its deadline. A stuck device is
/// not touched again until that write returns.
#[derive(Clone, Default)]
pub struct StuckSet {
    inner: Arc<Mutex<StuckInner>>,
    /// The state directory, where a blocked write's owner holds
    /// `stuck-<BDF>.lock` until the write returns or the process dies, so
    /// another process can tell a live blocked write from a dead one (n4).
    lock_dir: Option<Arc<PathBuf>>,
}

/// A write past its deadline, and this process's claim on it.
struct Running {
    op: String,
    /// Released (closed) when the write returns or the process dies.
    _owner: Option<StateLock>,
}

#[derive(Default)]
struct StuckInner {
    /// Writes past their deadline. At most one per device: a device with a
    /// running write is refused further writes, so threads cannot pile up.
    running: HashMap<Bdf, Running>,
    /// Reads past their deadline (attributes that take the device lock block
    /// while an unbind holds it). At most one per device, like writes; each
    /// with the token of the read that set it.
    reading: HashMap<Bdf, (u64, String)>,
    late: HashMap<Bdf, LateResult>,
}

/// Idle worker threads kept for bounded host calls: a thread per call costs
/// tens of microseconds, and an operation makes dozens of calls.
const IDLE_WORKERS: usize = 8;

type Job = Box<dyn FnOnce() + Send>;

/// Idle workers waiting for a job, each behind its own channel.
static IDLE: Mutex<Vec<mpsc::Sender<Job>>> = Mutex::new(Vec::new());

/// Runs `job` on an idle worker, or a new one when none is idle (a worker
/// whose call blocks is simply not idle: blocked calls never delay others).
fn run_on_worker(job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let mut job: Job = Box::new(job);
    loop {
        let idle = IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let Some(tx) = idle else { break };
        match tx.send(job) {
            Ok(()) => return Ok(()),
            // That worker is gone; try the next.
            Err(mpsc::SendError(back)) => job = back,
        }
    }
    thread::Builder::new()
        .name("host-call".into())
        .spawn(move || {
            let mut next = Some(job);
            while let Some(job) = next.take() {
                job();
                let (tx, rx) = mpsc::channel::<Job>();
                {
                    let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
                    if idle.len() >= IDLE_WORKERS {
                        return;
                    }
                    idle.push(tx);
                }
                // Idle workers exit after a while; the pool refills on demand.
                next = rx.recv_timeout(Duration::from_secs(30)).ok();
            }
        })
        .map(|_| ())
}

/// Tokens of bounded reads: which read owns a quarantine.
static NEXT_READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn stuck_lock_name(bdf: Bdf) -> String {
    format!("stuck-{bdf}.lock")
}

impl StuckSet {
    /// A set whose blocked writes are also claimed in `state_dir`, visible
    /// to other processes ([`StuckSet::blocked_elsewhere`]).
    pub fn with_lock_dir(state_dir: PathBuf) -> Self {
        StuckSet {
            inner: Arc::default(),
            lock_dir: Some(Arc::new(state_dir)),
        }
    }

    /// True while another live process has a write on `bdf` still blocked
    /// (or when that cannot be told: a lock file that cannot be opened).
    pub fn blocked_elsewhere(&self, bdf: Bdf) -> bool {
        let Some(dir) = &self.lock_dir else {
            return false;
        };
        if self.lock().running.contains_key(&bdf) {
            return false;
        }
        match StateLock::held_by_other(dir, &stuck_lock_name(bdf)) {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(%bdf, error = %e, "cannot tell whether another process's write is still blocked; assuming it is");
                true
            }
        }
    }

    /// The write (or read) still running on `bdf` past its deadline, if any:
    /// such a device is quarantined until it returns.
    pub fn stuck_on(&self, bdf: Bdf) -> Option<String> {
        let inner = self.lock();
        inner
            .running
            .get(&bdf)
            .map(|r| r.op.clone())
            .or_else(|| inner.reading.get(&bdf).map(|(_, what)| what.clone()))
    }
    /// Takes the result of a write on `bdf` that returned after its deadline.
    pub fn take_late(&self, bdf: Bdf) -> Option<LateResult> {
        self.lock().late.remove(&bdf)
    }
    /// Every device with a write still running.
    pub fn all(&self) -> Vec<(Bdf, String)> {
        self.lock()
            .running
            .iter()
            .map(|(b, r)| (*b, r.op.clone()))
            .collect()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, StuckInner> {
        // A panic elsewhere must not make stuck devices look free.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs `read` (reads of `bdf`) on a worker thread and waits at most
/// `deadline`. While an earlier read of `bdf` is still blocked, refuses at once.
pub fn read_with_deadline<T: Send + 'static>(
    stuck: &StuckSet,
    bdf: Bdf,
    what: &str,
    deadline: Duration,
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if let Some(blocked) = stuck.stuck_on(bdf) {
        return Err(format!("{blocked} is still blocked"));
    }
    let (tx, rx) = mpsc::channel();
    let stuck2 = stuck.clone();
    // The quarantine this read may set is lifted only by this read's own
    // return, never by another read of the same device that returns (n7).
    let token = NEXT_READ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let spawned = run_on_worker(move || {
        let result = read();
        let mut inner = stuck2.lock();
        if inner.reading.get(&bdf).is_some_and(|(t, _)| *t == token) {
            inner.reading.remove(&bdf);
        }
        drop(inner);
        // The caller stops listening when the deadline passed; the result is then unwanted.
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        return Err(format!("cannot start a reader thread: {e}"));
    }
    match rx.recv_timeout(deadline) {
        Ok(r) => Ok(r),
        Err(_) => {
            let mut inner = stuck.lock();
            match rx.try_recv() {
                Ok(r) => Ok(r),
                Err(_) => {
                    let text = format!("{what} (blocked {:.1} s)", deadline.as_secs_f64());
                    inner.reading.insert(bdf, (token, what.to_string()));
                    Err(text)
                }
            }
        }
    }
}

/// Runs `op` on a worker thread and waits at most `deadline`. A device
/// with a write still running is refused at once (`Timed::Stuck` with no wait).
pub fn run_with_deadline(
    kernel: &Arc<dyn Kernel>,
    op: &SysfsWrite,
    deadline: Duration,
    stuck: &StuckSet,
) -> Timed {
    // A device with a blocked read or write is not written (n7), here or in
    // another live process (whose ledger write may have failed, so only its
    // claim in the state directory says so).
    if stuck.stuck_on(op.bdf()).is_some() || stuck.blocked_elsewhere(op.bdf()) {
        return Timed::Stuck {
            waited: Duration::ZERO,
        };
    }
    let (tx, rx) = mpsc::channel();
    let k = Arc::clone(kernel);
    let op2 = op.clone();
    let stuck2 = stuck.clone();
    let start = Instant::now();
    let spawned = run_on_worker(move || {
        let result = k.write(&op2);
        let mut inner = stuck2.lock();
        // If the caller already gave up, the send fails: record the late result.
        if inner.running.remove(&op2.bdf()).is_some() {
            inner.late.insert(
                op2.bdf(),
                LateResult {
                    op: op2.to_string(),
                    result: result.as_ref().map(|_| ()).map_err(|e| e.to_string()),
                    finished: Instant::now(),
                },
            );
        }
        // The caller stops listening when the deadline passed; the result is then unwanted.
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        return Timed::Done(Err(e));
    }
    match rx.recv_timeout(deadline) {
        Ok(r) => Timed::Done(r),
        Err(_) => {
            let mut inner = stuck.lock();
            // The worker may have finished between the timeout and the lock.
            match rx.try_recv() {
                Ok(r) => Timed::Done(r),
                Err(_) => {
                    let owner = stuck.lock_dir.as_ref().and_then(|dir| {
                        StateLock::acquire_named(dir, &stuck_lock_name(op.bdf()), Duration::ZERO)
                            .inspect_err(|e| tracing::warn!(error = %e, "cannot claim the blocked write in the state directory"))
                            .ok()
                    });
                    inner.running.insert(
                        op.bdf(),
                        Running {
                            op: op.to_string(),
                            _owner: owner,
                        },
                    );
                    Timed::Stuck {
                        waited: start.elapsed(),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review n7: a blocked read's quarantine is lifted only by that read's
    /// return, not by another read of the same device that returns first; and
    /// a device with a blocked read is not written.
    #[test]
    fn a_quarantine_is_lifted_only_by_the_read_that_set_it() {
        let stuck = StuckSet::default();
        let bdf: Bdf = "0000:66:00.0".parse().unwrap();
        let (release_slow, slow_gate) = mpsc::channel::<()>();
        let (release_fast, fast_gate) = mpsc::channel::<()>();
        // A read that is already running when the slow one times out.
        let s2 = stuck.clone();
        let fast = thread::spawn(move || {
            read_with_deadline(
                &s2,
                bdf,
                "discover read",
                Duration::from_secs(5),
                move || {
                    let _ = fast_gate.recv();
                },
            )
        });
        thread::sleep(Duration::from_millis(50));
        let r = read_with_deadline(
            &stuck,
            bdf,
            "holder scan",
            Duration::from_millis(50),
            move || {
                let _ = slow_gate.recv();
            },
        );
        assert!(r.is_err(), "the slow read timed out");
        assert_eq!(stuck.stuck_on(bdf).as_deref(), Some("holder scan"));
        // The other read returns: the scan is still hung, the quarantine stays.
        release_fast.send(()).unwrap();
        assert!(fast.join().unwrap().is_ok());
        assert_eq!(stuck.stuck_on(bdf).as_deref(), Some("holder scan"));
        // Writes are refused while a read is blocked.
        let kernel: Arc<dyn Kernel> = Arc::new(NeverWrite);
        let op = SysfsWrite::DriversProbe { bdf };
        assert!(matches!(
            run_with_deadline(&kernel, &op, Duration::from_secs(1), &stuck),
            Timed::Stuck { .. }
        ));
        // Its own return lifts it.
        release_slow.send(()).unwrap();
        let start = Instant::now();
        while stuck.stuck_on(bdf).is_some() && start.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(stuck.stuck_on(bdf), None);
    }

    /// A write another live process has blocked on a device (its claim held
    /// in the state directory) refuses every write here, even with nothing in
    /// the ledger saying so (its ledger write may have failed: model I9
    /// counterexample, session 11). Checking never creates a lock file.
    #[test]
    #[allow(clippy::disallowed_methods)] // the state directory, not the host
    fn a_device_blocked_in_another_process_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let bdf: Bdf = "0000:66:00.0".parse().unwrap();
        let here = StuckSet::with_lock_dir(dir.path().to_path_buf());
        let writes = Arc::new(CountWrites::default());
        let kernel: Arc<dyn Kernel> = writes.clone();
        let op = SysfsWrite::DriversProbe { bdf };
        // Free, and probed without a file appearing.
        assert!(!here.blocked_elsewhere(bdf));
        assert!(std::fs::symlink_metadata(dir.path().join(stuck_lock_name(bdf))).is_err());
        // The other process's claim on its blocked write.
        let other =
            StateLock::acquire_named(dir.path(), &stuck_lock_name(bdf), Duration::ZERO).unwrap();
        assert!(here.blocked_elsewhere(bdf));
        assert!(matches!(
            run_with_deadline(&kernel, &op, Duration::from_secs(1), &here),
            Timed::Stuck { .. }
        ));
        assert_eq!(writes.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        // Its write returned (or it died): the claim is gone, the file stays.
        drop(other);
        assert!(!here.blocked_elsewhere(bdf));
        assert!(matches!(
            run_with_deadline(&kernel, &op, Duration::from_secs(1), &here),
            Timed::Done(Ok(()))
        ));
        assert_eq!(writes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[derive(Default)]
    struct CountWrites(std::sync::atomic::AtomicUsize);
    impl Kernel for CountWrites {
        fn root(&self) -> &vfio_gpu_host::HostRoot {
            unreachable!("not read")
        }
        fn write(&self, _op: &SysfsWrite) -> io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    struct NeverWrite;
    impl Kernel for NeverWrite {
        fn root(&self) -> &vfio_gpu_host::HostRoot {
            unreachable!("not read")
        }
        fn write(&self, _op: &SysfsWrite) -> io::Result<()> {
            panic!("a quarantined device was written")
        }
    }
}
