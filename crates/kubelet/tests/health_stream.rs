//! `v1alpha1.DRAResourceHealth` over the real DRA socket: the stream starts with every
//! GPU of the demo host healthy, and a GPU whose driver no longer matches the ledger,
//! or that vanished from the bus, turns unhealthy in the next message.

mod plugin_common;

use std::collections::BTreeMap;
use std::time::Duration;

use plugin_common::*;
use tokio_util::sync::CancellationToken;
use vfio_gpu_host::HostRoot;
use vfio_gpu_kubelet::grpc::emulator::{KubeletEmulator, connect_dra};
use vfio_gpu_kubelet::grpc::health_v1alpha1::dra_resource_health_client::DraResourceHealthClient;
use vfio_gpu_kubelet::grpc::health_v1alpha1::{
    HealthStatus, NodeWatchResourcesRequest, NodeWatchResourcesResponse,
};
use vfio_gpu_kubelet::grpc::server::{ServerConfig, serve};
use vfio_gpu_kubelet::health::{HealthConfig, HealthMonitor};
use vfio_gpu_kubelet::metrics::Metrics;
use vfio_gpu_kubelet::plugin::VfioPlugin;

/// device name -> (health, message)
fn by_device(m: &NodeWatchResourcesResponse) -> BTreeMap<String, (HealthStatus, String)> {
    m.devices
        .iter()
        .map(|d| {
            let id = d.device.clone().expect("device identifier");
            assert_eq!(id.pool_name, NODE);
            assert!(d.last_updated_time > 0);
            (id.device_name, (d.health(), d.message.clone()))
        })
        .collect()
}

async fn next(
    stream: &mut tonic::Streaming<NodeWatchResourcesResponse>,
) -> BTreeMap<String, (HealthStatus, String)> {
    let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a message in time")
        .expect("stream ok")
        .expect("stream open");
    by_device(&m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stream_reports_driver_mismatch_and_removal() {
    let env = Env::new().await;
    let engine = env.engine();
    let metrics = Metrics::new();
    let token = CancellationToken::new();
    let feed = HealthMonitor::start(
        engine.clone(),
        metrics.clone(),
        Duration::from_millis(100),
        token.clone(),
    )
    .await;
    let mut config = env.plugin_config();
    config.metrics = metrics.clone();
    let plugin = VfioPlugin::new(engine, env.client.clone(), config);
    let mut server_config = ServerConfig::new(DRIVER, &env.path("plugins"), &env.path("registry"));
    server_config.health = Some(HealthConfig {
        feed,
        pool: NODE.into(),
        resend: Duration::from_secs(3600),
    });
    let server = serve(server_config, plugin, token.clone())
        .await
        .expect("server starts");
    let kubelet = KubeletEmulator::new(&server.registration_socket)
        .register()
        .await
        .expect("registers");

    let channel = connect_dra(server.dra_socket.to_str().expect("utf-8 path"))
        .await
        .expect("DRA socket");
    let mut client = DraResourceHealthClient::new(channel);
    let mut stream = client
        .node_watch_resources(NodeWatchResourcesRequest {})
        .await
        .expect("stream opens")
        .into_inner();

    let first = next(&mut stream).await;
    assert_eq!(first.len(), 8, "every demo GPU: {first:?}");
    for (name, (health, message)) in &first {
        assert_eq!(*health, HealthStatus::Healthy, "{name}: {message}");
    }
    assert!(first.contains_key(&dev(AB)));

    // A prepared GPU is on vfio-pci as the ledger says: still healthy, no message.
    let claim = env.claim("vm", &[("gpu", AB)]);
    let r = kubelet
        .prepare(std::slice::from_ref(&claim))
        .await
        .expect("rpc");
    assert!(r[&claim.uid].is_ok(), "{r:?}");

    // Someone unbinds it behind the plugin's back.
    let root = HostRoot::open(&env.host).expect("host root");
    std::fs::remove_file(root.pci_device_dir(&bdf(AB)).join("driver")).expect("unbind");
    let m = next(&mut stream).await;
    assert_eq!(m.len(), 8);
    let (health, message) = &m[&dev(AB)];
    assert_eq!(*health, HealthStatus::Unhealthy, "{message}");
    assert!(message.contains("ledger"), "{message}");
    for (name, (h, _)) in m.iter().filter(|(n, _)| **n != dev(AB)) {
        assert_eq!(*h, HealthStatus::Healthy, "{name}");
    }

    // A GPU falls off the bus: still listed, unhealthy.
    env.kernel.remove_device(bdf(BA)).expect("remove");
    let m = next(&mut stream).await;
    assert_eq!(m.len(), 8, "a vanished GPU stays in the list");
    let (health, message) = &m[&dev(BA)];
    assert_eq!(*health, HealthStatus::Unhealthy);
    assert!(message.contains("no longer present"), "{message}");

    // The gauge follows.
    let text = metrics.encode();
    assert!(text.contains("vfio_gpu_dra_unhealthy_devices 2"), "{text}");

    token.cancel();
    // The stream ends with the monitor, so shutdown is not held up by it.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await;
    assert!(end.is_ok(), "health stream ends on shutdown");
    tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("server stops in time")
        .expect("server stops cleanly");
}

/// N1: kubelet 1.37 opens the health stream only for an advertised health service, so
/// GetInfo must list `v1.DRAResourceHealth` and `v1alpha1.DRAResourceHealth` next to the
/// DRAPlugin versions (which keep their order and the kubelet's choice), and the v1
/// service must stream the same devices as v1alpha1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_advertises_both_health_versions_and_v1_streams() {
    use vfio_gpu_kubelet::grpc::emulator::DraVersion;
    use vfio_gpu_kubelet::grpc::health_v1;

    let env = Env::new().await;
    let engine = env.engine();
    let token = CancellationToken::new();
    let feed = HealthMonitor::start(
        engine.clone(),
        Metrics::new(),
        Duration::from_millis(100),
        token.clone(),
    )
    .await;
    let plugin = VfioPlugin::new(engine, env.client.clone(), env.plugin_config());
    let mut server_config = ServerConfig::new(DRIVER, &env.path("plugins"), &env.path("registry"));
    server_config.health = Some(HealthConfig {
        feed,
        pool: NODE.into(),
        resend: Duration::from_secs(3600),
    });
    let server = serve(server_config, plugin, token.clone())
        .await
        .expect("server starts");
    let kubelet = KubeletEmulator::new(&server.registration_socket)
        .register()
        .await
        .expect("registers");
    assert_eq!(
        kubelet.info.supported_versions,
        [
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1.DRAResourceHealth",
            "v1alpha1.DRAResourceHealth"
        ]
    );
    assert_eq!(kubelet.version, DraVersion::V1);

    let channel = connect_dra(server.dra_socket.to_str().expect("utf-8 path"))
        .await
        .expect("DRA socket");
    let mut client = health_v1::dra_resource_health_client::DraResourceHealthClient::new(channel);
    let mut stream = client
        .node_watch_resources(health_v1::NodeWatchResourcesRequest {})
        .await
        .expect("v1 stream opens")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a message in time")
        .expect("stream ok")
        .expect("stream open");
    assert_eq!(first.devices.len(), 8, "every demo GPU: {first:?}");
    for d in &first.devices {
        let id = d.device.clone().expect("device identifier");
        assert_eq!(id.pool_name, NODE);
        assert_eq!(d.health(), health_v1::HealthStatus::Healthy, "{d:?}");
        assert!(d.last_updated_time > 0 && d.health_check_timeout_seconds > 0);
    }
    assert!(first.devices.iter().any(|d| {
        d.device
            .as_ref()
            .is_some_and(|id| id.device_name == dev(AB))
    }));

    token.cancel();
    drop(stream);
    tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("server stops in time")
        .expect("server stops cleanly");
}

/// N3: the health scan reads each GPU's config space, which blocks while a reset
/// holds the device lock. That read must be bounded: the blocked GPU is reported
/// UNHEALTHY ("config read timed out") and every other GPU is still reported, instead
/// of the scan hanging and the kubelet turning all devices Unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_read_that_blocks_makes_only_that_gpu_unhealthy() {
    use vfio_gpu_engine::{CrashMode, Engine, EngineConfig};
    use vfio_gpu_host::GpuSelector;
    use vfio_gpu_intent::Policy;
    use vfio_gpu_kubelet::health::{Health, scan_bounded};

    let env = Env::new().await;
    let config = EngineConfig {
        crash_mode: CrashMode::Return,
        read_deadline: Duration::from_millis(300),
        ..EngineConfig::default()
    };
    let (engine, _) = Engine::open(
        std::sync::Arc::new(env.kernel.clone()),
        &env.state_dir(),
        GpuSelector::default(),
        Policy::default(),
        config,
    )
    .expect("engine opens");
    let (views, _) = engine.discover().expect("discover");
    // A FIFO: opening it for reading blocks until a writer comes, like a config
    // read behind a held device lock.
    let root = HostRoot::open(&env.host).expect("host root");
    let fifo = root.pci_device_dir(&bdf(AB)).join("config");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo {}", fifo.display());

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = BTreeMap::new();
        let _ = tx.send(scan_bounded(&engine, &views, &mut seen));
    });
    let report = rx.recv_timeout(Duration::from_secs(10));
    // Let the blocked reader go, whatever happened.
    let unblock = fifo.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        if let Ok(mut w) = std::fs::OpenOptions::new().write(true).open(unblock) {
            let _ = w.write_all(&[0xde, 0x10]);
        }
    });
    let report = report.expect("the scan returns despite the blocked read");
    assert_eq!(report.devices.len(), 8);
    for d in &report.devices {
        if d.device_name == dev(AB) {
            assert_eq!(d.health, Health::Unhealthy);
            assert!(d.message.contains("config read timed out"), "{}", d.message);
        } else {
            assert_eq!(
                d.health,
                Health::Healthy,
                "{}: {}",
                d.device_name,
                d.message
            );
        }
    }
}

/// `gpu_owner` names the pod too: the plugin reads the claim at prepare and
/// keeps the one pod of its `status.reservedFor` for the next device scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_gauge_names_the_pod_the_prepared_claim_is_reserved_for() {
    use serde_json::json;
    use vfio_gpu_kubelet::grpc::dra::ClaimRef;

    let env = Env::new().await;
    let engine = env.engine();
    let metrics = Metrics::new();
    let mut config = env.plugin_config();
    config.metrics = metrics.clone();
    let plugin = VfioPlugin::new(engine.clone(), env.client.clone(), config);
    let stored = env
        .api
        .insert(json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": "vm-a-gpu", "namespace": NS},
            "spec": {"devices": {"requests": [
                {"name": "gpu", "exactly": {"deviceClassName": "vfio-gpu"}}]}},
            "status": {
                "allocation": {"devices": {"results": [
                    {"request": "gpu", "driver": DRIVER, "pool": NODE, "device": dev(AB)}]}},
                "reservedFor": [{"resource": "pods", "name": "virt-launcher-vm-a-x7k2p", "uid": "p1"}]
            }
        }))
        .expect("claim inserted");
    let claim = ClaimRef {
        uid: stored["metadata"]["uid"].as_str().expect("uid").to_string(),
        namespace: NS.into(),
        name: "vm-a-gpu".into(),
    };
    plugin.prepare_claim(&claim).await.expect("prepared");
    let views = engine.discover().expect("discover").0;
    metrics.record_scan(&views, 0, Duration::from_millis(1));
    let text = metrics.encode();
    let owner: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("vfio_gpu_dra_gpu_owner{"))
        .collect();
    assert_eq!(
        owner,
        [format!(
            "vfio_gpu_dra_gpu_owner{{gpu=\"{AB}\",namespace=\"{NS}\",claim=\"vm-a-gpu\",pod=\"virt-launcher-vm-a-x7k2p\"}} 1"
        )],
        "{text}"
    );
}
