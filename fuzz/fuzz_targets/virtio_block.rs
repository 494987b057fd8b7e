#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_fuzz_bodies::virtio::block(data));
