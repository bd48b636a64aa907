//! Per-host limits, pure and driven by the caller's clock: a token bucket (rate and burst),
//! a circuit breaker (closed → open after consecutive failures → half-open after a
//! cool-down, one probe at a time → closed on success, open again on failure), and an
//! adaptive concurrency limit (additive increase, multiplicative decrease).

/// Requests per second with a burst allowance. Time is in milliseconds from any origin.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Thousandths of a token, so refills need no floating point.
    milli_tokens: u64,
    capacity_milli: u64,
    refill_milli_per_ms: u64,
    last_ms: u64,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32, now_ms: u64) -> TokenBucket {
        let capacity_milli = u64::from(burst.max(1)) * 1000;
        TokenBucket {
            milli_tokens: capacity_milli,
            capacity_milli,
            refill_milli_per_ms: u64::from(per_second),
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.milli_tokens = (self.milli_tokens + elapsed * self.refill_milli_per_ms).min(self.capacity_milli);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Takes a token if one is there.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled to its burst (its holder may be forgotten).
    pub fn is_full(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.milli_tokens >= self.capacity_milli
    }

    /// When the next token will be there (`now_ms` if one is).
    pub fn next_token_ms(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        if self.milli_tokens >= 1000 || self.refill_milli_per_ms == 0 {
            return now_ms;
        }
        now_ms + (1000 - self.milli_tokens).div_ceil(self.refill_milli_per_ms)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open {
        until_ms: u64,
    },
    /// One probe may go; its outcome decides.
    HalfOpen {
        probing: bool,
    },
}

#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    pub state: BreakerState,
    consecutive_failures: u32,
    failures_to_open: u32,
    open_ms: u64,
}

impl CircuitBreaker {
    pub fn new(failures_to_open: u32, open_ms: u64) -> CircuitBreaker {
        CircuitBreaker {
            state: BreakerState::Closed,
            consecutive_failures: 0,
            failures_to_open: failures_to_open.max(1),
            open_ms,
        }
    }

    /// May a request go now? In half-open, only one at a time (the probe).
    pub fn try_acquire(&mut self, now_ms: u64) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until_ms } if now_ms >= until_ms => {
                self.state = BreakerState::HalfOpen { probing: true };
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                true
            }
            BreakerState::HalfOpen { probing: true } => false,
        }
    }

    /// An attempt let through was aborted before it said anything about the host: a probe
    /// slot is handed back (otherwise the host would stay blocked for good).
    pub fn release(&mut self) {
        if let BreakerState::HalfOpen { probing: true } = self.state {
            self.state = BreakerState::HalfOpen { probing: false };
        }
    }

    /// When a request may go again, if the breaker refuses now.
    pub fn reopens_at_ms(&self) -> Option<u64> {
        match self.state {
            BreakerState::Open { until_ms } => Some(until_ms),
            _ => None,
        }
    }

    pub fn record(&mut self, success: bool, now_ms: u64) {
        if success {
            self.consecutive_failures = 0;
            self.state = BreakerState::Closed;
            return;
        }
        self.consecutive_failures += 1;
        let probe_failed = matches!(self.state, BreakerState::HalfOpen { .. });
        if probe_failed || self.consecutive_failures >= self.failures_to_open {
            self.state = BreakerState::Open { until_ms: now_ms + self.open_ms };
        }
    }
}

/// A host's overload signals closer together than this count as one (the attempts of one
/// burst fail together; one halving answers them).
const BACKOFF_SPACING_MS: u64 = 100;

/// A host not heard from yet may take this many attempts at once (or the most, if lower).
pub const ADAPTIVE_LIMIT_START: u32 = 4;

/// How many attempts may run at once to a host, as TCP sizes its congestion window (and
/// Netflix's concurrency-limits a server's): it starts at `ADAPTIVE_LIMIT_START` and grows
/// by one per answer (doubling per round of requests: slow start) until the host first
/// shows overload — a failed or slow connect, a timeout, 429, 503 — which cuts it by a
/// quarter (at most once per `BACKOFF_SPACING_MS`); from then on it grows by one per round
/// (additive increase). Never past the configured most, never below one. A receiver that
/// can take few requests at once is sent about that many, instead of a burst of
/// connections its accept queue cannot hold.
#[derive(Clone, Debug)]
pub struct AdaptiveLimit {
    /// Thousandths of a request, so growth by a fraction needs no floating point.
    milli: u64,
    most_milli: u64,
    last_backoff_ms: Option<u64>,
}

impl AdaptiveLimit {
    pub fn new(most: u32) -> AdaptiveLimit {
        let most_milli = u64::from(most.max(1)) * 1000;
        let start_milli = u64::from(ADAPTIVE_LIMIT_START) * 1000;
        AdaptiveLimit { milli: start_milli.min(most_milli), most_milli, last_backoff_ms: None }
    }

    /// Attempts that may run at once now (at least one).
    pub fn current(&self) -> u32 {
        (self.milli / 1000).max(1) as u32
    }

    /// Whether the limit is below its most (the host is new, or showed overload lately).
    pub fn is_reduced(&self) -> bool {
        self.milli < self.most_milli
    }

    /// An answer that says the host coped.
    pub fn on_success(&mut self) {
        let step = if self.last_backoff_ms.is_none() { 1000 } else { 1000 / u64::from(self.current()) };
        self.milli = (self.milli + step).min(self.most_milli);
    }

    /// A sign the host is overloaded, at `now_ms`.
    pub fn on_overload(&mut self, now_ms: u64) {
        if self.last_backoff_ms.is_some_and(|last| now_ms < last.saturating_add(BACKOFF_SPACING_MS)) {
            return;
        }
        self.last_backoff_ms = Some(now_ms);
        self.milli = (self.milli * 3 / 4).max(1000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10, 3, 0);
        assert!((0..3).all(|_| bucket.try_take(0)), "a burst of 3");
        assert!(!bucket.try_take(0));
        assert_eq!(bucket.next_token_ms(0), 100, "10 per second: one every 100 ms");
        assert!(!bucket.try_take(99));
        assert!(bucket.try_take(100));
    }

    #[test]
    fn the_breaker_opens_probes_and_closes() {
        let mut breaker = CircuitBreaker::new(3, 1_000);
        for _ in 0..3 {
            assert!(breaker.try_acquire(0));
            breaker.record(false, 0);
        }
        assert_eq!(breaker.state, BreakerState::Open { until_ms: 1_000 });
        assert!(!breaker.try_acquire(999));
        assert!(breaker.try_acquire(1_000), "half-open: one probe");
        assert!(!breaker.try_acquire(1_000), "only one");
        breaker.record(false, 1_010);
        assert_eq!(breaker.state, BreakerState::Open { until_ms: 2_010 }, "a failed probe reopens");
        assert!(breaker.try_acquire(2_010));
        breaker.record(true, 2_020);
        assert_eq!(breaker.state, BreakerState::Closed);
    }

    #[test]
    fn an_aborted_probe_hands_its_slot_back() {
        let mut breaker = CircuitBreaker::new(1, 100);
        breaker.record(false, 0);
        assert!(breaker.try_acquire(100), "the probe");
        assert!(!breaker.try_acquire(100));
        breaker.release(); // the probe was cancelled: it said nothing about the host
        assert!(breaker.try_acquire(100), "another probe may go");
    }

    #[test]
    fn the_adaptive_limit_starts_small_doubles_per_round_then_backs_off_and_grows_by_rounds() {
        let mut limit = AdaptiveLimit::new(64);
        assert_eq!(limit.current(), ADAPTIVE_LIMIT_START, "a host not heard from starts small");
        assert!(limit.is_reduced());
        for _ in 0..4 {
            limit.on_success();
        }
        assert_eq!(limit.current(), 8, "slow start: a round of 4 answers doubles it");
        for _ in 0..100 {
            limit.on_success();
        }
        assert_eq!(limit.current(), 64, "never past the most");
        assert!(!limit.is_reduced());
        limit.on_overload(1_000);
        assert_eq!(limit.current(), 48);
        limit.on_overload(1_050);
        assert_eq!(limit.current(), 48, "a burst's failures count once");
        for at in 0..40 {
            limit.on_overload(1_100 + at * 100);
        }
        assert_eq!(limit.current(), 1, "never below one");
        limit.on_success();
        assert_eq!(limit.current(), 2, "after a backoff: one answer at a limit of one is a round");
        limit.on_success();
        limit.on_success();
        assert_eq!(limit.current(), 3, "two answers at two: another round");
        assert_eq!(AdaptiveLimit::new(2).current(), 2, "the most, when lower than the start");
    }
}
