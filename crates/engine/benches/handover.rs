//! What resetting and verifying a GPU between tenants adds to a release:
//! one release of a one-function GPU on a zero-latency simulated kernel with
//! `sanitize = "reset"` (reset, verify, hand-over phases and audit record in
//! the ledger) next to `sanitize = "off"`, in one criterion run. The
//! simulated kernel's reset costs nothing, so the difference is the engine's
//! own cost (reads, ledger commits, each fsynced); a real FLR adds ~100 ms,
//! a bus reset more, on top.
//!
//! `cargo bench -p vfio-gpu-engine --bench handover`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{Engine, EngineConfig, Holder};
use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;

/// A host with one GPU on nvidia, and an engine on it with `policy`.
fn setup(dir: &std::path::Path, policy: &str) -> (Engine, SimKernel, Bdf) {
    let root = dir.join("host");
    let mut h = FixtureHost::create(&root).unwrap();
    h.add_driver("vfio-pci").unwrap();
    h.add_driver("nvidia").unwrap();
    let gpu = Bdf::new(0, 0x65, 0, 0).unwrap();
    h.add_function(
        &FunctionSpec::new(gpu, 0x10de, 0x2330, 0x030200)
            .driver("nvidia")
            .group(11)
            .bars(&[16 << 20, 64 << 30, 32 << 20]),
    )
    .unwrap();
    let k = SimKernel::booted(HostRoot::open(&root).unwrap());
    k.set_link(gpu, "32.0 GT/s PCIe", 16).unwrap();
    let policy = Policy::parse(policy, std::path::Path::new("/policy.toml")).unwrap();
    let e = Engine::open(
        Arc::new(k.clone()),
        &dir.join("state"),
        GpuSelector::default(),
        policy,
        EngineConfig::default(),
    )
    .unwrap()
    .0;
    (e, k, gpu)
}

fn release(c: &mut Criterion) {
    let mut group = c.benchmark_group("release one GPU");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(10));
    for (name, policy) in [
        ("sanitize off", "[sanitize]\nmode = \"off\"\n"),
        ("sanitize reset", ""),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (e, k, gpu) = setup(dir.path(), policy);
        let holder = Holder::Claim {
            uid: "u".into(),
            namespace: "vms".into(),
            name: "vm".into(),
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    e.configure(gpu, holder.clone()).unwrap();
                    let t = Instant::now();
                    e.unconfigure(gpu, Some(&holder)).unwrap();
                    spent += t.elapsed();
                }
                spent
            })
        });
        let resets = k.resets(gpu);
        assert_eq!(resets > 0, policy.is_empty(), "{name}: {resets} resets");
        // The audit trail stays bounded however many releases ran.
        assert!(e.ledger().handovers.len() <= vfio_gpu_engine::ledger::HANDOVER_AUDIT_KEPT);
    }
    group.finish();
}

criterion_group!(benches, release);
criterion_main!(benches);
