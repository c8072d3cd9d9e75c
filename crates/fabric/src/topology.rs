//! Partition tables and exact-set partition selection.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::types::{ModuleId, PartitionId, PartitionList};

/// The baseboard families the reference covers (§2, §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Platform {
    /// HGX H100/H200/H800/H20: NVSwitch gen3, NVLink 4 (`nvl4`); ids 0–14.
    HgxH100,
    /// HGX B200/B300: NVSwitch gen4 + NVLSM, NVLink 5 (`nvl5`); ids 1–15.
    HgxB200,
}

impl Platform {
    /// The `nvlinkFabric` attribute value.
    pub fn fabric_name(self) -> &'static str {
        match self {
            Platform::HgxH100 => "nvl4",
            Platform::HgxB200 => "nvl5",
        }
    }

    /// The platform's static FM partition table.
    pub fn topology(self) -> Topology {
        match self {
            Platform::HgxH100 => Topology::h100_8gpu(),
            Platform::HgxB200 => Topology::b200_8gpu(),
        }
    }
}

/// One partition: its id and member module ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSpec {
    /// FM partition id.
    pub id: PartitionId,
    /// Member module ids (never empty).
    pub modules: BTreeSet<ModuleId>,
}

/// Why a partition table is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// Two partitions share an id.
    #[error("partition id {0} listed twice")]
    DuplicateId(PartitionId),
    /// Two partitions have the same member set (exact selection would be ambiguous).
    #[error("partitions {0} and {1} have the same GPUs")]
    DuplicateSet(PartitionId, PartitionId),
    /// A partition lists a module twice.
    #[error("partition {0} lists module {1} twice")]
    DuplicateMember(PartitionId, ModuleId),
    /// A partition has no GPUs.
    #[error("partition {0} has no GPUs")]
    Empty(PartitionId),
    /// Module id 0 (NVML's "unknown").
    #[error("partition {0} lists module id 0")]
    ZeroModule(PartitionId),
}

/// A validated partition table (FM's `fmGetSupportedFabricPartitions`, minus
/// the volatile `isActive`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    partitions: Vec<PartitionSpec>,
}

fn spec(id: u32, modules: &[u32]) -> PartitionSpec {
    PartitionSpec {
        id: PartitionId(id),
        modules: modules.iter().copied().map(ModuleId).collect(),
    }
}

impl Topology {
    /// HGX H100/H200 (reference §5): 0 = 1–8; 1 = 1–4; 2 = 5–8; the 2-GPU
    /// pairs are **not adjacent**: 3 = {1,3}, 4 = {2,4}, 5 = {5,7}, 6 = {6,8};
    /// 7–14 = modules 1–8 alone.
    pub fn h100_8gpu() -> Topology {
        let mut p = vec![
            spec(0, &[1, 2, 3, 4, 5, 6, 7, 8]),
            spec(1, &[1, 2, 3, 4]),
            spec(2, &[5, 6, 7, 8]),
            spec(3, &[1, 3]),
            spec(4, &[2, 4]),
            spec(5, &[5, 7]),
            spec(6, &[6, 8]),
        ];
        p.extend((1..=8).map(|m| spec(6 + m, &[m])));
        Topology { partitions: p }
    }

    /// HGX B200/B300 (reference §5), 1-based: 1 = 1–8; 2 = 1–4; 3 = 5–8;
    /// 4 = {1,2}, 5 = {3,4}, 6 = {5,6}, 7 = {7,8}; 8–15 = modules 1–8 alone.
    pub fn b200_8gpu() -> Topology {
        let mut p = vec![
            spec(1, &[1, 2, 3, 4, 5, 6, 7, 8]),
            spec(2, &[1, 2, 3, 4]),
            spec(3, &[5, 6, 7, 8]),
            spec(4, &[1, 2]),
            spec(5, &[3, 4]),
            spec(6, &[5, 6]),
            spec(7, &[7, 8]),
        ];
        p.extend((1..=8).map(|m| spec(7 + m, &[m])));
        Topology { partitions: p }
    }

    /// Validates a table.
    pub fn new(partitions: Vec<PartitionSpec>) -> Result<Topology, TopologyError> {
        let mut ids = BTreeSet::new();
        let mut sets: BTreeMap<&BTreeSet<ModuleId>, PartitionId> = BTreeMap::new();
        for p in &partitions {
            if !ids.insert(p.id) {
                return Err(TopologyError::DuplicateId(p.id));
            }
            if p.modules.is_empty() {
                return Err(TopologyError::Empty(p.id));
            }
            if p.modules.contains(&ModuleId(0)) {
                return Err(TopologyError::ZeroModule(p.id));
            }
            if let Some(other) = sets.insert(&p.modules, p.id) {
                return Err(TopologyError::DuplicateSet(other, p.id));
            }
        }
        Ok(Topology { partitions })
    }

    /// The table FM reported.
    pub fn from_list(list: &PartitionList) -> Result<Topology, TopologyError> {
        let mut specs = Vec::with_capacity(list.partitions.len());
        for p in &list.partitions {
            let mut modules = BTreeSet::new();
            for m in p.modules() {
                if !modules.insert(m) {
                    return Err(TopologyError::DuplicateMember(p.id, m));
                }
            }
            specs.push(PartitionSpec { id: p.id, modules });
        }
        Topology::new(specs)
    }

    /// The partitions, in table order.
    pub fn partitions(&self) -> &[PartitionSpec] {
        &self.partitions
    }

    /// The partition with this id.
    pub fn get(&self, id: PartitionId) -> Option<&PartitionSpec> {
        self.partitions.iter().find(|p| p.id == id)
    }

    /// The partition whose member set **equals** `modules`, if any. A VM
    /// gets exactly one partition's GPUs: no superset, subset or union.
    pub fn exact(&self, modules: &BTreeSet<ModuleId>) -> Option<PartitionId> {
        if modules.is_empty() {
            return None;
        }
        self.partitions
            .iter()
            .find(|p| &p.modules == modules)
            .map(|p| p.id)
    }

    /// Partitions that contain `module`.
    pub fn partitions_containing(&self, module: ModuleId) -> impl Iterator<Item = &PartitionSpec> {
        self.partitions
            .iter()
            .filter(move |p| p.modules.contains(&module))
    }

    /// The `partitionN` attributes of a GPU: GPU count → partition id, for
    /// each partition that contains it.
    pub fn partition_attributes(&self, module: ModuleId) -> BTreeMap<usize, PartitionId> {
        self.partitions_containing(module)
            .map(|p| (p.modules.len(), p.id))
            .collect()
    }

    /// Other partitions sharing at least one GPU with `id`.
    pub fn overlapping(&self, id: PartitionId) -> Vec<PartitionId> {
        let Some(me) = self.get(id) else {
            return Vec::new();
        };
        self.partitions
            .iter()
            .filter(|p| p.id != id && !p.modules.is_disjoint(&me.modules))
            .map(|p| p.id)
            .collect()
    }

    /// Which of `active` overlap `id` (excluding `id` itself).
    pub fn overlaps_active(&self, id: PartitionId, active: &[PartitionId]) -> Vec<PartitionId> {
        let over = self.overlapping(id);
        active
            .iter()
            .copied()
            .filter(|a| over.contains(a))
            .collect()
    }

    /// `sha256:<hex>` over the sorted `(id, sorted modules)` list, for the
    /// ledger's `topologyHash`.
    pub fn hash(&self) -> String {
        let mut rows: Vec<(u32, Vec<u32>)> = self
            .partitions
            .iter()
            .map(|p| (p.id.0, p.modules.iter().map(|m| m.0).collect()))
            .collect();
        rows.sort();
        let mut h = Sha256::new();
        for (id, modules) in rows {
            let line = modules
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            h.update(format!("{id}:{line}\n"));
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }
}
