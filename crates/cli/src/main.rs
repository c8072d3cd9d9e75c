//! `vfio-gpu-dra`: inspect, bind and release passthrough GPUs, and serve the
//! kubelet DRA plugin. A thin layer over the library crates.

// The argument docs are clap's `--help` text, plain text where `<dir>` means a
// placeholder, not an HTML tag; escaping them would show in the help.
#![allow(rustdoc::invalid_html_tags)]

mod commands;
mod demo_cmd;
mod doctor;
mod fabric_cmd;
mod render;
mod serve_cmd;
mod setup;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use commands::bind::BindArgs;
use commands::release::ReleaseArgs;
use commands::reset::ResetArgs;
use setup::{EngineOpts, HostOpts, StateOpts};

/// Hands whole GPUs to virtual machines over VFIO, keeping the
/// administrator's vfio-pci bindings where they are.
#[derive(Parser, Debug)]
#[command(name = "vfio-gpu-dra", version, about, long_about = None)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "VFIO_GPU_DRA_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the GPUs, their IOMMU groups and whether they are kept on vfio-pci.
    Devices {
        #[command(flatten)]
        host: HostOpts,
        #[command(flatten)]
        state: StateOpts,
    },
    /// Show every admin-intent signal considered for a GPU, and the verdict; for
    /// several (one claim's GPUs), also the guest MMIO window they need together.
    Explain {
        /// PCI addresses of the GPUs, e.g. 0000:65:00.0.
        #[arg(required = true)]
        bdfs: Vec<String>,
        #[command(flatten)]
        host: HostOpts,
        #[command(flatten)]
        state: StateOpts,
    },
    /// Move GPUs (with every function of their IOMMU group) to vfio-pci.
    Bind(BindArgs),
    /// Give GPUs back to their original drivers, unless the admin keeps them on vfio-pci.
    Release(ReleaseArgs),
    /// Finish or roll back interrupted operations and repair driverless GPUs.
    Reconcile(EngineOpts),
    /// Reset GPUs through the kernel (`reset`), verify them, and take the ones
    /// that pass out of quarantine.
    Reset(ResetArgs),
    /// Print the ledger: what vfio-gpu-dra did to which GPU, and who holds it
    /// (read without the lock, so it shows what a running `serve` did).
    Ledger {
        #[command(flatten)]
        host: HostOpts,
        #[command(flatten)]
        state: StateOpts,
    },
    /// Tell whether this node is ready for GPU passthrough and, for each
    /// problem, the exact fix (read-only; exit status 1 when a check fails).
    Doctor {
        #[command(flatten)]
        host: HostOpts,
        #[command(flatten)]
        state: StateOpts,
    },
    /// NVLink partitions through NVIDIA Fabric Manager: status, reconcile, learn.
    #[command(subcommand)]
    Fabric(fabric_cmd::FabricCommand),
    /// Run the kubelet DRA plugin on this node until SIGTERM.
    Serve(Box<serve_cmd::ServeArgs>),
    /// Run the whole plugin lifecycle on the built-in demo host: publish,
    /// allocate, prepare, CDI, unprepare (no cluster, no GPU needed).
    Demo(demo_cmd::DemoArgs),
    /// Time N bind+release round trips of one GPU inside one process (used by
    /// the real-kernel test to compare with the bare sysfs writes).
    #[command(hide = true)]
    Roundtrip {
        /// PCI address of the GPU.
        bdf: String,
        /// Round trips to run.
        #[arg(long, default_value_t = 20)]
        iterations: u32,
        #[command(flatten)]
        engine: EngineOpts,
    },
}

/// Output format.
#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// A table for people.
    #[default]
    Table,
    /// JSON for programs.
    Json,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VFIO_GPU_DRA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Devices { host, state } => commands::devices::run(&host, &state),
        Command::Explain { bdfs, host, state } => commands::explain::run(&bdfs, &host, &state),
        Command::Bind(args) => commands::bind::run(&args),
        Command::Release(args) => commands::release::run(&args),
        Command::Reconcile(opts) => commands::reconcile::run(&opts),
        Command::Reset(args) => commands::reset::run(&args),
        Command::Ledger { host, state } => commands::ledger::run(&host, &state),
        Command::Doctor { host, state } => doctor::run(&host, &state),
        Command::Serve(args) => serve_cmd::run(*args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Fabric(cmd) => fabric_cmd::run(cmd),
        Command::Roundtrip {
            bdf,
            iterations,
            engine,
        } => commands::roundtrip::run(&bdf, iterations, &engine),
    }
}
