//! Fuzz target: arbitrary bytes as a segment file must never panic the reader, and whatever it
//! accepts must be valid, chained and in bounds (`recovery::check_arbitrary_segment`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sundial_wal::recovery::check_arbitrary_segment(data);
});
