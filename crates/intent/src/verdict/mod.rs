//! The verdict: is a GPU kept on vfio by the administrator, pinned where it
//! is, and why. Every signal considered is recorded, matched or not.

mod rule_bound_at_start;
mod rule_driver_override;
mod rule_driverctl;
mod rule_policy;
mod rule_suppression;
mod rule_unknown;
mod rule_vfio_ids;

use std::collections::BTreeSet;

use serde::Serialize;
use vfio_gpu_host::{Bdf, DriverName, Gpu, HostRoot, PciIdentity, is_vfio_driver};

use crate::cmdline::{KernelParam, KmodCmdlineOption, kernel_params, kmod_options};
use crate::driverctl::{Driverctl, DriverctlSetting};
use crate::ids::{ParsedIds, parse_ids};
use crate::modprobe::{
    BuiltinStatus, ConfigProblem, IDS_MAX_LEN, ModprobeConfig, Origin, VFIO_PCI_MODULE,
    apply_module_options, builtin_status, normalize_module, vfio_option_segments,
};
use crate::policy::Policy;
use crate::read::{ReadOutcome, read_text};

/// Where a piece of intent comes from. Serialised kebab-case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// `vfio-pci.ids` (and other parameters) on the kernel command line.
    KernelCmdline,
    /// modprobe.d (and `/etc/initramfs-tools/modules`).
    Modprobe,
    /// `/etc/driverctl.d`.
    Driverctl,
    /// A function's `driver_override`.
    DriverOverride,
    /// Bound to a vfio driver when we found it, not by us.
    BoundAtStart,
    /// Our own policy file.
    Policy,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::KernelCmdline => "kernel-cmdline",
            Source::Modprobe => "modprobe",
            Source::Driverctl => "driverctl",
            Source::DriverOverride => "driver-override",
            Source::BoundAtStart => "bound-at-start",
            Source::Policy => "policy",
        })
    }
}

/// A signal that decided the verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reason {
    /// Where it comes from.
    pub source: Source,
    /// What matched, naming the entry and file:line where there is one.
    pub detail: String,
}

/// Anything considered, matched or not (feeds `explain`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Signal {
    /// Where it comes from.
    pub source: Source,
    /// True when it keeps the GPU on vfio or pins it; informational facts
    /// (suppression, corroboration) are false.
    pub matched: bool,
    /// A sentence for humans.
    pub detail: String,
}

/// The administrator pinned a function where it is: the plugin must never
/// move the GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pin {
    /// The pinned function (`None` when a whole source is unreadable).
    pub bdf: Option<Bdf>,
    /// The driver it is pinned to (`none` = unbound); `None` if unknown.
    pub driver: Option<String>,
    /// Where the pin comes from.
    pub source: Source,
    /// Why.
    pub detail: String,
}

/// The decision for one GPU (all of its functions).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// The GPU function's address.
    #[serde(rename = "pciBusID")]
    pub gpu: Bdf,
    /// The administrator wants this GPU on vfio: never return it to a host
    /// driver when a VM releases it.
    pub keep_on_vfio: bool,
    /// The signals that decided `keep_on_vfio` (empty when false).
    pub reasons: Vec<Reason>,
    /// Every signal considered, matched or not.
    pub signals: Vec<Signal>,
    /// Set when the administrator pinned a function where it is: never move.
    pub pinned: Option<Pin>,
    /// Host drivers (kmod module names) of this GPU's functions that the
    /// administrator suppressed; the engine must not restore to them.
    pub host_driver_suppressed: Vec<String>,
    /// Malformed or contradictory configuration met on the way.
    pub warnings: Vec<String>,
}

/// What a release of a GPU the plugin moved must do: the keep-or-restore
/// rule, decided here with the intent rules rather than in the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseDecision {
    /// Stay on vfio, for this reason.
    Keep(String),
    /// Return every function to its recorded driver.
    Restore,
}

impl Verdict {
    /// The keep-or-restore decision for a release. `was_on_vfio`: the GPU
    /// was on vfio before the plugin touched it; `original_drivers`: the
    /// host drivers its functions had.
    pub fn on_release<'a>(
        &self,
        was_on_vfio: bool,
        original_drivers: impl IntoIterator<Item = &'a str>,
    ) -> ReleaseDecision {
        if self.keep_on_vfio {
            return ReleaseDecision::Keep(self.reasons_text());
        }
        if was_on_vfio {
            return ReleaseDecision::Keep("it was on vfio before we touched it".into());
        }
        let suppressed = original_drivers
            .into_iter()
            .find(|d| self.host_driver_suppressed.iter().any(|s| s == d));
        match suppressed {
            Some(d) => ReleaseDecision::Keep(format!(
                "its host driver {d} is blacklisted or blocked by the admin"
            )),
            None => ReleaseDecision::Restore,
        }
    }

    /// The reasons for `keep_on_vfio`, in one line.
    pub fn reasons_text(&self) -> String {
        if self.reasons.is_empty() {
            return "no admin intent found".into();
        }
        self.reasons
            .iter()
            .map(|r| format!("{}: {}", r.source, r.detail))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// True when the plugin must not revert the GPU or must not move it at all.
    pub fn admin_owned(&self) -> bool {
        self.keep_on_vfio || self.pinned.is_some()
    }

    fn reason(&mut self, source: Source, detail: String) {
        self.signals.push(Signal {
            source,
            matched: true,
            detail: detail.clone(),
        });
        self.reasons.push(Reason { source, detail });
    }

    fn signal(&mut self, source: Source, detail: String) {
        self.signals.push(Signal {
            source,
            matched: false,
            detail,
        });
    }

    fn pin(&mut self, pin: Pin) {
        self.signals.push(Signal {
            source: pin.source,
            matched: true,
            detail: pin.detail.clone(),
        });
        // The first pin found is reported; all appear as signals.
        if self.pinned.is_none() {
            self.pinned = Some(pin);
        }
    }
}

/// What this plugin itself did, from its ledger (built elsewhere).
pub trait OwnRecords {
    /// True if this plugin wrote `value` to `bdf`'s `driver_override` in this
    /// boot and the value is still ours. `on_host_driver`: the function is
    /// bound to a driver other than vfio now (our vfio value is left on such a
    /// function only mid-move, before its unbind).
    fn wrote_override(&self, bdf: Bdf, value: &str, on_host_driver: bool) -> bool;
    /// True if this plugin bound `bdf` to its current vfio driver in this boot.
    fn bound_by_us(&self, bdf: Bdf) -> bool;
    /// True if the ledger recorded `bdf` as already on vfio when first seen.
    fn recorded_prebound(&self, bdf: Bdf) -> bool;
}

/// No records: nothing was done by us (a fresh start).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRecords;

impl OwnRecords for NoRecords {
    fn wrote_override(&self, _bdf: Bdf, _value: &str, _on_host_driver: bool) -> bool {
        false
    }
    fn bound_by_us(&self, _bdf: Bdf) -> bool {
        false
    }
    fn recorded_prebound(&self, _bdf: Bdf) -> bool {
        false
    }
}

/// An `ids=` value that vfio-pci applies, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdsClaim {
    /// Kernel command line or modprobe.
    pub source: Source,
    /// Exact origin.
    pub origin: Origin,
    /// The value as vfio-pci receives it.
    pub value: String,
    /// Its entries.
    pub parsed: ParsedIds,
}

/// A host driver the administrator suppressed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Suppression {
    /// kmod module name as it will be compared (underscores).
    pub module: String,
    /// Where.
    pub source: Source,
    /// What and how strong.
    pub detail: String,
}

/// Every source of admin intent on a host, read once.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IntentSources {
    /// `/proc/cmdline`, when readable.
    pub cmdline: Option<String>,
    /// Why `/proc/cmdline` could not be read.
    pub cmdline_problem: Option<ConfigProblem>,
    /// The kernel's reading of the command line.
    pub kernel_params: Vec<KernelParam>,
    /// kmod's reading of the command line.
    pub kmod_options: Vec<KmodCmdlineOption>,
    /// modprobe.d and initramfs-tools.
    pub modprobe: ModprobeConfig,
    /// Built-in vs module.
    pub builtin: BuiltinStatus,
    /// driverctl overrides.
    pub driverctl: Driverctl,
    /// Our policy file.
    pub policy: Policy,
    /// Why the policy file could not be used (the previous policy stands in).
    pub policy_problem: Option<ConfigProblem>,
    /// The `ids=` values vfio-pci applies (one per reading that applies).
    pub ids_claims: Vec<IdsClaim>,
    /// Host-wide facts every verdict repeats (e.g. "no vfio-pci.ids").
    pub host_signals: Vec<Signal>,
    /// Suppressed host drivers.
    pub suppressions: Vec<Suppression>,
    /// Corroborating facts, by the module they concern.
    pub corroborations: Vec<(String, Signal)>,
    /// Warnings about malformed configuration.
    pub warnings: Vec<String>,
}

/// The kmod module behind a PCI driver name (driver names are not module names).
fn module_of_driver(driver: &str) -> String {
    match driver {
        "xhci_hcd" => "xhci_pci".into(),
        "nvidia-gpu" => "ucsi_ccg".into(),
        other => normalize_module(other),
    }
}

impl IntentSources {
    /// Reads every source under `root`. Never fails: malformed content
    /// becomes warnings, unreadable content admin-owned intent.
    pub fn load(root: &HostRoot, policy: &Policy) -> IntentSources {
        let (cmdline, cmdline_problem) = match read_text(root, &root.rel("proc/cmdline")) {
            ReadOutcome::Text(t) => (Some(t), None),
            ReadOutcome::Missing => (
                None,
                Some(ConfigProblem {
                    path: "/proc/cmdline".into(),
                    error: "missing (is /proc mounted under the host root?)".into(),
                }),
            ),
            ReadOutcome::Failed(error) => (
                None,
                Some(ConfigProblem {
                    path: "/proc/cmdline".into(),
                    error,
                }),
            ),
        };
        let sources = IntentSources::build(
            cmdline,
            cmdline_problem,
            ModprobeConfig::load(root),
            builtin_status(root),
            Driverctl::load(root),
            policy.clone(),
        );
        tracing::debug!(
            builtin = ?sources.builtin.builtin,
            ids_claims = sources.ids_claims.len(),
            modprobe_files = sources.modprobe.files.len(),
            unreadable = sources.modprobe.problems.len()
                + usize::from(sources.cmdline_problem.is_some())
                + usize::from(sources.driverctl.problem.is_some()),
            warnings = sources.warnings.len(),
            "admin intent sources read"
        );
        sources
    }

    /// Builds sources from parts already read (tests, `explain` on captured
    /// configuration). `builtin` is `Some(true)` for a built-in vfio-pci.
    pub fn from_parts(
        cmdline: &str,
        modprobe: ModprobeConfig,
        builtin: Option<bool>,
        driverctl: Driverctl,
        policy: Policy,
    ) -> IntentSources {
        let detail = match builtin {
            Some(true) => "given: built in",
            Some(false) => "given: a module",
            None => "given: unknown",
        };
        IntentSources::build(
            Some(cmdline.to_string()),
            None,
            modprobe,
            BuiltinStatus {
                builtin,
                detail: detail.into(),
            },
            driverctl,
            policy,
        )
    }

    fn build(
        cmdline: Option<String>,
        cmdline_problem: Option<ConfigProblem>,
        modprobe: ModprobeConfig,
        builtin: BuiltinStatus,
        driverctl: Driverctl,
        policy: Policy,
    ) -> IntentSources {
        let text = cmdline.as_deref().unwrap_or("");
        let mut s = IntentSources {
            kernel_params: kernel_params(text),
            kmod_options: kmod_options(text),
            cmdline,
            cmdline_problem,
            warnings: modprobe
                .warnings
                .iter()
                .chain(&driverctl.warnings)
                .cloned()
                .collect(),
            modprobe,
            builtin,
            driverctl,
            policy,
            policy_problem: None,
            ids_claims: Vec::new(),
            host_signals: Vec::new(),
            suppressions: Vec::new(),
            corroborations: Vec::new(),
        };
        s.derive_ids_claims();
        s.derive_suppressions();
        s
    }

    /// The kernel's own handling of `vfio_pci.ids` for a built-in vfio-pci.
    fn kernel_rule(&mut self) -> Option<String> {
        let builtin = self.builtin.builtin;
        let mut value: Option<String> = None;
        let params: Vec<KernelParam> = self
            .kernel_params
            .iter()
            .filter(|p| p.normalized_name == "vfio_pci.ids")
            .cloned()
            .collect();
        for p in params {
            let shown = format!("{}={}", p.name, p.value.as_deref().unwrap_or(""));
            if p.after_dashdash {
                let what = if builtin == Some(true) {
                    "the built-in vfio-pci never sees it"
                } else {
                    "ignored if vfio-pci is built in (kmod still applies it to a module)"
                };
                self.host_signals.push(Signal {
                    source: Source::KernelCmdline,
                    matched: false,
                    detail: format!(
                        "{shown} comes after `--` on the kernel command line: it goes to init; {what}"
                    ),
                });
                continue;
            }
            match p.value {
                None => self.warnings.push(format!(
                    "kernel command line: {} without a value is rejected by the kernel (-EINVAL)",
                    p.name
                )),
                Some(v) if v.len() >= IDS_MAX_LEN => self.warnings.push(format!(
                    "kernel command line: {} value is {} bytes, over the kernel's {}; the kernel refuses it (-ENOSPC)",
                    p.name,
                    v.len(),
                    IDS_MAX_LEN - 1
                )),
                Some(v) => {
                    if let Some(prev) = value.replace(v) {
                        self.host_signals.push(Signal {
                            source: Source::KernelCmdline,
                            matched: false,
                            detail: format!(
                                "vfio-pci.ids={prev} is replaced by a later vfio-pci.ids on the kernel command line (last occurrence wins)"
                            ),
                        });
                    }
                }
            }
        }
        value
    }

    fn derive_ids_claims(&mut self) {
        let builtin = self.builtin.builtin;
        let detail = self.builtin.detail.clone();
        let any_cmdline_ids = self
            .kernel_params
            .iter()
            .any(|p| p.normalized_name == "vfio_pci.ids")
            || self
                .kmod_options
                .iter()
                .any(|o| o.module == VFIO_PCI_MODULE && o.param.replace('-', "_") == "ids");
        if !any_cmdline_ids {
            self.host_signals.push(Signal {
                source: Source::KernelCmdline,
                matched: false,
                detail: "kernel command line has no vfio-pci.ids".into(),
            });
        }
        match builtin {
            Some(true) => self.host_signals.push(Signal {
                source: Source::Modprobe,
                matched: false,
                detail: format!("vfio-pci is built into the kernel ({detail})"),
            }),
            Some(false) => self.host_signals.push(Signal {
                source: Source::Modprobe,
                matched: false,
                detail: format!(
                    "vfio-pci is a module ({detail}): modprobe.d options and kmod's reading of the kernel command line apply"
                ),
            }),
            None => self.host_signals.push(Signal {
                source: Source::Modprobe,
                matched: false,
                detail: format!(
                    "whether vfio-pci is built in is unknown ({detail}): both the kernel's and kmod's rules are applied, and modprobe.d options are treated as applying"
                ),
            }),
        }

        if builtin != Some(false)
            && let Some(value) = self.kernel_rule()
        {
            self.ids_claims.push(IdsClaim {
                source: Source::KernelCmdline,
                origin: Origin::KernelCmdline,
                parsed: parse_ids(&value),
                value,
            });
        }

        let segments = vfio_option_segments(&self.modprobe, &self.kmod_options);
        if builtin == Some(true) {
            let files: Vec<(String, Origin)> = segments
                .into_iter()
                .filter(|(_, o)| *o != Origin::KernelCmdline)
                .collect();
            if files.is_empty() {
                self.host_signals.push(Signal {
                    source: Source::Modprobe,
                    matched: false,
                    detail: "modprobe.d has no options for vfio-pci".into(),
                });
            }
            for (opts, origin) in files {
                self.host_signals.push(Signal {
                    source: Source::Modprobe,
                    matched: false,
                    detail: format!(
                        "modprobe.d options ignored: vfio-pci is built into the kernel (\"{opts}\" at {origin})"
                    ),
                });
            }
            return;
        }

        let eff = apply_module_options(&segments);
        for note in eff.notes {
            self.host_signals.push(Signal {
                source: Source::Modprobe,
                matched: false,
                detail: note,
            });
        }
        for err in eff.load_errors {
            self.warnings
                .push(format!("vfio-pci module options: {err}"));
        }
        for (value, origin) in eff.overridden {
            self.host_signals.push(Signal {
                source: source_of(&origin),
                matched: false,
                detail: format!(
                    "ids={value} at {origin} is overridden by a later ids= for vfio-pci (last ids= wins; the kernel command line comes after modprobe.d)"
                ),
            });
        }
        match eff.value {
            Some((value, origin)) => {
                let dup = self
                    .ids_claims
                    .iter()
                    .any(|c| c.origin == origin && c.value == value);
                if !dup {
                    self.ids_claims.push(IdsClaim {
                        source: source_of(&origin),
                        parsed: parse_ids(&value),
                        origin,
                        value,
                    });
                }
            }
            None => self.host_signals.push(Signal {
                source: Source::Modprobe,
                matched: false,
                detail: "no options for vfio-pci set ids= (modprobe.d, kernel command line, initramfs-tools)".into(),
            }),
        }
    }

    fn derive_suppressions(&mut self) {
        let mut sup = Vec::new();
        let mut corr = Vec::new();
        for b in &self.modprobe.blacklists {
            sup.push(Suppression {
                module: b.module.clone(),
                source: Source::Modprobe,
                detail: format!(
                    "blacklist {} at {}: udev will not autoload it (an explicit modprobe still can)",
                    b.module, b.origin
                ),
            });
        }
        for i in &self.modprobe.installs {
            if i.is_hard_block() {
                sup.push(Suppression {
                    module: i.module.clone(),
                    source: Source::Modprobe,
                    detail: format!(
                        "install {} {} at {}: modprobe can never load it",
                        i.module, i.command, i.origin
                    ),
                });
            } else if i.command.contains("vfio-pci") || i.command.contains("vfio_pci") {
                corr.push((
                    i.module.clone(),
                    Signal {
                        source: Source::Modprobe,
                        matched: false,
                        detail: format!(
                            "install {} {} at {}: loads vfio-pci first (corroborating)",
                            i.module, i.command, i.origin
                        ),
                    },
                ));
            }
        }
        for d in &self.modprobe.softdeps {
            if d.pre.iter().any(|m| normalize_module(m) == VFIO_PCI_MODULE) {
                corr.push((
                    d.module.clone(),
                    Signal {
                        source: Source::Modprobe,
                        matched: false,
                        detail: format!(
                            "softdep {} pre: {} at {}: vfio-pci loads before {} (corroborating)",
                            d.module,
                            d.pre.join(" "),
                            d.origin,
                            d.module
                        ),
                    },
                ));
            }
        }
        for o in &self.kmod_options {
            if o.module == "modprobe" && o.param == "blacklist" {
                for m in o.value.as_deref().unwrap_or("").split(',') {
                    if m.is_empty() {
                        continue;
                    }
                    sup.push(Suppression {
                        module: normalize_module(m),
                        source: Source::KernelCmdline,
                        detail: format!(
                            "modprobe.blacklist={} on the kernel command line: udev will not autoload {m}",
                            o.value.as_deref().unwrap_or("")
                        ),
                    });
                }
            }
        }
        // module_blacklist is a core parameter: last occurrence wins, not
        // after `--`, and names compare exactly (no dash folding).
        let module_blacklist = self
            .kernel_params
            .iter()
            .filter(|p| p.normalized_name == "module_blacklist" && !p.after_dashdash)
            .filter_map(|p| p.value.clone())
            .next_back();
        if let Some(list) = module_blacklist {
            for m in list.split(',').filter(|m| !m.is_empty()) {
                if m.contains('-') {
                    self.host_signals.push(Signal {
                        source: Source::KernelCmdline,
                        matched: false,
                        detail: format!(
                            "module_blacklist entry {m} blocks nothing: the kernel compares exact module names, which use underscores"
                        ),
                    });
                    continue;
                }
                sup.push(Suppression {
                    module: m.to_string(),
                    source: Source::KernelCmdline,
                    detail: format!(
                        "module_blacklist={list} on the kernel command line: the kernel refuses to load {m}"
                    ),
                });
            }
        }
        for p in &self.kernel_params {
            if p.normalized_name == "rd.driver.blacklist" {
                for m in p.value.as_deref().unwrap_or("").split(',') {
                    if m.is_empty() {
                        continue;
                    }
                    sup.push(Suppression {
                        module: normalize_module(m),
                        source: Source::KernelCmdline,
                        detail: format!(
                            "rd.driver.blacklist={} on the kernel command line: dracut blacklists {m}",
                            p.value.as_deref().unwrap_or("")
                        ),
                    });
                }
            }
            if p.normalized_name == "rd.driver.pre"
                && p.value
                    .as_deref()
                    .unwrap_or("")
                    .split(',')
                    .any(|m| normalize_module(m) == VFIO_PCI_MODULE)
            {
                corr.push((
                    VFIO_PCI_MODULE.to_string(),
                    Signal {
                        source: Source::KernelCmdline,
                        matched: false,
                        detail: format!(
                            "rd.driver.pre={} on the kernel command line: dracut loads vfio-pci early (corroborating)",
                            p.value.as_deref().unwrap_or("")
                        ),
                    },
                ));
            }
        }
        // vfio-pci itself suppressed: worth saying, it changes who wins the race.
        for s in sup.iter().filter(|s| s.module == VFIO_PCI_MODULE) {
            corr.push((
                VFIO_PCI_MODULE.to_string(),
                Signal {
                    source: s.source,
                    matched: false,
                    detail: format!("vfio-pci itself is suppressed: {}", s.detail),
                },
            ));
        }
        self.suppressions = sup;
        self.corroborations = corr;
    }
}

fn source_of(origin: &Origin) -> Source {
    match origin {
        Origin::KernelCmdline => Source::KernelCmdline,
        Origin::File { .. } => Source::Modprobe,
    }
}

/// One function of a GPU, as the verdict needs it.
struct FnView<'a> {
    bdf: Bdf,
    identity: &'a PciIdentity,
    driver: Option<&'a DriverName>,
    driver_override: Option<&'a str>,
    /// Bound to a vfio driver ([`vfio_gpu_host::PciFunction::on_vfio`]).
    on_vfio: bool,
}

fn functions_of(gpu: &Gpu) -> Vec<FnView<'_>> {
    if gpu.functions.is_empty() {
        return vec![FnView {
            bdf: gpu.function.bdf,
            identity: &gpu.function.identity,
            driver: gpu.function.driver.as_ref(),
            driver_override: gpu.function.driver_override.as_deref(),
            on_vfio: gpu.function.on_vfio(),
        }];
    }
    gpu.functions
        .iter()
        .map(|f| FnView {
            bdf: f.bdf,
            identity: &f.identity,
            driver: f.driver.as_ref(),
            driver_override: f.driver_override.as_deref(),
            on_vfio: f.on_vfio(),
        })
        .collect()
}

fn unknown_detail(p: &ConfigProblem, what: &str) -> String {
    format!(
        "cannot read {} ({}): {what} is unknown, and unknown configuration counts as admin intent",
        p.path, p.error
    )
}

/// Decides whether the administrator keeps `gpu` on vfio (or pinned it),
/// considering every function of the GPU and every source of intent.
pub fn evaluate(src: &IntentSources, gpu: &Gpu, records: &dyn OwnRecords) -> Verdict {
    let fns = functions_of(gpu);
    let mut v = Verdict {
        gpu: gpu.bdf(),
        keep_on_vfio: false,
        reasons: Vec::new(),
        signals: Vec::new(),
        pinned: None,
        host_driver_suppressed: Vec::new(),
        warnings: src.warnings.clone(),
    };
    // One rule per source, in the reference's order; each adds reasons
    // (keep on vfio), pins (never move) and signals (considered, no effect).
    let input = RuleInput {
        src,
        gpu,
        fns: &fns,
        records,
    };
    for rule in RULES {
        rule(&mut v, &input);
    }
    v.keep_on_vfio = !v.reasons.is_empty();
    v
}

/// What every rule reads: the sources, the GPU, its functions as seen now,
/// and this plugin's own records.
pub(super) struct RuleInput<'a> {
    src: &'a IntentSources,
    gpu: &'a Gpu,
    fns: &'a [FnView<'a>],
    records: &'a dyn OwnRecords,
}

/// A source's rule: adds its reasons, pins and signals to the verdict.
type Rule = fn(&mut Verdict, &RuleInput<'_>);

const RULES: [Rule; 7] = [
    rule_unknown::apply,
    rule_vfio_ids::apply,
    rule_driverctl::apply,
    rule_driver_override::apply,
    rule_bound_at_start::apply,
    rule_policy::apply,
    rule_suppression::apply,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modprobe::parse_file;
    use vfio_gpu_host::{FunctionRole, GpuFunction, PciFunction};

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    /// (address, vendor, device, class, driver, driver_override)
    type FnSpec<'a> = (&'a str, u16, u16, u32, Option<&'a str>, Option<&'a str>);

    fn gpu_with(functions: Vec<FnSpec<'_>>) -> Gpu {
        let fs: Vec<GpuFunction> = functions
            .iter()
            .enumerate()
            .map(|(i, (b, vendor, device, class, drv, ovr))| GpuFunction {
                bdf: bdf(b),
                role: if i == 0 {
                    FunctionRole::Gpu
                } else {
                    FunctionRole::Companion
                },
                identity: PciIdentity {
                    vendor: *vendor,
                    device: *device,
                    subsystem_vendor: *vendor,
                    subsystem_device: 0x16c1,
                    class: *class,
                },
                driver: drv.map(|d| DriverName::new(d).unwrap()),
                driver_override: ovr.map(str::to_string),
                vfio_dev: None,
            })
            .collect();
        let first = &fs[0];
        Gpu {
            function: PciFunction {
                bdf: first.bdf,
                identity: first.identity,
                revision: 0xa1,
                driver: first.driver.clone(),
                driver_override: first.driver_override.clone(),
                iommu_group: Some(1),
                numa_node: None,
                pcie_root: None,
                sriov_total_vfs: None,
                sriov_num_vfs: None,
                is_virtual_function: false,
                is_bridge: false,
                vfio_dev: None,
                modalias: None,
                bar_bytes: 0,
                bar_prefetchable64_bytes: 0,
                nvlink_management: false,
            },
            functions: fs,
            iommu_group_members: Vec::new(),
            unreadable_members: Vec::new(),
            product_name: None,
        }
    }

    fn h100_on(driver: &str) -> Gpu {
        gpu_with(vec![(
            "0000:65:00.0",
            0x10de,
            0x2330,
            0x030200,
            Some(driver),
            None,
        )])
    }

    fn sources(cmdline: &str, modprobe: &str, builtin: Option<bool>) -> IntentSources {
        let mut cfg = ModprobeConfig::default();
        cfg.absorb(parse_file(modprobe, "/etc/modprobe.d/vfio.conf"));
        IntentSources::from_parts(
            cmdline,
            cfg,
            builtin,
            Driverctl::default(),
            Policy::default(),
        )
    }

    #[test]
    fn cmdline_ids_keep_even_on_nvidia_upstream_1099() {
        for builtin in [Some(true), Some(false), None] {
            let s = sources("ro vfio-pci.ids=10de:2330 quiet", "", builtin);
            let v = evaluate(&s, &h100_on("nvidia"), &NoRecords);
            assert!(v.keep_on_vfio, "{builtin:?}: {v:#?}");
            assert_eq!(v.reasons.len(), 1);
            assert_eq!(v.reasons[0].source, Source::KernelCmdline);
            assert_eq!(
                v.reasons[0].detail,
                "0000:65:00.0: vfio-pci.ids entry 10de:2330 matches 10de:2330 (subsystem any) (from kernel command line)"
            );
        }
    }

    #[test]
    fn nothing_configured_means_not_kept_and_says_why() {
        let s = sources("ro quiet", "", Some(true));
        let v = evaluate(&s, &h100_on("nvidia"), &NoRecords);
        assert!(!v.keep_on_vfio);
        assert!(v.reasons.is_empty());
        assert!(v.pinned.is_none());
        let details: Vec<&str> = v.signals.iter().map(|s| s.detail.as_str()).collect();
        assert!(
            details.contains(&"kernel command line has no vfio-pci.ids"),
            "{details:#?}"
        );
        assert!(details.contains(&"no driverctl override for 0000:65:00.0"));
        assert!(details.contains(&"0000:65:00.0: driver_override is unset"));
        assert!(details.contains(&"0000:65:00.0 is on nvidia, not a vfio driver"));
        assert!(v.signals.iter().all(|s| !s.matched));
    }

    #[test]
    fn upstream_example_and_subsystem_entries() {
        // Upstream's own example: vfio-pci.ids=10de:2235 on a host with 10de:2235 GPUs.
        let s = sources("vfio-pci.ids=10de:2235", "", Some(true));
        let g = gpu_with(vec![(
            "0000:41:00.0",
            0x10de,
            0x2235,
            0x030000,
            Some("nvidia"),
            None,
        )]);
        assert!(evaluate(&s, &g, &NoRecords).keep_on_vfio);
        // The proposal's fix: subsystem ids narrow the claim to one model.
        let s = sources("vfio-pci.ids=10de:2330:10de:16c1", "", Some(true));
        assert!(evaluate(&s, &h100_on("nvidia"), &NoRecords).keep_on_vfio);
        let s = sources("vfio-pci.ids=10de:2330:10de:16c2", "", Some(true));
        let v = evaluate(&s, &h100_on("nvidia"), &NoRecords);
        assert!(!v.keep_on_vfio);
        assert!(
            v.signals
                .iter()
                .any(|s| s.detail.contains("(subsystem device differs)"))
        );
    }

    #[test]
    fn other_vendor_same_device_does_not_match() {
        let s = sources("vfio-pci.ids=10de:2330", "", Some(true));
        let amd = gpu_with(vec![(
            "0000:03:00.0",
            0x1002,
            0x2330,
            0x030000,
            Some("amdgpu"),
            None,
        )]);
        let v = evaluate(&s, &amd, &NoRecords);
        assert!(!v.keep_on_vfio);
        assert!(v.signals.iter().any(|s| s.detail
            == "0000:03:00.0: vfio-pci.ids entry 10de:2330 does not match 1002:2330 (vendor differs) (from kernel command line)"));
    }

    #[test]
    fn companion_function_match_keeps_the_gpu() {
        let s = sources("vfio_pci.ids=10de:22ba", "", Some(true));
        let g = gpu_with(vec![
            (
                "0000:ab:00.0",
                0x10de,
                0x26b1,
                0x030000,
                Some("nvidia"),
                None,
            ),
            (
                "0000:ab:00.1",
                0x10de,
                0x22ba,
                0x040300,
                Some("snd_hda_intel"),
                None,
            ),
        ]);
        let v = evaluate(&s, &g, &NoRecords);
        assert!(v.keep_on_vfio);
        assert!(v.reasons[0].detail.starts_with("0000:ab:00.1:"));
    }

    #[test]
    fn last_occurrence_wins_on_cmdline() {
        let s = sources(
            "vfio-pci.ids=10de:2330 vfio_pci.ids=10de:9999",
            "",
            Some(true),
        );
        assert!(!evaluate(&s, &h100_on("nvidia"), &NoRecords).keep_on_vfio);
        let s = sources(
            "vfio-pci.ids=10de:9999 vfio_pci.ids=10de:2330",
            "",
            Some(true),
        );
        assert!(evaluate(&s, &h100_on("nvidia"), &NoRecords).keep_on_vfio);
    }

    #[test]
    fn space_after_comma_splits_the_parameter() {
        // `ids=10de:1b80, 10de:2330`: the second id is a separate token.
        let s = sources("vfio-pci.ids=10de:1b80, 10de:2330", "", Some(true));
        assert!(!evaluate(&s, &h100_on("nvidia"), &NoRecords).keep_on_vfio);
        let s = sources("vfio-pci.ids=10de:1b80, 10de:2330", "", Some(false));
        assert!(!evaluate(&s, &h100_on("nvidia"), &NoRecords).keep_on_vfio);
        // Quoted, the space is inside the value and %x skips it.
        let s = sources("vfio-pci.ids=\"10de:1b80, 10de:2330\"", "", Some(true));
        assert!(evaluate(&s, &h100_on("nvidia"), &NoRecords).keep_on_vfio);
        let s = sources("vfio-pci.ids=\"10de:1b80, 10de:2330\"", "", Some(false));
        assert!(evaluate(&s, &h100_on("nvidia"), &NoRecords).keep_on_vfio);
    }

    #[test]
    fn after_dashdash_builtin_ignores_module_applies() {
        let cmd = "ro -- vfio-pci.ids=10de:2330";
        let v = evaluate(
            &sources(cmd, "", Some(true)),
            &h100_on("nvidia"),
            &NoRecords,
        );
        assert!(!v.keep_on_vfio);
        assert!(
            v.signals
                .iter()
                .any(|s| s.detail.contains("comes after `--`"))
        );
        let v = evaluate(
            &sources(cmd, "", Some(false)),
            &h100_on("nvidia"),
            &NoRecords,
        );
        assert!(v.keep_on_vfio, "kmod applies options after --");
        let v = evaluate(&sources(cmd, "", None), &h100_on("nvidia"), &NoRecords);
        assert!(v.keep_on_vfio, "unknown: kmod's reading counts");
    }

    #[test]
    fn modprobe_module_only_and_cmdline_beats_it() {
        let conf = "options vfio-pci ids=10de:2330\n";
        let v = evaluate(
            &sources("ro", conf, Some(false)),
            &h100_on("nvidia"),
            &NoRecords,
        );
        assert!(v.keep_on_vfio);
        assert_eq!(v.reasons[0].source, Source::Modprobe);
        assert!(
            v.reasons[0].detail.contains("/etc/modprobe.d/vfio.conf:1"),
            "{}",
            v.reasons[0].detail
        );

        let v = evaluate(
            &sources("ro", conf, Some(true)),
            &h100_on("nvidia"),
            &NoRecords,
        );
        assert!(!v.keep_on_vfio);
        assert!(v.signals.iter().any(|s| s.detail
            == "modprobe.d options ignored: vfio-pci is built into the kernel (\"ids=10de:2330\" at /etc/modprobe.d/vfio.conf:1)"));

        let v = evaluate(&sources("ro", conf, None), &h100_on("nvidia"), &NoRecords);
        assert!(v.keep_on_vfio);
        assert!(
            v.signals
                .iter()
                .any(|s| s.detail.contains("treated as applying"))
        );

        // The cmdline comes after modprobe.d: its ids replace the file's.
        let v = evaluate(
            &sources("vfio-pci.ids=10de:9999", conf, Some(false)),
            &h100_on("nvidia"),
            &NoRecords,
        );
        assert!(!v.keep_on_vfio, "{:#?}", v.reasons);
        assert!(v.signals.iter().any(|s| {
            s.detail
                .contains("ids=10de:2330 at /etc/modprobe.d/vfio.conf:1 is overridden")
        }));
    }

    #[test]
    fn malformed_entries_warn_others_apply() {
        let s = sources("vfio-pci.ids=zz,10de,10de:2330xyz", "", Some(true));
        let v = evaluate(&s, &h100_on("nvidia"), &NoRecords);
        assert!(v.keep_on_vfio);
        assert_eq!(
            v.warnings,
            vec![
                "vfio-pci ids from kernel command line: invalid id string \"zz\"",
                "vfio-pci ids from kernel command line: invalid id string \"10de\"",
            ]
        );
    }

    struct Ledger {
        wrote: Vec<(Bdf, String)>,
        bound: Vec<Bdf>,
        prebound: Vec<Bdf>,
    }
    impl OwnRecords for Ledger {
        fn wrote_override(&self, bdf: Bdf, value: &str, _on_host_driver: bool) -> bool {
            self.wrote.iter().any(|(b, v)| *b == bdf && v == value)
        }
        fn bound_by_us(&self, bdf: Bdf) -> bool {
            self.bound.contains(&bdf)
        }
        fn recorded_prebound(&self, bdf: Bdf) -> bool {
            self.prebound.contains(&bdf)
        }
    }

    #[test]
    fn driver_override_ours_vs_not() {
        let s = sources("ro", "", Some(true));
        let g = gpu_with(vec![(
            "0000:65:00.0",
            0x10de,
            0x2330,
            0x030200,
            None,
            Some("vfio-pci"),
        )]);
        let v = evaluate(&s, &g, &NoRecords);
        assert!(v.keep_on_vfio);
        assert_eq!(v.reasons[0].source, Source::DriverOverride);
        let ours = Ledger {
            wrote: vec![(bdf("0000:65:00.0"), "vfio-pci".into())],
            bound: vec![],
            prebound: vec![],
        };
        let v = evaluate(&s, &g, &ours);
        assert!(!v.keep_on_vfio, "{:#?}", v.reasons);
        // A host-driver override someone else wrote pins the GPU.
        let g = gpu_with(vec![(
            "0000:65:00.0",
            0x10de,
            0x2330,
            0x030200,
            Some("nvidia"),
            Some("nvidia"),
        )]);
        let v = evaluate(&s, &g, &NoRecords);
        assert!(!v.keep_on_vfio);
        let pin = v.pinned.unwrap();
        assert_eq!(
            (pin.source, pin.driver.as_deref()),
            (Source::DriverOverride, Some("nvidia"))
        );
    }

    #[test]
    fn bound_at_start_and_prebound_records() {
        let s = sources("ro", "", Some(true));
        let g = h100_on("vfio-pci");
        let v = evaluate(&s, &g, &NoRecords);
        assert!(v.keep_on_vfio);
        assert_eq!(v.reasons[0].source, Source::BoundAtStart);
        let ours = Ledger {
            wrote: vec![],
            bound: vec![bdf("0000:65:00.0")],
            prebound: vec![],
        };
        assert!(!evaluate(&s, &g, &ours).keep_on_vfio);
        let pre = Ledger {
            wrote: vec![],
            bound: vec![bdf("0000:65:00.0")],
            prebound: vec![bdf("0000:65:00.0")],
        };
        assert!(evaluate(&s, &g, &pre).keep_on_vfio);
        // A pre-bound record for a device now on nvidia does not keep it.
        assert!(!evaluate(&s, &h100_on("nvidia"), &pre).keep_on_vfio);
    }

    #[test]
    fn policy_bdf_and_model() {
        let mut policy = Policy::default();
        policy.keep_on_vfio.pci_bus_ids.push(bdf("0000:65:00.0"));
        let s = IntentSources::from_parts(
            "ro",
            ModprobeConfig::default(),
            Some(true),
            Driverctl::default(),
            policy,
        );
        let v = evaluate(&s, &h100_on("nvidia"), &NoRecords);
        assert!(v.keep_on_vfio);
        assert_eq!(v.reasons[0].source, Source::Policy);

        let policy = Policy::parse(
            "[keep-on-vfio]\nmodels = [\"10de:2330:10de:16c1\", \"10de:2331\"]\n",
            std::path::Path::new("/p"),
        )
        .unwrap();
        let s = IntentSources::from_parts(
            "ro",
            ModprobeConfig::default(),
            Some(true),
            Driverctl::default(),
            policy,
        );
        let v = evaluate(&s, &h100_on("nvidia"), &NoRecords);
        assert_eq!(v.reasons.len(), 1);
        assert!(
            v.reasons[0]
                .detail
                .contains("policy model 10de:2330:10de:16c1 matches")
        );
        assert!(v.signals.iter().any(|s| {
            s.detail
                .contains("policy model 10de:2331 does not match 10de:2330 (device differs)")
        }));
    }

    #[test]
    fn suppression_facts_do_not_change_the_verdict() {
        let s = sources(
            "modprobe.blacklist=nouveau module_blacklist=nvidia-drm,amdgpu",
            "blacklist nvidia\ninstall nouveau /bin/false\nsoftdep nvidia pre: vfio-pci\n",
            Some(false),
        );
        let v = evaluate(&s, &h100_on("nvidia"), &NoRecords);
        assert!(!v.keep_on_vfio);
        assert_eq!(v.host_driver_suppressed, vec!["nouveau", "nvidia"]);
        assert!(v.signals.iter().any(|s| {
            s.detail
                .contains("module_blacklist entry nvidia-drm blocks nothing")
        }));
        assert!(
            v.signals
                .iter()
                .any(|s| s.detail.contains("softdep nvidia pre: vfio-pci"))
        );
        assert!(v.signals.iter().all(|s| !s.matched));
        // amdgpu is not a driver of this GPU.
        assert!(!v.host_driver_suppressed.contains(&"amdgpu".to_string()));
    }

    #[test]
    fn verdict_serialises_camel_case_and_kebab_sources() {
        let s = sources("vfio-pci.ids=10de:2330", "", Some(true));
        let v = evaluate(&s, &h100_on("vfio-pci"), &NoRecords);
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["keepOnVfio"], true);
        assert_eq!(j["pciBusID"], "0000:65:00.0");
        assert_eq!(j["reasons"][0]["source"], "kernel-cmdline");
        assert_eq!(j["reasons"][1]["source"], "bound-at-start");
        assert!(j["hostDriverSuppressed"].is_array());
        assert!(j["signals"].as_array().unwrap().len() > 2);
    }
}
