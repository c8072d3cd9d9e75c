//! The guest's 64-bit MMIO window: what a VM needs to boot with its GPUs'
//! 64-bit prefetchable BARs mapped, and which KubeVirt/OVMF setting gives it.
//!
//! A GPU's large BAR (the VRAM aperture, 32 GiB to 512 GiB) must fit in the
//! 64-bit PCI window the guest firmware programs. OVMF before it sized that
//! window from the devices present used a fixed 32 GiB default, and a VM
//! whose GPUs need more boots with the BARs unassigned: the NVIDIA driver then
//! fails with an invalid PCI I/O region (kubevirt#11093). What each knob does
//! and in which versions (read 2026-12; see `docs/operating.md`):
//!
//! - OVMF sizes the window from the BARs of the devices present since
//!   edk2-stable202502 (kata-containers#12507 relies on it); edk2#12997 (merged
//!   2026-08) raised its dynamic ceiling from 1/8 to 1/4 of the guest physical
//!   address space for 8 × 512 GiB GPUs.
//! - Older OVMF takes a minimum window from fw_cfg `opt/ovmf/X-PciMmio64Mb`
//!   (in MiB; edk2#10856 would make it exact). KubeVirt has no field for it;
//!   the known workaround is a hook sidecar (feature gate `Sidecar`) adding
//!   `-fw_cfg name=opt/ovmf/X-PciMmio64Mb,string=<MiB>` (harvester#5619).
//! - kubevirt#18013 (open, unreleased) adds the alpha annotation
//!   `alpha.kubevirt.io/pciHole64Size` (a quantity) for the q35 root's
//!   `pcihole64`; `kubevirt.io/disablePCIHole64` turns the hole off.
//! - Booting with BIOS (SeaBIOS) instead of EFI avoids the OVMF window
//!   (the workaround reported in kubevirt#11093).

/// The 64-bit MMIO window OVMF programmed before it sized it from the BARs:
/// a VM needing more than this needs a newer OVMF or `X-PciMmio64Mb`.
pub const OVMF_LEGACY_WINDOW: u64 = 32 << 30;

/// The window a set of GPUs needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioWindow {
    /// Sum of the GPUs' 64-bit prefetchable BARs, in bytes.
    pub bar_bytes: u64,
    /// The window that holds them, in bytes, as an upper bound: in the
    /// guest each GPU sits behind its own root port, whose window is aligned
    /// to its largest BAR, so each GPU takes at most the next power of two of
    /// its BARs' sum (the blocks, largest first, pack). For a 32 GiB + 32 MiB
    /// GPU that is 64 GiB, the `X-PciMmio64Mb=65536` reported to work for it
    /// (harvester#5619).
    pub window_bytes: u64,
    /// The `X-PciMmio64Mb` value that covers it: `window_bytes` rounded up
    /// to a power of two, in MiB.
    pub ovmf_mib: u64,
}

impl MmioWindow {
    /// The window for GPUs whose 64-bit prefetchable BAR totals are
    /// `per_gpu` (bytes; 0 for a GPU without one).
    pub fn for_gpus(per_gpu: &[u64]) -> Self {
        let bar_bytes = per_gpu.iter().fold(0u64, |a, &b| a.saturating_add(b));
        let window_bytes = per_gpu
            .iter()
            .filter(|&&b| b > 0)
            .map(|&b| b.checked_next_power_of_two().unwrap_or(u64::MAX))
            .fold(0u64, u64::saturating_add);
        let ovmf_mib = match window_bytes {
            0 => 0,
            w => w
                .checked_next_power_of_two()
                .unwrap_or(u64::MAX)
                .div_ceil(1 << 20),
        };
        MmioWindow {
            bar_bytes,
            window_bytes,
            ovmf_mib,
        }
    }

    /// Whether an OVMF that does not size the window itself is too small.
    pub fn exceeds_legacy_ovmf(&self) -> bool {
        self.window_bytes > OVMF_LEGACY_WINDOW
    }

    /// What to set for a VM with these GPUs, in one sentence.
    pub fn guidance(&self) -> String {
        if self.window_bytes == 0 {
            return "no 64-bit prefetchable BARs: no guest MMIO window needed".into();
        }
        format!(
            "guest 64-bit MMIO window ≥ {} ({} of 64-bit prefetchable BARs at their alignment): \
             OVMF from edk2-stable202502 sizes it itself; older OVMF needs fw_cfg \
             opt/ovmf/X-PciMmio64Mb={} (KubeVirt: a hook sidecar adding \
             `-fw_cfg name=opt/ovmf/X-PciMmio64Mb,string={}`, kubevirt#11093; the \
             alpha.kubevirt.io/pciHole64Size annotation of kubevirt#18013 once released)",
            human_bytes(self.window_bytes),
            human_bytes(self.bar_bytes),
            self.ovmf_mib,
            self.ovmf_mib
        )
    }
}

/// Bytes in the largest binary unit that keeps two decimals honest.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if b >= size {
            let whole = b / size;
            let rest = b % size;
            return if rest == 0 {
                format!("{whole} {unit}")
            } else {
                // Hundredths, rounded up: never state less than is needed.
                let hundredths = (u128::from(rest) * 100).div_ceil(u128::from(size));
                format!("{}.{:02} {unit}", whole, hundredths.min(99))
            };
        }
    }
    format!("{b} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn one_h100_needs_a_128_gib_window() {
        // A 128 GiB VRAM aperture and a 32 MiB BAR, as the demo's GPUs.
        let w = MmioWindow::for_gpus(&[128 * GIB + 32 * MIB]);
        assert_eq!(w.bar_bytes, 128 * GIB + 32 * MIB);
        assert_eq!(
            w.window_bytes,
            256 * GIB,
            "the 32 MiB BAR spills past 128 GiB"
        );
        assert_eq!(w.ovmf_mib, 256 * 1024);
        assert!(w.exceeds_legacy_ovmf());
    }

    #[test]
    fn windows_add_up_across_a_claims_gpus_and_round_to_a_power_of_two() {
        let w = MmioWindow::for_gpus(&[32 * GIB, 32 * GIB, 16 * GIB, 0]);
        assert_eq!(w.bar_bytes, 80 * GIB);
        assert_eq!(w.window_bytes, 80 * GIB);
        assert_eq!(w.ovmf_mib, 128 * 1024);
        let small = MmioWindow::for_gpus(&[256 * MIB]);
        assert!(!small.exceeds_legacy_ovmf());
        assert_eq!(small.ovmf_mib, 256);
        let none = MmioWindow::for_gpus(&[0, 0]);
        assert_eq!((none.window_bytes, none.ovmf_mib), (0, 0));
        assert!(none.guidance().contains("no guest MMIO window"));
    }

    /// Invariant: the window always holds the BARs, and the OVMF value the window.
    #[test]
    fn the_window_never_understates_what_the_bars_need() {
        let sizes = [
            0,
            1,
            4095,
            MIB,
            32 * MIB + 1,
            24 * GIB,
            48 * GIB,
            512 * GIB,
            u64::MAX / 4,
        ];
        for &a in &sizes {
            for &b in &sizes {
                let w = MmioWindow::for_gpus(&[a, b]);
                assert!(w.window_bytes >= w.bar_bytes, "{a} {b}");
                assert!(
                    u128::from(w.ovmf_mib) * u128::from(MIB) >= u128::from(w.window_bytes),
                    "{a} {b}: {w:?}"
                );
            }
        }
    }

    #[test]
    fn guidance_names_the_knob_and_the_size() {
        let g = MmioWindow::for_gpus(&[64 * GIB, 64 * GIB]).guidance();
        assert!(g.contains("≥ 128 GiB"), "{g}");
        assert!(g.contains("X-PciMmio64Mb=131072"), "{g}");
        assert!(g.contains("kubevirt#11093"), "{g}");
        assert_eq!(human_bytes(128 * GIB + 32 * MIB), "128.04 GiB");
        assert_eq!(human_bytes(512), "512 B");
    }
}
