//! The Fabric Manager SDK C ABI (`libnvfm.so.1`), declared by hand.
//!
//! Every type here was written from the field lists, sizes and `version`
//! words in `/work/shared/reference/fabric-manager.md` §4 and §13 (which were
//! checked against the public SDK header with a C probe on x86_64). No NVIDIA
//! header or code is copied. The compile-time asserts below pin each size, and
//! the `version` words are computed the way the SDK's macro does:
//! `sizeof(struct) | (version << 24)`.
//!
//! Where the reference gives only a size (the NVLink-failed-device and
//! unsupported-partition structs), the field list is the one whose sizes add
//! up exactly under the limits the reference names (`FM_MAX_NUM_GPUS`,
//! `FM_MAX_NUM_NVSWITCHES`, `FM_MAX_NUM_NVLINK_PORTS`, the UUID and BDF buffer
//! sizes); the field order was cross-checked against the public layout (as
//! the reference allows for go-nvfm), nothing copied.

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::mem::{offset_of, size_of};

/// `FM_MAX_NUM_GPUS`: GPUs per partition and per failed-device list.
pub const FM_MAX_NUM_GPUS: usize = 16;
/// `FM_MAX_FABRIC_PARTITIONS`: partitions per list.
pub const FM_MAX_FABRIC_PARTITIONS: usize = 64;
/// `FM_MAX_NUM_NVSWITCHES`: switches per failed-device list.
pub const FM_MAX_NUM_NVSWITCHES: usize = 12;
/// `FM_MAX_STR_LENGTH`: the connect address buffer, NUL included.
pub const FM_MAX_STR_LENGTH: usize = 256;
/// `FM_UUID_BUFFER_SIZE`.
pub const FM_UUID_BUFFER_SIZE: usize = 80;
/// `FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE`.
pub const FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE: usize = 32;
/// `FM_MAX_NUM_NVLINK_PORTS`.
pub const FM_MAX_NUM_NVLINK_PORTS: usize = 64;
/// `FM_CMD_PORT_NUMBER`: FM's default API TCP port.
pub const FM_CMD_PORT_NUMBER: u16 = 6666;

/// `fmReturn_t` (a C enum: 4 bytes with gcc/clang on Linux).
pub type FmReturnT = c_int;
/// `fmHandle_t`: an opaque pointer owned by the library.
pub type FmHandle = *mut c_void;
/// `fmFabricPartitionId_t`.
pub type FmFabricPartitionId = c_uint;

/// `addressType` value: unknown (left unset by old clients).
pub const FM_CONNECT_ADDRESS_TYPE_UNKNOWN: c_int = 0;
/// `addressType` value: IPv4 `x.x.x.x[:port]`.
pub const FM_CONNECT_ADDRESS_TYPE_INET: c_int = 1;
/// `addressType` value: a Unix socket path.
pub const FM_CONNECT_ADDRESS_TYPE_UNIX: c_int = 2;
/// `addressType` value: vsock `<cid>:<port>`.
pub const FM_CONNECT_ADDRESS_TYPE_VSOCK: c_int = 3;

/// The SDK's version word: `sizeof(struct) | (ver << 24)`.
pub const fn make_version(size: usize, ver: u32) -> c_uint {
    // Sizes are far below 2^24 (asserted below), so the cast is exact.
    (size as u32) | (ver << 24)
}

/// `fmConnectParams_v2`, the header's current `fmConnectParams_t` (§13.1).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FmConnectParamsV2 {
    /// [`FM_CONNECT_PARAMS_V2_VERSION`].
    pub version: c_uint,
    /// NUL-terminated address: `IPv4[:port]`, Unix socket path, or `cid:port`.
    pub address_info: [c_char; FM_MAX_STR_LENGTH],
    /// Connect timeout in milliseconds.
    pub timeout_ms: c_uint,
    /// Deprecated: 1 for a Unix socket; kept consistent with `address_type`.
    pub address_is_unix_socket: c_uint,
    /// One of the `FM_CONNECT_ADDRESS_TYPE_*` values; always set by us.
    pub address_type: c_int,
}

/// `fmConnectParams_v1`, what the guide r2.3 still documents (no `addressType`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FmConnectParamsV1 {
    /// [`FM_CONNECT_PARAMS_V1_VERSION`].
    pub version: c_uint,
    /// NUL-terminated address: `IPv4[:port]` or Unix socket path.
    pub address_info: [c_char; FM_MAX_STR_LENGTH],
    /// Connect timeout in milliseconds.
    pub timeout_ms: c_uint,
    /// 1 for a Unix socket.
    pub address_is_unix_socket: c_uint,
}

/// `fmFabricPartitionGpuInfo_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FmFabricPartitionGpuInfo {
    /// GPU physical id (= module id on H100 and later).
    pub physical_id: c_uint,
    /// NUL-terminated UUID; empty on H100+.
    pub uuid: [c_char; FM_UUID_BUFFER_SIZE],
    /// NUL-terminated BDF; `00000000:00:00.0` on H100+.
    pub pci_bus_id: [c_char; FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE],
    /// NVLinks available to this GPU in the partition.
    pub num_nvlinks_available: c_uint,
    /// NVLinks the GPU has (0 in a 1-GPU partition).
    pub max_num_nvlinks: c_uint,
    /// Line rate in MB/s.
    pub nvlink_line_rate_mbps: c_uint,
}

/// `fmFabricPartitionInfo_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FmFabricPartitionInfo {
    /// FM partition id.
    pub partition_id: c_uint,
    /// Non-zero when active.
    pub is_active: c_uint,
    /// Valid entries in `gpu_info` (≤ 16).
    pub num_gpus: c_uint,
    /// The partition's GPUs.
    pub gpu_info: [FmFabricPartitionGpuInfo; FM_MAX_NUM_GPUS],
}

/// `fmFabricPartitionList_v2` (`fmFabricPartitionList_t`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FmFabricPartitionList {
    /// [`FM_FABRIC_PARTITION_LIST_VERSION`].
    pub version: c_uint,
    /// Valid entries in `partition_info` (≤ 64).
    pub num_partitions: c_uint,
    /// The most partitions the fabric supports.
    pub max_num_partitions: c_uint,
    /// The partitions.
    pub partition_info: [FmFabricPartitionInfo; FM_MAX_FABRIC_PARTITIONS],
}

/// `fmActivatedFabricPartitionList_v1` (`fmActivatedFabricPartitionList_t`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FmActivatedFabricPartitionList {
    /// [`FM_ACTIVATED_FABRIC_PARTITION_LIST_VERSION`].
    pub version: c_uint,
    /// Valid entries in `partition_ids` (≤ 64).
    pub num_partitions: c_uint,
    /// Active partition ids.
    pub partition_ids: [c_uint; FM_MAX_FABRIC_PARTITIONS],
}

/// `fmNvlinkFailedDeviceInfo_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FmNvlinkFailedDeviceInfo {
    /// NUL-terminated UUID.
    pub uuid: [c_char; FM_UUID_BUFFER_SIZE],
    /// NUL-terminated BDF.
    pub pci_bus_id: [c_char; FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE],
    /// Valid entries in `port_num` (≤ 64).
    pub num_ports: c_uint,
    /// Failed NVLink port numbers.
    pub port_num: [c_uint; FM_MAX_NUM_NVLINK_PORTS],
}

/// `fmNvlinkFailedDevices_v1` (`fmNvlinkFailedDevices_t`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FmNvlinkFailedDevices {
    /// [`FM_NVLINK_FAILED_DEVICES_VERSION`].
    pub version: c_uint,
    /// Valid entries in `gpu_info` (≤ 16).
    pub num_gpus: c_uint,
    /// Valid entries in `switch_info` (≤ 12).
    pub num_switches: c_uint,
    /// GPUs with failed links.
    pub gpu_info: [FmNvlinkFailedDeviceInfo; FM_MAX_NUM_GPUS],
    /// NVSwitches with failed links.
    pub switch_info: [FmNvlinkFailedDeviceInfo; FM_MAX_NUM_NVSWITCHES],
}

/// `fmUnsupportedFabricPartitionInfo_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FmUnsupportedFabricPartitionInfo {
    /// FM partition id.
    pub partition_id: c_uint,
    /// Valid entries in `gpu_physical_ids` (≤ 16).
    pub num_gpus: c_uint,
    /// Member physical ids.
    pub gpu_physical_ids: [c_uint; FM_MAX_NUM_GPUS],
}

/// `fmUnsupportedFabricPartitionList_v1` (`fmUnsupportedFabricPartitionList_t`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FmUnsupportedFabricPartitionList {
    /// [`FM_UNSUPPORTED_FABRIC_PARTITION_LIST_VERSION`] (not the partition
    /// list's version, whatever the header comment says: §13.7).
    pub version: c_uint,
    /// Valid entries in `partition_info` (≤ 64).
    pub num_partitions: c_uint,
    /// The partitions.
    pub partition_info: [FmUnsupportedFabricPartitionInfo; FM_MAX_FABRIC_PARTITIONS],
}

/// `fmPciDevice_t` (vGPU activation only; declared for layout completeness).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FmPciDevice {
    /// PCI domain.
    pub domain: c_uint,
    /// Bus.
    pub bus: c_uint,
    /// Device.
    pub device: c_uint,
    /// Function.
    pub function: c_uint,
}

/// `fmConnectParams_v2` version word, `0x02000110`.
pub const FM_CONNECT_PARAMS_V2_VERSION: c_uint = make_version(size_of::<FmConnectParamsV2>(), 2);
/// `fmConnectParams_v1` version word, `0x0100010c`.
pub const FM_CONNECT_PARAMS_V1_VERSION: c_uint = make_version(size_of::<FmConnectParamsV1>(), 1);
/// `fmFabricPartitionList_version` (the macro uses version 1), `0x0102030c`.
pub const FM_FABRIC_PARTITION_LIST_VERSION: c_uint =
    make_version(size_of::<FmFabricPartitionList>(), 1);
/// `fmActivatedFabricPartitionList_version`, `0x01000108`.
pub const FM_ACTIVATED_FABRIC_PARTITION_LIST_VERSION: c_uint =
    make_version(size_of::<FmActivatedFabricPartitionList>(), 1);
/// `fmNvlinkFailedDevices_version`, `0x010028bc`.
pub const FM_NVLINK_FAILED_DEVICES_VERSION: c_uint =
    make_version(size_of::<FmNvlinkFailedDevices>(), 1);
/// `fmUnsupportedFabricPartitionList_version`, `0x01001208`.
pub const FM_UNSUPPORTED_FABRIC_PARTITION_LIST_VERSION: c_uint =
    make_version(size_of::<FmUnsupportedFabricPartitionList>(), 1);

// Sizes from the reference (§4, §13.10), checked at compile time.
const _: () = assert!(size_of::<FmReturnT>() == 4);
const _: () = assert!(size_of::<FmConnectParamsV2>() == 272);
const _: () = assert!(size_of::<FmConnectParamsV1>() == 268);
const _: () = assert!(size_of::<FmFabricPartitionGpuInfo>() == 128);
const _: () = assert!(size_of::<FmFabricPartitionInfo>() == 2060);
const _: () = assert!(size_of::<FmFabricPartitionList>() == 131_852);
const _: () = assert!(size_of::<FmActivatedFabricPartitionList>() == 264);
const _: () = assert!(size_of::<FmNvlinkFailedDeviceInfo>() == 372);
const _: () = assert!(size_of::<FmNvlinkFailedDevices>() == 10_428);
const _: () = assert!(size_of::<FmUnsupportedFabricPartitionInfo>() == 72);
const _: () = assert!(size_of::<FmUnsupportedFabricPartitionList>() == 4616);
const _: () = assert!(size_of::<FmPciDevice>() == 16);
// Connect v2 offsets (§13.1).
const _: () = assert!(offset_of!(FmConnectParamsV2, address_info) == 4);
const _: () = assert!(offset_of!(FmConnectParamsV2, timeout_ms) == 260);
const _: () = assert!(offset_of!(FmConnectParamsV2, address_is_unix_socket) == 264);
const _: () = assert!(offset_of!(FmConnectParamsV2, address_type) == 268);
// Version words (§4).
const _: () = assert!(FM_CONNECT_PARAMS_V2_VERSION == 0x0200_0110);
const _: () = assert!(FM_CONNECT_PARAMS_V1_VERSION == 0x0100_010c);
const _: () = assert!(FM_FABRIC_PARTITION_LIST_VERSION == 0x0102_030c);
const _: () = assert!(FM_ACTIVATED_FABRIC_PARTITION_LIST_VERSION == 0x0100_0108);
const _: () = assert!(FM_NVLINK_FAILED_DEVICES_VERSION == 0x0100_28bc);
const _: () = assert!(FM_UNSUPPORTED_FABRIC_PARTITION_LIST_VERSION == 0x0100_1208);

/// `fmLibInit` / `fmLibShutdown`.
pub type FnLibInit = unsafe extern "C" fn() -> FmReturnT;
/// `fmConnect(fmConnectParams_t*, fmHandle_t*)`; the params pointer is either
/// struct version, told apart by its `version` word.
pub type FnConnect = unsafe extern "C" fn(*mut c_void, *mut FmHandle) -> FmReturnT;
/// `fmDisconnect(fmHandle_t)`.
pub type FnDisconnect = unsafe extern "C" fn(FmHandle) -> FmReturnT;
/// `fmGetSupportedFabricPartitions(fmHandle_t, fmFabricPartitionList_t*)`.
pub type FnGetSupported = unsafe extern "C" fn(FmHandle, *mut FmFabricPartitionList) -> FmReturnT;
/// `fmActivateFabricPartition` / `fmDeactivateFabricPartition`.
pub type FnPartitionOp = unsafe extern "C" fn(FmHandle, FmFabricPartitionId) -> FmReturnT;
/// `fmSetActivatedFabricPartitions(fmHandle_t, fmActivatedFabricPartitionList_t*)`.
pub type FnSetActivated =
    unsafe extern "C" fn(FmHandle, *mut FmActivatedFabricPartitionList) -> FmReturnT;
/// `fmGetNvlinkFailedDevices(fmHandle_t, fmNvlinkFailedDevices_t*)`.
pub type FnGetFailed = unsafe extern "C" fn(FmHandle, *mut FmNvlinkFailedDevices) -> FmReturnT;
/// `fmGetUnsupportedFabricPartitions(fmHandle_t, fmUnsupportedFabricPartitionList_t*)`.
pub type FnGetUnsupported =
    unsafe extern "C" fn(FmHandle, *mut FmUnsupportedFabricPartitionList) -> FmReturnT;

/// Reads a NUL-terminated C string out of a fixed buffer, lossily; a buffer
/// without a NUL is read to its end (never past it).
pub fn c_buf_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Copies `s` into a fixed C buffer with a terminating NUL; `None` if it does
/// not fit or contains a NUL.
pub fn string_to_c_buf<const N: usize>(s: &str) -> Option<[c_char; N]> {
    let bytes = s.as_bytes();
    if bytes.len() >= N || bytes.contains(&0) {
        return None;
    }
    let mut buf = [0 as c_char; N];
    for (dst, &b) in buf.iter_mut().zip(bytes) {
        *dst = c_char::from_ne_bytes([b]);
    }
    Some(buf)
}

/// Heap-allocates a zeroed value of an FFI struct (the partition list is
/// 128 KiB; worker threads have small stacks).
pub fn boxed_zeroed<T: Zeroable>() -> Box<T> {
    T::boxed_zeroed()
}

/// Plain-old-data FFI structs for which all-zero bytes are a valid value.
pub trait Zeroable: Sized {
    /// A zeroed heap value.
    fn boxed_zeroed() -> Box<Self>;
}

macro_rules! zeroable {
    ($($t:ty),*) => {$(
        impl Zeroable for $t {
            fn boxed_zeroed() -> Box<Self> {
                let layout = std::alloc::Layout::new::<Self>();
                // SAFETY: the layout is non-zero-sized (asserted above); the
                // type is a `repr(C)` aggregate of integers and `c_char`
                // arrays, for which all-zero bytes are a valid value, so the
                // zeroed allocation is an initialised `Self` that `Box` may
                // own with this same layout.
                unsafe {
                    let ptr = std::alloc::alloc_zeroed(layout).cast::<Self>();
                    if ptr.is_null() {
                        std::alloc::handle_alloc_error(layout);
                    }
                    Box::from_raw(ptr)
                }
            }
        }
    )*};
}
zeroable!(
    FmConnectParamsV2,
    FmConnectParamsV1,
    FmFabricPartitionList,
    FmActivatedFabricPartitionList,
    FmNvlinkFailedDevices,
    FmUnsupportedFabricPartitionList
);
