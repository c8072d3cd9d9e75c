#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! When the ledger and its state directory are trusted: a file this build
//! cannot understand is kept read-only, a corrupt one set aside under a
//! unique name, the directory private, and nothing recorded without a boot
//! id. The ledger and state-directory findings of the 2026-11-30 review:
//! m1 (boot id), m3 (keep what this build cannot understand), m4 (unique,
//! durable set-aside), m5 (permissions, ownership, symlinks).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;
use vfio_gpu_engine::ledger::{LedgerError, LedgerFile, decode, encode};
use vfio_gpu_engine::{EngineError, Holder};

fn claim() -> Holder {
    Holder::Claim {
        uid: "u".into(),
        namespace: "n".into(),
        name: "c".into(),
    }
}

/// A state dir holding a ledger with B configured; returns (tmp, state, bytes).
fn configured() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let k = sim(&host);
    let state = dir.path().join("state");
    let e = engine(&k, &state);
    e.configure(bdf(B), claim()).unwrap();
    drop(e);
    let bytes = std::fs::read(state.join("ledger.json")).unwrap();
    (dir, state, bytes)
}

fn set_aside_files(state: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ledger.json.bad-"))
        .collect();
    v.sort();
    v
}

/// m3: kept in place, reported read-only, and every store refused.
fn assert_kept_read_only(state: &std::path::Path, bytes: &[u8], reason: &str) {
    let file = LedgerFile::new(state).unwrap();
    let (body, problem) = file.load();
    let problem = problem.expect("reported");
    assert!(problem.reason.contains(reason), "{}", problem.reason);
    assert!(
        problem.read_only && problem.moved_to.is_none(),
        "{problem:?}"
    );
    assert!(body.gpus.is_empty());
    assert!(set_aside_files(state).is_empty(), "not moved aside");
    let err = file.store(&body).unwrap_err();
    assert!(matches!(err, LedgerError::ReadOnly { .. }), "{err}");
    assert_eq!(
        std::fs::read(state.join("ledger.json")).unwrap(),
        bytes,
        "untouched"
    );
}

#[test]
fn newer_format_is_kept_read_only() {
    let (_d, state, bytes) = configured();
    let newer = String::from_utf8(bytes)
        .unwrap()
        .replacen("format=1", "format=2", 1)
        .into_bytes();
    std::fs::write(state.join("ledger.json"), &newer).unwrap();
    assert_kept_read_only(&state, &newer, "format 2 is newer");
}

#[test]
fn unknown_enum_value_is_kept_read_only() {
    let (_d, state, bytes) = configured();
    // A newer version's state, with a valid checksum.
    let body = &bytes[bytes.iter().position(|b| *b == b'\n').unwrap() + 1..];
    let text = String::from_utf8(body.to_vec())
        .unwrap()
        .replace("\"configured\"", "\"quarantined\"");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let json = serde_json::to_vec_pretty(&v).unwrap();
    use sha2::Digest;
    let mut newer = format!(
        "vfio-gpu-dra-ledger format=1 sha256={}\n",
        hex::encode(sha2::Sha256::digest(&json))
    )
    .into_bytes();
    newer.extend_from_slice(&json);
    assert!(decode(&newer).is_err());
    std::fs::write(state.join("ledger.json"), &newer).unwrap();
    assert_kept_read_only(&state, &newer, "quarantined");
}

#[test]
fn unreadable_ledger_is_kept_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // EISDIR stands in for EIO/EACCES.
    std::fs::create_dir_all(state.join("ledger.json")).unwrap();
    let file = LedgerFile::new(&state).unwrap();
    let (_body, problem) = file.load();
    let problem = problem.expect("reported");
    assert!(
        problem.read_only && problem.moved_to.is_none(),
        "{problem:?}"
    );
    assert!(state.join("ledger.json").is_dir(), "not moved");
    assert!(set_aside_files(&state).is_empty());
}

/// m3 end to end: an engine never records over a kept ledger (it may
/// refuse to open at all, or open read-only), and the host is untouched.
#[test]
fn engine_does_not_mutate_over_a_kept_ledger() {
    let (dir, state, bytes) = configured();
    let newer = String::from_utf8(bytes)
        .unwrap()
        .replacen("format=1", "format=3", 1)
        .into_bytes();
    std::fs::write(state.join("ledger.json"), &newer).unwrap();
    let host = dir.path().join("host");
    let k = sim(&host);
    match vfio_gpu_engine::Engine::open(
        std::sync::Arc::new(k.clone()),
        &state,
        vfio_gpu_host::GpuSelector::default(),
        vfio_gpu_intent::Policy::default(),
        config(),
    ) {
        Err(e) => assert!(e.to_string().contains("read-only"), "{e}"),
        Ok((e, report)) => {
            assert!(report.ledger_problem.is_some_and(|p| p.read_only));
            assert!(e.configure(bdf(A), claim()).is_err());
        }
    }
    assert!(k.log().is_empty(), "{:?}", k.log());
    assert_eq!(std::fs::read(state.join("ledger.json")).unwrap(), newer);
}

/// m4: two corrupt ledgers set aside within one second keep both copies.
#[test]
fn set_aside_names_are_unique() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = LedgerFile::new(&state).unwrap();
    for junk in [&b"first garbage"[..], &b"second garbage"[..]] {
        std::fs::write(state.join("ledger.json"), junk).unwrap();
        let (_b, p) = file.load();
        let p = p.unwrap();
        assert!(!p.read_only, "{p:?}");
        assert!(p.moved_to.unwrap().exists());
    }
    let names = set_aside_files(&state);
    assert_eq!(names.len(), 2, "{names:?}");
    let contents: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(state.join(n)).unwrap())
        .collect();
    assert!(contents.contains(&b"first garbage".to_vec()));
    assert!(contents.contains(&b"second garbage".to_vec()));
}

/// m5: 0700 directory, 0600 files, no symlink followed, foreign owner refused.
#[test]
fn state_dir_and_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = LedgerFile::new(&state).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    let body = vfio_gpu_engine::ledger::LedgerBody {
        boot_id: "b".into(),
        ..Default::default()
    };
    file.store(&body).unwrap();
    assert_eq!(mode(&state.join("ledger.json")), 0o600);
    // A symlink planted at the temp file is not followed.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    std::os::unix::fs::symlink(&victim, state.join(".ledger.json.tmp")).unwrap();
    assert!(file.store(&body).is_err());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    // A directory owned by someone else is refused.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let me = std::fs::metadata(dir.path()).unwrap().uid();
    let other = if me == 0 { 4242 } else { 0 };
    if std::os::unix::fs::chown(&foreign, Some(other), None).is_ok() {
        let err = LedgerFile::new(&foreign).unwrap_err();
        assert!(err.to_string().contains("owned by uid"), "{err}");
    }
    let _ = encode(&body);
}

/// m1: without a boot id nothing is recorded, so nothing is moved.
#[test]
fn no_boot_id_refuses_to_record_or_move() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    std::fs::remove_file(host.join("proc/sys/kernel/random/boot_id")).unwrap();
    let k = sim(&host);
    let state = dir.path().join("state");
    match vfio_gpu_engine::Engine::open(
        std::sync::Arc::new(k.clone()),
        &state,
        vfio_gpu_host::GpuSelector::default(),
        vfio_gpu_intent::Policy::default(),
        config(),
    ) {
        Err(e) => assert!(e.to_string().contains("boot id"), "{e}"),
        Ok((e, _)) => {
            let err = e.configure(bdf(B), claim()).unwrap_err();
            assert!(
                matches!(&err, EngineError::Ledger(LedgerError::NoBootId { .. })),
                "{err}"
            );
        }
    }
    assert!(k.log().is_empty(), "{:?}", k.log());
    assert_eq!(driver_of(&host, B).as_deref(), Some("nvidia"));
}
