//! The log itself: open and recover a directory of segments, stage and group-commit records,
//! read them in place, truncate either end, and keep hard state and snapshots beside them.

use crate::atomic::{decode_framed, frame_header, fsync_dir, rename_into_place, write_flushed_parts, DualFile};
use crate::error::{Result, WalError};
use crate::format::{encode_record_into, record_size, RecordHeader, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE};
use crate::recovery::{judge_sealed, judge_tail, scan_segment, TailVerdict};
use crate::segment::{free_file_name, parse_free_file_name, parse_segment_file_name, preallocate, Segment};
use crate::sync::{SyncBackend, SyncChoice, Writer};
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Segments are at least a page and at most 1 GiB: offsets are u32 and a whole segment must
/// fit one io_uring write.
pub const SEGMENT_SIZE_MIN_BYTES: u64 = 4096;
pub const SEGMENT_SIZE_MAX_BYTES: u64 = 1 << 30;
pub const SEGMENT_SIZE_DEFAULT_BYTES: u64 = 64 << 20;
/// Hard state is a small record (Raft's term, vote and commit index); bounded to keep it so.
pub const HARD_STATE_MAX_BYTES: usize = 64 << 10;
/// Snapshots are written whole from memory; this bounds that memory.
pub const SNAPSHOT_MAX_BYTES: usize = 1 << 30;
/// Zeroing (torn tails, suffix truncation) writes at most this much per call.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

const META_MAGIC: [u8; 8] = *b"SUNDMETA";
const HARD_STATE_MAGIC: [u8; 8] = *b"SUNDHARD";
const SNAPSHOT_MAGIC: [u8; 8] = *b"SUNDSNAP";
const LOCK_FILE: &str = "LOCK";
/// Retired segments kept for reuse (disk held: this many segment sizes).
const FREE_SEGMENTS_MAX: usize = 4;
const LOCK_RETRIES: u32 = 20;
const LOCK_RETRY_DELAY_MS: u64 = 10;

/// Settings for opening a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalOptions {
    /// Size of each preallocated segment file (default 64 MiB; 4 KiB..=1 GiB, a multiple of
    /// 4 KiB). Existing segments keep the size they were made with.
    pub segment_size_bytes: u64,
    /// How durable writes are made (default: io_uring if the kernel allows it).
    pub sync: SyncChoice,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_size_bytes: SEGMENT_SIZE_DEFAULT_BYTES, sync: SyncChoice::Auto }
    }
}

impl WalOptions {
    fn validate(&self) -> Result<()> {
        let size = self.segment_size_bytes;
        if !(SEGMENT_SIZE_MIN_BYTES..=SEGMENT_SIZE_MAX_BYTES).contains(&size) {
            return Err(WalError::InvalidOption { field: "segment_size_bytes", rule: "must be within 4 KiB..=1 GiB" });
        }
        if size % SEGMENT_SIZE_MIN_BYTES != 0 {
            return Err(WalError::InvalidOption { field: "segment_size_bytes", rule: "must be a multiple of 4 KiB" });
        }
        Ok(())
    }
}

/// One record read in place from the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub index: u64,
    pub tag: u64,
    pub body: &'a [u8],
}

/// A snapshot as stored by [`Wal::save_snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The last log index the snapshot covers.
    pub index: u64,
    /// The tag of that index (Raft: its term).
    pub tag: u64,
    /// A view of the mapped snapshot file: page cache, not heap. The file is never written
    /// again (a newer snapshot is a new file), so the view stays valid after it is replaced.
    pub data: bytes::Bytes,
}

/// What recovery found and did when the log opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub first_index: u64,
    pub last_index: u64,
    pub segments: usize,
    /// Bytes of a torn, never-acknowledged tail that were zeroed.
    pub torn_tail_bytes: u64,
    /// Leftover files of an interrupted operation that were removed.
    pub leftover_files_removed: usize,
    pub backend: Option<SyncBackend>,
}

/// Records appended since the last commit: encoded, not yet written.
#[derive(Default)]
struct Staged {
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    first_index: u64,
    last_crc: u32,
}

/// The logical bounds kept in the metadata file (twice): what recovery must find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Meta {
    /// First index readable (records below it were truncated away).
    first_index: u64,
    /// First index of the newest segment, so a lost newest segment is noticed.
    newest_segment_first_index: u64,
    /// While a suffix truncation is in progress: records at or after this index are removed,
    /// whatever recovery finds of them (0: none). Makes the truncation atomic across crashes.
    cut_from: u64,
}

impl Meta {
    fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.first_index.to_le_bytes());
        out[8..16].copy_from_slice(&self.newest_segment_first_index.to_le_bytes());
        out[16..].copy_from_slice(&self.cut_from.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8], path: &Path) -> Result<Meta> {
        let corrupt = || WalError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: "metadata has the wrong length".into(),
        };
        let field = |at: usize| bytes.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let first_index = field(0).ok_or_else(corrupt)?;
        let newest_segment_first_index = field(8).ok_or_else(corrupt)?;
        let cut_from = field(16).ok_or_else(corrupt)?;
        if first_index == 0 || newest_segment_first_index == 0 {
            return Err(WalError::Corrupt {
                path: path.to_path_buf(),
                offset: 0,
                reason: "metadata names index 0".into(),
            });
        }
        Ok(Meta { first_index, newest_segment_first_index, cut_from })
    }
}

/// A segmented, durable, append-only log of `(index, tag, bytes)` records.
///
/// Records are staged by [`Wal::append`] and made durable together by [`Wal::commit`] (one
/// write and one fdatasync per batch). Only committed records are readable. After a failed
/// write or sync the log refuses further writes ([`WalError::Poisoned`]) until reopened, because
/// what reached the disk is then unknown and only recovery may decide.
pub struct Wal {
    dir: PathBuf,
    options: WalOptions,
    /// Ordered by first index; never empty; the last one is the one appended to.
    segments: Vec<Segment>,
    first_index: u64,
    last_index: u64,
    last_crc: u32,
    staged: Staged,
    /// Retired segment files (all of this log's segment size) waiting to be reused.
    free: Vec<PathBuf>,
    writer: Writer,
    /// The bytes of the batch whose write was begun ([`Wal::commit_begin`]) and not yet
    /// finished; while one is, nothing else changes the log (each change finishes it first).
    in_flight_len: Option<usize>,
    poisoned: bool,
    meta: Meta,
    meta_file: DualFile,
    hard_state_file: DualFile,
    hard_state: Option<Vec<u8>>,
    _lock: File,
}

impl Wal {
    /// Opens (or creates) the log in `dir` and recovers it. See docs/INTERNALS.md for the rules:
    /// a torn tail of the newest segment is cut; damage to acknowledged records is an error.
    pub fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<(Wal, RecoveryReport)> {
        options.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| WalError::io("create directory", &dir, e))?;
        let lock = lock_directory(&dir)?;
        let writer = Writer::open(options.sync).map_err(WalError::IoUringUnavailable)?;
        let mut report = RecoveryReport { backend: Some(writer.backend()), ..RecoveryReport::default() };
        report.leftover_files_removed += remove_temp_files(&dir)?;
        let free = load_free_segments(&dir, options.segment_size_bytes)?;
        let mut meta_file = DualFile::new("meta", META_MAGIC);
        let mut hard_state_file = DualFile::new("hardstate", HARD_STATE_MAGIC);
        let hard_state = hard_state_file.load(&dir)?;
        let mut wal = Wal {
            dir,
            options,
            segments: Vec::new(),
            first_index: 1,
            last_index: 0,
            last_crc: 0,
            staged: Staged::default(),
            free: Vec::new(),
            writer,
            in_flight_len: None,
            poisoned: false,
            meta: Meta { first_index: 1, newest_segment_first_index: 1, cut_from: 0 },
            meta_file: DualFile::new("meta", META_MAGIC),
            hard_state_file,
            hard_state,
            _lock: lock,
        };
        wal.free = free;
        let meta_path = wal.dir.join("meta.0");
        match meta_file.load(&wal.dir)? {
            Some(payload) => {
                wal.meta = Meta::decode(&payload, &meta_path)?;
                wal.meta_file = meta_file;
                wal.recover(&mut report)?;
            }
            None => wal.initialize(&mut report)?,
        }
        report.first_index = wal.first_index;
        report.last_index = wal.last_index;
        report.segments = wal.segments.len();
        tracing::info!(dir = %wal.dir.display(), backend = ?wal.backend(), first_index = wal.first_index,
            last_index = wal.last_index, segments = wal.segments.len(), torn_tail_bytes = report.torn_tail_bytes, "log opened");
        Ok((wal, report))
    }

    /// A directory without metadata: a new log, or one whose creation was interrupted after
    /// its first (still empty) segment was made. Anything else is refused.
    fn initialize(&mut self, report: &mut RecoveryReport) -> Result<()> {
        let existing = list_segments(&self.dir)?;
        match existing.as_slice() {
            [] => {}
            [(1, path)] if segment_is_empty(path)? => {
                fs::remove_file(path).map_err(|e| WalError::io("remove", path, e))?;
                report.leftover_files_removed += 1;
            }
            [(_, path), ..] => {
                return Err(WalError::Inconsistent {
                    path: path.clone(),
                    reason: "segments exist but the metadata files (meta.0, meta.1) are missing".into(),
                })
            }
        }
        let segment = Segment::create(&self.dir, 1, 0, self.options.segment_size_bytes)?;
        self.segments.push(segment);
        self.meta_file.store(&self.dir, &self.meta.encode())
    }

    /// Recovery proper: finish interrupted truncations and rotations, scan every segment,
    /// check the chain across segments, cut a torn tail, refuse damage.
    fn recover(&mut self, report: &mut RecoveryReport) -> Result<()> {
        let mut names = list_segments(&self.dir)?;
        // A segment newer than the metadata knows is either an empty one made by a rotation or
        // reset that did not finish (appends follow the metadata update), or one a suffix
        // truncation had already cut off in the metadata: either way it holds nothing to keep.
        while let Some((first, path)) = names.last().cloned() {
            if first <= self.meta.newest_segment_first_index {
                break;
            }
            fs::remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
            report.leftover_files_removed += 1;
            names.pop();
        }
        // Segments wholly below the first index are leftovers of an interrupted prefix truncation.
        while names.len() >= 2 && names[1].0 <= self.meta.first_index {
            let (_, path) = names.remove(0);
            fs::remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
            report.leftover_files_removed += 1;
        }
        if report.leftover_files_removed > 0 {
            fsync_dir(&self.dir)?;
        }
        self.check_segment_names(&names)?;
        let count = names.len();
        for (position, (first, path)) in names.into_iter().enumerate() {
            let newest = position + 1 == count;
            let segment = self.recover_segment(&path, first, newest, report)?;
            self.last_index = segment.next_index() - 1;
            self.segments.push(segment);
        }
        self.first_index = self.meta.first_index;
        if self.meta.cut_from != 0 {
            self.finish_cut(report)?;
        }
        if self.last_index + 1 < self.first_index {
            return Err(WalError::Inconsistent {
                path: self.segments[self.segments.len() - 1].path.clone(),
                reason: format!(
                    "log ends at index {} but the metadata says it starts at {}",
                    self.last_index, self.first_index
                ),
            });
        }
        Ok(())
    }

    fn check_segment_names(&self, names: &[(u64, PathBuf)]) -> Result<()> {
        let meta_path = self.dir.join("meta.0");
        let Some((newest, _)) = names.last() else {
            return Err(WalError::Inconsistent { path: self.dir.clone(), reason: "no segment files".into() });
        };
        if *newest != self.meta.newest_segment_first_index {
            return Err(WalError::Inconsistent {
                path: meta_path,
                reason: format!(
                    "newest segment should start at index {}, but the newest present starts at {newest}",
                    self.meta.newest_segment_first_index
                ),
            });
        }
        if names[0].0 == 0 {
            return Err(WalError::Inconsistent { path: names[0].1.clone(), reason: "a segment named index 0".into() });
        }
        if names[0].0 > self.meta.first_index {
            return Err(WalError::Inconsistent {
                path: names[0].1.clone(),
                reason: format!(
                    "log should start at index {} but the oldest segment starts at {}",
                    self.meta.first_index, names[0].0
                ),
            });
        }
        Ok(())
    }

    /// Opens and scans one segment, checking it continues the chain of the one before.
    fn recover_segment(
        &mut self,
        path: &Path,
        first: u64,
        newest: bool,
        report: &mut RecoveryReport,
    ) -> Result<Segment> {
        let mut segment = Segment::open(path, first)?;
        let corrupt = |offset: usize, reason: String| WalError::Corrupt {
            path: path.to_path_buf(),
            offset: offset as u64,
            reason,
        };
        let scan = scan_segment(&segment.map).map_err(|fault| corrupt(0, fault.to_string()))?;
        let size = scan.header.segment_size_bytes;
        if !(SEGMENT_SIZE_MIN_BYTES..=SEGMENT_SIZE_MAX_BYTES).contains(&size) || size % SEGMENT_SIZE_MIN_BYTES != 0 {
            return Err(corrupt(0, format!("header gives an impossible segment size of {size} bytes")));
        }
        if scan.header.first_index != first {
            return Err(corrupt(
                0,
                format!("header says first index {}, file name says {first}", scan.header.first_index),
            ));
        }
        if let Some(previous) = self.segments.last() {
            if previous.next_index() != first || self.last_crc != scan.header.prev_crc {
                let reason = format!(
                    "does not continue the previous segment, which ends at index {}",
                    previous.next_index() - 1
                );
                return Err(corrupt(0, reason));
            }
        }
        let cut_here = newest && self.meta.cut_from != 0 && self.meta.cut_from <= scan.next_index();
        if cut_here {
            // A suffix truncation was interrupted: keep only records below the cut; the rest
            // (whatever state the zeroing left it in) is removed by `finish_cut`.
            let keep = self.meta.cut_from.saturating_sub(first) as usize;
            let mut scan = scan;
            scan.offsets.truncate(keep);
            scan.end_offset = scan.offsets.last().map_or(SEGMENT_HEADER_SIZE, |&o| {
                let header = RecordHeader::decode_unchecked(&segment.map[o as usize..]);
                o as usize + header.size()
            });
            scan.last_crc = scan
                .offsets
                .last()
                .map_or(scan.header.prev_crc, |&o| RecordHeader::decode_unchecked(&segment.map[o as usize..]).crc);
            segment.offsets = scan.offsets;
            segment.write_offset = scan.end_offset;
            self.last_crc = scan.last_crc;
            return Ok(segment);
        }
        if newest {
            match judge_tail(&segment.map, &scan) {
                TailVerdict::Clean => {}
                TailVerdict::Corrupt { offset, reason } => return Err(corrupt(offset, reason.to_string())),
                TailVerdict::Torn { cut_offset, dirty_end } => {
                    tracing::warn!(path = %path.display(), cut_offset, bytes = dirty_end - cut_offset,
                        first_lost_index = scan.next_index(), "torn tail of unacknowledged records cut");
                    zero_range(&mut self.writer, &segment.file, path, cut_offset, dirty_end)?;
                    report.torn_tail_bytes += (dirty_end - cut_offset) as u64;
                }
            }
            // A newest segment cut short (a truncated file) is made whole again so appends
            // stay inside the mapping.
            if (segment.map.len() as u64) < scan.header.segment_size_bytes {
                preallocate(&segment.file, scan.header.segment_size_bytes)
                    .map_err(|e| WalError::io("preallocate", path, e))?;
                segment = Segment::open(path, first)?;
            }
        } else if let Some((offset, reason)) = judge_sealed(&segment.map, &scan) {
            return Err(corrupt(offset, reason.to_string()));
        }
        segment.offsets = scan.offsets;
        segment.write_offset = scan.end_offset;
        self.last_crc = scan.last_crc;
        Ok(segment)
    }

    /// Which durable-write implementation this log uses.
    pub fn backend(&self) -> SyncBackend {
        self.writer.backend()
    }

    /// First readable index. When the log is empty, `first_index() == last_index() + 1`.
    pub fn first_index(&self) -> u64 {
        self.first_index
    }

    /// Last durable index (`first_index() - 1` when empty).
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// Whether a commit was begun ([`Wal::commit_begin`]) and not yet finished.
    pub fn commit_begun(&self) -> bool {
        self.in_flight_len.is_some()
    }

    /// Number of records staged and not yet committed.
    pub fn staged_count(&self) -> u64 {
        self.staged.offsets.len() as u64
    }

    /// Largest record body a segment of this log can hold.
    pub fn record_body_max_bytes(&self) -> usize {
        self.options.segment_size_bytes as usize - SEGMENT_HEADER_SIZE - RECORD_HEADER_SIZE
    }

    /// Stages a record and returns its index. It becomes durable and readable at the next
    /// [`Wal::commit`]. If it does not fit the newest segment, the records staged so far are
    /// committed first and a new segment is started.
    pub fn append(&mut self, tag: u64, body: &[u8]) -> Result<u64> {
        self.finish_begun()?;
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        if body.len() > self.record_body_max_bytes() {
            return Err(WalError::TooLarge {
                what: "record body",
                len_bytes: body.len(),
                max_bytes: self.record_body_max_bytes(),
            });
        }
        let size = record_size(body.len());
        let active = self.segments.last().expect("a log always has a segment");
        let segment_end = active.map.len();
        if active.write_offset + self.staged.bytes.len() + size > segment_end {
            self.commit()?;
            self.rotate()?;
        }
        let index = self.last_index + self.staged_count() + 1;
        if self.staged.offsets.is_empty() {
            self.staged.first_index = index;
            self.staged.last_crc = self.last_crc;
        }
        let batch_offset = u32::try_from(index - self.staged.first_index).expect("a batch fits one segment");
        let header = RecordHeader::new(index, tag, self.staged.last_crc, batch_offset, body);
        let active = self.segments.last().expect("a log always has a segment");
        let offset = active.write_offset + self.staged.bytes.len();
        self.staged.offsets.push(u32::try_from(offset).expect("segments are at most 1 GiB"));
        encode_record_into(&mut self.staged.bytes, &header, body);
        self.staged.last_crc = header.crc;
        Ok(index)
    }

    /// Makes every staged record durable with one write and one fdatasync (group commit) and
    /// returns the last durable index. On failure the staged records are dropped and the log
    /// is poisoned; [`Wal::last_index`] still tells what is durable.
    pub fn commit(&mut self) -> Result<u64> {
        self.commit_begin()?;
        self.commit_finish()
    }

    /// Begins making every staged record durable (one write and one fdatasync, as
    /// [`Wal::commit`]) and returns without waiting for it, so that logs in other
    /// directories can begin theirs: the file system then commits their fdatasyncs
    /// together. [`Wal::commit_finish`] waits for it; any other change of the log (an
    /// append, a cut, a snapshot) finishes it first, and so does dropping the log.
    pub fn commit_begin(&mut self) -> Result<()> {
        self.finish_begun()?;
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        if self.staged.offsets.is_empty() {
            return Ok(());
        }
        // Never fails: a log always has a segment (opening makes one; cuts keep the newest).
        let active = self.segments.last_mut().expect("a log always has a segment");
        let records_len = self.staged.bytes.len();
        // A zeroed header after the batch marks the clean end, even over a recycled
        // segment's old bytes; the next batch overwrites it.
        if active.write_offset + records_len + RECORD_HEADER_SIZE <= active.map.len() {
            self.staged.bytes.extend_from_slice(&[0u8; RECORD_HEADER_SIZE]);
        }
        let bytes = std::mem::take(&mut self.staged.bytes);
        debug_assert!(!self.writer.is_in_flight());
        self.writer.begin_durable(&active.file, active.write_offset as u64, bytes);
        self.in_flight_len = Some(records_len);
        Ok(())
    }

    /// Waits for the write [`Wal::commit_begin`] began, if any, and returns the last
    /// durable index. On failure its records are dropped and the log is poisoned.
    pub fn commit_finish(&mut self) -> Result<u64> {
        let Some(records_len) = self.in_flight_len.take() else {
            return if self.poisoned { Err(WalError::Poisoned) } else { Ok(self.last_index) };
        };
        // Never fails: a log always has a segment (opening makes one; cuts keep the newest).
        let active = self.segments.last_mut().expect("a log always has a segment");
        // Never fails: `in_flight_len` is set only beside a write begun on the writer.
        let (mut bytes, written) = self.writer.finish_durable(&active.file).expect("a write was begun");
        bytes.clear();
        self.staged.bytes = bytes;
        if let Err(e) = written {
            self.poisoned = true;
            self.staged.offsets.clear();
            return Err(WalError::io("write", &active.path, e));
        }
        debug_assert_eq!(self.staged.offsets[0] as usize, active.write_offset);
        active.write_offset += records_len;
        active.offsets.append(&mut self.staged.offsets);
        self.last_index = active.next_index() - 1;
        self.last_crc = self.staged.last_crc;
        Ok(self.last_index)
    }

    /// Finishes a begun write before the log changes otherwise (its buffer and its place in
    /// the newest segment are the log's until then).
    fn finish_begun(&mut self) -> Result<()> {
        if self.in_flight_len.is_some() {
            self.commit_finish()?;
        }
        Ok(())
    }

    /// Appends a batch of `(tag, body)` records and commits them: one durability barrier.
    pub fn append_batch<'a>(&mut self, records: impl IntoIterator<Item = (u64, &'a [u8])>) -> Result<u64> {
        for (tag, body) in records {
            self.append(tag, body)?;
        }
        self.commit()
    }

    /// Starts a new segment after the last durable record.
    fn rotate(&mut self) -> Result<()> {
        debug_assert!(self.staged.offsets.is_empty());
        let first = self.last_index + 1;
        let segment = self.new_segment(first, self.last_crc)?;
        let active = self.segments.last().expect("a log always has a segment");
        if active.first_index == first {
            // The active segment is empty and too small (segment_size_bytes grew between
            // opens): the new file has replaced it under the same name, atomically.
            debug_assert!(active.offsets.is_empty());
            self.segments.pop();
            self.segments.push(segment);
            return Ok(());
        }
        self.segments.push(segment);
        // If this fails the new, empty segment stays: recovery removes it, or keeps it when
        // one copy of the metadata already names it.
        self.store_meta(Meta { newest_segment_first_index: first, ..self.meta })
    }

    /// A segment starting at `first_index`: a recycled one when the pool has one, else a new
    /// preallocated file.
    fn new_segment(&mut self, first_index: u64, prev_crc: u32) -> Result<Segment> {
        let size = self.options.segment_size_bytes;
        if let Some(free) = self.free.pop() {
            match Segment::recycle(&self.dir, &free, first_index, prev_crc, size) {
                Ok(segment) => return Ok(segment),
                Err(error) => {
                    tracing::warn!(%error, "recycling a segment failed; creating a new one");
                    let _ = fs::remove_file(&free);
                }
            }
        }
        Segment::create(&self.dir, first_index, prev_crc, size)
    }

    fn store_meta(&mut self, meta: Meta) -> Result<()> {
        self.meta_file.store(&self.dir, &meta.encode())?;
        self.meta = meta;
        Ok(())
    }

    /// The durable record at `index`, read in place from the mapping; `None` outside the log.
    pub fn get(&self, index: u64) -> Option<Entry<'_>> {
        if index < self.first_index || index > self.last_index {
            return None;
        }
        let segment = &self.segments[self.segment_position(index)];
        let offset = segment.offset_of(index);
        let header = RecordHeader::decode_unchecked(&segment.map[offset..offset + RECORD_HEADER_SIZE]);
        debug_assert_eq!(header.index, index, "the in-memory index points at the right record");
        let body_start = offset + RECORD_HEADER_SIZE;
        let body = &segment.map[body_start..body_start + header.body_len as usize];
        Some(Entry { index, tag: header.tag, body })
    }

    /// Iterates over the durable records from `from` (clamped to the first index) to the end.
    pub fn iter_from(&self, from: u64) -> impl Iterator<Item = Entry<'_>> + '_ {
        (from.max(self.first_index)..=self.last_index).map_while(move |index| self.get(index))
    }

    /// The segment file and byte offset holding the record at `index` (for error messages).
    pub(crate) fn location(&self, index: u64) -> Option<(PathBuf, u64)> {
        self.get(index)?;
        let segment = &self.segments[self.segment_position(index)];
        Some((segment.path.clone(), segment.offset_of(index) as u64))
    }

    fn segment_position(&self, index: u64) -> usize {
        self.segments.partition_point(|s| s.first_index <= index) - 1
    }

    /// Removes every record with index ≥ `from` (Raft: a conflicting suffix). Durable and
    /// atomic: the cut is first recorded in the metadata, so a crash at any point leaves the
    /// log either as it was or cut at `from`; then later segments are deleted and the removed
    /// records zeroed, and the mark is cleared.
    pub fn truncate_suffix(&mut self, from: u64) -> Result<()> {
        self.finish_begun()?;
        self.check_writable("truncate_suffix")?;
        if from > self.last_index {
            return Ok(());
        }
        if from < self.first_index {
            return Err(WalError::OutOfRange { index: from, first: self.first_index, last: self.last_index });
        }
        let keep = self.segment_position(from);
        let keep_first = self.segments[keep].first_index;
        self.store_meta(Meta { newest_segment_first_index: keep_first, cut_from: from, ..self.meta })?;
        // From here on the cut is decided: memory follows at once, so reads never see a
        // removed record even if the file work below fails (which poisons the log).
        let removed: Vec<Segment> = self.segments.drain(keep + 1..).collect();
        let segment = self.segments.last_mut().expect("kept segment");
        let old_end = segment.write_offset;
        let cut = if from == segment.first_index { SEGMENT_HEADER_SIZE } else { segment.offset_of(from) };
        segment.offsets.truncate((from - segment.first_index) as usize);
        segment.write_offset = cut;
        self.last_index = from - 1;
        self.last_crc = self.crc_of_last();
        let finished = self.remove_files(removed).and_then(|()| {
            let segment = self.segments.last().expect("kept segment");
            // The end marker at `old_end` is zero already; cover it anyway when it fits.
            let end = (old_end + RECORD_HEADER_SIZE).min(segment.map.len());
            zero_range(&mut self.writer, &segment.file, &segment.path, cut, end)
        });
        let finished = finished.and_then(|()| self.store_meta(Meta { cut_from: 0, ..self.meta }));
        if finished.is_err() {
            self.poisoned = true;
        }
        finished
    }

    /// Recovery's half of an interrupted suffix truncation: the newest segment was already
    /// loaded only up to the cut; zero every record at or after it and clear the mark.
    fn finish_cut(&mut self, report: &mut RecoveryReport) -> Result<()> {
        let from = self.meta.cut_from;
        let segment = self.segments.last().expect("a log always has a segment");
        let cut = segment.write_offset;
        let end = crate::recovery::later_records(&segment.map, cut.saturating_sub(crate::format::RECORD_ALIGN), from)
            .map(|r| r.end)
            .max()
            .unwrap_or(0)
            .max(cut + RECORD_HEADER_SIZE)
            .min(segment.map.len());
        tracing::warn!(path = %segment.path.display(), from, "finishing an interrupted suffix truncation");
        zero_range(&mut self.writer, &segment.file, &segment.path, cut, end)?;
        report.torn_tail_bytes += (end - cut) as u64;
        self.store_meta(Meta { cut_from: 0, ..self.meta })
    }

    /// Deletes segment files newest first, then makes the deletions durable.
    fn remove_files(&mut self, segments: Vec<Segment>) -> Result<()> {
        for segment in segments.into_iter().rev() {
            let path = segment.path.clone();
            drop(segment);
            fs::remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
        }
        fsync_dir(&self.dir)
    }

    /// Checksum of the last durable record, read back from the mapping (the chain's next link).
    fn crc_of_last(&self) -> u32 {
        let segment = self.segments.last().expect("a log always has a segment");
        match segment.offsets.last() {
            Some(&offset) => RecordHeader::decode_unchecked(&segment.map[offset as usize..]).crc,
            None => crate::format::SegmentHeader::decode(&segment.map).map(|h| h.prev_crc).unwrap_or(0),
        }
    }

    /// Makes every record with index ≤ `upto` unreadable and deletes the segments that hold
    /// only such records (Raft: after a snapshot). With `upto ≥ last_index()` the log becomes
    /// empty and continues at `upto + 1`.
    pub fn truncate_prefix(&mut self, upto: u64) -> Result<()> {
        self.finish_begun()?;
        self.check_writable("truncate_prefix")?;
        if upto == u64::MAX {
            return Err(WalError::OutOfRange { index: upto, first: self.first_index, last: self.last_index });
        }
        if upto < self.first_index {
            return Ok(());
        }
        if upto >= self.last_index {
            return self.reset(upto + 1);
        }
        self.store_meta(Meta { first_index: upto + 1, ..self.meta })?;
        self.first_index = upto + 1;
        self.remove_segments_below(upto + 1)
    }

    /// Whether `truncate_prefix(upto)` would retire a segment (give back disk space). A cut
    /// that retires none only rewrites the metadata (two synced copies): a caller that
    /// tolerates records at or below `upto` staying readable may skip it until one would.
    pub fn prefix_cut_frees_a_segment(&self, upto: u64) -> bool {
        self.segments.len() >= 2 && self.segments[1].first_index <= upto.saturating_add(1)
    }

    /// Empties the log so the next record gets `next_index`; the checksum chain restarts.
    fn reset(&mut self, next_index: u64) -> Result<()> {
        let active = self.segments.last().expect("a log always has a segment");
        let reuse_active = active.offsets.is_empty() && active.first_index == next_index;
        if !reuse_active {
            let segment = self.new_segment(next_index, 0)?;
            self.segments.push(segment);
        }
        let meta = Meta { first_index: next_index, newest_segment_first_index: next_index, cut_from: 0 };
        if let Err(e) = self.store_meta(meta) {
            // The new segment stays on disk (one metadata copy may already name it) but the
            // log in memory is unchanged; writes stop until a reopen sorts it out.
            if !reuse_active {
                self.segments.pop();
            }
            self.poisoned = true;
            return Err(e);
        }
        self.first_index = next_index;
        self.last_index = next_index - 1;
        self.last_crc = self.crc_of_last();
        self.remove_segments_below(next_index)
    }

    /// Retires the oldest segments while the next one starts at or below `first_index`: kept
    /// for reuse while the pool has room, deleted otherwise. Only prefix truncation retires
    /// segments for reuse, so every index a retired segment holds is below every index that
    /// will ever be written again (the invariant recovery uses to ignore old records).
    fn remove_segments_below(&mut self, first_index: u64) -> Result<()> {
        let mut changed = false;
        while self.segments.len() >= 2 && self.segments[1].first_index <= first_index {
            let segment = self.segments.remove(0);
            let reusable = segment.map.len() as u64 == self.options.segment_size_bytes;
            let (path, old_first) = (segment.path.clone(), segment.first_index);
            drop(segment);
            if reusable && self.free.len() < FREE_SEGMENTS_MAX {
                let free = self.dir.join(free_file_name(old_first));
                fs::rename(&path, &free).map_err(|e| WalError::io("rename", &path, e))?;
                self.free.push(free);
            } else {
                fs::remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
            }
            changed = true;
        }
        if changed {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        if !self.staged.offsets.is_empty() {
            return Err(WalError::StagedPending { op, staged: self.staged_count() });
        }
        Ok(())
    }

    /// The hard state last saved with [`Wal::save_hard_state`], if any.
    pub fn hard_state(&self) -> Option<&[u8]> {
        self.hard_state.as_deref()
    }

    /// Saves a small opaque record (Raft: term, vote, commit) atomically, in two copies.
    pub fn save_hard_state(&mut self, bytes: &[u8]) -> Result<()> {
        self.finish_begun()?;
        if bytes.len() > HARD_STATE_MAX_BYTES {
            return Err(WalError::TooLarge {
                what: "hard state",
                len_bytes: bytes.len(),
                max_bytes: HARD_STATE_MAX_BYTES,
            });
        }
        self.hard_state_file.store(&self.dir, bytes)?;
        self.hard_state = Some(bytes.to_vec());
        Ok(())
    }

    /// Saves a snapshot atomically, then removes older snapshots. It does not truncate the
    /// log: call [`Wal::truncate_prefix`] when the snapshot should replace records.
    pub fn save_snapshot(&mut self, index: u64, tag: u64, data: &[u8]) -> Result<()> {
        self.save_snapshot_parts(index, tag, &[data])
    }

    /// `save_snapshot` of data given as parts, written one after another: a large snapshot
    /// is never copied to be framed.
    pub fn save_snapshot_parts(&mut self, index: u64, tag: u64, parts: &[&[u8]]) -> Result<()> {
        self.finish_begun()?;
        let draft = SnapshotDraft::write(&self.dir, index, tag, parts)?;
        self.adopt_snapshot(draft)
    }

    /// The directory this log lives in (where `SnapshotDraft::write` puts its file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes a snapshot written beside the log (`SnapshotDraft::write`, maybe on another
    /// thread) the newest one: renamed into place, then older snapshots removed. Like
    /// `save_snapshot`, it does not truncate the log.
    pub fn adopt_snapshot(&mut self, mut draft: SnapshotDraft) -> Result<()> {
        self.finish_begun()?;
        let Some(synced) = draft.synced.take() else {
            return Err(WalError::Corrupt {
                path: self.dir.clone(),
                offset: 0,
                reason: "a snapshot draft was adopted twice".into(),
            });
        };
        if synced.parent() != Some(self.dir.as_path()) {
            let _ = fs::remove_file(&synced);
            return Err(WalError::Corrupt {
                path: synced,
                offset: 0,
                reason: "a snapshot draft written for another log's directory".into(),
            });
        }
        if let Err(error) = rename_into_place(&self.dir, &synced, &snapshot_file_name(draft.index)) {
            let _ = fs::remove_file(&synced);
            return Err(error);
        }
        let mut removed = 0;
        for (older, path) in list_snapshots(&self.dir)? {
            if older < draft.index {
                fs::remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
                removed += 1;
            }
        }
        if removed > 0 {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Loads the newest snapshot, checked whole, as a view of its mapped file. A damaged
    /// newest snapshot is an error, not a fallback.
    pub fn load_snapshot(&self) -> Result<Option<Snapshot>> {
        let Some((_, path)) = list_snapshots(&self.dir)?.pop() else {
            return Ok(None);
        };
        map_snapshot(&path).map(Some)
    }
}

/// Where a snapshot's data (the parts given to `SnapshotDraft::write`) starts in its file:
/// after the frame's header and the index and tag. A caller that wants part of its data
/// aligned in the mapping (an archive read in place) pads against this.
pub const SNAPSHOT_DATA_OFFSET_BYTES: usize = crate::atomic::FRAME_HEADER_SIZE + 16;

/// The snapshot file at `path`, checked whole, as a view of its mapping.
fn map_snapshot(path: &Path) -> Result<Snapshot> {
    let file = File::open(path).map_err(|e| WalError::io("open", path, e))?;
    // SAFETY: snapshot files are written to a temporary name (synced before anyone maps them)
    // and renamed into place, never modified or shrunk afterwards (removal only unlinks: the
    // mapping keeps the inode); other processes are kept out of the directory by its lock.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| WalError::io("mmap", path, e))?;
    let corrupt = |reason: &str| WalError::Corrupt { path: path.to_path_buf(), offset: 0, reason: reason.to_string() };
    let (_, payload) = decode_framed(SNAPSHOT_MAGIC, &map).map_err(corrupt)?;
    let field = |at: usize| payload.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let (Some(index), Some(tag)) = (field(0), field(8)) else {
        return Err(corrupt("snapshot payload shorter than its header"));
    };
    let data_at = map.len() - payload.len() + 16;
    debug_assert_eq!(data_at, SNAPSHOT_DATA_OFFSET_BYTES, "the data starts where the constant says");
    Ok(Snapshot { index, tag, data: bytes::Bytes::from_owner(map).slice(data_at..) })
}

/// Numbers snapshot drafts in this process, so two drafts of one index never share a file.
static DRAFTS_WRITTEN: AtomicU64 = AtomicU64::new(0);

/// A snapshot framed, written and synced beside a log under a temporary name, which any
/// thread can make (the encoding and the write of a large snapshot need not stall the
/// thread that owns the log); `Wal::adopt_snapshot` makes it the log's. Dropped unadopted,
/// its file is removed (and a crash leaves a `.tmp` that opening the log removes).
#[derive(Debug)]
pub struct SnapshotDraft {
    index: u64,
    /// The synced file, until adopted.
    synced: Option<PathBuf>,
}

impl SnapshotDraft {
    /// Writes the snapshot at `index` (of entry tag `tag`) with data given as parts into
    /// `dir`, the log's directory (`Wal::dir`), and syncs it.
    pub fn write(dir: &Path, index: u64, tag: u64, parts: &[&[u8]]) -> Result<SnapshotDraft> {
        SnapshotDraft::write_unless(dir, index, tag, parts, &AtomicBool::new(false))
    }

    /// `write`, given up (an error, the file removed) once `stop` is set: checked between
    /// chunks, so a log that closes need not wait for a large snapshot's write.
    pub fn write_unless(dir: &Path, index: u64, tag: u64, parts: &[&[u8]], stop: &AtomicBool) -> Result<SnapshotDraft> {
        let data_bytes: usize = parts.iter().map(|part| part.len()).sum();
        if data_bytes > SNAPSHOT_MAX_BYTES {
            return Err(WalError::TooLarge { what: "snapshot", len_bytes: data_bytes, max_bytes: SNAPSHOT_MAX_BYTES });
        }
        let mut fields = [0u8; 16];
        fields[..8].copy_from_slice(&index.to_le_bytes());
        fields[8..].copy_from_slice(&tag.to_le_bytes());
        let mut payload: Vec<&[u8]> = Vec::with_capacity(1 + parts.len());
        payload.push(&fields);
        payload.extend_from_slice(parts);
        let header = frame_header(SNAPSHOT_MAGIC, index, &payload);
        let mut file: Vec<&[u8]> = Vec::with_capacity(1 + payload.len());
        file.push(&header);
        file.extend_from_slice(&payload);
        let number = DRAFTS_WRITTEN.fetch_add(1, Ordering::Relaxed);
        let synced = dir.join(format!("{}.{number}.tmp", snapshot_file_name(index)));
        write_flushed_parts(&synced, &file, stop)?;
        Ok(SnapshotDraft { index, synced: Some(synced) })
    }

    /// The index the snapshot was taken at.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The written snapshot, checked whole, as a view of its mapped file (which stays valid
    /// once adopted: a rename keeps the file), as `Wal::load_snapshot` would read it.
    pub fn map(&self) -> Result<Snapshot> {
        match &self.synced {
            Some(path) => map_snapshot(path),
            None => Err(WalError::Corrupt { path: PathBuf::new(), offset: 0, reason: "an adopted draft".into() }),
        }
    }
}

impl Drop for Wal {
    /// A begun write is waited for while its segment's file is still open (the kernel
    /// names the file by its descriptor when it runs the fdatasync).
    fn drop(&mut self) {
        let _ = self.finish_begun();
    }
}

impl Drop for SnapshotDraft {
    fn drop(&mut self) {
        if let Some(synced) = self.synced.take() {
            let _ = fs::remove_file(synced);
        }
    }
}

fn snapshot_file_name(index: u64) -> String {
    format!("snapshot-{index:020}.snap")
}

/// Snapshot files sorted by index.
fn list_snapshots(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = list_dir(dir, |name| name.strip_prefix("snapshot-")?.strip_suffix(".snap")?.parse().ok())?;
    found.sort();
    Ok(found)
}

/// Segment files sorted by first index.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = list_dir(dir, parse_segment_file_name)?;
    found.sort();
    Ok(found)
}

fn list_dir(dir: &Path, parse: impl Fn(&str) -> Option<u64>) -> Result<Vec<(u64, PathBuf)>> {
    let entries = fs::read_dir(dir).map_err(|e| WalError::io("read directory", dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| WalError::io("read directory", dir, e))?;
        if let Some(key) = entry.file_name().to_str().and_then(&parse) {
            found.push((key, entry.path()));
        }
    }
    Ok(found)
}

/// Retired segments to reuse: those of this log's segment size, at most the pool's bound;
/// any others are deleted.
fn load_free_segments(dir: &Path, segment_size_bytes: u64) -> Result<Vec<PathBuf>> {
    let mut free = Vec::new();
    for (_, path) in list_dir(dir, parse_free_file_name)? {
        let len = fs::metadata(&path).map_err(|e| WalError::io("stat", &path, e))?.len();
        if len == segment_size_bytes && free.len() < FREE_SEGMENTS_MAX {
            free.push(path);
        } else {
            fs::remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
        }
    }
    Ok(free)
}

/// True when the segment at `path` holds no valid record (used only for leftovers).
fn segment_is_empty(path: &Path) -> Result<bool> {
    let bytes = fs::read(path).map_err(|e| WalError::io("read", path, e))?;
    Ok(scan_segment(&bytes).map(|scan| scan.offsets.is_empty()).unwrap_or(true))
}

/// Removes `*.tmp` files left by an interrupted atomic write or segment creation.
fn remove_temp_files(dir: &Path) -> Result<usize> {
    let entries = fs::read_dir(dir).map_err(|e| WalError::io("read directory", dir, e))?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| WalError::io("read directory", dir, e))?;
        if entry.file_name().to_string_lossy().ends_with(".tmp") {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                // Its writer removed it meanwhile (a snapshot draft given up).
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(WalError::io("remove", entry.path(), e)),
            }
        }
    }
    Ok(removed)
}

/// Overwrites `[from, to)` of a segment with zeros, durably.
fn zero_range(writer: &mut Writer, file: &File, path: &Path, from: usize, to: usize) -> Result<()> {
    let zeros = vec![0u8; (to.saturating_sub(from)).min(ZERO_CHUNK_BYTES)];
    let mut offset = from;
    // Bounded: each turn advances by a non-empty chunk until `to`.
    while offset < to {
        let len = (to - offset).min(zeros.len());
        writer.write_durable(file, offset as u64, &zeros[..len]).map_err(|e| WalError::io("zero", path, e))?;
        offset += len;
    }
    Ok(())
}

/// Takes an exclusive advisory lock on the directory so two logs never share it.
fn lock_directory(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| WalError::io("open", &path, e))?;
    use std::os::fd::AsRawFd;
    // A lock just released can still be held for a moment by a child forked by another thread
    // of this process (the descriptor lives on until the child's exec closes it), so a busy
    // lock is retried briefly before it is reported.
    for attempt in 0..=LOCK_RETRIES {
        // SAFETY: plain syscall on a valid, owned descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != ErrorKind::WouldBlock {
            return Err(WalError::io("lock", &path, error));
        }
        if attempt < LOCK_RETRIES {
            std::thread::sleep(std::time::Duration::from_millis(LOCK_RETRY_DELAY_MS));
        }
    }
    Err(WalError::Locked { path })
}
