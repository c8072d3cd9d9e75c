//! PCI Vital Product Data (the `vpd` sysfs attribute), parsed by hand, for
//! one purpose: recognising NVLink management bridges.
//!
//! On HGX B200/B300 (NVLink 5) the NVSwitches are not PCI devices; the host
//! reaches them through ConnectX-7 functions (Mellanox, vendor `0x15b3`)
//! whose VPD carries the mark `SW_MNG`. Those belong to the host's Fabric
//! Manager / NVLink subnet manager and are never handed out, not even as
//! members of a GPU's IOMMU group (reference `fabric-manager.md` §9, §11).
//!
//! VPD is a list of resource tags (PCI Local Bus spec, "VPD Format"):
//! large tags (bit 7 set) `0x82` identifier string, `0x90` VPD-R and `0x91`
//! VPD-W, each with a 16-bit little-endian length; VPD-R/W hold keywords (2
//! ASCII bytes, a length byte, the value); the small end tag `0x78` closes
//! the list. Bytes after the end tag (sysfs pads to the VPD size) are
//! ignored.

/// The mark of an NVLink management bridge in its VPD.
pub const NVLINK_MANAGEMENT_MARK: &[u8] = b"SW_MNG";

/// Largest VPD the PCI spec allows (15-bit address space).
pub const MAX_VPD_BYTES: usize = 32 * 1024;

/// Which vendor's functions have their VPD read: NVLink management bridges
/// are ConnectX-7s, and VPD reads are slow config-space polls, so no other
/// function pays for them.
pub const NVLINK_MANAGEMENT_VENDOR: u16 = 0x15b3;

/// One parsed VPD image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vpd {
    /// The identifier string (product name), if present.
    pub identifier: Option<Vec<u8>>,
    /// Every keyword of VPD-R and VPD-W, in order: (keyword, value).
    pub keywords: Vec<([u8; 2], Vec<u8>)>,
}

/// Why a VPD image cannot be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VpdError {
    /// A tag or keyword runs past the end of the data.
    #[error("VPD truncated at byte {offset}: {what}")]
    Truncated {
        /// Where the cut item starts.
        offset: usize,
        /// What was cut.
        what: &'static str,
    },
    /// No end tag before the data ran out.
    #[error("VPD has no end tag")]
    NoEndTag,
}

const TAG_IDENTIFIER: u8 = 0x02;
const TAG_VPD_R: u8 = 0x10;
const TAG_VPD_W: u8 = 0x11;
const SMALL_TAG_END: u8 = 0x0f;

/// Parses a VPD image (see the module docs for the format).
pub fn parse_vpd(bytes: &[u8]) -> Result<Vpd, VpdError> {
    let mut vpd = Vpd::default();
    let mut at = 0;
    while at < bytes.len() {
        let tag = bytes[at];
        if tag & 0x80 == 0 {
            // Small resource: name in bits 6..3, length in bits 2..0.
            if (tag >> 3) & 0x0f == SMALL_TAG_END {
                return Ok(vpd);
            }
            let len = usize::from(tag & 0x07);
            at = at
                .checked_add(1 + len)
                .filter(|end| *end <= bytes.len())
                .ok_or(VpdError::Truncated {
                    offset: at,
                    what: "small resource",
                })?;
            continue;
        }
        let header = bytes.get(at + 1..at + 3).ok_or(VpdError::Truncated {
            offset: at,
            what: "large resource header",
        })?;
        let len = usize::from(u16::from_le_bytes([header[0], header[1]]));
        let data = bytes.get(at + 3..at + 3 + len).ok_or(VpdError::Truncated {
            offset: at,
            what: "large resource data",
        })?;
        match tag & 0x7f {
            TAG_IDENTIFIER => vpd.identifier = Some(data.to_vec()),
            TAG_VPD_R | TAG_VPD_W => keywords(data, at + 3, &mut vpd.keywords)?,
            _ => {}
        }
        at += 3 + len;
    }
    Err(VpdError::NoEndTag)
}

fn keywords(data: &[u8], base: usize, out: &mut Vec<([u8; 2], Vec<u8>)>) -> Result<(), VpdError> {
    let mut at = 0;
    while at < data.len() {
        let head = data.get(at..at + 3).ok_or(VpdError::Truncated {
            offset: base + at,
            what: "keyword header",
        })?;
        let len = usize::from(head[2]);
        let value = data.get(at + 3..at + 3 + len).ok_or(VpdError::Truncated {
            offset: base + at,
            what: "keyword value",
        })?;
        out.push(([head[0], head[1]], value.to_vec()));
        at += 3 + len;
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl Vpd {
    /// True when the identifier or any keyword value carries `SW_MNG`.
    pub fn is_nvlink_management(&self) -> bool {
        self.identifier
            .as_deref()
            .is_some_and(|i| contains(i, NVLINK_MANAGEMENT_MARK))
            || self
                .keywords
                .iter()
                .any(|(_, v)| contains(v, NVLINK_MANAGEMENT_MARK))
    }
}

/// Whether a function's raw VPD marks an NVLink management bridge. A VPD
/// that does not parse is searched as plain bytes (NVIDIA's own detection
/// does only that): a damaged image must not turn a management bridge into
/// something that can be handed out.
pub fn vpd_marks_nvlink_management(bytes: &[u8]) -> bool {
    match parse_vpd(bytes) {
        Ok(v) => v.is_nvlink_management(),
        Err(_) => contains(bytes, NVLINK_MANAGEMENT_MARK),
    }
}

/// Encodes a VPD image (identifier, VPD-R keywords, end tag), for fixture
/// trees and tests. Panics on values longer than VPD allows (test input).
pub fn encode_vpd(identifier: &str, read_only: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = vec![0x82];
    let id_len = u16::try_from(identifier.len()).expect("identifier fits VPD");
    out.extend_from_slice(&id_len.to_le_bytes());
    out.extend_from_slice(identifier.as_bytes());
    let mut r = Vec::new();
    for (k, v) in read_only {
        let kb = k.as_bytes();
        assert_eq!(kb.len(), 2, "a VPD keyword is two bytes");
        r.extend_from_slice(kb);
        r.push(u8::try_from(v.len()).expect("keyword value fits VPD"));
        r.extend_from_slice(v);
    }
    out.push(0x90);
    let r_len = u16::try_from(r.len()).expect("VPD-R fits");
    out.extend_from_slice(&r_len.to_le_bytes());
    out.extend_from_slice(&r);
    out.push(0x78);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx7(v3: &[u8]) -> Vec<u8> {
        encode_vpd(
            "NVIDIA ConnectX-7 HHHL adapter",
            &[
                ("PN", b"MCX75310AAS-NEAT"),
                ("SN", b"MT2301X00000"),
                ("V3", v3),
                ("RV", &[0x42]),
            ],
        )
    }

    #[test]
    fn parses_identifier_and_keywords() {
        let v = parse_vpd(&cx7(b"SW_MNG")).unwrap();
        assert_eq!(
            v.identifier.as_deref(),
            Some(&b"NVIDIA ConnectX-7 HHHL adapter"[..])
        );
        assert_eq!(v.keywords.len(), 4);
        assert_eq!(v.keywords[2], (*b"V3", b"SW_MNG".to_vec()));
        assert!(v.is_nvlink_management());
    }

    #[test]
    fn an_ordinary_connectx_is_no_management_bridge() {
        assert!(!vpd_marks_nvlink_management(&cx7(b"ETH")));
        // The mark split across two keywords is not the mark.
        let split = encode_vpd("x", &[("V1", b"SW_"), ("V2", b"MNG")]);
        assert!(!vpd_marks_nvlink_management(&split));
    }

    #[test]
    fn padding_after_the_end_tag_is_ignored() {
        let mut bytes = cx7(b"SW_MNG");
        bytes.extend_from_slice(&[0xff; 64]);
        assert!(parse_vpd(&bytes).unwrap().is_nvlink_management());
        let mut plain = cx7(b"ETH");
        // Bytes after the end tag never count, even when they read SW_MNG.
        plain.extend_from_slice(b"SW_MNG");
        assert!(!vpd_marks_nvlink_management(&plain));
    }

    #[test]
    fn damaged_images_are_errors_and_still_searched() {
        let good = cx7(b"SW_MNG");
        for cut in 1..good.len() {
            let part = &good[..cut];
            assert!(parse_vpd(part).is_err(), "cut at {cut} parsed");
        }
        // Cut after the mark: the parse fails, the byte search still finds it.
        let cut = good.len() - 1;
        assert!(vpd_marks_nvlink_management(&good[..cut]));
        assert!(!vpd_marks_nvlink_management(&[]));
        assert_eq!(
            parse_vpd(&[0x82, 0x05]),
            Err(VpdError::Truncated {
                offset: 0,
                what: "large resource header"
            })
        );
    }

    #[test]
    fn every_byte_string_parses_or_errs_without_panicking() {
        // A cheap exhaustive sweep over short inputs built from the tag bytes.
        let alphabet = [0x00, 0x02, 0x78, 0x82, 0x90, 0x91, 0xff, b'S'];
        let mut buf = Vec::new();
        for n in 0..4u32 {
            for i in 0..alphabet.len().pow(n) {
                buf.clear();
                let mut k = i;
                for _ in 0..n {
                    buf.push(alphabet[k % alphabet.len()]);
                    k /= alphabet.len();
                }
                let _ = parse_vpd(&buf);
            }
        }
    }
}
