//! One `/proc` holder scan at a time per engine, shared by every operation
//! waiting for one: the requests queued while a scan runs are answered by a
//! single pass over `/proc` for all their nodes (an 8-GPU batch costs one
//! pass, not eight). A caller waits at most its deadline and then answers
//! "busy, retry" without quarantining the GPU: how many descriptors other
//! processes hold is not the GPU's fault (security review M1). A scan that
//! outlives its callers finishes on the one worker thread; no thread piles up
//! behind it (review n11).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::kernel::Kernel;
use crate::preflight::{NodeHolder, holders_among};

/// Requests waiting beyond this many are answered "busy" at once.
const MAX_QUEUED: usize = 64;

struct Request {
    nodes: Vec<PathBuf>,
    reply: mpsc::Sender<Result<Vec<NodeHolder>, String>>,
}

/// The engine's holder scanner (see the module docs).
pub(crate) struct HolderScanner {
    /// The scan goes through the kernel edge (the simulator can block it).
    kernel: Arc<dyn Kernel>,
    queue: Mutex<Option<mpsc::Sender<Request>>>,
    queued: Arc<AtomicUsize>,
    /// How long the last completed pass took, for metrics and messages.
    last: Arc<Mutex<Option<Duration>>>,
    /// Scans asked for (a pass may answer several).
    asked: std::sync::atomic::AtomicU64,
}

impl HolderScanner {
    pub(crate) fn new(kernel: Arc<dyn Kernel>) -> Self {
        HolderScanner {
            kernel,
            queue: Mutex::new(None),
            queued: Arc::new(AtomicUsize::new(0)),
            last: Arc::new(Mutex::new(None)),
            asked: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many scans callers asked for since the engine opened.
    pub(crate) fn asked(&self) -> u64 {
        self.asked.load(Ordering::SeqCst)
    }

    /// The duration of the last completed pass.
    pub(crate) fn last_duration(&self) -> Option<Duration> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sender(&self) -> Option<mpsc::Sender<Request>> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = q.as_ref() {
            return Some(tx.clone());
        }
        let (tx, rx) = mpsc::channel::<Request>();
        let kernel = Arc::clone(&self.kernel);
        let queued = Arc::clone(&self.queued);
        let last = Arc::clone(&self.last);
        std::thread::Builder::new()
            .name("holder-scan".into())
            .spawn(move || worker(kernel.as_ref(), &rx, &queued, &last))
            .ok()?;
        *q = Some(tx.clone());
        Some(tx)
    }

    /// Processes holding any of `nodes` (one entry per process), or why the
    /// scan could not answer within `deadline`.
    pub(crate) fn holders(
        &self,
        nodes: Vec<PathBuf>,
        deadline: Duration,
    ) -> Result<Vec<NodeHolder>, String> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        self.asked.fetch_add(1, Ordering::SeqCst);
        if self.queued.load(Ordering::SeqCst) >= MAX_QUEUED {
            return Err("too many holder scans are waiting; retry".into());
        }
        let Some(tx) = self.sender() else {
            return Err("cannot start the holder scan thread".into());
        };
        let (reply, answer) = mpsc::channel();
        self.queued.fetch_add(1, Ordering::SeqCst);
        if tx.send(Request { nodes, reply }).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            // The worker is gone (it panicked): start a new one next time.
            *self.queue.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err("the holder scan thread stopped; retry".into());
        }
        match answer.recv_timeout(deadline) {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the /proc holder scan did not finish within {:.1} s (many open files on the node); retry",
                deadline.as_secs_f64()
            )),
        }
    }
}

fn worker(
    kernel: &dyn Kernel,
    rx: &mpsc::Receiver<Request>,
    queued: &AtomicUsize,
    last: &Mutex<Option<Duration>>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(r) = rx.try_recv() {
            batch.push(r);
        }
        queued.fetch_sub(batch.len(), Ordering::SeqCst);
        let mut union: Vec<PathBuf> = Vec::new();
        for r in &batch {
            for n in &r.nodes {
                if !union.contains(n) {
                    union.push(n.clone());
                }
            }
        }
        let started = Instant::now();
        let found = kernel.scan_holders(&union);
        *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(started.elapsed());
        for r in batch {
            let answer = match &found {
                Ok(all) => Ok(holders_among(kernel.root(), all, &r.nodes)),
                Err(e) => Err(e.to_string()),
            };
            // A caller that gave up is gone; nothing to do.
            let _ = r.reply.send(answer);
        }
    }
}
