//! Small files written atomically (temp file, fsync, rename, fsync the directory) and framed
//! with a checksum: the log's metadata, the caller's hard state, and snapshots.

use crate::error::{Result, WalError};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

pub(crate) const FRAME_HEADER_SIZE: usize = 32;

/// Writes `bytes` to `dir/name` so that after a crash the file holds either the old or the new
/// content, never a mix: temp file, fsync, rename over, fsync the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    write_atomic_parts(dir, name, &[bytes])
}

/// `write_atomic` of the parts one after another (large content is never joined in memory).
pub(crate) fn write_atomic_parts(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    write_flushed_parts(&tmp, parts, &AtomicBool::new(false))?;
    rename_into_place(dir, &tmp, name)
}

/// Bytes of a large file written, then flushed to the disk, before the next are written
/// (`write_flushed_parts`).
const FLUSH_CHUNK_BYTES: usize = 1 << 20;

/// Writes the parts one after another to a new file at `path` and syncs it; on failure (or
/// once `stop` is set, checked between chunks) the file is removed. A large file (a
/// snapshot, written beside a busy log) goes to the disk a chunk at a time — written, then
/// flushed and waited for — so at most a chunk of it is queued ahead of the log's
/// fdatasyncs, instead of all of it at the final sync. (Measured, that alone did not
/// change fire lateness at 25k creates/s, which the snapshots' bytes decide: docs/BENCHMARKS.md.)
/// Files under a chunk are written and synced as they are.
pub(crate) fn write_flushed_parts(path: &Path, parts: &[&[u8]], stop: &AtomicBool) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| WalError::io("create", path, e))?;
    let mut write_all = || -> std::io::Result<()> {
        let (mut written_to, mut flushed_to) = (0u64, 0u64);
        for chunk in parts.iter().flat_map(|part| part.chunks(FLUSH_CHUNK_BYTES)) {
            if stop.load(Ordering::Relaxed) {
                return Err(std::io::Error::new(ErrorKind::Interrupted, "given up: its log is closing"));
            }
            file.write_all(chunk)?;
            written_to += chunk.len() as u64;
            if written_to - flushed_to >= FLUSH_CHUNK_BYTES as u64 {
                flush_range(&file, flushed_to, written_to - flushed_to)?;
                flushed_to = written_to;
            }
        }
        file.sync_all()
    };
    if let Err(e) = write_all() {
        let _ = fs::remove_file(path);
        return Err(WalError::io("write", path, e));
    }
    Ok(())
}

/// Writes a range of a file's dirty pages to the disk and waits for them (not a durability
/// point: the final `sync_all` is). Elsewhere than Linux, nothing (the final sync does all).
#[cfg(target_os = "linux")]
fn flush_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off64_t::try_from(offset), libc::off64_t::try_from(len)) else {
        return Ok(()); // past what the call takes: the final sync writes it
    };
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscall on a valid, owned descriptor.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn flush_range(_file: &File, _offset: u64, _len: u64) -> std::io::Result<()> {
    Ok(())
}

/// Renames a synced file to `dir/name` (replacing it) and makes the rename durable.
pub(crate) fn rename_into_place(dir: &Path, synced: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    fs::rename(synced, &path).map_err(|e| WalError::io("rename", &path, e))?;
    fsync_dir(dir)
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| WalError::io("fsync directory", dir, e))
}

/// Frames a payload: magic (8) · crc32c of the rest (4) · reserved (4) · sequence (8) · payload
/// length (8) · payload.
pub(crate) fn encode_framed(magic: [u8; 8], sequence: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = frame_header(magic, sequence, &[payload]).to_vec();
    out.extend_from_slice(payload);
    out
}

/// The frame header of a payload given as parts (the payload is their concatenation).
pub(crate) fn frame_header(magic: [u8; 8], sequence: u64, parts: &[&[u8]]) -> [u8; FRAME_HEADER_SIZE] {
    let mut header = [0u8; FRAME_HEADER_SIZE];
    header[..8].copy_from_slice(&magic);
    header[16..24].copy_from_slice(&sequence.to_le_bytes());
    let length: usize = parts.iter().map(|part| part.len()).sum();
    header[24..32].copy_from_slice(&(length as u64).to_le_bytes());
    let crc = parts.iter().fold(crc32c::crc32c(&header[16..]), |crc, part| crc32c::crc32c_append(crc, part));
    header[8..12].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Checks a framed file; returns its sequence number and payload, or why it is unusable.
pub(crate) fn decode_framed(magic: [u8; 8], bytes: &[u8]) -> Result<(u64, &[u8]), &'static str> {
    let header = bytes.get(..FRAME_HEADER_SIZE).ok_or("file shorter than its header")?;
    if header[..8] != magic {
        return Err("bad magic");
    }
    let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let stored_crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if stored_crc != crc32c::crc32c(&bytes[16..]) {
        return Err("checksum mismatch");
    }
    let payload = &bytes[FRAME_HEADER_SIZE..];
    if field(24) != payload.len() as u64 {
        return Err("length mismatch");
    }
    Ok((field(16), payload))
}

/// A small record kept in two files, `<name>.0` and `<name>.1`, each written atomically, so
/// that one damaged copy does not lose it. Reads take the valid copy with the higher sequence.
pub(crate) struct DualFile {
    name: &'static str,
    magic: [u8; 8],
    sequence: u64,
}

impl DualFile {
    pub(crate) fn new(name: &'static str, magic: [u8; 8]) -> DualFile {
        DualFile { name, magic, sequence: 0 }
    }

    /// Loads the newest valid copy. `Ok(None)` when neither file exists; an error when copies
    /// exist but none is valid.
    pub(crate) fn load(&mut self, dir: &Path) -> Result<Option<Vec<u8>>> {
        let mut best: Option<(u64, Vec<u8>)> = None;
        let mut damaged = None;
        for copy in 0..2 {
            let path = dir.join(format!("{}.{copy}", self.name));
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(WalError::io("read", &path, e)),
            };
            match decode_framed(self.magic, &bytes) {
                Ok((sequence, payload)) => {
                    if best.as_ref().is_none_or(|(s, _)| sequence > *s) {
                        best = Some((sequence, payload.to_vec()));
                    }
                }
                Err(reason) => {
                    tracing::warn!(path = %path.display(), reason, "damaged copy ignored; the other copy is used");
                    damaged = Some((path, reason));
                }
            }
        }
        match (best, damaged) {
            (Some((sequence, payload)), _) => {
                self.sequence = sequence;
                Ok(Some(payload))
            }
            (None, Some((path, reason))) => {
                Err(WalError::Corrupt { path, offset: 0, reason: format!("every copy is damaged: {reason}") })
            }
            (None, None) => Ok(None),
        }
    }

    /// Writes both copies, one after the other, with the next sequence number.
    pub(crate) fn store(&mut self, dir: &Path, payload: &[u8]) -> Result<()> {
        self.sequence += 1;
        let framed = encode_framed(self.magic, self.sequence, payload);
        for copy in 0..2 {
            write_atomic(dir, &format!("{}.{copy}", self.name), &framed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_payload_round_trips_and_damage_is_caught() {
        let framed = encode_framed(*b"TESTFRAM", 9, b"payload");
        assert_eq!(decode_framed(*b"TESTFRAM", &framed), Ok((9, &b"payload"[..])));
        assert_eq!(decode_framed(*b"OTHERMAG", &framed), Err("bad magic"));
        let mut damaged = framed.clone();
        damaged[35] ^= 4;
        assert_eq!(decode_framed(*b"TESTFRAM", &damaged), Err("checksum mismatch"));
        assert!(decode_framed(*b"TESTFRAM", &framed[..20]).is_err());
    }

    #[test]
    fn dual_file_survives_one_damaged_copy_and_refuses_two() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut file = DualFile::new("state", *b"TESTDUAL");
        assert_eq!(file.load(dir.path()).expect("empty dir"), None);
        file.store(dir.path(), b"first").expect("store");
        file.store(dir.path(), b"second").expect("store");
        fs::write(dir.path().join("state.0"), b"garbage").expect("damage copy 0");
        let mut reloaded = DualFile::new("state", *b"TESTDUAL");
        assert_eq!(reloaded.load(dir.path()).expect("copy 1 is intact"), Some(b"second".to_vec()));
        fs::write(dir.path().join("state.1"), b"garbage").expect("damage copy 1");
        let error = reloaded.load(dir.path()).expect_err("both copies damaged");
        assert!(error.to_string().contains("every copy is damaged"), "{error}");
    }
}
