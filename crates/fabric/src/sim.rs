//! A simulated Fabric Manager: partition tables, overlap rejection, both
//! return-code dialects, the start-up window, `--restart` replay, faults and
//! blocking. [`SimState`] is the pure, serialisable state machine (the
//! `fake-nvfm` cdylib keeps it in a JSON file); [`SimFabricManager`] puts a
//! [`FabricManager`] on top of it for in-process tests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::api::{self, FabricManager, Session};
use crate::error::{Call, FmCode, FmError};
use crate::topology::{Platform, Topology};
use crate::types::{
    Activated, Deactivated, Endpoint, ModuleId, NvlinkFailedDevices, Partition, PartitionGpu,
    PartitionId, PartitionList, UnsupportedPartition,
};

/// How long FM waits for `fmSetActivatedFabricPartitions` after a
/// `--restart` before it aborts the restart and exits (reference §8).
pub const RESTART_REPLAY_WINDOW: Duration = Duration::from_secs(60);

/// A millisecond clock the simulator reads; injectable for tests.
pub trait Clock: Send + Sync {
    /// Milliseconds since an arbitrary, fixed epoch.
    fn now_ms(&self) -> u64;
}

/// Wall clock: milliseconds since the Unix epoch (survives across the
/// processes that share a `fake-nvfm` state file).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock at `ms`.
    pub fn at(ms: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(ms)))
    }
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Which return codes the simulated FM uses for the idempotent cases
/// (reference §4 "Two idempotency dialects").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Dialect {
    /// The guide: activate active/overlapping → `IN_USE` (−7); deactivate
    /// inactive → `UNINITIALIZED` (−4); initialising → `NOT_CONFIGURED` (−8).
    #[default]
    Documented,
    /// Newer FM (inferred): −17, −18, and `NOT_READY` (−22).
    Newer,
}

impl Dialect {
    fn in_use(self) -> FmCode {
        match self {
            Dialect::Documented => FmCode::InUse,
            Dialect::Newer => FmCode::PartitionIdInUse,
        }
    }
    fn not_in_use(self) -> FmCode {
        match self {
            Dialect::Documented => FmCode::Uninitialized,
            Dialect::Newer => FmCode::PartitionIdNotInUse,
        }
    }
    fn not_ready(self) -> FmCode {
        match self {
            Dialect::Documented => FmCode::NotConfigured,
            Dialect::Newer => FmCode::NotReady,
        }
    }
}

/// FM's life-cycle phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "phase")]
pub enum Phase {
    /// Serving requests.
    #[default]
    Running,
    /// Initialising: every call but connect gets the dialect's not-ready code
    /// until `until_ms`.
    Starting {
        /// When FM becomes ready.
        until_ms: u64,
    },
    /// Restarted with `--restart`: every call but connect and
    /// `fmSetActivatedFabricPartitions` is rejected until the replay;
    /// no replay by `deadline_ms` → FM exits.
    RestartPending {
        /// End of the replay window.
        deadline_ms: u64,
    },
    /// FM is not running: connect fails with `CONNECTION_NOT_VALID`.
    Exited,
}

/// What an injected fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FaultAction {
    /// Return this raw `fmReturn_t` (may be outside 0…−29) without acting;
    /// 0 lets the call proceed normally.
    Return(i32),
    /// Sleep this many milliseconds, then act normally.
    SleepMs(u64),
}

/// A fault injected into one SDK call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// The call it hits.
    pub call: Call,
    /// What it does.
    pub action: FaultAction,
    /// How many calls it hits (`None`: every call until cleared).
    pub times: Option<u32>,
}

/// One simulated partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimPartition {
    /// FM partition id.
    pub id: PartitionId,
    /// Members.
    pub modules: Vec<ModuleId>,
}

/// What a connect carried, as the fake/simulator saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectRecord {
    /// The struct's `version` word.
    pub version: u32,
    /// `addressInfo`.
    pub address_info: String,
    /// `addressType` (absent in v1).
    pub address_type: Option<i32>,
    /// `addressIsUnixSocket`.
    pub address_is_unix_socket: u32,
    /// `timeoutMs`.
    pub timeout_ms: u32,
}

/// One call the simulated FM answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    /// The call.
    pub call: Call,
    /// Its partition argument(s).
    #[serde(default)]
    pub partitions: Vec<PartitionId>,
    /// The raw code returned.
    pub code: i32,
}

/// The simulated FM's whole state (serialisable, clock-free: callers pass
/// `now_ms`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimState {
    /// The static partition table.
    pub partitions: Vec<SimPartition>,
    /// `nvlinkLineRateMBps` reported for multi-GPU partitions.
    #[serde(default)]
    pub line_rate_mbps: u32,
    /// `maxNumPartitions`.
    #[serde(default)]
    pub max_num_partitions: u32,
    /// Active partitions.
    #[serde(default)]
    pub active: BTreeSet<PartitionId>,
    /// Return-code dialect.
    #[serde(default)]
    pub dialect: Dialect,
    /// Life-cycle phase.
    #[serde(default)]
    pub phase: Phase,
    /// The code calls get while a replay is pending (undocumented, §13.12:
    /// −8 or −22; default −8).
    #[serde(default = "default_restart_reject")]
    pub restart_reject: FmCode,
    /// Connect struct versions accepted (1, 2); default both.
    #[serde(default = "default_connect_versions")]
    pub connect_versions: Vec<u32>,
    /// Injected faults, first match wins.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// `fake-nvfm` only: report `numPartitions = 65` (an ABI violation).
    #[serde(default)]
    pub corrupt_partition_count: bool,
    /// Connects seen.
    #[serde(default)]
    pub connects: Vec<ConnectRecord>,
    /// Calls answered.
    #[serde(default)]
    pub log: Vec<LogEntry>,
}

fn default_restart_reject() -> FmCode {
    FmCode::NotConfigured
}

fn default_connect_versions() -> Vec<u32> {
    vec![1, 2]
}

type Answer<T> = Result<T, i32>;

fn code<T>(c: FmCode) -> Answer<T> {
    Err(c.raw())
}

impl SimState {
    /// A running FM with `platform`'s table, nothing active.
    pub fn new(platform: Platform) -> SimState {
        let line_rate_mbps = match platform {
            Platform::HgxH100 => 26_562,
            Platform::HgxB200 => 53_125,
        };
        SimState::from_topology(&platform.topology(), line_rate_mbps)
    }

    /// A running FM with this table.
    pub fn from_topology(t: &Topology, line_rate_mbps: u32) -> SimState {
        SimState {
            partitions: t
                .partitions()
                .iter()
                .map(|p| SimPartition {
                    id: p.id,
                    modules: p.modules.iter().copied().collect(),
                })
                .collect(),
            line_rate_mbps,
            max_num_partitions: 64,
            active: BTreeSet::new(),
            dialect: Dialect::Documented,
            phase: Phase::Running,
            restart_reject: default_restart_reject(),
            connect_versions: default_connect_versions(),
            faults: Vec::new(),
            corrupt_partition_count: false,
            connects: Vec::new(),
            log: Vec::new(),
        }
    }

    /// FM (re)started normally: all partitions inactive, not ready for `window`.
    pub fn start(&mut self, now_ms: u64, window: Duration) {
        self.active.clear();
        self.phase = if window.is_zero() {
            Phase::Running
        } else {
            Phase::Starting {
                until_ms: now_ms.saturating_add(ms(window)),
            }
        };
    }

    /// FM restarted with `--restart`: the replay window opens; the active set
    /// is unknown to FM until the replay.
    pub fn restart_resilient(&mut self, now_ms: u64) {
        self.active.clear();
        self.phase = Phase::RestartPending {
            deadline_ms: now_ms.saturating_add(ms(RESTART_REPLAY_WINDOW)),
        };
    }

    /// FM stopped.
    pub fn stop(&mut self) {
        self.phase = Phase::Exited;
    }

    /// Takes the first fault matching `call`, counting it down.
    pub fn take_fault(&mut self, call: Call) -> Option<FaultAction> {
        let i = self.faults.iter().position(|f| f.call == call)?;
        let f = self.faults.get_mut(i)?;
        let action = f.action;
        if let Some(n) = f.times.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.faults.remove(i);
            }
        }
        Some(action)
    }

    /// Advances time-driven phases.
    fn tick(&mut self, now_ms: u64) {
        match self.phase {
            Phase::Starting { until_ms } if now_ms >= until_ms => self.phase = Phase::Running,
            Phase::RestartPending { deadline_ms } if now_ms > deadline_ms => {
                self.phase = Phase::Exited;
            }
            _ => {}
        }
    }

    /// Phase gate for a call (connect and the replay have their own).
    fn gate(&mut self, now_ms: u64) -> Answer<()> {
        self.tick(now_ms);
        match self.phase {
            Phase::Running => Ok(()),
            Phase::Starting { .. } => code(self.dialect.not_ready()),
            Phase::RestartPending { .. } => code(self.restart_reject),
            Phase::Exited => code(FmCode::ConnectionNotValid),
        }
    }

    fn record(&mut self, call: Call, partitions: Vec<PartitionId>, raw: i32) {
        self.log.push(LogEntry {
            call,
            partitions,
            code: raw,
        });
    }

    fn logged<T>(&mut self, call: Call, parts: Vec<PartitionId>, r: Answer<T>) -> Answer<T> {
        let raw = r.as_ref().err().copied().unwrap_or(0);
        self.record(call, parts, raw);
        r
    }

    /// `fmConnect`.
    pub fn connect(&mut self, now_ms: u64, rec: ConnectRecord) -> Answer<()> {
        self.tick(now_ms);
        let ver = rec.version >> 24;
        self.connects.push(rec);
        let r = if self.phase == Phase::Exited {
            code(FmCode::ConnectionNotValid)
        } else if !self.connect_versions.contains(&ver) {
            code(FmCode::VersionMismatch)
        } else {
            Ok(())
        };
        self.logged(Call::Connect, Vec::new(), r)
    }

    /// `fmGetSupportedFabricPartitions`.
    pub fn get_supported(&mut self, now_ms: u64) -> Answer<PartitionList> {
        let r = self.gate(now_ms).map(|()| self.list());
        self.logged(Call::GetSupportedPartitions, Vec::new(), r)
    }

    /// The current list, regardless of phase.
    pub fn list(&self) -> PartitionList {
        PartitionList {
            partitions: self
                .partitions
                .iter()
                .map(|p| Partition {
                    id: p.id,
                    is_active: self.active.contains(&p.id),
                    gpus: p
                        .modules
                        .iter()
                        .map(|&m| {
                            let links = if p.modules.len() > 1 { 18 } else { 0 };
                            PartitionGpu {
                                physical_id: m,
                                uuid: String::new(),
                                pci_bus_id: "00000000:00:00.0".into(),
                                num_nvlinks_available: links,
                                max_num_nvlinks: links,
                                nvlink_line_rate_mbps: self.line_rate_mbps,
                            }
                        })
                        .collect(),
                })
                .collect(),
            max_num_partitions: self.max_num_partitions,
        }
    }

    fn find(&self, id: PartitionId) -> Option<&SimPartition> {
        self.partitions.iter().find(|p| p.id == id)
    }

    /// Active partitions sharing a GPU with `id`.
    fn overlap(&self, id: PartitionId, active: &BTreeSet<PartitionId>) -> bool {
        let Some(me) = self.find(id) else {
            return false;
        };
        active.iter().filter(|a| **a != id).any(|a| {
            self.find(*a)
                .is_some_and(|o| o.modules.iter().any(|m| me.modules.contains(m)))
        })
    }

    /// `fmActivateFabricPartition`.
    pub fn activate(&mut self, now_ms: u64, id: PartitionId) -> Answer<()> {
        let r = self.gate(now_ms).and_then(|()| {
            if self.find(id).is_none() {
                code(FmCode::BadParam)
            } else if self.active.contains(&id) || self.overlap(id, &self.active) {
                code(self.dialect.in_use())
            } else {
                self.active.insert(id);
                Ok(())
            }
        });
        self.logged(Call::Activate, vec![id], r)
    }

    /// `fmDeactivateFabricPartition`.
    pub fn deactivate(&mut self, now_ms: u64, id: PartitionId) -> Answer<()> {
        let r = self.gate(now_ms).and_then(|()| {
            if self.find(id).is_none() {
                code(FmCode::BadParam)
            } else if !self.active.remove(&id) {
                code(self.dialect.not_in_use())
            } else {
                Ok(())
            }
        });
        self.logged(Call::Deactivate, vec![id], r)
    }

    /// `fmSetActivatedFabricPartitions`. Accepted only while a replay is
    /// pending (its effect outside a restart is undocumented, §13.8: the
    /// simulator is strict and answers `NOT_SUPPORTED` when running, the
    /// not-ready code while starting). Unknown or overlapping ids → `BADPARAM`.
    pub fn set_activated(&mut self, now_ms: u64, ids: &[PartitionId]) -> Answer<()> {
        self.tick(now_ms);
        let r = match self.phase {
            Phase::RestartPending { .. } => {
                let set: BTreeSet<PartitionId> = ids.iter().copied().collect();
                if set.len() != ids.len()
                    || ids.iter().any(|id| self.find(*id).is_none())
                    || ids.iter().any(|id| self.overlap(*id, &set))
                {
                    code(FmCode::BadParam)
                } else {
                    self.active = set;
                    self.phase = Phase::Running;
                    Ok(())
                }
            }
            Phase::Running => code(FmCode::NotSupported),
            Phase::Starting { .. } => code(self.dialect.not_ready()),
            Phase::Exited => code(FmCode::ConnectionNotValid),
        };
        self.logged(Call::SetActivatedPartitions, ids.to_vec(), r)
    }

    /// `fmGetNvlinkFailedDevices`: empty (H100+); `NOT_SUPPORTED` while a
    /// replay is pending.
    pub fn nvlink_failed(&mut self, now_ms: u64) -> Answer<NvlinkFailedDevices> {
        self.tick(now_ms);
        let r = if matches!(self.phase, Phase::RestartPending { .. }) {
            code(FmCode::NotSupported)
        } else {
            self.gate(now_ms).map(|()| NvlinkFailedDevices::default())
        };
        self.logged(Call::GetNvlinkFailedDevices, Vec::new(), r)
    }

    /// `fmGetUnsupportedFabricPartitions`: empty (H100+).
    pub fn unsupported(&mut self, now_ms: u64) -> Answer<Vec<UnsupportedPartition>> {
        let r = self.gate(now_ms).map(|()| Vec::new());
        self.logged(Call::GetUnsupportedPartitions, Vec::new(), r)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct Gates {
    held: Mutex<BTreeMap<Call, u32>>,
    cv: Condvar,
}

/// An in-process simulated Fabric Manager.
pub struct SimFabricManager {
    state: Mutex<SimState>,
    clock: Arc<dyn Clock>,
    endpoint: Endpoint,
    gates: Gates,
}

impl SimFabricManager {
    /// A running FM with `platform`'s table on the wall clock.
    pub fn new(platform: Platform) -> Self {
        Self::with_state(SimState::new(platform), Arc::new(SystemClock))
    }

    /// A simulator over `state` and `clock`.
    pub fn with_state(state: SimState, clock: Arc<dyn Clock>) -> Self {
        SimFabricManager {
            state: Mutex::new(state),
            clock,
            endpoint: Endpoint::default_unix(),
            gates: Gates::default(),
        }
    }

    /// Changes the endpoint recorded by each per-operation connect.
    pub fn set_endpoint(&mut self, endpoint: Endpoint) {
        self.endpoint = endpoint;
    }

    /// Reads or changes the state (faults, dialect, active set, ...).
    pub fn with<T>(&self, f: impl FnOnce(&mut SimState) -> T) -> T {
        f(&mut lock(&self.state))
    }

    /// A snapshot of the state.
    pub fn state(&self) -> SimState {
        lock(&self.state).clone()
    }

    /// The clock's now.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Makes every `call` block until [`SimFabricManager::release`].
    pub fn hold(&self, call: Call) {
        *lock(&self.gates.held).entry(call).or_insert(0) += 1;
    }

    /// Lets held `call`s proceed.
    pub fn release(&self, call: Call) {
        lock(&self.gates.held).remove(&call);
        self.gates.cv.notify_all();
    }

    fn wait_gate(&self, call: Call) {
        let mut held = lock(&self.gates.held);
        while held.contains_key(&call) {
            held = self
                .gates
                .cv
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Runs one SDK call: gate, fault, then the state machine.
    fn run<T>(
        &self,
        call: Call,
        f: impl FnOnce(&mut SimState, u64) -> Answer<T>,
    ) -> Result<T, FmError> {
        self.wait_gate(call);
        let fault = lock(&self.state).take_fault(call);
        match fault {
            Some(FaultAction::Return(raw)) if raw != 0 => {
                lock(&self.state).record(call, Vec::new(), raw);
                api::check(call, raw)?;
            }
            Some(FaultAction::SleepMs(ms)) => std::thread::sleep(Duration::from_millis(ms)),
            Some(FaultAction::Return(_)) | None => {}
        }
        let now = self.clock.now_ms();
        let r = f(&mut lock(&self.state), now);
        r.map_err(|raw| match api::check(call, raw) {
            Err(e) => e,
            Ok(()) => FmError::UnknownCode { call, raw },
        })
    }

    fn session(&self) -> Result<SimSession<'_>, FmError> {
        let params = self.endpoint.connect_params_v2(1000)?;
        let rec = ConnectRecord {
            version: params.version,
            address_info: self.endpoint.address_info(),
            address_type: Some(params.address_type),
            address_is_unix_socket: params.address_is_unix_socket,
            timeout_ms: params.timeout_ms,
        };
        self.run(Call::Connect, |s, now| s.connect(now, rec))?;
        Ok(SimSession { sim: self })
    }
}

struct SimSession<'a> {
    sim: &'a SimFabricManager,
}

impl Session for SimSession<'_> {
    fn list(&mut self) -> Result<PartitionList, FmError> {
        self.sim
            .run(Call::GetSupportedPartitions, |s, now| s.get_supported(now))
    }
    fn activate_raw(&mut self, id: PartitionId) -> Result<(), FmError> {
        self.sim.run(Call::Activate, |s, now| s.activate(now, id))
    }
    fn deactivate_raw(&mut self, id: PartitionId) -> Result<(), FmError> {
        self.sim
            .run(Call::Deactivate, |s, now| s.deactivate(now, id))
    }
}

impl FabricManager for SimFabricManager {
    fn get_supported_partitions(&self) -> Result<PartitionList, FmError> {
        self.session()?.list()
    }
    fn activate(&self, id: PartitionId) -> Result<Activated, FmError> {
        api::activate_normalised(&mut self.session()?, id)
    }
    fn deactivate(&self, id: PartitionId) -> Result<Deactivated, FmError> {
        api::deactivate_normalised(&mut self.session()?, id)
    }
    fn set_activated_partitions(&self, ids: &[PartitionId]) -> Result<(), FmError> {
        self.session()?;
        self.run(Call::SetActivatedPartitions, |s, now| {
            s.set_activated(now, ids)
        })
    }
    fn get_nvlink_failed_devices(&self) -> Result<NvlinkFailedDevices, FmError> {
        self.session()?;
        self.run(Call::GetNvlinkFailedDevices, |s, now| s.nvlink_failed(now))
    }
    fn get_unsupported_partitions(&self) -> Result<Vec<UnsupportedPartition>, FmError> {
        self.session()?;
        self.run(Call::GetUnsupportedPartitions, |s, now| s.unsupported(now))
    }
}
