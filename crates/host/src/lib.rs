//! Host model for vfio-gpu-dra.
//!
//! Everything here reads the host through one [`HostRoot`] (`--host-root`,
//! default `/`), so the same code runs on a node, inside a privileged pod that
//! mounts the host at `/host-root`, and against fixture trees in tests.
//!
//! The lifecycle starts here: [`PciHost::scan`] reads the PCI functions and
//! IOMMU groups, [`GpuSelector`] decides which functions are GPUs, and
//! [`discover_gpus`] groups each GPU with its companion functions.

#![warn(missing_docs)]

mod bdf;
pub mod demo;
mod error;
pub mod fixture;
mod gpu;
mod modules;
mod node;
mod pci;
mod pciids;
mod root;
pub mod vpd;

pub use bdf::{Bdf, DriverName, is_vfio_driver};
pub use error::HostError;
pub use gpu::{
    FunctionRole, Gpu, GpuFunction, GpuSelector, IdMatch, discover_gpus, is_fabric_function,
    is_fabric_switch,
};
pub use modules::{ModuleAliases, VendorModules, module_to_driver, vendor_modules};
pub use node::{
    CpuInfo, CpuVendor, IommuKind, IommuUnit, VfioModuleFiles, cpu_info, iommu_group_count,
    iommu_units, iommufd_unsupported, vfio_module_files,
};
pub use pci::{Binding, FunctionReader, PciFunction, PciHost, PciIdentity};
pub use pciids::PciIdsDb;
pub use root::{HostRoot, ReadGate};
