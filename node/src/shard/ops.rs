//! What a shard does with a request for one of its partitions: commands and queries on the
//! partition's runtime, answered as a status and a JSON body that both APIs (HTTP and the
//! binary protocol) hand on in their own framing.

use serde_json::{json, Value};
use sundial_engine::job::{Backoff, JobSpec, Missing, Repeated, Schedule};
use sundial_engine::state::{Applied, ApplyError, Command, FlowKey, Job, State, Status};

/// An answer: status code (HTTP's; the binary protocol mirrors it), JSON body (`None`: no
/// body) and, for 429/503/507, when to retry.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    pub status: u16,
    pub body: Option<Value>,
    pub retry_after_s: Option<u32>,
    /// Set when the work was refused for a reason the router acts on (typed, so nothing
    /// inside the node reads the body back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

/// Why work was not done, as the node itself acts on it: forwarded to the member that
/// leads, retried shortly for want of a leader, or handed to the client to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Refusal {
    /// Another member leads the partition: the router forwards the work there.
    NotLeader { partition: u32, leader: u64 },
    /// No member leads the partition now (an election or a leadership transfer) and nothing
    /// was proposed: safe to retry, and the router does, briefly, before answering.
    NoLeader { partition: u32 },
    /// A shard's inbox is full.
    Overloaded,
    /// The node is stopping.
    Stopping,
}

impl Refusal {
    /// The answer a client gets for it (HTTP's status and `{"error", "code"}`).
    pub fn answer(self, message: impl Into<String>) -> Answer {
        let message = message.into();
        let answer = match self {
            Refusal::NotLeader { leader, .. } => Answer {
                status: NOT_LEADER_STATUS,
                body: Some(json!({"error": message, "code": "not_leader", "leader": leader})),
                retry_after_s: None,
                refusal: None,
            },
            Refusal::NoLeader { .. } => retry_later(503, "no_leader", message, 1),
            Refusal::Overloaded => retry_later(503, "overloaded", message, 1),
            Refusal::Stopping => retry_later(503, "unavailable", message, 5),
        };
        Answer { refusal: Some(self), ..answer }
    }
}

impl Answer {
    /// The body as the bytes both APIs send (empty when none). Written straight into a
    /// vector: `Value`'s `Display` goes through `fmt`'s adapters, a tenth of a node's CPU
    /// under ingest at max (docs/BENCHMARKS.md).
    pub fn into_body_bytes(self) -> Vec<u8> {
        // A `Value`'s keys are strings, so writing it cannot fail; empty if it ever did.
        self.body.map(|body| serde_json::to_vec(&body).unwrap_or_default()).unwrap_or_default()
    }

    /// The member that leads, when this refusal says another does.
    pub fn leader_named(&self) -> Option<u64> {
        match self.refusal {
            Some(Refusal::NotLeader { leader, .. }) => Some(leader),
            _ => None,
        }
    }

    /// Refused for want of a leader (nothing was proposed).
    pub fn wants_leader(&self) -> bool {
        matches!(self.refusal, Some(Refusal::NoLeader { .. }))
    }
}

pub fn answer(status: u16, body: Value) -> Answer {
    Answer { status, body: Some(body), retry_after_s: None, refusal: None }
}

/// An error answer: `{"error": message, "code": code}`.
pub fn error(status: u16, code: &str, message: impl Into<String>) -> Answer {
    answer(status, json!({"error": message.into(), "code": code}))
}

/// An error answer that names the offending field.
pub fn field_error(field: &str, message: impl Into<String>) -> Answer {
    answer(400, json!({"error": message.into(), "code": "invalid", "field": field}))
}

/// A refusal the client should retry after `retry_after_s`.
pub fn retry_later(status: u16, code: &str, message: impl Into<String>, retry_after_s: u32) -> Answer {
    Answer { retry_after_s: Some(retry_after_s), ..error(status, code, message) }
}

/// Operations on one job (or one of its dead letters), routed by the job's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JobOp {
    Get,
    Status,
    Executions,
    Cancel,
    Delete,
    Pause,
    Resume,
    Redrive {
        fire_ms: u64,
    },
    /// Puts every dead-lettered fire of the job back.
    RedriveAll,
    /// Drops the job's dead letters.
    Purge,
    /// An extra fire now, with its own key.
    Trigger,
    /// A fire for each occurrence of the job's cron schedule in `[from_ms, to_ms]`.
    Backfill {
        from_ms: u64,
        to_ms: u64,
    },
    /// Reads a flow key (the "id" is the key: keys are routed by the same hash as ids).
    KeyGet,
    KeyPause,
    KeyResume,
}

/// Whether a create may replace the job with its id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CreateMode {
    /// A new job; the same request again is answered 200 (idempotent), a finished job's id
    /// is refused for the dedup window.
    #[default]
    Create,
    /// Creates the job or replaces the spec of the one with its id (`PUT /jobs/{id}`).
    Upsert,
}

/// The command `op` makes of the job `id`; `None` for a read.
pub fn job_command(id: &str, op: JobOp, now: u64) -> Option<Command> {
    let id = id.to_string();
    match op {
        JobOp::Get | JobOp::Status | JobOp::Executions | JobOp::KeyGet => None,
        JobOp::KeyPause => Some(Command::PauseKey { key: id }),
        JobOp::KeyResume => Some(Command::ResumeKey { key: id, now_ms: now }),
        JobOp::Cancel => Some(Command::Cancel { id, now_ms: now }),
        JobOp::Delete => Some(Command::Delete { id, now_ms: now }),
        JobOp::Pause => Some(Command::Pause { id }),
        JobOp::Resume => Some(Command::Resume { id, now_ms: now }),
        JobOp::Redrive { fire_ms } => Some(Command::Redrive { id, fire_ms, now_ms: now }),
        JobOp::RedriveAll => Some(Command::RedriveJob { id, now_ms: now }),
        JobOp::Purge => Some(Command::Purge { id: Some(id) }),
        JobOp::Trigger => Some(Command::Trigger { id, now_ms: now }),
        JobOp::Backfill { from_ms, to_ms } => Some(Command::Backfill { id, from_ms, to_ms, now_ms: now }),
    }
}

/// The answer to a read `op` of the job `id`.
pub fn read_answer(state: &State, id: &str, op: JobOp, now_ms: u64) -> Answer {
    match op {
        JobOp::Status => with_job(state, id, |job| answer(200, json!({"id": job.id(), "status": job.status.as_str()}))),
        JobOp::Executions => with_job(state, id, |job| answer(200, executions(job))),
        JobOp::KeyGet | JobOp::KeyPause | JobOp::KeyResume => match state.flow_key(id) {
            Some(key) => answer(200, flow_key_view(state, id, key, now_ms)),
            None => error(404, "not_found", format!("flow key {id} has no jobs and is not paused")),
        },
        _ => with_job(state, id, |job| answer(200, job_view(job))),
    }
}

fn with_job(state: &State, id: &str, view: impl FnOnce(&Job) -> Answer) -> Answer {
    match state.job(id) {
        Some(job) => view(job),
        None => error(404, "not_found", format!("job {id} not found")),
    }
}

/// Creates admitted: answered already (refused) or waiting for their command's verdict.
pub struct CreatePlan {
    /// One per spec, in order; `None` until the verdict of its create is known.
    pub answers: Vec<Option<Answer>>,
    /// For each command: the slot it answers and the job's id.
    pub waiting: Vec<(usize, String)>,
    pub commands: Vec<Command>,
}

/// How a partition's creates are made: as creates (with the node's dedup window) or upserts,
/// and what admission allows (the one place creates are admitted).
#[derive(Clone, Debug)]
pub struct CreateHow {
    pub mode: CreateMode,
    pub dedup_window_ms: u64,
    /// The node's live-job limit, and the room left under it.
    pub max_jobs: usize,
    pub room: usize,
    /// Set while the process's memory is over its limit: new jobs get this refusal.
    pub memory_full: Option<Answer>,
}

/// The refusal of new jobs while resident memory is over `limit_bytes` (0: no limit).
pub fn memory_full(limit_bytes: u64) -> Option<Answer> {
    if limit_bytes == 0 {
        return None;
    }
    let resident = crate::obs::resident_memory_bytes()?;
    (resident > limit_bytes).then(|| {
        let message = format!(
            "this node uses {} MiB of memory, over its limit of {} MiB; retry when jobs have finished",
            resident >> 20,
            limit_bytes >> 20
        );
        retry_later(507, "storage_full", message, 30)
    })
}

/// Admits at most `how.room` new jobs (the node's live-job limit) and makes their creates.
pub fn plan_creates(state: &State, specs: Vec<JobSpec>, now_ms: u64, how: CreateHow) -> CreatePlan {
    let CreateHow { mode, dedup_window_ms, max_jobs, room, memory_full } = how;
    let mut plan = CreatePlan { answers: Vec::with_capacity(specs.len()), waiting: Vec::new(), commands: Vec::new() };
    let mut admitted = 0usize;
    for spec in specs {
        // A create of a live job that exists is answered by the state machine (200 or 409)
        // and takes no room; a finished job a create replaces (or an upsert revives) is live
        // again, so it does.
        let exists = state.job(&spec.id).is_some_and(|job| !job.status.is_final());
        if let (false, Some(refused)) = (exists, &memory_full) {
            plan.answers.push(Some(refused.clone()));
            continue;
        }
        if !exists && admitted >= room {
            // Admission control: a node holding its maximum of live (pending or running)
            // jobs refuses new ones and keeps serving the rest.
            let message = format!("this node holds its maximum of {max_jobs} live jobs; retry when some have finished");
            plan.answers.push(Some(retry_later(507, "storage_full", message, 30)));
            continue;
        }
        admitted += usize::from(!exists);
        plan.waiting.push((plan.answers.len(), spec.id.clone()));
        let spec = Box::new(spec);
        plan.commands.push(match mode {
            CreateMode::Create => Command::Create { spec, now_ms, dedup_window_ms: Some(dedup_window_ms) },
            CreateMode::Upsert => Command::Upsert { spec, now_ms },
        });
        plan.answers.push(None);
    }
    plan
}

/// The answer to a create of `id` once its verdict is known.
pub fn create_answer(state: &State, id: &str, verdict: Result<Applied, ApplyError>) -> Answer {
    match verdict {
        Ok(applied) => {
            let status = if applied == Applied::Created { 201 } else { 200 };
            if status == 201 {
                // Debug, not info: at tens of thousands of creates a second one line per
                // job costs more CPU than the create (measured: docs/BENCHMARKS.md).
                tracing::debug!(job_id = %id, "job created");
            }
            with_job(state, id, |job| answer(status, job_view(job)))
        }
        Err(e) => apply_error(e),
    }
}

/// This replica does not lead the partition: the request belongs on `leader` (the router
/// forwards it there), or nowhere yet while an election runs.
pub fn not_leader(partition: u32, leader: Option<u64>) -> Answer {
    match leader {
        Some(leader) => {
            Refusal::NotLeader { partition, leader }.answer(format!("partition {partition} is led by node {leader}"))
        }
        None => no_leader(partition, format!("partition {partition} is electing a leader; retry shortly")),
    }
}

/// A refusal for want of a leader (nothing was proposed), saying `message`.
pub fn no_leader(partition: u32, message: String) -> Answer {
    Refusal::NoLeader { partition }.answer(message)
}

/// The status of a `not_leader` answer (HTTP's "misdirected request"); the router turns
/// it into a forward, so a client sees it only when forwarding failed.
pub const NOT_LEADER_STATUS: u16 = 421;

/// Jobs not yet final (pending or running): what admission control counts.
pub fn live_jobs(state: &State) -> usize {
    (state.count(Status::Pending) + state.count(Status::InProgress)) as usize
}

/// A job's age: creation time, then id.
fn age<'a>((id, job): &(&'a str, &'a Job)) -> (u64, &'a str) {
    (job.created_ms, id)
}

/// The `limit` oldest jobs (by creation time, then id) of this partition, optionally of one
/// status, oldest first.
pub fn list_jobs(state: &State, status: Option<Status>, limit: usize) -> Vec<Value> {
    let mut jobs: Vec<(&str, &Job)> =
        state.jobs().filter(|job| status.is_none_or(|s| job.status == s)).map(|job| (job.id(), job)).collect();
    if jobs.len() > limit && limit > 0 {
        jobs.select_nth_unstable_by_key(limit - 1, age);
        jobs.truncate(limit);
    }
    jobs.sort_by_key(age);
    jobs.into_iter().take(limit).map(|(_, job)| job_view(job)).collect()
}

/// A flow key as clients see it: its limits, pause, jobs, attempts in flight and backlog.
pub fn flow_key_view(state: &State, name: &str, key: &FlowKey, now_ms: u64) -> Value {
    json!({
        "key": name,
        "parallelism": key.parallelism,
        "rate": key.rate,
        "period_ms": key.period_ms,
        "ordered": key.ordered,
        "paused": key.paused,
        "jobs": key.jobs.len(),
        "in_flight": state.flow_in_flight(key),
        "active_fires": state.flow_active(key).len(),
        "backlog": state.flow_backlog(key, now_ms),
    })
}

/// Up to `limit` flow keys of this partition, by name.
pub fn flow_keys(state: &State, limit: usize, now_ms: u64) -> Vec<Value> {
    state.flow_keys().take(limit).map(|(name, key)| flow_key_view(state, name, key, now_ms)).collect()
}

/// `{"id", "created_ms"}` of up to `limit` jobs of this partition carrying every one of
/// `labels`, oldest first.
pub fn labelled_jobs(state: &State, labels: &[(String, String)], limit: usize) -> Vec<Value> {
    let mut jobs: Vec<(&str, &Job)> =
        state.jobs().filter(|job| job.spec.has_labels(labels)).map(|job| (job.id(), job)).collect();
    jobs.sort_by_key(age);
    jobs.into_iter().take(limit).map(|(id, job)| json!({"id": id, "created_ms": job.created_ms})).collect()
}

/// Up to `limit` dead letters of this partition, oldest first.
pub fn dead_letters(state: &State, limit: usize) -> Vec<Value> {
    state
        .dead_letters()
        .take(limit)
        .map(|(id, fire_ms, letter)| {
            json!({"id": id, "fire_ms": fire_ms, "attempts": letter.attempts, "reason": letter.reason, "moved_ms": letter.moved_ms})
        })
        .collect()
}

/// The answer to dropping every dead letter of a partition.
pub fn purge_answer(verdict: Result<Applied, ApplyError>) -> Answer {
    match verdict {
        Ok(_) => answer(200, json!({"done": true})),
        Err(e) => apply_error(e),
    }
}

/// The answer to a command on the job `id`: the job as it is now (204 for a delete), or
/// the refusal.
pub fn command_answer(state: &State, id: &str, op: JobOp, verdict: Result<Applied, ApplyError>, now_ms: u64) -> Answer {
    match (verdict, op) {
        (Err(e), _) => apply_error(e),
        (Ok(_), JobOp::Delete) => Answer { status: 204, body: None, retry_after_s: None, refusal: None },
        (Ok(_), JobOp::KeyPause | JobOp::KeyResume) => match state.flow_key(id) {
            Some(key) => answer(200, flow_key_view(state, id, key, now_ms)),
            None => answer(200, json!({"key": id, "paused": false, "jobs": 0})),
        },
        (Ok(Applied::Fires { fire_ms }), _) => match state.job(id) {
            Some(job) => {
                let mut view = job_view(job);
                view["fires_added"] = json!(fire_ms);
                answer(200, view)
            }
            None => answer(200, json!({"id": id, "fires_added": fire_ms})),
        },
        (Ok(_), _) => match state.job(id) {
            Some(job) => answer(200, job_view(job)),
            None => answer(200, json!({"id": id})),
        },
    }
}

pub fn apply_error(e: ApplyError) -> Answer {
    match &e {
        ApplyError::NotFound(_) => error(404, "not_found", e.to_string()),
        ApplyError::Conflict(_)
        | ApplyError::KeyNotPaused(_)
        | ApplyError::Required { .. }
        | ApplyError::InvalidState { .. }
        | ApplyError::StaleAttempt { .. }
        | ApplyError::NotDeadLettered { .. } => error(409, "conflict", e.to_string()),
        ApplyError::UnknownDependency(_) | ApplyError::Cycle(_) => field_error("depends_on", e.to_string()),
        ApplyError::Duplicate { id, finished_ms, until_ms } => answer(
            409,
            json!({"error": e.to_string(), "code": "duplicate", "id": id, "finished_ms": finished_ms, "until_ms": until_ms}),
        ),
        ApplyError::Invalid { field, .. } => field_error(field, e.to_string()),
        ApplyError::Unavailable(_) => retry_later(503, "unavailable", e.to_string(), 5),
    }
}

/// A job as clients see it (Scheduled-DB's fields first).
pub fn job_view(job: &Job) -> Value {
    let spec = job.spec();
    let (kind, schedule) = match &spec.schedule {
        Schedule::Once { at_ms } => ("unico", json!({"run_at_ms": at_ms})),
        Schedule::Cron(cron) => (
            "recurrente",
            json!({
                "cron_expression": cron.expression,
                "time_zone": cron.time_zone,
                "start_ms": cron.start_ms,
                "last_date_ms": cron.end_ms,
                "dst": {
                    "repeated": if cron.dst.repeated == Repeated::Both { "both" } else { "first" },
                    "missing": if cron.dst.missing == Missing::Skip { "skip" } else { "shift" },
                },
                "pause_after_failures": cron.pause_after_failures,
            }),
        ),
    };
    let retry = &spec.retry;
    let backoff = match &retry.backoff {
        Backoff::Exponential => json!("exponential"),
        Backoff::Fixed => json!("fixed"),
        Backoff::Delays(delays) => json!(delays),
    };
    json!({
        "id": job.id(),
        "type": kind,
        "status": job.status.as_str(),
        "webhook_url": spec.target.url,
        "method": spec.target.method.as_str(),
        "schedule": schedule,
        "next_fire_ms": job.next_fire_ms,
        "paused": job.paused,
        "paused_reason": job.life().paused_reason,
        "retry": {
            "max_attempts": retry.max_attempts,
            "backoff": backoff,
            "initial_backoff_ms": retry.initial_backoff_ms,
            "max_backoff_ms": retry.max_backoff_ms,
            "multiplier": f64::from(retry.multiplier_permille) / 1000.0,
            "jitter": f64::from(retry.jitter_percent) / 100.0,
        },
        "signing": {"own_secret": spec.secret.is_some(), "rotating": spec.secret_next.is_some()},
        "flow": spec.flow.as_ref().map(|flow| json!({"key": flow.key, "parallelism": flow.parallelism, "rate": flow.rate, "period_ms": flow.period_ms, "ordered": flow.ordered})),
        "callbacks": {"on_success": spec.callbacks.on_success, "on_failure": spec.callbacks.on_failure},
        "callbacks_pending": job.life().callbacks.len(),
        "priority": spec.priority,
        "labels": spec.labels,
        "created_ms": job.created_ms,
        "fires": {"succeeded": job.life().fires_succeeded, "failed": job.life().fires_failed, "missed": job.life().fires_missed},
    })
}

fn executions(job: &Job) -> Value {
    let list: Vec<Value> = job
        .life()
        .history
        .iter()
        .map(|e| {
            json!({
                "fire_ms": e.fire_ms,
                "attempt": e.attempt,
                "node": e.node,
                "started_ms": e.started_ms,
                "finished_ms": e.finished_ms,
                "latency_ms": e.latency_ms(),
                "status_code": e.status_code,
                "error": e.error.map(|c| format!("{c:?}").to_lowercase()),
                "response_body": String::from_utf8_lossy(&e.response_body),
                "missed": e.missed,
                "note": e.note,
            })
        })
        .collect();
    json!({"id": job.id(), "executions": list})
}
