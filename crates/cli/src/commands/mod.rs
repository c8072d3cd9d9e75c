//! One module per admin command: each turns parsed arguments into a call of
//! the library crates and prints the result through `render`.

pub mod bind;
pub mod devices;
pub mod explain;
pub mod ledger;
pub mod reconcile;
pub mod release;
pub mod reset;
pub mod roundtrip;

use anyhow::Result;
use vfio_gpu_host::Bdf;

/// Parses every PCI address, failing on the first bad one.
fn parse_bdfs(args: &[String]) -> Result<Vec<Bdf>> {
    args.iter()
        .map(|a| a.parse::<Bdf>().map_err(anyhow::Error::from))
        .collect()
}
