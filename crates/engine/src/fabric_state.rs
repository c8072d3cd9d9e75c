//! The ledger's `fabric` section: NVLink partitions the engine activated
//! through NVIDIA Fabric Manager, and the module id ↔ GPU map.
//!
//! Write-ahead like GPU records: a partition is recorded `activating` before
//! `fmActivateFabricPartition`, `deactivating` before
//! `fmDeactivateFabricPartition`, and dropped only once FM confirms it is
//! inactive. The partition id is stored per holder, so a release never
//! re-derives it (NVIDIA DRA #1331). An empty section is not written, so a
//! ledger without a fabric reads and writes exactly as before.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vfio_gpu_fabric::{ModuleId, ModuleSource, PartitionId};
use vfio_gpu_host::Bdf;

use crate::ledger::Holder;

/// Where a partition operation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionState {
    /// Recorded before `fmActivateFabricPartition`; not confirmed.
    Activating,
    /// FM confirmed it active.
    Active,
    /// Recorded before `fmDeactivateFabricPartition`; not confirmed.
    Deactivating,
}

/// One partition the engine activated (or is repairing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionRecord {
    /// Operation state.
    pub state: PartitionState,
    /// The claim it belongs to (`None`: a leak being repaired).
    #[serde(default)]
    pub holder: Option<Holder>,
    /// Member module ids.
    #[serde(default)]
    pub modules: Vec<ModuleId>,
    /// Member GPUs, in module order.
    #[serde(default)]
    pub bdfs: Vec<Bdf>,
    /// Boot the record belongs to.
    pub boot_id: String,
    /// Monotonic operation number (shared with GPU records), for logs.
    #[serde(default)]
    pub operation: u64,
    /// Last update, seconds since the epoch.
    #[serde(default)]
    pub updated: u64,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// One entry of the persisted module map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleRecord {
    /// The GPU's module id (FM's `physicalId`).
    pub module_id: ModuleId,
    /// Where it came from when it was recorded.
    pub source: ModuleSource,
    /// The GPU's PCI device id then (`0x2330`): an entry whose device changed
    /// is not used.
    pub device_id: String,
    /// Boot it was read in (an earlier boot's entry is a hint only).
    pub boot_id: String,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A `fabric learn` under way: the GPU visits `nvidia` so NVML can read its
/// module id, and goes back to `vfio_driver`. Recorded before the GPU leaves
/// vfio; a crash is finished by the next fabric reconcile
/// ([`crate::state::on_pending_learn`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LearnRecord {
    /// The GPU function visiting `nvidia`.
    pub bdf: Bdf,
    /// The vfio driver it goes back to.
    pub vfio_driver: vfio_gpu_host::DriverName,
    /// Its `driver_override` when found (restored on the way back).
    #[serde(default)]
    pub original_override: Option<String>,
    /// Boot the learn ran in (after a reboot the GPU is where boot put it).
    pub boot_id: String,
    /// Monotonic operation number, for logs.
    #[serde(default)]
    pub operation: u64,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// The ledger's `fabric` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FabricLedger {
    /// `nvl4` or `nvl5`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// `sha256:` of FM's partition table when last read (a change means the
    /// hardware or FM changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_hash: Option<String>,
    /// Partitions by FM partition id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<PartitionId, PartitionRecord>,
    /// Module ids by GPU.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub module_map: BTreeMap<Bdf, ModuleRecord>,
    /// A `fabric learn` that has not finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning: Option<LearnRecord>,
    /// Fields written by other versions.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
    /// The file had a `fabric` key (even an empty one): it is written back.
    #[serde(skip)]
    present: bool,
}

/// Reads the ledger's `fabric` key, remembering it was there, so a rewrite
/// keeps it even when empty (no field of a ledger is dropped on rewrite).
pub(crate) fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<FabricLedger, D::Error> {
    let mut f = FabricLedger::deserialize(d)?;
    f.present = true;
    Ok(f)
}

impl FabricLedger {
    /// Nothing recorded and no `fabric` key read: the section is left out of
    /// the file.
    pub fn is_empty(&self) -> bool {
        !self.present
            && self.platform.is_none()
            && self.topology_hash.is_none()
            && self.partitions.is_empty()
            && self.module_map.is_empty()
            && self.learning.is_none()
            && self.extra.is_empty()
    }

    /// The partitions `holder` holds.
    pub fn held_by<'a>(
        &'a self,
        holder: &'a Holder,
    ) -> impl Iterator<Item = (PartitionId, &'a PartitionRecord)> + 'a {
        self.partitions
            .iter()
            .filter(move |(_, r)| r.holder.as_ref() == Some(holder))
            .map(|(id, r)| (*id, r))
    }

    /// The partition record covering `bdf`, if any.
    pub fn partition_of(&self, bdf: Bdf) -> Option<(PartitionId, &PartitionRecord)> {
        self.partitions
            .iter()
            .find(|(_, r)| r.bdfs.contains(&bdf))
            .map(|(id, r)| (*id, r))
    }

    /// Drops partition records of another boot (FM and the switches were
    /// reset with the node); returns one line per record dropped. Module map
    /// entries stay: they are re-verified (device id) before use.
    pub fn drop_earlier_boot(&mut self, boot_id: &str) -> Vec<String> {
        let mut dropped = Vec::new();
        self.partitions.retain(|id, r| {
            if r.boot_id == boot_id {
                return true;
            }
            dropped.push(format!(
                "fabric partition {id}: {:?} for {} (boot {})",
                r.state,
                r.holder
                    .as_ref()
                    .map_or_else(|| "nobody".to_string(), ToString::to_string),
                r.boot_id
            ));
            false
        });
        // The learn's GPU is where this boot put it (the pending-learn rule).
        if let Some(l) = self.learning.take_if(|l| l.boot_id != boot_id) {
            dropped.push(format!(
                "fabric learn of {} (boot {}): an earlier boot's",
                l.bdf, l.boot_id
            ));
        }
        dropped
    }
}
