//! GPUs another driver on this node publishes too (NVIDIA's DRA driver with
//! passthrough support, say), which `serve` therefore does not offer.
//!
//! Only `serve` sees the cluster: after each slice sync it records what it
//! found in the state directory it shares with the CLI, and `doctor` and
//! `explain` read that record. So they can say why a GPU is not offered
//! without a kubeconfig, and what they say is what the plugin acted on, with
//! the time it looked.

// The record is this program's own file in its state directory, not host state
// it judges: read and written with std, like the ledger beside it.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vfio_gpu_engine::Inspection;
use vfio_gpu_host::Bdf;

use crate::checks::{Check, Status};

/// The record's file name in the state directory.
pub const OTHER_DRIVERS_FILE: &str = "other-drivers.json";

/// A record larger than this is not ours: refused, not parsed.
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// What `serve`'s last slice sync found: the GPUs of this node that another
/// driver's ResourceSlice publishes (by PCI address), and that driver.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OtherDrivers {
    /// When the sync looked, in seconds since the Unix epoch.
    pub observed_at_unix: u64,
    /// PCI address (lower case, with domain) → the other driver's name.
    pub gpus: BTreeMap<String, String>,
}

/// Reading or writing the record failed.
#[derive(Debug, thiserror::Error)]
pub enum OtherDriversError {
    /// The file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The file is not a record (corrupt, or someone else's).
    #[error("{path} is not a record of other drivers' GPUs: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl OtherDrivers {
    /// The record's path in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(OTHER_DRIVERS_FILE)
    }

    /// The record in `state_dir`; `None` when `serve` never wrote one there.
    pub fn read(state_dir: &Path) -> Result<Option<Self>, OtherDriversError> {
        let path = Self::path(state_dir);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(OtherDriversError::Io {
                    op: "opening",
                    path,
                    source,
                });
            }
        };
        let mut text = String::new();
        file.take(MAX_RECORD_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|source| OtherDriversError::Io {
                op: "reading",
                path: path.clone(),
                source,
            })?;
        if text.len() as u64 > MAX_RECORD_BYTES {
            return Err(OtherDriversError::Invalid {
                path,
                reason: format!("larger than {MAX_RECORD_BYTES} bytes"),
            });
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| OtherDriversError::Invalid {
                path,
                reason: e.to_string(),
            })
    }

    /// Replaces the record in `state_dir` atomically (a reader sees the old
    /// record or the new one, never half of one).
    pub fn write(&self, state_dir: &Path) -> Result<(), OtherDriversError> {
        let path = Self::path(state_dir);
        let tmp = state_dir.join(format!(".{OTHER_DRIVERS_FILE}.tmp"));
        let io = |op, source| OtherDriversError::Io {
            op,
            path: tmp.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(self).map_err(|e| OtherDriversError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut f = fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        f.write_all(&text).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
        fs::rename(&tmp, &path).map_err(|source| OtherDriversError::Io {
            op: "renaming into place",
            path,
            source,
        })
    }

    /// The other driver publishing the GPU at `bdf`, if any.
    pub fn driver_of(&self, bdf: &Bdf) -> Option<&str> {
        self.gpus.get(&bdf.to_string()).map(String::as_str)
    }
}

/// `other-driver`, one check per GPU of `view` that `record` says another
/// driver publishes (a warning: the GPU works, but not through this driver),
/// or one pass when it names none of them. No check without a record: no
/// `serve` has run with this state directory.
pub fn check_other_drivers(view: &Inspection, record: Option<&OtherDrivers>) -> Vec<Check> {
    let Some(record) = record else {
        return Vec::new();
    };
    let seen = format!(
        "serve's slice sync at {} (Unix time)",
        record.observed_at_unix
    );
    let shared: Vec<Check> = view
        .gpus
        .iter()
        .filter_map(|g| {
            let bdf = g.gpu.bdf();
            let driver = record.driver_of(&bdf)?;
            Some(
                Check::new(
                    "other-driver",
                    Status::Warn,
                    format!(
                        "{bdf}: driver {driver} publishes this GPU on this node too ({seen}); \
                         vfio-gpu-dra does not offer it, so no claim gets it from two drivers"
                    ),
                    format!(
                        "give each GPU one driver: to pass it through with vfio-gpu-dra, stop {driver} \
                         publishing {bdf} (docs/operating.md: Sharing a node with NVIDIA's DRA driver); else leave it to {driver}"
                    ),
                )
                .for_gpu(bdf),
            )
        })
        .collect();
    if shared.is_empty() {
        vec![Check::pass(
            "other-driver",
            format!("no other driver publishes these GPUs ({seen})"),
        )]
    } else {
        shared
    }
}

/// [`check_other_drivers`] on the record in `state_dir` (none without a
/// state directory); a record that cannot be read is one warning saying so,
/// not a failed report.
pub fn check_other_drivers_in(view: &Inspection, state_dir: Option<&Path>) -> Vec<Check> {
    let Some(dir) = state_dir else {
        return Vec::new();
    };
    match OtherDrivers::read(dir) {
        Ok(record) => check_other_drivers(view, record.as_ref()),
        Err(e) => vec![Check::new(
            "other-driver",
            Status::Warn,
            format!("cannot tell which GPUs other drivers publish: {e}"),
            format!(
                "remove {} (serve writes it again at its next slice sync)",
                OtherDrivers::path(dir).display()
            ),
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(gpus: &[(&str, &str)]) -> OtherDrivers {
        OtherDrivers {
            observed_at_unix: 1_800_000_000,
            gpus: gpus
                .iter()
                .map(|(a, d)| (a.to_string(), d.to_string()))
                .collect(),
        }
    }

    #[test]
    fn write_then_read_gives_the_same_record_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(OtherDrivers::read(dir.path()).expect("read"), None);
        let r = record(&[("0000:18:00.0", "gpu.nvidia.com")]);
        r.write(dir.path()).expect("write");
        assert_eq!(OtherDrivers::read(dir.path()).expect("read"), Some(r));
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(OTHER_DRIVERS_FILE)]);
    }

    #[test]
    fn a_corrupt_or_oversized_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = OtherDrivers::path(dir.path());
        fs::write(&path, "{\"gpus\": 3}").expect("write");
        let e = OtherDrivers::read(dir.path()).expect_err("corrupt");
        assert!(e.to_string().contains(OTHER_DRIVERS_FILE), "{e}");
        fs::write(&path, vec![b' '; MAX_RECORD_BYTES as usize + 1]).expect("write");
        let e = OtherDrivers::read(dir.path()).expect_err("oversized");
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    /// The demo host's eight GPUs, inspected as `doctor` does.
    fn demo_view() -> (tempfile::TempDir, Inspection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = vfio_gpu_host::demo::build_demo_host(dir.path()).expect("demo host");
        let root = vfio_gpu_host::HostRoot::open(host.root()).expect("host root");
        let view = vfio_gpu_engine::inspect(
            &root,
            &vfio_gpu_host::GpuSelector::default(),
            &vfio_gpu_intent::Policy::default(),
            None,
        )
        .expect("inspect");
        (dir, view)
    }

    #[test]
    fn each_gpu_another_driver_publishes_is_one_warning_naming_that_driver() {
        let (_dir, view) = demo_view();
        assert!(view.gpus.len() >= 2, "the demo host has GPUs");
        let first = view.gpus[0].gpu.bdf();
        let second = view.gpus[1].gpu.bdf();
        let r = record(&[
            (&first.to_string(), "gpu.nvidia.com"),
            (&second.to_string(), "other.example.com"),
            ("0000:ff:1f.7", "gpu.nvidia.com"),
        ]);
        let checks = check_other_drivers(&view, Some(&r));
        // Exactly the GPUs on this node the record names; an address no GPU
        // has here makes no line.
        assert_eq!(checks.len(), 2, "{checks:?}");
        for (c, (bdf, driver)) in checks
            .iter()
            .zip([(first, "gpu.nvidia.com"), (second, "other.example.com")])
        {
            assert_eq!(
                (c.check, c.status, c.gpu),
                ("other-driver", Status::Warn, Some(bdf))
            );
            assert!(
                c.detail.contains(driver) && c.detail.contains("does not offer"),
                "{}",
                c.detail
            );
            assert!(c.fix.contains(driver), "{}", c.fix);
        }
    }

    #[test]
    fn no_record_no_check_and_an_empty_record_passes() {
        let (_dir, view) = demo_view();
        assert!(check_other_drivers(&view, None).is_empty());
        let checks = check_other_drivers(&view, Some(&record(&[])));
        assert_eq!(checks.len(), 1);
        assert_eq!(
            (checks[0].check, checks[0].status),
            ("other-driver", Status::Pass)
        );
    }

    #[test]
    fn driver_of_matches_the_full_address() {
        let r = record(&[("0000:18:00.0", "gpu.nvidia.com")]);
        let bdf = |s: &str| s.parse::<Bdf>().expect("bdf");
        assert_eq!(r.driver_of(&bdf("0000:18:00.0")), Some("gpu.nvidia.com"));
        assert_eq!(r.driver_of(&bdf("0000:18:00.1")), None);
        assert_eq!(r.driver_of(&bdf("0001:18:00.0")), None);
    }
}
