//! Fuzz target `claim_paths`: see `vfio_gpu_fuzz_checks::claim_paths` for the input format and
//! the properties checked. How to run: fuzz/README.md.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vfio_gpu_fuzz_checks::claim_paths::check(data);
});
