//! `cargo fuzz run command_decode`: `tessera_fuzz::command_decode` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::command_decode(data));
