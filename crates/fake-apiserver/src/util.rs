//! Small self-contained helpers: JSON patches, selectors, query decoding,
//! timestamps and a non-cryptographic RNG. Kept here so the store and the
//! router read as Kubernetes semantics rather than string plumbing.

use serde_json::{Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// Reads `metadata.<field>` as a string.
pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// Sets (or with `Value::Null`, removes) `metadata.<field>`; no-op when
/// `metadata` is not an object (callers validate that up front).
pub(crate) fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if value.is_null() {
            meta.remove(field);
        } else {
            meta.insert(field.to_owned(), value);
        }
    }
}

/// Walks a dotted path (`spec.pool.name`); missing segments yield `None`.
pub(crate) fn get_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(obj, |v, seg| v.get(seg))
}

/// Field-selector view of a value: strings as-is, missing/null as "", and
/// scalars in their JSON spelling (the API server compares text).
pub(crate) fn field_text(obj: &Value, path: &str) -> String {
    match get_path(obj, path) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// RFC 7386 JSON merge patch. Strategic merge patch is mapped onto this too:
/// lists are replaced instead of merged by key, which is what the fake
/// documents and what the plugin's status/label patches need.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in fields {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Splits a JSON pointer into (parent pointer, unescaped last token).
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let idx = path
        .rfind('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    let last = path[idx + 1..].replace("~1", "/").replace("~0", "~");
    Ok((&path[..idx], last))
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(last, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            let idx = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= items.len())
                    .ok_or_else(|| format!("array index {last:?} out of range at {path:?}"))?
            };
            items.insert(idx, value);
            Ok(())
        }
        _ => Err(format!("parent of {path:?} does not exist")),
    }
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    let removed = match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&last),
        Some(Value::Array(items)) => match last.parse::<usize>() {
            Ok(i) if i < items.len() => Some(items.remove(i)),
            _ => None,
        },
        _ => None,
    };
    removed.ok_or_else(|| format!("path {path:?} does not exist"))
}

/// RFC 6902 JSON patch (add, remove, replace, move, copy, test). Applied to
/// a copy by the caller, so a failing op leaves the stored object untouched.
pub(crate) fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array")?;
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("JSON patch operation without a path")?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("{name} at {path:?} needs a value"))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{name} at {path:?} needs from"))
        };
        match name {
            "add" => pointer_add(doc, path, value()?)?,
            "remove" => {
                pointer_remove(doc, path)?;
            }
            "replace" => {
                let slot = doc
                    .pointer_mut(path)
                    .ok_or_else(|| format!("replace: path {path:?} does not exist"))?;
                *slot = value()?;
            }
            "move" => {
                let moved = pointer_remove(doc, from()?)?;
                pointer_add(doc, path, moved)?;
            }
            "copy" => {
                let copied = doc
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| format!("copy: from of {path:?} does not exist"))?;
                pointer_add(doc, path, copied)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(format!("test failed at {path:?}"));
                }
            }
            other => return Err(format!("unsupported JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

/// One `fieldSelector` term.
#[derive(Debug, Clone)]
struct FieldTerm {
    field: String,
    equal: bool,
    value: String,
}

/// One `labelSelector` requirement.
#[derive(Debug, Clone)]
enum LabelTerm {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// Namespace scope plus parsed field and label selectors of a list, watch or
/// delete-collection request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    namespace: Option<String>,
    fields: Vec<FieldTerm>,
    labels: Vec<LabelTerm>,
}

impl Filter {
    /// Parses the selectors; `allowed` lists the field labels the resource
    /// supports, and anything else is an error like the real server's
    /// "field label not supported".
    pub(crate) fn parse(
        namespace: Option<String>,
        field_selector: Option<&str>,
        label_selector: Option<&str>,
        allowed: &[&str],
    ) -> Result<Self, String> {
        let mut fields = Vec::new();
        for term in field_selector.unwrap_or("").split(',').map(str::trim) {
            if term.is_empty() {
                continue;
            }
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let field = field.trim();
            if !allowed.contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            fields.push(FieldTerm {
                field: field.to_owned(),
                equal,
                value: value.trim().to_owned(),
            });
        }
        let labels = split_outside_parens(label_selector.unwrap_or(""))
            .into_iter()
            .map(parse_label_term)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            namespace,
            fields,
            labels,
        })
    }

    /// Whether an object is in scope and satisfies every selector term.
    pub(crate) fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && meta_str(obj, "namespace").unwrap_or("") != ns
        {
            return false;
        }
        let fields_ok = self
            .fields
            .iter()
            .all(|t| (field_text(obj, &t.field) == t.value) == t.equal);
        let labels = obj.get("metadata").and_then(|m| m.get("labels"));
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        fields_ok
            && self.labels.iter().all(|t| match t {
                LabelTerm::Eq(k, v) => label(k) == Some(v.as_str()),
                LabelTerm::Ne(k, v) => label(k) != Some(v.as_str()),
                LabelTerm::Exists(k) => label(k).is_some(),
                LabelTerm::Absent(k) => label(k).is_none(),
                LabelTerm::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                LabelTerm::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            })
    }
}

/// Splits on commas that are not inside `(...)` so `k in (a,b),x=y` works.
fn split_outside_parens(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|t| !t.is_empty());
    out
}

fn parse_label_term(term: &str) -> Result<LabelTerm, String> {
    let set = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("invalid label selector term {term:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    let t = term.trim();
    if let Some((k, v)) = t.split_once("!=") {
        return Ok(LabelTerm::Ne(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        return Ok(LabelTerm::Eq(k.trim().into(), v.trim().into()));
    }
    if let Some((k, rest)) = t.split_once(" notin ") {
        return Ok(LabelTerm::NotIn(k.trim().into(), set(rest)?));
    }
    if let Some((k, rest)) = t.split_once(" in ") {
        return Ok(LabelTerm::In(k.trim().into(), set(rest)?));
    }
    if let Some(k) = t.strip_prefix('!') {
        return Ok(LabelTerm::Absent(k.trim().into()));
    }
    if t.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
        return Err(format!("invalid label selector term {term:?}"));
    }
    Ok(LabelTerm::Exists(t.into()))
}

/// Decodes `application/x-www-form-urlencoded` text (`+` and `%XX`).
pub(crate) fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match (b, hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (other, _, _) => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a query string into decoded key/value pairs.
pub(crate) fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

/// Current UTC time as RFC 3339 with second precision, as in `metav1.Time`.
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Days-to-civil conversion (H. Hinnant) to avoid a date-time dependency.
    let z = (secs / 86_400) as i64 + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// SplitMix64: enough randomness for UIDs and generateName suffixes without
/// pulling in a crypto RNG (names only need to be unlikely to collide).
#[derive(Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeds from the clock and the process id so parallel test binaries differ.
    pub(crate) fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self(nanos ^ (u64::from(std::process::id()) << 32))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Five characters from the alphabet the API server uses for
    /// `generateName` (no vowels, so suffixes never spell words).
    pub(crate) fn name_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..5)
            .map(|_| ALPHABET[(self.next() % ALPHABET.len() as u64) as usize] as char)
            .collect()
    }

    /// A random (version 4 layout) UUID string.
    pub(crate) fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        let b = (b & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xFFFF,
            a & 0x0FFF,
            b >> 48,
            b & 0xFFFF_FFFF_FFFF
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_removes_nulls_and_replaces_lists() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut doc = json!({"a": [1, 2], "b": {"x/y": 1}});
        let ops = json!([
            {"op": "add", "path": "/a/-", "value": 3},
            {"op": "remove", "path": "/a/0"},
            {"op": "replace", "path": "/b/x~1y", "value": 5},
            {"op": "copy", "from": "/b", "path": "/c"},
            {"op": "move", "from": "/c", "path": "/d"},
            {"op": "test", "path": "/d/x~1y", "value": 5}
        ]);
        json_patch(&mut doc, &ops).expect("patch applies");
        assert_eq!(doc, json!({"a": [2, 3], "b": {"x/y": 5}, "d": {"x/y": 5}}));
        let err = json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/a/0", "value": 9}]),
        );
        assert!(err.is_err());
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "replace", "path": "/zz", "value": 1}])
            )
            .is_err()
        );
    }

    #[test]
    fn selectors() {
        let obj = json!({"metadata": {"name": "n", "labels": {"app": "x", "tier": "gpu"}},
                         "spec": {"nodeName": "node-1", "pool": {"name": "p"}}});
        let allowed = ["metadata.name", "spec.nodeName", "spec.pool.name"];
        let f = |fs: &str, ls: &str| Filter::parse(None, Some(fs), Some(ls), &allowed);
        assert!(
            f("spec.nodeName=node-1,spec.pool.name==p", "app=x")
                .unwrap()
                .matches(&obj)
        );
        assert!(!f("spec.nodeName!=node-1", "").unwrap().matches(&obj));
        assert!(
            f("", "tier in (gpu,cpu),!missing,app")
                .unwrap()
                .matches(&obj)
        );
        assert!(!f("", "tier notin (gpu)").unwrap().matches(&obj));
        assert!(f("", "app!=y").unwrap().matches(&obj));
        assert!(f("spec.driver=x", "").is_err());
    }

    #[test]
    fn decoding_and_time() {
        assert_eq!(url_decode("spec.nodeName%3Dn+1%"), "spec.nodeName=n 1%");
        let ts = now_rfc3339();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'));
        let mut rng = Rng::new();
        assert_eq!(rng.name_suffix().len(), 5);
        assert_eq!(rng.uuid().len(), 36);
    }
}
