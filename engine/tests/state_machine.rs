//! The replicated state machine, command by command: the life of a fire (due → attempts →
//! completed or dead-lettered), cron fires computed from committed fire times, misfire and
//! overlap policies, dependencies, idempotent create — and the determinism property: random
//! command sequences give identical digests on two replicas and on a third restored from a
//! snapshot taken midway.

use proptest::prelude::*;
use serde_json::json;
use sundial_engine::job::JobSpec;
use sundial_engine::request::parse_job_request;
use sundial_engine::state::*;

const T0: u64 = 1_780_000_000_000; // 2026-05-28T20:26:40Z

fn spec(request: serde_json::Value) -> JobSpec {
    parse_job_request(&request, T0, "unused").expect("valid request")
}

fn once(id: &str, at_ms: u64) -> JobSpec {
    spec(json!({"id": id, "run_at": at_ms, "url": "https://example.com/hook", "retry": {"max_attempts": 3}}))
}

fn create(state: &mut State, spec: JobSpec) -> Result<Applied, ApplyError> {
    state.apply(Command::Create { spec: Box::new(spec), now_ms: T0 })
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
        outcome: Outcome::Response { status, body: b"ok".to_vec(), retry_after_ms: None },
        retry_at_ms: at_ms + 1_000,
    })
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
    assert_eq!((job.status, job.fires_succeeded, job.history.len()), (Status::Completed, 1, 2));
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
    assert_eq!((job.status, job.fires_failed), (Status::Failed, 1), "404 is not retried");
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
    assert!(matches!(state.apply(Command::Delete { id: "a".into() }), Err(ApplyError::Required { .. })));
    start(&mut state, "a", T0 + 20, 1, T0 + 20).expect("started");
    finish(&mut state, "a", T0 + 20, 1, T0 + 30, 204).expect("recorded");
    assert_eq!(state.next_due("b"), Some((T0 + 10, Due::NewFire { fire_ms: T0 + 10 })), "a completed: b is due");
}

#[test]
fn a_cycle_through_a_recreated_job_is_refused() {
    let mut state = State::new();
    create(&mut state, once("a", T0 + 10)).expect("created");
    let mut b = once("b", T0 + 10);
    b.depends_on = vec!["a".into()];
    create(&mut state, b).expect("created");
    // Recreating "a" depending on "b" would close a → b → a; "a" cannot even be deleted.
    assert!(matches!(state.apply(Command::Delete { id: "a".into() }), Err(ApplyError::Required { .. })));
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
    for (policy, expected_missed, expected_next_offset) in [("fire_once", 11, 120_000), ("skip", 13, 130_000)] {
        let mut state = State::new();
        create(&mut state, cron("c", "*/10 * * * * *", policy, "skip")).expect("created");
        let (first, _) = state.next_due("c").expect("due");
        // No leader for 125 s (past the 60 s misfire threshold): the fire starts late.
        let now = first + 125_000;
        let applied = start(&mut state, "c", first, 1, now).expect("applied");
        let job = state.job("c").expect("job");
        match policy {
            // The late fire runs; the twelve due since coalesce into one, due now (the
            // latest): eleven are recorded missed.
            "fire_once" => {
                assert_eq!(applied, Applied::Done);
                assert_eq!(job.next_fire_ms, Some(first + expected_next_offset));
            }
            // The late fire and the twelve after it are missed; the next is in the future.
            _ => {
                assert_eq!(applied, Applied::Missed { count: expected_missed });
                assert_eq!(job.next_fire_ms, Some(first + expected_next_offset));
            }
        }
        assert_eq!(job.fires_missed, expected_missed, "{policy}");
    }
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
    state.apply(Command::Delete { id: "b".into() }).expect("deleted");
    assert_eq!(state.count(Status::Cancelled), 0);
    assert_eq!(state.apply(Command::Delete { id: "b".into() }), Err(ApplyError::NotFound("b".into())));
}

#[test]
fn a_new_leader_finds_the_attempts_left_in_flight() {
    let mut state = State::new();
    create(&mut state, once("a", T0 + 10)).expect("created");
    start(&mut state, "a", T0 + 10, 1, T0 + 10).expect("started");
    assert_eq!(state.in_flight(), vec![("a".to_string(), T0 + 10, 1)]);
    // The new leader re-runs attempt 1 of the same fire (same idempotency key).
    start(&mut state, "a", T0 + 10, 1, T0 + 2_000).expect("re-run accepted");
    finish(&mut state, "a", T0 + 10, 1, T0 + 2_100, 200).expect("recorded");
    assert!(state.in_flight().is_empty());
}

// ---- determinism ----------------------------------------------------------------------

/// A command over a small pool of jobs and times, so sequences hit real transitions.
fn command(ids: &'static [&'static str]) -> impl Strategy<Value = Command> {
    let id = prop::sample::select(ids).prop_map(str::to_string);
    let time = (0u64..200).prop_map(|s| T0 + s * 1_000);
    prop_oneof![
        (id.clone(), time.clone(), prop::bool::ANY, 0usize..3).prop_map(|(id, at, cron_job, deps)| {
            let spec = if cron_job {
                cron(&id, "*/20 * * * * *", ["fire_once", "skip", "fire_all"][deps % 3], ["skip", "allow"][deps % 2])
            } else {
                let mut spec = once(&id, at);
                spec.depends_on =
                    ["a", "b"].iter().take(deps % 2).filter(|d| **d != id).map(|d| d.to_string()).collect();
                spec
            };
            Command::Create { spec: Box::new(spec), now_ms: T0 }
        }),
        (id.clone(), time.clone()).prop_map(|(id, now_ms)| Command::Cancel { id, now_ms }),
        id.clone().prop_map(|id| Command::Delete { id }),
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
                outcome: Outcome::Response { status, body: vec![1, 2, 3], retry_after_ms: None },
                retry_at_ms: at + 2_000,
            }
        ),
        (id.clone(), time.clone(), time).prop_map(|(id, fire_ms, now_ms)| Command::Redrive { id, fire_ms, now_ms }),
        id.prop_map(|id| Command::Purge { id: Some(id) }),
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
            None => Command::FireStarted { id, fire_ms: 0, attempt: 1, node, now_ms },
        },
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn replicas_and_a_restored_snapshot_reach_the_same_digest(
        commands in prop::collection::vec(command(&["a", "b", "c"]), 1..120),
        snapshot_at in 0usize..120,
    ) {
        let mut first = State::new();
        let mut second = State::new();
        let mut restored: Option<State> = None;
        let mut applied_ok = 0;
        for (position, command) in commands.into_iter().enumerate() {
            let command = steer(&first, command);
            let a = first.apply(command.clone());
            let b = second.apply(command.clone());
            prop_assert_eq!(&a, &b);
            applied_ok += usize::from(a.is_ok());
            if let Some(third) = restored.as_mut() {
                prop_assert_eq!(third.apply(command), a);
            }
            if position == snapshot_at {
                restored = Some(State::restore(&first.snapshot()).expect("restores"));
            }
            prop_assert_eq!(first.digest(), second.digest());
        }
        if let Some(third) = restored {
            prop_assert_eq!(third.digest(), first.digest());
            prop_assert_eq!(third, first);
        }
        let _ = applied_ok;
    }
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
