//! The administrator's policy file for this driver (e.g.
//! `/etc/vfio-gpu-dra/policy.toml`).
//!
//! ```toml
//! [keep-on-vfio]
//! pci-bus-ids = ["0000:65:00.0"]
//! models = ["10de:2330", "10de:2335:10de:18bf"]
//! [binding]
//! allow-foreign-group-members = false
//! load-vfio-module = false
//! vfio-driver = "auto"
//! [sanitize]
//! mode = "reset"                      # "reset" | "reset+hook" | "off"
//! hook = "/usr/local/sbin/scrub-gpu"  # run after the reset with the GPU's address
//! hook-timeout-secs = 300
//! models = { "10de:2330" = "reset+hook" }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vfio_gpu_host::{Bdf, DriverName, HostRoot};

use crate::IntentError;
use crate::ids::IdEntry;

/// The whole policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Policy {
    /// GPUs to keep on vfio regardless of other signals.
    pub keep_on_vfio: KeepOnVfio,
    /// How the engine may bind.
    pub binding: Binding,
    /// How a GPU is sanitized between tenants.
    pub sanitize: Sanitize,
}

/// What a release does to a GPU before it is offered to the next tenant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum SanitizeMode {
    /// Reset every function of the group and verify it.
    #[default]
    #[serde(rename = "reset")]
    Reset,
    /// Reset, run the scrub hook, verify.
    #[serde(rename = "reset+hook")]
    ResetAndHook,
    /// Neither reset nor verify (the next tenant may see the last one's memory).
    #[serde(rename = "off")]
    Off,
}

impl SanitizeMode {
    fn parse(s: &str) -> Option<SanitizeMode> {
        match s {
            "reset" => Some(SanitizeMode::Reset),
            "reset+hook" => Some(SanitizeMode::ResetAndHook),
            "off" => Some(SanitizeMode::Off),
            _ => None,
        }
    }
}

impl fmt::Display for SanitizeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SanitizeMode::Reset => "reset",
            SanitizeMode::ResetAndHook => "reset+hook",
            SanitizeMode::Off => "off",
        })
    }
}

/// `[sanitize]`: the default mode, per-model modes and the scrub hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Sanitize {
    /// The mode of every model not listed in `models`.
    pub mode: SanitizeMode,
    /// Per model (`vfio-pci.ids` entry syntax), first match wins.
    pub models: Vec<(IdEntry, SanitizeMode)>,
    /// The scrub hook (absolute path on the host), run as `<hook> <GPU address>`.
    pub hook: Option<PathBuf>,
    /// How long the hook may run before it is killed and the GPU quarantined.
    pub hook_timeout_secs: u64,
}

impl Default for Sanitize {
    fn default() -> Self {
        Sanitize {
            mode: SanitizeMode::Reset,
            models: Vec::new(),
            hook: None,
            hook_timeout_secs: 300,
        }
    }
}

impl Sanitize {
    /// The mode for a GPU with this identity: the first matching model entry,
    /// else the default.
    pub fn mode_for(&self, identity: &vfio_gpu_host::PciIdentity) -> SanitizeMode {
        self.models
            .iter()
            .find(|(entry, _)| entry.matches(identity))
            .map(|(_, mode)| *mode)
            .unwrap_or(self.mode)
    }
}

/// `[keep-on-vfio]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct KeepOnVfio {
    /// Exact functions (any function of a GPU keeps the whole GPU).
    pub pci_bus_ids: Vec<Bdf>,
    /// Models, with `vfio-pci.ids` entry syntax and matching.
    pub models: Vec<IdEntry>,
}

/// `[binding]`: knobs for the engine; they do not change verdicts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Binding {
    /// Move a group that holds a non-GPU device (e.g. a NIC).
    pub allow_foreign_group_members: bool,
    /// The engine may run the host's modprobe for vfio-pci.
    pub load_vfio_module: bool,
    /// Which vfio driver to bind.
    pub vfio_driver: VfioDriverChoice,
}

/// `vfio-driver`: `auto` (pick the variant from `modules.alias`, else
/// vfio-pci) or an explicit driver name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum VfioDriverChoice {
    /// Choose per device.
    #[default]
    Auto,
    /// Always this driver.
    Named(DriverName),
}

impl fmt::Display for VfioDriverChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VfioDriverChoice::Auto => f.write_str("auto"),
            VfioDriverChoice::Named(d) => f.write_str(d.as_str()),
        }
    }
}

impl Serialize for VfioDriverChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// The file's shape, before validation.
#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    keep_on_vfio: RawKeep,
    #[serde(default)]
    binding: RawBinding,
    #[serde(default)]
    sanitize: RawSanitize,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawSanitize {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    models: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    hook: Option<PathBuf>,
    #[serde(default)]
    hook_timeout_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawKeep {
    #[serde(default)]
    pci_bus_ids: Vec<String>,
    #[serde(default)]
    models: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawBinding {
    #[serde(default)]
    allow_foreign_group_members: bool,
    #[serde(default)]
    load_vfio_module: bool,
    #[serde(default)]
    vfio_driver: Option<String>,
}

impl Policy {
    /// Reads and validates a policy file, through the host root (the
    /// simulated kernel can fail or block it). Every error names the file.
    pub fn load(root: &HostRoot, path: impl AsRef<Path>) -> Result<Policy, IntentError> {
        let path = path.as_ref();
        match Policy::read(root, path)? {
            Some(text) => Policy::parse(&text, path),
            None => Err(IntentError::ReadPolicy {
                path: path.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
        }
    }

    /// Like [`Policy::load`], but a missing file is the default policy.
    pub fn load_or_default(root: &HostRoot, path: impl AsRef<Path>) -> Result<Policy, IntentError> {
        let path = path.as_ref();
        match Policy::read(root, path)? {
            Some(text) => Policy::parse(&text, path),
            None => Ok(Policy::default()),
        }
    }

    fn read(root: &HostRoot, path: &Path) -> Result<Option<String>, IntentError> {
        use crate::read::{ReadOutcome, read_text};
        match read_text(root, path) {
            ReadOutcome::Missing => Ok(None),
            ReadOutcome::Text(text) => Ok(Some(text)),
            ReadOutcome::Failed(reason) => Err(IntentError::ReadPolicy {
                path: path.to_path_buf(),
                source: std::io::Error::other(reason),
            }),
        }
    }

    /// Parses policy text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Policy, IntentError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| IntentError::ParsePolicy {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| IntentError::InvalidPolicy {
            path: PathBuf::from(path),
            message,
        };
        let pci_bus_ids = raw
            .keep_on_vfio
            .pci_bus_ids
            .iter()
            .map(|s| {
                s.parse::<Bdf>()
                    .map_err(|e| invalid(format!("keep-on-vfio.pci-bus-ids: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let models = raw
            .keep_on_vfio
            .models
            .iter()
            .map(|s| {
                IdEntry::parse_strict(s).ok_or_else(|| {
                    invalid(format!(
                        "keep-on-vfio.models: {s:?} is not vendor:device[:subvendor[:subdevice[:class[:class_mask]]]] in hex"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vfio_driver = match raw.binding.vfio_driver.as_deref() {
            None | Some("auto") => VfioDriverChoice::Auto,
            Some(name) => {
                let d = DriverName::new(name)
                    .map_err(|e| invalid(format!("binding.vfio-driver: {e}")))?;
                if !d.is_vfio() {
                    return Err(invalid(format!(
                        "binding.vfio-driver: {name:?} is not a vfio driver (expected \"auto\", \"vfio-pci\" or a vfio-pci variant)"
                    )));
                }
                VfioDriverChoice::Named(d)
            }
        };
        let mode = |field: &str, s: &str| {
            SanitizeMode::parse(s).ok_or_else(|| {
                invalid(format!(
                    "{field}: {s:?} is not \"reset\", \"reset+hook\" or \"off\""
                ))
            })
        };
        let default_mode = match raw.sanitize.mode.as_deref() {
            None => SanitizeMode::Reset,
            Some(s) => mode("sanitize.mode", s)?,
        };
        let mut sanitize_models = Vec::new();
        for (ids, m) in &raw.sanitize.models {
            let entry = IdEntry::parse_strict(ids).ok_or_else(|| {
                invalid(format!(
                    "sanitize.models: {ids:?} is not vendor:device[:subvendor[:subdevice[:class[:class_mask]]]] in hex"
                ))
            })?;
            sanitize_models.push((entry, mode(&format!("sanitize.models.{ids:?}"), m)?));
        }
        if let Some(hook) = &raw.sanitize.hook
            && !hook.is_absolute()
        {
            return Err(invalid(format!(
                "sanitize.hook: {} is not an absolute path",
                hook.display()
            )));
        }
        let wants_hook = default_mode == SanitizeMode::ResetAndHook
            || sanitize_models
                .iter()
                .any(|(_, m)| *m == SanitizeMode::ResetAndHook);
        if wants_hook && raw.sanitize.hook.is_none() {
            return Err(invalid(
                "sanitize: a mode is \"reset+hook\" but no sanitize.hook is set".into(),
            ));
        }
        Ok(Policy {
            sanitize: Sanitize {
                mode: default_mode,
                models: sanitize_models,
                hook: raw.sanitize.hook,
                hook_timeout_secs: raw.sanitize.hook_timeout_secs.unwrap_or(300),
            },
            keep_on_vfio: KeepOnVfio {
                pci_bus_ids,
                models,
            },
            binding: Binding {
                allow_foreign_group_members: raw.binding.allow_foreign_group_members,
                load_vfio_module: raw.binding.load_vfio_module,
                vfio_driver,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[keep-on-vfio]
pci-bus-ids = ["0000:65:00.0"]          # exact GPUs
models = ["10de:2330", "10de:2335:10de:18bf"]
[binding]
allow-foreign-group-members = true
load-vfio-module = true
vfio-driver = "vfio-pci"
"#;

    #[test]
    fn full_file() {
        let p = Policy::parse(FULL, Path::new("/p.toml")).unwrap();
        assert_eq!(p.keep_on_vfio.pci_bus_ids[0].to_string(), "0000:65:00.0");
        assert_eq!(p.keep_on_vfio.models.len(), 2);
        assert_eq!(p.keep_on_vfio.models[1].subdevice, 0x18bf);
        assert!(p.binding.allow_foreign_group_members);
        assert!(p.binding.load_vfio_module);
        assert_eq!(p.binding.vfio_driver.to_string(), "vfio-pci");
    }

    #[test]
    fn empty_is_default() {
        assert_eq!(
            Policy::parse("", Path::new("/p")).unwrap(),
            Policy::default()
        );
        let p = Policy::parse("[binding]\nvfio-driver = \"auto\"\n", Path::new("/p")).unwrap();
        assert_eq!(p.binding.vfio_driver, VfioDriverChoice::Auto);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = Policy::parse("[keep-on-vfio]\nbdfs = []\n", Path::new("/etc/p.toml")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("/etc/p.toml") && s.contains("bdfs"), "{s}");
        let e = Policy::parse(
            "[keep-on-vfio]\npci-bus-ids = [\"65:00.0\"]\n",
            Path::new("/p"),
        )
        .unwrap_err();
        assert!(matches!(e, IntentError::InvalidPolicy { .. }), "{e}");
        let e = Policy::parse(
            "[keep-on-vfio]\nmodels = [\"10de:2204xyz\"]\n",
            Path::new("/p"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("10de:2204xyz"), "{e}");
        let e =
            Policy::parse("[binding]\nvfio-driver = \"nvidia\"\n", Path::new("/p")).unwrap_err();
        assert!(e.to_string().contains("not a vfio driver"), "{e}");
        let e =
            Policy::parse("[binding]\nload-vfio-module = \"yes\"\n", Path::new("/p")).unwrap_err();
        assert!(matches!(e, IntentError::ParsePolicy { .. }), "{e}");
        let e = Policy::parse("top = 1\n", Path::new("/p")).unwrap_err();
        assert!(matches!(e, IntentError::ParsePolicy { .. }), "{e}");
    }

    #[test]
    fn sanitize_modes_per_model_and_errors() {
        let p = Policy::parse(
            "[sanitize]\nmode = \"off\"\nhook = \"/usr/sbin/scrub\"\nmodels = { \"10de:2330\" = \"reset+hook\" }\n",
            Path::new("/p"),
        )
        .unwrap();
        let id = |device| vfio_gpu_host::PciIdentity {
            vendor: 0x10de,
            device,
            subsystem_vendor: 0x10de,
            subsystem_device: 0,
            class: 0x03_0200,
        };
        assert_eq!(p.sanitize.mode_for(&id(0x2330)), SanitizeMode::ResetAndHook);
        assert_eq!(p.sanitize.mode_for(&id(0x2331)), SanitizeMode::Off);
        assert_eq!(
            Policy::default().sanitize.mode_for(&id(0x2330)),
            SanitizeMode::Reset
        );
        for bad in [
            "[sanitize]\nmode = \"wipe\"\n",
            "[sanitize]\nmode = \"reset+hook\"\n",
            "[sanitize]\nhook = \"scrub\"\n",
            "[sanitize]\nmodels = { \"10de\" = \"reset\" }\n",
        ] {
            let e = Policy::parse(bad, Path::new("/p")).unwrap_err();
            assert!(matches!(e, IntentError::InvalidPolicy { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn load_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
        let root = HostRoot::open(dir.path()).unwrap();
        let path = dir.path().join("policy.toml");
        let e = Policy::load(&root, &path).unwrap_err();
        assert!(matches!(e, IntentError::ReadPolicy { .. }));
        assert!(e.to_string().contains("policy.toml"));
        assert_eq!(
            Policy::load_or_default(&root, &path).unwrap(),
            Policy::default()
        );
        std::fs::write(&path, FULL).unwrap();
        assert_eq!(
            Policy::load(&root, &path)
                .unwrap()
                .keep_on_vfio
                .models
                .len(),
            2
        );
    }
}
