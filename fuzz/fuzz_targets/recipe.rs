//! cargo fuzz target: see `beitv2::fuzz::recipe`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| beitv2::fuzz::recipe(data));
