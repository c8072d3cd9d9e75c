//! Registers a running plugin the way the kubelet does (GetInfo, version check,
//! NotifyRegistrationStatus) through the kubelet emulator, then exits. For driving
//! a `vfio-gpu-dra serve` process by hand, e.g. to measure it idle and registered:
//! `cargo run -p vfio-gpu-kubelet --example register -- <registrar-dir>/<driver>-reg.sock`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vfio_gpu_kubelet::grpc::emulator::KubeletEmulator;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let Some(socket) = std::env::args().nth(1) else {
        bail!("usage: register <registration socket>");
    };
    // The plugin creates its socket once it has opened the engine: wait for it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::path::Path::new(&socket).exists() {
        if Instant::now() > deadline {
            bail!("{socket} did not appear within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let plugin = KubeletEmulator::new(&socket)
        .register()
        .await
        .with_context(|| format!("registering through {socket}"))?;
    println!(
        "registered {} ({:?}) at {}",
        plugin.info.name, plugin.version, plugin.info.endpoint
    );
    Ok(())
}
