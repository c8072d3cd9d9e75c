//! The ledger: the engine's write-ahead record of what it did to the host,
//! so a restart (or a crash) never loses what driver a GPU came from.
//!
//! On disk: one header line `vfio-gpu-dra-ledger format=<N> sha256=<hex>`
//! followed by a JSON body. The checksum covers the body's raw bytes (not a
//! re-serialisation, the Go plugin's upgrade trap), unknown fields are kept
//! and written back, and writes are atomic (temp file, fsync, rename, fsync
//! directory). A ledger that is corrupt (bad checksum, truncated, not a
//! ledger) is moved aside, never crash-looped on. One this build cannot
//! understand (a newer format, an unknown enum value) or cannot read (I/O
//! error) is left where it is and the file turns read-only: it may hold
//! another version's intent, and discarding it would forget which GPUs the
//! plugin moved.
//!
//! The state directory is 0700 and must belong to the current user; files
//! are 0600 and opened without following symlinks.

// The state directory is this program's own files, not host state it
// judges: read with std (its faults are the ledger's own, tested apart).
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// What it looked like when we found it, so a reset between tenants can
    /// be verified against it (`None` in records older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
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
    /// A tenant hand-over in progress (reset and verify after a release),
    /// written before the first reset so a crash resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
    /// Functions a release left without a driver only because the admin
    /// pinned them to none (`driverctl … none`), though each had a driver when
    /// we found it: a `released-unbound` record with any is settled again,
    /// so that a pin withdrawn later sends them back to their drivers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unbound_by_pin: Vec<Bdf>,
    /// Its holder got it on vfio (a move for it finished) and has not let it go
    /// since: whatever takes it from that holder (a release, or the rollback of
    /// a re-drive that failed) owes the next tenant a reset. A move that never
    /// finished for a new holder gave the GPU to nobody.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub served: bool,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// One function's identity and BAR total, as recorded when it was found
/// and compared after every reset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fingerprint {
    /// `vendor`.
    pub vendor: u16,
    /// `device`.
    pub device: u16,
    /// `subsystem_vendor`.
    pub subsystem_vendor: u16,
    /// `subsystem_device`.
    pub subsystem_device: u16,
    /// Total size of the memory BARs (`resource`), in bytes.
    pub bar_bytes: u64,
}

/// Where a tenant hand-over stands (write-ahead: each phase is recorded
/// before its host writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HandoverPhase {
    /// Resetting every function (and running the scrub hook): redone after a crash.
    Resetting,
    /// Reset done: verification (after the functions are where they go) is next.
    Verifying,
}

/// A tenant hand-over in progress, on the GPU's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Handover {
    /// The holder that released it, in words.
    pub released_by: String,
    /// When the release began, seconds since the epoch.
    pub released_at: u64,
    /// Where it stands.
    pub phase: HandoverPhase,
    /// How it was reset (`reset` attribute with the `reset_method` read then),
    /// once it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_method: Option<String>,
    /// The scrub hook's result, once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Handover {
    /// A hand-over owed from now on, released by `released_by`.
    pub fn owed(released_by: &str) -> Handover {
        Handover {
            released_by: released_by.to_string(),
            released_at: now(),
            phase: HandoverPhase::Resetting,
            reset_method: None,
            hook: None,
            extra: BTreeMap::new(),
        }
    }
}

/// The audit record of one finished tenant hand-over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandoverAudit {
    /// The GPU.
    pub gpu: Bdf,
    /// The holder that released it, in words.
    pub released_by: String,
    /// When the release began, seconds since the epoch.
    pub released_at: u64,
    /// When the hand-over finished, seconds since the epoch.
    pub finished_at: u64,
    /// How it was reset, or why it was not.
    pub reset_method: String,
    /// `clean`, or what verification found.
    pub verification: String,
    /// The scrub hook's result (`not configured` when there is none).
    pub hook: String,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A GPU that failed its reset, verification or scrub hook: never offered
/// until an administrator resets it (`vfio-gpu-dra reset <GPU>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quarantine {
    /// Why.
    pub reason: String,
    /// Which step failed, as a short code (the device taint's value: the API
    /// allows only a label value there, not the reason's text). Ledgers of
    /// earlier versions read as [`QuarantineCause::Unspecified`].
    #[serde(default)]
    pub cause: QuarantineCause,
    /// Since when, seconds since the epoch.
    pub since: u64,
    /// Boot it was quarantined in (kept across reboots: a GPU that fails its
    /// reset is suspect until proven clean).
    pub boot_id: String,
    /// What each function looked like when it was found: the admin's reset
    /// must verify against these, not against the failed state.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fingerprints: BTreeMap<Bdf, Fingerprint>,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Which step of a hand-over (or an admin reset) put a GPU in quarantine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QuarantineCause {
    /// The kernel refused or failed the reset, or the device has no reset method.
    ResetFailed,
    /// The reset did not return within its deadline.
    ResetHung,
    /// The scrub hook failed, or is required but not configured.
    HookFailed,
    /// The reset returned but the device did not come back as it was
    /// (identity, BARs, link).
    VerificationFailed,
    /// Recorded by a version that did not say.
    #[default]
    #[serde(other)]
    Unspecified,
}

impl QuarantineCause {
    /// The code, as published in the device taint's value and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineCause::ResetFailed => "ResetFailed",
            QuarantineCause::ResetHung => "ResetHung",
            QuarantineCause::HookFailed => "HookFailed",
            QuarantineCause::VerificationFailed => "VerificationFailed",
            QuarantineCause::Unspecified => "Unspecified",
        }
    }
}

/// How many hand-over audit records the ledger keeps (oldest dropped first,
/// but never a GPU's last one). Every commit rewrites the whole ledger, so
/// its size is paid on every move: 256 records made a release 70 % slower
/// than an empty history; the complete history is the plugin's log (one
/// `hand-over` line per record, the same fields).
pub const HANDOVER_AUDIT_KEPT: usize = 32;

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
    #[serde(default, deserialize_with = "one_record_per_gpu")]
    pub gpus: BTreeMap<Bdf, GpuRecord>,
    /// Next operation number.
    #[serde(default)]
    pub next_operation: u64,
    /// GPUs given back with nvidia persistence mode still off because turning
    /// it on failed; reconcile retries until it works (or the node reboots).
    #[serde(
        default,
        deserialize_with = "one_record_per_gpu",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub persistence_to_restore: BTreeMap<Bdf, PendingPersistence>,
    /// NVLink partitions and the module map ([`crate::fabric_state`]); left
    /// out of the file while empty, so a node without a fabric writes the
    /// same ledger as before.
    #[serde(
        default,
        deserialize_with = "crate::fabric_state::present",
        skip_serializing_if = "crate::fabric_state::FabricLedger::is_empty"
    )]
    pub fabric: crate::fabric_state::FabricLedger,
    /// GPUs kept from tenants until an administrator resets them.
    #[serde(
        default,
        deserialize_with = "one_record_per_gpu",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub quarantined: BTreeMap<Bdf, Quarantine>,
    /// The last [`HANDOVER_AUDIT_KEPT`] tenant hand-overs, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handovers: Vec<HandoverAudit>,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Persistence mode that could not be turned back on at release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingPersistence {
    /// Boot it was turned off in (a reboot resets it; the entry is then dropped).
    pub boot_id: String,
    /// The last failure, as the host's `nvidia-smi` said it.
    pub error: String,
    /// When it was first left off (seconds since the epoch).
    #[serde(default)]
    pub since: u64,
    /// Fields written by other versions, kept as they were.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Why a ledger file was not used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerProblem {
    /// What was wrong.
    pub reason: String,
    /// Where the file was moved (corrupt files only).
    pub moved_to: Option<PathBuf>,
    /// The file was left in place and every write is refused
    /// ([`LedgerError::ReadOnly`]): a newer format, an unknown value, an
    /// I/O error, or a corrupt file that could not be moved aside.
    pub read_only: bool,
}

/// Ledger I/O errors that stop an operation (the state dir is unwritable).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Writing the ledger failed.
    #[error("writing ledger {path}: {source}")]
    Write {
        /// The ledger file being written.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Creating the state directory failed, or it is not safe to use.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The state directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The ledger on disk could not be understood or read, so it was kept
    /// and nothing may be recorded over it.
    #[error(
        "ledger {path} is kept read-only ({reason}); no GPU is moved until an administrator resolves it (upgrade vfio-gpu-dra, or fix the file)"
    )]
    ReadOnly {
        /// The ledger file, left as it was.
        path: PathBuf,
        /// Why it cannot be used (a newer format, undecodable, unreadable).
        reason: String,
    },
    /// The host has no boot id, so records could not be told from an
    /// earlier boot's after a reboot.
    #[error(
        "no boot id (proc/sys/kernel/random/boot_id is missing or empty); refusing to record host changes in {path}"
    )]
    NoBootId {
        /// The ledger file.
        path: PathBuf,
    },
}

/// What is wrong with ledger bytes.
enum DecodeError {
    /// Truncated, edited or not a ledger: safe to set aside.
    Corrupt(String),
    /// Intact but not understood by this build: must be kept.
    Unsupported(String),
}

/// Parses ledger bytes. Errors say exactly what is wrong.
pub fn decode(bytes: &[u8]) -> Result<LedgerBody, String> {
    decode_classified(bytes).map_err(|e| match e {
        DecodeError::Corrupt(s) | DecodeError::Unsupported(s) => s,
    })
}

fn decode_classified(bytes: &[u8]) -> Result<LedgerBody, DecodeError> {
    let c = |s: &str| DecodeError::Corrupt(s.to_string());
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| c("no header line (truncated or not a ledger)"))?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| c("header is not UTF-8"))?;
    let rest = header
        .strip_prefix(HEADER_PREFIX)
        .ok_or_else(|| c("header does not start with vfio-gpu-dra-ledger"))?;
    let mut format = None;
    let mut sum = None;
    for field in rest.split_whitespace() {
        if let Some(v) = field.strip_prefix("format=") {
            format = v.parse::<u32>().ok();
        } else if let Some(v) = field.strip_prefix("sha256=") {
            sum = Some(v.to_string());
        }
    }
    let format = format.ok_or_else(|| c("header has no valid format="))?;
    if format > LEDGER_FORMAT {
        return Err(DecodeError::Unsupported(format!(
            "format {format} is newer than this build understands ({LEDGER_FORMAT})"
        )));
    }
    let body = &bytes[nl + 1..];
    let want = sum.ok_or_else(|| c("header has no sha256="))?;
    let got = hex::encode(Sha256::digest(body));
    if want != got {
        return Err(DecodeError::Corrupt(format!(
            "checksum mismatch (header {want}, body {got}): truncated or edited"
        )));
    }
    // The checksum holds: whoever wrote this meant it (an unknown state or
    // holder kind from a newer version), so it is not corrupt.
    serde_json::from_slice(body).map_err(|e| {
        DecodeError::Unsupported(format!("body is not a ledger this build understands: {e}"))
    })
}

/// Reads `gpus`, refusing two records for one GPU (`0000:3a:00.0` and
/// `0000:3A:00.0` in a hand-edited file) instead of keeping the last and
/// silently losing the other.
fn one_record_per_gpu<'de, D, T>(d: D) -> Result<BTreeMap<Bdf, T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Records<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Records<T> {
        type Value = BTreeMap<Bdf, T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("records by GPU PCI address")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut records = BTreeMap::new();
            while let Some((bdf, record)) = map.next_entry::<Bdf, T>()? {
                if records.contains_key(&bdf) {
                    return Err(serde::de::Error::custom(format!(
                        "two records for GPU {bdf} (its address is spelled twice)"
                    )));
                }
                records.insert(bdf, record);
            }
            Ok(records)
        }
    }
    d.deserialize_map(Records(std::marker::PhantomData))
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
    /// Set when the file on disk must be kept: every store is refused.
    read_only: Mutex<Option<String>>,
}

/// Makes `move_aside` names unique within one process.
static ASIDE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LedgerFile {
    /// Whether the ledger file exists now.
    pub(crate) fn exists(&self) -> bool {
        self.path().exists()
    }

    /// Uses `dir`, created 0700 if missing. An existing directory must
    /// belong to the current user (anyone else could plant records or
    /// symlinks) and is tightened to 0700.
    pub fn new(dir: &Path) -> Result<Self, LedgerError> {
        let state_err = |source| LedgerError::StateDir {
            path: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(state_err)?;
        let meta = fs::metadata(dir).map_err(state_err)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(state_err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "owned by uid {}, not by this process (uid {me})",
                    meta.uid()
                ),
            )));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(state_err)?;
        }
        Ok(LedgerFile {
            dir: dir.to_path_buf(),
            read_only: Mutex::new(None),
        })
    }

    /// The ledger path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(LEDGER_FILE)
    }

    /// Why the file is read-only, if it is.
    pub fn read_only(&self) -> Option<String> {
        self.read_only
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_read_only(&self, reason: String) -> LedgerProblem {
        *self.read_only.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        LedgerProblem {
            reason,
            moved_to: None,
            read_only: true,
        }
    }

    /// Loads the ledger. A missing file is an empty ledger. A corrupt one is
    /// moved aside and reported, and an empty ledger returned. One that is
    /// intact but not understood, or unreadable, is reported and kept: the
    /// returned body is empty and every later [`LedgerFile::store`] fails.
    pub fn load(&self) -> (LedgerBody, Option<LedgerProblem>) {
        match read_ledger(&self.path()) {
            Ok(body) => {
                // A missing file, or one another process made readable again
                // (an upgrade finished, a fix): nothing kept any more.
                *self.read_only.lock().unwrap_or_else(|p| p.into_inner()) = None;
                (body, None)
            }
            Err(ReadFailure::Io(e)) => (
                LedgerBody::default(),
                Some(self.set_read_only(format!("unreadable: {e}"))),
            ),
            Err(ReadFailure::Decode(DecodeError::Unsupported(reason))) => {
                (LedgerBody::default(), Some(self.set_read_only(reason)))
            }
            Err(ReadFailure::Decode(DecodeError::Corrupt(reason))) => {
                (LedgerBody::default(), Some(self.move_aside(reason)))
            }
        }
    }

    /// Reads the ledger in `dir` for display (`inspect`, the `ledger`
    /// command): no lock, nothing created, a corrupt file never moved aside,
    /// nothing marked read-only. Same reader as [`LedgerFile::load`] (no
    /// symlink followed). A missing file is an empty ledger; any other
    /// problem comes with an empty body.
    pub fn read_only_view(dir: &Path) -> (LedgerBody, Option<LedgerViewProblem>) {
        match read_ledger(&dir.join(LEDGER_FILE)) {
            Ok(body) => (body, None),
            Err(ReadFailure::Io(e)) => (
                LedgerBody::default(),
                Some(LedgerViewProblem::Unreadable(e)),
            ),
            Err(ReadFailure::Decode(DecodeError::Corrupt(s) | DecodeError::Unsupported(s))) => (
                LedgerBody::default(),
                Some(LedgerViewProblem::Undecodable(s)),
            ),
        }
    }

    /// Renames a corrupt ledger to a unique `ledger.json.bad-<secs>-<pid>-<n>`
    /// and makes the rename durable. If it cannot be moved, it is kept and
    /// the file turns read-only rather than being overwritten.
    fn move_aside(&self, reason: String) -> LedgerProblem {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
            .unwrap_or_else(|_| "0".into());
        let n = ASIDE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let to = self.dir.join(format!(
            "{LEDGER_FILE}.bad-{stamp}-{}-{n}",
            std::process::id()
        ));
        // Never replace an earlier set-aside file (a name clash is a bug, not data loss).
        if to.exists() {
            return self.set_read_only(format!("{reason}; {} already exists", to.display()));
        }
        match fs::rename(self.path(), &to).and_then(|()| sync_dir(&self.dir)) {
            Ok(()) => LedgerProblem {
                reason,
                moved_to: Some(to),
                read_only: false,
            },
            Err(e) => self.set_read_only(format!("{reason}; could not move it aside: {e}")),
        }
    }

    /// Removes the file (a mirror that could not be kept current must never
    /// be adopted stale). A missing file is fine.
    pub fn discard(&self) -> std::io::Result<()> {
        match fs::remove_file(self.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Writes atomically: temp file (0600, not following symlinks), fsync,
    /// rename, fsync directory. Refused when the file is read-only or the
    /// body has no boot id.
    pub fn store(&self, body: &LedgerBody) -> Result<(), LedgerError> {
        self.store_with(body, Durability::Disk)
    }

    /// [`LedgerFile::store`], with the fsyncs only when `durability` asks
    /// for the disk: the rename is atomic either way, so a reader (or this
    /// process after a crash) sees the old body or the new one.
    pub fn store_with(&self, body: &LedgerBody, durability: Durability) -> Result<(), LedgerError> {
        let path = self.path();
        if let Some(reason) = self.read_only() {
            return Err(LedgerError::ReadOnly { path, reason });
        }
        if body.boot_id.trim().is_empty() {
            return Err(LedgerError::NoBootId { path });
        }
        let tmp = self.dir.join(format!(".{LEDGER_FILE}.tmp"));
        let werr = |source| LedgerError::Write {
            path: path.clone(),
            source,
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(werr)?;
        f.write_all(&encode(body)).map_err(werr)?;
        if durability == Durability::Disk {
            f.sync_all().map_err(werr)?;
        }
        drop(f);
        fs::rename(&tmp, &path).map_err(werr)?;
        if durability == Durability::Disk {
            sync_dir(&self.dir).map_err(werr)?;
        }
        Ok(())
    }
}

/// How far a ledger write must reach before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsynced: survives a power loss. Every GPU record.
    Disk,
    /// Renamed into place, not fsynced: survives a crash of this process,
    /// not of the host. Only for boot-scoped facts that a host crash voids
    /// anyway (a Fabric Manager partition does not outlive the host's boot),
    /// written after a commit that was fsynced.
    Process,
}

/// Why a ledger read failed.
enum ReadFailure {
    /// Not readable (not following a symlink included).
    Io(std::io::Error),
    /// Read, but not a ledger this build understands.
    Decode(DecodeError),
}

/// The one reader of a ledger file: no symlink followed, a missing file an
/// empty ledger.
fn read_ledger(path: &Path) -> Result<LedgerBody, ReadFailure> {
    match read_nofollow(path) {
        Ok(bytes) => decode_classified(&bytes).map_err(ReadFailure::Decode),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LedgerBody::default()),
        Err(e) => Err(ReadFailure::Io(e)),
    }
}

/// Why [`LedgerFile::read_only_view`] shows an empty ledger. `Display` is
/// the cause alone; callers add the path.
#[derive(Debug, thiserror::Error)]
pub enum LedgerViewProblem {
    /// The file could not be read (a symlink at its name included).
    #[error("{0}")]
    Unreadable(#[source] std::io::Error),
    /// The file was read but is not a ledger this build understands.
    #[error("{0}")]
    Undecodable(String),
}

/// Reads a file without following a symlink at its last component.
fn read_nofollow(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut out)?;
    Ok(out)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
