//! fabric: NVLink partitions through NVIDIA Fabric Manager, one per claim.
//!
//! A claim's GPUs form one FM partition (exactly its module set). The
//! plugin calls [`Engine::fabric_preflight`] before it moves any GPU,
//! [`Engine::fabric_activate`] once every GPU of the claim is on vfio, and
//! [`Engine::fabric_deactivate`] before it releases them;
//! [`Engine::fabric_reconcile`] runs at start and periodically. Every FM call
//! is preceded by a ledger commit (`activating`, `deactivating`) and followed
//! by one (`active`, record dropped); a crash between them is finished by
//! reconcile from FM's active list. A partition whose GPUs are open through
//! VFIO is never deactivated. Without [`crate::EngineConfig::fabric`] every
//! call here is a no-op. Design: `fabric-manager.md` §11 in the project
//! reference; user docs: `docs/fabric.md`.

use super::{Engine, lock};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use vfio_gpu_fabric::{
    DeadlineFm, FabricManager, FmError, ModuleId, ModuleMap, ModuleMapBuilder, ModuleSource,
    NvmlModuleIds, PartitionId, PartitionList, Topology,
};
use vfio_gpu_host::{Bdf, Gpu, discover_gpus};

use crate::error::EngineError;
use crate::fabric_state::{FabricLedger, ModuleRecord, PartitionRecord, PartitionState};
use crate::ledger::OpState;
use crate::ledger::{Durability, Holder, LedgerBody, now};
use crate::state::{
    OnPartitionRide, OnRecordedPartition, activating_record_needed, on_partition_ride,
    on_recorded_partition,
};

/// What a claim whose GPU set is not exactly one partition gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FabricPolicy {
    /// The claim fails before any host change (NVIDIA's behaviour; the
    /// default on a fabric node: a VM never starts without its NVLinks).
    #[default]
    Required,
    /// Each GPU gets its own 1-GPU partition (CUDA works, no P2P).
    BestEffort,
    /// No FM calls at all (guests may hit CUDA error 802).
    Disabled,
}

impl std::str::FromStr for FabricPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "required" => Ok(FabricPolicy::Required),
            "besteffort" | "best-effort" => Ok(FabricPolicy::BestEffort),
            "disabled" => Ok(FabricPolicy::Disabled),
            _ => Err(format!(
                "unknown fabric policy {s:?} (Required, BestEffort or Disabled)"
            )),
        }
    }
}

/// Reads a GPU's module id live (NVML `nvmlDeviceGetModuleId`, GPUs on
/// `nvidia` only).
pub trait ModuleIdReader: Send + Sync {
    /// The module id, `None` when the GPU has none readable.
    fn module_id(&self, bdf: Bdf) -> Result<Option<ModuleId>, String>;
}

/// The fabric settings of an engine ([`crate::EngineConfig::fabric`]).
#[derive(Clone)]
pub struct FabricConfig {
    /// The Fabric Manager, every call under a deadline.
    pub fm: DeadlineFm,
    /// What a claim that is not one partition gets.
    pub policy: FabricPolicy,
    /// This engine replays the active list after an FM `--restart`
    /// (`fmSetActivatedFabricPartitions`); exactly one component may.
    pub resiliency_agent: bool,
    /// The admin's static module map (`{"<BDF>": <module id>}`), for GPUs
    /// that were on vfio since boot.
    pub module_map_file: Option<PathBuf>,
    /// Live module ids (NVML), for GPUs on `nvidia`.
    pub module_ids: Option<Arc<dyn ModuleIdReader>>,
}

impl FabricConfig {
    /// Default deadline of one FM call.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

    /// `fm` under [`Self::DEFAULT_DEADLINE`], policy Required, not the agent.
    pub fn new(fm: Arc<dyn FabricManager>) -> Self {
        FabricConfig {
            fm: DeadlineFm::new(fm, Self::DEFAULT_DEADLINE),
            policy: FabricPolicy::Required,
            resiliency_agent: false,
            module_map_file: None,
            module_ids: None,
        }
    }
}

impl std::fmt::Debug for FabricConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricConfig")
            .field("deadline", &self.fm.deadline())
            .field("policy", &self.policy)
            .field("resiliency_agent", &self.resiliency_agent)
            .field("module_map_file", &self.module_map_file)
            .field("module_ids", &self.module_ids.is_some())
            .finish()
    }
}

/// What a fabric call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FabricAction {
    /// No Fabric Manager configured.
    NotManaged,
    /// Policy Disabled: FM not called.
    Disabled,
    /// Nothing to do (no partition recorded for the holder, or all fine).
    NothingToDo,
    /// FM activated the partition(s).
    Activated,
    /// Already active for this holder (a retried prepare).
    AlreadyActive,
    /// Found active with no record of ours and recorded for the holder.
    Adopted,
    /// FM deactivated the partition(s) (or confirmed them inactive).
    Deactivated,
    /// Reconcile: an interrupted operation was finished.
    Finished,
    /// Reconcile: a record FM contradicts was dropped.
    Dropped,
    /// Reconcile: left as it is, with a note.
    Noted,
    /// Reconcile: the active list was replayed after an FM `--restart`.
    Replayed,
}

/// The result of one fabric call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FabricOutcome {
    /// What happened.
    pub action: FabricAction,
    /// The partitions concerned.
    pub partitions: Vec<PartitionId>,
    /// In words.
    pub detail: String,
    /// Partitions FM activated whose ledger record still says `activating`
    /// ([`Engine::fabric_activate_mark_later`]); [`Engine::fabric_mark_active`]
    /// takes them. Empty from every other call.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unmarked: Vec<UnmarkedActivation>,
}

/// A partition FM activated for a claim, its `active` mark not yet written:
/// the record, named by its operation number so that a mark never lands on a
/// later record of the same partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnmarkedActivation {
    /// The partition.
    pub partition: PartitionId,
    /// The operation number of the `activating` record.
    pub operation: u64,
}

impl FabricOutcome {
    fn new(action: FabricAction, partitions: Vec<PartitionId>, detail: impl Into<String>) -> Self {
        FabricOutcome {
            action,
            partitions,
            detail: detail.into(),
            unmarked: Vec::new(),
        }
    }
}

/// When [`Engine::fabric_activate`] writes the `active` mark.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MarkActive {
    /// Before it returns.
    Now,
    /// Left to the caller ([`Engine::fabric_mark_active`]) or reconcile.
    Later,
}

/// The partitions a claim's GPUs need ([`Engine::fabric_preflight`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FabricPlan {
    /// Partition id → its GPUs (in module order) and modules. Empty: no FM call.
    pub partitions: BTreeMap<PartitionId, (Vec<ModuleId>, Vec<Bdf>)>,
    /// Why (the exact match, the BestEffort fallback, no fabric).
    pub note: String,
    /// The `activating` records that may ride with the claim's last GPU
    /// move ([`Engine::fabric_ride`]); `None` when the activation must write
    /// its own (a partition FM already lists active, an overlapping active
    /// partition to deal with first, a record already there).
    #[serde(skip)]
    ride: Option<PlannedRide>,
    /// [`FabricRuntime::generation`] when the preflight listed FM.
    #[serde(skip)]
    generation: u64,
}

/// The `activating` records of one claim's partitions, planned before its
/// GPUs move.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PlannedRide {
    holder: Holder,
    gpus: Vec<Bdf>,
    records: Vec<(PartitionId, PartitionRecord)>,
}

/// A [`PlannedRide`] waiting for its commit, by registration token.
struct Ride {
    token: u64,
    plan: PlannedRide,
}

/// While alive, a claim's planned `activating` partition records ride with
/// the ledger commit that completes the claim's last GPU move
/// ([`Engine::fabric_ride`]). Dropping it withdraws a ride that has not
/// landed; a landed record stays (it is the ledger's now).
#[must_use = "the ride is withdrawn when this guard drops"]
pub struct FabricRide<'a> {
    engine: &'a Engine,
    token: Option<u64>,
}

impl Drop for FabricRide<'_> {
    fn drop(&mut self) {
        if let Some(token) = self.token {
            lock(&self.engine.fabric.rides).retain(|r| r.token != token);
        }
    }
}

/// One GPU's fabric facts, for listings and ResourceSlice attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuFabric {
    /// Module id (FM `physicalId`), when the map knows it.
    #[serde(rename = "gpuModuleID", skip_serializing_if = "Option::is_none")]
    pub module_id: Option<ModuleId>,
    /// Where the module id came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module_source: Option<ModuleSource>,
    /// GPU count → partition id of each partition containing it (empty when
    /// the module id or FM's table is unknown).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<usize, PartitionId>,
    /// `nvl4` or `nvl5`, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvlink_fabric: Option<String>,
    /// FM configured and its last answer a success.
    pub fabric_managed: bool,
    /// The ledger's partition covering this GPU, with its state and holder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<(PartitionId, PartitionState, Option<Holder>)>,
}

/// FM's partitions, the ledger's and the module map ([`Engine::fabric_status`]).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FabricStatus {
    /// The configured policy.
    pub policy: FabricPolicy,
    /// Whether this engine replays after an FM `--restart`.
    pub resiliency_agent: bool,
    /// FM's partition list, or why it could not be read.
    pub fm: Result<PartitionList, String>,
    /// The ledger's fabric section.
    pub ledger: FabricLedger,
    /// The resolved module map (BDF → module id, source), or why it failed.
    pub module_map: Result<BTreeMap<Bdf, (ModuleId, ModuleSource)>, String>,
}

/// Fabric state cached between calls.
#[derive(Default)]
pub(crate) struct FabricRuntime {
    /// FM's table when last listed, and whether the last call succeeded.
    cache: Mutex<Option<(Arc<Topology>, bool)>>,
    /// One fabric operation at a time in this process (they act on FM's
    /// global partition state).
    pub(super) op: Mutex<()>,
    /// Planned `activating` records waiting for their claim's last GPU
    /// move ([`Engine::fabric_ride`]).
    rides: Mutex<Vec<Ride>>,
    /// Next ride registration token.
    next_ride: AtomicU64,
    /// Counts this engine's FM calls that change partitions; a plan made
    /// at another count saw a list that may be stale.
    generation: AtomicU64,
}

fn fm_err(what: &str, e: &FmError) -> EngineError {
    let hint = if e.is_retryable() {
        " (Fabric Manager is starting or waiting for its restart replay; retry)"
    } else if e.is_connection() {
        " (is nvidia-fabricmanager running with FM_CMD_UNIX_SOCKET_PATH / FM_CMD_PORT_NUMBER as configured?)"
    } else {
        ""
    };
    EngineError::Fabric(format!("Fabric Manager: {what}: {e}{hint}"))
}

fn ids_text(ids: impl IntoIterator<Item = impl std::fmt::Display>) -> String {
    ids.into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// NVML sees a GPU only on a host driver: ask it about those, never about
/// GPUs on vfio or without a driver.
fn on_host_driver(gpu: &Gpu) -> bool {
    gpu.function.driver.is_some() && !gpu.function.on_vfio()
}

/// The real reader: NVML through `dlopen`.
impl ModuleIdReader for NvmlModuleIds {
    fn module_id(&self, bdf: Bdf) -> Result<Option<ModuleId>, String> {
        NvmlModuleIds::module_id(self, bdf).map_err(|e| e.to_string())
    }
}

fn device_hex(gpu: &Gpu) -> String {
    format!("0x{:04x}", gpu.function.identity.device)
}

fn platform_name(t: &Topology) -> &'static str {
    // Hopper tables are 0-based, Blackwell 1-based (reference §5).
    if t.get(PartitionId(0)).is_some() {
        "nvl4"
    } else {
        "nvl5"
    }
}

/// The fabric facts the ledger alone gives (no FM, no topology): module id
/// and partition, for read-only listings (`explain`).
pub(crate) fn gpu_fabric_from_ledger(
    ledger: &LedgerBody,
    gpu: &Gpu,
    topology: Option<(&Topology, bool)>,
) -> Option<GpuFabric> {
    let bdf = gpu.bdf();
    let entry = ledger
        .fabric
        .module_map
        .get(&bdf)
        .filter(|m| m.device_id == device_hex(gpu));
    let partition = ledger
        .fabric
        .partition_of(bdf)
        .map(|(id, r)| (id, r.state, r.holder.clone()));
    if entry.is_none() && partition.is_none() && topology.is_none() {
        return None;
    }
    let module_id = entry.map(|e| e.module_id);
    let partitions = match (module_id, topology) {
        (Some(m), Some((t, _))) => t.partition_attributes(m),
        _ => BTreeMap::new(),
    };
    let nvlink_fabric = match topology {
        Some((t, _)) if module_id.is_some() => Some(platform_name(t).to_string()),
        _ => ledger
            .fabric
            .platform
            .clone()
            .filter(|_| module_id.is_some()),
    };
    Some(GpuFabric {
        module_id,
        module_source: entry.map(|e| e.source),
        partitions,
        nvlink_fabric,
        fabric_managed: topology.is_some_and(|(_, ok)| ok),
        partition,
    })
}

impl Engine {
    fn fabric_config(&self) -> Option<&FabricConfig> {
        self.config.fabric.as_ref()
    }

    /// One GPU's fabric facts for [`Engine::discover`]; `None` without a
    /// configured FM and nothing in the ledger.
    pub(super) fn gpu_fabric(&self, ledger: &LedgerBody, gpu: &Gpu) -> Option<GpuFabric> {
        self.fabric_config()?;
        // Borrowed, not cloned: a discovery asks once per GPU.
        let cache = lock(&self.fabric.cache);
        let topology = cache.as_ref().map(|(t, ok)| (&**t, *ok));
        let mut f = gpu_fabric_from_ledger(ledger, gpu, topology).unwrap_or_default();
        f.fabric_managed = topology.is_some_and(|(_, ok)| ok);
        Some(f)
    }

    /// FM's list; caches its table and whether FM answered.
    fn fm_list(&self, fc: &FabricConfig) -> Result<PartitionList, EngineError> {
        self.fm_listing(fc).map(|(list, _)| list)
    }

    /// [`Engine::fm_list`] with the table made of it (built once per listing).
    fn fm_listing(&self, fc: &FabricConfig) -> Result<(PartitionList, Arc<Topology>), EngineError> {
        match fc.fm.get_supported_partitions() {
            Ok(list) => {
                let t = Arc::new(Topology::from_list(&list).map_err(|e| {
                    EngineError::Fabric(format!("Fabric Manager's partition table: {e}"))
                })?);
                *lock(&self.fabric.cache) = Some((Arc::clone(&t), true));
                Ok((list, t))
            }
            Err(e) => {
                if let Some((_, ok)) = lock(&self.fabric.cache).as_mut() {
                    *ok = false;
                }
                Err(fm_err("listing partitions", &e))
            }
        }
    }

    /// The GPUs on the host now (no holder scan, no product names).
    fn fabric_gpus(&self) -> Result<Vec<Gpu>, EngineError> {
        let host = self.scan_pci(None)?;
        Ok(discover_gpus(&host, &self.selector, None))
    }

    /// The module map a claim's operation on `bdfs` uses. When the ledger
    /// holds, for every one of them, a module id a live source (NVML, the
    /// admin map, FM) confirmed in this boot, it is those entries with the
    /// admin map and FM's BDFs: no PCI scan and no NVML call on the prepare
    /// path (a GPU's module id cannot change within a boot; the periodic
    /// fabric reconcile re-reads every source). Otherwise the full build.
    fn operation_module_map(
        &self,
        fc: &FabricConfig,
        bdfs: &[Bdf],
        list: &PartitionList,
        ledger: &FabricLedger,
    ) -> Result<(ModuleMap, BTreeMap<Bdf, ModuleRecord>), EngineError> {
        let this_boot = |r: &ModuleRecord| r.boot_id == self.boot_id;
        if !bdfs.is_empty()
            && bdfs
                .iter()
                .all(|b| ledger.module_map.get(b).is_some_and(this_boot))
        {
            let mut b = ModuleMapBuilder::new();
            let confirmed = ledger.module_map.iter().filter(|(_, r)| this_boot(r));
            let fast = (|| {
                for (bdf, rec) in confirmed {
                    b.add(ModuleSource::Ledger, *bdf, rec.module_id)?;
                }
                if let Some(path) = &fc.module_map_file {
                    b.add_admin_map_file(path)?;
                }
                b.add_fm_list(list)?;
                b.build()
            })();
            // Anything the live sources now say differently takes the full
            // build, which reports it.
            if let Ok(map) = fast
                && map.superseded().is_empty()
            {
                return Ok((map, ledger.module_map.clone()));
            }
        }
        let gpus = self.fabric_gpus()?;
        self.build_module_map(fc, &gpus, Some(list), ledger)
    }

    /// Resolves the module map from the ledger (hints whose device id still
    /// matches), the admin map, NVML and FM's BDFs; returns it with the
    /// entries the ledger should hold.
    fn build_module_map(
        &self,
        fc: &FabricConfig,
        gpus: &[Gpu],
        list: Option<&PartitionList>,
        ledger: &FabricLedger,
    ) -> Result<(ModuleMap, BTreeMap<Bdf, ModuleRecord>), EngineError> {
        let bad = |e: vfio_gpu_fabric::ModuleMapError| {
            EngineError::Fabric(format!(
                "module map: {e} (fix the static map, or remove the entry from the ledger's fabric.moduleMap)"
            ))
        };
        let mut b = ModuleMapBuilder::new();
        // The live sources alone: a record they confirm belongs to this boot.
        let mut live = ModuleMapBuilder::new();
        let present: BTreeMap<Bdf, &Gpu> = gpus.iter().map(|g| (g.bdf(), g)).collect();
        // NVML's answers of this boot: as good as asking again (a module id
        // cannot change within a boot), so NVML is not asked again for them.
        let mut read_this_boot = BTreeSet::new();
        for (bdf, rec) in &ledger.module_map {
            if present
                .get(bdf)
                .is_some_and(|g| device_hex(g) == rec.device_id)
            {
                if rec.boot_id == self.boot_id && rec.source == ModuleSource::Nvml {
                    b.add(ModuleSource::Nvml, *bdf, rec.module_id)
                        .map_err(bad)?;
                    live.add(ModuleSource::Nvml, *bdf, rec.module_id)
                        .map_err(bad)?;
                    read_this_boot.insert(*bdf);
                } else {
                    b.add(ModuleSource::Ledger, *bdf, rec.module_id)
                        .map_err(bad)?;
                }
            }
        }
        if let Some(path) = &fc.module_map_file {
            b.add_admin_map_file(path).map_err(bad)?;
            live.add_admin_map_file(path).map_err(bad)?;
        }
        if let Some(reader) = &fc.module_ids {
            for g in gpus
                .iter()
                .filter(|g| on_host_driver(g) && !read_this_boot.contains(&g.bdf()))
            {
                match self.read_module_id(reader, g.bdf()) {
                    Ok(Some(m)) if m.0 != 0 => {
                        b.add(ModuleSource::Nvml, g.bdf(), m).map_err(bad)?;
                        live.add(ModuleSource::Nvml, g.bdf(), m).map_err(bad)?;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(gpu = %g.bdf(), error = %e, "no module id from NVML");
                    }
                }
            }
        }
        if let Some(list) = list {
            b.add_fm_list(list).map_err(bad)?;
            live.add_fm_list(list).map_err(bad)?;
        }
        let map = b.build().map_err(bad)?;
        // Its disagreements are the full map's, which failed above.
        let live = live.build().ok();
        for s in map.superseded() {
            tracing::warn!(gpu = %s.bdf, kept = %s.kept.module, dropped = %s.dropped.module, "the ledger's module id was superseded");
        }
        let mut records = BTreeMap::new();
        for (bdf, e) in map.entries() {
            let Some(gpu) = present.get(&bdf) else {
                continue;
            };
            let confirmed = live
                .as_ref()
                .and_then(|l| l.module_of(bdf))
                .filter(|l| l.module == e.module);
            let old = ledger.module_map.get(&bdf);
            let rec = match old {
                Some(o) if o.module_id == e.module && o.device_id == device_hex(gpu) => {
                    let mut r = o.clone();
                    if let Some(live) = confirmed {
                        // Which live source vouches for it in this boot.
                        r.boot_id.clone_from(&self.boot_id);
                        r.source = live.source;
                    }
                    r
                }
                _ => ModuleRecord {
                    module_id: e.module,
                    source: e.source,
                    device_id: device_hex(gpu),
                    boot_id: self.boot_id.clone(),
                    extra: BTreeMap::new(),
                },
            };
            records.insert(bdf, rec);
        }
        Ok((map, records))
    }

    /// One NVML module-id read, under the engine's read deadline: a driver
    /// that hangs in NVML quarantines the GPU's reads instead of blocking
    /// the operation.
    pub(super) fn read_module_id(
        &self,
        reader: &Arc<dyn ModuleIdReader>,
        bdf: Bdf,
    ) -> Result<Option<ModuleId>, String> {
        let reader = Arc::clone(reader);
        self.read_device_bounded(bdf, "NVML module id read", move || reader.module_id(bdf))?
    }

    /// The partitions `bdfs` need under the policy, with nothing changed on
    /// the host or in the ledger; the plugin calls it before it moves any GPU,
    /// so a claim that is not exactly a partition fails first (policy
    /// Required). `holder` is checked against partitions other claims hold.
    pub fn fabric_preflight(
        &self,
        holder: &Holder,
        bdfs: &[Bdf],
    ) -> Result<FabricPlan, EngineError> {
        self.check_alive()?;
        let Some(fc) = self.fabric_config() else {
            return Ok(FabricPlan {
                note: "no Fabric Manager configured".into(),
                ..FabricPlan::default()
            });
        };
        if fc.policy == FabricPolicy::Disabled || bdfs.is_empty() {
            return Ok(FabricPlan {
                note: "fabric policy Disabled".into(),
                ..FabricPlan::default()
            });
        }
        let generation = self.fabric.generation.load(Ordering::SeqCst);
        let (list, topology) = self.fm_listing(fc)?;
        let ledger = self.fabric_ledger();
        let (map, _) = self.operation_module_map(fc, bdfs, &list, &ledger)?;
        let mut plan = self.plan_with(fc, holder, bdfs, &topology, &map, &ledger)?;
        plan.generation = generation;
        plan.ride = self.planned_ride(holder, bdfs, &plan, &list, &topology, &ledger);
        Ok(plan)
    }

    /// The plan's `activating` records, when every partition is one the
    /// activation would simply record and activate: inactive in FM, no
    /// overlapping active partition, no record yet. Anything else the
    /// activation handles in its own order (leaks first, adoption).
    fn planned_ride(
        &self,
        holder: &Holder,
        bdfs: &[Bdf],
        plan: &FabricPlan,
        list: &PartitionList,
        topology: &Topology,
        ledger: &FabricLedger,
    ) -> Option<PlannedRide> {
        if plan.partitions.is_empty() {
            return None;
        }
        let active = list.active();
        let plain = plan.partitions.keys().all(|id| {
            list.get(*id).is_some_and(|p| !p.is_active)
                && topology.overlaps_active(*id, &active).is_empty()
                && !ledger.partitions.contains_key(id)
        });
        plain.then(|| PlannedRide {
            holder: holder.clone(),
            gpus: bdfs.to_vec(),
            records: plan
                .partitions
                .iter()
                .map(|(id, (modules, members))| {
                    let r = self.new_record(
                        PartitionState::Activating,
                        Some(holder.clone()),
                        modules.clone(),
                        members.clone(),
                    );
                    (*id, r)
                })
                .collect(),
        })
    }

    /// Lets the plan's write-ahead `activating` records ride with the ledger
    /// commit that completes the claim's last GPU move, while the returned
    /// guard lives: the activation after the moves then finds its record
    /// written and calls FM with no ledger write of its own. The record never
    /// lands before every GPU of the claim is `configured` for its holder
    /// ([`on_partition_ride`]), so a crash leaves exactly what a crash
    /// between the activation's own write and its FM call leaves. No ride
    /// (an empty guard) when the plan has none.
    pub fn fabric_ride(&self, plan: &FabricPlan) -> FabricRide<'_> {
        let token = plan.ride.clone().map(|plan| {
            let token = self.fabric.next_ride.fetch_add(1, Ordering::Relaxed);
            lock(&self.fabric.rides).push(Ride { token, plan });
            token
        });
        FabricRide {
            engine: self,
            token,
        }
    }

    /// Lands the rides whose claim `body` completes (called by every commit
    /// on the body it is about to write).
    pub(super) fn land_rides(&self, body: &mut LedgerBody) {
        let mut rides = lock(&self.fabric.rides);
        if rides.is_empty() {
            return;
        }
        rides.retain(|ride| {
            let p = &ride.plan;
            let configured = p.gpus.iter().all(|b| {
                body.gpus.get(b).is_some_and(|r| {
                    r.state == OpState::Configured && r.holder.as_ref() == Some(&p.holder)
                })
            });
            let recorded = p
                .records
                .iter()
                .any(|(id, _)| body.fabric.partitions.contains_key(id));
            match on_partition_ride(configured, recorded) {
                OnPartitionRide::Land => {
                    for (id, rec) in &p.records {
                        let mut rec = rec.clone();
                        rec.updated = now();
                        body.fabric.partitions.insert(*id, rec);
                    }
                    false
                }
                OnPartitionRide::Wait => true,
                OnPartitionRide::Drop => false,
            }
        })
    }

    fn plan_with(
        &self,
        fc: &FabricConfig,
        holder: &Holder,
        bdfs: &[Bdf],
        topology: &Topology,
        map: &ModuleMap,
        ledger: &FabricLedger,
    ) -> Result<FabricPlan, EngineError> {
        let mut plan = FabricPlan::default();
        let add = |id: PartitionId, plan: &mut FabricPlan| {
            if let Some(spec) = topology.get(id) {
                let modules: Vec<ModuleId> = spec.modules.iter().copied().collect();
                let members: Vec<Bdf> = modules.iter().filter_map(|m| map.bdf_of(*m)).collect();
                plan.partitions.insert(id, (modules, members));
            }
        };
        match map.modules_of(bdfs) {
            Ok(modules) => match topology.exact(&modules) {
                Some(id) => {
                    add(id, &mut plan);
                    plan.note = format!(
                        "GPUs {} are modules {}: exactly partition {id}",
                        ids_text(bdfs),
                        ids_text(&modules)
                    );
                }
                None if fc.policy == FabricPolicy::BestEffort => {
                    for m in &modules {
                        if let Some(id) = topology.exact(&BTreeSet::from([*m])) {
                            add(id, &mut plan);
                        }
                    }
                    plan.note = format!(
                        "modules {} are not one partition; BestEffort: each GPU gets its 1-GPU partition (no NVLink between them)",
                        ids_text(&modules)
                    );
                }
                None => {
                    let sizes: Vec<String> = topology
                        .partitions()
                        .iter()
                        .filter(|p| p.modules.len() == modules.len())
                        .map(|p| format!("{}={{{}}}", p.id, ids_text(&p.modules)))
                        .collect();
                    return Err(EngineError::Fabric(format!(
                        "GPUs {} are modules {{{}}}, which is not exactly one Fabric Manager partition ({}-GPU partitions: {}); tie the claim's requests with `matchAttribute: vfio-gpu.dra.dev/partition{}`, or set the claim's nvlink policy to BestEffort",
                        ids_text(bdfs),
                        ids_text(&modules),
                        modules.len(),
                        if sizes.is_empty() {
                            "none".to_string()
                        } else {
                            sizes.join(" ")
                        },
                        modules.len()
                    )));
                }
            },
            Err(missing) if fc.policy == FabricPolicy::BestEffort => {
                plan.note = format!(
                    "no module id for {}; BestEffort: no partition activated",
                    ids_text(&missing)
                );
                return Ok(plan);
            }
            Err(missing) => {
                return Err(EngineError::Fabric(format!(
                    "no module id known for {} (FM names GPUs by module id; a GPU on vfio since boot has none readable): add it to the static module map, or let the GPU be seen on nvidia once",
                    ids_text(&missing)
                )));
            }
        }
        // Partitions other claims hold that share a GPU with ours.
        for (id, (modules, _)) in &plan.partitions {
            for (other, rec) in &ledger.partitions {
                let theirs = rec.holder.as_ref();
                if other != id
                    && theirs.is_some_and(|h| h != holder)
                    && rec.modules.iter().any(|m| modules.contains(m))
                {
                    return Err(EngineError::Fabric(format!(
                        "partition {id} overlaps active partition {other} held by {}",
                        theirs.map_or_else(String::new, ToString::to_string)
                    )));
                }
                if other == id
                    && let Some(h) = theirs.filter(|h| *h != holder)
                {
                    return Err(EngineError::Fabric(format!(
                        "partition {id} is held by {h}"
                    )));
                }
            }
        }
        Ok(plan)
    }

    /// Whether no process holds the GPUs' vfio groups: `Err(text)` naming who
    /// does, or why it cannot be told (fails closed).
    fn fabric_idle(&self, partition: PartitionId, bdfs: &[Bdf]) -> Result<(), EngineError> {
        let ledger = self.ledger();
        for b in bdfs {
            if ledger.gpus.contains_key(b) {
                let holders = self.vfio_holders(*b)?;
                if !holders.is_empty() {
                    return Err(EngineError::FabricBusy {
                        partition: partition.0,
                        holders,
                    });
                }
            } else {
                let gpu = self.load_gpu(*b)?;
                if gpu.function.on_vfio() {
                    return Err(EngineError::Fabric(format!(
                        "partition {partition}: {b} is on vfio without a record of ours; who uses it cannot be told, so the partition is left active"
                    )));
                }
            }
        }
        Ok(())
    }

    fn put_partition(
        &self,
        id: PartitionId,
        rec: Option<PartitionRecord>,
        module_map: Option<BTreeMap<Bdf, ModuleRecord>>,
    ) -> Result<(), EngineError> {
        // A partition is boot-scoped (FM forgets it with the host's boot), so
        // its record needs to survive this process, not a power loss; a new
        // module map is learned knowledge and goes to the disk.
        let durability = match &module_map {
            Some(m) if *m != self.fabric_ledger().module_map => Durability::Disk,
            _ => Durability::Process,
        };
        self.commit_with(durability, |b| {
            match rec {
                Some(mut r) => {
                    r.updated = now();
                    b.fabric.partitions.insert(id, r);
                }
                None => {
                    b.fabric.partitions.remove(&id);
                }
            }
            if let Some(m) = module_map {
                b.fabric.module_map = m;
            }
        })
    }

    fn set_partition_state(
        &self,
        id: PartitionId,
        state: PartitionState,
    ) -> Result<(), EngineError> {
        self.commit_with(Durability::Process, |b| {
            if let Some(r) = b.fabric.partitions.get_mut(&id) {
                r.state = state;
                r.updated = now();
            }
        })
    }

    fn new_record(
        &self,
        state: PartitionState,
        holder: Option<Holder>,
        modules: Vec<ModuleId>,
        bdfs: Vec<Bdf>,
    ) -> PartitionRecord {
        PartitionRecord {
            state,
            holder,
            modules,
            bdfs,
            boot_id: self.boot_id.clone(),
            operation: self.new_operation(),
            updated: 0,
            extra: BTreeMap::new(),
        }
    }

    /// Deactivates `id` with a write-ahead `deactivating` record, then drops
    /// it. The caller checked the GPUs are idle.
    fn deactivate_recorded(
        &self,
        fc: &FabricConfig,
        id: PartitionId,
        rec: PartitionRecord,
    ) -> Result<(), EngineError> {
        if rec.state != PartitionState::Deactivating
            || !self.fabric_ledger().partitions.contains_key(&id)
        {
            let mut r = rec;
            r.state = PartitionState::Deactivating;
            self.put_partition(id, Some(r), None)?;
        }
        self.fabric.generation.fetch_add(1, Ordering::SeqCst);
        match fc.fm.deactivate(id) {
            Ok(d) => {
                tracing::info!(partition = %id, outcome = ?d, "Fabric Manager partition deactivated");
                self.mutation_done()?;
            }
            Err(FmError::UnknownPartition(_)) => {
                tracing::warn!(partition = %id, "Fabric Manager no longer lists the partition; dropping its record");
            }
            Err(e) => return Err(fm_err(&format!("deactivating partition {id}"), &e)),
        }
        self.put_partition(id, None, None)
    }

    /// Activates the partition made of exactly `bdfs` for `holder` (policy
    /// BestEffort: each GPU's 1-GPU partition) with a write-ahead record;
    /// called after every GPU of the claim is on vfio, and again on a
    /// retried prepare (an active partition of the holder is answered at
    /// once). An idle leaked partition sharing a GPU is deactivated first;
    /// one whose GPUs are open, or held by another claim, fails the call.
    /// The record is marked `active` before this returns.
    pub fn fabric_activate(
        &self,
        holder: &Holder,
        bdfs: &[Bdf],
    ) -> Result<FabricOutcome, EngineError> {
        self.activate_partitions(holder, bdfs, MarkActive::Now)
    }

    /// [`Engine::fabric_activate`] without the `active` mark, which the
    /// outcome's `unmarked` lists for [`Engine::fabric_mark_active`]: the
    /// plugin answers the kubelet first and marks after. The mark decides
    /// nothing ([`crate::state::on_recorded_partition`] treats an
    /// `activating` record FM lists active, whose holder holds its GPUs,
    /// exactly as an `active` one, and reconcile writes the mark), so a crash
    /// before it loses nothing.
    pub fn fabric_activate_mark_later(
        &self,
        holder: &Holder,
        bdfs: &[Bdf],
    ) -> Result<FabricOutcome, EngineError> {
        self.activate_partitions(holder, bdfs, MarkActive::Later)
    }

    /// Writes the `active` mark of activations
    /// [`Engine::fabric_activate_mark_later`] left unmarked: each record
    /// still `activating` under the same operation number (one an unprepare
    /// or reconcile already moved on is left alone). One ledger write.
    pub fn fabric_mark_active(&self, unmarked: &[UnmarkedActivation]) -> Result<(), EngineError> {
        if unmarked.is_empty() {
            return Ok(());
        }
        let _hold = self.hold_trusted()?;
        let _op = lock(&self.fabric.op);
        let still_activating = |b: &LedgerBody, u: &UnmarkedActivation| {
            b.fabric.partitions.get(&u.partition).is_some_and(|r| {
                r.state == PartitionState::Activating && r.operation == u.operation
            })
        };
        let ledger = self.ledger();
        if !unmarked.iter().any(|u| still_activating(&ledger, u)) {
            return Ok(());
        }
        self.commit_with(Durability::Process, |b| {
            for u in unmarked {
                if still_activating(b, u)
                    && let Some(r) = b.fabric.partitions.get_mut(&u.partition)
                {
                    r.state = PartitionState::Active;
                    r.updated = now();
                }
            }
        })
    }

    /// FM's activation of `id`, whose write-ahead `activating` record
    /// (`operation`) is in the ledger; the `active` mark now or for later.
    /// On failure the record goes only when FM says the partition is
    /// inactive; otherwise reconcile finishes it from FM's list.
    #[allow(clippy::too_many_arguments)] // one call's facts, named
    fn activate_recorded(
        &self,
        fc: &FabricConfig,
        holder: &Holder,
        id: PartitionId,
        modules: &[ModuleId],
        operation: u64,
        mark: MarkActive,
        unmarked: &mut Vec<UnmarkedActivation>,
    ) -> Result<(), EngineError> {
        self.fabric.generation.fetch_add(1, Ordering::SeqCst);
        match fc.fm.activate(id) {
            Ok(a) => {
                tracing::info!(partition = %id, holder = %holder, outcome = ?a, "Fabric Manager partition activated");
                self.mutation_done()?;
                match mark {
                    MarkActive::Now => self.set_partition_state(id, PartitionState::Active)?,
                    MarkActive::Later => unmarked.push(UnmarkedActivation {
                        partition: id,
                        operation,
                    }),
                }
                Ok(())
            }
            Err(e) => {
                let inactive = fc
                    .fm
                    .get_supported_partitions()
                    .ok()
                    .and_then(|l| l.get(id).map(|p| !p.is_active))
                    .unwrap_or(false);
                if inactive {
                    self.put_partition(id, None, None)?;
                }
                Err(fm_err(
                    &format!("activating partition {id} (modules {})", ids_text(modules)),
                    &e,
                ))
            }
        }
    }

    /// The partitions of `plan` to activate straight away: its ride landed
    /// as planned (each record `activating` under its planned operation)
    /// and no FM call of this engine changed FM's partitions since the
    /// preflight listed them (so that list, in which they were inactive
    /// with nothing active overlapping, still holds). `None`: the full
    /// activation, which lists FM again.
    fn landed_as_planned(
        &self,
        holder: &Holder,
        plan: &FabricPlan,
    ) -> Option<Vec<(PartitionId, Vec<ModuleId>, u64)>> {
        let ride = plan.ride.as_ref()?;
        if ride.holder != *holder
            || self.fabric.generation.load(Ordering::SeqCst) != plan.generation
        {
            return None;
        }
        self.with_ledger(|ledger| {
            ride.records
                .iter()
                .map(|(id, planned)| {
                    let landed = ledger.fabric.partitions.get(id)?;
                    (landed.state == PartitionState::Activating
                        && landed.operation == planned.operation
                        && landed.holder.as_ref() == Some(holder))
                    .then(|| (*id, landed.modules.clone(), landed.operation))
                })
                .collect()
        })
    }

    /// [`Engine::fabric_activate_mark_later`] after [`Engine::fabric_ride`]
    /// with the preflight's `plan`: when the ride landed as planned
    /// ([`Engine::landed_as_planned`]) FM's activation is called at once,
    /// with no second listing and no ledger write; otherwise the full
    /// activation runs. The plugin's prepare.
    pub fn fabric_activate_planned(
        &self,
        holder: &Holder,
        bdfs: &[Bdf],
        plan: &FabricPlan,
    ) -> Result<FabricOutcome, EngineError> {
        self.check_alive()?;
        if let Some(fc) = self.fabric_config()
            && fc.policy != FabricPolicy::Disabled
            && plan.ride.as_ref().is_some_and(|r| r.gpus == bdfs)
        {
            let _hold = self.hold_trusted()?;
            let _op = lock(&self.fabric.op);
            if let Some(landed) = self.landed_as_planned(holder, plan) {
                let mut unmarked = Vec::new();
                let mut ids = Vec::new();
                for (id, modules, operation) in landed {
                    self.activate_recorded(
                        fc,
                        holder,
                        id,
                        &modules,
                        operation,
                        MarkActive::Later,
                        &mut unmarked,
                    )?;
                    ids.push(id);
                }
                let mut outcome =
                    FabricOutcome::new(FabricAction::Activated, ids, plan.note.clone());
                outcome.unmarked = unmarked;
                return Ok(outcome);
            }
        }
        self.activate_partitions(holder, bdfs, MarkActive::Later)
    }

    fn activate_partitions(
        &self,
        holder: &Holder,
        bdfs: &[Bdf],
        mark: MarkActive,
    ) -> Result<FabricOutcome, EngineError> {
        self.check_alive()?;
        let Some(fc) = self.fabric_config() else {
            return Ok(FabricOutcome::new(
                FabricAction::NotManaged,
                Vec::new(),
                "no Fabric Manager configured",
            ));
        };
        if fc.policy == FabricPolicy::Disabled {
            return Ok(FabricOutcome::new(
                FabricAction::Disabled,
                Vec::new(),
                "fabric policy Disabled",
            ));
        }
        let _hold = self.hold_trusted()?;
        let _op = lock(&self.fabric.op);
        let (list, topology) = self.fm_listing(fc)?;
        let ledger = self.fabric_ledger();
        let (map, module_records) = self.operation_module_map(fc, bdfs, &list, &ledger)?;
        let plan = self.plan_with(fc, holder, bdfs, &topology, &map, &ledger)?;
        if plan.partitions.is_empty() {
            return Ok(FabricOutcome::new(
                FabricAction::NothingToDo,
                Vec::new(),
                plan.note,
            ));
        }
        let mut actions = Vec::new();
        let mut unmarked = Vec::new();
        for (id, (modules, members)) in &plan.partitions {
            let fm_active = list.get(*id).is_some_and(|p| p.is_active);
            let rec = self.fabric_ledger().partitions.get(id).cloned();
            if let Some(r) = &rec
                && r.holder.as_ref() == Some(holder)
                && r.state == PartitionState::Active
                && fm_active
            {
                actions.push(FabricAction::AlreadyActive);
                continue;
            }
            // Leaks: active partitions sharing a GPU, with no holder.
            for other in topology.overlaps_active(*id, &list.active()) {
                let orec = self.fabric_ledger().partitions.get(&other).cloned();
                if let Some(h) = orec.as_ref().and_then(|r| r.holder.as_ref()) {
                    return Err(EngineError::Fabric(format!(
                        "partition {id} overlaps active partition {other} held by {h}"
                    )));
                }
                let spec = topology
                    .get(other)
                    .map(|s| s.modules.clone())
                    .unwrap_or_default();
                let obdfs: Vec<Bdf> = spec.iter().filter_map(|m| map.bdf_of(*m)).collect();
                if obdfs.len() != spec.len() {
                    return Err(EngineError::Fabric(format!(
                        "partition {id} overlaps active partition {other}, whose GPUs are not all in the module map: it cannot be checked idle, so it is left active"
                    )));
                }
                self.fabric_idle(other, &obdfs)?;
                tracing::warn!(partition = %other, "deactivating an idle leaked partition that overlaps the one a claim needs");
                let r = orec.unwrap_or_else(|| {
                    self.new_record(
                        PartitionState::Deactivating,
                        None,
                        spec.into_iter().collect(),
                        obdfs,
                    )
                });
                self.deactivate_recorded(fc, other, r)?;
            }
            if fm_active {
                // Active with no record, or our own interrupted activation: ours now.
                let r = self.new_record(
                    PartitionState::Active,
                    Some(holder.clone()),
                    modules.clone(),
                    members.clone(),
                );
                self.put_partition(*id, Some(r), Some(module_records.clone()))?;
                actions.push(FabricAction::Adopted);
                continue;
            }
            // The record that rode with the last GPU move, or our own write.
            let matches = rec.as_ref().is_some_and(|r| {
                r.holder.as_ref() == Some(holder) && r.modules == *modules && r.bdfs == *members
            });
            let new_map = module_records != self.fabric_ledger().module_map;
            let operation = match rec {
                Some(r) if !activating_record_needed(Some(r.state), matches, new_map) => {
                    r.operation
                }
                _ => {
                    let r = self.new_record(
                        PartitionState::Activating,
                        Some(holder.clone()),
                        modules.clone(),
                        members.clone(),
                    );
                    let operation = r.operation;
                    self.put_partition(*id, Some(r), Some(module_records.clone()))?;
                    operation
                }
            };
            self.activate_recorded(fc, holder, *id, modules, operation, mark, &mut unmarked)?;
            actions.push(FabricAction::Activated);
        }
        let ids: Vec<PartitionId> = plan.partitions.keys().copied().collect();
        let action = if actions.iter().all(|a| *a == FabricAction::AlreadyActive) {
            FabricAction::AlreadyActive
        } else if actions.contains(&FabricAction::Activated) {
            FabricAction::Activated
        } else {
            FabricAction::Adopted
        };
        let mut outcome = FabricOutcome::new(action, ids, plan.note);
        outcome.unmarked = unmarked;
        Ok(outcome)
    }

    /// Deactivates every partition the ledger records for `holder` (never
    /// re-derived from module ids), refusing while any of its GPUs is open
    /// through VFIO; the plugin calls it before it releases the GPUs.
    pub fn fabric_deactivate(&self, holder: &Holder) -> Result<FabricOutcome, EngineError> {
        let _hold = self.hold_trusted()?;
        let held: Vec<(PartitionId, PartitionRecord)> = self
            .ledger()
            .fabric
            .held_by(holder)
            .map(|(id, r)| (id, r.clone()))
            .collect();
        if held.is_empty() {
            return Ok(FabricOutcome::new(
                FabricAction::NothingToDo,
                Vec::new(),
                "no partition recorded",
            ));
        }
        let Some(fc) = self.fabric_config() else {
            return Err(EngineError::Fabric(format!(
                "the ledger records partition(s) {} for {holder}, but no Fabric Manager is configured to deactivate them",
                ids_text(held.iter().map(|(id, _)| id))
            )));
        };
        let _op = lock(&self.fabric.op);
        for (id, rec) in &held {
            self.fabric_idle(*id, &rec.bdfs)?;
        }
        let ids: Vec<PartitionId> = held.iter().map(|(id, _)| *id).collect();
        for (id, rec) in held {
            self.deactivate_recorded(fc, id, rec)?;
        }
        Ok(FabricOutcome::new(
            FabricAction::Deactivated,
            ids,
            "deactivated",
        ))
    }

    /// Brings the ledger and FM's active list in line: replays the list
    /// after an FM `--restart` (resiliency agent only), finishes
    /// `activating`/`deactivating` records a crash interrupted, re-activates a
    /// holder's partition FM lost, adopts an active partition whose GPUs one
    /// claim holds, and deactivates idle leaks. Never deactivates a partition
    /// whose GPUs are open through VFIO. Run at start and periodically.
    pub fn fabric_reconcile(&self) -> Result<Vec<FabricOutcome>, EngineError> {
        self.check_alive()?;
        let Some(fc) = self.fabric_config() else {
            return Ok(Vec::new());
        };
        let _hold = self.hold_trusted()?;
        let _op = lock(&self.fabric.op);
        // Before FM is asked: a GPU a crashed learn left on nvidia goes back
        // to vfio even while FM is unreachable.
        self.finish_pending_learn()?;
        let mut out = Vec::new();
        let list = self.list_replaying(fc, &mut out)?;
        let topology = Topology::from_list(&list)
            .map_err(|e| EngineError::Fabric(format!("Fabric Manager's partition table: {e}")))?;
        let gpus = self.fabric_gpus()?;
        let ledger = self.ledger();
        let (map, module_records) =
            self.build_module_map(fc, &gpus, Some(&list), &ledger.fabric)?;
        let platform = Some(platform_name(&topology).to_string());
        let hash = Some(topology.hash());
        if ledger.fabric.module_map != module_records
            || ledger.fabric.platform != platform
            || ledger.fabric.topology_hash != hash
        {
            if ledger.fabric.topology_hash.is_some() && ledger.fabric.topology_hash != hash {
                tracing::warn!(
                    "Fabric Manager's partition table changed since it was recorded (hardware or FM changed)"
                );
            }
            self.commit(|b| {
                b.fabric.module_map = module_records;
                b.fabric.platform = platform;
                b.fabric.topology_hash = hash;
            })?;
        }
        self.reconcile_recorded(fc, &list, &ledger, &mut out)?;
        self.reconcile_unrecorded(fc, &list, &topology, &map, &ledger, &mut out)?;
        Ok(out)
    }

    /// Reconcile, part 1: every partition the ledger records, against FM's list.
    fn reconcile_recorded(
        &self,
        fc: &FabricConfig,
        list: &PartitionList,
        ledger: &LedgerBody,
        out: &mut Vec<FabricOutcome>,
    ) -> Result<(), EngineError> {
        for (id, rec) in ledger.fabric.partitions.clone() {
            let one = |action, detail: String| FabricOutcome::new(action, vec![id], detail);
            let Some(p) = list.get(id) else {
                self.put_partition(id, None, None)?;
                out.push(one(
                    FabricAction::Dropped,
                    "Fabric Manager does not list it".into(),
                ));
                continue;
            };
            let holds = rec
                .holder
                .as_ref()
                .is_some_and(|h| rec.bdfs.iter().all(|b| self.held_by(h).contains(b)));
            let r = match on_recorded_partition(rec.state, p.is_active, holds) {
                OnRecordedPartition::Forget { finished } => {
                    self.put_partition(id, None, None)?;
                    Ok(if finished {
                        one(FabricAction::Finished, "deactivation finished".into())
                    } else {
                        one(
                            FabricAction::Dropped,
                            "inactive and its holder does not hold its GPUs".into(),
                        )
                    })
                }
                OnRecordedPartition::MarkActive => {
                    self.set_partition_state(id, PartitionState::Active)?;
                    Ok(one(FabricAction::Finished, "activation finished".into()))
                }
                OnRecordedPartition::Keep => Ok(one(FabricAction::Noted, "active, held".into())),
                OnRecordedPartition::Activate => {
                    self.set_partition_state(id, PartitionState::Activating)?;
                    self.fabric.generation.fetch_add(1, Ordering::SeqCst);
                    match fc.fm.activate(id) {
                        Ok(_) => {
                            self.mutation_done()?;
                            self.set_partition_state(id, PartitionState::Active)?;
                            Ok(one(FabricAction::Finished, "activated again: Fabric Manager had lost it, or a crash came before the activation was recorded (a running VM's NVLink state is unknown)".into()))
                        }
                        Err(e) => Err(fm_err(&format!("re-activating partition {id}"), &e)),
                    }
                }
                OnRecordedPartition::DeactivateWhenIdle => match self.fabric_idle(id, &rec.bdfs) {
                    Ok(()) => self.deactivate_recorded(fc, id, rec.clone()).map(|()| {
                        one(
                            FabricAction::Deactivated,
                            "deactivated (interrupted release or leak)".into(),
                        )
                    }),
                    Err(e @ (EngineError::FabricBusy { .. } | EngineError::Fabric(_))) => {
                        Ok(one(FabricAction::Noted, format!("left active: {e}")))
                    }
                    Err(e) => Err(e),
                },
            };
            out.push(r?);
        }
        Ok(())
    }

    /// Reconcile, part 2: active partitions the ledger did not record
    /// (adopted, deactivated when idle, or reported).
    fn reconcile_unrecorded(
        &self,
        fc: &FabricConfig,
        list: &PartitionList,
        topology: &Topology,
        map: &ModuleMap,
        ledger: &LedgerBody,
        out: &mut Vec<FabricOutcome>,
    ) -> Result<(), EngineError> {
        // Active partitions the ledger does not know.
        // (FM's list is from before the loop above: a partition it handled is skipped.)
        let recorded = self.ledger().fabric;
        for id in list.active() {
            if recorded.partitions.contains_key(&id) || ledger.fabric.partitions.contains_key(&id) {
                continue;
            }
            let spec: Vec<ModuleId> = topology
                .get(id)
                .map(|s| s.modules.iter().copied().collect())
                .unwrap_or_default();
            let bdfs: Vec<Bdf> = spec.iter().filter_map(|m| map.bdf_of(*m)).collect();
            if bdfs.len() != spec.len() {
                out.push(FabricOutcome::new(
                    FabricAction::Noted,
                    vec![id],
                    "active, not ours, and not every GPU is in the module map: left active"
                        .to_string(),
                ));
                continue;
            }
            let ledger = self.ledger();
            let mut holders: Vec<Option<&Holder>> = Vec::new();
            for h in bdfs
                .iter()
                .map(|b| ledger.gpus.get(b).and_then(|r| r.holder.as_ref()))
            {
                if !holders.contains(&h) {
                    holders.push(h);
                }
            }
            let claim = match holders.first() {
                Some(Some(h @ Holder::Claim { .. })) if holders.len() == 1 => Some((*h).clone()),
                _ => None,
            };
            if let Some(h) = claim.filter(|h| {
                let mut mine = self.held_by(h);
                mine.sort();
                let mut want = bdfs.clone();
                want.sort();
                mine == want
            }) {
                let r = self.new_record(PartitionState::Active, Some(h.clone()), spec, bdfs);
                self.put_partition(id, Some(r), None)?;
                out.push(FabricOutcome::new(
                    FabricAction::Adopted,
                    vec![id],
                    format!("active with no record; its GPUs are exactly {h}'s: adopted"),
                ));
                continue;
            }
            if holders
                .iter()
                .any(|h| matches!(h, Some(Holder::Claim { .. })))
            {
                out.push(FabricOutcome::new(
                    FabricAction::Noted,
                    vec![id],
                    "active, not ours, shares GPUs with a claim: left active".to_string(),
                ));
                continue;
            }
            match self.fabric_idle(id, &bdfs) {
                Ok(()) => {
                    let r = self.new_record(PartitionState::Deactivating, None, spec, bdfs);
                    self.deactivate_recorded(fc, id, r)?;
                    out.push(FabricOutcome::new(
                        FabricAction::Deactivated,
                        vec![id],
                        "idle leak deactivated".to_string(),
                    ));
                }
                Err(e @ (EngineError::FabricBusy { .. } | EngineError::Fabric(_))) => {
                    out.push(FabricOutcome::new(
                        FabricAction::Noted,
                        vec![id],
                        format!("active, not ours, left active: {e}"),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// FM's list; when FM waits for its restart replay and this engine is
    /// the resiliency agent, replays the ledger's active partitions first
    /// (`fmSetActivatedFabricPartitions`). The caller holds the state and
    /// fabric locks.
    fn list_replaying(
        &self,
        fc: &FabricConfig,
        out: &mut Vec<FabricOutcome>,
    ) -> Result<PartitionList, EngineError> {
        let list = match fc.fm.get_supported_partitions() {
            Ok(l) => {
                self.fm_list_cached(&l)?;
                l
            }
            Err(e) if e.is_retryable() && fc.resiliency_agent => {
                let ids: Vec<PartitionId> = self
                    .ledger()
                    .fabric
                    .partitions
                    .iter()
                    .filter(|(_, r)| r.state != PartitionState::Activating)
                    .map(|(id, _)| *id)
                    .collect();
                self.fabric.generation.fetch_add(1, Ordering::SeqCst);
                fc.fm.set_activated_partitions(&ids).map_err(|e| {
                    fm_err(
                        "replaying the active partitions (fmSetActivatedFabricPartitions)",
                        &e,
                    )
                })?;
                self.mutation_done()?;
                tracing::warn!(partitions = %ids_text(&ids), "Fabric Manager restarted: active partitions replayed");
                out.push(FabricOutcome::new(
                    FabricAction::Replayed,
                    ids.clone(),
                    format!(
                        "Fabric Manager was waiting for its restart replay; sent [{}]",
                        ids_text(&ids)
                    ),
                ));
                self.fm_list(fc)?
            }
            Err(e) => {
                if let Some((_, ok)) = lock(&self.fabric.cache).as_mut() {
                    *ok = false;
                }
                return Err(fm_err("listing partitions", &e));
            }
        };
        Ok(list)
    }

    /// Cheap check for `serve`'s fabric watch (every few seconds): lists FM
    /// and, when it waits for its restart replay and this engine is the
    /// resiliency agent, replays at once (FM exits if no replay comes within
    /// 60 s). `Ok(None)`: nothing to do, or no FM configured.
    pub fn fabric_watch(&self) -> Result<Option<FabricOutcome>, EngineError> {
        self.check_alive()?;
        let Some(fc) = self.fabric_config() else {
            return Ok(None);
        };
        match fc.fm.get_supported_partitions() {
            Ok(l) => {
                self.fm_list_cached(&l)?;
                Ok(None)
            }
            Err(e) if e.is_retryable() && fc.resiliency_agent => {
                let _hold = self.hold_trusted()?;
                let _op = lock(&self.fabric.op);
                let mut out = Vec::new();
                self.list_replaying(fc, &mut out)?;
                Ok(out.pop())
            }
            Err(e) => {
                if let Some((_, ok)) = lock(&self.fabric.cache).as_mut() {
                    *ok = false;
                }
                Err(fm_err("listing partitions", &e))
            }
        }
    }

    fn fm_list_cached(&self, list: &PartitionList) -> Result<(), EngineError> {
        let t = Topology::from_list(list)
            .map_err(|e| EngineError::Fabric(format!("Fabric Manager's partition table: {e}")))?;
        *lock(&self.fabric.cache) = Some((Arc::new(t), true));
        Ok(())
    }

    /// FM's partitions, the ledger's and the module map, for `fabric status`.
    /// Changes nothing. `None` without a configured FM.
    pub fn fabric_status(&self) -> Option<FabricStatus> {
        let fc = self.fabric_config()?;
        let fm = self.fm_list(fc).map_err(|e| e.to_string());
        let ledger = self.ledger();
        let module_map = self
            .fabric_gpus()
            .and_then(|gpus| self.build_module_map(fc, &gpus, fm.as_ref().ok(), &ledger.fabric))
            .map(|(m, _)| {
                m.entries()
                    .map(|(b, e)| (b, (e.module, e.source)))
                    .collect()
            })
            .map_err(|e| e.to_string());
        Some(FabricStatus {
            policy: fc.policy,
            resiliency_agent: fc.resiliency_agent,
            fm,
            ledger: ledger.fabric,
            module_map,
        })
    }
}

/// Guard rail: a GPU whose IOMMU group holds an NVSwitch (class 0x0680) never
/// moves, even when the policy allows foreign group members.
pub(super) fn refuse_fabric_switches(gpu: &Gpu) -> Result<(), EngineError> {
    let members: Vec<String> = gpu
        .fabric_switch_members()
        .map(|m| format!("{} ({})", m.bdf, m.identity.vendor_device()))
        .collect();
    if members.is_empty() {
        Ok(())
    } else {
        Err(EngineError::FabricSwitchInGroup {
            bdf: gpu.bdf(),
            members: members.join(", "),
        })
    }
}
