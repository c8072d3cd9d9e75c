//! Turning command-line options into a host root, a kernel edge and an engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use vfio_gpu_engine::kernel::{Kernel, SysfsKernel};
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{CrashMode, Engine, EngineConfig, Inspection, OpenReport, inspect};
use vfio_gpu_host::{GpuSelector, HostRoot, IdMatch};
use vfio_gpu_intent::Policy;

use crate::Output;

/// Where the host is and which devices are GPUs.
#[derive(Args, Debug, Clone)]
pub struct HostOpts {
    /// Root of the host's filesystem (sysfs, /proc, /etc, /dev, /lib/modules).
    #[arg(long, env = "VFIO_GPU_DRA_HOST_ROOT", default_value = "/")]
    pub host_root: PathBuf,
    /// Use the built-in demo host (an 8-GPU node with a simulated kernel) instead of this machine.
    #[arg(long)]
    pub demo: bool,
    /// Where the demo host lives (kept between commands so bind and release add up).
    #[arg(long, env = "VFIO_GPU_DRA_DEMO_DIR")]
    pub demo_dir: Option<PathBuf>,
    /// Rebuild the demo host from scratch.
    #[arg(long)]
    pub demo_reset: bool,
    /// Select GPUs by vendor:device (hex, repeatable), replacing the default NVIDIA display/3D selector.
    #[arg(long = "gpu-id", value_name = "VVVV:DDDD")]
    pub gpu_ids: Vec<String>,
    /// Select GPUs by class (0xCCSSPP[/0xMASK], repeatable).
    #[arg(long = "gpu-class", value_name = "CLASS[/MASK]")]
    pub gpu_classes: Vec<String>,
    /// Admin policy file (TOML); read when it exists.
    #[arg(
        long,
        env = "VFIO_GPU_DRA_POLICY",
        default_value = "/etc/vfio-gpu-dra/policy.toml"
    )]
    pub policy: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Host options plus what the engine needs.
#[derive(Args, Debug, Clone)]
pub struct EngineOpts {
    #[command(flatten)]
    pub host: HostOpts,
    /// Directory for the ledger (default /var/lib/vfio-gpu-dra; <demo-dir>/state with --demo).
    #[arg(long, env = "VFIO_GPU_DRA_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Seconds an unbind may take before the GPU is reported stuck.
    #[arg(long, default_value_t = 10.0)]
    pub unbind_timeout: f64,
    /// Seconds a bind may take before the GPU is reported stuck.
    #[arg(long, default_value_t = 20.0)]
    pub bind_timeout: f64,
}

/// An opened host.
pub struct Setup {
    pub root: HostRoot,
    pub kernel: Arc<dyn Kernel>,
    pub selector: GpuSelector,
    pub policy: Policy,
    pub demo: bool,
    pub state_dir: Option<PathBuf>,
}

/// Where the ledger lives on a real host unless `--state-dir` says otherwise.
const DEFAULT_STATE_DIR: &str = "/var/lib/vfio-gpu-dra";

fn default_demo_dir() -> PathBuf {
    std::env::temp_dir().join("vfio-gpu-dra-demo")
}

impl HostOpts {
    fn selector(&self) -> Result<GpuSelector> {
        let mut rules = Vec::new();
        for id in &self.gpu_ids {
            rules.push(IdMatch::parse_id(id)?);
        }
        for c in &self.gpu_classes {
            rules.push(IdMatch::parse_class(c)?);
        }
        Ok(if rules.is_empty() {
            GpuSelector::default()
        } else {
            GpuSelector::from_rules(rules)
        })
    }

    /// Opens the real host or the demo host.
    pub fn open(&self) -> Result<Setup> {
        let selector = self.selector()?;
        let policy = Policy::load_or_default(&self.policy)
            .with_context(|| format!("policy {}", self.policy.display()))?;
        if self.demo {
            let dir = self.demo_dir.clone().unwrap_or_else(default_demo_dir);
            let host = dir.join("host");
            if self.demo_reset && dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing demo host {}", dir.display()))?;
            }
            if !host.join("sys/bus/pci/devices").exists() {
                std::fs::create_dir_all(&host)
                    .with_context(|| format!("creating demo host {}", host.display()))?;
                vfio_gpu_host::demo::build_demo_host(&host)
                    .with_context(|| format!("building demo host in {}", host.display()))?;
            }
            let root = HostRoot::open(&host)?;
            let kernel: Arc<dyn Kernel> = Arc::new(SimKernel::booted(root.clone()));
            return Ok(Setup {
                root,
                kernel,
                selector,
                policy,
                demo: true,
                state_dir: Some(dir.join("state")),
            });
        }
        let root = HostRoot::open(&self.host_root)?;
        Ok(Setup {
            kernel: Arc::new(SysfsKernel::new(root.clone())),
            root,
            selector,
            policy,
            demo: false,
            state_dir: None,
        })
    }
}

impl EngineOpts {
    /// Opens the host and the engine (takes the state lock, loads the ledger).
    pub fn open_engine(&self) -> Result<(Engine, Setup)> {
        let mut setup = self.host.open()?;
        let state_dir = match (&self.state_dir, &setup.state_dir) {
            (Some(s), _) => s.clone(),
            (None, Some(demo)) => demo.clone(),
            (None, None) => PathBuf::from(DEFAULT_STATE_DIR),
        };
        setup.state_dir = Some(state_dir.clone());
        let config = EngineConfig {
            unbind_deadline: secs(self.unbind_timeout)?,
            bind_deadline: secs(self.bind_timeout)?,
            crash_after_step: crash_hook()?,
            crash_mode: CrashMode::Abort,
            ..EngineConfig::default()
        };
        let (engine, report) = Engine::open(
            Arc::clone(&setup.kernel),
            &state_dir,
            setup.selector.clone(),
            setup.policy.clone(),
            config,
        )
        .with_context(|| format!("opening state directory {}", state_dir.display()))?;
        report_open(&report);
        Ok((engine, setup))
    }
}

fn secs(v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v).with_context(|| format!("invalid timeout {v}"))
}

/// Fault injection for crash tests: abort after the N-th mutation.
pub(crate) fn crash_hook() -> Result<Option<u64>> {
    match std::env::var("VFIO_GPU_DRA_CRASH_AFTER_STEP") {
        Ok(v) => Ok(Some(v.trim().parse().with_context(|| {
            format!("VFIO_GPU_DRA_CRASH_AFTER_STEP={v:?} is not a step number")
        })?)),
        Err(_) => Ok(None),
    }
}

fn report_open(report: &OpenReport) {
    if let Some(p) = &report.ledger_problem {
        eprintln!(
            "warning: ledger not trusted ({}); moved to {}; state rebuilt from the host",
            p.reason,
            p.moved_to
                .as_deref()
                .map(|m| m.display().to_string())
                .unwrap_or_else(|| "(could not move)".into())
        );
    }
    for r in &report.earlier_boot_records {
        eprintln!("note: dropped a record from an earlier boot: {r}");
    }
}

impl Setup {
    /// Read-only view (no state lock).
    pub fn inspect(&self) -> Result<Inspection> {
        let state = self
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Ok(inspect(
            &self.root,
            &self.selector,
            &self.policy,
            Some(Path::new(&state)),
        )?)
    }

    /// "the demo host" or the root path.
    pub fn describe_root(&self) -> String {
        if self.demo {
            format!("the demo host ({})", self.root.path().display())
        } else {
            format!("host root {}", self.root.path().display())
        }
    }
}
