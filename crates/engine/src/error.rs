use std::fmt;

use serde::Serialize;
use vfio_gpu_host::{Bdf, HostError};

use crate::ledger::{Holder, LedgerError};
use crate::preflight::NodeHolder;

/// Where one function ended up, reported with every failure so the admin
/// knows exactly what state the host is in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionState {
    /// Address.
    #[serde(rename = "pciBusID")]
    pub bdf: Bdf,
    /// Current driver.
    pub driver: Option<String>,
    /// Current `driver_override`.
    pub driver_override: Option<String>,
    /// The driver it should be on, when it is not.
    pub expected: Option<String>,
    /// Set when the function could not be read: where it is is unknown
    /// (never reported as "no driver", which a failed read does not show).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

impl fmt::Display for FunctionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = &self.unreadable {
            return write!(f, "{} unknown (could not be read: {why})", self.bdf);
        }
        write!(
            f,
            "{} on {}",
            self.bdf,
            self.driver.as_deref().unwrap_or("no driver")
        )?;
        if let Some(o) = &self.driver_override {
            write!(f, " (override {o})")?;
        }
        if let Some(e) = &self.expected {
            write!(f, " [expected {e}]")?;
        }
        Ok(())
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why an engine operation failed. Each variant names the failing step.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Reading the host failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The ledger could not be written: nothing was changed on the host.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// No selected GPU at this address.
    #[error("no GPU at {0} (not present, or not selected as a GPU)")]
    UnknownGpu(Bdf),
    /// The admin pinned the device; it is never moved.
    #[error("{bdf} is pinned by the administrator ({detail}); it is never moved")]
    Pinned {
        /// GPU.
        bdf: Bdf,
        /// Which pin.
        detail: String,
    },
    /// No IOMMU group: vfio-pci cannot take the device.
    #[error(
        "{0} has no IOMMU group: enable the IOMMU (intel_iommu=on / amd_iommu=on) to pass it through"
    )]
    NoIommu(Bdf),
    /// The IOMMU group holds devices that are not this GPU's.
    #[error(
        "{bdf}: its IOMMU group also holds {members}; moving the group would take them from the host (set binding.allow-foreign-group-members in the policy to allow)"
    )]
    ForeignGroupMembers {
        /// GPU.
        bdf: Bdf,
        /// The other members.
        members: String,
    },
    /// SR-IOV VFs are enabled on the GPU.
    #[error("{bdf} has {count} SR-IOV VFs enabled; disable them (sriov_numvfs = 0) first")]
    VfsEnabled {
        /// GPU.
        bdf: Bdf,
        /// Enabled VFs.
        count: u32,
    },
    /// The vfio driver is not loaded.
    #[error(
        "driver {driver} is not loaded (no sys/bus/pci/drivers/{driver}); load it (modprobe {module}) or allow binding.load-vfio-module in the policy"
    )]
    VfioDriverMissing {
        /// Driver name.
        driver: String,
        /// Module name.
        module: String,
    },
    /// Running modprobe failed.
    #[error("modprobe {module} failed: {detail}")]
    Modprobe {
        /// Module.
        module: String,
        /// Output or error.
        detail: String,
    },
    /// A process still uses the GPU.
    #[error("{bdf} is in use: {}", list(holders))]
    Busy {
        /// GPU.
        bdf: Bdf,
        /// Who.
        holders: Vec<NodeHolder>,
    },
    /// Too few file descriptors are free for a move and its rollback: nothing
    /// was changed; retry once descriptors are free again.
    #[error(
        "{bdf}: only {free} file descriptors are free (of {limit}); a move needs {needed} so that its rollback can never be starved; nothing was changed, retry"
    )]
    FdsExhausted {
        /// GPU.
        bdf: Bdf,
        /// Descriptors free now.
        free: u64,
        /// The soft limit.
        limit: u64,
        /// What a move reserves.
        needed: u64,
    },
    /// The admin's intent sources (policy, driverctl, modprobe.d, the
    /// command line) could not be read in time: nothing was moved; a release
    /// keeps the GPU on vfio until they can be read again.
    #[error("the admin's intent cannot be read now ({0}); nothing was moved off vfio, retry")]
    IntentUnreadable(String),
    /// Turning nvidia persistence mode off failed.
    #[error("{bdf}: could not turn nvidia persistence mode off: {detail}")]
    Persistence {
        /// GPU.
        bdf: Bdf,
        /// What nvidia-smi said.
        detail: String,
    },
    /// nvidia refused its unbind lock (clients still open).
    #[error(
        "{bdf}: nvidia would not grant its unbind lock after {attempts} attempts (clients still open?)"
    )]
    UnbindLock {
        /// GPU.
        bdf: Bdf,
        /// Attempts made.
        attempts: u32,
    },
    /// Held by someone else.
    #[error("{bdf} is held by {holder}")]
    HeldByOther {
        /// GPU.
        bdf: Bdf,
        /// Current holder.
        holder: Holder,
    },
    /// Quarantined: a reset, verification or scrub hook between tenants
    /// failed; no tenant gets it until an administrator resets it.
    #[error(
        "{bdf} is quarantined ({reason}); it is not handed to a tenant until `vfio-gpu-dra reset {bdf}` resets and verifies it"
    )]
    Quarantined {
        /// GPU.
        bdf: Bdf,
        /// Why.
        reason: String,
    },
    /// The last tenant's hand-over (reset and verification) has not finished
    /// (a VM still holds the group, or a crash interrupted it): reconcile
    /// finishes it; the GPU goes to nobody before that.
    #[error("{bdf}: the last tenant's hand-over is not finished ({detail}); retry once it is")]
    HandoverPending {
        /// GPU.
        bdf: Bdf,
        /// What it waits for.
        detail: String,
    },
    /// A write outlived its deadline; the GPU is left alone until it returns.
    #[error(
        "{bdf} is stuck: {op} did not return within {secs:.1} s; the GPU is not touched until it does (other GPUs are unaffected)"
    )]
    Stuck {
        /// GPU.
        bdf: Bdf,
        /// The write.
        op: String,
        /// Seconds waited.
        secs: f64,
    },
    /// A step failed and everything was put back.
    #[error("{step} failed: {cause}; rolled back: {}", list(functions))]
    RolledBack {
        /// The failing step.
        step: String,
        /// Its error (the errno, for a sysfs write).
        #[source]
        cause: std::io::Error,
        /// Where every function is now.
        functions: Vec<FunctionState>,
    },
    /// A step failed and putting things back failed too.
    #[error(
        "{step} failed: {cause}; rollback incomplete ({rollback}): {}",
        list(functions)
    )]
    RollbackIncomplete {
        /// The failing step.
        step: String,
        /// Its error (the errno, for a sysfs write).
        #[source]
        cause: std::io::Error,
        /// What went wrong in the rollback.
        rollback: String,
        /// Where every function is now.
        functions: Vec<FunctionState>,
    },
    /// Restoring the host driver failed; the GPU was kept on vfio.
    #[error(
        "returning {bdf} to its driver failed: {step}: {cause}; kept on vfio so it is not left without a driver: {}",
        list(functions)
    )]
    RestoreFailed {
        /// GPU.
        bdf: Bdf,
        /// The failing step.
        step: String,
        /// Its error (the errno, for a sysfs write).
        #[source]
        cause: std::io::Error,
        /// Where every function is now.
        functions: Vec<FunctionState>,
    },
    /// The operation's thread panicked (a bug); the ledger and reconcile
    /// still know where the GPU stands.
    #[error("internal error while operating on {0}; run `vfio-gpu-dra reconcile`")]
    Panicked(Bdf),
    /// Test hook: the process "died" after this step.
    #[error("simulated crash after step {0}")]
    SimulatedCrash(u64),
    /// Another engine owns the state directory; names the holder (pid, command).
    #[error("{0}")]
    StateLocked(String),
    /// The state directory's lock could not be taken for another reason
    /// (read-only file system, permissions): not a contention.
    #[error(transparent)]
    StateLock(crate::lock::LockError),
    /// NVLink fabric (Fabric Manager) refusal or failure; the text names the
    /// partition, the GPUs and the fix.
    #[error("NVLink fabric: {0}")]
    Fabric(String),
    /// A partition's GPUs are still open through VFIO (a VM runs): it is
    /// never deactivated under them; retry once the VM is gone.
    #[error("NVLink partition {partition} is in use: {}", list(holders))]
    FabricBusy {
        /// FM partition id.
        partition: u32,
        /// Who holds its GPUs.
        holders: Vec<NodeHolder>,
    },
    /// An NVSwitch (PCI class 0x0680) shares the GPU's IOMMU group: it is
    /// never handed out, so the group cannot move.
    #[error(
        "{bdf}: its IOMMU group also holds NVSwitch {members} (PCI class 0x0680); NVSwitches stay with the host's Fabric Manager and are never passed through, so this GPU cannot be (fix the IOMMU grouping: ACS)"
    )]
    FabricSwitchInGroup {
        /// GPU.
        bdf: Bdf,
        /// The switch functions.
        members: String,
    },
}
