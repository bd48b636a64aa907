//! A partition: one Raft group whose log is a `WalStorage` and whose committed entries are
//! the engine's commands. Commands reach the state machine only through the committed log,
//! so a restart (or another replica) replays the same commands into the same state. The
//! state machine is snapshotted into the WAL every `snapshot_every_entries` and the log
//! before it dropped.

use crate::storage::WalStorage;
use std::collections::BTreeMap;
use std::path::Path;
use sundial_consensus::{Config, ConfigError, EntryKind, Index, ProposeError, RawNode, Role, Storage};
use sundial_engine::state::{Applied, ApplyError, Command, State};
use sundial_wal::{WalError, WalOptions};

#[derive(Clone, Debug)]
pub struct PartitionOptions {
    pub node_id: u64,
    /// The group's members when it is created (a single node: just itself).
    pub voters: Vec<u64>,
    pub wal: WalOptions,
    /// Applied entries between state-machine snapshots (and log truncations).
    pub snapshot_every_entries: u64,
    /// Proposals are refused beyond this many uncommitted entries.
    pub max_uncommitted_entries: u64,
}

impl PartitionOptions {
    /// A single-node partition with default settings.
    pub fn single_node(node_id: u64) -> PartitionOptions {
        PartitionOptions {
            node_id,
            voters: vec![node_id],
            wal: WalOptions::default(),
            snapshot_every_entries: 10_000,
            max_uncommitted_entries: 100_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("partition log: {0}")]
    Wal(#[from] WalError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Propose(#[from] ProposeError),
    #[error("the partition's snapshot does not decode: {0}")]
    Snapshot(String),
    #[error("no leader elected within {ticks} ticks")]
    NoLeader { ticks: u32 },
}

pub struct Partition {
    node: RawNode<WalStorage>,
    state: State,
    options: PartitionOptions,
    /// Outcomes of commands proposed here, by log index, until taken (bounded by the
    /// uncommitted-entry limit plus what the caller has not taken yet).
    outcomes: BTreeMap<Index, Option<Result<Applied, ApplyError>>>,
    /// Entries applied since the last snapshot.
    applied_since_snapshot: u64,
    /// Snapshots that could not be written (retried at the next interval; the log keeps
    /// everything meanwhile).
    snapshot_failures: u64,
    /// Committed entries whose data did not decode as a command (never expected).
    undecodable_entries: u64,
    /// Durable writes (one fdatasync each) since they were last taken, for metrics.
    writes: Vec<LogWrite>,
    /// Times this node became the group's leader.
    elections_won: u64,
    /// Whether it led at the end of the last `process`.
    leading: bool,
}

/// One durable write of the log: how long it took and how many entries it carried.
#[derive(Clone, Copy, Debug)]
pub struct LogWrite {
    pub duration: std::time::Duration,
    pub entries: usize,
}

/// Writes kept for metrics until taken; beyond it the oldest are dropped (metrics only).
const LOG_WRITES_KEPT_MAX: usize = 4_096;

/// Where a partition's Raft group stands, for status pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaftStatus {
    pub leader: bool,
    pub term: u64,
    pub commit_index: Index,
    pub applied_index: Index,
    pub last_index: Index,
    pub snapshot_index: Index,
}

impl Partition {
    /// Opens (or creates) the partition in `dir`: recovers the log, restores the newest
    /// snapshot, replays the committed entries after it, and (a single voter) elects itself.
    pub fn open(dir: impl AsRef<Path>, options: PartitionOptions) -> Result<Partition, PartitionError> {
        let storage = WalStorage::open(dir, options.wal, &options.voters)?;
        let snapshot = storage.snapshot();
        let state = if snapshot.data.is_empty() {
            State::new()
        } else {
            State::restore(&snapshot.data).map_err(|e| PartitionError::Snapshot(e.to_string()))?
        };
        let mut config = Config::new(options.node_id);
        config.max_uncommitted_entries = options.max_uncommitted_entries;
        let node = RawNode::new(config, storage)?;
        let mut partition = Partition {
            node,
            state,
            options,
            outcomes: BTreeMap::new(),
            applied_since_snapshot: 0,
            snapshot_failures: 0,
            undecodable_entries: 0,
            writes: Vec::new(),
            elections_won: 0,
            leading: false,
        };
        partition.process()?;
        if partition.options.voters == [partition.options.node_id] {
            partition.elect_self()?;
        }
        Ok(partition)
    }

    /// A group of one campaigns after its election timeout: tick until it leads.
    fn elect_self(&mut self) -> Result<(), PartitionError> {
        const TICKS_MAX: u32 = 100;
        for _ in 0..TICKS_MAX {
            if self.is_leader() {
                return Ok(());
            }
            self.node.tick();
            self.process()?;
        }
        Err(PartitionError::NoLeader { ticks: TICKS_MAX })
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.role == Role::Leader
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// Proposes a command; its outcome is known once `process` has applied its index.
    pub fn propose(&mut self, command: &Command) -> Result<Index, PartitionError> {
        let data = serde_json::to_vec(command).expect("commands always serialize");
        let index = self.node.propose(data)?;
        self.outcomes.insert(index, None);
        Ok(index)
    }

    /// The outcome of the command proposed at `index`, once applied (taken once).
    pub fn take_outcome(&mut self, index: Index) -> Option<Result<Applied, ApplyError>> {
        let outcome = self.outcomes.get_mut(&index)?.take()?;
        self.outcomes.remove(&index);
        Some(outcome)
    }

    /// Persists, applies and acknowledges everything Raft has ready. Durable when it returns:
    /// an outcome taken after it belongs to a command that survives a crash.
    pub fn process(&mut self) -> Result<(), PartitionError> {
        // Bounded: a single node produces a finite amount of work between inputs.
        for _ in 0..1_000 {
            if !self.node.has_ready() {
                return Ok(());
            }
            let ready = self.node.ready();
            let started = std::time::Instant::now();
            self.node.raft.log.storage.persist(&ready)?;
            if !ready.entries.is_empty() {
                if self.writes.len() >= LOG_WRITES_KEPT_MAX {
                    self.writes.remove(0);
                }
                self.writes.push(LogWrite { duration: started.elapsed(), entries: ready.entries.len() });
            }
            // A group of one sends nothing; a cluster will hand `ready.messages` to the
            // transport here.
            if let Some(snapshot) = &ready.snapshot {
                self.state = State::restore(&snapshot.data).map_err(|e| PartitionError::Snapshot(e.to_string()))?;
            }
            for entry in &ready.committed_entries {
                match &entry.kind {
                    EntryKind::ConfChange(change) => {
                        self.node.apply_conf_change(*change);
                    }
                    EntryKind::Normal if entry.data.is_empty() => {} // a new leader's no-op
                    EntryKind::Normal => {
                        let outcome = match serde_json::from_slice::<Command>(&entry.data) {
                            Ok(command) => self.state.apply(command),
                            Err(_) => {
                                self.undecodable_entries += 1;
                                continue;
                            }
                        };
                        if let Some(slot) = self.outcomes.get_mut(&entry.index) {
                            *slot = Some(outcome);
                        }
                    }
                }
                self.applied_since_snapshot += 1;
            }
            self.node.advance(ready);
            // A single voter wins inside `tick`, so a change of role is seen here.
            if self.is_leader() && !self.leading {
                self.elections_won += 1;
            }
            self.leading = self.is_leader();
            // A failed snapshot is not the applied commands' failure: they are committed.
            if self.maybe_snapshot().is_err() {
                self.snapshot_failures += 1;
                self.applied_since_snapshot = 0;
            }
        }
        Ok(())
    }

    fn maybe_snapshot(&mut self) -> Result<(), PartitionError> {
        if self.applied_since_snapshot < self.options.snapshot_every_entries {
            return Ok(());
        }
        let applied = self.node.raft.log.applied;
        let conf = self.node.raft.conf_state();
        let data = self.state.snapshot();
        self.node.raft.log.storage.compact(applied, &data, conf)?;
        self.applied_since_snapshot = 0;
        Ok(())
    }

    /// Committed entries that were not commands (corruption the checksums missed, or a
    /// newer format): counted, skipped alike on every replica.
    pub fn undecodable_entries(&self) -> u64 {
        self.undecodable_entries
    }

    /// The durable writes made since the last call (for metrics).
    pub fn take_writes(&mut self) -> Vec<LogWrite> {
        std::mem::take(&mut self.writes)
    }

    pub fn elections_won(&self) -> u64 {
        self.elections_won
    }

    pub fn raft_status(&self) -> RaftStatus {
        let log = &self.node.raft.log;
        RaftStatus {
            leader: self.is_leader(),
            term: self.node.raft.term,
            commit_index: log.committed,
            applied_index: log.applied,
            last_index: log.last_index(),
            snapshot_index: self.snapshot_index(),
        }
    }

    /// How the log makes writes durable: "io_uring" or "pwrite".
    pub fn log_backend(&self) -> &'static str {
        match self.node.raft.log.storage.wal().backend() {
            sundial_wal::SyncBackend::IoUring => "io_uring",
            sundial_wal::SyncBackend::Syscall => "pwrite",
        }
    }

    pub fn snapshot_failures(&self) -> u64 {
        self.snapshot_failures
    }

    /// Index of the newest snapshot (0 before the first).
    pub fn snapshot_index(&self) -> Index {
        self.node.raft.log.storage.snapshot().meta.index
    }
}

impl sundial_engine::runtime::CommandLog for Partition {
    /// Proposes, persists (fdatasync) and applies the command: the verdict returned is that
    /// of a committed, durable entry.
    fn apply(&mut self, command: Command) -> Result<Result<Applied, ApplyError>, sundial_engine::runtime::LogError> {
        let log_error = |error: PartitionError| sundial_engine::runtime::LogError(error.to_string());
        let index = self.propose(&command).map_err(log_error)?;
        self.process().map_err(log_error)?;
        self.take_outcome(index)
            .ok_or_else(|| sundial_engine::runtime::LogError(format!("entry {index} was not applied")))
    }

    fn state(&self) -> &State {
        &self.state
    }

    /// Proposes every command, then persists them with one fdatasync and applies them: the
    /// verdicts are those of committed, durable entries. A refused proposal (overload) is
    /// that command's verdict alone.
    fn apply_batch(
        &mut self,
        commands: Vec<Command>,
    ) -> Result<Vec<Result<Applied, ApplyError>>, sundial_engine::runtime::LogError> {
        let log_error = |error: PartitionError| sundial_engine::runtime::LogError(error.to_string());
        let proposed: Vec<Result<Index, ApplyError>> = commands
            .iter()
            .map(|command| match self.propose(command) {
                Ok(index) => Ok(index),
                Err(PartitionError::Propose(refused)) => Err(ApplyError::Unavailable(refused.to_string())),
                Err(other) => Err(ApplyError::Unavailable(other.to_string())),
            })
            .collect();
        self.process().map_err(log_error)?;
        proposed
            .into_iter()
            .map(|proposal| match proposal {
                Ok(index) => self
                    .take_outcome(index)
                    .ok_or_else(|| sundial_engine::runtime::LogError(format!("entry {index} was not applied"))),
                Err(refused) => Ok(Err(refused)),
            })
            .collect()
    }
}
