//! Fuzz target `proc_text`: see `vfio_gpu_fuzz_checks::proc_text` for the input format and
//! the properties checked. How to run: fuzz/README.md.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vfio_gpu_fuzz_checks::proc_text::check(data);
});
