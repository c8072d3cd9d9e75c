//! The record state machine: which transitions a record allows, asked by the
//! operations instead of deciding inline (as youki's `can_pause` and
//! kube-rs's watcher states do).
//!
//! ```text
//!            configure                     success
//!   (none) ───────────▶ Configuring ───────────────▶ Configured
//!     ▲                     │ failure / crash            │ release
//!     │      rollback       ▼                            ▼
//!     └──────────────── (dropped, or          Releasing ──▶ (dropped, or
//!                        ReleasedUnbound)                   ReleasedUnbound)
//!   found on vfio, not by us ─▶ Prebound (admin-owned; released = kept)
//!   settled while intent says keep ─▶ Prebound, origins kept
//!
//!   a tenant's release (handover on the record, written ahead):
//!   (none) ─▶ Resetting ─▶ Verifying ─▶ (none) + audit record
//!                 │             │
//!                 └── failure ──┴──▶ quarantined (ledger), Prebound on vfio
//!                                     └─ `reset <GPU>` resets, verifies, clears
//! ```
//!
//! [`decide_handover`] decides the hand-over step, [`verify_function`]
//! judges a function after its reset.
//!
//! Every path that could send a function back to a host driver (a release,
//! the finish of an interrupted release, a rollback, reconcile) asks one pure
//! function, [`decide_settle`], with the admin's intent read at that instant
//! and the host as observed then. None of them decides inline.

use std::collections::BTreeMap;

use vfio_gpu_host::{Bdf, DriverName, PciFunction};

use vfio_gpu_intent::SanitizeMode;

use crate::ledger::{
    Changes, Fingerprint, FunctionRecord, GpuRecord, HandoverPhase, Holder, OpState,
};

/// What a configure for a holder must do with the record it finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnConfigure {
    /// Nothing of ours is in the way: build a record from the host as it is.
    Fresh,
    /// Already on vfio for this holder: an idempotent repeat.
    AlreadyDone,
    /// Held by this holder but something moved a function off vfio: move it
    /// back, keeping the recorded origins (never derive "original" from a
    /// state this plugin produced).
    Redrive,
    /// An interrupted operation: finish or roll it back first, then start afresh.
    FinishFirst,
    /// Someone else holds it.
    HeldByOther(Holder),
}

/// What a release finds to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnRelease {
    /// Released to no driver already.
    AlreadyReleased,
    /// Admin-owned: stays on vfio, nothing to undo.
    AdminOwned,
    /// A move of ours to undo (or to keep, if intent says so).
    Undo,
}

/// The admin's intent for a GPU at the instant a settle is decided, read
/// live (never carried over from an earlier decision, a crash or a restart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntentNow {
    /// Every function stays on vfio, for this reason (keep-on-vfio intent,
    /// found there before us, a suppressed host driver, or a pin whose target
    /// cannot be read).
    Keep(String),
    /// The intent sources could not be read (in time): nothing may go to a
    /// host driver, and nothing may be recorded as admin-owned either.
    Unknown(String),
    /// Back to the recorded origins, except functions the admin pinned to a
    /// driver (`None`: to no driver) since.
    Restore {
        /// Pinned functions and the driver each is pinned to.
        pins: BTreeMap<Bdf, Option<DriverName>>,
    },
}

impl IntentNow {
    /// Where `f` goes when restored: the admin's pin, or its recorded origin.
    pub fn target(&self, f: &FunctionRecord) -> Option<DriverName> {
        match self {
            IntentNow::Restore { pins } => match pins.get(&f.bdf) {
                Some(pinned) => pinned.clone(),
                None => f.original_driver.clone(),
            },
            IntentNow::Keep(_) | IntentNow::Unknown(_) => None,
        }
    }
}

/// The host as observed for a record's functions when a settle is decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The GPU is gone from sysfs.
    pub vanished: bool,
    /// A write or read of one of its functions is still blocked (here, or in
    /// another live process per the record's `stuck_on`).
    pub stuck: bool,
    /// A process (a VM) holds one of its vfio nodes.
    pub vfio_in_use: bool,
    /// Quarantined (a reset, verification or scrub hook failed): a kept
    /// record stays where it is until an administrator resets it.
    pub quarantined: bool,
    /// That quarantine came from the verification after the host driver's
    /// bind: a release of ours had sent the GPU home already. Any other
    /// (a failed or hung reset, a failed hook) came before anything went home.
    pub quarantined_at_home: bool,
}

/// What settling a record must do: the one keep-or-restore decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settle {
    /// The device is gone: drop the record, there is nothing to restore.
    Forget,
    /// Released to no driver already: nothing to do.
    AlreadyReleased,
    /// Admin-owned: stays on vfio, nothing of ours to undo.
    AdminOwned,
    /// A blocked write or read: touch nothing until it returns.
    WaitStuck,
    /// A VM still has the group open: never unbind vfio under it.
    WaitBusy,
    /// Intent cannot be read: park what is driverless on vfio, change the
    /// record in no other way, and retry later.
    WaitIntent(String),
    /// Intent says keep: park what is driverless on vfio, send nothing to a
    /// host driver, keep the record (origins included) as admin-owned.
    Keep(String),
    /// Return every function to its target ([`IntentNow::target`]).
    Restore,
    /// Quarantined: touch nothing (it stays on vfio, out of any tenant's
    /// and the host driver's hands) until an administrator resets it.
    Quarantined,
}

/// What a record is, for the settle decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A move or release of ours (configuring, configured, releasing).
    Ours,
    /// Released to no driver, as it was found.
    ReleasedUnbound,
    /// Found on vfio, not by us: the admin's.
    FoundOnVfio,
    /// Moved by us and kept on vfio because intent said so when it was
    /// settled: still ours (origins known), re-decided while nobody holds it.
    KeptByIntent,
    /// Released, with functions left without a driver only by the admin's pin
    /// to none: re-decided with intent as it is now (a pin withdrawn sends
    /// them back to their drivers).
    UnboundByPin,
}

impl GpuRecord {
    /// What this record is for [`decide_settle`].
    pub fn kind(&self) -> RecordKind {
        match self.state {
            OpState::ReleasedUnbound if !self.unbound_by_pin.is_empty() => RecordKind::UnboundByPin,
            OpState::ReleasedUnbound => RecordKind::ReleasedUnbound,
            OpState::Prebound
                if self.was_on_vfio
                    || self.functions.iter().all(|f| f.override_written.is_none()) =>
            {
                RecordKind::FoundOnVfio
            }
            OpState::Prebound => RecordKind::KeptByIntent,
            OpState::Configuring | OpState::Configured | OpState::Releasing => RecordKind::Ours,
        }
    }
}

/// The one keep-or-restore decision, for every path that settles a record of
/// ours: `kind` of the record, `intent` read at this instant, `observed` the
/// host now. Pure; tested exhaustively over its inputs.
pub fn decide_settle(kind: RecordKind, intent: &IntentNow, observed: Observed) -> Settle {
    if observed.vanished {
        return Settle::Forget;
    }
    match kind {
        RecordKind::ReleasedUnbound => return Settle::AlreadyReleased,
        RecordKind::FoundOnVfio => return Settle::AdminOwned,
        RecordKind::Ours | RecordKind::KeptByIntent | RecordKind::UnboundByPin => {}
    }
    if observed.stuck {
        return Settle::WaitStuck;
    }
    // Kept on vfio because its hand-over failed: never to a host driver
    // until the admin's reset clears it, whether the record is already kept
    // or still a move of ours (a crash or failure before it was relabelled).
    // A release of ours that quarantined it after the bind is finished like
    // any other (it is already back).
    if observed.quarantined
        && (kind == RecordKind::KeptByIntent
            || (kind == RecordKind::Ours && !observed.quarantined_at_home))
    {
        return Settle::Quarantined;
    }
    match intent {
        // Keeping never unbinds vfio, so a VM holding the group does not matter.
        IntentNow::Keep(why) => Settle::Keep(why.clone()),
        IntentNow::Unknown(why) => Settle::WaitIntent(why.clone()),
        IntentNow::Restore { .. } if observed.vfio_in_use => Settle::WaitBusy,
        IntentNow::Restore { .. } => Settle::Restore,
    }
}

/// What a settle does for the tenant hand-over (reset and verify between
/// tenants), from the policy, the record's hand-over phase and the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoverStep {
    /// No tenant is being handed over (a rollback, a record without a
    /// hand-over in progress): nothing to reset.
    Nothing,
    /// The policy says `off`: recorded as handed over unsanitized.
    Unsanitized,
    /// A VM still has the group open: never reset a device under its user;
    /// the hand-over stays recorded and is resumed when it lets go.
    WaitBusy,
    /// Reset every function (the phase recorded first), run the scrub hook
    /// when `hook`, then verify.
    Reset {
        /// Run the scrub hook after the reset.
        hook: bool,
    },
    /// The reset finished before a crash: verify only.
    Verify,
}

/// The hand-over decision. `phase`: the record's hand-over in progress, if
/// any; `released_now`: this settle is the holder's release (a tenant leaves
/// now); `vfio_in_use`: a process holds one of its vfio nodes. Pure; tested
/// over every input.
pub fn decide_handover(
    mode: SanitizeMode,
    phase: Option<HandoverPhase>,
    released_now: bool,
    vfio_in_use: bool,
) -> HandoverStep {
    if phase.is_none() && !released_now {
        return HandoverStep::Nothing;
    }
    if mode == SanitizeMode::Off {
        return HandoverStep::Unsanitized;
    }
    match phase {
        // Reading config space and link state is harmless to a user.
        Some(HandoverPhase::Verifying) => HandoverStep::Verify,
        _ if vfio_in_use => HandoverStep::WaitBusy,
        _ => HandoverStep::Reset {
            hook: mode == SanitizeMode::ResetAndHook,
        },
    }
}

/// A function's link as sysfs shows it after a reset (absent on functions
/// without a PCIe capability, such as emulated conventional PCI devices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// `current_link_speed`, e.g. `16.0 GT/s PCIe`.
    pub current_speed: String,
    /// `max_link_speed`.
    pub max_speed: String,
    /// `current_link_width`.
    pub current_width: u32,
    /// `max_link_width`.
    pub max_width: u32,
}

/// What one function looks like after a reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionHealth {
    /// Address.
    pub bdf: Bdf,
    /// Identity and BARs as config space answers now.
    pub now: Fingerprint,
    /// The link, when the function reports one.
    pub link: Option<LinkState>,
}

/// What is wrong with one function after a reset, against what was recorded
/// when it was found (`expected`; `None` in records older than fingerprints,
/// where identity cannot be compared): config space answers with the same
/// vendor, device and subsystem, the BARs are there with the same total
/// size, the link trained back to its maximum speed and width. Empty: clean.
pub fn verify_function(expected: Option<&Fingerprint>, health: &FunctionHealth) -> Vec<String> {
    let mut problems = Vec::new();
    let now = &health.now;
    let b = health.bdf;
    if now.vendor == 0xffff {
        // All ones: config space does not answer at all.
        problems.push(format!(
            "{b}: config space reads all ones (device not responding)"
        ));
        return problems;
    }
    if let Some(want) = expected {
        let ids = |f: &Fingerprint| {
            format!(
                "{:04x}:{:04x} subsystem {:04x}:{:04x}",
                f.vendor, f.device, f.subsystem_vendor, f.subsystem_device
            )
        };
        if (
            want.vendor,
            want.device,
            want.subsystem_vendor,
            want.subsystem_device,
        ) != (
            now.vendor,
            now.device,
            now.subsystem_vendor,
            now.subsystem_device,
        ) {
            problems.push(format!(
                "{b}: answers as {} after the reset, was {}",
                ids(now),
                ids(want)
            ));
        }
        if now.bar_bytes != want.bar_bytes {
            problems.push(format!(
                "{b}: BARs total {} bytes after the reset, were {}",
                now.bar_bytes, want.bar_bytes
            ));
        }
    }
    if let Some(link) = &health.link {
        if link.current_speed != link.max_speed {
            problems.push(format!(
                "{b}: link trained to {} of {}",
                link.current_speed, link.max_speed
            ));
        }
        if link.current_width != link.max_width {
            problems.push(format!(
                "{b}: link trained to x{} of x{}",
                link.current_width, link.max_width
            ));
        }
    }
    problems
}

impl Fingerprint {
    /// The identity and BAR total of `f` as read now.
    pub fn of(f: &PciFunction) -> Fingerprint {
        Fingerprint {
            vendor: f.identity.vendor,
            device: f.identity.device,
            subsystem_vendor: f.identity.subsystem_vendor,
            subsystem_device: f.identity.subsystem_device,
            bar_bytes: f.bar_bytes,
        }
    }
}

impl FunctionRecord {
    /// A function as found on the host, before we touch it.
    pub fn as_found(f: &PciFunction) -> FunctionRecord {
        FunctionRecord {
            bdf: f.bdf,
            original_driver: f.driver.clone(),
            original_override: f.driver_override.clone(),
            override_written: None,
            bound_by_us: false,
            fingerprint: Some(Fingerprint::of(f)),
            extra: BTreeMap::new(),
        }
    }

    /// As found, naming the override a move will write (none for a function
    /// already on vfio).
    fn to_be_moved(f: &PciFunction, vfio: &DriverName) -> FunctionRecord {
        FunctionRecord {
            override_written: (!f.on_vfio()).then(|| vfio.to_string()),
            ..FunctionRecord::as_found(f)
        }
    }
}

impl GpuRecord {
    /// The write-ahead record of a move to `vfio` for `holder`: it exists
    /// before the host changes and already names the override we will write
    /// and the lock we will take, so one fsync'd commit covers the move.
    pub fn configuring(
        holder: Holder,
        funcs: &[PciFunction],
        vfio: &DriverName,
        changes: Changes,
        boot_id: String,
        operation: u64,
    ) -> GpuRecord {
        GpuRecord {
            state: OpState::Configuring,
            holder: Some(holder),
            vfio_driver: Some(vfio.clone()),
            was_on_vfio: false,
            functions: funcs
                .iter()
                .map(|f| FunctionRecord::to_be_moved(f, vfio))
                .collect(),
            changes,
            stuck_on: None,
            boot_id,
            operation,
            updated: 0,
            handover: None,
            unbound_by_pin: Vec::new(),
            served: false,
            extra: BTreeMap::new(),
        }
    }

    /// The write-ahead record of moving a held GPU back to vfio after
    /// something moved it off: the recorded origins stay; only functions the
    /// record does not know yet are recorded as found.
    pub fn redriven(
        mut self,
        holder: Holder,
        funcs: &[PciFunction],
        vfio: &DriverName,
        changes: Changes,
        operation: u64,
    ) -> GpuRecord {
        for f in funcs {
            match self.functions.iter_mut().find(|r| r.bdf == f.bdf) {
                Some(r) => {
                    if !f.on_vfio() && r.override_written.is_none() {
                        r.override_written = Some(vfio.to_string());
                    }
                }
                None => self.functions.push(FunctionRecord::to_be_moved(f, vfio)),
            }
        }
        self.state = OpState::Configuring;
        // The same holder re-driving its GPU, or a new one taking a GPU kept
        // for intent: either way it holds it now.
        self.holder = Some(holder);
        self.stuck_on = None;
        self.changes.unbind_lock_taken |= changes.unbind_lock_taken;
        for b in changes.persistence_disabled {
            if !self.changes.persistence_disabled.contains(&b) {
                self.changes.persistence_disabled.push(b);
            }
        }
        self.operation = operation;
        self.unbound_by_pin.clear();
        self
    }

    /// The transition a configure for `holder` takes from this record.
    /// `all_on_vfio`: every function of the GPU is on a vfio driver now.
    pub fn on_configure(&self, holder: &Holder, all_on_vfio: bool) -> OnConfigure {
        let ours = self.holder.as_ref() == Some(holder);
        match self.state {
            OpState::Configured if ours && all_on_vfio => OnConfigure::AlreadyDone,
            OpState::Configured if ours => OnConfigure::Redrive,
            // Kept for intent after a move of ours: the origins come along.
            OpState::Prebound if self.kind() == RecordKind::KeptByIntent => OnConfigure::Redrive,
            OpState::Prebound | OpState::ReleasedUnbound => OnConfigure::Fresh,
            OpState::Configuring | OpState::Releasing if ours || self.holder.is_none() => {
                OnConfigure::FinishFirst
            }
            _ => match &self.holder {
                Some(h) => OnConfigure::HeldByOther(h.clone()),
                None => OnConfigure::Fresh,
            },
        }
    }

    /// The transition a release takes from this record.
    pub fn on_release(&self) -> OnRelease {
        match self.state {
            OpState::ReleasedUnbound => OnRelease::AlreadyReleased,
            OpState::Prebound => OnRelease::AdminOwned,
            OpState::Configuring | OpState::Configured | OpState::Releasing => OnRelease::Undo,
        }
    }

    /// What is left once every function is at its target: a tombstone for
    /// a GPU any of whose functions had no driver when we found it (so
    /// reconcile does not "repair" it by probing one), or that the admin's
    /// pin to none left without a driver (`unbound_by_pin`: so reconcile
    /// sends them back once the pin goes); nothing otherwise.
    pub fn after_restore(&self, unbound_by_pin: Vec<Bdf>) -> Option<GpuRecord> {
        let unbound = self.functions.iter().any(|f| f.original_driver.is_none());
        (unbound || !unbound_by_pin.is_empty()).then(|| GpuRecord {
            state: OpState::ReleasedUnbound,
            holder: None,
            stuck_on: None,
            // The hand-over finished with this restore (a record read before
            // it may still say it is owed; a tombstone settled again must not
            // reset the GPU a second time).
            handover: None,
            unbound_by_pin,
            served: false,
            ..self.clone()
        })
    }

    /// The transition of a quarantined record (its hand-over failed): no
    /// holder, no tenant to hand over (the admin's reset stands for it), and
    /// a record of ours becomes the kept one it stands for when `any_on_vfio`
    /// (nothing went home). Pure; tested over every input.
    pub fn quarantine_keeps(&mut self, any_on_vfio: bool) {
        self.holder = None;
        self.served = false;
        if any_on_vfio
            && matches!(
                self.state,
                OpState::Configuring | OpState::Configured | OpState::Releasing
            )
        {
            self.state = OpState::Prebound;
        }
    }

    /// Whether settling this record takes the GPU from a tenant, so a reset
    /// and verification are owed before anybody gets it next: its holder had
    /// it on vfio (`served`, or a `Configured` record, which a ledger written
    /// before `served` existed may hold without it). A move that never
    /// finished for a new holder (`Configuring`, not served) gave the GPU to
    /// nobody, and a `Releasing` record carries the hand-over its release
    /// recorded, if one was owed. Pure; tested over every input.
    pub fn hands_over(&self) -> bool {
        self.served || self.state == OpState::Configured
    }
}

/// What `fabric learn` finds about a GPU before it touches anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnFacts {
    /// The ledger has a record of the GPU (held, kept or mid-operation).
    pub recorded: bool,
    /// The GPU is a member of a partition the ledger records.
    pub in_partition: bool,
    /// An earlier learn has not finished.
    pub learn_pending: bool,
    /// A write or read of the GPU is still blocked.
    pub stuck: bool,
    /// The GPU function has a driver.
    pub has_driver: bool,
    /// That driver is a vfio driver.
    pub on_vfio: bool,
    /// A process holds the GPU's VFIO group.
    pub vfio_in_use: bool,
}

/// What `fabric learn` does with a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LearnPlan {
    /// On a host driver already: NVML reads it where it is; nothing moves.
    ReadInPlace,
    /// On vfio and idle: bind it to `nvidia`, read, bind it back (write-ahead).
    VisitNvidia,
    /// Not now, for this reason; nothing is changed.
    Refuse(&'static str),
}

/// The one decision of `fabric learn`. Pure; tested over every input. A GPU
/// the plugin holds, keeps or is moving, one in a partition, one a process
/// holds, or one blocked is never moved by a learn.
pub fn decide_learn(f: LearnFacts) -> LearnPlan {
    if f.stuck {
        LearnPlan::Refuse("a write or read of it is still blocked")
    } else if f.learn_pending {
        LearnPlan::Refuse("an earlier learn has not finished (run `fabric reconcile`)")
    } else if f.recorded {
        LearnPlan::Refuse(
            "the ledger records it (held by a claim, kept, or mid-operation): release it first",
        )
    } else if f.in_partition {
        LearnPlan::Refuse("it is a member of an NVLink partition the ledger records")
    } else if !f.has_driver {
        LearnPlan::Refuse("it has no driver (bind it to vfio-pci or nvidia first)")
    } else if !f.on_vfio {
        LearnPlan::ReadInPlace
    } else if f.vfio_in_use {
        LearnPlan::Refuse("a process (a VM?) holds its VFIO group")
    } else {
        LearnPlan::VisitNvidia
    }
}

/// What the next fabric reconcile does with an unfinished learn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnPendingLearn {
    /// Bind the GPU back to its recorded vfio driver, then drop the record.
    ReturnToVfio,
    /// Drop the record, for this reason.
    Drop(&'static str),
}

/// The decision for an unfinished learn. `same_boot`: the record is of this
/// boot; `present`: the GPU is still in sysfs; `on_vfio`: its function is on
/// a vfio driver now. Pure; tested over every input.
pub fn on_pending_learn(same_boot: bool, present: bool, on_vfio: bool) -> OnPendingLearn {
    if !same_boot {
        OnPendingLearn::Drop("an earlier boot's learn: the GPU is where this boot put it")
    } else if !present {
        OnPendingLearn::Drop("the GPU is gone")
    } else if on_vfio {
        OnPendingLearn::Drop("the GPU is back on vfio")
    } else {
        OnPendingLearn::ReturnToVfio
    }
}

/// What reconcile does with a record, from its state and the GPU function now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnReconcile {
    /// An interrupted move or release: settle it ([`decide_settle`]).
    Settle,
    /// Held (configured): report, and any drift off vfio.
    NoteHeld,
    /// The record no longer applies: drop it, for this reason.
    Drop(&'static str),
    /// The record still applies: keep it, for this reason.
    Keep(&'static str),
}

impl GpuRecord {
    /// What reconcile does with this record. `has_driver`, `on_vfio`: the
    /// GPU function now.
    pub fn on_reconcile(&self, has_driver: bool, on_vfio: bool) -> OnReconcile {
        match self.state {
            OpState::Configuring | OpState::Releasing => OnReconcile::Settle,
            OpState::Configured => OnReconcile::NoteHeld,
            // Left without a driver by the admin's pin to none: decided again
            // with intent as it is now (a pin withdrawn sends it back), whatever
            // the GPU function has (the pinned one may be its audio function).
            OpState::ReleasedUnbound if !self.unbound_by_pin.is_empty() => OnReconcile::Settle,
            OpState::ReleasedUnbound if has_driver => {
                OnReconcile::Drop("released unbound earlier, has a driver now: record dropped")
            }
            OpState::ReleasedUnbound => OnReconcile::Keep("released to no driver, as it was found"),
            // A tenant hand-over still owed (a VM held the group at release):
            // settled again, which resumes it once the group is free.
            OpState::Prebound if self.handover.is_some() => OnReconcile::Settle,
            // Moved by us and kept for intent: decided again with intent as it
            // is now (an admin who drops the intent gets the GPU back).
            OpState::Prebound if self.kind() == RecordKind::KeptByIntent => OnReconcile::Settle,
            OpState::Prebound if !on_vfio => {
                OnReconcile::Drop("was admin-owned on vfio, now on another driver: record dropped")
            }
            OpState::Prebound => OnReconcile::Keep("admin-owned, on vfio"),
        }
    }

    /// What is left once intent kept the GPU on vfio at a settle: an
    /// admin-owned record that keeps the origins and the changes we made (a
    /// later look at the ledger still knows where it came from), or nothing
    /// when no function is on vfio (nothing of ours stayed).
    pub fn after_keep(&self, any_on_vfio: bool) -> Option<GpuRecord> {
        any_on_vfio.then(|| GpuRecord {
            state: OpState::Prebound,
            holder: None,
            stuck_on: None,
            unbound_by_pin: Vec::new(),
            served: false,
            ..self.clone()
        })
    }

    /// True when this record says the plugin put `bdf` on vfio (or was
    /// about to): any record but an admin-owned one, for a function not found
    /// on vfio. A state the plugin produced is never admin intent.
    pub fn put_on_vfio_by_us(&self, bdf: Bdf) -> bool {
        if !matches!(self.kind(), RecordKind::Ours | RecordKind::KeptByIntent) || self.was_on_vfio {
            return false;
        }
        self.function(bdf).is_some_and(|f| {
            f.bound_by_us
                || f.override_written.is_some()
                || f.original_driver.as_ref() != self.vfio_driver.as_ref()
        })
    }
}

/// The `driver_override` a restored function is left with. `seen`: its value
/// when the restore began; `original`: when we found it; `written`: the vfio
/// value we wrote at configure; `target`: the driver the restore binds (its
/// steering value). A value none of ours could have left there is the admin's,
/// set while we held the GPU: it stays (the admin's latest word wins over the
/// one we found). Otherwise the original comes back.
pub fn override_after_restore(
    original: Option<&str>,
    written: Option<&str>,
    target: Option<&str>,
    seen: Option<&str>,
) -> Option<String> {
    let ours = seen == original || (seen.is_some() && (seen == written || seen == target));
    if ours { original } else { seen }.map(str::to_string)
}

/// What reconcile does with a GPU it has no record of, from the GPU as
/// found. Only a record of ours ever sends a function anywhere: without one
/// the GPU is in a state someone else made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnUnrecorded {
    /// On vfio and not by us: recorded as admin-owned (`Prebound`).
    AdoptAsAdminOwned,
    /// A function has no driver: someone else unbound it (an admin's
    /// maintenance, another tool mid-way). Left as found; probing it would
    /// race them and bind nvidia, the rebind this project exists to avoid (n15).
    LeaveAsFound,
    /// On its host driver, every function bound: nothing to do.
    Nothing,
}

/// See [`OnUnrecorded`]. `gpu_on_vfio`: the GPU function is on a vfio
/// driver; `any_driverless`: some function of the GPU has no driver.
pub fn on_unrecorded(gpu_on_vfio: bool, any_driverless: bool) -> OnUnrecorded {
    match (gpu_on_vfio, any_driverless) {
        (true, _) => OnUnrecorded::AdoptAsAdminOwned,
        (false, true) => OnUnrecorded::LeaveAsFound,
        (false, false) => OnUnrecorded::Nothing,
    }
}

/// What fabric reconcile does with a partition the ledger records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnRecordedPartition {
    /// Inactive and nothing to finish: the record goes. `finished`: it was
    /// a deactivation, now complete.
    Forget {
        /// A `deactivating` record whose call took effect.
        finished: bool,
    },
    /// Active in FM, `activating` in the ledger, the holder holds its GPUs:
    /// the activation took effect; marked `active`.
    MarkActive,
    /// Active and held: nothing to do.
    Keep,
    /// Inactive in FM while the holder holds every GPU: FM lost it (a
    /// restart without replay) or never got the call (a crash before it, or
    /// after it with the `active` mark not yet written). Activated again,
    /// as the claim's prepare would.
    Activate,
    /// Active but not (or no longer) held, or a deactivation to finish:
    /// deactivated once no process holds its GPUs' VFIO groups.
    DeactivateWhenIdle,
}

/// See [`OnRecordedPartition`]. `fm_active`: FM lists it active; `holds`:
/// the record's holder holds every one of its GPUs in the ledger.
pub fn on_recorded_partition(
    state: crate::fabric_state::PartitionState,
    fm_active: bool,
    holds: bool,
) -> OnRecordedPartition {
    use crate::fabric_state::PartitionState::{Activating, Active, Deactivating};
    match (state, fm_active, holds) {
        (Deactivating, false, _) => OnRecordedPartition::Forget { finished: true },
        (Activating | Active, false, false) => OnRecordedPartition::Forget { finished: false },
        (Activating | Active, false, true) => OnRecordedPartition::Activate,
        (Activating, true, true) => OnRecordedPartition::MarkActive,
        (Active, true, true) => OnRecordedPartition::Keep,
        (Deactivating, true, _) | (Activating | Active, true, false) => {
            OnRecordedPartition::DeactivateWhenIdle
        }
    }
}

/// What a commit does with a claim's planned `activating` partition record
/// waiting to ride along ([`crate::Engine::fabric_ride`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnPartitionRide {
    /// Every GPU of the claim is `configured` for its holder in this commit's
    /// body and the partition has no record: the record lands in this
    /// commit, after (or with) the last GPU's completion, never before it.
    Land,
    /// A GPU of the claim is not yet configured: a later commit may land it.
    Wait,
    /// The partition has a record already (another claim's, a leak being
    /// repaired, ours from an earlier attempt): the ride is dropped and the
    /// activation writes whatever record it needs itself.
    Drop,
}

/// See [`OnPartitionRide`]. `claim_configured`: every GPU of the claim is
/// `configured` for the ride's holder; `recorded`: any of its partitions
/// already has a record.
pub fn on_partition_ride(claim_configured: bool, recorded: bool) -> OnPartitionRide {
    match (claim_configured, recorded) {
        (_, true) => OnPartitionRide::Drop,
        (true, false) => OnPartitionRide::Land,
        (false, false) => OnPartitionRide::Wait,
    }
}

/// Whether an activation writes its own write-ahead `activating` record
/// before calling FM, or uses one that is already in the ledger. Reused only
/// when it is exactly the record the activation would write (`activating`,
/// this holder, the same modules and GPUs: `matches`) and the activation has
/// no new module map to persist with it (`new_module_map`).
pub fn activating_record_needed(
    existing: Option<crate::fabric_state::PartitionState>,
    matches: bool,
    new_module_map: bool,
) -> bool {
    !(existing == Some(crate::fabric_state::PartitionState::Activating)
        && matches
        && !new_module_map)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Every input: a settle owes a hand-over exactly when a tenant had the
    /// GPU: a finished move (`served`), or a `Configured` record of an older
    /// ledger. A move that never finished for its holder owes none.
    #[test]
    fn only_a_gpu_a_tenant_had_is_handed_over() {
        use OpState::*;
        let states = [
            Configuring,
            Configured,
            Releasing,
            Prebound,
            ReleasedUnbound,
        ];
        for state in states {
            for served in [false, true] {
                let mut r = record(state, Some(claim("u1")), Some("nvidia"));
                r.served = served;
                let want = served || state == Configured;
                assert_eq!(r.hands_over(), want, "{state:?}, served {served}");
            }
        }
        // A quarantine keeps a record of ours on vfio only when something is there.
        for state in states {
            for on_vfio in [false, true] {
                let mut r = record(state, Some(claim("u1")), Some("nvidia"));
                r.served = true;
                r.quarantine_keeps(on_vfio);
                let ours = matches!(state, Configuring | Configured | Releasing);
                let want = if ours && on_vfio { Prebound } else { state };
                assert_eq!((r.state, r.holder.is_none(), r.served), (want, true, false));
            }
        }
        // Every transition that drops the holder forgets the tenant.
        let mut r = record(Configured, Some(claim("u1")), Some("nvidia"));
        r.served = true;
        assert!(!r.after_keep(true).unwrap().served);
        let mut unbound = record(Configured, Some(claim("u1")), None);
        unbound.served = true;
        assert!(!unbound.after_restore(Vec::new()).unwrap().served);
    }

    /// Every input: a ride lands only on a complete claim and a free partition.
    #[test]
    fn a_partition_record_rides_only_with_the_claims_last_move() {
        for configured in [false, true] {
            for recorded in [false, true] {
                let want = match (configured, recorded) {
                    (true, false) => OnPartitionRide::Land,
                    (false, false) => OnPartitionRide::Wait,
                    (_, true) => OnPartitionRide::Drop,
                };
                assert_eq!(on_partition_ride(configured, recorded), want);
            }
        }
    }

    /// Every input: only our own matching `activating` record spares the write.
    #[test]
    fn an_activation_reuses_only_its_own_activating_record() {
        use crate::fabric_state::PartitionState::{Activating, Active, Deactivating};
        for existing in [None, Some(Activating), Some(Active), Some(Deactivating)] {
            for matches in [false, true] {
                for new_map in [false, true] {
                    let reuse = existing == Some(Activating) && matches && !new_map;
                    assert_eq!(
                        activating_record_needed(existing, matches, new_map),
                        !reuse,
                        "{existing:?} {matches} {new_map}"
                    );
                }
            }
        }
    }

    /// Every input over a small domain: the original comes back unless the
    /// value seen is one nothing of ours could have left (the admin's).
    #[test]
    fn a_restored_override_is_the_original_unless_the_admin_set_another() {
        let values = [
            None,
            Some("vfio-pci"),
            Some("nvidia"),
            Some("snd_hda_intel"),
        ];
        for original in values {
            for written in values {
                for target in values {
                    for seen in values {
                        let admins = seen != original && seen != written && seen != target
                            || (seen.is_none() && original.is_some());
                        let want = if admins { seen } else { original };
                        assert_eq!(
                            override_after_restore(original, written, target, seen).as_deref(),
                            want,
                            "{original:?} {written:?} {target:?} {seen:?}"
                        );
                    }
                }
            }
        }
    }

    /// Every input: only vfio adopts, a driverless function is never repaired.
    #[test]
    fn an_unrecorded_gpu_is_adopted_on_vfio_and_otherwise_left_as_found() {
        for on_vfio in [false, true] {
            for driverless in [false, true] {
                let expected = match (on_vfio, driverless) {
                    (true, _) => OnUnrecorded::AdoptAsAdminOwned,
                    (false, true) => OnUnrecorded::LeaveAsFound,
                    (false, false) => OnUnrecorded::Nothing,
                };
                assert_eq!(on_unrecorded(on_vfio, driverless), expected);
            }
        }
    }
    use crate::ledger::{Changes, FunctionRecord};

    /// Every input: a partition is activated again only for a holder that
    /// holds all its GPUs, deactivated only when FM has it active and no
    /// holder holds them (or it was being deactivated), and forgotten only
    /// when FM has it inactive and nobody holds it.
    #[test]
    fn a_recorded_partition_is_activated_for_its_holder_and_otherwise_wound_down() {
        use crate::fabric_state::PartitionState::{Activating, Active, Deactivating};
        for state in [Activating, Active, Deactivating] {
            for fm_active in [false, true] {
                for holds in [false, true] {
                    let expected = match (state, fm_active, holds) {
                        (Deactivating, false, _) => OnRecordedPartition::Forget { finished: true },
                        (Deactivating, true, _) => OnRecordedPartition::DeactivateWhenIdle,
                        (_, false, false) => OnRecordedPartition::Forget { finished: false },
                        (_, false, true) => OnRecordedPartition::Activate,
                        (_, true, false) => OnRecordedPartition::DeactivateWhenIdle,
                        (Activating, true, true) => OnRecordedPartition::MarkActive,
                        (Active, true, true) => OnRecordedPartition::Keep,
                    };
                    assert_eq!(
                        on_recorded_partition(state, fm_active, holds),
                        expected,
                        "{state:?} fm_active={fm_active} holds={holds}"
                    );
                }
            }
        }
    }

    fn claim(uid: &str) -> Holder {
        Holder::Claim {
            uid: uid.into(),
            namespace: "ns".into(),
            name: "c".into(),
        }
    }

    fn record(state: OpState, holder: Option<Holder>, original: Option<&str>) -> GpuRecord {
        GpuRecord {
            state,
            holder,
            vfio_driver: None,
            was_on_vfio: false,
            functions: vec![FunctionRecord {
                bdf: "0000:66:00.0".parse().unwrap(),
                original_driver: original.map(|d| DriverName::new(d).unwrap()),
                original_override: None,
                override_written: None,
                bound_by_us: true,
                fingerprint: None,
                extra: BTreeMap::new(),
            }],
            changes: Changes::default(),
            stuck_on: None,
            boot_id: "b".into(),
            operation: 1,
            updated: 0,
            handover: None,
            unbound_by_pin: Vec::new(),
            served: false,
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn configure_transitions() {
        let (u1, u2) = (claim("u1"), claim("u2"));
        let configured = record(OpState::Configured, Some(u1.clone()), Some("nvidia"));
        assert_eq!(configured.on_configure(&u1, true), OnConfigure::AlreadyDone);
        assert_eq!(configured.on_configure(&u1, false), OnConfigure::Redrive);
        assert_eq!(
            configured.on_configure(&u2, true),
            OnConfigure::HeldByOther(u1.clone())
        );
        let configuring = record(OpState::Configuring, Some(u1.clone()), Some("nvidia"));
        assert_eq!(
            configuring.on_configure(&u1, false),
            OnConfigure::FinishFirst
        );
        assert_eq!(
            configuring.on_configure(&u2, false),
            OnConfigure::HeldByOther(u1.clone())
        );
        let prebound = record(OpState::Prebound, None, Some("vfio-pci"));
        assert_eq!(prebound.on_configure(&u2, true), OnConfigure::Fresh);
    }

    #[test]
    fn release_transitions_and_tombstones() {
        let u1 = claim("u1");
        assert_eq!(
            record(OpState::Prebound, None, None).on_release(),
            OnRelease::AdminOwned
        );
        assert_eq!(
            record(OpState::ReleasedUnbound, None, None).on_release(),
            OnRelease::AlreadyReleased
        );
        let driverless = record(OpState::Configured, Some(u1.clone()), None);
        let tomb = driverless.after_restore(Vec::new()).unwrap();
        assert_eq!(tomb.state, OpState::ReleasedUnbound);
        assert_eq!(tomb.kind(), RecordKind::ReleasedUnbound);
        assert_eq!(tomb.holder, None);
        let on_nvidia = record(OpState::Configured, Some(u1), Some("nvidia"));
        assert!(on_nvidia.after_restore(Vec::new()).is_none());
        // Left driverless by the admin's pin to none: remembered, and settled
        // again by reconcile.
        let b: Bdf = "0000:66:00.0".parse().unwrap();
        let pinned = on_nvidia.after_restore(vec![b]).unwrap();
        assert_eq!(pinned.state, OpState::ReleasedUnbound);
        assert_eq!(pinned.kind(), RecordKind::UnboundByPin);
        assert_eq!(pinned.on_reconcile(false, false), OnReconcile::Settle);
        assert_eq!(pinned.on_reconcile(true, false), OnReconcile::Settle);
        assert!(!pinned.put_on_vfio_by_us(b));
    }

    /// Every input of the settle decision: the promise holds for each (n10,
    /// n17): keep intent never restores, a VM holding the group is never
    /// unbound, a blocked device is never touched, admin-owned stays.
    #[test]
    fn settle_decision_over_every_input() {
        let kinds = [
            RecordKind::Ours,
            RecordKind::ReleasedUnbound,
            RecordKind::FoundOnVfio,
            RecordKind::KeptByIntent,
            RecordKind::UnboundByPin,
        ];
        let pinned: BTreeMap<Bdf, Option<DriverName>> =
            [("0000:66:00.0".parse().unwrap(), None)].into();
        let intents = [
            IntentNow::Keep("driverctl".into()),
            IntentNow::Unknown("policy unreadable".into()),
            IntentNow::Restore {
                pins: BTreeMap::new(),
            },
            IntentNow::Restore { pins: pinned },
        ];
        let mut seen = 0;
        for kind in kinds {
            for intent in &intents {
                for bits in 0..32u8 {
                    let observed = Observed {
                        vanished: bits & 1 != 0,
                        stuck: bits & 2 != 0,
                        vfio_in_use: bits & 4 != 0,
                        quarantined: bits & 8 != 0,
                        quarantined_at_home: bits & 16 != 0,
                    };
                    let got = decide_settle(kind, intent, observed);
                    seen += 1;
                    let keep = matches!(intent, IntentNow::Keep(_) | IntentNow::Unknown(_));
                    let ours = matches!(
                        kind,
                        RecordKind::Ours | RecordKind::KeptByIntent | RecordKind::UnboundByPin
                    );
                    let expected = if observed.vanished {
                        Settle::Forget
                    } else if kind == RecordKind::ReleasedUnbound {
                        Settle::AlreadyReleased
                    } else if kind == RecordKind::FoundOnVfio {
                        Settle::AdminOwned
                    } else if observed.stuck {
                        Settle::WaitStuck
                    } else if observed.quarantined
                        && (kind == RecordKind::KeptByIntent
                            || (kind == RecordKind::Ours && !observed.quarantined_at_home))
                    {
                        Settle::Quarantined
                    } else if let IntentNow::Keep(why) = intent {
                        Settle::Keep(why.clone())
                    } else if let IntentNow::Unknown(why) = intent {
                        Settle::WaitIntent(why.clone())
                    } else if observed.vfio_in_use {
                        Settle::WaitBusy
                    } else {
                        Settle::Restore
                    };
                    assert_eq!(got, expected, "{kind:?} {intent:?} {observed:?}");
                    // The promise, stated directly.
                    if got == Settle::Restore {
                        assert!(
                            !keep
                                && !observed.vfio_in_use
                                && !observed.stuck
                                && (!observed.quarantined
                                    || (kind == RecordKind::Ours && observed.quarantined_at_home)
                                    || kind == RecordKind::UnboundByPin)
                                && ours
                        );
                    }
                }
            }
        }
        assert_eq!(seen, 5 * 4 * 32);
    }

    /// Every input of the hand-over decision: a device is never reset while
    /// a user holds it, `off` never resets, a tenant's release always leads
    /// to a reset or a recorded reason not to, and a finished reset is
    /// never repeated (a crash in verification resumes verification).
    #[test]
    fn handover_decision_over_every_input() {
        let modes = [
            SanitizeMode::Reset,
            SanitizeMode::ResetAndHook,
            SanitizeMode::Off,
        ];
        let phases = [
            None,
            Some(HandoverPhase::Resetting),
            Some(HandoverPhase::Verifying),
        ];
        let mut seen = 0;
        for mode in modes {
            for phase in phases {
                for released_now in [false, true] {
                    for in_use in [false, true] {
                        let got = decide_handover(mode, phase, released_now, in_use);
                        seen += 1;
                        let expected = if phase.is_none() && !released_now {
                            HandoverStep::Nothing
                        } else if mode == SanitizeMode::Off {
                            HandoverStep::Unsanitized
                        } else if phase == Some(HandoverPhase::Verifying) {
                            HandoverStep::Verify
                        } else if in_use {
                            HandoverStep::WaitBusy
                        } else {
                            HandoverStep::Reset {
                                hook: mode == SanitizeMode::ResetAndHook,
                            }
                        };
                        let case =
                            format!("{mode} {phase:?} released={released_now} in_use={in_use}");
                        assert_eq!(got, expected, "{case}");
                        // The promises, stated directly.
                        if matches!(got, HandoverStep::Reset { .. }) {
                            assert!(!in_use && mode != SanitizeMode::Off, "{case}");
                        }
                        if released_now {
                            assert_ne!(got, HandoverStep::Nothing, "{case}");
                        }
                    }
                }
            }
        }
        assert_eq!(seen, 3 * 3 * 2 * 2);
    }

    fn fingerprint(device: u16, bar_bytes: u64) -> Fingerprint {
        Fingerprint {
            vendor: 0x10de,
            device,
            subsystem_vendor: 0x10de,
            subsystem_device: 0x1234,
            bar_bytes,
        }
    }

    /// Verification over every way a reset can leave a function: each fault
    /// alone is reported, naming what changed, and a clean one passes.
    #[test]
    fn verification_reports_each_fault_and_passes_a_clean_function() {
        let b: Bdf = "0000:66:00.0".parse().unwrap();
        let want = fingerprint(0x2330, 1 << 30);
        let link = |speed: &str, width| LinkState {
            current_speed: speed.into(),
            max_speed: "32.0 GT/s PCIe".into(),
            current_width: width,
            max_width: 16,
        };
        let health = |now: Fingerprint, l: Option<LinkState>| FunctionHealth {
            bdf: b,
            now,
            link: l,
        };
        let clean = health(want.clone(), Some(link("32.0 GT/s PCIe", 16)));
        assert_eq!(verify_function(Some(&want), &clean), Vec::<String>::new());
        // No link attributes (conventional PCI): identity and BARs still checked.
        assert!(verify_function(Some(&want), &health(want.clone(), None)).is_empty());
        let cases = [
            (
                health(fingerprint(0x2331, 1 << 30), None),
                "answers as 10de:2331",
            ),
            (health(fingerprint(0x2330, 0), None), "BARs total 0 bytes"),
            (
                health(want.clone(), Some(link("2.5 GT/s PCIe", 16))),
                "link trained to 2.5 GT/s",
            ),
            (
                health(want.clone(), Some(link("32.0 GT/s PCIe", 4))),
                "link trained to x4 of x16",
            ),
            (
                health(
                    Fingerprint {
                        vendor: 0xffff,
                        ..want.clone()
                    },
                    None,
                ),
                "not responding",
            ),
        ];
        for (h, says) in cases {
            let problems = verify_function(Some(&want), &h);
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(says), "{problems:?} vs {says}");
        }
        // Without a recorded fingerprint only what needs no baseline is checked.
        assert!(verify_function(None, &health(fingerprint(0x2331, 0), None)).is_empty());
    }

    /// Pins decide the target of a restore; otherwise the recorded origin.
    #[test]
    fn restore_targets_follow_pins_then_origins() {
        let rec = record(OpState::Releasing, None, Some("nvidia"));
        let f = &rec.functions[0];
        let origin = IntentNow::Restore {
            pins: BTreeMap::new(),
        };
        assert_eq!(
            origin.target(f).map(|d| d.to_string()),
            Some("nvidia".into())
        );
        let to_none = IntentNow::Restore {
            pins: [(f.bdf, None)].into(),
        };
        assert_eq!(to_none.target(f), None);
        let to_nouveau = IntentNow::Restore {
            pins: [(f.bdf, Some(DriverName::new("nouveau").unwrap()))].into(),
        };
        assert_eq!(
            to_nouveau.target(f).map(|d| d.to_string()),
            Some("nouveau".into())
        );
    }

    /// A record of ours marks its functions as put on vfio by us, whether or
    /// not the move completed (n2); admin-owned and found-on-vfio ones do not.
    #[test]
    fn a_failed_rollback_parked_on_vfio_is_still_ours() {
        let b: Bdf = "0000:66:00.0".parse().unwrap();
        let mut rec = record(OpState::Configuring, None, Some("nvidia"));
        rec.functions[0].bound_by_us = false;
        rec.vfio_driver = Some(DriverName::new("vfio-pci").unwrap());
        assert!(rec.put_on_vfio_by_us(b));
        rec.state = OpState::Prebound;
        assert!(!rec.put_on_vfio_by_us(b));
        rec.state = OpState::Configured;
        rec.was_on_vfio = true;
        assert!(!rec.put_on_vfio_by_us(b));
    }

    /// Reconcile's record transitions, over every state and host view.
    #[test]
    fn reconcile_transitions_over_every_input() {
        for state in [
            OpState::Configuring,
            OpState::Configured,
            OpState::Releasing,
            OpState::ReleasedUnbound,
            OpState::Prebound,
        ] {
            for (has_driver, on_vfio) in [(false, false), (true, false), (true, true)] {
                for owed in [false, true] {
                    let mut rec = record(state, None, Some("nvidia"));
                    rec.was_on_vfio = true;
                    rec.handover = owed.then(|| crate::ledger::Handover {
                        released_by: "claim".into(),
                        released_at: 0,
                        phase: HandoverPhase::Resetting,
                        reset_method: None,
                        hook: None,
                        extra: BTreeMap::new(),
                    });
                    let got = rec.on_reconcile(has_driver, on_vfio);
                    let ok = match state {
                        OpState::Configuring | OpState::Releasing => got == OnReconcile::Settle,
                        OpState::Configured => got == OnReconcile::NoteHeld,
                        OpState::ReleasedUnbound => {
                            matches!(got, OnReconcile::Drop(_)) == has_driver
                        }
                        // An owed hand-over is never dropped nor left alone.
                        OpState::Prebound if owed => got == OnReconcile::Settle,
                        OpState::Prebound => matches!(got, OnReconcile::Drop(_)) == !on_vfio,
                    };
                    assert!(
                        ok,
                        "{state:?} driver={has_driver} vfio={on_vfio} owed={owed}: {got:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn learn_decision_over_every_input() {
        for bits in 0..128u8 {
            let b = |i: u8| bits & (1 << i) != 0;
            let f = LearnFacts {
                recorded: b(0),
                in_partition: b(1),
                learn_pending: b(2),
                stuck: b(3),
                has_driver: b(4),
                on_vfio: b(5),
                vfio_in_use: b(6),
            };
            let plan = decide_learn(f);
            let untouchable = f.recorded || f.in_partition || f.learn_pending || f.stuck;
            match plan {
                // Invariant: a learn moves only an idle, unrecorded GPU on vfio.
                LearnPlan::VisitNvidia => assert!(
                    !untouchable && f.has_driver && f.on_vfio && !f.vfio_in_use,
                    "{f:?}"
                ),
                LearnPlan::ReadInPlace => {
                    assert!(!untouchable && f.has_driver && !f.on_vfio, "{f:?}");
                }
                LearnPlan::Refuse(why) => {
                    assert!(!why.is_empty());
                    assert!(
                        untouchable || !f.has_driver || (f.on_vfio && f.vfio_in_use),
                        "{f:?} refused: {why}"
                    );
                }
            }
        }
    }

    #[test]
    fn pending_learn_decision_over_every_input() {
        for bits in 0..8u8 {
            let (same_boot, present, on_vfio) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
            let d = on_pending_learn(same_boot, present, on_vfio);
            // Invariant: only this boot's learn of a present GPU off vfio moves it.
            assert_eq!(
                d == OnPendingLearn::ReturnToVfio,
                same_boot && present && !on_vfio,
                "{bits:03b}: {d:?}"
            );
        }
    }
}
