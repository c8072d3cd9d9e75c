//! The real backend: `dlopen` of the host's `libnvfm.so.1`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use libloading::Library;

use crate::api::{self, FabricManager, Session};
use crate::error::{Call, FmCode, FmError};
use crate::ffi;
use crate::types::{
    Activated, Deactivated, Endpoint, FailedDevice, ModuleId, NvlinkFailedDevices, Partition,
    PartitionGpu, PartitionId, PartitionList, UnsupportedPartition,
};

/// The sonames tried, in order: the versioned runtime library (shipped with
/// FM), then the `-dev` package's unversioned link.
pub const NVFM_SONAMES: [&str; 2] = ["libnvfm.so.1", "libnvfm.so"];

/// How to reach FM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvfmConfig {
    /// FM's API endpoint.
    pub endpoint: Endpoint,
    /// `timeoutMs` for each per-operation connect (`fmpm` uses 1000 ms).
    pub connect_timeout: Duration,
    /// Retry a connect refused with `VERSION_MISMATCH` with the v1 struct
    /// (libraries older than `addressType`; never for vsock). §13.1.
    pub allow_v1_connect: bool,
}

impl NvfmConfig {
    /// `endpoint` with a 1000 ms connect timeout and the v1 fallback on.
    pub fn new(endpoint: Endpoint) -> Self {
        NvfmConfig {
            endpoint,
            connect_timeout: Duration::from_millis(1000),
            allow_v1_connect: true,
        }
    }
}

#[derive(Clone, Copy)]
struct Symbols {
    lib_init: ffi::FnLibInit,
    lib_shutdown: ffi::FnLibInit,
    connect: ffi::FnConnect,
    disconnect: ffi::FnDisconnect,
    get_supported: ffi::FnGetSupported,
    activate: ffi::FnPartitionOp,
    deactivate: ffi::FnPartitionOp,
    set_activated: ffi::FnSetActivated,
    get_failed: Option<ffi::FnGetFailed>,
    get_unsupported: Option<ffi::FnGetUnsupported>,
}

/// `fmLibInit` is process-global: reference counts per loaded library
/// (keyed by the address of its `fmLibInit`), and whether we did the init.
static INITS: Mutex<Option<HashMap<usize, (usize, bool)>>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// [`FabricManager`] over the host's `libnvfm`.
///
/// `fmLibInit` runs once per process and library (reference-counted;
/// `fmLibShutdown` when the last user drops; an `IN_USE` answer means another
/// component of the process initialised it, and then we never shut it down).
/// Every operation connects, calls and disconnects, so an FM restart between
/// operations costs nothing. Operations on one `NvfmLibrary` are serialised
/// (the library's thread safety is undocumented): share one instance. Use
/// [`crate::DeadlineFm`] for deadlines.
///
/// The v2 connect struct is tried first; after a `VERSION_MISMATCH` the v1
/// struct is used (if allowed) and remembered for later operations.
pub struct NvfmLibrary {
    // Field order: the symbols are plain copies; `_lib` must outlive calls,
    // and it is only dropped with `self`, after `Drop::drop` ran.
    syms: Symbols,
    config: NvfmConfig,
    path: PathBuf,
    serial: Mutex<()>,
    /// 0 unknown, else the connect struct version that worked last.
    connect_version: AtomicU32,
    init_key: usize,
    _lib: Library,
}

impl std::fmt::Debug for NvfmLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvfmLibrary")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NvfmLibrary {
    /// Loads `libnvfm.so.1`, else `libnvfm.so`, from the loader's search path.
    pub fn open(config: NvfmConfig) -> Result<Self, FmError> {
        Self::open_candidates(NVFM_SONAMES.iter().map(PathBuf::from), config)
    }

    /// Loads `dir/libnvfm.so.1`, else `dir/libnvfm.so` (a driver root's
    /// library directory).
    pub fn open_in(dir: &Path, config: NvfmConfig) -> Result<Self, FmError> {
        Self::open_candidates(NVFM_SONAMES.iter().map(|n| dir.join(n)), config)
    }

    /// Loads exactly `path`.
    pub fn open_path(path: &Path, config: NvfmConfig) -> Result<Self, FmError> {
        Self::open_candidates(std::iter::once(path.to_path_buf()), config)
    }

    fn open_candidates(
        candidates: impl Iterator<Item = PathBuf>,
        config: NvfmConfig,
    ) -> Result<Self, FmError> {
        let mut errors = Vec::new();
        let mut first = None;
        for path in candidates {
            first.get_or_insert_with(|| path.clone());
            // SAFETY: loading a shared library runs its initialisers. We load
            // only the FM SDK library the admin installed (or the test fake);
            // it is the same trust we give the NVIDIA driver stack.
            match unsafe { Library::new(&path) } {
                Ok(lib) => return Self::from_library(lib, path, config),
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
        }
        Err(FmError::Load {
            path: first.unwrap_or_default(),
            detail: errors.join("; "),
        })
    }

    fn from_library(lib: Library, path: PathBuf, config: NvfmConfig) -> Result<Self, FmError> {
        let syms = resolve(&lib, &path)?;
        let init_key = syms.lib_init as usize;
        {
            let mut inits = lock(&INITS);
            let map = inits.get_or_insert_with(HashMap::new);
            match map.get_mut(&init_key) {
                Some((count, _)) => *count += 1,
                None => {
                    // SAFETY: `fmLibInit` takes no arguments; the library
                    // stays loaded while `lib` (moved into `self`) lives.
                    let raw = unsafe { (syms.lib_init)() };
                    let ours = match FmCode::from_raw(raw) {
                        Some(FmCode::Success) => true,
                        // Initialised by someone else in this process.
                        Some(FmCode::InUse) => false,
                        Some(code) => {
                            return Err(FmError::Fm {
                                call: Call::LibInit,
                                code,
                            });
                        }
                        None => {
                            return Err(FmError::UnknownCode {
                                call: Call::LibInit,
                                raw,
                            });
                        }
                    };
                    map.insert(init_key, (1, ours));
                }
            }
        }
        Ok(NvfmLibrary {
            syms,
            config,
            path,
            serial: Mutex::new(()),
            connect_version: AtomicU32::new(0),
            init_key,
            _lib: lib,
        })
    }

    /// The library loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connect struct version that worked last (0 before any connect).
    pub fn connect_version(&self) -> u32 {
        self.connect_version.load(Ordering::Relaxed)
    }

    /// `timeoutMs`, at least 1: what 0 means is undocumented (§13.12).
    fn timeout_ms(&self) -> u32 {
        u32::try_from(self.config.connect_timeout.as_millis())
            .unwrap_or(u32::MAX)
            .max(1)
    }

    fn connect_with(&self, params: *mut c_void) -> Result<ffi::FmHandle, FmError> {
        let mut handle: ffi::FmHandle = std::ptr::null_mut();
        // SAFETY: `params` points to a live, initialised connect struct whose
        // `version` word tells the library its layout; `handle` is a valid
        // out-pointer for the duration of the call.
        let raw = unsafe { (self.syms.connect)(params, &raw mut handle) };
        api::check(Call::Connect, raw)?;
        if handle.is_null() {
            return Err(FmError::Abi {
                call: Call::Connect,
                detail: "fmConnect succeeded with a null handle".into(),
            });
        }
        Ok(handle)
    }

    fn session(&self) -> Result<NvfmSession<'_>, FmError> {
        let guard = lock(&self.serial);
        let timeout = self.timeout_ms();
        let mut v2 = self.config.endpoint.connect_params_v2(timeout)?;
        let tried_v1_last = self.connect_version() == 1;
        let first = if tried_v1_last {
            Err(FmError::Fm {
                call: Call::Connect,
                code: FmCode::VersionMismatch,
            })
        } else {
            self.connect_with((&raw mut v2).cast())
        };
        let handle = match first {
            Ok(h) => {
                self.connect_version.store(2, Ordering::Relaxed);
                h
            }
            Err(e)
                if e.is_version_mismatch()
                    && self.config.allow_v1_connect
                    && !matches!(self.config.endpoint, Endpoint::Vsock { .. }) =>
            {
                let mut v1 = self.config.endpoint.connect_params_v1(timeout)?;
                let h = self.connect_with((&raw mut v1).cast())?;
                if !tried_v1_last {
                    tracing::info!(library = %self.path.display(), "libnvfm refused the v2 connect struct; using v1");
                }
                self.connect_version.store(1, Ordering::Relaxed);
                h
            }
            Err(e) => return Err(e),
        };
        Ok(NvfmSession {
            lib: self,
            handle,
            _guard: guard,
        })
    }
}

impl Drop for NvfmLibrary {
    fn drop(&mut self) {
        let mut inits = lock(&INITS);
        let Some(map) = inits.as_mut() else { return };
        let Some((count, ours)) = map.get_mut(&self.init_key) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            let ours = *ours;
            map.remove(&self.init_key);
            if ours {
                // SAFETY: no session is live (sessions borrow `self`), this was
                // the last user of this library's init, and `_lib` is still
                // loaded until after this function returns.
                let raw = unsafe { (self.syms.lib_shutdown)() };
                if raw != 0 {
                    tracing::warn!(code = raw, "fmLibShutdown failed");
                }
            }
        }
    }
}

fn symbol<T: Copy>(lib: &Library, path: &Path, name: &'static str) -> Result<T, FmError> {
    let mut c_name = name.as_bytes().to_vec();
    c_name.push(0);
    // SAFETY: every `T` used with this function is the hand-declared
    // `extern "C"` signature of the SDK function `name` (reference §4); the
    // copied pointer is used only while `lib` stays loaded (it lives in the
    // same `NvfmLibrary`).
    unsafe { lib.get::<T>(&c_name) }
        .map(|s| *s)
        .map_err(|e| FmError::MissingSymbol {
            library: path.to_path_buf(),
            symbol: name,
            detail: e.to_string(),
        })
}

fn resolve(lib: &Library, path: &Path) -> Result<Symbols, FmError> {
    Ok(Symbols {
        lib_init: symbol(lib, path, "fmLibInit")?,
        lib_shutdown: symbol(lib, path, "fmLibShutdown")?,
        connect: symbol(lib, path, "fmConnect")?,
        disconnect: symbol(lib, path, "fmDisconnect")?,
        get_supported: symbol(lib, path, "fmGetSupportedFabricPartitions")?,
        activate: symbol(lib, path, "fmActivateFabricPartition")?,
        deactivate: symbol(lib, path, "fmDeactivateFabricPartition")?,
        set_activated: symbol(lib, path, "fmSetActivatedFabricPartitions")?,
        get_failed: symbol(lib, path, "fmGetNvlinkFailedDevices").ok(),
        get_unsupported: symbol(lib, path, "fmGetUnsupportedFabricPartitions").ok(),
    })
}

struct NvfmSession<'a> {
    lib: &'a NvfmLibrary,
    handle: ffi::FmHandle,
    _guard: MutexGuard<'a, ()>,
}

impl Drop for NvfmSession<'_> {
    fn drop(&mut self) {
        // SAFETY: `handle` came from a successful `fmConnect` and is
        // disconnected exactly once, here.
        let raw = unsafe { (self.lib.syms.disconnect)(self.handle) };
        if raw != 0 {
            tracing::debug!(code = raw, "fmDisconnect failed");
        }
    }
}

fn count(call: Call, what: &str, n: u32, max: usize) -> Result<usize, FmError> {
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    if n > max {
        return Err(FmError::Abi {
            call,
            detail: format!("{what} = {n} exceeds {max}"),
        });
    }
    Ok(n)
}

fn convert_list(raw: &ffi::FmFabricPartitionList) -> Result<PartitionList, FmError> {
    let call = Call::GetSupportedPartitions;
    let n = count(
        call,
        "numPartitions",
        raw.num_partitions,
        ffi::FM_MAX_FABRIC_PARTITIONS,
    )?;
    let mut partitions = Vec::with_capacity(n);
    for info in raw.partition_info.iter().take(n) {
        let g = count(call, "numGpus", info.num_gpus, ffi::FM_MAX_NUM_GPUS)?;
        partitions.push(Partition {
            id: PartitionId(info.partition_id),
            is_active: info.is_active != 0,
            gpus: info
                .gpu_info
                .iter()
                .take(g)
                .map(|gpu| PartitionGpu {
                    physical_id: ModuleId(gpu.physical_id),
                    uuid: ffi::c_buf_to_string(&gpu.uuid),
                    pci_bus_id: ffi::c_buf_to_string(&gpu.pci_bus_id),
                    num_nvlinks_available: gpu.num_nvlinks_available,
                    max_num_nvlinks: gpu.max_num_nvlinks,
                    nvlink_line_rate_mbps: gpu.nvlink_line_rate_mbps,
                })
                .collect(),
        });
    }
    let list = PartitionList {
        partitions,
        max_num_partitions: raw.max_num_partitions,
    };
    api::validate_list(call, &list)?;
    Ok(list)
}

fn convert_failed(
    call: Call,
    what: &str,
    n: u32,
    max: usize,
    infos: &[ffi::FmNvlinkFailedDeviceInfo],
) -> Result<Vec<FailedDevice>, FmError> {
    let n = count(call, what, n, max)?;
    infos
        .iter()
        .take(n)
        .map(|d| {
            let p = count(call, "numPorts", d.num_ports, ffi::FM_MAX_NUM_NVLINK_PORTS)?;
            Ok(FailedDevice {
                uuid: ffi::c_buf_to_string(&d.uuid),
                pci_bus_id: ffi::c_buf_to_string(&d.pci_bus_id),
                ports: d.port_num.iter().take(p).copied().collect(),
            })
        })
        .collect()
}

impl Session for NvfmSession<'_> {
    fn list(&mut self) -> Result<PartitionList, FmError> {
        let mut raw = ffi::boxed_zeroed::<ffi::FmFabricPartitionList>();
        raw.version = ffi::FM_FABRIC_PARTITION_LIST_VERSION;
        // SAFETY: `handle` is connected; `raw` is a live, correctly sized and
        // versioned `fmFabricPartitionList_t` the library fills in.
        let rc = unsafe { (self.lib.syms.get_supported)(self.handle, &raw mut *raw) };
        api::check(Call::GetSupportedPartitions, rc)?;
        convert_list(&raw)
    }

    fn activate_raw(&mut self, id: PartitionId) -> Result<(), FmError> {
        // SAFETY: `handle` is connected; the id is passed by value.
        let rc = unsafe { (self.lib.syms.activate)(self.handle, id.0) };
        tracing::debug!(partition = id.0, code = rc, "fmActivateFabricPartition");
        api::check(Call::Activate, rc)
    }

    fn deactivate_raw(&mut self, id: PartitionId) -> Result<(), FmError> {
        // SAFETY: `handle` is connected; the id is passed by value.
        let rc = unsafe { (self.lib.syms.deactivate)(self.handle, id.0) };
        tracing::debug!(partition = id.0, code = rc, "fmDeactivateFabricPartition");
        api::check(Call::Deactivate, rc)
    }
}

impl FabricManager for NvfmLibrary {
    fn get_supported_partitions(&self) -> Result<PartitionList, FmError> {
        self.session()?.list()
    }

    fn activate(&self, id: PartitionId) -> Result<Activated, FmError> {
        api::activate_normalised(&mut self.session()?, id)
    }

    fn deactivate(&self, id: PartitionId) -> Result<Deactivated, FmError> {
        api::deactivate_normalised(&mut self.session()?, id)
    }

    fn set_activated_partitions(&self, ids: &[PartitionId]) -> Result<(), FmError> {
        let call = Call::SetActivatedPartitions;
        if ids.len() > ffi::FM_MAX_FABRIC_PARTITIONS {
            return Err(FmError::Abi {
                call,
                detail: format!("{} partitions exceed 64", ids.len()),
            });
        }
        let mut raw = ffi::boxed_zeroed::<ffi::FmActivatedFabricPartitionList>();
        raw.version = ffi::FM_ACTIVATED_FABRIC_PARTITION_LIST_VERSION;
        for (slot, id) in raw.partition_ids.iter_mut().zip(ids) {
            *slot = id.0;
        }
        raw.num_partitions = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        let session = self.session()?;
        // SAFETY: `handle` is connected; `raw` is a live, versioned list.
        let rc = unsafe { (self.syms.set_activated)(session.handle, &raw mut *raw) };
        tracing::info!(partitions = ?ids, code = rc, "fmSetActivatedFabricPartitions");
        api::check(call, rc)
    }

    fn get_nvlink_failed_devices(&self) -> Result<NvlinkFailedDevices, FmError> {
        let call = Call::GetNvlinkFailedDevices;
        let f = self.syms.get_failed.ok_or_else(|| self.missing(call))?;
        let mut raw = ffi::boxed_zeroed::<ffi::FmNvlinkFailedDevices>();
        raw.version = ffi::FM_NVLINK_FAILED_DEVICES_VERSION;
        let session = self.session()?;
        // SAFETY: `handle` is connected; `raw` is a live, versioned struct.
        let rc = unsafe { f(session.handle, &raw mut *raw) };
        api::check(call, rc)?;
        Ok(NvlinkFailedDevices {
            gpus: convert_failed(
                call,
                "numGpus",
                raw.num_gpus,
                ffi::FM_MAX_NUM_GPUS,
                &raw.gpu_info,
            )?,
            switches: convert_failed(
                call,
                "numSwitches",
                raw.num_switches,
                ffi::FM_MAX_NUM_NVSWITCHES,
                &raw.switch_info,
            )?,
        })
    }

    fn get_unsupported_partitions(&self) -> Result<Vec<UnsupportedPartition>, FmError> {
        let call = Call::GetUnsupportedPartitions;
        let f = self
            .syms
            .get_unsupported
            .ok_or_else(|| self.missing(call))?;
        let mut raw = ffi::boxed_zeroed::<ffi::FmUnsupportedFabricPartitionList>();
        raw.version = ffi::FM_UNSUPPORTED_FABRIC_PARTITION_LIST_VERSION;
        let session = self.session()?;
        // SAFETY: `handle` is connected; `raw` is a live, versioned struct.
        let rc = unsafe { f(session.handle, &raw mut *raw) };
        api::check(call, rc)?;
        let n = count(
            call,
            "numPartitions",
            raw.num_partitions,
            ffi::FM_MAX_FABRIC_PARTITIONS,
        )?;
        raw.partition_info
            .iter()
            .take(n)
            .map(|p| {
                let g = count(call, "numGpus", p.num_gpus, ffi::FM_MAX_NUM_GPUS)?;
                Ok(UnsupportedPartition {
                    id: PartitionId(p.partition_id),
                    modules: p
                        .gpu_physical_ids
                        .iter()
                        .take(g)
                        .map(|&m| ModuleId(m))
                        .collect(),
                })
            })
            .collect()
    }
}

impl NvfmLibrary {
    fn missing(&self, call: Call) -> FmError {
        FmError::MissingSymbol {
            library: self.path.clone(),
            symbol: call.symbol(),
            detail: "not exported by this libnvfm".into(),
        }
    }
}
