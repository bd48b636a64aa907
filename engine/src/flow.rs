//! Flow-control decisions as pure functions of the state, the caller's counts and `now_ms`:
//! whether a flow key lets an attempt start (order, parallelism), and its rate window. The
//! runtime (sundial-dispatch) keeps the counts of what it proposed and asks here.

use crate::state::{KeyFire, State};
use std::collections::VecDeque;

/// What a flow key's limits say about starting an attempt now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    Go,
    /// Wait for an attempt of the key to end (parallelism, order).
    Park,
    /// Wait: the key's first due job (named) goes first (ordered keys); wake it.
    ParkBehind(String),
    /// Wait until the rate period lets another start.
    WaitUntil(u64),
}

/// Whether the flow key `key` lets the job `id` start an attempt of its fire `fire_ms`;
/// `pending`: attempts of the key the caller has proposed and not yet seen applied.
/// `starts`: when the key's recent attempts started (the caller's rate window), trimmed
/// here to the period; `None` when the caller keeps none for the key.
pub fn gate(
    state: &State,
    key: &str,
    id: &str,
    fire_ms: u64,
    pending: u32,
    starts: Option<&mut VecDeque<u64>>,
    now_ms: u64,
) -> Gate {
    let Some(flow) = state.flow_key(key) else { return Gate::Go };
    if flow.ordered {
        // One fire of the key at a time, the first due first; the started fire's retries go
        // on. Fires added and not started (trigger, backfill, redrive) wait their turn like
        // any due fire.
        let active = state.flow_active(flow);
        let this = |fire: &KeyFire| fire.job == id && fire.fire_ms == fire_ms;
        let current = active.iter().any(|fire| this(fire) && fire.started);
        let others = active.iter().any(|fire| !this(fire) && fire.started);
        if others || (!current && pending > 0) {
            return Gate::Park;
        }
        if !current {
            if let Some((_, first)) = state.flow_first_due(flow).filter(|(_, first)| *first != id) {
                return Gate::ParkBehind(first.to_string());
            }
        }
    }
    if let Some(parallelism) = flow.parallelism {
        if state.flow_in_flight(flow) as u64 + u64::from(pending) >= u64::from(parallelism) {
            return Gate::Park;
        }
    }
    if let (Some(rate), Some(period_ms), Some(starts)) = (flow.rate, flow.period_ms, starts) {
        if let Some(until_ms) = rate_wait(starts, rate, period_ms, now_ms) {
            return Gate::WaitUntil(until_ms);
        }
    }
    Gate::Go
}

/// A sliding-log rate limit: drops starts older than `period_ms`; when `rate` remain, the
/// time the oldest leaves the window (start then), else `None` (start now).
pub fn rate_wait(starts: &mut VecDeque<u64>, rate: u32, period_ms: u64, now_ms: u64) -> Option<u64> {
    while starts.front().is_some_and(|at| at + period_ms <= now_ms) {
        starts.pop_front();
    }
    (starts.len() >= rate as usize).then(|| starts.front().map_or(now_ms, |at| at + period_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_window_slides() {
        let mut starts = VecDeque::from([1_000, 1_500]);
        assert_eq!(rate_wait(&mut starts, 2, 1_000, 1_900), Some(2_000), "two in the window: wait for the first");
        assert_eq!(rate_wait(&mut starts, 2, 1_000, 2_000), None, "the first left the window");
        assert_eq!(starts, VecDeque::from([1_500]));
    }
}
