//! The leader's view of each follower: how far it matches, what to send next, and the
//! bounded window of appends in flight (flow control).

use crate::types::Index;
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Where the follower's log matches is unknown: one append per heartbeat until it answers.
    Probe,
    /// The follower matches: appends are pipelined, bounded by the in-flight window.
    Replicate,
    /// A snapshot is on its way; nothing else is sent until it is answered.
    Snapshot { index: Index },
}

/// Appends sent and not yet acknowledged, bounded in count and bytes.
#[derive(Clone, Debug)]
pub struct Inflights {
    sent: VecDeque<(Index, usize)>,
    bytes: usize,
    count_max: usize,
    bytes_max: usize,
}

impl Inflights {
    pub fn new(count_max: usize, bytes_max: usize) -> Inflights {
        assert!(count_max > 0 && bytes_max > 0, "flow-control bounds must be positive");
        Inflights { sent: VecDeque::new(), bytes: 0, count_max, bytes_max }
    }

    pub fn full(&self) -> bool {
        self.sent.len() >= self.count_max || self.bytes >= self.bytes_max
    }

    pub fn add(&mut self, last_index: Index, bytes: usize) {
        debug_assert!(!self.full(), "sending past the window");
        self.sent.push_back((last_index, bytes));
        self.bytes += bytes;
    }

    /// Frees every append whose last index is ≤ `index` (acknowledged).
    pub fn free_up_to(&mut self, index: Index) {
        while let Some(&(last, bytes)) = self.sent.front() {
            if last > index {
                break;
            }
            self.sent.pop_front();
            self.bytes -= bytes;
        }
    }

    /// Frees the oldest append: a heartbeat answer proves the follower is alive, and if
    /// appends were lost the window would otherwise stay full forever.
    pub fn free_first_one(&mut self) {
        if let Some((_, bytes)) = self.sent.pop_front() {
            self.bytes -= bytes;
        }
    }

    pub fn reset(&mut self) {
        self.sent.clear();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }
}

/// How far a chunked snapshot has gone to one follower (bytes of the snapshot's data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotTransfer {
    /// Bytes sent so far, and whether the last chunk went.
    pub sent_bytes: u64,
    pub sent_done: bool,
    /// Bytes the follower confirmed it holds, in order.
    pub acked_bytes: u64,
    /// `acked_bytes` when last looked at, and the leader tick it last moved: no movement for
    /// a few ticks while chunks are out means some were lost, and sending resumes from
    /// `acked_bytes`.
    pub acked_at_last_check: u64,
    pub last_progress_tick: u64,
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub match_index: Index,
    pub next_index: Index,
    pub state: ProgressState,
    /// In `Probe`: an append was sent and not answered yet.
    pub probe_sent: bool,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// The newest heartbeat round this follower answered (this leadership).
    pub acked_round: u64,
    /// Meaningful in `Snapshot` state only.
    pub snapshot_transfer: SnapshotTransfer,
    pub inflights: Inflights,
}

impl Progress {
    pub fn new(next_index: Index, inflights: Inflights) -> Progress {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            recent_active: false,
            acked_round: 0,
            snapshot_transfer: SnapshotTransfer::default(),
            inflights,
        }
    }

    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot { .. } => true,
        }
    }

    pub fn become_probe(&mut self) {
        if let ProgressState::Snapshot { index } = self.state {
            self.next_index = (self.match_index + 1).max(index + 1);
        } else {
            self.next_index = self.match_index + 1;
        }
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.inflights.reset();
    }

    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next_index = self.match_index + 1;
        self.probe_sent = false;
        self.inflights.reset();
    }

    pub fn become_snapshot(&mut self, index: Index) {
        self.state = ProgressState::Snapshot { index };
        self.snapshot_transfer = SnapshotTransfer::default();
        self.probe_sent = false;
        self.inflights.reset();
    }

    /// An acknowledgement up to `index`: true when it moved `match_index`.
    pub fn maybe_update(&mut self, index: Index) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(index + 1);
        updated
    }

    /// A rejection of the append after `rejected`; `probe_hint` is where the follower's log may
    /// match. Returns false for a stale rejection.
    pub fn maybe_decrease_to(&mut self, rejected: Index, probe_hint: Index) -> bool {
        if self.state == ProgressState::Replicate {
            if rejected <= self.match_index {
                return false;
            }
            self.next_index = self.match_index + 1;
            return true;
        }
        if self.next_index.saturating_sub(1) != rejected {
            return false;
        }
        self.next_index = (rejected.min(probe_hint + 1)).max(self.match_index + 1).max(1);
        self.probe_sent = false;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflights_bound_count_and_bytes_and_free_in_order() {
        let mut inflights = Inflights::new(3, 100);
        inflights.add(5, 10);
        inflights.add(9, 10);
        assert!(!inflights.full());
        inflights.add(12, 90);
        assert!(inflights.full());
        inflights.free_up_to(9);
        assert_eq!(inflights.len(), 1);
        assert!(!inflights.full(), "one append of 90 bytes is under both bounds");
        inflights.add(13, 10);
        assert!(inflights.full(), "100 bytes reach the byte bound");
    }
}
