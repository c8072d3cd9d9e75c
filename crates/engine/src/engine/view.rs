//! What operations report: outcomes, views of GPUs, the read-only inspection.

use super::Engine;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use vfio_gpu_host::{Bdf, Gpu, GpuSelector, HostRoot, PciHost, PciIdsDb, discover_gpus};
use vfio_gpu_intent::{IntentSources, OwnRecords, Policy, Verdict, evaluate};

use crate::error::{EngineError, FunctionState};
use crate::ledger::{GpuRecord, LedgerBody, LedgerFile, LedgerProblem, PendingPersistence};
use crate::preflight::NodeHolder;
use crate::state::RecordKind;

/// What an operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Moved to vfio.
    Moved,
    /// Already on vfio: nothing changed, state recorded.
    AlreadyOnVfio,
    /// Already configured for this holder (idempotent repeat).
    AlreadyConfigured,
    /// Released but kept on vfio (admin intent or it was there before).
    LeftOnVfio,
    /// Returned to the original drivers.
    Restored,
    /// Nothing recorded, nothing to do.
    NothingToDo,
    /// Reconcile: an interrupted move to vfio was rolled back.
    RolledBack,
    /// Reconcile: an interrupted release was finished.
    FinishedRelease,
    /// Reconcile: a driverless GPU was given a driver again.
    Rebound,
    /// Reconcile: recorded as admin-owned (bound at start).
    RecordedPrebound,
    /// Reconcile: left as is, with a note.
    Noted,
    /// Released, but its reset, verification or scrub hook failed: kept
    /// from every tenant until an administrator resets it.
    Quarantined,
    /// An administrator's reset: reset, verified, out of quarantine.
    Reset,
}

/// The result of one operation on one GPU.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// GPU.
    #[serde(rename = "pciBusID")]
    pub bdf: Bdf,
    /// What happened.
    pub action: Action,
    /// In words, with the reasons.
    pub detail: String,
    /// Where every function is now.
    pub functions: Vec<FunctionState>,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
    /// `vfio-dev/vfioN` of each function on vfio whose `/dev/vfio/devices/vfioN`
    /// exists (iommufd cdev names; empty without `CONFIG_VFIO_DEVICE_CDEV`).
    pub vfio_devices: Vec<String>,
    /// Milliseconds the operation took.
    pub millis: u64,
}

/// A GPU with its verdict and record, for listings.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuView {
    /// The GPU.
    #[serde(flatten)]
    pub gpu: Gpu,
    /// The admin-intent verdict.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The ledger record, if any.
    pub record: Option<GpuRecord>,
    /// A write still running past its deadline, if any.
    pub stuck: Option<String>,
    /// Host processes that keep the GPU open on its host driver, so a move
    /// would be refused (nvidia-persistenced alone does not count: the move
    /// turns persistence mode off). Filled by [`crate::Engine::discover`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<NodeHolder>,
    /// Persistence mode left off at a release because turning it on failed;
    /// reconcile retries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence_left_off: Option<PendingPersistence>,
    /// Its NVLink fabric facts (module id, partitions), when the ledger or a
    /// configured Fabric Manager knows any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric: Option<super::fabric::GpuFabric>,
    /// Quarantined after a failed reset, verification or scrub hook: offered
    /// to nobody until an administrator resets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<crate::ledger::Quarantine>,
    /// The last tenant hand-over of this GPU (its audit record), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handover: Option<crate::ledger::HandoverAudit>,
}

/// What opening the engine found.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenReport {
    /// The ledger was untrusted and moved aside.
    pub ledger_problem: Option<LedgerProblem>,
    /// Records from an earlier boot that were dropped (hints only).
    pub earlier_boot_records: Vec<String>,
    /// The state directory had no ledger and this boot's records were taken
    /// from the boot mirror ([`crate::EngineConfig::boot_mirror_dir`]).
    pub adopted_from_mirror: Option<String>,
}

/// The ledger as the intent evaluation sees it.
pub(super) struct Records<'a>(pub(super) &'a LedgerBody);

impl OwnRecords for Records<'_> {
    fn wrote_override(&self, bdf: Bdf, value: &str, on_host_driver: bool) -> bool {
        // An override the admin had written before we came is still the
        // admin's, even once we write the same value over it; so is our value
        // on a function bound to a host driver outside a move (a release put
        // it back; the admin wrote the same value since).
        self.0.gpus.values().any(|r| {
            r.function(bdf).is_some_and(|f| {
                f.override_written.as_deref() == Some(value)
                    && f.original_override.as_deref() != Some(value)
                    && (!on_host_driver || r.state == crate::ledger::OpState::Configuring)
            })
        })
    }
    fn bound_by_us(&self, bdf: Bdf) -> bool {
        // Any record of ours that moved (or was moving) it, whether or not the
        // move completed: a failed rollback parked on vfio is still ours (n2).
        self.0.gpus.values().any(|r| r.put_on_vfio_by_us(bdf))
    }
    fn recorded_prebound(&self, bdf: Bdf) -> bool {
        self.0
            .gpus
            .values()
            // Found on vfio: the admin's. A GPU kept there for intent at a
            // settle is still ours, and intent alone decides it.
            .any(|r| {
                (r.kind() == RecordKind::FoundOnVfio || r.was_on_vfio) && r.function(bdf).is_some()
            })
    }
}

/// One GPU's reconcile result; an error names the GPU.
pub type ReconcileResult = Result<Outcome, (Bdf, EngineError)>;

/// A read-only view of the host, its GPUs, their verdicts and the ledger,
/// made without taking the state lock (safe while a plugin is serving).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    /// GPUs with verdicts and records.
    pub gpus: Vec<GpuView>,
    /// Functions that could not be read.
    pub problems: Vec<String>,
    /// Why the ledger could not be used, if so.
    pub ledger_problem: Option<String>,
}

/// Reads the host and the ledger (if `state_dir` holds one) without changing anything.
pub fn inspect(
    root: &HostRoot,
    selector: &GpuSelector,
    policy: &Policy,
    state_dir: Option<&Path>,
) -> Result<Inspection, EngineError> {
    let boot_id = root.boot_id()?.unwrap_or_default();
    let (mut ledger, ledger_problem) = match state_dir {
        Some(dir) => {
            let (body, problem) = LedgerFile::read_only_view(dir);
            let path = dir.join(crate::ledger::LEDGER_FILE);
            (body, problem.map(|p| format!("{}: {p}", path.display())))
        }
        None => (LedgerBody::default(), None),
    };
    ledger.gpus.retain(|_, r| r.boot_id == boot_id);
    ledger.fabric.drop_earlier_boot(&boot_id);
    let host = PciHost::scan(root, selector)?;
    let ids = PciIdsDb::load(root).ok().flatten();
    let sources = IntentSources::load(root, policy);
    let gpus = discover_gpus(&host, selector, ids.as_ref())
        .into_iter()
        .map(|gpu| GpuView {
            verdict: evaluate(&sources, &gpu, &Records(&ledger)),
            record: ledger.gpus.get(&gpu.bdf()).cloned(),
            stuck: None,
            holders: Vec::new(),
            persistence_left_off: ledger
                .persistence_to_restore
                .get(&gpu.bdf())
                .filter(|p| p.boot_id == boot_id)
                .cloned(),
            fabric: super::fabric::gpu_fabric_from_ledger(&ledger, &gpu, None),
            quarantine: ledger.quarantined.get(&gpu.bdf()).cloned(),
            last_handover: ledger
                .handovers
                .iter()
                .rev()
                .find(|h| h.gpu == gpu.bdf())
                .cloned(),
            gpu,
        })
        .collect();
    Ok(Inspection {
        gpus,
        problems: host.problems().to_vec(),
        ledger_problem,
    })
}

impl Engine {
    pub(super) fn states(
        &self,
        bdfs: &[Bdf],
        expected: &BTreeMap<Bdf, Option<String>>,
    ) -> Vec<FunctionState> {
        bdfs.iter()
            // Bounded like every read: a report must not hang on the device it reports.
            .map(|b| match self.binding(*b) {
                Ok(f) => {
                    let driver = f.driver.map(|d| d.to_string());
                    let exp = expected.get(b).cloned().flatten();
                    FunctionState {
                        bdf: *b,
                        expected: match (&exp, &driver) {
                            (Some(e), Some(d)) if e == d => None,
                            (None, None) => None,
                            (e, _) if expected.contains_key(b) => {
                                Some(e.clone().unwrap_or_else(|| "no driver".into()))
                            }
                            _ => None,
                        },
                        driver,
                        driver_override: f.driver_override,
                        unreadable: None,
                    }
                }
                Err(e) => FunctionState {
                    bdf: *b,
                    driver: None,
                    driver_override: None,
                    expected: None,
                    unreadable: Some(e.to_string()),
                },
            })
            .collect()
    }

    pub(super) fn outcome(
        &self,
        gpu: &Gpu,
        action: Action,
        detail: String,
        started: Instant,
    ) -> Outcome {
        let bdfs: Vec<Bdf> = gpu.functions.iter().map(|f| f.bdf).collect();
        let functions = self.states(&bdfs, &BTreeMap::new());
        // Only names with a device node: without CONFIG_VFIO_DEVICE_CDEV the kernel
        // still lists `vfio-dev/vfioN` in sysfs (6.1+), but there is no cdev to open.
        let vfio_devices = bdfs
            .iter()
            .filter_map(|b| {
                let v = self.binding(*b).ok()?.vfio_dev?;
                let node = self.root.rel("dev/vfio/devices").join(&v);
                self.host_read(*b, "read of /dev/vfio/devices", move |k| k.exists(&node))
                    .unwrap_or(false)
                    .then_some(v)
            })
            .collect();
        Outcome {
            bdf: gpu.bdf(),
            action,
            detail,
            functions,
            iommu_group: gpu.function.iommu_group,
            vfio_devices,
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// The kebab-case name of an intent source (`kernel-cmdline`, …).
pub fn source_name(s: vfio_gpu_intent::Source) -> String {
    s.to_string()
}

/// A pin in words.
pub fn pin_text(p: &vfio_gpu_intent::Pin) -> String {
    format!("{}: {}", p.source, p.detail)
}

pub(super) fn reasons_text(v: &Verdict) -> String {
    v.reasons_text()
}
