//! The kernel command line, tokenized twice: once as the kernel does
//! (`next_arg` + `parse_args`, lib/cmdline.c and kernel/params.c) and once as
//! kmod does (`kmod_config_parse_kcmdline`), because the two disagree on
//! quotes, dots and `--` and each decides a different case (built-in vs
//! module vfio-pci).

use serde::Serialize;

/// One kernel parameter as `next_arg` splits it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelParam {
    /// The name as written (text before the first `=`, quotes stripped as the kernel does).
    pub name: String,
    /// The name with every `-` mapped to `_`, as `parameq` compares names.
    pub normalized_name: String,
    /// The value after the first `=`; `None` when there is no `=`.
    pub value: Option<String>,
    /// True for tokens after a bare `--`: `parse_args` stops there and hands
    /// them to init, so they are not kernel parameters.
    pub after_dashdash: bool,
}

/// A byte-level token with spans into the (NUL-truncated) input.
#[derive(Clone, Debug)]
pub(crate) struct RawParam {
    /// Where the token starts (its leading quote included).
    pub start: usize,
    pub name: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub after_dashdash: bool,
}

/// The kernel's `isspace` (lib/ctype.c): ASCII whitespace plus 0xA0, which
/// the kernel's Latin-1 table marks as a space.
pub(crate) fn is_kernel_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0)
}

pub(crate) fn skip_kernel_spaces(buf: &[u8], mut pos: usize) -> usize {
    while pos < buf.len() && is_kernel_space(buf[pos]) {
        pos += 1;
    }
    pos
}

/// The C string starting at `s` (up to the first NUL).
fn cstr(s: &[u8]) -> &[u8] {
    &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
}

/// `next_arg` over the whole buffer, then `parse_args`'s stop at a bare `--`
/// (the marker itself is dropped; later tokens are flagged).
pub(crate) fn raw_params(input: &[u8]) -> Vec<RawParam> {
    // The kernel works on a C string: nothing after a NUL exists.
    let buf = cstr(input);
    let mut out = Vec::new();
    let mut pos = skip_kernel_spaces(buf, 0);
    let mut after_dashdash = false;
    while pos < buf.len() {
        let start = pos;
        let mut args = pos;
        let mut in_quote = false;
        let mut quoted = false;
        if buf[args] == b'"' {
            args += 1;
            in_quote = true;
            quoted = true;
        }
        let mut i = 0usize;
        let mut equals = 0usize;
        while args + i < buf.len() {
            let c = buf[args + i];
            if is_kernel_space(c) && !in_quote {
                break;
            }
            // Like the C code: an `=` at offset 0 leaves `equals` at 0, so a
            // later `=` still counts.
            if equals == 0 && c == b'=' {
                equals = i;
            }
            if c == b'"' {
                in_quote = !in_quote;
            }
            i += 1;
        }
        // Emulate the in-place NUL writes on a copy of the token.
        let mut tok = buf[args..args + i].to_vec();
        let mut val = None;
        if equals != 0 {
            tok[equals] = 0;
            let mut v = equals + 1;
            if v < tok.len() && tok[v] == b'"' {
                v += 1;
                if tok[i - 1] == b'"' {
                    tok[i - 1] = 0;
                }
            }
            val = Some(v);
        }
        if quoted && i > 0 && tok[i - 1] == b'"' {
            tok[i - 1] = 0;
        }
        let name = cstr(&tok).to_vec();
        let value = val.map(|v| cstr(tok.get(v..).unwrap_or(&[])).to_vec());
        pos = args + i;
        if pos < buf.len() {
            pos += 1;
        }
        pos = skip_kernel_spaces(buf, pos);
        if !after_dashdash && value.is_none() && name == b"--" {
            after_dashdash = true;
            continue;
        }
        out.push(RawParam {
            start,
            name,
            value,
            after_dashdash,
        });
    }
    out
}

/// Maps `-` to `_` in every character, as `parameq` does.
pub fn normalize_param_name(name: &str) -> String {
    name.replace('-', "_")
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Splits a kernel command line exactly as the kernel does.
///
/// Whitespace (the kernel's `isspace`, which includes 0xA0) separates tokens
/// outside quotes; every `"` toggles quoting and there are no escapes; a
/// token starting with `"` loses that quote and its trailing `"`; a value
/// starting with `"` loses it and the token's trailing `"`. Tokens after a
/// bare `--` are returned with `after_dashdash` set; the `--` itself is not
/// returned. Total: never fails, never panics.
pub fn kernel_params(cmdline: &str) -> Vec<KernelParam> {
    raw_params(cmdline.as_bytes())
        .into_iter()
        .map(|p| {
            let name = lossy(&p.name);
            KernelParam {
                normalized_name: normalize_param_name(&name),
                name,
                value: p.value.as_deref().map(lossy),
                after_dashdash: p.after_dashdash,
            }
        })
        .collect()
}

/// One `module.param[=value]` option kmod takes from the kernel command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KmodCmdlineOption {
    /// Module name, `-` mapped to `_` (outside `[...]` patterns), as kmod stores it.
    pub module: String,
    /// Parameter name (text after the first `.` up to the first `=`).
    pub param: String,
    /// The value exactly as kmod keeps it (quotes included: the kernel's
    /// `next_arg` strips them when the module loads); `None` without `=`.
    pub value: Option<String>,
}

impl KmodCmdlineOption {
    /// The option string kmod appends to the module's options (`param[=value]`).
    pub fn option_string(&self) -> String {
        match &self.value {
            Some(v) => format!("{}={}", self.param, v),
            None => self.param.clone(),
        }
    }
}

/// kmod's `underscores()`: `-` → `_` except inside `[...]`; `None` for an
/// unmatched bracket, which kmod rejects.
pub(crate) fn kmod_underscores(name: &[u8]) -> Option<Vec<u8>> {
    let mut s = name.to_vec();
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'-' => s[i] = b'_',
            b']' => return None,
            b'[' => match s[i..].iter().position(|&b| b == b']') {
                Some(off) => i += off,
                None => return None,
            },
            _ => {}
        }
        i += 1;
    }
    Some(s)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KState {
    Ignore,
    Modname,
    Param,
    Value,
    Complete,
}

/// The module options kmod reads from a kernel command line, exactly as
/// `kmod_config_parse_kcmdline` (kmod ≥ 29) does.
///
/// A token is `modname.param[=value]`: the module name runs to the first
/// `.`; a second `.` before `=` voids the token, as does `=` before any `.`;
/// a quote is allowed only as the token's first character or inside the
/// value; whitespace only inside a quoted value; GRUB's `"mod.p=a b"` is
/// rewritten to `mod.p="a b"`. Parsing stops at the first newline. There is
/// no `--` handling: kmod applies options found after it. `modprobe.blacklist=`
/// comes back as module `modprobe`, param `blacklist`.
pub fn kmod_options(cmdline: &str) -> Vec<KmodCmdlineOption> {
    let mut buf = cstr(cmdline.as_bytes()).to_vec();
    buf.push(0);
    let mut out = Vec::new();
    let mut state = KState::Modname;
    let mut is_quoted = false;
    let mut modname = 0usize;
    let mut param = 0usize;
    let mut value = 0usize;
    let mut quote_start: Option<usize> = None;
    let mut p = 0usize;
    let mut iter = true;
    while iter && p < buf.len() {
        let c = buf[p];
        match c {
            b'"' => {
                is_quoted = !is_quoted;
                if is_quoted && state == KState::Modname && p == modname {
                    quote_start = Some(p);
                    modname = p + 1;
                } else if state != KState::Value {
                    state = KState::Ignore;
                }
            }
            0 | b'\n' | b' ' => {
                if c != b' ' {
                    iter = false;
                }
                if is_quoted && state == KState::Value {
                    // A quoted value may hold spaces.
                } else if is_quoted {
                    state = KState::Ignore;
                } else if state == KState::Value || state == KState::Param {
                    buf[p] = 0;
                    state = KState::Complete;
                } else {
                    modname = p + 1;
                    state = KState::Modname;
                    quote_start = None;
                }
            }
            b'.' => {
                if state == KState::Modname {
                    buf[p] = 0;
                    param = p + 1;
                    state = KState::Param;
                } else if state == KState::Param {
                    state = KState::Ignore;
                }
            }
            b'=' => {
                if state == KState::Param {
                    value = p + 1;
                    state = KState::Value;
                } else if state == KState::Modname {
                    state = KState::Ignore;
                }
            }
            _ => {}
        }
        if state == KState::Complete {
            if let Some(q) = quote_start
                && q < modname
                && value > modname
            {
                // GRUB passes "mod.p=a b": move "mod\0p=" left over the
                // quote and put the quote back in front of the value.
                buf.copy_within(modname..value, q);
                value -= 1;
                modname -= 1;
                param -= 1;
                buf[value] = b'"';
            }
            if let Some(opt) = kcmdline_result(&buf, modname, param) {
                out.push(opt);
            }
            modname = p + 1;
            state = KState::Modname;
            quote_start = None;
        }
        p += 1;
    }
    out
}

fn kcmdline_result(buf: &[u8], modname: usize, param: usize) -> Option<KmodCmdlineOption> {
    let m = cstr(buf.get(modname..)?);
    let ps = cstr(buf.get(param..)?);
    let (pname, val) = match ps.iter().position(|&b| b == b'=') {
        Some(eq) => (&ps[..eq], Some(&ps[eq + 1..])),
        None => (ps, None),
    };
    // `modprobe.blacklist=` is kept verbatim (kmod splits it into blacklist
    // entries); every other module name goes through underscores().
    let module = if m == b"modprobe" {
        m.to_vec()
    } else {
        kmod_underscores(m)?
    };
    Some(KmodCmdlineOption {
        module: lossy(&module),
        param: lossy(pname),
        value: val.map(lossy),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kp(name: &str, value: Option<&str>) -> (String, Option<String>) {
        (name.to_string(), value.map(str::to_string))
    }
    fn pairs(s: &str) -> Vec<(String, Option<String>)> {
        kernel_params(s)
            .into_iter()
            .map(|p| (p.name, p.value))
            .collect()
    }

    #[test]
    fn splits_on_whitespace_and_equals() {
        assert_eq!(
            pairs("BOOT_IMAGE=/vmlinuz root=/dev/sda1  ro\tquiet\n"),
            vec![
                kp("BOOT_IMAGE", Some("/vmlinuz")),
                kp("root", Some("/dev/sda1")),
                kp("ro", None),
                kp("quiet", None),
            ]
        );
        assert!(kernel_params("").is_empty());
        assert!(kernel_params("   \n").is_empty());
    }

    #[test]
    fn value_keeps_text_after_first_equals() {
        assert_eq!(pairs("a=b=c"), vec![kp("a", Some("b=c"))]);
        assert_eq!(pairs("a="), vec![kp("a", Some(""))]);
        // An `=` at offset 0 does not count as the separator (C quirk).
        assert_eq!(pairs("=x=y"), vec![kp("=x", Some("y"))]);
    }

    #[test]
    fn quoted_values() {
        assert_eq!(
            pairs(r#"vfio-pci.ids="10de:1b80, 10de:10f0" quiet"#),
            vec![
                kp("vfio-pci.ids", Some("10de:1b80, 10de:10f0")),
                kp("quiet", None)
            ]
        );
        // Quote in the middle of a value: kept, but still protects spaces.
        assert_eq!(pairs(r#"p=a"b c"d"#), vec![kp("p", Some(r#"a"b c"d"#))]);
        // Value quote stripped only at the start; trailing quote removed.
        assert_eq!(pairs(r#"p="""#), vec![kp("p", Some(""))]);
        assert_eq!(pairs(r#"p=""#), vec![kp("p", Some(""))]);
    }

    #[test]
    fn leading_quote_token_grub_style() {
        assert_eq!(
            pairs(r#""vfio-pci.ids=10de:2204, 10de:1aef" ro"#),
            vec![
                kp("vfio-pci.ids", Some("10de:2204, 10de:1aef")),
                kp("ro", None)
            ]
        );
        assert_eq!(pairs(r#""quiet""#), vec![kp("quiet", None)]);
        // Unterminated quote swallows the rest of the line.
        assert_eq!(pairs(r#"a="b c d"#), vec![kp("a", Some("b c d"))]);
        assert_eq!(pairs(r#""""#), vec![kp("", None)]);
    }

    #[test]
    fn names_normalised() {
        let p = kernel_params("vfio-pci.ids=10de:2204 vfio_pci.ids=10de:2205");
        assert_eq!(p[0].normalized_name, "vfio_pci.ids");
        assert_eq!(p[1].normalized_name, "vfio_pci.ids");
        assert_eq!(p[0].name, "vfio-pci.ids");
    }

    #[test]
    fn dashdash_stops_kernel_params() {
        let p = kernel_params("ro -- vfio-pci.ids=10de:2204 single");
        assert_eq!(p.len(), 3);
        assert!(!p[0].after_dashdash);
        assert_eq!(p[1].name, "vfio-pci.ids");
        assert!(p[1].after_dashdash);
        assert!(p[2].after_dashdash);
        // `--=x` has a value: not the marker.
        assert!(kernel_params("--=x a").iter().all(|p| !p.after_dashdash));
        // A quoted "--" is still the marker (quotes stripped first).
        assert!(kernel_params(r#""--" a"#)[0].after_dashdash);
    }

    #[test]
    fn latin1_nbsp_is_kernel_whitespace() {
        let p = raw_params(b"a=1\xa0b=2");
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].name, b"b");
    }

    #[test]
    fn nul_ends_the_line() {
        assert_eq!(pairs("a b\0c"), vec![kp("a", None), kp("b", None)]);
    }

    fn kopts(s: &str) -> Vec<(String, String, Option<String>)> {
        kmod_options(s)
            .into_iter()
            .map(|o| (o.module, o.param, o.value))
            .collect()
    }
    fn ko(m: &str, p: &str, v: Option<&str>) -> (String, String, Option<String>) {
        (m.into(), p.into(), v.map(Into::into))
    }

    #[test]
    fn kmod_basic_and_normalised_module() {
        assert_eq!(
            kopts("BOOT_IMAGE=/vmlinuz root=/dev/sda ro vfio-pci.ids=10de:2204 quiet\n"),
            vec![ko("vfio_pci", "ids", Some("10de:2204"))]
        );
        assert_eq!(
            kopts("psmouse.foo"),
            vec![ko("psmouse", "foo", None)],
            "no value is still an option"
        );
    }

    #[test]
    fn kmod_second_dot_voids_token() {
        assert!(kopts("a.b.c=1").is_empty());
        // ...but a dot inside the value is fine.
        assert_eq!(kopts("a.b=c.d"), vec![ko("a", "b", Some("c.d"))]);
        // `=` before any `.` voids it too.
        assert!(kopts("root=/dev/sda.1").is_empty());
    }

    #[test]
    fn kmod_quotes() {
        assert_eq!(
            kopts(r#"vfio_pci.ids="10de:1b80, 10de:10f0" ro"#),
            vec![ko("vfio_pci", "ids", Some(r#""10de:1b80, 10de:10f0""#))]
        );
        // GRUB's form is rewritten to mod.p="a b".
        assert_eq!(
            kopts(r#"psmouse.foo "parport.dyndbg=file a.c +mpf" quiet rw"#),
            vec![
                ko("psmouse", "foo", None),
                ko("parport", "dyndbg", Some(r#""file a.c +mpf""#))
            ]
        );
        // A quote anywhere else before the value voids the token.
        assert!(kopts(r#"vfio"_pci.ids=1 a"#).is_empty());
        // An unterminated quoted value at the end is dropped.
        assert!(kopts(r#"vfio_pci.ids="10de:1b80"#).is_empty());
    }

    #[test]
    fn kmod_ignores_dashdash_and_stops_at_newline() {
        assert_eq!(
            kopts("ro -- vfio-pci.ids=10de:2204\nx.y=1"),
            vec![ko("vfio_pci", "ids", Some("10de:2204"))]
        );
    }

    #[test]
    fn kmod_blacklist_kept_verbatim() {
        assert_eq!(
            kopts("modprobe.blacklist=nouveau,nvidia-drm"),
            vec![ko("modprobe", "blacklist", Some("nouveau,nvidia-drm"))]
        );
    }

    #[test]
    fn underscores_brackets() {
        assert_eq!(kmod_underscores(b"a-b[0-9]-c").unwrap(), b"a_b[0-9]_c");
        assert!(kmod_underscores(b"a]").is_none());
        assert!(kmod_underscores(b"a[0-").is_none());
    }
}
