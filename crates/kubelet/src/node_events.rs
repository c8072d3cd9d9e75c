//! Events on the Node: a GPU put in quarantine says so where `kubectl describe
//! node` shows it (reason `GPUQuarantined`, a Warning naming the GPU, the
//! failed step and the admin's way out).
//!
//! Which quarantines to announce is a pure function of what was announced
//! and what the publisher publishes ([`QuarantineAnnouncer::newly_quarantined`]);
//! one Event per quarantine (GPU and since-time), again after a restart.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use vfio_gpu_host::Bdf;

use crate::slices::{DeviceInfo, QuarantineTaint};

/// The Event's `reason`.
pub const REASON_GPU_QUARANTINED: &str = "GPUQuarantined";
/// The Events' `generateName`.
const GENERATE_NAME: &str = "gpu-quarantined-";
/// Events about cluster-scoped objects live here.
const EVENT_NAMESPACE: &str = "default";
/// The API's limit on `note`.
const MAX_NOTE: usize = 1024;

/// The quarantines already announced, by GPU and since-time (a GPU quarantined
/// again after a reset is a new quarantine).
#[derive(Debug, Default)]
pub struct QuarantineAnnouncer {
    announced: BTreeSet<(Bdf, u64)>,
}

impl QuarantineAnnouncer {
    /// The quarantines in `devices` not yet announced (pure; forgets the ones
    /// that left quarantine, so a later one is announced again).
    pub fn newly_quarantined<'a>(
        &mut self,
        devices: &'a [DeviceInfo],
    ) -> Vec<(Bdf, &'a QuarantineTaint)> {
        let now: BTreeSet<(Bdf, u64)> = devices
            .iter()
            .filter_map(|d| Some((d.bdf, d.quarantine.as_ref()?.since_unix)))
            .collect();
        self.announced.retain(|k| now.contains(k));
        devices
            .iter()
            .filter_map(|d| Some((d.bdf, d.quarantine.as_ref()?)))
            .filter(|(b, q)| !self.announced.contains(&(*b, q.since_unix)))
            .collect()
    }

    /// Marks one quarantine as announced.
    pub fn announced(&mut self, bdf: Bdf, q: &QuarantineTaint) {
        self.announced.insert((bdf, q.since_unix));
    }
}

/// The Event for `bdf`'s quarantine on `node` (its `OwnerReference` gives
/// name and uid), reported by `driver`.
pub fn quarantine_event(
    driver: &str,
    node: &OwnerReference,
    bdf: Bdf,
    q: &QuarantineTaint,
    now: k8s_openapi::jiff::Timestamp,
) -> Event {
    let mut note = format!(
        "GPU {bdf} quarantined ({}): {}. Offered to nobody until `vfio-gpu-dra reset {bdf}` on the node resets, verifies and clears it.",
        q.cause.as_str(),
        q.reason
    );
    if note.len() > MAX_NOTE {
        let mut cut = MAX_NOTE;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    Event {
        metadata: ObjectMeta {
            // Fixed and short: a prefix cut from the node name could end in a
            // dot, which the server refuses (it masks only a trailing dash).
            generate_name: Some(GENERATE_NAME.into()),
            namespace: Some(EVENT_NAMESPACE.into()),
            ..Default::default()
        },
        action: Some("Quarantine".into()),
        reason: Some(REASON_GPU_QUARANTINED.into()),
        type_: Some("Warning".into()),
        note: Some(note),
        event_time: Some(MicroTime(now)),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.name.clone()),
            uid: Some(node.uid.clone()),
            ..Default::default()
        }),
        reporting_controller: Some(driver.into()),
        reporting_instance: Some(
            format!("{driver}/{}", node.name)
                .chars()
                .take(128)
                .collect(),
        ),
        ..Default::default()
    }
}

/// Posts the Event for each quarantine not yet announced; a failed post is
/// logged and retried at the next sync.
pub async fn announce_quarantines(
    client: &kube::Client,
    driver: &str,
    node: &OwnerReference,
    announcer: &mut QuarantineAnnouncer,
    devices: &[DeviceInfo],
) {
    let api: Api<Event> = Api::namespaced(client.clone(), EVENT_NAMESPACE);
    for (bdf, q) in announcer.newly_quarantined(devices) {
        let event = quarantine_event(driver, node, bdf, q, k8s_openapi::jiff::Timestamp::now());
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {
                tracing::warn!(gpu = %bdf, cause = q.cause.as_str(), reason = %q.reason, "GPU quarantined (Event {REASON_GPU_QUARANTINED} on the Node)");
                announcer.announced(bdf, q);
            }
            Err(e) => {
                tracing::warn!(gpu = %bdf, error = %e, "posting the {REASON_GPU_QUARANTINED} Event on the Node; retried at the next sync")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slices::TaintEffect;
    use vfio_gpu_engine::ledger::QuarantineCause;

    fn q(since: u64) -> QuarantineTaint {
        QuarantineTaint {
            cause: QuarantineCause::ResetFailed,
            reason: "reset of 0000:65:00.0 (flr) failed: EIO".into(),
            since_unix: since,
            effect: TaintEffect::NoSchedule,
        }
    }

    fn gpu(bdf: &str, quarantine: Option<QuarantineTaint>) -> DeviceInfo {
        DeviceInfo {
            bdf: bdf.parse().expect("bdf"),
            vendor: 0x10de,
            device: 0x2330,
            product_name: None,
            driver: None,
            iommu_group: 1,
            numa_node: None,
            pcie_root: None,
            keep_on_vfio: false,
            bar_bytes: 0,
            bar_prefetchable64_bytes: 0,
            fabric: None,
            quarantine,
            unhealthy: None,
        }
    }

    #[test]
    fn each_quarantine_is_announced_once_and_again_when_it_recurs() {
        let mut a = QuarantineAnnouncer::default();
        let devices = vec![gpu("0000:65:00.0", Some(q(10))), gpu("0000:66:00.0", None)];
        let new = a.newly_quarantined(&devices);
        assert_eq!(new.len(), 1);
        let (bdf, first) = new[0];
        let first = first.clone();
        // Not announced (the post failed): still new.
        assert_eq!(a.newly_quarantined(&devices).len(), 1);
        a.announced(bdf, &first);
        assert!(a.newly_quarantined(&devices).is_empty(), "announced once");
        // Cleared, then quarantined again: a new Event.
        let cleared = vec![gpu("0000:65:00.0", None)];
        assert!(a.newly_quarantined(&cleared).is_empty());
        let again = vec![gpu("0000:65:00.0", Some(q(10)))];
        assert_eq!(
            a.newly_quarantined(&again).len(),
            1,
            "forgotten when cleared"
        );
        a.announced(bdf, &first);
        let later = vec![gpu("0000:65:00.0", Some(q(99)))];
        assert_eq!(a.newly_quarantined(&later).len(), 1, "a new quarantine");
    }

    #[test]
    fn the_event_names_the_gpu_why_and_the_way_out_on_the_node() {
        let node = OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: "node-a".into(),
            uid: "uid-1".into(),
            ..Default::default()
        };
        let bdf: Bdf = "0000:65:00.0".parse().expect("bdf");
        let mut long = q(10);
        long.reason = "é".repeat(2000);
        for quarantine in [q(10), long] {
            let e = quarantine_event(
                "vfio-gpu.dra.dev",
                &node,
                bdf,
                &quarantine,
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            );
            assert_eq!(e.reason.as_deref(), Some(REASON_GPU_QUARANTINED));
            assert_eq!(e.type_.as_deref(), Some("Warning"));
            let r = e.regarding.expect("regarding");
            assert_eq!(
                (r.kind.as_deref(), r.name.as_deref(), r.uid.as_deref()),
                (Some("Node"), Some("node-a"), Some("uid-1"))
            );
            assert_eq!(e.metadata.namespace.as_deref(), Some("default"));
            assert_eq!(e.metadata.generate_name.as_deref(), Some(GENERATE_NAME));
            let note = e.note.expect("note");
            assert!(note.len() <= MAX_NOTE);
            assert!(
                note.starts_with("GPU 0000:65:00.0 quarantined (ResetFailed)"),
                "{note}"
            );
        }
    }
}
