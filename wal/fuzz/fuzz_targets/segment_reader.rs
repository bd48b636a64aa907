//! Fuzz target: arbitrary bytes as a segment file must never panic the reader, and whatever it
//! accepts must be valid, chained and in bounds (`recovery::check_arbitrary_segment`).
//!
//! The first input byte picks the mode: odd → the bytes are the segment as they are; even → a
//! valid segment is built from the next bytes (record count and sizes) and the rest of the
//! input is applied as byte flips, so damage lands past the header checksum and deep in records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sundial_wal::format::{encode_record_into, RecordHeader, SegmentHeader};
use sundial_wal::recovery::check_arbitrary_segment;

const SEGMENT_SIZE: usize = 8192;

fn damaged_valid_segment(data: &[u8]) -> Vec<u8> {
    let (recipe, flips) = data.split_at(data.len().min(16));
    let header = SegmentHeader { first_index: 1, prev_crc: 0, segment_size_bytes: SEGMENT_SIZE as u64 };
    let mut bytes = header.encode().to_vec();
    let (mut prev_crc, mut batch_first) = (0u32, 1u64);
    for (position, &size) in recipe.iter().enumerate() {
        let index = position as u64 + 1;
        if size % 3 == 0 {
            batch_first = index; // a new batch starts here
        }
        let body = vec![size; size as usize * 4];
        let record = RecordHeader::new(index, size as u64, prev_crc, (index - batch_first) as u32, &body);
        encode_record_into(&mut bytes, &record, &body);
        prev_crc = record.crc;
    }
    bytes.resize(SEGMENT_SIZE, 0);
    for pair in flips.chunks_exact(3) {
        let at = u16::from_le_bytes([pair[0], pair[1]]) as usize % SEGMENT_SIZE;
        bytes[at] ^= pair[2];
    }
    bytes
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => check_arbitrary_segment(&damaged_valid_segment(rest)),
        Some((_, rest)) => check_arbitrary_segment(rest),
        None => {}
    }
});
