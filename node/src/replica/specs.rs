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

impl SpecSegment for FileSegment {
    fn read(&self, offset: u32, len: u32) -> &[u8] {
        let (offset, len) = (offset as usize, len as usize);
        assert!(offset + len <= self.map.len(), "a view lies inside its segment");
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
    /// A failure was logged (once: the store refuses quietly afterwards, counted by the
    /// state as specs kept in the heap).
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
        Ok(SpecStore { dir, segment_bytes, segments_max, head: None, made: Vec::new(), next_number: 0, warned: false })
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
        let path = self.dir.join(format!("{:012}.spec", self.next_number));
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
            match self.new_segment() {
                Ok(segment) => self.head = Some(segment),
                Err(error) => {
                    if !self.warned {
                        self.warned = true;
                        tracing::warn!(dir = %self.dir.display(), %error, "specs stay in memory: the spec store cannot grow");
                    }
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
        Some(SpecView::new(segment, offset, len))
    }

    fn repack_wanted(&self) -> bool {
        self.made.iter().filter_map(Weak::upgrade).any(|segment| segment.wants_repack())
    }
}

fn align_up(at: u64) -> u64 {
    at.next_multiple_of(SPEC_ALIGN_BYTES as u64)
}

/// Sizes the file and reserves its blocks, so a write through the mapping never meets a full
/// disk (which would be a SIGBUS, not an error).
fn reserve(file: &File, bytes: u64) -> std::io::Result<()> {
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
