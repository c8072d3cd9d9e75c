//! `fmReturn_t` codes and the crate's error type.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::PartitionId;

/// Every `fmReturn_t` value in the reference (§4), 0 to −29.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(i32)]
pub enum FmCode {
    /// `FM_ST_SUCCESS` (0).
    Success = 0,
    /// `FM_ST_BADPARAM` (−1).
    BadParam = -1,
    /// `FM_ST_GENERIC_ERROR` (−2).
    GenericError = -2,
    /// `FM_ST_NOT_SUPPORTED` (−3).
    NotSupported = -3,
    /// `FM_ST_UNINITIALIZED` (−4): library not initialised, or (documented
    /// dialect, from deactivate only) the partition is not active.
    Uninitialized = -4,
    /// `FM_ST_TIMEOUT` (−5).
    Timeout = -5,
    /// `FM_ST_VERSION_MISMATCH` (−6): a struct's `version` word was refused.
    VersionMismatch = -6,
    /// `FM_ST_IN_USE` (−7): `fmLibInit` twice, or (documented dialect, from
    /// activate) already active or overlapping an active partition.
    InUse = -7,
    /// `FM_ST_NOT_CONFIGURED` (−8): FM still initialising; retry.
    NotConfigured = -8,
    /// `FM_ST_CONNECTION_NOT_VALID` (−9).
    ConnectionNotValid = -9,
    /// `FM_ST_NVLINK_ERROR` (−10).
    NvlinkError = -10,
    /// `FM_ST_RESOURCE_BAD` (−11).
    ResourceBad = -11,
    /// `FM_ST_RESOURCE_IN_USE` (−12).
    ResourceInUse = -12,
    /// `FM_ST_RESOURCE_NOT_IN_USE` (−13).
    ResourceNotInUse = -13,
    /// `FM_ST_RESOURCE_EXHAUSTED` (−14).
    ResourceExhausted = -14,
    /// `FM_ST_RESOURCE_NOT_READY` (−15).
    ResourceNotReady = -15,
    /// `FM_ST_PARTITION_EXISTS` (−16).
    PartitionExists = -16,
    /// `FM_ST_PARTITION_ID_IN_USE` (−17): newer dialect of "already active".
    PartitionIdInUse = -17,
    /// `FM_ST_PARTITION_ID_NOT_IN_USE` (−18): newer dialect of "not active".
    PartitionIdNotInUse = -18,
    /// `FM_ST_PARTITION_NAME_IN_USE` (−19).
    PartitionNameInUse = -19,
    /// `FM_ST_PARTITION_NAME_NOT_IN_USE` (−20).
    PartitionNameNotInUse = -20,
    /// `FM_ST_PARTITION_ID_NAME_MISMATCH` (−21).
    PartitionIdNameMismatch = -21,
    /// `FM_ST_NOT_READY` (−22): not ready to serve GFM API requests; retry.
    NotReady = -22,
    /// `FM_ST_RESOURCE_USED_IN_THIS_PARTITION` (−23).
    ResourceUsedInThisPartition = -23,
    /// `FM_ST_RESOURCE_USED_IN_ANOTHER_PARTITION` (−24).
    ResourceUsedInAnotherPartition = -24,
    /// `FM_ST_PARTITION_MISWIRED_TRUNKS` (−25).
    PartitionMiswiredTrunks = -25,
    /// `FM_ST_PARTITION_INSUFFICIENT_TRUNKS` (−26).
    PartitionInsufficientTrunks = -26,
    /// `FM_ST_PARTITION_MISSING_SWITCHES` (−27).
    PartitionMissingSwitches = -27,
    /// `FM_ST_PARTITION_NETWORK_CONFIG_ERROR` (−28).
    PartitionNetworkConfigError = -28,
    /// `FM_ST_PARTITION_ROUTE_PROGRAMMING_ERROR` (−29).
    PartitionRouteProgrammingError = -29,
}

impl FmCode {
    /// All codes, 0 down to −29.
    pub const ALL: [FmCode; 30] = [
        FmCode::Success,
        FmCode::BadParam,
        FmCode::GenericError,
        FmCode::NotSupported,
        FmCode::Uninitialized,
        FmCode::Timeout,
        FmCode::VersionMismatch,
        FmCode::InUse,
        FmCode::NotConfigured,
        FmCode::ConnectionNotValid,
        FmCode::NvlinkError,
        FmCode::ResourceBad,
        FmCode::ResourceInUse,
        FmCode::ResourceNotInUse,
        FmCode::ResourceExhausted,
        FmCode::ResourceNotReady,
        FmCode::PartitionExists,
        FmCode::PartitionIdInUse,
        FmCode::PartitionIdNotInUse,
        FmCode::PartitionNameInUse,
        FmCode::PartitionNameNotInUse,
        FmCode::PartitionIdNameMismatch,
        FmCode::NotReady,
        FmCode::ResourceUsedInThisPartition,
        FmCode::ResourceUsedInAnotherPartition,
        FmCode::PartitionMiswiredTrunks,
        FmCode::PartitionInsufficientTrunks,
        FmCode::PartitionMissingSwitches,
        FmCode::PartitionNetworkConfigError,
        FmCode::PartitionRouteProgrammingError,
    ];

    /// The code for a raw `fmReturn_t`, `None` for a value outside 0…−29.
    pub fn from_raw(raw: i32) -> Option<FmCode> {
        let index = usize::try_from(raw.checked_neg()?).ok()?;
        FmCode::ALL.get(index).copied()
    }

    /// The raw `fmReturn_t` value.
    pub fn raw(self) -> i32 {
        self as i32
    }

    /// The SDK name without the `FM_ST_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            FmCode::Success => "SUCCESS",
            FmCode::BadParam => "BADPARAM",
            FmCode::GenericError => "GENERIC_ERROR",
            FmCode::NotSupported => "NOT_SUPPORTED",
            FmCode::Uninitialized => "UNINITIALIZED",
            FmCode::Timeout => "TIMEOUT",
            FmCode::VersionMismatch => "VERSION_MISMATCH",
            FmCode::InUse => "IN_USE",
            FmCode::NotConfigured => "NOT_CONFIGURED",
            FmCode::ConnectionNotValid => "CONNECTION_NOT_VALID",
            FmCode::NvlinkError => "NVLINK_ERROR",
            FmCode::ResourceBad => "RESOURCE_BAD",
            FmCode::ResourceInUse => "RESOURCE_IN_USE",
            FmCode::ResourceNotInUse => "RESOURCE_NOT_IN_USE",
            FmCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            FmCode::ResourceNotReady => "RESOURCE_NOT_READY",
            FmCode::PartitionExists => "PARTITION_EXISTS",
            FmCode::PartitionIdInUse => "PARTITION_ID_IN_USE",
            FmCode::PartitionIdNotInUse => "PARTITION_ID_NOT_IN_USE",
            FmCode::PartitionNameInUse => "PARTITION_NAME_IN_USE",
            FmCode::PartitionNameNotInUse => "PARTITION_NAME_NOT_IN_USE",
            FmCode::PartitionIdNameMismatch => "PARTITION_ID_NAME_MISMATCH",
            FmCode::NotReady => "NOT_READY",
            FmCode::ResourceUsedInThisPartition => "RESOURCE_USED_IN_THIS_PARTITION",
            FmCode::ResourceUsedInAnotherPartition => "RESOURCE_USED_IN_ANOTHER_PARTITION",
            FmCode::PartitionMiswiredTrunks => "PARTITION_MISWIRED_TRUNKS",
            FmCode::PartitionInsufficientTrunks => "PARTITION_INSUFFICIENT_TRUNKS",
            FmCode::PartitionMissingSwitches => "PARTITION_MISSING_SWITCHES",
            FmCode::PartitionNetworkConfigError => "PARTITION_NETWORK_CONFIG_ERROR",
            FmCode::PartitionRouteProgrammingError => "PARTITION_ROUTE_PROGRAMMING_ERROR",
        }
    }

    /// Either dialect's "already active / GPUs in use" answer to an activate
    /// (−7 documented, −17 newer). Ambiguous: re-query `isActive`.
    pub fn is_in_use_dialect(self) -> bool {
        matches!(self, FmCode::InUse | FmCode::PartitionIdInUse)
    }

    /// Either dialect's "not active" answer to a deactivate (−4 documented,
    /// −18 newer). −4 is also "library not initialised" for every call.
    pub fn is_not_in_use_dialect(self) -> bool {
        matches!(self, FmCode::Uninitialized | FmCode::PartitionIdNotInUse)
    }

    /// FM still initialising (−8 documented, −22 newer): retry with backoff.
    /// After an FM `--restart` any rejection before the replay may also mean
    /// "replay pending" (§13.12); the engine decides that, not this code.
    pub fn is_retryable(self) -> bool {
        matches!(self, FmCode::NotConfigured | FmCode::NotReady)
    }
}

impl fmt::Display for FmCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FM_ST_{} ({})", self.name(), self.raw())
    }
}

/// The SDK call an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Call {
    /// `fmLibInit`.
    LibInit,
    /// `fmConnect`.
    Connect,
    /// `fmDisconnect`.
    Disconnect,
    /// `fmGetSupportedFabricPartitions`.
    GetSupportedPartitions,
    /// `fmActivateFabricPartition`.
    Activate,
    /// `fmDeactivateFabricPartition`.
    Deactivate,
    /// `fmSetActivatedFabricPartitions`.
    SetActivatedPartitions,
    /// `fmGetNvlinkFailedDevices`.
    GetNvlinkFailedDevices,
    /// `fmGetUnsupportedFabricPartitions`.
    GetUnsupportedPartitions,
}

impl Call {
    /// The SDK function name.
    pub fn symbol(self) -> &'static str {
        match self {
            Call::LibInit => "fmLibInit",
            Call::Connect => "fmConnect",
            Call::Disconnect => "fmDisconnect",
            Call::GetSupportedPartitions => "fmGetSupportedFabricPartitions",
            Call::Activate => "fmActivateFabricPartition",
            Call::Deactivate => "fmDeactivateFabricPartition",
            Call::SetActivatedPartitions => "fmSetActivatedFabricPartitions",
            Call::GetNvlinkFailedDevices => "fmGetNvlinkFailedDevices",
            Call::GetUnsupportedPartitions => "fmGetUnsupportedFabricPartitions",
        }
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

/// Everything a Fabric Manager operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FmError {
    /// FM answered with a non-success `fmReturn_t`.
    #[error("{call} returned {code}")]
    Fm {
        /// The Fabric Manager SDK call that answered.
        call: Call,
        /// Its code (never `Success`).
        code: FmCode,
    },
    /// FM answered with a value outside the documented 0…−29.
    #[error("{call} returned undocumented fmReturn_t {raw}")]
    UnknownCode {
        /// The Fabric Manager SDK call that answered.
        call: Call,
        /// The raw value.
        raw: i32,
    },
    /// Activation refused because the partition's GPUs are in another active
    /// partition (an `IN_USE`-dialect answer, re-queried: not active itself).
    #[error("partition {partition} overlaps an active partition ({call} returned {code})")]
    Overlap {
        /// The Fabric Manager SDK call that answered.
        call: Call,
        /// The partition asked for.
        partition: PartitionId,
        /// What FM answered.
        code: FmCode,
        /// Active partitions sharing a GPU with it, as FM reported them.
        active: Vec<PartitionId>,
    },
    /// FM does not list the partition.
    #[error("partition {0} is not one FM supports")]
    UnknownPartition(PartitionId),
    /// The library or FM broke the ABI contract (count out of range, ...).
    #[error("{call}: ABI error: {detail}")]
    Abi {
        /// The Fabric Manager SDK call that answered.
        call: Call,
        /// What was wrong.
        detail: String,
    },
    /// The library could not be loaded.
    #[error("cannot load {}: {detail}", path.display())]
    Load {
        /// What we tried to load.
        path: PathBuf,
        /// The loader's error text (every candidate tried).
        detail: String,
    },
    /// The library lacks an SDK symbol.
    #[error("{} has no symbol {symbol}: {detail}", library.display())]
    MissingSymbol {
        /// The Fabric Manager library that was loaded.
        library: PathBuf,
        /// The SDK function it lacks.
        symbol: &'static str,
        /// The loader's error text.
        detail: String,
    },
    /// The endpoint cannot be expressed in the connect struct.
    #[error("invalid Fabric Manager endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint text.
        endpoint: String,
        /// Why it cannot be expressed (too long, a NUL byte…).
        reason: String,
    },
    /// The call did not return within its deadline; it keeps running on its
    /// worker thread.
    #[error("{what} did not return within {:.1} s", waited.as_secs_f64())]
    Deadline {
        /// The Fabric Manager operation that is late.
        what: String,
        /// How long we waited.
        waited: Duration,
    },
    /// A previous call is still blocked past its deadline; no new call is
    /// started until it returns.
    #[error("a previous Fabric Manager call is still blocked: {0}")]
    Stuck(String),
    /// No worker thread could be started, or it died.
    #[error("Fabric Manager worker: {0}")]
    Worker(String),
}

impl FmError {
    /// Maps a raw `fmReturn_t` from `call`: `Ok` for success.
    pub fn check(call: Call, raw: i32) -> Result<(), FmError> {
        match FmCode::from_raw(raw) {
            Some(FmCode::Success) => Ok(()),
            Some(code) => Err(FmError::Fm { call, code }),
            None => Err(FmError::UnknownCode { call, raw }),
        }
    }

    /// The FM code, when FM answered with one.
    pub fn code(&self) -> Option<FmCode> {
        match self {
            FmError::Fm { code, .. } | FmError::Overlap { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// FM still initialising (`NOT_CONFIGURED`/`NOT_READY`): retry later.
    pub fn is_retryable(&self) -> bool {
        self.code().is_some_and(FmCode::is_retryable)
    }

    /// Either dialect's "already active / in use" code (before re-query).
    pub fn is_already_active(&self) -> bool {
        self.code().is_some_and(FmCode::is_in_use_dialect)
    }

    /// Either dialect's "not active" code (before re-query).
    pub fn is_not_active(&self) -> bool {
        self.code().is_some_and(FmCode::is_not_in_use_dialect)
    }

    /// FM refused a struct version (header/library drift).
    pub fn is_version_mismatch(&self) -> bool {
        self.code() == Some(FmCode::VersionMismatch)
    }

    /// `fmConnect` failed (any code: FM not listening, wrong endpoint, struct
    /// refused) or a call reported `CONNECTION_NOT_VALID`. Connect per
    /// operation makes a retry reconnect.
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            FmError::Fm {
                call: Call::Connect,
                ..
            } | FmError::Fm {
                code: FmCode::ConnectionNotValid,
                ..
            }
        )
    }
}
