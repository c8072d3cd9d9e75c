//! NVIDIA Fabric Manager partitions for GPUs passed through to VMs.
//!
//! Knows nothing of Kubernetes. The pieces:
//!
//! - [`FabricManager`]: one method per FM SDK call, typed results, both
//!   return-code dialects normalised ([`Activated`], [`Deactivated`]).
//! - [`ffi`]: the SDK's C ABI declared by hand, sizes asserted at compile time.
//! - [`NvfmLibrary`]: the real backend, `dlopen("libnvfm.so.1")`.
//! - [`SimFabricManager`] / [`SimState`]: a simulated FM for tests (and the
//!   `fake-nvfm` cdylib).
//! - [`DeadlineFm`]: runs calls on a worker thread under a deadline.
//! - [`Topology`]: partition tables and exact-set selection.
//! - [`ModuleMap`]: module id ↔ BDF, from ranked sources; [`NvmlModuleIds`]
//!   reads module ids through NVML.
//!
//! Design and sources: the project reference "NVIDIA Fabric Manager: NVLink
//! partitions for passthrough VMs" (`fabric-manager.md`: §4 SDK, §5
//! partition tables, §6 module ids, §8 restarts, §11 design, §13
//! corrections). No NVIDIA header or code is vendored.

#![warn(missing_docs)]

mod api;
mod error;
pub mod ffi;
mod module_map;
mod nvfm;
mod nvml;
mod sim;
#[doc(hidden)]
pub mod testing;
mod topology;
mod types;

pub use api::{DeadlineFm, FabricManager, FmObserver, code_text};
pub use error::{Call, FmCode, FmError};
pub use module_map::{
    MAX_MAP_FILE_BYTES, ModuleEntry, ModuleMap, ModuleMapBuilder, ModuleMapError, ModuleSource,
    Superseded, parse_fm_bdf,
};
pub use nvfm::{NVFM_SONAMES, NvfmConfig, NvfmLibrary};
pub use nvml::{NVML_SONAME, NvmlError, NvmlModuleIds};
pub use sim::{
    Clock, ConnectRecord, Dialect, Fault, FaultAction, LogEntry, ManualClock, Phase,
    RESTART_REPLAY_WINDOW, SimFabricManager, SimPartition, SimState, SystemClock,
};
pub use topology::{PartitionSpec, Platform, Topology, TopologyError};
pub use types::{
    Activated, Deactivated, Endpoint, FailedDevice, ModuleId, NvlinkFailedDevices, Partition,
    PartitionGpu, PartitionId, PartitionList, UnsupportedPartition,
};
