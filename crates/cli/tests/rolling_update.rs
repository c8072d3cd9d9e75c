//! Rolling updates: two real `serve` processes on one node (the demo host with
//! the simulated kernel, one fake API server), registered under per-pod socket
//! names and driven through the kubelet emulator over real Unix sockets. Either
//! instance may get any call; no claim is lost or moved twice, the ledger holds
//! each claim once, and the old instance stops cleanly on SIGTERM mid-traffic
//! while the new one takes over ResourceSlice publishing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use serde_json::json;
use vfio_gpu_engine::Holder;
use vfio_gpu_engine::ledger::{LedgerBody, decode};
use vfio_gpu_kubelet::grpc::dra::ClaimRef;
use vfio_gpu_kubelet::grpc::emulator::{KubeletEmulator, RegisteredPlugin};

mod common;
use common::{demo_host_under, kubelet_dirs_under};

const DRIVER: &str = "vfio-gpu.dra.dev";
const NODE: &str = "n1";
const NS: &str = "vms";
const UID_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const UID_B: &str = "bbbbbbbb-0000-4000-8000-00000000000b";
/// RTX 6000 Ada on nvidia, HDA audio in its group: a real move.
const AB: &str = "0000:ab:00.0";
/// A100 on nvidia: a real move.
const BA: &str = "0000:ba:00.0";
/// H100 already on vfio-pci: recorded, not moved.
const H100: &str = "0000:18:00.0";

/// A `serve` child of this test, killed (by its pid) when dropped; its log is
/// printed if the test failed.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("---- {} ----\n{log}", self.log.display());
        }
    }
}

impl Serve {
    fn start(d: &Path, uid: &str) -> Serve {
        let log = d.join(format!("serve-{uid}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfio-gpu-dra"));
        cmd.env_remove("VFIO_GPU_DRA_CRASH_AFTER_STEP")
            .env_remove("VFIO_GPU_DRA_STATE_DIR")
            .env("VFIO_GPU_DRA_POLICY", "/nonexistent/policy.toml")
            .env("VFIO_GPU_DRA_LOG", "info")
            .args(["serve", "--node-name", NODE, "--pod-uid", uid])
            // Background loops run while the two instances serve calls.
            .args(["--reconcile-interval", "1", "--cleanup-interval", "1"])
            .arg("--kubeconfig")
            .arg(d.join("kubeconfig"));
        let child = demo_host_under(kubelet_dirs_under(&mut cmd, d), d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("serve starts");
        Serve { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(ok.success(), "kill -TERM {}", self.pid());
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(start.elapsed() < within, "serve did not stop in {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn registration_socket(d: &Path, uid: &str) -> PathBuf {
    d.join("registry").join(format!("{DRIVER}-{uid}-reg.sock"))
}

fn dra_socket(d: &Path, uid: &str) -> PathBuf {
    d.join("plugins")
        .join(DRIVER)
        .join(format!("dra-{uid}.sock"))
}

/// Waits for the instance's registration socket and registers it like the kubelet.
async fn register(d: &Path, uid: &str, serve: &mut Serve) -> RegisteredPlugin {
    let socket = registration_socket(d, uid);
    let start = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = serve.child.try_wait() {
            panic!("serve {uid} exited early: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "serve {uid} never created {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    KubeletEmulator::new(&socket)
        .register()
        .await
        .expect("the kubelet registers the instance")
}

fn claim(api: &FakeApiServer, name: &str, gpus: &[&str]) -> ClaimRef {
    let results: Vec<_> = gpus
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let device = vfio_gpu_kubelet::plugin::device_name(&g.parse().expect("bdf"));
            json!({"request": format!("gpu{i}"), "driver": DRIVER, "pool": NODE, "device": device})
        })
        .collect();
    let requests: Vec<_> = (0..gpus.len())
        .map(|i| json!({"name": format!("gpu{i}"), "exactly": {"deviceClassName": "vfio-gpu"}}))
        .collect();
    let stored = api
        .insert(json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"devices": {"requests": requests}},
            "status": {"allocation": {"devices": {"results": results}}}
        }))
        .expect("claim inserted");
    ClaimRef {
        uid: stored["metadata"]["uid"].as_str().expect("uid").to_string(),
        namespace: NS.into(),
        name: name.into(),
    }
}

fn ledger(d: &Path) -> LedgerBody {
    let bytes = std::fs::read(d.join("demo/state/ledger.json")).expect("ledger exists");
    decode(&bytes).expect("the ledger parses")
}

/// GPUs the ledger records for claim `uid`.
fn held_by(d: &Path, uid: &str) -> Vec<String> {
    ledger(d)
        .gpus
        .iter()
        .filter(|(_, r)| matches!(&r.holder, Some(Holder::Claim { uid: u, .. }) if u == uid))
        .map(|(b, _)| b.to_string())
        .collect()
}

fn driver_of(d: &Path, bdf: &str) -> Option<String> {
    std::fs::read_link(
        d.join("demo/host/sys/bus/pci/devices")
            .join(bdf)
            .join("driver"),
    )
    .ok()
    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// How often the simulated kernel (both processes) was asked for `line`.
fn kernel_count(d: &Path, line: &str) -> usize {
    std::fs::read_to_string(d.join("demo/kernel.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == line)
        .count()
}

async fn prepare_ok(k: &RegisteredPlugin, c: &ClaimRef) {
    let r = k
        .prepare(std::slice::from_ref(c))
        .await
        .expect("prepare rpc");
    assert!(
        matches!(r.get(&c.uid), Some(Ok(devs)) if !devs.is_empty()),
        "{r:?}"
    );
}

async fn unprepare_ok(k: &RegisteredPlugin, c: &ClaimRef) {
    let r = k
        .unprepare(std::slice::from_ref(c))
        .await
        .expect("unprepare rpc");
    assert_eq!(r.get(&c.uid), Some(&Ok(())), "{r:?}");
}

/// Moves of `bdf` (GPU function) to vfio and back, as the kernel saw them.
fn moves(d: &Path, bdf: &str, host_driver: &str) -> (usize, usize) {
    (
        kernel_count(d, &format!("unbind {bdf} from {host_driver}")),
        kernel_count(d, &format!("unbind {bdf} from vfio-pci")),
    )
}

fn slice_devices(api: &FakeApiServer) -> Vec<String> {
    api.list("resourceslices", None)
        .iter()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d["name"].as_str().map(String::from))
        .collect()
}

async fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One kubelet-like worker: claims on `gpu` until `stop`, each prepared on one
/// instance and unprepared on the other. A call the old instance cannot answer
/// (it is stopping or gone) is retried on the new one, as the kubelet does once
/// the old registration is gone. Returns (rounds, calls A did not answer).
async fn traffic(
    api: Arc<FakeApiServer>,
    d: PathBuf,
    a: Arc<RegisteredPlugin>,
    b: Arc<RegisteredPlugin>,
    gpu: &'static str,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> (usize, usize) {
    let a_alive = AtomicBool::new(true);
    let mut a_failures = 0;
    let mut round = 0;
    while !stop.load(Ordering::SeqCst) {
        assert!(round < 500, "traffic never told to stop");
        let c = claim(&api, &format!("t-{}-{round}", &gpu[5..7]), &[gpu]);
        let (first, second) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        for (step, k) in [("prepare", first), ("unprepare", second)] {
            let use_a = Arc::ptr_eq(k, &a) && a_alive.load(Ordering::SeqCst);
            let target = if use_a { &a } else { &b };
            let ok = if step == "prepare" {
                match target.prepare(std::slice::from_ref(&c)).await {
                    Ok(r) => matches!(r.get(&c.uid), Some(Ok(_))),
                    Err(_) => false,
                }
            } else {
                match target.unprepare(std::slice::from_ref(&c)).await {
                    Ok(r) => r.get(&c.uid) == Some(&Ok(())),
                    Err(_) => false,
                }
            };
            if !ok {
                assert!(use_a, "{step} of {} failed on the new instance", c.name);
                a_alive.store(false, Ordering::SeqCst);
                a_failures += 1;
                if step == "prepare" {
                    prepare_ok(&b, &c).await;
                } else {
                    unprepare_ok(&b, &c).await;
                }
            }
            let held = held_by(&d, &c.uid);
            if step == "prepare" {
                assert_eq!(held, vec![gpu.to_string()], "{} after prepare", c.name);
            } else {
                assert!(held.is_empty(), "{} after unprepare: {held:?}", c.name);
            }
        }
        api.delete("resourceclaims", Some(NS), &c.name);
        done.fetch_add(1, Ordering::SeqCst);
        round += 1;
    }
    (round, a_failures)
}

/// Claims prepared by one instance and unprepared by the other, and calls to
/// both at once; `c1` (on AB) was prepared by A, `c2` (on BA) by B.
async fn cross_instance_calls(
    d: &Path,
    api: &FakeApiServer,
    ka: &RegisteredPlugin,
    kb: &RegisteredPlugin,
    (c1, c2): (&ClaimRef, &ClaimRef),
) {
    // Each instance unprepares what the other prepared, and again (idempotent).
    unprepare_ok(ka, c2).await;
    assert_eq!(driver_of(d, BA).as_deref(), Some("nvidia"));
    unprepare_ok(kb, c1).await;
    assert_eq!(driver_of(d, AB).as_deref(), Some("nvidia"));
    unprepare_ok(ka, c1).await;
    unprepare_ok(kb, c2).await;
    assert!(held_by(d, &c1.uid).is_empty() && held_by(d, &c2.uid).is_empty());
    assert_eq!(moves(d, AB, "nvidia"), (1, 1));
    assert_eq!(moves(d, BA, "nvidia"), (1, 1));

    // Concurrent calls to both: the same claim prepared on both at once moves
    // its GPU once; different claims on both at once.
    let c3 = claim(api, "c3", &[AB]);
    let c4 = claim(api, "c4", &[BA]);
    let c5 = claim(api, "c5", &[H100]);
    let (r3a, r3b, r4, r5) = tokio::join!(
        ka.prepare(std::slice::from_ref(&c3)),
        kb.prepare(std::slice::from_ref(&c3)),
        kb.prepare(std::slice::from_ref(&c4)),
        ka.prepare(std::slice::from_ref(&c5)),
    );
    let (r3a, r3b) = (r3a.expect("rpc"), r3b.expect("rpc"));
    assert!(matches!(r3a.get(&c3.uid), Some(Ok(_))), "{r3a:?}");
    assert_eq!(r3a.get(&c3.uid), r3b.get(&c3.uid), "same answer from both");
    assert!(matches!(r4.expect("rpc").get(&c4.uid), Some(Ok(_))));
    assert!(matches!(r5.expect("rpc").get(&c5.uid), Some(Ok(_))));
    assert_eq!(held_by(d, &c3.uid), vec![AB.to_string()]);
    assert_eq!(held_by(d, &c4.uid), vec![BA.to_string()]);
    assert_eq!(held_by(d, &c5.uid), vec![H100.to_string()]);
    assert_eq!(moves(d, AB, "nvidia"), (2, 1), "c3 moved AB once");
    let (u3a, u3b, u4, u5) = tokio::join!(
        ka.unprepare(std::slice::from_ref(&c3)),
        kb.unprepare(std::slice::from_ref(&c3)),
        ka.unprepare(std::slice::from_ref(&c4)),
        kb.unprepare(std::slice::from_ref(&c5)),
    );
    for (r, c) in [(u3a, &c3), (u3b, &c3), (u4, &c4), (u5, &c5)] {
        assert_eq!(r.expect("rpc").get(&c.uid), Some(&Ok(())), "{}", c.name);
    }
    assert_eq!(moves(d, AB, "nvidia"), (2, 2));
    assert_eq!(moves(d, BA, "nvidia"), (2, 2));
    assert_eq!(driver_of(d, H100).as_deref(), Some("vfio-pci"));
}

/// Every claim moved its GPU exactly once each way (`rounds` traffic rounds
/// per GPU after two claims each), nothing is left held.
fn check_every_move_once(d: &Path, rounds: &HashMap<&str, usize>) {
    // Every claim moved its GPU exactly once each way, nothing is left held.
    let (ab, ba) = (2 + rounds[AB], 2 + rounds[BA]);
    assert_eq!(moves(d, AB, "nvidia"), (ab, ab));
    assert_eq!(
        kernel_count(d, "unbind 0000:ab:00.1 from snd_hda_intel"),
        ab,
        "the audio function moved with its GPU, once per claim"
    );
    assert_eq!(moves(d, BA, "nvidia"), (ba, ba));
    let body = ledger(d);
    let claims: HashMap<_, _> = body
        .gpus
        .iter()
        .filter_map(|(b, r)| match &r.holder {
            Some(Holder::Claim { uid, .. }) => Some((b.to_string(), uid.clone())),
            _ => None,
        })
        .collect();
    assert!(claims.is_empty(), "{claims:?}");
    assert_eq!(driver_of(d, AB).as_deref(), Some("nvidia"));
    assert_eq!(driver_of(d, BA).as_deref(), Some("nvidia"));
    let cdi: Vec<_> = std::fs::read_dir(d.join("cdi"))
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(cdi.is_empty(), "CDI specs left: {cdi:?}");
}

/// A temp dir holding a kubeconfig for a fresh fake API server that knows the node.
async fn node_with_api_server() -> (tempfile::TempDir, Arc<FakeApiServer>) {
    vfio_gpu_kubelet::serve::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Arc::new(FakeApiServer::start().await.expect("fake API server"));
    api.write_kubeconfig(dir.path().join("kubeconfig"))
        .expect("kubeconfig");
    api.insert(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))
        .expect("node");
    (dir, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_serve_processes_share_one_node_through_a_rolling_update() {
    let (dir, api) = node_with_api_server().await;
    let d = dir.path().to_path_buf();

    // The old instance alone.
    let mut a = Serve::start(&d, UID_A);
    let ka = Arc::new(register(&d, UID_A, &mut a).await);
    wait_for(
        "instance A publishes slices",
        Duration::from_secs(20),
        || {
            slice_devices(&api).contains(&vfio_gpu_kubelet::plugin::device_name(
                &AB.parse().expect("bdf"),
            ))
        },
    )
    .await;
    let c1 = claim(&api, "c1", &[AB]);
    prepare_ok(&ka, &c1).await;
    assert_eq!(driver_of(&d, AB).as_deref(), Some("vfio-pci"));

    // The new instance starts next to it (a surge update) and serves too.
    let mut b = Serve::start(&d, UID_B);
    let kb = Arc::new(register(&d, UID_B, &mut b).await);
    for uid in [UID_A, UID_B] {
        assert!(registration_socket(&d, uid).exists(), "{uid}");
        assert!(dra_socket(&d, uid).exists(), "{uid}");
    }
    let c2 = claim(&api, "c2", &[BA]);
    prepare_ok(&kb, &c2).await;
    assert_eq!(held_by(&d, &c1.uid), vec![AB.to_string()]);
    assert_eq!(held_by(&d, &c2.uid), vec![BA.to_string()]);

    cross_instance_calls(&d, &api, &ka, &kb, (&c1, &c2)).await;

    // Traffic on both GPUs through both instances; the old one gets SIGTERM
    // in the middle of it, and the traffic goes on after it is gone.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = [AB, BA]
        .into_iter()
        .map(|gpu| {
            tokio::spawn(traffic(
                Arc::clone(&api),
                d.clone(),
                Arc::clone(&ka),
                Arc::clone(&kb),
                gpu,
                Arc::clone(&stop),
                Arc::clone(&done),
            ))
        })
        .collect();
    wait_for("traffic under way", Duration::from_secs(60), || {
        done.load(Ordering::SeqCst) >= 3
    })
    .await;
    a.sigterm();
    let (status, a) = tokio::task::spawn_blocking(move || {
        let s = a.wait_exit(Duration::from_secs(30));
        (s, a)
    })
    .await
    .expect("join");
    assert!(status.success(), "A stopped cleanly on SIGTERM: {status}");
    drop(a);
    let after = done.load(Ordering::SeqCst);
    wait_for("traffic after A is gone", Duration::from_secs(60), || {
        done.load(Ordering::SeqCst) >= after + 4
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut rounds = HashMap::new();
    let mut a_failures = 0;
    for (gpu, w) in [AB, BA].into_iter().zip(workers) {
        let (n, f) = w.await.expect("worker");
        rounds.insert(gpu, n);
        a_failures += f;
    }
    eprintln!("rounds {rounds:?}; calls the stopped instance did not answer: {a_failures}");
    assert!(a_failures > 0, "no call reached the stopped instance");
    assert!(!registration_socket(&d, UID_A).exists(), "A deregistered");
    assert!(!dra_socket(&d, UID_A).exists(), "A removed its DRA socket");
    assert!(
        registration_socket(&d, UID_B).exists(),
        "B's socket untouched"
    );
    assert!(dra_socket(&d, UID_B).exists(), "B's socket untouched");

    check_every_move_once(&d, &rounds);

    // A left the slices in place; B publishes now: slices deleted behind its
    // back come back.
    assert!(
        !slice_devices(&api).is_empty(),
        "A left the slices in place"
    );
    for s in api.list("resourceslices", None) {
        let name = s["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        api.delete("resourceslices", None, &name);
    }
    wait_for("B republishes the slices", Duration::from_secs(20), || {
        !slice_devices(&api).is_empty()
    })
    .await;

    // B keeps serving alone.
    let c6 = claim(&api, "c6", &[AB]);
    prepare_ok(&kb, &c6).await;
    unprepare_ok(&kb, &c6).await;
    b.sigterm();
    let status = tokio::task::spawn_blocking(move || {
        let s = b.wait_exit(Duration::from_secs(30));
        (s, b)
    })
    .await
    .expect("join");
    assert!(status.0.success(), "B stopped cleanly: {}", status.0);
}

/// A pod killed with SIGKILL (OOM, node pressure) cannot remove its sockets, and the
/// kubelet keeps dialling a registration socket nobody serves. The next instance
/// removes what the dead one left, never a live instance's sockets, and never
/// another driver's file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_instance_s_sockets_are_removed_by_the_next_and_live_ones_kept() {
    const UID_C: &str = "cccccccc-0000-4000-8000-00000000000c";
    const UID_D: &str = "dddddddd-0000-4000-8000-00000000000d";
    let (dir, api) = node_with_api_server().await;
    let d = dir.path().to_path_buf();
    // Another driver's leftover socket, and a file of ours that is not a socket.
    std::fs::create_dir_all(d.join("registry")).expect("registry dir");
    let foreign = d
        .join("registry")
        .join(format!("other.example.com-{UID_C}-reg.sock"));
    drop(std::os::unix::net::UnixListener::bind(&foreign).expect("bind"));
    let not_a_socket = d
        .join("registry")
        .join(format!("{DRIVER}-{UID_C}-reg.sock"));
    std::fs::write(&not_a_socket, "keep me").expect("write");

    let mut a = Serve::start(&d, UID_A);
    let _ka = register(&d, UID_A, &mut a).await;
    wait_for("A's DRA socket", Duration::from_secs(20), || {
        dra_socket(&d, UID_A).exists()
    })
    .await;
    a.child.kill().expect("SIGKILL");
    a.child.wait().expect("reaped");
    for path in [registration_socket(&d, UID_A), dra_socket(&d, UID_A)] {
        assert!(path.exists(), "SIGKILL leaves {}", path.display());
    }

    let mut b = Serve::start(&d, UID_B);
    let kb = register(&d, UID_B, &mut b).await;
    for path in [registration_socket(&d, UID_A), dra_socket(&d, UID_A)] {
        assert!(
            !path.exists(),
            "{} left for the kubelet to dial",
            path.display()
        );
    }
    assert!(foreign.exists(), "another driver's socket was removed");
    assert_eq!(
        std::fs::read_to_string(&not_a_socket).expect("still there"),
        "keep me"
    );

    // A third instance next to a live B keeps B's sockets, and B still serves.
    let mut c = Serve::start(&d, UID_D);
    let _kc = register(&d, UID_D, &mut c).await;
    for path in [registration_socket(&d, UID_B), dra_socket(&d, UID_B)] {
        assert!(path.exists(), "a live instance lost {}", path.display());
    }
    let c1 = claim(&api, "c1", &[AB]);
    prepare_ok(&kb, &c1).await;
    assert_eq!(driver_of(&d, AB).as_deref(), Some("vfio-pci"));
}
