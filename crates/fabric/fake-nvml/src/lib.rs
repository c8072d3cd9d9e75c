//! `fake-nvml`: a test-only `libnvidia-ml.so` exporting the four NVML calls
//! `vfio_gpu_fabric::NvmlModuleIds` uses (`nvmlInit_v2`, `nvmlShutdown`,
//! `nvmlDeviceGetHandleByPciBusId_v2`, `nvmlDeviceGetModuleId`), so tests
//! drive the real `dlopen` path.
//!
//! Every call re-reads the JSON file named by `$FAKE_NVML_STATE`:
//!
//! ```json
//! { "modules": { "0000:9a:00.0": 1 }, "hostRoot": "/tmp/host", "sleepMs": 0, "initResult": 0 }
//! ```
//!
//! Like the real NVML, a GPU is visible only while it is bound to `nvidia`:
//! with `hostRoot` set, a GPU whose `sys/bus/pci/devices/<BDF>/driver` link
//! under it does not end in `nvidia` is `NVML_ERROR_NOT_FOUND`. `sleepMs`
//! delays `nvmlDeviceGetModuleId` (a hung driver); `initResult` is what
//! `nvmlInit_v2` returns. No file: `nvmlInit_v2` fails with
//! `NVML_ERROR_DRIVER_NOT_LOADED`.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::path::{Path, PathBuf};
use std::time::Duration;

const NVML_SUCCESS: c_int = 0;
const NVML_ERROR_INVALID_ARGUMENT: c_int = 2;
const NVML_ERROR_NOT_FOUND: c_int = 6;
const NVML_ERROR_DRIVER_NOT_LOADED: c_int = 9;
const NVML_ERROR_UNKNOWN: c_int = 999;

fn state() -> Result<serde_json::Value, c_int> {
    let path = std::env::var_os("FAKE_NVML_STATE").ok_or(NVML_ERROR_DRIVER_NOT_LOADED)?;
    let text = std::fs::read_to_string(path).map_err(|_| NVML_ERROR_DRIVER_NOT_LOADED)?;
    serde_json::from_str(&text).map_err(|_| NVML_ERROR_UNKNOWN)
}

/// Normalises NVML's bus id forms (`00000000:9a:00.0`, `0000:9A:00.0`) to
/// the sysfs form.
fn normalise(bus_id: &str) -> Option<String> {
    let (domain, rest) = bus_id.trim().split_once(':')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    Some(format!("{domain:04x}:{}", rest.to_ascii_lowercase()))
}

/// The module id NVML would report for `bdf`, or the NVML error.
fn module_of(bdf: &str) -> Result<c_uint, c_int> {
    let s = state()?;
    if let Some(root) = s.get("hostRoot").and_then(|v| v.as_str()) {
        let link = Path::new(root)
            .join("sys/bus/pci/devices")
            .join(bdf)
            .join("driver");
        let on_nvidia = std::fs::read_link(link)
            .ok()
            .and_then(|t: PathBuf| t.file_name().map(|n| n == "nvidia"))
            .unwrap_or(false);
        if !on_nvidia {
            return Err(NVML_ERROR_NOT_FOUND);
        }
    }
    s.get("modules")
        .and_then(|m| m.get(bdf))
        .and_then(serde_json::Value::as_u64)
        .and_then(|m| c_uint::try_from(m).ok())
        .ok_or(NVML_ERROR_NOT_FOUND)
}

/// Handles are the bus id, leaked once per lookup (a test library: a few
/// bytes per call are of no concern).
fn handle_for(bdf: String) -> *mut c_void {
    Box::into_raw(Box::new(bdf)).cast()
}

/// `nvmlInit_v2`.
///
/// # Safety
///
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> c_int {
    match state() {
        Ok(s) => s
            .get("initResult")
            .and_then(serde_json::Value::as_i64)
            .and_then(|r| c_int::try_from(r).ok())
            .unwrap_or(NVML_SUCCESS),
        Err(e) => e,
    }
}

/// `nvmlShutdown`.
///
/// # Safety
///
/// None beyond the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> c_int {
    NVML_SUCCESS
}

/// `nvmlDeviceGetHandleByPciBusId_v2`.
///
/// # Safety
///
/// `bus_id` is a NUL-terminated string and `device` a valid out-pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    bus_id: *const c_char,
    device: *mut *mut c_void,
) -> c_int {
    if bus_id.is_null() || device.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: the caller passes a NUL-terminated string (checked non-null).
    let text = unsafe { CStr::from_ptr(bus_id) }.to_string_lossy();
    let Some(bdf) = normalise(&text) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    if let Err(e) = module_of(&bdf) {
        return e;
    }
    // SAFETY: `device` is a valid out-pointer (checked non-null).
    unsafe { *device = handle_for(bdf) };
    NVML_SUCCESS
}

/// `nvmlDeviceGetModuleId`.
///
/// # Safety
///
/// `device` came from `nvmlDeviceGetHandleByPciBusId_v2`; `module_id` is a
/// valid out-pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetModuleId(
    device: *mut c_void,
    module_id: *mut c_uint,
) -> c_int {
    if device.is_null() || module_id.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: handles are leaked `Box<String>`s made by `handle_for`.
    let bdf = unsafe { &*device.cast::<String>() };
    if let Some(ms) = state()
        .ok()
        .and_then(|s| s.get("sleepMs").and_then(serde_json::Value::as_u64))
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    match module_of(bdf) {
        Ok(m) => {
            // SAFETY: valid out-pointer (checked non-null).
            unsafe { *module_id = m };
            NVML_SUCCESS
        }
        Err(e) => e,
    }
}
