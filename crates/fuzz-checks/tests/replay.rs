//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/`) and every
//! regression input (`fuzz/regressions/<target>/`) through its target's
//! property, so CI checks them with `cargo test` and no fuzzing toolchain.

use std::fs;
use std::path::{Path, PathBuf};

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    v
}

fn replay(target: &str, check: fn(&[u8])) {
    let corpus = inputs("corpus", target);
    assert!(!corpus.is_empty(), "no committed corpus for {target}");
    for path in corpus.iter().chain(&inputs("regressions", target)) {
        let data = fs::read(path).expect("corpus file");
        // Name the input when its property fails.
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{target}: {} fails its property", path.display());
    }
}

#[test]
fn authority_corpus() {
    replay("authority", vfio_gpu_fuzz_checks::authority::check);
}

#[test]
fn config_corpus() {
    replay("config", vfio_gpu_fuzz_checks::config::check);
}

#[test]
fn ledger_corpus() {
    replay("ledger", vfio_gpu_fuzz_checks::ledger::check);
}

#[test]
fn sysfs_corpus() {
    replay("sysfs", vfio_gpu_fuzz_checks::sysfs::check);
}

#[test]
fn parse_intent_corpus() {
    replay("parse_intent", vfio_gpu_fuzz_checks::intent::check);
}

#[test]
fn lock_file_corpus() {
    replay("lock_file", vfio_gpu_fuzz_checks::lock_file::check);
}

#[test]
fn claim_paths_corpus() {
    replay("claim_paths", vfio_gpu_fuzz_checks::claim_paths::check);
}

#[test]
fn doctor_readers_corpus() {
    replay("doctor_readers", vfio_gpu_fuzz_checks::doctor::check);
}

#[test]
fn proc_text_corpus() {
    replay("proc_text", vfio_gpu_fuzz_checks::proc_text::check);
}

#[test]
fn slice_diff_corpus() {
    replay("slice_diff", vfio_gpu_fuzz_checks::slice_diff::check);
}

#[test]
fn dra_service_corpus() {
    replay("dra_service", vfio_gpu_fuzz_checks::dra_service::check);
}

/// Every target above: a new fuzz target must be added here (and get a test).
const REPLAYED: &[&str] = &[
    "authority",
    "config",
    "ledger",
    "sysfs",
    "parse_intent",
    "lock_file",
    "claim_paths",
    "doctor_readers",
    "proc_text",
    "slice_diff",
    "dra_service",
];

/// CI builds every `[[bin]]` of fuzz/Cargo.toml; each must have its corpus
/// replayed here, or a target could exist whose findings `cargo test` never sees.
#[test]
fn every_fuzz_target_has_a_replayed_corpus() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/Cargo.toml");
    let text = fs::read_to_string(&manifest).expect("fuzz/Cargo.toml");
    let bins: Vec<&str> = text
        .split("[[bin]]")
        .skip(1)
        .filter_map(|b| {
            b.lines()
                .find_map(|l| l.trim().strip_prefix("name = "))
                .map(|n| n.trim_matches('"'))
        })
        .collect();
    assert!(bins.len() >= REPLAYED.len(), "fuzz targets: {bins:?}");
    for b in &bins {
        assert!(REPLAYED.contains(b), "fuzz target {b} has no replay test");
        assert!(
            !inputs("corpus", b).is_empty(),
            "fuzz target {b} has no corpus"
        );
    }
}
