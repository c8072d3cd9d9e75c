//! Ledger commits (write-ahead, atomic), record constructors and crash points.

use super::{CrashMode, Engine, lock};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use vfio_gpu_host::{Bdf, Gpu, PciFunction};

use crate::error::EngineError;
use crate::ledger::{
    Changes, Durability, FunctionRecord, GpuRecord, Holder, LedgerBody, LedgerError, OpState, now,
};

impl Engine {
    pub(super) fn check_alive(&self) -> Result<(), EngineError> {
        if self.crashed.load(Ordering::SeqCst) {
            return Err(EngineError::SimulatedCrash(
                self.steps.load(Ordering::SeqCst),
            ));
        }
        Ok(())
    }

    /// Counts a mutation and fires the crash hook.
    pub(super) fn mutation_done(&self) -> Result<(), EngineError> {
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

    /// Records `update` in the ledger, on disk before memory: when this
    /// returns Ok the change is durable; on error it changed nothing.
    ///
    /// Group commit: concurrent commits (the GPUs of one claim move on their
    /// own threads) stage their updates in order on one pending body, and one
    /// write takes every update staged before it, so eight GPUs cost about two
    /// writes (each is two fsyncs, and two more for the boot mirror) instead of
    /// eight in a row. Every caller still returns only after a write that holds
    /// its update, so each record still precedes the host write it announces.
    pub(super) fn commit(&self, update: impl FnOnce(&mut LedgerBody)) -> Result<(), EngineError> {
        self.commit_with(Durability::Disk, update)
    }

    /// [`Engine::commit`] as far as `durability` asks (see [`Durability`]).
    pub(super) fn commit_with(
        &self,
        durability: Durability,
        update: impl FnOnce(&mut LedgerBody),
    ) -> Result<(), EngineError> {
        self.check_alive()?;
        let mine = {
            let mut staged = lock(&self.staged);
            let body = staged
                .body
                .get_or_insert_with(|| lock(&self.ledger).clone());
            update(body);
            // A claim's partition record rides with the commit that
            // completes its last GPU move (`Engine::fabric_ride`).
            self.land_rides(body);
            staged.last_staged += 1;
            // A batch is fsynced when any update in it asks for the disk.
            staged.pending_disk |= durability == Durability::Disk;
            staged.last_staged
        };
        {
            // One write at a time, so the disk sees bodies in the order memory
            // does; readers take only the memory lock and never wait on the disk.
            let _writing = lock(&self.ledger_writer);
            let (next, upto, write_durability) = {
                let mut staged = lock(&self.staged);
                if let Some(e) = staged.failure_of(mine) {
                    return Err(e.into());
                }
                if staged.last_durable >= mine {
                    // An earlier write took this update with its own.
                    drop(staged);
                    return self.mutation_done();
                }
                let mut next = staged
                    .body
                    .clone()
                    .unwrap_or_else(|| lock(&self.ledger).clone());
                // Operation numbers are handed out in memory, outside commits.
                next.next_operation = next.next_operation.max(lock(&self.ledger).next_operation);
                let write_durability = if std::mem::take(&mut staged.pending_disk) {
                    Durability::Disk
                } else {
                    durability
                };
                (next, staged.last_staged, write_durability)
            };
            if let Some(gate) = &self.config.ledger_write_gate {
                gate.wait();
            }
            // Disk before memory: a commit that does not reach disk changes nothing.
            if let Err(e) = self.file.store_with(&next, write_durability) {
                lock(&self.staged).fail_pending(self.file.path(), &e);
                return Err(e.into());
            }
            self.ledger_writes.fetch_add(1, Ordering::SeqCst);
            self.mirror_commit(&next);
            {
                let mut body = lock(&self.ledger);
                let mut next = next;
                // Operation numbers handed out while this was written are kept.
                next.next_operation = next.next_operation.max(body.next_operation);
                *body = next;
            }
            let mut staged = lock(&self.staged);
            staged.last_durable = upto;
            if staged.last_staged == upto {
                // Nothing newer staged: the next update starts from memory
                // (which a reload may replace while no operation runs).
                staged.body = None;
            }
        }
        self.mutation_done()
    }

    pub(super) fn new_operation(&self) -> u64 {
        let mut body = lock(&self.ledger);
        body.next_operation += 1;
        body.next_operation
    }

    /// The record of a GPU that was already on vfio when we looked: nothing of
    /// ours to undo, so no override written and no changes.
    pub(super) fn found_on_vfio_record(
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
            functions: funcs.iter().map(FunctionRecord::as_found).collect(),
            changes: Changes::default(),
            stuck_on: None,
            boot_id: self.boot_id.clone(),
            operation: self.new_operation(),
            updated: 0,
            handover: None,
            unbound_by_pin: Vec::new(),
            served: false,
            extra: BTreeMap::new(),
        }
    }

    pub(super) fn set_record(&self, bdf: Bdf, rec: Option<GpuRecord>) -> Result<(), EngineError> {
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

    pub(super) fn update_record(
        &self,
        bdf: Bdf,
        f: impl FnOnce(&mut GpuRecord),
    ) -> Result<(), EngineError> {
        self.commit(|b| {
            if let Some(r) = b.gpus.get_mut(&bdf) {
                f(r);
                r.updated = now();
            }
        })
    }
}

/// Ledger updates staged by concurrent commits and not yet written
/// ([`Engine::commit`]); numbers count staged updates from 1.
#[derive(Debug, Default)]
pub(super) struct StagedCommits {
    /// The last written body plus every update staged since, in staging
    /// order; `None` while nothing is staged.
    body: Option<LedgerBody>,
    /// Number of the last staged update.
    last_staged: u64,
    /// Number of the last update written to disk and memory.
    last_durable: u64,
    /// Whether a staged, unwritten update asked for [`Durability::Disk`].
    pending_disk: bool,
    /// Updates a failed write dropped: their numbers and the write's failure.
    failed: Vec<DroppedUpdates>,
}

/// Staged updates `first..=last`, dropped because the write holding them failed.
#[derive(Debug)]
struct DroppedUpdates {
    first: u64,
    last: u64,
    path: PathBuf,
    kind: std::io::ErrorKind,
    error: String,
}

impl StagedCommits {
    /// The error for update `n` when a failed write dropped it.
    fn failure_of(&self, n: u64) -> Option<LedgerError> {
        self.failed
            .iter()
            .find(|d| (d.first..=d.last).contains(&n))
            .map(|d| LedgerError::Write {
                path: d.path.clone(),
                source: std::io::Error::new(
                    d.kind,
                    format!(
                        "written together with updates whose write failed: {}",
                        d.error
                    ),
                ),
            })
    }

    /// A write of `path` failed: every staged update not yet written is
    /// dropped (later ones were staged on top of the failed ones) and their
    /// commits fail with it.
    fn fail_pending(&mut self, path: PathBuf, e: &LedgerError) {
        let kind = match e {
            LedgerError::Write { source, .. } => source.kind(),
            _ => std::io::ErrorKind::Other,
        };
        if self.last_staged > self.last_durable {
            self.failed.push(DroppedUpdates {
                first: self.last_durable + 1,
                last: self.last_staged,
                path,
                kind,
                error: e.to_string(),
            });
        }
        // Failures are rare and each waiter looks once: keep the recent ones.
        if self.failed.len() > 64 {
            self.failed.remove(0);
        }
        self.last_durable = self.last_staged;
        self.pending_disk = false;
        self.body = None;
    }
}
