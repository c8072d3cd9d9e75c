//! Settling records of ours: a release, the finish of an interrupted release
//! and a rollback all go through [`Engine::settle`], which asks the record
//! state machine ([`crate::state::decide_settle`]) with intent read now.

use super::handover::AfterReset;
use super::persistence::persistence_left_off;
use super::steps::{OperationBudget, StepError};
use super::view::{Action, Outcome, reasons_text};
use super::{Engine, lock};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use vfio_gpu_host::{Bdf, DriverName, Gpu};

use crate::error::{EngineError, Step, Verification};
use crate::kernel::SysfsWrite;
use crate::ledger::{FunctionRecord, GpuRecord, Handover, Holder, OpState, QuarantineCause};
use crate::preflight::NodeHolder;
use crate::state::{
    IntentNow, Observed, RecordKind, Settle, decide_settle, override_after_restore,
};
use vfio_gpu_intent::ReleaseDecision;

/// Which operation settles a record: decides only the outcome's wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SettlePath {
    /// The holder released it (unprepare, `release`).
    Release,
    /// Reconcile (or a prepare) finishes a release a crash or failure interrupted.
    FinishRelease,
    /// A move to vfio failed or was interrupted.
    Rollback,
}

impl SettlePath {
    fn restored(self) -> Action {
        match self {
            SettlePath::Release => Action::Restored,
            SettlePath::FinishRelease => Action::FinishedRelease,
            SettlePath::Rollback => Action::RolledBack,
        }
    }
}

impl Engine {
    /// Puts one function where `target` says (its recorded origin, or the
    /// admin's pin). A bind that fails parks it back on vfio: never driverless.
    /// `mid_move`: the record is still configuring (a rollback), so our vfio
    /// override may sit on a function not yet unbound from its host driver.
    pub(super) fn restore_function(
        &self,
        gpu: Bdf,
        fr: &FunctionRecord,
        target: Option<&DriverName>,
        vfio: Option<&DriverName>,
        mid_move: bool,
    ) -> Result<(), StepError> {
        let cur = self.binding(fr.bdf)?;
        if cur.driver.as_ref() != target {
            match target {
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
                            step: Step::Write(SysfsWrite::Bind {
                                bdf: fr.bdf,
                                driver: orig.clone(),
                            }),
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
        // Our vfio value on a function found on a host driver outside a move
        // is no longer ours (a release had put it back): the admin's.
        let on_host = cur.driver.is_some() && !cur.on_vfio();
        let written = fr
            .override_written
            .as_deref()
            .filter(|_| !on_host || mid_move);
        let wanted = override_after_restore(
            fr.original_override.as_deref(),
            written,
            target.map(DriverName::as_str),
            cur.driver_override.as_deref(),
        );
        self.restore_override(gpu, fr.bdf, wanted)
    }

    /// `driver_override` as [`override_after_restore`] decided: back to what
    /// it was when we found the function, unless the admin set another since.
    fn restore_override(
        &self,
        gpu: Bdf,
        bdf: Bdf,
        wanted: Option<String>,
    ) -> Result<(), StepError> {
        let cur = self.binding(bdf)?;
        if cur.driver_override != wanted {
            self.step(
                gpu,
                SysfsWrite::DriverOverride {
                    bdf,
                    driver: wanted,
                },
            )?;
        }
        Ok(())
    }

    /// Returns every function of a record to its origin (a failed or
    /// interrupted configure), unless intent now says keep: [`Engine::settle`].
    pub(super) fn rollback(&self, bdf: Bdf) -> Result<(), EngineError> {
        let Some(rec) = self.gpu_record(bdf) else {
            return Ok(());
        };
        self.settle(bdf, &rec, SettlePath::Rollback, Instant::now())
            .map(|_| ())
    }

    /// The admin's intent for `gpu` at this instant, as the settle decision
    /// needs it, with the verdict's reasons in words.
    pub(super) fn intent_now(&self, gpu: &Gpu, rec: Option<&GpuRecord>) -> (IntentNow, String) {
        let snapshot = match self.intent() {
            Ok(s) => s,
            // Unknown intent is never "restore", nor admin ownership: wait.
            Err(e) => return (IntentNow::Unknown(e.to_string()), e.to_string()),
        };
        let verdict = self.verdict(&snapshot, gpu);
        let reasons = reasons_text(&verdict);
        let was_on_vfio = rec.is_some_and(|r| r.was_on_vfio);
        let originals: Vec<&str> = rec
            .map(|r| {
                r.functions
                    .iter()
                    .filter_map(|f| f.original_driver.as_ref().map(|d| d.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        if let ReleaseDecision::Keep(why) = verdict.on_release(was_on_vfio, originals) {
            return (IntentNow::Keep(why), reasons);
        }
        let mut pins = BTreeMap::new();
        if let Some(pin) = &verdict.pinned {
            let target = match (pin.bdf, pin.driver.as_deref()) {
                (Some(b), Some("none")) => Some((b, None)),
                (Some(b), Some(d)) => DriverName::new(d).ok().map(|d| (b, Some(d))),
                _ => None,
            };
            match target {
                Some((b, d)) => {
                    pins.insert(b, d);
                }
                // A pin whose target cannot be read: move nothing anywhere.
                None => {
                    return (
                        IntentNow::Keep(format!(
                            "pinned ({}) to a target that cannot be read",
                            pin.detail
                        )),
                        reasons,
                    );
                }
            }
        }
        (IntentNow::Restore { pins }, reasons)
    }

    /// The one way a record of ours is settled: observes the host, reads
    /// intent now, asks [`decide_settle`] and carries out what it says.
    /// Putting things back is never cut short by a prepare's budget.
    pub(super) fn settle(
        &self,
        bdf: Bdf,
        rec: &GpuRecord,
        path: SettlePath,
        started: Instant,
    ) -> Result<Outcome, EngineError> {
        let _no_budget = OperationBudget::suspend();
        let gpu = match self.load_gpu(bdf) {
            Ok(gpu) => Some(gpu),
            Err(EngineError::UnknownGpu(_)) if self.vanished(bdf) => None,
            Err(e) => return Err(e),
        };
        let (intent, reasons) = match &gpu {
            Some(g) => self.intent_now(g, Some(rec)),
            None => (
                IntentNow::Restore {
                    pins: BTreeMap::new(),
                },
                String::new(),
            ),
        };
        let stuck_here = rec
            .functions
            .iter()
            .find_map(|f| self.stuck.stuck_on(f.bdf));
        let mut observed = Observed {
            vanished: gpu.is_none(),
            stuck: rec.stuck_on.is_some() || stuck_here.is_some(),
            vfio_in_use: false,
            quarantined: self.with_ledger(|l| l.quarantined.contains_key(&bdf)),
            quarantined_at_home: self.with_ledger(|l| {
                l.quarantined
                    .get(&bdf)
                    .is_some_and(|q| q.cause == QuarantineCause::VerificationFailed)
            }),
        };
        // Who hands the GPU over, when this settle takes it from a tenant.
        let released_by = rec.hands_over().then(|| {
            rec.holder
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "unknown holder".into())
        });
        // The holder scan is only worth its cost when it can change the answer.
        let mut holders = Vec::new();
        if decide_settle(rec.kind(), &intent, observed) == Settle::Restore {
            holders = self.vfio_users(rec)?;
            observed.vfio_in_use = !holders.is_empty();
        }
        let Some(gpu) = gpu else {
            return self.forget_vanished(bdf, started);
        };
        match decide_settle(rec.kind(), &intent, observed) {
            Settle::Forget => self.forget_vanished(bdf, started),
            Settle::AlreadyReleased => Ok(self.outcome(
                &gpu,
                Action::NothingToDo,
                "already released".into(),
                started,
            )),
            Settle::AdminOwned => {
                // A hand-over a busy VM deferred is finished here (the
                // record is the admin's, the reset is still owed).
                let handed = self.finish_kept_handover(&gpu, None)?;
                Ok(self.kept_outcome(
                    &gpu,
                    handed,
                    format!("admin-owned; stays on vfio: {reasons}"),
                    started,
                ))
            }
            Settle::Quarantined => {
                // Offered to nobody, and on vfio: what a failed move or park
                // left off vfio is kept there again (a function on its host
                // driver only loses our override), and a record still of
                // ours becomes the kept one it stands for.
                let _ = self.keep_functions(bdf, rec)?;
                let on_vfio = self.any_on_vfio(rec);
                let relabel = rec.kind() == RecordKind::Ours;
                if path == SettlePath::Release || relabel {
                    self.update_record(bdf, |r| r.quarantine_keeps(on_vfio))?;
                }
                let why = self
                    .ledger()
                    .quarantined
                    .get(&bdf)
                    .map(|q| q.reason.clone())
                    .unwrap_or_default();
                Ok(self.quarantined_outcome(&gpu, &why, started))
            }
            Settle::WaitStuck => Err(EngineError::Stuck {
                bdf,
                op: stuck_here
                    .or_else(|| rec.stuck_on.clone())
                    .unwrap_or_default(),
                secs: 0.0,
            }),
            Settle::WaitBusy => Err(EngineError::Busy { bdf, holders }),
            Settle::Keep(why) => self.keep_on_vfio(&gpu, rec, &why, released_by, started),
            Settle::WaitIntent(why) => {
                for fr in &rec.functions {
                    if let (Ok(b), Some(vfio)) = (self.binding(fr.bdf), rec.vfio_driver.as_ref())
                        && b.driver.is_none()
                    {
                        self.park_on_vfio(bdf, fr.bdf, vfio);
                    }
                }
                Err(EngineError::IntentUnreadable(why))
            }
            Settle::Restore => self.restore_all(&gpu, rec, &intent, path, released_by, started),
        }
    }

    /// Intent says keep: nothing goes to a host driver. Driverless functions
    /// are parked on vfio, functions never moved get their override back, and
    /// the record stays as admin-owned with its origins.
    fn keep_on_vfio(
        &self,
        gpu: &Gpu,
        rec: &GpuRecord,
        why: &str,
        released_by: Option<String>,
        started: Instant,
    ) -> Result<Outcome, EngineError> {
        let bdf = gpu.bdf();
        if !rec
            .functions
            .iter()
            .any(|f| self.stuck.stuck_on(f.bdf).is_some())
        {
            self.release_unbind_locks_still_held(bdf, rec);
        }
        let failure = self.keep_functions(bdf, rec)?;
        let all: Vec<Bdf> = rec.functions.iter().map(|f| f.bdf).collect();
        match failure {
            None => {}
            Some(StepError::Engine(e)) => return Err(e),
            Some(StepError::Step { step, source }) => {
                // Left for reconcile to retry, as a release to finish; a
                // tenant's hand-over is owed from this commit, as it would
                // have been from the kept record's.
                let owed = released_by.as_deref().map(Handover::owed);
                self.update_record(bdf, |r| {
                    r.state = OpState::Releasing;
                    r.holder = None;
                    r.served = false;
                    if r.handover.is_none() {
                        r.handover = owed;
                    }
                })?;
                return Err(EngineError::RestoreFailed {
                    bdf,
                    step,
                    cause: source,
                    functions: self.states(&all, &BTreeMap::new()),
                });
            }
        }
        let any_on_vfio = all
            .iter()
            .any(|b| self.binding(*b).is_ok_and(|f| f.on_vfio()));
        match rec.after_keep(any_on_vfio) {
            // Already kept as it is: nothing to commit (reconcile re-decides
            // kept records every round).
            Some(kept)
                if kept.state == rec.state
                    && kept.holder == rec.holder
                    && released_by.is_none() => {}
            Some(mut kept) => {
                // The hand-over is owed from the commit that releases it.
                if kept.handover.is_none() {
                    kept.handover = released_by.as_deref().map(Handover::owed);
                }
                self.set_record(bdf, Some(kept))?
            }
            // Nothing of ours stayed on vfio: what we changed goes back.
            None => {
                self.restore_persistence_and_record(bdf, rec, None)?;
            }
        }
        // "Left on vfio" only when the GPU function is: one a crashed release
        // had already returned stays where it is (keeping never moves forward).
        let gpu_on_vfio = self.binding(bdf).is_ok_and(|f| f.on_vfio());
        if !gpu_on_vfio {
            return Ok(self.outcome(
                gpu,
                Action::NothingToDo,
                format!(
                    "intent keeps it on vfio ({why}), but {bdf} was already back on its host driver: nothing was moved"
                ),
                started,
            ));
        }
        // Kept on vfio for the next tenant: reset and verified like any other.
        let handed = self.finish_kept_handover(gpu, released_by)?;
        Ok(self.kept_outcome(
            gpu,
            handed,
            format!("released; stays on vfio: {why}"),
            started,
        ))
    }

    /// Leaves every function of `rec` on vfio or as it was never moved: a
    /// driverless one is parked on vfio, one on vfio stays, and one on its
    /// host driver only loses the override we wrote. The first step that
    /// failed, if any (a blocked write or read stops the rest).
    pub(super) fn keep_functions(
        &self,
        bdf: Bdf,
        rec: &GpuRecord,
    ) -> Result<Option<StepError>, EngineError> {
        let mut failure = None;
        for fr in &rec.functions {
            let now = self.binding(fr.bdf)?;
            let result = match (&now.driver, rec.vfio_driver.as_ref()) {
                (None, Some(vfio)) => {
                    self.park_on_vfio(bdf, fr.bdf, vfio);
                    match self.binding(fr.bdf)?.driver {
                        Some(_) => Ok(()),
                        None => Err(StepError::verify(
                            Verification::ParkedOn {
                                bdf: fr.bdf,
                                driver: vfio.clone(),
                            },
                            "it has no driver".into(),
                        )),
                    }
                }
                (Some(_), _) if now.on_vfio() => Ok(()),
                // Never moved (still on its host driver): only our override goes.
                _ => self.restore_override(
                    bdf,
                    fr.bdf,
                    // On its host driver outside a move: our vfio value
                    // there is the admin's now (see `restore_function`).
                    override_after_restore(
                        fr.original_override.as_deref(),
                        fr.override_written
                            .as_deref()
                            .filter(|_| rec.state == OpState::Configuring),
                        now.driver.as_ref().map(DriverName::as_str),
                        now.driver_override.as_deref(),
                    ),
                ),
            };
            if let Err(e) = result {
                let stop = matches!(e, StepError::Engine(_));
                failure.get_or_insert(e);
                if stop {
                    break;
                }
            }
        }
        Ok(failure)
    }

    /// The hand-over of a GPU that stays on vfio: reset, then verify, in place.
    fn finish_kept_handover(
        &self,
        gpu: &Gpu,
        released_by: Option<String>,
    ) -> Result<AfterReset, EngineError> {
        let after = self.handover_reset(gpu, released_by)?;
        if after != AfterReset::Verify {
            return Ok(after);
        }
        Ok(match self.handover_verify(gpu.bdf())? {
            Some(why) => AfterReset::Quarantined(why),
            None => AfterReset::Verify,
        })
    }

    /// The outcome of a release that kept the GPU on vfio, with its hand-over.
    fn kept_outcome(
        &self,
        gpu: &Gpu,
        handed: AfterReset,
        detail: String,
        started: Instant,
    ) -> Outcome {
        match handed {
            AfterReset::Quarantined(why) => self.quarantined_outcome(gpu, &why, started),
            AfterReset::Deferred(wait) => self.outcome(
                gpu,
                Action::LeftOnVfio,
                format!("{detail}; {wait}"),
                started,
            ),
            AfterReset::Verify => self.outcome(
                gpu,
                Action::LeftOnVfio,
                format!("{detail}; reset and verified"),
                started,
            ),
            AfterReset::Nothing | AfterReset::Unsanitized => {
                self.outcome(gpu, Action::LeftOnVfio, detail, started)
            }
        }
    }

    /// Intent allows it and nobody holds the group: every function back to
    /// its target, persistence mode back on, the record dropped (or a tombstone).
    fn restore_all(
        &self,
        gpu: &Gpu,
        rec: &GpuRecord,
        intent: &IntentNow,
        path: SettlePath,
        released_by: Option<String>,
        started: Instant,
    ) -> Result<Outcome, EngineError> {
        let bdf = gpu.bdf();
        if path == SettlePath::Release {
            // The hand-over is owed from the same commit that releases it, so
            // no crash can return the GPU unreset.
            let owed = released_by.as_deref().map(Handover::owed);
            self.update_record(bdf, |r| {
                r.state = OpState::Releasing;
                r.holder = None;
                r.served = false;
                if r.handover.is_none() {
                    r.handover = owed;
                }
            })?;
        }
        // Reset while every function is still on vfio and nobody holds it;
        // verification follows once each is where it goes.
        match self.handover_reset(gpu, released_by)? {
            AfterReset::Quarantined(why) => return Ok(self.quarantined_outcome(gpu, &why, started)),
            // Restore is only decided with nobody holding the group.
            AfterReset::Deferred(wait) => {
                return Err(EngineError::HandoverPending { bdf, detail: wait });
            }
            AfterReset::Nothing | AfterReset::Unsanitized | AfterReset::Verify => {}
        }
        // Before anything is re-probed: a lock seen after that is somebody else's.
        self.release_unbind_locks_still_held(bdf, rec);
        let mut failure = None;
        for fr in &rec.functions {
            let target = intent.target(fr);
            if let Err(e) = self.restore_function(
                bdf,
                fr,
                target.as_ref(),
                rec.vfio_driver.as_ref(),
                rec.state == OpState::Configuring,
            ) {
                // A blocked write (or read) stops the settle: the rest of the
                // group is left as it is until that returns, never half-moved
                // behind a device whose lock is held.
                let stop = matches!(e, StepError::Engine(_));
                failure.get_or_insert(e);
                if stop {
                    break;
                }
            }
        }
        match failure {
            None => {
                // Verified where it now is (on its host driver, after the bind).
                let quarantined = self.handover_verify(bdf)?;
                // A GPU found without a driver goes back to none; remember that
                // it is meant to be so, or reconcile would probe a driver for it.
                // One the admin's pin to none left driverless is remembered too,
                // so that reconcile sends it back once the pin goes.
                let unbound_by_pin: Vec<Bdf> = rec
                    .functions
                    .iter()
                    .filter(|f| f.original_driver.is_some() && intent.target(f).is_none())
                    .map(|f| f.bdf)
                    .collect();
                let left_off = self.restore_persistence_and_record(
                    bdf,
                    rec,
                    rec.after_restore(unbound_by_pin),
                )?;
                let back: Vec<String> = rec
                    .functions
                    .iter()
                    .map(|f| {
                        let target = intent.target(f);
                        format!(
                            "{} → {}",
                            f.bdf,
                            target.as_ref().map(|d| d.as_str()).unwrap_or("no driver")
                        )
                    })
                    .collect();
                let what = match path {
                    SettlePath::Rollback => "an interrupted move to vfio was rolled back",
                    _ => "returned to original drivers",
                };
                let detail = format!(
                    "{what}: {}{}",
                    back.join(", "),
                    persistence_left_off(&left_off)
                );
                Ok(match quarantined {
                    Some(why) => self.outcome(
                        gpu,
                        Action::Quarantined,
                        format!(
                            "{detail}; quarantined, verification failed after the bind ({why}): offered to nobody until `vfio-gpu-dra reset {bdf}`"
                        ),
                        started,
                    ),
                    None => self.outcome(gpu, path.restored(), detail, started),
                })
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
    /// A read that fails or blocks is not "gone": the record is kept.
    pub(super) fn vanished(&self, bdf: Bdf) -> bool {
        let dir = self.root.pci_device_dir(&bdf);
        self.host_read(bdf, "read of the device directory", move |k| k.exists(&dir))
            .is_ok_and(|exists| !exists)
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
        match self.gpu_record(bdf) {
            Some(rec) => self.vfio_users(&rec),
            None => Ok(Vec::new()),
        }
    }

    /// Processes holding the vfio nodes of the record's functions that are on
    /// vfio now. A function that cannot be read fails the check: a release
    /// never assumes nobody holds what it could not see (n12).
    pub(super) fn vfio_users(&self, rec: &GpuRecord) -> Result<Vec<NodeHolder>, EngineError> {
        let mut nodes: Vec<PathBuf> = Vec::new();
        for f in &rec.functions {
            let f = self.read(f.bdf)?;
            if f.on_vfio() {
                nodes.extend(self.nodes_of(&f)?);
            }
        }
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
        let (_hold, guard, started) = self.begin_gpu_op(bdf)?;
        let _g = lock(&guard);
        let Some(rec) = self.gpu_record(bdf) else {
            let gpu = self.load_gpu(bdf)?;
            let (action, detail) = if gpu.function.on_vfio() {
                let (_, reasons) = self.intent_now(&gpu, None);
                (
                    Action::LeftOnVfio,
                    format!("not moved by us; stays on vfio: {reasons}"),
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
        self.settle(bdf, &rec, SettlePath::Release, started)
    }
}
