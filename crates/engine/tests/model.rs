#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! Model-based property test: random sequences of prepares, unprepares,
//! reconciles, crashes with a restart, a second process reconciling, admin
//! intent edits through every source and kernel faults run against a small
//! simulated host, and after every step the invariants below are checked
//! against the simulated sysfs and a model of the admin's intent, never
//! against the engine's own view (I3 compares the two).
//!
//! Host: A = 0000:65:00.0 (nvidia) + 0000:65:00.1 (snd_hda_intel), group 11;
//! B = 0000:66:00.0 (nvidia), group 12; C = 0000:67:00.0 on vfio-pci at boot
//! by `options vfio-pci ids=10de:2330` in modprobe.d, group 13.
//!
//! - I1: no engine operation moves a function off vfio while the admin's
//!   intent keeps its GPU there (the decision is taken when the release or
//!   rollback is carried out, so it is checked per operation).
//! - I2: after an operation returns, no function it wrote is driverless
//!   unless a write to it is still blocked or the kernel refused both ways
//!   out (vfio-pci and the host driver) or a probe bound nothing; at rest,
//!   none is.
//! - I3: at rest the ledger on disk agrees with sysfs and with the claims the
//!   kubelet holds (no Configuring/Releasing left; Configured and Prebound
//!   mean on vfio); no override is left behind without a record.
//! - I4: at rest, a second reconcile makes no host write.
//! - I5: a GPU moved by us and released while no keep or pin intent ever
//!   applied is back on its original drivers at rest.
//! - I6: an unprepare that reports success did what its action says, and
//!   what the intent asks (original drivers; under keep, vfio stays vfio).
//! - I7: a prepare that reports success leaves the whole group on vfio.
//! - I8: the drivers an `Outcome` reports are the ones sysfs shows.
//! - I9: no process writes to a device while a write to it is blocked.
//! - I10: a GPU a tenant released goes to the next tenant only after every
//!   function of it was reset (and verified: a failed reset, verification
//!   or degraded link quarantines it, and a quarantined GPU goes to nobody
//!   until the admin's reset).
//!
//! How the world is modelled (see [`Op`]): serve is one long-lived engine
//! with the state lock per operation (as with a pod UID), the policy file
//! set. A crash opens an engine with `crash_after_step` (`CrashMode::Return`)
//! for the one operation, then a new engine reconciles as serve does at
//! start. A second process, and an operation whose budget runs out (75 ms,
//! with vfio-pci's `remove()` taking 150 ms), run on short-lived engines on
//! the same state, so what they leave stuck is known to others only through
//! the ledger. Faults are the sim's: failing binds, a probe binding nothing,
//! an unbind blocked until released (past a 300 ms deadline), slow removes,
//! a failing reset, a reset after which the link trains back degraded;
//! plus the disk: a newer-format ledger written by "another version", and
//! an unwritable ledger (a directory where its temporary file goes: ENOSPC
//! in effect). Intent is written to the host's files; the model evaluates it
//! itself (an `ids=` on the command line wins over modprobe.d).
//!
//! "At rest" is reached by `Settle` and at the end of every case: faults
//! cleared, blocked writes let go, the ledger made writable, a reconcile, the
//! kubelet's retry of every unprepare (or failed prepare) not yet answered
//! with success, and another reconcile.
//!
//! CI runs `MODEL_CASES` cases (default 64, about 30 s in debug) from a fixed
//! seed. A long search: `MODEL_SEED=random MODEL_CASES=3000 cargo test -p
//! vfio-gpu-engine --test model engine_keeps`.
//! `MODEL_TRACE=1` prints every step with its host writes and the ledger.
//! `MODEL_SKIP=I1,I9,LedgerNewer,vfio: false` leaves invariants unchecked and
//! operations whose debug text contains an entry out, to look past a known
//! defect. Counterexamples found are pinned as the named tests at the end.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use vfio_gpu_engine::kernel::{Kernel, SysfsWrite, WriteKind};
use vfio_gpu_engine::ledger::OpState;
use vfio_gpu_engine::sim::{BlockHandle, Fault, FaultAction, SimKernel, errno};
use vfio_gpu_engine::{Action, Engine, EngineConfig, EngineError, Holder, Outcome, StateLockMode};
use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};
use vfio_gpu_host::{Bdf, GpuSelector, HostRoot, PciFunction};
use vfio_gpu_intent::Policy;

/// Functions: A, A's HDA, B, C.
const FNS: [&str; 4] = [
    "0000:65:00.0",
    "0000:65:00.1",
    "0000:66:00.0",
    "0000:67:00.0",
];
/// Where each function was at boot.
const ORIGIN: [&str; 4] = ["nvidia", "snd_hda_intel", "nvidia", "vfio-pci"];
/// vendor:device of each function (the ids= entries that name it).
const IDS: [&str; 4] = ["10de:26b1", "10de:22ba", "10de:20b2", "10de:2330"];
/// GPUs as lists of function indices; the first is the GPU function.
const GPUS: [&[usize]; 3] = [&[0, 1], &[2], &[3]];

fn fbdf(f: usize) -> Bdf {
    common::bdf(FNS[f])
}

/// The host driver an admin pins a function to (C's, which boots on vfio: nvidia).
fn host_driver(f: usize) -> &'static str {
    if ORIGIN[f] == "vfio-pci" {
        "nvidia"
    } else {
        ORIGIN[f]
    }
}

fn claim(c: u8) -> Holder {
    Holder::Claim {
        uid: format!("u{c}"),
        namespace: "vms".into(),
        name: format!("claim-u{c}"),
    }
}

/// A driverctl setting for one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dc {
    /// `vfio-pci`: keep on vfio.
    Vfio,
    /// The function's host driver: pinned there.
    Host,
    /// `none`: pinned unbound.
    Unbound,
}

/// One step of a sequence.
#[derive(Clone, Debug)]
pub enum Op {
    /// The kubelet prepares GPU `gpu` for claim `u<claim>`.
    Configure { gpu: usize, claim: u8 },
    /// The kubelet unprepares it.
    Unconfigure { gpu: usize, claim: u8 },
    /// serve's periodic reconcile.
    Reconcile,
    /// The operation crashes after `step` mutations; serve restarts (a new
    /// engine on the same state) and reconciles. Run without the crash while
    /// a write is blocked: a process in D state does not exit.
    Crash { step: u64, op: Box<Op> },
    /// A second process (the CLI, the other instance of a rolling update)
    /// reconciles the same state directory.
    OtherReconcile,
    /// The operation runs with a 75 ms budget, and vfio-pci's `remove()`
    /// takes 150 ms during it: the budget runs out mid-operation.
    Tight(Box<Op>),
    /// `/etc/driverctl.d/pci-<BDF>` written (`Some`) or removed.
    Driverctl { f: usize, to: Option<Dc> },
    /// An id added to or removed from `options vfio-pci ids=` in modprobe.d.
    Modprobe { f: usize, on: bool },
    /// An id added to or removed from `vfio-pci.ids=` on the command line.
    Cmdline { f: usize, on: bool },
    /// The admin writes `driver_override` (vfio-pci or the host driver) of a
    /// function that has none, or clears the one they wrote.
    AdminOverride { f: usize, to: Option<bool> },
    /// The GPU added to or removed from the policy's `[keep-on-vfio]`.
    Policy { gpu: usize, on: bool },
    /// The next `times` binds of function `f` to vfio-pci (or to its host
    /// driver) fail with `errno`.
    BindFails {
        f: usize,
        vfio: bool,
        times: usize,
        errno: i32,
    },
    /// The next `drivers_probe` of `f` succeeds and binds nothing.
    ProbeBindsNothing { f: usize },
    /// The next unbind of `f` blocks in `remove()` until `Unblock`.
    UnbindBlocks { f: usize },
    /// Every blocked write goes on.
    Unblock,
    /// vfio-pci's `remove()` takes 150 ms, longer than a tight budget (or no
    /// time again).
    SlowRemove(bool),
    /// Another version writes a newer ledger format (or is rolled back and
    /// the previous file comes back).
    LedgerNewer(bool),
    /// The ledger cannot be written (disk full), or can again.
    LedgerFull(bool),
    /// One source of intent cannot be read (EIO on every read under it:
    /// [`INTENT_SOURCES`]), or (`None`) every source reads again.
    IntentUnreadable(Option<usize>),
    /// Reach rest and check the at-rest invariants mid-sequence.
    Settle,
    /// The next reset of `f` fails (EIO).
    ResetFails { f: usize },
    /// After the next reset of `f` its link trains back at x4 of x16.
    ResetDegrades { f: usize },
    /// The admin resets GPU `gpu` (`vfio-gpu-dra reset`).
    AdminReset { gpu: usize },
}

/// The intent sources [`Op::IntentUnreadable`] makes unreadable, relative to
/// the host root (the policy file lives under it, as in the DaemonSet).
const INTENT_SOURCES: [&str; 4] = [
    "proc/cmdline",
    "etc/modprobe.d",
    "etc/driverctl.d",
    "etc/vfio-gpu-dra",
];

/// The admin's intent and the kubelet's view of the claims.
#[derive(Clone, Debug, Default)]
struct Model {
    driverctl: [Option<Dc>; 4],
    modprobe: BTreeSet<usize>,
    cmdline: BTreeSet<usize>,
    admin_override: [Option<String>; 4],
    /// Function indices listed in the policy.
    policy: BTreeSet<usize>,
    /// Per GPU: the claim the kubelet prepared it for, and whether that
    /// prepare succeeded (false: a prepare or unprepare is still unanswered).
    holder: [Option<(u8, bool)>; 3],
    /// Per GPU: a prepare was attempted since it was last seen restored.
    touched: [bool; 3],
    /// Per GPU: every claim that ever asked to prepare it (a claim the
    /// ledger records as holder must be one of them).
    tried: [BTreeSet<u8>; 3],
    /// Per GPU: keep or pin intent applied to some operation since it was
    /// last seen restored, or it was quarantined (then I5 does not apply).
    intent_seen: [bool; 3],
    /// A source of intent cannot be read: every GPU counts as kept (an
    /// unreadable configuration is never read as "no intent").
    unreadable: Option<usize>,
    /// Per GPU: a tenant released it, and the resets of each function
    /// counted before that release (I10).
    handed_over: [Option<[u32; 4]>; 3],
    /// Per GPU: the claim whose prepare last succeeded, until its release
    /// reaches the host (I10: the same claim preparing again before that is
    /// the same tenant; the GPU never left it).
    tenant: [Option<u8>; 3],
}

impl Model {
    fn keep(&self, g: usize) -> bool {
        if self.unreadable.is_some() {
            return true;
        }
        // kmod and the kernel agree: an ids= on the command line wins over modprobe.d.
        let ids = if self.cmdline.is_empty() {
            &self.modprobe
        } else {
            &self.cmdline
        };
        GPUS[g].iter().any(|&f| {
            self.driverctl[f] == Some(Dc::Vfio)
                || ids.contains(&f)
                || self.admin_override[f].as_deref() == Some("vfio-pci")
                || self.policy.contains(&f)
                || ORIGIN[f] == "vfio-pci"
        })
    }
    fn pinned(&self, g: usize) -> bool {
        GPUS[g].iter().any(|&f| {
            matches!(self.driverctl[f], Some(Dc::Host | Dc::Unbound))
                || self.admin_override[f]
                    .as_deref()
                    .is_some_and(|d| d != "vfio-pci")
        })
    }
}

/// Who runs an engine operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    /// serve's long-lived engine.
    Main,
    /// serve, crashing after this many mutations.
    Crash(u64),
    /// serve with an operation budget spent at once.
    Tight,
    /// Another process.
    Other,
}

struct World {
    _dir: tempfile::TempDir,
    host: PathBuf,
    state: PathBuf,
    policy: PathBuf,
    k: SimKernel,
    main: Option<Engine>,
    gates: Vec<(Bdf, BlockHandle)>,
    model: Model,
    /// vfio-pci's `remove()` is slow (`SlowRemove`).
    slow: bool,
    /// Injected bind failures not yet consumed, per (function, to vfio-pci).
    bind_faults: std::collections::BTreeMap<(usize, bool), usize>,
    /// Injected "probe binds nothing" not yet consumed, per function.
    probe_faults: [usize; 4],
    /// The ledger as it was before another version replaced it (`None`: no file).
    newer_saved: Option<Option<Vec<u8>>>,
    skip: BTreeSet<String>,
}

/// How long a slow vfio-pci `remove()` takes: past a tight budget (75 ms),
/// within the unbind deadline (300 ms).
const SLOW_REMOVE: Duration = Duration::from_millis(150);

type Check = Result<(), String>;
/// An operation's per-GPU results, or the first invariant it broke.
type Outcomes = Result<Vec<Result<Outcome, String>>, String>;

fn build_host(root: &Path) {
    let mut h = FixtureHost::create(root).unwrap();
    h.write(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on\n",
    )
    .unwrap();
    h.write(
        "etc/modprobe.d/vfio.conf",
        "options vfio-pci ids=10de:2330\n",
    )
    .unwrap();
    for d in ["vfio-pci", "nvidia", "snd_hda_intel"] {
        h.add_driver(d).unwrap();
    }
    let specs = [
        (0, 0x26b1, 0x030000, 11),
        (1, 0x22ba, 0x040300, 11),
        (2, 0x20b2, 0x030200, 12),
        (3, 0x2330, 0x030200, 13),
    ];
    for (f, device, class, group) in specs {
        h.add_function(
            &FunctionSpec::new(fbdf(f), 0x10de, device, class)
                .driver(ORIGIN[f])
                .group(group),
        )
        .unwrap();
        for (attr, value) in [
            ("current_link_speed", "16.0 GT/s PCIe"),
            ("max_link_speed", "16.0 GT/s PCIe"),
            ("current_link_width", "16"),
            ("max_link_width", "16"),
        ] {
            h.write(
                &format!("sys/bus/pci/devices/{}/{attr}", FNS[f]),
                &format!("{value}\n"),
            )
            .unwrap();
        }
    }
}

fn skip_from_env() -> BTreeSet<String> {
    std::env::var("MODEL_SKIP")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

impl World {
    fn new(skip: BTreeSet<String>) -> World {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        build_host(&host);
        let policy = host.join("etc/vfio-gpu-dra/policy.toml");
        fs::create_dir_all(host.join("etc/vfio-gpu-dra")).unwrap();
        fs::write(&policy, "[keep-on-vfio]\npci-bus-ids = []\n").unwrap();
        let k = SimKernel::booted(HostRoot::open(&host).unwrap());
        let model = Model {
            modprobe: [3].into(),
            ..Model::default()
        };
        let mut w = World {
            state: dir.path().join("state"),
            _dir: dir,
            host,
            policy,
            k,
            main: None,
            gates: Vec::new(),
            slow: false,
            bind_faults: Default::default(),
            probe_faults: [0; 4],
            model,
            newer_saved: None,
            skip,
        };
        w.main = Some(w.open(Who::Main));
        w
    }

    fn config(&self, who: Who) -> EngineConfig {
        let base = EngineConfig {
            // Per operation: serve with a pod UID, so a second process fits in.
            state_lock_mode: StateLockMode::PerOperation,
            policy_file: Some(self.policy.clone()),
            unbind_deadline: Duration::from_millis(300),
            // Long enough that a loaded CI machine does not quarantine a
            // read that is merely slow (a long random run under load did).
            read_deadline: Duration::from_secs(1),
            write_deadline: Duration::from_secs(2),
            bind_deadline: Duration::from_secs(2),
            ..common::config()
        };
        match who {
            Who::Main | Who::Other => base,
            Who::Crash(step) => EngineConfig {
                crash_after_step: Some(step),
                ..base
            },
            Who::Tight => EngineConfig {
                operation_budget: Duration::from_millis(75),
                ..base
            },
        }
    }

    fn open(&self, who: Who) -> Engine {
        Engine::open(
            Arc::new(self.k.clone()),
            &self.state,
            GpuSelector::default(),
            Policy::default(),
            self.config(who),
        )
        .unwrap_or_else(|e| panic!("opening the engine ({who:?}): {e}"))
        .0
    }

    fn check(&self, inv: &str, ok: bool, what: impl FnOnce() -> String) -> Check {
        if ok || self.skip.contains(inv) {
            Ok(())
        } else {
            Err(format!("[{inv}] {}", what()))
        }
    }

    fn sysfs(&self, f: usize) -> (Option<String>, Option<String>) {
        let root = HostRoot::open(&self.host).unwrap();
        let pf = PciFunction::read(&root, fbdf(f)).unwrap();
        (pf.driver.map(|d| d.to_string()), pf.driver_override)
    }

    fn drivers(&self) -> [Option<String>; 4] {
        std::array::from_fn(|f| self.sysfs(f).0)
    }

    fn blocked(&self, f: usize) -> bool {
        let b = fbdf(f);
        self.k.device_locked(b) || self.gates.iter().any(|(g, h)| *g == b && h.is_holding())
    }

    fn any_blocked(&self) -> bool {
        (0..FNS.len()).any(|f| self.blocked(f))
    }

    fn gpu_on(&self, g: usize, want: impl Fn(usize, Option<&str>) -> bool) -> bool {
        GPUS[g].iter().all(|&f| want(f, self.sysfs(f).0.as_deref()))
    }

    fn on_vfio(&self, g: usize) -> bool {
        self.gpu_on(g, |_, d| d == Some("vfio-pci"))
    }

    fn on_origin(&self, g: usize) -> bool {
        self.gpu_on(g, |f, d| d == Some(ORIGIN[f]))
    }

    fn describe(&self) -> String {
        (0..FNS.len())
            .map(|f| format!("{}={:?}", FNS[f], self.sysfs(f)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    // ------------------------------------------------------------ steps

    fn step(&mut self, op: &Op) -> Check {
        match op {
            Op::Configure { .. }
            | Op::Unconfigure { .. }
            | Op::Reconcile
            | Op::AdminReset { .. } => self.engine_op(Who::Main, op),
            Op::Crash { step, op } => {
                let who = if self.any_blocked() {
                    Who::Main
                } else {
                    Who::Crash(*step)
                };
                self.engine_op(who, op)
            }
            Op::OtherReconcile => self.engine_op(Who::Other, &Op::Reconcile),
            Op::Tight(op) => self.engine_op(Who::Tight, op),
            Op::Driverctl { .. }
            | Op::Modprobe { .. }
            | Op::Cmdline { .. }
            | Op::AdminOverride { .. }
            | Op::Policy { .. } => {
                self.admin(op);
                Ok(())
            }
            Op::Settle => self.settle(),
            _ => {
                self.fault(op);
                Ok(())
            }
        }
    }

    /// The admin changes intent through one source.
    fn admin(&mut self, op: &Op) {
        match op {
            Op::Driverctl { f, to } => {
                let path = self.host.join(format!("etc/driverctl.d/pci-{}", FNS[*f]));
                match to {
                    None => {
                        let _ = fs::remove_file(&path);
                    }
                    Some(dc) => {
                        let text = match dc {
                            Dc::Vfio => "vfio-pci",
                            Dc::Host => host_driver(*f),
                            Dc::Unbound => "none",
                        };
                        fs::create_dir_all(path.parent().unwrap()).unwrap();
                        fs::write(&path, format!("{text}\n")).unwrap();
                    }
                }
                self.model.driverctl[*f] = *to;
            }
            Op::Modprobe { f, on } => {
                set(&mut self.model.modprobe, *f, *on);
                let path = self.host.join("etc/modprobe.d/vfio.conf");
                if self.model.modprobe.is_empty() {
                    let _ = fs::remove_file(path);
                } else {
                    fs::write(
                        path,
                        format!("options vfio-pci ids={}\n", ids(&self.model.modprobe)),
                    )
                    .unwrap();
                }
            }
            Op::Cmdline { f, on } => {
                set(&mut self.model.cmdline, *f, *on);
                let mut line = "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on".to_string();
                if !self.model.cmdline.is_empty() {
                    line += &format!(" vfio-pci.ids={}", ids(&self.model.cmdline));
                }
                fs::write(self.host.join("proc/cmdline"), line + "\n").unwrap();
            }
            Op::AdminOverride { f, to } => {
                let current = self.sysfs(*f).1;
                let value = match to {
                    // Only over an unset override: the engine's own is not the admin's to clobber.
                    Some(vfio) if current.is_none() => {
                        Some(if *vfio { "vfio-pci" } else { host_driver(*f) }.to_string())
                    }
                    None if current.is_some() && current == self.model.admin_override[*f] => None,
                    _ => return,
                };
                self.k
                    .write(&SysfsWrite::DriverOverride {
                        bdf: fbdf(*f),
                        driver: value.clone(),
                    })
                    .unwrap();
                self.model.admin_override[*f] = value;
            }
            Op::Policy { gpu, on } => {
                set(&mut self.model.policy, GPUS[*gpu][0], *on);
                let list: Vec<String> = self
                    .model
                    .policy
                    .iter()
                    .map(|f| format!("\"{}\"", FNS[*f]))
                    .collect();
                fs::write(
                    &self.policy,
                    format!("[keep-on-vfio]\npci-bus-ids = [{}]\n", list.join(", ")),
                )
                .unwrap();
            }
            _ => unreachable!("not an intent change: {op:?}"),
        }
    }

    /// The kernel (or the disk) misbehaves, or stops misbehaving.
    fn fault(&mut self, op: &Op) {
        match op {
            Op::BindFails {
                f,
                vfio,
                times,
                errno,
            } => {
                let driver = if *vfio { "vfio-pci" } else { host_driver(*f) };
                *self.bind_faults.entry((*f, *vfio)).or_default() += times;
                for _ in 0..*times {
                    self.k.inject(Fault {
                        kind: Some(WriteKind::Bind),
                        bdf: Some(fbdf(*f)),
                        driver: Some(driver.into()),
                        nth: 0,
                        action: FaultAction::Fail(*errno),
                    });
                }
            }
            Op::ProbeBindsNothing { f } => {
                self.probe_faults[*f] += 1;
                self.k.inject(Fault::on(
                    WriteKind::DriversProbe,
                    fbdf(*f),
                    FaultAction::ProbeBindsNothing,
                ));
            }
            Op::ResetFails { f } => {
                self.k.inject(Fault::on(
                    vfio_gpu_engine::kernel::WriteKind::Reset,
                    fbdf(*f),
                    FaultAction::Fail(errno::EIO),
                ));
            }
            Op::ResetDegrades { f } => {
                self.k.on_reset(
                    fbdf(*f),
                    vfio_gpu_engine::sim::ResetEffect::DegradedLink {
                        speed: "16.0 GT/s PCIe".into(),
                        width: 4,
                    },
                );
            }
            Op::UnbindBlocks { f } => {
                let gate = BlockHandle::new();
                self.k.inject(Fault::on(
                    WriteKind::Unbind,
                    fbdf(*f),
                    FaultAction::Block(gate.clone()),
                ));
                self.gates.push((fbdf(*f), gate));
            }
            Op::Unblock => {
                self.unblock();
            }
            Op::SlowRemove(on) => {
                self.slow = *on;
                let t = if *on { SLOW_REMOVE } else { Duration::ZERO };
                self.k.set_latency(WriteKind::Unbind, "vfio-pci", t);
            }
            Op::LedgerNewer(on) => {
                let path = self.state.join("ledger.json");
                if *on && self.newer_saved.is_none() {
                    let old = fs::read(&path).ok();
                    let newer = match &old {
                        Some(b) => String::from_utf8_lossy(b).replacen("format=1", "format=2", 1),
                        None => "vfio-gpu-dra-ledger format=2 sha256=00\n{}".to_string(),
                    };
                    fs::create_dir_all(&self.state).unwrap();
                    fs::write(&path, newer).unwrap();
                    self.newer_saved = Some(old);
                } else if !*on && let Some(old) = self.newer_saved.take() {
                    match old {
                        Some(b) => fs::write(&path, b).unwrap(),
                        None => {
                            let _ = fs::remove_file(&path);
                        }
                    }
                }
            }
            Op::IntentUnreadable(source) => {
                self.k.clear_read_faults();
                self.model.unreadable = *source;
                if let Some(i) = source {
                    self.k
                        .fault_reads_under(INTENT_SOURCES[*i], FaultAction::Fail(errno::EIO));
                }
            }
            Op::LedgerFull(on) => {
                let tmp = self.state.join(".ledger.json.tmp");
                if *on {
                    let _ = fs::remove_file(&tmp);
                    let _ = fs::create_dir_all(&tmp);
                } else {
                    let _ = fs::remove_dir(&tmp);
                }
            }
            _ => unreachable!("not a fault: {op:?}"),
        }
    }

    fn unblock(&mut self) {
        for (_, g) in &self.gates {
            g.release();
        }
        // Wait for the released writes (and any queued behind their device lock).
        let until = Instant::now() + Duration::from_secs(10);
        while self.any_blocked() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20));
        while self.any_blocked() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.gates.clear();
    }

    /// Runs one engine operation and checks I1, I2, I6, I7, I8 around it.
    /// Returns the operation's outcomes (reconcile: the per-GPU ones).
    fn engine_op(&mut self, who: Who, op: &Op) -> Check {
        self.engine_op_results(who, op).map(|_| ())
    }

    fn engine_op_results(&mut self, who: Who, op: &Op) -> Outcomes {
        let before = self.drivers();
        let log_start = self.k.log().len();
        let blocked_before: Vec<usize> = (0..FNS.len()).filter(|&f| self.blocked(f)).collect();
        let keep: [bool; 3] = std::array::from_fn(|g| self.model.keep(g));
        let pinned: [bool; 3] = std::array::from_fn(|g| self.model.pinned(g));
        for g in 0..GPUS.len() {
            if keep[g] || pinned[g] {
                self.model.intent_seen[g] = true;
            }
        }
        let resets_before: [u32; 4] = std::array::from_fn(|f| self.k.resets(fbdf(f)));
        let (result, outcomes, crashed) = self.call(who, op);
        let after = self.drivers();

        // Model: what the kubelet now believes about the claim.
        match *op {
            Op::Configure { gpu: g, claim: c } => {
                self.model.tried[g].insert(c);
                let ok = result.is_ok() && !crashed;
                // A failed prepare of another claim leaves the holder as it was.
                let held_by_other = matches!(self.model.holder[g], Some((o, _)) if o != c);
                if ok || !held_by_other {
                    self.model.touched[g] = true;
                    self.model.holder[g] = Some((c, ok));
                }
                // A tenant's re-prepare that failed and sent its GPU off vfio
                // (a rollback of the re-drive) took the GPU from it: the next
                // tenant, this claim again included, must get it reset.
                if !ok
                    && self.model.tenant[g] == Some(c)
                    && self.sysfs(GPUS[g][0]).0.as_deref() != Some("vfio-pci")
                {
                    self.model.tenant[g] = None;
                    if self.model.handed_over[g].is_none() {
                        self.model.handed_over[g] = Some(resets_before);
                    }
                }
                if ok {
                    self.check("I7", self.on_vfio(g), || {
                        format!("prepare of GPU {g} reported success: {}", self.describe())
                    })?;
                    self.model.tenant[g] = Some(c);
                    // I10: the last tenant's GPU reached this one reset.
                    if let Some(counts) = self.model.handed_over[g].take() {
                        let now: Vec<u32> =
                            GPUS[g].iter().map(|&f| self.k.resets(fbdf(f))).collect();
                        let reset = GPUS[g].iter().all(|&f| self.k.resets(fbdf(f)) > counts[f]);
                        self.check("I10", reset, || {
                            format!(
                                "GPU {g} prepared for u{c} without a reset since the last tenant released it (resets {now:?}, before {counts:?})"
                            )
                        })?;
                    }
                }
            }
            Op::Unconfigure { gpu: g, claim: c } => {
                // A tenant that had the GPU leaves once its release reports
                // success or reaches the host (a write): the next one, this
                // claim again included, must get it reset. An unprepare that
                // failed before any write left the GPU with its tenant.
                let reached_host = (result.is_ok() && !crashed) || self.k.log().len() > log_start;
                if self.model.tenant[g] == Some(c) && reached_host {
                    self.model.tenant[g] = None;
                    if self.model.handed_over[g].is_none() {
                        self.model.handed_over[g] = Some(resets_before);
                    }
                }
                if matches!(self.model.holder[g], Some((o, _)) if o == c) {
                    if result.is_ok() && !crashed {
                        self.model.holder[g] = None;
                        let o = outcomes[0].as_ref().unwrap();
                        self.check_unprepare(g, (keep[g], pinned[g]), &before, o)?;
                    } else {
                        self.model.holder[g] = Some((c, false));
                    }
                }
            }
            _ => {}
        }

        // A quarantined GPU stays where its failed hand-over left it (I5 aside).
        for (g, q) in self.quarantined().into_iter().enumerate() {
            if q {
                self.model.intent_seen[g] = true;
            }
        }
        // I1: nothing left vfio while the admin kept its GPU there.
        for (g, fns) in GPUS.iter().enumerate() {
            if !keep[g] {
                continue;
            }
            for &f in *fns {
                let left = before[f].as_deref() == Some("vfio-pci")
                    && after[f].as_deref() != Some("vfio-pci");
                self.check("I1", !left, || {
                    format!(
                        "{who:?} {op:?} moved {} off vfio (now {:?}) while the admin keeps GPU {g} there",
                        FNS[f], after[f]
                    )
                })?;
            }
        }
        // I2: never driverless after an operation, unless a write to it is
        // blocked, or the kernel refused both ways out (vfio-pci and the
        // host driver) or a probe bound nothing. Functions the operation did
        // not write keep the verdict of the one that did; `settle` checks all.
        let excused = self.consume_faults(&self.k.log()[log_start..]);
        for (f, driver) in after.iter().enumerate() {
            // driverctl `none`: the admin asked for no driver (n17).
            let pinned_none = matches!(self.model.driverctl[f], Some(Dc::Unbound));
            let ok = driver.is_some() || pinned_none || self.blocked(f) || excused[f] || {
                !self.k.log()[log_start..].iter().any(|w| w.bdf() == fbdf(f))
            };
            self.check("I2", ok, || {
                format!(
                    "{who:?} {op:?} left {} without a driver: {}",
                    FNS[f],
                    self.describe()
                )
            })?;
        }
        // I9: a device with a write still blocked is left alone by everyone.
        for &f in &blocked_before {
            let log = self.k.log();
            let touched: Vec<&SysfsWrite> = log[log_start..]
                .iter()
                .filter(|w| w.bdf() == fbdf(f))
                .collect();
            self.check("I9", touched.is_empty(), || {
                format!(
                    "{who:?} {op:?} wrote to {} while a write to it is blocked: {touched:?}",
                    FNS[f]
                )
            })?;
        }
        // I8: what an outcome says is what sysfs shows.
        if !self.any_blocked() {
            for o in outcomes.iter().flatten() {
                for fs_ in &o.functions {
                    let f = (0..FNS.len()).find(|&f| fbdf(f) == fs_.bdf);
                    let Some(f) = f else { continue };
                    let now = self.sysfs(f).0;
                    self.check("I8", fs_.driver == now, || {
                        format!(
                            "{who:?} {op:?} reported {} on {:?}, sysfs shows {now:?} ({:?}: {})",
                            fs_.bdf, fs_.driver, o.action, o.detail
                        )
                    })?;
                }
            }
        }
        Ok(outcomes)
    }

    /// Calls the engine as `who`; returns the result, the per-GPU outcomes
    /// and whether the simulated crash fired (serve has then restarted).
    /// The claim serve's ledger records as holding GPU `g`, if any.
    fn recorded_holder(&self, g: usize) -> Option<u8> {
        let e = self.main.as_ref()?;
        let rec = e.ledger().gpus.get(&fbdf(GPUS[g][0])).cloned()?;
        match rec.holder? {
            Holder::Claim { uid, .. } => uid.strip_prefix('u')?.parse().ok(),
            _ => None,
        }
    }

    fn call(
        &mut self,
        who: Who,
        op: &Op,
    ) -> (Result<(), String>, Vec<Result<Outcome, String>>, bool) {
        // serve's engine is taken out for the operation and put back after.
        let e = match who {
            Who::Main => self.main.take().unwrap(),
            Who::Crash(_) => {
                drop(self.main.take());
                self.open(who)
            }
            Who::Tight | Who::Other => self.open(who),
        };
        if who == Who::Tight {
            self.k
                .set_latency(WriteKind::Unbind, "vfio-pci", SLOW_REMOVE);
        }
        let mut crashed = false;
        let mut outcomes = Vec::new();
        let result = match *op {
            Op::Configure { gpu, claim: c } | Op::Unconfigure { gpu, claim: c } => {
                let b = fbdf(GPUS[gpu][0]);
                let r = if matches!(op, Op::Configure { .. }) {
                    e.configure(b, claim(c))
                } else {
                    e.unconfigure(b, Some(&claim(c)))
                };
                crashed = matches!(r, Err(EngineError::SimulatedCrash(_)));
                let r = r.map_err(|e| e.to_string());
                outcomes.push(r.clone());
                r.map(|_| ())
            }
            Op::AdminReset { gpu } => {
                let r = e.reset_gpu(fbdf(GPUS[gpu][0]));
                crashed = matches!(r, Err(EngineError::SimulatedCrash(_)));
                let r = r.map_err(|e| e.to_string());
                outcomes.push(r.clone());
                r.map(|_| ())
            }
            Op::Reconcile => match e.reconcile() {
                Ok(rs) => {
                    for r in rs {
                        crashed |= matches!(&r, Err((_, EngineError::SimulatedCrash(_))));
                        outcomes.push(r.map_err(|(b, e)| format!("{b}: {e}")));
                    }
                    Ok(())
                }
                Err(err) => {
                    crashed = matches!(err, EngineError::SimulatedCrash(_));
                    Err(err.to_string())
                }
            },
            _ => unreachable!("not an engine operation: {op:?}"),
        };
        match who {
            Who::Main => self.main = Some(e),
            Who::Crash(_) => {
                drop(e);
                // serve restarts on the same state and reconciles first.
                let main = self.open(Who::Main);
                let _ = main.reconcile();
                self.main = Some(main);
            }
            Who::Tight | Who::Other => drop(e),
        }
        if who == Who::Tight && !self.slow {
            self.k
                .set_latency(WriteKind::Unbind, "vfio-pci", Duration::ZERO);
        }
        (result, outcomes, crashed)
    }

    /// Counts the injected faults the writes in `log` used up; per function,
    /// whether the kernel left it no way to a driver (both vfio-pci and the
    /// host driver refused, or a probe bound nothing).
    fn consume_faults(&mut self, log: &[SysfsWrite]) -> [bool; 4] {
        let mut refused = [[false; 2]; 4];
        let mut probed_nothing = [false; 4];
        for write in log {
            let f = |b: &Bdf| (0..FNS.len()).find(|&f| fbdf(f) == *b);
            match write {
                SysfsWrite::Bind { bdf: b, driver: d } => {
                    let Some(f) = f(b) else { continue };
                    let vfio = d.as_str() == "vfio-pci";
                    if !vfio && d.as_str() != host_driver(f) {
                        continue;
                    }
                    if let Some(n) = self.bind_faults.get_mut(&(f, vfio)).filter(|n| **n > 0) {
                        *n -= 1;
                        refused[f][usize::from(vfio)] = true;
                    }
                }
                SysfsWrite::DriversProbe { bdf: b } => {
                    let Some(f) = f(b) else { continue };
                    if self.probe_faults[f] > 0 {
                        self.probe_faults[f] -= 1;
                        probed_nothing[f] = true;
                    }
                }
                _ => {}
            }
        }
        // Under keep intent the host driver is not a way out (never sent back
        // to nvidia): vfio-pci refusing is enough; reconcile retries it.
        let kept = |f: usize| (0..GPUS.len()).any(|g| GPUS[g].contains(&f) && self.model.keep(g));
        std::array::from_fn(|f| (refused[f][1] && (refused[f][0] || kept(f))) || probed_nothing[f])
    }

    /// I6 for an unprepare that reported success: what it says it did is
    /// what sysfs shows, and it is what the intent asks for. Under keep,
    /// what was on vfio stays there (a GPU a failed prepare rolled back is
    /// not moved to vfio by the release).
    fn check_unprepare(
        &self,
        g: usize,
        (keep, pinned): (bool, bool),
        before: &[Option<String>; 4],
        o: &Outcome,
    ) -> Check {
        // "Left on vfio" is about the GPU function: a companion a failed or
        // interrupted move never reached stays on its host driver, as the
        // admin's boot configuration would have left it.
        let said = match o.action {
            // Restored to the origins, or where the admin pinned it since (n17).
            Action::Restored => self.on_origin(g) || pinned,
            // A failed reset keeps it on vfio; a failed verification after
            // the bind leaves it where the release put it. "On vfio" is about
            // the GPU function, as for LeftOnVfio: a companion an interrupted
            // prepare never reached stays on its host driver.
            Action::Quarantined => {
                self.sysfs(GPUS[g][0]).0.as_deref() == Some("vfio-pci")
                    || self.on_origin(g)
                    || pinned
            }
            Action::LeftOnVfio => self.sysfs(GPUS[g][0]).0.as_deref() == Some("vfio-pci"),
            _ => true,
        };
        self.check("I6", said, || {
            format!(
                "unprepare of GPU {g} reported {:?} ({}), host: {}",
                o.action,
                o.detail,
                self.describe()
            )
        })?;
        let kept = GPUS[g].iter().all(|&f| {
            before[f].as_deref() != Some("vfio-pci")
                || self.sysfs(f).0.as_deref() == Some("vfio-pci")
        });
        let promise = if keep {
            kept
        } else if o.action == Action::Quarantined {
            kept || self.on_origin(g) || pinned
        } else {
            pinned || self.on_origin(g)
        };
        self.check("I6", promise, || {
            format!(
                "unprepare of GPU {g} (keep: {keep}) reported {:?} ({}), host: {}",
                o.action,
                o.detail,
                self.describe()
            )
        })
    }

    /// Brings the host to rest and checks I3, I4, I5 (and, through the
    /// operations it runs, the per-operation invariants).
    fn settle(&mut self) -> Check {
        self.k.clear_faults();
        self.bind_faults.clear();
        self.probe_faults = [0; 4];
        self.fault(&Op::SlowRemove(false));
        self.fault(&Op::LedgerFull(false));
        self.fault(&Op::LedgerNewer(false));
        self.fault(&Op::IntentUnreadable(None));
        self.unblock();
        let first = self.engine_op_results(Who::Main, &Op::Reconcile)?;
        for r in &first {
            self.check("I3", r.is_ok(), || {
                format!("reconcile at rest failed: {r:?}")
            })?;
        }
        // The kubelet retries every unprepare it has not seen succeed, and
        // gives up every prepare it has not seen succeed. The plugin's
        // unprepare of a claim releases what the ledger records for that
        // claim (`Engine::held_by`): a GPU that another claim's crashed
        // prepare took over (the allocator never gives one GPU to two
        // claims; the model does) is released by that claim's give-up.
        for g in 0..GPUS.len() {
            if let Some((noted, false)) = self.model.holder[g] {
                let c = match self.recorded_holder(g) {
                    Some(other) if other != noted && self.model.tried[g].contains(&other) => {
                        self.model.holder[g] = Some((other, false));
                        other
                    }
                    _ => noted,
                };
                let op = Op::Unconfigure { gpu: g, claim: c };
                let out = self.engine_op_results(Who::Main, &op)?;
                self.check("I5", self.model.holder[g].is_none(), || {
                    format!("unprepare of GPU {g} retried at rest still fails: {out:?}")
                })?;
            }
        }
        let second = self.engine_op_results(Who::Main, &Op::Reconcile)?;
        for r in &second {
            self.check("I3", r.is_ok(), || {
                format!("reconcile at rest failed: {r:?}")
            })?;
        }
        self.check_ledger()?;
        for (f, name) in FNS.iter().enumerate() {
            let pinned_none = matches!(self.model.driverctl[f], Some(Dc::Unbound));
            self.check("I2", self.sysfs(f).0.is_some() || pinned_none, || {
                format!("{name} has no driver at rest: {}", self.describe())
            })?;
        }
        // I5: origins are never forgotten.
        for g in 0..GPUS.len() {
            let m = &self.model;
            if m.touched[g] && m.holder[g].is_none() && !m.intent_seen[g] {
                self.check("I5", self.on_origin(g), || {
                    format!(
                        "GPU {g} was released with no keep or pin intent but is not back on its drivers: {}",
                        self.describe()
                    )
                })?;
            }
        }
        // I4: reconcile at rest is a fixed point.
        let log = self.k.log().len();
        self.engine_op(Who::Main, &Op::Reconcile)?;
        let log_after = self.k.log();
        self.check("I4", log_after.len() == log, || {
            format!("a reconcile at rest wrote {:?}", &log_after[log..])
        })?;
        // A new window starts for GPUs that are back where they began.
        for g in 0..GPUS.len() {
            if self.model.holder[g].is_none() && self.on_origin(g) {
                self.model.touched[g] = false;
                self.model.intent_seen[g] = false;
            }
        }
        Ok(())
    }

    /// Per GPU: quarantined in the ledger on disk.
    fn quarantined(&self) -> [bool; 3] {
        let body = fs::read(self.state.join("ledger.json"))
            .ok()
            .and_then(|b| vfio_gpu_engine::ledger::decode(&b).ok())
            .unwrap_or_default();
        std::array::from_fn(|g| body.quarantined.contains_key(&fbdf(GPUS[g][0])))
    }

    /// The ledger on disk in short, for traces.
    fn ledger_states(&self) -> String {
        match fs::read(self.state.join("ledger.json")) {
            Err(_) => "none".into(),
            Ok(b) => match vfio_gpu_engine::ledger::decode(&b) {
                Err(e) => e,
                Ok(body) => format!(
                    "{:?}",
                    body.gpus
                        .iter()
                        .map(|(b, r)| (
                            b.to_string(),
                            r.state,
                            r.holder.as_ref().map(|h| h.to_string())
                        ))
                        .collect::<Vec<_>>()
                ),
            },
        }
    }

    /// I3: the ledger on disk against sysfs and the kubelet's claims.
    fn check_ledger(&self) -> Check {
        let path = self.state.join("ledger.json");
        let body = match fs::read(&path) {
            Err(_) => Default::default(),
            Ok(bytes) => vfio_gpu_engine::ledger::decode(&bytes)
                .map_err(|e| format!("[I3] ledger at rest does not decode: {e}"))?,
        };
        let body: vfio_gpu_engine::ledger::LedgerBody = body;
        for (g, fns) in GPUS.iter().enumerate() {
            let rec = body.gpus.get(&fbdf(fns[0]));
            let held = self.model.holder[g].map(|(c, _)| c);
            if let Some(c) = held {
                let ok = rec.is_some_and(|r| {
                    r.state == OpState::Configured && r.holder.as_ref() == Some(&claim(c))
                });
                self.check("I3", ok, || {
                    format!("GPU {g} prepared for u{c} but recorded as {rec:?}")
                })?;
            }
            match rec.map(|r| r.state) {
                Some(OpState::Configured) => {
                    self.check("I3", held.is_some(), || {
                        format!(
                            "GPU {g} recorded Configured but the kubelet holds no claim: {rec:?}"
                        )
                    })?;
                    self.check("I3", self.on_vfio(g), || {
                        format!("GPU {g} recorded Configured, host: {}", self.describe())
                    })?;
                }
                // Admin-owned, or kept for intent: some function of the GPU
                // is on vfio (a function a failed move never reached, or a
                // crashed release had already returned, stays where it is:
                // a settle never moves forward, nor to a host driver under keep).
                Some(OpState::Prebound) => {
                    let any_on_vfio = GPUS[g]
                        .iter()
                        .any(|&f| self.sysfs(f).0.as_deref() == Some("vfio-pci"));
                    self.check("I3", any_on_vfio, || {
                        format!("GPU {g} recorded Prebound, host: {}", self.describe())
                    })?;
                }
                Some(s @ (OpState::Configuring | OpState::Releasing)) => {
                    self.check("I3", false, || {
                        format!("GPU {g} still {s:?} at rest, host: {}", self.describe())
                    })?;
                }
                Some(OpState::ReleasedUnbound) => {}
                None => {
                    for &f in GPUS[g] {
                        let ovr = self.sysfs(f).1;
                        self.check(
                            "I3",
                            ovr.is_none() || ovr == self.model.admin_override[f],
                            || format!("{} has override {ovr:?} and no record", FNS[f]),
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn set(s: &mut BTreeSet<usize>, f: usize, on: bool) {
    if on {
        s.insert(f);
    } else {
        s.remove(&f);
    }
}

fn ids(s: &BTreeSet<usize>) -> String {
    s.iter().map(|f| IDS[*f]).collect::<Vec<_>>().join(",")
}

/// Runs `ops`, then settles; the first broken invariant, with the steps taken.
fn run_with(ops: &[Op], skip: BTreeSet<String>) -> Result<(), String> {
    // Operations named in MODEL_SKIP are left out (a known defect's trigger).
    let named = |op: &Op| {
        let text = format!("{op:?}");
        skip.iter().any(|s| text.contains(s.as_str()))
    };
    let ops: Vec<&Op> = ops.iter().filter(|op| !named(op)).collect();
    let mut w = World::new(skip);
    let mut done = Vec::new();
    for op in ops.into_iter().chain([&Op::Settle]) {
        done.push(op);
        let log = w.k.log().len();
        let r = w.step(op);
        if std::env::var_os("MODEL_TRACE").is_some() {
            eprintln!(
                "{op:?}: {:?}\n  {}\n  ledger: {}",
                &w.k.log()[log..],
                w.describe(),
                w.ledger_states()
            );
        }
        r.map_err(|e| format!("{e}\n  after {done:?}\n  host: {}", w.describe()))?;
    }
    Ok(())
}

fn run(ops: &[Op]) -> Result<(), String> {
    run_with(ops, BTreeSet::new())
}

// ------------------------------------------------------------ generators

/// A GPU: C (pre-bound, nothing to move) less often than A and B.
fn gpu() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(0usize), 3 => Just(1usize), 1 => Just(2usize)]
}

fn engine_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (gpu(), 1..3u8).prop_map(|(gpu, claim)| Op::Configure { gpu, claim }),
        3 => (gpu(), 1..3u8).prop_map(|(gpu, claim)| Op::Unconfigure { gpu, claim }),
        1 => Just(Op::Reconcile),
    ]
}

fn claim_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (gpu(), 1..3u8).prop_map(|(gpu, claim)| Op::Configure { gpu, claim }),
        (gpu(), 1..3u8).prop_map(|(gpu, claim)| Op::Unconfigure { gpu, claim }),
    ]
}

fn dc() -> impl Strategy<Value = Option<Dc>> {
    prop_oneof![
        2 => Just(None),
        2 => Just(Some(Dc::Vfio)),
        1 => Just(Some(Dc::Host)),
        1 => Just(Some(Dc::Unbound)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let f = 0..4usize;
    prop_oneof![
        12 => engine_op(),
        2 => (1..14u64, engine_op()).prop_map(|(step, op)| Op::Crash { step, op: Box::new(op) }),
        2 => Just(Op::OtherReconcile),
        2 => claim_op().prop_map(|op| Op::Tight(Box::new(op))),
        2 => (f.clone(), dc()).prop_map(|(f, to)| Op::Driverctl { f, to }),
        1 => (f.clone(), any::<bool>()).prop_map(|(f, on)| Op::Modprobe { f, on }),
        1 => (f.clone(), any::<bool>()).prop_map(|(f, on)| Op::Cmdline { f, on }),
        1 => (f.clone(), prop::option::of(any::<bool>())).prop_map(|(f, to)| Op::AdminOverride { f, to }),
        2 => (0..3usize, any::<bool>()).prop_map(|(gpu, on)| Op::Policy { gpu, on }),
        3 => (
            f.clone(),
            any::<bool>(),
            1..4usize,
            prop::sample::select(vec![errno::EIO, errno::ENODEV, errno::EBUSY]),
        )
            .prop_map(|(f, vfio, times, errno)| Op::BindFails { f, vfio, times, errno }),
        1 => f.clone().prop_map(|f| Op::ProbeBindsNothing { f }),
        1 => f.clone().prop_map(|f| Op::UnbindBlocks { f }),
        1 => Just(Op::Unblock),
        1 => any::<bool>().prop_map(Op::SlowRemove),
        1 => any::<bool>().prop_map(Op::LedgerNewer),
        1 => any::<bool>().prop_map(Op::LedgerFull),
        1 => prop::option::of(0..INTENT_SOURCES.len()).prop_map(Op::IntentUnreadable),
        1 => Just(Op::Settle),
        1 => f.clone().prop_map(|f| Op::ResetFails { f }),
        1 => f.clone().prop_map(|f| Op::ResetDegrades { f }),
        1 => (0..3usize).prop_map(|gpu| Op::AdminReset { gpu }),
    ]
}

fn cases() -> u32 {
    std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// CI replays the same cases every run (`MODEL_SEED`, default fixed); a long
/// search sets `MODEL_SEED=random` or another number.
fn seed() -> proptest::test_runner::RngSeed {
    use proptest::test_runner::RngSeed;
    match std::env::var("MODEL_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(n) => n
            .parse()
            .map(RngSeed::Fixed)
            .unwrap_or(RngSeed::Fixed(1204)),
        Err(_) => RngSeed::Fixed(1204),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        rng_seed: seed(),
        // Each case builds a host and runs real engines: shrinking is costly.
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    // On b11271c this found, depending on the seed: n9 (read-only ledger),
    // n10 (intent ignored finishing a release), n2 (failed rollback taken
    // for admin-owned), n4 (another process writes to a stuck device) and
    // an admin's vfio-pci override taken for ours; all pinned below.
    #[test]
    fn engine_keeps_its_promises(ops in prop::collection::vec(op(), 1..25)) {
        let skip = skip_from_env();
        if let Err(e) = run_with(&ops, skip) {
            prop_assert!(false, "{}", e);
        }
    }
}

// ------------------------------------------------------------ regressions
//
// Counterexamples, shrunk by hand to the steps that matter. Each asserts the
// invariant holds: each failed on the code it was found on (b11271c) and
// passes since its fix.

fn configure(gpu: usize, claim: u8) -> Op {
    Op::Configure { gpu, claim }
}

fn unconfigure(gpu: usize, claim: u8) -> Op {
    Op::Unconfigure { gpu, claim }
}

fn bind_fails(f: usize, vfio: bool, times: usize) -> Op {
    Op::BindFails {
        f,
        vfio,
        times,
        errno: errno::EIO,
    }
}

#[test]
fn a_ledger_back_from_a_newer_format_is_writable_again() {
    run(&[Op::LedgerNewer(true), Op::Reconcile]).unwrap();
}

#[test]
fn an_unprepare_on_a_newer_format_ledger_does_not_report_success() {
    run(&[configure(1, 1), Op::LedgerNewer(true), unconfigure(1, 1)]).unwrap();
}

#[test]
fn a_release_finished_by_reconcile_honours_driverctl_written_meanwhile() {
    run(&[
        configure(1, 1),
        bind_fails(2, false, 1),
        unconfigure(1, 1),
        Op::Driverctl {
            f: 2,
            to: Some(Dc::Vfio),
        },
        Op::Reconcile,
    ])
    .unwrap();
}

#[test]
fn a_release_finished_by_reconcile_honours_a_policy_entry_added_meanwhile() {
    run(&[
        configure(1, 2),
        bind_fails(2, false, 1),
        unconfigure(1, 2),
        Op::Policy { gpu: 1, on: true },
        Op::Reconcile,
    ])
    .unwrap();
}

#[test]
fn an_admin_override_to_vfio_written_before_a_prepare_keeps_the_gpu_on_vfio() {
    run(&[
        Op::AdminOverride {
            f: 0,
            to: Some(true),
        },
        configure(0, 2),
        unconfigure(0, 2),
    ])
    .unwrap();
}

#[test]
fn a_failed_rollback_released_later_returns_to_the_original_driver() {
    run(&[
        bind_fails(2, true, 1),
        bind_fails(2, false, 2),
        configure(1, 1),
        Op::Reconcile,
        unconfigure(1, 1),
    ])
    .unwrap();
}

#[test]
fn a_release_finished_by_a_prepare_out_of_budget_leaves_no_function_driverless() {
    run(&[
        configure(0, 1),
        bind_fails(0, false, 1),
        unconfigure(0, 1),
        Op::Tight(Box::new(configure(0, 2))),
    ])
    .unwrap();
}

#[test]
fn a_failed_rollback_of_a_gpu_with_audio_released_later_is_restored() {
    run(&[
        bind_fails(1, true, 1),
        bind_fails(0, false, 1),
        configure(0, 2),
        unconfigure(0, 2),
    ])
    .unwrap();
}

#[test]
fn a_second_process_leaves_a_device_with_a_blocked_unbind_alone() {
    run(&[
        Op::UnbindBlocks { f: 2 },
        configure(1, 1),
        Op::OtherReconcile,
    ])
    .unwrap();
}

// ------------------------------------------------------------ the model itself
//
// Where the engine is right, the model must agree with it: these pass.

#[test]
fn every_intent_source_keeps_a_released_gpu_on_vfio_and_the_model_agrees() {
    let sources = [
        Op::Driverctl {
            f: 2,
            to: Some(Dc::Vfio),
        },
        Op::Modprobe { f: 2, on: true },
        Op::Cmdline { f: 2, on: true },
        Op::Policy { gpu: 1, on: true },
    ];
    for intent in sources {
        run(&[configure(1, 1), intent, unconfigure(1, 1)]).unwrap();
    }
    // A pin refuses the prepare; nothing moves.
    run(&[
        Op::Driverctl {
            f: 1,
            to: Some(Dc::Host),
        },
        configure(0, 1),
    ])
    .unwrap();
}

#[test]
fn a_crash_at_any_step_of_a_prepare_or_release_settles() {
    for step in 1..=14 {
        run(&[
            Op::Crash {
                step,
                op: Box::new(configure(0, 1)),
            },
            Op::Crash {
                step,
                op: Box::new(unconfigure(0, 1)),
            },
        ])
        .unwrap_or_else(|e| panic!("crash after step {step}: {e}"));
    }
}

/// Shrunk from a long random run under heavy machine load (load average 6 on
/// 2 cores), where a 200 ms read deadline quarantined B and reconcile at rest
/// could not see it; it does not fail on a quiet machine. Kept, with the
/// model's read deadline raised to 1 s, so the sequence stays exercised.
#[test]
fn a_tight_unprepare_of_an_idle_gpu_then_a_prepare_settles() {
    let ops = [Op::Tight(Box::new(unconfigure(1, 2))), configure(1, 2)];
    for _ in 0..5 {
        run_with(&ops, BTreeSet::new()).unwrap();
    }
}

/// Found by a long random run: a release whose first unbind blocks must not
/// go on to the companion and leave it driverless (the companion's bind was
/// refused because the GPU could not be read behind the held device lock).
#[test]
fn a_release_blocked_on_the_gpu_leaves_its_companion_bound() {
    run_with(
        &[
            configure(1, 1),
            Op::Tight(Box::new(configure(0, 2))),
            Op::Unblock,
            Op::UnbindBlocks { f: 0 },
            Op::Tight(Box::new(unconfigure(0, 2))),
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by a long random run: the companion's unbind blocked in serve; a
/// second process's reconcile must leave the group alone (n4 through a
/// function other than the GPU's).
#[test]
fn a_blocked_companion_unbind_is_left_alone_by_another_process() {
    run_with(
        &[
            Op::UnbindBlocks { f: 1 },
            configure(0, 1),
            Op::Reconcile,
            Op::OtherReconcile,
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by a long random run: intent kept a GPU we moved on vfio when a
/// crashed prepare was settled; once the admin drops the intent, the GPU is
/// still ours and goes back to its driver (its origins are never forgotten).
#[test]
fn a_gpu_kept_for_intent_returns_once_the_intent_is_gone() {
    run_with(
        &[
            Op::Cmdline { f: 1, on: true },
            Op::Crash {
                step: 3,
                op: Box::new(configure(0, 1)),
            },
            Op::Cmdline { f: 1, on: false },
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by a long random run: a new claim taking a GPU kept for intent
/// (its companion not on vfio) must record that claim as the holder.
#[test]
fn a_claim_taking_a_gpu_kept_for_intent_holds_it() {
    run_with(
        &[
            Op::UnbindBlocks { f: 0 },
            configure(0, 1),
            Op::Modprobe { f: 0, on: true },
            Op::Unblock,
            Op::Crash {
                step: 1,
                op: Box::new(configure(0, 1)),
            },
            Op::Tight(Box::new(configure(0, 1))),
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by a model run on another branch: a prepare whose GPU unbind blocks
/// while driverctl names vfio-pci for it settles consistently at rest.
#[test]
fn a_blocked_prepare_under_driverctl_vfio_settles() {
    run_with(
        &[
            Op::UnbindBlocks { f: 0 },
            Op::Driverctl {
                f: 0,
                to: Some(Dc::Vfio),
            },
            configure(0, 1),
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by the last long random run: a release a crash interrupted after
/// the GPU function was back on nvidia, then keep intent added: nothing is
/// moved forward, and the report does not claim the GPU is on vfio.
#[test]
fn keep_intent_after_a_half_finished_release_reports_where_the_gpu_is() {
    run_with(
        &[
            bind_fails(1, false, 1),
            configure(0, 1),
            Op::Crash {
                step: 1,
                op: Box::new(unconfigure(0, 1)),
            },
            Op::Modprobe { f: 0, on: true },
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by the model at the merge of reset-between-tenants (I9): an admin
/// reset wrote `reset` to a GPU whose unbind a budget-spent prepare had left
/// blocked. The reset now refuses while a write to any function is blocked,
/// here or in another process.
#[test]
fn an_admin_reset_leaves_a_device_with_a_blocked_unbind_alone() {
    run_with(
        &[
            Op::UnbindBlocks { f: 2 },
            Op::Tight(Box::new(configure(1, 1))),
            Op::AdminReset { gpu: 1 },
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by a random run of 500 cases after the reset merge (I6): a GPU the
/// policy keeps, whose prepare crashed before its audio function moved, is
/// quarantined at the retried unprepare (a degraded link) with the GPU
/// function on vfio and the audio function still on its host driver. The
/// model's rule for "quarantined" now reads "on vfio" as LeftOnVfio does
/// (the GPU function); nothing that was on vfio left it.
#[test]
fn a_kept_gpu_quarantined_at_a_retried_unprepare_keeps_every_function_on_vfio() {
    run_with(
        &[
            Op::ResetDegrades { f: 0 },
            bind_fails(0, true, 1),
            Op::Policy { gpu: 0, on: true },
            Op::Crash {
                step: 3,
                op: Box::new(configure(0, 1)),
            },
            Op::Settle,
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by a random run after the reset merge (I10): with the ledger full,
/// an unprepare fails before its first host write (its write-ahead record
/// cannot be committed), and the same claim is prepared again. Nothing was
/// released: the record still names the claim, and the GPU goes back to it
/// without a reset. I10 counts a tenant as gone once its release reports
/// success or reaches the host; this pins that the engine then still
/// answers the re-prepare as an idempotent repeat (and, with the ledger
/// writable again, a retried unprepare resets the GPU for whoever is next).
#[test]
fn a_reprepare_after_an_unprepare_that_wrote_nothing_is_the_same_tenant() {
    run_with(
        &[
            configure(1, 1),
            Op::LedgerFull(true),
            Op::Crash {
                step: 1,
                op: Box::new(unconfigure(1, 1)),
            },
            configure(1, 1),
            Op::LedgerFull(false),
            unconfigure(1, 1),
            configure(1, 2),
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// The strict side of the same line (I10): an unprepare that crashed after
/// its release reached the host is a tenant gone, so the same claim's
/// re-prepare gets the GPU only after every function was reset. Crashes at
/// every step of the unprepare.
#[test]
fn a_reprepare_after_a_crashed_unprepare_that_reached_the_host_is_reset_first() {
    for step in 1..=6 {
        run_with(
            &[
                configure(0, 1),
                Op::Crash {
                    step,
                    op: Box::new(unconfigure(0, 1)),
                },
                configure(0, 1),
                Op::Settle,
            ],
            BTreeSet::new(),
        )
        .map_err(|e| format!("crash at step {step}: {e}"))
        .unwrap();
    }
}

/// Found by a random run this session (I3): the admin's `driver_override` on
/// the audio function keeps GPU A on vfio at release; the admin then clears
/// it, and the settle that returns A to its drivers wrote the override found
/// at prepare back, over the admin's newer choice, leaving an override with
/// no record. The admin's latest value now stays (`override_after_restore`).
#[test]
fn an_override_the_admin_cleared_while_we_held_the_gpu_is_not_written_back() {
    run_with(
        &[
            Op::AdminOverride {
                f: 1,
                to: Some(true),
            },
            configure(0, 2),
            unconfigure(0, 2),
            Op::AdminOverride { f: 1, to: None },
            Op::Settle,
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by a random run this session (I2): a prepare whose vfio bind and
/// whose park on vfio both fail leaves the GPU function driverless (the
/// kernel refused; reconcile parks it later); the admin's `reset <GPU>` then
/// reset that driverless function and returned with it still driverless. The
/// reset now refuses while an operation on the GPU is unfinished.
#[test]
fn an_admin_reset_refuses_a_gpu_whose_prepare_left_it_unfinished() {
    run_with(
        &[
            bind_fails(0, true, 2),
            Op::AdminOverride {
                f: 0,
                to: Some(true),
            },
            configure(0, 1),
            Op::AdminReset { gpu: 0 },
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by a random run this session (I1) after 1,153 successes: a release
/// put GPU A's function back on nvidia, its audio function failed and stayed
/// on vfio, the process crashed; the admin then wrote `vfio-pci` into the GPU
/// function's `driver_override`, the value this plugin had written at
/// prepare, and the settle took it for ours: it cleared it and sent the audio
/// function to its driver. Our vfio value on a function bound to a host
/// driver outside a move is no longer ours: it is the admin's.
#[test]
fn an_admin_override_to_vfio_after_a_crashed_release_step_keeps_the_gpu() {
    run_with(
        &[
            bind_fails(1, false, 1),
            configure(0, 1),
            Op::Crash {
                step: 1,
                op: Box::new(unconfigure(0, 1)),
            },
            Op::AdminOverride {
                f: 0,
                to: Some(true),
            },
            Op::Settle,
        ],
        BTreeSet::new(),
    )
    .unwrap();
}

/// Found by a random run of 1,000 cases in session 10, after 952 successes
/// (I2), and already there at the session's start (`025a651`): the admin
/// pins a held GPU to no driver (`driverctl … none`), the release follows
/// the pin, then the admin removes the pin file. The record was dropped with
/// the release, so reconcile found an unrecorded driverless GPU and left it
/// so (n15). The release now keeps a `released-unbound` record naming the
/// functions only the pin left driverless, and reconcile settles it again
/// with intent as it is now.
#[test]
fn a_pin_to_no_driver_withdrawn_after_the_release_sends_the_gpu_back() {
    run(&[
        configure(1, 1),
        Op::Driverctl {
            f: 2,
            to: Some(Dc::Unbound),
        },
        unconfigure(1, 1),
        Op::Driverctl { f: 2, to: None },
    ])
    .unwrap();
}

/// Found by the random search right after the fix above (I4): a release
/// crashed after its first step, with the pin to none written; reconcile
/// finished it, but the remembered record still said the hand-over was
/// owed, so the next reconcile reset the GPU again.
#[test]
fn a_pinned_release_finished_after_a_crash_is_not_reset_twice() {
    run(&[
        Op::Tight(Box::new(configure(0, 1))),
        Op::Driverctl {
            f: 0,
            to: Some(Dc::Unbound),
        },
        Op::Crash {
            step: 1,
            op: Box::new(unconfigure(0, 1)),
        },
    ])
    .unwrap();
}

/// Found by a random run in session 10, present before it (`025a651`), in
/// the model rather than the engine: two claims' prepares of one GPU, both
/// crashed, leave the GPU held by the second while the model gave up only
/// the first, whose unprepare the engine refuses (`HeldByOther`). The real
/// allocator never gives one GPU to two claims, and the plugin's unprepare
/// releases only what the ledger records for the claim; the model now gives
/// up the claim the ledger records.
#[test]
fn two_crashed_prepares_of_one_gpu_by_two_claims_are_both_given_up() {
    run(&[
        Op::Crash {
            step: 1,
            op: Box::new(configure(0, 2)),
        },
        Op::Crash {
            step: 8,
            op: Box::new(configure(0, 1)),
        },
    ])
    .unwrap();
}

/// The same kind, the other sequence the search found: a release that
/// failed its bind, a pin to vfio, then a second claim's crashed prepare.
#[test]
fn a_gpu_taken_over_by_a_crashed_prepare_of_another_claim_is_given_up() {
    run(&[
        bind_fails(2, false, 1),
        configure(1, 1),
        unconfigure(1, 1),
        Op::Driverctl {
            f: 2,
            to: Some(Dc::Vfio),
        },
        unconfigure(1, 2),
        Op::Crash {
            step: 1,
            op: Box::new(configure(1, 2)),
        },
    ])
    .unwrap();
}

/// Found by a random run at the end of session 10, present before it
/// (`025a651`): a GPU whose first prepare failed its vfio bind twice was left
/// `releasing`; the same claim's next prepare finished that record first
/// (parked on vfio under the audio function's keep intent, kept with its
/// origins) and then started a fresh record, which took the GPU function as
/// found on vfio with an override not ours. Once the intent was withdrawn, a
/// release (here after a crash) kept the GPU on vfio as the admin's (I6).
/// The prepare now asks again of the record the finish left.
#[test]
fn a_gpu_parked_on_vfio_then_released_after_a_crash_goes_back() {
    run(&[
        Op::Modprobe { f: 1, on: true },
        Op::BindFails {
            f: 0,
            vfio: true,
            times: 2,
            errno: errno::EIO,
        },
        configure(0, 1),
        configure(0, 1),
        Op::Modprobe { f: 1, on: false },
        Op::Crash {
            step: 1,
            op: Box::new(unconfigure(0, 1)),
        },
    ])
    .unwrap();
}

/// The next run found the same promise broken for a GPU's audio function:
/// the record was dropped because the GPU function had its driver back,
/// with the pinned audio function still driverless. A record naming
/// functions left driverless by a pin is settled whatever the GPU function
/// has.
#[test]
fn a_pin_to_no_driver_on_the_audio_function_withdrawn_after_the_release_sends_it_back() {
    run(&[
        Op::Tight(Box::new(configure(0, 1))),
        Op::Driverctl {
            f: 1,
            to: Some(Dc::Unbound),
        },
        Op::Tight(Box::new(unconfigure(0, 1))),
        Op::Driverctl { f: 1, to: None },
    ])
    .unwrap();
}

/// Found by a random run at the start of session 11 (I6): a prepare whose
/// vfio bind fails twice and whose rollback bind to nvidia fails once, then a
/// release whose reset fails, reported Quarantined ("kept on vfio") with the
/// GPU function on no driver. No tenant ever had that GPU: its release owes
/// no reset, and it goes back to nvidia.
#[test]
fn a_release_after_a_prepare_that_never_finished_is_not_reset() {
    run(&[
        Op::BindFails {
            f: 0,
            vfio: true,
            times: 2,
            errno: errno::EIO,
        },
        Op::BindFails {
            f: 0,
            vfio: false,
            times: 1,
            errno: errno::EIO,
        },
        Op::ResetFails { f: 0 },
        configure(0, 2),
        unconfigure(0, 2),
    ])
    .unwrap();
}

/// Found by a random run of 3,000 cases at the end of session 11 (I9).
#[test]
fn another_reconcile_never_writes_to_a_device_whose_unbind_is_blocked() {
    run(&[
        configure(1, 2),
        Op::UnbindBlocks { f: 2 },
        Op::IntentUnreadable(Some(0)),
        unconfigure(1, 2),
        Op::LedgerFull(true),
        Op::IntentUnreadable(None),
        Op::Reconcile,
        Op::OtherReconcile,
    ])
    .unwrap();
}

/// Found by a random run of 3,000 cases at the end of session 11 (I1), OPEN.
/// A prepare's vfio bind fails and its rollback bind to nvidia fails, so the
/// GPU function is parked on vfio; the record stays `Configuring` and names
/// the override the move planned for the audio function but never wrote.
/// The admin then writes that same value (`vfio-pci`) on the audio function.
/// Reconcile reads it as ours, rolls the GPU back to nvidia and clears the
/// admin's override. Fix to make: a move that fails records only the
/// overrides it actually wrote, before the record is left for reconcile.
#[test]
#[ignore = "open: a planned override never written is read as ours (session 11)"]
fn an_admin_override_on_the_audio_function_after_a_failed_prepare_keeps_the_gpu() {
    run(&[
        Op::BindFails {
            f: 0,
            vfio: false,
            times: 1,
            errno: errno::EIO,
        },
        Op::BindFails {
            f: 0,
            vfio: true,
            times: 1,
            errno: errno::EIO,
        },
        configure(0, 1),
        Op::AdminOverride {
            f: 1,
            to: Some(true),
        },
        configure(0, 2),
    ])
    .unwrap();
}
