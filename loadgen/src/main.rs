//! `sundial-loadgen`: runs a scenario against a node or a cluster (binary protocol or
//! HTTP), shows a live progress line, prints percentile tables and a verdict, writes JSON
//! results and SVG plots, and exits 1 when the run broke the contract (a job lost, early,
//! repeated with another key, badly signed) — 2 when it could not run at all.

use clap::Parser;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sundial_loadgen::drive::{drive, Driven, Plan};
use sundial_loadgen::faults::Faults;
use sundial_loadgen::histogram::Latencies;
use sundial_loadgen::receiver::{self, SinkOptions};
use sundial_loadgen::target::{Protocol, Target};
use sundial_loadgen::timeline::Timeline;
use sundial_loadgen::{plot, reference, sink};

/// Items per request at most (the node's batch limit).
const BATCH_MAX: usize = 1_000;
/// Acknowledged ids an `ingest` run reads back at the end, at most.
const VERIFY_SAMPLE_MAX: usize = 1_000;
/// Ids a `mixed` run remembers for its gets and cancels, at most.
const MIXED_IDS_MAX: usize = 1_000_000;

#[derive(Parser, Debug)]
#[command(
    name = "sundial-loadgen",
    version,
    about = "Load for Sundial, and the accounting that says whether it kept its contract under it",
    long_about = "Load for Sundial, and the accounting that says whether it kept its contract under it.\n\n\
Open loop by default: requests go at their intended times whatever happened before, and latency counts \
from the intended time, so a stall cannot hide (coordinated omission). --max switches to max throughput \
with a bounded window in flight. Exit status: 0 pass, 1 the run broke the contract, 2 it could not run."
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Subcommand, Debug)]
enum Scenario {
    /// Creates of jobs due far in the future (nothing fires): create latency and acknowledged
    /// creates per second; a sample of acknowledged ids is read back at the end (any lost → exit 1).
    Ingest {
        #[command(flatten)]
        load: Load,
        /// Jobs are due this far in the future, seconds.
        #[arg(long, default_value_t = 3_600)]
        due_in_s: u64,
    },
    /// Jobs due shortly after creation, delivered to the built-in sink: create latency, fire
    /// lateness (arrival − due), deliveries per second, and whether every acknowledged job was
    /// delivered, none early, none repeated with another key, every signature good.
    Fire {
        #[command(flatten)]
        load: Load,
        #[command(flatten)]
        fire: FireArgs,
    },
    /// Creates, gets and cancels in a given mix (jobs due far in the future): latency per
    /// operation; a get or cancel of an acknowledged job answered 404 is a lost job (exit 1).
    Mixed {
        #[command(flatten)]
        load: Load,
        /// Relative weights of the operations.
        #[arg(long, default_value = "create=6,get=3,cancel=1")]
        mix: String,
        #[arg(long, default_value_t = 3_600)]
        due_in_s: u64,
    },
    /// A long steady `fire` run (10 minutes unless --seconds says otherwise) that also samples
    /// the target's resident memory (--pid) and reports latency drift (first vs last tenth).
    Soak {
        #[command(flatten)]
        load: Load,
        #[command(flatten)]
        fire: FireArgs,
        /// Process ids of the node(s) under test, for resident-memory samples (/proc/PID/status).
        #[arg(long, value_delimiter = ',')]
        pid: Vec<u32>,
        /// Seconds between memory samples.
        #[arg(long, default_value_t = 5)]
        sample_s: u64,
    },
    /// The references macro figures are divided by, measured on this machine now.
    Reference {
        #[command(subcommand)]
        what: ReferenceKind,
    },
}

#[derive(clap::Subcommand, Debug)]
enum ReferenceKind {
    /// Bare disk: pwrite of RECORD_BYTES × BATCH, then fdatasync, in a loop.
    Disk {
        /// Directory on the disk to measure (the node's data disk).
        #[arg(long, default_value = "/tmp")]
        dir: PathBuf,
        #[arg(long, default_value_t = 256)]
        record_bytes: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Bare loopback: HTTP/1.1 POSTs to the built-in sink on 127.0.0.1, one at a time per connection.
    Loopback {
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// How the load is applied (every scenario but `reference`).
#[derive(clap::Args, Debug)]
struct Load {
    /// Members to send to, comma-separated: binary-protocol addresses (--protocol binary) or
    /// HTTP addresses (--protocol http).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7070")]
    node: Vec<SocketAddr>,
    #[arg(long, value_enum, default_value_t = Protocol::Binary)]
    protocol: Protocol,
    /// Items (jobs, or operations) per second, open loop.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Max throughput instead of a rate: keep --window requests in flight.
    #[arg(long)]
    max: bool,
    /// Requests in flight in --max mode (1..=100000).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Items per request (1..=1000): one frame, or one POST /jobs/batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Connections (1..=1024): binary connections per member, or HTTP connections in all.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// How long to send for, seconds (default 10; soak: 600).
    #[arg(long)]
    seconds: Option<u64>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write SVG plots into this directory (created if missing).
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Bearer token.
    #[arg(long, env = "SUNDIAL_TOKEN")]
    token: Option<String>,
    /// No live progress line (it is never drawn when stderr is not a terminal).
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args, Debug)]
struct FireArgs {
    /// Each job is due this long after its intended creation time, ms.
    #[arg(long, default_value_t = 1_000)]
    due_after_ms: u64,
    /// Every job due at one instant (--due-after-ms after the last send): measures how fast
    /// a backlog is delivered.
    #[arg(long)]
    due_together: bool,
    /// Create all the jobs first, as fast as --window allows, due --rate per second from this
    /// long after the start: fire lateness at that rate with no creates running beside the
    /// fires. (--seconds × --rate jobs; creation must finish before the first is due.)
    #[arg(long)]
    schedule_ahead_ms: Option<u64>,
    /// Where the sink listens (the node must be allowed to call it: --allow-loopback-targets).
    #[arg(long, default_value = "127.0.0.1:0")]
    sink: SocketAddr,
    /// After the last job is due, stop waiting once no delivery arrived for this long, seconds.
    #[arg(long, default_value_t = 30)]
    grace_seconds: u64,
    /// A delivery this much before its due time still counts as on time (clock granularity), ms.
    #[arg(long, default_value_t = 0)]
    early_margin_ms: u64,
    /// Share of attempts the sink answers 500 (0.0..=1.0), chosen by a hash of key and attempt.
    #[arg(long, default_value_t = 0.0)]
    sink_fail_rate: f64,
    /// Share of attempts the sink answers 429 with Retry-After (0.0..=1.0).
    #[arg(long = "sink-429-rate", default_value_t = 0.0)]
    sink_throttle_rate: f64,
    /// The Retry-After of those 429s, seconds.
    #[arg(long, default_value_t = 1)]
    sink_retry_after_s: u32,
    /// The sink waits this long before every answer, ms.
    #[arg(long, default_value_t = 0)]
    sink_delay_ms: u64,
    /// Sign every job with this secret and verify each delivery's signature in the sink.
    #[arg(long)]
    secret: Option<String>,
    /// Attempts per fire before the dead-letter queue (1..=100).
    #[arg(long, default_value_t = 10)]
    max_attempts: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sundial-loadgen: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.scenario {
            Scenario::Ingest { load, due_in_s } => ingest(load, due_in_s).await,
            Scenario::Fire { load, fire: args } => fire(load, args, None).await,
            Scenario::Soak { load, fire: args, pid, sample_s } => fire(load, args, Some((pid, sample_s))).await,
            Scenario::Mixed { load, mix, due_in_s } => mixed(load, &mix, due_in_s).await,
            Scenario::Reference { what } => run_reference(what).await,
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("sundial-loadgen: {message}");
            ExitCode::from(2)
        }
    }
}

impl Load {
    /// The plan, or the flag and rule a value breaks.
    fn plan(&self, default_seconds: u64) -> Result<Plan, String> {
        if !(1..=BATCH_MAX).contains(&self.batch) {
            return Err(format!("--batch: must be within 1..={BATCH_MAX} (got {})", self.batch));
        }
        if !(1..=sundial_loadgen::target::HTTP_CONNECTIONS_MAX).contains(&self.connections) {
            return Err(format!("--connections: must be within 1..=1024 (got {})", self.connections));
        }
        if !(1..=sundial_loadgen::drive::IN_FLIGHT_MAX).contains(&self.window) {
            return Err(format!("--window: must be within 1..=100000 (got {})", self.window));
        }
        if !self.max && self.rate == 0 {
            return Err("--rate: must be at least 1 (or give --max)".into());
        }
        let seconds = self.seconds.unwrap_or(default_seconds);
        if seconds == 0 {
            return Err("--seconds: must be at least 1".into());
        }
        Ok(Plan {
            rate_per_s: if self.max { 0 } else { self.rate },
            window: self.window,
            batch: self.batch,
            duration: Duration::from_secs(seconds),
            requests_max: None,
            progress: !self.quiet,
        })
    }

    async fn target(&self) -> Result<Target, String> {
        Target::connect(self.protocol, &self.node, self.connections, self.token.clone()).await
    }

    fn describe(&self, plan: &Plan) -> String {
        let mode = if plan.rate_per_s == 0 {
            format!("max throughput, {} requests in flight", plan.window)
        } else {
            format!("{}/s open loop", plan.rate_per_s)
        };
        format!(
            "{mode}, {} s, batch {}, {} connection(s), {:?} to {}",
            plan.duration.as_secs(),
            plan.batch,
            self.connections,
            self.protocol,
            self.node.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
        )
    }

    /// The fields every results file has.
    fn results(&self, scenario: &str, plan: &Plan, driven: &Driven, target: &Target) -> serde_json::Map<String, Value> {
        let examples: serde_json::Map<String, Value> =
            target.error_examples().into_iter().map(|(status, body)| (status.to_string(), json!(body))).collect();
        let ops: serde_json::Map<String, Value> = driven
            .ops
            .iter()
            .map(|(op, stats)| {
                let statuses: serde_json::Map<String, Value> =
                    stats.statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect();
                (op.to_string(), json!({"ok": stats.ok(), "failed": stats.failed(), "statuses": statuses, "latency_us": table_json(&stats.latencies)}))
            })
            .collect();
        let value = json!({
            "scenario": scenario,
            "protocol": format!("{:?}", self.protocol).to_lowercase(),
            "members": self.node.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "mode": if plan.rate_per_s == 0 { "max" } else { "open_loop" },
            "rate_per_s": plan.rate_per_s, "window": plan.window, "batch": plan.batch,
            "connections": self.connections, "seconds": plan.duration.as_secs(),
            "elapsed_s": driven.elapsed.as_secs_f64(), "requests": driven.requests,
            "ok_per_s": driven.ok_per_s(), "ops": ops, "error_examples": examples,
        });
        value.as_object().cloned().unwrap_or_default()
    }
}

fn table_json(latencies: &Latencies) -> Value {
    Value::Object(latencies.table().into_iter().map(|(k, v)| (k, json!(v))).collect())
}

/// Prints one column per histogram, ms.
fn print_tables(columns: &[(&str, &Latencies)]) {
    let mut header = format!("{:>8}", "");
    for (name, _) in columns {
        header += &format!("  {:>16}", format!("{name} (ms)"));
    }
    println!("{header}");
    let tables: Vec<Vec<(String, u64)>> = columns.iter().map(|(_, l)| l.table()).collect();
    for row in 0..tables.first().map_or(0, Vec::len) {
        let mut line = format!("{:>8}", tables[0][row].0);
        for table in &tables {
            line += &format!("  {:>16.3}", table[row].1 as f64 / 1e3);
        }
        println!("{line}");
    }
}

fn print_ops(driven: &Driven, target: &Target) {
    for (op, stats) in &driven.ops {
        println!("{op}: {} ok, {} failed, statuses {:?}", stats.ok(), stats.failed(), stats.statuses);
    }
    for (status, body) in target.error_examples() {
        println!("  e.g. {status}: {body}");
    }
    println!(
        "{} requests in {:.2} s: {:.0} ok items/s",
        driven.requests,
        driven.elapsed.as_secs_f64(),
        driven.ok_per_s()
    );
}

fn write_json(path: &Option<PathBuf>, results: serde_json::Map<String, Value>) -> Result<(), String> {
    if let Some(path) = path {
        let text = serde_json::to_vec_pretty(&Value::Object(results)).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The plots every scenario makes, plus `extra` percentile columns; returns the files written.
fn write_plots(
    directory: &Option<PathBuf>,
    scenario: &str,
    driven: &Driven,
    extra: &[(&str, &Latencies)],
    extra_timeline: Option<(&str, &Timeline)>,
) -> Result<Vec<PathBuf>, String> {
    let Some(directory) = directory else { return Ok(Vec::new()) };
    std::fs::create_dir_all(directory).map_err(|e| format!("{}: {e}", directory.display()))?;
    let path = |name: &str| directory.join(format!("{scenario}-{name}.svg"));
    let mut written = Vec::new();
    plot::latency_over_time(
        &path("request-latency"),
        &format!("{scenario}: request latency over time"),
        &driven.timeline,
    )?;
    written.push(path("request-latency"));
    plot::throughput_over_time(&path("throughput"), &format!("{scenario}: items per second"), &driven.timeline)?;
    written.push(path("throughput"));
    let mut columns: Vec<(&str, &Latencies)> = driven.ops.iter().map(|(op, s)| (*op, &s.latencies)).collect();
    columns.extend_from_slice(extra);
    plot::percentiles(&path("percentiles"), &format!("{scenario}: latency by percentile"), &columns)?;
    written.push(path("percentiles"));
    if let Some((name, timeline)) = extra_timeline {
        plot::latency_over_time(&path(name), &format!("{scenario}: {name} over time"), timeline)?;
        written.push(path(name));
    }
    Ok(written)
}

fn run_name() -> String {
    format!("lg{:x}", receiver::now_ms())
}

async fn ingest(load: Load, due_in_s: u64) -> Result<bool, String> {
    let plan = load.plan(10)?;
    let target = Arc::new(load.target().await?);
    println!("ingest: {}; jobs due in {due_in_s} s", load.describe(&plan));
    let run = run_name();
    let sample: Arc<Mutex<Vec<String>>> = Arc::default();
    let driven = drive(&plan, |i, intended_ms| {
        let requests: Vec<Value> = (0..plan.batch)
            .map(|j| json!({"id": format!("{run}-{i}-{j}"), "run_at": intended_ms + due_in_s * 1_000, "url": "http://127.0.0.1:9/ingest"}))
            .collect();
        let (target, sample) = (target.clone(), sample.clone());
        async move {
            let first_id = requests[0]["id"].as_str().unwrap_or_default().to_string();
            let statuses = target.create_many(requests).await;
            // Every 64th request's first job is remembered (bounded) to be read back.
            if i % 64 == 0 && (200..300).contains(&statuses[0]) {
                if let Ok(mut sample) = sample.lock() {
                    if sample.len() < VERIFY_SAMPLE_MAX {
                        sample.push(first_id);
                    }
                }
            }
            ("create", statuses)
        }
    })
    .await;
    let sample = sample.lock().map(|s| s.clone()).unwrap_or_default();
    let mut lost = Vec::new();
    for id in &sample {
        if target.get(id).await == 404 {
            lost.push(id.clone());
        }
    }
    print_ops(&driven, &target);
    let creates = driven.ops.get("create").map(|s| &s.latencies);
    if let Some(creates) = creates {
        print_tables(&[("create", creates)]);
    }
    let server_errors = count_status(&driven, |s| s >= 500 && s != 503);
    println!("read back {} acknowledged jobs: {} lost; server errors: {server_errors}", sample.len(), lost.len());
    let pass = lost.is_empty() && server_errors == 0;
    println!("verdict: {}", if pass { "pass" } else { "FAIL" });
    let mut results = load.results("ingest", &plan, &driven, &target);
    results.insert("read_back".into(), json!(sample.len()));
    results.insert("lost".into(), json!(lost));
    results.insert("pass".into(), json!(pass));
    let plots = write_plots(&load.plots, "ingest", &driven, &[], None)?;
    results.insert("plots".into(), json!(plots));
    write_json(&load.json, results)?;
    Ok(pass)
}

fn count_status(driven: &Driven, matches: impl Fn(u16) -> bool) -> u64 {
    driven.ops.values().flat_map(|s| s.statuses.iter()).filter(|(s, _)| matches(**s)).map(|(_, n)| n).sum()
}

async fn fire(load: Load, args: FireArgs, soak: Option<(Vec<u32>, u64)>) -> Result<bool, String> {
    let scenario = if soak.is_some() { "soak" } else { "fire" };
    let mut plan = load.plan(if soak.is_some() { 600 } else { 10 })?;
    let jobs_planned = plan.rate_per_s * plan.duration.as_secs();
    let ahead_start_ms = args.schedule_ahead_ms.map(|ahead_ms| receiver::now_ms() + ahead_ms);
    if ahead_start_ms.is_some() {
        if load.max || args.due_together {
            return Err(
                "--schedule-ahead-ms: give it a --rate (the fires' rate), without --max or --due-together".into()
            );
        }
        // Creates go as fast as the window allows; the rate spaces the due times.
        plan.requests_max = Some(jobs_planned.div_ceil(plan.batch as u64));
        plan.rate_per_s = 0;
    }
    let faults = Faults {
        fail_rate: args.sink_fail_rate,
        throttle_rate: args.sink_throttle_rate,
        retry_after_s: args.sink_retry_after_s,
        delay_ms: args.sink_delay_ms,
    };
    faults.check()?;
    if !(1..=100).contains(&args.max_attempts) {
        return Err(format!("--max-attempts: must be within 1..=100 (got {})", args.max_attempts));
    }
    let options = SinkOptions { faults, secret: args.secret.as_ref().map(|s| s.as_bytes().to_vec()) };
    let (sink_addr, recorded) =
        receiver::start(args.sink, options).await.map_err(|e| format!("--sink {}: {e}", args.sink))?;
    let target = Arc::new(load.target().await?);
    println!(
        "{scenario}: {}; sink {sink_addr}, jobs due {} ms after their send{}",
        load.describe(&plan),
        args.due_after_ms,
        match (args.due_together, args.schedule_ahead_ms) {
            (true, _) => " (all at once, after the last)".to_string(),
            (_, Some(ahead_ms)) =>
                format!(" — no: all created first, due {}/s from {ahead_ms} ms after the start", load.rate),
            _ => String::new(),
        }
    );
    let run = run_name();
    let url = format!("http://{sink_addr}/hook");
    let together_ms = receiver::now_ms() + 50 + plan.duration.as_millis() as u64 + args.due_after_ms;
    let scheduled: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let uncertain: Arc<Mutex<HashSet<String>>> = Arc::default();
    let memory = soak.as_ref().map(|(pids, sample_s)| sample_memory(pids.clone(), *sample_s));
    let driven = drive(&plan, |i, intended_ms| {
        let requests: Vec<Value> = (0..plan.batch)
            .map(|j| {
                let due_ms = match ahead_start_ms {
                    Some(start_ms) => start_ms + (i * plan.batch as u64 + j as u64) * 1_000 / load.rate.max(1),
                    None if args.due_together => together_ms,
                    None => intended_ms + args.due_after_ms,
                };
                let mut request = json!({
                    "id": format!("{run}-{i}-{j}"), "run_at": due_ms, "url": url, "json": {"i": i, "j": j},
                    "retry": {"max_attempts": args.max_attempts, "initial_backoff_ms": 100, "max_backoff_ms": 2_000},
                });
                if let Some(secret) = &args.secret {
                    request["secret"] = json!(secret);
                }
                request
            })
            .collect();
        let (target, scheduled, uncertain) = (target.clone(), scheduled.clone(), uncertain.clone());
        async move {
            let ids: Vec<(String, u64)> = requests
                .iter()
                .map(|r| (r["id"].as_str().unwrap_or_default().to_string(), r["run_at"].as_u64().unwrap_or(0)))
                .collect();
            let statuses = target.create_many(requests).await;
            if let (Ok(mut scheduled), Ok(mut uncertain)) = (scheduled.lock(), uncertain.lock()) {
                for ((id, due_ms), status) in ids.into_iter().zip(&statuses) {
                    match status {
                        200..=299 => {
                            scheduled.insert(id, due_ms);
                        }
                        // No answer, or a server error: the create may have happened.
                        0 | 500.. => {
                            uncertain.insert(id);
                        }
                        _ => {}
                    }
                }
            }
            ("create", statuses)
        }
    })
    .await;
    let scheduled = scheduled.lock().map(|s| s.clone()).unwrap_or_default();
    let uncertain = uncertain.lock().map(|s| s.clone()).unwrap_or_default();
    wait_for_deliveries(&scheduled, &recorded, Duration::from_secs(args.grace_seconds)).await;
    let memory_samples = match memory {
        Some((task, samples)) => {
            task.abort();
            samples.lock().map(|s| s.clone()).unwrap_or_default()
        }
        None => Vec::new(),
    };
    let deliveries = recorded.lock().map(|r| r.deliveries.clone()).unwrap_or_default();
    let report = sink::account(&scheduled, &uncertain, &deliveries, args.early_margin_ms);
    let mut lateness = Latencies::new();
    for ms in &report.lateness_ms {
        lateness.record_us(ms * 1_000);
    }
    let lateness_timeline = lateness_over_time(&scheduled, &deliveries, plan.duration);
    print_ops(&driven, &target);
    let empty = Latencies::new();
    let creates = driven.ops.get("create").map_or(&empty, |s| &s.latencies);
    print_tables(&[("create", creates), ("lateness", &lateness)]);
    println!(
        "acknowledged {}; delivered {} ({:.0}/s), missing {}, duplicates {} ({} with another key), early {}, unexpected {}, attempts {} ({} refused by the sink), bad signatures {}; creates without a definite answer {} ({} of them delivered)",
        report.scheduled, report.delivered, report.delivery_rate_per_s, report.missing, report.duplicates,
        report.duplicates_with_another_key, report.early, report.unexpected, report.attempts, report.refused_by_sink, report.bad_signatures,
        uncertain.len(), report.uncertain_delivered
    );
    if !report.missing_examples.is_empty() {
        println!("missing, e.g.: {}", report.missing_examples.join(", "));
    }
    let mut results = load.results(scenario, &plan, &driven, &target);
    if soak.is_some() {
        let drift = drift(&lateness_timeline);
        println!("lateness p99 drift (first tenth → last tenth): {drift}");
        let rss: Vec<Value> =
            memory_samples.iter().map(|(t, pid, kib)| json!({"s": t, "pid": pid, "rss_kib": kib})).collect();
        if let (Some(first), Some(last)) = (memory_samples.first(), memory_samples.last()) {
            println!("resident memory: {} MiB at the start, {} MiB at the end", first.2 / 1024, last.2 / 1024);
        }
        results.insert("lateness_p99_drift".into(), drift);
        results.insert("memory_samples".into(), json!(rss));
    }
    let pass = report.passes();
    println!("verdict: {}", if pass { "pass" } else { "FAIL" });
    results.extend(
        json!({
            "due_after_ms": args.due_after_ms, "due_together": args.due_together,
            "schedule_ahead_ms": args.schedule_ahead_ms, "fires_due_per_s": args.schedule_ahead_ms.map(|_| load.rate),
            "sink": {"fail_rate": faults.fail_rate, "throttle_rate": faults.throttle_rate, "delay_ms": faults.delay_ms, "signatures_checked": args.secret.is_some()},
            "acknowledged": report.scheduled, "delivered": report.delivered, "missing": report.missing,
            "missing_examples": report.missing_examples, "duplicates": report.duplicates,
            "duplicates_with_another_key": report.duplicates_with_another_key, "early": report.early,
            "unexpected": report.unexpected, "uncertain_creates": uncertain.len(),
            "uncertain_delivered": report.uncertain_delivered, "attempts": report.attempts, "refused_by_sink": report.refused_by_sink,
            "bad_signatures": report.bad_signatures, "deliveries_per_s": report.delivery_rate_per_s,
            "fire_lateness_us": table_json(&lateness), "pass": pass,
        })
        .as_object()
        .cloned()
        .unwrap_or_default(),
    );
    let plots = write_plots(
        &load.plots,
        scenario,
        &driven,
        &[("fire lateness", &lateness)],
        Some(("lateness", &lateness_timeline)),
    )?;
    results.insert("plots".into(), json!(plots));
    write_json(&load.json, results)?;
    Ok(pass)
}

/// Waits until every scheduled job has an accepted delivery; or, after the last due time,
/// until `grace` passes with no new delivery (an overloaded target is slow, not lossy, as
/// long as deliveries keep coming); and never longer than `WAIT_MAX` after the last due time.
async fn wait_for_deliveries(scheduled: &HashMap<String, u64>, recorded: &Mutex<receiver::Recorded>, grace: Duration) {
    const WAIT_MAX: Duration = Duration::from_secs(20 * 60);
    let last_due = scheduled.values().copied().max().unwrap_or(0);
    let due_over = Instant::now() + Duration::from_millis(last_due.saturating_sub(receiver::now_ms()));
    let (mut seen, mut last_progress) = (0, Instant::now());
    // Bounded by WAIT_MAX.
    while Instant::now() < due_over + WAIT_MAX {
        let (count, all_there) = recorded
            .lock()
            .map(|r| {
                let accepted: HashSet<&str> =
                    r.deliveries.iter().filter(|d| (200..300).contains(&d.status)).map(|d| d.job_id.as_str()).collect();
                (r.deliveries.len(), scheduled.keys().all(|id| accepted.contains(id.as_str())))
            })
            .unwrap_or((0, false));
        if all_there {
            break;
        }
        if count > seen {
            (seen, last_progress) = (count, Instant::now());
        }
        if Instant::now() > due_over + grace && last_progress.elapsed() > grace {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // room for a late duplicate
}

/// Each job's first-attempt lateness, placed at its due time within the run.
fn lateness_over_time(scheduled: &HashMap<String, u64>, deliveries: &[sink::Delivery], run: Duration) -> Timeline {
    let mut first: HashMap<&str, u64> = HashMap::new();
    for delivery in deliveries {
        let at = first.entry(delivery.job_id.as_str()).or_insert(delivery.received_ms);
        *at = (*at).min(delivery.received_ms);
    }
    let start_ms = scheduled.values().copied().min().unwrap_or(0);
    let mut timeline = Timeline::new(run + Duration::from_secs(5));
    for (id, due_ms) in scheduled {
        if let Some(received_ms) = first.get(id.as_str()) {
            let lateness_us = received_ms.saturating_sub(*due_ms) * 1_000;
            timeline.record(Duration::from_millis(due_ms - start_ms), lateness_us, true);
        }
    }
    timeline
}

/// p99 lateness over the first and the last tenth of the windows that saw fires.
fn drift(timeline: &Timeline) -> Value {
    let points = timeline.points();
    let tenth = (points.len() / 10).max(1);
    let p99 = |windows: &[(f64, &sundial_loadgen::timeline::Window)]| {
        let mut merged = Latencies::new();
        for (_, window) in windows {
            for value in window.latencies.iter_recorded() {
                for _ in 0..value.count_at_value() {
                    merged.record_us(value.value_iterated_to());
                }
            }
        }
        merged.at_us(0.99)
    };
    if points.is_empty() {
        return json!(null);
    }
    let (first_us, last_us) = (p99(&points[..tenth]), p99(&points[points.len() - tenth..]));
    json!({"first_p99_us": first_us, "last_p99_us": last_us, "ratio": last_us as f64 / first_us.max(1) as f64})
}

type MemorySamples = Arc<Mutex<Vec<(u64, u32, u64)>>>;

/// Samples each pid's VmRSS every `every_s` seconds: (seconds into the run, pid, KiB).
fn sample_memory(pids: Vec<u32>, every_s: u64) -> (tokio::task::JoinHandle<()>, MemorySamples) {
    let samples: MemorySamples = Arc::default();
    let kept = samples.clone();
    let start = Instant::now();
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(every_s.max(1)));
        // Bounded: aborted when the run ends; at most one sample per pid per tick.
        loop {
            ticker.tick().await;
            for pid in &pids {
                if let Some(kib) = resident_kib(*pid) {
                    if let Ok(mut samples) = kept.lock() {
                        if samples.len() < 100_000 {
                            samples.push((start.elapsed().as_secs(), *pid, kib));
                        }
                    }
                }
            }
        }
    });
    (task, samples)
}

fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The operations a `mixed` run draws from, by weight: "create=6,get=3,cancel=1".
fn parse_mix(text: &str) -> Result<Vec<(&'static str, u64)>, String> {
    let mut mix = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let Some((name, weight)) = part.split_once('=') else {
            return Err(format!("--mix: {part:?} is not op=weight"));
        };
        let op = match name.trim() {
            "create" => "create",
            "get" => "get",
            "cancel" => "cancel",
            other => return Err(format!("--mix: unknown operation {other:?} (create, get, cancel)")),
        };
        let weight: u64 = weight.trim().parse().map_err(|_| format!("--mix: weight of {op} must be a whole number"))?;
        mix.push((op, weight));
    }
    if mix.iter().all(|(op, w)| *op != "create" || *w == 0) {
        return Err("--mix: needs a create weight above 0 (gets and cancels act on created jobs)".into());
    }
    Ok(mix)
}

async fn mixed(load: Load, mix: &str, due_in_s: u64) -> Result<bool, String> {
    let plan = load.plan(10)?;
    let mix = parse_mix(mix)?;
    let total: u64 = mix.iter().map(|(_, w)| w).sum();
    let target = Arc::new(load.target().await?);
    println!("mixed ({mix:?}): {}", load.describe(&plan));
    let run = run_name();
    let live: Arc<Mutex<Vec<String>>> = Arc::default();
    let driven = drive(&plan, |i, intended_ms| {
        // A fixed spread over the weights (Weyl sequence), the same for every run.
        let mut draw = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % total.max(1);
        let mut op = "create";
        for (name, weight) in &mix {
            if draw < *weight {
                op = name;
                break;
            }
            draw -= weight;
        }
        let existing = match op {
            "create" => None,
            _ => live.lock().ok().and_then(|mut live| {
                if live.is_empty() {
                    return None;
                }
                let at = (i.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 17) as usize % live.len();
                Some(if op == "cancel" { live.swap_remove(at) } else { live[at].clone() })
            }),
        };
        let (target, live, run) = (target.clone(), live.clone(), run.clone());
        let batch = plan.batch;
        async move {
            match (op, existing) {
                ("get", Some(id)) => ("get", vec![target.get(&id).await]),
                ("cancel", Some(id)) => ("cancel", vec![target.cancel(&id).await]),
                _ => {
                    let ids: Vec<String> = (0..batch).map(|j| format!("{run}-{i}-{j}")).collect();
                    let requests = ids
                        .iter()
                        .map(|id| json!({"id": id, "run_at": intended_ms + due_in_s * 1_000, "url": "http://127.0.0.1:9/mixed"}))
                        .collect();
                    let statuses = target.create_many(requests).await;
                    if let Ok(mut live) = live.lock() {
                        for (id, status) in ids.into_iter().zip(&statuses) {
                            if (200..300).contains(status) && live.len() < MIXED_IDS_MAX {
                                live.push(id);
                            }
                        }
                    }
                    ("create", statuses)
                }
            }
        }
    })
    .await;
    print_ops(&driven, &target);
    let columns: Vec<(&str, &Latencies)> = driven.ops.iter().map(|(op, s)| (*op, &s.latencies)).collect();
    print_tables(&columns);
    let lost: u64 = ["get", "cancel"]
        .iter()
        .filter_map(|op| driven.ops.get(op))
        .map(|s| s.statuses.get(&404).copied().unwrap_or(0))
        .sum();
    let server_errors = count_status(&driven, |s| s >= 500 && s != 503);
    println!("acknowledged jobs answered 404: {lost}; server errors: {server_errors}");
    let pass = lost == 0 && server_errors == 0;
    println!("verdict: {}", if pass { "pass" } else { "FAIL" });
    let mut results = load.results("mixed", &plan, &driven, &target);
    results.insert(
        "mix".into(),
        json!(mix.iter().map(|(op, w)| (op.to_string(), json!(w))).collect::<serde_json::Map<_, _>>()),
    );
    results.insert("lost".into(), json!(lost));
    results.insert("pass".into(), json!(pass));
    let plots = write_plots(&load.plots, "mixed", &driven, &[], None)?;
    results.insert("plots".into(), json!(plots));
    write_json(&load.json, results)?;
    Ok(pass)
}

async fn run_reference(what: ReferenceKind) -> Result<bool, String> {
    let (result, json_path) = match what {
        ReferenceKind::Disk { dir, record_bytes, batch, seconds, json } => {
            if !(1..=1 << 20).contains(&record_bytes) || !(1..=4_096).contains(&batch) {
                return Err("--record-bytes: 1..=1048576 and --batch: 1..=4096".into());
            }
            let measured = tokio::task::spawn_blocking(move || {
                reference::disk(&dir, record_bytes, batch, Duration::from_secs(seconds.max(1)))
            })
            .await
            .map_err(|e| e.to_string())??;
            println!(
                "disk: {:.0} fdatasyncs/s, {:.0} records/s of {record_bytes} B in batches of {batch}",
                measured["fdatasyncs_per_s"].as_f64().unwrap_or(0.0),
                measured["records_per_s"].as_f64().unwrap_or(0.0)
            );
            (measured, json)
        }
        ReferenceKind::Loopback { connections, seconds, json } => {
            if !(1..=sundial_loadgen::target::HTTP_CONNECTIONS_MAX).contains(&connections) {
                return Err(format!("--connections: must be within 1..=1024 (got {connections})"));
            }
            let measured = reference::loopback(connections, Duration::from_secs(seconds.max(1))).await?;
            println!(
                "loopback: {:.0} HTTP POSTs/s over {connections} connections, round trip p50 {} µs, p99 {} µs",
                measured["posts_per_s"].as_f64().unwrap_or(0.0),
                measured["round_trip_us"]["p50"],
                measured["round_trip_us"]["p99"]
            );
            (measured, json)
        }
    };
    write_json(&json_path, result.as_object().cloned().unwrap_or_default())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_names_its_operations_and_refuses_what_it_cannot_do() {
        assert_eq!(parse_mix("create=6,get=3,cancel=1").unwrap(), [("create", 6), ("get", 3), ("cancel", 1)]);
        assert!(parse_mix("get=1").unwrap_err().contains("create weight"));
        assert!(parse_mix("create=1,delete=1").unwrap_err().contains("unknown operation"));
        assert!(parse_mix("create=x").unwrap_err().contains("whole number"));
    }

    #[test]
    fn bad_load_settings_name_the_flag() {
        let load = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["sundial-loadgen", "ingest"][..], args].concat()).expect("parses");
            let Scenario::Ingest { load, .. } = cli.scenario else { unreachable!() };
            load.plan(10)
        };
        assert!(load(&["--batch", "0"]).unwrap_err().contains("--batch"));
        assert!(load(&["--batch", "1001"]).unwrap_err().contains("--batch"));
        assert!(load(&["--connections", "0"]).unwrap_err().contains("--connections"));
        assert!(load(&["--rate", "0"]).unwrap_err().contains("--rate"));
        assert_eq!(load(&["--rate", "0", "--max"]).unwrap().rate_per_s, 0);
        assert_eq!(load(&[]).unwrap().duration, Duration::from_secs(10));
    }
}
