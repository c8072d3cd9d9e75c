//! nvidia persistence mode: turned off for a move when nvidia-persistenced is the only holder, back on at release.

use super::Engine;
use std::collections::BTreeMap;

use vfio_gpu_host::Bdf;

use crate::error::EngineError;
use crate::ledger::{GpuRecord, PendingPersistence, now};

impl Engine {
    /// Sets nvidia persistence mode of one GPU with the host's `nvidia-smi`.
    pub(super) fn set_persistence(&self, bdf: Bdf, on: bool) -> Result<(), String> {
        let mode = if on { "1" } else { "0" };
        let args = vec!["-i".into(), bdf.to_string(), "-pm".into(), mode.into()];
        self.run_program(bdf, "nvidia-smi", args).map(|_| ())
    }

    /// Turns persistence mode back on where configure turned it off, and
    /// commits `after` as the GPU's record together with what could not be
    /// turned on (kept in the ledger for reconcile to retry). Returns the
    /// failures, for the caller to report.
    pub(super) fn restore_persistence_and_record(
        &self,
        bdf: Bdf,
        rec: &GpuRecord,
        after: Option<GpuRecord>,
    ) -> Result<Vec<(Bdf, String)>, EngineError> {
        let failed: Vec<(Bdf, String)> = rec
            .changes
            .persistence_disabled
            .iter()
            .filter_map(|b| {
                let e = self.set_persistence(*b, true).err()?;
                tracing::warn!(gpu = %b, error = %e, "persistence mode left off; reconcile retries");
                Some((*b, e))
            })
            .collect();
        let boot_id = self.boot_id.clone();
        self.commit(|body| {
            match after {
                Some(mut r) => {
                    r.updated = now();
                    body.gpus.insert(bdf, r);
                }
                None => {
                    body.gpus.remove(&bdf);
                }
            }
            for (b, error) in &failed {
                body.persistence_to_restore.insert(
                    *b,
                    PendingPersistence {
                        boot_id: boot_id.clone(),
                        error: error.clone(),
                        since: now(),
                        extra: BTreeMap::new(),
                    },
                );
            }
        })?;
        Ok(failed)
    }

    /// Retries persistence mode left off at release, on GPUs back on nvidia
    /// and not held; drops entries of an earlier boot (a reboot reset it).
    pub(super) fn retry_persistence(&self) -> Result<(), EngineError> {
        let pending = self.with_ledger(|l| l.persistence_to_restore.clone());
        if pending.is_empty() {
            return Ok(());
        }
        let mut done = Vec::new();
        let mut still = Vec::new();
        for (b, p) in pending {
            if p.boot_id != self.boot_id {
                done.push(b);
                continue;
            }
            let on_nvidia = self
                .binding(b)
                .is_ok_and(|f| f.driver.is_some_and(|d| d.as_str() == "nvidia"));
            if !on_nvidia {
                continue;
            }
            match self.set_persistence(b, true) {
                Ok(()) => {
                    tracing::info!(gpu = %b, "persistence mode turned back on");
                    done.push(b);
                }
                Err(e) if e != p.error => still.push((b, e)),
                Err(_) => {}
            }
        }
        if done.is_empty() && still.is_empty() {
            return Ok(());
        }
        self.commit(|body| {
            for b in &done {
                body.persistence_to_restore.remove(b);
            }
            for (b, e) in &still {
                if let Some(p) = body.persistence_to_restore.get_mut(b) {
                    p.error = e.clone();
                }
            }
        })
    }
}

/// The words for persistence mode left off at release, for an outcome.
pub(super) fn persistence_left_off(failed: &[(Bdf, String)]) -> String {
    failed
        .iter()
        .map(|(b, e)| format!("; persistence mode is still off on {b}: {e} (reconcile retries)"))
        .collect()
}
