//! `sundial-dispatch`: the engine's I/O shell. The dispatcher here makes webhook attempts; the
//! runtime (`runtime`) drives a partition's state machine against the clock (`clock`, the
//! one place the wall clock is read) and the network.
//!
//! The dispatcher: a bounded queue ordered by priority then
//! due time, per-host concurrency limits, token buckets and circuit breakers, an HTTP/1.1
//! client (hyper, pooled per host, TLS through rustls) behind the SSRF guard, per-attempt
//! timeouts and cancellation. It decides nothing about retries: each attempt's outcome is
//! sent back as a value, which the runtime turns into a command.

pub mod clock;
mod connections;
pub mod guard;
pub mod runtime;

use ahash::{HashMap, HashMapExt};
use bytes::Bytes;
pub use clock::now_ms;
use connections::{CappedConnector, HostConnections};
use guard::{AddressPolicy, GuardedResolver};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use sundial_engine::job::Target;
use sundial_engine::limits::{self, AdaptiveLimit, CircuitBreaker, TokenBucket};
use sundial_engine::sign;
use sundial_engine::state::{ErrorClass, Outcome};
use tokio::sync::{mpsc, oneshot, Notify};

/// Hosts whose limits are remembered; idle ones are forgotten beyond it.
const HOSTS_REMEMBERED_MAX: usize = 10_000;
/// Hosts with attempts waiting that one pass of the driver looks at, at most.
const HOSTS_PER_PASS_MAX: usize = 1_024;
/// A Retry-After longer than this is capped.
const RETRY_AFTER_MS_MAX: u64 = 24 * 3600 * 1000;
/// A response header by which a receiver says "do not retry this fire" (`true` or `1`): the
/// fire goes to the dead-letter list after this attempt, whatever the job's retry policy.
pub const NO_RETRY_HEADER: &str = "x-sundial-no-retry";

fn says_yes(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "true" | "1")
}

#[derive(Clone, Debug)]
pub struct DispatchConfig {
    /// Attempts waiting to start; beyond it `submit` refuses and the fire stays due.
    pub queue_capacity: usize,
    pub per_host_concurrency: usize,
    pub per_host_rate_per_second: u32,
    pub per_host_burst: u32,
    /// Consecutive failures (connection errors, timeouts, 5xx, 429) that open a host's
    /// breaker, and how long it stays open before one probe is let through.
    pub breaker_failures: u32,
    pub breaker_open_ms: u64,
    pub address_policy: AddressPolicy,
    /// Signs requests of jobs without their own secret.
    pub global_secret: Option<Vec<u8>>,
    /// The global secret that replaces `global_secret` (rotation): requests carry both signatures.
    pub global_secret_next: Option<Vec<u8>>,
    /// Bytes of a response body read (the rest is not read).
    pub response_body_max_bytes: usize,
}

impl Default for DispatchConfig {
    fn default() -> DispatchConfig {
        DispatchConfig {
            queue_capacity: 10_000,
            per_host_concurrency: 32,
            per_host_rate_per_second: 1_000,
            per_host_burst: 100,
            breaker_failures: 5,
            breaker_open_ms: 30_000,
            address_policy: AddressPolicy::default(),
            global_secret: None,
            global_secret_next: None,
            response_body_max_bytes: 4096,
        }
    }
}

/// One attempt to run.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The partition whose runtime made it, carried back in the result so the outcome goes
    /// to that runtime without the job's id being hashed again.
    pub partition: u32,
    pub job_id: String,
    pub fire_ms: u64,
    pub attempt: u32,
    /// An attempt of the fire's callback (its target is the callback URL), not the webhook.
    pub callback: bool,
    pub priority: u8,
    pub due_ms: u64,
    pub target: Target,
    pub timeout_ms: u64,
    pub secret: Option<Vec<u8>>,
    /// The job's next secret, during a rotation.
    pub secret_next: Option<Vec<u8>>,
    /// W3C trace context naming this attempt's span (`crate::trace`).
    pub traceparent: String,
    /// `X-Sundial-Fencing-Token` (`sundial_engine::sign::fencing_token`).
    pub fencing_token: u64,
}

/// What became of an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptResult {
    /// The attempt's `partition`.
    pub partition: u32,
    pub job_id: String,
    pub fire_ms: u64,
    pub attempt: u32,
    pub callback: bool,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub outcome: Outcome,
}

/// The queue is full: the attempt is handed back and its fire stays due.
#[derive(Debug, thiserror::Error)]
#[error("the dispatch queue is full ({capacity} attempts)")]
pub struct QueueFull {
    pub capacity: usize,
    pub attempt: Box<Attempt>,
}

struct HostState {
    in_flight: usize,
    bucket: TokenBucket,
    breaker: CircuitBreaker,
    /// Attempts allowed at once now: at most `per_host_concurrency`, fewer while the host
    /// shows overload.
    limit: AdaptiveLimit,
}

/// A host's load as a status page shows it (`SharedDispatcher::busiest_hosts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLoad {
    /// `scheme://host:port`.
    pub host: String,
    /// Attempts allowed at once now (the adaptive limit).
    pub limit: u32,
    pub in_flight: usize,
    /// Connections open to it (idle pooled ones included).
    pub connections: usize,
}

/// A queued attempt with its host's key, worked out once when it is queued (parsing each
/// one's URL on every pass cost more than the deliveries: docs/BENCHMARKS.md). Its outcome
/// goes to `results`, the channel of the handle that submitted it.
struct Queued {
    host: Arc<str>,
    attempt: Attempt,
    results: mpsc::Sender<AttemptResult>,
}

/// A running attempt: how to abort it, and whose it is.
struct Running {
    cancel: oneshot::Sender<()>,
    partition: u32,
}

/// Attempts of one partition queued and running (what its handle reports).
#[derive(Clone, Copy, Default)]
struct PartitionCounts {
    queued: usize,
    running: usize,
}

/// Where an attempt waits: (priority, due, sequence); 0 is the most urgent priority.
type QueueKey = (u8, u64, u64);

struct Inner {
    queue: BTreeMap<QueueKey, Queued>,
    /// The queue's keys by host, each host's in queue order: a pass looks at each host with
    /// attempts waiting and starts as many of its first ones as its limits allow, without
    /// walking past the attempts of hosts at their limit (per-host limits are the only
    /// ones, so order across hosts does not matter).
    waiting: HashMap<Arc<str>, BTreeSet<QueueKey>>,
    /// Where in `waiting` the next pass starts looking (passes take turns over the hosts).
    pass_cursor: usize,
    sequence: u64,
    hosts: HashMap<Arc<str>, HostState>,
    /// Running attempts, by (job, fire, callback). A job lives in one partition, so its id
    /// names it across the partitions that share the dispatcher.
    running: HashMap<(String, u64, bool), Running>,
    /// Per partition, what is queued and running (bounded by the partitions of a node).
    counts: HashMap<u32, PartitionCounts>,
}

impl Inner {
    fn counts(&mut self, partition: u32) -> &mut PartitionCounts {
        self.counts.entry(partition).or_default()
    }

    fn enqueue(&mut self, key: QueueKey, queued: Queued) {
        self.counts(queued.attempt.partition).queued += 1;
        self.waiting.entry(queued.host.clone()).or_default().insert(key);
        self.queue.insert(key, queued);
    }

    /// Takes the queued attempt `key` out of the queue.
    fn dequeue(&mut self, key: &QueueKey) -> Option<Queued> {
        let queued = self.queue.remove(key)?;
        if let Some(keys) = self.waiting.get_mut(&queued.host) {
            keys.remove(key);
            if keys.is_empty() {
                self.waiting.remove(&queued.host);
            }
        }
        self.counts(queued.attempt.partition).queued -= 1;
        Some(queued)
    }

    /// Takes the queued attempt `key` out, counted as running (`cancel` aborts it).
    fn start(&mut self, key: &QueueKey, cancel: oneshot::Sender<()>) -> Option<Queued> {
        let queued = self.dequeue(key)?;
        let partition = queued.attempt.partition;
        self.counts(partition).running += 1;
        let running = Running { cancel, partition };
        self.running.insert((queued.attempt.job_id.clone(), queued.attempt.fire_ms, queued.attempt.callback), running);
        Some(queued)
    }

    /// Drops the queued attempts `matches` picks and aborts the running ones (they report
    /// `Aborted`).
    fn cancel_matching(&mut self, matches: impl Fn(u32, &str, u64, bool) -> bool) {
        let dropped: Vec<QueueKey> = self
            .queue
            .iter()
            .filter(|(_, q)| matches(q.attempt.partition, &q.attempt.job_id, q.attempt.fire_ms, q.attempt.callback))
            .map(|(key, _)| *key)
            .collect();
        for key in dropped {
            self.dequeue(&key);
        }
        let running: Vec<(String, u64, bool)> = self
            .running
            .iter()
            .filter(|((job, fire, callback), r)| matches(r.partition, job, *fire, *callback))
            .map(|(key, _)| key.clone())
            .collect();
        for key in running {
            // Counted as running until the attempt reports (`run_attempt`).
            if let Some(running) = self.running.remove(&key) {
                let _ = running.cancel.send(());
            }
        }
    }
}

type HttpClient = Client<CappedConnector<hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>>, Full<Bytes>>;

/// How long a connect waits for one of its host's connections to close (when all are open,
/// the request usually gets a pooled one back first).
const CONNECTION_SLOT_WAIT: Duration = Duration::from_secs(10);

struct Shared {
    inner: Mutex<Inner>,
    wake: Notify,
    config: DispatchConfig,
    client: HttpClient,
    connections: Arc<HostConnections>,
}

/// A partition's handle on a dispatcher, which one or several partitions share: one queue,
/// one connection pool, one set of per-host limits and breakers. Its driver runs until
/// every handle is dropped.
#[derive(Clone)]
pub struct Dispatcher {
    shared: Arc<Shared>,
    /// The partition whose attempts this handle submits, counts and cancels.
    partition: u32,
    /// Where the outcomes of this handle's attempts go (bounded: a slow consumer slows
    /// attempts down rather than growing memory).
    results: mpsc::Sender<AttemptResult>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").field("partition", &self.partition).finish_non_exhaustive()
    }
}

/// A dispatcher that several partitions share, before any of them has a handle on it
/// (`for_partition`).
#[derive(Clone)]
pub struct SharedDispatcher {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SharedDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDispatcher").finish_non_exhaustive()
    }
}

impl SharedDispatcher {
    /// A dispatcher and its driver, which the caller runs where it chooses (a node runs one
    /// for all its partitions on a thread of its own, so that requests leave while shards
    /// wait on their logs). The driver ends once every handle is dropped; it must run
    /// inside a tokio runtime, where it spawns the attempts and their connections.
    pub fn new(config: DispatchConfig) -> (SharedDispatcher, impl std::future::Future<Output = ()> + Send + 'static) {
        let mut http = HttpConnector::new_with_resolver(GuardedResolver { policy: config.address_policy });
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let connections = Arc::new(HostConnections::new(config.per_host_concurrency, CONNECTION_SLOT_WAIT));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.per_host_concurrency)
            .build(CappedConnector::new(tls, connections.clone()));
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                queue: BTreeMap::new(),
                waiting: HashMap::new(),
                pass_cursor: 0,
                sequence: 0,
                hosts: HashMap::new(),
                running: HashMap::new(),
                counts: HashMap::new(),
            }),
            wake: Notify::new(),
            config,
            client,
            connections,
        });
        let driver = drive(shared.clone());
        (SharedDispatcher { shared }, driver)
    }

    /// The hosts with the most attempts in flight (then the lowest limits), at most `max`:
    /// what a status page or a metric shows without a label per host ever seen.
    pub fn busiest_hosts(&self, max: usize) -> Vec<HostLoad> {
        let inner = self.shared.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut hosts: Vec<HostLoad> = inner
            .hosts
            .iter()
            .filter(|(_, state)| state.in_flight > 0 || state.limit.is_reduced())
            .map(|(host, state)| HostLoad {
                host: host.to_string(),
                limit: state.limit.current(),
                in_flight: state.in_flight,
                connections: 0,
            })
            .collect();
        drop(inner);
        hosts.sort_by_key(|h| (std::cmp::Reverse(h.in_flight), h.limit));
        hosts.truncate(max);
        for host in &mut hosts {
            host.connections = self.shared.connections.open(&host.host);
        }
        hosts
    }

    /// A handle for `partition`, whose attempts' outcomes go to `results`.
    pub fn for_partition(&self, partition: u32, results: mpsc::Sender<AttemptResult>) -> Dispatcher {
        Dispatcher { shared: self.shared.clone(), partition, results }
    }
}

impl Dispatcher {
    /// Starts a dispatcher of its own for `partition` on the current tokio runtime, its
    /// outcomes going to `results`.
    pub fn start(config: DispatchConfig, partition: u32, results: mpsc::Sender<AttemptResult>) -> Dispatcher {
        let (shared, driver) = SharedDispatcher::new(config);
        tokio::spawn(driver);
        shared.for_partition(partition, results)
    }

    /// Queues an attempt of this handle's partition; refused (handed back) when the queue
    /// is full.
    pub fn submit(&self, mut attempt: Attempt) -> Result<(), QueueFull> {
        attempt.partition = self.partition;
        let host: Arc<str> = host_key(&attempt.target.url).into();
        let mut inner = self.shared.inner.lock().expect("no panic holds the lock");
        if inner.queue.len() >= self.shared.config.queue_capacity {
            return Err(QueueFull { capacity: self.shared.config.queue_capacity, attempt: Box::new(attempt) });
        }
        inner.sequence += 1;
        let key = (attempt.priority, attempt.due_ms, inner.sequence);
        inner.enqueue(key, Queued { host, attempt, results: self.results.clone() });
        drop(inner);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Drops a job's queued attempts and aborts its running ones (they report `Aborted`).
    pub fn cancel(&self, job_id: &str) {
        self.cancel_matching(|_, job, _, _| job == job_id);
    }

    /// Drops a job's queued attempts and aborts its running ones, callbacks excepted.
    pub fn cancel_fires(&self, job_id: &str) {
        self.cancel_matching(|_, job, _, callback| job == job_id && !callback);
    }

    /// Drops every queued attempt of this handle's partition and aborts its running ones
    /// (leadership moved away); other partitions' attempts go on.
    pub fn cancel_all(&self) {
        let partition = self.partition;
        self.cancel_matching(move |of, _, _, _| of == partition);
    }

    /// Drops or aborts the attempt of one fire only (other fires of the job go on).
    pub fn cancel_fire(&self, job_id: &str, fire_ms: u64) {
        self.cancel_matching(|_, job, fire, _| job == job_id && fire == fire_ms);
    }

    fn cancel_matching(&self, matches: impl Fn(u32, &str, u64, bool) -> bool) {
        self.shared.inner.lock().expect("no panic holds the lock").cancel_matching(matches);
    }

    /// True when `submit` would accept an attempt now.
    pub fn has_room(&self) -> bool {
        self.room() > 0
    }

    /// How many attempts `submit` would accept now (the queue is the dispatcher's, shared
    /// by its partitions).
    pub fn room(&self) -> usize {
        let queued = self.shared.inner.lock().expect("no panic holds the lock").queue.len();
        self.shared.config.queue_capacity.saturating_sub(queued)
    }

    /// The breaker of the host `url` names, if it has been used (status pages, tests).
    pub fn breaker_state(&self, url: &str) -> Option<limits::BreakerState> {
        let inner = self.shared.inner.lock().expect("no panic holds the lock");
        inner.hosts.get(host_key(url).as_str()).map(|host| host.breaker.state)
    }

    /// Attempts of this handle's partition waiting to start.
    pub fn queued(&self) -> usize {
        self.shared.inner.lock().expect("no panic holds the lock").counts(self.partition).queued
    }

    /// Attempts of this handle's partition running (aborted ones until they report).
    pub fn running(&self) -> usize {
        self.shared.inner.lock().expect("no panic holds the lock").counts(self.partition).running
    }
}

/// The driver: starts every queued attempt whose host allows it, then sleeps until
/// something changes (a submit, an attempt ending) or a limit lifts. It ends once no handle
/// and no running attempt holds the dispatcher any more.
async fn drive(shared: Arc<Shared>) {
    // Bounded by the handles' lifetime: each pass either starts work or sleeps.
    while Arc::strong_count(&shared) > 1 {
        let wake_at_ms = start_ready_attempts(&shared);
        let notified = shared.wake.notified();
        // Without a limit to wait for, sleep until woken, checking now and then that a handle
        // still exists.
        let wait =
            wake_at_ms.map_or(Duration::from_secs(1), |at| Duration::from_millis(at.saturating_sub(now_ms()).max(1)));
        let _ = tokio::time::timeout(wait, notified).await;
    }
}

/// Starts what can start now; returns when a limit that blocks a queued attempt lifts.
fn start_ready_attempts(shared: &Arc<Shared>) -> Option<u64> {
    let config = &shared.config;
    let now = now_ms();
    let mut inner = shared.inner.lock().expect("no panic holds the lock");
    let mut wake_at: Option<u64> = None;
    if inner.hosts.len() > HOSTS_REMEMBERED_MAX {
        // Forget hosts with nothing running or waiting and a closed breaker (their bucket
        // refills anyway; their limit starts small again).
        let Inner { waiting, hosts, .. } = &mut *inner;
        hosts.retain(|name, host| {
            host.in_flight > 0 || host.breaker.state != limits::BreakerState::Closed || waiting.contains_key(name)
        });
    }
    let mut starting: Vec<QueueKey> = Vec::new();
    let Inner { waiting, hosts, pass_cursor, .. } = &mut *inner;
    // At most `HOSTS_PER_PASS_MAX` hosts a pass, the next pass going on from there, so that
    // thousands of hosts at their limit cost each pass a bounded look.
    let visited = waiting.len().min(HOSTS_PER_PASS_MAX);
    let skip = if waiting.is_empty() { 0 } else { *pass_cursor % waiting.len() };
    *pass_cursor = skip + visited;
    for (host, keys) in waiting.iter().cycle().skip(skip).take(visited) {
        let state = match hosts.get_mut(host) {
            Some(state) => state,
            None => hosts.entry(host.clone()).or_insert_with(|| HostState {
                in_flight: 0,
                bucket: TokenBucket::new(config.per_host_rate_per_second, config.per_host_burst, now),
                breaker: CircuitBreaker::new(config.breaker_failures, config.breaker_open_ms),
                limit: AdaptiveLimit::new(config.per_host_concurrency.min(u32::MAX as usize) as u32),
            }),
        };
        for key in keys {
            match may_start(state, now) {
                Ok(()) => starting.push(*key),
                Err(lifts_at) => {
                    wake_at = [wake_at, lifts_at].into_iter().flatten().min();
                    break;
                }
            }
        }
    }
    let mut to_start = Vec::with_capacity(starting.len());
    for key in starting {
        let (cancel, cancelled) = oneshot::channel();
        if let Some(queued) = inner.start(&key, cancel) {
            to_start.push((queued, cancelled));
        }
    }
    drop(inner);
    for (queued, cancelled) in to_start {
        tokio::spawn(run_attempt(shared.clone(), queued, cancelled));
    }
    wake_at
}

/// Takes what an attempt to the host needs to start now (a slot under its limit, a token,
/// the breaker's leave); else when that may change (`None`: when an attempt ends).
fn may_start(state: &mut HostState, now: u64) -> Result<(), Option<u64>> {
    if state.in_flight >= state.limit.current() as usize {
        return Err(None); // an attempt ending wakes the driver
    }
    if let Some(reopen) = state.breaker.reopens_at_ms().filter(|at| *at > now) {
        return Err(Some(reopen));
    }
    let token_at = state.bucket.next_token_ms(now);
    if token_at > now {
        return Err(Some(token_at));
    }
    if !state.breaker.try_acquire(now) {
        return Err(None); // half-open with its probe out
    }
    state.bucket.try_take(now);
    state.in_flight += 1;
    Ok(())
}

/// `scheme://host:port`, lower-cased and without user info, so spellings of one host share
/// its limits.
fn host_key(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(uri) => connections::host_key_of(&uri),
        Err(_) => url.to_ascii_lowercase(),
    }
}

async fn run_attempt(shared: Arc<Shared>, queued: Queued, cancelled: oneshot::Receiver<()>) {
    let Queued { host, attempt, results } = queued;
    let started_ms = now_ms();
    let outcome = tokio::select! {
        outcome = send(&shared, &attempt) => outcome,
        _ = cancelled => Outcome::Error(ErrorClass::Aborted),
    };
    let finished_ms = now_ms();
    {
        let mut inner = shared.inner.lock().expect("no panic holds the lock");
        inner.running.remove(&(attempt.job_id.clone(), attempt.fire_ms, attempt.callback));
        let counts = inner.counts(attempt.partition);
        counts.running = counts.running.saturating_sub(1);
        let slow_connects = shared.connections.take_slow_connects(&host);
        if let Some(host) = inner.hosts.get_mut(&host) {
            host.in_flight -= 1;
            // The adaptive limit: backs off on signs of overload, grows on answers.
            match &outcome {
                Outcome::Error(ErrorClass::Connect | ErrorClass::Timeout)
                | Outcome::Response { status: 429 | 503, .. } => host.limit.on_overload(finished_ms),
                _ if slow_connects > 0 => host.limit.on_overload(finished_ms),
                Outcome::Response { .. } => host.limit.on_success(),
                Outcome::Error(_) => {}
            }
            match &outcome {
                // Said nothing about the host: a probe slot is handed back.
                Outcome::Error(ErrorClass::Aborted | ErrorClass::Refused | ErrorClass::InvalidRequest) => {
                    host.breaker.release()
                }
                Outcome::Response { status, .. } => host.breaker.record(*status < 500 && *status != 429, finished_ms),
                Outcome::Error(_) => host.breaker.record(false, finished_ms),
            }
        }
    }
    shared.wake.notify_one();
    let result = AttemptResult {
        partition: attempt.partition,
        job_id: attempt.job_id,
        fire_ms: attempt.fire_ms,
        attempt: attempt.attempt,
        callback: attempt.callback,
        started_ms,
        finished_ms,
        outcome,
    };
    let _ = results.send(result).await;
}

/// Sends one request and reads (a bounded part of) the answer, within the attempt timeout.
async fn send(shared: &Shared, attempt: &Attempt) -> Outcome {
    let Ok(uri) = attempt.target.url.parse::<hyper::Uri>() else { return Outcome::Error(ErrorClass::InvalidRequest) };
    // IP literals never reach the resolver: check them here.
    if let Some(host) = uri.host() {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
            if shared.config.address_policy.refuses(ip).is_some() {
                return Outcome::Error(ErrorClass::Refused);
            }
        }
    }
    let request = match build_request(&shared.config, attempt, uri) {
        Some(request) => request,
        None => return Outcome::Error(ErrorClass::InvalidRequest),
    };
    let limit = shared.config.response_body_max_bytes;
    let exchange = async {
        let response = shared.client.request(request).await?;
        let status = response.status().as_u16();
        let retry_after_ms =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let no_retry = response.headers().get(NO_RETRY_HEADER).and_then(|v| v.to_str().ok()).is_some_and(says_yes);
        let mut body = response.into_body();
        let mut kept = Vec::new();
        // Bounded: stops once `limit` bytes are kept (the rest is never read).
        while kept.len() < limit {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        kept.extend_from_slice(&data[..data.len().min(limit - kept.len())]);
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
        Ok::<Outcome, hyper_util::client::legacy::Error>(Outcome::Response {
            status,
            body: kept,
            retry_after_ms,
            no_retry,
        })
    };
    match tokio::time::timeout(Duration::from_millis(attempt.timeout_ms), exchange).await {
        Err(_) => Outcome::Error(ErrorClass::Timeout),
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) => Outcome::Error(classify(&error)),
    }
}

fn classify(error: &hyper_util::client::legacy::Error) -> ErrorClass {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    // Bounded by the error chain's length.
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::PermissionDenied {
                return ErrorClass::Refused;
            }
        }
        source = current.source();
    }
    if error.is_connect() {
        ErrorClass::Connect
    } else {
        ErrorClass::Other
    }
}

fn build_request(config: &DispatchConfig, attempt: &Attempt, uri: hyper::Uri) -> Option<hyper::Request<Full<Bytes>>> {
    let target = &attempt.target;
    let mut key = sign::idempotency_key(&attempt.job_id, attempt.fire_ms);
    if attempt.callback {
        // The callback of a fire is a delivery of its own: a receiver keeps both apart.
        key.push_str(":callback");
    }
    let (uri, host) = keyed_as_limited(uri)?;
    let mut builder = hyper::Request::builder().method(target.method.as_str()).uri(uri);
    for (name, value) in &target.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    if !builder.headers_ref().is_some_and(|headers| headers.contains_key(hyper::header::HOST)) {
        builder = builder.header(hyper::header::HOST, host);
    }
    if let Some(content_type) = &target.content_type {
        builder = builder.header("content-type", content_type.as_str());
    }
    builder = builder
        .header("user-agent", concat!("sundial/", env!("CARGO_PKG_VERSION")))
        .header("idempotency-key", key.as_str())
        .header("x-sundial-job-id", attempt.job_id.as_str())
        .header("x-sundial-attempt", attempt.attempt.to_string())
        .header("x-sundial-fire-time", attempt.fire_ms.to_string())
        .header("x-sundial-fencing-token", attempt.fencing_token.to_string())
        .header("x-correlation-id", key.as_str())
        .header("traceparent", attempt.traceparent.as_str());
    // The job's own secrets, else the node's: the current one, then the next during a rotation.
    let (current, next) = match &attempt.secret {
        Some(secret) => (Some(secret), attempt.secret_next.as_ref()),
        None => (config.global_secret.as_ref(), config.global_secret_next.as_ref()),
    };
    let secrets: Vec<&[u8]> = current.into_iter().chain(next).map(Vec::as_slice).collect();
    if !secrets.is_empty() {
        let bound = sign::Bound { method: target.method.as_str(), url: &target.url, idempotency_key: &key };
        builder = builder.header("x-sundial-signature", sign::signatures(&secrets, now_ms(), &bound, &target.body));
    }
    builder.body(Full::new(Bytes::from(target.body.clone()))).ok()
}

/// The URI with its authority spelled as the host's limits key it (`host:port`, lower-cased,
/// no user info), and the Host header the URI as given would have had (its host, and its
/// port when not the scheme's default). The client pools connections by the URI's
/// authority: spelled one way for every spelling of a host, a request finds that host's
/// idle connections, rather than wait for one of them to close to open its own (the
/// connections are capped per host, `connections.rs`). What goes on the wire is unchanged.
fn keyed_as_limited(uri: hyper::Uri) -> Option<(hyper::Uri, String)> {
    let host = uri.host()?.to_string();
    let key = connections::host_key_of(&uri);
    let (scheme, authority) = key.split_once("://")?;
    let host_header = match (uri.port_u16(), scheme) {
        (Some(443), "https") | (Some(80), "http") | (None, _) => host,
        (Some(port), _) => format!("{host}:{port}"),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let keyed = hyper::Uri::builder().scheme(scheme).authority(authority).path_and_query(path).build().ok()?;
    Some((keyed, host_header))
}

/// `Retry-After`: delay seconds, or an HTTP date.
fn parse_retry_after(value: &str) -> Option<u64> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds.saturating_mul(1000).min(RETRY_AFTER_MS_MAX));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp().as_millisecond();
    Some(u64::try_from(at).ok()?.saturating_sub(now_ms()).min(RETRY_AFTER_MS_MAX))
}
