//! Recovery decisions over a segment's bytes: where the valid records are, where they stop, and
//! whether what follows is a torn (never acknowledged) tail or damage to acknowledged records.
//!
//! Pure: it reads a byte slice and returns a verdict. `log.rs` applies the verdict to files;
//! the fuzz target drives these functions with arbitrary bytes.

use crate::format::{decode_record, RecordFault, SegmentHeader, RECORD_ALIGN, RECORD_HEADER_SIZE};
use crate::format::{HeaderFault, SEGMENT_HEADER_SIZE};

/// Why the scan of a segment stopped before the end of its space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An all-zero header: the clean end of what was written.
    Zeroed,
    Truncated,
    ChecksumMismatch,
    /// A valid record, but not the index that must come next.
    WrongIndex {
        found: u64,
        expected: u64,
    },
    /// A valid record whose `prev_crc` does not match the record before it.
    BrokenChain,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Zeroed => write!(f, "zeroed record header"),
            StopReason::Truncated => write!(f, "record extends past the end of the segment"),
            StopReason::ChecksumMismatch => write!(f, "checksum mismatch"),
            StopReason::WrongIndex { found, expected } => {
                write!(f, "record has index {found}, expected {expected}")
            }
            StopReason::BrokenChain => write!(f, "record does not chain to the one before it"),
        }
    }
}

/// The valid prefix of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    /// Byte offset of each valid record, in index order starting at `header.first_index`.
    pub offsets: Vec<u32>,
    /// Checksum of the last valid record (the header's `prev_crc` when there is none).
    pub last_crc: u32,
    /// Offset just past the last valid record: where the next record would go.
    pub end_offset: usize,
    /// Why the scan stopped; `None` when it reached the end of the segment's space.
    pub stop: Option<StopReason>,
}

impl SegmentScan {
    /// Index the next record after the valid prefix would have.
    pub fn next_index(&self) -> u64 {
        self.header.first_index + self.offsets.len() as u64
    }
}

/// Reads the header and the longest valid, chained run of records of a segment.
pub fn scan_segment(bytes: &[u8]) -> Result<SegmentScan, HeaderFault> {
    let header = SegmentHeader::decode(bytes)?;
    // The header says how big the segment is; never read past it or past the file.
    let limit = usize::try_from(header.segment_size_bytes).unwrap_or(usize::MAX).min(bytes.len());
    let bytes = &bytes[..limit];
    let mut scan = SegmentScan {
        header,
        offsets: Vec::new(),
        last_crc: header.prev_crc,
        end_offset: SEGMENT_HEADER_SIZE,
        stop: None,
    };
    // Bounded: each iteration advances by at least one record (≥ RECORD_HEADER_SIZE bytes).
    while scan.end_offset < bytes.len() {
        let offset = scan.end_offset;
        let remaining = &bytes[offset..];
        if remaining.len() < RECORD_HEADER_SIZE {
            break; // no record can start here, whatever the bytes (a recycled segment's old data)
        }
        let expected = scan.next_index();
        match decode_record(bytes, offset) {
            Err(fault) => {
                scan.stop = Some(match fault {
                    RecordFault::Zeroed => StopReason::Zeroed,
                    RecordFault::Truncated => StopReason::Truncated,
                    RecordFault::ChecksumMismatch => StopReason::ChecksumMismatch,
                });
                break;
            }
            // The writer always writes the padding too: a record cut inside it is truncated.
            Ok((record, _)) if offset + record.size() > bytes.len() => {
                scan.stop = Some(StopReason::Truncated);
                break;
            }
            Ok((record, _)) if record.index != expected => {
                scan.stop = Some(StopReason::WrongIndex { found: record.index, expected });
                break;
            }
            Ok((record, _)) if record.prev_crc != scan.last_crc => {
                scan.stop = Some(StopReason::BrokenChain);
                break;
            }
            Ok((record, _)) => {
                let offset_u32 = u32::try_from(offset).expect("segments are at most 4 GiB");
                scan.offsets.push(offset_u32);
                scan.last_crc = record.crc;
                scan.end_offset = offset + record.size();
            }
        }
    }
    Ok(scan)
}

/// What recovery must do with the bytes after a segment's valid prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TailVerdict {
    /// Nothing but zeros follows: the segment ends cleanly.
    Clean,
    /// Unacknowledged leftovers of the last batch: zero `[cut_offset, dirty_end)` and go on.
    Torn { cut_offset: usize, dirty_end: usize },
    /// Acknowledged records were damaged: refuse, naming the offset of the first bad record.
    Corrupt { offset: usize, reason: StopReason },
}

/// Judges the tail of the newest segment.
///
/// A batch is written and then synced, and the next batch is written only after that sync
/// returned, so a record of a later batch found past the damage proves the damaged record was
/// acknowledged: that is corruption. Valid records of the damaged record's own batch (a torn
/// write can land later sectors before earlier ones) make a torn tail. Records with lower
/// indexes are old data of a recycled segment and are ignored; so is unparseable garbage past
/// a clean end (each commit writes a zeroed header after its last record, so a clean end is
/// always marked).
pub fn judge_tail(bytes: &[u8], scan: &SegmentScan) -> TailVerdict {
    let limit = usize::try_from(scan.header.segment_size_bytes).unwrap_or(usize::MAX).min(bytes.len());
    let bytes = &bytes[..limit];
    let cut = scan.end_offset;
    let first_lost = scan.next_index();
    let mut torn_end = None;
    for later in later_records(bytes, cut, first_lost) {
        if later.batch_first_index > first_lost {
            let reason = scan.stop.unwrap_or(StopReason::Truncated);
            return TailVerdict::Corrupt { offset: cut, reason };
        }
        torn_end = Some(later.end);
    }
    match (scan.stop, torn_end) {
        (None | Some(StopReason::Zeroed), None) => TailVerdict::Clean,
        // Zero the torn batch's own records, or at least the header at the cut, which then
        // marks the clean end.
        (_, end) => {
            let dirty_end = end.unwrap_or(0).max(cut + RECORD_HEADER_SIZE).min(bytes.len());
            TailVerdict::Torn { cut_offset: cut, dirty_end }
        }
    }
}

/// Judges the end of a segment that is not the newest: it was synced before the next segment
/// was created, so anything but a clean end is damage to acknowledged records.
pub fn judge_sealed(bytes: &[u8], scan: &SegmentScan) -> Option<(usize, StopReason)> {
    match scan.stop {
        None => None,
        Some(StopReason::Zeroed) => {
            let limit = usize::try_from(scan.header.segment_size_bytes).unwrap_or(usize::MAX);
            let bytes = &bytes[..limit.min(bytes.len())];
            let mut later = later_records(bytes, scan.end_offset, scan.next_index());
            later.next().map(|_| (scan.end_offset, StopReason::Zeroed))
        }
        Some(reason) => Some((scan.end_offset, reason)),
    }
}

/// A record found, valid on its own, past the end of a segment's valid prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaterRecord {
    pub offset: usize,
    /// Offset just past the record (padding included).
    pub end: usize,
    pub index: u64,
    pub batch_first_index: u64,
}

/// Iterates over records that are valid on their own (checksum) at aligned offsets after
/// `from`, with an index of at least `min_index`. Bounded by the slice length.
pub fn later_records(bytes: &[u8], from: usize, min_index: u64) -> impl Iterator<Item = LaterRecord> + '_ {
    let mut offset = from + RECORD_ALIGN;
    std::iter::from_fn(move || {
        while offset + RECORD_HEADER_SIZE <= bytes.len() {
            let at = offset;
            offset += RECORD_ALIGN;
            if let Ok((record, _)) = decode_record(bytes, at) {
                if record.index >= min_index {
                    offset = at + record.size();
                    let batch_first_index = record.batch_first_index();
                    return Some(LaterRecord { offset: at, end: offset, index: record.index, batch_first_index });
                }
            }
        }
        None
    })
}

/// Runs the reader over arbitrary bytes and checks what it claims (the fuzz target's body, also
/// run by the unit tests): no panic, every record it accepts decodes, is chained and in bounds,
/// and the verdicts point inside the segment.
#[doc(hidden)]
pub fn check_arbitrary_segment(bytes: &[u8]) {
    let Ok(scan) = scan_segment(bytes) else { return };
    let mut prev_crc = scan.header.prev_crc;
    for (position, &offset) in scan.offsets.iter().enumerate() {
        let (record, body) = decode_record(bytes, offset as usize).expect("accepted records decode");
        assert_eq!(record.index, scan.header.first_index + position as u64, "accepted records are consecutive");
        assert_eq!(record.prev_crc, prev_crc, "accepted records are chained");
        assert!(offset as usize + RECORD_HEADER_SIZE + body.len() <= scan.end_offset, "records lie before the end");
        prev_crc = record.crc;
    }
    assert_eq!(prev_crc, scan.last_crc);
    assert!(scan.end_offset <= bytes.len().max(SEGMENT_HEADER_SIZE), "the valid prefix lies inside the bytes");
    match judge_tail(bytes, &scan) {
        TailVerdict::Clean => {}
        TailVerdict::Torn { cut_offset, dirty_end } => {
            assert!(cut_offset == scan.end_offset && cut_offset < dirty_end && dirty_end <= bytes.len())
        }
        TailVerdict::Corrupt { offset, .. } => assert_eq!(offset, scan.end_offset),
    }
    if let Some((offset, _)) = judge_sealed(bytes, &scan) {
        assert_eq!(offset, scan.end_offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{encode_record_into, RecordHeader};

    /// A segment image of `size` bytes holding batches of records (each inner Vec is a batch).
    fn segment_image(first_index: u64, batches: &[usize], size: usize) -> (Vec<u8>, Vec<usize>) {
        let header = SegmentHeader { first_index, prev_crc: 0, segment_size_bytes: size as u64 };
        let mut bytes = header.encode().to_vec();
        let mut offsets = Vec::new();
        let (mut index, mut prev_crc) = (first_index, 0);
        for &count in batches {
            let batch_first = index;
            for _ in 0..count {
                let body = index.to_le_bytes().repeat(3);
                let record = RecordHeader::new(index, 1, prev_crc, (index - batch_first) as u32, &body);
                offsets.push(bytes.len());
                encode_record_into(&mut bytes, &record, &body);
                prev_crc = record.crc;
                index += 1;
            }
        }
        bytes.resize(size, 0);
        (bytes, offsets)
    }

    #[test]
    fn clean_segment_scans_fully() {
        let (bytes, offsets) = segment_image(10, &[3, 2], 4096);
        let scan = scan_segment(&bytes).expect("header is valid");
        assert_eq!(scan.offsets.len(), 5);
        assert_eq!(scan.next_index(), 15);
        assert_eq!(scan.offsets[4] as usize, offsets[4]);
        assert_eq!(scan.stop, Some(StopReason::Zeroed));
        assert_eq!(judge_tail(&bytes, &scan), TailVerdict::Clean);
        assert_eq!(judge_sealed(&bytes, &scan), None);
    }

    #[test]
    fn damage_in_the_last_batch_is_a_torn_tail() {
        let (mut bytes, offsets) = segment_image(1, &[2, 3], 4096);
        // The first record of the last batch is garbage; its batch-mates after it are valid.
        bytes[offsets[2] + 40] ^= 0xff;
        let scan = scan_segment(&bytes).expect("header is valid");
        assert_eq!(scan.offsets.len(), 2);
        assert_eq!(scan.stop, Some(StopReason::ChecksumMismatch));
        let verdict = judge_tail(&bytes, &scan);
        let TailVerdict::Torn { cut_offset, dirty_end } = verdict else { panic!("{verdict:?}") };
        assert_eq!(cut_offset, offsets[2]);
        assert!(dirty_end > offsets[4], "the whole torn batch is marked for zeroing");
    }

    #[test]
    fn damage_before_a_later_batch_is_corruption() {
        let (mut bytes, offsets) = segment_image(1, &[2, 3], 4096);
        // A record of the first batch is damaged, and the second batch was written after it:
        // the first batch had been synced and acknowledged.
        bytes[offsets[1] + 40] ^= 0xff;
        let scan = scan_segment(&bytes).expect("header is valid");
        let verdict = judge_tail(&bytes, &scan);
        assert_eq!(verdict, TailVerdict::Corrupt { offset: offsets[1], reason: StopReason::ChecksumMismatch });
        assert!(judge_sealed(&bytes, &scan).is_some());
    }

    #[test]
    fn a_zeroed_page_before_later_batches_is_corruption_not_a_clean_end() {
        let (mut bytes, offsets) = segment_image(1, &[1, 1, 1], 4096);
        bytes[offsets[1]..offsets[2]].fill(0);
        let scan = scan_segment(&bytes).expect("header is valid");
        assert_eq!(scan.stop, Some(StopReason::Zeroed));
        assert!(matches!(judge_tail(&bytes, &scan), TailVerdict::Corrupt { .. }));
        assert_eq!(judge_sealed(&bytes, &scan), Some((offsets[1], StopReason::Zeroed)));
    }

    proptest::proptest! {
        /// What the fuzz target does, on random damage to real segment images.
        #[test]
        fn reader_never_panics_and_accepts_only_chained_records(
            batches in proptest::collection::vec(1usize..6, 1..6),
            flips in proptest::collection::vec((0usize..4096, 0u8..8), 0..4),
            cut in 0usize..4096,
        ) {
            let (mut bytes, _) = segment_image(3, &batches, 4096);
            for (at, bit) in flips {
                bytes[at] ^= 1 << bit;
            }
            check_arbitrary_segment(&bytes);
            check_arbitrary_segment(&bytes[..cut]);
        }
    }

    #[test]
    fn a_record_moved_out_of_place_breaks_the_chain() {
        let (mut bytes, offsets) = segment_image(1, &[4], 4096);
        // Swap records 2 and 3 (same size): each is valid alone, but the order is wrong.
        let (a, b, c) = (offsets[1], offsets[2], offsets[3]);
        let second = bytes[a..b].to_vec();
        bytes.copy_within(b..c, a);
        bytes[b..c].copy_from_slice(&second);
        let scan = scan_segment(&bytes).expect("header is valid");
        assert_eq!(scan.offsets.len(), 1);
        assert_eq!(scan.stop, Some(StopReason::WrongIndex { found: 3, expected: 2 }));
    }
}
