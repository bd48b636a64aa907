//! `overload`: measures what the target holds (creates at max for a while), then sends
//! creates open loop at a multiple of it, and counts how each was answered — accepted,
//! refused with a reason and a Retry-After, or with an outcome the client cannot know (no
//! answer, or "outcome unknown"). A node that admits only what it holds answers everything
//! fast and keeps most of its throughput; one that queues makes every answer late.

use super::run_name;
use crate::cli::Load;
use crate::drive::{drive, Plan};
use crate::histogram::Latencies;
use crate::report::{finish, print_tables, table_json};
use crate::target::{Answered, Target};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Acknowledged ids read back at the end, at most.
const VERIFY_SAMPLE_MAX: usize = 1_000;
/// Requests in flight while measuring the maximum.
const MEASURE_WINDOW: usize = 16;
/// The targets, printed beside the figures (never part of the verdict).
const ANSWER_P99_TARGET_MS: u64 = 1_000;
const THROUGHPUT_RATIO_TARGET: f64 = 0.9;
/// Past this lag (p99) of the client's own starts, the figures are the client's as much as
/// the target's: said beside them.
const CLIENT_LAG_NOTE_MS: u64 = 100;

/// How the items of the overloaded phase were answered.
#[derive(Default)]
struct Tally {
    /// Items by class: "created", or the refusal's code ("overloaded", "no_leader", …), or
    /// "unknown" (no answer, or an answer saying the outcome is unknown).
    by_class: BTreeMap<String, u64>,
    /// Refusals (not 2xx, not unknown) without a Retry-After.
    refused_without_retry_after: u64,
    /// Latency of every request, whatever its answer, µs.
    every_answer: Latencies,
    /// Latency of requests with at least one item accepted, µs.
    accepted: Latencies,
    /// Acknowledged ids to read back.
    sample: Vec<String>,
    /// How late the client itself started each request after its intended time, µs: a
    /// load generator short of CPU (on the machine it tests) falls behind, and the latencies
    /// above, measured from the intended time, then include its own delay.
    client_lag: Latencies,
}

impl Tally {
    /// Counts one request's answers; `ids` are its jobs' ids, in order.
    fn count(&mut self, answers: &[Answered], latency_us: u64, ids: &[String]) {
        self.every_answer.record_us(latency_us);
        if let Some(position) = answers.iter().position(|a| (200..300).contains(&a.status)) {
            self.accepted.record_us(latency_us);
            if let Some(id) = ids.get(position).filter(|_| self.sample.len() < VERIFY_SAMPLE_MAX) {
                self.sample.push(id.clone());
            }
        }
        for answer in answers {
            let class = match answer.status {
                200..=299 => "created".to_string(),
                _ if answer.unknown => "unknown".to_string(),
                _ => answer.code.clone(),
            };
            if !(200..300).contains(&answer.status) && !answer.unknown && answer.retry_after_s == 0 {
                self.refused_without_retry_after += 1;
            }
            *self.by_class.entry(class).or_default() += 1;
        }
    }
}

/// The command line's settings of an `overload` run besides the load.
pub struct OverloadArgs {
    pub factor: f64,
    /// The target's capacity in creates/s, if known; else measured first.
    pub capacity: Option<u64>,
    pub measure_seconds: u64,
    pub due_in_s: u64,
}

impl OverloadArgs {
    /// The flag and rule a bad value breaks.
    fn check(&self) -> Result<(), String> {
        if !(1.0..=100.0).contains(&self.factor) {
            return Err(format!("--factor: must be within 1..=100 (got {})", self.factor));
        }
        if self.capacity == Some(0) {
            return Err("--capacity: must be at least 1 creates/s (or leave it out to measure it)".into());
        }
        if !(1..=3_600).contains(&self.measure_seconds) {
            return Err(format!("--measure-seconds: must be within 1..=3600 (got {})", self.measure_seconds));
        }
        if self.due_in_s > crate::cli::DUE_IN_S_MAX {
            return Err(format!("--due-in-s: at most {} (ten years)", crate::cli::DUE_IN_S_MAX));
        }
        Ok(())
    }
}

/// `factor` × the capacity (given, or measured first), open loop.
pub async fn overload(load: Load, args: OverloadArgs) -> Result<bool, String> {
    args.check()?;
    let OverloadArgs { factor, capacity, measure_seconds, due_in_s } = args;
    let plan = load.plan(20)?;
    let target = Arc::new(load.target().await?);
    let run = run_name();
    let max_per_s = match capacity {
        Some(capacity) => {
            println!("overload: capacity given: {capacity} creates/s");
            capacity as f64
        }
        None => {
            let measured = measure_max(&target, &plan, measure_seconds, &run, due_in_s).await;
            println!(
                "overload: capacity measured: {measured:.0} creates/s ({measure_seconds} s at max, {MEASURE_WINDOW} requests in flight)"
            );
            measured
        }
    };
    let rate = (max_per_s * factor).round().max(1.0) as u64;
    let plan = Plan { rate_per_s: rate, ..plan };
    println!("overload: {}; jobs due in {due_in_s} s", load.describe(&plan));
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let driven = drive(&plan, |i, intended_ms| {
        let requests = batch(&run, "o", i, plan.batch, intended_ms + due_in_s * 1_000);
        let (target, tally) = (target.clone(), tally.clone());
        async move {
            let lag_us = crate::receiver::now_ms().saturating_sub(intended_ms) * 1_000;
            let ids: Vec<String> = requests.iter().map(|r| r["id"].as_str().unwrap_or_default().to_string()).collect();
            let answers = target.create_many_answered(requests).await;
            let latency_us = crate::receiver::now_ms().saturating_sub(intended_ms) * 1_000;
            if let Ok(mut tally) = tally.lock() {
                tally.client_lag.record_us(lag_us);
                tally.count(&answers, latency_us, &ids);
            }
            ("create", answers.iter().map(|a| a.status).collect())
        }
    })
    .await;
    let tally = std::mem::take(&mut *tally.lock().map_err(|_| "a tally panicked".to_string())?);
    report(&load, &plan, &driven, &target, tally, (max_per_s, factor)).await
}

/// Reads the sample back, prints the figures and writes the results; answers the verdict.
async fn report(
    load: &Load,
    plan: &Plan,
    driven: &crate::drive::Driven,
    target: &Target,
    tally: Tally,
    (max_per_s, factor): (f64, f64),
) -> Result<bool, String> {
    let mut lost = Vec::new();
    for id in &tally.sample {
        if target.get(id).await == 404 {
            lost.push(id.clone());
        }
    }
    let created = tally.by_class.get("created").copied().unwrap_or(0);
    let unknown = tally.by_class.get("unknown").copied().unwrap_or(0);
    let created_per_s = created as f64 / driven.elapsed.as_secs_f64().max(1e-9);
    let ratio = created_per_s / max_per_s.max(1e-9);
    let p99_ms = tally.every_answer.at_us(0.99) / 1_000;
    println!("answers by class: {:?}", tally.by_class);
    println!("refusals without Retry-After: {}", tally.refused_without_retry_after);
    print_tables(&[("every answer", &tally.every_answer), ("accepted", &tally.accepted)]);
    println!(
        "created {created_per_s:.0}/s = {ratio:.2} of the maximum (target ≥ {THROUGHPUT_RATIO_TARGET}); answers p99 {p99_ms} ms (target ≤ {ANSWER_P99_TARGET_MS} ms)"
    );
    println!("read back {} acknowledged jobs: {} lost; unknown outcomes: {unknown}", tally.sample.len(), lost.len());
    let lag_p99_ms = tally.client_lag.at_us(0.99) / 1_000;
    println!(
        "the client started requests late by p99 {lag_p99_ms} ms, max {} ms{}",
        tally.client_lag.at_us(1.0) / 1_000,
        if lag_p99_ms > CLIENT_LAG_NOTE_MS {
            " — the client fell behind its own schedule (short of CPU?): the latencies include its delay"
        } else {
            ""
        }
    );
    let pass = lost.is_empty() && unknown == 0 && tally.refused_without_retry_after == 0;
    let mut results = load.results("overload", plan, driven, target);
    let classes: serde_json::Map<String, Value> = tally.by_class.iter().map(|(c, n)| (c.clone(), json!(n))).collect();
    results.insert("max_per_s".into(), json!(max_per_s));
    results.insert("factor".into(), json!(factor));
    results.insert("by_class".into(), Value::Object(classes));
    results.insert("refused_without_retry_after".into(), json!(tally.refused_without_retry_after));
    results.insert("created_per_s".into(), json!(created_per_s));
    results.insert("ratio_to_max".into(), json!(ratio));
    results.insert("every_answer_us".into(), table_json(&tally.every_answer));
    results.insert("accepted_us".into(), table_json(&tally.accepted));
    results.insert("client_lag_us".into(), table_json(&tally.client_lag));
    results.insert("read_back".into(), json!(tally.sample.len()));
    results.insert("lost".into(), json!(lost));
    finish(&load.plots, &load.json, "overload", driven, results, pass, &[], None)
}

/// Creates per second at max with `MEASURE_WINDOW` requests in flight.
async fn measure_max(target: &Arc<Target>, plan: &Plan, seconds: u64, run: &str, due_in_s: u64) -> f64 {
    let measuring = Plan {
        rate_per_s: 0,
        window: MEASURE_WINDOW,
        duration: std::time::Duration::from_secs(seconds.max(1)),
        ..plan.clone()
    };
    let driven = drive(&measuring, |i, intended_ms| {
        let requests = batch(run, "m", i, measuring.batch, intended_ms + due_in_s * 1_000);
        let target = target.clone();
        async move { ("create", target.create_many(requests).await) }
    })
    .await;
    driven.ok_per_s()
}

fn batch(run: &str, phase: &str, i: u64, size: usize, run_at_ms: u64) -> Vec<Value> {
    (0..size)
        .map(|j| json!({"id": format!("{run}-{phase}{i}-{j}"), "run_at": run_at_ms, "url": "http://127.0.0.1:9/overload"}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16, retry_after_s: u32, code: &str, unknown: bool) -> Answered {
        Answered { status, retry_after_s, code: code.to_string(), unknown }
    }

    #[test]
    fn the_tally_names_unknown_outcomes_and_refusals_without_retry_after() {
        let mut tally = Tally::default();
        let ids: Vec<String> = (0..5).map(|i| format!("j{i}")).collect();
        let answers = [
            answered(503, 1, "overloaded", false),
            answered(201, 0, "", false),
            answered(503, 0, "unavailable", true),
            answered(0, 0, "no_answer", true),
            answered(503, 0, "no_leader", false),
        ];
        tally.count(&answers, 1_500, &ids);
        let classes: Vec<(&str, u64)> = tally.by_class.iter().map(|(c, n)| (c.as_str(), *n)).collect();
        assert_eq!(classes, [("created", 1), ("no_leader", 1), ("overloaded", 1), ("unknown", 2)]);
        assert_eq!(tally.refused_without_retry_after, 1, "the no_leader refusal said no Retry-After");
        assert_eq!(tally.sample, ["j1"], "the accepted job is the one read back");
        assert_eq!((tally.every_answer.count(), tally.accepted.count()), (1, 1));
    }

    #[test]
    fn bad_settings_name_their_flag() {
        let args = |factor, capacity, measure_seconds| OverloadArgs { factor, capacity, measure_seconds, due_in_s: 60 };
        assert!(args(0.5, None, 10).check().unwrap_err().contains("--factor"));
        assert!(args(2.0, Some(0), 10).check().unwrap_err().contains("--capacity"));
        assert!(args(2.0, None, 0).check().unwrap_err().contains("--measure-seconds"));
        assert!(args(2.0, Some(1_000), 10).check().is_ok());
    }
}
