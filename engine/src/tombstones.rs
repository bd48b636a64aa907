//! The dedup window's memory: digests of deleted and expired jobs' ids, with when each job
//! finished, in (finish time, digest) order. Records sit in fixed-size chunks that the shell
//! may place in file-backed mappings (`TombstoneStore`), so a remembered id costs page cache
//! the kernel can write back and evict, plus an 8-byte entry of a heap index.
//!
//! Order: the sequence is sorted whatever order tombstones come in, so it is a function of
//! which ids are remembered — replicas that applied the same commands, or restored snapshots
//! taken at different points (by this build or an earlier one, which kept the same order)
//! and applied the rest, hold the same sequence, and the oldest leaves first. A tombstone
//! that sorts after the ring's last goes at the back of the ring of chunks (most do); the
//! others — ties within a millisecond that come in another order than their digests',
//! expired jobs that finished before a job deleted since — wait aside in a bounded sorted
//! set in the heap, and are merged into the ring's tail when it fills (costing the tail
//! younger than the oldest of them, not the ring). One forgotten
//! in the middle of the ring (its id was used again) is zeroed where it lies and leaves the
//! index; everything that reads the sequence (iteration, snapshots, digests, counts,
//! equality) skips dead records, so where they lie changes nothing replicated. Dead records
//! leave when they reach the front, or in a rewrite once they outnumber both the live ones
//! and a chunk.

use crate::table::IndexEntry;
use hashbrown::HashTable;
use rkyv::rancor::Fallible;
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::with::{ArchiveWith, DeserializeWith, SerializeWith};
use rkyv::Place;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;

/// Records per chunk: 768 KiB of 24-byte records.
pub const TOMBSTONES_PER_CHUNK: usize = 32 * 1024;

/// A deleted or expired job's id as a 128-bit digest (SHA-256, cut: ids a client chooses
/// cannot be made to collide), and when the job finished. 24 bytes, three `u64`s: any bit
/// pattern is a record (all zeros is a dead one), so a store may hand out any memory.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[repr(C)]
pub struct Tombstone {
    finished_ms: u64,
    digest_high: u64,
    digest_low: u64,
}

impl Tombstone {
    pub fn new(digest: u128, finished_ms: u64) -> Tombstone {
        Tombstone { finished_ms, digest_high: (digest >> 64) as u64, digest_low: digest as u64 }
    }

    pub fn digest(&self) -> u128 {
        (u128::from(self.digest_high) << 64) | u128::from(self.digest_low)
    }

    pub fn finished_ms(&self) -> u64 {
        self.finished_ms
    }

    /// A forgotten record (a digest of all zeros: SHA-256 gives one with odds of 2^-128).
    fn is_dead(&self) -> bool {
        self.digest_high == 0 && self.digest_low == 0
    }
}

/// Where chunks of tombstones are kept instead of the heap (the shell's; the core does no
/// I/O). Scratch space: the records are rebuilt from snapshots and the log on every start.
pub trait TombstoneStore: Send {
    /// Memory for `TOMBSTONES_PER_CHUNK` records, or `None` when the store cannot make it
    /// (the chunk then lives in the heap: more memory, nothing lost).
    fn chunk(&mut self) -> Option<Box<dyn TombstoneChunk>>;
}

/// One chunk's records: exactly `TOMBSTONES_PER_CHUNK` of them, whatever they hold.
pub trait TombstoneChunk: Send + Sync {
    fn records(&self) -> &[Tombstone];
    fn records_mut(&mut self) -> &mut [Tombstone];
    /// The chunk is in the heap (not the store's).
    fn in_heap(&self) -> bool {
        false
    }
}

/// A chunk in the heap (no store attached, or the store could not make one).
struct HeapChunk(Box<[Tombstone]>);

impl TombstoneChunk for HeapChunk {
    fn records(&self) -> &[Tombstone] {
        &self.0
    }

    fn records_mut(&mut self) -> &mut [Tombstone] {
        &mut self.0
    }

    fn in_heap(&self) -> bool {
        true
    }
}

/// Tombstones in chunks, in the order pushed (the caller pushes in (finish time, digest)
/// order), found through the index.
#[derive(Default)]
struct Ring {
    chunks: VecDeque<Box<dyn TombstoneChunk>>,
    /// Where the first record is in the first chunk.
    head: usize,
    /// Records from the first on, live and dead.
    held: usize,
    live: usize,
    /// The first record's sequence number (each record's is its place since the first ever;
    /// the index keeps it cut to 32 bits, unambiguous while fewer than 2^32 records are held).
    first_seq: u64,
    /// Every live record: 32 bits of a keyed hash of its digest, and its sequence number.
    index: HashTable<IndexEntry>,
    hasher: ahash::RandomState,
    store: Option<Box<dyn TombstoneStore>>,
    /// The last record pushed since the ring was last empty (the next may not sort before it).
    last: Option<Tombstone>,
}

impl Ring {
    /// The same records in heap chunks, with no store; with the index, or without one (a
    /// copy that is only read in order: `Tombstones::copy_for_encoding`).
    fn copy_to_heap(&self, with_index: bool) -> Ring {
        let chunks = self.chunks.iter().map(|chunk| {
            let copied: Box<dyn TombstoneChunk> = Box::new(HeapChunk(chunk.records().into()));
            copied
        });
        Ring {
            chunks: chunks.collect(),
            head: self.head,
            held: self.held,
            live: self.live,
            first_seq: self.first_seq,
            index: if with_index { self.index.clone() } else { HashTable::new() },
            hasher: self.hasher.clone(),
            store: None,
            last: self.last,
        }
    }

    /// Chunks held in the heap although a store is attached (it could not make them).
    fn chunks_in_heap(&self) -> usize {
        if self.store.is_some() {
            self.chunks.iter().filter(|chunk| chunk.in_heap()).count()
        } else {
            0
        }
    }

    fn finished_ms_of(&self, digest: u128) -> Option<u64> {
        let wanted = self.entry(digest);
        let found = self.index.find(wanted.table_hash(), |e| e.hash == wanted.hash && self.holds(e.slot, digest))?;
        self.record(self.position(found.slot)).map(Tombstone::finished_ms)
    }

    /// The first live record (dead records never stay at the front).
    fn front(&self) -> Option<&Tombstone> {
        self.record(0)
    }

    /// Adds `tombstone` (live, of a digest not held) at the back.
    fn push(&mut self, tombstone: Tombstone) {
        debug_assert!(self.last.is_none_or(|last| last <= tombstone), "pushed in order");
        self.last = Some(tombstone);
        let at = self.head + self.held;
        if at == self.chunks.len() * TOMBSTONES_PER_CHUNK {
            let chunk = self.new_chunk();
            self.chunks.push_back(chunk);
        }
        self.chunks[at / TOMBSTONES_PER_CHUNK].records_mut()[at % TOMBSTONES_PER_CHUNK] = tombstone;
        let entry = IndexEntry { slot: (self.first_seq + self.held as u64) as u32, ..self.entry(tombstone.digest()) };
        self.index.insert_unique(entry.table_hash(), entry, |e| e.table_hash());
        self.held += 1;
        self.live += 1;
    }

    /// Forgets the tombstone of `digest`, if there is one; says whether there was.
    fn remove(&mut self, digest: u128) -> bool {
        let wanted = self.entry(digest);
        let Ring { index, chunks, head, held, first_seq, .. } = self;
        let found = index.find_entry(wanted.table_hash(), |e| {
            let position = e.slot.wrapping_sub(*first_seq as u32) as usize;
            e.hash == wanted.hash && record_in(chunks, *head, *held, position).is_some_and(|t| t.digest() == digest)
        });
        let Ok(found) = found else { return false };
        let (IndexEntry { slot, .. }, _) = found.remove();
        let at = self.head + self.position(slot);
        self.chunks[at / TOMBSTONES_PER_CHUNK].records_mut()[at % TOMBSTONES_PER_CHUNK] = Tombstone::default();
        self.live -= 1;
        self.drop_dead_front();
        // Bounded: a remove leaves at most max(live, a chunk) dead records.
        if self.held - self.live > self.live.max(TOMBSTONES_PER_CHUNK) {
            self.compact();
        }
        true
    }

    /// Takes the first live record out.
    fn pop_front(&mut self) -> Option<Tombstone> {
        let oldest = *self.front()?;
        let wanted = self.entry(oldest.digest());
        let seq = self.first_seq as u32;
        if let Ok(found) = self.index.find_entry(wanted.table_hash(), |e| e.slot == seq) {
            found.remove();
        }
        self.live -= 1;
        self.advance();
        self.drop_dead_front();
        Some(oldest)
    }

    /// The live records, in order.
    fn iter(&self) -> Live<'_> {
        Live { ring: self, position: 0, remaining: self.live }
    }

    fn attach_store(&mut self, store: Box<dyn TombstoneStore>) {
        self.store = Some(store);
        for at in 0..self.chunks.len() {
            let mut chunk = self.new_chunk();
            chunk.records_mut().copy_from_slice(self.chunks[at].records());
            self.chunks[at] = chunk;
        }
    }

    /// Every live record is in the index once, under its own place; the counts add up; the
    /// live records are in order.
    fn is_consistent(&self) -> bool {
        let live_records = (0..self.held).filter(|&p| self.record_any(p).is_some_and(|t| !t.is_dead())).count();
        let indexed = self.iter().all(|t| {
            let wanted = self.entry(t.digest());
            self.index.find(wanted.table_hash(), |e| e.hash == wanted.hash && self.holds(e.slot, t.digest())).is_some()
        });
        live_records == self.live
            && self.index.len() == self.live
            && indexed
            && self.record_any(0).is_none_or(|t| !t.is_dead())
            && self.head + self.held <= self.chunks.len() * TOMBSTONES_PER_CHUNK
            && self.iter().zip(self.iter().skip(1)).all(|(a, b)| a < b)
            && self.iter().last().is_none_or(|newest| self.last.is_some_and(|last| last >= *newest))
    }

    fn entry(&self, digest: u128) -> IndexEntry {
        IndexEntry { hash: self.hasher.hash_one(digest) as u32, slot: 0 }
    }

    /// The place (from the front) of the record whose sequence number is cut to `seq`.
    fn position(&self, seq: u32) -> usize {
        seq.wrapping_sub(self.first_seq as u32) as usize
    }

    fn holds(&self, seq: u32, digest: u128) -> bool {
        self.record_any(self.position(seq)).is_some_and(|t| t.digest() == digest)
    }

    /// The live record at `position`, if it is one.
    fn record(&self, position: usize) -> Option<&Tombstone> {
        self.record_any(position).filter(|t| !t.is_dead())
    }

    fn record_any(&self, position: usize) -> Option<&Tombstone> {
        record_in(&self.chunks, self.head, self.held, position)
    }

    /// Steps past the first record (its index entry is already gone).
    fn advance(&mut self) {
        self.head += 1;
        self.held -= 1;
        self.first_seq += 1;
        if self.head == TOMBSTONES_PER_CHUNK {
            self.chunks.pop_front();
            self.head = 0;
        }
        if self.held == 0 {
            self.last = None;
        }
    }

    fn drop_dead_front(&mut self) {
        while self.record_any(0).is_some_and(Tombstone::is_dead) {
            self.advance();
        }
    }

    /// Takes out the live records that sort after `bound` — the ring's tail, since it is in
    /// order — and returns them in order; the tail's places are written again by the next
    /// pushes (its chunks stay). Costs the tail's length.
    fn split_off_after(&mut self, bound: &Tombstone) -> Vec<Tombstone> {
        let mut start = self.held;
        while let Some(record) = start.checked_sub(1).and_then(|before| self.record_any(before)) {
            if !record.is_dead() && record <= bound {
                break;
            }
            start -= 1;
        }
        let mut tail = Vec::with_capacity(self.held - start);
        for position in start..self.held {
            let Some(&record) = self.record_any(position).filter(|t| !t.is_dead()) else { continue };
            let wanted = self.entry(record.digest());
            let seq = (self.first_seq + position as u64) as u32;
            if let Ok(found) = self.index.find_entry(wanted.table_hash(), |e| e.slot == seq) {
                found.remove();
            }
            tail.push(record);
        }
        self.live -= tail.len();
        self.held = start;
        self.last = start.checked_sub(1).and_then(|before| self.record_any(before)).copied();
        tail
    }

    /// Rewrites the ring without its dead records (they outnumbered the live ones).
    fn compact(&mut self) {
        let live: Vec<Tombstone> = self.iter().copied().collect();
        self.refill(live);
    }

    /// Empties the ring and pushes `records` (in order) into fresh chunks.
    fn refill(&mut self, records: Vec<Tombstone>) {
        self.chunks.clear();
        self.index.clear();
        (self.head, self.held, self.live, self.last) = (0, 0, 0, None);
        for tombstone in records {
            self.push(tombstone);
        }
    }

    fn new_chunk(&mut self) -> Box<dyn TombstoneChunk> {
        if let Some(chunk) = self.store.as_mut().and_then(|store| store.chunk()) {
            assert_eq!(chunk.records().len(), TOMBSTONES_PER_CHUNK, "a store's chunk holds a chunk of records");
            return chunk;
        }
        Box::new(HeapChunk(vec![Tombstone::default(); TOMBSTONES_PER_CHUNK].into_boxed_slice()))
    }
}

/// The record at `position` of a ring whose first is at `head` in its first chunk and which
/// holds `held` (dead or live), if it holds that many.
fn record_in(
    chunks: &VecDeque<Box<dyn TombstoneChunk>>,
    head: usize,
    held: usize,
    position: usize,
) -> Option<&Tombstone> {
    if position >= held {
        return None;
    }
    let at = head + position;
    chunks.get(at / TOMBSTONES_PER_CHUNK).map(|chunk| &chunk.records()[at % TOMBSTONES_PER_CHUNK])
}

/// Two iterators in order, merged into one in order (the smaller first).
struct Merge<A: Iterator, B: Iterator<Item = A::Item>> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<A: Iterator + Clone, B: Iterator<Item = A::Item> + Clone> Clone for Merge<A, B>
where
    A::Item: Clone,
{
    fn clone(&self) -> Self {
        Merge { a: self.a.clone(), b: self.b.clone() }
    }
}

impl<A: Iterator, B: Iterator<Item = A::Item>> Iterator for Merge<A, B>
where
    A::Item: Ord,
{
    type Item = A::Item;

    fn next(&mut self) -> Option<A::Item> {
        match (self.a.peek(), self.b.peek()) {
            (Some(a), Some(b)) if b < a => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

fn merge<A: Iterator, B: Iterator<Item = A::Item>>(a: A, b: B) -> Merge<A, B> {
    Merge { a: a.peekable(), b: b.peekable() }
}

/// The live records of a ring, in order.
#[derive(Clone)]
struct Live<'a> {
    ring: &'a Ring,
    position: usize,
    remaining: usize,
}

impl<'a> Iterator for Live<'a> {
    type Item = &'a Tombstone;

    fn next(&mut self) -> Option<&'a Tombstone> {
        while self.remaining > 0 {
            let record = self.ring.record_any(self.position)?;
            self.position += 1;
            if !record.is_dead() {
                self.remaining -= 1;
                return Some(record);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Live<'_> {}

/// Tombstones added out of order are held aside, in the heap, up to this many per partition
/// (~100 bytes each with their index: ~400 KiB); past it they are merged into the ring's
/// tail. Small, because ties within a millisecond come aside all the time (merging them
/// costs a few records); larger would spare merges only to expired jobs behind a deleted
/// one, whose tail is the retention's worth of tombstones.
const ASIDE_MAX: usize = 4 * 1024;

/// The sequence of tombstones, in (finish time, digest) order (see the module's comment).
#[derive(Default)]
pub struct Tombstones {
    /// Tombstones added in order (each no earlier than the ring's last): nearly all.
    ring: Ring,
    /// The others: a job that finished before the newest remembered one (expired after a
    /// later delete, say).
    aside: BTreeSet<Tombstone>,
    /// Digest → finish time of those aside.
    aside_index: HashMap<u128, u64, ahash::RandomState>,
}

impl Tombstones {
    /// A copy to be read in order only (encoded into a snapshot): the records copied into
    /// heap chunks as they are, without the indexes that find one by digest.
    pub(crate) fn copy_for_encoding(&self) -> Tombstones {
        Tombstones { ring: self.ring.copy_to_heap(false), aside: self.aside.clone(), aside_index: HashMap::default() }
    }

    /// Live tombstones.
    pub fn len(&self) -> usize {
        self.ring.live + self.aside.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Chunks held in the heap although a store is attached (it could not make them).
    pub fn chunks_in_heap(&self) -> usize {
        self.ring.chunks_in_heap()
    }

    /// When the job whose id has `digest` finished, if it is remembered.
    pub fn finished_ms_of(&self, digest: u128) -> Option<u64> {
        self.ring.finished_ms_of(digest).or_else(|| self.aside_index.get(&digest).copied())
    }

    /// The oldest tombstone: the first in (finish time, digest) order.
    pub fn front(&self) -> Option<Tombstone> {
        match (self.ring.front(), self.aside.first()) {
            (Some(ring), Some(aside)) => Some(*ring.min(aside)),
            (ring, aside) => ring.or(aside).copied(),
        }
    }

    /// Adds `tombstone`, forgetting an earlier one of the same digest.
    pub fn push(&mut self, tombstone: Tombstone) {
        if tombstone.is_dead() {
            return; // not a record of any id (see `Tombstone::is_dead`)
        }
        self.remove(tombstone.digest());
        if self.ring.last.is_none_or(|last| last <= tombstone) {
            self.ring.push(tombstone);
            return;
        }
        self.aside.insert(tombstone);
        self.aside_index.insert(tombstone.digest(), tombstone.finished_ms);
        if self.aside.len() > ASIDE_MAX {
            self.merge_aside();
        }
    }

    /// Moves the tombstones aside into the ring: the ring's records that sort after the
    /// first of them come out, and both are pushed back merged. Costs the records aside
    /// plus those of the ring younger than the oldest aside: a few for ties in a
    /// millisecond, the retention's worth for expired jobs behind deleted ones.
    fn merge_aside(&mut self) {
        let Some(first) = self.aside.first().copied() else { return };
        let tail = self.ring.split_off_after(&first);
        let aside = std::mem::take(&mut self.aside);
        self.aside_index.clear();
        for record in merge(tail.into_iter(), aside.into_iter()) {
            self.ring.push(record);
        }
    }

    /// Forgets the tombstone of `digest`, if there is one; says whether there was.
    pub fn remove(&mut self, digest: u128) -> bool {
        if self.ring.remove(digest) {
            return true;
        }
        let Some(finished_ms) = self.aside_index.remove(&digest) else { return false };
        self.aside.remove(&Tombstone::new(digest, finished_ms))
    }

    /// Takes the oldest tombstone out.
    pub fn pop_front(&mut self) -> Option<Tombstone> {
        let oldest = self.front()?;
        if self.aside.first() != Some(&oldest) {
            return self.ring.pop_front();
        }
        self.aside.pop_first();
        self.aside_index.remove(&oldest.digest());
        Some(oldest)
    }

    /// The live tombstones in (finish time, digest) order.
    pub fn iter(&self) -> Iter<'_> {
        Iter { merged: merge(self.ring.iter(), self.aside.iter()), remaining: self.len() }
    }

    /// From now on chunks are made by `store`; the chunks held so far move there (a
    /// restored state's), each record where it was.
    pub fn attach_store(&mut self, store: Box<dyn TombstoneStore>) {
        self.ring.attach_store(store);
    }

    /// Takes the attached store away (to attach it to the state that replaces this one).
    pub fn detach_store(&mut self) -> Option<Box<dyn TombstoneStore>> {
        self.ring.store.take()
    }

    /// The ring and the index agree and are in order; those aside are indexed, and no
    /// digest is in both.
    pub fn is_consistent(&self) -> bool {
        self.ring.is_consistent()
            && self.aside.len() == self.aside_index.len()
            && self.aside.iter().all(|t| {
                self.aside_index.get(&t.digest()) == Some(&t.finished_ms)
                    && self.ring.finished_ms_of(t.digest()).is_none()
            })
            && self.aside.len() <= ASIDE_MAX
    }
}

/// The live tombstones in order (`Tombstones::iter`): the ring and those aside, merged.
#[derive(Clone)]
pub struct Iter<'a> {
    merged: Merge<Live<'a>, std::collections::btree_set::Iter<'a, Tombstone>>,
    remaining: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a Tombstone;

    fn next(&mut self) -> Option<&'a Tombstone> {
        let next = self.merged.next();
        self.remaining = self.remaining.saturating_sub(usize::from(next.is_some()));
        next
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl FromIterator<Tombstone> for Tombstones {
    fn from_iter<I: IntoIterator<Item = Tombstone>>(iter: I) -> Tombstones {
        let mut tombstones = Tombstones::default();
        for tombstone in iter {
            tombstones.push(tombstone);
        }
        tombstones
    }
}

/// A copy in the heap, with no store of its own: chunks and index copied as they are (no
/// record hashed or pushed again).
impl Clone for Tombstones {
    fn clone(&self) -> Tombstones {
        Tombstones {
            ring: self.ring.copy_to_heap(true),
            aside: self.aside.clone(),
            aside_index: self.aside_index.clone(),
        }
    }
}

/// Equal when they hold the same tombstones (in order: the same order).
impl PartialEq for Tombstones {
    fn eq(&self, other: &Tombstones) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Tombstones {}

impl fmt::Debug for Tombstones {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tombstones")
            .field("in_order", &self.ring.live)
            .field("dead", &(self.ring.held - self.ring.live))
            .field("aside", &self.aside.len())
            .finish()
    }
}

/// JSON (snapshot format 0, digests): the live tombstones as a list, in order.
impl Serialize for Tombstones {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Tombstones {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Tombstones, D::Error> {
        Ok(Vec::<Tombstone>::deserialize(deserializer)?.into_iter().collect())
    }
}

/// Archives `Tombstones` as the list of its live records (the layout a `VecDeque` of them
/// had in snapshots before chunks).
pub struct AsTombstoneList;

impl ArchiveWith<Tombstones> for AsTombstoneList {
    type Archived = ArchivedVec<ArchivedTombstone>;
    type Resolver = VecResolver;

    fn resolve_with(field: &Tombstones, resolver: VecResolver, out: Place<Self::Archived>) {
        ArchivedVec::resolve_from_len(field.len(), resolver, out);
    }
}

impl<S> SerializeWith<Tombstones, S> for AsTombstoneList
where
    S: Fallible + rkyv::ser::Writer + rkyv::ser::Allocator + ?Sized,
{
    fn serialize_with(field: &Tombstones, serializer: &mut S) -> Result<VecResolver, S::Error> {
        ArchivedVec::<ArchivedTombstone>::serialize_from_iter::<Tombstone, _, _>(field.iter(), serializer)
    }
}

impl<D: Fallible + ?Sized> DeserializeWith<ArchivedVec<ArchivedTombstone>, Tombstones, D> for AsTombstoneList {
    fn deserialize_with(field: &ArchivedVec<ArchivedTombstone>, _: &mut D) -> Result<Tombstones, D::Error> {
        Ok(field
            .iter()
            .map(|t| Tombstone {
                finished_ms: t.finished_ms.to_native(),
                digest_high: t.digest_high.to_native(),
                digest_low: t.digest_low.to_native(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u64) -> u128 {
        (u128::from(n) << 64) | u128::from(n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// A store whose chunks count how many it made (memory from the heap: the file-backed
    /// one is the node's, tested there).
    struct Counting(usize);

    /// A chunk the store made (its memory is the heap's here, but it is not a `HeapChunk`).
    struct StoreChunk(Vec<Tombstone>);

    impl TombstoneChunk for StoreChunk {
        fn records(&self) -> &[Tombstone] {
            &self.0
        }
        fn records_mut(&mut self) -> &mut [Tombstone] {
            &mut self.0
        }
    }

    impl TombstoneStore for Counting {
        fn chunk(&mut self) -> Option<Box<dyn TombstoneChunk>> {
            self.0 += 1;
            (self.0 <= 2).then(|| Box::new(StoreChunk(vec![Tombstone::default(); TOMBSTONES_PER_CHUNK])) as _)
        }
    }

    #[test]
    fn tombstones_leave_oldest_first_and_forgotten_ones_are_skipped() {
        let mut tombstones = Tombstones::default();
        let count = (TOMBSTONES_PER_CHUNK * 2 + 10) as u64;
        for n in 1..=count {
            tombstones.push(Tombstone::new(digest(n), 1_000 + n));
        }
        assert_eq!((tombstones.len(), tombstones.ring.chunks.len()), (count as usize, 3));
        assert_eq!(tombstones.finished_ms_of(digest(7)), Some(1_007));
        // Forgotten in the middle: gone from lookups and from the order, nowhere else.
        assert!(tombstones.remove(digest(7)) && !tombstones.remove(digest(7)));
        assert_eq!(tombstones.finished_ms_of(digest(7)), None);
        assert_eq!(tombstones.len(), count as usize - 1);
        // Added again: at the back, with its new time.
        let again_ms = 2_000 + count;
        tombstones.push(Tombstone::new(digest(7), again_ms));
        assert_eq!(tombstones.iter().last().map(|t| (t.digest(), t.finished_ms())), Some((digest(7), again_ms)));
        assert!(tombstones.is_consistent());
        let order: Vec<u64> = (1..=10).map(|_| tombstones.pop_front().expect("held").finished_ms()).collect();
        assert_eq!(order, [1_001, 1_002, 1_003, 1_004, 1_005, 1_006, 1_008, 1_009, 1_010, 1_011]);
        // Forgetting the front drops it (and any dead records behind it) at once.
        assert!(tombstones.remove(digest(12)));
        assert_eq!(tombstones.front().map(|t| t.finished_ms()), Some(1_013));
        while tombstones.pop_front().is_some() {}
        assert!(tombstones.is_empty() && tombstones.ring.index.is_empty() && tombstones.is_consistent());
        assert!(tombstones.ring.chunks.len() <= 1, "emptied chunks go");
    }

    #[test]
    fn a_copy_a_restored_list_and_the_original_are_equal_whatever_lies_dead_between() {
        let mut tombstones = Tombstones::default();
        for n in 1..=5_000 {
            tombstones.push(Tombstone::new(digest(n), n));
        }
        for n in (2..=5_000).step_by(3) {
            tombstones.remove(digest(n));
        }
        let copy = tombstones.clone();
        let json: Tombstones = serde_json::from_slice(&serde_json::to_vec(&tombstones).expect("json")).expect("read");
        assert!(copy == tombstones && json == tombstones && copy.is_consistent());
        assert!(tombstones.ring.held > tombstones.ring.live, "the original holds dead records");
        assert_eq!(copy.ring.held, tombstones.ring.held, "a copy holds the records as they lie");
        let for_encoding = tombstones.copy_for_encoding();
        assert!(for_encoding.iter().eq(tombstones.iter()) && for_encoding.len() == tombstones.len());
        assert!(for_encoding.ring.index.is_empty(), "without the index");
        // A broken index is caught by the check.
        let mut broken = copy.clone();
        broken.ring.index.clear();
        assert!(!broken.is_consistent());
    }

    #[test]
    fn dead_records_do_not_pile_up_and_chunks_come_from_the_store_until_it_refuses() {
        let mut tombstones = Tombstones::default();
        tombstones.attach_store(Box::new(Counting(0)));
        tombstones.push(Tombstone::new(digest(u64::MAX), 1));
        assert_eq!(tombstones.chunks_in_heap(), 0, "the first chunk is the store's");
        // One id added and forgotten again and again behind a front that never leaves.
        for n in 1..=(TOMBSTONES_PER_CHUNK * 4) as u64 {
            tombstones.push(Tombstone::new(digest(n), n));
            tombstones.remove(digest(n));
        }
        assert_eq!(tombstones.len(), 1);
        assert!(tombstones.ring.held <= 2 * TOMBSTONES_PER_CHUNK, "{} records held", tombstones.ring.held);
        assert!(tombstones.is_consistent());
        assert!(tombstones.chunks_in_heap() > 0, "chunks the store refused came from the heap");
    }

    #[test]
    fn tombstones_that_come_out_of_order_take_their_place_and_a_restore_holds_the_same_sequence() {
        let mut tombstones = Tombstones::default();
        // Deleted jobs finish now; an expired one finished long ago: it sorts before them.
        for n in 1..=1_000u64 {
            tombstones.push(Tombstone::new(digest(n), 10_000 + n));
            if n % 10 == 0 {
                tombstones.push(Tombstone::new(digest(1_000_000 + n), n));
            }
        }
        assert_eq!(
            (tombstones.len(), tombstones.aside.len()),
            (1_100, 100),
            "each expired one came after a later delete"
        );
        let order: Vec<(u64, u128)> = tombstones.iter().map(|t| (t.finished_ms(), t.digest())).collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "read in (finish time, digest) order");
        // A restore pushes them in order: all in the ring, the same sequence.
        let restored: Tombstones =
            serde_json::from_slice(&serde_json::to_vec(&tombstones).expect("json")).expect("read");
        assert!(restored.aside.is_empty() && restored == tombstones && restored.is_consistent());
        assert_eq!(tombstones.finished_ms_of(digest(1_000_500)), Some(500));
        assert_eq!(tombstones.pop_front().map(|t| t.finished_ms()), Some(10), "the oldest first, wherever it is");
        assert!(tombstones.remove(digest(1_000_020)) && tombstones.is_consistent());
        // Too many aside: merged into the ring, still in order.
        for n in 0..=ASIDE_MAX as u64 {
            tombstones.push(Tombstone::new(digest(2_000_000 + n), 5_000 + n % 1_000));
        }
        assert!(tombstones.aside.len() < ASIDE_MAX && tombstones.is_consistent());
        assert_eq!(tombstones.len(), 1_100 - 2 + ASIDE_MAX + 1);
        // A merge takes out only the ring's tail younger than the oldest aside.
        let mut ring = Ring::default();
        for n in 1..=1_000u64 {
            ring.push(Tombstone::new(digest(n), n));
        }
        ring.remove(digest(995));
        let tail = ring.split_off_after(&Tombstone::new(digest(7_777), 990));
        assert_eq!(
            tail.iter().map(|t| t.finished_ms()).collect::<Vec<_>>(),
            [991, 992, 993, 994, 996, 997, 998, 999, 1_000]
        );
        assert!(ring.live == 990 && ring.is_consistent() && ring.finished_ms_of(digest(991)).is_none());
        for record in tail {
            ring.push(record);
        }
        assert!(ring.live == 999 && ring.is_consistent() && ring.finished_ms_of(digest(991)) == Some(991));
        // The same where the ring's front has moved on (its first chunk gone, the next one
        // begun) and the tail spans a chunk boundary.
        let mut ring = Ring::default();
        let count = 3 * TOMBSTONES_PER_CHUNK as u64;
        for n in 1..=count {
            ring.push(Tombstone::new(digest(n), n));
        }
        for _ in 0..TOMBSTONES_PER_CHUNK + 100 {
            ring.pop_front();
        }
        assert!(ring.head == 100 && ring.first_seq > 0 && ring.chunks.len() == 2);
        let bound = count - TOMBSTONES_PER_CHUNK as u64 - 50; // 50 records before the last chunk
        let tail = ring.split_off_after(&Tombstone::new(digest(bound), bound));
        assert_eq!(tail.len(), TOMBSTONES_PER_CHUNK + 50);
        assert!(ring.is_consistent() && ring.finished_ms_of(digest(bound + 1)).is_none());
        for record in tail {
            ring.push(record);
        }
        assert!(ring.is_consistent() && ring.chunks.len() == 2, "the kept chunks took the tail again");
        assert_eq!(ring.finished_ms_of(digest(count)), Some(count));
        assert_eq!(ring.pop_front().map(|t| t.finished_ms()), Some(TOMBSTONES_PER_CHUNK as u64 + 101));
        // A ring out of order is caught by the check.
        let mut broken = Tombstones::default();
        broken.ring.push(Tombstone::new(digest(1), 2));
        broken.ring.last = None;
        broken.ring.push(Tombstone::new(digest(2), 1));
        assert!(!broken.is_consistent());
    }
}
