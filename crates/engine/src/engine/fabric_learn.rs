//! fabric_learn: `vfio-gpu-dra fabric learn`, the one operation that binds a
//! GPU to `nvidia` to read its module id through NVML.
//!
//! FM names GPUs by module id, and NVML reads one only while the GPU is on
//! `nvidia`; a GPU on vfio since boot has none readable (reference §6). The
//! admin may let such a GPU visit `nvidia` once: binding to `nvidia` is the
//! operation that can hang on these machines, so it is never done
//! implicitly. The visit is write-ahead: a [`LearnRecord`] is committed
//! before the GPU leaves vfio, and a crash at any step is finished by the next
//! [`Engine::fabric_reconcile`] (back to the recorded vfio driver). Every
//! decision is a pure function in `crate::state` ([`decide_learn`],
//! [`on_pending_learn`]); the moves are the engine's own steps.

use super::steps::StepError;
use super::{Engine, lock};
use std::sync::Arc;

use serde::Serialize;
use vfio_gpu_fabric::{ModuleId, ModuleMapBuilder, ModuleSource};
use vfio_gpu_host::{Bdf, DriverName};

use crate::error::EngineError;
use crate::fabric_state::{LearnRecord, ModuleRecord};
use crate::ledger::FunctionRecord;
use crate::state::{LearnFacts, LearnPlan, OnPendingLearn, decide_learn, on_pending_learn};

/// The host driver NVML needs.
const NVIDIA: &str = "nvidia";

/// What `fabric learn` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LearnOutcome {
    /// The GPU.
    pub bdf: Bdf,
    /// The module id NVML read (`None`: NVML reports none, not a baseboard GPU).
    pub module_id: Option<ModuleId>,
    /// The GPU visited `nvidia` (it was on vfio) and is back.
    pub visited_nvidia: bool,
    /// In words.
    pub detail: String,
}

fn step_err(bdf: Bdf, e: StepError) -> EngineError {
    match e {
        StepError::Engine(e) => e,
        StepError::Step { step, source } => {
            EngineError::Fabric(format!("fabric learn of {bdf}: {step}: {source}"))
        }
    }
}

impl Engine {
    /// Reads `bdf`'s module id through NVML and records it in the ledger's
    /// module map (source NVML, with device id and boot id). A GPU on vfio,
    /// unrecorded and idle visits `nvidia` for the read and goes back to its
    /// vfio driver; a GPU on a host driver is read where it is; anything
    /// else is refused with nothing changed ([`decide_learn`]).
    pub fn fabric_learn(&self, bdf: Bdf) -> Result<LearnOutcome, EngineError> {
        self.check_alive()?;
        let fc = self.config.fabric.as_ref().ok_or_else(|| {
            EngineError::Fabric("no Fabric Manager configured (--fm-endpoint)".into())
        })?;
        let reader = fc.module_ids.clone().ok_or_else(|| {
            EngineError::Fabric(
                "no NVML to read module ids with (--nvml-library, or install libnvidia-ml.so.1)"
                    .into(),
            )
        })?;
        let _hold = self.hold_trusted()?;
        let _op = lock(&self.fabric.op);
        self.finish_pending_learn()?;
        let guard = self.group_guard(bdf);
        let _g = lock(&guard);
        let gpu = self.load_gpu(bdf)?;
        let f = self.read(bdf)?;
        let ledger = self.ledger();
        let mut facts = LearnFacts {
            recorded: ledger.gpus.contains_key(&bdf),
            in_partition: ledger.fabric.partition_of(bdf).is_some(),
            learn_pending: ledger.fabric.learning.is_some(),
            stuck: self.stuck.stuck_on(bdf).is_some(),
            has_driver: f.driver.is_some(),
            on_vfio: f.on_vfio(),
            vfio_in_use: false,
        };
        // The holder scan only when it can change the answer.
        if decide_learn(facts) == LearnPlan::VisitNvidia {
            let mut nodes = Vec::new();
            for m in gpu.functions.iter().filter_map(|m| self.read(m.bdf).ok()) {
                nodes.extend(self.nodes_of(&m)?);
            }
            facts.vfio_in_use = !self.holders_of(bdf, nodes)?.is_empty();
        }
        let device_id = format!("0x{:04x}", f.identity.device);
        match decide_learn(facts) {
            LearnPlan::Refuse(why) => Err(EngineError::Fabric(format!(
                "fabric learn of {bdf} refused: {why}; nothing was changed"
            ))),
            LearnPlan::ReadInPlace => {
                let module = self.read_module_id(&reader, bdf).map_err(|e| {
                    EngineError::Fabric(format!("NVML could not read {bdf}'s module id: {e}"))
                })?;
                self.record_learned(bdf, module, &device_id)?;
                Ok(LearnOutcome {
                    bdf,
                    module_id: module,
                    visited_nvidia: false,
                    detail: format!(
                        "read on {} without moving it",
                        f.driver.as_ref().map_or("?", |d| d.as_str())
                    ),
                })
            }
            LearnPlan::VisitNvidia => {
                let vfio = f.driver.clone().ok_or(EngineError::UnknownGpu(bdf))?;
                let rec = LearnRecord {
                    bdf,
                    vfio_driver: vfio.clone(),
                    original_override: f.driver_override.clone(),
                    boot_id: self.boot_id.clone(),
                    operation: self.new_operation(),
                    extra: Default::default(),
                };
                self.commit(|b| b.fabric.learning = Some(rec.clone()))?;
                let visited = self.visit_nvidia(bdf, &rec, &reader);
                // Back to vfio whatever the read gave; a crash stops here and
                // the next reconcile finishes it.
                let back = self.return_to_vfio(&rec);
                let module = match (visited, back) {
                    (Err(e @ EngineError::SimulatedCrash(_)), _)
                    | (_, Err(e @ EngineError::SimulatedCrash(_))) => return Err(e),
                    (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
                    (Ok(m), Ok(())) => m,
                };
                self.commit(|b| b.fabric.learning = None)?;
                self.record_learned(bdf, module, &device_id)?;
                Ok(LearnOutcome {
                    bdf,
                    module_id: module,
                    visited_nvidia: true,
                    detail: format!("visited nvidia for the read; back on {vfio}"),
                })
            }
        }
    }

    /// vfio → `nvidia`, then the NVML read under the read deadline.
    fn visit_nvidia(
        &self,
        bdf: Bdf,
        rec: &LearnRecord,
        reader: &Arc<dyn super::fabric::ModuleIdReader>,
    ) -> Result<Option<ModuleId>, EngineError> {
        let nvidia = DriverName::new(NVIDIA).map_err(|e| EngineError::Fabric(e.to_string()))?;
        let fr = learn_function(rec);
        self.restore_function(bdf, &fr, Some(&nvidia), Some(&rec.vfio_driver), false)
            .map_err(|e| step_err(bdf, e))?;
        self.read_module_id(reader, bdf).map_err(|e| {
            EngineError::Fabric(format!(
                "NVML could not read {bdf}'s module id on nvidia: {e}"
            ))
        })
    }

    /// Back to the recorded vfio driver and `driver_override`.
    fn return_to_vfio(&self, rec: &LearnRecord) -> Result<(), EngineError> {
        let fr = learn_function(rec);
        let now = self.read(rec.bdf)?;
        if now.driver.as_ref().is_some_and(|d| d.as_str() == NVIDIA) {
            // nvidia lets go only with no clients; the lock says so first.
            self.take_unbind_lock(rec.bdf, &now)
                .map_err(|e| step_err(rec.bdf, e))?;
        }
        self.restore_function(
            rec.bdf,
            &fr,
            Some(&rec.vfio_driver),
            Some(&rec.vfio_driver),
            false,
        )
        .map_err(|e| step_err(rec.bdf, e))
    }

    /// Finishes a learn a crash interrupted ([`on_pending_learn`]). The
    /// caller holds the state and fabric locks.
    pub(super) fn finish_pending_learn(&self) -> Result<(), EngineError> {
        let Some(rec) = self.ledger().fabric.learning.clone() else {
            return Ok(());
        };
        let now = self.read(rec.bdf);
        let present = !(now.is_err() && self.vanished(rec.bdf));
        let on_vfio = now.as_ref().is_ok_and(vfio_gpu_host::PciFunction::on_vfio);
        match on_pending_learn(rec.boot_id == self.boot_id, present, on_vfio) {
            OnPendingLearn::ReturnToVfio => {
                tracing::warn!(gpu = %rec.bdf, "finishing an interrupted fabric learn: back to {}", rec.vfio_driver);
                self.return_to_vfio(&rec)?;
            }
            OnPendingLearn::Drop(why) => {
                tracing::info!(gpu = %rec.bdf, "fabric learn record dropped: {why}");
            }
        }
        self.commit(|b| b.fabric.learning = None)
    }

    /// Records a learned module id, unless it contradicts the admin's static
    /// map (an error: one of them is wrong, and a wrong map cross-wires
    /// tenants).
    fn record_learned(
        &self,
        bdf: Bdf,
        module: Option<ModuleId>,
        device_id: &str,
    ) -> Result<(), EngineError> {
        let Some(module) = module else {
            return Ok(());
        };
        if let Some(path) = self
            .config
            .fabric
            .as_ref()
            .and_then(|f| f.module_map_file.as_ref())
        {
            let mut b = ModuleMapBuilder::new();
            let checked = b
                .add_admin_map_file(path)
                .and_then(|b| b.add(ModuleSource::Nvml, bdf, module))
                .and_then(|b| b.build());
            if let Err(e) = checked {
                return Err(EngineError::Fabric(format!(
                    "NVML reads module {module} for {bdf}, but: {e}; fix the static map {}",
                    path.display()
                )));
            }
        }
        let record = ModuleRecord {
            module_id: module,
            source: ModuleSource::Nvml,
            device_id: device_id.to_string(),
            boot_id: self.boot_id.clone(),
            extra: Default::default(),
        };
        self.commit(|b| {
            b.fabric.module_map.insert(bdf, record);
        })
    }
}

/// The GPU function as a learn restores it: its override as found.
fn learn_function(rec: &LearnRecord) -> FunctionRecord {
    FunctionRecord {
        bdf: rec.bdf,
        original_driver: Some(rec.vfio_driver.clone()),
        original_override: rec.original_override.clone(),
        override_written: None,
        bound_by_us: false,
        // Not a tenant hand-over: a learn returns the GPU as it was.
        fingerprint: None,
        extra: Default::default(),
    }
}
