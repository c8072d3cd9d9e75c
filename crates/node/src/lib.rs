//! Is this node ready for GPU passthrough, and, for each problem, the exact
//! fix: the one set of checks `vfio-gpu-dra doctor` prints and `serve` logs
//! at start.
//!
//! [`NodeFacts::read`] reads the node (sysfs, `/proc`, `/etc`,
//! `/lib/modules`) under the [`HostRoot`] and never writes; [`diagnose`]
//! judges those facts and the engine's read-only [`Inspection`] with pure
//! functions, so each check is tested on facts built in memory. The per-GPU
//! verdicts are the ones `explain` shows, so the checks and `explain`
//! cannot disagree. No Kubernetes here: rendering is the CLI's, logging the
//! kubelet plugin's ([`log_problems`]).

#![warn(missing_docs)]

mod checks;
pub mod fabric;
mod facts;
pub mod mmio;
mod other_drivers;

use std::path::Path;

use vfio_gpu_engine::Inspection;
use vfio_gpu_host::{HostError, HostRoot};
use vfio_gpu_intent::Policy;

pub use checks::{
    Check, Status, check_guest_mmio, check_interrupt_remapping, check_iommu, check_vfio_driver,
    diagnose,
};
pub use facts::NodeFacts;
pub use other_drivers::{
    OTHER_DRIVERS_FILE, OtherDrivers, OtherDriversError, check_other_drivers,
    check_other_drivers_in,
};

/// Reads the node under `root` and runs every check against it and `view`.
pub fn check_node(
    root: &HostRoot,
    view: &Inspection,
    policy: &Policy,
    policy_path: &Path,
) -> Result<Vec<Check>, HostError> {
    let facts = NodeFacts::read(root)?;
    Ok(diagnose(&facts, view, policy, policy_path))
}

/// Logs every check that did not pass, with its fix: a failure as an error,
/// a warning as a warning. Passing checks stay silent.
pub fn log_problems(checks: &[Check]) {
    // One field list for both levels (a level in `tracing` must be constant).
    macro_rules! log {
        ($level:ident, $c:expr, $gpu:expr, $msg:literal) => {
            tracing::$level!(check = $c.check, gpu = $gpu, detail = %$c.detail, fix = %$c.fix, $msg)
        };
    }
    for c in checks {
        let gpu = c.gpu.map(|b| b.to_string()).unwrap_or_default();
        match c.status {
            Status::Pass => {}
            Status::Warn => log!(warn, c, gpu, "node check warns"),
            Status::Fail => log!(error, c, gpu, "node check failed"),
        }
    }
}
