//! Shared setup for the ResourceSlice tests: a fake API server with a Node,
//! a real kube client, and the demo host's GPUs as the engine sees them.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use vfio_gpu_engine::GpuView;
use vfio_gpu_host::{GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;
use vfio_gpu_kubelet::slices::{DeviceInfo, SliceConfig, device_infos};

pub const NODE: &str = "demo-node";
pub const DRIVER: &str = "vfio-gpu.dra.dev";

/// A server holding Node `demo-node`, a retrying client, and the node's uid.
pub async fn setup() -> (FakeApiServer, kube::Client, String) {
    // Test builds link both rustls providers; kube needs one chosen. Err just
    // means another test already installed it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = FakeApiServer::start().await.expect("server starts");
    let node = server
        .insert(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))
        .expect("node inserted");
    let uid = node["metadata"]["uid"]
        .as_str()
        .expect("server assigns a uid")
        .to_string();
    let mut config = kube::Config::new(server.url().parse().expect("URL"));
    config.default_retry = true;
    let client = kube::Client::try_from(config).expect("client");
    (server, client, uid)
}

/// Publisher settings with test-sized timings.
pub fn config() -> SliceConfig {
    let mut cfg = SliceConfig::new(DRIVER, NODE);
    cfg.debounce = Duration::from_millis(200);
    cfg.resync = Duration::from_secs(30);
    cfg.max_backoff = Duration::from_secs(2);
    cfg
}

/// The demo host's GPUs as `inspect` reports them.
pub fn demo_views() -> Vec<GpuView> {
    let dir = tempfile::tempdir().expect("tempdir");
    vfio_gpu_host::demo::build_demo_host(dir.path()).expect("demo host");
    let root = HostRoot::open(dir.path()).expect("host root");
    vfio_gpu_engine::inspect(&root, &GpuSelector::default(), &Policy::default(), None)
        .expect("inspect")
        .gpus
}

/// The offerable demo GPUs.
pub fn demo_devices() -> Vec<DeviceInfo> {
    device_infos(&demo_views())
}

/// `n` synthetic GPUs on distinct buses.
pub fn many_devices(n: usize) -> Vec<DeviceInfo> {
    let template = demo_devices().into_iter().next().expect("a demo GPU");
    (0..n)
        .map(|i| {
            let bdf = format!("{:04x}:{:02x}:00.0", i / 256, i % 256);
            DeviceInfo {
                bdf: bdf.parse().expect("valid BDF"),
                iommu_group: 100 + u32::try_from(i).expect("small"),
                ..template.clone()
            }
        })
        .collect()
}

/// This node's slices of this driver as stored, in name order.
pub fn stored_slices(server: &FakeApiServer) -> Vec<Value> {
    server
        .list("resourceslices", None)
        .into_iter()
        .filter(|s| s["spec"]["driver"] == DRIVER && s["spec"]["nodeName"] == NODE)
        .collect()
}

/// Device names across slices, sorted.
pub fn device_names(slices: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = slices
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// Requests that changed something (anything but GET).
pub fn writes(server: &FakeApiServer) -> Vec<String> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// Polls `check` every 50 ms until it returns `Some`, failing the test after `limit`.
pub async fn wait_for<T, F>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Option<T>,
{
    let result = tokio::time::timeout(limit, async {
        loop {
            if let Some(v) = check() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    match result {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Awaits `fut` with a limit.
pub async fn bounded<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
}

/// The pool generation all slices agree on, with the slice count they claim.
pub fn pool_state(slices: &[Value]) -> Option<(i64, i64)> {
    let first = slices.first()?;
    let state = (
        first["spec"]["pool"]["generation"].as_i64()?,
        first["spec"]["pool"]["resourceSliceCount"].as_i64()?,
    );
    slices
        .iter()
        .all(|s| {
            s["spec"]["pool"]["generation"].as_i64() == Some(state.0)
                && s["spec"]["pool"]["resourceSliceCount"].as_i64() == Some(state.1)
        })
        .then_some(state)
}
