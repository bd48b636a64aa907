//! `fire` and `soak`: jobs delivered to the built-in sink; create latency, fire lateness,
//! deliveries per second and the sink's accounting; `soak` also samples resident memory and
//! reports the drift of lateness from the first to the last tenth of the run.

use super::run_name;
use crate::cli::{FireArgs, Load};
use crate::drive::drive;
use crate::faults::Faults;
use crate::histogram::Latencies;
use crate::receiver::{self, SinkOptions};
use crate::report::{finish, print_ops, print_tables, table_json};
use crate::sink;
use crate::timeline::Timeline;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub async fn fire(load: Load, args: FireArgs, soak: Option<(Vec<u32>, u64)>) -> Result<bool, String> {
    let scenario = if soak.is_some() { "soak" } else { "fire" };
    let mut plan = load.plan(if soak.is_some() { 600 } else { 10 })?;
    let jobs_planned = plan.rate_per_s.saturating_mul(plan.duration.as_secs());
    if jobs_planned > receiver::DELIVERIES_MAX as u64 / 2 {
        // Every job's id and delivery are kept for the accounting: the run must fit the sink.
        return Err(format!(
            "--rate × --seconds: at most {} jobs per run (got {jobs_planned})",
            receiver::DELIVERIES_MAX / 2
        ));
    }
    if args.grace_seconds > 86_400 || args.due_after_ms > 86_400_000 || args.schedule_ahead_ms > Some(86_400_000) {
        return Err("--grace-seconds, --due-after-ms, --schedule-ahead-ms: each at most one day".into());
    }
    if let Some((pids, _)) = &soak {
        if let Some(pid) = pids.iter().find(|pid| !Path::new("/proc").join(pid.to_string()).exists()) {
            return Err(format!("--pid: no process {pid} here"));
        }
    }
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
    let options = SinkOptions { faults, secret: args.secret.as_ref().map(|s| s.as_bytes().to_vec()), fencing: false };
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
    let driven_start_ms = receiver::now_ms();
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
    // With --schedule-ahead-ms the figure is "fires alone" only if every create was answered
    // before the first job fell due.
    let creates_overlapped_fires =
        ahead_start_ms.is_some_and(|start_ms| driven.elapsed.as_millis() as u64 + driven_start_ms > start_ms);
    if creates_overlapped_fires {
        println!("note: creating took longer than --schedule-ahead-ms; the first fires ran beside creates");
    }
    wait_for_deliveries(&scheduled, &recorded, Duration::from_secs(args.grace_seconds)).await;
    let memory_samples = match memory {
        Some((task, samples)) => {
            task.abort();
            samples.lock().map(|s| s.clone()).unwrap_or_default()
        }
        None => Vec::new(),
    };
    let (deliveries, sink_dropped) = recorded.lock().map(|r| (r.deliveries.clone(), r.dropped)).unwrap_or_default();
    if sink_dropped > 0 {
        return Err(format!(
            "the sink received more than {} deliveries and kept only those: the accounting would be wrong; run fewer jobs",
            receiver::DELIVERIES_MAX
        ));
    }
    let report = sink::account(&scheduled, &uncertain, &deliveries, args.early_margin_ms);
    let mut lateness = Latencies::new();
    for us in &report.lateness_us {
        lateness.record_us(*us);
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
    results.extend(
        json!({
            "due_after_ms": args.due_after_ms, "due_together": args.due_together,
            "schedule_ahead_ms": args.schedule_ahead_ms, "creates_overlapped_fires": creates_overlapped_fires, "fires_due_per_s": args.schedule_ahead_ms.map(|_| load.rate),
            "sink": {"fail_rate": faults.fail_rate, "throttle_rate": faults.throttle_rate, "delay_ms": faults.delay_ms, "signatures_checked": args.secret.is_some()},
            "acknowledged": report.scheduled, "delivered": report.delivered, "missing": report.missing,
            "missing_examples": report.missing_examples, "duplicates": report.duplicates,
            "duplicates_with_another_key": report.duplicates_with_another_key, "early": report.early,
            "unexpected": report.unexpected, "uncertain_creates": uncertain.len(),
            "uncertain_delivered": report.uncertain_delivered, "attempts": report.attempts, "refused_by_sink": report.refused_by_sink,
            "bad_signatures": report.bad_signatures, "deliveries_per_s": report.delivery_rate_per_s,
            "fire_lateness_us": table_json(&lateness),
        })
        .as_object()
        .cloned()
        .unwrap_or_default(),
    );
    let extra = [("fire lateness", &lateness)];
    finish(&load.plots, &load.json, scenario, &driven, results, pass, &extra, Some(("lateness", &lateness_timeline)))
}

/// Waits until every scheduled job has an accepted delivery; or, after the last due time,
/// until `grace` passes with no new delivery (an overloaded target is slow, not lossy, as
/// long as deliveries keep coming); and never longer than `WAIT_MAX` after the last due time.
async fn wait_for_deliveries(scheduled: &HashMap<String, u64>, recorded: &Mutex<receiver::Recorded>, grace: Duration) {
    const WAIT_MAX: Duration = Duration::from_secs(20 * 60);
    let last_due = scheduled.values().copied().max().unwrap_or(0);
    let due_over = Instant::now() + Duration::from_millis(last_due.saturating_sub(receiver::now_ms()));
    let (mut seen, mut last_progress) = (0, Instant::now());
    // Scheduled jobs with an accepted delivery, counted as deliveries arrive (each looked at once).
    let mut delivered: HashSet<String> = HashSet::with_capacity(scheduled.len());
    // Bounded by WAIT_MAX.
    while Instant::now() < due_over + WAIT_MAX {
        let count = match recorded.lock() {
            Ok(r) => {
                for d in &r.deliveries[seen.min(r.deliveries.len())..] {
                    if (200..300).contains(&d.status) && scheduled.contains_key(&d.job_id) {
                        delivered.insert(d.job_id.clone());
                    }
                }
                r.deliveries.len() + r.dropped as usize
            }
            Err(_) => seen,
        };
        if delivered.len() == scheduled.len() {
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
        let at = first.entry(delivery.job_id.as_str()).or_insert(delivery.received_us);
        *at = (*at).min(delivery.received_us);
    }
    let start_ms = scheduled.values().copied().min().unwrap_or(0);
    let mut timeline = Timeline::new(run + Duration::from_secs(5));
    for (id, due_ms) in scheduled {
        if let Some(received_us) = first.get(id.as_str()) {
            let lateness_us = received_us.saturating_sub(due_ms.saturating_mul(1_000));
            timeline.record(Duration::from_millis(due_ms - start_ms), lateness_us, true);
        }
    }
    timeline
}

/// p99 lateness over the first and the last tenth of the windows that saw fires.
fn drift(timeline: &Timeline) -> Value {
    let points = timeline.points();
    let tenth = (points.len() / 10).max(1);
    let p99 = |windows: &[(f64, &crate::timeline::Window)]| {
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
