//! Publishing the node's GPUs as `resource.k8s.io/v1` ResourceSlices.
//!
//! One pool named after the node holds every GPU this driver may hand out,
//! split into slices of at most 128 devices. Device names derive from the PCI
//! address (`gpu-0000-65-00-0`), so they survive restarts and do not shift when
//! GPUs come and go (unlike index-based names).
//!
//! The sync follows the Go `kubeletplugin` helper's resourceslice controller:
//! owner reference to the Node, `generateName`, generation bumps only when more
//! than one write is needed, update in place where possible, delete obsolete
//! slices with uid + resourceVersion preconditions, and always at least one
//! slice. [`run_publisher`] re-syncs on every watch event for the node's slices
//! (the kubelet deletes them at start and when the plugin is unusable), on device
//! list changes and periodically, and never gives up on API errors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, DeviceCapacity, DeviceTaint, ResourcePool, ResourceSlice,
    ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vfio_gpu_engine::{Engine, GpuView};
use vfio_gpu_host::Bdf;

use crate::apiserver::missing_resource_v1_after;
use crate::health::{HealthFeed, HealthReport, UnhealthyReason};
use crate::metrics::Metrics;

/// At most this many devices per slice (API limit without taints or counters).
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// At most this many devices in a slice where any device carries a taint
/// (the API's `ResourceSliceMaxDevicesWithAdvancedFeatures`, 1.34 to 1.37).
pub const MAX_DEVICES_PER_SLICE_WITH_TAINTS: usize = 64;
/// The name of the quarantine taint in the driver's domain:
/// `<driver>/quarantined`, e.g. `vfio-gpu.dra.dev/quarantined`.
pub const TAINT_QUARANTINED: &str = "quarantined";
/// The name of the taint of a GPU the health scan finds unhealthy:
/// `<driver>/unhealthy`, e.g. `vfio-gpu.dra.dev/unhealthy=NotResponding`.
pub const TAINT_UNHEALTHY: &str = "unhealthy";
/// The API's limit on attributes + capacity entries per device.
pub const MAX_ATTRIBUTES_AND_CAPACITY: usize = 32;
/// The API's limit on a string attribute's length, in bytes.
pub const MAX_STRING_ATTRIBUTE: usize = 64;
/// Standard attribute: PCI address, `0000:65:00.0`.
pub const ATTR_PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";
/// Standard attribute: PCIe root complex, `pci0000:17`.
pub const ATTR_PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
/// Standard attribute (`k8s.io/dynamic-resource-allocation/deviceattribute` 1.37):
/// the device's NUMA node from sysfs, absent when the kernel reports none (-1).
pub const ATTR_NUMA_NODE: &str = "resource.kubernetes.io/numaNode";
/// Capacity: total size of the GPU's memory BARs.
pub const CAPACITY_ADDRESSABLE_MEMORY: &str = "addressableMemory";
/// Attribute (driver domain): total size in bytes of the GPU's 64-bit
/// prefetchable BARs, the part the guest's 64-bit MMIO window must hold.
pub const ATTR_BAR_PREFETCHABLE64: &str = "barPrefetchable64Bytes";

/// One GPU this node may hand out, as published in its ResourceSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// PCI address of the GPU function.
    pub bdf: Bdf,
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// Name from pci.ids, if known.
    pub product_name: Option<String>,
    /// The host driver the GPU belongs to: while this driver holds it (moving, on
    /// vfio, or moving back), the driver the ledger will restore; otherwise the bound
    /// one. Publishing the bound driver would rewrite the slice on every move and
    /// change what a selector on it means under an allocated claim (review N7).
    pub driver: Option<String>,
    /// IOMMU group; a GPU without one cannot be handed over VFIO.
    pub iommu_group: u32,
    /// NUMA node, if the kernel reports one.
    pub numa_node: Option<u32>,
    /// Root complex, `pci0000:17`.
    pub pcie_root: Option<String>,
    /// The administrator wants this GPU on vfio even when no VM uses it.
    pub keep_on_vfio: bool,
    /// Total size of the memory BARs in bytes; 0 when unknown.
    pub bar_bytes: u64,
    /// Total size of the 64-bit prefetchable BARs in bytes: what the guest's
    /// 64-bit MMIO window must hold for this GPU; 0 when unknown.
    pub bar_prefetchable64_bytes: u64,
    /// NVLink fabric facts (module id, partitions), when a Fabric Manager is
    /// configured ([`crate::fabric`]).
    pub fabric: Option<vfio_gpu_engine::GpuFabric>,
    /// Quarantined: published with a taint instead of hidden, where the API
    /// server keeps taints ([`SlicePublisher`] falls back to hiding it).
    pub quarantine: Option<QuarantineTaint>,
    /// Unhealthy by the health scan: published with a taint, gone once the
    /// scan finds it healthy again ([`UnhealthyTaints`]).
    pub unhealthy: Option<UnhealthyTaint>,
}

/// What an unhealthy GPU's device taint says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnhealthyTaint {
    /// The health scan's reason code, the taint's value.
    pub reason: UnhealthyReason,
    /// Since when (or since the effect last changed), seconds since the epoch:
    /// the taint's `timeAdded`, from which a `NoExecute` toleration's
    /// `tolerationSeconds` count.
    pub since_unix: u64,
    /// [`unhealthy_taint_effect`] of the policy and the GPU's state.
    pub effect: TaintEffect,
}

impl UnhealthyTaint {
    /// The device taint, keyed in `driver_name`'s domain.
    pub fn device_taint(&self, driver_name: &str) -> DeviceTaint {
        DeviceTaint {
            key: format!("{driver_name}/{TAINT_UNHEALTHY}"),
            value: Some(self.reason.as_str().to_string()),
            effect: self.effect.as_str().to_string(),
            time_added: time_added(self.since_unix),
        }
    }
}

fn time_added(since_unix: u64) -> Option<Time> {
    let since = i64::try_from(since_unix).unwrap_or(i64::MAX);
    k8s_openapi::jiff::Timestamp::from_second(since)
        .ok()
        .map(Time)
}

/// The effect of an unhealthy GPU's taint: `policy` (`serve
/// --unhealthy-taint-effect`) only for a fault that leaves a VM holding the GPU
/// with a device it cannot use (the GPU is `prepared` for a claim and the
/// reason [makes it unusable](UnhealthyReason::makes_gpu_unusable)); otherwise
/// `NoSchedule`, which keeps new claims off it and evicts nobody.
pub fn unhealthy_taint_effect(
    policy: TaintEffect,
    prepared: bool,
    reason: UnhealthyReason,
) -> TaintEffect {
    if prepared && reason.makes_gpu_unusable() {
        policy
    } else {
        TaintEffect::NoSchedule
    }
}

/// What a quarantined GPU's device taint says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantineTaint {
    /// Which step failed, the taint's value (a label value, so a code,
    /// not the reason's text).
    pub cause: vfio_gpu_engine::ledger::QuarantineCause,
    /// The full reason (for events, metrics and logs; not published).
    pub reason: String,
    /// Since when, seconds since the epoch: the taint's `timeAdded`.
    pub since_unix: u64,
    /// `NoSchedule` or `NoExecute`.
    pub effect: TaintEffect,
}

/// A device taint's effect (`resource.k8s.io/v1` `DeviceTaint.effect`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TaintEffect {
    /// New claims do not get the device without a toleration.
    #[default]
    NoSchedule,
    /// Also evicts the pods whose claims hold it.
    NoExecute,
}

impl std::str::FromStr for TaintEffect {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "NoSchedule" => Ok(TaintEffect::NoSchedule),
            "NoExecute" => Ok(TaintEffect::NoExecute),
            other => Err(format!(
                "unknown taint effect {other:?}: expected NoSchedule or NoExecute"
            )),
        }
    }
}

impl TaintEffect {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

impl QuarantineTaint {
    /// The taint for a ledger quarantine entry (a quarantine found after a
    /// release: nobody holds the GPU, so `NoSchedule` is all it needs).
    pub fn of(q: &vfio_gpu_engine::ledger::Quarantine) -> Self {
        QuarantineTaint {
            cause: q.cause,
            reason: q.reason.clone(),
            since_unix: q.since,
            effect: TaintEffect::NoSchedule,
        }
    }

    /// The device taint, keyed in `driver_name`'s domain.
    pub fn device_taint(&self, driver_name: &str) -> DeviceTaint {
        DeviceTaint {
            key: format!("{driver_name}/{TAINT_QUARANTINED}"),
            value: Some(self.cause.as_str().to_string()),
            effect: self.effect.as_str().to_string(),
            time_added: time_added(self.since_unix),
        }
    }
}

impl DeviceInfo {
    /// Whether it is published with a taint (quarantined or unhealthy).
    pub fn is_tainted(&self) -> bool {
        self.quarantine.is_some() || self.unhealthy.is_some()
    }

    /// The device as the engine sees it, whether or not it is offered; `None` only
    /// without an IOMMU group (such a GPU cannot be handed over VFIO at all).
    pub fn from_view(view: &GpuView) -> Option<Self> {
        let f = &view.gpu.function;
        Some(DeviceInfo {
            bdf: f.bdf,
            vendor: f.identity.vendor,
            device: f.identity.device,
            product_name: view.gpu.product_name.clone(),
            driver: host_driver(view),
            iommu_group: f.iommu_group?,
            numa_node: f.numa_node,
            pcie_root: f.pcie_root.clone(),
            keep_on_vfio: view.verdict.keep_on_vfio,
            bar_bytes: f.bar_bytes,
            bar_prefetchable64_bytes: f.bar_prefetchable64_bytes,
            fabric: view.fabric.clone(),
            quarantine: view.quarantine.as_ref().map(QuarantineTaint::of),
            unhealthy: None,
        })
    }
}

/// See [`DeviceInfo::driver`].
fn host_driver(view: &GpuView) -> Option<String> {
    use vfio_gpu_engine::ledger::OpState;
    let f = &view.gpu.function;
    let moved = view.record.as_ref().filter(|r| {
        matches!(
            r.state,
            OpState::Configuring | OpState::Configured | OpState::Releasing
        )
    });
    match moved.and_then(|r| r.functions.iter().find(|rf| rf.bdf == f.bdf)) {
        Some(rf) => rf.original_driver.as_ref().map(ToString::to_string),
        None => f.driver.as_ref().map(ToString::to_string),
    }
}

/// [`device_info`] without the stuck check: what a stuck GPU would publish
/// if it were not stuck.
fn device_info_even_if_stuck(view: &GpuView) -> Option<DeviceInfo> {
    // Not offered: what a prepare would refuse anyway (pinned, stuck, a
    // foreign device in the group, a host process holding it), so the
    // scheduler never hands a pod a GPU it cannot get.
    // An operation still in flight (a move or release a crash interrupted,
    // which reconcile will finish) is not offered until it settles. A move to
    // vfio for a claim stays published: that claim holds the device's allocation,
    // so nobody else can get it, and hiding it would rewrite the slice twice per
    // prepare (review N7).
    let unsettled = view.record.as_ref().is_some_and(|r| match r.state {
        vfio_gpu_engine::ledger::OpState::Configuring => {
            !matches!(r.holder, Some(vfio_gpu_engine::Holder::Claim { .. }))
        }
        vfio_gpu_engine::ledger::OpState::Releasing => true,
        _ => false,
    });
    // Between tenants: a GPU whose hand-over is still owed goes to nobody
    // (a quarantined one is published tainted, below).
    let not_handed_over = view.record.as_ref().is_some_and(|r| r.handover.is_some());
    if unsettled
        || not_handed_over
        || view.verdict.pinned.is_some()
        || !view.holders.is_empty()
        || view.gpu.blocking_members().next().is_some()
    {
        return None;
    }
    DeviceInfo::from_view(view)
}

/// The device to offer for an engine view, or `None` when the GPU must not be
/// offered: pinned by the admin, sharing its IOMMU group with a foreign device
/// or another GPU (it could not move alone), without an IOMMU group, with a
/// host write still stuck past its deadline, or with the last tenant's
/// hand-over (reset and verification) not finished. A quarantined GPU is
/// published with its taint ([`DeviceInfo::quarantine`]), so the scheduler
/// and the admin see why nobody gets it; a stuck one is published tainted by
/// [`UnhealthyTaints`] once the health scan reports it.
pub fn device_info(view: &GpuView) -> Option<DeviceInfo> {
    if view.stuck.is_some() {
        return None;
    }
    device_info_even_if_stuck(view)
}

/// The offerable devices among `views`, in BDF order (admin-owned GPUs offered).
pub fn device_infos(views: &[GpuView]) -> Vec<DeviceInfo> {
    device_infos_for(views, AdminOwned::Offer)
}

/// Whether GPUs the admin keeps on vfio are published (`serve
/// --hide-admin-owned-gpus`). Offered, they go to claims of the
/// `vfio-gpu-prebound.dra.dev` class; hidden, a GPU the admin keeps for a host
/// VM outside Kubernetes is never handed to a tenant at all (security review L3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdminOwned {
    /// Published like every other GPU (the default, as before).
    #[default]
    Offer,
    /// Not published.
    Hide,
}

/// A GPU on vfio that the plugin did not put there: found there (its record
/// says so, [`RecordKind::FoundOnVfio`](vfio_gpu_engine::state::RecordKind)),
/// or on vfio with no record of the plugin's at all.
pub fn is_admin_owned(view: &GpuView) -> bool {
    use vfio_gpu_engine::state::RecordKind;
    match &view.record {
        Some(r) => r.kind() == RecordKind::FoundOnVfio,
        None => view.gpu.function.on_vfio(),
    }
}

/// [`device_infos`] with admin-owned GPUs offered or hidden.
pub fn device_infos_for(views: &[GpuView], admin_owned: AdminOwned) -> Vec<DeviceInfo> {
    let mut out: Vec<DeviceInfo> = views
        .iter()
        .filter(|v| admin_owned == AdminOwned::Offer || !is_admin_owned(v))
        .filter_map(device_info)
        .collect();
    out.sort_by_key(|d| d.bdf);
    out
}

/// Whether a GPU is prepared for a claim: on vfio for a ResourceClaim, so a VM
/// may be using it.
fn prepared_for_claim(view: &GpuView) -> bool {
    view.record.as_ref().is_some_and(|r| {
        r.state == vfio_gpu_engine::ledger::OpState::Configured
            && matches!(r.holder, Some(vfio_gpu_engine::Holder::Claim { .. }))
    })
}

/// Merges the health scan's verdicts into the published device list: a GPU
/// the scan finds unhealthy is published with the `<driver>/unhealthy=<reason>`
/// taint instead of vanishing or staying untainted, and the taint goes once
/// the scan finds it healthy. Remembers what it needs between syncs: since
/// when each taint holds (its `timeAdded`, stable so the slice is not
/// rewritten every sync and `tolerationSeconds` count from the fault), and the
/// last published device of each GPU, so one that left the bus stays
/// published, tainted `Removed`, until it comes back.
#[derive(Debug, Default)]
pub struct UnhealthyTaints {
    /// Effect and since-time of each taint published now.
    since: BTreeMap<Bdf, (TaintEffect, u64)>,
    /// The last device published for each GPU (untainted) and whether it was
    /// prepared for a claim then.
    last: BTreeMap<Bdf, (DeviceInfo, bool)>,
}

impl UnhealthyTaints {
    /// The devices to publish for `views` (admin-owned GPUs offered or hidden
    /// by `admin_owned`) with the health `report`'s verdicts as taints of
    /// effect [`unhealthy_taint_effect`]`(policy, ..)`, at `now_unix`; BDF order.
    pub fn apply(
        &mut self,
        views: &[GpuView],
        admin_owned: AdminOwned,
        report: &HealthReport,
        policy: TaintEffect,
        now_unix: u64,
    ) -> Vec<DeviceInfo> {
        let unhealthy: BTreeMap<Bdf, UnhealthyReason> = report
            .devices
            .iter()
            .filter_map(|d| Some((d.bdf, d.reason?)))
            .collect();
        let present: BTreeSet<Bdf> = views.iter().map(|v| v.gpu.bdf()).collect();
        let mut out: Vec<(DeviceInfo, bool, Option<UnhealthyReason>)> = Vec::new();
        for v in views
            .iter()
            .filter(|v| admin_owned == AdminOwned::Offer || !is_admin_owned(v))
        {
            let bdf = v.gpu.bdf();
            let reason = unhealthy.get(&bdf).copied();
            // A stuck GPU is offered only tainted: never before the scan says why.
            let info = match (device_info(v), &v.stuck, reason) {
                (Some(info), _, _) => Some(info),
                (None, Some(_), Some(_)) => device_info_even_if_stuck(v),
                (None, _, _) => None,
            };
            let Some(info) = info else {
                // Not offered any more for another reason: not kept as Removed either.
                self.last.remove(&bdf);
                continue;
            };
            let prepared = prepared_for_claim(v);
            self.last.insert(bdf, (info.clone(), prepared));
            out.push((info, prepared, reason));
        }
        // Gone from the bus since it was published: still published, tainted.
        for (bdf, (info, prepared)) in &self.last {
            if !present.contains(bdf) {
                out.push((info.clone(), *prepared, Some(UnhealthyReason::Removed)));
            }
        }
        let mut since = BTreeMap::new();
        let mut devices: Vec<DeviceInfo> = out
            .into_iter()
            .map(|(mut info, prepared, reason)| {
                info.unhealthy = reason.map(|reason| {
                    let effect = unhealthy_taint_effect(policy, prepared, reason);
                    // timeAdded stays while the effect does; a new effect (a
                    // NoExecute from now on) starts its tolerationSeconds now.
                    let since_unix = match self.since.get(&info.bdf) {
                        Some((e, t)) if *e == effect => *t,
                        _ => now_unix,
                    };
                    since.insert(info.bdf, (effect, since_unix));
                    UnhealthyTaint {
                        reason,
                        since_unix,
                        effect,
                    }
                });
                info
            })
            .collect();
        self.since = since;
        devices.sort_by_key(|d| d.bdf);
        devices
    }
}

/// The device name of a GPU: `gpu-0000-65-00-0`. A DNS label that depends only
/// on the address, so claims keep naming the same GPU across restarts.
pub fn device_name(bdf: &Bdf) -> String {
    format!("gpu-{}", bdf.dashed())
}

/// What the publisher publishes and how often it re-syncs.
#[derive(Clone, Debug)]
pub struct SliceConfig {
    /// Driver name, `spec.driver`, e.g. `vfio-gpu.dra.dev`.
    pub driver_name: String,
    /// Node name: `spec.nodeName` and the pool name.
    pub node_name: String,
    /// Periodic re-sync interval, a safety net for missed events.
    pub resync: Duration,
    /// Delay after an event before syncing, so bursts cost one sync.
    pub debounce: Duration,
    /// Upper bound of the retry backoff after failed syncs.
    pub max_backoff: Duration,
    /// Where to record the GPUs other drivers publish (`serve`'s state
    /// directory, which `doctor` and `explain` read); `None` records nothing.
    pub other_drivers_record: Option<PathBuf>,
}

impl SliceConfig {
    /// Defaults: re-sync every 30 s, 1 s debounce, retries backing off to 30 s.
    pub fn new(driver_name: impl Into<String>, node_name: impl Into<String>) -> Self {
        Self {
            driver_name: driver_name.into(),
            node_name: node_name.into(),
            resync: Duration::from_secs(30),
            debounce: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            other_drivers_record: None,
        }
    }

    /// The field selector for this node's slices of this driver.
    pub fn field_selector(&self) -> String {
        format!(
            "spec.driver={},spec.nodeName={}",
            self.driver_name, self.node_name
        )
    }

    /// Whether `slice` is one this publisher may update or delete: this driver's,
    /// on this node.
    pub fn owns(&self, slice: &ResourceSlice) -> bool {
        slice.spec.driver == self.driver_name
            && slice.spec.node_name.as_deref() == Some(self.node_name.as_str())
    }

    /// `generateName` for new slices: `<node>-<driver>-`, made a valid name
    /// prefix. Every dot-separated label must start and end with an alphanumeric
    /// (the server validates the generated name as a DNS subdomain), so labels are
    /// trimmed of `-` and the cut, at 57 bytes so the server keeps the prefix whole
    /// and appends its 5 characters, never leaves a trailing `.` or `-`.
    pub fn generate_name(&self) -> String {
        let raw: String = format!("{}-{}", self.node_name, self.driver_name)
            .to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let labels: Vec<&str> = raw
            .split('.')
            .map(|l| l.trim_matches('-'))
            .filter(|l| !l.is_empty())
            .collect();
        // ASCII only by now, so any byte offset is a char boundary.
        let mut prefix = labels.join(".");
        prefix.truncate(57);
        let kept = prefix.trim_end_matches(['.', '-']).len();
        prefix.truncate(kept);
        if prefix.is_empty() {
            prefix.push_str("slice");
        }
        prefix.push('-');
        prefix
    }
}

fn string_attr(s: impl Into<String>) -> DeviceAttribute {
    DeviceAttribute {
        string: Some(s.into()),
        ..Default::default()
    }
}

fn int_attr(i: u32) -> DeviceAttribute {
    DeviceAttribute {
        int: Some(i64::from(i)),
        ..Default::default()
    }
}

fn bool_attr(b: bool) -> DeviceAttribute {
    DeviceAttribute {
        bool: Some(b),
        ..Default::default()
    }
}

/// Cuts `s` to at most `max` bytes (the API counts bytes) at a char boundary.
fn truncate_bytes(s: &str, max: usize) -> String {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s[..cut].to_string()
}

/// The attributes of one device. Unprefixed names live in the driver's domain
/// (`device.attributes["<driver>"].keepOnVfio` in CEL). Prepare writes the same
/// map into the KEP-5304 device metadata, so KubeVirt sees what the scheduler saw.
pub fn device_attributes(info: &DeviceInfo) -> BTreeMap<String, DeviceAttribute> {
    let mut attrs = BTreeMap::new();
    attrs.insert(
        ATTR_PCI_BUS_ID.to_string(),
        string_attr(info.bdf.to_string()),
    );
    // A truncated root would name another complex: leave an odd one out instead.
    if let Some(root) = info
        .pcie_root
        .as_ref()
        .filter(|r| r.len() <= MAX_STRING_ATTRIBUTE)
    {
        attrs.insert(ATTR_PCIE_ROOT.to_string(), string_attr(root.clone()));
    }
    if let Some(numa) = info.numa_node {
        attrs.insert(ATTR_NUMA_NODE.to_string(), int_attr(numa));
        // The driver-domain name published before the standard one existed; kept so
        // existing selectors (`device.attributes["<driver>"].numaNode`) still match.
        attrs.insert("numaNode".to_string(), int_attr(numa));
    }
    attrs.insert(
        "vendorID".to_string(),
        string_attr(format!("0x{:04x}", info.vendor)),
    );
    attrs.insert(
        "deviceID".to_string(),
        string_attr(format!("0x{:04x}", info.device)),
    );
    if let Some(name) = &info.product_name {
        attrs.insert(
            "productName".to_string(),
            string_attr(truncate_bytes(name, MAX_STRING_ATTRIBUTE)),
        );
    }
    attrs.insert("iommuGroup".to_string(), int_attr(info.iommu_group));
    if let Some(driver) = &info.driver {
        attrs.insert(
            "driver".to_string(),
            string_attr(truncate_bytes(driver, MAX_STRING_ATTRIBUTE)),
        );
    }
    attrs.insert("keepOnVfio".to_string(), bool_attr(info.keep_on_vfio));
    // What the guest firmware's 64-bit MMIO window must fit (kubevirt#11093:
    // a VM whose window is too small for its GPUs' BARs does not boot), so a
    // claim can select on it and KubeVirt reads it from the device metadata.
    if info.bar_prefetchable64_bytes > 0 {
        attrs.insert(
            ATTR_BAR_PREFETCHABLE64.to_string(),
            DeviceAttribute {
                int: Some(i64::try_from(info.bar_prefetchable64_bytes).unwrap_or(i64::MAX)),
                ..Default::default()
            },
        );
    }
    attrs.insert("type".to_string(), string_attr("vfio"));
    if let Some(f) = &info.fabric {
        crate::fabric::insert_attributes(f, &mut attrs);
    }
    attrs
}

/// A byte count as a Quantity in the form the API server writes back
/// (its canonical form), so comparing published and desired slices does not
/// see a difference where there is none and update forever.
pub fn bytes_quantity(bytes: u64) -> Quantity {
    const BINARY: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    const DECIMAL: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    // The server keeps a binary suffix only for values ≥ 1024 that are whole
    // multiples of 1024; everything else is written in decimal SI.
    let (base, suffixes) = if bytes >= 1024 && bytes.is_multiple_of(1024) {
        (1024, BINARY)
    } else {
        (1000, DECIMAL)
    };
    let (mut v, mut i) = (bytes, 0);
    while v != 0 && v.is_multiple_of(base) && i + 1 < suffixes.len() {
        v /= base;
        i += 1;
    }
    Quantity(format!("{v}{}", suffixes[i]))
}

/// Parses an integer Quantity with an optional SI or binary suffix; `None` for
/// anything else (fractions, exponents), which is then compared as text.
fn parse_quantity(q: &str) -> Option<u128> {
    let digits = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (num, suffix) = q.split_at(digits);
    let n: u128 = num.parse().ok()?;
    let mult: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// One device as published by driver `driver_name` (the quarantine taint's
/// domain).
pub fn device(driver_name: &str, info: &DeviceInfo) -> Device {
    let attributes = device_attributes(info);
    let mut capacity = BTreeMap::new();
    if info.bar_bytes > 0 {
        capacity.insert(
            CAPACITY_ADDRESSABLE_MEMORY.to_string(),
            DeviceCapacity {
                value: bytes_quantity(info.bar_bytes),
                ..Default::default()
            },
        );
    }
    debug_assert!(attributes.len() + capacity.len() <= MAX_ATTRIBUTES_AND_CAPACITY);
    Device {
        name: device_name(&info.bdf),
        attributes: (!attributes.is_empty()).then_some(attributes),
        capacity: (!capacity.is_empty()).then_some(capacity),
        taints: device_taints(driver_name, info),
        ..Default::default()
    }
}

/// The taints of a device: its quarantine and its ill health, `None` when neither.
fn device_taints(driver_name: &str, info: &DeviceInfo) -> Option<Vec<DeviceTaint>> {
    let taints: Vec<DeviceTaint> = info
        .quarantine
        .iter()
        .map(|q| q.device_taint(driver_name))
        .chain(info.unhealthy.iter().map(|u| u.device_taint(driver_name)))
        .collect();
    (!taints.is_empty()).then_some(taints)
}

/// Whether `d` carries any taint (its slice holds at most
/// [`MAX_DEVICES_PER_SLICE_WITH_TAINTS`] devices).
pub fn is_tainted(d: &Device) -> bool {
    d.taints.as_ref().is_some_and(|t| !t.is_empty())
}

/// The devices of each desired slice: BDF order, duplicates dropped (names
/// must be unique in the pool), filled in order up to [`MAX_DEVICES_PER_SLICE`]
/// per slice, or [`MAX_DEVICES_PER_SLICE_WITH_TAINTS`] once the slice holds a
/// tainted device, and always at least one (possibly empty) slice so the pool
/// stays visible.
fn device_chunks(driver_name: &str, devices: &[DeviceInfo]) -> Vec<Vec<Device>> {
    let mut sorted: Vec<&DeviceInfo> = devices.iter().collect();
    sorted.sort_by_key(|d| d.bdf);
    sorted.dedup_by_key(|d| d.bdf);
    let mut chunks: Vec<Vec<Device>> = Vec::new();
    let mut current: Vec<Device> = Vec::new();
    for d in sorted.into_iter().map(|i| device(driver_name, i)) {
        let tainted = is_tainted(&d) || current.iter().any(is_tainted);
        let limit = if tainted {
            MAX_DEVICES_PER_SLICE_WITH_TAINTS
        } else {
            MAX_DEVICES_PER_SLICE
        };
        if current.len() >= limit {
            chunks.push(std::mem::take(&mut current));
        }
        current.push(d);
    }
    if !current.is_empty() || chunks.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// The desired slice specs for `devices` at pool `generation` (pure; the
/// publisher picks the generation from what the server holds).
pub fn desired_slices(
    cfg: &SliceConfig,
    devices: &[DeviceInfo],
    generation: i64,
) -> Vec<ResourceSliceSpec> {
    let chunks = device_chunks(&cfg.driver_name, devices);
    let pool = pool(cfg, generation, chunks.len());
    chunks
        .into_iter()
        .map(|devices| slice_spec(cfg, pool.clone(), devices))
        .collect()
}

fn pool(cfg: &SliceConfig, generation: i64, count: usize) -> ResourcePool {
    ResourcePool {
        name: cfg.node_name.clone(),
        generation,
        resource_slice_count: i64::try_from(count).unwrap_or(i64::MAX),
    }
}

fn slice_spec(cfg: &SliceConfig, pool: ResourcePool, devices: Vec<Device>) -> ResourceSliceSpec {
    ResourceSliceSpec {
        driver: cfg.driver_name.clone(),
        node_name: Some(cfg.node_name.clone()),
        pool,
        devices: (!devices.is_empty()).then_some(devices),
        ..Default::default()
    }
}

/// A device with empty maps as absent and capacities canonicalised, because
/// the server omits empty fields and may rewrite quantities.
fn normalized(d: &Device) -> Device {
    let mut d = d.clone();
    if d.attributes.as_ref().is_some_and(BTreeMap::is_empty) {
        d.attributes = None;
    }
    if d.capacity.as_ref().is_some_and(BTreeMap::is_empty) {
        d.capacity = None;
    }
    for c in d.capacity.iter_mut().flat_map(BTreeMap::values_mut) {
        if let Some(n) = parse_quantity(&c.value.0).and_then(|n| u64::try_from(n).ok()) {
            c.value = bytes_quantity(n);
        }
    }
    d
}

fn same_devices(current: Option<&Vec<Device>>, desired: &[Device]) -> bool {
    let current = current.map(Vec::as_slice).unwrap_or_default();
    current.len() == desired.len()
        && current
            .iter()
            .zip(desired)
            .all(|(a, b)| normalized(a) == normalized(b))
}

/// Same set of device names: the helper's rule for "this slice is that slice".
fn same_names(current: &ResourceSlice, desired: &[Device]) -> bool {
    let current: Vec<&str> = current
        .spec
        .devices
        .iter()
        .flatten()
        .map(|d| d.name.as_str())
        .collect();
    let wanted: BTreeSet<&str> = desired.iter().map(|d| d.name.as_str()).collect();
    current.len() == desired.len() && current.iter().all(|n| wanted.contains(n))
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// The pool generation now published.
    pub generation: i64,
    /// Slices in that generation.
    pub slices: usize,
    /// Slices created.
    pub created: usize,
    /// Slices updated in place.
    pub updated: usize,
    /// Obsolete slices deleted (including ones already gone).
    pub deleted: usize,
    /// GPUs not offered because another driver's slice on this node
    /// publishes the same PCI address (NVIDIA's driver with passthrough).
    pub published_by_others: Vec<(String, String)>,
}

impl SyncOutcome {
    /// Whether the sync wrote anything.
    pub fn wrote(&self) -> bool {
        self.created + self.updated + self.deleted > 0
    }
}

/// Syncs the node's slices; keeps the Node's owner reference between syncs and
/// re-reads it whenever a sync creates slices.
pub struct SlicePublisher {
    client: kube::Client,
    cfg: SliceConfig,
    owner: Option<OwnerReference>,
    /// PCI addresses already reported as another driver's (logged once each).
    warned_foreign: std::collections::BTreeSet<String>,
    /// Whether the API server keeps device taints, once known.
    taints: TaintSupport,
    /// Quarantines already told to the Node as an Event.
    announcer: crate::node_events::QuarantineAnnouncer,
}

/// Whether the API server stores `Device.taints` (the `DRADeviceTaints` gate:
/// GA in 1.37, off by default before). A server with the gate off prunes the
/// field silently, which would publish a tainted GPU untainted, so
/// allocatable; where taints are not kept, quarantined and unhealthy GPUs are not offered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TaintSupport {
    /// Not probed yet (or the probe failed): quarantined and unhealthy GPUs are not offered.
    #[default]
    Unknown,
    /// A dry-run write kept the taint: quarantined and unhealthy GPUs are published tainted.
    Kept,
    /// The server dropped the taint: quarantined and unhealthy GPUs are not offered.
    Pruned,
}

/// Whether every taint of a device in `sent` is still on the same device in
/// `stored` (what the server returned for the write), so a server that pruned
/// the field is told apart from one that kept it.
pub fn taints_kept(sent: &ResourceSliceSpec, stored: &ResourceSliceSpec) -> bool {
    let stored: BTreeMap<&str, &Device> = stored
        .devices
        .iter()
        .flatten()
        .map(|d| (d.name.as_str(), d))
        .collect();
    sent.devices
        .iter()
        .flatten()
        .filter(|d| is_tainted(d))
        .all(|d| {
            stored
                .get(d.name.as_str())
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.len() == d.taints.as_ref().map_or(0, Vec::len))
        })
}

/// The devices to publish under `support`: all of them where taints are
/// kept, otherwise those without a taint, quarantined or unhealthy (the
/// fallback: not offered).
pub fn publishable(devices: &[DeviceInfo], support: TaintSupport) -> Vec<DeviceInfo> {
    devices
        .iter()
        .filter(|d| support == TaintSupport::Kept || !d.is_tainted())
        .cloned()
        .collect()
}

impl std::fmt::Debug for SlicePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlicePublisher")
            .field("cfg", &self.cfg)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl SlicePublisher {
    /// A publisher for `cfg`; talks to the API only in [`SlicePublisher::sync`].
    pub fn new(client: kube::Client, cfg: SliceConfig) -> Self {
        Self {
            client,
            cfg,
            owner: None,
            warned_foreign: Default::default(),
            taints: TaintSupport::Unknown,
            announcer: Default::default(),
        }
    }

    /// Whether the API server keeps device taints, as far as known.
    pub fn taint_support(&self) -> TaintSupport {
        self.taints
    }

    /// Learns whether the server keeps device taints, once, when there is a
    /// quarantined GPU to publish: a dry-run create of a slice holding it
    /// (validated, admitted and pruned as a real write, stored nowhere), read
    /// back. A failed probe publishes nothing tainted and is retried next sync.
    async fn probe_taints(
        &mut self,
        api: &Api<ResourceSlice>,
        owner: &OwnerReference,
        devices: &[DeviceInfo],
    ) {
        if self.taints != TaintSupport::Unknown {
            return;
        }
        let Some(tainted) = devices.iter().find(|d| d.is_tainted()) else {
            return;
        };
        let spec = slice_spec(
            &self.cfg,
            pool(&self.cfg, 1, 1),
            vec![device(&self.cfg.driver_name, tainted)],
        );
        let probe = ResourceSlice {
            metadata: ObjectMeta {
                generate_name: Some(self.cfg.generate_name()),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            spec: spec.clone(),
        };
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        match api.create(&pp, &probe).await {
            Ok(stored) if taints_kept(&spec, &stored.spec) => {
                tracing::info!(
                    "the API server keeps device taints: quarantined and unhealthy GPUs are published tainted"
                );
                self.taints = TaintSupport::Kept;
            }
            Ok(_) => self.taints_pruned(),
            Err(e) => tracing::warn!(
                error = %e,
                "probing whether the API server keeps device taints (dry-run create); quarantined and unhealthy GPUs are not offered until it answers"
            ),
        }
    }

    /// The server dropped a taint: from now on quarantined GPUs are not
    /// offered (logged once, with why).
    fn taints_pruned(&mut self) {
        if self.taints != TaintSupport::Pruned {
            tracing::warn!(
                "the API server drops ResourceSlice device taints (feature gate DRADeviceTaints off; GA in Kubernetes 1.37): quarantined and unhealthy GPUs are not offered at all instead of being published tainted"
            );
        }
        self.taints = TaintSupport::Pruned;
    }

    /// The configuration.
    pub fn config(&self) -> &SliceConfig {
        &self.cfg
    }

    /// The owner reference to this node, read from the Node when not cached or
    /// when `refresh`: a Node deleted and re-registered gets a new UID, and slices
    /// owned by the old one are garbage-collected.
    async fn owner(&mut self, refresh: bool) -> anyhow::Result<OwnerReference> {
        if !refresh && let Some(owner) = &self.owner {
            return Ok(owner.clone());
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes
            .get(&self.cfg.node_name)
            .await
            .with_context(|| format!("reading Node {}", self.cfg.node_name))?;
        let uid = node
            .metadata
            .uid
            .filter(|u| !u.is_empty())
            .with_context(|| format!("Node {} has no uid", self.cfg.node_name))?;
        let owner = OwnerReference {
            api_version: "v1".to_string(),
            kind: "Node".to_string(),
            name: self.cfg.node_name.clone(),
            uid,
            controller: Some(true),
            ..Default::default()
        };
        self.owner = Some(owner.clone());
        Ok(owner)
    }

    /// Only ever touch our own slices, whatever the server returned: a proxy or
    /// server that ignores the field selector, or a wrong kubeconfig, must not make
    /// us update or delete another driver's or node's slices (security review L5).
    fn only_ours(&self, listed: Vec<ResourceSlice>) -> Vec<ResourceSlice> {
        listed
            .into_iter()
            .filter(|s| {
                let ours = self.cfg.owns(s);
                if !ours {
                    tracing::warn!(
                        slice = s.metadata.name.as_deref().unwrap_or(""),
                        driver = %s.spec.driver,
                        node = s.spec.node_name.as_deref().unwrap_or(""),
                        "ignoring a listed ResourceSlice of another driver or node (field selector not applied?)"
                    );
                }
                ours
            })
            .collect()
    }

    /// PCI addresses (`…/pciBusID` attributes, any domain) that other
    /// drivers' slices on this node publish, with the driver. A list that
    /// fails hides nothing (logged): it must not stop this driver publishing.
    async fn published_by_other_drivers(
        &mut self,
        api: &Api<ResourceSlice>,
    ) -> BTreeMap<String, String> {
        let params = ListParams::default().fields(&format!("spec.nodeName={}", self.cfg.node_name));
        let listed = match api.list(&params).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::debug!(error = %e, "listing this node's ResourceSlices of other drivers");
                return BTreeMap::new();
            }
        };
        let mut found = BTreeMap::new();
        for s in listed.iter().filter(|s| {
            s.spec.driver != self.cfg.driver_name
                && s.spec.node_name.as_deref() == Some(self.cfg.node_name.as_str())
        }) {
            for d in s.spec.devices.iter().flatten() {
                for (key, value) in d.attributes.iter().flatten() {
                    let pci = key == "pciBusID" || key.ends_with("/pciBusID");
                    if let (true, Some(addr)) = (pci, value.string.as_deref()) {
                        found.insert(addr.to_ascii_lowercase(), s.spec.driver.clone());
                    }
                }
            }
        }
        for (addr, driver) in &found {
            if self.warned_foreign.insert(addr.clone()) {
                tracing::warn!(
                    pci = %addr,
                    other_driver = %driver,
                    "another driver publishes this GPU on this node: not offered here (give each GPU one driver; see docs/operating.md)"
                );
            }
        }
        found
    }

    /// Makes the server's slices for this node and driver match `devices`,
    /// with the Go helper's rules ([`plan_sync`]). Stops at the first API error
    /// (the next sync continues from whatever state the server then holds).
    pub async fn sync(&mut self, devices: &[DeviceInfo]) -> anyhow::Result<SyncOutcome> {
        let cached = self.owner.is_some();
        let mut owner = self.owner(false).await?;
        let api: Api<ResourceSlice> = Api::all(self.client.clone());
        let listed = match api
            .list(&ListParams::default().fields(&self.cfg.field_selector()))
            .await
        {
            Ok(list) => list.items,
            Err(e) => {
                if let Some(msg) = missing_resource_v1_after(&self.client, &e).await {
                    anyhow::bail!(msg);
                }
                return Err(e).context("listing ResourceSlices");
            }
        };
        let listed = self.only_ours(listed);
        // One GPU, one owner: a GPU another driver on this node publishes too
        // (NVIDIA's driver with PassthroughSupport, the GPU Operator's) is not
        // offered here, or two drivers could hand it to two pods.
        let foreign = self.published_by_other_drivers(&api).await;
        self.probe_taints(&api, &owner, devices).await;
        let quarantined: Vec<DeviceInfo> = devices
            .iter()
            .filter(|d| d.quarantine.is_some())
            .cloned()
            .collect();
        let devices = publishable(devices, self.taints);
        let plan = plan_sync(&self.cfg, listed, &devices, &foreign);
        let mut outcome = SyncOutcome {
            generation: plan.generation,
            slices: plan.slices,
            published_by_others: plan.published_by_others,
            ..Default::default()
        };
        // Slices to create (first sync, the kubelet's wipe, or the garbage collector
        // removing slices whose owner UID is stale): re-read the Node's UID first.
        if !plan.creates.is_empty() && cached {
            owner = self.owner(true).await?;
        }
        let pp = PostParams::default();
        for slice in plan.updates {
            let name = slice.metadata.name.clone().unwrap_or_default();
            // replace() carries the resourceVersion read above: a concurrent
            // change makes it fail with 409 and the next sync starts over.
            let stored = api
                .replace(&name, &pp, &slice)
                .await
                .with_context(|| format!("updating ResourceSlice {name}"))?;
            outcome.updated += 1;
            self.check_taints_kept(&slice.spec, &stored.spec)?;
        }
        for spec in plan.creates {
            let slice = ResourceSlice {
                metadata: ObjectMeta {
                    generate_name: Some(self.cfg.generate_name()),
                    owner_references: Some(vec![owner.clone()]),
                    ..Default::default()
                },
                spec,
            };
            let stored = api
                .create(&pp, &slice)
                .await
                .context("creating a ResourceSlice")?;
            outcome.created += 1;
            self.check_taints_kept(&slice.spec, &stored.spec)?;
        }
        // Delete last: until the new generation is complete, consumers keep
        // seeing the old one.
        for slice in plan.deletes {
            let name = slice.metadata.name.clone().unwrap_or_default();
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: slice.metadata.uid.clone(),
                    resource_version: slice.metadata.resource_version.clone(),
                }),
                ..Default::default()
            };
            match api.delete(&name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("deleting ResourceSlice {name}"));
                }
            }
            outcome.deleted += 1;
        }
        // Tainted or hidden, a quarantined GPU is told to the Node once.
        crate::node_events::announce_quarantines(
            &self.client,
            &self.cfg.driver_name,
            &owner,
            &mut self.announcer,
            &quarantined,
        )
        .await;
        Ok(outcome)
    }
}

impl SlicePublisher {
    /// After a write: a server that stopped keeping taints since the probe
    /// (a downgrade, a gate turned off) just published a quarantined GPU
    /// untainted. Fails the sync, so the retry publishes without it at once.
    fn check_taints_kept(
        &mut self,
        sent: &ResourceSliceSpec,
        stored: &ResourceSliceSpec,
    ) -> anyhow::Result<()> {
        if taints_kept(sent, stored) {
            return Ok(());
        }
        self.taints_pruned();
        anyhow::bail!(
            "the API server dropped the device taints of a written ResourceSlice; publishing again without the quarantined and unhealthy GPUs"
        )
    }
}

/// What one sync writes, in order: updates, then creates, then deletes (see
/// [`plan_sync`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyncPlan {
    /// The pool generation the slices end up in.
    pub generation: i64,
    /// Slices in that generation.
    pub slices: usize,
    /// Listed slices to replace in place, each with its new spec (metadata as
    /// listed, so the replace carries the read resourceVersion).
    pub updates: Vec<ResourceSlice>,
    /// Specs of slices to create.
    pub creates: Vec<ResourceSliceSpec>,
    /// Listed slices to delete, last.
    pub deletes: Vec<ResourceSlice>,
    /// Devices not offered because another driver publishes them: (PCI address, driver).
    pub published_by_others: Vec<(String, String)>,
}

/// The writes that make the listed slices match `devices` (pure), with the Go
/// helper's rules: slices of another pool or an older generation are obsolete; a
/// lone slice is updated in place, others are paired with the desired ones by
/// their device names; one update is atomic for consumers, anything more needs a
/// new generation. `foreign` maps PCI addresses another driver on this node
/// publishes to that driver: those GPUs are not offered. Listed slices this
/// publisher does not own ([`SliceConfig::owns`]) are never touched, whatever the
/// list returned (security review L5).
pub fn plan_sync(
    cfg: &SliceConfig,
    listed: Vec<ResourceSlice>,
    devices: &[DeviceInfo],
    foreign: &BTreeMap<String, String>,
) -> SyncPlan {
    let listed = listed.into_iter().filter(|s| cfg.owns(s));
    let offered: Vec<DeviceInfo> = devices
        .iter()
        .filter(|d| !foreign.contains_key(&d.bdf.to_string()))
        .cloned()
        .collect();
    let desired = device_chunks(&cfg.driver_name, &offered);
    let pool_name = cfg.node_name.as_str();

    // Slices of another pool (e.g. from an older naming) are obsolete.
    let (mine, mut obsolete): (Vec<_>, Vec<_>) =
        listed.partition(|s| s.spec.pool.name == pool_name);
    let highest = mine
        .iter()
        .map(|s| s.spec.pool.generation)
        .max()
        .unwrap_or(0);
    let (current, older): (Vec<_>, Vec<_>) = mine
        .into_iter()
        .partition(|s| s.spec.pool.generation == highest);
    obsolete.extend(older);

    // Pair existing slices with desired ones. A lone slice is always
    // updated in place; otherwise slices match by their device names.
    let mut matched: Vec<Option<ResourceSlice>> = vec![None; desired.len()];
    if current.len() == 1 && desired.len() == 1 {
        matched[0] = current.into_iter().next();
    } else {
        for slice in current {
            match (0..desired.len())
                .find(|&i| matched[i].is_none() && same_names(&slice, &desired[i]))
            {
                Some(i) => matched[i] = Some(slice),
                None => obsolete.push(slice),
            }
        }
    }

    let count = desired.len();
    let new_slices = matched.iter().filter(|m| m.is_none()).count();
    let wanted_pool = pool(cfg, highest, count);
    let changed: BTreeSet<usize> = matched
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.as_ref().map(|s| (i, s)))
        .filter(|(i, s)| {
            s.spec.pool != wanted_pool
                || s.spec.node_selector.is_some()
                || s.spec.all_nodes == Some(true)
                || s.spec.per_device_node_selection == Some(true)
                || s.spec
                    .shared_counters
                    .as_ref()
                    .is_some_and(|c| !c.is_empty())
                || !same_devices(s.spec.devices.as_ref(), &desired[*i])
        })
        .map(|(i, _)| i)
        .collect();

    // One update is atomic for consumers; anything more needs a new generation.
    // The generation comes from the server: never overflow on a hostile value.
    let mut generation = if new_slices == 0 && changed.len() <= 1 {
        highest
    } else {
        highest.saturating_add(1)
    };
    generation = generation.max(1);
    let bumped = generation != highest;
    let final_pool = pool(cfg, generation, count);

    let mut plan = SyncPlan {
        generation,
        slices: count,
        published_by_others: devices
            .iter()
            .filter_map(|d| {
                let b = d.bdf.to_string();
                foreign.get(&b).map(|drv| (b, drv.clone()))
            })
            .collect(),
        ..Default::default()
    };
    for (i, (slot, devices)) in matched.into_iter().zip(desired).enumerate() {
        match slot {
            Some(mut slice) => {
                if bumped || changed.contains(&i) {
                    slice.spec = slice_spec(cfg, final_pool.clone(), devices);
                    plan.updates.push(slice);
                }
            }
            None => plan
                .creates
                .push(slice_spec(cfg, final_pool.clone(), devices)),
        }
    }
    plan.deletes = obsolete;
    plan
}

/// One sync of the node's slices against `devices` (see [`SlicePublisher::sync`]);
/// reads the Node every time, so prefer a [`SlicePublisher`] in loops.
pub async fn publish_once(
    client: &kube::Client,
    cfg: &SliceConfig,
    devices: &[DeviceInfo],
) -> anyhow::Result<SyncOutcome> {
    SlicePublisher::new(client.clone(), cfg.clone())
        .sync(devices)
        .await
}

/// Publishes `devices` until `shutdown` fires, then returns `Ok(())`.
///
/// Syncs at start, `cfg.debounce` after any watch event on the node's slices
/// (so slices the kubelet deleted come back) or change of `devices`, and every
/// `cfg.resync`. API errors are logged and retried with exponential backoff up
/// to `cfg.max_backoff`; this function does not fail on them. If the sender of
/// `devices` goes away, the last list keeps being published.
pub async fn run_publisher(
    client: kube::Client,
    cfg: SliceConfig,
    devices: watch::Receiver<Vec<DeviceInfo>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_publisher_observed(client, cfg, devices, shutdown, None).await
}

/// [`run_publisher`] that marks `metrics` once a sync succeeded (for `/readyz`).
pub async fn run_publisher_observed(
    client: kube::Client,
    cfg: SliceConfig,
    mut devices: watch::Receiver<Vec<DeviceInfo>>,
    shutdown: CancellationToken,
    metrics: Option<Arc<Metrics>>,
) -> anyhow::Result<()> {
    let api: Api<ResourceSlice> = Api::all(client.clone());
    let watch_cfg = watcher::Config::default().fields(&cfg.field_selector());
    let new_watch = || watcher(api.clone(), watch_cfg.clone()).default_backoff();
    let mut events: std::pin::Pin<Box<dyn Stream<Item = _> + Send>> = Box::pin(new_watch());
    let mut devices_open = true;
    let mut publisher = SlicePublisher::new(client, cfg.clone());
    // What the record in the state directory says, so it is written on change only.
    let mut recorded: Option<BTreeMap<String, String>> = None;

    let mut due: Option<Instant> = Some(Instant::now());
    let mut periodic = Instant::now() + cfg.resync;
    let mut failures: u32 = 0;
    // Never later than already planned: a failing sync's backoff is cut short
    // by a new event, which the watch only delivers when the server is back.
    let schedule = |due: &mut Option<Instant>, at: Instant| {
        *due = Some(due.map_or(at, |d| d.min(at)));
    };

    loop {
        let sleep_due = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let device_change = async {
            if devices_open {
                devices.changed().await.is_ok()
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            event = events.next() => match event {
                Some(Ok(_)) => schedule(&mut due, Instant::now() + cfg.debounce),
                Some(Err(e)) => tracing::warn!(error = %e, "watching ResourceSlices"),
                None => {
                    // The watcher does not end on its own; restart it if it does.
                    events = Box::pin(new_watch());
                    schedule(&mut due, Instant::now() + cfg.debounce);
                }
            },
            open = device_change => {
                if open {
                    schedule(&mut due, Instant::now() + cfg.debounce);
                } else {
                    tracing::info!("device list sender gone; publishing the last list");
                    devices_open = false;
                }
            },
            _ = tokio::time::sleep_until(periodic) => {
                periodic = Instant::now() + cfg.resync;
                schedule(&mut due, Instant::now());
            },
            _ = sleep_due => {
                let list = devices.borrow_and_update().clone();
                let result = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = publisher.sync(&list) => r,
                };
                match result {
                    Ok(outcome) => {
                        if let Some(m) = &metrics {
                            m.set_slices_published();
                        }
                        failures = 0;
                        due = None;
                        periodic = Instant::now() + cfg.resync;
                        record_other_drivers(&cfg, &outcome, &mut recorded);
                        if outcome.wrote() {
                            tracing::info!(?outcome, devices = list.len(), "published ResourceSlices");
                        } else {
                            tracing::debug!(?outcome, "ResourceSlices up to date");
                        }
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let delay = backoff(cfg.debounce, cfg.max_backoff, failures);
                        tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, "publishing ResourceSlices failed");
                        due = Some(Instant::now() + delay);
                    }
                }
            },
        }
    }
}

/// Writes the GPUs other drivers publish (`outcome`) to the record in the
/// state directory when they differ from what it holds (`recorded`), for
/// `doctor` and `explain`. A failed write is logged and retried at the next sync.
fn record_other_drivers(
    cfg: &SliceConfig,
    outcome: &SyncOutcome,
    recorded: &mut Option<BTreeMap<String, String>>,
) {
    let Some(dir) = &cfg.other_drivers_record else {
        return;
    };
    let gpus: BTreeMap<String, String> = outcome.published_by_others.iter().cloned().collect();
    if recorded.as_ref() == Some(&gpus) {
        return;
    }
    let record = vfio_gpu_node::OtherDrivers {
        observed_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        gpus,
    };
    match record.write(dir) {
        Ok(()) => *recorded = Some(record.gpus),
        Err(e) => {
            tracing::warn!(error = %e, "recording the GPUs other drivers publish (for doctor and explain)")
        }
    }
}

/// `base · 2^(failures-1)`, at least 100 ms, at most `max`.
fn backoff(base: Duration, max: Duration, failures: u32) -> Duration {
    let base = base.max(Duration::from_millis(100));
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(max.max(base))
}

/// A device list fed from `engine`: discovered once before returning, then
/// again after each ledger write of this engine (within 200 ms) and every
/// `interval`, until `shutdown`. Discovery errors keep the last list.
pub async fn watch_engine_devices(
    engine: Arc<Engine>,
    interval: Duration,
    admin_owned: AdminOwned,
    shutdown: CancellationToken,
) -> watch::Receiver<Vec<DeviceInfo>> {
    watch_engine_devices_with_health(engine, interval, admin_owned, None, shutdown).await
}

/// How the published devices follow the health scan (`serve`).
#[derive(Clone, Debug)]
pub struct HealthTaints {
    /// The health scan's reports.
    pub feed: HealthFeed,
    /// The effect of an unhealthy GPU's taint when the fault leaves a VM with
    /// a device it cannot use (`serve --unhealthy-taint-effect`).
    pub policy: TaintEffect,
}

/// [`watch_engine_devices`] that, with `health`, taints the GPUs the health
/// scan finds unhealthy ([`UnhealthyTaints`]) and re-discovers whenever a
/// scan changes the report.
pub async fn watch_engine_devices_with_health(
    engine: Arc<Engine>,
    interval: Duration,
    admin_owned: AdminOwned,
    health: Option<HealthTaints>,
    shutdown: CancellationToken,
) -> watch::Receiver<Vec<DeviceInfo>> {
    async fn discover(
        engine: &Arc<Engine>,
        admin_owned: AdminOwned,
        health: Option<&HealthTaints>,
        taints: &mut UnhealthyTaints,
    ) -> Option<Vec<DeviceInfo>> {
        let engine = engine.clone();
        match tokio::task::spawn_blocking(move || engine.discover()).await {
            Ok(Ok((views, _problems))) => Some(match health {
                Some(h) => {
                    taints.apply(&views, admin_owned, &h.feed.current(), h.policy, unix_now())
                }
                None => device_infos_for(&views, admin_owned),
            }),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "discovering GPUs for ResourceSlices");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "GPU discovery task failed");
                None
            }
        }
    }
    // A list taken mid-release hides the GPU being released: re-discover as
    // soon as this engine writes its ledger again (checked every
    // `LEDGER_POLL`), not only every `interval` (which covers other processes).
    const LEDGER_POLL: Duration = Duration::from_millis(200);
    let mut seen_writes = engine.ledger_writes();
    let mut taints = UnhealthyTaints::default();
    let first = discover(&engine, admin_owned, health.as_ref(), &mut taints).await;
    let (tx, rx) = watch::channel(first.unwrap_or_default());
    let mut health_changes = health.as_ref().map(|h| h.feed.clone());
    tokio::spawn(async move {
        loop {
            let due = tokio::time::Instant::now() + interval;
            loop {
                let now = tokio::time::Instant::now();
                let health_changed = async {
                    match health_changes.as_mut() {
                        Some(feed) => {
                            if feed.changed().await.is_err() {
                                // The monitor stopped: keep the last report.
                                std::future::pending::<()>().await;
                            }
                            true
                        }
                        None => std::future::pending().await,
                    }
                };
                let mut wake = false;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(LEDGER_POLL.min(due.saturating_duration_since(now))) => {}
                    changed = health_changed => wake = changed,
                }
                if wake
                    || engine.ledger_writes() != seen_writes
                    || tokio::time::Instant::now() >= due
                {
                    break;
                }
            }
            seen_writes = engine.ledger_writes();
            if let Some(list) = discover(&engine, admin_owned, health.as_ref(), &mut taints).await {
                tx.send_if_modified(|cur| {
                    let changed = *cur != list;
                    if changed {
                        *cur = list;
                    }
                    changed
                });
            }
        }
    });
    rx
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the ResourceSlice publisher runs with (the options of [`start_publisher`]).
pub struct PublisherContext {
    /// Kubernetes client.
    pub client: kube::Client,
    /// Node name (and pool name).
    pub node_name: String,
    /// Driver name.
    pub driver_name: String,
    /// The engine, the source of the node's GPUs.
    pub engine: Arc<Engine>,
    /// Cancelled when the plugin stops.
    pub shutdown: CancellationToken,
    /// Told when a sync succeeded (readiness).
    pub metrics: Option<Arc<Metrics>>,
    /// The state directory that receives the record of GPUs other drivers publish.
    pub record_dir: Option<PathBuf>,
    /// Whether GPUs the admin keeps on vfio are published.
    pub admin_owned: AdminOwned,
    /// The health scan whose unhealthy GPUs are published tainted; `None`:
    /// no unhealthy taints.
    pub health: Option<HealthTaints>,
}

/// Starts the publisher for `serve`: default [`SliceConfig`], devices re-discovered
/// from the engine after each of its ledger writes, and every 10 s.
pub fn start_publisher(ctx: PublisherContext) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let mut cfg = SliceConfig::new(ctx.driver_name, ctx.node_name);
        cfg.other_drivers_record = ctx.record_dir;
        let devices = watch_engine_devices_with_health(
            ctx.engine,
            Duration::from_secs(10),
            ctx.admin_owned,
            ctx.health,
            ctx.shutdown.clone(),
        )
        .await;
        run_publisher_observed(ctx.client, cfg, devices, ctx.shutdown, ctx.metrics).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(bdf: &str) -> DeviceInfo {
        DeviceInfo {
            bdf: bdf.parse().unwrap(),
            vendor: 0x10de,
            device: 0x2330,
            product_name: Some("x".repeat(100)),
            driver: Some("vfio-pci".into()),
            iommu_group: 7,
            numa_node: Some(1),
            pcie_root: Some("pci0000:17".into()),
            keep_on_vfio: true,
            bar_bytes: (128 << 30) + (48 << 20),
            bar_prefetchable64_bytes: (128 << 30) + (32 << 20),
            fabric: None,
            quarantine: None,
            unhealthy: None,
        }
    }

    #[test]
    fn quantities_are_canonical() {
        for (bytes, want) in [
            (0, "0"),
            (512, "512"),
            (1000, "1k"),
            (1024, "1Ki"),
            (1536, "1536"),
            (5000, "5k"),
            (137_489_285_120, "131120Mi"),
            (128 << 30, "128Gi"),
        ] {
            assert_eq!(bytes_quantity(bytes).0, want, "{bytes}");
            assert_eq!(parse_quantity(want), Some(u128::from(bytes)));
        }
        assert_eq!(parse_quantity("1.5Gi"), None);
    }

    #[test]
    fn device_attributes_and_name() {
        let d = device("vfio-gpu.dra.dev", &info("0000:65:00.0"));
        assert_eq!(d.name, "gpu-0000-65-00-0");
        let a = d.attributes.unwrap();
        assert_eq!(a[ATTR_PCI_BUS_ID].string.as_deref(), Some("0000:65:00.0"));
        assert_eq!(a["productName"].string.as_ref().unwrap().len(), 64);
        assert_eq!(a["vendorID"].string.as_deref(), Some("0x10de"));
        assert_eq!(a["iommuGroup"].int, Some(7));
        assert_eq!(a["keepOnVfio"].bool, Some(true));
        assert_eq!(
            a[ATTR_BAR_PREFETCHABLE64].int,
            Some((128 << 30) + (32 << 20))
        );
        let mut no_bars = info("0000:65:00.0");
        no_bars.bar_prefetchable64_bytes = 0;
        assert!(!device_attributes(&no_bars).contains_key(ATTR_BAR_PREFETCHABLE64));
        let c = d.capacity.unwrap();
        assert_eq!(c[CAPACITY_ADDRESSABLE_MEMORY].value.0, "131120Mi");
    }

    #[test]
    fn string_attributes_fit_the_byte_limit_at_a_char_boundary() {
        let mut i = info("0000:65:00.0");
        // 3-byte characters (U+FFFD from a lossy pci.ids read, ™, —) and 2-byte ones.
        let product = "GeForce\u{2122} RTX \u{2014} \u{fffd}\u{fffd} \u{e9}\u{fc}".repeat(4);
        i.product_name = Some(product.clone());
        i.driver = Some("\u{fc}".repeat(40));
        let a = device_attributes(&i);
        let name = a["productName"].string.clone().unwrap();
        assert!(name.len() <= MAX_STRING_ATTRIBUTE, "{} bytes", name.len());
        assert!(name.len() > MAX_STRING_ATTRIBUTE - 4, "uses the budget");
        assert!(product.starts_with(&name));
        let driver = a["driver"].string.clone().unwrap();
        assert_eq!(driver, "\u{fc}".repeat(32));
    }

    #[test]
    fn generate_name_is_a_valid_prefix() {
        let cfg = SliceConfig::new("vfio-gpu.dra.dev", "Node_1");
        assert_eq!(cfg.generate_name(), "node-1-vfio-gpu.dra.dev-");
        let long = SliceConfig::new("d.io", "n".repeat(300));
        assert_eq!(long.generate_name().len(), 58);
    }

    #[test]
    fn server_rewrites_are_not_changes() {
        let d = device("vfio-gpu.dra.dev", &info("0000:65:00.0"));
        let mut echoed = d.clone();
        for c in echoed.capacity.iter_mut().flat_map(BTreeMap::values_mut) {
            c.value = Quantity("137489285120".into());
        }
        assert!(same_devices(Some(&vec![echoed]), &[d]));
    }

    fn quarantined(bdf: &str) -> DeviceInfo {
        DeviceInfo {
            quarantine: Some(QuarantineTaint {
                cause: vfio_gpu_engine::ledger::QuarantineCause::ResetFailed,
                reason: "reset of 0000:65:00.0 failed: EIO".into(),
                since_unix: 1_700_000_000,
                effect: TaintEffect::NoSchedule,
            }),
            ..info(bdf)
        }
    }

    #[test]
    fn a_quarantined_device_carries_one_taint_in_the_driver_domain() {
        let d = device("gpu.example.com", &quarantined("0000:65:00.0"));
        let taints = d.taints.expect("tainted");
        assert_eq!(taints.len(), 1);
        let t = &taints[0];
        assert_eq!(t.key, "gpu.example.com/quarantined");
        assert_eq!(t.value.as_deref(), Some("ResetFailed"));
        assert_eq!(t.effect, "NoSchedule");
        assert_eq!(
            t.time_added.as_ref().map(|t| t.0.as_second()),
            Some(1_700_000_000)
        );
        assert!(device("d", &info("0000:65:00.0")).taints.is_none());
    }

    /// The API refuses a slice over 64 devices where any is tainted: every
    /// chunk obeys its limit, whatever the mix, and chunks are filled in order.
    #[test]
    fn slices_holding_a_tainted_device_hold_at_most_64() {
        for (n, tainted_every) in [(130, 1), (130, 50), (200, 199), (128, 1000), (65, 64)] {
            let devices: Vec<DeviceInfo> = (0..n)
                .map(|i| {
                    let bdf = format!("0000:{:02x}:{:02x}.0", i / 32, i % 32);
                    if i % tainted_every == 0 && tainted_every < 1000 {
                        quarantined(&bdf)
                    } else {
                        info(&bdf)
                    }
                })
                .collect();
            let chunks = device_chunks("d", &devices);
            let total: usize = chunks.iter().map(Vec::len).sum();
            assert_eq!(total, n, "every device once");
            for c in &chunks {
                let limit = if c.iter().any(is_tainted) {
                    MAX_DEVICES_PER_SLICE_WITH_TAINTS
                } else {
                    MAX_DEVICES_PER_SLICE
                };
                assert!(c.len() <= limit, "{} devices, limit {limit}", c.len());
            }
        }
        // 128 untainted still fit one slice.
        let plain: Vec<DeviceInfo> = (0..128)
            .map(|i| info(&format!("0000:{:02x}:{:02x}.0", i / 32, i % 32)))
            .collect();
        assert_eq!(device_chunks("d", &plain).len(), 1);
    }

    #[test]
    fn taints_kept_tells_a_pruning_server_apart() {
        let cfg = SliceConfig::new("d", "n");
        let sent = desired_slices(
            &cfg,
            &[quarantined("0000:65:00.0"), info("0000:66:00.0")],
            1,
        )
        .remove(0);
        assert!(taints_kept(&sent, &sent));
        let mut pruned = sent.clone();
        for d in pruned.devices.iter_mut().flatten() {
            d.taints = None;
        }
        assert!(!taints_kept(&sent, &pruned));
        let untainted = desired_slices(&cfg, &[info("0000:66:00.0")], 1).remove(0);
        assert!(taints_kept(&untainted, &untainted), "nothing to lose");
    }

    #[test]
    fn quarantined_gpus_are_published_only_where_taints_are_kept() {
        let devices = vec![quarantined("0000:65:00.0"), info("0000:66:00.0")];
        assert_eq!(publishable(&devices, TaintSupport::Kept).len(), 2);
        for support in [TaintSupport::Unknown, TaintSupport::Pruned] {
            let p = publishable(&devices, support);
            assert_eq!(p.len(), 1, "{support:?}");
            assert!(p[0].quarantine.is_none());
        }
    }

    fn unhealthy(bdf: &str, reason: UnhealthyReason, effect: TaintEffect) -> DeviceInfo {
        DeviceInfo {
            unhealthy: Some(UnhealthyTaint {
                reason,
                since_unix: 1_700_000_100,
                effect,
            }),
            ..info(bdf)
        }
    }

    #[test]
    fn an_unhealthy_device_carries_the_unhealthy_taint_next_to_its_quarantine() {
        let d = device(
            "gpu.example.com",
            &unhealthy(
                "0000:65:00.0",
                UnhealthyReason::NotResponding,
                TaintEffect::NoExecute,
            ),
        );
        let taints = d.taints.expect("tainted");
        assert_eq!(taints.len(), 1);
        let t = &taints[0];
        assert_eq!(t.key, "gpu.example.com/unhealthy");
        assert_eq!(t.value.as_deref(), Some("NotResponding"));
        assert_eq!(t.effect, "NoExecute");
        assert_eq!(
            t.time_added.as_ref().map(|t| t.0.as_second()),
            Some(1_700_000_100)
        );
        // Quarantined and unhealthy: both taints, each under its own key.
        let both = DeviceInfo {
            quarantine: quarantined("0000:65:00.0").quarantine,
            ..unhealthy(
                "0000:65:00.0",
                UnhealthyReason::Removed,
                TaintEffect::NoSchedule,
            )
        };
        let keys: Vec<String> = device("d", &both)
            .taints
            .expect("tainted")
            .into_iter()
            .map(|t| t.key)
            .collect();
        assert_eq!(keys, ["d/quarantined", "d/unhealthy"]);
    }

    /// Every reason code is a valid label value (the taint's value): CamelCase
    /// ASCII letters, at most 63 bytes, one code per reason.
    #[test]
    fn unhealthy_reason_codes_are_distinct_label_values() {
        let codes: BTreeSet<&str> = UnhealthyReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(codes.len(), UnhealthyReason::ALL.len());
        for c in codes {
            assert!(c.len() <= 63 && c.starts_with(|ch: char| ch.is_ascii_uppercase()));
            assert!(c.chars().all(|ch| ch.is_ascii_alphabetic()), "{c}");
        }
    }

    /// The effect decision, for every policy, reason and prepared state:
    /// NoExecute only where the admin chose it and a VM holds a GPU it can no
    /// longer use; everything else NoSchedule.
    #[test]
    fn unhealthy_taint_effect_follows_the_policy_only_for_unusable_prepared_gpus() {
        for policy in [TaintEffect::NoSchedule, TaintEffect::NoExecute] {
            for prepared in [false, true] {
                for reason in UnhealthyReason::ALL {
                    let effect = unhealthy_taint_effect(policy, prepared, reason);
                    let evicts = policy == TaintEffect::NoExecute
                        && prepared
                        && !matches!(
                            reason,
                            UnhealthyReason::OperationStuck | UnhealthyReason::NoDriver
                        );
                    assert_eq!(
                        effect == TaintEffect::NoExecute,
                        evicts,
                        "{policy:?} prepared={prepared} {reason}"
                    );
                }
            }
        }
    }

    #[test]
    fn taint_effects_parse_from_their_api_spelling_only() {
        for e in [TaintEffect::NoSchedule, TaintEffect::NoExecute] {
            assert_eq!(e.as_str().parse::<TaintEffect>(), Ok(e));
        }
        for bad in ["noexecute", "None", "PreferNoSchedule", ""] {
            assert!(bad.parse::<TaintEffect>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unhealthy_gpus_are_published_only_where_taints_are_kept() {
        let devices = vec![
            unhealthy(
                "0000:65:00.0",
                UnhealthyReason::NotResponding,
                TaintEffect::NoSchedule,
            ),
            info("0000:66:00.0"),
        ];
        assert_eq!(publishable(&devices, TaintSupport::Kept).len(), 2);
        for support in [TaintSupport::Unknown, TaintSupport::Pruned] {
            let p = publishable(&devices, support);
            assert_eq!(p.len(), 1, "{support:?}");
            assert!(!p[0].is_tainted());
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(1), s(30), 1), s(1));
        assert_eq!(backoff(s(1), s(30), 3), s(4));
        assert_eq!(backoff(s(1), s(30), 40), s(30));
    }
}
