//! Turns a JSON job request into a `JobSpec`: Sundial's own format, or Scheduled-DB's as it
//! is (`type: unico|recurrente`, `timestamp`, `cron_expression`, `last_date`, `webhook_url`,
//! `payload`). Every problem is reported at once, each with its field and rule; unknown
//! fields are refused so a typo never silently drops a setting.

use crate::job::*;
use base64::Engine as _;
use serde_json::{Map, Value};
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

/// Parses and validates a request made at `now_ms`; `generated_id` is used when it has none.
pub fn parse_job_request(request: &Value, now_ms: u64, generated_id: &str) -> Result<JobSpec, Vec<FieldError>> {
    let Some(object) = request.as_object() else {
        return Err(vec![FieldError::new("(body)", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    let spec = if object.contains_key("type") {
        parse_scheduled_db(object, now_ms, generated_id, &mut errors)
    } else {
        parse_sundial(object, now_ms, generated_id, &mut errors)
    };
    match spec {
        Some(spec) if errors.is_empty() => spec.validate().and_then(|()| check_fires(&spec, now_ms)).map(|()| spec),
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

fn unknown_fields(object: &Map<String, Value>, known: &[&str], prefix: &str, errors: &mut Vec<FieldError>) {
    for key in object.keys() {
        if !known.contains(&key.as_str()) {
            errors.push(FieldError::new(format!("{prefix}{key}"), "is not a known field"));
        }
    }
}

fn parse_sundial(
    object: &Map<String, Value>,
    now_ms: u64,
    generated_id: &str,
    errors: &mut Vec<FieldError>,
) -> Option<JobSpec> {
    unknown_fields(object, &SUNDIAL_FIELDS, "", errors);
    let id = optional_string(object, "id", errors).unwrap_or_else(|| generated_id.to_string());
    let schedule_fields: Vec<&str> =
        ["run_at", "delay", "cron"].into_iter().filter(|f| object.contains_key(*f)).collect();
    let schedule = match schedule_fields.as_slice() {
        ["run_at"] => time_field(object, "run_at", now_ms, errors).map(|at_ms| Schedule::Once { at_ms }),
        ["delay"] => duration_field(object, "delay", errors).map(|delay| Schedule::Once { at_ms: now_ms + delay }),
        ["cron"] => {
            let expression = optional_string(object, "cron", errors);
            let time_zone = optional_string(object, "time_zone", errors).unwrap_or_else(|| "UTC".into());
            let start_ms =
                object.contains_key("start_at").then(|| time_field(object, "start_at", now_ms, errors)).flatten();
            let end_ms = object.contains_key("end_at").then(|| time_field(object, "end_at", 0, errors)).flatten();
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
            if object.contains_key(field) {
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
    let body_fields: Vec<&str> =
        ["json", "body", "body_base64"].into_iter().filter(|f| object.contains_key(*f)).collect();
    let (body, content_type) = match body_fields.as_slice() {
        [] => (Vec::new(), None),
        ["json"] => (object["json"].to_string().into_bytes(), Some("application/json".to_string())),
        ["body"] => match &object["body"] {
            Value::String(text) => (text.clone().into_bytes(), None),
            _ => {
                errors.push(FieldError::new("body", "must be a string (use json for JSON values)"));
                (Vec::new(), None)
            }
        },
        ["body_base64"] => {
            let decoded = object["body_base64"]
                .as_str()
                .and_then(|text| base64::engine::general_purpose::STANDARD.decode(text).ok());
            match decoded {
                Some(bytes) => (bytes, Some("application/octet-stream".to_string())),
                None => {
                    errors.push(FieldError::new("body_base64", "must be standard base64"));
                    (Vec::new(), None)
                }
            }
        }
        _ => {
            errors.push(FieldError::new(body_fields[1], "only one of json, body or body_base64 may be given"));
            (Vec::new(), None)
        }
    };
    let content_type = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.clone())
        .or(content_type);
    let headers = headers.into_iter().filter(|(name, _)| !name.eq_ignore_ascii_case("content-type")).collect();
    let retry = match object.get("retry") {
        None => RetryPolicy::default(),
        Some(Value::Object(retry)) => parse_retry(retry, errors),
        Some(_) => {
            errors.push(FieldError::new("retry", "must be an object"));
            RetryPolicy::default()
        }
    };
    let attempt_timeout_ms = optional_u64(object, "attempt_timeout_ms", errors).unwrap_or(ATTEMPT_TIMEOUT_MS_DEFAULT);
    let deadline_ms = optional_u64(object, "deadline_ms", errors);
    let priority = optional_u64(object, "priority", errors).unwrap_or(1).min(255) as u8;
    let depends_on = match object.get("depends_on") {
        None => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .enumerate()
            .filter_map(|(position, id)| match id {
                Value::String(id) => Some(id.clone()),
                _ => {
                    errors.push(FieldError::new(format!("depends_on[{position}]"), "must be a job id string"));
                    None
                }
            })
            .collect(),
        Some(_) => {
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
fn parse_flow(object: &Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<Flow> {
    let flow = match object.get("flow")? {
        Value::Object(flow) => flow,
        _ => {
            errors.push(FieldError::new(
                "flow",
                "must be an object {\"key\": …, \"parallelism\"?, \"rate\"?, \"period\"?, \"ordered\"?}",
            ));
            return None;
        }
    };
    unknown_fields(flow, &FLOW_FIELDS, "flow.", errors);
    let mut nested = Vec::new();
    let key = optional_string(flow, "key", &mut nested);
    let parallelism = optional_u64(flow, "parallelism", &mut nested).map(|n| n.min(u64::from(u32::MAX)) as u32);
    let rate = optional_u64(flow, "rate", &mut nested).map(|n| n.min(u64::from(u32::MAX)) as u32);
    let period_ms = flow.contains_key("period").then(|| duration_field(flow, "period", &mut nested)).flatten();
    let ordered = match flow.get("ordered") {
        None => None,
        Some(Value::Bool(ordered)) => Some(*ordered),
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
fn parse_callbacks(object: &Map<String, Value>, errors: &mut Vec<FieldError>) -> Callbacks {
    let callbacks = match object.get("callbacks") {
        None => return Callbacks::default(),
        Some(Value::Object(callbacks)) => callbacks,
        Some(_) => {
            errors.push(FieldError::new("callbacks", "must be an object {\"on_success\"?: url, \"on_failure\"?: url}"));
            return Callbacks::default();
        }
    };
    unknown_fields(callbacks, &CALLBACK_FIELDS, "callbacks.", errors);
    let mut nested = Vec::new();
    let on_success = optional_string(callbacks, "on_success", &mut nested);
    let on_failure = optional_string(callbacks, "on_failure", &mut nested);
    errors.extend(nested.into_iter().map(|e| FieldError::new(format!("callbacks.{}", e.field), e.rule)));
    Callbacks { on_success, on_failure }
}

/// `dst: {"repeated": "first"|"both", "missing": "shift"|"skip"}`, each optional.
fn parse_dst(object: &Map<String, Value>, errors: &mut Vec<FieldError>) -> DstPolicy {
    let mut policy = DstPolicy::default();
    let dst = match object.get("dst") {
        None => return policy,
        Some(Value::Object(dst)) => dst,
        Some(_) => {
            errors.push(FieldError::new("dst", "must be an object {\"repeated\": …, \"missing\": …}"));
            return policy;
        }
    };
    unknown_fields(dst, &DST_FIELDS, "dst.", errors);
    match dst.get("repeated").map(|v| v.as_str()) {
        None | Some(Some("first")) => {}
        Some(Some("both")) => policy.repeated = Repeated::Both,
        Some(_) => errors.push(FieldError::new("dst.repeated", "must be first or both")),
    }
    match dst.get("missing").map(|v| v.as_str()) {
        None | Some(Some("shift")) => {}
        Some(Some("skip")) => policy.missing = Missing::Skip,
        Some(_) => errors.push(FieldError::new("dst.missing", "must be shift or skip")),
    }
    policy
}

fn parse_retry(retry: &Map<String, Value>, errors: &mut Vec<FieldError>) -> RetryPolicy {
    unknown_fields(retry, &RETRY_FIELDS, "retry.", errors);
    let defaults = RetryPolicy::default();
    let field = |name: &str| format!("retry.{name}");
    let u64_of = |name: &str, errors: &mut Vec<FieldError>| match retry.get(name) {
        None => None,
        Some(value) => value.as_u64().or_else(|| {
            errors.push(FieldError::new(field(name), "must be a whole number ≥ 0"));
            None
        }),
    };
    let f64_of = |name: &str, errors: &mut Vec<FieldError>| match retry.get(name) {
        None => None,
        Some(value) => value.as_f64().filter(|v| v.is_finite()).or_else(|| {
            errors.push(FieldError::new(field(name), "must be a number"));
            None
        }),
    };
    let retry_on = match retry.get("retry_on") {
        None => defaults.retry_on.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|item| {
                let parsed = match item {
                    Value::Number(n) => n.as_u64().filter(|c| *c <= 999).map(|c| StatusMatch::Exact(c as u16)),
                    Value::String(text) => parse_status_match(text),
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
        Some(_) => {
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
        jitter_percent: f64_of("jitter", errors)
            .map_or(defaults.jitter_percent, |j| (j * 100.0).clamp(0.0, 255.0).round() as u8),
        retry_on,
        backoff: parse_backoff(retry.get("backoff"), errors),
    }
}

/// `"exponential"` (the default), `"fixed"`, or a list of delays in ms.
fn parse_backoff(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Backoff {
    let rule = "must be \"exponential\", \"fixed\" or a list of delays in ms such as [1000, 5000, 30000]";
    match value {
        None => Backoff::Exponential,
        Some(Value::String(kind)) if kind == "exponential" => Backoff::Exponential,
        Some(Value::String(kind)) if kind == "fixed" => Backoff::Fixed,
        Some(Value::Array(items)) => {
            let delays: Option<Vec<u64>> = items.iter().map(Value::as_u64).collect();
            delays.map(Backoff::Delays).unwrap_or_else(|| {
                errors.push(FieldError::new("retry.backoff", rule));
                Backoff::Exponential
            })
        }
        Some(_) => {
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

fn parse_scheduled_db(
    object: &Map<String, Value>,
    now_ms: u64,
    generated_id: &str,
    errors: &mut Vec<FieldError>,
) -> Option<JobSpec> {
    unknown_fields(object, &SCHEDULED_DB_FIELDS, "", errors);
    let id = optional_string(object, "id", errors).unwrap_or_else(|| generated_id.to_string());
    let schedule = match optional_string(object, "type", errors).as_deref() {
        Some("unico") => {
            if !object.contains_key("timestamp") {
                errors.push(FieldError::new("timestamp", "is required for type unico"));
            }
            time_field(object, "timestamp", now_ms, errors).map(|at_ms| Schedule::Once { at_ms })
        }
        Some("recurrente") => {
            let expression = optional_string(object, "cron_expression", errors);
            if expression.is_none() {
                errors.push(FieldError::new("cron_expression", "is required for type recurrente"));
            }
            let end_ms = object.contains_key("last_date").then(|| time_field(object, "last_date", 0, errors)).flatten();
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
        None | Some(Value::Null) => (Vec::new(), None),
        Some(payload) => (payload.to_string().into_bytes(), Some("application/json".to_string())),
    };
    Some(JobSpec {
        id,
        schedule: schedule?,
        target: Target { url: url?, method: Method::Post, headers: Vec::new(), body, content_type },
        retry: RetryPolicy::default(),
        attempt_timeout_ms: ATTEMPT_TIMEOUT_MS_DEFAULT,
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
fn string_map(object: &Map<String, Value>, field: &str, errors: &mut Vec<FieldError>) -> BTreeMap<String, String> {
    match object.get(field) {
        None => BTreeMap::new(),
        Some(Value::Object(map)) => map
            .iter()
            .filter_map(|(key, value)| match value {
                Value::String(value) => Some((key.clone(), value.clone())),
                _ => {
                    errors.push(FieldError::new(format!("{field}.{key}"), "must be a string"));
                    None
                }
            })
            .collect(),
        Some(_) => {
            errors.push(FieldError::new(field, "must be an object of strings"));
            BTreeMap::new()
        }
    }
}

fn optional_string(object: &Map<String, Value>, field: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    match object.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => {
            errors.push(FieldError::new(field, "must be a string"));
            None
        }
    }
}

fn optional_u64(object: &Map<String, Value>, field: &str, errors: &mut Vec<FieldError>) -> Option<u64> {
    match object.get(field) {
        None | Some(Value::Null) => None,
        Some(value) => value.as_u64().or_else(|| {
            errors.push(FieldError::new(field, "must be a whole number ≥ 0"));
            None
        }),
    }
}

/// `{"from": time, "to": time}` of a backfill (RFC 3339, epoch seconds or ms), both required.
pub fn parse_backfill(request: &Value) -> Result<(u64, u64), Vec<FieldError>> {
    let Some(object) = request.as_object() else {
        return Err(vec![FieldError::new("(body)", "must be a JSON object {\"from\": …, \"to\": …}")]);
    };
    let mut errors = Vec::new();
    unknown_fields(object, &["from", "to"], "", &mut errors);
    for field in ["from", "to"] {
        if !object.contains_key(field) {
            errors.push(FieldError::new(field, "is required"));
        }
    }
    let from = object.contains_key("from").then(|| time_field(object, "from", 0, &mut errors)).flatten();
    let to = object.contains_key("to").then(|| time_field(object, "to", 0, &mut errors)).flatten();
    match (from, to) {
        (Some(from), Some(to)) if errors.is_empty() => Ok((from, to)),
        _ => Err(errors),
    }
}

/// A point in time: RFC 3339 text, or epoch seconds or milliseconds (a number, or digits in
/// a string; values below 10^11 are seconds). Refused when more than a day before `not_before_ms`
/// (pass 0 to accept any past time).
fn time_field(
    object: &Map<String, Value>,
    field: &str,
    not_before_ms: u64,
    errors: &mut Vec<FieldError>,
) -> Option<u64> {
    let rule = "must be an RFC 3339 time (2026-03-01T09:00:00Z) or epoch seconds or milliseconds";
    let parsed = match object.get(field) {
        Some(Value::Number(n)) => n.as_u64().map(epoch_to_ms),
        Some(Value::String(text)) if text.bytes().all(|b| b.is_ascii_digit()) && !text.is_empty() => {
            text.parse::<u64>().ok().map(epoch_to_ms)
        }
        Some(Value::String(text)) => {
            text.parse::<jiff::Timestamp>().ok().and_then(|t| u64::try_from(t.as_millisecond()).ok())
        }
        _ => None,
    };
    let Some(at_ms) = parsed else {
        errors.push(FieldError::new(field, rule));
        return None;
    };
    if not_before_ms > 0 && at_ms.saturating_add(PAST_TOLERANCE_MS) < not_before_ms {
        errors.push(FieldError::new(field, "must not be more than 24 h in the past"));
        return None;
    }
    Some(at_ms)
}

fn epoch_to_ms(value: u64) -> u64 {
    if value < 100_000_000_000 {
        value.saturating_mul(1000)
    } else {
        value
    }
}

/// A duration: milliseconds as a number, or text such as "500ms", "90s", "5m", "2h", "1d".
fn duration_field(object: &Map<String, Value>, field: &str, errors: &mut Vec<FieldError>) -> Option<u64> {
    let parsed = match object.get(field) {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(text)) => parse_duration_ms(text),
        _ => None,
    };
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
