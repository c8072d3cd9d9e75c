//! The binding engine: moves a GPU's IOMMU group to vfio-pci and back.
//!
//! - [`kernel`]: the narrow kernel edge ([`kernel::Kernel`]) and the real sysfs implementation.
//! - [`sim`]: a simulated kernel on fixture trees, for tests and the demo.
//! - [`ledger`]: the write-ahead record (format-versioned, checksummed, atomic).
//! - [`Engine`]: configure, unconfigure, reconcile; rollback and deadlines.
//! - [`admin_socket`]: the administrator's `reset` into a running `serve`.

#![warn(missing_docs)]
// Operation docs name their private phases (`Engine::prior_record` …) on purpose, as a
// map for readers of the source; `cargo doc --document-private-items` resolves them.
#![allow(rustdoc::private_intra_doc_links)]

pub mod admin_socket;
pub mod commands;
mod deadline;
mod engine;
mod error;
pub mod fabric_state;
mod holder_scan;
pub mod kernel;
pub mod ledger;
pub mod lock;
pub mod preflight;
pub mod sim;
pub mod state;

pub use deadline::{LateResult, StuckSet};
pub use engine::fabric::{
    FabricAction, FabricConfig, FabricOutcome, FabricPlan, FabricPolicy, FabricStatus, GpuFabric,
    ModuleIdReader, UnmarkedActivation,
};
pub use engine::fabric_learn::LearnOutcome;
pub use engine::{
    Action, ClaimHeld, CrashMode, Engine, EngineConfig, GpuView, Inspection, OpenReport, Outcome,
    ReconcileResult, StateHold, StateLockMode, admin_may_release, inspect, pin_text, source_name,
};
pub use error::{EngineError, FunctionState, Step, Verification};
pub use ledger::Holder;
