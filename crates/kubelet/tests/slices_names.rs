//! ResourceSlice `generateName`: whatever the (valid) node name, the name the API
//! server generates from our prefix passes the server's own validation
//! (fake-apiserver's copy of `ValidateObjectMetaAccessor` + `NameIsDNSSubdomain`).

use fake_apiserver::validation::{generated_name, is_dns1123_subdomain, is_valid_generate_name};
use proptest::prelude::*;
use vfio_gpu_kubelet::slices::SliceConfig;

/// Valid node names (DNS-1123 subdomains) of 1–253 bytes with dots at any offset:
/// labels of mixed lengths, joined, cut back to the last whole label within 253.
fn node_name() -> impl Strategy<Value = String> {
    let label = prop_oneof![
        "[a-z0-9]{1,3}",
        "[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?",
        "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
    ];
    prop::collection::vec(label, 1..24).prop_map(|labels| {
        let mut name = String::new();
        for l in labels {
            let extra = usize::from(!name.is_empty()) + l.len();
            if name.len() + extra > 253 {
                break;
            }
            if !name.is_empty() {
                name.push('.');
            }
            name.push_str(&l);
        }
        name
    })
}

fn assert_generated_name_valid(driver: &str, node: &str) {
    let prefix = SliceConfig::new(driver, node).generate_name();
    assert!(is_valid_generate_name(&prefix), "prefix {prefix:?}");
    for suffix in ["bcdfg", "2x4z9"] {
        let name = generated_name(&prefix, suffix);
        assert!(
            is_dns1123_subdomain(&name),
            "node {node:?} ({} bytes): prefix {prefix:?} gives invalid name {name:?}",
            node.len()
        );
    }
}

#[test]
fn eks_node_names_of_43_and_47_bytes_get_valid_slice_names() {
    // With the default driver the prefix cut used to land right after a dot.
    let n43 = "ip-10-0-12-34.eu-central-1.compute.internal";
    assert_eq!(n43.len(), 43);
    assert_generated_name_valid("vfio-gpu.dra.dev", n43);
    let n47 = "ip-10-100-120-134.eu-central-1.compute.internal";
    assert_eq!(n47.len(), 47);
    assert_generated_name_valid("vfio-gpu.dra.dev", n47);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn generated_slice_names_pass_api_server_validation(
        node in node_name(),
        driver in prop_oneof![
            Just("vfio-gpu.dra.dev"),
            Just("gpu.example.com"),
            Just("a"),
            Just("x.y-z.q"),
        ],
    ) {
        prop_assume!(!node.is_empty() && node.len() <= 253);
        prop_assert!(is_dns1123_subdomain(&node), "strategy made an invalid node name {node:?}");
        assert_generated_name_valid(driver, &node);
    }
}
