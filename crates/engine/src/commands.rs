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
    /// Loads `module` with the host's `modprobe`. The name must not look
    /// like an option, and `--` ends modprobe's options before it anyway.
    fn modprobe(&self, root: &HostRoot, module: &str) -> Result<String, String> {
        check_module_name(module)?;
        self.run(root, "modprobe", &["--", module])
    }
    /// Whether `program` exists on the host (under `usr/bin`, `usr/sbin`, `bin`, `sbin`).
    fn exists(&self, root: &HostRoot, program: &str) -> bool {
        ["usr/bin", "usr/sbin", "bin", "sbin"]
            .iter()
            .any(|d| root.rel(d).join(program).is_file())
    }
}

/// A module name from modules.alias or the policy: `[A-Za-z0-9_-]`, not
/// starting with `-`.
pub fn check_module_name(module: &str) -> Result<(), String> {
    let ok = !module.is_empty()
        && module.len() <= 64
        && !module.starts_with('-')
        && module
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("{module:?} is not a module name"))
    }
}

/// For `modprobe`: every argument before `--` that starts with `-` is
/// refused, so a module name can never be taken as an option (the engine
/// passes only names; options would come from a crafted alias or policy).
fn check_modprobe_args(args: &[&str]) -> Result<(), String> {
    for a in args {
        if *a == "--" {
            return Ok(());
        }
        if a.starts_with('-') {
            return Err(format!(
                "refusing to run modprobe with option-like argument {a:?}"
            ));
        }
    }
    Ok(())
}

/// Real processes.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealCommands;

impl HostCommands for RealCommands {
    fn run(&self, root: &HostRoot, program: &str, args: &[&str]) -> Result<String, String> {
        if program == "modprobe" {
            check_modprobe_args(args)?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what would run.
    struct Record(std::sync::Mutex<Vec<String>>);

    impl HostCommands for Record {
        fn run(&self, _root: &HostRoot, program: &str, args: &[&str]) -> Result<String, String> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("{program} {}", args.join(" ")));
            Ok(String::new())
        }
    }

    #[test]
    fn modprobe_ends_options_and_refuses_option_like_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
        let root = HostRoot::open(dir.path()).unwrap();
        let r = Record(Default::default());
        r.modprobe(&root, "vfio_pci").unwrap();
        assert!(r.modprobe(&root, "-C/tmp/evil.conf").is_err());
        assert!(r.modprobe(&root, "a b").is_err());
        assert_eq!(*r.0.lock().unwrap(), ["modprobe -- vfio_pci"]);
        // The real runner refuses an option-like name even from an old call site.
        let e = RealCommands
            .run(&root, "modprobe", &["--config=/tmp/x"])
            .unwrap_err();
        assert!(e.contains("option-like"), "{e}");
        assert!(check_modprobe_args(&["--", "-odd"]).is_ok());
    }
}
