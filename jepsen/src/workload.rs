//! The workload: concurrent clients that create one-time jobs due within the run and cron
//! jobs, cancel some before their time and read job status through random nodes, each
//! operation recorded as invoke then ok, fail or info (unknown) in the history.
//!
//! How answers become outcomes: 2xx is ok; 4xx, 429/507, a 503 "overloaded" (refused before
//! it was proposed) and a refused connection are fail (it did not happen); anything else —
//! another 5xx, a timeout, a connection cut mid-request — is info (it may have happened).

use crate::client::{self, Failure};
use crate::history::{Call, Event, Kind, Recorder};
use crate::rng::Rng;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Reads of one job at most, which keeps each job's history small for the checker.
const READS_PER_JOB_MAX: u8 = 12;
/// Jobs remembered for cancels and reads (the newest; older ones are finished anyway).
const RECENT_JOBS_MAX: usize = 2_000;
/// Cron jobs fire every this many seconds.
pub const CRON_EVERY_S: u64 = 2;

#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    pub seed: u64,
    pub rate_per_s: u64,
    pub concurrency: u64,
    /// Workload start and end, µs since the epoch.
    pub start_us: u64,
    pub end_us: u64,
    pub receiver_url: String,
    /// Each node's HTTP address, by node id.
    pub nodes: Vec<(u8, SocketAddr)>,
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
struct Known {
    id: String,
    /// The one-time fire, or the cron job's end.
    last_fire_ms: u64,
    reads: u8,
    cancel_tried: bool,
}

#[derive(Default)]
struct Shared {
    recent: Vec<Known>,
}

/// Runs the clients until the workload's end; returns when every operation has completed.
pub async fn run(options: WorkloadOptions, recorder: Recorder) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut clients = Vec::new();
    for k in 0..options.concurrency.max(1) {
        let (options, recorder, shared) = (options.clone(), recorder.clone(), shared.clone());
        clients.push(tokio::spawn(async move { client_loop(k, options, recorder, shared).await }));
    }
    for client in clients {
        let _ = client.await;
    }
}

enum Plan {
    Create { id: String, run_at_ms: u64 },
    CreateCron { id: String, end_ms: u64 },
    Cancel { id: String },
    Read { id: String },
}

async fn client_loop(k: u64, options: WorkloadOptions, recorder: Recorder, shared: Arc<Mutex<Shared>>) {
    let mut rng = Rng::new(options.seed).fork(1_000 + k);
    let process = format!("c{k}");
    let interval_us = 1_000_000 * options.concurrency.max(1) / options.rate_per_s.max(1);
    // Clients start spread over one interval, not all at once.
    let mut next_us = options.start_us + rng.between(0, interval_us);
    let mut serial = 0u64;
    loop {
        let now = crate::now_us();
        if next_us > now {
            tokio::time::sleep(Duration::from_micros(next_us - now)).await;
        }
        let now = crate::now_us();
        if now >= options.end_us {
            break;
        }
        // Behind schedule (a slow answer): start again from now rather than burst.
        next_us = next_us.max(now.saturating_sub(interval_us)) + interval_us;
        serial += 1;
        let Some(plan) = choose(&mut rng, &options, &shared, &format!("j{}-{k}-{serial}", options.seed)) else {
            continue;
        };
        let Some(&(node, addr)) = rng.pick(&options.nodes) else { return };
        if !perform(plan, &process, node, addr, &options, &recorder, &shared).await {
            // The history is full: stop (counted in the report as a run that could not finish).
            return;
        }
    }
}

fn choose(rng: &mut Rng, options: &WorkloadOptions, shared: &Mutex<Shared>, new_id: &str) -> Option<Plan> {
    let now_ms = crate::now_us() / 1_000;
    let end_ms = options.end_us / 1_000;
    let mut shared = shared.lock().ok()?;
    let roll = rng.between(0, 99);
    let room_ms = end_ms.saturating_sub(now_ms);
    if roll < 45 || shared.recent.is_empty() {
        if room_ms < 1_500 {
            return None;
        }
        let run_at_ms = now_ms + rng.between(1_000, 8_000.min(room_ms - 500));
        remember(&mut shared, Known { id: new_id.into(), last_fire_ms: run_at_ms, reads: 0, cancel_tried: false });
        return Some(Plan::Create { id: new_id.into(), run_at_ms });
    }
    if roll < 50 {
        if room_ms < 5_000 {
            return None;
        }
        let end = now_ms + rng.between(4_000, 16_000.min(room_ms - 1_000));
        remember(&mut shared, Known { id: new_id.into(), last_fire_ms: end, reads: 0, cancel_tried: false });
        return Some(Plan::CreateCron { id: new_id.into(), end_ms: end });
    }
    if roll < 60 {
        // Cancel a job whose (last) fire is still ahead, so cancels race their fires.
        let candidates: Vec<usize> = (0..shared.recent.len())
            .filter(|&i| !shared.recent[i].cancel_tried && shared.recent[i].last_fire_ms > now_ms + 200)
            .collect();
        let &i = rng.pick(&candidates)?;
        shared.recent[i].cancel_tried = true;
        return Some(Plan::Cancel { id: shared.recent[i].id.clone() });
    }
    let candidates: Vec<usize> =
        (0..shared.recent.len()).filter(|&i| shared.recent[i].reads < READS_PER_JOB_MAX).collect();
    let &i = rng.pick(&candidates)?;
    shared.recent[i].reads += 1;
    Some(Plan::Read { id: shared.recent[i].id.clone() })
}

fn remember(shared: &mut Shared, known: Known) {
    if shared.recent.len() >= RECENT_JOBS_MAX {
        shared.recent.remove(0);
    }
    shared.recent.push(known);
}

/// Sends one operation and records it; false when the history is full.
async fn perform(
    plan: Plan,
    process: &str,
    node: u8,
    addr: SocketAddr,
    options: &WorkloadOptions,
    recorder: &Recorder,
    shared: &Mutex<Shared>,
) -> bool {
    let url = &options.receiver_url;
    let (f, id, argument, method, path, body) = match plan {
        Plan::Create { id, run_at_ms } => {
            let body = json!({"id": id, "run_at": run_at_ms, "url": url, "retry": retry()});
            (Call::Create, id.clone(), json!({"run_at_ms": run_at_ms}), "POST", "/jobs".to_string(), Some(body))
        }
        Plan::CreateCron { id, end_ms } => {
            let body = json!({
                "id": id, "cron": format!("*/{CRON_EVERY_S} * * * * *"), "end_at": end_ms,
                "misfire": "fire_all", "misfire_max": 1000, "url": url, "retry": retry(),
            });
            (
                Call::CreateCron,
                id.clone(),
                json!({"every_s": CRON_EVERY_S, "end_ms": end_ms}),
                "POST",
                "/jobs".into(),
                Some(body),
            )
        }
        Plan::Cancel { id } => {
            let path = format!("/jobs/{id}/cancel");
            (Call::Cancel, id, Value::Null, "POST", path, None)
        }
        Plan::Read { id } => {
            let path = format!("/jobs/{id}/status");
            (Call::Read, id, Value::Null, "GET", path, None)
        }
    };
    let event = |kind, value: Value, error: Option<String>| Event {
        index: 0,
        process: process.to_string(),
        kind,
        f,
        job: id.clone(),
        node,
        time_us: crate::now_us(),
        value,
        error,
    };
    if !recorder.record(event(Kind::Invoke, argument, None)) {
        return false;
    }
    let answer = client::call(addr, method, &path, body.as_ref(), options.timeout).await;
    let (kind, value, error) = outcome(f, answer);
    if f == Call::Create || f == Call::CreateCron {
        // A definitely refused create is no job to cancel or read much.
        if kind == Kind::Fail {
            if let Ok(mut shared) = shared.lock() {
                shared.recent.retain(|known| known.id != id);
            }
        }
    }
    recorder.record(event(kind, value, error))
}

/// Every job retries up to 10 times, 100 ms to 1 s apart: with the receiver failing 10 % of
/// attempts, a fire dead-letters with probability 10⁻¹⁰, so every owed fire is delivered.
fn retry() -> Value {
    json!({"max_attempts": 10, "initial_backoff_ms": 100, "max_backoff_ms": 1000})
}

/// Maps an answer to the history's outcome, value and error.
pub fn outcome(f: Call, answer: Result<client::Answer, Failure>) -> (Kind, Value, Option<String>) {
    let (status, body) = match answer {
        Ok(answer) => answer,
        Err(Failure::Refused(e)) => return (Kind::Fail, Value::Null, Some(e)),
        Err(Failure::Unknown(e)) => {
            // A read that got no answer did nothing either way.
            let kind = if f == Call::Read { Kind::Fail } else { Kind::Info };
            return (kind, Value::Null, Some(e));
        }
    };
    let error = || Some(format!("{status} {}", body["error"].as_str().unwrap_or("")));
    match (f, status) {
        (Call::Read, 200) => (Kind::Ok, body["status"].clone(), None),
        (Call::Read, 404) => (Kind::Ok, json!("absent"), None),
        (Call::Read, _) => (Kind::Fail, Value::Null, error()),
        (_, 200..=299) => (Kind::Ok, Value::Null, None),
        (Call::Cancel, 404) => (Kind::Fail, json!("absent"), error()),
        (Call::Cancel, 409) => (Kind::Fail, json!("final"), error()),
        (_, 400..=499 | 507) => (Kind::Fail, Value::Null, error()),
        (_, 503) if body["code"] == "overloaded" => (Kind::Fail, Value::Null, error()),
        _ => (Kind::Info, Value::Null, error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_outcomes_that_never_claim_more_than_is_known() {
        let ok = |status, body| outcome(Call::Create, Ok((status, body))).0;
        assert_eq!(ok(201, Value::Null), Kind::Ok);
        assert_eq!(ok(400, json!({"error": "run_at: must be"})), Kind::Fail);
        assert_eq!(ok(503, json!({"code": "overloaded"})), Kind::Fail);
        assert_eq!(ok(503, json!({"code": "unavailable"})), Kind::Info, "a forwarded create may have been applied");
        assert_eq!(ok(500, Value::Null), Kind::Info);
        assert_eq!(outcome(Call::Create, Err(Failure::Unknown("timeout".into()))).0, Kind::Info);
        assert_eq!(outcome(Call::Create, Err(Failure::Refused("refused".into()))).0, Kind::Fail);
        assert_eq!(outcome(Call::Read, Ok((404, Value::Null))), (Kind::Ok, json!("absent"), None));
        assert_eq!(outcome(Call::Read, Ok((200, json!({"status": "pending"})))).1, json!("pending"));
        assert_eq!(outcome(Call::Read, Err(Failure::Unknown("timeout".into()))).0, Kind::Fail);
        assert_eq!(outcome(Call::Cancel, Ok((409, json!({"error": "x"})))).1, json!("final"));
        assert_eq!(outcome(Call::Cancel, Ok((404, Value::Null))).1, json!("absent"));
    }
}
