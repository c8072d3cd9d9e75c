//! Target `claim_paths`: the names the kubelet sends and the API server returns
//! for a claim (namespace, name, UID, request name, pod claim name) turned into
//! every path and CDI name the plugin builds from them: the claim's CDI spec, the
//! device-metadata files on the host and in the container, their CDI mount specs
//! (security review M2). Engine state and lock files are named by GPU address, not
//! by claim, so no claim name reaches them.
//!
//! Input: a flag byte, then newline-separated fields `namespace`, `name`, `uid`,
//! `request`, `pod claim name` (absent when missing or empty) and a second UID.
//! Flag bits stretch fields to the longest valid length by repeating them (bit 0
//! the name to 253 bytes, bit 1 the namespace to 63, bit 2 the request to 63,
//! bit 3 the pod claim name to 63), bit 4 picks a 63-byte driver name.
//!
//! Properties:
//! - names Kubernetes accepts (DNS labels, a DNS subdomain, a UID of
//!   alphanumerics and `-`) pass prepare's name check;
//! - whenever the check passes, every built path stays under its root with only
//!   normal components, each at most `NAME_MAX` bytes, the whole under `PATH_MAX`,
//!   and every CDI device name is at most 255 bytes;
//! - the claim's files are found by its UID alone and only its own: on a real
//!   tree, removing another UID's files leaves them, removing its own leaves none.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use vfio_gpu_kubelet::cdi::{CdiWriter, is_safe_uid};
use vfio_gpu_kubelet::metadata::{ClaimIdentity, MetadataWriter, NAME_MAX, PATH_MAX};

/// Where the shipped plugin writes (what the limits are checked against).
const DATA_DIR_PARENT: &str = "/var/lib/kubelet/plugins";
const CDI_ROOT: &str = "/var/run/cdi";
const CONTAINER_ROOT: &str = "/var/run";

const DRIVERS: [&str; 2] = [
    "vfio-gpu.dra.dev",
    // 63 bytes, the longest `serve` accepts.
    "vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv.dra.dev",
];

/// An RFC 1123 label: what Kubernetes accepts for namespaces and request names.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.first().is_some_and(ok)
        && b.last().is_some_and(ok)
        && b.iter().all(|c| ok(c) || *c == b'-')
}

/// An RFC 1123 subdomain: what Kubernetes accepts for claim names.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// `s` repeated (cycled) to `len` bytes, ends cut back to what a name may end in.
fn stretch(s: &str, len: usize) -> String {
    if s.is_empty() || !s.is_ascii() {
        return s.to_string();
    }
    let mut out: String = s.chars().cycle().take(len).collect();
    while out.ends_with(['-', '.']) {
        out.pop();
    }
    out
}

fn assert_fits_under(path: &Path, root: &str) {
    assert!(
        path.starts_with(root),
        "{} is not under {root}",
        path.display()
    );
    for c in path.components() {
        assert!(
            matches!(c, Component::RootDir | Component::Normal(_)),
            "{} has a {c:?} component",
            path.display()
        );
        let len = c.as_os_str().len();
        assert!(
            len <= NAME_MAX,
            "a {len}-byte component in {}",
            path.display()
        );
    }
    assert!(
        path.as_os_str().len() < PATH_MAX,
        "{} is over PATH_MAX",
        path.display()
    );
}

/// A scratch tree for the removal property.
fn tree() -> &'static PathBuf {
    static TREE: OnceLock<PathBuf> = OnceLock::new();
    TREE.get_or_init(|| {
        let d = crate::scratch::dir("claim_paths");
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

fn touch(path: &Path) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("creating a claim directory");
    }
    fs::write(path, b"{}").expect("creating a claim file");
}

/// Every file the plugin writes for `claim`'s `request` under the scratch tree.
fn claim_files(m: &MetadataWriter, cdi: &CdiWriter, c: &ClaimIdentity, req: &str) -> Vec<PathBuf> {
    vec![
        m.host_file(c, req),
        m.legacy_host_file(c, req),
        m.spec_path(&c.uid, req),
        cdi.spec_path(&c.uid),
    ]
}

/// On a real tree: each claim's files go with its own UID only.
fn check_removal(driver: &str, a: &ClaimIdentity, b: &ClaimIdentity, req: &str) {
    let root = tree();
    let _ = fs::remove_dir_all(root);
    let data_dir = root.join("plugins").join(driver);
    let cdi_root = root.join("cdi");
    fs::create_dir_all(&cdi_root).expect("scratch CDI root");
    let m = MetadataWriter::new(driver, &data_dir, &cdi_root).with_legacy_kubevirt_path(true);
    let cdi = CdiWriter::new(&cdi_root, driver);
    let files_a = claim_files(&m, &cdi, a, req);
    let files_b = claim_files(&m, &cdi, b, req);
    for f in files_a.iter().chain(&files_b) {
        touch(f);
    }
    m.remove_claim(&b.uid)
        .expect("removing the other claim's metadata");
    cdi.remove_claim(&b.uid)
        .expect("removing the other claim's spec");
    for f in &files_a {
        assert!(
            f.exists(),
            "removing UID {} removed {} of UID {}",
            b.uid,
            f.display(),
            a.uid
        );
    }
    m.remove_claim(&a.uid)
        .expect("removing the claim's metadata");
    cdi.remove_claim(&a.uid).expect("removing the claim's spec");
    for f in &files_a {
        assert!(
            !f.exists(),
            "{} of UID {} outlived its removal",
            f.display(),
            a.uid
        );
    }
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut fields = text.split('\n').map(str::to_string);
    let mut next = || fields.next().unwrap_or_default();
    let (mut namespace, mut name, uid, mut request, mut pod_claim, other_uid) =
        (next(), next(), next(), next(), next(), next());
    if flags & 1 != 0 {
        name = stretch(&name, 253);
    }
    if flags & 2 != 0 {
        namespace = stretch(&namespace, 63);
    }
    if flags & 4 != 0 {
        request = stretch(&request, 63);
    }
    if flags & 8 != 0 {
        pod_claim = stretch(&pod_claim, 63);
    }
    let driver = DRIVERS[usize::from(flags >> 4 & 1)];
    let claim = ClaimIdentity {
        namespace,
        name,
        uid,
        pod_claim_name: (!pod_claim.is_empty()).then_some(pod_claim),
    };
    let data_dir = format!("{DATA_DIR_PARENT}/{driver}");
    let m = MetadataWriter::new(driver, &data_dir, CDI_ROOT).with_legacy_kubevirt_path(true);
    let cdi = CdiWriter::new(CDI_ROOT, driver);
    let checked = m.check_names(&claim, &request);

    let valid = is_dns_label(&claim.namespace)
        && is_dns_subdomain(&claim.name)
        && is_safe_uid(&claim.uid)
        && is_dns_label(&request)
        && claim.pod_claim_name.as_deref().is_none_or(is_dns_label);
    if valid {
        assert!(
            checked.is_ok(),
            "valid names refused: {claim:?} request {request:?}: {checked:?}"
        );
    }
    if checked.is_err() {
        return;
    }
    assert_fits_under(&m.host_file(&claim, &request), &data_dir);
    assert_fits_under(&m.legacy_host_file(&claim, &request), &data_dir);
    assert_fits_under(&m.spec_path(&claim.uid, &request), CDI_ROOT);
    assert_fits_under(&cdi.spec_path(&claim.uid), CDI_ROOT);
    assert_fits_under(
        Path::new(&m.container_file(&claim, &request)),
        CONTAINER_ROOT,
    );
    assert_fits_under(
        Path::new(&m.legacy_container_file(&claim, &request)),
        CONTAINER_ROOT,
    );
    for id in [
        m.device_id(&claim.uid, &request),
        cdi.device_id(&claim.uid, "gpu-0000-ab-00-0"),
    ] {
        let device_name = id.rsplit('=').next().unwrap_or_default();
        assert!(device_name.len() <= 255, "CDI device name {device_name:?}");
    }

    // The other claim must pass the check too: the plugin never writes files for
    // one that does not.
    let other = ClaimIdentity {
        uid: other_uid,
        ..claim.clone()
    };
    if other.uid != claim.uid && m.check_names(&other, &request).is_ok() {
        check_removal(driver, &claim, &other, &request);
    }
}
