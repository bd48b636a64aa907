//! A whole node: `Node::start` opens the cluster metadata, the meta group, the shards and
//! their partitions, the mesh and both listeners; `Node::run` serves until a signal or a
//! shard's end and then stops in order. The `sundial` binary is a thin caller of these.

use crate::api::auth::Gate;
use crate::api::binary::{self, BinaryConfig};
use crate::api::http;
use crate::cluster::members::{Members, Membership};
use crate::cluster::mesh;
use crate::cluster::meta::ClusterMeta;
use crate::config::Settings;
use crate::obs::metrics::Metrics;
use crate::obs::telemetry::{self, SpanSink};
use crate::replica::partition::{Partition, PartitionOptions};
use crate::shard::router::{JobDefaults, NodeFacts, Router, RouterCluster, FORWARD_VERSION};
use crate::shard::{self, LiveJobs, PeerMessages, ShardCluster, ShardConfig, ShardHandle};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use sundial_dispatch::guard::AddressPolicy;
use sundial_dispatch::runtime::RuntimeConfig;
use sundial_dispatch::{DispatchConfig, SharedDispatcher};
use sundial_net::quic::Endpoint;
use sundial_wal::WalOptions;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Raft messages by partition, as the shards and the mesh pass them.
type RaftBatch = Vec<(u32, sundial_consensus::Message)>;

/// Written once a new cluster member's first start has created its replicas.
const BOOTSTRAPPED: &str = "bootstrapped";

/// What each shard thread runs (docs/DECISIONS.md: file I/O goes through the log's own
/// io_uring ring, so the async runtime itself is tokio's).
pub const RUNTIME_KIND: &str = "tokio current-thread per shard";

/// Forwarded requests from other members waiting to be served.
const FORWARDED_QUEUE_MAX: usize = 1_024;

/// How long the last spans may take to leave at exit.
const SPAN_FLUSH_MS_MAX: u64 = 3_000;

/// A running node.
pub struct Node {
    /// Where the HTTP API and the binary protocol listen (port 0 in the settings: chosen).
    pub http: SocketAddr,
    pub binary: SocketAddr,
    /// Jobs found in the data directory at start.
    pub jobs_at_start: usize,
    /// Bearer tokens configured (0: the API is open).
    pub tokens_required: usize,
    router: Arc<Router>,
    stop: watch::Sender<bool>,
    acceptors: Vec<JoinHandle<()>>,
    /// Why a listener ended (it stops the node: a supervisor restarts it).
    listener_ended: mpsc::Receiver<String>,
    shards_joined: Vec<JoinHandle<Result<(), String>>>,
    shard_ended: mpsc::Receiver<()>,
    exporter: Option<(SpanSink, std::thread::JoinHandle<()>)>,
}

/// A follower waits for a leader whose node it still hears from (its heartbeats late: its
/// process starved of CPU) for at most this many election timeouts since the leader's last
/// message (2 s by default), then campaigns even so: a leader whose shard is stuck is
/// replaced, later.
const LEADER_PATIENCE_ELECTION_TIMEOUTS: u32 = 10;

/// The cluster side of a member, opened before its shards (its meta group goes to shard 0).
struct ClusterStart {
    endpoint: Arc<Endpoint>,
    membership: Arc<Membership>,
    bootstrap: bool,
    /// The newest command format every member reads (the mesh keeps it; replicas write it).
    command_format: Arc<AtomicU8>,
    /// When each member was last heard from (the mesh notes it; followers read it).
    contact: Arc<mesh::PeerContact>,
}

/// What every shard is started with.
struct ShardStart<'a> {
    settings: &'a Settings,
    partitions: u32,
    shard_count: usize,
    live: &'a Arc<LiveJobs>,
    metrics: &'a Arc<Metrics>,
    spans: &'a Option<SpanSink>,
    outbox: &'a mpsc::Sender<RaftBatch>,
    cluster: Option<&'a ClusterStart>,
    /// The node's one dispatcher, which every partition's runtime submits to.
    dispatcher: SharedDispatcher,
}

impl Node {
    /// Starts a node on the current tokio runtime (the shards run threads of their own).
    pub async fn start(settings: Settings) -> Result<Node, String> {
        // Before anything opens a file: logs, connections and webhooks all take descriptors.
        let (started_ms, fd_limit) = (sundial_dispatch::now_ms(), raise_fd_limit());
        let meta =
            ClusterMeta::open_or_create(&settings.data, settings.partitions, started_ms).map_err(|e| e.to_string())?;
        let shard_count = settings.shards.min(meta.partitions as usize).max(1);
        let exporter = settings.otlp_endpoint.as_deref().map(telemetry::start).transpose()?;
        let spans = exporter.as_ref().map(|(sink, _)| sink.clone());
        let (cluster, meta_group) = open_cluster(&settings)?.unzip();
        let (outbox, outgoing) = mpsc::channel(mesh::OUTBOX_CAPACITY);
        let (peer_inboxes, peer_receivers) = peer_channels(shard_count);
        let live = Arc::new(LiveJobs::new(shard_count));
        let metrics = Arc::new(Metrics::new());
        let (stop, stopping) = watch::channel(false);
        let dispatcher = start_dispatcher(&settings)?;
        let shard_start = ShardStart {
            settings: &settings,
            partitions: meta.partitions,
            shard_count,
            live: &live,
            metrics: &metrics,
            spans: &spans,
            outbox: &outbox,
            cluster: cluster.as_ref(),
            dispatcher: dispatcher.clone(),
        };
        let shards = spawn_shards(&shard_start, meta_group, peer_receivers, &stop, &stopping)?;
        drop(outbox);
        if cluster.as_ref().is_some_and(|c| c.bootstrap) {
            mark_bootstrapped(&settings)?;
        }
        let (listeners, http, binary) = bind_apis(&settings).await?;
        let facts = NodeFacts {
            node_id: settings.node_id,
            meta,
            shards: shard_count,
            runtime: RUNTIME_KIND,
            log_backend: shards[0].log_backend,
            http: http.to_string(),
            binary: binary.to_string(),
            started_ms,
        };
        let inboxes = shards.iter().map(|s| s.inbox.clone()).collect();
        let defaults = JobDefaults { attempt_timeout_ms: settings.attempt_timeout_ms };
        let mut router = Router::new(inboxes, settings.limits, defaults, live, metrics, facts);
        router.spans = spans;
        router.dispatcher = Some(dispatcher);
        let forwarding = cluster.map(|c| join_mesh(&settings, c, &mut router, outgoing, peer_inboxes));
        let router = Arc::new(router);
        if let Some(slot) = &forwarding {
            let _ = slot.set(router.clone());
        }
        let jobs_at_start = shards.iter().map(|s| s.jobs).sum();
        let (acceptors, listener_ended) = serve_apis(&settings, &router, &shards, listeners, fd_limit);
        let (shards_joined, shard_ended) = watch_shards(shards);
        let tokens_required = settings.tokens.len();
        Ok(Node {
            http,
            binary,
            jobs_at_start,
            tokens_required,
            router,
            stop,
            acceptors,
            listener_ended,
            shards_joined,
            shard_ended,
            exporter,
        })
    }

    /// What the node is (ids, partitions, shards, backends), as /health reports it.
    pub fn facts(&self) -> &NodeFacts {
        &self.router.facts
    }

    /// Serves until SIGINT, SIGTERM or a shard's end (its log failed), then stops: no new
    /// connections or requests; shards let attempts in flight finish (their outcomes are
    /// committed) or the next start re-runs them.
    pub async fn run(mut self) -> Result<(), String> {
        let signal = |kind| tokio::signal::unix::signal(kind).map_err(|e| e.to_string());
        let mut terminate = signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut interrupt = signal(tokio::signal::unix::SignalKind::interrupt())?;
        let listener_failed = tokio::select! {
            _ = interrupt.recv() => None,
            _ = terminate.recv() => None,
            _ = self.shard_ended.recv() => None,
            why = self.listener_ended.recv() => why,
        };
        let stopped = self.shutdown().await;
        match listener_failed {
            Some(why) => {
                tracing::error!(%why, "a listener ended; the node stops so that it can be restarted");
                Err(why)
            }
            None => stopped,
        }
    }

    /// Stops the node in order (what `run` does on a signal): no new connections, shards
    /// finish or hand back attempts in flight, the last spans leave.
    pub async fn shutdown(self) -> Result<(), String> {
        for acceptor in &self.acceptors {
            acceptor.abort();
        }
        let _ = self.stop.send(true);
        let mut failure = None;
        for joined in self.shards_joined {
            if let Ok(Err(message)) = joined.await {
                failure.get_or_insert(message);
            }
        }
        // The last spans are exported once every sink is gone (bounded wait: a collector
        // that does not answer must not hold the exit).
        drop(self.router);
        if let Some((sink, thread)) = self.exporter {
            drop(sink);
            let deadline = std::time::Instant::now() + Duration::from_millis(SPAN_FLUSH_MS_MAX);
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// A cluster member's QUIC endpoint (refused without certificates from the CA) and its meta
/// group (membership), opened first, as placement needs it. `None` for a node alone.
fn open_cluster(settings: &Settings) -> Result<Option<(ClusterStart, Partition)>, String> {
    let Some(cluster) = &settings.cluster else { return Ok(None) };
    let node_id = settings.node_id;
    let name = format!("node-{node_id}");
    let identity = sundial_net::certs::NodeIdentity::load(&cluster.certs, &name).map_err(|e| {
        format!("certs: {e} (make them with `sundial certs init --dir {} {name}`)", cluster.certs.display())
    })?;
    let endpoint = Arc::new(Endpoint::bind(cluster.raft, &identity).map_err(|e| e.to_string())?);
    let dir = settings.data.join("meta");
    // Until every replica of the first start exists (the marker), a restart bootstraps
    // again, with the same placement.
    let bootstrap = !cluster.join && !settings.data.join(BOOTSTRAPPED).exists();
    let initial = Members { nodes: cluster.members.iter().map(|(id, addr)| (*id, addr.to_string())).collect() };
    let options = PartitionOptions {
        voters: if cluster.join { Vec::new() } else { initial.ids() },
        members: Some(initial),
        election_ticks: cluster.election_ticks,
        heartbeat_ticks: cluster.heartbeat_ticks,
        leader_patience_ticks: cluster.election_ticks.saturating_mul(LEADER_PATIENCE_ELECTION_TIMEOUTS),
        wal: WalOptions { sync: settings.log_sync, ..WalOptions::default() },
        ..PartitionOptions::single_node(node_id)
    };
    let group = Partition::open(&dir, options).map_err(|e| format!("opening {}: {e}", dir.display()))?;
    let membership = Arc::new(Membership::new(group.members().cloned().unwrap_or_default()));
    // Until each member has said which it reads: the format every build reads.
    let command_format = Arc::new(AtomicU8::new(0));
    let contact = Arc::new(mesh::PeerContact::default());
    Ok(Some((ClusterStart { endpoint, membership, bootstrap, command_format, contact }, group)))
}

/// One inbox per shard for the Raft messages the mesh delivers.
fn peer_channels(shard_count: usize) -> (Vec<mpsc::Sender<RaftBatch>>, VecDeque<PeerMessages>) {
    (0..shard_count).map(|_| mpsc::channel(shard::PEER_INBOX_CAPACITY)).unzip()
}

/// The node's dispatcher, driven on a thread of its own (`dispatch`): every partition's
/// attempts share its queue, its connection pool and its per-host limits (so a setting per
/// host is what this node opens to that host), and requests leave while the shards wait on
/// their logs. The thread ends once the last handle is dropped.
fn start_dispatcher(settings: &Settings) -> Result<SharedDispatcher, String> {
    let (dispatcher, driver) = SharedDispatcher::new(dispatch_config(settings));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("the dispatcher's runtime: {e}"))?;
    std::thread::Builder::new()
        .name("dispatch".into())
        .spawn(move || runtime.block_on(driver))
        .map_err(|e| format!("the dispatcher's thread: {e}"))?;
    Ok(dispatcher)
}

fn dispatch_config(settings: &Settings) -> DispatchConfig {
    DispatchConfig {
        address_policy: AddressPolicy {
            allow_loopback: settings.allow_loopback_targets,
            allow_private: settings.allow_private_targets,
        },
        global_secret: settings.secret.clone().map(String::into_bytes),
        global_secret_next: settings.secret_next.clone().map(String::into_bytes),
        queue_capacity: settings.dispatch_queue,
        per_host_concurrency: settings.per_host_concurrency,
        per_host_rate_per_second: settings.per_host_rate,
        breaker_failures: settings.breaker_failures,
        breaker_open_ms: settings.breaker_open_ms,
        ..DispatchConfig::default()
    }
}

/// The most jobs one partition is expected to hold: its share of the node's `max_jobs`, and
/// an eighth more for the skew of the hash that places jobs and for finished jobs kept
/// until their retention ends.
fn expected_jobs_per_partition(max_jobs: usize, partitions: u32) -> usize {
    let share = max_jobs / (partitions.max(1) as usize);
    share.saturating_add(share / 8)
}

fn shard_config(start: &ShardStart, index: usize) -> ShardConfig {
    let settings = start.settings;
    let node_id = settings.node_id;
    let expected_jobs = expected_jobs_per_partition(settings.limits.max_jobs, start.partitions);
    ShardConfig {
        index,
        shards: start.shard_count,
        partitions: start.partitions,
        data: settings.data.clone(),
        node_id,
        partition: PartitionOptions {
            wal: WalOptions { segment_size_bytes: settings.segment_bytes, sync: settings.log_sync },
            snapshot_every_entries: settings.snapshot_every,
            election_ticks: settings.cluster.as_ref().map_or(10, |c| c.election_ticks),
            heartbeat_ticks: settings.cluster.as_ref().map_or(1, |c| c.heartbeat_ticks),
            leader_patience_ticks: settings
                .cluster
                .as_ref()
                .map_or(0, |c| c.election_ticks.saturating_mul(LEADER_PATIENCE_ELECTION_TIMEOUTS)),
            expected_jobs,
            ..PartitionOptions::single_node(node_id)
        },
        runtime: RuntimeConfig {
            expected_jobs,
            dispatch: dispatch_config(settings),
            dispatcher: Some(start.dispatcher.clone()),
            record_spans: start.spans.is_some(),
            retention_ms: settings.retention_ms,
            dedup_window_ms: settings.dedup_window_ms,
            ..RuntimeConfig::default()
        },
        max_jobs: settings.limits.max_jobs,
        max_memory_bytes: settings.limits.max_memory_bytes,
        dedup_window_ms: settings.dedup_window_ms,
        live: start.live.clone(),
        drain_limit: settings.drain,
        metrics: start.metrics.clone(),
        spans: start.spans.clone(),
        cluster: settings.cluster.as_ref().zip(start.cluster).map(|(c, started)| ShardCluster {
            membership: started.membership.clone(),
            bootstrap: started.bootstrap,
            replication: c.replication,
            tick: c.tick,
            outbox: start.outbox.clone(),
            command_format: started.command_format.clone(),
            contact: started.contact.clone(),
        }),
    }
}

/// Starts every shard; shard 0 also holds the meta group. A shard that cannot start stops
/// the ones already started.
fn spawn_shards(
    start: &ShardStart,
    mut meta_group: Option<Partition>,
    mut peer_receivers: VecDeque<PeerMessages>,
    stop: &watch::Sender<bool>,
    stopping: &watch::Receiver<bool>,
) -> Result<Vec<ShardHandle>, String> {
    // Every shard's thread first, so they open their partitions at once, each on its core.
    let mut opening = Vec::with_capacity(start.shard_count);
    let mut failure = None;
    for index in 0..start.shard_count {
        // Taken in shard order: shard `index` gets the receiver of its peer inbox.
        let peers = peer_receivers.pop_front().filter(|_| start.settings.cluster.is_some());
        let group = if index == 0 { meta_group.take() } else { None };
        match shard::spawn(shard_config(start, index), peers, group, stopping.clone()) {
            Ok(shard) => opening.push(shard),
            Err(message) => {
                failure = Some(message);
                break;
            }
        }
    }
    let mut shards = Vec::with_capacity(opening.len());
    for shard in opening {
        match shard.opened() {
            Ok(handle) => shards.push(handle),
            Err(message) => failure = failure.or(Some(message)),
        }
    }
    if let Some(message) = failure {
        let _ = stop.send(true);
        for started in shards {
            let _ = started.join();
        }
        return Err(message);
    }
    Ok(shards)
}

fn mark_bootstrapped(settings: &Settings) -> Result<(), String> {
    let marker = settings.data.join(BOOTSTRAPPED);
    std::fs::write(&marker, b"the first start of this cluster member created its replicas\n")
        .and_then(|()| std::fs::File::open(&settings.data)?.sync_all())
        .map_err(|e| format!("{}: {e}", marker.display()))
}

/// The HTTP and binary-protocol listeners, and the addresses they got.
async fn bind_apis(
    settings: &Settings,
) -> Result<((tokio::net::TcpListener, tokio::net::TcpListener), SocketAddr, SocketAddr), String> {
    let bind = |address: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(address).await.map_err(|e| format!("binding {address}{what}: {e}"))
    };
    let listener = bind(settings.http, "").await?;
    let binary_listener = bind(settings.binary, " (binary protocol)").await?;
    let http = listener.local_addr().map_err(|e| e.to_string())?;
    let binary = binary_listener.local_addr().map_err(|e| e.to_string())?;
    Ok(((listener, binary_listener), http, binary))
}

/// Starts the mesh and serves requests other members forward; the returned slot takes the
/// router once it is shared.
fn join_mesh(
    settings: &Settings,
    cluster: ClusterStart,
    router: &mut Router,
    outgoing: mpsc::Receiver<RaftBatch>,
    peer_inboxes: Vec<mpsc::Sender<RaftBatch>>,
) -> Arc<OnceLock<Arc<Router>>> {
    let node_id = settings.node_id;
    let (serve, mut forwarded) = mpsc::channel::<(Vec<u8>, oneshot::Sender<Vec<u8>>)>(FORWARDED_QUEUE_MAX);
    let me = mesh::MemberFacts {
        node_id,
        http: router.facts.http.clone(),
        binary: router.facts.binary.clone(),
        forward_version: FORWARD_VERSION,
        command_format: sundial_engine::codec::COMMAND_FORMAT,
    };
    let config = mesh::MeshConfig {
        node_id,
        me,
        membership: cluster.membership.clone(),
        command_format: cluster.command_format.clone(),
        contact: cluster.contact.clone(),
    };
    let mesh = mesh::Mesh::start(config, cluster.endpoint, outgoing, peer_inboxes, serve);
    let replication = settings.cluster.as_ref().map_or(1, |c| c.replication);
    router.cluster = Some(RouterCluster { mesh, membership: cluster.membership, replication });
    let slot = Arc::new(OnceLock::<Arc<Router>>::new());
    let serving = slot.clone();
    tokio::spawn(async move {
        // Bounded by the mesh: it ends when the mesh is gone.
        while let Some((request, reply)) = forwarded.recv().await {
            let Some(router) = serving.get().cloned() else { continue };
            tokio::spawn(async move {
                let _ = reply.send(router.serve_forwarded(&request).await);
            });
        }
    });
    if let Some(c) = &settings.cluster {
        tracing::info!(node_id, members = c.members.len(), raft = %c.raft, "cluster member; peers over QUIC");
    }
    slot
}

/// Accepts HTTP and binary-protocol connections; each connection runs on a shard's runtime.
fn serve_apis(
    settings: &Settings,
    router: &Arc<Router>,
    shards: &[ShardHandle],
    (listener, binary_listener): (tokio::net::TcpListener, tokio::net::TcpListener),
    fd_limit: u64,
) -> (Vec<JoinHandle<()>>, mpsc::Receiver<String>) {
    let looks_scoped = |secret: &str| {
        secret.split_once(':').is_some_and(|(prefix, _)| {
            let word = prefix.split('@').next().unwrap_or("");
            !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-')
        })
    };
    if settings.tokens.iter().any(|token| token.scope == crate::config::Scope::Admin && looks_scoped(&token.secret)) {
        tracing::warn!("a token starts with a word and a colon that is not a scope (read, write, admin): it is an admin token, taken whole");
    }
    if settings.tokens.iter().any(|token| token.secret.contains(',')) {
        tracing::warn!("a token contains a comma: tokens are no longer split on commas (give each with its own --token, or one per line)");
    }
    let gate = Arc::new(Gate::new(settings.tokens.clone(), settings.rate_per_token));
    let handles: Vec<_> = shards.iter().map(|s| s.runtime.clone()).collect();
    let (http_max, binary_max) = connection_caps(fd_limit);
    let binary_config = BinaryConfig {
        frame_max_bytes: settings.frame_max_bytes,
        connections_max: binary_max,
        per_address_max: crate::api::per_address_max(settings.connections_per_address, binary_max),
        ..BinaryConfig::default()
    };
    let http_caps = (http_max, crate::api::per_address_max(settings.connections_per_address, http_max));
    let (ended, listener_ended) = mpsc::channel::<String>(2);
    let http_ended = ended.clone();
    let (http_router, http_gate, http_handles) = (router.clone(), gate.clone(), handles.clone());
    let policy = Arc::new(crate::api::origin::OriginPolicy {
        loopback_only: listener.local_addr().is_ok_and(|address| address.ip().is_loopback()),
        allowed_origins: settings.allowed_origins.clone(),
    });
    let binary_router = router.clone();
    let acceptors = vec![
        tokio::spawn(async move {
            let why = http::serve(listener, http_router, http_gate, policy, http_handles, http_caps).await;
            let _ = http_ended.send(format!("the HTTP listener ended: {why}")).await;
        }),
        tokio::spawn(async move {
            let why = binary::serve(binary_listener, binary_router, gate, handles, binary_config).await;
            let _ = ended.send(format!("the binary-protocol listener ended: {why}")).await;
        }),
    ];
    (acceptors, listener_ended)
}

/// Connections each API serves at once: HTTP at most a quarter of the descriptors, the
/// binary protocol an eighth, within their own caps (the rest are for logs, peers and
/// outbound webhooks).
fn connection_caps(fd_limit: u64) -> (usize, usize) {
    let share = |divisor: u64, cap: usize| usize::try_from(fd_limit / divisor).unwrap_or(cap).clamp(16, cap);
    (share(4, http::CONNECTIONS_MAX), share(8, BinaryConfig::default().connections_max))
}

/// Raises the soft limit on open files to the hard limit (connections, log segments and
/// outbound webhooks all take descriptors); returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1_024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    tracing::info!(open_files_max = limit.rlim_cur, "file descriptor limit");
    limit.rlim_cur
}

/// Joins each shard thread off the async runtime; `shard_ended` hears of each end.
fn watch_shards(shards: Vec<ShardHandle>) -> (Vec<JoinHandle<Result<(), String>>>, mpsc::Receiver<()>) {
    let (ended, shard_ended) = mpsc::channel::<()>(shards.len().max(1));
    let joined = shards
        .into_iter()
        .map(|handle| {
            let ended = ended.clone();
            tokio::task::spawn_blocking(move || {
                let outcome = handle.join();
                let _ = ended.blocking_send(());
                outcome
            })
        })
        .collect();
    (joined, shard_ended)
}
