//! KubeVirt's side of a claim prepared through the plugin's NodePrepareResources:
//! the device metadata read the way KubeVirt's virt-launcher reads it (its structs and
//! its reader mirrored below from kubevirt/kubevirt, cited by file and line), the
//! legacy path of KubeVirt 1.8.0–1.8.2, and the refusal of the `iommufd` backend where
//! it cannot be used.

mod plugin_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plugin_common::*;
use serde::Deserialize;
use serde_json::{Value, json};
use vfio_gpu_kubelet::grpc::dra::{PrepareResults, PreparedDevice};

// ---- KubeVirt's reader, mirrored from kubevirt/kubevirt v1.9.0 ----

/// `pkg/dra/metadata/types.go:30-37` `DeviceMetadata`: `metav1.TypeMeta` inline
/// (`kind`, `apiVersion`), `metav1.ObjectMeta` as `metadata`, `podClaimName`,
/// `requests`.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // mirrored fields, not all asserted
struct KvDeviceMetadata {
    kind: String,
    #[serde(rename = "apiVersion")]
    api_version: String,
    #[serde(default)]
    metadata: KvObjectMeta,
    #[serde(rename = "podClaimName")]
    pod_claim_name: Option<String>,
    #[serde(default)]
    requests: Vec<KvRequest>,
}

/// The `metav1.ObjectMeta` fields KubeVirt reports in its errors (`md.Name`).
#[derive(Debug, Default, Deserialize)]
struct KvObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
}

/// `pkg/dra/metadata/types.go:40-43` `DeviceMetadataRequest`.
#[derive(Debug, Deserialize)]
struct KvRequest {
    name: String,
    #[serde(default)]
    devices: Vec<KvDevice>,
}

/// `pkg/dra/metadata/types.go:46-52` `Device` (`networkData` is not written).
#[derive(Debug, Deserialize)]
struct KvDevice {
    driver: String,
    pool: String,
    name: String,
    #[serde(default)]
    attributes: BTreeMap<String, KvAttribute>,
}

/// `k8s.io/api/resource/v1` `DeviceAttribute` JSON names.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct KvAttribute {
    int: Option<i64>,
    bool: Option<bool>,
    string: Option<String>,
    version: Option<String>,
}

/// `pkg/dra/metadata/types.go:66-70`: the only version KubeVirt decodes.
const KV_SUPPORTED: &str = "metadata.resource.k8s.io/v1alpha1";

/// `pkg/dra/utils.go:211-244` `decodeMetadataFromStream`: walk the stream, skip
/// objects of versions it does not know, decode the first it knows.
fn kv_decode_stream(bytes: &[u8]) -> Result<KvDeviceMetadata, String> {
    let mut unknown = Vec::new();
    for raw in serde_json::Deserializer::from_slice(bytes).into_iter::<Value>() {
        let raw = raw.map_err(|e| format!("read object from metadata stream: {e}"))?;
        let version = raw["apiVersion"].as_str().unwrap_or_default().to_string();
        if version.is_empty() {
            return Err("decode metadata object: missing apiVersion".into());
        }
        if version != KV_SUPPORTED {
            unknown.push(version);
            continue;
        }
        return serde_json::from_value(raw).map_err(|e| format!("decode {version}: {e}"));
    }
    Err(format!(
        "no compatible metadata version found (unknown: {unknown:?})"
    ))
}

/// One `vmi.spec.resourceClaims[]` entry (`name`, `resourceClaimName`).
struct VmiClaim<'a> {
    name: &'a str,
    resource_claim_name: Option<&'a str>,
}

/// The only `*-metadata.json` in `dir`, as `filepath.Glob` + "exactly one driver".
fn only_metadata_file(dir: &Path) -> Result<PathBuf, String> {
    let matches: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("no files in {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("-metadata.json"))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        other => Err(format!(
            "{} metadata files in {}",
            other.len(),
            dir.display()
        )),
    }
}

/// `pkg/dra/utils.go:136-177` (`resolveClaimMetadata`, `readMetadataFromDir`,
/// `readMetadataFile`) under `DefaultMetadataBasePath` (utils.go:49).
fn kv19_read(container: &Path, rc: &VmiClaim, request: &str) -> Result<KvDeviceMetadata, String> {
    let base = container.join("var/run/kubernetes.io/dra-device-attributes");
    let dir = match rc.resource_claim_name {
        Some(claim) => base.join("resourceclaims").join(claim).join(request),
        None => base
            .join("resourceclaimtemplates")
            .join(rc.name)
            .join(request),
    };
    let file = only_metadata_file(&dir)?;
    kv_decode_stream(&std::fs::read(&file).map_err(|e| e.to_string())?)
}

/// KubeVirt v1.8.2 `pkg/dra/utils.go:111-183`: base `/var/run/dra-device-attributes`
/// (utils.go:50); a named claim at `<claim>/<request>/`, a template claim found by
/// globbing `*/<request>/*-metadata.json` and matching `podClaimName`; each file
/// parsed whole with `json.Unmarshal` (utils.go:179), so a stream fails.
fn kv182_read(container: &Path, rc: &VmiClaim, request: &str) -> Result<KvDeviceMetadata, String> {
    let base = container.join("var/run/dra-device-attributes");
    let parse = |p: &Path| -> Result<KvDeviceMetadata, String> {
        let bytes = std::fs::read(p).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| format!("parsing {}: {e}", p.display()))
    };
    if let Some(claim) = rc.resource_claim_name {
        return parse(&only_metadata_file(&base.join(claim).join(request))?);
    }
    for claim_dir in std::fs::read_dir(&base).map_err(|e| e.to_string())? {
        let dir = claim_dir.map_err(|e| e.to_string())?.path().join(request);
        if let Ok(file) = only_metadata_file(&dir)
            && let Ok(md) = parse(&file)
            && md.pod_claim_name.as_deref() == Some(rc.name)
        {
            return Ok(md);
        }
    }
    Err(format!("no metadata with pod claim name {:?}", rc.name))
}

/// `pkg/dra/utils.go:57-75` + `99-133` (`GetPCIAddressForClaim`, `resolveDevice`):
/// the request by name, exactly one device, its `resource.kubernetes.io/pciBusID`.
fn kv_device<'a>(md: &'a KvDeviceMetadata, request: &str) -> Result<&'a KvDevice, String> {
    let r = md
        .requests
        .iter()
        .find(|r| r.name == request)
        .ok_or_else(|| format!("request {request:?} not found in {:?}", md.metadata.name))?;
    match r.devices.as_slice() {
        [one] => Ok(one),
        other => Err(format!("request {request:?} has {} devices", other.len())),
    }
}

fn kv_pci_address(md: &KvDeviceMetadata, request: &str) -> Result<String, String> {
    kv_device(md, request)?
        .attributes
        .get("resource.kubernetes.io/pciBusID")
        .and_then(|a| a.string.clone())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "pciBusID not found".into())
}

// ---- the container runtime: apply the CDI mounts of the returned IDs ----

/// Bind mounts of the CDI devices `ids` (`vendor/class=name`), resolved over every
/// spec in the CDI root: (container path, host path).
fn cdi_mounts(env: &Env, ids: &[String]) -> Vec<(String, String)> {
    let specs: Vec<Value> = env
        .cdi_files()
        .iter()
        .map(|f| validated_spec(&env.cdi_root().join(f)))
        .collect();
    let mut mounts = Vec::new();
    for id in ids {
        let (kind, name) = id.split_once('=').expect("CDI ID vendor/class=name");
        let spec = specs
            .iter()
            .find(|s| {
                s["kind"] == kind
                    && s["devices"]
                        .as_array()
                        .is_some_and(|d| d.iter().any(|d| d["name"] == name))
            })
            .unwrap_or_else(|| panic!("CDI ID {id} resolves"));
        let edits = [
            &spec_device(spec, name)["containerEdits"],
            &spec["containerEdits"],
        ];
        for e in edits {
            for m in e["mounts"].as_array().into_iter().flatten() {
                mounts.push((
                    m["containerPath"]
                        .as_str()
                        .expect("containerPath")
                        .to_string(),
                    m["hostPath"].as_str().expect("hostPath").to_string(),
                ));
            }
        }
    }
    mounts
}

/// A container's file system: every mount copied to its container path under a new
/// directory (what the bind mounts would show).
fn container_view(env: &Env, devices: &[PreparedDevice]) -> tempfile::TempDir {
    let ids: Vec<String> = devices
        .iter()
        .flat_map(|d| d.cdi_device_ids.clone())
        .collect();
    let dir = tempfile::tempdir().expect("container dir");
    for (container_path, host_path) in cdi_mounts(env, &ids) {
        let target = dir.path().join(container_path.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&host_path, &target).expect("host file of a mount exists");
    }
    dir
}

fn ok_devices(r: &PrepareResults, uid: &str) -> Vec<PreparedDevice> {
    match r.get(uid) {
        Some(Ok(d)) => d.clone(),
        other => panic!("claim {uid} not prepared: {other:?}"),
    }
}

fn err_text(r: &PrepareResults, uid: &str) -> String {
    match r.get(uid) {
        Some(Err(e)) => e.clone(),
        other => panic!("claim {uid} should have failed: {other:?}"),
    }
}

/// `numa_node` and the root complex of a function, straight from the fixture's sysfs.
fn sysfs_numa_and_root(env: &Env, b: &str) -> (i64, String) {
    let dev = env.host.join("sys/bus/pci/devices").join(b);
    let numa = std::fs::read_to_string(dev.join("numa_node")).expect("numa_node");
    let real = std::fs::canonicalize(&dev).expect("device link resolves");
    let devices = std::fs::canonicalize(env.host.join("sys/devices")).expect("sys/devices");
    let root = real
        .strip_prefix(&devices)
        .expect("device under sys/devices")
        .components()
        .next()
        .expect("root complex component")
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    (numa.trim().parse().expect("numa number"), root)
}

const KUBEVIRT_CLASS_CONFIG: &str = r#"{"apiVersion": "vfio-gpu.dra.dev/v1alpha1", "kind": "VfioDeviceConfig", "iommuBackend": "legacy", "apiDevice": true, "consumer": "kubevirt"}"#;

fn kubevirt_class_config() -> Value {
    serde_json::from_str(KUBEVIRT_CLASS_CONFIG).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubevirt_1_9_finds_the_gpu_of_template_and_named_claims() {
    let env = Env::new().await;
    let running = env.start().await;
    let ab = dev(AB);
    // A VM's template claim (`resourceClaimTemplateName`) and a named claim.
    let template = env.claim_with(
        "gpu-vm-gpu-claim-x7k2p",
        &[("gpu", DRIVER, NODE, ab.as_str())],
        json!([{"source": "FromClass", "requests": [], "opaque": {"driver": DRIVER, "parameters": kubevirt_class_config()}}]),
        json!({"resource.kubernetes.io/pod-claim-name": "gpu-claim"}),
    );
    let named = env.claim("shared-gpu", &[("passthrough", BA)]);
    let r = running
        .kubelet
        .prepare(&[template.clone(), named.clone()])
        .await
        .expect("rpc");

    let view = container_view(&env, &ok_devices(&r, &template.uid));
    let rc = VmiClaim {
        name: "gpu-claim",
        resource_claim_name: None,
    };
    let md = kv19_read(view.path(), &rc, "gpu").expect("KubeVirt 1.9 reads the template claim");
    assert_eq!(md.api_version, KV_SUPPORTED, "took the object it knows");
    assert_eq!(md.kind, "DeviceMetadata");
    assert_eq!(md.pod_claim_name.as_deref(), Some("gpu-claim"));
    assert_eq!(
        (md.metadata.namespace.as_str(), md.metadata.uid.as_str()),
        (NS, template.uid.as_str())
    );
    assert_eq!(kv_pci_address(&md, "gpu").as_deref(), Ok(AB));
    let d = kv_device(&md, "gpu").expect("one device");
    assert_eq!(
        (d.driver.as_str(), d.pool.as_str(), d.name.as_str()),
        (DRIVER, NODE, ab.as_str())
    );
    // Topology, as sysfs has it.
    let (numa, root) = sysfs_numa_and_root(&env, AB);
    assert!(
        root.starts_with("pci") && root.len() == "pci0000:00".len(),
        "{root}"
    );
    assert_eq!(
        d.attributes["resource.kubernetes.io/numaNode"].int,
        Some(numa)
    );
    assert_eq!(
        d.attributes["resource.kubernetes.io/pcieRoot"]
            .string
            .as_deref(),
        Some(root.as_str())
    );
    // By default nothing at the 1.8.0–1.8.2 path.
    assert!(!view.path().join("var/run/dra-device-attributes").exists());

    let view = container_view(&env, &ok_devices(&r, &named.uid));
    let rc = VmiClaim {
        name: "gpu",
        resource_claim_name: Some("shared-gpu"),
    };
    let md = kv19_read(view.path(), &rc, "passthrough").expect("reads the named claim");
    assert_eq!(md.pod_claim_name, None);
    assert_eq!(kv_pci_address(&md, "passthrough").as_deref(), Ok(BA));
    // The stream itself is not one object: KubeVirt 1.8.2's whole-file parse fails on
    // it, hence the separate legacy file.
    let stream =
        only_metadata_file(&view.path().join(
            "var/run/kubernetes.io/dra-device-attributes/resourceclaims/shared-gpu/passthrough",
        ))
        .expect("file");
    let bytes = std::fs::read(stream).expect("read");
    assert!(serde_json::from_slice::<KvDeviceMetadata>(&bytes).is_err());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubevirt_1_8_2_reads_the_legacy_file_when_enabled() {
    let env = Env::new().await;
    let mut config = env.plugin_config();
    config.legacy_kubevirt_metadata = true;
    let running = env.start_with(config).await;
    let ab = dev(AB);
    let template = env.claim_with(
        "gpu-vm-gpu-claim-x7k2p",
        &[("gpu", DRIVER, NODE, ab.as_str())],
        json!([]),
        json!({"resource.kubernetes.io/pod-claim-name": "gpu-claim"}),
    );
    let named = env.claim("shared-gpu", &[("gpu", BA)]);
    let r = running
        .kubelet
        .prepare(&[template.clone(), named.clone()])
        .await
        .expect("rpc");

    let view = container_view(&env, &ok_devices(&r, &template.uid));
    let by_template = VmiClaim {
        name: "gpu-claim",
        resource_claim_name: None,
    };
    let md = kv182_read(view.path(), &by_template, "gpu").expect("KubeVirt 1.8.2 reads it");
    assert_eq!(md.api_version, KV_SUPPORTED);
    assert_eq!(kv_pci_address(&md, "gpu").as_deref(), Ok(AB));
    // 1.9 still reads the KEP-5304 path of the same claim.
    let md = kv19_read(view.path(), &by_template, "gpu").expect("1.9 too");
    assert_eq!(kv_pci_address(&md, "gpu").as_deref(), Ok(AB));

    let view = container_view(&env, &ok_devices(&r, &named.uid));
    let md = kv182_read(
        view.path(),
        &VmiClaim {
            name: "gpu",
            resource_claim_name: Some("shared-gpu"),
        },
        "gpu",
    )
    .expect("named claim");
    assert_eq!(kv_pci_address(&md, "gpu").as_deref(), Ok(BA));

    // Unprepare removes the legacy file with the rest.
    let u = running
        .kubelet
        .unprepare(&[template.clone(), named.clone()])
        .await
        .expect("rpc");
    assert!(u.values().all(Result::is_ok), "{u:?}");
    let left: Vec<_> = walk(&env.state_dir().join("dra-device-metadata"));
    assert!(left.is_empty(), "{left:?}");
    running.stop().await;
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The claim failed naming device, backend and reason, and the host is untouched.
fn assert_refused_untouched(
    env: &Env,
    r: &PrepareResults,
    claim: &vfio_gpu_kubelet::grpc::dra::ClaimRef,
    writes: usize,
    reason: &str,
) {
    let e = err_text(r, &claim.uid);
    for needed in [
        claim.name.as_str(),
        claim.uid.as_str(),
        &dev(BA),
        BA,
        "iommufd",
        reason,
    ] {
        assert!(e.contains(needed), "error lacks {needed:?}: {e}");
    }
    assert_eq!(
        env.kernel.log().len(),
        writes,
        "no sysfs write: {:?}",
        env.kernel.log()
    );
    assert_eq!(
        env.driver_of(BA).as_deref(),
        Some("nvidia"),
        "the GPU did not move"
    );
    assert!(
        !env.cdi_files().iter().any(|f| f.contains(&claim.uid)),
        "{:?}",
        env.cdi_files()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iommufd_is_refused_for_a_kubevirt_class_before_any_change() {
    let env = Env::new().await;
    let running = env.start().await;
    let ba = dev(BA);
    let writes = env.kernel.log().len();
    // The class says KubeVirt; the claim asks for iommufd without naming a consumer.
    let claim = env.claim_with(
        "vm-fd",
        &[("gpu", DRIVER, NODE, ba.as_str())],
        json!([
            {"source": "FromClass", "requests": [], "opaque": {"driver": DRIVER, "parameters": kubevirt_class_config()}},
            {"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters":
                {"apiVersion": "vfio-gpu.dra.dev/v1alpha1", "kind": "VfioDeviceConfig", "iommuBackend": "iommufd"}}}
        ]),
        json!({}),
    );
    let r = running.prepare_one(&claim).await;
    assert_refused_untouched(&env, &r, &claim, writes, "KubeVirt");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iommufd_is_refused_on_a_kernel_without_it_before_any_change() {
    let env = Env::new().await;
    // A kernel without iommufd: no /dev/iommu, no iommufd module.
    std::fs::remove_file(env.host.join("dev/iommu")).expect("demo host has /dev/iommu");
    let running = env.start().await;
    let ba = dev(BA);
    let writes = env.kernel.log().len();
    let claim = env.claim_with(
        "fd",
        &[("gpu", DRIVER, NODE, ba.as_str())],
        json!([{"source": "FromClaim", "requests": [], "opaque": {"driver": DRIVER, "parameters":
            {"apiVersion": "vfio-gpu.dra.dev/v1alpha1", "kind": "VfioDeviceConfig", "iommuBackend": "iommufd"}}}]),
        json!({}),
    );
    let r = running.prepare_one(&claim).await;
    assert_refused_untouched(&env, &r, &claim, writes, "no /dev/iommu");

    // The same kernel serves the legacy backend.
    let legacy = env.claim("legacy", &[("gpu", BA)]);
    let r = running.prepare_one(&legacy).await;
    ok_devices(&r, &legacy.uid);
    assert_eq!(env.driver_of(BA).as_deref(), Some("vfio-pci"));
    running.stop().await;
}
