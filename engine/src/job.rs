//! What a job is: its id, schedule, target, retry policy, limits and labels, with validation
//! that reports every problem at once, each naming its field and the rule.

use crate::cron::{time_zone_named, CronError, CronSchedule};
pub use crate::cron::{DstPolicy, Missing, Repeated};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub const ID_BYTES_MAX: usize = 128;
pub const URL_BYTES_MAX: usize = 2048;
pub const HEADERS_MAX: usize = 32;
pub const HEADER_BYTES_MAX: usize = 4096;
pub const BODY_BYTES_MAX: usize = 256 * 1024;
pub const LABELS_MAX: usize = 32;
pub const LABEL_BYTES_MAX: usize = 256;
pub const DEPENDENCIES_MAX: usize = 32;
pub const SECRET_BYTES_MAX: usize = 256;
pub const ATTEMPTS_MAX: u32 = 100;
pub const BACKOFF_MS_MAX: u64 = 24 * 3600 * 1000;
pub const ATTEMPT_TIMEOUT_MS_MAX: u64 = 10 * 60 * 1000;
pub const DEADLINE_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
pub const FIRE_ALL_MAX: u32 = 1000;
pub const PRIORITY_MAX: u8 = 3;
/// Consecutive failed fires a cron job may be set to pause itself after, at most.
pub const PAUSE_AFTER_FAILURES_MAX: u32 = 1_000;
/// Attempts of one flow key in flight at once, at most.
pub const FLOW_PARALLELISM_MAX: u32 = 10_000;
/// Attempts of one flow key started per period, at most.
pub const FLOW_RATE_MAX: u32 = 10_000;
pub const FLOW_PERIOD_MS_MAX: u64 = 24 * 3600 * 1000;

/// One broken rule: the field (a JSON path such as `retry.max_attempts`) and what it must be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub rule: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), rule: rule.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.rule)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JobSpec {
    pub id: String,
    pub schedule: Schedule,
    pub target: Target,
    pub retry: RetryPolicy,
    pub attempt_timeout_ms: u64,
    /// A fire that has not succeeded this long after it was due is given up (status timeout).
    pub deadline_ms: Option<u64>,
    /// 0 is the most urgent, 3 the least.
    pub priority: u8,
    /// Jobs that must complete before this one fires.
    pub depends_on: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Signs requests (HMAC-SHA256) instead of the global secret.
    pub secret: Option<String>,
    /// The secret that replaces `secret` (key rotation): while both are set, each request
    /// carries a signature by each, so receivers can switch at their own pace.
    #[serde(default)]
    pub secret_next: Option<String>,
    /// The flow-control key the job's fires share limits (and, if asked, an order) with.
    #[serde(default)]
    pub flow: Option<Flow>,
    /// URLs told the outcome of each fire: when it succeeds, when it is dead-lettered.
    #[serde(default)]
    pub callbacks: Callbacks,
    /// The trace the job was created in: its fires and attempts are spans of it and its
    /// webhooks carry it (`traceparent`). Set by the node from the request, not the body.
    #[serde(default)]
    pub trace: Option<crate::trace::TraceContext>,
}

/// A caller-chosen key and the limits its fires share, across jobs (`None`: the key's limits
/// as last set, or none). A job that gives limits sets them for the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Flow {
    pub key: String,
    /// Attempts of the key in flight at once.
    pub parallelism: Option<u32>,
    /// Attempts of the key started per `period_ms`.
    pub rate: Option<u32>,
    pub period_ms: Option<u64>,
    /// The key's fires are delivered one at a time in due-time order, each waiting for the
    /// previous to end (delivered or dead-lettered).
    pub ordered: Option<bool>,
}

/// Where the outcome of each fire is POSTed (same retries, signing and SSRF guard as the
/// webhook).
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Callbacks {
    pub on_success: Option<String>,
    pub on_failure: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Schedule {
    Once { at_ms: u64 },
    Cron(CronSpec),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct CronSpec {
    pub expression: String,
    pub time_zone: String,
    /// No fire before this (inclusive).
    pub start_ms: Option<u64>,
    /// No fire after this (Scheduled-DB's `last_date`); then the job is completed.
    pub end_ms: Option<u64>,
    pub misfire: Misfire,
    pub overlap: Overlap,
    /// Wall times a DST change repeats or skips (defaults: first occurrence; shifted past the gap).
    #[serde(default)]
    pub dst: DstPolicy,
    /// The job pauses itself after this many fires in a row end failed (dead-lettered).
    #[serde(default)]
    pub pause_after_failures: Option<u32>,
}

/// What to do with fires missed while no leader ran them (or a fire ran long).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Misfire {
    /// All missed fires become one fire now.
    FireOnce,
    /// Missed fires are recorded as missed; the next one is the first in the future.
    Skip,
    /// Each missed fire runs, oldest first, up to `max`; the rest are recorded as missed.
    FireAll { max: u32 },
}

/// What to do when a fire comes due while the previous one is still being attempted.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Overlap {
    /// The new fire waits for the previous one to end, then follows the misfire policy.
    Skip,
    /// Fires run concurrently.
    Allow,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn parse(name: &str) -> Option<Method> {
        Some(match name.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Target {
    pub url: String,
    pub method: Method,
    /// Extra request headers, in order (names are checked: no hop-by-hop, none of Sundial's).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
}

/// Which responses are retried.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum StatusMatch {
    Exact(u16),
    /// A class: 5 matches 500–599.
    Class(u8),
}

impl StatusMatch {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Exact(code) => code == status,
            StatusMatch::Class(class) => status / 100 == u16::from(class),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RetryPolicy {
    /// Attempts per fire, the first included.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Backoff growth per attempt, in thousandths (2000 doubles it).
    pub multiplier_permille: u32,
    /// Up to this percentage of the backoff is added at random.
    pub jitter_percent: u8,
    /// Statuses that are retried; connection errors and timeouts always are.
    pub retry_on: Vec<StatusMatch>,
    /// How the pause between attempts is computed.
    #[serde(default)]
    pub backoff: Backoff,
}

/// The pause before each retry (before jitter; Retry-After wins when longer).
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Backoff {
    /// `initial_backoff_ms`, times `multiplier` per retry, up to `max_backoff_ms`.
    #[default]
    Exponential,
    /// `initial_backoff_ms` before every retry.
    Fixed,
    /// The n-th retry waits the n-th delay; the last delay repeats.
    Delays(Vec<u64>),
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 5 * 60 * 1000,
            multiplier_permille: 2_000,
            jitter_percent: 20,
            retry_on: vec![StatusMatch::Exact(408), StatusMatch::Exact(429), StatusMatch::Class(5)],
            backoff: Backoff::Exponential,
        }
    }
}

impl RetryPolicy {
    /// The backoff before attempt `attempt + 1` (after `attempt` failed), before jitter.
    pub fn backoff_ms(&self, attempt: u32) -> u64 {
        match &self.backoff {
            Backoff::Exponential => {}
            Backoff::Fixed => return self.initial_backoff_ms,
            Backoff::Delays(delays) => {
                let index = (attempt.max(1) as usize - 1).min(delays.len().saturating_sub(1));
                return delays.get(index).copied().unwrap_or(self.initial_backoff_ms);
            }
        }
        let mut backoff = self.initial_backoff_ms as u128;
        // Bounded: attempts ≤ ATTEMPTS_MAX, and the value saturates at max_backoff_ms.
        for _ in 1..attempt.min(ATTEMPTS_MAX) {
            backoff = backoff * u128::from(self.multiplier_permille) / 1000;
            if backoff >= u128::from(self.max_backoff_ms) {
                break;
            }
        }
        (backoff as u64).min(self.max_backoff_ms)
    }

    /// When attempt `attempt + 1` may start after `attempt` ended at `finished_ms`: the
    /// backoff plus up to `jitter_percent` of it (drawn from `random`), or the receiver's
    /// Retry-After (`retry_after_ms`) if that is longer.
    pub fn retry_at_ms(&self, attempt: u32, finished_ms: u64, retry_after_ms: u64, random: u64) -> u64 {
        let backoff_ms = self.backoff_ms(attempt);
        let jitter_max_ms = backoff_ms * u64::from(self.jitter_percent) / 100;
        let jitter_ms = if jitter_max_ms > 0 { random % (jitter_max_ms + 1) } else { 0 };
        finished_ms.saturating_add((backoff_ms + jitter_ms).max(retry_after_ms))
    }

    pub fn retries_status(&self, status: u16) -> bool {
        self.retry_on.iter().any(|m| m.matches(status))
    }
}

pub const ATTEMPT_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// Headers Sundial sets itself or that HTTP manages: a job may not set them.
const RESERVED_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "idempotency-key",
    "traceparent",
    "x-correlation-id",
];

impl JobSpec {
    /// Checks every rule; returns all the broken ones.
    /// Whether `other` asks for the same job: equal in everything but the trace it was
    /// requested in (a retried create comes in a new request).
    pub fn same_job(&self, other: &JobSpec) -> bool {
        JobSpec { trace: None, ..self.clone() } == JobSpec { trace: None, ..other.clone() }
    }

    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut fail = |field: &str, rule: String| errors.push(FieldError::new(field, rule));
        if let Err(rule) = check_id(&self.id) {
            fail("id", rule);
        }
        if self.trace.as_ref().is_some_and(|trace| !trace.is_valid()) {
            fail("trace", "must be a W3C trace context (32 and 16 lower-case hex digits, not all zeros)".into());
        }
        if let Schedule::Cron(cron) = &self.schedule {
            // The expression and the zone are checked apart, so both are reported.
            if let Err(CronError::Expression(rule)) = CronSchedule::parse(&cron.expression, "UTC") {
                fail("cron", rule);
            }
            if let Err(CronError::TimeZone(rule)) = time_zone_named(&cron.time_zone) {
                fail("time_zone", rule);
            }
            if let (Some(start), Some(end)) = (cron.start_ms, cron.end_ms) {
                if start > end {
                    fail("end_at", "must not be before start_at".into());
                }
            }
            if cron.pause_after_failures.is_some_and(|n| !(1..=PAUSE_AFTER_FAILURES_MAX).contains(&n)) {
                fail("pause_after_failures", format!("must be within 1..={PAUSE_AFTER_FAILURES_MAX}"));
            }
            if let Misfire::FireAll { max } = cron.misfire {
                if !(1..=FIRE_ALL_MAX).contains(&max) {
                    fail("misfire_max", format!("must be within 1..={FIRE_ALL_MAX}"));
                }
            }
        }
        let target = &self.target;
        if let Err(rule) = check_url(&target.url) {
            fail("url", rule);
        }
        if target.headers.len() > HEADERS_MAX {
            fail("headers", format!("at most {HEADERS_MAX} headers"));
        }
        for (name, value) in &target.headers {
            let lower = name.to_ascii_lowercase();
            if name.is_empty() || !name.bytes().all(is_token_byte) {
                fail(&format!("headers.{name}"), "a header name is letters, digits and !#$%&'*+-.^_`|~".into());
            } else if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("x-sundial-") {
                fail(&format!("headers.{name}"), "is set by Sundial or by HTTP itself".into());
            }
            let value_ok = http::HeaderValue::from_str(value).is_ok();
            if name.len() + value.len() > HEADER_BYTES_MAX || !value_ok {
                let rule = format!("at most {HEADER_BYTES_MAX} bytes of visible text, no control characters");
                fail(&format!("headers.{name}"), rule);
            }
        }
        if let Some(content_type) = &target.content_type {
            if content_type.len() > HEADER_BYTES_MAX || http::HeaderValue::from_str(content_type).is_err() {
                let rule = format!("at most {HEADER_BYTES_MAX} bytes of visible text, no control characters");
                fail("headers.Content-Type", rule);
            }
        }
        if target.body.len() > BODY_BYTES_MAX {
            fail("body", format!("at most {BODY_BYTES_MAX} bytes"));
        }
        let retry = &self.retry;
        if !(1..=ATTEMPTS_MAX).contains(&retry.max_attempts) {
            fail("retry.max_attempts", format!("must be within 1..={ATTEMPTS_MAX}"));
        }
        if retry.initial_backoff_ms == 0 || retry.initial_backoff_ms > BACKOFF_MS_MAX {
            fail("retry.initial_backoff_ms", format!("must be within 1..={BACKOFF_MS_MAX}"));
        }
        if retry.max_backoff_ms < retry.initial_backoff_ms || retry.max_backoff_ms > BACKOFF_MS_MAX {
            fail("retry.max_backoff_ms", format!("must be within initial_backoff_ms..={BACKOFF_MS_MAX}"));
        }
        if !(1_000..=10_000).contains(&retry.multiplier_permille) {
            fail("retry.multiplier", "must be within 1.0..=10.0".into());
        }
        if retry.jitter_percent > 100 {
            fail("retry.jitter", "must be within 0.0..=1.0".into());
        }
        if let Backoff::Delays(delays) = &retry.backoff {
            if delays.is_empty() || delays.len() > ATTEMPTS_MAX as usize {
                fail("retry.backoff", format!("a list of 1..={ATTEMPTS_MAX} delays"));
            }
            if delays.iter().any(|d| !(1..=BACKOFF_MS_MAX).contains(d)) {
                fail("retry.backoff", format!("each delay must be within 1..={BACKOFF_MS_MAX} ms"));
            }
        }
        for m in &retry.retry_on {
            let valid = match *m {
                StatusMatch::Exact(code) => (100..=599).contains(&code),
                StatusMatch::Class(class) => (1..=5).contains(&class),
            };
            if !valid {
                fail("retry.retry_on", "each is a status 100..=599 or a class such as \"5xx\"".into());
            }
        }
        if !(1..=ATTEMPT_TIMEOUT_MS_MAX).contains(&self.attempt_timeout_ms) {
            fail("attempt_timeout_ms", format!("must be within 1..={ATTEMPT_TIMEOUT_MS_MAX}"));
        }
        if let Some(deadline) = self.deadline_ms {
            if !(1..=DEADLINE_MS_MAX).contains(&deadline) {
                fail("deadline_ms", format!("must be within 1..={DEADLINE_MS_MAX}"));
            }
        }
        if self.priority > PRIORITY_MAX {
            fail("priority", format!("must be within 0..={PRIORITY_MAX}"));
        }
        if self.depends_on.len() > DEPENDENCIES_MAX {
            fail("depends_on", format!("at most {DEPENDENCIES_MAX} jobs"));
        }
        for (position, id) in self.depends_on.iter().enumerate() {
            if let Err(rule) = check_id(id) {
                fail(&format!("depends_on[{position}]"), rule);
            } else if *id == self.id {
                fail(&format!("depends_on[{position}]"), "a job cannot depend on itself".into());
            }
        }
        if self.labels.len() > LABELS_MAX {
            fail("labels", format!("at most {LABELS_MAX} labels"));
        }
        for (key, value) in &self.labels {
            if key.is_empty() || key.len() > LABEL_BYTES_MAX || value.len() > LABEL_BYTES_MAX {
                fail(&format!("labels.{key}"), format!("keys 1..={LABEL_BYTES_MAX} bytes, values ≤ {LABEL_BYTES_MAX}"));
            }
        }
        for (field, secret) in [("secret", &self.secret), ("secret_next", &self.secret_next)] {
            if secret.as_ref().is_some_and(|s| s.is_empty() || s.len() > SECRET_BYTES_MAX) {
                fail(field, format!("must be 1..={SECRET_BYTES_MAX} bytes"));
            }
        }
        if let Some(flow) = &self.flow {
            if let Err(rule) = check_id(&flow.key) {
                fail("flow.key", rule);
            }
            if flow.parallelism.is_some_and(|p| !(1..=FLOW_PARALLELISM_MAX).contains(&p)) {
                fail("flow.parallelism", format!("must be within 1..={FLOW_PARALLELISM_MAX}"));
            }
            if flow.rate.is_some_and(|r| !(1..=FLOW_RATE_MAX).contains(&r)) {
                fail("flow.rate", format!("must be within 1..={FLOW_RATE_MAX}"));
            }
            if flow.period_ms.is_some_and(|p| !(1..=FLOW_PERIOD_MS_MAX).contains(&p)) {
                fail("flow.period", format!("must be within 1 ms..={FLOW_PERIOD_MS_MAX} ms"));
            }
            if flow.period_ms.is_some() && flow.rate.is_none() {
                fail("flow.period", "needs flow.rate (attempts per period)".into());
            }
        }
        for (field, url) in
            [("callbacks.on_success", &self.callbacks.on_success), ("callbacks.on_failure", &self.callbacks.on_failure)]
        {
            if let Some(Err(rule)) = url.as_deref().map(check_url) {
                fail(field, rule);
            }
        }
        if self.secret_next.is_some() && self.secret.is_none() {
            fail("secret_next", "needs secret: it is the secret that replaces it".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Ids are what clients put in URLs: 1–128 of `A-Z a-z 0-9 . _ ~ : -`.
pub fn check_id(id: &str) -> Result<(), String> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._~:-".contains(&b);
    if id.is_empty() || id.len() > ID_BYTES_MAX || !id.bytes().all(allowed) {
        return Err(format!("must be 1..={ID_BYTES_MAX} characters of A-Z a-z 0-9 . _ ~ : -"));
    }
    if id == "." || id == ".." {
        // In a URL path they name the segment itself or its parent: /jobs/.. is not a job.
        return Err("must not be . or ..".into());
    }
    Ok(())
}

/// An absolute http(s) URL with a host. (Where the host resolves to is the dispatcher's
/// SSRF guard's business, at attempt time.)
pub fn check_url(url: &str) -> Result<(), String> {
    if url.len() > URL_BYTES_MAX {
        return Err(format!("at most {URL_BYTES_MAX} bytes"));
    }
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    let Some(rest) = rest else { return Err("must start with http:// or https://".into()) };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if host.is_empty() || host.starts_with(':') {
        return Err("must name a host".into());
    }
    if url.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    if url.parse::<http::Uri>().is_err() {
        return Err("must be a valid URL".into());
    }
    Ok(())
}

/// A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits.
pub fn new_job_id(now_ms: u64, random: u128) -> String {
    let mut bits = (u128::from(now_ms & 0xFFFF_FFFF_FFFF) << 80) | (random & ((1u128 << 80) - 1));
    bits = (bits & !(0xF << 76)) | (0x7 << 76); // version 7
    bits = (bits & !(0b11 << 62)) | (0b10 << 62); // RFC variant

    // Written digit by digit: one is made for every create, and `format!` cost more than the
    // rest of choosing it.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(36);
    for nibble in 0..32 {
        if matches!(nibble, 8 | 12 | 16 | 20) {
            id.push('-');
        }
        id.push(char::from(DIGITS[((bits >> (124 - 4 * nibble)) & 0xF) as usize]));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_the_multiplier_and_stops_at_the_maximum() {
        let policy = RetryPolicy { initial_backoff_ms: 100, max_backoff_ms: 1_000, ..RetryPolicy::default() };
        let backoffs: Vec<u64> = (1..=6).map(|attempt| policy.backoff_ms(attempt)).collect();
        assert_eq!(backoffs, [100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn fixed_and_listed_backoffs() {
        let fixed = RetryPolicy { initial_backoff_ms: 250, backoff: Backoff::Fixed, ..RetryPolicy::default() };
        assert_eq!((1..=4).map(|a| fixed.backoff_ms(a)).collect::<Vec<_>>(), [250, 250, 250, 250]);
        let listed = RetryPolicy { backoff: Backoff::Delays(vec![10, 500, 3_000]), ..RetryPolicy::default() };
        assert_eq!((1..=5).map(|a| listed.backoff_ms(a)).collect::<Vec<_>>(), [10, 500, 3_000, 3_000, 3_000]);
    }

    #[test]
    fn uuid_v7_has_its_version_variant_and_time() {
        let id = new_job_id(0x0190_1234_5678, u128::MAX);
        assert_eq!(id.len(), 36);
        assert!(id.starts_with("01901234-5678-7"), "{id}");
        assert!(matches!(id.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{id}");
        assert!(check_id(&id).is_ok());
        assert_eq!(id, "01901234-5678-7fff-bfff-ffffffffffff");
        assert_eq!(new_job_id(0x0190_1234_5678, 0), "01901234-5678-7000-8000-000000000000");
        assert_eq!(
            new_job_id(0xFFFF_0190_1234_5678, 0x0123_4567_89ab_cdef_0123),
            "01901234-5678-7123-8567-89abcdef0123"
        );
    }

    #[test]
    fn urls_need_a_scheme_and_a_host() {
        assert!(check_url("https://example.com/hook?a=1").is_ok());
        assert!(check_url("http://127.0.0.1:8080").is_ok());
        assert!(check_url("ftp://example.com").is_err());
        assert!(check_url("https:///path").is_err());
        assert!(check_url("https://exa mple.com").is_err());
    }
}
