//! A Wing–Gong–Lowe linearizability checker for a history of register operations (one
//! register per key; keys are checked independently, since linearizability is compositional).
//!
//! Operations whose outcome is unknown (a write that timed out) may or may not have taken
//! effect: the checker may linearize them anywhere after their call, or leave them out.

use std::collections::{BTreeMap, HashSet};

/// What an operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterOp {
    Write(u64),
    /// A read that returned this value (`None`: the register was never written).
    Read(Option<u64>),
}

/// One operation in a history. Times are any monotonic unit; `returned_at` is `None` when the
/// outcome is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operation {
    pub key: u64,
    pub op: RegisterOp,
    pub called_at: u64,
    pub returned_at: Option<u64>,
}

/// The verdict for a whole history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order explains this key's operations.
    NotLinearizable {
        key: u64,
    },
    /// The search exceeded its step budget for this key (the history is too concurrent).
    Inconclusive {
        key: u64,
    },
}

/// Search steps allowed per key before giving up (bounds the checker's time).
const STEPS_PER_KEY_MAX: u64 = 2_000_000;

pub fn check(history: &[Operation]) -> Verdict {
    let mut by_key: BTreeMap<u64, Vec<Operation>> = BTreeMap::new();
    for operation in history {
        // A read with an unknown outcome returned nothing to check.
        if matches!(operation.op, RegisterOp::Read(_)) && operation.returned_at.is_none() {
            continue;
        }
        by_key.entry(operation.key).or_default().push(*operation);
    }
    for (key, operations) in by_key {
        match check_register(&operations) {
            Some(true) => {}
            Some(false) => return Verdict::NotLinearizable { key },
            None => return Verdict::Inconclusive { key },
        }
    }
    Verdict::Linearizable
}

/// Depth-first search over linearization orders with memoization of (done set, value):
/// `Some(true)` linearizable, `Some(false)` not, `None` budget exceeded.
fn check_register(operations: &[Operation]) -> Option<bool> {
    let mut search = Search { operations, seen: HashSet::new(), steps: 0 };
    let done = vec![0u64; operations.len().div_ceil(64)];
    search.explore(&mut done.clone(), None)
}

struct Search<'a> {
    operations: &'a [Operation],
    seen: HashSet<(Vec<u64>, Option<u64>)>,
    steps: u64,
}

impl Search<'_> {
    fn is_done(done: &[u64], i: usize) -> bool {
        done[i / 64] & (1 << (i % 64)) != 0
    }

    fn explore(&mut self, done: &mut Vec<u64>, value: Option<u64>) -> Option<bool> {
        self.steps += 1;
        if self.steps > STEPS_PER_KEY_MAX {
            return None;
        }
        // Every completed operation must be linearized; unknown ones may be left out.
        let pending: Vec<usize> = (0..self.operations.len()).filter(|&i| !Self::is_done(done, i)).collect();
        if pending.iter().all(|&i| self.operations[i].returned_at.is_none()) {
            return Some(true);
        }
        if !self.seen.insert((done.clone(), value)) {
            return Some(false);
        }
        // An operation can go next only if no other pending operation returned before it was called.
        let earliest_return = pending.iter().filter_map(|&i| self.operations[i].returned_at).min().unwrap_or(u64::MAX);
        for &i in &pending {
            let operation = self.operations[i];
            if operation.called_at > earliest_return {
                continue;
            }
            let next_value = match operation.op {
                RegisterOp::Write(v) => Some(v),
                RegisterOp::Read(seen) if seen == value => value,
                RegisterOp::Read(_) => continue,
            };
            done[i / 64] |= 1 << (i % 64);
            let found = self.explore(done, next_value);
            done[i / 64] &= !(1 << (i % 64));
            match found {
                Some(true) => return Some(true),
                None => return None,
                Some(false) => {}
            }
        }
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(op: RegisterOp, called_at: u64, returned_at: Option<u64>) -> Operation {
        Operation { key: 1, op, called_at, returned_at }
    }

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        let history = [
            op(RegisterOp::Read(None), 0, Some(1)),
            op(RegisterOp::Write(5), 2, Some(10)),
            // Overlaps the write: may see the old or the new value.
            op(RegisterOp::Read(None), 3, Some(4)),
            op(RegisterOp::Read(Some(5)), 5, Some(6)),
            op(RegisterOp::Read(Some(5)), 11, Some(12)),
        ];
        assert_eq!(check(&history), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let history = [
            op(RegisterOp::Write(1), 0, Some(1)),
            op(RegisterOp::Write(2), 2, Some(3)),
            op(RegisterOp::Read(Some(1)), 4, Some(5)),
        ];
        assert_eq!(check(&history), Verdict::NotLinearizable { key: 1 });
    }

    #[test]
    fn a_value_never_written_is_caught() {
        let history = [op(RegisterOp::Write(1), 0, Some(1)), op(RegisterOp::Read(Some(7)), 2, Some(3))];
        assert_eq!(check(&history), Verdict::NotLinearizable { key: 1 });
    }

    #[test]
    fn a_read_cannot_see_a_write_called_after_it_returned() {
        let history = [op(RegisterOp::Read(Some(3)), 0, Some(1)), op(RegisterOp::Write(3), 2, Some(3))];
        assert_eq!(check(&history), Verdict::NotLinearizable { key: 1 });
    }

    #[test]
    fn values_flip_flopping_between_two_reads_is_caught() {
        // Two writes complete; later reads see 2 then 1 then 2: no single order allows that.
        let history = [
            op(RegisterOp::Write(1), 0, Some(5)),
            op(RegisterOp::Write(2), 0, Some(5)),
            op(RegisterOp::Read(Some(2)), 6, Some(7)),
            op(RegisterOp::Read(Some(1)), 8, Some(9)),
        ];
        assert_eq!(check(&history), Verdict::NotLinearizable { key: 1 });
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_happened() {
        let happened = [op(RegisterOp::Write(9), 0, None), op(RegisterOp::Read(Some(9)), 5, Some(6))];
        assert_eq!(check(&happened), Verdict::Linearizable);
        let did_not = [op(RegisterOp::Write(9), 0, None), op(RegisterOp::Read(None), 5, Some(6))];
        assert_eq!(check(&did_not), Verdict::Linearizable);
        // But an unknown write cannot take effect before it was called.
        let too_early = [op(RegisterOp::Read(Some(9)), 0, Some(1)), op(RegisterOp::Write(9), 2, None)];
        assert_eq!(check(&too_early), Verdict::NotLinearizable { key: 1 });
    }

    #[test]
    fn keys_are_checked_independently() {
        let history = [
            Operation { key: 1, op: RegisterOp::Write(1), called_at: 0, returned_at: Some(1) },
            Operation { key: 2, op: RegisterOp::Read(None), called_at: 2, returned_at: Some(3) },
            Operation { key: 2, op: RegisterOp::Read(Some(1)), called_at: 4, returned_at: Some(5) },
        ];
        assert_eq!(check(&history), Verdict::NotLinearizable { key: 2 });
    }
}
