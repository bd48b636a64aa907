//! A partition's spec store: job specs archived into file-backed mappings (`specs/` in the
//! partition's directory), so a pending job's URL, headers, body, labels and secrets cost
//! page cache the kernel can write back and evict, not heap. The store is rebuilt whenever
//! the replica opens (from the snapshot and the log, which are what is durable): its files
//! are scratch space, never read back across a restart, and removed at open.
//!
//! A segment is a preallocated file mapped shared; specs are appended at 16-byte alignment
//! and never written again. A segment is unmapped and deleted when the last spec in it is
//! gone (each view holds it); a sealed segment whose live bytes fell below a quarter asks to
//! be repacked (`State::repack_specs` copies its live specs to the head).

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use sundial_engine::spec::{SpecSegment, SpecSink, SpecView, SPEC_ALIGN_BYTES};

/// The directory in a partition's directory that holds its spec segments.
pub const SPECS_DIR: &str = "specs";
/// Each segment file starts with this header: magic (8), format version (4), zero (4).
const SEGMENT_MAGIC: [u8; 8] = *b"SUNDSPEC";
const SEGMENT_FORMAT: u32 = 1;
const SEGMENT_HEADER_BYTES: usize = 16;
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
/// Numbers the stores of this process, so a store's files never share a name with those of
/// an earlier store of the same partition whose segments are still mapped.
static STORES_OPENED: AtomicU64 = AtomicU64::new(0);

/// One segment file, mapped shared and writable.
struct FileSegment {
    map: memmap2::MmapRaw,
    path: PathBuf,
    /// Bytes of specs in it that some job still holds.
    live_bytes: AtomicU64,
    /// Bytes written (header included); final once sealed.
    written_bytes: AtomicU64,
    /// No more specs are appended (a newer segment is the head).
    sealed: AtomicBool,
}

// SAFETY: `SpecStore::put` is the only writer: it copies a record to a 16-byte-aligned offset
// of the page-aligned mapping past every record handed out, then makes its view; nothing
// writes there again, and the file is never truncated while mapped.
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
        self.sealed.load(Ordering::Relaxed)
            && self.live_bytes.load(Ordering::Relaxed) * 4 < self.written_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for FileSegment {
    fn drop(&mut self) {
        // Scratch space: the mapping goes with `self.map`; the file is not needed again.
        if let Err(error) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "removing a spec segment failed");
        }
    }
}

/// The store: the head segment specs are appended to, and every segment still held.
pub struct SpecStore {
    dir: PathBuf,
    segment_bytes: u64,
    segments_max: usize,
    head: Option<Arc<FileSegment>>,
    /// Segments made, including the head; dead ones are pruned when a segment is made.
    made: Vec<Weak<FileSegment>>,
    next_number: u64,
    /// This store's number in the process (its files' names start with it).
    instance: u64,
    /// Puts still to refuse before trying to make a segment again, after a failure.
    refusing_puts: u64,
    /// A failure was logged; the next one is logged only after a segment was made again.
    warned: bool,
}

impl SpecStore {
    /// A store in `partition_dir/specs`, emptied of whatever an earlier run left there.
    pub fn open(partition_dir: &Path, segment_bytes: u64, segments_max: usize) -> std::io::Result<SpecStore> {
        let dir = partition_dir.join(SPECS_DIR);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        fs::create_dir_all(&dir)?;
        let segment_bytes = segment_bytes.clamp(1 << 16, 1 << 30);
        let instance = STORES_OPENED.fetch_add(1, Ordering::Relaxed);
        Ok(SpecStore {
            dir,
            segment_bytes,
            segments_max,
            head: None,
            made: Vec::new(),
            next_number: 0,
            instance,
            refusing_puts: 0,
            warned: false,
        })
    }

    /// Segments still held (the head and every older one a job still uses).
    pub fn segments(&self) -> usize {
        self.made.iter().filter(|segment| segment.strong_count() > 0).count()
    }

    fn new_segment(&mut self) -> std::io::Result<Arc<FileSegment>> {
        self.made.retain(|segment| segment.strong_count() > 0);
        if self.made.len() >= self.segments_max {
            return Err(std::io::Error::other(format!(
                "{} spec segments of {} bytes are in use (the bound)",
                self.made.len(),
                self.segment_bytes
            )));
        }
        if let Some(free) = disk_free_bytes(&self.dir).filter(|free| *free < DISK_FREE_FLOOR_BYTES + self.segment_bytes)
        {
            return Err(std::io::Error::other(format!(
                "{free} bytes free on the disk, under the floor kept for the log"
            )));
        }
        let path = self.dir.join(format!("{:06}-{:012}.spec", self.instance, self.next_number));
        self.next_number += 1;
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        let made = reserve(&file, self.segment_bytes).and_then(|()| memmap2::MmapOptions::new().map_raw(&file));
        let map = match made {
            Ok(map) => map,
            Err(error) => {
                let _ = fs::remove_file(&path);
                return Err(error);
            }
        };
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        header[..8].copy_from_slice(&SEGMENT_MAGIC);
        header[8..12].copy_from_slice(&SEGMENT_FORMAT.to_le_bytes());
        // SAFETY: the mapping is at least a segment long (reserved above) and nothing else
        // refers to it yet.
        unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), map.as_mut_ptr(), SEGMENT_HEADER_BYTES) };
        let segment = Arc::new(FileSegment {
            map,
            path,
            live_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(SEGMENT_HEADER_BYTES as u64),
            sealed: AtomicBool::new(false),
        });
        self.made.push(Arc::downgrade(&segment));
        Ok(segment)
    }
}

impl SpecSink for SpecStore {
    fn put(&mut self, archive: &[u8]) -> Option<SpecView> {
        let len = u32::try_from(archive.len()).ok()?;
        if SEGMENT_HEADER_BYTES as u64 + u64::from(len) > self.segment_bytes {
            return None; // larger than a segment: it stays in the heap
        }
        let fits = |segment: &FileSegment| {
            let at = align_up(segment.written_bytes.load(Ordering::Relaxed));
            at + u64::from(len) <= segment.map.len() as u64
        };
        if !self.head.as_deref().is_some_and(fits) {
            if let Some(old) = self.head.take() {
                old.sealed.store(true, Ordering::Relaxed);
            }
            if self.refusing_puts > 0 {
                self.refusing_puts -= 1;
                return None;
            }
            match self.new_segment() {
                Ok(segment) => {
                    self.head = Some(segment);
                    self.warned = false;
                }
                Err(error) => {
                    if !self.warned {
                        self.warned = true;
                        tracing::warn!(dir = %self.dir.display(), %error, "specs stay in memory: the spec store cannot grow");
                    }
                    self.refusing_puts = PUTS_BEFORE_RETRY;
                    return None;
                }
            }
        }
        let head = self.head.as_ref()?;
        let at = align_up(head.written_bytes.load(Ordering::Relaxed));
        // SAFETY: `at..at + len` lies inside the mapping (`fits`) and past every record
        // handed out so far, so no view refers to it.
        unsafe {
            std::ptr::copy_nonoverlapping(archive.as_ptr(), head.map.as_mut_ptr().add(at as usize), archive.len())
        };
        head.written_bytes.store(at + u64::from(len), Ordering::Relaxed);
        let offset = u32::try_from(at).ok()?;
        let segment: Arc<dyn SpecSegment> = head.clone();
        // SAFETY: the record just copied there from `archive`, as `put` was given it.
        Some(unsafe { SpecView::new(segment, offset, len) })
    }

    fn repack_wanted(&self) -> bool {
        self.made.iter().filter_map(Weak::upgrade).any(|segment| segment.wants_repack())
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

/// Sizes the file and reserves its blocks, so a write through the mapping never meets a full
/// disk (which would be a SIGBUS, not an error).
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

    fn files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir.join(SPECS_DIR)).expect("specs dir").map(|entry| entry.expect("entry").path()).collect()
    }

    #[test]
    fn a_full_store_refuses_specs_and_a_segment_goes_with_its_last_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join(SPECS_DIR)).expect("dir");
        fs::write(dir.path().join(SPECS_DIR).join("left-over.spec"), b"from an earlier run").expect("write");
        let mut store = SpecStore::open(dir.path(), 1 << 16, 1).expect("open");
        assert!(files(dir.path()).is_empty(), "an earlier run's files are removed at open");
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
}
