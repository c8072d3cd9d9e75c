//! The kubelet side of NVLink partitions (the engine's `fabric.rs` does the
//! work): ResourceSlice attributes, the claim's holder, reconcile logging.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::resource::v1::DeviceAttribute;
use vfio_gpu_engine::ledger::LedgerBody;
use vfio_gpu_engine::{Engine, GpuFabric, Holder};

/// `gpuModuleID`: the GPU's module id (FM `physicalId`).
pub const ATTR_MODULE_ID: &str = "gpuModuleID";
/// `nvlinkFabric`: `nvl4` (HGX H100/H200) or `nvl5` (HGX B200/B300).
pub const ATTR_NVLINK_FABRIC: &str = "nvlinkFabric";
/// `fabricManaged`: Fabric Manager configured and answering.
pub const ATTR_FABRIC_MANAGED: &str = "fabricManaged";
/// Prefix of `partition1`, `partition2`, `partition4`, `partition8`: the FM
/// id of the partition of that size containing the GPU. A claim ties its N
/// requests with `matchAttribute: <driver>/partitionN`.
pub const ATTR_PARTITION_PREFIX: &str = "partition";

/// Adds the fabric attributes of one GPU. No `partitionN` while the module
/// id is unknown (a constrained claim then cannot pick the GPU: safe).
pub fn insert_attributes(f: &GpuFabric, attrs: &mut BTreeMap<String, DeviceAttribute>) {
    let int = |i: u32| DeviceAttribute {
        int: Some(i64::from(i)),
        ..DeviceAttribute::default()
    };
    if let Some(m) = f.module_id {
        attrs.insert(ATTR_MODULE_ID.to_string(), int(m.0));
        for (size, id) in &f.partitions {
            if matches!(size, 1 | 2 | 4 | 8) {
                attrs.insert(format!("{ATTR_PARTITION_PREFIX}{size}"), int(id.0));
            }
        }
    }
    if let Some(fabric) = &f.nvlink_fabric {
        attrs.insert(
            ATTR_NVLINK_FABRIC.to_string(),
            DeviceAttribute {
                string: Some(fabric.clone()),
                ..DeviceAttribute::default()
            },
        );
    }
    attrs.insert(
        ATTR_FABRIC_MANAGED.to_string(),
        DeviceAttribute {
            bool: Some(f.fabric_managed),
            ..DeviceAttribute::default()
        },
    );
}

/// The holder of claim `uid` as the ledger records it, from its GPUs or its
/// partitions (a partition can outlive its GPUs' records after a crash).
pub fn claim_holder(ledger: &LedgerBody, uid: &str) -> Option<Holder> {
    let is_claim = |h: &&Holder| matches!(h, Holder::Claim { uid: u, .. } if u == uid);
    ledger
        .gpus
        .values()
        .filter_map(|r| r.holder.as_ref())
        .chain(
            ledger
                .fabric
                .partitions
                .values()
                .filter_map(|r| r.holder.as_ref()),
        )
        .find(is_claim)
        .cloned()
}

/// Runs the engine's fabric reconcile and logs what it did; a failure is
/// logged, never fatal (FM may be starting).
pub async fn reconcile(engine: &Arc<Engine>) {
    let e = Arc::clone(engine);
    match tokio::task::spawn_blocking(move || e.fabric_reconcile()).await {
        Ok(Ok(results)) => {
            for o in results {
                tracing::info!(partitions = ?o.partitions, action = ?o.action, detail = %o.detail, "fabric reconcile");
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "fabric reconcile failed"),
        Err(e) => tracing::warn!(error = %e, "fabric reconcile task failed"),
    }
}

/// How often `serve` checks Fabric Manager for a pending restart replay (FM
/// waits 60 s for it, then exits).
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the fabric watch: every [`WATCH_INTERVAL`] until `stop`, lists FM
/// and replays the active partitions when it restarted with `--restart`
/// ([`Engine::fabric_watch`]). Does nothing without a configured FM.
pub fn spawn_watch(
    engine: &Arc<Engine>,
    stop: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    engine.config().fabric.as_ref()?;
    let engine = Arc::clone(engine);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let e = Arc::clone(&engine);
            match tokio::task::spawn_blocking(move || e.fabric_watch()).await {
                Ok(Ok(Some(o))) => {
                    tracing::warn!(partitions = ?o.partitions, detail = %o.detail, "Fabric Manager restart replayed");
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "Fabric Manager watch"),
                Err(e) => tracing::warn!(error = %e, "Fabric Manager watch task failed"),
            }
        }
    }))
}
