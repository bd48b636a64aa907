//! A partition's spec store: job specs archived into file-backed mappings (`specs/` in the
//! partition's directory), so a pending job's URL, headers, body, labels and secrets cost
//! page cache the kernel can write back and evict, not heap.
//!
//! A segment is a preallocated file mapped shared and read-only, named by its number; specs
//! are appended at 16-byte alignment by `pwrite`, a turn's specs in one write, and never
//! written again. (Writing through the mapping cost a page fault per new page, and, when the
//! pages were synced, a TLB flush of both cores per page: more than the write calls.)
//!
//! A linked snapshot (`State::link`) names the
//! segments its jobs' specs lie in with a length and a CRC32C: before it is written, each of
//! them is synced up to that length (only past what an earlier snapshot synced, the checksum
//! carried on from there, since nothing below is ever written again). So the segments the
//! newest snapshot lists are durable, and at open they are mapped and checked, not read into
//! memory; every other file in the directory (specs put after that snapshot, which the log
//! replays) is removed. A segment is unmapped and deleted when the last spec in it is gone
//! and no adopted snapshot lists it (each view, and the partition for its snapshot, holds
//! it); a sealed segment whose live bytes fell below a quarter asks to be repacked
//! (`State::repack_specs` copies its live specs to the head).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use sundial_engine::spec::{SpecSegment, SpecSink, SpecView, SPEC_ALIGN_BYTES};
use sundial_engine::state::LinkedSegment;

/// The directory in a partition's directory that holds its spec segments.
pub const SPECS_DIR: &str = "specs";
/// Each segment file starts with this header: magic (8), format version (4), zero (4).
const SEGMENT_MAGIC: [u8; 8] = *b"SUNDSPEC";
/// Format 2: segments named by number and kept across restarts (format 1's were scratch).
const SEGMENT_FORMAT: u32 = 2;
const SEGMENT_HEADER_BYTES: usize = 16;
const SEGMENT_SUFFIX: &str = ".spec";
/// A segment file's size: small enough that one long-lived spec pins little disk before a
/// repack moves it, large enough that new files are rare (one per ~10k small specs).
pub const SEGMENT_BYTES_DEFAULT: u64 = 8 << 20;
/// Live segments at most (× segment size = disk at most); beyond, specs stay in the heap.
pub const SEGMENTS_MAX_DEFAULT: usize = 8192;
/// No segment is made while the disk has less free space than this: the log, which must not
/// run out, comes first (specs then stay in the heap).
pub(super) const DISK_FREE_FLOOR_BYTES: u64 = 1 << 30;
/// After a segment could not be made, puts go on refusing this many specs before trying
/// again (a failing disk is not retried on every create).
const PUTS_BEFORE_RETRY: u64 = 4096;

/// One segment file, mapped shared and read-only (the store writes the head's through a
/// descriptor it holds; sealed segments keep none open).
pub struct FileSegment {
    map: memmap2::MmapRaw,
    path: PathBuf,
    number: u64,
    /// The file's inode: a segment deletes its file only if the name still names it.
    inode: u64,
    /// Bytes of specs in it that some job still holds.
    live_bytes: AtomicU64,
    /// Bytes written (header included); final once sealed. Stored with Release after the
    /// bytes are copied, so a thread that loads it (Acquire) sees them.
    written_bytes: AtomicU64,
    /// No more specs are appended (a newer segment is the head).
    sealed: AtomicBool,
    /// How far the file is known durable, and the CRC32C of its bytes up to there.
    durable: Mutex<Durable>,
    /// Whether its store is still open: a segment that goes after its store closed (the
    /// partition going away) keeps its file, which a snapshot may list.
    store_open: Arc<AtomicBool>,
}

#[derive(Clone, Copy)]
struct Durable {
    len_bytes: u64,
    crc32c: u32,
}

// SAFETY: `SpecStore::put_many` is the only writer: it writes records to 16-byte-aligned
// offsets of the file past every record handed out, then makes their views; nothing writes
// there again, and the file is never truncated while mapped. A segment opened from a
// snapshot's list is never written below the length listed (it is sealed).
unsafe impl SpecSegment for FileSegment {
    fn read(&self, offset: u32, len: u32) -> &[u8] {
        let (offset, len) = (offset as usize, len as usize);
        assert!(offset + len <= self.map.len(), "a view lies inside its segment");
        debug_assert_eq!(offset % SPEC_ALIGN_BYTES, 0, "records are aligned");
        // SAFETY: `offset..offset + len` is a record `put` wrote before handing out the view
        // (inside the mapping, checked above); records are never written again, and the
        // mapping lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset), len) }
    }

    fn retain(&self, len: u32) {
        self.live_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
    }

    fn release(&self, len: u32) {
        self.live_bytes.fetch_sub(u64::from(len), Ordering::Relaxed);
    }

    fn wants_repack(&self) -> bool {
        // One with nothing live has nothing to move (a snapshot may still hold it).
        let live_bytes = self.live_bytes.load(Ordering::Relaxed);
        self.sealed.load(Ordering::Relaxed)
            && live_bytes > 0
            && live_bytes * 4 < self.written_bytes.load(Ordering::Relaxed)
    }

    fn number(&self) -> u64 {
        self.number
    }
}

impl FileSegment {
    /// Syncs the segment's written bytes to disk (past what is already durable) and returns
    /// them as a snapshot lists them. Called off the shard (the snapshot's thread) while the
    /// shard may append further: only bytes written before the call are covered.
    pub fn make_durable(&self) -> std::io::Result<LinkedSegment> {
        let written = self.written_bytes.load(Ordering::Acquire);
        let mut durable = self.durable.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if written > durable.len_bytes {
            let from = durable.len_bytes as usize;
            let len = (written - durable.len_bytes) as usize;
            self.map.flush_range(from, len)?;
            // SAFETY: `from..from + len` lies below `written`, bytes the shard copied before
            // it stored `written` (Release, loaded above with Acquire) and never writes again.
            let bytes = unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(from), len) };
            *durable = Durable { len_bytes: written, crc32c: crc32c::crc32c_append(durable.crc32c, bytes) };
        }
        Ok(LinkedSegment { number: self.number, len_bytes: durable.len_bytes, crc32c: durable.crc32c })
    }

    fn map_file(path: &Path, file: &File, number: u64, store_open: Arc<AtomicBool>) -> std::io::Result<FileSegment> {
        use std::os::unix::fs::MetadataExt;
        let map = memmap2::MmapOptions::new().map_raw_read_only(file)?;
        Ok(FileSegment {
            map,
            path: path.to_path_buf(),
            number,
            inode: file.metadata()?.ino(),
            live_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(SEGMENT_HEADER_BYTES as u64),
            sealed: AtomicBool::new(false),
            durable: Mutex::new(Durable { len_bytes: 0, crc32c: 0 }),
            store_open,
        })
    }
}

impl Drop for FileSegment {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if !self.store_open.load(Ordering::Acquire) {
            return; // the partition went away: the next open decides by the snapshot's list
        }
        // No spec and no adopted snapshot needs it. The name may since name another file (a
        // store opened again in this process): that one is not this segment's to remove.
        match fs::metadata(&self.path) {
            Ok(metadata) if metadata.ino() == self.inode => {}
            Ok(_) => return,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "a spec segment's file cannot be looked at");
                return;
            }
        }
        if let Err(error) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "removing a spec segment failed");
        }
    }
}

/// The segments of a store that still live, by number (what a snapshot's thread syncs), and
/// whether the store is open for deleting files.
#[derive(Clone, Default)]
pub struct SegmentFiles {
    segments: Arc<Mutex<BTreeMap<u64, Weak<FileSegment>>>>,
    /// Set by `activate` once the partition opened (see `FileSegment::store_open`).
    open: Arc<AtomicBool>,
    /// Files no snapshot lists, found at open: removed by `activate`.
    stale: Arc<Mutex<Vec<PathBuf>>>,
}

impl SegmentFiles {
    /// The segment of this number, if it still lives.
    pub fn get(&self, number: u64) -> Option<Arc<FileSegment>> {
        self.lock().get(&number).and_then(Weak::upgrade)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Weak<FileSegment>>> {
        self.segments.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The partition opened (its snapshot restored, its log replayed): from now on a segment
    /// no job and no snapshot needs is deleted, and so are the files no snapshot listed at
    /// open. Until then nothing is deleted, so an open that fails (an unknown format, a
    /// damaged record, a replay that stops) leaves the directory as it found it.
    pub fn activate(&self) {
        self.open.store(true, Ordering::Release);
        let stale = std::mem::take(&mut *self.stale.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for path in stale {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => tracing::warn!(path = %path.display(), %error, "removing a stale spec segment failed"),
            }
        }
    }

    /// Syncs the directory, so the names of segments made since the last call survive.
    pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
        File::open(dir.join(SPECS_DIR))?.sync_all()
    }
}

/// The store: the head segment specs are appended to, and every segment still held.
pub struct SpecStore {
    dir: PathBuf,
    segment_bytes: u64,
    segments_max: usize,
    head: Option<Arc<FileSegment>>,
    /// The head's file, open for writing (only the head's is kept open).
    head_file: Option<File>,
    /// Segments made or opened, including the head, shared with snapshots' threads; dead
    /// ones are pruned when a segment is made.
    files: SegmentFiles,
    next_number: u64,
    /// Puts still to refuse before trying to make a segment again, after a failure.
    refusing_puts: u64,
    /// A failure was logged; the next one is logged only after a segment was made again.
    warned: bool,
}

impl Drop for SpecStore {
    fn drop(&mut self) {
        // The partition goes: its segments keep their files (see `FileSegment::store_open`).
        self.files.open.store(false, Ordering::Release);
    }
}

/// A store opened on the segments a snapshot lists.
pub struct OpenedStore {
    pub store: SpecStore,
    /// The listed segments, by number, with the length listed (for `State::restore_linked`).
    pub listed: BTreeMap<u64, (Arc<dyn SpecSegment>, u64)>,
    /// The same segments, which the partition holds as long as that snapshot is its newest.
    pub held: Vec<Arc<FileSegment>>,
}

/// A segment file's number, from its name.
fn number_of(name: &str) -> Option<u64> {
    name.strip_suffix(SEGMENT_SUFFIX)?.parse().ok()
}

/// The file name of segment `number`.
pub(crate) fn segment_name(number: u64) -> String {
    format!("{number:016}{SEGMENT_SUFFIX}")
}

impl SpecStore {
    /// A store in `partition_dir/specs` holding the segments `listed` (the newest snapshot's
    /// list), each checked against its length and CRC32C; every other file there is removed
    /// once the partition opened (`SegmentFiles::activate`). A listed segment missing or
    /// damaged is an error naming it: the snapshot is not whole.
    pub fn open(
        partition_dir: &Path,
        segment_bytes: u64,
        segments_max: usize,
        listed: &[LinkedSegment],
    ) -> std::io::Result<OpenedStore> {
        let dir = partition_dir.join(SPECS_DIR);
        fs::create_dir_all(&dir)?;
        let segment_bytes = segment_bytes.clamp(1 << 16, 1 << 30);
        let wanted: BTreeMap<u64, LinkedSegment> = listed.iter().map(|segment| (segment.number, *segment)).collect();
        let mut highest = None;
        let files = SegmentFiles::default();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let number = entry.file_name().to_str().and_then(number_of);
            highest = highest.max(number);
            if !number.is_some_and(|number| wanted.contains_key(&number)) {
                // Specs put after the newest snapshot (the log replays them), or what an
                // older build left: removed once the partition opened.
                files.stale.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(entry.path());
            }
        }
        let mut opened = BTreeMap::new();
        let mut held = Vec::new();
        for segment in wanted.values() {
            let file_segment = Arc::new(open_listed(&dir, segment, files.open.clone())?);
            files.lock().insert(segment.number, Arc::downgrade(&file_segment));
            let as_segment: Arc<dyn SpecSegment> = file_segment.clone();
            opened.insert(segment.number, (as_segment, segment.len_bytes));
            held.push(file_segment);
        }
        let next_number = highest.max(wanted.keys().next_back().copied()).map_or(0, |n| n + 1);
        let store = SpecStore {
            dir,
            segment_bytes,
            segments_max,
            head: None,
            head_file: None,
            files,
            next_number,
            refusing_puts: 0,
            warned: false,
        };
        Ok(OpenedStore { store, listed: opened, held })
    }

    /// The store's segments, shared (a snapshot's thread syncs them).
    pub fn files(&self) -> SegmentFiles {
        self.files.clone()
    }

    /// Segments still held (the head and every older one a job or a snapshot still uses).
    pub fn segments(&self) -> usize {
        self.files.lock().values().filter(|segment| segment.strong_count() > 0).count()
    }

    fn new_segment(&mut self) -> std::io::Result<(Arc<FileSegment>, File)> {
        let mut files = self.files.lock();
        files.retain(|_, segment| segment.strong_count() > 0);
        if files.len() >= self.segments_max {
            return Err(std::io::Error::other(format!(
                "{} spec segments of {} bytes are in use (the bound)",
                files.len(),
                self.segment_bytes
            )));
        }
        if let Some(free) = disk_free_bytes(&self.dir).filter(|free| *free < DISK_FREE_FLOOR_BYTES + self.segment_bytes)
        {
            return Err(std::io::Error::other(format!(
                "{free} bytes free on the disk, under the floor kept for the log"
            )));
        }
        let number = self.next_number;
        let path = self.dir.join(segment_name(number));
        self.next_number += 1;
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        let made = reserve(&file, self.segment_bytes)
            .and_then(|()| FileSegment::map_file(&path, &file, number, self.files.open.clone()));
        let segment = match made {
            Ok(segment) => segment,
            Err(error) => {
                let _ = fs::remove_file(&path);
                return Err(error);
            }
        };
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        header[..8].copy_from_slice(&SEGMENT_MAGIC);
        header[8..12].copy_from_slice(&SEGMENT_FORMAT.to_le_bytes());
        if let Err(error) = file.write_all_at(&header, 0) {
            drop(segment);
            let _ = fs::remove_file(&path);
            return Err(error);
        }
        let segment = Arc::new(segment);
        files.insert(number, Arc::downgrade(&segment));
        Ok((segment, file))
    }
}

/// Maps a segment a snapshot lists, sealed at the length listed, after checking its header
/// and the CRC32C of its bytes up to there.
fn open_listed(dir: &Path, listed: &LinkedSegment, store_open: Arc<AtomicBool>) -> std::io::Result<FileSegment> {
    let path = dir.join(segment_name(listed.number));
    let damaged = |what: String| {
        std::io::Error::other(format!(
            "spec segment {} that the newest snapshot lists {what}; the snapshot cannot be restored without it",
            path.display()
        ))
    };
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Err(damaged("is missing".into())),
        Err(error) => return Err(error),
    };
    let size = file.metadata()?.len();
    if size < listed.len_bytes || listed.len_bytes < SEGMENT_HEADER_BYTES as u64 {
        return Err(damaged(format!("is {size} bytes long, not the {} listed", listed.len_bytes)));
    }
    let segment = FileSegment::map_file(&path, &file, listed.number, store_open)?;
    let len = listed.len_bytes as usize;
    // SAFETY: the file is at least `len` bytes long (checked above) and mapped whole.
    let bytes = unsafe { std::slice::from_raw_parts(segment.map.as_ptr(), len) };
    let format = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if bytes[..8] != SEGMENT_MAGIC || format != SEGMENT_FORMAT {
        return Err(damaged(format!(
            "is not a spec segment of format {SEGMENT_FORMAT} (format {format}): run the build that wrote the data"
        )));
    }
    let crc32c = crc32c::crc32c(bytes);
    if crc32c != listed.crc32c {
        return Err(damaged(format!(
            "does not match its checksum (CRC32C {crc32c:#010x} of its first {len} bytes, {:#010x} listed)",
            listed.crc32c
        )));
    }
    segment.written_bytes.store(listed.len_bytes, Ordering::Release);
    segment.sealed.store(true, Ordering::Relaxed);
    *segment.durable.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
        Durable { len_bytes: listed.len_bytes, crc32c };
    Ok(segment)
}

/// Specs placed in one segment and not yet written: their bytes as they will lie in the
/// file from `start`, padding included.
#[derive(Default)]
struct Run {
    segment: Option<Arc<FileSegment>>,
    start: u64,
    bytes: Vec<u8>,
    /// Each spec's position in `put_many`'s list, and its length.
    specs: Vec<(usize, u32)>,
}

impl Run {
    /// Where the next byte would lie in the segment.
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

impl SpecStore {
    /// Where a spec of `len` bytes goes: in the run's segment, or, when it is full, at the
    /// start of a new head (the full run written first). `None`: no segment can be made.
    fn place(&mut self, len: u32, run: &mut Run, views: &mut [Option<SpecView>]) -> Option<u64> {
        let fits = |segment: &FileSegment, from: u64| align_up(from) + u64::from(len) <= segment.map.len() as u64;
        if run.segment.is_none() {
            if let Some(head) = self.head.clone() {
                let from = head.written_bytes.load(Ordering::Relaxed);
                *run = Run { segment: Some(head), start: from, ..Run::default() };
            }
        }
        if !run.segment.as_deref().is_some_and(|segment| fits(segment, run.end())) {
            self.write_run(std::mem::take(run), views);
            let head = self.new_head()?;
            let from = head.written_bytes.load(Ordering::Relaxed);
            *run = Run { segment: Some(head), start: from, ..Run::default() };
        }
        Some(align_up(run.end()))
    }

    /// Seals the head and makes a new one, unless segments are being refused after a failure.
    fn new_head(&mut self) -> Option<Arc<FileSegment>> {
        if let Some(old) = self.head.take() {
            old.sealed.store(true, Ordering::Relaxed);
        }
        self.head_file = None;
        if self.refusing_puts > 0 {
            self.refusing_puts -= 1;
            return None;
        }
        match self.new_segment() {
            Ok((segment, file)) => {
                self.head = Some(segment.clone());
                self.head_file = Some(file);
                self.warned = false;
                Some(segment)
            }
            Err(error) => {
                self.refused(&error);
                None
            }
        }
    }

    fn refused(&mut self, error: &std::io::Error) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(dir = %self.dir.display(), %error, "specs stay in memory: the spec store cannot grow");
        }
        self.refusing_puts = PUTS_BEFORE_RETRY;
    }

    /// Writes a run's bytes and sets the views of its specs in `views`; when the write fails,
    /// none (those specs stay in the heap) and the segment takes no more.
    fn write_run(&mut self, run: Run, views: &mut [Option<SpecView>]) {
        let Some(segment) = run.segment else { return };
        if run.specs.is_empty() {
            return;
        }
        let is_head = self.head.as_ref().is_some_and(|head| Arc::ptr_eq(head, &segment));
        let written = match self.head_file.as_ref().filter(|_| is_head) {
            Some(file) => file.write_all_at(&run.bytes, run.start),
            None => Err(std::io::Error::other("specs placed in a segment that is no longer the head")),
        };
        if let Err(error) = written {
            segment.sealed.store(true, Ordering::Relaxed);
            if is_head {
                self.head = None;
                self.head_file = None;
            }
            self.refused(&error);
            return;
        }
        let mut at = run.start;
        for (position, len) in run.specs {
            at = align_up(at);
            views[position] = u32::try_from(at).ok().map(|offset| {
                let as_segment: Arc<dyn SpecSegment> = segment.clone();
                // SAFETY: the record was just written at `offset` from the archive `put_many`
                // was given, and nothing writes there again.
                unsafe { SpecView::new(as_segment, offset, len) }
            });
            at += u64::from(len);
        }
        // Release: a thread that loads it (Acquire) sees the bytes below it.
        segment.written_bytes.store(run.start + run.bytes.len() as u64, Ordering::Release);
    }
}

impl SpecSink for SpecStore {
    fn put(&mut self, archive: &[u8]) -> Option<SpecView> {
        self.put_many(&[archive]).pop().flatten()
    }

    /// Places the archives one after another in the head segment (a new one when it is
    /// full) and writes each segment's share with one `pwrite`; the views are made once
    /// their bytes are written.
    fn put_many(&mut self, archives: &[&[u8]]) -> Vec<Option<SpecView>> {
        // Larger than a segment, or no room: `None`, and that spec stays in the heap.
        let mut views: Vec<Option<SpecView>> = archives.iter().map(|_| None).collect();
        let mut run = Run::default();
        for (position, archive) in archives.iter().enumerate() {
            let Some(len) = u32::try_from(archive.len())
                .ok()
                .filter(|len| SEGMENT_HEADER_BYTES as u64 + u64::from(*len) <= self.segment_bytes)
            else {
                continue;
            };
            if let Some(at) = self.place(len, &mut run, &mut views) {
                let padding = (at - run.end()) as usize;
                run.bytes.resize(run.bytes.len() + padding, 0);
                run.bytes.extend_from_slice(archive);
                run.specs.push((position, len));
            }
        }
        self.write_run(run, &mut views);
        views
    }

    fn repack_wanted(&self) -> bool {
        self.files.lock().values().filter_map(Weak::upgrade).any(|segment| segment.wants_repack())
    }
}

/// Bytes free for unprivileged writers on the file system of `dir` (`None`: unknown).
pub(super) fn disk_free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: a plain syscall with a NUL-terminated path and a buffer of its result type.
        if unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: statvfs succeeded, so it filled the buffer.
        let stats = unsafe { stats.assume_init() };
        Some(stats.f_bavail.saturating_mul(stats.f_frsize))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        None
    }
}

fn align_up(at: u64) -> u64 {
    at.next_multiple_of(SPEC_ALIGN_BYTES as u64)
}

/// Sizes the file and reserves its blocks, so its writes never meet a full disk (through a
/// writable mapping, as tombstone chunks are written, that would be a SIGBUS, not an error).
pub(super) fn reserve(file: &File, bytes: u64) -> std::io::Result<()> {
    file.set_len(bytes)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(bytes).map_err(|_| std::io::Error::other("segment size too large"))?;
        // SAFETY: a plain syscall on an open descriptor.
        let result = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if result != 0 {
            return Err(std::io::Error::from_raw_os_error(result));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_engine::spec::SpecCell;

    fn files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir.join(SPECS_DIR)).expect("specs dir").map(|entry| entry.expect("entry").path()).collect()
    }

    #[test]
    fn a_full_store_refuses_specs_and_a_segment_goes_with_its_last_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join(SPECS_DIR)).expect("dir");
        fs::write(dir.path().join(SPECS_DIR).join("left-over.spec"), b"from an earlier run").expect("write");
        let mut store = SpecStore::open(dir.path(), 1 << 16, 1, &[]).expect("open").store;
        assert_eq!(files(dir.path()).len(), 1, "nothing is removed before the partition opened");
        store.files().activate();
        assert!(files(dir.path()).is_empty(), "files no snapshot lists are removed once it did");
        let record: Vec<u8> = (0..1_000u32).map(|i| i as u8).collect();
        let mut views = Vec::new();
        while let Some(view) = store.put(&record) {
            assert_eq!(view.bytes(), record.as_slice(), "a spec reads back as it was put");
            assert_eq!(view.bytes().as_ptr().align_offset(SPEC_ALIGN_BYTES), 0, "records are aligned");
            views.push(view);
            assert!(views.len() <= 65, "a 64 KiB segment holds 65 records of 1,000 bytes (1,008 aligned)");
        }
        assert!(views.len() >= 60, "{}", views.len());
        let [file] = files(dir.path()).try_into().expect("one segment file");
        let header = fs::read(&file).expect("read");
        assert_eq!((&header[..8], &header[8..12]), (&SEGMENT_MAGIC[..], &SEGMENT_FORMAT.to_le_bytes()[..]));
        assert_eq!(file.file_name().and_then(|name| name.to_str()), Some("0000000000000000.spec"));
        // The bound (one segment) is reached: refused, so the caller keeps the spec.
        assert!(store.put(&record).is_none());
        views.clear();
        assert!(files(dir.path()).is_empty(), "the segment went with its last spec");
        // A failure is not retried on every put, only after PUTS_BEFORE_RETRY of them (the
        // refused put above was the first).
        for _ in 1..PUTS_BEFORE_RETRY {
            assert!(store.put(&record).is_none());
        }
        let view = store.put(&record).expect("a new segment once the old one is gone");
        assert_eq!((view.bytes(), files(dir.path()).len()), (record.as_slice(), 1));
    }

    #[test]
    fn specs_put_together_read_back_in_order_across_segments_and_one_too_large_stays_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SpecStore::open(dir.path(), 1 << 16, 4, &[]).expect("open").store;
        store.files().activate();
        // 100 records of 1,000 to 1,099 bytes do not fit one 64 KiB segment; one of 70,000
        // bytes fits none.
        let records: Vec<Vec<u8>> = (0..100u32).map(|i| vec![i as u8; 1_000 + i as usize]).collect();
        let too_large = vec![7u8; 70_000];
        let mut archives: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        archives.insert(40, &too_large);
        let views = store.put_many(&archives);
        assert_eq!(views.len(), 101);
        assert!(views[40].is_none(), "larger than a segment: left in the heap");
        for (archive, view) in archives.iter().zip(&views).filter(|(_, view)| view.is_some()) {
            let view = view.as_ref().expect("filtered");
            assert_eq!(view.bytes(), *archive, "each spec reads back as it was given, in its place");
            assert_eq!(view.bytes().as_ptr().align_offset(SPEC_ALIGN_BYTES), 0, "records are aligned");
        }
        assert_eq!(views.iter().flatten().count(), 100);
        assert_eq!(files(dir.path()).len(), 2, "the head filled and a second segment took the rest");
        // What a snapshot syncs covers every spec written, and the file holds their bytes.
        let segment = store.files().get(0).expect("the first segment lives");
        let durable = segment.make_durable().expect("syncs");
        let file = fs::read(dir.path().join(SPECS_DIR).join(segment_name(0))).expect("read");
        assert_eq!(durable.crc32c, crc32c::crc32c(&file[..durable.len_bytes as usize]));
        assert!(durable.len_bytes > 60_000, "{}", durable.len_bytes);
    }

    /// Puts the spec of a job `id` in `store` as the state would, and returns its view.
    fn put_spec(store: &mut SpecStore, id: &str) -> SpecView {
        let request = serde_json::json!({"id": id, "run_at": 2_000_000_000_000u64, "url": "https://example.com/hook"});
        let spec = sundial_engine::request::parse_job_request(&request.to_string(), 1_000, "unused").expect("valid");
        let mut cell = SpecCell::new(spec);
        cell.store_in(store);
        match cell {
            SpecCell::Stored(view) => view,
            _ => panic!("the store took the spec"),
        }
    }

    #[test]
    fn listed_segments_survive_a_reopen_checked_and_a_damaged_or_missing_one_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SpecStore::open(dir.path(), 1 << 16, 8, &[]).expect("open").store;
        store.files().activate();
        let first = put_spec(&mut store, "job-a");
        let files_of_store = store.files();
        let listed = files_of_store.get(0).expect("segment 0").make_durable().expect("durable");
        assert_eq!(listed.len_bytes, u64::from(first.reference().offset + first.reference().len));
        // Put after the snapshot's list: durable only at the next one, so the list stays.
        let later = put_spec(&mut store, "job-b");
        assert_eq!(later.reference().segment, 0, "the same head segment");
        let again = files_of_store.get(0).expect("segment 0").make_durable().expect("durable");
        assert!(again.len_bytes > listed.len_bytes, "the checksum carries on past the first list");
        let whole = fs::read(dir.path().join(SPECS_DIR).join(segment_name(0))).expect("read");
        assert_eq!(
            again.crc32c,
            crc32c::crc32c(&whole[..again.len_bytes as usize]),
            "an extended CRC is the whole one"
        );
        let reference = first.reference();
        drop((first, later, store));
        // A crash leaves the file (a snapshot lists it); and a stray file beside it.
        fs::write(dir.path().join(SPECS_DIR).join(segment_name(7)), b"specs put after the snapshot").expect("write");
        let opened = SpecStore::open(dir.path(), 1 << 16, 8, &[listed]).expect("reopened");
        assert_eq!(files(dir.path()).len(), 2, "nothing is removed before the partition opened");
        opened.store.files().activate();
        assert_eq!(files(dir.path()).len(), 1, "what the list does not name is removed");
        let (segment, len) = opened.listed.get(&0).expect("listed").clone();
        let view = SpecView::resolve(segment, len, reference).expect("resolves");
        assert_eq!(SpecCell::Stored(view).id(), "job-a");
        let mut store = opened.store;
        let next = put_spec(&mut store, "job-c");
        assert_eq!(next.reference().segment, 8, "a new head, numbered past every file seen");
        drop((next, store, opened.held, opened.listed));

        // One flipped byte inside the listed length: refused, naming the file and the sums.
        let path = dir.path().join(SPECS_DIR).join(segment_name(0));
        let mut bytes = fs::read(&path).expect("read");
        bytes[SEGMENT_HEADER_BYTES + 3] ^= 0x40;
        fs::write(&path, &bytes).expect("write");
        let error = SpecStore::open(dir.path(), 1 << 16, 8, &[listed]).err().expect("damaged").to_string();
        assert!(error.contains(&segment_name(0)) && error.contains("checksum"), "{error}");
        fs::remove_file(&path).expect("remove");
        let error = SpecStore::open(dir.path(), 1 << 16, 8, &[listed]).err().expect("missing").to_string();
        assert!(error.contains("is missing"), "{error}");
    }
}
