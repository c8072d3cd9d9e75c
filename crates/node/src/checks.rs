//! The readiness checks: pure functions of the node facts and the GPU
//! view, each a [`Check`] with what was found and the fix.

use std::path::Path;

use serde::Serialize;
use vfio_gpu_engine::{GpuView, Inspection, pin_text};
use vfio_gpu_host::{
    Bdf, CpuVendor, FunctionRole, GpuFunction, IommuKind, IommuUnit, is_vfio_driver, vendor_modules,
};
use vfio_gpu_intent::modprobe::normalize_module;
use vfio_gpu_intent::{Policy, Source};

use crate::NodeFacts;
use crate::mmio::{MmioWindow, human_bytes};

/// A check's outcome. Ordered by severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Ready.
    Pass,
    /// Works, with a risk or an unknown worth a look.
    Warn,
    /// Passthrough will not work (or is unsafe) until fixed.
    Fail,
}

impl Status {
    /// The word the report prints: `pass`, `warn`, `FAIL`.
    pub fn word(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report (one JSON object).
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Check id: `iommu`, `interrupt-remapping`, `vfio-driver`,
    /// `vfio-load-order`, `gpus`, `guest-mmio`, `gpu-isolation`, `intent`,
    /// `quarantine`, `other-driver`.
    pub check: &'static str,
    /// Outcome.
    pub status: Status,
    /// The GPU a per-GPU check is about.
    #[serde(rename = "pciBusID", skip_serializing_if = "Option::is_none")]
    pub gpu: Option<Bdf>,
    /// What was found, and where it was read.
    pub detail: String,
    /// What to do; empty on pass.
    pub fix: String,
}

impl Check {
    pub(crate) fn new(check: &'static str, status: Status, detail: String, fix: String) -> Self {
        let fix = if status == Status::Pass {
            String::new()
        } else {
            fix
        };
        Check {
            check,
            status,
            gpu: None,
            detail,
            fix,
        }
    }

    pub(crate) fn pass(check: &'static str, detail: String) -> Self {
        Check::new(check, Status::Pass, detail, String::new())
    }

    pub(crate) fn for_gpu(mut self, bdf: Bdf) -> Self {
        self.gpu = Some(bdf);
        self
    }
}

/// Every check, node-wide first, then one `gpu-isolation` and one `intent`
/// entry per GPU.
pub fn diagnose(
    facts: &NodeFacts,
    view: &Inspection,
    policy: &Policy,
    policy_path: &Path,
) -> Vec<Check> {
    let mut out = vec![
        check_iommu(facts),
        check_interrupt_remapping(facts),
        check_vfio_driver(facts),
        check_load_order(facts, view),
        check_gpus(view),
        check_guest_mmio(view),
    ];
    for g in &view.gpus {
        out.push(check_isolation(g, policy, policy_path));
    }
    for g in &view.gpus {
        out.push(check_intent(g));
    }
    out.extend(view.gpus.iter().filter_map(check_quarantine));
    out
}

/// `guest-mmio`: the 64-bit MMIO window a VM given every GPU of this node
/// needs, and the largest one GPU needs; a warning when that exceeds what
/// an OVMF that does not size the window itself provides (kubevirt#11093).
pub fn check_guest_mmio(view: &Inspection) -> Check {
    const ID: &str = "guest-mmio";
    let per_gpu: Vec<u64> = view
        .gpus
        .iter()
        .map(|g| g.gpu.function.bar_prefetchable64_bytes)
        .collect();
    let all = MmioWindow::for_gpus(&per_gpu);
    let largest = view
        .gpus
        .iter()
        .max_by_key(|g| g.gpu.function.bar_prefetchable64_bytes);
    let Some(largest) = largest.filter(|_| all.window_bytes > 0) else {
        return Check::pass(ID, "no GPU with 64-bit prefetchable BARs".into());
    };
    let one = MmioWindow::for_gpus(&[largest.gpu.function.bar_prefetchable64_bytes]);
    let detail = format!(
        "one GPU ({}) needs a guest 64-bit MMIO window of {}; all {} GPUs in one VM need {}",
        largest.gpu.bdf(),
        human_bytes(one.window_bytes),
        per_gpu.len(),
        human_bytes(all.window_bytes)
    );
    if all.exceeds_legacy_ovmf() {
        Check::new(ID, Status::Warn, detail, all.guidance())
    } else {
        Check::pass(ID, detail)
    }
}

/// `quarantine`: a GPU that failed its reset, verification or scrub hook,
/// offered to nobody until the admin's reset clears it.
fn check_quarantine(g: &GpuView) -> Option<Check> {
    let q = g.quarantine.as_ref()?;
    let bdf = g.gpu.bdf();
    Some(
        Check::new(
            "quarantine",
            Status::Warn,
            format!(
                "{bdf} quarantined since {} (epoch s), {}: {}; published with the device taint                  <driver>/quarantined={}:NoSchedule where the API server keeps device taints                  (Kubernetes 1.37+, or DRADeviceTaints on), otherwise not offered",
                q.since,
                q.cause.as_str(),
                q.reason,
                q.cause.as_str()
            ),
            format!(
                "`vfio-gpu-dra reset {bdf}` resets, verifies and clears it (no reboot);                  if it fails again the device needs service"
            ),
        )
        .for_gpu(bdf),
    )
}

/// `iommu`: groups exist, and which parameters turn the IOMMU on.
pub fn check_iommu(f: &NodeFacts) -> Check {
    let shown: Vec<String> = ["intel_iommu", "amd_iommu", "iommu"]
        .iter()
        .filter_map(|n| f.param(n).map(|v| format!("{n}={v}")))
        .collect();
    let params = if shown.is_empty() {
        "no IOMMU parameter on /proc/cmdline".to_string()
    } else {
        format!("/proc/cmdline has {}", shown.join(" "))
    };
    let vendor = match f.cpu.vendor {
        Some(CpuVendor::Intel) => "Intel CPU",
        Some(CpuVendor::Amd) => "AMD CPU",
        Some(CpuVendor::Other) => "non-x86 CPU",
        None => "CPU vendor unknown (no /proc/cpuinfo)",
    };
    if f.groups > 0 {
        let pt = if f.param("iommu") == Some("pt") {
            ""
        } else {
            "; iommu=pt not set (optional: host devices keep DMA translation)"
        };
        return Check::pass(
            "iommu",
            format!(
                "IOMMU on: {} groups in /sys/kernel/iommu_groups; {params}; {vendor}{pt}",
                f.groups
            ),
        );
    }
    let has_off = |n: &str| f.param(n).is_some_and(|v| v.split(',').any(|o| o == "off"));
    let mut fix = Vec::new();
    for n in ["intel_iommu", "amd_iommu", "iommu"] {
        if has_off(n) {
            fix.push(format!("remove `{n}=off` from the kernel command line"));
        }
    }
    // Name only the parameters still missing, so the fix never repeats what is set.
    let intel_on = f
        .param("intel_iommu")
        .is_some_and(|v| v.split(',').any(|o| o == "on"));
    let pt = f.param("iommu") == Some("pt");
    let add = |params: &[(&str, bool)]| -> Option<String> {
        let missing: Vec<&str> = params
            .iter()
            .filter(|(_, set)| !set)
            .map(|(p, _)| *p)
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "add `{}` to the kernel command line (GRUB: GRUB_CMDLINE_LINUX in \
                     /etc/default/grub, then update-grub or grub2-mkconfig)",
                missing.join(" ")
            )
        })
    };
    match f.cpu.vendor {
        Some(CpuVendor::Intel) => {
            fix.extend(add(&[("intel_iommu=on", intel_on), ("iommu=pt", pt)]));
            fix.push("enable VT-d in the firmware setup".into());
        }
        Some(CpuVendor::Amd) => {
            fix.extend(add(&[("iommu=pt", pt)]));
            fix.push(
                "enable the IOMMU (AMD-Vi) in the firmware setup (the kernel turns AMD-Vi on by \
                 default; `amd_iommu=on` is not a valid value)"
                    .into(),
            );
        }
        Some(CpuVendor::Other) => fix.push(
            "enable the platform IOMMU (e.g. the SMMU) in the firmware and the kernel".into(),
        ),
        None => fix.push(
            "add `intel_iommu=on iommu=pt` (Intel CPU; and enable VT-d in the firmware) or \
             `iommu=pt` with AMD-Vi enabled in the firmware (AMD CPU) to the kernel command line"
                .into(),
        ),
    }
    fix.push("reboot".into());
    let mut detail =
        format!("IOMMU off: no groups in /sys/kernel/iommu_groups; {params}; {vendor}");
    if f.cpu.hypervisor {
        detail.push_str("; this node is a virtual machine (cpuinfo flag hypervisor)");
        fix.insert(
            0,
            "give this VM a virtual IOMMU (QEMU: q35 with `-device intel-iommu,intremap=on,\
             caching-mode=on`), then"
                .into(),
        );
    }
    Check::new("iommu", Status::Fail, detail, fix.join("; "))
}

const UNSAFE_RISK: &str = "a guest can then inject arbitrary interrupts (MSIs) into the host";

/// `interrupt-remapping`: VT-d ECAP bit 3 (IR) of every
/// `/sys/class/iommu/dmar*/intel-iommu/ecap`, AMD-Vi units (interrupt
/// remapping is part of AMD-Vi), `intremap=off`/`nointremap` on the command
/// line, and vfio_iommu_type1's `allow_unsafe_interrupts`. Without it
/// vfio_iommu_type1 refuses to attach a group unless unsafe interrupts are
/// allowed. The kernel log ("Enabled IRQ remapping") is not read.
pub fn check_interrupt_remapping(f: &NodeFacts) -> Check {
    const ID: &str = "interrupt-remapping";
    let unsafe_on = f.allow_unsafe_interrupts == Some(true);
    let disabled = f.param("intremap") == Some("off") || f.param("nointremap").is_some();
    let intel: Vec<&IommuUnit> = f
        .units
        .iter()
        .filter(|u| u.kind == IommuKind::IntelVtd)
        .collect();
    let amd = f
        .units
        .iter()
        .filter(|u| u.kind == IommuKind::AmdVi)
        .count();
    let names = |us: &[&IommuUnit]| {
        us.iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let without: Vec<&IommuUnit> = intel
        .iter()
        .copied()
        .filter(|u| u.supports_interrupt_remapping() == Some(false))
        .collect();
    let unknown: Vec<&IommuUnit> = intel
        .iter()
        .copied()
        .filter(|u| u.supports_interrupt_remapping().is_none())
        .collect();
    let unsafe_note = if unsafe_on {
        "; vfio_iommu_type1 allow_unsafe_interrupts=Y"
    } else {
        ""
    };
    let unsafe_fix = format!(
        "as a last resort on a trusted single-tenant node only: `options vfio_iommu_type1 \
         allow_unsafe_interrupts=1` in /etc/modprobe.d/vfio.conf ({UNSAFE_RISK})"
    );
    // Interrupt remapping missing or turned off: vfio refuses, unless unsafe.
    let missing = if disabled {
        Some((
            "interrupt remapping turned off on /proc/cmdline (intremap=off or nointremap)"
                .to_string(),
            "remove `intremap=off` / `nointremap` from the kernel command line and reboot"
                .to_string(),
        ))
    } else if !without.is_empty() {
        Some((
            format!(
                "VT-d units {} lack interrupt remapping (ECAP bit 3 clear in \
                 /sys/class/iommu/*/intel-iommu/ecap)",
                names(&without)
            ),
            "enable interrupt remapping (and x2APIC) in the firmware setup".to_string(),
        ))
    } else {
        None
    };
    if let Some((why, fix)) = missing {
        return if unsafe_on {
            Check::new(
                ID,
                Status::Warn,
                format!("{why}{unsafe_note}: VMs run without interrupt isolation"),
                format!("{fix}, then drop allow_unsafe_interrupts (while it is on, {UNSAFE_RISK})"),
            )
        } else {
            Check::new(
                ID,
                Status::Fail,
                format!("{why}: vfio refuses to attach the GPU's group"),
                format!("{fix}; {unsafe_fix}"),
            )
        };
    }
    if !intel.is_empty() && unknown.is_empty() {
        let detail = format!(
            "VT-d units {} support interrupt remapping (ECAP bit 3 in \
             /sys/class/iommu/*/intel-iommu/ecap); not turned off on /proc/cmdline{unsafe_note}",
            names(&intel)
        );
        return if unsafe_on {
            Check::new(
                ID,
                Status::Warn,
                detail,
                format!("drop allow_unsafe_interrupts: it is not needed here and {UNSAFE_RISK}"),
            )
        } else {
            Check::pass(ID, detail)
        };
    }
    if intel.is_empty() && amd > 0 {
        return Check::pass(
            ID,
            format!(
                "{amd} AMD-Vi units in /sys/class/iommu: interrupt remapping is part of AMD-Vi \
                 and not turned off on /proc/cmdline{unsafe_note}"
            ),
        );
    }
    let why = if f.units.is_empty() {
        "unknown: no IOMMU units in /sys/class/iommu".to_string()
    } else if !unknown.is_empty() {
        format!(
            "unknown: cannot read the ecap of VT-d units {}",
            names(&unknown)
        )
    } else {
        format!(
            "unknown for IOMMU units {} (not VT-d or AMD-Vi)",
            f.units
                .iter()
                .map(|u| u.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let fix = if f.groups == 0 {
        "turn the IOMMU on first (see the iommu check)".to_string()
    } else {
        "check the kernel log: `dmesg | grep -i remapping` should say \"Enabled IRQ remapping\""
            .to_string()
    };
    Check::new(ID, Status::Warn, format!("{why}{unsafe_note}"), fix)
}

/// `vfio-driver`: built in, or a module modprobe can find, and loaded.
pub fn check_vfio_driver(f: &NodeFacts) -> Check {
    const ID: &str = "vfio-driver";
    let release = f.module_files.release.as_deref().unwrap_or("(unknown)");
    if f.builtin.builtin == Some(true) {
        return match f.vfio_loaded {
            Some(p) => Check::pass(
                ID,
                format!("vfio-pci built in ({}); {p} present", f.builtin.detail),
            ),
            None => Check::new(
                ID,
                Status::Fail,
                format!(
                    "vfio-pci built in ({}) but /sys/bus/pci/drivers/vfio-pci is missing",
                    f.builtin.detail
                ),
                "check the kernel command line for `initcall_blacklist=vfio_pci_init` and the \
                 kernel log for vfio-pci errors"
                    .into(),
            ),
        };
    }
    let module = f
        .module_files
        .modules_dep_entry
        .as_deref()
        .or(f.module_files.ko_file.as_deref());
    match (f.vfio_loaded, module) {
        (Some(p), _) => Check::pass(
            ID,
            format!(
                "vfio-pci loaded ({p} present); module {}",
                module.unwrap_or("file not found under /lib/modules")
            ),
        ),
        (None, Some(m)) => Check::new(
            ID,
            Status::Warn,
            format!(
                "vfio-pci is a module of kernel {release} ({m}) but not loaded: bind and \
                 prepare fail until it is"
            ),
            "`modprobe vfio-pci`, and load it at every boot: `echo vfio-pci > \
             /etc/modules-load.d/vfio-pci.conf` (or set `load-vfio-module = true` under \
             [binding] in the policy file)"
                .into(),
        ),
        (None, None) => Check::new(
            ID,
            Status::Fail,
            format!(
                "vfio-pci missing: not loaded; {}; no vfio-pci module for kernel {release} in \
                 modules.dep or kernel/drivers/vfio/pci",
                f.builtin.detail
            ),
            "install the kernel's modules package that ships vfio-pci (Ubuntu: \
             `linux-modules-extra-$(uname -r)`) or boot a kernel built with CONFIG_VFIO_PCI=m or \
             =y, then `modprobe vfio-pci`"
                .into(),
        ),
    }
}

/// Host drivers that race vfio-pci for a GPU at boot: the driver holding it
/// now (if not a vfio one) and the modules whose `modules.alias` entry
/// matches its modalias; a vendor guess only when modules.alias is unreadable.
fn host_driver_candidates(f: &NodeFacts, g: &GpuView) -> Vec<String> {
    let function = &g.gpu.function;
    let mut found: Vec<String> = function
        .driver
        .as_ref()
        .filter(|d| !is_vfio_driver(d.as_str()))
        .map(|d| normalize_module(d.as_str()))
        .into_iter()
        .collect();
    match (&f.aliases, function.modalias.as_deref()) {
        (Some(aliases), Some(modalias)) => found.extend(aliases.host_modules(modalias)),
        // Only the drivers that bind the function race vfio-pci for it.
        _ => found.extend(
            vendor_modules(function.identity.vendor)
                .pci_drivers
                .iter()
                .map(|d| d.to_string()),
        ),
    }
    found.sort();
    found.dedup();
    found
}

/// `vfio-load-order`: with vfio-pci a module, a GPU claimed by `ids=`
/// (modprobe.d or the command line, which kmod applies at load) goes to
/// whichever driver loads first; a `softdep <host> pre: vfio-pci` (or
/// vfio-pci in the initramfs) makes that vfio-pci.
fn check_load_order(f: &NodeFacts, view: &Inspection) -> Check {
    const ID: &str = "vfio-load-order";
    if f.builtin.builtin == Some(true) {
        return Check::pass(
            ID,
            "vfio-pci is built in: it claims its ids= devices at boot, before modular GPU drivers"
                .into(),
        );
    }
    let by_ids: Vec<&GpuView> = view
        .gpus
        .iter()
        .filter(|g| {
            g.verdict
                .reasons
                .iter()
                .any(|r| matches!(r.source, Source::Modprobe | Source::KernelCmdline))
        })
        .collect();
    if by_ids.is_empty() {
        return Check::pass(
            ID,
            "no GPU is claimed by vfio-pci ids=: nothing races the host driver at boot".into(),
        );
    }
    let cfg = &f.modprobe;
    let satisfied = |drv: &str| {
        cfg.softdeps.iter().any(|s| {
            normalize_module(&s.module) == drv
                && s.pre.iter().any(|p| normalize_module(p) == "vfio_pci")
        }) || cfg.installs.iter().any(|i| {
            normalize_module(&i.module) == drv
                && (i.command.contains("vfio-pci") || i.command.contains("vfio_pci"))
        })
    };
    let suppressed = |drv: &str| {
        cfg.blacklists
            .iter()
            .any(|b| normalize_module(&b.module) == drv)
            || cfg
                .installs
                .iter()
                .any(|i| normalize_module(&i.module) == drv && i.is_hard_block())
    };
    // Only drivers this node has: loaded, or listed in modules.dep (when readable).
    let present = |drv: &str| {
        f.pci_drivers.contains(drv) || f.modules.as_ref().is_none_or(|m| m.contains(drv))
    };
    let gpus: Vec<String> = by_ids.iter().map(|g| g.gpu.bdf().to_string()).collect();
    let mut needed: Vec<String> = Vec::new();
    let mut have: Vec<String> = Vec::new();
    // (GPU, driver): a built-in driver holding a GPU the ids= name.
    let mut built_in: Vec<(String, String)> = Vec::new();
    for g in &by_ids {
        let bound = g
            .gpu
            .function
            .driver
            .as_ref()
            .map(|d| normalize_module(d.as_str()));
        for drv in host_driver_candidates(f, g) {
            if f.builtin_modules.contains(&drv) {
                if bound.as_deref() == Some(drv.as_str()) {
                    built_in.push((g.gpu.bdf().to_string(), drv));
                }
                continue;
            }
            if suppressed(&drv) || !present(&drv) || needed.contains(&drv) || have.contains(&drv) {
                continue;
            }
            if satisfied(&drv) {
                have.push(drv);
            } else {
                needed.push(drv);
            }
        }
    }
    if !built_in.is_empty() {
        return built_in_winner(&gpus, &built_in);
    }
    let early = (!f.early_vfio.is_empty()).then(|| {
        format!(
            "vfio-pci loads from the initramfs ({})",
            f.early_vfio.join(", ")
        )
    });
    let have_text = if have.is_empty() {
        String::new()
    } else {
        format!(
            "; {}",
            have.iter()
                .map(|d| format!("softdep {d} pre: vfio-pci"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if needed.is_empty() || early.is_some() {
        return Check::pass(
            ID,
            format!(
                "vfio-pci is a module and claims {} by ids=; {}{have_text}",
                gpus.join(" "),
                early.unwrap_or_else(|| "it loads before the host drivers".into())
            ),
        );
    }
    // A GPU the ids= name that sits on a host driver lost the race this boot.
    let lost: Vec<String> = by_ids
        .iter()
        .filter(|g| {
            g.gpu
                .function
                .driver
                .as_ref()
                .is_some_and(|d| !is_vfio_driver(d.as_str()))
        })
        .map(|g| g.gpu.bdf().to_string())
        .collect();
    let lines: Vec<String> = needed
        .iter()
        .map(|d| format!("`softdep {d} pre: vfio-pci`"))
        .collect();
    let fix = format!(
        "add {} to /etc/modprobe.d/vfio.conf, then rebuild the initramfs (update-initramfs -u \
         or dracut -f)",
        lines.join(" and ")
    );
    let detail = format!(
        "vfio-pci is a module and claims {} by ids=, but nothing loads it before {}{have_text}",
        gpus.join(" "),
        needed.join(", ")
    );
    if lost.is_empty() {
        Check::new(ID, Status::Warn, detail, fix)
    } else {
        Check::new(
            ID,
            Status::Fail,
            format!("{detail}; {} came up on the host driver", lost.join(" ")),
            fix,
        )
    }
}

/// A built-in host driver binds during boot, before any module (vfio-pci
/// included) loads: no softdep or initramfs order lets `ids=` win; an
/// override applied after boot (driverctl's udev rule) does.
fn built_in_winner(gpus: &[String], built_in: &[(String, String)]) -> Check {
    let held: Vec<String> = built_in
        .iter()
        .map(|(bdf, drv)| format!("{bdf} is on {drv}, which is built into the kernel"))
        .collect();
    let overrides: Vec<String> = built_in
        .iter()
        .map(|(bdf, _)| format!("`driverctl set-override {bdf} vfio-pci`"))
        .collect();
    Check::new(
        "vfio-load-order",
        Status::Fail,
        format!(
            "vfio-pci is a module and claims {} by ids=, but {}: it binds during boot before \
             any module loads, so ids= cannot win",
            gpus.join(" "),
            held.join("; ")
        ),
        format!(
            "run {} (persistent: driverctl's udev rule moves it to vfio-pci at every boot); \
             or boot a kernel with vfio-pci built in. Until then the plugin moves it at \
             prepare time and keeps it on vfio-pci afterwards (ids= counts as admin intent)",
            overrides.join(" and ")
        ),
    )
}

/// `gpus`: what the selector found, and functions that could not be read.
fn check_gpus(view: &Inspection) -> Check {
    let mut problems = view.problems.clone();
    if let Some(p) = &view.ledger_problem {
        problems.push(format!("ledger: {p}"));
    }
    if view.gpus.is_empty() {
        return Check::new(
            "gpus",
            Status::Warn,
            "no GPU matched the selector (NVIDIA display/3D controllers, physical functions)"
                .into(),
            "select other devices with --gpu-id VVVV:DDDD or --gpu-class".into(),
        );
    }
    let list: Vec<String> = view.gpus.iter().map(|g| g.gpu.bdf().to_string()).collect();
    let noun = if list.len() == 1 { "GPU" } else { "GPUs" };
    let detail = format!("{} {noun}: {}", list.len(), list.join(" "));
    if problems.is_empty() {
        Check::pass("gpus", detail)
    } else {
        Check::new(
            "gpus",
            Status::Warn,
            format!("{detail}; {}", problems.join("; ")),
            "check the named sysfs files (a read that fails or blocks hides that device)".into(),
        )
    }
}

fn describe(m: &GpuFunction) -> String {
    format!(
        "{} {:04x}:{:04x} ({})",
        m.bdf,
        m.identity.vendor,
        m.identity.device,
        m.driver.as_ref().map(|d| d.as_str()).unwrap_or("no driver")
    )
}

/// `gpu-isolation`: the GPU's IOMMU group holds only its own functions and
/// bridges.
fn check_isolation(g: &GpuView, policy: &Policy, policy_path: &Path) -> Check {
    const ID: &str = "gpu-isolation";
    let gpu = &g.gpu;
    let bdf = gpu.bdf();
    let Some(group) = gpu.function.iommu_group else {
        return Check::new(
            ID,
            Status::Fail,
            format!("{bdf}: no IOMMU group, vfio-pci cannot take it"),
            "turn the IOMMU on (see the iommu check)".into(),
        )
        .for_gpu(bdf);
    };
    let of_role = |role: FunctionRole| -> Vec<String> {
        gpu.iommu_group_members
            .iter()
            .filter(|m| m.role == role)
            .map(|m| m.bdf.to_string())
            .collect()
    };
    let blocking: Vec<String> = gpu.blocking_members().map(describe).collect();
    if blocking.is_empty() {
        let mut detail = format!("{bdf}: IOMMU group {group} holds only the GPU");
        let companions = of_role(FunctionRole::Companion);
        if !companions.is_empty() {
            detail.push_str(&format!(", its functions {}", companions.join(" ")));
        }
        let bridges = of_role(FunctionRole::Bridge);
        if !bridges.is_empty() {
            detail.push_str(&format!(" and bridges {}", bridges.join(" ")));
        }
        return Check::pass(ID, detail).for_gpu(bdf);
    }
    let other_gpus = !of_role(FunctionRole::OtherGpu).is_empty();
    let detail = format!(
        "{bdf}: IOMMU group {group} also holds {}",
        blocking.join(", ")
    );
    let slot_fix = format!(
        "move the card to a slot whose root port or switch isolates it (ACS), or enable ACS in \
         the firmware setup, so {} land in other IOMMU groups",
        gpu.blocking_members()
            .map(|m| m.bdf.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let policy_fix = format!(
        "or accept the risk with `allow-foreign-group-members = true` under [binding] in {}: \
         those devices move to vfio-pci with the GPU, the host loses them and the VM can reach \
         them by DMA",
        policy_path.display()
    );
    if policy.binding.allow_foreign_group_members && !other_gpus {
        Check::new(
            ID,
            Status::Warn,
            format!("{detail}; allowed by the policy (allow-foreign-group-members)"),
            format!("{slot_fix}; until then the VM gets those devices too and the host loses them"),
        )
        .for_gpu(bdf)
    } else {
        Check::new(
            ID,
            Status::Fail,
            detail,
            format!("{slot_fix}; {policy_fix}"),
        )
        .for_gpu(bdf)
    }
}

/// `intent`: the verdict `explain` shows, in one line.
fn check_intent(g: &GpuView) -> Check {
    const ID: &str = "intent";
    let v = &g.verdict;
    let bdf = g.gpu.bdf();
    let driver = g
        .gpu
        .function
        .driver
        .as_ref()
        .map(|d| d.as_str())
        .unwrap_or("no driver");
    let mut detail = if let Some(pin) = &v.pinned {
        format!("{bdf} on {driver}: pinned, never moved ({})", pin_text(pin))
    } else if v.keep_on_vfio {
        format!("{bdf} on {driver}: keepOnVfio ({})", v.reasons_text())
    } else {
        format!(
            "{bdf} on {driver}: movable (no admin intent found; returns to its driver on release)"
        )
    };
    if !v.warnings.is_empty() {
        detail.push_str(&format!("; warnings: {}", v.warnings.join("; ")));
    }
    let status = if v.pinned.is_some() || !v.warnings.is_empty() {
        Status::Warn
    } else {
        Status::Pass
    };
    let fix = if v.pinned.is_some() {
        format!(
            "intended? then nothing to do; to offer it to VMs remove the pin, see \
             `vfio-gpu-dra explain {bdf}`"
        )
    } else {
        format!("correct the configuration named in the warnings (`vfio-gpu-dra explain {bdf}`)")
    };
    Check::new(ID, status, detail, fix).for_gpu(bdf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_gpu_host::CpuInfo;
    use vfio_gpu_intent::kernel_params;

    fn facts() -> NodeFacts {
        NodeFacts::ready_intel_example()
    }

    /// The demo host as the engine inspects it.
    fn demo_inspection() -> Inspection {
        let dir = tempfile::tempdir().expect("tempdir");
        vfio_gpu_host::demo::build_demo_host(dir.path()).expect("demo host");
        let root = vfio_gpu_host::HostRoot::open(dir.path()).expect("host root");
        vfio_gpu_engine::inspect(
            &root,
            &vfio_gpu_host::GpuSelector::default(),
            &Policy::default(),
            None,
        )
        .expect("inspect")
    }

    #[test]
    fn guest_mmio_warns_past_the_legacy_ovmf_window_with_the_knob() {
        let view = demo_inspection();
        let c = check_guest_mmio(&view);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        // The H200s: a 256 GiB VRAM BAR and a 32 MiB one.
        assert!(
            c.detail.contains("0000:5d:00.0") || c.detail.contains("0000:3a:00.0"),
            "{c:?}"
        );
        assert!(c.detail.contains("512 GiB"), "{c:?}");
        assert!(c.fix.contains("X-PciMmio64Mb="), "{c:?}");
        let mut small = view.clone();
        for g in &mut small.gpus {
            g.gpu.function.bar_prefetchable64_bytes = 256 << 20;
        }
        assert_eq!(check_guest_mmio(&small).status, Status::Pass);
        let mut none = view;
        for g in &mut none.gpus {
            g.gpu.function.bar_prefetchable64_bytes = 0;
        }
        let c = check_guest_mmio(&none);
        assert_eq!((c.status, c.fix.as_str()), (Status::Pass, ""));
    }

    #[test]
    fn a_quarantined_gpu_gets_a_warning_naming_the_cause_and_the_reset() {
        let mut view = demo_inspection();
        assert!(view.gpus.iter().all(|g| check_quarantine(g).is_none()));
        let g = &mut view.gpus[0];
        g.quarantine = Some(vfio_gpu_engine::ledger::Quarantine {
            reason: "reset of 0000:18:00.0 (flr) failed: EIO".into(),
            cause: vfio_gpu_engine::ledger::QuarantineCause::ResetFailed,
            since: 7,
            boot_id: "b".into(),
            fingerprints: Default::default(),
            extra: Default::default(),
        });
        let c = check_quarantine(g).expect("a quarantine check");
        assert_eq!(c.status, Status::Warn);
        assert_eq!(c.gpu, Some(g.gpu.bdf()));
        assert!(
            c.detail.contains("ResetFailed") && c.detail.contains("EIO"),
            "{c:?}"
        );
        assert!(
            c.detail.contains("quarantined=ResetFailed:NoSchedule"),
            "{c:?}"
        );
        assert!(
            c.fix
                .contains(&format!("vfio-gpu-dra reset {}", g.gpu.bdf())),
            "{c:?}"
        );
        let all = diagnose(&facts(), &view, &Policy::default(), Path::new("/p"));
        assert_eq!(all.iter().filter(|c| c.check == "quarantine").count(), 1);
    }

    #[test]
    fn iommu_off_names_the_vendor_parameter() {
        let mut f = facts();
        f.groups = 0;
        f.params = kernel_params("ro intel_iommu=off");
        let c = check_iommu(&f);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("remove `intel_iommu=off`"), "{}", c.fix);
        assert!(c.fix.contains("`intel_iommu=on iommu=pt`"), "{}", c.fix);
        f.cpu.vendor = Some(CpuVendor::Amd);
        let c = check_iommu(&f);
        assert!(
            c.fix.contains("AMD-Vi") && c.fix.contains("`iommu=pt`"),
            "{}",
            c.fix
        );
        assert!(!c.fix.contains("`intel_iommu=on"), "{}", c.fix);
        f.cpu.hypervisor = true;
        assert!(
            check_iommu(&f)
                .fix
                .starts_with("give this VM a virtual IOMMU")
        );
        // Parameters already set are not asked for again: the firmware is the culprit.
        f.cpu = CpuInfo {
            vendor: Some(CpuVendor::Intel),
            hypervisor: false,
        };
        f.params = kernel_params("ro intel_iommu=on iommu=pt");
        let c = check_iommu(&f);
        assert!(!c.fix.contains("add `"), "{}", c.fix);
        assert!(
            c.fix.contains("enable VT-d in the firmware setup"),
            "{}",
            c.fix
        );
        f.params = kernel_params("ro intel_iommu=on");
        assert!(check_iommu(&f).fix.contains("add `iommu=pt`"));
    }

    #[test]
    fn iommu_on_passes_with_empty_fix() {
        let c = check_iommu(&facts());
        assert_eq!(c.status, Status::Pass);
        assert!(c.fix.is_empty());
        assert!(c.detail.contains("intel_iommu=on iommu=pt"), "{}", c.detail);
    }

    #[test]
    fn interrupt_remapping_from_ecap_and_unsafe_parameter() {
        let mut f = facts();
        assert_eq!(check_interrupt_remapping(&f).status, Status::Pass);
        f.units[0].ecap = Some(0x66);
        let c = check_interrupt_remapping(&f);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("allow_unsafe_interrupts=1"), "{}", c.fix);
        f.allow_unsafe_interrupts = Some(true);
        assert_eq!(check_interrupt_remapping(&f).status, Status::Warn);
        f.units.clear();
        f.allow_unsafe_interrupts = None;
        let c = check_interrupt_remapping(&f);
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.starts_with("unknown"), "{}", c.detail);
        let mut f = facts();
        f.params = kernel_params("intremap=off");
        assert_eq!(check_interrupt_remapping(&f).status, Status::Fail);
    }

    #[test]
    fn vfio_driver_states() {
        let mut f = facts();
        assert_eq!(check_vfio_driver(&f).status, Status::Pass);
        f.vfio_loaded = None;
        let c = check_vfio_driver(&f);
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.contains("modprobe vfio-pci"));
        f.module_files.modules_dep_entry = None;
        assert_eq!(check_vfio_driver(&f).status, Status::Fail);
    }
}
