//! Bound at start (libvirt's rule): on vfio with no record that this
//! plugin bound it, or recorded as pre-bound.

use super::*;

/// Applies this source's rule to `v`.
pub(super) fn apply(v: &mut Verdict, input: &RuleInput<'_>) {
    let &RuleInput { fns, records, .. } = input;
    // Bound at start (libvirt's rule) and pre-bound records.
    for f in fns {
        match f.driver {
            Some(d) if f.on_vfio => {
                if records.recorded_prebound(f.bdf) {
                    v.reason(
                        Source::BoundAtStart,
                        format!("{} is on {d} and recorded as admin-owned (found on vfio, or kept there by admin intent at a release)", f.bdf),
                    );
                } else if !records.bound_by_us(f.bdf) {
                    v.reason(
                        Source::BoundAtStart,
                        format!(
                            "{} is on {d} and this plugin did not bind it: bound before us",
                            f.bdf
                        ),
                    );
                } else {
                    v.signal(
                        Source::BoundAtStart,
                        format!("{} is on {d} because this plugin bound it", f.bdf),
                    );
                }
            }
            Some(d) => {
                let extra = if records.recorded_prebound(f.bdf) {
                    "; its pre-bound record no longer applies"
                } else {
                    ""
                };
                v.signal(
                    Source::BoundAtStart,
                    format!("{} is on {d}, not a vfio driver{extra}", f.bdf),
                );
            }
            None => v.signal(
                Source::BoundAtStart,
                format!("{} is not bound to a driver", f.bdf),
            ),
        }
    }
}
