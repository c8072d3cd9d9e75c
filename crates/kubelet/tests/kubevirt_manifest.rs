//! `deploy/kubevirt-vm.yaml` against KubeVirt's API and the shipped DeviceClasses:
//! the VM's DRA fields decode into mirrors of KubeVirt v1.9.0's types (unknown fields
//! refused, so a misspelt or misplaced field fails here and not at `kubectl apply`),
//! every reference resolves, and the class it uses carries the configuration the
//! driver needs to protect KubeVirt.

use std::path::PathBuf;

use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaimTemplate};
use serde::Deserialize;
use serde_json::Value;
use vfio_gpu_kubelet::config::{Consumer, IommuBackend, parse_parameters};

const DRIVER: &str = "vfio-gpu.dra.dev";

fn deploy(file: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("manifest readable");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let y = serde_yaml::Value::deserialize(d).expect("YAML");
            serde_json::to_value(y).expect("JSON-compatible")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// `staging/src/kubevirt.io/api/core/v1/types.go:207-230` (v1.9.0)
/// `VirtualMachineInstanceResourceClaim`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KvResourceClaim {
    name: String,
    resource_claim_name: Option<String>,
    resource_claim_template_name: Option<String>,
}

/// `staging/src/kubevirt.io/api/core/v1/schema.go:694-720` (v1.9.0) `GPU` with its
/// inline `ClaimRequest` (`claimName`, `requestName`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct KvGpu {
    name: String,
    device_name: Option<String>,
    claim_name: Option<String>,
    request_name: Option<String>,
    virtual_gpu_options: Option<Value>,
    tag: Option<String>,
}

#[test]
fn kubevirt_vm_matches_kubevirt_api_and_shipped_classes() {
    let classes: Vec<DeviceClass> = deploy("deviceclass.yaml")
        .into_iter()
        .map(|v| serde_json::from_value(v).expect("DeviceClass"))
        .collect();
    let docs = deploy("kubevirt-vm.yaml");
    let template: ResourceClaimTemplate = docs
        .iter()
        .find(|d| d["kind"] == "ResourceClaimTemplate")
        .map(|d| serde_json::from_value(d.clone()).expect("ResourceClaimTemplate"))
        .expect("a ResourceClaimTemplate");
    let vm = docs
        .iter()
        .find(|d| d["kind"] == "VirtualMachine" && d["apiVersion"] == "kubevirt.io/v1")
        .expect("a kubevirt.io/v1 VirtualMachine");
    let vmi = &vm["spec"]["template"]["spec"];

    let claims: Vec<KvResourceClaim> = serde_json::from_value(vmi["resourceClaims"].clone())
        .expect("resourceClaims as KubeVirt's type");
    let gpus: Vec<KvGpu> = serde_json::from_value(vmi["domain"]["devices"]["gpus"].clone())
        .expect("gpus as KubeVirt's type");
    assert!(!gpus.is_empty());
    let requests = template
        .spec
        .spec
        .devices
        .as_ref()
        .expect("devices")
        .requests
        .clone()
        .unwrap_or_default();
    for gpu in &gpus {
        // pkg/dra/utils.go IsGPUDRA: no deviceName, a claim request.
        assert!(gpu.device_name.is_none(), "{gpu:?}");
        let claim_name = gpu.claim_name.as_deref().expect("claimName");
        let request_name = gpu.request_name.as_deref().expect("requestName");
        let claim = claims
            .iter()
            .find(|c| c.name == claim_name)
            .expect("claimName is listed");
        assert!(claim.resource_claim_name.is_none());
        assert_eq!(
            claim.resource_claim_template_name.as_deref(),
            template.metadata.name.as_deref()
        );
        assert_eq!(
            template.metadata.namespace.as_deref(),
            vm["metadata"]["namespace"].as_str(),
            "a template is only found in the VM's namespace"
        );
        let request = requests
            .iter()
            .find(|r| r.name == request_name)
            .expect("requestName is a request");
        // KubeVirt takes exactly one device per request.
        let exactly = request
            .exactly
            .as_ref()
            .expect("an exact request (not firstAvailable)");
        assert!(
            exactly.count.unwrap_or(1) == 1
                && exactly.allocation_mode.as_deref().unwrap_or("ExactCount") == "ExactCount"
        );

        let class = classes
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(exactly.device_class_name.as_str()))
            .expect("the class is shipped in deviceclass.yaml");
        let selects_driver = class.spec.selectors.iter().flatten().any(|s| {
            s.cel.as_ref().is_some_and(|c| {
                c.expression
                    .contains(&format!("device.driver == \"{DRIVER}\""))
            })
        });
        assert!(selects_driver);
        let opaque: Vec<_> = class
            .spec
            .config
            .iter()
            .flatten()
            .filter_map(|c| c.opaque.as_ref())
            .filter(|o| o.driver == DRIVER)
            .collect();
        let [opaque] = opaque.as_slice() else {
            panic!("one opaque config of ours in the KubeVirt class");
        };
        let parsed =
            parse_parameters(&opaque.parameters.0).expect("the driver accepts the class config");
        assert_eq!(parsed.consumer, Some(Consumer::KubeVirt));
        assert_eq!(parsed.iommu_backend, IommuBackend::Legacy);
        assert!(parsed.api_device);
    }
}
