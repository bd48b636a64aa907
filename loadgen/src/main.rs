//! `sundial-loadgen`: runs a scenario against a node (or any member of a cluster) over the
//! binary protocol, prints a percentile table and a verdict, and exits 1 when the run broke
//! the contract (a job lost, early, or repeated with another key).

use clap::Parser;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sundial_loadgen::histogram::Latencies;
use sundial_loadgen::open_loop::{latency_from_intended, Pace};
use sundial_loadgen::{receiver, sink};

#[derive(Parser, Debug)]
#[command(name = "sundial-loadgen", version, about = "Load and accounting for Sundial")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Subcommand, Debug)]
enum Scenario {
    /// Jobs due shortly after creation, at a steady open-loop rate, delivered to the
    /// built-in sink: create latency (from each intended send time) and fire lateness
    /// (arrival − due time), and whether every job arrived once, none early.
    Fire(FireArgs),
}

#[derive(clap::Args, Debug)]
struct FireArgs {
    /// The node's binary-protocol address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    node: SocketAddr,
    /// Creates per second (open loop).
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// How long to create for, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Each job is due this long after its intended creation time, ms.
    #[arg(long, default_value_t = 1_000)]
    due_after_ms: u64,
    /// Where the sink listens (the node must be allowed to call it: --allow-loopback-targets).
    #[arg(long, default_value = "127.0.0.1:0")]
    sink: SocketAddr,
    /// How long to wait for the last deliveries after the last job is due, seconds.
    #[arg(long, default_value_t = 30)]
    grace_seconds: u64,
    /// A delivery this much before its due time still counts as on time (clock granularity), ms.
    #[arg(long, default_value_t = 0)]
    early_margin_ms: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Bearer token.
    #[arg(long, env = "SUNDIAL_TOKEN")]
    token: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sundial-loadgen: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Scenario::Fire(args) = cli.scenario;
    match runtime.block_on(fire(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("sundial-loadgen: {message}");
            ExitCode::from(2)
        }
    }
}

async fn fire(args: FireArgs) -> Result<bool, String> {
    let (sink_addr, recorded) = receiver::start(args.sink).await.map_err(|e| format!("sink {}: {e}", args.sink))?;
    let options = sundial_net::ClientOptions { token: args.token.clone(), ..Default::default() };
    let client = Arc::new(sundial_net::Client::connect(args.node, options).await.map_err(|e| e.to_string())?);
    let run = format!("lg{:x}", receiver::now_ms());
    let pace = Pace::new(Instant::now() + Duration::from_millis(100), args.rate);
    let count = pace.count(Duration::from_secs(args.seconds));
    let wall_start_ms = receiver::now_ms() + 100;
    let creates = Arc::new(Mutex::new(Latencies::new()));
    let scheduled: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let refused = Arc::new(Mutex::new(HashMap::<u16, u64>::new()));
    let mut tasks = Vec::with_capacity(count as usize);
    println!(
        "fire: {count} jobs at {}/s to {} (sink {sink_addr}), each due {} ms after its send",
        args.rate, args.node, args.due_after_ms
    );
    for i in 0..count {
        let intended = pace.intended(i);
        tokio::time::sleep_until(intended.into()).await;
        let intended_ms = wall_start_ms + (intended - pace.start).as_millis() as u64;
        let due_ms = intended_ms + args.due_after_ms;
        let id = format!("{run}-{i}");
        let request = json!({"id": id, "run_at": due_ms, "url": format!("http://{sink_addr}/hook"), "json": {"i": i}});
        let (client, creates, scheduled, refused) =
            (client.clone(), creates.clone(), scheduled.clone(), refused.clone());
        // Each create on its own task: a slow answer never delays the next send.
        tasks.push(tokio::spawn(async move {
            let outcome = client.create(&request).await;
            let latency = latency_from_intended(intended, Instant::now());
            match outcome {
                Ok(item) if item.status == 201 || item.status == 200 => {
                    if let Ok(mut c) = creates.lock() {
                        c.record_us(latency.as_micros() as u64);
                    }
                    if let Ok(mut s) = scheduled.lock() {
                        s.insert(id, due_ms);
                    }
                }
                Ok(item) => *refused.lock().unwrap_or_else(|p| p.into_inner()).entry(item.status).or_default() += 1,
                Err(_) => *refused.lock().unwrap_or_else(|p| p.into_inner()).entry(0).or_default() += 1,
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let scheduled = scheduled.lock().map(|s| s.clone()).unwrap_or_default();
    let last_due = scheduled.values().copied().max().unwrap_or(0);
    let deadline = Instant::now()
        + Duration::from_millis(last_due.saturating_sub(receiver::now_ms()))
        + Duration::from_secs(args.grace_seconds);
    // Bounded by the deadline: waits for the last deliveries.
    while Instant::now() < deadline {
        let delivered: std::collections::HashSet<String> =
            recorded.lock().map(|r| r.deliveries.iter().map(|d| d.job_id.clone()).collect()).unwrap_or_default();
        if scheduled.keys().all(|id| delivered.contains(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // room for a late duplicate
    let deliveries = recorded.lock().map(|r| r.deliveries.clone()).unwrap_or_default();
    let report = sink::account(&scheduled, &deliveries, args.early_margin_ms);
    let mut lateness = Latencies::new();
    for ms in &report.lateness_ms {
        lateness.record_us(ms * 1_000);
    }
    let creates = creates.lock().map_err(|_| "a create task panicked".to_string())?;
    let refused = refused.lock().map(|r| r.clone()).unwrap_or_default();
    println!("{:>8}  {:>14}  {:>14}", "", "create (ms)", "lateness (ms)");
    for ((label, create_us), (_, late_us)) in creates.table().into_iter().zip(lateness.table()) {
        println!("{label:>8}  {:>14.3}  {:>14.3}", create_us as f64 / 1e3, late_us as f64 / 1e3);
    }
    println!(
        "acknowledged {} of {count} (refused: {refused:?}); delivered {}, missing {}, duplicates {} ({} with another key), early {}, unexpected {}",
        report.scheduled, report.delivered, report.missing, report.duplicates, report.duplicates_with_another_key, report.early, report.unexpected
    );
    if !report.missing_examples.is_empty() {
        println!("missing, e.g.: {}", report.missing_examples.join(", "));
    }
    let verdict = report.passes();
    println!("verdict: {}", if verdict { "pass" } else { "FAIL" });
    if let Some(path) = &args.json {
        let table =
            |l: &Latencies| l.table().into_iter().map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<_, _>>();
        let results = json!({
            "scenario": "fire", "node": args.node.to_string(), "rate_per_s": args.rate, "seconds": args.seconds,
            "attempted": count, "acknowledged": report.scheduled,
            "refused": refused.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "delivered": report.delivered, "missing": report.missing, "duplicates": report.duplicates,
            "duplicates_with_another_key": report.duplicates_with_another_key, "early": report.early,
            "create_latency_us": table(&creates), "fire_lateness_us": table(&lateness), "pass": verdict,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&results).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(verdict)
}
