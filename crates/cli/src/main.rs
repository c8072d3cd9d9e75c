//! `vfio-gpu-dra`: inspect, bind and release passthrough GPUs, and serve the
//! kubelet DRA plugin. A thin layer over the library crates.

mod demo_cmd;
mod doctor;
mod fabric_cmd;
mod render;
mod serve_cmd;
mod setup;

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use vfio_gpu_engine::Holder;
use vfio_gpu_host::Bdf;

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
    /// Show every admin-intent signal considered for one GPU, and the verdict.
    Explain {
        /// PCI address of the GPU, e.g. 0000:65:00.0.
        bdf: String,
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
    /// NVLink partitions through NVIDIA Fabric Manager: status, reconcile.
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

#[derive(Args, Debug)]
struct BindArgs {
    /// PCI addresses of the GPUs.
    #[arg(required = true)]
    bdfs: Vec<String>,
    #[command(flatten)]
    engine: EngineOpts,
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    /// PCI addresses of the GPUs.
    #[arg(required = true)]
    bdfs: Vec<String>,
    /// Also release GPUs held by a ResourceClaim (the VM may still use them).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    engine: EngineOpts,
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

fn parse_bdfs(args: &[String]) -> Result<Vec<Bdf>> {
    args.iter()
        .map(|a| a.parse::<Bdf>().map_err(anyhow::Error::from))
        .collect()
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
        Command::Devices { host, state } => {
            let setup = host.open_with_state(&state)?;
            let view = setup.inspect()?;
            render::devices(&view, host.output, &setup)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain { bdf, host, state } => {
            let bdf: Bdf = bdf.parse()?;
            let setup = host.open_with_state(&state)?;
            let view = setup.inspect()?;
            let Some(gpu) = view.gpus.iter().find(|g| g.gpu.bdf() == bdf) else {
                bail!(
                    "no GPU at {bdf} on {} (see `vfio-gpu-dra devices`; use --gpu-id to select other devices)",
                    setup.describe_root()
                );
            };
            render::explain(gpu, host.output, &setup)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bind(args) => {
            let bdfs = parse_bdfs(&args.bdfs)?;
            let (engine, setup) = args.engine.open_engine()?;
            let reqs: Vec<(Bdf, Holder)> = bdfs.iter().map(|b| (*b, Holder::Admin)).collect();
            let results = engine.configure_many(&reqs);
            render::outcomes("bind", &bdfs, &results, args.engine.host.output, &setup)
        }
        Command::Release(args) => {
            let bdfs = parse_bdfs(&args.bdfs)?;
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
        Command::Reconcile(opts) => {
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
        Command::Doctor { host, state } => doctor::run(&host, &state),
        Command::Serve(args) => serve_cmd::run(*args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Fabric(cmd) => fabric_cmd::run(cmd),
        Command::Roundtrip {
            bdf,
            iterations,
            engine,
        } => {
            let bdf: Bdf = bdf.parse()?;
            let (engine, _setup) = engine.open_engine()?;
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
        Command::Ledger { host, state } => {
            let setup = host.open_with_state(&state)?;
            let dir = state.resolve(&setup);
            let path = dir.join(vfio_gpu_engine::ledger::LEDGER_FILE);
            // Read-only: no lock, and an untrusted file is reported, never moved.
            let body = match std::fs::read(&path) {
                Ok(bytes) => vfio_gpu_engine::ledger::decode(&bytes)
                    .map_err(|e| anyhow::anyhow!("ledger {}: {e}", path.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
                Err(e) => bail!("reading ledger {}: {e}", path.display()),
            };
            render::ledger(&body, &path, host.output)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
