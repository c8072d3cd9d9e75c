//! Plugin restarts: the ledger, not memory, decides what an unprepare releases; and
//! `serve()` end to end (startup reconcile before the sockets, prepared claims left to the kubelet,
//! clean shutdown).

mod plugin_common;

use std::sync::Arc;
use std::time::Duration;

use plugin_common::*;
use vfio_gpu_engine::Holder;
use vfio_gpu_kubelet::grpc::emulator::KubeletEmulator;
use vfio_gpu_kubelet::serve::{CancellationToken, KubeSource, ServeOptions, serve};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_between_prepare_and_unprepare() {
    let env = Env::new().await;
    let running = env.start().await;
    let claim = env.claim("vm", &[("gpu", AB), ("pre", H100)]);
    let r = running.prepare_one(&claim).await;
    assert!(r[&claim.uid].is_ok(), "{r:?}");
    let answer = r[&claim.uid].clone();
    running.stop().await;

    // The claim object disappears while the plugin is down (unprepare must not need it).
    env.api
        .delete("resourceclaims", Some(NS), "vm")
        .expect("deleted");

    // New engine (re-takes the state lock) and new server on the same state dir.
    let running = env.start().await;
    let holders: Vec<_> = running
        .plugin
        .engine()
        .ledger()
        .gpus
        .values()
        .filter_map(|r| r.holder.clone())
        .collect();
    assert_eq!(holders.len(), 2, "{holders:?}");
    assert!(
        holders
            .iter()
            .all(|h| matches!(h, Holder::Claim { uid, .. } if uid == &claim.uid))
    );
    assert_eq!(env.driver_of(AB).as_deref(), Some("vfio-pci"));

    let u = running.unprepare_one(&claim).await;
    assert_eq!(u.get(&claim.uid), Some(&Ok(())));
    assert_eq!(env.driver_of(AB).as_deref(), Some("nvidia"));
    assert_eq!(env.driver_of(AB_AUDIO).as_deref(), Some("snd_hda_intel"));
    assert_eq!(env.driver_of(H100).as_deref(), Some("vfio-pci"));
    assert!(env.cdi_files().is_empty(), "{:?}", env.cdi_files());
    assert!(answer.is_ok());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reconciles_first_leaves_prepared_claims_to_the_kubelet_and_stops_cleanly() {
    let env = Env::new().await;

    // A crash in the middle of moving BA to vfio, left for the next start to repair.
    {
        let engine = env.engine_crashing_after(3);
        let holder = Holder::Claim {
            uid: "crashed".into(),
            namespace: NS.into(),
            name: "crashed".into(),
        };
        assert!(engine.configure(bdf(BA), holder).is_err(), "crash injected");
    }
    assert_ne!(
        env.driver_of(BA).as_deref(),
        Some("nvidia"),
        "left half-moved"
    );

    env.api
        .insert(serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))
        .expect("node");
    let mut opts = ServeOptions::new(NODE, DRIVER, Arc::new(env.kernel.clone()));
    assert!(opts.publish_slices, "slices are published by default");
    opts.plugins_dir = env.path("plugins");
    opts.registrar_dir = env.path("registry");
    opts.cdi_root = env.cdi_root();
    opts.kube = KubeSource::Client(env.client.clone());
    opts.cleanup_interval = Duration::from_millis(200);
    opts.reconcile_interval = Duration::from_secs(3600);
    let registration = env.path("registry").join(format!("{DRIVER}-reg.sock"));
    let dra = env.state_dir().join("dra.sock");
    let token = CancellationToken::new();
    let task = tokio::spawn(serve(opts, token.clone()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !registration.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "registration socket never appeared"
        );
        assert!(!task.is_finished(), "serve ended early: {:?}", task.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reconcile ran before the sockets existed.
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));

    // The wired publisher puts this node's GPUs into ResourceSlices, under the same
    // device names prepare resolves.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let names: Vec<String> = env
            .api
            .list("resourceslices", None)
            .iter()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .filter_map(|d| d["name"].as_str().map(String::from))
            .collect();
        if names.contains(&dev(BA)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no slice with {} published: {names:?}",
            dev(BA)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let kubelet = KubeletEmulator::new(&registration)
        .register()
        .await
        .expect("registers");
    let claim = env.claim("vm", &[("gpu", BA)]);
    let r = kubelet
        .prepare(std::slice::from_ref(&claim))
        .await
        .expect("rpc");
    assert!(r[&claim.uid].is_ok(), "{r:?}");
    assert_eq!(env.driver_of(BA).as_deref(), Some("vfio-pci"));

    // The claim is deleted without an unprepare (a force-deleted pod) while its VM
    // still holds the group: the cleanup loop leaves the fully prepared claim to the
    // kubelet, whose unprepare releases it once the VM is gone.
    let fd_dir = env.host.join("proc/4242/fd");
    std::fs::create_dir_all(&fd_dir).expect("fd dir");
    std::os::unix::fs::symlink(
        env.host.join(format!("dev/vfio/{}", group_of(&env, BA))),
        fd_dir.join("30"),
    )
    .expect("the VM holds the group");
    env.api
        .delete("resourceclaims", Some(NS), "vm")
        .expect("deleted");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.driver_of(BA).as_deref(), Some("vfio-pci"));
    assert!(env.claim_spec_path(&claim.uid).exists());
    std::fs::remove_file(fd_dir.join("30")).expect("the VM exits");
    let u = kubelet
        .unprepare(std::slice::from_ref(&claim))
        .await
        .expect("rpc");
    assert!(u[&claim.uid].is_ok(), "{u:?}");
    assert_eq!(env.driver_of(BA).as_deref(), Some("nvidia"));
    assert!(!env.claim_spec_path(&claim.uid).exists());

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve stops in time")
        .expect("serve task")
        .expect("serve returns Ok");
    assert!(!registration.exists(), "registration socket removed");
    assert!(!dra.exists(), "DRA socket removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_invalid_driver_names_before_creating_anything() {
    let env = Env::new().await;
    let long = format!("{}.io", "a".repeat(61));
    assert_eq!(long.len(), 64);
    for bad in [
        "1gpu.example.com", // CDI vendor must start with a letter
        long.as_str(),      // CSI driver names are at most 63 bytes
        "gpu..example.com",
        "gpu-.example.com",
        "Gpu.example.com",
        "gpu_x.example.com",
        "",
    ] {
        let mut opts = ServeOptions::new(NODE, bad, Arc::new(env.kernel.clone()));
        opts.plugins_dir = env.path("plugins");
        opts.registrar_dir = env.path("registry");
        opts.cdi_root = env.cdi_root();
        opts.kube = KubeSource::Client(env.client.clone());
        let token = CancellationToken::new();
        let result = tokio::time::timeout(Duration::from_secs(5), serve(opts, token.clone())).await;
        token.cancel();
        let err = match result {
            Ok(Err(e)) => format!("{e:#}"),
            Ok(Ok(())) => panic!("{bad:?}: serve returned Ok"),
            Err(_) => panic!("{bad:?}: serve accepted the driver name and kept running"),
        };
        assert!(err.contains("driver name"), "{bad:?}: {err}");
        for dir in ["plugins", "registry", "cdi"] {
            assert!(!env.path(dir).exists(), "{bad:?}: {dir} was created");
        }
    }
    // Names the API and CDI both accept pass the check.
    for good in ["vfio-gpu.dra.dev", "gpu.example.com", "a", &"a".repeat(63)] {
        vfio_gpu_kubelet::serve::validate_driver_name(good)
            .unwrap_or_else(|e| panic!("{good:?}: {e}"));
    }
}
