#![no_main]
//! See `husk_fuzz::guest_replies`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_fuzz::guest_replies(data));
