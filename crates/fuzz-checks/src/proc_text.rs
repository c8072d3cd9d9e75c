//! Target `proc_text`: the `/proc` text the holder scan reads, which any
//! process on the node (a tenant's pod with `hostPID`, or any host process)
//! controls: fd link targets, `fdinfo`, `comm`, `cmdline`, the `exe` link and
//! the mount namespace link, plus nvidia's `/proc/driver/nvidia/gpus/<BDF>/information`
//! and `/proc/devices` (a hostile or broken driver), read from a real fixture tree
//! by `preflight::device_nodes` and `preflight::scan_holders`.
//!
//! Input: a flag byte (bit 0: scan the GPU bound to vfio-pci instead of the one on
//! nvidia), then records: a selector byte, a 2-byte little-endian length and the
//! content. Selectors: nvidia's `information`; `/proc/devices`; a new process
//! (content: its `comm`); then for the newest process an fd link target (`@/`
//! at its start stands for the fixture root, so an input can name fixture nodes),
//! that fd's `fdinfo`, its `cmdline`, its `exe` link target, its `ns/mnt` link
//! target. At most 4 processes with 8 fds each.
//!
//! Properties:
//! - every nvidia node comes from a `Device Minor:` line with that decimal minor;
//! - every holder found is one of the fixture processes and holds one of the
//!   GPU's nodes, each node at most once per process;
//! - a process outside pid 1's mount namespace is never taken for
//!   nvidia-persistenced, nor one whose `exe` (or, without it, `argv[0]`) is
//!   another program, whatever its `comm` (security review L2);
//! - a failed scan fails closed: `find_holders` then reports one pid-0 holder;
//! - a holder's text (what the kubelet and the logs show) has no control
//!   characters: `comm` is the process's to choose.

use crate::input::records;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vfio_gpu_engine::preflight::{device_nodes, find_holders, scan_holders};
use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};
use vfio_gpu_host::{Bdf, HostRoot, PciFunction};

const NVIDIA_GPU: &str = "0000:65:00.0";
const VFIO_GPU: &str = "0000:66:00.0";
const HOST_MNT_NS: &str = "mnt:[4026531840]";
/// Pids of the processes an input creates (pid 1 is the fixture's init).
const FIRST_PID: u32 = 100;
const MAX_PROCESSES: u32 = 4;
const MAX_FDS: u32 = 8;

struct Host {
    path: PathBuf,
    root: HostRoot,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let path = crate::scratch::dir("proc_text");
        let _ = fs::remove_dir_all(&path);
        let mut fx = FixtureHost::create(&path).expect("fixture host");
        let nvidia: Bdf = NVIDIA_GPU.parse().expect("fixture address");
        let vfio: Bdf = VFIO_GPU.parse().expect("fixture address");
        fx.add_function(
            &FunctionSpec::new(nvidia, 0x10de, 0x2330, 0x03_0200)
                .driver("nvidia")
                .group(7),
        )
        .expect("fixture GPU");
        fx.add_function(
            &FunctionSpec::new(vfio, 0x10de, 0x2330, 0x03_0200)
                .driver("vfio-pci")
                .group(8),
        )
        .expect("fixture GPU");
        let init = path.join("proc/1/ns");
        fs::create_dir_all(&init).expect("fixture init");
        symlink(HOST_MNT_NS, init.join("mnt")).expect("fixture init namespace");
        let root = HostRoot::open(&path).expect("fixture root");
        Host { path, root }
    })
}

fn text(content: &[u8]) -> String {
    String::from_utf8_lossy(content).into_owned()
}

/// A symlink target from input bytes (no NUL, not empty), `@/` → the fixture root.
fn link_target(h: &Host, content: &[u8]) -> Option<PathBuf> {
    let t: Vec<u8> = content.iter().copied().filter(|b| *b != 0).collect();
    if t.is_empty() {
        return None;
    }
    use std::os::unix::ffi::OsStrExt;
    Some(match t.strip_prefix(b"@/") {
        Some(rest) => h.path.join(std::ffi::OsStr::from_bytes(rest)),
        None => PathBuf::from(std::ffi::OsStr::from_bytes(&t)),
    })
}

/// The fixture processes an input made: pid, its mount namespace link and
/// what `exe`/`cmdline` say, for the persistenced property.
struct Process {
    pid: u32,
    mnt: Option<PathBuf>,
    exe: Option<PathBuf>,
    cmdline: Option<Vec<u8>>,
}

fn basename_is_persistenced(s: &str) -> bool {
    let s = s.strip_suffix(" (deleted)").unwrap_or(s);
    s.rsplit('/').next() == Some("nvidia-persistenced")
}

/// Writes the input's records into the fixture's `/proc`; returns the processes.
fn build_proc(h: &Host, info: &Path, devices: &Path, rest: &[u8]) -> Vec<Process> {
    let mut procs: Vec<Process> = Vec::new();
    let mut fds = 0u32;
    for (sel, content) in records(rest) {
        match sel % 8 {
            0 => {
                fs::create_dir_all(info.parent().expect("parent")).expect("fixture procfs");
                fs::write(info, content).expect("writing information");
            }
            1 => fs::write(devices, content).expect("writing /proc/devices"),
            2 => {
                let Ok(n) = u32::try_from(procs.len()) else {
                    continue;
                };
                if n >= MAX_PROCESSES {
                    continue;
                }
                let pid = FIRST_PID + n;
                let dir = h.path.join(format!("proc/{pid}"));
                for d in ["fd", "fdinfo", "ns"] {
                    fs::create_dir_all(dir.join(d)).expect("fixture process");
                }
                fs::write(dir.join("comm"), content).expect("writing comm");
                procs.push(Process {
                    pid,
                    mnt: None,
                    exe: None,
                    cmdline: None,
                });
                fds = 0;
            }
            kind => {
                let Some(p) = procs.last_mut() else { continue };
                let dir = h.path.join(format!("proc/{}", p.pid));
                match kind {
                    3 => {
                        if fds >= MAX_FDS {
                            continue;
                        }
                        if let Some(t) = link_target(h, content) {
                            symlink(&t, dir.join(format!("fd/{fds}"))).expect("fd link");
                            fds += 1;
                        }
                    }
                    4 if fds > 0 => {
                        fs::write(dir.join(format!("fdinfo/{}", fds - 1)), content)
                            .expect("writing fdinfo");
                    }
                    5 => {
                        fs::write(dir.join("cmdline"), content).expect("writing cmdline");
                        p.cmdline = Some(content.to_vec());
                    }
                    6 => {
                        if let Some(t) = link_target(h, content) {
                            let _ = fs::remove_file(dir.join("exe"));
                            symlink(&t, dir.join("exe")).expect("exe link");
                            p.exe = Some(t);
                        }
                    }
                    7 => {
                        if let Some(t) = link_target(h, content) {
                            let _ = fs::remove_file(dir.join("ns/mnt"));
                            symlink(&t, dir.join("ns/mnt")).expect("ns link");
                            p.mnt = Some(t);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    procs
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let h = host();
    // A fresh /proc for every exec (pid 1 stays).
    for pid in FIRST_PID..FIRST_PID + MAX_PROCESSES {
        let _ = fs::remove_dir_all(h.path.join(format!("proc/{pid}")));
    }
    let info = h
        .path
        .join(format!("proc/driver/nvidia/gpus/{NVIDIA_GPU}/information"));
    let devices = h.path.join("proc/devices");
    let _ = fs::remove_file(&info);
    let _ = fs::remove_file(&devices);

    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let procs = build_proc(h, &info, &devices, rest);

    let gpu: Bdf = if flags & 1 == 0 { NVIDIA_GPU } else { VFIO_GPU }
        .parse()
        .expect("fixture address");
    let Ok(f) = PciFunction::read(&h.root, gpu) else {
        panic!("the fixture GPU does not read");
    };
    let nodes = device_nodes(&h.root, &f);
    let info_text = fs::read(&info).map(|t| text(&t)).unwrap_or_default();
    let dev = h.root.rel("dev");
    for n in &nodes {
        let Some(minor) = n
            .strip_prefix(&dev)
            .ok()
            .and_then(|r| r.to_str())
            .and_then(|r| r.strip_prefix("nvidia"))
        else {
            continue;
        };
        assert!(
            info_text
                .lines()
                .any(|l| l.strip_prefix("Device Minor:").is_some_and(|v| v
                    .trim()
                    .parse::<u32>()
                    .ok()
                    == minor.parse().ok())),
            "node /dev/nvidia{minor} without its Device Minor line"
        );
    }

    let shown: Vec<String> = nodes
        .iter()
        .map(|n| match n.strip_prefix(h.root.path()) {
            Ok(r) => format!("/{}", r.display()),
            Err(_) => n.display().to_string(),
        })
        .collect();
    match scan_holders(&h.root, &nodes) {
        Ok(holders) => {
            for (i, a) in holders.iter().enumerate() {
                let Some(p) = procs.iter().find(|p| p.pid == a.pid) else {
                    panic!("holder pid {} is no fixture process", a.pid);
                };
                assert!(
                    shown.contains(&a.node),
                    "{} holds {} which is not the GPU's",
                    a.pid,
                    a.node
                );
                assert!(
                    !holders[..i]
                        .iter()
                        .any(|b| b.pid == a.pid && b.node == a.node),
                    "{} listed twice for {}",
                    a.pid,
                    a.node
                );
                if a.is_nvidia_persistenced() {
                    assert_eq!(
                        p.mnt.as_deref(),
                        Some(Path::new(HOST_MNT_NS)),
                        "pid {} outside the host mount namespace taken for nvidia-persistenced",
                        a.pid
                    );
                    let by_exe = p
                        .exe
                        .as_ref()
                        .is_some_and(|e| basename_is_persistenced(&e.to_string_lossy()));
                    let by_argv0 = p.exe.is_none()
                        && p.cmdline.as_ref().is_some_and(|c| {
                            let argv0 = c.split(|b| *b == 0).next().unwrap_or_default();
                            basename_is_persistenced(&text(argv0))
                        });
                    assert!(
                        by_exe || by_argv0,
                        "pid {} taken for nvidia-persistenced by its comm {:?}",
                        a.pid,
                        a.comm
                    );
                }
                let line = a.to_string();
                assert!(
                    !line.chars().any(char::is_control),
                    "holder text {line:?} carries control characters"
                );
            }
        }
        Err(e) => {
            let found = find_holders(&h.root, &nodes);
            assert!(
                found.len() == 1 && found[0].pid == 0,
                "a failed scan ({e}) reported {found:?}"
            );
        }
    }
}
