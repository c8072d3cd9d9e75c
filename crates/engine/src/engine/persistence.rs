//! nvidia persistence mode: turned off for a move when nvidia-persistenced is the only holder, back on at release.

use super::Engine;

use vfio_gpu_host::Bdf;

use crate::ledger::GpuRecord;

impl Engine {
    /// Sets nvidia persistence mode of one GPU with the host's `nvidia-smi`.
    pub(super) fn set_persistence(&self, bdf: Bdf, on: bool) -> Result<(), String> {
        let mode = if on { "1" } else { "0" };
        let args = vec!["-i".into(), bdf.to_string(), "-pm".into(), mode.into()];
        self.run_program(bdf, "nvidia-smi", args).map(|_| ())
    }

    /// Turns persistence mode back on where configure turned it off.
    pub(super) fn restore_persistence(&self, rec: &GpuRecord) {
        for b in &rec.changes.persistence_disabled {
            if let Err(e) = self.set_persistence(*b, true) {
                tracing::warn!(gpu = %b, error = %e, "could not turn persistence mode back on");
            }
        }
    }
}
