//! NodePrepareResources + NodeUnprepareResources round trips over the real DRA socket
//! (registered through the kubelet emulator), with the claim served by the fake API
//! server and a zero-latency simulated kernel on the demo host. Prints p50/p99.
//!
//! `cargo bench -p vfio-gpu-kubelet --bench prepare` (N=200; override with BENCH_N).
//! A retried prepare (GPU already configured: no host writes, no ledger commits) is
//! timed separately, so the share of the fsync'd ledger in a real prepare is visible.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{Engine, EngineConfig};
use vfio_gpu_host::{GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;
use vfio_gpu_kubelet::grpc::dra::ClaimRef;
use vfio_gpu_kubelet::grpc::emulator::KubeletEmulator;
use vfio_gpu_kubelet::grpc::server::{ServerConfig, serve};
use vfio_gpu_kubelet::plugin::{PluginConfig, VfioPlugin};

const DRIVER: &str = "vfio-gpu.dra.dev";
const NODE: &str = "demo-node";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<28} n={:<4} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    vfio_gpu_kubelet::serve::install_crypto_provider();
    // BENCH_DIR=/dev/shm puts the ledger and CDI files on tmpfs: the plugin's
    // own cost without the disk's fsync latency.
    let dir = match std::env::var("BENCH_DIR") {
        Ok(parent) => tempfile::tempdir_in(parent)?,
        Err(_) => tempfile::tempdir()?,
    };
    let host = dir.path().join("host");
    std::fs::create_dir_all(&host)?;
    vfio_gpu_host::demo::build_demo_host(&host)?;
    let kernel = SimKernel::booted(HostRoot::open(&host)?);
    let state = dir.path().join("plugins").join(DRIVER);
    let (engine, _) = Engine::open(
        Arc::new(kernel),
        &state,
        GpuSelector::default(),
        Policy::default(),
        EngineConfig::default(),
    )?;

    let api = FakeApiServer::start().await?;
    let mut config = kube::Config::new(api.url().parse()?);
    config.default_retry = false;
    let client = kube::Client::try_from(config)?;
    let stored = api.insert(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "bench", "namespace": "vms"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "vfio-gpu"}}]}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "gpu", "driver": DRIVER, "pool": NODE, "device": "gpu-0000-ba-00-0"}]}}}
    }))?;
    let claim = ClaimRef {
        uid: stored["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        namespace: "vms".into(),
        name: "bench".into(),
    };

    let mut pc = PluginConfig::new(DRIVER, NODE);
    pc.cdi_root = dir.path().join("cdi");
    pc.data_dir = state.clone();
    let plugin = VfioPlugin::new(Arc::new(engine), client, pc);
    let token = CancellationToken::new();
    let server = serve(
        ServerConfig::new(
            DRIVER,
            &dir.path().join("plugins"),
            &dir.path().join("registry"),
        ),
        plugin,
        token.clone(),
    )
    .await?;
    let kubelet = KubeletEmulator::new(&server.registration_socket)
        .register()
        .await?;
    let claims = [claim.clone()];

    let (mut prepare, mut retry, mut unprepare) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 5 {
        let t = Instant::now();
        let r = kubelet.prepare(&claims).await?;
        let d = t.elapsed();
        if let Some(Err(e)) = r.get(&claim.uid) {
            anyhow::bail!("prepare failed: {e}");
        }
        let t = Instant::now();
        kubelet.prepare(&claims).await?;
        let d_retry = t.elapsed();
        let t = Instant::now();
        let u = kubelet.unprepare(&claims).await?;
        let d_un = t.elapsed();
        if let Some(Err(e)) = u.get(&claim.uid) {
            anyhow::bail!("unprepare failed: {e}");
        }
        // The first rounds warm up connections and caches.
        if i >= 5 {
            prepare.push(d);
            retry.push(d_retry);
            unprepare.push(d_un);
        }
    }
    report("prepare (moves the GPU)", prepare);
    report("prepare retry (no change)", retry);
    report("unprepare (restores)", unprepare);

    token.cancel();
    server.wait().await?;
    Ok(())
}
