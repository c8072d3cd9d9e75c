//! NodePrepareResources / NodeUnprepareResources on top of the binding engine.
//!
//! Prepare: GET the ResourceClaim, check UID and allocation, keep this driver's results
//! in this node's pool, resolve the opaque config, map device names to discovered GPUs
//! (names are untrusted: only compared, never used in paths), check pins, foreign
//! group members and holders, configure the GPUs in parallel, write the CDI spec and
//! the KEP-5304 metadata. Every check runs before the first host change, so a refused
//! claim changes nothing.
//!
//! Unprepare: from the engine's ledger alone (the claim object may be gone): release
//! the GPUs held by the claim's UID, then remove its CDI spec and metadata.
//!
//! Calls for one claim are serialised, from before the claim is read from the API
//! server: an unprepare that arrives while a prepare still waits for the API server
//! waits for that prepare and then releases what it configured, instead of finding
//! nothing and letting the prepare leak the GPU afterwards. Different claims run
//! concurrently.
//!
//! Each claim's work holds the engine's state lock ([`Engine::hold`]) from its
//! first ledger read to its last write: with a second plugin instance on the
//! node (a rolling update, [`vfio_gpu_engine::StateLockMode::PerOperation`]) it
//! then works on the ledger as the other instance left it, and the two never
//! write it at once. The claim lock comes before the state lock, never after, so
//! a slow API server delays only calls for the same claim.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{Shared, join_all};
use k8s_openapi::api::resource::v1::{DeviceRequestAllocationResult, ResourceClaim};
use kube::Api;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use vfio_gpu_engine::ledger::{LedgerBody, OpState};
use vfio_gpu_engine::{
    Action, Engine, EngineError, FabricOutcome, GpuView, Holder, Outcome, StateHold, StateLockMode,
    UnmarkedActivation,
};
use vfio_gpu_host::Bdf;

use crate::apiserver::{missing_resource_v1, missing_resource_v1_after};
use crate::cdi::{CdiGpu, CdiWriter, is_safe_uid};
use crate::config::{ClaimConfig, Consumer, IommuBackend, VfioDeviceConfig, base_request};
use crate::grpc::dra::{
    BoxFuture, ClaimRef, DraBackend, PrepareResults, PreparedDevice, UnprepareResults,
};
use crate::metadata::{
    ClaimIdentity, MetadataDevice, MetadataWriter, POD_CLAIM_NAME_ANNOTATION, is_safe_name,
};
use crate::metrics::{Direction, Metrics};
use crate::prepare_error::{GpuFailure, PrepareError, Refusal};
use crate::slices::{DeviceInfo, device_attributes};

/// The ResourceSlice device name of a GPU (`gpu-0000-ab-00-0`): the publisher's rule,
/// re-exported so prepare maps names back to GPUs exactly as they were published.
pub use crate::slices::device_name;

/// Settings of the plugin.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Driver name (allocation `driver`, CDI vendor).
    pub driver_name: String,
    /// Node name; also the pool name of this node's devices.
    pub node_name: String,
    /// CDI spec directory (normally `/var/run/cdi`).
    pub cdi_root: PathBuf,
    /// Plugin data directory; metadata files go under it.
    pub data_dir: PathBuf,
    /// Upper bound for the claim GET (the kubelet gives the whole call 45 s).
    pub api_timeout: Duration,
    /// Each NodePrepare/NodeUnprepare call answers within this; a claim whose work
    /// is still running then gets a retryable error while the work goes on in the
    /// background (below the kubelet's 45 s call timeout).
    pub call_budget: Duration,
    /// Mirror of the policy's `binding.allow-foreign-group-members`.
    pub allow_foreign_group_members: bool,
    /// Where call durations, moves and rollbacks are counted.
    pub metrics: Arc<Metrics>,
    /// Also mount each request's metadata where KubeVirt 1.8.0–1.8.2 read it
    /// (`/var/run/dra-device-attributes/...`, one `v1alpha1` object).
    pub legacy_kubevirt_metadata: bool,
}

impl PluginConfig {
    /// Defaults for `driver` on `node`: `/var/run/cdi` and
    /// `/var/lib/kubelet/plugins/<driver>`.
    pub fn new(driver_name: impl Into<String>, node_name: impl Into<String>) -> Self {
        let driver_name = driver_name.into();
        Self {
            data_dir: PathBuf::from("/var/lib/kubelet/plugins").join(&driver_name),
            driver_name,
            node_name: node_name.into(),
            cdi_root: PathBuf::from("/var/run/cdi"),
            api_timeout: Duration::from_secs(20),
            call_budget: Duration::from_secs(40),
            allow_foreign_group_members: false,
            metrics: Metrics::new(),
            legacy_kubevirt_metadata: false,
        }
    }
}

type ClaimLocks = StdMutex<HashMap<String, Arc<AsyncMutex<()>>>>;

/// Holds one claim's lock; drops the map entry when nobody else waits for it.
struct ClaimGuard<'a> {
    locks: &'a ClaimLocks,
    uid: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.uid)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.uid);
        }
    }
}

/// One allocation result of ours, resolved to a GPU.
struct Planned {
    result: DeviceRequestAllocationResult,
    bdf: Bdf,
    view: GpuView,
    config: VfioDeviceConfig,
}

/// Each GPU's move, and the partition's activation when every move succeeded.
type MovesAndActivation = (
    Vec<Result<Outcome, EngineError>>,
    Option<Result<FabricOutcome, EngineError>>,
    EngineLaps,
);

/// How long the engine's fabric check, moves and activation took within one
/// trip (for [`PreparePhases`]).
type EngineLaps = [(&'static str, Duration); 3];

/// How long after a prepare's answer its partitions' `active` mark is
/// written ([`VfioPlugin::mark_active_later`]).
const MARK_DELAY: Duration = Duration::from_millis(2);

/// The kubelet DRA backend of vfio-gpu-dra.
pub struct VfioPlugin {
    /// Lets kubelet calls hand their work to tasks that outlive the call.
    me: Weak<VfioPlugin>,
    engine: Arc<Engine>,
    client: kube::Client,
    config: PluginConfig,
    cdi: CdiWriter,
    metadata: MetadataWriter,
    locks: ClaimLocks,
    preparing: Runs<Vec<PreparedDevice>>,
    unpreparing: Runs<()>,
    /// Completed claims the last cleanup found gone or replaced with no process on
    /// their vfio devices: released if the next cleanup finds them so again.
    idle_orphans: StdMutex<HashSet<String>>,
    /// NVLink partitions' `active` marks, written after the kubelet has its
    /// answer ([`VfioPlugin::settle`] waits for them).
    marks: StdMutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl VfioPlugin {
    /// A plugin driving `engine`, reading claims through `client`.
    pub fn new(engine: Arc<Engine>, client: kube::Client, config: PluginConfig) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            cdi: CdiWriter::new(&config.cdi_root, &config.driver_name),
            metadata: MetadataWriter::new(&config.driver_name, &config.data_dir, &config.cdi_root)
                .with_legacy_kubevirt_path(config.legacy_kubevirt_metadata),
            engine,
            client,
            config,
            locks: StdMutex::new(HashMap::new()),
            preparing: Runs::default(),
            unpreparing: Runs::default(),
            idle_orphans: StdMutex::new(HashSet::new()),
            marks: StdMutex::new(Vec::new()),
        })
    }

    /// Waits for the background writes a prepare left behind (the NVLink
    /// partitions' `active` marks), so what reads the ledger next sees them.
    pub async fn settle(&self) {
        let pending: Vec<_> = match self.marks.lock() {
            Ok(mut m) => m.drain(..).collect(),
            Err(poisoned) => poisoned.into_inner().drain(..).collect(),
        };
        for task in pending {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "writing an NVLink partition's active mark failed");
            }
        }
    }

    /// Writes the `active` mark of partitions FM activated, off the prepare's
    /// path: it decides nothing (reconcile finishes an `activating` record FM
    /// lists active), so the kubelet need not wait for it. It starts
    /// [`MARK_DELAY`] later, so that its ledger write does not take a core
    /// from the answer on its way to the kubelet.
    fn mark_active_later(&self, unmarked: Vec<UnmarkedActivation>) {
        if unmarked.is_empty() {
            return;
        }
        let engine = Arc::clone(&self.engine);
        let task = tokio::spawn(async move {
            tokio::time::sleep(MARK_DELAY).await;
            let marked = tokio::task::spawn_blocking(move || engine.fabric_mark_active(&unmarked));
            match marked.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "NVLink partition active mark not written; reconcile writes it");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NVLink partition active mark not written; reconcile writes it");
                }
            }
        });
        let mut marks = match self.marks.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        marks.retain(|t| !t.is_finished());
        marks.push(task);
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The settings.
    pub fn config(&self) -> &PluginConfig {
        &self.config
    }

    /// The CDI writer (paths and IDs of claim specs).
    pub fn cdi(&self) -> &CdiWriter {
        &self.cdi
    }

    /// The metadata writer (paths and IDs of metadata files).
    pub fn metadata(&self) -> &MetadataWriter {
        &self.metadata
    }

    async fn lock_claim(&self, uid: &str) -> ClaimGuard<'_> {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(uid.to_string()).or_default())
        };
        let guard = lock.lock_owned().await;
        ClaimGuard {
            locks: &self.locks,
            uid: uid.to_string(),
            guard: Some(guard),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Engine) -> T + Send + 'static,
    ) -> Result<T, PrepareError> {
        let engine = Arc::clone(&self.engine);
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(|e| PrepareError::TaskFailed {
                what,
                detail: e.to_string(),
            })
    }

    /// The engine's state lock for one claim's work (see the module docs);
    /// waits off the runtime when another process may hold it.
    async fn hold_state(&self) -> Result<StateHold, PrepareError> {
        let held = if self.engine.config().state_lock_mode == StateLockMode::Lifetime {
            self.engine.hold()
        } else {
            self.blocking("taking the state lock", |e| e.hold()).await?
        };
        held.map_err(|e| PrepareError::StateLock(e.to_string()))
    }

    /// GETs the claim; `Ok(None)` when it does not exist.
    async fn get_claim(&self, c: &ClaimRef) -> Result<Option<ResourceClaim>, PrepareError> {
        check_claim_names(c)?;
        let fetch = |detail: String| PrepareError::Fetch {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
            detail,
        };
        let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), &c.namespace);
        let lookup = async {
            match api.get_opt(&c.name).await {
                Ok(Some(found)) => Ok(Some(found)),
                // A server without resource.k8s.io/v1 answers 404 too: say so instead
                // of "not found".
                Ok(None) => match missing_resource_v1(&self.client).await {
                    Some(msg) => Err(PrepareError::ResourceApiMissing(msg)),
                    None => Ok(None),
                },
                Err(e) => Err(match missing_resource_v1_after(&self.client, &e).await {
                    Some(msg) => PrepareError::ResourceApiMissing(msg),
                    None => fetch(e.to_string()),
                }),
            }
        };
        tokio::time::timeout(self.config.api_timeout, lookup)
            .await
            .unwrap_or_else(|_| {
                Err(fetch(format!(
                    "no answer from the API server within {:?}",
                    self.config.api_timeout
                )))
            })
    }

    /// The claim `c` names, refused when it is gone or was replaced (another UID).
    async fn current_claim(&self, c: &ClaimRef) -> Result<ResourceClaim, PrepareError> {
        let claim = self
            .get_claim(c)
            .await?
            .ok_or_else(|| PrepareError::NotFound {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
            })?;
        let found_uid = claim.metadata.uid.as_deref().unwrap_or_default();
        if found_uid != c.uid {
            return Err(PrepareError::Replaced {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                found: found_uid.to_string(),
            });
        }
        Ok(claim)
    }

    /// Prepares one claim (see the module docs); the error text goes to the kubelet.
    pub async fn prepare_claim(&self, c: &ClaimRef) -> Result<Vec<PreparedDevice>, PrepareError> {
        self.prepare_inner(c).await.map_err(|e| e.for_claim(c))
    }

    async fn prepare_inner(&self, c: &ClaimRef) -> Result<Vec<PreparedDevice>, PrepareError> {
        if !is_safe_uid(&c.uid) {
            return Err(PrepareError::InvalidUid(c.uid.clone()));
        }
        // Locked before the claim is read: an unprepare arriving meanwhile must wait
        // and then release what this prepare configures (it would find nothing now).
        let _guard = self.lock_claim(&c.uid).await;
        let mut phases = PreparePhases::start();
        check_claim_names(c)?;
        let _hold = self.hold_state().await?;
        // Discovery only reads the host, and needs nothing from the claim: it runs
        // while the claim is read from the API server (a round trip that would
        // otherwise leave the plugin idle). On any error below it is simply dropped.
        let discovery = {
            let engine = Arc::clone(&self.engine);
            tokio::task::spawn_blocking(move || engine.discover_without_holders())
        };
        let claim = self.current_claim(c).await?;
        phases.lap("claim");
        let allocation = claim
            .status
            .as_ref()
            .and_then(|s| s.allocation.as_ref())
            .ok_or(PrepareError::NotAllocated)?;
        let devices = allocation.devices.clone().unwrap_or_default();
        let all_results = devices.results.unwrap_or_default();
        let ours = self.our_results(&c.uid, all_results)?;
        let driver = &self.config.driver_name;
        let claim_config =
            ClaimConfig::from_allocation(devices.config.as_deref().unwrap_or(&[]), driver)
                .map_err(|e| PrepareError::Invalid(e.to_string()))?;
        let identity = ClaimIdentity {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
            uid: c.uid.clone(),
            pod_claim_name: claim
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(POD_CLAIM_NAME_ANNOTATION))
                .cloned(),
        };
        // Request and pod claim names become file names and CDI names: refuse bad ones
        // now, before any GPU moves, not after (a refused claim must change nothing).
        for r in &ours {
            self.metadata
                .check_names(&identity, base_request(&r.request))
                .map_err(|e| PrepareError::Invalid(e.to_string()))?;
        }
        let holder = Holder::Claim {
            uid: c.uid.clone(),
            namespace: c.namespace.clone(),
            name: c.name.clone(),
        };

        // What the kernel offers for iommufd is known only from files; read them once,
        // and only for claims that ask for it.
        let iommufd_kernel = if ours
            .iter()
            .any(|r| claim_config.for_request(&r.request).iommu_backend == IommuBackend::Iommufd)
        {
            self.blocking("checking iommufd support", |e| {
                vfio_gpu_host::iommufd_unsupported(e.root())
            })
            .await?
            .map_err(|e| PrepareError::Host {
                what: "checking iommufd support",
                detail: e.to_string(),
            })?
        } else {
            None
        };

        let (views, _) = discovery
            .await
            .map_err(|e| PrepareError::TaskFailed {
                what: "discovering GPUs",
                detail: e.to_string(),
            })?
            .map_err(|e| PrepareError::Host {
                what: "discovering GPUs",
                detail: e.to_string(),
            })?;
        let planned = self.plan(
            &c.uid,
            ours,
            &views,
            &claim_config,
            iommufd_kernel.as_deref(),
        )?;
        phases.lap("discover");

        // Distinct GPUs, in allocation order.
        let mut bdfs: Vec<Bdf> = Vec::new();
        for p in &planned {
            if !bdfs.contains(&p.bdf) {
                bdfs.push(p.bdf);
            }
        }
        let (results, activation, laps) = self.move_and_activate(&holder, &bdfs).await?;
        phases.lap("engine");
        phases.laps.extend(laps);
        let mut outcomes: HashMap<Bdf, Outcome> = HashMap::new();
        let mut newly: Vec<Bdf> = Vec::new();
        let mut errors: Vec<GpuFailure> = Vec::new();
        for (bdf, r) in bdfs.iter().zip(results) {
            self.config.metrics.record_move(Direction::ToVfio, &r);
            match r {
                Ok(o) => {
                    if o.action != Action::AlreadyConfigured {
                        newly.push(*bdf);
                    }
                    outcomes.insert(*bdf, o);
                }
                Err(e) => errors.push(GpuFailure::new(*bdf, &e)),
            }
        }
        if !errors.is_empty() {
            let undo = self.release(&newly, &holder).await;
            return Err(PrepareError::Gpus(errors).with_undo(undo));
        }

        // Every GPU is on vfio and the claim's partition was activated, or not.
        let unmarked = match activation {
            Some(a) => self.fabric_activated(&holder, a, &newly).await?,
            None => Vec::new(),
        };

        match self.write_files(&identity, &planned, &outcomes) {
            Ok(devices) => {
                phases.lap("files");
                phases.log(&c.uid, bdfs.len());
                self.mark_active_later(unmarked);
                self.config
                    .metrics
                    .set_claim_pod(&c.uid, &reserved_pod(&claim));
                Ok(devices)
            }
            Err(e) => {
                let mut undo = self.undo_fabric(&holder).await;
                undo.extend(self.release(&newly, &holder).await);
                Err(e.with_undo(undo))
            }
        }
    }

    /// The allocation results for this driver on this node; refused when there
    /// are none (the error lists what the claim did get).
    fn our_results(
        &self,
        uid: &str,
        all_results: Vec<DeviceRequestAllocationResult>,
    ) -> Result<Vec<DeviceRequestAllocationResult>, PrepareError> {
        let driver = &self.config.driver_name;
        let node = &self.config.node_name;
        let (ours, others): (Vec<_>, Vec<_>) = all_results
            .into_iter()
            .partition(|r| &r.driver == driver && &r.pool == node);
        if ours.is_empty() {
            let seen: Vec<String> = others
                .iter()
                .map(|r| {
                    format!(
                        "{:?} from driver {:?} pool {:?}",
                        r.device, r.driver, r.pool
                    )
                })
                .collect();
            return Err(PrepareError::NothingForUs {
                driver: driver.clone(),
                pool: node.clone(),
                seen: if seen.is_empty() {
                    "nothing".to_string()
                } else {
                    seen.join(", ")
                },
            });
        }
        for r in others.iter().filter(|r| &r.driver == driver) {
            tracing::warn!(claim = %uid, device = %r.device, pool = %r.pool, "ignoring a result of our driver in another node's pool");
        }
        Ok(ours)
    }

    /// Resolves our results to GPUs and runs every check that needs no host change.
    /// `iommufd_kernel` is why this kernel cannot serve the iommufd backend, if so.
    fn plan(
        &self,
        uid: &str,
        ours: Vec<DeviceRequestAllocationResult>,
        views: &[GpuView],
        claim_config: &ClaimConfig,
        iommufd_kernel: Option<&str>,
    ) -> Result<Vec<Planned>, PrepareError> {
        let by_name: HashMap<String, &GpuView> = views
            .iter()
            .map(|v| (device_name(&v.gpu.bdf()), v))
            .collect();
        let ledger = self.engine.ledger();
        let mut planned = Vec::new();
        let mut errors = Vec::new();
        for r in ours {
            // Debug formatting escapes whatever the name holds; it is never a path.
            let Some(view) = by_name.get(r.device.as_str()) else {
                errors.push(Refusal::NotOnNode {
                    device: r.device.clone(),
                    request: r.request.clone(),
                    node: self.config.node_name.clone(),
                });
                continue;
            };
            let bdf = view.gpu.bdf();
            if r.admin_access == Some(true) {
                errors.push(Refusal::AdminAccess(bdf));
                continue;
            }
            if let Some(pin) = &view.verdict.pinned {
                errors.push(Refusal::Pinned {
                    bdf,
                    pin: vfio_gpu_engine::pin_text(pin),
                });
                continue;
            }
            let blocking: Vec<String> = view
                .gpu
                .blocking_members()
                .map(|m| m.bdf.to_string())
                .collect();
            if !blocking.is_empty() && !self.config.allow_foreign_group_members {
                errors.push(Refusal::ForeignGroupMembers {
                    bdf,
                    members: blocking.join(", "),
                });
                continue;
            }
            if let Some(holder) = ledger.gpus.get(&bdf).and_then(|rec| rec.holder.as_ref()) {
                let ours = matches!(holder, Holder::Claim { uid: u, .. } if u == uid);
                if !ours {
                    errors.push(Refusal::HeldByOther {
                        bdf,
                        holder: holder.to_string(),
                    });
                    continue;
                }
            }
            if let Some(op) = &view.stuck {
                errors.push(Refusal::Stuck {
                    bdf,
                    op: op.clone(),
                });
                continue;
            }
            let config = claim_config.for_request(&r.request);
            if let Some(why) = iommufd_refusal(&config, iommufd_kernel) {
                errors.push(Refusal::IommufdRefused {
                    device: r.device.clone(),
                    bdf,
                    request: r.request.clone(),
                    why,
                });
                continue;
            }
            planned.push(Planned {
                config,
                bdf,
                view: (*view).clone(),
                result: r,
            });
        }
        if errors.is_empty() {
            Ok(planned)
        } else {
            Err(PrepareError::Refused(errors))
        }
    }

    /// Writes the claim's CDI spec and metadata; returns the prepared devices.
    fn write_files(
        &self,
        claim: &ClaimIdentity,
        planned: &[Planned],
        outcomes: &HashMap<Bdf, Outcome>,
    ) -> Result<Vec<PreparedDevice>, PrepareError> {
        let mut gpus = Vec::with_capacity(planned.len());
        for p in planned {
            let outcome = outcomes
                .get(&p.bdf)
                .ok_or_else(|| PrepareError::Files(format!("{}: no engine outcome", p.bdf)))?;
            gpus.push(CdiGpu {
                device_name: p.result.device.clone(),
                request: base_request(&p.result.request).to_string(),
                bdf: p.bdf.to_string(),
                iommu_group: outcome.iommu_group,
                vfio_devices: outcome.vfio_devices.clone(),
                config: p.config,
            });
        }
        self.cdi
            .write_claim(&claim.uid, &gpus)
            .map_err(|e| PrepareError::Files(e.to_string()))?;

        // Metadata is grouped by the full request reference (`main/sub` recorded in the
        // file), stored under the base request.
        let mut by_request: BTreeMap<&str, Vec<MetadataDevice>> = BTreeMap::new();
        for p in planned {
            by_request
                .entry(p.result.request.as_str())
                .or_default()
                .push(self.metadata_device(p));
        }
        let mut metadata_ids: HashMap<String, String> = HashMap::new();
        for (request_ref, devices) in &by_request {
            let id = self
                .metadata
                .write_request(claim, request_ref, devices)
                .map_err(|e| {
                    PrepareError::Files(format!("device metadata for request {request_ref:?}: {e}"))
                })?;
            metadata_ids.insert(base_request(request_ref).to_string(), id);
        }

        Ok(planned
            .iter()
            .map(|p| {
                let base = base_request(&p.result.request).to_string();
                let mut ids = vec![self.cdi.device_id(&claim.uid, &p.result.device)];
                ids.extend(metadata_ids.get(&base).cloned());
                PreparedDevice {
                    request_names: vec![base],
                    pool_name: p.result.pool.clone(),
                    device_name: p.result.device.clone(),
                    cdi_device_ids: ids,
                    share_id: p.result.share_id.clone(),
                }
            })
            .collect())
    }

    /// A device of the metadata file, with the attributes its ResourceSlice carries
    /// (from the view discovered before the move, as the scheduler saw it).
    fn metadata_device(&self, p: &Planned) -> MetadataDevice {
        MetadataDevice {
            driver: self.config.driver_name.clone(),
            pool: p.result.pool.clone(),
            name: p.result.device.clone(),
            attributes: DeviceInfo::from_view(&p.view)
                .map(|info| device_attributes(&info))
                .unwrap_or_default(),
        }
    }

    /// The engine's whole part of a prepare in one trip off the runtime: the
    /// NVLink check (a claim whose GPU set is not exactly one partition fails
    /// here, before any GPU moves), the moves, and, when every GPU is on vfio,
    /// the activation of the claim's partition (crate::fabric).
    async fn move_and_activate(
        &self,
        holder: &Holder,
        bdfs: &[Bdf],
    ) -> Result<MovesAndActivation, PrepareError> {
        let (h, b) = (holder.clone(), bdfs.to_vec());
        self.blocking("configuring GPUs", move |e| {
            let started = std::time::Instant::now();
            let plan = e.fabric_preflight(&h, &b)?;
            let checked = started.elapsed();
            let reqs: Vec<(Bdf, Holder)> = b.iter().map(|b| (*b, h.clone())).collect();
            // The partition's write-ahead record rides with the last move's commit.
            let ride = e.fabric_ride(&plan);
            let results = e.configure_many(&reqs);
            drop(ride);
            let moved = started.elapsed();
            let activation = results
                .iter()
                .all(Result::is_ok)
                .then(|| e.fabric_activate_planned(&h, &b, &plan));
            let laps = [
                ("fabric_check", checked),
                ("moves", moved - checked),
                ("activation", started.elapsed() - moved),
            ];
            Ok((results, activation, laps))
        })
        .await?
        .map_err(|e: EngineError| PrepareError::Fabric(e.to_string()))
    }

    /// After the claim's partition was activated: the activations whose `active`
    /// mark is still to be written; on failure releases the GPUs this call
    /// configured (`newly`) and says what could not be undone.
    async fn fabric_activated(
        &self,
        holder: &Holder,
        activated: Result<FabricOutcome, EngineError>,
        newly: &[Bdf],
    ) -> Result<Vec<UnmarkedActivation>, PrepareError> {
        match activated {
            Ok(o) => {
                tracing::info!(holder = %holder, partitions = ?o.partitions, action = ?o.action, detail = %o.detail, "NVLink partition");
                Ok(o.unmarked)
            }
            Err(e) => {
                let mut undo = self.undo_fabric(holder).await;
                undo.extend(self.release(newly, holder).await);
                Err(PrepareError::Fabric(e.to_string()).with_undo(undo))
            }
        }
    }

    /// Deactivates the claim's partition after a later step failed; returns what
    /// could not be undone.
    async fn undo_fabric(&self, holder: &Holder) -> Vec<String> {
        let h = holder.clone();
        match self
            .blocking("deactivating the NVLink partition", move |e| {
                e.fabric_deactivate(&h)
            })
            .await
        {
            Ok(Ok(_)) => Vec::new(),
            Ok(Err(e)) => vec![e.to_string()],
            Err(e) => vec![e.to_string()],
        }
    }

    /// Releases GPUs this call configured after a later step failed; returns what
    /// could not be undone.
    async fn release(&self, bdfs: &[Bdf], holder: &Holder) -> Vec<String> {
        if bdfs.is_empty() {
            return Vec::new();
        }
        let reqs: Vec<(Bdf, Option<Holder>)> =
            bdfs.iter().map(|b| (*b, Some(holder.clone()))).collect();
        let failed: Vec<String> = match self
            .blocking("releasing GPUs", move |e| e.unconfigure_many(&reqs))
            .await
        {
            Ok(results) => bdfs
                .iter()
                .zip(results)
                .filter_map(|(b, r)| {
                    self.config.metrics.record_move(Direction::Release, &r);
                    r.err().map(|e| GpuFailure::new(*b, &e).to_string())
                })
                .collect(),
            Err(e) => vec![e.to_string()],
        };
        self.config.metrics.record_undo(failed.is_empty());
        failed
    }

    /// Unprepares one claim from the ledger; an unknown UID is already unprepared.
    pub async fn unprepare_claim(&self, c: &ClaimRef) -> Result<(), PrepareError> {
        self.unprepare_inner(&c.uid)
            .await
            .map_err(|e| e.for_claim(c))
    }

    async fn unprepare_inner(&self, uid: &str) -> Result<(), PrepareError> {
        if !is_safe_uid(uid) {
            return Err(PrepareError::InvalidUid(uid.to_string()));
        }
        let _guard = self.lock_claim(uid).await;
        let _hold = self.hold_state().await?;
        self.release_claim_locked(uid).await
    }

    /// Releases the GPUs the ledger records for `uid`, then its CDI spec and metadata;
    /// the caller holds the claim's lock.
    async fn release_claim_locked(&self, uid: &str) -> Result<(), PrepareError> {
        // The claim's NVLink partition first (the id the ledger recorded), and
        // never while its GPUs are open: the kubelet retries.
        if let Some(h) = crate::fabric::claim_holder(&self.engine.ledger(), uid) {
            self.blocking("deactivating the NVLink partition", move |e| {
                e.fabric_deactivate(&h)
            })
            .await?
            .map_err(|e| PrepareError::Fabric(e.to_string()))?;
        }
        let held: Vec<(Bdf, Option<Holder>)> = self
            .engine
            .ledger()
            .gpus
            .iter()
            .filter_map(|(b, rec)| match &rec.holder {
                Some(h @ Holder::Claim { uid: u, .. }) if u == uid => Some((*b, Some(h.clone()))),
                _ => None,
            })
            .collect();
        if !held.is_empty() {
            let bdfs: Vec<Bdf> = held.iter().map(|(b, _)| *b).collect();
            let results = self
                .blocking("releasing GPUs", move |e| e.unconfigure_many(&held))
                .await?;
            let mut errors = Vec::new();
            for (b, r) in bdfs.iter().zip(results) {
                self.config.metrics.record_move(Direction::Release, &r);
                match r {
                    Ok(o) => {
                        tracing::info!(claim = %uid, gpu = %b, action = ?o.action, detail = %o.detail, "released")
                    }
                    Err(e) => errors.push(GpuFailure::new(*b, &e)),
                }
            }
            if !errors.is_empty() {
                // Keep the CDI spec: the GPU may still be in use; the kubelet retries.
                return Err(PrepareError::Gpus(errors));
            }
        }
        self.cdi
            .remove_claim(uid)
            .map_err(|e| PrepareError::Files(e.to_string()))?;
        self.metadata
            .remove_claim(uid)
            .map_err(|e| PrepareError::Files(e.to_string()))?;
        Ok(())
    }

    /// Claims holding GPUs according to the ledger.
    pub fn prepared_claims(&self) -> Vec<ClaimRef> {
        claims_in(&self.engine.ledger(), |_| true)
    }

    /// Claims whose prepare never completed: at least one of their ledger records
    /// is still in progress (not [`OpState::Configured`]), e.g. after a crash or a
    /// failed rollback mid-move.
    pub fn unfinished_claims(&self) -> Vec<ClaimRef> {
        let ledger = self.engine.ledger();
        let unfinished: Vec<&str> = ledger
            .gpus
            .values()
            .filter(|rec| rec.state != OpState::Configured)
            .filter_map(|rec| match &rec.holder {
                Some(Holder::Claim { uid, .. }) => Some(uid.as_str()),
                _ => None,
            })
            .collect();
        claims_in(&ledger, |uid| unfinished.contains(&uid))
    }

    /// Whether the claim object is gone or was replaced (new UID); `false` when the
    /// API server could not be asked.
    async fn claim_is_stale(&self, c: &ClaimRef) -> bool {
        match self.get_claim(c).await {
            Ok(None) => true,
            Ok(Some(obj)) => {
                let stale = obj.metadata.uid.as_deref() != Some(c.uid.as_str());
                if !stale {
                    // The pod may have changed, or a restart lost it: the
                    // gpu_owner label follows the claim.
                    self.config
                        .metrics
                        .set_claim_pod(&c.uid, &reserved_pod(&obj));
                }
                stale
            }
            Err(e) => {
                tracing::debug!(claim = %c.uid, error = %e, "cleanup: cannot check claim; keeping it");
                false
            }
        }
    }

    /// Whether no process holds the vfio nodes of any GPU the ledger gives `uid`;
    /// a failed or blocked holder scan counts as held.
    async fn claim_vfio_idle(&self, uid: &str) -> bool {
        let bdfs: Vec<Bdf> = self
            .engine
            .ledger()
            .gpus
            .iter()
            .filter(
                |(_, rec)| matches!(&rec.holder, Some(Holder::Claim { uid: u, .. }) if u == uid),
            )
            .map(|(b, _)| *b)
            .collect();
        let scans = self
            .blocking("scanning for vfio holders", move |e| {
                bdfs.iter()
                    .map(|b| e.vfio_holders(*b).map(|h| h.is_empty()))
                    .collect::<Vec<_>>()
            })
            .await;
        match scans {
            Ok(all) => all.into_iter().all(|r| r.unwrap_or(false)),
            Err(_) => false,
        }
    }

    /// Releases stale claims, in two kinds:
    ///
    /// - Claims whose prepare never completed ([`Self::unfinished_claims`]) and whose
    ///   ResourceClaim is gone or was replaced (new UID): at once.
    /// - Completed claims whose ResourceClaim is gone or was replaced and whose vfio
    ///   devices no process holds, on this scan and the one before: a prepare that
    ///   finished after the kubelet's unprepare leaves such a claim, and the kubelet
    ///   never unprepares it again. A claim object can vanish while its VM still
    ///   runs (a force-deleted pod), so the holder scan (fail closed) decides, twice.
    ///
    /// Claims the API server could not be asked about are left alone. Returns the
    /// claims acted on with their results.
    pub async fn cleanup_stale_claims(&self) -> Vec<(ClaimRef, Result<(), PrepareError>)> {
        let mut out = Vec::new();
        let unfinished = self.unfinished_claims();
        for c in &unfinished {
            if !self.claim_is_stale(c).await {
                continue;
            }
            let _guard = self.lock_claim(&c.uid).await;
            let _hold = match self.hold_state().await {
                Ok(h) => h,
                Err(e) => {
                    out.push((c.clone(), Err(e)));
                    continue;
                }
            };
            // A prepare that was running (here or in another instance) when we
            // looked may have completed since.
            if !self.unfinished_claims().iter().any(|u| u.uid == c.uid) {
                continue;
            }
            tracing::info!(claim = %c.uid, namespace = %c.namespace, name = %c.name, "cleanup: half-prepared claim is gone or replaced; releasing it");
            let r = self
                .release_claim_locked(&c.uid)
                .await
                .map_err(|e| e.for_claim(c));
            out.push((c.clone(), r));
        }

        let previous =
            std::mem::take(&mut *self.idle_orphans.lock().unwrap_or_else(|p| p.into_inner()));
        let mut idle_now = HashSet::new();
        let completed: Vec<ClaimRef> = self
            .prepared_claims()
            .into_iter()
            .filter(|c| !unfinished.iter().any(|u| u.uid == c.uid))
            .collect();
        for c in completed {
            if !self.claim_is_stale(&c).await {
                continue;
            }
            let _guard = self.lock_claim(&c.uid).await;
            let _hold = match self.hold_state().await {
                Ok(h) => h,
                Err(e) => {
                    out.push((c, Err(e)));
                    continue;
                }
            };
            // Under the locks: an unprepare may have released it meanwhile.
            if !self.prepared_claims().iter().any(|p| p.uid == c.uid)
                || !self.claim_vfio_idle(&c.uid).await
            {
                continue;
            }
            if !previous.contains(&c.uid) {
                tracing::info!(claim = %c.uid, namespace = %c.namespace, name = %c.name, "cleanup: prepared claim is gone or replaced and nothing holds its GPUs; releasing it if still so at the next cleanup");
                idle_now.insert(c.uid);
                continue;
            }
            tracing::warn!(claim = %c.uid, namespace = %c.namespace, name = %c.name, "cleanup: prepared claim is gone or replaced and nothing held its GPUs on two cleanups; releasing it");
            let r = self
                .release_claim_locked(&c.uid)
                .await
                .map_err(|e| e.for_claim(&c));
            out.push((c, r));
        }
        *self.idle_orphans.lock().unwrap_or_else(|p| p.into_inner()) = idle_now;
        out
    }
}

/// The pod a claim is reserved for (`status.reservedFor`), the `pod` label of
/// `gpu_owner`: its name when exactly one pod holds the reservation, empty
/// when none or several (one series per GPU, whatever the claim says).
pub fn reserved_pod(claim: &ResourceClaim) -> String {
    let mut pods = claim
        .status
        .iter()
        .flat_map(|s| s.reserved_for.iter().flatten())
        .filter(|r| r.api_group.as_deref().unwrap_or_default().is_empty() && r.resource == "pods");
    match (pods.next(), pods.next()) {
        (Some(pod), None) => pod.name.clone(),
        _ => String::new(),
    }
}

/// The claims holding records in `ledger` whose UID passes `keep`, once each.
fn claims_in(ledger: &LedgerBody, keep: impl Fn(&str) -> bool) -> Vec<ClaimRef> {
    let mut out: Vec<ClaimRef> = Vec::new();
    for rec in ledger.gpus.values() {
        if let Some(Holder::Claim {
            uid,
            namespace,
            name,
        }) = &rec.holder
            && keep(uid)
            && !out.iter().any(|c| &c.uid == uid)
        {
            out.push(ClaimRef {
                uid: uid.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
            });
        }
    }
    out
}

/// Why a device's configuration asks for an iommufd layout nobody can use: its
/// consumer cannot open it, or the kernel cannot provide it (`iommufd_kernel`).
fn iommufd_refusal(config: &VfioDeviceConfig, iommufd_kernel: Option<&str>) -> Option<String> {
    if config.iommu_backend != IommuBackend::Iommufd {
        return None;
    }
    if config.consumer == Some(Consumer::KubeVirt) {
        // KubeVirt ≤ 1.9 (pkg/virt-launcher/virtwrap/device/hostdevice/dra) builds an
        // unmanaged PCI hostdev that libvirt opens through /dev/vfio/<group>; its
        // iommufd mode takes the descriptor from KubeVirt's own device plugin.
        return Some(
            "the DeviceClass says the consumer is KubeVirt, whose DRA host devices open /dev/vfio/<group> (use iommuBackend \"legacy\")"
                .into(),
        );
    }
    iommufd_kernel.map(String::from)
}

/// The result of one claim's prepare or unprepare.
type ClaimResult<T> = Result<T, PrepareError>;
/// A claim's work running in the background, awaitable by every call that asks.
type Run<T> = Shared<futures::future::BoxFuture<'static, ClaimResult<T>>>;

/// Claim work still running, by claim UID. An entry leaves when its work ends, so a
/// later call starts afresh and finds the host state the work left (the engine's
/// operations are idempotent): no result is ever served stale.
struct Runs<T: Clone> {
    running: StdMutex<HashMap<String, (u64, Run<T>)>>,
    next_id: AtomicU64,
}

impl<T: Clone> Default for Runs<T> {
    fn default() -> Self {
        Self {
            running: StdMutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Runs<T> {
    /// The running work for `uid`, or `work` started in the background. `runs` is
    /// how the spawned task finds this map again to leave it.
    fn join_or_start<F, W>(&self, uid: &str, runs: F, work: W) -> Run<T>
    where
        F: FnOnce() -> Option<Arc<VfioPlugin>> + Send + 'static,
        W: Future<Output = ClaimResult<T>> + Send + 'static,
        VfioPlugin: HasRuns<T>,
    {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, run)) = running.get(uid) {
            return run.clone();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key = uid.to_string();
        // The map lock is held until the entry is in, so the task's removal comes after.
        let task = tokio::spawn(async move {
            let result = work.await;
            if let Some(plugin) = runs() {
                plugin.runs().finish(&key, id);
            }
            result
        });
        let run = async move {
            task.await
                .unwrap_or_else(|e| Err(PrepareError::ClaimTaskFailed(e.to_string())))
        }
        .boxed()
        .shared();
        running.insert(uid.to_string(), (id, run.clone()));
        run
    }

    fn is_empty(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn finish(&self, uid: &str, id: u64) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.get(uid).is_some_and(|(i, _)| *i == id) {
            running.remove(uid);
        }
    }
}

/// Which [`Runs`] map of the plugin holds work of result type `T`.
trait HasRuns<T: Clone> {
    fn runs(&self) -> &Runs<T>;
}

impl HasRuns<Vec<PreparedDevice>> for VfioPlugin {
    fn runs(&self) -> &Runs<Vec<PreparedDevice>> {
        &self.preparing
    }
}

impl HasRuns<()> for VfioPlugin {
    fn runs(&self) -> &Runs<()> {
        &self.unpreparing
    }
}

impl VfioPlugin {
    /// Runs `work` for claim `c` in the background (or joins the run already going)
    /// and waits for it until `deadline`; past it, answers `busy` so the kubelet
    /// retries while the work goes on.
    async fn within_budget<T, W>(
        &self,
        c: &ClaimRef,
        deadline: tokio::time::Instant,
        busy: &'static str,
        work: impl FnOnce(Arc<VfioPlugin>, ClaimRef) -> W,
    ) -> ClaimResult<T>
    where
        T: Clone + Send + Sync + 'static,
        W: Future<Output = ClaimResult<T>> + Send + 'static,
        VfioPlugin: HasRuns<T>,
    {
        let Some(me) = self.me.upgrade() else {
            return Err(PrepareError::ShuttingDown);
        };
        let weak = self.me.clone();
        let run = self
            .runs()
            .join_or_start(&c.uid, move || weak.upgrade(), work(me, c.clone()));
        match tokio::time::timeout_at(deadline, run).await {
            Ok(r) => r,
            Err(_) => Err(PrepareError::StillRunning {
                claim: c.clone(),
                work: busy,
            }),
        }
    }
}

impl VfioPlugin {
    /// Waits until no claim work runs in the background (work a call handed off
    /// when its budget ran out), at most `timeout`; true when none is left. For
    /// a clean stop: the ledger and host are consistent either way, but work
    /// cut short leaves the kubelet a retry.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.preparing.is_empty() && self.unpreparing.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Refuses a claim reference whose namespace or name is no Kubernetes name
/// (it comes from the kubelet's request: untrusted), before anything is read.
fn check_claim_names(c: &ClaimRef) -> Result<(), PrepareError> {
    if !is_safe_name(&c.namespace) || !is_safe_name(&c.name) {
        return Err(PrepareError::InvalidName {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
        });
    }
    Ok(())
}

/// Where a prepare's time went, for the `prepare phases` debug event: the
/// claim read from the API server, discovery and checks, the engine (its trip
/// off the async runtime, and within it the fabric check, the moves and the
/// activation), the CDI and metadata files.
struct PreparePhases {
    last: std::time::Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl PreparePhases {
    fn start() -> Self {
        PreparePhases {
            last: std::time::Instant::now(),
            laps: Vec::with_capacity(4),
        }
    }

    fn lap(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((phase, now - self.last));
        self.last = now;
    }

    fn log(&self, claim: &str, gpus: usize) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let laps: Vec<String> = self
                .laps
                .iter()
                .map(|(p, d)| format!("{p}={:.3}ms", d.as_secs_f64() * 1e3))
                .collect();
            tracing::debug!(claim = %claim, gpus, phases = %laps.join(" "), "prepare phases");
        }
    }
}

impl DraBackend for VfioPlugin {
    fn prepare(&self, claims: Vec<ClaimRef>) -> BoxFuture<'_, PrepareResults> {
        let deadline = tokio::time::Instant::now() + self.config.call_budget;
        Box::pin(async move {
            join_all(claims.iter().map(|c| async move {
                let started = std::time::Instant::now();
                let r = self
                    .within_budget(c, deadline, "preparation", |me, c| async move {
                        me.prepare_claim(&c).await
                    })
                    .await;
                self.config.metrics.observe_prepare(started.elapsed());
                self.config.metrics.devices_changed();
                match &r {
                    Ok(d) => tracing::info!(claim = %c.uid, devices = d.len(), "prepared"),
                    Err(e) => tracing::warn!(claim = %c.uid, error = %e, "prepare failed"),
                }
                // The one place a prepare error becomes the kubelet's text.
                (c.uid.clone(), r.map_err(|e| e.to_string()))
            }))
            .await
            .into_iter()
            .collect()
        })
    }

    fn unprepare(&self, claims: Vec<ClaimRef>) -> BoxFuture<'_, UnprepareResults> {
        let deadline = tokio::time::Instant::now() + self.config.call_budget;
        Box::pin(async move {
            join_all(claims.iter().map(|c| async move {
                let started = std::time::Instant::now();
                let r = self
                    .within_budget(c, deadline, "release", |me, c| async move {
                        me.unprepare_claim(&c).await
                    })
                    .await;
                self.config.metrics.observe_unprepare(started.elapsed());
                self.config.metrics.devices_changed();
                match &r {
                    Ok(()) => tracing::info!(claim = %c.uid, "unprepared"),
                    Err(e) => tracing::warn!(claim = %c.uid, error = %e, "unprepare failed"),
                }
                // The one place an unprepare error becomes the kubelet's text.
                (c.uid.clone(), r.map_err(|e| e.to_string()))
            }))
            .await
            .into_iter()
            .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_dns_labels_from_the_bdf() {
        let b: Bdf = "0000:ab:00.0".parse().unwrap();
        assert_eq!(device_name(&b), "gpu-0000-ab-00-0");
    }

    fn claim_reserved_for(consumers: serde_json::Value) -> ResourceClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "c", "namespace": "vms"},
            "spec": {},
            "status": {"reservedFor": consumers}
        }))
        .expect("claim")
    }

    /// The `pod` label of `gpu_owner` names one pod or none: never a list, never
    /// a non-pod consumer.
    #[test]
    fn the_reserved_pod_is_the_one_pod_consumer_or_none() {
        let pod = |name: &str| serde_json::json!({"resource": "pods", "name": name, "uid": name});
        let one = claim_reserved_for(serde_json::json!([pod("virt-launcher-vm-a-x7k2p")]));
        assert_eq!(reserved_pod(&one), "virt-launcher-vm-a-x7k2p");
        let two = claim_reserved_for(serde_json::json!([pod("a"), pod("b")]));
        assert_eq!(reserved_pod(&two), "", "shared: no single pod");
        let none = claim_reserved_for(serde_json::json!([]));
        assert_eq!(reserved_pod(&none), "");
        let group = claim_reserved_for(serde_json::json!([
            {"apiGroup": "scheduling.k8s.io", "resource": "podgroups", "name": "g", "uid": "g"}
        ]));
        assert_eq!(reserved_pod(&group), "", "not a pod");
        let mixed = claim_reserved_for(serde_json::json!([
            {"apiGroup": "scheduling.k8s.io", "resource": "podgroups", "name": "g", "uid": "g"},
            pod("p")
        ]));
        assert_eq!(reserved_pod(&mixed), "p");
        let no_status: ResourceClaim =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "c"}, "spec": {}}))
                .expect("claim");
        assert_eq!(reserved_pod(&no_status), "");
    }
}
