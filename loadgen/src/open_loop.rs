//! Open-loop pacing: request i is due at `start + i / rate`, whatever happened to the ones
//! before it, and its latency counts from that intended time — so a stall that delays the
//! sending shows in the latencies instead of hiding (coordinated omission, as wrk2 avoids it).

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub start: Instant,
    /// Time between two intended sends.
    pub interval: Duration,
}

impl Pace {
    /// `rate_per_s` requests per second from `start` (at least 1 per second).
    pub fn new(start: Instant, rate_per_s: u64) -> Pace {
        Pace { start, interval: Duration::from_nanos(1_000_000_000 / rate_per_s.max(1)) }
    }

    /// When request `i` is meant to go.
    pub fn intended(&self, i: u64) -> Instant {
        self.start + self.interval * u32::try_from(i).unwrap_or(u32::MAX)
    }

    /// How many requests a run of `duration` sends.
    pub fn count(&self, duration: Duration) -> u64 {
        (duration.as_nanos() / self.interval.as_nanos().max(1)) as u64
    }
}

/// A request's latency: from when it was meant to go to when its answer came.
pub fn latency_from_intended(intended: Instant, answered: Instant) -> Duration {
    answered.saturating_duration_since(intended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_shows_in_the_latency_of_every_request_it_delayed() {
        let start = Instant::now();
        let pace = Pace::new(start, 1_000); // one per ms
        assert_eq!(pace.count(Duration::from_secs(2)), 2_000);
        // The sender stalls for 100 ms before request 10; requests 10..110 go out late,
        // each answered 1 ms after it was actually sent.
        let stall_end = pace.intended(10) + Duration::from_millis(100);
        let latencies: Vec<Duration> = (10..110)
            .map(|i| {
                let sent = pace.intended(i).max(stall_end + Duration::from_micros(10 * (i - 10)));
                latency_from_intended(pace.intended(i), sent + Duration::from_millis(1))
            })
            .collect();
        // Measured from the send, each would be 1 ms; from the intended time they carry the stall.
        assert!(latencies[0] >= Duration::from_millis(101), "{:?}", latencies[0]);
        assert!(latencies.iter().filter(|l| **l > Duration::from_millis(2)).count() >= 90);
    }
}
