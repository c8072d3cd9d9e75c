//! Fuzz target `doctor_readers`: see `vfio_gpu_fuzz_checks::doctor` for the input format and
//! the properties checked. How to run: fuzz/README.md.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vfio_gpu_fuzz_checks::doctor::check(data);
});
