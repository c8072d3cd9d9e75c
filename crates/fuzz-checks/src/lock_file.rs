//! Target `lock_file`: the text a lock file holds when another process has it
//! (`engine.lock`, `stuck-<BDF>.lock`, the slice publisher's `publisher.lock`),
//! read back by `StateLock::acquire_named` into the "locked by …" message the
//! kubelet, `doctor` and the logs show. (The kubelet's per-claim locks are
//! in-memory and have no text.)
//!
//! Input: one selector byte choosing the lock file, then its raw content
//! (anything: a crashed writer, a truncated file, a planted one).
//!
//! The harness takes the lock itself through a second descriptor (as another
//! process would hold it), then asks for it. Properties:
//! - a held lock is refused as `Held`, and the refusal changes nothing in the file;
//! - the holder text is bounded, has no control characters (nothing the file
//!   holds can forge log lines or drive a terminal), and shows a pid only when the
//!   file recorded a decimal one;
//! - once free, the lock is taken and the file then names this process.

use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use vfio_gpu_engine::lock::{LOCK_FILE, LockError, StateLock, probe_state_lock};

/// The lock files the product reads holder text from.
const NAMES: &[&str] = &[LOCK_FILE, "stuck-0000:65:00.0.lock", "publisher.lock"];

/// Longest holder text a message may carry: `pid <u32> (<cmd>)` with the
/// recorded command line cut as the reader cuts it.
const MAX_HOLDER_CHARS: usize = 4096;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = crate::scratch::dir("lock_file");
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

/// What a holder text must look like, whatever the file held.
fn check_holder_text(holder: &str, content: &[u8]) {
    assert!(
        holder.chars().count() <= MAX_HOLDER_CHARS,
        "holder text of {} chars from {} bytes",
        holder.chars().count(),
        content.len()
    );
    assert!(
        !holder.chars().any(char::is_control),
        "holder text {holder:?} carries control characters"
    );
    if let Some(rest) = holder.strip_prefix("pid ") {
        let pid = rest.split(' ').next().unwrap_or_default();
        assert!(
            pid.parse::<u32>().is_ok(),
            "holder text {holder:?} shows a pid that is not a number"
        );
    }
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let Some((&sel, content)) = data.split_first() else {
        return;
    };
    let name = NAMES[usize::from(sel) % NAMES.len()];
    let dir = dir();
    let path = dir.join(name);
    let _ = fs::remove_file(&path);
    fs::write(&path, content).expect("writing the lock file");

    // Another holder: a second open file description with the flock.
    let other = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("opening the lock file");
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0, "the harness could not take the lock");

    match StateLock::acquire_named(dir, name, Duration::ZERO) {
        Err(LockError::Held { holder, dir: d }) => {
            assert_eq!(&d, dir, "the refusal names another directory");
            check_holder_text(&holder, content);
        }
        Err(e) => panic!("a held lock refused as {e}"),
        Ok(_) => panic!("a held lock was taken twice"),
    }
    if name == LOCK_FILE {
        match probe_state_lock(dir) {
            Err(LockError::Held { holder, .. }) => check_holder_text(&holder, content),
            other => panic!("a held state lock probed as {other:?}"),
        }
    }
    assert_eq!(
        fs::read(&path).expect("reading the lock file"),
        content,
        "refusing the lock changed the file"
    );

    drop(other);
    let taken = StateLock::acquire_named(dir, name, Duration::ZERO)
        .unwrap_or_else(|e| panic!("a free lock was refused: {e}"));
    let text = fs::read_to_string(&path).expect("the lock file names its holder in UTF-8");
    assert!(
        text.starts_with(&format!("pid={}\n", std::process::id())),
        "the lock file does not name this process: {text:?}"
    );
    drop(taken);
}
