//! driverctl overrides: a vfio driver keeps the GPU, a host driver or
//! `none` pins it where it is.

use super::*;

/// Applies this source's rule to `v`.
pub(super) fn apply(v: &mut Verdict, input: &RuleInput<'_>) {
    let &RuleInput { src, fns, .. } = input;
    // driverctl.
    for f in fns {
        match src.driverctl.entries.get(&f.bdf) {
            None => v.signal(
                Source::Driverctl,
                format!("no driverctl override for {}", f.bdf),
            ),
            Some(entry) => match &entry.setting {
                DriverctlSetting::Vfio(d) => v.reason(
                    Source::Driverctl,
                    format!(
                        "{} binds {} to {d} (driverctl passthrough)",
                        entry.path, f.bdf
                    ),
                ),
                DriverctlSetting::None => v.pin(Pin {
                    bdf: Some(f.bdf),
                    driver: Some("none".into()),
                    source: Source::Driverctl,
                    detail: format!(
                        "{} keeps {} unbound (driverctl override \"none\"): pinned",
                        entry.path, f.bdf
                    ),
                }),
                DriverctlSetting::Host(d) => v.pin(Pin {
                    bdf: Some(f.bdf),
                    driver: Some(d.clone()),
                    source: Source::Driverctl,
                    detail: format!(
                        "{} pins {} to {d} (driverctl): never move it",
                        entry.path, f.bdf
                    ),
                }),
                DriverctlSetting::Unknown(why) => {
                    let detail = format!(
                        "{} exists for {} but {why}: unknown configuration counts as admin intent",
                        entry.path, f.bdf
                    );
                    v.reason(Source::Driverctl, detail.clone());
                    v.pin(Pin {
                        bdf: Some(f.bdf),
                        driver: None,
                        source: Source::Driverctl,
                        detail,
                    });
                }
            },
        }
    }
}
