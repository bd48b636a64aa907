//! A single-node runtime that runs the life of a fire end to end: the state machine (each
//! command applied at once, standing in for the Raft log until the node binary wires one
//! in), the timing wheel (one timer per job, at its next due time), and the dispatcher.
//! Due fire → attempt submitted (a full queue leaves it due; it is tried again shortly) →
//! `FireStarted` → outcome → `AttemptFinished` with a retry time (backoff with jitter, or
//! Retry-After if longer) → the state machine decides retry, success or dead letter.

use crate::dispatch::{now_ms, Attempt, AttemptResult, DispatchConfig, Dispatcher};
use crate::state::{Applied, ApplyError, Command, Due, Outcome, State};
use crate::wheel::{Expired, TimerHandle, TimingWheel};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;

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
}

impl Default for RuntimeConfig {
    fn default() -> RuntimeConfig {
        RuntimeConfig {
            node_id: 1,
            dispatch: DispatchConfig::default(),
            results_capacity: 4096,
            timers_max: 10_000_000,
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

pub struct LocalRuntime {
    config: RuntimeConfig,
    state: State,
    wheel: TimingWheel<String>,
    timers: HashMap<String, TimerHandle>,
    dispatcher: Dispatcher,
    results: mpsc::Receiver<AttemptResult>,
    rng: u64,
    stats: RuntimeStats,
}

impl LocalRuntime {
    /// Starts on the current tokio runtime.
    pub fn start(config: RuntimeConfig) -> LocalRuntime {
        let (sender, results) = mpsc::channel(config.results_capacity);
        let dispatcher = Dispatcher::start(config.dispatch.clone(), sender);
        LocalRuntime {
            wheel: TimingWheel::new(now_ms(), config.timers_max),
            config,
            state: State::new(),
            timers: HashMap::new(),
            dispatcher,
            results,
            rng: now_ms() | 1,
            stats: RuntimeStats::default(),
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn stats(&self) -> RuntimeStats {
        self.stats
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Applies a client command (create, cancel, pause, …) and re-arms the job's timer.
    pub fn apply(&mut self, command: Command) -> Result<Applied, ApplyError> {
        let id = match &command {
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
        let stops_attempts = matches!(command, Command::Cancel { .. } | Command::Delete { .. });
        let applied = self.state.apply(command)?;
        if let Some(id) = id {
            if stops_attempts {
                self.dispatcher.cancel(&id);
            }
            self.arm(&id);
            // A completed job may release jobs that depend on it.
            if self.state.job(&id).is_some_and(|job| job.status == crate::state::Status::Completed) {
                for dependent in self.state.dependents_of(&id) {
                    self.arm(&dependent);
                }
            }
        }
        Ok(applied)
    }

    /// Sets the job's timer to its next due time (or removes it).
    fn arm(&mut self, id: &str) {
        if let Some(handle) = self.timers.remove(id) {
            self.wheel.cancel(handle);
        }
        if let Some((due_ms, _)) = self.state.next_due(id) {
            if let Ok(handle) = self.wheel.insert(due_ms, id.to_string()) {
                self.timers.insert(id.to_string(), handle);
            }
        }
    }

    /// Runs fires and applies outcomes until `done` holds or `limit` passes; returns whether
    /// `done` held.
    pub async fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&State) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        // Bounded by `limit`.
        loop {
            if done(&self.state) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            self.fire_due_jobs();
            // Sleeps until the next timer or an outcome; `done` is looked at on each wake-up and
            // at least once a second.
            let wait_ms = self.wheel.next_wakeup_ms().map_or(1_000, |at| at.saturating_sub(now_ms()).clamp(1, 1_000));
            tokio::select! {
                result = self.results.recv() => {
                    if let Some(result) = result {
                        self.finish(result);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            }
        }
    }

    fn fire_due_jobs(&mut self) {
        let mut expired: Vec<Expired<String>> = Vec::new();
        self.wheel.advance_to(now_ms(), &mut expired);
        for timer in expired {
            let id = timer.value;
            self.timers.remove(&id);
            let now = now_ms();
            let Some((due_ms, due)) = self.state.next_due(&id) else { continue };
            if due_ms > now {
                self.arm(&id); // moved later meanwhile
                continue;
            }
            let (fire_ms, attempt) = match due {
                Due::NewFire { fire_ms } => (fire_ms, 1),
                Due::Retry { fire_ms, attempt } => (fire_ms, attempt),
            };
            if !self.dispatcher.has_room() {
                // The queue is full: the fire stays due and is tried again shortly.
                self.stats.queue_full_waits += 1;
                if let Ok(handle) = self.wheel.insert(now + QUEUE_FULL_RETRY_MS, id.clone()) {
                    self.timers.insert(id, handle);
                }
                continue;
            }
            // Committed before the request goes out, so an outcome always finds its fire.
            let started =
                Command::FireStarted { id: id.clone(), fire_ms, attempt, node: self.config.node_id, now_ms: now };
            if !matches!(self.apply(started), Ok(Applied::Done)) {
                continue; // missed under the misfire policy, or no longer due: re-armed by apply
            }
            let job = self.state.job(&id).expect("due jobs exist");
            let spec = &job.spec;
            let submission = Attempt {
                job_id: id.clone(),
                fire_ms,
                attempt,
                priority: spec.priority,
                due_ms,
                target: spec.target.clone(),
                timeout_ms: spec.attempt_timeout_ms,
                secret: spec.secret.as_ref().map(|s| s.as_bytes().to_vec()),
            };
            // Room was checked above and only this loop submits: this cannot be refused.
            if self.dispatcher.submit(submission).is_ok() {
                self.stats.attempts_started += 1;
            }
        }
    }

    fn finish(&mut self, result: AttemptResult) {
        self.stats.attempts_finished += 1;
        let Some(job) = self.state.job(&result.job_id) else { return };
        let retry = &job.spec.retry;
        let backoff_ms = retry.backoff_ms(result.attempt);
        let jitter_ms = backoff_ms * u64::from(retry.jitter_percent) / 100;
        let jitter_ms = if jitter_ms > 0 { self.next_random() % (jitter_ms + 1) } else { 0 };
        let retry_after_ms = match &result.outcome {
            Outcome::Response { retry_after_ms: Some(ms), .. } => *ms,
            _ => 0,
        };
        let retry_at_ms = result.finished_ms.saturating_add((backoff_ms + jitter_ms).max(retry_after_ms));
        let command = Command::AttemptFinished {
            id: result.job_id,
            fire_ms: result.fire_ms,
            attempt: result.attempt,
            node: self.config.node_id,
            started_ms: result.started_ms,
            finished_ms: result.finished_ms,
            outcome: result.outcome,
            retry_at_ms,
        };
        // A stale outcome (the job was cancelled meanwhile) is refused and changes nothing.
        let _ = self.apply(command);
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}
