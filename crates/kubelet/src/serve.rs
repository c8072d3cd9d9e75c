//! `vfio-gpu-dra serve`: the node plugin's main loop.
//!
//! Order: log the node checks `doctor` prints ([`log_node_checks`]), open the engine
//! (state lock, ledger), reconcile the host against the ledger,
//! build the Kubernetes client, then open the sockets (so the kubelet never reaches a
//! plugin whose host state is still half-done), start the ResourceSlice publisher, and
//! run periodic reconcile and cleanup of stale claims, each in its own task so the
//! liveness heartbeat never waits for them, until the shutdown token fires.
//!
//! Rolling updates ([`ServeOptions::pod_uid`]): two instances on one node, as a
//! DaemonSet with `maxSurge` runs them, following the Go helper's `RollingUpdate`.
//! Each registers under per-pod socket names; the kubelet keeps both and calls the
//! newest connected one, either may get any call. The engine then takes the state
//! lock per operation and re-reads the ledger another instance wrote, so every call
//! works on the ledger as it is on disk and the two never write it at once. One
//! instance at a time publishes ResourceSlices (the holder of `publisher.lock`);
//! the other stands by and takes over when the lock is free. On shutdown the
//! registration socket goes first (the kubelet turns to the other instance),
//! calls in flight and claim work handed to the background are finished, and
//! slices are left in place for the instance that stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
pub use tokio_util::sync::CancellationToken;
use vfio_gpu_engine::admin_socket::AdminSocket;
use vfio_gpu_engine::kernel::Kernel;
use vfio_gpu_engine::lock::{LockError, StateLock};
use vfio_gpu_engine::{Engine, EngineConfig, StateLockMode};
use vfio_gpu_host::{GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;
use vfio_gpu_node::Check;

use crate::grpc::registration::RegistrationState;
use crate::grpc::server::{ServerConfig, serve as serve_grpc, validate_pod_uid};
use crate::health::{DEFAULT_RESEND, HealthConfig, HealthMonitor};
use crate::metrics::Metrics;
use crate::plugin::{PluginConfig, VfioPlugin};
use crate::slices::{PublisherContext, start_publisher};

/// Where the Kubernetes client comes from.
#[derive(Clone)]
pub enum KubeSource {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, mounted token).
    InCluster,
    /// A kubeconfig file.
    Kubeconfig(PathBuf),
    /// A ready client (tests, demos).
    Client(kube::Client),
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KubeSource::InCluster => f.write_str("InCluster"),
            KubeSource::Kubeconfig(p) => write!(f, "Kubeconfig({})", p.display()),
            KubeSource::Client(_) => f.write_str("Client(..)"),
        }
    }
}

/// Everything `serve` needs.
pub struct ServeOptions {
    /// Node name (`NODE_NAME`); also this node's pool name.
    pub node_name: String,
    /// Driver name, e.g. `vfio-gpu.dra.dev`.
    pub driver_name: String,
    /// The kernel edge (sysfs, or the simulated kernel for the demo).
    pub kernel: Arc<dyn Kernel>,
    /// Which PCI functions are GPUs.
    pub selector: GpuSelector,
    /// Admin policy.
    pub policy: Policy,
    /// Engine state directory; default `<plugins_dir>/<driver>`.
    pub state_dir: Option<PathBuf>,
    /// Kubelet plugins directory (`/var/lib/kubelet/plugins`).
    pub plugins_dir: PathBuf,
    /// Kubelet registration directory (`/var/lib/kubelet/plugins_registry`).
    pub registrar_dir: PathBuf,
    /// CDI spec directory (`/var/run/cdi`).
    pub cdi_root: PathBuf,
    /// Kubernetes client source.
    pub kube: KubeSource,
    /// Engine deadlines etc.
    pub engine_config: EngineConfig,
    /// How often to reconcile the host against the ledger.
    pub reconcile_interval: Duration,
    /// How often to release stale claims whose ResourceClaim is gone or replaced:
    /// half-prepared ones at once, completed ones after two cleanups in a row found
    /// no process on their vfio devices ([`VfioPlugin::cleanup_stale_claims`]).
    pub cleanup_interval: Duration,
    /// Each kubelet call answers within this (below the kubelet's 45 s timeout);
    /// slower claims get a retryable "still in progress" while the work goes on.
    pub call_budget: Duration,
    /// Publish this node's GPUs as ResourceSlices (off: publish nothing).
    pub publish_slices: bool,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (HTTP), bound by the
    /// caller so a bad address fails early; `None`: not served.
    pub metrics_listener: Option<std::net::TcpListener>,
    /// The metrics the plugin records into (recorded even when not served).
    pub metrics: Arc<Metrics>,
    /// How often the serve loop ticks (the liveness heartbeat).
    pub heartbeat_interval: Duration,
    /// How often the devices are re-scanned for the device gauges and health; a
    /// prepare or unprepare triggers a scan too.
    pub device_scan_interval: Duration,
    /// Also mount device metadata where KubeVirt 1.8.0–1.8.2 read it.
    pub legacy_kubevirt_metadata: bool,
    /// This pod's UID (downward API `metadata.uid`): turns on rolling updates
    /// (see the module docs). `None`: a single instance per node, fixed socket
    /// names, the state lock held for the whole run.
    pub pod_uid: Option<String>,
    /// With a pod UID, how often a standby instance checks whether it may
    /// publish ResourceSlices.
    pub standby_poll: Duration,
    /// On shutdown, how long to wait for claim work still running in the background.
    pub drain_timeout: Duration,
    /// Which peer uids the registration and DRA sockets serve, and how many
    /// connections each holds at once (security review L6).
    pub socket_peers: crate::grpc::peers::PeerPolicy,
    /// Whether GPUs the admin keeps on vfio are published (security review L3).
    pub admin_owned: crate::slices::AdminOwned,
    /// The effect of an unhealthy GPU's taint while a VM holds it and the
    /// fault makes the GPU unusable: `NoSchedule` (default) or `NoExecute`
    /// (the taint eviction controller evicts the pod).
    pub unhealthy_taint_effect: crate::slices::TaintEffect,
}

/// The lock file in the state directory held by the instance that publishes
/// ResourceSlices (rolling updates).
pub const PUBLISHER_LOCK: &str = "publisher.lock";

impl ServeOptions {
    /// Defaults for a real node: kubelet paths, `/var/run/cdi`, in-cluster client,
    /// reconcile every 60 s, cleanup every 5 min, ResourceSlices published.
    pub fn new(
        node_name: impl Into<String>,
        driver_name: impl Into<String>,
        kernel: Arc<dyn Kernel>,
    ) -> Self {
        Self {
            node_name: node_name.into(),
            driver_name: driver_name.into(),
            kernel,
            selector: GpuSelector::default(),
            policy: Policy::default(),
            state_dir: None,
            plugins_dir: PathBuf::from("/var/lib/kubelet/plugins"),
            registrar_dir: PathBuf::from("/var/lib/kubelet/plugins_registry"),
            cdi_root: PathBuf::from("/var/run/cdi"),
            kube: KubeSource::InCluster,
            engine_config: EngineConfig::default(),
            reconcile_interval: Duration::from_secs(60),
            cleanup_interval: Duration::from_secs(300),
            call_budget: Duration::from_secs(40),
            publish_slices: true,
            metrics_listener: None,
            metrics: Metrics::new(),
            heartbeat_interval: Duration::from_secs(10),
            device_scan_interval: Duration::from_secs(30),
            legacy_kubevirt_metadata: false,
            pod_uid: None,
            standby_poll: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(20),
            socket_peers: crate::grpc::peers::PeerPolicy::default(),
            admin_owned: crate::slices::AdminOwned::Offer,
            unhealthy_taint_effect: crate::slices::TaintEffect::NoSchedule,
        }
    }

    /// The plugin data directory, `<plugins_dir>/<driver>`.
    pub fn data_dir(&self) -> PathBuf {
        self.plugins_dir.join(&self.driver_name)
    }
}

/// Longest driver name: the API validates `spec.driver` as a CSI driver name.
pub const MAX_DRIVER_NAME: usize = 63;

/// Why a driver name is refused.
#[derive(Debug, thiserror::Error)]
#[error("driver name {name:?} is invalid: {reason}")]
pub struct InvalidDriverName {
    /// The name.
    pub name: String,
    /// Which rule it breaks.
    pub reason: &'static str,
}

/// Checks a driver name against the rules of everything that carries it: the API's
/// CSI driver-name rule for `ResourceSlice.spec.driver` (a DNS-1123 subdomain of at
/// most 63 bytes), the CDI vendor rule for CDI kinds (starts with a letter), and
/// lower case, as it also names sockets and state files.
pub fn validate_driver_name(name: &str) -> Result<(), InvalidDriverName> {
    let fail = |reason| {
        Err(InvalidDriverName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > MAX_DRIVER_NAME {
        return fail("longer than 63 bytes (Kubernetes CSI driver-name rule)");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return fail("it must start with a lower-case letter (CDI vendor rule)");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !name.split('.').all(label_ok) {
        return fail(
            "not a DNS subdomain: dot-separated labels of lower-case letters, digits and '-', each starting and ending with a letter or digit",
        );
    }
    Ok(())
}

/// Installs rustls' ring provider as the process default, which kube's TLS needs when
/// more than one provider is compiled in. Idempotent.
pub fn install_crypto_provider() {
    // Err means a provider is already installed: fine either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds a client from the configured source.
pub async fn kube_client(source: &KubeSource) -> anyhow::Result<kube::Client> {
    install_crypto_provider();
    match source {
        KubeSource::Client(c) => Ok(c.clone()),
        KubeSource::Kubeconfig(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?;
            kube::Client::try_from(config).context("building the Kubernetes client")
        }
        KubeSource::InCluster => {
            let config = kube::Config::incluster()
                .context("loading the in-cluster Kubernetes configuration")?;
            kube::Client::try_from(config).context("building the Kubernetes client")
        }
    }
}

async fn reconcile(engine: &Arc<Engine>, metrics: &Metrics) -> anyhow::Result<()> {
    let e = Arc::clone(engine);
    let results = tokio::task::spawn_blocking(move || e.reconcile())
        .await
        .context("reconcile task")?
        .inspect_err(|e| metrics.record_error(e))
        .context("reconcile")?;
    metrics.record_reconcile(&results);
    crate::fabric::reconcile(engine).await;
    for r in results {
        match r {
            Ok(o) => {
                tracing::info!(gpu = %o.bdf, action = ?o.action, detail = %o.detail, "reconcile")
            }
            Err((bdf, e)) => tracing::warn!(gpu = %bdf, error = %e, "reconcile failed"),
        }
    }
    Ok(())
}

/// Runs `doctor`'s checks (`vfio_gpu_node`, one truth for both) and logs every
/// failure and warning with its fix. Read-only and without the state lock; a
/// node that cannot be read is logged, never fatal (each prepare still checks its
/// GPU). Returns the checks run.
pub fn log_node_checks(
    root: &HostRoot,
    selector: &GpuSelector,
    policy: &Policy,
    policy_path: &Path,
    state_dir: &Path,
) -> Vec<Check> {
    let checks = vfio_gpu_engine::inspect(root, selector, policy, Some(state_dir))
        .map_err(|e| e.to_string())
        .and_then(|view| {
            vfio_gpu_node::check_node(root, &view, policy, policy_path).map_err(|e| e.to_string())
        });
    match checks {
        Ok(checks) => {
            vfio_gpu_node::log_problems(&checks);
            checks
        }
        Err(e) => {
            tracing::warn!(error = %e, "node checks could not read the host; run `vfio-gpu-dra doctor`");
            Vec::new()
        }
    }
}

/// Runs the node plugin until `shutdown` is cancelled (or a server fails).
pub async fn serve(mut opts: ServeOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The name reaches the API, CDI and file names: refuse a bad one before anything
    // is created.
    validate_driver_name(&opts.driver_name)?;
    if let Some(uid) = &opts.pod_uid {
        validate_pod_uid(uid)?;
    }
    // Before anything opens files: GPU moves and their rollbacks need descriptors.
    match crate::metrics::raise_fd_limit() {
        Ok((old, new)) if old != new => {
            tracing::info!(
                old,
                new,
                "raised the soft open-file limit to the hard limit"
            );
        }
        Ok((old, _)) => tracing::info!(limit = old, "open-file limit already at the hard limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let metrics = Arc::clone(&opts.metrics);
    // First, so the probes answer while the engine opens and reconciles.
    let metrics_stop = CancellationToken::new();
    let metrics_task = match opts.metrics_listener.take() {
        Some(l) => {
            let listener = crate::metrics::tokio_listener(l)?;
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
            }
            Some(tokio::spawn(crate::metrics::serve_http(
                listener,
                Arc::clone(&metrics),
                metrics_stop.clone(),
            )))
        }
        None => None,
    };
    let result = serve_plugin(opts, shutdown, Arc::clone(&metrics)).await;
    metrics.set_registered(false);
    metrics_stop.cancel();
    if let Some(t) = metrics_task
        && let Err(e) = t.await
    {
        tracing::warn!(error = %e, "metrics endpoint task failed");
    }
    result
}

/// [`log_node_checks`] for `opts`, on a blocking thread (it reads sysfs).
fn check_node_at_start(
    opts: &ServeOptions,
    state_dir: &Path,
) -> tokio::task::JoinHandle<Vec<Check>> {
    let root = opts.kernel.root().clone();
    let (selector, policy) = (opts.selector.clone(), opts.policy.clone());
    let policy_path = opts
        .engine_config
        .policy_file
        .clone()
        .unwrap_or_else(|| root.rel("etc/vfio-gpu-dra/policy.toml"));
    let dir = state_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        log_node_checks(&root, &selector, &policy, &policy_path, &dir)
    })
}

/// What opening the engine found in the ledger, in the log.
fn log_open_report(report: &vfio_gpu_engine::OpenReport) {
    if let Some(p) = &report.ledger_problem {
        tracing::warn!(reason = %p.reason, moved_to = ?p.moved_to, "ledger not trusted; rebuilt from the host");
    }
    for r in &report.earlier_boot_records {
        tracing::info!(record = %r, "dropped a ledger record from an earlier boot");
    }
    if let Some(a) = &report.adopted_from_mirror {
        tracing::warn!(detail = %a, "state directory was empty; records taken from the boot mirror");
    }
}

/// The plugin's settings from `serve`'s options.
fn plugin_config(opts: &ServeOptions, data_dir: PathBuf, metrics: &Arc<Metrics>) -> PluginConfig {
    let mut c = PluginConfig::new(&opts.driver_name, &opts.node_name);
    c.cdi_root = opts.cdi_root.clone();
    c.data_dir = data_dir;
    c.allow_foreign_group_members = opts.policy.binding.allow_foreign_group_members;
    c.legacy_kubevirt_metadata = opts.legacy_kubevirt_metadata;
    c.call_budget = opts.call_budget;
    c.metrics = Arc::clone(metrics);
    c
}

/// `vfio-gpu-dra reset` reaches this engine through the admin socket while
/// this process holds the state lock; without it the plugin still serves,
/// and says so.
fn start_admin_socket(engine: &Arc<Engine>, state_dir: &Path) -> Option<AdminSocket> {
    AdminSocket::start(Arc::clone(engine), state_dir)
        .inspect_err(|e| {
            tracing::warn!(error = %e, dir = %state_dir.display(), "admin socket not started: `vfio-gpu-dra reset` needs the plugin stopped");
        })
        .ok()
}

async fn serve_plugin(
    opts: ServeOptions,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let data_dir = opts.data_dir();
    let state_dir = opts.state_dir.clone().unwrap_or_else(|| data_dir.clone());
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    // Before the engine touches anything: what doctor would say, in the log.
    check_node_at_start(&opts, &state_dir)
        .await
        .context("node check task")?;

    let (kernel, selector, policy, mut engine_config) = (
        Arc::clone(&opts.kernel),
        opts.selector.clone(),
        opts.policy.clone(),
        opts.engine_config.clone(),
    );
    if opts.pod_uid.is_some() {
        // Another instance of the driver may serve this node at the same time.
        engine_config.state_lock_mode = StateLockMode::PerOperation;
    }
    // Every Fabric Manager call is timed and its errors counted.
    if let Some(fc) = engine_config.fabric.as_mut() {
        fc.fm = fc.fm.clone().observed(opts.metrics.fm_observer());
    }
    let dir = state_dir.clone();
    // Opening may wait for another instance's state lock: keep it off the runtime.
    let (engine, report) = tokio::task::spawn_blocking(move || {
        Engine::open(kernel, &dir, selector, policy, engine_config)
    })
    .await
    .context("engine open task")?
    .with_context(|| format!("opening the engine on {}", state_dir.display()))?;
    log_open_report(&report);
    let engine = Arc::new(engine);

    // Before the sockets exist: the kubelet must not prepare against a host that still
    // has interrupted operations in it.
    reconcile(&engine, &metrics).await?;
    let _admin_socket = start_admin_socket(&engine, &state_dir);

    let client = kube_client(&opts.kube).await?;
    let plugin_config = plugin_config(&opts, data_dir, &metrics);
    let plugin = VfioPlugin::new(Arc::clone(&engine), client.clone(), plugin_config);

    let stop = shutdown.child_token();
    // Scans once before the socket exists, so the kubelet's first health message is real.
    let feed = HealthMonitor::start(
        Arc::clone(&engine),
        Arc::clone(&metrics),
        opts.device_scan_interval,
        stop.clone(),
    )
    .await;
    let mut server_config = ServerConfig::for_pod(
        &opts.driver_name,
        &opts.plugins_dir,
        &opts.registrar_dir,
        opts.pod_uid.as_deref(),
    );
    if opts.pod_uid.is_some() {
        // The other instance takes the kubelet's calls once it has seen us go.
        server_config.dra_linger = Duration::from_secs(2);
    }
    server_config.peers = opts.socket_peers.clone();
    server_config.health = Some(HealthConfig {
        feed: feed.clone(),
        pool: opts.node_name.clone(),
        resend: DEFAULT_RESEND,
    });
    let server = serve_grpc(server_config, plugin.clone(), stop.clone())
        .await
        .context("starting the kubelet plugin sockets")?;
    tracing::info!(
        dra = %server.dra_socket.display(),
        registration = %server.registration_socket.display(),
        node = %opts.node_name,
        driver = %opts.driver_name,
        "kubelet plugin serving"
    );
    metrics.set_liveness_sockets(
        server.registration_socket.clone(),
        server.dra_socket.clone(),
    );
    tokio::spawn(mirror_registration(
        server.registration_status(),
        Arc::clone(&metrics),
    ));
    let mut server_task = tokio::spawn(server.wait());

    let publisher = start_slices(
        &opts,
        PublisherContext {
            client,
            node_name: opts.node_name.clone(),
            driver_name: opts.driver_name.clone(),
            engine: Arc::clone(&engine),
            shutdown: stop.clone(),
            metrics: Some(Arc::clone(&metrics)),
            record_dir: Some(state_dir.clone()),
            admin_owned: opts.admin_owned,
            health: Some(crate::slices::HealthTaints {
                feed,
                policy: opts.unhealthy_taint_effect,
            }),
        },
        state_dir,
    );

    // Periodic work runs in its own tasks: a cleanup waiting for the API server or a
    // reconcile waiting for a deadline must not stop the liveness heartbeat below.
    let periodic = [
        tokio::spawn(reconcile_loop(
            Arc::clone(&engine),
            Arc::clone(&metrics),
            opts.reconcile_interval,
            stop.clone(),
        )),
        tokio::spawn(cleanup_loop(
            Arc::clone(&plugin),
            opts.cleanup_interval,
            stop.clone(),
        )),
    ];
    // NVLink: replays FM's active partitions within its 60 s window after a
    // `--restart` (crate::fabric); ends with `stop`.
    let _fabric_watch = crate::fabric::spawn_watch(&engine, stop.clone());
    let mut heartbeat = tokio::time::interval(opts.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            r = &mut server_task => {
                break match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(anyhow::Error::from(e).context("kubelet plugin server")),
                    Err(e) => Err(anyhow::Error::from(e).context("kubelet plugin server task")),
                };
            }
            _ = heartbeat.tick() => metrics.heartbeat(),
        }
    };
    stop.cancel();
    stop_periodic(periodic, opts.drain_timeout).await;
    if !server_task.is_finished() {
        match server_task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "kubelet plugin server stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "kubelet plugin server task failed"),
            Ok(Ok(())) => {}
        }
    }
    // The DRA server finished the calls it had; work those calls handed to the
    // background (past their budget) finishes too, so none is cut short.
    if !plugin.wait_idle(opts.drain_timeout).await {
        tracing::warn!(timeout = ?opts.drain_timeout, "claim work still running at shutdown; the kubelet will retry it");
    }
    if let Some(p) = publisher {
        match p.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "ResourceSlice publisher failed")
            }
            Err(e) => tracing::warn!(error = %e, "ResourceSlice publisher task failed"),
        }
    }
    tracing::info!("kubelet plugin stopped");
    result
}

/// Waits for the periodic tasks after `stop`: a round in progress finishes (its host
/// writes are not cut short), within `timeout`; past it the task is dropped (engine
/// work already started on a blocking thread still completes, and the ledger stays
/// consistent).
async fn stop_periodic(tasks: [tokio::task::JoinHandle<()>; 2], timeout: Duration) {
    for mut task in tasks {
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            tracing::warn!(
                ?timeout,
                "periodic reconcile or cleanup still running at shutdown"
            );
            task.abort();
        }
    }
}

/// Reconciles the host against the ledger every `interval` until `stop`; the first
/// round is one interval after start (`serve` reconciled before the sockets opened).
async fn reconcile_loop(
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = reconcile(&engine, &metrics).await {
            tracing::warn!(error = %format!("{e:#}"), "periodic reconcile failed");
        }
    }
}

/// Releases stale claims ([`VfioPlugin::cleanup_stale_claims`]) at start and every
/// `interval` until `stop`.
async fn cleanup_loop(plugin: Arc<VfioPlugin>, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (c, r) in plugin.cleanup_stale_claims().await {
            if let Err(e) = r {
                tracing::warn!(claim = %c.uid, error = %e, "cleanup of a stale claim failed");
            }
        }
    }
}

/// Keeps the `registered` readiness input in line with what the kubelet reports.
async fn mirror_registration(
    mut registration: tokio::sync::watch::Receiver<RegistrationState>,
    metrics: Arc<Metrics>,
) {
    loop {
        let registered = matches!(
            *registration.borrow_and_update(),
            RegistrationState::Registered
        );
        metrics.set_registered(registered);
        if registration.changed().await.is_err() {
            return;
        }
    }
}

/// Starts publishing (see [`publish_when_elected`] for rolling updates), or
/// nothing when publishing is off.
fn start_slices(
    opts: &ServeOptions,
    ctx: PublisherContext,
    state_dir: PathBuf,
) -> Option<tokio::task::JoinHandle<anyhow::Result<()>>> {
    if !opts.publish_slices {
        tracing::warn!("ResourceSlice publishing is off: this node's GPUs are not published");
        // Nothing to wait for before the node is usable.
        if let Some(m) = &ctx.metrics {
            m.set_slices_published();
        }
        return None;
    }
    Some(if opts.pod_uid.is_some() {
        tokio::spawn(publish_when_elected(ctx, state_dir, opts.standby_poll))
    } else {
        start_publisher(ctx)
    })
}

/// Publishes ResourceSlices once this instance holds [`PUBLISHER_LOCK`] in
/// `state_dir`; until then another instance publishes them, this one stands by
/// (counted as published for `/readyz`) and checks every `poll`. Two publishers
/// would not corrupt anything (identical slices converge), but two versions
/// with different attributes would rewrite each other's slices.
async fn publish_when_elected(
    ctx: PublisherContext,
    state_dir: PathBuf,
    poll: Duration,
) -> anyhow::Result<()> {
    let mut standing_by = false;
    let _lock = loop {
        match StateLock::acquire_named(&state_dir, PUBLISHER_LOCK, Duration::ZERO) {
            Ok(lock) => break Some(lock),
            Err(LockError::Held { holder, .. }) => {
                if !standing_by {
                    tracing::info!(%holder, "another instance publishes ResourceSlices; standing by");
                    standing_by = true;
                }
                if let Some(m) = &ctx.metrics {
                    m.set_slices_published();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no publisher lock; publishing anyway");
                break None;
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(poll) => {}
        }
    };
    if standing_by {
        tracing::info!("the other instance stopped publishing ResourceSlices; taking over");
    }
    start_publisher(ctx)
        .await
        .context("ResourceSlice publisher task")?
}
