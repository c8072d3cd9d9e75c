#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! What NVLink partitions cost a prepare: the whole prepare of a 2-GPU
//! claim (preflight, both GPUs to vfio with the partition's write-ahead
//! `activating` record riding on the last move's commit, activate) on the
//! HGX demo host with
//! a zero-latency simulated Fabric Manager, next to the same prepare with no
//! FM configured, interleaved in one run so both see the same machine load.
//! Prints p50 and p99 of each and the p99 ratio (goal: ≤ 1.10×).
//!
//! `cargo bench -p vfio-gpu-engine --bench fabric` (`-- --quick`: 40 samples
//! per side instead of 300; `BENCH_N` sets the count; the ledger goes to
//! `$TMPDIR`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{Engine, EngineConfig, FabricConfig, Holder};
use vfio_gpu_fabric::{Platform, SimFabricManager};
use vfio_gpu_host::demo::{HGX_MODULE_MAP_FILE, build_hgx_demo_host};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;

/// Modules 1 and 3: H100 partition 3.
const GPUS: [&str; 2] = ["0000:9a:00.0", "0000:ab:00.0"];

struct Side {
    _dir: tempfile::TempDir,
    engine: Engine,
    fabric: bool,
}

fn side(fabric: bool) -> Side {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    build_hgx_demo_host(&host).unwrap();
    let kernel = SimKernel::booted(HostRoot::open(&host).unwrap());
    let fabric_config = fabric.then(|| {
        let mut c = FabricConfig::new(Arc::new(SimFabricManager::new(Platform::HgxH100)));
        c.module_map_file = Some(host.join(HGX_MODULE_MAP_FILE));
        c
    });
    let config = EngineConfig {
        fabric: fabric_config,
        ..EngineConfig::default()
    };
    let engine = Engine::open(
        Arc::new(kernel),
        &dir.path().join("state"),
        GpuSelector::default(),
        Policy::default(),
        config,
    )
    .unwrap()
    .0;
    engine.fabric_reconcile().unwrap();
    Side {
        _dir: dir,
        engine,
        fabric,
    }
}

/// One prepare as the plugin does it, timed (up to its answer to the
/// kubelet; the partition's `active` mark is written after it, untimed, as
/// the plugin does); then the unprepare (untimed).
/// Also returns the time in the two fabric calls (zero without FM).
fn prepare_once(s: &Side, n: usize) -> (Duration, Duration) {
    let h = Holder::Claim {
        uid: format!("u{n}"),
        namespace: "vms".into(),
        name: "vm".into(),
    };
    let bdfs: Vec<Bdf> = GPUS.iter().map(|g| g.parse().unwrap()).collect();
    let start = Instant::now();
    let mut in_fabric = Duration::ZERO;
    let mut unmarked = Vec::new();
    let mut plan = None;
    if s.fabric {
        let t = Instant::now();
        plan = Some(s.engine.fabric_preflight(&h, &bdfs).unwrap());
        in_fabric += t.elapsed();
    }
    {
        // As the plugin does: the partition's record rides with the last move.
        let _ride = plan.as_ref().map(|p| s.engine.fabric_ride(p));
        for b in &bdfs {
            s.engine.configure(*b, h.clone()).unwrap();
        }
    }
    if s.fabric {
        let t = Instant::now();
        unmarked = s
            .engine
            .fabric_activate_planned(&h, &bdfs, plan.as_ref().unwrap())
            .unwrap()
            .unmarked;
        in_fabric += t.elapsed();
    }
    let took = start.elapsed();
    // The plugin writes the `active` mark after answering the kubelet.
    s.engine.fabric_mark_active(&unmarked).unwrap();
    if s.fabric {
        s.engine.fabric_deactivate(&h).unwrap();
    }
    for b in &bdfs {
        s.engine.unconfigure(*b, Some(&h)).unwrap();
    }
    (took, in_fabric)
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let samples = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 40 } else { 300 });
    let plain = side(false);
    let fabric = side(true);
    // Warm-up (page cache, worker pools).
    for n in 0..5 {
        prepare_once(&plain, n);
        prepare_once(&fabric, n);
    }
    let (mut a, mut b, mut f) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..samples {
        // Alternate which side goes first, so drift hits both equally.
        if n % 2 == 0 {
            a.push(prepare_once(&plain, n).0);
            let (took, in_fabric) = prepare_once(&fabric, n);
            b.push(took);
            f.push(in_fabric);
        } else {
            let (took, in_fabric) = prepare_once(&fabric, n);
            b.push(took);
            f.push(in_fabric);
            a.push(prepare_once(&plain, n).0);
        }
    }
    a.sort();
    b.sort();
    f.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("2-GPU prepare on the HGX demo host, {samples} samples per side, interleaved:");
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
        "    of which the fabric calls: p50 {:7.3} ms  p99 {:7.3} ms",
        ms(pct(&f, 0.5)),
        ms(pct(&f, 0.99))
    );
    println!(
        "  ratio with/without:     p50 {:.3}x       p99 {:.3}x  (goal p99 <= 1.10x)",
        ms(pct(&b, 0.5)) / ms(pct(&a, 0.5)),
        ms(pct(&b, 0.99)) / ms(pct(&a, 0.99))
    );
}
