//! Shared by the CLI tests that start `serve`.

use std::path::Path;
use std::process::Command;

/// Points `serve` at kubelet and CDI directories under `dir` (`plugins`,
/// `registry`, `cdi`), so a test never touches the host's.
pub fn kubelet_dirs_under<'a>(cmd: &'a mut Command, dir: &Path) -> &'a mut Command {
    cmd.arg("--kubelet-plugins-dir")
        .arg(dir.join("plugins"))
        .arg("--kubelet-registrar-dir")
        .arg(dir.join("registry"))
        .arg("--cdi-root")
        .arg(dir.join("cdi"))
}

/// Runs on the demo host laid out in `dir/demo`.
pub fn demo_host_under<'a>(cmd: &'a mut Command, dir: &Path) -> &'a mut Command {
    cmd.arg("--demo").arg("--demo-dir").arg(dir.join("demo"))
}
