//! Kernel modules that claim PCI functions: the running kernel's
//! `modules.alias`, the module → driver-directory rule, and the one table of
//! GPU host-driver modules per vendor (used by intent, preflight and doctor).

use crate::{DriverName, HostRoot};

/// The `alias` lines of the running kernel's `modules.alias`: which module
/// claims which modalias pattern.
#[derive(Clone, Debug, Default)]
pub struct ModuleAliases {
    entries: Vec<(String, String)>,
}

impl ModuleAliases {
    /// Reads `lib/modules/<release>/modules.alias` whole; `None` when the
    /// release, the file or a read fails (callers fall back to defaults).
    pub fn read(root: &HostRoot) -> Option<Self> {
        root.read_module_index("modules.alias")
            .ok()
            .flatten()
            .map(|text| Self::parse(&text))
    }

    /// Only the `vfio_pci:` aliases of `lib/modules/<release>/modules.alias`
    /// (the variant drivers, for [`ModuleAliases::vfio_module`]); `None` as
    /// for [`ModuleAliases::read`]. A distribution's file has tens of
    /// thousands of aliases and a handful of `vfio_pci:` ones: a GPU move
    /// reads it and keeps only those.
    pub fn read_vfio(root: &HostRoot) -> Option<Self> {
        root.read_module_index("modules.alias")
            .ok()
            .flatten()
            .map(|text| Self::parse_vfio(&text))
    }

    /// The `alias vfio_pci:… <module>` lines of `text` only, found by a
    /// substring search rather than by splitting every line (2 ms for a
    /// 27,000-line file).
    fn parse_vfio(text: &str) -> Self {
        const START: &str = "alias vfio_pci:";
        let entries = text
            .match_indices(START)
            .filter(|(at, _)| *at == 0 || text.as_bytes()[at - 1] == b'\n')
            .filter_map(|(at, _)| {
                let line = text[at..].split('\n').next().unwrap_or_default();
                let mut it = line.split_whitespace().skip(1);
                match (it.next(), it.next()) {
                    (Some(pattern), Some(module)) => {
                        Some((pattern.to_string(), module.to_string()))
                    }
                    _ => None,
                }
            })
            .collect();
        ModuleAliases { entries }
    }

    /// Parses `alias <pattern> <module>` lines; anything else is skipped.
    pub fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .filter_map(|line| {
                let mut it = line.split_whitespace();
                match (it.next(), it.next(), it.next()) {
                    (Some("alias"), Some(pattern), Some(module)) => {
                        Some((pattern.to_string(), module.to_string()))
                    }
                    _ => None,
                }
            })
            .collect();
        ModuleAliases { entries }
    }

    /// The `vfio_pci:` alias matching `modalias` (without its `pci:`
    /// prefix) with the fewest wildcards: a variant driver's module.
    pub fn vfio_module(&self, modalias: &str) -> Option<&str> {
        let mut best: Option<(usize, &str)> = None;
        for (pattern, module) in &self.entries {
            let Some(pattern) = pattern.strip_prefix("vfio_pci:") else {
                continue;
            };
            if glob_match(pattern.as_bytes(), modalias.as_bytes()) {
                let wild = pattern.matches('*').count();
                if best.is_none_or(|(w, _)| wild < w) {
                    best = Some((wild, module));
                }
            }
        }
        best.map(|(_, module)| module)
    }

    /// Host (non-vfio) modules whose `pci:` alias matches a function's
    /// `modalias` (`pci:v…`): the drivers that race vfio-pci for it at boot.
    /// Names normalised (`-` → `_`), sorted, without duplicates.
    pub fn host_modules(&self, modalias: &str) -> Vec<String> {
        let mut found: Vec<String> = self
            .entries
            .iter()
            .filter(|(pattern, _)| {
                pattern.starts_with("pci:") && glob_match(pattern.as_bytes(), modalias.as_bytes())
            })
            .map(|(_, module)| module.replace('-', "_"))
            // vfio-pci and its variants are what the GPU should end on.
            .filter(|module| !module.starts_with("vfio") && !module.contains("vfio_pci"))
            .collect();
        found.sort();
        found.dedup();
        found
    }
}

/// Module names use `_`; driver directories may use `-` (vfio_pci → vfio-pci).
pub fn module_to_driver(root: &HostRoot, module: &str) -> Option<DriverName> {
    let exact = DriverName::new(module).ok()?;
    let dashed = DriverName::new(&module.replace('_', "-")).ok()?;
    for cand in [&exact, &dashed] {
        if root.is_dir(&root.pci_driver_dir(cand)) {
            return Some(cand.clone());
        }
    }
    // Not loaded: vfio_pci's directory is vfio-pci; variants keep underscores.
    Some(if module == "vfio_pci" { dashed } else { exact })
}

/// A GPU vendor's host driver stack, as kmod module names (underscores).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VendorModules {
    /// Modules that bind the PCI function: they race vfio-pci for it at boot.
    pub pci_drivers: &'static [&'static str],
    /// Modules stacked on those drivers (`nvidia_drm` on `nvidia`): they
    /// never bind the function, but suppressing one still says the admin
    /// keeps the vendor's stack off the GPU.
    pub stacked: &'static [&'static str],
}

impl VendorModules {
    /// Every module of the stack: the PCI drivers, then the stacked ones.
    pub fn all(&self) -> impl Iterator<Item = &'static str> + use<> {
        self.pci_drivers.iter().chain(self.stacked).copied()
    }
}

/// The host driver stack of a GPU vendor (PCI vendor id); empty for an
/// unknown vendor. The one table: intent's suppression rule reads
/// [`VendorModules::all`], doctor's load-order check the PCI drivers.
pub fn vendor_modules(vendor: u16) -> VendorModules {
    let (pci_drivers, stacked): (&'static [&'static str], &'static [&'static str]) = match vendor {
        0x10de => (&["nvidia", "nouveau"], &["nvidia_drm", "nvidia_modeset"]),
        0x1002 => (&["amdgpu", "radeon"], &[]),
        0x8086 => (&["i915", "xe"], &[]),
        _ => (&[], &[]),
    };
    VendorModules {
        pci_drivers,
        stacked,
    }
}

/// Shell-style `*` matching (the only wildcard in modules.alias patterns we need).
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == s[si] || p[pi] == b'?') {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn host_modules_are_the_non_vfio_aliases_that_match() {
        let a = ModuleAliases::parse(
            "# comment\n\
             alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n\
             alias pci:v00008086d*sv*sd*bc03sc*i* i915\n\
             alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n\
             alias pci:v00008086d000010D3sv*sd*bc*sc*i* mlx5-vfio-pci\n\
             alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n\
             alias usb:v*p* usbcore\n",
        );
        assert_eq!(
            a.host_modules("pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00"),
            vec!["e1000e".to_string()]
        );
        assert!(
            a.host_modules("pci:v000010DEd00002330sv0sd0bc03sc02i00")
                .is_empty()
        );
    }

    /// The variant-driver lookup answers the same from the `vfio_pci:`
    /// aliases alone as from the whole file, and keeps nothing else (not a
    /// line that only contains the words, nor one that starts otherwise).
    #[test]
    fn the_vfio_aliases_alone_choose_the_same_variant_driver() {
        let text = "# comment\n\
             alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia\n\
             alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci\n\
             alias vfio_pci:v000010DEd00002941sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci\n\
             aliasx vfio_pci:v*d*sv*sd*bc*sc*i* wrong\n\
             # alias vfio_pci:v*d*sv*sd*bc*sc*i* commented\n\
             alias vfio_pci:truncated\n\
             alias usb:v*p* usbcore\n";
        let all = ModuleAliases::parse(text);
        let vfio = ModuleAliases::parse_vfio(text);
        assert_eq!(vfio.entries.len(), 2);
        for modalias in [
            "v000010DEd00002941sv000010DEsd00001234bc03sc02i00",
            "v000010DEd00002330sv000010DEsd00001234bc03sc02i00",
        ] {
            assert_eq!(vfio.vfio_module(modalias), all.vfio_module(modalias));
        }
        assert_eq!(
            vfio.vfio_module("v000010DEd00002941sv000010DEsd00001234bc03sc02i00"),
            Some("nvgrace_gpu_vfio_pci")
        );
    }

    #[test]
    fn globbing() {
        assert!(glob_match(
            b"v000010DEd*sv*sd*bc*sc*i*",
            b"v000010DEd00002941sv000010DEsd00001234bc03sc02i00"
        ));
        assert!(!glob_match(
            b"v000010DEd00002941sv*",
            b"v000010DEd00002330sv000010DE"
        ));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a*b*c", b"axxbyyc"));
        assert!(!glob_match(b"a*b*c", b"axxbyy"));
    }

    /// The two tables this one replaced: intent's suppression list was the
    /// whole stack, doctor's boot-race list only the PCI drivers.
    #[test]
    fn vendor_table_is_the_union_of_intents_and_doctors_lists() {
        let set =
            |it: &mut dyn Iterator<Item = &'static str>| -> BTreeSet<&'static str> { it.collect() };
        let nvidia = vendor_modules(0x10de);
        assert_eq!(
            set(&mut nvidia.all()),
            set(&mut ["nvidia", "nvidia_drm", "nvidia_modeset", "nouveau"].into_iter())
        );
        assert_eq!(nvidia.pci_drivers, ["nvidia", "nouveau"]);
        assert_eq!(vendor_modules(0x1002).pci_drivers, ["amdgpu", "radeon"]);
        assert_eq!(vendor_modules(0x8086).pci_drivers, ["i915", "xe"]);
        for vendor in [0x10de, 0x1002, 0x8086, 0x1af4] {
            let v = vendor_modules(vendor);
            assert!(v.pci_drivers.iter().all(|m| !v.stacked.contains(m)));
            assert_eq!(v.all().count(), v.pci_drivers.len() + v.stacked.len());
        }
        assert_eq!(vendor_modules(0x1af4).all().count(), 0);
    }
}
