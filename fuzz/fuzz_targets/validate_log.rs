//! A device image built from the input: validation, the inspection walk and dry-run restores
//! never panic and never write (the device panics on any write); a log that fails validation
//! is not written by a `Refuse` restore either.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bow::restore::fuzzing::validate_log(data);
});
