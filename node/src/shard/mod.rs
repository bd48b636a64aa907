//! A shard: one thread, pinned to a core, running a tokio current-thread runtime that owns
//! the partitions p with p mod S == s (their logs, state machines, wheels and dispatchers).
//! Nothing on its hot path is shared with another shard: requests arrive over its bounded
//! inbox, attempt outcomes over its own channel, and it sleeps until the next of those or
//! its earliest timer — there is no polling loop. In a cluster it also holds the replicas
//! of other nodes' partitions: it ticks their Raft groups, steps the messages the mesh
//! delivers, hands theirs to the mesh, and answers a request once its command is applied
//! (completion-driven: nothing waits inside the loop).

pub mod ops;
pub mod router;

use crate::cluster::members::{Members, MembersCommand, Membership, META_GROUP};
use crate::cluster::meta::{partition_of, replicas_of};
use crate::obs::metrics::ShardMetrics;
use crate::replica::partition::{Partition, PartitionOptions};
use crate::replica::Replica;
use ops::{Answer, CreateMode, JobOp};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use sundial_consensus::Message;
use sundial_dispatch::runtime::{RuntimeConfig, Ticket};
use sundial_dispatch::AttemptResult;
use sundial_engine::job::JobSpec;
use sundial_engine::state::{Applied, ApplyError, Status};
use tokio::sync::{mpsc, oneshot, watch};

/// Requests waiting in a shard's inbox; beyond it callers are told the node is busy.
pub const INBOX_CAPACITY: usize = 1_024;
/// Requests handled per loop turn at most; the creates among them share one fsync per
/// partition.
const GROUP_COMMIT_MAX: usize = 256;
/// Outcomes waiting for their shard.
const RESULTS_CAPACITY: usize = 4_096;

/// Work for a shard, each with the channel its answer goes back on.
pub enum Work {
    /// A membership change, for the meta group's leader (shard 0).
    Members { command: MembersCommand, reply: oneshot::Sender<Answer> },
    /// Create validated jobs of one partition.
    Create { partition: u32, specs: Vec<JobSpec>, now_ms: u64, mode: CreateMode, reply: oneshot::Sender<Vec<Answer>> },
    /// One operation on some jobs of one partition (one log write for commands).
    /// One operation on some jobs of one partition (one log write for commands); `stale`
    /// reads are answered from this replica as it stands.
    Jobs { partition: u32, ids: Vec<String>, op: JobOp, stale: bool, reply: oneshot::Sender<Vec<Answer>> },
    /// A query or command run on every partition of the shard; one value per partition.
    Scan { scan: Scan, reply: oneshot::Sender<Vec<Value>> },
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Scan {
    Jobs {
        status: Option<Status>,
        limit: usize,
    },
    /// Up to `limit` flow keys, by name.
    FlowKeys {
        limit: usize,
    },
    /// Ids of up to `limit` jobs carrying every one of `labels`, oldest first.
    Labelled {
        labels: Vec<(String, String)>,
        limit: usize,
    },
    DeadLetters {
        limit: usize,
    },
    PurgeDeadLetters,
    Health,
    Raft,
}

/// Create requests for one partition taken from the inbox: specs, request time, mode, reply.
type CreateRequest = (Vec<JobSpec>, u64, CreateMode, oneshot::Sender<Vec<Answer>>);

/// Live (pending or running) jobs per shard, read by every shard for admission control.
/// Each shard writes only its own slot.
pub struct LiveJobs(Vec<AtomicU64>);

impl LiveJobs {
    pub fn new(shards: usize) -> LiveJobs {
        LiveJobs((0..shards).map(|_| AtomicU64::new(0)).collect())
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }
}

#[derive(Clone)]
pub struct ShardConfig {
    pub index: usize,
    pub shards: usize,
    pub partitions: u32,
    pub data: PathBuf,
    pub node_id: u64,
    pub partition: PartitionOptions,
    pub runtime: RuntimeConfig,
    pub max_jobs: usize,
    /// A create repeating the id of a job finished less than this long ago is a duplicate.
    pub dedup_window_ms: u64,
    pub live: Arc<LiveJobs>,
    /// How long a stopping shard waits for attempts in flight.
    pub drain_limit: Duration,
    pub metrics: Arc<crate::obs::metrics::Metrics>,
    /// Where finished spans go (OTLP configured), else `None`.
    pub spans: Option<crate::obs::telemetry::SpanSink>,
    /// Set when the node is a member of a cluster of several.
    pub cluster: Option<ShardCluster>,
}

/// What a shard of a cluster member needs to know.
#[derive(Clone)]
pub struct ShardCluster {
    /// The members as the meta group has them (replicas are placed by it).
    pub membership: Arc<Membership>,
    /// This node's first start in a new cluster: it creates the replicas the membership
    /// places on it. Otherwise (a restart, or a node added later) replicas it lacks are
    /// created when their leader first reaches it, and start from the leader's snapshot.
    pub bootstrap: bool,
    /// Replicas per partition.
    pub replication: usize,
    /// One Raft tick.
    pub tick: Duration,
    /// Where this shard's Raft messages go (the mesh).
    pub outbox: mpsc::Sender<Vec<(u32, Message)>>,
}

/// Raft messages for a shard's partitions, delivered by the mesh.
pub type PeerMessages = mpsc::Receiver<Vec<(u32, Message)>>;
/// Peer batches waiting for a shard; beyond it they are dropped (Raft resends).
pub const PEER_INBOX_CAPACITY: usize = 1_024;
/// How often a leader looks whether its partition's preferred leader should take over.
const BALANCE_EVERY: Duration = Duration::from_secs(1);

/// A running shard, as the rest of the node sees it.
pub struct ShardHandle {
    pub inbox: mpsc::Sender<Work>,
    /// Where connection tasks are spawned so their parsing runs on this shard's core.
    pub runtime: tokio::runtime::Handle,
    pub partitions: Vec<u32>,
    pub log_backend: &'static str,
    pub jobs: usize,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl ShardHandle {
    /// Waits for the shard's thread to end (after `stop` was signalled): Err if it failed.
    pub fn join(self) -> Result<(), String> {
        self.thread.join().unwrap_or_else(|_| Err("a shard thread panicked".into()))
    }
}

/// Starts the shard's thread, opens its partitions (recovering their logs) and returns once
/// it serves. `stop` turning true makes it drain and end.
pub fn spawn(
    config: ShardConfig,
    peers: Option<PeerMessages>,
    meta: Option<Partition>,
    stop: watch::Receiver<bool>,
) -> Result<ShardHandle, String> {
    let (opened, opening) = std::sync::mpsc::sync_channel(1);
    let name = format!("shard-{}", config.index);
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            pin_to_core(config.index);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("{name}: cannot start its runtime: {e}"))?;
            let handle = runtime.handle().clone();
            runtime.block_on(async move {
                let shard = match Shard::open(config, meta) {
                    Ok(shard) => shard,
                    Err(message) => {
                        let _ = opened.send(Err(message.clone()));
                        return Err(message);
                    }
                };
                let (inbox, requests) = mpsc::channel(INBOX_CAPACITY);
                let facts = (shard.partition_ids(), shard.log_backend(), shard.job_count());
                let _ = opened.send(Ok((inbox, handle, facts)));
                shard.run(requests, peers, stop).await
            })
        })
        .map_err(|e| format!("cannot start a shard thread: {e}"))?;
    match opening.recv() {
        Ok(Ok((inbox, runtime, (partitions, log_backend, jobs)))) => {
            Ok(ShardHandle { inbox, runtime, partitions, log_backend, jobs, thread })
        }
        Ok(Err(message)) => Err(message),
        Err(_) => Err(thread.join().map_or_else(|_| "a shard thread panicked".into(), |r| r.err().unwrap_or_default())),
    }
}

/// Pins the calling thread to core `index` (modulo the cores there are). Best effort: a
/// container that forbids it still runs, unpinned.
fn pin_to_core(index: usize) {
    #[cfg(target_os = "linux")]
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: the set is a plain bitmask on the stack, sized by the type the call takes.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(index % cores, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                tracing::debug!(index, "could not pin the shard thread; it runs unpinned");
            }
        }
    }
}

struct Shard {
    config: ShardConfig,
    /// The shard's partitions (replicas, in a cluster) by id, each with its replica.
    replicas: BTreeMap<u32, Replica>,
    /// The meta group's replica (shard 0 of a cluster member), with the membership changes
    /// waiting for their verdicts.
    meta: Option<Partition>,
    meta_waiting: std::collections::HashMap<Ticket, oneshot::Sender<Answer>>,
    /// Why the meta group's log failed, if it did (the shard then stops).
    meta_failure: Option<String>,
    results: mpsc::Receiver<AttemptResult>,
    /// Where the attempts of a replica created later report (the same channel).
    results_sender: mpsc::Sender<AttemptResult>,
    metrics: ShardMetrics,
    /// Requests waiting for verdicts, by number.
    waiting: std::collections::HashMap<u64, Waiting>,
    next_waiting: u64,
    /// What each outstanding ticket answers.
    tickets: std::collections::HashMap<(u32, Ticket), TicketUse>,
    /// The wall clock at this turn's start (`begin_turn`): every decision of the turn takes
    /// time from here, so the clock is read in one place.
    turn_ms: u64,
}

/// A request some of whose answers wait for verdicts.
struct Waiting {
    answers: Vec<Option<Answer>>,
    missing: usize,
    reply: Reply,
}

enum Reply {
    Answers(oneshot::Sender<Vec<Answer>>),
    /// Creates: counted in the metrics, with a "commit" span per request trace.
    Created(oneshot::Sender<Vec<Answer>>, CommitSpan),
    /// A scan's reply: each answer as `{"status", "body"}`.
    Values(oneshot::Sender<Vec<Value>>),
}

/// The log write that carried a request's creates, for its trace.
struct CommitSpan {
    partition: u32,
    started_ms: u64,
    traces: Vec<(String, String)>,
}

/// What a ticket's verdict answers: slot `slot` of request `waiting`, as `kind`.
struct TicketUse {
    waiting: u64,
    slot: usize,
    kind: AnswerKind,
}

enum AnswerKind {
    Create {
        id: String,
    },
    Command {
        id: String,
        op: JobOp,
    },
    /// One read answering slots 0.. with the jobs `ids`.
    Read {
        ids: Vec<String>,
        op: JobOp,
    },
    Purged,
}

impl Shard {
    fn open(config: ShardConfig, meta: Option<Partition>) -> Result<Shard, String> {
        let (sender, results) = mpsc::channel(RESULTS_CAPACITY);
        let opened_ms = sundial_dispatch::now_ms();
        let mut replicas = BTreeMap::new();
        for partition in (0..config.partitions).filter(|p| *p as usize % config.shards == config.index) {
            let dir = config.data.join(format!("partition-{partition}"));
            let voters = match &config.cluster {
                // The first start of a new cluster (again, if it stopped before it finished):
                // the replicas placed here, with the placement's voters.
                Some(cluster) if cluster.bootstrap => {
                    let voters = replicas_of(partition, &cluster.membership.ids(), cluster.replication);
                    if !voters.contains(&config.node_id) {
                        continue; // held by other members
                    }
                    voters
                }
                // A replica held before is opened whatever the membership says now (its
                // voters are beside its log, or in its snapshot).
                Some(_) if dir.exists() => Vec::new(),
                Some(_) => continue, // created when its leader reaches this node
                None => vec![config.node_id],
            };
            let options = PartitionOptions { voters, ..config.partition.clone() };
            let runtime_config = RuntimeConfig { node_id: config.node_id, ..config.runtime.clone() };
            replicas.insert(partition, Replica::open(&dir, options, runtime_config, sender.clone(), opened_ms)?);
        }
        let metrics = config.metrics.shard(config.index);
        let shard = Shard {
            config,
            replicas,
            meta,
            meta_waiting: Default::default(),
            meta_failure: None,
            results,
            results_sender: sender,
            metrics,
            waiting: Default::default(),
            next_waiting: 0,
            tickets: Default::default(),
            turn_ms: opened_ms,
        };
        shard.publish_live_jobs();
        Ok(shard)
    }

    /// Reads the clock for what this turn decides.
    fn begin_turn(&mut self) {
        self.turn_ms = sundial_dispatch::now_ms();
    }

    fn partition_ids(&self) -> Vec<u32> {
        self.replicas.keys().copied().collect()
    }

    fn log_backend(&self) -> &'static str {
        self.replicas.values().next().map_or("none", |r| r.partition().log_backend())
    }

    fn job_count(&self) -> usize {
        self.replicas.values().map(|r| r.state().job_count()).sum()
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Work>,
        peers: Option<PeerMessages>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut peers = peers;
        let tick = self.config.cluster.as_ref().map(|c| c.tick);
        let mut next_tick = Instant::now();
        let mut next_balance = Instant::now() + BALANCE_EVERY;
        // Bounded by `stop` (or a failed log).
        while !*stop.borrow() {
            self.begin_turn();
            let wheel_ms = self.replicas.values().map(|r| r.sleep_ms(self.turn_ms)).min().unwrap_or(1_000);
            let mut sleep = Duration::from_millis(wheel_ms);
            if tick.is_some() {
                sleep = sleep.min(next_tick.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                work = requests.recv() => {
                    let Some(first) = work else { break };
                    // Everything already waiting is taken too: creates of one partition go
                    // to its log together (one fsync for all of them).
                    let mut batch = vec![first];
                    while batch.len() < GROUP_COMMIT_MAX {
                        match requests.try_recv() {
                            Ok(more) => batch.push(more),
                            Err(_) => break,
                        }
                    }
                    self.begin_turn();
                    self.handle(batch);
                }
                result = self.results.recv() => {
                    if let Some(result) = result {
                        let mut results = vec![result];
                        while results.len() < GROUP_COMMIT_MAX {
                            match self.results.try_recv() {
                                Ok(more) => results.push(more),
                                Err(_) => break,
                            }
                        }
                        self.begin_turn();
                        self.finish(results);
                    }
                }
                messages = async { match &mut peers { Some(p) => p.recv().await, None => std::future::pending().await } } => {
                    if let Some(messages) = messages {
                        self.begin_turn();
                        self.step(messages);
                        // Whatever else arrived meanwhile is stepped in the same turn.
                        for _ in 0..GROUP_COMMIT_MAX {
                            match peers.as_mut().map(|p| p.try_recv()) {
                                Some(Ok(more)) => self.step(more),
                                _ => break,
                            }
                        }
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
                _ = stop.changed() => {}
            }
            if let Some(tick) = tick {
                let now = Instant::now();
                if now >= next_tick {
                    for replica in self.replicas.values_mut() {
                        replica.tick();
                    }
                    if let Some(meta) = &mut self.meta {
                        meta.tick();
                    }
                    // A shard that fell far behind ticks once, not in a burst.
                    next_tick = (next_tick + tick).max(now);
                }
                if now >= next_balance {
                    self.balance_leaders();
                    self.reconcile_replicas();
                    next_balance = now + BALANCE_EVERY;
                }
            }
            // Fires are looked at with the clock as it is now, after this turn's work.
            self.begin_turn();
            let now_ms = self.turn_ms;
            for replica in self.replicas.values_mut() {
                replica.fire_due_jobs(now_ms);
            }
            self.settle();
            // Fires and outcomes change the live count too: admission reads it fresh.
            self.publish_live_jobs();
            self.observe();
            if let Some(failure) = &self.meta_failure {
                return Err(format!("the membership log failed ({failure}); restart to recover"));
            }
            if let Some((partition, failure)) =
                self.replicas.iter().find_map(|(p, r)| r.runtime().log_failure().map(|f| (*p, f.to_string())))
            {
                // What is durable is unknown until recovery runs: stop, and let a restart recover.
                return Err(format!("the log of partition {partition} failed ({failure}); restart to recover"));
            }
        }
        drop(requests);
        self.drain(peers.as_mut()).await;
        Ok(())
    }

    /// Steps messages from peer replicas into their partitions.
    fn step(&mut self, messages: Vec<(u32, Message)>) {
        for (partition, message) in messages {
            if partition == META_GROUP {
                if let Some(meta) = &mut self.meta {
                    meta.step(message);
                }
                continue;
            }
            if !self.replicas.contains_key(&partition) && !self.add_replica(partition) {
                continue;
            }
            if let Some(replica) = self.replicas.get_mut(&partition) {
                replica.step(message);
            }
        }
    }

    /// A leader reached this node for a partition it holds no replica of: the replica is
    /// created, empty, when the membership places one here (it starts from the leader's
    /// snapshot). Messages for a partition placed elsewhere are dropped.
    fn add_replica(&mut self, partition: u32) -> bool {
        let Some(cluster) = &self.config.cluster else { return false };
        if partition >= self.config.partitions || partition as usize % self.config.shards != self.config.index {
            return false;
        }
        let placed = replicas_of(partition, &cluster.membership.ids(), cluster.replication);
        if !placed.contains(&self.config.node_id) {
            return false;
        }
        let dir = self.config.data.join(format!("partition-{partition}"));
        let options = PartitionOptions { voters: Vec::new(), ..self.config.partition.clone() };
        let runtime_config = RuntimeConfig { node_id: self.config.node_id, ..self.config.runtime.clone() };
        match Replica::open(&dir, options, runtime_config, self.results_sender.clone(), self.turn_ms) {
            Ok(replica) => {
                tracing::info!(partition, "a new replica of this partition, filled by its leader");
                self.replicas.insert(partition, replica);
                true
            }
            Err(error) => {
                tracing::error!(partition, %error, "cannot create a replica of this partition");
                false
            }
        }
    }

    /// Drives every partition's log (persist, apply), answers the requests whose verdicts
    /// came, and hands the turn's Raft messages to the mesh in one batch.
    fn settle(&mut self) {
        let mut outgoing = Vec::new();
        let mut resolved = Vec::new();
        let now_ms = self.turn_ms;
        for (partition, replica) in self.replicas.iter_mut() {
            let settled = replica.settle(now_ms);
            resolved.extend(settled.resolved.into_iter().map(|(ticket, verdict)| (*partition, ticket, verdict)));
            outgoing.extend(settled.messages.into_iter().map(|m| (*partition, m)));
        }
        for (partition, ticket, verdict) in resolved {
            self.resolve(partition, ticket, verdict);
        }
        self.settle_meta(&mut outgoing);
        if let (Some(cluster), false) = (&self.config.cluster, outgoing.is_empty()) {
            // A full mesh queue drops the batch: Raft resends what matters.
            let _ = cluster.outbox.try_send(outgoing);
        }
    }

    /// Drives the meta group: membership changes applied are published, their requests
    /// answered.
    fn settle_meta(&mut self, outgoing: &mut Vec<(u32, Message)>) {
        let Some(meta) = &mut self.meta else { return };
        let applied = match sundial_dispatch::runtime::CommandLog::advance(meta) {
            Ok(applied) => applied,
            Err(error) => {
                // Like a partition's: the node stops, and a restart recovers the log.
                for (_, reply) in self.meta_waiting.drain() {
                    let _ = reply.send(ops::retry_later(503, "unavailable", "the membership log failed", 5));
                }
                self.meta_failure.get_or_insert(error.to_string());
                return;
            }
        };
        for committed in applied {
            let Some(ticket) = committed.ticket else { continue };
            if let Some(reply) = self.meta_waiting.remove(&ticket) {
                let answer = match committed.verdict {
                    Ok(_) => ops::answer(200, json!({"members": members_view(meta.members())})),
                    Err(e) => ops::apply_error(e),
                };
                let _ = reply.send(answer);
            }
        }
        if let (Some(cluster), Some(members)) = (&self.config.cluster, meta.members()) {
            cluster.membership.publish(members);
        }
        outgoing.extend(meta.take_messages().into_iter().map(|m| (META_GROUP, m)));
    }

    /// A membership change: proposed on the meta group's leader, answered once applied.
    fn change_members(&mut self, command: MembersCommand, reply: oneshot::Sender<Answer>) {
        let Some(meta) = &mut self.meta else {
            let _ = reply.send(ops::error(409, "not_a_cluster", "this node is not a member of a cluster"));
            return;
        };
        if !meta.is_leader() {
            let _ = reply.send(ops::not_leader(META_GROUP, meta.leader()));
            return;
        }
        match meta.propose_members(&command) {
            Ok(ticket) => {
                self.meta_waiting.insert(ticket, reply);
            }
            Err(error) => {
                let _ = reply.send(ops::retry_later(503, "unavailable", error.to_string(), 1));
            }
        }
    }

    /// Moves each group this node leads one step toward the replicas the membership places
    /// (one single-server change at a time, each after the last committed): a missing
    /// replica joins as a learner (after a snapshot, which carries the group's membership),
    /// a caught-up learner becomes a voter, and only then is a replica no longer placed
    /// removed. A leader that is itself to go hands leadership to a placed voter first.
    fn reconcile_replicas(&mut self) {
        let Some(cluster) = &self.config.cluster else { return };
        let members = cluster.membership.ids();
        let me = self.config.node_id;
        if let Some(meta) = &mut self.meta {
            meta.reconcile(&members, me, "meta");
        }
        let mut removed = Vec::new();
        for (partition, replica) in self.replicas.iter_mut() {
            let placed = replicas_of(*partition, &members, cluster.replication);
            replica.reconcile(&placed, me);
            // Out of the group by its own log (it applied its removal: committed) and by the
            // placement: this replica is done. A replica removed before it saw the commit
            // of its removal (the leader stops writing to it) stays until the node stops:
            // deleting a voter's log on a guess could lose a quorum's data.
            if !placed.contains(&me) && replica.partition().is_removed() {
                removed.push(*partition);
            }
        }
        for partition in removed {
            // Requests still waiting on it are told to retry (they reach the group's leader).
            let stranded: Vec<Ticket> = self.tickets.keys().filter(|(p, _)| *p == partition).map(|(_, t)| *t).collect();
            for ticket in stranded {
                self.resolve(partition, ticket, Err(ApplyError::Unavailable("this replica was removed".into())));
            }
            self.replicas.remove(&partition);
            let dir = self.config.data.join(format!("partition-{partition}"));
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(
                    partition,
                    "this node's replica was removed from the partition; its files are deleted"
                ),
                Err(error) => tracing::warn!(partition, %error, "a removed replica's files could not be deleted"),
            }
        }
    }

    /// Answers the slot a ticket stands for; a request whose slots are all answered is sent.
    fn resolve(&mut self, partition: u32, ticket: Ticket, verdict: Result<Applied, ApplyError>) {
        let now_ms = self.turn_ms;
        let Some(TicketUse { waiting, slot, kind }) = self.tickets.remove(&(partition, ticket)) else { return };
        let Some(replica) = self.replicas.get(&partition) else { return };
        let state = replica.state();
        if let AnswerKind::Read { ids, op } = &kind {
            let answers: Vec<Answer> = ids
                .iter()
                .map(|id| match &verdict {
                    Ok(_) => ops::read_answer(state, id, *op, now_ms),
                    // Nothing happened: the router may retry it on the next leader.
                    Err(ApplyError::Unavailable(reason)) => {
                        ops::no_leader(partition, &format!("has no leader now: {reason}"))
                    }
                    Err(e) => ops::apply_error(e.clone()),
                })
                .collect();
            for (slot, answer) in answers.into_iter().enumerate() {
                self.fill(waiting, slot, answer);
            }
            return;
        }
        let answer = match kind {
            AnswerKind::Create { id } => ops::create_answer(state, &id, verdict),
            AnswerKind::Command { id, op } => ops::command_answer(state, &id, op, verdict, now_ms),
            AnswerKind::Read { .. } => unreachable!("answered above"),
            AnswerKind::Purged => match verdict {
                Ok(_) => ops::answer(200, json!({"done": true})),
                Err(e) => ops::apply_error(e),
            },
        };
        self.fill(waiting, slot, answer);
    }

    fn fill(&mut self, waiting: u64, slot: usize, answer: Answer) {
        let Some(request) = self.waiting.get_mut(&waiting) else { return };
        if request.answers[slot].replace(answer).is_none() {
            request.missing -= 1;
        }
        if request.missing == 0 {
            let request = self.waiting.remove(&waiting).expect("present");
            self.send_reply(request.reply, request.answers.into_iter().map(|a| a.unwrap_or_else(lost)).collect());
        }
    }

    /// Registers a request whose `answers` are partly known; `pending` are the slots still
    /// to come, each with its ticket (or its refusal). Sends it at once when complete.
    fn wait_for(
        &mut self,
        partition: u32,
        mut answers: Vec<Option<Answer>>,
        pending: Vec<(usize, Result<Ticket, ApplyError>, AnswerKind)>,
        reply: Reply,
    ) {
        let key = self.next_waiting;
        self.next_waiting += 1;
        let mut missing = 0;
        for (slot, ticket, kind) in pending {
            match ticket {
                Ok(ticket) => {
                    missing += 1;
                    self.tickets.insert((partition, ticket), TicketUse { waiting: key, slot, kind });
                }
                Err(refused) => answers[slot] = Some(ops::apply_error(refused)),
            }
        }
        if missing == 0 {
            self.send_reply(reply, answers.into_iter().map(|a| a.unwrap_or_else(lost)).collect());
            return;
        }
        self.waiting.insert(key, Waiting { answers, missing, reply });
    }

    fn send_reply(&mut self, reply: Reply, answers: Vec<Answer>) {
        match reply {
            Reply::Answers(reply) => {
                let _ = reply.send(answers);
            }
            Reply::Created(reply, commit) => {
                self.metrics.created(&answers);
                if self.config.spans.is_some() {
                    self.commit_spans(commit);
                }
                let _ = reply.send(answers);
            }
            Reply::Values(reply) => {
                let values = answers.into_iter().map(|a| json!({"status": a.status, "body": a.body})).collect();
                let _ = reply.send(values);
            }
        }
    }

    /// One "commit" span per request trace whose jobs a log write carried.
    fn commit_spans(&mut self, commit: CommitSpan) {
        let Some(replica) = self.replicas.get_mut(&commit.partition) else { return };
        let ended_ms = sundial_dispatch::now_ms();
        let traces: std::collections::BTreeSet<(String, String)> = commit.traces.into_iter().collect();
        let spans = traces.into_iter().map(|(trace_id, span_id)| sundial_engine::trace::SpanRecord {
            name: "commit",
            span_id: format!(
                "{:016x}",
                std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), &span_id).max(1)
            ),
            trace_id,
            parent_span_id: Some(span_id),
            start_ms: commit.started_ms,
            end_ms: ended_ms,
            attributes: vec![("sundial.partition", commit.partition.to_string())],
            failed: false,
        });
        replica.keep_spans(spans.collect());
    }

    /// A leader hands each partition whose preferred leader (its first replica) is another
    /// member, caught up with the log, back to it: leaders spread evenly over the members,
    /// and return to a member that restarted once it has caught up.
    fn balance_leaders(&mut self) {
        let Some(cluster) = &self.config.cluster else { return };
        let members = cluster.membership.ids();
        let me = self.config.node_id;
        for (partition, replica) in self.replicas.iter_mut() {
            let placed = replicas_of(*partition, &members, cluster.replication);
            let Some(preferred) = placed.first().copied() else { continue };
            if preferred != me && replica.hand_leadership_to(preferred) {
                tracing::info!(partition, to = preferred, "handing leadership to the partition's preferred leader");
            }
        }
    }

    /// Attempts in flight finish (their outcomes are committed) until the drain limit; the
    /// next start re-runs the rest with the same idempotency keys.
    /// In a cluster the outcomes commit through the other replicas, so the drain keeps
    /// ticking, stepping their messages and sending this shard's until the outcomes
    /// proposed are applied.
    async fn drain(&mut self, mut peers: Option<&mut PeerMessages>) {
        let deadline = tokio::time::Instant::now() + self.config.drain_limit;
        let tick = self.config.cluster.as_ref().map_or(Duration::from_secs(1), |c| c.tick);
        // Bounded by the deadline.
        while self
            .replicas
            .values()
            .any(|r| r.runtime().dispatcher().running() > 0 || r.runtime().proposals_waiting() > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::select! {
                result = self.results.recv() => match result {
                    Some(result) => {
                        self.begin_turn();
                        self.finish(vec![result]);
                    }
                    None => break,
                },
                messages = async { match peers.as_mut() { Some(p) => p.recv().await, None => std::future::pending().await } } => {
                    if let Some(messages) = messages {
                        self.begin_turn();
                        self.step(messages);
                    }
                }
                _ = tokio::time::sleep(tick) => {
                    if self.config.cluster.is_some() {
                        for replica in self.replicas.values_mut() {
                            replica.tick();
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            self.begin_turn();
            self.settle();
        }
    }

    /// Routes outcomes to their partitions' runtimes, one log write per partition.
    fn finish(&mut self, results: Vec<AttemptResult>) {
        let mut by_partition: BTreeMap<u32, Vec<AttemptResult>> = BTreeMap::new();
        for result in results {
            self.metrics.attempt_finished(&result);
            by_partition.entry(partition_of(&result.job_id, self.config.partitions)).or_default().push(result);
        }
        for (partition, results) in by_partition {
            if let Some(replica) = self.replicas.get_mut(&partition) {
                let started = Instant::now();
                replica.finish(results, self.turn_ms);
                self.metrics.applied(started.elapsed());
            }
        }
    }

    fn handle(&mut self, batch: Vec<Work>) {
        let mut creates: BTreeMap<u32, Vec<CreateRequest>> = BTreeMap::new();
        let mut others = Vec::new();
        for work in batch {
            match work {
                Work::Create { partition, specs, now_ms, mode, reply } => {
                    creates.entry(partition).or_default().push((specs, now_ms, mode, reply))
                }
                other => others.push(other),
            }
        }
        for (partition, requests) in creates {
            self.create(partition, requests);
        }
        for work in others {
            match work {
                Work::Create { .. } => unreachable!("creates were taken above"),
                Work::Jobs { partition, ids, op, stale, reply } => self.job_ops(partition, ids, op, stale, reply),
                Work::Members { command, reply } => self.change_members(command, reply),
                Work::Scan { scan: Scan::PurgeDeadLetters, reply } => self.purge_dead_letters(reply),
                Work::Scan { scan, reply } => {
                    let now_ms = self.turn_ms;
                    let values = self
                        .replicas
                        .iter_mut()
                        .filter(|(_, replica)| scan_covers(&scan, replica))
                        .map(|(partition, replica)| scan_one(*partition, replica, &scan, now_ms));
                    let _ = reply.send(values.collect());
                }
            }
            self.publish_live_jobs();
        }
    }

    /// One operation on some jobs of a partition: commands are proposed together (one log
    /// write) on the leader; reads are linearizable (confirmed with the leader) on any replica.
    fn job_ops(
        &mut self,
        partition: u32,
        ids: Vec<String>,
        op: JobOp,
        stale: bool,
        reply: oneshot::Sender<Vec<Answer>>,
    ) {
        let Some(replica) = self.replicas.get_mut(&partition) else {
            let _ = reply.send(ids.iter().map(|_| misrouted(partition)).collect());
            return;
        };
        let now = self.turn_ms;
        let commands: Vec<_> = ids.iter().filter_map(|id| ops::job_command(id, op, now)).collect();
        let answers = vec![None; ids.len()];
        if commands.is_empty() && stale {
            let _ = reply.send(ids.iter().map(|id| ops::read_answer(replica.state(), id, op, now)).collect());
            return;
        }
        if commands.is_empty() {
            // One linearizable read confirms them all.
            match replica.read() {
                Ok(ticket) => {
                    let key = self.next_waiting;
                    self.next_waiting += 1;
                    let count = ids.len();
                    self.tickets.insert(
                        (partition, ticket),
                        TicketUse { waiting: key, slot: 0, kind: AnswerKind::Read { ids, op } },
                    );
                    self.waiting.insert(key, Waiting { answers, missing: count, reply: Reply::Answers(reply) });
                }
                Err(refused) => {
                    let answer = match refused {
                        sundial_consensus::ProposeError::NotLeader { leader } => ops::not_leader(partition, leader),
                        other => ops::retry_later(503, "overloaded", other.to_string(), 1),
                    };
                    let _ = reply.send(ids.iter().map(|_| answer.clone()).collect());
                }
            }
            return;
        }
        if let Some(leader) = replica.not_accepting() {
            let answer = ops::not_leader(partition, leader);
            let _ = reply.send(ids.iter().map(|_| answer.clone()).collect());
            return;
        }
        let started = Instant::now();
        let tickets = replica.propose(commands);
        self.metrics.applied(started.elapsed());
        let pending = ids
            .into_iter()
            .zip(tickets)
            .enumerate()
            .map(|(slot, (id, ticket))| (slot, ticket, AnswerKind::Command { id, op }))
            .collect();
        self.wait_for(partition, answers, pending, Reply::Answers(reply));
    }

    /// `DELETE /dlq` on the partitions this shard leads: one purge command each.
    fn purge_dead_letters(&mut self, reply: oneshot::Sender<Vec<Value>>) {
        let leading: Vec<u32> = self.replicas.iter().filter(|(_, r)| r.is_leader()).map(|(p, _)| *p).collect();
        if leading.is_empty() {
            let _ = reply.send(Vec::new());
            return;
        }
        let key = self.next_waiting;
        self.next_waiting += 1;
        let mut answers = vec![None; leading.len()];
        let mut missing = 0;
        for (slot, partition) in leading.iter().enumerate() {
            let replica = self.replicas.get_mut(partition).expect("listed above");
            match replica.propose(vec![sundial_engine::state::Command::Purge { id: None }]).pop() {
                Some(Ok(ticket)) => {
                    missing += 1;
                    self.tickets
                        .insert((*partition, ticket), TicketUse { waiting: key, slot, kind: AnswerKind::Purged });
                }
                Some(Err(refused)) => answers[slot] = Some(ops::apply_error(refused)),
                None => answers[slot] = Some(lost()),
            }
        }
        if missing == 0 {
            self.send_reply(Reply::Values(reply), answers.into_iter().map(|a| a.unwrap_or_else(lost)).collect());
        } else {
            self.waiting.insert(key, Waiting { answers, missing, reply: Reply::Values(reply) });
        }
    }

    /// Creates the jobs of several requests for one partition with one log write; each
    /// request is answered once all its creates are applied.
    fn create(&mut self, partition: u32, requests: Vec<CreateRequest>) {
        let Some(replica) = self.replicas.get_mut(&partition) else {
            for (specs, _, _, reply) in requests {
                let _ = reply.send(specs.iter().map(|_| misrouted(partition)).collect());
            }
            return;
        };
        if let Some(leader) = replica.not_accepting() {
            let answer = ops::not_leader(partition, leader);
            for (specs, _, _, reply) in requests {
                let _ = reply.send(specs.iter().map(|_| answer.clone()).collect());
            }
            return;
        }
        // Every shard's live jobs as last published (this shard's after its last turn or
        // request): shards admitting at the same moment may overshoot by one batch each.
        let live = self.config.live.total() as usize;
        let mut room = self.config.max_jobs.saturating_sub(live);
        let started = Instant::now();
        let started_ms = self.turn_ms;
        let mut plans = Vec::with_capacity(requests.len());
        let mut commands = Vec::new();
        for (specs, now_ms, mode, reply) in requests {
            let traces: Vec<(String, String)> = specs
                .iter()
                .filter_map(|spec| spec.trace.as_ref().map(|t| (t.trace_id.clone(), t.span_id.clone())))
                .collect();
            let how = ops::CreateHow {
                mode,
                dedup_window_ms: self.config.dedup_window_ms,
                max_jobs: self.config.max_jobs,
                room,
            };
            let mut plan = ops::plan_creates(replica.state(), specs, now_ms, how);
            room = room.saturating_sub(plan.commands.len());
            commands.append(&mut plan.commands);
            plans.push((plan, traces, reply));
        }
        // Proposed together: one log write (group commit) for every request of the turn.
        let mut tickets = replica.propose(commands).into_iter();
        self.metrics.applied(started.elapsed());
        for (plan, traces, reply) in plans {
            let pending = plan
                .waiting
                .into_iter()
                .map(|(slot, id)| {
                    let ticket = tickets.next().unwrap_or_else(|| Err(ApplyError::Unavailable("not proposed".into())));
                    (slot, ticket, AnswerKind::Create { id })
                })
                .collect();
            let commit = CommitSpan { partition, started_ms, traces };
            self.wait_for(partition, plan.answers, pending, Reply::Created(reply, commit));
        }
        self.publish_live_jobs();
    }

    /// Live jobs of the partitions this shard leads (a follower replica's jobs are counted
    /// by their leader: `max_jobs` limits what a node leads, not what it replicates).
    fn publish_live_jobs(&self) {
        let live: usize = self.replicas.values().filter(|r| r.is_leader()).map(|r| ops::live_jobs(r.state())).sum();
        self.config.live.0[self.config.index].store(live as u64, Ordering::Relaxed);
    }

    /// Hands log writes and gauges to the metrics.
    fn observe(&mut self) {
        for replica in self.replicas.values_mut() {
            // The log's write records are metrics-only and taken here.
            let writes = replica.take_writes();
            self.metrics.log_writes(&writes);
            if let Some(sink) = &self.config.spans {
                sink.send(replica.take_spans().0);
            }
        }
    }
}

/// One step of `Shard::reconcile_replicas` for one group this node may lead.
/// The membership as the API shows it.
fn members_view(members: Option<&Members>) -> Value {
    let nodes = members
        .map(|m| m.nodes.iter().map(|(id, raft)| json!({"node_id": id, "raft": raft})).collect())
        .unwrap_or_default();
    Value::Array(nodes)
}

/// A slot nothing answered (never expected: every ticket is resolved or abandoned).
fn lost() -> Answer {
    ops::retry_later(503, "unavailable", "the request's outcome was lost; retry it", 1)
}

/// Whether `scan` looks at this partition here: lists and counts come from the replica that
/// leads (each partition counted once across the cluster); Raft status from every replica.
fn scan_covers(scan: &Scan, replica: &Replica) -> bool {
    matches!(scan, Scan::Raft) || replica.is_leader()
}

fn misrouted(partition: u32) -> Answer {
    ops::retry_later(503, "unavailable", format!("partition {partition} is not served by this shard"), 1)
}

fn scan_one(partition: u32, replica: &mut Replica, scan: &Scan, now_ms: u64) -> Value {
    match scan {
        Scan::Jobs { status, limit } => Value::Array(ops::list_jobs(replica.state(), *status, *limit)),
        Scan::FlowKeys { limit } => Value::Array(ops::flow_keys(replica.state(), *limit, now_ms)),
        Scan::Labelled { labels, limit } => Value::Array(ops::labelled_jobs(replica.state(), labels, *limit)),
        Scan::DeadLetters { limit } => Value::Array(ops::dead_letters(replica.state(), *limit)),
        Scan::PurgeDeadLetters => {
            let answer = ops::purge_answer(replica.apply(sundial_engine::state::Command::Purge { id: None }, now_ms));
            json!({"status": answer.status, "body": answer.body})
        }
        Scan::Health => {
            let state = replica.state();
            let counts: serde_json::Map<String, Value> =
                Status::ALL.iter().map(|s| (s.as_str().to_string(), json!(state.count(*s)))).collect();
            let stats = replica.runtime().stats();
            json!({
                "partition": partition,
                "jobs": counts,
                "dead_letters": state.dead_letters().count(),
                "auto_paused": state.auto_paused(),
                "queued": replica.runtime().dispatcher().queued(),
                "running": replica.runtime().dispatcher().running(),
                "attempts_started": stats.attempts_started,
                "attempts_finished": stats.attempts_finished,
                "queue_full_waits": stats.queue_full_waits,
                "log_failure": replica.runtime().log_failure(),
            })
        }
        Scan::Raft => {
            let log = replica.partition();
            let raft = log.raft_status();
            let followers: Vec<Value> = if raft.leader {
                log.voters()
                    .into_iter()
                    .filter(|id| *id != log.node_id())
                    .map(|id| {
                        let matched = log.follower_match(id).unwrap_or(0);
                        json!({"node_id": id, "match_index": matched, "lag": raft.last_index.saturating_sub(matched)})
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let lag = followers.iter().filter_map(|f| f["lag"].as_u64()).max().unwrap_or(0);
            json!({
                "partition": partition,
                "role": if raft.leader { "leader" } else { "follower" },
                "leader": log.leader(),
                "replicas": log.voters(),
                "followers": followers,
                "replication_lag": lag,
                "term": raft.term,
                "commit_index": raft.commit_index,
                "applied_index": raft.applied_index,
                "last_index": raft.last_index,
                "snapshot_index": raft.snapshot_index,
                "elections_won": log.elections_won(),
                "log_backend": log.log_backend(),
                "jobs": replica.state().job_count(),
            })
        }
    }
}
