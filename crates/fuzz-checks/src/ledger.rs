//! Target `ledger`: whatever `ledger.json` holds (truncated, corrupted,
//! hand-edited, another format version), the reader either loads it or
//! sets it aside with a reason, and never loses a record it could read.
//!
//! Input: one mode byte, then the body. Random bytes almost never carry a
//! valid SHA-256, so the mode byte usually frames the body with a correct
//! header (structure-aware), letting the fuzzer reach the JSON decoder.

use std::collections::BTreeSet;
use std::fs;

use serde_json::Value;
use sha2::{Digest, Sha256};
use vfio_gpu_engine::ledger::{LEDGER_FORMAT, LedgerBody, LedgerFile, decode, encode};

/// How the mode byte frames the body.
fn frame(mode: u8, body: &[u8]) -> (Vec<u8>, bool) {
    let sum = hex::encode(Sha256::digest(body));
    let (header, intact) = match mode & 3 {
        // The whole input is the file.
        0 => return (body.to_vec(), false),
        // What this build writes.
        1 => (
            format!("vfio-gpu-dra-ledger format={LEDGER_FORMAT} sha256={sum}\n"),
            true,
        ),
        // Another format version (older, newer, absurd).
        2 => (
            format!("vfio-gpu-dra-ledger format={} sha256={sum}\n", mode >> 2),
            true,
        ),
        // Truncated after a correct header.
        _ => {
            let keep = body.len() * usize::from(mode >> 2) / 64;
            let mut out =
                format!("vfio-gpu-dra-ledger format={LEDGER_FORMAT} sha256={sum}\n").into_bytes();
            out.extend_from_slice(&body[..keep]);
            return (out, keep == body.len());
        }
    };
    let mut out = header.into_bytes();
    out.extend_from_slice(body);
    (out, intact)
}

/// Keys of a JSON object (empty for anything else).
fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// A loaded body survives a write/read cycle: same records, and every field
/// it held (top level and per GPU record) is written back.
fn check_round_trip(body: &LedgerBody, json: &[u8]) {
    let again = encode(body);
    let reread = decode(&again).expect("a ledger we encoded must decode");
    assert_eq!(&reread, body, "write/read changed the ledger");
    let (Ok(orig), Ok(written)) = (
        serde_json::from_slice::<Value>(json),
        serde_json::from_slice::<Value>(
            &again[again.iter().position(|b| *b == b'\n').map_or(0, |p| p + 1)..],
        ),
    ) else {
        panic!("a decoded ledger body must be JSON, and so must its re-encoding");
    };
    let missing: Vec<_> = keys(&orig).difference(&keys(&written)).cloned().collect();
    assert!(missing.is_empty(), "fields dropped on rewrite: {missing:?}");
    for (bdf, rec) in orig
        .get("gpus")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let Some(w) = written["gpus"].as_object().and_then(|g| {
            g.iter()
                .find(|(k, _)| k.parse::<vfio_gpu_host::Bdf>().ok() == bdf.parse().ok())
                .map(|(_, v)| v)
        }) else {
            panic!("GPU record {bdf} dropped on rewrite");
        };
        let missing: Vec<_> = keys(rec).difference(&keys(w)).cloned().collect();
        assert!(
            missing.is_empty(),
            "fields of {bdf} dropped on rewrite: {missing:?}"
        );
    }
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let (bytes, checksummed) = frame(mode, body);
    let decoded = decode(&bytes);
    match &decoded {
        Ok(b) => {
            let json = &bytes[bytes.iter().position(|b| *b == b'\n').map_or(0, |p| p + 1)..];
            check_round_trip(b, json);
        }
        Err(reason) => assert!(!reason.is_empty(), "a rejected ledger needs a reason"),
    }

    // The same bytes as the file on disk.
    let dir = crate::scratch::dir("ledger");
    let file = LedgerFile::new(&dir).expect("scratch state directory");
    let path = file.path();
    fs::write(&path, &bytes).expect("writing the scratch ledger");
    let (body, problem) = file.load();
    match (&decoded, problem) {
        (Ok(d), None) => {
            assert_eq!(&body, d, "load and decode disagree");
            assert_eq!(
                fs::read(&path).ok().as_deref(),
                Some(&bytes[..]),
                "load changed the file"
            );
        }
        (Ok(_), Some(p)) => panic!("a decodable ledger was rejected: {}", p.reason),
        (Err(_), None) => panic!("an undecodable ledger loaded without a problem"),
        (Err(_), Some(p)) => {
            assert!(!p.reason.is_empty(), "a rejected ledger needs a reason");
            assert_eq!(body, LedgerBody::default());
            match &p.moved_to {
                // Set aside: the bytes are all still there, under the new name,
                // and only a file whose checksum failed may be set aside (one
                // that verifies may hold records a newer build understands).
                Some(to) => {
                    assert!(!p.read_only);
                    assert!(
                        !checksummed,
                        "a checksummed ledger was set aside: {}",
                        p.reason
                    );
                    assert_eq!(
                        fs::read(to).ok().as_deref(),
                        Some(&bytes[..]),
                        "set-aside file differs"
                    );
                    assert!(!path.exists(), "set aside but still in place");
                    // Scratch cleanup; the next input starts from a fresh path anyway.
                    let _ = fs::remove_file(to);
                }
                // Kept: in place, untouched, and nothing may overwrite it.
                None => {
                    assert!(
                        p.read_only,
                        "rejected without being set aside or kept read-only"
                    );
                    assert_eq!(
                        fs::read(&path).ok().as_deref(),
                        Some(&bytes[..]),
                        "kept file changed"
                    );
                    let any = LedgerBody {
                        boot_id: "fuzz".into(),
                        ..LedgerBody::default()
                    };
                    assert!(file.store(&any).is_err(), "a kept ledger was overwritten");
                }
            }
        }
    }
    // Scratch cleanup; the next input starts from a fresh path anyway.
    let _ = fs::remove_file(&path);
}
