#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! Property tests: every parser is total (never panics) and keeps the
//! invariants its callers rely on.

use std::path::Path;

use proptest::prelude::*;
use vfio_gpu_host::PciIdentity;
use vfio_gpu_intent::modprobe::{parse_file, parse_initramfs_modules};
use vfio_gpu_intent::{
    IdEntry, ModprobeConfig, PCI_ANY_ID, Policy, effective_vfio_ids, kernel_params, kmod_options,
    parse_ids,
};

/// Strings rich in the characters the parsers care about.
fn tricky() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("\"".to_string()),
            Just("=".to_string()),
            Just(".".to_string()),
            Just("-".to_string()),
            Just(" ".to_string()),
            Just("\t".to_string()),
            Just("\n".to_string()),
            Just("\\".to_string()),
            Just("#".to_string()),
            Just(",".to_string()),
            Just(":".to_string()),
            Just("--".to_string()),
            Just("0x".to_string()),
            Just("\u{a0}".to_string()),
            Just("\0".to_string()),
            Just("vfio-pci.ids=".to_string()),
            Just("options vfio_pci ".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            "[0-9a-fA-F]{1,10}",
            any::<String>(),
        ],
        0..40,
    )
    .prop_map(|v| v.concat())
}

fn identity() -> impl Strategy<Value = PciIdentity> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u16>(),
        any::<u16>(),
        0u32..0x100_0000,
    )
        .prop_map(
            |(vendor, device, subsystem_vendor, subsystem_device, class)| PciIdentity {
                vendor,
                device,
                subsystem_vendor,
                subsystem_device,
                class,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn kernel_params_total(s in tricky()) {
        let params = kernel_params(&s);
        for p in &params {
            // Tokens never contain unquoted whitespace once split, and the
            // normalised name never contains '-'.
            prop_assert!(!p.normalized_name.contains('-'));
            prop_assert_eq!(p.normalized_name.len(), p.name.len());
        }
        // Once past `--`, always past it.
        let mut seen = false;
        for p in &params {
            if seen { prop_assert!(p.after_dashdash); }
            seen |= p.after_dashdash;
        }
    }

    #[test]
    fn kernel_params_of_plain_words_roundtrip(words in prop::collection::vec("[a-z_.]{1,8}(=[a-z0-9:,]{0,8})?", 0..10)) {
        let line = words.join(" ");
        let params = kernel_params(&line);
        prop_assert_eq!(params.len(), words.len());
        for (p, w) in params.iter().zip(&words) {
            let rebuilt = match &p.value { Some(v) => format!("{}={v}", p.name), None => p.name.clone() };
            prop_assert_eq!(&rebuilt, w);
        }
    }

    #[test]
    fn kmod_options_total(s in tricky()) {
        for o in kmod_options(&s) {
            // kmod only stores names without '.' before the param.
            prop_assert!(!o.module.contains('.'));
            prop_assert!(!o.param.contains('='));
        }
    }

    #[test]
    fn parse_ids_total(s in tricky()) {
        let p = parse_ids(&s);
        let nonempty = s.split(',').filter(|x| !x.is_empty()).count();
        prop_assert_eq!(p.entries.len() + p.warnings.len(), nonempty);
    }

    #[test]
    fn parse_ids_roundtrip_hex(v in any::<u16>(), d in any::<u16>(), sub in proptest::option::of((any::<u16>(), any::<u16>()))) {
        let text = match sub {
            Some((sv, sd)) => format!("{v:x}:{d:X}:{sv:#x}:{sd:04x}"),
            None => format!("{v:04x}:{d:04x}"),
        };
        let p = parse_ids(&text);
        prop_assert_eq!(p.entries.len(), 1);
        let e = &p.entries[0];
        prop_assert_eq!((e.vendor, e.device), (u32::from(v), u32::from(d)));
        match sub {
            Some((sv, sd)) => prop_assert_eq!((e.subvendor, e.subdevice), (u32::from(sv), u32::from(sd))),
            None => prop_assert_eq!((e.subvendor, e.subdevice), (PCI_ANY_ID, PCI_ANY_ID)),
        }
        prop_assert!(IdEntry::parse_strict(&text).is_some());
    }

    #[test]
    fn matching_agrees_with_reference(id in identity(), e in (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()), any_mask in any::<u8>()) {
        // Mix in wildcards and the device's own values so matches happen.
        let pick = |bit: u8, own: u32, rnd: u32| match (any_mask >> bit) & 3 { 0 => PCI_ANY_ID, 1 => own, _ => rnd };
        let entry = IdEntry {
            vendor: pick(0, id.vendor.into(), e.0),
            device: pick(2, id.device.into(), e.1),
            subvendor: pick(4, id.subsystem_vendor.into(), e.2),
            subdevice: pick(6, id.subsystem_device.into(), e.3),
            class: e.4,
            class_mask: e.5,
            text: String::new(),
        };
        let any_or = |want: u32, have: u16| want == PCI_ANY_ID || want == u32::from(have);
        let reference = any_or(entry.vendor, id.vendor)
            && any_or(entry.device, id.device)
            && any_or(entry.subvendor, id.subsystem_vendor)
            && any_or(entry.subdevice, id.subsystem_device)
            && (entry.class ^ id.class) & entry.class_mask == 0;
        prop_assert_eq!(entry.matches(&id), reference);
        let d = entry.describe(&id);
        prop_assert_eq!(d.contains(" does not match "), !reference);
    }

    #[test]
    fn modprobe_parsing_total(s in tricky()) {
        let f = parse_file(&s, "/etc/modprobe.d/x.conf");
        for o in &f.options {
            prop_assert!(!o.module.contains('-') || o.module.contains('['));
        }
        let mut cfg = ModprobeConfig::default();
        cfg.absorb(f);
        cfg.initramfs_options = parse_initramfs_modules(&s, "/etc/initramfs-tools/modules");
        let _ = effective_vfio_ids(&cfg, &kmod_options(&s));
    }

    #[test]
    fn policy_parsing_total(s in tricky()) {
        let _ = Policy::parse(&s, Path::new("/etc/vfio-gpu-dra/policy.toml"));
    }

    #[test]
    fn policy_parsing_total_structured(bdfs in prop::collection::vec(tricky(), 0..3), models in prop::collection::vec(tricky(), 0..3), drv in tricky()) {
        let q = |v: &Vec<String>| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        let text = format!("[keep-on-vfio]\npci-bus-ids = [{}]\nmodels = [{}]\n[binding]\nvfio-driver = {drv:?}\n", q(&bdfs), q(&models));
        let _ = Policy::parse(&text, Path::new("/p.toml"));
    }
}
