//! `bind`: move GPUs, with every function of their IOMMU groups, to vfio-pci
//! for the administrator.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use vfio_gpu_engine::Holder;
use vfio_gpu_host::Bdf;

use crate::render;
use crate::setup::EngineOpts;

/// `bind` arguments.
#[derive(Args, Debug)]
pub struct BindArgs {
    /// PCI addresses of the GPUs.
    #[arg(required = true)]
    bdfs: Vec<String>,
    #[command(flatten)]
    engine: EngineOpts,
}

/// Binds every GPU (in parallel) and prints each outcome.
pub fn run(args: &BindArgs) -> Result<ExitCode> {
    let bdfs = super::parse_bdfs(&args.bdfs)?;
    let (engine, setup) = args.engine.open_engine()?;
    let reqs: Vec<(Bdf, Holder)> = bdfs.iter().map(|b| (*b, Holder::Admin)).collect();
    let results = engine.configure_many(&reqs);
    render::outcomes("bind", &bdfs, &results, args.engine.host.output, &setup)
}
