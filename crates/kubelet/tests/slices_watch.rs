//! `run_publisher` end to end: it repairs slices the kubelet deletes, follows
//! device list changes, survives API outages, and stops on shutdown.

mod slices_common;

use std::time::Duration;

use fake_apiserver::FakeApiServer;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::Value;
use slices_common::*;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vfio_gpu_kubelet::slices::{DeviceInfo, SliceConfig, run_publisher};

const LIMIT: Duration = Duration::from_secs(20);

struct Running {
    devices: watch::Sender<Vec<DeviceInfo>>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn start(client: kube::Client, cfg: SliceConfig, devices: Vec<DeviceInfo>) -> Self {
        let (tx, rx) = watch::channel(devices);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_publisher(client, cfg, rx, shutdown.clone()));
        Self {
            devices: tx,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        bounded(Duration::from_secs(5), "publisher stops", self.task)
            .await
            .expect("publisher task joins")
            .expect("publisher returns Ok");
    }
}

/// Waits until the stored slices hold exactly `names` in one complete pool;
/// returns the slices and the pool generation.
async fn wait_published(server: &FakeApiServer, names: &[String], what: &str) -> (Vec<Value>, i64) {
    wait_for(LIMIT, what, || {
        let slices = stored_slices(server);
        let (generation, count) = pool_state(&slices)?;
        (usize::try_from(count).ok() == Some(slices.len()) && device_names(&slices) == names)
            .then_some((slices, generation))
    })
    .await
}

/// An engine on a fresh demo host (simulated kernel), with its kernel.
fn demo_engine(
    dir: &std::path::Path,
) -> (
    vfio_gpu_engine::sim::SimKernel,
    std::sync::Arc<vfio_gpu_engine::Engine>,
) {
    use vfio_gpu_engine::sim::SimKernel;
    use vfio_gpu_engine::{Engine, EngineConfig};
    use vfio_gpu_host::{GpuSelector, HostRoot};
    let host = dir.join("host");
    std::fs::create_dir_all(&host).expect("host dir");
    vfio_gpu_host::demo::build_demo_host(&host).expect("demo host");
    let kernel = SimKernel::booted(HostRoot::open(&host).expect("host root"));
    let (engine, _) = Engine::open(
        std::sync::Arc::new(kernel.clone()),
        &dir.join("state"),
        GpuSelector::default(),
        vfio_gpu_intent::Policy::default(),
        EngineConfig::default(),
    )
    .expect("engine");
    (kernel, std::sync::Arc::new(engine))
}

fn names_of(devices: &[DeviceInfo]) -> Vec<String> {
    let mut names: Vec<String> = devices
        .iter()
        .map(|d| vfio_gpu_kubelet::slices::device_name(&d.bdf))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn slices_deleted_by_the_kubelet_come_back() {
    let (server, client, _) = setup().await;
    let devices = demo_devices();
    let names = names_of(&devices);
    let running = Running::start(client.clone(), config(), devices);
    let (first, generation) = wait_published(&server, &names, "first publish").await;
    assert_eq!(generation, 1);

    // What the kubelet does at start or when the plugin has been unusable.
    let api: Api<ResourceSlice> = Api::all(client.clone());
    let deleted = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}")),
        )
        .await
        .expect("delete collection")
        .left()
        .expect("deleted list");
    assert_eq!(deleted.items.len(), 1);

    let (again, generation) = wait_published(&server, &names, "re-created slice").await;
    assert_eq!(generation, 1, "a fresh pool starts at generation 1");
    assert_ne!(
        again[0]["metadata"]["uid"], first[0]["metadata"]["uid"],
        "a new object"
    );
    running.stop().await;
}

#[tokio::test]
async fn device_list_changes_are_published() {
    let (server, client, _) = setup().await;
    let devices = many_devices(300);
    let running = Running::start(client, config(), devices.clone());
    let (slices, generation) =
        wait_published(&server, &names_of(&devices), "300 devices in 3 slices").await;
    assert_eq!((slices.len(), generation), (3, 1));
    let old_uids: Vec<Value> = slices
        .iter()
        .map(|s| s["metadata"]["uid"].clone())
        .collect();

    // Fewer devices reshape the pool: a new generation, old slices gone.
    let fewer = devices[..200].to_vec();
    running.devices.send_replace(fewer.clone());
    let (slices, generation) =
        wait_published(&server, &names_of(&fewer), "200 devices in 2 slices").await;
    assert_eq!((slices.len(), generation), (2, 2));
    let survivors = slices
        .iter()
        .filter(|s| old_uids.contains(&s["metadata"]["uid"]))
        .count();
    assert_eq!(survivors, 1, "one slice updated in place, two deleted");

    // Back to a handful: one slice, yet another generation.
    let few = demo_devices();
    running.devices.send_replace(few.clone());
    let (slices, generation) = wait_published(&server, &names_of(&few), "demo devices").await;
    assert_eq!((slices.len(), generation), (1, 3));

    // A changed attribute on a lone slice: updated in place, same generation.
    let mut changed = few.clone();
    changed[0].keep_on_vfio = !changed[0].keep_on_vfio;
    let want = changed[0].keep_on_vfio;
    let uid = slices[0]["metadata"]["uid"].clone();
    running.devices.send_replace(changed);
    let slices = wait_for(LIMIT, "attribute update", || {
        let slices = stored_slices(&server);
        let d = slices.first()?["spec"]["devices"].get(0)?.clone();
        (d["attributes"]["keepOnVfio"]["bool"] == want).then_some(slices)
    })
    .await;
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0]["metadata"]["uid"], uid);
    assert_eq!(pool_state(&slices), Some((3, 1)));
    running.stop().await;
}

#[tokio::test]
async fn converges_after_the_api_server_was_unavailable() {
    let (server, client, _) = setup().await;
    let devices = demo_devices();
    let names = names_of(&devices);

    // Down from the start: nothing can be published, nothing may crash.
    server.set_unavailable(true);
    let running = Running::start(client.clone(), config(), devices);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!running.task.is_finished(), "the publisher keeps running");
    assert!(stored_slices(&server).is_empty());
    server.set_unavailable(false);
    let (first, _) = wait_published(&server, &names, "publish after the outage").await;

    // Slices wiped while the server is down (the watch cannot see it) come
    // back once the watch reconnects and re-lists.
    server.set_unavailable(true);
    let name = first[0]["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    assert!(server.delete("resourceslices", None, &name).is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.set_unavailable(false);
    let (again, _) = wait_published(&server, &names, "re-created after the outage").await;
    assert_ne!(again[0]["metadata"]["name"], first[0]["metadata"]["name"]);

    // Connections refused instead of 503s: same outcome.
    server.set_refuse_connections(true);
    let name = again[0]["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    assert!(server.delete("resourceslices", None, &name).is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.set_refuse_connections(false);
    wait_published(&server, &names, "re-created after refused connections").await;
    running.stop().await;
}

#[tokio::test]
async fn a_tampered_slice_is_repaired_in_place() {
    let (server, client, _) = setup().await;
    let devices = demo_devices();
    let names = names_of(&devices);
    let running = Running::start(client, config(), devices);
    let (first, _) = wait_published(&server, &names, "first publish").await;

    // Someone empties the slice: the watch sees it and the lone slice is
    // rewritten in place, keeping its generation.
    let mut tampered = first[0].clone();
    tampered["spec"]["devices"] = serde_json::json!([]);
    server.insert(tampered).expect("tamper");
    let (fixed, generation) = wait_published(&server, &names, "repaired slice").await;
    assert_eq!(fixed[0]["metadata"]["uid"], first[0]["metadata"]["uid"]);
    assert_eq!(generation, 1);
    running.stop().await;
}

#[tokio::test]
async fn shutdown_stops_the_publisher_even_while_the_server_is_down() {
    let (server, client, _) = setup().await;
    server.set_refuse_connections(true);
    let running = Running::start(client, config(), demo_devices());
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.stop().await;
}

/// N7 (Kubernetes review): moving a GPU to vfio-pci for a claim used to flip its
/// published `driver` from nvidia to vfio-pci, rewriting the slice on every prepare.
/// The slice now stays as it was: same devices, same attributes, same object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_for_a_claim_leaves_the_published_slice_unchanged() {
    use vfio_gpu_engine::Holder;
    use vfio_gpu_kubelet::slices::watch_engine_devices;

    let (server, client, _) = setup().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_kernel, engine) = demo_engine(dir.path());

    let shutdown = CancellationToken::new();
    let devices = watch_engine_devices(
        engine.clone(),
        Duration::from_millis(200),
        vfio_gpu_kubelet::slices::AdminOwned::Offer,
        shutdown.clone(),
    )
    .await;
    assert_eq!(names_of(&devices.borrow()), names_of(&demo_devices()));
    let task = tokio::spawn(run_publisher(client, config(), devices, shutdown.clone()));
    let a100_driver = |server: &FakeApiServer| {
        stored_slices(server)
            .iter()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .find(|d| d["name"] == "gpu-0000-ba-00-0")
            .and_then(|d| {
                d["attributes"]["driver"]["string"]
                    .as_str()
                    .map(str::to_string)
            })
    };
    wait_for(LIMIT, "A100 published on nvidia", || {
        (a100_driver(&server).as_deref() == Some("nvidia")).then_some(())
    })
    .await;
    let before = stored_slices(&server);

    let mover = engine.clone();
    tokio::task::spawn_blocking(move || {
        mover.configure(
            "0000:ba:00.0".parse().expect("bdf"),
            Holder::Claim {
                uid: "claim-uid".into(),
                namespace: "default".into(),
                name: "vm-gpu".into(),
            },
        )
    })
    .await
    .expect("join")
    .expect("A100 moved to vfio");
    // The engine watch polls every 200 ms and the publisher debounces 200 ms: a
    // change would be written well within this.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a100_driver(&server).as_deref(), Some("nvidia"));
    assert_eq!(stored_slices(&server), before, "the slice was rewritten");

    shutdown.cancel();
    bounded(Duration::from_secs(5), "publisher stops", task)
        .await
        .expect("join")
        .expect("Ok");
}

/// Coexistence for `doctor` and `explain`: the running publisher records in
/// the state directory which GPU another driver on this node publishes, and
/// rewrites the record when that driver's slice goes away.
#[tokio::test]
async fn the_gpus_another_driver_publishes_are_recorded_for_doctor_and_explain() {
    use vfio_gpu_node::OtherDrivers;
    let (server, client, _) = setup().await;
    let devices = demo_devices();
    let taken = devices[0].bdf.to_string();
    server
        .insert(serde_json::json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": "nvidia-gpus"},
            "spec": {
                "driver": "gpu.nvidia.com", "nodeName": NODE,
                "pool": {"name": NODE, "generation": 1, "resourceSliceCount": 1},
                "devices": [{"name": "gpu-0",
                    "attributes": {"resource.kubernetes.io/pciBusID": {"string": taken}}}]
            }
        }))
        .expect("insert");
    let state = tempfile::tempdir().expect("tempdir");
    let mut cfg = config();
    cfg.other_drivers_record = Some(state.path().to_path_buf());
    // Another driver's slices are not watched: the periodic re-sync notices.
    cfg.resync = Duration::from_millis(500);
    let running = Running::start(client, cfg, devices.clone());
    let record = wait_for(LIMIT, "the record names the other driver", || {
        OtherDrivers::read(state.path()).ok().flatten()
    })
    .await;
    assert_eq!(
        record.gpus.into_iter().collect::<Vec<_>>(),
        [(taken.clone(), "gpu.nvidia.com".to_string())]
    );
    assert!(record.observed_at_unix > 0);

    // NVIDIA's driver stops publishing it: the next sync says so.
    server
        .delete("resourceslices", None, "nvidia-gpus")
        .expect("delete");
    wait_for(LIMIT, "the record is emptied", || {
        OtherDrivers::read(state.path())
            .ok()
            .flatten()
            .filter(|r| r.gpus.is_empty())
    })
    .await;
    running.stop().await;
}

/// A device list taken while a claim's GPU was being released hid it until the
/// next periodic re-discovery (10 s in `serve`; the allocator could not place
/// claims meanwhile, seen in tests/k8s). The watch now re-discovers as soon as
/// the engine writes its ledger: a GPU quarantined at release shows at once,
/// with an interval of an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_list_follows_a_release_at_once_not_at_the_next_interval() {
    use vfio_gpu_engine::Holder;
    use vfio_gpu_engine::kernel::WriteKind;
    use vfio_gpu_engine::sim::{Fault, FaultAction};
    use vfio_gpu_kubelet::slices::watch_engine_devices;

    let dir = tempfile::tempdir().expect("tempdir");
    let (kernel, engine) = demo_engine(dir.path());
    let shutdown = CancellationToken::new();
    let mut devices = watch_engine_devices(
        engine.clone(),
        Duration::from_secs(3600),
        vfio_gpu_kubelet::slices::AdminOwned::Offer,
        shutdown.clone(),
    )
    .await;
    let gpu: vfio_gpu_host::Bdf = "0000:ba:00.0".parse().expect("bdf");
    let quarantined = |list: &[DeviceInfo]| {
        list.iter()
            .find(|d| d.bdf == gpu)
            .is_some_and(|d| d.quarantine.is_some())
    };
    assert!(!quarantined(&devices.borrow_and_update()));
    kernel.inject(Fault::on(WriteKind::Reset, gpu, FaultAction::Fail(5)));
    let mover = engine.clone();
    tokio::task::spawn_blocking(move || {
        let claim = Holder::Claim {
            uid: "claim-uid".into(),
            namespace: "default".into(),
            name: "vm-gpu".into(),
        };
        mover.configure(gpu, claim.clone())?;
        mover.unconfigure(gpu, Some(&claim))
    })
    .await
    .expect("join")
    .expect("released (to quarantine)");
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if quarantined(&devices.borrow_and_update()) {
                return;
            }
            if devices.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "the list did not follow the release");
    assert!(quarantined(&devices.borrow()));
    shutdown.cancel();
}
