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
        write_json_atomic(&path, &spec)?;
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
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), CdiError> {
    let io_err = |step, p: &Path| {
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
    write_bytes_atomic(path, &bytes).map_err(io_err("writing", path))
}

/// [`write_json_atomic`] for raw bytes. Neither the temporary file nor the target is
/// followed if it is a symlink (security review L4): the temporary is created with
/// `O_CREAT | O_EXCL | O_NOFOLLOW`, and the rename replaces a link at the target
/// rather than writing through it.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    // A retried prepare writes identical content: skip the fsyncs (about 12 ms each on
    // a plain ext4 disk). The existing file was renamed into place after an fsync, so
    // it is already durable. A symlink there is never ours: replace it.
    if read_nofollow(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let mut f = match create_new_nofollow(&tmp) {
        // Left by a crash of an earlier process with our pid, or planted: remove the
        // entry itself (a link, not its target) and try once more.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(&tmp)?;
            create_new_nofollow(&tmp)?
        }
        r => r?,
    };
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    drop(f);
    if result.is_err() {
        // The write's error is reported; a temp file left behind is only litter.
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn create_new_nofollow(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn read_nofollow(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
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

    /// L4: a symlink planted at the temporary name is not written through; the
    /// target ends up a regular file and the link's target is untouched.
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
        write_bytes_atomic(&target, b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&target).unwrap().is_file());
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert!(fs::symlink_metadata(&tmp).is_err(), "temp name left behind");
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
        write_bytes_atomic(&target, b"same").unwrap();
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
