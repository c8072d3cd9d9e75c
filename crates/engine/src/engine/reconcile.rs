//! reconcile: finishing or rolling back interrupted operations, recording GPUs found on vfio.

use super::batch::in_parallel;
use super::release::SettlePath;
use super::view::{Action, Outcome, ReconcileResult, reasons_text};
use super::{Engine, lock};
use std::time::Instant;

use vfio_gpu_host::{Bdf, Gpu, PciFunction};

use crate::error::EngineError;
use crate::ledger::{GpuRecord, OpState};
use crate::state::{OnReconcile, OnUnrecorded, on_unrecorded};

impl Engine {
    pub(super) fn reconcile_record(
        &self,
        gpu: &Gpu,
        rec: GpuRecord,
    ) -> Result<Outcome, EngineError> {
        let started = Instant::now();
        let bdf = gpu.bdf();
        let fn0 = &gpu.function;
        match rec.on_reconcile(fn0.driver.is_some(), fn0.on_vfio()) {
            OnReconcile::Settle => {
                let path = match rec.state {
                    OpState::Configuring => SettlePath::Rollback,
                    _ => SettlePath::FinishRelease,
                };
                self.settle(bdf, &rec, path, started)
            }
            OnReconcile::NoteHeld => {
                let drift: Vec<String> = gpu
                    .functions
                    .iter()
                    .filter(|f| !f.on_vfio())
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
            OnReconcile::Drop(why) => {
                self.set_record(bdf, None)?;
                Ok(self.outcome(gpu, Action::Noted, why.into(), started))
            }
            OnReconcile::Keep(why) => Ok(self.outcome(gpu, Action::Noted, why.into(), started)),
        }
    }

    /// Brings host and ledger back in line: finishes or rolls back
    /// interrupted operations, records GPUs found on vfio without a record of
    /// ours as admin-owned. A GPU without a record is never written to.
    pub fn reconcile(&self) -> Result<Vec<ReconcileResult>, EngineError> {
        let _hold = self.hold_trusted()?;
        let (views, _) = self.discover()?;
        let mut out = Vec::new();
        let ledger_gpus: Vec<Bdf> = self.ledger().gpus.keys().copied().collect();
        for bdf in ledger_gpus {
            if !views.iter().any(|v| v.gpu.bdf() == bdf) {
                let result = if self.vanished(bdf) {
                    self.forget_vanished(bdf, Instant::now())
                } else {
                    self.not_selected(bdf)
                };
                out.push(result.map_err(|e| (bdf, e)));
            }
        }
        // Side by side, as a batch: one GPU waiting out a deadline must not
        // hold the others (GPUs of one IOMMU group still take turns).
        let bdfs: Vec<Bdf> = views.iter().map(|v| v.gpu.bdf()).collect();
        let results = in_parallel(&bdfs, |b| *b, |b| self.reconcile_one(*b));
        out.extend(
            bdfs.into_iter()
                .zip(results)
                .map(|(bdf, r)| r.map_err(|e| (bdf, e))),
        );
        self.retry_persistence()?;
        Ok(out)
    }

    /// A record for a device that exists but is not among the GPUs seen: one
    /// this engine's selector does not select (a record adopted from another
    /// installation's mirror, or a changed `--gpu-id`) is left as it is, with
    /// a note; a selected one that could not be read is an error.
    fn not_selected(&self, bdf: Bdf) -> Result<Outcome, EngineError> {
        let f = self.read(bdf)?;
        if self.selector.matches(&f) {
            return Err(EngineError::UnknownGpu(bdf));
        }
        Ok(Outcome {
            bdf,
            action: Action::Noted,
            detail: "recorded, but not a GPU this instance's selector picks: record left as it is"
                .into(),
            functions: Vec::new(),
            iommu_group: f.iommu_group,
            vfio_devices: Vec::new(),
            millis: 0,
        })
    }

    pub(super) fn reconcile_one(&self, bdf: Bdf) -> Result<Outcome, EngineError> {
        let started = Instant::now();
        let guard = self.group_guard(bdf);
        let _g = lock(&guard);
        let gpu = self.load_gpu(bdf)?;
        if let Some(mut rec) = self.ledger().gpus.get(&bdf).cloned() {
            if let Some(op) = rec.stuck_on.clone() {
                // Here, or in another live process (a rolling update's other
                // instance, the CLI): its claim in the state directory says (n4).
                // Every function the record names: one whose read blocks
                // behind the held lock is missing from the GPU as loaded now.
                if rec.functions.iter().any(|f| {
                    self.stuck.stuck_on(f.bdf).is_some() || self.stuck.blocked_elsewhere(f.bdf)
                }) {
                    return Err(EngineError::Stuck { bdf, op, secs: 0.0 });
                }
                // The blocked write has returned, or the process that made it is gone.
                rec.stuck_on = None;
                self.update_record(bdf, |r| r.stuck_on = None)?;
            }
            return self.reconcile_record(&gpu, rec);
        }
        let driverless: Vec<String> = gpu
            .functions
            .iter()
            .filter(|f| f.driver.is_none())
            .map(|f| f.bdf.to_string())
            .collect();
        match on_unrecorded(gpu.function.on_vfio(), !driverless.is_empty()) {
            OnUnrecorded::AdoptAsAdminOwned => {
                let intent = self.intent()?;
                let verdict = self.verdict(&intent, &gpu);
                let funcs: Vec<PciFunction> = gpu
                    .functions
                    .iter()
                    .filter_map(|f| self.read(f.bdf).ok())
                    .collect();
                let rec = self.found_on_vfio_record(&gpu, &funcs, OpState::Prebound, None);
                self.set_record(bdf, Some(rec))?;
                Ok(self.outcome(
                    &gpu,
                    Action::RecordedPrebound,
                    format!(
                        "on vfio without a record of ours: admin-owned ({})",
                        reasons_text(&verdict)
                    ),
                    started,
                ))
            }
            OnUnrecorded::LeaveAsFound => Ok(self.outcome(
                &gpu,
                Action::Noted,
                format!(
                    "{} without a driver and no record of ours: left as found \
                     (someone else unbound it; bind it, or prepare it to move it to vfio)",
                    driverless.join(", ")
                ),
                started,
            )),
            OnUnrecorded::Nothing => {
                Ok(self.outcome(&gpu, Action::Noted, "nothing to do".into(), started))
            }
        }
    }
}
