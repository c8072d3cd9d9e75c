//! Every `fmReturn_t` in the reference maps to the right code, name and
//! predicates; FFI layouts match the reference.

use std::mem::size_of;

use vfio_gpu_fabric::ffi;
use vfio_gpu_fabric::{Call, FmCode, FmError};

/// (raw, name, already-active dialect, not-active dialect, retryable)
const TABLE: [(i32, &str, bool, bool, bool); 30] = [
    (0, "SUCCESS", false, false, false),
    (-1, "BADPARAM", false, false, false),
    (-2, "GENERIC_ERROR", false, false, false),
    (-3, "NOT_SUPPORTED", false, false, false),
    (-4, "UNINITIALIZED", false, true, false),
    (-5, "TIMEOUT", false, false, false),
    (-6, "VERSION_MISMATCH", false, false, false),
    (-7, "IN_USE", true, false, false),
    (-8, "NOT_CONFIGURED", false, false, true),
    (-9, "CONNECTION_NOT_VALID", false, false, false),
    (-10, "NVLINK_ERROR", false, false, false),
    (-11, "RESOURCE_BAD", false, false, false),
    (-12, "RESOURCE_IN_USE", false, false, false),
    (-13, "RESOURCE_NOT_IN_USE", false, false, false),
    (-14, "RESOURCE_EXHAUSTED", false, false, false),
    (-15, "RESOURCE_NOT_READY", false, false, false),
    (-16, "PARTITION_EXISTS", false, false, false),
    (-17, "PARTITION_ID_IN_USE", true, false, false),
    (-18, "PARTITION_ID_NOT_IN_USE", false, true, false),
    (-19, "PARTITION_NAME_IN_USE", false, false, false),
    (-20, "PARTITION_NAME_NOT_IN_USE", false, false, false),
    (-21, "PARTITION_ID_NAME_MISMATCH", false, false, false),
    (-22, "NOT_READY", false, false, true),
    (-23, "RESOURCE_USED_IN_THIS_PARTITION", false, false, false),
    (
        -24,
        "RESOURCE_USED_IN_ANOTHER_PARTITION",
        false,
        false,
        false,
    ),
    (-25, "PARTITION_MISWIRED_TRUNKS", false, false, false),
    (-26, "PARTITION_INSUFFICIENT_TRUNKS", false, false, false),
    (-27, "PARTITION_MISSING_SWITCHES", false, false, false),
    (-28, "PARTITION_NETWORK_CONFIG_ERROR", false, false, false),
    (
        -29,
        "PARTITION_ROUTE_PROGRAMMING_ERROR",
        false,
        false,
        false,
    ),
];

#[test]
fn every_return_code_maps() {
    for (raw, name, in_use, not_in_use, retry) in TABLE {
        let code = FmCode::from_raw(raw).unwrap_or_else(|| panic!("{raw} unmapped"));
        assert_eq!(code.raw(), raw);
        assert_eq!(code.name(), name, "{raw}");
        assert_eq!(code.to_string(), format!("FM_ST_{name} ({raw})"));
        assert_eq!(code.is_in_use_dialect(), in_use, "{name}");
        assert_eq!(code.is_not_in_use_dialect(), not_in_use, "{name}");
        assert_eq!(code.is_retryable(), retry, "{name}");
        match FmError::check(Call::Activate, raw) {
            Ok(()) => assert_eq!(raw, 0),
            Err(e) => {
                assert_ne!(raw, 0);
                assert_eq!(e.code(), Some(code));
                assert_eq!(e.is_already_active(), in_use);
                assert_eq!(e.is_not_active(), not_in_use);
                assert_eq!(e.is_retryable(), retry);
                assert_eq!(e.is_version_mismatch(), raw == -6);
                assert_eq!(e.is_connection(), raw == -9);
                assert!(e.to_string().contains(name), "{e}");
                assert!(e.to_string().contains("fmActivateFabricPartition"), "{e}");
            }
        }
    }
    assert_eq!(FmCode::ALL.len(), TABLE.len());
}

#[test]
fn undocumented_codes_are_kept_raw() {
    for raw in [1, -30, -100, i32::MIN, i32::MAX] {
        assert_eq!(FmCode::from_raw(raw), None);
        match FmError::check(Call::Deactivate, raw) {
            Err(FmError::UnknownCode { call, raw: r }) => {
                assert_eq!(call, Call::Deactivate);
                assert_eq!(r, raw);
            }
            other => panic!("{raw}: {other:?}"),
        }
    }
}

#[test]
fn connect_failure_is_a_connection_error() {
    let e = FmError::check(Call::Connect, -2).unwrap_err();
    assert!(e.is_connection());
}

#[test]
fn ffi_sizes_and_versions_match_the_reference() {
    assert_eq!(size_of::<ffi::FmConnectParamsV2>(), 272);
    assert_eq!(size_of::<ffi::FmConnectParamsV1>(), 268);
    assert_eq!(size_of::<ffi::FmFabricPartitionGpuInfo>(), 128);
    assert_eq!(size_of::<ffi::FmFabricPartitionInfo>(), 2060);
    assert_eq!(size_of::<ffi::FmFabricPartitionList>(), 131_852);
    assert_eq!(size_of::<ffi::FmActivatedFabricPartitionList>(), 264);
    assert_eq!(size_of::<ffi::FmNvlinkFailedDeviceInfo>(), 372);
    assert_eq!(size_of::<ffi::FmNvlinkFailedDevices>(), 10_428);
    assert_eq!(size_of::<ffi::FmUnsupportedFabricPartitionInfo>(), 72);
    assert_eq!(size_of::<ffi::FmUnsupportedFabricPartitionList>(), 4616);
    assert_eq!(size_of::<ffi::FmPciDevice>(), 16);
    assert_eq!(ffi::FM_CONNECT_PARAMS_V2_VERSION, 0x0200_0110);
    assert_eq!(ffi::FM_CONNECT_PARAMS_V1_VERSION, 0x0100_010c);
    assert_eq!(ffi::FM_FABRIC_PARTITION_LIST_VERSION, 0x0102_030c);
    assert_eq!(ffi::FM_ACTIVATED_FABRIC_PARTITION_LIST_VERSION, 0x0100_0108);
    assert_eq!(ffi::FM_NVLINK_FAILED_DEVICES_VERSION, 0x0100_28bc);
    assert_eq!(
        ffi::FM_UNSUPPORTED_FABRIC_PARTITION_LIST_VERSION,
        0x0100_1208
    );
    assert_eq!(ffi::make_version(272, 2), 0x0200_0110);
}

#[test]
fn c_strings_round_trip_and_bound() {
    let buf: [std::ffi::c_char; 8] = ffi::string_to_c_buf("abc").unwrap();
    assert_eq!(ffi::c_buf_to_string(&buf), "abc");
    assert!(
        ffi::string_to_c_buf::<4>("abcd").is_none(),
        "no room for NUL"
    );
    assert!(ffi::string_to_c_buf::<8>("a\0b").is_none());
    // No NUL at all: read to the end, never past it.
    let full = [b'x' as std::ffi::c_char; 4];
    assert_eq!(ffi::c_buf_to_string(&full), "xxxx");
}
