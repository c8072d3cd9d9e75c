//! Object-name rules as the real API server applies them
//! (`k8s.io/apimachinery/pkg/util/validation`, `api/validation/objectmeta.go`,
//! `apiserver/pkg/storage/names/generate.go`), public so tests of name builders
//! can check their output against the same rules the fake enforces.

/// Longest DNS-1123 subdomain (`IsDNS1123Subdomain`).
pub const DNS1123_SUBDOMAIN_MAX: usize = 253;
/// The server keeps at most this much of a `generateName` (63 minus the suffix).
pub const MAX_GENERATED_NAME_BASE: usize = 58;
/// Length of the random suffix the server appends to a `generateName`.
pub const GENERATED_SUFFIX_LEN: usize = 5;

/// One label of a DNS-1123 subdomain: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`. The
/// subdomain rule bounds only the total length, not each label.
fn is_subdomain_label(label: &str) -> bool {
    let b = label.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && b.iter().all(|c| alnum(c) || *c == b'-')
        }
        _ => false,
    }
}

/// `IsDNS1123Subdomain`: at most 253 bytes of dot-separated labels, each matching
/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= DNS1123_SUBDOMAIN_MAX
        && name.split('.').all(is_subdomain_label)
}

/// `NameIsDNSSubdomain(prefix, true)`: a `generateName` is checked with a trailing
/// dash masked. Upstream's `maskTrailingDash` drops the last *two* bytes and appends
/// `a`; the quirk is kept so the same prefixes pass here as there.
pub fn is_valid_generate_name(prefix: &str) -> bool {
    let masked = if prefix.len() > 1 && prefix.ends_with('-') {
        format!("{}a", &prefix[..prefix.len() - 2])
    } else {
        prefix.to_owned()
    };
    is_dns1123_subdomain(&masked)
}

/// The name the server generates from `prefix` and a random `suffix`: the prefix
/// is cut to [`MAX_GENERATED_NAME_BASE`] bytes first (`SimpleNameGenerator`).
pub fn generated_name(prefix: &str, suffix: &str) -> String {
    let mut cut = prefix.len().min(MAX_GENERATED_NAME_BASE);
    while !prefix.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &prefix[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains_are_checked_per_label() {
        for ok in ["a", "a.b", "ip-10-0-1-5.ec2.internal", "0", "a-b.c-d"] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "A",
            "a.",
            ".a",
            "a..b",
            "dra.-abcde",
            "a-.b",
            "a_b",
            "-a",
        ] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
        assert!(is_dns1123_subdomain(&"a".repeat(253)));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
    }

    #[test]
    fn generate_name_prefix_masks_the_trailing_dash_like_upstream() {
        assert!(is_valid_generate_name("node-drv-"));
        // Upstream drops ".-" and appends "a": the prefix passes, the name does not.
        assert!(is_valid_generate_name("x.dra.-"));
        assert!(!is_dns1123_subdomain(&generated_name("x.dra.-", "abcde")));
        assert_eq!(generated_name(&"n".repeat(70), "abcde").len(), 63);
    }
}
