//! `cargo fuzz run snapshot_restore`: `tessera_fuzz::snapshot_restore` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::snapshot_restore(data));
