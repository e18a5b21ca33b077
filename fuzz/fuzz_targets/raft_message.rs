//! `cargo fuzz run raft_message`: `tessera_fuzz::raft_message` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::raft_message(data));
