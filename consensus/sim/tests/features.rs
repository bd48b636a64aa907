//! Raft's features one by one, on a hand-driven network of real `RawNode`s: the test decides
//! which messages are delivered, so each scenario (the paper's Figure 8 among them) is exact.

use std::collections::{BTreeMap, BTreeSet};
use sundial_consensus::*;

/// A cluster whose messages move only when the test says so.
struct Net {
    nodes: BTreeMap<NodeId, RawNode<MemStorage>>,
    /// Messages sent and not yet delivered.
    queue: Vec<Message>,
    /// Directed pairs whose messages are dropped.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Committed entries each node applied, in order.
    applied: BTreeMap<NodeId, Vec<Entry>>,
    read_states: BTreeMap<NodeId, Vec<ReadState>>,
}

impl Net {
    fn new(ids: &[NodeId], configure: impl Fn(&mut Config)) -> Net {
        Net::with_storages(ids.iter().map(|&id| (id, MemStorage::new_with_voters(ids))).collect(), configure)
    }

    fn with_storages(storages: Vec<(NodeId, MemStorage)>, configure: impl Fn(&mut Config)) -> Net {
        let mut nodes = BTreeMap::new();
        for (id, storage) in storages {
            let mut config = Config::new(id);
            configure(&mut config);
            nodes.insert(id, RawNode::new(config, storage).expect("valid config"));
        }
        Net { nodes, queue: Vec::new(), cut: BTreeSet::new(), applied: BTreeMap::new(), read_states: BTreeMap::new() }
    }

    /// Persists, applies and collects the messages of every node's pending `Ready`s.
    fn collect(&mut self) {
        for (&id, node) in self.nodes.iter_mut() {
            // Bounded: a node has finitely many readies between inputs.
            for _ in 0..100 {
                if !node.has_ready() {
                    break;
                }
                let ready = node.ready();
                node.storage_mut().persist(&ready);
                self.queue.extend(ready.messages.iter().cloned());
                for entry in &ready.committed_entries {
                    if let EntryKind::ConfChange(change) = entry.kind {
                        node.apply_conf_change(change);
                    }
                    self.applied.entry(id).or_default().push(entry.clone());
                }
                self.read_states.entry(id).or_default().extend(ready.read_states.iter().copied());
                node.advance(ready);
            }
        }
    }

    /// Delivers queued messages that match `filter` (others stay queued), once.
    fn deliver_if(&mut self, filter: impl Fn(&Message) -> bool) -> usize {
        self.collect();
        let (now, later): (Vec<Message>, Vec<Message>) = std::mem::take(&mut self.queue).into_iter().partition(&filter);
        self.queue = later;
        let count = now.len();
        for message in now {
            if self.cut.contains(&(message.from, message.to)) {
                continue;
            }
            if let Some(node) = self.nodes.get_mut(&message.to) {
                node.step(message);
            }
        }
        self.collect();
        count
    }

    /// Delivers everything until the network is quiet (bounded rounds).
    fn settle(&mut self) {
        for _ in 0..200 {
            if self.deliver_if(|_| true) == 0 {
                return;
            }
        }
        panic!("the network did not settle in 200 rounds");
    }

    fn tick(&mut self, id: NodeId, ticks: u32) {
        for _ in 0..ticks {
            self.nodes.get_mut(&id).expect("node").tick();
            self.collect();
        }
    }

    /// Ticks every node but `except` through one election timeout, dropping any campaign it
    /// started: with lease reads, a node withholds its vote for its first election timeout.
    fn warm_up_except(&mut self, except: NodeId) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().filter(|&id| id != except).collect();
        for id in ids {
            let ticks = self.nodes[&id].raft().config().election_tick;
            self.tick(id, ticks);
            self.queue.retain(|m| m.from != id);
        }
    }

    /// Makes `id` campaign by ticking only it past its election timeout, then settles.
    fn elect(&mut self, id: NodeId) {
        self.tick(id, 40);
        self.settle();
        assert_eq!(self.role(id), Role::Leader, "node {id} should have won");
    }

    fn role(&self, id: NodeId) -> Role {
        self.nodes[&id].raft().role
    }

    fn raft(&self, id: NodeId) -> &Raft<MemStorage> {
        self.nodes[&id].raft()
    }

    fn node(&mut self, id: NodeId) -> &mut RawNode<MemStorage> {
        self.nodes.get_mut(&id).expect("node")
    }

    fn isolate(&mut self, id: NodeId) {
        for &other in self.nodes.keys() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    fn applied_data(&self, id: NodeId) -> Vec<Vec<u8>> {
        self.applied.get(&id).map_or(Vec::new(), |entries| {
            entries.iter().filter(|e| !e.data.is_empty()).map(|e| e.data.to_vec()).collect()
        })
    }
}

fn entry(index: Index, term: Term) -> Entry {
    Entry { index, term, kind: EntryKind::Normal, data: format!("{index}@{term}").into_bytes().into() }
}

fn storage_with(voters: &[NodeId], term: Term, entries: &[Entry]) -> MemStorage {
    let mut storage = MemStorage::new_with_voters(voters);
    storage.append(entries);
    storage.hard_state.term = term;
    // In every scenario here, index 1 is on all logs: committed.
    storage.hard_state.commit = entries.len().min(1) as u64;
    storage
}

#[test]
fn single_node_elects_itself_and_commits_once_persisted() {
    let mut net = Net::new(&[1], |_| {});
    net.elect(1);
    let index = net.node(1).propose(b"x".to_vec()).expect("leader accepts");
    net.collect();
    assert_eq!(net.raft(1).log.committed, index);
    assert_eq!(net.applied_data(1), vec![b"x".to_vec()]);
}

#[test]
fn three_nodes_elect_one_leader_and_apply_the_same_entries() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    net.elect(1);
    assert_eq!((net.role(2), net.role(3)), (Role::Follower, Role::Follower));
    for i in 0..5u8 {
        net.node(1).propose(vec![i]).expect("leader accepts");
    }
    net.settle();
    net.tick(1, 1); // a heartbeat carries the commit index to followers
    net.settle();
    let expected: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i]).collect();
    for id in [1, 2, 3] {
        assert_eq!(net.applied_data(id), expected, "node {id}");
        assert_eq!(net.raft(id).leader, Some(1));
    }
}

#[test]
fn a_proposal_to_a_follower_is_refused_naming_the_leader() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    net.elect(1);
    assert_eq!(net.node(2).propose(b"x".to_vec()), Err(ProposeError::NotLeader { leader: Some(1) }));
    assert!(net.raft(2).log.unstable_entries().is_empty(), "nothing was appended");
}

#[test]
fn pre_vote_keeps_an_isolated_node_from_disrupting_the_leader() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    net.elect(1);
    let term = net.raft(1).term;
    net.isolate(3);
    net.tick(3, 100);
    net.settle();
    assert_eq!(net.raft(3).term, term, "pre-votes failed, so the term did not rise");
    net.cut.clear();
    net.tick(1, 1);
    net.settle();
    assert_eq!((net.role(1), net.raft(1).term), (Role::Leader, term));
}

#[test]
fn without_pre_vote_an_isolated_node_raises_the_term_on_return() {
    // The contrast to the test above: the same scenario, pre-vote and check-quorum off.
    let mut net = Net::new(&[1, 2, 3], |c| {
        c.pre_vote = false;
        c.check_quorum = false;
    });
    net.elect(1);
    let term = net.raft(1).term;
    net.isolate(3);
    net.tick(3, 100);
    assert!(net.raft(3).term > term);
    net.cut.clear();
    net.tick(1, 1);
    net.settle();
    assert!(net.raft(1).term > term, "the returning node forced a new election");
}

#[test]
fn check_quorum_makes_a_cut_off_leader_step_down() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    net.elect(1);
    net.isolate(1);
    net.tick(1, 25);
    assert_eq!(net.role(1), Role::Follower, "no quorum heard within an election timeout");
}

#[test]
fn a_follower_waits_for_a_slow_leader_whose_node_is_reachable_within_the_patience_only() {
    let mut net = Net::new(&[1, 2, 3], |c| c.leader_patience_tick = 100);
    net.elect(1);
    let term = net.raft(1).term;
    // The leader's heartbeats stop reaching its followers (its process is starved), but
    // their transport still hears from its node.
    net.isolate(1);
    for follower in [2, 3] {
        net.node(follower).set_reachable(&[1]);
    }
    net.tick(2, 60);
    net.tick(3, 60);
    net.settle();
    assert_eq!((net.raft(2).term, net.raft(2).leader), (term, Some(1)), "past its timeout, it waits");
    assert_eq!((net.raft(3).term, net.raft(3).leader), (term, Some(1)));
    // Past the patience (counted from the leader's last message), they campaign regardless.
    net.tick(2, 50);
    net.tick(3, 50);
    net.settle();
    assert!(net.raft(2).term > term && net.raft(3).term > term, "an election after the patience");

    // Once the leader's node is not reachable, a follower past its timeout campaigns at once.
    let mut net = Net::new(&[1, 2, 3], |c| c.leader_patience_tick = 100);
    net.elect(1);
    let term = net.raft(1).term;
    net.isolate(1);
    net.node(2).set_reachable(&[1, 3]);
    net.tick(2, 45);
    net.settle();
    assert_eq!(net.raft(2).term, term, "waiting");
    net.node(2).set_reachable(&[3]);
    net.tick(2, 1);
    net.settle();
    assert_eq!(net.role(2), Role::PreCandidate, "node 2 campaigned on its next tick");
}

#[test]
fn a_leader_that_hears_no_quorum_stays_while_their_nodes_are_reachable_within_the_patience_only() {
    let mut net = Net::new(&[1, 2, 3], |c| c.leader_patience_tick = 100);
    net.elect(1);
    // The followers' answers stop reaching the leader, but its transport hears their nodes.
    net.isolate(1);
    net.node(1).set_reachable(&[2, 3]);
    net.tick(1, 60);
    assert_eq!(net.role(1), Role::Leader, "check-quorum waits while a quorum is reachable");
    net.tick(1, 60);
    assert_eq!(net.role(1), Role::Follower, "past the patience it steps down");

    // Reachable nodes short of a quorum: it steps down at its election timeout, as without.
    let mut net = Net::new(&[1, 2, 3], |c| c.leader_patience_tick = 100);
    net.elect(1);
    net.isolate(1);
    net.node(1).set_reachable(&[]);
    net.tick(1, 25);
    assert_eq!(net.role(1), Role::Follower);
}

#[test]
fn a_leader_that_stepped_down_is_voted_for_by_followers_that_still_take_it_for_the_leader() {
    let mut net = Net::new(&[1, 2, 3], |c| c.leader_patience_tick = 100);
    net.elect(1);
    let term = net.raft(1).term;
    // Its followers' answers stop reaching it: it steps down (check-quorum), while they
    // still take it for their leader and withhold their votes from anyone else.
    net.cut.insert((2, 1));
    net.cut.insert((3, 1));
    net.tick(1, 25);
    assert_eq!(net.role(1), Role::Follower);
    net.cut.clear();
    // Its own campaign is no disruption: they vote for it without waiting out their timeouts.
    net.tick(1, 45);
    net.settle();
    assert_eq!(net.role(1), Role::Leader, "the followers voted for their former leader");
    assert!(net.raft(1).term > term);
}

#[test]
fn a_divergent_follower_is_repaired_in_few_round_trips() {
    // Leader 1: terms 1 1 1 4 4 5 5 6 6 6; follower 2: terms 1 1 1 2 2 2 3 3 3 3 3.
    let leader_terms = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6];
    let follower_terms = [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3];
    let log = |terms: &[Term]| terms.iter().enumerate().map(|(i, &t)| entry(i as u64 + 1, t)).collect::<Vec<_>>();
    let storages = vec![
        (1, storage_with(&[1, 2, 3], 6, &log(&leader_terms))),
        (2, storage_with(&[1, 2, 3], 6, &log(&follower_terms))),
        (3, storage_with(&[1, 2, 3], 6, &log(&leader_terms))),
    ];
    let mut net = Net::with_storages(storages, |_| {});
    net.cut.insert((1, 2));
    net.cut.insert((2, 1));
    net.elect(1);
    net.cut.clear();
    net.tick(1, 1);
    // Count the rejections node 2 sends while it is repaired.
    let mut rejections = 0;
    for _ in 0..50 {
        net.collect();
        rejections += net
            .queue
            .iter()
            .filter(|m| matches!(m.kind, MessageKind::AppendResponse { reject: true, .. }) && m.from == 2)
            .count();
        if net.deliver_if(|_| true) == 0 {
            break;
        }
    }
    net.tick(1, 1);
    net.settle();
    let leader_log: Vec<Term> = (1..=net.raft(1).log.last_index()).map(|i| net.raft(1).log.term_or_zero(i)).collect();
    let follower_log: Vec<Term> = (1..=net.raft(2).log.last_index()).map(|i| net.raft(2).log.term_or_zero(i)).collect();
    assert_eq!(follower_log, leader_log, "the follower's log now matches the leader's");
    assert!(rejections <= 3, "term hints skip whole terms: {rejections} rejections for 8 divergent entries");
}

/// The paper's Figure 8: S1 leads term 4 with an entry of term 2 at index 2 that S3 and S4
/// lack; S5 holds a different entry of term 3 at index 2. S1 replicates the term-2 entry to S3
/// and S4, so it is on a majority (S1, S3, S4) — but it must not be committed by counting,
/// because S5 can still win an election and overwrite it. (Paper Raft: no pre-vote, no
/// check-quorum, one entry per append so S3 and S4 can acknowledge index 2 alone.)
fn figure_8(injected_bug: Option<InjectedBug>) -> Net {
    let voters = [1, 2, 3, 4, 5];
    let storages = vec![
        (1, storage_with(&voters, 3, &[entry(1, 1), entry(2, 2)])),
        (2, storage_with(&voters, 3, &[entry(1, 1), entry(2, 2)])),
        (3, storage_with(&voters, 3, &[entry(1, 1)])),
        (4, storage_with(&voters, 3, &[entry(1, 1)])),
        (5, storage_with(&voters, 3, &[entry(1, 1), entry(2, 3)])),
    ];
    let mut net = Net::with_storages(storages, |c| {
        c.injected_bug = injected_bug;
        c.pre_vote = false;
        c.check_quorum = false;
        c.max_size_per_msg = 1;
    });
    // S1 campaigns for term 4 (ticked one at a time so it does not time out again).
    for _ in 0..40 {
        if net.role(1) == Role::Candidate {
            break;
        }
        net.tick(1, 1);
    }
    for _ in 0..3 {
        net.deliver_if(|m| matches!(m.kind, MessageKind::VoteRequest { .. } | MessageKind::VoteResponse { .. }));
    }
    assert_eq!((net.role(1), net.raft(1).term), (Role::Leader, 4));
    let s3_s4 = |id: NodeId| id == 3 || id == 4;
    // S1's first appends (after index 2) are rejected by S3 and S4, which lack index 2 ...
    net.deliver_if(|m| s3_s4(m.to) && matches!(m.kind, MessageKind::Append { prev_index: 2, .. }));
    net.deliver_if(|m| s3_s4(m.from) && matches!(m.kind, MessageKind::AppendResponse { reject: true, .. }));
    // ... so S1 backs up and sends index 2 (term 2) alone, which they acknowledge.
    net.deliver_if(|m| s3_s4(m.to) && matches!(m.kind, MessageKind::Append { prev_index: 1, .. }));
    net.deliver_if(|m| s3_s4(m.from) && matches!(m.kind, MessageKind::AppendResponse { reject: false, .. }));
    net
}

#[test]
fn figure_8_an_earlier_term_entry_on_a_majority_is_not_committed_by_counting() {
    let net = figure_8(None);
    let matched: Vec<Index> =
        [1, 3, 4].iter().map(|&id| net.raft(1).progress_of(id).map_or(0, |p| p.match_index)).collect();
    assert!(matched.iter().all(|&m| m >= 2), "index 2 is on S1, S3 and S4: {matched:?}");
    assert_eq!(net.raft(1).log.committed, 1, "index 2 has term 2, not the leader's term 4");
}

#[test]
fn figure_8_broken_variant_commits_by_counting_and_loses_the_entry() {
    let mut net = figure_8(Some(InjectedBug::CommitEarlierTermsByCounting));
    assert_eq!(net.raft(1).log.committed, 2, "the broken variant committed index 2 by counting");
    // S1 crashes; S5 (last term 3) wins a later term with votes of S2, S3 and S4, and
    // overwrites index 2: the "committed" entry is gone.
    net.queue.clear();
    net.isolate(1);
    for _ in 0..6 {
        net.tick(5, 25);
        net.settle();
        if net.role(5) == Role::Leader {
            break;
        }
    }
    assert_eq!(net.role(5), Role::Leader);
    net.tick(5, 1);
    net.settle();
    assert_eq!(net.raft(3).log.term_or_zero(2), 3, "index 2 now holds S5's term-3 entry on S3");
}

#[test]
fn read_index_answers_on_the_leader_and_through_a_follower() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    net.elect(1);
    net.node(1).propose(b"x".to_vec()).expect("leader accepts");
    net.settle();
    let committed = net.raft(1).log.committed;
    net.node(1).read_index(7).expect("leader read");
    net.node(2).read_index(8).expect("follower read is forwarded");
    net.settle();
    assert_eq!(net.read_states.get(&1).cloned().unwrap_or_default(), vec![ReadState { context: 7, index: committed }]);
    assert_eq!(net.read_states.get(&2).cloned().unwrap_or_default(), vec![ReadState { context: 8, index: committed }]);
}

#[test]
fn a_leader_cut_off_from_the_quorum_answers_no_read() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    net.elect(1);
    net.isolate(1);
    net.node(1).read_index(9).expect("queued");
    net.settle();
    assert!(net.read_states.get(&1).is_none_or(|r| r.is_empty()), "no quorum confirmed leadership");
}

/// Leader 1 commits `entries` while node 3 is cut off, then replaces its log with a snapshot
/// of `data` (chunks of 100 bytes) and reconnects node 3; returns the snapshot's index.
fn follower_behind_a_snapshot(entries: u8, data: Vec<u8>) -> (Net, Index) {
    let mut net = Net::new(&[1, 2, 3], |c| c.snapshot_chunk_bytes = 100);
    net.elect(1);
    net.isolate(3);
    for i in 0..entries {
        net.node(1).propose(vec![i; 10]).expect("leader accepts");
        net.settle();
    }
    let applied = net.raft(1).log.applied;
    let conf = net.raft(1).conf_state();
    net.node(1).storage_mut().compact(applied, data, conf);
    net.cut.clear();
    (net, applied)
}

#[test]
fn a_lagging_follower_catches_up_through_a_chunked_snapshot() {
    // A 1000-byte snapshot: 10 chunks of 100 bytes.
    let (mut net, applied) = follower_behind_a_snapshot(20, vec![42; 1000]);
    let mut chunks = 0;
    for _ in 0..20 {
        net.tick(1, 1);
        // Deliver round by round, counting the snapshot chunks that go to node 3.
        for _ in 0..50 {
            net.collect();
            chunks += net.queue.iter().filter(|m| m.to == 3 && matches!(m.kind, MessageKind::Snapshot { .. })).count();
            if net.deliver_if(|_| true) == 0 {
                break;
            }
        }
    }
    assert!(chunks >= 10, "the snapshot went in chunks ({chunks})");
    assert!(chunks <= 14, "no chunk is resent on a clean network beyond a heartbeat's doubt ({chunks})");
    let storage = &net.raft(3).log.storage;
    assert_eq!((storage.snapshot.meta.index, storage.snapshot.data.len()), (applied, 1000));
    assert_eq!(net.raft(3).log.committed, net.raft(1).log.committed);
}

#[test]
fn a_lost_snapshot_chunk_is_resent_from_where_the_follower_stopped() {
    let (mut net, applied) = follower_behind_a_snapshot(5, (0..1000).map(|i| i as u8).collect());
    // Node 3 learns it is behind; the leader starts the snapshot with a window of chunks.
    net.tick(1, 1);
    let mut offsets_sent = Vec::new();
    let mut dropped = false;
    // Bounded rounds: deliver everything except, once, the chunk at offset 200.
    for _ in 0..200 {
        net.collect();
        for m in &net.queue {
            if let MessageKind::Snapshot { offset, .. } = m.kind {
                offsets_sent.push(offset);
            }
        }
        if !dropped {
            let chunk_200 = |m: &Message| m.to == 3 && matches!(m.kind, MessageKind::Snapshot { offset: 200, .. });
            if let Some(at) = net.queue.iter().position(chunk_200) {
                net.queue.remove(at);
                dropped = true;
            }
        }
        let delivered = net.deliver_if(|_| true);
        if delivered == 0 {
            if net.raft(3).log.storage.snapshot.meta.index == applied {
                break;
            }
            net.tick(1, 1);
        }
    }
    assert!(dropped, "the chunk at offset 200 was dropped once");
    let storage = &net.raft(3).log.storage;
    assert_eq!(storage.snapshot.meta.index, applied, "the follower installed the snapshot");
    assert_eq!(storage.snapshot.data, (0..1000).map(|i| i as u8).collect::<Vec<u8>>());
    assert_eq!(offsets_sent.iter().filter(|&&o| o == 0).count(), 1, "never started over: {offsets_sent:?}");
    assert!(offsets_sent.len() <= 10 + 4, "at most a window resent: {offsets_sent:?}");
}

#[test]
fn a_snapshot_transfer_survives_the_follower_restarting_mid_way() {
    let (mut net, applied) = follower_behind_a_snapshot(5, vec![7; 1000]);
    net.tick(1, 1);
    // Deliver the first window of chunks, then node 3 restarts: what it received is gone.
    let acked = |net: &Net| net.raft(1).progress_of(3).expect("member").snapshot_transfer.acked_bytes;
    // Bounded: one round at a time until the first chunks are acknowledged.
    for _ in 0..20 {
        if acked(&net) > 0 {
            break;
        }
        net.deliver_if(|_| true);
    }
    let acked_bytes = acked(&net);
    assert!((1..1000).contains(&acked_bytes), "part-way: {acked_bytes} bytes acknowledged");
    let storage = net.nodes.remove(&3).expect("node 3").into_storage();
    net.nodes.insert(3, RawNode::new(Config::new(3), storage).expect("valid config"));
    // Bounded: heartbeat rounds until the transfer finishes.
    for _ in 0..30 {
        net.tick(1, 1);
        net.settle();
    }
    let storage = &net.raft(3).log.storage;
    assert_eq!((storage.snapshot.meta.index, storage.snapshot.data.len()), (applied, 1000));
}

#[test]
fn a_leader_whose_snapshot_no_peer_can_install_sends_nothing_until_it_has_one() {
    let (mut net, applied) = follower_behind_a_snapshot(5, vec![9; 1000]);
    // The leader's newest snapshot is readable only with its own files (a linked one).
    net.node(1).storage_mut().snapshot_unsendable = true;
    let snapshot_chunks =
        |net: &Net| net.queue.iter().filter(|m| m.to == 3 && matches!(m.kind, MessageKind::Snapshot { .. })).count();
    let mut chunks = 0;
    // Bounded: heartbeat rounds in which node 3 asks for what it lacks.
    for _ in 0..10 {
        net.tick(1, 1);
        net.collect();
        chunks += snapshot_chunks(&net);
        net.settle();
    }
    assert_eq!(chunks, 0, "nothing a peer cannot install is sent");
    assert!(net.node(1).peer_needs_snapshot(), "the caller is told a peer needs one");
    assert!(net.raft(3).log.storage.snapshot.meta.index < applied);
    // The caller made one a peer can install: the next heartbeat's answer starts it.
    net.node(1).storage_mut().snapshot_unsendable = false;
    for _ in 0..30 {
        net.tick(1, 1);
        net.settle();
    }
    let storage = &net.raft(3).log.storage;
    assert_eq!((storage.snapshot.meta.index, storage.snapshot.data.len()), (applied, 1000));
    assert!(!net.node(1).peer_needs_snapshot(), "no peer needs one once it is installed");
}

#[test]
fn a_new_node_must_join_as_a_learner_first() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    net.elect(1);
    assert_eq!(net.node(1).propose_conf_change(ConfChange::AddVoter(4)), Err(ProposeError::NotALearner(4)));
    assert!(net.raft(1).log.last_index() == net.raft(1).log.committed, "nothing was appended");
}

#[test]
fn leadership_transfer_moves_the_leader_and_refuses_proposals_meanwhile() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    net.elect(1);
    net.node(1).transfer_leader(2).expect("transfer starts");
    assert_eq!(net.node(1).propose(b"x".to_vec()), Err(ProposeError::TransferInProgress));
    net.settle();
    assert_eq!((net.role(2), net.role(1)), (Role::Leader, Role::Follower));
}

#[test]
fn a_learner_votes_only_once_caught_up() {
    let mut storages: Vec<(NodeId, MemStorage)> =
        [1, 2, 3].iter().map(|&id| (id, MemStorage::new_with_voters(&[1, 2, 3]))).collect();
    // A joining node starts with the group's current membership (the engine's join gives it);
    // it is not a voter, so it never campaigns.
    storages.push((4, MemStorage::new_with_voters(&[1, 2, 3])));
    let mut net = Net::with_storages(storages, |c| c.learner_catch_up_entries = 5);
    net.elect(1);
    net.node(1).propose_conf_change(ConfChange::AddLearner(4)).expect("add learner");
    assert_eq!(
        net.node(1).propose_conf_change(ConfChange::AddVoter(4)),
        Err(ProposeError::ConfChangePending),
        "one membership change at a time"
    );
    net.isolate(4);
    net.settle();
    net.tick(1, 1);
    net.settle();
    assert_eq!(net.raft(1).conf_state().learners, vec![4]);
    for i in 0..10u8 {
        net.node(1).propose(vec![i]).expect("leader accepts");
    }
    net.settle();
    let refused = net.node(1).propose_conf_change(ConfChange::AddVoter(4));
    assert!(matches!(refused, Err(ProposeError::LearnerBehind { id: 4, .. })), "{refused:?}");
    net.cut.clear();
    for _ in 0..5 {
        net.tick(1, 1);
        net.settle();
    }
    net.node(1).propose_conf_change(ConfChange::AddVoter(4)).expect("caught up: promotion accepted");
    net.settle();
    net.tick(1, 1);
    net.settle();
    assert_eq!(net.raft(1).conf_state().voters, vec![1, 2, 3, 4]);
    assert_eq!(net.raft(4).conf_state().voters, vec![1, 2, 3, 4], "the new member applied its own promotion");
}

#[test]
fn an_overloaded_leader_refuses_proposals_explicitly() {
    let mut net = Net::new(&[1, 2, 3], |c| c.max_uncommitted_entries = 3);
    net.elect(1);
    net.isolate(1);
    let results: Vec<_> = (0..5u8).map(|i| net.node(1).propose(vec![i])).collect();
    assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
    assert!(matches!(results[3], Err(ProposeError::Overloaded { uncommitted: 3, max: 3 })), "{results:?}");
}

#[test]
fn invalid_config_is_refused_naming_the_field() {
    let mut config = Config::new(1);
    config.election_tick = 1;
    let error = RawNode::new(config, MemStorage::new_with_voters(&[1])).err().expect("refused");
    assert_eq!(error.to_string(), "invalid raft config election_tick: must be greater than heartbeat_tick");
}

#[test]
fn a_batch_of_proposals_goes_out_in_one_append_per_follower() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    net.elect(1);
    let last = net.node(1).propose_batch((0..10u8).map(|i| vec![i]).collect()).expect("leader accepts");
    net.collect();
    let appends: Vec<usize> = net
        .queue
        .iter()
        .filter_map(|m| match &m.kind {
            MessageKind::Append { entries, .. } if !entries.is_empty() => Some(entries.len()),
            _ => None,
        })
        .collect();
    assert_eq!(appends, vec![10, 10], "one append of 10 entries to each follower");
    net.settle();
    assert_eq!(net.raft(1).log.committed, last);
}

#[test]
fn flow_control_bounds_appends_in_flight_to_a_silent_follower() {
    let mut net = Net::new(&[1, 2, 3], |c| c.max_inflight_msgs = 3);
    net.elect(1);
    // Follower 2 stops answering; the leader keeps proposing one entry at a time.
    net.cut.insert((2, 1));
    for i in 0..20u8 {
        net.node(1).propose(vec![i]).expect("leader accepts");
        net.settle();
    }
    let progress = net.raft(1).progress_of(2).expect("member");
    assert_eq!(progress.state, ProgressState::Replicate);
    assert!(progress.is_paused(), "the window of 3 is full");
    assert_eq!(progress.inflights.len(), 3);
    assert!(net.raft(1).log.committed >= 20, "node 3 still forms a quorum with the leader");
}

fn heartbeats_queued(net: &Net) -> usize {
    net.queue.iter().filter(|m| matches!(m.kind, MessageKind::Heartbeat { .. })).count()
}

#[test]
fn lease_reads_answer_without_a_heartbeat_round() {
    let mut net = Net::new(&[1, 2, 3], |c| c.lease_read = true);
    net.warm_up_except(1);
    net.elect(1);
    // A quorum answers one heartbeat round: that starts the lease.
    net.tick(1, 1);
    net.settle();
    net.node(1).read_index(5).expect("leader read");
    net.collect();
    let committed = net.raft(1).log.committed;
    assert_eq!(net.read_states.get(&1).cloned().unwrap_or_default(), vec![ReadState { context: 5, index: committed }]);
    assert_eq!(heartbeats_queued(&net), 0, "no heartbeat round was needed");
}

#[test]
fn a_lease_ends_half_an_election_timeout_after_the_last_quorum_contact() {
    let mut net = Net::new(&[1, 2, 3], |c| c.lease_read = true);
    net.warm_up_except(1);
    net.elect(1);
    net.tick(1, 1);
    net.settle();
    net.isolate(1);
    // election_tick is 10: the lease counts from the round sent 1 tick ago and lasts 5 ticks.
    net.tick(1, 3);
    net.node(1).read_index(6).expect("leader read");
    net.collect();
    assert_eq!(net.read_states.get(&1).map_or(0, Vec::len), 1, "still within the lease");
    net.tick(1, 2);
    net.node(1).read_index(7).expect("leader read");
    net.settle();
    assert_eq!(net.read_states.get(&1).map_or(0, Vec::len), 1, "the lease ended: the read waits for a quorum");
    net.cut.clear();
    net.tick(1, 1);
    net.settle();
    let contexts: Vec<u64> = net.read_states[&1].iter().map(|r| r.context).collect();
    assert_eq!(contexts, vec![6, 7], "a quorum answered again: the waiting read is served");
}

#[test]
fn a_voter_that_heard_the_leader_withholds_its_vote_even_after_a_higher_term_message() {
    let mut net = Net::new(&[1, 2, 3], |c| {
        c.lease_read = true;
        c.pre_vote = false;
    });
    net.warm_up_except(1);
    net.elect(1);
    net.tick(1, 1);
    net.settle();
    let term = net.raft(2).term;
    let last_index = net.raft(2).log.last_index();
    // A stray higher-term message (a late vote answer) makes node 2 forget who leads...
    net.node(2).step(Message {
        from: 3,
        to: 2,
        term: term + 1,
        kind: MessageKind::VoteResponse { pre: false, granted: false },
    });
    assert_eq!(net.raft(2).leader, None);
    // ...yet a candidate asking within an election timeout of the leader's last heartbeat is
    // ignored: node 1's lease counts on node 2.
    let request =
        MessageKind::VoteRequest { pre: false, last_index: last_index + 10, last_term: term + 1, force: false };
    net.node(2).step(Message { from: 3, to: 2, term: term + 2, kind: request });
    net.collect();
    assert!(
        !net.queue.iter().any(|m| m.from == 2 && matches!(m.kind, MessageKind::VoteResponse { granted: true, .. })),
        "node 2 granted a vote inside the lease"
    );
}

#[test]
fn a_restarted_node_with_leases_withholds_its_vote_for_an_election_timeout() {
    let mut net = Net::new(&[1, 2, 3], |c| c.lease_read = true);
    // Node 3 "restarts": a fresh RawNode on its storage has heard from no leader, yet before a
    // crash it may have answered a leader's heartbeat that a lease counts on.
    net.tick(1, 40);
    net.collect();
    let requests = net.deliver_if(|m| matches!(m.kind, MessageKind::VoteRequest { .. }) && m.to == 3);
    assert!(requests >= 1, "node 1 asked node 3 for a pre-vote");
    assert!(
        !net.queue.iter().any(|m| m.from == 3 && matches!(m.kind, MessageKind::VoteResponse { .. })),
        "node 3 started 0 ticks ago: it ignores the request"
    );
    net.tick(3, 10);
    net.tick(1, 40);
    net.settle();
    // Node 2 never ticked, so it still withholds: only 1 and 3 together can elect anyone.
    let leaders: Vec<NodeId> = [1, 3].into_iter().filter(|&id| net.role(id) == Role::Leader).collect();
    assert_eq!(leaders.len(), 1, "once node 3's hold passed, its vote elected a leader");
    assert_eq!(net.role(2), Role::Follower);
}

#[test]
fn a_removed_voter_no_longer_counts_and_the_last_voter_cannot_go() {
    let mut net = Net::new(&[1, 2, 3], |_| {});
    net.elect(1);
    net.node(1).propose_conf_change(ConfChange::Remove(3)).expect("remove accepted");
    net.settle();
    net.tick(1, 1);
    net.settle();
    assert_eq!(net.raft(1).conf_state().voters, vec![1, 2]);
    // With voters {1, 2}, the quorum is both: cutting 2 off stops commits.
    net.isolate(2);
    let index = net.node(1).propose(b"x".to_vec()).expect("leader accepts");
    net.settle();
    assert!(net.raft(1).log.committed < index, "1 of 2 voters is not a quorum");
    let mut single = Net::new(&[1], |_| {});
    single.elect(1);
    assert_eq!(single.node(1).propose_conf_change(ConfChange::Remove(1)), Err(ProposeError::LastVoter));
}
