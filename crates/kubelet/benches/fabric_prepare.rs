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

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DRIVER, Node, bench_dir, store_claim};
use fake_apiserver::FakeApiServer;
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{Engine, EngineConfig, FabricConfig};
use vfio_gpu_fabric::{Platform, SimFabricManager};
use vfio_gpu_host::demo::{HGX_MODULE_MAP_FILE, build_hgx_demo_host};
use vfio_gpu_host::{GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;
use vfio_gpu_kubelet::grpc::dra::ClaimRef;

/// Modules 1 and 3 of the HGX demo host: H100 partition 3.
const DEVICES: [&str; 2] = ["gpu-0000-9a-00-0", "gpu-0000-ab-00-0"];

/// One node: its plugin behind a registered DRA socket, and the claim.
struct Side {
    _dir: tempfile::TempDir,
    node: Node,
    claims: [ClaimRef; 1],
}

async fn side(api: &FakeApiServer, fabric: bool) -> anyhow::Result<Side> {
    let dir = bench_dir()?;
    let host = dir.path().join("host");
    std::fs::create_dir_all(&host)?;
    build_hgx_demo_host(&host)?;
    let kernel = SimKernel::booted(HostRoot::open(&host)?);
    let fabric_config = fabric.then(|| {
        let mut c = FabricConfig::new(Arc::new(SimFabricManager::new(Platform::HgxH100)));
        c.module_map_file = Some(host.join(HGX_MODULE_MAP_FILE));
        c
    });
    let (engine, _) = Engine::open(
        Arc::new(kernel),
        &dir.path().join("plugins").join(DRIVER),
        GpuSelector::default(),
        Policy::default(),
        EngineConfig {
            fabric: fabric_config,
            ..EngineConfig::default()
        },
    )?;
    // As serve does before it publishes anything.
    engine.fabric_reconcile()?;
    let claim = store_claim(api, if fabric { "with-fm" } else { "without-fm" }, &DEVICES)?;
    let node = Node::start(dir.path(), engine, api).await?;
    Ok(Side {
        _dir: dir,
        node,
        claims: [claim],
    })
}

/// One prepare as the kubelet sees it, timed; then (untimed) the background
/// mark settles and the claim is unprepared.
async fn round(s: &Side) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let r = s.node.kubelet.prepare(&s.claims).await?;
    let took = t.elapsed();
    if let Some(Err(e)) = r.get(&s.claims[0].uid) {
        anyhow::bail!("prepare failed: {e}");
    }
    s.node.plugin.settle().await;
    let u = s.node.kubelet.unprepare(&s.claims).await?;
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
    plain.node.stop().await?;
    fabric.node.stop().await
}
