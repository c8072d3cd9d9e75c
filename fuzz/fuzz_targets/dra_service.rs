//! Fuzz target `dra_service`: see `vfio_gpu_fuzz_checks::dra_service` for the input format and
//! the properties checked. How to run: fuzz/README.md.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vfio_gpu_fuzz_checks::dra_service::check(data);
});
