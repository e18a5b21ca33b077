//! `cargo fuzz run cloud_metadata`: `tessera_fuzz::cloud_metadata` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::cloud_metadata(data));
