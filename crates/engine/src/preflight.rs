//! Checks made before touching a GPU: which vfio driver, whether it is
//! loaded, and whether any process still holds the GPU's device nodes.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use serde::Serialize;
use vfio_gpu_host::{DriverName, HostRoot, PciFunction};

/// The vfio driver for a function: the `vfio_pci:` alias in
/// `lib/modules/<release>/modules.alias` that matches its modalias with the
/// fewest wildcards (a variant such as `nvgrace_gpu_vfio_pci`), else `vfio-pci`.
pub fn choose_vfio_driver(root: &HostRoot, f: &PciFunction) -> DriverName {
    let fallback = DriverName::vfio_pci;
    let Some(modalias) = f.modalias.as_deref().and_then(|m| m.strip_prefix("pci:")) else {
        return fallback();
    };
    let Ok(Some(path)) = root.modules_file("modules.alias") else {
        return fallback();
    };
    let Ok(Some(text)) = root.read_opt(&path) else {
        return fallback();
    };
    let mut best: Option<(usize, &str)> = None;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some("alias"), Some(pattern), Some(module)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let Some(pattern) = pattern.strip_prefix("vfio_pci:") else {
            continue;
        };
        if glob_match(pattern.as_bytes(), modalias.as_bytes()) {
            let wild = pattern.matches('*').count();
            if best.is_none_or(|(w, _)| wild < w) {
                best = Some((wild, module));
            }
        }
    }
    match best {
        Some((_, module)) => module_to_driver(root, module).unwrap_or_else(fallback),
        None => fallback(),
    }
}

/// Module names use `_`; driver directories may use `-` (vfio_pci → vfio-pci).
pub fn module_to_driver(root: &HostRoot, module: &str) -> Option<DriverName> {
    let exact = DriverName::new(module).ok()?;
    let dashed = DriverName::new(&module.replace('_', "-")).ok()?;
    for cand in [&exact, &dashed] {
        if root.pci_driver_dir(cand).is_dir() {
            return Some(cand.clone());
        }
    }
    // Not loaded: vfio_pci's directory is vfio-pci; variants keep underscores.
    Some(if module == "vfio_pci" { dashed } else { exact })
}

/// Shell-style `*` matching (the only wildcard in modules.alias patterns we need).
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == s[si] || p[pi] == b'?') {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
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
    /// The program it runs: basename of `/proc/<pid>/exe`, else of argv[0]
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
fn program_of(proc_dir: &std::path::Path) -> Option<String> {
    let base = |s: &str| {
        let s = s.strip_suffix(" (deleted)").unwrap_or(s);
        s.rsplit('/')
            .next()
            .filter(|b| !b.is_empty())
            .map(str::to_string)
    };
    if let Ok(target) = fs::read_link(proc_dir.join("exe"))
        && let Some(b) = base(&target.to_string_lossy())
    {
        return Some(b);
    }
    let cmdline = fs::read(proc_dir.join("cmdline")).ok()?;
    let argv0 = cmdline.split(|b| *b == 0).next()?;
    base(&String::from_utf8_lossy(argv0))
}

impl std::fmt::Display for NodeHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {}) holds {}", self.comm, self.pid, self.node)
    }
}

/// Device nodes through which a process uses this function on its current
/// driver: `/dev/nvidia<minor>` for nvidia, DRM nodes, `/dev/vfio/<group>`
/// and `/dev/vfio/devices/vfioN` for vfio.
pub fn device_nodes(root: &HostRoot, f: &PciFunction) -> Vec<PathBuf> {
    let mut nodes = Vec::new();
    if let Some(d) = &f.driver {
        if d.as_str() == "nvidia" {
            let info = root
                .rel("proc/driver/nvidia/gpus")
                .join(f.bdf.to_string())
                .join("information");
            if let Ok(Some(text)) = root.read_opt(&info) {
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("Device Minor:")
                        && let Ok(minor) = v.trim().parse::<u32>()
                    {
                        nodes.push(root.rel("dev").join(format!("nvidia{minor}")));
                    }
                }
            }
        }
        if d.is_vfio() {
            if let Some(g) = f.iommu_group {
                nodes.push(root.dev_vfio_group(g));
            }
            if let Some(v) = &f.vfio_dev {
                nodes.push(root.rel("dev/vfio/devices").join(v));
            }
        }
    }
    // DRM nodes of the function (card*, renderD*), whatever the driver.
    if let Ok(entries) = fs::read_dir(root.pci_attr(&f.bdf, "drm")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name.starts_with("card") || name.starts_with("renderD"))
                && !name.contains('/')
                && !name.contains("..")
            {
                nodes.push(root.rel("dev/dri").join(name));
            }
        }
    }
    nodes
}

/// Processes with an open fd on any of `nodes`, found by scanning
/// `proc/*/fd` under the host root (needs the host PID namespace). Char
/// devices compare by `st_rdev` (a container's private `/dev` node has the
/// same rdev), other files by device and inode.
pub fn find_holders(root: &HostRoot, nodes: &[PathBuf]) -> Vec<NodeHolder> {
    let mut wanted_rdev: HashSet<u64> = HashSet::new();
    let mut wanted_ino: HashSet<(u64, u64)> = HashSet::new();
    let mut names = std::collections::HashMap::new();
    for n in nodes {
        if let Ok(m) = fs::metadata(n) {
            if m.file_type().is_char_device() {
                wanted_rdev.insert(m.rdev());
                names.insert(("r", m.rdev(), 0), n.clone());
            } else {
                wanted_ino.insert((m.dev(), m.ino()));
                names.insert(("i", m.dev(), m.ino()), n.clone());
            }
        }
    }
    let mut out = Vec::new();
    if wanted_rdev.is_empty() && wanted_ino.is_empty() {
        return out;
    }
    let Ok(procs) = fs::read_dir(root.rel("proc")) else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // Processes come and go during the scan: skip what vanished.
            let Ok(m) = fs::metadata(fd.path()) else {
                continue;
            };
            let key = if m.file_type().is_char_device() && wanted_rdev.contains(&m.rdev()) {
                ("r", m.rdev(), 0)
            } else if wanted_ino.contains(&(m.dev(), m.ino())) {
                ("i", m.dev(), m.ino())
            } else {
                continue;
            };
            let comm = fs::read_to_string(p.path().join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            let node = names
                .get(&key)
                .map(|n| {
                    n.strip_prefix(root.path())
                        .map(|r| format!("/{}", r.display()))
                        .unwrap_or_else(|_| n.display().to_string())
                })
                .unwrap_or_default();
            out.push(NodeHolder {
                pid,
                comm,
                node,
                program: program_of(&p.path()),
            });
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globbing() {
        assert!(glob_match(
            b"v000010DEd*sv*sd*bc*sc*i*",
            b"v000010DEd00002941sv000010DEsd00001234bc03sc02i00"
        ));
        assert!(!glob_match(
            b"v000010DEd00002941sv*",
            b"v000010DEd00002330sv000010DE"
        ));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a*b*c", b"axxbyyc"));
        assert!(!glob_match(b"a*b*c", b"axxbyy"));
    }
}
