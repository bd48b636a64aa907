//! `sundial-consensus-sim`: the deterministic cluster simulator for `sundial-consensus`: N Raft nodes on a simulated network, clock and disk,
//! all driven by one seed, with faults (loss, duplication, reordering, partitions, crashes that
//! lose unpersisted state, slow disks, clock-rate differences) and a key-value workload whose
//! history is checked for linearizability. Safety is checked at every step; liveness after the
//! faults stop.

pub mod linearizability;

use linearizability::{Operation, RegisterOp, Verdict};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::fmt;
use sundial_consensus::*;

/// Everything a run depends on, expanded from its seed (printed so a run can be understood).
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub nodes: usize,
    /// Faults happen in `[0, faults_until_ms)`; then everything heals.
    pub faults_until_ms: u64,
    /// After healing, every node must apply a new entry within this many ticks.
    pub liveness_bound_ticks: u64,
    pub loss_permille: u64,
    pub duplicate_permille: u64,
    pub delay_max_ms: u64,
    /// Milliseconds between ticks, per node (clock-rate differences).
    pub tick_ms: Vec<u64>,
    pub clients: usize,
    pub keys: u64,
    /// Applied entries between snapshots (log compaction), per node.
    pub compact_every: u64,
    /// Raft options under test (lease_read only with check_quorum).
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub lease_read: bool,
    /// The nemesis also removes voters and adds them back (learner first, then voter).
    pub membership_changes: bool,
    pub injected_bug: Option<InjectedBug>,
}

/// Nominal tick length; the liveness bound in ms is computed from it.
const TICK_MS: u64 = 10;
const CLIENT_TIMEOUT_MS: u64 = 2_000;

impl SimOptions {
    pub fn from_seed(seed: u64) -> SimOptions {
        let mut rng = Rng::new(seed ^ 0x5EED);
        let nodes = if rng.below(3) == 0 { 5 } else { 3 };
        let check_quorum = rng.below(4) != 0;
        SimOptions {
            seed,
            nodes,
            faults_until_ms: 3_000 + rng.below(2_000),
            liveness_bound_ticks: 300,
            loss_permille: rng.below(120),
            duplicate_permille: rng.below(50),
            delay_max_ms: 1 + rng.below(30),
            tick_ms: (0..nodes).map(|_| TICK_MS - 1 + rng.below(3)).collect(),
            clients: 2 + rng.below(3) as usize,
            keys: 1 + rng.below(3),
            compact_every: 40 + rng.below(200),
            pre_vote: rng.below(4) != 0,
            check_quorum,
            lease_read: check_quorum && rng.chance(500),
            membership_changes: rng.chance(500),
            injected_bug: None,
        }
    }

    fn end_ms(&self) -> u64 {
        self.faults_until_ms + self.liveness_bound_ticks * TICK_MS + 500
    }
}

impl fmt::Display for SimOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={} nodes={} faults_until={}ms loss={}‰ dup={}‰ delay≤{}ms tick_ms={:?} clients={} keys={} compact_every={} pre_vote={} check_quorum={} lease_read={} membership_changes={} bug={:?}",
            self.seed,
            self.nodes,
            self.faults_until_ms,
            self.loss_permille,
            self.duplicate_permille,
            self.delay_max_ms,
            self.tick_ms,
            self.clients,
            self.keys,
            self.compact_every,
            self.pre_vote,
            self.check_quorum,
            self.lease_read,
            self.membership_changes,
            self.injected_bug
        )
    }
}

/// A broken invariant, with when it was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub at_ms: u64,
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {} ms: {}", self.at_ms, self.what)
    }
}

/// What a passing run did (to show the workload was not trivial).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimReport {
    pub committed_entries: u64,
    pub leaders_elected: usize,
    pub writes_ok: u64,
    pub writes_unknown: u64,
    pub reads_ok: u64,
    pub snapshots_installed: u64,
    pub messages_delivered: u64,
    pub membership_changes: u64,
    /// A digest of every delivery (time, endpoints, term): equal digests mean equal runs.
    pub trace_digest: u64,
}

/// xorshift64*: the simulator's only source of randomness.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, permille: u64) -> bool {
        self.below(1000) < permille
    }
}

/// The state machine each node applies: a register per key, plus who wrote it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Kv {
    values: BTreeMap<u64, u64>,
}

impl Kv {
    fn encode(&self) -> Vec<u8> {
        self.values.iter().flat_map(|(k, v)| k.to_le_bytes().into_iter().chain(v.to_le_bytes())).collect()
    }

    fn decode(bytes: &[u8]) -> Kv {
        let values = bytes
            .chunks_exact(16)
            .map(|c| {
                (u64::from_le_bytes(c[..8].try_into().expect("8")), u64::from_le_bytes(c[8..].try_into().expect("8")))
            })
            .collect();
        Kv { values }
    }
}

/// A write's entry: op id · key · value.
fn encode_write(op_id: u64, key: u64, value: u64) -> Vec<u8> {
    [op_id, key, value].iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode_write(data: &[u8]) -> Option<(u64, u64, u64)> {
    if data.len() != 24 {
        return None;
    }
    let field = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().expect("8"));
    Some((field(0), field(1), field(2)))
}

/// Which kind of message (and its main number), for the trace digest.
fn kind_tag(kind: &MessageKind) -> u64 {
    match kind {
        MessageKind::VoteRequest { last_index, .. } => 1 << 56 | last_index,
        MessageKind::VoteResponse { granted, .. } => 2 << 56 | u64::from(*granted),
        MessageKind::Append { prev_index, entries, .. } => 3 << 56 | prev_index << 16 | entries.len() as u64,
        MessageKind::AppendResponse { index, reject, .. } => 4 << 56 | index << 1 | u64::from(*reject),
        MessageKind::Heartbeat { round, .. } => 5 << 56 | round,
        MessageKind::HeartbeatResponse { round } => 6 << 56 | round,
        MessageKind::Snapshot { offset, .. } => 7 << 56 | offset,
        MessageKind::SnapshotProgress { received_bytes, .. } => 8 << 56 | received_bytes,
        MessageKind::SnapshotResponse { index } => 9 << 56 | index,
        MessageKind::TimeoutNow => 10 << 56,
        MessageKind::ReadIndex { context } => 11 << 56 | context,
        MessageKind::ReadIndexResponse { index, .. } => 12 << 56 | index,
    }
}

/// FNV-1a, continued from `h`.
fn hash_into(h: u64, data: &[u8]) -> u64 {
    data.iter().fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// An entry's identity for the checks: its kind and its data (not its index or term).
fn hash_entry(entry: &Entry) -> u64 {
    let kind: [u8; 9] = match entry.kind {
        EntryKind::Normal => [0; 9],
        EntryKind::ConfChange(ConfChange::AddVoter(id)) => with_tag(1, id),
        EntryKind::ConfChange(ConfChange::AddLearner(id)) => with_tag(2, id),
        EntryKind::ConfChange(ConfChange::Remove(id)) => with_tag(3, id),
    };
    hash_into(hash_into(FNV_OFFSET, &kind), &entry.data)
}

fn with_tag(tag: u8, id: NodeId) -> [u8; 9] {
    let mut bytes = [tag; 9];
    bytes[1..].copy_from_slice(&id.to_le_bytes());
    bytes
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CommittedEntry {
    term: Term,
    hash: u64,
    known_in_term: Term,
}

struct SimNode {
    id: NodeId,
    /// `None` while crashed.
    node: Option<RawNode<MemStorage>>,
    /// What survives a crash, while the node is down (a running node's storage is its own).
    durable: MemStorage,
    kv: Kv,
    /// A `Ready` being persisted, completing at the given time.
    persisting: Option<(u64, Ready)>,
    disk_delay_max_ms: u64,
    next_tick_ms: u64,
    restart_at_ms: Option<u64>,
    /// Entries up to this index were checked against the committed record.
    commit_checked: Index,
}

#[derive(Clone, Copy, Debug)]
enum Pending {
    Write { node: NodeId, index: Index, key: u64, value: u64, history: usize, deadline: u64 },
    Read { node: NodeId, context: u64, key: u64, called_at: u64, deadline: u64, index: Option<Index> },
}

struct Client {
    pending: Option<Pending>,
    next_op_ms: u64,
    /// The node this client believes leads (learned from refusals), like a real client.
    leader_hint: Option<usize>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    deliver_at: std::cmp::Reverse<(u64, u64)>,
    message: MessageBox,
}

/// Messages ordered only by delivery time and sequence.
struct MessageBox(Message);

impl PartialEq for MessageBox {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for MessageBox {}
impl PartialOrd for MessageBox {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for MessageBox {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

pub struct Simulation {
    options: SimOptions,
    rng: Rng,
    now_ms: u64,
    nodes: Vec<SimNode>,
    network: BinaryHeap<InFlight>,
    sequence: u64,
    /// Directed pairs that cannot talk.
    blocked: BTreeSet<(NodeId, NodeId)>,
    loss_permille: u64,
    duplicate_permille: u64,
    clients: Vec<Client>,
    history: Vec<Operation>,
    /// Logical time for the history: strictly increasing across calls and returns.
    history_clock: u64,
    next_op_id: u64,
    // What the checks remember.
    leaders: BTreeMap<Term, NodeId>,
    /// Every entry some node knew committed, by index: its term and hash (kind and data),
    /// and the lowest current term of a node that knew it committed (it was committed in
    /// that term or earlier).
    committed: BTreeMap<Index, CommittedEntry>,
    applied: BTreeMap<Index, (Term, u64)>,
    /// Every entry persisted anywhere, by (index, term): its hash and the term of the entry
    /// before it in that node's log (`None` when compacted away).
    log_entries: HashMap<(Index, Term), (u64, Option<Term>)>,
    healed: bool,
    heal_applied: Option<Index>,
    report: SimReport,
}

impl Simulation {
    pub fn new(options: SimOptions) -> Simulation {
        let voters: Vec<NodeId> = (1..=options.nodes as u64).collect();
        let mut rng = Rng::new(options.seed);
        let nodes = voters
            .iter()
            .map(|&id| {
                let durable = MemStorage::new_with_voters(&voters);
                SimNode {
                    id,
                    node: None,
                    durable,
                    kv: Kv::default(),
                    persisting: None,
                    disk_delay_max_ms: 0,
                    next_tick_ms: rng.below(TICK_MS),
                    restart_at_ms: Some(0),
                    commit_checked: 0,
                }
            })
            .collect();
        let clients = (0..options.clients)
            .map(|i| Client { pending: None, next_op_ms: 50 + i as u64 * 7, leader_hint: None })
            .collect();
        Simulation {
            loss_permille: options.loss_permille,
            duplicate_permille: options.duplicate_permille,
            options,
            rng,
            now_ms: 0,
            nodes,
            network: BinaryHeap::new(),
            sequence: 0,
            blocked: BTreeSet::new(),
            clients,
            history: Vec::new(),
            history_clock: 0,
            next_op_id: 1,
            leaders: BTreeMap::new(),
            committed: BTreeMap::new(),
            applied: BTreeMap::new(),
            log_entries: HashMap::new(),
            healed: false,
            heal_applied: None,
            report: SimReport::default(),
        }
    }

    fn config(&self, id: NodeId) -> Config {
        let mut config = Config::new(id);
        config.seed = self.options.seed.wrapping_mul(31).wrapping_add(id);
        config.max_size_per_msg = 4096;
        config.max_inflight_msgs = 8;
        // Snapshots of 1-3 keys are 16-48 bytes: several chunks each.
        config.snapshot_chunk_bytes = 8;
        config.pre_vote = self.options.pre_vote;
        config.check_quorum = self.options.check_quorum;
        config.lease_read = self.options.lease_read;
        config.injected_bug = self.options.injected_bug;
        config
    }

    fn violation(&self, what: String) -> Violation {
        Violation { at_ms: self.now_ms, what }
    }

    /// Runs to the end; the first broken invariant stops the run.
    pub fn run(mut self) -> Result<SimReport, Violation> {
        let end = self.options.end_ms();
        // Bounded: one iteration per simulated millisecond.
        while self.now_ms < end {
            self.step_ms()?;
            self.now_ms += 1;
        }
        self.check_liveness_at_end()?;
        self.check_committed_entries_durable()?;
        self.check_history()?;
        self.report.leaders_elected = self.leaders.len();
        self.report.committed_entries = self.applied.len() as u64;
        Ok(self.report)
    }

    fn step_ms(&mut self) -> Result<(), Violation> {
        SIMULATED_MS.with(|at| at.set(self.now_ms));
        self.nemesis()?;
        self.restart_due_nodes();
        self.deliver_messages();
        self.tick_nodes();
        self.run_clients();
        for i in 0..self.nodes.len() {
            self.process_node(i)?;
        }
        self.check_leaders()?;
        if self.healed && self.options.membership_changes && self.now_ms % 20 == 0 {
            self.change_membership();
        }
        self.check_liveness_progress()
    }

    // ---- faults ------------------------------------------------------------------------

    fn nemesis(&mut self) -> Result<(), Violation> {
        if self.now_ms >= self.options.faults_until_ms {
            if !self.healed {
                self.heal();
            }
            return Ok(());
        }
        // On average one fault decision every 500 ms.
        if !self.rng.chance(2) || self.now_ms == 0 {
            return Ok(());
        }
        let n = self.options.nodes as u64;
        match self.rng.below(8) {
            0 => self.blocked.clear(),
            1 => {
                // Isolate one node, often the leader (the case that tests step-down and leases).
                let random = 1 + self.rng.below(n);
                let node = match self.current_leader() {
                    Some(leader) if self.rng.chance(500) => leader,
                    _ => random,
                };
                self.partition(&[node]);
            }
            2 => {
                // Majority / minority halves.
                let minority: Vec<NodeId> = (1..=n).filter(|_| self.rng.chance(400)).take((n / 2) as usize).collect();
                self.partition(&minority);
            }
            3 => {
                // Bridge: two sides that cannot talk, one node that talks to both.
                self.blocked.clear();
                let bridge = 1 + self.rng.below(n);
                let others: Vec<NodeId> = (1..=n).filter(|&x| x != bridge).collect();
                let (left, right) = others.split_at(others.len() / 2);
                for &a in left {
                    for &b in right {
                        self.blocked.insert((a, b));
                        self.blocked.insert((b, a));
                    }
                }
            }
            4 => {
                // One-way: a node hears everyone but nobody hears it.
                let node = 1 + self.rng.below(n);
                for other in (1..=n).filter(|&x| x != node) {
                    self.blocked.insert((node, other));
                }
            }
            5 | 6 => {
                let index = self.rng.below(n) as usize;
                // Sometimes shorter than an election timeout: a quick restart must not vote
                // while a lease it granted may still run.
                let down_for = 5 + self.rng.below(1_500);
                self.crash(index, self.now_ms + down_for);
                self.check_committed_entries_durable()?;
            }
            7 if self.options.membership_changes && self.rng.chance(500) => self.change_membership(),
            7 if self.rng.chance(500) => {
                // Hand leadership to a random node (refused unless it is a voter and we lead).
                let to = 1 + self.rng.below(n);
                for node in self.nodes.iter_mut().filter_map(|n| n.node.as_mut()) {
                    let _ = node.transfer_leader(to);
                }
            }
            _ => {
                let index = self.rng.below(n) as usize;
                self.nodes[index].disk_delay_max_ms = if self.rng.chance(500) { 0 } else { 5 + self.rng.below(60) };
            }
        }
        Ok(())
    }

    /// One step of the membership nemesis, through the current leader: while some node is
    /// not a voter, bring it back (learner first, then voter once caught up); otherwise, during
    /// the faults, remove a random node. So at most one node is out at a time.
    fn change_membership(&mut self) {
        let Some(leader) =
            self.nodes.iter_mut().filter_map(|n| n.node.as_mut()).find(|n| n.raft().role == Role::Leader)
        else {
            return;
        };
        let conf = leader.raft().conf_state();
        let missing = (1..=self.options.nodes as u64).find(|id| !conf.voters.contains(id));
        let change = match missing {
            Some(id) if conf.learners.contains(&id) => ConfChange::AddVoter(id),
            Some(id) => ConfChange::AddLearner(id),
            None if !self.healed => ConfChange::Remove(1 + self.rng.below(self.options.nodes as u64)),
            None => return,
        };
        // Refused while another change is pending or the learner lags: tried again later.
        if leader.propose_conf_change(change).is_ok() {
            self.report.membership_changes += 1;
        }
    }

    /// The running leader of the highest term, if any.
    fn current_leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .filter(|n| n.raft().role == Role::Leader)
            .max_by_key(|n| n.raft().term)
            .map(|n| n.raft().id)
    }

    fn partition(&mut self, side: &[NodeId]) {
        self.blocked.clear();
        for &a in side {
            for b in 1..=self.options.nodes as u64 {
                if !side.contains(&b) {
                    self.blocked.insert((a, b));
                    self.blocked.insert((b, a));
                }
            }
        }
    }

    fn heal(&mut self) {
        self.healed = true;
        self.blocked.clear();
        self.loss_permille = 0;
        self.duplicate_permille = 0;
        for node in &mut self.nodes {
            node.disk_delay_max_ms = 0;
            if node.node.is_none() {
                node.restart_at_ms = Some(self.now_ms);
            }
        }
        self.restart_due_nodes();
        self.heal_applied =
            Some(self.nodes.iter().map(|n| n.node.as_ref().map_or(0, |r| r.raft().log.applied)).max().unwrap_or(0));
    }

    /// Crashes a node: everything not yet persisted (including a `Ready` being persisted) is lost.
    fn crash(&mut self, index: usize, restart_at_ms: u64) {
        let node = &mut self.nodes[index];
        let Some(raw) = node.node.take() else { return };
        // The node's storage holds exactly what completed persists wrote.
        node.durable = raw.into_storage();
        node.persisting = None;
        node.restart_at_ms = Some(restart_at_ms);
    }

    fn restart_due_nodes(&mut self) {
        for i in 0..self.nodes.len() {
            let due = self.nodes[i].restart_at_ms.is_some_and(|at| at <= self.now_ms);
            if !due {
                continue;
            }
            let config = self.config(self.nodes[i].id);
            let node = &mut self.nodes[i];
            node.restart_at_ms = None;
            let raw = RawNode::new(config, std::mem::take(&mut node.durable)).expect("simulator config is valid");
            // The state machine restarts from the snapshot; committed entries are re-applied.
            node.kv = Kv::decode(&raw.raft().log.storage.snapshot.data);
            node.commit_checked = raw.raft().log.storage.snapshot.meta.index;
            node.node = Some(raw);
        }
    }

    // ---- network -----------------------------------------------------------------------

    fn send(&mut self, message: Message) {
        if self.blocked.contains(&(message.from, message.to)) || self.rng.chance(self.loss_permille) {
            return;
        }
        let copies = if self.rng.chance(self.duplicate_permille) { 2 } else { 1 };
        for _ in 0..copies {
            let at = self.now_ms + 1 + self.rng.below(self.options.delay_max_ms);
            self.sequence += 1;
            let deliver_at = std::cmp::Reverse((at, self.sequence));
            self.network.push(InFlight { deliver_at, message: MessageBox(message.clone()) });
        }
    }

    fn deliver_messages(&mut self) {
        // Bounded: each message is popped once.
        while self.network.peek().is_some_and(|m| m.deliver_at.0 .0 <= self.now_ms) {
            let InFlight { message: MessageBox(message), .. } = self.network.pop().expect("peeked");
            if self.blocked.contains(&(message.from, message.to)) {
                continue;
            }
            let Some(target) = self.nodes.get_mut(message.to as usize - 1) else { continue };
            if let Some(node) = target.node.as_mut() {
                let digest = [self.now_ms, message.from, message.to, message.term, kind_tag(&message.kind)];
                self.report.trace_digest =
                    digest.iter().fold(self.report.trace_digest, |h, v| hash_into(h, &v.to_le_bytes()));
                node.step(message);
                self.report.messages_delivered += 1;
            }
        }
    }

    fn tick_nodes(&mut self) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if node.next_tick_ms <= self.now_ms {
                node.next_tick_ms = self.now_ms + self.options.tick_ms[i];
                if let Some(raw) = node.node.as_mut() {
                    raw.tick();
                }
            }
        }
    }

    // ---- persistence and applying --------------------------------------------------------

    fn process_node(&mut self, i: usize) -> Result<(), Violation> {
        if self.nodes[i].node.is_none() {
            return Ok(());
        }
        if let Some((done_at, _)) = &self.nodes[i].persisting {
            if *done_at > self.now_ms {
                return Ok(());
            }
            let (_, ready) = self.nodes[i].persisting.take().expect("checked");
            self.complete_ready(i, ready)?;
        }
        // Bounded: a node produces a finite amount of work per millisecond; cap the rounds.
        for _ in 0..16 {
            let has_ready = self.nodes[i].node.as_ref().is_some_and(|n| n.has_ready());
            if !has_ready {
                break;
            }
            let ready = self.nodes[i].node.as_mut().expect("checked").ready();
            let delay = self.rng.below(self.nodes[i].disk_delay_max_ms + 1);
            if delay > 0 && (!ready.entries.is_empty() || ready.hard_state.is_some() || ready.snapshot.is_some()) {
                self.nodes[i].persisting = Some((self.now_ms + delay, ready));
                break;
            }
            self.complete_ready(i, ready)?;
        }
        Ok(())
    }

    /// Election safety (at most one leader per term) at every step, and leader completeness
    /// when a node is first seen leading term T: it holds every entry known committed in a
    /// term below T. (A leader of an older term may still be elected late — its votes were
    /// granted long ago — and need not hold what later terms committed; it cannot commit.)
    fn check_leaders(&mut self) -> Result<(), Violation> {
        for i in 0..self.nodes.len() {
            let id = self.nodes[i].id;
            let Some(raw) = self.nodes[i].node.as_ref() else { continue };
            let raft = &raw.raft();
            if raft.role != Role::Leader {
                continue;
            }
            let term = raft.term;
            match self.leaders.get(&term) {
                Some(&other) if other != id => {
                    return Err(self.violation(format!("two leaders in term {term}: {other} and {id}")));
                }
                Some(_) => continue,
                None => {}
            }
            for (&index, entry) in self.committed.range(raft.log.first_index()..) {
                let entry_term = entry.term;
                if entry.known_in_term < term && raft.log.term_or_zero(index) != entry_term {
                    return Err(self.violation(format!(
                        "leader completeness: leader {id} of term {term} lacks committed entry {index} (term {entry_term})"
                    )));
                }
            }
            self.leaders.insert(term, id);
        }
        self.check_leases()
    }

    /// The lease's own claim, checked directly: while a leader of term T holds a lease, no
    /// node leads a later term. (A stale read needs a write in between to show up in the
    /// history; this catches the broken lease even when no such write happened.)
    fn check_leases(&self) -> Result<(), Violation> {
        if !self.options.lease_read {
            return Ok(());
        }
        let running = || self.nodes.iter().filter_map(|n| n.node.as_ref()).map(|n| n.raft());
        for holder in running().filter(|r| r.role == Role::Leader && r.holds_lease()) {
            if let Some(newer) = running().find(|r| r.role == Role::Leader && r.term > holder.term) {
                return Err(self.violation(format!(
                    "lease: leader {} of term {} holds a lease while {} leads term {}",
                    holder.id, holder.term, newer.id, newer.term
                )));
            }
        }
        Ok(())
    }

    /// Records the entries a node newly knows committed; two different entries committed at
    /// one index is a violation (before anyone applies them).
    fn check_commits(&mut self, i: usize) -> Result<(), Violation> {
        let Some(raw) = self.nodes[i].node.as_ref() else { return Ok(()) };
        let log = &raw.raft().log;
        let from = (self.nodes[i].commit_checked + 1).max(log.first_index());
        let to = log.committed.min(log.last_index());
        if from > to {
            return Ok(());
        }
        let entries = log.entries(from, to + 1, usize::MAX).map_err(|error| {
            self.violation(format!(
                "node {} cannot read its committed entries {from}..={to}: {error}",
                self.nodes[i].id
            ))
        })?;
        let observer_term = raw.raft().term;
        let mut newly_known = Vec::new();
        for entry in &entries {
            let hash = hash_entry(entry);
            match self.committed.get_mut(&entry.index) {
                Some(known) if (known.term, known.hash) != (entry.term, hash) => {
                    let known_term = known.term;
                    return Err(self.violation(format!(
                        "commit safety: node {} holds a different committed entry at index {} (term {} vs {known_term})",
                        self.nodes[i].id, entry.index, entry.term
                    )));
                }
                Some(known) => {
                    if observer_term < known.known_in_term {
                        known.known_in_term = observer_term;
                        newly_known.push((entry.index, entry.term, observer_term));
                    }
                }
                None => {
                    let committed = CommittedEntry { term: entry.term, hash, known_in_term: observer_term };
                    self.committed.insert(entry.index, committed);
                    newly_known.push((entry.index, entry.term, observer_term));
                }
            }
        }
        // Leaders elected before this was known committed must hold it too.
        for (index, entry_term, known_in_term) in newly_known {
            for node in self.nodes.iter().filter_map(|n| n.node.as_ref()) {
                let raft = &node.raft();
                let lacks = raft.log.first_index() <= index && raft.log.term_or_zero(index) != entry_term;
                if raft.role == Role::Leader && raft.term > known_in_term && lacks {
                    return Err(self.violation(format!(
                        "leader completeness: leader {} of term {} lacks committed entry {index} (term {entry_term})",
                        raft.id, raft.term
                    )));
                }
            }
        }
        self.nodes[i].commit_checked = to;
        Ok(())
    }

    /// No committed entry is lost: each is durably held (or covered by a snapshot) by a
    /// majority of nodes. With at most one node removed at a time, every quorum of every
    /// configuration the run passes through is such a majority. Checked after each crash.
    fn check_committed_entries_durable(&self) -> Result<(), Violation> {
        let majority = self.options.nodes / 2 + 1;
        let storages: Vec<&MemStorage> =
            self.nodes.iter().map(|n| n.node.as_ref().map_or(&n.durable, |r| &r.raft().log.storage)).collect();
        let covered_by_all = storages.iter().map(|s| s.snapshot.meta.index).min().unwrap_or(0);
        for (&index, &CommittedEntry { term, .. }) in self.committed.range(covered_by_all + 1..) {
            let holders = storages
                .iter()
                .filter(|s| index <= s.snapshot.meta.index || s.term(index).is_ok_and(|t| t == term))
                .count();
            if holders < majority {
                return Err(self.violation(format!(
                    "committed entry {index} (term {term}) is durable on only {holders} of {} nodes",
                    self.options.nodes
                )));
            }
        }
        Ok(())
    }

    /// Persists, sends, applies and acknowledges one `Ready`.
    fn complete_ready(&mut self, i: usize, ready: Ready) -> Result<(), Violation> {
        let id = self.nodes[i].id;
        self.nodes[i].node.as_mut().expect("running").storage_mut().persist(&ready);
        self.check_log_matching(i, &ready.entries)?;
        for message in ready.messages.iter().cloned() {
            self.send(message);
        }
        if let Some(snapshot) = &ready.snapshot {
            self.nodes[i].kv = Kv::decode(&snapshot.data);
            self.report.snapshots_installed += 1;
        }
        for entry in &ready.committed_entries {
            self.apply_entry(i, entry)?;
        }
        let node = self.nodes[i].node.as_mut().expect("running");
        let read_states = ready.read_states.clone();
        node.advance(ready);
        self.check_commits(i)?;
        self.take_read_states(id, &read_states);
        self.maybe_compact(i);
        Ok(())
    }

    /// Log matching, checked the way it is proved: an entry of a given index and term is always
    /// the same entry, and always follows an entry of the same term. By induction, two logs
    /// that share an (index, term) share everything before it.
    fn check_log_matching(&mut self, i: usize, entries: &[Entry]) -> Result<(), Violation> {
        let storage = &self.nodes[i].node.as_ref().expect("running").raft().log.storage;
        for entry in entries {
            let identity = hash_entry(entry);
            let previous_term = storage.term(entry.index - 1).ok();
            match self.log_entries.get(&(entry.index, entry.term)) {
                Some(&(known, _)) if known != identity => {
                    return Err(self.violation(format!(
                        "log matching: two different entries at index {} in term {}",
                        entry.index, entry.term
                    )));
                }
                Some(&(_, Some(known_previous))) if previous_term.is_some_and(|t| t != known_previous) => {
                    return Err(self.violation(format!(
                        "log matching: entry {} of term {} follows terms {known_previous} and {:?} on different nodes",
                        entry.index, entry.term, previous_term
                    )));
                }
                Some(&(_, Some(_))) => {}
                _ => {
                    self.log_entries.insert((entry.index, entry.term), (identity, previous_term));
                }
            }
        }
        Ok(())
    }

    fn apply_entry(&mut self, i: usize, entry: &Entry) -> Result<(), Violation> {
        let h = hash_entry(entry);
        match self.applied.get(&entry.index) {
            Some(&(term, other)) if term != entry.term || other != h => {
                return Err(self.violation(format!(
                    "state machine safety: node {} applied a different entry at index {} (term {} vs {term})",
                    self.nodes[i].id, entry.index, entry.term
                )));
            }
            _ => {
                self.applied.insert(entry.index, (entry.term, h));
            }
        }
        if let EntryKind::ConfChange(change) = entry.kind {
            self.nodes[i].node.as_mut().expect("running").apply_conf_change(change);
        }
        if let Some((_, key, value)) = decode_write(&entry.data) {
            self.nodes[i].kv.values.insert(key, value);
        }
        self.finish_writes(self.nodes[i].id, entry);
        Ok(())
    }

    /// Replaces applied entries by a snapshot of the state machine now and then.
    fn maybe_compact(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let Some(raw) = node.node.as_mut() else { return };
        let applied = raw.raft().log.applied;
        let storage = raw.storage();
        if applied >= storage.first_index() + self.options.compact_every && applied <= storage.last_index() {
            let conf = raw.raft().conf_state();
            raw.storage_mut().compact(applied, node.kv.encode(), conf);
        }
    }

    // ---- workload ----------------------------------------------------------------------

    fn tick_history(&mut self) -> u64 {
        self.history_clock += 1;
        self.history_clock
    }

    fn run_clients(&mut self) {
        for c in 0..self.clients.len() {
            self.expire_client(c);
            if self.clients[c].pending.is_some() || self.clients[c].next_op_ms > self.now_ms {
                continue;
            }
            self.clients[c].next_op_ms = self.now_ms + 5 + self.rng.below(40);
            // Mostly the believed leader; now and then any node (reads through followers).
            let random_index = self.rng.below(self.options.nodes as u64) as usize;
            let node_index = match self.clients[c].leader_hint {
                Some(hint) if self.rng.chance(800) => hint,
                _ => random_index,
            };
            let key = self.rng.below(self.options.keys);
            let op_id = self.next_op_id;
            self.next_op_id += 1;
            if self.rng.chance(600) {
                self.start_write(c, node_index, op_id, key);
            } else {
                self.start_read(c, node_index, op_id, key);
            }
        }
    }

    fn start_write(&mut self, c: usize, node_index: usize, op_id: u64, key: u64) {
        let value = op_id;
        let called_at = self.tick_history();
        let deadline = self.now_ms + CLIENT_TIMEOUT_MS;
        let node_id = self.nodes[node_index].id;
        let Some(node) = self.nodes[node_index].node.as_mut() else {
            self.clients[c].leader_hint = None;
            return;
        };
        // A refused proposal was never appended: it did not happen and is not recorded.
        match node.propose(encode_write(op_id, key, value)) {
            Ok(index) => {
                let history = self.history.len();
                self.history.push(Operation { key, op: RegisterOp::Write(value), called_at, returned_at: None });
                self.clients[c].pending = Some(Pending::Write { node: node_id, index, key, value, history, deadline });
                self.clients[c].leader_hint = Some(node_index);
            }
            Err(ProposeError::NotLeader { leader }) => {
                self.clients[c].leader_hint = leader.map(|id| id as usize - 1);
            }
            Err(_) => {}
        }
    }

    fn start_read(&mut self, c: usize, node_index: usize, context: u64, key: u64) {
        let node_id = self.nodes[node_index].id;
        let Some(node) = self.nodes[node_index].node.as_mut() else { return };
        if node.read_index(context).is_ok() {
            let called_at = self.tick_history();
            let deadline = self.now_ms + CLIENT_TIMEOUT_MS;
            self.clients[c].pending =
                Some(Pending::Read { node: node_id, context, key, called_at, deadline, index: None });
        }
    }

    /// A write waiting on `node` completes when that node applies its index.
    fn finish_writes(&mut self, node: NodeId, entry: &Entry) {
        for c in 0..self.clients.len() {
            let Some(Pending::Write { node: on, index, key, value, history, .. }) = self.clients[c].pending else {
                continue;
            };
            if on != node || index != entry.index {
                continue;
            }
            self.clients[c].pending = None;
            if decode_write(&entry.data) == Some((value, key, value)) {
                let returned_at = self.tick_history();
                self.history[history].returned_at = Some(returned_at);
                self.report.writes_ok += 1;
            } else {
                // Another entry took the index: this write can never commit. It is turned into a
                // read without an outcome, which the checker ignores.
                self.history[history].op = RegisterOp::Read(None);
                self.history[history].returned_at = None;
            }
        }
    }

    fn take_read_states(&mut self, node: NodeId, read_states: &[ReadState]) {
        for state in read_states {
            for client in &mut self.clients {
                if let Some(Pending::Read { node: on, context, index, .. }) = &mut client.pending {
                    if *on == node && *context == state.context {
                        *index = Some(state.index);
                    }
                }
            }
        }
        self.finish_reads(node);
    }

    /// A read with a read index completes once its node has applied up to that index.
    fn finish_reads(&mut self, node: NodeId) {
        let Some(raw) = self.nodes[node as usize - 1].node.as_ref() else { return };
        let applied = raw.raft().log.applied;
        for c in 0..self.clients.len() {
            let Some(Pending::Read { node: on, key, called_at, index: Some(index), .. }) = self.clients[c].pending
            else {
                continue;
            };
            if on != node || applied < index {
                continue;
            }
            let value = self.nodes[node as usize - 1].kv.values.get(&key).copied();
            self.clients[c].pending = None;
            let returned_at = self.tick_history();
            self.history.push(Operation {
                key,
                op: RegisterOp::Read(value),
                called_at,
                returned_at: Some(returned_at),
            });
            self.report.reads_ok += 1;
        }
    }

    fn expire_client(&mut self, c: usize) {
        let now = self.now_ms;
        let node_down = |sim: &Simulation, id: NodeId| sim.nodes[id as usize - 1].node.is_none();
        match self.clients[c].pending {
            Some(Pending::Write { deadline, node, .. }) if deadline <= now || node_down(self, node) => {
                // Unknown outcome: it stays in the history without a return.
                self.clients[c].pending = None;
                self.report.writes_unknown += 1;
            }
            Some(Pending::Read { deadline, node, .. }) if deadline <= now || node_down(self, node) => {
                self.clients[c].pending = None;
            }
            Some(Pending::Read { node, .. }) => self.finish_reads(node),
            _ => {}
        }
    }

    // ---- liveness and history ------------------------------------------------------------

    fn check_liveness_progress(&self) -> Result<(), Violation> {
        let Some(heal_applied) = self.heal_applied else { return Ok(()) };
        let deadline = self.options.faults_until_ms + self.options.liveness_bound_ticks * TICK_MS;
        if self.now_ms != deadline {
            return Ok(());
        }
        for node in &self.nodes {
            let applied = node.node.as_ref().map_or(0, |n| n.raft().log.applied);
            if applied <= heal_applied {
                return Err(self.violation(format!(
                    "liveness: node {} applied nothing new within {} ticks of healing (applied {applied}, at heal {heal_applied}); {}",
                    node.id,
                    self.options.liveness_bound_ticks,
                    self.describe_nodes()
                )));
            }
        }
        Ok(())
    }

    /// One line per node: role, term, leader, log bounds, and the leader's view of followers.
    fn describe_nodes(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let Some(raw) = node.node.as_ref() else {
                out.push_str(&format!("[node {} down] ", node.id));
                continue;
            };
            let raft = &raw.raft();
            out.push_str(&format!(
                "[node {} {:?} term {} leader {:?} log {}..={} commit {} applied {} persisting {}",
                node.id,
                raft.role,
                raft.term,
                raft.leader,
                raft.log.first_index(),
                raft.log.last_index(),
                raft.log.committed,
                raft.log.applied,
                node.persisting.is_some()
            ));
            if raft.role == Role::Leader {
                for peer in &self.nodes {
                    if let Some(p) = raft.progress_of(peer.id) {
                        out.push_str(&format!(
                            " | {}: match {} next {} {:?} paused {}",
                            peer.id,
                            p.match_index,
                            p.next_index,
                            p.state,
                            p.is_paused()
                        ));
                    }
                }
            }
            out.push_str("] ");
        }
        out
    }

    fn check_liveness_at_end(&self) -> Result<(), Violation> {
        if self.heal_applied.is_none() {
            return Err(self.violation("the run ended before the faults healed".into()));
        }
        Ok(())
    }

    fn check_history(&self) -> Result<(), Violation> {
        match linearizability::check(&self.history) {
            Verdict::Linearizable => Ok(()),
            Verdict::NotLinearizable { key } => {
                Err(self.violation(format!("history of key {key} is not linearizable")))
            }
            Verdict::Inconclusive { key } => {
                Err(self.violation(format!("linearizability check of key {key} exceeded its budget")))
            }
        }
    }
}

impl Simulation {
    /// The benchmark: a fault-free 3-node cluster on a 1 ms network whose leader is handed
    /// `batch` proposals every simulated millisecond until `entries` are committed. Returns the
    /// committed count and the simulated milliseconds it took; the caller times the CPU.
    pub fn run_commit_benchmark(mut self, entries: u64, batch: usize) -> Result<(u64, u64), Violation> {
        self.heal();
        // Bounded: stops at `entries` committed or after a simulated hour.
        while self.now_ms < 3_600_000 {
            self.step_ms()?;
            if let Some(leader) =
                self.nodes.iter_mut().filter_map(|n| n.node.as_mut()).find(|n| n.raft().role == Role::Leader)
            {
                if leader.raft().log.committed >= entries {
                    return Ok((leader.raft().log.committed, self.now_ms));
                }
                // Refused as a whole when overloaded: the next millisecond tries again.
                let _ = leader.propose_batch(vec![vec![0u8; 64]; batch]);
            }
            self.now_ms += 1;
        }
        Err(self.violation(format!("benchmark committed fewer than {entries} entries in a simulated hour")))
    }

    /// Options for the commit benchmark: 3 nodes, no faults, no clients.
    pub fn benchmark_options() -> SimOptions {
        SimOptions {
            seed: 1,
            nodes: 3,
            faults_until_ms: 0,
            liveness_bound_ticks: 300,
            loss_permille: 0,
            duplicate_permille: 0,
            delay_max_ms: 1,
            tick_ms: vec![TICK_MS; 3],
            clients: 0,
            keys: 1,
            compact_every: 10_000,
            pre_vote: true,
            check_quorum: true,
            lease_read: false,
            membership_changes: false,
            injected_bug: None,
        }
    }
}

thread_local! {
    /// The simulated time of the step running on this thread, for reporting panics.
    static SIMULATED_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs one seed with the options it expands to.
pub fn run_seed(seed: u64, injected_bug: Option<InjectedBug>) -> Result<SimReport, Violation> {
    let mut options = SimOptions::from_seed(seed);
    options.injected_bug = injected_bug;
    run_options(options)
}

/// Runs a simulation. A panic inside Raft or the simulator is reported as a violation, so the
/// seed and its replay command get printed like any other failure.
pub fn run_options(options: SimOptions) -> Result<SimReport, Violation> {
    std::panic::catch_unwind(move || Simulation::new(options).run()).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into());
        Err(Violation { at_ms: SIMULATED_MS.with(|at| at.get()), what: format!("panic: {message}") })
    })
}

/// Each check shown catching a broken state: a healthy run is stopped part-way, one thing is
/// corrupted the way a bug would, and the check must name it.
#[cfg(test)]
mod checks_catch_broken_states {
    use super::*;

    /// A fault-free 3-node run stopped after 1.5 simulated seconds.
    fn healthy_run() -> Simulation {
        let mut options = SimOptions::from_seed(11);
        options.nodes = 3;
        options.tick_ms = vec![TICK_MS; 3];
        options.faults_until_ms = 0;
        let mut sim = Simulation::new(options);
        while sim.now_ms < 1_500 {
            sim.step_ms().expect("a healthy run passes");
            sim.now_ms += 1;
        }
        assert!(sim.committed.len() > 10, "the run committed entries");
        sim
    }

    fn leader_index(sim: &Simulation) -> usize {
        sim.current_leader().expect("a leader after 1.5 s") as usize - 1
    }

    #[test]
    fn two_leaders_in_one_term() {
        let mut sim = healthy_run();
        let term = sim.nodes[leader_index(&sim)].node.as_ref().expect("running").raft().term;
        sim.leaders.insert(term, 99);
        let violation = sim.check_leaders().expect_err("caught");
        assert!(violation.what.contains("two leaders in term"), "{violation}");
    }

    #[test]
    fn a_leader_missing_an_entry_committed_in_an_earlier_term() {
        let mut sim = healthy_run();
        let leader = leader_index(&sim);
        let term = sim.nodes[leader].node.as_ref().expect("running").raft().term;
        sim.leaders.remove(&term);
        let last = *sim.committed.keys().next_back().expect("committed");
        // Recorded as committed with another term, and known committed before this term.
        let entry = sim.committed.get_mut(&last).expect("present");
        entry.term += 7;
        entry.known_in_term = term - 1;
        let violation = sim.check_leaders().expect_err("caught");
        assert!(violation.what.contains("leader completeness"), "{violation}");
        // Known committed only in this term or later: a late leader need not hold it.
        sim.committed.get_mut(&last).expect("present").known_in_term = term;
        sim.check_leaders().expect("not required of this leader");
    }

    #[test]
    fn a_different_entry_committed_at_one_index() {
        let mut sim = healthy_run();
        let index = *sim.committed.keys().next_back().expect("committed");
        sim.committed.get_mut(&index).expect("present").hash ^= 1;
        sim.nodes[0].commit_checked = index - 1;
        let violation = sim.check_commits(0).expect_err("caught");
        assert!(violation.what.contains("commit safety"), "{violation}");
    }

    #[test]
    fn log_matching_by_content_and_by_predecessor() {
        let mut sim = healthy_run();
        let raw = sim.nodes[0].node.as_ref().expect("running");
        let last = raw.raft().log.storage.last_index();
        let entry = raw.raft().log.entries(last, last + 1, usize::MAX).expect("held")[0].clone();
        let mut other_data = entry.clone();
        other_data.data = [&entry.data[..], &[1]].concat().into();
        let violation = sim.check_log_matching(0, &[other_data]).expect_err("caught");
        assert!(violation.what.contains("two different entries"), "{violation}");
        // Same entry, but recorded as following a different term elsewhere.
        let (identity, previous) = sim.log_entries[&(entry.index, entry.term)];
        sim.log_entries.insert((entry.index, entry.term), (identity, previous.map(|t| t + 1)));
        let violation = sim.check_log_matching(0, &[entry]).expect_err("caught");
        assert!(violation.what.contains("follows terms"), "{violation}");
    }

    #[test]
    fn a_committed_entry_lost_from_a_majority() {
        let mut sim = healthy_run();
        sim.check_committed_entries_durable().expect("healthy");
        // Two of three nodes crash and lose their logs (what acknowledging before persisting does).
        for index in [0, 1] {
            sim.crash(index, u64::MAX);
            sim.nodes[index].durable = MemStorage::new_with_voters(&[1, 2, 3]);
        }
        let violation = sim.check_committed_entries_durable().expect_err("caught");
        assert!(violation.what.contains("durable on only"), "{violation}");
    }

    #[test]
    fn a_panic_is_reported_as_a_violation_with_its_message() {
        let mut options = SimOptions::from_seed(3);
        options.tick_ms.clear(); // inconsistent options: indexing a node's tick length panics
        let violation = run_options(options).expect_err("caught");
        assert!(violation.what.starts_with("panic: index out of bounds"), "{violation}");
    }
}
