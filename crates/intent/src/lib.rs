//! Admin intent for vfio-gpu-dra: decides, with the kernel's and kmod's own
//! rules, which GPUs the administrator keeps on vfio-pci, and says why.
//!
//! The promise this crate carries: a GPU the administrator put on vfio-pci
//! stays there when a VM releases it. Every source of that intent is read
//! once per host ([`IntentSources::load`]) and evaluated per GPU
//! ([`evaluate`]) into a [`Verdict`] that lists every signal considered,
//! matched or not, so `explain` can answer "why is my GPU kept on vfio-pci?".
//!
//! Sources, in the order the reference (`kernel-vfio.md` §12) ranks them:
//! [`driverctl`] files, `driver_override`, `vfio-pci.ids` on the kernel
//! command line ([`cmdline`], [`ids`]), modprobe.d options ([`modprobe`]),
//! the bound-at-start state and our own [`policy`] file. Unknown or
//! unreadable configuration counts as admin-owned.

#![warn(missing_docs)]

pub mod cmdline;
pub mod driverctl;
mod error;
pub mod ids;
mod live;
pub mod modprobe;
pub mod policy;
mod read;
pub mod verdict;

pub use cmdline::{KernelParam, KmodCmdlineOption, kernel_params, kmod_options};
pub use driverctl::{Driverctl, DriverctlSetting};
pub use error::IntentError;
pub use ids::{IdEntry, PCI_ANY_ID, ParsedIds, parse_ids};
pub use live::{IntentSnapshot, LiveIntent};
pub use modprobe::{ModprobeConfig, Origin, effective_vfio_ids, vfio_pci_builtin};
pub use policy::{Policy, Sanitize, SanitizeMode, VfioDriverChoice};
pub use verdict::{
    IntentSources, NoRecords, OwnRecords, Pin, Reason, ReleaseDecision, Signal, Source, Verdict,
    evaluate,
};
