//! A partition: one Raft group whose log is a `WalStorage` and whose committed entries are
//! the engine's commands. Commands reach the state machine only through the committed log,
//! so a restart (or another replica) replays the same commands into the same state. The
//! state machine is snapshotted into the WAL every `snapshot_every_entries` (or once it
//! applied as many entries as it holds jobs) and the log before it dropped. A partition of
//! jobs encodes, writes and checks its snapshot on a thread of its own from a copy of the
//! state's records, so the shard stops only to copy them and, once the file is synced, to
//! rename it into place and cut the log.

use crate::cluster::members::{Members, MembersCommand};
use crate::replica::snapshot_worker::{self, Pending};
use crate::replica::specs::{
    FileSegment, SegmentFiles, SpecStore, SEGMENTS_MAX_DEFAULT, SEGMENT_BYTES_DEFAULT, SPECS_DIR,
};
use crate::replica::storage::{SnapshotPlan, WalStorage, WrittenSnapshot};
use crate::replica::tombstones::{TombstoneFiles, TOMBSTONES_DIR};
use std::collections::BTreeMap;
use std::path::Path;
use sundial_consensus::{
    ConfChange, Config, ConfigError, EntryKind, Index, Message, NodeId, ProposeError, RawNode, Role, Storage, Term,
};
use sundial_dispatch::runtime::{CommandLog, Committed, LogError, Ticket};
use sundial_engine::codec::{decode_command, DecodeError};
use sundial_engine::state::{Applied, ApplyError, Command, State};
use sundial_wal::{WalError, WalOptions};

#[derive(Clone, Debug)]
pub struct PartitionOptions {
    pub node_id: u64,
    /// The group's members when it is created (a single node: just itself).
    pub voters: Vec<u64>,
    pub wal: WalOptions,
    /// Applied entries between state-machine snapshots (and log truncations).
    pub snapshot_every_entries: u64,
    /// Proposals are refused beyond this many uncommitted entries.
    pub max_uncommitted_entries: u64,
    /// Ticks without a leader before a replica campaigns (randomized in [n, 2n)).
    pub election_ticks: u32,
    pub heartbeat_ticks: u32,
    /// How long, in ticks, a follower past its election timeout waits for a leader whose
    /// node is still heard from, and a leader that heard from no quorum waits for followers
    /// whose nodes are (0: not at all).
    pub leader_patience_ticks: u32,
    /// Set for the meta group: its entries are membership changes applied to `Members`
    /// (starting from this, for a brand-new group) instead of jobs commands.
    pub members: Option<Members>,
    /// Size of the files job specs are kept in (`None`: specs, and the dedup window's
    /// tombstones, stay in the heap).
    pub spec_segment_bytes: Option<u64>,
    /// The most jobs this partition is expected to hold (the node's `max_jobs` over its
    /// partitions, with room for skew): once its table is large it grows once to that many
    /// slots rather than doubling (`State::expect_jobs`). 0: not said.
    pub expected_jobs: usize,
}

impl PartitionOptions {
    /// A single-node partition with default settings.
    pub fn single_node(node_id: u64) -> PartitionOptions {
        PartitionOptions {
            node_id,
            voters: vec![node_id],
            wal: WalOptions::default(),
            snapshot_every_entries: 10_000,
            max_uncommitted_entries: 100_000,
            election_ticks: 10,
            heartbeat_ticks: 1,
            leader_patience_ticks: 0,
            members: None,
            // Linux only: elsewhere a segment's blocks cannot be reserved ahead.
            spec_segment_bytes: cfg!(target_os = "linux").then_some(SEGMENT_BYTES_DEFAULT),
            expected_jobs: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("partition log: {0}")]
    Wal(#[from] WalError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Propose(#[from] ProposeError),
    #[error("the partition's snapshot: {0}")]
    Snapshot(String),
    #[error("no leader elected within {ticks} ticks")]
    NoLeader { ticks: u32 },
    #[error("the partition's log cannot be applied: {0}")]
    Format(String),
}

/// Jobs a partition makes room for (the log's tail to replay at open, the jobs it is
/// expected to hold), at most.
const RESERVED_JOBS_MAX: usize = 1 << 24;

/// Jobs looked at per call for specs to repack (a few tens of microseconds).
const REPACK_JOBS_PER_TICK: usize = 4096;

pub struct Partition {
    /// The job-table slot where the next tick goes on looking for specs to repack (`None`:
    /// from the first).
    repack_cursor: Option<u32>,
    node: RawNode<WalStorage>,
    state: State,
    /// The meta group's state machine (`None` for a partition of jobs).
    members: Option<Members>,
    options: PartitionOptions,
    /// Commands proposed here and not yet applied: log index → (their ticket, the term they
    /// were proposed in), bounded by the uncommitted-entry limit. An entry applied at that
    /// index with another term is someone else's: the proposal was lost. Tickets are not
    /// indexes: after a leader's uncommitted tail is truncated the same index is proposed
    /// again, and two proposals must never answer for each other. The command itself is
    /// kept with it (`Some` when proposed through `CommandLog::propose`): the entry at that
    /// index and term is this command, so it is applied as it is rather than decoded back
    /// from the bytes it was just encoded into (measured: ~5 % of a create's node CPU went
    /// to that decoding and to allocating and dropping the spec twice).
    proposed: Proposals,
    /// The next proposal's ticket (below `READ_TICKETS_FROM`; a counter, never reused).
    next_ticket: Ticket,
    /// Linearizable reads asked here: ticket → the index the state must reach (once Raft
    /// confirmed it; `None` until then). Bounded by Raft's pending-read limit.
    reads: BTreeMap<Ticket, (Option<Index>, std::time::Instant)>,
    next_read_ticket: Ticket,
    /// Applied commands not yet taken by the runtime.
    applied: Vec<Committed>,
    /// Messages for peers, taken by the shard after each `process`.
    outbox: Vec<Message>,
    /// The first index of this node's current leadership; it fires once it applied that far.
    leading_from: Option<Index>,
    /// Entries applied since the last snapshot.
    applied_since_snapshot: u64,
    /// Snapshots that could not be written (retried at the next interval; the log keeps
    /// everything meanwhile).
    snapshot_failures: u64,
    /// Snapshots installed from a leader since the partition opened (a replica that fell
    /// behind what the leader's log still holds).
    snapshots_installed: u64,
    /// After a snapshot failed, no whole one is started for a peer before then (a full disk
    /// or an oversized state would otherwise restart the copy and encode at every turn).
    whole_snapshot_not_before: Option<std::time::Instant>,
    /// The snapshot being encoded and written off the shard (at most one at a time).
    snapshot_in_flight: Option<SnapshotInFlight>,
    /// Snapshots adopted since they were last taken, for metrics.
    snapshots_taken: Vec<SnapshotTaken>,
    /// Committed entries whose data did not decode as a command (never expected).
    undecodable_entries: u64,
    /// The format proposals are written in (see `write_commands_in`).
    command_format: u8,
    /// Durable writes (one fdatasync each) since they were last taken, for metrics.
    writes: Vec<LogWrite>,
    /// Times this node became the group's leader.
    elections_won: u64,
    /// Whether it led at the end of the last `process`.
    leading: bool,
    /// The spec store's segments (none without a store), which a linked snapshot's thread
    /// syncs and lists.
    spec_files: Option<SegmentFiles>,
    /// The segments the newest snapshot lists, when it is a linked one: held so their files
    /// stay while it is the newest, whatever the jobs in them became since.
    snapshot_segments: Vec<std::sync::Arc<FileSegment>>,
    /// A `Ready` whose write `begin_write` began; `process` finishes it first.
    begun: Option<BegunWrite>,
}

/// A `Ready` taken by `Partition::begin_write` and not yet handled by `process`.
struct BegunWrite {
    ready: sundial_consensus::Ready,
    started: std::time::Instant,
    write: BegunState,
}

/// Where a begun write is.
enum BegunState {
    /// Not begun (a snapshot to install first): `process` persists the `Ready` whole.
    Whole,
    /// Begun; `finish_write` waits for it.
    InFlight,
    /// Durable (or failed) after this long.
    Done(Result<(), WalError>, std::time::Duration),
}

/// One durable write of the log: how long it took and how many entries it carried.
#[derive(Clone, Copy, Debug)]
pub struct LogWrite {
    pub duration: std::time::Duration,
    pub entries: usize,
}

/// A snapshot encoded and written on a thread of its own; the shard adopts it when done.
struct SnapshotInFlight {
    worker: Pending<Result<WrittenOffShard, String>>,
    /// Set when the partition goes away: the thread gives up between chunks of its write.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// When the shard began copying the state.
    started: std::time::Instant,
    /// How long the copy stopped the shard (adopting the file stops it again).
    shard_pause: std::time::Duration,
    /// It is a linked snapshot (adopted only while the partition still links its snapshots).
    linked: bool,
}

/// What a partition opens with: its state (or the meta group's membership) as the newest
/// snapshot holds it, and its spec store.
struct Restored {
    state: State,
    members: Option<Members>,
    spec_files: Option<SegmentFiles>,
    snapshot_segments: Vec<std::sync::Arc<FileSegment>>,
}

/// Restores the newest snapshot in `storage`: a linked one's specs are found in the spec
/// store's segments it lists (checked), which the store then keeps; a whole one's go into
/// a store opened empty.
fn restore(dir: &Path, options: &PartitionOptions, storage: &WalStorage) -> Result<Restored, PartitionError> {
    let snapshot = storage.snapshot();
    let snapshot_error = |e: String| PartitionError::Snapshot(e);
    let listed = match options.members {
        None => State::linked_segments(&snapshot.data).map_err(|e| snapshot_error(e.to_string()))?,
        Some(_) => Vec::new(),
    };
    let mut spec_store = None;
    let mut spec_files = None;
    let mut snapshot_segments = Vec::new();
    let mut listed_segments = BTreeMap::new();
    if let (None, Some(segment_bytes)) = (&options.members, options.spec_segment_bytes) {
        match SpecStore::open(dir, segment_bytes, SEGMENTS_MAX_DEFAULT, &listed) {
            Ok(opened) => {
                spec_files = Some(opened.store.files());
                spec_store = Some(opened.store);
                snapshot_segments = opened.held;
                listed_segments = opened.listed;
            }
            // The newest snapshot's specs are in that store: without it, it is not whole.
            Err(error) if !listed.is_empty() => return Err(snapshot_error(error.to_string())),
            // Without a store, specs stay in the heap (more memory, nothing lost).
            Err(error) => tracing::warn!(
                path = %dir.join(SPECS_DIR).display(), %error, "no spec store: this partition keeps its jobs' specs in memory"
            ),
        }
    }
    let (mut state, members) = match (&options.members, snapshot.data.is_empty()) {
        (Some(initial), true) => (State::new(), Some(initial.clone())),
        (Some(_), false) => (State::new(), Some(Members::restore(&snapshot.data).map_err(snapshot_error)?)),
        (None, true) => (State::new(), None),
        (None, false) => {
            (State::restore_linked(&snapshot.data, &listed_segments).map_err(|e| snapshot_error(e.to_string()))?, None)
        }
    };
    drop(listed_segments);
    if let Some(store) = spec_store {
        state.attach_spec_store(Box::new(store));
    }
    if options.members.is_none() && options.spec_segment_bytes.is_some() {
        match TombstoneFiles::open(dir) {
            Ok(store) => state.attach_tombstone_store(Box::new(store)),
            Err(error) => tracing::warn!(
                path = %dir.join(TOMBSTONES_DIR).display(), %error, "no tombstone store: this partition keeps its dedup window in memory"
            ),
        }
    }
    Ok(Restored { state, members, spec_files, snapshot_segments })
}

/// What the snapshot worker hands back: the file written, and the spec segments it lists
/// (a linked snapshot's), synced.
struct WrittenOffShard {
    plan: SnapshotPlan,
    written: WrittenSnapshot,
    segments: Vec<std::sync::Arc<FileSegment>>,
}

/// How long after a failed snapshot a whole one is tried again for a peer.
const WHOLE_SNAPSHOT_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// A linked snapshot is taken once the partition applied this fraction of its job count
/// since the last (a whole snapshot, once it applied as many as it holds): it writes the
/// table, not the specs, so taking it more often costs little and bounds the log a restart
/// replays to about this fraction of the jobs.
const LINKED_SNAPSHOT_JOBS_DIVISOR: u64 = 16;

/// One snapshot of the state machine, adopted: how long the shard stopped for it (the copy,
/// or the whole snapshot when taken on the spot), and how long until it was the log's.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotTaken {
    pub shard_pause: std::time::Duration,
    pub duration: std::time::Duration,
}

/// Snapshots written off the shards at once, in the whole process: each holds a copy of its
/// partition's records and its encoded bytes until written (then only a mapping of the
/// file), and its write competes with the logs' fdatasyncs. Measured: 16 partitions that reached their snapshot together, each on a
/// thread of its own, made fires at 1k/s up to 0.3 s late while filling at 10k creates/s.
/// A partition whose turn has not come snapshots at a later `process`.
const SNAPSHOTS_IN_FLIGHT_MAX: usize = 1;
static SNAPSHOTS_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A place among the `SNAPSHOTS_IN_FLIGHT_MAX`, given back when dropped (by the snapshot's
/// thread, once it wrote the file or failed).
struct SnapshotTurn;

impl SnapshotTurn {
    fn take() -> Option<SnapshotTurn> {
        use std::sync::atomic::Ordering;
        let taken = SNAPSHOTS_IN_FLIGHT
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < SNAPSHOTS_IN_FLIGHT_MAX).then_some(n + 1));
        // Made only when counted: a turn made and dropped on refusal (`then_some` builds its
        // value either way) would give back a place never taken, and once the count wrapped
        // below zero no partition would snapshot again.
        match taken {
            Ok(_) => Some(SnapshotTurn),
            Err(_) => None,
        }
    }
}

impl Drop for SnapshotTurn {
    fn drop(&mut self) {
        SNAPSHOTS_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Snapshots kept for metrics until taken; beyond it the oldest are dropped (metrics only).
const SNAPSHOTS_KEPT_MAX: usize = 64;

/// Writes kept for metrics until taken; beyond it the oldest are dropped (metrics only).
const LOG_WRITES_KEPT_MAX: usize = 4_096;

/// Where a partition's Raft group stands, for status pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaftStatus {
    pub leader: bool,
    pub term: u64,
    pub commit_index: Index,
    pub applied_index: Index,
    pub last_index: Index,
    pub snapshot_index: Index,
    /// The newest snapshot is a linked one (its specs stay in this replica's files).
    pub snapshot_linked: bool,
    pub snapshots_installed: u64,
}

impl Partition {
    /// Opens (or creates) the partition in `dir`: recovers the log, restores the newest
    /// snapshot, replays the committed entries after it, and (a single voter) elects itself.
    pub fn open(dir: impl AsRef<Path>, mut options: PartitionOptions) -> Result<Partition, PartitionError> {
        let dir = dir.as_ref();
        options.voters = initial_voters(dir, &options.voters)?;
        let storage = WalStorage::open(dir, options.wal, &options.voters)?;
        let Restored { mut state, members, spec_files, snapshot_segments } = restore(dir, &options, &storage)?;
        // Replaying the log's tail inserts up to one job per entry: room for them now is one
        // allocation instead of doublings (each a copy of the table, whose old buffers the
        // allocator keeps). The table's slots are not touched until used; the index's
        // control bytes are (one byte per entry reserved).
        if options.members.is_none() {
            state.expect_jobs(options.expected_jobs.min(RESERVED_JOBS_MAX));
            let tail_entries = storage.wal().last_index().saturating_sub(storage.snapshot().meta.index);
            state.reserve_jobs(usize::try_from(tail_entries).unwrap_or(usize::MAX).min(RESERVED_JOBS_MAX));
        }
        let mut config = Config::new(options.node_id);
        config.max_uncommitted_entries = options.max_uncommitted_entries;
        config.election_tick = options.election_ticks;
        config.heartbeat_tick = options.heartbeat_ticks;
        config.leader_patience_tick = options.leader_patience_ticks;
        config.seed = options.node_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(options.election_ticks);
        let node = RawNode::new(config, storage)?;
        let mut partition = Partition {
            node,
            state,
            members,
            options,
            proposed: Proposals::default(),
            reads: BTreeMap::new(),
            next_read_ticket: READ_TICKETS_FROM,
            next_ticket: 1,
            applied: Vec::new(),
            outbox: Vec::new(),
            leading_from: None,
            applied_since_snapshot: 0,
            snapshot_failures: 0,
            snapshots_installed: 0,
            whole_snapshot_not_before: None,
            snapshot_in_flight: None,
            snapshots_taken: Vec::new(),
            undecodable_entries: 0,
            command_format: sundial_engine::codec::COMMAND_FORMAT,
            writes: Vec::new(),
            elections_won: 0,
            leading: false,
            repack_cursor: None,
            spec_files,
            snapshot_segments,
            begun: None,
        };
        partition.process()?;
        if partition.options.voters == [partition.options.node_id] {
            partition.elect_self()?;
        }
        if let Some(files) = &partition.spec_files {
            files.activate();
        }
        Ok(partition)
    }

    /// A group of one campaigns after its election timeout: tick until it leads.
    fn elect_self(&mut self) -> Result<(), PartitionError> {
        const TICKS_MAX: u32 = 100;
        for _ in 0..TICKS_MAX {
            if self.is_leader() {
                return Ok(());
            }
            self.node.tick();
            self.process()?;
        }
        Err(PartitionError::NoLeader { ticks: TICKS_MAX })
    }

    pub fn is_leader(&self) -> bool {
        self.node.status().role == Role::Leader
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// One unit of Raft time; `reachable`: the members heard from lately
    /// (`PartitionOptions::leader_patience_ticks`).
    pub fn tick(&mut self, reachable: &[NodeId]) {
        debug_assert!(self.begun.is_none(), "a begun write is processed before the next tick");
        self.node.set_reachable(reachable);
        self.node.tick();
    }

    /// Moves live specs out of mostly dead spec segments, a bounded number of jobs looked at
    /// per call (the shard calls it every 100 ms), so those segments (files) can go.
    pub fn repack_specs(&mut self) {
        let (next, _moved) = self.state.repack_specs(self.repack_cursor, REPACK_JOBS_PER_TICK);
        self.repack_cursor = next;
    }

    /// A message from a peer replica of this group.
    pub fn step(&mut self, message: Message) {
        debug_assert!(self.begun.is_none(), "a begun write is processed before the next message");
        self.node.step(message);
    }

    /// Messages for peers produced since the last call (sent only after what they promise
    /// was persisted: `process` persists before it queues them).
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    pub fn node_id(&self) -> NodeId {
        self.options.node_id
    }

    /// Whether this replica takes proposals now: it leads and is not handing leadership over.
    pub fn accepts_proposals(&self) -> bool {
        self.is_leader() && !self.node.status().transferring
    }

    /// The node this replica believes leads the group.
    pub fn leader(&self) -> Option<NodeId> {
        self.node.status().leader
    }

    /// The group's voters.
    pub fn voters(&self) -> Vec<NodeId> {
        self.node.conf_state().voters
    }

    /// How far a follower's log matches this leader's (leaders only).
    pub fn follower_match(&self, id: NodeId) -> Option<Index> {
        self.node.match_index_of(id)
    }

    /// Hands leadership to `to` (balancing); refused unless this replica leads.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), ProposeError> {
        self.node.transfer_leader(to)
    }

    /// Writes commands and snapshots in `format` from now on: `codec::COMMAND_FORMAT`, or the
    /// newest an older member that replicates the partition reads (1: the spec archived inside
    /// each create; 0: JSON commands and snapshots).
    pub fn write_commands_in(&mut self, format: u8) {
        self.command_format = format.min(sundial_engine::codec::COMMAND_FORMAT);
    }

    /// Its commit backlog now (`CommitBacklog`): what the replica admits writes by.
    pub fn commit_backlog(&self) -> CommitBacklog {
        self.proposed.backlog(std::time::Instant::now())
    }

    pub fn propose_one(&mut self, command: &Command) -> Result<Ticket, PartitionError> {
        let data = sundial_engine::codec::encode_command_as(command, self.command_format);
        let bytes = data.len();
        let index = self.node.propose(data)?;
        Ok(self.track(index, bytes, None))
    }

    /// `propose_one`, keeping the command to apply as it is once its entry commits.
    fn propose_kept(&mut self, command: Command) -> Result<Ticket, PartitionError> {
        let data = sundial_engine::codec::encode_command_as(&command, self.command_format);
        let bytes = data.len();
        let index = self.node.propose(data)?;
        Ok(self.track(index, bytes, Some(Box::new(command))))
    }

    /// A ticket for the proposal now at `index`. A proposal still waiting at that index is
    /// from an older term whose entry was truncated: it is answered lost now, not never.
    fn track(&mut self, index: Index, bytes: usize, command: Option<Box<Command>>) -> Ticket {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        debug_assert!(ticket < READ_TICKETS_FROM, "proposal tickets stay below read tickets");
        let term = self.node.status().term;
        let proposal = Proposal { ticket, term, bytes, command };
        if let Some(lost) = self.proposed.insert(index, proposal, std::time::Instant::now()) {
            let reason = "leadership moved before the command committed; retry it";
            self.applied.push(Committed::abandoned(lost.ticket, reason));
        }
        ticket
    }

    /// Asks for a linearizable read: the ticket is answered (`Applied::Done`) once this
    /// replica's state includes every write acknowledged before the read was asked.
    pub fn read(&mut self) -> Result<Ticket, ProposeError> {
        let ticket = self.next_read_ticket;
        self.node.read_index(ticket)?;
        self.next_read_ticket += 1;
        self.reads.insert(ticket, (None, std::time::Instant::now()));
        Ok(ticket)
    }

    /// Persists, applies and acknowledges everything Raft has ready. Durable when it returns:
    /// an outcome taken after it belongs to a command that survives a crash.
    pub fn process(&mut self) -> Result<(), PartitionError> {
        if let Err(error) = self.finish_snapshot() {
            self.snapshot_failed();
            tracing::warn!(%error, "a snapshot written off the shard was not adopted; the log keeps its entries");
        }
        if self.whole_snapshot_wanted() {
            // For an older member (it reads JSON only), one in JSON, on the spot.
            let started = if self.command_format == 0 { self.compact() } else { self.start_snapshot() };
            if let Err(error) = started {
                self.snapshot_failed();
                tracing::warn!(%error, "could not make the whole snapshot a peer needs; trying again in 5 s");
            }
        }
        // Bounded: a single node produces a finite amount of work between inputs.
        for _ in 0..1_000 {
            let Some((mut ready, write_duration)) = self.persist_ready()? else { return Ok(()) };
            if !ready.entries.is_empty() {
                if self.writes.len() >= LOG_WRITES_KEPT_MAX {
                    self.writes.remove(0);
                }
                self.writes.push(LogWrite { duration: write_duration, entries: ready.entries.len() });
            }
            // Sent only now: what they promise (votes, appended entries) is durable.
            self.outbox.append(&mut ready.messages);
            for read in &ready.read_states {
                if let Some((slot, _)) = self.reads.get_mut(&read.context) {
                    *slot = Some(read.index);
                }
            }
            if let Some(snapshot) = &ready.snapshot {
                self.snapshots_installed += 1;
                if self.members.is_some() {
                    self.members = Some(Members::restore(&snapshot.data).map_err(PartitionError::Snapshot)?);
                } else {
                    let mut restored =
                        State::restore(&snapshot.data).map_err(|e| PartitionError::Snapshot(e.to_string()))?;
                    if let Some(store) = self.state.detach_spec_store() {
                        restored.attach_spec_store(store);
                    }
                    if let Some(store) = self.state.detach_tombstone_store() {
                        restored.attach_tombstone_store(store);
                    }
                    self.state = restored;
                    self.repack_cursor = None;
                    // The leader's snapshot is whole in itself (never a linked one).
                    self.snapshot_segments.clear();
                }
                // Proposals at indexes the snapshot covers are never applied here: lost.
                for lost in self.proposed.take_through(snapshot.meta.index) {
                    let reason = "leadership moved before the command committed; retry it";
                    self.applied.push(Committed::abandoned(lost.ticket, reason));
                }
            }
            for entry in &ready.committed_entries {
                if !matches!(entry.kind, EntryKind::Normal) || entry.data.is_empty() {
                    // A membership change or a new leader's no-op took the index of a
                    // proposal of an older term, if one waits there: answered lost now, so
                    // it does not wait out its limit as the oldest of the commit backlog.
                    if let Some(lost) = self.proposed.remove(entry.index) {
                        let reason = "leadership moved before the command committed; retry it";
                        self.applied.push(Committed::abandoned(lost.ticket, reason));
                    }
                }
                match &entry.kind {
                    EntryKind::ConfChange(change) => {
                        self.node.apply_conf_change(*change);
                    }
                    EntryKind::Normal if entry.data.is_empty() => {} // a new leader's no-op
                    EntryKind::Normal => {
                        let (ticket, kept) = match self.proposed.remove(entry.index) {
                            Some(proposal) if proposal.term == entry.term => (Some(proposal.ticket), proposal.command),
                            Some(lost) => {
                                let reason = "leadership moved before the command committed; retry it";
                                self.applied.push(Committed::abandoned(lost.ticket, reason));
                                (None, None)
                            }
                            None => (None, None),
                        };
                        if let Some(members) = &mut self.members {
                            let verdict = match serde_json::from_slice::<MembersCommand>(&entry.data) {
                                Ok(command) => members.apply(command),
                                Err(e) => Err(ApplyError::Conflict(format!("not a membership change: {e}"))),
                            };
                            self.applied.push(Committed {
                                ticket,
                                job: None,
                                stops_attempts: false,
                                key: None,
                                reshapes: Default::default(),
                                verdict,
                            });
                            self.applied_since_snapshot += 1;
                            continue;
                        }
                        // The entry at this index and term is the one proposed here: its
                        // command is applied as kept (the bytes are its encoding).
                        let decoded = match kept {
                            Some(command) => Ok(*command),
                            None => decode_command(&entry.data),
                        };
                        match decoded {
                            Ok(command) => {
                                let summary = Committed::of(&command, ticket, Ok(Applied::Done));
                                let verdict = self.state.apply(command);
                                self.applied.push(Committed { verdict, ..summary });
                            }
                            // A newer member's command, or an archive this build does not read:
                            // skipping it would let this replica's state part from its peers'.
                            // Nothing more is applied (JSON that does not decode is skipped
                            // and counted, as builds before the format byte did).
                            Err(
                                error @ (DecodeError::UnknownFormat { .. } | DecodeError::Damaged { format: 1.., .. }),
                            ) => {
                                return Err(PartitionError::Format(error.to_string()));
                            }
                            Err(_) => {
                                self.undecodable_entries += 1;
                                if let Some(ticket) = ticket {
                                    self.applied.push(Committed::abandoned(ticket, "the entry did not decode"));
                                }
                            }
                        }
                    }
                }
                self.applied_since_snapshot += 1;
            }
            self.state.store_new_specs();
            self.node.advance(ready);
            self.answer_reads();
            // A single voter wins inside `tick`, so a change of role is seen here.
            if self.is_leader() && !self.leading {
                self.elections_won += 1;
                self.leading_from = Some(self.node.status().last_index);
            }
            if !self.is_leader() && self.leading {
                self.leading_from = None;
                self.abandon_reads();
                // Proposals wait up to `PROPOSAL_WAIT_MAX` for the next leader's verdict;
                // their entries, if they commit, are decoded like any follower's.
                self.proposed.forget_commands();
            }
            self.leading = self.is_leader();
            // A failed snapshot is not the applied commands' failure: they are committed.
            if self.seed_snapshot().is_err() || self.maybe_snapshot().is_err() {
                self.snapshot_failures += 1;
                self.applied_since_snapshot = 0;
            }
        }
        Ok(())
    }

    /// Begins writing what the log has ready without waiting for it to be durable; the next
    /// `process` finishes it and goes on from there. A shard begins every partition's write
    /// before it processes any, so their fdatasyncs run at once (the file system commits
    /// them together) rather than one after another on its thread. Nothing may step or
    /// tick this partition in between.
    pub fn begin_write(&mut self) {
        if self.begun.is_some() || !self.node.has_ready() {
            return;
        }
        let ready = self.node.ready();
        let started = std::time::Instant::now();
        let write = match ready.snapshot {
            Some(_) => BegunState::Whole,
            None => match self.node.storage_mut().persist_begin(&ready) {
                Ok(()) => BegunState::InFlight,
                Err(error) => BegunState::Done(Err(error), started.elapsed()),
            },
        };
        self.begun = Some(BegunWrite { ready, started, write });
    }

    /// Waits until the write `begin_write` began is durable (so its duration is the
    /// write's, not the time the shard took to come back to it).
    pub fn finish_write(&mut self) {
        if let Some(begun @ BegunWrite { write: BegunState::InFlight, .. }) = &mut self.begun {
            let done = self.node.storage_mut().persist_finish();
            begun.write = BegunState::Done(done, begun.started.elapsed());
        }
    }

    /// Whether `begin_write` took a `Ready` that `process` has not handled yet.
    pub fn write_begun(&self) -> bool {
        self.begun.is_some()
    }

    /// The next `Ready` (the one `begin_write` took first), persisted, with how long its
    /// write took; `None` when the log has nothing ready.
    fn persist_ready(&mut self) -> Result<Option<(sundial_consensus::Ready, std::time::Duration)>, PartitionError> {
        self.finish_write();
        let (ready, started) = match self.begun.take() {
            Some(BegunWrite { ready, write: BegunState::Done(done, duration), .. }) => {
                done?;
                return Ok(Some((ready, duration)));
            }
            Some(BegunWrite { ready, started, .. }) => (ready, started),
            None if self.node.has_ready() => (self.node.ready(), std::time::Instant::now()),
            None => return Ok(None),
        };
        if ready.snapshot.as_ref().is_some_and(|snapshot| State::is_linked_snapshot(&snapshot.data)) {
            // Only the replica that wrote it can read it (its specs are in that replica's
            // files): refused before it is saved, so this replica's data stays as it was.
            return Err(PartitionError::Snapshot(
                "the leader sent a linked snapshot (format 5), which only its own replica can read; not installed"
                    .into(),
            ));
        }
        self.node.storage_mut().persist(&ready)?;
        Ok(Some((ready, started.elapsed())))
    }

    /// Reads whose index this replica has applied are answered.
    fn answer_reads(&mut self) {
        let applied = self.node.status().applied;
        let ready: Vec<Ticket> =
            self.reads.iter().filter(|(_, (index, _))| index.is_some_and(|i| i <= applied)).map(|(t, _)| *t).collect();
        for ticket in ready {
            self.reads.remove(&ticket);
            self.applied.push(Committed {
                ticket: Some(ticket),
                job: None,
                stops_attempts: false,
                key: None,
                reshapes: Default::default(),
                verdict: Ok(Applied::Done),
            });
        }
    }

    /// This replica stopped leading: its reads are not confirmed (retrying one is safe).
    /// Its proposals stay: each is answered when its index is applied — its verdict when
    /// the entry there is the one proposed (the next leader committed it), "lost" when the
    /// next leader put another there.
    fn abandon_reads(&mut self) {
        for ticket in std::mem::take(&mut self.reads).into_keys() {
            self.applied.push(Committed::abandoned(ticket, "leadership moved during the read; retry it"));
        }
    }

    /// Proposals and reads not answered in time (this replica cannot reach a quorum, or
    /// a read's request to the leader was lost) are answered "unknown" rather than never.
    fn expire_waiting(&mut self) {
        let now = std::time::Instant::now();
        for proposal in self.proposed.take_expired(now, PROPOSAL_WAIT_MAX) {
            let reason = format!("not committed within {PROPOSAL_WAIT_MAX:?}; the outcome is unknown, retry it");
            self.applied.push(Committed::abandoned(proposal.ticket, reason));
        }
        for (ticket, _) in take_expired(&mut self.reads, now, READ_WAIT_MAX) {
            self.applied.push(Committed::abandoned(ticket, "the read was not confirmed in time; retry it"));
        }
    }

    /// A replica that knows the group's initial membership snapshots once it has applied
    /// the first entry, so no replica's log starts at index 1 any more: a replica added
    /// later, which starts empty, is then always sent a snapshot (carrying the membership)
    /// first, whichever replica leads — never entries from 1, which would leave it blind to
    /// the initial voters.
    fn seed_snapshot(&mut self) -> Result<(), PartitionError> {
        if self.snapshot_index() > 0 || self.node.status().applied == 0 || self.options.voters.is_empty() {
            return Ok(());
        }
        self.compact()
    }

    /// Snapshots once `snapshot_every_entries` entries were applied since the last one, and
    /// no sooner than the state holds jobs: a snapshot writes every job, so with a large state
    /// a fixed interval would spend more time snapshotting than applying (measured: a 100k-job
    /// snapshot costs ~0.2 s of CPU, docs/BENCHMARKS.md). Waiting one entry per job keeps the
    /// cost per applied entry bounded (about one job's encoding) and replay after a crash at
    /// most about as long as the state.
    fn maybe_snapshot(&mut self) -> Result<(), PartitionError> {
        if self.node.peer_needs_snapshot() && !self.newest_snapshot_is_linked() {
            // The newest is being sent to a peer (or about to be): a newer one would start
            // the transfer over. The log keeps its entries meanwhile.
            return Ok(());
        }
        let state_size = self.members.as_ref().map_or(self.state.job_count() as u64, |_| 0);
        let wait_entries = if self.links_snapshots() { state_size / LINKED_SNAPSHOT_JOBS_DIVISOR } else { state_size };
        if self.snapshot_in_flight.is_some()
            || self.applied_since_snapshot < self.options.snapshot_every_entries.max(wait_entries)
        {
            return Ok(());
        }
        if self.members.is_some() || self.command_format == 0 {
            return self.compact();
        }
        self.start_snapshot()
    }

    /// Whether the newest snapshot is a linked one (readable only with this replica's files).
    fn newest_snapshot_is_linked(&self) -> bool {
        State::is_linked_snapshot(&self.node.storage().snapshot().data)
    }

    /// Whether this partition's snapshots are linked (the table, the specs left in the store's
    /// segments): with a spec store, in a partition of jobs, and not while a peer needs a
    /// snapshot. A linked snapshot is whole only together with this replica's files, so no
    /// peer is ever sent one (`WalStorage::snapshot_to_send`): when a peer needs one, the
    /// leader makes a whole one (`whole_snapshot_wanted`) and keeps it the newest until the
    /// peer installed it. A leader about to add a replica takes a whole one first (`compact`).
    fn links_snapshots(&self) -> bool {
        // A partition writing JSON for an older member snapshots in JSON, on the spot.
        self.spec_files.is_some()
            && self.members.is_none()
            && self.command_format != 0
            && !self.node.peer_needs_snapshot()
    }

    /// Counts a snapshot that failed, and holds whole snapshots for a peer back a while.
    fn snapshot_failed(&mut self) {
        self.snapshot_failures += 1;
        self.whole_snapshot_not_before = Some(std::time::Instant::now() + WHOLE_SNAPSHOT_RETRY);
    }

    /// Whether to start a whole snapshot now: a peer needs one and the newest is linked, and
    /// none is being written (a linked one being written is dropped when it is done).
    fn whole_snapshot_wanted(&self) -> bool {
        self.snapshot_in_flight.is_none()
            && self.whole_snapshot_not_before.is_none_or(|at| std::time::Instant::now() >= at)
            && self.node.peer_needs_snapshot()
            && self.newest_snapshot_is_linked()
    }

    /// Starts a snapshot of the state at the applied index on a thread of its own: the shard
    /// copies the state's records (a stored spec is shared, not read); the thread encodes
    /// them and writes and syncs the file; `finish_snapshot` adopts it and cuts the log.
    fn start_snapshot(&mut self) -> Result<(), PartitionError> {
        let Some(turn) = SnapshotTurn::take() else { return Ok(()) };
        self.applied_since_snapshot = 0;
        let applied = self.node.status().applied;
        // A whole snapshot replaces a linked one even at the same index: a peer needs it.
        let replace_linked = self.newest_snapshot_is_linked() && !self.links_snapshots();
        let Some(plan) = self.node.storage().plan_snapshot(applied, self.node.conf_state(), replace_linked)? else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let mut copy = self.state.copy_for_snapshot();
        let last_bytes = self.node.storage().snapshot().data.len();
        let capacity_bytes = last_bytes + last_bytes / 8;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_here = stop.clone();
        let linked = self.links_snapshots().then(|| self.spec_files.clone()).flatten();
        let is_linked = linked.is_some();
        let dir = self.node.storage().wal().dir().to_path_buf();
        let lands_at_bytes = plan.data_offset_bytes();
        let worker = snapshot_worker::run(move || {
            let _turn = turn;
            let mut segments = Vec::new();
            let data = match linked {
                None => copy.encode(capacity_bytes),
                Some(files) => {
                    // The segments first, durable up to what the snapshot lists, and
                    // their names: the snapshot is renamed into place only after.
                    let mut list = Vec::new();
                    for segment in copy.link() {
                        let number = segment.number();
                        let file = files.get(number).ok_or_else(|| format!("spec segment {number} is gone"))?;
                        list.push(
                            file.make_durable().map_err(|error| format!("syncing spec segment {number}: {error}"))?,
                        );
                        segments.push(file);
                    }
                    SegmentFiles::sync_dir(&dir)
                        .map_err(|error| format!("syncing the spec segments' directory: {error}"))?;
                    copy.encode_linked(&list, lands_at_bytes, capacity_bytes)
                }
            }
            .map_err(|error| error.to_string())?;
            drop(copy);
            let written = plan.write(&data, &stop_here).map_err(|error| error.to_string())?;
            Ok(WrittenOffShard { plan, written, segments })
        })
        .map_err(PartitionError::Snapshot)?;
        let shard_pause = started.elapsed();
        self.snapshot_in_flight = Some(SnapshotInFlight { worker, stop, started, shard_pause, linked: is_linked });
        Ok(())
    }

    /// Adopts the snapshot written off the shard, once its thread is done (a snapshot from
    /// the leader that came meanwhile supersedes it: its file is then removed).
    fn finish_snapshot(&mut self) -> Result<(), PartitionError> {
        if !self.snapshot_in_flight.as_mut().is_some_and(|in_flight| in_flight.worker.is_finished()) {
            return Ok(());
        }
        let Some(SnapshotInFlight { worker, started, shard_pause, linked, .. }) = self.snapshot_in_flight.take() else {
            return Ok(());
        };
        let WrittenOffShard { plan, written, segments } = match worker.wait() {
            Some(written) => written.map_err(PartitionError::Snapshot)?,
            None => return Err(PartitionError::Snapshot("the snapshot's work panicked".into())),
        };
        if linked && !self.links_snapshots() {
            // A peer needs a snapshot now: the newest must be one it can install.
            return Ok(());
        }
        let adopting = std::time::Instant::now();
        let adopted = match self.node.storage_mut().adopt_snapshot(plan, written) {
            Ok(adopted) => adopted,
            Err(error) => {
                // It may have been renamed into place before the error: keep what it lists.
                self.snapshot_segments.extend(segments);
                return Err(error.into());
            }
        };
        if adopted {
            // Only now may the segments the last snapshot listed (and this one does not) go.
            self.snapshot_segments = segments;
            let shard_pause = shard_pause + adopting.elapsed();
            self.snapshot_taken(SnapshotTaken { shard_pause, duration: started.elapsed() });
        }
        Ok(())
    }

    /// Snapshots the state machine at the applied index (the log before it goes once a
    /// whole segment of it can: `WalStorage::adopt_snapshot`). A
    /// leader does so before adding a replica, so the newcomer starts from a snapshot that
    /// carries the group's membership (an empty log would not).
    pub fn compact(&mut self) -> Result<(), PartitionError> {
        let started = std::time::Instant::now();
        let applied = self.node.status().applied;
        let conf = self.node.conf_state();
        // A whole snapshot replaces a linked one even at the same index: a replica about to be
        // added may be sent the newest, and could not read a linked one.
        let replace = self.newest_snapshot_is_linked();
        let taken = match &self.members {
            Some(members) => self.node.storage_mut().compact(applied, &members.snapshot(), conf, false)?,
            // A member of an older build (it reads format 0 only) may be sent this snapshot.
            None if self.command_format == 0 => {
                let data = self.state.snapshot_json().map_err(|e| PartitionError::Snapshot(e.to_string()))?;
                self.node.storage_mut().compact(applied, &data, conf, replace)?
            }
            None => {
                let last_bytes = self.node.storage().snapshot().data.len();
                let data = self
                    .state
                    .snapshot_sized(last_bytes + last_bytes / 8)
                    .map_err(|e| PartitionError::Snapshot(e.to_string()))?;
                self.node.storage_mut().compact(applied, &data, conf, replace)?
            }
        };
        self.applied_since_snapshot = 0;
        if taken {
            // Whole in itself: the segments the last snapshot listed are no longer needed.
            self.snapshot_segments.clear();
            let elapsed = started.elapsed();
            self.snapshot_taken(SnapshotTaken { shard_pause: elapsed, duration: elapsed });
        }
        Ok(())
    }

    fn snapshot_taken(&mut self, taken: SnapshotTaken) {
        if self.snapshots_taken.len() >= SNAPSHOTS_KEPT_MAX {
            self.snapshots_taken.remove(0);
        }
        self.snapshots_taken.push(taken);
    }

    /// The snapshots adopted since the last call (for metrics).
    pub fn take_snapshots(&mut self) -> Vec<SnapshotTaken> {
        std::mem::take(&mut self.snapshots_taken)
    }

    /// The meta group's membership (`None` for a partition of jobs).
    pub fn members(&self) -> Option<&Members> {
        self.members.as_ref()
    }

    /// Proposes a membership change (meta group, leader only); answered by its ticket.
    pub fn propose_members(&mut self, command: &MembersCommand) -> Result<Ticket, PartitionError> {
        let data = serde_json::to_vec(command).expect("membership changes serialize");
        let bytes = data.len();
        let index = self.node.propose(data)?;
        Ok(self.track(index, bytes, None))
    }

    /// One step toward the replicas `placed` (leader only; one single-server change at a
    /// time, each after the last committed): a missing replica joins as a learner (after a
    /// snapshot, which carries the group's membership), a caught-up learner becomes a voter,
    /// and only then is a replica no longer placed removed. A leader that is itself to go
    /// hands leadership to a placed voter first. `kind` names the group in logs.
    pub fn reconcile(&mut self, placed: &[NodeId], me: NodeId, kind: &str) {
        if !self.is_leader() || placed.is_empty() {
            return;
        }
        let voters = self.voters();
        let learners = self.learners();
        let change = if let Some(new) = placed.iter().find(|id| !voters.contains(id) && !learners.contains(id)) {
            // The newcomer starts from a snapshot: one taken now carries the membership.
            if let Err(error) = self.compact() {
                tracing::warn!(%error, "could not snapshot before adding a replica");
                return;
            }
            if self.newest_snapshot_is_linked() || self.snapshot_in_flight.as_ref().is_some_and(|s| s.linked) {
                // Never happens after a compaction that succeeded; a newcomer could not read it.
                tracing::warn!("the newest snapshot is still a linked one: the replica is added later");
                return;
            }
            ConfChange::AddLearner(*new)
        } else if let Some(learner) = learners.iter().find(|id| placed.contains(id)) {
            ConfChange::AddVoter(*learner)
        } else if let Some(gone) = voters.iter().find(|id| !placed.contains(id)) {
            if *gone == me {
                // Leadership goes to a placed voter that has caught up; it removes this node.
                let last = self.raft_status().last_index;
                if let Some(next) =
                    placed.iter().find(|id| voters.contains(id) && self.follower_match(**id).is_some_and(|m| m >= last))
                {
                    let _ = self.transfer_leader(*next);
                }
                return;
            }
            ConfChange::Remove(*gone)
        } else if let Some(learner) = learners.first() {
            ConfChange::Remove(*learner)
        } else {
            return;
        };
        match self.propose_conf_change(change) {
            Ok(_) => tracing::info!(group = kind, ?change, "changing the group's replicas"),
            Err(error) => tracing::debug!(group = kind, ?change, %error, "a replica change waits"),
        }
    }

    /// Hands leadership to `preferred` when this replica leads and `preferred` is a voter
    /// that has caught up; true when a transfer started.
    pub fn hand_leadership_to(&mut self, preferred: NodeId) -> bool {
        if preferred == self.node_id() || !self.is_leader() {
            return false;
        }
        let last = self.raft_status().last_index;
        let caught_up = self.follower_match(preferred).is_some_and(|matched| matched >= last);
        self.voters().contains(&preferred) && caught_up && self.transfer_leader(preferred).is_ok()
    }

    /// Whether the group's membership no longer includes this replica (it was removed). A
    /// replica created empty, still waiting for its first snapshot, is not "removed".
    pub fn is_removed(&self) -> bool {
        let conf = self.node.conf_state();
        let me = self.options.node_id;
        let started = self.snapshot_index() > 0 || self.node.status().applied > 0;
        started && !conf.voters.contains(&me) && !conf.learners.contains(&me)
    }

    /// The group's learners (replicas catching up before they vote).
    pub fn learners(&self) -> Vec<NodeId> {
        self.node.conf_state().learners
    }

    /// Proposes a single-server membership change of the group (leader only).
    pub fn propose_conf_change(&mut self, change: sundial_consensus::ConfChange) -> Result<Index, ProposeError> {
        self.node.propose_conf_change(change)
    }

    /// Committed entries that were not commands (corruption the checksums missed, or a
    /// newer format): counted, skipped alike on every replica.
    pub fn undecodable_entries(&self) -> u64 {
        self.undecodable_entries
    }

    /// The durable writes made since the last call (for metrics).
    pub fn take_writes(&mut self) -> Vec<LogWrite> {
        std::mem::take(&mut self.writes)
    }

    pub fn elections_won(&self) -> u64 {
        self.elections_won
    }

    pub fn raft_status(&self) -> RaftStatus {
        let status = self.node.status();
        RaftStatus {
            leader: self.is_leader(),
            term: status.term,
            commit_index: status.committed,
            applied_index: status.applied,
            last_index: status.last_index,
            snapshot_index: self.snapshot_index(),
            snapshot_linked: self.newest_snapshot_is_linked(),
            snapshots_installed: self.snapshots_installed,
        }
    }

    /// How the log makes writes durable: "io_uring" or "pwrite".
    pub fn log_backend(&self) -> &'static str {
        match self.node.storage().wal().backend() {
            sundial_wal::SyncBackend::IoUring => "io_uring",
            sundial_wal::SyncBackend::Syscall => "pwrite",
        }
    }

    pub fn snapshot_failures(&self) -> u64 {
        self.snapshot_failures
    }

    /// Index of the newest snapshot (0 before the first).
    pub fn snapshot_index(&self) -> Index {
        self.node.storage().snapshot().meta.index
    }
}

/// The membership a group started with. Raft's log does not hold it (only changes to it),
/// so it is written next to the log when the group is created and read back on every
/// open; a group created empty (a replica added later) learns it from the leader's snapshot.
fn initial_voters(dir: &Path, voters: &[NodeId]) -> Result<Vec<NodeId>, PartitionError> {
    let path = dir.join("initial-voters.json");
    let io =
        |e: std::io::Error| PartitionError::Wal(WalError::Io { op: "initial voters", path: path.clone(), source: e });
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            let reason = format!("{}: not a list of node ids ({e})", path.display());
            PartitionError::Wal(WalError::Inconsistent { path: path.clone(), reason })
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if voters.is_empty() {
                return Ok(Vec::new());
            }
            std::fs::create_dir_all(dir).map_err(io)?;
            let partial = dir.join("initial-voters.json.partial");
            let mut file = std::fs::File::create(&partial).map_err(io)?;
            std::io::Write::write_all(&mut file, &serde_json::to_vec(voters).expect("ids serialize")).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&partial, &path).map_err(io)?;
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            Ok(voters.to_vec())
        }
        Err(e) => Err(io(e)),
    }
}

impl CommandLog for Partition {
    /// Proposes every command; `process` (through `advance`) persists them with one
    /// fdatasync and, once a quorum has them, applies them. A refused proposal (not the
    /// leader, overload) is that command's verdict alone.
    fn propose(&mut self, commands: Vec<Command>) -> Vec<Result<Ticket, ApplyError>> {
        commands
            .into_iter()
            .map(|command| match self.propose_kept(command) {
                Ok(ticket) => Ok(ticket),
                Err(PartitionError::Propose(refused)) => Err(ApplyError::Unavailable(refused.to_string())),
                Err(other) => Err(ApplyError::Unavailable(other.to_string())),
            })
            .collect()
    }

    fn advance(&mut self) -> Result<Vec<Committed>, LogError> {
        self.process().map_err(|error| LogError(error.to_string()))?;
        if !self.proposed.is_empty() || !self.reads.is_empty() {
            self.expire_waiting();
        }
        Ok(std::mem::take(&mut self.applied))
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn leadership(&self) -> Option<u64> {
        let caught_up = self.leading_from.is_some_and(|from| self.node.status().applied >= from);
        (self.is_leader() && caught_up).then_some(self.node.status().term)
    }

    fn command_format(&self) -> u8 {
        self.command_format
    }

    fn leads_alone(&self) -> bool {
        self.is_leader() && self.node.conf_state().voters == [self.node_id()]
    }

    fn last_index(&self) -> u64 {
        self.node.status().last_index
    }
}

/// A command proposed here and waiting for its entry to be applied.
struct Proposal {
    ticket: Ticket,
    /// The term it was proposed in: the entry applied at its index is this one only in it.
    term: Term,
    /// Its entry's data.
    bytes: usize,
    /// The command, when kept to be applied as it is (boxed: most commands are small).
    command: Option<Box<Command>>,
}

/// Proposals waiting for their entries to be applied, by index, with when each was made
/// and their bytes in all (a leader's commit backlog).
#[derive(Default)]
struct Proposals {
    by_index: BTreeMap<Index, (Proposal, std::time::Instant)>,
    bytes: usize,
}

impl Proposals {
    /// Adds one; returns the proposal it replaced at that index (one of an older term).
    fn insert(&mut self, index: Index, proposal: Proposal, at: std::time::Instant) -> Option<Proposal> {
        self.bytes += proposal.bytes;
        let replaced = self.by_index.insert(index, (proposal, at)).map(|(replaced, _)| replaced);
        self.bytes -= replaced.as_ref().map_or(0, |replaced| replaced.bytes);
        replaced
    }

    fn remove(&mut self, index: Index) -> Option<Proposal> {
        let (removed, _) = self.by_index.remove(&index)?;
        self.bytes -= removed.bytes;
        Some(removed)
    }

    /// Removes and returns the proposals at `index` or below.
    fn take_through(&mut self, index: Index) -> Vec<Proposal> {
        let kept = self.by_index.split_off(&index.saturating_add(1));
        let taken: Vec<Proposal> =
            std::mem::replace(&mut self.by_index, kept).into_values().map(|(proposal, _)| proposal).collect();
        self.bytes -= taken.iter().map(|proposal| proposal.bytes).sum::<usize>();
        taken
    }

    /// Removes and returns the proposals waiting since `limit` or longer.
    fn take_expired(&mut self, now: std::time::Instant, limit: std::time::Duration) -> Vec<Proposal> {
        let expired = take_expired(&mut self.by_index, now, limit);
        let expired: Vec<Proposal> = expired.into_iter().map(|(_, proposal)| proposal).collect();
        self.bytes -= expired.iter().map(|proposal| proposal.bytes).sum::<usize>();
        expired
    }

    /// Drops the kept commands (a replica that stopped leading decodes what commits).
    fn forget_commands(&mut self) {
        for (proposal, _) in self.by_index.values_mut() {
            proposal.command = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.by_index.is_empty()
    }

    /// The backlog; its age is the lowest index's (the oldest proposal, but for one that
    /// replaced an older term's entry there: close enough to tell a lagging leader).
    fn backlog(&self, now: std::time::Instant) -> CommitBacklog {
        let oldest = self.by_index.first_key_value().map(|(_, (_, at))| *at);
        CommitBacklog {
            proposals: self.by_index.len(),
            bytes: self.bytes,
            oldest_wait: oldest.map_or(std::time::Duration::ZERO, |at| now.saturating_duration_since(at)),
        }
    }
}

/// How far a partition's commits lag behind its proposals: the proposals waiting for their
/// entries to be applied, their bytes, and how long the oldest has waited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitBacklog {
    pub proposals: usize,
    pub bytes: usize,
    pub oldest_wait: std::time::Duration,
}

/// Removes and returns the entries (key and value) waiting since `limit` or longer.
fn take_expired<V>(
    waiting: &mut BTreeMap<u64, (V, std::time::Instant)>,
    now: std::time::Instant,
    limit: std::time::Duration,
) -> Vec<(u64, V)> {
    let expired: Vec<u64> =
        waiting.iter().filter(|(_, (_, since))| now.duration_since(*since) >= limit).map(|(key, _)| *key).collect();
    expired.into_iter().filter_map(|key| waiting.remove(&key).map(|(value, _)| (key, value))).collect()
}

/// How long a proposal waits for its entry to be applied before its caller is answered
/// "unknown"; a read, before it is answered "retry".
const PROPOSAL_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);
const READ_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(3);

/// Read tickets live above every proposal ticket, so the two never collide.
const READ_TICKETS_FROM: Ticket = 1 << 62;

/// A partition that goes away (a node stopping, a replica removed and its directory deleted
/// next) first stops its snapshot in flight: the worker gives up its write between chunks, removes
/// its file, and is waited for, so nothing writes into the directory afterwards.
impl Drop for Partition {
    fn drop(&mut self) {
        if let Some(in_flight) = self.snapshot_in_flight.take() {
            in_flight.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = in_flight.worker.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_engine::request::parse_job_request;
    use sundial_engine::spec::PackedSpec;

    #[test]
    fn a_proposal_whose_index_is_proposed_again_is_answered_lost_and_never_for_the_new_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut partition = Partition::open(dir.path(), PartitionOptions::single_node(1)).expect("open");
        let request = serde_json::json!({"id": "a", "run_at": 1_900_000_000_000u64, "url": "https://example.com/"});
        let spec = parse_job_request(&request.to_string(), 1_800_000_000_000, "unused").expect("valid");
        let first = partition
            .propose_one(&Command::Create { spec: PackedSpec::of(&spec), now_ms: 0, dedup_window_ms: None })
            .expect("leads");
        // What a leader sees after its uncommitted tail was truncated and it leads again:
        // the same log index proposed anew. (Tickets used to be the index: the old request
        // was then never answered, or answered with the new entry's verdict.)
        let index = partition.node.status().last_index;
        let again = partition.track(index, 0, None);
        assert_ne!(first, again);
        let applied = partition.advance().expect("persisted");
        let verdict = |ticket| applied.iter().find(|c| c.ticket == Some(ticket)).map(|c| c.verdict.clone());
        assert!(
            matches!(verdict(first), Some(Err(ApplyError::Unavailable(reason))) if reason.contains("leadership moved")),
            "{applied:?}"
        );
        assert_eq!(verdict(again), Some(Ok(Applied::Created)), "the entry answers the proposal it belongs to");
    }

    #[test]
    fn the_commit_backlog_counts_what_waits_for_commit_and_since_when() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut partition = Partition::open(dir.path(), PartitionOptions::single_node(1)).expect("open");
        partition.advance().expect("leads");
        assert_eq!(partition.commit_backlog(), CommitBacklog::default());
        for i in 0..3 {
            partition.propose_one(&create(&format!("job-{i}"))).expect("leads");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let backlog = partition.commit_backlog();
        assert_eq!(backlog.proposals, 3);
        assert!(backlog.bytes > 3 * 40, "{backlog:?}");
        assert!(backlog.oldest_wait >= std::time::Duration::from_millis(20), "{backlog:?}");
        partition.advance().expect("persisted");
        assert_eq!(partition.commit_backlog(), CommitBacklog::default(), "applied: nothing waits");
    }

    #[test]
    fn a_proposal_whose_index_a_membership_change_took_is_answered_lost_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut partition = Partition::open(dir.path(), PartitionOptions::single_node(1)).expect("open");
        partition.advance().expect("leads");
        // What a leader re-elected in a later term may see: a proposal of its earlier term
        // waiting at an index that now holds an entry it did not track (a membership change
        // here; a new leader's no-op is the same case).
        let index = partition.node.status().last_index + 1;
        let stale = partition.track(index, 100, None);
        let taken = partition.node.propose_conf_change(ConfChange::AddLearner(9)).expect("leads");
        assert_eq!(taken, index);
        let applied = partition.advance().expect("persisted");
        let verdict = applied.iter().find(|c| c.ticket == Some(stale)).map(|c| c.verdict.clone());
        assert!(
            matches!(verdict, Some(Err(ApplyError::Unavailable(reason))) if reason.contains("leadership moved")),
            "{applied:?}"
        );
        assert_eq!(partition.commit_backlog(), CommitBacklog::default(), "not left to wait out its 10 s");
    }

    fn create(id: &str) -> Command {
        let request = serde_json::json!({"id": id, "run_at": 1_900_000_000_000u64, "url": "https://example.com/"});
        let spec = parse_job_request(&request.to_string(), 1_800_000_000_000, "unused").expect("valid");
        Command::Create { spec: PackedSpec::of(&spec), now_ms: 1_800_000_000_000, dedup_window_ms: None }
    }

    #[test]
    fn a_log_of_json_commands_from_an_older_build_reads_back_beside_archived_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut partition = Partition::open(dir.path(), PartitionOptions::single_node(1)).expect("open");
        partition.write_commands_in(0); // as a build before the format byte wrote them
        partition.propose_one(&create("json")).expect("leads");
        partition.advance().expect("persisted");
        drop(partition);
        let mut partition = Partition::open(dir.path(), PartitionOptions::single_node(1)).expect("reopen");
        assert!(partition.state().job("json").is_some(), "a JSON entry is read after a restart");
        partition.propose_one(&create("archived")).expect("leads");
        partition.advance().expect("persisted");
        drop(partition);
        let partition = Partition::open(dir.path(), PartitionOptions::single_node(1)).expect("reopen");
        assert!(partition.state().job("json").is_some() && partition.state().job("archived").is_some());
        assert_eq!(partition.undecodable_entries(), 0);
    }

    /// The leader applies the commands it proposed as it kept them; every other replica,
    /// and this one after a restart, decodes them from the log. Both must make the same
    /// state, in the archived formats (this one, and 1 for members of the build before) and
    /// in JSON (for members of older builds).
    #[test]
    fn commands_applied_as_kept_make_the_state_a_replay_of_the_log_makes() {
        for format in [sundial_engine::codec::COMMAND_FORMAT, 1, 0] {
            let dir = tempfile::tempdir().expect("tempdir");
            let options = || PartitionOptions { snapshot_every_entries: 1_000_000, ..PartitionOptions::single_node(1) };
            let mut partition = Partition::open(dir.path(), options()).expect("open");
            partition.write_commands_in(format);
            let now_ms = 1_800_000_000_000u64;
            let requests = [
                serde_json::json!({"id": "whole", "run_at": 1_900_000_000_000u64, "url": "https://example.com/a?b=c",
                    "method": "PUT", "headers": {"x-one": "1", "x-two": "2"}, "json": {"k": [1, 2.5, "é"]},
                    "labels": {"tenant": "42"}, "priority": 3,
                    "retry": {"max_attempts": 7, "backoff": "fixed", "initial_backoff_ms": 250, "jitter": 0.3}}),
                serde_json::json!({"id": "cron", "cron": "*/5 * * * *", "time_zone": "Europe/Paris",
                    "url": "https://example.com/c"}),
                serde_json::json!({"id": "other", "delay": "1h", "url": "https://example.com/o"}),
            ];
            let mut commands: Vec<Command> = requests
                .iter()
                .map(|request| {
                    let spec = parse_job_request(&request.to_string(), now_ms, "secret").expect("valid");
                    Command::Create { spec: PackedSpec::of(&spec), now_ms, dedup_window_ms: Some(86_400_000) }
                })
                .collect();
            commands.push(Command::Pause { id: "cron".into() });
            commands.push(Command::Cancel { id: "other".into(), now_ms: now_ms + 1 });
            let tickets = CommandLog::propose(&mut partition, commands);
            assert!(tickets.iter().all(Result::is_ok), "{tickets:?}");
            let applied = CommandLog::advance(&mut partition).expect("persisted");
            assert!(applied.iter().all(|c| c.verdict.is_ok()), "{applied:?}");
            let as_kept = partition.state().digest();
            drop(partition);
            let replayed = Partition::open(dir.path(), options()).expect("reopen");
            assert_eq!(replayed.state().job_count(), 3);
            assert_eq!(replayed.state().digest(), as_kept, "format {format}: the replay decodes to the same state");
        }
    }

    fn files_ending(dir: &Path, suffix: &str) -> usize {
        let names = std::fs::read_dir(dir).expect("read dir").map(|e| e.expect("entry").file_name());
        names.filter(|name| name.to_string_lossy().ends_with(suffix)).count()
    }

    /// Processes until no snapshot is in flight (its thread is done and it was adopted or
    /// dropped); bounded by a generous wait.
    fn settle_snapshot(partition: &mut Partition) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while partition.snapshot_in_flight.is_some() && std::time::Instant::now() < deadline {
            partition.process().expect("processed");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(partition.snapshot_in_flight.is_none(), "the snapshot's thread finished");
    }

    #[test]
    fn a_snapshot_written_off_the_shard_holds_the_state_where_it_started_and_a_newer_one_supersedes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = || PartitionOptions { snapshot_every_entries: 20, ..PartitionOptions::single_node(1) };
        let mut partition = Partition::open(dir.path(), options()).expect("open");
        let mut created = 0;
        // Bounded: a snapshot starts once 20 entries, and as many as there are jobs, applied.
        while partition.snapshot_in_flight.is_none() && created < 200 {
            partition.propose_one(&create(&format!("job-{created}"))).expect("leads");
            partition.advance().expect("persisted");
            created += 1;
        }
        assert!(partition.snapshot_in_flight.is_some(), "a snapshot started off the shard");
        let (started_at, jobs_then) = (partition.node.status().applied, partition.state().job_count());
        for i in 0..5 {
            partition.propose_one(&create(&format!("later-{i}"))).expect("leads");
            partition.advance().expect("persisted");
        }
        settle_snapshot(&mut partition);
        assert_eq!(partition.snapshot_index(), started_at, "adopted, at the index it started at");
        let restored = restore_newest_snapshot(&partition);
        assert_eq!(restored.job_count(), jobs_then, "it holds the state where it started");
        assert!(restored.job("later-0").is_none() && partition.state().job("later-0").is_some());
        // The entries before it are no longer the log's (their records go with the segment
        // that holds them, once a whole one can: `WalStorage::adopt_snapshot`).
        assert_eq!(sundial_consensus::Storage::first_index(partition.node.storage()), started_at + 1);
        assert_eq!(files_ending(dir.path(), ".tmp"), 0);

        // One started, then a newer one taken on the spot: the older, done later, is dropped.
        partition.start_snapshot().expect("started");
        // Held aside while the newer is taken, so it cannot be adopted first.
        let older = partition.snapshot_in_flight.take().expect("a snapshot in flight");
        partition.propose_one(&create("newest")).expect("leads");
        partition.advance().expect("persisted");
        partition.compact().expect("a snapshot taken on the spot");
        let newer = partition.snapshot_index();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut older = older;
        while !older.worker.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        partition.snapshot_in_flight = Some(older);
        settle_snapshot(&mut partition);
        assert_eq!(partition.snapshot_index(), newer, "the older snapshot is not adopted over the newer");
        assert_eq!((files_ending(dir.path(), ".tmp"), files_ending(dir.path(), ".snap")), (0, 1), "its file went");
        drop(partition);
        let reopened = Partition::open(dir.path(), options()).expect("reopen");
        assert_eq!(reopened.state().job_count(), created + 6, "every job after a restart");
        assert!(reopened.state().job("newest").is_some());
    }

    /// The partition's newest snapshot restored, its specs found in the segments the
    /// partition holds for it (a linked snapshot's) or in its own bytes.
    fn restore_newest_snapshot(partition: &Partition) -> State {
        let data = partition.node.storage().snapshot().data.clone();
        let listed = State::linked_segments(&data).expect("lists");
        let held: BTreeMap<u64, (std::sync::Arc<dyn sundial_engine::spec::SpecSegment>, u64)> = listed
            .iter()
            .map(|entry| {
                use sundial_engine::spec::SpecSegment as _;
                let segment = partition.snapshot_segments.iter().find(|s| s.number() == entry.number);
                let segment: std::sync::Arc<dyn sundial_engine::spec::SpecSegment> = segment.expect("held").clone();
                (entry.number, (segment, entry.len_bytes))
            })
            .collect();
        State::restore_linked(&data, &held).expect("the snapshot restores")
    }

    #[test]
    fn a_linked_snapshot_leaves_specs_in_their_segments_which_a_restart_maps_checked_and_dead_ones_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Small segments (64 KiB: ~150 of these specs each), so a thousand jobs fill several.
        let options = || PartitionOptions {
            spec_segment_bytes: Some(64 << 10),
            snapshot_every_entries: 1_000_000,
            ..PartitionOptions::single_node(1)
        };
        let mut partition = Partition::open(dir.path(), options()).expect("open");
        let body = "b".repeat(256);
        for i in 0..1_000 {
            partition.propose_one(&create_with_body(&format!("job-{i:04}"), &body)).expect("leads");
        }
        partition.advance().expect("persisted");
        partition.start_snapshot().expect("started");
        settle_snapshot(&mut partition);
        let snapshot = partition.node.storage().snapshot();
        assert_eq!(snapshot.data[0], sundial_engine::state::SNAPSHOT_FORMAT_LINKED, "a single node links its specs");
        let listed = State::linked_segments(&snapshot.data).expect("lists");
        assert!(listed.len() >= 4 && listed.len() == partition.snapshot_segments.len(), "{}", listed.len());
        assert!(snapshot.data.len() < 1_000 * 200, "the table, not the specs: {} bytes", snapshot.data.len());
        let pad = u32::from_le_bytes(snapshot.data[12..16].try_into().expect("4 bytes")) as usize;
        let archive_at = snapshot.data.as_ptr() as usize + 16 + (listed.len() * 24).next_multiple_of(16) + pad;
        assert_eq!(archive_at % 16, 0, "the archive lies aligned in the mapping: a restore reads it in place");
        // Created after the snapshot: the log's tail, replayed at the restart.
        for i in 0..100 {
            partition.propose_one(&create_with_body(&format!("late-{i:03}"), &body)).expect("leads");
        }
        partition.advance().expect("persisted");
        let digest = partition.state().digest();
        drop(partition);

        let mut partition = Partition::open(dir.path(), options()).expect("reopen");
        let state = partition.state();
        assert_eq!((state.job_count(), state.specs_in_heap(), state.digest()), (1_100, 0, digest));
        assert_eq!(state.job("job-0042").map(|job| job.spec().target.body.len()), Some(256));
        let listed_files = |dir: &Path| {
            let names: Vec<_> = listed.iter().map(|entry| crate::replica::specs::segment_name(entry.number)).collect();
            names.iter().filter(|name| dir.join(SPECS_DIR).join(name).exists()).count()
        };
        assert_eq!(listed_files(dir.path()), listed.len(), "the listed segments were kept and mapped, not put again");
        // The tail's 100 specs (~650 bytes each) fill one segment and start another.
        assert!(spec_files(dir.path()) <= listed.len() + 2, "{} files", spec_files(dir.path()));

        // Every job of the snapshot deleted: the next linked snapshot lists none of their
        // segments, and once it is adopted they go.
        for i in 0..1_000 {
            let id = format!("job-{i:04}");
            partition.propose_one(&Command::Delete { id, now_ms: 1_800_000_000_000 }).expect("leads");
        }
        partition.advance().expect("persisted");
        assert_eq!(listed_files(dir.path()), listed.len(), "still listed by the newest snapshot");
        partition.start_snapshot().expect("started");
        settle_snapshot(&mut partition);
        assert_eq!(listed_files(dir.path()), 0, "no snapshot and no job needs them");
        drop(partition);

        // A listed segment damaged: the partition does not open, and says which file and why.
        let snapshot_listed = {
            let partition = Partition::open(dir.path(), options()).expect("reopen");
            assert_eq!(partition.state().job_count(), 100);
            State::linked_segments(&partition.node.storage().snapshot().data).expect("lists")
        };
        let damaged = dir.path().join(SPECS_DIR).join(crate::replica::specs::segment_name(snapshot_listed[0].number));
        let mut bytes = std::fs::read(&damaged).expect("read");
        bytes[100] ^= 1;
        std::fs::write(&damaged, &bytes).expect("write");
        let refused = Partition::open(dir.path(), options()).err().expect("refused").to_string();
        assert!(refused.contains(&damaged.display().to_string()) && refused.contains("checksum"), "{refused}");
        // The refusal changed nothing on disk: mended, the partition opens whole.
        bytes[100] ^= 1;
        std::fs::write(&damaged, &bytes).expect("write");
        let mut partition = Partition::open(dir.path(), options()).expect("opens once mended");
        assert_eq!(partition.state().job_count(), 100);

        // Before a replica is added, a whole snapshot replaces the linked one, even at the
        // same index: a newcomer is sent the newest and could not read a linked one.
        partition.start_snapshot().expect("started");
        settle_snapshot(&mut partition);
        let index = partition.snapshot_index();
        assert_eq!(partition.node.storage().snapshot().data[0], sundial_engine::state::SNAPSHOT_FORMAT_LINKED);
        assert_eq!(partition.node.status().applied, index, "nothing applied since: the same index");
        partition.compact().expect("a whole snapshot");
        assert_eq!(partition.snapshot_index(), index);
        assert_eq!(partition.node.storage().snapshot().data[0], sundial_engine::state::SNAPSHOT_FORMAT);
        assert!(partition.snapshot_segments.is_empty(), "no segment is held for it");
        drop(partition);
        let reopened = Partition::open(dir.path(), options()).expect("reopen from the whole snapshot");
        assert_eq!(reopened.state().job_count(), 100);
        assert_eq!(reopened.state().job("late-007").map(|job| job.spec().target.body.len()), Some(256));
    }

    #[test]
    fn a_refused_snapshot_turn_gives_back_nothing() {
        let held = SnapshotTurn::take().expect("the first turn");
        for _ in 0..3 {
            assert!(SnapshotTurn::take().is_none(), "one snapshot thread at a time");
        }
        drop(held);
        let again = SnapshotTurn::take().expect("free again once given back");
        assert!(SnapshotTurn::take().is_none(), "refusals did not free places never taken");
        drop(again);
    }

    fn create_with_body(id: &str, body: &str) -> Command {
        let request =
            serde_json::json!({"id": id, "run_at": 1_900_000_000_000u64, "url": "https://example.com/", "body": body});
        let spec = parse_job_request(&request.to_string(), 1_800_000_000_000, "unused").expect("valid");
        Command::Create { spec: PackedSpec::of(&spec), now_ms: 1_800_000_000_000, dedup_window_ms: None }
    }

    fn spec_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join(SPECS_DIR)).expect("specs dir").count()
    }

    #[test]
    fn specs_and_tombstones_live_in_files_read_the_same_after_a_snapshot_and_a_restart_and_dead_segments_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Small segments (64 KiB: ~150 of these specs each), so a few hundred jobs fill several.
        let options = || PartitionOptions { spec_segment_bytes: Some(64 << 10), ..PartitionOptions::single_node(1) };
        let mut partition = Partition::open(dir.path(), options()).expect("open");
        let body = "b".repeat(256);
        let ids: Vec<String> = (0..1_000).map(|i| format!("job-{i:04}")).collect();
        for id in &ids {
            partition.propose_one(&create_with_body(id, &body)).expect("leads");
        }
        partition.advance().expect("persisted");
        let state = partition.state();
        assert_eq!((state.job_count(), state.specs_in_heap()), (1_000, 0), "every spec went to the store");
        let job = state.job("job-0042").expect("created");
        assert_eq!((job.spec().target.body.as_slice(), job.id()), (body.as_bytes(), "job-0042"));
        let files = spec_files(dir.path());
        assert!(files >= 4, "1,000 specs of ~400 bytes fill several 64 KiB segments: {files}");
        // Delete nine jobs in ten: every sealed segment is mostly dead, and asks to be repacked.
        for id in ids.iter().filter(|id| !id.ends_with('0')) {
            partition.propose_one(&Command::Delete { id: id.clone(), now_ms: 1_800_000_000_000 }).expect("leads");
        }
        partition.advance().expect("persisted");
        for _ in 0..10 {
            partition.repack_specs(); // each call looks at a bounded number of jobs
        }
        assert!(
            spec_files(dir.path()) < files / 2,
            "repacked segments were removed: {} of {files} left",
            spec_files(dir.path())
        );
        assert_eq!(partition.state().job("job-0040").map(|job| job.spec().target.body.len()), Some(256));
        let tombstone_files = || std::fs::read_dir(dir.path().join(TOMBSTONES_DIR)).expect("tombstones dir").count();
        let state = partition.state();
        assert_eq!((state.tombstone_count(), state.tombstone_chunks_in_heap(), tombstone_files()), (900, 0, 1));
        partition.compact().expect("a snapshot of specs that live in files");
        let digest = partition.state().digest();
        drop(partition);
        let partition = Partition::open(dir.path(), options()).expect("reopen");
        let state = partition.state();
        assert_eq!((state.job_count(), state.specs_in_heap(), state.digest()), (100, 0, digest));
        assert_eq!(state.job("job-0990").map(|job| job.spec().target.body.len()), Some(256));
        assert!(spec_files(dir.path()) <= 2, "the files of the last run were removed at open");
        assert_eq!((state.tombstone_count(), state.tombstone_chunks_in_heap()), (900, 0), "remembered, in the store");
        assert_eq!(tombstone_files(), 1, "the last run's chunk was removed at open, one made");
    }

    #[test]
    fn a_command_in_a_format_this_build_does_not_know_stops_the_partition_naming_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut partition = Partition::open(dir.path(), PartitionOptions::single_node(1)).expect("open");
        let mut future = sundial_engine::codec::encode_command(&create("future"));
        future[0] = sundial_engine::codec::COMMAND_FORMAT + 1;
        partition.node.propose(future).expect("leads");
        let refused = partition.advance().expect_err("not skipped: the replica would part from its peers");
        assert!(refused.to_string().contains("command format 3 is unknown"), "{refused}");
        assert!(refused.to_string().contains("reads formats 0 to 2"), "{refused}");
        assert!(partition.state().job("future").is_none());
    }
}
