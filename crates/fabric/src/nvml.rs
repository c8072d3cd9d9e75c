//! NVML module-id reader: `dlopen` of `libnvidia-ml.so.1`, declared by hand.
//!
//! Works only for GPUs bound to `nvidia`; a vfio-bound GPU has no readable
//! module id. Each read initialises NVML, reads, and shuts NVML down again,
//! so no handle stays open across operations.

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::path::{Path, PathBuf};

use libloading::Library;
use vfio_gpu_host::Bdf;

use crate::types::ModuleId;

/// The soname loaded by [`NvmlModuleIds::open`].
pub const NVML_SONAME: &str = "libnvidia-ml.so.1";

type NvmlReturn = c_int;
type NvmlDevice = *mut c_void;
type FnInit = unsafe extern "C" fn() -> NvmlReturn;
type FnHandleByBusId = unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> NvmlReturn;
type FnModuleId = unsafe extern "C" fn(NvmlDevice, *mut c_uint) -> NvmlReturn;

/// NVML failures.
#[derive(Debug, thiserror::Error)]
pub enum NvmlError {
    /// The library could not be loaded.
    #[error("cannot load {}: {detail}", path.display())]
    Load {
        /// What we tried.
        path: PathBuf,
        /// The loader's message.
        detail: String,
    },
    /// A required symbol is missing (an NVML too old for module ids, or not NVML).
    #[error("{} has no symbol {symbol} (NVML too old, or not NVML): {detail}", path.display())]
    MissingSymbol {
        /// The NVML library that was loaded.
        path: PathBuf,
        /// The NVML function it lacks.
        symbol: &'static str,
        /// The loader's message.
        detail: String,
    },
    /// An NVML call failed.
    #[error("{call} failed for {bdf}: nvmlReturn_t {code}")]
    Call {
        /// The NVML function that failed.
        call: &'static str,
        /// The GPU it was called for.
        bdf: Bdf,
        /// The `nvmlReturn_t` it returned (never success).
        code: i32,
    },
}

/// Reads GPU module ids through NVML.
pub struct NvmlModuleIds {
    init: FnInit,
    shutdown: FnInit,
    handle_by_bus_id: FnHandleByBusId,
    module_id: FnModuleId,
    path: PathBuf,
    _lib: Library,
}

impl NvmlModuleIds {
    /// Loads `libnvidia-ml.so.1` from the loader's search path.
    pub fn open() -> Result<Self, NvmlError> {
        Self::open_path(Path::new(NVML_SONAME))
    }

    /// Loads exactly `path` and resolves the four functions used.
    pub fn open_path(path: &Path) -> Result<Self, NvmlError> {
        // SAFETY: loading runs the library's initialisers; we load only the
        // driver's NVML (the same trust as the NVIDIA driver stack).
        let lib = unsafe { Library::new(path) }.map_err(|e| NvmlError::Load {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        Ok(NvmlModuleIds {
            init: sym(&lib, path, "nvmlInit_v2")?,
            shutdown: sym(&lib, path, "nvmlShutdown")?,
            handle_by_bus_id: sym(&lib, path, "nvmlDeviceGetHandleByPciBusId_v2")?,
            module_id: sym(&lib, path, "nvmlDeviceGetModuleId")?,
            path: path.to_path_buf(),
            _lib: lib,
        })
    }

    /// The library loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The module id of the GPU at `bdf` (on `nvidia`); `None` when NVML
    /// reports 0 (not a baseboard GPU).
    pub fn module_id(&self, bdf: Bdf) -> Result<Option<ModuleId>, NvmlError> {
        let fail = |call, code| NvmlError::Call { call, bdf, code };
        // SAFETY: `nvmlInit_v2` takes no arguments; the library is loaded.
        let rc = unsafe { (self.init)() };
        if rc != 0 {
            return Err(fail("nvmlInit_v2", rc));
        }
        let result = self.read(bdf);
        // SAFETY: balances the successful `nvmlInit_v2` above.
        let rc = unsafe { (self.shutdown)() };
        if rc != 0 {
            tracing::debug!(code = rc, "nvmlShutdown failed");
        }
        result
    }

    fn read(&self, bdf: Bdf) -> Result<Option<ModuleId>, NvmlError> {
        let fail = |call, code| NvmlError::Call { call, bdf, code };
        // A `Bdf` prints as `dddd:bb:dd.f` (hex, no NUL), which NVML accepts.
        let Ok(bus_id) = CString::new(bdf.to_string()) else {
            return Err(fail("nvmlDeviceGetHandleByPciBusId_v2", -1));
        };
        let mut dev: NvmlDevice = std::ptr::null_mut();
        // SAFETY: `bus_id` is a live NUL-terminated string and `dev` a valid
        // out-pointer for the call; NVML is initialised.
        let rc = unsafe { (self.handle_by_bus_id)(bus_id.as_ptr(), &raw mut dev) };
        if rc != 0 {
            return Err(fail("nvmlDeviceGetHandleByPciBusId_v2", rc));
        }
        let mut module: c_uint = 0;
        // SAFETY: `dev` came from NVML in this init session; `module` is a
        // valid out-pointer.
        let rc = unsafe { (self.module_id)(dev, &raw mut module) };
        if rc != 0 {
            return Err(fail("nvmlDeviceGetModuleId", rc));
        }
        Ok((module != 0).then_some(ModuleId(module)))
    }
}

fn sym<T: Copy>(lib: &Library, path: &Path, name: &'static str) -> Result<T, NvmlError> {
    let mut c_name = name.as_bytes().to_vec();
    c_name.push(0);
    // SAFETY: each `T` is the hand-declared C signature of NVML's `name`;
    // the pointer is used only while `lib` (kept in the same struct) is loaded.
    unsafe { lib.get::<T>(&c_name) }
        .map(|s| *s)
        .map_err(|e| NvmlError::MissingSymbol {
            path: path.to_path_buf(),
            symbol: name,
            detail: e.to_string(),
        })
}
