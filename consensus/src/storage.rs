//! The `Storage` contract Raft reads its persisted log through, and `MemStorage`, the in-memory
//! implementation used by tests and the simulator.

use crate::types::{ConfState, Entry, HardState, Index, Snapshot, Term};

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The index lies before the first index kept (replaced by a snapshot).
    #[error("index {0} has been compacted into a snapshot")]
    Compacted(Index),
    /// The index lies past the last index persisted.
    #[error("index {0} is not available")]
    Unavailable(Index),
}

/// What Raft needs of persisted state. Everything the caller persisted from a `Ready` must be
/// visible here before `RawNode::advance` is called for that `Ready`.
///
/// Contract: entries are contiguous from `first_index()` to `last_index()`; `term(i)` answers
/// for `first_index() - 1 ..= last_index()` (the index before the first is the snapshot's);
/// `snapshot()` returns the newest snapshot, whose index is `first_index() - 1`. It lends
/// rather than copies: the snapshot holds the whole state machine, and callers that only
/// need its index or a chunk of it must not pay a copy of all of it.
pub trait Storage {
    fn initial_state(&self) -> (HardState, ConfState);
    /// Entries `[low, high)`, stopping early (but returning at least one) past `max_bytes`.
    fn entries(&self, low: Index, high: Index, max_bytes: usize) -> Result<Vec<Entry>, StorageError>;
    fn term(&self, index: Index) -> Result<Term, StorageError>;
    fn first_index(&self) -> Index;
    fn last_index(&self) -> Index;
    fn snapshot(&self) -> &Snapshot;
    /// The newest snapshot if a peer can install it, else `None`: a caller's snapshot may be
    /// readable only together with its own files (Sundial's linked snapshots). While a peer
    /// needs one and this answers `None`, nothing is sent to that peer; the leader retries at
    /// each heartbeat, and `RawNode::peer_needs_snapshot` tells the caller to make one.
    fn snapshot_to_send(&self) -> Option<&Snapshot> {
        Some(self.snapshot())
    }
}

/// The persisted state of one node, in memory: what survives a simulated crash.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    pub hard_state: HardState,
    pub snapshot: Snapshot,
    /// Entries after the snapshot, contiguous from `snapshot.meta.index + 1`.
    entries: Vec<Entry>,
    /// The snapshot is one no peer can install (as a caller's linked snapshot): tests set it
    /// to see the leader wait for one it can send.
    pub snapshot_unsendable: bool,
}

impl MemStorage {
    /// A storage whose group starts with `voters` and an empty log.
    pub fn new_with_voters(voters: &[u64]) -> MemStorage {
        let mut storage = MemStorage::default();
        storage.snapshot.meta.conf.voters = voters.to_vec();
        storage
    }

    /// Persists entries, replacing any conflicting suffix (what `Ready::entries` asks).
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let offset = self.snapshot.meta.index + 1;
        assert!(first.index >= offset, "appending below the snapshot");
        assert!(first.index <= self.last_index() + 1, "appending past a gap");
        self.entries.truncate((first.index - offset) as usize);
        self.entries.extend_from_slice(entries);
    }

    /// Installs a snapshot, dropping every entry it covers (what `Ready::snapshot` asks).
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) {
        let index = snapshot.meta.index;
        if index <= self.snapshot.meta.index {
            return;
        }
        let keep_from = self.entries.iter().position(|e| e.index > index);
        let consistent = self.term(index).map(|t| t == snapshot.meta.term).unwrap_or(false);
        self.entries = match (consistent, keep_from) {
            (true, Some(at)) => self.entries.split_off(at),
            _ => Vec::new(),
        };
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.snapshot = snapshot;
    }

    /// Replaces entries up to `index` with a snapshot of the caller's state at `index`.
    pub fn compact(&mut self, index: Index, data: Vec<u8>, conf: ConfState) {
        if index <= self.snapshot.meta.index || index > self.last_index() {
            return;
        }
        let term = self.term(index).expect("index is within the log");
        let offset = self.snapshot.meta.index + 1;
        self.entries.drain(..(index + 1 - offset) as usize);
        self.snapshot = Snapshot { meta: crate::types::SnapshotMeta { index, term, conf }, data: data.into() };
    }

    /// All persisted entries (for the simulator's checks).
    pub fn all_entries(&self) -> &[Entry] {
        &self.entries
    }
}

impl Storage for MemStorage {
    fn initial_state(&self) -> (HardState, ConfState) {
        (self.hard_state, self.snapshot.meta.conf.clone())
    }

    fn entries(&self, low: Index, high: Index, max_bytes: usize) -> Result<Vec<Entry>, StorageError> {
        check_entries_range(self.first_index(), self.last_index(), low, high)?;
        let offset = self.snapshot.meta.index + 1;
        let slice = &self.entries[(low - offset) as usize..(high - offset) as usize];
        Ok(limit_size(slice, max_bytes).to_vec())
    }

    fn term(&self, index: Index) -> Result<Term, StorageError> {
        let snapshot_index = self.snapshot.meta.index;
        if index == snapshot_index {
            return Ok(self.snapshot.meta.term);
        }
        if index < snapshot_index {
            return Err(StorageError::Compacted(index));
        }
        self.entries.get((index - snapshot_index - 1) as usize).map(|e| e.term).ok_or(StorageError::Unavailable(index))
    }

    fn first_index(&self) -> Index {
        self.snapshot.meta.index + 1
    }

    fn last_index(&self) -> Index {
        self.snapshot.meta.index + self.entries.len() as u64
    }

    fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    fn snapshot_to_send(&self) -> Option<&Snapshot> {
        (!self.snapshot_unsendable).then_some(&self.snapshot)
    }
}

/// The `entries(low, high, ..)` contract's range check, shared by every `Storage`: `low` must
/// not be compacted and `high` must not pass the last index + 1.
pub fn check_entries_range(first: Index, last: Index, low: Index, high: Index) -> Result<(), StorageError> {
    if low < first {
        return Err(StorageError::Compacted(low));
    }
    if high > last + 1 {
        return Err(StorageError::Unavailable(high));
    }
    Ok(())
}

/// The longest prefix of `entries` within `max_bytes`, but never empty when `entries` is not.
pub fn limit_size(entries: &[Entry], max_bytes: usize) -> &[Entry] {
    let mut total = 0usize;
    let mut count = 0usize;
    for entry in entries {
        total += entry.size_bytes();
        if count > 0 && total > max_bytes {
            break;
        }
        count += 1;
    }
    &entries[..count]
}
