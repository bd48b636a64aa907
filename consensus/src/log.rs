//! The log as Raft sees it: what `Storage` holds (persisted) followed by entries not yet
//! persisted ("unstable"), plus a received snapshot waiting to be persisted.

use crate::storage::{limit_size, Storage, StorageError};
use crate::types::{Entry, Index, Snapshot, Term};
use std::collections::VecDeque;

/// Bytes of persisted entries a log keeps in memory until they are applied (etcd's raft
/// keeps such a cache too). Within it, applying an entry, or sending it again to a follower,
/// does not read it back from storage; past it the oldest are read from storage instead.
pub const PERSISTED_CACHE_BYTES_MAX: usize = 4 << 20;

pub struct RaftLog<S: Storage> {
    pub storage: S,
    /// Entries from `unstable_offset` on, not yet persisted. They shadow any persisted entry
    /// at the same index (a conflicting suffix being replaced).
    unstable: Vec<Entry>,
    unstable_offset: Index,
    /// Persisted entries not yet applied, in order, ending at `unstable_offset - 1` when any
    /// (at most `PERSISTED_CACHE_BYTES_MAX` of them, the newest). The same entries as storage
    /// holds at those indices: a suffix replaced in storage is replaced here first (`append`).
    persisted_cache: VecDeque<Entry>,
    persisted_cache_bytes: usize,
    /// A snapshot received from the leader and not yet persisted by the caller.
    pending_snapshot: Option<Snapshot>,
    /// Highest index known committed.
    pub committed: Index,
    /// Highest index handed to the caller to apply.
    pub applied: Index,
}

impl<S: Storage> RaftLog<S> {
    pub fn new(storage: S) -> RaftLog<S> {
        let (hard_state, _) = storage.initial_state();
        let first = storage.first_index();
        let unstable_offset = storage.last_index() + 1;
        RaftLog {
            storage,
            unstable: Vec::new(),
            unstable_offset,
            persisted_cache: VecDeque::new(),
            persisted_cache_bytes: 0,
            pending_snapshot: None,
            committed: hard_state.commit.max(first - 1),
            applied: first - 1,
        }
    }

    pub fn first_index(&self) -> Index {
        match &self.pending_snapshot {
            Some(snapshot) => snapshot.meta.index + 1,
            None => self.storage.first_index(),
        }
    }

    pub fn last_index(&self) -> Index {
        if !self.unstable.is_empty() {
            return self.unstable_offset + self.unstable.len() as u64 - 1;
        }
        match &self.pending_snapshot {
            Some(snapshot) => snapshot.meta.index,
            None => self.storage.last_index(),
        }
    }

    /// Last index that is persisted (what may be applied and counted for the leader itself).
    /// While a received snapshot waits to be persisted, nothing counts as persisted.
    pub fn persisted_index(&self) -> Index {
        if self.pending_snapshot.is_some() {
            return 0;
        }
        self.unstable_offset - 1
    }

    pub fn term(&self, index: Index) -> Result<Term, StorageError> {
        if let Some(snapshot) = &self.pending_snapshot {
            if index == snapshot.meta.index {
                return Ok(snapshot.meta.term);
            }
        }
        if index + 1 < self.first_index() {
            return Err(StorageError::Compacted(index));
        }
        if index > self.last_index() {
            return Err(StorageError::Unavailable(index));
        }
        if index >= self.unstable_offset {
            return Ok(self.unstable[(index - self.unstable_offset) as usize].term);
        }
        if self.pending_snapshot.is_some() {
            // Below the pending snapshot's index nothing remains.
            return Err(StorageError::Compacted(index));
        }
        match self.cached(index) {
            Some(entry) => Ok(entry.term),
            None => self.storage.term(index),
        }
    }

    /// The persisted entry at `index` when the cache holds it.
    fn cached(&self, index: Index) -> Option<&Entry> {
        let first = self.persisted_cache.front()?.index;
        self.persisted_cache.get(usize::try_from(index.checked_sub(first)?).ok()?)
    }

    /// Persisted entries `[low, high)` within `max_bytes` (at least one), from the cache
    /// when it holds `low`, else from storage.
    fn persisted_entries(&self, low: Index, high: Index, max_bytes: usize) -> Result<Vec<Entry>, StorageError> {
        let Some(first) = self.persisted_cache.front().map(|entry| entry.index).filter(|first| low >= *first) else {
            return self.storage.entries(low, high, max_bytes);
        };
        let (from, to) = ((low - first) as usize, (high - first) as usize);
        if to > self.persisted_cache.len() {
            debug_assert!(false, "the cache ends where the unstable entries start");
            return self.storage.entries(low, high, max_bytes);
        }
        let mut out = Vec::with_capacity(to - from);
        let mut total_bytes = 0usize;
        for entry in self.persisted_cache.range(from..to) {
            total_bytes += entry.size_bytes();
            if !out.is_empty() && total_bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    /// The term at `index`, or 0 when it is not in the log (for comparisons).
    pub fn term_or_zero(&self, index: Index) -> Term {
        self.term(index).unwrap_or(0)
    }

    pub fn last_term(&self) -> Term {
        self.term_or_zero(self.last_index())
    }

    pub fn match_term(&self, index: Index, term: Term) -> bool {
        self.term(index).map(|t| t == term).unwrap_or(false)
    }

    /// True when a candidate with this last entry is at least as up to date as this log.
    pub fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        let our_term = self.last_term();
        last_term > our_term || (last_term == our_term && last_index >= self.last_index())
    }

    /// Entries `[low, high)` within `max_bytes` (at least one).
    pub fn entries(&self, low: Index, high: Index, max_bytes: usize) -> Result<Vec<Entry>, StorageError> {
        if low >= high {
            return Ok(Vec::new());
        }
        if low < self.first_index() {
            return Err(StorageError::Compacted(low));
        }
        if high > self.last_index() + 1 {
            return Err(StorageError::Unavailable(high));
        }
        let mut out = Vec::new();
        if low < self.unstable_offset {
            out = self.persisted_entries(low, high.min(self.unstable_offset), max_bytes)?;
            let wanted = high.min(self.unstable_offset) - low;
            if (out.len() as u64) < wanted {
                return Ok(out); // the size limit stopped it
            }
        }
        if high > self.unstable_offset {
            let from = low.max(self.unstable_offset);
            let slice = &self.unstable[(from - self.unstable_offset) as usize..(high - self.unstable_offset) as usize];
            out.extend_from_slice(slice);
        }
        let keep = limit_size(&out, max_bytes).len();
        out.truncate(keep);
        Ok(out)
    }

    /// Appends entries (which may replace a conflicting suffix) and returns the last index.
    pub fn append(&mut self, entries: &[Entry]) -> Index {
        let Some(first) = entries.first() else { return self.last_index() };
        assert!(
            first.index > self.committed,
            "never overwrite a committed entry ({} ≤ {})",
            first.index,
            self.committed
        );
        let after = first.index;
        if after == self.unstable_offset + self.unstable.len() as u64 {
            self.unstable.extend_from_slice(entries);
        } else if after <= self.unstable_offset {
            // Persisted entries from `after` on are being replaced: they leave the cache now.
            while self.persisted_cache.back().is_some_and(|entry| entry.index >= after) {
                self.pop_cached_back();
            }
            self.unstable_offset = after;
            self.unstable = entries.to_vec();
        } else {
            self.unstable.truncate((after - self.unstable_offset) as usize);
            self.unstable.extend_from_slice(entries);
        }
        self.last_index()
    }

    /// The follower's side of an Append: `Some(last new index)` when the log matched at
    /// `prev_index`, after appending what was new and advancing the commit index.
    pub fn maybe_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        commit: Index,
        entries: &[Entry],
    ) -> Option<Index> {
        if !self.match_term(prev_index, prev_term) {
            return None;
        }
        let last_new = prev_index + entries.len() as u64;
        if let Some(conflict) = entries.iter().position(|e| !self.match_term(e.index, e.term)) {
            let first_conflict = entries[conflict].index;
            assert!(first_conflict > self.committed, "conflict at committed index {first_conflict}");
            self.append(&entries[conflict..]);
        }
        self.commit_to(commit.min(last_new));
        Some(last_new)
    }

    pub fn commit_to(&mut self, index: Index) {
        if index > self.committed {
            assert!(index <= self.last_index(), "commit {index} past the last index {}", self.last_index());
            self.committed = index;
        }
    }

    /// Leader: commit `index` if it is in the current term (Raft §5.4.2).
    pub fn maybe_commit(&mut self, index: Index, term: Term) -> bool {
        if index > self.committed && self.term_or_zero(index) == term {
            self.commit_to(index);
            return true;
        }
        false
    }

    /// The largest index ≤ `index` whose term is ≤ `term` (fast backtracking, etcd's
    /// findConflictByTerm). Bounded by the log length.
    pub fn find_conflict_by_term(&self, index: Index, term: Term) -> (Index, Term) {
        let mut at = index.min(self.last_index());
        loop {
            match self.term(at) {
                Ok(t) if t > term && at > 0 => at -= 1,
                Ok(t) => return (at, t),
                Err(_) => return (at, 0),
            }
        }
    }

    pub fn unstable_entries(&self) -> &[Entry] {
        &self.unstable
    }

    pub fn pending_snapshot(&self) -> Option<&Snapshot> {
        self.pending_snapshot.as_ref()
    }

    /// The caller persisted entries up to `index` of `term`.
    pub fn stable_to(&mut self, index: Index, term: Term) {
        if index < self.unstable_offset || !self.match_term(index, term) {
            return; // superseded by a later truncation; those entries will be persisted again
        }
        let count = (index + 1 - self.unstable_offset) as usize;
        let applied = self.applied;
        for entry in self.unstable.drain(..count.min(self.unstable.len())).filter(|entry| entry.index > applied) {
            self.persisted_cache_bytes += entry.size_bytes();
            self.persisted_cache.push_back(entry);
        }
        while self.persisted_cache_bytes > PERSISTED_CACHE_BYTES_MAX {
            self.pop_cached_front();
        }
        self.unstable_offset = index + 1;
    }

    fn pop_cached_front(&mut self) {
        if let Some(entry) = self.persisted_cache.pop_front() {
            self.persisted_cache_bytes -= entry.size_bytes();
        }
    }

    fn pop_cached_back(&mut self) {
        if let Some(entry) = self.persisted_cache.pop_back() {
            self.persisted_cache_bytes -= entry.size_bytes();
        }
    }

    /// The caller persisted the pending snapshot at `index`.
    pub fn stable_snapshot_to(&mut self, index: Index) {
        if self.pending_snapshot.as_ref().is_some_and(|s| s.meta.index == index) {
            self.pending_snapshot = None;
        }
    }

    /// Replaces the log with a snapshot received from the leader.
    pub fn restore(&mut self, snapshot: Snapshot) {
        let index = snapshot.meta.index;
        self.committed = index;
        self.unstable.clear();
        self.unstable_offset = index + 1;
        self.persisted_cache.clear();
        self.persisted_cache_bytes = 0;
        self.pending_snapshot = Some(snapshot);
    }

    /// Committed, persisted entries not yet handed out for applying, within `max_bytes`.
    pub fn next_committed_entries(&self, max_bytes: usize) -> Vec<Entry> {
        let low = (self.applied + 1).max(self.first_index());
        let high = self.committed.min(self.persisted_index()) + 1;
        if low >= high {
            return Vec::new();
        }
        self.entries(low, high, max_bytes).unwrap_or_default()
    }

    pub fn applied_to(&mut self, index: Index) {
        if index > self.applied {
            assert!(index <= self.committed, "applied {index} past commit {}", self.committed);
            self.applied = index;
        }
        while self.persisted_cache.front().is_some_and(|entry| entry.index <= index) {
            self.pop_cached_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;
    use crate::types::EntryKind;

    fn entry(index: Index, term: Term) -> Entry {
        Entry { term, index, kind: EntryKind::Normal, data: format!("{index}@{term}").into_bytes().into() }
    }

    /// Persists what the log holds unstable, as a caller does with a `Ready`.
    fn persist(log: &mut RaftLog<MemStorage>) {
        let unstable = log.unstable_entries().to_vec();
        log.storage.append(&unstable);
        if let Some(last) = unstable.last() {
            log.stable_to(last.index, last.term);
        }
    }

    fn read(log: &RaftLog<MemStorage>, low: Index, high: Index) -> Vec<(Index, Term)> {
        let entries = log.entries(low, high, usize::MAX).expect("held");
        entries.iter().map(|entry| (entry.index, entry.term)).collect()
    }

    #[test]
    fn persisted_entries_are_read_from_memory_until_applied_and_a_replaced_suffix_is_never_read_stale() {
        let mut log = RaftLog::new(MemStorage::new_with_voters(&[1]));
        log.append(&(1..=5).map(|index| entry(index, 1)).collect::<Vec<_>>());
        persist(&mut log);
        assert_eq!(log.persisted_cache.len(), 5);
        // A follower's persisted, uncommitted suffix is replaced by a new leader's entries.
        log.commit_to(2);
        assert_eq!(log.maybe_append(2, 1, 2, &[entry(3, 2), entry(4, 2)]), Some(4));
        assert_eq!(read(&log, 1, 5), [(1, 1), (2, 1), (3, 2), (4, 2)], "not the replaced entries");
        assert_eq!(log.term(3), Ok(2));
        persist(&mut log);
        assert_eq!(read(&log, 1, 5), [(1, 1), (2, 1), (3, 2), (4, 2)]);
        assert_eq!(log.entries(1, 5, usize::MAX), log.storage.entries(1, 5, usize::MAX), "as storage holds them");
        // Applied entries leave memory; the rest are still read the same.
        log.commit_to(4);
        log.applied_to(2);
        assert_eq!(log.persisted_cache.iter().map(|entry| entry.index).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(log.next_committed_entries(usize::MAX), log.storage.entries(3, 5, usize::MAX).expect("held"));
        assert_eq!(read(&log, 1, 5), [(1, 1), (2, 1), (3, 2), (4, 2)], "older ones from storage");
    }

    #[test]
    fn the_cache_keeps_only_the_newest_within_its_bound() {
        let mut log = RaftLog::new(MemStorage::new_with_voters(&[1]));
        let big = |index| Entry { term: 1, index, kind: EntryKind::Normal, data: vec![7; 1 << 20].into() };
        log.append(&(1..=8).map(big).collect::<Vec<_>>());
        persist(&mut log);
        assert!(log.persisted_cache_bytes <= PERSISTED_CACHE_BYTES_MAX);
        assert_eq!(log.persisted_cache.back().map(|entry| entry.index), Some(8));
        assert_eq!(log.persisted_cache.len(), 3, "three of 1 MiB fit in 4 MiB with their headers");
        assert_eq!(log.entries(1, 9, usize::MAX).expect("held").len(), 8, "the rest from storage");
    }
}
