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

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use sundial_engine::dispatch::guard::AddressPolicy;
use sundial_engine::dispatch::DispatchConfig;
use sundial_engine::runtime::{Runtime, RuntimeConfig};
use sundial_node::api::{self, Answer, REQUEST_BODY_MAX_BYTES};
use sundial_node::auth::{Gate, Verdict};
use sundial_node::{Partition, PartitionOptions};
use tokio::sync::{mpsc, oneshot};

/// Requests waiting for the loop; beyond it the server answers 503.
const INBOX_CAPACITY: usize = 1_024;
/// Requests handled per loop turn at most; their creates share one fsync.
const GROUP_COMMIT_MAX: usize = 256;
/// How long SIGTERM waits for attempts in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

struct Settings {
    data: PathBuf,
    http: SocketAddr,
    secret: Option<String>,
    allow_loopback: bool,
    allow_private: bool,
    limits: api::Limits,
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
        limits: api::Limits::default(),
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
            "--help" | "-h" => return Err(usage()),
            _ => return Err(format!("unknown flag {flag}\n{}", usage())),
        }
    }
    Ok(settings)
}

fn usage() -> String {
    "usage: sundial [--data DIR] [--http ADDR] [--secret TEXT] [--max-jobs N] [--token TEXT]... [--rate-per-token N] [--allow-loopback-targets] [--allow-private-targets]".into()
}

/// A request handed from a connection to the loop that owns the runtime.
struct Inbound {
    method: String,
    path: String,
    query: String,
    body: Vec<u8>,
    reply: oneshot::Sender<Answer>,
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
    let partition_dir = settings.data.join("partition-0");
    std::fs::create_dir_all(&partition_dir).map_err(|e| format!("{}: {e}", partition_dir.display()))?;
    let partition = Partition::open(&partition_dir, PartitionOptions::single_node(1))
        .map_err(|e| format!("opening {}: {e}", partition_dir.display()))?;
    let dispatch = DispatchConfig {
        address_policy: AddressPolicy {
            allow_loopback: settings.allow_loopback,
            allow_private: settings.allow_private,
        },
        global_secret: settings.secret.map(String::into_bytes),
        ..DispatchConfig::default()
    };
    let jobs = partition.state().job_count();
    let mut runtime = Runtime::with_log(RuntimeConfig { dispatch, ..RuntimeConfig::default() }, partition);
    let listener =
        tokio::net::TcpListener::bind(settings.http).await.map_err(|e| format!("binding {}: {e}", settings.http))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    say(&format!("sundial listening on http://{address} (data in {})", settings.data.display()));
    say(&format!(
        "create a job:  curl -X POST http://{address}/jobs -H 'content-type: application/json' \\\n  -d '{{\"delay\": \"10s\", \"url\": \"https://example.com/hook\", \"json\": {{\"hello\": \"world\"}}}}'"
    ));
    let (inbox, mut requests) = mpsc::channel::<Inbound>(INBOX_CAPACITY);
    tracing::info!(%address, data = %settings.data.display(), jobs, "sundial started");
    let gate = std::sync::Arc::new(Gate::new(settings.tokens.clone(), settings.rate_per_token));
    if gate.enabled() {
        say(&format!("bearer tokens required ({} configured)", settings.tokens.len()));
    }
    let acceptor = tokio::spawn(accept(listener, inbox, gate));
    let signal = |kind| tokio::signal::unix::signal(kind).map_err(|e| e.to_string());
    let mut terminate = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut random = u128::from(sundial_engine::dispatch::now_ms()) | 1;
    // The loop owns the runtime: requests, outcomes and timers are handled one at a time.
    loop {
        let sleep_ms = runtime.sleep_ms();
        tokio::select! {
            request = requests.recv() => {
                let Some(first) = request else { break };
                // Everything already waiting is taken too: creates go to the log together
                // (one fsync for all of them), the rest are handled in arrival order.
                let mut batch = vec![first];
                while batch.len() < GROUP_COMMIT_MAX {
                    match requests.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                random = random.wrapping_mul(0x2545_F491_4F6C_DD1D_2545_F491_4F6C_DD1D).wrapping_add(0x9E37_79B9);
                handle_batch(&mut runtime, &settings.limits, batch, random);
            }
            result = runtime.next_result() => {
                if let Some(result) = result {
                    // Every outcome already waiting goes to the log with this one.
                    let mut results = vec![result];
                    results.extend(runtime.ready_results(GROUP_COMMIT_MAX));
                    runtime.finish_many(results);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
        if let Some(failure) = runtime.log_failure() {
            // What is durable is unknown until recovery runs: stop, and let a restart recover.
            acceptor.abort();
            return Err(format!("the partition log failed ({failure}); restart to recover"));
        }
        runtime.fire_due_jobs();
    }
    // Stop: no new connections or requests; attempts in flight finish (their outcomes are
    // committed) or the next start re-runs them.
    acceptor.abort();
    drop(requests);
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    while runtime.dispatcher().running() > 0 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            result = runtime.next_result() => if let Some(result) = result { runtime.finish(result) },
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
    tracing::info!("sundial stopped");
    say("sundial stopped");
    Ok(())
}

/// A line on stdout; a closed stdout (the reader went away) must not stop the node.
fn say(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// Answers a batch of requests: the creates with one log write, then the others in order.
fn handle_batch<L: sundial_engine::runtime::CommandLog>(
    runtime: &mut Runtime<L>,
    limits: &api::Limits,
    batch: Vec<Inbound>,
    random: u128,
) {
    let (creates, others): (Vec<Inbound>, Vec<Inbound>) =
        batch.into_iter().partition(|r| r.method == "POST" && r.path.trim_end_matches('/') == "/jobs");
    if !creates.is_empty() {
        let requests = creates.iter().map(|r| api::parse_body(&r.body)).collect();
        let answers = api::create_many(runtime, limits, requests, random);
        for (request, answer) in creates.into_iter().zip(answers) {
            let _ = request.reply.send(answer);
        }
    }
    for (position, request) in others.into_iter().enumerate() {
        let random = random.wrapping_add(1 << 64).wrapping_add(position as u128);
        let answer =
            api::handle(runtime, limits, &request.method, &request.path, &request.query, &request.body, random);
        let _ = request.reply.send(answer);
    }
}

async fn accept(listener: tokio::net::TcpListener, inbox: mpsc::Sender<Inbound>, gate: std::sync::Arc<Gate>) {
    // Bounded by the process: ends when the listener fails.
    while let Ok((stream, _)) = listener.accept().await {
        let inbox = inbox.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let inbox = inbox.clone();
                let gate = gate.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(request, inbox, &gate).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    request: hyper::Request<hyper::body::Incoming>,
    inbox: mpsc::Sender<Inbound>,
    gate: &Gate,
) -> hyper::Response<Full<Bytes>> {
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let authorization = request.headers().get("authorization").and_then(|v| v.to_str().ok());
    match gate.check(&method, &path, authorization, sundial_engine::dispatch::now_ms()) {
        Verdict::Allow => {}
        Verdict::Unauthorized => {
            let body = serde_json::json!({"error": "a valid bearer token is required", "code": "unauthorized"});
            let mut response = json_response(401, Some(body));
            response.headers_mut().insert("www-authenticate", hyper::header::HeaderValue::from_static("Bearer"));
            return response;
        }
        Verdict::Limited { retry_after_s } => {
            let body = serde_json::json!({"error": "this token's request rate is exceeded", "code": "rate_limited"});
            let mut response = json_response(429, Some(body));
            response.headers_mut().insert("retry-after", hyper::header::HeaderValue::from(retry_after_s));
            return response;
        }
    }
    let body = match Limited::new(request.into_body(), REQUEST_BODY_MAX_BYTES).collect().await {
        Ok(body) => body.to_bytes().to_vec(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            let message = format!("the body exceeds {REQUEST_BODY_MAX_BYTES} bytes");
            return json_response(413, Some(serde_json::json!({"error": message, "code": "too_large"})));
        }
        Err(e) => {
            let message = format!("the body could not be read: {e}");
            return json_response(400, Some(serde_json::json!({"error": message, "code": "bad_body"})));
        }
    };
    let (reply, answer) = oneshot::channel();
    let inbound = Inbound { method, path, query, body, reply };
    if inbox.try_send(inbound).is_err() {
        let busy = serde_json::json!({"error": "the node is busy; retry shortly", "code": "overloaded"});
        let mut response = json_response(503, Some(busy));
        response.headers_mut().insert("retry-after", hyper::header::HeaderValue::from_static("1"));
        return response;
    }
    match answer.await {
        Ok(Answer { status, body, retry_after_s }) => {
            let mut response = json_response(status, body);
            if let Some(seconds) = retry_after_s {
                response.headers_mut().insert("retry-after", hyper::header::HeaderValue::from(seconds));
            }
            response
        }
        Err(_) => json_response(503, Some(serde_json::json!({"error": "the node is stopping", "code": "unavailable"}))),
    }
}

fn json_response(status: u16, body: Option<serde_json::Value>) -> hyper::Response<Full<Bytes>> {
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let mut response = hyper::Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if status != 204 {
        response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    }
    response
}
