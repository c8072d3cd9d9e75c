//! `vfio-pci.ids` entries, parsed as `vfio_pci_fill_ids` parses them and
//! matched as `pci_match_one_id` matches them.

use serde::Serialize;
use vfio_gpu_host::PciIdentity;

use crate::cmdline::skip_kernel_spaces;

/// `PCI_ANY_ID`: the wildcard for vendor, device and subsystem fields.
pub const PCI_ANY_ID: u32 = 0xffff_ffff;

/// One dynamic ID entry (`struct pci_device_id` as vfio-pci registers it).
///
/// Fields are `u32` because that is what the kernel stores: `%x` keeps the
/// low 32 bits, so `ffffffff` as a vendor is the wildcard, and `ffff` is not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdEntry {
    /// Vendor, or [`PCI_ANY_ID`].
    pub vendor: u32,
    /// Device, or [`PCI_ANY_ID`].
    pub device: u32,
    /// Subsystem vendor; [`PCI_ANY_ID`] when omitted.
    pub subvendor: u32,
    /// Subsystem device; [`PCI_ANY_ID`] when omitted.
    pub subdevice: u32,
    /// Class; 0 when omitted.
    pub class: u32,
    /// Class mask; 0 when omitted, which makes the class irrelevant.
    pub class_mask: u32,
    /// The entry's text as written (between commas).
    pub text: String,
}

/// The result of parsing an `ids=` value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParsedIds {
    /// Accepted entries, in order.
    pub entries: Vec<IdEntry>,
    /// Kernel warnings for skipped entries (`invalid id string "…"`).
    pub warnings: Vec<String>,
}

/// Outcome of scanning `%x:%x:%x:%x:%x:%x`.
struct Scan {
    fields: usize,
    values: [u32; 6],
    /// Every byte consumed and no field longer than 8 digits or a bare `0x`:
    /// what a strict parser (the policy file) accepts.
    clean: bool,
}

/// The kernel's `vsscanf(s, "%x:%x:%x:%x:%x:%x")`: each conversion skips
/// leading whitespace, needs a hex digit first, takes an optional `0x`,
/// accumulates in 64 bits (wrapping) and stores the low 32 bits; a literal
/// `:` must match exactly; scanning stops at the first mismatch.
fn scan_hex6(s: &[u8]) -> Scan {
    let mut values = [0u32; 6];
    let mut fields = 0;
    let mut pos = 0;
    let mut clean = true;
    for (k, slot) in values.iter_mut().enumerate() {
        if k > 0 {
            if pos >= s.len() || s[pos] != b':' {
                break;
            }
            pos += 1;
        }
        if pos >= s.len() {
            break;
        }
        let before = pos;
        pos = skip_kernel_spaces(s, pos);
        if pos != before {
            clean = false;
        }
        if pos >= s.len() || !s[pos].is_ascii_hexdigit() {
            break;
        }
        let mut p = pos;
        if s[p] == b'0' && p + 1 < s.len() && (s[p + 1] | 0x20) == b'x' {
            p += 2;
        }
        let digits_start = p;
        let mut acc: u64 = 0;
        while p < s.len() && s[p].is_ascii_hexdigit() {
            let d = (s[p] as char).to_digit(16).unwrap_or(0);
            acc = acc.wrapping_mul(16).wrapping_add(u64::from(d));
            p += 1;
        }
        let ndigits = p - digits_start;
        if ndigits == 0 || ndigits > 8 {
            clean = false;
        }
        // Truncation to the kernel's `unsigned int` is the point here.
        *slot = acc as u32;
        fields += 1;
        pos = p;
    }
    if pos != s.len() {
        clean = false;
    }
    Scan {
        fields,
        values,
        clean,
    }
}

impl IdEntry {
    fn from_scan(scan: &Scan, text: &str) -> Option<IdEntry> {
        if scan.fields < 2 {
            return None;
        }
        let v = &scan.values;
        let pick = |i: usize, default: u32| if scan.fields > i { v[i] } else { default };
        Some(IdEntry {
            vendor: v[0],
            device: v[1],
            subvendor: pick(2, PCI_ANY_ID),
            subdevice: pick(3, PCI_ANY_ID),
            class: pick(4, 0),
            class_mask: pick(5, 0),
            text: text.to_string(),
        })
    }

    /// Parses one entry strictly: 2 to 6 colon-separated hex fields (optional
    /// `0x`, at most 8 digits each), nothing else. For our own policy file,
    /// where a typo must be an error rather than a silent partial match.
    pub fn parse_strict(text: &str) -> Option<IdEntry> {
        let scan = scan_hex6(text.as_bytes());
        if !scan.clean {
            return None;
        }
        IdEntry::from_scan(&scan, text)
    }

    /// `pci_match_one_id`: every id field is ANY or equal, and the class
    /// agrees under the mask.
    pub fn matches(&self, id: &PciIdentity) -> bool {
        self.differences(id).is_empty()
    }

    /// The fields that prevent a match (empty when it matches).
    pub fn differences(&self, id: &PciIdentity) -> Vec<&'static str> {
        let eq = |want: u32, have: u16| want == PCI_ANY_ID || want == u32::from(have);
        let mut out = Vec::new();
        if !eq(self.vendor, id.vendor) {
            out.push("vendor");
        }
        if !eq(self.device, id.device) {
            out.push("device");
        }
        if !eq(self.subvendor, id.subsystem_vendor) {
            out.push("subsystem vendor");
        }
        if !eq(self.subdevice, id.subsystem_device) {
            out.push("subsystem device");
        }
        if (self.class ^ id.class) & self.class_mask != 0 {
            out.push("class");
        }
        out
    }

    /// A sentence for `explain`, e.g. `vfio-pci.ids entry 10de:2330 matches
    /// 10de:2330 (subsystem any)` or `… does not match 10de:2330 (device differs)`.
    pub fn describe(&self, id: &PciIdentity) -> String {
        self.describe_as("vfio-pci.ids entry", id)
    }

    /// [`IdEntry::describe`] with another label (e.g. `policy model`).
    pub fn describe_as(&self, label: &str, id: &PciIdentity) -> String {
        let entry = self.text.trim();
        let mut dev = format!("{:04x}:{:04x}", id.vendor, id.device);
        let subsys_any = self.subvendor == PCI_ANY_ID && self.subdevice == PCI_ANY_ID;
        if !subsys_any {
            dev.push_str(&format!(
                " subsystem {:04x}:{:04x}",
                id.subsystem_vendor, id.subsystem_device
            ));
        }
        if self.class_mask != 0 {
            dev.push_str(&format!(" class 0x{:06x}", id.class));
        }
        let diffs = self.differences(id);
        if diffs.is_empty() {
            let qual = if subsys_any {
                "subsystem any".to_string()
            } else {
                "subsystem matches".to_string()
            };
            let class = if self.class_mask != 0 {
                format!(
                    ", class 0x{:06x} under mask 0x{:06x}",
                    self.class, self.class_mask
                )
            } else {
                String::new()
            };
            format!("{label} {entry} matches {dev} ({qual}{class})")
        } else {
            let verb = if diffs.len() == 1 {
                "differs"
            } else {
                "differ"
            };
            format!(
                "{label} {entry} does not match {dev} ({} {verb})",
                join_and(&diffs)
            )
        }
    }

    /// The entry as vfio-pci logs it at init, e.g.
    /// `[10de:2204[ffffffff:ffffffff]] class 0x000000/00000000`.
    pub fn kernel_log_form(&self) -> String {
        format!(
            "[{:04x}:{:04x}[{:04x}:{:04x}]] class {:#08x}/{:08x}",
            self.vendor, self.device, self.subvendor, self.subdevice, self.class, self.class_mask
        )
    }
}

fn join_and(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// Parses an `ids=` value exactly as `vfio_pci_fill_ids` does: split on `,`,
/// skip empty entries, scan each with `%x:%x:%x:%x:%x:%x`; fewer than two
/// fields gives the kernel's warning and skips that entry only. Scanning
/// stops at the first non-hex character, so `10de:2204xyz` is `10de:2204`.
pub fn parse_ids(value: &str) -> ParsedIds {
    let mut out = ParsedIds::default();
    for id in value.split(',') {
        if id.is_empty() {
            continue;
        }
        let scan = scan_hex6(id.as_bytes());
        match IdEntry::from_scan(&scan, id) {
            Some(e) => out.entries.push(e),
            None => out.warnings.push(format!("invalid id string \"{id}\"")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(vendor: u16, device: u16, sv: u16, sd: u16, class: u32) -> PciIdentity {
        PciIdentity {
            vendor,
            device,
            subsystem_vendor: sv,
            subsystem_device: sd,
            class,
        }
    }
    const H100: PciIdentity = PciIdentity {
        vendor: 0x10de,
        device: 0x2330,
        subsystem_vendor: 0x10de,
        subsystem_device: 0x16c1,
        class: 0x030200,
    };

    fn one(s: &str) -> IdEntry {
        let p = parse_ids(s);
        assert_eq!(p.entries.len(), 1, "{s}: {p:?}");
        p.entries.into_iter().next().unwrap()
    }

    #[test]
    fn defaults_for_missing_fields() {
        let e = one("10de:2330");
        assert_eq!((e.vendor, e.device), (0x10de, 0x2330));
        assert_eq!((e.subvendor, e.subdevice), (PCI_ANY_ID, PCI_ANY_ID));
        assert_eq!((e.class, e.class_mask), (0, 0));
        let e = one("10de:2335:10de:18bf");
        assert_eq!((e.subvendor, e.subdevice), (0x10de, 0x18bf));
        let e = one("10de:2330:ffffffff:ffffffff:030000:ff0000");
        assert_eq!((e.class, e.class_mask), (0x030000, 0xff0000));
        let e = one("10de:2330:1:2:030000");
        assert_eq!((e.class, e.class_mask), (0x030000, 0), "mask defaults to 0");
    }

    #[test]
    fn scanf_hex_forms() {
        let e = one("0x10DE:0X2330");
        assert_eq!((e.vendor, e.device), (0x10de, 0x2330));
        // Stops at the first non-hex character.
        let e = one("10de:2204xyz");
        assert_eq!((e.vendor, e.device), (0x10de, 0x2204));
        assert_eq!(e.text, "10de:2204xyz");
        // Leading whitespace inside a quoted value is skipped by %x.
        let e = one(" 10de: 10f0");
        assert_eq!((e.vendor, e.device), (0x10de, 0x10f0));
        // A bare 0x reads as 0 and consumes the prefix.
        let e = one("0x:10de");
        assert_eq!((e.vendor, e.device), (0, 0x10de));
        // Third field unparsable: two fields, subsystem stays ANY.
        let e = one("10de:2330:zz");
        assert_eq!(e.subvendor, PCI_ANY_ID);
    }

    #[test]
    fn u32_truncation_of_long_fields() {
        // %x into an unsigned int keeps the low 32 bits.
        let e = one("1000010de:2330");
        assert_eq!(e.vendor, 0x0000_10de);
        assert!(e.matches(&H100));
        let e = one("ffffffff:2330");
        assert_eq!(e.vendor, PCI_ANY_ID);
        assert!(
            e.matches(&ident(0x1002, 0x2330, 0, 0, 0)),
            "vendor wildcard"
        );
        // 0xffff is a real vendor value, not the wildcard.
        assert!(!one("ffff:2330").matches(&H100));
        // 64-bit overflow wraps, as in the kernel.
        let e = one("123456789abcdef0123:1");
        assert_eq!(e.vendor, 0xcdef_0123);
    }

    #[test]
    fn invalid_entries_warn_and_others_apply() {
        let p = parse_ids("10de,,10de:2330,xyz:1, ,10de:");
        assert_eq!(p.entries.len(), 1);
        assert_eq!(p.entries[0].device, 0x2330);
        assert_eq!(
            p.warnings,
            vec![
                "invalid id string \"10de\"",
                "invalid id string \"xyz:1\"",
                "invalid id string \" \"",
                "invalid id string \"10de:\"",
            ]
        );
        assert!(parse_ids("").entries.is_empty());
        assert!(parse_ids(",,").warnings.is_empty());
    }

    #[test]
    fn matching_exactly_like_pci_match_one_id() {
        // Upstream's own example: vfio-pci.ids=10de:2235 on a 10de:2235 host.
        assert!(one("10de:2235").matches(&ident(0x10de, 0x2235, 0x10de, 0x1234, 0x030200)));
        // Same device id, other vendor: no match.
        let e = one("10de:2330");
        assert!(!e.matches(&ident(0x1002, 0x2330, 0x1002, 0, 0x030000)));
        assert_eq!(
            e.differences(&ident(0x1002, 0x2330, 0x1002, 0, 0x030000)),
            vec!["vendor"]
        );
        // Subsystem ids narrow the match.
        assert!(one("10de:2330:10de:16c1").matches(&H100));
        assert!(!one("10de:2330:10de:16c2").matches(&H100));
        // Class under mask.
        assert!(one("ffffffff:ffffffff:ffffffff:ffffffff:030000:ff0000").matches(&H100));
        assert!(!one("ffffffff:ffffffff:ffffffff:ffffffff:030000:ffff00").matches(&H100));
        // Class without mask is ignored.
        assert!(one("10de:2330:ffffffff:ffffffff:040300").matches(&H100));
    }

    #[test]
    fn descriptions() {
        assert_eq!(
            one("10de:2330").describe(&H100),
            "vfio-pci.ids entry 10de:2330 matches 10de:2330 (subsystem any)"
        );
        assert_eq!(
            one("10de:2331").describe(&H100),
            "vfio-pci.ids entry 10de:2331 does not match 10de:2330 (device differs)"
        );
        assert_eq!(
            one("1002:2331").describe(&H100),
            "vfio-pci.ids entry 1002:2331 does not match 10de:2330 (vendor and device differ)"
        );
        assert_eq!(
            one("10de:2330:10de:1111").describe(&H100),
            "vfio-pci.ids entry 10de:2330:10de:1111 does not match 10de:2330 subsystem 10de:16c1 (subsystem device differs)"
        );
        assert_eq!(
            one("10de:2204").kernel_log_form(),
            "[10de:2204[ffffffff:ffffffff]] class 0x000000/00000000"
        );
    }

    #[test]
    fn strict_parse() {
        assert!(IdEntry::parse_strict("10de:2330").is_some());
        assert!(IdEntry::parse_strict("0x10de:0x2330:10de:18bf").is_some());
        for bad in [
            "10de",
            "10de:2204xyz",
            "10de:",
            " 10de:2330",
            "0x:1",
            "1:2:3:4:5:6:7",
            "123456789:1",
        ] {
            assert!(IdEntry::parse_strict(bad).is_none(), "{bad}");
        }
    }
}
