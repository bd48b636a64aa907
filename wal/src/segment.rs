//! One segment file: created preallocated and atomically, mapped read-only for zero-copy reads,
//! written only through explicit positioned writes (never through the mapping).

use crate::atomic::fsync_dir;
use crate::error::{Result, WalError};
use crate::format::{SegmentHeader, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE};
use memmap2::Mmap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

/// Segment files are named by the first index they hold, zero-padded so names sort by index.
pub(crate) fn segment_file_name(first_index: u64) -> String {
    format!("{first_index:020}.wal")
}

/// A retired segment kept for reuse is named by the first index it held.
pub(crate) fn free_file_name(old_first_index: u64) -> String {
    format!("free-{old_first_index:020}.wal")
}

/// Parses a free (retired) segment's file name; `None` for any other file.
pub(crate) fn parse_free_file_name(name: &str) -> Option<u64> {
    parse_segment_file_name(name.strip_prefix("free-")?)
}

/// Parses a segment file name back to its first index; `None` for any other file.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) map: Mmap,
    pub(crate) first_index: u64,
    /// Offset of each durable record, in index order from `first_index`.
    pub(crate) offsets: Vec<u32>,
    /// Where the next record goes.
    pub(crate) write_offset: usize,
}

impl Segment {
    /// Creates a preallocated segment atomically: a temp file is sized, given its header and
    /// synced, then renamed into place, so a crash never leaves a half-made segment.
    pub(crate) fn create(dir: &Path, first_index: u64, prev_crc: u32, size_bytes: u64) -> Result<Segment> {
        let path = dir.join(segment_file_name(first_index));
        let tmp = dir.join(format!("{}.tmp", segment_file_name(first_index)));
        let made = Self::prepare_file(&tmp, first_index, prev_crc, size_bytes);
        let file = match made {
            Ok(file) => file,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fs::rename(&tmp, &path).map_err(|e| WalError::io("rename", &path, e))?;
        fsync_dir(dir)?;
        let map = map_file(&file, &path)?;
        Ok(Segment { path, file, map, first_index, offsets: Vec::new(), write_offset: SEGMENT_HEADER_SIZE })
    }

    /// Reuses a retired segment file: a new header and a zeroed first record header (so the
    /// old records behind it are past a clean end), synced, then renamed into place. Its old
    /// records all have indexes below `first_index`, which recovery relies on to ignore them.
    /// Writing into already-written blocks needs no allocation, so later fdatasyncs flush no
    /// file-system metadata: the reason segments are recycled.
    pub(crate) fn recycle(
        dir: &Path,
        free: &Path,
        first_index: u64,
        prev_crc: u32,
        size_bytes: u64,
    ) -> Result<Segment> {
        let path = dir.join(segment_file_name(first_index));
        let file = OpenOptions::new().read(true).write(true).open(free).map_err(|e| WalError::io("open", free, e))?;
        let header = SegmentHeader { first_index, prev_crc, segment_size_bytes: size_bytes };
        let mut head = header.encode().to_vec();
        head.extend_from_slice(&[0u8; RECORD_HEADER_SIZE]);
        use std::os::unix::fs::FileExt;
        file.write_all_at(&head, 0).map_err(|e| WalError::io("write header", free, e))?;
        file.sync_data().map_err(|e| WalError::io("fdatasync", free, e))?;
        fs::rename(free, &path).map_err(|e| WalError::io("rename", &path, e))?;
        fsync_dir(dir)?;
        let map = map_file(&file, &path)?;
        Ok(Segment { path, file, map, first_index, offsets: Vec::new(), write_offset: SEGMENT_HEADER_SIZE })
    }

    fn prepare_file(tmp: &Path, first_index: u64, prev_crc: u32, size_bytes: u64) -> Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| WalError::io("create", tmp, e))?;
        preallocate(&file, size_bytes).map_err(|e| WalError::io("preallocate", tmp, e))?;
        let header = SegmentHeader { first_index, prev_crc, segment_size_bytes: size_bytes };
        use std::os::unix::fs::FileExt;
        file.write_all_at(&header.encode(), 0).map_err(|e| WalError::io("write header", tmp, e))?;
        // fsync, not fdatasync: the file's size and block allocation must be durable too.
        file.sync_all().map_err(|e| WalError::io("fsync", tmp, e))?;
        Ok(file)
    }

    /// Opens an existing segment for reading and later appends; the caller scans it.
    pub(crate) fn open(path: &Path, first_index: u64) -> Result<Segment> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| WalError::io("open", path, e))?;
        let map = map_file(&file, path)?;
        Ok(Segment {
            path: path.to_path_buf(),
            file,
            map,
            first_index,
            offsets: Vec::new(),
            write_offset: SEGMENT_HEADER_SIZE,
        })
    }

    /// Index just past the last durable record of this segment.
    pub(crate) fn next_index(&self) -> u64 {
        self.first_index + self.offsets.len() as u64
    }

    /// Byte offset of the record with `index`, which must be in this segment.
    pub(crate) fn offset_of(&self, index: u64) -> usize {
        let position = index.checked_sub(self.first_index).expect("index is in this segment") as usize;
        self.offsets[position] as usize
    }
}

fn map_file(file: &File, path: &Path) -> Result<Mmap> {
    // SAFETY: the mapping is read-only and the log never shrinks a segment file while it is
    // mapped (segments are preallocated; removal unmaps first). Another process modifying the
    // file is excluded by the directory lock.
    unsafe { Mmap::map(file) }.map_err(|e| WalError::io("mmap", path, e))
}

/// Reserves the file's blocks so later writes need no allocation (and cannot hit ENOSPC).
#[cfg(target_os = "linux")]
pub(crate) fn preallocate(file: &File, size_bytes: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(size_bytes).map_err(|_| std::io::Error::other("segment size too large"))?;
    // SAFETY: plain syscall on a valid, owned descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return file.set_len(size_bytes); // a file system without fallocate: sparse is still correct
    }
    Err(error)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn preallocate(file: &File, size_bytes: u64) -> std::io::Result<()> {
    file.set_len(size_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_other_files_are_ignored() {
        assert_eq!(parse_segment_file_name(&segment_file_name(1234)), Some(1234));
        assert_eq!(parse_segment_file_name(&segment_file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_file_name("00000000000000001234.wal.tmp"), None);
        assert_eq!(parse_segment_file_name("meta.0"), None);
        assert_eq!(parse_segment_file_name("1234.wal"), None);
        assert_eq!(parse_free_file_name(&free_file_name(77)), Some(77));
        assert_eq!(parse_segment_file_name(&free_file_name(77)), None);
    }
}
