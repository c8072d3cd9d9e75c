//! `release`: give GPUs back to their original drivers, unless the admin
//! keeps them on vfio-pci.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;
use vfio_gpu_engine::Holder;

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
/// refused without `--force`: Kubernetes, not the admin, owns it.
pub fn run(args: &ReleaseArgs) -> Result<ExitCode> {
    let bdfs = super::parse_bdfs(&args.bdfs)?;
    let (engine, setup) = args.engine.open_engine()?;
    let ledger = engine.ledger();
    let mut reqs = Vec::new();
    for b in &bdfs {
        let holder = ledger.gpus.get(b).and_then(|r| r.holder.clone());
        match holder {
            Some(h @ Holder::Claim { .. }) if !args.force => {
                bail!("{b} is held by {h}; release it through Kubernetes, or pass --force")
            }
            _ => reqs.push((*b, None)),
        }
    }
    let results = engine.unconfigure_many(&reqs);
    render::outcomes("release", &bdfs, &results, args.engine.host.output, &setup)
}
