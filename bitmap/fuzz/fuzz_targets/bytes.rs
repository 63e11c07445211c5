//! Arbitrary bytes into the deserializer: an error or an exact round trip, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sai_bitmap::format::fuzz_bytes(data));
