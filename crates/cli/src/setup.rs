//! Turning command-line options into a host root, a kernel edge and an engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use vfio_gpu_engine::kernel::{Kernel, SysfsKernel, WriteKind};
use vfio_gpu_engine::ledger::{LockError, probe_state_lock};
use vfio_gpu_engine::sim::SimKernel;
use vfio_gpu_engine::{
    CrashMode, Engine, EngineConfig, EngineError, Inspection, OpenReport, inspect,
};
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
    /// With --demo: the HGX demo host instead (8 × H100 SXM, NVSwitches, a
    /// simulated Fabric Manager; default directory <tmp>/vfio-gpu-dra-demo-hgx).
    #[arg(long, requires = "demo")]
    pub hgx: bool,
    /// With --demo: how long the simulated kernel takes for a kind of write to a
    /// driver, e.g. `unbind/nvidia=2s,bind/vfio-pci=300ms` (kinds: unbind, bind,
    /// reset, drivers_probe, driver_override, unbindLock). Default: no latency.
    #[arg(
        long,
        requires = "demo",
        env = "VFIO_GPU_DRA_DEMO_KERNEL_LATENCY",
        value_parser = parse_kernel_latencies,
        value_name = "KIND/DRIVER=DURATION,..."
    )]
    pub demo_kernel_latency: Option<KernelLatencies>,
    #[command(flatten)]
    pub fabric: crate::fabric_cmd::FabricOpts,
    /// Select GPUs by vendor:device (hex, repeatable), replacing the default NVIDIA display/3D selector.
    #[arg(long = "gpu-id", value_name = "VVVV:DDDD")]
    pub gpu_ids: Vec<String>,
    /// Select GPUs by class (0xCCSSPP[/0xMASK], repeatable).
    #[arg(long = "gpu-class", value_name = "CLASS[/MASK]")]
    pub gpu_classes: Vec<String>,
    /// Admin policy file (TOML); read when it exists, and re-read by every
    /// operation. Default: etc/vfio-gpu-dra/policy.toml under the host root
    /// (the host's file, also from inside the DaemonSet's pod).
    #[arg(long, env = "VFIO_GPU_DRA_POLICY")]
    pub policy: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Where the ledger and the lock live: shared by every command and `serve`.
#[derive(Args, Debug, Clone, Default)]
pub struct StateOpts {
    /// Directory of the ledger and lock, shared with `serve` (default
    /// /var/lib/vfio-gpu-dra; <demo-dir>/state with --demo).
    #[arg(long, env = "VFIO_GPU_DRA_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

impl StateOpts {
    /// The state directory: the flag, else the demo's, else the default.
    pub fn resolve(&self, setup: &Setup) -> PathBuf {
        resolve_state_dir(self.state_dir.as_deref(), setup)
    }
}

/// The one rule every command and `serve` use to find the state directory.
pub fn resolve_state_dir(flag: Option<&Path>, setup: &Setup) -> PathBuf {
    match (flag, &setup.state_dir) {
        (Some(s), _) => s.to_path_buf(),
        (None, Some(demo)) => demo.clone(),
        (None, None) => PathBuf::from(DEFAULT_STATE_DIR),
    }
}

/// Deadlines and the prepare budget: the same flags for the admin commands
/// and `serve`.
#[derive(Args, Debug, Clone)]
pub struct TimeoutOpts {
    /// Seconds an unbind may take before the GPU is reported stuck.
    #[arg(long, env = "VFIO_GPU_DRA_UNBIND_TIMEOUT", default_value_t = 10.0)]
    pub unbind_timeout: f64,
    /// Seconds a bind (or a driver probe) may take before the GPU is reported stuck.
    #[arg(long, env = "VFIO_GPU_DRA_BIND_TIMEOUT", default_value_t = 20.0)]
    pub bind_timeout: f64,
    /// Seconds a prepare may spend before it starts no further step and rolls
    /// back (the kubelet gives a call 45 s).
    #[arg(long, env = "VFIO_GPU_DRA_PREPARE_BUDGET", default_value_t = 20.0)]
    pub prepare_budget: f64,
}

impl TimeoutOpts {
    /// Engine settings with these deadlines for the host `setup` opened:
    /// its policy file re-read on every operation, and the ledger mirrored
    /// under the host's `/run` for the life of the boot.
    pub fn engine_config(&self, setup: &Setup) -> Result<EngineConfig> {
        Ok(EngineConfig {
            unbind_deadline: secs(self.unbind_timeout)?,
            bind_deadline: secs(self.bind_timeout)?,
            operation_budget: secs(self.prepare_budget)?,
            policy_file: Some(setup.policy_file.clone()),
            boot_mirror_dir: Some(setup.root.rel(BOOT_MIRROR_DIR)),
            fabric: setup.fabric_config()?,
            ..EngineConfig::default()
        })
    }
}

/// Host options plus what the engine needs.
#[derive(Args, Debug, Clone)]
pub struct EngineOpts {
    #[command(flatten)]
    pub host: HostOpts,
    #[command(flatten)]
    pub state: StateOpts,
    #[command(flatten)]
    pub timeouts: TimeoutOpts,
}

/// Simulated kernel latencies of the demo host: (write kind, driver, time).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelLatencies(pub Vec<(WriteKind, String, Duration)>);

/// Parses `KIND/DRIVER=DURATION,...` (durations in `ms` or `s`).
fn parse_kernel_latencies(spec: &str) -> Result<KernelLatencies, String> {
    let kinds = [
        WriteKind::Unbind,
        WriteKind::Bind,
        WriteKind::Reset,
        WriteKind::DriversProbe,
        WriteKind::DriverOverride,
        WriteKind::NvidiaUnbindLock,
    ];
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = |why: &str| format!("{item:?}: {why} (expected KIND/DRIVER=DURATION)");
        let (what, time) = item.split_once('=').ok_or_else(|| bad("no '='"))?;
        let (kind, driver) = what.split_once('/').ok_or_else(|| bad("no '/'"))?;
        let kind = kinds
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| bad("unknown write kind"))?;
        if driver.is_empty()
            || !driver
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(bad("bad driver name"));
        }
        let (number, unit) = match time.strip_suffix("ms") {
            Some(n) => (n, 1e-3),
            None => (
                time.strip_suffix('s')
                    .ok_or_else(|| bad("duration needs ms or s"))?,
                1.0,
            ),
        };
        let secs = number
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0 && *n * unit <= 600.0)
            .ok_or_else(|| bad("duration must be 0 to 600 s"))?
            * unit;
        out.push((kind, driver.to_string(), Duration::from_secs_f64(secs)));
    }
    Ok(KernelLatencies(out))
}

/// An opened host.
pub struct Setup {
    pub root: HostRoot,
    pub kernel: Arc<dyn Kernel>,
    pub selector: GpuSelector,
    pub policy: Policy,
    /// The policy file, re-read by every engine operation.
    pub policy_file: PathBuf,
    pub demo: bool,
    pub state_dir: Option<PathBuf>,
    /// How to reach Fabric Manager (built when an engine opens).
    pub fabric: crate::fabric_cmd::FabricOpts,
    /// The HGX demo's directory and host tree, with --demo --hgx.
    pub hgx_demo: Option<(PathBuf, PathBuf)>,
}

impl Setup {
    /// The engine's fabric settings: the HGX demo's simulated FM, or
    /// `--fm-endpoint`'s libnvfm; `None` without either.
    pub fn fabric_config(&self) -> Result<Option<vfio_gpu_engine::FabricConfig>> {
        match &self.hgx_demo {
            Some((dir, host)) => Ok(Some(crate::fabric_cmd::demo_config(
                dir,
                host,
                &self.fabric,
            )?)),
            None => self.fabric.config(),
        }
    }
}

/// The boot mirror of the ledger, under the host root: the host's `/run` is a
/// tmpfs, so the mirror dies with the boot whose bindings it records.
pub const BOOT_MIRROR_DIR: &str = "run/vfio-gpu-dra";

/// Where the ledger lives on a real host unless `--state-dir` says otherwise;
/// `serve` uses the same, so the lock excludes the CLI and the plugin.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vfio-gpu-dra";

fn default_demo_dir() -> PathBuf {
    std::env::temp_dir().join("vfio-gpu-dra-demo")
}

impl HostOpts {
    /// Opens the host for a read-only command that also shows the ledger of
    /// the shared state directory (read without the lock).
    pub fn open_with_state(&self, state: &StateOpts) -> Result<Setup> {
        let mut setup = self.open()?;
        setup.state_dir = Some(state.resolve(&setup));
        Ok(setup)
    }

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

    /// The policy file (the flag, else the host's under the host root, n1)
    /// and what it says now.
    fn load_policy(&self, root: &HostRoot) -> Result<(Policy, PathBuf)> {
        let path = self
            .policy
            .clone()
            .unwrap_or_else(|| root.rel("etc/vfio-gpu-dra/policy.toml"));
        let policy = Policy::load_or_default(root, &path)
            .with_context(|| format!("policy {}", path.display()))?;
        Ok((policy, path))
    }

    /// Opens the real host or the demo host.
    pub fn open(&self) -> Result<Setup> {
        let selector = self.selector()?;
        if self.demo {
            let dir = self.demo_dir.clone().unwrap_or_else(|| {
                let d = default_demo_dir();
                if self.hgx {
                    d.with_file_name("vfio-gpu-dra-demo-hgx")
                } else {
                    d
                }
            });
            let host = dir.join("host");
            if self.demo_reset && dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing demo host {}", dir.display()))?;
            }
            if !host.join("sys/bus/pci/devices").exists() {
                std::fs::create_dir_all(&host)
                    .with_context(|| format!("creating demo host {}", host.display()))?;
                if self.hgx {
                    vfio_gpu_host::demo::build_hgx_demo_host(&host)
                } else {
                    vfio_gpu_host::demo::build_demo_host(&host)
                }
                .with_context(|| format!("building demo host in {}", host.display()))?;
            }
            let root = HostRoot::open(&host)?;
            let (policy, policy_file) = self.load_policy(&root)?;
            // Every simulated sysfs write, from every command on this demo host.
            let sim = SimKernel::booted(root.clone()).with_log_file(dir.join("kernel.log"));
            for (kind, driver, latency) in self.demo_kernel_latency.iter().flat_map(|l| &l.0) {
                sim.set_latency(*kind, driver, *latency);
            }
            let kernel: Arc<dyn Kernel> = Arc::new(sim);
            return Ok(Setup {
                root,
                kernel,
                selector,
                policy,
                policy_file,
                demo: true,
                state_dir: Some(dir.join("state")),
                fabric: self.fabric.clone(),
                hgx_demo: self.hgx.then(|| (dir.clone(), host.clone())),
            });
        }
        let root = HostRoot::open(&self.host_root)?;
        let (policy, policy_file) = self.load_policy(&root)?;
        Ok(Setup {
            kernel: Arc::new(SysfsKernel::new(root.clone())),
            root,
            selector,
            policy,
            policy_file,
            demo: false,
            state_dir: None,
            fabric: self.fabric.clone(),
            hgx_demo: None,
        })
    }
}

impl EngineOpts {
    /// The state directory the engine would open, without opening it.
    pub fn state_dir(&self) -> Result<PathBuf> {
        let setup = self.host.open()?;
        Ok(self.state.resolve(&setup))
    }

    /// Opens the host and the engine (takes the state lock, loads the ledger).
    /// Fails at once, naming the holder, when `serve` or another command
    /// holds the state directory: an admin should not wait on a plugin that
    /// never lets go.
    pub fn open_engine(&self) -> Result<(Engine, Setup)> {
        let mut setup = self.host.open()?;
        let state_dir = self.state.resolve(&setup);
        setup.state_dir = Some(state_dir.clone());
        let config = EngineConfig {
            crash_after_step: crash_hook()?,
            crash_mode: CrashMode::Abort,
            state_lock_wait: Duration::ZERO,
            ..self.timeouts.engine_config(&setup)?
        };
        let opened = Engine::open(
            Arc::clone(&setup.kernel),
            &state_dir,
            setup.selector.clone(),
            setup.policy.clone(),
            config,
        );
        let (engine, report) = match opened {
            Ok(o) => o,
            Err(EngineError::StateLocked(_)) => return Err(locked_error(&state_dir)),
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("opening state directory {}", state_dir.display())));
            }
        };
        report_open(&report);
        Ok((engine, setup))
    }
}

/// Why the engine could not lock `dir`: who holds it (from the lock file),
/// or the I/O error on the lock file.
fn locked_error(dir: &Path) -> anyhow::Error {
    match probe_state_lock(dir) {
        Err(e @ LockError::Held { .. }) => anyhow::anyhow!(
            "{e}; while `vfio-gpu-dra serve` runs on this node, bind and release GPUs through \
             ResourceClaims (or stop the plugin first); `devices`, `explain` and `ledger` \
             work without the lock"
        ),
        Err(e @ LockError::Io { .. }) => anyhow::Error::from(e),
        // Freed between the two attempts: the holder just exited.
        Ok(()) => anyhow::anyhow!(
            "state directory {} was locked by another vfio-gpu-dra process; try again",
            dir.display()
        ),
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
        match &p.moved_to {
            Some(to) => eprintln!(
                "warning: ledger corrupt ({}); moved to {}; state rebuilt from the host",
                p.reason,
                to.display()
            ),
            None => eprintln!(
                "warning: ledger kept read-only ({}); nothing will be recorded or moved",
                p.reason
            ),
        }
    }
    for r in &report.earlier_boot_records {
        eprintln!("note: dropped a record from an earlier boot: {r}");
    }
    if let Some(a) = &report.adopted_from_mirror {
        eprintln!("note: {a}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_kernel_latencies_parse_or_say_what_is_wrong() {
        let l = parse_kernel_latencies("unbind/nvidia=2s, bind/vfio-pci=300ms,reset/vfio-pci=0.5s")
            .unwrap();
        assert_eq!(
            l.0,
            vec![
                (WriteKind::Unbind, "nvidia".into(), Duration::from_secs(2)),
                (
                    WriteKind::Bind,
                    "vfio-pci".into(),
                    Duration::from_millis(300)
                ),
                (
                    WriteKind::Reset,
                    "vfio-pci".into(),
                    Duration::from_millis(500)
                ),
            ]
        );
        assert_eq!(parse_kernel_latencies("").unwrap().0, vec![]);
        for (bad, why) in [
            ("unbind/nvidia", "no '='"),
            ("unbind=2s", "no '/'"),
            ("remove/nvidia=2s", "unknown write kind"),
            ("unbind/../x=2s", "bad driver name"),
            ("unbind/=2s", "bad driver name"),
            ("unbind/nvidia=2", "ms or s"),
            ("unbind/nvidia=-1s", "0 to 600 s"),
            ("unbind/nvidia=NaNs", "0 to 600 s"),
            ("unbind/nvidia=601s", "0 to 600 s"),
        ] {
            let e = parse_kernel_latencies(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn every_command_and_serve_share_one_default_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
        let host = HostOpts {
            host_root: dir.path().to_path_buf(),
            demo: false,
            demo_dir: None,
            demo_reset: false,
            demo_kernel_latency: None,
            hgx: false,
            fabric: crate::fabric_cmd::FabricOpts::default(),
            gpu_ids: Vec::new(),
            gpu_classes: Vec::new(),
            policy: Some("/nonexistent/policy.toml".into()),
            output: Output::Table,
        };
        let setup = host.open_with_state(&StateOpts::default()).unwrap();
        assert_eq!(
            setup.state_dir.as_deref(),
            Some(Path::new("/var/lib/vfio-gpu-dra"))
        );
        assert_eq!(
            resolve_state_dir(None, &setup),
            Path::new("/var/lib/vfio-gpu-dra")
        );
        let flag = Path::new("/srv/state");
        assert_eq!(resolve_state_dir(Some(flag), &setup), flag);
    }
}
