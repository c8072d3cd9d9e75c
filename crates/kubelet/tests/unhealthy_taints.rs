//! GPUs the health scan finds unhealthy are published with the
//! `<driver>/unhealthy=<reason>` device taint ([`UnhealthyTaints`]) instead of
//! vanishing or staying untainted, with the effect the policy gives a VM's
//! unusable GPU, and lose it once healthy again; end to end through the
//! health monitor and the publisher against the fake API server.

mod slices_common;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use slices_common::*;
use tokio_util::sync::CancellationToken;
use vfio_gpu_engine::GpuView;
use vfio_gpu_host::Bdf;
use vfio_gpu_kubelet::health::{DeviceHealth, Health, HealthReport, UnhealthyReason};
use vfio_gpu_kubelet::slices::{
    AdminOwned, DeviceInfo, TaintEffect, UnhealthyTaints, device_infos, device_name,
};

const AB: &str = "0000:ab:00.0";
const BA: &str = "0000:ba:00.0";

fn bdf(s: &str) -> Bdf {
    s.parse().expect("bdf")
}

/// A report with every view healthy except `unhealthy`.
fn report(views: &[GpuView], unhealthy: &[(&str, UnhealthyReason)]) -> HealthReport {
    let bad: BTreeMap<Bdf, UnhealthyReason> = unhealthy.iter().map(|(b, r)| (bdf(b), *r)).collect();
    let mut devices: Vec<DeviceHealth> = views
        .iter()
        .map(|v| v.gpu.bdf())
        .chain(bad.keys().copied())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|b| DeviceHealth {
            bdf: b,
            device_name: device_name(&b),
            health: if bad.contains_key(&b) {
                Health::Unhealthy
            } else {
                Health::Healthy
            },
            message: String::new(),
            reason: bad.get(&b).copied(),
        })
        .collect();
    devices.sort_by_key(|d| d.bdf);
    HealthReport { devices }
}

fn by_bdf(devices: &[DeviceInfo]) -> BTreeMap<String, &DeviceInfo> {
    devices.iter().map(|d| (d.bdf.to_string(), d)).collect()
}

/// Marks `b` prepared for a claim, as the ledger has it while a VM holds it.
fn prepare(views: &mut [GpuView], b: &str) {
    let view = views
        .iter_mut()
        .find(|v| v.gpu.bdf() == bdf(b))
        .expect("demo GPU");
    let mut record = vfio_gpu_engine::ledger::GpuRecord::configuring(
        vfio_gpu_engine::Holder::Claim {
            uid: "u1".into(),
            namespace: "vms".into(),
            name: "vm-gpu".into(),
        },
        std::slice::from_ref(&view.gpu.function),
        &vfio_gpu_host::DriverName::vfio_pci(),
        Default::default(),
        "boot".into(),
        1,
    );
    record.state = vfio_gpu_engine::ledger::OpState::Configured;
    view.record = Some(record);
}

#[test]
fn an_unhealthy_gpu_is_published_tainted_until_it_recovers() {
    let views = demo_views();
    let offered = device_infos(&views);
    let mut taints = UnhealthyTaints::default();
    let policy = TaintEffect::NoExecute;

    let healthy = taints.apply(&views, AdminOwned::Offer, &report(&views, &[]), policy, 10);
    assert_eq!(
        healthy, offered,
        "all healthy: exactly what is offered, untainted"
    );

    let sick = report(&views, &[(AB, UnhealthyReason::NotResponding)]);
    let out = taints.apply(&views, AdminOwned::Offer, &sick, policy, 100);
    assert_eq!(out.len(), offered.len(), "nothing vanishes");
    for d in &out {
        if d.bdf == bdf(AB) {
            let t = d.unhealthy.as_ref().expect("AB tainted");
            assert_eq!(t.reason, UnhealthyReason::NotResponding);
            // Nobody holds it: keeping new claims off is enough.
            assert_eq!(t.effect, TaintEffect::NoSchedule);
            assert_eq!(t.since_unix, 100);
        } else {
            assert_eq!(d.unhealthy, None, "{}", d.bdf);
        }
    }
    // Still unhealthy later: the same taint, the same timeAdded (no rewrite).
    let again = taints.apply(&views, AdminOwned::Offer, &sick, policy, 200);
    assert_eq!(again, out);

    // Healthy again: the taint is gone, the list is what it was.
    let recovered = taints.apply(&views, AdminOwned::Offer, &report(&views, &[]), policy, 300);
    assert_eq!(recovered, offered);
    // A new fault is a new taint, from its own time.
    let out = taints.apply(&views, AdminOwned::Offer, &sick, policy, 400);
    assert_eq!(
        by_bdf(&out)[AB].unhealthy.as_ref().map(|t| t.since_unix),
        Some(400)
    );
}

#[test]
fn no_execute_only_for_a_fault_that_leaves_a_vm_with_an_unusable_gpu() {
    for policy in [TaintEffect::NoSchedule, TaintEffect::NoExecute] {
        for reason in UnhealthyReason::ALL
            .into_iter()
            .filter(|r| *r != UnhealthyReason::Removed)
        {
            let mut views = demo_views();
            let mut taints = UnhealthyTaints::default();
            let sick = report(&views, &[(AB, reason)]);
            let idle = taints.apply(&views, AdminOwned::Offer, &sick, policy, 100);
            let t = by_bdf(&idle)[AB].unhealthy.clone().expect("tainted");
            assert_eq!(t.effect, TaintEffect::NoSchedule, "{reason}: not prepared");

            prepare(&mut views, AB);
            let held = taints.apply(&views, AdminOwned::Offer, &sick, policy, 200);
            let t = by_bdf(&held)[AB].unhealthy.clone().expect("still tainted");
            let want = if policy == TaintEffect::NoExecute && reason.makes_gpu_unusable() {
                TaintEffect::NoExecute
            } else {
                TaintEffect::NoSchedule
            };
            assert_eq!(t.effect, want, "{policy:?} {reason}");
            // A changed effect starts from now (tolerationSeconds count from it).
            let since = if want == TaintEffect::NoSchedule {
                100
            } else {
                200
            };
            assert_eq!(t.since_unix, since, "{policy:?} {reason}");
        }
    }
}

#[test]
fn a_gpu_gone_from_the_bus_stays_published_tainted_removed() {
    let mut views = demo_views();
    prepare(&mut views, BA);
    let mut taints = UnhealthyTaints::default();
    let policy = TaintEffect::NoExecute;
    let before = taints.apply(&views, AdminOwned::Offer, &report(&views, &[]), policy, 10);
    assert!(by_bdf(&before).contains_key(BA));

    let gone: Vec<GpuView> = views
        .iter()
        .filter(|v| v.gpu.bdf() != bdf(BA))
        .cloned()
        .collect();
    // Even before the health scan notices, the publisher does not drop it.
    for r in [
        report(&gone, &[]),
        report(&gone, &[(BA, UnhealthyReason::Removed)]),
    ] {
        let out = taints.apply(&gone, AdminOwned::Offer, &r, policy, 20);
        assert_eq!(out.len(), before.len(), "nothing vanishes");
        let t = by_bdf(&out)[BA].unhealthy.clone().expect("tainted");
        assert_eq!(t.reason, UnhealthyReason::Removed);
        assert_eq!(t.effect, TaintEffect::NoExecute, "a VM held it");
    }
    // Back on the bus and healthy: as before.
    let back = taints.apply(&views, AdminOwned::Offer, &report(&views, &[]), policy, 30);
    assert_eq!(back, before);
}

#[test]
fn a_stuck_gpu_is_published_only_once_the_scan_says_why() {
    let mut views = demo_views();
    let offered = device_infos(&views);
    views
        .iter_mut()
        .find(|v| v.gpu.bdf() == bdf(AB))
        .expect("AB")
        .stuck = Some("unbind".into());
    let mut taints = UnhealthyTaints::default();
    let policy = TaintEffect::NoSchedule;
    // The scan has not seen it yet: hidden, as before.
    let lagging = taints.apply(&views, AdminOwned::Offer, &report(&views, &[]), policy, 10);
    assert!(!by_bdf(&lagging).contains_key(AB));
    let sick = report(&views, &[(AB, UnhealthyReason::OperationStuck)]);
    let out = taints.apply(&views, AdminOwned::Offer, &sick, policy, 20);
    assert_eq!(out.len(), offered.len());
    let t = by_bdf(&out)[AB].unhealthy.clone().expect("tainted");
    assert_eq!(t.reason, UnhealthyReason::OperationStuck);
    assert_eq!(t.effect, TaintEffect::NoSchedule);
}

/// The invariant, over every single-GPU fault of the demo host: a GPU is
/// tainted exactly when the scan reports it unhealthy, with the scan's
/// reason, and the published set is the offered set.
#[test]
fn the_taint_is_exactly_the_scans_verdict() {
    let views = demo_views();
    let offered = device_infos(&views);
    for target in &offered {
        for reason in UnhealthyReason::ALL
            .into_iter()
            .filter(|r| *r != UnhealthyReason::Removed)
        {
            let mut taints = UnhealthyTaints::default();
            let b = target.bdf.to_string();
            let out = taints.apply(
                &views,
                AdminOwned::Offer,
                &report(&views, &[(b.as_str(), reason)]),
                TaintEffect::NoExecute,
                1,
            );
            let names: Vec<Bdf> = out.iter().map(|d| d.bdf).collect();
            let want: Vec<Bdf> = offered.iter().map(|d| d.bdf).collect();
            assert_eq!(names, want);
            for d in &out {
                let got = d.unhealthy.as_ref().map(|t| t.reason);
                let expected = (d.bdf == target.bdf).then_some(reason);
                assert_eq!(got, expected, "{} with {b} {reason}", d.bdf);
            }
        }
    }
}

/// This node's published devices by name, with their taints.
fn published_taints(server: &fake_apiserver::FakeApiServer) -> BTreeMap<String, Vec<Value>> {
    stored_slices(server)
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .map(|d| {
            let name = d["name"].as_str().unwrap_or_default().to_string();
            (name, d["taints"].as_array().cloned().unwrap_or_default())
        })
        .collect()
}

/// End to end: a GPU whose config space stops answering (reads 0xffff) gets
/// the `unhealthy=NotResponding` taint in its ResourceSlice from the next
/// health scan, and loses it once the device answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_that_stops_answering_is_published_tainted_and_untainted_when_it_recovers() {
    use vfio_gpu_kubelet::health::HealthMonitor;
    use vfio_gpu_kubelet::metrics::Metrics;
    use vfio_gpu_kubelet::slices::{HealthTaints, run_publisher, watch_engine_devices_with_health};

    let (server, client, _) = setup().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let host = dir.path().join("host");
    std::fs::create_dir_all(&host).expect("host dir");
    vfio_gpu_host::demo::build_demo_host(&host).expect("demo host");
    let root = vfio_gpu_host::HostRoot::open(&host).expect("host root");
    let kernel = vfio_gpu_engine::sim::SimKernel::booted(root.clone());
    let (engine, _) = vfio_gpu_engine::Engine::open(
        std::sync::Arc::new(kernel),
        &dir.path().join("state"),
        vfio_gpu_host::GpuSelector::default(),
        vfio_gpu_intent::Policy::default(),
        vfio_gpu_engine::EngineConfig::default(),
    )
    .expect("engine");
    let engine = std::sync::Arc::new(engine);
    let config_space = root.pci_device_dir(&bdf(AB)).join("config");
    std::fs::write(&config_space, [0xde, 0x10, 0x30, 0x1e]).expect("config answers");

    let shutdown = CancellationToken::new();
    let feed = HealthMonitor::start(
        engine.clone(),
        Metrics::new(),
        Duration::from_millis(100),
        shutdown.clone(),
    )
    .await;
    let devices = watch_engine_devices_with_health(
        engine,
        Duration::from_secs(30),
        AdminOwned::Offer,
        Some(HealthTaints {
            feed,
            policy: TaintEffect::NoExecute,
        }),
        shutdown.clone(),
    )
    .await;
    let task = tokio::spawn(run_publisher(client, config(), devices, shutdown.clone()));
    let name = device_name(&bdf(AB));
    let limit = Duration::from_secs(20);
    wait_for(limit, "published untainted", || {
        published_taints(&server)
            .get(&name)
            .is_some_and(Vec::is_empty)
            .then_some(())
    })
    .await;

    std::fs::write(&config_space, [0xff, 0xff, 0xff, 0xff]).expect("falls off the bus");
    let taints = wait_for(limit, "the unhealthy taint published", || {
        published_taints(&server)
            .get(&name)
            .filter(|t| !t.is_empty())
            .cloned()
    })
    .await;
    assert_eq!(taints.len(), 1, "{taints:?}");
    assert_eq!(taints[0]["key"], "vfio-gpu.dra.dev/unhealthy");
    assert_eq!(taints[0]["value"], "NotResponding");
    // Nobody holds it: NoSchedule whatever the policy.
    assert_eq!(taints[0]["effect"], "NoSchedule");
    assert!(taints[0]["timeAdded"].is_string(), "{taints:?}");
    let others = published_taints(&server);
    assert!(
        others
            .iter()
            .filter(|(n, _)| **n != name)
            .all(|(_, t)| t.is_empty()),
        "{others:?}"
    );

    std::fs::write(&config_space, [0xde, 0x10, 0x30, 0x1e]).expect("answers again");
    wait_for(limit, "the taint removed", || {
        published_taints(&server)
            .get(&name)
            .is_some_and(Vec::is_empty)
            .then_some(())
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("publisher stops")
        .expect("joins")
        .expect("Ok");
}
