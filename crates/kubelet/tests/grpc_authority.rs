//! The `:authority` problem end to end: a kubelet-style (percent-encoded path) authority is
//! rejected by plain tonic/h2 and accepted through our adapter, across several requests on
//! one connection (dynamic-table references), while ordinary clients keep working.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use vfio_gpu_kubelet::grpc::authority::AuthorityFixStream;
use vfio_gpu_kubelet::grpc::dra::{
    BoxFuture, ClaimRef, DraBackend, PrepareResults, UnprepareResults,
};
use vfio_gpu_kubelet::grpc::emulator::{
    DraDial, DraVersion, EmulatorError, KubeletEmulator, RawGrpcClient, connect_dra,
    kubelet_authority,
};
use vfio_gpu_kubelet::grpc::registration::{
    InfoRequest, RegistrationService, RegistrationState, RegistrationStatus, registration_client,
    registration_server,
};
use vfio_gpu_kubelet::grpc::server::{ServerConfig, ServerHandle, serve};

const LIMIT: Duration = Duration::from_secs(20);
const STEP: Duration = Duration::from_secs(5);

struct NoopBackend;

impl DraBackend for NoopBackend {
    fn prepare(&self, claims: Vec<ClaimRef>) -> BoxFuture<'_, PrepareResults> {
        Box::pin(async move { claims.into_iter().map(|c| (c.uid, Ok(vec![]))).collect() })
    }
    fn unprepare(&self, claims: Vec<ClaimRef>) -> BoxFuture<'_, UnprepareResults> {
        Box::pin(async move { claims.into_iter().map(|c| (c.uid, Ok(()))).collect() })
    }
}

/// Serves only the registration service on `path`, with or without the adapter.
async fn serve_registration(
    path: &Path,
    with_adapter: bool,
    token: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let svc = registration_server::RegistrationServer::new(RegistrationService::new(
        "drv",
        "/x/dra.sock",
    ));
    let router = tonic::transport::Server::builder().add_service(svc);
    let stream = UnixListenerStream::new(listener);
    tokio::spawn(async move {
        if with_adapter {
            let incoming = stream.map(|c| c.map(AuthorityFixStream::new));
            router
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await
                .unwrap();
        } else {
            router
                .serve_with_incoming_shutdown(stream, token.cancelled_owned())
                .await
                .unwrap();
        }
    })
}

/// The plugin's own server (both sockets, behind the adapter) for `drv.example.com`,
/// with a backend that succeeds at everything.
async fn serve_noop(dir: &tempfile::TempDir) -> (ServerHandle, CancellationToken) {
    let config = ServerConfig::new(
        "drv.example.com",
        &dir.path().join("plugins"),
        &dir.path().join("registry"),
    );
    let token = CancellationToken::new();
    let handle = serve(config, Arc::new(NoopBackend), token.clone())
        .await
        .unwrap();
    (handle, token)
}

/// A kubelet-style client (percent-encoded path as `:authority`) gets the plugin's
/// info from the server's registration socket.
async fn kubelet_style_get_info(handle: &ServerHandle) {
    let reg = handle.registration_socket.clone();
    let mut raw = RawGrpcClient::connect(&reg, kubelet_authority(&reg), STEP)
        .await
        .unwrap();
    assert_eq!(raw.get_info().await.unwrap().name, "drv.example.com");
}

fn reg_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("drv-reg.sock")
}

#[tokio::test]
async fn plain_tonic_rejects_kubelet_authority() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let path = reg_path(&dir);
        let token = CancellationToken::new();
        let server = serve_registration(&path, false, token.clone()).await;

        let mut raw = RawGrpcClient::connect(&path, kubelet_authority(&path), STEP)
            .await
            .unwrap();
        let err = raw.get_info().await.unwrap_err();
        // h2 resets the stream with PROTOCOL_ERROR (1); no handler runs.
        assert!(
            matches!(err, EmulatorError::StreamReset { code: 1, .. }),
            "{err}"
        );

        // The same raw client with a valid authority works: the authority is the cause.
        let mut ok = RawGrpcClient::connect(&path, "localhost", STEP)
            .await
            .unwrap();
        assert_eq!(ok.get_info().await.unwrap().name, "drv");
        token.cancel();
        drop((raw, ok));
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn adapter_accepts_kubelet_authority_with_dynamic_table_references() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let path = reg_path(&dir);
        let token = CancellationToken::new();
        let server = serve_registration(&path, true, token.clone()).await;

        let mut raw = RawGrpcClient::connect(&path, kubelet_authority(&path), STEP)
            .await
            .unwrap();
        // After the first request the client sends every header, including :authority,
        // as a dynamic-table reference; each call must still get through.
        for _ in 0..5 {
            let info = raw.get_info().await.unwrap();
            assert_eq!(info.r#type, "DRAPlugin");
            assert_eq!(info.name, "drv");
            assert_eq!(info.endpoint, "/x/dra.sock");
            assert_eq!(
                info.supported_versions,
                vec!["v1.DRAPlugin", "v1beta1.DRAPlugin"]
            );
        }
        raw.notify_registration_status(true, "").await.unwrap();
        raw.get_info().await.unwrap();

        // grpcio-style relative-path authority too.
        let mut rel = RawGrpcClient::connect(&path, "tmp%2Fdrv-reg.sock", STEP)
            .await
            .unwrap();
        rel.get_info().await.unwrap();
        token.cancel();
        drop((raw, rel));
        server.await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn ordinary_tonic_client_works_through_adapter() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (handle, token) = serve_noop(&dir).await;

        let channel = connect_dra(&handle.registration_socket.to_string_lossy())
            .await
            .unwrap();
        let mut client = registration_client::RegistrationClient::new(channel);
        for _ in 0..3 {
            let info = client.get_info(InfoRequest {}).await.unwrap().into_inner();
            assert_eq!(info.name, "drv.example.com");
            assert_eq!(info.endpoint, handle.dra_socket.to_string_lossy());
        }
        // Large metadata exercises a bigger re-encoded block.
        let mut req = tonic::Request::new(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        });
        req.metadata_mut()
            .insert("x-padding", "p".repeat(8000).parse().unwrap());
        client.notify_registration_status(req).await.unwrap();
        let mut status = handle.registration_status();
        status
            .wait_for(|s| *s == RegistrationState::Registered)
            .await
            .unwrap();

        // The raw kubelet-style client works against the real server as well.
        kubelet_style_get_info(&handle).await;
        drop(client);
        token.cancel();
        handle.wait().await.unwrap();
    })
    .await
    .unwrap();
}

/// Kubelets 1.32/1.33 dial the DRA endpoint by its raw path (grpc-go then sends the
/// percent-encoded path as `:authority`), and grpc C-core clients send a relative
/// `tmp%2F…` form: both must reach the DRA service, on v1 and on v1beta1, for several
/// calls on one connection (later calls use dynamic-table references).
#[tokio::test]
async fn dra_socket_accepts_kubelet_and_c_core_authorities_on_v1_and_v1beta1() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (handle, token) = serve_noop(&dir).await;
        let relative = handle.dra_socket.strip_prefix("/").unwrap().to_path_buf();
        let c_core = kubelet_authority(&relative);
        assert!(!c_core.starts_with("%2F"), "{c_core}");
        let claims = [
            ClaimRef {
                uid: "uid-1".into(),
                namespace: "ns".into(),
                name: "a".into(),
            },
            ClaimRef {
                uid: "uid-2".into(),
                namespace: "ns".into(),
                name: "b".into(),
            },
        ];
        for dial in [DraDial::RawPath, DraDial::Authority(c_core.clone())] {
            for version in [DraVersion::V1, DraVersion::V1beta1] {
                let plugin = KubeletEmulator::new(&handle.registration_socket)
                    .with_known_versions(vec![version])
                    .with_dra_dial(dial.clone())
                    .with_timeout(STEP)
                    .register()
                    .await
                    .unwrap();
                assert_eq!(plugin.version, version);
                for _ in 0..3 {
                    let r = plugin
                        .prepare(&claims)
                        .await
                        .unwrap_or_else(|e| panic!("{dial:?} {version:?}: {e}"));
                    assert_eq!(r.len(), 2, "{dial:?} {version:?}");
                    assert!(r.values().all(Result::is_ok), "{r:?}");
                }
                let u = plugin
                    .unprepare(&claims)
                    .await
                    .unwrap_or_else(|e| panic!("{dial:?} {version:?}: {e}"));
                assert!(u.values().all(Result::is_ok), "{u:?}");
            }
        }
        token.cancel();
        handle.wait().await.unwrap();
    })
    .await
    .unwrap();
}

/// Reads until the server closes the connection; `None` if it is still open after `wait`.
async fn closed_within(conn: &mut tokio::net::UnixStream, wait: Duration) -> Option<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(wait, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Any local process that reaches the socket can send a header block that never ends.
/// h2 refuses a CONTINUATION flood itself, but the adapter sits in front of h2 and
/// assembles blocks first: it must refuse the flood as early as h2 would, not buffer
/// it, and the server must go on serving other connections.
#[tokio::test]
async fn a_continuation_flood_is_cut_off_and_the_server_keeps_serving() {
    use tokio::io::AsyncWriteExt;
    use vfio_gpu_kubelet::grpc::authority::{
        PREFACE, TYPE_CONTINUATION, TYPE_HEADERS, TYPE_SETTINGS, put_frame_header,
    };
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (handle, token) = serve_noop(&dir).await;
        for socket in [&handle.registration_socket, &handle.dra_socket] {
            let mut conn = tokio::net::UnixStream::connect(socket).await.unwrap();
            let mut start = PREFACE.to_vec();
            put_frame_header(&mut start, 0, TYPE_SETTINGS, 0, 0);
            put_frame_header(&mut start, 1, TYPE_HEADERS, 0, 1);
            start.push(0x82); // :method GET, and no END_HEADERS
            conn.write_all(&start).await.unwrap();
            // 1000 CONTINUATIONs of 16 KiB: 16 MiB that would all be held in memory.
            let mut continuation = Vec::new();
            put_frame_header(&mut continuation, 16_384, TYPE_CONTINUATION, 0, 1);
            continuation.resize(continuation.len() + 16_384, 0x82);
            let mut sent = 0;
            for _ in 0..1000 {
                if conn.write_all(&continuation).await.is_err() {
                    break;
                }
                sent += 1;
            }
            assert!(
                closed_within(&mut conn, STEP).await.is_some(),
                "{}: still open after {sent} CONTINUATIONs without END_HEADERS",
                socket.display()
            );
        }
        // Other connections are unaffected.
        kubelet_style_get_info(&handle).await;
        token.cancel();
        handle.wait().await.unwrap();
    })
    .await
    .unwrap();
}

/// A request whose headers exceed the server's list size is refused by h2 for that
/// stream only; the adapter forwards the block only up to the limit, and the real h2
/// must still refuse the stream and keep the connection for the next call.
#[tokio::test]
async fn an_over_size_header_list_costs_its_stream_not_the_connection() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (handle, token) = serve_noop(&dir).await;
        let channel = connect_dra(&handle.registration_socket.to_string_lossy())
            .await
            .unwrap();
        let mut client = registration_client::RegistrationClient::new(channel);
        let mut req = tonic::Request::new(InfoRequest {});
        // Four 8 KB fields: the third crosses 16 KiB and is the last one forwarded.
        for name in ["x-pad-a", "x-pad-b", "x-pad-c", "x-pad-d"] {
            req.metadata_mut()
                .insert(name, "p".repeat(8000).parse().unwrap());
        }
        let refused = client.get_info(req).await.unwrap_err();
        assert_ne!(refused.code(), tonic::Code::Ok);
        // The same connection serves the next call.
        let info = client.get_info(InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.name, "drv.example.com");
        drop(client);
        token.cancel();
        handle.wait().await.unwrap();
    })
    .await
    .unwrap();
}
