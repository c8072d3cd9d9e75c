#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! Engine benchmarks (a bench binary: the latency runs take seconds each).
//!
//! 1. Parallel configure: 1, 2, 4, 8 GPUs with realistic simulated latencies
//!    (nvidia unbind 2 s, vfio-pci bind 0.3 s); wall time as a ratio to one
//!    GPU (target: 8 GPUs ≤ 1.25×).
//! 2. The engine's own cost: configure + unconfigure round trip on a
//!    zero-latency simulated kernel.
//! 3. Live intent: reading every intent source afresh (what each operation
//!    now does) next to a whole discovery of the demo host, in one run.
//!
//! `cargo bench -p vfio-gpu-engine --bench engine` (add `-- --quick` for a short run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_gpu_engine::kernel::WriteKind;
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{Engine, EngineConfig, Holder};
use vfio_gpu_host::fixture::FixtureHost;
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;

fn host(root: &std::path::Path, gpus: u8) -> Vec<Bdf> {
    let mut h = FixtureHost::create(root).unwrap();
    h.add_driver("vfio-pci").unwrap();
    h.add_driver("nvidia").unwrap();
    h.add_nvidia_gpus(gpus).unwrap()
}

fn open(dir: &std::path::Path, kernel: &SimKernel) -> Engine {
    Engine::open(
        Arc::new(kernel.clone()),
        &dir.join("state"),
        GpuSelector::default(),
        Policy::default(),
        EngineConfig::default(),
    )
    .unwrap()
    .0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 1 } else { 3 };

    println!("== parallel configure, nvidia unbind 2 s, vfio-pci bind 0.3 s (median of {reps})");
    let mut base = None;
    for n in [1u8, 2, 4, 8] {
        let mut times = Vec::new();
        for _ in 0..reps {
            let dir = tempfile::tempdir().unwrap();
            let gpus = host(&dir.path().join("host"), n);
            let k = SimKernel::booted(HostRoot::open(dir.path().join("host")).unwrap());
            k.set_latency(WriteKind::Unbind, "nvidia", Duration::from_secs(2));
            k.set_latency(WriteKind::Bind, "vfio-pci", Duration::from_millis(300));
            let e = open(dir.path(), &k);
            let reqs: Vec<(Bdf, Holder)> = gpus.iter().map(|b| (*b, Holder::Admin)).collect();
            let t = Instant::now();
            let res = e.configure_many(&reqs);
            times.push(t.elapsed());
            assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
        }
        let m = median(times);
        let b = *base.get_or_insert(m);
        println!(
            "configure {n} GPU(s): {:>8.3} s   ratio to 1 GPU: {:.3}",
            m.as_secs_f64(),
            m.as_secs_f64() / b.as_secs_f64()
        );
    }

    println!("== engine cost, zero-latency simulated kernel");
    let dir = tempfile::tempdir().unwrap();
    let gpus = host(&dir.path().join("host"), 1);
    let k = SimKernel::booted(HostRoot::open(dir.path().join("host")).unwrap());
    let e = open(dir.path(), &k);
    let iters: u32 = if quick { 50 } else { 300 };
    let mut times = Vec::new();
    let steps0 = e.steps();
    let writes0 = k.log().len();
    for _ in 0..iters {
        let t = Instant::now();
        e.configure(gpus[0], Holder::Admin).unwrap();
        e.unconfigure(gpus[0], None).unwrap();
        times.push(t.elapsed());
    }
    let steps = (e.steps() - steps0) / u64::from(iters);
    let writes = (k.log().len() - writes0) / iters as usize;
    let total: Duration = times.iter().sum();
    let m = median(times.clone());
    times.sort();
    let p99 = times[times.len() * 99 / 100];
    println!(
        "configure+unconfigure round trip: median {:.3} ms, p99 {:.3} ms, mean {:.3} ms over {iters} ({writes} host writes and {} ledger commits each, every commit fsynced)",
        m.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3 / f64::from(iters),
        steps - writes as u64
    );

    println!("== live intent on the demo host (8 GPUs, cmdline, modprobe.d, driverctl)");
    let dir = tempfile::tempdir().unwrap();
    let host_dir = dir.path().join("host");
    vfio_gpu_host::demo::build_demo_host(&host_dir).unwrap();
    let root = HostRoot::open(&host_dir).unwrap();
    let k = SimKernel::booted(root.clone());
    let e = open(dir.path(), &k);
    let live = vfio_gpu_intent::LiveIntent::fixed(root, Policy::default());
    let iters = if quick { 100 } else { 500 };
    let time = |f: &dyn Fn()| {
        let mut v: Vec<Duration> = (0..iters)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        v.sort();
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let (intent_p50, intent_p99) = time(&|| {
        std::hint::black_box(live.read());
    });
    let (discover_p50, discover_p99) = time(&|| {
        std::hint::black_box(e.discover().unwrap());
    });
    println!(
        "intent read: median {:.3} ms (p99 {:.3}); discover (includes one intent read): median {:.3} ms (p99 {:.3}); intent share {:.0} %",
        intent_p50.as_secs_f64() * 1e3,
        intent_p99.as_secs_f64() * 1e3,
        discover_p50.as_secs_f64() * 1e3,
        discover_p99.as_secs_f64() * 1e3,
        100.0 * intent_p50.as_secs_f64() / discover_p50.as_secs_f64()
    );
}
