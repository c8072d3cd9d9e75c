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
    /// Like [`HostCommands::run`], but a program still running after `limit`
    /// is killed, so a hung `nvidia-smi` does not linger with the thread that
    /// waits for it (review n11). Test doubles may ignore the limit.
    fn run_for(
        &self,
        root: &HostRoot,
        program: &str,
        args: &[&str],
        limit: std::time::Duration,
    ) -> Result<String, String> {
        let _ = limit;
        self.run(root, program, args)
    }
    /// Loads `module` with the host's `modprobe`. The name must not look
    /// like an option, and `--` ends modprobe's options before it anyway.
    fn modprobe(&self, root: &HostRoot, module: &str) -> Result<String, String> {
        check_module_name(module)?;
        self.run(root, "modprobe", &["--", module])
    }
    /// Whether `program` exists on the host (under `usr/bin`, `usr/sbin`, `bin`, `sbin`).
    fn exists(&self, root: &HostRoot, program: &str) -> bool {
        ["usr/bin", "usr/sbin", "bin", "sbin"].iter().any(|d| {
            root.metadata(&root.rel(d).join(program))
                .is_ok_and(|m| m.is_file())
        })
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

impl RealCommands {
    fn command(root: &HostRoot, program: &str, args: &[&str]) -> Result<Command, String> {
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
        cmd.args(args);
        Ok(cmd)
    }
}

impl HostCommands for RealCommands {
    fn run(&self, root: &HostRoot, program: &str, args: &[&str]) -> Result<String, String> {
        let out = Self::command(root, program, args)?
            .output()
            .map_err(|e| format!("running {program}: {e}"))?;
        finish(program, args, &out)
    }

    fn run_for(
        &self,
        root: &HostRoot,
        program: &str,
        args: &[&str],
        limit: std::time::Duration,
    ) -> Result<String, String> {
        use std::io::Read;
        use std::process::Stdio;
        let mut child = Self::command(root, program, args)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running {program}: {e}"))?;
        // Drained as they come, so a chatty program never blocks on a full pipe.
        let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
        let start = std::time::Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if start.elapsed() >= limit => {
                    // SIGKILL; a process in uninterruptible sleep dies when its
                    // call returns, and a reaper thread collects it then.
                    let _ = child.kill();
                    let _ = std::thread::Builder::new()
                        .name("reap".into())
                        .spawn(move || child.wait());
                    return Err(format!(
                        "{program} {}: killed after {:.1} s without an answer",
                        args.join(" "),
                        limit.as_secs_f64()
                    ));
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
                Err(e) => return Err(format!("waiting for {program}: {e}")),
            }
        };
        let out = std::process::Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        finish(program, args, &out)
    }
}

/// `Ok(stdout)` on exit status 0, else the stderr and status.
fn finish(program: &str, args: &[&str], out: &std::process::Output) -> Result<String, String> {
    {
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

    /// Review n11: a program that does not answer is killed at its limit,
    /// not left running with a thread waiting for it.
    #[test]
    fn a_hung_program_is_killed_at_its_limit() {
        let root = HostRoot::open(Path::new("/")).unwrap();
        let start = std::time::Instant::now();
        let e = RealCommands
            .run_for(
                &root,
                "sleep",
                &["30"],
                std::time::Duration::from_millis(200),
            )
            .unwrap_err();
        assert!(e.contains("killed after"), "{e}");
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        let out = RealCommands
            .run_for(&root, "echo", &["hi"], std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(out.trim(), "hi");
    }
}
