//! Admission of clients' creates at the node's edge: a limit on the jobs in flight that
//! adapts to how long they take, so a node driven past what it holds refuses the excess at
//! once (503 `overloaded`, Retry-After) instead of queueing it for seconds in shard inboxes,
//! forwarding and the log — where the answer would come late, or as "outcome unknown".
//!
//! The limit moves as TCP's window does: it shrinks by a quarter when a request takes longer
//! than `SLOW_MS` end to end (at most once per `SLOW_MS`, so one slow spell is one cut), and
//! grows by an eighth of each fast request's jobs while at least half of it is in use. A
//! request larger than the room left is admitted in part (its first jobs; the rest refused,
//! each job answered on its own), and one that finds nothing in flight is admitted whole.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A request answered slower than this, from its arrival to its answer, counts as slow.
pub const SLOW_MS: u64 = 250;
/// The limit, in jobs in flight, at start and never below or above these.
pub const LIMIT_START: u64 = 16_384;
pub const LIMIT_MIN: u64 = 256;
pub const LIMIT_MAX: u64 = 1 << 20;

#[derive(Debug)]
struct Window {
    limit: u64,
    in_flight: u64,
    /// When the limit was last cut: slow answers within `SLOW_MS` of it are the same spell.
    cut_at: Option<Instant>,
}

/// The node's admission limit, shared by its HTTP and binary edges.
#[derive(Debug)]
pub struct Admission {
    window: Mutex<Window>,
}

/// Jobs admitted together: they count in flight until this is dropped (answered, or the
/// request abandoned), and how long that took teaches the limit.
#[derive(Debug)]
#[must_use = "admitted jobs count in flight until this is dropped"]
pub struct Admitted<'a> {
    admission: &'a Admission,
    jobs: u64,
    /// Whether at least half the limit was in use when admitted: only a request that found
    /// the limit busy says anything about raising it.
    busy: bool,
    arrived: Instant,
}

impl Default for Admission {
    fn default() -> Admission {
        Admission { window: Mutex::new(Window { limit: LIMIT_START, in_flight: 0, cut_at: None }) }
    }
}

impl Admission {
    /// Admits as many of `jobs` (a request's, in order) that arrived at `arrived` as fit under
    /// the limit — all of them when nothing is in flight — or none (`None`). A request larger
    /// than the room left is admitted in part, its first jobs (each job is answered on its
    /// own), so a large batch is never starved by a stream of small ones.
    pub fn admit(&self, jobs: u64, arrived: Instant) -> Option<Admitted<'_>> {
        let mut window = self.lock();
        let admitted =
            if window.in_flight == 0 { jobs } else { jobs.min(window.limit.saturating_sub(window.in_flight)) };
        if admitted == 0 {
            return None;
        }
        window.in_flight = window.in_flight.saturating_add(admitted);
        let busy = window.in_flight.saturating_mul(2) >= window.limit;
        Some(Admitted { admission: self, jobs: admitted, busy, arrived })
    }

    /// Jobs admitted at `arrived` were answered at `now`: the limit learns how long they took.
    fn done(&self, jobs: u64, busy: bool, arrived: Instant, now: Instant) {
        let mut window = self.lock();
        window.in_flight = window.in_flight.saturating_sub(jobs);
        let slow = Duration::from_millis(SLOW_MS);
        if now.saturating_duration_since(arrived) > slow {
            // Once per spell, as TCP cuts once per window: only a request admitted after the
            // last cut (under the limit as it is now) may cut it again.
            if window.cut_at.is_none_or(|cut_at| arrived > cut_at && now.saturating_duration_since(cut_at) > slow) {
                window.limit = (window.limit - window.limit / 4).max(LIMIT_MIN);
                window.cut_at = Some(now);
            }
        } else if busy {
            window.limit = (window.limit + (jobs / 8).max(1)).min(LIMIT_MAX);
        }
    }

    /// (limit, jobs in flight) now, for the metrics.
    pub fn levels(&self) -> (u64, u64) {
        let window = self.lock();
        (window.limit, window.in_flight)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // A panic while holding this lock leaves two integers consistent enough to go on.
        self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Admitted<'_> {
    /// How many of the request's jobs were admitted (its first ones).
    pub fn jobs(&self) -> u64 {
        self.jobs
    }

    /// Releases the jobs as answered at `now` (dropping does so at the current time).
    pub fn done_at(self, now: Instant) {
        self.admission.done(self.jobs, self.busy, self.arrived, now);
        std::mem::forget(self);
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.admission.done(self.jobs, self.busy, self.arrived, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_limit_requests_are_refused_or_admitted_in_part_and_a_lone_large_batch_passes() {
        let admission = Admission::default();
        let start = Instant::now();
        let first = admission.admit(LIMIT_START - 10, start).expect("within the limit");
        let part = admission.admit(11, start).expect("the room left");
        assert_eq!(part.jobs(), 10, "the first 10 of 11 fit");
        assert!(admission.admit(1, start).is_none(), "at the limit: refused");
        first.done_at(start);
        part.done_at(start);
        assert_eq!(admission.levels().1, 0, "nothing in flight once answered");
        let huge = admission.admit(LIMIT_MAX * 2, start).expect("alone, a batch past the limit still goes");
        assert_eq!(huge.jobs(), LIMIT_MAX * 2);
        assert!(admission.admit(1, start).is_none());
        huge.done_at(start);
    }

    #[test]
    fn slow_answers_cut_the_limit_once_per_spell_down_to_a_floor_and_fast_busy_ones_raise_it() {
        let admission = Admission::default();
        let start = Instant::now();
        let slow = Duration::from_millis(SLOW_MS + 1);
        let admitted: Vec<Admitted> = (0..3).map(|_| admission.admit(100, start).expect("admitted")).collect();
        let mut answered_at = start + slow;
        for request in admitted {
            request.done_at(answered_at);
            // Later still, but admitted before the cut: the same spell.
            answered_at += slow;
        }
        assert_eq!(admission.levels().0, LIMIT_START - LIMIT_START / 4, "one spell, one cut");
        let mut now = answered_at;
        for _ in 0..100 {
            let arrived = now + Duration::from_millis(1);
            now = arrived + slow;
            admission.admit(1, arrived).expect("admitted").done_at(now);
        }
        assert_eq!(admission.levels().0, LIMIT_MIN, "never below the floor");
        // Fast answers that found the limit busy raise it; idle ones do not.
        let idle = admission.admit(1, now).expect("admitted");
        idle.done_at(now);
        assert_eq!(admission.levels().0, LIMIT_MIN);
        let busy = admission.admit(LIMIT_MIN, now).expect("admitted");
        busy.done_at(now);
        assert_eq!(admission.levels().0, LIMIT_MIN + LIMIT_MIN / 8);
    }
}
