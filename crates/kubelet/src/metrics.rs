//! Prometheus metrics and the liveness/readiness probes of `serve`.
//!
//! The plugin always records into a [`Metrics`]; `serve --metrics-addr` exposes it over
//! HTTP ([`serve_http`]): `/metrics` (OpenMetrics text), `/healthz` (the serve loop
//! ticked recently, and the registration and DRA sockets answer a call) and `/readyz` (registered with the kubelet and ResourceSlices
//! published at least once).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vfio_gpu_engine::fabric_state::PartitionState;
use vfio_gpu_engine::{Action, EngineError, GpuView, Outcome};
use vfio_gpu_fabric::{Call, FmError, FmObserver};

/// The `code` label of `fabric_manager_errors`: FM's return code as a
/// number, or the kind of failure that has none (a small fixed set).
fn fm_code_label(e: &FmError) -> String {
    match e {
        FmError::Fm { code, .. } | FmError::Overlap { code, .. } => code.raw().to_string(),
        FmError::UnknownCode { raw, .. } => raw.to_string(),
        FmError::Deadline { .. } => "deadline".into(),
        FmError::Stuck(_) => "stuck".into(),
        FmError::Worker(_) => "worker".into(),
        FmError::Load { .. } | FmError::MissingSymbol { .. } => "library".into(),
        FmError::Abi { .. } => "abi".into(),
        FmError::Endpoint { .. } => "endpoint".into(),
        FmError::UnknownPartition(_) => "unknown-partition".into(),
    }
}

/// Label set of the counters: `[(name, value), ...]`, values from a fixed set.
type Labels2 = [(&'static str, String); 2];
type Labels1 = [(&'static str, &'static str); 1];
/// Label set of the per-GPU owner gauge: gpu, namespace, claim, pod.
type OwnerLabels = [(&'static str, String); 4];

/// `/healthz` fails once the serve loop has not ticked for this long.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(90);

/// How long `/healthz` waits for each socket to answer (below the DaemonSet's 5 s
/// probe timeout; both are dialled at once).
pub const SOCKET_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Direction of a GPU move, the `direction` label of `vfio_gpu_dra_moves_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Prepare: the GPU goes to vfio.
    ToVfio,
    /// Unprepare (or undo): the GPU is released.
    Release,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::ToVfio => "to_vfio",
            Direction::Release => "release",
        }
    }
}

/// The plugin's metrics and probe state. Cheap to share (`Arc`); all methods take `&self`.
pub struct Metrics {
    registry: Registry,
    prepare_duration: Histogram,
    unprepare_duration: Histogram,
    moves: Family<Labels2, Counter>,
    rollbacks: Family<Labels1, Counter>,
    ledger_failures: Counter,
    stuck: Gauge,
    persistence_left_off: Gauge,
    holder_scan: Gauge<f64, std::sync::atomic::AtomicU64>,
    devices: Family<Labels1, Gauge>,
    quarantined: Family<Labels2, Gauge>,
    owner: Family<OwnerLabels, Gauge>,
    /// The pod each prepared claim is reserved for, by claim UID, as the
    /// plugin last read the claim (the `pod` label of `gpu_owner`).
    claim_pods: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    aer: Family<Labels2, Gauge>,
    /// PCIe link speed (GT/s) and width, `of` current or max, per GPU.
    link_speed: Family<Labels2, Gauge<f64, AtomicU64>>,
    link_width: Family<Labels2, Gauge>,
    unhealthy: Gauge,
    health_scan: Histogram,
    active_partitions: Gauge,
    fm_call_duration: Family<Labels1, Histogram>,
    fm_errors: Family<Labels2, Counter>,
    started: Instant,
    /// Milliseconds since `started` of the last serve-loop tick; 0 = loop not running yet.
    heartbeat_ms: AtomicU64,
    registered: AtomicBool,
    slices_published: AtomicBool,
    stale_after: Duration,
    /// Registration and DRA socket that `/healthz` dials, once they are served.
    sockets: std::sync::Mutex<Option<(PathBuf, PathBuf)>>,
    /// Wakes the device scanner after a prepare/unprepare changed the host.
    pub(crate) changed: tokio::sync::Notify,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("registered", &self.registered.load(Ordering::Relaxed))
            .field(
                "slices_published",
                &self.slices_published.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::with_stale_after(DEFAULT_STALE_AFTER)
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Like [`Metrics::new`], with `/healthz` failing after `stale_after` without a tick.
    pub fn with_stale_after(stale_after: Duration) -> Self {
        let mut registry = Registry::with_prefix("vfio_gpu_dra");
        // 10 ms .. ~80 s: a no-op prepare is milliseconds, a slow unbind tens of seconds.
        let buckets = || exponential_buckets(0.01, 2.0, 14);
        let prepare_duration = Histogram::new(buckets());
        let unprepare_duration = Histogram::new(buckets());
        let health_scan = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let moves = Family::<Labels2, Counter>::default();
        let rollbacks = Family::<Labels1, Counter>::default();
        let ledger_failures = Counter::default();
        let stuck = Gauge::default();
        let persistence_left_off = Gauge::default();
        let holder_scan = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let devices = Family::<Labels1, Gauge>::default();
        let quarantined = Family::<Labels2, Gauge>::default();
        let owner = Family::<OwnerLabels, Gauge>::default();
        let aer = Family::<Labels2, Gauge>::default();
        let link_speed = Family::<Labels2, Gauge<f64, AtomicU64>>::default();
        let link_width = Family::<Labels2, Gauge>::default();
        let unhealthy = Gauge::default();
        let active_partitions = Gauge::default();
        // 1 ms .. ~16 s: an FM call is milliseconds, its deadline 10 s.
        let fm_call_duration = Family::<Labels1, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        let fm_errors = Family::<Labels2, Counter>::default();
        registry.register(
            "fabric_active_partitions",
            "NVLink partitions the ledger records active for claims on this node",
            active_partitions.clone(),
        );
        registry.register(
            "fabric_manager_call_duration_seconds",
            "Fabric Manager SDK calls by call (fmActivateFabricPartition, ...), bounded by the call deadline",
            fm_call_duration.clone(),
        );
        registry.register(
            "fabric_manager_errors",
            "Failed Fabric Manager calls by call and code (the fmReturn_t, or deadline, stuck, connection, library)",
            fm_errors.clone(),
        );
        registry.register(
            "prepare_duration_seconds",
            "Time to answer one claim of NodePrepareResources",
            prepare_duration.clone(),
        );
        registry.register(
            "unprepare_duration_seconds",
            "Time to answer one claim of NodeUnprepareResources",
            unprepare_duration.clone(),
        );
        registry.register(
            "moves",
            "GPU moves by direction (to_vfio, release) and outcome (engine action, or error kind)",
            moves.clone(),
        );
        registry.register(
            "rollbacks",
            "Rollbacks by outcome: engine (complete, incomplete), plugin undo after a later failure (undone, undo_failed), reconcile (reconcile)",
            rollbacks.clone(),
        );
        registry.register(
            "ledger_commit_failures",
            "Engine operations that failed because the ledger could not be written",
            ledger_failures.clone(),
        );
        registry.register(
            "stuck_devices",
            "GPUs with a sysfs write still running past its deadline",
            stuck.clone(),
        );
        registry.register(
            "persistence_left_off_devices",
            "GPUs given back with nvidia persistence mode still off (turning it on failed; reconcile retries)",
            persistence_left_off.clone(),
        );
        registry.register(
            "holder_scan_seconds",
            "Duration of the last /proc holder scan (grows with the descriptors open on the node; past the command deadline prepares answer busy)",
            holder_scan.clone(),
        );
        registry.register(
            "devices",
            "GPUs on this node by the keepOnVfio verdict",
            devices.clone(),
        );
        registry.register(
            "gpu_quarantined",
            "1 for each GPU in quarantine (failed reset, verification or scrub hook), by gpu (PCI address) and reason (the failed step); cleared by `vfio-gpu-dra reset <gpu>`",
            quarantined.clone(),
        );
        registry.register(
            "gpu_owner",
            "1 for each GPU a ResourceClaim holds, by gpu (PCI address), namespace, claim and pod (the pod the claim is reserved for, empty when none or several), so GPU metrics can be joined to the tenant (one series per GPU at most)",
            owner.clone(),
        );
        registry.register(
            "gpu_aer_errors",
            "PCIe AER errors the kernel counted for each GPU since boot (sysfs aer_dev_*), by gpu (PCI address) and severity (correctable, nonfatal, fatal)",
            aer.clone(),
        );
        registry.register(
            "gpu_link_speed_gts",
            "PCIe link speed of each GPU in GT/s as sysfs shows it, by gpu (PCI address) and of (current, max); current below max is a degraded or power-managed link",
            link_speed.clone(),
        );
        registry.register(
            "gpu_link_width",
            "PCIe link width of each GPU in lanes as sysfs shows it, by gpu (PCI address) and of (current, max); current below max is a degraded link",
            link_width.clone(),
        );
        registry.register(
            "unhealthy_devices",
            "GPUs reported UNHEALTHY to the kubelet",
            unhealthy.clone(),
        );
        registry.register(
            "health_scan_duration_seconds",
            "Time of one device scan (discovery plus health checks)",
            health_scan.clone(),
        );
        Self {
            registry,
            prepare_duration,
            unprepare_duration,
            moves,
            rollbacks,
            ledger_failures,
            stuck,
            persistence_left_off,
            holder_scan,
            devices,
            quarantined,
            owner,
            claim_pods: Default::default(),
            aer,
            link_speed,
            link_width,
            unhealthy,
            health_scan,
            active_partitions,
            fm_call_duration,
            fm_errors,
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            registered: AtomicBool::new(false),
            slices_published: AtomicBool::new(false),
            stale_after,
            sockets: std::sync::Mutex::new(None),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Records the time one claim's prepare took.
    pub fn observe_prepare(&self, d: Duration) {
        self.prepare_duration.observe(d.as_secs_f64());
    }

    /// Records the time one claim's unprepare took.
    pub fn observe_unprepare(&self, d: Duration) {
        self.unprepare_duration.observe(d.as_secs_f64());
    }

    /// Counts one engine result of a move in `direction` (and its rollback and ledger
    /// failure, if any).
    pub fn record_move(&self, direction: Direction, result: &Result<Outcome, EngineError>) {
        let outcome = match result {
            Ok(o) => action_label(o.action),
            Err(e) => {
                match e {
                    EngineError::RolledBack { .. } => self.rollback("complete"),
                    EngineError::RollbackIncomplete { .. } => self.rollback("incomplete"),
                    EngineError::Ledger(_) => {
                        self.ledger_failures.inc();
                    }
                    _ => {}
                }
                error_label(e).to_string()
            }
        };
        self.moves
            .get_or_create(&[
                ("direction", direction.as_str().to_string()),
                ("outcome", outcome),
            ])
            .inc();
    }

    /// Counts the plugin undoing the GPUs of a failed prepare.
    pub fn record_undo(&self, ok: bool) {
        self.rollback(if ok { "undone" } else { "undo_failed" });
    }

    /// Counts what a reconcile did: interrupted moves it rolled back, ledger failures.
    pub fn record_reconcile(&self, results: &[Result<Outcome, (vfio_gpu_host::Bdf, EngineError)>]) {
        for r in results {
            match r {
                Ok(o) if o.action == Action::RolledBack => self.rollback("reconcile"),
                Err((_, EngineError::Ledger(_))) => {
                    self.ledger_failures.inc();
                }
                _ => {}
            }
        }
    }

    /// Counts an engine error that is not a move (e.g. a failed discovery).
    pub fn record_error(&self, e: &EngineError) {
        if matches!(e, EngineError::Ledger(_)) {
            self.ledger_failures.inc();
        }
    }

    fn rollback(&self, outcome: &'static str) {
        self.rollbacks.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Updates the device gauges from a discovery, `unhealthy` from the health checks,
    /// and records how long the scan took.
    pub fn record_scan(&self, views: &[GpuView], unhealthy: usize, took: Duration) {
        let keep = views.iter().filter(|v| v.verdict.keep_on_vfio).count();
        let stuck = views.iter().filter(|v| v.stuck.is_some()).count();
        self.devices
            .get_or_create(&[("keep_on_vfio", "true")])
            .set(gauge_value(keep));
        self.devices
            .get_or_create(&[("keep_on_vfio", "false")])
            .set(gauge_value(views.len() - keep));
        self.stuck.set(gauge_value(stuck));
        // One series per quarantined GPU, gone once it leaves quarantine.
        self.quarantined.clear();
        for v in views {
            if let Some(q) = &v.quarantine {
                self.quarantined
                    .get_or_create(&[
                        ("gpu", v.gpu.bdf().to_string()),
                        ("reason", q.cause.as_str().to_string()),
                    ])
                    .set(1);
            }
        }
        // Who holds each GPU: at most one series per GPU (bounded cardinality).
        self.owner.clear();
        let mut pods = self.claim_pods.lock().unwrap_or_else(|p| p.into_inner());
        let mut holding = std::collections::BTreeSet::new();
        for v in views {
            let held = v.record.as_ref().and_then(|r| match (&r.holder, r.state) {
                (
                    Some(vfio_gpu_engine::Holder::Claim {
                        uid,
                        namespace,
                        name,
                    }),
                    vfio_gpu_engine::ledger::OpState::Configuring
                    | vfio_gpu_engine::ledger::OpState::Configured,
                ) => Some((uid.clone(), namespace.clone(), name.clone())),
                _ => None,
            });
            if let Some((uid, namespace, claim)) = held {
                let pod = pods.get(&uid).cloned().unwrap_or_default();
                holding.insert(uid);
                self.owner
                    .get_or_create(&[
                        ("gpu", v.gpu.bdf().to_string()),
                        ("namespace", namespace),
                        ("claim", claim),
                        ("pod", pod),
                    ])
                    .set(1);
            }
        }
        // Claims that hold no GPU any more are forgotten: the map stays as
        // small as the series.
        pods.retain(|uid, _| holding.contains(uid));
        drop(pods);
        let left_off = views
            .iter()
            .filter(|v| v.persistence_left_off.is_some())
            .count();
        self.persistence_left_off.set(gauge_value(left_off));
        self.unhealthy.set(gauge_value(unhealthy));
        self.health_scan.observe(took.as_secs_f64());
        let active: std::collections::BTreeSet<u32> = views
            .iter()
            .filter_map(|v| v.fabric.as_ref()?.partition.as_ref())
            .filter(|(_, state, _)| *state == PartitionState::Active)
            .map(|(id, _, _)| id.0)
            .collect();
        self.active_partitions.set(gauge_value(active.len()));
    }

    /// Records the pod the claim `uid` is reserved for (`""`: none or
    /// several), for the `pod` label of `gpu_owner` from the next scan on.
    /// Forgotten by the first scan that finds the claim holding no GPU.
    pub fn set_claim_pod(&self, uid: &str, pod: &str) {
        self.claim_pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), pod.to_string());
    }

    /// Sets the AER gauges to the kernel's counts of the last scan (GPUs
    /// without AER, or whose read timed out, have no series).
    pub fn record_aer(&self, counts: &[(vfio_gpu_host::Bdf, crate::health::AerCounts)]) {
        self.aer.clear();
        for (bdf, c) in counts {
            for (severity, n) in [
                ("correctable", c.correctable),
                ("nonfatal", c.nonfatal),
                ("fatal", c.fatal),
            ] {
                self.aer
                    .get_or_create(&[("gpu", bdf.to_string()), ("severity", severity.to_string())])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Sets the link gauges to the last scan's readings (GPUs without a
    /// readable link, or whose read timed out, have no series).
    pub fn record_links(&self, links: &[(vfio_gpu_host::Bdf, crate::health::LinkReading)]) {
        self.link_speed.clear();
        self.link_width.clear();
        for (bdf, l) in links {
            for (of, gts, width) in [
                ("current", l.current_gts, l.current_width),
                ("max", l.max_gts, l.max_width),
            ] {
                let labels = [("gpu", bdf.to_string()), ("of", of.to_string())];
                self.link_speed.get_or_create(&labels).set(gts);
                self.link_width.get_or_create(&labels).set(i64::from(width));
            }
        }
    }

    /// Records one Fabric Manager call ([`Metrics::fm_observer`]).
    pub fn record_fm_call(&self, call: Call, took: Duration, error: Option<&FmError>) {
        self.fm_call_duration
            .get_or_create(&[("call", call.symbol())])
            .observe(took.as_secs_f64());
        if let Some(e) = error {
            self.fm_errors
                .get_or_create(&[
                    ("call", call.symbol().to_string()),
                    ("code", fm_code_label(e)),
                ])
                .inc();
        }
    }

    /// An observer for [`vfio_gpu_fabric::DeadlineFm::observed`] that records
    /// every FM call here.
    pub fn fm_observer(self: &Arc<Self>) -> FmObserver {
        let m = Arc::clone(self);
        Arc::new(move |call, took, error| m.record_fm_call(call, took, error))
    }

    /// Records how long the engine's last `/proc` holder scan took.
    pub fn record_holder_scan(&self, took: Option<Duration>) {
        if let Some(t) = took {
            self.holder_scan.set(t.as_secs_f64());
        }
    }

    /// Tells the device scanner that the host changed (after a prepare/unprepare).
    pub fn devices_changed(&self) {
        self.changed.notify_one();
    }

    /// The serve loop is alive: called on every tick.
    pub fn heartbeat(&self) {
        // +1 so a tick in the first millisecond is not mistaken for "not started".
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heartbeat_ms
            .store(ms.saturating_add(1), Ordering::Relaxed);
    }

    /// From now on `/healthz` also dials these sockets ([`Metrics::alive_and_answering`]).
    pub fn set_liveness_sockets(&self, registration: PathBuf, dra: PathBuf) {
        *self.sockets.lock().unwrap_or_else(|p| p.into_inner()) = Some((registration, dra));
    }

    /// `/healthz`: [`Metrics::alive`], and both sockets set with
    /// [`Metrics::set_liveness_sockets`] answer a call within [`SOCKET_PROBE_TIMEOUT`]
    /// (a socket file deleted, or a server that stopped serving, fails it).
    pub async fn alive_and_answering(&self) -> Result<(), String> {
        self.alive()?;
        let sockets = self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match sockets {
            Some((registration, dra)) => {
                crate::grpc::server::probe_sockets(&registration, &dra, SOCKET_PROBE_TIMEOUT).await
            }
            None => Ok(()),
        }
    }

    /// Whether the kubelet accepted the registration.
    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Relaxed);
    }

    /// ResourceSlices were published (or publishing is off).
    pub fn set_slices_published(&self) {
        self.slices_published.store(true, Ordering::Relaxed);
    }

    /// Liveness: true while starting (engine open and the first reconcile have their own
    /// deadlines), then as long as the serve loop ticked within `stale_after`.
    pub fn alive(&self) -> Result<(), String> {
        let beat = self.heartbeat_ms.load(Ordering::Relaxed);
        if beat == 0 {
            return Ok(());
        }
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let age = Duration::from_millis(now.saturating_sub(beat - 1));
        if age > self.stale_after {
            Err(format!(
                "the serve loop last ticked {:.0} s ago (limit {:.0} s)",
                age.as_secs_f64(),
                self.stale_after.as_secs_f64()
            ))
        } else {
            Ok(())
        }
    }

    /// Readiness: registered with the kubelet and slices published at least once.
    pub fn ready(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        if !self.registered.load(Ordering::Relaxed) {
            missing.push("not registered with the kubelet");
        }
        if !self.slices_published.load(Ordering::Relaxed) {
            missing.push("ResourceSlices not published yet");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The engine action as a label value (`moved`, `already_on_vfio`, ...).
fn action_label(a: Action) -> String {
    serde_json::to_value(a)
        .ok()
        .and_then(|v| v.as_str().map(|s| s.replace('-', "_")))
        .unwrap_or_else(|| "other".to_string())
}

/// A bounded label value for an engine error.
fn error_label(e: &EngineError) -> &'static str {
    match e {
        EngineError::Ledger(_) => "ledger_error",
        EngineError::RolledBack { .. } => "rolled_back",
        EngineError::RollbackIncomplete { .. } => "rollback_incomplete",
        EngineError::RestoreFailed { .. } => "restore_failed",
        EngineError::Stuck { .. } => "stuck",
        EngineError::Busy { .. }
        | EngineError::UnbindLock { .. }
        | EngineError::FdsExhausted { .. } => "busy",
        EngineError::HeldByOther { .. } => "held_by_other",
        EngineError::Pinned { .. } | EngineError::ForeignGroupMembers { .. } => "refused",
        _ => "error",
    }
}

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listener could not be set up.
    #[error("metrics listener on {addr}: {source}")]
    Listen {
        /// The address the listener was to bind (`host:port`).
        addr: String,
        /// Why binding or configuring the socket failed.
        source: std::io::Error,
    },
}

/// Turns a bound std listener (bound early, so a bad `--metrics-addr` fails before
/// anything else starts) into a tokio one.
pub fn tokio_listener(listener: std::net::TcpListener) -> Result<TcpListener, MetricsError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let err = |source| MetricsError::Listen {
        addr: addr.clone(),
        source,
    };
    listener.set_nonblocking(true).map_err(err)?;
    TcpListener::from_std(listener).map_err(err)
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

/// Answers one request: `/metrics`, `/healthz`, `/readyz`.
async fn route(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into(), PLAIN);
    }
    let probe = |r: Result<(), String>| match r {
        Ok(()) => text(StatusCode::OK, "ok\n".into(), PLAIN),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"), PLAIN),
    };
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/healthz" | "/livez" => probe(metrics.alive_and_answering().await),
        "/readyz" => probe(metrics.ready()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
    }
}

/// At most this many metrics connections are open at once. The endpoint listens on
/// the pod IP, so any pod in the cluster can connect; each connection costs a file
/// descriptor that GPU moves and their rollbacks need (security review H1).
pub const MAX_CONNECTIONS: usize = 16;
/// A connection must send its request headers within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection is closed after this time whatever it does (e.g. a slow reader of a
/// large `/metrics` answer).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// Pause after a failed accept, doubling up to the maximum (like Go's `net/http`):
/// on EMFILE the pending connection stays queued and accept fails again at once.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The open connections, oldest first, each with the token that closes it.
#[derive(Default)]
struct Slots {
    next_id: u64,
    open: std::collections::VecDeque<(u64, CancellationToken)>,
}

impl Slots {
    /// Registers a new connection; when the cap is reached, closes the oldest one
    /// first. Evicting the oldest rather than refusing the newest keeps `/healthz`
    /// answering while someone holds [`MAX_CONNECTIONS`] idle connections: a probe
    /// sends its request at once, an idle flood does not.
    fn admit(&mut self) -> (u64, CancellationToken) {
        while self.open.len() >= MAX_CONNECTIONS {
            match self.open.pop_front() {
                Some((_, evicted)) => evicted.cancel(),
                None => break,
            }
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let token = CancellationToken::new();
        self.open.push_back((id, token.clone()));
        (id, token)
    }

    fn release(&mut self, id: u64) {
        self.open.retain(|(i, _)| *i != id);
    }
}

fn lock_slots(slots: &std::sync::Mutex<Slots>) -> std::sync::MutexGuard<'_, Slots> {
    // The data stays consistent even if a holder panicked (no invariant spans calls).
    slots
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` (HTTP/1.1, one request
/// per connection) until `shutdown`; connections still open are dropped then.
///
/// At most [`MAX_CONNECTIONS`] are open at once (the oldest is closed to admit a
/// new one), each must send its headers within [`HEADER_TIMEOUT`] and is closed
/// after [`CONNECTION_DEADLINE`].
pub async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let slots = Arc::new(std::sync::Mutex::new(Slots::default()));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    a
                }
                Err(e) => {
                    // E.g. EMFILE: keep serving once descriptors are free again,
                    // without spinning on the connection that stays queued.
                    tracing::warn!(error = %e, retry_in = ?backoff, "metrics endpoint: accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        let (id, evicted) = lock_slots(&slots).admit();
        let slots = Arc::clone(&slots);
        let metrics = Arc::clone(&metrics);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, std::convert::Infallible>(route(&metrics, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = evicted.cancelled() => {
                    tracing::debug!(%peer, "metrics endpoint: closed to admit a newer connection");
                }
                r = tokio::time::timeout(CONNECTION_DEADLINE, conn) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics endpoint connection"),
                    Err(_) => tracing::debug!(%peer, "metrics endpoint: connection deadline passed"),
                },
            }
            lock_slots(&slots).release(id);
        });
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as Go's runtime does: container
/// runtimes start processes at a soft limit of 1024, which an fd flood reaches long
/// before memory (security review H1). Returns the (old, new) soft limits.
pub fn raise_fd_limit() -> std::io::Result<(libc::rlim_t, libc::rlim_t)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; the call only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_when_the_loop_stops_ticking() {
        let m = Metrics::with_stale_after(Duration::from_millis(50));
        assert!(m.alive().is_ok(), "alive while starting");
        m.heartbeat();
        assert!(m.alive().is_ok());
        std::thread::sleep(Duration::from_millis(120));
        let e = m.alive().expect_err("stale heartbeat");
        assert!(e.contains("last ticked"), "{e}");
        m.heartbeat();
        assert!(m.alive().is_ok());
    }

    #[test]
    fn ready_needs_registration_and_slices() {
        let m = Metrics::new();
        assert!(m.ready().is_err());
        m.set_registered(true);
        assert!(m.ready().unwrap_err().contains("ResourceSlices"));
        m.set_slices_published();
        assert!(m.ready().is_ok());
    }

    #[test]
    fn exposition_names() {
        let m = Metrics::new();
        m.observe_prepare(Duration::from_millis(3));
        m.record_undo(false);
        m.record_holder_scan(Some(Duration::from_millis(250)));
        let text = m.encode();
        for name in [
            "vfio_gpu_dra_prepare_duration_seconds_count 1",
            "vfio_gpu_dra_unprepare_duration_seconds_count 0",
            "vfio_gpu_dra_rollbacks_total{outcome=\"undo_failed\"} 1",
            "vfio_gpu_dra_ledger_commit_failures_total 0",
            "vfio_gpu_dra_stuck_devices 0",
            "vfio_gpu_dra_persistence_left_off_devices 0",
            "vfio_gpu_dra_holder_scan_seconds 0.25",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }

    #[test]
    fn fabric_manager_calls_are_timed_and_errors_counted_by_code() {
        use vfio_gpu_fabric::{
            DeadlineFm, FabricManager, FmCode, PartitionId, Platform, SimFabricManager,
        };
        let m = Metrics::new();
        let sim = Arc::new(SimFabricManager::new(Platform::HgxH100));
        let fm = DeadlineFm::new(sim.clone(), Duration::from_secs(5)).observed(m.fm_observer());
        fm.get_supported_partitions().unwrap();
        fm.activate(PartitionId(3)).unwrap();
        // Partition 1 overlaps the active 3: FM answers IN_USE (-7).
        assert!(fm.activate(PartitionId(1)).is_err());
        // A partition FM does not know.
        assert!(fm.activate(PartitionId(99)).is_err());
        let text = m.encode();
        assert!(
            text.contains(
                "vfio_gpu_dra_fabric_manager_call_duration_seconds_count{call=\"fmActivateFabricPartition\"} 3"
            ),
            "{text}"
        );
        let in_use = FmCode::InUse.raw();
        assert!(
            text.contains(&format!(
                "vfio_gpu_dra_fabric_manager_errors_total{{call=\"fmActivateFabricPartition\",code=\"{in_use}\"}} 1"
            )),
            "{text}"
        );
        assert!(
            !text.contains("call=\"fmGetSupportedFabricPartitions\",code="),
            "a success is no error: {text}"
        );
    }
}
