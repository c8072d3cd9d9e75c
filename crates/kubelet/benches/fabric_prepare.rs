//! What NVLink partitions cost the kubelet's prepare: NodePrepareResources of a
//! 2-GPU claim (modules 1 and 3: H100 partition 3) over the real DRA socket,
//! registered through the kubelet emulator, on two HGX demo hosts side by side —
//! one plugin with a zero-latency simulated Fabric Manager, one with none —
//! interleaved in one run so both see the same machine load. The time is the
//! kubelet's: from the call to its answer (the claim read from the fake API
//! server, discovery, the fabric preflight, both moves, the partition's
//! write-ahead record and activation, CDI and metadata files). Prints p50, p99
//! and the ratios (goal: p99 ≤ 1.10×). The engine-level view of the same cost,
//! without the plugin around it, is `cargo bench -p vfio-gpu-engine --bench fabric`.
//!
//! `cargo bench -p vfio-gpu-kubelet --bench fabric_prepare` (N=300 per side;
//! override with BENCH_N; BENCH_DIR=/dev/shm puts ledgers and CDI files on tmpfs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{Engine, EngineConfig, FabricConfig};
use vfio_gpu_fabric::{Platform, SimFabricManager};
use vfio_gpu_host::demo::{HGX_MODULE_MAP_FILE, build_hgx_demo_host};
use vfio_gpu_host::{GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;
use vfio_gpu_kubelet::grpc::dra::ClaimRef;
use vfio_gpu_kubelet::grpc::emulator::{KubeletEmulator, RegisteredPlugin};
use vfio_gpu_kubelet::grpc::server::{ServerConfig, ServerHandle, serve};
use vfio_gpu_kubelet::plugin::{PluginConfig, VfioPlugin};

const DRIVER: &str = "vfio-gpu.dra.dev";
const NODE: &str = "demo-node";
/// Modules 1 and 3 of the HGX demo host: H100 partition 3.
const DEVICES: [&str; 2] = ["gpu-0000-9a-00-0", "gpu-0000-ab-00-0"];

/// One node: its plugin behind a registered DRA socket, and the claim.
struct Side {
    _dir: tempfile::TempDir,
    plugin: Arc<VfioPlugin>,
    kubelet: RegisteredPlugin,
    claims: [ClaimRef; 1],
    token: CancellationToken,
    server: ServerHandle,
}

async fn side(api: &FakeApiServer, fabric: bool) -> anyhow::Result<Side> {
    let dir = match std::env::var("BENCH_DIR") {
        Ok(parent) => tempfile::tempdir_in(parent)?,
        Err(_) => tempfile::tempdir()?,
    };
    let host = dir.path().join("host");
    std::fs::create_dir_all(&host)?;
    build_hgx_demo_host(&host)?;
    let kernel = SimKernel::booted(HostRoot::open(&host)?);
    let fabric_config = fabric.then(|| {
        let mut c = FabricConfig::new(Arc::new(SimFabricManager::new(Platform::HgxH100)));
        c.module_map_file = Some(host.join(HGX_MODULE_MAP_FILE));
        c
    });
    let state = dir.path().join("plugins").join(DRIVER);
    let (engine, _) = Engine::open(
        Arc::new(kernel),
        &state,
        GpuSelector::default(),
        Policy::default(),
        EngineConfig {
            fabric: fabric_config,
            ..EngineConfig::default()
        },
    )?;
    // As serve does before it publishes anything.
    engine.fabric_reconcile()?;

    let name = if fabric { "with-fm" } else { "without-fm" };
    let requests: Vec<_> = DEVICES
        .iter()
        .enumerate()
        .map(
            |(i, _)| json!({"name": format!("gpu{i}"), "exactly": {"deviceClassName": "vfio-gpu"}}),
        )
        .collect();
    let results: Vec<_> = DEVICES
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
    let claim = ClaimRef {
        uid: stored["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        namespace: "vms".into(),
        name: name.into(),
    };

    let mut config = kube::Config::new(api.url().parse()?);
    config.default_retry = false;
    let client = kube::Client::try_from(config)?;
    let mut pc = PluginConfig::new(DRIVER, NODE);
    pc.cdi_root = dir.path().join("cdi");
    pc.data_dir = state;
    let plugin = VfioPlugin::new(Arc::new(engine), client, pc);
    let token = CancellationToken::new();
    let server = serve(
        ServerConfig::new(
            DRIVER,
            &dir.path().join("plugins"),
            &dir.path().join("registry"),
        ),
        Arc::clone(&plugin) as Arc<dyn vfio_gpu_kubelet::grpc::dra::DraBackend>,
        token.clone(),
    )
    .await?;
    let kubelet = KubeletEmulator::new(&server.registration_socket)
        .register()
        .await?;
    Ok(Side {
        _dir: dir,
        plugin,
        kubelet,
        claims: [claim],
        token,
        server,
    })
}

/// One prepare as the kubelet sees it, timed; then (untimed) the background
/// mark settles and the claim is unprepared.
async fn round(s: &Side) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let r = s.kubelet.prepare(&s.claims).await?;
    let took = t.elapsed();
    if let Some(Err(e)) = r.get(&s.claims[0].uid) {
        anyhow::bail!("prepare failed: {e}");
    }
    s.plugin.settle().await;
    let u = s.kubelet.unprepare(&s.claims).await?;
    if let Some(Err(e)) = u.get(&s.claims[0].uid) {
        anyhow::bail!("unprepare failed: {e}");
    }
    Ok(took)
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    vfio_gpu_kubelet::serve::install_crypto_provider();
    let api = FakeApiServer::start().await?;
    let plain = side(&api, false).await?;
    let fabric = side(&api, true).await?;
    for _ in 0..5 {
        round(&plain).await?;
        round(&fabric).await?;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..n {
        // Alternate which side goes first, so drift hits both equally.
        if i % 2 == 0 {
            a.push(round(&plain).await?);
            b.push(round(&fabric).await?);
        } else {
            b.push(round(&fabric).await?);
            a.push(round(&plain).await?);
        }
    }
    a.sort();
    b.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("2-GPU NodePrepareResources on the HGX demo host, {n} samples per side, interleaved:");
    println!(
        "  without FM:             p50 {:7.3} ms  p99 {:7.3} ms",
        ms(pct(&a, 0.5)),
        ms(pct(&a, 0.99))
    );
    println!(
        "  with zero-latency FM:   p50 {:7.3} ms  p99 {:7.3} ms",
        ms(pct(&b, 0.5)),
        ms(pct(&b, 0.99))
    );
    println!(
        "  ratio with/without:     p50 {:.3}x       p99 {:.3}x  (goal p99 <= 1.10x)",
        ms(pct(&b, 0.5)) / ms(pct(&a, 0.5)),
        ms(pct(&b, 0.99)) / ms(pct(&a, 0.99))
    );
    for s in [plain, fabric] {
        s.token.cancel();
        s.server.wait().await?;
    }
    Ok(())
}
