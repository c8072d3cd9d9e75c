//! `reset`: the administrator's reset of a GPU (a quarantined one above all):
//! every function of its group is reset and verified, and a GPU that passes
//! leaves quarantine, the alternative to rebooting the node.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use crate::render;
use crate::setup::EngineOpts;

/// `reset` arguments.
#[derive(Args, Debug)]
pub struct ResetArgs {
    /// PCI addresses of the GPUs.
    #[arg(required = true)]
    bdfs: Vec<String>,
    #[command(flatten)]
    engine: EngineOpts,
}

/// Resets and verifies every GPU named and prints each outcome; one that
/// fails stays (or becomes) quarantined and the exit status is 2.
pub fn run(args: &ResetArgs) -> Result<ExitCode> {
    let bdfs = super::parse_bdfs(&args.bdfs)?;
    let (engine, setup) = args.engine.open_engine()?;
    let results: Vec<_> = bdfs.iter().map(|b| engine.reset_gpu(*b)).collect();
    render::outcomes("reset", &bdfs, &results, args.engine.host.output, &setup)
}
