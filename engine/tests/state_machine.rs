//! The replicated state machine, command by command: the life of a fire (due → attempts →
//! completed or dead-lettered), cron fires computed from committed fire times, misfire and
//! overlap policies, dependencies, idempotent create — and the determinism property: random
//! command sequences give identical digests on two replicas and on a third restored from a
//! snapshot taken midway.

use proptest::prelude::*;
use serde_json::json;
use sundial_engine::job::JobSpec;
use sundial_engine::request::parse_job_request;
use sundial_engine::spec::PackedSpec;
use sundial_engine::state::*;
use sundial_engine::tombstones::{Tombstone, TombstoneChunk, TombstoneStore, TOMBSTONES_PER_CHUNK};

const T0: u64 = 1_780_000_000_000; // 2026-05-28T20:26:40Z

/// A tombstone store in memory (the node's keeps chunks in files,
/// node/src/replica/tombstones.rs): enough to show tombstones read the same wherever they live.
#[derive(Clone, Default)]
struct MemTombstoneStore;

/// Chunks of tombstones a store made (in the heap here; in files in the node).
struct MemChunk(Vec<Tombstone>);

impl TombstoneChunk for MemChunk {
    fn records(&self) -> &[Tombstone] {
        &self.0
    }
    fn records_mut(&mut self) -> &mut [Tombstone] {
        &mut self.0
    }
}

impl TombstoneStore for MemTombstoneStore {
    fn chunk(&mut self) -> Option<Box<dyn TombstoneChunk>> {
        // Filled with what no record is, so a read of a place never written shows.
        Some(Box::new(MemChunk(vec![Tombstone::new(u128::MAX, u64::MAX); TOMBSTONES_PER_CHUNK])))
    }
}

/// A spec store in memory, each spec in a segment of its own (the node's store keeps them in
/// files, node/src/replica/specs.rs): enough to show the core reads, snapshots and repacks
/// specs the same wherever they live.
#[derive(Clone, Default)]
struct MemSpecStore {
    segments: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Weak<MemSegment>>>>,
}

struct MemSegment {
    number: u64,
    bytes: rkyv::util::AlignedVec<16>,
    live: std::sync::atomic::AtomicI64,
    repack: std::sync::atomic::AtomicBool,
}

// SAFETY: a segment holds one record, the bytes `put` was given, in an AlignedVec<16>
// (offset 0), never written after.
unsafe impl sundial_engine::spec::SpecSegment for MemSegment {
    fn read(&self, offset: u32, len: u32) -> &[u8] {
        &self.bytes[offset as usize..(offset + len) as usize]
    }
    fn retain(&self, len: u32) {
        self.live.fetch_add(i64::from(len), std::sync::atomic::Ordering::Relaxed);
    }
    fn release(&self, len: u32) {
        let left = self.live.fetch_sub(i64::from(len), std::sync::atomic::Ordering::Relaxed) - i64::from(len);
        assert!(left >= 0, "a segment's live bytes never go below zero");
    }
    fn wants_repack(&self) -> bool {
        self.repack.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn number(&self) -> u64 {
        self.number
    }
}

impl MemSpecStore {
    fn ask_repack(&self) {
        for segment in self.segments.lock().expect("unpoisoned").iter().filter_map(|s| s.upgrade()) {
            segment.repack.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl sundial_engine::spec::SpecSink for MemSpecStore {
    fn put(&mut self, archive: &[u8]) -> Option<sundial_engine::spec::SpecView> {
        let mut bytes = rkyv::util::AlignedVec::<16>::new();
        bytes.extend_from_slice(archive);
        let mut segments = self.segments.lock().expect("unpoisoned");
        let number = segments.len() as u64;
        let segment =
            std::sync::Arc::new(MemSegment { number, bytes, live: Default::default(), repack: Default::default() });
        segments.push(std::sync::Arc::downgrade(&segment));
        drop(segments);
        // SAFETY: the segment holds exactly the archive `put` was given, at offset 0.
        Some(unsafe { sundial_engine::spec::SpecView::new(segment, 0, archive.len() as u32) })
    }
    fn repack_wanted(&self) -> bool {
        use sundial_engine::spec::SpecSegment as _;
        self.segments.lock().expect("unpoisoned").iter().filter_map(|s| s.upgrade()).any(|s| s.wants_repack())
    }
}

fn spec(request: serde_json::Value) -> JobSpec {
    parse_job_request(&request.to_string(), T0, "unused").expect("valid request")
}

fn once(id: &str, at_ms: u64) -> JobSpec {
    spec(json!({"id": id, "run_at": at_ms, "url": "https://example.com/hook", "retry": {"max_attempts": 3}}))
}

fn create(state: &mut State, spec: JobSpec) -> Result<Applied, ApplyError> {
    state.apply(Command::Create { spec: PackedSpec::of(&spec), now_ms: T0, dedup_window_ms: None })
}

fn start(state: &mut State, id: &str, fire_ms: u64, attempt: u32, now_ms: u64) -> Result<Applied, ApplyError> {
    state.apply(Command::FireStarted { id: id.into(), fire_ms, attempt, node: 1, now_ms })
}

fn finish(
    state: &mut State,
    id: &str,
    fire_ms: u64,
    attempt: u32,
    at_ms: u64,
    status: u16,
) -> Result<Applied, ApplyError> {
    state.apply(Command::AttemptFinished {
        id: id.into(),
        fire_ms,
        attempt,
        node: 1,
        started_ms: at_ms - 5,
        finished_ms: at_ms,
        outcome: Outcome::Response { status, body: b"ok".to_vec(), retry_after_ms: None, no_retry: false },
        retry_at_ms: at_ms + 1_000,
    })
}

/// Starts and finishes with `status` the next attempt that is due for `id` (at its due time).
fn run_next(state: &mut State, id: &str, status: u16) -> (u64, u32) {
    let (due_ms, due) = state.next_due(id).expect("something is due");
    let (fire_ms, attempt) = match due {
        Due::NewFire { fire_ms } => (fire_ms, 1),
        Due::Retry { fire_ms, attempt } => (fire_ms, attempt),
        Due::Callback { .. } => panic!("a callback is due, not a fire"),
    };
    start(state, id, fire_ms, attempt, due_ms).expect("started");
    finish(state, id, fire_ms, attempt, due_ms + 10, status).expect("finished");
    (fire_ms, attempt)
}

#[test]
fn a_once_job_fires_retries_and_completes() {
    let mut state = State::new();
    let at = T0 + 60_000;
    assert_eq!(create(&mut state, once("a", at)), Ok(Applied::Created));
    assert_eq!(state.next_due("a"), Some((at, Due::NewFire { fire_ms: at })));
    start(&mut state, "a", at, 1, at).expect("started");
    assert_eq!(state.job("a").expect("job").status, Status::InProgress);
    assert_eq!(state.next_due("a"), None, "in flight: nothing due");
    finish(&mut state, "a", at, 1, at + 10, 503).expect("recorded");
    assert_eq!(state.next_due("a"), Some((at + 1_010, Due::Retry { fire_ms: at, attempt: 2 })));
    start(&mut state, "a", at, 2, at + 1_010).expect("retry started");
    finish(&mut state, "a", at, 2, at + 1_020, 200).expect("recorded");
    let job = state.job("a").expect("job");
    assert_eq!((job.status, job.life().fires_succeeded, job.life().history.len()), (Status::Completed, 1, 2));
    assert_eq!(state.next_due("a"), None);
    assert_eq!(state.count(Status::Completed), 1);
}

#[test]
fn exhausted_and_non_retryable_failures_are_dead_lettered_and_can_be_redriven() {
    let mut state = State::new();
    let at = T0 + 1_000;
    create(&mut state, once("a", at)).expect("created");
    start(&mut state, "a", at, 1, at).expect("started");
    finish(&mut state, "a", at, 1, at + 10, 404).expect("recorded");
    let job = state.job("a").expect("job");
    assert_eq!((job.status, job.life().fires_failed), (Status::Failed, 1), "404 is not retried");
    let (job_id, fire_ms, letter) = state.dead_letters().next().expect("dead-lettered");
    assert_eq!((job_id, fire_ms, letter.attempts, letter.reason.as_str()), ("a", at, 1, "not retryable"));
    state.apply(Command::Redrive { id: "a".into(), fire_ms: at, now_ms: at + 50 }).expect("redriven");
    assert_eq!(state.next_due("a"), Some((at + 50, Due::Retry { fire_ms: at, attempt: 1 })));
    assert_eq!(state.dead_letters().count(), 0);
    // Three 500s exhaust the three attempts.
    for attempt in 1..=3 {
        start(&mut state, "a", at, attempt, at + 100 * u64::from(attempt)).expect("started");
        finish(&mut state, "a", at, attempt, at + 100 * u64::from(attempt) + 10, 500).expect("recorded");
    }
    assert_eq!(state.job("a").expect("job").status, Status::Failed);
    assert_eq!(state.dead_letters().next().expect("dead-lettered").2.reason, "3 attempts failed");
    state.apply(Command::Purge { id: None }).expect("purged");
    assert_eq!(state.dead_letters().count(), 0);
}

#[test]
fn a_deadline_ends_retries_with_status_timeout() {
    let mut state = State::new();
    let at = T0 + 1_000;
    let job = spec(
        json!({"id": "d", "run_at": at, "url": "https://e.com", "deadline_ms": 1500, "retry": {"max_attempts": 10}}),
    );
    create(&mut state, job).expect("created");
    start(&mut state, "d", at, 1, at).expect("started");
    finish(&mut state, "d", at, 1, at + 600, 500).expect("recorded"); // retry at +1600: past the deadline
    assert_eq!(state.job("d").expect("job").status, Status::Timeout);
}

#[test]
fn stale_and_duplicate_outcomes_change_nothing() {
    let mut state = State::new();
    let at = T0 + 1_000;
    create(&mut state, once("a", at)).expect("created");
    start(&mut state, "a", at, 1, at).expect("started");
    let digest = state.digest();
    assert!(matches!(finish(&mut state, "a", at, 2, at + 1, 200), Err(ApplyError::StaleAttempt { .. })));
    assert!(matches!(start(&mut state, "a", at + 1, 1, at), Err(ApplyError::StaleAttempt { .. })));
    assert_eq!(state.digest(), digest, "refused commands change nothing");
    finish(&mut state, "a", at, 1, at + 1, 200).expect("recorded");
    assert!(matches!(finish(&mut state, "a", at, 1, at + 1, 200), Err(ApplyError::StaleAttempt { .. })), "a duplicate");
}

#[test]
fn create_is_idempotent_for_the_same_spec_and_a_conflict_otherwise() {
    let mut state = State::new();
    create(&mut state, once("a", T0 + 5)).expect("created");
    assert_eq!(create(&mut state, once("a", T0 + 5)), Ok(Applied::AlreadyExists));
    assert_eq!(create(&mut state, once("a", T0 + 6)), Err(ApplyError::Conflict("a".into())));
}

#[test]
fn dependencies_must_exist_never_cycle_and_gate_the_fire() {
    let mut state = State::new();
    let mut dependent = once("b", T0 + 10);
    dependent.depends_on = vec!["a".into()];
    assert_eq!(create(&mut state, dependent.clone()), Err(ApplyError::UnknownDependency("a".into())));
    create(&mut state, once("a", T0 + 20)).expect("created");
    create(&mut state, dependent).expect("created");
    assert_eq!(state.next_due("b"), None, "waits for a");
    assert!(matches!(state.apply(Command::Delete { id: "a".into(), now_ms: 0 }), Err(ApplyError::Required { .. })));
    start(&mut state, "a", T0 + 20, 1, T0 + 20).expect("started");
    finish(&mut state, "a", T0 + 20, 1, T0 + 30, 204).expect("recorded");
    assert_eq!(state.next_due("b"), Some((T0 + 10, Due::NewFire { fire_ms: T0 + 10 })), "a completed: b is due");
}

/// Cycles cannot form: dependencies must exist first, specs never change, and a job that
/// others depend on cannot be deleted (so it cannot be recreated with new dependencies).
#[test]
fn a_cycle_cannot_be_built_through_a_recreated_job() {
    let mut state = State::new();
    create(&mut state, once("a", T0 + 10)).expect("created");
    let mut b = once("b", T0 + 10);
    b.depends_on = vec!["a".into()];
    create(&mut state, b).expect("created");
    // Recreating "a" depending on "b" would close a → b → a; "a" cannot even be deleted.
    assert!(matches!(state.apply(Command::Delete { id: "a".into(), now_ms: 0 }), Err(ApplyError::Required { .. })));
    let mut c = once("c", T0 + 10);
    c.depends_on = vec!["b".into()];
    create(&mut state, c).expect("created");
    let mut a_again = once("a", T0 + 10);
    a_again.depends_on = vec!["c".into()];
    assert_eq!(create(&mut state, a_again), Err(ApplyError::Conflict("a".into())));
}

fn cron(id: &str, expression: &str, misfire: &str, overlap: &str) -> JobSpec {
    spec(
        json!({"id": id, "cron": expression, "time_zone": "UTC", "misfire": misfire, "overlap": overlap, "url": "https://e.com"}),
    )
}

#[test]
fn cron_fires_follow_the_committed_fire_time_and_end_at_the_end() {
    let mut state = State::new();
    let mut job = cron("c", "*/10 * * * * *", "fire_once", "skip"); // every 10 s
    let Some(first) = (create(&mut state, job.clone()).ok()).and(state.next_due("c")).map(|(at, _)| at) else {
        panic!("a first fire")
    };
    assert_eq!(first % 10_000, 0);
    // The leader starts it 3 s late: the next fire is still 10 s after the committed one.
    start(&mut state, "c", first, 1, first + 3_000).expect("started");
    finish(&mut state, "c", first, 1, first + 3_100, 200).expect("recorded");
    assert_eq!(state.next_due("c"), Some((first + 10_000, Due::NewFire { fire_ms: first + 10_000 })));
    assert_eq!(state.job("c").expect("job").status, Status::Pending);
    // With an end before the second fire, the job completes after the first.
    job.id = "e".into();
    if let sundial_engine::job::Schedule::Cron(c) = &mut job.schedule {
        c.end_ms = Some(first + 5_000);
    }
    create(&mut state, job).expect("created");
    start(&mut state, "e", first, 1, first).expect("started");
    finish(&mut state, "e", first, 1, first + 10, 200).expect("recorded");
    assert_eq!(state.job("e").expect("job").status, Status::Completed);
}

#[test]
fn misfires_after_downtime_follow_the_policy() {
    // Every 10 s; no leader for 125 s (past the 60 s misfire threshold): the first fire and
    // the twelve after it (to +120 s) are late when a leader finally starts one.
    for (policy, missed, next_offset, runs) in
        [("fire_once", 12, 120_000, true), ("skip", 13, 130_000, false), ("fire_all", 0, 0, true)]
    {
        let mut state = State::new();
        create(&mut state, cron("c", "*/10 * * * * *", policy, "skip")).expect("created");
        let (first, _) = state.next_due("c").expect("due");
        let now = first + 125_000;
        let applied = start(&mut state, "c", first, 1, now).expect("applied");
        let job = state.job("c").expect("job");
        if runs && policy == "fire_all" {
            // Each missed fire runs, oldest first: this one now, the next right after.
            assert_eq!(applied, Applied::Done);
            assert_eq!(job.next_fire_ms, Some(first + 10_000));
        } else {
            // fire_once: the thirteen coalesce into the latest (+120 s), due now; skip: all
            // are missed and the next is in the future.
            assert_eq!(applied, Applied::Missed { count: missed }, "{policy}");
            assert_eq!(job.next_fire_ms, Some(first + next_offset), "{policy}");
            assert_eq!(state.next_due("c").map(|(at, _)| at <= now), Some(runs), "{policy}");
        }
        assert_eq!(job.life().fires_missed, missed, "{policy}");
        assert!(state.counts_match_jobs());
    }
}

#[test]
fn fire_all_runs_missed_fires_up_to_its_cap_then_skips() {
    let mut state = State::new();
    let spec = spec(
        json!({"id": "c", "cron": "*/10 * * * * *", "misfire": "fire_all", "misfire_max": 3, "url": "https://e.com"}),
    );
    create(&mut state, spec).expect("created");
    let (first, _) = state.next_due("c").expect("due");
    let now = first + 125_000;
    let mut ran = Vec::new();
    // Bounded: at most 10 fires.
    for _ in 0..10 {
        let Some((due, Due::NewFire { fire_ms })) = state.next_due("c") else { break };
        if due > now {
            break;
        }
        if start(&mut state, "c", fire_ms, 1, now) == Ok(Applied::Done) {
            ran.push(fire_ms - first);
            finish(&mut state, "c", fire_ms, 1, now, 200).expect("recorded");
        }
    }
    assert_eq!(ran, [0, 10_000, 20_000], "three late fires ran back to back, oldest first");
    let job = state.job("c").expect("job");
    assert_eq!(job.next_fire_ms, Some(first + 130_000), "then the rest were skipped");
    assert_eq!(job.life().fires_missed, 10, "+30 s … +120 s recorded missed");
}

#[test]
fn fires_older_than_the_catch_up_window_are_missed_but_recent_ones_still_run() {
    let mut state = State::new();
    create(&mut state, cron("c", "0 * * * * *", "fire_once", "skip")).expect("created"); // every minute
    let (first, _) = state.next_due("c").expect("due");
    // Two days without a leader: the first day's fires are beyond the 24 h window.
    let now = first + 2 * 24 * 3_600_000 + 30_000;
    let applied = start(&mut state, "c", first, 1, now).expect("applied");
    assert!(matches!(applied, Applied::Missed { count } if count >= 1_000), "{applied:?}");
    let (due, _) = state.next_due("c").expect("due");
    assert_eq!(due, now - 30_000, "the latest fire, seconds old, still runs (fire_once)");
    assert_eq!(start(&mut state, "c", due, 1, now), Ok(Applied::Done));
}

#[test]
fn a_redriven_fire_gets_a_fresh_deadline() {
    let mut state = State::new();
    let at = T0 + 1_000;
    let job = spec(
        json!({"id": "d", "run_at": at, "url": "https://e.com", "deadline_ms": 5000, "retry": {"max_attempts": 3}}),
    );
    create(&mut state, job).expect("created");
    start(&mut state, "d", at, 1, at).expect("started");
    finish(&mut state, "d", at, 1, at + 10, 404).expect("dead-lettered");
    // An hour later, redriven: its deadline counts from the redrive, so a 500 is retried.
    let later = at + 3_600_000;
    state.apply(Command::Redrive { id: "d".into(), fire_ms: at, now_ms: later }).expect("redriven");
    start(&mut state, "d", at, 1, later).expect("started");
    finish(&mut state, "d", at, 1, later + 10, 500).expect("recorded");
    assert_eq!(state.next_due("d"), Some((later + 1_010, Due::Retry { fire_ms: at, attempt: 2 })));
}

#[test]
fn resume_after_a_long_pause_follows_the_misfire_policy() {
    let mut state = State::new();
    create(&mut state, cron("c", "*/10 * * * * *", "skip", "skip")).expect("created");
    let (first, _) = state.next_due("c").expect("due");
    state.apply(Command::Pause { id: "c".into() }).expect("paused");
    state.apply(Command::Resume { id: "c".into(), now_ms: first + 95_000 }).expect("resumed");
    let job = state.job("c").expect("job");
    assert_eq!((job.next_fire_ms, job.life().fires_missed), (Some(first + 100_000), 10));
}

#[test]
fn overlap_skip_holds_the_next_fire_until_the_current_one_ends() {
    let mut state = State::new();
    create(&mut state, cron("c", "*/10 * * * * *", "fire_once", "skip")).expect("created");
    let (first, _) = state.next_due("c").expect("due");
    start(&mut state, "c", first, 1, first).expect("started");
    finish(&mut state, "c", first, 1, first + 10, 500).expect("will retry");
    assert_eq!(
        state.next_due("c"),
        Some((first + 1_010, Due::Retry { fire_ms: first, attempt: 2 })),
        "the retry first"
    );
    let mut allow = State::new();
    create(&mut allow, cron("c", "*/10 * * * * *", "fire_once", "allow")).expect("created");
    start(&mut allow, "c", first, 1, first).expect("started");
    assert_eq!(
        allow.next_due("c"),
        Some((first + 10_000, Due::NewFire { fire_ms: first + 10_000 })),
        "concurrent fires"
    );
}

#[test]
fn cancel_pause_resume_and_counts() {
    let mut state = State::new();
    create(&mut state, once("a", T0 + 100)).expect("created");
    create(&mut state, once("b", T0 + 100)).expect("created");
    state.apply(Command::Pause { id: "a".into() }).expect("paused");
    assert_eq!(state.next_due("a"), None);
    state.apply(Command::Resume { id: "a".into(), now_ms: T0 + 50 }).expect("resumed");
    assert!(state.next_due("a").is_some());
    state.apply(Command::Cancel { id: "b".into(), now_ms: T0 + 60 }).expect("cancelled");
    assert_eq!(state.next_due("b"), None);
    assert!(matches!(
        state.apply(Command::Cancel { id: "b".into(), now_ms: T0 }),
        Err(ApplyError::InvalidState { .. })
    ));
    assert_eq!((state.count(Status::Pending), state.count(Status::Cancelled)), (1, 1));
    state.apply(Command::Delete { id: "b".into(), now_ms: 0 }).expect("deleted");
    assert_eq!(state.count(Status::Cancelled), 0);
    assert_eq!(state.apply(Command::Delete { id: "b".into(), now_ms: 0 }), Err(ApplyError::NotFound("b".into())));
}

#[test]
fn a_new_leader_finds_the_attempts_left_in_flight() {
    let mut state = State::new();
    create(&mut state, once("a", T0 + 10)).expect("created");
    start(&mut state, "a", T0 + 10, 1, T0 + 10).expect("started");
    assert_eq!(state.in_flight(), vec![("a".to_string(), T0 + 10, 1)]);
    // The new leader re-runs attempt 1 of the same fire (same idempotency key) as it is:
    // without a new start (a second start of it would be a duplicate, refused).
    assert!(matches!(start(&mut state, "a", T0 + 10, 1, T0 + 2_000), Err(ApplyError::StaleAttempt { .. })));
    finish(&mut state, "a", T0 + 10, 1, T0 + 2_100, 200).expect("the re-run's outcome is recorded");
    assert!(state.in_flight().is_empty());
}

// ---- determinism ----------------------------------------------------------------------

/// A command over a small pool of jobs and times, so sequences hit real transitions.
fn command(ids: &'static [&'static str]) -> impl Strategy<Value = Command> {
    let id = prop::sample::select(ids).prop_map(str::to_string);
    let time = (0u64..200).prop_map(|s| T0 + s * 1_000);
    prop_oneof![
        (id.clone(), time.clone(), prop::bool::ANY, 0usize..3).prop_map(|(id, at, cron_job, deps)| {
            let mut spec = if cron_job {
                cron(&id, "*/20 * * * * *", ["fire_once", "skip", "fire_all"][deps % 3], ["skip", "allow"][deps % 2])
            } else {
                let mut spec = once(&id, at);
                spec.depends_on =
                    ["a", "b"].iter().take(deps % 2).filter(|d| **d != id).map(|d| d.to_string()).collect();
                spec
            };
            if deps == 2 {
                spec.flow = Some(sundial_engine::job::Flow {
                    key: "k".into(),
                    parallelism: Some(1),
                    rate: None,
                    period_ms: None,
                    ordered: Some(true),
                });
                spec.callbacks.on_success = Some("https://example.com/ok".into());
                spec.callbacks.on_failure = Some("https://example.com/failed".into());
            }
            Command::Create { spec: PackedSpec::of(&spec), now_ms: T0, dedup_window_ms: None }
        }),
        (id.clone(), time.clone()).prop_map(|(id, now_ms)| Command::Cancel { id, now_ms }),
        id.clone().prop_map(|id| Command::Delete { id, now_ms: 0 }),
        id.clone().prop_map(|id| Command::Pause { id }),
        (id.clone(), time.clone()).prop_map(|(id, now_ms)| Command::Resume { id, now_ms }),
        (id.clone(), time.clone(), 1u32..4, time.clone())
            .prop_map(|(id, fire_ms, attempt, now_ms)| Command::FireStarted { id, fire_ms, attempt, node: 1, now_ms }),
        (id.clone(), time.clone(), 1u32..4, time.clone(), prop::sample::select(vec![200u16, 429, 500, 404])).prop_map(
            |(id, fire_ms, attempt, at, status)| Command::AttemptFinished {
                id,
                fire_ms,
                attempt,
                node: 2,
                started_ms: at,
                finished_ms: at + 7,
                outcome: Outcome::Response {
                    status,
                    body: vec![1, 2, 3],
                    retry_after_ms: None,
                    no_retry: status == 429
                },
                retry_at_ms: at + 2_000,
            }
        ),
        (id.clone(), time.clone(), time.clone()).prop_map(|(id, fire_ms, now_ms)| Command::Redrive {
            id,
            fire_ms,
            now_ms
        }),
        id.clone().prop_map(|id| Command::Purge { id: Some(id) }),
        (time.clone(), 0u64..30, 0u64..60, 1u32..4).prop_map(|(now_ms, retention_s, window_s, max)| Command::Expire {
            now_ms,
            retention_ms: retention_s * 1_000,
            dedup_window_ms: window_s * 1_000,
            max
        }),
        (id.clone(), time.clone()).prop_map(|(id, now_ms)| Command::Trigger { id, now_ms }),
        (id.clone(), time.clone(), 0u64..120).prop_map(|(id, now_ms, span_s)| Command::Backfill {
            id,
            from_ms: now_ms.saturating_sub(span_s * 1_000),
            to_ms: now_ms,
            now_ms
        }),
        (id.clone(), time.clone()).prop_map(|(id, now_ms)| Command::RedriveJob { id, now_ms }),
        (id.clone(), time.clone(), prop::bool::ANY).prop_map(|(id, at, cron_job)| {
            let mut spec = if cron_job { cron(&id, "*/30 * * * * *", "skip", "allow") } else { once(&id, at) };
            if let sundial_engine::job::Schedule::Cron(c) = &mut spec.schedule {
                c.pause_after_failures = Some(2);
            }
            Command::Upsert { spec: PackedSpec::of(&spec), now_ms: at }
        }),
        (id.clone(), time.clone(), 0u64..60).prop_map(|(id, now_ms, window_s)| {
            Command::Create {
                spec: PackedSpec::of(&once(&id, now_ms + 5_000)),
                now_ms,
                dedup_window_ms: Some(window_s * 1_000),
            }
        }),
        (id.clone(), time.clone()).prop_map(|(id, now_ms)| Command::Delete { id, now_ms }),
        Just(Command::PauseKey { key: "k".into() }),
        time.clone().prop_map(|now_ms| Command::ResumeKey { key: "k".into(), now_ms }),
        (id, time, prop::sample::select(vec![200u16, 500])).prop_map(|(id, at, status)| Command::CallbackFinished {
            id,
            fire_ms: 0,
            attempt: 1,
            started_ms: at,
            finished_ms: at + 3,
            outcome: Outcome::Response { status, body: Vec::new(), retry_after_ms: None, no_retry: false },
            retry_at_ms: at + 1_000,
        }),
    ]
}

/// Turns a command into one that is valid now, often: starts and finishes follow what is due,
/// so random sequences exercise whole fires rather than only refusals.
fn steer(state: &State, command: Command) -> Command {
    match command {
        Command::FireStarted { id, now_ms, node, .. } => match state.next_due(&id) {
            Some((due_ms, Due::NewFire { fire_ms })) => {
                Command::FireStarted { id, fire_ms, attempt: 1, node, now_ms: now_ms.max(due_ms) }
            }
            Some((due_ms, Due::Retry { fire_ms, attempt })) => {
                Command::FireStarted { id, fire_ms, attempt, node, now_ms: now_ms.max(due_ms) }
            }
            Some((due_ms, Due::Callback { fire_ms, attempt })) => {
                Command::CallbackStarted { id, fire_ms, attempt, now_ms: now_ms.max(due_ms) }
            }
            None => Command::FireStarted { id, fire_ms: 0, attempt: 1, node, now_ms },
        },
        Command::CallbackFinished { id, started_ms, finished_ms, outcome, retry_at_ms, .. } => {
            let (fire_ms, attempt) = state
                .callbacks_in_flight()
                .into_iter()
                .find(|(job, _, _)| *job == id)
                .map_or((0, 1), |(_, fire_ms, attempt)| (fire_ms, attempt));
            Command::CallbackFinished { id, fire_ms, attempt, started_ms, finished_ms, outcome, retry_at_ms }
        }
        Command::AttemptFinished { id, node, started_ms, finished_ms, outcome, retry_at_ms, .. } => {
            let (fire_ms, attempt) = state
                .in_flight()
                .into_iter()
                .find(|(job, _, _)| *job == id)
                .map_or((0, 1), |(_, fire_ms, attempt)| (fire_ms, attempt));
            let finished_ms = finished_ms.max(fire_ms);
            Command::AttemptFinished {
                id,
                fire_ms,
                attempt,
                node,
                started_ms,
                finished_ms,
                outcome,
                retry_at_ms: retry_at_ms.max(finished_ms),
            }
        }
        other => other,
    }
}

/// A state restored from a linked snapshot of `state` (whose specs live in `store`): the
/// specs stay where they are, found by segment number (the lengths and checksums the shell
/// checks are not the core's to check).
fn restore_linked_copy(state: &State, store: &MemSpecStore) -> State {
    let mut copy = state.copy_for_snapshot();
    let segments = copy.link();
    let held = store.segments.lock().expect("unpoisoned");
    let len_of = |number: u64| held[number as usize].upgrade().expect("a linked segment lives").bytes.len() as u64;
    let list: Vec<LinkedSegment> = segments
        .iter()
        .map(|s| LinkedSegment { number: s.number(), len_bytes: len_of(s.number()), crc32c: 0 })
        .collect();
    let bytes = copy.encode_linked(&list, 8, 0).expect("encodes");
    let pad = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    assert_eq!((8 + 16 + (list.len() * 24).next_multiple_of(16) + pad) % 16, 0, "the archive lands aligned");
    assert_eq!(bytes[0], SNAPSHOT_FORMAT_LINKED);
    assert_eq!(State::linked_segments(&bytes).expect("lists"), list);
    let by_number = segments.into_iter().map(|s| (s.number(), (s.clone(), len_of(s.number())))).collect();
    if !list.is_empty() {
        let refused = State::restore(&bytes).expect_err("a linked snapshot is not whole without its segments");
        assert!(refused.to_string().contains("spec segment"), "{refused}");
    }
    State::restore_linked(&bytes, &by_number).expect("restores")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn replicas_and_a_restored_snapshot_reach_the_same_digest(
        commands in prop::collection::vec(command(&["a", "b", "c"]), 1..120),
        snapshot_at in 0usize..120,
    ) {
        let mut first = State::new();
        // The second replica keeps its specs in a store; where they live changes nothing.
        let mut second = State::new();
        let store = MemSpecStore::default();
        second.attach_spec_store(Box::new(store.clone()));
        second.attach_tombstone_store(Box::new(MemTombstoneStore));
        let mut restored: Option<State> = None;
        // A fourth restored from a linked snapshot of the second: specs left in its store.
        let mut linked: Option<State> = None;
        let mut copied = None;
        for (position, command) in commands.into_iter().enumerate() {
            let command = steer(&first, command);
            let before = first.digest();
            let a = first.apply(command.clone());
            let b = second.apply(command.clone());
            // A partition stores the specs of a turn's creates after applying them; a turn
            // here is one to three commands.
            if position % 3 != 1 {
                second.store_new_specs();
            }
            prop_assert_eq!(&a, &b);
            if a.is_err() {
                prop_assert_eq!(first.digest(), before, "a refused command changed the state");
            }
            prop_assert!(first.counts_match_jobs());
            if let Some(third) = restored.as_mut() {
                prop_assert_eq!(third.apply(command.clone()), a.clone());
            }
            if let Some(fourth) = linked.as_mut() {
                prop_assert_eq!(fourth.apply(command), a);
            }
            if position == snapshot_at {
                let then = first.snapshot().expect("snapshot");
                restored = Some(State::restore(&then).expect("restores"));
                linked = Some(restore_linked_copy(&second, &store));
                // A copy to encode later (as a snapshot thread does), taken before the repack.
                copied = Some((second.copy_for_snapshot(), then));
                // Every spec the store holds moves, as a repack does it.
                store.ask_repack();
                let mut cursor = None;
                loop {
                    let (next, _) = second.repack_specs(cursor, 2);
                    if next.is_none() { break }
                    cursor = next;
                }
            }
            prop_assert_eq!(first.digest(), second.digest());
        }
        second.store_new_specs();
        prop_assert_eq!(second.specs_in_heap(), 0);
        prop_assert_eq!(first.snapshot().expect("snapshot"), second.snapshot().expect("snapshot"));
        if let Some((copy, then)) = copied {
            let encoded = copy.encode(0).expect("encodes");
            prop_assert!(encoded.as_slice() == then.as_slice(), "a copy encodes the state it was taken from");
        }
        let mut from_store = State::restore(&second.snapshot().expect("snapshot")).expect("restores");
        from_store.attach_spec_store(Box::new(MemSpecStore::default()));
        prop_assert_eq!(from_store.specs_in_heap(), 0);
        prop_assert_eq!(from_store.digest(), first.digest());
        if let Some(third) = restored {
            prop_assert_eq!(third.digest(), first.digest());
            prop_assert_eq!(&third, &first);
        }
        if let Some(fourth) = linked {
            prop_assert_eq!(fourth.digest(), first.digest());
            prop_assert_eq!(&fourth, &first);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A leader sends a fire before its start commits only when `starts_as_proposed` says
    /// the start will start it. Over random histories, every start a job could be asked for
    /// (its next fire, now or past the catch-up window; the next and a later attempt of
    /// each fire it has) that is said to start is applied to a copy of the state: it must
    /// apply `Done` with that attempt in flight (a wrong yes would be a delivery the log
    /// never started).
    #[test]
    fn a_start_said_to_start_before_it_is_applied_does_start(
        commands in prop::collection::vec(command(&["a", "b", "c"]), 1..120),
    ) {
        let mut state = State::new();
        let late_ms = 25 * 3600 * 1000;
        for command in commands {
            let now_ms = match &command {
                Command::FireStarted { now_ms, .. } | Command::Cancel { now_ms, .. } => *now_ms,
                _ => T0,
            };
            let _ = state.apply(steer(&state, command));
            for id in ["a", "b", "c"] {
                let Some(job) = state.job(id) else { continue };
                let mut asked: Vec<(u64, u32, u64)> = Vec::new();
                if let Some(fire_ms) = job.next_fire_ms {
                    asked.extend([(fire_ms, 1, fire_ms.max(now_ms)), (fire_ms, 1, fire_ms + late_ms)]);
                }
                for (fire_ms, fire) in &job.life().active {
                    asked.extend([(*fire_ms, fire.attempts + 1, now_ms), (*fire_ms, fire.attempts + 2, now_ms)]);
                }
                for (fire_ms, attempt, at_ms) in asked {
                    if !state.starts_as_proposed(id, fire_ms, attempt, at_ms) {
                        continue;
                    }
                    let mut applied = state.clone();
                    let start = Command::FireStarted { id: id.into(), fire_ms, attempt, node: 1, now_ms: at_ms };
                    let verdict = applied.apply(start);
                    prop_assert!(matches!(verdict, Ok(Applied::Done)), "{id} {fire_ms} {attempt} at {at_ms}: {verdict:?}");
                    prop_assert!(applied.in_flight().contains(&(id.to_string(), fire_ms, attempt)));
                }
            }
        }
    }
}

#[test]
fn a_start_is_said_to_start_only_for_a_due_one_time_job_free_to_fire() {
    let mut state = State::new();
    create(&mut state, once("free", T0 + 10)).expect("created");
    assert!(state.starts_as_proposed("free", T0 + 10, 1, T0 + 10));
    assert!(!state.starts_as_proposed("free", T0 + 11, 1, T0 + 11), "another fire time");
    assert!(!state.starts_as_proposed("free", T0 + 10, 2, T0 + 10), "an attempt not next");
    assert!(!state.starts_as_proposed("missing", T0 + 10, 1, T0 + 10));
    let day_ms = 24 * 3600 * 1000;
    assert!(!state.starts_as_proposed("free", T0 + 10, 1, T0 + 11 + day_ms), "past the catch-up window");
    start(&mut state, "free", T0 + 10, 1, T0 + 10).expect("started");
    assert!(!state.starts_as_proposed("free", T0 + 10, 1, T0 + 10), "in flight");
    finish(&mut state, "free", T0 + 10, 1, T0 + 20, 500).expect("failed once");
    assert!(state.starts_as_proposed("free", T0 + 10, 2, T0 + 5_000), "its retry");

    create(&mut state, once("paused", T0 + 10)).expect("created");
    state.apply(Command::Pause { id: "paused".into() }).expect("paused");
    assert!(!state.starts_as_proposed("paused", T0 + 10, 1, T0 + 10));

    let mut dependent = once("dependent", T0 + 10);
    dependent.depends_on = vec!["free".into()];
    create(&mut state, dependent).expect("created");
    assert!(!state.starts_as_proposed("dependent", T0 + 10, 1, T0 + 10), "dependencies take the committed path");

    create(&mut state, cron("nightly", "*/20 * * * * *", "fire_once", "skip")).expect("created");
    let (_, due) = state.next_due("nightly").expect("a cron job is due some time");
    let Due::NewFire { fire_ms } = due else { panic!("a first fire: {due:?}") };
    assert!(!state.starts_as_proposed("nightly", fire_ms, 1, fire_ms), "a cron fire takes the committed path");
}

#[test]
fn a_json_snapshot_of_an_earlier_build_restores_to_the_same_state_and_an_unknown_format_is_refused() {
    let mut state = State::new();
    create(&mut state, once("a", T0 + 1_000)).expect("created");
    create(&mut state, once("b", T0 + 1_000)).expect("created");
    start(&mut state, "a", T0 + 1_000, 1, T0 + 1_000).expect("started");
    finish(&mut state, "a", T0 + 1_000, 1, T0 + 1_005, 500).expect("finished");
    let from_json = State::restore(&serde_json::to_vec(&state).expect("json")).expect("format 0 restores");
    let from_archive = State::restore(&state.snapshot().expect("snapshot")).expect("format 4 restores");
    assert_eq!(from_json, state);
    assert_eq!(from_archive, state);
    assert_eq!(state.snapshot().expect("snapshot")[0], SNAPSHOT_FORMAT);
    let mut future = state.snapshot().expect("snapshot");
    future[0] = SNAPSHOT_FORMAT_LINKED + 1;
    let refused = State::restore(&future).expect_err("unknown format");
    assert_eq!(refused, RestoreError::UnknownFormat { found: SNAPSHOT_FORMAT_LINKED + 1 });
    assert!(refused.to_string().contains("snapshot format 6 is unknown"), "{refused}");
    for old in [1, 2, 3] {
        let mut retired = state.snapshot().expect("snapshot");
        retired[0] = old;
        let refused = State::restore(&retired).expect_err("formats 1 to 3 are no longer read");
        assert_eq!(refused, RestoreError::Retired { found: old });
        assert!(refused.to_string().contains(&format!("snapshot format {old} was written by a development build")));
        assert!(refused.to_string().contains("reads formats 0, 4 and 5"), "{refused}");
    }
    let mut cut = state.snapshot().expect("snapshot");
    cut.truncate(cut.len() / 2);
    assert!(matches!(State::restore(&cut), Err(RestoreError::Damaged { format: 4, .. })), "never misread");
}

/// The archived layout of a snapshot: a change shows here before a node reads an old
/// snapshot with a new layout (rkyv has no schema evolution).
#[test]
fn the_archived_layout_of_snapshot_format_4_is_pinned() {
    use sha2::{Digest, Sha256};
    // Every kind of thing a state holds, so each type's layout is in the bytes: a dead
    // letter, a callback waiting, a fire in flight, a flow key, dependents, a tombstone,
    // an expired job's order, history.
    let mut state = State::new();
    let at = T0 + 1_000;
    let failing = spec(json!({"id": "f", "run_at": at, "url": "https://example.com/f", "retry": {"max_attempts": 1},
        "callbacks": {"on_failure": "https://example.com/cb"}}));
    create(&mut state, failing).expect("created");
    let keyed = spec(
        json!({"id": "k", "run_at": at, "url": "https://example.com/k", "flow": {"key": "key", "parallelism": 2}}),
    );
    create(&mut state, keyed).expect("created");
    let waiting = spec(json!({"id": "w", "run_at": at + 9_000, "url": "https://example.com/w", "depends_on": ["k"]}));
    create(&mut state, waiting).expect("created");
    create(&mut state, cron("c", "*/30 * * * * *", "skip", "allow")).expect("created");
    start(&mut state, "f", at, 1, at).expect("started");
    finish(&mut state, "f", at, 1, at + 5, 500).expect("dead-lettered, its callback waiting");
    start(&mut state, "k", at, 1, at).expect("in flight");
    state.apply(Command::Delete { id: "c".into(), now_ms: at + 10 }).expect("deleted: a tombstone");
    state.apply(Command::PauseKey { key: "idle".into() }).expect("a key of no jobs");
    assert!(state.dead_letters().count() == 1 && state.job("f").is_some_and(|job| !job.life().callbacks.is_empty()));
    assert!(state.job("k").is_some_and(|job| !job.life().active.is_empty()) && state.tombstone_count() == 1);
    let digest: String =
        Sha256::digest(state.snapshot().expect("snapshot")).iter().take(8).map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, "08f8065b25106817", "the archived layout of the state changed: give it a new SNAPSHOT_FORMAT");
}

// ---- lifecycle verbs, receiver-controlled retries, auto-pause, dedup window ----------------

#[test]
fn a_receiver_saying_do_not_retry_dead_letters_the_fire_after_one_attempt() {
    let mut state = State::new();
    let at = T0 + 1_000;
    create(&mut state, once("a", at)).expect("created");
    start(&mut state, "a", at, 1, at).expect("started");
    let outcome = Outcome::Response { status: 503, body: Vec::new(), retry_after_ms: None, no_retry: true };
    let finished = Command::AttemptFinished {
        id: "a".into(),
        fire_ms: at,
        attempt: 1,
        node: 1,
        started_ms: at,
        finished_ms: at + 5,
        outcome,
        retry_at_ms: at + 1_000,
    };
    state.apply(finished).expect("recorded");
    assert_eq!(state.job("a").expect("job").status, Status::Failed, "503 is retryable, but the receiver said no");
    let (_, _, letter) = state.dead_letters().next().expect("dead-lettered");
    assert_eq!((letter.attempts, letter.reason.as_str()), (1, "the receiver asked not to retry"));
}

#[test]
fn a_trigger_adds_one_fire_with_its_own_key_and_the_schedule_goes_on() {
    let mut state = State::new();
    let at = T0 + 60_000;
    create(&mut state, once("a", at)).expect("created");
    let now = T0 + 1_000;
    assert_eq!(
        state.apply(Command::Trigger { id: "a".into(), now_ms: now }),
        Ok(Applied::Fires { fire_ms: vec![now] })
    );
    // A second trigger in the same millisecond gets the next free fire time.
    let second = state.apply(Command::Trigger { id: "a".into(), now_ms: now }).expect("triggered");
    assert_eq!(second, Applied::Fires { fire_ms: vec![now + 1] });
    assert_eq!(run_next(&mut state, "a", 200), (now, 1));
    assert_eq!(run_next(&mut state, "a", 200), (now + 1, 1));
    let job = state.job("a").expect("job");
    assert_eq!((job.status, job.next_fire_ms), (Status::Pending, Some(at)), "the scheduled fire is still ahead");
    assert_eq!(run_next(&mut state, "a", 200), (at, 1));
    assert_eq!(state.job("a").expect("job").status, Status::Completed);
    state.apply(Command::Pause { id: "a".into() }).expect_err("a finished job cannot be paused");
    // A completed job can be triggered again; a cancelled or paused one cannot.
    state.apply(Command::Trigger { id: "a".into(), now_ms: at + 5 }).expect("a completed job fires again");
    create(&mut state, once("b", at)).expect("created");
    state.apply(Command::Pause { id: "b".into() }).expect("paused");
    assert!(matches!(
        state.apply(Command::Trigger { id: "b".into(), now_ms: now }),
        Err(ApplyError::InvalidState { .. })
    ));
}

#[test]
fn a_backfill_adds_the_schedules_occurrences_in_the_range_once_each() {
    let mut state = State::new();
    create(&mut state, cron("c", "*/20 * * * * *", "skip", "allow")).expect("created");
    let now = T0 + 10_000; // before the next scheduled fire (T0 + 20 s)
    let from = T0 - 60_000; // T0 is a whole 20 s
    let added = state.apply(Command::Backfill { id: "c".into(), from_ms: from, to_ms: from + 60_000, now_ms: now });
    let fires: Vec<u64> = (0..=3).map(|i| from + i * 20_000).collect();
    assert_eq!(added, Ok(Applied::Fires { fire_ms: fires.clone() }));
    // The same range again adds nothing while those fires are active.
    let again = state.apply(Command::Backfill { id: "c".into(), from_ms: from, to_ms: from + 60_000, now_ms: now });
    assert_eq!(again, Ok(Applied::Fires { fire_ms: vec![] }));
    let ran: Vec<u64> = (0..4).map(|_| run_next(&mut state, "c", 200).0).collect();
    assert_eq!(ran, fires, "oldest first");
    let refused =
        |from_ms, to_ms| state.clone().apply(Command::Backfill { id: "c".into(), from_ms, to_ms, now_ms: now });
    assert!(matches!(refused(now, now + 1), Err(ApplyError::Invalid { field, .. }) if field == "to"), "future");
    assert!(matches!(refused(now, now - 1), Err(ApplyError::Invalid { field, .. }) if field == "from"));
    let too_many = refused(now - 24 * 3600 * 1000, now);
    assert!(matches!(too_many, Err(ApplyError::Invalid { rule, .. }) if rule.contains("more than 1000")));
    create(&mut state, once("o", T0)).expect("created");
    let once_job = state.apply(Command::Backfill { id: "o".into(), from_ms: T0, to_ms: now, now_ms: now });
    assert!(matches!(once_job, Err(ApplyError::Invalid { field, .. }) if field == "id"));
}

#[test]
fn an_upsert_replaces_the_schedule_of_a_live_job_and_creates_a_missing_one() {
    let mut state = State::new();
    let upsert =
        |state: &mut State, spec: JobSpec| state.apply(Command::Upsert { spec: PackedSpec::of(&spec), now_ms: T0 });
    assert_eq!(upsert(&mut state, once("a", T0 + 10_000)), Ok(Applied::Created));
    assert_eq!(upsert(&mut state, once("a", T0 + 10_000)), Ok(Applied::AlreadyExists));
    assert_eq!(upsert(&mut state, once("a", T0 + 20_000)), Ok(Applied::Replaced));
    assert_eq!(state.job("a").expect("job").next_fire_ms, Some(T0 + 20_000));
    assert_eq!(upsert(&mut state, cron("a", "*/20 * * * * *", "skip", "skip")), Ok(Applied::Replaced));
    let job = state.job("a").expect("job");
    assert_eq!((job.status, job.next_fire_ms), (Status::Pending, Some(T0 + 20_000)));
    assert!(state.counts_match_jobs());
}

#[test]
fn a_finished_jobs_id_is_a_duplicate_for_the_window_then_free_even_after_a_delete() {
    let mut state = State::new();
    let window = Some(60_000);
    let create_at = |state: &mut State, now_ms: u64, at_ms: u64| {
        state.apply(Command::Create { spec: PackedSpec::of(&once("a", at_ms)), now_ms, dedup_window_ms: window })
    };
    create_at(&mut state, T0, T0 + 1_000).expect("created");
    assert_eq!(create_at(&mut state, T0 + 10, T0 + 1_000), Ok(Applied::AlreadyExists), "live: idempotent");
    run_next(&mut state, "a", 200); // finished at T0 + 1_010
    let duplicate = create_at(&mut state, T0 + 5_000, T0 + 9_000);
    assert!(matches!(duplicate, Err(ApplyError::Duplicate { until_ms, .. }) if until_ms == T0 + 61_010));
    state.apply(Command::Delete { id: "a".into(), now_ms: T0 + 6_000 }).expect("deleted");
    let digest = state.digest();
    let after_delete = create_at(&mut state, T0 + 7_000, T0 + 9_000);
    assert!(matches!(after_delete, Err(ApplyError::Duplicate { .. })), "a delete does not free the id");
    assert_eq!(state.digest(), digest, "a refused create changes nothing");
    // The window survives a snapshot and restore (a restart, or a follower catching up).
    let mut restored = State::restore(&state.snapshot().expect("snapshot")).expect("restores");
    assert!(matches!(create_at(&mut restored, T0 + 8_000, T0 + 9_000), Err(ApplyError::Duplicate { .. })));
    assert_eq!(create_at(&mut restored, T0 + 61_010, T0 + 70_000), Ok(Applied::Created), "the window passed");
    assert_eq!(restored.tombstone_count(), 0, "the tombstone was dropped with the window");
}

#[test]
fn a_cron_job_pauses_itself_after_n_failed_fires_in_a_row_and_resume_resets_the_count() {
    let mut state = State::new();
    let mut spec = cron("c", "*/20 * * * * *", "skip", "allow");
    if let sundial_engine::job::Schedule::Cron(c) = &mut spec.schedule {
        c.pause_after_failures = Some(2);
    }
    spec.retry.max_attempts = 1;
    create(&mut state, spec).expect("created");
    run_next(&mut state, "c", 500);
    run_next(&mut state, "c", 200); // a success resets the count
    run_next(&mut state, "c", 500);
    assert!(!state.job("c").expect("job").paused);
    run_next(&mut state, "c", 500);
    let job = state.job("c").expect("job");
    assert!(job.paused, "paused after 2 failed fires in a row");
    assert_eq!(job.life().paused_reason.as_deref(), Some("paused itself after 2 failed fires in a row"));
    assert_eq!(
        job.life().history.back().and_then(|e| e.note.clone()),
        job.life().paused_reason,
        "the reason is in the history"
    );
    assert_eq!((state.auto_paused(), state.next_due("c")), (1, None));
    state.apply(Command::Resume { id: "c".into(), now_ms: T0 + 500_000 }).expect("resumed");
    let job = state.job("c").expect("job");
    assert_eq!(
        (job.paused, job.life().paused_reason.clone(), job.life().failures_in_a_row, state.auto_paused()),
        (false, None, 0, 0)
    );
    assert!(state.counts_match_jobs());
}

#[test]
fn redriving_a_job_puts_back_every_one_of_its_dead_letters() {
    let mut state = State::new();
    let mut spec = cron("c", "*/20 * * * * *", "skip", "allow");
    spec.retry.max_attempts = 1;
    create(&mut state, spec).expect("created");
    let first = run_next(&mut state, "c", 500).0;
    let second = run_next(&mut state, "c", 500).0;
    assert_eq!(state.dead_letters().count(), 2);
    let redriven = state.apply(Command::RedriveJob { id: "c".into(), now_ms: T0 + 50_000 });
    assert_eq!(redriven, Ok(Applied::Fires { fire_ms: vec![first, second] }));
    assert_eq!(state.dead_letters().count(), 0);
    assert_eq!(run_next(&mut state, "c", 200).0, first);
}

#[test]
fn each_ended_fire_queues_its_callback_which_is_retried_then_given_up() {
    let mut state = State::new();
    let mut spec = cron("c", "*/20 * * * * *", "skip", "allow");
    spec.retry.max_attempts = 2;
    spec.callbacks.on_success = Some("https://example.com/ok".into());
    spec.callbacks.on_failure = Some("https://example.com/failed".into());
    create(&mut state, spec).expect("created");
    let (fire_ms, _) = run_next(&mut state, "c", 200);
    let (due_ms, due) = state.next_due("c").expect("the callback is due");
    assert_eq!(due, Due::Callback { fire_ms, attempt: 1 });
    let pending = &state.job("c").expect("job").life().callbacks[&fire_ms];
    let document: serde_json::Value = serde_json::from_slice(&pending.body).expect("JSON");
    assert_eq!((pending.url.as_str(), pending.success), ("https://example.com/ok", true));
    assert_eq!(document["outcome"], "delivered");
    assert_eq!(document["idempotency_key"], format!("c:{fire_ms}"));
    assert_eq!(document["response"]["status"], 200);
    let callback = |state: &mut State, attempt: u32, status: u16, at: u64| {
        state.apply(Command::CallbackStarted { id: "c".into(), fire_ms, attempt, now_ms: at }).expect("started");
        let outcome = Outcome::Response { status, body: Vec::new(), retry_after_ms: None, no_retry: false };
        let finished = Command::CallbackFinished {
            id: "c".into(),
            fire_ms,
            attempt,
            started_ms: at,
            finished_ms: at + 5,
            outcome,
            retry_at_ms: at + 500,
        };
        state.apply(finished).expect("finished");
    };
    callback(&mut state, 1, 503, due_ms);
    assert_eq!(state.next_due("c").map(|d| d.1), Some(Due::Callback { fire_ms, attempt: 2 }), "retried");
    callback(&mut state, 2, 503, due_ms + 500);
    let job = state.job("c").expect("job");
    assert!(job.life().callbacks.is_empty(), "given up after the job's max_attempts");
    let note = job.life().history.back().and_then(|e| e.note.clone()).expect("noted");
    assert_eq!(note, "callback on_success given up after 2 attempts");
    // A dead-lettered fire goes to on_failure, even while the job is paused.
    let (failed_fire, _) = run_next(&mut state, "c", 500);
    run_next(&mut state, "c", 500);
    state.apply(Command::Pause { id: "c".into() }).expect("paused");
    let pending = &state.job("c").expect("job").life().callbacks[&failed_fire];
    assert_eq!((pending.url.as_str(), pending.success), ("https://example.com/failed", false));
    assert!(matches!(state.next_due("c"), Some((_, Due::Callback { .. }))));
}

#[test]
fn a_paused_flow_key_holds_its_jobs_fires_and_resume_releases_them() {
    let mut state = State::new();
    let keyed = |id: &str, at_ms: u64| {
        let mut spec = once(id, at_ms);
        spec.flow = Some(sundial_engine::job::Flow {
            key: "tenant".into(),
            parallelism: Some(2),
            rate: Some(5),
            period_ms: Some(1_000),
            ordered: Some(true),
        });
        spec
    };
    create(&mut state, keyed("a", T0 + 1_000)).expect("created");
    create(&mut state, keyed("b", T0 + 2_000)).expect("created");
    let key = state.flow_key("tenant").expect("the key exists");
    assert_eq!((key.parallelism, key.rate, key.ordered, key.jobs.len()), (Some(2), Some(5), true, 2));
    assert_eq!(state.flow_first_due(key), Some((T0 + 1_000, "a")));
    assert_eq!(state.flow_backlog(key, T0 + 5_000), 2);
    state.apply(Command::PauseKey { key: "tenant".into() }).expect("paused");
    assert_eq!((state.next_due("a"), state.next_due("b")), (None, None));
    let refused = state.apply(Command::ResumeKey { key: "other".into(), now_ms: T0 });
    assert!(matches!(refused, Err(ApplyError::KeyNotPaused(_))));
    state.apply(Command::ResumeKey { key: "tenant".into(), now_ms: T0 }).expect("resumed");
    assert!(state.next_due("a").is_some());
    start(&mut state, "a", T0 + 1_000, 1, T0 + 1_000).expect("started");
    let key = state.flow_key("tenant").expect("the key exists");
    let started = KeyFire { job: "a", fire_ms: T0 + 1_000, started: true };
    assert_eq!((state.flow_in_flight(key), state.flow_active(key)), (1, vec![started]));
    // The key lives while a job has it.
    state.apply(Command::Cancel { id: "a".into(), now_ms: T0 + 1 }).expect("cancelled");
    state.apply(Command::Delete { id: "a".into(), now_ms: T0 + 1 }).expect("deleted");
    state.apply(Command::Delete { id: "b".into(), now_ms: T0 + 1 }).expect("deleted");
    assert!(state.flow_key("tenant").is_none());
}

#[test]
fn an_upsert_never_runs_a_one_time_fire_again_and_keeps_a_due_cron_fire() {
    let mut state = State::new();
    let at = T0 + 1_000;
    create(&mut state, once("a", at)).expect("created");
    start(&mut state, "a", at, 1, at).expect("started");
    finish(&mut state, "a", at, 1, at + 10, 500).expect("a retry is due");
    let upsert =
        |state: &mut State, spec: JobSpec, now_ms| state.apply(Command::Upsert { spec: PackedSpec::of(&spec), now_ms });
    let mut retargeted = once("a", at);
    retargeted.target.url = "https://example.com/elsewhere".into();
    assert_eq!(upsert(&mut state, retargeted, at + 20), Ok(Applied::Replaced));
    let job = state.job("a").expect("job");
    assert_eq!(job.next_fire_ms, None, "its one fire is in progress: not scheduled again");
    assert_eq!(run_next(&mut state, "a", 200), (at, 2), "the retry goes on, to the new target");
    assert_eq!(state.job("a").expect("job").status, Status::Completed);
    // A cron job whose fire is due (held) keeps it through an upsert.
    create(&mut state, cron("c", "*/20 * * * * *", "fire_all", "skip")).expect("created");
    let due = state.job("c").expect("job").next_fire_ms.expect("next");
    upsert(&mut state, cron("c", "*/30 * * * * *", "fire_all", "skip"), due + 5_000).expect("replaced");
    assert_eq!(state.job("c").expect("job").next_fire_ms, Some(due), "the due fire is not dropped");
}

#[test]
fn a_backfill_leaves_the_schedules_own_overdue_fire_to_the_schedule() {
    let mut state = State::new();
    create(&mut state, cron("c", "*/20 * * * * *", "fire_all", "allow")).expect("created");
    let next = state.job("c").expect("job").next_fire_ms.expect("next"); // T0 + 20 s, now overdue
    let now = next + 45_000;
    let added = state.apply(Command::Backfill { id: "c".into(), from_ms: next - 40_000, to_ms: now, now_ms: now });
    assert_eq!(added, Ok(Applied::Fires { fire_ms: vec![next - 40_000, next - 20_000] }), "only those before it");
}

#[test]
fn fires_added_to_a_job_start_one_after_another_unless_it_allows_overlap() {
    let mut state = State::new();
    create(&mut state, cron("s", "0 0 1 1 *", "skip", "skip")).expect("created");
    let now = T0 + 1_000;
    state.apply(Command::Trigger { id: "s".into(), now_ms: now }).expect("triggered");
    state.apply(Command::Trigger { id: "s".into(), now_ms: now }).expect("triggered");
    start(&mut state, "s", now, 1, now).expect("the first starts");
    assert_eq!(state.next_due("s"), None, "the second waits for the first");
    finish(&mut state, "s", now, 1, now + 5, 200).expect("finished");
    assert_eq!(state.next_due("s"), Some((now, Due::Retry { fire_ms: now + 1, attempt: 1 })));
}

#[test]
fn a_missed_one_time_fire_calls_back_on_failure_and_a_cancel_keeps_waiting_callbacks() {
    let mut state = State::new();
    let mut spec = once("m", T0);
    spec.callbacks.on_failure = Some("https://example.com/failed".into());
    create(&mut state, spec).expect("created");
    let late = T0 + CATCH_UP_WINDOW_MS + 1;
    assert_eq!(start(&mut state, "m", T0, 1, late), Ok(Applied::Missed { count: 1 }));
    let pending = &state.job("m").expect("job").life().callbacks[&T0];
    let document: serde_json::Value = serde_json::from_slice(&pending.body).expect("JSON");
    assert_eq!((document["outcome"].as_str(), document["attempts"].as_u64()), (Some("dead_lettered"), Some(0)));
    assert_eq!(document["response"], serde_json::Value::Null);
    // A cancelled job's waiting callbacks still go out.
    let mut live = once("k", T0 + 60_000);
    live.callbacks.on_success = Some("https://example.com/ok".into());
    create(&mut state, live).expect("created");
    state.apply(Command::Trigger { id: "k".into(), now_ms: T0 }).expect("triggered");
    run_next(&mut state, "k", 200);
    state.apply(Command::Cancel { id: "k".into(), now_ms: T0 + 100 }).expect("cancelled");
    assert!(matches!(state.next_due("k"), Some((_, Due::Callback { .. }))));
    assert!(matches!(state.apply(Command::Purge { id: Some("nope".into()) }), Err(ApplyError::NotFound(_))));
}

#[test]
fn an_outcome_that_ends_while_its_earlier_callback_is_out_follows_it() {
    let mut state = State::new();
    let at = T0 + 1_000;
    let mut spec = once("r", at);
    spec.retry.max_attempts = 1;
    spec.callbacks.on_success = Some("https://example.com/ok".into());
    spec.callbacks.on_failure = Some("https://example.com/failed".into());
    create(&mut state, spec).expect("created");
    run_next(&mut state, "r", 500); // dead-lettered: on_failure queued
    state.apply(Command::CallbackStarted { id: "r".into(), fire_ms: at, attempt: 1, now_ms: at + 20 }).expect("out");
    state.apply(Command::Redrive { id: "r".into(), fire_ms: at, now_ms: at + 30 }).expect("redriven");
    run_next(&mut state, "r", 200); // delivered: on_success waits behind the failure callback
    let pending = &state.job("r").expect("job").life().callbacks[&at];
    assert!(!pending.success && pending.then.as_ref().is_some_and(|next| next.success));
    let outcome = Outcome::Response { status: 200, body: Vec::new(), retry_after_ms: None, no_retry: false };
    let finished = Command::CallbackFinished {
        id: "r".into(),
        fire_ms: at,
        attempt: 1,
        started_ms: at + 20,
        finished_ms: at + 2_000,
        outcome,
        retry_at_ms: at + 3_000,
    };
    state.apply(finished).expect("finished");
    let pending = &state.job("r").expect("job").life().callbacks[&at];
    assert!(pending.success && pending.attempts == 0, "then the success callback, from attempt 1");
}

#[test]
fn dst_policies_hold_through_the_state_machine_with_real_zone_data() {
    // New York, 2026-11-01: 01:30 twice (05:30Z and 06:30Z) under repeated = both.
    let mut state = State::new();
    let request = json!({"id": "ny", "cron": "30 1 * * *", "time_zone": "America/New_York",
        "url": "https://example.com/h", "dst": {"repeated": "both"}});
    let before = 1_793_448_000_000; // 2026-10-31T12:00:00Z
    let spec = parse_job_request(&request.to_string(), before, "unused").expect("valid");
    state
        .apply(Command::Create { spec: PackedSpec::of(&spec), now_ms: before, dedup_window_ms: None })
        .expect("created");
    let fired: Vec<u64> = (0..3).map(|_| run_next(&mut state, "ny", 200).0).collect();
    let hours = |t: u64| (t - 1_793_491_200_000) as f64 / 3_600_000.0; // hours after 2026-11-01T00:00Z
    assert_eq!(fired.iter().map(|t| hours(*t)).collect::<Vec<_>>(), [5.5, 6.5, 30.5]);
}

#[test]
fn a_second_start_of_the_same_attempt_is_refused_as_a_duplicate() {
    let mut state = State::new();
    let at = T0 + 1_000;
    let mut spec = once("d", at);
    spec.callbacks.on_success = Some("https://example.com/ok".into());
    create(&mut state, spec).expect("created");
    start(&mut state, "d", at, 1, at).expect("started");
    let digest = state.digest();
    assert!(matches!(start(&mut state, "d", at, 1, at + 1), Err(ApplyError::StaleAttempt { .. })));
    assert_eq!(state.digest(), digest);
    finish(&mut state, "d", at, 1, at + 10, 200).expect("finished");
    let callback = |state: &mut State| {
        state.apply(Command::CallbackStarted { id: "d".into(), fire_ms: at, attempt: 1, now_ms: at + 20 })
    };
    callback(&mut state).expect("the callback starts");
    assert!(matches!(callback(&mut state), Err(ApplyError::StaleAttempt { .. })), "once");
}

#[test]
fn an_ordered_keys_job_never_overlaps_its_own_fires_even_with_overlap_allow() {
    let mut state = State::new();
    // Every second: the next fire (+1 s) comes due before the failed one's retry (+1.01 s).
    let mut spec = cron("o", "* * * * * *", "fire_all", "allow");
    spec.flow = Some(sundial_engine::job::Flow {
        key: "ordered".into(),
        parallelism: None,
        rate: None,
        period_ms: None,
        ordered: Some(true),
    });
    create(&mut state, spec).expect("created");
    let (first, _) = run_next(&mut state, "o", 500); // failed: a retry is due
    let (due_ms, due) = state.next_due("o").expect("due");
    assert_eq!(due, Due::Retry { fire_ms: first, attempt: 2 }, "the retry, not the next fire, at {due_ms}");
    state.apply(Command::PauseKey { key: "ordered".into() }).expect("paused");
    let refused =
        state.apply(Command::FireStarted { id: "o".into(), fire_ms: first, attempt: 2, node: 1, now_ms: due_ms });
    assert!(matches!(refused, Err(ApplyError::InvalidState { .. })), "no start while its key is paused");
}

/// The digest check can fail: one different command gives a different digest.
#[test]
fn the_digest_tells_states_apart() {
    let mut a = State::new();
    let mut b = State::new();
    create(&mut a, once("x", T0 + 1)).expect("created");
    create(&mut b, once("x", T0 + 2)).expect("created");
    assert_ne!(a.digest(), b.digest());
}
