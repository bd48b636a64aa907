//! The node's Prometheus metrics (prometheus-client, OpenMetrics text at /metrics). Counters
//! and histograms on the hot path are per shard (a `shard` label), so shards never contend
//! on one; gauges (jobs, queue depth, dead letters) are read from the shards at scrape time.

use crate::replica::partition::{LogWrite, SnapshotTaken};
use crate::shard::ops::Answer;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;
use sundial_dispatch::AttemptResult;
use sundial_engine::state::{ErrorClass, Outcome};

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Seconds from 100 µs to ~52 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 20))
}

/// Entries per log write, 1 to 4096, doubling.
fn entries_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

pub struct Metrics {
    registry: Registry,
    created: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    outcomes: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    fire_lateness: HistogramFamily,
    attempt_duration: HistogramFamily,
    apply_latency: HistogramFamily,
    fsync_latency: HistogramFamily,
    write_entries: HistogramFamily,
    snapshot_pause: HistogramFamily,
    snapshot_duration: HistogramFamily,
    /// Set at scrape time from the shards.
    pub jobs: Family<Labels, Gauge>,
    pub queue_depth: Family<Labels, Gauge>,
    pub dead_letters: Gauge,
    /// Jobs that paused themselves (`pause_after_failures`) and were not resumed.
    pub auto_paused: Gauge,
    /// Summed over the partitions led here (a gauge: it moves with leadership).
    pub expired: Gauge,
    pub dead_letters_evicted: Gauge,
    pub elections: Counter,
    /// Entries the slowest follower is behind, per partition this node leads.
    pub replication_lag: Family<Labels, Gauge>,
    /// Proposals waiting for commit, by partition led (`Replica::backlog_refusal`).
    pub commit_waiting: Family<Labels, Gauge>,
    /// How long the oldest of them has waited, by partition led.
    pub commit_wait: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Partitions this node leads.
    pub partitions_led: Gauge,
    /// Clients' creates this node admits in flight now, and how many are (`shard/admission.rs`).
    pub admission_limit: Gauge,
    pub admission_in_flight: Gauge,
    /// Request items this node forwarded to another member (the partition's leader).
    pub forwarded: Counter,
    pub cancelled: Counter,
    /// Connections a listener failed to accept (retried), by listener and error.
    accept_errors: Family<Labels, Counter>,
    connections_refused: Family<Labels, Counter>,
    auth_refusals: Family<Labels, Counter>,
    /// Per host, for the busiest few only (`DISPATCH_HOSTS_SHOWN`): the adaptive limit of
    /// attempts at once, and the connections open. Set at scrape time.
    pub host_limit: Family<Labels, Gauge>,
    pub host_connections: Family<Labels, Gauge>,
}

/// Hosts the per-host gauges show at most (the busiest): the label set stays small whatever
/// hosts jobs name.
pub const DISPATCH_HOSTS_SHOWN: usize = 10;

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sundial");
        let metrics = Metrics {
            created: Family::default(),
            rejected: Family::default(),
            outcomes: Family::default(),
            retries: Family::default(),
            fire_lateness: Family::new_with_constructor(seconds_histogram),
            attempt_duration: Family::new_with_constructor(seconds_histogram),
            apply_latency: Family::new_with_constructor(seconds_histogram),
            fsync_latency: Family::new_with_constructor(seconds_histogram),
            write_entries: Family::new_with_constructor(entries_histogram),
            snapshot_pause: Family::new_with_constructor(seconds_histogram),
            snapshot_duration: Family::new_with_constructor(seconds_histogram),
            jobs: Family::default(),
            queue_depth: Family::default(),
            dead_letters: Gauge::default(),
            auto_paused: Gauge::default(),
            expired: Gauge::default(),
            dead_letters_evicted: Gauge::default(),
            elections: Counter::default(),
            replication_lag: Family::default(),
            commit_waiting: Family::default(),
            commit_wait: Family::default(),
            partitions_led: Gauge::default(),
            admission_limit: Gauge::default(),
            admission_in_flight: Gauge::default(),
            forwarded: Counter::default(),
            cancelled: Counter::default(),
            accept_errors: Family::default(),
            connections_refused: Family::default(),
            auth_refusals: Family::default(),
            host_limit: Family::default(),
            host_connections: Family::default(),
            registry: Registry::default(),
        };
        registry.register("jobs_created", "Jobs created", metrics.created.clone());
        registry.register(
            "accept_errors",
            "Connections a listener failed to accept and retried, by listener and error",
            metrics.accept_errors.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed as soon as accepted, by listener and reason (per_address: the client address held a quarter of the listener's connections already)",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "auth_refusals",
            "Requests (HTTP) and connections (binary) refused for a missing or wrong token, by API",
            metrics.auth_refusals.clone(),
        );
        registry.register("jobs_cancelled", "Jobs cancelled through the API", metrics.cancelled.clone());
        registry.register(
            "jobs_rejected",
            "Requests refused before they reached a job, by reason (creates over limits; any request too large, too slow, or from a refused origin or host)",
            metrics.rejected.clone(),
        );
        registry.register("jobs", "Jobs held, by status", metrics.jobs.clone());
        registry.register("dispatch_queue_depth", "Attempts queued or running, by shard", metrics.queue_depth.clone());
        registry.register(
            "dispatch_host_limit",
            "Attempts allowed at once to a host now (adaptive: starts at 4, grows to per_host_concurrency, backs off on overload), for the busiest hosts",
            metrics.host_limit.clone(),
        );
        registry.register(
            "dispatch_host_connections",
            "Connections open to a host (idle ones included), for the busiest hosts",
            metrics.host_connections.clone(),
        );
        registry.register("dead_letters", "Fires in the dead-letter queue", metrics.dead_letters.clone());
        registry.register(
            "jobs_expired",
            "Finished jobs removed at the end of their retention, in the partitions led here",
            metrics.expired.clone(),
        );
        registry.register(
            "dead_letters_evicted",
            "Dead letters evicted (oldest first) because the list was full, in the partitions led here",
            metrics.dead_letters_evicted.clone(),
        );
        registry.register(
            "jobs_auto_paused",
            "Cron jobs that paused themselves after failed fires in a row, not resumed since",
            metrics.auto_paused.clone(),
        );
        registry.register(
            "fire_lateness_seconds",
            "Start of a fire's first attempt minus its scheduled time",
            metrics.fire_lateness.clone(),
        );
        registry.register("attempt_duration_seconds", "Webhook attempt duration", metrics.attempt_duration.clone());
        registry.register("webhook_outcomes", "Webhook attempt outcomes by class", metrics.outcomes.clone());
        registry.register("retries", "Attempts after a fire's first", metrics.retries.clone());
        registry.register(
            "apply_latency_seconds",
            "Time to commit and apply a batch of commands (log write included)",
            metrics.apply_latency.clone(),
        );
        registry.register(
            "wal_fsync_seconds",
            "Duration of a durable log write (write + fdatasync)",
            metrics.fsync_latency.clone(),
        );
        registry.register("wal_batch_entries", "Entries per durable log write", metrics.write_entries.clone());
        registry.register(
            "snapshot_shard_pause_seconds",
            "How long a snapshot stopped its shard (copying the state's records, then adopting the written file; the whole snapshot when taken on the spot)",
            metrics.snapshot_pause.clone(),
        );
        registry.register(
            "snapshot_seconds",
            "From a snapshot's start to its file replacing the log before it",
            metrics.snapshot_duration.clone(),
        );
        registry.register("raft_elections", "Leader elections this node won", metrics.elections.clone());
        registry.register(
            "replication_lag_entries",
            "Entries the slowest follower is behind, by partition this node leads",
            metrics.replication_lag.clone(),
        );
        registry.register(
            "commit_waiting_proposals",
            "Writes proposed and waiting for commit, by partition this node leads (past 16,384 or 64 MiB, or 256 with the oldest over 500 ms, clients' writes are refused 503 overloaded)",
            metrics.commit_waiting.clone(),
        );
        registry.register(
            "commit_oldest_wait_seconds",
            "How long the oldest write waiting for commit has waited, by partition this node leads",
            metrics.commit_wait.clone(),
        );
        registry.register("partitions_led", "Partitions this node leads", metrics.partitions_led.clone());
        registry.register(
            "admission_limit_jobs",
            "Clients' creates this node takes in flight now: past it they are refused 503 overloaded at once (lowered while answers take over 250 ms, raised while they are fast)",
            metrics.admission_limit.clone(),
        );
        registry.register(
            "admission_in_flight_jobs",
            "Clients' creates admitted and not yet answered",
            metrics.admission_in_flight.clone(),
        );
        registry.register(
            "forwarded",
            "Request items forwarded to the member leading their partition",
            metrics.forwarded.clone(),
        );
        // Every known reason starts at zero, so the family is always there and a rate works
        // from the first refusal.
        for reason in REJECTION_REASONS {
            metrics.rejected.get_or_create(&vec![("reason", reason.to_string())]).inc_by(0);
        }
        Metrics { registry, ..metrics }
    }

    /// The handles one shard records into (its own children of every family).
    pub fn shard(&self, index: usize) -> ShardMetrics {
        let shard = || vec![("shard", index.to_string())];
        ShardMetrics {
            created: self.created.get_or_create(&shard()).clone(),
            fire_lateness: self.fire_lateness.get_or_create(&shard()).clone(),
            attempt_duration: self.attempt_duration.get_or_create(&shard()).clone(),
            apply_latency: self.apply_latency.get_or_create(&shard()).clone(),
            fsync_latency: self.fsync_latency.get_or_create(&shard()).clone(),
            write_entries: self.write_entries.get_or_create(&shard()).clone(),
            snapshot_pause: self.snapshot_pause.get_or_create(&shard()).clone(),
            snapshot_duration: self.snapshot_duration.get_or_create(&shard()).clone(),
            retries: self.retries.get_or_create(&shard()).clone(),
            outcomes: std::array::from_fn(|class| {
                self.outcomes.get_or_create(&vec![("class", OUTCOME_CLASSES[class].to_string())]).clone()
            }),
        }
    }

    /// Counts a refused create by reason (the answer's code).
    pub fn accept_error(&self, listener: &str, error: &std::io::Error) {
        let kind = match error.raw_os_error() {
            Some(libc::EMFILE) => "emfile".to_string(),
            Some(libc::ENFILE) => "enfile".to_string(),
            Some(libc::ENOBUFS) => "enobufs".to_string(),
            Some(libc::ENOMEM) => "enomem".to_string(),
            _ => format!("{:?}", error.kind()).to_ascii_lowercase(),
        };
        self.accept_errors.get_or_create(&vec![("listener", listener.to_string()), ("error", kind)]).inc();
    }

    /// A connection closed as soon as accepted (`reason`: "per_address").
    pub fn connection_refused(&self, listener: &str, reason: &str) {
        self.connections_refused
            .get_or_create(&vec![("listener", listener.to_string()), ("reason", reason.to_string())])
            .inc();
    }

    /// A request or connection refused for a missing or wrong token (`api`: "http", "binary").
    pub fn auth_refused(&self, api: &str) {
        self.auth_refusals.get_or_create(&vec![("api", api.to_string())]).inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected_many(reason, 1);
    }

    pub fn rejected_many(&self, reason: &str, count: u64) {
        self.rejected.get_or_create(&vec![("reason", reason.to_string())]).inc_by(count);
    }

    /// The Prometheus text exposition (format 0.0.4, what `promtool check metrics` reads).
    pub fn encode(&self) -> String {
        let mut open_metrics = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut open_metrics, &self.registry);
        to_prometheus_text(&open_metrics)
    }
}

/// OpenMetrics names a counter's family without `_total` and ends with `# EOF`; the
/// Prometheus text format names HELP and TYPE after the sample (`x_total`) and has no EOF.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        open_metrics.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut text = String::with_capacity(open_metrics.len() + 64);
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

/// The `code`s a refused create can carry (the API's error codes).
const REJECTION_REASONS: [&str; 9] = [
    "invalid",
    "malformed_json",
    "bad_body",
    "too_large",
    "conflict",
    "rate_limited",
    "overloaded",
    "unavailable",
    "storage_full",
];

const OUTCOME_CLASSES: [&str; 9] = ["2xx", "3xx", "4xx", "5xx", "timeout", "connect", "refused", "aborted", "other"];

fn outcome_class(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Response { status: 200..=299, .. } => 0,
        Outcome::Response { status: 300..=399, .. } => 1,
        Outcome::Response { status: 400..=499, .. } => 2,
        Outcome::Response { .. } => 3,
        Outcome::Error(ErrorClass::Timeout) => 4,
        Outcome::Error(ErrorClass::Connect) => 5,
        Outcome::Error(ErrorClass::Refused) => 6,
        Outcome::Error(ErrorClass::Aborted) => 7,
        Outcome::Error(ErrorClass::InvalidRequest | ErrorClass::Other) => 8,
    }
}

/// One shard's metric handles: recording touches only this shard's children.
pub struct ShardMetrics {
    created: Counter,
    fire_lateness: Histogram,
    attempt_duration: Histogram,
    apply_latency: Histogram,
    fsync_latency: Histogram,
    write_entries: Histogram,
    snapshot_pause: Histogram,
    snapshot_duration: Histogram,
    retries: Counter,
    outcomes: [Counter; OUTCOME_CLASSES.len()],
}

impl ShardMetrics {
    pub fn attempt_finished(&self, result: &AttemptResult) {
        if result.attempt == 1 {
            self.fire_lateness.observe(result.started_ms.saturating_sub(result.fire_ms) as f64 / 1_000.0);
        } else {
            self.retries.inc();
        }
        self.attempt_duration.observe(result.finished_ms.saturating_sub(result.started_ms) as f64 / 1_000.0);
        self.outcomes[outcome_class(&result.outcome)].inc();
    }

    pub fn applied(&self, elapsed: Duration) {
        self.apply_latency.observe(elapsed.as_secs_f64());
    }

    pub fn created(&self, answers: &[Answer]) {
        self.created.inc_by(answers.iter().filter(|a| a.status == 201).count() as u64);
    }

    pub fn log_writes(&self, writes: &[LogWrite]) {
        for write in writes {
            self.fsync_latency.observe(write.duration.as_secs_f64());
            self.write_entries.observe(write.entries as f64);
        }
    }

    pub fn snapshots(&self, taken: &[SnapshotTaken]) {
        for snapshot in taken {
            self.snapshot_pause.observe(snapshot.shard_pause.as_secs_f64());
            self.snapshot_duration.observe(snapshot.duration.as_secs_f64());
        }
    }
}
