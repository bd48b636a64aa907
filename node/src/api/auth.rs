//! Optional bearer-token authentication with a per-token request rate limit. Off until a
//! token is configured; then every request but `GET /health` needs `Authorization: Bearer
//! <token>` (401 otherwise), and each token gets a token bucket (429 with Retry-After when
//! it is empty).

use std::collections::HashMap;
use std::sync::Mutex;
use sundial_engine::limits::TokenBucket;

pub struct Gate {
    tokens: Vec<String>,
    rate_per_second: u32,
    /// One bucket per configured token (bounded by the configuration).
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Unauthorized,
    Limited { retry_after_s: u32 },
}

impl Gate {
    /// `rate_per_second` requests per token, with a burst of as many.
    pub fn new(tokens: Vec<String>, rate_per_second: u32) -> Gate {
        Gate { tokens, rate_per_second: rate_per_second.max(1), buckets: Mutex::new(HashMap::new()) }
    }

    /// Bytes of the longest configured token (0 without tokens).
    pub fn longest_token_bytes(&self) -> usize {
        self.tokens.iter().map(String::len).max().unwrap_or(0)
    }

    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Decides on a request with this `Authorization` header value, at `now_ms`.
    pub fn check(&self, method: &str, path: &str, authorization: Option<&str>, now_ms: u64) -> Verdict {
        if !self.enabled() || (method == "GET" && path.trim_end_matches('/') == "/health") {
            return Verdict::Allow;
        }
        let presented = authorization.and_then(|value| value.strip_prefix("Bearer ")).map(str::trim);
        let Some(token) = presented.and_then(|given| self.tokens.iter().find(|t| constant_time_eq(t, given))) else {
            return Verdict::Unauthorized;
        };
        let mut buckets = self.buckets.lock().expect("no panic holds the lock");
        let bucket = buckets
            .entry(token.clone())
            .or_insert_with(|| TokenBucket::new(self.rate_per_second, self.rate_per_second, now_ms));
        if bucket.try_take(now_ms) {
            return Verdict::Allow;
        }
        let wait_ms = bucket.next_token_ms(now_ms).saturating_sub(now_ms);
        Verdict::Limited { retry_after_s: wait_ms.div_ceil(1000).max(1) as u32 }
    }
}

/// Compares without stopping at the first difference (no timing hint about the token).
fn constant_time_eq(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    let mut difference = a.len() ^ b.len();
    for (i, byte) in a.iter().enumerate() {
        difference |= usize::from(byte ^ b.get(i).copied().unwrap_or(0));
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_rate_limited_per_token() {
        let gate = Gate::new(vec!["alpha".into(), "beta".into()], 2);
        assert_eq!(gate.check("GET", "/jobs", None, 0), Verdict::Unauthorized);
        assert_eq!(gate.check("GET", "/jobs", Some("Bearer wrong"), 0), Verdict::Unauthorized);
        assert_eq!(gate.check("GET", "/jobs", Some("Bearer alph"), 0), Verdict::Unauthorized);
        assert_eq!(gate.check("GET", "/health", None, 0), Verdict::Allow, "health stays open");
        assert_eq!(gate.check("GET", "/jobs", Some("Bearer alpha"), 0), Verdict::Allow);
        assert_eq!(gate.check("GET", "/jobs", Some("Bearer alpha"), 0), Verdict::Allow);
        assert_eq!(gate.check("GET", "/jobs", Some("Bearer alpha"), 0), Verdict::Limited { retry_after_s: 1 });
        assert_eq!(gate.check("GET", "/jobs", Some("Bearer beta"), 0), Verdict::Allow, "another token's own bucket");
        assert_eq!(gate.check("GET", "/jobs", Some("Bearer alpha"), 500), Verdict::Allow, "refilled");
        assert_eq!(Gate::new(Vec::new(), 1).check("POST", "/jobs", None, 0), Verdict::Allow, "off without tokens");
    }
}
