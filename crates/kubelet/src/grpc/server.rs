//! Serving the DRA socket (v1 + v1beta1) and the registration socket.
//!
//! Order matters: the DRA socket is bound and served before the registration socket
//! exists, because the kubelet dials the endpoint as soon as registration succeeds.
//! Both sockets accept connections through the `:authority` adapter
//! ([`AuthorityFixStream`]).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use super::authority::AuthorityFixStream;
use super::dra::{DraBackend, DraService};
use super::peers::{PeerGate, PeerPolicy, PeerStream};
use super::registration::{RegistrationService, RegistrationState, registration_server};
use crate::health::{HealthConfig, HealthService};

/// Longest usable AF_UNIX socket path (108-byte `sun_path` including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where and as whom to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Driver name (`PluginInfo.name`, `ResourceSlice.spec.driver`).
    pub driver_name: String,
    /// Absolute DRA socket path, normally `<plugins-dir>/<driver>/dra.sock`.
    pub dra_socket: PathBuf,
    /// Registration socket path, normally `<registrar-dir>/<driver>-reg.sock`.
    pub registration_socket: PathBuf,
    /// Delay before re-creating the registration socket after the kubelet rejected us.
    pub registration_retry_backoff: Duration,
    /// How often to check that the registration and DRA socket files are still ours;
    /// each is re-created when someone deleted or replaced it (e.g. `plugins_registry`
    /// wiped, or a node cleanup script).
    pub socket_check_interval: Duration,
    /// Serve and advertise `v1.DRAResourceHealth` and `v1alpha1.DRAResourceHealth` on
    /// the DRA socket from this feed; `None`: neither served nor advertised.
    pub health: Option<HealthConfig>,
    /// On shutdown the registration socket goes at once; the DRA socket keeps
    /// serving this long, so calls the kubelet sends before it has noticed the
    /// deregistration (its plugin manager reconciles every second) still succeed
    /// instead of failing against a closed socket (rolling updates).
    pub dra_linger: Duration,
    /// Which peer uids each socket serves and how many connections it holds at
    /// once (security review L6); the kubelet is root.
    pub peers: PeerPolicy,
}

impl ServerConfig {
    /// Standard layout: `<plugins_dir>/<driver>/dra.sock` and
    /// `<registrar_dir>/<driver>-reg.sock` (e.g. `/var/lib/kubelet/plugins` and
    /// `/var/lib/kubelet/plugins_registry`).
    pub fn new(driver_name: impl Into<String>, plugins_dir: &Path, registrar_dir: &Path) -> Self {
        Self::for_pod(driver_name, plugins_dir, registrar_dir, None)
    }

    /// [`ServerConfig::new`], or with a pod UID (rolling updates) the Go helper's
    /// per-pod names `<plugins_dir>/<driver>/dra-<uid>.sock` and
    /// `<registrar_dir>/<driver>-<uid>-reg.sock`, so two instances of the driver
    /// register side by side (the kubelet, 1.33+, keeps both and calls the newest
    /// connected one). The UID must pass [`validate_pod_uid`].
    pub fn for_pod(
        driver_name: impl Into<String>,
        plugins_dir: &Path,
        registrar_dir: &Path,
        pod_uid: Option<&str>,
    ) -> Self {
        let driver_name = driver_name.into();
        let part = pod_uid.map(|u| format!("-{u}")).unwrap_or_default();
        Self {
            dra_socket: plugins_dir
                .join(&driver_name)
                .join(format!("dra{part}.sock")),
            registration_socket: registrar_dir.join(format!("{driver_name}{part}-reg.sock")),
            driver_name,
            registration_retry_backoff: Duration::from_secs(5),
            socket_check_interval: Duration::from_secs(5),
            health: None,
            dra_linger: Duration::ZERO,
            peers: PeerPolicy::default(),
        }
    }
}

/// Checks a pod UID before it becomes part of socket file names: 1 to 63
/// lower-case letters, digits and '-' (a Kubernetes UID is a 36-character UUID).
pub fn validate_pod_uid(uid: &str) -> Result<(), ServerError> {
    let ok = !uid.is_empty()
        && uid.len() <= 63
        && uid
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ServerError::Config(format!(
            "pod UID {uid:?} is not 1-63 lower-case letters, digits and '-'"
        )))
    }
}

/// Errors of [`serve`], naming the failing step and path.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Configuration cannot work.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// A filesystem step on a socket path failed.
    #[error("{step} {path}: {source}")]
    Fs {
        /// What we were doing.
        step: &'static str,
        /// The socket path (or its directory) the step acted on.
        path: PathBuf,
        /// The operating system's error for that step.
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("serving {what} on {path}: {source}")]
    Serve {
        /// Which service it was (`registration`, `DRA`, `health`).
        what: &'static str,
        /// The Unix socket the service listened on.
        path: PathBuf,
        /// tonic's transport error that ended the server.
        source: tonic::transport::Error,
    },
    /// A server task panicked or was aborted.
    #[error("{what} server task failed: {source}")]
    Join {
        /// Which service it was (`registration`, `DRA`, `health`).
        what: &'static str,
        /// The panic or abort that ended the task.
        source: tokio::task::JoinError,
    },
}

/// Identity of a socket file we created, so we never delete another instance's socket.
/// Inode numbers are reused immediately after a delete, so the change time (nanosecond
/// resolution, set by our chmod) is part of the identity too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketId {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl SocketId {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }
}

/// A bound socket file that is removed on drop if it is still ours.
struct OwnedSocket {
    path: PathBuf,
    id: Option<SocketId>,
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        remove_if_ours(&self.path, self.id);
    }
}

fn remove_if_ours(path: &Path, id: Option<SocketId>) {
    let Some(id) = id else { return };
    match std::fs::symlink_metadata(path) {
        Ok(m) if SocketId::of(&m) == id => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "removing our socket");
            } else {
                tracing::debug!(path = %path.display(), "removed our socket");
            }
        }
        Ok(_) => {
            tracing::info!(path = %path.display(), "socket was replaced by another instance; leaving it");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "inspecting our socket"),
    }
}

/// Whether `s` is a Kubernetes UID (a UUID: 8-4-4-4-12 lower-case hex digits).
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| {
            g.len() == n
                && g.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        })
}

/// The names another instance of this driver would have used next to ours: the plain
/// name and the per-pod names of [`ServerConfig::for_pod`] with any pod UID.
fn is_sibling_socket(name: &str, plain: &str, prefix: &str, suffix: &str) -> bool {
    name == plain
        || name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
            .is_some_and(is_uuid)
}

/// Nobody listens on `path`: connecting is refused, twice, 100 ms apart (a listener
/// binds and listens in one step, so a live instance never refuses twice).
async fn nobody_listens(path: &Path) -> bool {
    for attempt in 0..2 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let dial = tokio::net::UnixStream::connect(path);
        match tokio::time::timeout(Duration::from_secs(1), dial).await {
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            _ => return false,
        }
    }
    true
}

/// Removes the sockets a killed instance of this driver left beside ours (a SIGKILLed
/// or OOM-killed pod of a rolling update cannot clean up): the kubelet would keep
/// dialling a registration socket nobody serves. Only this driver's names are
/// considered, only sockets, and only those nobody listens on; a live old instance
/// (still draining) keeps its sockets. Returns what was removed.
pub async fn remove_stale_sockets(config: &ServerConfig) -> Vec<PathBuf> {
    let driver = &config.driver_name;
    let places = [
        (
            &config.registration_socket,
            format!("{driver}-reg.sock"),
            format!("{driver}-"),
            "-reg.sock",
        ),
        (
            &config.dra_socket,
            "dra.sock".to_string(),
            "dra-".to_string(),
            ".sock",
        ),
    ];
    let mut removed = Vec::new();
    for (ours, plain, prefix, suffix) in places {
        let Some(dir) = ours.parent() else { continue };
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if path == *ours || !is_sibling_socket(name, &plain, &prefix, suffix) {
                continue;
            }
            let is_socket =
                std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
            if !is_socket || !nobody_listens(&path).await {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a socket another instance left behind");
                    removed.push(path);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "removing a stale socket")
                }
            }
        }
    }
    removed
}

/// Creates the parent directory, removes a stale socket, binds and restricts to 0600.
fn bind_socket(path: &Path) -> Result<(UnixListener, OwnedSocket), ServerError> {
    let fs_err = |step, source| ServerError::Fs {
        step,
        path: path.to_path_buf(),
        source,
    };
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ServerError::Config(format!(
            "socket path {} is longer than {MAX_SOCKET_PATH} bytes",
            path.display()
        )));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ServerError::Fs {
            step: "creating socket directory",
            path: parent.to_path_buf(),
            source: e,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            tracing::info!(path = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(|e| fs_err("removing stale socket", e))?;
        }
        Ok(_) => {
            // Refuse to delete something that is not a socket: likely a misconfiguration.
            return Err(fs_err(
                "refusing to replace non-socket file",
                io::Error::from(io::ErrorKind::AlreadyExists),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fs_err("inspecting socket path", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| fs_err("binding socket", e))?;
    // Guard first, so the file is cleaned up even if chmod fails. Until the identity is
    // recorded below, the guard removes nothing.
    let mut owned = OwnedSocket {
        path: path.to_path_buf(),
        id: None,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|e| fs_err("inspecting new socket", e))?;
    owned.id = Some(SocketId::of(&meta));
    // Only root (the kubelet) may talk to the plugin.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fs_err("chmod 0600 socket", e))?;
    // chmod changed ctime: record the final identity.
    let meta = std::fs::symlink_metadata(path).map_err(|e| fs_err("inspecting new socket", e))?;
    owned.id = Some(SocketId::of(&meta));
    Ok((listener, owned))
}

/// A running plugin server.
pub struct ServerHandle {
    /// Absolute DRA socket path (the `PluginInfo.endpoint`).
    pub dra_socket: PathBuf,
    /// Registration socket path.
    pub registration_socket: PathBuf,
    status: watch::Receiver<RegistrationState>,
    dra_task: JoinHandle<Result<(), ServerError>>,
    registration_task: JoinHandle<Result<(), ServerError>>,
}

impl ServerHandle {
    /// Observes what the kubelet reports through `NotifyRegistrationStatus`.
    pub fn registration_status(&self) -> watch::Receiver<RegistrationState> {
        self.status.clone()
    }

    /// Waits until both servers have stopped (after the shutdown token is cancelled or a
    /// server failed) and their sockets are removed; returns the first error.
    pub async fn wait(self) -> Result<(), ServerError> {
        let dra = self.dra_task.await;
        let reg = self.registration_task.await;
        dra.map_err(|source| ServerError::Join {
            what: "DRA",
            source,
        })??;
        reg.map_err(|source| ServerError::Join {
            what: "registration",
            source,
        })??;
        Ok(())
    }
}

/// A tonic server whose h2 limits are the ones [`AuthorityFixStream`] enforces in front
/// of it (frame size, header list size): the adapter refuses a CONTINUATION flood or an
/// HPACK bomb before buffering it, which is only safe while h2 would refuse it too.
fn adapted_server() -> Server {
    use super::authority::{MAX_FRAME_PAYLOAD, MAX_HEADER_LIST_SIZE};
    Server::builder()
        .max_frame_size(MAX_FRAME_PAYLOAD as u32)
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE as u32)
}

/// Starts serving `backend` on the DRA socket and then the registration socket.
///
/// Returns once both sockets are bound. The servers run until `shutdown` is cancelled; if
/// one fails, the other is stopped too. Sockets are removed on the way out (only if they
/// are still ours). When the kubelet reports a failed registration, the registration
/// socket is re-created after `registration_retry_backoff` so the kubelet tries again;
/// when the socket file is deleted or replaced by someone else, it is re-created within
/// `socket_check_interval`.
pub async fn serve(
    config: ServerConfig,
    backend: Arc<dyn DraBackend>,
    shutdown: CancellationToken,
) -> Result<ServerHandle, ServerError> {
    if config.driver_name.is_empty() {
        return Err(ServerError::Config("empty driver name".into()));
    }
    if !config.dra_socket.is_absolute() {
        return Err(ServerError::Config(format!(
            "DRA socket path {} must be absolute (it is sent to the kubelet as the endpoint)",
            config.dra_socket.display()
        )));
    }
    // A failure in either server stops both; a shutdown stops the DRA server
    // `dra_linger` after the registration server.
    let stop = shutdown.child_token();
    let dra_stop = CancellationToken::new();
    {
        let (stop, dra_stop, linger) = (stop.clone(), dra_stop.clone(), config.dra_linger);
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => tokio::time::sleep(linger).await,
                _ = dra_stop.cancelled() => {}
            }
            dra_stop.cancel();
        });
    }

    remove_stale_sockets(&config).await;
    let (dra_listener, dra_owned) = bind_socket(&config.dra_socket)?;
    tracing::info!(path = %config.dra_socket.display(), health = config.health.is_some(), "serving DRA v1 and v1beta1");
    let service = Arc::new(DraService::new(backend));
    let health = config
        .health
        .clone()
        .map(|h| HealthService::new(h.feed, h.pool, h.resend));
    let health_v1 = health.clone().map(HealthService::server_v1);
    let health_v1alpha1 = health.map(HealthService::server);
    let dra_router = adapted_server()
        .add_service(service.v1_server())
        .add_service(service.v1beta1_server())
        .add_optional_service(health_v1alpha1)
        .add_optional_service(health_v1);
    let (dra_stop, both_stop) = (dra_stop.clone(), stop.clone());
    let dra_path = config.dra_socket.clone();
    let check_interval = config.socket_check_interval;
    let dra_peers = config.peers.clone();
    let dra_task = tokio::spawn(async move {
        // One server for the whole run; the acceptor feeds it connections from
        // whichever socket file is current, so a re-created socket needs no restart
        // (a restart would wait for the kubelet's open health stream to end).
        let (conns, accepted) = tokio::sync::mpsc::channel(16);
        let acceptor = tokio::spawn(dra_acceptor(
            (dra_listener, dra_owned),
            PeerGate::new(dra_peers),
            check_interval,
            conns,
            dra_stop.clone(),
            both_stop.clone(),
        ));
        // The adapter here too: kubelets 1.32/1.33 (and the 1.34+ re-dial after a
        // shutdown) dial the raw path, so grpc-go sends it percent-encoded as
        // `:authority`, which h2 would answer with RST_STREAM.
        let incoming = tokio_stream::wrappers::ReceiverStream::new(accepted)
            .map(|conn: io::Result<PeerStream>| conn.map(AuthorityFixStream::new));
        let served = dra_router
            .serve_with_incoming_shutdown(incoming, dra_stop.clone().cancelled_owned())
            .await
            .map_err(|source| ServerError::Serve {
                what: "DRA",
                path: dra_path,
                source,
            });
        dra_stop.cancel();
        let acceptor = acceptor.await.map_err(|source| ServerError::Join {
            what: "DRA socket acceptor",
            source,
        });
        let result = served.and(acceptor.and_then(|r| r));
        if result.is_err() {
            both_stop.cancel();
            dra_stop.cancel();
        }
        result
    });

    let mut registration = RegistrationService::new(
        config.driver_name.clone(),
        config.dra_socket.to_string_lossy().into_owned(),
    );
    if config.health.is_some() {
        registration = registration.with_health();
    }
    let registration = Arc::new(registration);
    let status = registration.subscribe();
    // Bind the first registration socket here so bind errors reach the caller directly.
    let first = match bind_socket(&config.registration_socket) {
        Ok(b) => b,
        Err(e) => {
            stop.cancel();
            // The registration error `e` is the one to report; the stopped
            // DRA task's own result (cancelled) adds nothing.
            let _ = dra_task.await;
            return Err(e);
        }
    };
    tracing::info!(path = %config.registration_socket.display(), driver = %config.driver_name, "serving plugin registration");
    let registration_task = tokio::spawn(registration_loop(
        config.clone(),
        registration,
        first,
        stop.clone(),
    ));

    Ok(ServerHandle {
        dra_socket: config.dra_socket,
        registration_socket: config.registration_socket,
        status,
        dra_task,
        registration_task,
    })
}

/// Accepts connections on the DRA socket for the DRA server (through `conns`) until
/// `dra_stop`. When the socket file is deleted or replaced, binds it again: the
/// kubelet re-dials the path it registered, and connections already accepted go on.
/// A failed re-bind stops both servers (`both_stop`), so the pod restarts instead of
/// running with a DRA socket nobody can reach. Removes the socket on the way out
/// if it is still ours.
async fn dra_acceptor(
    first: (UnixListener, OwnedSocket),
    gate: PeerGate,
    interval: Duration,
    conns: tokio::sync::mpsc::Sender<io::Result<PeerStream>>,
    dra_stop: CancellationToken,
    both_stop: CancellationToken,
) -> Result<(), ServerError> {
    let path = first.1.path.clone();
    let mut bound = Some(first);
    loop {
        let (listener, owned) = match bound.take() {
            Some(b) => b,
            None => match bind_socket(&path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot re-create the DRA socket; stopping");
                    both_stop.cancel();
                    dra_stop.cancel();
                    return Err(e);
                }
            },
        };
        let lost = CancellationToken::new();
        let socket_watch = tokio::spawn(watch_socket(
            owned.path.clone(),
            owned.id,
            interval,
            lost.clone(),
        ));
        let rebind = loop {
            tokio::select! {
                _ = dra_stop.cancelled() => break false,
                _ = lost.cancelled() => break true,
                accepted = listener.accept() => {
                    let conn = match accepted {
                        Ok((conn, _)) => match gate.admit(conn) {
                            Ok(conn) => Ok(conn),
                            Err(refusal) => {
                                tracing::warn!(socket = %path.display(), %refusal, "connection closed unserved");
                                continue;
                            }
                        },
                        Err(e) => Err(e),
                    };
                    if conns.send(conn).await.is_err() {
                        break false; // the server is gone
                    }
                }
            }
        };
        socket_watch.abort();
        drop(listener);
        drop(owned);
        if !rebind {
            return Ok(());
        }
        tracing::warn!(path = %path.display(), "DRA socket was deleted or replaced; re-creating it");
    }
}

/// Dials both sockets as the kubelet uses them, each within `timeout`: `GetInfo` on
/// the registration socket and an empty `NodePrepareResources` (v1) on the DRA
/// socket. `Err` says which socket did not answer (for `/healthz`).
pub async fn probe_sockets(
    registration: &Path,
    dra: &Path,
    timeout: Duration,
) -> Result<(), String> {
    use super::registration::{InfoRequest, registration_client::RegistrationClient};
    use super::v1::{NodePrepareResourcesRequest, dra_plugin_client::DraPluginClient};
    let reg_call = async {
        let channel = unix_channel(registration).await?;
        RegistrationClient::new(channel)
            .get_info(InfoRequest {})
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let dra_call = async {
        let channel = unix_channel(dra).await?;
        DraPluginClient::new(channel)
            .node_prepare_resources(NodePrepareResourcesRequest { claims: Vec::new() })
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let within = |what: &'static str, path: &Path, r: Result<Result<(), String>, _>| match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "{what} socket {} does not answer: {e}",
            path.display()
        )),
        Err(_) => Err(format!(
            "{what} socket {} did not answer within {timeout:?}",
            path.display()
        )),
    };
    let (r, d) = tokio::join!(
        tokio::time::timeout(timeout, reg_call),
        tokio::time::timeout(timeout, dra_call)
    );
    let errors: Vec<String> = [
        within("registration", registration, r),
        within("DRA", dra, d),
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// A tonic channel over the Unix socket `path` (the URI is a placeholder).
async fn unix_channel(path: &Path) -> Result<tonic::transport::Channel, String> {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .map_err(|e| format!("connecting: {e}"))
}

/// Serves the registration socket; when the kubelet reports failure, tears the socket
/// down and re-creates it after the backoff so the kubelet's watcher registers us anew.
async fn registration_loop(
    config: ServerConfig,
    service: Arc<RegistrationService>,
    first: (UnixListener, OwnedSocket),
    stop: CancellationToken,
) -> Result<(), ServerError> {
    let mut bound = Some(first);
    let mut status = service.subscribe();
    // One gate for the socket's whole life: connections from before a re-bind
    // still count.
    let reg_gate = PeerGate::new(config.peers.clone());
    loop {
        let (listener, owned) = match bound.take() {
            Some(b) => b,
            None => match bind_socket(&config.registration_socket) {
                Ok(b) => b,
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            },
        };
        // Only failures reported from now on should trigger another round.
        status.borrow_and_update();
        let rejected = CancellationToken::new();
        let watcher = {
            let rejected = rejected.clone();
            let mut status = status.clone();
            tokio::spawn(async move {
                while status.changed().await.is_ok() {
                    if matches!(*status.borrow_and_update(), RegistrationState::Failed(_)) {
                        rejected.cancel();
                        return;
                    }
                }
            })
        };
        // The kubelet only learns about us through this file: if it is deleted or
        // replaced, nothing else re-creates it.
        let lost = CancellationToken::new();
        let socket_watch = tokio::spawn(watch_socket(
            owned.path.clone(),
            owned.id,
            config.socket_check_interval,
            lost.clone(),
        ));
        // Every accepted connection goes through the :authority adapter (kubelet dials
        // this socket with a percent-encoded path as authority).
        let gate = reg_gate.clone();
        let reg_path = owned.path.clone();
        let incoming = UnixListenerStream::new(listener).filter_map(move |conn| match conn {
            Ok(conn) => match gate.admit(conn) {
                Ok(conn) => Some(Ok(AuthorityFixStream::new(conn))),
                Err(refusal) => {
                    tracing::warn!(socket = %reg_path.display(), %refusal, "connection closed unserved");
                    None
                }
            },
            Err(e) => Some(Err(e)),
        });
        let signal = {
            let stop = stop.clone();
            let rejected = rejected.clone();
            let lost = lost.clone();
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = rejected.cancelled() => {}
                    _ = lost.cancelled() => {}
                }
            }
        };
        let result = adapted_server()
            .add_service(registration_server::RegistrationServer::from_arc(
                Arc::clone(&service),
            ))
            .serve_with_incoming_shutdown(incoming, signal)
            .await;
        watcher.abort();
        socket_watch.abort();
        // Removing the socket makes the kubelet forget this registration attempt
        // (a no-op when the file is no longer ours).
        drop(owned);
        if let Err(source) = result {
            stop.cancel();
            return Err(ServerError::Serve {
                what: "registration",
                path: config.registration_socket.clone(),
                source,
            });
        }
        if stop.is_cancelled() {
            return Ok(());
        }
        if lost.is_cancelled() && !rejected.is_cancelled() {
            tracing::warn!(
                path = %config.registration_socket.display(),
                "registration socket was deleted or replaced; re-creating it"
            );
            continue;
        }
        tracing::warn!(
            backoff = ?config.registration_retry_backoff,
            path = %config.registration_socket.display(),
            "kubelet rejected registration; re-creating the registration socket after backoff"
        );
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(config.registration_retry_backoff) => {}
        }
    }
}

/// Cancels `lost` once `path` no longer is the socket `id` we bound (deleted, or
/// replaced by another file); checks every `interval`.
async fn watch_socket(
    path: PathBuf,
    id: Option<SocketId>,
    interval: Duration,
    lost: CancellationToken,
) {
    let Some(id) = id else { return };
    loop {
        tokio::time::sleep(interval).await;
        let ours = match std::fs::symlink_metadata(&path) {
            Ok(m) => SocketId::of(&m) == id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                // Cannot tell: keep serving rather than fight over the path.
                tracing::debug!(path = %path.display(), error = %e, "checking the registration socket");
                true
            }
        };
        if !ours {
            lost.cancel();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_pod_socket_names_follow_the_go_helper() {
        let (plugins, registry) = (Path::new("/p"), Path::new("/r"));
        let single = ServerConfig::new("gpu.example.com", plugins, registry);
        assert_eq!(single.dra_socket, Path::new("/p/gpu.example.com/dra.sock"));
        assert_eq!(
            single.registration_socket,
            Path::new("/r/gpu.example.com-reg.sock")
        );
        let pod = ServerConfig::for_pod("gpu.example.com", plugins, registry, Some("u-1"));
        assert_eq!(pod.dra_socket, Path::new("/p/gpu.example.com/dra-u-1.sock"));
        assert_eq!(
            pod.registration_socket,
            Path::new("/r/gpu.example.com-u-1-reg.sock")
        );
        validate_pod_uid("0f6c2a1e-7f41-4c5e-9b1a-2d3c4e5f6a7b").unwrap();
        for bad in ["", "../x", "A", "a/b", &"a".repeat(64)] {
            assert!(validate_pod_uid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_this_driver_s_socket_names_are_siblings() {
        let uid = "0f6c2a1e-7f41-4c5e-9b1a-2d3c4e5f6a7b";
        let reg = |name: &str| is_sibling_socket(name, "a.com-reg.sock", "a.com-", "-reg.sock");
        assert!(reg("a.com-reg.sock"));
        assert!(reg(&format!("a.com-{uid}-reg.sock")));
        // Another driver whose name extends ours, upper case, a partial UID.
        assert!(!reg("a.com-x.org-reg.sock"));
        assert!(!reg(&format!("a.com-{}-reg.sock", uid.to_uppercase())));
        assert!(!reg("a.com-0f6c2a1e-reg.sock"));
        assert!(!reg(&format!("b.com-{uid}-reg.sock")));
        let dra = |name: &str| is_sibling_socket(name, "dra.sock", "dra-", ".sock");
        assert!(dra("dra.sock") && dra(&format!("dra-{uid}.sock")));
        assert!(!dra("dra-x.sock") && !dra("metrics.sock"));
    }
}
