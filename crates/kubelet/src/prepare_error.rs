//! Why preparing or unpreparing a claim failed: one type for every path of
//! [`crate::plugin::VfioPlugin`], rendered once into the per-claim error
//! string of the kubelet's gRPC answer (and the logs).
//!
//! Values are `Clone` because one claim's work is shared by every call that
//! asks for it while it runs; engine errors (which hold an `io::Error`) are
//! rendered into [`GpuFailure`] where they happen.

use std::fmt;

use vfio_gpu_engine::EngineError;
use vfio_gpu_host::Bdf;

use crate::grpc::dra::ClaimRef;

/// Why one claim could not be prepared or unprepared.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PrepareError {
    /// The claim UID the kubelet sent is not safe as a file name.
    #[error("invalid claim UID {0:?}")]
    InvalidUid(String),
    /// The claim's namespace or name is not a valid Kubernetes name.
    #[error("invalid claim namespace/name {namespace:?}/{name:?}")]
    InvalidName {
        /// The namespace as the kubelet sent it.
        namespace: String,
        /// The name as the kubelet sent it.
        name: String,
    },
    /// The API server does not serve `resource.k8s.io/v1` (the text names
    /// the Kubernetes versions and the feature gate).
    #[error("{0}")]
    ResourceApiMissing(&'static str),
    /// The GET of the ResourceClaim failed or timed out.
    #[error("fetching ResourceClaim {namespace}/{name}: {detail}")]
    Fetch {
        /// The claim's namespace.
        namespace: String,
        /// The claim's name.
        name: String,
        /// The client's error, or how long the API server stayed silent.
        detail: String,
    },
    /// The ResourceClaim does not exist (any more).
    #[error("ResourceClaim {namespace}/{name} not found")]
    NotFound {
        /// The claim's namespace.
        namespace: String,
        /// The claim's name.
        name: String,
    },
    /// The object under the claim's name has another UID: the claim the
    /// kubelet means was deleted and a new one made.
    #[error("ResourceClaim {namespace}/{name} now has UID {found:?}: the claim was replaced")]
    Replaced {
        /// The claim's namespace.
        namespace: String,
        /// The claim's name.
        name: String,
        /// The UID the API server has now.
        found: String,
    },
    /// The claim has no allocation yet.
    #[error("the claim is not allocated")]
    NotAllocated,
    /// The allocation names no device of this driver on this node.
    #[error("no device allocated from driver {driver} in pool {pool} (allocation has: {seen})")]
    NothingForUs {
        /// This plugin's driver name.
        driver: String,
        /// This node's pool name.
        pool: String,
        /// The allocation's results, rendered (`nothing` when empty).
        seen: String,
    },
    /// The claim's opaque configuration, or a request or pod claim name
    /// that cannot become a file or CDI name, is refused.
    #[error("{0}")]
    Invalid(String),
    /// Checks that need no host change refused devices; one reason per device.
    #[error("{}", join(.0))]
    Refused(Vec<Refusal>),
    /// Reading the host (the iommufd support, discovery) failed.
    #[error("{what}: {detail}")]
    Host {
        /// What was being read (`discovering GPUs`, `checking iommufd support`).
        what: &'static str,
        /// The engine's error, rendered.
        detail: String,
    },
    /// The engine's state lock could not be taken.
    #[error("state lock: {0}")]
    StateLock(String),
    /// The engine's blocking task died (a panic in the engine: a bug).
    #[error("{what}: engine task failed: {detail}")]
    TaskFailed {
        /// What the task was doing.
        what: &'static str,
        /// The join error.
        detail: String,
    },
    /// Moving or releasing GPUs failed; one entry per GPU that failed.
    #[error("{}", join(.0))]
    Gpus(Vec<GpuFailure>),
    /// The NVLink partition could not be checked, activated or deactivated.
    #[error("{0}")]
    Fabric(String),
    /// The claim's CDI spec or device metadata could not be written or removed.
    #[error("{0}")]
    Files(String),
    /// A later step failed and undoing what this call did failed too.
    #[error("{error}; rolling back GPUs configured by this call also failed: {}", .undo.join("; "))]
    UndoFailed {
        /// The failure that started the undo.
        error: Box<PrepareError>,
        /// What could not be undone, one entry each.
        undo: Vec<String>,
    },
    /// Any of the above, for one claim (the prefix the kubelet shows).
    #[error("claim {}/{} ({}): {error}", .claim.namespace, .claim.name, .claim.uid)]
    Claim {
        /// The claim the work was for.
        claim: ClaimRef,
        /// Why it failed.
        error: Box<PrepareError>,
    },
    /// The call's budget ran out while the work goes on in the background.
    #[error("claim {}/{} ({}): {work} still in progress, kubelet will retry", .claim.namespace, .claim.name, .claim.uid)]
    StillRunning {
        /// The claim the work is for.
        claim: ClaimRef,
        /// `preparation` or `release`.
        work: &'static str,
    },
    /// The background task of a claim's work died (a panic: a bug).
    #[error("claim task failed: {0}")]
    ClaimTaskFailed(String),
    /// The plugin is stopping and takes no new work.
    #[error("the plugin is shutting down")]
    ShuttingDown,
}

impl PrepareError {
    /// This error as one claim's failure, or unchanged if it already names it.
    pub fn for_claim(self, claim: &ClaimRef) -> Self {
        match self {
            PrepareError::Claim { .. } | PrepareError::StillRunning { .. } => self,
            error => PrepareError::Claim {
                claim: claim.clone(),
                error: Box::new(error),
            },
        }
    }

    /// `self`, with what could not be undone after it (unchanged when all was).
    pub fn with_undo(self, undo: Vec<String>) -> Self {
        if undo.is_empty() {
            self
        } else {
            PrepareError::UndoFailed {
                error: Box::new(self),
                undo,
            }
        }
    }
}

/// One GPU an engine operation failed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuFailure {
    /// The GPU.
    pub bdf: Bdf,
    /// The engine's error, rendered (it names the failing step and where
    /// every function is now).
    pub detail: String,
}

impl GpuFailure {
    /// The engine's error `e` for GPU `bdf`.
    pub fn new(bdf: Bdf, e: &EngineError) -> Self {
        GpuFailure {
            bdf,
            detail: e.to_string(),
        }
    }
}

impl fmt::Display for GpuFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Most engine errors name the GPU already; say it once.
        if self.detail.contains(&self.bdf.to_string()) {
            f.write_str(&self.detail)
        } else {
            write!(f, "{}: {}", self.bdf, self.detail)
        }
    }
}

/// Why one allocated device is refused before anything on the host changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The allocated device name is no GPU this node offers.
    NotOnNode {
        /// The allocated device name.
        device: String,
        /// The request it was allocated for.
        request: String,
        /// This node.
        node: String,
    },
    /// The request asked for admin access, which passthrough cannot give.
    AdminAccess(Bdf),
    /// The admin pinned the GPU to its driver.
    Pinned {
        /// The GPU.
        bdf: Bdf,
        /// Which pin (the source and its text).
        pin: String,
    },
    /// The GPU's IOMMU group holds other devices the host uses.
    ForeignGroupMembers {
        /// The GPU.
        bdf: Bdf,
        /// The other members, comma-separated.
        members: String,
    },
    /// Another holder has the GPU.
    HeldByOther {
        /// The GPU.
        bdf: Bdf,
        /// The holder, rendered.
        holder: String,
    },
    /// A write to the GPU outlived its deadline and has not returned.
    Stuck {
        /// The GPU.
        bdf: Bdf,
        /// The write that is stuck, as recorded.
        op: String,
    },
    /// The device's configuration asks for iommufd where nobody can use it.
    IommufdRefused {
        /// The allocated device name.
        device: String,
        /// The GPU.
        bdf: Bdf,
        /// The request.
        request: String,
        /// Why (the consumer, or what the kernel lacks).
        why: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Debug formatting escapes whatever the names hold.
            Refusal::NotOnNode {
                device,
                request,
                node,
            } => write!(
                f,
                "device {device:?} (request {request:?}) is not a GPU on node {node}"
            ),
            Refusal::AdminAccess(bdf) => write!(
                f,
                "{bdf}: adminAccess is not supported for VFIO passthrough"
            ),
            Refusal::Pinned { bdf, pin } => write!(
                f,
                "{bdf} is pinned by the administrator ({pin}); it is never moved"
            ),
            Refusal::ForeignGroupMembers { bdf, members } => write!(
                f,
                "{bdf}: its IOMMU group also holds {members}; passing it through would take them from the host"
            ),
            Refusal::HeldByOther { bdf, holder } => write!(f, "{bdf} is held by {holder}"),
            Refusal::Stuck { bdf, op } => write!(f, "{bdf} is stuck in {op}"),
            Refusal::IommufdRefused {
                device,
                bdf,
                request,
                why,
            } => write!(
                f,
                "device {device:?} ({bdf}, request {request:?}): iommuBackend \"iommufd\" refused: {why}"
            ),
        }
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> ClaimRef {
        ClaimRef {
            uid: "u1".into(),
            namespace: "ns".into(),
            name: "c".into(),
        }
    }

    #[test]
    fn a_claim_prefix_is_added_once() {
        let e = PrepareError::NotAllocated
            .for_claim(&claim())
            .for_claim(&claim());
        assert_eq!(e.to_string(), "claim ns/c (u1): the claim is not allocated");
    }

    #[test]
    fn an_undo_with_nothing_left_adds_nothing() {
        let e = PrepareError::Fabric("x".into()).with_undo(Vec::new());
        assert_eq!(e, PrepareError::Fabric("x".into()));
        let e = PrepareError::Fabric("x".into()).with_undo(vec!["a".into(), "b".into()]);
        assert_eq!(
            e.to_string(),
            "x; rolling back GPUs configured by this call also failed: a; b"
        );
    }

    #[test]
    fn a_gpu_failure_names_the_gpu_once() {
        let bdf: Bdf = "0000:65:00.0".parse().expect("bdf");
        let named = GpuFailure {
            bdf,
            detail: format!("{bdf} is in use"),
        };
        let unnamed = GpuFailure {
            bdf,
            detail: "ledger unwritable".into(),
        };
        assert_eq!(
            PrepareError::Gpus(vec![named, unnamed]).to_string(),
            "0000:65:00.0 is in use; 0000:65:00.0: ledger unwritable"
        );
    }
}
