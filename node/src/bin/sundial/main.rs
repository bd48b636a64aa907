//! `sundial`: the node and its command-line client. With no subcommand (or `server`) it runs
//! a node: data in ./sundial-data, HTTP on 127.0.0.1:8080, the binary protocol on
//! 127.0.0.1:7070 — each a setting (docs/CONFIGURATION.md: flags, SUNDIAL_* variables, an
//! optional TOML file). `job`, `dlq` and `status` talk to a running node; `certs` makes a
//! cluster's CA and node certificates.

use clap::Parser;
use std::process::ExitCode;
use std::sync::Arc;
use sundial_dispatch::guard::AddressPolicy;
use sundial_dispatch::runtime::RuntimeConfig;
use sundial_dispatch::DispatchConfig;
use sundial_node::api::auth::Gate;
use sundial_node::api::binary::{self, BinaryConfig};
mod cli;
use cli::{CertsCommand, Connection, DlqCommand, FlowCommand, JobCommand};
use sundial_node::api::http;
use sundial_node::cluster::members::{Members, Membership};
use sundial_node::cluster::mesh;
use sundial_node::cluster::meta::ClusterMeta;
use sundial_node::config::{ServerOptions, Settings};
use sundial_node::obs::metrics::Metrics;
use sundial_node::obs::telemetry;
use sundial_node::shard::router::{JobDefaults, NodeFacts, Router, RouterCluster};
use sundial_node::shard::{self, LiveJobs, ShardCluster, ShardConfig};
use sundial_node::{Partition, PartitionOptions};
use sundial_wal::WalOptions;
use tokio::sync::{mpsc, watch};

/// Written once a new cluster member's first start has created its replicas.
const BOOTSTRAPPED: &str = "bootstrapped";

/// What each shard thread runs (see ARCHITECTURE.md: file I/O goes through the log's own
/// io_uring ring, so the async runtime itself is tokio's).
const RUNTIME_KIND: &str = "tokio current-thread per shard";

#[derive(clap::Parser, Debug)]
#[command(
    name = "sundial",
    version,
    about = "Sundial: a durable scheduler for HTTP callbacks",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    server: ServerOptions,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run a node (the default when no subcommand is given).
    Server(Box<ServerOptions>),
    /// Jobs on a node: create, upsert, show, list, cancel, pause, resume, trigger, backfill,
    /// redrive, bulk verbs, schedule preview.
    Job {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: JobCommand,
    },
    /// The dead-letter queue: list, redrive, purge.
    Dlq {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Flow-control keys: list, show, pause, resume.
    Flow {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: FlowCommand,
    },
    /// A node's health: role, partitions, job counts, dispatch, memory.
    Status {
        #[command(flatten)]
        connection: Connection,
    },
    /// The cluster: members, partitions, leaders, indexes and replication lag.
    Cluster {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: cli::ClusterCommand,
    },
    /// Start a local cluster on loopback (generated certificates, data under one folder).
    DevCluster(cli::DevClusterArgs),
    /// The cluster's CA and node certificates (mutual TLS between nodes).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = match cli.command {
        None => cli.server,
        Some(Command::Server(options)) => *options,
        Some(Command::Job { connection, command }) => return cli::job(&connection, &command),
        Some(Command::Dlq { connection, command }) => return cli::dlq(&connection, &command),
        Some(Command::Flow { connection, command }) => return cli::flow(&connection, &command),
        Some(Command::Status { connection }) => return cli::status(&connection),
        Some(Command::Certs { command }) => return cli::certs(&command),
        Some(Command::DevCluster(args)) => return cli::dev_cluster(&args),
        Some(Command::Cluster { connection, command }) => return cli::cluster(&connection, &command),
    };
    let settings = match options.with_file().and_then(|options| options.resolve()) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("sundial: {message}");
            return ExitCode::from(2);
        }
    };
    // Colours only on a terminal: a file or a pipe gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs =
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(colour).with_max_level(settings.log_level);
    if settings.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    // The main thread accepts connections and watches signals; shards do the work.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sundial: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("sundial: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), String> {
    let started_ms = sundial_dispatch::now_ms();
    let meta =
        ClusterMeta::open_or_create(&settings.data, settings.partitions, started_ms).map_err(|e| e.to_string())?;
    let shard_count = settings.shards.min(meta.partitions as usize).max(1);
    let dispatch = DispatchConfig {
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
    };
    let live = Arc::new(LiveJobs::new(shard_count));
    let exporter = match &settings.otlp_endpoint {
        Some(endpoint) => Some(telemetry::start(endpoint)?),
        None => None,
    };
    let spans = exporter.as_ref().map(|(sink, _)| sink.clone());
    let metrics = Arc::new(Metrics::new());
    let (stop, stopping) = watch::channel(false);
    let node_id = settings.node_id;
    // A cluster member: its QUIC endpoint (refused without certificates from the CA), the
    // channels between the shards and the mesh.
    let (outbox, outgoing) = tokio::sync::mpsc::channel(mesh::OUTBOX_CAPACITY);
    let mut peer_inboxes = Vec::new();
    let mut peer_receivers = std::collections::VecDeque::new();
    for _ in 0..shard_count {
        let (sender, receiver) = tokio::sync::mpsc::channel(shard::PEER_INBOX_CAPACITY);
        peer_inboxes.push(sender);
        peer_receivers.push_back(receiver);
    }
    let endpoint = match &settings.cluster {
        Some(cluster) => {
            let name = format!("node-{node_id}");
            let identity = sundial_net::certs::NodeIdentity::load(&cluster.certs, &name).map_err(|e| {
                format!("certs: {e} (make them with `sundial certs init --dir {} {name}`)", cluster.certs.display())
            })?;
            let endpoint = sundial_net::quic::Endpoint::bind(cluster.raft, &identity).map_err(|e| e.to_string())?;
            Some(Arc::new(endpoint))
        }
        None => None,
    };
    // The meta group (membership) of a cluster member: opened first, as placement needs it.
    let mut meta_group = None;
    let mut membership = None;
    let mut bootstrap = false;
    if let Some(cluster) = &settings.cluster {
        let dir = settings.data.join("meta");
        // Until every replica of the first start exists (the marker below), a restart
        // bootstraps again, with the same placement.
        bootstrap = !cluster.join && !settings.data.join(BOOTSTRAPPED).exists();
        let initial = Members { nodes: cluster.members.iter().map(|(id, addr)| (*id, addr.to_string())).collect() };
        let options = PartitionOptions {
            voters: if cluster.join { Vec::new() } else { initial.ids() },
            members: Some(initial),
            election_ticks: cluster.election_ticks,
            heartbeat_ticks: cluster.heartbeat_ticks,
            ..PartitionOptions::single_node(node_id)
        };
        let group = Partition::open(&dir, options).map_err(|e| format!("opening {}: {e}", dir.display()))?;
        let members = group.members().cloned().unwrap_or_default();
        membership = Some(Arc::new(Membership::new(members)));
        meta_group = Some(group);
    }
    let mut forwarding = None;
    let mut shards = Vec::with_capacity(shard_count);
    for index in 0..shard_count {
        let config = ShardConfig {
            index,
            shards: shard_count,
            partitions: meta.partitions,
            data: settings.data.clone(),
            node_id,
            partition: PartitionOptions {
                wal: WalOptions { segment_size_bytes: settings.segment_bytes, ..WalOptions::default() },
                snapshot_every_entries: settings.snapshot_every,
                election_ticks: settings.cluster.as_ref().map_or(10, |c| c.election_ticks),
                heartbeat_ticks: settings.cluster.as_ref().map_or(1, |c| c.heartbeat_ticks),
                ..PartitionOptions::single_node(node_id)
            },
            runtime: RuntimeConfig {
                dispatch: dispatch.clone(),
                record_spans: spans.is_some(),
                ..RuntimeConfig::default()
            },
            max_jobs: settings.limits.max_jobs,
            dedup_window_ms: settings.dedup_window_ms,
            live: live.clone(),
            drain_limit: settings.drain,
            metrics: metrics.clone(),
            spans: spans.clone(),
            cluster: settings.cluster.as_ref().zip(membership.clone()).map(|(c, membership)| ShardCluster {
                membership,
                bootstrap,
                replication: c.replication,
                tick: c.tick,
                outbox: outbox.clone(),
            }),
        };
        // Taken in shard order: shard `index` gets the receiver of `peer_inboxes[index]`.
        let peers = peer_receivers.pop_front().filter(|_| settings.cluster.is_some());
        let group = if index == 0 { meta_group.take() } else { None };
        match shard::spawn(config, peers, group, stopping.clone()) {
            Ok(handle) => shards.push(handle),
            Err(message) => {
                let _ = stop.send(true);
                for started in shards {
                    let _ = started.join();
                }
                return Err(message);
            }
        }
    }
    if bootstrap {
        let marker = settings.data.join(BOOTSTRAPPED);
        std::fs::write(&marker, b"the first start of this cluster member created its replicas\n")
            .and_then(|()| std::fs::File::open(&settings.data)?.sync_all())
            .map_err(|e| format!("{}: {e}", marker.display()))?;
    }
    let listener =
        tokio::net::TcpListener::bind(settings.http).await.map_err(|e| format!("binding {}: {e}", settings.http))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let binary_listener = tokio::net::TcpListener::bind(settings.binary)
        .await
        .map_err(|e| format!("binding {} (binary protocol): {e}", settings.binary))?;
    let binary_address = binary_listener.local_addr().map_err(|e| e.to_string())?;
    let jobs: usize = shards.iter().map(|s| s.jobs).sum();
    let log_backend = shards[0].log_backend;
    let facts = NodeFacts {
        node_id,
        meta: meta.clone(),
        shards: shard_count,
        runtime: RUNTIME_KIND,
        log_backend,
        http: address.to_string(),
        binary: binary_address.to_string(),
        started_ms,
    };
    let mut router = Router::new(
        shards.iter().map(|s| s.inbox.clone()).collect(),
        settings.limits,
        JobDefaults { attempt_timeout_ms: settings.attempt_timeout_ms },
        live,
        metrics,
        facts,
    );
    router.spans = spans;
    drop(outbox);
    if let (Some(cluster), Some(endpoint)) = (&settings.cluster, &endpoint) {
        let (serve, mut forwarded) =
            tokio::sync::mpsc::channel::<(Vec<u8>, tokio::sync::oneshot::Sender<Vec<u8>>)>(1_024);
        let me = mesh::MemberFacts { node_id, http: address.to_string(), binary: binary_address.to_string() };
        let membership = membership.clone().expect("a cluster member has a membership");
        let config = mesh::MeshConfig { node_id, me, membership: membership.clone() };
        let mesh = mesh::Mesh::start(config, endpoint.clone(), outgoing, peer_inboxes, serve);
        router.cluster = Some(RouterCluster { mesh, membership, replication: cluster.replication });
        let router = Arc::new(std::sync::OnceLock::<Arc<Router>>::new());
        let serving = router.clone();
        tokio::spawn(async move {
            // Bounded by the mesh: it ends when the mesh is gone.
            while let Some((request, reply)) = forwarded.recv().await {
                let Some(router) = serving.get().cloned() else { continue };
                tokio::spawn(async move {
                    let _ = reply.send(router.serve_forwarded(&request).await);
                });
            }
        });
        forwarding = Some(router);
        tracing::info!(node_id, members = cluster.members.len(), raft = %cluster.raft, "cluster member; peers over QUIC");
    }
    let router = Arc::new(router);
    if let Some(slot) = &forwarding {
        let _ = slot.set(router.clone());
    }
    say(&format!(
        "sundial listening on http://{address} and sundial://{binary_address} (data in {})",
        settings.data.display()
    ));
    say(&format!(
        "create a job:  curl -X POST http://{address}/jobs -H 'content-type: application/json' \\\n  -d '{{\"delay\": \"10s\", \"url\": \"https://example.com/hook\", \"json\": {{\"hello\": \"world\"}}}}'"
    ));
    tracing::info!(
        %address,
        %binary_address,
        data = %settings.data.display(),
        jobs,
        partitions = meta.partitions,
        shards = shard_count,
        runtime = RUNTIME_KIND,
        log_backend,
        "sundial started"
    );
    let gate = Arc::new(Gate::new(settings.tokens.clone(), settings.rate_per_token));
    if gate.enabled() {
        say(&format!("bearer tokens required ({} configured)", settings.tokens.len()));
    }
    let handles: Vec<_> = shards.iter().map(|s| s.runtime.clone()).collect();
    let acceptor = tokio::spawn(http::serve(listener, router.clone(), gate.clone(), handles.clone()));
    let binary_config = BinaryConfig { frame_max_bytes: settings.frame_max_bytes, ..BinaryConfig::default() };
    let binary_acceptor = tokio::spawn(binary::serve(binary_listener, router.clone(), gate, handles, binary_config));
    let signal = |kind| tokio::signal::unix::signal(kind).map_err(|e| e.to_string());
    let mut terminate = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = signal(tokio::signal::unix::SignalKind::interrupt())?;
    // Waits for a signal, or for a shard to end on its own (its log failed).
    let (ended, mut shard_ended) = mpsc::channel::<()>(shard_count);
    let mut waiting = Vec::new();
    for handle in shards {
        let ended = ended.clone();
        waiting.push(tokio::task::spawn_blocking(move || {
            let outcome = handle.join();
            let _ = ended.blocking_send(());
            outcome
        }));
    }
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
        _ = shard_ended.recv() => {}
    }
    // Stop: no new connections or requests; shards let attempts in flight finish (their
    // outcomes are committed) or the next start re-runs them.
    acceptor.abort();
    binary_acceptor.abort();
    let _ = stop.send(true);
    let mut failure = None;
    for outcome in waiting {
        if let Ok(Err(message)) = outcome.await {
            failure.get_or_insert(message);
        }
    }
    // The last spans are exported once every sink is gone (bounded wait: a collector that
    // does not answer must not hold the exit).
    drop(router);
    if let Some((sink, thread)) = exporter {
        drop(sink);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    match failure {
        Some(message) => Err(message),
        None => {
            tracing::info!("sundial stopped");
            say("sundial stopped");
            Ok(())
        }
    }
}

/// A line on stdout; a closed stdout (the reader went away) must not stop the node.
fn say(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}
