//! `RawNode`: the caller's handle on one Raft node. It turns the state machine's effects into
//! a `Ready` batch and takes the caller's acknowledgement (`advance`) once it is persisted.

use crate::raft::{Config, ConfigError, ProposeError, Raft};
use crate::storage::{MemStorage, Storage};
use crate::types::*;

/// Bytes of committed entries handed out per `Ready`.
const COMMITTED_BYTES_PER_READY_MAX: usize = 8 << 20;

/// Who leads, as this node sees it; present in a `Ready` when it changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    pub leader: Option<NodeId>,
    pub role: Role,
}

/// Everything the caller must do, in this order:
/// 1. persist `snapshot` (if any), `entries` and `hard_state` (if any) — durably;
/// 2. send `messages` (only now: a response must never promise what is not yet persisted);
/// 3. apply `snapshot` then `committed_entries` to the state machine (calling
///    `RawNode::apply_conf_change` for membership entries), serve `read_states` once applied
///    reaches their index;
/// 4. call `RawNode::advance(ready)`.
#[derive(Debug, Default)]
pub struct Ready {
    pub soft_state: Option<SoftState>,
    pub hard_state: Option<HardState>,
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    pub messages: Vec<Message>,
    pub committed_entries: Vec<Entry>,
    pub read_states: Vec<ReadState>,
}

/// What a caller may read of its node (etcd's `Status`): roles, terms and indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub term: Term,
    pub role: Role,
    pub leader: Option<NodeId>,
    /// Highest index known committed, applied by the caller, and held in the log.
    pub committed: Index,
    pub applied: Index,
    pub last_index: Index,
    /// A leadership transfer is under way (the leader takes no proposals meanwhile).
    pub transferring: bool,
}

/// The caller's handle on one Raft node; the Raft state inside is private (the simulator
/// and the tests reach it through `raft()` with the `test-hooks` feature).
pub struct RawNode<S: Storage> {
    raft: Raft<S>,
    previous_hard_state: HardState,
    previous_soft_state: SoftState,
    /// A `Ready` was handed out and not yet advanced.
    awaiting_advance: bool,
}

impl<S: Storage> RawNode<S> {
    /// Starts (or restarts, from what `storage` holds) a node.
    pub fn new(config: Config, storage: S) -> Result<RawNode<S>, ConfigError> {
        let raft = Raft::new(config, storage)?;
        let previous_hard_state = raft.hard_state();
        let previous_soft_state = SoftState { leader: raft.leader, role: raft.role };
        Ok(RawNode { raft, previous_hard_state, previous_soft_state, awaiting_advance: false })
    }

    pub fn status(&self) -> Status {
        let log = &self.raft.log;
        Status {
            id: self.raft.id,
            term: self.raft.term,
            role: self.raft.role,
            leader: self.raft.leader,
            committed: log.committed,
            applied: log.applied,
            last_index: log.last_index(),
            transferring: self.raft.transferring(),
        }
    }

    /// The voters and learners as of the last applied membership change.
    pub fn conf_state(&self) -> ConfState {
        self.raft.conf_state()
    }

    /// The highest index the leader knows `peer` holds (leader only).
    pub fn match_index_of(&self, peer: NodeId) -> Option<Index> {
        self.raft.progress_of(peer).map(|progress| progress.match_index)
    }

    /// Whether a peer needs a snapshot (leader only): one is being sent, or a peer heard from
    /// lately needs what the log no longer holds. A caller whose newest snapshot no peer can install
    /// (`Storage::snapshot_to_send`) then makes one that can, and keeps it the newest until
    /// this turns false.
    pub fn peer_needs_snapshot(&self) -> bool {
        self.raft.peer_needs_snapshot()
    }

    /// The storage the node reads through; the caller persists each `Ready` into it.
    pub fn storage(&self) -> &S {
        &self.raft.log.storage
    }

    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.raft.log.storage
    }

    /// The storage back, with the node gone (a restart builds a new node over it).
    pub fn into_storage(self) -> S {
        self.raft.log.storage
    }

    /// The Raft state inside, for the simulator's and tests' invariant checks.
    #[cfg(feature = "test-hooks")]
    pub fn raft(&self) -> &Raft<S> {
        &self.raft
    }

    #[cfg(feature = "test-hooks")]
    pub fn raft_mut(&mut self) -> &mut Raft<S> {
        &mut self.raft
    }

    /// One unit of logical time.
    pub fn tick(&mut self) {
        self.raft.tick();
    }

    /// The peers whose nodes are reachable now (`Config::leader_patience_tick`): the caller's
    /// transport heard from them lately. Read by the following ticks.
    pub fn set_reachable(&mut self, peers: &[NodeId]) {
        self.raft.set_reachable(peers);
    }

    /// A message from a peer.
    pub fn step(&mut self, message: Message) {
        self.raft.step(message);
    }

    /// Proposes application data (leader only).
    pub fn propose(&mut self, data: Vec<u8>) -> Result<Index, ProposeError> {
        self.raft.propose(data)
    }

    /// Proposes several entries with one broadcast; returns the last index.
    pub fn propose_batch(&mut self, batch: Vec<Vec<u8>>) -> Result<Index, ProposeError> {
        self.raft.propose_batch(batch)
    }

    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<Index, ProposeError> {
        self.raft.propose_conf_change(change)
    }

    pub fn apply_conf_change(&mut self, change: ConfChange) -> ConfState {
        self.raft.apply_conf_change(change)
    }

    pub fn read_index(&mut self, context: u64) -> Result<(), ProposeError> {
        self.raft.read_index(context)
    }

    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), ProposeError> {
        self.raft.transfer_leader(to)
    }

    fn soft_state(&self) -> SoftState {
        SoftState { leader: self.raft.leader, role: self.raft.role }
    }

    /// True when `ready` would return something to do.
    pub fn has_ready(&self) -> bool {
        if self.awaiting_advance {
            return false;
        }
        let log = &self.raft.log;
        self.soft_state() != self.previous_soft_state
            || self.raft.hard_state() != self.previous_hard_state
            || log.pending_snapshot().is_some()
            || !log.unstable_entries().is_empty()
            || !self.raft.msgs.is_empty()
            || !self.raft.read_states.is_empty()
            || self.raft.owes_read_round()
            || log.committed.min(log.persisted_index()) > log.applied
    }

    /// Collects what the caller must persist, send and apply. Call `advance` before the next.
    pub fn ready(&mut self) -> Ready {
        assert!(!self.awaiting_advance, "ready() called again before advance()");
        self.awaiting_advance = true;
        self.raft.send_owed_read_round();
        let soft_state = self.soft_state();
        let hard_state = self.raft.hard_state();
        let log = &self.raft.log;
        Ready {
            soft_state: (soft_state != self.previous_soft_state).then_some(soft_state),
            hard_state: (hard_state != self.previous_hard_state).then_some(hard_state),
            snapshot: log.pending_snapshot().cloned(),
            entries: log.unstable_entries().to_vec(),
            committed_entries: log.next_committed_entries(COMMITTED_BYTES_PER_READY_MAX),
            messages: std::mem::take(&mut self.raft.msgs),
            read_states: std::mem::take(&mut self.raft.read_states),
        }
    }

    /// The caller persisted, sent and applied what `ready` gave.
    pub fn advance(&mut self, ready: Ready) {
        assert!(self.awaiting_advance, "advance() without ready()");
        self.awaiting_advance = false;
        if let Some(soft_state) = ready.soft_state {
            self.previous_soft_state = soft_state;
        }
        if let Some(hard_state) = ready.hard_state {
            self.previous_hard_state = hard_state;
        }
        let log = &mut self.raft.log;
        if let Some(snapshot) = &ready.snapshot {
            log.stable_snapshot_to(snapshot.meta.index);
            log.applied_to(snapshot.meta.index);
        }
        if let Some(last) = ready.entries.last() {
            log.stable_to(last.index, last.term);
        }
        if let Some(last) = ready.committed_entries.last() {
            log.applied_to(last.index);
        }
        self.raft.on_persisted();
    }
}

impl MemStorage {
    /// Step 1 of handling a `Ready` for the in-memory storage: install the snapshot, append
    /// the entries (replacing a conflicting suffix), record the hard state.
    pub fn persist(&mut self, ready: &Ready) {
        if let Some(snapshot) = &ready.snapshot {
            self.apply_snapshot(snapshot.clone());
        }
        self.append(&ready.entries);
        if let Some(hard_state) = ready.hard_state {
            self.hard_state = hard_state;
        }
    }
}
