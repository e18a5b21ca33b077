//! `cargo fuzz run spec_toml`: `tessera_fuzz::spec_toml` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::spec_toml(data));
