//! One writer per state directory at a time: an exclusive `flock` on
//! `engine.lock`, so the CLI and a running plugin never interleave ledger
//! updates. The holder writes its pid and command line into the lock file, so
//! a process that finds the directory locked can say by whom.
//!
//! Two ways to hold it: [`StateLock`] for an engine's whole lifetime (the
//! CLI's one-shot commands, a single plugin instance), or [`SharedStateLock`]
//! per operation (plugin instances side by side during a rolling update): the
//! first operation of a process takes the `flock`, concurrent operations of
//! the same process join it, the last one out releases it.

// The state directory is this program's own files, not host state it
// judges: read with std (its faults are the ledger's own, tested apart).
#![allow(clippy::disallowed_methods)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The lock file in a state directory.
pub const LOCK_FILE: &str = "engine.lock";

/// Why the state lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("state directory {dir} is locked by {holder}")]
    Held {
        /// The state directory.
        dir: PathBuf,
        /// Who holds it, as the holder recorded it (pid and command line).
        holder: String,
    },
    /// The lock file could not be opened or locked (read-only file system,
    /// permissions, a symlink planted in its place…): not a contention.
    #[error("state lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why opening or locking it failed.
        #[source]
        source: io::Error,
    },
}

/// Holds the lock until dropped (the kernel releases it when the fd closes).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

fn open_lock_file(path: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        // Never follow a symlink planted where the lock belongs.
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| LockError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// `pid=<pid> cmd=<argv joined by spaces>`, at most a few hundred bytes.
fn describe_self() -> String {
    let cmd = std::fs::read("/proc/self/cmdline")
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let cmd: String = cmd.chars().filter(|c| !c.is_control()).take(400).collect();
    format!("pid={}\ncmd={cmd}\n", std::process::id())
}

/// Longest command line a "locked by" message repeats, in characters.
const MAX_SHOWN_CMD: usize = 400;

/// What the holder recorded in the lock file, for a "locked by" message.
fn recorded_holder(file: &mut File) -> String {
    let mut text = String::new();
    // A holder writes a few hundred bytes; never read more than that. An
    // unreadable file names no holder, which the fields below then say.
    let _ = file.take(4096).read_to_string(&mut text);
    holder_from_text(&text)
}

/// The "locked by" text for a lock file's content. The file may be anything (a
/// crashed writer, a planted file): a pid is shown only when it is a number, and
/// the command line without control characters and cut to [`MAX_SHOWN_CMD`], so
/// the message cannot forge log lines or drive a terminal (found by the
/// `lock_file` fuzz target).
fn holder_from_text(text: &str) -> String {
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let pid = field("pid=").and_then(|p| p.parse::<u32>().ok());
    let cmd = field("cmd=")
        .map(|c| {
            c.chars()
                .filter(|c| !c.is_control())
                .take(MAX_SHOWN_CMD)
                .collect::<String>()
        })
        .filter(|c| !c.trim().is_empty());
    match (pid, cmd) {
        (Some(pid), Some(cmd)) => format!("pid {pid} ({})", cmd.trim()),
        (Some(pid), None) => format!("pid {pid}"),
        _ => "another vfio-gpu-dra process (it recorded no pid)".into(),
    }
}

impl StateLock {
    /// Takes `<dir>/engine.lock`, waiting up to `wait` (zero: one attempt),
    /// and records this process in it.
    pub fn acquire(dir: &Path, wait: Duration) -> Result<StateLock, LockError> {
        Self::acquire_named(dir, LOCK_FILE, wait)
    }

    /// Whether another open file description holds `dir/file` locked now,
    /// without creating, taking or writing it: a missing file is free.
    pub fn held_by_other(dir: &Path, file: &str) -> Result<bool, LockError> {
        let path = dir.join(file);
        let found = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path);
        let file = match found {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(LockError::Io { path, source }),
        };
        // A shared lock conflicts only with the holder's exclusive one; it is
        // dropped with the descriptor.
        // SAFETY: flock on a valid fd we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(false);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(true);
        }
        Err(LockError::Io { path, source: err })
    }

    /// Like [`StateLock::acquire`] on another lock file of `dir` (e.g. the
    /// plugin's ResourceSlice publisher lock); `file` is a plain file name.
    pub fn acquire_named(dir: &Path, file: &str, wait: Duration) -> Result<StateLock, LockError> {
        let path = dir.join(file);
        let mut file = open_lock_file(&path)?;
        let start = Instant::now();
        loop {
            // SAFETY: flock on a valid fd we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(LockError::Io { path, source: err });
            }
            if start.elapsed() >= wait {
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    holder: recorded_holder(&mut file),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        file.set_len(0).map_err(io_err)?;
        file.write_all(describe_self().as_bytes()).map_err(io_err)?;
        Ok(StateLock { _file: file })
    }
}

/// The state lock taken per operation and shared by the concurrent
/// operations of this process (see the module docs). Another process waits
/// while any operation here holds it; nothing stops this process's own
/// operations from overlapping, so a process kept busy without a gap can make
/// the other one wait until its [`SharedStateLock::new`] `wait` runs out (a
/// retryable error for the kubelet).
#[derive(Debug)]
pub struct SharedStateLock {
    dir: PathBuf,
    wait: Duration,
    inner: Mutex<Shared>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Shared {
    /// Operations of this process holding the lock.
    holders: usize,
    /// The open, locked file while `holders > 0`.
    file: Option<File>,
    /// One thread is taking the `flock` (and running the on-take hook).
    acquiring: bool,
}

/// One operation's share of a [`SharedStateLock`]; the last one dropped
/// releases the `flock`.
#[derive(Debug)]
pub struct SharedLease {
    lock: Arc<SharedStateLock>,
}

impl SharedStateLock {
    /// A lock on `<dir>/engine.lock`, each take waiting up to `wait` for
    /// another process. Nothing is locked yet.
    pub fn new(dir: &Path, wait: Duration) -> Arc<Self> {
        Arc::new(SharedStateLock {
            dir: dir.to_path_buf(),
            wait,
            inner: Mutex::new(Shared::default()),
            changed: Condvar::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, Shared> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the operations of this process holding the lock, or takes it
    /// (waiting for another process up to `wait`) and runs `on_take` before
    /// any operation of this process proceeds: the moment to re-read what
    /// another process may have written.
    pub fn acquire(self: &Arc<Self>, on_take: impl FnOnce()) -> Result<SharedLease, LockError> {
        let mut st = self.state();
        loop {
            if st.holders > 0 {
                st.holders += 1;
                return Ok(SharedLease {
                    lock: Arc::clone(self),
                });
            }
            if !st.acquiring {
                break;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.acquiring = true;
        drop(st);
        let taken = StateLock::acquire(&self.dir, self.wait);
        if taken.is_ok() {
            on_take();
        }
        let mut st = self.state();
        st.acquiring = false;
        let result = taken.map(|lock| {
            st.file = Some(lock._file);
            st.holders = 1;
            SharedLease {
                lock: Arc::clone(self),
            }
        });
        drop(st);
        self.changed.notify_all();
        result
    }

    /// Runs `f` only if no operation of this process holds or is taking the
    /// lock, and keeps any from starting until `f` returns: a reader can
    /// refresh its copy of the state without racing a take's re-read.
    pub fn when_idle<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let st = self.state();
        (st.holders == 0 && !st.acquiring).then(f)
    }
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        let mut st = self.lock.state();
        st.holders = st.holders.saturating_sub(1);
        if st.holders == 0 {
            // Closing the file releases the flock.
            st.file = None;
        }
    }
}

/// Whether `<dir>` can be locked right now, without waiting: `Ok(())` when
/// it is free (the probe lock is dropped at once), else why not. For the
/// CLI to say who holds the directory after the engine reported it locked.
pub fn probe_state_lock(dir: &Path) -> Result<(), LockError> {
    StateLock::acquire(dir, Duration::ZERO).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `lock_file` fuzz target: a lock file's text reached the
    /// "locked by" message verbatim (escape sequences, a pid that is not one).
    #[test]
    fn holder_text_from_any_lock_file_is_printable_and_shows_only_numeric_pids() {
        let shown = holder_from_text("pid=5\ncmd=\u{1b}[2J\u{1b}[31mowned\r\n");
        assert_eq!(shown, "pid 5 ([2J[31mowned)");
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(
            holder_from_text("pid=1 (init)\ncmd=x\n"),
            "another vfio-gpu-dra process (it recorded no pid)"
        );
        let long = holder_from_text(&format!("pid=7\ncmd={}\n", "a".repeat(5000)));
        assert_eq!(long.len(), "pid 7 ()".len() + MAX_SHOWN_CMD);
        assert_eq!(holder_from_text("pid=9\ncmd=\u{7}\n"), "pid 9");
    }

    #[test]
    fn contention_names_the_holder_and_io_errors_are_not_contention() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let err = StateLock::acquire(dir.path(), Duration::ZERO).unwrap_err();
        let me = format!("pid {} (", std::process::id());
        assert!(
            matches!(&err, LockError::Held { holder, .. } if holder.starts_with(&me)),
            "{err}"
        );
        drop(held);
        probe_state_lock(dir.path()).unwrap();
        // A symlink where the lock file belongs: refused, reported as I/O.
        let other = tempfile::tempdir().unwrap();
        std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap();
        std::os::unix::fs::symlink(other.path().join("x"), dir.path().join(LOCK_FILE)).unwrap();
        let err = StateLock::acquire(dir.path(), Duration::ZERO).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err}");
        assert!(!other.path().join("x").exists());
    }

    #[test]
    fn shared_lock_is_joined_in_process_and_excludes_other_holders() {
        let dir = tempfile::tempdir().unwrap();
        let shared = SharedStateLock::new(dir.path(), Duration::ZERO);
        let mut takes = 0;
        let a = shared.acquire(|| takes += 1).unwrap();
        let b = shared.acquire(|| takes += 1).unwrap();
        assert_eq!(takes, 1, "the second operation joins without re-taking");
        assert!(shared.when_idle(|| ()).is_none());
        // Another holder (a separate open file description) is shut out.
        assert!(matches!(
            StateLock::acquire(dir.path(), Duration::ZERO),
            Err(LockError::Held { .. })
        ));
        drop(a);
        assert!(StateLock::acquire(dir.path(), Duration::ZERO).is_err());
        drop(b);
        assert!(shared.when_idle(|| ()).is_some());
        let cli = StateLock::acquire(dir.path(), Duration::ZERO).unwrap();
        assert!(matches!(shared.acquire(|| ()), Err(LockError::Held { .. })));
        drop(cli);
        let mut takes = 0;
        let _c = shared.acquire(|| takes += 1).unwrap();
        assert_eq!(takes, 1, "a new take after release runs the hook again");
    }
}
