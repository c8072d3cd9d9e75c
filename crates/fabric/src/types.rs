//! Typed values exchanged with Fabric Manager.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{FmCode, FmError};
use crate::ffi;

/// An FM partition id (Hopper tables start at 0, Blackwell at 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A GPU module id: FM's `physicalId` on H100 and later, `nvidia-smi -q`'s
/// "Module ID", 1…8 on an 8-GPU baseboard. 0 means "unknown" in NVML and is
/// never a valid `ModuleId`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ModuleId(pub u32);

impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One GPU of a partition as FM lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionGpu {
    /// `physicalId` (= module id on H100+).
    pub physical_id: ModuleId,
    /// UUID; empty on H100+.
    #[serde(default)]
    pub uuid: String,
    /// BDF as FM prints it; `00000000:00:00.0` (= absent) on H100+.
    #[serde(default)]
    pub pci_bus_id: String,
    /// NVLinks available to the GPU in this partition.
    #[serde(default)]
    pub num_nvlinks_available: u32,
    /// NVLinks the GPU has in this partition (0 in a 1-GPU partition).
    #[serde(default)]
    pub max_num_nvlinks: u32,
    /// Line rate in MB/s.
    #[serde(default)]
    pub nvlink_line_rate_mbps: u32,
}

/// A partition as FM lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Partition {
    /// FM partition id.
    pub id: PartitionId,
    /// Whether FM reports it active.
    pub is_active: bool,
    /// Its GPUs.
    pub gpus: Vec<PartitionGpu>,
}

impl Partition {
    /// Member module ids.
    pub fn modules(&self) -> impl Iterator<Item = ModuleId> + '_ {
        self.gpus.iter().map(|g| g.physical_id)
    }
}

/// `fmGetSupportedFabricPartitions`' answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionList {
    /// The partitions, in FM's order.
    pub partitions: Vec<Partition>,
    /// `maxNumPartitions`.
    pub max_num_partitions: u32,
}

impl PartitionList {
    /// The partition with this id.
    pub fn get(&self, id: PartitionId) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.id == id)
    }

    /// Ids of the partitions FM reports active.
    pub fn active(&self) -> Vec<PartitionId> {
        self.partitions
            .iter()
            .filter(|p| p.is_active)
            .map(|p| p.id)
            .collect()
    }
}

/// Normalised outcome of an activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Activated {
    /// FM activated it now.
    Activated,
    /// It was already active: FM answered this code (−7 or −17) and a
    /// re-query confirmed `isActive` for this very partition.
    AlreadyActive(FmCode),
}

/// Normalised outcome of a deactivation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Deactivated {
    /// FM deactivated it now.
    Deactivated,
    /// It was not active: FM answered this code (−4 or −18) and a re-query
    /// confirmed the partition is listed and inactive.
    NotActive(FmCode),
}

/// A device with failed NVLinks (`fmNvlinkFailedDeviceInfo_t`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedDevice {
    /// UUID, possibly empty.
    pub uuid: String,
    /// BDF as FM prints it, possibly empty.
    pub pci_bus_id: String,
    /// Failed port numbers.
    pub ports: Vec<u32>,
}

/// `fmGetNvlinkFailedDevices`' answer (always empty on H100+; not supported
/// in `--restart` mode, §13.4).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NvlinkFailedDevices {
    /// GPUs with failed links.
    pub gpus: Vec<FailedDevice>,
    /// NVSwitches with failed links.
    pub switches: Vec<FailedDevice>,
}

/// An entry of `fmGetUnsupportedFabricPartitions` (always empty on H100+).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnsupportedPartition {
    /// FM partition id.
    pub id: PartitionId,
    /// Member physical ids.
    pub modules: Vec<ModuleId>,
}

/// Where FM's API listens: what goes into `addressInfo`/`addressType`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Endpoint {
    /// `FM_CMD_UNIX_SOCKET_PATH` (FM on the host; preferred).
    Unix(PathBuf),
    /// `FM_CMD_BIND_INTERFACE`:`FM_CMD_PORT_NUMBER` (IPv4 only: hostnames
    /// are undocumented, §13.12). Unauthenticated: prefer Unix or vsock.
    Inet {
        /// IPv4 address.
        addr: Ipv4Addr,
        /// Port (FM's default is 6666).
        port: u16,
    },
    /// A service VM's vsock `<cid>:<port>` (needs the v2 connect struct).
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
}

impl Endpoint {
    /// NVIDIA's documented host socket, `/run/nvidia-fabricmanager/socket`.
    pub fn default_unix() -> Endpoint {
        Endpoint::Unix(PathBuf::from("/run/nvidia-fabricmanager/socket"))
    }

    /// The `addressType` value.
    pub fn address_type(&self) -> i32 {
        match self {
            Endpoint::Unix(_) => ffi::FM_CONNECT_ADDRESS_TYPE_UNIX,
            Endpoint::Inet { .. } => ffi::FM_CONNECT_ADDRESS_TYPE_INET,
            Endpoint::Vsock { .. } => ffi::FM_CONNECT_ADDRESS_TYPE_VSOCK,
        }
    }

    /// The `addressInfo` text.
    pub fn address_info(&self) -> String {
        match self {
            Endpoint::Unix(p) => p.to_string_lossy().into_owned(),
            Endpoint::Inet { addr, port } => format!("{addr}:{port}"),
            Endpoint::Vsock { cid, port } => format!("{cid}:{port}"),
        }
    }

    /// Builds the v2 connect struct (`addressType` and the deprecated
    /// `addressIsUnixSocket` both set, consistently).
    pub fn connect_params_v2(&self, timeout_ms: u32) -> Result<ffi::FmConnectParamsV2, FmError> {
        Ok(ffi::FmConnectParamsV2 {
            version: ffi::FM_CONNECT_PARAMS_V2_VERSION,
            address_info: self.address_buf()?,
            timeout_ms,
            address_is_unix_socket: u32::from(matches!(self, Endpoint::Unix(_))),
            address_type: self.address_type(),
        })
    }

    /// Builds the v1 connect struct, for libraries older than `addressType`;
    /// vsock cannot be expressed there.
    pub fn connect_params_v1(&self, timeout_ms: u32) -> Result<ffi::FmConnectParamsV1, FmError> {
        if matches!(self, Endpoint::Vsock { .. }) {
            return Err(self.invalid("vsock needs the v2 connect struct"));
        }
        Ok(ffi::FmConnectParamsV1 {
            version: ffi::FM_CONNECT_PARAMS_V1_VERSION,
            address_info: self.address_buf()?,
            timeout_ms,
            address_is_unix_socket: u32::from(matches!(self, Endpoint::Unix(_))),
        })
    }

    fn address_buf(&self) -> Result<[std::ffi::c_char; ffi::FM_MAX_STR_LENGTH], FmError> {
        let text = self.address_info();
        if text.is_empty() {
            return Err(self.invalid("empty address"));
        }
        ffi::string_to_c_buf(&text).ok_or_else(|| {
            self.invalid(&format!(
                "address must be shorter than {} bytes and contain no NUL",
                ffi::FM_MAX_STR_LENGTH
            ))
        })
    }

    fn invalid(&self, reason: &str) -> FmError {
        FmError::Endpoint {
            endpoint: self.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Inet { addr, port } => write!(f, "tcp:{addr}:{port}"),
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = FmError;

    /// `unix:/path` (or a bare absolute path), `tcp:a.b.c.d[:port]`,
    /// `vsock:<cid>:<port>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| FmError::Endpoint {
            endpoint: s.chars().take(300).collect(),
            reason: reason.to_string(),
        };
        let ep = if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(bad("a Unix socket path must be absolute"));
            }
            Endpoint::Unix(PathBuf::from(path))
        } else if s.starts_with('/') {
            Endpoint::Unix(PathBuf::from(s))
        } else if let Some(rest) = s.strip_prefix("tcp:").or_else(|| s.strip_prefix("inet:")) {
            let (addr, port) = match rest.split_once(':') {
                Some((a, p)) => (a, p.parse().map_err(|_| bad("bad TCP port"))?),
                None => (rest, ffi::FM_CMD_PORT_NUMBER),
            };
            let addr = addr
                .parse()
                .map_err(|_| bad("FM takes an IPv4 address (hostnames are undocumented)"))?;
            Endpoint::Inet { addr, port }
        } else if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| bad("vsock needs <cid>:<port>"))?;
            Endpoint::Vsock {
                cid: cid.parse().map_err(|_| bad("bad vsock cid"))?,
                port: port.parse().map_err(|_| bad("bad vsock port"))?,
            }
        } else {
            return Err(bad(
                "expected unix:<path>, tcp:<ipv4>[:port] or vsock:<cid>:<port>",
            ));
        };
        ep.address_buf()?;
        Ok(ep)
    }
}
