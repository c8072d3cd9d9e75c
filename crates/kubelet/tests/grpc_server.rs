//! End-to-end tests of the DRA + registration server over real Unix sockets, driven by
//! the kubelet emulator (kubelet-style percent-encoded `:authority` on registration).

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vfio_gpu_kubelet::grpc::dra::{
    BoxFuture, ClaimRef, DraBackend, PrepareResults, PreparedDevice, UnprepareResults,
};
use vfio_gpu_kubelet::grpc::emulator::{
    DraVersion, KubeletEmulator, RawGrpcClient, kubelet_authority,
};
use vfio_gpu_kubelet::grpc::registration::RegistrationState;
use vfio_gpu_kubelet::grpc::server::{ServerConfig, ServerHandle, serve};

const DRIVER: &str = "gpu.vfio.example.com";
const LIMIT: Duration = Duration::from_secs(20);

/// Backend that prepares one device per claim, fails claims whose UID starts with
/// `fail`, and "forgets" claims whose UID starts with `missing`.
#[derive(Default)]
struct MockBackend {
    calls: Mutex<Vec<(&'static str, Vec<String>)>>,
}

impl DraBackend for MockBackend {
    fn prepare(&self, claims: Vec<ClaimRef>) -> BoxFuture<'_, PrepareResults> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push(("prepare", claims.iter().map(|c| c.uid.clone()).collect()));
            let mut out = HashMap::new();
            for c in claims {
                if c.uid.starts_with("missing") {
                    continue;
                }
                let r = if c.uid.starts_with("fail") {
                    Err(format!("cannot prepare {}/{}", c.namespace, c.name))
                } else {
                    Ok(vec![PreparedDevice {
                        request_names: vec!["gpu".into()],
                        pool_name: "node-a".into(),
                        device_name: format!("gpu-{}", c.name),
                        cdi_device_ids: vec![format!("vfio.example.com/gpu={}", c.uid)],
                        share_id: Some("share-1".into()),
                    }])
                };
                out.insert(c.uid, r);
            }
            out
        })
    }

    fn unprepare(&self, claims: Vec<ClaimRef>) -> BoxFuture<'_, UnprepareResults> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push(("unprepare", claims.iter().map(|c| c.uid.clone()).collect()));
            claims
                .into_iter()
                .filter(|c| !c.uid.starts_with("missing"))
                .map(|c| {
                    let r = if c.uid.starts_with("fail") {
                        Err("busy".to_string())
                    } else {
                        Ok(())
                    };
                    (c.uid, r)
                })
                .collect()
        })
    }
}

fn claim(uid: &str) -> ClaimRef {
    ClaimRef {
        uid: uid.into(),
        namespace: "vms".into(),
        name: format!("claim-{uid}"),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    config: ServerConfig,
    backend: Arc<MockBackend>,
    token: CancellationToken,
    handle: ServerHandle,
}

async fn start_in(dir: tempfile::TempDir) -> Fixture {
    let mut config = ServerConfig::new(
        DRIVER,
        &dir.path().join("plugins"),
        &dir.path().join("plugins_registry"),
    );
    config.registration_retry_backoff = Duration::from_millis(300);
    config.socket_check_interval = Duration::from_millis(100);
    let backend = Arc::new(MockBackend::default());
    let token = CancellationToken::new();
    let handle = serve(config.clone(), backend.clone(), token.clone())
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        config,
        backend,
        token,
        handle,
    }
}

async fn start() -> Fixture {
    start_in(tempfile::tempdir().unwrap()).await
}

/// File identity; inode numbers alone are reused at once after a delete.
fn file_id(p: &Path) -> (u64, i64, i64) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.ino(), m.ctime(), m.ctime_nsec())
}

#[tokio::test]
async fn kubelet_style_registration_and_v1_round_trip() {
    tokio::time::timeout(LIMIT, async {
        let f = start().await;
        assert_eq!(f.handle.dra_socket, f.config.dra_socket);
        let emu = KubeletEmulator::new(&f.handle.registration_socket);
        let plugin = emu.register().await.unwrap();
        assert_eq!(plugin.info.r#type, "DRAPlugin");
        assert_eq!(plugin.info.name, DRIVER);
        assert_eq!(plugin.info.endpoint, f.handle.dra_socket.to_string_lossy());
        assert_eq!(
            plugin.info.supported_versions,
            vec!["v1.DRAPlugin", "v1beta1.DRAPlugin"]
        );
        assert_eq!(plugin.version, DraVersion::V1);
        let mut status = f.handle.registration_status();
        status
            .wait_for(|s| *s == RegistrationState::Registered)
            .await
            .unwrap();

        let r = plugin
            .prepare(&[claim("a"), claim("fail-b")])
            .await
            .unwrap();
        assert_eq!(r.len(), 2);
        let devs = r["a"].as_ref().unwrap();
        assert_eq!(devs.len(), 1);
        assert_eq!(devs[0].pool_name, "node-a");
        assert_eq!(devs[0].device_name, "gpu-claim-a");
        assert_eq!(devs[0].request_names, vec!["gpu"]);
        assert_eq!(devs[0].cdi_device_ids, vec!["vfio.example.com/gpu=a"]);
        assert_eq!(devs[0].share_id.as_deref(), Some("share-1"));
        assert_eq!(
            r["fail-b"],
            Err("cannot prepare vms/claim-fail-b".to_string())
        );

        let u = plugin
            .unprepare(&[claim("a"), claim("fail-b")])
            .await
            .unwrap();
        assert_eq!(u["a"], Ok(()));
        assert_eq!(u["fail-b"], Err("busy".to_string()));
        let calls = f.backend.calls.lock().unwrap().clone();
        assert_eq!(
            calls[0],
            ("prepare", vec!["a".to_string(), "fail-b".to_string()])
        );
        assert_eq!(calls[1].0, "unprepare");
        f.token.cancel();
        f.handle.wait().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn v1beta1_round_trip_and_old_kubelet_negotiation() {
    tokio::time::timeout(LIMIT, async {
        let f = start().await;
        let old = KubeletEmulator::new(&f.handle.registration_socket)
            .with_known_versions(vec![DraVersion::V1beta1]);
        let plugin = old.register().await.unwrap();
        assert_eq!(plugin.version, DraVersion::V1beta1);
        let r = plugin.prepare(&[claim("x")]).await.unwrap();
        let devs = r["x"].as_ref().unwrap();
        assert_eq!(devs[0].device_name, "gpu-claim-x");
        assert_eq!(devs[0].cdi_device_ids, vec!["vfio.example.com/gpu=x"]);
        // v1beta1 has no share_id on the wire.
        assert_eq!(devs[0].share_id, None);
        let u = plugin.unprepare(&[claim("x")]).await.unwrap();
        assert_eq!(u["x"], Ok(()));
        // Explicit version selection on the same connection.
        let r1 = plugin
            .prepare_with(DraVersion::V1, &[claim("y")])
            .await
            .unwrap();
        assert_eq!(
            r1["y"].as_ref().unwrap()[0].share_id.as_deref(),
            Some("share-1")
        );
        f.token.cancel();
        f.handle.wait().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn missing_claims_get_error_entries_in_both_versions() {
    tokio::time::timeout(LIMIT, async {
        let f = start().await;
        let plugin = KubeletEmulator::new(&f.handle.registration_socket)
            .register()
            .await
            .unwrap();
        for v in [DraVersion::V1, DraVersion::V1beta1] {
            let r = plugin
                .prepare_with(v, &[claim("ok"), claim("missing-1")])
                .await
                .unwrap();
            assert_eq!(r.len(), 2, "{v:?}");
            assert!(r["ok"].is_ok());
            let e = r["missing-1"].as_ref().unwrap_err();
            assert!(e.contains("missing-1"), "{e}");
            let u = plugin
                .unprepare_with(v, &[claim("missing-2"), claim("ok")])
                .await
                .unwrap();
            assert_eq!(u.len(), 2);
            assert!(u["missing-2"].is_err());
            assert_eq!(u["ok"], Ok(()));
        }
        f.token.cancel();
        f.handle.wait().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn sockets_are_0600_and_removed_at_shutdown() {
    tokio::time::timeout(LIMIT, async {
        let f = start().await;
        for p in [&f.handle.dra_socket, &f.handle.registration_socket] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        assert_eq!(
            f.config.dra_socket,
            f.dir_path().join("plugins").join(DRIVER).join("dra.sock")
        );
        assert_eq!(
            f.config.registration_socket,
            f.dir_path()
                .join("plugins_registry")
                .join(format!("{DRIVER}-reg.sock"))
        );
        // A connected DRA client must not keep shutdown from completing.
        let plugin = KubeletEmulator::new(&f.handle.registration_socket)
            .register()
            .await
            .unwrap();
        plugin.prepare(&[claim("a")]).await.unwrap();
        let (dra, reg) = (
            f.handle.dra_socket.clone(),
            f.handle.registration_socket.clone(),
        );
        f.token.cancel();
        f.handle.wait().await.unwrap();
        assert!(!dra.exists());
        assert!(!reg.exists());
    })
    .await
    .unwrap();
}

impl Fixture {
    fn dir_path(&self) -> &Path {
        self._dir.path()
    }
}

#[tokio::test]
async fn stale_sockets_removed_at_start_and_foreign_socket_kept_at_shutdown() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig::new(
            DRIVER,
            &dir.path().join("plugins"),
            &dir.path().join("plugins_registry"),
        );
        // Leave stale socket files behind, as a crashed instance would.
        let mut stale = Vec::new();
        for p in [&config.dra_socket, &config.registration_socket] {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            drop(std::os::unix::net::UnixListener::bind(p).unwrap());
            stale.push(file_id(p));
        }
        let f = start_in(dir).await;
        assert_ne!(file_id(&f.handle.dra_socket), stale[0]);
        assert_ne!(file_id(&f.handle.registration_socket), stale[1]);
        KubeletEmulator::new(&f.handle.registration_socket)
            .register()
            .await
            .unwrap();

        // Another instance takes over the registration socket path: ours must not
        // delete it on shutdown.
        std::fs::remove_file(&f.handle.registration_socket).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(&f.handle.registration_socket).unwrap();
        let reg = f.handle.registration_socket.clone();
        let dra = f.handle.dra_socket.clone();
        f.token.cancel();
        f.handle.wait().await.unwrap();
        assert!(reg.exists(), "foreign socket must survive our shutdown");
        assert!(!dra.exists());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn non_socket_file_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::new(DRIVER, &dir.path().join("plugins"), &dir.path().join("reg"));
    std::fs::create_dir_all(config.dra_socket.parent().unwrap()).unwrap();
    std::fs::write(&config.dra_socket, b"not a socket").unwrap();
    let err = serve(
        config.clone(),
        Arc::new(MockBackend::default()),
        CancellationToken::new(),
    )
    .await
    .err()
    .expect("serve must refuse");
    assert!(err.to_string().contains("dra.sock"), "{err}");
    assert_eq!(std::fs::read(&config.dra_socket).unwrap(), b"not a socket");
}

#[tokio::test]
async fn failed_registration_is_surfaced_and_socket_recreated() {
    tokio::time::timeout(LIMIT, async {
        let f = start().await;
        let mut status = f.handle.registration_status();
        assert_eq!(*status.borrow(), RegistrationState::Pending);
        let first_id = file_id(&f.handle.registration_socket);
        let mut raw = RawGrpcClient::connect(
            &f.handle.registration_socket,
            kubelet_authority(&f.handle.registration_socket),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        raw.get_info().await.unwrap();
        raw.notify_registration_status(false, "version mismatch")
            .await
            .unwrap();
        status
            .wait_for(|s| *s == RegistrationState::Failed("version mismatch".into()))
            .await
            .unwrap();
        drop(raw);
        // The socket goes away and comes back as a new file after the backoff.
        let path = f.handle.registration_socket.clone();
        loop {
            let now = std::fs::symlink_metadata(&path)
                .ok()
                .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()));
            if now.is_some_and(|id| id != first_id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let plugin = KubeletEmulator::new(&path).register().await.unwrap();
        assert_eq!(plugin.version, DraVersion::V1);
        status
            .wait_for(|s| *s == RegistrationState::Registered)
            .await
            .unwrap();
        f.token.cancel();
        f.handle.wait().await.unwrap();
        assert!(!path.exists());
    })
    .await
    .unwrap();
}

/// Waits until `path` is a socket again whose identity differs from `old`.
async fn wait_for_new_socket(path: &Path, old: (u64, i64, i64), within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if std::fs::symlink_metadata(path).is_ok() && file_id(path) != old {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} was not re-created within {within:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn registration_socket_deleted_by_someone_else_is_recreated() {
    tokio::time::timeout(Duration::from_secs(40), async {
        let f = start().await;
        let reg = f.handle.registration_socket.clone();
        KubeletEmulator::new(&reg).register().await.unwrap();

        // plugins_registry wiped: the socket file disappears.
        let first = file_id(&reg);
        std::fs::remove_file(&reg).unwrap();
        wait_for_new_socket(&reg, first, Duration::from_secs(5)).await;
        let plugin = KubeletEmulator::new(&reg).register().await.unwrap();
        let r = plugin.prepare(&[claim("after-wipe")]).await.unwrap();
        assert!(r["after-wipe"].is_ok(), "{r:?}");

        // Replaced by some other socket: ours is bound again.
        let second = file_id(&reg);
        std::fs::remove_file(&reg).unwrap();
        let intruder = std::os::unix::net::UnixListener::bind(&reg).unwrap();
        let intruder_id = file_id(&reg);
        wait_for_new_socket(&reg, intruder_id, Duration::from_secs(5)).await;
        assert_ne!(file_id(&reg), second);
        drop(intruder);
        KubeletEmulator::new(&reg).register().await.unwrap();

        f.token.cancel();
        f.handle.wait().await.unwrap();
        assert!(!reg.exists(), "our socket is removed at shutdown");
    })
    .await
    .unwrap();
}

/// N4: the DRA socket is watched like the registration socket. Deleted (a node
/// cleanup script), it is bound again within the check interval, new connections to
/// the registered endpoint work, and connections accepted before go on.
#[tokio::test]
async fn dra_socket_deleted_by_someone_else_is_recreated() {
    tokio::time::timeout(Duration::from_secs(40), async {
        let f = start().await;
        let dra = f.handle.dra_socket.clone();
        let before = KubeletEmulator::new(&f.handle.registration_socket)
            .register()
            .await
            .unwrap();
        let r = before.prepare(&[claim("before")]).await.unwrap();
        assert!(r["before"].is_ok(), "{r:?}");

        let first = file_id(&dra);
        std::fs::remove_file(&dra).unwrap();
        wait_for_new_socket(&dra, first, Duration::from_secs(5)).await;
        // A fresh connection (what the kubelet makes after losing its own).
        let after = KubeletEmulator::new(&f.handle.registration_socket)
            .register()
            .await
            .unwrap();
        let r = after.prepare(&[claim("after-wipe")]).await.unwrap();
        assert!(r["after-wipe"].is_ok(), "{r:?}");
        // The connection from before the wipe still works.
        let r = before.prepare(&[claim("old-conn")]).await.unwrap();
        assert!(r["old-conn"].is_ok(), "{r:?}");

        // Replaced by some other socket: ours is bound again.
        std::fs::remove_file(&dra).unwrap();
        let intruder = std::os::unix::net::UnixListener::bind(&dra).unwrap();
        let intruder_id = file_id(&dra);
        wait_for_new_socket(&dra, intruder_id, Duration::from_secs(5)).await;
        drop(intruder);
        let r = KubeletEmulator::new(&f.handle.registration_socket)
            .register()
            .await
            .unwrap()
            .prepare(&[claim("after-replace")])
            .await
            .unwrap();
        assert!(r["after-replace"].is_ok(), "{r:?}");

        f.token.cancel();
        f.handle.wait().await.unwrap();
        assert!(!dra.exists(), "our socket is removed at shutdown");
    })
    .await
    .unwrap();
}

/// N4: `/healthz` dials both sockets: it fails when either does not answer (a socket
/// file deleted and not re-created, or no server), not only when the serve loop stalls.
#[tokio::test]
async fn liveness_fails_when_a_socket_does_not_answer() {
    use vfio_gpu_kubelet::metrics::Metrics;
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(
            DRIVER,
            &dir.path().join("plugins"),
            &dir.path().join("plugins_registry"),
        );
        // No re-creation during this test.
        config.socket_check_interval = Duration::from_secs(3600);
        let token = CancellationToken::new();
        let handle = serve(config, Arc::new(MockBackend::default()), token.clone())
            .await
            .unwrap();
        let metrics = Metrics::new();
        metrics.heartbeat();
        metrics.set_liveness_sockets(
            handle.registration_socket.clone(),
            handle.dra_socket.clone(),
        );
        metrics.alive_and_answering().await.unwrap();

        let moved = dir.path().join("moved-dra.sock");
        std::fs::rename(&handle.dra_socket, &moved).unwrap();
        let e = metrics.alive_and_answering().await.unwrap_err();
        assert!(e.contains("DRA socket"), "{e}");
        assert!(!e.contains("registration socket"), "{e}");
        std::fs::rename(&moved, &handle.dra_socket).unwrap();
        metrics.alive_and_answering().await.unwrap();

        let reg_moved = dir.path().join("moved-reg.sock");
        std::fs::rename(&handle.registration_socket, &reg_moved).unwrap();
        let e = metrics.alive_and_answering().await.unwrap_err();
        assert!(e.contains("registration socket"), "{e}");
        std::fs::rename(&reg_moved, &handle.registration_socket).unwrap();

        token.cancel();
        handle.wait().await.unwrap();
    })
    .await
    .unwrap();
}

/// The HTTP/2 client preface and an empty SETTINGS frame: what a kubelet sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Connects to `path`, sends the preface and reads: "served" when the server
/// answers (its SETTINGS), "closed" when it hangs up unserved.
fn probe(path: &Path) -> &'static str {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) else {
        return "connect-failed";
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(H2_PREFACE);
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) if n > 0 => "served",
        Ok(_) => "closed",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "closed",
        Err(_) => "timeout",
    }
}

/// Not a test on its own: the non-root side of
/// `a_non_root_peer_is_closed_unserved`, run as a child process under
/// another uid (it probes the sockets named in `PEER_PROBE_SOCKETS`).
#[test]
fn peer_probe_helper() {
    let Ok(paths) = std::env::var("PEER_PROBE_SOCKETS") else {
        return;
    };
    for p in paths.split(':') {
        println!("PROBE {} {}", p, probe(Path::new(p)));
    }
}

/// Runs `peer_probe_helper` as `uid` against `sockets`; its verdict per socket.
fn probe_as(uid: u32, sockets: &[&Path]) -> Vec<String> {
    use std::os::unix::process::CommandExt;
    let joined: Vec<String> = sockets
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "peer_probe_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PEER_PROBE_SOCKETS", joined.join(":"))
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    eprintln!(
        "peer as uid {uid}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once("PROBE ").map(|(_, probe)| probe))
        .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
        .collect()
}

/// Lets uid `65534` reach the fixture's sockets through the file system, so only
/// the plugin's own SO_PEERCRED check stands in its way.
fn open_up(f: &Fixture) {
    let mut dir = f.config.dra_socket.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d == Path::new("/") || d == std::env::temp_dir() {
            break;
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir = d.parent().map(Path::to_path_buf);
    }
    let registrar = f.config.registration_socket.parent().unwrap();
    std::fs::set_permissions(registrar, std::fs::Permissions::from_mode(0o755)).unwrap();
    for s in [&f.handle.dra_socket, &f.handle.registration_socket] {
        std::fs::set_permissions(s, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
}

/// L6: a peer whose uid is not allowed (not root, not the plugin's own) is closed
/// before it is served, on both sockets; with its uid allowed, the same peer is
/// served (so the check, not the file system, refused it). Needs root (it runs
/// the peer as uid 65534).
#[tokio::test]
async fn a_non_root_peer_is_closed_unserved() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a peer as another uid");
        return;
    }
    tokio::time::timeout(LIMIT, async {
        let f = start().await;
        open_up(&f);
        let sockets = [
            f.handle.dra_socket.as_path(),
            f.handle.registration_socket.as_path(),
        ];
        let (dra, reg) = (sockets[0].to_path_buf(), sockets[1].to_path_buf());
        let verdicts = tokio::task::spawn_blocking(move || probe_as(65534, &[&dra, &reg]))
            .await
            .unwrap();
        assert_eq!(
            verdicts,
            ["closed", "closed"],
            "uid 65534 on DRA, registration"
        );
        // Root, the kubelet, is served.
        let emu = KubeletEmulator::new(&f.handle.registration_socket);
        emu.register().await.unwrap();
        f.token.cancel();
        f.handle.wait().await.unwrap();

        // The control: the same peer with its uid allowed is served.
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(
            DRIVER,
            &dir.path().join("plugins"),
            &dir.path().join("plugins_registry"),
        );
        config.peers.allowed_uids = vec![0, 65534];
        let token = CancellationToken::new();
        let handle = serve(
            config.clone(),
            Arc::new(MockBackend::default()),
            token.clone(),
        )
        .await
        .unwrap();
        let g = Fixture {
            _dir: dir,
            config,
            backend: Arc::new(MockBackend::default()),
            token,
            handle,
        };
        open_up(&g);
        let (dra, reg) = (
            g.handle.dra_socket.clone(),
            g.handle.registration_socket.clone(),
        );
        let verdicts = tokio::task::spawn_blocking(move || probe_as(65534, &[&dra, &reg]))
            .await
            .unwrap();
        assert_eq!(verdicts, ["served", "served"], "uid 65534 allowed");
        g.token.cancel();
        g.handle.wait().await.unwrap();
    })
    .await
    .unwrap();
}

/// L6: a flood of idle connections takes at most `max_connections` descriptors
/// per socket; the next one is closed unserved at once, and once the flood goes
/// the kubelet is served again.
#[tokio::test]
async fn a_connection_flood_past_the_cap_is_closed_at_once() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(
            DRIVER,
            &dir.path().join("plugins"),
            &dir.path().join("plugins_registry"),
        );
        config.peers.max_connections = 4;
        let token = CancellationToken::new();
        let handle = serve(
            config.clone(),
            Arc::new(MockBackend::default()),
            token.clone(),
        )
        .await
        .unwrap();
        for socket in [
            handle.dra_socket.clone(),
            handle.registration_socket.clone(),
        ] {
            let mut flood = Vec::new();
            for _ in 0..4 {
                flood.push(std::os::unix::net::UnixStream::connect(&socket).unwrap());
            }
            let s = socket.clone();
            let started = std::time::Instant::now();
            let verdict = tokio::task::spawn_blocking(move || probe(&s))
                .await
                .unwrap();
            assert_eq!(verdict, "closed", "{} past the cap", socket.display());
            assert!(started.elapsed() < Duration::from_secs(2), "closed at once");
            drop(flood);
            // The slots come back as the server sees the flood's ends.
            let s = socket.clone();
            let mut verdict = "";
            for _ in 0..50 {
                let s = s.clone();
                verdict = tokio::task::spawn_blocking(move || probe(&s))
                    .await
                    .unwrap();
                if verdict == "served" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(verdict, "served", "{} after the flood", socket.display());
        }
        let emu = KubeletEmulator::new(&handle.registration_socket);
        let plugin = emu.register().await.unwrap();
        plugin.prepare(&[claim("a")]).await.unwrap();
        token.cancel();
        handle.wait().await.unwrap();
    })
    .await
    .unwrap();
}
