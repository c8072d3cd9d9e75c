//! Unknown configuration counts as admin intent (reference §12): an
//! unreadable command line, modprobe.d, policy or driverctl directory.

use super::*;

/// Applies this source's rule to `v`.
pub(super) fn apply(v: &mut Verdict, input: &RuleInput<'_>) {
    let &RuleInput { src, .. } = input;
    // Unknown configuration (reference §12: counts as owned).
    if let Some(p) = &src.cmdline_problem {
        v.reason(
            Source::KernelCmdline,
            unknown_detail(p, "vfio-pci.ids on the kernel command line"),
        );
    }
    for p in &src.modprobe.problems {
        if src.builtin.builtin == Some(true) {
            v.signal(
                Source::Modprobe,
                format!(
                    "cannot read {} ({}), but vfio-pci is built in, so modprobe.d cannot claim GPUs",
                    p.path, p.error
                ),
            );
            v.warnings
                .push(format!("cannot read {}: {}", p.path, p.error));
        } else {
            v.reason(
                Source::Modprobe,
                unknown_detail(p, "its modprobe configuration"),
            );
        }
    }
    if let Some(p) = &src.policy_problem {
        v.reason(Source::Policy, unknown_detail(p, "the policy"));
    }
    if let Some(p) = &src.driverctl.problem {
        let detail = unknown_detail(p, "driverctl's overrides");
        v.reason(Source::Driverctl, detail.clone());
        v.pin(Pin {
            bdf: None,
            driver: None,
            source: Source::Driverctl,
            detail,
        });
    }
}
