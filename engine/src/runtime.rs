//! The runtime that runs the life of a fire end to end: commands go to a `CommandLog` (a
//! bare `State` here; the node's Raft partition over the WAL), the timing wheel keeps one
//! timer per job at its next due time, and the dispatcher makes the attempts.
//! Due fire → attempt submitted (a full queue leaves it due; it is tried again shortly) →
//! `FireStarted` → outcome → `AttemptFinished` with a retry time (backoff with jitter, or
//! Retry-After if longer) → the state machine decides retry, success or dead letter.

use crate::dispatch::{now_ms, Attempt, AttemptResult, DispatchConfig, Dispatcher};
use crate::state::{Applied, ApplyError, Command, Due, Outcome, State};
use crate::trace::{attempt_span_id, fire_span_id, fire_trace, SpanRecord};
use crate::wheel::{Expired, TimerHandle, TimingWheel};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;

/// Where commands go to be applied: straight into a `State` (tests, `LocalRuntime`), or
/// through a replicated, durable log (the node's partitions). The inner result is the state
/// machine's verdict; an outer error means the command's fate is unknown (the log failed),
/// and the runtime stops rather than guess.
pub trait CommandLog {
    fn apply(&mut self, command: Command) -> Result<Result<Applied, ApplyError>, LogError>;
    fn state(&self) -> &State;

    /// Applies several commands, in order; a durable log makes them durable together (one
    /// fsync: group commit). Verdicts come back in the same order.
    fn apply_batch(&mut self, commands: Vec<Command>) -> Result<Vec<Result<Applied, ApplyError>>, LogError> {
        commands.into_iter().map(|command| self.apply(command)).collect()
    }
}

/// The log could not take a command (I/O failure, lost leadership): nothing more can be
/// acknowledged until it is fixed.
#[derive(Debug, thiserror::Error)]
#[error("command log: {0}")]
pub struct LogError(pub String);

impl CommandLog for State {
    fn apply(&mut self, command: Command) -> Result<Result<Applied, ApplyError>, LogError> {
        Ok(State::apply(self, command))
    }

    fn state(&self) -> &State {
        self
    }
}

/// Fires started per `fire_due_jobs` call at most, so a burst of due jobs cannot starve
/// requests and outcomes; the rest start on the next turn.
const FIRES_PER_TURN_MAX: usize = 512;
/// A fire refused by a full dispatch queue is tried again after this.
const QUEUE_FULL_RETRY_MS: u64 = 20;

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub node_id: u64,
    pub dispatch: DispatchConfig,
    /// Outcomes waiting to be applied.
    pub results_capacity: usize,
    /// Jobs with a pending timer.
    pub timers_max: usize,
    /// Keep a `SpanRecord` of every attempt and fire (for OTLP export), taken with
    /// `take_spans`.
    pub record_spans: bool,
}

impl Default for RuntimeConfig {
    fn default() -> RuntimeConfig {
        RuntimeConfig {
            node_id: 1,
            dispatch: DispatchConfig::default(),
            results_capacity: 4096,
            timers_max: 10_000_000,
            record_spans: false,
        }
    }
}

/// Counters a status page or test reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    pub attempts_started: u64,
    pub attempts_finished: u64,
    /// Times a due fire found the dispatch queue full and waited.
    pub queue_full_waits: u64,
}

/// The runtime with the state machine applied directly (no log): tests and tools.
pub type LocalRuntime = Runtime<State>;

pub struct Runtime<L: CommandLog> {
    config: RuntimeConfig,
    log: L,
    /// Set when the log failed: nothing is applied any more.
    log_failure: Option<String>,
    wheel: TimingWheel<String>,
    timers: HashMap<String, TimerHandle>,
    dispatcher: Dispatcher,
    /// Outcomes of this runtime's attempts; `None` when they go to a channel the caller
    /// shares between several runtimes (a shard routes them back with `finish_many`).
    results: Option<mpsc::Receiver<AttemptResult>>,
    rng: u64,
    stats: RuntimeStats,
    /// Finished spans not yet taken (bounded by `SPANS_KEPT_MAX`; beyond it they are
    /// dropped and counted).
    spans: Vec<SpanRecord>,
    spans_dropped: u64,
}

/// Spans kept until taken; the node takes them every loop turn.
const SPANS_KEPT_MAX: usize = 65_536;

impl LocalRuntime {
    /// Starts on the current tokio runtime with an empty state.
    pub fn start(config: RuntimeConfig) -> LocalRuntime {
        Runtime::with_log(config, State::new())
    }
}

impl<L: CommandLog> Runtime<L> {
    /// Starts on the current tokio runtime over `log`, arming a timer for every job it holds
    /// and re-running the attempts a previous run left in flight.
    pub fn with_log(config: RuntimeConfig, log: L) -> Runtime<L> {
        let (sender, results) = mpsc::channel(config.results_capacity);
        Runtime::build(config, log, sender, Some(results))
    }

    /// `with_log`, with attempt outcomes sent to `results`, a channel the caller reads and
    /// may share between runtimes: it hands each outcome back through `finish_many`.
    pub fn with_shared_results(config: RuntimeConfig, log: L, results: mpsc::Sender<AttemptResult>) -> Runtime<L> {
        Runtime::build(config, log, results, None)
    }

    fn build(
        config: RuntimeConfig,
        log: L,
        sender: mpsc::Sender<AttemptResult>,
        results: Option<mpsc::Receiver<AttemptResult>>,
    ) -> Runtime<L> {
        let dispatcher = Dispatcher::start(config.dispatch.clone(), sender);
        let mut runtime = Runtime {
            wheel: TimingWheel::new(now_ms(), config.timers_max),
            config,
            log,
            log_failure: None,
            timers: HashMap::new(),
            dispatcher,
            results,
            rng: now_ms() | 1,
            stats: RuntimeStats::default(),
            spans: Vec::new(),
            spans_dropped: 0,
        };
        let ids: Vec<String> = runtime.log.state().jobs().map(|job| job.spec.id.clone()).collect();
        for id in &ids {
            runtime.arm(id);
        }
        runtime.resume_in_flight();
        runtime
    }

    /// Attempts a previous leader (or run) started and never finished are run again, with
    /// the same fire (idempotency key) and attempt number.
    fn resume_in_flight(&mut self) {
        for (id, fire_ms, attempt) in self.log.state().in_flight() {
            let Some(job) = self.log.state().job(&id) else { continue };
            let spec = &job.spec;
            let submission = Attempt {
                job_id: id.clone(),
                fire_ms,
                attempt,
                priority: spec.priority,
                due_ms: fire_ms,
                target: spec.target.clone(),
                timeout_ms: spec.attempt_timeout_ms,
                secret: spec.secret.as_ref().map(|s| s.as_bytes().to_vec()),
                traceparent: crate::trace::attempt_traceparent(spec.trace.as_ref(), &id, fire_ms, attempt),
            };
            // A full queue at start-up: the attempt stays in flight in the state and is
            // re-run at the next start (rare: the queue holds thousands).
            if self.dispatcher.submit(submission).is_ok() {
                self.stats.attempts_started += 1;
            }
        }
    }

    pub fn state(&self) -> &State {
        self.log.state()
    }

    pub fn log(&self) -> &L {
        &self.log
    }

    /// The log, for bookkeeping that applies no command (metrics): a command applied through
    /// it would bypass the timers.
    pub fn log_mut(&mut self) -> &mut L {
        &mut self.log
    }

    /// Why the runtime stopped applying commands, if it did.
    pub fn log_failure(&self) -> Option<&str> {
        self.log_failure.as_deref()
    }

    pub fn stats(&self) -> RuntimeStats {
        self.stats
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Applies a client command (create, cancel, pause, …) and re-arms the job's timer.
    pub fn apply(&mut self, command: Command) -> Result<Applied, ApplyError> {
        self.apply_batch(vec![command]).pop().expect("one verdict per command")
    }

    /// Applies several commands through one log write (group commit) and re-arms the timers
    /// of the jobs they touch; verdicts come back in order.
    pub fn apply_batch(&mut self, commands: Vec<Command>) -> Vec<Result<Applied, ApplyError>> {
        if let Some(failure) = &self.log_failure {
            return commands.iter().map(|_| Err(ApplyError::Unavailable(failure.clone()))).collect();
        }
        let touched: Vec<(Option<String>, bool)> = commands.iter().map(Self::touches).collect();
        let verdicts = match self.log.apply_batch(commands) {
            Ok(verdicts) => verdicts,
            Err(error) => {
                tracing::error!(%error, "the command log failed; nothing more is applied");
                self.log_failure = Some(error.to_string());
                return touched.iter().map(|_| Err(ApplyError::Unavailable(error.to_string()))).collect();
            }
        };
        for ((id, stops_attempts), verdict) in touched.into_iter().zip(&verdicts) {
            let (Some(id), true) = (id, verdict.is_ok()) else { continue };
            if stops_attempts {
                self.dispatcher.cancel(&id);
            }
            self.arm(&id);
            // A completed job may release jobs that depend on it.
            if self.log.state().job(&id).is_some_and(|job| job.status == crate::state::Status::Completed) {
                for dependent in self.log.state().dependents_of(&id) {
                    self.arm(&dependent);
                }
            }
        }
        verdicts
    }

    /// The job a command touches, and whether it stops the job's attempts.
    fn touches(command: &Command) -> (Option<String>, bool) {
        let id = match command {
            Command::Create { spec, .. } => Some(spec.id.clone()),
            Command::Cancel { id, .. }
            | Command::Delete { id }
            | Command::Pause { id }
            | Command::Resume { id, .. }
            | Command::FireStarted { id, .. }
            | Command::AttemptFinished { id, .. }
            | Command::Redrive { id, .. } => Some(id.clone()),
            Command::Purge { .. } => None,
        };
        (id, matches!(command, Command::Cancel { .. } | Command::Delete { .. }))
    }

    /// Sets the job's timer to its next due time (or removes it).
    fn arm(&mut self, id: &str) {
        if let Some(handle) = self.timers.remove(id) {
            self.wheel.cancel(handle);
        }
        if let Some((due_ms, _)) = self.log.state().next_due(id) {
            if let Ok(handle) = self.wheel.insert(due_ms, id.to_string()) {
                self.timers.insert(id.to_string(), handle);
            }
        }
    }

    /// Runs fires and applies outcomes until `done` holds or `limit` passes; returns whether
    /// `done` held.
    pub async fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&State) -> bool) -> bool {
        self.run_until_with(limit, |runtime| done(runtime.state())).await
    }

    /// `run_until` with the whole runtime in view (the node's loop looks at its inbox).
    pub async fn run_until_with(&mut self, limit: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        // Bounded by `limit`.
        loop {
            if done(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            self.fire_due_jobs();
            // Sleeps until the next timer or an outcome; `done` is looked at on each wake-up and
            // at least once a second.
            let wait_ms = self.sleep_ms();
            tokio::select! {
                result = self.next_result() => {
                    if let Some(result) = result {
                        self.finish(result);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            }
        }
    }

    /// How long the runtime may sleep before its next timer (at most a second).
    pub fn sleep_ms(&self) -> u64 {
        self.wheel.next_wakeup_ms().map_or(1_000, |at| at.saturating_sub(now_ms()).clamp(1, 1_000))
    }

    /// The next attempt outcome (for a caller driving its own loop: pass it to `finish`).
    /// With shared results it never resolves: the caller reads the shared channel.
    pub async fn next_result(&mut self) -> Option<AttemptResult> {
        match &mut self.results {
            Some(results) => results.recv().await,
            None => std::future::pending().await,
        }
    }

    /// Starts every fire due by now.
    pub fn fire_due_jobs(&mut self) {
        let mut expired: Vec<Expired<String>> = Vec::new();
        self.wheel.advance_to(now_ms(), &mut expired);
        if expired.len() > FIRES_PER_TURN_MAX {
            for timer in expired.split_off(FIRES_PER_TURN_MAX) {
                self.timers.remove(&timer.value);
                self.arm(&timer.value);
            }
        }
        let now = now_ms();
        let mut room = self.dispatcher.room();
        let mut starts = Vec::new();
        for timer in expired {
            let id = timer.value;
            self.timers.remove(&id);
            let Some((due_ms, due)) = self.log.state().next_due(&id) else { continue };
            if due_ms > now {
                self.arm(&id); // moved later meanwhile
                continue;
            }
            let (fire_ms, attempt) = match due {
                Due::NewFire { fire_ms } => (fire_ms, 1),
                Due::Retry { fire_ms, attempt } => (fire_ms, attempt),
            };
            if room == 0 {
                // The queue is full: the fire stays due and is tried again shortly.
                self.stats.queue_full_waits += 1;
                if let Ok(handle) = self.wheel.insert(now + QUEUE_FULL_RETRY_MS, id.clone()) {
                    self.timers.insert(id, handle);
                }
                continue;
            }
            room -= 1;
            starts.push((id, fire_ms, attempt, due_ms));
        }
        // Committed (together: one log write) before the requests go out, so an outcome
        // always finds its fire.
        let commands = starts
            .iter()
            .map(|(id, fire_ms, attempt, _)| Command::FireStarted {
                id: id.clone(),
                fire_ms: *fire_ms,
                attempt: *attempt,
                node: self.config.node_id,
                now_ms: now,
            })
            .collect();
        let verdicts = self.apply_batch(commands);
        for ((id, fire_ms, attempt, due_ms), verdict) in starts.into_iter().zip(verdicts) {
            match &verdict {
                Ok(Applied::Done) => {}
                Ok(Applied::Missed { count }) => {
                    tracing::warn!(job_id = %id, fire_ms, missed = count, "fires missed (misfire policy or catch-up window)");
                    continue;
                }
                _ => continue, // no longer due: re-armed
            }
            tracing::debug!(job_id = %id, fire_ms, attempt, late_ms = now.saturating_sub(due_ms), "attempt starting");
            let job = self.log.state().job(&id).expect("due jobs exist");
            let spec = &job.spec;
            let traceparent = crate::trace::attempt_traceparent(spec.trace.as_ref(), &id, fire_ms, attempt);
            let submission = Attempt {
                job_id: id,
                fire_ms,
                attempt,
                priority: spec.priority,
                due_ms,
                target: spec.target.clone(),
                timeout_ms: spec.attempt_timeout_ms,
                secret: spec.secret.as_ref().map(|s| s.as_bytes().to_vec()),
                traceparent,
            };
            // Room was counted above and only this runtime submits: this is not refused.
            if self.dispatcher.submit(submission).is_ok() {
                self.stats.attempts_started += 1;
            }
        }
    }

    /// Applies an attempt's outcome (with its retry time).
    pub fn finish(&mut self, result: AttemptResult) {
        self.finish_many(vec![result]);
    }

    /// Applies several outcomes with one log write.
    pub fn finish_many(&mut self, results: Vec<AttemptResult>) {
        let mut commands = Vec::with_capacity(results.len());
        for result in results {
            self.stats.attempts_finished += 1;
            let Some(job) = self.log.state().job(&result.job_id) else { continue };
            let retry = &job.spec.retry;
            let backoff_ms = retry.backoff_ms(result.attempt);
            let jitter_ms = backoff_ms * u64::from(retry.jitter_percent) / 100;
            let jitter_ms = if jitter_ms > 0 { self.next_random() % (jitter_ms + 1) } else { 0 };
            let retry_after_ms = match &result.outcome {
                Outcome::Response { retry_after_ms: Some(ms), .. } => *ms,
                _ => 0,
            };
            let retry_at_ms = result.finished_ms.saturating_add((backoff_ms + jitter_ms).max(retry_after_ms));
            match &result.outcome {
                Outcome::Response { status, .. } => tracing::info!(
                    job_id = %result.job_id,
                    fire_ms = result.fire_ms,
                    attempt = result.attempt,
                    status,
                    latency_ms = result.finished_ms.saturating_sub(result.started_ms),
                    "attempt answered"
                ),
                Outcome::Error(class) => tracing::warn!(
                    job_id = %result.job_id,
                    fire_ms = result.fire_ms,
                    attempt = result.attempt,
                    error = ?class,
                    latency_ms = result.finished_ms.saturating_sub(result.started_ms),
                    "attempt failed"
                ),
            }
            commands.push(Command::AttemptFinished {
                id: result.job_id,
                fire_ms: result.fire_ms,
                attempt: result.attempt,
                node: self.config.node_id,
                started_ms: result.started_ms,
                finished_ms: result.finished_ms,
                outcome: result.outcome,
                retry_at_ms,
            });
        }
        let finished: Vec<(String, u64, u32, u64, u64, Outcome)> = if self.config.record_spans {
            commands
                .iter()
                .filter_map(|command| match command {
                    Command::AttemptFinished { id, fire_ms, attempt, started_ms, finished_ms, outcome, .. } => {
                        Some((id.clone(), *fire_ms, *attempt, *started_ms, *finished_ms, outcome.clone()))
                    }
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        // A stale outcome (the job was cancelled meanwhile) is refused and changes nothing.
        let verdicts = self.apply_batch(commands);
        for ((id, fire_ms, attempt, started_ms, finished_ms, outcome), verdict) in finished.into_iter().zip(verdicts) {
            if verdict.is_ok() {
                self.record_attempt_spans(&id, fire_ms, attempt, started_ms, finished_ms, &outcome);
            }
        }
    }

    /// The spans of a finished attempt, and of its fire when that was the last attempt.
    fn record_attempt_spans(
        &mut self,
        id: &str,
        fire_ms: u64,
        attempt: u32,
        started_ms: u64,
        finished_ms: u64,
        outcome: &Outcome,
    ) {
        let Some(job) = self.log.state().job(id) else { return };
        let trace = job.spec.trace.clone();
        let trace_id = fire_trace(trace.as_ref(), id, fire_ms);
        let fire_span = fire_span_id(id, fire_ms);
        let result = match outcome {
            Outcome::Response { status, .. } => ("http.response.status_code", status.to_string()),
            Outcome::Error(class) => ("error.type", format!("{class:?}").to_lowercase()),
        };
        let retrying =
            matches!(self.log.state().next_due(id), Some((_, Due::Retry { fire_ms: f, .. })) if f == fire_ms);
        let mut records = vec![SpanRecord {
            name: "attempt",
            trace_id: trace_id.clone(),
            span_id: attempt_span_id(id, fire_ms, attempt),
            parent_span_id: Some(fire_span.clone()),
            start_ms: started_ms,
            end_ms: finished_ms,
            attributes: vec![
                ("sundial.job_id", id.to_string()),
                ("sundial.fire_ms", fire_ms.to_string()),
                ("sundial.attempt", attempt.to_string()),
                ("url.full", job.spec.target.url.clone()),
                result.clone(),
            ],
            failed: !outcome.succeeded(),
        }];
        if !retrying {
            records.push(SpanRecord {
                name: "fire",
                trace_id,
                span_id: fire_span,
                parent_span_id: trace.map(|t| t.span_id),
                start_ms: fire_ms.min(started_ms),
                end_ms: finished_ms,
                attributes: vec![
                    ("sundial.job_id", id.to_string()),
                    ("sundial.fire_ms", fire_ms.to_string()),
                    ("sundial.attempts", attempt.to_string()),
                    result,
                ],
                failed: !outcome.succeeded(),
            });
        }
        self.keep_spans(records);
    }

    /// Keeps spans for `take_spans` (only when `record_spans` is on), within the bound.
    pub fn keep_spans(&mut self, records: Vec<SpanRecord>) {
        if !self.config.record_spans {
            return;
        }
        for record in records {
            if self.spans.len() >= SPANS_KEPT_MAX {
                self.spans_dropped += 1;
                continue;
            }
            self.spans.push(record);
        }
    }

    /// The spans finished since the last call, and how many were dropped (the buffer was
    /// full) since the start.
    pub fn take_spans(&mut self) -> (Vec<SpanRecord>, u64) {
        (std::mem::take(&mut self.spans), self.spans_dropped)
    }

    /// Outcomes already waiting, without waiting (at most `max`).
    pub fn ready_results(&mut self, max: usize) -> Vec<AttemptResult> {
        let mut results = Vec::new();
        let Some(receiver) = &mut self.results else { return results };
        while results.len() < max {
            match receiver.try_recv() {
                Ok(result) => results.push(result),
                Err(_) => break,
            }
        }
        results
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}
