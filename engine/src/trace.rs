//! W3C trace context for jobs and the spans of a fire. A job remembers the trace it was
//! created in (`TraceContext`, replicated with the job); every fire and attempt belongs to
//! that trace, with span ids derived from the fire's idempotency key so that any leader,
//! before or after a restart, names the same attempt the same way. The webhook's
//! `traceparent` names the attempt's span, so the receiver's spans hang under it.
//!
//! Spans are recorded as plain data (`SpanRecord`) — the engine exports nothing itself; the
//! node ships them over OTLP when an endpoint is configured.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The trace a job was created in and the span that created it (lower-case hex, 32 and 16
/// digits, neither all zeros).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct TraceContext {
    pub trace_id: String,
    pub span_id: String,
}

impl TraceContext {
    /// From random bits (a request that carried no `traceparent`).
    pub fn new(trace_bits: u128, span_bits: u64) -> TraceContext {
        TraceContext { trace_id: format!("{:032x}", trace_bits.max(1)), span_id: format!("{:016x}", span_bits.max(1)) }
    }

    /// Parses a `traceparent` header (version 00): its trace id, and its span id as the
    /// parent. `None` when it is not a valid one (the caller then starts a new trace).
    pub fn parse_traceparent(value: &str) -> Option<TraceContext> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let lower_hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let valid = version == "00"
            && parts.next().is_none()
            && lower_hex(trace_id, 32)
            && lower_hex(span_id, 16)
            && lower_hex(flags, 2)
            && trace_id.bytes().any(|b| b != b'0')
            && span_id.bytes().any(|b| b != b'0');
        valid.then(|| TraceContext { trace_id: trace_id.to_string(), span_id: span_id.to_string() })
    }

    /// The `traceparent` naming `span_id` in this trace (sampled).
    pub fn traceparent_for(&self, span_id: &str) -> String {
        format!("00-{}-{span_id}-01", self.trace_id)
    }

    pub fn is_valid(&self) -> bool {
        TraceContext::parse_traceparent(&self.traceparent_for(&self.span_id)).is_some()
    }
}

/// The trace of a fire: the job's, or (a job without one) one derived from the fire.
pub fn fire_trace(job_trace: Option<&TraceContext>, job_id: &str, fire_ms: u64) -> String {
    match job_trace {
        Some(trace) => trace.trace_id.clone(),
        None => hex(&digest(&format!("{job_id}:{fire_ms}"))[..16]),
    }
}

/// The span of a fire (from its due time to its final outcome).
pub fn fire_span_id(job_id: &str, fire_ms: u64) -> String {
    hex(&digest(&format!("{job_id}:{fire_ms}#fire"))[..8])
}

/// The span of one attempt of a fire.
pub fn attempt_span_id(job_id: &str, fire_ms: u64, attempt: u32) -> String {
    hex(&digest(&format!("{job_id}:{fire_ms}#{attempt}"))[..8])
}

/// The `traceparent` an attempt sends: its own span in the fire's trace.
pub fn attempt_traceparent(job_trace: Option<&TraceContext>, job_id: &str, fire_ms: u64, attempt: u32) -> String {
    format!("00-{}-{}-01", fire_trace(job_trace, job_id, fire_ms), attempt_span_id(job_id, fire_ms, attempt))
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A finished span, as data: the node exports these over OTLP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanRecord {
    pub name: &'static str,
    pub trace_id: String,
    pub span_id: String,
    /// The parent span (`None`: a root span).
    pub parent_span_id: Option<String>,
    pub start_ms: u64,
    pub end_ms: u64,
    pub attributes: Vec<(&'static str, String)>,
    pub failed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_parsed_only_when_valid() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse_traceparent(header).expect("valid");
        assert_eq!(
            (context.trace_id.as_str(), context.span_id.as_str()),
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
        );
        assert_eq!(context.traceparent_for(&context.span_id), header);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn attempts_of_a_job_with_a_trace_stay_in_it_with_stable_distinct_spans() {
        let trace = TraceContext::new(7, 9);
        let first = attempt_traceparent(Some(&trace), "job", 5, 1);
        assert!(first.starts_with(&format!("00-{}-", trace.trace_id)), "{first}");
        assert_eq!(first, attempt_traceparent(Some(&trace), "job", 5, 1), "stable");
        assert_ne!(first, attempt_traceparent(Some(&trace), "job", 5, 2));
        let untraced = attempt_traceparent(None, "job", 5, 1);
        assert_eq!(untraced.len(), 55);
        assert_ne!(&untraced[3..35], trace.trace_id);
        assert_ne!(fire_span_id("job", 5), attempt_span_id("job", 5, 1));
    }
}
