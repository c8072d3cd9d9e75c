//! CDI specs for prepared claims: one transient spec per claim in the CDI root.
//!
//! Kind `<driver>/claim`, devices `<claimUID>-<deviceName>`, file
//! `<driver>-claim_<claimUID>.json`, written atomically. Device nodes are paths only:
//! the runtime fills in major/minor from the host node.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{IommuBackend, VfioDeviceConfig};

/// The CDI class of claim specs.
pub const CLAIM_CLASS: &str = "claim";
/// The legacy VFIO container (API) device.
pub const VFIO_API_DEVICE: &str = "/dev/vfio/vfio";
/// The iommufd API device.
pub const IOMMUFD_API_DEVICE: &str = "/dev/iommu";

/// One GPU of a claim, as the CDI spec needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdiGpu {
    /// Device name in the pool (`gpu-0000-ab-00-0`).
    pub device_name: String,
    /// Base request the device was allocated for.
    pub request: String,
    /// PCI address of the GPU function.
    pub bdf: String,
    /// IOMMU group number.
    pub iommu_group: Option<u32>,
    /// `vfioN` cdev names of the functions on vfio.
    pub vfio_devices: Vec<String>,
    /// Resolved opaque configuration.
    pub config: VfioDeviceConfig,
}

/// Errors writing or removing a spec.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    /// The spec cannot express this device.
    #[error("CDI spec for {device}: {message}")]
    Invalid {
        /// The CDI device name the spec was being built for.
        device: String,
        /// What the spec cannot express about it.
        message: String,
    },
    /// A filesystem step failed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// The file or directory the step acted on.
        path: PathBuf,
        /// The operating system's error for that step.
        source: io::Error,
    },
}

/// A CDI spec document (only the fields this driver writes).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// Minimum CDI version the content needs.
    pub cdi_version: String,
    /// `vendor/class`.
    pub kind: String,
    /// Devices.
    pub devices: Vec<Device>,
    /// Edits applied when any device of the spec is requested.
    #[serde(skip_serializing_if = "ContainerEdits::is_empty")]
    pub container_edits: ContainerEdits,
}

/// A CDI device.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// Name, unique in the spec.
    pub name: String,
    /// What requesting it does to the container.
    pub container_edits: ContainerEdits,
}

/// Container edits (subset).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    /// `KEY=VALUE` environment entries.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Device nodes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    /// Bind mounts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
}

impl ContainerEdits {
    fn is_empty(&self) -> bool {
        self.env.is_empty() && self.device_nodes.is_empty() && self.mounts.is_empty()
    }
}

/// A device node, by path only.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceNode {
    /// Path in the container (and on the host).
    pub path: String,
}

/// A bind mount.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    /// Host path.
    pub host_path: String,
    /// Path in the container.
    pub container_path: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// The lowest CDI version that accepts `devices`: names not starting with a letter
/// (claim UIDs often start with a digit) need 0.5.0. Runtimes reject versions newer
/// than they know, so never write more than needed.
pub fn minimum_version(devices: &[Device]) -> &'static str {
    if devices.iter().any(|d| {
        !d.name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
    }) {
        "0.5.0"
    } else {
        "0.3.0"
    }
}

/// Whether `s` is safe as a file-name component and a CDI device-name part: ASCII
/// alphanumerics and `-`, at most 64 characters (Kubernetes UIDs qualify).
pub fn is_safe_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Writes and removes the per-claim CDI specs of one driver.
#[derive(Debug, Clone)]
pub struct CdiWriter {
    root: PathBuf,
    driver: String,
}

impl CdiWriter {
    /// A writer for `driver` (the CDI vendor) into `root` (e.g. `/var/run/cdi`).
    pub fn new(root: impl Into<PathBuf>, driver: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            driver: driver.into(),
        }
    }

    /// The CDI root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<driver>/claim`.
    pub fn kind(&self) -> String {
        format!("{}/{CLAIM_CLASS}", self.driver)
    }

    /// CDI device name of a claim's device.
    pub fn device_name(claim_uid: &str, device: &str) -> String {
        format!("{claim_uid}-{device}")
    }

    /// Fully qualified CDI ID (`<driver>/claim=<uid>-<device>`).
    pub fn device_id(&self, claim_uid: &str, device: &str) -> String {
        format!("{}={}", self.kind(), Self::device_name(claim_uid, device))
    }

    /// Path of a claim's spec.
    pub fn spec_path(&self, claim_uid: &str) -> PathBuf {
        self.root
            .join(format!("{}-{CLAIM_CLASS}_{claim_uid}.json", self.driver))
    }

    /// Builds the spec for a claim's GPUs (pure; deterministic for a given input).
    pub fn build_spec(&self, claim_uid: &str, gpus: &[CdiGpu]) -> Result<Spec, CdiError> {
        let mut shared = ContainerEdits::default();
        let mut devices = Vec::with_capacity(gpus.len());
        for g in gpus {
            let invalid = |message: String| CdiError::Invalid {
                device: g.device_name.clone(),
                message,
            };
            let mut nodes = Vec::new();
            match g.config.iommu_backend {
                IommuBackend::Legacy => {
                    let group = g
                        .iommu_group
                        .ok_or_else(|| invalid("no IOMMU group".into()))?;
                    nodes.push(DeviceNode {
                        path: format!("/dev/vfio/{group}"),
                    });
                    if g.config.api_device {
                        push_unique(&mut shared.device_nodes, VFIO_API_DEVICE);
                    }
                }
                IommuBackend::Iommufd => {
                    if g.vfio_devices.is_empty() {
                        return Err(invalid(
                            "iommufd backend requested but the kernel has no /dev/vfio/devices cdev for it (needs Linux ≥ 6.6 with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV; Debian 12 kernels have neither)".into(),
                        ));
                    }
                    for v in &g.vfio_devices {
                        let numbered = v.strip_prefix("vfio").is_some_and(|n| {
                            !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())
                        });
                        if !numbered {
                            return Err(invalid(format!("unexpected vfio-dev name {v:?}")));
                        }
                        nodes.push(DeviceNode {
                            path: format!("/dev/vfio/devices/{v}"),
                        });
                    }
                    if g.config.api_device {
                        push_unique(&mut shared.device_nodes, IOMMUFD_API_DEVICE);
                    }
                }
            }
            devices.push(Device {
                name: Self::device_name(claim_uid, &g.device_name),
                container_edits: ContainerEdits {
                    // No PCI_RESOURCE_* env: KubeVirt's DRA path reads the device
                    // metadata, and the variable would collide across claims.
                    env: Vec::new(),
                    device_nodes: nodes,
                    mounts: Vec::new(),
                },
            });
        }
        shared.device_nodes.sort();
        Ok(Spec {
            cdi_version: minimum_version(&devices).to_string(),
            kind: self.kind(),
            devices,
            container_edits: shared,
        })
    }

    /// Builds and atomically writes a claim's spec; returns its path.
    pub fn write_claim(&self, claim_uid: &str, gpus: &[CdiGpu]) -> Result<PathBuf, CdiError> {
        let spec = self.build_spec(claim_uid, gpus)?;
        let path = self.spec_path(claim_uid);
        write_json_atomic(&self.root, &path, &spec)?;
        Ok(path)
    }

    /// Removes a claim's spec; absent is fine.
    pub fn remove_claim(&self, claim_uid: &str) -> Result<(), CdiError> {
        remove_if_exists(&self.spec_path(claim_uid))
    }
}

fn push_unique(nodes: &mut Vec<DeviceNode>, path: &str) {
    if !nodes.iter().any(|n| n.path == path) {
        nodes.push(DeviceNode { path: path.into() });
    }
}

/// Writes JSON atomically: a temporary name that runtimes ignore (not `*.json`), fsync,
/// rename over the target, fsync the directory. A runtime scanning the directory sees
/// the old file or the new one, never a torn one.
///
/// `value` is serialised as pretty JSON and written to `path`, a file
/// under the trusted directory `root` (created when missing). Every directory
/// between `root` and the file is created and opened relative to its parent's
/// descriptor with `O_NOFOLLOW` (security review L4), so a symlink planted in the
/// shared CDI or plugin directory cannot redirect the write.
pub fn write_json_atomic<T: Serialize>(
    root: &Path,
    path: &Path,
    value: &T,
) -> Result<(), CdiError> {
    let io_err = |step: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| CdiError::Io {
            step,
            path: p,
            source,
        }
    };
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| CdiError::Io {
        step: "serialising",
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    bytes.push(b'\n');
    write_bytes_atomic(root, path, &bytes).map_err(io_err("writing", path))
}

/// [`write_json_atomic`] for raw bytes. `root` itself is the admin's (it may be
/// reached through a symlink, as `/var/run` → `/run` is); below it nothing is
/// followed (security review L4): each parent directory is opened with
/// `openat(O_DIRECTORY | O_NOFOLLOW)` from the one before, the temporary file is
/// created there with `O_CREAT | O_EXCL | O_NOFOLLOW` under a name no other
/// process uses (pods without hostPID all have pid 1), and `renameat` replaces a
/// link at the target rather than writing through it.
pub fn write_bytes_atomic(root: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let rel = path.strip_prefix(root).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not under {}", path.display(), root.display()),
        )
    })?;
    let mut names = Vec::new();
    for c in rel.components() {
        match c {
            std::path::Component::Normal(n) => names.push(n),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: only plain names below {}",
                        path.display(),
                        root.display()
                    ),
                ));
            }
        }
    }
    let (file_name, parents) = names
        .split_last()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    fs::create_dir_all(root)?;
    let mut dir = dirfd::open_root(root)?;
    for name in parents {
        dir = dirfd::open_child_dir(&dir, name)?;
    }
    // A retried prepare writes identical content: skip the fsyncs (about 12 ms each on
    // a plain ext4 disk). The existing file was renamed into place after an fsync, so
    // it is already durable. A symlink there is never ours: replace it.
    if dirfd::read_nofollow(&dir, file_name).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let (tmp, mut f) = dirfd::create_temp(&dir, file_name)?;
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        dirfd::rename(&dir, &tmp, file_name)?;
        dirfd::sync(&dir)
    })();
    drop(f);
    if result.is_err() {
        // The write's error is reported; a temp file left behind is only litter.
        let _ = dirfd::unlink(&dir, &tmp);
    }
    result
}

/// Directory-descriptor-relative file operations for [`write_bytes_atomic`].
mod dirfd {
    use std::ffi::{CString, OsStr, OsString};
    use std::fs;
    use std::io::{self, Read};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn c_name(name: &OsStr) -> io::Result<CString> {
        CString::new(name.as_bytes()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "a path component holds a NUL")
        })
    }

    /// Wraps a returned descriptor, or the error the call set.
    fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn check(r: libc::c_int) -> io::Result<()> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The trusted root directory, opened as the admin named it.
    pub(super) fn open_root(root: &Path) -> io::Result<OwnedFd> {
        let c = c_name(root.as_os_str())?;
        // SAFETY: `c` is a NUL-terminated path.
        owned(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })
    }

    /// `name` in `dir`, created (0755) when missing, never a symlink.
    pub(super) fn open_child_dir(dir: &OwnedFd, name: &OsStr) -> io::Result<OwnedFd> {
        let c = c_name(name)?;
        // SAFETY: `dir` is an open directory, `c` a NUL-terminated name.
        if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        // SAFETY: as above.
        owned(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening directory {:?} without following links: {e}", name),
            )
        })
    }

    /// The whole content of `name` in `dir`, not through a symlink.
    pub(super) fn read_nofollow(dir: &OwnedFd, name: &OsStr) -> io::Result<Vec<u8>> {
        let c = c_name(name)?;
        // SAFETY: `dir` is an open directory, `c` a NUL-terminated name.
        let fd = owned(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        let mut out = Vec::new();
        fs::File::from(fd).read_to_end(&mut out)?;
        Ok(out)
    }

    /// A new temporary file beside `name` (`.<name>.<pid>.<nanos>.<n>.tmp`, 0644).
    /// The name is unique per process and call, and `O_EXCL | O_NOFOLLOW` refuses
    /// whatever already sits there, a planted link included: the next name is tried.
    pub(super) fn create_temp(dir: &OwnedFd, name: &OsStr) -> io::Result<(OsString, fs::File)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut last = None;
        for _ in 0..8 {
            let mut tmp = OsString::from(".");
            tmp.push(name);
            tmp.push(format!(
                ".{}.{nanos}.{}.tmp",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let c = c_name(&tmp)?;
            // SAFETY: `dir` is an open directory, `c` a NUL-terminated name.
            match owned(unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o644 as libc::c_uint,
                )
            }) {
                Ok(fd) => return Ok((tmp, fs::File::from(fd))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
    }

    /// `renameat(dir, from, dir, to)`.
    pub(super) fn rename(dir: &OwnedFd, from: &OsStr, to: &OsStr) -> io::Result<()> {
        let (f, t) = (c_name(from)?, c_name(to)?);
        // SAFETY: `dir` is an open directory, both names NUL-terminated.
        check(unsafe { libc::renameat(dir.as_raw_fd(), f.as_ptr(), dir.as_raw_fd(), t.as_ptr()) })
    }

    /// `unlinkat(dir, name)`.
    pub(super) fn unlink(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
        let c = c_name(name)?;
        // SAFETY: `dir` is an open directory, `c` a NUL-terminated name.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) })
    }

    /// fsync of the directory, so the rename is durable.
    pub(super) fn sync(dir: &OwnedFd) -> io::Result<()> {
        // SAFETY: `dir` is an open descriptor.
        check(unsafe { libc::fsync(dir.as_raw_fd()) })
    }
}

/// Removes a file, treating "not found" as success.
pub fn remove_if_exists(path: &Path) -> Result<(), CdiError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CdiError::Io {
            step: "removing",
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(name: &str, request: &str, bdf: &str, group: u32, backend: IommuBackend) -> CdiGpu {
        CdiGpu {
            device_name: name.into(),
            request: request.into(),
            bdf: bdf.into(),
            iommu_group: Some(group),
            vfio_devices: vec![format!("vfio{group}")],
            config: VfioDeviceConfig {
                iommu_backend: backend,
                api_device: true,
                consumer: None,
            },
        }
    }

    #[test]
    fn legacy_spec_shape_and_version() {
        let w = CdiWriter::new("/cdi", "vfio-gpu.dra.dev");
        let s = w
            .build_spec(
                "0a1b-uid",
                &[
                    gpu(
                        "gpu-0000-ab-00-0",
                        "gpu",
                        "0000:ab:00.0",
                        11,
                        IommuBackend::Legacy,
                    ),
                    gpu(
                        "gpu-0000-ba-00-0",
                        "gpu",
                        "0000:ba:00.0",
                        12,
                        IommuBackend::Legacy,
                    ),
                ],
            )
            .unwrap();
        assert_eq!(s.cdi_version, "0.5.0");
        assert_eq!(s.kind, "vfio-gpu.dra.dev/claim");
        assert_eq!(s.devices[0].name, "0a1b-uid-gpu-0000-ab-00-0");
        assert!(
            s.devices.iter().all(|d| d.container_edits.env.is_empty()),
            "no PCI_RESOURCE_* env: {s:?}"
        );
        assert_eq!(
            s.devices[1].container_edits.device_nodes[0].path,
            "/dev/vfio/12"
        );
        assert_eq!(
            s.container_edits.device_nodes,
            [DeviceNode {
                path: VFIO_API_DEVICE.into()
            }]
        );
        let s = w
            .build_spec("abc", &[gpu("g", "r", "b", 1, IommuBackend::Legacy)])
            .unwrap();
        assert_eq!(s.cdi_version, "0.3.0");
    }

    #[test]
    fn iommufd_needs_cdev() {
        let w = CdiWriter::new("/cdi", "d.example.com");
        let mut g = gpu("g", "r", "b", 3, IommuBackend::Iommufd);
        let s = w.build_spec("u", std::slice::from_ref(&g)).unwrap();
        assert_eq!(
            s.devices[0].container_edits.device_nodes[0].path,
            "/dev/vfio/devices/vfio3"
        );
        assert_eq!(s.container_edits.device_nodes[0].path, IOMMUFD_API_DEVICE);
        g.vfio_devices.clear();
        assert!(w.build_spec("u", &[g.clone()]).is_err());
        g.vfio_devices = vec!["../x".into()];
        assert!(w.build_spec("u", &[g]).is_err());
    }

    #[test]
    fn atomic_write_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let w = CdiWriter::new(dir.path(), "d.example.com");
        let p = w
            .write_claim("u1", &[gpu("g", "r", "b", 1, IommuBackend::Legacy)])
            .unwrap();
        assert_eq!(p.file_name().unwrap(), "d.example.com-claim_u1.json");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp files left: {names:?}");
        w.remove_claim("u1").unwrap();
        w.remove_claim("u1").unwrap();
        assert!(!p.exists());
    }

    /// L4: a symlink planted where a temporary file could go is not written
    /// through, and not removed either (it is not ours); the target ends up a
    /// regular file and the link's target is untouched.
    #[test]
    fn write_does_not_follow_a_symlink_planted_at_the_temp_path() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("spec.json");
        let tmp = dir
            .path()
            .join(format!(".spec.json.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_bytes_atomic(dir.path(), &target, b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&target).unwrap().is_file());
        assert_eq!(fs::read(&target).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "no temp file left behind: {names:?}");
    }

    /// M4 (no hostPID): every pod's plugin is pid 1, so the temporary name must be
    /// unique without the pid: two writers of one file never share it.
    #[test]
    fn temp_names_are_unique_within_one_pid() {
        let dir = tempfile::tempdir().unwrap();
        let fd = dirfd::open_root(dir.path()).unwrap();
        let name = std::ffi::OsStr::new("spec.json");
        let (a, _fa) = dirfd::create_temp(&fd, name).unwrap();
        let (b, _fb) = dirfd::create_temp(&fd, name).unwrap();
        assert_ne!(a, b);
        assert!(a.to_string_lossy().ends_with(".tmp"), "{a:?}");
    }

    /// L4: only plain names below the root: a path outside it, or with `..`, is
    /// refused before anything is created.
    #[test]
    fn write_refuses_a_path_outside_or_climbing_out_of_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for p in [dir.path().join("elsewhere.json"), root.join("../x.json")] {
            let e = write_bytes_atomic(&root, &p, b"x").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{p:?}: {e}");
        }
        assert!(!root.exists() && !dir.path().join("x.json").exists());
    }

    /// L4: a symlink at the target whose file already holds the bytes is not taken
    /// as our spec: it is replaced by a regular file, and its target is untouched.
    #[test]
    fn write_replaces_a_symlink_at_the_target_instead_of_trusting_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"same").unwrap();
        let target = dir.path().join("spec.json");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_bytes_atomic(dir.path(), &target, b"same").unwrap();
        assert!(
            fs::symlink_metadata(&target).unwrap().is_file(),
            "target is still a symlink"
        );
        assert_eq!(fs::read(&target).unwrap(), b"same");
        assert_eq!(fs::read(&victim).unwrap(), b"same");
    }

    #[test]
    fn safe_uid() {
        assert!(is_safe_uid("5f0c2e59-9b8e-4d8a-a3f1-0c2b7d3e9a11"));
        assert!(!is_safe_uid("../x"));
        assert!(!is_safe_uid(""));
        assert!(!is_safe_uid("a/b"));
    }
}
