//! Handing a GPU from one tenant to the next: after a release, every function
//! of the group is reset through the kernel's own mechanism (`reset`, which
//! honours `reset_method`), an optional scrub hook runs, and the GPU is
//! verified (identity, BARs, link) before it is offered again. Each phase is
//! written ahead in the record (`handover`), so a crash resumes it; what to
//! do is asked of [`decide_handover`], never decided here. A failure
//! quarantines the GPU until an administrator resets it ([`Engine::reset_gpu`]).

use super::steps::StepError;
use super::view::{Action, Outcome};
use super::{Engine, lock};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_gpu_host::{Bdf, Gpu};
use vfio_gpu_intent::SanitizeMode;

use crate::deadline::read_with_deadline;
use crate::error::EngineError;
use crate::kernel::SysfsWrite;
use crate::ledger::{
    Fingerprint, GpuRecord, HANDOVER_AUDIT_KEPT, Handover, HandoverAudit, HandoverPhase,
    LedgerBody, OpState, Quarantine, QuarantineCause, now,
};
use crate::state::{FunctionHealth, HandoverStep, LinkState, decide_handover, verify_function};

/// Where a hand-over stands once its reset phase returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum AfterReset {
    /// No tenant was handed over: nothing was reset.
    Nothing,
    /// Recorded as handed over without a reset (`sanitize = "off"`).
    Unsanitized,
    /// A VM still holds the group: the reset waits (recorded, resumed by reconcile).
    Deferred(String),
    /// Reset (and hooked): verify once the functions are where they go.
    Verify,
    /// The reset or the hook failed: quarantined for this reason (committed).
    Quarantined(String),
}

/// The scrub hook's settings for one GPU.
struct HookPlan {
    program: PathBuf,
    limit: Duration,
}

impl Engine {
    /// Configure's check before its first host write: a quarantined GPU, or
    /// one whose last hand-over has not finished, goes to no tenant.
    pub(super) fn check_handed_over(&self, bdf: Bdf) -> Result<(), EngineError> {
        self.with_ledger(|ledger| {
            if let Some(q) = ledger.quarantined.get(&bdf) {
                return Err(EngineError::Quarantined {
                    bdf,
                    reason: q.reason.clone(),
                });
            }
            if let Some(h) = ledger.gpus.get(&bdf).and_then(|r| r.handover.as_ref()) {
                return Err(EngineError::HandoverPending {
                    bdf,
                    detail: format!("released by {} is at {:?}", h.released_by, h.phase),
                });
            }
            Ok(())
        })
    }

    /// The sanitize mode and hook for `gpu` from the policy in force. Policy
    /// that cannot be read means the default (`reset`): never skip a reset
    /// because a file was unreadable.
    fn sanitize_plan(&self, gpu: &Gpu) -> (SanitizeMode, Option<HookPlan>) {
        let policy = match self.intent() {
            Ok(snapshot) => snapshot.policy.sanitize,
            Err(_) => vfio_gpu_intent::Sanitize::default(),
        };
        let mode = policy.mode_for(&gpu.function.identity);
        let hook = policy.hook.map(|program| HookPlan {
            program,
            limit: Duration::from_secs(policy.hook_timeout_secs),
        });
        (mode, hook)
    }

    /// The reset phase of a hand-over, for the GPU record at `gpu`.
    /// `released_by`: the holder releasing it now (`None`: resuming one a
    /// crash or a busy VM interrupted, if the record has one).
    pub(super) fn handover_reset(
        &self,
        gpu: &Gpu,
        released_by: Option<String>,
    ) -> Result<AfterReset, EngineError> {
        let bdf = gpu.bdf();
        let Some(rec) = self.gpu_record(bdf) else {
            return Ok(AfterReset::Nothing);
        };
        let phase = rec.handover.as_ref().map(|h| h.phase);
        let (mode, hook) = self.sanitize_plan(gpu);
        let released_now = released_by.is_some();
        // The holder scan only when its answer can change the step.
        let mut step = decide_handover(mode, phase, released_now, false);
        let mut holders = Vec::new();
        if matches!(step, HandoverStep::Reset { .. }) {
            holders = self.vfio_users(&rec)?;
            step = decide_handover(mode, phase, released_now, !holders.is_empty());
        }
        let handover = rec
            .handover
            .clone()
            .unwrap_or_else(|| Handover::owed(released_by.as_deref().unwrap_or("unknown")));
        match step {
            HandoverStep::Nothing => Ok(AfterReset::Nothing),
            HandoverStep::Unsanitized => {
                let audit = audit_of(bdf, &handover, "none (sanitize = off)", "not verified");
                self.commit(|b| {
                    if let Some(r) = b.gpus.get_mut(&bdf) {
                        r.handover = None;
                        r.served = false;
                    }
                    push_audit(b, audit);
                })?;
                Ok(AfterReset::Unsanitized)
            }
            HandoverStep::WaitBusy => {
                if rec.handover.is_none() {
                    self.update_record(bdf, |r| {
                        r.handover = Some(handover.clone());
                        r.served = false;
                    })?;
                }
                let who: Vec<String> = holders
                    .iter()
                    .map(|h| format!("{} (pid {})", h.comm, h.pid))
                    .collect();
                Ok(AfterReset::Deferred(format!(
                    "its reset waits until {} lets go of the group",
                    who.join(", ")
                )))
            }
            HandoverStep::Verify => Ok(AfterReset::Verify),
            HandoverStep::Reset { hook: run_hook } => {
                // Write-ahead: a crash from here on resets again (a reset is idempotent).
                if phase != Some(HandoverPhase::Resetting) {
                    self.update_record(bdf, |r| {
                        r.handover = Some(handover.clone());
                        r.served = false;
                    })?;
                }
                let method = match self.reset_functions(bdf, &rec.functions_bdfs()) {
                    Ok(method) => method,
                    Err(Failure::Engine(e)) => {
                        if let EngineError::Stuck { op, secs, .. } = &e {
                            let why = format!("{op} did not return within {secs:.1} s");
                            self.quarantine_after_release(
                                bdf,
                                &handover,
                                "reset hung",
                                (QuarantineCause::ResetHung, &why),
                                true,
                            )?;
                        }
                        return Err(e);
                    }
                    Err(Failure::Quarantine(why)) => {
                        // Kept on vfio means on vfio: a function a failed move
                        // left without a driver is parked there, and one it left
                        // on its host driver loses our override (best effort;
                        // the quarantined record's next settle tries again).
                        let _ = self.keep_functions(bdf, &rec)?;
                        let on_vfio = self.any_on_vfio(&rec);
                        self.quarantine_after_release(
                            bdf,
                            &handover,
                            "reset failed",
                            (QuarantineCause::ResetFailed, &why),
                            on_vfio,
                        )?;
                        return Ok(AfterReset::Quarantined(why));
                    }
                };
                let hook_result = match (run_hook, &hook) {
                    (false, _) => "not configured".to_string(),
                    (true, None) => {
                        let why = "sanitize = \"reset+hook\" but no hook is configured".to_string();
                        self.quarantine_after_release(
                            bdf,
                            &handover,
                            &method,
                            (QuarantineCause::HookFailed, &why),
                            true,
                        )?;
                        return Ok(AfterReset::Quarantined(why));
                    }
                    (true, Some(plan)) => match self.run_scrub_hook(bdf, plan) {
                        Ok(out) => format!("ok: {}", first_line(&out)),
                        Err(e) => {
                            let why = format!("scrub hook {} failed: {e}", plan.program.display());
                            let mut h = handover.clone();
                            h.hook = Some(why.clone());
                            self.quarantine_after_release(
                                bdf,
                                &h,
                                &method,
                                (QuarantineCause::HookFailed, &why),
                                true,
                            )?;
                            return Ok(AfterReset::Quarantined(why));
                        }
                    },
                };
                self.update_record(bdf, |r| {
                    if let Some(h) = r.handover.as_mut() {
                        h.phase = HandoverPhase::Verifying;
                        h.reset_method = Some(method.clone());
                        h.hook = Some(hook_result.clone());
                    }
                })?;
                Ok(AfterReset::Verify)
            }
        }
    }

    /// The verify phase: every recorded function against its fingerprint,
    /// then the audit record (and a quarantine when it failed), with the
    /// hand-over cleared, in one commit. `Some(reason)` when quarantined.
    pub(super) fn handover_verify(&self, bdf: Bdf) -> Result<Option<String>, EngineError> {
        let Some(rec) = self.gpu_record(bdf) else {
            return Ok(None);
        };
        let Some(handover) = rec.handover.clone() else {
            return Ok(None);
        };
        let expected: BTreeMap<Bdf, Option<Fingerprint>> = rec
            .functions
            .iter()
            .map(|f| (f.bdf, f.fingerprint.clone()))
            .collect();
        let problems = self.verify_functions(&expected)?;
        let method = handover
            .reset_method
            .clone()
            .unwrap_or_else(|| "unknown (resumed)".into());
        if problems.is_empty() {
            let audit = audit_of(bdf, &handover, &method, "clean");
            self.commit(|b| {
                if let Some(r) = b.gpus.get_mut(&bdf) {
                    r.handover = None;
                }
                push_audit(b, audit);
            })?;
            return Ok(None);
        }
        let why = problems.join("; ");
        // Verified where the release put it: a kept record is on vfio
        // already, a restored one is dropped by the release's last commit.
        self.quarantine_after_release(
            bdf,
            &handover,
            &method,
            (QuarantineCause::VerificationFailed, &why),
            false,
        )?;
        Ok(Some(why))
    }

    /// Quarantines `bdf` after a failed hand-over, in one commit: the
    /// quarantine entry (with what each function must look like to leave
    /// it), the audit record, and the record without a holder or a
    /// hand-over, kept on vfio when `on_vfio` (the reset failed before any
    /// function went home, and some function is on vfio); a release that
    /// already put the functions back finishes as usual.
    fn quarantine_after_release(
        &self,
        bdf: Bdf,
        handover: &Handover,
        method: &str,
        (cause, why): (QuarantineCause, &str),
        on_vfio: bool,
    ) -> Result<(), EngineError> {
        let audit = audit_of(bdf, handover, method, &format!("failed: {why}"));
        let boot_id = self.boot_id.clone();
        self.commit(|b| {
            let mut fingerprints = BTreeMap::new();
            if let Some(r) = b.gpus.get_mut(&bdf) {
                r.handover = None;
                r.quarantine_keeps(on_vfio);
                r.updated = now();
                for f in &r.functions {
                    if let Some(fp) = &f.fingerprint {
                        fingerprints.insert(f.bdf, fp.clone());
                    }
                }
            }
            b.quarantined.insert(
                bdf,
                Quarantine {
                    reason: why.to_string(),
                    cause,
                    since: now(),
                    boot_id,
                    fingerprints,
                    extra: BTreeMap::new(),
                },
            );
            push_audit(b, audit);
        })
    }

    /// Any function of `rec` is on a vfio driver now (what a kept record means).
    pub(super) fn any_on_vfio(&self, rec: &GpuRecord) -> bool {
        rec.functions
            .iter()
            .any(|f| self.binding(f.bdf).is_ok_and(|b| b.on_vfio()))
    }

    /// Resets each function through its `reset` attribute, in record order
    /// (the GPU first). `Ok`: the methods the kernel had to choose from.
    fn reset_functions(&self, gpu: Bdf, functions: &[Bdf]) -> Result<String, Failure> {
        let mut methods = Vec::new();
        for &f in functions {
            let path = self.root.pci_attr(&f, "reset_method");
            let method = self
                .host_read(f, "read of reset_method", move |k| k.read_text(&path))
                .map_err(Failure::Engine)?
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "kernel default".into());
            match self.step(gpu, SysfsWrite::Reset { bdf: f }) {
                Ok(()) => methods.push(format!("{f}: {method}")),
                Err(StepError::Engine(e)) => return Err(Failure::Engine(e)),
                // Out of files or memory is this process's trouble, not the
                // device's: the hand-over stays recorded and is retried.
                Err(StepError::Step { step, source }) if transient(&source) => {
                    return Err(Failure::Engine(EngineError::RestoreFailed {
                        bdf: gpu,
                        step,
                        cause: source,
                        functions: self.states(functions, &BTreeMap::new()),
                    }));
                }
                Err(StepError::Step { source, .. }) => {
                    let why = if source.kind() == std::io::ErrorKind::NotFound {
                        format!("{f} has no reset method (no reset attribute): {source}")
                    } else {
                        format!("reset of {f} ({method}) failed: {source}")
                    };
                    return Err(Failure::Quarantine(why));
                }
            }
        }
        Ok(format!("reset attribute ({})", methods.join(", ")))
    }

    /// What each function looks like now, judged by [`verify_function`]
    /// against `expected`. Every read goes through the kernel edge, bounded.
    fn verify_functions(
        &self,
        expected: &BTreeMap<Bdf, Option<Fingerprint>>,
    ) -> Result<Vec<String>, EngineError> {
        let mut problems = Vec::new();
        for (&bdf, want) in expected {
            let f = self.read(bdf)?;
            let link = self.read_link(bdf)?;
            let health = FunctionHealth {
                bdf,
                now: Fingerprint::of(&f),
                link,
            };
            problems.extend(verify_function(want.as_ref(), &health));
        }
        Ok(problems)
    }

    /// The link attributes of `bdf`, or `None` when it has none (no PCIe
    /// capability) or they do not parse.
    fn read_link(&self, bdf: Bdf) -> Result<Option<LinkState>, EngineError> {
        let attr = |name: &str| self.root.pci_attr(&bdf, name);
        let paths = [
            attr("current_link_speed"),
            attr("max_link_speed"),
            attr("current_link_width"),
            attr("max_link_width"),
        ];
        let texts = self.host_read(bdf, "read of the link attributes", move |k| {
            paths
                .iter()
                .map(|p| k.read_text(p))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let [Some(cs), Some(ms), Some(cw), Some(mw)] =
            <[Option<String>; 4]>::try_from(texts).unwrap_or([None, None, None, None])
        else {
            return Ok(None);
        };
        let (Ok(current_width), Ok(max_width)) = (cw.trim().parse(), mw.trim().parse()) else {
            return Ok(None);
        };
        Ok(Some(LinkState {
            current_speed: cs.trim().to_string(),
            max_speed: ms.trim().to_string(),
            current_width,
            max_width,
        }))
    }

    /// Runs the scrub hook as `<hook> <GPU address>` on the host, killed at
    /// its limit (a hang marks the GPU stuck, like any blocked host call).
    fn run_scrub_hook(&self, gpu: Bdf, plan: &HookPlan) -> Result<String, String> {
        let commands = Arc::clone(&self.commands);
        let root = self.root.clone();
        let program = plan.program.to_string_lossy().into_owned();
        let label = format!("scrub hook {program} {gpu}");
        let limit = plan.limit;
        read_with_deadline(&self.stuck, gpu, &label, limit, move || {
            let arg = gpu.to_string();
            commands.run_for(&root, &program, &[arg.as_str()], limit)
        })
        .unwrap_or_else(Err)
    }

    /// The administrator's way out of quarantine (and a reset on demand):
    /// refuses while anything holds the GPU's functions, resets every
    /// function of the group, verifies each against what it was when found
    /// (the record's or the quarantine's fingerprints, else as read before
    /// the reset), and on success takes it out of quarantine. The GPU stays
    /// bound where it is; reconcile decides where a kept record goes next.
    pub fn reset_gpu(&self, bdf: Bdf) -> Result<Outcome, EngineError> {
        let (_hold, guard, started) = self.begin_gpu_op(bdf)?;
        let _g = lock(&guard);
        let gpu = self.load_gpu(bdf)?;
        let ledger = self.ledger();
        let rec = ledger.gpus.get(&bdf);
        // A write still blocked on any function, here or in another live
        // process (its claim in the state directory, n4): no reset may reach
        // that device (found by the model test, I9). The record names the
        // functions whose reads may block behind the held lock.
        let recorded = rec
            .into_iter()
            .flat_map(|r| r.functions.iter().map(|f| f.bdf));
        if let Some(op) = gpu
            .functions
            .iter()
            .map(|f| f.bdf)
            .chain(recorded)
            .find_map(|b| {
                self.stuck.stuck_on(b).or_else(|| {
                    self.stuck
                        .blocked_elsewhere(b)
                        .then(|| format!("a write to {b} still blocked in another process"))
                })
            })
        {
            return Err(EngineError::Stuck { bdf, op, secs: 0.0 });
        }
        if let Some(r) = rec
            && let Some(h) = &r.holder
            && r.state == OpState::Configured
        {
            return Err(EngineError::HeldByOther {
                bdf,
                holder: h.clone(),
            });
        }
        if let Some(r) = rec
            && matches!(r.state, OpState::Configuring | OpState::Releasing)
        {
            return Err(EngineError::Unfinished {
                bdf,
                state: format!("{:?}", r.state),
            });
        }
        let funcs = gpu
            .functions
            .iter()
            .map(|f| self.read(f.bdf))
            .collect::<Result<Vec<_>, _>>()?;
        let mut nodes = Vec::new();
        for f in &funcs {
            nodes.extend(self.nodes_of(f)?);
        }
        let holders = self.holders_of(bdf, nodes)?;
        if !holders.is_empty() {
            return Err(EngineError::Busy { bdf, holders });
        }
        let quarantine = ledger.quarantined.get(&bdf);
        let expected: BTreeMap<Bdf, Option<Fingerprint>> = funcs
            .iter()
            .map(|f| {
                let recorded = rec
                    .and_then(|r| r.function(f.bdf))
                    .and_then(|rf| rf.fingerprint.clone())
                    .or_else(|| quarantine.and_then(|q| q.fingerprints.get(&f.bdf).cloned()));
                (f.bdf, Some(recorded.unwrap_or_else(|| Fingerprint::of(f))))
            })
            .collect();
        let bdfs: Vec<Bdf> = gpu.functions.iter().map(|f| f.bdf).collect();
        let handover = Handover::owed("admin (vfio-gpu-dra reset)");
        let outcome = match self.reset_functions(bdf, &bdfs) {
            Ok(method) => {
                let problems = self.verify_functions(&expected)?;
                (method, problems)
            }
            Err(Failure::Engine(e)) => return Err(e),
            Err(Failure::Quarantine(why)) => {
                return self.admin_reset_quarantine(
                    bdf,
                    &handover,
                    ("reset failed", QuarantineCause::ResetFailed, why),
                    expected,
                );
            }
        };
        let (method, problems) = outcome;
        if problems.is_empty() {
            let audit = audit_of(bdf, &handover, &method, "clean");
            self.commit(|b| {
                b.quarantined.remove(&bdf);
                push_audit(b, audit);
            })?;
            return Ok(self.outcome(
                &gpu,
                Action::Reset,
                format!("reset and verified ({method}); not quarantined"),
                started,
            ));
        }
        self.admin_reset_quarantine(
            bdf,
            &handover,
            (
                &method,
                QuarantineCause::VerificationFailed,
                problems.join("; "),
            ),
            expected,
        )
    }

    /// An admin reset that failed: the GPU (stays) quarantined for `why`,
    /// with the audit record, in one commit.
    fn admin_reset_quarantine(
        &self,
        bdf: Bdf,
        handover: &Handover,
        (method, cause, why): (&str, QuarantineCause, String),
        expected: BTreeMap<Bdf, Option<Fingerprint>>,
    ) -> Result<Outcome, EngineError> {
        let boot_id = self.boot_id.clone();
        let audit = audit_of(bdf, handover, method, &format!("failed: {why}"));
        let fingerprints: BTreeMap<Bdf, Fingerprint> = expected
            .into_iter()
            .filter_map(|(b, f)| f.map(|f| (b, f)))
            .collect();
        self.commit(|b| {
            b.quarantined.insert(
                bdf,
                Quarantine {
                    reason: why.clone(),
                    cause,
                    since: now(),
                    boot_id,
                    fingerprints,
                    extra: BTreeMap::new(),
                },
            );
            push_audit(b, audit);
        })?;
        Err(EngineError::Quarantined { bdf, reason: why })
    }

    /// The outcome of a settle that quarantined the GPU.
    pub(super) fn quarantined_outcome(&self, gpu: &Gpu, why: &str, started: Instant) -> Outcome {
        self.outcome(
            gpu,
            Action::Quarantined,
            format!(
                "released; quarantined ({why}): kept on vfio and offered to nobody until `vfio-gpu-dra reset {}`",
                gpu.bdf()
            ),
            started,
        )
    }
}

/// Why a reset could not finish.
enum Failure {
    /// The engine could not go on (a blocked write, a ledger error).
    Engine(EngineError),
    /// The kernel refused or failed the reset: quarantine, for this reason.
    Quarantine(String),
}

impl crate::ledger::GpuRecord {
    /// The addresses of the recorded functions, GPU first.
    fn functions_bdfs(&self) -> Vec<Bdf> {
        self.functions.iter().map(|f| f.bdf).collect()
    }
}

fn audit_of(bdf: Bdf, h: &Handover, method: &str, verification: &str) -> HandoverAudit {
    HandoverAudit {
        gpu: bdf,
        released_by: h.released_by.clone(),
        released_at: h.released_at,
        finished_at: now(),
        reset_method: method.to_string(),
        verification: verification.to_string(),
        hook: h.hook.clone().unwrap_or_else(|| "not configured".into()),
        extra: BTreeMap::new(),
    }
}

/// Appends an audit record (and logs it: the log keeps the whole history),
/// dropping the oldest beyond [`HANDOVER_AUDIT_KEPT`] that is not its GPU's
/// last (`explain` shows each GPU's).
fn push_audit(b: &mut LedgerBody, audit: HandoverAudit) {
    tracing::info!(
        gpu = %audit.gpu,
        released_by = %audit.released_by,
        released_at = audit.released_at,
        finished_at = audit.finished_at,
        reset_method = %audit.reset_method,
        verification = %audit.verification,
        hook = %audit.hook,
        "hand-over"
    );
    b.handovers.push(audit);
    while b.handovers.len() > HANDOVER_AUDIT_KEPT {
        let list = &b.handovers;
        let Some(oldest) =
            (0..list.len()).find(|&i| list[i + 1..].iter().any(|later| later.gpu == list[i].gpu))
        else {
            break;
        };
        b.handovers.remove(oldest);
    }
}

/// An error of the writer's resources (file descriptors, memory, an
/// interrupted call), not an answer of the device.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    if matches!(
        e.kind(),
        ErrorKind::OutOfMemory | ErrorKind::StorageFull | ErrorKind::Interrupted
    ) {
        return true;
    }
    // The kernel edge keeps the errno only in its message.
    let text = e.to_string();
    e.raw_os_error().is_some_and(|c| c == ENFILE || c == EMFILE)
        || [ENFILE, EMFILE]
            .iter()
            .any(|c| text.contains(&format!("(os error {c})")))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}
