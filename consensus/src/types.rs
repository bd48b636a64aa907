//! The values Raft exchanges with its caller and its peers: entries, hard state, membership,
//! snapshots, messages and read states.

pub type NodeId = u64;
pub type Term = u64;
pub type Index = u64;

/// What an entry carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Application data (the engine's commands). Empty data is the no-op a new leader appends.
    Normal,
    /// A membership change, applied by the caller through `RawNode::apply_conf_change`.
    ConfChange(ConfChange),
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub term: Term,
    pub index: Index,
    pub kind: EntryKind,
    /// Shared, not copied: the same bytes go to the log, to each follower and to the state
    /// machine, so a clone of an entry is a reference count, not a copy of its command.
    pub data: bytes::Bytes,
}

impl Entry {
    /// Bytes counted against message and flow-control limits.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + 24
    }
}

/// What must be persisted before messages of the same `Ready` are sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: Term,
    pub vote: Option<NodeId>,
    pub commit: Index,
}

/// The membership of a group: voters decide; learners receive the log but do not vote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfState {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

/// A single-server membership change (one at a time, Raft dissertation §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfChange {
    /// Adds a voter; a learner is promoted only once it has caught up.
    AddVoter(NodeId),
    AddLearner(NodeId),
    Remove(NodeId),
}

/// Where a snapshot stands in the log, and the membership at that point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: Index,
    pub term: Term,
    pub conf: ConfState,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    /// The state machine's bytes: a storage may hand out a view of its mapped file, so
    /// keeping the newest snapshot for followers costs page cache, not heap.
    pub data: bytes::Bytes,
}

/// A message between two members of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    pub term: Term,
    pub kind: MessageKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// Asks for a (pre-)vote. `term` of the message is the term the candidate would have.
    /// `force` is set after a leadership transfer, so followers skip their lease check.
    VoteRequest {
        pre: bool,
        last_index: Index,
        last_term: Term,
        force: bool,
    },
    VoteResponse {
        pre: bool,
        granted: bool,
    },
    Append {
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: Index,
    },
    /// `index` is the last matching index on success; on rejection `hint_index` and
    /// `hint_term` let the leader skip a whole term at once (fast backtracking).
    AppendResponse {
        reject: bool,
        index: Index,
        hint_index: Index,
        hint_term: Term,
    },
    /// `round` numbers the leader's heartbeat broadcasts; the answer echoes it, and a quorum
    /// answering round r confirms leadership as of the moment round r was sent (ReadIndex,
    /// lease). Round 0 is never sent: it marks answers that confirm nothing.
    Heartbeat {
        commit: Index,
        round: u64,
    },
    HeartbeatResponse {
        round: u64,
    },
    /// One chunk of a snapshot, `done` on the last. A few chunks travel at once (a window);
    /// the follower takes them only in order.
    Snapshot {
        meta: SnapshotMeta,
        offset: u64,
        chunk: Vec<u8>,
        done: bool,
    },
    /// A follower's answer to a chunk that did not finish the snapshot: it holds the first
    /// `received_bytes` of the snapshot at `index` (a cumulative acknowledgement; the leader
    /// resends from there if it stops moving).
    SnapshotProgress {
        index: Index,
        received_bytes: u64,
    },
    /// A follower's answer to a whole snapshot: its log now matches up to `index`.
    SnapshotResponse {
        index: Index,
    },
    /// Tells the transfer target to campaign now.
    TimeoutNow,
    /// A follower forwarding a linearizable read to the leader.
    ReadIndex {
        context: u64,
    },
    ReadIndexResponse {
        context: u64,
        index: Index,
    },
}

/// A linearizable read that may proceed once the applied index reaches `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub context: u64,
    pub index: Index,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}
