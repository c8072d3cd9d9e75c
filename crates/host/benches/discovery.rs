//! Discovery cost on a host with 8 GPUs and N other PCI functions
//! (target: < 20 ms at 4,000). Reports growth with N.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot, PciHost, discover_gpus};

fn build(root: &std::path::Path, others: usize) {
    let mut h = FixtureHost::create(root).unwrap();
    h.add_driver("nvidia").unwrap();
    h.add_nvidia_gpus(8).unwrap();
    let mut group = 8;
    // Other functions: NICs, NVMe, bridges spread over buses, each in its own group.
    for n in 0..others {
        group += 1;
        let bus = 0x90 + (n / 256) as u8 % 0x60;
        let dev = ((n / 8) % 32) as u8;
        let func = (n % 8) as u8;
        let domain = (n / (256 * 0x60)) as u16 + 1;
        let b = Bdf::new(domain, bus, dev, func).unwrap();
        h.add_function(&FunctionSpec::new(b, 0x15b3, 0x101d, 0x020000).group(group))
            .unwrap();
    }
}

fn bench(c: &mut Criterion) {
    run(c, "discover_8_gpus", true);
    // Without /proc/bus/pci/devices (e.g. a host root without procfs): sysfs only.
    run(c, "discover_8_gpus_sysfs_only", false);
}

fn run(c: &mut Criterion, name: &str, procfs: bool) {
    let mut g = c.benchmark_group(name);
    for others in [500usize, 1000, 2000, 4000] {
        // sysfs is an in-memory filesystem: lay the fixture on tmpfs when there is one.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        build(dir.path(), others);
        if !procfs {
            std::fs::remove_file(dir.path().join("proc/bus/pci/devices")).unwrap();
        }
        let root = HostRoot::open(dir.path()).unwrap();
        let sel = GpuSelector::default();
        g.bench_with_input(BenchmarkId::from_parameter(others), &others, |bch, _| {
            bch.iter(|| {
                let host = PciHost::scan(&root, &sel).unwrap();
                let gpus = discover_gpus(&host, &sel, None);
                assert_eq!(gpus.len(), 8);
                gpus
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
