//! `serve` with the metrics endpoint: probes follow registration and publishing, and
//! prepare/unprepare through the kubelet emulator move the histograms and counters.

mod plugin_common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use plugin_common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vfio_gpu_kubelet::grpc::emulator::KubeletEmulator;
use vfio_gpu_kubelet::serve::{CancellationToken, KubeSource, ServeOptions, serve};

/// One HTTP/1.1 GET; returns (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8(buf).expect("utf-8");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Parses the text exposition into `series{labels} -> value`.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

async fn wait_for(addr: SocketAddr, path: &str, want: u16) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get(addr, path).await;
        if status == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} stayed {status} ({body:?}), want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_follow_registration_and_calls() {
    let env = Env::new().await;
    env.api
        .insert(serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))
        .expect("node");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let addr = listener.local_addr().expect("bound address");
    let mut opts = ServeOptions::new(NODE, DRIVER, Arc::new(env.kernel.clone()));
    opts.plugins_dir = env.path("plugins");
    opts.registrar_dir = env.path("registry");
    opts.cdi_root = env.cdi_root();
    opts.kube = KubeSource::Client(env.client.clone());
    opts.metrics_listener = Some(listener);
    let token = CancellationToken::new();
    let task = tokio::spawn(serve(opts, token.clone()));

    // Up before registration: alive, not ready.
    let registration = env.path("registry").join(format!("{DRIVER}-reg.sock"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !registration.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no registration socket"
        );
        assert!(!task.is_finished(), "serve ended early: {:?}", task.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "ready before registration: {body}");
    assert!(body.contains("not registered"), "{body}");
    assert_eq!(get(addr, "/healthz").await.0, 200);

    let kubelet = KubeletEmulator::new(&registration)
        .register()
        .await
        .expect("registers");
    wait_for(addr, "/readyz", 200).await;

    let before = parse(&get(addr, "/metrics").await.1);
    assert_eq!(before["vfio_gpu_dra_prepare_duration_seconds_count"], 0.0);
    let claim = env.claim("vm", &[("gpu", AB)]);
    let r = kubelet
        .prepare(std::slice::from_ref(&claim))
        .await
        .expect("rpc");
    assert!(r[&claim.uid].is_ok(), "{r:?}");
    let u = kubelet
        .unprepare(std::slice::from_ref(&claim))
        .await
        .expect("rpc");
    assert!(u[&claim.uid].is_ok(), "{u:?}");

    let (status, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let m = parse(&text);
    assert_eq!(
        m["vfio_gpu_dra_prepare_duration_seconds_count"], 1.0,
        "{text}"
    );
    assert_eq!(
        m["vfio_gpu_dra_unprepare_duration_seconds_count"], 1.0,
        "{text}"
    );
    assert!(m["vfio_gpu_dra_prepare_duration_seconds_sum"] > 0.0);
    assert_eq!(
        m["vfio_gpu_dra_moves_total{direction=\"to_vfio\",outcome=\"moved\"}"], 1.0,
        "{text}"
    );
    assert_eq!(
        m["vfio_gpu_dra_moves_total{direction=\"release\",outcome=\"restored\"}"], 1.0,
        "{text}"
    );
    assert_eq!(m["vfio_gpu_dra_ledger_commit_failures_total"], 0.0);
    // The device gauges come from the scanner: all 8 demo GPUs, none stuck.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = parse(&get(addr, "/metrics").await.1);
        let devices = m
            .get("vfio_gpu_dra_devices{keep_on_vfio=\"true\"}")
            .copied()
            .unwrap_or(0.0)
            + m.get("vfio_gpu_dra_devices{keep_on_vfio=\"false\"}")
                .copied()
                .unwrap_or(0.0);
        if devices == 8.0 {
            assert_eq!(m["vfio_gpu_dra_stuck_devices"], 0.0);
            assert_eq!(m["vfio_gpu_dra_persistence_left_off_devices"], 0.0);
            assert!(
                m["vfio_gpu_dra_devices{keep_on_vfio=\"true\"}"] >= 1.0,
                "H100 is kept"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "device gauges: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(addr, "/nope").await.0, 404);

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve stops in time")
        .expect("serve task")
        .expect("serve returns Ok");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "metrics endpoint closed on shutdown"
    );
}

/// N5: the liveness heartbeat must not wait for periodic work. A cleanup stuck on a
/// slow API server (each claim GET takes seconds) used to stall the serve loop that
/// ticks the heartbeat, so `/healthz` failed and the kubelet killed the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_stays_ok_while_cleanup_waits_for_a_slow_api_server() {
    let env = Env::new().await;
    env.api
        .insert(serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}))
        .expect("node");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let addr = listener.local_addr().expect("bound address");
    let mut opts = ServeOptions::new(NODE, DRIVER, Arc::new(env.kernel.clone()));
    opts.plugins_dir = env.path("plugins");
    opts.registrar_dir = env.path("registry");
    opts.cdi_root = env.cdi_root();
    opts.kube = KubeSource::Client(env.client.clone());
    opts.metrics_listener = Some(listener);
    opts.metrics = Arc::new(vfio_gpu_kubelet::metrics::Metrics::with_stale_after(
        Duration::from_millis(800),
    ));
    opts.heartbeat_interval = Duration::from_millis(50);
    opts.cleanup_interval = Duration::from_millis(100);
    opts.drain_timeout = Duration::from_secs(5);
    let token = CancellationToken::new();
    let task = tokio::spawn(serve(opts, token.clone()));

    let registration = env.path("registry").join(format!("{DRIVER}-reg.sock"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !registration.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no registration socket"
        );
        assert!(!task.is_finished(), "serve ended early: {:?}", task.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kubelet = KubeletEmulator::new(&registration)
        .register()
        .await
        .expect("registers");
    let claim = env.claim("vm", &[("gpu", AB)]);
    let r = kubelet
        .prepare(std::slice::from_ref(&claim))
        .await
        .expect("rpc");
    assert!(r[&claim.uid].is_ok(), "{r:?}");

    // Every cleanup now spends 3 s on this claim's GET.
    env.api
        .set_get_delay("resourceclaims", Duration::from_secs(3));
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while tokio::time::Instant::now() < until {
        let (status, body) = get(addr, "/healthz").await;
        assert_eq!(status, 200, "liveness failed during a slow cleanup: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.api.set_get_delay("resourceclaims", Duration::ZERO);

    token.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("serve stops in time")
        .expect("serve task")
        .expect("serve returns Ok");
}
