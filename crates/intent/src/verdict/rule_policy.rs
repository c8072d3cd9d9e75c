//! The plugin's own policy file: `[keep-on-vfio]` bus ids and models.

use super::*;

/// Applies this source's rule to `v`.
pub(super) fn apply(v: &mut Verdict, input: &RuleInput<'_>) {
    let &RuleInput { src, fns, .. } = input;
    // Our policy file.
    let keep = &src.policy.keep_on_vfio;
    if keep.pci_bus_ids.is_empty() && keep.models.is_empty() {
        v.signal(
            Source::Policy,
            "the policy keeps no GPUs on vfio (no pci-bus-ids, no models)".into(),
        );
    }
    for f in fns {
        if keep.pci_bus_ids.contains(&f.bdf) {
            v.reason(
                Source::Policy,
                format!(
                    "{} is listed in the policy's keep-on-vfio.pci-bus-ids",
                    f.bdf
                ),
            );
        } else if !keep.pci_bus_ids.is_empty() {
            v.signal(
                Source::Policy,
                format!("{} is not in the policy's keep-on-vfio.pci-bus-ids", f.bdf),
            );
        }
        for m in &keep.models {
            let detail = format!("{}: {}", f.bdf, m.describe_as("policy model", f.identity));
            if m.matches(f.identity) {
                v.reason(Source::Policy, detail);
            } else {
                v.signal(Source::Policy, detail);
            }
        }
    }
}
