//! The HTTP/JSON API's request handling, apart from the server loop: each request becomes a
//! command or a query on the runtime, answered with Scheduled-DB-compatible JSON. Errors are
//! `{"error": …, "code": …, "field"?: …, "problems"?: [{field, rule}]}` with the matching
//! status.

use serde_json::{json, Value};
use sundial_engine::dispatch::now_ms;
use sundial_engine::job::{new_job_id, Schedule};
use sundial_engine::request::parse_job_request;
use sundial_engine::runtime::{CommandLog, Runtime};
use sundial_engine::state::{Applied, ApplyError, Command, Job, State, Status};

/// Request bodies larger than this are refused with 413.
pub const REQUEST_BODY_MAX_BYTES: usize = 512 * 1024;
/// Jobs listed per `GET /jobs` at most (`?limit=` within it).
pub const LIST_LIMIT_MAX: usize = 1_000;
/// The OpenAPI document served at /openapi.json (node/openapi.json; a test checks that every
/// route it lists answers).
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Jobs created per `POST /jobs/batch` at most.
pub const BATCH_MAX: usize = 1_000;

/// Limits the API enforces before anything reaches the log.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Live jobs (pending or running) this node holds before creates are refused with 507.
    pub max_jobs: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_jobs: 1_000_000 }
    }
}

/// An answer: status code, JSON body (`None`: no body) and, for 429/503/507, when to retry.
pub struct Answer {
    pub status: u16,
    pub body: Option<Value>,
    pub retry_after_s: Option<u32>,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer { status, body: Some(body), retry_after_s: None }
}

fn error(status: u16, code: &str, message: impl Into<String>) -> Answer {
    answer(status, json!({"error": message.into(), "code": code}))
}

/// Routes one request. `random` feeds generated job ids.
pub fn handle<L: CommandLog>(
    runtime: &mut Runtime<L>,
    limits: &Limits,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    random: u128,
) -> Answer {
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    match (method, segments.as_slice()) {
        ("GET", ["health"]) => health(runtime),
        ("GET", ["openapi.json"]) => answer(200, serde_json::from_str(OPENAPI).expect("the bundled document is JSON")),
        ("POST", ["jobs"]) => match parse_body(body) {
            Ok(request) => create(runtime, limits, &request, random),
            Err(refused) => refused,
        },
        ("POST", ["jobs", "batch"]) => batch(runtime, limits, body, random),
        ("GET", ["dlq"]) => dead_letters(runtime.state()),
        ("POST", ["dlq", id, fire_ms, "redrive"]) => match fire_ms.parse::<u64>() {
            Ok(fire_ms) => command(runtime, Command::Redrive { id: id.to_string(), fire_ms, now_ms: now_ms() }),
            Err(_) => error(400, "invalid", "fire_ms: must be a whole number of milliseconds"),
        },
        ("DELETE", ["dlq"]) => command(runtime, Command::Purge { id: None }),
        ("DELETE", ["dlq", id]) => command(runtime, Command::Purge { id: Some(id.to_string()) }),
        ("GET", ["jobs"]) => list(runtime.state(), query),
        ("GET", ["jobs", id]) => with_job(runtime.state(), id, |job| answer(200, job_view(job))),
        ("GET", ["jobs", id, "status"]) => {
            with_job(runtime.state(), id, |job| answer(200, json!({"id": job.spec.id, "status": job.status.as_str()})))
        }
        ("GET", ["jobs", id, "executions"]) => with_job(runtime.state(), id, |job| answer(200, executions(job))),
        ("POST", ["jobs", id, "cancel"]) => command(runtime, Command::Cancel { id: id.to_string(), now_ms: now_ms() }),
        ("DELETE", ["jobs", id]) => match command(runtime, Command::Delete { id: id.to_string() }) {
            Answer { status: 200, .. } => Answer { status: 204, body: None, retry_after_s: None },
            other => other,
        },
        ("POST", ["jobs", id, "pause"]) => command(runtime, Command::Pause { id: id.to_string() }),
        ("POST", ["jobs", id, "resume"]) => command(runtime, Command::Resume { id: id.to_string(), now_ms: now_ms() }),
        (_, ["health"] | ["jobs"] | ["jobs", ..] | ["dlq", ..]) => {
            error(405, "method_not_allowed", format!("{method} is not allowed on {path}"))
        }
        _ => error(404, "not_found", format!("no route {path}")),
    }
}

fn with_job(state: &State, id: &str, view: impl FnOnce(&Job) -> Answer) -> Answer {
    match state.job(id) {
        Some(job) => view(job),
        None => error(404, "not_found", format!("job {id} not found")),
    }
}

fn create<L: CommandLog>(runtime: &mut Runtime<L>, limits: &Limits, request: &Value, random: u128) -> Answer {
    create_many(runtime, limits, vec![Ok(request.clone())], random).pop().expect("one answer per request")
}

/// Creates jobs from several requests with one write to the log (group commit): each is
/// validated and admitted on its own, the admitted ones are applied together, and the
/// answers come back in request order. `Err` entries are requests already refused.
pub fn create_many<L: CommandLog>(
    runtime: &mut Runtime<L>,
    limits: &Limits,
    requests: Vec<Result<Value, Answer>>,
    random: u128,
) -> Vec<Answer> {
    let now = now_ms();
    let mut answers: Vec<Option<Answer>> = Vec::with_capacity(requests.len());
    let mut commands = Vec::new();
    let mut ids = Vec::new();
    let mut admitted = 0usize;
    for (position, request) in requests.into_iter().enumerate() {
        let request = match request {
            Ok(request) => request,
            Err(refused) => {
                answers.push(Some(refused));
                continue;
            }
        };
        match parse_job_request(&request, now, &new_job_id(now, random.wrapping_add(position as u128))) {
            // Admission control, after validation: a node holding its maximum of live
            // (pending or running) jobs refuses new ones and keeps serving the rest.
            Ok(_) if live_jobs(runtime.state()) + admitted >= limits.max_jobs => {
                let message = format!(
                    "this node holds its maximum of {} live jobs; retry when some have finished",
                    limits.max_jobs
                );
                let mut full = error(507, "storage_full", message);
                full.retry_after_s = Some(30);
                answers.push(Some(full));
            }
            Ok(spec) => {
                admitted += 1;
                ids.push((answers.len(), spec.id.clone()));
                commands.push(Command::Create { spec: Box::new(spec), now_ms: now });
                answers.push(None);
            }
            Err(problems) => {
                let first = problems.first().map(|p| p.field.clone()).unwrap_or_default();
                let message = problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ");
                let problems: Vec<Value> = problems.iter().map(|p| json!({"field": p.field, "rule": p.rule})).collect();
                answers.push(Some(answer(
                    400,
                    json!({"error": message, "code": "invalid", "field": first, "problems": problems}),
                )));
            }
        }
    }
    let verdicts = runtime.apply_batch(commands);
    for ((slot, id), verdict) in ids.into_iter().zip(verdicts) {
        answers[slot] = Some(match verdict {
            Ok(Applied::Created) => {
                tracing::info!(job_id = %id, "job created");
                with_job(runtime.state(), &id, |job| answer(201, job_view(job)))
            }
            Ok(applied) => {
                let status = if applied == Applied::Created { 201 } else { 200 };
                with_job(runtime.state(), &id, |job| answer(status, job_view(job)))
            }
            Err(e) => apply_error(e),
        });
    }
    answers.into_iter().map(|a| a.expect("every request answered")).collect()
}

/// Jobs not yet final (pending or running): what admission control counts.
fn live_jobs(state: &State) -> usize {
    (state.count(Status::Pending) + state.count(Status::InProgress)) as usize
}

/// `POST /jobs/batch`: `{"jobs": [request, …]}` (at most `BATCH_MAX`), created with one log
/// write and answered in order with each one's status and job or error.
fn batch<L: CommandLog>(runtime: &mut Runtime<L>, limits: &Limits, body: &[u8], random: u128) -> Answer {
    let requests = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut object)) => match object.remove("jobs") {
            Some(Value::Array(requests)) if requests.len() <= BATCH_MAX => requests,
            Some(Value::Array(_)) => return error(400, "invalid", format!("jobs: at most {BATCH_MAX} per batch")),
            _ => return error(400, "invalid", "jobs: must be an array of job requests"),
        },
        Ok(_) => return error(400, "invalid", "the body must be an object {\"jobs\": [...]}"),
        Err(e) => return error(400, "malformed_json", format!("the body is not JSON: {e}")),
    };
    let answers = create_many(runtime, limits, requests.into_iter().map(Ok).collect(), random);
    let results: Vec<Value> = answers.into_iter().map(|a| json!({"status": a.status, "body": a.body})).collect();
    answer(200, json!({"results": results}))
}

/// The parsed body of a `POST /jobs`, or its refusal.
pub fn parse_body(body: &[u8]) -> Result<Value, Answer> {
    serde_json::from_slice(body).map_err(|e| error(400, "malformed_json", format!("the body is not JSON: {e}")))
}

fn dead_letters(state: &State) -> Answer {
    let letters: Vec<Value> = state
        .dead_letters()
        .take(LIST_LIMIT_MAX)
        .map(|(id, fire_ms, letter)| {
            json!({"id": id, "fire_ms": fire_ms, "attempts": letter.attempts, "reason": letter.reason, "moved_ms": letter.moved_ms})
        })
        .collect();
    answer(200, json!({"dead_letters": letters}))
}

fn command<L: CommandLog>(runtime: &mut Runtime<L>, command: Command) -> Answer {
    let id = match &command {
        Command::Cancel { id, .. }
        | Command::Delete { id }
        | Command::Pause { id }
        | Command::Resume { id, .. }
        | Command::Redrive { id, .. } => id.clone(),
        _ => String::new(),
    };
    match runtime.apply(command) {
        Ok(_) => match runtime.state().job(&id) {
            Some(job) => answer(200, job_view(job)),
            None if id.is_empty() => answer(200, json!({"done": true})),
            None => answer(200, json!({"id": id})),
        },
        Err(e) => apply_error(e),
    }
}

fn apply_error(e: ApplyError) -> Answer {
    let status = match &e {
        ApplyError::NotFound(_) => 404,
        ApplyError::Conflict(_) | ApplyError::Required { .. } | ApplyError::InvalidState { .. } => 409,
        ApplyError::UnknownDependency(_) | ApplyError::Cycle(_) => {
            return answer(400, json!({"error": e.to_string(), "code": "invalid", "field": "depends_on"}))
        }
        ApplyError::StaleAttempt { .. } | ApplyError::NotDeadLettered { .. } => 409,
        ApplyError::Unavailable(_) => {
            let mut unavailable = error(503, "unavailable", e.to_string());
            unavailable.retry_after_s = Some(5);
            return unavailable;
        }
    };
    let code = match status {
        404 => "not_found",
        409 => "conflict",
        _ => "unavailable",
    };
    error(status, code, e.to_string())
}

fn list(state: &State, query: &str) -> Answer {
    let mut status_filter = None;
    let mut limit = 100usize;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("status", value)) => match Status::ALL.iter().find(|s| s.as_str() == value) {
                Some(status) => status_filter = Some(*status),
                None => {
                    return error(
                        400,
                        "invalid",
                        "status: must be one of pending, in_progress, completed, failed, cancelled, timeout",
                    )
                }
            },
            Some(("limit", value)) => match value.parse::<usize>() {
                Ok(n) if (1..=LIST_LIMIT_MAX).contains(&n) => limit = n,
                _ => return error(400, "invalid", format!("limit: must be within 1..={LIST_LIMIT_MAX}")),
            },
            _ => return error(400, "invalid", format!("unknown query parameter {pair}")),
        }
    }
    let jobs: Vec<Value> =
        state.jobs().filter(|job| status_filter.is_none_or(|s| job.status == s)).take(limit).map(job_view).collect();
    answer(200, json!({"jobs": jobs}))
}

fn health<L: CommandLog>(runtime: &Runtime<L>) -> Answer {
    let state = runtime.state();
    let counts: serde_json::Map<String, Value> =
        Status::ALL.iter().map(|s| (s.as_str().to_string(), json!(state.count(*s)))).collect();
    let stats = runtime.stats();
    let healthy = runtime.log_failure().is_none();
    answer(
        if healthy { 200 } else { 503 },
        json!({
            "status": if healthy { "ok" } else { "unavailable" },
            "role": "leader",
            "runtime": "tokio current-thread",
            "jobs": counts,
            "dead_letters": state.dead_letters().count(),
            "dispatch": {"queued": runtime.dispatcher().queued(), "running": runtime.dispatcher().running()},
            "attempts": {"started": stats.attempts_started, "finished": stats.attempts_finished, "queue_full_waits": stats.queue_full_waits},
            "log_failure": runtime.log_failure(),
        }),
    )
}

/// A job as clients see it (Scheduled-DB's fields first).
pub fn job_view(job: &Job) -> Value {
    let (kind, schedule) = match &job.spec.schedule {
        Schedule::Once { at_ms } => ("unico", json!({"run_at_ms": at_ms})),
        Schedule::Cron(cron) => (
            "recurrente",
            json!({"cron_expression": cron.expression, "time_zone": cron.time_zone, "start_ms": cron.start_ms, "last_date_ms": cron.end_ms}),
        ),
    };
    json!({
        "id": job.spec.id,
        "type": kind,
        "status": job.status.as_str(),
        "webhook_url": job.spec.target.url,
        "method": job.spec.target.method.as_str(),
        "schedule": schedule,
        "next_fire_ms": job.next_fire_ms,
        "paused": job.paused,
        "priority": job.spec.priority,
        "labels": job.spec.labels,
        "created_ms": job.created_ms,
        "fires": {"succeeded": job.fires_succeeded, "failed": job.fires_failed, "missed": job.fires_missed},
    })
}

fn executions(job: &Job) -> Value {
    let list: Vec<Value> = job
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
            })
        })
        .collect();
    json!({"id": job.spec.id, "executions": list})
}
