//! `explain`: every admin-intent signal considered for a GPU, and the
//! verdict; for several GPUs (one claim's), also the guest MMIO window a VM
//! given all of them needs.

use std::process::ExitCode;

use anyhow::{Result, bail};
use vfio_gpu_host::Bdf;
use vfio_gpu_node::OtherDrivers;

use crate::render;
use crate::setup::{HostOpts, StateOpts};

/// Prints the verdict of each GPU at `bdfs` (and, for several, the MMIO
/// window they need together); an error, before printing anything, when no
/// GPU is at one of them.
pub fn run(bdfs: &[String], host: &HostOpts, state: &StateOpts) -> Result<ExitCode> {
    let bdfs: Vec<Bdf> = bdfs.iter().map(|b| b.parse()).collect::<Result<_, _>>()?;
    let setup = host.open_with_state(state)?;
    let view = setup.inspect()?;
    let mut gpus = Vec::new();
    for bdf in &bdfs {
        let Some(gpu) = view.gpus.iter().find(|g| g.gpu.bdf() == *bdf) else {
            bail!(
                "no GPU at {bdf} on {} (see `vfio-gpu-dra devices`; use --gpu-id to select other devices)",
                setup.describe_root()
            );
        };
        gpus.push(gpu);
    }
    let per_gpu: Vec<u64> = gpus
        .iter()
        .map(|g| g.gpu.function.bar_prefetchable64_bytes)
        .collect();
    if let [gpu] = gpus.as_slice() {
        let other = other_driver(&setup, gpu.gpu.bdf());
        render::explain(gpu, other.as_ref(), host.output, &setup)?;
        return Ok(ExitCode::SUCCESS);
    }
    if host.output == crate::Output::Json {
        let mut each = Vec::new();
        for gpu in &gpus {
            each.push(render::explain_json(
                gpu,
                other_driver(&setup, gpu.gpu.bdf()).as_ref(),
            )?);
        }
        let all = serde_json::json!({"gpus": each, "guestMmio": render::mmio_json(&per_gpu)});
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (i, gpu) in gpus.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let other = other_driver(&setup, gpu.gpu.bdf());
        render::explain(gpu, other.as_ref(), host.output, &setup)?;
    }
    render::mmio_for_claim(&per_gpu);
    Ok(ExitCode::SUCCESS)
}

/// serve's record of another driver publishing `bdf`, if any.
fn other_driver(setup: &crate::setup::Setup, bdf: Bdf) -> Option<render::OtherDriver> {
    // serve's record of other drivers publishing this node's GPUs (see
    // `vfio_gpu_node::OtherDrivers`); unreadable, it is a warning, not a failure.
    match setup.state_dir.as_deref().map(OtherDrivers::read) {
        Some(Ok(Some(record))) => record.driver_of(&bdf).map(|driver| render::OtherDriver {
            driver: driver.to_string(),
            observed_at_unix: record.observed_at_unix,
        }),
        Some(Err(e)) => {
            eprintln!("warning: {e}");
            None
        }
        Some(Ok(None)) | None => None,
    }
}
