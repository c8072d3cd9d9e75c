//! modprobe configuration as kmod reads it (libkmod-config.c), the
//! initramfs-tools module list, and whether vfio-pci is built in.

use std::collections::BTreeMap;
use std::fmt;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;

use serde::Serialize;
use vfio_gpu_host::HostRoot;

use crate::cmdline::{KmodCmdlineOption, kmod_underscores, raw_params};
use crate::read::{ReadOutcome, host_path, read_text};

/// kmod's configuration directories, highest precedence first
/// (libkmod.c; `usr/local/lib` since kmod 29, `usr/lib` since kmod 33).
pub const MODPROBE_DIRS: [&str; 5] = [
    "etc/modprobe.d",
    "run/modprobe.d",
    "usr/local/lib/modprobe.d",
    "usr/lib/modprobe.d",
    "lib/modprobe.d",
];

/// The initramfs-tools module list: lines go unquoted to modprobe.
pub const INITRAMFS_TOOLS_MODULES: &str = "etc/initramfs-tools/modules";

/// kmod's name for vfio-pci.
pub const VFIO_PCI_MODULE: &str = "vfio_pci";

/// The kernel's buffer for `vfio_pci.ids` (`char ids[1024]`): a value of this
/// length or more is refused with -ENOSPC.
pub const IDS_MAX_LEN: usize = 1024;

/// Where a setting came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// The kernel command line (`/proc/cmdline`).
    KernelCmdline,
    /// A line of a file on the host (path as the host sees it, 1-based line).
    File {
        /// Host path, e.g. `/etc/modprobe.d/vfio.conf`.
        path: String,
        /// First physical line of the (possibly continued) logical line.
        line: usize,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::KernelCmdline => f.write_str("kernel command line"),
            Origin::File { path, line } => write!(f, "{path}:{line}"),
        }
    }
}

impl Serialize for Origin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An `options <module> <options>` line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleOptions {
    /// Module name, normalised (`-` → `_`).
    pub module: String,
    /// The options text, exactly as handed to the kernel.
    pub options: String,
    /// File and line.
    pub origin: Origin,
}

/// A `softdep <module> pre: … post: …` line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Softdep {
    /// Module name, normalised.
    pub module: String,
    /// Modules loaded before it, as written.
    pub pre: Vec<String>,
    /// Modules loaded after it, as written.
    pub post: Vec<String>,
    /// File and line.
    pub origin: Origin,
}

/// An `install <module> <command>` line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallCommand {
    /// Module name, normalised.
    pub module: String,
    /// The shell command run instead of loading the module.
    pub command: String,
    /// File and line.
    pub origin: Origin,
}

impl InstallCommand {
    /// True for `/bin/false`, `/bin/true` (or bare `false`/`true`): the
    /// module can never be loaded through modprobe.
    pub fn is_hard_block(&self) -> bool {
        self.command
            .split_whitespace()
            .next()
            .and_then(|w| w.rsplit('/').next())
            .is_some_and(|w| w == "false" || w == "true")
    }
}

/// A `blacklist <module>` line (or a `modprobe.blacklist=` entry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Blacklist {
    /// Module name, normalised.
    pub module: String,
    /// File and line.
    pub origin: Origin,
}

/// A configuration path that exists but could not be read or listed. Its
/// content is unknown, and unknown configuration counts as admin-owned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigProblem {
    /// Host path.
    pub path: String,
    /// The error.
    pub error: String,
}

/// What one modprobe.d file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParsedFile {
    /// `options` lines.
    pub options: Vec<ModuleOptions>,
    /// `softdep` lines.
    pub softdeps: Vec<Softdep>,
    /// `install` lines.
    pub installs: Vec<InstallCommand>,
    /// `blacklist` lines.
    pub blacklists: Vec<Blacklist>,
    /// Lines kmod ignores, with kmod's complaint.
    pub warnings: Vec<String>,
}

/// The merged modprobe configuration of a host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModprobeConfig {
    /// Files parsed, in kmod's order (host paths).
    pub files: Vec<String>,
    /// Files skipped because an earlier directory has a file of the same name.
    pub shadowed: Vec<String>,
    /// Every `options` line, in parse order.
    pub options: Vec<ModuleOptions>,
    /// Every `softdep` line.
    pub softdeps: Vec<Softdep>,
    /// Every `install` line.
    pub installs: Vec<InstallCommand>,
    /// Every `blacklist` line.
    pub blacklists: Vec<Blacklist>,
    /// vfio-pci arguments from `/etc/initramfs-tools/modules`
    /// (`vfio-pci ids=…`), applied after the config files and the cmdline.
    pub initramfs_options: Vec<ModuleOptions>,
    /// Paths that exist but could not be read: unknown configuration.
    pub problems: Vec<ConfigProblem>,
    /// Ignored lines and entries.
    pub warnings: Vec<String>,
}

/// C's `strtok_r` with a delimiter set.
fn strtok<'a>(s: &'a [u8], pos: &mut usize, delims: &[u8]) -> Option<&'a [u8]> {
    while *pos < s.len() && delims.contains(&s[*pos]) {
        *pos += 1;
    }
    if *pos >= s.len() {
        return None;
    }
    let start = *pos;
    while *pos < s.len() && !delims.contains(&s[*pos]) {
        *pos += 1;
    }
    let tok = &s[start..*pos];
    if *pos < s.len() {
        // strtok_r overwrites the delimiter and resumes after it.
        *pos += 1;
    }
    Some(tok)
}

/// C's `strtok_r(NULL, "\0", …)`: the rest of the line, if any.
fn rest<'a>(s: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    if *pos >= s.len() {
        return None;
    }
    let r = &s[*pos..];
    *pos = s.len();
    Some(r)
}

/// kmod's `getline_wrapped`: a `\` before a newline joins lines (nothing
/// inserted); a `\` before any other character drops the backslash; a `\` at
/// end of file becomes the byte 0xFF (`(char)EOF`). Returns (first physical
/// line, logical line).
fn logical_lines(b: &[u8]) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut line = 1usize;
    let mut start = 1usize;
    let mut i = 0usize;
    while i < b.len() {
        let c = b[i];
        i += 1;
        match c {
            b'\n' => {
                out.push((start, std::mem::take(&mut buf)));
                line += 1;
                start = line;
            }
            b'\\' => match b.get(i) {
                Some(b'\n') => {
                    i += 1;
                    line += 1;
                }
                Some(&next) => {
                    buf.push(next);
                    i += 1;
                }
                None => buf.push(0xff),
            },
            _ => buf.push(c),
        }
    }
    if !buf.is_empty() {
        out.push((start, buf));
    }
    out
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// kmod's softdep splitting: whitespace-separated, `pre:` and `post:` switch
/// lists, names before either are dropped.
fn split_softdep(s: &[u8]) -> (Vec<String>, Vec<String>) {
    let (mut pre, mut post) = (Vec::new(), Vec::new());
    let mut mode = 0u8;
    for tok in s
        .split(|b| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'))
        .filter(|t| !t.is_empty())
    {
        match tok {
            b"pre:" => mode = 1,
            b"post:" => mode = 2,
            _ if mode == 1 => pre.push(lossy(tok)),
            _ if mode == 2 => post.push(lossy(tok)),
            _ => {}
        }
    }
    (pre, post)
}

/// Parses one modprobe.d file's text as kmod does (`kmod_config_parse`).
///
/// `path` is only used for origins and messages. A line is a comment only
/// when `#` is its very first character; `\` continues lines; module names
/// are normalised (`-` → `_`). Never fails: bad lines become warnings.
pub fn parse_file(text: &str, path: &str) -> ParsedFile {
    let mut out = ParsedFile::default();
    for (line_no, raw) in logical_lines(text.as_bytes()) {
        // C strings: nothing after a NUL exists.
        let line = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        if line.is_empty() || line[0] == b'#' {
            continue;
        }
        let origin = Origin::File {
            path: path.to_string(),
            line: line_no,
        };
        let mut pos = 0;
        let Some(cmd) = strtok(line, &mut pos, b"\t ") else {
            continue;
        };
        let bad = |out: &mut ParsedFile| {
            out.warnings.push(format!(
                "{path} line {line_no}: ignoring bad line starting with '{}'",
                lossy(cmd)
            ))
        };
        let name = |pos: &mut usize| {
            strtok(line, pos, b"\t ")
                .and_then(kmod_underscores)
                .map(|n| lossy(&n))
        };
        match cmd {
            b"options" => match (name(&mut pos), rest(line, &mut pos)) {
                (Some(module), Some(options)) => out.options.push(ModuleOptions {
                    module,
                    // kmod turns tabs into spaces in stored options.
                    options: lossy(options).replace('\t', " "),
                    origin,
                }),
                _ => bad(&mut out),
            },
            b"install" => match (name(&mut pos), rest(line, &mut pos)) {
                (Some(module), Some(command)) => out.installs.push(InstallCommand {
                    module,
                    command: lossy(command),
                    origin,
                }),
                _ => bad(&mut out),
            },
            b"softdep" => match (name(&mut pos), rest(line, &mut pos)) {
                (Some(module), Some(deps)) => {
                    let (pre, post) = split_softdep(deps);
                    out.softdeps.push(Softdep {
                        module,
                        pre,
                        post,
                        origin,
                    })
                }
                _ => bad(&mut out),
            },
            b"blacklist" => match name(&mut pos) {
                Some(module) => out.blacklists.push(Blacklist { module, origin }),
                None => bad(&mut out),
            },
            b"alias" | b"remove" | b"weakdep" => {
                let a = strtok(line, &mut pos, b"\t ");
                let b = strtok(line, &mut pos, b"\t ");
                if a.is_none() || b.is_none() {
                    bad(&mut out);
                }
            }
            b"include" | b"config" => out.warnings.push(format!(
                "{path}: command {} is deprecated and not parsed anymore",
                lossy(cmd)
            )),
            _ => bad(&mut out),
        }
    }
    out
}

/// Parses `/etc/initramfs-tools/modules`: each non-empty, non-`#` line is run
/// as `modprobe $line` (word-split, no quote processing), so
/// `vfio-pci ids=10de:2204` passes `ids=10de:2204` to vfio-pci.
pub fn parse_initramfs_modules(text: &str, path: &str) -> Vec<ModuleOptions> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_matches(|c: char| c == ' ' || c == '\t');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split([' ', '\t']).filter(|w| !w.is_empty());
        let Some(module) = words.next() else { continue };
        let Some(module) = kmod_underscores(module.as_bytes()).map(|m| lossy(&m)) else {
            continue;
        };
        let args: Vec<&str> = words.collect();
        if args.is_empty() {
            continue;
        }
        out.push(ModuleOptions {
            module,
            options: args.join(" "),
            origin: Origin::File {
                path: path.to_string(),
                line: i + 1,
            },
        });
    }
    out
}

/// kmod's `conf_files_filter_out`: hidden files out; only `*.conf` and
/// `*.alias` (kmod still reads the latter).
fn conf_name_ok(name: &[u8]) -> bool {
    !name.starts_with(b".")
        && name.len() >= 6
        && (name.ends_with(b".conf") || name.ends_with(b".alias"))
}

impl ModprobeConfig {
    /// Reads the host's modprobe configuration with kmod's search order and
    /// shadowing, plus the initramfs-tools module list. Never fails: paths
    /// that exist but cannot be read go to `problems`, bad lines to `warnings`.
    pub fn load(root: &HostRoot) -> ModprobeConfig {
        let mut cfg = ModprobeConfig::default();
        // name → (host path, rel path); BTreeMap on bytes = strcmp order.
        let mut chosen: BTreeMap<Vec<u8>, (String, std::path::PathBuf)> = BTreeMap::new();
        for dir in MODPROBE_DIRS {
            let abs = root.rel(dir);
            let meta = match root.metadata(&abs) {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    cfg.problems.push(ConfigProblem {
                        path: host_path(dir),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            if !meta.is_dir() {
                // kmod parses a configuration path that is a file as one file.
                let name = abs
                    .file_name()
                    .map(|n| n.as_bytes().to_vec())
                    .unwrap_or_default();
                insert_conf(&mut chosen, &mut cfg.shadowed, name, host_path(dir), abs);
                continue;
            }
            let entries = match root.read_dir(&abs) {
                Ok(e) => e,
                Err(e) => {
                    cfg.problems.push(ConfigProblem {
                        path: host_path(dir),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let mut names = Vec::new();
            for entry in entries {
                match entry {
                    Ok(e) => names.push(e.file_name()),
                    Err(e) => cfg.problems.push(ConfigProblem {
                        path: host_path(dir),
                        error: e.to_string(),
                    }),
                }
            }
            names.sort();
            for name in names {
                let bytes = name.as_bytes().to_vec();
                if !conf_name_ok(&bytes) {
                    continue;
                }
                let file_abs = abs.join(&name);
                let shown = format!("{}/{}", host_path(dir), name.to_string_lossy());
                match root.metadata(&file_abs) {
                    Ok(m) if m.is_dir() => {
                        cfg.warnings.push(format!(
                            "{shown}: a directory; kmod skips it (\"Directories inside directories are not supported\")"
                        ));
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        cfg.warnings
                            .push(format!("{shown}: dangling symlink; kmod skips it"));
                        continue;
                    }
                    // Unknown state: keep it in the list so reading it
                    // records the problem (and shadows later names, as the
                    // listing in kmod would).
                    Err(_) => {}
                }
                insert_conf(&mut chosen, &mut cfg.shadowed, bytes, shown, file_abs);
            }
        }
        for (shown, abs) in chosen.into_values() {
            match read_text(root, &abs) {
                ReadOutcome::Text(text) => {
                    cfg.absorb(parse_file(&text, &shown));
                    cfg.files.push(shown);
                }
                ReadOutcome::Missing => cfg
                    .warnings
                    .push(format!("{shown}: vanished while reading; skipped")),
                ReadOutcome::Failed(error) => {
                    cfg.problems.push(ConfigProblem { path: shown, error })
                }
            }
        }
        match read_text(root, &root.rel(INITRAMFS_TOOLS_MODULES)) {
            ReadOutcome::Text(text) => {
                cfg.initramfs_options =
                    parse_initramfs_modules(&text, &host_path(INITRAMFS_TOOLS_MODULES))
                        .into_iter()
                        .filter(|o| o.module == VFIO_PCI_MODULE)
                        .collect();
            }
            ReadOutcome::Missing => {}
            ReadOutcome::Failed(error) => cfg.problems.push(ConfigProblem {
                path: host_path(INITRAMFS_TOOLS_MODULES),
                error,
            }),
        }
        cfg
    }

    /// Merges one parsed file (appended: parse order is precedence order).
    pub fn absorb(&mut self, f: ParsedFile) {
        self.options.extend(f.options);
        self.softdeps.extend(f.softdeps);
        self.installs.extend(f.installs);
        self.blacklists.extend(f.blacklists);
        self.warnings.extend(f.warnings);
    }

    /// `options` lines for a module (name normalised before comparing).
    pub fn options_for<'a>(&'a self, module: &str) -> impl Iterator<Item = &'a ModuleOptions> {
        let m = normalize_module(module);
        self.options.iter().filter(move |o| o.module == m)
    }
}

fn insert_conf(
    chosen: &mut BTreeMap<Vec<u8>, (String, std::path::PathBuf)>,
    shadowed: &mut Vec<String>,
    name: Vec<u8>,
    shown: String,
    abs: std::path::PathBuf,
) {
    match chosen.entry(name) {
        std::collections::btree_map::Entry::Occupied(_) => shadowed.push(shown),
        std::collections::btree_map::Entry::Vacant(v) => {
            v.insert((shown, abs));
        }
    }
}

/// A module name as kmod compares it: `-` → `_`.
pub fn normalize_module(name: &str) -> String {
    name.replace('-', "_")
}

/// The outcome of applying `ids=` occurrences in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct EffectiveIds {
    /// The value that stands and where it came from.
    pub value: Option<(String, Origin)>,
    /// Earlier values replaced by a later one.
    pub overridden: Vec<(String, Origin)>,
    /// Occurrences that did not apply, and why.
    pub notes: Vec<String>,
    /// Problems that make the kernel refuse the module load.
    pub load_errors: Vec<String>,
}

/// Applies module options the way the kernel does at module load: modprobe
/// joins every matching options string with spaces, and `parse_args` walks
/// the result with `next_arg`, stopping at `--`; each `ids=` replaces the
/// previous one (`param_set_copystring`). A missing value or one of
/// [`IDS_MAX_LEN`] bytes or more fails (and fails the whole module load).
pub(crate) fn apply_module_options(segments: &[(String, Origin)]) -> EffectiveIds {
    let mut joined = String::new();
    let mut starts = Vec::with_capacity(segments.len());
    for (text, _) in segments {
        starts.push(joined.len());
        joined.push_str(text);
        joined.push(' ');
    }
    let origin_at = |at: usize| -> Origin {
        let idx = starts.iter().rposition(|&s| s <= at).unwrap_or(0);
        segments
            .get(idx)
            .map(|(_, o)| o.clone())
            .unwrap_or(Origin::KernelCmdline)
    };
    let mut eff = EffectiveIds::default();
    let mut dashdash_noted = false;
    for p in raw_params(joined.as_bytes()) {
        let name = lossy(&p.name).replace('-', "_");
        if name != "ids" {
            continue;
        }
        let origin = origin_at(p.start);
        if p.after_dashdash {
            if !dashdash_noted {
                eff.notes.push(format!(
                    "ids at {origin} comes after `--` in vfio-pci's options: the kernel ignores it at module load"
                ));
                dashdash_noted = true;
            }
            continue;
        }
        match p.value {
            None => eff.load_errors.push(format!(
                "ids without a value at {origin}: the kernel rejects it (-EINVAL) and vfio-pci fails to load"
            )),
            Some(v) if v.len() >= IDS_MAX_LEN => eff.load_errors.push(format!(
                "ids value at {origin} is {} bytes, over the kernel's {} (-ENOSPC); vfio-pci fails to load",
                v.len(),
                IDS_MAX_LEN - 1
            )),
            Some(v) => {
                if let Some(prev) = eff.value.replace((lossy(&v), origin)) {
                    eff.overridden.push(prev);
                }
            }
        }
    }
    eff
}

/// The option segments kmod would hand to vfio-pci, in order: modprobe.d
/// `options` (parse order), then kernel command line options, then
/// initramfs-tools arguments (modprobe's own arguments come last).
pub(crate) fn vfio_option_segments(
    cfg: &ModprobeConfig,
    cmdline: &[KmodCmdlineOption],
) -> Vec<(String, Origin)> {
    let mut segs: Vec<(String, Origin)> = cfg
        .options_for(VFIO_PCI_MODULE)
        .map(|o| (o.options.clone(), o.origin.clone()))
        .collect();
    segs.extend(
        cmdline
            .iter()
            .filter(|o| o.module == VFIO_PCI_MODULE)
            .map(|o| (o.option_string(), Origin::KernelCmdline)),
    );
    segs.extend(
        cfg.initramfs_options
            .iter()
            .filter(|o| o.module == VFIO_PCI_MODULE)
            .map(|o| (o.options.clone(), o.origin.clone())),
    );
    segs
}

/// The `ids=` value vfio-pci gets when kmod loads it as a module:
/// modprobe.d options in parse order, then the kernel command line (kmod's
/// reading of it), then `/etc/initramfs-tools/modules` arguments; the last
/// `ids=` wins. `None` when no source sets it.
pub fn effective_vfio_ids(
    cfg: &ModprobeConfig,
    cmdline_kmod_options: &[KmodCmdlineOption],
) -> Option<(String, Origin)> {
    apply_module_options(&vfio_option_segments(cfg, cmdline_kmod_options)).value
}

/// Whether vfio-pci is built into the running kernel, and how we know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuiltinStatus {
    /// `Some(true)` built in, `Some(false)` a module (or absent), `None` unknown.
    pub builtin: Option<bool>,
    /// How it was decided, for `explain`.
    pub detail: String,
}

fn lists_vfio_pci(modules_builtin: &str) -> bool {
    modules_builtin.lines().any(|l| {
        let base = l.trim().rsplit('/').next().unwrap_or("");
        base.strip_suffix(".ko")
            .is_some_and(|m| normalize_module(m) == VFIO_PCI_MODULE)
    })
}

/// Decides built-in vs module: `lib/modules/<release>/modules.builtin`
/// (release from `proc/sys/kernel/osrelease`), falling back to
/// `sys/module/vfio_pci` (`initstate` exists only for a loaded module).
pub fn builtin_status(root: &HostRoot) -> BuiltinStatus {
    let mut why = Vec::new();
    match root.modules_file("modules.builtin") {
        Ok(Some(path)) => {
            let shown = format!(
                "/{}",
                path.strip_prefix(root.path())
                    .unwrap_or(&path)
                    .to_string_lossy()
            );
            match read_text(root, &path) {
                ReadOutcome::Text(t) if lists_vfio_pci(&t) => {
                    return BuiltinStatus {
                        builtin: Some(true),
                        detail: format!("{shown} lists kernel/drivers/vfio/pci/vfio-pci.ko"),
                    };
                }
                ReadOutcome::Text(_) => {
                    return BuiltinStatus {
                        builtin: Some(false),
                        detail: format!("{shown} does not list vfio-pci: it is a module"),
                    };
                }
                ReadOutcome::Missing => why.push(format!("{shown} is missing")),
                ReadOutcome::Failed(e) => why.push(format!("cannot read {shown}: {e}")),
            }
        }
        Ok(None) => why.push("kernel release unknown".to_string()),
        Err(e) => why.push(format!("kernel release: {e}")),
    }
    let module_dir = root.rel("sys/module/vfio_pci");
    if root.exists_lossy(&module_dir.join("initstate")) {
        return BuiltinStatus {
            builtin: Some(false),
            detail: format!(
                "{}; /sys/module/vfio_pci/initstate exists: loaded as a module",
                why.join("; ")
            ),
        };
    }
    if root.is_dir(&module_dir) {
        return BuiltinStatus {
            builtin: Some(true),
            detail: format!(
                "{}; /sys/module/vfio_pci has no initstate: built in",
                why.join("; ")
            ),
        };
    }
    BuiltinStatus {
        builtin: None,
        detail: format!(
            "{}; vfio_pci not in /sys/module: built-in status unknown",
            why.join("; ")
        ),
    }
}

/// `Some(true)` when vfio-pci is built into the running kernel, `Some(false)`
/// when it is a module (or absent), `None` when unknown. See [`builtin_status`].
pub fn vfio_pci_builtin(root: &HostRoot) -> Option<bool> {
    builtin_status(root).builtin
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::kmod_options;

    #[test]
    fn options_and_normalised_names() {
        let f = parse_file(
            "# comment\noptions vfio-pci ids=10de:2204 disable_vga=1\n\noptions\tvfio_pci\tids=1:2\n",
            "/etc/modprobe.d/v.conf",
        );
        assert_eq!(f.options.len(), 2);
        assert_eq!(f.options[0].module, "vfio_pci");
        assert_eq!(f.options[0].options, "ids=10de:2204 disable_vga=1");
        assert_eq!(
            f.options[0].origin,
            Origin::File {
                path: "/etc/modprobe.d/v.conf".into(),
                line: 2
            }
        );
        assert_eq!(f.options[1].options, "ids=1:2");
        assert_eq!(f.options[1].origin.to_string(), "/etc/modprobe.d/v.conf:4");
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);
    }

    #[test]
    fn continuation_and_comments() {
        let f = parse_file(
            "options vfio-pci \\\nids=10de:2204\n  # indented hash is not a comment\noptions x y # trailing\n",
            "f",
        );
        assert_eq!(f.options[0].options, "ids=10de:2204");
        assert_eq!(f.options[0].origin.to_string(), "f:1");
        // kmod: '#' only comments at column 0; the line is a bad command.
        assert_eq!(
            f.warnings,
            vec!["f line 3: ignoring bad line starting with '#'"]
        );
        // A trailing "#" is part of the options (the kernel ignores it as
        // an unknown parameter).
        assert_eq!(f.options[1].options, "y # trailing");
        // Backslash before another character is dropped.
        let f = parse_file("blacklist nou\\veau\n", "f");
        assert_eq!(f.blacklists[0].module, "nouveau");
        // Backslash at EOF becomes 0xFF: the name no longer matches.
        let f = parse_file("blacklist nouveau\\", "f");
        assert_ne!(f.blacklists[0].module, "nouveau");
    }

    #[test]
    fn bad_lines_warn() {
        let f = parse_file(
            "options vfio-pci\noptions\nfrobnicate x\nblacklist\ninstall a\n",
            "f",
        );
        assert!(f.options.is_empty());
        assert_eq!(f.warnings.len(), 5, "{:?}", f.warnings);
        assert!(f.warnings[0].starts_with("f line 1: ignoring bad line starting with 'options'"));
    }

    #[test]
    fn softdep_install_blacklist() {
        let f = parse_file(
            "softdep nvidia pre: vfio-pci post: foo\nsoftdep drm pre:vfio-pci\ninstall nouveau /bin/false\ninstall nvidia /sbin/modprobe vfio-pci; /sbin/modprobe --ignore-install nvidia\nblacklist nouveau\n",
            "f",
        );
        assert_eq!(f.softdeps[0].module, "nvidia");
        assert_eq!(f.softdeps[0].pre, vec!["vfio-pci"]);
        assert_eq!(f.softdeps[0].post, vec!["foo"]);
        // `pre:vfio-pci` is one word, not the `pre:` keyword.
        assert!(f.softdeps[1].pre.is_empty());
        assert!(f.installs[0].is_hard_block());
        assert!(!f.installs[1].is_hard_block());
        assert_eq!(f.blacklists[0].module, "nouveau");
    }

    #[test]
    fn last_ids_wins_and_cmdline_after_files() {
        let mut cfg = ModprobeConfig::default();
        cfg.absorb(parse_file("options vfio_pci ids=10de:1111\n", "/a.conf"));
        cfg.absorb(parse_file(
            "options vfio-pci ids=10de:2222 ids=10de:3333\n",
            "/b.conf",
        ));
        assert_eq!(
            effective_vfio_ids(&cfg, &[]),
            Some((
                "10de:3333".into(),
                Origin::File {
                    path: "/b.conf".into(),
                    line: 1
                }
            ))
        );
        let cmd = kmod_options("ro vfio-pci.ids=10de:4444 quiet");
        assert_eq!(
            effective_vfio_ids(&cfg, &cmd),
            Some(("10de:4444".into(), Origin::KernelCmdline))
        );
        let eff = apply_module_options(&vfio_option_segments(&cfg, &cmd));
        assert_eq!(eff.overridden.len(), 3);
        // Quoted cmdline value: kmod keeps the quotes, the kernel strips them.
        let cmd = kmod_options(r#"vfio_pci.ids="10de:1b80, 10de:10f0""#);
        assert_eq!(
            effective_vfio_ids(&ModprobeConfig::default(), &cmd)
                .unwrap()
                .0,
            "10de:1b80, 10de:10f0"
        );
    }

    #[test]
    fn module_options_stop_at_dashdash_and_reject_bad_values() {
        let eff = apply_module_options(&[(
            "ids=10de:1 -- ids=10de:2".to_string(),
            Origin::KernelCmdline,
        )]);
        assert_eq!(eff.value.unwrap().0, "10de:1");
        assert_eq!(eff.notes.len(), 1);
        let long = format!("ids={}", "1".repeat(IDS_MAX_LEN));
        let eff = apply_module_options(&[
            ("ids=10de:1".to_string(), Origin::KernelCmdline),
            (long, Origin::KernelCmdline),
            ("ids".to_string(), Origin::KernelCmdline),
        ]);
        assert_eq!(eff.value.unwrap().0, "10de:1");
        assert_eq!(eff.load_errors.len(), 2);
    }

    #[test]
    fn initramfs_lines() {
        let o = parse_initramfs_modules(
            "# comment\nvfio\nvfio-pci ids=10de:2204,10de:1aef\n  vfio_pci   disable_vga=1\n",
            "/etc/initramfs-tools/modules",
        );
        assert_eq!(o.len(), 2);
        assert_eq!(o[0].module, "vfio_pci");
        assert_eq!(o[0].options, "ids=10de:2204,10de:1aef");
        assert_eq!(o[0].origin.to_string(), "/etc/initramfs-tools/modules:3");
        assert_eq!(o[1].options, "disable_vga=1");
    }

    #[test]
    fn builtin_list_detection() {
        assert!(lists_vfio_pci(
            "kernel/drivers/pci/pcie/portdrv.ko\nkernel/drivers/vfio/pci/vfio-pci.ko\n"
        ));
        assert!(!lists_vfio_pci(
            "kernel/drivers/vfio/pci/vfio-pci-core.ko\n"
        ));
        assert!(!lists_vfio_pci(""));
    }

    #[test]
    fn conf_names() {
        assert!(conf_name_ok(b"a.conf"));
        assert!(conf_name_ok(b"x.alias"));
        assert!(!conf_name_ok(b".hidden.conf"));
        assert!(!conf_name_ok(b"vfio.conf.bak"));
        assert!(!conf_name_ok(b"README"));
    }
}
