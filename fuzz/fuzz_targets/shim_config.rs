#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz_bodies::config::shim_config(data));
