#![no_main]
//! See `husk_fuzz::mmio_registers`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_fuzz::mmio_registers(data));
