//! `WalStorage`: Raft's `Storage` on a sundial-wal log. Entries are WAL records (the tag is
//! the entry's term, the body its kind and data); the hard state is the WAL's atomic
//! hard-state file; a snapshot is the WAL's snapshot file, whose data starts with the
//! membership it was taken at. Everything `persist` writes is durable (fdatasync'd) when it
//! returns, which is what `RawNode::advance` requires.

use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use sundial_consensus::{
    ConfChange, ConfState, Entry, EntryKind, HardState, Index, Ready, Snapshot, SnapshotMeta, Storage, StorageError,
    Term,
};
use sundial_wal::{SnapshotDraft, Wal, WalError, WalOptions};

pub struct WalStorage {
    wal: Wal,
    dir: PathBuf,
    hard_state: HardState,
    /// The newest snapshot (Raft asks for it to send to followers): its data is a view of the
    /// mapped snapshot file, so keeping it costs page cache, not heap.
    snapshot: Snapshot,
}

/// A snapshot to be written off the thread that owns the log: where, at which index and
/// term, with which membership (`WalStorage::plan_snapshot`).
#[derive(Debug)]
pub struct SnapshotPlan {
    dir: PathBuf,
    index: Index,
    term: Term,
    conf_bytes: Vec<u8>,
    /// It may replace a snapshot at the same index (a whole one over a linked one).
    replaces_equal: bool,
}

/// A snapshot written from a plan and checked: its file (not yet the log's) and a view of it.
#[derive(Debug)]
pub struct WrittenSnapshot {
    draft: SnapshotDraft,
    snapshot: Snapshot,
}

impl SnapshotPlan {
    /// Where the state machine's data will start in the snapshot's file (its mapping is
    /// page-aligned): an archive in it can be padded to read in place.
    pub fn data_offset_bytes(&self) -> usize {
        sundial_wal::SNAPSHOT_DATA_OFFSET_BYTES + self.conf_bytes.len()
    }

    /// Writes and syncs the snapshot of the state machine's `data` beside the log (on any
    /// thread; given up once `stop` is set), then maps it back and checks it whole, so
    /// `WalStorage::adopt_snapshot` has only to make it the log's.
    pub fn write(&self, data: &[u8], stop: &AtomicBool) -> Result<WrittenSnapshot, WalError> {
        let draft = SnapshotDraft::write_unless(&self.dir, self.index, self.term, &[&self.conf_bytes, data], stop)?;
        let stored = draft.map()?;
        let (conf, data) = decode_snapshot_data(&stored.data).ok_or_else(|| corrupt(&self.dir, "snapshot"))?;
        let snapshot = Snapshot { meta: SnapshotMeta { index: stored.index, term: stored.tag, conf }, data };
        Ok(WrittenSnapshot { draft, snapshot })
    }
}

/// A stored file that does not decode: the directory holds something this build did not write.
fn corrupt(dir: &Path, what: &str) -> WalError {
    WalError::Inconsistent { path: dir.to_path_buf(), reason: format!("{what} does not decode as a Raft {what}") }
}

impl WalStorage {
    /// Opens (or creates) the log in `dir`. `voters` is the membership a brand-new group
    /// starts with; an existing group keeps the one it recorded.
    pub fn open(dir: impl AsRef<Path>, options: WalOptions, voters: &[u64]) -> Result<WalStorage, WalError> {
        let dir = dir.as_ref();
        let (wal, _report) = Wal::open(dir, options)?;
        let hard_state = match wal.hard_state() {
            Some(bytes) => decode_hard_state(bytes).ok_or_else(|| corrupt(dir, "hard state"))?,
            None => HardState::default(),
        };
        let snapshot = match load_snapshot(&wal, dir)? {
            Some(snapshot) => snapshot,
            None => {
                // Without a snapshot the log must start at the beginning: a log that starts
                // later lost the snapshot that covered its prefix (refused, never replayed
                // into an empty state).
                if wal.first_index() > 1 {
                    let reason = format!("the log starts at {} but there is no snapshot before it", wal.first_index());
                    return Err(WalError::Inconsistent { path: dir.to_path_buf(), reason });
                }
                let conf = ConfState { voters: voters.to_vec(), learners: Vec::new() };
                Snapshot { meta: SnapshotMeta { index: 0, term: 0, conf }, data: Default::default() }
            }
        };
        let mut storage = WalStorage { wal, dir: dir.to_path_buf(), hard_state, snapshot };
        let snapshot_index = storage.snapshot.meta.index;
        if storage.wal.first_index() > snapshot_index + 1 {
            let reason = format!(
                "the log starts at {} but the snapshot ends at {snapshot_index}: entries are missing",
                storage.wal.first_index()
            );
            return Err(WalError::Inconsistent { path: dir.to_path_buf(), reason });
        }
        // A crash between saving a received snapshot and cutting the log: finish the cut.
        if storage.wal.last_index() < snapshot_index || storage.wal.first_index() <= snapshot_index {
            storage.wal.truncate_prefix(snapshot_index)?;
        }
        Ok(storage)
    }

    /// Step 1 of handling a `Ready`: installs its snapshot, appends its entries (replacing a
    /// conflicting suffix) and saves its hard state — all durable on return.
    pub fn persist(&mut self, ready: &Ready) -> Result<(), WalError> {
        self.persist_begin(ready)?;
        self.persist_finish()
    }

    /// `persist`, except that the entries' write is only begun when nothing else in the
    /// `Ready` needs a sync after it: [`WalStorage::persist_finish`] waits for it. A shard
    /// begins every partition's write before finishing any, so their fdatasyncs run at
    /// once (the file system commits them together) instead of one after another.
    pub fn persist_begin(&mut self, ready: &Ready) -> Result<(), WalError> {
        if let Some(snapshot) = &ready.snapshot {
            self.install_snapshot(snapshot.clone())?;
        }
        if let Some(first) = ready.entries.first() {
            if first.index <= self.wal.last_index() {
                self.wal.truncate_suffix(first.index)?;
            }
            for entry in &ready.entries {
                let index = self.wal.append(entry.term, &encode_entry(entry))?;
                if index != entry.index {
                    let reason = format!("entry {} would be written at index {index}", entry.index);
                    return Err(WalError::Inconsistent { path: std::path::PathBuf::from("(raft log)"), reason });
                }
            }
            self.wal.commit_begin()?;
        }
        if let Some(hard_state) = ready.hard_state {
            // Term and vote must be durable before messages go out; the commit index need
            // not be (a restarted node learns it again — a group of one by committing its
            // first entry), so a change of commit alone costs no fsync. Saved after the
            // entries are durable (saving finishes a begun write first), so a saved commit
            // index never passes the log.
            let vote_changed = (hard_state.term, hard_state.vote) != (self.hard_state.term, self.hard_state.vote);
            if vote_changed {
                self.wal.save_hard_state(&encode_hard_state(&hard_state))?;
            }
            self.hard_state = hard_state;
        }
        Ok(())
    }

    /// Waits until what [`WalStorage::persist_begin`] began is durable.
    pub fn persist_finish(&mut self) -> Result<(), WalError> {
        if self.wal.commit_begun() {
            self.wal.commit_finish()?;
        }
        Ok(())
    }

    /// Replaces entries up to `index` with a snapshot of the state machine at `index`;
    /// returns whether it did (not when the newest snapshot is at `index` or later).
    /// `replace_equal`: a snapshot at `index` itself is replaced too (a whole snapshot over a
    /// linked one, which only this replica can read, before a replica is added).
    pub fn compact(
        &mut self,
        index: Index,
        data: &[u8],
        conf: ConfState,
        replace_equal: bool,
    ) -> Result<bool, WalError> {
        let Some(plan) = self.plan(index, conf, replace_equal)? else { return Ok(false) };
        let written = plan.write(data, &AtomicBool::new(false))?;
        self.adopt_snapshot(plan, written)
    }

    /// What a snapshot of the state machine at `index` (with membership `conf`) needs to be
    /// written on another thread; `None` when it would be no newer than the newest.
    /// With `replace_equal`, also at the newest snapshot's own index (a whole snapshot over
    /// a linked one).
    pub fn plan_snapshot(
        &self,
        index: Index,
        conf: ConfState,
        replace_equal: bool,
    ) -> Result<Option<SnapshotPlan>, WalError> {
        self.plan(index, conf, replace_equal)
    }

    fn plan(&self, index: Index, conf: ConfState, replace_equal: bool) -> Result<Option<SnapshotPlan>, WalError> {
        let dir = self.wal.dir().to_path_buf();
        if replace_equal && index == self.snapshot.meta.index && index > 0 {
            let term = self.snapshot.meta.term;
            return Ok(Some(SnapshotPlan { dir, index, term, conf_bytes: encode_conf(&conf), replaces_equal: true }));
        }
        if index <= self.snapshot.meta.index || index > self.wal.last_index() {
            return Ok(None);
        }
        let Some(term) = self.wal.get(index).map(|e| e.tag) else {
            return Err(WalError::OutOfRange { index, first: self.wal.first_index(), last: self.wal.last_index() });
        };
        let conf_bytes = encode_conf(&conf);
        Ok(Some(SnapshotPlan { dir, index, term, conf_bytes, replaces_equal: false }))
    }

    /// Makes a snapshot written from `plan` the newest and drops the log before it — if it
    /// still is newer than the newest and the log still holds its entry in its term (a
    /// snapshot from the leader may have come meanwhile); otherwise its file is removed.
    /// Nothing is read here: the writer mapped and checked the file. Returns whether it was
    /// adopted.
    pub fn adopt_snapshot(&mut self, plan: SnapshotPlan, written: WrittenSnapshot) -> Result<bool, WalError> {
        let SnapshotPlan { index, term, replaces_equal, .. } = plan;
        let newer = index > self.snapshot.meta.index && self.wal.get(index).is_some_and(|e| e.tag == term);
        let same = replaces_equal && index == self.snapshot.meta.index && term == self.snapshot.meta.term;
        let current = newer || same;
        if !current || written.snapshot.meta.index != index || written.snapshot.meta.term != term {
            return Ok(false);
        }
        self.wal.adopt_snapshot(written.draft)?;
        // The entries the snapshot covers are cut once a whole segment of them can go: a cut
        // that frees nothing costs the shard two synced metadata writes (most snapshots, at
        // a snapshot every 10,000 entries and 8 MiB segments), and entries at or below the
        // snapshot are never read (`first_index` is the snapshot's next; `open` finishes a
        // cut left undone).
        if self.wal.prefix_cut_frees_a_segment(index) {
            self.wal.truncate_prefix(index)?;
        }
        self.snapshot = written.snapshot;
        Ok(true)
    }

    /// A snapshot from the leader: saved, then the log keeps only entries that follow it
    /// consistently.
    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), WalError> {
        let index = snapshot.meta.index;
        if index <= self.snapshot.meta.index {
            return Ok(());
        }
        let consistent = self.wal.get(index).is_some_and(|e| e.tag == snapshot.meta.term);
        self.wal.save_snapshot_parts(
            index,
            snapshot.meta.term,
            &[&encode_conf(&snapshot.meta.conf), &snapshot.data],
        )?;
        if !consistent && index < self.wal.last_index() {
            self.wal.truncate_suffix(index + 1)?;
        }
        let saved = self.saved_snapshot(index, || snapshot);
        self.wal.truncate_prefix(index)?;
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.snapshot = saved;
        Ok(())
    }

    /// The snapshot just saved at `index`, mapped from its file (the copy in memory that was
    /// written is dropped); if it cannot be mapped back, that copy is kept (`written`).
    fn saved_snapshot(&self, index: Index, written: impl FnOnce() -> Snapshot) -> Snapshot {
        match load_snapshot(&self.wal, &self.dir) {
            Ok(Some(snapshot)) if snapshot.meta.index == index => snapshot,
            outcome => {
                let found = outcome.map(|s| s.map(|s| s.meta.index));
                tracing::warn!(dir = %self.dir.display(), index, ?found, "the snapshot just saved did not map back; keeping it in memory");
                written()
            }
        }
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }
}

impl Storage for WalStorage {
    fn initial_state(&self) -> (HardState, ConfState) {
        (self.hard_state, self.snapshot.meta.conf.clone())
    }

    fn entries(&self, low: Index, high: Index, max_bytes: usize) -> Result<Vec<Entry>, StorageError> {
        sundial_consensus::check_entries_range(self.first_index(), self.last_index(), low, high)?;
        let mut entries = Vec::new();
        let mut total_bytes = 0usize;
        for index in low..high {
            let record = self.wal.get(index).ok_or(StorageError::Unavailable(index))?;
            let entry = decode_entry(index, record.tag, record.body).ok_or(StorageError::Unavailable(index))?;
            total_bytes += entry.size_bytes();
            if !entries.is_empty() && total_bytes > max_bytes {
                break;
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn term(&self, index: Index) -> Result<Term, StorageError> {
        if index == self.snapshot.meta.index {
            return Ok(self.snapshot.meta.term);
        }
        if index < self.snapshot.meta.index {
            return Err(StorageError::Compacted(index));
        }
        self.wal.get(index).map(|e| e.tag).ok_or(StorageError::Unavailable(index))
    }

    fn first_index(&self) -> Index {
        self.snapshot.meta.index + 1
    }

    fn last_index(&self) -> Index {
        self.wal.last_index().max(self.snapshot.meta.index)
    }

    fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// A linked snapshot lists this replica's spec segments instead of holding the specs: no
    /// peer can install it, so the partition makes a whole one when a peer needs one.
    fn snapshot_to_send(&self) -> Option<&Snapshot> {
        (!sundial_engine::state::State::is_linked_snapshot(&self.snapshot.data)).then_some(&self.snapshot)
    }
}

// ---- encodings (little-endian) ---------------------------------------------------------

fn encode_hard_state(hard_state: &HardState) -> Vec<u8> {
    [hard_state.term, hard_state.vote.unwrap_or(0), hard_state.commit].iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode_hard_state(bytes: &[u8]) -> Option<HardState> {
    let [term, vote, commit] = read_u64s::<3>(bytes)?;
    Some(HardState { term, vote: (vote != 0).then_some(vote), commit })
}

fn read_u64s<const N: usize>(bytes: &[u8]) -> Option<[u64; N]> {
    if bytes.len() != N * 8 {
        return None;
    }
    let mut out = [0u64; N];
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        out[i] = u64::from_le_bytes(chunk.try_into().ok()?);
    }
    Some(out)
}

/// Body of an entry's record: a kind byte (0 data, 1 add voter, 2 add learner, 3 remove),
/// then the data or the node id.
fn encode_entry(entry: &Entry) -> Vec<u8> {
    let mut body = Vec::with_capacity(1 + entry.data.len().max(8));
    match entry.kind {
        EntryKind::Normal => {
            body.push(0);
            body.extend_from_slice(&entry.data);
        }
        EntryKind::ConfChange(change) => {
            let (tag, id) = match change {
                ConfChange::AddVoter(id) => (1u8, id),
                ConfChange::AddLearner(id) => (2, id),
                ConfChange::Remove(id) => (3, id),
            };
            body.push(tag);
            body.extend_from_slice(&id.to_le_bytes());
        }
    }
    body
}

fn decode_entry(index: Index, term: Term, body: &[u8]) -> Option<Entry> {
    let (&kind, rest) = body.split_first()?;
    let id = || rest.try_into().ok().map(u64::from_le_bytes);
    let kind = match kind {
        0 => return Some(Entry { term, index, kind: EntryKind::Normal, data: Bytes::copy_from_slice(rest) }),
        1 => ConfChange::AddVoter(id()?),
        2 => ConfChange::AddLearner(id()?),
        3 => ConfChange::Remove(id()?),
        _ => return None,
    };
    Some(Entry { term, index, kind: EntryKind::ConfChange(kind), data: Bytes::new() })
}

/// The newest snapshot in the log's directory, its state machine's bytes a view of the file.
fn load_snapshot(wal: &Wal, dir: &Path) -> Result<Option<Snapshot>, WalError> {
    let Some(stored) = wal.load_snapshot()? else { return Ok(None) };
    let (conf, data) = decode_snapshot_data(&stored.data).ok_or_else(|| corrupt(dir, "snapshot"))?;
    Ok(Some(Snapshot { meta: SnapshotMeta { index: stored.index, term: stored.tag, conf }, data }))
}

/// The voters and learners a snapshot's data starts with.
fn encode_conf(conf: &ConfState) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 8 * (conf.voters.len() + conf.learners.len()));
    for list in [&conf.voters, &conf.learners] {
        out.extend_from_slice(&(list.len() as u64).to_le_bytes());
        for id in list {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    out
}

/// Snapshot file data: voter count, voters, learner count, learners (u64 each) — the
/// `encode_conf` form — then the state machine's bytes (a view, not a copy).
fn decode_snapshot_data(bytes: &bytes::Bytes) -> Option<(ConfState, bytes::Bytes)> {
    let mut at = 0usize;
    let mut read = || -> Option<u64> {
        let value = u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?);
        at += 8;
        Some(value)
    };
    let mut lists = [Vec::new(), Vec::new()];
    for list in &mut lists {
        let count = read()?;
        if count > 1_000 {
            return None;
        }
        for _ in 0..count {
            list.push(read()?);
        }
    }
    let [voters, learners] = lists;
    if at > bytes.len() {
        return None;
    }
    Some((ConfState { voters, learners }, bytes.slice(at..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_kind_round_trip() {
        let entries = [
            Entry { term: 3, index: 7, kind: EntryKind::Normal, data: Bytes::from_static(b"job") },
            Entry { term: 3, index: 8, kind: EntryKind::Normal, data: Bytes::new() },
            Entry { term: 4, index: 9, kind: EntryKind::ConfChange(ConfChange::AddLearner(5)), data: Bytes::new() },
            Entry { term: 4, index: 10, kind: EntryKind::ConfChange(ConfChange::Remove(2)), data: Bytes::new() },
        ];
        for entry in entries {
            assert_eq!(decode_entry(entry.index, entry.term, &encode_entry(&entry)), Some(entry));
        }
        assert_eq!(decode_entry(1, 1, &[9]), None, "an unknown kind is refused");
    }

    #[test]
    fn a_snapshot_written_aside_is_not_adopted_over_the_leaders_newer_one_and_its_file_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = WalOptions { segment_size_bytes: 1 << 20, ..WalOptions::default() };
        let mut storage = WalStorage::open(dir.path(), options, &[1]).expect("open");
        let entries =
            (1..=10).map(|index| Entry { term: 1, index, kind: EntryKind::Normal, data: vec![index as u8].into() });
        storage.persist(&Ready { entries: entries.collect(), ..Ready::default() }).expect("persisted");
        let conf = ConfState { voters: vec![1], learners: Vec::new() };
        let plan = storage.plan_snapshot(5, conf.clone(), false).expect("planned").expect("newer than none");
        let written = plan.write(b"state at 5", &AtomicBool::new(false)).expect("written");
        let leaders =
            Snapshot { meta: SnapshotMeta { index: 8, term: 1, conf }, data: bytes::Bytes::from_static(b"at 8") };
        storage.persist(&Ready { snapshot: Some(leaders), ..Ready::default() }).expect("installed");
        assert!(!storage.adopt_snapshot(plan, written).expect("no error"), "the older snapshot is not adopted");
        assert_eq!(storage.snapshot().meta.index, 8);
        assert_eq!(&storage.snapshot().data[..], b"at 8");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into())
            .collect();
        assert!(names.iter().all(|name| !name.ends_with(".tmp")), "its file was removed: {names:?}");
        let stopped =
            storage.plan_snapshot(9, ConfState { voters: vec![1], learners: Vec::new() }, false).expect("planned");
        let error = stopped.expect("newer").write(&[0; 3 << 20], &AtomicBool::new(true)).expect_err("given up");
        assert!(error.to_string().contains("closing"), "{error}");
    }

    #[test]
    fn an_adopted_snapshot_cuts_the_log_only_once_a_segment_can_go_and_a_reopen_finishes_the_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = WalOptions { segment_size_bytes: 1 << 20, ..WalOptions::default() };
        let conf = ConfState { voters: vec![1], learners: Vec::new() };
        let entry =
            |index: u64, bytes: usize| Entry { term: 1, index, kind: EntryKind::Normal, data: vec![7; bytes].into() };
        let mut storage = WalStorage::open(dir.path(), options, &[1]).expect("open");
        storage.persist(&Ready { entries: (1..=10).map(|i| entry(i, 10)).collect(), ..Ready::default() }).expect("ok");
        let plan = storage.plan_snapshot(5, conf.clone(), false).expect("planned").expect("newer");
        let written = plan.write(b"state at 5", &AtomicBool::new(false)).expect("written");
        assert!(storage.adopt_snapshot(plan, written).expect("adopted"));
        assert_eq!(storage.wal().first_index(), 1, "nothing freed by a cut: the log is left as it is");
        assert_eq!((storage.first_index(), storage.last_index()), (6, 10));
        assert_eq!(storage.entries(6, 11, usize::MAX).expect("entries").len(), 5);
        assert_eq!(storage.term(5), Ok(1));
        assert_eq!(storage.entries(5, 6, usize::MAX), Err(StorageError::Compacted(5)));
        drop(storage);
        // A restart (or a kill) before any cut: the log's prefix goes when it opens.
        let mut storage = WalStorage::open(dir.path(), options, &[1]).expect("reopen");
        assert_eq!(storage.wal().first_index(), 6);
        assert_eq!(storage.snapshot().meta.index, 5);
        assert_eq!(storage.entries(6, 11, usize::MAX).expect("entries").len(), 5);
        // Entries past a segment's worth: the next snapshot cuts, and the disk is given back.
        let big = (11..=40).map(|i| entry(i, 100_000)).collect();
        storage.persist(&Ready { entries: big, ..Ready::default() }).expect("ok");
        let plan = storage.plan_snapshot(38, conf, false).expect("planned").expect("newer");
        let written = plan.write(b"state at 38", &AtomicBool::new(false)).expect("written");
        assert!(storage.adopt_snapshot(plan, written).expect("adopted"));
        assert!(storage.wal().first_index() > 6, "a whole segment lay below the snapshot: cut");
        assert_eq!(storage.entries(39, 41, usize::MAX).expect("entries").len(), 2);
    }

    #[test]
    fn hard_state_and_snapshot_data_round_trip() {
        let hard_state = HardState { term: 9, vote: Some(2), commit: 41 };
        assert_eq!(decode_hard_state(&encode_hard_state(&hard_state)), Some(hard_state));
        let conf = ConfState { voters: vec![1, 2, 3], learners: vec![4] };
        let mut file_data = encode_conf(&conf);
        file_data.extend_from_slice(b"state");
        let decoded = decode_snapshot_data(&file_data.into());
        assert_eq!(decoded, Some((conf, bytes::Bytes::from_static(b"state"))));
        assert_eq!(decode_snapshot_data(&bytes::Bytes::from_static(&[1, 2, 3])), None);
    }
}
