//! Paths built from claim names (security review M2): for every name Kubernetes
//! accepts, each path component fits `NAME_MAX`, the path fits `PATH_MAX` and stays
//! under its root, and prepare's name check accepts the claim.

use std::path::{Component, Path, PathBuf};

use proptest::prelude::*;
use vfio_gpu_kubelet::cdi::CdiWriter;
use vfio_gpu_kubelet::metadata::{ClaimIdentity, HOST_SUBDIR, MetadataWriter};

const DATA_DIR: &str = "/var/lib/kubelet/plugins/vfio-gpu.dra.dev";
const CDI_ROOT: &str = "/var/run/cdi";

/// A DNS label (RFC 1123): 1–63 bytes.
fn dns_label() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
        // The longest, where limits bite.
        "[a-z][-a-z0-9]{61}[a-z0-9]",
    ]
}

/// A DNS subdomain (RFC 1123): dot-separated labels, 1–253 bytes.
fn dns_subdomain() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(dns_label(), 1..=4).prop_map(|labels| labels.join(".")),
        // Exactly 253 bytes: four 63-byte labels cut down to the limit.
        prop::collection::vec("[a-z][-a-z0-9]{61}[a-z0-9]", 4).prop_map(|labels| labels.join(".")),
    ]
    .prop_map(|mut s| {
        s.truncate(253);
        s.trim_end_matches(['-', '.']).to_string()
    })
    .prop_filter("non-empty", |s| !s.is_empty())
}

fn uid() -> impl Strategy<Value = String> {
    "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
}

fn driver() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("vfio-gpu.dra.dev".to_string()),
        // A 63-byte driver name, the longest serve accepts.
        Just(format!("{}.dra.dev", "v".repeat(55))),
    ]
}

fn assert_fits_under(path: &Path, root: &str) {
    assert!(
        path.starts_with(root),
        "{} not under {root}",
        path.display()
    );
    assert!(
        path.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "{} has a relative component",
        path.display()
    );
    for c in path.components() {
        let len = c.as_os_str().len();
        assert!(len <= 255, "component of {len} bytes in {}", path.display());
    }
    assert!(path.as_os_str().len() < 4096, "{}", path.display());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// M2: every path and CDI name built from a valid claim fits the kernel's limits
    /// and its root, and the claim passes prepare's name check.
    #[test]
    fn every_path_built_from_valid_claim_names_fits_and_stays_under_its_root(
        namespace in dns_label(),
        name in dns_subdomain(),
        uid in uid(),
        request in dns_label(),
        pod_claim in prop::option::of(dns_label()),
        driver in driver(),
    ) {
        let claim = ClaimIdentity { namespace, name, uid, pod_claim_name: pod_claim };
        let m = MetadataWriter::new(&driver, DATA_DIR, CDI_ROOT).with_legacy_kubevirt_path(true);
        m.check_names(&claim, &request).map_err(|e| TestCaseError::fail(e.to_string()))?;

        let host = m.host_file(&claim, &request);
        assert_fits_under(&host, DATA_DIR);
        // Directly under the metadata dir, and findable by UID for removal.
        let claim_dir = host.parent().and_then(Path::parent).expect("claim dir");
        let metadata_root = PathBuf::from(DATA_DIR).join(HOST_SUBDIR);
        prop_assert_eq!(claim_dir.parent(), Some(metadata_root.as_path()));
        let dir_name = claim_dir.file_name().expect("dir name").to_string_lossy().into_owned();
        let uid_suffix = format!("_{}", claim.uid);
        prop_assert!(dir_name.ends_with(&uid_suffix), "{}", dir_name);
        assert_fits_under(&m.legacy_host_file(&claim, &request), DATA_DIR);
        assert_fits_under(&m.spec_path(&claim.uid, &request), CDI_ROOT);
        assert_fits_under(&PathBuf::from(m.container_file(&claim, &request)), "/var/run");
        assert_fits_under(&PathBuf::from(m.legacy_container_file(&claim, &request)), "/var/run");

        let cdi = CdiWriter::new(CDI_ROOT, &driver);
        assert_fits_under(&cdi.spec_path(&claim.uid), CDI_ROOT);
        // CDI device names (the part after `=`) stay short too.
        let metadata_id = m.device_id(&claim.uid, &request);
        let claim_id = cdi.device_id(&claim.uid, "gpu-0000-ab-00-0");
        for id in [metadata_id, claim_id] {
            prop_assert!(id.len() <= 255, "{}", id);
        }
    }
}
