//! `cargo fuzz run grpc_requests`: `tessera_fuzz::grpc_requests` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera_fuzz::grpc_requests(data));
