//! `reset`: the administrator's reset of a GPU (a quarantined one above all):
//! every function of its group is reset and verified, and a GPU that passes
//! leaves quarantine, the alternative to rebooting the node.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;
use vfio_gpu_engine::admin_socket::{self, AdminSocketError};

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
/// fails stays (or becomes) quarantined and the exit status is 2. While
/// `serve` runs on the state directory (and holds its lock), the running
/// engine does it, through its admin socket.
pub fn run(args: &ResetArgs) -> Result<ExitCode> {
    let bdfs = super::parse_bdfs(&args.bdfs)?;
    let state_dir = args.engine.state_dir()?;
    match admin_socket::request_reset(&state_dir, &bdfs) {
        Ok(results) => {
            let values: Vec<_> = results
                .into_iter()
                .map(|r| match (r.outcome, r.error) {
                    (Some(o), None) => Ok(o),
                    (_, e) => Err(e.unwrap_or_else(|| "no outcome".into())),
                })
                .collect();
            if values.len() != bdfs.len() {
                bail!(
                    "the running serve answered for {} GPUs, not {}",
                    values.len(),
                    bdfs.len()
                );
            }
            render::outcome_values("reset", &bdfs, &values, args.engine.host.output)
        }
        Err(AdminSocketError::NotRunning { .. }) => {
            let (engine, setup) = args.engine.open_engine()?;
            let results: Vec<_> = bdfs.iter().map(|b| engine.reset_gpu(*b)).collect();
            render::outcomes("reset", &bdfs, &results, args.engine.host.output, &setup)
        }
        Err(e) => Err(anyhow::Error::from(e).context("reset through the running serve")),
    }
}
