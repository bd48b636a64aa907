//! Turns a JSON job request into a `JobSpec`: Sundial's own format, or Scheduled-DB's as it
//! is (`type: unico|recurrente`, `timestamp`, `cron_expression`, `last_date`, `webhook_url`,
//! `payload`). Every problem is reported at once, each with its field and rule; unknown
//! fields, and fields given twice, are refused so a typo never silently drops a setting.
//! The request's text is read in place: its values are parsed straight into the spec.

use crate::job::*;
use base64::Engine as _;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Past times further back than this are refused as mistakes; nearer ones fire at once.
pub const PAST_TOLERANCE_MS: u64 = 24 * 3600 * 1000;

const SUNDIAL_FIELDS: [&str; 28] = [
    "id",
    "run_at",
    "delay",
    "cron",
    "time_zone",
    "start_at",
    "end_at",
    "misfire",
    "misfire_max",
    "overlap",
    "dst",
    "pause_after_failures",
    "url",
    "method",
    "headers",
    "json",
    "body",
    "body_base64",
    "retry",
    "attempt_timeout_ms",
    "deadline_ms",
    "priority",
    "depends_on",
    "labels",
    "secret",
    "secret_next",
    "flow",
    "callbacks",
];
const SCHEDULED_DB_FIELDS: [&str; 7] =
    ["id", "type", "timestamp", "cron_expression", "last_date", "webhook_url", "payload"];
const RETRY_FIELDS: [&str; 7] =
    ["max_attempts", "initial_backoff_ms", "max_backoff_ms", "multiplier", "jitter", "retry_on", "backoff"];
const DST_FIELDS: [&str; 2] = ["repeated", "missing"];
const FLOW_FIELDS: [&str; 5] = ["key", "parallelism", "rate", "period", "ordered"];
const CALLBACK_FIELDS: [&str; 2] = ["on_success", "on_failure"];

/// What a request is read against: when it is made, the id a job gets when its request
/// names none, and the attempt timeout when it sets none.
#[derive(Clone, Copy, Debug)]
pub struct RequestContext<'a> {
    pub now_ms: u64,
    pub generated_id: &'a str,
    pub attempt_timeout_ms: u64,
}

impl<'a> RequestContext<'a> {
    /// A request made at `now_ms`, with the engine's default attempt timeout.
    pub fn new(now_ms: u64, generated_id: &'a str) -> RequestContext<'a> {
        RequestContext { now_ms, generated_id, attempt_timeout_ms: ATTEMPT_TIMEOUT_MS_DEFAULT }
    }
}

/// Parses and validates a request (JSON text) made at `now_ms`; `generated_id` is used when
/// it has none.
pub fn parse_job_request(request: &str, now_ms: u64, generated_id: &str) -> Result<JobSpec, Vec<FieldError>> {
    parse_job_request_in(request, &RequestContext::new(now_ms, generated_id))
}

/// Parses and validates a request (JSON text) in its context.
pub fn parse_job_request_in(request: &str, context: &RequestContext) -> Result<JobSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    let object = body_fields(request, "must be a JSON object", &mut errors)?;
    let spec = if object.has("type") {
        parse_scheduled_db(&object, context, &mut errors)
    } else {
        parse_sundial(&object, context, &mut errors)
    };
    match spec {
        Some(spec) if errors.is_empty() => {
            spec.validate().and_then(|()| check_fires(&spec, context.now_ms)).map(|()| spec)
        }
        _ => {
            if let Some(spec) = spec {
                errors.extend(spec.validate().err().unwrap_or_default());
            }
            Err(errors)
        }
    }
}

/// A cron job must be able to fire: its expression needs an occurrence in the years ahead
/// (from its `start_at`, if later than now).
fn check_fires(spec: &JobSpec, now_ms: u64) -> Result<(), Vec<FieldError>> {
    let Schedule::Cron(cron) = &spec.schedule else { return Ok(()) };
    let Ok(schedule) = crate::cron::CronSchedule::parse(&cron.expression, &cron.time_zone) else { return Ok(()) };
    let from_ms = cron.start_ms.map_or(now_ms, |start_ms| start_ms.saturating_sub(1).max(now_ms));
    match schedule.with_dst(cron.dst).check_fires(from_ms) {
        Ok(()) => Ok(()),
        Err(crate::cron::CronError::Expression(rule) | crate::cron::CronError::TimeZone(rule)) => {
            Err(vec![FieldError::new("cron", rule)])
        }
    }
}

/// The members of a whole request's text, or the one error that says why it has none.
fn body_fields<'a>(text: &'a str, rule: &str, errors: &mut Vec<FieldError>) -> Result<Fields<'a>, Vec<FieldError>> {
    Fields::of_text(text, "", errors).ok_or_else(|| match serde_json::from_str::<&RawValue>(text) {
        Ok(_) => vec![FieldError::new("(body)", rule)],
        Err(e) => vec![FieldError::new("(body)", format!("must be JSON ({e})"))],
    })
}

/// The id a request names, read without reading the rest (an upsert's id is checked before
/// the request is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamedId {
    Absent,
    Text(String),
    /// Present, but not a string.
    Other,
}

/// The `id` of a request (JSON text); `None` when the text is not a JSON object.
pub fn named_id(request: &str) -> Option<NamedId> {
    let object = Fields::of_text(request, "", &mut Vec::new())?;
    Some(match object.get("id") {
        None => NamedId::Absent,
        Some(id) => text_of(id).map_or(NamedId::Other, |id| NamedId::Text(id.into_owned())),
    })
}

/// Why a batch body (`{"jobs": [request, …]}`) holds no requests to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchRefusal {
    NotAnObject,
    JobsGivenTwice,
    JobsNotAnArray,
}

/// The requests of a batch body, each as its JSON text, read in place (members other than
/// `jobs` are ignored).
pub fn batch_requests(body: &str) -> Result<Vec<&str>, BatchRefusal> {
    let mut errors = Vec::new();
    let object = Fields::of_text(body, "", &mut errors).ok_or(BatchRefusal::NotAnObject)?;
    if errors.iter().any(|error| error.field == "jobs") {
        return Err(BatchRefusal::JobsGivenTwice);
    }
    let jobs = object.get("jobs").and_then(array_of).ok_or(BatchRefusal::JobsNotAnArray)?;
    Ok(jobs.into_iter().map(RawValue::get).collect())
}

fn unknown_fields(object: &Fields, known: &[&str], prefix: &str, errors: &mut Vec<FieldError>) {
    for (name, _) in object.sorted() {
        if !known.contains(&name) {
            errors.push(FieldError::new(format!("{prefix}{name}"), "is not a known field"));
        }
    }
}

fn parse_sundial(object: &Fields, context: &RequestContext, errors: &mut Vec<FieldError>) -> Option<JobSpec> {
    let now_ms = context.now_ms;
    unknown_fields(object, &SUNDIAL_FIELDS, "", errors);
    let id = optional_string(object, "id", errors).unwrap_or_else(|| context.generated_id.to_string());
    let schedule_fields: Vec<&str> = ["run_at", "delay", "cron"].into_iter().filter(|f| object.has(f)).collect();
    let schedule = match schedule_fields.as_slice() {
        ["run_at"] => time_field(object, "run_at", now_ms, errors).map(|at_ms| Schedule::Once { at_ms }),
        ["delay"] => duration_field(object, "delay", errors).map(|delay| Schedule::Once { at_ms: now_ms + delay }),
        ["cron"] => {
            let expression = optional_string(object, "cron", errors);
            let time_zone = optional_string(object, "time_zone", errors).unwrap_or_else(|| "UTC".into());
            let start_ms = object.has("start_at").then(|| time_field(object, "start_at", now_ms, errors)).flatten();
            let end_ms = object.has("end_at").then(|| time_field(object, "end_at", 0, errors)).flatten();
            let misfire = match optional_string(object, "misfire", errors).as_deref() {
                None | Some("fire_once") => Some(Misfire::FireOnce),
                Some("skip") => Some(Misfire::Skip),
                Some("fire_all") => {
                    let max = optional_u64(object, "misfire_max", errors).unwrap_or(100);
                    Some(Misfire::FireAll { max: max.min(u64::from(u32::MAX)) as u32 })
                }
                Some(_) => {
                    errors.push(FieldError::new("misfire", "must be fire_once, skip or fire_all"));
                    None
                }
            };
            let overlap = match optional_string(object, "overlap", errors).as_deref() {
                None | Some("skip") => Some(Overlap::Skip),
                Some("allow") => Some(Overlap::Allow),
                Some(_) => {
                    errors.push(FieldError::new("overlap", "must be skip or allow"));
                    None
                }
            };
            let dst = parse_dst(object, errors);
            let pause_after_failures =
                optional_u64(object, "pause_after_failures", errors).map(|n| n.min(u64::from(u32::MAX)) as u32);
            match (expression, misfire, overlap) {
                (Some(expression), Some(misfire), Some(overlap)) => Some(Schedule::Cron(CronSpec {
                    expression,
                    time_zone,
                    start_ms,
                    end_ms,
                    misfire,
                    overlap,
                    dst,
                    pause_after_failures,
                })),
                _ => None,
            }
        }
        [] => {
            errors.push(FieldError::new("run_at", "one of run_at, delay or cron is required"));
            None
        }
        _ => {
            errors.push(FieldError::new(schedule_fields[1], "only one of run_at, delay or cron may be given"));
            None
        }
    };
    if !matches!(schedule, Some(Schedule::Cron(_))) {
        for field in
            ["time_zone", "start_at", "end_at", "misfire", "misfire_max", "overlap", "dst", "pause_after_failures"]
        {
            if object.has(field) {
                errors.push(FieldError::new(field, "applies to cron jobs only"));
            }
        }
    }
    let url = optional_string(object, "url", errors);
    if url.is_none() && !errors.iter().any(|e| e.field == "url") {
        errors.push(FieldError::new("url", "is required"));
    }
    let method = match optional_string(object, "method", errors) {
        None => Method::Post,
        Some(name) => Method::parse(&name).unwrap_or_else(|| {
            errors.push(FieldError::new("method", "must be GET, POST, PUT, PATCH or DELETE"));
            Method::Post
        }),
    };
    let headers: Vec<(String, String)> = string_map(object, "headers", errors).into_iter().collect();
    let given_bodies: Vec<(&str, &RawValue)> =
        ["json", "body", "body_base64"].into_iter().filter_map(|f| object.get(f).map(|raw| (f, raw))).collect();
    let (body, content_type) = match given_bodies.as_slice() {
        [] => (Vec::new(), None),
        [("json", json)] => (compact(json), Some("application/json".to_string())),
        [("body", body)] => match text_of(body) {
            Some(text) => (text.into_owned().into_bytes(), None),
            None => {
                errors.push(FieldError::new("body", "must be a string (use json for JSON values)"));
                (Vec::new(), None)
            }
        },
        [(_, body_base64)] => {
            let decoded =
                text_of(body_base64).and_then(|text| base64::engine::general_purpose::STANDARD.decode(&*text).ok());
            match decoded {
                Some(bytes) => (bytes, Some("application/octet-stream".to_string())),
                None => {
                    errors.push(FieldError::new("body_base64", "must be standard base64"));
                    (Vec::new(), None)
                }
            }
        }
        _ => {
            errors.push(FieldError::new(given_bodies[1].0, "only one of json, body or body_base64 may be given"));
            (Vec::new(), None)
        }
    };
    let content_type = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.clone())
        .or(content_type);
    let headers = headers.into_iter().filter(|(name, _)| !name.eq_ignore_ascii_case("content-type")).collect();
    let retry = match object.get("retry").map(|retry| Fields::of(retry, "retry.", errors)) {
        None => RetryPolicy::default(),
        Some(Some(retry)) => parse_retry(&retry, errors),
        Some(None) => {
            errors.push(FieldError::new("retry", "must be an object"));
            RetryPolicy::default()
        }
    };
    let attempt_timeout_ms = optional_u64(object, "attempt_timeout_ms", errors).unwrap_or(context.attempt_timeout_ms);
    let deadline_ms = optional_u64(object, "deadline_ms", errors);
    let priority = optional_u64(object, "priority", errors).unwrap_or(1).min(255) as u8;
    let depends_on = match object.get("depends_on").map(array_of) {
        None => Vec::new(),
        Some(Some(ids)) => ids
            .iter()
            .enumerate()
            .filter_map(|(position, id)| match text_of(id) {
                Some(id) => Some(id.into_owned()),
                None => {
                    errors.push(FieldError::new(format!("depends_on[{position}]"), "must be a job id string"));
                    None
                }
            })
            .collect(),
        Some(None) => {
            errors.push(FieldError::new("depends_on", "must be an array of job ids"));
            Vec::new()
        }
    };
    let labels = string_map(object, "labels", errors);
    let secret = optional_string(object, "secret", errors);
    let secret_next = optional_string(object, "secret_next", errors);
    let flow = parse_flow(object, errors);
    let callbacks = parse_callbacks(object, errors);
    let target = Target { url: url?, method, headers, body, content_type };
    Some(JobSpec {
        id,
        schedule: schedule?,
        target,
        retry,
        attempt_timeout_ms,
        deadline_ms,
        priority,
        depends_on,
        labels,
        secret,
        secret_next,
        flow,
        callbacks,
        trace: None,
    })
}

/// `flow: {"key": …, "parallelism"?: n, "rate"?: n, "period"?: duration, "ordered"?: bool}`.
fn parse_flow(object: &Fields, errors: &mut Vec<FieldError>) -> Option<Flow> {
    let flow = match Fields::of(object.get("flow")?, "flow.", errors) {
        Some(flow) => flow,
        None => {
            errors.push(FieldError::new(
                "flow",
                "must be an object {\"key\": …, \"parallelism\"?, \"rate\"?, \"period\"?, \"ordered\"?}",
            ));
            return None;
        }
    };
    unknown_fields(&flow, &FLOW_FIELDS, "flow.", errors);
    let mut nested = Vec::new();
    let key = optional_string(&flow, "key", &mut nested);
    let parallelism = optional_u64(&flow, "parallelism", &mut nested).map(|n| n.min(u64::from(u32::MAX)) as u32);
    let rate = optional_u64(&flow, "rate", &mut nested).map(|n| n.min(u64::from(u32::MAX)) as u32);
    let period_ms = flow.has("period").then(|| duration_field(&flow, "period", &mut nested)).flatten();
    let ordered = match flow.get("ordered") {
        None => None,
        Some(ordered) if kind(ordered) == Kind::Bool => Some(ordered.get() == "true"),
        Some(_) => {
            nested.push(FieldError::new("ordered", "must be true or false"));
            None
        }
    };
    if key.is_none() && !nested.iter().any(|e| e.field == "key") {
        nested.push(FieldError::new("key", "is required"));
    }
    errors.extend(nested.into_iter().map(|e| FieldError::new(format!("flow.{}", e.field), e.rule)));
    // A rate without a period is per second.
    let period_ms = period_ms.or(rate.map(|_| 1_000));
    Some(Flow { key: key?, parallelism, rate, period_ms, ordered })
}

/// `callbacks: {"on_success"?: url, "on_failure"?: url}`.
fn parse_callbacks(object: &Fields, errors: &mut Vec<FieldError>) -> Callbacks {
    let callbacks = match object.get("callbacks").map(|callbacks| Fields::of(callbacks, "callbacks.", errors)) {
        None => return Callbacks::default(),
        Some(Some(callbacks)) => callbacks,
        Some(None) => {
            errors.push(FieldError::new("callbacks", "must be an object {\"on_success\"?: url, \"on_failure\"?: url}"));
            return Callbacks::default();
        }
    };
    unknown_fields(&callbacks, &CALLBACK_FIELDS, "callbacks.", errors);
    let mut nested = Vec::new();
    let on_success = optional_string(&callbacks, "on_success", &mut nested);
    let on_failure = optional_string(&callbacks, "on_failure", &mut nested);
    errors.extend(nested.into_iter().map(|e| FieldError::new(format!("callbacks.{}", e.field), e.rule)));
    Callbacks { on_success, on_failure }
}

/// `dst: {"repeated": "first"|"both", "missing": "shift"|"skip"}`, each optional.
fn parse_dst(object: &Fields, errors: &mut Vec<FieldError>) -> DstPolicy {
    let mut policy = DstPolicy::default();
    let dst = match object.get("dst").map(|dst| Fields::of(dst, "dst.", errors)) {
        None => return policy,
        Some(Some(dst)) => dst,
        Some(None) => {
            errors.push(FieldError::new("dst", "must be an object {\"repeated\": …, \"missing\": …}"));
            return policy;
        }
    };
    unknown_fields(&dst, &DST_FIELDS, "dst.", errors);
    match dst.get("repeated").map(text_of) {
        None => {}
        Some(Some(text)) if text == "first" => {}
        Some(Some(text)) if text == "both" => policy.repeated = Repeated::Both,
        Some(_) => errors.push(FieldError::new("dst.repeated", "must be first or both")),
    }
    match dst.get("missing").map(text_of) {
        None => {}
        Some(Some(text)) if text == "shift" => {}
        Some(Some(text)) if text == "skip" => policy.missing = Missing::Skip,
        Some(_) => errors.push(FieldError::new("dst.missing", "must be shift or skip")),
    }
    policy
}

fn parse_retry(retry: &Fields, errors: &mut Vec<FieldError>) -> RetryPolicy {
    unknown_fields(retry, &RETRY_FIELDS, "retry.", errors);
    let defaults = RetryPolicy::default();
    let field = |name: &str| format!("retry.{name}");
    let u64_of = |name: &str, errors: &mut Vec<FieldError>| match retry.get(name) {
        None => None,
        Some(value) => whole_of(value).or_else(|| {
            errors.push(FieldError::new(field(name), "must be a whole number ≥ 0"));
            None
        }),
    };
    let f64_of = |name: &str, errors: &mut Vec<FieldError>| match retry.get(name) {
        None => None,
        Some(value) => number_of(value).filter(|v| v.is_finite()).or_else(|| {
            errors.push(FieldError::new(field(name), "must be a number"));
            None
        }),
    };
    let retry_on = match retry.get("retry_on").map(array_of) {
        None => defaults.retry_on.clone(),
        Some(Some(items)) => items
            .iter()
            .filter_map(|item| {
                let parsed = match kind(item) {
                    Kind::Number => whole_of(item).filter(|c| *c <= 999).map(|c| StatusMatch::Exact(c as u16)),
                    Kind::Text => text_of(item).and_then(|text| parse_status_match(&text)),
                    _ => None,
                };
                if parsed.is_none() {
                    errors.push(FieldError::new(
                        "retry.retry_on",
                        "each is a status such as 429 or a class such as \"5xx\"",
                    ));
                }
                parsed
            })
            .collect(),
        Some(None) => {
            errors.push(FieldError::new("retry.retry_on", "must be an array"));
            defaults.retry_on.clone()
        }
    };
    RetryPolicy {
        max_attempts: u64_of("max_attempts", errors)
            .map_or(defaults.max_attempts, |v| v.min(u64::from(u32::MAX)) as u32),
        initial_backoff_ms: u64_of("initial_backoff_ms", errors).unwrap_or(defaults.initial_backoff_ms),
        max_backoff_ms: u64_of("max_backoff_ms", errors).unwrap_or(defaults.max_backoff_ms),
        multiplier_permille: f64_of("multiplier", errors)
            .map_or(defaults.multiplier_permille, |m| (m * 1000.0).clamp(0.0, 1e9).round() as u32),
        jitter_percent: f64_of("jitter", errors).map_or(defaults.jitter_percent, |j| {
            if (0.0..=1.0).contains(&j) {
                (j * 100.0).round() as u8
            } else {
                // Refused as given, not clamped into range.
                errors.push(FieldError::new("retry.jitter", "must be within 0.0..=1.0"));
                defaults.jitter_percent
            }
        }),
        retry_on,
        backoff: parse_backoff(retry.get("backoff"), errors),
    }
}

/// `"exponential"` (the default), `"fixed"`, or a list of delays in ms.
fn parse_backoff(value: Option<&RawValue>, errors: &mut Vec<FieldError>) -> Backoff {
    let rule = "must be \"exponential\", \"fixed\" or a list of delays in ms such as [1000, 5000, 30000]";
    let Some(value) = value else { return Backoff::Exponential };
    match (text_of(value).as_deref(), array_of(value)) {
        (Some("exponential"), _) => Backoff::Exponential,
        (Some("fixed"), _) => Backoff::Fixed,
        (_, Some(items)) => {
            let delays: Option<Vec<u64>> = items.iter().map(|item| whole_of(item)).collect();
            delays.map(Backoff::Delays).unwrap_or_else(|| {
                errors.push(FieldError::new("retry.backoff", rule));
                Backoff::Exponential
            })
        }
        _ => {
            errors.push(FieldError::new("retry.backoff", rule));
            Backoff::Exponential
        }
    }
}

fn parse_status_match(text: &str) -> Option<StatusMatch> {
    let lower = text.to_ascii_lowercase();
    if let Some(class) = lower.strip_suffix("xx") {
        return class.parse::<u8>().ok().filter(|c| *c <= 9).map(StatusMatch::Class);
    }
    lower.parse::<u16>().ok().map(StatusMatch::Exact)
}

fn parse_scheduled_db(object: &Fields, context: &RequestContext, errors: &mut Vec<FieldError>) -> Option<JobSpec> {
    let now_ms = context.now_ms;
    unknown_fields(object, &SCHEDULED_DB_FIELDS, "", errors);
    let id = optional_string(object, "id", errors).unwrap_or_else(|| context.generated_id.to_string());
    let schedule = match optional_string(object, "type", errors).as_deref() {
        Some("unico") => {
            if !object.has("timestamp") {
                errors.push(FieldError::new("timestamp", "is required for type unico"));
            }
            time_field(object, "timestamp", now_ms, errors).map(|at_ms| Schedule::Once { at_ms })
        }
        Some("recurrente") => {
            let expression = optional_string(object, "cron_expression", errors);
            if expression.is_none() {
                errors.push(FieldError::new("cron_expression", "is required for type recurrente"));
            }
            let end_ms = object.has("last_date").then(|| time_field(object, "last_date", 0, errors)).flatten();
            expression.map(|expression| {
                Schedule::Cron(CronSpec {
                    expression,
                    time_zone: "UTC".into(),
                    start_ms: None,
                    end_ms,
                    misfire: Misfire::FireOnce,
                    overlap: Overlap::Skip,
                    dst: DstPolicy::default(),
                    pause_after_failures: None,
                })
            })
        }
        _ => {
            errors.push(FieldError::new("type", "must be unico or recurrente"));
            None
        }
    };
    let url = optional_string(object, "webhook_url", errors);
    if url.is_none() {
        errors.push(FieldError::new("webhook_url", "is required"));
    }
    let (body, content_type) = match object.get("payload") {
        None => (Vec::new(), None),
        Some(payload) if kind(payload) == Kind::Null => (Vec::new(), None),
        Some(payload) => (compact(payload), Some("application/json".to_string())),
    };
    Some(JobSpec {
        id,
        schedule: schedule?,
        target: Target { url: url?, method: Method::Post, headers: Vec::new(), body, content_type },
        retry: RetryPolicy::default(),
        attempt_timeout_ms: context.attempt_timeout_ms,
        deadline_ms: None,
        priority: 1,
        depends_on: Vec::new(),
        labels: BTreeMap::new(),
        secret: None,
        secret_next: None,
        flow: None,
        callbacks: Callbacks::default(),
        trace: None,
    })
}

/// A field holding an object of strings (headers, labels): each non-string value is named.
fn string_map(object: &Fields, field: &str, errors: &mut Vec<FieldError>) -> BTreeMap<String, String> {
    let prefix = format!("{field}.");
    match object.get(field).map(|map| Fields::of(map, &prefix, errors)) {
        None => BTreeMap::new(),
        Some(Some(map)) => map
            .sorted()
            .into_iter()
            .filter_map(|(key, value)| match text_of(value) {
                Some(value) => Some((key.to_string(), value.into_owned())),
                None => {
                    errors.push(FieldError::new(format!("{prefix}{key}"), "must be a string"));
                    None
                }
            })
            .collect(),
        Some(None) => {
            errors.push(FieldError::new(field, "must be an object of strings"));
            BTreeMap::new()
        }
    }
}

fn optional_string(object: &Fields, field: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    let value = object.get(field).filter(|value| kind(value) != Kind::Null)?;
    text_of(value).map(Cow::into_owned).or_else(|| {
        errors.push(FieldError::new(field, "must be a string"));
        None
    })
}

fn optional_u64(object: &Fields, field: &str, errors: &mut Vec<FieldError>) -> Option<u64> {
    match object.get(field) {
        None => None,
        Some(value) if kind(value) == Kind::Null => None,
        Some(value) => whole_of(value).or_else(|| {
            errors.push(FieldError::new(field, "must be a whole number ≥ 0"));
            None
        }),
    }
}

/// `{"from": time, "to": time}` of a backfill (RFC 3339, epoch seconds or ms), both required.
pub fn parse_backfill(request: &str) -> Result<(u64, u64), Vec<FieldError>> {
    let mut errors = Vec::new();
    let object = &body_fields(request, "must be a JSON object {\"from\": …, \"to\": …}", &mut errors)?;
    unknown_fields(object, &["from", "to"], "", &mut errors);
    for field in ["from", "to"] {
        if !object.has(field) {
            errors.push(FieldError::new(field, "is required"));
        }
    }
    let from = object.has("from").then(|| time_field(object, "from", 0, &mut errors)).flatten();
    let to = object.has("to").then(|| time_field(object, "to", 0, &mut errors)).flatten();
    match (from, to) {
        (Some(from), Some(to)) if errors.is_empty() => Ok((from, to)),
        _ => Err(errors),
    }
}

/// A point in time: RFC 3339 text, or epoch seconds or milliseconds (a number, or digits in
/// a string; values below 10^11 are seconds). Refused when more than a day before `not_before_ms`
/// (pass 0 to accept any past time).
fn time_field(object: &Fields, field: &str, not_before_ms: u64, errors: &mut Vec<FieldError>) -> Option<u64> {
    let rule = "must be an RFC 3339 time (2026-03-01T09:00:00Z) or epoch seconds or milliseconds";
    let parsed = object.get(field).and_then(|value| match (kind(value), text_of(value)) {
        (Kind::Number, _) => whole_of(value).map(epoch_to_ms),
        (_, Some(text)) if text.bytes().all(|b| b.is_ascii_digit()) && !text.is_empty() => {
            text.parse::<u64>().ok().map(epoch_to_ms)
        }
        (_, Some(text)) => text.parse::<jiff::Timestamp>().ok().and_then(|t| u64::try_from(t.as_millisecond()).ok()),
        _ => None,
    });
    let Some(at_ms) = parsed else {
        errors.push(FieldError::new(field, rule));
        return None;
    };
    if at_ms > TIME_MS_MAX {
        // A job due then could never fire, yet would hold its place under max_jobs forever.
        errors.push(FieldError::new(field, "must be before the year 10000"));
        return None;
    }
    if not_before_ms > 0 && at_ms.saturating_add(PAST_TOLERANCE_MS) < not_before_ms {
        let read_as_ms =
            object.get(field).and_then(whole_of).is_some_and(|n| (SECONDS_BELOW..MS_FROM_YEAR_2001).contains(&n));
        let rule = if read_as_ms {
            "must not be more than 24 h in the past (a number of 100000000000 or more is read as epoch milliseconds: as seconds it would be past the year 5138)"
        } else {
            "must not be more than 24 h in the past"
        };
        errors.push(FieldError::new(field, rule));
        return None;
    }
    Some(at_ms)
}

/// The last millisecond of the year 9999: times after it are refused.
const TIME_MS_MAX: u64 = 253_402_300_799_999;
/// Epoch numbers below this are seconds; from it, milliseconds.
const SECONDS_BELOW: u64 = 100_000_000_000;
/// 2001-09-09 in epoch milliseconds: a number between `SECONDS_BELOW` and this, read as
/// milliseconds, is in the past (and as seconds, after the year 5138).
const MS_FROM_YEAR_2001: u64 = 1_000_000_000_000;

fn epoch_to_ms(value: u64) -> u64 {
    if value < SECONDS_BELOW {
        value.saturating_mul(1000)
    } else {
        value
    }
}

/// A duration: milliseconds as a number, or text such as "500ms", "90s", "5m", "2h", "1d".
fn duration_field(object: &Fields, field: &str, errors: &mut Vec<FieldError>) -> Option<u64> {
    let parsed = object.get(field).and_then(|value| match kind(value) {
        Kind::Number => whole_of(value),
        _ => text_of(value).and_then(|text| parse_duration_ms(&text)),
    });
    let limit_ms = 10 * 365 * 24 * 3600 * 1000u64;
    match parsed {
        Some(ms) if ms <= limit_ms => Some(ms),
        _ => {
            errors
                .push(FieldError::new(field, "must be milliseconds or text like 500ms, 90s, 5m, 2h, 1d (≤ 10 years)"));
            None
        }
    }
}

fn parse_duration_ms(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().ok()?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    value.checked_mul(unit_ms)
}

/// A JSON object read in place: each member's name and its value's text, sorted by name.
/// No tree is built: a value is parsed only when a rule reads it, straight into the
/// type that rule wants (so a request takes one form, the `JobSpec`, on its way from bytes).
/// Objects with at most this many members are searched by a scan (`Fields::get`).
const SCANNED_MEMBERS_MAX: usize = 12;

struct Fields<'a> {
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> Fields<'a> {
    /// The members of `raw`, or `None` when it is not an object. A name given twice is an
    /// error (which of two values was meant is a guess), reported as `{prefix}{name}`.
    fn of(raw: &'a RawValue, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Fields<'a>> {
        Fields::of_text(raw.get(), prefix, errors)
    }

    /// As `of`, from a text that may have whitespace around its value (a whole body).
    fn of_text(text: &'a str, prefix: &str, errors: &mut Vec<FieldError>) -> Option<Fields<'a>> {
        if !text.trim_start().starts_with('{') {
            return None;
        }
        let mut members = serde_json::from_str::<Members<'a>>(text).ok()?.0;
        // By name (stable: a name given twice keeps its order), so a lookup is a binary
        // search however many members a body holds.
        members.sort_by(|a, b| a.0.cmp(&b.0));
        let mut reported: Option<&str> = None;
        for pair in members.windows(2).filter(|pair| pair[0].0 == pair[1].0) {
            if reported != Some(pair[0].0.as_ref()) {
                errors.push(FieldError::new(format!("{prefix}{}", pair[0].0), "is given more than once"));
                reported = Some(pair[0].0.as_ref());
            }
        }
        Some(Fields { members })
    }

    fn get(&self, name: &str) -> Option<&'a RawValue> {
        // A request names a handful of members, and a create asks for each known one: a scan
        // that compares lengths first costs less there than a search's string comparisons.
        if self.members.len() <= SCANNED_MEMBERS_MAX {
            let found = self.members.iter().find(|(member, _)| member.len() == name.len() && member == name)?;
            return Some(found.1);
        }
        let found = self.members.binary_search_by(|(member, _)| member.as_ref().cmp(name)).ok()?;
        Some(self.members[found].1)
    }

    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Members in name order (as a JSON object's members are reported, whatever order they
    /// were written in); a name given twice, once (the last given).
    fn sorted(&self) -> Vec<(&str, &'a RawValue)> {
        let mut sorted: Vec<(&str, &'a RawValue)> = Vec::with_capacity(self.members.len());
        for (name, value) in &self.members {
            match sorted.last_mut() {
                Some(last) if last.0 == name.as_ref() => last.1 = *value,
                _ => sorted.push((name.as_ref(), *value)),
            }
        }
        sorted
    }
}

/// What a member's text holds, told by its first byte (serde_json hands a value's text
/// without the whitespace around it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    Number,
    Text,
    Array,
    Object,
}

fn kind(raw: &RawValue) -> Kind {
    match raw.get().as_bytes().first() {
        Some(b'n') => Kind::Null,
        Some(b't' | b'f') => Kind::Bool,
        Some(b'"') => Kind::Text,
        Some(b'[') => Kind::Array,
        Some(b'{') => Kind::Object,
        _ => Kind::Number,
    }
}

/// A string value: borrowed from the request when it has no escapes.
fn text_of(raw: &RawValue) -> Option<Cow<'_, str>> {
    if kind(raw) != Kind::Text {
        return None;
    }
    match serde_json::from_str::<&str>(raw.get()) {
        Ok(text) => Some(Cow::Borrowed(text)),
        Err(_) => serde_json::from_str::<String>(raw.get()).ok().map(Cow::Owned),
    }
}

/// A whole number ≥ 0 that fits u64 (`5.0`, `-1` and `1e3` are not).
fn whole_of(raw: &RawValue) -> Option<u64> {
    (kind(raw) == Kind::Number).then(|| serde_json::from_str::<u64>(raw.get()).ok()).flatten()
}

fn number_of(raw: &RawValue) -> Option<f64> {
    (kind(raw) == Kind::Number).then(|| serde_json::from_str::<f64>(raw.get()).ok()).flatten()
}

fn array_of(raw: &RawValue) -> Option<Vec<&RawValue>> {
    (kind(raw) == Kind::Array).then(|| serde_json::from_str::<Vec<&RawValue>>(raw.get()).ok()).flatten()
}

/// A JSON value's text without the whitespace between its tokens: what a webhook body
/// given as `json` (or Scheduled-DB's `payload`) is sent as. Keys keep the order, and
/// numbers the digits, the client wrote. `raw` is valid JSON, so outside strings every
/// whitespace byte is insignificant.
fn compact(raw: &RawValue) -> Vec<u8> {
    let text = raw.get().as_bytes();
    let mut out = Vec::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for &byte in text {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if byte == b'"' {
            in_string = true;
        } else if matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        }
        out.push(byte);
    }
    out
}

/// An object's members as serde_json reads them, names borrowed where they have no escapes.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Visit<'a> {
            type Value = Members<'a>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Members<'a>, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
                while let Some(name) = map.next_key::<Name<'a>>()? {
                    members.push((name.0, map.next_value::<&'a RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit(std::marker::PhantomData))
    }
}

struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Visit<'a> {
            type Value = Name<'a>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Name<'a>, E> {
                Ok(Name(Cow::Borrowed(name)))
            }
            fn visit_str<E>(self, name: &str) -> Result<Name<'a>, E> {
                Ok(Name(Cow::Owned(name.to_string())))
            }
        }
        deserializer.deserialize_str(Visit(std::marker::PhantomData))
    }
}

/// Checks a body is JSON as strictly as building a tree from it would — nesting at most
/// serde_json's 128 levels, escapes that decode (no lone surrogate), numbers in range —
/// without building one; returns its text, which the parsers read in place.
pub fn checked_json(body: &[u8]) -> Result<&str, serde_json::Error> {
    serde_json::from_slice::<Checked>(body)?;
    // A body that is JSON is UTF-8 (its strings were checked as they decoded, and
    // everything else in JSON is ASCII): the error is the type's, not one seen.
    std::str::from_utf8(body).map_err(|_| <serde_json::Error as serde::de::Error>::custom("the body is not UTF-8"))
}

/// Any JSON value, visited whole and kept nowhere (`checked_json`).
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Checked, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<Checked, A::Error> {
        while items.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<M: MapAccess<'de>>(self, mut members: M) -> Result<Checked, M::Error> {
        while members.next_key::<Checked>()?.is_some() {
            members.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}
