//! Drives a scenario's requests: open loop at a fixed rate (each request scheduled by its
//! intended send time, latency measured from it) or max throughput (a bounded window in
//! flight, latency from the actual send), with a live progress line. Every request answers
//! one status per item; the driver keeps per-operation histograms, status counts and the
//! timeline.

use crate::histogram::Latencies;
use crate::open_loop::{latency_from_intended, Pace};
use crate::timeline::Timeline;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Requests in flight at most in open-loop mode: beyond it the sender waits, and the wait
/// shows in the latencies (it is measured from the intended time).
pub const IN_FLIGHT_MAX: usize = 100_000;

#[derive(Clone, Debug)]
pub struct Plan {
    /// Items per second (open loop); 0 = max throughput with `window` requests in flight.
    pub rate_per_s: u64,
    pub window: usize,
    /// Items per request.
    pub batch: usize,
    pub duration: Duration,
    /// In max-throughput mode, stop after this many requests even before `duration`.
    pub requests_max: Option<u64>,
    /// Show the live progress line (on a terminal only).
    pub progress: bool,
}

#[derive(Default)]
pub struct OpStats {
    /// Latency of items answered 2xx, µs.
    pub latencies: Latencies,
    /// Items by answered status (0 = no answer).
    pub statuses: BTreeMap<u16, u64>,
}

impl OpStats {
    pub fn ok(&self) -> u64 {
        self.statuses.iter().filter(|(s, _)| (200..300).contains(*s)).map(|(_, n)| n).sum()
    }

    pub fn failed(&self) -> u64 {
        self.statuses.iter().filter(|(s, _)| !(200..300).contains(*s)).map(|(_, n)| n).sum()
    }
}

pub struct Driven {
    pub ops: BTreeMap<&'static str, OpStats>,
    pub timeline: Timeline,
    /// From the first intended send to the last answer.
    pub elapsed: Duration,
    pub requests: u64,
}

impl Driven {
    /// Items answered 2xx per second over the run.
    pub fn ok_per_s(&self) -> f64 {
        self.ops.values().map(OpStats::ok).sum::<u64>() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

struct Shared {
    ops: BTreeMap<&'static str, OpStats>,
    timeline: Timeline,
}

/// Runs `request(i, intended_ms)` for i = 0, 1, … as `plan` says (`intended_ms`: when the
/// request is meant to go, ms since the epoch); each returns its operation's name and one
/// status per item.
pub async fn drive<F, Fut>(plan: &Plan, request: F) -> Driven
where
    F: Fn(u64, u64) -> Fut,
    Fut: Future<Output = (&'static str, Vec<u16>)> + Send + 'static,
{
    let shared = Arc::new(Mutex::new(Shared { ops: BTreeMap::new(), timeline: Timeline::new(plan.duration) }));
    let start = Instant::now() + Duration::from_millis(50);
    let start_ms = crate::receiver::now_ms() + 50;
    let progress = plan.progress.then(|| progress_line(shared.clone(), start));
    let in_flight = if plan.rate_per_s == 0 { plan.window.clamp(1, IN_FLIGHT_MAX) } else { IN_FLIGHT_MAX };
    let permits = Arc::new(Semaphore::new(in_flight));
    let pace = (plan.rate_per_s > 0).then(|| {
        let interval_ns = 1_000_000_000u128 * plan.batch.max(1) as u128 / u128::from(plan.rate_per_s);
        Pace { start, interval: Duration::from_nanos(interval_ns.clamp(1, u128::from(u64::MAX)) as u64) }
    });
    let count = pace.map_or(plan.requests_max.unwrap_or(u64::MAX), |pace| pace.count(plan.duration));
    let deadline = start + plan.duration;
    let mut requests = 0;
    tokio::time::sleep_until(start.into()).await;
    for i in 0..count {
        let intended = match pace {
            Some(pace) => {
                let intended = pace.intended(i);
                tokio::time::sleep_until(intended.into()).await;
                intended
            }
            None if Instant::now() >= deadline => break,
            None => Instant::now(),
        };
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        // Max-throughput mode measures from the actual send: the window is the client's limit.
        let intended = if pace.is_some() { intended } else { Instant::now() };
        let call = request(i, start_ms + intended.saturating_duration_since(start).as_millis() as u64);
        let shared = shared.clone();
        requests += 1;
        tokio::spawn(async move {
            let (op, statuses) = call.await;
            let answered = Instant::now();
            let latency_us = latency_from_intended(intended, answered).as_micros() as u64;
            let since_start = intended.saturating_duration_since(start);
            if let Ok(mut shared) = shared.lock() {
                let Shared { ops, timeline } = &mut *shared;
                let stats = ops.entry(op).or_default();
                for status in statuses {
                    let ok = (200..300).contains(&status);
                    *stats.statuses.entry(status).or_default() += 1;
                    if ok {
                        stats.latencies.record_us(latency_us);
                    }
                    timeline.record(since_start, latency_us, ok);
                }
            }
            drop(permit);
        });
    }
    // Every request answered (each holds a permit until then).
    let _all = permits.acquire_many(in_flight as u32).await;
    let elapsed = start.elapsed();
    if let Some(progress) = progress {
        progress.abort();
    }
    let shared = match Arc::try_unwrap(shared) {
        Ok(shared) => shared.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(shared) => {
            let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
            let timeline = std::mem::replace(&mut guard.timeline, Timeline::new(Duration::ZERO));
            Shared { ops: std::mem::take(&mut guard.ops), timeline }
        }
    };
    Driven { ops: shared.ops, timeline: shared.timeline, elapsed, requests }
}

/// Every half second: elapsed time, items per second, p50 and p99 of the last full window,
/// errors so far. indicatif draws nothing when stderr is not a terminal.
fn progress_line(shared: Arc<Mutex<Shared>>, start: Instant) -> tokio::task::JoinHandle<()> {
    let bar = indicatif::ProgressBar::new_spinner();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        let bar = ClearOnDrop(bar);
        // Bounded: aborted when the run ends.
        loop {
            ticker.tick().await;
            let since = start.elapsed();
            let line = match shared.lock() {
                Ok(shared) => {
                    let window = shared.timeline.window;
                    let last = shared.timeline.at(since.saturating_sub(window));
                    let errors: u64 = shared.ops.values().map(OpStats::failed).sum();
                    format!(
                        "{:>6.1} s  {:>9.0} ok/s  p50 {:>8.3} ms  p99 {:>8.3} ms  errors {errors}",
                        since.as_secs_f64(),
                        last.ok as f64 / window.as_secs_f64(),
                        last.at_us(0.5) as f64 / 1e3,
                        last.at_us(0.99) as f64 / 1e3,
                    )
                }
                Err(_) => continue,
            };
            bar.0.set_message(line);
            bar.0.tick();
        }
    })
}

/// Clears the progress line when its task ends (aborted or not).
struct ClearOnDrop(indicatif::ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
