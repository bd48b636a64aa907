//! One run, start to verdict: prerequisites, receiver, cluster, the nemesis plan carried out
//! while the workload runs, a drain for owed fires, then the checker and the run directory
//! (history, deliveries, node logs, results.json, report.md, timeline.svg).

use crate::checker::deliveries::Received;
use crate::checker::{self, Bounds, Verdict};
use crate::cli::{RunArgs, Settings};
use crate::cluster::{self, Cluster, ClusterOptions};
use crate::faults::Nemesis;
use crate::firewall::Firewall;
use crate::history::{self, Call, Event, Kind, Recorder};
use crate::nemesis::{self, PlanOptions};
use crate::now_us;
use crate::report::{self, Happened};
use crate::workload::{self, WorkloadOptions};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `sundial` binary to run: the flag, else next to this executable, else the usual build folders.
fn find_binary(flag: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(path) = flag {
        return Ok(path);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("sundial"));
        }
    }
    candidates.push(PathBuf::from("target/release/sundial"));
    candidates.push(PathBuf::from("target/debug/sundial"));
    candidates.into_iter().find(|c| c.is_file()).ok_or_else(|| {
        "--binary: no sundial binary found next to sundial-jepsen or in target/; build it with `cargo build -p sundial-node`"
            .to_string()
    })
}

/// Faults as they happened, from the history's nemesis events.
/// (Each nemesis timeline is its own process, so a heal pairs with its own timeline's fault.)
fn happened(events: &[Event]) -> Vec<Happened> {
    let mut faults: Vec<Happened> = Vec::new();
    let mut open: std::collections::HashMap<&str, usize> = Default::default();
    for event in events.iter().filter(|e| e.f == Call::Nemesis) {
        match event.kind {
            Kind::Invoke => {
                open.insert(&event.process, faults.len());
                faults.push(Happened {
                    start_us: event.time_us,
                    end_us: event.time_us,
                    detail: event.value.clone(),
                    error: event.error.clone(),
                });
            }
            _ => {
                if let Some(fault) = open.remove(event.process.as_str()).and_then(|i| faults.get_mut(i)) {
                    fault.end_us = event.time_us;
                    if event.error.is_some() {
                        fault.error = event.error.clone();
                    }
                }
            }
        }
    }
    faults
}

/// The command that replays this run's plan and workload: the main flags, and every other
/// setting that differs from its default.
fn command_line(settings: &Settings) -> String {
    let mut line = format!(
        "sundial-jepsen run --nodes {} --time {}s --nemesis {} --rate {} --seed {}",
        settings.nodes,
        settings.run_ms / 1_000,
        if settings.kinds.is_empty() { "none".to_string() } else { settings.kinds.join(",") },
        settings.rate,
        settings.seed
    );
    let mut differs = |flag: &str, value: u64, default: u64, unit: &str| {
        if value != default {
            line.push_str(&format!(" --{flag} {value}{unit}"));
        }
    };
    differs("concurrency", settings.concurrency, 10, "");
    differs("partitions", u64::from(settings.partitions), 8, "");
    differs("recovery-bound", settings.recovery_bound_ms, 20_000, "ms");
    differs("clock-offset-max", settings.clock_offset_max_ms, 2_000, "ms");
    differs("timeout", settings.timeout_ms, 3_000, "ms");
    if settings.receiver_fail_rate != 0.1 {
        line.push_str(&format!(" --receiver-fail-rate {}", settings.receiver_fail_rate));
    }
    line
}

/// Nodes that exited on their own: what the no-crashes property lists.
#[derive(Default)]
struct Crashes {
    list: Vec<String>,
    /// When each node was last restarted after a crash: one that keeps failing is restarted
    /// at most every `CRASH_RESTART_EVERY_US` (and each exit listed), not in a tight loop.
    restarted_us: std::collections::BTreeMap<u8, u64>,
}

const CRASH_RESTART_EVERY_US: u64 = 5_000_000;

/// Sleeps until `until_us`, restarting (and listing) nodes that exit on their own meanwhile.
async fn wait_watching(until_us: u64, cluster: &mut Cluster, crashes: &mut Crashes) {
    loop {
        let now = now_us();
        for (id, status) in cluster.exited() {
            crashes
                .list
                .push(format!("node {id} exited on its own ({status}) at {} ms; see node-{id}.log", now / 1_000));
        }
        for node in 1..=cluster.nodes.len() as u8 {
            // Down without the nemesis having killed it: it crashed.
            let crashed = !cluster.node(node).running() && !cluster.node(node).killed();
            let due = crashes.restarted_us.get(&node).is_none_or(|&at| now >= at + CRASH_RESTART_EVERY_US);
            if crashed && due {
                crashes.restarted_us.insert(node, now);
                let _ = cluster.restart(node);
            }
        }
        let now = now_us();
        if now >= until_us {
            return;
        }
        tokio::time::sleep(Duration::from_micros((until_us - now).min(250_000))).await;
    }
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

pub async fn run(args: RunArgs) -> Result<bool, String> {
    let settings = args.settings(now_us() % 1_000_000_007)?;
    let binary = find_binary(args.binary.clone())?;
    let firewall = if settings.kinds.iter().any(|k| k == "partition") { Some(Firewall::new()?) } else { None };
    let faketime = if settings.kinds.iter().any(|k| k == "clock") {
        Some(cluster::libfaketime().ok_or("the clock nemesis needs libfaketime: apt-get install -y faketime")?)
    } else {
        None
    };
    let dir = args.out.join(format!("{}-seed-{}", now_us() / 1_000_000, settings.seed));
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&dir).map_err(|e| format!("--out: {}: {e}", dir.display()))?;
    println!("sundial-jepsen: {} → {}", command_line(&settings), dir.display());

    let recorder = Recorder::default();
    // The receiver fails a share of attempts, so retries (and their keys) are exercised too,
    // and refuses what a deposed leader sent, as a receiver that uses fencing tokens does.
    let receiver_options = sundial_loadgen::receiver::SinkOptions {
        faults: sundial_loadgen::faults::Faults { fail_rate: settings.receiver_fail_rate, ..Default::default() },
        secret: None,
        fencing: true,
    };
    let (receiver, recorded) = sundial_loadgen::receiver::start(([127, 0, 0, 1], 0).into(), receiver_options)
        .await
        .map_err(|e| format!("receiver: {e}"))?;
    let mut cluster = Cluster::start(ClusterOptions {
        binary,
        nodes: settings.nodes,
        partitions: settings.partitions,
        address_base: args.address_base,
        log_dir: dir.clone(),
        data_dir: data_dir.clone(),
        faketime,
    })?;
    cluster.wait_ready(Duration::from_secs(60)).await?;

    let windows = nemesis::plan(&PlanOptions {
        seed: settings.seed,
        kinds: settings.kinds.clone(),
        nodes: settings.nodes,
        run_ms: settings.run_ms,
        clock_offset_max_ms: settings.clock_offset_max_ms,
        recovery_bound_ms: settings.recovery_bound_ms,
    });
    let start_us = now_us();
    let end_us = start_us + settings.run_ms * 1_000;
    let workload = tokio::spawn(workload::run(
        WorkloadOptions {
            seed: settings.seed,
            rate_per_s: settings.rate,
            concurrency: settings.concurrency,
            start_us,
            end_us,
            receiver_url: format!("http://{receiver}/hook"),
            nodes: cluster.nodes.iter().map(|n| (n.id, n.http)).collect(),
            timeout: Duration::from_millis(settings.timeout_ms),
        },
        recorder.clone(),
    ));
    let mut nemesis = Nemesis::new(firewall, settings.seed, recorder.clone());
    let mut crashes = Crashes::default();
    let mut run_error = None;
    let mut healed_us = start_us;
    // Opens and heals in time order (windows of the two timelines may overlap); at equal
    // times a heal goes first.
    let mut steps: Vec<(u64, bool, usize)> =
        windows.iter().enumerate().flat_map(|(i, w)| [(w.start_ms, true, i), (w.end_ms, false, i)]).collect();
    steps.sort_unstable();
    let mut applied: Vec<Option<crate::faults::Applied>> = vec![None; windows.len()];
    for (at_ms, opens, i) in steps {
        wait_watching(start_us + at_ms * 1_000, &mut cluster, &mut crashes).await;
        let window = &windows[i];
        if opens {
            println!("  {:>6.1} s  {}", at_ms as f64 / 1e3, serde_json::to_string(&window.fault).unwrap_or_default());
            match nemesis.open(&mut cluster, window).await {
                Ok(done) => applied[i] = Some(done),
                Err(e) => {
                    run_error = Some(format!("a fault could not be injected: {e}"));
                    break;
                }
            }
        } else if let Some(done) = applied[i].take() {
            if let Err(e) = nemesis.heal(&mut cluster, done) {
                run_error = Some(format!("healing a fault failed: {e}"));
                break;
            }
            healed_us = now_us();
        }
    }
    // A run that stopped early still heals what it opened.
    for done in applied.into_iter().flatten() {
        let _ = nemesis.heal(&mut cluster, done);
    }
    wait_watching(end_us, &mut cluster, &mut crashes).await;
    let _ = workload.await;
    if let Err(e) = cluster.heal_all() {
        run_error.get_or_insert(e);
    }
    drop(nemesis); // removes the partition rules

    // Drain: wait for owed fires until none is missing or the drain time is up.
    let bounds = Bounds {
        margin_ms: nemesis::forward_offset_max_ms(&windows),
        clock_offset_abs_max_ms: nemesis::offset_abs_max_ms(&windows),
        healed_us,
        recovery_bound_ms: settings.recovery_bound_ms,
    };
    let drain_until_us = now_us() + settings.drain_ms * 1_000;
    let received = |recorded: &std::sync::Mutex<sundial_loadgen::receiver::Recorded>| -> Vec<Received> {
        recorded
            .lock()
            .map(|r| {
                r.deliveries
                    .iter()
                    .map(|d| Received {
                        job: d.job_id.clone(),
                        key: d.idempotency_key.clone(),
                        attempt: d.attempt,
                        received_us: d.received_us,
                        status: d.status,
                        fencing_token: d.fencing_token,
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let operations = history::operations(&recorder.snapshot());
    loop {
        let lost = checker::deliveries::check(&operations, &received(&recorded), &bounds)
            .into_iter()
            .find(|p| p.name == "lost")
            .and_then(|p| p.counts.get("lost").copied())
            .unwrap_or(0);
        if lost == 0 || now_us() >= drain_until_us {
            break;
        }
        wait_watching((now_us() + 1_000_000).min(drain_until_us), &mut cluster, &mut crashes).await;
    }
    // Late duplicates of the last fires still count: a moment more, then stop the nodes.
    wait_watching(now_us() + 2_000_000, &mut cluster, &mut crashes).await;
    drop(cluster);

    let events = recorder.snapshot();
    let deliveries = received(&recorded);
    let operations = history::operations(&events);
    let verdict = checker::check(&operations, &deliveries, &bounds, &crashes.list);
    let faults = happened(&events);
    let results = json!({
        "valid": verdict.valid && run_error.is_none(),
        "command": command_line(&settings),
        "seed": settings.seed,
        "nodes": settings.nodes,
        "run_ms": settings.run_ms,
        "rate": settings.rate,
        "concurrency": settings.concurrency,
        "nemesis": settings.kinds,
        "start_us": start_us,
        "end_us": end_us,
        "bounds": bounds,
        "run_error": run_error,
        "crashes": crashes.list,
        "properties": verdict.properties,
        "operations": report::counts(&operations),
        "latency_ms": report::latencies(&operations),
        "plan": windows,
        "faults": faults,
        "deliveries": deliveries.len(),
        "events": events.len(),
    });
    history::write_jsonl(&dir.join("history.jsonl"), &events).map_err(|e| format!("history.jsonl: {e}"))?;
    write_deliveries(&dir.join("deliveries.jsonl"), &deliveries)?;
    write(&dir.join("results.json"), &serde_json::to_string_pretty(&results).unwrap_or_default())?;
    write(&dir.join("report.md"), &report::markdown(&results, &verdict, &faults, start_us, run_error.as_deref()))?;
    let last_us = deliveries.iter().map(|d| d.received_us).chain([end_us]).max().unwrap_or(end_us);
    write(&dir.join("timeline.svg"), &report::timeline_svg(&operations, &faults, &deliveries, start_us, last_us))?;
    print_verdict(&verdict);
    if verdict.valid && run_error.is_none() && !args.keep_data {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    println!("sundial-jepsen: report in {}", dir.join("report.md").display());
    match run_error {
        Some(e) => Err(e),
        None => Ok(verdict.valid),
    }
}

fn write_deliveries(path: &Path, deliveries: &[Received]) -> Result<(), String> {
    let mut text = String::new();
    for delivery in deliveries {
        text.push_str(&serde_json::to_string(delivery).unwrap_or_default());
        text.push('\n');
    }
    write(path, &text)
}

fn print_verdict(verdict: &Verdict) {
    for property in &verdict.properties {
        println!("  {:<6} {:<13} {}", if property.valid { "ok" } else { "FAILED" }, property.name, property.summary);
        for example in property.examples.iter().take(3) {
            println!("           e.g. {example}");
        }
    }
    println!("sundial-jepsen: {}", if verdict.valid { "valid" } else { "INVALID" });
}

/// Checks a stored run again; `Ok(valid)`.
pub fn check_stored(dir: &Path) -> Result<bool, String> {
    let events = history::read_jsonl(&dir.join("history.jsonl"))?;
    let text = std::fs::read_to_string(dir.join("deliveries.jsonl")).map_err(|e| format!("deliveries.jsonl: {e}"))?;
    let deliveries: Vec<Received> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("deliveries.jsonl: {e}")))
        .collect::<Result<_, _>>()?;
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("results.json")).map_err(|e| format!("results.json: {e}"))?,
    )
    .map_err(|e| format!("results.json: {e}"))?;
    let field = |name: &str| results["bounds"][name].as_u64().ok_or(format!("results.json: bounds.{name} is missing"));
    let bounds = Bounds {
        margin_ms: field("margin_ms")?,
        // Runs stored before the field existed: the plan's clock offsets give it.
        clock_offset_abs_max_ms: field("clock_offset_abs_max_ms").unwrap_or_else(|_| {
            let plan = results["plan"].as_array().cloned().unwrap_or_default();
            plan.iter().filter_map(|w| w["offset_ms"].as_i64()).map(i64::unsigned_abs).max().unwrap_or(0)
        }),
        healed_us: field("healed_us")?,
        recovery_bound_ms: field("recovery_bound_ms")?,
    };
    let crashes: Vec<String> = serde_json::from_value(results["crashes"].clone()).unwrap_or_default();
    let verdict = checker::check(&history::operations(&events), &deliveries, &bounds, &crashes);
    print_verdict(&verdict);
    if let Some(error) = results["run_error"].as_str() {
        println!("sundial-jepsen: the run itself failed ({error}): not a valid verdict");
        return Ok(false);
    }
    Ok(verdict.valid)
}
