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
//! ```

use std::collections::BTreeMap;

use vfio_gpu_host::{DriverName, PciFunction};

use crate::ledger::{Changes, FunctionRecord, GpuRecord, Holder, OpState};

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

impl FunctionRecord {
    /// A function as found on the host, before we touch it.
    pub fn as_found(f: &PciFunction) -> FunctionRecord {
        FunctionRecord {
            bdf: f.bdf,
            original_driver: f.driver.clone(),
            original_override: f.driver_override.clone(),
            override_written: None,
            bound_by_us: false,
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
            extra: BTreeMap::new(),
        }
    }

    /// The write-ahead record of moving a held GPU back to vfio after
    /// something moved it off: the recorded origins stay; only functions the
    /// record does not know yet are recorded as found.
    pub fn redriven(
        mut self,
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
        self.stuck_on = None;
        self.changes.unbind_lock_taken |= changes.unbind_lock_taken;
        for b in changes.persistence_disabled {
            if !self.changes.persistence_disabled.contains(&b) {
                self.changes.persistence_disabled.push(b);
            }
        }
        self.operation = operation;
        self
    }

    /// The transition a configure for `holder` takes from this record.
    /// `all_on_vfio`: every function of the GPU is on a vfio driver now.
    pub fn on_configure(&self, holder: &Holder, all_on_vfio: bool) -> OnConfigure {
        let ours = self.holder.as_ref() == Some(holder);
        match self.state {
            OpState::Configured if ours && all_on_vfio => OnConfigure::AlreadyDone,
            OpState::Configured if ours => OnConfigure::Redrive,
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

    /// What is left once every function is back at its origin: a tombstone
    /// for a GPU that had no driver when we found it (so reconcile does not
    /// "repair" it by probing one), nothing otherwise.
    pub fn after_restore(&self) -> Option<GpuRecord> {
        let unbound = self
            .functions
            .first()
            .is_some_and(|f| f.original_driver.is_none());
        unbound.then(|| GpuRecord {
            state: OpState::ReleasedUnbound,
            holder: None,
            stuck_on: None,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ledger::{Changes, FunctionRecord};

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
                extra: BTreeMap::new(),
            }],
            changes: Changes::default(),
            stuck_on: None,
            boot_id: "b".into(),
            operation: 1,
            updated: 0,
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
        let tomb = driverless.after_restore().unwrap();
        assert_eq!(tomb.state, OpState::ReleasedUnbound);
        assert_eq!(tomb.holder, None);
        assert!(
            record(OpState::Configured, Some(u1), Some("nvidia"))
                .after_restore()
                .is_none()
        );
    }
}
