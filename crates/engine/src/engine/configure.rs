//! configure: moving a GPU's IOMMU group to vfio.

use super::steps::{OperationBudget, StepError};
use super::view::{Action, Outcome, pin_text};
use super::{Engine, lock};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use vfio_gpu_host::{Bdf, DriverName, Gpu, PciFunction};
use vfio_gpu_intent::{Policy, VfioDriverChoice};

use crate::error::{EngineError, Verification};
use crate::kernel::SysfsWrite;
use crate::ledger::{Changes, GpuRecord, Holder, OpState};
use crate::preflight::choose_vfio_driver;
use crate::state::OnConfigure;

impl Engine {
    /// Moves a GPU (every endpoint function of its IOMMU group) to vfio for `holder`.
    ///
    /// Phases: what the ledger already says ([`Engine::prior_record`]),
    /// preflight ([`Engine::members_to_move`], [`Engine::persistence_plan`]),
    /// the write-ahead record, persistence off, the move, the completion commit.
    pub fn configure(&self, bdf: Bdf, holder: Holder) -> Result<Outcome, EngineError> {
        let (_hold, guard, started) = self.begin_gpu_op(bdf)?;
        let _g = lock(&guard);
        // Only once the locks are ours: waiting for another instance is not
        // this prepare's work (n8).
        let _budget = OperationBudget::start(self.config.operation_budget);
        // Before the first host write: a move that could not open the files
        // its rollback needs would strand the GPU (security review H1).
        check_fd_headroom(bdf)?;
        self.check_handed_over(bdf)?;
        let (carried, gpu) = match self.prior_record(bdf, &holder, started)? {
            Prior::Done(outcome) => return Ok(outcome),
            Prior::Carry(rec, gpu) => (rec.map(|r| *r), gpu),
        };
        // The GPU as `prior_record` read it, unless finishing an earlier
        // record changed the host since.
        let gpu = match gpu {
            Some(gpu) => *gpu,
            None => self.load_gpu(bdf)?,
        };
        let intent = self.intent()?;
        if let Some(pin) = &self.verdict(&intent, &gpu).pinned {
            return Err(EngineError::Pinned {
                bdf,
                detail: pin_text(pin),
            });
        }
        let group = gpu.function.iommu_group.ok_or(EngineError::NoIommu(bdf))?;
        let funcs = self.members_to_move(&gpu, &intent.policy)?;
        let vfio_driver = self.vfio_driver_for(&intent.policy, &gpu.function)?;
        if funcs.iter().all(|f| f.on_vfio()) {
            // Already on vfio (admin-owned): a VM outside Kubernetes may hold
            // it; handing it out would fail the tenant's open (review L3).
            let mut nodes = Vec::new();
            for f in &funcs {
                nodes.extend(self.nodes_of(f)?);
            }
            let holders = self.holders_of(bdf, nodes)?;
            if !holders.is_empty() {
                return Err(EngineError::Busy { bdf, holders });
            }
            // A drifted function that came back meanwhile: the carried record
            // keeps the origins (n14); only a GPU we never moved is recorded as found.
            let mut rec = match carried {
                Some(mut rec) => {
                    rec.state = OpState::Configured;
                    rec.holder = Some(holder.clone());
                    rec.stuck_on = None;
                    rec
                }
                None => self.found_on_vfio_record(
                    &gpu,
                    &funcs,
                    OpState::Configured,
                    Some(holder.clone()),
                ),
            };
            rec.served = true;
            self.set_record(bdf, Some(rec))?;
            return Ok(self.outcome(
                &gpu,
                Action::AlreadyOnVfio,
                format!("already on vfio; recorded for {holder}"),
                started,
            ));
        }
        let (nodes, persistence_disabled) = self.persistence_plan(bdf, &funcs)?;

        let changes = Changes {
            unbind_lock_taken: funcs.iter().any(|f| self.unbind_lock_path(f).is_some()),
            persistence_disabled: persistence_disabled.clone(),
            ..Changes::default()
        };
        let rec = match carried {
            Some(rec) => rec.redriven(
                holder.clone(),
                &funcs,
                &vfio_driver,
                changes,
                self.new_operation(),
            ),
            None => GpuRecord::configuring(
                holder.clone(),
                &funcs,
                &vfio_driver,
                changes,
                self.boot_id.clone(),
                self.new_operation(),
            ),
        };
        self.set_record(bdf, Some(rec))?;
        self.persistence_off(bdf, &persistence_disabled, nodes)?;
        let moved = self.move_to_vfio(&gpu, &funcs, &vfio_driver, group);
        self.finish_move(bdf, &funcs, moved)?;
        Ok(self.outcome(
            &gpu,
            Action::Moved,
            format!("moved to {vfio_driver} for {holder}"),
            started,
        ))
    }

    /// What the ledger already says about `bdf`, asked of the record state machine.
    fn prior_record(
        &self,
        bdf: Bdf,
        holder: &Holder,
        started: Instant,
    ) -> Result<Prior, EngineError> {
        self.prior_record_once(bdf, holder, started, true)
    }

    /// [`Engine::prior_record`]; `finish_first`: an unfinished record may be
    /// finished first and the record it leaves asked again (once: a record
    /// still unfinished after that starts afresh, as before).
    fn prior_record_once(
        &self,
        bdf: Bdf,
        holder: &Holder,
        started: Instant,
        finish_first: bool,
    ) -> Result<Prior, EngineError> {
        let gpu = self.load_gpu(bdf)?;
        for f in &gpu.functions {
            if let Some(op) = self.stuck.stuck_on(f.bdf) {
                return Err(EngineError::Stuck { bdf, op, secs: 0.0 });
            }
        }
        let Some(rec) = self.gpu_record(bdf) else {
            return Ok(Prior::Carry(None, Some(Box::new(gpu))));
        };
        if let Some(op) = &rec.stuck_on {
            return Err(EngineError::Stuck {
                bdf,
                op: op.clone(),
                secs: 0.0,
            });
        }
        let all_on_vfio = gpu.functions.iter().all(|f| f.on_vfio());
        match rec.on_configure(holder, all_on_vfio) {
            OnConfigure::AlreadyDone => Ok(Prior::Done(self.outcome(
                &gpu,
                Action::AlreadyConfigured,
                format!("already on vfio for {holder}"),
                started,
            ))),
            OnConfigure::Redrive => Ok(Prior::Carry(Some(Box::new(rec)), Some(Box::new(gpu)))),
            OnConfigure::Fresh => Ok(Prior::Carry(None, Some(Box::new(gpu)))),
            OnConfigure::FinishFirst if finish_first => {
                self.reconcile_record(&gpu, rec)?;
                // Finishing may have owed a reset that failed: a GPU it
                // quarantined goes to nobody, its holder included.
                self.check_handed_over(bdf)?;
                // What finishing left decides, not a fresh start: a GPU it
                // kept on vfio for intent keeps its origins (its override
                // and driver are ours, not the admin's).
                self.prior_record_once(bdf, holder, started, false)
            }
            OnConfigure::FinishFirst => Ok(Prior::Carry(None, None)),
            OnConfigure::HeldByOther(h) => Err(EngineError::HeldByOther { bdf, holder: h }),
        }
    }

    /// Every function that moves with the GPU, read now: its own functions,
    /// plus foreign group members when the policy allows them. No SR-IOV VFs.
    fn members_to_move(&self, gpu: &Gpu, policy: &Policy) -> Result<Vec<PciFunction>, EngineError> {
        let bdf = gpu.bdf();
        // Fabric guard rail (fabric.rs): an NVSwitch never moves, whatever the policy.
        super::fabric::refuse_fabric_switches(gpu)?;
        if !gpu.unreadable_members.is_empty() {
            let members: Vec<String> = gpu
                .unreadable_members
                .iter()
                .map(|b| format!("{b} (could not be read)"))
                .collect();
            return Err(EngineError::ForeignGroupMembers {
                bdf,
                members: members.join(", "),
            });
        }
        let mut movable: Vec<Bdf> = gpu.functions.iter().map(|f| f.bdf).collect();
        let blocking: Vec<String> = gpu
            .blocking_members()
            .map(|m| {
                format!(
                    "{} ({}, {})",
                    m.bdf,
                    m.identity.vendor_device(),
                    m.driver.as_ref().map(|d| d.as_str()).unwrap_or("no driver")
                )
            })
            .collect();
        if !blocking.is_empty() {
            if !policy.binding.allow_foreign_group_members {
                return Err(EngineError::ForeignGroupMembers {
                    bdf,
                    members: blocking.join(", "),
                });
            }
            movable.extend(gpu.blocking_members().map(|m| m.bdf));
        }
        let mut funcs = Vec::new();
        for b in &movable {
            let f = self.read(*b)?;
            if let Some(n) = f.sriov_num_vfs.filter(|n| *n > 0) {
                return Err(EngineError::VfsEnabled { bdf: *b, count: n });
            }
            funcs.push(f);
        }
        Ok(funcs)
    }

    /// No process may still use the GPU on its host driver, except
    /// nvidia-persistenced, which keeps it open while persistence mode is on:
    /// that is turned off (and back on at release) when the host has
    /// nvidia-smi. Returns the host device nodes and the functions whose
    /// persistence mode goes off.
    fn persistence_plan(
        &self,
        bdf: Bdf,
        funcs: &[PciFunction],
    ) -> Result<(Vec<PathBuf>, Vec<Bdf>), EngineError> {
        let mut nodes: Vec<PathBuf> = Vec::new();
        for f in funcs.iter().filter(|f| !f.on_vfio()) {
            nodes.extend(self.nodes_of(f)?);
        }
        let holders = self.holders_of(bdf, nodes.clone())?;
        let only_persistenced = !holders.is_empty()
            && holders.iter().all(|h| h.is_nvidia_persistenced())
            && self.commands.exists(&self.root, "nvidia-smi");
        if !holders.is_empty() && !only_persistenced {
            return Err(EngineError::Busy { bdf, holders });
        }
        let off = if only_persistenced {
            funcs
                .iter()
                .filter(|f| f.driver.as_ref().is_some_and(|d| d.as_str() == "nvidia"))
                .map(|f| f.bdf)
                .collect()
        } else {
            Vec::new()
        };
        Ok((nodes, off))
    }

    /// Turns persistence mode off where planned; rolls back if that fails
    /// or another process still holds the GPU afterwards.
    fn persistence_off(
        &self,
        bdf: Bdf,
        off: &[Bdf],
        nodes: Vec<PathBuf>,
    ) -> Result<(), EngineError> {
        if off.is_empty() {
            return Ok(());
        }
        let mut failed = None;
        for b in off {
            if let Err(e) = self.set_persistence(*b, false) {
                failed = Some(e);
                break;
            }
            self.mutation_done()?;
        }
        // A scan that cannot finish is not "no holders" (n12): roll back.
        let still = self.holders_of(bdf, nodes);
        if failed.is_none() && still.as_ref().is_ok_and(|h| h.is_empty()) {
            return Ok(());
        }
        if let Err(e) = self.rollback(bdf) {
            tracing::warn!(gpu = %bdf, error = %e, "rollback after persistence mode failed; reconcile retries");
        }
        match (failed, still) {
            (Some(detail), _) => Err(EngineError::Persistence { bdf, detail }),
            (None, Ok(holders)) => Err(EngineError::Busy { bdf, holders }),
            (None, Err(e)) => Err(e),
        }
    }

    /// Commits a successful move, or rolls a failed one back and says where
    /// every function is.
    fn finish_move(
        &self,
        bdf: Bdf,
        funcs: &[PciFunction],
        moved: Result<(), StepError>,
    ) -> Result<(), EngineError> {
        match moved {
            Ok(()) => {
                let moved: Vec<Bdf> = funcs
                    .iter()
                    .filter(|f| !f.on_vfio())
                    .map(|f| f.bdf)
                    .collect();
                let done = self.update_record(bdf, |r| {
                    r.state = OpState::Configured;
                    r.served = true;
                    for fr in r.functions.iter_mut().filter(|fr| moved.contains(&fr.bdf)) {
                        fr.bound_by_us = true;
                    }
                });
                if let Err(e) = &done {
                    // Unrecorded success is no success: a restart would roll it
                    // back under a running VM. Undo it now, while nobody uses it.
                    if !matches!(e, EngineError::SimulatedCrash(_)) {
                        self.rollback_logged(bdf, e);
                    }
                }
                done
            }
            Err(StepError::Engine(e @ EngineError::SimulatedCrash(_))) => Err(e),
            Err(StepError::Engine(e)) => {
                // Any failure after the write-ahead record puts back what can
                // be put back (a stuck function stays as it is).
                self.rollback_logged(bdf, &e);
                Err(e)
            }
            Err(StepError::Step {
                step,
                source: cause,
            }) => {
                let all: Vec<Bdf> = funcs.iter().map(|f| f.bdf).collect();
                let expected: BTreeMap<Bdf, Option<String>> = funcs
                    .iter()
                    .map(|f| (f.bdf, f.driver.as_ref().map(|d| d.to_string())))
                    .collect();
                match self.rollback(bdf) {
                    Ok(()) => Err(EngineError::RolledBack {
                        step,
                        cause,
                        functions: self.states(&all, &expected),
                    }),
                    Err(rb) => Err(EngineError::RollbackIncomplete {
                        step,
                        cause,
                        rollback: Box::new(rb),
                        functions: self.states(&all, &expected),
                    }),
                }
            }
        }
    }

    /// Rolls back after `cause` ended a configure; the caller returns
    /// `cause`, so a failed rollback is logged (its record stays for
    /// reconcile to finish).
    fn rollback_logged(&self, bdf: Bdf, cause: &EngineError) {
        if let Err(e) = self.rollback(bdf) {
            tracing::error!(%bdf, %cause, error = %e, "rollback after a failed configure failed; reconcile retries it");
        }
    }

    pub(super) fn vfio_driver_for(
        &self,
        policy: &Policy,
        f: &PciFunction,
    ) -> Result<DriverName, EngineError> {
        let driver = match &policy.binding.vfio_driver {
            VfioDriverChoice::Named(name) => name.clone(),
            // modules.alias is a file on disk, not a device attribute: it never
            // waits on a device lock, and under a slow CPU (TCG) parsing its
            // megabyte takes seconds, so it is not put under the read deadline
            // (the real-kernel VM suite quarantined GPUs for it).
            VfioDriverChoice::Auto => choose_vfio_driver(&self.root, f),
        };
        let loaded = |d: &DriverName| {
            let dir = self.root.pci_driver_dir(d);
            self.host_read(f.bdf, "read of the driver directory", move |k| {
                k.is_dir(&dir)
            })
        };
        if loaded(&driver)? {
            return Ok(driver);
        }
        let module = driver.as_str().replace('-', "_");
        if policy.binding.load_vfio_module {
            self.modprobe(f.bdf, &module)?;
            if loaded(&driver)? {
                return Ok(driver);
            }
        }
        Err(EngineError::VfioDriverMissing {
            driver: driver.to_string(),
            module,
        })
    }

    pub(super) fn modprobe(&self, gpu: Bdf, module: &str) -> Result<(), EngineError> {
        // The host's own modprobe and configuration, under the host root.
        self.run_program(gpu, "modprobe", vec![module.to_string()])
            .map(|_| ())
            .map_err(|detail| EngineError::Modprobe {
                module: module.into(),
                detail,
            })
    }

    pub(super) fn move_to_vfio(
        &self,
        gpu: &Gpu,
        funcs: &[PciFunction],
        vfio: &DriverName,
        group: u32,
    ) -> Result<(), StepError> {
        let gb = gpu.bdf();
        for f in funcs {
            if f.on_vfio() {
                continue;
            }
            self.take_unbind_lock(gb, f)?;
            self.steer_and_unbind(gb, f.bdf, vfio, f.driver.as_ref())?;
            self.step(
                gb,
                SysfsWrite::Bind {
                    bdf: f.bdf,
                    driver: vfio.clone(),
                },
            )?;
            let now_on = self.binding(f.bdf)?.driver;
            if now_on.as_ref() != Some(vfio) {
                return Err(StepError::verify(
                    Verification::BoundTo {
                        bdf: f.bdf,
                        driver: vfio.clone(),
                    },
                    format!(
                        "driver is {}",
                        now_on.map(|d| d.to_string()).unwrap_or("none".into())
                    ),
                ));
            }
        }
        // The group node appears with the first vfio member; a VM needs it,
        // or, on an iommufd-only kernel (CONFIG_VFIO_GROUP=n), each moved
        // function's device cdev.
        let node_exists = |path: PathBuf| {
            self.host_read(gb, "read of /dev/vfio", move |k| k.exists(&path))
                .unwrap_or(false)
        };
        let cdevs_present = || {
            funcs.iter().filter(|f| !f.on_vfio()).all(|f| {
                self.binding(f.bdf)
                    .ok()
                    .and_then(|b| b.vfio_dev)
                    .is_some_and(|v| node_exists(self.root.rel("dev/vfio/devices").join(v)))
            })
        };
        if !node_exists(self.root.dev_vfio_group(group)) && !cdevs_present() {
            return Err(StepError::verify(
                Verification::GroupNode { group },
                "the group node did not appear".into(),
            ));
        }
        // Viable: every member unbound or on a driver that manages DMA itself.
        for m in gpu.iommu_group_members.iter().map(|m| m.bdf) {
            let f = self.binding(m)?;
            if let Some(d) = &f.driver
                && !(f.on_vfio() || d.as_str() == "pci-stub" || d.as_str() == "pcieport")
            {
                return Err(StepError::verify(
                    Verification::GroupViable { group },
                    format!("{m} is on {d}"),
                ));
            }
        }
        Ok(())
    }
}

/// What the ledger's record of a GPU means for a configure.
enum Prior {
    /// Nothing to do: the outcome to return.
    Done(Outcome),
    /// Go on, carrying this record's origins (a re-drive) or starting afresh,
    /// with the GPU as read (`None`: the host changed since; read it again).
    Carry(Option<Box<GpuRecord>>, Option<Box<Gpu>>),
}

/// Descriptors a move keeps free for itself and its rollback: every sysfs
/// write and read opens one, a few at a time per function, plus the ledger.
pub(crate) const FD_RESERVE: u64 = 64;

/// Refuses a move while fewer than [`FD_RESERVE`] descriptors are free under
/// the soft `RLIMIT_NOFILE`. Counting needs a descriptor too: when even that
/// fails, nothing is free.
fn check_fd_headroom(bdf: Bdf) -> Result<(), EngineError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return Ok(());
    }
    let limit = lim.rlim_cur;
    // This process's own descriptors, not the host's: no host-root path.
    #[allow(clippy::disallowed_methods)]
    let open = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(limit);
    let free = limit.saturating_sub(open);
    if free < FD_RESERVE {
        return Err(EngineError::FdsExhausted {
            bdf,
            free,
            limit,
            needed: FD_RESERVE,
        });
    }
    Ok(())
}
