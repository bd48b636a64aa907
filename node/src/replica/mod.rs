//! One replica of a partition: a Raft group (`partition`) over a sundial-wal log (`storage`),
//! and `Replica`, which owns that log together with the runtime that applies its committed
//! commands to the engine's state machine and makes the fires. A shard asks its replicas;
//! only this module reaches a replica's log. Time comes in as `now_ms` from the shard's turn.

pub mod partition;
mod snapshot_worker;
pub mod specs;
pub mod storage;
pub mod tombstones;

use partition::{CommitBacklog, LogWrite, Partition, PartitionOptions, SnapshotTaken};
use std::path::Path;
use sundial_consensus::{Message, NodeId, ProposeError};
use sundial_dispatch::runtime::{Runtime, RuntimeConfig, Ticket};
use sundial_dispatch::AttemptResult;
use sundial_engine::state::{Applied, ApplyError, Command, State};
use sundial_engine::trace::SpanRecord;
use tokio::sync::mpsc;

/// Proposals waiting for commit beyond which a partition refuses clients' writes
/// (`Replica::backlog_refusal`): a bound on the memory of what waits.
pub const COMMIT_WAITING_MAX: usize = 16_384;
/// Bytes of entries waiting for commit beyond which writes are refused (64 MiB).
pub const COMMIT_WAITING_MAX_BYTES: usize = 64 << 20;
/// How long the oldest proposal may wait for commit before writes are refused, once at
/// least `COMMIT_LAG_COUNTS_FROM` wait: half the 1 s a client should wait at most for an
/// answer under overload, so what is admitted commits within it.
pub const COMMIT_LAG_MAX: std::time::Duration = std::time::Duration::from_millis(500);
/// Fewer proposals than this waiting never refuse writes, however old the oldest: a slow
/// disk or a lone slow commit is not a backlog.
pub const COMMIT_LAG_COUNTS_FROM: usize = 256;

/// A partition's replica on this node: its log and its runtime, with one owner.
pub struct Replica {
    runtime: Runtime<Partition>,
    /// Since the last `settle`: the log was fed something of the shard's (a caller's
    /// command or read, a tick, a peer's message), so the next `settle` may not wait.
    fed: bool,
}

/// What a turn of a replica's log produced: verdicts of proposals and messages for peers.
pub struct Settled {
    pub resolved: Vec<(Ticket, Result<Applied, ApplyError>)>,
    pub messages: Vec<Message>,
}

impl Replica {
    /// Opens the partition's log in `dir` (created if missing) and starts its runtime;
    /// attempt outcomes go to `results`, shared by the shard's replicas.
    pub fn open(
        dir: &Path,
        options: PartitionOptions,
        config: RuntimeConfig,
        results: mpsc::Sender<AttemptResult>,
        now_ms: u64,
    ) -> Result<Replica, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = Partition::open(dir, options).map_err(|e| format!("opening {}: {e}", dir.display()))?;
        Ok(Replica { runtime: Runtime::with_shared_results(config, log, results, now_ms), fed: false })
    }

    /// The log, to read its Raft status.
    pub fn partition(&self) -> &Partition {
        self.runtime.log()
    }

    /// The runtime, to read its state, dispatcher and counters.
    pub fn runtime(&self) -> &Runtime<Partition> {
        &self.runtime
    }

    pub fn state(&self) -> &State {
        self.runtime.state()
    }

    pub fn is_leader(&self) -> bool {
        self.runtime.log().is_leader()
    }

    /// `None` when this replica takes proposals; else the member leading (if known and not
    /// this one), for the refusal.
    pub fn not_accepting(&self) -> Option<Option<NodeId>> {
        let log = self.runtime.log();
        (!log.accepts_proposals()).then(|| log.leader().filter(|l| *l != log.node_id()))
    }

    /// Why a client's write to this partition is refused for its commit backlog, if it is:
    /// more proposals (or bytes) waiting for commit than `COMMIT_WAITING_MAX` (or
    /// `COMMIT_WAITING_MAX_BYTES`), or some waiting and the oldest for longer than
    /// `COMMIT_LAG_MAX` — a leader whose commits fall behind what it is asked to write (a
    /// cluster over its capacity). Refused at once, before the log, a write's answer says
    /// "retry" rather than waiting out the proposal limit to say "unknown". The runtime's
    /// own commands (fires, outcomes) are never refused.
    pub fn backlog_refusal(&self) -> Option<String> {
        refusal_for(self.runtime.log().commit_backlog())
    }

    pub fn propose(&mut self, commands: Vec<Command>) -> Vec<Result<Ticket, ApplyError>> {
        self.fed = true;
        self.runtime.propose(commands)
    }

    /// The format its commands are written in from now on (the newest every member reads).
    pub fn write_commands_in(&mut self, format: u8) {
        self.fed = true;
        self.runtime.log_mut().write_commands_in(format);
    }

    /// Applies a command and waits for its verdict (a partition of one commits at once).
    pub fn apply(&mut self, command: Command, now_ms: u64) -> Result<Applied, ApplyError> {
        self.runtime.apply(command, now_ms)
    }

    /// Starts a linearizable read; its ticket resolves once the leader confirmed it.
    pub fn read(&mut self) -> Result<Ticket, ProposeError> {
        self.fed = true;
        self.runtime.log_mut().read()
    }

    /// One unit of Raft time; `reachable`: the members heard from lately.
    pub fn tick(&mut self, reachable: &[sundial_consensus::NodeId]) {
        self.fed = true;
        self.runtime.log_mut().tick(reachable);
    }

    /// Moves live job specs out of mostly dead spec segments (a bounded amount).
    pub fn repack_specs(&mut self) {
        self.runtime.log_mut().repack_specs();
    }

    /// A message from a peer.
    pub fn step(&mut self, message: Message) {
        self.fed = true;
        self.runtime.log_mut().step(message);
    }

    /// Begins the durable write of what the log has ready, without waiting for it
    /// (`Partition::begin_write`); the next `settle` finishes it. A shard begins the write
    /// of every replica fed since its last settle before settling any: their fdatasyncs
    /// run at once. A replica given only the runtime's own commands (starts and outcomes of
    /// fires) is written in turn as before: a fire that comes due while the shard waits
    /// for another's write can still join its write (measured: beginning those too made
    /// fires at 10k/s ~0.23 ms later at the median).
    pub fn begin_write(&mut self) {
        // A failed log is never advanced again: nothing is begun that would wait forever.
        if self.fed && self.runtime.log_failure().is_none() {
            self.runtime.log_mut().begin_write();
        }
    }

    /// Waits until the write `begin_write` began is durable.
    pub fn finish_write(&mut self) {
        self.runtime.log_mut().finish_write();
    }

    /// Whether a write was begun that the next `settle` must finish.
    pub fn write_begun(&self) -> bool {
        self.runtime.log().write_begun()
    }

    /// Persists and applies what the log has ready; returns the verdicts and the messages.
    pub fn settle(&mut self, now_ms: u64) -> Settled {
        self.fed = false;
        self.runtime.advance(now_ms);
        let resolved = self.runtime.take_resolved();
        let messages = self.runtime.log_mut().take_messages();
        Settled { resolved, messages }
    }

    /// Whether `settle` may wait (a few ms, `Runtime::write_may_wait`): since the last one,
    /// the log was given nothing but the runtime's own commands whose write may wait.
    pub fn settle_may_wait(&self, now_ms: u64) -> bool {
        !self.fed && self.runtime.write_may_wait(now_ms)
    }

    /// Proposes a start for every fire due by now (leading only); `settle` writes them.
    pub fn fire_due_jobs(&mut self, now_ms: u64) {
        self.runtime.fire_due_jobs(now_ms);
    }

    /// Proposes the outcomes of attempts; `settle` writes them with the turn's other
    /// proposals (one log write).
    pub fn finish(&mut self, results: Vec<AttemptResult>, now_ms: u64) {
        self.runtime.finish_many(results, now_ms);
    }

    /// When its next timer is due (leading only), if one is set.
    pub fn next_timer_ms(&self) -> Option<u64> {
        self.runtime.next_timer_ms()
    }

    /// How long the replica may sleep before its next timer.
    pub fn sleep_ms(&self, now_ms: u64) -> u64 {
        self.runtime.sleep_ms(now_ms)
    }

    /// The log's write records since the last call (for metrics).
    pub fn take_writes(&mut self) -> Vec<LogWrite> {
        self.runtime.log_mut().take_writes()
    }

    /// The snapshots adopted since the last call (for metrics).
    pub fn take_snapshots(&mut self) -> Vec<SnapshotTaken> {
        self.runtime.log_mut().take_snapshots()
    }

    pub fn take_spans(&mut self) -> (Vec<SpanRecord>, u64) {
        self.runtime.take_spans()
    }

    pub fn keep_spans(&mut self, records: Vec<SpanRecord>) {
        self.runtime.keep_spans(records);
    }

    /// One step toward the replicas the membership places (`Partition::reconcile`).
    pub fn reconcile(&mut self, placed: &[NodeId], me: NodeId) {
        self.fed = true;
        self.runtime.log_mut().reconcile(placed, me, "partition");
    }

    /// Hands leadership to `preferred` when this replica leads and it has caught up.
    pub fn hand_leadership_to(&mut self, preferred: NodeId) -> bool {
        self.fed = true;
        self.runtime.log_mut().hand_leadership_to(preferred)
    }
}

/// `Replica::backlog_refusal` for a backlog.
fn refusal_for(backlog: CommitBacklog) -> Option<String> {
    let lagging = backlog.proposals >= COMMIT_LAG_COUNTS_FROM && backlog.oldest_wait > COMMIT_LAG_MAX;
    if backlog.proposals <= COMMIT_WAITING_MAX && backlog.bytes <= COMMIT_WAITING_MAX_BYTES && !lagging {
        return None;
    }
    Some(format!(
        "the partition's leader is behind its commits ({} writes, {} KiB waiting, the oldest for {} ms); retry shortly",
        backlog.proposals,
        backlog.bytes / 1024,
        backlog.oldest_wait.as_millis()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn writes_are_refused_for_a_commit_backlog_by_count_bytes_or_lag_but_not_for_one_slow_commit() {
        let backlog = |proposals, bytes, oldest_ms| CommitBacklog {
            proposals,
            bytes,
            oldest_wait: Duration::from_millis(oldest_ms),
        };
        assert_eq!(refusal_for(backlog(0, 0, 0)), None);
        assert_eq!(refusal_for(backlog(4_000, 1 << 20, 100)), None, "a busy leader keeping up");
        assert_eq!(refusal_for(backlog(3, 900, 5_000)), None, "a few writes behind a slow disk: not a backlog");
        let lagging = refusal_for(backlog(COMMIT_LAG_COUNTS_FROM, 90_000, 501)).expect("lagging");
        assert!(lagging.contains("oldest for 501 ms"), "{lagging}");
        assert_eq!(refusal_for(backlog(COMMIT_WAITING_MAX, 1 << 20, 1)), None, "at the bound");
        assert!(refusal_for(backlog(COMMIT_WAITING_MAX + 1, 1 << 20, 1)).is_some(), "too many waiting");
        assert!(refusal_for(backlog(10, COMMIT_WAITING_MAX_BYTES + 1, 1)).is_some(), "too many bytes waiting");
    }
}
