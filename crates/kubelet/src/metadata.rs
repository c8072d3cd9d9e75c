//! KEP-5304 device metadata, the file KubeVirt's virt-launcher reads to find the PCI
//! address of each GPU it got through DRA.
//!
//! Per prepared request this writes, like the Go helper
//! (`k8s.io/dynamic-resource-allocation/kubeletplugin`, `metadataWriter`, 1.37):
//! - a JSON stream with one `DeviceMetadata` object per API version, newest first
//!   (`metadata.resource.k8s.io/v1beta1`, then `v1alpha1`), each pretty-printed as Go
//!   does and followed by a newline, under the plugin data directory. Readers take the
//!   first object whose version they know: KubeVirt ≥ 1.8.3 knows only `v1alpha1`
//!   (`pkg/dra/metadata/types.go`) and skips the `v1beta1` one; the 1.36 Go reader
//!   does the same; 1.37 readers take `v1beta1`;
//! - a CDI spec (kind `<driver>/metadata`, device `<claimUID>_<request>`) that
//!   bind-mounts it read-only at
//!   `/var/run/kubernetes.io/dra-device-attributes/resourceclaims/<claim>/<request>/<driver>-metadata.json`
//!   or, for claims made from a template (annotation
//!   `resource.kubernetes.io/pod-claim-name`),
//!   `.../resourceclaimtemplates/<podClaimName>/<request>/<driver>-metadata.json`.
//!
//! Optionally ([`MetadataWriter::with_legacy_kubevirt_path`]) the same CDI device also
//! mounts a single `v1alpha1` object at
//! `/var/run/dra-device-attributes/<claim>/<request>/<driver>-metadata.json`, where
//! KubeVirt 1.8.0–1.8.2 look (they parse the whole file as one object, so it cannot be
//! the stream, and find template claims by `podClaimName` under the claim's own name).
//!
//! One deliberate difference: the host directory is `<ns>_<claim>_<uid>` instead of
//! the helper's `<ns>_<claim>`, so unpreparing a replaced claim (same name, new UID)
//! can never delete the files of its successor. The host path is not part of the
//! protocol; only the container path is.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use k8s_openapi::api::resource::v1::DeviceAttribute;
use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};

use crate::cdi::{self, CdiError, ContainerEdits, Device, Mount, Spec};

/// `metadata.resource.k8s.io/v1beta1` (Kubernetes 1.37 and later readers).
pub const METADATA_V1BETA1: &str = "metadata.resource.k8s.io/v1beta1";
/// `metadata.resource.k8s.io/v1alpha1` (Kubernetes 1.36 readers, every KubeVirt).
pub const METADATA_V1ALPHA1: &str = "metadata.resource.k8s.io/v1alpha1";
/// The versions of the stream, in file order: newest first, as the Go helper is
/// configured (readers take the first they know).
pub const METADATA_API_VERSIONS: [&str; 2] = [METADATA_V1BETA1, METADATA_V1ALPHA1];
/// Kind of the metadata objects written.
pub const METADATA_KIND: &str = "DeviceMetadata";
/// Where metadata appears in containers.
pub const CONTAINER_ROOT: &str = "/var/run/kubernetes.io/dra-device-attributes";
/// Where KubeVirt 1.8.0–1.8.2 look for it (`pkg/dra/utils.go`
/// `DefaultMetadataBasePath` at v1.8.2).
pub const LEGACY_KUBEVIRT_CONTAINER_ROOT: &str = "/var/run/dra-device-attributes";
/// Annotation on claims generated from a pod's ResourceClaimTemplate.
pub const POD_CLAIM_NAME_ANNOTATION: &str = "resource.kubernetes.io/pod-claim-name";
/// Sub-directory of the plugin data directory holding metadata files.
pub const HOST_SUBDIR: &str = "dra-device-metadata";
/// CDI class of the metadata mount specs.
pub const METADATA_CLASS: &str = "metadata";

/// The claim a metadata file describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimIdentity {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// `pod.spec.resourceClaims[].name` for template-generated claims.
    pub pod_claim_name: Option<String>,
}

/// One device of a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetadataDevice {
    /// Driver name.
    pub driver: String,
    /// Pool name.
    pub pool: String,
    /// Device name.
    pub name: String,
    /// Attributes by qualified name: the ResourceSlice attributes of the device
    /// ([`crate::slices::device_attributes`]), in the API's own type.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, DeviceAttribute>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceMetadata<'a> {
    kind: &'static str,
    api_version: &'a str,
    metadata: ObjectMeta<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_claim_name: Option<&'a str>,
    requests: Vec<RequestMetadata<'a>>,
}

#[derive(Serialize)]
struct ObjectMeta<'a> {
    name: &'a str,
    namespace: &'a str,
    uid: &'a str,
    generation: i64,
}

#[derive(Serialize)]
struct RequestMetadata<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "<[MetadataDevice]>::is_empty")]
    devices: &'a [MetadataDevice],
}

/// `serde_json`'s pretty printer with Go's string escaping: `encoding/json` (which the
/// Go helper's serializer uses through `json.MarshalIndent`) writes `<`, `>`, `&`,
/// U+2028 and U+2029 as `\u003c`-style escapes. Both forms decode the same; this
/// keeps the bytes identical to the helper's.
struct GoFormatter(PrettyFormatter<'static>);

impl Formatter for GoFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}') {
                writer.write_all(&fragment.as_bytes()[start..i])?;
                write!(writer, "\\u{:04x}", u32::from(c))?;
                start = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W, f: bool) -> io::Result<()> {
        self.0.begin_array_value(w, f)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, f: bool) -> io::Result<()> {
        self.0.begin_object_key(w, f)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_value(w)
    }
}

/// One object as Go's `json.MarshalIndent(v, "", "  ")` writes it, plus the newline
/// the helper puts after each object of the stream.
fn go_pretty<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    let mut ser = serde_json::Serializer::with_formatter(
        &mut *out,
        GoFormatter(PrettyFormatter::with_indent(b"  ")),
    );
    // Strings, integers and maps with string keys into a Vec cannot fail.
    let _ = value.serialize(&mut ser);
    out.push(b'\n');
}

/// Errors writing metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A name from the claim cannot be used as a path component.
    #[error("{what} {value:?} cannot be used in a metadata path")]
    UnsafeName {
        /// Which of the claim's names it is (`namespace`, `request`, `pod claim name`…).
        what: &'static str,
        /// The name as the claim holds it.
        value: String,
    },
    /// A path built from the claim's names exceeds `NAME_MAX` or `PATH_MAX`.
    #[error("metadata path {path} is too long: {why}")]
    PathTooLong {
        /// The metadata path that would have been built.
        path: PathBuf,
        /// Which limit it exceeds (`NAME_MAX` for a component, `PATH_MAX` for the whole).
        why: String,
    },
    /// Writing the file or its CDI spec failed.
    #[error(transparent)]
    Cdi(#[from] CdiError),
}

/// Whether `s` is a safe single path component of Kubernetes-name shape
/// (lower-case alphanumerics, `-`, `.`; not `.`/`..`).
pub fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// Longest file-name component Linux accepts (`NAME_MAX`), in bytes.
pub const NAME_MAX: usize = 255;
/// Longest path Linux accepts (`PATH_MAX`), in bytes, including the final NUL.
pub const PATH_MAX: usize = 4096;

/// The host directory name of a claim's metadata: `<ns>_<name>_<uid>`, with the
/// `<ns>_<name>` part cut to fit [`NAME_MAX`] (a 253-byte claim name is valid in
/// Kubernetes; security review M2). The UID alone makes it unique, and removal finds
/// it by the `_<uid>` suffix; readers find the file through the CDI mount, never by
/// this name.
pub fn claim_dir_name(claim: &ClaimIdentity) -> String {
    let mut prefix = format!("{}_{}", claim.namespace, claim.name);
    let room = NAME_MAX.saturating_sub(claim.uid.len() + 1);
    if prefix.len() > room {
        let mut cut = room;
        while !prefix.is_char_boundary(cut) {
            cut -= 1;
        }
        prefix.truncate(cut);
    }
    format!("{prefix}_{}", claim.uid)
}

/// Checks that `path` fits the kernel's limits: every component at most
/// [`NAME_MAX`] bytes, the whole below [`PATH_MAX`].
pub fn check_path_limits(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().len() >= PATH_MAX {
        return Err(format!(
            "path is {} bytes, the limit is {}",
            path.as_os_str().len(),
            PATH_MAX - 1
        ));
    }
    for c in path.components() {
        let len = c.as_os_str().as_bytes().len();
        if len > NAME_MAX {
            return Err(format!(
                "a path component is {len} bytes, the limit is {NAME_MAX}"
            ));
        }
    }
    Ok(())
}

/// Writes and removes KEP-5304 metadata files and their CDI mount specs.
#[derive(Debug, Clone)]
pub struct MetadataWriter {
    driver: String,
    data_dir: PathBuf,
    cdi_root: PathBuf,
    legacy_kubevirt: bool,
}

impl MetadataWriter {
    /// A writer for `driver`, with files under `<data_dir>/dra-device-metadata` and
    /// specs in `cdi_root`.
    pub fn new(
        driver: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        cdi_root: impl Into<PathBuf>,
    ) -> Self {
        Self {
            driver: driver.into(),
            data_dir: data_dir.into(),
            cdi_root: cdi_root.into(),
            legacy_kubevirt: false,
        }
    }

    /// Also mount a single-object `v1alpha1` file where KubeVirt 1.8.0–1.8.2 read it
    /// ([`LEGACY_KUBEVIRT_CONTAINER_ROOT`]); off by default (KubeVirt ≥ 1.8.3 reads
    /// the KEP-5304 path).
    pub fn with_legacy_kubevirt_path(mut self, on: bool) -> Self {
        self.legacy_kubevirt = on;
        self
    }

    fn claim_dir(&self, claim: &ClaimIdentity) -> PathBuf {
        self.data_dir.join(HOST_SUBDIR).join(claim_dir_name(claim))
    }

    /// Host path of a request's metadata file.
    pub fn host_file(&self, claim: &ClaimIdentity, base_request: &str) -> PathBuf {
        self.claim_dir(claim)
            .join(base_request)
            .join("metadata.json")
    }

    /// Host path of a request's single-object file for KubeVirt 1.8.0–1.8.2.
    pub fn legacy_host_file(&self, claim: &ClaimIdentity, base_request: &str) -> PathBuf {
        self.claim_dir(claim)
            .join(base_request)
            .join("metadata-v1alpha1.json")
    }

    /// Where KubeVirt 1.8.0–1.8.2 look: `<root>/<claim>/<request>/*-metadata.json`,
    /// with the claim's own name for template claims too (they match `podClaimName`
    /// inside the file).
    pub fn legacy_container_file(&self, claim: &ClaimIdentity, base_request: &str) -> String {
        format!(
            "{LEGACY_KUBEVIRT_CONTAINER_ROOT}/{}/{base_request}/{}-metadata.json",
            claim.name, self.driver
        )
    }

    /// Path of the metadata file inside the container.
    pub fn container_file(&self, claim: &ClaimIdentity, base_request: &str) -> String {
        let file = format!("{}-metadata.json", self.driver);
        match claim.pod_claim_name.as_deref().filter(|p| !p.is_empty()) {
            Some(pod_claim) => {
                format!("{CONTAINER_ROOT}/resourceclaimtemplates/{pod_claim}/{base_request}/{file}")
            }
            None => format!(
                "{CONTAINER_ROOT}/resourceclaims/{}/{base_request}/{file}",
                claim.name
            ),
        }
    }

    /// Path of the CDI spec mounting a request's metadata.
    pub fn spec_path(&self, claim_uid: &str, base_request: &str) -> PathBuf {
        self.cdi_root.join(format!(
            "{}_{METADATA_CLASS}_{claim_uid}_{base_request}.json",
            self.driver
        ))
    }

    /// CDI ID of a request's metadata mount.
    pub fn device_id(&self, claim_uid: &str, base_request: &str) -> String {
        format!(
            "{}/{METADATA_CLASS}={claim_uid}_{base_request}",
            self.driver
        )
    }

    /// The metadata stream for one request (`request_ref` may be `main/sub`; it is
    /// recorded in full inside the file): one object per [`METADATA_API_VERSIONS`].
    pub fn render(
        &self,
        claim: &ClaimIdentity,
        request_ref: &str,
        devices: &[MetadataDevice],
    ) -> Vec<u8> {
        self.render_versions(claim, request_ref, devices, &METADATA_API_VERSIONS)
    }

    /// The single `v1alpha1` object KubeVirt 1.8.0–1.8.2 can parse.
    pub fn render_legacy(
        &self,
        claim: &ClaimIdentity,
        request_ref: &str,
        devices: &[MetadataDevice],
    ) -> Vec<u8> {
        self.render_versions(claim, request_ref, devices, &[METADATA_V1ALPHA1])
    }

    fn render_versions(
        &self,
        claim: &ClaimIdentity,
        request_ref: &str,
        devices: &[MetadataDevice],
        versions: &[&'static str],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        for api_version in versions {
            let doc = DeviceMetadata {
                kind: METADATA_KIND,
                api_version,
                metadata: ObjectMeta {
                    name: &claim.name,
                    namespace: &claim.namespace,
                    uid: &claim.uid,
                    // Written once per prepare with identical content: a retried
                    // prepare must not look like an update.
                    generation: 1,
                },
                pod_claim_name: claim.pod_claim_name.as_deref(),
                requests: vec![RequestMetadata {
                    name: request_ref,
                    devices,
                }],
            };
            go_pretty(&doc, &mut out);
        }
        out
    }

    /// Writes the metadata file and CDI mount spec of one request; returns the CDI ID
    /// to add to every device of that request.
    pub fn write_request(
        &self,
        claim: &ClaimIdentity,
        request_ref: &str,
        devices: &[MetadataDevice],
    ) -> Result<String, MetadataError> {
        let base = crate::config::base_request(request_ref);
        self.check_names(claim, base)?;
        let file = self.host_file(claim, base);
        cdi::write_bytes_atomic(
            &self.data_dir,
            &file,
            &self.render(claim, request_ref, devices),
        )
        .map_err(|source| CdiError::Io {
            step: "writing metadata",
            path: file.clone(),
            source,
        })?;
        let mut mounts = vec![Mount {
            host_path: file.to_string_lossy().into_owned(),
            container_path: self.container_file(claim, base),
            options: vec!["ro".into(), "bind".into()],
        }];
        if self.legacy_kubevirt {
            let legacy = self.legacy_host_file(claim, base);
            cdi::write_bytes_atomic(
                &self.data_dir,
                &legacy,
                &self.render_legacy(claim, request_ref, devices),
            )
            .map_err(|source| CdiError::Io {
                step: "writing metadata",
                path: legacy.clone(),
                source,
            })?;
            mounts.push(Mount {
                host_path: legacy.to_string_lossy().into_owned(),
                container_path: self.legacy_container_file(claim, base),
                options: vec!["ro".into(), "bind".into()],
            });
        }
        let device = Device {
            name: format!("{}_{base}", claim.uid),
            container_edits: ContainerEdits {
                mounts,
                ..ContainerEdits::default()
            },
        };
        let devices = vec![device];
        let spec = Spec {
            cdi_version: cdi::minimum_version(&devices).to_string(),
            kind: format!("{}/{METADATA_CLASS}", self.driver),
            devices,
            container_edits: ContainerEdits::default(),
        };
        cdi::write_json_atomic(&self.cdi_root, &self.spec_path(&claim.uid, base), &spec)?;
        Ok(self.device_id(&claim.uid, base))
    }

    /// Checks every claim-supplied name that becomes a path component or CDI name;
    /// prepare calls it before the first host change so bad names change nothing.
    pub fn check_names(
        &self,
        claim: &ClaimIdentity,
        base_request: &str,
    ) -> Result<(), MetadataError> {
        let unsafe_name = |what, value: &str| MetadataError::UnsafeName {
            what,
            value: value.to_string(),
        };
        if !is_safe_name(&claim.namespace) {
            return Err(unsafe_name("namespace", &claim.namespace));
        }
        if !is_safe_name(&claim.name) {
            return Err(unsafe_name("claim name", &claim.name));
        }
        if !cdi::is_safe_uid(&claim.uid) {
            return Err(unsafe_name("claim UID", &claim.uid));
        }
        if !is_safe_name(base_request) {
            return Err(unsafe_name("request name", base_request));
        }
        if let Some(p) = &claim.pod_claim_name
            && !p.is_empty()
            && !is_safe_name(p)
        {
            return Err(unsafe_name("pod claim name", p));
        }
        // Every path built from these names must fit the kernel's limits, or the
        // write fails after the GPU has moved (security review M2).
        let container_file = self.container_file(claim, base_request);
        let legacy_container_file = self.legacy_container_file(claim, base_request);
        let paths = [
            self.host_file(claim, base_request),
            self.legacy_host_file(claim, base_request),
            self.spec_path(&claim.uid, base_request),
            PathBuf::from(container_file),
            PathBuf::from(legacy_container_file),
        ];
        for path in &paths {
            check_path_limits(path).map_err(|why| MetadataError::PathTooLong {
                path: path.clone(),
                why,
            })?;
        }
        Ok(())
    }

    /// Removes every metadata file and mount spec of a claim, by UID alone (the claim
    /// object may be gone). Absent files are fine.
    pub fn remove_claim(&self, claim_uid: &str) -> Result<(), MetadataError> {
        if !cdi::is_safe_uid(claim_uid) {
            return Err(MetadataError::UnsafeName {
                what: "claim UID",
                value: claim_uid.to_string(),
            });
        }
        let dir = self.data_dir.join(HOST_SUBDIR);
        // Listing through a planted link would remove another directory's
        // entries (security review L4): the metadata directory is never a link.
        if fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(CdiError::Io {
                step: "removing metadata",
                path: dir,
                source: io::Error::other("is a symlink, not the plugin's directory"),
            }
            .into());
        }
        let suffix = format!("_{claim_uid}");
        for entry in read_dir_or_empty(&dir)? {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(&suffix) {
                let path = entry.path();
                match fs::remove_dir_all(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(CdiError::Io {
                            step: "removing metadata",
                            path,
                            source,
                        }
                        .into());
                    }
                }
            }
        }
        let prefix = format!("{}_{METADATA_CLASS}_{claim_uid}_", self.driver);
        for entry in read_dir_or_empty(&self.cdi_root)? {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".json") {
                cdi::remove_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }
}

fn read_dir_or_empty(dir: &Path) -> Result<Vec<fs::DirEntry>, CdiError> {
    let io_err = |source| CdiError::Io {
        step: "listing",
        path: dir.to_path_buf(),
        source,
    };
    match fs::read_dir(dir) {
        Ok(rd) => rd.collect::<Result<Vec<_>, _>>().map_err(io_err),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(pod_claim: Option<&str>) -> ClaimIdentity {
        ClaimIdentity {
            namespace: "vms".into(),
            name: "vm-1-gpu-x7k2p".into(),
            uid: "7d6c7a3e-0000-4000-8000-000000000001".into(),
            pod_claim_name: pod_claim.map(String::from),
        }
    }

    fn dev() -> MetadataDevice {
        MetadataDevice {
            driver: "vfio-gpu.dra.dev".into(),
            pool: "node-a".into(),
            name: "gpu-0000-ab-00-0".into(),
            attributes: BTreeMap::from([(
                "resource.kubernetes.io/pciBusID".to_string(),
                DeviceAttribute {
                    string: Some("0000:ab:00.0".into()),
                    ..Default::default()
                },
            )]),
        }
    }

    /// The claim and device of the golden files in `tests/data`, which
    /// `tests/k8s/metadata-golden` wrote with the upstream Go types and codec
    /// (`k8s.io/dynamic-resource-allocation` v0.37.2).
    fn golden_device() -> MetadataDevice {
        let info = crate::slices::DeviceInfo {
            bdf: "0000:ab:00.0".parse().unwrap(),
            vendor: 0x10de,
            device: 0x26b1,
            product_name: Some("AD102GL [RTX 6000 Ada] <A&B>".into()),
            driver: Some("nvidia".into()),
            iommu_group: 11,
            numa_node: Some(1),
            pcie_root: Some("pci0000:a0".into()),
            keep_on_vfio: false,
            bar_bytes: 0,
            bar_prefetchable64_bytes: 0,
            fabric: None,
            quarantine: None,
            unhealthy: None,
        };
        MetadataDevice {
            driver: "vfio-gpu.dra.dev".into(),
            pool: "node-a".into(),
            name: "gpu-0000-ab-00-0".into(),
            attributes: crate::slices::device_attributes(&info),
        }
    }

    #[track_caller]
    fn assert_same_bytes(ours: &[u8], golden: &[u8]) {
        assert!(
            ours == golden,
            "differs from the Go encoding:\n--- ours\n{}\n--- Go\n{}",
            String::from_utf8_lossy(ours),
            String::from_utf8_lossy(golden)
        );
    }

    #[test]
    fn stream_is_byte_identical_to_the_go_helpers() {
        let w = MetadataWriter::new("vfio-gpu.dra.dev", "/data", "/cdi");
        assert_same_bytes(
            &w.render(&claim(Some("gpu")), "gpu", &[golden_device()]),
            include_bytes!("../tests/data/metadata-template-claim.json"),
        );
        assert_same_bytes(
            &w.render(&claim(None), "gpu", &[golden_device()]),
            include_bytes!("../tests/data/metadata-direct-claim.json"),
        );
        assert_same_bytes(
            &w.render_legacy(&claim(Some("gpu")), "gpu", &[golden_device()]),
            include_bytes!("../tests/data/metadata-legacy-kubevirt.json"),
        );
    }

    #[test]
    fn stream_holds_v1beta1_then_v1alpha1_with_the_full_request_ref() {
        let w = MetadataWriter::new("vfio-gpu.dra.dev", "/data", "/cdi");
        let bytes = w.render(&claim(Some("gpu")), "gpu/big", &[dev()]);
        let objects: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&bytes)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        let versions: Vec<&str> = objects
            .iter()
            .map(|o| o["apiVersion"].as_str().unwrap())
            .collect();
        assert_eq!(versions, METADATA_API_VERSIONS);
        for v in &objects {
            assert_eq!(v["kind"], "DeviceMetadata");
            assert_eq!(v["requests"][0]["name"], "gpu/big");
            assert_eq!(v["requests"][0]["devices"][0]["pool"], "node-a");
        }
        // The two objects differ in apiVersion only.
        let mut a = objects[0].clone();
        a["apiVersion"] = objects[1]["apiVersion"].clone();
        assert_eq!(a, objects[1]);
        // The legacy file is one object: KubeVirt 1.8.2 unmarshals the whole file.
        let legacy = w.render_legacy(&claim(Some("gpu")), "gpu/big", &[dev()]);
        let one: serde_json::Value = serde_json::from_slice(&legacy).unwrap();
        assert_eq!(one["apiVersion"], METADATA_V1ALPHA1);
        assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_err());
    }

    #[test]
    fn container_paths() {
        let w = MetadataWriter::new("vfio-gpu.dra.dev", "/data", "/cdi");
        assert_eq!(
            w.container_file(&claim(None), "gpu"),
            "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/vm-1-gpu-x7k2p/gpu/vfio-gpu.dra.dev-metadata.json"
        );
        assert_eq!(
            w.container_file(&claim(Some("gpu")), "gpu"),
            "/var/run/kubernetes.io/dra-device-attributes/resourceclaimtemplates/gpu/gpu/vfio-gpu.dra.dev-metadata.json"
        );
    }

    #[test]
    fn write_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let w = MetadataWriter::new(
            "vfio-gpu.dra.dev",
            dir.path().join("data"),
            dir.path().join("cdi"),
        );
        let c = claim(None);
        let id = w.write_request(&c, "gpu", &[dev()]).unwrap();
        assert_eq!(
            id,
            "vfio-gpu.dra.dev/metadata=7d6c7a3e-0000-4000-8000-000000000001_gpu"
        );
        assert!(w.host_file(&c, "gpu").exists());
        assert!(w.spec_path(&c.uid, "gpu").exists());
        assert!(
            !w.legacy_host_file(&c, "gpu").exists(),
            "legacy file is opt-in"
        );
        let w = w.with_legacy_kubevirt_path(true);
        w.write_request(&c, "gpu", &[dev()]).unwrap();
        let legacy = w.legacy_host_file(&c, "gpu");
        assert!(legacy.exists());
        let spec: serde_json::Value =
            serde_json::from_slice(&fs::read(w.spec_path(&c.uid, "gpu")).unwrap()).unwrap();
        let mounts = &spec["devices"][0]["containerEdits"]["mounts"];
        assert_eq!(
            mounts[1]["containerPath"],
            "/var/run/dra-device-attributes/vm-1-gpu-x7k2p/gpu/vfio-gpu.dra.dev-metadata.json"
        );
        assert_eq!(mounts[1]["hostPath"], legacy.to_string_lossy().as_ref());
        w.remove_claim(&c.uid).unwrap();
        assert!(!legacy.exists());
        assert!(!w.host_file(&c, "gpu").exists());
        assert!(!w.spec_path(&c.uid, "gpu").exists());
        w.remove_claim(&c.uid).unwrap();
        let mut bad = c.clone();
        bad.name = "../x".into();
        assert!(matches!(
            w.write_request(&bad, "gpu", &[dev()]),
            Err(MetadataError::UnsafeName { .. })
        ));
    }

    /// L4: a symlink planted at any directory between the plugin dir and the
    /// metadata file (the metadata subdir, the claim's dir, the request's dir)
    /// does not redirect the write: it fails, and the link's target stays empty.
    #[test]
    fn a_symlinked_parent_dir_does_not_redirect_the_metadata_write() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let victim = dir.path().join("victim");
        fs::create_dir_all(&data).unwrap();
        fs::create_dir_all(&victim).unwrap();
        let w = MetadataWriter::new("vfio-gpu.dra.dev", &data, dir.path().join("cdi"));
        let c = claim(None);
        let claim_dir = data.join(HOST_SUBDIR).join(claim_dir_name(&c));
        let links = [
            data.join(HOST_SUBDIR),
            claim_dir.clone(),
            claim_dir.join("gpu"),
        ];
        for link in &links {
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            std::os::unix::fs::symlink(&victim, link).unwrap();
            let r = w.write_request(&c, "gpu", &[dev()]);
            assert!(r.is_err(), "wrote through the link at {}", link.display());
            let planted: Vec<_> = walk(&victim);
            assert!(
                planted.is_empty(),
                "the link at {} redirected the write: {planted:?}",
                link.display()
            );
            fs::remove_file(link).unwrap();
            fs::create_dir_all(link).unwrap();
        }
        w.write_request(&c, "gpu", &[dev()]).unwrap();
        assert!(
            fs::symlink_metadata(w.host_file(&c, "gpu"))
                .unwrap()
                .is_file()
        );
    }

    /// Every path below `dir`.
    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
        out
    }

    /// L4: removing a claim's metadata does not list (and empty) a directory a
    /// symlink planted at the metadata directory points to.
    #[test]
    fn remove_claim_does_not_follow_a_symlinked_metadata_dir() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let victim = dir.path().join("victim");
        let c = claim(None);
        let precious = victim.join(format!("x_{}", c.uid));
        fs::create_dir_all(&precious).unwrap();
        fs::create_dir_all(&data).unwrap();
        std::os::unix::fs::symlink(&victim, data.join(HOST_SUBDIR)).unwrap();
        let w = MetadataWriter::new("vfio-gpu.dra.dev", &data, dir.path().join("cdi"));
        assert!(w.remove_claim(&c.uid).is_err());
        assert!(precious.is_dir(), "the link's target was emptied");
    }
}
