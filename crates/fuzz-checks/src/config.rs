//! Target `config`: the opaque `VfioDeviceConfig` from claims and
//! DeviceClasses, and the ResourceClaim (allocation, results, config
//! entries) as the API server returns it.
//!
//! Input: one selector byte, then JSON. Selector bit 0 picks what the JSON
//! is: a `ResourceClaim` (decoded with k8s-openapi, as the kube client does,
//! then resolved like `prepare` does) or one `opaque.parameters` object.
//! Properties: a rejected parameters object names the field at fault; an
//! accepted one reads back the same from its canonical form; a rejected
//! claim points at one of this driver's entries; the configuration chosen
//! for each allocated request is the last applicable entry, class entries
//! before claim entries.

use k8s_openapi::api::resource::v1::{DeviceAllocationConfiguration, ResourceClaim};
use serde_json::{Value, json};
use vfio_gpu_claim_config::{
    API_VERSION, ClaimConfig, IommuBackend, KIND, VfioDeviceConfig, base_request, parse_parameters,
};

const DRIVER: &str = "vfio-gpu.dra.dev";

/// Fields a message may name.
const FIELDS: &[&str] = &["apiVersion", "kind", "iommuBackend", "apiDevice"];

fn check_parameters(v: &Value) -> Option<VfioDeviceConfig> {
    match parse_parameters(v) {
        Ok(cfg) => {
            let canonical = json!({
                "apiVersion": API_VERSION,
                "kind": KIND,
                "iommuBackend": match cfg.iommu_backend {
                    IommuBackend::Legacy => "legacy",
                    IommuBackend::Iommufd => "iommufd",
                },
                "apiDevice": cfg.api_device,
            });
            assert_eq!(
                parse_parameters(&canonical),
                Ok(cfg),
                "canonical form reads differently"
            );
            Some(cfg)
        }
        Err(msg) => {
            let names_field = if v.is_object() {
                FIELDS
                    .iter()
                    .any(|f| msg.starts_with(&format!("field {f}:")))
                    || (msg.starts_with("unknown field ")
                        && v.as_object()
                            .is_some_and(|o| o.keys().any(|k| msg.contains(&format!("{k:?}")))))
            } else {
                msg.starts_with("parameters must be a JSON object")
            };
            assert!(names_field, "error does not name the field: {msg}");
            None
        }
    }
}

/// Ours, applying to `request`, in precedence order: the reference for
/// `ClaimConfig::for_request`.
fn expected(config: &[DeviceAllocationConfiguration], request: &str) -> VfioDeviceConfig {
    let ours = |source: &'static str| {
        config
            .iter()
            .filter(move |e| e.source == source)
            .filter_map(|e| {
                Some((
                    e.requests.as_deref().unwrap_or_default(),
                    e.opaque.as_ref()?,
                ))
            })
            .filter(|(_, o)| o.driver == DRIVER)
    };
    let mut chosen = VfioDeviceConfig::default();
    for (requests, opaque) in ours("FromClass").chain(ours("FromClaim")) {
        let applies = requests.is_empty()
            || requests
                .iter()
                .any(|r| r == request || r == base_request(request));
        if applies && let Ok(c) = parse_parameters(&opaque.parameters.0) {
            chosen = c;
        }
    }
    chosen
}

fn check_claim(claim: &ResourceClaim) {
    let Some(devices) = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
    else {
        return;
    };
    let config = devices.config.as_deref().unwrap_or_default();
    for e in config {
        if let Some(o) = &e.opaque {
            // Only a panic is a finding; a refusal is a valid answer.
            let _ = check_parameters(&o.parameters.0);
        }
    }
    match ClaimConfig::from_allocation(config, DRIVER) {
        Ok(cc) => {
            for r in devices.results.iter().flatten() {
                assert_eq!(
                    cc.for_request(&r.request),
                    expected(config, &r.request),
                    "{}",
                    r.request
                );
            }
            assert_eq!(cc.for_request("main/sub"), expected(config, "main/sub"));
        }
        Err(e) => {
            let entry = config.get(e.index).and_then(|c| c.opaque.as_ref());
            assert!(
                entry.is_some_and(|o| o.driver == DRIVER),
                "error points at entry #{} which is not ours: {e}",
                e.index
            );
            let m = &e.message;
            assert!(
                m.starts_with("field ")
                    || m.starts_with("unknown field ")
                    || m.starts_with("parameters must be a JSON object"),
                "error does not name the field: {e}"
            );
        }
    }
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let Some((&selector, json)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        if let Ok(claim) = serde_json::from_slice::<ResourceClaim>(json) {
            check_claim(&claim);
        }
    } else if let Ok(v) = serde_json::from_slice::<Value>(json) {
        // Only a panic is a finding; a refusal is a valid answer.
        let _ = check_parameters(&v);
    }
}
