//! `cargo fuzz run peer_identity`: `tessera_fuzz::peer_identity` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::peer_identity(data));
