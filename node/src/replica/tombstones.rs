//! A partition's tombstone store: the dedup window's tombstones (24 bytes per deleted or
//! expired id) in chunks of file-backed mappings (`tombstones/` in the partition's
//! directory), so a node that finishes 1,000 jobs a second for a day holds them in page
//! cache the kernel can write back and evict, not in its heap. Like the spec store it is
//! scratch space rebuilt whenever the replica opens (tombstones are in the snapshot and the
//! log): files are never read back across a restart, removed at open and when their chunk
//! goes (its records all left).

use super::specs::{disk_free_bytes, reserve, DISK_FREE_FLOOR_BYTES};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use sundial_engine::tombstones::{Tombstone, TombstoneChunk, TombstoneStore, TOMBSTONES_PER_CHUNK};

/// The directory in a partition's directory that holds its tombstone chunks.
pub const TOMBSTONES_DIR: &str = "tombstones";
/// Each chunk file starts with this header: magic (8), format version (4), zero (4); the
/// records follow, 8-byte aligned in the page-aligned mapping.
const CHUNK_MAGIC: [u8; 8] = *b"SUNDTOMB";
const CHUNK_FORMAT: u32 = 1;
const CHUNK_HEADER_BYTES: usize = 16;
const CHUNK_BYTES: usize = CHUNK_HEADER_BYTES + TOMBSTONES_PER_CHUNK * std::mem::size_of::<Tombstone>();
/// Chunks held at once, at most: the state keeps 1M live tombstones per partition (31
/// chunks) and a remove leaves dead ones at most max(live, a chunk) (about 64 chunks in all,
/// and a snapshot's install briefly holds a second set); past the bound, chunks come from
/// the heap.
const CHUNKS_MAX: usize = 128;
/// Numbers the stores of this process, so a store's files never share a name with those of
/// an earlier store of the same partition whose chunks are still mapped.
static STORES_OPENED: AtomicU64 = AtomicU64::new(0);

/// One chunk file, mapped shared and writable; removed when the chunk goes.
struct FileChunk {
    map: memmap2::MmapMut,
    path: PathBuf,
    held: Arc<AtomicUsize>,
}

impl TombstoneChunk for FileChunk {
    fn records(&self) -> &[Tombstone] {
        // SAFETY: the mapping is `CHUNK_BYTES` long (reserved at creation) and page-aligned,
        // so the records past the header are inside it and 8-byte aligned; `Tombstone` is
        // `repr(C)` of three `u64`s, so any bytes are a record; the mapping lives as long as
        // `self` and is written only through `records_mut`, which borrows `self` mutably.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(CHUNK_HEADER_BYTES).cast::<Tombstone>(),
                TOMBSTONES_PER_CHUNK,
            )
        }
    }

    fn records_mut(&mut self) -> &mut [Tombstone] {
        // SAFETY: as in `records`; `&mut self` makes this the only view of the records.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.map.as_mut_ptr().add(CHUNK_HEADER_BYTES).cast::<Tombstone>(),
                TOMBSTONES_PER_CHUNK,
            )
        }
    }
}

impl Drop for FileChunk {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
        if let Err(error) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "removing a tombstone chunk failed");
        }
    }
}

/// The store: makes chunk files in its directory.
pub struct TombstoneFiles {
    dir: PathBuf,
    next_number: u64,
    /// This store's number in the process (its files' names start with it).
    instance: u64,
    /// Chunks made and not yet gone.
    held: Arc<AtomicUsize>,
    /// A failure was logged; the next one is logged only after a chunk was made again.
    warned: bool,
}

impl TombstoneFiles {
    /// A store in `partition_dir/tombstones`, emptied of whatever an earlier run left there.
    pub fn open(partition_dir: &Path) -> std::io::Result<TombstoneFiles> {
        let dir = partition_dir.join(TOMBSTONES_DIR);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        fs::create_dir_all(&dir)?;
        let instance = STORES_OPENED.fetch_add(1, Ordering::Relaxed);
        Ok(TombstoneFiles { dir, next_number: 0, instance, held: Arc::new(AtomicUsize::new(0)), warned: false })
    }

    fn new_chunk(&mut self) -> std::io::Result<FileChunk> {
        let held = self.held.load(Ordering::Relaxed);
        if held >= CHUNKS_MAX {
            return Err(std::io::Error::other(format!("{held} chunks are in use (the bound)")));
        }
        let floor = DISK_FREE_FLOOR_BYTES + CHUNK_BYTES as u64;
        if let Some(free) = disk_free_bytes(&self.dir).filter(|free| *free < floor) {
            return Err(std::io::Error::other(format!(
                "{free} bytes free on the disk, under the floor kept for the log"
            )));
        }
        let path = self.dir.join(format!("{:06}-{:012}.tomb", self.instance, self.next_number));
        self.next_number += 1;
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        // SAFETY (of `map_mut`): the file is this store's own, made just now, never truncated
        // while mapped (it is removed only when the chunk goes).
        let made = reserve(&file, CHUNK_BYTES as u64).and_then(|()| unsafe { memmap2::MmapMut::map_mut(&file) });
        let mut map = match made {
            Ok(map) => map,
            Err(error) => {
                let _ = fs::remove_file(&path);
                return Err(error);
            }
        };
        map[..8].copy_from_slice(&CHUNK_MAGIC);
        map[8..12].copy_from_slice(&CHUNK_FORMAT.to_le_bytes());
        self.held.fetch_add(1, Ordering::Relaxed);
        Ok(FileChunk { map, path, held: self.held.clone() })
    }
}

impl TombstoneStore for TombstoneFiles {
    fn chunk(&mut self) -> Option<Box<dyn TombstoneChunk>> {
        match self.new_chunk() {
            Ok(chunk) => {
                self.warned = false;
                Some(Box::new(chunk))
            }
            Err(error) => {
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(dir = %self.dir.display(), %error, "tombstones stay in memory: the store cannot grow");
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_engine::tombstones::Tombstones;

    fn files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir.join(TOMBSTONES_DIR)).expect("dir").map(|entry| entry.expect("entry").path()).collect()
    }

    #[test]
    fn tombstones_live_in_chunk_files_that_go_with_their_last_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join(TOMBSTONES_DIR)).expect("dir");
        fs::write(dir.path().join(TOMBSTONES_DIR).join("left-over.tomb"), b"from an earlier run").expect("write");
        let mut tombstones = Tombstones::default();
        tombstones.attach_store(Box::new(TombstoneFiles::open(dir.path()).expect("open")));
        assert!(files(dir.path()).is_empty(), "an earlier run's files are removed at open");
        let count = TOMBSTONES_PER_CHUNK as u64 + 5;
        for n in 1..=count {
            tombstones.push(Tombstone::new(u128::from(n) << 32 | 1, n));
        }
        assert_eq!((files(dir.path()).len(), tombstones.chunks_in_heap()), (2, 0), "two chunk files, none in the heap");
        let mut chunk = files(dir.path());
        chunk.sort();
        let bytes = fs::read(&chunk[0]).expect("read");
        assert_eq!(bytes.len(), CHUNK_BYTES);
        assert_eq!((&bytes[..8], &bytes[8..12]), (&CHUNK_MAGIC[..], &CHUNK_FORMAT.to_le_bytes()[..]));
        // The first record, as the kernel has it: finish time, then the digest's halves.
        assert_eq!(&bytes[16..24], &1u64.to_ne_bytes());
        assert_eq!(tombstones.finished_ms_of(u128::from(count) << 32 | 1), Some(count));
        for _ in 0..TOMBSTONES_PER_CHUNK {
            tombstones.pop_front().expect("held");
        }
        assert_eq!(files(dir.path()).len(), 1, "the first chunk's file went with its last record");
        assert!(tombstones.is_consistent() && tombstones.len() == 5);
    }
}
