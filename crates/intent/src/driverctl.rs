//! driverctl's persistent overrides: `/etc/driverctl.d/pci-<BDF>` holds a
//! driver name that a udev rule re-applies on every device add.

use std::collections::BTreeMap;
use std::io::ErrorKind;

use serde::Serialize;
use vfio_gpu_host::{Bdf, HostRoot, is_vfio_driver};

use crate::modprobe::ConfigProblem;
use crate::read::{ReadOutcome, host_path, read_text};

/// driverctl's configuration directory.
pub const DRIVERCTL_DIR: &str = "etc/driverctl.d";

/// What a driverctl file asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "driver")]
pub enum DriverctlSetting {
    /// A vfio driver (`vfio-pci` or a variant): admin passthrough, keep on vfio.
    Vfio(String),
    /// `none`: the admin keeps the device unbound. Pinned.
    None,
    /// A host driver: the admin pinned the device to it. Pinned.
    Host(String),
    /// The file exists but is empty or unreadable; the reason. Counts as
    /// admin-owned (kept and pinned).
    Unknown(String),
}

impl DriverctlSetting {
    /// Classifies a file's content (driverctl writes the name and a newline).
    pub fn classify(content: &str) -> DriverctlSetting {
        let name = content.trim();
        if name.is_empty() {
            DriverctlSetting::Unknown("the file is empty".into())
        } else if name.split_whitespace().count() > 1 {
            DriverctlSetting::Unknown(format!("{name:?} is not one driver name"))
        } else if name == "none" {
            DriverctlSetting::None
        } else if is_vfio_driver(name) {
            DriverctlSetting::Vfio(name.to_string())
        } else {
            DriverctlSetting::Host(name.to_string())
        }
    }
}

/// One driverctl override.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverctlEntry {
    /// Host path of the file.
    pub path: String,
    /// What it asks for.
    pub setting: DriverctlSetting,
}

/// All driverctl overrides on a host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Driverctl {
    /// Overrides by PCI address.
    pub entries: BTreeMap<Bdf, DriverctlEntry>,
    /// The directory exists but cannot be listed: every device is unknown.
    pub problem: Option<ConfigProblem>,
    /// Files ignored (not a canonical `pci-<BDF>` name).
    pub warnings: Vec<String>,
}

impl Driverctl {
    /// Reads `etc/driverctl.d`. Never fails: unreadable entries become
    /// [`DriverctlSetting::Unknown`], an unlistable directory `problem`.
    pub fn load(root: &HostRoot) -> Driverctl {
        let mut out = Driverctl::default();
        let dir = root.rel(DRIVERCTL_DIR);
        let entries = match root.read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return out,
            Err(e) => {
                out.problem = Some(ConfigProblem {
                    path: host_path(DRIVERCTL_DIR),
                    error: e.to_string(),
                });
                return out;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    out.problem = Some(ConfigProblem {
                        path: host_path(DRIVERCTL_DIR),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(dev) = name.strip_prefix("pci-") else {
                continue;
            };
            // The udev rule tests the kernel's own (lower-case) name, so a
            // differently spelled file never applies.
            let Some(bdf) = dev.parse::<Bdf>().ok().filter(|b| b.to_string() == dev) else {
                out.warnings.push(format!(
                    "{}/{name}: not a canonical PCI address; driverctl never applies it",
                    host_path(DRIVERCTL_DIR)
                ));
                continue;
            };
            let path = format!("{}/{name}", host_path(DRIVERCTL_DIR));
            let setting = match read_text(root, &entry.path()) {
                ReadOutcome::Text(t) => DriverctlSetting::classify(&t),
                ReadOutcome::Missing => continue,
                ReadOutcome::Failed(e) => DriverctlSetting::Unknown(format!("cannot read it: {e}")),
            };
            out.entries.insert(bdf, DriverctlEntry { path, setting });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify() {
        assert_eq!(
            DriverctlSetting::classify("vfio-pci\n"),
            DriverctlSetting::Vfio("vfio-pci".into())
        );
        assert_eq!(
            DriverctlSetting::classify("nvgrace_gpu_vfio_pci"),
            DriverctlSetting::Vfio("nvgrace_gpu_vfio_pci".into())
        );
        assert_eq!(DriverctlSetting::classify("none\n"), DriverctlSetting::None);
        assert_eq!(
            DriverctlSetting::classify("nvidia\n"),
            DriverctlSetting::Host("nvidia".into())
        );
        assert!(matches!(
            DriverctlSetting::classify("\n"),
            DriverctlSetting::Unknown(_)
        ));
    }
}
