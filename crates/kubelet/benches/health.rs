//! One device-health scan, as the health monitor runs it every 30 s and after each
//! prepare/unprepare: a whole discovery through the engine (sysfs, intent sources,
//! ledger) plus the per-GPU checks (config-space read, driver against the ledger).
//!
//! Hosts, each with 8 GPUs and a 64-byte `config` file per GPU (fixtures have none;
//! a real host does, and the scan reads it):
//! - `demo_host`: the built-in demo host (mixed drivers, kernel command line,
//!   modprobe.d and driverctl intent);
//! - `fixture/<N>`: 8 nvidia GPUs, 4 of them moved to vfio-pci through the engine
//!   (ledger records to check), and N other PCI functions.
//!
//! `cargo bench -p vfio-gpu-kubelet --bench health`; criterion prints the estimate
//! and writes the median to `target/criterion/health_scan_8_gpus/*/new/estimates.json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{Engine, EngineConfig, Holder};
use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;
use vfio_gpu_kubelet::health::{Health, scan_bounded};

/// Writes a config space header (vendor, device) for `bdf`.
fn write_config(h: &FixtureHost, bdf: Bdf, vendor: u16, device: u16) {
    let mut cfg = [0u8; 64];
    cfg[0..2].copy_from_slice(&vendor.to_le_bytes());
    cfg[2..4].copy_from_slice(&device.to_le_bytes());
    std::fs::write(h.device_dir(bdf).unwrap().join("config"), cfg).unwrap();
}

fn fixture(root: &Path, others: usize) -> Vec<Bdf> {
    let mut h = FixtureHost::create(root).unwrap();
    h.add_driver("vfio-pci").unwrap();
    h.add_driver("nvidia").unwrap();
    let gpus = h.add_nvidia_gpus(8).unwrap();
    for &b in &gpus {
        write_config(&h, b, 0x10de, 0x2330);
    }
    for n in 0..others {
        let b = Bdf::new(
            1,
            0x90 + (n / 256) as u8,
            ((n / 8) % 32) as u8,
            (n % 8) as u8,
        )
        .unwrap();
        h.add_function(&FunctionSpec::new(b, 0x15b3, 0x101d, 0x020000).group(100 + n as u32))
            .unwrap();
    }
    gpus
}

fn open(dir: &Path, host: &Path) -> Engine {
    let kernel = SimKernel::booted(HostRoot::open(host).unwrap());
    Engine::open(
        Arc::new(kernel),
        &dir.join("state"),
        GpuSelector::default(),
        Policy::default(),
        EngineConfig::default(),
    )
    .unwrap()
    .0
}

/// What `scan_once` runs on its blocking thread.
fn scan_host(engine: &Engine, seen: &mut BTreeMap<Bdf, String>) -> usize {
    let (views, _) = engine.discover().unwrap();
    let report = scan_bounded(engine, &views, seen);
    assert_eq!(report.devices.len(), 8);
    report
        .devices
        .iter()
        .filter(|d| d.health == Health::Healthy)
        .count()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("health_scan_8_gpus");
    // sysfs is an in-memory filesystem: lay the hosts on tmpfs when there is one.
    let tmp = || {
        tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap()
    };

    let dir = tmp();
    let host = dir.path().join("host");
    let demo = vfio_gpu_host::demo::build_demo_host(&host).unwrap();
    let engine = open(dir.path(), &host);
    let (views, _) = engine.discover().unwrap();
    for v in &views {
        let id = &v.gpu.function.identity;
        write_config(&demo, v.gpu.bdf(), id.vendor, id.device);
    }
    let mut seen = BTreeMap::new();
    g.bench_function("demo_host", |b| b.iter(|| scan_host(&engine, &mut seen)));

    for others in [0usize, 1000] {
        let dir = tmp();
        let host = dir.path().join("host");
        let gpus = fixture(&host, others);
        let engine = open(dir.path(), &host);
        for b in &gpus[..4] {
            engine.configure(*b, Holder::Admin).unwrap();
        }
        let mut seen = BTreeMap::new();
        assert_eq!(scan_host(&engine, &mut seen), 8, "all 8 healthy");
        g.bench_with_input(BenchmarkId::new("fixture", others), &others, |b, _| {
            b.iter(|| scan_host(&engine, &mut seen))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
