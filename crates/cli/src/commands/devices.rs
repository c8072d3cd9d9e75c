//! `devices`: the GPUs, their IOMMU groups and whether they stay on vfio-pci.

use std::process::ExitCode;

use anyhow::Result;

use crate::render;
use crate::setup::{HostOpts, StateOpts};

/// Inspects the host and prints every GPU.
pub fn run(host: &HostOpts, state: &StateOpts) -> Result<ExitCode> {
    let setup = host.open_with_state(state)?;
    let view = setup.inspect()?;
    render::devices(&view, host.output, &setup)?;
    Ok(ExitCode::SUCCESS)
}
