//! For tests of this workspace: builds the fake `libnvfm` and NVML cdylibs
//! (`crates/fabric/fake-*`) next to the calling test binary, so tests drive
//! the real `dlopen` path.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds `package` with the calling test's cargo and profile into its target
/// directory and returns the path of `file` there. Panics when the build
/// fails: only tests call this.
pub fn build_fake_library(package: &str, file: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target dir");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", package, "--target-dir"])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    let lib = profile_dir.join(file);
    assert!(lib.exists(), "{} missing", lib.display());
    lib
}
