//! A shard: one thread, pinned to a core, running a tokio current-thread runtime that owns
//! the partitions p with p mod S == s (their logs, state machines, wheels and dispatchers).
//! Nothing on its hot path is shared with another shard: requests arrive over its bounded
//! inbox, attempt outcomes over its own channel, and it sleeps until the next of those or
//! its earliest timer — there is no polling loop.

use crate::meta::partition_of;
use crate::metrics::ShardMetrics;
use crate::ops::{self, Answer, JobOp};
use crate::{Partition, PartitionOptions};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use sundial_engine::dispatch::AttemptResult;
use sundial_engine::job::JobSpec;
use sundial_engine::runtime::{Runtime, RuntimeConfig};
use sundial_engine::state::Status;
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
    /// Create validated jobs of one partition.
    Create { partition: u32, specs: Vec<JobSpec>, now_ms: u64, reply: oneshot::Sender<Vec<Answer>> },
    /// One operation on some jobs of one partition (one log write for commands).
    Jobs { partition: u32, ids: Vec<String>, op: JobOp, reply: oneshot::Sender<Vec<Answer>> },
    /// A query or command run on every partition of the shard; one value per partition.
    Scan { scan: Scan, reply: oneshot::Sender<Vec<Value>> },
}

#[derive(Clone, Copy, Debug)]
pub enum Scan {
    Jobs { status: Option<Status>, limit: usize },
    DeadLetters { limit: usize },
    PurgeDeadLetters,
    Health,
    Raft,
}

/// Create requests for one partition taken from the inbox: specs, request time, reply.
type CreateRequest = (Vec<JobSpec>, u64, oneshot::Sender<Vec<Answer>>);

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
    pub live: Arc<LiveJobs>,
    /// How long a stopping shard waits for attempts in flight.
    pub drain_limit: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where finished spans go (OTLP configured), else `None`.
    pub spans: Option<crate::telemetry::SpanSink>,
}

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
pub fn spawn(config: ShardConfig, stop: watch::Receiver<bool>) -> Result<ShardHandle, String> {
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
                let shard = match Shard::open(config) {
                    Ok(shard) => shard,
                    Err(message) => {
                        let _ = opened.send(Err(message.clone()));
                        return Err(message);
                    }
                };
                let (inbox, requests) = mpsc::channel(INBOX_CAPACITY);
                let facts = (shard.partition_ids(), shard.log_backend(), shard.job_count());
                let _ = opened.send(Ok((inbox, handle, facts)));
                shard.run(requests, stop).await
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
    /// The shard's partitions by id, each with its runtime.
    runtimes: BTreeMap<u32, Runtime<Partition>>,
    results: mpsc::Receiver<AttemptResult>,
    metrics: ShardMetrics,
}

impl Shard {
    fn open(config: ShardConfig) -> Result<Shard, String> {
        let (sender, results) = mpsc::channel(RESULTS_CAPACITY);
        let mut runtimes = BTreeMap::new();
        for partition in (0..config.partitions).filter(|p| *p as usize % config.shards == config.index) {
            let dir = config.data.join(format!("partition-{partition}"));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let log = Partition::open(&dir, config.partition.clone())
                .map_err(|e| format!("opening {}: {e}", dir.display()))?;
            let runtime_config = RuntimeConfig { node_id: config.node_id, ..config.runtime.clone() };
            runtimes.insert(partition, Runtime::with_shared_results(runtime_config, log, sender.clone()));
        }
        let metrics = config.metrics.shard(config.index);
        let shard = Shard { config, runtimes, results, metrics };
        shard.publish_live_jobs();
        Ok(shard)
    }

    fn partition_ids(&self) -> Vec<u32> {
        self.runtimes.keys().copied().collect()
    }

    fn log_backend(&self) -> &'static str {
        self.runtimes.values().next().map_or("none", |r| r.log().log_backend())
    }

    fn job_count(&self) -> usize {
        self.runtimes.values().map(|r| r.state().job_count()).sum()
    }

    async fn run(mut self, mut requests: mpsc::Receiver<Work>, mut stop: watch::Receiver<bool>) -> Result<(), String> {
        // Bounded by `stop` (or a failed log).
        while !*stop.borrow() {
            let sleep_ms = self.runtimes.values().map(|r| r.sleep_ms()).min().unwrap_or(1_000);
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
                        self.finish(results);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
                _ = stop.changed() => {}
            }
            for runtime in self.runtimes.values_mut() {
                runtime.fire_due_jobs();
            }
            // Fires and outcomes change the live count too: admission reads it fresh.
            self.publish_live_jobs();
            self.observe();
            if let Some((partition, failure)) =
                self.runtimes.iter().find_map(|(p, r)| r.log_failure().map(|f| (*p, f.to_string())))
            {
                // What is durable is unknown until recovery runs: stop, and let a restart recover.
                return Err(format!("the log of partition {partition} failed ({failure}); restart to recover"));
            }
        }
        drop(requests);
        self.drain().await;
        Ok(())
    }

    /// Attempts in flight finish (their outcomes are committed) until the drain limit; the
    /// next start re-runs the rest with the same idempotency keys.
    async fn drain(&mut self) {
        let deadline = tokio::time::Instant::now() + self.config.drain_limit;
        while self.runtimes.values().any(|r| r.dispatcher().running() > 0) && tokio::time::Instant::now() < deadline {
            tokio::select! {
                result = self.results.recv() => match result {
                    Some(result) => self.finish(vec![result]),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
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
            if let Some(runtime) = self.runtimes.get_mut(&partition) {
                let started = Instant::now();
                runtime.finish_many(results);
                self.metrics.applied(started.elapsed());
            }
        }
    }

    fn handle(&mut self, batch: Vec<Work>) {
        let mut creates: BTreeMap<u32, Vec<CreateRequest>> = BTreeMap::new();
        let mut others = Vec::new();
        for work in batch {
            match work {
                Work::Create { partition, specs, now_ms, reply } => {
                    creates.entry(partition).or_default().push((specs, now_ms, reply))
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
                Work::Jobs { partition, ids, op, reply } => {
                    let answers = match self.runtimes.get_mut(&partition) {
                        Some(runtime) => {
                            let started = Instant::now();
                            let answers = ops::job_ops(runtime, &ids, op);
                            self.metrics.applied(started.elapsed());
                            answers
                        }
                        None => ids.iter().map(|_| misrouted(partition)).collect(),
                    };
                    let _ = reply.send(answers);
                }
                Work::Scan { scan, reply } => {
                    let values =
                        self.runtimes.iter_mut().map(|(partition, runtime)| scan_one(*partition, runtime, scan));
                    let _ = reply.send(values.collect());
                }
            }
            self.publish_live_jobs();
        }
    }

    /// Creates the jobs of several requests for one partition with one log write.
    fn create(&mut self, partition: u32, requests: Vec<CreateRequest>) {
        let Some(runtime) = self.runtimes.get_mut(&partition) else {
            for (specs, _, reply) in requests {
                let _ = reply.send(specs.iter().map(|_| misrouted(partition)).collect());
            }
            return;
        };
        let now_ms = requests.iter().map(|(_, now, _)| *now).max().unwrap_or(0);
        let sizes: Vec<usize> = requests.iter().map(|(specs, _, _)| specs.len()).collect();
        let (all, replies): (Vec<Vec<JobSpec>>, Vec<_>) =
            requests.into_iter().map(|(specs, _, reply)| (specs, reply)).unzip();
        // Every shard's live jobs as last published (this shard's after its last turn or
        // request): shards admitting at the same moment may overshoot by one batch each.
        let live = self.config.live.total() as usize;
        let room = self.config.max_jobs.saturating_sub(live);
        let started = Instant::now();
        let started_ms = sundial_engine::dispatch::now_ms();
        let traces: std::collections::BTreeSet<(String, String)> = all
            .iter()
            .flatten()
            .filter_map(|spec| spec.trace.as_ref().map(|t| (t.trace_id.clone(), t.span_id.clone())))
            .collect();
        let mut answers =
            ops::create_specs(runtime, all.into_iter().flatten().collect(), now_ms, room, self.config.max_jobs)
                .into_iter();
        self.metrics.applied(started.elapsed());
        // One "commit" span per request whose jobs this log write carried.
        let ended_ms = sundial_engine::dispatch::now_ms();
        let commits = traces.into_iter().map(|(trace_id, span_id)| sundial_engine::trace::SpanRecord {
            name: "commit",
            span_id: format!(
                "{:016x}",
                std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), &span_id).max(1)
            ),
            trace_id,
            parent_span_id: Some(span_id),
            start_ms: started_ms,
            end_ms: ended_ms,
            attributes: vec![("sundial.partition", partition.to_string())],
            failed: false,
        });
        runtime.keep_spans(commits.collect());
        for (size, reply) in sizes.into_iter().zip(replies) {
            let answers: Vec<Answer> = answers.by_ref().take(size).collect();
            self.metrics.created(&answers);
            let _ = reply.send(answers);
        }
        self.publish_live_jobs();
    }

    fn publish_live_jobs(&self) {
        let live: usize = self.runtimes.values().map(|r| ops::live_jobs(r.state())).sum();
        self.config.live.0[self.config.index].store(live as u64, Ordering::Relaxed);
    }

    /// Hands log writes and gauges to the metrics.
    fn observe(&mut self) {
        for runtime in self.runtimes.values_mut() {
            // The log is the runtime's; its write records are metrics-only and taken here.
            let writes = runtime.log_mut().take_writes();
            self.metrics.log_writes(&writes);
            if let Some(sink) = &self.config.spans {
                sink.send(runtime.take_spans().0);
            }
        }
    }
}

fn misrouted(partition: u32) -> Answer {
    ops::retry_later(503, "unavailable", format!("partition {partition} is not served by this shard"), 1)
}

fn scan_one(partition: u32, runtime: &mut Runtime<Partition>, scan: Scan) -> Value {
    match scan {
        Scan::Jobs { status, limit } => Value::Array(ops::list_jobs(runtime.state(), status, limit)),
        Scan::DeadLetters { limit } => Value::Array(ops::dead_letters(runtime.state(), limit)),
        Scan::PurgeDeadLetters => {
            let answer = ops::purge_all(runtime);
            json!({"status": answer.status, "body": answer.body})
        }
        Scan::Health => {
            let state = runtime.state();
            let counts: serde_json::Map<String, Value> =
                Status::ALL.iter().map(|s| (s.as_str().to_string(), json!(state.count(*s)))).collect();
            let stats = runtime.stats();
            json!({
                "partition": partition,
                "jobs": counts,
                "dead_letters": state.dead_letters().count(),
                "queued": runtime.dispatcher().queued(),
                "running": runtime.dispatcher().running(),
                "attempts_started": stats.attempts_started,
                "attempts_finished": stats.attempts_finished,
                "queue_full_waits": stats.queue_full_waits,
                "log_failure": runtime.log_failure(),
            })
        }
        Scan::Raft => {
            let log = runtime.log();
            let raft = log.raft_status();
            json!({
                "partition": partition,
                "role": if raft.leader { "leader" } else { "follower" },
                "term": raft.term,
                "commit_index": raft.commit_index,
                "applied_index": raft.applied_index,
                "last_index": raft.last_index,
                "snapshot_index": raft.snapshot_index,
                "elections_won": log.elections_won(),
                "log_backend": log.log_backend(),
                "jobs": runtime.state().job_count(),
            })
        }
    }
}
