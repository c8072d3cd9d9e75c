//! Prepare / unprepare end to end: kubelet emulator over the real Unix sockets, the
//! real kube client against the fake API server, the demo host with the simulated
//! kernel, and CDI specs validated with the container-device-interface crate.

mod plugin_common;

use plugin_common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use vfio_gpu_engine::Holder;
use vfio_gpu_engine::kernel::{SysfsWrite, WriteKind};
use vfio_gpu_engine::ledger::OpState;
use vfio_gpu_engine::sim::{BlockHandle, Fault, FaultAction};
use vfio_gpu_host::DriverName;
use vfio_gpu_kubelet::grpc::emulator::DraVersion;
use vfio_gpu_kubelet::slices::{device_attributes, device_infos};

fn ok_devices(
    r: &vfio_gpu_kubelet::grpc::dra::PrepareResults,
    uid: &str,
) -> Vec<vfio_gpu_kubelet::grpc::dra::PreparedDevice> {
    match r.get(uid) {
        Some(Ok(d)) => d.clone(),
        other => panic!("claim {uid} not prepared: {other:?}"),
    }
}

fn err_text(r: &vfio_gpu_kubelet::grpc::dra::PrepareResults, uid: &str) -> String {
    match r.get(uid) {
        Some(Err(e)) => e.clone(),
        other => panic!("claim {uid} should have failed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one scenario, step by step, on both protocol versions
async fn prepare_cdi_metadata_unprepare_round_trip_on_both_versions() {
    let env = Env::new().await;
    let running = env.start().await;
    assert_eq!(
        running.kubelet.version,
        DraVersion::V1,
        "v1 is listed first"
    );

    // One claim, two requests: a nvidia GPU with an HDA companion and the GPU the
    // kernel command line pre-binds to vfio-pci.
    let claim = env.claim("vm-1", &[("gpu", AB), ("pre", H100)]);
    // What the slice publisher offers for AB right now (before the move).
    let (views, _) = running.plugin.engine().discover().expect("discover");
    let published = device_infos(&views)
        .into_iter()
        .find(|d| d.bdf == bdf(AB))
        .expect("AB is offered");
    let published = serde_json::to_value(device_attributes(&published)).expect("JSON");
    let r = running.prepare_one(&claim).await;
    assert_eq!(r.len(), 1);
    let devices = ok_devices(&r, &claim.uid);
    assert_eq!(devices.len(), 2);
    let uid = &claim.uid;
    assert_eq!(devices[0].device_name, "gpu-0000-ab-00-0");
    assert_eq!(devices[0].pool_name, NODE);
    assert_eq!(devices[0].request_names, ["gpu"]);
    assert_eq!(
        devices[0].cdi_device_ids,
        [
            format!("{DRIVER}/claim={uid}-gpu-0000-ab-00-0"),
            format!("{DRIVER}/metadata={uid}_gpu"),
        ]
    );
    assert_eq!(devices[1].request_names, ["pre"]);
    assert_eq!(
        devices[1].cdi_device_ids[1],
        format!("{DRIVER}/metadata={uid}_pre")
    );

    // Host: the whole group moved.
    assert_eq!(env.driver_of(AB).as_deref(), Some("vfio-pci"));
    assert_eq!(env.driver_of(AB_AUDIO).as_deref(), Some("vfio-pci"));
    assert_eq!(env.driver_of(H100).as_deref(), Some("vfio-pci"));
    let ledger = running.plugin.engine().ledger();
    let expected_holder = Holder::Claim {
        uid: uid.clone(),
        namespace: NS.into(),
        name: "vm-1".into(),
    };
    assert_eq!(
        ledger.gpus[&bdf(AB)].holder.as_ref(),
        Some(&expected_holder)
    );
    assert_eq!(
        ledger.gpus[&bdf(H100)].holder.as_ref(),
        Some(&expected_holder)
    );

    // CDI: valid spec, the device IDs resolve, legacy nodes + API device, no env.
    let spec_path = env.claim_spec_path(uid);
    let spec = validated_spec(&spec_path);
    let want_version = if uid.starts_with(|c: char| c.is_ascii_alphabetic()) {
        "0.3.0"
    } else {
        "0.5.0"
    };
    assert_eq!(spec["cdiVersion"], want_version);
    assert_eq!(spec["kind"], format!("{DRIVER}/claim"));
    let ab = spec_device(&spec, &format!("{uid}-gpu-0000-ab-00-0"));
    assert_eq!(
        device_nodes(&ab["containerEdits"]),
        [format!("/dev/vfio/{}", group_of(&env, AB))]
    );
    // No env: KubeVirt's DRA path reads the metadata file, and a per-request
    // variable would collide between claims with the same request name.
    assert_eq!(ab["containerEdits"].get("env"), None, "{ab}");
    assert!(
        ab["containerEdits"]["deviceNodes"][0]
            .get("major")
            .is_none()
    );
    let pre = spec_device(&spec, &format!("{uid}-gpu-0000-18-00-0"));
    assert_eq!(
        device_nodes(&pre["containerEdits"]),
        [format!("/dev/vfio/{}", group_of(&env, H100))]
    );
    assert_eq!(device_nodes(&spec["containerEdits"]), ["/dev/vfio/vfio"]);
    // No temporary files left behind.
    assert!(
        env.cdi_files().iter().all(|f| f.ends_with(".json")),
        "{:?}",
        env.cdi_files()
    );

    // Metadata: the file KubeVirt reads and the CDI spec that mounts it.
    let meta_spec_path = env
        .cdi_root()
        .join(format!("{DRIVER}_metadata_{uid}_gpu.json"));
    let meta_spec = validated_spec(&meta_spec_path);
    assert_eq!(meta_spec["kind"], format!("{DRIVER}/metadata"));
    let mount = &spec_device(&meta_spec, &format!("{uid}_gpu"))["containerEdits"]["mounts"][0];
    assert_eq!(
        mount["containerPath"],
        format!(
            "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/vm-1/gpu/{DRIVER}-metadata.json"
        )
    );
    assert_eq!(mount["options"], json!(["ro", "bind"]));
    let host_file = std::path::PathBuf::from(mount["hostPath"].as_str().expect("hostPath"));
    assert!(
        host_file.starts_with(env.state_dir()),
        "{}",
        host_file.display()
    );
    // A stream: the same object once per version, newest first.
    let stream: Vec<Value> =
        serde_json::Deserializer::from_slice(&std::fs::read(&host_file).expect("metadata file"))
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("JSON stream");
    let versions: Vec<&Value> = stream.iter().map(|o| &o["apiVersion"]).collect();
    assert_eq!(
        versions,
        [
            "metadata.resource.k8s.io/v1beta1",
            "metadata.resource.k8s.io/v1alpha1"
        ]
    );
    let meta = &stream[1];
    assert_eq!(meta["kind"], "DeviceMetadata");
    assert_eq!(meta["metadata"]["uid"], uid.as_str());
    assert_eq!(meta["metadata"]["name"], "vm-1");
    assert_eq!(meta["requests"][0]["name"], "gpu");
    let d = &meta["requests"][0]["devices"][0];
    assert_eq!(d["name"], "gpu-0000-ab-00-0");
    assert_eq!(d["driver"], DRIVER);
    assert_eq!(d["pool"], NODE);
    assert_eq!(
        d["attributes"]["resource.kubernetes.io/pciBusID"]["string"],
        "0000:ab:00.0"
    );
    // KubeVirt sees the attributes the scheduler saw: the same names and values.
    assert_eq!(d["attributes"], published);

    // Unprepare: back to the original drivers, except the admin's pre-bound H100.
    let u = running.unprepare_one(&claim).await;
    assert_eq!(u.get(uid), Some(&Ok(())));
    assert_eq!(env.driver_of(AB).as_deref(), Some("nvidia"));
    assert_eq!(env.driver_of(AB_AUDIO).as_deref(), Some("snd_hda_intel"));
    assert_eq!(env.driver_of(H100).as_deref(), Some("vfio-pci"));
    assert!(!spec_path.exists());
    assert!(!meta_spec_path.exists());
    assert!(!host_file.exists());
    assert!(env.cdi_files().is_empty(), "{:?}", env.cdi_files());
    let ledger = running.plugin.engine().ledger();
    assert!(
        ledger
            .gpus
            .values()
            .all(|r| !matches!(&r.holder, Some(Holder::Claim { .. }))),
        "{:?}",
        ledger.gpus
    );

    // The same over v1beta1 (kubelets 1.32/1.33).
    let claim2 = env.claim("vm-2", &[("gpu", BA)]);
    let r = running
        .kubelet
        .prepare_with(DraVersion::V1beta1, std::slice::from_ref(&claim2))
        .await
        .expect("rpc");
    let d = ok_devices(&r, &claim2.uid);
    assert_eq!(d[0].device_name, "gpu-0000-ba-00-0");
    assert_eq!(env.driver_of(BA).as_deref(), Some("vfio-pci"));
    validated_spec(&env.claim_spec_path(&claim2.uid));
    let u = running
        .kubelet
        .unprepare_with(DraVersion::V1beta1, std::slice::from_ref(&claim2))
        .await
        .expect("rpc");
    assert_eq!(u.get(&claim2.uid), Some(&Ok(())));
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_prepare_returns_the_same_answer_without_host_writes() {
    let env = Env::new().await;
    let running = env.start().await;
    let claim = env.claim("vm", &[("gpu", BA)]);
    let first = running.prepare_one(&claim).await;
    let spec_before = std::fs::read(env.claim_spec_path(&claim.uid)).expect("spec");
    let writes = env.kernel.log().len();
    assert!(writes > 0, "first prepare wrote to the host");
    let second = running.prepare_one(&claim).await;
    assert_eq!(
        ok_devices(&first, &claim.uid),
        ok_devices(&second, &claim.uid)
    );
    assert_eq!(
        env.kernel.log().len(),
        writes,
        "a retry changes nothing on the host: {:?}",
        &env.kernel.log()[writes..]
    );
    assert_eq!(
        std::fs::read(env.claim_spec_path(&claim.uid)).expect("spec"),
        spec_before
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prepares_of_different_claims() {
    let env = Env::new().await;
    let running = env.start().await;
    let a = env.claim("vm-a", &[("gpu", AB)]);
    let b = env.claim("vm-b", &[("gpu", BA)]);
    let c = env.claim("vm-c", &[("gpu", H100)]);
    // Two concurrent RPCs, one of them carrying two claims.
    let (ab, cc) = ([a.clone(), b.clone()], [c.clone()]);
    let (r1, r2) = tokio::join!(running.kubelet.prepare(&ab), running.kubelet.prepare(&cc));
    let (r1, r2) = (r1.expect("rpc"), r2.expect("rpc"));
    assert_eq!(ok_devices(&r1, &a.uid)[0].device_name, dev(AB));
    assert_eq!(ok_devices(&r1, &b.uid)[0].device_name, dev(BA));
    assert_eq!(ok_devices(&r2, &c.uid)[0].device_name, dev(H100));
    for g in [AB, AB_AUDIO, BA, H100] {
        assert_eq!(env.driver_of(g).as_deref(), Some("vfio-pci"), "{g}");
    }
    for c in [&a, &b, &c] {
        validated_spec(&env.claim_spec_path(&c.uid));
    }
    let u = running
        .kubelet
        .unprepare(&[a.clone(), b.clone(), c.clone()])
        .await
        .expect("rpc");
    assert!(u.values().all(|r| r.is_ok()), "{u:?}");
    assert_eq!(env.driver_of(AB).as_deref(), Some("nvidia"));
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    assert_eq!(env.driver_of(H100).as_deref(), Some("vfio-pci"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_held_by_another_claim_is_refused() {
    let env = Env::new().await;
    let running = env.start().await;
    let first = env.claim("vm-a", &[("gpu", BA)]);
    let second = env.claim("vm-b", &[("gpu", BA)]);
    let r = running.prepare_one(&first).await;
    ok_devices(&r, &first.uid);
    let writes = env.kernel.log().len();
    let r = running.prepare_one(&second).await;
    let e = err_text(&r, &second.uid);
    assert!(e.contains("is held by claim vms/vm-a"), "{e}");
    assert_eq!(env.kernel.log().len(), writes, "refusal changes nothing");
    assert!(!env.claim_spec_path(&second.uid).exists());
    // The holder is untouched.
    assert_eq!(env.driver_of(BA).as_deref(), Some("vfio-pci"));
    assert!(env.claim_spec_path(&first.uid).exists());
    // Unpreparing the refused claim must not release the other claim's GPU.
    let u = running.unprepare_one(&second).await;
    assert_eq!(u.get(&second.uid), Some(&Ok(())));
    assert_eq!(env.driver_of(BA).as_deref(), Some("vfio-pci"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprepare_of_unknown_claim_succeeds_and_is_idempotent() {
    let env = Env::new().await;
    let running = env.start().await;
    let ghost = vfio_gpu_kubelet::grpc::dra::ClaimRef {
        uid: "0b5e7f52-41b0-4c55-8d8e-2f3a6b7c8d90".into(),
        namespace: NS.into(),
        name: "gone".into(),
    };
    for _ in 0..2 {
        let u = running.unprepare_one(&ghost).await;
        assert_eq!(u.get(&ghost.uid), Some(&Ok(())));
    }
    assert!(env.kernel.log().is_empty());
    // A real claim unprepared twice: the second is a no-op success.
    let c = env.claim("vm", &[("gpu", BA)]);
    ok_devices(&running.prepare_one(&c).await, &c.uid);
    for _ in 0..2 {
        let u = running.unprepare_one(&c).await;
        assert_eq!(u.get(&c.uid), Some(&Ok(())));
    }
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_path_like_device_names_are_refused_before_any_change() {
    let env = Env::new().await;
    let running = env.start().await;
    let missing = env.claim_with(
        "missing",
        &[("gpu", DRIVER, NODE, "gpu-0000-ff-00-0")],
        json!([]),
        json!({}),
    );
    let traversal = env.claim_with(
        "traversal",
        &[("gpu", DRIVER, NODE, "../../x")],
        json!([]),
        json!({}),
    );
    // A good device next to a bad one: nothing is configured at all.
    let good = dev(BA);
    let mixed = env.claim_with(
        "mixed",
        &[
            ("gpu", DRIVER, NODE, good.as_str()),
            ("other", DRIVER, NODE, "../../etc/passwd"),
        ],
        json!([]),
        json!({}),
    );
    let r = running
        .kubelet
        .prepare(&[missing.clone(), traversal.clone(), mixed.clone()])
        .await
        .expect("rpc");
    assert!(
        err_text(&r, &missing.uid)
            .contains("\"gpu-0000-ff-00-0\" (request \"gpu\") is not a GPU on node demo-node"),
        "{}",
        err_text(&r, &missing.uid)
    );
    assert!(err_text(&r, &traversal.uid).contains("\"../../x\""));
    assert!(err_text(&r, &mixed.uid).contains("\"../../etc/passwd\""));
    assert!(env.kernel.log().is_empty(), "{:?}", env.kernel.log());
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    assert!(env.cdi_files().is_empty(), "{:?}", env.cdi_files());
    assert!(!env.dir.path().join("x").exists());
    assert!(
        running
            .plugin
            .engine()
            .ledger()
            .gpus
            .values()
            .all(|r| r.holder.is_none())
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_like_request_or_pod_claim_names_are_refused_before_any_change() {
    // These names become metadata file names: they used to be checked only after the
    // GPU had been moved to vfio-pci and the CDI spec written (a spec was left behind).
    let env = Env::new().await;
    let running = env.start().await;
    let ba = dev(BA);
    let pod_claim = env.claim_with(
        "pod-claim",
        &[("gpu", DRIVER, NODE, ba.as_str())],
        json!([]),
        json!({"resource.kubernetes.io/pod-claim-name": "../../x"}),
    );
    let request = env.claim_with(
        "request",
        &[("GPU_0", DRIVER, NODE, ba.as_str())],
        json!([]),
        json!({}),
    );
    let r = running
        .kubelet
        .prepare(&[pod_claim.clone(), request.clone()])
        .await
        .expect("rpc");
    let e = err_text(&r, &pod_claim.uid);
    assert!(e.contains("pod claim name \"../../x\""), "{e}");
    let e = err_text(&r, &request.uid);
    assert!(e.contains("request name \"GPU_0\""), "{e}");
    assert!(env.kernel.log().is_empty(), "{:?}", env.kernel.log());
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    assert!(env.cdi_files().is_empty(), "{:?}", env.cdi_files());
    running.stop().await;
}

/// M2 (security review): a claim name of 253 bytes is valid in Kubernetes; its
/// metadata directory used to exceed NAME_MAX, so every prepare moved the GPU, failed
/// writing the file and moved it back. It must prepare, and unprepare clean up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_valid_claim_name_prepares_and_unprepares() {
    let env = Env::new().await;
    let running = env.start().await;
    let name = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(name.len(), 253);
    let claim = env.claim(&name, &[("gpu", BA)]);
    let r = running.prepare_one(&claim).await;
    ok_devices(&r, &claim.uid);
    assert_eq!(env.driver_of(BA).as_deref(), Some("vfio-pci"));
    let meta_spec = validated_spec(
        &env.cdi_root()
            .join(format!("{DRIVER}_metadata_{}_gpu.json", claim.uid)),
    );
    let mount =
        &spec_device(&meta_spec, &format!("{}_gpu", claim.uid))["containerEdits"]["mounts"][0];
    assert_eq!(
        mount["containerPath"],
        format!(
            "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/{name}/gpu/{DRIVER}-metadata.json"
        )
    );
    let host_file = std::path::PathBuf::from(mount["hostPath"].as_str().expect("hostPath"));
    assert!(host_file.exists(), "{}", host_file.display());

    let u = running.unprepare_one(&claim).await;
    assert_eq!(u.get(&claim.uid), Some(&Ok(())));
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    assert!(!host_file.exists());
    assert!(env.cdi_files().is_empty(), "{:?}", env.cdi_files());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_for_another_driver_or_another_nodes_pool_are_refused() {
    let env = Env::new().await;
    let running = env.start().await;
    let ba = dev(BA);
    let other_driver = env.claim_with(
        "other-driver",
        &[("gpu", "gpu.nvidia.com", NODE, ba.as_str())],
        json!([]),
        json!({}),
    );
    let other_pool = env.claim_with(
        "other-pool",
        &[("gpu", DRIVER, "node-b", ba.as_str())],
        json!([]),
        json!({}),
    );
    let r = running
        .kubelet
        .prepare(&[other_driver.clone(), other_pool.clone()])
        .await
        .expect("rpc");
    let e = err_text(&r, &other_driver.uid);
    assert!(
        e.contains("no device allocated from driver vfio-gpu.dra.dev in pool demo-node"),
        "{e}"
    );
    assert!(e.contains("gpu.nvidia.com"), "{e}");
    assert!(err_text(&r, &other_pool.uid).contains("\"node-b\""));
    assert!(env.kernel.log().is_empty());
    assert!(env.cdi_files().is_empty());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_missing_replaced_or_unallocated_claims_change_nothing() {
    let env = Env::new().await;
    let running = env.start().await;
    let claim = env.claim("vm", &[("gpu", BA)]);
    let ledger_before = std::fs::read(running.plugin.engine().ledger_path()).ok();

    env.api.set_refuse_connections(true);
    let r = running.prepare_one(&claim).await;
    let e = err_text(&r, &claim.uid);
    assert!(e.contains("fetching ResourceClaim vms/vm"), "{e}");
    env.api.set_refuse_connections(false);

    env.api.set_unavailable(true);
    let r = running.prepare_one(&claim).await;
    let e = err_text(&r, &claim.uid);
    assert!(e.contains("fetching ResourceClaim vms/vm"), "{e}");
    env.api.set_unavailable(false);

    assert!(env.kernel.log().is_empty(), "{:?}", env.kernel.log());
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    assert_eq!(
        std::fs::read(running.plugin.engine().ledger_path()).ok(),
        ledger_before,
        "ledger unchanged"
    );
    assert!(env.cdi_files().is_empty());

    // Not found.
    let ghost = vfio_gpu_kubelet::grpc::dra::ClaimRef {
        uid: "1d5e7f52-41b0-4c55-8d8e-2f3a6b7c8d90".into(),
        namespace: NS.into(),
        name: "no-such-claim".into(),
    };
    let r = running.prepare_one(&ghost).await;
    assert!(err_text(&r, &ghost.uid).contains("ResourceClaim vms/no-such-claim not found"));

    // Replaced: same name, new UID.
    env.api
        .delete("resourceclaims", Some(NS), "vm")
        .expect("deleted");
    let replacement = env.claim("vm", &[("gpu", BA)]);
    assert_ne!(replacement.uid, claim.uid);
    let r = running.prepare_one(&claim).await;
    assert!(err_text(&r, &claim.uid).contains("the claim was replaced"));

    // Not allocated.
    let stored = env
        .api
        .insert(json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": "pending", "namespace": NS},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "vfio-gpu"}}]}}
        }))
        .expect("insert");
    let pending = vfio_gpu_kubelet::grpc::dra::ClaimRef {
        uid: stored["metadata"]["uid"].as_str().expect("uid").into(),
        namespace: NS.into(),
        name: "pending".into(),
    };
    let r = running.prepare_one(&pending).await;
    assert!(err_text(&r, &pending.uid).contains("not allocated"));
    assert!(env.kernel.log().is_empty());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_group_member_is_refused() {
    let env = Env::new().await;
    let running = env.start().await;
    let claim = env.claim("vm", &[("gpu", L4)]);
    let r = running.prepare_one(&claim).await;
    let e = err_text(&r, &claim.uid);
    assert!(e.contains("0000:db:01.0"), "names the NIC: {e}");
    assert!(env.kernel.log().is_empty());
    assert_eq!(env.driver_of(L4).as_deref(), Some("nvidia"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_config_selects_iommufd_and_bad_config_fails_the_claim() {
    let env = Env::new().await;
    let running = env.start().await;
    let ba = dev(BA);
    let config = json!([
        {"source": "FromClass", "requests": [],
         "opaque": {"driver": DRIVER, "parameters": {"apiVersion": "vfio-gpu.dra.dev/v1alpha1", "kind": "VfioDeviceConfig", "iommuBackend": "legacy", "apiDevice": false}}},
        {"source": "FromClaim", "requests": ["gpu"],
         "opaque": {"driver": DRIVER, "parameters": {"apiVersion": "vfio-gpu.dra.dev/v1alpha1", "kind": "VfioDeviceConfig", "iommuBackend": "iommufd"}}}
    ]);
    let claim = env.claim_with(
        "fd",
        &[("gpu", DRIVER, NODE, ba.as_str())],
        config,
        json!({"resource.kubernetes.io/pod-claim-name": "gpus"}),
    );
    let r = running.prepare_one(&claim).await;
    ok_devices(&r, &claim.uid);
    let spec = validated_spec(&env.claim_spec_path(&claim.uid));
    let d = spec_device(&spec, &format!("{}-{ba}", claim.uid));
    let nodes = device_nodes(&d["containerEdits"]);
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert!(nodes[0].starts_with("/dev/vfio/devices/vfio"), "{nodes:?}");
    assert_eq!(device_nodes(&spec["containerEdits"]), ["/dev/iommu"]);
    // Template claim: metadata lands under resourceclaimtemplates/<podClaimName>.
    let meta_spec = validated_spec(
        &env.cdi_root()
            .join(format!("{DRIVER}_metadata_{}_gpu.json", claim.uid)),
    );
    assert_eq!(
        spec_device(&meta_spec, &format!("{}_gpu", claim.uid))["containerEdits"]["mounts"][0]["containerPath"],
        format!(
            "/var/run/kubernetes.io/dra-device-attributes/resourceclaimtemplates/gpus/gpu/{DRIVER}-metadata.json"
        )
    );
    let u = running.unprepare_one(&claim).await;
    assert_eq!(u.get(&claim.uid), Some(&Ok(())));

    let writes = env.kernel.log().len();
    let bad = env.claim_with(
        "bad",
        &[("gpu", DRIVER, NODE, ba.as_str())],
        json!([{"source": "FromClaim", "opaque": {"driver": DRIVER,
            "parameters": {"apiVersion": "vfio-gpu.dra.dev/v1alpha1", "kind": "VfioDeviceConfig", "iommuBackend": "legacy", "speed": "fast"}}}]),
        json!({}),
    );
    let r = running.prepare_one(&bad).await;
    let e = err_text(&r, &bad.uid);
    assert!(e.contains("\"speed\""), "{e}");
    assert_eq!(env.kernel.log().len(), writes, "nothing changed");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iommufd_claim_on_a_kernel_without_vfio_device_cdev_fails_and_names_no_missing_node() {
    // Debian's 6.1 and 6.12 (tests/vm): vfio-pci still creates sysfs
    // `vfio-dev/vfioN`, but without CONFIG_VFIO_DEVICE_CDEV there is no
    // /dev/vfio/devices/vfioN. A spec naming it fails only at container start.
    let env = Env::new().await;
    env.kernel.set_vfio_nodes(vfio_gpu_engine::sim::VfioNodes {
        group: true,
        cdev: false,
    });
    let running = env.start().await;
    let ba = dev(BA);
    let claim = env.claim_with(
        "fd-nocdev",
        &[("gpu", DRIVER, NODE, ba.as_str())],
        json!([{"source": "FromClaim", "requests": [],
            "opaque": {"driver": DRIVER, "parameters": {"apiVersion": "vfio-gpu.dra.dev/v1alpha1", "kind": "VfioDeviceConfig", "iommuBackend": "iommufd"}}}]),
        json!({}),
    );
    let r = running.prepare_one(&claim).await;
    let spec = env.claim_spec_path(&claim.uid);
    let named = std::fs::read_to_string(&spec).unwrap_or_default();
    assert!(
        !named.contains("/dev/vfio/devices/"),
        "the spec names a node the kernel does not have: {named}"
    );
    let e = err_text(&r, &claim.uid);
    assert!(e.contains("VFIO_DEVICE_CDEV"), "{e}");
    // the failed prepare rolled the move back
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_leaves_fully_prepared_claims_whose_object_is_gone() {
    // A force-deleted pod: its claim object is gone while QEMU may still run. The
    // kubelet unprepares it; one cleanup never pulls the GPU on its own (two in a row
    // with no process on its vfio devices do, see the N2 test below).
    let env = Env::new().await;
    let running = env.start().await;
    let gone = env.claim("gone", &[("gpu", AB)]);
    let replaced = env.claim("replaced", &[("gpu", BA)]);
    let r = running
        .kubelet
        .prepare(&[gone.clone(), replaced.clone()])
        .await
        .expect("rpc");
    assert!(r.values().all(|r| r.is_ok()), "{r:?}");
    env.api
        .delete("resourceclaims", Some(NS), "gone")
        .expect("deleted");
    env.api
        .delete("resourceclaims", Some(NS), "replaced")
        .expect("deleted");
    env.claim("replaced", &[("gpu", BA)]);

    let cleaned = running.plugin.cleanup_stale_claims().await;
    assert!(cleaned.is_empty(), "{cleaned:?}");
    assert_eq!(env.driver_of(AB).as_deref(), Some("vfio-pci"));
    assert_eq!(env.driver_of(BA).as_deref(), Some("vfio-pci"));
    assert!(env.claim_spec_path(&gone.uid).exists());
    let mut prepared: Vec<String> = running
        .plugin
        .prepared_claims()
        .into_iter()
        .map(|c| c.uid)
        .collect();
    prepared.sort();
    let mut want = vec![gone.uid.clone(), replaced.uid.clone()];
    want.sort();
    assert_eq!(prepared, want);

    // The kubelet's unprepare still releases them.
    let u = running
        .kubelet
        .unprepare(&[gone.clone(), replaced.clone()])
        .await
        .expect("rpc");
    assert!(u.values().all(|r| r.is_ok()), "{u:?}");
    assert_eq!(env.driver_of(AB).as_deref(), Some("nvidia"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_releases_half_prepared_claims_whose_object_is_gone() {
    let env = Env::new().await;
    // A prepare that crashed mid-move leaves a Configuring record held by its claim.
    let half = |name: &str| Holder::Claim {
        uid: format!("uid-{name}"),
        namespace: NS.into(),
        name: name.into(),
    };
    {
        let engine = env.engine_crashing_after(3);
        assert!(
            engine.configure(bdf(BA), half("gone")).is_err(),
            "crash injected"
        );
    }
    let plugin = env.plugin();
    let before = plugin.engine().ledger();
    assert_eq!(before.gpus[&bdf(BA)].state, OpState::Configuring);
    assert_ne!(env.driver_of(BA).as_deref(), Some("nvidia"));

    // With the API server down nothing is cleaned.
    env.api.set_refuse_connections(true);
    assert!(plugin.cleanup_stale_claims().await.is_empty());
    env.api.set_refuse_connections(false);

    let cleaned = plugin.cleanup_stale_claims().await;
    let names: Vec<(&str, bool)> = cleaned
        .iter()
        .map(|(c, r)| (c.name.as_str(), r.is_ok()))
        .collect();
    assert_eq!(names, [("gone", true)], "{cleaned:?}");
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    assert!(plugin.prepared_claims().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_without_resource_v1_is_reported_as_such() {
    let env = Env::new().await;
    let running = env.start().await;
    let claim = env.claim("vm", &[("gpu", AB)]);
    env.api.set_resource_v1_served(false);
    let writes = env.kernel.log().len();
    let r = running.prepare_one(&claim).await;
    let e = err_text(&r, &claim.uid);
    assert!(
        e.contains("API server does not serve resource.k8s.io/v1; Kubernetes ≥ 1.34 required"),
        "{e}"
    );
    assert!(!e.contains("not found"), "{e}");
    assert_eq!(env.kernel.log().len(), writes, "nothing changed");
    // A claim that is really missing is still reported as missing.
    env.api.set_resource_v1_served(true);
    env.api
        .delete("resourceclaims", Some(NS), "vm")
        .expect("deleted");
    let r = running.prepare_one(&claim).await;
    assert!(err_text(&r, &claim.uid).contains("not found"), "{r:?}");
    running.stop().await;
}

/// How many times the simulated kernel's log holds `write`.
fn times_written(env: &Env, write: &SysfsWrite) -> usize {
    env.kernel.log().iter().filter(|w| *w == write).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_answer_within_the_budget_and_a_retry_gets_the_result() {
    // The kubelet gives each call 45 s; a blocked bind (NVLink training, a driver
    // waiting for clients) must not make the call time out.
    let env = Env::new().await;
    let mut config = env.plugin_config();
    config.call_budget = Duration::from_millis(400);
    let running = env.start_with(config).await;
    let claim = env.claim("slow", &[("gpu", AB)]);
    let bind_ab = SysfsWrite::Bind {
        bdf: bdf(AB),
        driver: DriverName::new("vfio-pci").expect("driver name"),
    };

    let gate = BlockHandle::new();
    env.kernel.inject(Fault::on(
        WriteKind::Bind,
        bdf(AB),
        FaultAction::Block(gate.clone()),
    ));
    let started = Instant::now();
    let r = running.prepare_one(&claim).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let e = err_text(&r, &claim.uid);
    assert!(e.contains("still in progress, kubelet will retry"), "{e}");
    // A retry while the bind is still blocked joins the running work: no second move.
    let r = running.prepare_one(&claim).await;
    assert!(
        err_text(&r, &claim.uid).contains("still in progress"),
        "{r:?}"
    );
    assert_eq!(times_written(&env, &bind_ab), 1);

    gate.release();
    let deadline = Instant::now() + Duration::from_secs(10);
    let devices = loop {
        let r = running.prepare_one(&claim).await;
        match &r[&claim.uid] {
            Ok(d) => break d.clone(),
            Err(e) => {
                assert!(e.contains("still in progress"), "{e}");
                assert!(Instant::now() < deadline, "never finished");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_name, dev(AB));
    assert_eq!(env.driver_of(AB).as_deref(), Some("vfio-pci"));
    assert_eq!(times_written(&env, &bind_ab), 1, "moved once");

    // The same for a release stuck in the bind back to nvidia.
    let gate = BlockHandle::new();
    env.kernel.inject(Fault {
        driver: Some("nvidia".into()),
        ..Fault::on(WriteKind::Bind, bdf(AB), FaultAction::Block(gate.clone()))
    });
    let started = Instant::now();
    let u = running.unprepare_one(&claim).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    match &u[&claim.uid] {
        Err(e) => assert!(e.contains("still in progress, kubelet will retry"), "{e}"),
        Ok(()) => panic!("unprepare cannot have finished while the bind is blocked"),
    }
    gate.release();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let u = running.unprepare_one(&claim).await;
        if u[&claim.uid].is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "{u:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.driver_of(AB).as_deref(), Some("nvidia"));
    assert!(!env.claim_spec_path(&claim.uid).exists());
    running.stop().await;
}

/// N2: the kubelet may unprepare a claim while its prepare still waits for the API
/// server. The unprepare must wait for that prepare and release what it configured;
/// answering "nothing to release" at once let the prepare leak the GPU afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprepare_during_a_slow_claim_get_releases_what_the_prepare_configured() {
    let env = Env::new().await;
    let running = env.start().await;
    let claim = env.claim("vm", &[("gpu", AB)]);
    env.api
        .set_get_delay("resourceclaims", Duration::from_millis(1500));
    let (prepared, unprepared) = tokio::join!(
        running.kubelet.prepare(std::slice::from_ref(&claim)),
        async {
            // The prepare is now waiting for its claim GET.
            tokio::time::sleep(Duration::from_millis(400)).await;
            running
                .kubelet
                .unprepare(std::slice::from_ref(&claim))
                .await
        }
    );
    env.api.set_get_delay("resourceclaims", Duration::ZERO);
    let prepared = prepared.expect("prepare rpc");
    let unprepared = unprepared.expect("unprepare rpc");
    assert!(unprepared[&claim.uid].is_ok(), "{unprepared:?}");
    // Whatever the prepare answered, nothing of the claim is left behind.
    let held: Vec<_> = running
        .plugin
        .prepared_claims()
        .into_iter()
        .map(|c| c.uid)
        .collect();
    assert!(
        held.is_empty(),
        "claim still holds GPUs after its unprepare (prepare said {prepared:?})"
    );
    assert_eq!(env.driver_of(AB).as_deref(), Some("nvidia"));
    assert!(!env.claim_spec_path(&claim.uid).exists());
    running.stop().await;
}

/// N2: a completed claim whose object is gone, or replaced by a new UID, is released
/// by the periodic cleanup once no process has held its vfio devices on two cleanups
/// in a row; while a process (a VM) holds them, it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_releases_completed_orphans_after_two_idle_scans_and_keeps_held_ones() {
    let env = Env::new().await;
    let running = env.start().await;
    let gone = env.claim("gone", &[("gpu", AB)]);
    let replaced = env.claim("replaced", &[("gpu", BA)]);
    let r = running
        .kubelet
        .prepare(&[gone.clone(), replaced.clone()])
        .await
        .expect("rpc");
    assert!(r.values().all(|r| r.is_ok()), "{r:?}");
    env.api
        .delete("resourceclaims", Some(NS), "gone")
        .expect("deleted");
    env.api
        .delete("resourceclaims", Some(NS), "replaced")
        .expect("deleted");
    env.claim("replaced", &[("gpu", BA)]);

    // A VM holds the group of `gone`'s GPU.
    let group = group_of(&env, AB);
    let fd_dir = env.host.join("proc/4242/fd");
    std::fs::create_dir_all(&fd_dir).expect("fd dir");
    std::fs::write(env.host.join("proc/4242/comm"), "qemu-kvm\n").expect("comm");
    std::os::unix::fs::symlink(
        env.host.join(format!("dev/vfio/{group}")),
        fd_dir.join("30"),
    )
    .expect("fd link");

    // First idle scan of `replaced`: nothing released yet.
    let first = running.plugin.cleanup_stale_claims().await;
    assert!(first.is_empty(), "{first:?}");
    assert_eq!(env.driver_of(BA).as_deref(), Some("vfio-pci"));
    // Second: `replaced` goes; `gone` stays while its group is held.
    let second = running.plugin.cleanup_stale_claims().await;
    let names: Vec<(&str, bool)> = second
        .iter()
        .map(|(c, r)| (c.name.as_str(), r.is_ok()))
        .collect();
    assert_eq!(names, [("replaced", true)], "{second:?}");
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    assert!(!env.claim_spec_path(&replaced.uid).exists());
    for _ in 0..2 {
        assert!(running.plugin.cleanup_stale_claims().await.is_empty());
    }
    assert_eq!(env.driver_of(AB).as_deref(), Some("vfio-pci"));

    // The VM exits: one idle scan is not enough, the second releases.
    std::fs::remove_file(fd_dir.join("30")).expect("close fd");
    assert!(running.plugin.cleanup_stale_claims().await.is_empty());
    assert_eq!(env.driver_of(AB).as_deref(), Some("vfio-pci"));
    let last = running.plugin.cleanup_stale_claims().await;
    let names: Vec<(&str, bool)> = last
        .iter()
        .map(|(c, r)| (c.name.as_str(), r.is_ok()))
        .collect();
    assert_eq!(names, [("gone", true)], "{last:?}");
    assert_eq!(env.driver_of(AB).as_deref(), Some("nvidia"));
    assert!(running.plugin.prepared_claims().is_empty());
    running.stop().await;
}

/// A prepare walks the node's `/proc` once, in the move's own holder check:
/// its plan needs no holders, and on a node with many open descriptors every
/// walk costs (security review M1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_scans_proc_for_holders_once() {
    let env = Env::new().await;
    // BA on nvidia with its device node, so a holder check has a node to
    // look for (the demo host has none).
    let info = env
        .host
        .join(format!("proc/driver/nvidia/gpus/{BA}/information"));
    std::fs::create_dir_all(info.parent().unwrap()).unwrap();
    std::fs::write(&info, "Model: demo\nDevice Minor: 0\n").unwrap();
    std::fs::create_dir_all(env.host.join("dev")).unwrap();
    std::fs::write(env.host.join("dev/nvidia0"), "").unwrap();
    let running = env.start().await;
    let engine = std::sync::Arc::clone(running.plugin.engine());
    let claim = env.claim("vm", &[("gpu", BA)]);
    let before = engine.holder_scans_asked();
    let out = running.prepare_one(&claim).await;
    assert_eq!(ok_devices(&out, &claim.uid).len(), 1);
    assert_eq!(
        engine.holder_scans_asked() - before,
        1,
        "one /proc walk for one GPU moved"
    );
    running.stop().await;
}
