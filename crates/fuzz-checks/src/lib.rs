//! The property each fuzz target checks, one function per target taking the
//! raw fuzzer input. `fuzz/` wraps each in `fuzz_target!`; `tests/replay.rs`
//! runs them over the committed corpora (`fuzz/corpus/<target>/`), so CI
//! replays every corpus with `cargo test` and a crash found by fuzzing stays
//! a failing test until fixed.
//!
//! Each check panics (an assertion) when a property fails, not only when
//! the code under test panics.

#![warn(missing_docs)]

pub mod authority;
pub mod claim_paths;
pub mod config;
pub mod doctor;
pub mod dra_service;
mod input;
pub mod intent;
pub mod ledger;
pub mod lock_file;
pub mod proc_text;
pub mod scratch;
pub mod slice_diff;
pub mod sysfs;
