//! `driver_override` not written by this plugin: a vfio driver keeps the
//! GPU, anything else pins it.

use super::*;

/// Applies this source's rule to `v`.
pub(super) fn apply(v: &mut Verdict, input: &RuleInput<'_>) {
    let &RuleInput { fns, records, .. } = input;
    // driver_override.
    for f in fns {
        match f.driver_override {
            None => v.signal(
                Source::DriverOverride,
                format!("{}: driver_override is unset", f.bdf),
            ),
            Some(o) if records.wrote_override(f.bdf, o, f.driver.is_some() && !f.on_vfio) => v.signal(
                Source::DriverOverride,
                format!("{}: driver_override {o} was written by this plugin", f.bdf),
            ),
            Some(o) if is_vfio_driver(o) => v.reason(
                Source::DriverOverride,
                format!(
                    "{}: driver_override is {o} and this plugin did not write it: someone routed it to vfio",
                    f.bdf
                ),
            ),
            Some(o) => v.pin(Pin {
                bdf: Some(f.bdf),
                driver: Some(o.to_string()),
                source: Source::DriverOverride,
                detail: format!(
                    "{}: driver_override is {o} and this plugin did not write it: only {o} may bind it, never move it",
                    f.bdf
                ),
            }),
        }
    }
}
