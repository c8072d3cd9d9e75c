//! Every manifest in `deploy/` parses, round-trips through the k8s-openapi
//! type of its kind without losing a field (k8s-openapi silently drops
//! unknown fields, so a typo shows up as a difference), and agrees with the
//! code: driver name, attribute names, service account, mounts and flags.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaimTemplate};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::Value;
use vfio_gpu_kubelet::slices::{DeviceInfo, device_attributes};

const DRIVER: &str = "vfio-gpu.dra.dev";
/// The node label the DaemonSet selects on: nodes opt in to the plugin.
const NODE_OPT_IN_LABEL: &str = "vfio-gpu.dra.dev/enabled";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// `(file, document)` for every YAML document under deploy/.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests found");
    let mut docs = Vec::new();
    for file in files {
        let name = file
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&file).expect("readable manifest");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let yaml = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: invalid YAML: {e}"));
            if yaml.is_null() {
                continue;
            }
            let json: Value = serde_json::to_value(&yaml)
                .unwrap_or_else(|e| panic!("{name}: not JSON-compatible: {e}"));
            docs.push((name.clone(), json));
        }
    }
    docs
}

/// Deserializes into `T` and checks nothing was dropped on the way.
fn typed<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let obj: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", kind(doc)));
    let back = serde_json::to_value(&obj).expect("serializes");
    assert_eq!(
        &back,
        doc,
        "{file}: {} lost or changed fields in a round trip (typo?)",
        kind(doc)
    );
    obj
}

fn kind(doc: &Value) -> String {
    format!(
        "{}/{} {}",
        doc["apiVersion"].as_str().unwrap_or("?"),
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

#[derive(Default)]
struct Parsed {
    network_policies: Vec<NetworkPolicy>,
    classes: Vec<DeviceClass>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    accounts: Vec<ServiceAccount>,
    daemonsets: Vec<DaemonSet>,
    templates: Vec<ResourceClaimTemplate>,
    policies: Vec<ValidatingAdmissionPolicy>,
    vms: Vec<Value>,
}

fn parse_all() -> Parsed {
    let mut p = Parsed::default();
    for (file, doc) in documents() {
        let api = doc["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind_name = doc["kind"].as_str().unwrap_or_default().to_string();
        match (api.as_str(), kind_name.as_str()) {
            ("v1", "Namespace") => {
                typed::<Namespace>(&file, &doc);
            }
            ("v1", "ServiceAccount") => p.accounts.push(typed(&file, &doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => p.roles.push(typed(&file, &doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                p.bindings.push(typed(&file, &doc))
            }
            ("apps/v1", "DaemonSet") => p.daemonsets.push(typed(&file, &doc)),
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                p.network_policies.push(typed(&file, &doc))
            }
            ("resource.k8s.io/v1", "DeviceClass") => p.classes.push(typed(&file, &doc)),
            ("resource.k8s.io/v1", "ResourceClaimTemplate") => p.templates.push(typed(&file, &doc)),
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
                p.policies.push(typed(&file, &doc))
            }
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
                typed::<ValidatingAdmissionPolicyBinding>(&file, &doc);
            }
            // No Rust type for KubeVirt: checked structurally below.
            ("kubevirt.io/v1", "VirtualMachine") => p.vms.push(doc),
            _ => panic!("{file}: unexpected kind {}", kind(&doc)),
        }
    }
    p
}

#[test]
fn device_classes_select_the_driver_and_published_attributes() {
    let p = parse_all();
    let exprs: BTreeMap<String, Vec<String>> = p
        .classes
        .iter()
        .map(|c| {
            let name = c.metadata.name.clone().unwrap_or_default();
            let exprs = c
                .spec
                .selectors
                .iter()
                .flatten()
                .filter_map(|s| s.cel.as_ref().map(|c| c.expression.clone()))
                .collect();
            (name, exprs)
        })
        .collect();
    let all = &exprs["vfio-gpu.dra.dev"];
    assert_eq!(all.len(), 1);
    assert!(all[0].contains(&format!("device.driver == \"{DRIVER}\"")));

    let prebound = exprs["vfio-gpu-prebound.dra.dev"].join(" && ");
    assert!(prebound.contains(&format!("device.driver == \"{DRIVER}\"")));
    assert!(prebound.contains(&format!(
        "device.attributes[\"{DRIVER}\"].keepOnVfio == true"
    )));

    // The attribute the class relies on is one the publisher sets.
    let info = DeviceInfo {
        bdf: "0000:65:00.0".parse().expect("bdf"),
        vendor: 0x10de,
        device: 0x2330,
        product_name: None,
        driver: None,
        iommu_group: 1,
        numa_node: None,
        pcie_root: None,
        keep_on_vfio: true,
        bar_bytes: 0,
        bar_prefetchable64_bytes: 0,
        fabric: None,
        quarantine: None,
        unhealthy: None,
    };
    assert_eq!(device_attributes(&info)["keepOnVfio"].bool, Some(true));
}

#[test]
fn rbac_covers_what_the_plugin_does() {
    let p = parse_all();
    let [role] = p.roles.as_slice() else {
        panic!("one ClusterRole");
    };
    // Exactly what the code calls, nothing more: claims GET (prepare, cleanup), the
    // Node GET (owner reference), the slice publisher's list/watch/create/
    // update (replace)/delete, and the GPUQuarantined Event's create. No status
    // writes, no patch.
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted
                    .entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    let want: BTreeMap<(String, String), BTreeSet<String>> = [
        ("resource.k8s.io", "resourceclaims", &["get"][..]),
        ("", "nodes", &["get"][..]),
        ("events.k8s.io", "events", &["create"][..]),
        (
            "resource.k8s.io",
            "resourceslices",
            &["list", "watch", "create", "update", "delete"][..],
        ),
    ]
    .into_iter()
    .map(|(g, r, verbs)| {
        (
            (g.to_string(), r.to_string()),
            verbs.iter().map(|v| v.to_string()).collect(),
        )
    })
    .collect();
    assert_eq!(granted, want);

    // The binding ties that role to the DaemonSet's service account.
    let [binding] = p.bindings.as_slice() else {
        panic!("one ClusterRoleBinding");
    };
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let [ds] = p.daemonsets.as_slice() else {
        panic!("one DaemonSet");
    };
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let sa = pod.service_account_name.clone().expect("service account");
    let ns = ds.metadata.namespace.clone().expect("namespace");
    let subjects = binding.subjects.clone().unwrap_or_default();
    assert!(
        subjects.iter().any(|s| s.kind == "ServiceAccount"
            && s.name == sa
            && s.namespace.as_ref() == Some(&ns)),
        "binding subject is the DaemonSet's account"
    );
    assert!(p.accounts.iter().any(
        |a| a.metadata.name.as_ref() == Some(&sa) && a.metadata.namespace.as_ref() == Some(&ns)
    ));
    // The admission policy matches the same account by its name, in any namespace
    // (review N6: a hard-coded namespace silently matched nothing elsewhere).
    for policy in &p.policies {
        let conditions = policy
            .spec
            .as_ref()
            .and_then(|s| s.match_conditions.clone())
            .unwrap_or_default();
        assert!(
            conditions.iter().any(|c| {
                c.expression
                    .contains(r#"startsWith("system:serviceaccount:")"#)
                    && c.expression.contains(&format!(r#"endsWith(":{sa}")"#))
                    && !c.expression.contains(&format!(":{ns}:"))
            }),
            "policy matches the account {sa} without naming namespace {ns}"
        );
    }
}

/// M3/N6 (reviews): the admission policy is part of the default install and pins
/// both the slice's node and its driver, on DELETE through `oldObject`.
#[test]
fn admission_policy_is_default_and_pins_driver_and_node() {
    let p = parse_all();
    let [policy] = p.policies.as_slice() else {
        panic!("one ValidatingAdmissionPolicy");
    };
    let text = std::fs::read_to_string(deploy_dir().join("admission-policy.yaml"))
        .expect("admission-policy.yaml");
    assert!(
        !text.to_lowercase().contains("optional"),
        "the policy is not optional"
    );
    assert!(
        text.contains("default install"),
        "says it is installed by default"
    );
    let spec = policy.spec.as_ref().expect("spec");
    let validations: Vec<String> = spec
        .validations
        .iter()
        .flatten()
        .map(|v| {
            v.expression
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let driver_pin = format!(
        r#"(request.operation == "DELETE" ? oldObject : object).spec.driver == "{DRIVER}""#
    );
    assert!(
        validations.iter().any(|v| v == &driver_pin),
        "no driver pin in {validations:?}"
    );
    assert!(
        validations
            .iter()
            .any(|v| v == "variables.userNode == variables.objectNode"),
        "no node pin in {validations:?}"
    );
    let variables: BTreeMap<String, String> = spec
        .variables
        .iter()
        .flatten()
        .map(|v| (v.name.clone(), v.expression.clone()))
        .collect();
    assert!(
        variables["objectNode"]
            .contains(r#"(request.operation == "DELETE" ? oldObject : object).spec.?nodeName"#),
        "{variables:?}"
    );
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
}

#[test]
fn daemonset_mounts_and_flags() {
    let p = parse_all();
    let [ds] = p.daemonsets.as_slice() else {
        panic!("one DaemonSet");
    };
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let [c] = pod.containers.as_slice() else {
        panic!("one container");
    };
    assert_eq!(c.args.clone().unwrap_or_default(), ["serve"]);
    // The host root comes from the environment, so `kubectl exec … vfio-gpu-dra
    // explain` in the pod reads the host, not the container's /etc.
    let host_root = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "VFIO_GPU_DRA_HOST_ROOT")
        .and_then(|e| e.value.clone());
    assert_eq!(host_root.as_deref(), Some("/host-root"));
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
    // Only what serve reads; NAMESPACE would be dead configuration.
    let env_names: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert_eq!(
        env_names,
        [
            "NODE_NAME",
            "POD_UID",
            "VFIO_GPU_DRA_HOST_ROOT",
            METRICS_ENV
        ]
    );
    // Rolling updates: per-pod sockets from the pod UID, the new pod up before
    // the old one goes.
    let pod_uid = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_UID")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(pod_uid.as_deref(), Some("metadata.uid"));
    let rolling = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .expect("rollingUpdate");
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    daemonset_probes(c);
    // Opt-in per node: without the label no plugin (and no empty pool) on a node.
    let selector = pod.node_selector.clone().unwrap_or_default();
    assert_eq!(
        selector,
        BTreeMap::from([(NODE_OPT_IN_LABEL.to_string(), "true".to_string())])
    );
    let readme = std::fs::read_to_string(deploy_dir().join("../README.md")).expect("README");
    assert!(
        readme.contains(&format!("{NODE_OPT_IN_LABEL}=true")),
        "README documents the opt-in label"
    );

    let host_paths: BTreeMap<String, String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect();
    // mount path → (host path, read-only)
    let mounts: BTreeMap<String, (String, bool)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            let host = host_paths
                .get(&m.name)
                .unwrap_or_else(|| panic!("mount {} has a hostPath volume", m.name));
            (
                m.mount_path.clone(),
                (host.clone(), m.read_only.unwrap_or(false)),
            )
        })
        .collect();
    let want = [
        ("/host-root", "/", true),
        ("/host-root/sys", "/sys", false),
        // Only read (review N9).
        ("/host-root/dev", "/dev", true),
        // The unbind lock is written under /proc; the ledger outlives the pod.
        ("/host-root/proc", "/proc", false),
        ("/var/lib/vfio-gpu-dra", "/var/lib/vfio-gpu-dra", false),
        // The ledger's boot mirror on the host's /run (issue 18 item 6).
        ("/host-root/run/vfio-gpu-dra", "/run/vfio-gpu-dra", false),
        (
            "/var/lib/kubelet/plugins_registry",
            "/var/lib/kubelet/plugins_registry",
            false,
        ),
        // Only the plugin's own directory, not every driver's sockets (review M4).
        (
            "/var/lib/kubelet/plugins/vfio-gpu.dra.dev",
            "/var/lib/kubelet/plugins/vfio-gpu.dra.dev",
            false,
        ),
        ("/var/run/cdi", "/var/run/cdi", false),
    ];
    for (mount, host, ro) in &want {
        assert_eq!(
            mounts.get(*mount),
            Some(&(host.to_string(), *ro)),
            "mount {mount}"
        );
    }
    assert_eq!(mounts.len(), want.len(), "no other mounts: {mounts:?}");
    // Where serve writes (plugins/<driver>) is inside that mount.
    let dra = vfio_gpu_kubelet::grpc::server::ServerConfig::new(
        DRIVER,
        Path::new("/var/lib/kubelet/plugins"),
        Path::new("/var/lib/kubelet/plugins_registry"),
    );
    assert!(
        dra.dra_socket
            .starts_with(format!("/var/lib/kubelet/plugins/{DRIVER}")),
        "{}",
        dra.dra_socket.display()
    );
    // Read-only host mounts are recursively so (review M4/N9): /var, /run and the
    // pods' volumes under the host root must not stay writable.
    for m in c.volume_mounts.iter().flatten() {
        if m.mount_path.starts_with("/host-root") && m.read_only == Some(true) {
            assert_eq!(
                m.recursive_read_only.as_deref(),
                Some("IfPossible"),
                "{} is not recursively read-only",
                m.mount_path
            );
            assert!(
                m.mount_propagation.is_none(),
                "{}: recursiveReadOnly needs mountPropagation None",
                m.mount_path
            );
        }
    }
}

/// The environment variable of `serve --metrics-addr`.
const METRICS_ENV: &str = "VFIO_GPU_DRA_METRICS_ADDR";

/// The metrics port serves the probes: liveness on /healthz, readiness on /readyz,
/// and the address `serve` listens on is that port (set through the flag's env var).
fn daemonset_probes(c: &k8s_openapi::api::core::v1::Container) {
    let serve_cmd = std::fs::read_to_string(deploy_dir().join("../crates/cli/src/serve_cmd.rs"))
        .expect("serve_cmd.rs");
    assert!(
        serve_cmd.contains(&format!("env = \"{METRICS_ENV}\"")),
        "serve reads --metrics-addr from {METRICS_ENV}"
    );
    let addr = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == METRICS_ENV)
        .and_then(|e| e.value.clone())
        .expect("metrics address set");
    let port: i32 = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr} is HOST:PORT"));
    let ports = c.ports.clone().unwrap_or_default();
    let metrics = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(
        metrics.container_port, port,
        "serve listens on the metrics port"
    );
    for (probe, path) in [
        (c.liveness_probe.as_ref(), "/healthz"),
        (c.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an httpGet probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("metrics".into()), "{path}");
    }
    // Liveness must outlast a slow but healthy startup (engine lock, reconcile).
    let live = c.liveness_probe.as_ref().expect("liveness");
    let budget = live.period_seconds.unwrap_or(10) * live.failure_threshold.unwrap_or(3);
    assert!(budget >= 60, "liveness gives up after only {budget} s");
}

#[test]
fn kubevirt_example_references_its_claim_template() {
    let p = parse_all();
    let [template] = p.templates.as_slice() else {
        panic!("one ResourceClaimTemplate");
    };
    let template_name = template.metadata.name.clone().expect("name");
    let requests = template.spec.spec.devices.as_ref().expect("devices");
    let request_names: Vec<String> = requests
        .requests
        .iter()
        .flatten()
        .map(|r| r.name.clone())
        .collect();
    let classes: Vec<String> = requests
        .requests
        .iter()
        .flatten()
        .filter_map(|r| r.exactly.as_ref().map(|e| e.device_class_name.clone()))
        .collect();
    assert!(
        classes.iter().all(|c| p
            .classes
            .iter()
            .any(|k| k.metadata.name.as_ref() == Some(c))),
        "requests use a class from deviceclass.yaml"
    );

    let [vm] = p.vms.as_slice() else {
        panic!("one VirtualMachine");
    };
    let spec = &vm["spec"]["template"]["spec"];
    let claims = spec["resourceClaims"].as_array().expect("resourceClaims");
    let gpus = spec["domain"]["devices"]["gpus"].as_array().expect("gpus");
    assert!(!gpus.is_empty());
    for gpu in gpus {
        assert!(gpu["name"].is_string());
        let claim = claims
            .iter()
            .find(|c| c["name"] == gpu["claimName"])
            .unwrap_or_else(|| panic!("gpu {} names a listed claim", gpu["name"]));
        assert_eq!(claim["resourceClaimTemplateName"], template_name.as_str());
        assert!(
            request_names
                .iter()
                .any(|r| gpu["requestName"] == r.as_str()),
            "requestName is a request of the template"
        );
    }
    // Disks refer to volumes.
    let volumes: Vec<&Value> = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| &v["name"])
        .collect();
    for disk in spec["domain"]["devices"]["disks"]
        .as_array()
        .expect("disks")
    {
        assert!(volumes.contains(&&disk["name"]), "disk {}", disk["name"]);
    }
}

#[test]
fn documented_requirements_match_what_the_code_needs() {
    let readme = std::fs::read_to_string(deploy_dir().join("../README.md")).expect("README");
    let start = readme
        .find("\n## Requirements\n")
        .expect("README has a Requirements section");
    let section = &readme[start..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |i| i + 1)];
    for needed in [
        "resource.k8s.io/v1",
        "1.34",
        "1.34.1",
        "kubernetes#133920",
        "v1beta1",
        "1.8.3",
        "GPUsWithDRA",
        "1.9.0",
        "CDI",
        "enable_cdi = true",
        "cdi_spec_dirs",
        "iommufd",
    ] {
        assert!(
            section.contains(needed),
            "Requirements lacks {needed:?}:\n{section}"
        );
    }
    // KEP-5304 has no Kubernetes feature gate: the example must not claim one.
    let vm = std::fs::read_to_string(deploy_dir().join("kubevirt-vm.yaml")).expect("vm");
    let header: String = vm.lines().take_while(|l| l.starts_with('#')).collect();
    assert!(!header.contains("1.36"), "{header}");
    assert!(
        header.contains("1.8.3") && header.contains("1.9.0"),
        "{header}"
    );
}

/// Security review H1: only the monitoring namespace reaches the plugin pods,
/// and only on the metrics port the DaemonSet names.
#[test]
fn network_policy_admits_only_monitoring_on_the_metrics_port() {
    let p = parse_all();
    let [np] = p.network_policies.as_slice() else {
        panic!("one NetworkPolicy");
    };
    let [ds] = p.daemonsets.as_slice() else {
        panic!("one DaemonSet");
    };
    assert_eq!(np.metadata.namespace, ds.metadata.namespace);
    let spec = np.spec.as_ref().expect("spec");
    let pod_labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = spec
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone());
    assert!(selector.as_ref().is_some_and(|m| !m.is_empty()));
    for (k, v) in selector.unwrap_or_default() {
        assert_eq!(pod_labels.get(&k), Some(&v), "selects the plugin pods");
    }
    assert_eq!(spec.policy_types.clone().unwrap_or_default(), ["Ingress"]);
    let [rule] = spec.ingress.as_deref().unwrap_or_default() else {
        panic!("one ingress rule");
    };
    let ports: Vec<_> = rule
        .ports
        .iter()
        .flatten()
        .map(|p| p.port.clone())
        .collect();
    assert_eq!(ports, [Some(IntOrString::String("metrics".into()))]);
    let container_ports: Vec<String> = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| {
            s.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| p.name.clone())
                .collect()
        })
        .unwrap_or_default();
    assert!(container_ports.contains(&"metrics".to_string()));
    let [from] = rule.from.as_deref().unwrap_or_default() else {
        panic!("one source");
    };
    assert!(from.pod_selector.is_none() && from.ip_block.is_none());
    assert_eq!(
        from.namespace_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default()
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("monitoring")
    );
}

/// M4: the DaemonSet runs the plugin as root without privileged or hostPID,
/// with only the capabilities docs/security.md explains, the same ones the
/// real-kernel scenario (tests/vm plugin-caps) runs it with.
#[test]
fn daemonset_runs_with_least_privilege() {
    let p = parse_all();
    let [ds] = p.daemonsets.as_slice() else {
        panic!("one DaemonSet");
    };
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    // M4: the holder scan reads the host's /proc through the host-root mount
    // (tests/vm plugin-caps proves it finds a host process from its own PID
    // namespace), so no hostPID.
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed (M4)");
    let [c] = pod.containers.as_slice() else {
        panic!("one container");
    };
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(false), "not privileged (M4)");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: Vec<String> = caps.add.clone().unwrap_or_default();
    assert_eq!(
        added,
        ["SYS_PTRACE", "DAC_READ_SEARCH", "SYS_CHROOT", "SYS_MODULE"],
        "the capabilities docs/security.md explains"
    );
    // The real-kernel proof runs the plugin with exactly these.
    let scenario = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/vm/guest/scenarios/plugin-caps.sh"),
    )
    .expect("tests/vm plugin-caps scenario");
    let vm_caps: Vec<String> = scenario
        .lines()
        .find_map(|l| l.strip_prefix("CAPS=\""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("CAPS=\"...\" in plugin-caps.sh")
        .split_whitespace()
        .map(str::to_uppercase)
        .collect();
    assert_eq!(
        vm_caps, added,
        "tests/vm plugin-caps runs the DaemonSet's capabilities"
    );
    for doc in ["SYS_PTRACE", "DAC_READ_SEARCH", "SYS_CHROOT", "SYS_MODULE"] {
        assert!(
            security_doc().contains(&format!("`CAP_{doc}`")),
            "docs/security.md explains CAP_{doc}"
        );
    }
}

/// docs/security.md.
fn security_doc() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/security.md"),
    )
    .expect("docs/security.md")
}
