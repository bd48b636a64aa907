//! A shard: one thread, pinned to a core, running a tokio current-thread runtime that owns
//! the partitions p with p mod S == s (their logs, state machines, wheels and dispatchers).
//! Nothing on its hot path is shared with another shard: requests arrive over its bounded
//! inbox, attempt outcomes over its own channel, and it sleeps until the next of those or
//! its earliest timer — there is no polling loop. In a cluster it also holds the replicas
//! of other nodes' partitions: it ticks their Raft groups, steps the messages the mesh
//! delivers, hands theirs to the mesh, and answers a request once its command is applied
//! (completion-driven: nothing waits inside the loop).

pub mod admission;
mod replicas;
mod requests;
mod scan;

pub mod ops;
pub mod router;

use crate::cluster::members::{Members, MembersCommand, Membership, META_GROUP};
use crate::cluster::meta::replicas_of;
use crate::obs::metrics::ShardMetrics;
use crate::replica::partition::{Partition, PartitionOptions};
use crate::replica::Replica;
use ops::{Answer, CreateMode, JobOp, Representation};
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
    Create {
        partition: u32,
        specs: Vec<JobSpec>,
        now_ms: u64,
        mode: CreateMode,
        representation: Representation,
        reply: oneshot::Sender<Vec<Answer>>,
    },
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

/// Create requests for one partition taken from the inbox: specs, request time, mode, what
/// the answers carry, reply.
type CreateRequest = (Vec<JobSpec>, u64, CreateMode, Representation, oneshot::Sender<Vec<Answer>>);

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
    /// Resident memory (bytes) beyond which new jobs are refused with 507; 0: no limit.
    pub max_memory_bytes: u64,
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
    /// The newest command format every member reads, as the mesh last heard: the format
    /// this shard's replicas write their commands in (an older member must read them).
    pub command_format: Arc<std::sync::atomic::AtomicU8>,
    /// When each member was last heard from (the mesh notes it): a follower past its
    /// election timeout waits for a leader whose node is heard from.
    pub contact: Arc<crate::cluster::mesh::PeerContact>,
}

/// Raft messages for a shard's partitions, delivered by the mesh.
pub type PeerMessages = mpsc::Receiver<Vec<(u32, Message)>>;
/// Peer batches waiting for a shard; beyond it they are dropped (Raft resends).
pub const PEER_INBOX_CAPACITY: usize = 1_024;
/// How often a leader looks whether its partition's preferred leader should take over.
const BALANCE_EVERY: Duration = Duration::from_secs(1);
/// How often a shard repacks its partitions' spec stores (a bounded number of jobs each time;
/// an idle shard wakes once a second, so at least that often).
const REPACK_SPECS_EVERY: Duration = Duration::from_millis(100);

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

/// What a shard's thread sends once its partitions are open: how to reach it, or why not.
type Opened = Result<(mpsc::Sender<Work>, tokio::runtime::Handle, (Vec<u32>, &'static str, usize)), String>;

/// A shard whose thread is opening its partitions (recovering their logs): the shards of a
/// node open at once, each on its own core, rather than one after another.
pub struct OpeningShard {
    opening: std::sync::mpsc::Receiver<Opened>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl OpeningShard {
    /// Waits until the shard serves (its partitions are open), or says why it could not.
    pub fn opened(self) -> Result<ShardHandle, String> {
        let OpeningShard { opening, thread } = self;
        match opening.recv() {
            Ok(Ok((inbox, runtime, (partitions, log_backend, jobs)))) => {
                Ok(ShardHandle { inbox, runtime, partitions, log_backend, jobs, thread })
            }
            Ok(Err(message)) => Err(message),
            Err(_) => {
                Err(thread.join().map_or_else(|_| "a shard thread panicked".into(), |r| r.err().unwrap_or_default()))
            }
        }
    }
}

/// Starts the shard's thread, which opens its partitions (recovering their logs) and then
/// serves; `OpeningShard::opened` waits for that. `stop` turning true makes it drain and end.
pub fn spawn(
    config: ShardConfig,
    peers: Option<PeerMessages>,
    meta: Option<Partition>,
    stop: watch::Receiver<bool>,
) -> Result<OpeningShard, String> {
    let (opened, opening) = std::sync::mpsc::sync_channel::<Opened>(1);
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
    Ok(OpeningShard { opening, thread })
}

/// `first` and what waits behind it in `channel`, up to `GROUP_COMMIT_MAX` in all.
fn waiting_after<T>(first: T, channel: &mut mpsc::Receiver<T>) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < GROUP_COMMIT_MAX {
        match channel.try_recv() {
            Ok(more) => batch.push(more),
            Err(_) => break,
        }
    }
    batch
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
    /// Who led each replica's partition, and in which term, when last looked.
    leaders_seen: std::collections::HashMap<u32, (Option<u64>, u64)>,
    /// The wall clock at this turn's start (`begin_turn`): every decision of the turn takes
    /// time from here, so the clock is read in one place.
    turn_ms: u64,
    /// The format this shard's replicas write commands in (see `ShardCluster::command_format`).
    command_format: u8,
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
        representation: Representation,
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
            let runtime_config = RuntimeConfig { node_id: config.node_id, partition, ..config.runtime.clone() };
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
            leaders_seen: Default::default(),
            turn_ms: opened_ms,
            command_format: sundial_engine::codec::COMMAND_FORMAT,
        };
        shard.publish_live_jobs();
        Ok(shard)
    }

    /// Reads the clock for what this turn decides.
    fn begin_turn(&mut self) {
        self.turn_ms = sundial_dispatch::now_ms();
        if let Some(cluster) = &self.config.cluster {
            let format = cluster.command_format.load(std::sync::atomic::Ordering::Relaxed);
            if format != self.command_format {
                tracing::info!(format, "replicated commands are written in format {format} (what every member reads)");
                self.command_format = format;
                for replica in self.replicas.values_mut() {
                    replica.write_commands_in(format);
                }
            }
        }
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
        let mut next_repack = Instant::now() + REPACK_SPECS_EVERY;
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
                    self.begin_turn();
                    self.handle(waiting_after(first, &mut requests));
                }
                result = self.results.recv() => {
                    if let Some(first) = result {
                        let results = waiting_after(first, &mut self.results);
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
                    self.tick_replicas();
                    // A shard that fell far behind ticks once, not in a burst.
                    next_tick = (next_tick + tick).max(now);
                }
                if now >= next_balance {
                    self.balance_leaders();
                    self.reconcile_replicas();
                    next_balance = now + BALANCE_EVERY;
                }
            }
            if Instant::now() >= next_repack {
                for replica in self.replicas.values_mut() {
                    replica.repack_specs();
                }
                next_repack = Instant::now() + REPACK_SPECS_EVERY;
            }
            // Whatever else waits joins this turn, whichever source woke it: a partition's
            // creates, outcomes and starts of one turn go to its log in one write (one
            // fsync), not one each.
            self.take_waiting(&mut requests);
            // Fires are looked at with the clock as it is now, after this turn's work.
            self.begin_turn();
            let now_ms = self.turn_ms;
            for replica in self.replicas.values_mut() {
                replica.fire_due_jobs(now_ms);
            }
            self.settle(false);
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

    /// When the earliest timer of this shard's replicas is due.
    fn next_timer_ms(&self) -> Option<u64> {
        self.replicas.values().filter_map(Replica::next_timer_ms).min()
    }

    /// Takes the requests and outcomes already waiting (at most a batch of each, without
    /// waiting for more) into the turn.
    fn take_waiting(&mut self, requests: &mut mpsc::Receiver<Work>) {
        if let Ok(first) = self.results.try_recv() {
            let results = waiting_after(first, &mut self.results);
            self.begin_turn();
            self.finish(results);
        }
        if let Ok(first) = requests.try_recv() {
            self.begin_turn();
            self.handle(waiting_after(first, requests));
        }
    }

    /// Drives every partition's log (persist, apply), answers the requests whose verdicts
    /// came, and hands the turn's Raft messages to the mesh in one batch. A partition given
    /// only fire-path commands whose write may wait is left for a later turn (a few ms,
    /// `Replica::settle_may_wait`), unless `force`.
    fn settle(&mut self, force: bool) {
        let mut outgoing = Vec::new();
        let mut resolved = Vec::new();
        let now_ms = self.turn_ms;
        let mut fires_at_ms = self.next_timer_ms();
        let partitions: Vec<u32> = self.replicas.keys().copied().collect();
        // Every write of the turn is begun before any is waited for: the partitions'
        // fdatasyncs run at once, and the file system commits them together (on this
        // machine 8 logs synced at once made ~3× the syncs a second of one after another,
        // at half the CPU each).
        for replica in self.replicas.values_mut() {
            if force || !replica.settle_may_wait(now_ms) {
                replica.begin_write();
            }
        }
        for replica in self.replicas.values_mut() {
            replica.finish_write();
        }
        for partition in partitions {
            let Some(replica) = self.replicas.get_mut(&partition) else { continue };
            if !force && !replica.write_begun() && replica.settle_may_wait(now_ms) {
                continue;
            }
            let settled = replica.settle(now_ms);
            resolved.extend(settled.resolved.into_iter().map(|(ticket, verdict)| (partition, ticket, verdict)));
            outgoing.extend(settled.messages.into_iter().map(|m| (partition, m)));
            // A fire that came due during this partition's fsync goes now, not after the
            // other partitions' (its request leaves at once; its start is written with
            // the next write) — except in partitions whose write is begun and not yet
            // finished: their starts would need a second write in this turn, one after the
            // other; they go at the next turn, a moment later.
            let clock_ms = sundial_dispatch::now_ms();
            if fires_at_ms.is_some_and(|at| at <= clock_ms) {
                for replica in self.replicas.values_mut().filter(|replica| !replica.write_begun()) {
                    replica.fire_due_jobs(clock_ms);
                }
                fires_at_ms = self.next_timer_ms();
            }
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

    /// Attempts in flight finish (their outcomes are committed) until the drain limit; the
    /// next start re-runs the rest with the same idempotency keys.
    /// In a cluster the outcomes commit through the other replicas, so the drain keeps
    /// ticking, stepping their messages and sending this shard's until the outcomes
    /// proposed are applied.
    async fn drain(&mut self, mut peers: Option<&mut PeerMessages>) {
        // What the last turn left waiting to be written goes now, whatever the drain limit.
        self.begin_turn();
        self.settle(true);
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
                        self.tick_replicas();
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            self.begin_turn();
            self.settle(true);
        }
    }

    /// Routes outcomes to their partitions' runtimes, one log write per partition.
    fn finish(&mut self, results: Vec<AttemptResult>) {
        let mut by_partition: BTreeMap<u32, Vec<AttemptResult>> = BTreeMap::new();
        for result in results {
            self.metrics.attempt_finished(&result);
            by_partition.entry(result.partition).or_default().push(result);
        }
        for (partition, results) in by_partition {
            if let Some(replica) = self.replicas.get_mut(&partition) {
                let started = Instant::now();
                replica.finish(results, self.turn_ms);
                self.metrics.applied(started.elapsed());
            }
        }
    }

    /// Live jobs of the partitions this shard leads (a follower replica's jobs are counted
    /// by their leader: `max_jobs` limits what a node leads, not what it replicates).
    fn publish_live_jobs(&self) {
        let live: usize = self.replicas.values().filter(|r| r.is_leader()).map(|r| ops::live_jobs(r.state())).sum();
        self.config.live.0[self.config.index].store(live as u64, Ordering::Relaxed);
    }

    /// Hands log writes and gauges to the metrics.
    /// One Raft tick for every replica here (and the meta group), each told which members
    /// were heard from lately: within three quarters of the shortest election timeout
    /// (150 ms by default; anything a member sent counts). A node that died is then
    /// replaced as fast as before: by the time a follower's timeout passes, nothing has come
    /// from it for longer than that.
    fn tick_replicas(&mut self) {
        let now = Instant::now();
        let Some(cluster) = &self.config.cluster else { return };
        let within = cluster.tick * self.config.partition.election_ticks * 3 / 4;
        let reachable: Vec<u64> = cluster
            .membership
            .ids()
            .into_iter()
            .filter(|id| *id != self.config.node_id && cluster.contact.heard_within(*id, within, now))
            .collect();
        for replica in self.replicas.values_mut() {
            replica.tick(&reachable);
        }
        if let Some(meta) = &mut self.meta {
            meta.tick(&reachable);
        }
    }

    fn observe(&mut self) {
        for (partition, replica) in self.replicas.iter_mut() {
            let (leader, term) = (replica.partition().leader(), replica.partition().raft_status().term);
            if let Some(seen) = self.leaders_seen.insert(*partition, (leader, term)) {
                if seen.0 != leader {
                    // Who leads each partition, as this member sees it: churn shows here first.
                    let node = self.config.node_id;
                    tracing::info!(node, partition, term, leader = ?leader, before = ?seen.0, "the partition's leader changed");
                }
            }
            // The log's write records are metrics-only and taken here.
            let writes = replica.take_writes();
            self.metrics.log_writes(&writes);
            self.metrics.snapshots(&replica.take_snapshots());
            if let Some(sink) = &self.config.spans {
                sink.send(replica.take_spans().0);
            }
        }
    }
}
