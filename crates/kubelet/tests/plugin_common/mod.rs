//! Shared fixture for the plugin tests: the demo host with the simulated kernel, a
//! fake API server reached by the real kube client, and the plugin served over real
//! Unix sockets, registered through the kubelet emulator.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{CrashMode, Engine, EngineConfig};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot, PciFunction};
use vfio_gpu_intent::Policy;
use vfio_gpu_kubelet::grpc::dra::{ClaimRef, PrepareResults, UnprepareResults};
use vfio_gpu_kubelet::grpc::emulator::{KubeletEmulator, RegisteredPlugin};
use vfio_gpu_kubelet::grpc::server::{ServerConfig, ServerHandle, serve};
use vfio_gpu_kubelet::plugin::{PluginConfig, VfioPlugin};

pub const DRIVER: &str = "vfio-gpu.dra.dev";
pub const NODE: &str = "demo-node";
pub const NS: &str = "vms";

/// RTX 6000 Ada on nvidia, with its HDA function in the same group.
pub const AB: &str = "0000:ab:00.0";
pub const AB_AUDIO: &str = "0000:ab:00.1";
/// A100 on nvidia.
pub const BA: &str = "0000:ba:00.0";
/// H100 pre-bound to vfio-pci by `vfio-pci.ids` on the kernel command line.
pub const H100: &str = "0000:18:00.0";
/// L4 sharing its IOMMU group with a NIC.
pub const L4: &str = "0000:db:00.0";

pub fn bdf(s: &str) -> Bdf {
    s.parse().expect("valid BDF")
}

pub fn dev(s: &str) -> String {
    vfio_gpu_kubelet::plugin::device_name(&bdf(s))
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub host: PathBuf,
    pub kernel: SimKernel,
    pub api: FakeApiServer,
    pub client: kube::Client,
    /// The engine's Fabric Manager (the HGX host only, [`Env::new_hgx`]).
    pub fabric: Option<vfio_gpu_engine::FabricConfig>,
}

pub struct Running {
    pub plugin: Arc<VfioPlugin>,
    pub kubelet: RegisteredPlugin,
    pub token: CancellationToken,
    pub server: ServerHandle,
}

impl Running {
    /// The kubelet's NodePrepareResources for one claim, over the negotiated
    /// version; panics when the call itself fails (not the claim's result).
    pub async fn prepare_one(&self, claim: &ClaimRef) -> PrepareResults {
        self.kubelet
            .prepare(std::slice::from_ref(claim))
            .await
            .expect("rpc")
    }

    /// The kubelet's NodeUnprepareResources for one claim, as [`Self::prepare_one`].
    pub async fn unprepare_one(&self, claim: &ClaimRef) -> UnprepareResults {
        self.kubelet
            .unprepare(std::slice::from_ref(claim))
            .await
            .expect("rpc")
    }

    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server.wait())
            .await
            .expect("server stops in time")
            .expect("server stops cleanly");
    }
}

impl Env {
    pub async fn new() -> Env {
        Env::with_host(|h| vfio_gpu_host::demo::build_demo_host(h).map(|_| ())).await
    }

    /// The HGX demo host (8 × H100 SXM, NVSwitches); set [`Env::fabric`] for FM.
    pub async fn new_hgx() -> Env {
        Env::with_host(|h| vfio_gpu_host::demo::build_hgx_demo_host(h).map(|_| ())).await
    }

    async fn with_host(build: impl FnOnce(&Path) -> std::io::Result<()>) -> Env {
        vfio_gpu_kubelet::serve::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let host = dir.path().join("host");
        std::fs::create_dir_all(&host).expect("host dir");
        build(&host).expect("demo host");
        let kernel = SimKernel::booted(HostRoot::open(&host).expect("host root"));
        let api = FakeApiServer::start().await.expect("fake API server");
        let mut config = kube::Config::new(api.url().parse().expect("url"));
        // Fail fast on 503 instead of kube's backoff loop.
        config.default_retry = false;
        config.read_timeout = Some(Duration::from_secs(5));
        config.connect_timeout = Some(Duration::from_secs(5));
        let client = kube::Client::try_from(config).expect("client");
        Env {
            dir,
            host,
            kernel,
            api,
            client,
            fabric: None,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    pub fn cdi_root(&self) -> PathBuf {
        self.path("cdi")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.path("plugins").join(DRIVER)
    }

    pub fn engine(&self) -> Arc<Engine> {
        self.engine_with(None)
    }

    /// An engine on this host that "dies" (returns) after `step` host
    /// mutations, as a crashed prepare would leave the host and the ledger.
    pub fn engine_crashing_after(&self, step: u64) -> Arc<Engine> {
        self.engine_with(Some(step))
    }

    fn engine_with(&self, crash_after_step: Option<u64>) -> Arc<Engine> {
        let config = EngineConfig {
            crash_after_step,
            crash_mode: CrashMode::Return,
            unbind_lock_backoff: Duration::from_millis(1),
            state_lock_wait: Duration::from_secs(5),
            fabric: self.fabric.clone(),
            ..EngineConfig::default()
        };
        let (engine, _) = Engine::open(
            Arc::new(self.kernel.clone()),
            &self.state_dir(),
            GpuSelector::default(),
            Policy::default(),
            config,
        )
        .expect("engine opens");
        Arc::new(engine)
    }

    pub fn plugin_config(&self) -> PluginConfig {
        let mut c = PluginConfig::new(DRIVER, NODE);
        c.cdi_root = self.cdi_root();
        c.data_dir = self.state_dir();
        c.api_timeout = Duration::from_secs(5);
        c
    }

    pub fn plugin(&self) -> Arc<VfioPlugin> {
        VfioPlugin::new(self.engine(), self.client.clone(), self.plugin_config())
    }

    /// Serves a fresh engine + plugin on the real sockets and registers it like the
    /// kubelet (percent-encoded `:authority`).
    pub async fn start(&self) -> Running {
        self.start_with(self.plugin_config()).await
    }

    /// [`Env::start`] with plugin settings of the test's choice.
    pub async fn start_with(&self, config: PluginConfig) -> Running {
        let plugin = VfioPlugin::new(self.engine(), self.client.clone(), config);
        let token = CancellationToken::new();
        let server = serve(
            ServerConfig::new(DRIVER, &self.path("plugins"), &self.path("registry")),
            plugin.clone(),
            token.clone(),
        )
        .await
        .expect("server starts");
        let kubelet = KubeletEmulator::new(&server.registration_socket)
            .register()
            .await
            .expect("kubelet registers the plugin");
        Running {
            plugin,
            kubelet,
            token,
            server,
        }
    }

    /// Inserts an allocated claim; `results` are (request, driver, pool, device).
    /// Returns the claim reference with the server-assigned UID.
    pub fn claim_with(
        &self,
        name: &str,
        results: &[(&str, &str, &str, &str)],
        config: Value,
        annotations: Value,
    ) -> ClaimRef {
        let results: Vec<Value> = results
            .iter()
            .map(|(request, driver, pool, device)| {
                json!({"request": request, "driver": driver, "pool": pool, "device": device})
            })
            .collect();
        let requests: Vec<Value> = results
            .iter()
            .map(|r| {
                let name = r["request"].as_str().unwrap_or_default();
                json!({"name": name.split('/').next().unwrap_or(name),
                       "exactly": {"deviceClassName": "vfio-gpu"}})
            })
            .collect();
        let stored = self
            .api
            .insert(json!({
                "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                "metadata": {"name": name, "namespace": NS, "annotations": annotations},
                "spec": {"devices": {"requests": requests}},
                "status": {"allocation": {"devices": {"results": results, "config": config}}}
            }))
            .expect("claim inserted");
        ClaimRef {
            uid: stored["metadata"]["uid"]
                .as_str()
                .expect("uid assigned")
                .to_string(),
            namespace: NS.into(),
            name: name.into(),
        }
    }

    /// A claim for our driver on this node: (request, GPU address).
    pub fn claim(&self, name: &str, gpus: &[(&str, &str)]) -> ClaimRef {
        let devices: Vec<String> = gpus.iter().map(|(_, b)| dev(b)).collect();
        let results: Vec<(&str, &str, &str, &str)> = gpus
            .iter()
            .zip(&devices)
            .map(|((r, _), d)| (*r, DRIVER, NODE, d.as_str()))
            .collect();
        self.claim_with(name, &results, json!([]), json!({}))
    }

    pub fn driver_of(&self, b: &str) -> Option<String> {
        let root = HostRoot::open(&self.host).expect("host root");
        PciFunction::read(&root, bdf(b))
            .expect("function readable")
            .driver
            .map(|d| d.to_string())
    }

    pub fn cdi_files(&self) -> Vec<String> {
        list(&self.cdi_root())
    }

    pub fn claim_spec_path(&self, uid: &str) -> PathBuf {
        self.cdi_root().join(format!("{DRIVER}-claim_{uid}.json"))
    }
}

pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Loads and validates a CDI spec with the reference crate (schema + minimum version)
/// and returns it as JSON.
pub fn validated_spec(path: &Path) -> Value {
    container_device_interface::spec::read_spec(&path.to_path_buf(), 10)
        .unwrap_or_else(|e| panic!("CDI spec {} is invalid: {e:#}", path.display()));
    let bytes = std::fs::read(path).expect("spec readable");
    serde_json::from_slice(&bytes).expect("spec is JSON")
}

/// The CDI device named `name` in `spec`.
pub fn spec_device<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no CDI device {name} in {spec:#}"))
}

pub fn device_nodes(edits: &Value) -> Vec<String> {
    edits["deviceNodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n["path"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The IOMMU group number of a function on the fixture host.
pub fn group_of(env: &Env, b: &str) -> u32 {
    let root = HostRoot::open(&env.host).expect("host root");
    PciFunction::read(&root, bdf(b))
        .expect("function readable")
        .iommu_group
        .expect("has a group")
}
