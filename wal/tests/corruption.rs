//! Damage on disk: the torn tail of the newest segment is cut and the log goes on; damage to
//! acknowledged records, or files gone missing, is refused with an error naming file and offset.

mod common;

use common::*;
use std::fs;
use sundial_wal::{Wal, WalError};

const ONE_SEGMENT: u64 = 1 << 20;
/// 8 KiB segments hold 56 records of 144 bytes, so 150 records span three segments.
const SMALL_SEGMENT: u64 = 8192;

fn open_err(dir: &std::path::Path, segment_size_bytes: u64) -> WalError {
    match Wal::open(dir, options(segment_size_bytes)) {
        Ok((wal, _)) => panic!("damaged log opened with records up to {}", wal.last_index()),
        Err(error) => error,
    }
}

fn assert_corrupt_at(error: &WalError, file: &std::path::Path, offset: u64) {
    match error {
        WalError::Corrupt { path, offset: found, .. } => {
            assert_eq!(path, file, "{error}");
            assert_eq!(*found, offset, "{error}");
            let message = error.to_string();
            let name = file.file_name().expect("file name").to_string_lossy().into_owned();
            assert!(message.contains(&name) && message.contains(&format!("offset {offset}")), "{message}");
        }
        other => panic!("expected a corruption error, got {other}"),
    }
}

#[test]
fn flipped_bit_in_the_last_batch_is_cut_and_the_log_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), ONE_SEGMENT, &[5, 5]);
    flip_byte(&segment_path(dir.path(), 1), record_offset(1, 8) + 40);
    let (mut wal, report) = Wal::open(dir.path(), options(ONE_SEGMENT)).expect("torn tail is repaired");
    assert!(report.torn_tail_bytes > 0);
    assert_records(&wal, 1, 7);
    wal.append(8, &body(8)).expect("append after repair");
    wal.commit().expect("commit after repair");
    drop(wal);
    let (wal, report) = Wal::open(dir.path(), options(ONE_SEGMENT)).expect("reopen");
    assert_eq!(report.torn_tail_bytes, 0, "the repair was durable");
    assert_records(&wal, 1, 8);
}

#[test]
fn flipped_bit_before_a_later_batch_is_refused_naming_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), ONE_SEGMENT, &[5, 5]);
    let segment = segment_path(dir.path(), 1);
    flip_byte(&segment, record_offset(1, 3) + 50);
    let error = open_err(dir.path(), ONE_SEGMENT);
    assert_corrupt_at(&error, &segment, record_offset(1, 3));
    assert!(error.to_string().contains("checksum mismatch"), "{error}");
}

#[test]
fn zeroed_page_at_the_tail_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 30 records end at 64 + 30 * 144 = 4384; the last batch (records 27..30) starts at 3808.
    write_batches(dir.path(), ONE_SEGMENT, &[26, 4]);
    zero_range(&segment_path(dir.path(), 1), 4096, 4096);
    let (wal, _) = Wal::open(dir.path(), options(ONE_SEGMENT)).expect("torn tail is repaired");
    // Record 28 (offset 3952..4096) is intact, 29 straddles the zeroed page.
    assert_records(&wal, 1, 28);
}

#[test]
fn zeroed_page_in_the_middle_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), ONE_SEGMENT, &[20, 20, 20]);
    let segment = segment_path(dir.path(), 1);
    zero_range(&segment, 4096, 4096);
    let error = open_err(dir.path(), ONE_SEGMENT);
    // Record 29 starts at 64 + 28 * 144 = 4096, the first byte of the zeroed page.
    assert_corrupt_at(&error, &segment, record_offset(1, 29));
}

#[test]
fn truncated_newest_segment_is_repaired_and_grows_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), ONE_SEGMENT, &[10, 10]);
    let segment = segment_path(dir.path(), 1);
    fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .and_then(|f| f.set_len(record_offset(1, 15) + 70))
        .expect("truncate file");
    let (mut wal, _) = Wal::open(dir.path(), options(ONE_SEGMENT)).expect("torn tail is repaired");
    assert_records(&wal, 1, 14);
    assert_eq!(fs::metadata(&segment).expect("stat").len(), ONE_SEGMENT, "preallocated again");
    for index in 15..=40 {
        wal.append(index, &body(index)).expect("append");
    }
    wal.commit().expect("commit");
    drop(wal);
    let (wal, _) = Wal::open(dir.path(), options(ONE_SEGMENT)).expect("reopen");
    assert_records(&wal, 1, 40);
}

#[test]
fn truncated_older_segment_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), SMALL_SEGMENT, &[50, 50, 50]);
    let first = segment_path(dir.path(), 1);
    fs::OpenOptions::new().write(true).open(&first).and_then(|f| f.set_len(2000)).expect("truncate file");
    let error = open_err(dir.path(), SMALL_SEGMENT);
    // Record 14 is the first cut short by the truncation to 2000 bytes.
    assert_corrupt_at(&error, &first, record_offset(1, 14));
}

#[test]
fn missing_middle_segment_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), SMALL_SEGMENT, &[50, 50, 50]);
    fs::remove_file(segment_path(dir.path(), 57)).expect("remove middle segment");
    let error = open_err(dir.path(), SMALL_SEGMENT);
    assert!(error.to_string().contains("does not continue the previous segment"), "{error}");
}

#[test]
fn missing_newest_segment_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), SMALL_SEGMENT, &[50, 50, 50]);
    fs::remove_file(segment_path(dir.path(), 113)).expect("remove newest segment");
    let error = open_err(dir.path(), SMALL_SEGMENT);
    assert!(matches!(error, WalError::Inconsistent { .. }), "{error}");
    assert!(error.to_string().contains("newest segment should start at index 113"), "{error}");
}

#[test]
fn missing_oldest_segment_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), SMALL_SEGMENT, &[50, 50, 50]);
    fs::remove_file(segment_path(dir.path(), 1)).expect("remove oldest segment");
    let error = open_err(dir.path(), SMALL_SEGMENT);
    assert!(error.to_string().contains("log should start at index 1"), "{error}");
}

#[test]
fn damaged_segment_header_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), ONE_SEGMENT, &[3]);
    let segment = segment_path(dir.path(), 1);
    flip_byte(&segment, 17);
    let error = open_err(dir.path(), ONE_SEGMENT);
    assert_corrupt_at(&error, &segment, 0);
    assert!(error.to_string().contains("segment header checksum mismatch"), "{error}");
}

#[test]
fn damage_in_a_sealed_segment_is_refused_even_at_its_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), SMALL_SEGMENT, &[56, 10]);
    let first = segment_path(dir.path(), 1);
    flip_byte(&first, record_offset(1, 56) + 40);
    let error = open_err(dir.path(), SMALL_SEGMENT);
    assert_corrupt_at(&error, &first, record_offset(1, 56));
}

#[test]
fn one_damaged_metadata_copy_is_tolerated() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), SMALL_SEGMENT, &[100]);
    fs::write(dir.path().join("meta.1"), b"not metadata").expect("damage meta.1");
    let (wal, _) = Wal::open(dir.path(), options(SMALL_SEGMENT)).expect("meta.0 is intact");
    assert_records(&wal, 1, 100);
}

#[test]
fn random_damage_never_yields_wrong_data() {
    // Whatever byte is flipped, the log either refuses to open or returns only the records
    // that were written, unchanged.
    for seed in 0..200u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        write_batches(dir.path(), SMALL_SEGMENT, &[30, 30, 30]);
        let segment = segment_path(dir.path(), if seed % 2 == 0 { 1 } else { 57 });
        let offset = (seed * 7919) % (SEGMENT_HEADER_BYTES + 56 * RECORD_BYTES);
        flip_byte(&segment, offset);
        if let Ok((wal, _)) = Wal::open(dir.path(), options(SMALL_SEGMENT)) {
            for entry in wal.iter_from(1) {
                assert_eq!(entry.body, &body(entry.index)[..], "seed {seed}: wrong data returned");
            }
        }
    }
}
