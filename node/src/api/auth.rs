//! Optional bearer-token authentication with a per-token request rate limit. Off until a
//! token is configured; then every request but `GET /health` needs `Authorization: Bearer
//! <token>` (401 otherwise) whose scope covers it (read, write, admin: 403 otherwise), and
//! each token gets a token bucket at its own rate or the node's (429 with Retry-After when
//! it is empty). Guessing is slowed per client address: past `GUESSES_BURST` wrong or
//! missing tokens, an address gets `GUESSES_PER_SECOND`, and meanwhile every request from
//! it is answered 429 before its token is looked at (so answers tell a guesser nothing).

use crate::config::{Scope, TokenGrant};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use sundial_engine::limits::TokenBucket;

/// Wrong or missing tokens an address may present at once, then per second.
const GUESSES_BURST: u32 = 20;
const GUESSES_PER_SECOND: u32 = 2;
/// Addresses whose guesses are counted at most; past it (addresses whose budget refilled
/// are forgotten first) a wrong token from a new address is answered 429, not 401.
const GUESSING_ADDRESSES_MAX: usize = 4_096;

pub struct Gate {
    tokens: Vec<TokenGrant>,
    rate_per_second: u32,
    /// One bucket per configured token (bounded by the configuration).
    buckets: Mutex<HashMap<String, TokenBucket>>,
    /// One bucket of guesses per client address that presented a wrong or missing token.
    guesses: Mutex<Guesses>,
}

#[derive(Default)]
struct Guesses {
    by_address: HashMap<IpAddr, TokenBucket>,
    /// When refilled addresses were last forgotten: at most once a second, so a full map
    /// does not make every wrong token scan it under the lock.
    swept_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Unauthorized,
    Limited {
        retry_after_s: u32,
    },
    /// A right token whose scope is short of what the request needs.
    Forbidden {
        scope: Scope,
        needed: Scope,
    },
}

impl Gate {
    /// `rate_per_second` requests per token, with a burst of as many.
    pub fn new(tokens: Vec<TokenGrant>, rate_per_second: u32) -> Gate {
        Gate {
            tokens,
            rate_per_second: rate_per_second.max(1),
            buckets: Mutex::new(HashMap::new()),
            guesses: Mutex::new(Guesses::default()),
        }
    }

    /// `check`, for a request from `address`: an address out of guesses is refused 429 at
    /// once, and a wrong or missing token uses one of its guesses.
    pub fn check_from(
        &self,
        address: IpAddr,
        method: &str,
        path: &str,
        authorization: Option<&str>,
        now_ms: u64,
    ) -> Verdict {
        if !self.guards(method, path) {
            return Verdict::Allow;
        }
        self.check_scope_from(address, needed_scope(method, path), authorization, now_ms)
    }

    /// `check_scope`, for a request from `address`: an address out of guesses is refused 429
    /// at once, and a wrong or missing token uses one of its guesses.
    pub fn check_scope_from(
        &self,
        address: IpAddr,
        needed: Scope,
        authorization: Option<&str>,
        now_ms: u64,
    ) -> Verdict {
        if !self.enabled() {
            return Verdict::Allow;
        }
        let mut guesses = self.guesses.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Guesses { by_address: guesses, swept_ms } = &mut *guesses;
        if let Some(bucket) = guesses.get_mut(&address) {
            if bucket.next_token_ms(now_ms) > now_ms {
                return limited(bucket, now_ms);
            }
        }
        let verdict = self.check_scope(needed, authorization, now_ms);
        if verdict != Verdict::Unauthorized {
            return verdict;
        }
        if !guesses.contains_key(&address) && guesses.len() >= GUESSING_ADDRESSES_MAX {
            if now_ms >= *swept_ms + 1_000 {
                *swept_ms = now_ms;
                guesses.retain(|_, bucket| !bucket.is_full(now_ms));
            }
            if guesses.len() >= GUESSING_ADDRESSES_MAX {
                return Verdict::Limited { retry_after_s: 1 };
            }
        }
        let bucket =
            guesses.entry(address).or_insert_with(|| TokenBucket::new(GUESSES_PER_SECOND, GUESSES_BURST, now_ms));
        bucket.try_take(now_ms);
        Verdict::Unauthorized
    }

    /// Whether this request needs a token at all (`GET` and `HEAD /health` do not: a
    /// caller without one is told only whether the node is live).
    fn guards(&self, method: &str, path: &str) -> bool {
        self.enabled() && !(matches!(method, "GET" | "HEAD") && path.trim_end_matches('/') == "/health")
    }

    /// Bytes of the longest configured token (0 without tokens).
    pub fn longest_token_bytes(&self) -> usize {
        self.tokens.iter().map(|grant| grant.secret.len()).max().unwrap_or(0)
    }

    /// The scope of the token `authorization` presents, if it is a configured one (every
    /// request's, when no token is configured: nothing is guarded).
    pub fn scope_of(&self, authorization: Option<&str>) -> Option<Scope> {
        if !self.enabled() {
            return Some(Scope::Admin);
        }
        let presented = authorization.and_then(|value| value.strip_prefix("Bearer ")).map(str::trim)?;
        self.tokens.iter().find(|grant| constant_time_eq(&grant.secret, presented)).map(|grant| grant.scope)
    }

    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Decides on a request with this `Authorization` header value, at `now_ms`.
    pub fn check(&self, method: &str, path: &str, authorization: Option<&str>, now_ms: u64) -> Verdict {
        if !self.guards(method, path) {
            return Verdict::Allow;
        }
        self.check_scope(needed_scope(method, path), authorization, now_ms)
    }

    /// Decides on a request that needs `needed` (the binary protocol's frames, the details
    /// /health gives a token) with this `Authorization` header value, at `now_ms`.
    pub fn check_scope(&self, needed: Scope, authorization: Option<&str>, now_ms: u64) -> Verdict {
        if !self.enabled() {
            return Verdict::Allow;
        }
        let presented = authorization.and_then(|value| value.strip_prefix("Bearer ")).map(str::trim);
        let found = presented.and_then(|given| self.tokens.iter().find(|grant| constant_time_eq(&grant.secret, given)));
        let Some(grant) = found else {
            return Verdict::Unauthorized;
        };
        // The rate is charged first: refusals for scope count against it too.
        let mut buckets = self.buckets.lock().expect("no panic holds the lock");
        let rate = grant.rate_per_second.unwrap_or(self.rate_per_second);
        let bucket = buckets.entry(grant.secret.clone()).or_insert_with(|| TokenBucket::new(rate, rate, now_ms));
        if !bucket.try_take(now_ms) {
            return limited(bucket, now_ms);
        }
        if grant.scope < needed {
            return Verdict::Forbidden { scope: grant.scope, needed };
        }
        Verdict::Allow
    }
}

/// The scope a request needs, by method and path: reads need `Read` (a preview computes,
/// it changes nothing); cluster membership and emptying every dead letter need `Admin`; the
/// rest `Write` — a writer may delete or purge jobs one by one. (A bulk purge or delete
/// needs `Admin` too: the HTTP API checks its action, which is in the body.)
fn needed_scope(method: &str, path: &str) -> Scope {
    let segments = crate::api::path_segments(path);
    match (method, segments.as_slice()) {
        ("GET" | "HEAD", _) | ("POST", ["jobs", "preview"]) => Scope::Read,
        ("POST", ["cluster", "members"] | ["join"]) | ("DELETE", ["cluster", "members", ..] | ["dlq"]) => Scope::Admin,
        _ => Scope::Write,
    }
}

/// The refusal of a request whose bucket is empty: retry once its next token is there.
fn limited(bucket: &mut TokenBucket, now_ms: u64) -> Verdict {
    let wait_ms = bucket.next_token_ms(now_ms).saturating_sub(now_ms);
    Verdict::Limited { retry_after_s: wait_ms.div_ceil(1000).max(1) as u32 }
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

    /// Admin tokens at the gate's rate, as tokens without a scope are.
    fn grants(secrets: &[&str]) -> Vec<TokenGrant> {
        let grant =
            |secret: &&str| TokenGrant { secret: secret.to_string(), scope: Scope::Admin, rate_per_second: None };
        secrets.iter().map(grant).collect()
    }

    #[test]
    fn a_token_does_what_its_scope_allows_at_its_own_rate() {
        let token = |secret: &str, scope, rate| TokenGrant { secret: secret.into(), scope, rate_per_second: rate };
        let grants = vec![
            token("reader", Scope::Read, None),
            token("writer", Scope::Write, None),
            token("slow", Scope::Write, Some(1)),
        ];
        let gate = Gate::new(grants, 100);
        let (reader, writer) = (Some("Bearer reader"), Some("Bearer writer"));
        assert_eq!(gate.check("GET", "/jobs/x", reader, 0), Verdict::Allow);
        assert_eq!(gate.check("POST", "/jobs/preview", reader, 0), Verdict::Allow, "a preview changes nothing");
        let forbidden = Verdict::Forbidden { scope: Scope::Read, needed: Scope::Write };
        assert_eq!(gate.check("POST", "/jobs", reader, 0), forbidden);
        assert_eq!(gate.check("DELETE", "/jobs/x", reader, 0), forbidden);
        assert_eq!(gate.check_scope(Scope::Write, reader, 0), forbidden);
        assert_eq!(gate.check("POST", "/jobs", writer, 0), Verdict::Allow);
        let admin_only = Verdict::Forbidden { scope: Scope::Write, needed: Scope::Admin };
        for (method, path) in [("POST", "/cluster/members"), ("DELETE", "/cluster/members/3"), ("DELETE", "/dlq")] {
            assert_eq!(gate.check(method, path, writer, 0), admin_only, "{method} {path}");
        }
        // A token's own rate (1/s), not the gate's (100/s); refusals for scope count too.
        let slow = Some("Bearer slow");
        assert_eq!(
            gate.check("DELETE", "/dlq", slow, 0),
            Verdict::Forbidden { scope: Scope::Write, needed: Scope::Admin }
        );
        assert_eq!(gate.check("GET", "/jobs", slow, 0), Verdict::Limited { retry_after_s: 1 });
        assert_eq!(gate.scope_of(reader), Some(Scope::Read));
        assert_eq!(gate.scope_of(Some("Bearer nobody")), None);
    }

    #[test]
    fn an_address_out_of_guesses_is_refused_before_its_token_is_looked_at() {
        let gate = Gate::new(grants(&["alpha-token-0123456789"]), 1_000);
        let (guesser, other): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..GUESSES_BURST {
            assert_eq!(gate.check_from(guesser, "GET", "/jobs", Some("Bearer wrong"), 0), Verdict::Unauthorized);
        }
        let limited = Verdict::Limited { retry_after_s: 1 };
        assert_eq!(gate.check_from(guesser, "GET", "/jobs", Some("Bearer wrong"), 0), limited);
        let right = Some("Bearer alpha-token-0123456789");
        assert_eq!(gate.check_from(guesser, "GET", "/jobs", right, 0), limited, "even a right token tells nothing");
        assert_eq!(gate.check_from(other, "GET", "/jobs", right, 0), Verdict::Allow, "another address is not held");
        assert_eq!(gate.check_from(guesser, "GET", "/health", None, 0), Verdict::Allow, "health stays open");
        let refilled_ms = 1_000 / u64::from(GUESSES_PER_SECOND);
        assert_eq!(gate.check_from(guesser, "GET", "/jobs", right, refilled_ms), Verdict::Allow, "a guess later");

        // Addresses are bounded: past the bound, those whose budget refilled are forgotten,
        // and while none has, a new address's wrong token is refused 429.
        let full = Gate::new(grants(&["alpha-token-0123456789"]), 1_000);
        for n in 0..GUESSING_ADDRESSES_MAX as u32 {
            let address = IpAddr::from(n.to_be_bytes());
            assert_eq!(full.check_from(address, "GET", "/jobs", None, 0), Verdict::Unauthorized);
        }
        let newcomer: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(full.check_from(newcomer, "GET", "/jobs", None, 0), limited, "no room: refused, not untracked");
        assert_eq!(
            full.check_from(newcomer, "GET", "/jobs", None, 60_000),
            Verdict::Unauthorized,
            "room once refilled"
        );
        assert!(full.guesses.lock().unwrap().by_address.len() <= GUESSING_ADDRESSES_MAX);
    }

    #[test]
    fn tokens_are_checked_and_rate_limited_per_token() {
        let gate = Gate::new(grants(&["alpha", "beta"]), 2);
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
