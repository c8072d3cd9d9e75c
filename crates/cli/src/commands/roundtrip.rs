//! `roundtrip` (hidden): times bind+release round trips of one GPU inside one
//! process, for the real-kernel test to compare with the bare sysfs writes.

use std::process::ExitCode;

use anyhow::{Context, Result};
use vfio_gpu_engine::Holder;
use vfio_gpu_host::Bdf;

use crate::setup::EngineOpts;

/// Runs `iterations` round trips and prints their timings as one JSON object.
pub fn run(bdf: &str, iterations: u32, opts: &EngineOpts) -> Result<ExitCode> {
    let bdf: Bdf = bdf.parse()?;
    let (engine, _setup) = opts.open_engine()?;
    let mut times = Vec::new();
    for i in 0..iterations {
        let t = std::time::Instant::now();
        engine
            .configure(bdf, Holder::Admin)
            .with_context(|| format!("bind, round trip {i}"))?;
        engine
            .unconfigure(bdf, None)
            .with_context(|| format!("release, round trip {i}"))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total: f64 = times.iter().sum();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    println!(
        "{}",
        serde_json::json!({
            "iterations": iterations,
            "totalMs": total,
            "perRoundtripMs": total / f64::from(iterations.max(1)),
            "medianMs": median,
        })
    );
    Ok(ExitCode::SUCCESS)
}
