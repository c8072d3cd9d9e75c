//! Device health for the kubelet (`v1.DRAResourceHealth` and
//! `v1alpha1.DRAResourceHealth`, both advertised at registration), from what the host
//! shows: the device is present, its config space answers (vendor not `0xffff`), the
//! driver it is bound to agrees with the ledger, and no operation on it is stuck.
//!
//! [`HealthMonitor`] re-discovers the GPUs periodically (and soon after a prepare or
//! unprepare), updates the device gauges and publishes a [`HealthReport`] whenever a
//! device's health or reason changes. [`HealthService`] streams each report to the
//! kubelet as the complete device list, and repeats it every `resend` so the kubelet
//! never marks devices Unknown for lack of updates.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use vfio_gpu_engine::ledger::{GpuRecord, OpState};
use vfio_gpu_engine::{Engine, GpuView};
use vfio_gpu_host::{Bdf, HostRoot};

use crate::grpc::health_v1 as pb_v1;
use crate::grpc::health_v1alpha1 as pb;
use crate::metrics::Metrics;
use crate::slices::device_name;

/// Longest `message` the kubelet accepts.
pub const MAX_MESSAGE: usize = 1024;

/// Health of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Operating normally as far as the host can tell.
    Healthy,
    /// Something the host can see is wrong (see the message).
    Unhealthy,
}

/// One device's health, as reported to the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHealth {
    /// The GPU.
    pub bdf: Bdf,
    /// ResourceSlice device name.
    pub device_name: String,
    /// Health.
    pub health: Health,
    /// Why (empty when healthy and nothing to say).
    pub message: String,
    /// The reason code when unhealthy (the device taint's value), `None` when healthy.
    pub reason: Option<UnhealthyReason>,
}

/// Every device's health after one scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthReport {
    /// By address; devices seen once and gone since stay in it as unhealthy.
    pub devices: Vec<DeviceHealth>,
}

/// What reading the first bytes of the config space gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigRead {
    /// The vendor ID read.
    Vendor(u16),
    /// Not checked: no `config` file (test hosts), or the device is in D3cold, where a
    /// read would wake it.
    Skipped,
    /// The read failed.
    Failed(String),
    /// The read did not return within the engine's read deadline (a reset holding
    /// the device lock); the text says what blocked.
    TimedOut(String),
}

/// Reads the vendor ID from `<device dir>/config`, unless the device sleeps in D3cold.
pub fn read_config_vendor(root: &HostRoot, bdf: &Bdf) -> ConfigRead {
    let dir = root.pci_device_dir(bdf);
    if std::fs::read_to_string(dir.join("power_state")).is_ok_and(|s| s.trim() == "D3cold") {
        return ConfigRead::Skipped;
    }
    read_vendor(&dir.join("config"))
}

/// A device's AER error counts as the kernel keeps them (sysfs
/// `aer_dev_correctable`, `aer_dev_nonfatal`, `aer_dev_fatal`: cumulative
/// since boot, the `TOTAL_ERR_*` line of each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AerCounts {
    /// Corrected errors (`TOTAL_ERR_COR`).
    pub correctable: u64,
    /// Uncorrectable, non-fatal errors (`TOTAL_ERR_NONFATAL`).
    pub nonfatal: u64,
    /// Uncorrectable, fatal errors (`TOTAL_ERR_FATAL`).
    pub fatal: u64,
}

/// The `TOTAL_ERR_*` count of one `aer_dev_*` file, `None` when it has none.
pub fn parse_aer_total(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (name, n) = l.split_once(char::is_whitespace)?;
        name.starts_with("TOTAL_ERR_")
            .then(|| n.trim().parse().ok())
            .flatten()
    })
}

/// Reads `bdf`'s AER counts under `root`; `None` when the device reports
/// none (no AER capability, or a kernel without the attributes).
pub fn read_aer(root: &HostRoot, bdf: &Bdf) -> Option<AerCounts> {
    let total = |attr: &str| {
        root.read_opt(&root.pci_attr(bdf, attr))
            .ok()
            .flatten()
            .and_then(|t| parse_aer_total(&t))
    };
    let (correctable, nonfatal, fatal) = (
        total("aer_dev_correctable"),
        total("aer_dev_nonfatal"),
        total("aer_dev_fatal"),
    );
    if correctable.is_none() && nonfatal.is_none() && fatal.is_none() {
        return None;
    }
    Some(AerCounts {
        correctable: correctable.unwrap_or(0),
        nonfatal: nonfatal.unwrap_or(0),
        fatal: fatal.unwrap_or(0),
    })
}

/// [`read_aer`] of every GPU in `views` through the engine's bounded read
/// (a read blocked past the read deadline leaves that GPU out).
pub fn bounded_aer(engine: &Engine, views: &[GpuView]) -> Vec<(Bdf, AerCounts)> {
    bounded_per_gpu(engine, views, "AER counters", read_aer)
}

/// `read` of every GPU in `views` under the engine's read deadline, keyed by
/// the GPU (a blocked read quarantines that GPU's reads and leaves it out).
fn bounded_per_gpu<T: Send + 'static>(
    engine: &Engine,
    views: &[GpuView],
    what: &str,
    read: fn(&HostRoot, &Bdf) -> Option<T>,
) -> Vec<(Bdf, T)> {
    views
        .iter()
        .filter_map(|v| {
            let bdf = v.gpu.bdf();
            let root = engine.root().clone();
            let value = engine
                .read_device_bounded(bdf, &format!("{what} of {bdf}"), move || read(&root, &bdf))
                .ok()
                .flatten()?;
            Some((bdf, value))
        })
        .collect()
}

/// A device's PCIe link as sysfs shows it (`current_`/`max_link_speed`,
/// `current_`/`max_link_width`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkReading {
    /// Current speed, GT/s.
    pub current_gts: f64,
    /// Maximum speed, GT/s.
    pub max_gts: f64,
    /// Current width, lanes.
    pub current_width: u32,
    /// Maximum width, lanes.
    pub max_width: u32,
}

/// GT/s of a `*_link_speed` attribute (`16.0 GT/s PCIe`); `None` for
/// `Unknown` (a link that is down) or anything else.
pub fn parse_link_speed(text: &str) -> Option<f64> {
    let (number, unit) = text.trim().split_once(' ')?;
    let gts: f64 = number.parse().ok()?;
    (unit.starts_with("GT/s") && gts.is_finite() && gts > 0.0).then_some(gts)
}

/// Reads `bdf`'s link under `root`; `None` when it has no PCIe link
/// attributes or one does not parse.
pub fn read_link(root: &HostRoot, bdf: &Bdf) -> Option<LinkReading> {
    let text = |attr: &str| root.read_opt(&root.pci_attr(bdf, attr)).ok().flatten();
    Some(LinkReading {
        current_gts: parse_link_speed(&text("current_link_speed")?)?,
        max_gts: parse_link_speed(&text("max_link_speed")?)?,
        current_width: text("current_link_width")?.trim().parse().ok()?,
        max_width: text("max_link_width")?.trim().parse().ok()?,
    })
}

/// [`read_link`] of every GPU in `views` through the engine's bounded read
/// (a read blocked past the read deadline leaves that GPU out).
pub fn bounded_links(engine: &Engine, views: &[GpuView]) -> Vec<(Bdf, LinkReading)> {
    bounded_per_gpu(engine, views, "PCIe link", read_link)
}

fn read_vendor(path: &Path) -> ConfigRead {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ConfigRead::Skipped,
        Err(e) => return ConfigRead::Failed(e.to_string()),
    };
    let mut id = [0u8; 2];
    match f.read_exact(&mut id) {
        Ok(()) => ConfigRead::Vendor(u16::from_le_bytes(id)),
        Err(e) => ConfigRead::Failed(e.to_string()),
    }
}

/// Why a device is unhealthy, as a short CamelCase code: the value of the
/// `<driver>/unhealthy` device taint (a label value, so a fixed set, never text
/// from the host). The message beside it carries the details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UnhealthyReason {
    /// Config space reads `0xffff`: the device does not answer.
    NotResponding,
    /// Config space could not be read.
    ConfigUnreadable,
    /// A config-space read did not return within the engine's read deadline.
    ConfigReadTimedOut,
    /// A host write to it is still running past its deadline.
    OperationStuck,
    /// Bound to a driver other than the one the ledger put it on.
    DriverMismatch,
    /// No driver bound and no ledger record.
    NoDriver,
    /// Seen by an earlier scan, gone from the PCI bus since.
    Removed,
}

impl UnhealthyReason {
    /// Every reason (for exhaustive tests).
    pub const ALL: [UnhealthyReason; 7] = [
        UnhealthyReason::NotResponding,
        UnhealthyReason::ConfigUnreadable,
        UnhealthyReason::ConfigReadTimedOut,
        UnhealthyReason::OperationStuck,
        UnhealthyReason::DriverMismatch,
        UnhealthyReason::NoDriver,
        UnhealthyReason::Removed,
    ];

    /// The code published as the taint's value.
    pub fn as_str(self) -> &'static str {
        match self {
            UnhealthyReason::NotResponding => "NotResponding",
            UnhealthyReason::ConfigUnreadable => "ConfigUnreadable",
            UnhealthyReason::ConfigReadTimedOut => "ConfigReadTimedOut",
            UnhealthyReason::OperationStuck => "OperationStuck",
            UnhealthyReason::DriverMismatch => "DriverMismatch",
            UnhealthyReason::NoDriver => "NoDriver",
            UnhealthyReason::Removed => "Removed",
        }
    }

    /// Whether a VM that holds the GPU can no longer use it: the device stopped
    /// answering, left the bus, or was taken off vfio under the VM. A stuck host
    /// write or a driverless unclaimed GPU says nothing about a running VM's
    /// device, so those never evict (see `slices::unhealthy_taint_effect`).
    pub fn makes_gpu_unusable(self) -> bool {
        match self {
            UnhealthyReason::NotResponding
            | UnhealthyReason::ConfigUnreadable
            | UnhealthyReason::ConfigReadTimedOut
            | UnhealthyReason::DriverMismatch
            | UnhealthyReason::Removed => true,
            UnhealthyReason::OperationStuck | UnhealthyReason::NoDriver => false,
        }
    }
}

impl std::fmt::Display for UnhealthyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The health of a present GPU from what the host shows: `stuck` (a write past its
/// deadline), its ledger `record`, the `driver` its GPU function is bound to, and its
/// config space.
pub fn assess(
    stuck: Option<&str>,
    record: Option<&GpuRecord>,
    driver: Option<&str>,
    config: &ConfigRead,
) -> (Health, String) {
    let (reason, message) = assess_reason(stuck, record, driver, config);
    match reason {
        None => (Health::Healthy, message),
        Some(_) => (Health::Unhealthy, message),
    }
}

/// [`assess`] with the reason code: `None` when healthy, otherwise the first
/// problem found (config space first: a device that does not answer explains
/// the rest), and every problem in the message.
pub fn assess_reason(
    stuck: Option<&str>,
    record: Option<&GpuRecord>,
    driver: Option<&str>,
    config: &ConfigRead,
) -> (Option<UnhealthyReason>, String) {
    let mut problems: Vec<(UnhealthyReason, String)> = Vec::new();
    match config {
        ConfigRead::Vendor(0xffff) => problems.push((
            UnhealthyReason::NotResponding,
            "config space reads 0xffff: the device does not answer (fell off the bus, or a failed reset)"
                .to_string(),
        )),
        ConfigRead::Failed(e) => problems.push((
            UnhealthyReason::ConfigUnreadable,
            format!("config space unreadable: {e}"),
        )),
        ConfigRead::TimedOut(e) => problems.push((
            UnhealthyReason::ConfigReadTimedOut,
            format!(
                "config read timed out: {e} (the device lock is held, e.g. by a reset that does not finish)"
            ),
        )),
        ConfigRead::Vendor(_) | ConfigRead::Skipped => {}
    }
    if let Some(op) = stuck {
        problems.push((
            UnhealthyReason::OperationStuck,
            format!("stuck: {op} did not return; the GPU is left alone until it does"),
        ));
    }
    let shown = driver.unwrap_or("no driver");
    match record.map(|r| (r.state, r.vfio_driver.as_ref())) {
        Some((OpState::Configured | OpState::Prebound, want)) => {
            let ok = match (driver, want) {
                (Some(d), Some(w)) => d == w.as_str(),
                (Some(d), None) => vfio_gpu_host::is_vfio_driver(d),
                (None, _) => false,
            };
            if !ok {
                let want = want.map_or("a vfio driver", |w| w.as_str());
                problems.push((
                    UnhealthyReason::DriverMismatch,
                    format!("bound to {shown}, but the ledger has it on {want}"),
                ));
            }
        }
        // A move or release in flight passes through "no driver"; stuck ones are
        // reported above.
        Some((OpState::Configuring | OpState::Releasing, _)) => {}
        // Released to no driver, as it was found.
        Some((OpState::ReleasedUnbound, _)) => {}
        None if driver.is_none() => problems.push((
            UnhealthyReason::NoDriver,
            "no driver bound and no ledger record: the host left it driverless (reconcile rebinds it)"
                .to_string(),
        )),
        None => {}
    }
    let reason = problems.first().map(|(r, _)| *r);
    let message: Vec<String> = problems.into_iter().map(|(_, m)| m).collect();
    (reason, truncate(message.join("; ")))
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// [`read_config_vendor`] through the engine's bounded read: a read blocked past the
/// engine's read deadline gives [`ConfigRead::TimedOut`] for this device alone, and
/// the device stays quarantined until the read returns.
pub fn bounded_config_vendor(engine: &Engine, bdf: Bdf) -> ConfigRead {
    let root = engine.root().clone();
    let what = format!("config-space read of {bdf}");
    engine
        .read_device_bounded(bdf, &what, move || read_config_vendor(&root, &bdf))
        .unwrap_or_else(ConfigRead::TimedOut)
}

/// Scans the views with unbounded config reads (tests, benchmarks); `seen`
/// remembers devices of earlier scans so a vanished one is reported unhealthy
/// instead of silently dropped.
pub fn scan(views: &[GpuView], root: &HostRoot, seen: &mut BTreeMap<Bdf, String>) -> HealthReport {
    scan_with(views, seen, |bdf| read_config_vendor(root, bdf))
}

/// [`scan`] as the health monitor runs it: each config read bounded by `engine`'s
/// read deadline ([`bounded_config_vendor`]), so one hung device cannot stop the
/// reports for all of them.
pub fn scan_bounded(
    engine: &Engine,
    views: &[GpuView],
    seen: &mut BTreeMap<Bdf, String>,
) -> HealthReport {
    scan_with(views, seen, |bdf| bounded_config_vendor(engine, *bdf))
}

fn scan_with(
    views: &[GpuView],
    seen: &mut BTreeMap<Bdf, String>,
    read_config: impl Fn(&Bdf) -> ConfigRead,
) -> HealthReport {
    let mut devices: BTreeMap<Bdf, DeviceHealth> = BTreeMap::new();
    for v in views {
        let bdf = v.gpu.bdf();
        let config = read_config(&bdf);
        let driver = v.gpu.function.driver.as_ref().map(|d| d.as_str());
        let (reason, message) =
            assess_reason(v.stuck.as_deref(), v.record.as_ref(), driver, &config);
        let health = if reason.is_some() {
            Health::Unhealthy
        } else {
            Health::Healthy
        };
        let name = device_name(&bdf);
        seen.insert(bdf, name.clone());
        devices.insert(
            bdf,
            DeviceHealth {
                bdf,
                device_name: name,
                health,
                message,
                reason,
            },
        );
    }
    for (bdf, name) in seen.iter() {
        devices.entry(*bdf).or_insert_with(|| DeviceHealth {
            bdf: *bdf,
            device_name: name.clone(),
            health: Health::Unhealthy,
            message: "no longer present on the PCI bus (removed, or fell off the bus)".into(),
            reason: Some(UnhealthyReason::Removed),
        });
    }
    HealthReport {
        devices: devices.into_values().collect(),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The latest health report and when it was determined; cheap to clone.
#[derive(Clone)]
pub struct HealthFeed {
    report: watch::Receiver<Arc<HealthReport>>,
    /// Unix seconds of the last completed scan (changed or not).
    last_scan: Arc<AtomicI64>,
}

impl std::fmt::Debug for HealthFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthFeed")
            .field("devices", &self.report.borrow().devices.len())
            .finish_non_exhaustive()
    }
}

impl HealthFeed {
    /// The current report.
    pub fn current(&self) -> Arc<HealthReport> {
        Arc::clone(&self.report.borrow())
    }

    /// Waits until a scan changes the report; an error once the monitor stopped.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.report.changed().await
    }
}

/// Periodic device scans feeding the device gauges and the health stream.
pub struct HealthMonitor;

impl HealthMonitor {
    /// Scans once before returning (so the first stream message is real), then every
    /// `interval` and soon after each prepare/unprepare (`metrics.devices_changed()`),
    /// until `shutdown`.
    pub async fn start(
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> HealthFeed {
        let mut seen = BTreeMap::new();
        let first = scan_once(&engine, &metrics, &mut seen)
            .await
            .unwrap_or_default();
        let last_scan = Arc::new(AtomicI64::new(unix_now()));
        let (tx, rx) = watch::channel(Arc::new(first));
        let stamp = Arc::clone(&last_scan);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                    _ = metrics.changed.notified() => {}
                }
                let Some(report) = scan_once(&engine, &metrics, &mut seen).await else {
                    continue;
                };
                stamp.store(unix_now(), Ordering::Relaxed);
                tx.send_if_modified(|cur| {
                    let changed = **cur != report;
                    if changed {
                        for d in &report.devices {
                            if d.health == Health::Unhealthy {
                                tracing::warn!(gpu = %d.bdf, reason = %d.message, "device unhealthy");
                            }
                        }
                        *cur = Arc::new(report);
                    }
                    changed
                });
            }
        });
        HealthFeed {
            report: rx,
            last_scan,
        }
    }
}

/// One discovery plus health checks; `None` when discovery failed (the last report
/// stays: a failed read of the host is not evidence against the devices).
async fn scan_once(
    engine: &Arc<Engine>,
    metrics: &Arc<Metrics>,
    seen: &mut BTreeMap<Bdf, String>,
) -> Option<HealthReport> {
    let e = Arc::clone(engine);
    let mut seen_copy = std::mem::take(seen);
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        let r = e.discover().map(|(views, _)| {
            let report = scan_bounded(&e, &views, &mut seen_copy);
            let aer = bounded_aer(&e, &views);
            let links = bounded_links(&e, &views);
            (views, report, aer, links)
        });
        (r, seen_copy)
    })
    .await;
    match result {
        Ok((Ok((views, report, aer, links)), back)) => {
            *seen = back;
            let unhealthy = report
                .devices
                .iter()
                .filter(|d| d.health == Health::Unhealthy)
                .count();
            metrics.record_scan(&views, unhealthy, started.elapsed());
            metrics.record_aer(&aer);
            metrics.record_links(&links);
            metrics.record_holder_scan(engine.last_holder_scan());
            Some(report)
        }
        Ok((Err(e), back)) => {
            *seen = back;
            metrics.record_error(&e);
            tracing::warn!(error = %e, "device scan: discovery failed");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "device scan task failed");
            None
        }
    }
}

/// What the DRA socket needs to serve device health.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// The reports.
    pub feed: HealthFeed,
    /// Pool name of the devices (the node name).
    pub pool: String,
    /// The complete list is repeated this often even without changes.
    pub resend: Duration,
}

/// Default for [`HealthConfig::resend`].
pub const DEFAULT_RESEND: Duration = Duration::from_secs(20);

/// The `v1alpha1.DRAResourceHealth` and `v1.DRAResourceHealth` services over a
/// [`HealthFeed`].
#[derive(Clone)]
pub struct HealthService {
    feed: HealthFeed,
    pool: String,
    resend: Duration,
}

impl HealthService {
    /// Streams `feed` for the devices of `pool` (the node name); the list is repeated
    /// every `resend` even without changes.
    pub fn new(feed: HealthFeed, pool: impl Into<String>, resend: Duration) -> Self {
        Self {
            feed,
            pool: pool.into(),
            resend,
        }
    }

    /// The tonic server of `v1alpha1.DRAResourceHealth`.
    pub fn server(self) -> pb::dra_resource_health_server::DraResourceHealthServer<Self> {
        pb::dra_resource_health_server::DraResourceHealthServer::new(self)
    }

    /// The tonic server of `v1.DRAResourceHealth` (Kubernetes 1.37+).
    pub fn server_v1(self) -> pb_v1::dra_resource_health_server::DraResourceHealthServer<Self> {
        pb_v1::dra_resource_health_server::DraResourceHealthServer::new(self)
    }

    /// The stream both versions serve, in v1alpha1 types.
    fn stream(&self) -> ResponseStream {
        tracing::info!("kubelet opened the device health stream");
        let pool = self.pool.clone();
        let resend = self.resend;
        let stream =
            futures::stream::unfold((true, self.feed.clone()), move |(first, mut feed)| {
                let pool = pool.clone();
                async move {
                    if !first {
                        tokio::select! {
                            changed = feed.report.changed() => {
                                // The monitor is gone: the plugin is stopping; end the stream.
                                changed.ok()?;
                            }
                            _ = tokio::time::sleep(resend) => {}
                        }
                    }
                    let report = Arc::clone(&feed.report.borrow_and_update());
                    let at = feed.last_scan.load(Ordering::Relaxed);
                    let msg = to_message(&report, &pool, at, resend);
                    Some((Ok(msg), (false, feed)))
                }
            });
        Box::pin(stream)
    }
}

/// The same message in v1 types (v1 kept v1alpha1's messages and field numbers).
fn to_v1(m: pb::NodeWatchResourcesResponse) -> pb_v1::NodeWatchResourcesResponse {
    pb_v1::NodeWatchResourcesResponse {
        devices: m
            .devices
            .into_iter()
            .map(|d| pb_v1::DeviceHealth {
                device: d.device.map(|id| pb_v1::DeviceIdentifier {
                    pool_name: id.pool_name,
                    device_name: id.device_name,
                }),
                // Same enum numbers in both versions.
                health: d.health,
                last_updated_time: d.last_updated_time,
                health_check_timeout_seconds: d.health_check_timeout_seconds,
                message: d.message,
            })
            .collect(),
    }
}

/// One stream message: the complete device list.
fn to_message(
    report: &HealthReport,
    pool: &str,
    at: i64,
    resend: Duration,
) -> pb::NodeWatchResourcesResponse {
    // Three missed repeats before the kubelet gives up on us.
    let timeout = i64::try_from(resend.as_secs().saturating_mul(3)).unwrap_or(0);
    pb::NodeWatchResourcesResponse {
        devices: report
            .devices
            .iter()
            .map(|d| pb::DeviceHealth {
                device: Some(pb::DeviceIdentifier {
                    pool_name: pool.to_string(),
                    device_name: d.device_name.clone(),
                }),
                health: match d.health {
                    Health::Healthy => pb::HealthStatus::Healthy,
                    Health::Unhealthy => pb::HealthStatus::Unhealthy,
                } as i32,
                last_updated_time: at,
                health_check_timeout_seconds: timeout,
                message: d.message.clone(),
            })
            .collect(),
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<pb::NodeWatchResourcesResponse, Status>> + Send>>;
type ResponseStreamV1 =
    Pin<Box<dyn Stream<Item = Result<pb_v1::NodeWatchResourcesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::dra_resource_health_server::DraResourceHealth for HealthService {
    type NodeWatchResourcesStream = ResponseStream;

    async fn node_watch_resources(
        &self,
        _request: Request<pb::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        Ok(Response::new(self.stream()))
    }
}

#[tonic::async_trait]
impl pb_v1::dra_resource_health_server::DraResourceHealth for HealthService {
    type NodeWatchResourcesStream = ResponseStreamV1;

    async fn node_watch_resources(
        &self,
        _request: Request<pb_v1::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        use futures::StreamExt;
        Ok(Response::new(Box::pin(self.stream().map(|m| m.map(to_v1)))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aer_counts_come_from_the_total_lines_of_the_kernels_files() {
        let correctable = "RxErr 0\nBadTLP 3\nBadDLLP 0\nRollover 0\nTimeout 0\n\
                           NonFatalErr 0\nCorrIntErr 0\nHeaderOF 0\nTOTAL_ERR_COR 3\n";
        assert_eq!(parse_aer_total(correctable), Some(3));
        assert_eq!(parse_aer_total("garbage\nTOTAL_ERR_FATAL x\n"), None);
        assert_eq!(parse_aer_total(""), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let bdf: Bdf = "0000:65:00.0".parse().expect("bdf");
        let dev = dir.path().join("sys/bus/pci/devices/0000:65:00.0");
        std::fs::create_dir_all(&dev).expect("device dir");
        let root = HostRoot::open(dir.path()).expect("root");
        assert_eq!(read_aer(&root, &bdf), None, "no AER attributes: no counts");
        std::fs::write(dev.join("aer_dev_correctable"), correctable).expect("write");
        std::fs::write(dev.join("aer_dev_fatal"), "DLP 0\nTOTAL_ERR_FATAL 1\n").expect("write");
        std::fs::write(dev.join("aer_dev_nonfatal"), "TOTAL_ERR_NONFATAL 0\n").expect("write");
        assert_eq!(
            read_aer(&root, &bdf),
            Some(AerCounts {
                correctable: 3,
                nonfatal: 0,
                fatal: 1
            })
        );
        let m = Metrics::new();
        m.record_aer(&[(
            bdf,
            AerCounts {
                correctable: 3,
                nonfatal: 0,
                fatal: 1,
            },
        )]);
        let text = m.encode();
        for line in [
            "vfio_gpu_dra_gpu_aer_errors{gpu=\"0000:65:00.0\",severity=\"correctable\"} 3",
            "vfio_gpu_dra_gpu_aer_errors{gpu=\"0000:65:00.0\",severity=\"fatal\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        m.record_aer(&[]);
        assert!(
            !m.encode().contains("gpu_aer_errors{"),
            "gone with the device"
        );
    }

    /// The link's speed and width as sysfs spells them, for the gauges; a
    /// link that is down (`Unknown`) or absent gives no reading.
    #[test]
    fn link_readings_come_from_sysfs_and_reach_the_gauges() {
        assert_eq!(parse_link_speed("16.0 GT/s PCIe\n"), Some(16.0));
        assert_eq!(parse_link_speed("2.5 GT/s PCIe"), Some(2.5));
        assert_eq!(parse_link_speed("Unknown"), None);
        assert_eq!(parse_link_speed("Unknown speed"), None);
        assert_eq!(parse_link_speed("-1 GT/s"), None);
        assert_eq!(parse_link_speed("NaN GT/s"), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let bdf: Bdf = "0000:65:00.0".parse().expect("bdf");
        let dev = dir.path().join("sys/bus/pci/devices/0000:65:00.0");
        std::fs::create_dir_all(&dev).expect("device dir");
        let root = HostRoot::open(dir.path()).expect("root");
        assert_eq!(read_link(&root, &bdf), None, "no link attributes");
        for (attr, value) in [
            ("current_link_speed", "2.5 GT/s PCIe\n"),
            ("max_link_speed", "32.0 GT/s PCIe\n"),
            ("current_link_width", "8\n"),
            ("max_link_width", "16\n"),
        ] {
            std::fs::write(dev.join(attr), value).expect("write");
        }
        let link = read_link(&root, &bdf).expect("a link");
        assert_eq!(
            link,
            LinkReading {
                current_gts: 2.5,
                max_gts: 32.0,
                current_width: 8,
                max_width: 16
            }
        );
        let m = Metrics::new();
        m.record_links(&[(bdf, link)]);
        let text = m.encode();
        for line in [
            "vfio_gpu_dra_gpu_link_speed_gts{gpu=\"0000:65:00.0\",of=\"current\"} 2.5",
            "vfio_gpu_dra_gpu_link_speed_gts{gpu=\"0000:65:00.0\",of=\"max\"} 32.0",
            "vfio_gpu_dra_gpu_link_width{gpu=\"0000:65:00.0\",of=\"current\"} 8",
            "vfio_gpu_dra_gpu_link_width{gpu=\"0000:65:00.0\",of=\"max\"} 16",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        std::fs::write(dev.join("current_link_speed"), "Unknown\n").expect("write");
        assert_eq!(read_link(&root, &bdf), None, "a link that is down");
        m.record_links(&[]);
        assert!(
            !m.encode().contains("gpu_link_width{"),
            "gone with the device"
        );
    }

    fn record(state: OpState, vfio: Option<&str>) -> GpuRecord {
        serde_json::from_value(serde_json::json!({
            "state": state,
            "vfioDriver": vfio,
            "bootId": "b",
        }))
        .expect("record")
    }

    #[test]
    fn healthy_when_the_host_matches_the_ledger() {
        let rec = record(OpState::Configured, Some("vfio-pci"));
        let (h, m) = assess(
            None,
            Some(&rec),
            Some("vfio-pci"),
            &ConfigRead::Vendor(0x10de),
        );
        assert_eq!((h, m.as_str()), (Health::Healthy, ""));
        // Not ours, on its host driver.
        assert_eq!(
            assess(None, None, Some("nvidia"), &ConfigRead::Skipped).0,
            Health::Healthy
        );
        // In flight and not stuck: passing through "no driver" is normal.
        let rec = record(OpState::Releasing, Some("vfio-pci"));
        assert_eq!(
            assess(None, Some(&rec), None, &ConfigRead::Skipped).0,
            Health::Healthy
        );
    }

    #[test]
    fn unhealthy_reasons() {
        let rec = record(OpState::Configured, Some("vfio-pci"));
        let (h, m) = assess(None, Some(&rec), Some("nvidia"), &ConfigRead::Skipped);
        assert_eq!(h, Health::Unhealthy);
        assert!(
            m.contains("bound to nvidia") && m.contains("vfio-pci"),
            "{m}"
        );
        let (h, m) = assess(
            Some("unbind"),
            Some(&rec),
            Some("vfio-pci"),
            &ConfigRead::Skipped,
        );
        assert_eq!(h, Health::Unhealthy);
        assert!(m.contains("stuck: unbind"), "{m}");
        let (h, m) = assess(None, None, Some("nvidia"), &ConfigRead::Vendor(0xffff));
        assert_eq!(h, Health::Unhealthy);
        assert!(m.contains("0xffff"), "{m}");
        let (h, m) = assess(None, None, None, &ConfigRead::Skipped);
        assert_eq!(h, Health::Unhealthy);
        assert!(m.contains("no driver"), "{m}");
    }

    /// Every combination of what the scan sees: unhealthy exactly when there
    /// is something to say, and the reason code is the first problem's (a
    /// device that does not answer explains the rest).
    #[test]
    fn the_reason_code_is_the_first_problem_and_only_when_unhealthy() {
        let configs = [
            (ConfigRead::Vendor(0x10de), None),
            (ConfigRead::Skipped, None),
            (
                ConfigRead::Vendor(0xffff),
                Some(UnhealthyReason::NotResponding),
            ),
            (
                ConfigRead::Failed("EIO".into()),
                Some(UnhealthyReason::ConfigUnreadable),
            ),
            (
                ConfigRead::TimedOut("reset".into()),
                Some(UnhealthyReason::ConfigReadTimedOut),
            ),
        ];
        let states = [
            OpState::Configuring,
            OpState::Configured,
            OpState::Releasing,
            OpState::Prebound,
            OpState::ReleasedUnbound,
        ];
        let mut records: Vec<Option<GpuRecord>> = vec![None];
        records.extend(states.iter().map(|s| Some(record(*s, Some("vfio-pci")))));
        for (config, config_reason) in &configs {
            for stuck in [None, Some("unbind")] {
                for rec in &records {
                    for driver in [None, Some("vfio-pci"), Some("nvidia")] {
                        let (reason, message) = assess_reason(stuck, rec.as_ref(), driver, config);
                        let (health, _) = assess(stuck, rec.as_ref(), driver, config);
                        assert_eq!(reason.is_some(), !message.is_empty(), "{message}");
                        assert_eq!(reason.is_some(), health == Health::Unhealthy);
                        let held = rec.as_ref().is_some_and(|r| {
                            matches!(r.state, OpState::Configured | OpState::Prebound)
                        });
                        let want = config_reason
                            .or(stuck.map(|_| UnhealthyReason::OperationStuck))
                            .or((held && driver != Some("vfio-pci"))
                                .then_some(UnhealthyReason::DriverMismatch))
                            .or((rec.is_none() && driver.is_none())
                                .then_some(UnhealthyReason::NoDriver));
                        assert_eq!(
                            reason,
                            want,
                            "{config:?} stuck={stuck:?} {:?} {driver:?}",
                            rec.as_ref().map(|r| r.state)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_vanished_gpu_is_reported_removed() {
        let views: Vec<GpuView> = Vec::new();
        let bdf: Bdf = "0000:65:00.0".parse().expect("bdf");
        let mut seen = BTreeMap::from([(bdf, device_name(&bdf))]);
        let report = scan_with(&views, &mut seen, |_| ConfigRead::Skipped);
        assert_eq!(report.devices.len(), 1);
        assert_eq!(report.devices[0].reason, Some(UnhealthyReason::Removed));
        assert_eq!(report.devices[0].health, Health::Unhealthy);
    }

    #[test]
    fn config_space_vendor_is_read_little_endian() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("config");
        std::fs::write(&p, [0xde, 0x10, 0x30, 0x23]).expect("write");
        assert_eq!(read_vendor(&p), ConfigRead::Vendor(0x10de));
        std::fs::write(&p, [0xff, 0xff]).expect("write");
        assert_eq!(read_vendor(&p), ConfigRead::Vendor(0xffff));
        std::fs::write(&p, [0x01]).expect("write");
        assert!(matches!(read_vendor(&p), ConfigRead::Failed(_)));
        assert_eq!(read_vendor(&dir.path().join("none")), ConfigRead::Skipped);
    }

    #[test]
    fn messages_fit_the_kubelet_limit() {
        let long = "é".repeat(MAX_MESSAGE);
        let t = truncate(long);
        assert!(t.len() <= MAX_MESSAGE && t.is_char_boundary(t.len()));
    }
}
