//! `doctor`'s NVLink fabric checks, for nodes with a Fabric Manager
//! configured (`--fm-endpoint`): FM answers, runs in Shared NVSwitch mode
//! (`FABRIC_MODE=1`), has its NVLink Subnet Manager on NVLink 5 boards, and
//! every GPU has a module id. Facts are read by [`FabricFacts::read`];
//! [`diagnose_fabric`] judges them with pure functions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vfio_gpu_fabric::{FabricManager, ModuleMapBuilder, ModuleSource, PartitionList};
use vfio_gpu_host::{Bdf, HostRoot};

use crate::checks::{Check, Status};

/// Fabric Manager's configuration file, under the host root.
pub const FM_CONFIG_FILE: &str = "usr/share/nvidia/nvswitch/fabricmanager.cfg";

/// The process name of NVIDIA's NVLink Subnet Manager (NVLink 5).
pub const NVLSM_PROCESS: &str = "nvlsm";

/// What the fabric checks look at.
#[derive(Clone, Debug)]
pub struct FabricFacts {
    /// FM's partition list, or why it could not be read.
    pub fm: Option<Result<PartitionList, String>>,
    /// `fabricmanager.cfg`'s text (`None`: absent, e.g. FM in a service VM).
    pub fm_config: Option<String>,
    /// A process named `nvlsm` runs on the host.
    pub nvlsm_running: bool,
    /// The GPUs and the module id each resolves to (`None`: unknown), or why
    /// the map cannot be built (a conflict between sources).
    pub module_map: Result<BTreeMap<Bdf, Option<u32>>, String>,
}

impl Default for FabricFacts {
    /// No FM configured.
    fn default() -> Self {
        FabricFacts {
            fm: None,
            fm_config: None,
            nvlsm_running: false,
            module_map: Ok(BTreeMap::new()),
        }
    }
}

impl FabricFacts {
    /// Reads the facts: FM's list through `fm`, the config file and `/proc`
    /// under `root`, and the module map from `ledger` (module ids the ledger
    /// recorded), the admin's `static_map` and FM's BDFs, for `gpus`.
    pub fn read(
        root: &HostRoot,
        fm: &dyn FabricManager,
        gpus: &[Bdf],
        ledger: &BTreeMap<Bdf, u32>,
        static_map: Option<&Path>,
    ) -> FabricFacts {
        let fm_list = fm.get_supported_partitions().map_err(|e| e.to_string());
        let fm_config = root.read_opt(&root.rel(FM_CONFIG_FILE)).ok().flatten();
        let module_map = module_map(gpus, ledger, static_map, fm_list.as_ref().ok());
        FabricFacts {
            fm: Some(fm_list),
            fm_config,
            nvlsm_running: process_running(root, &root.rel("proc"), NVLSM_PROCESS),
            module_map,
        }
    }
}

fn module_map(
    gpus: &[Bdf],
    ledger: &BTreeMap<Bdf, u32>,
    static_map: Option<&Path>,
    fm: Option<&PartitionList>,
) -> Result<BTreeMap<Bdf, Option<u32>>, String> {
    let mut b = ModuleMapBuilder::new();
    for (bdf, m) in ledger {
        b.add(ModuleSource::Ledger, *bdf, vfio_gpu_fabric::ModuleId(*m))
            .map_err(|e| e.to_string())?;
    }
    if let Some(p) = static_map {
        b.add_admin_map_file(p).map_err(|e| e.to_string())?;
    }
    if let Some(list) = fm {
        b.add_fm_list(list).map_err(|e| e.to_string())?;
    }
    let map = b.build().map_err(|e| e.to_string())?;
    Ok(gpus
        .iter()
        .map(|g| (*g, map.module_of(*g).map(|e| e.module.0)))
        .collect())
}

/// Whether a process whose `comm` is `name` runs (reads `<proc>/*/comm`).
fn process_running(root: &HostRoot, proc_dir: &Path, name: &str) -> bool {
    let Ok(entries) = root.read_dir(proc_dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let pid_dir: PathBuf = e.path();
        e.file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
            && root
                .read_opt(&pid_dir.join("comm"))
                .is_ok_and(|c| c.is_some_and(|c| c.trim() == name))
    })
}

/// `FABRIC_MODE` in FM's configuration text.
fn fabric_mode(cfg: &str) -> Option<&str> {
    cfg.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix("FABRIC_MODE="))
        .map(str::trim)
}

/// The fabric checks: `fabric-manager`, `fabric-mode`, `nvlsm`,
/// `module-map`. Empty when no FM is configured.
pub fn diagnose_fabric(f: &FabricFacts) -> Vec<Check> {
    let Some(fm) = &f.fm else {
        return Vec::new();
    };
    vec![
        check_fm(fm),
        check_fabric_mode(f.fm_config.as_deref()),
        check_nvlsm(fm.as_ref().ok(), f.nvlsm_running),
        check_module_map(&f.module_map),
    ]
}

/// `fabric-manager`: FM answers its partition query.
pub fn check_fm(fm: &Result<PartitionList, String>) -> Check {
    match fm {
        Ok(list) => Check::pass(
            "fabric-manager",
            format!(
                "Fabric Manager answers: {} partitions, {} active",
                list.partitions.len(),
                list.partitions.iter().filter(|p| p.is_active).count()
            ),
        ),
        Err(e) => Check::new(
            "fabric-manager",
            Status::Fail,
            format!("Fabric Manager does not answer: {e}"),
            "start it (`systemctl enable --now nvidia-fabricmanager`) and make --fm-endpoint match FM_CMD_UNIX_SOCKET_PATH (or FM_CMD_BIND_INTERFACE/FM_CMD_PORT_NUMBER) in fabricmanager.cfg; until then every NVLink claim fails".into(),
        ),
    }
}

/// `fabric-mode`: FM runs in Shared NVSwitch mode (`FABRIC_MODE=1`), the
/// only mode in which partitions can be activated for VMs.
pub fn check_fabric_mode(cfg: Option<&str>) -> Check {
    let fix = format!(
        "set FABRIC_MODE=1 (Shared NVSwitch multitenancy) in /{FM_CONFIG_FILE} and restart nvidia-fabricmanager"
    );
    match cfg.map(fabric_mode) {
        Some(Some("1")) => {
            Check::pass("fabric-mode", format!("FABRIC_MODE=1 in /{FM_CONFIG_FILE}"))
        }
        Some(Some(m)) => Check::new(
            "fabric-mode",
            Status::Fail,
            format!("FABRIC_MODE={m} in /{FM_CONFIG_FILE}: partitions cannot be activated for VMs"),
            fix,
        ),
        Some(None) => Check::new(
            "fabric-mode",
            Status::Fail,
            format!("no FABRIC_MODE in /{FM_CONFIG_FILE}: FM defaults to 0 (bare metal)"),
            fix,
        ),
        None => Check::new(
            "fabric-mode",
            Status::Warn,
            format!(
                "/{FM_CONFIG_FILE} not found (FM in a service VM?): the mode cannot be checked here"
            ),
            "make sure the FM this node talks to runs with FABRIC_MODE=1".into(),
        ),
    }
}

/// `nvlsm`: on NVLink 5 boards (B200/B300) FM needs the NVLink Subnet
/// Manager.
pub fn check_nvlsm(fm: Option<&PartitionList>, running: bool) -> Check {
    // Blackwell tables are 1-based, Hopper 0-based (reference §5).
    let nvl5 =
        fm.map(|l| !l.partitions.is_empty() && l.get(vfio_gpu_fabric::PartitionId(0)).is_none());
    match (nvl5, running) {
        (Some(false), _) => Check::pass("nvlsm", "NVLink 4 board: no subnet manager needed".into()),
        (Some(true), true) => Check::pass("nvlsm", "NVLink 5 board, nvlsm runs".into()),
        (Some(true), false) => Check::new(
            "nvlsm",
            Status::Fail,
            "NVLink 5 board (B200/B300) but no nvlsm process: FM cannot bring up the NVLink fabric".into(),
            "install NVIDIA's nvlsm package (the version of the FM) and start it with nvidia-fabricmanager".into(),
        ),
        (None, _) => Check::new(
            "nvlsm",
            Status::Warn,
            "Fabric Manager did not answer: the NVLink generation is unknown".into(),
            "fix the fabric-manager check first".into(),
        ),
    }
}

/// `module-map`: every GPU resolves to a module id (else it gets no
/// `partitionN` attribute and NVLink claims cannot use it).
pub fn check_module_map(map: &Result<BTreeMap<Bdf, Option<u32>>, String>) -> Check {
    match map {
        Err(e) => Check::new(
            "module-map",
            Status::Fail,
            format!("the module map is inconsistent: {e}"),
            "a wrong map activates the wrong partition: correct the static map (--module-map) from `nvidia-smi -q` (Module ID) or remove the stale ledger entry".into(),
        ),
        Ok(m) => {
            let missing: Vec<String> = m
                .iter()
                .filter(|(_, id)| id.is_none())
                .map(|(b, _)| b.to_string())
                .collect();
            if missing.is_empty() {
                Check::pass("module-map", format!("all {} GPUs have a module id", m.len()))
            } else {
                Check::new(
                    "module-map",
                    Status::Fail,
                    format!(
                        "no module id for {} of {} GPUs: {}",
                        missing.len(),
                        m.len(),
                        missing.join(", ")
                    ),
                    format!(
                        "add them to the static map (--module-map, {{\"<BDF>\": <Module ID from nvidia-smi -q>}}), or read each once with `vfio-gpu-dra fabric learn {} --yes` (rebinds it to nvidia: idle node only)",
                        missing[0]
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_gpu_fabric::{Platform, SimFabricManager, SimState};

    fn list(p: Platform) -> PartitionList {
        SimFabricManager::with_state(
            SimState::new(p),
            std::sync::Arc::new(vfio_gpu_fabric::SystemClock),
        )
        .get_supported_partitions()
        .unwrap()
    }

    #[test]
    fn fm_unreachable_fails_with_the_service_to_start() {
        let c = check_fm(&Err("CONNECTION_NOT_VALID (-9)".into()));
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("nvidia-fabricmanager"), "{}", c.fix);
        let c = check_fm(&Ok(list(Platform::HgxH100)));
        assert_eq!(c.status, Status::Pass);
        assert!(c.detail.contains("15 partitions"), "{}", c.detail);
    }

    #[test]
    fn fabric_mode_must_be_one() {
        let pass = check_fabric_mode(Some("# comment\nFABRIC_MODE=1\nLOG_LEVEL=4\n"));
        assert_eq!(pass.status, Status::Pass);
        assert!(pass.fix.is_empty());
        let c = check_fabric_mode(Some("FABRIC_MODE=0\n"));
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("FABRIC_MODE=1"), "{}", c.fix);
        // A commented-out line does not count.
        let c = check_fabric_mode(Some("#FABRIC_MODE=1\n"));
        assert_eq!(c.status, Status::Fail);
        assert_eq!(check_fabric_mode(None).status, Status::Warn);
    }

    #[test]
    fn nvlsm_is_needed_on_nvl5_only() {
        let h100 = list(Platform::HgxH100);
        let b200 = list(Platform::HgxB200);
        assert_eq!(check_nvlsm(Some(&h100), false).status, Status::Pass);
        assert_eq!(check_nvlsm(Some(&b200), true).status, Status::Pass);
        let c = check_nvlsm(Some(&b200), false);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("nvlsm"), "{}", c.fix);
        assert_eq!(check_nvlsm(None, false).status, Status::Warn);
    }

    #[test]
    fn module_map_names_the_gpus_without_an_id_and_conflicts_fail() {
        let a: Bdf = "0000:9a:00.0".parse().unwrap();
        let b: Bdf = "0000:ab:00.0".parse().unwrap();
        let c = check_module_map(&Ok(BTreeMap::from([(a, Some(1)), (b, None)])));
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("0000:ab:00.0"), "{}", c.detail);
        assert!(
            c.fix.contains("fabric learn 0000:ab:00.0 --yes"),
            "{}",
            c.fix
        );
        let c = check_module_map(&Ok(BTreeMap::from([(a, Some(1)), (b, Some(3))])));
        assert_eq!(c.status, Status::Pass);
        let c = check_module_map(&Err("module 1 is claimed by two GPUs".into()));
        assert_eq!(c.status, Status::Fail);
    }

    #[test]
    fn facts_read_from_a_host_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
        let root = HostRoot::open(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("usr/share/nvidia/nvswitch")).unwrap();
        std::fs::write(dir.path().join(FM_CONFIG_FILE), "FABRIC_MODE=1\n").unwrap();
        std::fs::create_dir_all(dir.path().join("proc/77")).unwrap();
        std::fs::write(dir.path().join("proc/77/comm"), "nvlsm\n").unwrap();
        let map = dir.path().join("map.json");
        std::fs::write(&map, r#"{"0000:9a:00.0": 1}"#).unwrap();
        let fm = SimFabricManager::new(Platform::HgxB200);
        let a: Bdf = "0000:9a:00.0".parse().unwrap();
        let b: Bdf = "0000:ab:00.0".parse().unwrap();
        let ledger = BTreeMap::from([(b, 3)]);
        let f = FabricFacts::read(&root, &fm, &[a, b], &ledger, Some(&map));
        let checks = diagnose_fabric(&f);
        let names: Vec<(&str, Status)> = checks.iter().map(|c| (c.check, c.status)).collect();
        assert_eq!(
            names,
            vec![
                ("fabric-manager", Status::Pass),
                ("fabric-mode", Status::Pass),
                ("nvlsm", Status::Pass),
                ("module-map", Status::Pass),
            ]
        );
        // No FM configured: no fabric checks at all.
        assert!(diagnose_fabric(&FabricFacts::default()).is_empty());
    }
}
