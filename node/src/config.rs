//! The server's settings. Each comes, in rising precedence, from its default, the optional
//! TOML file (`--config`), a SUNDIAL_* environment variable and a flag. docs/CONFIGURATION.md
//! lists every one with its default; a test keeps that page and this file in step.

use crate::shard::router::Limits;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Attempts the node's dispatcher holds waiting to start (every partition's together).
const DISPATCH_QUEUE_DEFAULT: usize = 100_000;
/// Connections to one host at once: enough for 10k deliveries/s to a receiver that answers
/// in 5 ms, few enough for a small server's accept queue with the adaptive limit below it.
const PER_HOST_CONCURRENCY_DEFAULT: usize = 64;
/// Attempts started per second to one host.
const PER_HOST_RATE_DEFAULT: u32 = 20_000;

/// The settings as given (any may be missing): flags and environment through clap, the file
/// through serde, with the same names (`max_jobs` in TOML is `--max-jobs` and
/// `SUNDIAL_MAX_JOBS`).
#[derive(Clone, Debug, Default, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ServerOptions {
    /// A TOML file with any of these settings (flags and environment override it).
    #[arg(long, env = "SUNDIAL_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./sundial-data].
    #[arg(long, env = "SUNDIAL_DATA")]
    pub data: Option<PathBuf>,
    /// HTTP/JSON API address; port 0 picks a free one [default: 127.0.0.1:8080].
    #[arg(long, env = "SUNDIAL_HTTP")]
    pub http: Option<SocketAddr>,
    /// Binary protocol address [default: 127.0.0.1:7070].
    #[arg(long, env = "SUNDIAL_BINARY")]
    pub binary: Option<SocketAddr>,
    /// Partitions of a new cluster; fixed once created [default: 16].
    #[arg(long, env = "SUNDIAL_PARTITIONS")]
    pub partitions: Option<u32>,
    /// Shard threads, one per core [default: the number of cores].
    #[arg(long, env = "SUNDIAL_SHARDS")]
    pub shards: Option<usize>,
    /// Size of each preallocated log segment, MiB [default: 8].
    #[arg(long, env = "SUNDIAL_SEGMENT_MB")]
    pub segment_mb: Option<u64>,
    /// How log writes are made durable: auto (io_uring when the kernel allows it, else
    /// pwrite + fdatasync), io_uring, or syscall (pwrite + fdatasync) [default: auto].
    #[arg(long, env = "SUNDIAL_LOG_SYNC")]
    pub log_sync: Option<String>,
    /// Applied entries between state snapshots of a partition [default: 10000].
    #[arg(long, env = "SUNDIAL_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// Live (pending or running) jobs before creates get 507 [default: 1000000].
    #[arg(long, env = "SUNDIAL_MAX_JOBS")]
    pub max_jobs: Option<usize>,
    /// Resident memory, MiB, before creates get 507; 0 is no limit [default: 0].
    #[arg(long, env = "SUNDIAL_MAX_MEMORY_MB")]
    pub max_memory_mb: Option<u64>,
    /// A bearer token, at least 16 characters, optionally `read:`, `write:` or `admin:` (and
    /// `@RATE`) before it (repeat the flag for more; the environment variable takes one per
    /// line); none: no authentication.
    #[arg(long = "token", env = "SUNDIAL_TOKENS", value_delimiter = '\n', hide_env_values = true)]
    #[serde(default)]
    pub tokens: Option<Vec<String>>,
    /// A file of bearer tokens, one per line (blank lines and lines starting with # skipped),
    /// beside any given by `--token`.
    #[arg(long, env = "SUNDIAL_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Requests per second per token (a token bucket with an equal burst) [default: 1000].
    #[arg(long, env = "SUNDIAL_RATE_PER_TOKEN")]
    pub rate_per_token: Option<u32>,
    /// Signs the webhooks of jobs without their own secret (HMAC-SHA256).
    #[arg(long, env = "SUNDIAL_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The secret replacing `secret` (key rotation): webhooks carry a signature by each.
    #[arg(long, env = "SUNDIAL_SECRET_NEXT", hide_env_values = true)]
    pub secret_next: Option<String>,
    /// Seconds a finished (or deleted) job's id is refused to a new create; 0: off [default: 86400].
    #[arg(long, env = "SUNDIAL_DEDUP_WINDOW_S")]
    pub dedup_window_s: Option<u64>,
    /// Seconds a finished job (completed, failed, cancelled, timed out) stays readable, with its
    /// executions and dead letters, before it is removed; 0: removed at once [default: 604800].
    #[arg(long, alias = "retention", env = "SUNDIAL_RETENTION_S")]
    pub retention_s: Option<u64>,
    /// Connections one client address may hold at once on each API port; 0: no limit of its
    /// own (clients that all come through one proxy) [default: a quarter of the port's].
    #[arg(long, env = "SUNDIAL_CONNECTIONS_PER_ADDRESS")]
    pub connections_per_address: Option<usize>,
    /// A web page origin (`https://host[:port]`) whose pages may call the HTTP API from a
    /// browser, besides the node's own (repeat the flag; the environment variable takes them
    /// comma-separated); none: requests from other origins' pages are refused.
    #[arg(long = "allow-origin", env = "SUNDIAL_ALLOWED_ORIGINS", value_delimiter = ',')]
    #[serde(default)]
    pub allowed_origins: Option<Vec<String>>,
    /// Allow webhook targets on loopback addresses (tests, local receivers) [default: false].
    #[arg(long, env = "SUNDIAL_ALLOW_LOOPBACK_TARGETS", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_loopback_targets: Option<bool>,
    /// Allow webhook targets on private networks [default: false].
    #[arg(long, env = "SUNDIAL_ALLOW_PRIVATE_TARGETS", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_private_targets: Option<bool>,
    /// Attempt timeout of jobs that set none, ms (Scheduled-DB: a fixed 30 s) [default: 30000].
    #[arg(long, env = "SUNDIAL_ATTEMPT_TIMEOUT_MS")]
    pub attempt_timeout_ms: Option<u64>,
    /// Attempts waiting to start on this node; beyond it due fires wait [default: 100000].
    #[arg(long, env = "SUNDIAL_DISPATCH_QUEUE")]
    pub dispatch_queue: Option<usize>,
    /// Connections (and attempts running) at once per target host from this node: the
    /// most; fewer while the host shows overload (adaptive) [default: 64].
    #[arg(long, env = "SUNDIAL_PER_HOST_CONCURRENCY")]
    pub per_host_concurrency: Option<usize>,
    /// Attempts started per second per target host from this node [default: 20000].
    #[arg(long, env = "SUNDIAL_PER_HOST_RATE")]
    pub per_host_rate: Option<u32>,
    /// Consecutive failures that open a host's circuit breaker [default: 5].
    #[arg(long, env = "SUNDIAL_BREAKER_FAILURES")]
    pub breaker_failures: Option<u32>,
    /// How long an open breaker waits before a probe, ms [default: 30000].
    #[arg(long, env = "SUNDIAL_BREAKER_OPEN_MS")]
    pub breaker_open_ms: Option<u64>,
    /// Largest binary-protocol frame accepted, bytes [default: 4194304].
    #[arg(long, env = "SUNDIAL_FRAME_MAX_BYTES")]
    pub frame_max_bytes: Option<u32>,
    /// How long SIGTERM waits for attempts in flight, seconds [default: 10].
    #[arg(long, env = "SUNDIAL_DRAIN_SECONDS")]
    pub drain_seconds: Option<u64>,
    /// OTLP/HTTP collector for spans (e.g. http://127.0.0.1:4318); none: spans are not exported.
    #[arg(long, env = "SUNDIAL_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log format on stderr: human or json [default: human].
    #[arg(long, env = "SUNDIAL_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log level: error, warn, info or debug [default: info].
    #[arg(long, env = "SUNDIAL_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// This node's id in its cluster, 1 or more [default: 1].
    #[arg(long, env = "SUNDIAL_NODE_ID")]
    pub node_id: Option<u64>,
    /// Every member of the cluster as ID@HOST:PORT (their QUIC addresses), comma-separated; none: a single node.
    #[arg(long, env = "SUNDIAL_PEERS", value_delimiter = ',')]
    #[serde(default)]
    pub peers: Option<Vec<String>>,
    /// Where this node listens for its peers (QUIC) [default: its address in --peers].
    #[arg(long, env = "SUNDIAL_RAFT")]
    pub raft: Option<SocketAddr>,
    /// Folder with ca.pem and this node's node-ID.pem and node-ID.key (`sundial certs init`) [default: DATA/certs].
    #[arg(long, env = "SUNDIAL_CERTS")]
    pub certs: Option<PathBuf>,
    /// Replicas of each partition, capped at the member count [default: 3].
    #[arg(long, env = "SUNDIAL_REPLICATION")]
    pub replication: Option<usize>,
    /// One Raft tick, ms [default: 10].
    #[arg(long, env = "SUNDIAL_RAFT_TICK_MS")]
    pub raft_tick_ms: Option<u64>,
    /// Ticks without a leader before a replica campaigns (randomized up to twice it) [default: 20].
    #[arg(long, env = "SUNDIAL_ELECTION_TICKS")]
    pub election_ticks: Option<u32>,
    /// Ticks between a leader's heartbeats [default: 2].
    #[arg(long, env = "SUNDIAL_HEARTBEAT_TICKS")]
    pub heartbeat_ticks: Option<u32>,
    /// Members a new cluster must list in --peers before it bootstraps (a guard against a partial list).
    #[arg(long, env = "SUNDIAL_BOOTSTRAP_EXPECT")]
    pub bootstrap_expect: Option<usize>,
    /// Join an existing cluster: create no partitions, wait for `sundial cluster add` [default: false].
    #[arg(long, env = "SUNDIAL_JOIN", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub join: Option<bool>,
}

/// The cluster settings, when the node is one of several.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Every member's id and QUIC address (this node's included).
    pub members: std::collections::BTreeMap<u64, SocketAddr>,
    pub raft: SocketAddr,
    pub certs: PathBuf,
    pub replication: usize,
    pub tick: Duration,
    pub election_ticks: u32,
    pub heartbeat_ticks: u32,
    /// A node added to a running cluster: it bootstraps nothing.
    pub join: bool,
}

/// The settings resolved: every value present and checked.
#[derive(Clone, Debug)]
pub struct Settings {
    pub data: PathBuf,
    pub http: SocketAddr,
    pub binary: SocketAddr,
    pub partitions: Option<u32>,
    pub shards: usize,
    pub segment_bytes: u64,
    pub log_sync: sundial_wal::SyncChoice,
    pub snapshot_every: u64,
    pub limits: Limits,
    pub tokens: Vec<TokenGrant>,
    pub rate_per_token: u32,
    pub secret: Option<String>,
    pub secret_next: Option<String>,
    pub dedup_window_ms: u64,
    pub retention_ms: u64,
    pub allowed_origins: Vec<String>,
    pub connections_per_address: Option<usize>,
    pub allow_loopback_targets: bool,
    pub allow_private_targets: bool,
    pub attempt_timeout_ms: u64,
    pub dispatch_queue: usize,
    pub per_host_concurrency: usize,
    pub per_host_rate: u32,
    pub breaker_failures: u32,
    pub breaker_open_ms: u64,
    pub frame_max_bytes: u32,
    pub drain: Duration,
    pub otlp_endpoint: Option<String>,
    pub log_json: bool,
    pub log_level: tracing::Level,
    pub node_id: u64,
    pub cluster: Option<ClusterSettings>,
}

/// The shortest bearer token a node accepts in its settings.
const TOKEN_MIN_CHARS: usize = 16;

/// What a token may do, each including the one before: `Read` (GET and HEAD, reads over the
/// binary protocol), `Write` (creating and changing jobs), `Admin` (cluster membership,
/// purging dead letters, bulk purges and deletes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// A configured token: the secret a client presents, what it may do, and its own request
/// rate (`None`: `rate_per_token`). Given as `[read|write|admin[@RATE]:]SECRET`; a token
/// without such a prefix is an admin one, as every token was before scopes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGrant {
    pub secret: String,
    pub scope: Scope,
    pub rate_per_second: Option<u32>,
}

impl TokenGrant {
    /// Reads the prefix, if the text has one (the secret is checked by the caller).
    fn parse(text: &str) -> Result<TokenGrant, String> {
        let admin = TokenGrant { secret: text.to_string(), scope: Scope::Admin, rate_per_second: None };
        let Some((prefix, secret)) = text.split_once(':') else { return Ok(admin) };
        let (scope, rate) = prefix.split_once('@').map_or((prefix, None), |(scope, rate)| (scope, Some(rate)));
        let scope = match scope.to_ascii_lowercase().as_str() {
            "read" => Scope::Read,
            "write" => Scope::Write,
            "admin" => Scope::Admin,
            _ => return Ok(admin), // a colon inside the secret itself
        };
        let rate_per_second = match rate.map(str::parse::<u32>) {
            None => None,
            Some(Ok(rate)) if rate > 0 => Some(rate),
            Some(_) => return Err(format!("{prefix}: the rate after @ is requests per second, 1 or more")),
        };
        Ok(TokenGrant { secret: secret.to_string(), scope, rate_per_second })
    }
}

macro_rules! prefer {
    ($flags:expr, $file:expr; $($field:ident),* $(,)?) => {
        ServerOptions { config: $flags.config.clone(), $($field: $flags.$field.clone().or($file.$field.clone()),)* }
    };
}

impl ServerOptions {
    /// Flags and environment over the file's settings.
    pub fn over(&self, file: &ServerOptions) -> ServerOptions {
        prefer!(self, file; data, http, binary, partitions, shards, segment_mb, log_sync, snapshot_every, max_jobs,
            max_memory_mb, tokens, tokens_file, rate_per_token, secret, secret_next, dedup_window_s, retention_s, allowed_origins, connections_per_address, allow_loopback_targets,
            allow_private_targets, attempt_timeout_ms, dispatch_queue, per_host_concurrency, per_host_rate, breaker_failures,
            breaker_open_ms, frame_max_bytes, drain_seconds, otlp_endpoint, log_format, log_level, node_id, peers,
            raft, certs, replication, raft_tick_ms, election_ticks, heartbeat_ticks, join, bootstrap_expect)
    }

    /// Reads the TOML file named by `config` (if any) and puts these options over it.
    pub fn with_file(&self) -> Result<ServerOptions, String> {
        let Some(path) = &self.config else { return Ok(self.clone()) };
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: ServerOptions = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(self.over(&file))
    }

    /// The origins of `--allow-origin`, each `http` or `https`, `://`, a host and maybe a
    /// port, nothing after (lower-cased: origins compare so).
    fn checked_origins(&self) -> Result<Vec<String>, String> {
        let given = self.allowed_origins.iter().flatten().map(|o| o.trim()).filter(|o| !o.is_empty());
        given
            .map(|origin| {
                let lowered = origin.to_ascii_lowercase();
                let authority = lowered.strip_prefix("https://").or_else(|| lowered.strip_prefix("http://"));
                match authority {
                    Some(authority)
                        if !authority.is_empty()
                            && !authority.contains(['/', '?', '#', '@', ' ', '*'])
                            && authority.is_ascii() =>
                    {
                        // Browsers leave a scheme's default port out of `Origin`.
                        let normalized = lowered.strip_suffix(":443").filter(|_| lowered.starts_with("https://"));
                        let normalized =
                            normalized.or_else(|| lowered.strip_suffix(":80").filter(|_| lowered.starts_with("http://")));
                        Ok(normalized.unwrap_or(&lowered).to_string())
                    }
                    _ => Err(format!(
                        "allowed_origins: {origin:?} is not an origin (http:// or https://, a host, maybe :port, nothing after)"
                    )),
                }
            })
            .collect()
    }

    /// The tokens of `--token` and of `--tokens-file`, each checked: authentication fails
    /// closed, so a token that is empty, blank or short stops the node from starting rather
    /// than leaving the API open or easy to guess. Tokens are never split on commas.
    fn checked_tokens(&self) -> Result<Vec<TokenGrant>, String> {
        let given: Vec<&String> = self.tokens.iter().flatten().collect();
        // A value that ends in a newline (an environment file, a secret) leaves an empty last
        // item: blank items are skipped beside real ones, and refused only when there is
        // nothing else (which would leave the API open).
        let blank = |token: &&String| token.trim().is_empty();
        let skip_blank = given.iter().any(|token| !blank(token));
        let mut tokens: Vec<(String, String)> = given
            .into_iter()
            .enumerate()
            .filter(|(_, token)| !(skip_blank && blank(token)))
            .map(|(i, token)| (format!("tokens: token {}", i + 1), token.clone()))
            .collect();
        if let Some(path) = &self.tokens_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("tokens_file: {}: {e}", path.display()))?;
            let lines =
                text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
            let before = tokens.len();
            tokens
                .extend(lines.map(|(i, l)| (format!("tokens_file: {} line {}", path.display(), i + 1), l.to_string())));
            if tokens.len() == before {
                return Err(format!("tokens_file: {} holds no token (one per line)", path.display()));
            }
        }
        let mut checked = Vec::new();
        for (source, token) in tokens {
            let grant = TokenGrant::parse(token.trim()).map_err(|rule| format!("{source}: {rule}"))?;
            let token = grant.secret.as_str();
            if token.is_empty() {
                return Err(format!("{source}: empty; give a token of at least {TOKEN_MIN_CHARS} characters, or none for no authentication"));
            }
            if token.chars().count() < TOKEN_MIN_CHARS {
                return Err(format!(
                    "{source}: {} characters; at least {TOKEN_MIN_CHARS} are needed (a short token is guessed)",
                    token.chars().count()
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "{source}: only visible ASCII characters, no spaces (it travels in an Authorization header)"
                ));
            }
            if checked.iter().any(|earlier: &TokenGrant| earlier.secret == grant.secret) {
                return Err(format!("{source}: the same secret is given twice (one scope and rate per secret)"));
            }
            checked.push(grant);
        }
        Ok(checked)
    }

    /// Fills in defaults and checks each value; an error names the setting and the rule.
    pub fn resolve(&self) -> Result<Settings, String> {
        fn within<T: PartialOrd + std::fmt::Display + Copy>(
            name: &str,
            value: T,
            low: T,
            high: T,
        ) -> Result<T, String> {
            if value < low || value > high {
                return Err(format!("{name}: must be within {low}..={high}, not {value}"));
            }
            Ok(value)
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let log_json = match self.log_format.as_deref().unwrap_or("human") {
            "human" => false,
            "json" => true,
            other => return Err(format!("log_format: must be human or json, not {other:?}")),
        };
        let log_level = match self.log_level.as_deref().unwrap_or("info") {
            "error" => tracing::Level::ERROR,
            "warn" => tracing::Level::WARN,
            "info" => tracing::Level::INFO,
            "debug" => tracing::Level::DEBUG,
            other => return Err(format!("log_level: must be error, warn, info or debug, not {other:?}")),
        };
        let segment_mb = within("segment_mb", self.segment_mb.unwrap_or(8), 1, 1_024)?;
        let data = self.data.clone().unwrap_or_else(|| PathBuf::from("sundial-data"));
        let node_id = within("node_id", self.node_id.unwrap_or(1), 1, u64::MAX)?;
        let cluster = self.cluster(node_id, &data)?;
        Ok(Settings {
            node_id,
            cluster,
            data,
            http: self.http.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            binary: self.binary.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070))),
            partitions: self.partitions,
            shards: within("shards", self.shards.unwrap_or(cores), 1, 1_024)?,
            segment_bytes: segment_mb << 20,
            log_sync: match self.log_sync.as_deref().unwrap_or("auto") {
                "auto" => sundial_wal::SyncChoice::Auto,
                "io_uring" => sundial_wal::SyncChoice::IoUring,
                "syscall" => sundial_wal::SyncChoice::Syscall,
                other => return Err(format!("log_sync: must be auto, io_uring or syscall, not {other:?}")),
            },
            snapshot_every: within("snapshot_every", self.snapshot_every.unwrap_or(10_000), 1, u64::MAX)?,
            limits: Limits {
                max_jobs: self.max_jobs.unwrap_or(1_000_000),
                max_memory_bytes: self.max_memory_mb.unwrap_or(0) << 20,
            },
            tokens: self.checked_tokens()?,
            rate_per_token: within("rate_per_token", self.rate_per_token.unwrap_or(1_000), 1, u32::MAX)?,
            secret: self.secret.clone().filter(|s| !s.is_empty()),
            secret_next: match (self.secret.as_deref().filter(|s| !s.is_empty()), self.secret_next.as_deref()) {
                (_, None | Some("")) => None,
                (Some(_), Some(next)) => Some(next.to_string()),
                (None, Some(_)) => return Err("secret_next: needs secret (it is the secret that replaces it)".into()),
            },
            dedup_window_ms: within("dedup_window_s", self.dedup_window_s.unwrap_or(86_400), 0, 365 * 86_400)? * 1000,
            retention_ms: within("retention_s", self.retention_s.unwrap_or(7 * 86_400), 0, 3650 * 86_400)? * 1000,
            allowed_origins: self.checked_origins()?,
            connections_per_address: self.connections_per_address,
            allow_loopback_targets: self.allow_loopback_targets.unwrap_or(false),
            allow_private_targets: self.allow_private_targets.unwrap_or(false),
            attempt_timeout_ms: within(
                "attempt_timeout_ms",
                self.attempt_timeout_ms.unwrap_or(sundial_engine::job::ATTEMPT_TIMEOUT_MS_DEFAULT),
                1,
                sundial_engine::job::ATTEMPT_TIMEOUT_MS_MAX,
            )?,
            dispatch_queue: within(
                "dispatch_queue",
                self.dispatch_queue.unwrap_or(DISPATCH_QUEUE_DEFAULT),
                1,
                10_000_000,
            )?,
            per_host_concurrency: within(
                "per_host_concurrency",
                self.per_host_concurrency.unwrap_or(PER_HOST_CONCURRENCY_DEFAULT),
                1,
                100_000,
            )?,
            per_host_rate: within("per_host_rate", self.per_host_rate.unwrap_or(PER_HOST_RATE_DEFAULT), 1, u32::MAX)?,
            breaker_failures: within("breaker_failures", self.breaker_failures.unwrap_or(5), 1, 1_000_000)?,
            breaker_open_ms: within("breaker_open_ms", self.breaker_open_ms.unwrap_or(30_000), 1, 86_400_000)?,
            frame_max_bytes: within(
                "frame_max_bytes",
                self.frame_max_bytes.unwrap_or(sundial_net::codec::FRAME_MAX_BYTES_DEFAULT),
                1_024,
                1 << 30,
            )?,
            drain: Duration::from_secs(within("drain_seconds", self.drain_seconds.unwrap_or(10), 0, 3_600)?),
            otlp_endpoint: self.otlp_endpoint.clone().filter(|e| !e.is_empty()),
            log_json,
            log_level,
        })
    }

    /// The cluster settings: `None` without peers (a single node).
    fn cluster(&self, node_id: u64, data: &std::path::Path) -> Result<Option<ClusterSettings>, String> {
        let peers = self.peers.clone().unwrap_or_default();
        let peers: Vec<&str> = peers.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).collect();
        if peers.is_empty() {
            return Ok(None);
        }
        let mut members = std::collections::BTreeMap::new();
        for peer in peers {
            let rule = || format!("peers: {peer:?} is not ID@HOST:PORT (e.g. 2@127.0.0.1:7402)");
            let (id, addr) = peer.split_once('@').ok_or_else(rule)?;
            let id: u64 = id.parse().ok().filter(|id| *id > 0).ok_or_else(rule)?;
            let addr: SocketAddr = addr.parse().map_err(|_| rule())?;
            if members.insert(id, addr).is_some() {
                return Err(format!("peers: node {id} is listed twice"));
            }
        }
        let raft = match (self.raft, members.get(&node_id)) {
            (Some(raft), _) => raft,
            (None, Some(listed)) => *listed,
            (None, None) => return Err(format!("peers: this node ({node_id}) is not listed, and --raft is not set")),
        };
        members.entry(node_id).or_insert(raft);
        if let Some(expected) = self.bootstrap_expect {
            if expected != members.len() {
                return Err(format!(
                    "bootstrap_expect: {expected} members were expected and peers lists {}; every member must be started with the same, complete list",
                    members.len()
                ));
            }
        }
        let election_ticks = self.election_ticks.unwrap_or(20);
        let heartbeat_ticks = self.heartbeat_ticks.unwrap_or(2);
        if heartbeat_ticks == 0 || election_ticks <= heartbeat_ticks {
            return Err(format!(
                "election_ticks: must be greater than heartbeat_ticks ({heartbeat_ticks}, at least 1), not {election_ticks}"
            ));
        }
        let tick_ms = self.raft_tick_ms.unwrap_or(10);
        if !(1..=1_000).contains(&tick_ms) {
            return Err(format!("raft_tick_ms: must be within 1..=1000, not {tick_ms}"));
        }
        let replication = self.replication.unwrap_or(crate::cluster::meta::REPLICATION_DEFAULT);
        if !(1..=7).contains(&replication) {
            return Err(format!("replication: must be within 1..=7, not {replication}"));
        }
        Ok(Some(ClusterSettings {
            members,
            raft,
            certs: self.certs.clone().unwrap_or_else(|| data.join("certs")),
            replication,
            tick: Duration::from_millis(tick_ms),
            election_ticks,
            heartbeat_ticks,
            join: self.join.unwrap_or(false),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: ServerOptions =
            toml::from_str("max_jobs = 5\nhttp = \"127.0.0.1:9000\"\ntokens = [\"a-token-of-16-chars\"]\n").unwrap();
        let flags = ServerOptions { max_jobs: Some(7), ..ServerOptions::default() };
        let settings = flags.over(&file).resolve().unwrap();
        assert_eq!(settings.limits.max_jobs, 7);
        assert_eq!(settings.http, "127.0.0.1:9000".parse::<SocketAddr>().unwrap());
        assert_eq!(settings.tokens[0].secret, "a-token-of-16-chars");
        assert_eq!(settings.binary, "127.0.0.1:7070".parse::<SocketAddr>().unwrap(), "a default");
    }

    #[test]
    fn allowed_origins_are_origins_lower_cased_or_the_node_does_not_start() {
        let with = |origins: &[&str]| {
            let options = ServerOptions {
                allowed_origins: Some(origins.iter().map(|o| o.to_string()).collect()),
                ..Default::default()
            };
            options.resolve().map(|settings| settings.allowed_origins)
        };
        let given =
            with(&["https://Admin.Example", " http://localhost:3000 ", "https://a.example:443"]).expect("origins");
        assert_eq!(
            given,
            ["https://admin.example", "http://localhost:3000", "https://a.example"],
            "as browsers send them"
        );
        for bad in
            ["admin.example", "https://", "https://admin.example/app", "ftp://admin.example", "*", "https://*.example"]
        {
            let error = with(&[bad]).expect_err("refused");
            assert!(error.starts_with("allowed_origins:") && error.contains(bad.trim()), "{bad}: {error}");
        }
    }

    #[test]
    fn a_token_may_name_its_scope_and_rate_and_is_an_admin_one_without() {
        let grants = |tokens: &[&str]| {
            let options =
                ServerOptions { tokens: Some(tokens.iter().map(|t| t.to_string()).collect()), ..Default::default() };
            options.resolve().map(|settings| settings.tokens)
        };
        let given = grants(&["READ:a-reading-token-0123", "write@50:a-writing-token-012", "an-old-token:with-colon"])
            .expect("valid");
        let seen: Vec<(&str, Scope, Option<u32>)> =
            given.iter().map(|g| (g.secret.as_str(), g.scope, g.rate_per_second)).collect();
        assert_eq!(
            seen,
            [
                ("a-reading-token-0123", Scope::Read, None),
                ("a-writing-token-012", Scope::Write, Some(50)),
                ("an-old-token:with-colon", Scope::Admin, None),
            ]
        );
        for (bad, says) in [("write@0:a-writing-token-012", "the rate after @"), ("read:short", "at least 16")] {
            let error = grants(&[bad]).expect_err("refused");
            assert!(error.starts_with("tokens: token 1") && error.contains(says), "{bad}: {error}");
        }
        let twice = grants(&["read:the-same-secret-0123", "the-same-secret-0123"]).expect_err("refused");
        assert!(twice.starts_with("tokens: token 2") && twice.contains("twice"), "{twice}");
    }

    #[test]
    fn tokens_fail_closed_whole_and_long_enough_or_the_node_does_not_start() {
        let with = |tokens: &[&str]| {
            let options =
                ServerOptions { tokens: Some(tokens.iter().map(|t| t.to_string()).collect()), ..Default::default() };
            options.resolve().map(|settings| settings.tokens.into_iter().map(|grant| grant.secret).collect::<Vec<_>>())
        };
        let refused = |tokens: &[&str], says: &str| {
            let error = with(tokens).expect_err("refused");
            assert!(error.contains(says) && error.starts_with("tokens:"), "{error}");
        };
        refused(&[""], "empty");
        refused(&["   "], "empty");
        refused(&["a-long-enough-token", " , "], "token 2");
        // SUNDIAL_TOKENS="…\n" (or \r\n) ends in an empty item: skipped beside a real token.
        assert_eq!(with(&["a-long-enough-token\r", ""]).expect("a trailing newline"), ["a-long-enough-token"]);
        refused(&["s3cret"], "at least 16");
        refused(&["a token with spaces in it"], "no spaces");
        // A comma is part of the token, never a separator.
        assert_eq!(with(&["Xq9#mZ2!pL,a-b-c-d-e-f"]).expect("kept whole"), ["Xq9#mZ2!pL,a-b-c-d-e-f"]);
        assert_eq!(with(&[]).expect("none: no authentication"), Vec::<String>::new());

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# the API's tokens\n\nfirst-token-0123456789\n  second-token-0123456789  \n")
            .expect("write");
        let options = ServerOptions { tokens_file: Some(file.clone()), ..Default::default() };
        let secrets: Vec<String> = options.resolve().expect("read").tokens.into_iter().map(|g| g.secret).collect();
        assert_eq!(secrets, ["first-token-0123456789", "second-token-0123456789"]);
        std::fs::write(&file, "# nothing but a comment\n").expect("write");
        let error = options.resolve().expect_err("a file without tokens");
        assert!(error.contains("holds no token"), "{error}");
        std::fs::write(&file, "short\n").expect("write");
        let error = options.resolve().expect_err("a short token");
        assert!(error.contains("line 1") && error.contains("at least 16"), "{error}");
    }

    #[test]
    fn the_example_cluster_configurations_resolve_to_one_cluster() {
        let mut seen = Vec::new();
        for id in 1..=3u64 {
            let path = format!("{}/../deploy/cluster/node-{id}.toml", env!("CARGO_MANIFEST_DIR"));
            let options = ServerOptions { config: Some(path.into()), ..ServerOptions::default() };
            let settings = options.with_file().and_then(|o| o.resolve()).expect("the example resolves");
            let cluster = settings.cluster.expect("a cluster member");
            assert_eq!((settings.node_id, cluster.members.len(), cluster.replication), (id, 3, 3));
            seen.push(cluster.members);
        }
        assert!(seen.windows(2).all(|pair| pair[0] == pair[1]), "every member lists the same peers");
    }

    #[test]
    fn a_bad_peer_list_names_the_setting() {
        let peers = |list: &[&str]| ServerOptions {
            peers: Some(list.iter().map(|p| p.to_string()).collect()),
            ..ServerOptions::default()
        };
        let bad = peers(&["1@127.0.0.1:7401", "two@127.0.0.1:7402"]).resolve().unwrap_err();
        assert!(bad.starts_with("peers:") && bad.contains("two@"), "{bad}");
        let twice = peers(&["1@127.0.0.1:7401", "1@127.0.0.1:7402"]).resolve().unwrap_err();
        assert!(twice.contains("listed twice"), "{twice}");
        let partial =
            ServerOptions { bootstrap_expect: Some(3), ..peers(&["1@127.0.0.1:7401"]) }.resolve().unwrap_err();
        assert!(partial.starts_with("bootstrap_expect:"), "{partial}");
        let absent = ServerOptions { node_id: Some(5), ..peers(&["1@127.0.0.1:7401"]) }.resolve().unwrap_err();
        assert!(absent.contains("not listed"), "{absent}");
    }

    #[test]
    fn a_bad_value_or_an_unknown_key_names_the_setting() {
        let unknown = toml::from_str::<ServerOptions>("max_jobz = 5\n").unwrap_err().to_string();
        assert!(unknown.contains("max_jobz"), "{unknown}");
        let zero = ServerOptions { shards: Some(0), ..ServerOptions::default() }.resolve().unwrap_err();
        assert_eq!(zero, "shards: must be within 1..=1024, not 0");
        let level = ServerOptions { log_level: Some("loud".into()), ..ServerOptions::default() }.resolve().unwrap_err();
        assert!(level.starts_with("log_level:"), "{level}");
        let sync = ServerOptions { log_sync: Some("fast".into()), ..ServerOptions::default() }.resolve().unwrap_err();
        assert_eq!(sync, "log_sync: must be auto, io_uring or syscall, not \"fast\"");
        let retention =
            ServerOptions { retention_s: Some(u64::MAX), ..ServerOptions::default() }.resolve().unwrap_err();
        assert!(retention.starts_with("retention_s: must be within 0..="), "{retention}");
        let chosen =
            ServerOptions { log_sync: Some("syscall".into()), retention_s: Some(0), ..ServerOptions::default() };
        let chosen = chosen.resolve().expect("valid");
        assert_eq!((chosen.log_sync, chosen.retention_ms), (sundial_wal::SyncChoice::Syscall, 0));
    }
}
