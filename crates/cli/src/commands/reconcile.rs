//! `reconcile`: finish or roll back interrupted operations and repair
//! driverless GPUs.

use std::process::ExitCode;

use anyhow::{Context, Result};
use vfio_gpu_host::Bdf;

use crate::render;
use crate::setup::EngineOpts;

/// Reconciles the host against the ledger and prints each GPU's outcome.
pub fn run(opts: &EngineOpts) -> Result<ExitCode> {
    let (engine, setup) = opts.open_engine()?;
    let results = engine.reconcile().context("reconcile")?;
    let (bdfs, results): (Vec<Bdf>, Vec<_>) = results
        .into_iter()
        .map(|r| match r {
            Ok(o) => (o.bdf, Ok(o)),
            Err((b, e)) => (b, Err(e)),
        })
        .unzip();
    render::outcomes("reconcile", &bdfs, &results, opts.host.output, &setup)
}
