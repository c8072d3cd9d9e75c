#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! The engine without Kubernetes: build the demo host (an 8-GPU node), move a
//! GPU with its HDA function to vfio-pci on the simulated kernel, show the
//! write-ahead record, and give it back.
//!
//! ```sh
//! cargo run -p vfio-gpu-engine --example move_gpu
//! ```

use std::error::Error;
use std::sync::Arc;

use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{Engine, EngineConfig, Holder};
use vfio_gpu_host::{GpuSelector, HostRoot, demo::build_demo_host};
use vfio_gpu_intent::Policy;

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let host = dir.path().join("host");
    build_demo_host(&host)?;
    // The simulated kernel follows driver-core rules on the fixture's sysfs;
    // `SysfsKernel` is the same edge on a real host.
    let kernel = Arc::new(SimKernel::booted(HostRoot::open(&host)?));
    let (engine, _) = Engine::open(
        kernel,
        &dir.path().join("state"),
        GpuSelector::default(),
        Policy::default(),
        EngineConfig::default(),
    )?;

    let (gpus, _) = engine.discover()?;
    for view in &gpus {
        println!(
            "{}  on {:<9} keepOnVfio={}",
            view.gpu.bdf(),
            view.gpu
                .function
                .driver
                .as_ref()
                .map(|d| d.as_str())
                .unwrap_or("-"),
            view.verdict.keep_on_vfio
        );
    }

    let gpu = "0000:ab:00.0".parse()?;
    let holder = Holder::Claim {
        uid: "example-uid".into(),
        namespace: "vms".into(),
        name: "gpu-claim".into(),
    };
    let moved = engine.configure(gpu, holder.clone())?;
    println!(
        "\nconfigure: {:?}, {} ({} ms)",
        moved.action, moved.detail, moved.millis
    );
    let record = &engine.ledger().gpus[&gpu];
    for f in &record.functions {
        println!(
            "  recorded {}: came from {}",
            f.bdf,
            f.original_driver
                .as_ref()
                .map(|d| d.as_str())
                .unwrap_or("no driver")
        );
    }
    let released = engine.unconfigure(gpu, Some(&holder))?;
    println!("unconfigure: {:?}, {}", released.action, released.detail);
    Ok(())
}
