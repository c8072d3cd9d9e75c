//! `fake-nvfm`: a test-only `libnvfm.so` exporting the Fabric Manager SDK C
//! ABI (as declared by hand in `vfio_gpu_fabric::ffi`) on top of the
//! simulator's [`SimState`].
//!
//! State lives in a JSON file (a serialised [`SimState`]), re-read and
//! re-written by every call, so tests set up and inspect FM from outside the
//! library. Which file a connection uses:
//!
//! 1. `$FAKE_NVFM_STATE`, if set, for every connection;
//! 2. else, for a Unix-socket address, the "socket path" itself;
//! 3. else `$FAKE_NVFM_STATE_DIR` (default: the temp dir) joined with
//!    `fake-nvfm-<inet|vsock>-<address with non-alphanumerics as _>.json`.
//!
//! A missing state file means "FM not listening": `fmConnect` returns
//! `CONNECTION_NOT_VALID`. Strictness beyond the reference: a v2 connect with
//! `addressType` 0 (unset) is refused with `BADPARAM`.

use std::collections::BTreeMap;
use std::ffi::{c_uint, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use vfio_gpu_fabric::ffi::{self, FmHandle, FmReturnT};
use vfio_gpu_fabric::{
    Call, Clock, ConnectRecord, FaultAction, FmCode, PartitionId, SimState, SystemClock,
};

struct Global {
    init: bool,
    next: usize,
    handles: BTreeMap<usize, PathBuf>,
}

static GLOBAL: Mutex<Global> = Mutex::new(Global {
    init: false,
    next: 1,
    handles: BTreeMap::new(),
});

/// Serialises read-modify-write cycles of state files.
static FILES: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn raw(c: FmCode) -> FmReturnT {
    c.raw()
}

/// Loads the state at `path`, runs `f`, writes it back.
fn with_state<T>(path: &Path, f: impl FnOnce(&mut SimState) -> T) -> Result<T, FmReturnT> {
    let _g = lock(&FILES);
    let text = std::fs::read_to_string(path).map_err(|_| raw(FmCode::ConnectionNotValid))?;
    let mut state: SimState = serde_json::from_str(&text).map_err(|_| raw(FmCode::GenericError))?;
    let out = f(&mut state);
    let text = serde_json::to_string_pretty(&state).map_err(|_| raw(FmCode::GenericError))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|_| raw(FmCode::GenericError))?;
    std::fs::rename(&tmp, path).map_err(|_| raw(FmCode::GenericError))?;
    Ok(out)
}

/// Applies an injected fault for `call`: `Err(code)` to return it.
fn fault(path: &Path, call: Call) -> Result<(), FmReturnT> {
    match with_state(path, |s| s.take_fault(call))? {
        Some(FaultAction::Return(code)) if code != 0 => {
            let _ = with_state(path, |s| {
                s.log.push(vfio_gpu_fabric::LogEntry {
                    call,
                    partitions: Vec::new(),
                    code,
                });
            });
            Err(code)
        }
        Some(FaultAction::SleepMs(ms)) => {
            std::thread::sleep(Duration::from_millis(ms));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Runs one call on an open handle: lookup, fault, state machine.
fn op<T>(
    handle: FmHandle,
    call: Call,
    f: impl FnOnce(&mut SimState, u64) -> Result<T, i32>,
) -> Result<T, FmReturnT> {
    let path = {
        let g = lock(&GLOBAL);
        if !g.init {
            return Err(raw(FmCode::Uninitialized));
        }
        g.handles
            .get(&(handle as usize))
            .cloned()
            .ok_or(raw(FmCode::BadParam))?
    };
    fault(&path, call)?;
    let now = SystemClock.now_ms();
    with_state(&path, |s| f(s, now))?
}

fn done(r: Result<(), FmReturnT>) -> FmReturnT {
    r.err().unwrap_or(0)
}

fn state_path(rec: &ConnectRecord) -> PathBuf {
    if let Some(p) = std::env::var_os("FAKE_NVFM_STATE") {
        return PathBuf::from(p);
    }
    let unix = match rec.address_type {
        Some(t) => t == ffi::FM_CONNECT_ADDRESS_TYPE_UNIX,
        None => rec.address_is_unix_socket != 0,
    };
    if unix {
        return PathBuf::from(&rec.address_info);
    }
    let kind = match rec.address_type {
        Some(ffi::FM_CONNECT_ADDRESS_TYPE_VSOCK) => "vsock",
        _ => "inet",
    };
    let name: String = rec
        .address_info
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let dir =
        std::env::var_os("FAKE_NVFM_STATE_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    dir.join(format!("fake-nvfm-{kind}-{name}.json"))
}

/// `fmLibInit`.
///
/// # Safety
///
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fmLibInit() -> FmReturnT {
    let mut g = lock(&GLOBAL);
    if g.init {
        return raw(FmCode::InUse);
    }
    g.init = true;
    0
}

/// `fmLibShutdown`.
///
/// # Safety
///
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fmLibShutdown() -> FmReturnT {
    let mut g = lock(&GLOBAL);
    if !g.init {
        return raw(FmCode::Uninitialized);
    }
    g.init = false;
    g.handles.clear();
    0
}

/// Reads either connect struct version.
///
/// # Safety
///
/// `params` must point to a connect struct whose first word is its version.
unsafe fn read_connect(params: *const c_void) -> Result<ConnectRecord, FmReturnT> {
    // SAFETY: the caller passes a connect struct; every version starts with
    // a 4-byte `version` word.
    let version = unsafe { params.cast::<c_uint>().read_unaligned() };
    if version == ffi::FM_CONNECT_PARAMS_V2_VERSION {
        // SAFETY: the version word says this is a v2 struct (272 bytes).
        let p = unsafe { params.cast::<ffi::FmConnectParamsV2>().read_unaligned() };
        Ok(ConnectRecord {
            version,
            address_info: ffi::c_buf_to_string(&p.address_info),
            address_type: Some(p.address_type),
            address_is_unix_socket: p.address_is_unix_socket,
            timeout_ms: p.timeout_ms,
        })
    } else if version == ffi::FM_CONNECT_PARAMS_V1_VERSION {
        // SAFETY: the version word says this is a v1 struct (268 bytes).
        let p = unsafe { params.cast::<ffi::FmConnectParamsV1>().read_unaligned() };
        Ok(ConnectRecord {
            version,
            address_info: ffi::c_buf_to_string(&p.address_info),
            address_type: None,
            address_is_unix_socket: p.address_is_unix_socket,
            timeout_ms: p.timeout_ms,
        })
    } else {
        Err(raw(FmCode::VersionMismatch))
    }
}

/// `fmConnect`.
///
/// # Safety
///
/// `params` must point to a connect struct, `handle` to writable storage.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fmConnect(params: *mut c_void, handle: *mut FmHandle) -> FmReturnT {
    if params.is_null() || handle.is_null() {
        return raw(FmCode::BadParam);
    }
    if !lock(&GLOBAL).init {
        return raw(FmCode::Uninitialized);
    }
    // SAFETY: non-null, and the caller passes a connect struct.
    let rec = match unsafe { read_connect(params) } {
        Ok(r) => r,
        Err(e) => return e,
    };
    let path = state_path(&rec);
    let unset_type = rec.address_type == Some(ffi::FM_CONNECT_ADDRESS_TYPE_UNKNOWN);
    if let Err(e) = fault(&path, Call::Connect) {
        return e;
    }
    let now = SystemClock.now_ms();
    let r = with_state(&path, |s| {
        if unset_type {
            s.connects.push(rec);
            return Err(raw(FmCode::BadParam));
        }
        s.connect(now, rec)
    });
    match r {
        Ok(Ok(())) => {
            let mut g = lock(&GLOBAL);
            let id = g.next;
            g.next += 1;
            g.handles.insert(id, path);
            // SAFETY: `handle` is non-null and writable (caller contract). The
            // handle is an opaque token, never dereferenced.
            unsafe { handle.write(id as FmHandle) };
            0
        }
        Ok(Err(e)) | Err(e) => e,
    }
}

/// `fmDisconnect`.
///
/// # Safety
///
/// None beyond the C ABI (the handle is an opaque token).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fmDisconnect(handle: FmHandle) -> FmReturnT {
    let mut g = lock(&GLOBAL);
    match g.handles.remove(&(handle as usize)) {
        Some(_) => 0,
        None => raw(FmCode::BadParam),
    }
}

fn fill_list(
    list: &mut ffi::FmFabricPartitionList,
    state: &SimState,
    from: &vfio_gpu_fabric::PartitionList,
) {
    list.max_num_partitions = from.max_num_partitions;
    let mut n = 0u32;
    for (slot, p) in list.partition_info.iter_mut().zip(&from.partitions) {
        slot.partition_id = p.id.0;
        slot.is_active = u32::from(p.is_active);
        let mut g = 0u32;
        for (gs, gpu) in slot.gpu_info.iter_mut().zip(&p.gpus) {
            gs.physical_id = gpu.physical_id.0;
            gs.uuid = ffi::string_to_c_buf(&gpu.uuid).unwrap_or([0; ffi::FM_UUID_BUFFER_SIZE]);
            gs.pci_bus_id = ffi::string_to_c_buf(&gpu.pci_bus_id)
                .unwrap_or([0; ffi::FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE]);
            gs.num_nvlinks_available = gpu.num_nvlinks_available;
            gs.max_num_nvlinks = gpu.max_num_nvlinks;
            gs.nvlink_line_rate_mbps = gpu.nvlink_line_rate_mbps;
            g += 1;
        }
        slot.num_gpus = g;
        n += 1;
    }
    list.num_partitions = if state.corrupt_partition_count { 65 } else { n };
}

/// `fmGetSupportedFabricPartitions`.
///
/// # Safety
///
/// `list` must point to a writable `fmFabricPartitionList_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fmGetSupportedFabricPartitions(
    handle: FmHandle,
    list: *mut ffi::FmFabricPartitionList,
) -> FmReturnT {
    if list.is_null() {
        return raw(FmCode::BadParam);
    }
    // SAFETY: non-null and writable (caller contract); the first word is the version.
    let list = unsafe { &mut *list };
    if list.version != ffi::FM_FABRIC_PARTITION_LIST_VERSION {
        return raw(FmCode::VersionMismatch);
    }
    done(op(handle, Call::GetSupportedPartitions, |s, now| {
        let l = s.get_supported(now)?;
        fill_list(list, s, &l);
        Ok(())
    }))
}

/// `fmActivateFabricPartition`.
///
/// # Safety
///
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fmActivateFabricPartition(handle: FmHandle, id: c_uint) -> FmReturnT {
    done(op(handle, Call::Activate, |s, now| {
        s.activate(now, PartitionId(id))
    }))
}

/// `fmDeactivateFabricPartition`.
///
/// # Safety
///
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fmDeactivateFabricPartition(handle: FmHandle, id: c_uint) -> FmReturnT {
    done(op(handle, Call::Deactivate, |s, now| {
        s.deactivate(now, PartitionId(id))
    }))
}

/// `fmSetActivatedFabricPartitions`.
///
/// # Safety
///
/// `list` must point to a readable `fmActivatedFabricPartitionList_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fmSetActivatedFabricPartitions(
    handle: FmHandle,
    list: *mut ffi::FmActivatedFabricPartitionList,
) -> FmReturnT {
    if list.is_null() {
        return raw(FmCode::BadParam);
    }
    // SAFETY: non-null and readable (caller contract).
    let list = unsafe { &*list };
    if list.version != ffi::FM_ACTIVATED_FABRIC_PARTITION_LIST_VERSION {
        return raw(FmCode::VersionMismatch);
    }
    let Ok(n) = usize::try_from(list.num_partitions) else {
        return raw(FmCode::BadParam);
    };
    if n > ffi::FM_MAX_FABRIC_PARTITIONS {
        return raw(FmCode::BadParam);
    }
    let ids: Vec<PartitionId> = list
        .partition_ids
        .iter()
        .take(n)
        .map(|&i| PartitionId(i))
        .collect();
    done(op(handle, Call::SetActivatedPartitions, |s, now| {
        s.set_activated(now, &ids)
    }))
}

/// `fmGetNvlinkFailedDevices`.
///
/// # Safety
///
/// `out` must point to a writable `fmNvlinkFailedDevices_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fmGetNvlinkFailedDevices(
    handle: FmHandle,
    out: *mut ffi::FmNvlinkFailedDevices,
) -> FmReturnT {
    if out.is_null() {
        return raw(FmCode::BadParam);
    }
    // SAFETY: non-null and writable (caller contract).
    let out = unsafe { &mut *out };
    if out.version != ffi::FM_NVLINK_FAILED_DEVICES_VERSION {
        return raw(FmCode::VersionMismatch);
    }
    done(op(handle, Call::GetNvlinkFailedDevices, |s, now| {
        let d = s.nvlink_failed(now)?;
        out.num_gpus = u32::try_from(d.gpus.len()).unwrap_or(0);
        out.num_switches = u32::try_from(d.switches.len()).unwrap_or(0);
        Ok(())
    }))
}

/// `fmGetUnsupportedFabricPartitions`.
///
/// # Safety
///
/// `out` must point to a writable `fmUnsupportedFabricPartitionList_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fmGetUnsupportedFabricPartitions(
    handle: FmHandle,
    out: *mut ffi::FmUnsupportedFabricPartitionList,
) -> FmReturnT {
    if out.is_null() {
        return raw(FmCode::BadParam);
    }
    // SAFETY: non-null and writable (caller contract).
    let out = unsafe { &mut *out };
    if out.version != ffi::FM_UNSUPPORTED_FABRIC_PARTITION_LIST_VERSION {
        return raw(FmCode::VersionMismatch);
    }
    done(op(handle, Call::GetUnsupportedPartitions, |s, now| {
        let u = s.unsupported(now)?;
        out.num_partitions = u32::try_from(u.len()).unwrap_or(0);
        Ok(())
    }))
}
