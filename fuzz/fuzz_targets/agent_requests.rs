#![no_main]
//! See `husk_fuzz::agent_requests`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_fuzz::agent_requests(data));
