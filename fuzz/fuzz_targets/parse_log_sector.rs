//! `LogSector::parse` on arbitrary bytes: never panics; what parses re-encodes identically.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bow::restore::fuzzing::parse_log_sector(data);
});
