//! Fuzz target `slice_diff`: see `vfio_gpu_fuzz_checks::slice_diff` for the input format and
//! the properties checked. How to run: fuzz/README.md.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vfio_gpu_fuzz_checks::slice_diff::check(data);
});
