//! unconfigure and rollback: returning functions to their recorded drivers.

use super::persistence::persistence_left_off;
use super::steps::{OperationBudget, StepError};
use super::view::{Action, Outcome, reasons_text};
use super::{Engine, lock};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use vfio_gpu_host::{Bdf, DriverName, Gpu};

use crate::error::EngineError;
use crate::kernel::SysfsWrite;
use crate::ledger::{FunctionRecord, GpuRecord, Holder, OpState};
use crate::preflight::{NodeHolder, device_nodes};
use crate::state::OnRelease;
use vfio_gpu_intent::ReleaseDecision;

impl Engine {
    /// Puts one function back where its record says it came from.
    pub(super) fn restore_function(
        &self,
        gpu: Bdf,
        fr: &FunctionRecord,
        vfio: Option<&DriverName>,
    ) -> Result<(), StepError> {
        let cur = self.binding(fr.bdf)?;
        let at_origin = cur.driver == fr.original_driver;
        if !at_origin {
            match &fr.original_driver {
                Some(orig) => {
                    // An explicit override also beats a stray vfio-pci dynid on re-probe.
                    self.steer_and_unbind(gpu, fr.bdf, orig, cur.driver.as_ref())?;
                    let bound = self.step(
                        gpu,
                        SysfsWrite::Bind {
                            bdf: fr.bdf,
                            driver: orig.clone(),
                        },
                    );
                    let now_on = self.binding(fr.bdf)?.driver;
                    if now_on.as_ref() != Some(orig) {
                        let cause = match bound {
                            Err(StepError::Step { source, .. }) => source,
                            Err(e) => return Err(e),
                            Ok(()) => std::io::Error::other(format!(
                                "driver is {}",
                                now_on.map(|d| d.to_string()).unwrap_or("none".into())
                            )),
                        };
                        // Never leave it without a driver: back to vfio.
                        if let Some(v) = vfio {
                            self.park_on_vfio(gpu, fr.bdf, v);
                        }
                        return Err(StepError::Step {
                            step: format!("bind {} to {orig}", fr.bdf),
                            source: cause,
                        });
                    }
                }
                None => {
                    if let Some(d) = &cur.driver {
                        // A manual unbind does not re-probe: it stays driverless, as it was.
                        self.step(
                            gpu,
                            SysfsWrite::Unbind {
                                bdf: fr.bdf,
                                driver: d.clone(),
                            },
                        )?;
                    }
                }
            }
        }
        let cur = self.binding(fr.bdf)?;
        if cur.driver_override != fr.original_override {
            self.step(
                gpu,
                SysfsWrite::DriverOverride {
                    bdf: fr.bdf,
                    driver: fr.original_override.clone(),
                },
            )?;
        }
        Ok(())
    }

    /// Returns every function of a record to its origin (a failed or
    /// interrupted configure) and drops the record.
    pub(super) fn rollback(&self, bdf: Bdf) -> Result<(), EngineError> {
        let _no_budget = OperationBudget::suspend();
        let Some(rec) = self.ledger().gpus.get(&bdf).cloned() else {
            return Ok(());
        };
        // Never unbind vfio under a process (a VM) that has the group open.
        let users = self.vfio_users(&rec)?;
        if !users.is_empty() {
            return Err(EngineError::Busy {
                bdf,
                holders: users,
            });
        }
        let stuck = |b: Bdf| self.stuck.stuck_on(b).is_some();
        // A stuck device is not written again, not even to release its lock or
        // turn persistence back on: that would prolong its hang.
        if !rec.functions.iter().any(|f| stuck(f.bdf)) {
            self.release_unbind_locks_still_held(bdf, &rec);
        }
        let mut first_err = None;
        for fr in rec.functions.iter().filter(|f| !stuck(f.bdf)) {
            if let Err(e) = self.restore_function(bdf, fr, rec.vfio_driver.as_ref()) {
                first_err.get_or_insert(e);
            }
        }
        if rec.functions.iter().any(|f| stuck(f.bdf)) {
            return match first_err {
                Some(StepError::Engine(e)) => Err(e),
                _ => Ok(()),
            };
        }
        match first_err {
            None => {
                self.restore_persistence_and_record(bdf, &rec, rec.after_restore())?;
                Ok(())
            }
            Some(StepError::Engine(e)) => Err(e),
            Some(StepError::Step { step, source }) => Err(EngineError::RestoreFailed {
                bdf,
                step,
                cause: source,
                functions: self.states(
                    &rec.functions.iter().map(|f| f.bdf).collect::<Vec<_>>(),
                    &BTreeMap::new(),
                ),
            }),
        }
    }

    /// The device is gone from sysfs (hot-unplug, `remove`, a fallen-off-the-bus GPU).
    pub(super) fn vanished(&self, bdf: Bdf) -> bool {
        matches!(
            std::fs::symlink_metadata(self.root.pci_device_dir(&bdf)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound
        )
    }

    /// Drops the record of a device that is gone: there is nothing left to
    /// restore, and keeping it would fail every release (a pod stuck Terminating).
    pub(super) fn forget_vanished(
        &self,
        bdf: Bdf,
        started: Instant,
    ) -> Result<Outcome, EngineError> {
        self.set_record(bdf, None)?;
        Ok(Outcome {
            bdf,
            action: Action::NothingToDo,
            detail: "the device is gone (removed or hot-unplugged): its record was dropped".into(),
            functions: Vec::new(),
            iommu_group: None,
            vfio_devices: Vec::new(),
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Processes holding the vfio nodes of `bdf`'s recorded functions that are on
    /// vfio now (none without a record): the check a release makes before it
    /// unbinds, for callers that must know first. Fails closed like the scan.
    pub fn vfio_holders(&self, bdf: Bdf) -> Result<Vec<NodeHolder>, EngineError> {
        match self.ledger().gpus.get(&bdf) {
            Some(rec) => self.vfio_users(rec),
            None => Ok(Vec::new()),
        }
    }

    /// Processes holding the vfio nodes of the record's functions that are on vfio now.
    pub(super) fn vfio_users(&self, rec: &GpuRecord) -> Result<Vec<NodeHolder>, EngineError> {
        let nodes: Vec<PathBuf> = rec
            .functions
            .iter()
            .filter_map(|f| self.read(f.bdf).ok())
            .filter(|f| f.on_vfio())
            .flat_map(|f| device_nodes(&self.root, &f))
            .collect();
        let gpu = rec.functions.first().map(|f| f.bdf);
        match gpu {
            Some(gpu) => self.holders_of(gpu, nodes),
            None => Ok(Vec::new()),
        }
    }

    /// Releases a GPU: back to its original drivers, unless admin intent (or
    /// its own history) keeps it on vfio. `holder`: only release if held by
    /// this holder (`None`: whoever holds it).
    pub fn unconfigure(&self, bdf: Bdf, holder: Option<&Holder>) -> Result<Outcome, EngineError> {
        self.check_alive()?;
        // Before the group lock: another process may be mid-operation.
        let _hold = self.hold()?;
        let started = Instant::now();
        let guard = self.group_guard(bdf);
        let _g = lock(&guard);
        let rec = self.ledger().gpus.get(&bdf).cloned();
        let gpu = match self.load_gpu(bdf) {
            Ok(gpu) => gpu,
            Err(EngineError::UnknownGpu(_)) if rec.is_some() && self.vanished(bdf) => {
                return self.forget_vanished(bdf, started);
            }
            Err(e) => return Err(e),
        };
        let intent = self.intent();
        let verdict = self.verdict(&intent, &gpu);
        let Some(rec) = rec else {
            let (action, detail) = if gpu.function.on_vfio() {
                (
                    Action::LeftOnVfio,
                    format!("not moved by us; stays on vfio: {}", reasons_text(&verdict)),
                )
            } else {
                (
                    Action::NothingToDo,
                    "no record: not moved by us".to_string(),
                )
            };
            return Ok(self.outcome(&gpu, action, detail, started));
        };
        if let (Some(want), Some(have)) = (holder, rec.holder.as_ref())
            && want != have
        {
            return Err(EngineError::HeldByOther {
                bdf,
                holder: have.clone(),
            });
        }
        if let Some(op) = &rec.stuck_on {
            return Err(EngineError::Stuck {
                bdf,
                op: op.clone(),
                secs: 0.0,
            });
        }
        match rec.on_release() {
            OnRelease::AlreadyReleased => {
                return Ok(self.outcome(
                    &gpu,
                    Action::NothingToDo,
                    "already released".into(),
                    started,
                ));
            }
            OnRelease::AdminOwned => {
                return Ok(self.outcome(
                    &gpu,
                    Action::LeftOnVfio,
                    format!("admin-owned; stays on vfio: {}", reasons_text(&verdict)),
                    started,
                ));
            }
            OnRelease::Undo => {}
        }
        let originals = rec
            .functions
            .iter()
            .filter_map(|f| f.original_driver.as_ref().map(|d| d.as_str()));
        if let ReleaseDecision::Keep(why) = verdict.on_release(rec.was_on_vfio, originals) {
            let on_vfio = gpu.function.on_vfio();
            let mut kept = rec.clone();
            kept.state = OpState::Prebound;
            kept.holder = None;
            // Admin-owned from now on; `was_on_vfio` stays the truth about
            // where we found it.
            self.set_record(bdf, on_vfio.then_some(kept))?;
            return Ok(self.outcome(
                &gpu,
                Action::LeftOnVfio,
                format!("released; stays on vfio: {why}"),
                started,
            ));
        }
        // Never unbind vfio while a VM still has the group open.
        let holders = self.vfio_users(&rec)?;
        if !holders.is_empty() {
            return Err(EngineError::Busy { bdf, holders });
        }
        self.update_record(bdf, |r| {
            r.state = OpState::Releasing;
            r.holder = None;
        })?;
        self.finish_release(&gpu, &rec, started, Action::Restored)
    }

    pub(super) fn finish_release(
        &self,
        gpu: &Gpu,
        rec: &GpuRecord,
        started: Instant,
        action: Action,
    ) -> Result<Outcome, EngineError> {
        let bdf = gpu.bdf();
        let holders = self.vfio_users(rec)?;
        if !holders.is_empty() {
            return Err(EngineError::Busy { bdf, holders });
        }
        let mut failure = None;
        for fr in &rec.functions {
            if let Err(e) = self.restore_function(bdf, fr, rec.vfio_driver.as_ref()) {
                failure.get_or_insert(e);
            }
        }
        match failure {
            None => {
                // No unbind lock to release: it went with the instance we unbound.
                // A GPU found without a driver goes back to none; remember that
                // it is meant to be so, or reconcile would probe a driver for it.
                let left_off =
                    self.restore_persistence_and_record(bdf, rec, rec.after_restore())?;
                let back: Vec<String> = rec
                    .functions
                    .iter()
                    .map(|f| {
                        format!(
                            "{} → {}",
                            f.bdf,
                            f.original_driver
                                .as_ref()
                                .map(|d| d.as_str())
                                .unwrap_or("no driver")
                        )
                    })
                    .collect();
                Ok(self.outcome(
                    gpu,
                    action,
                    format!(
                        "returned to original drivers: {}{}",
                        back.join(", "),
                        persistence_left_off(&left_off)
                    ),
                    started,
                ))
            }
            Some(StepError::Engine(e)) => Err(e),
            Some(StepError::Step { step, source }) => Err(EngineError::RestoreFailed {
                bdf,
                step,
                cause: source,
                functions: self.states(
                    &rec.functions.iter().map(|f| f.bdf).collect::<Vec<_>>(),
                    &BTreeMap::new(),
                ),
            }),
        }
    }
}
