//! NodePrepareResources + NodeUnprepareResources round trips over the real DRA socket
//! (registered through the kubelet emulator), with the claim served by the fake API
//! server and a zero-latency simulated kernel on the demo host. Prints p50/p99.
//!
//! `cargo bench -p vfio-gpu-kubelet --bench prepare` (N=200; override with BENCH_N).
//! A retried prepare (GPU already configured: no host writes, no ledger commits) is
//! timed separately, so the share of the fsync'd ledger in a real prepare is visible.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DRIVER, Node, bench_dir, store_claim};
use fake_apiserver::FakeApiServer;
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{Engine, EngineConfig};
use vfio_gpu_host::{GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;

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
    let dir = bench_dir()?;
    let host = dir.path().join("host");
    std::fs::create_dir_all(&host)?;
    vfio_gpu_host::demo::build_demo_host(&host)?;
    let kernel = SimKernel::booted(HostRoot::open(&host)?);
    let (engine, _) = Engine::open(
        Arc::new(kernel),
        &dir.path().join("plugins").join(DRIVER),
        GpuSelector::default(),
        Policy::default(),
        EngineConfig::default(),
    )?;
    let api = FakeApiServer::start().await?;
    let claim = store_claim(&api, "bench", &["gpu-0000-ba-00-0"])?;
    let node = Node::start(dir.path(), engine, &api).await?;
    let kubelet = &node.kubelet;
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

    node.stop().await
}
