//! Host programs the engine may run (the host's own `modprobe`, `nvidia-smi`),
//! behind a trait so tests can stand in for them.

use std::fmt;
use std::path::Path;
use std::process::Command;

use vfio_gpu_host::HostRoot;

/// Runs a program of the host: directly when the host root is `/`, else
/// through `chroot <host-root>` so the host's binary and configuration apply.
pub trait HostCommands: Send + Sync {
    /// Runs `program args…`; `Ok(stdout)` on exit status 0, else `Err(stderr or why)`.
    fn run(&self, root: &HostRoot, program: &str, args: &[&str]) -> Result<String, String>;
    /// Whether `program` exists on the host (under `usr/bin`, `usr/sbin`, `bin`, `sbin`).
    fn exists(&self, root: &HostRoot, program: &str) -> bool {
        ["usr/bin", "usr/sbin", "bin", "sbin"]
            .iter()
            .any(|d| root.rel(d).join(program).is_file())
    }
}

/// Real processes.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealCommands;

impl HostCommands for RealCommands {
    fn run(&self, root: &HostRoot, program: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = if root.path() == Path::new("/") {
            Command::new(program)
        } else {
            let mut c = Command::new("chroot");
            c.arg(root.path()).arg(program);
            c
        };
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("running {program}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{program} {}: {} ({})",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ))
        }
    }
}

impl fmt::Debug for dyn HostCommands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostCommands")
    }
}
