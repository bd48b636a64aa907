//! What a shard does with a request for one of its partitions: commands and queries on the
//! partition's runtime, answered as a status and a JSON body that both APIs (HTTP and the
//! binary protocol) hand on in their own framing.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sundial_engine::job::{Backoff, JobSpec, Missing, Repeated, Schedule};
use sundial_engine::spec::PackedSpec;
use sundial_engine::state::{Applied, ApplyError, Command, FlowKey, Job, State, Status};

/// An answer: status code (HTTP's; the binary protocol mirrors it), JSON body as written
/// (`None`: no body) and, for 429/503/507, when to retry.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    pub status: u16,
    pub body: Option<Box<RawValue>>,
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
    /// A shard's inbox is full, or a partition's leader is behind its commits.
    Overloaded,
    /// The node is stopping.
    Stopping,
}

impl Refusal {
    /// The answer a client gets for it (HTTP's status and `{"error", "code"}`).
    pub fn answer(self, message: impl Into<String>) -> Answer {
        let message = message.into();
        let answer = match self {
            Refusal::NotLeader { leader, .. } => {
                answer(NOT_LEADER_STATUS, json!({"error": message, "code": "not_leader", "leader": leader}))
            }
            Refusal::NoLeader { .. } => retry_later(503, "no_leader", message, 1),
            Refusal::Overloaded => retry_later(503, "overloaded", message, 1),
            Refusal::Stopping => retry_later(503, "unavailable", message, 5),
        };
        Answer { refusal: Some(self), ..answer }
    }
}

/// Equal answers say the same: status, the same JSON (whatever its spacing), retry and refusal.
impl PartialEq for Answer {
    fn eq(&self, other: &Answer) -> bool {
        (self.status, self.body_value(), self.retry_after_s, self.refusal)
            == (other.status, other.body_value(), other.retry_after_s, other.refusal)
    }
}

/// `body` as JSON text. Writing a `Value` or a derived view cannot fail (string keys only);
/// were it ever to, the body is `null` rather than a panic.
pub fn raw_json(body: &impl Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(body).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

impl Answer {
    /// The body as the bytes both APIs send (empty when none): the JSON as written.
    pub fn into_body_bytes(self) -> Vec<u8> {
        self.body.map(|body| Box::<str>::from(body).into_boxed_bytes().into_vec()).unwrap_or_default()
    }

    /// The body read back as a `Value` (for the few that look inside an answer: the console,
    /// a refusal's code, a trigger's fires).
    pub fn body_value(&self) -> Option<Value> {
        self.body.as_ref().and_then(|body| serde_json::from_str(body.get()).ok())
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
    Answer { status, body: Some(raw_json(&body)), retry_after_s: None, refusal: None }
}

/// An answer whose body is a job's view, serialized straight from the job.
fn job_answer(status: u16, job: &Job) -> Answer {
    let spec = job.spec();
    Answer { status, body: Some(raw_json(&JobView::of(job, &spec))), retry_after_s: None, refusal: None }
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

/// What a create's answer carries: the whole job (the default), or only its id — HTTP's
/// `Prefer: return=minimal` (RFC 7240) and the binary protocol's MINIMAL flag, for clients
/// that load jobs in bulk and have no use for their own request echoed back (building that
/// echo reads the job back and writes its JSON: about a tenth of a create's CPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Representation {
    #[default]
    Full,
    Minimal,
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
        _ => with_job(state, id, |job| job_answer(200, job)),
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
        // Archived here, once: the entry carries these bytes and the spec store keeps them.
        let spec = PackedSpec::of(&spec);
        plan.commands.push(match mode {
            CreateMode::Create => Command::Create { spec, now_ms, dedup_window_ms: Some(dedup_window_ms) },
            CreateMode::Upsert => Command::Upsert { spec, now_ms },
        });
        plan.answers.push(None);
    }
    plan
}

/// A minimal answer's body: `{"id": ...}`.
#[derive(Serialize)]
struct IdView<'a> {
    id: &'a str,
}

/// The answer to a create of `id` once its verdict is known.
pub fn create_answer(
    state: &State,
    id: &str,
    verdict: Result<Applied, ApplyError>,
    representation: Representation,
) -> Answer {
    match verdict {
        Ok(applied) => {
            let status = if applied == Applied::Created { 201 } else { 200 };
            if status == 201 {
                // Debug, not info: at tens of thousands of creates a second one line per
                // job costs more CPU than the create (measured: docs/BENCHMARKS.md).
                tracing::debug!(job_id = %id, "job created");
            }
            match representation {
                Representation::Full => with_job(state, id, |job| job_answer(status, job)),
                // Serialized straight from the id: a `json!` map per create cost as much
                // as the rest of the answer.
                Representation::Minimal => {
                    Answer { status, body: Some(raw_json(&IdView { id })), retry_after_s: None, refusal: None }
                }
            }
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
            Some(job) => job_answer(200, job),
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

/// A job as clients see it: serialized straight from the job (no `Value` is built: at tens
/// of thousands of creates a second, building and writing the map was a fifth of a node's
/// CPU). Fields in alphabetical order, nested ones too: the bytes are those the map form
/// wrote.
#[derive(Serialize)]
pub struct JobView<'a> {
    callbacks: CallbacksView<'a>,
    callbacks_pending: usize,
    created_ms: u64,
    fires: FiresView,
    flow: Option<FlowView<'a>>,
    id: &'a str,
    labels: &'a std::collections::BTreeMap<String, String>,
    method: &'static str,
    next_fire_ms: Option<u64>,
    paused: bool,
    paused_reason: Option<&'a str>,
    priority: u8,
    retry: RetryView<'a>,
    schedule: ScheduleView<'a>,
    signing: SigningView,
    status: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    webhook_url: &'a str,
}

#[derive(Serialize)]
struct CallbacksView<'a> {
    on_failure: Option<&'a str>,
    on_success: Option<&'a str>,
}

#[derive(Serialize)]
struct FiresView {
    failed: u64,
    missed: u64,
    succeeded: u64,
}

#[derive(Serialize)]
struct FlowView<'a> {
    key: &'a str,
    ordered: Option<bool>,
    parallelism: Option<u32>,
    period_ms: Option<u64>,
    rate: Option<u32>,
}

#[derive(Serialize)]
struct RetryView<'a> {
    backoff: BackoffView<'a>,
    initial_backoff_ms: u64,
    jitter: f64,
    max_attempts: u32,
    max_backoff_ms: u64,
    multiplier: f64,
}

#[derive(Serialize)]
#[serde(untagged)]
enum BackoffView<'a> {
    Named(&'static str),
    Delays(&'a [u64]),
}

#[derive(Serialize)]
#[serde(untagged)]
enum ScheduleView<'a> {
    Once {
        run_at_ms: u64,
    },
    Cron {
        cron_expression: &'a str,
        dst: DstView,
        last_date_ms: Option<u64>,
        pause_after_failures: Option<u32>,
        start_ms: Option<u64>,
        time_zone: &'a str,
    },
}

#[derive(Serialize)]
struct DstView {
    missing: &'static str,
    repeated: &'static str,
}

#[derive(Serialize)]
struct SigningView {
    own_secret: bool,
    rotating: bool,
}

impl<'a> JobView<'a> {
    /// The view of `job`, whose spec (read once by the caller) is `spec`.
    pub fn of(job: &'a Job, spec: &'a JobSpec) -> JobView<'a> {
        let (kind, schedule) = match &spec.schedule {
            Schedule::Once { at_ms } => ("unico", ScheduleView::Once { run_at_ms: *at_ms }),
            Schedule::Cron(cron) => (
                "recurrente",
                ScheduleView::Cron {
                    cron_expression: &cron.expression,
                    dst: DstView {
                        missing: if cron.dst.missing == Missing::Skip { "skip" } else { "shift" },
                        repeated: if cron.dst.repeated == Repeated::Both { "both" } else { "first" },
                    },
                    last_date_ms: cron.end_ms,
                    pause_after_failures: cron.pause_after_failures,
                    start_ms: cron.start_ms,
                    time_zone: &cron.time_zone,
                },
            ),
        };
        let retry = &spec.retry;
        let backoff = match &retry.backoff {
            Backoff::Exponential => BackoffView::Named("exponential"),
            Backoff::Fixed => BackoffView::Named("fixed"),
            Backoff::Delays(delays) => BackoffView::Delays(delays),
        };
        let life = job.life();
        JobView {
            callbacks: CallbacksView {
                on_failure: spec.callbacks.on_failure.as_deref(),
                on_success: spec.callbacks.on_success.as_deref(),
            },
            callbacks_pending: life.callbacks.len(),
            created_ms: job.created_ms,
            fires: FiresView { failed: life.fires_failed, missed: life.fires_missed, succeeded: life.fires_succeeded },
            flow: spec.flow.as_ref().map(|flow| FlowView {
                key: &flow.key,
                ordered: flow.ordered,
                parallelism: flow.parallelism,
                period_ms: flow.period_ms,
                rate: flow.rate,
            }),
            id: job.id(),
            labels: &spec.labels,
            method: spec.target.method.as_str(),
            next_fire_ms: job.next_fire_ms,
            paused: job.paused,
            paused_reason: life.paused_reason.as_deref(),
            priority: spec.priority,
            retry: RetryView {
                backoff,
                initial_backoff_ms: retry.initial_backoff_ms,
                jitter: f64::from(retry.jitter_percent) / 100.0,
                max_attempts: retry.max_attempts,
                max_backoff_ms: retry.max_backoff_ms,
                multiplier: f64::from(retry.multiplier_permille) / 1000.0,
            },
            schedule,
            signing: SigningView { own_secret: spec.secret.is_some(), rotating: spec.secret_next.is_some() },
            status: job.status.as_str(),
            kind,
            webhook_url: &spec.target.url,
        }
    }
}

/// A job's view as a `Value` (for lists and the console, which add to it or gather many).
pub fn job_view(job: &Job) -> Value {
    let spec = job.spec();
    serde_json::to_value(JobView::of(job, &spec)).unwrap_or(Value::Null)
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

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_engine::request::parse_job_request;

    const T0: u64 = 1_800_000_000_000;

    fn created(state: &mut State, request: Value) -> &Job {
        let spec = parse_job_request(&request.to_string(), T0, "unused").expect("valid request");
        let id = spec.id.clone();
        state
            .apply(Command::Create { spec: PackedSpec::of(&spec), now_ms: T0, dedup_window_ms: None })
            .expect("created");
        state.job(&id).expect("the job")
    }

    /// The typed view writes what clients have always read: the same fields and values, in
    /// the order a JSON map would put them (so the bytes did not change either).
    #[test]
    fn a_job_view_is_the_json_clients_read_with_its_keys_in_map_order() {
        let mut state = State::new();
        let cron = created(
            &mut state,
            json!({"id": "c", "cron": "*/5 * * * *", "time_zone": "Europe/Paris",
            "url": "https://example.com/c", "flow": {"key": "k", "parallelism": 2}, "labels": {"team": "a"},
            "callbacks": {"on_failure": "https://example.com/f"}, "secret": "s3cret", "priority": 1,
            "retry": {"max_attempts": 4, "backoff": [100, 200]}}),
        );
        let view = serde_json::to_value(JobView::of(cron, &cron.spec())).expect("json");
        assert_eq!(view["id"], "c");
        assert_eq!(view["type"], "recurrente");
        assert_eq!(view["status"], "pending");
        assert_eq!(view["schedule"]["cron_expression"], "*/5 * * * *");
        assert_eq!(view["schedule"]["time_zone"], "Europe/Paris");
        assert_eq!(view["schedule"]["dst"], json!({"missing": "shift", "repeated": "first"}));
        assert_eq!(
            view["flow"],
            json!({"key": "k", "ordered": null, "parallelism": 2, "period_ms": null, "rate": null})
        );
        assert_eq!(view["labels"], json!({"team": "a"}));
        assert_eq!(view["callbacks"], json!({"on_failure": "https://example.com/f", "on_success": null}));
        assert_eq!(view["signing"], json!({"own_secret": true, "rotating": false}));
        assert_eq!(view["retry"]["backoff"], json!([100, 200]));
        assert_eq!(view["retry"]["max_attempts"], 4);
        assert_eq!(view["fires"], json!({"failed": 0, "missed": 0, "succeeded": 0}));
        assert_eq!((view["priority"].as_u64(), view["callbacks_pending"].as_u64()), (Some(1), Some(0)));
        let written = serde_json::to_string(&JobView::of(cron, &cron.spec())).expect("json");
        assert_eq!(written, view.to_string(), "keys in map order at every level");

        let once = created(&mut state, json!({"id": "o", "run_at": T0 + 60_000, "url": "https://example.com/o"}));
        let view = serde_json::to_value(JobView::of(once, &once.spec())).expect("json");
        assert_eq!(
            (view["type"].as_str(), view["schedule"].clone()),
            (Some("unico"), json!({"run_at_ms": T0 + 60_000}))
        );
        assert_eq!((view["flow"].clone(), view["retry"]["backoff"].clone()), (Value::Null, json!("exponential")));
        assert_eq!(view["next_fire_ms"], T0 + 60_000);
        let written = serde_json::to_string(&JobView::of(once, &once.spec())).expect("json");
        assert_eq!(written, view.to_string());
        let answered = create_answer(&state, "o", Ok(Applied::Created), Representation::Full);
        assert_eq!((answered.status, answered.into_body_bytes()), (201, written.into_bytes()));
    }
}
