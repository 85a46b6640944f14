//! cargo fuzz target: see `beitv2::fuzz::pickle`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| beitv2::fuzz::pickle(data));
