//! Reading configuration files under the host root.
//!
//! Not `HostRoot::read_opt`: that one caps reads at 64 KiB silently and fails
//! on non-UTF-8 bytes, and a Latin-1 comment in a modprobe.d file must not
//! turn the whole file into "unreadable".

use std::io::{ErrorKind, Read};
use std::path::Path;

use vfio_gpu_host::HostRoot;

/// Larger files are not configuration anyone wrote by hand; treat as unknown.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// What reading a file gave.
#[derive(Debug)]
pub(crate) enum ReadOutcome {
    /// The file does not exist (or is a dangling symlink).
    Missing,
    /// The file's text (invalid UTF-8 replaced).
    Text(String),
    /// It exists but could not be read; the reason.
    Failed(String),
}

/// Reads a configuration file through the host root (so the simulated
/// kernel can fail or block it like any other host read).
pub(crate) fn read_text(root: &HostRoot, path: &Path) -> ReadOutcome {
    let meta = match root.metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return ReadOutcome::Missing,
        Err(e) => return ReadOutcome::Failed(e.to_string()),
    };
    if meta.is_dir() {
        return ReadOutcome::Failed("is a directory".into());
    }
    if !meta.is_file() {
        // A FIFO or device would block or never end.
        return ReadOutcome::Failed("not a regular file".into());
    }
    let file = match root.open_file(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return ReadOutcome::Missing,
        Err(e) => return ReadOutcome::Failed(e.to_string()),
    };
    let mut buf = Vec::new();
    if let Err(e) = file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut buf) {
        return ReadOutcome::Failed(e.to_string());
    }
    if buf.len() as u64 > MAX_CONFIG_BYTES {
        return ReadOutcome::Failed(format!("larger than {MAX_CONFIG_BYTES} bytes"));
    }
    ReadOutcome::Text(String::from_utf8_lossy(&buf).into_owned())
}

/// The path as the host sees it, for messages: `etc/x` → `/etc/x`.
pub(crate) fn host_path(rel: &str) -> String {
    format!("/{}", rel.trim_start_matches('/'))
}
