//! The Raft state machine: elections (with PreVote and CheckQuorum), replication with flow
//! control, commitment, ReadIndex, snapshots, leadership transfer and membership changes.
//! Inputs are ticks, messages and proposals; outputs accumulate in `msgs` and `read_states`
//! for `RawNode::ready` to hand out. No I/O, no clock, no threads.

use crate::log::RaftLog;
use crate::progress::{Inflights, Progress, ProgressState};
use crate::storage::Storage;
use crate::types::*;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A deliberately broken variant, for proving the simulator's checks can fail. Settable only
/// with the `test-hooks` feature, which only the simulator crate enables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedBug {
    /// Commit entries of earlier terms by counting replicas (what Figure 8 warns against).
    CommitEarlierTermsByCounting,
    /// Grant votes without checking that the candidate's log is up to date.
    VoteWithoutLogCheck,
    /// Count the lease from the newest heartbeat sent, answered or not (with `lease_read`).
    LeaseWithoutQuorumContact,
}

/// Settings of one node. Ticks are the caller's unit of time (Sundial: 10 ms).
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// Ticks without hearing from a leader before campaigning (randomized in [n, 2n)).
    pub election_tick: u32,
    pub heartbeat_tick: u32,
    /// Ask for pre-votes first, so a node that was cut off does not disrupt the group.
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum within an election timeout steps down, and
    /// followers that heard from a leader within it ignore vote requests.
    pub check_quorum: bool,
    /// Serve reads on the leader without a heartbeat round while it holds a lease: for
    /// `election_tick / 2` ticks from the sending of the newest heartbeat round a quorum
    /// answered. It is safe because a voter that heard from the leader ignores vote requests
    /// for `election_tick` of its own ticks (check_quorum), and a (re)started node ignores them
    /// for its first `election_tick` ticks; the margin covers tick granularity and clock rates
    /// that differ by up to 1.5×. Faster clocks than that break it: off by default.
    pub lease_read: bool,
    /// Patience with slow peers. A follower whose election timeout has passed does not
    /// campaign (and still withholds its vote) while the caller says the leader's node is
    /// reachable (`Raft::set_reachable`), for at most this many ticks since the leader's own
    /// last message; a leader that heard from no quorum within an election timeout does not
    /// step down while the caller says a quorum of voters' nodes is reachable, for at most
    /// this many ticks since a quorum last answered. A process starved of CPU answers late
    /// but is not gone; replacing its leadership moves every write in flight. A dead node is
    /// replaced as fast as without it (it stops being reachable). 0: no patience.
    pub leader_patience_tick: u32,
    /// Bytes of entries per Append message (at least one entry is always sent).
    pub max_size_per_msg: usize,
    /// Flow control per follower: appends and bytes in flight.
    pub max_inflight_msgs: usize,
    pub max_inflight_bytes: usize,
    /// Proposals are refused once this many entries are uncommitted.
    pub max_uncommitted_entries: u64,
    /// Pending linearizable reads on a leader.
    pub max_pending_reads: usize,
    pub snapshot_chunk_bytes: usize,
    /// A learner is promoted to voter only when it is at most this many entries behind.
    pub learner_catch_up_entries: u64,
    /// Seeds the election-timeout randomization.
    pub seed: u64,
    #[doc(hidden)]
    #[cfg(feature = "test-hooks")]
    pub injected_bug: Option<InjectedBug>,
}

impl Config {
    pub fn new(id: NodeId) -> Config {
        Config {
            id,
            election_tick: 10,
            heartbeat_tick: 1,
            pre_vote: true,
            check_quorum: true,
            lease_read: false,
            leader_patience_tick: 0,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_inflight_bytes: 8 << 20,
            max_uncommitted_entries: 100_000,
            max_pending_reads: 4096,
            snapshot_chunk_bytes: 1 << 20,
            learner_catch_up_entries: 100,
            seed: id,
            #[cfg(feature = "test-hooks")]
            injected_bug: None,
        }
    }

    /// Checks the settings; the error names the field and the rule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let rule = |field, rule| Err(ConfigError { field, rule });
        if self.id == 0 {
            return rule("id", "must not be 0");
        }
        if self.heartbeat_tick == 0 {
            return rule("heartbeat_tick", "must be at least 1");
        }
        if self.election_tick <= self.heartbeat_tick {
            return rule("election_tick", "must be greater than heartbeat_tick");
        }
        if self.lease_read && !self.check_quorum {
            return rule("lease_read", "needs check_quorum");
        }
        if self.lease_read && self.election_tick < 4 {
            return rule("lease_read", "needs election_tick of at least 4 (the lease lasts election_tick / 2)");
        }
        if self.max_inflight_msgs == 0 || self.max_inflight_bytes == 0 || self.snapshot_chunk_bytes == 0 {
            return rule("max_inflight_msgs/max_inflight_bytes/snapshot_chunk_bytes", "must be positive");
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid raft config {field}: {rule}")]
pub struct ConfigError {
    pub field: &'static str,
    pub rule: &'static str,
}

/// Why a proposal, read or membership change was refused. Nothing was appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// Proposals go to the leader; Sundial forwards requests, Raft does not.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("a leadership transfer is in progress")]
    TransferInProgress,
    #[error("too many uncommitted entries ({uncommitted} ≥ {max})")]
    Overloaded { uncommitted: u64, max: u64 },
    #[error("too many pending reads ({max})")]
    TooManyReads { max: usize },
    #[error("a membership change is still pending")]
    ConfChangePending,
    #[error("learner {id} is {behind} entries behind; it votes only once caught up")]
    LearnerBehind { id: NodeId, behind: u64 },
    /// A new node joins as a learner first, so it catches up before its vote counts.
    #[error("node {0} must join as a learner before it can become a voter")]
    NotALearner(NodeId),
    #[error("node {0} is not a member")]
    UnknownNode(NodeId),
    #[error("the group must keep at least one voter")]
    LastVoter,
}

/// A read waiting for a quorum to answer heartbeat `round` (sent after the read arrived).
#[derive(Clone, Debug)]
struct PendingRead {
    context: u64,
    index: Index,
    /// `None`: the read is local; `Some(node)`: answer that follower.
    requester: Option<NodeId>,
    round: u64,
}

/// Heartbeat rounds whose sending tick is remembered for the lease; older rounds give none.
const HEARTBEAT_ROUNDS_REMEMBERED: usize = 256;
/// Snapshot chunks sent to one follower before it acknowledges the first of them.
pub const SNAPSHOT_CHUNKS_IN_FLIGHT: u64 = 4;
/// Leader ticks without an acknowledged chunk before the window is resent.
const SNAPSHOT_STALL_TICKS: u64 = 3;

/// A snapshot being received in chunks.
struct IncomingSnapshot {
    meta: SnapshotMeta,
    /// Chunks are taken from one leader in one term only: another leader's encoding of the
    /// same snapshot may differ byte for byte.
    from: NodeId,
    term: Term,
    data: Vec<u8>,
}

pub struct Raft<S: Storage> {
    pub id: NodeId,
    pub term: Term,
    pub vote: Option<NodeId>,
    pub role: Role,
    pub leader: Option<NodeId>,
    pub log: RaftLog<S>,
    pub(crate) config: Config,
    voters: BTreeSet<NodeId>,
    learners: BTreeSet<NodeId>,
    progress: BTreeMap<NodeId, Progress>,
    votes: BTreeMap<NodeId, bool>,
    pub(crate) msgs: Vec<Message>,
    pub(crate) read_states: Vec<ReadState>,
    pending_reads: VecDeque<PendingRead>,
    /// Reads asked for before this leader committed an entry of its term.
    reads_awaiting_commit: Vec<(u64, Option<NodeId>)>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_timeout: u32,
    transferee: Option<NodeId>,
    /// Index of the last membership change appended; another waits until it is applied.
    pending_conf_index: Index,
    incoming_snapshot: Option<IncomingSnapshot>,
    rng: u64,
    /// Ticks since this node started: the clock of leases and of the start-up vote hold.
    ticks: u64,
    /// The newest heartbeat round sent, and when (in `ticks`) recent rounds went out.
    heartbeat_round: u64,
    round_sent_at: VecDeque<(u64, u64)>,
    /// Set once this leader started a transfer: the target may campaign at any time after, so
    /// no lease can be trusted for the rest of the term.
    lease_revoked: bool,
    /// When (in `ticks`) a leader's message last arrived, whatever happened to the term since:
    /// a lease may count on this node until an election timeout after it.
    leader_contact_tick: Option<u64>,
    /// A heartbeat round is owed to reads that arrived since the last one: sent once per
    /// `Ready` (or tick), so many reads share one round.
    read_round_owed: bool,
    /// The peers whose nodes the caller says are reachable now (`leader_patience_tick`).
    reachable: Vec<NodeId>,
    /// When (in `ticks`) this leader last found a quorum active: its patience counts from it.
    quorum_active_tick: u64,
}

impl<S: Storage> Raft<S> {
    pub fn new(config: Config, storage: S) -> Result<Raft<S>, ConfigError> {
        config.validate()?;
        let (hard_state, conf) = storage.initial_state();
        let log = RaftLog::new(storage);
        let mut raft = Raft {
            id: config.id,
            term: hard_state.term,
            vote: hard_state.vote,
            role: Role::Follower,
            leader: None,
            log,
            voters: BTreeSet::new(),
            learners: BTreeSet::new(),
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            msgs: Vec::new(),
            read_states: Vec::new(),
            pending_reads: VecDeque::new(),
            reads_awaiting_commit: Vec::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: config.election_tick,
            transferee: None,
            pending_conf_index: 0,
            incoming_snapshot: None,
            ticks: 0,
            heartbeat_round: 0,
            round_sent_at: VecDeque::new(),
            lease_revoked: false,
            leader_contact_tick: None,
            reachable: Vec::new(),
            quorum_active_tick: 0,
            read_round_owed: false,
            rng: config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            config,
        };
        raft.set_conf(&conf);
        raft.become_follower(hard_state.term, None);
        Ok(raft)
    }

    /// Whether this node runs the broken variant `bug` (never, without `test-hooks`).
    fn injected(&self, bug: InjectedBug) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.config.injected_bug == Some(bug);
        #[cfg(not(feature = "test-hooks"))]
        {
            let _ = bug;
            false
        }
    }

    #[cfg(feature = "test-hooks")]
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn hard_state(&self) -> HardState {
        HardState { term: self.term, vote: self.vote, commit: self.log.committed }
    }

    pub fn conf_state(&self) -> ConfState {
        ConfState { voters: self.voters.iter().copied().collect(), learners: self.learners.iter().copied().collect() }
    }

    fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    fn promotable(&self) -> bool {
        self.voters.contains(&self.id) && self.log.pending_snapshot().is_none()
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let spread = u64::from(self.config.election_tick);
        self.randomized_election_timeout = self.config.election_tick + (self.next_random() % spread) as u32;
    }

    fn send(&mut self, to: NodeId, kind: MessageKind) {
        self.send_with_term(to, self.term, kind);
    }

    fn send_with_term(&mut self, to: NodeId, term: Term, kind: MessageKind) {
        self.msgs.push(Message { from: self.id, to, term, kind });
    }

    fn peers(&self) -> Vec<NodeId> {
        self.progress.keys().copied().filter(|&id| id != self.id).collect()
    }

    // ---- roles -----------------------------------------------------------------------

    pub fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if term != self.term {
            self.term = term;
            self.vote = None;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.transferee = None;
        self.pending_reads.clear();
        self.reads_awaiting_commit.clear();
        self.reset_election_timer();
    }

    fn become_pre_candidate(&mut self) {
        assert_ne!(self.role, Role::Leader, "a leader does not campaign");
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes.clear();
        self.reset_election_timer();
    }

    fn become_candidate(&mut self) {
        assert_ne!(self.role, Role::Leader, "a leader does not campaign");
        self.term += 1;
        self.vote = Some(self.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.reset_election_timer();
    }

    fn become_leader(&mut self) {
        assert!(matches!(self.role, Role::Candidate), "only a candidate becomes leader");
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.quorum_active_tick = self.ticks;
        self.transferee = None;
        self.lease_revoked = false;
        self.round_sent_at.clear();
        self.reset_election_timer();
        let next = self.log.last_index() + 1;
        for (&id, progress) in self.progress.iter_mut() {
            *progress =
                Progress::new(next, Inflights::new(self.config.max_inflight_msgs, self.config.max_inflight_bytes));
            progress.recent_active = id == self.id;
        }
        if let Some(own) = self.progress.get_mut(&self.id) {
            own.match_index = self.log.persisted_index();
            own.become_replicate();
        }
        // A membership change may be proposed only after this term's first entry is applied.
        self.pending_conf_index = self.log.last_index() + 1;
        let noop =
            Entry { term: self.term, index: self.log.last_index() + 1, kind: EntryKind::Normal, data: Bytes::new() };
        self.log.append(&[noop]);
        self.broadcast_append();
        self.maybe_commit();
    }

    /// Starts an election: a pre-vote round first when configured, unless `force`d by a
    /// leadership transfer.
    fn campaign(&mut self, pre: bool, force: bool) {
        if pre {
            self.become_pre_candidate();
        } else {
            self.become_candidate();
        }
        let term = if pre { self.term + 1 } else { self.term };
        self.votes.insert(self.id, true);
        if self.tally_votes() {
            return;
        }
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for id in self.voters.clone() {
            if id != self.id {
                self.send_with_term(id, term, MessageKind::VoteRequest { pre, last_index, last_term, force });
            }
        }
    }

    /// Counts votes and acts on a decided election; true when decided.
    fn tally_votes(&mut self) -> bool {
        let granted = self.votes.iter().filter(|(id, &g)| g && self.voters.contains(id)).count();
        let rejected = self.votes.iter().filter(|(id, &g)| !g && self.voters.contains(id)).count();
        if granted >= self.quorum() {
            if self.role == Role::PreCandidate {
                self.campaign(false, false);
            } else {
                self.become_leader();
            }
            return true;
        }
        if rejected >= self.quorum() {
            self.become_follower(self.term, None);
            return true;
        }
        false
    }

    // ---- inputs ----------------------------------------------------------------------

    pub fn tick(&mut self) {
        self.ticks += 1;
        self.election_elapsed += 1;
        if self.role == Role::Leader {
            self.tick_leader();
        } else if self.promotable()
            && self.election_elapsed >= self.randomized_election_timeout
            && !self.waits_for_slow_leader()
        {
            self.campaign(self.config.pre_vote, false);
        }
    }

    /// The peers whose nodes are reachable now, as the caller's transport sees it (it heard
    /// from them lately): read by the next ticks (`Config::leader_patience_tick`).
    pub fn set_reachable(&mut self, peers: &[NodeId]) {
        self.reachable.clear();
        self.reachable.extend_from_slice(peers);
    }

    /// A follower past its election timeout that still waits: the leader's node is reachable
    /// and the leader's own last message is within the patience.
    fn waits_for_slow_leader(&self) -> bool {
        let patience = u64::from(self.config.leader_patience_tick);
        self.role == Role::Follower
            && self.leader.is_some_and(|leader| self.reachable.contains(&leader))
            && self.leader_contact_tick.is_some_and(|contact| self.ticks < contact + patience)
    }

    /// A leader that heard from no quorum lately that still waits: a quorum of voters
    /// (itself included) is reachable and a quorum last answered within the patience.
    fn waits_for_slow_quorum(&self) -> bool {
        let patience = u64::from(self.config.leader_patience_tick);
        let reachable = self.voters.iter().filter(|id| **id == self.id || self.reachable.contains(id)).count();
        reachable >= self.quorum() && self.ticks < self.quorum_active_tick + patience
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        if self.election_elapsed >= self.config.election_tick {
            self.election_elapsed = 0;
            if !self.config.check_quorum || self.quorum_active() {
                self.quorum_active_tick = self.ticks;
            } else if !self.waits_for_slow_quorum() {
                self.become_follower(self.term, None);
                return;
            }
            for (&id, progress) in self.progress.iter_mut() {
                // A snapshot to a follower silent for a whole election timeout starts over.
                if matches!(progress.state, ProgressState::Snapshot { .. }) && !progress.recent_active {
                    progress.become_probe();
                }
                progress.recent_active = id == self.id;
            }
            self.transferee = None; // a transfer that took a whole election timeout failed
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_tick {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
    }

    fn quorum_active(&self) -> bool {
        let active = self.voters.iter().filter(|id| self.progress.get(id).is_some_and(|p| p.recent_active)).count();
        active >= self.quorum()
    }

    /// Handles a message from a peer.
    pub fn step(&mut self, m: Message) {
        if m.term > self.term {
            if let MessageKind::VoteRequest { force, .. } = m.kind {
                // The leader itself campaigning (it stepped down) is not a disruption.
                if self.withholds_votes() && !force && self.leader != Some(m.from) {
                    return; // a leader is alive: a disruptive candidate is ignored
                }
            }
            match m.kind {
                MessageKind::VoteRequest { pre: true, .. } => {}
                MessageKind::VoteResponse { pre: true, granted: true } => {}
                MessageKind::Append { .. } | MessageKind::Heartbeat { .. } | MessageKind::Snapshot { .. } => {
                    self.become_follower(m.term, Some(m.from))
                }
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match m.kind {
                MessageKind::Append { .. } | MessageKind::Heartbeat { .. }
                    if self.config.check_quorum || self.config.pre_vote =>
                {
                    // Tell a deposed leader about the newer term so it steps down.
                    self.send(m.from, MessageKind::HeartbeatResponse { round: 0 });
                }
                MessageKind::VoteRequest { pre: true, .. } => {
                    self.send(m.from, MessageKind::VoteResponse { pre: true, granted: false });
                }
                _ => {}
            }
            return;
        }
        if let MessageKind::VoteRequest { pre, last_index, last_term, .. } = m.kind {
            self.handle_vote_request(m.from, m.term, pre, last_index, last_term);
            return;
        }
        match self.role {
            Role::Leader => self.step_leader(m),
            Role::Candidate | Role::PreCandidate => self.step_candidate(m),
            Role::Follower => self.step_follower(m),
        }
    }

    /// True while this node must not help elect anyone: it heard from a leader within an
    /// election timeout (check_quorum); with lease reads also when it started less than one
    /// ago (it may have heard from a leader before a crash), or heard from any leader less
    /// than one ago even if a newer term has been seen since.
    fn withholds_votes(&self) -> bool {
        let election_ticks = u64::from(self.config.election_tick);
        let heard_from_leader = self.leader.is_some()
            && (self.election_elapsed < self.config.election_tick || self.waits_for_slow_leader());
        // For leases, contact counts even if a higher term has cleared `leader` since.
        let lease_contact = self.config.lease_read
            && (self.ticks < election_ticks
                || self.leader_contact_tick.is_some_and(|t| self.ticks < t + election_ticks));
        self.config.check_quorum && (heard_from_leader || lease_contact)
    }

    fn handle_vote_request(&mut self, from: NodeId, term: Term, pre: bool, last_index: Index, last_term: Term) {
        let can_vote =
            self.vote == Some(from) || (self.vote.is_none() && self.leader.is_none()) || (pre && term > self.term);
        let log_ok = self.injected(InjectedBug::VoteWithoutLogCheck) || self.log.is_up_to_date(last_index, last_term);
        let granted = can_vote && log_ok;
        if granted && !pre {
            self.election_elapsed = 0;
            self.vote = Some(from);
        }
        // A granted pre-vote answers in the term the candidate would have.
        let reply_term = if pre && granted { term } else { self.term };
        self.send_with_term(from, reply_term, MessageKind::VoteResponse { pre, granted });
    }

    fn step_candidate(&mut self, m: Message) {
        match m.kind {
            MessageKind::Append { .. } | MessageKind::Heartbeat { .. } | MessageKind::Snapshot { .. } => {
                self.become_follower(m.term, Some(m.from));
                self.step_follower(m);
            }
            MessageKind::VoteResponse { pre, granted } if pre == (self.role == Role::PreCandidate) => {
                self.votes.insert(m.from, granted);
                self.tally_votes();
            }
            _ => {}
        }
    }

    fn step_follower(&mut self, m: Message) {
        if matches!(m.kind, MessageKind::Append { .. } | MessageKind::Heartbeat { .. } | MessageKind::Snapshot { .. }) {
            self.leader_contact_tick = Some(self.ticks);
        }
        match m.kind {
            MessageKind::Append { prev_index, prev_term, entries, commit } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_append(m.from, prev_index, prev_term, commit, &entries);
            }
            MessageKind::Heartbeat { commit, round } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.log.commit_to(commit.min(self.log.last_index()));
                self.send(m.from, MessageKind::HeartbeatResponse { round });
            }
            MessageKind::Snapshot { meta, offset, chunk, done } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_snapshot_chunk(m.from, meta, offset, chunk, done);
            }
            MessageKind::TimeoutNow if self.promotable() => self.campaign(false, true),
            MessageKind::ReadIndexResponse { context, index } => self.read_states.push(ReadState { context, index }),
            _ => {}
        }
    }

    fn handle_append(&mut self, from: NodeId, prev_index: Index, prev_term: Term, commit: Index, entries: &[Entry]) {
        if prev_index < self.log.committed {
            let index = self.log.committed;
            self.send(from, MessageKind::AppendResponse { reject: false, index, hint_index: 0, hint_term: 0 });
            return;
        }
        match self.log.maybe_append(prev_index, prev_term, commit, entries) {
            Some(last) => {
                self.send(from, MessageKind::AppendResponse { reject: false, index: last, hint_index: 0, hint_term: 0 })
            }
            None => {
                let probe = prev_index.min(self.log.last_index());
                let (hint_index, hint_term) = self.log.find_conflict_by_term(probe, prev_term);
                let reject = MessageKind::AppendResponse { reject: true, index: prev_index, hint_index, hint_term };
                self.send(from, reject);
            }
        }
    }

    /// Takes chunks only in order; anything else is answered with what is held so far, so the
    /// leader resumes from there instead of starting over.
    fn handle_snapshot_chunk(&mut self, from: NodeId, meta: SnapshotMeta, offset: u64, chunk: Vec<u8>, done: bool) {
        if meta.index <= self.log.committed {
            self.incoming_snapshot = None;
            let index = self.log.committed;
            self.send(from, MessageKind::SnapshotResponse { index });
            return;
        }
        let term = self.term;
        let same_snapshot =
            self.incoming_snapshot.as_ref().is_some_and(|s| s.meta == meta && s.from == from && s.term == term);
        if !same_snapshot {
            self.incoming_snapshot = if offset == 0 {
                Some(IncomingSnapshot { meta: meta.clone(), from, term, data: Vec::new() })
            } else {
                None
            };
        }
        let Some(incoming) = self.incoming_snapshot.as_mut() else {
            self.send(from, MessageKind::SnapshotProgress { index: meta.index, received_bytes: 0 });
            return;
        };
        let received_bytes = incoming.data.len() as u64;
        if offset != received_bytes {
            // A duplicate, or a chunk behind a lost one.
            self.send(from, MessageKind::SnapshotProgress { index: meta.index, received_bytes });
            return;
        }
        incoming.data.extend_from_slice(&chunk);
        if !done {
            let received_bytes = incoming.data.len() as u64;
            self.send(from, MessageKind::SnapshotProgress { index: meta.index, received_bytes });
            return;
        }
        let IncomingSnapshot { meta, data, .. } = self.incoming_snapshot.take().expect("matched above");
        let index = meta.index;
        if self.log.match_term(meta.index, meta.term) {
            // The log already holds the snapshot's last entry: just commit up to it.
            self.log.commit_to(index);
            // Answer with what is known to match (committed), never the whole log: a suffix
            // past the snapshot may come from an older leader and must not be counted.
            let committed = self.log.committed;
            self.send(from, MessageKind::SnapshotResponse { index: committed });
            return;
        }
        self.set_conf(&meta.conf);
        self.log.restore(Snapshot { meta, data: data.into() });
        self.send(from, MessageKind::SnapshotResponse { index: self.log.last_index() });
    }

    fn step_leader(&mut self, m: Message) {
        let from = m.from;
        let Some(progress) = self.progress.get_mut(&from) else { return };
        progress.recent_active = true;
        match m.kind {
            MessageKind::AppendResponse { reject: true, index, hint_index, hint_term } => {
                let probe_hint =
                    if hint_term > 0 { self.log.find_conflict_by_term(hint_index, hint_term).0 } else { hint_index };
                let progress = self.progress.get_mut(&from).expect("looked up above");
                if progress.maybe_decrease_to(index, probe_hint) {
                    if progress.state == ProgressState::Replicate {
                        progress.become_probe();
                    }
                    self.send_append(from);
                }
            }
            MessageKind::AppendResponse { reject: false, index, .. } => self.handle_append_success(from, index),
            MessageKind::HeartbeatResponse { round } => {
                progress.probe_sent = false;
                progress.acked_round = progress.acked_round.max(round);
                if progress.state == ProgressState::Replicate && progress.inflights.full() {
                    progress.inflights.free_first_one();
                }
                if matches!(progress.state, ProgressState::Snapshot { .. }) {
                    let transfer = &mut progress.snapshot_transfer;
                    if transfer.acked_bytes != transfer.acked_at_last_check {
                        transfer.acked_at_last_check = transfer.acked_bytes;
                        transfer.last_progress_tick = self.ticks;
                    } else if transfer.sent_bytes > transfer.acked_bytes
                        && self.ticks >= transfer.last_progress_tick + SNAPSHOT_STALL_TICKS
                    {
                        // Nothing acknowledged for a while although chunks are out: resend
                        // from what the follower holds.
                        transfer.sent_bytes = transfer.acked_bytes;
                        transfer.sent_done = false;
                        transfer.last_progress_tick = self.ticks;
                    }
                    self.send_snapshot_chunks(from);
                } else if progress.match_index < self.log.last_index() {
                    self.send_append(from);
                }
                self.confirm_reads();
            }
            MessageKind::SnapshotProgress { index, received_bytes }
                if progress.state == (ProgressState::Snapshot { index }) =>
            {
                // The follower's count is authoritative: one lower than before means it lost
                // what it held (a restart, another snapshot), so sending resumes from there.
                let transfer = &mut progress.snapshot_transfer;
                if received_bytes < transfer.acked_bytes || transfer.sent_bytes < received_bytes {
                    transfer.sent_bytes = received_bytes;
                    transfer.sent_done = false;
                }
                transfer.acked_bytes = received_bytes;
                self.send_snapshot_chunks(from);
            }
            MessageKind::SnapshotResponse { index } => {
                progress.maybe_update(index);
                progress.become_probe();
                self.send_append(from);
            }
            MessageKind::ReadIndex { context } => {
                if let Err(error) = self.read_index_as_leader(context, Some(from)) {
                    let _ = error; // refused reads are dropped; the follower's read expires and is retried
                }
            }
            _ => {}
        }
    }

    fn handle_append_success(&mut self, from: NodeId, index: Index) {
        let progress = self.progress.get_mut(&from).expect("caller checked");
        if !progress.maybe_update(index) {
            return;
        }
        match progress.state {
            ProgressState::Probe => progress.become_replicate(),
            ProgressState::Snapshot { index: snapshot } if progress.match_index >= snapshot => progress.become_probe(),
            _ => progress.inflights.free_up_to(index),
        }
        if self.maybe_commit() {
            self.broadcast_append();
        } else {
            while self.maybe_send_append(from, false) {}
        }
        if self.transferee == Some(from) && self.progress[&from].match_index == self.log.last_index() {
            self.send(from, MessageKind::TimeoutNow);
        }
    }

    // ---- replication -------------------------------------------------------------------

    fn broadcast_append(&mut self) {
        for id in self.peers() {
            self.send_append(id);
        }
    }

    fn send_append(&mut self, to: NodeId) {
        self.maybe_send_append(to, true);
    }

    /// Sends the next append (or a snapshot) to `to` if flow control allows; true if sent.
    fn maybe_send_append(&mut self, to: NodeId, send_if_empty: bool) -> bool {
        let Some(progress) = self.progress.get(&to) else { return false };
        if progress.is_paused() {
            return false;
        }
        let next = progress.next_index;
        let prev_index = next - 1;
        let prev_term = self.log.term(prev_index);
        let entries = self.log.entries(next, self.log.last_index() + 1, self.config.max_size_per_msg);
        let (Ok(prev_term), Ok(entries)) = (prev_term, entries) else {
            return self.send_snapshot(to);
        };
        if entries.is_empty() && !send_if_empty {
            return false;
        }
        let progress = self.progress.get_mut(&to).expect("looked up above");
        if let Some(last) = entries.last() {
            match progress.state {
                ProgressState::Replicate => {
                    progress.next_index = last.index + 1;
                    progress.inflights.add(last.index, entries.iter().map(Entry::size_bytes).sum());
                }
                _ => progress.probe_sent = true,
            }
        } else if progress.state == ProgressState::Probe {
            progress.probe_sent = true;
        }
        let commit = self.log.committed;
        self.send(to, MessageKind::Append { prev_index, prev_term, entries, commit });
        true
    }

    /// Starts sending the storage's snapshot; appends to `to` pause until it is answered.
    /// Nothing is sent while the storage has none a peer can install (`snapshot_to_send`):
    /// the next heartbeat's answer tries again.
    fn send_snapshot(&mut self, to: NodeId) -> bool {
        let Some(index) = self.log.storage.snapshot_to_send().map(|snapshot| snapshot.meta.index) else {
            return false;
        };
        let Some(progress) = self.progress.get_mut(&to) else { return false };
        progress.become_snapshot(index);
        self.send_snapshot_chunks(to);
        true
    }

    /// Sends the next chunks of the snapshot to `to`, at most `SNAPSHOT_CHUNKS_IN_FLIGHT`
    /// beyond what it acknowledged. A snapshot replaced meanwhile is started over.
    fn send_snapshot_chunks(&mut self, to: NodeId) {
        let Some(progress) = self.progress.get_mut(&to) else { return };
        let Some(snapshot) = self.log.storage.snapshot_to_send() else {
            // Replaced by one no peer can install: started over once there is one again.
            if matches!(progress.state, ProgressState::Snapshot { .. }) {
                progress.become_probe();
            }
            return;
        };
        let chunk_bytes = self.config.snapshot_chunk_bytes as u64;
        let total_bytes = snapshot.data.len() as u64;
        match progress.state {
            ProgressState::Snapshot { index } if index == snapshot.meta.index => {}
            ProgressState::Snapshot { .. } => progress.become_snapshot(snapshot.meta.index),
            _ => return,
        }
        let transfer = &mut progress.snapshot_transfer;
        let mut chunks = Vec::new();
        // Bounded: at most SNAPSHOT_CHUNKS_IN_FLIGHT chunks per call.
        while !transfer.sent_done
            && transfer.sent_bytes < transfer.acked_bytes + SNAPSHOT_CHUNKS_IN_FLIGHT * chunk_bytes
        {
            let start = transfer.sent_bytes.min(total_bytes);
            let end = (start + chunk_bytes).min(total_bytes);
            let done = end == total_bytes;
            chunks.push(MessageKind::Snapshot {
                meta: snapshot.meta.clone(),
                offset: start,
                chunk: snapshot.data[start as usize..end as usize].to_vec(),
                done,
            });
            transfer.sent_bytes = end;
            transfer.sent_done = done;
        }
        for kind in chunks {
            self.send(to, kind);
        }
    }

    /// Sends the heartbeat round reads are waiting for, if one is owed (called when a `Ready`
    /// is collected, so all reads since the last one share a round).
    pub(crate) fn send_owed_read_round(&mut self) {
        if self.read_round_owed && self.role == Role::Leader {
            self.broadcast_heartbeat();
        }
    }

    pub(crate) fn owes_read_round(&self) -> bool {
        self.read_round_owed && self.role == Role::Leader
    }

    /// Sends a new heartbeat round to every peer and remembers when it went out.
    fn broadcast_heartbeat(&mut self) {
        self.read_round_owed = false;
        self.heartbeat_round += 1;
        let round = self.heartbeat_round;
        if self.round_sent_at.len() == HEARTBEAT_ROUNDS_REMEMBERED {
            self.round_sent_at.pop_front();
        }
        self.round_sent_at.push_back((round, self.ticks));
        for id in self.peers() {
            let commit = self.progress[&id].match_index.min(self.log.committed);
            self.send(id, MessageKind::Heartbeat { commit, round });
        }
    }

    /// The newest heartbeat round a quorum of voters answered (the leader answers its own).
    fn quorum_round(&self) -> u64 {
        let mut rounds: Vec<u64> =
            self.voters
                .iter()
                .map(|id| {
                    if *id == self.id {
                        self.heartbeat_round
                    } else {
                        self.progress.get(id).map_or(0, |p| p.acked_round)
                    }
                })
                .collect();
        rounds.sort_unstable_by(|a, b| b.cmp(a));
        rounds.get(self.quorum() - 1).copied().unwrap_or(0)
    }

    /// True while no other leader can have been elected: a quorum answered a heartbeat sent
    /// less than `election_tick / 2` ticks ago, and those voters ignore candidates for a whole
    /// election timeout after hearing it (see `Config::lease_read`).
    pub fn holds_lease(&self) -> bool {
        if !self.config.lease_read || self.lease_revoked || self.transferee.is_some() {
            return false;
        }
        let round = if self.injected(InjectedBug::LeaseWithoutQuorumContact) {
            self.heartbeat_round
        } else {
            self.quorum_round()
        };
        let Some(&(_, sent_at)) = self.round_sent_at.iter().find(|(r, _)| *r == round) else { return false };
        self.ticks < sent_at + u64::from(self.config.election_tick / 2)
    }

    /// Advances the commit index to what a quorum of voters has persisted; true if it moved.
    pub(crate) fn maybe_commit(&mut self) -> bool {
        let mut matched: Vec<Index> =
            self.voters.iter().map(|id| self.progress.get(id).map_or(0, |p| p.match_index)).collect();
        if matched.is_empty() {
            return false;
        }
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_index = matched[self.quorum() - 1];
        let committed = if self.injected(InjectedBug::CommitEarlierTermsByCounting) {
            let moved = quorum_index > self.log.committed && quorum_index <= self.log.last_index();
            if moved {
                self.log.commit_to(quorum_index);
            }
            moved
        } else {
            self.log.maybe_commit(quorum_index, self.term)
        };
        if committed {
            self.release_reads_awaiting_commit();
        }
        committed
    }

    /// The caller persisted entries up to the log's persisted index: count the leader's own.
    pub(crate) fn on_persisted(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let persisted = self.log.persisted_index();
        if let Some(own) = self.progress.get_mut(&self.id) {
            own.maybe_update(persisted);
        }
        if self.maybe_commit() {
            self.broadcast_append();
        }
    }

    // ---- proposals ---------------------------------------------------------------------

    fn check_can_propose(&self) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if self.transferee.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        let uncommitted = self.log.last_index() - self.log.committed;
        if uncommitted >= self.config.max_uncommitted_entries {
            return Err(ProposeError::Overloaded { uncommitted, max: self.config.max_uncommitted_entries });
        }
        Ok(())
    }

    fn append_and_replicate(&mut self, kind: EntryKind, data: Bytes) -> Index {
        let index = self.log.last_index() + 1;
        self.log.append(&[Entry { term: self.term, index, kind, data }]);
        self.broadcast_append();
        index
    }

    /// Appends application data; returns its index. Only the leader accepts proposals.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<Index, ProposeError> {
        self.check_can_propose()?;
        Ok(self.append_and_replicate(EntryKind::Normal, data.into()))
    }

    /// Appends several entries at once with one broadcast (batching); returns the index of
    /// the last. All or nothing: refused as a whole when the batch would pass the bound.
    pub fn propose_batch(&mut self, batch: Vec<Vec<u8>>) -> Result<Index, ProposeError> {
        self.check_can_propose()?;
        let uncommitted = self.log.last_index() - self.log.committed;
        let max = self.config.max_uncommitted_entries;
        if uncommitted + batch.len() as u64 > max {
            return Err(ProposeError::Overloaded { uncommitted, max });
        }
        let first = self.log.last_index() + 1;
        let entries: Vec<Entry> = batch
            .into_iter()
            .enumerate()
            .map(|(i, data)| Entry {
                term: self.term,
                index: first + i as u64,
                kind: EntryKind::Normal,
                data: data.into(),
            })
            .collect();
        let last = self.log.append(&entries);
        self.broadcast_append();
        Ok(last)
    }

    /// Proposes a membership change (one at a time).
    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<Index, ProposeError> {
        self.check_can_propose()?;
        if self.pending_conf_index > self.log.applied {
            return Err(ProposeError::ConfChangePending);
        }
        match change {
            ConfChange::AddVoter(id) if self.voters.contains(&id) => {}
            ConfChange::AddVoter(id) if self.learners.contains(&id) => {
                let matched = self.progress.get(&id).map_or(0, |p| p.match_index);
                let behind = self.log.last_index().saturating_sub(matched);
                if behind > self.config.learner_catch_up_entries {
                    return Err(ProposeError::LearnerBehind { id, behind });
                }
            }
            ConfChange::AddVoter(id) => return Err(ProposeError::NotALearner(id)),
            ConfChange::Remove(id) if !self.voters.contains(&id) && !self.learners.contains(&id) => {
                return Err(ProposeError::UnknownNode(id));
            }
            ConfChange::Remove(id) if self.voters.len() == 1 && self.voters.contains(&id) => {
                return Err(ProposeError::LastVoter);
            }
            _ => {}
        }
        let index = self.append_and_replicate(EntryKind::ConfChange(change), Bytes::new());
        self.pending_conf_index = index;
        Ok(index)
    }

    /// Applies a committed membership change (the caller calls this when it applies the entry).
    pub fn apply_conf_change(&mut self, change: ConfChange) -> ConfState {
        match change {
            ConfChange::AddVoter(id) => {
                self.learners.remove(&id);
                self.voters.insert(id);
            }
            ConfChange::AddLearner(id) => {
                if !self.voters.contains(&id) {
                    self.learners.insert(id);
                }
            }
            ConfChange::Remove(id) => {
                self.voters.remove(&id);
                self.learners.remove(&id);
            }
        }
        self.sync_progress();
        if self.role == Role::Leader {
            if !self.voters.contains(&self.id) {
                self.become_follower(self.term, None);
            } else {
                if self.maybe_commit() {
                    self.broadcast_append();
                }
                // A smaller quorum may already have confirmed waiting reads.
                self.confirm_reads();
            }
        }
        self.conf_state()
    }

    fn set_conf(&mut self, conf: &ConfState) {
        self.voters = conf.voters.iter().copied().collect();
        self.learners = conf.learners.iter().copied().collect();
        self.sync_progress();
    }

    /// Keeps one progress entry per member.
    fn sync_progress(&mut self) {
        let members: BTreeSet<NodeId> = self.voters.union(&self.learners).copied().collect();
        self.progress.retain(|id, _| members.contains(id));
        let next = self.log.last_index() + 1;
        for id in members {
            self.progress.entry(id).or_insert_with(|| {
                Progress::new(next, Inflights::new(self.config.max_inflight_msgs, self.config.max_inflight_bytes))
            });
        }
    }

    /// Starts handing leadership to `to`; proposals are refused until it ends.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if !self.voters.contains(&to) {
            return Err(ProposeError::UnknownNode(to));
        }
        if to == self.id {
            return Ok(());
        }
        self.transferee = Some(to);
        self.lease_revoked = true;
        self.election_elapsed = 0;
        if self.progress[&to].match_index == self.log.last_index() {
            self.send(to, MessageKind::TimeoutNow);
        } else {
            self.send_append(to);
        }
        Ok(())
    }

    // ---- reads -------------------------------------------------------------------------

    /// Asks for a linearizable read; a `ReadState` with `context` comes out of a later `Ready`.
    pub fn read_index(&mut self, context: u64) -> Result<(), ProposeError> {
        match self.role {
            Role::Leader => self.read_index_as_leader(context, None),
            _ => match self.leader {
                Some(leader) => {
                    self.send(leader, MessageKind::ReadIndex { context });
                    Ok(())
                }
                None => Err(ProposeError::NotLeader { leader: None }),
            },
        }
    }

    fn read_index_as_leader(&mut self, context: u64, requester: Option<NodeId>) -> Result<(), ProposeError> {
        if self.pending_reads.len() + self.reads_awaiting_commit.len() >= self.config.max_pending_reads {
            return Err(ProposeError::TooManyReads { max: self.config.max_pending_reads });
        }
        // Until an entry of this term is committed, the commit index may lag what an earlier
        // leader acknowledged.
        if self.log.term_or_zero(self.log.committed) != self.term {
            self.reads_awaiting_commit.push((context, requester));
            return Ok(());
        }
        let index = self.log.committed;
        // Reads are answered in the order they arrived: a lease does not overtake a read
        // still waiting for its round.
        if self.pending_reads.is_empty() && (self.voters.len() == 1 || self.holds_lease()) {
            self.answer_read(context, index, requester);
            return Ok(());
        }
        // Answered once a quorum answers a round sent after the read arrived (the next one).
        let round = self.heartbeat_round + 1;
        self.read_round_owed = true;
        self.pending_reads.push_back(PendingRead { context, index, requester, round });
        Ok(())
    }

    fn answer_read(&mut self, context: u64, index: Index, requester: Option<NodeId>) {
        match requester {
            None => self.read_states.push(ReadState { context, index }),
            Some(to) => self.send(to, MessageKind::ReadIndexResponse { context, index }),
        }
    }

    fn release_reads_awaiting_commit(&mut self) {
        if self.log.term_or_zero(self.log.committed) != self.term {
            return;
        }
        for (context, requester) in std::mem::take(&mut self.reads_awaiting_commit) {
            let _ = self.read_index_as_leader(context, requester);
        }
    }

    /// Answers, in order, every pending read whose round a quorum has answered.
    fn confirm_reads(&mut self) {
        let confirmed_round = self.quorum_round();
        // Bounded by the pending reads (at most `max_pending_reads`).
        while self.pending_reads.front().is_some_and(|read| read.round <= confirmed_round) {
            let read = self.pending_reads.pop_front().expect("checked");
            self.answer_read(read.context, read.index, read.requester);
        }
    }

    /// A leadership transfer is under way (proposals are refused until it ends).
    pub fn transferring(&self) -> bool {
        self.transferee.is_some()
    }

    /// Progress of every member as the leader sees it (for status pages and tests).
    pub fn progress_of(&self, id: NodeId) -> Option<&Progress> {
        self.progress.get(&id)
    }

    /// Leader: whether a peer is being sent a snapshot, or was heard from within the last
    /// election timeout and needs one (the log no longer holds the entry before the next it
    /// needs). A peer that stays silent counts no longer: a transfer to it starts over after
    /// an election timeout (`tick_leader`), so a member that is down does not hold the
    /// caller's snapshots back.
    pub(crate) fn peer_needs_snapshot(&self) -> bool {
        self.role == Role::Leader
            && self.progress.iter().any(|(&id, progress)| {
                id != self.id
                    && match progress.state {
                        ProgressState::Snapshot { .. } => true,
                        _ => progress.recent_active && progress.next_index < self.log.first_index(),
                    }
            })
    }
}
