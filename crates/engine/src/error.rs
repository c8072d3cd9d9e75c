use std::fmt;

use serde::Serialize;
use vfio_gpu_host::{Bdf, DriverName, HostError};

use crate::kernel::SysfsWrite;
use crate::ledger::{Holder, LedgerError};
use crate::preflight::NodeHolder;

/// Where one function ended up, reported with every failure so the admin
/// knows exactly what state the host is in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionState {
    /// The function's PCI address.
    #[serde(rename = "pciBusID")]
    pub bdf: Bdf,
    /// The driver it is bound to now (`None`: no driver).
    pub driver: Option<String>,
    /// Its `driver_override` now (`None`: cleared).
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

/// The step of a move or a release that failed: a host write, or a check
/// that the host is as the writes left it. Renders as the text errors have
/// always shown (`bind 0000:65:00.0 to vfio-pci`, `verify group 12 viable`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A host write the kernel refused, or one not started (the operation's
    /// budget spent, the admin's intent refusing it).
    Write(SysfsWrite),
    /// A check after the writes found the host not as they left it.
    Verify(Verification),
}

/// A check the engine makes after its writes, because sysfs can report
/// success for a write that did not do what it asked (a bind that probed
/// nothing, a group node that never appeared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verification {
    /// The function is on the driver its bind named.
    BoundTo {
        /// The function that was bound.
        bdf: Bdf,
        /// The driver it should now be on.
        driver: DriverName,
    },
    /// `/dev/vfio/<group>` (or every moved function's device cdev) appeared.
    GroupNode {
        /// The IOMMU group whose node a VM opens.
        group: u32,
    },
    /// Every member of the group is unbound or on a driver that manages DMA
    /// itself (vfio, pci-stub, pcieport), so VFIO can hand the group out.
    GroupViable {
        /// The IOMMU group checked.
        group: u32,
    },
    /// A function found driverless during a release got back onto vfio
    /// (it is never left without a driver).
    ParkedOn {
        /// The function parked.
        bdf: Bdf,
        /// The vfio driver it should be on.
        driver: DriverName,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Write(w) => w.fmt(f),
            Step::Verify(v) => v.fmt(f),
        }
    }
}

impl fmt::Display for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verification::BoundTo { bdf, driver } => write!(f, "verify {bdf} on {driver}"),
            Verification::GroupNode { group } => write!(f, "verify /dev/vfio/{group}"),
            Verification::GroupViable { group } => write!(f, "verify group {group} viable"),
            Verification::ParkedOn { bdf, driver } => write!(f, "park {bdf} on {driver}"),
        }
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
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// Which pin, as its source says it (driverctl, the policy, a kernel parameter).
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
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// The other members of the IOMMU group, comma-separated.
        members: String,
    },
    /// SR-IOV VFs are enabled on the GPU.
    #[error("{bdf} has {count} SR-IOV VFs enabled; disable them (sriov_numvfs = 0) first")]
    VfsEnabled {
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// How many VFs `sriov_numvfs` reports.
        count: u32,
    },
    /// The vfio driver is not loaded.
    #[error(
        "driver {driver} is not loaded (no sys/bus/pci/drivers/{driver}); load it (modprobe {module}) or allow binding.load-vfio-module in the policy"
    )]
    VfioDriverMissing {
        /// The vfio driver the move needs (`vfio-pci` or a variant driver).
        driver: String,
        /// The kernel module that provides it.
        module: String,
    },
    /// Running modprobe failed.
    #[error("modprobe {module} failed: {detail}")]
    Modprobe {
        /// The module modprobe was asked to load.
        module: String,
        /// modprobe's output, or why it could not run.
        detail: String,
    },
    /// A process still uses the GPU.
    #[error("{bdf} is in use: {}", list(holders))]
    Busy {
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// The processes holding the GPU's device nodes (pid, command, node).
        holders: Vec<NodeHolder>,
    },
    /// Too few file descriptors are free for a move and its rollback: nothing
    /// was changed; retry once descriptors are free again.
    #[error(
        "{bdf}: only {free} file descriptors are free (of {limit}); a move needs {needed} so that its rollback can never be starved; nothing was changed, retry"
    )]
    FdsExhausted {
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// File descriptors free in this process now.
        free: u64,
        /// The process's soft `RLIMIT_NOFILE`.
        limit: u64,
        /// How many a move and its rollback reserve.
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
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// What `nvidia-smi` printed, or why it could not run.
        detail: String,
    },
    /// nvidia refused its unbind lock (clients still open).
    #[error(
        "{bdf}: nvidia would not grant its unbind lock after {attempts} attempts (clients still open?)"
    )]
    UnbindLock {
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// How many times the lock was asked for.
        attempts: u32,
    },
    /// Held by someone else.
    #[error("{bdf} is held by {holder}")]
    HeldByOther {
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// The claim or admin that holds it now.
        holder: Holder,
    },
    /// An administrator's release of a GPU a ResourceClaim holds, refused:
    /// nothing was changed.
    #[error("{bdf} is held by {holder}; release it through Kubernetes, or force the release")]
    HeldByClaim {
        /// The GPU the admin asked to release.
        bdf: Bdf,
        /// The claim that holds it.
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
    /// An operation on the GPU was interrupted (its record is still
    /// configuring or releasing): an admin command waits until reconcile has
    /// finished it, so it never acts on a half-moved GPU.
    #[error(
        "{bdf}: an interrupted operation is not finished (record {state}); run `vfio-gpu-dra reconcile` (serve does at start), then retry"
    )]
    Unfinished {
        /// GPU.
        bdf: Bdf,
        /// The record's state.
        state: String,
    },
    /// A write outlived its deadline; the GPU is left alone until it returns.
    #[error(
        "{bdf} is stuck: {op} did not return within {secs:.1} s; the GPU is not touched until it does (other GPUs are unaffected)"
    )]
    Stuck {
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// The host write (or bounded read) that is stuck, as recorded when it
        /// outlived its deadline: the ledger keeps it as text across restarts.
        op: String,
        /// How long it was waited for, in seconds (0 when found stuck before).
        secs: f64,
    },
    /// A step failed and everything was put back.
    #[error("{step} failed: {cause}; rolled back: {}", list(functions))]
    RolledBack {
        /// The step that failed (its write, or the check after it).
        step: Step,
        /// Its error (the errno, for a sysfs write).
        #[source]
        cause: std::io::Error,
        /// Where every function of the GPU is now, read after the failure.
        functions: Vec<FunctionState>,
    },
    /// A step failed and putting things back failed too.
    #[error(
        "{step} failed: {cause}; rollback incomplete ({rollback}): {}",
        list(functions)
    )]
    RollbackIncomplete {
        /// The step that failed (its write, or the check after it).
        step: Step,
        /// Its error (the errno, for a sysfs write).
        #[source]
        cause: std::io::Error,
        /// Why putting things back failed (the rollback's own error).
        rollback: Box<EngineError>,
        /// Where every function of the GPU is now, read after the failure.
        functions: Vec<FunctionState>,
    },
    /// Restoring the host driver failed; the GPU was kept on vfio.
    #[error(
        "returning {bdf} to its driver failed: {step}: {cause}; kept on vfio so it is not left without a driver: {}",
        list(functions)
    )]
    RestoreFailed {
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// The step that failed (its write, or the check after it).
        step: Step,
        /// Its error (the errno, for a sysfs write).
        #[source]
        cause: std::io::Error,
        /// Where every function of the GPU is now, read after the failure.
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
        /// The Fabric Manager partition id.
        partition: u32,
        /// The processes holding its GPUs' vfio nodes.
        holders: Vec<NodeHolder>,
    },
    /// An NVSwitch (PCI class 0x0680) or an NVLink management bridge
    /// (`SW_MNG` in its VPD) shares the GPU's IOMMU group: it is never
    /// handed out, so the group cannot move.
    #[error(
        "{bdf}: its IOMMU group also holds NVLink fabric function {members} (an NVSwitch, PCI class 0x0680, or an NVLink management bridge, SW_MNG in its VPD); they stay with the host's Fabric Manager and are never passed through, so this GPU cannot be (fix the IOMMU grouping: ACS)"
    )]
    FabricSwitchInGroup {
        /// The GPU the operation was asked about (its first function's address).
        bdf: Bdf,
        /// The NVSwitch functions in the group, comma-separated.
        members: String,
    },
}
