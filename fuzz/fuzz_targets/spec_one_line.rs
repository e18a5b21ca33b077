//! `cargo fuzz run spec_one_line`: `tessera_fuzz::spec_one_line` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::spec_one_line(data));
