//! Optional bearer-token authentication with a per-token request rate limit. Off until a
//! token is configured; then every request but `GET /health` needs `Authorization: Bearer
//! <token>` (401 otherwise), and each token gets a token bucket (429 with Retry-After when
//! it is empty). Guessing is slowed per client address: past `GUESSES_BURST` wrong or
//! missing tokens, an address gets `GUESSES_PER_SECOND`, and meanwhile every request from
//! it is answered 429 before its token is looked at (so answers tell a guesser nothing).

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
    tokens: Vec<String>,
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
    Limited { retry_after_s: u32 },
}

impl Gate {
    /// `rate_per_second` requests per token, with a burst of as many.
    pub fn new(tokens: Vec<String>, rate_per_second: u32) -> Gate {
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
        let mut guesses = self.guesses.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Guesses { by_address: guesses, swept_ms } = &mut *guesses;
        if let Some(bucket) = guesses.get_mut(&address) {
            if bucket.next_token_ms(now_ms) > now_ms {
                return limited(bucket, now_ms);
            }
        }
        let verdict = self.check(method, path, authorization, now_ms);
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

    /// `check_from` for the details `/health` gives a caller presenting a token: guarded as
    /// any route, so a wrong token there counts as a guess (and a guessing address is held
    /// back) and a right one uses its rate, rather than /health telling guesses apart freely.
    pub fn check_health_details_from(&self, address: IpAddr, authorization: Option<&str>, now_ms: u64) -> Verdict {
        self.check_from(address, "GET", "/health/details", authorization, now_ms)
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
        if !self.guards(method, path) {
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
        limited(bucket, now_ms)
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

    #[test]
    fn an_address_out_of_guesses_is_refused_before_its_token_is_looked_at() {
        let gate = Gate::new(vec!["alpha-token-0123456789".into()], 1_000);
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
        let full = Gate::new(vec!["alpha-token-0123456789".into()], 1_000);
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
