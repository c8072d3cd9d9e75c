//! `deploy/fabric/kubevirt-vm-nvlink.yaml`: the template round-trips through
//! k8s-openapi, its requests are tied by `matchAttribute` on an attribute the
//! publisher sets, and the VM names every request once.

use std::path::Path;

use k8s_openapi::api::resource::v1::ResourceClaimTemplate;
use serde::Deserialize as _;
use serde_json::Value;
use vfio_gpu_engine::GpuFabric;
use vfio_gpu_fabric::{ModuleId, Platform};
use vfio_gpu_kubelet::slices::{DeviceInfo, device_attributes};

fn docs() -> Vec<Value> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/fabric/kubevirt-vm-nvlink.yaml");
    let text = std::fs::read_to_string(path).expect("manifest");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_json::to_value(serde_yaml::Value::deserialize(d).expect("YAML")).expect("JSON")
        })
        .collect()
}

#[test]
fn the_nvlink_vm_ties_its_requests_to_one_partition() {
    let docs = docs();
    let [template, vm] = docs.as_slice() else {
        panic!("a template and a VM");
    };
    let t: ResourceClaimTemplate =
        serde_json::from_value(template.clone()).expect("template parses");
    assert_eq!(
        &serde_json::to_value(&t).expect("serializes"),
        template,
        "no field lost"
    );
    let devices = t.spec.spec.devices.expect("devices");
    let requests: Vec<String> = devices
        .requests
        .iter()
        .flatten()
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(requests, ["gpu0", "gpu1"]);
    let [c] = devices.constraints.as_deref().expect("constraints") else {
        panic!("one constraint");
    };
    assert_eq!(c.requests.as_deref(), Some(&requests[..]));
    let attr = c.match_attribute.as_deref().expect("matchAttribute");
    let (domain, name) = attr.split_once('/').expect("qualified");
    assert_eq!(domain, "vfio-gpu.dra.dev");
    // The attribute (and the selector's) is one the publisher sets on an HGX GPU.
    let topology = Platform::HgxH100.topology();
    let info = DeviceInfo {
        bdf: "0000:9a:00.0".parse().expect("bdf"),
        vendor: 0x10de,
        device: 0x2330,
        product_name: None,
        driver: None,
        iommu_group: 1,
        numa_node: None,
        pcie_root: None,
        keep_on_vfio: false,
        bar_bytes: 0,
        bar_prefetchable64_bytes: 0,
        fabric: Some(GpuFabric {
            module_id: Some(ModuleId(1)),
            partitions: topology.partition_attributes(ModuleId(1)),
            nvlink_fabric: Some("nvl4".into()),
            fabric_managed: true,
            ..GpuFabric::default()
        }),
        quarantine: None,
        unhealthy: None,
    };
    let attrs = device_attributes(&info);
    assert_eq!(
        attrs[name].int,
        Some(3),
        "module 1 is in H100 2-GPU partition 3"
    );
    assert_eq!(attrs["fabricManaged"].bool, Some(true));
    assert_eq!(attrs["gpuModuleID"].int, Some(1));
    // Within the 32 attributes + capacities of a device.
    assert!(attrs.len() <= 30, "{}", attrs.len());

    let spec = &vm["spec"]["template"]["spec"];
    let gpus = spec["domain"]["devices"]["gpus"].as_array().expect("gpus");
    let named: Vec<&str> = gpus
        .iter()
        .filter_map(|g| g["requestName"].as_str())
        .collect();
    assert_eq!(named, ["gpu0", "gpu1"]);
    let claim = &spec["resourceClaims"][0];
    assert_eq!(claim["resourceClaimTemplateName"], "two-nvlink-gpus");
    assert!(gpus.iter().all(|g| g["claimName"] == claim["name"]));
}
