//! The administrator's way into a running `serve`: while `serve` holds the
//! state lock for its lifetime, `vfio-gpu-dra reset` reaches its engine here
//! instead of failing on the lock (the alternative to stopping the plugin or
//! rebooting the node to get a quarantined GPU back).
//!
//! A Unix socket in the state directory, mode 0600, answering only peers
//! running as root or as this process's user (`SO_PEERCRED`). One request per
//! connection, read to its end within [`IO_DEADLINE`] and at most
//! [`MAX_REQUEST_BYTES`]; every GPU address is checked before any GPU is
//! touched, and requests are served one at a time.

// The socket lives in the state directory, this program's own files, not
// host state it judges: handled with std, like the ledger and the lock.
#![allow(clippy::disallowed_methods)]

use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vfio_gpu_host::Bdf;

use crate::Engine;

/// The socket's file name in the state directory.
pub const ADMIN_SOCKET_FILE: &str = "admin.sock";
/// Largest request read; a longer one is refused unread.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// Most GPUs in one request (a node has at most a few dozen).
pub const MAX_GPUS: usize = 256;
/// How long a peer may take to send its request.
pub const IO_DEADLINE: Duration = Duration::from_secs(5);
/// How long the client waits for the answer: resets run under the engine's
/// own deadlines, one GPU after another.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(600);

/// What an administrator asks of the running engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminRequest {
    /// GPUs to reset and verify ([`Engine::reset_gpu`]), as PCI addresses.
    pub reset: Vec<String>,
}

/// The engine's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AdminAnswer {
    /// One result per GPU, in request order.
    Results(Vec<AdminResult>),
    /// The request was refused as a whole; nothing was done.
    Refused(String),
}

/// One GPU's result: its outcome as `reset -o json` prints it, or the error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminResult {
    /// The GPU.
    pub gpu: Bdf,
    /// The engine's outcome, serialized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a request to the running engine failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    /// No engine listens (no socket, or nobody accepts on it).
    #[error("no running vfio-gpu-dra serve answers on {path}")]
    NotRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// A step of the exchange failed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The running engine refused the request.
    #[error("the running vfio-gpu-dra serve refused the request: {0}")]
    Refused(String),
    /// The answer did not decode.
    #[error("the running vfio-gpu-dra serve answered something unreadable: {0}")]
    BadAnswer(String),
}

/// The socket of a running engine; stops listening and removes its file
/// when dropped.
pub struct AdminSocket {
    path: PathBuf,
    /// The socket file's identity, so a successor's socket is never removed.
    inode: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminSocket {
    /// Listens on `<state_dir>/admin.sock` for `engine` (a stale file there,
    /// from a process that died, is replaced).
    pub fn start(engine: Arc<Engine>, state_dir: &Path) -> io::Result<AdminSocket> {
        let path = state_dir.join(ADMIN_SOCKET_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let meta = std::fs::symlink_metadata(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("admin-socket".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        match conn {
                            Ok(stream) => serve_one(&engine, stream),
                            Err(e) => tracing::warn!(error = %e, "admin socket: accept failed"),
                        }
                    }
                })?
        };
        tracing::info!(path = %path.display(), "admin socket listening (vfio-gpu-dra reset)");
        Ok(AdminSocket {
            path,
            inode: (meta.dev(), meta.ino()),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the stop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The uid of the peer of `stream`.
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, and
    // the descriptor is the open socket `stream` owns.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Answers one connection; never fails the loop.
fn serve_one(engine: &Engine, mut stream: UnixStream) {
    let answer = match read_request(&stream) {
        Ok(req) => handle(engine, &req),
        Err(refusal) => AdminAnswer::Refused(refusal),
    };
    let _ = stream.set_write_timeout(Some(IO_DEADLINE));
    match serde_json::to_vec(&answer) {
        Ok(bytes) => {
            if let Err(e) = stream.write_all(&bytes) {
                tracing::warn!(error = %e, "admin socket: answer not delivered");
            }
        }
        Err(e) => tracing::warn!(error = %e, "admin socket: answer not encoded"),
    }
}

/// Checks the peer and reads its request, or says why not.
fn read_request(stream: &UnixStream) -> Result<AdminRequest, String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_uid(stream) {
        Ok(uid) if uid == 0 || uid == me => {}
        Ok(uid) => return Err(format!("uid {uid} may not use the admin socket")),
        Err(e) => return Err(format!("peer credentials unreadable: {e}")),
    }
    stream
        .set_read_timeout(Some(IO_DEADLINE))
        .map_err(|e| format!("setting the read deadline: {e}"))?;
    let mut body = Vec::new();
    (&mut &*stream)
        .take(MAX_REQUEST_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the request: {e}"))?;
    if body.len() as u64 > MAX_REQUEST_BYTES {
        return Err(format!("request over {MAX_REQUEST_BYTES} bytes"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("request not understood: {e}"))
}

/// Every address checked before the first reset: a bad one refuses all.
fn handle(engine: &Engine, req: &AdminRequest) -> AdminAnswer {
    if req.reset.is_empty() || req.reset.len() > MAX_GPUS {
        return AdminAnswer::Refused(format!(
            "name 1 to {MAX_GPUS} GPUs, not {}",
            req.reset.len()
        ));
    }
    let mut bdfs = Vec::with_capacity(req.reset.len());
    for text in &req.reset {
        match text.parse::<Bdf>() {
            Ok(b) => bdfs.push(b),
            Err(e) => return AdminAnswer::Refused(format!("GPU address: {e}")),
        }
    }
    tracing::info!(gpus = ?bdfs, "admin socket: reset requested");
    AdminAnswer::Results(
        bdfs.into_iter()
            .map(|gpu| match engine.reset_gpu(gpu) {
                Ok(o) => AdminResult {
                    gpu,
                    outcome: Some(serde_json::to_value(&o).unwrap_or(Value::Null)),
                    error: None,
                },
                Err(e) => AdminResult {
                    gpu,
                    outcome: None,
                    error: Some(e.to_string()),
                },
            })
            .collect(),
    )
}

/// Asks the engine of the `serve` running on `state_dir` to reset and verify
/// `gpus`; [`AdminSocketError::NotRunning`] when none listens there.
pub fn request_reset(state_dir: &Path, gpus: &[Bdf]) -> Result<Vec<AdminResult>, AdminSocketError> {
    let path = state_dir.join(ADMIN_SOCKET_FILE);
    let io = |step, source| AdminSocketError::Io {
        step,
        path: path.clone(),
        source,
    };
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AdminSocketError::NotRunning { path });
        }
        Err(e) => return Err(io("connecting to", e)),
    };
    let req = AdminRequest {
        reset: gpus.iter().map(ToString::to_string).collect(),
    };
    let body = serde_json::to_vec(&req).map_err(|e| AdminSocketError::BadAnswer(e.to_string()))?;
    stream
        .set_write_timeout(Some(IO_DEADLINE))
        .map_err(|e| io("setting a deadline on", e))?;
    stream.write_all(&body).map_err(|e| io("writing to", e))?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| io("ending the request on", e))?;
    stream
        .set_read_timeout(Some(ANSWER_DEADLINE))
        .map_err(|e| io("setting a deadline on", e))?;
    let mut answer = Vec::new();
    stream
        .take(16 * 1024 * 1024)
        .read_to_end(&mut answer)
        .map_err(|e| io("reading the answer from", e))?;
    match serde_json::from_slice(&answer) {
        Ok(AdminAnswer::Results(r)) => Ok(r),
        Ok(AdminAnswer::Refused(why)) => Err(AdminSocketError::Refused(why)),
        Err(e) => Err(AdminSocketError::BadAnswer(e.to_string())),
    }
}
