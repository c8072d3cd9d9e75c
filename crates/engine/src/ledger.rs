//! The ledger: the engine's write-ahead record of what it did to the host,
//! so a restart (or a crash) never loses what driver a GPU came from.
//!
//! On disk: one header line `vfio-gpu-dra-ledger format=<N> sha256=<hex>`
//! followed by a JSON body. The checksum covers the body's raw bytes (not a
//! re-serialisation, the Go plugin's upgrade trap), unknown fields are kept
//! and written back, and writes are atomic (temp file, fsync, rename, fsync
//! directory). A ledger that cannot be trusted is moved aside, never
//! crash-looped on.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use vfio_gpu_host::{Bdf, DriverName};

pub use crate::lock::{LOCK_FILE, LockError, probe_state_lock};

/// The format this build writes and reads.
pub const LEDGER_FORMAT: u32 = 1;
const HEADER_PREFIX: &str = "vfio-gpu-dra-ledger ";
/// File name in the state directory.
pub const LEDGER_FILE: &str = "ledger.json";

/// Who holds a GPU the engine moved to vfio.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Holder {
    /// A ResourceClaim, prepared through the kubelet plugin.
    Claim {
        /// `metadata.uid`.
        uid: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// An administrator, through `vfio-gpu-dra bind`.
    Admin,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Claim {
                uid,
                namespace,
                name,
            } => write!(f, "claim {namespace}/{name} ({uid})"),
            Holder::Admin => f.write_str("admin (vfio-gpu-dra bind)"),
        }
    }
}

/// Where an operation on a GPU stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpState {
    /// Moving to vfio began; not finished.
    Configuring,
    /// On vfio, held.
    Configured,
    /// Moving back began; not finished.
    Releasing,
    /// Not moved by us: on vfio by admin intent (a fact kept across restarts).
    Prebound,
    /// Released back to no driver, as it was found: reconcile must not
    /// "repair" it by probing a driver.
    ReleasedUnbound,
}

/// What the engine knows about one function of a GPU it touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionRecord {
    /// Address.
    pub bdf: Bdf,
    /// Driver before we touched it (`None`: it had none).
    pub original_driver: Option<DriverName>,
    /// `driver_override` before we touched it (`None`: unset).
    pub original_override: Option<String>,
    /// The override value we last wrote, so it is never mistaken for an admin's.
    #[serde(default)]
    pub override_written: Option<String>,
    /// We bound it to the vfio driver.
    #[serde(default)]
    pub bound_by_us: bool,
    /// Fields written by other versions, kept as they were.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Host changes besides bindings, undone on release.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Changes {
    /// We took nvidia's unbind lock.
    #[serde(default)]
    pub unbind_lock_taken: bool,
    /// Functions whose nvidia persistence mode we turned off (turned on again on release).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub persistence_disabled: Vec<Bdf>,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// The engine's record of one GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuRecord {
    /// Operation state.
    pub state: OpState,
    /// Who holds it (none for a prebound fact or a release in flight).
    #[serde(default)]
    pub holder: Option<Holder>,
    /// The vfio driver used.
    #[serde(default)]
    pub vfio_driver: Option<DriverName>,
    /// The GPU was already on a vfio driver before we touched it.
    #[serde(default)]
    pub was_on_vfio: bool,
    /// Every function of the group we act on, GPU first.
    #[serde(default)]
    pub functions: Vec<FunctionRecord>,
    /// Other host changes.
    #[serde(default)]
    pub changes: Changes,
    /// The write that outlived its deadline, when stuck.
    #[serde(default)]
    pub stuck_on: Option<String>,
    /// Boot the record belongs to.
    pub boot_id: String,
    /// Monotonic operation number, for logs.
    #[serde(default)]
    pub operation: u64,
    /// Last update, seconds since the epoch.
    #[serde(default)]
    pub updated: u64,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl GpuRecord {
    /// The function record for `bdf`.
    pub fn function(&self, bdf: Bdf) -> Option<&FunctionRecord> {
        self.functions.iter().find(|f| f.bdf == bdf)
    }
}

/// The whole ledger body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerBody {
    /// Boot the ledger was last written in.
    #[serde(default)]
    pub boot_id: String,
    /// Records by GPU address.
    #[serde(default)]
    pub gpus: BTreeMap<Bdf, GpuRecord>,
    /// Next operation number.
    #[serde(default)]
    pub next_operation: u64,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Why a ledger file was not used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerProblem {
    /// What was wrong.
    pub reason: String,
    /// Where the file was moved.
    pub moved_to: Option<PathBuf>,
}

/// Ledger I/O errors that stop an operation (the state dir is unwritable).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Writing the ledger failed.
    #[error("writing ledger {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Creating the state directory failed.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Parses ledger bytes. Errors say exactly what is wrong.
pub fn decode(bytes: &[u8]) -> Result<LedgerBody, String> {
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line (truncated or not a ledger)")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not UTF-8")?;
    let rest = header
        .strip_prefix(HEADER_PREFIX)
        .ok_or("header does not start with vfio-gpu-dra-ledger")?;
    let mut format = None;
    let mut sum = None;
    for field in rest.split_whitespace() {
        if let Some(v) = field.strip_prefix("format=") {
            format = v.parse::<u32>().ok();
        } else if let Some(v) = field.strip_prefix("sha256=") {
            sum = Some(v.to_string());
        }
    }
    let format = format.ok_or("header has no valid format=")?;
    if format > LEDGER_FORMAT {
        return Err(format!(
            "format {format} is newer than this build understands ({LEDGER_FORMAT})"
        ));
    }
    let body = &bytes[nl + 1..];
    let want = sum.ok_or("header has no sha256=")?;
    let got = hex::encode(Sha256::digest(body));
    if want != got {
        return Err(format!(
            "checksum mismatch (header {want}, body {got}): truncated or edited"
        ));
    }
    serde_json::from_slice(body).map_err(|e| format!("body is not a valid ledger: {e}"))
}

/// Serialises a ledger with its header.
pub fn encode(body: &LedgerBody) -> Vec<u8> {
    // Serialising our own types cannot fail (string keys, no non-finite floats).
    let json = serde_json::to_vec_pretty(body).unwrap_or_default();
    let mut out = format!(
        "{HEADER_PREFIX}format={LEDGER_FORMAT} sha256={}\n",
        hex::encode(Sha256::digest(&json))
    )
    .into_bytes();
    out.extend_from_slice(&json);
    out
}

/// The ledger file in a state directory.
#[derive(Debug)]
pub struct LedgerFile {
    dir: PathBuf,
}

impl LedgerFile {
    /// Uses `dir` (created if missing).
    pub fn new(dir: &Path) -> Result<Self, LedgerError> {
        fs::create_dir_all(dir).map_err(|source| LedgerError::StateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(LedgerFile {
            dir: dir.to_path_buf(),
        })
    }

    /// The ledger path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(LEDGER_FILE)
    }

    /// Loads the ledger. A missing file is an empty ledger; an untrusted one
    /// is moved aside and reported, and an empty ledger returned.
    pub fn load(&self) -> (LedgerBody, Option<LedgerProblem>) {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return (LedgerBody::default(), None);
            }
            Err(e) => {
                return (
                    LedgerBody::default(),
                    Some(self.move_aside(format!("unreadable: {e}"))),
                );
            }
        };
        match decode(&bytes) {
            Ok(body) => (body, None),
            Err(reason) => (LedgerBody::default(), Some(self.move_aside(reason))),
        }
    }

    fn move_aside(&self, reason: String) -> LedgerProblem {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let to = self.dir.join(format!("{LEDGER_FILE}.bad-{stamp}"));
        let moved_to = fs::rename(self.path(), &to).ok().map(|_| to);
        LedgerProblem { reason, moved_to }
    }

    /// Writes atomically: temp file, fsync, rename, fsync directory.
    pub fn store(&self, body: &LedgerBody) -> Result<(), LedgerError> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{LEDGER_FILE}.tmp"));
        let werr = |source| LedgerError::Write {
            path: path.clone(),
            source,
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(werr)?;
        f.write_all(&encode(body)).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        drop(f);
        fs::rename(&tmp, &path).map_err(werr)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(werr)?;
        Ok(())
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
