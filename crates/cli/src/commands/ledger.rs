//! `ledger`: what vfio-gpu-dra did to which GPU, and who holds it.

use std::process::ExitCode;

use anyhow::{Result, bail};
use vfio_gpu_engine::ledger::{LEDGER_FILE, LedgerFile, LedgerViewProblem};

use crate::render;
use crate::setup::{HostOpts, StateOpts};

/// Prints the ledger, read without the lock (so it shows what a running
/// `serve` did); an untrusted file is reported, never moved.
pub fn run(host: &HostOpts, state: &StateOpts) -> Result<ExitCode> {
    let setup = host.open_with_state(state)?;
    let dir = state.resolve(&setup);
    let path = dir.join(LEDGER_FILE);
    let body = match LedgerFile::read_only_view(&dir) {
        (body, None) => body,
        (_, Some(LedgerViewProblem::Undecodable(e))) => {
            bail!("ledger {}: {e}", path.display())
        }
        (_, Some(LedgerViewProblem::Unreadable(e))) => {
            bail!("reading ledger {}: {e}", path.display())
        }
    };
    render::ledger(&body, &path, host.output)?;
    Ok(ExitCode::SUCCESS)
}
