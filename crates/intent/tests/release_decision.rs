#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! The keep-or-restore rule lives with the intent rules.

use vfio_gpu_intent::{Reason, ReleaseDecision, Source, Verdict};

fn verdict(keep: bool, suppressed: &[&str]) -> Verdict {
    Verdict {
        gpu: "0000:66:00.0".parse().unwrap(),
        keep_on_vfio: keep,
        reasons: if keep {
            vec![Reason {
                source: Source::Driverctl,
                detail: "pci-0000:66:00.0 names vfio-pci".into(),
            }]
        } else {
            Vec::new()
        },
        signals: Vec::new(),
        pinned: None,
        host_driver_suppressed: suppressed.iter().map(|s| s.to_string()).collect(),
        warnings: Vec::new(),
    }
}

#[test]
fn release_keeps_for_intent_history_or_a_suppressed_driver_and_restores_otherwise() {
    assert!(matches!(
        verdict(true, &[]).on_release(false, ["nvidia"]),
        ReleaseDecision::Keep(why) if why.starts_with("driverctl:")
    ));
    assert!(matches!(
        verdict(false, &[]).on_release(true, ["nvidia"]),
        ReleaseDecision::Keep(why) if why.contains("before we touched it")
    ));
    assert!(matches!(
        verdict(false, &["nvidia"]).on_release(false, ["nvidia", "snd_hda_intel"]),
        ReleaseDecision::Keep(why) if why.contains("nvidia is blacklisted")
    ));
    assert_eq!(
        verdict(false, &["nouveau"]).on_release(false, ["nvidia"]),
        ReleaseDecision::Restore
    );
}

#[test]
fn source_names_match_their_serialized_form() {
    for s in [
        Source::KernelCmdline,
        Source::Modprobe,
        Source::Driverctl,
        Source::DriverOverride,
        Source::BoundAtStart,
        Source::Policy,
    ] {
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json.as_str(), Some(s.to_string().as_str()));
    }
}
