//! `cargo fuzz run progress_line`: `tessera_fuzz::progress_line` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::progress_line(data));
