//! The replicated state machine: jobs, their fires and attempts, the dead-letter list and the
//! counts by status. `apply` takes a command with its leader-stamped times and changes the
//! state deterministically — no clock, no randomness — so every replica that applies the same
//! log holds the same state (checked by `digest`). A refused command changes nothing.

use crate::cron::CronSchedule;
use crate::job::{JobSpec, Misfire, Overlap, Schedule};
use crate::spec::{PackedSpec, SpecCell, SpecSegment, SpecSink, SpecView};
use crate::table::{self, JobTable};
use crate::tombstones::{AsTombstoneList, Tombstone, TombstoneStore, Tombstones};
use rkyv::util::AlignedVec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Executions kept per job (oldest dropped first).
pub const HISTORY_PER_JOB_MAX: usize = 50;
/// Bytes of a response body kept in an execution record.
pub const RESPONSE_BODY_KEPT_BYTES_MAX: usize = 512;
/// A fire that starts more than this after it was due is missed under `Misfire::Skip`.
pub const MISFIRE_THRESHOLD_MS: u64 = 60_000;
/// Fires older than this when they could finally start are recorded as missed, whatever the
/// policy (never silently dropped: they are counted and written to the history).
pub const CATCH_UP_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// Missed cron occurrences counted one by one before the count is reported as a lower bound.
const MISSED_COUNT_MAX: u64 = 1_000;
/// Dead-letter entries kept; the oldest are purged beyond it.
pub const DEAD_LETTERS_MAX: usize = 100_000;
/// Ids of deleted jobs remembered for the dedup window; the oldest are forgotten beyond it.
pub const TOMBSTONES_MAX: usize = 1_000_000;
/// Finished jobs one `Expire` command looks at, at most: its apply stays short (a few ms).
pub const EXPIRE_PER_COMMAND_MAX: u32 = 4_096;
/// A finished job past its retention that is still needed (jobs depend on it, or callbacks of
/// its fires have not gone out) is looked at again this long after, at the soonest.
pub const EXPIRY_RECHECK_MS: u64 = 60_000;
/// Fires one backfill may add at most.
pub const BACKFILL_FIRES_MAX: usize = 1_000;
/// Times a trigger looks for a free fire time (one ms later each) before giving up.
const TRIGGER_PROBES_MAX: u64 = 1_000;
/// Flow keys a pause may bring into being at most (a key without jobs lives only while
/// paused; keys with jobs are bounded by the jobs).
pub const FLOW_KEYS_MAX: usize = 100_000;
/// Callbacks waiting per job at most; beyond it the oldest is dropped (noted in the history).
pub const CALLBACKS_PENDING_MAX: usize = 1_000;

/// The format `State::snapshot` writes (rkyv behind a 16-byte header). As for commands
/// (`codec`), a change of the archived layout takes a new number; never 123 (`{`, format 0).
/// Format 4 holds the job table as its slots and free list (`table`), each job's spec as its
/// own archive (what a spec store keeps) and a job's fires, history and counters apart from
/// its scheduling fields (`JobLife`). Formats 1 (specs inline), 2 (one flat job) and 3 (jobs
/// in a map by id) were written only by development builds and are not read.
pub const SNAPSHOT_FORMAT: u8 = 4;
/// The format of a linked snapshot (`SnapshotCopy::encode_linked`): format 4's archive, in
/// which a stored spec is a `SpecRef` into a segment of the replica's spec store instead of
/// its bytes, behind a list of those segments (`LinkedSegment`: number, length, CRC32C) that
/// the shell keeps and checks. Never sent to another member: it is only whole together with
/// this replica's segment files.
pub const SNAPSHOT_FORMAT_LINKED: u8 = 5;
/// Bytes of one entry of a linked snapshot's segment list.
const LINKED_SEGMENT_BYTES: usize = 24;
/// Segments a linked snapshot lists at most (the spec store's own bound is lower).
pub const LINKED_SEGMENTS_MAX: usize = 1 << 20;
/// Snapshot formats this build knows and no longer reads.
const SNAPSHOT_FORMATS_RETIRED: [u8; 3] = [1, 2, 3];
const SNAPSHOT_HEADER_BYTES: usize = 16;

/// Why a snapshot could not be taken (a state past the archive's 2 GiB).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the state cannot be archived: {0}")]
pub struct SnapshotError(String);

/// A snapshot's bytes, aligned for the archive they hold.
pub type SnapshotBytes = AlignedVec<16>;

/// A state copied to be archived as a snapshot (`State::copy_for_snapshot`); it can only be
/// encoded (it has no index to look jobs up by).
pub struct SnapshotCopy(State);

/// A segment a linked snapshot needs: its first `len_bytes` bytes, whose CRC32C is `crc32c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkedSegment {
    pub number: u64,
    pub len_bytes: u64,
    pub crc32c: u32,
}

impl SnapshotCopy {
    /// The snapshot's bytes, the same as `State::snapshot_sized` of the state copied.
    pub fn encode(&self, capacity_bytes: usize) -> Result<SnapshotBytes, SnapshotError> {
        self.0.snapshot_sized(capacity_bytes)
    }

    /// Makes every stored spec of the copy a link (archived as its place in the store, not
    /// its bytes) and returns the segments they lie in, by number, each once. What
    /// `encode_linked` then writes is whole only with those segments' files.
    pub fn link(&mut self) -> Vec<Arc<dyn SpecSegment>> {
        let mut segments: BTreeMap<u64, Arc<dyn SpecSegment>> = BTreeMap::new();
        for job in self.0.jobs.values_mut() {
            job.spec.link_in_place();
            if let Some(view) = job.spec.link() {
                segments.entry(view.reference().segment).or_insert_with(|| view.segment().clone());
            }
        }
        segments.into_values().collect()
    }

    /// A linked snapshot (`SNAPSHOT_FORMAT_LINKED`): a 16-byte header (the format, zeros, the
    /// number of segments at bytes 8..12, the padding's length at 12..16), the segment list
    /// (24 bytes each: number, length, CRC32C, zero), zeros to a multiple of 16 and then the
    /// padding (zeros), then the archive as format 4 has it but with links. `segments` must
    /// list every segment a link of the copy lies in. The padding (under 16 bytes) makes the
    /// archive start at a multiple of 16 from `lands_at_bytes`, the offset the bytes will
    /// have in a page-aligned mapping, so a restore reads it there instead of copying it.
    pub fn encode_linked(
        &self,
        segments: &[LinkedSegment],
        lands_at_bytes: usize,
        capacity_bytes: usize,
    ) -> Result<SnapshotBytes, SnapshotError> {
        let listed: BTreeMap<u64, u64> = segments.iter().map(|s| (s.number, s.len_bytes)).collect();
        for job in self.0.jobs.values() {
            if let Some(reference) = job.spec.link().map(SpecView::reference) {
                let inside = listed
                    .get(&reference.segment)
                    .is_some_and(|&len| u64::from(reference.offset) + u64::from(reference.len) <= len);
                if !inside {
                    return Err(SnapshotError(format!("spec segment {} is not listed whole", reference.segment)));
                }
            }
        }
        let count = u32::try_from(segments.len())
            .ok()
            .filter(|&count| count as usize <= LINKED_SEGMENTS_MAX)
            .ok_or_else(|| SnapshotError(format!("{} spec segments are more than a snapshot lists", segments.len())))?;
        let list_bytes = (segments.len() * LINKED_SEGMENT_BYTES).next_multiple_of(SNAPSHOT_HEADER_BYTES);
        let pad_bytes = (SNAPSHOT_HEADER_BYTES - lands_at_bytes % SNAPSHOT_HEADER_BYTES) % SNAPSHOT_HEADER_BYTES;
        // Archived into a buffer of its own: its alignment padding is relative to where it
        // starts, which is aligned in the file, not in `out` (then one copy, on the thread).
        let archive = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(
            &self.0,
            AlignedVec::<16>::with_capacity(capacity_bytes),
        )
        .map_err(|e| SnapshotError(e.to_string()))?;
        let mut out = AlignedVec::<16>::with_capacity(SNAPSHOT_HEADER_BYTES + list_bytes + pad_bytes + archive.len());
        out.extend_from_slice(&[SNAPSHOT_FORMAT_LINKED, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&(pad_bytes as u32).to_le_bytes());
        for segment in segments {
            out.extend_from_slice(&segment.number.to_le_bytes());
            out.extend_from_slice(&segment.len_bytes.to_le_bytes());
            out.extend_from_slice(&segment.crc32c.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
        }
        out.resize(SNAPSHOT_HEADER_BYTES + list_bytes + pad_bytes, 0);
        out.extend_from_slice(&archive);
        Ok(out)
    }
}

/// The segments a linked snapshot lists (none for a snapshot of any other format), and
/// where its archive starts.
fn linked_list(bytes: &[u8]) -> Result<(Vec<LinkedSegment>, usize), RestoreError> {
    let damaged = |reason: String| RestoreError::Damaged { format: SNAPSHOT_FORMAT_LINKED, reason };
    let header = bytes.get(..SNAPSHOT_HEADER_BYTES).ok_or_else(|| damaged("it is shorter than its header".into()))?;
    let pad_bytes = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
    if header[1..8].iter().any(|&b| b != 0) || pad_bytes >= SNAPSHOT_HEADER_BYTES {
        return Err(damaged("its header is not this format's".into()));
    }
    let count = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if count > LINKED_SEGMENTS_MAX {
        return Err(damaged(format!("it lists {count} segments, more than {LINKED_SEGMENTS_MAX}")));
    }
    let list_end = SNAPSHOT_HEADER_BYTES + (count * LINKED_SEGMENT_BYTES).next_multiple_of(SNAPSHOT_HEADER_BYTES);
    let list = bytes.get(SNAPSHOT_HEADER_BYTES..list_end).ok_or_else(|| damaged("its segment list is cut".into()))?;
    let archive_at = list_end + pad_bytes;
    let word = |at: &[u8]| u64::from_le_bytes(at.try_into().unwrap_or_default());
    let segments = list
        .chunks_exact(LINKED_SEGMENT_BYTES)
        .take(count)
        .map(|entry| LinkedSegment {
            number: word(&entry[..8]),
            len_bytes: word(&entry[8..16]),
            crc32c: u32::from_le_bytes([entry[16], entry[17], entry[18], entry[19]]),
        })
        .collect();
    Ok((segments, archive_at))
}

/// FNV-1a over what is written to it (`State::digest`).
struct Fnv(u64);

impl std::io::Write for Fnv {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 = bytes.iter().fold(self.0, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why a snapshot could not be restored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "snapshot format {found} is unknown (a newer Sundial wrote it); this node reads formats 0 to {SNAPSHOT_FORMAT_LINKED}: upgrade it to the version that wrote the data"
    )]
    UnknownFormat { found: u8 },
    #[error(
        "snapshot format {found} was written by a development build and is no longer read (this node reads formats 0, {SNAPSHOT_FORMAT} and {SNAPSHOT_FORMAT_LINKED}): run the build that wrote the data, or give this node an empty data directory to catch up from its peers"
    )]
    Retired { found: u8 },
    #[error("a snapshot of format {format} does not decode: {reason}")]
    Damaged { format: u8, reason: String },
}

/// Scheduled-DB's status values.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum Status {
    Pending,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    Timeout,
}

impl Status {
    pub const ALL: [Status; 6] =
        [Status::Pending, Status::InProgress, Status::Completed, Status::Failed, Status::Cancelled, Status::Timeout];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Timeout => "timeout",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled | Status::Timeout)
    }
}

/// Why an attempt failed without a usable response.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum ErrorClass {
    Timeout,
    Connect,
    /// The target resolved to an address the SSRF guard refuses.
    Refused,
    /// The attempt was aborted (job cancelled meanwhile).
    Aborted,
    /// The request could not be built from the job's target (never the host's fault).
    InvalidRequest,
    Other,
}

/// What one attempt produced, as the dispatcher saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Outcome {
    Response {
        status: u16,
        body: Vec<u8>,
        retry_after_ms: Option<u64>,
        /// The receiver asked not to be retried (`X-Sundial-No-Retry`): the fire is dead-lettered.
        #[serde(default)]
        no_retry: bool,
    },
    Error(ErrorClass),
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, Outcome::Response { status: 200..=299, .. })
    }
}

/// Whether the id of a job being created may have a tombstone (`create` looked, and
/// found none: no second look).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Remembered {
    Maybe,
    No,
}

/// A command of the state machine as this build writes it: a create carries its spec's
/// archive (the bytes the spec store keeps).
pub type Command = CommandOf<PackedSpec>;

/// A command; `Spec` is how creates and upserts carry their spec (`PackedSpec` today; a
/// `Box<JobSpec>` in the commands of format 1, `codec.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum CommandOf<Spec> {
    Create {
        spec: Spec,
        now_ms: u64,
        /// A create that repeats the id of a job finished (or deleted) less than this long
        /// ago is refused as a duplicate. `None`: no window (commands logged before it).
        #[serde(default)]
        dedup_window_ms: Option<u64>,
    },
    /// Creates the job, or replaces the schedule and target of the job with its id.
    Upsert {
        spec: Spec,
        now_ms: u64,
    },
    Cancel {
        id: String,
        now_ms: u64,
    },
    Delete {
        id: String,
        #[serde(default)]
        now_ms: u64,
    },
    /// An extra fire now, with its own fire time (and so its own idempotency key).
    Trigger {
        id: String,
        now_ms: u64,
    },
    /// A fire for every occurrence of a cron job's schedule in `[from_ms, to_ms]`, run now.
    Backfill {
        id: String,
        from_ms: u64,
        to_ms: u64,
        now_ms: u64,
    },
    /// Puts every dead-lettered fire of a job back to be attempted again.
    RedriveJob {
        id: String,
        now_ms: u64,
    },
    /// No fire of the flow key's jobs starts until it is resumed.
    PauseKey {
        key: String,
    },
    ResumeKey {
        key: String,
        now_ms: u64,
    },
    /// The leader started attempt `attempt` of the callback for the fire `fire_ms`.
    CallbackStarted {
        id: String,
        fire_ms: u64,
        attempt: u32,
        now_ms: u64,
    },
    /// A callback attempt ended; `retry_at_ms` as for `AttemptFinished`.
    CallbackFinished {
        id: String,
        fire_ms: u64,
        attempt: u32,
        started_ms: u64,
        finished_ms: u64,
        outcome: Outcome,
        retry_at_ms: u64,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
        now_ms: u64,
    },
    /// The leader started attempt `attempt` of the fire due at `fire_ms` on `node`.
    FireStarted {
        id: String,
        fire_ms: u64,
        attempt: u32,
        node: u64,
        now_ms: u64,
    },
    /// An attempt ended. `retry_at_ms` is when the leader would run the next attempt (backoff
    /// with jitter, or Retry-After); the state machine decides whether there is one.
    AttemptFinished {
        id: String,
        fire_ms: u64,
        attempt: u32,
        node: u64,
        started_ms: u64,
        finished_ms: u64,
        outcome: Outcome,
        retry_at_ms: u64,
    },
    /// Puts a dead-lettered fire back to be attempted again from attempt 1.
    Redrive {
        id: String,
        fire_ms: u64,
        now_ms: u64,
    },
    /// Drops dead-letter entries: of one job, or all.
    Purge {
        id: Option<String>,
    },
    /// Removes up to `max` jobs that finished at least `retention_ms` before `now_ms`, with
    /// their dead letters; an id finished less than `dedup_window_ms` ago is remembered
    /// (a tombstone) so a create repeating it is still refused. Proposed by the leader.
    Expire {
        now_ms: u64,
        retention_ms: u64,
        dedup_window_ms: u64,
        max: u32,
    },
}

impl<Spec> CommandOf<Spec> {
    /// The same command with its spec (if it carries one) in another form: between this
    /// build's commands and those of an older format (`codec.rs`).
    pub fn map_spec<Other>(self, convert: impl FnOnce(Spec) -> Other) -> CommandOf<Other> {
        use CommandOf as C;
        match self {
            C::Create { spec, now_ms, dedup_window_ms } => C::Create { spec: convert(spec), now_ms, dedup_window_ms },
            C::Upsert { spec, now_ms } => C::Upsert { spec: convert(spec), now_ms },
            C::Cancel { id, now_ms } => C::Cancel { id, now_ms },
            C::Delete { id, now_ms } => C::Delete { id, now_ms },
            C::Trigger { id, now_ms } => C::Trigger { id, now_ms },
            C::Backfill { id, from_ms, to_ms, now_ms } => C::Backfill { id, from_ms, to_ms, now_ms },
            C::RedriveJob { id, now_ms } => C::RedriveJob { id, now_ms },
            C::PauseKey { key } => C::PauseKey { key },
            C::ResumeKey { key, now_ms } => C::ResumeKey { key, now_ms },
            C::CallbackStarted { id, fire_ms, attempt, now_ms } => C::CallbackStarted { id, fire_ms, attempt, now_ms },
            C::CallbackFinished { id, fire_ms, attempt, started_ms, finished_ms, outcome, retry_at_ms } => {
                C::CallbackFinished { id, fire_ms, attempt, started_ms, finished_ms, outcome, retry_at_ms }
            }
            C::Pause { id } => C::Pause { id },
            C::Resume { id, now_ms } => C::Resume { id, now_ms },
            C::FireStarted { id, fire_ms, attempt, node, now_ms } => {
                C::FireStarted { id, fire_ms, attempt, node, now_ms }
            }
            C::AttemptFinished { id, fire_ms, attempt, node, started_ms, finished_ms, outcome, retry_at_ms } => {
                C::AttemptFinished { id, fire_ms, attempt, node, started_ms, finished_ms, outcome, retry_at_ms }
            }
            C::Redrive { id, fire_ms, now_ms } => C::Redrive { id, fire_ms, now_ms },
            C::Purge { id } => C::Purge { id },
            C::Expire { now_ms, retention_ms, dedup_window_ms, max } => {
                C::Expire { now_ms, retention_ms, dedup_window_ms, max }
            }
        }
    }
}

/// Why a command was refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ApplyError {
    #[error("job {0} already exists with a different spec")]
    Conflict(String),
    #[error("job {0} not found")]
    NotFound(String),
    #[error("depends_on: job {0} does not exist")]
    UnknownDependency(String),
    #[error("depends_on: depending on {0} would make a cycle")]
    Cycle(String),
    #[error("job {id} is required by {dependents:?}; delete those first")]
    Required { id: String, dependents: Vec<String> },
    #[error("job {id} is {status:?}: {action} is not possible")]
    InvalidState { id: String, status: Status, action: &'static str },
    #[error("fire {fire_ms} of job {id} is not active, or attempt {attempt} is not the next")]
    StaleAttempt { id: String, fire_ms: u64, attempt: u32 },
    #[error("fire {fire_ms} of job {id} is not in the dead-letter list")]
    NotDeadLettered { id: String, fire_ms: u64 },
    #[error("job {id} finished at {finished_ms} (ms); its id cannot be reused before {until_ms} (the dedup window)")]
    Duplicate { id: String, finished_ms: u64, until_ms: u64 },
    #[error("flow key {0} is not paused")]
    KeyNotPaused(String),
    /// A request that breaks a rule only the state can check (named field, rule).
    #[error("{field}: {rule}")]
    Invalid { field: String, rule: String },
    /// Not from the state machine: the log under it failed, so nothing can be applied.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// What an applied command did, for the caller's reply and the runtime's timers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Created,
    /// The same spec was created before: nothing changed (idempotent create).
    AlreadyExists,
    /// An upsert changed the job's spec.
    Replaced,
    /// Fires added (trigger, backfill) or put back (redrive), by fire time.
    Fires {
        fire_ms: Vec<u64>,
    },
    Done,
    /// The fire was not started: it was missed (policy or catch-up window).
    Missed {
        count: u64,
    },
    /// Finished jobs removed at the end of their retention.
    Expired {
        count: u64,
    },
}

/// One attempt, as kept in a job's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Execution {
    pub fire_ms: u64,
    pub attempt: u32,
    pub node: u64,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub status_code: Option<u16>,
    pub error: Option<ErrorClass>,
    pub response_body: Vec<u8>,
    /// Fires recorded as missed instead of run (attempt 0).
    pub missed: u64,
    /// Something that happened to the job rather than an attempt (attempt 0): an auto-pause.
    #[serde(default)]
    pub note: Option<String>,
}

impl Execution {
    /// A history line for something that happened to the job at `now_ms` rather than an
    /// attempt (attempt 0): missed fires, an auto-pause, a dropped callback.
    fn event(fire_ms: u64, now_ms: u64, missed: u64, note: Option<String>) -> Execution {
        Execution {
            fire_ms,
            attempt: 0,
            node: 0,
            started_ms: now_ms,
            finished_ms: now_ms,
            status_code: None,
            error: None,
            response_body: Vec::new(),
            missed,
            note,
        }
    }

    /// How long the attempt took, send to answer (or to giving up).
    pub fn latency_ms(&self) -> u64 {
        self.finished_ms.saturating_sub(self.started_ms)
    }
}

/// A fire that started and has not ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ActiveFire {
    /// Attempts finished so far.
    pub attempts: u32,
    /// An attempt is running (or was, on a leader that is gone: the next leader re-runs it).
    pub in_flight: bool,
    /// When the next attempt is due (meaningful when not in flight).
    pub due_ms: u64,
    /// The fire deadline counts from here: the due time, or the redrive.
    pub deadline_from_ms: u64,
}

/// A job as the state holds it: what scheduling reads on every job, and the rest behind one
/// pointer. A pending job that never fired (most of a large backlog) has no `life`: it costs
/// its spec's view and these few words. Equal jobs are equal whether an empty life is
/// boxed or absent.
#[derive(Clone, Debug, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[serde(from = "JobForm", into = "JobForm")]
pub struct Job {
    /// In the heap, or in the partition's spec store once one is attached (`spec()` reads it).
    #[rkyv(with = crate::spec::AsSpecArchive)]
    pub spec: SpecCell,
    pub status: Status,
    pub paused: bool,
    pub created_ms: u64,
    /// The next fire not yet started.
    pub next_fire_ms: Option<u64>,
    /// Fires, history, counters and callbacks: made at the first write to any of them
    /// (`life_mut`), read through `life()` (all empty without one). Shared, copied on write:
    /// a snapshot's copy of the jobs takes a reference to each life, not a deep copy (the
    /// shard's pause), and the first change after it copies only the life it changes.
    /// Archived as the box it was (`LifeAsBox`): snapshots read and write the same bytes.
    #[rkyv(with = rkyv::with::Map<LifeAsBox>)]
    life: Option<Arc<JobLife>>,
}

impl PartialEq for Job {
    fn eq(&self, other: &Job) -> bool {
        (&self.spec, self.status, self.paused, self.created_ms, self.next_fire_ms, self.life())
            == (&other.spec, other.status, other.paused, other.created_ms, other.next_fire_ms, other.life())
    }
}

impl Eq for Job {}

/// What a job gains once it fires, fails, pauses itself or finishes.
#[derive(Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JobLife {
    pub active: BTreeMap<u64, ActiveFire>,
    pub history: VecDeque<Execution>,
    pub fires_succeeded: u64,
    pub fires_failed: u64,
    pub fires_missed: u64,
    /// Catch-up fires run in a row under `Misfire::FireAll`.
    catch_up_run: u32,
    /// When the job reached its final status (the dedup window counts from here).
    pub finished_ms: Option<u64>,
    /// Fires in a row that ended failed (cron jobs; for `pause_after_failures`).
    pub failures_in_a_row: u32,
    /// Why the job paused itself, while it is auto-paused.
    pub paused_reason: Option<String>,
    /// Fire time → the callback telling its outcome, until delivered or given up.
    pub callbacks: BTreeMap<u64, PendingCallback>,
    /// While finished: the time its retention counts from (when it finished, or when it was
    /// last found still needed). Its key in the state's expiry order.
    retained_from_ms: Option<u64>,
}

/// The life of a job that has none yet: everything empty.
static NO_LIFE: JobLife = JobLife {
    active: BTreeMap::new(),
    history: VecDeque::new(),
    fires_succeeded: 0,
    fires_failed: 0,
    fires_missed: 0,
    catch_up_run: 0,
    finished_ms: None,
    failures_in_a_row: 0,
    paused_reason: None,
    callbacks: BTreeMap::new(),
    retained_from_ms: None,
};

impl Job {
    /// A job that has not fired yet.
    pub(crate) fn new(spec: SpecCell, status: Status, created_ms: u64, next_fire_ms: Option<u64>) -> Job {
        Job { spec, status, paused: false, created_ms, next_fire_ms, life: None }
    }

    /// The job's spec: borrowed from the heap, or read back from the partition's store.
    pub fn spec(&self) -> Cow<'_, JobSpec> {
        self.spec.get()
    }

    pub fn id(&self) -> &str {
        self.spec.id()
    }

    /// Its fires, history, counters and callbacks (all empty for a job that never fired).
    pub fn life(&self) -> &JobLife {
        self.life.as_deref().unwrap_or(&NO_LIFE)
    }

    fn life_mut(&mut self) -> &mut JobLife {
        life_of(&mut self.life)
    }

    /// Its life to change, if it has one (clearing something makes none).
    fn life_if_any(&mut self) -> Option<&mut JobLife> {
        self.life.as_mut().map(Arc::make_mut)
    }
}

/// A job's life made if it has none, from the field alone (so the spec may stay borrowed).
fn life_of(life: &mut Option<Arc<JobLife>>) -> &mut JobLife {
    Arc::make_mut(life.get_or_insert_with(Arc::default))
}

/// rkyv wrapper: a shared `JobLife` archived exactly as a `Box<JobLife>` (snapshot formats
/// keep their layout), restored unshared.
pub struct LifeAsBox;

impl rkyv::with::ArchiveWith<Arc<JobLife>> for LifeAsBox {
    type Archived = rkyv::boxed::ArchivedBox<rkyv::Archived<JobLife>>;
    type Resolver = rkyv::boxed::BoxResolver;

    fn resolve_with(field: &Arc<JobLife>, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::boxed::ArchivedBox::resolve_from_ref(field.as_ref(), resolver, out);
    }
}

impl<S: rkyv::rancor::Fallible + ?Sized> rkyv::with::SerializeWith<Arc<JobLife>, S> for LifeAsBox
where
    JobLife: rkyv::SerializeUnsized<S, Archived = rkyv::Archived<JobLife>>,
{
    fn serialize_with(field: &Arc<JobLife>, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        rkyv::boxed::ArchivedBox::serialize_from_ref(field.as_ref(), serializer)
    }
}

impl<D: rkyv::rancor::Fallible + ?Sized>
    rkyv::with::DeserializeWith<rkyv::boxed::ArchivedBox<rkyv::Archived<JobLife>>, Arc<JobLife>, D> for LifeAsBox
where
    rkyv::Archived<JobLife>: rkyv::Deserialize<JobLife, D>,
{
    fn deserialize_with(
        field: &rkyv::boxed::ArchivedBox<rkyv::Archived<JobLife>>,
        deserializer: &mut D,
    ) -> Result<Arc<JobLife>, D::Error> {
        rkyv::Deserialize::deserialize(field.get(), deserializer).map(Arc::new)
    }
}

/// A job's JSON form (snapshot format 0, digests): every field at one level, as before the
/// job was split, so the form and the digests did not change with the split.
#[derive(Clone, Serialize, Deserialize)]
struct JobForm {
    spec: SpecCell,
    status: Status,
    created_ms: u64,
    paused: bool,
    next_fire_ms: Option<u64>,
    active: BTreeMap<u64, ActiveFire>,
    history: VecDeque<Execution>,
    fires_succeeded: u64,
    fires_failed: u64,
    fires_missed: u64,
    catch_up_run: u32,
    #[serde(default)]
    finished_ms: Option<u64>,
    #[serde(default)]
    failures_in_a_row: u32,
    #[serde(default)]
    paused_reason: Option<String>,
    #[serde(default)]
    callbacks: BTreeMap<u64, PendingCallback>,
    #[serde(default)]
    retained_from_ms: Option<u64>,
}

impl From<JobForm> for Job {
    fn from(form: JobForm) -> Job {
        let life = JobLife {
            active: form.active,
            history: form.history,
            fires_succeeded: form.fires_succeeded,
            fires_failed: form.fires_failed,
            fires_missed: form.fires_missed,
            catch_up_run: form.catch_up_run,
            finished_ms: form.finished_ms,
            failures_in_a_row: form.failures_in_a_row,
            paused_reason: form.paused_reason,
            callbacks: form.callbacks,
            retained_from_ms: form.retained_from_ms,
        };
        Job {
            spec: form.spec,
            status: form.status,
            paused: form.paused,
            created_ms: form.created_ms,
            next_fire_ms: form.next_fire_ms,
            life: (life != NO_LIFE).then(|| Arc::new(life)),
        }
    }
}

impl From<Job> for JobForm {
    fn from(job: Job) -> JobForm {
        let life = job.life.map(Arc::unwrap_or_clone).unwrap_or_default();
        JobForm {
            spec: job.spec,
            status: job.status,
            created_ms: job.created_ms,
            paused: job.paused,
            next_fire_ms: job.next_fire_ms,
            active: life.active,
            history: life.history,
            fires_succeeded: life.fires_succeeded,
            fires_failed: life.fires_failed,
            fires_missed: life.fires_missed,
            catch_up_run: life.catch_up_run,
            finished_ms: life.finished_ms,
            failures_in_a_row: life.failures_in_a_row,
            paused_reason: life.paused_reason,
            callbacks: life.callbacks,
            retained_from_ms: life.retained_from_ms,
        }
    }
}

/// A fire's outcome waiting to be POSTed to the job's callback URL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
// `then` holds another callback: the archive's bounds are written out (rkyv's recursive form).
#[rkyv(serialize_bounds(__S: rkyv::ser::Writer + rkyv::ser::Allocator, __S::Error: rkyv::rancor::Source))]
#[rkyv(deserialize_bounds(__D::Error: rkyv::rancor::Source))]
#[rkyv(bytecheck(bounds(__C: rkyv::validation::ArchiveContext, __C::Error: rkyv::rancor::Source)))]
pub struct PendingCallback {
    pub url: String,
    /// `on_success` (the fire was delivered) or `on_failure` (it was dead-lettered).
    pub success: bool,
    /// The JSON document POSTed.
    pub body: Vec<u8>,
    pub attempts: u32,
    pub in_flight: bool,
    pub due_ms: u64,
    /// A later outcome of the same fire (it was redriven and ended again) queued while this
    /// callback's attempt was in flight: it goes out once this one ends.
    #[serde(default)]
    #[rkyv(omit_bounds)]
    pub then: Option<Box<PendingCallback>>,
}

/// A fire of a flow key's job that has started and not ended, or that waits to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyFire<'a> {
    pub job: &'a str,
    pub fire_ms: u64,
    /// An attempt has started (one is in flight, or it waits to retry).
    pub started: bool,
}

/// A flow key: the limits its jobs last set, whether it is paused, and its jobs.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct FlowKey {
    pub parallelism: Option<u32>,
    pub rate: Option<u32>,
    pub period_ms: Option<u64>,
    pub ordered: bool,
    pub paused: bool,
    pub jobs: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DeadLetter {
    pub attempts: u32,
    pub reason: String,
    pub moved_ms: u64,
}

/// What the runtime should do next for a job, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Start the fire due at `fire_ms` (attempt 1).
    NewFire { fire_ms: u64 },
    /// Run attempt `attempt` of an active fire.
    Retry { fire_ms: u64, attempt: u32 },
    /// Run attempt `attempt` of the callback for the fire `fire_ms`.
    Callback { fire_ms: u64, attempt: u32 },
}

#[derive(
    Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct State {
    /// Job records in slots, found by id (`table`).
    jobs: JobTable,
    /// Job id → fire time → entry.
    dead_letters: BTreeMap<String, BTreeMap<u64, DeadLetter>>,
    dead_letter_count: usize,
    /// (moved_ms, job, fire) of every dead letter: the oldest is evicted first, in O(log n).
    dead_letter_order: BTreeSet<(u64, String, u64)>,
    /// Job id → jobs that depend on it.
    dependents: BTreeMap<String, BTreeSet<String>>,
    counts: [u64; 6],
    /// Deleted or expired jobs' ids, as digests, with when each finished: the dedup window's
    /// memory, in (finish time, digest) order (24 bytes each, in chunks a store may keep out
    /// of the heap, and an 8-byte index entry each in the heap).
    #[serde(default, rename = "dedup_tombstones")]
    #[rkyv(with = AsTombstoneList)]
    tombstones: Tombstones,
    /// Tombstones as snapshots before compact tombstones held them (read, never written).
    #[serde(default, rename = "tombstones", skip_serializing)]
    #[rkyv(with = rkyv::with::Skip)]
    legacy_tombstones: BTreeMap<String, u64>,
    /// (retained_from_ms, id) of every finished job: who expires next (built on restore).
    #[serde(skip)]
    #[rkyv(with = rkyv::with::Skip)]
    expiry_order: BTreeSet<(u64, String)>,
    /// Jobs removed at the end of their retention, ever.
    #[serde(default)]
    expired_total: u64,
    /// Dead letters evicted (the oldest) because the list was full, ever.
    #[serde(default)]
    dead_letters_evicted_total: u64,
    /// Jobs paused by `pause_after_failures` and not resumed.
    #[serde(default)]
    auto_paused: u64,
    #[serde(default)]
    flow_keys: BTreeMap<String, FlowKey>,
    /// Where specs go once applied (none: they stay in the heap). A replica's own: it is
    /// neither replicated nor part of a snapshot, and a spec reads the same wherever it is.
    #[serde(skip)]
    #[rkyv(with = rkyv::with::Skip)]
    spec_sink: SinkSlot,
}

/// The state's spec store, if attached, and the slots of jobs created since their specs were
/// last stored (`State::store_new_specs`). A clone of the state shares the stored specs (they
/// are read-only) but attaches no store of its own.
#[derive(Default)]
struct SinkSlot {
    sink: Option<Box<dyn SpecSink>>,
    unstored: Vec<u32>,
}

impl Clone for SinkSlot {
    fn clone(&self) -> SinkSlot {
        SinkSlot::default()
    }
}

impl PartialEq for SinkSlot {
    fn eq(&self, _: &SinkSlot) -> bool {
        true
    }
}

impl Eq for SinkSlot {}

impl std::fmt::Debug for SinkSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.sink.is_some() { "SinkSlot(attached)" } else { "SinkSlot(none)" })
    }
}

impl State {
    pub fn new() -> State {
        State::default()
    }

    /// From now on specs live in `sink`: those in the heap move there (a restored state's),
    /// and every spec created or replaced later goes there when applied.
    pub fn attach_spec_store(&mut self, mut sink: Box<dyn SpecSink>) {
        for job in self.jobs.values_mut() {
            job.spec.store_in(&mut *sink);
        }
        self.spec_sink = SinkSlot { sink: Some(sink), unstored: Vec::new() };
    }

    /// Moves the specs of the jobs created since the last call into the attached store, in
    /// one write: a create leaves its spec in the heap (its command's archive) until then.
    /// Local to this replica: where a spec lives changes nothing replicated.
    pub fn store_new_specs(&mut self) {
        let SinkSlot { sink: Some(sink), unstored } = &mut self.spec_sink else { return };
        if unstored.is_empty() {
            return;
        }
        // A slot freed and taken again meanwhile holds the newer job: stored once.
        unstored.sort_unstable();
        unstored.dedup();
        let mut slots = Vec::with_capacity(unstored.len());
        let mut archives = Vec::with_capacity(unstored.len());
        for slot in unstored.drain(..) {
            if let Some(bytes) = self.jobs.at(slot).and_then(|job| job.spec.packed_bytes()) {
                slots.push(slot);
                archives.push(bytes);
            }
        }
        let views = sink.put_many(&archives);
        for (slot, view) in slots.into_iter().zip(views) {
            if let Some(job) = self.jobs.at_mut(slot) {
                job.spec.stored_as(view);
            }
        }
    }

    /// From now on the dedup window's tombstones are kept in chunks `store` makes (those
    /// held so far move there).
    pub fn attach_tombstone_store(&mut self, store: Box<dyn TombstoneStore>) {
        self.tombstones.attach_store(store);
    }

    /// Takes the attached tombstone store away (to attach it to the state that replaces this).
    pub fn detach_tombstone_store(&mut self) -> Option<Box<dyn TombstoneStore>> {
        self.tombstones.detach_store()
    }

    /// Chunks of tombstones kept in the heap because the attached store could not make them.
    pub fn tombstone_chunks_in_heap(&self) -> usize {
        self.tombstones.chunks_in_heap()
    }

    /// Jobs whose spec is in the heap (the store refused it, or none is attached).
    pub fn specs_in_heap(&self) -> usize {
        self.jobs.values().filter(|job| !job.spec.is_stored()).count()
    }

    /// Takes the attached spec store away (to attach it to the state that replaces this one).
    pub fn detach_spec_store(&mut self) -> Option<Box<dyn SpecSink>> {
        self.store_new_specs();
        self.spec_sink.sink.take()
    }

    /// Looks at up to `budget` jobs from slot `cursor` on (`None`: from the first) and moves
    /// their specs out of segments that asked to be repacked. Returns where to go on from
    /// (`None`: the end was reached) and how many moved. Local to this replica: where a spec
    /// lives changes nothing replicated.
    pub fn repack_specs(&mut self, cursor: Option<u32>, budget: usize) -> (Option<u32>, usize) {
        let Some(sink) = self.spec_sink.sink.as_mut() else { return (None, 0) };
        if cursor.is_none() && !sink.repack_wanted() {
            return (None, 0);
        }
        let (mut moved, mut seen) = (0, 0);
        let mut last = None;
        for (slot, job) in self.jobs.from_slot_mut(cursor.unwrap_or(0)).take(budget) {
            if job.spec.repack_into(&mut **sink) {
                moved += 1;
            }
            seen += 1;
            last = Some(slot);
        }
        // Fewer than the budget: the slots ran out, the next pass starts over.
        let next = if seen < budget { None } else { last.map(|slot| slot + 1) };
        (next, moved)
    }

    /// Moves the spec of `id` into the attached store, if any.
    fn keep_spec(&mut self, id: &str) {
        if let (Some(sink), Some(job)) = (self.spec_sink.sink.as_mut(), self.jobs.get_mut(id)) {
            job.spec.store_in(&mut **sink);
        }
    }

    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    /// Every job, in slot order (the same on every replica; not by id).
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// Every job with its slot in the job table, in slot order.
    pub fn job_slots(&self) -> impl Iterator<Item = (u32, &Job)> {
        self.jobs.iter()
    }

    /// The slot of job `id` in the job table: where it stays until it leaves the state (then
    /// the slot may hold another job).
    pub fn slot_of(&self, id: &str) -> Option<u32> {
        self.jobs.slot_of(id)
    }

    /// The job in `slot`, if one is there.
    pub fn job_at(&self, slot: u32) -> Option<&Job> {
        self.jobs.at(slot)
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// Every dead-lettered fire: job id, fire time, entry.
    /// Dead letters, oldest (first moved) first.
    pub fn dead_letters(&self) -> impl Iterator<Item = (&str, u64, &DeadLetter)> {
        self.dead_letter_order.iter().filter_map(|(_, id, fire_ms)| {
            let letter = self.dead_letters.get(id)?.get(fire_ms)?;
            Some((id.as_str(), *fire_ms, letter))
        })
    }

    fn add_dead_letter(&mut self, id: &str, fire_ms: u64, letter: DeadLetter) {
        self.remove_dead_letter(id, fire_ms);
        self.dead_letter_order.insert((letter.moved_ms, id.to_string(), fire_ms));
        self.dead_letters.entry(id.to_string()).or_default().insert(fire_ms, letter);
        self.dead_letter_count += 1;
        // Bounded: one insert adds at most one entry over the limit.
        while self.dead_letter_count > DEAD_LETTERS_MAX {
            let Some((_, oldest_id, oldest_fire)) = self.dead_letter_order.first().cloned() else { break };
            self.remove_dead_letter(&oldest_id, oldest_fire);
            // Counted (a metric and a log line read it): never a silent drop.
            self.dead_letters_evicted_total += 1;
        }
    }

    fn remove_dead_letter(&mut self, id: &str, fire_ms: u64) -> Option<DeadLetter> {
        let fires = self.dead_letters.get_mut(id)?;
        let removed = fires.remove(&fire_ms)?;
        if fires.is_empty() {
            self.dead_letters.remove(id);
        }
        self.dead_letter_order.remove(&(removed.moved_ms, id.to_string(), fire_ms));
        self.dead_letter_count -= 1;
        Some(removed)
    }

    fn purge_dead_letters_of(&mut self, id: &str) {
        if let Some(fires) = self.dead_letters.remove(id) {
            self.dead_letter_count -= fires.len();
            for (fire_ms, letter) in fires {
                self.dead_letter_order.remove(&(letter.moved_ms, id.to_string(), fire_ms));
            }
        }
    }

    /// Jobs per status (for /health), kept up to date on every change.
    pub fn count(&self, status: Status) -> u64 {
        self.counts[status as usize]
    }

    /// Jobs paused by their `pause_after_failures` and not resumed since.
    pub fn auto_paused(&self) -> u64 {
        self.auto_paused
    }

    /// Ids of deleted or expired jobs still remembered for the dedup window.
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// Jobs removed at the end of their retention, ever (replicated: the same on every replica).
    pub fn expired_total(&self) -> u64 {
        self.expired_total
    }

    /// Dead letters evicted because the list held `DEAD_LETTERS_MAX`, ever.
    pub fn dead_letters_evicted_total(&self) -> u64 {
        self.dead_letters_evicted_total
    }

    /// When the job that finished first (of those not yet removed) finished, or was last
    /// found still needed: the leader proposes `Expire` once retention has passed since.
    pub fn first_retained_ms(&self) -> Option<u64> {
        self.expiry_order.first().map(|(from_ms, _)| *from_ms)
    }

    /// When a job with this id finished, if it was deleted or expired and is remembered.
    fn tombstone_of(&self, id: &str) -> Option<u64> {
        // No digest to compute (a SHA-256) while nothing is remembered.
        if self.tombstones.is_empty() {
            return None;
        }
        self.tombstones.finished_ms_of(id_digest(id))
    }

    /// Tombstones are kept in (finish time, digest) order whatever order they come in, so the
    /// sequence is a function of which ids are remembered: replicas that restored snapshots
    /// at different points (of this build or an earlier one) hold the same one.
    fn add_tombstone(&mut self, id: &str, finished_ms: u64) {
        self.tombstones.push(Tombstone::new(id_digest(id), finished_ms));
        // Bounded: one push adds at most one over the limit.
        while self.tombstones.len() > TOMBSTONES_MAX {
            self.tombstones.pop_front();
        }
    }

    fn forget_tombstone(&mut self, id: &str) {
        if !self.tombstones.is_empty() {
            self.tombstones.remove(id_digest(id));
        }
    }

    /// Forgets tombstones older than the window, oldest first (each is looked at once:
    /// bounded overall).
    fn prune_tombstones(&mut self, now_ms: u64, window_ms: u64) {
        while let Some(oldest) = self.tombstones.front() {
            if oldest.finished_ms().saturating_add(window_ms) > now_ms {
                break;
            }
            self.tombstones.pop_front();
        }
    }

    /// Keeps the job's place in the expiry order in step with its status: a finished job is
    /// there under the time it finished; a live one is not.
    fn index_retention(&mut self, id: &str) {
        let Some(job) = self.jobs.get_mut(id) else { return };
        if let Some(from_ms) = job.life_if_any().and_then(|life| life.retained_from_ms.take()) {
            self.expiry_order.remove(&(from_ms, id.to_string()));
        }
        if job.status.is_final() {
            let from_ms = job.life().finished_ms.unwrap_or(0);
            job.life_mut().retained_from_ms = Some(from_ms);
            self.expiry_order.insert((from_ms, id.to_string()));
        }
    }

    /// Removes finished jobs whose retention has passed (see `Command::Expire`).
    fn expire(&mut self, now_ms: u64, retention_ms: u64, dedup_window_ms: u64, max: u32) -> Applied {
        let mut count = 0;
        for _ in 0..max.min(EXPIRE_PER_COMMAND_MAX) {
            let Some((from_ms, id)) = self.expiry_order.first().cloned() else { break };
            if from_ms.saturating_add(retention_ms) > now_ms {
                break;
            }
            self.expiry_order.pop_first();
            let Some(job) = self.jobs.get_mut(id.as_str()) else { continue };
            job.life_mut().retained_from_ms = None;
            // Jobs waiting on it read its status; its callbacks still go out: it stays, and
            // is looked at again later (an order key in the future keeps this loop finite).
            if self.dependents.contains_key(&id) || !job.life().callbacks.is_empty() {
                // Retention counts from this key: it is looked at again `EXPIRY_RECHECK_MS`
                // from now (a key that far ahead of now stops this loop from finding it again).
                let again_ms = now_ms.saturating_add(EXPIRY_RECHECK_MS).saturating_sub(retention_ms);
                job.life_mut().retained_from_ms = Some(again_ms);
                self.expiry_order.insert((again_ms, id));
                continue;
            }
            let finished_ms = job.life().finished_ms.unwrap_or(from_ms);
            self.detach(&id);
            self.purge_dead_letters_of(&id);
            if finished_ms.saturating_add(dedup_window_ms) > now_ms {
                self.add_tombstone(&id, finished_ms);
            }
            count += 1;
        }
        self.expired_total += count;
        Applied::Expired { count }
    }

    /// Builds what snapshots leave out (the job table's index, the expiry order; tombstones
    /// are indexed as they are read) from what they hold; reads tombstones in the form
    /// snapshots had before compact ones.
    fn rebuild_indexes(&mut self) -> Result<(), String> {
        self.jobs.rebuild_index()?;
        let legacy = std::mem::take(&mut self.legacy_tombstones);
        let mut legacy: Vec<Tombstone> =
            legacy.into_iter().map(|(id, finished_ms)| Tombstone::new(id_digest(&id), finished_ms)).collect();
        legacy.sort_unstable();
        for tombstone in legacy {
            self.tombstones.push(tombstone);
        }
        for job in self.jobs.values_mut().filter(|job| job.status.is_final()) {
            let life = life_of(&mut job.life);
            let from_ms = *life.retained_from_ms.get_or_insert(life.finished_ms.unwrap_or(0));
            self.expiry_order.insert((from_ms, job.spec.id().to_string()));
        }
        Ok(())
    }

    /// Takes a job out with its own dependency edges and its count (jobs that depend on it
    /// keep pointing at its id).
    fn detach(&mut self, id: &str) -> Option<Job> {
        let job = self.jobs.remove(id)?;
        if let Some(from_ms) = job.life().retained_from_ms {
            self.expiry_order.remove(&(from_ms, id.to_string()));
        }
        for dependency in job.spec.depends_on() {
            if let Some(set) = self.dependents.get_mut(dependency) {
                set.remove(id);
                if set.is_empty() {
                    self.dependents.remove(dependency);
                }
            }
        }
        self.counts[job.status as usize] -= 1;
        if job.life().paused_reason.is_some() {
            self.auto_paused -= 1;
        }
        self.leave_flow_key(id, job.spec.flow_key());
        Some(job)
    }

    /// Adds the job to its flow key, and the limits it gives to the key.
    fn join_flow_key(&mut self, spec: &JobSpec) {
        let Some(flow) = &spec.flow else { return };
        let key = self.flow_keys.entry(flow.key.clone()).or_default();
        key.jobs.insert(spec.id.clone());
        if flow.parallelism.is_some() {
            key.parallelism = flow.parallelism;
        }
        if flow.rate.is_some() {
            (key.rate, key.period_ms) = (flow.rate, flow.period_ms);
        }
        if let Some(ordered) = flow.ordered {
            key.ordered = ordered;
        }
    }

    fn leave_flow_key(&mut self, id: &str, key_name: Option<&str>) {
        let Some(key_name) = key_name else { return };
        if let Some(key) = self.flow_keys.get_mut(key_name) {
            key.jobs.remove(id);
            if key.jobs.is_empty() && !key.paused {
                self.flow_keys.remove(key_name);
            }
        }
    }

    /// The flow key named `key`, if a job has it or it is paused.
    pub fn flow_key(&self, key: &str) -> Option<&FlowKey> {
        self.flow_keys.get(key)
    }

    pub fn flow_keys(&self) -> impl Iterator<Item = (&String, &FlowKey)> {
        self.flow_keys.iter()
    }

    /// The flow key of the job `id`, with its state.
    pub fn flow_key_of(&self, id: &str) -> Option<(&str, &FlowKey)> {
        self.flow_key_of_job(self.jobs.get(id)?)
    }

    fn flow_key_of_job(&self, job: &Job) -> Option<(&str, &FlowKey)> {
        let key = job.spec.flow_key()?;
        self.flow_keys.get_key_value(key).map(|(name, key)| (name.as_str(), key))
    }

    /// Attempts of the key's jobs in flight (started and not finished).
    pub fn flow_in_flight(&self, key: &FlowKey) -> usize {
        let jobs = key.jobs.iter().filter_map(|id| self.jobs.get(id.as_str()));
        jobs.map(|job| job.life().active.values().filter(|fire| fire.in_flight).count()).sum()
    }

    /// Active fires of the key's jobs: started and not ended (in flight or waiting to retry),
    /// or added (trigger, backfill, redrive) and waiting for their first attempt.
    pub fn flow_active<'a>(&'a self, key: &'a FlowKey) -> Vec<KeyFire<'a>> {
        let jobs =
            key.jobs.iter().filter_map(|id| self.jobs.get(id.as_str())).filter(|job| !job.life().active.is_empty());
        jobs.flat_map(|job| {
            job.life().active.iter().map(|(fire_ms, fire)| KeyFire {
                job: job.spec.id(),
                fire_ms: *fire_ms,
                started: fire.in_flight || fire.attempts > 0,
            })
        })
        .collect()
    }

    /// Fires of the key's jobs due by `now_ms` and not started: waiting for the key's
    /// limits, its pause, or the dispatcher.
    pub fn flow_backlog(&self, key: &FlowKey, now_ms: u64) -> u64 {
        let jobs = key.jobs.iter().filter_map(|id| self.jobs.get(id.as_str())).filter(|job| !job.status.is_final());
        jobs.map(|job| {
            let retries =
                job.life().active.values().filter(|fire| !fire.in_flight && fire.due_ms <= now_ms).count() as u64;
            retries + u64::from(job.next_fire_ms.is_some_and(|next| next <= now_ms))
        })
        .sum()
    }

    /// The key's job whose fire or retry is due first (ordered delivery runs that one
    /// next): (due time, job id).
    pub fn flow_first_due<'a>(&'a self, key: &'a FlowKey) -> Option<(u64, &'a str)> {
        let due = key.jobs.iter().filter_map(|id| Some((self.next_fire_due(self.jobs.get(id)?)?.0, id.as_str())));
        due.min()
    }

    /// Pending callbacks whose attempt a leader started and never finished.
    pub fn callbacks_in_flight(&self) -> Vec<(String, u64, u32)> {
        let mut out = Vec::new();
        for job in self.jobs.values() {
            for (&fire_ms, callback) in job.life().callbacks.iter().filter(|(_, c)| c.in_flight) {
                out.push((job.spec.id().to_string(), fire_ms, callback.attempts + 1));
            }
        }
        out
    }

    /// Applies one committed command.
    pub fn apply(&mut self, command: Command) -> Result<Applied, ApplyError> {
        match command {
            Command::Create { spec, now_ms, dedup_window_ms } => self.create(spec, now_ms, dedup_window_ms),
            Command::Expire { now_ms, retention_ms, dedup_window_ms, max } => {
                Ok(self.expire(now_ms, retention_ms, dedup_window_ms, max))
            }
            Command::Upsert { spec, now_ms } => self.upsert(spec, now_ms),
            Command::Cancel { id, now_ms } => {
                let job = self.job_mut(&id)?;
                if job.status.is_final() {
                    return Err(invalid(&id, job.status, "cancel"));
                }
                // Callbacks of fires that already ended still go out.
                if let Some(life) = job.life_if_any() {
                    life.active.clear();
                }
                job.next_fire_ms = None;
                let was_auto_paused = job.life_if_any().and_then(|life| life.paused_reason.take()).is_some();
                self.auto_paused -= u64::from(was_auto_paused);
                self.set_status(&id, Status::Cancelled, now_ms);
                Ok(Applied::Done)
            }
            Command::Delete { id, now_ms } => {
                self.job_mut(&id)?;
                let dependents = self.dependents_of(&id);
                if !dependents.is_empty() {
                    return Err(ApplyError::Required { id, dependents });
                }
                let job = self.detach(&id).expect("checked");
                self.purge_dead_letters_of(&id);
                // Commands logged before the dedup window carry no time: nothing to remember.
                if now_ms > 0 {
                    self.add_tombstone(&id, job.life().finished_ms.unwrap_or(now_ms));
                }
                Ok(Applied::Done)
            }
            Command::Trigger { id, now_ms } => self.trigger(&id, now_ms),
            Command::PauseKey { key } => {
                if !self.flow_keys.contains_key(&key) && self.flow_keys.len() >= FLOW_KEYS_MAX {
                    let rule = format!("at most {FLOW_KEYS_MAX} flow keys are held");
                    return Err(ApplyError::Invalid { field: "key".into(), rule });
                }
                self.flow_keys.entry(key).or_default().paused = true;
                Ok(Applied::Done)
            }
            Command::ResumeKey { key, now_ms } => {
                let Some(flow_key) = self.flow_keys.get_mut(&key).filter(|k| k.paused) else {
                    return Err(ApplyError::KeyNotPaused(key));
                };
                flow_key.paused = false;
                let jobs: Vec<String> = flow_key.jobs.iter().cloned().collect();
                if jobs.is_empty() {
                    self.flow_keys.remove(&key);
                }
                // Fires missed while the key was paused follow each job's misfire policy.
                for id in jobs {
                    if let Some(job) =
                        self.jobs.get_mut(id.as_str()).filter(|job| !job.paused && !job.status.is_final())
                    {
                        catch_up(job, now_ms);
                    }
                }
                Ok(Applied::Done)
            }
            Command::CallbackStarted { id, fire_ms, attempt, .. } => {
                let job = self.job_mut(&id)?;
                let stale = || ApplyError::StaleAttempt { id: id.clone(), fire_ms, attempt };
                let callback = job.life_if_any().and_then(|life| life.callbacks.get_mut(&fire_ms)).ok_or_else(stale)?;
                if attempt != callback.attempts + 1 || callback.in_flight {
                    return Err(stale());
                }
                callback.in_flight = true;
                Ok(Applied::Done)
            }
            Command::CallbackFinished { id, fire_ms, attempt, started_ms, finished_ms, outcome, retry_at_ms } => {
                let record = AttemptRecord { fire_ms, attempt, node: 0, started_ms, finished_ms, outcome, retry_at_ms };
                self.callback_finished(&id, record)
            }
            Command::Backfill { id, from_ms, to_ms, now_ms } => self.backfill(&id, from_ms, to_ms, now_ms),
            Command::RedriveJob { id, now_ms } => {
                let job = self.job_mut(&id)?;
                if job.status == Status::Cancelled {
                    return Err(invalid(&id, job.status, "redrive"));
                }
                let fires: Vec<u64> =
                    self.dead_letters.get(&id).map(|fires| fires.keys().copied().collect()).unwrap_or_default();
                for fire_ms in &fires {
                    self.redrive(&id, *fire_ms, now_ms)?;
                }
                Ok(Applied::Fires { fire_ms: fires })
            }
            Command::Pause { id } => {
                let job = self.job_mut(&id)?;
                if job.status.is_final() {
                    return Err(invalid(&id, job.status, "pause"));
                }
                job.paused = true;
                Ok(Applied::Done)
            }
            Command::Resume { id, now_ms } => {
                let job = self.job_mut(&id)?;
                if job.status.is_final() || !job.paused {
                    return Err(invalid(&id, job.status, "resume"));
                }
                job.paused = false;
                if let Some(life) = job.life_if_any() {
                    life.failures_in_a_row = 0;
                }
                let was_auto_paused = job.life_if_any().and_then(|life| life.paused_reason.take()).is_some();
                catch_up(job, now_ms);
                self.auto_paused -= u64::from(was_auto_paused);
                Ok(Applied::Done)
            }
            Command::FireStarted { id, fire_ms, attempt, node, now_ms } => {
                let _ = node; // recorded with the attempt's outcome, not at its start
                self.fire_started(&id, fire_ms, attempt, now_ms)
            }
            Command::AttemptFinished { id, fire_ms, attempt, node, started_ms, finished_ms, outcome, retry_at_ms } => {
                let finished = AttemptRecord { fire_ms, attempt, node, started_ms, finished_ms, outcome, retry_at_ms };
                self.attempt_finished(&id, finished)
            }
            Command::Redrive { id, fire_ms, now_ms } => {
                let job = self.job_mut(&id)?;
                if job.status == Status::Cancelled {
                    return Err(invalid(&id, job.status, "redrive"));
                }
                self.redrive(&id, fire_ms, now_ms)?;
                Ok(Applied::Done)
            }
            Command::Purge { id } => {
                match id {
                    Some(id) if !self.jobs.contains_key(id.as_str()) && !self.dead_letters.contains_key(&id) => {
                        return Err(ApplyError::NotFound(id));
                    }
                    Some(id) => self.purge_dead_letters_of(&id),
                    None => {
                        self.dead_letters.clear();
                        self.dead_letter_order.clear();
                        self.dead_letter_count = 0;
                    }
                }
                Ok(Applied::Done)
            }
        }
    }

    fn job_mut(&mut self, id: &str) -> Result<&mut Job, ApplyError> {
        self.jobs.get_mut(id).ok_or_else(|| ApplyError::NotFound(id.to_string()))
    }

    /// Sets a job's status at `now_ms` (when a final one counts from, for the dedup window).
    fn set_status(&mut self, id: &str, status: Status, now_ms: u64) {
        let job = self.jobs.get_mut(id).expect("caller checked");
        self.counts[job.status as usize] -= 1;
        self.counts[status as usize] += 1;
        if status.is_final() != job.status.is_final() || job.life().finished_ms.is_none() {
            let finished_ms = status.is_final().then_some(now_ms);
            if finished_ms != job.life().finished_ms {
                job.life_mut().finished_ms = finished_ms;
            }
        }
        // A finished job is no longer paused by anything (a resume could not clear it).
        if status.is_final() && job.life_if_any().and_then(|life| life.paused_reason.take()).is_some() {
            self.auto_paused -= 1;
        }
        job.status = status;
        self.index_retention(id);
    }

    /// Puts a dead-lettered fire back with a full new set of attempts, its deadline counted
    /// from now.
    fn redrive(&mut self, id: &str, fire_ms: u64, now_ms: u64) -> Result<(), ApplyError> {
        if let Some(job) = self.jobs.get(id).filter(|job| job.life().active.contains_key(&fire_ms)) {
            // Backfilled or triggered again meanwhile: it runs already.
            return Err(invalid(id, job.status, "redrive (that fire is active again)"));
        }
        if self.remove_dead_letter(id, fire_ms).is_none() {
            return Err(ApplyError::NotDeadLettered { id: id.to_string(), fire_ms });
        }
        let job = self.jobs.get_mut(id).ok_or_else(|| ApplyError::NotFound(id.to_string()))?;
        let fire = ActiveFire { attempts: 0, in_flight: false, due_ms: now_ms, deadline_from_ms: now_ms };
        job.life_mut().active.insert(fire_ms, fire);
        self.set_status(id, Status::InProgress, now_ms);
        Ok(())
    }

    /// Creates a job from its archived spec, read in place: a new job's spec goes to the
    /// store as these bytes (decoded only to compare with a job that has its id already).
    fn create(&mut self, spec: PackedSpec, now_ms: u64, dedup_window_ms: Option<u64>) -> Result<Applied, ApplyError> {
        let duplicate = |finished_ms: u64, window_ms: u64| ApplyError::Duplicate {
            id: spec.id().to_string(),
            finished_ms,
            until_ms: finished_ms.saturating_add(window_ms),
        };
        let mut remembered = Remembered::Maybe;
        match (self.jobs.get(spec.id()), dedup_window_ms) {
            // A finished job's id is held for the window, then free again.
            (Some(existing), Some(window_ms))
                if existing.status.is_final() && existing.life().finished_ms.is_some() =>
            {
                let finished_ms = existing.life().finished_ms.expect("checked");
                if now_ms < finished_ms.saturating_add(window_ms) {
                    return Err(duplicate(finished_ms, window_ms));
                }
            }
            (Some(existing), _) => {
                return if existing.spec.get().same_job(&spec.to_spec()) {
                    Ok(Applied::AlreadyExists)
                } else {
                    Err(ApplyError::Conflict(spec.id().to_string()))
                };
            }
            (None, Some(window_ms)) => match self.tombstone_of(spec.id()) {
                Some(finished_ms) if now_ms < finished_ms.saturating_add(window_ms) => {
                    return Err(duplicate(finished_ms, window_ms));
                }
                Some(_) => {}
                None => remembered = Remembered::No,
            },
            (None, None) => {}
        }
        let created = self.insert_new(SpecCell::Packed(spec), now_ms, remembered)?;
        // Only an applied create prunes: a refused command changes nothing.
        if let Some(window_ms) = dedup_window_ms {
            self.prune_tombstones(now_ms, window_ms);
        }
        Ok(created)
    }

    /// Creates the job, or replaces the spec of the one with its id (a finished one is
    /// replaced whole; no dedup window: an upsert says what it means).
    fn upsert(&mut self, packed: PackedSpec, now_ms: u64) -> Result<Applied, ApplyError> {
        let Some(existing) = self.jobs.get(packed.id()) else {
            return self.insert_new(SpecCell::Packed(packed), now_ms, Remembered::Maybe);
        };
        let spec = packed.to_spec();
        // The same spec again changes nothing, finished or not (a repeated PUT never re-runs it).
        if existing.spec.get().same_job(&spec) {
            return Ok(Applied::AlreadyExists);
        }
        self.check_dependencies(&spec.id, spec.depends_on.iter().map(String::as_str))?;
        if existing.status.is_final() {
            self.insert_new(SpecCell::Packed(packed), now_ms, Remembered::Maybe)?;
            return Ok(Applied::Replaced);
        }
        let old_spec = existing.spec.get().into_owned();
        let id = spec.id.clone();
        let key_of = |spec: &JobSpec| spec.flow.as_ref().map(|flow| flow.key.clone());
        if key_of(&old_spec) != key_of(&spec) {
            self.leave_flow_key(&id, old_spec.flow.as_ref().map(|flow| flow.key.as_str()));
        }
        self.join_flow_key(&spec);
        let taken_in_dead_letters = self.dead_letters.get(&id).cloned().unwrap_or_default();
        let job = self.jobs.get_mut(id.as_str()).expect("checked");
        let old_dependencies = old_spec.depends_on;
        let started_at = |at_ms: u64| matches!(old_spec.schedule, Schedule::Once { at_ms: old } if old == at_ms && job.next_fire_ms.is_none());
        job.next_fire_ms = match (&spec.schedule, first_fire(&spec, now_ms)) {
            // A one-time fire that already ran (or runs, or was dead-lettered) is not run again.
            (Schedule::Once { .. }, Some(at_ms))
                if started_at(at_ms)
                    || job.life().active.contains_key(&at_ms)
                    || taken_in_dead_letters.contains_key(&at_ms)
                    || job.life().history.iter().any(|e| e.fire_ms == at_ms) =>
            {
                None
            }
            // A cron fire of the old cron schedule that is due and not started yet is kept
            // (within the new start and end): it starts under the new spec, its misfire policy
            // applying, rather than being dropped.
            (Schedule::Cron(cron), first) => match (&old_spec.schedule, job.next_fire_ms) {
                (Schedule::Cron(_), Some(old))
                    if old <= now_ms
                        && cron.start_ms.is_none_or(|start| old >= start)
                        && cron.end_ms.is_none_or(|end| old <= end) =>
                {
                    Some(old)
                }
                _ => first,
            },
            (_, first) => first,
        };
        let new_dependencies = spec.depends_on.clone();
        job.spec = SpecCell::Packed(packed);
        if let Some(life) = job.life_if_any() {
            life.catch_up_run = 0;
        }
        let status = if !job.life().active.is_empty() {
            Status::InProgress
        } else if job.next_fire_ms.is_some() {
            Status::Pending
        } else {
            Status::Completed
        };
        for dependency in old_dependencies {
            if let Some(set) = self.dependents.get_mut(&dependency) {
                set.remove(&id);
                if set.is_empty() {
                    self.dependents.remove(&dependency);
                }
            }
        }
        for dependency in new_dependencies {
            self.dependents.entry(dependency).or_default().insert(id.clone());
        }
        self.set_status(&id, status, now_ms);
        self.keep_spec(&id);
        Ok(Applied::Replaced)
    }

    /// Every dependency of job `id` exists, and none depends (directly or not) on it.
    fn check_dependencies<'a>(
        &self,
        id: &str,
        dependencies: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ApplyError> {
        for dependency in dependencies {
            if !self.jobs.contains_key(dependency) {
                return Err(ApplyError::UnknownDependency(dependency.to_string()));
            }
            if self.reaches(dependency, id) {
                return Err(ApplyError::Cycle(dependency.to_string()));
            }
        }
        Ok(())
    }

    /// An extra fire of the job now, at a fire time no other fire of it has.
    fn trigger(&mut self, id: &str, now_ms: u64) -> Result<Applied, ApplyError> {
        let taken_in_dead_letters = self.dead_letters.get(id).cloned().unwrap_or_default();
        let job = self.job_mut(id)?;
        if job.status == Status::Cancelled || job.paused {
            let action = if job.paused { "trigger (resume it first)" } else { "trigger" };
            return Err(invalid(id, job.status, action));
        }
        let taken = |fire_ms: u64| {
            job.life().active.contains_key(&fire_ms)
                || job.next_fire_ms == Some(fire_ms)
                || taken_in_dead_letters.contains_key(&fire_ms)
                || job.life().history.iter().any(|e| e.fire_ms == fire_ms)
        };
        let Some(fire_ms) = (now_ms..now_ms + TRIGGER_PROBES_MAX).find(|at| !taken(*at)) else {
            return Err(invalid(id, job.status, "trigger (no free fire time this second)"));
        };
        let fire = ActiveFire { attempts: 0, in_flight: false, due_ms: now_ms, deadline_from_ms: now_ms };
        job.life_mut().active.insert(fire_ms, fire);
        self.set_status(id, Status::InProgress, now_ms);
        Ok(Applied::Fires { fire_ms: vec![fire_ms] })
    }

    /// A fire for each occurrence of the job's cron schedule in `[from_ms, to_ms]` (its start
    /// and end do not limit a backfill), run now, oldest first; occurrences with a fire
    /// already active are left out.
    fn backfill(&mut self, id: &str, from_ms: u64, to_ms: u64, now_ms: u64) -> Result<Applied, ApplyError> {
        let dead_lettered: BTreeSet<u64> =
            self.dead_letters.get(id).map(|fires| fires.keys().copied().collect()).unwrap_or_default();
        let job = self.job_mut(id)?;
        if job.status == Status::Cancelled || job.paused {
            let action = if job.paused { "backfill (resume it first)" } else { "backfill" };
            return Err(invalid(id, job.status, action));
        }
        let rule = |field: &str, rule: &str| ApplyError::Invalid { field: field.into(), rule: rule.into() };
        let Some((schedule, _)) = schedule_of(&job.spec.get()) else {
            return Err(rule("id", "only a cron job has a schedule to backfill"));
        };
        if from_ms > to_ms {
            return Err(rule("from", "must not be after to"));
        }
        if to_ms > now_ms {
            return Err(rule("to", "must not be in the future (a backfill is of fires already due)"));
        }
        let mut occurrences = Vec::new();
        let mut at = from_ms.checked_sub(1);
        // Bounded by BACKFILL_FIRES_MAX + 1.
        while let Some(next) = at.and_then(|after| schedule.next_after_ms(after)).filter(|next| *next <= to_ms) {
            if occurrences.len() == BACKFILL_FIRES_MAX {
                return Err(rule("to", &format!("the range holds more than {BACKFILL_FIRES_MAX} fires; split it")));
            }
            occurrences.push(next);
            at = Some(next);
        }
        // Occurrences from the next scheduled fire on are the schedule's own (an overdue one
        // starts by its misfire policy): a backfill covers those the schedule has passed.
        let scheduled_from = job.next_fire_ms.unwrap_or(u64::MAX);
        // A dead-lettered occurrence is redriven, not backfilled.
        occurrences.retain(|fire_ms| {
            !job.life().active.contains_key(fire_ms) && !dead_lettered.contains(fire_ms) && *fire_ms < scheduled_from
        });
        for fire_ms in &occurrences {
            let fire = ActiveFire { attempts: 0, in_flight: false, due_ms: now_ms, deadline_from_ms: now_ms };
            job.life_mut().active.insert(*fire_ms, fire);
        }
        if !occurrences.is_empty() {
            self.set_status(id, Status::InProgress, now_ms);
        }
        Ok(Applied::Fires { fire_ms: occurrences })
    }

    /// Adds a new job (an old one with its id, finished, is replaced).
    fn insert_new(&mut self, spec: SpecCell, now_ms: u64, remembered: Remembered) -> Result<Applied, ApplyError> {
        if self.jobs.len() >= table::SLOTS_MAX {
            return Err(ApplyError::Invalid { field: "id".into(), rule: table::TableFull.to_string() });
        }
        self.check_dependencies(spec.id(), spec.depends_on())?;
        // A one-time job's fire is read in place; a cron job's spec is decoded to compute it.
        let next_fire_ms = spec.once_at_ms().or_else(|| first_fire(&spec.get(), now_ms));
        let status = if next_fire_ms.is_some() { Status::Pending } else { Status::Completed };
        let id = spec.id().to_string();
        // A finished job with this id is replaced whole (its dead letters stay: they name
        // past fires of this id, and so do its callbacks still waiting, which go on).
        let callbacks = self
            .detach(&id)
            .and_then(|old| old.life)
            .map(|life| Arc::try_unwrap(life).map_or_else(|shared| shared.callbacks.clone(), |life| life.callbacks))
            .unwrap_or_default();
        if remembered == Remembered::Maybe {
            self.forget_tombstone(&id);
        }
        let mut job = Job::new(spec, status, now_ms, next_fire_ms);
        let finished_ms = (status == Status::Completed).then_some(now_ms);
        if finished_ms.is_some() || !callbacks.is_empty() {
            job.life = Some(Arc::new(JobLife { finished_ms, callbacks, ..JobLife::default() }));
        }
        if job.spec.flow_key().is_some() {
            self.join_flow_key(&job.spec.get());
        }
        self.counts[status as usize] += 1;
        for dependency in job.spec.depends_on() {
            self.dependents.entry(dependency.to_string()).or_default().insert(id.clone());
        }
        // With a store attached, the spec goes there with the others of this turn's creates
        // (`store_new_specs`); without one it stays in the heap for good.
        let deferred = self.spec_sink.sink.is_some();
        if !deferred {
            job.spec.keep_in_heap();
        }
        // Only a job with a life (finished, or callbacks waiting) has a place in the expiry
        // order: a new pending job is not looked up again for it.
        let has_life = job.life.is_some();
        let Ok(slot) = self.jobs.insert(job) else {
            unreachable!("room was checked above, and the job it replaced (if any) was detached");
        };
        if deferred {
            self.spec_sink.unstored.push(slot);
        }
        if has_life {
            self.index_retention(&id);
        }
        Ok(Applied::Created)
    }

    /// True if `from` depends, directly or not, on `target` (bounded by the job count).
    fn reaches(&self, from: &str, target: &str) -> bool {
        let mut stack = vec![from.to_string()];
        let mut seen = std::collections::BTreeSet::new();
        while let Some(id) = stack.pop() {
            if id == target {
                return true;
            }
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(job) = self.jobs.get(id.as_str()) {
                stack.extend(job.spec.depends_on().into_iter().map(String::from));
            }
        }
        false
    }

    fn dependencies_done(&self, job: &Job) -> bool {
        job.spec.depends_on().into_iter().all(|id| self.jobs.get(id).is_some_and(|d| d.status == Status::Completed))
    }

    /// Whether `FireStarted { id, fire_ms, attempt, now_ms }` applied to this state would
    /// start that attempt (`fire_started` answering `Done`), answered without changing
    /// anything. Conservative: a first fire of a cron job (the misfire policy may move it)
    /// and a job with dependencies answer false, whatever `fire_started` would do. A leader
    /// sends an attempt before its start is committed only on a true answer, and only when
    /// no other command for the job is ahead of the start in the log (the runtime's part).
    pub fn starts_as_proposed(&self, id: &str, fire_ms: u64, attempt: u32, now_ms: u64) -> bool {
        let Some(job) = self.jobs.get(id) else { return false };
        let key_paused = self.flow_key_of(id).is_some_and(|(_, key)| key.paused);
        if job.status.is_final() || job.paused || key_paused || !job.spec.depends_on().is_empty() {
            return false;
        }
        if let Some(fire) = job.life().active.get(&fire_ms) {
            return attempt == fire.attempts + 1 && !fire.in_flight;
        }
        job.spec.is_once()
            && job.next_fire_ms == Some(fire_ms)
            && attempt == 1
            && now_ms.saturating_sub(fire_ms) <= CATCH_UP_WINDOW_MS
    }

    fn fire_started(&mut self, id: &str, fire_ms: u64, attempt: u32, now_ms: u64) -> Result<Applied, ApplyError> {
        let ready = {
            let job = self.jobs.get(id).ok_or_else(|| ApplyError::NotFound(id.to_string()))?;
            self.dependencies_done(job)
        };
        let key_paused = self.flow_key_of(id).is_some_and(|(_, key)| key.paused);
        let job = self.jobs.get_mut(id).expect("checked");
        if job.status.is_final() || job.paused || key_paused {
            let action = if key_paused { "start a fire (its flow key is paused)" } else { "start a fire" };
            return Err(invalid(id, job.status, action));
        }
        if let Some(fire) = job.life_if_any().and_then(|life| life.active.get_mut(&fire_ms)) {
            // A retry. (An attempt left in flight by a leader that died is re-run by the next
            // one without a new start; a second start of the same attempt is a duplicate.)
            if attempt != fire.attempts + 1 || fire.in_flight {
                return Err(ApplyError::StaleAttempt { id: id.to_string(), fire_ms, attempt });
            }
            fire.in_flight = true;
            return Ok(Applied::Done);
        }
        let overlap_blocks = job.spec.cron_overlap() == Some(Overlap::Skip) && !job.life().active.is_empty();
        if job.next_fire_ms != Some(fire_ms) || attempt != 1 || !ready || overlap_blocks {
            return Err(ApplyError::StaleAttempt { id: id.to_string(), fire_ms, attempt });
        }
        let lateness_ms = now_ms.saturating_sub(fire_ms);
        match job.spec.is_once() {
            // A once job's only fire is run however late, up to the catch-up window.
            true if lateness_ms > CATCH_UP_WINDOW_MS => {
                job.next_fire_ms = None;
                record_missed(job, 1, fire_ms, now_ms);
                let reason = "missed: later than the catch-up window".to_string();
                if let Some(url) = job.spec.callback_url(false) {
                    let body = callback_document(id, fire_ms, 0, Some(&reason), None, Status::Failed);
                    let callback = PendingCallback {
                        url,
                        success: false,
                        body,
                        attempts: 0,
                        in_flight: false,
                        due_ms: now_ms,
                        then: None,
                    };
                    queue_callback(job, fire_ms, callback, now_ms);
                }
                self.add_dead_letter(id, fire_ms, DeadLetter { attempts: 0, reason, moved_ms: now_ms });
                self.set_status(id, Status::Failed, now_ms);
                return Ok(Applied::Missed { count: 1 });
            }
            true => {}
            // A late cron fire goes through the misfire policy first: it may be replaced by a
            // later one (fire_once), skipped (skip, or past the window), or run (fire_all).
            false => {
                let missed = catch_up(job, now_ms);
                if job.next_fire_ms != Some(fire_ms) {
                    let status = if job.next_fire_ms.is_none() && job.life().active.is_empty() {
                        Status::Completed
                    } else {
                        job.status
                    };
                    self.set_status(id, status, now_ms);
                    return Ok(Applied::Missed { count: missed });
                }
            }
        }
        let job = self.jobs.get_mut(id).expect("checked");
        job.life_mut().catch_up_run =
            if lateness_ms > MISFIRE_THRESHOLD_MS { job.life_mut().catch_up_run + 1 } else { 0 };
        let fire = ActiveFire { attempts: 0, in_flight: true, due_ms: fire_ms, deadline_from_ms: fire_ms };
        job.life_mut().active.insert(fire_ms, fire);
        // The next fire is computed from the committed fire time, then caught up to now.
        job.next_fire_ms = if job.spec.is_once() { None } else { next_cron_fire(&job.spec.get(), fire_ms) };
        // Fires that came due while this one was late are handled (and recorded) here.
        catch_up(job, now_ms);
        self.set_status(id, Status::InProgress, now_ms);
        Ok(Applied::Done)
    }

    fn attempt_finished(&mut self, id: &str, record: AttemptRecord) -> Result<Applied, ApplyError> {
        let AttemptRecord { fire_ms, attempt, node, started_ms, finished_ms, outcome, retry_at_ms } = record;
        let job = self.job_mut(id)?;
        let stale = || ApplyError::StaleAttempt { id: id.to_string(), fire_ms, attempt };
        let Some(fire) = job.life_if_any().and_then(|life| life.active.get_mut(&fire_ms)) else { return Err(stale()) };
        if attempt != fire.attempts + 1 {
            return Err(stale());
        }
        fire.attempts = attempt;
        fire.in_flight = false;
        let (status_code, error, body) = match &outcome {
            Outcome::Response { status, body, .. } => {
                (Some(*status), None, body[..body.len().min(RESPONSE_BODY_KEPT_BYTES_MAX)].to_vec())
            }
            Outcome::Error(class) => (None, Some(*class), Vec::new()),
        };
        push_history(
            job,
            Execution {
                fire_ms,
                attempt,
                node,
                started_ms,
                finished_ms,
                status_code,
                error,
                response_body: body,
                missed: 0,
                note: None,
            },
        );
        let receiver_refused_retries = matches!(outcome, Outcome::Response { no_retry: true, .. });
        let retryable = match &outcome {
            Outcome::Response { status, .. } => job.spec.retry().retries_status(*status) && !receiver_refused_retries,
            Outcome::Error(ErrorClass::Timeout | ErrorClass::Connect | ErrorClass::Other) => true,
            Outcome::Error(ErrorClass::Refused | ErrorClass::Aborted | ErrorClass::InvalidRequest) => false,
        };
        let retry_at_ms = retry_at_ms.max(finished_ms);
        let deadline_from_ms = job.life().active.get(&fire_ms).map_or(fire_ms, |f| f.deadline_from_ms);
        let past_deadline =
            job.spec.deadline_ms().is_some_and(|deadline| retry_at_ms >= deadline_from_ms.saturating_add(deadline));
        let ended = if outcome.succeeded() {
            job.life_mut().fires_succeeded += 1;
            None
        } else if retryable && attempt < job.spec.retry().max_attempts && !past_deadline {
            job.life_mut().active.get_mut(&fire_ms).expect("checked above").due_ms = retry_at_ms;
            return Ok(Applied::Done);
        } else {
            job.life_mut().fires_failed += 1;
            let reason = if past_deadline && retryable && attempt < job.spec.retry().max_attempts {
                "deadline exceeded".to_string()
            } else if receiver_refused_retries {
                "the receiver asked not to retry".to_string()
            } else if !retryable {
                "not retryable".to_string()
            } else {
                format!("{attempt} attempts failed")
            };
            Some(reason)
        };
        job.life_mut().active.remove(&fire_ms);
        let once = job.spec.is_once();
        let auto_paused = count_fire_for_auto_pause(job, ended.is_some(), fire_ms, finished_ms);
        self.auto_paused += u64::from(auto_paused);
        let job = self.jobs.get_mut(id).expect("checked above");
        // A fire that waited for this one (overlap skip) may now be late: catch it up.
        catch_up(job, finished_ms);
        // Other fires (retries, a trigger, a backfill) or the next one keep the job going;
        // a once job ends with the outcome of its last fire.
        let status = if !job.life().active.is_empty() {
            Status::InProgress
        } else if job.next_fire_ms.is_some() {
            Status::Pending
        } else {
            match (&ended, once) {
                (Some(reason), true) if reason == "deadline exceeded" => Status::Timeout,
                (Some(_), true) => Status::Failed,
                _ => Status::Completed,
            }
        };
        if let Some(url) = job.spec.callback_url(ended.is_none()) {
            let body = callback_document(id, fire_ms, attempt, ended.as_deref(), Some(&outcome), status);
            let callback = PendingCallback {
                url,
                success: ended.is_none(),
                body,
                attempts: 0,
                in_flight: false,
                due_ms: finished_ms,
                then: None,
            };
            queue_callback(job, fire_ms, callback, finished_ms);
        }
        if let Some(reason) = ended {
            self.add_dead_letter(id, fire_ms, DeadLetter { attempts: attempt, reason, moved_ms: finished_ms });
        }
        self.set_status(id, status, finished_ms);
        Ok(Applied::Done)
    }

    /// A callback attempt ended: delivered (2xx), retried under the job's retry policy, or
    /// given up; each attempt goes to the job's history with a note.
    fn callback_finished(&mut self, id: &str, record: AttemptRecord) -> Result<Applied, ApplyError> {
        let AttemptRecord { fire_ms, attempt, started_ms, finished_ms, outcome, retry_at_ms, .. } = record;
        let job = self.job_mut(id)?;
        let stale = || ApplyError::StaleAttempt { id: id.to_string(), fire_ms, attempt };
        if !job.life().callbacks.contains_key(&fire_ms) {
            return Err(stale());
        }
        let callback = life_of(&mut job.life).callbacks.get_mut(&fire_ms).ok_or_else(stale)?;
        if attempt != callback.attempts + 1 {
            return Err(stale());
        }
        callback.attempts = attempt;
        callback.in_flight = false;
        let which = if callback.success { "on_success" } else { "on_failure" };
        let retryable = match &outcome {
            Outcome::Response { no_retry: true, .. } => false,
            Outcome::Response { status, .. } => job.spec.retry().retries_status(*status),
            Outcome::Error(class) => matches!(class, ErrorClass::Timeout | ErrorClass::Connect | ErrorClass::Other),
        };
        let note = if outcome.succeeded() {
            format!("callback {which} delivered")
        } else if retryable && attempt < job.spec.retry().max_attempts {
            callback.due_ms = retry_at_ms.max(finished_ms);
            format!("callback {which} failed; retrying")
        } else {
            format!("callback {which} given up after {attempt} attempts")
        };
        if !note.ends_with("retrying") {
            let ended = job.life_mut().callbacks.remove(&fire_ms).expect("found above");
            if let Some(mut next) = ended.then {
                next.due_ms = finished_ms;
                job.life_mut().callbacks.insert(fire_ms, *next);
            }
        }
        let (status_code, error) = match &outcome {
            Outcome::Response { status, .. } => (Some(*status), None),
            Outcome::Error(class) => (None, Some(*class)),
        };
        let execution = Execution {
            fire_ms,
            attempt,
            node: 0,
            started_ms,
            finished_ms,
            status_code,
            error,
            response_body: Vec::new(),
            missed: 0,
            note: Some(note),
        };
        push_history(job, execution);
        Ok(Applied::Done)
    }

    /// The next thing the runtime should do for `id`, and when (`None`: nothing to do).
    pub fn next_due(&self, id: &str) -> Option<(u64, Due)> {
        self.next_due_of(self.jobs.get(id)?)
    }

    /// `next_due` of a job in hand (no lookup by id: the runtime arms jobs by slot).
    pub fn next_due_of(&self, job: &Job) -> Option<(u64, Due)> {
        let key_paused = self.flow_key_of_job(job).is_some_and(|(_, key)| key.paused);
        match self.next_due_ignoring_key(job) {
            Some((_, Due::NewFire { .. } | Due::Retry { .. })) if key_paused => next_callback_of(job),
            due => due,
        }
    }

    /// The callback attempt due first for `id`: callbacks report fires that ended, so they
    /// go out whatever the job's state (paused, finished, cancelled).
    pub fn next_callback(&self, id: &str) -> Option<(u64, Due)> {
        next_callback_of(self.jobs.get(id)?)
    }

    /// `next_due` as if the job's flow key were not paused.
    fn next_due_ignoring_key(&self, job: &Job) -> Option<(u64, Due)> {
        let fire = self.next_fire_due(job);
        let callback = next_callback_of(job);
        [fire, callback].into_iter().flatten().min_by_key(|(due_ms, _)| *due_ms)
    }

    /// The job's next fire or retry (not callback), as if its flow key were not paused.
    fn next_fire_due(&self, job: &Job) -> Option<(u64, Due)> {
        if job.status.is_final() || job.paused {
            return None;
        }
        // An ordered key runs one fire at a time: its jobs' fires never overlap.
        let ordered = self.flow_key_of_job(job).is_some_and(|(_, key)| key.ordered);
        let concurrent = !ordered && job.spec.cron_overlap() == Some(Overlap::Allow);
        // Fires added to the job (trigger, backfill, redrive) start one after another unless
        // its fires may overlap: a fire not started waits while another has started.
        let one_started = job.life().active.values().any(|fire| fire.in_flight || fire.attempts > 0);
        let retry = job
            .life()
            .active
            .iter()
            .filter(|(_, fire)| !fire.in_flight)
            .filter(|(_, fire)| concurrent || fire.attempts > 0 || !one_started)
            .map(|(&fire_ms, fire)| (fire.due_ms, Due::Retry { fire_ms, attempt: fire.attempts + 1 }))
            .min_by_key(|(due_ms, _)| *due_ms);
        let overlap_allows = job.life().active.is_empty() || concurrent;
        let new_fire = job
            .next_fire_ms
            .filter(|_| overlap_allows && self.dependencies_done(job))
            .map(|fire_ms| (fire_ms, Due::NewFire { fire_ms }));
        [retry, new_fire].into_iter().flatten().min_by_key(|(due_ms, _)| *due_ms)
    }

    /// Attempts that a leader started and never finished: a new leader runs them again with
    /// the same fire (same idempotency key) and the same attempt number.
    pub fn in_flight(&self) -> Vec<(String, u64, u32)> {
        let mut out = Vec::new();
        for job in self.jobs.values().filter(|j| !j.status.is_final()) {
            for (&fire_ms, fire) in job.life().active.iter().filter(|(_, f)| f.in_flight) {
                out.push((job.spec.id().to_string(), fire_ms, fire.attempts + 1));
            }
        }
        out
    }

    /// Jobs waiting on `id` (re-checked by the runtime when `id` completes).
    pub fn dependents_of(&self, id: &str) -> Vec<String> {
        self.dependents.get(id).map(|set| set.iter().cloned().collect()).unwrap_or_default()
    }

    /// True when the per-status counts (and the auto-paused count) match a recount of every
    /// job, and the job table's slots, free list and index agree (tests use it).
    pub fn counts_match_jobs(&self) -> bool {
        let mut recount = [0u64; 6];
        for job in self.jobs.values() {
            recount[job.status as usize] += 1;
        }
        let auto_paused = self.jobs.values().filter(|job| job.life().paused_reason.is_some()).count() as u64;
        let keys_hold_their_jobs = self.jobs.values().all(|job| {
            job.spec
                .get()
                .flow
                .as_ref()
                .is_none_or(|f| self.flow_keys.get(&f.key).is_some_and(|k| k.jobs.contains(job.spec.id())))
        });
        let keys_hold_only_their_jobs = self.flow_keys.iter().all(|(name, key)| {
            (key.paused || !key.jobs.is_empty())
                && key
                    .jobs
                    .iter()
                    .all(|id| self.jobs.get(id.as_str()).is_some_and(|job| job.spec.flow_key() == Some(name.as_str())))
        });
        recount == self.counts
            && auto_paused == self.auto_paused
            && self.tombstones.is_consistent()
            && self.expiry_order.len() == self.jobs.values().filter(|job| job.status.is_final()).count()
            && self
                .expiry_order
                .iter()
                .all(|(from_ms, id)| self.jobs.get(id).is_some_and(|job| job.life().retained_from_ms == Some(*from_ms)))
            && keys_hold_their_jobs
            && self.jobs.is_consistent()
            && keys_hold_only_their_jobs
    }

    /// The whole state as bytes: a header (`SNAPSHOT_FORMAT`, then zeros, so the archive
    /// after it keeps its alignment), then the state archived by rkyv: jobs by slot (the
    /// same on replicas that applied the same commands or restored the same archive), maps
    /// by id in key order. `digest` does not read these bytes: it hashes the JSON form,
    /// which holds jobs by id whatever their slots.
    pub fn snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        self.snapshot_sized(0).map(|bytes| bytes.to_vec())
    }

    /// `snapshot`, into a buffer of `capacity_bytes` to start with (the last snapshot's size
    /// is a good guess: growing the buffer as it fills costs more than archiving). Fails
    /// only for a state whose archive would pass rkyv's 32-bit offsets (2 GiB).
    pub fn snapshot_sized(&self, capacity_bytes: usize) -> Result<AlignedVec<16>, SnapshotError> {
        let mut header = AlignedVec::<16>::with_capacity(capacity_bytes.max(SNAPSHOT_HEADER_BYTES));
        header.extend_from_slice(&[SNAPSHOT_FORMAT]);
        header.extend_from_slice(&[0; SNAPSHOT_HEADER_BYTES - 1]);
        rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(self, header).map_err(|e| SnapshotError(e.to_string()))
    }

    /// Room for `additional` more jobs without growing the table (a replay of a log's tail
    /// of about that many creates). Changes nothing replicated.
    pub fn reserve_jobs(&mut self, additional: usize) {
        self.jobs.reserve(additional);
    }

    /// The most jobs this partition is expected to hold: once its table is large, it grows
    /// once to that many slots rather than doubling there (each doubling copies the table
    /// into a new allocation and leaves the old one to the allocator). Changes nothing
    /// replicated.
    pub fn expect_jobs(&mut self, jobs: usize) {
        self.jobs.expect_slots(jobs);
    }

    /// A copy of what an archived snapshot holds, to encode elsewhere (another thread)
    /// while this state goes on applying: the job records are copied as they are (a stored
    /// spec's view and what a job gained once it fired, its `JobLife`, are shared, not
    /// copied: a life changed meanwhile is copied then; a spec kept in the heap is copied
    /// whole), the tombstones' chunks into the heap, the
    /// dead letters and the maps of dependents and flow keys as they are; the indexes a
    /// restore rebuilds are left out. Far less than encoding them, but not nothing: it is
    /// the pause a snapshot costs the shard (a metric).
    pub fn copy_for_snapshot(&self) -> SnapshotCopy {
        SnapshotCopy(State {
            jobs: self.jobs.copy_records(),
            dead_letters: self.dead_letters.clone(),
            dead_letter_count: self.dead_letter_count,
            dead_letter_order: self.dead_letter_order.clone(),
            dependents: self.dependents.clone(),
            counts: self.counts,
            tombstones: self.tombstones.copy_for_encoding(),
            legacy_tombstones: BTreeMap::new(),
            expiry_order: BTreeSet::new(),
            expired_total: self.expired_total,
            dead_letters_evicted_total: self.dead_letters_evicted_total,
            auto_paused: self.auto_paused,
            flow_keys: self.flow_keys.clone(),
            spec_sink: SinkSlot::default(),
        })
    }

    /// `snapshot` in format 0 (JSON), for a partition an older member (which reads only
    /// that) replicates.
    pub fn snapshot_json(&self) -> Result<Vec<u8>, SnapshotError> {
        serde_json::to_vec(self).map_err(|e| SnapshotError(e.to_string()))
    }

    /// A state from `snapshot`'s bytes, or from the JSON snapshots of builds before the
    /// format header (format 0); an unknown format is refused, never guessed at.
    pub fn restore(bytes: &[u8]) -> Result<State, RestoreError> {
        State::restore_linked(bytes, &BTreeMap::new())
    }

    /// Whether `bytes` are a linked snapshot (whole only with its replica's segment files).
    pub fn is_linked_snapshot(bytes: &[u8]) -> bool {
        bytes.first() == Some(&SNAPSHOT_FORMAT_LINKED)
    }

    /// The segments a snapshot lists (a linked snapshot's; none for any other format): the
    /// shell finds and checks them before `restore_linked`.
    pub fn linked_segments(bytes: &[u8]) -> Result<Vec<LinkedSegment>, RestoreError> {
        match bytes.first() {
            Some(&SNAPSHOT_FORMAT_LINKED) => linked_list(bytes).map(|(segments, _)| segments),
            _ => Ok(Vec::new()),
        }
    }

    /// `restore`, for a linked snapshot too: each of its links is resolved into `segments`
    /// (by number: the segment and the length the snapshot listed), checked to lie inside
    /// and to hold a spec's archive. A link into a segment not given is an error.
    pub fn restore_linked(
        bytes: &[u8],
        segments: &BTreeMap<u64, (Arc<dyn SpecSegment>, u64)>,
    ) -> Result<State, RestoreError> {
        let damaged = |format: u8| move |reason: String| RestoreError::Damaged { format, reason };
        let archived = |archive: &[u8], format: u8| {
            // The archive needs 16-byte alignment; bytes read from a file may lack it (a
            // mapped file's start has it).
            if archive.as_ptr().align_offset(SNAPSHOT_HEADER_BYTES) == 0 {
                return rkyv::from_bytes::<State, rkyv::rancor::Error>(archive)
                    .map_err(|e| damaged(format)(e.to_string()));
            }
            let aligned = crate::spec::aligned_copy(archive);
            rkyv::from_bytes::<State, rkyv::rancor::Error>(&aligned).map_err(|e| damaged(format)(e.to_string()))
        };
        let mut state: State = match bytes.first() {
            Some(b'{') => serde_json::from_slice(bytes).map_err(|e| damaged(0)(e.to_string()))?,
            Some(&SNAPSHOT_FORMAT) => {
                // The header's other bytes are zero (kept so, to mean something later).
                if bytes.get(1..SNAPSHOT_HEADER_BYTES).is_none_or(|rest| rest.iter().any(|&b| b != 0)) {
                    return Err(damaged(SNAPSHOT_FORMAT)("its header is not this format's".into()));
                }
                archived(&bytes[SNAPSHOT_HEADER_BYTES..], SNAPSHOT_FORMAT)?
            }
            Some(&SNAPSHOT_FORMAT_LINKED) => {
                let (listed, archive_from) = linked_list(bytes)?;
                let archive = bytes
                    .get(archive_from..)
                    .ok_or_else(|| damaged(SNAPSHOT_FORMAT_LINKED)("its archive is cut".into()))?;
                let mut state = archived(archive, SNAPSHOT_FORMAT_LINKED)?;
                let listed: BTreeSet<u64> = listed.iter().map(|segment| segment.number).collect();
                for job in state.jobs.values_mut() {
                    let Some(reference) = job.spec.unresolved() else { continue };
                    let (segment, len) = segments
                        .get(&reference.segment)
                        .filter(|_| listed.contains(&reference.segment))
                        .ok_or_else(|| {
                            damaged(SNAPSHOT_FORMAT_LINKED)(format!(
                                "a job's spec lies in spec segment {}, which the snapshot does not list or is not here",
                                reference.segment
                            ))
                        })?;
                    let view =
                        SpecView::resolve(segment.clone(), *len, reference).map_err(damaged(SNAPSHOT_FORMAT_LINKED))?;
                    job.spec = SpecCell::Stored(view);
                }
                state
            }
            Some(found) if SNAPSHOT_FORMATS_RETIRED.contains(found) => {
                return Err(RestoreError::Retired { found: *found })
            }
            Some(&found) => return Err(RestoreError::UnknownFormat { found }),
            None => return Err(damaged(0)("no bytes".into())),
        };
        let format = bytes.first().map_or(0, |&b| if b == b'{' { 0 } else { b });
        if let Some(reference) = state.jobs.values().find_map(|job| job.spec.unresolved()) {
            // Only a linked snapshot holds links (and its restore resolved them all above).
            return Err(damaged(format)(format!("a spec reference ({reference:?}) in place of a spec")));
        }
        state.rebuild_indexes().map_err(damaged(format))?;
        Ok(state)
    }

    /// A digest of the whole state: equal on replicas that applied the same commands.
    /// (Over the JSON form: unlike the archive it has no size limit, so it always exists.)
    pub fn digest(&self) -> u64 {
        let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
        // Never fails: the writer takes every byte, and every key is a string or a number.
        serde_json::to_writer(&mut hash, self).expect("the state serializes");
        hash.0
    }
}

/// The callback attempt of `job` due first (see `State::next_callback`).
fn next_callback_of(job: &Job) -> Option<(u64, Due)> {
    let callbacks = job.life().callbacks.iter().filter(|(_, callback)| !callback.in_flight);
    callbacks
        .map(|(&fire_ms, callback)| (callback.due_ms, Due::Callback { fire_ms, attempt: callback.attempts + 1 }))
        .min_by_key(|(due_ms, _)| *due_ms)
}

fn id_digest(id: &str) -> u128 {
    let hash = Sha256::digest(id.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash[..16]);
    u128::from_be_bytes(first)
}

struct AttemptRecord {
    fire_ms: u64,
    attempt: u32,
    node: u64,
    started_ms: u64,
    finished_ms: u64,
    outcome: Outcome,
    retry_at_ms: u64,
}

fn invalid(id: &str, status: Status, action: &'static str) -> ApplyError {
    ApplyError::InvalidState { id: id.to_string(), status, action }
}

fn push_history(job: &mut Job, execution: Execution) {
    if job.life().history.len() == HISTORY_PER_JOB_MAX {
        job.life_mut().history.pop_front();
    }
    job.life_mut().history.push_back(execution);
}

/// The document POSTed to a callback URL: the fire, how it ended, the last answer.
fn callback_document(
    id: &str,
    fire_ms: u64,
    attempts: u32,
    failure: Option<&str>,
    outcome: Option<&Outcome>,
    status: Status,
) -> Vec<u8> {
    let response = match outcome {
        Some(Outcome::Response { status, body, .. }) => {
            let kept = &body[..body.len().min(RESPONSE_BODY_KEPT_BYTES_MAX)];
            serde_json::json!({"status": status, "error": null, "body": String::from_utf8_lossy(kept)})
        }
        Some(Outcome::Error(class)) => {
            serde_json::json!({"status": null, "error": format!("{class:?}").to_lowercase(), "body": null})
        }
        // Never attempted (missed).
        None => serde_json::Value::Null,
    };
    let document = serde_json::json!({
        "job_id": id,
        "fire_ms": fire_ms,
        "idempotency_key": crate::sign::idempotency_key(id, fire_ms),
        "outcome": if failure.is_none() { "delivered" } else { "dead_lettered" },
        "reason": failure,
        "attempts": attempts,
        "job_status": status.as_str(),
        "response": response,
    });
    document.to_string().into_bytes()
}

/// Queues a callback; beyond `CALLBACKS_PENDING_MAX` the oldest waiting one is dropped,
/// with a note in the history (a receiver that never answers cannot grow the state).
fn queue_callback(job: &mut Job, fire_ms: u64, callback: PendingCallback, now_ms: u64) {
    let earlier = job.life_if_any().and_then(|life| life.callbacks.get_mut(&fire_ms));
    if let Some(earlier) = earlier.filter(|earlier| earlier.in_flight) {
        // An attempt of the earlier outcome is out: the new one follows it (replacing any
        // that waited behind it: the latest outcome is what matters).
        earlier.then = Some(Box::new(callback));
        return;
    }
    // Not sent yet (or none): the newer outcome replaces it.
    job.life_mut().callbacks.insert(fire_ms, callback);
    if job.life().callbacks.len() > CALLBACKS_PENDING_MAX {
        let oldest = job.life().callbacks.iter().find(|(_, c)| !c.in_flight).map(|(fire_ms, _)| *fire_ms);
        if let Some(dropped) = oldest {
            job.life_mut().callbacks.remove(&dropped);
            let note = format!("callback dropped: more than {CALLBACKS_PENDING_MAX} waiting");
            push_history(job, Execution::event(dropped, now_ms, 0, Some(note)));
        }
    }
}

/// Counts a cron fire that ended for `pause_after_failures`; returns true when the job paused
/// itself now (the reason goes to its history).
fn count_fire_for_auto_pause(job: &mut Job, failed: bool, fire_ms: u64, now_ms: u64) -> bool {
    let Schedule::Cron(cron) = &job.spec.get().schedule else { return false };
    if !failed {
        if job.life().failures_in_a_row != 0 {
            job.life_mut().failures_in_a_row = 0;
        }
        return false;
    }
    let life = life_of(&mut job.life);
    life.failures_in_a_row = life.failures_in_a_row.saturating_add(1);
    let Some(limit) = cron.pause_after_failures.filter(|limit| life.failures_in_a_row >= *limit) else { return false };
    if job.paused {
        return false;
    }
    let reason = format!("paused itself after {limit} failed fires in a row");
    job.paused = true;
    job.life_mut().paused_reason = Some(reason.clone());
    push_history(job, Execution::event(fire_ms, now_ms, 0, Some(reason)));
    true
}

/// The next `count` fires of `spec` if it were created at `from_ms` (a preview: its start,
/// end and DST policy apply; retries and misfires do not).
pub fn upcoming_fires(spec: &JobSpec, from_ms: u64, count: usize) -> Vec<u64> {
    let mut fires = Vec::with_capacity(count.min(1_000));
    let mut next = first_fire(spec, from_ms);
    // Bounded by `count`.
    while let Some(at) = next.filter(|_| fires.len() < count) {
        fires.push(at);
        next = match spec.schedule {
            Schedule::Once { .. } => None,
            Schedule::Cron(_) => next_cron_fire(spec, at),
        };
    }
    fires
}

/// The first fire of a new (or replaced) spec at `now_ms`.
fn first_fire(spec: &JobSpec, now_ms: u64) -> Option<u64> {
    match &spec.schedule {
        Schedule::Once { at_ms } => Some(*at_ms),
        Schedule::Cron(cron) => {
            let from_ms = cron.start_ms.map_or(now_ms, |start| start.saturating_sub(1).max(now_ms));
            next_cron_fire(spec, from_ms)
        }
    }
}

/// Counts `missed` fires (the first due at `first_fire_ms`) and writes one history line.
fn record_missed(job: &mut Job, missed: u64, first_fire_ms: u64, now_ms: u64) {
    if missed == 0 {
        return;
    }
    job.life_mut().fires_missed += missed;
    push_history(job, Execution::event(first_fire_ms, now_ms, missed, None));
}

/// The job's parsed schedule (validated at create, so parsing succeeds).
fn schedule_of(spec: &JobSpec) -> Option<(CronSchedule, &crate::job::CronSpec)> {
    let Schedule::Cron(cron) = &spec.schedule else { return None };
    Some((CronSchedule::parse(&cron.expression, &cron.time_zone).ok()?.with_dst(cron.dst), cron))
}

/// The first cron fire strictly after `after_ms` within the job's start and end, if any.
fn next_cron_fire(spec: &JobSpec, after_ms: u64) -> Option<u64> {
    let (schedule, cron) = schedule_of(spec)?;
    next_in(&schedule, cron, after_ms)
}

fn next_in(schedule: &CronSchedule, cron: &crate::job::CronSpec, after_ms: u64) -> Option<u64> {
    let from_ms = match cron.start_ms {
        Some(start) if start > after_ms => start - 1,
        _ => after_ms,
    };
    let next = schedule.next_after_ms(from_ms)?;
    if cron.end_ms.is_some_and(|end| next > end) {
        return None;
    }
    Some(next)
}

/// Cron fires in `[from_ms, until_ms)`, counted up to `MISSED_COUNT_MAX` (a lower bound
/// beyond it).
fn count_fires(schedule: &CronSchedule, cron: &crate::job::CronSpec, from_ms: u64, until_ms: u64) -> u64 {
    let mut count = 0;
    let mut at = from_ms.saturating_sub(1);
    // Bounded by MISSED_COUNT_MAX.
    while count < MISSED_COUNT_MAX {
        match next_in(schedule, cron, at) {
            Some(next) if next < until_ms => {
                count += 1;
                at = next;
            }
            _ => break,
        }
    }
    count
}

/// Applies the catch-up window and the misfire policy when the next fire is already in the
/// past at `now_ms` (downtime, a pause, a long previous fire). Missed fires are counted and
/// written to the history; returns how many.
fn catch_up(job: &mut Job, now_ms: u64) -> u64 {
    let Some(next) = job.next_fire_ms.filter(|next| *next <= now_ms) else { return 0 };
    let spec = job.spec.get();
    let Some((schedule, cron)) = schedule_of(&spec) else { return 0 };
    let mut missed = 0;
    let mut next = next;
    let first_missed = next;
    // Fires older than the window are missed whatever the policy.
    let window_start_ms = now_ms.saturating_sub(CATCH_UP_WINDOW_MS);
    if next < window_start_ms {
        missed += count_fires(&schedule, cron, next, window_start_ms);
        match next_in(&schedule, cron, window_start_ms.saturating_sub(1)) {
            Some(in_window) if in_window <= now_ms => next = in_window,
            later => {
                job.next_fire_ms = later;
                record_missed(job, missed, first_missed, now_ms);
                return missed;
            }
        }
    }
    let misfire = cron.misfire;
    let new_next = match misfire {
        // The fires due since coalesce into one: the latest, run now.
        Misfire::FireOnce => {
            let latest = schedule.last_at_or_before_ms(now_ms.min(cron.end_ms.unwrap_or(u64::MAX))).unwrap_or(next);
            let latest = latest.max(next);
            missed += count_fires(&schedule, cron, next, latest);
            Some(latest)
        }
        Misfire::Skip if now_ms - next <= MISFIRE_THRESHOLD_MS => Some(next),
        Misfire::FireAll { max } if job.life().catch_up_run < max || now_ms - next <= MISFIRE_THRESHOLD_MS => {
            Some(next)
        }
        // Skip, or fire_all past its cap: everything due so far is missed.
        Misfire::Skip | Misfire::FireAll { .. } => {
            missed += count_fires(&schedule, cron, next, now_ms.saturating_add(1));
            life_of(&mut job.life).catch_up_run = 0;
            next_in(&schedule, cron, now_ms)
        }
    };
    job.next_fire_ms = new_next;
    record_missed(job, missed, first_missed, now_ms);
    missed
}
