#![no_main]
//! See `husk_fuzz::vsock_device`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_fuzz::vsock_device(data));
