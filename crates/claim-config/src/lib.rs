//! The opaque per-claim configuration of this driver (`VfioDeviceConfig`) and its
//! resolution from a claim's allocation.
//!
//! ```json
//! {"apiVersion": "vfio-gpu.dra.dev/v1alpha1", "kind": "VfioDeviceConfig",
//!  "iommuBackend": "legacy", "apiDevice": true, "consumer": "kubevirt"}
//! ```
//!
//! Entries of `status.allocation.devices.config[]` whose `opaque.driver` is this driver
//! apply in order `FromClass` then `FromClaim`; a later entry replaces an earlier one
//! for the requests it covers (empty `requests` = all, `main` covers `main/sub`).

#![warn(missing_docs)]

use k8s_openapi::api::resource::v1::DeviceAllocationConfiguration;
use serde_json::Value;

/// `apiVersion` of [`VfioDeviceConfig`].
pub const API_VERSION: &str = "vfio-gpu.dra.dev/v1alpha1";
/// `kind` of [`VfioDeviceConfig`].
pub const KIND: &str = "VfioDeviceConfig";

/// How the container reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IommuBackend {
    /// `/dev/vfio/<group>` (+ `/dev/vfio/vfio`): what KubeVirt uses.
    #[default]
    Legacy,
    /// `/dev/vfio/devices/vfioN` + `/dev/iommu` (kernel ≥ 6.6 with `CONFIG_IOMMUFD` and `CONFIG_VFIO_DEVICE_CDEV`).
    Iommufd,
}

/// Resolved configuration for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceConfig {
    /// Legacy group nodes or iommufd cdevs.
    pub iommu_backend: IommuBackend,
    /// Expose the API device (`/dev/vfio/vfio` for legacy). KubeVirt always needs it,
    /// hence the default (the NVIDIA driver's default of false broke it, upstream #1415).
    pub api_device: bool,
    /// Who opens the device, when a DeviceClass says so; prepare refuses layouts that
    /// consumer cannot use.
    pub consumer: Option<Consumer>,
}

impl Default for VfioDeviceConfig {
    fn default() -> Self {
        Self {
            iommu_backend: IommuBackend::Legacy,
            api_device: true,
            consumer: None,
        }
    }
}

/// The program that opens the device in the container (`consumer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumer {
    /// KubeVirt's virt-launcher: libvirt opens `/dev/vfio/<group>` for DRA host
    /// devices and gets an iommufd descriptor only from KubeVirt's own device plugin,
    /// so the `iommufd` layout of this driver is of no use to it.
    KubeVirt,
}

/// A configuration entry this driver cannot accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("opaque config #{index} for driver {driver}: {message}")]
pub struct ConfigError {
    /// Position in `status.allocation.devices.config[]`.
    pub index: usize,
    /// Our driver name.
    pub driver: String,
    /// What is wrong, naming the field.
    pub message: String,
}

/// Parses one `opaque.parameters` object.
pub fn parse_parameters(params: &Value) -> Result<VfioDeviceConfig, String> {
    let obj = params.as_object().ok_or_else(|| {
        format!(
            "parameters must be a JSON object, got {}",
            type_name(params)
        )
    })?;
    let mut cfg = VfioDeviceConfig::default();
    let mut api_version = None;
    let mut kind = None;
    for (key, value) in obj {
        match key.as_str() {
            "apiVersion" => api_version = Some(string_field(key, value)?),
            "kind" => kind = Some(string_field(key, value)?),
            "iommuBackend" => {
                cfg.iommu_backend = match string_field(key, value)? {
                    "legacy" => IommuBackend::Legacy,
                    "iommufd" => IommuBackend::Iommufd,
                    other => {
                        return Err(format!(
                            "field iommuBackend: unknown value {other:?} (expected \"legacy\" or \"iommufd\")"
                        ));
                    }
                }
            }
            "consumer" => {
                cfg.consumer = match string_field(key, value)? {
                    "kubevirt" => Some(Consumer::KubeVirt),
                    other => {
                        return Err(format!(
                            "field consumer: unknown value {other:?} (expected \"kubevirt\")"
                        ));
                    }
                }
            }
            "apiDevice" => {
                cfg.api_device = value.as_bool().ok_or_else(|| {
                    format!(
                        "field apiDevice: expected a boolean, got {}",
                        type_name(value)
                    )
                })?
            }
            other => {
                return Err(format!(
                    "unknown field {other:?} (known: apiVersion, kind, iommuBackend, apiDevice, consumer)"
                ));
            }
        }
    }
    match api_version {
        Some(API_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "field apiVersion: unsupported {v:?} (expected {API_VERSION:?})"
            ));
        }
        None => {
            return Err(format!(
                "field apiVersion: missing (expected {API_VERSION:?})"
            ));
        }
    }
    match kind {
        Some(KIND) => {}
        Some(k) => return Err(format!("field kind: unsupported {k:?} (expected {KIND:?})")),
        None => return Err(format!("field kind: missing (expected {KIND:?})")),
    }
    Ok(cfg)
}

fn string_field<'a>(key: &str, value: &'a Value) -> Result<&'a str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("field {key}: expected a string, got {}", type_name(value)))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The base request of a `request/subrequest` reference.
pub fn base_request(request: &str) -> &str {
    request.split_once('/').map_or(request, |(base, _)| base)
}

/// Whether a config entry listing `requests` applies to the allocation result of
/// `request` (which may be `main/sub`).
fn covers(requests: &[String], request: &str) -> bool {
    requests.is_empty()
        || requests
            .iter()
            .any(|r| r == request || r == base_request(request))
}

/// This driver's configuration entries of one claim, parsed and in precedence order.
#[derive(Debug, Clone, Default)]
pub struct ClaimConfig {
    entries: Vec<(Vec<String>, VfioDeviceConfig)>,
}

impl ClaimConfig {
    /// Parses every entry for `driver`; any invalid entry fails the whole claim, so a
    /// typo never silently falls back to defaults.
    pub fn from_allocation(
        config: &[DeviceAllocationConfiguration],
        driver: &str,
    ) -> Result<Self, ConfigError> {
        let mut class = Vec::new();
        let mut claim = Vec::new();
        for (index, entry) in config.iter().enumerate() {
            let Some(opaque) = entry.opaque.as_ref() else {
                continue;
            };
            if opaque.driver != driver {
                continue;
            }
            let err = |message: String| ConfigError {
                index,
                driver: driver.to_string(),
                message,
            };
            let parsed = parse_parameters(&opaque.parameters.0).map_err(err)?;
            let requests = entry.requests.clone().unwrap_or_default();
            match entry.source.as_str() {
                "FromClass" => class.push((requests, parsed)),
                "FromClaim" => claim.push((requests, parsed)),
                other => return Err(err(format!("field source: unknown value {other:?}"))),
            }
        }
        class.extend(claim);
        Ok(Self { entries: class })
    }

    /// The configuration for the device allocated to `request`: the last applicable
    /// entry wins, defaults when none applies. `consumer` is the exception: an entry
    /// that does not name one keeps the class's, so a claim choosing a backend cannot
    /// make a KubeVirt class forget who opens the device.
    pub fn for_request(&self, request: &str) -> VfioDeviceConfig {
        let mut applicable = self
            .entries
            .iter()
            .rev()
            .filter(|(requests, _)| covers(requests, request));
        let Some((_, last)) = applicable.next() else {
            return VfioDeviceConfig::default();
        };
        let mut cfg = *last;
        if cfg.consumer.is_none() {
            cfg.consumer = applicable.find_map(|(_, c)| c.consumer);
        }
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(
        source: &str,
        driver: &str,
        requests: &[&str],
        params: Value,
    ) -> DeviceAllocationConfiguration {
        serde_json::from_value(json!({
            "source": source,
            "requests": requests,
            "opaque": {"driver": driver, "parameters": params}
        }))
        .unwrap()
    }

    fn cfg(backend: &str, api: bool) -> Value {
        json!({"apiVersion": API_VERSION, "kind": KIND, "iommuBackend": backend, "apiDevice": api})
    }

    #[test]
    fn defaults_and_full() {
        let d = parse_parameters(&json!({"apiVersion": API_VERSION, "kind": KIND})).unwrap();
        assert_eq!(
            d,
            VfioDeviceConfig {
                iommu_backend: IommuBackend::Legacy,
                api_device: true,
                consumer: None
            }
        );
        let f = parse_parameters(&cfg("iommufd", false)).unwrap();
        assert_eq!(
            f,
            VfioDeviceConfig {
                iommu_backend: IommuBackend::Iommufd,
                api_device: false,
                consumer: None
            }
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_parameters(&json!({"apiVersion": API_VERSION, "kind": KIND, "iommu": "x"}))
            .unwrap_err();
        assert!(e.contains("\"iommu\""), "{e}");
        let e = parse_parameters(&json!({"apiVersion": "v1", "kind": KIND})).unwrap_err();
        assert!(e.starts_with("field apiVersion"), "{e}");
        let e =
            parse_parameters(&json!({"apiVersion": API_VERSION, "kind": "GpuConfig"})).unwrap_err();
        assert!(e.starts_with("field kind"), "{e}");
        let e =
            parse_parameters(&json!({"apiVersion": API_VERSION, "kind": KIND, "apiDevice": "yes"}))
                .unwrap_err();
        assert!(e.starts_with("field apiDevice"), "{e}");
        let e = parse_parameters(
            &json!({"apiVersion": API_VERSION, "kind": KIND, "iommuBackend": "fast"}),
        )
        .unwrap_err();
        assert!(e.starts_with("field iommuBackend"), "{e}");
        assert!(parse_parameters(&json!([1])).is_err());
        assert!(
            parse_parameters(&json!({"kind": KIND}))
                .unwrap_err()
                .contains("apiVersion")
        );
    }

    #[test]
    fn precedence_class_then_claim_later_wins() {
        let d = "vfio-gpu.dra.dev";
        let config = vec![
            // Claim entry listed first must still override the class entry.
            entry("FromClaim", d, &["main"], cfg("iommufd", true)),
            entry("FromClass", d, &[], cfg("legacy", false)),
            entry(
                "FromClaim",
                "other.example.com",
                &[],
                json!({"anything": 1}),
            ),
            entry("FromClaim", d, &["other"], cfg("legacy", true)),
        ];
        let c = ClaimConfig::from_allocation(&config, d).unwrap();
        assert_eq!(c.for_request("main").iommu_backend, IommuBackend::Iommufd);
        assert_eq!(
            c.for_request("main/sub").iommu_backend,
            IommuBackend::Iommufd
        );
        assert_eq!(
            c.for_request("other"),
            VfioDeviceConfig {
                iommu_backend: IommuBackend::Legacy,
                api_device: true,
                consumer: None
            }
        );
        assert_eq!(
            c.for_request("third"),
            VfioDeviceConfig {
                iommu_backend: IommuBackend::Legacy,
                api_device: false,
                consumer: None
            }
        );
        // `main/sub` listed explicitly does not cover `main/other`.
        let c = ClaimConfig::from_allocation(
            &[entry("FromClaim", d, &["main/sub"], cfg("iommufd", true))],
            d,
        )
        .unwrap();
        assert_eq!(
            c.for_request("main/sub").iommu_backend,
            IommuBackend::Iommufd
        );
        assert_eq!(
            c.for_request("main/other").iommu_backend,
            IommuBackend::Legacy
        );
    }

    #[test]
    fn invalid_entry_fails_claim_with_index() {
        let d = "vfio-gpu.dra.dev";
        let config = vec![
            entry("FromClass", d, &[], cfg("legacy", true)),
            entry(
                "FromClaim",
                d,
                &[],
                json!({"apiVersion": API_VERSION, "kind": KIND, "bogus": 1}),
            ),
        ];
        let e = ClaimConfig::from_allocation(&config, d).unwrap_err();
        assert_eq!(e.index, 1);
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn consumer_from_the_class_survives_a_claim_entry_without_one() {
        let d = "vfio-gpu.dra.dev";
        let class = json!({"apiVersion": API_VERSION, "kind": KIND, "consumer": "kubevirt"});
        let c = ClaimConfig::from_allocation(
            &[
                entry("FromClass", d, &[], class),
                entry("FromClaim", d, &["gpu"], cfg("iommufd", true)),
            ],
            d,
        )
        .unwrap();
        let gpu = c.for_request("gpu");
        assert_eq!(gpu.iommu_backend, IommuBackend::Iommufd);
        assert_eq!(gpu.consumer, Some(Consumer::KubeVirt));
        assert_eq!(c.for_request("other").consumer, Some(Consumer::KubeVirt));
        assert_eq!(ClaimConfig::default().for_request("gpu").consumer, None);
        let e =
            parse_parameters(&json!({"apiVersion": API_VERSION, "kind": KIND, "consumer": "qemu"}))
                .unwrap_err();
        assert!(e.starts_with("field consumer"), "{e}");
    }
}
