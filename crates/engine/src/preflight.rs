//! Checks made before touching a GPU: which vfio driver, whether it is
//! loaded, and whether any process still holds the GPU's device nodes.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
// Re-exported from where they live now (the host model), for existing callers.
use vfio_gpu_host::{DriverName, HostRoot, PciFunction};
pub use vfio_gpu_host::{ModuleAliases, module_to_driver};

/// The vfio driver for a function: the `vfio_pci:` alias in
/// `lib/modules/<release>/modules.alias` that matches its modalias with the
/// fewest wildcards (a variant such as `nvgrace_gpu_vfio_pci`), else `vfio-pci`.
pub fn choose_vfio_driver(root: &HostRoot, f: &PciFunction) -> DriverName {
    let fallback = DriverName::vfio_pci;
    let Some(modalias) = f.modalias.as_deref().and_then(|m| m.strip_prefix("pci:")) else {
        return fallback();
    };
    let Some(aliases) = ModuleAliases::read_vfio(root) else {
        return fallback();
    };
    match aliases.vfio_module(modalias) {
        Some(module) => module_to_driver(root, module).unwrap_or_else(fallback),
        None => fallback(),
    }
}

/// A process holding one of a GPU's device nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeHolder {
    /// Process id (host PID namespace).
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`, truncated by the kernel to 15
    /// characters): shown to people, never used to identify the process.
    pub comm: String,
    /// The node it holds.
    pub node: String,
    /// The program it runs: basename of `/proc/<pid>/exe`, else of `argv[0]`
    /// from `/proc/<pid>/cmdline`. Kept out of serialised (kubelet-visible)
    /// output.
    #[serde(skip)]
    pub program: Option<String>,
}

/// The daemon that keeps GPUs open while persistence mode is on.
const NVIDIA_PERSISTENCED: &str = "nvidia-persistenced";

impl NodeHolder {
    /// True when the holder is nvidia-persistenced, identified by its
    /// executable (its comm reads `nvidia-persiste`, which anything can set).
    pub fn is_nvidia_persistenced(&self) -> bool {
        self.program.as_deref() == Some(NVIDIA_PERSISTENCED)
    }
}

/// Basename of the program a process runs: the `exe` link (which the process
/// cannot fake), else argv[0]. `None` when neither is readable (kernel
/// threads, a process that just exited).
fn program_of(root: &HostRoot, proc_dir: &std::path::Path) -> Option<String> {
    // A container can run a binary named anything: a program is only named
    // when the process shares the host's mount namespace (that of pid 1),
    // where its executable is the host's own (security review L2).
    let host_ns = proc_dir
        .parent()
        .and_then(|procfs| root.read_link(&procfs.join("1/ns/mnt")).ok());
    if let Some(host_ns) = host_ns
        && root.read_link(&proc_dir.join("ns/mnt")).ok() != Some(host_ns)
    {
        return None;
    }
    let base = |s: &str| {
        let s = s.strip_suffix(" (deleted)").unwrap_or(s);
        s.rsplit('/')
            .next()
            .filter(|b| !b.is_empty())
            .map(str::to_string)
    };
    if let Ok(target) = root.read_link(&proc_dir.join("exe"))
        && let Some(b) = base(&target.to_string_lossy())
    {
        return Some(b);
    }
    // argv[0] is all we need; a page holds it.
    let cmdline = root
        .read_bytes_limited(&proc_dir.join("cmdline"), 4096)
        .ok()??;
    let argv0 = cmdline.split(|b| *b == 0).next()?;
    base(&String::from_utf8_lossy(argv0))
}

impl std::fmt::Display for NodeHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pid == 0 {
            // Fail-closed marker from find_holders: `node` says why.
            return write!(f, "holder scan failed: {}", self.node);
        }
        write!(f, "{} (pid {}) holds {}", self.comm, self.pid, self.node)
    }
}

/// Why the holder scan could not tell whether the GPU is in use. The scan
/// fails closed: the caller must treat the GPU as busy.
#[derive(Debug, thiserror::Error)]
pub enum HolderScanError {
    /// `/proc` (or a process's fd table) could not be read.
    #[error("reading {path}: {source}")]
    Proc {
        /// What could not be read.
        path: PathBuf,
        /// Why the read failed.
        #[source]
        source: std::io::Error,
    },
    /// A device node is missing and its device number cannot be derived.
    #[error("device node {node} is missing and its device number is unknown: {reason}")]
    Node {
        /// The node, as the host sees it.
        node: String,
        /// Why it could not be derived.
        reason: String,
    },
}

/// Device nodes through which a process uses this function on its current
/// driver: `/dev/nvidia<minor>` for nvidia, DRM nodes, ALSA nodes of an
/// audio function, `/dev/vfio/<group>` and `/dev/vfio/devices/vfioN` for vfio.
pub fn device_nodes(root: &HostRoot, f: &PciFunction) -> Vec<PathBuf> {
    device_nodes_with(root, f, &|p| root.read_opt(p).ok().flatten())
}

/// [`device_nodes`] with nvidia's procfs read by `read` (the engine passes
/// its kernel edge, so the read has a deadline and the simulator can block it).
pub fn device_nodes_with(
    root: &HostRoot,
    f: &PciFunction,
    read: &dyn Fn(&Path) -> Option<String>,
) -> Vec<PathBuf> {
    let mut nodes = Vec::new();
    if let Some(d) = &f.driver {
        if d.as_str() == "nvidia" {
            let info = root
                .rel("proc/driver/nvidia/gpus")
                .join(f.bdf.to_string())
                .join("information");
            if let Some(text) = read(&info) {
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("Device Minor:")
                        && let Ok(minor) = v.trim().parse::<u32>()
                    {
                        nodes.push(root.rel("dev").join(format!("nvidia{minor}")));
                    }
                }
            }
        }
        if f.on_vfio() {
            if let Some(g) = f.iommu_group {
                nodes.push(root.dev_vfio_group(g));
            }
            if let Some(v) = &f.vfio_dev {
                nodes.push(root.rel("dev/vfio/devices").join(v));
            }
        }
    }
    // DRM nodes of the function (card*, renderD*), whatever the driver.
    nodes.extend(
        child_names(root, &root.pci_attr(&f.bdf, "drm"))
            .into_iter()
            .filter(|n| n.starts_with("card") || n.starts_with("renderD"))
            .map(|n| root.rel("dev/dri").join(n)),
    );
    // ALSA nodes of an audio function (a sound server holding them makes
    // snd_hda_intel's unbind block): sound/card<N>/{controlC<N>,pcmC…,hwC…}.
    for card in child_names(root, &root.pci_attr(&f.bdf, "sound")) {
        if !card.starts_with("card") {
            continue;
        }
        let dir = root.pci_attr(&f.bdf, "sound").join(&card);
        nodes.extend(
            child_names(root, &dir)
                .into_iter()
                .filter(|n| {
                    ["controlC", "pcmC", "hwC", "midiC"]
                        .iter()
                        .any(|p| n.starts_with(p))
                })
                .map(|n| root.rel("dev/snd").join(n)),
        );
    }
    nodes
}

/// Names in a sysfs directory that are safe single path components.
fn child_names(root: &HostRoot, dir: &Path) -> Vec<String> {
    let Ok(entries) = root.read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.contains('/') && n != "." && n != ".." && !n.is_empty())
        .collect();
    names.sort();
    names
}

/// glibc's `makedev`.
fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

/// `major:minor` from a sysfs `dev` file.
fn sysfs_dev(root: &HostRoot, class: &str, name: &str) -> Option<u64> {
    let text = root
        .read_opt(&root.rel("sys/class").join(class).join(name).join("dev"))
        .ok()??;
    let (ma, mi) = text.trim().split_once(':')?;
    Some(makedev(ma.parse().ok()?, mi.parse().ok()?))
}

/// The character-device major of `name` in `/proc/devices`.
fn proc_devices_major(root: &HostRoot, names: &[&str]) -> Option<u64> {
    let text = root.read_opt(&root.rel("proc/devices")).ok()??;
    text.lines()
        .take_while(|l| !l.starts_with("Block devices"))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse::<u64>().ok()?, it.next()?))
        })
        .find(|(_, n)| names.contains(n))
        .map(|(m, _)| m)
}

/// What identifies a wanted node in an fd.
#[derive(Default)]
struct Wanted {
    /// Char devices by `st_rdev` (a container's private node has the same rdev).
    rdev: HashMap<u64, String>,
    /// Other files (fixtures) by device and inode.
    ino: HashMap<(u64, u64), String>,
    /// vfio device fds (`anon_inode:[vfio-device]`) by the BDF in fdinfo.
    vfio_bdf: HashMap<String, String>,
}

impl Wanted {
    fn is_empty(&self) -> bool {
        self.rdev.is_empty() && self.ino.is_empty() && self.vfio_bdf.is_empty()
    }
}

/// The node as the host sees it (`/dev/…`), for messages.
fn shown(root: &HostRoot, n: &Path) -> String {
    n.strip_prefix(root.path())
        .map(|r| format!("/{}", r.display()))
        .unwrap_or_else(|_| n.display().to_string())
}

/// Resolves the wanted nodes: stat the ones that exist; derive the device
/// number of missing ones from sysfs `dev` files or `/proc/devices`; the
/// BDFs behind vfio nodes, for device fds.
fn wanted(root: &HostRoot, nodes: &[PathBuf]) -> Result<Wanted, HolderScanError> {
    let mut w = Wanted::default();
    for n in nodes {
        let name = shown(root, n);
        let file = n
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = n.parent().map(|p| shown(root, p)).unwrap_or_default();
        // The functions a vfio node gives access to.
        if parent == "/dev/vfio"
            && let Ok(group) = file.parse::<u32>()
        {
            for b in child_names(root, &root.iommu_group_devices_dir(group)) {
                w.vfio_bdf.insert(b, name.clone());
            }
        } else if parent == "/dev/vfio/devices"
            && let Ok(dev) = root.canonicalize(&root.rel("sys/class/vfio-dev").join(&file))
            && let Some(b) = dev
                .parent()
                .and_then(Path::parent)
                .and_then(Path::file_name)
        {
            w.vfio_bdf
                .insert(b.to_string_lossy().into_owned(), name.clone());
        }
        match root.metadata(n) {
            Ok(m) if m.file_type().is_char_device() => {
                w.rdev.insert(m.rdev(), name);
            }
            Ok(m) => {
                w.ino.insert((m.dev(), m.ino()), name);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let class = match parent.as_str() {
                    "/dev/snd" => Some("sound"),
                    "/dev/dri" => Some("drm"),
                    "/dev/vfio" => Some("vfio"),
                    "/dev/vfio/devices" => Some("vfio-dev"),
                    _ => None,
                };
                let from_sysfs = class.and_then(|c| sysfs_dev(root, c, &file));
                let nvidia_minor = file
                    .strip_prefix("nvidia")
                    .and_then(|m| m.parse::<u64>().ok())
                    .filter(|_| parent == "/dev");
                if let Some(rdev) = from_sysfs {
                    w.rdev.insert(rdev, name);
                } else if let Some(minor) = nvidia_minor {
                    let major = proc_devices_major(root, &["nvidia-frontend", "nvidia"])
                        .ok_or_else(|| HolderScanError::Node {
                            node: name.clone(),
                            reason: "no nvidia major in /proc/devices".into(),
                        })?;
                    w.rdev.insert(makedev(major, minor), name);
                } else if class == Some("vfio") || class == Some("vfio-dev") {
                    // No group node (CONFIG_VFIO_GROUP=n) or cdev: device fds
                    // are still found through fdinfo.
                } else {
                    return Err(HolderScanError::Node {
                        node: name,
                        reason: e.to_string(),
                    });
                }
            }
            Err(e) => {
                return Err(HolderScanError::Node {
                    node: name,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(w)
}

/// Processes one scan worker is started for, at least.
const PROCS_PER_WORKER: usize = 64;

/// Processes with an open fd on any of `nodes`, found by scanning
/// `proc/*/fd` under the host root (needs the host PID namespace).
///
/// Fails closed: an unreadable `/proc` or fd table, or a node whose device
/// number cannot be known, is an error, never "no holders". Each fd is
/// first filtered by its link text (`/dev/…` or `anon_inode:[vfio…`), so a
/// file on a hung NFS or FUSE mount is never stat'ed.
pub fn scan_holders(
    root: &HostRoot,
    nodes: &[PathBuf],
) -> Result<Vec<NodeHolder>, HolderScanError> {
    let w = wanted(root, nodes)?;
    if w.is_empty() {
        return Ok(Vec::new());
    }
    let proc_dir = root.rel("proc");
    let proc_err = |path: &Path, source| HolderScanError::Proc {
        path: path.to_path_buf(),
        source,
    };
    let mut pids: Vec<(u32, PathBuf)> = Vec::new();
    for p in root
        .read_dir(&proc_dir)
        .map_err(|e| proc_err(&proc_dir, e))?
    {
        let p = p.map_err(|e| proc_err(&proc_dir, e))?;
        if let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() {
            pids.push((pid, p.path()));
        }
    }
    // Any pod on the node controls how many fds there are to look at (review
    // M1): the processes are shared out over the cores, each worker taking the
    // next one, so one process with 500 k fds does not hold up the rest.
    let dev_prefix = root.rel("dev");
    // A worker per PROCS_PER_WORKER processes at most: starting a thread costs
    // about as much as scanning that many small processes.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
        .min(pids.len().div_ceil(PROCS_PER_WORKER).max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut found = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some((pid, path)) = pids.get(i) else {
                return Ok(found);
            };
            found.extend(scan_process(root, *pid, path, &w, &dev_prefix)?);
        }
    };
    let results: Vec<Result<Vec<NodeHolder>, HolderScanError>> = if workers == 1 {
        vec![work()]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers).map(|_| scope.spawn(work)).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(HolderScanError::Proc {
                            path: proc_dir.clone(),
                            source: std::io::Error::other("a scan worker panicked"),
                        })
                    })
                })
                .collect()
        })
    };
    let mut out = Vec::new();
    for r in results {
        out.extend(r?);
    }
    out.sort_by_key(|h| h.pid);
    Ok(out)
}

/// Every wanted node one process holds (each once). Links are read relative
/// to the open fd directory (`readlinkat`), which spares the kernel a path
/// walk per descriptor.
fn scan_process(
    root: &HostRoot,
    pid: u32,
    proc_path: &Path,
    w: &Wanted,
    dev_prefix: &Path,
) -> Result<Vec<NodeHolder>, HolderScanError> {
    let mut held: Vec<NodeHolder> = Vec::new();
    let fd_dir = proc_path.join("fd");
    let proc_err = |source| HolderScanError::Proc {
        path: fd_dir.clone(),
        source,
    };
    let fds = match root.read_dir(&fd_dir) {
        Ok(fds) => fds,
        // Exited during the scan.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(held),
        Err(e) => return Err(proc_err(e)),
    };
    let dir = match root.open_file(&fd_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(held),
        Err(e) => return Err(proc_err(e)),
    };
    let mut buf = vec![0u8; 4096];
    for fd in fds.flatten() {
        // A descriptor closed meanwhile is gone (ENOENT); any other failure
        // (EACCES without CAP_SYS_PTRACE) hides what it points at, so the
        // scan fails closed instead of calling the process harmless.
        let target = match readlink_at(&dir, &fd.file_name(), &mut buf) {
            Ok(Some(target)) => target,
            Ok(None) => continue,
            Err(source) => {
                return Err(HolderScanError::Proc {
                    path: fd.path(),
                    source,
                });
            }
        };
        let target = Path::new(std::ffi::OsStr::from_bytes(target));
        let text = target.to_string_lossy();
        let hit = if text.starts_with("anon_inode:[vfio") {
            let info = proc_path.join("fdinfo").join(fd.file_name());
            root.read_limited(&info, 64 * 1024)
                .ok()
                .flatten()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("vfio-device-syspath:"))
                        .and_then(|s| s.trim().rsplit('/').next().map(str::to_string))
                        .and_then(|b| w.vfio_bdf.get(&b).cloned())
                })
        } else if text.starts_with("/dev/") || target.starts_with(dev_prefix) {
            // Only now stat the open file (a device node, never a mount).
            match root.metadata(&fd.path()) {
                Ok(m) if m.file_type().is_char_device() => w.rdev.get(&m.rdev()).cloned(),
                Ok(m) => w.ino.get(&(m.dev(), m.ino())).cloned(),
                Err(_) => None,
            }
        } else {
            None
        };
        if let Some(node) = hit
            && !held.iter().any(|h| h.node == node)
        {
            let comm = root
                .read_opt(&proc_path.join("comm"))
                .ok()
                .flatten()
                .map(|s| shown_comm(&s))
                .unwrap_or_else(|| "?".into());
            held.push(NodeHolder {
                pid,
                comm,
                node,
                program: program_of(root, proc_path),
            });
        }
    }
    Ok(held)
}

/// A process's `comm` as messages show it. Any process sets its own (`prctl`,
/// writing `/proc/self/comm`), so control characters become `?` and the text is
/// cut: a tenant must not be able to forge log lines or drive a terminal through
/// the "held by" message (found by the `proc_text` fuzz target).
fn shown_comm(raw: &str) -> String {
    raw.trim()
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Holders of `nodes` among `found` (a scan for more nodes): what
/// [`scan_holders`] of `nodes` alone would have answered.
pub fn holders_among(root: &HostRoot, found: &[NodeHolder], nodes: &[PathBuf]) -> Vec<NodeHolder> {
    let names: Vec<String> = nodes.iter().map(|n| shown(root, n)).collect();
    found
        .iter()
        .filter(|h| names.contains(&h.node))
        .cloned()
        .collect()
}

/// `readlinkat(dir, name)` into `buf`; `Ok(None)` when the link is gone
/// (ENOENT, ESRCH: the descriptor or the process ended).
fn readlink_at<'b>(
    dir: &fs::File,
    name: &std::ffi::OsStr,
    buf: &'b mut [u8],
) -> std::io::Result<Option<&'b [u8]>> {
    use std::os::fd::AsRawFd;
    let name = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `dir` is an open directory fd, `name` a NUL-terminated string,
    // and the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    match usize::try_from(n) {
        Ok(n) => Ok(buf.get(..n)),
        Err(_) => {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ESRCH) => Ok(None),
                _ => Err(e),
            }
        }
    }
}

/// [`scan_holders`] for callers that take a list: a failed scan is returned
/// as one holder with pid 0 whose `node` says why, so the GPU counts as
/// busy (fail closed) rather than free.
pub fn find_holders(root: &HostRoot, nodes: &[PathBuf]) -> Vec<NodeHolder> {
    scan_holders(root, nodes).unwrap_or_else(|e| {
        vec![NodeHolder {
            pid: 0,
            comm: String::new(),
            node: e.to_string(),
            program: None,
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};

    /// Found by the `proc_text` fuzz target: a holder's `comm` reached the
    /// "held by" message with escape sequences and newlines.
    #[test]
    fn a_holders_comm_is_shown_without_control_characters() {
        assert_eq!(shown_comm("\u{1b}[31mx\ny\n"), "?[31mx?y");
        assert_eq!(shown_comm("nvidia-persiste\n"), "nvidia-persiste");
        assert_eq!(shown_comm(&"a".repeat(100)).len(), 64);
    }

    /// A distribution kernel's modules.alias is about 1.3 MB and the
    /// `vfio_pci:` lines sit near its end (line 20117 of 26223 in Debian's
    /// 6.1): the variant must be found there, not only in the first page.
    #[test]
    fn a_variant_alias_deep_in_a_real_sized_modules_alias_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = FixtureHost::create(dir.path()).unwrap();
        let gpu = FunctionSpec::new("0000:01:00.0".parse().unwrap(), 0x10de, 0x2941, 0x030200);
        h.add_function(&gpu.clone().driver("nvidia").group(1))
            .unwrap();
        let mut text = String::new();
        for i in 0..26_000 {
            text.push_str(&format!(
                "alias pci:v0000ABCDd{i:08X}sv*sd*bc*sc*i* filler{i}\n"
            ));
        }
        assert!(text.len() > 1_000_000);
        text.push_str("alias vfio_pci:v000010DEd00002941sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci\n");
        text.push_str("alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n");
        h.write("lib/modules/6.1.0-fixture/modules.alias", &text)
            .unwrap();
        let root = HostRoot::open(dir.path()).unwrap();
        let f = PciFunction::read(&root, "0000:01:00.0".parse().unwrap()).unwrap();
        assert_eq!(
            choose_vfio_driver(&root, &f).as_str(),
            "nvgrace_gpu_vfio_pci"
        );
    }
}
