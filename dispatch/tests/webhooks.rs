//! The life of a fire against a real HTTP receiver on 127.0.0.1: headers and signature,
//! retries at growing gaps, Retry-After, dead letters, timeouts, cancellation mid-attempt,
//! the circuit breaker, a full queue that delays but loses nothing, the SSRF guard, and a
//! fire sent before its start commits.
//! Time bounds are generous (seconds); what is asserted is order and outcome: fired, not
//! early, exactly once per fire.

mod common;

use common::{Receiver, Reply, Script};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use sundial_dispatch::guard::AddressPolicy;
use sundial_dispatch::runtime::{LocalRuntime, RuntimeConfig};
use sundial_dispatch::{now_ms, DispatchConfig};
use sundial_engine::limits::BreakerState;
use sundial_engine::request::parse_job_request;
use sundial_engine::sign;
use sundial_engine::spec::PackedSpec;
use sundial_engine::state::{Command, ErrorClass, State, Status};

const PATIENCE: Duration = Duration::from_secs(20);

fn runtime(configure: impl FnOnce(&mut DispatchConfig)) -> LocalRuntime {
    let mut dispatch = DispatchConfig {
        address_policy: AddressPolicy { allow_loopback: true, allow_private: false },
        ..DispatchConfig::default()
    };
    configure(&mut dispatch);
    LocalRuntime::start(RuntimeConfig { dispatch, ..RuntimeConfig::default() })
}

fn create(runtime: &mut LocalRuntime, request: serde_json::Value) {
    let now = now_ms();
    let spec = parse_job_request(&request.to_string(), now, "unused").expect("valid request");
    runtime
        .apply(Command::Create { spec: PackedSpec::of(&spec), now_ms: now, dedup_window_ms: None }, now)
        .expect("created");
}

fn status_of(state: &State, id: &str) -> Status {
    state.job(id).expect("job").status
}

fn script(f: impl Fn(usize, &common::Received) -> Reply + Send + Sync + 'static) -> Script {
    Arc::new(f)
}

#[tokio::test]
async fn a_fire_arrives_with_every_header_and_a_signature_the_receiver_verifies() {
    let receiver = Receiver::start(script(|_, _| Reply::status(200))).await;
    let mut runtime = runtime(|_| {});
    let due = now_ms() + 300;
    create(
        &mut runtime,
        json!({"id": "signed", "run_at": due, "url": receiver.url("/hook?x=1"), "method": "PUT",
               "headers": {"Authorization": "Bearer t"}, "json": {"hello": "world"}, "secret": "top-secret"}),
    );
    assert!(runtime.run_until(PATIENCE, |s| status_of(s, "signed") == Status::Completed).await);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1, "fired exactly once");
    let request = &requests[0];
    assert!(request.at_ms >= due, "not early: arrived {} ms before due", due.saturating_sub(request.at_ms));
    assert_eq!((request.method.as_str(), request.path.as_str()), ("PUT", "/hook"));
    assert_eq!(request.body, br#"{"hello":"world"}"#);
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("authorization"), Some("Bearer t"));
    assert_eq!(request.header("x-sundial-job-id"), Some("signed"));
    assert_eq!(request.header("x-sundial-attempt"), Some("1"));
    let key = format!("signed:{due}");
    assert_eq!(request.header("idempotency-key"), Some(key.as_str()));
    assert_eq!(request.header("x-correlation-id"), Some(key.as_str()));
    let traceparent = request.header("traceparent").expect("traceparent");
    assert!(traceparent.starts_with("00-") && traceparent.ends_with("-01") && traceparent.len() == 55, "{traceparent}");
    let signature = request.header("x-sundial-signature").expect("signed");
    assert!(sign::verify(b"top-secret", signature, &request.body, now_ms(), 300_000), "{signature}");
    assert!(!sign::verify(b"wrong", signature, &request.body, now_ms(), 300_000));
    let history = &runtime.state().job("signed").expect("job").life().history;
    assert_eq!(
        (history[0].status_code, history[0].response_body.as_slice()),
        (Some(200), b"receiver says hi".as_slice())
    );
}

#[tokio::test]
async fn a_500_then_200_is_retried_at_growing_gaps_with_the_same_idempotency_key() {
    let receiver = Receiver::start(script(|n, _| Reply::status(if n < 2 { 500 } else { 200 }))).await;
    let mut runtime = runtime(|_| {});
    create(
        &mut runtime,
        json!({"id": "flaky", "delay": 0, "url": receiver.url("/"),
               "retry": {"max_attempts": 5, "initial_backoff_ms": 200, "multiplier": 3.0, "jitter": 0}}),
    );
    assert!(runtime.run_until(PATIENCE, |s| status_of(s, "flaky") == Status::Completed).await);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    let gaps: Vec<u64> = requests.windows(2).map(|w| w[1].at_ms - w[0].at_ms).collect();
    // Lower bounds only: the backoff grows (200 ms, then 600 ms) and no retry is early.
    assert!(gaps[0] >= 200 && gaps[1] >= 600, "backoff 200 ms then 600 ms: gaps {gaps:?}");
    let keys: Vec<Option<&str>> = requests.iter().map(|r| r.header("idempotency-key")).collect();
    assert!(keys.iter().all(|k| *k == keys[0]), "one key for the fire: {keys:?}");
    let attempts: Vec<Option<&str>> = requests.iter().map(|r| r.header("x-sundial-attempt")).collect();
    assert_eq!(attempts, [Some("1"), Some("2"), Some("3")]);
}

#[tokio::test]
async fn a_429_with_retry_after_waits_at_least_that_long() {
    let receiver = Receiver::start(script(|n, _| {
        if n == 0 {
            Reply::status(429).with_header("retry-after", "1")
        } else {
            Reply::status(204)
        }
    }))
    .await;
    let mut runtime = runtime(|_| {});
    create(
        &mut runtime,
        json!({"id": "limited", "delay": 0, "url": receiver.url("/"), "retry": {"initial_backoff_ms": 50, "jitter": 0}}),
    );
    assert!(runtime.run_until(PATIENCE, |s| status_of(s, "limited") == Status::Completed).await);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].at_ms - requests[0].at_ms;
    assert!(gap >= 1_000, "Retry-After: 1 s beats the 50 ms backoff: gap {gap} ms");
}

#[tokio::test]
async fn a_non_retryable_404_is_dead_lettered_after_one_attempt() {
    let receiver = Receiver::start(script(|_, _| Reply::status(404))).await;
    let mut runtime = runtime(|_| {});
    create(&mut runtime, json!({"id": "gone", "delay": 0, "url": receiver.url("/missing")}));
    assert!(runtime.run_until(PATIENCE, |s| status_of(s, "gone") == Status::Failed).await);
    // Nothing more is sent afterwards.
    runtime.run_until(Duration::from_millis(1_500), |_| false).await;
    assert_eq!(receiver.requests().len(), 1);
    let (id, _, letter) = runtime.state().dead_letters().next().expect("dead-lettered");
    assert_eq!((id, letter.attempts, letter.reason.as_str()), ("gone", 1, "not retryable"));
}

#[tokio::test]
async fn a_slow_receiver_times_out_and_the_fire_is_retried() {
    let receiver =
        Receiver::start(script(|n, _| if n == 0 { Reply::status(200).after_ms(3_000) } else { Reply::status(200) }))
            .await;
    let mut runtime = runtime(|_| {});
    create(
        &mut runtime,
        json!({"id": "slow", "delay": 0, "url": receiver.url("/"), "attempt_timeout_ms": 300,
               "retry": {"initial_backoff_ms": 100, "jitter": 0}}),
    );
    assert!(runtime.run_until(PATIENCE, |s| status_of(s, "slow") == Status::Completed).await);
    let history = &runtime.state().job("slow").expect("job").life().history;
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].error, Some(ErrorClass::Timeout));
    assert!(history[0].finished_ms - history[0].started_ms < 2_500, "gave up near the 300 ms timeout");
    assert_eq!(history[1].status_code, Some(200));
}

#[tokio::test]
async fn cancelling_a_job_aborts_its_attempt_in_flight() {
    let receiver = Receiver::start(script(|_, _| Reply::status(200).after_ms(10_000))).await;
    let mut runtime = runtime(|_| {});
    create(&mut runtime, json!({"id": "doomed", "delay": 0, "url": receiver.url("/")}));
    assert!(runtime.run_until(PATIENCE, |_| !receiver.requests().is_empty()).await, "the attempt reached the receiver");
    assert_eq!(runtime.dispatcher().running(), 1);
    let now = now_ms();
    runtime.apply(Command::Cancel { id: "doomed".into(), now_ms: now }, now).expect("cancelled");
    // Two seconds of running the loop: the aborted attempt's outcome comes back and is applied.
    runtime.run_until(Duration::from_secs(2), |_| false).await;
    assert_eq!(runtime.dispatcher().running(), 0, "the request was aborted, not awaited for 10 s");
    assert_eq!(runtime.stats().attempts_finished, 1);
    assert_eq!(status_of(runtime.state(), "doomed"), Status::Cancelled);
    assert_eq!(receiver.requests().len(), 1, "no retry after a cancel");
}

#[tokio::test]
async fn the_circuit_opens_after_consecutive_failures_and_closes_after_a_good_probe() {
    let receiver = Receiver::start(script(|n, _| Reply::status(if n < 3 { 503 } else { 200 }))).await;
    let mut runtime = runtime(|d| {
        d.breaker_failures = 3;
        d.breaker_open_ms = 1_500;
    });
    create(
        &mut runtime,
        json!({"id": "breaker", "delay": 0, "url": receiver.url("/a"),
               "retry": {"max_attempts": 10, "initial_backoff_ms": 50, "multiplier": 1.0, "jitter": 0}}),
    );
    assert!(runtime.run_until(PATIENCE, |s| status_of(s, "breaker") == Status::Completed).await);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 4, "three failures, then the probe succeeds");
    let gap = requests[3].at_ms - requests[2].at_ms;
    assert!(gap >= 1_500, "the open breaker held the 50 ms retry for its 1.5 s: gap {gap} ms");
    // The good probe closed it again: the host takes requests as before.
    assert_eq!(runtime.dispatcher().breaker_state(&receiver.url("/b")), Some(BreakerState::Closed));
    create(&mut runtime, json!({"id": "after", "delay": 0, "url": receiver.url("/b")}));
    assert!(runtime.run_until(PATIENCE, |s| status_of(s, "after") == Status::Completed).await);
    assert_eq!(receiver.requests().len(), 5);
}

#[tokio::test]
async fn a_full_queue_makes_fires_wait_and_loses_none() {
    let receiver = Receiver::start(script(|_, _| Reply::status(200).after_ms(50))).await;
    let mut runtime = runtime(|d| {
        d.queue_capacity = 2;
        d.per_host_concurrency = 1;
    });
    let due = now_ms() + 200;
    for i in 0..20 {
        create(&mut runtime, json!({"id": format!("job-{i}"), "run_at": due, "url": receiver.url("/")}));
    }
    let all_done = |s: &State| s.count(Status::Completed) == 20;
    assert!(runtime.run_until(PATIENCE, all_done).await, "all 20 fired");
    assert!(runtime.stats().queue_full_waits > 0, "the queue was full at times");
    let mut keys: Vec<String> =
        receiver.requests().iter().map(|r| r.header("idempotency-key").expect("key").to_string()).collect();
    keys.sort();
    let expected: Vec<String> = {
        let mut k: Vec<String> = (0..20).map(|i| format!("job-{i}:{due}")).collect();
        k.sort();
        k
    };
    assert_eq!(keys, expected, "each fire exactly once");
}

#[tokio::test]
async fn the_ssrf_guard_refuses_loopback_unless_allowed() {
    let receiver = Receiver::start(script(|_, _| Reply::status(200))).await;
    let mut runtime = runtime(|d| d.address_policy = AddressPolicy::default());
    create(&mut runtime, json!({"id": "ip", "delay": 0, "url": receiver.url("/")}));
    let by_name = format!("http://localhost:{}/", receiver.addr.port());
    create(&mut runtime, json!({"id": "name", "delay": 0, "url": by_name}));
    let refused = |s: &State| status_of(s, "ip") == Status::Failed && status_of(s, "name") == Status::Failed;
    assert!(runtime.run_until(PATIENCE, refused).await);
    for id in ["ip", "name"] {
        assert_eq!(runtime.state().job(id).expect("job").life().history[0].error, Some(ErrorClass::Refused), "{id}");
    }
    assert!(receiver.requests().is_empty(), "nothing reached the receiver");
}

#[tokio::test]
async fn a_cron_job_fires_each_second_on_the_second_never_early() {
    let receiver = Receiver::start(script(|_, _| Reply::status(200))).await;
    let mut runtime = runtime(|_| {});
    create(
        &mut runtime,
        json!({"id": "tick", "cron": "* * * * * *", "time_zone": "Europe/Paris", "url": receiver.url("/")}),
    );
    let three_fires = |s: &State| s.job("tick").expect("job").life().fires_succeeded >= 3;
    assert!(runtime.run_until(PATIENCE, three_fires).await);
    let fires: Vec<u64> = receiver
        .requests()
        .iter()
        .map(|r| r.header("x-sundial-fire-time").expect("fire time").parse().expect("ms"))
        .collect();
    // Strictly increasing: no fire twice. (A loaded machine may coalesce a late second under
    // the default fire_once misfire policy, so gaps are not asserted.)
    assert!(fires.windows(2).all(|w| w[1] > w[0]), "each fire once, in order: {fires:?}");
    for (request, fire) in receiver.requests().iter().zip(&fires) {
        assert_eq!(fire % 1_000, 0, "on the second");
        assert!(request.at_ms >= *fire, "not early");
    }
}

/// A log that commits only when the test says so (`commit`), like a slow fsync held open:
/// proposals wait in order, then apply together.
struct HeldLog {
    state: State,
    next_ticket: sundial_dispatch::runtime::Ticket,
    waiting: Vec<(sundial_dispatch::runtime::Ticket, Command)>,
    committing: bool,
    /// The group's only voter (else another could be elected while it waits).
    alone: bool,
}

impl sundial_dispatch::runtime::CommandLog for HeldLog {
    fn propose(&mut self, commands: Vec<Command>) -> Vec<Result<u64, sundial_engine::state::ApplyError>> {
        commands
            .into_iter()
            .map(|command| {
                self.next_ticket += 1;
                self.waiting.push((self.next_ticket, command));
                Ok(self.next_ticket)
            })
            .collect()
    }

    fn advance(&mut self) -> Result<Vec<sundial_dispatch::runtime::Committed>, sundial_dispatch::runtime::LogError> {
        if !self.committing {
            return Ok(Vec::new());
        }
        let applied = std::mem::take(&mut self.waiting).into_iter().map(|(ticket, command)| {
            let summary = sundial_dispatch::runtime::Committed::of(
                &command,
                Some(ticket),
                Ok(sundial_engine::state::Applied::Done),
            );
            let verdict = self.state.apply(command);
            sundial_dispatch::runtime::Committed { verdict, ..summary }
        });
        Ok(applied.collect())
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn leadership(&self) -> Option<u64> {
        Some(1)
    }

    fn leads_alone(&self) -> bool {
        self.alone
    }

    fn last_index(&self) -> u64 {
        self.next_ticket
    }
}

/// A runtime over a `HeldLog` with two jobs due 200 ms from now, "early" and "cancelled", and
/// a cancel of the second proposed and held; the due fires are then looked at once.
async fn fires_with_the_log_held(receiver: &Receiver, alone: bool) -> sundial_dispatch::runtime::Runtime<HeldLog> {
    let now = now_ms();
    let log = HeldLog { state: State::new(), next_ticket: 0, waiting: Vec::new(), committing: true, alone };
    let dispatch = DispatchConfig {
        address_policy: AddressPolicy { allow_loopback: true, allow_private: false },
        ..DispatchConfig::default()
    };
    let config = RuntimeConfig { dispatch, ..RuntimeConfig::default() };
    let mut runtime = sundial_dispatch::runtime::Runtime::with_log(config, log, now);
    for id in ["early", "cancelled"] {
        let request = json!({"id": id, "run_at": now + 200, "url": receiver.url(&format!("/{id}"))});
        let spec = parse_job_request(&request.to_string(), now, "unused").expect("valid request");
        runtime.propose(vec![Command::Create { spec: PackedSpec::of(&spec), now_ms: now, dedup_window_ms: None }]);
    }
    runtime.advance(now);
    assert_eq!(runtime.state().job_count(), 2);
    // From here the log holds what it is given until told to commit.
    runtime.log_mut().committing = false;
    runtime.propose(vec![Command::Cancel { id: "cancelled".into(), now_ms: now }]);
    tokio::time::sleep(Duration::from_millis(250)).await;
    runtime.fire_due_jobs(now_ms());
    runtime
}

/// A due one-time fire goes out while its start waits for the log (its outcome is written
/// after the start, so it applies in order); a fire whose job has a command ahead of it in
/// the log (here a cancel) waits for the log, and then does not go out at all.
#[tokio::test]
async fn a_due_fire_is_sent_before_its_start_commits_unless_a_command_for_its_job_is_ahead() {
    let receiver = Receiver::start(script(|_, _| Reply::status(200))).await;
    let mut runtime = fires_with_the_log_held(&receiver, true).await;
    let deadline = std::time::Instant::now() + PATIENCE;
    while receiver.requests().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent: Vec<String> = receiver.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(sent, vec!["/early".to_string()], "only the free job's fire went out before the log committed");
    assert_eq!(status_of(runtime.state(), "early"), Status::Pending, "its start is not applied yet");
    let result = tokio::time::timeout(PATIENCE, runtime.next_result()).await.expect("an outcome").expect("open");
    runtime.finish(result, now_ms());
    runtime.log_mut().committing = true;
    runtime.advance(now_ms());
    assert_eq!(status_of(runtime.state(), "early"), Status::Completed, "start, then outcome, applied in order");
    assert_eq!(status_of(runtime.state(), "cancelled"), Status::Cancelled);
    // Nothing else goes out: the cancelled job's start was refused when it applied.
    assert!(!runtime.run_until(Duration::from_millis(500), |_| false).await);
    let sent: Vec<String> = receiver.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(sent, vec!["/early".to_string()]);
}

/// A leader in a group of several (another could be elected while its start waits) sends
/// nothing before the start commits; then the fire goes out, once.
#[tokio::test]
async fn a_leader_with_peers_sends_a_fire_only_once_its_start_commits() {
    let receiver = Receiver::start(script(|_, _| Reply::status(200))).await;
    let mut runtime = fires_with_the_log_held(&receiver, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.requests().is_empty(), "nothing goes out before the log commits");
    runtime.log_mut().committing = true;
    assert!(runtime.run_until(PATIENCE, |s| status_of(s, "early") == Status::Completed).await);
    let sent: Vec<String> = receiver.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(sent, vec!["/early".to_string()]);
}

/// Two spellings of one host share its connections: with one connection allowed, a job to
/// `http://someone@host:port` after one to `http://host:port` uses the connection the first
/// left open, on its first attempt, instead of waiting for it to close; each request carries
/// the Host header its URL gives.
#[tokio::test]
async fn two_spellings_of_a_host_share_its_connections() {
    let receiver = Receiver::start(script(|_, _| Reply::status(200))).await;
    let mut runtime = runtime(|d| d.per_host_concurrency = 1);
    let now = now_ms();
    create(&mut runtime, json!({"id": "plain", "run_at": now, "url": receiver.url("/plain")}));
    assert!(runtime.run_until(PATIENCE, |s| status_of(s, "plain") == Status::Completed).await);
    let spelled = receiver.url("/spelled").replacen("http://", "http://someone@", 1);
    let started = now_ms();
    create(&mut runtime, json!({"id": "spelled", "run_at": started, "url": spelled}));
    assert!(runtime.run_until(PATIENCE, |s| status_of(s, "spelled") == Status::Completed).await);
    let requests = receiver.requests();
    let second = requests.iter().find(|r| r.path == "/spelled").expect("delivered");
    assert_eq!(second.header("x-sundial-attempt"), Some("1"), "its first attempt went through");
    assert!(second.at_ms < started + 5_000, "it did not wait for the other spelling's connection to close");
    let authority = receiver.url("").trim_start_matches("http://").to_string();
    assert!(requests.iter().all(|r| r.header("host") == Some(authority.as_str())), "{requests:?}");
}
