//! What the prepare benches share: a plugin behind a registered DRA socket on a
//! demo host, its claims in the fake API server.
// Each bench compiles this module and uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use fake_apiserver::FakeApiServer;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use vfio_gpu_engine::Engine;
use vfio_gpu_kubelet::grpc::dra::{ClaimRef, DraBackend};
use vfio_gpu_kubelet::grpc::emulator::{KubeletEmulator, RegisteredPlugin};
use vfio_gpu_kubelet::grpc::server::{ServerConfig, ServerHandle, serve};
use vfio_gpu_kubelet::plugin::{PluginConfig, VfioPlugin};

pub const DRIVER: &str = "vfio-gpu.dra.dev";
pub const NODE: &str = "demo-node";

/// A fresh directory; `BENCH_DIR=/dev/shm` puts it (ledger, CDI files) on tmpfs:
/// the plugin's own cost without the disk's fsync latency.
pub fn bench_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(match std::env::var("BENCH_DIR") {
        Ok(parent) => tempfile::tempdir_in(parent)?,
        Err(_) => tempfile::tempdir()?,
    })
}

/// Stores an allocated claim in namespace `vms`: one request per device,
/// named `gpu0`, `gpu1`, ….
pub fn store_claim(api: &FakeApiServer, name: &str, devices: &[&str]) -> anyhow::Result<ClaimRef> {
    let requests: Vec<_> = (0..devices.len())
        .map(|i| json!({"name": format!("gpu{i}"), "exactly": {"deviceClassName": "vfio-gpu"}}))
        .collect();
    let results: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| json!({"request": format!("gpu{i}"), "driver": DRIVER, "pool": NODE, "device": d}))
        .collect();
    let stored = api.insert(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "vms"},
        "spec": {"devices": {"requests": requests}},
        "status": {"allocation": {"devices": {"results": results}}}
    }))?;
    Ok(ClaimRef {
        uid: stored["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        namespace: "vms".into(),
        name: name.into(),
    })
}

/// A running plugin and the kubelet that registered it.
pub struct Node {
    pub plugin: Arc<VfioPlugin>,
    pub kubelet: RegisteredPlugin,
    pub token: CancellationToken,
    pub server: ServerHandle,
}

impl Node {
    /// Serves `engine` under `dir` (state in `dir/plugins/<driver>`, CDI files in
    /// `dir/cdi`), reading claims from `api`, and registers it.
    pub async fn start(dir: &Path, engine: Engine, api: &FakeApiServer) -> anyhow::Result<Node> {
        let mut config = kube::Config::new(api.url().parse()?);
        config.default_retry = false;
        let client = kube::Client::try_from(config)?;
        let mut pc = PluginConfig::new(DRIVER, NODE);
        pc.cdi_root = dir.join("cdi");
        pc.data_dir = dir.join("plugins").join(DRIVER);
        let plugin = VfioPlugin::new(Arc::new(engine), client, pc);
        let token = CancellationToken::new();
        let server = serve(
            ServerConfig::new(DRIVER, &dir.join("plugins"), &dir.join("registry")),
            Arc::clone(&plugin) as Arc<dyn DraBackend>,
            token.clone(),
        )
        .await?;
        let kubelet = KubeletEmulator::new(&server.registration_socket)
            .register()
            .await?;
        Ok(Node {
            plugin,
            kubelet,
            token,
            server,
        })
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.server.wait().await?;
        Ok(())
    }
}
