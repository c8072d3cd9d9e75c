//! Ledger commits (write-ahead, atomic), record constructors and crash points.

use super::{CrashMode, Engine, lock};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use vfio_gpu_host::{Bdf, Gpu, PciFunction};

use crate::error::EngineError;
use crate::ledger::{
    Changes, Durability, FunctionRecord, GpuRecord, Holder, LedgerBody, OpState, now,
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
        {
            // One commit at a time, so the disk sees them in the order memory
            // does; readers take only the memory lock and never wait on the disk.
            let _writing = lock(&self.ledger_writer);
            let mut next = lock(&self.ledger).clone();
            update(&mut next);
            if let Some(gate) = &self.config.ledger_write_gate {
                gate.wait();
            }
            // Disk before memory: a commit that does not reach disk changes nothing.
            self.file.store_with(&next, durability)?;
            self.mirror_commit(&next);
            let mut body = lock(&self.ledger);
            // Operation numbers handed out while this was written are kept.
            next.next_operation = next.next_operation.max(body.next_operation);
            *body = next;
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
