//! `sundial`: one node with its HTTP/JSON API. With no flags it keeps its data in
//! ./sundial-data and listens on 127.0.0.1:8080. Jobs live in one partition (a Raft group of
//! one on a WAL log); the runtime fires them through the dispatcher.
//!
//! Flags (each also as an environment variable):
//!   --data DIR                 SUNDIAL_DATA (default ./sundial-data)
//!   --http ADDR                SUNDIAL_HTTP (default 127.0.0.1:8080; port 0 picks a free one)
//!   --secret TEXT              SUNDIAL_SECRET: signs webhooks of jobs without their own
//!   --allow-loopback-targets   SUNDIAL_ALLOW_LOOPBACK_TARGETS=1 (tests, local receivers)
//!   --allow-private-targets    SUNDIAL_ALLOW_PRIVATE_TARGETS=1
//!   --max-jobs N               SUNDIAL_MAX_JOBS (default 1000000): creates beyond get 507
//!   --token TEXT (repeatable)  SUNDIAL_TOKENS=a,b: bearer tokens; off when none is given
//!   --rate-per-token N         SUNDIAL_RATE_PER_TOKEN (default 1000): requests/s per token
//!   --log-format human|json    SUNDIAL_LOG_FORMAT (default human), on stderr
//!   --log-level LEVEL          SUNDIAL_LOG_LEVEL: error, warn, info (default) or debug

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use sundial_engine::dispatch::guard::AddressPolicy;
use sundial_engine::dispatch::DispatchConfig;
use sundial_engine::runtime::RuntimeConfig;
use sundial_node::auth::Gate;
use sundial_node::http;
use sundial_node::meta::ClusterMeta;
use sundial_node::metrics::Metrics;
use sundial_node::router::{self, NodeFacts, Router};
use sundial_node::shard::{self, LiveJobs, ShardConfig};
use sundial_node::PartitionOptions;
use sundial_wal::WalOptions;
use tokio::sync::{mpsc, watch};

/// How long SIGTERM waits for attempts in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// A single node is node 1 (a cluster numbers its members).
const NODE_ID: u64 = 1;
/// What each shard thread runs (see ARCHITECTURE.md: file I/O goes through the log's own
/// io_uring ring, so the async runtime itself is tokio's).
const RUNTIME_KIND: &str = "tokio current-thread per shard";

struct Settings {
    data: PathBuf,
    http: SocketAddr,
    secret: Option<String>,
    allow_loopback: bool,
    allow_private: bool,
    limits: router::Limits,
    partitions: Option<u32>,
    segment_mb: u64,
    shards: usize,
    tokens: Vec<String>,
    rate_per_token: u32,
    log_json: bool,
    log_level: tracing::Level,
}

fn parse_log_format(value: &str) -> Result<bool, String> {
    match value {
        "human" => Ok(false),
        "json" => Ok(true),
        _ => Err(format!("log format: must be human or json, not {value:?}")),
    }
}

fn parse_log_level(value: &str) -> Result<tracing::Level, String> {
    match value {
        "error" => Ok(tracing::Level::ERROR),
        "warn" => Ok(tracing::Level::WARN),
        "info" => Ok(tracing::Level::INFO),
        "debug" => Ok(tracing::Level::DEBUG),
        _ => Err(format!("log level: must be error, warn, info or debug, not {value:?}")),
    }
}

fn settings() -> Result<Settings, String> {
    let env = |name: &str| std::env::var(name).ok();
    let flag_env = |name: &str| env(name).is_some_and(|v| v == "1" || v == "true");
    let mut settings = Settings {
        data: env("SUNDIAL_DATA").map_or_else(|| PathBuf::from("sundial-data"), PathBuf::from),
        http: env("SUNDIAL_HTTP")
            .unwrap_or_else(|| "127.0.0.1:8080".into())
            .parse()
            .map_err(|_| "SUNDIAL_HTTP: expected HOST:PORT")?,
        secret: env("SUNDIAL_SECRET"),
        allow_loopback: flag_env("SUNDIAL_ALLOW_LOOPBACK_TARGETS"),
        allow_private: flag_env("SUNDIAL_ALLOW_PRIVATE_TARGETS"),
        limits: router::Limits::default(),
        partitions: None,
        segment_mb: 8,
        shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
        tokens: env("SUNDIAL_TOKENS")
            .map(|list| list.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect())
            .unwrap_or_default(),
        rate_per_token: 1_000,
        log_json: false,
        log_level: tracing::Level::INFO,
    };
    if let Some(format) = env("SUNDIAL_LOG_FORMAT") {
        settings.log_json = parse_log_format(&format)?;
    }
    if let Some(level) = env("SUNDIAL_LOG_LEVEL") {
        settings.log_level = parse_log_level(&level)?;
    }
    if let Some(rate) = env("SUNDIAL_RATE_PER_TOKEN") {
        settings.rate_per_token = rate.parse().map_err(|_| "SUNDIAL_RATE_PER_TOKEN: must be a whole number")?;
    }
    if let Some(max) = env("SUNDIAL_MAX_JOBS") {
        settings.limits.max_jobs = max.parse().map_err(|_| "SUNDIAL_MAX_JOBS: must be a whole number")?;
    }
    if let Some(count) = env("SUNDIAL_PARTITIONS") {
        settings.partitions = Some(count.parse().map_err(|_| "SUNDIAL_PARTITIONS: must be a whole number")?);
    }
    if let Some(count) = env("SUNDIAL_SHARDS") {
        settings.shards = count.parse().map_err(|_| "SUNDIAL_SHARDS: must be a whole number")?;
    }
    if let Some(mib) = env("SUNDIAL_MAX_MEMORY_MB") {
        let mib: u64 = mib.parse().map_err(|_| "SUNDIAL_MAX_MEMORY_MB: must be a whole number")?;
        settings.limits.max_memory_bytes = mib << 20;
    }
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--data" => settings.data = PathBuf::from(value()?),
            "--http" => {
                settings.http = value()?.parse().map_err(|_| "--http: expected HOST:PORT, such as 127.0.0.1:8080")?
            }
            "--secret" => settings.secret = Some(value()?),
            "--allow-loopback-targets" => settings.allow_loopback = true,
            "--allow-private-targets" => settings.allow_private = true,
            "--token" => settings.tokens.push(value()?),
            "--log-format" => settings.log_json = parse_log_format(&value()?)?,
            "--log-level" => settings.log_level = parse_log_level(&value()?)?,
            "--rate-per-token" => {
                settings.rate_per_token = value()?.parse().map_err(|_| "--rate-per-token: must be a whole number")?
            }
            "--max-jobs" => {
                settings.limits.max_jobs = value()?.parse().map_err(|_| "--max-jobs: must be a whole number")?
            }
            "--partitions" => {
                settings.partitions = Some(value()?.parse().map_err(|_| "--partitions: must be a whole number")?)
            }
            "--segment-mb" => {
                settings.segment_mb = value()?.parse().map_err(|_| "--segment-mb: must be a whole number")?
            }
            "--shards" => settings.shards = value()?.parse().map_err(|_| "--shards: must be a whole number")?,
            "--max-memory-mb" => {
                let mib: u64 = value()?.parse().map_err(|_| "--max-memory-mb: must be a whole number")?;
                settings.limits.max_memory_bytes = mib << 20;
            }
            "--help" | "-h" => return Err(usage()),
            _ => return Err(format!("unknown flag {flag}\n{}", usage())),
        }
    }
    Ok(settings)
}

fn usage() -> String {
    "usage: sundial [--data DIR] [--http ADDR] [--secret TEXT] [--max-jobs N] [--token TEXT]... [--rate-per-token N] [--allow-loopback-targets] [--allow-private-targets]".into()
}

fn main() -> ExitCode {
    let settings = match settings() {
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
    let started_ms = sundial_engine::dispatch::now_ms();
    let meta =
        ClusterMeta::open_or_create(&settings.data, settings.partitions, started_ms).map_err(|e| e.to_string())?;
    let shard_count = settings.shards.min(meta.partitions as usize).max(1);
    let dispatch = DispatchConfig {
        address_policy: AddressPolicy {
            allow_loopback: settings.allow_loopback,
            allow_private: settings.allow_private,
        },
        global_secret: settings.secret.clone().map(String::into_bytes),
        ..DispatchConfig::default()
    };
    let live = Arc::new(LiveJobs::new(shard_count));
    let metrics = Arc::new(Metrics::new());
    let (stop, stopping) = watch::channel(false);
    let mut shards = Vec::with_capacity(shard_count);
    for index in 0..shard_count {
        let config = ShardConfig {
            index,
            shards: shard_count,
            partitions: meta.partitions,
            data: settings.data.clone(),
            node_id: NODE_ID,
            partition: PartitionOptions {
                wal: WalOptions { segment_size_bytes: settings.segment_mb << 20, ..WalOptions::default() },
                ..PartitionOptions::single_node(NODE_ID)
            },
            runtime: RuntimeConfig { dispatch: dispatch.clone(), ..RuntimeConfig::default() },
            max_jobs: settings.limits.max_jobs,
            live: live.clone(),
            drain_limit: DRAIN_LIMIT,
            metrics: metrics.clone(),
        };
        match shard::spawn(config, stopping.clone()) {
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
    let listener =
        tokio::net::TcpListener::bind(settings.http).await.map_err(|e| format!("binding {}: {e}", settings.http))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let jobs: usize = shards.iter().map(|s| s.jobs).sum();
    let log_backend = shards[0].log_backend;
    let facts = NodeFacts {
        node_id: NODE_ID,
        meta: meta.clone(),
        shards: shard_count,
        runtime: RUNTIME_KIND,
        log_backend,
        http: address.to_string(),
        binary: String::new(),
        started_ms,
    };
    let router =
        Arc::new(Router::new(shards.iter().map(|s| s.inbox.clone()).collect(), settings.limits, live, metrics, facts));
    say(&format!("sundial listening on http://{address} (data in {})", settings.data.display()));
    say(&format!(
        "create a job:  curl -X POST http://{address}/jobs -H 'content-type: application/json' \\\n  -d '{{\"delay\": \"10s\", \"url\": \"https://example.com/hook\", \"json\": {{\"hello\": \"world\"}}}}'"
    ));
    tracing::info!(
        %address,
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
    let handles = shards.iter().map(|s| s.runtime.clone()).collect();
    let acceptor = tokio::spawn(http::serve(listener, router, gate, handles));
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
    let _ = stop.send(true);
    let mut failure = None;
    for outcome in waiting {
        if let Ok(Err(message)) = outcome.await {
            failure.get_or_insert(message);
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
