//! Per-process scratch directories on tmpfs for targets that must go through
//! real files (the ledger, a fixture sysfs tree).

use std::path::{Path, PathBuf};

/// A directory `name` private to this process, under `/dev/shm` when it
/// exists (tmpfs keeps file-based targets fast), else the temp directory.
/// Removed at exit only by the OS cleaning tmpfs: fuzzing processes are
/// killed rather than exit, so callers reuse the same directory per process.
pub fn dir(name: &str) -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("vfio-gpu-fuzz-{}-{name}", std::process::id()))
}
