//! Helpers shared by the wal integration tests: building logs of known records and poking
//! at their files.

#![allow(dead_code)] // each test file uses a different subset

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use sundial_wal::{SyncChoice, Wal, WalOptions};

/// Body length used by `write_batches`: with its 32-byte header a record takes 144 bytes.
pub const BODY_LEN: usize = 100;
pub const RECORD_BYTES: u64 = 144;
pub const SEGMENT_HEADER_BYTES: u64 = 64;

pub fn options(segment_size_bytes: u64) -> WalOptions {
    WalOptions { segment_size_bytes, sync: SyncChoice::Auto }
}

/// The body stored at `index` by `write_batches`.
pub fn body(index: u64) -> Vec<u8> {
    (0..BODY_LEN).map(|i| (index as usize * 13 + i) as u8).collect()
}

/// Writes batches of `BODY_LEN`-byte records (one commit per batch) and closes the log.
pub fn write_batches(dir: &Path, segment_size_bytes: u64, batches: &[u64]) {
    let (mut wal, _) = Wal::open(dir, options(segment_size_bytes)).expect("open");
    for &count in batches {
        for _ in 0..count {
            let index = wal.last_index() + wal.staged_count() + 1;
            wal.append(index, &body(index)).expect("append");
        }
        wal.commit().expect("commit");
    }
}

/// Asserts the log holds exactly `first..=last` with the bodies `write_batches` wrote.
pub fn assert_records(wal: &Wal, first: u64, last: u64) {
    assert_eq!((wal.first_index(), wal.last_index()), (first, last));
    for index in first..=last {
        let entry = wal.get(index).unwrap_or_else(|| panic!("index {index} missing"));
        assert_eq!((entry.index, entry.tag), (index, index));
        assert_eq!(entry.body, &body(index)[..], "body of index {index}");
    }
    assert!(wal.get(last + 1).is_none());
}

/// Path of the segment that starts at `first_index`.
pub fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{first_index:020}.wal"))
}

/// Offset of a record in a segment of `write_batches` records that starts at `segment_first`.
pub fn record_offset(segment_first: u64, index: u64) -> u64 {
    SEGMENT_HEADER_BYTES + (index - segment_first) * RECORD_BYTES
}

pub fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new().read(true).write(true).open(path).expect("open segment");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).expect("read byte");
    byte[0] ^= 0x20;
    file.write_all_at(&byte, offset).expect("write byte");
}

pub fn zero_range(path: &Path, offset: u64, len: usize) {
    let file = OpenOptions::new().write(true).open(path).expect("open segment");
    file.write_all_at(&vec![0u8; len], offset).expect("zero");
}
