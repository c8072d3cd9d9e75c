//! `vfio-pci.ids` from the kernel command line or modprobe.d, whichever
//! reading applies (matched with `pci_match_one_id`).

use super::*;

/// Applies this source's rule to `v`.
pub(super) fn apply(v: &mut Verdict, input: &RuleInput<'_>) {
    let &RuleInput { src, fns, .. } = input;
    // vfio-pci.ids, from whichever reading applies.
    for claim in &src.ids_claims {
        let label = match claim.origin {
            Origin::KernelCmdline => "vfio-pci.ids entry",
            Origin::File { .. } => "vfio_pci ids= entry",
        };
        for w in &claim.parsed.warnings {
            v.warnings
                .push(format!("vfio-pci ids from {}: {w}", claim.origin));
        }
        if claim.parsed.entries.is_empty() {
            v.signal(
                claim.source,
                format!(
                    "vfio-pci ids={} from {} holds no valid entry",
                    claim.value, claim.origin
                ),
            );
        }
        for f in fns {
            for e in &claim.parsed.entries {
                let detail = format!(
                    "{}: {} (from {})",
                    f.bdf,
                    e.describe_as(label, f.identity),
                    claim.origin
                );
                if e.matches(f.identity) {
                    v.reason(claim.source, detail);
                } else {
                    v.signal(claim.source, detail);
                }
            }
        }
    }
    v.signals.extend(src.host_signals.iter().cloned());
}
