//! `publish_once` / `SlicePublisher::sync` against the fake API server: what a
//! sync writes, and the Go helper's generation rules.

mod slices_common;

use std::time::Duration;

use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use slices_common::*;
use vfio_gpu_intent::{Pin, Source};
use vfio_gpu_kubelet::slices::{
    DeviceInfo, MAX_DEVICES_PER_SLICE, SlicePublisher, desired_slices, device_info, device_name,
    publish_once,
};

const LIMIT: Duration = Duration::from_secs(30);

fn device<'a>(slices: &'a [Value], name: &str) -> &'a Value {
    slices
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().into_iter().flatten())
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("device {name} published"))
}

#[tokio::test]
async fn first_publish_offers_the_movable_gpus_with_their_attributes() {
    let (server, client, node_uid) = setup().await;
    let cfg = config();
    let devices = demo_devices();
    let outcome = bounded(LIMIT, "publish", publish_once(&client, &cfg, &devices))
        .await
        .expect("publish");
    assert_eq!(
        (outcome.generation, outcome.slices, outcome.created),
        (1, 1, 1)
    );

    let slices = stored_slices(&server);
    assert_eq!(slices.len(), 1, "one slice: {slices:#?}");
    let s = &slices[0];
    assert_eq!(pool_state(&slices), Some((1, 1)));
    assert_eq!(s["spec"]["pool"]["name"], NODE);
    assert_eq!(s["spec"]["driver"], DRIVER);
    assert_eq!(s["spec"]["nodeName"], NODE);
    assert_eq!(
        s["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": node_uid, "controller": true}])
    );
    let name = s["metadata"]["name"].as_str().expect("name");
    assert!(
        name.starts_with("demo-node-vfio-gpu.dra.dev-") && name.len() > 27,
        "{name}"
    );

    // Named by address; the L4 sharing its IOMMU group with a NIC is not offered.
    assert_eq!(
        device_names(&slices),
        [
            "gpu-0000-18-00-0",
            "gpu-0000-2a-00-0",
            "gpu-0000-3a-00-0",
            "gpu-0000-5d-00-0",
            "gpu-0000-9a-00-0",
            "gpu-0000-ab-00-0",
            "gpu-0000-ba-00-0",
        ]
    );

    let h100 = device(&slices, "gpu-0000-18-00-0");
    assert_eq!(
        h100["attributes"],
        json!({
            "resource.kubernetes.io/pciBusID": {"string": "0000:18:00.0"},
            "resource.kubernetes.io/pcieRoot": {"string": "pci0000:17"},
            "barPrefetchable64Bytes": {"int": (128_i64 << 30) + (32 << 20)},
            "resource.kubernetes.io/numaNode": {"int": 0},
            "numaNode": {"int": 0},
            "vendorID": {"string": "0x10de"},
            "deviceID": {"string": "0x2330"},
            "productName": {"string": "GH100 [H100 SXM5 80GB]"},
            "iommuGroup": {"int": 5},
            "driver": {"string": "vfio-pci"},
            "keepOnVfio": {"bool": true},
            "type": {"string": "vfio"},
        })
    );
    // 16 MiB + 128 GiB + 32 MiB of BARs.
    assert_eq!(
        h100["capacity"],
        json!({"addressableMemory": {"value": "131120Mi"}})
    );

    for (dev, keep, driver) in [
        ("gpu-0000-2a-00-0", true, "vfio-pci"),
        ("gpu-0000-3a-00-0", true, "vfio-pci"),
        ("gpu-0000-5d-00-0", true, "vfio-pci"),
        ("gpu-0000-9a-00-0", true, "vfio-pci"),
        ("gpu-0000-ab-00-0", false, "nvidia"),
        ("gpu-0000-ba-00-0", false, "nvidia"),
    ] {
        let d = device(&slices, dev);
        assert_eq!(d["attributes"]["keepOnVfio"]["bool"], keep, "{dev}");
        assert_eq!(d["attributes"]["driver"]["string"], driver, "{dev}");
        assert_eq!(d["attributes"]["type"]["string"], "vfio", "{dev}");
    }
    assert_eq!(
        device(&slices, "gpu-0000-ba-00-0")["attributes"]["productName"]["string"],
        "GA100 [A100 SXM4 80GB]"
    );

    // The published object reads back as the typed k8s-openapi ResourceSlice.
    let typed: ResourceSlice = serde_json::from_value(s.clone()).expect("typed slice");
    assert_eq!(typed.spec.devices.map(|d| d.len()), Some(7));
}

#[test]
fn pinned_stuck_and_shared_group_gpus_are_not_offered() {
    let views = demo_views();
    let l4 = views
        .iter()
        .find(|v| v.gpu.function.bdf.to_string() == "0000:db:00.0")
        .expect("the L4");
    assert!(device_info(l4).is_none(), "NIC in its IOMMU group");

    let a100 = views
        .iter()
        .find(|v| v.gpu.function.bdf.to_string() == "0000:ba:00.0")
        .expect("the A100");
    assert!(device_info(a100).is_some());
    let mut pinned = a100.clone();
    pinned.verdict.pinned = Some(Pin {
        bdf: Some(a100.gpu.function.bdf),
        driver: Some("nvidia".into()),
        source: Source::Policy,
        detail: "pinned in the policy file".into(),
    });
    assert!(device_info(&pinned).is_none(), "pinned");
    let mut stuck = a100.clone();
    stuck.stuck = Some("unbind from nvidia".into());
    assert!(device_info(&stuck).is_none(), "stuck");
    let mut held = a100.clone();
    held.holders = vec![vfio_gpu_engine::preflight::NodeHolder {
        pid: 4242,
        comm: "python3".into(),
        node: "/dev/nvidia3".into(),
        program: Some("python3".into()),
    }];
    assert!(device_info(&held).is_none(), "a host process holds it (m8)");
    let mut releasing = a100.clone();
    let mut record = vfio_gpu_engine::ledger::GpuRecord::configuring(
        vfio_gpu_engine::Holder::Admin,
        &[releasing.gpu.function.clone()],
        &vfio_gpu_host::DriverName::vfio_pci(),
        Default::default(),
        "boot".into(),
        1,
    );
    assert!(
        device_info(&{
            releasing.record = Some(record.clone());
            releasing.clone()
        })
        .is_none(),
        "a move in flight (review m12)"
    );
    record.state = vfio_gpu_engine::ledger::OpState::Releasing;
    releasing.record = Some(record);
    assert!(device_info(&releasing).is_none(), "a release in flight");
    let mut no_iommu = a100.clone();
    no_iommu.gpu.function.iommu_group = None;
    assert!(device_info(&no_iommu).is_none(), "no IOMMU group");
    let mut quarantined = a100.clone();
    quarantined.quarantine = Some(vfio_gpu_engine::ledger::Quarantine {
        reason: "link trained to x4 of x16".into(),
        cause: vfio_gpu_engine::ledger::QuarantineCause::VerificationFailed,
        since: 1,
        boot_id: "boot".into(),
        fingerprints: Default::default(),
        extra: Default::default(),
    });
    // Quarantined: still offered, carrying why (the publisher taints it, or
    // hides it where the API server drops taints).
    let q = device_info(&quarantined)
        .and_then(|d| d.quarantine)
        .expect("quarantined: published with its taint");
    assert_eq!(q.cause.as_str(), "VerificationFailed");
    assert_eq!(q.since_unix, 1);
    // Quarantined and otherwise unofferable: still not offered.
    let mut quarantined_pinned = quarantined.clone();
    quarantined_pinned.verdict.pinned = pinned.verdict.pinned.clone();
    assert!(
        device_info(&quarantined_pinned).is_none(),
        "quarantined and pinned"
    );
    let mut owed = a100.clone();
    let mut kept = vfio_gpu_engine::ledger::GpuRecord::configuring(
        vfio_gpu_engine::Holder::Admin,
        std::slice::from_ref(&owed.gpu.function),
        &vfio_gpu_host::DriverName::vfio_pci(),
        Default::default(),
        "boot".into(),
        1,
    );
    kept.state = vfio_gpu_engine::ledger::OpState::Prebound;
    kept.holder = None;
    owed.record = Some(kept.clone());
    assert!(device_info(&owed).is_some(), "kept on vfio, handed over");
    kept.handover = Some(vfio_gpu_engine::ledger::Handover::owed("claim vms/vm"));
    owed.record = Some(kept);
    assert!(device_info(&owed).is_none(), "a hand-over still owed");
}

/// N7 (Kubernetes review): a GPU this driver moves for a claim stays published, and
/// with the host driver it returns to, so a prepare does not rewrite the slice and a
/// selector on `driver` keeps its meaning under the allocated claim.
#[test]
fn a_gpu_moved_for_a_claim_stays_published_with_its_host_driver() {
    let views = demo_views();
    let a100 = views
        .iter()
        .find(|v| v.gpu.function.bdf.to_string() == "0000:ba:00.0")
        .expect("the A100");
    let idle = device_info(a100).expect("offered");
    assert_eq!(idle.driver.as_deref(), Some("nvidia"));
    let claim = vfio_gpu_engine::Holder::Claim {
        uid: "claim-uid".into(),
        namespace: "vms".into(),
        name: "vm-gpu".into(),
    };
    let mut record = vfio_gpu_engine::ledger::GpuRecord::configuring(
        claim,
        std::slice::from_ref(&a100.gpu.function),
        &vfio_gpu_host::DriverName::vfio_pci(),
        Default::default(),
        "boot".into(),
        1,
    );
    let mut moving = a100.clone();
    moving.record = Some(record.clone());
    assert_eq!(
        device_info(&moving),
        Some(idle.clone()),
        "moving for its claim: unchanged"
    );
    record.state = vfio_gpu_engine::ledger::OpState::Configured;
    let mut on_vfio = a100.clone();
    on_vfio.record = Some(record);
    on_vfio.gpu.function.driver = Some(vfio_gpu_host::DriverName::vfio_pci());
    assert_eq!(
        device_info(&on_vfio),
        Some(idle),
        "on vfio for its claim: unchanged"
    );
}

#[test]
fn desired_slices_are_pure_and_stable() {
    let cfg = config();
    let mut devices = demo_devices();
    let a = desired_slices(&cfg, &devices, 4);
    devices.reverse();
    let b = desired_slices(&cfg, &devices, 4);
    assert_eq!(a, b, "input order does not matter");
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].pool.generation, 4);
    assert_eq!(
        a[0].devices.as_ref().map(|d| d[0].name.clone()),
        Some(device_name(&"0000:18:00.0".parse().expect("bdf")))
    );

    let empty = desired_slices(&cfg, &[], 1);
    assert_eq!(empty.len(), 1, "an empty pool still has a slice");
    assert_eq!(empty[0].devices, None);
    assert_eq!(empty[0].pool.resource_slice_count, 1);

    let many = desired_slices(&cfg, &many_devices(300), 1);
    let sizes: Vec<usize> = many
        .iter()
        .map(|s| s.devices.as_ref().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes, [MAX_DEVICES_PER_SLICE, MAX_DEVICES_PER_SLICE, 44]);
    assert!(many.iter().all(|s| s.pool.resource_slice_count == 3));
}

#[tokio::test]
async fn republishing_without_change_writes_nothing() {
    let (server, client, _) = setup().await;
    let mut publisher = SlicePublisher::new(client, config());
    let devices = demo_devices();
    bounded(LIMIT, "first sync", publisher.sync(&devices))
        .await
        .expect("first sync");
    let before = stored_slices(&server);
    server.clear_requests();

    let outcome = bounded(LIMIT, "second sync", publisher.sync(&devices))
        .await
        .expect("second sync");
    assert!(!outcome.wrote(), "{outcome:?}");
    assert_eq!(writes(&server), Vec::<String>::new());
    assert_eq!(stored_slices(&server), before, "same objects, same rv");
}

#[tokio::test]
async fn zero_devices_still_publish_one_empty_slice() {
    let (server, client, _) = setup().await;
    let outcome = bounded(LIMIT, "publish", publish_once(&client, &config(), &[]))
        .await
        .expect("publish");
    assert_eq!((outcome.generation, outcome.slices), (1, 1));
    let slices = stored_slices(&server);
    assert_eq!(slices.len(), 1);
    assert_eq!(device_names(&slices), Vec::<String>::new());
    assert_eq!(pool_state(&slices), Some((1, 1)));
}

#[tokio::test]
async fn one_slice_changes_in_place_without_a_new_generation() {
    let (server, client, _) = setup().await;
    let mut publisher = SlicePublisher::new(client, config());
    let mut devices = demo_devices();
    publisher.sync(&devices).await.expect("first sync");
    let before = stored_slices(&server);

    // The admin now wants the A100 kept on vfio. (A move for a VM no longer
    // changes the device: its driver attribute is the host driver, review N7.)
    let a100 = devices
        .iter_mut()
        .find(|d| d.bdf.to_string() == "0000:ba:00.0")
        .expect("A100");
    a100.keep_on_vfio = true;
    server.clear_requests();
    let outcome = publisher.sync(&devices).await.expect("sync");
    assert_eq!(
        (outcome.updated, outcome.created, outcome.deleted),
        (1, 0, 0)
    );
    assert_eq!(outcome.generation, 1, "a single update is atomic");
    assert_eq!(
        writes(&server),
        [format!(
            "PUT /apis/resource.k8s.io/v1/resourceslices/{}",
            before[0]["metadata"]["name"].as_str().expect("name")
        )]
    );
    let after = stored_slices(&server);
    assert_eq!(after[0]["metadata"]["uid"], before[0]["metadata"]["uid"]);
    assert_eq!(
        device(&after, "gpu-0000-ba-00-0")["attributes"]["keepOnVfio"]["bool"],
        true
    );
    assert_eq!(pool_state(&after), Some((1, 1)));
}

#[tokio::test]
async fn three_hundred_devices_make_three_slices_of_one_generation() {
    let (server, client, _) = setup().await;
    let mut publisher = SlicePublisher::new(client, config());
    let devices = many_devices(300);
    let outcome = bounded(LIMIT, "publish", publisher.sync(&devices))
        .await
        .expect("publish");
    assert_eq!(
        (outcome.generation, outcome.slices, outcome.created),
        (1, 3, 3)
    );
    let slices = stored_slices(&server);
    assert_eq!(slices.len(), 3);
    assert_eq!(pool_state(&slices), Some((1, 3)));
    let mut sizes: Vec<usize> = slices
        .iter()
        .map(|s| s["spec"]["devices"].as_array().map_or(0, Vec::len))
        .collect();
    sizes.sort();
    assert_eq!(sizes, [44, 128, 128]);
    let names = device_names(&slices);
    assert_eq!(names.len(), 300);
    assert!(names.windows(2).all(|w| w[0] != w[1]), "unique names");

    // Unchanged: no writes even with several slices (matched by device names).
    server.clear_requests();
    let again = publisher.sync(&devices).await.expect("resync");
    assert!(!again.wrote(), "{again:?}");

    // Dropping the last 100 devices reshapes two slices: new generation,
    // the untouched slice is bumped in place, the rest replaced.
    let old_uids: Vec<Value> = slices
        .iter()
        .map(|s| s["metadata"]["uid"].clone())
        .collect();
    let fewer = &devices[..200];
    let outcome = publisher.sync(fewer).await.expect("shrink");
    assert_eq!(outcome.generation, 2);
    assert_eq!(
        (
            outcome.slices,
            outcome.updated,
            outcome.created,
            outcome.deleted
        ),
        (2, 1, 1, 2)
    );
    let slices = stored_slices(&server);
    assert_eq!(slices.len(), 2, "old slices deleted");
    assert_eq!(pool_state(&slices), Some((2, 2)));
    assert_eq!(device_names(&slices).len(), 200);
    let kept = slices
        .iter()
        .filter(|s| old_uids.contains(&s["metadata"]["uid"]))
        .count();
    assert_eq!(kept, 1, "the first slice was updated in place");
}

#[tokio::test]
async fn older_generations_and_foreign_pools_are_removed() {
    let (server, client, _) = setup().await;
    let api: Api<ResourceSlice> = Api::all(client.clone());
    let stale = |name: &str, pool: &str, generation: i64| -> ResourceSlice {
        serde_json::from_value(json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": name},
            "spec": {"driver": DRIVER, "nodeName": NODE,
                     "pool": {"name": pool, "generation": generation, "resourceSliceCount": 1},
                     "devices": [{"name": "gpu-0"}]}
        }))
        .expect("slice")
    };
    let pp = PostParams::default();
    api.create(&pp, &stale("old-gen", NODE, 3))
        .await
        .expect("create");
    api.create(&pp, &stale("current", NODE, 5))
        .await
        .expect("create");
    api.create(&pp, &stale("other-pool", "something-else", 9))
        .await
        .expect("create");
    // Someone else's slice on the same node is left alone.
    let mut other_driver = stale("other-driver", NODE, 1);
    other_driver.spec.driver = "other.example.com".into();
    api.create(&pp, &other_driver).await.expect("create");

    let devices = demo_devices();
    let outcome = publish_once(&client, &config(), &devices)
        .await
        .expect("publish");
    // The lone current slice is updated in place; keeping generation 5.
    assert_eq!(outcome.generation, 5);
    assert_eq!((outcome.updated, outcome.deleted), (1, 2));
    let slices = stored_slices(&server);
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0]["metadata"]["name"], "current");
    assert_eq!(pool_state(&slices), Some((5, 1)));
    assert_eq!(device_names(&slices).len(), 7);
    assert!(server.get("resourceslices", None, "other-driver").is_some());
}

#[test]
fn device_info_list_from_the_demo_matches_device_info() {
    let views = demo_views();
    let infos: Vec<DeviceInfo> = views.iter().filter_map(device_info).collect();
    assert_eq!(
        infos,
        demo_devices(),
        "device_infos = filtered device_info in BDF order"
    );
}

#[tokio::test]
async fn api_server_without_resource_v1_is_reported_as_such() {
    let (server, client, _) = setup().await;
    server.set_resource_v1_served(false);
    let err = publish_once(&client, &config(), &demo_devices())
        .await
        .expect_err("nothing can be published");
    let text = format!("{err:#}");
    assert!(
        text.contains("API server does not serve resource.k8s.io/v1; Kubernetes ≥ 1.34 required"),
        "{text}"
    );
}

/// N8: a Node deleted and re-registered gets a new UID, and the garbage collector
/// deletes slices owned by the old one. The publisher must create the replacements
/// with the new UID (it cached the first UID for the life of the process, so every
/// re-created slice was collected again).
#[tokio::test]
async fn slices_recreated_after_the_node_is_re_registered_carry_the_new_node_uid() {
    let (server, client, old_uid) = setup().await;
    let mut publisher = SlicePublisher::new(client, config());
    let devices = demo_devices();
    bounded(LIMIT, "first sync", publisher.sync(&devices))
        .await
        .expect("first sync");
    let owner_uids = |slices: &[Value]| -> Vec<String> {
        slices
            .iter()
            .map(|s| {
                s["metadata"]["ownerReferences"][0]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(
        owner_uids(&stored_slices(&server)),
        std::slice::from_ref(&old_uid)
    );

    // `kubectl delete node`, the kubelet registers it again, the GC collects the slice.
    server.delete("nodes", None, NODE).expect("node deleted");
    let node = server
        .insert(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))
        .expect("node re-registered");
    let new_uid = node["metadata"]["uid"].as_str().expect("uid").to_string();
    assert_ne!(new_uid, old_uid);
    for s in stored_slices(&server) {
        let name = s["metadata"]["name"].as_str().expect("name");
        server
            .delete("resourceslices", None, name)
            .expect("slice collected");
    }

    let outcome = bounded(LIMIT, "sync after GC", publisher.sync(&devices))
        .await
        .expect("sync");
    assert_eq!(outcome.created, 1, "{outcome:?}");
    assert_eq!(owner_uids(&stored_slices(&server)), [new_uid]);
}

/// A client whose requests lose their `fieldSelector`, as through a proxy or server
/// that ignores it: every list returns every slice in the cluster.
fn client_ignoring_field_selectors(server: &fake_apiserver::FakeApiServer) -> kube::Client {
    let mut config = kube::Config::new(server.url().parse().expect("URL"));
    config.default_retry = false;
    let strip = tower::util::MapRequestLayer::new(|mut req: http::Request<kube::client::Body>| {
        let uri = req.uri().clone();
        if let Some(query) = uri.query() {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|kv| !kv.starts_with("fieldSelector="))
                .collect();
            let path_and_query = if kept.is_empty() {
                uri.path().to_string()
            } else {
                format!("{}?{}", uri.path(), kept.join("&"))
            };
            let mut parts = uri.into_parts();
            parts.path_and_query = Some(path_and_query.parse().expect("path and query"));
            *req.uri_mut() = http::Uri::from_parts(parts).expect("uri");
        }
        req
    });
    kube::client::ClientBuilder::try_from(config)
        .expect("client builder")
        .with_layer(&strip)
        .build()
}

fn foreign_slice(name: &str, driver: &str, node: &str, pool: &str) -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": driver, "nodeName": node,
            "pool": {"name": pool, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-0"}]
        }
    })
}

/// L5 (security review): when the list returns slices of another driver on this node
/// and of this driver on another node (field selector ignored), the sync neither
/// updates nor deletes them; only this driver's slices on this node are touched.
#[tokio::test]
async fn sync_leaves_other_drivers_and_other_nodes_slices_alone_when_the_selector_is_ignored() {
    let (server, _, _) = setup().await;
    let client = client_ignoring_field_selectors(&server);
    // Same pool name as ours: the old code took it for our current slice.
    server
        .insert(foreign_slice("nvidia-here", "gpu.nvidia.com", NODE, NODE))
        .expect("insert");
    server
        .insert(foreign_slice(
            "ours-elsewhere",
            DRIVER,
            "other-node",
            "other-node",
        ))
        .expect("insert");
    // Ours, in an obsolete pool: still deleted.
    server
        .insert(foreign_slice("ours-old-pool", DRIVER, NODE, "old-pool"))
        .expect("insert");
    let before_nvidia = server
        .get("resourceslices", None, "nvidia-here")
        .expect("stored");

    let cfg = config();
    let outcome = bounded(
        LIMIT,
        "publish",
        publish_once(&client, &cfg, &demo_devices()),
    )
    .await
    .expect("publish");
    assert_eq!((outcome.created, outcome.deleted), (1, 1), "{outcome:?}");
    assert_eq!(
        server.get("resourceslices", None, "nvidia-here"),
        Some(before_nvidia),
        "another driver's slice was changed"
    );
    assert!(
        server
            .get("resourceslices", None, "ours-elsewhere")
            .is_some(),
        "another node's slice was deleted"
    );
    assert!(
        server
            .get("resourceslices", None, "ours-old-pool")
            .is_none(),
        "our obsolete slice was kept"
    );
    assert_eq!(device_names(&stored_slices(&server)).len(), 7);
}

/// Coexistence: a GPU that another driver on this node publishes too (NVIDIA's
/// driver with PassthroughSupport) is not offered here; the others are, and
/// the sync says which GPU and which driver.
#[tokio::test]
async fn a_gpu_another_driver_publishes_on_this_node_is_not_offered() {
    let (server, client, _) = setup().await;
    let devices = demo_devices();
    let taken = devices[0].bdf.to_string();
    let mut nvidia = foreign_slice("nvidia-gpus", "gpu.nvidia.com", NODE, NODE);
    nvidia["spec"]["devices"] = json!([{
        "name": "gpu-0",
        "attributes": {"resource.kubernetes.io/pciBusID": {"string": taken}}
    }]);
    server.insert(nvidia).expect("insert");
    // Another node's slice naming the same address changes nothing here.
    let mut elsewhere = foreign_slice(
        "nvidia-elsewhere",
        "gpu.nvidia.com",
        "other-node",
        "other-node",
    );
    elsewhere["spec"]["devices"] = json!([{
        "name": "gpu-0",
        "attributes": {"resource.kubernetes.io/pciBusID": {"string": devices[1].bdf.to_string()}}
    }]);
    server.insert(elsewhere).expect("insert");
    let outcome = bounded(LIMIT, "publish", publish_once(&client, &config(), &devices))
        .await
        .expect("publish");
    assert_eq!(
        outcome.published_by_others,
        [(taken.clone(), "gpu.nvidia.com".to_string())]
    );
    let names = device_names(&stored_slices(&server));
    assert_eq!(names.len(), devices.len() - 1, "{names:?}");
    let published: Vec<String> = stored_slices(&server)
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| {
            d["attributes"]["resource.kubernetes.io/pciBusID"]["string"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(!published.contains(&taken), "{published:?}");
}

/// L3 (the policy switch): with admin-owned GPUs hidden, the GPUs found on vfio
/// that the plugin did not put there (the demo host's five pre-bound H100s) are
/// not published at all, and every other GPU is published exactly as by default;
/// the default still offers them (as before). A GPU the plugin moved to vfio for
/// a claim is its own, never hidden.
#[test]
fn hidden_admin_owned_gpus_are_not_published() {
    use vfio_gpu_kubelet::slices::{AdminOwned, device_infos, device_infos_for, is_admin_owned};
    let views = demo_views();
    let names = |d: &[vfio_gpu_kubelet::slices::DeviceInfo]| -> Vec<String> {
        d.iter().map(|d| d.bdf.to_string()).collect()
    };
    let offered = device_infos(&views);
    assert_eq!(
        device_infos_for(&views, AdminOwned::Offer),
        offered,
        "default as today"
    );
    let hidden = device_infos_for(&views, AdminOwned::Hide);
    let admin: Vec<String> = views
        .iter()
        .filter(|v| is_admin_owned(v))
        .map(|v| v.gpu.function.bdf.to_string())
        .collect();
    assert_eq!(
        admin,
        [
            "0000:18:00.0",
            "0000:2a:00.0",
            "0000:3a:00.0",
            "0000:5d:00.0",
            "0000:9a:00.0"
        ],
        "the demo's pre-bound H100s"
    );
    // Invariant: hidden = offered minus exactly the admin-owned ones.
    let expected: Vec<String> = names(&offered)
        .into_iter()
        .filter(|b| !admin.contains(b))
        .collect();
    assert_eq!(names(&hidden), expected);
    assert!(!hidden.is_empty());
    for d in &hidden {
        assert!(
            !d.keep_on_vfio || d.driver.as_deref() != Some("vfio-pci"),
            "{}",
            d.bdf
        );
    }
    // A GPU the plugin moved (a record of ours) is not the admin's.
    let mut ours = views
        .iter()
        .find(|v| v.gpu.function.bdf.to_string() == "0000:ba:00.0")
        .expect("the A100")
        .clone();
    ours.record = Some(vfio_gpu_engine::ledger::GpuRecord::configuring(
        vfio_gpu_engine::Holder::Admin,
        &[ours.gpu.function.clone()],
        &vfio_gpu_host::DriverName::vfio_pci(),
        Default::default(),
        "boot".into(),
        1,
    ));
    assert!(!is_admin_owned(&ours));
}

/// A quarantined GPU as the engine reports it: the demo's A100 with a
/// failed verification on record.
fn quarantined_a100() -> Vec<DeviceInfo> {
    let mut devices = demo_devices();
    let a100 = devices
        .iter_mut()
        .find(|d| d.bdf.to_string() == "0000:ba:00.0")
        .expect("the demo's A100");
    a100.quarantine = Some(vfio_gpu_kubelet::slices::QuarantineTaint {
        cause: vfio_gpu_engine::ledger::QuarantineCause::VerificationFailed,
        reason: "0000:ba:00.0: link trained to x4 of x16".into(),
        since_unix: 1_790_000_000,
        effect: vfio_gpu_kubelet::slices::TaintEffect::NoSchedule,
    });
    devices
}

#[tokio::test]
async fn a_quarantined_gpu_is_published_with_its_taint_where_the_server_keeps_taints() {
    let (server, client, _) = setup().await;
    let devices = quarantined_a100();
    let mut publisher = SlicePublisher::new(client, config());
    bounded(LIMIT, "publish", publisher.sync(&devices))
        .await
        .expect("publish");
    assert_eq!(
        publisher.taint_support(),
        vfio_gpu_kubelet::slices::TaintSupport::Kept
    );
    let slices = stored_slices(&server);
    assert_eq!(slices.len(), 1, "the probe stored nothing: {slices:#?}");
    let names = device_names(&slices);
    assert_eq!(names.len(), devices.len(), "every GPU once: {names:?}");
    assert_eq!(
        device(&slices, "gpu-0000-ba-00-0")["taints"],
        json!([{"key": "vfio-gpu.dra.dev/quarantined", "value": "VerificationFailed",
                "effect": "NoSchedule", "timeAdded": "2026-09-21T14:13:20Z"}])
    );
    for d in devices.iter().filter(|d| d.quarantine.is_none()) {
        assert!(
            device(&slices, &device_name(&d.bdf))
                .get("taints")
                .is_none(),
            "{} untainted",
            d.bdf
        );
    }
    // The Node is told, once (the second sync below posts nothing more).
    let events = || {
        server
            .list("events", Some("default"))
            .into_iter()
            .filter(|e| e["reason"] == "GPUQuarantined")
            .collect::<Vec<_>>()
    };
    let posted = events();
    assert_eq!(posted.len(), 1, "{posted:#?}");
    assert_eq!(posted[0]["regarding"]["name"], NODE);
    assert_eq!(posted[0]["type"], "Warning");
    assert!(
        posted[0]["note"]
            .as_str()
            .is_some_and(|n| n.contains("0000:ba:00.0") && n.contains("VerificationFailed")),
        "{posted:#?}"
    );
    // Stable: a second sync writes nothing (the taint compares equal as stored).
    let again = bounded(LIMIT, "republish", publisher.sync(&devices))
        .await
        .expect("republish");
    assert!(!again.wrote(), "{again:?}");
    assert_eq!(events().len(), 1, "announced once");
    // Cleared by the admin's reset: the taint leaves the slice.
    let cleared = demo_devices();
    bounded(LIMIT, "clear", publisher.sync(&cleared))
        .await
        .expect("clear");
    let slices = stored_slices(&server);
    assert!(
        device(&slices, "gpu-0000-ba-00-0").get("taints").is_none(),
        "{slices:#?}"
    );
}

#[tokio::test]
async fn a_server_that_drops_taints_gets_no_quarantined_gpu_at_all() {
    let (server, client, _) = setup().await;
    server.set_prune_device_taints(true);
    let devices = quarantined_a100();
    let mut publisher = SlicePublisher::new(client, config());
    bounded(LIMIT, "publish", publisher.sync(&devices))
        .await
        .expect("publish");
    assert_eq!(
        publisher.taint_support(),
        vfio_gpu_kubelet::slices::TaintSupport::Pruned
    );
    let names = device_names(&stored_slices(&server));
    assert!(
        !names.contains(&"gpu-0000-ba-00-0".to_string()),
        "{names:?}"
    );
    assert_eq!(names.len(), devices.len() - 1, "{names:?}");
}

#[tokio::test]
async fn a_server_that_starts_dropping_taints_after_the_probe_gets_the_gpu_hidden_at_once() {
    let (server, client, _) = setup().await;
    let mut publisher = SlicePublisher::new(client, config());
    // Probed on a server that kept taints...
    bounded(LIMIT, "publish", publisher.sync(&quarantined_a100()))
        .await
        .expect("publish");
    // ...then the gate goes off and another GPU is quarantined.
    server.set_prune_device_taints(true);
    let mut devices = quarantined_a100();
    if let Some(h100) = devices
        .iter_mut()
        .find(|d| d.bdf.to_string() == "0000:18:00.0")
    {
        h100.quarantine = devices_quarantine();
    }
    let err = bounded(LIMIT, "publish", publisher.sync(&devices)).await;
    assert!(err.is_err(), "the write that lost its taint fails the sync");
    bounded(LIMIT, "retry", publisher.sync(&devices))
        .await
        .expect("retry");
    let names = device_names(&stored_slices(&server));
    assert!(
        !names.contains(&"gpu-0000-ba-00-0".to_string()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"gpu-0000-18-00-0".to_string()),
        "{names:?}"
    );
}

fn devices_quarantine() -> Option<vfio_gpu_kubelet::slices::QuarantineTaint> {
    quarantined_a100().into_iter().find_map(|d| d.quarantine)
}
