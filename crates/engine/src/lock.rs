//! One engine per state directory: an exclusive `flock` held for the
//! engine's lifetime, so the CLI and a running plugin never interleave
//! ledger updates.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// Holds the lock until dropped (the kernel releases it when the fd closes).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes `<dir>/engine.lock`, waiting up to `wait`.
    pub fn acquire(dir: &Path, wait: Duration) -> io::Result<StateLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("engine.lock"))?;
        let start = Instant::now();
        loop {
            // SAFETY: flock on a valid fd we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(StateLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) || start.elapsed() >= wait {
                return Err(err);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
