//! Retention in the state machine: finished jobs leave at the end of their retention (with
//! their dead letters), unless something still needs them; their ids stay refused for the
//! dedup window as compact tombstones; both survive a snapshot, including one written before
//! tombstones were compact; dead letters beyond the limit are evicted and counted.

use serde_json::json;
use sundial_engine::job::JobSpec;
use sundial_engine::request::parse_job_request;
use sundial_engine::spec::PackedSpec;
use sundial_engine::state::*;

const T0: u64 = 1_780_000_000_000;
const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 24 * 3600 * 1000;

fn spec(request: serde_json::Value) -> JobSpec {
    parse_job_request(&request.to_string(), T0, "unused").expect("valid request")
}

fn once(id: &str, at_ms: u64) -> JobSpec {
    spec(json!({"id": id, "run_at": at_ms, "url": "https://example.com/hook", "retry": {"max_attempts": 1}}))
}

fn create_at(state: &mut State, spec: JobSpec, now_ms: u64) -> Result<Applied, ApplyError> {
    state.apply(Command::Create { spec: PackedSpec::of(&spec), now_ms, dedup_window_ms: Some(DAY_MS) })
}

/// Fires `id` at `at_ms` and records the receiver's `status` 5 ms later (one attempt).
fn fire(state: &mut State, id: &str, at_ms: u64, status: u16) {
    state
        .apply(Command::FireStarted { id: id.into(), fire_ms: at_ms, attempt: 1, node: 1, now_ms: at_ms })
        .expect("started");
    let outcome = Outcome::Response { status, body: Vec::new(), retry_after_ms: None, no_retry: false };
    let finished = Command::AttemptFinished {
        id: id.into(),
        fire_ms: at_ms,
        attempt: 1,
        node: 1,
        started_ms: at_ms,
        finished_ms: at_ms + 5,
        outcome,
        retry_at_ms: at_ms + 1_000,
    };
    state.apply(finished).expect("finished");
}

fn expire(state: &mut State, now_ms: u64, retention_ms: u64) -> u64 {
    let command = Command::Expire { now_ms, retention_ms, dedup_window_ms: DAY_MS, max: EXPIRE_PER_COMMAND_MAX };
    match state.apply(command) {
        Ok(Applied::Expired { count }) => count,
        other => panic!("expire: {other:?}"),
    }
}

#[test]
fn finished_jobs_leave_after_their_retention_and_their_ids_stay_refused_for_the_dedup_window() {
    let mut state = State::new();
    let at = T0 + 1_000;
    create_at(&mut state, once("done", at), T0).expect("created");
    create_at(&mut state, once("failed", at), T0).expect("created");
    create_at(&mut state, once("later", T0 + DAY_MS), T0).expect("created");
    fire(&mut state, "done", at, 200);
    fire(&mut state, "failed", at, 500);
    assert_eq!(state.job("failed").map(|job| job.status), Some(Status::Failed));
    assert_eq!(state.dead_letters().count(), 1);
    let finished_ms = at + 5;
    assert_eq!(state.first_retained_ms(), Some(finished_ms));

    assert_eq!(expire(&mut state, finished_ms + MINUTE_MS - 1, MINUTE_MS), 0, "a ms early: kept");
    assert!(state.job("done").is_some());
    assert_eq!(expire(&mut state, finished_ms + MINUTE_MS, MINUTE_MS), 2);
    assert!(state.job("done").is_none() && state.job("failed").is_none());
    assert_eq!(state.dead_letters().count(), 0, "a job's dead letters leave with it");
    assert_eq!(state.job("later").map(|job| job.status), Some(Status::Pending), "live jobs never expire");
    assert_eq!((state.expired_total(), state.tombstone_count(), state.first_retained_ms()), (2, 2, None));
    assert!(state.counts_match_jobs());

    // Within the dedup window the id is still refused, naming when the job finished.
    let again = create_at(&mut state, once("done", T0 + DAY_MS), finished_ms + 2 * MINUTE_MS);
    assert_eq!(again, Err(ApplyError::Duplicate { id: "done".into(), finished_ms, until_ms: finished_ms + DAY_MS }));
    // After it, the id is free (and the tombstone is forgotten).
    create_at(&mut state, once("done", T0 + 2 * DAY_MS), finished_ms + DAY_MS).expect("created after the window");
    assert_eq!(state.tombstone_count(), 0, "both tombstones are gone: pruned, or taken by the new job");
    assert!(state.counts_match_jobs());
}

#[test]
fn retention_zero_removes_a_finished_job_at_once_and_past_the_window_no_tombstone_is_kept() {
    let mut state = State::new();
    create_at(&mut state, once("a", T0 + 1_000), T0).expect("created");
    fire(&mut state, "a", T0 + 1_000, 200);
    assert_eq!(expire(&mut state, T0 + 1_005, 0), 1);
    assert_eq!(state.tombstone_count(), 1);
    // Expired more than a dedup window after it finished: nothing to remember.
    create_at(&mut state, once("b", T0 + 2_000), T0).expect("created");
    fire(&mut state, "b", T0 + 2_000, 200);
    assert_eq!(expire(&mut state, T0 + 2_005 + DAY_MS, DAY_MS), 1);
    assert_eq!(state.tombstone_count(), 1, "only a's");
}

#[test]
fn a_finished_job_others_depend_on_stays_until_none_does() {
    let mut state = State::new();
    create_at(&mut state, once("parent", T0 + 1_000), T0).expect("created");
    let child =
        spec(json!({"id": "child", "run_at": T0 + DAY_MS, "url": "https://example.com/c", "depends_on": ["parent"]}));
    create_at(&mut state, child, T0).expect("created");
    fire(&mut state, "parent", T0 + 1_000, 200);
    // The default retention is days: a job still needed is looked at again a recheck period
    // later, not a whole retention later.
    let retention_ms = 7 * DAY_MS;
    let now = T0 + 1_005 + retention_ms;
    assert_eq!(expire(&mut state, now, retention_ms), 0, "the child still reads the parent's status");
    assert!(state.job("parent").is_some());
    let again_ms = state.first_retained_ms().expect("still in the order");
    assert_eq!(again_ms + retention_ms, now + EXPIRY_RECHECK_MS);
    assert_eq!(expire(&mut state, now + EXPIRY_RECHECK_MS - 1, retention_ms), 0, "not before");
    state.apply(Command::Delete { id: "child".into(), now_ms: now + 2_000 }).expect("deleted");
    assert_eq!(expire(&mut state, now + EXPIRY_RECHECK_MS, retention_ms), 1);
    assert!(state.job("parent").is_none());
    assert!(state.counts_match_jobs());
}

#[test]
fn a_redriven_job_is_live_again_and_does_not_expire() {
    let mut state = State::new();
    create_at(&mut state, once("a", T0 + 1_000), T0).expect("created");
    fire(&mut state, "a", T0 + 1_000, 500);
    state.apply(Command::RedriveJob { id: "a".into(), now_ms: T0 + 2_000 }).expect("redriven");
    assert_eq!(state.first_retained_ms(), None);
    assert_eq!(expire(&mut state, T0 + DAY_MS, 0), 0);
    assert!(state.job("a").is_some_and(|job| !job.status.is_final()));
}

#[test]
fn the_expiry_order_and_tombstones_survive_a_snapshot_and_expire_the_same_after_it() {
    let mut state = State::new();
    for (n, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
        let at = T0 + 1_000 * (n as u64 + 1);
        create_at(&mut state, once(id, at), T0).expect("created");
        fire(&mut state, id, at, 200);
    }
    assert_eq!(expire(&mut state, T0 + 2_500, 0), 2, "a and b");
    let mut restored = State::restore(&state.snapshot().expect("snapshot")).expect("restores");
    assert_eq!(restored, state);
    assert_eq!((restored.tombstone_count(), restored.first_retained_ms()), (2, Some(T0 + 3_005)));
    assert_eq!(expire(&mut restored, T0 + 10_000, 0), expire(&mut state, T0 + 10_000, 0));
    assert_eq!(restored.digest(), state.digest());
    let refused = create_at(&mut restored, once("a", T0 + DAY_MS), T0 + 20_000);
    assert!(matches!(refused, Err(ApplyError::Duplicate { .. })), "{refused:?}");
}

#[test]
fn a_snapshot_written_before_compact_tombstones_is_read_with_its_tombstones() {
    // A snapshot of a build before the format header: the state as JSON.
    let mut snapshot = serde_json::to_value(State::new()).expect("json");
    let fields = snapshot.as_object_mut().expect("an object");
    fields.remove("dedup_tombstones");
    fields.insert("tombstones".into(), json!({"old-id": T0}));
    fields.insert("tombstone_order".into(), json!([[T0, "old-id"]]));
    let mut state = State::restore(&serde_json::to_vec(&snapshot).expect("bytes")).expect("restores");
    assert_eq!(state.tombstone_count(), 1);
    let refused = create_at(&mut state, once("old-id", T0 + DAY_MS), T0 + 1_000);
    assert!(matches!(refused, Err(ApplyError::Duplicate { finished_ms: T0, .. })), "{refused:?}");
    // Written back in the compact form only, and the same after an archived snapshot.
    let written = serde_json::to_value(&state).expect("json");
    assert!(
        written.get("tombstones").is_none() && written["dedup_tombstones"].as_array().is_some_and(|t| t.len() == 1)
    );
    let archived = State::restore(&state.snapshot().expect("snapshot")).expect("restores");
    assert_eq!(archived.tombstone_count(), 1);
    assert!(
        written.get("tombstones").is_none() && written["dedup_tombstones"].as_array().is_some_and(|t| t.len() == 1)
    );
}

#[test]
fn dead_letters_beyond_the_limit_are_evicted_oldest_first_and_counted() {
    let mut state = State::new();
    let total = DEAD_LETTERS_MAX + 3;
    for n in 0..total as u64 {
        let at = T0 + 1_000 + n;
        create_at(&mut state, once(&format!("j{n}"), at), T0).expect("created");
        fire(&mut state, &format!("j{n}"), at, 500);
    }
    assert_eq!(state.dead_letters().count(), DEAD_LETTERS_MAX);
    assert_eq!(state.dead_letters_evicted_total(), 3, "never a silent drop");
    let (oldest, _, _) = state.dead_letters().next().expect("kept");
    assert_eq!(oldest, "j3", "the oldest went first");
}
