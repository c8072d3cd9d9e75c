//! `release`: give GPUs back to their original drivers, unless the admin
//! keeps them on vfio-pci.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;
use vfio_gpu_engine::{ClaimHeld, EngineError};

use crate::render;
use crate::setup::EngineOpts;

/// `release` arguments.
#[derive(Args, Debug)]
pub struct ReleaseArgs {
    /// PCI addresses of the GPUs.
    #[arg(required = true)]
    bdfs: Vec<String>,
    /// Also release GPUs held by a ResourceClaim (the VM may still use them).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    engine: EngineOpts,
}

/// Releases every GPU and prints each outcome. A GPU a claim holds is
/// refused without `--force` (the engine's guard, [`ClaimHeld`]):
/// Kubernetes, not the admin, owns it.
pub fn run(args: &ReleaseArgs) -> Result<ExitCode> {
    let bdfs = super::parse_bdfs(&args.bdfs)?;
    let (engine, setup) = args.engine.open_engine()?;
    let claims = if args.force {
        ClaimHeld::Release
    } else {
        ClaimHeld::Refuse
    };
    let results = match engine.release_for_admin(&bdfs, claims) {
        Ok(results) => results,
        Err(e @ EngineError::HeldByClaim { .. }) => bail!("{e} (--force)"),
        Err(e) => return Err(e.into()),
    };
    render::outcomes("release", &bdfs, &results, args.engine.host.output, &setup)
}
