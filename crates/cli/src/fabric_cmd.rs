//! NVLink fabric options and `vfio-gpu-dra fabric status|reconcile|learn`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use vfio_gpu_engine::{FabricConfig, FabricPolicy, ModuleIdReader};
use vfio_gpu_fabric::{
    Activated, Deactivated, Endpoint, FabricManager, FmError, NvfmConfig, NvfmLibrary,
    NvlinkFailedDevices, NvmlModuleIds, PartitionId, PartitionList, Platform, SimFabricManager,
    SimState, SystemClock, UnsupportedPartition,
};

use crate::Output;
use crate::setup::EngineOpts;

/// How this node reaches NVIDIA Fabric Manager.
#[derive(Args, Debug, Clone)]
pub struct FabricOpts {
    /// Fabric Manager's API endpoint (`unix:/run/nvidia-fabricmanager/socket`,
    /// `tcp:127.0.0.1:6666`, `vsock:<cid>:<port>`); unset: no NVLink
    /// partitions are managed.
    #[arg(long, env = "VFIO_GPU_DRA_FM_ENDPOINT", value_name = "ENDPOINT")]
    pub fm_endpoint: Option<String>,
    /// The host's `libnvfm.so.1` (default: the loader's search path).
    #[arg(long, env = "VFIO_GPU_DRA_FM_LIBRARY", value_name = "PATH")]
    pub fm_library: Option<PathBuf>,
    /// A claim that is not exactly one partition: Required (fail), BestEffort
    /// (1-GPU partitions), Disabled (no FM calls).
    #[arg(long, env = "VFIO_GPU_DRA_FABRIC_POLICY", default_value = "Required")]
    pub fabric_policy: String,
    /// Replay the active partitions after an FM `--restart`
    /// (`fmSetActivatedFabricPartitions`); exactly one component may.
    #[arg(long, env = "VFIO_GPU_DRA_FM_RESILIENCY_AGENT")]
    pub fm_resiliency_agent: bool,
    /// Static module map `{"<BDF>": <module id>}` for GPUs on vfio since boot.
    #[arg(long, env = "VFIO_GPU_DRA_MODULE_MAP", value_name = "PATH")]
    pub module_map: Option<PathBuf>,
    /// The host's NVML (`libnvidia-ml.so.1`), read for the module ids of GPUs
    /// on `nvidia` (default: the loader's search path; with --demo --hgx:
    /// none unless given).
    #[arg(long, env = "VFIO_GPU_DRA_NVML_LIBRARY", value_name = "PATH")]
    pub nvml_library: Option<PathBuf>,
}

/// The flags' defaults (the demo builds its options without clap): a derived
/// `Default` would leave the policy empty, which does not parse.
impl Default for FabricOpts {
    fn default() -> Self {
        FabricOpts {
            fm_endpoint: None,
            fm_library: None,
            fabric_policy: "Required".to_string(),
            fm_resiliency_agent: false,
            module_map: None,
            nvml_library: None,
        }
    }
}

impl FabricOpts {
    /// The engine's fabric settings; `None` without `--fm-endpoint`.
    pub fn config(&self) -> Result<Option<FabricConfig>> {
        let Some(ep) = &self.fm_endpoint else {
            return Ok(None);
        };
        let endpoint: Endpoint = ep.parse().context("--fm-endpoint")?;
        let nv = NvfmConfig::new(endpoint);
        let lib = match &self.fm_library {
            Some(p) => NvfmLibrary::open_path(p, nv),
            None => NvfmLibrary::open(nv),
        }
        .context("loading Fabric Manager's libnvfm (install the FM devel package)")?;
        let mut c = FabricConfig::new(Arc::new(lib));
        c.policy = self.policy()?;
        c.resiliency_agent = self.fm_resiliency_agent;
        c.module_map_file.clone_from(&self.module_map);
        c.module_ids = self.nvml(true)?;
        Ok(Some(c))
    }

    /// NVML for module ids. An explicit `--nvml-library` must load; the
    /// default soname may be missing (a node whose GPUs are all on vfio since
    /// boot has no use for it; the static map covers them), which is logged.
    fn nvml(&self, try_default: bool) -> Result<Option<Arc<dyn ModuleIdReader>>> {
        let reader = match &self.nvml_library {
            Some(p) => NvmlModuleIds::open_path(p)
                .with_context(|| format!("--nvml-library {}", p.display()))?,
            None if try_default => match NvmlModuleIds::open() {
                Ok(n) => n,
                Err(e) => {
                    tracing::info!(error = %e, "no NVML: module ids come from the ledger, --module-map and FM only");
                    return Ok(None);
                }
            },
            None => return Ok(None),
        };
        Ok(Some(Arc::new(reader)))
    }

    fn policy(&self) -> Result<FabricPolicy> {
        self.fabric_policy
            .parse::<FabricPolicy>()
            .map_err(anyhow::Error::msg)
    }
}

/// A simulated Fabric Manager whose state lives in a JSON file, so the HGX
/// demo's commands (`bind`, `fabric status`, `serve --demo --hgx`) share it.
/// Every call is one read-modify-write under an exclusive lock on a sibling
/// `.lock` file, and the file is replaced by rename: serve's fabric watch, a
/// prepare and another command may call at once without a torn read or a lost
/// activation (tests read the file while serve runs, too).
pub struct FileSimFm {
    path: PathBuf,
}

impl FileSimFm {
    /// Uses (and creates, with an HGX H100 table) the state file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let fm = FileSimFm {
            path: path.to_path_buf(),
        };
        let _lock = fm.lock().map_err(anyhow::Error::msg)?;
        if !path.exists() {
            fm.store(&SimState::new(Platform::HgxH100))
                .map_err(anyhow::Error::msg)?;
        }
        Ok(fm)
    }

    /// Holds the state file's lock until dropped.
    fn lock(&self) -> Result<std::fs::File, String> {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".lock");
        let lock_path = PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        file.lock()
            .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
        Ok(file)
    }

    /// Replaces the state file in one rename, so a reader sees the old or the new state.
    fn store(&self, state: &SimState) -> Result<(), String> {
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| format!("temporary file in {}: {e}", dir.display()))?;
        std::io::Write::write_all(&mut tmp, &bytes).map_err(|e| e.to_string())?;
        tmp.persist(&self.path)
            .map_err(|e| format!("writing {}: {e}", self.path.display()))?;
        Ok(())
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&SimFabricManager) -> Result<T, FmError>,
    ) -> Result<T, FmError> {
        let worker = |detail: String| FmError::Worker(format!("{}: {detail}", self.path.display()));
        let _lock = self.lock().map_err(FmError::Worker)?;
        let text = std::fs::read(&self.path).map_err(|e| worker(e.to_string()))?;
        let state: SimState = serde_json::from_slice(&text).map_err(|e| worker(e.to_string()))?;
        let sim = SimFabricManager::with_state(state, Arc::new(SystemClock));
        let r = f(&sim);
        self.store(&sim.state()).map_err(FmError::Worker)?;
        r
    }
}

impl FabricManager for FileSimFm {
    fn get_supported_partitions(&self) -> Result<PartitionList, FmError> {
        self.with(|s| s.get_supported_partitions())
    }
    fn activate(&self, id: PartitionId) -> Result<Activated, FmError> {
        self.with(|s| s.activate(id))
    }
    fn deactivate(&self, id: PartitionId) -> Result<Deactivated, FmError> {
        self.with(|s| s.deactivate(id))
    }
    fn set_activated_partitions(&self, ids: &[PartitionId]) -> Result<(), FmError> {
        self.with(|s| s.set_activated_partitions(ids))
    }
    fn get_nvlink_failed_devices(&self) -> Result<NvlinkFailedDevices, FmError> {
        self.with(|s| s.get_nvlink_failed_devices())
    }
    fn get_unsupported_partitions(&self) -> Result<Vec<UnsupportedPartition>, FmError> {
        self.with(|s| s.get_unsupported_partitions())
    }
}

/// The HGX demo's fabric: the file-backed simulated FM under `demo_dir`,
/// the host's static module map, this engine as the resiliency agent, and
/// `--fabric-policy` as with a real FM. `opts.nvml_library`, when given,
/// reads module ids too (tests point it at the fake NVML).
pub fn demo_config(demo_dir: &Path, host: &Path, opts: &FabricOpts) -> Result<FabricConfig> {
    // Checked before the state file is created: a bad flag changes nothing.
    let policy = opts.policy()?;
    let fm = FileSimFm::open(&demo_dir.join("fabric-manager.json"))?;
    let mut c = FabricConfig::new(Arc::new(fm));
    c.policy = policy;
    c.resiliency_agent = true;
    c.module_map_file = Some(host.join(vfio_gpu_host::demo::HGX_MODULE_MAP_FILE));
    c.module_ids = opts.nvml(false)?;
    Ok(c)
}

/// `vfio-gpu-dra fabric …`.
#[derive(Subcommand, Debug)]
pub enum FabricCommand {
    /// Fabric Manager's partitions, the ledger's, and the module map.
    Status(EngineOpts),
    /// Bring the ledger and FM's active partitions in line (what `serve`
    /// does at start and periodically).
    Reconcile(EngineOpts),
    /// Read a GPU's module id through NVML, binding it to `nvidia` for the
    /// read when it is on vfio (and back). Needs --yes: the bind can hang.
    Learn(LearnArgs),
}

/// `fabric learn` arguments.
#[derive(Args, Debug)]
pub struct LearnArgs {
    /// The GPU's PCI address.
    bdf: String,
    /// Go ahead: rebinding a GPU to `nvidia` is what can hang on HGX boards.
    #[arg(long)]
    yes: bool,
    #[command(flatten)]
    engine: EngineOpts,
}

/// Printed before every learn, and instead of it without --yes.
const LEARN_WARNING: &str = "\
WARNING: `fabric learn` binds the GPU to the host's nvidia driver so NVML can read its
module id, then binds it back to vfio. On HGX boards that bind is the operation that can
hang (the reason this plugin keeps GPUs on vfio): run it on an idle node, in a maintenance
window, once per GPU; the id is kept in the ledger. A GPU held by a claim, kept by the
plugin, in an NVLink partition or open by a process is refused. The alternative that
never rebinds: a static map (--module-map) written from `nvidia-smi -q` before the GPUs
went to vfio.";

/// Runs a `fabric` subcommand.
pub fn run(cmd: FabricCommand) -> Result<ExitCode> {
    match cmd {
        FabricCommand::Status(opts) => {
            let (engine, _setup) = opts.open_engine()?;
            let Some(status) = engine.fabric_status() else {
                bail!("no Fabric Manager configured (--fm-endpoint, or --demo --hgx)");
            };
            if opts.host.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "policy {:?}, resiliency agent {}",
                status.policy, status.resiliency_agent
            );
            match &status.fm {
                Ok(list) => {
                    println!("Fabric Manager: {} partitions", list.partitions.len());
                    for p in &list.partitions {
                        let modules: Vec<String> = p.modules().map(|m| m.to_string()).collect();
                        println!(
                            "  {:>3} {:<8} modules {}",
                            p.id,
                            if p.is_active { "ACTIVE" } else { "inactive" },
                            modules.join(",")
                        );
                    }
                }
                Err(e) => println!("Fabric Manager: {e}"),
            }
            println!("Ledger partitions:");
            if status.ledger.partitions.is_empty() {
                println!("  none");
            }
            for (id, r) in &status.ledger.partitions {
                let bdfs: Vec<String> = r.bdfs.iter().map(ToString::to_string).collect();
                println!(
                    "  {:>3} {:?} for {} ({}), operation {}",
                    id,
                    r.state,
                    r.holder
                        .as_ref()
                        .map_or_else(|| "nobody".to_string(), ToString::to_string),
                    bdfs.join(", "),
                    r.operation
                );
            }
            println!("Module map:");
            match &status.module_map {
                Ok(m) if m.is_empty() => println!("  empty"),
                Ok(m) => {
                    for (bdf, (module, source)) in m {
                        println!("  {bdf}  module {module}  ({source:?})");
                    }
                }
                Err(e) => println!("  {e}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        FabricCommand::Learn(args) => {
            eprintln!("{LEARN_WARNING}");
            if !args.yes {
                bail!(
                    "not done: pass --yes to bind {} to nvidia for the read",
                    args.bdf
                );
            }
            let bdf: vfio_gpu_host::Bdf = args.bdf.parse().context("the GPU's PCI address")?;
            let (engine, _setup) = args.engine.open_engine()?;
            let out = engine.fabric_learn(bdf)?;
            if args.engine.host.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(ExitCode::SUCCESS);
            }
            match out.module_id {
                Some(m) => println!("{bdf}: module {m} ({}); recorded in the ledger", out.detail),
                None => println!(
                    "{bdf}: NVML reports no module id (not a baseboard GPU; {})",
                    out.detail
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        FabricCommand::Reconcile(opts) => {
            let (engine, _setup) = opts.open_engine()?;
            let results = engine.fabric_reconcile()?;
            if opts.host.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&results)?);
                return Ok(ExitCode::SUCCESS);
            }
            if results.is_empty() {
                println!("nothing to do");
            }
            for o in results {
                let ids: Vec<String> = o.partitions.iter().map(ToString::to_string).collect();
                println!("partition {}: {:?}: {}", ids.join(","), o.action, o.detail);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two users of one state file at once (serve's fabric watch and a
    /// prepare, or serve and `fabric status`): no call fails on a torn file
    /// and no call's effect is lost.
    #[test]
    fn file_sim_fm_concurrent_calls_lose_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("fabric-manager.json");
        let rounds = 100;
        std::thread::scope(|s| {
            let toggler = s.spawn(|| {
                let fm = FileSimFm::open(&path).expect("open");
                for _ in 0..rounds {
                    fm.activate(PartitionId(7)).expect("activate");
                    fm.deactivate(PartitionId(7)).expect("deactivate");
                }
            });
            let lister = s.spawn(|| {
                let fm = FileSimFm::open(&path).expect("open");
                for _ in 0..rounds {
                    fm.get_supported_partitions().expect("list");
                }
            });
            toggler.join().expect("toggler");
            lister.join().expect("lister");
        });
        let state: SimState =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
        assert!(state.active.is_empty(), "active {:?}", state.active);
        // Each call is logged after its session's connect.
        let calls = state
            .log
            .iter()
            .filter(|e| e.call != vfio_gpu_fabric::Call::Connect)
            .count();
        assert_eq!(calls, 3 * rounds, "calls logged");
    }
}
