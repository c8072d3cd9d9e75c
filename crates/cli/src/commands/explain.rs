//! `explain`: every admin-intent signal considered for one GPU, and the verdict.

use std::process::ExitCode;

use anyhow::{Result, bail};
use vfio_gpu_host::Bdf;
use vfio_gpu_node::OtherDrivers;

use crate::render;
use crate::setup::{HostOpts, StateOpts};

/// Prints the verdict of the GPU at `bdf`; an error when no GPU is there.
pub fn run(bdf: &str, host: &HostOpts, state: &StateOpts) -> Result<ExitCode> {
    let bdf: Bdf = bdf.parse()?;
    let setup = host.open_with_state(state)?;
    let view = setup.inspect()?;
    let Some(gpu) = view.gpus.iter().find(|g| g.gpu.bdf() == bdf) else {
        bail!(
            "no GPU at {bdf} on {} (see `vfio-gpu-dra devices`; use --gpu-id to select other devices)",
            setup.describe_root()
        );
    };
    // serve's record of other drivers publishing this node's GPUs (see
    // `vfio_gpu_node::OtherDrivers`); unreadable, it is a warning, not a failure.
    let other = match setup.state_dir.as_deref().map(OtherDrivers::read) {
        Some(Ok(Some(record))) => record.driver_of(&bdf).map(|driver| render::OtherDriver {
            driver: driver.to_string(),
            observed_at_unix: record.observed_at_unix,
        }),
        Some(Err(e)) => {
            eprintln!("warning: {e}");
            None
        }
        Some(Ok(None)) | None => None,
    };
    render::explain(gpu, other.as_ref(), host.output, &setup)?;
    Ok(ExitCode::SUCCESS)
}
