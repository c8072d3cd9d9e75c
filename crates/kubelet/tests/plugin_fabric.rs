//! NVLink partitions through the plugin on the HGX demo host: a 2-GPU claim
//! tied by `matchAttribute: vfio-gpu.dra.dev/partition2` activates exactly
//! its partition at prepare and deactivates it at unprepare.

mod plugin_common;

use std::collections::BTreeSet;
use std::sync::Arc;

use plugin_common::*;
use vfio_gpu_engine::fabric_state::PartitionState;
use vfio_gpu_engine::{FabricConfig, Holder};
use vfio_gpu_fabric::{Call, Fault, FaultAction, FmCode, PartitionId, Platform, SimFabricManager};
use vfio_gpu_host::demo::HGX_MODULE_MAP_FILE;
use vfio_gpu_kubelet::slices::{device_attributes, device_infos};

/// Modules 1 and 3 (H100 partition 3), not PCI neighbours by module.
const M1: &str = "0000:9a:00.0";
const M3: &str = "0000:ab:00.0";
/// Module 2.
const M2: &str = "0000:ba:00.0";

async fn hgx() -> (Env, Arc<SimFabricManager>) {
    let mut env = Env::new_hgx().await;
    let fm = Arc::new(SimFabricManager::new(Platform::HgxH100));
    let mut c = FabricConfig::new(fm.clone());
    c.module_map_file = Some(env.host.join(HGX_MODULE_MAP_FILE));
    c.resiliency_agent = true;
    env.fabric = Some(c);
    (env, fm)
}

fn active(fm: &SimFabricManager) -> BTreeSet<u32> {
    fm.state().active.iter().map(|p| p.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_gpu_nvlink_claim_activates_exactly_its_partition() {
    let (env, fm) = hgx().await;
    let running = env.start().await;
    let engine = running.plugin.engine().clone();
    engine
        .fabric_reconcile()
        .expect("fabric reconcile at start");
    // What the scheduler matches on: gpuModuleID and partition2.
    let (views, _) = engine.discover().expect("discover");
    let infos = device_infos(&views);
    assert_eq!(infos.len(), 8, "8 GPUs offered, no NVSwitch");
    for (b, module, p2) in [(M1, 1, 3), (M3, 3, 3), (M2, 2, 4)] {
        let info = infos.iter().find(|i| i.bdf == bdf(b)).expect("offered");
        let a = device_attributes(info);
        assert_eq!(a["gpuModuleID"].int, Some(module), "{b}");
        assert_eq!(a["partition2"].int, Some(p2), "{b}");
        assert_eq!(a["partition8"].int, Some(0), "{b}");
        assert_eq!(a["nvlinkFabric"].string.as_deref(), Some("nvl4"));
        assert_eq!(a["fabricManaged"].bool, Some(true));
    }

    let claim = env.claim("vm", &[("gpu0", M1), ("gpu1", M3)]);
    let r = running.prepare_one(&claim).await;
    assert!(matches!(r.get(&claim.uid), Some(Ok(_))), "{r:?}");
    assert_eq!(active(&fm), BTreeSet::from([3]));
    let ledger = engine.ledger();
    let rec = &ledger.fabric.partitions[&PartitionId(3)];
    assert!(
        matches!(&rec.holder, Some(Holder::Claim { uid, .. }) if *uid == claim.uid),
        "{rec:?}"
    );
    for g in [M1, M3] {
        assert_eq!(env.driver_of(g).as_deref(), Some("vfio-pci"), "{g}");
    }
    // The `active` mark follows the answer; once written, the file says so.
    running.plugin.settle().await;
    assert_eq!(
        engine.ledger().fabric.partitions[&PartitionId(3)].state,
        PartitionState::Active
    );
    let on_file = vfio_gpu_engine::ledger::LedgerFile::new(&env.state_dir())
        .expect("ledger file")
        .load();
    assert_eq!(
        on_file.0.fabric.partitions[&PartitionId(3)].state,
        PartitionState::Active
    );
    // A retried prepare changes nothing at FM.
    let calls = fm.state().log.len();
    let again = running.prepare_one(&claim).await;
    assert!(matches!(again.get(&claim.uid), Some(Ok(_))), "{again:?}");
    assert!(
        fm.state().log[calls..]
            .iter()
            .all(|l| l.call != Call::Activate),
        "no second activation"
    );

    let u = running.unprepare_one(&claim).await;
    assert!(u.values().all(|r| r.is_ok()), "{u:?}");
    assert!(active(&fm).is_empty());
    assert!(engine.ledger().fabric.partitions.is_empty());
    for g in [M1, M3] {
        assert_eq!(env.driver_of(g).as_deref(), Some("nvidia"), "{g}");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_is_not_a_partition_fails_before_any_gpu_moves() {
    let (env, fm) = hgx().await;
    let running = env.start().await;
    // Modules 1 and 2: no H100 2-GPU partition.
    let claim = env.claim("vm", &[("gpu0", M1), ("gpu1", M2)]);
    let r = running.prepare_one(&claim).await;
    let err = match r.get(&claim.uid) {
        Some(Err(e)) => e.clone(),
        other => panic!("should fail: {other:?}"),
    };
    assert!(
        err.contains("not exactly one Fabric Manager partition"),
        "{err}"
    );
    assert!(
        env.kernel.log().is_empty(),
        "no host write: {:?}",
        env.kernel.log()
    );
    assert!(active(&fm).is_empty());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_activation_rolls_the_claims_gpus_back() {
    let (env, fm) = hgx().await;
    fm.with(|s| {
        s.faults.push(Fault {
            call: Call::Activate,
            action: FaultAction::Return(FmCode::PartitionRouteProgrammingError.raw()),
            times: Some(1),
        });
    });
    let running = env.start().await;
    let claim = env.claim("vm", &[("gpu0", M1), ("gpu1", M3)]);
    let r = running.prepare_one(&claim).await;
    let err = match r.get(&claim.uid) {
        Some(Err(e)) => e.clone(),
        other => panic!("should fail: {other:?}"),
    };
    assert!(err.contains("activating partition 3"), "{err}");
    for g in [M1, M3] {
        assert_eq!(
            env.driver_of(g).as_deref(),
            Some("nvidia"),
            "{g} rolled back"
        );
    }
    assert!(active(&fm).is_empty());
    let ledger = running.plugin.engine().ledger();
    assert!(ledger.fabric.partitions.is_empty());
    assert!(ledger.gpus.values().all(|r| r.holder.is_none()));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprepare_never_deactivates_under_a_running_vm() {
    let (env, fm) = hgx().await;
    let running = env.start().await;
    let claim = env.claim("vm", &[("gpu0", M1), ("gpu1", M3)]);
    let r = running.prepare_one(&claim).await;
    assert!(matches!(r.get(&claim.uid), Some(Ok(_))), "{r:?}");
    // The VM still holds M3's group.
    let group = group_of(&env, M3);
    let node = env.host.join(format!("dev/vfio/{group}"));
    std::fs::create_dir_all(env.host.join("proc/4242/fd")).expect("proc");
    std::fs::write(env.host.join("proc/4242/comm"), "qemu-kvm\n").expect("comm");
    std::os::unix::fs::symlink(&node, env.host.join("proc/4242/fd/20")).expect("fd");
    let u = running.unprepare_one(&claim).await;
    let err = match u.get(&claim.uid) {
        Some(Err(e)) => e.clone(),
        other => panic!("should fail while the VM runs: {other:?}"),
    };
    assert!(err.contains("NVLink partition 3 is in use"), "{err}");
    assert_eq!(active(&fm), BTreeSet::from([3]));
    std::fs::remove_dir_all(env.host.join("proc/4242")).expect("VM gone");
    let u = running.unprepare_one(&claim).await;
    assert!(u.values().all(|r| r.is_ok()), "{u:?}");
    assert!(active(&fm).is_empty());
    running.stop().await;
}
