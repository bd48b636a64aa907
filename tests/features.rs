//! The scheduler features users rely on, black-box: the real `sundial` binary and a real
//! receiver on 127.0.0.1 for each of callbacks, receiver-controlled retries and backoff
//! lists, flow-control keys (parallelism, order, rate, pause), auto-pause, trigger-now,
//! backfill, upsert, bulk verbs by label, signing key rotation, DST policies with real zone
//! data, the dedup window across a kill -9, and retention.

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use sundial_engine::sign::{verify, verify_v2, Bound};
use support::now_ms;

mod support;
use support::{wait_for, Node};

#[path = "../dispatch/tests/common/mod.rs"]
mod common;
use common::{Receiver, Reply};

/// A receiver that answers every request with `reply`.
async fn answering(reply: Reply) -> Receiver {
    Receiver::start(Arc::new(move |_, _| reply.clone())).await
}

fn post(node: &Node, path: &str, body: Value) -> (u16, Value) {
    node.call("POST", path, body.to_string().as_bytes())
}

fn created(node: &Node, request: Value) -> String {
    let (status, job) = post(node, "/jobs", request.clone());
    assert_eq!(status, 201, "{request} -> {job}");
    job["id"].as_str().expect("id").to_string()
}

fn job(node: &Node, id: &str) -> Value {
    let (status, job) = node.call("GET", &format!("/jobs/{id}"), b"");
    assert_eq!(status, 200, "{job}");
    job
}

fn to(path: &str, receiver: &Receiver) -> String {
    receiver.url(path)
}

fn on(receiver: &Receiver, path: &str) -> Vec<common::Received> {
    receiver.requests().into_iter().filter(|r| r.path == path).collect()
}

fn key_of(request: &common::Received) -> String {
    request.header("idempotency-key").unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_tell_each_fires_outcome_signed_and_retried_like_webhooks() {
    // /hook answers 200, /broken 500; the callback receiver fails the first success callback.
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = Receiver::start(Arc::new(move |_, request: &common::Received| match request.path.as_str() {
        "/broken" => Reply::status(500),
        "/callback"
            if request.header("x-sundial-callback") == Some("success")
                && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) =>
        {
            Reply::status(503)
        }
        _ => Reply::status(200),
    }))
    .await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(data.path(), &["--secret", "shared"]);
    let fast = json!({"max_attempts": 2, "initial_backoff_ms": 100, "backoff": "fixed", "jitter": 0});
    let callbacks = json!({"on_success": to("/callback", &receiver), "on_failure": to("/callback", &receiver)});
    let good = created(
        &node,
        json!({"url": to("/hook", &receiver), "delay": 0, "retry": fast, "callbacks": callbacks, "json": {"n": 1}}),
    );
    let bad =
        created(&node, json!({"url": to("/broken", &receiver), "delay": 0, "retry": fast, "callbacks": callbacks}));
    let two_callbacks = || {
        let calls = on(&receiver, "/callback");
        calls.iter().filter(|c| c.header("x-sundial-callback") == Some("success")).count() >= 2
            && calls.iter().any(|c| c.header("x-sundial-callback") == Some("failure"))
    };
    assert!(wait_for(Duration::from_secs(30), two_callbacks).await, "{:?}", on(&receiver, "/callback"));
    for call in on(&receiver, "/callback") {
        let document: Value = serde_json::from_slice(&call.body).expect("a JSON outcome");
        let id = document["job_id"].as_str().expect("job_id");
        let fire_ms = document["fire_ms"].as_u64().expect("fire_ms");
        assert_eq!(key_of(&call), format!("{id}:{fire_ms}:callback"), "a key of its own");
        let signature = call.header("x-sundial-signature").expect("signed");
        assert!(verify(b"shared", signature, &call.body, now_ms(), 300_000), "signed like a webhook");
        if id == good {
            assert_eq!((document["outcome"].as_str(), document["attempts"].as_u64()), (Some("delivered"), Some(1)));
            assert_eq!(document["response"]["status"], 200);
            assert_eq!(document["response"]["body"], "receiver says hi");
        } else {
            assert_eq!(id, bad);
            assert_eq!((document["outcome"].as_str(), document["attempts"].as_u64()), (Some("dead_lettered"), Some(2)));
            assert_eq!(
                (document["response"]["status"].as_u64(), document["job_status"].as_str()),
                (Some(500), Some("failed"))
            );
        }
    }
    // The success callback was retried after its 503 and went out exactly twice in all.
    let successes =
        on(&receiver, "/callback").iter().filter(|c| c.header("x-sundial-callback") == Some("success")).count();
    assert_eq!(successes, 2, "one 503, then delivered");
    let notes = || -> Vec<String> {
        let executions = node.call("GET", &format!("/jobs/{good}/executions"), b"").1;
        let list = executions["executions"].as_array().cloned().unwrap_or_default();
        list.iter().filter_map(|e| e["note"].as_str().map(String::from)).collect()
    };
    // The receiver saw the last callback; its outcome is committed just after.
    assert!(wait_for(Duration::from_secs(20), || notes().len() == 2).await, "{:?}", notes());
    assert_eq!(notes(), ["callback on_success failed; retrying", "callback on_success delivered"]);
    // A callback URL is checked like a webhook's.
    let (status, refused) = post(
        &node,
        "/jobs",
        json!({"url": to("/hook", &receiver), "delay": 0, "callbacks": {"on_success": "ftp://x"}}),
    );
    assert_eq!((status, refused["field"].as_str()), (400, Some("callbacks.on_success")), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_says_do_not_retry_and_a_job_chooses_its_backoff() {
    let receiver = Receiver::start(Arc::new(|_, request: &common::Received| match request.path.as_str() {
        "/stop" => Reply::status(503).with_header("X-Sundial-No-Retry", "true"),
        _ => Reply::status(500),
    }))
    .await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let stop = created(
        &node,
        json!({"url": to("/stop", &receiver), "delay": 0, "retry": {"max_attempts": 5, "initial_backoff_ms": 50}}),
    );
    let listed = json!({"max_attempts": 3, "backoff": [300, 1500], "jitter": 0});
    let paced = created(&node, json!({"url": to("/paced", &receiver), "delay": 0, "retry": listed}));
    let ended = || {
        let status = |id: &str| job(&node, id)["status"].as_str().map(String::from);
        status(&stop).as_deref() == Some("failed") && status(&paced).as_deref() == Some("failed")
    };
    assert!(wait_for(Duration::from_secs(30), ended).await);
    assert_eq!(on(&receiver, "/stop").len(), 1, "one attempt: the receiver said not to retry");
    let (_, dlq) = node.call("GET", "/dlq", b"");
    let reason = |id: &str| {
        let letters = dlq["dead_letters"].as_array().expect("dead letters");
        letters.iter().find(|l| l["id"] == id).and_then(|l| l["reason"].as_str().map(String::from))
    };
    assert_eq!(reason(&stop).as_deref(), Some("the receiver asked not to retry"));
    assert_eq!(reason(&paced).as_deref(), Some("3 attempts failed"));
    let times: Vec<u64> = on(&receiver, "/paced").iter().map(|r| r.at_ms).collect();
    assert_eq!(times.len(), 3);
    assert!(times[1] - times[0] >= 300 && times[2] - times[1] >= 1_500, "never before the listed delay: {times:?}");
    let (status, refused) =
        post(&node, "/jobs", json!({"url": to("/x", &receiver), "delay": 0, "retry": {"backoff": [0]}}));
    assert_eq!((status, refused["field"].as_str()), (400, Some("retry.backoff")), "{refused}");
}

/// Jobs of one key, due 10 ms apart but created out of order.
fn keyed_jobs(node: &Node, receiver: &Receiver, path: &str, flow: Value, count: u64) {
    let base_ms = now_ms() + 2_000;
    let mut order: Vec<u64> = (0..count).collect();
    order.reverse();
    order.swap(0, count as usize / 2);
    for n in order {
        let at = base_ms + n * 10;
        created(node, json!({"url": to(path, receiver), "run_at": at, "flow": flow, "json": {"n": n}}));
    }
}

fn numbers(requests: &[common::Received]) -> Vec<u64> {
    requests.iter().map(|r| serde_json::from_slice::<Value>(&r.body).expect("JSON")["n"].as_u64().expect("n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_key_with_parallelism_1_delivers_one_at_a_time_in_due_time_order() {
    // Each answer takes 300 ms; the third attempt of n=2 fails once (retried, still in order).
    let receiver = Receiver::start(Arc::new(|_, request: &common::Received| {
        let n = serde_json::from_slice::<Value>(&request.body).map(|b| b["n"].as_u64()).ok().flatten();
        let first_try = request.header("x-sundial-attempt") == Some("1");
        Reply::status(if n == Some(2) && first_try { 500 } else { 200 }).after_ms(300)
    }))
    .await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let flow = json!({"key": "serial", "parallelism": 1, "ordered": true});
    // Held while they are created (however slowly), so all six are due when it resumes.
    assert_eq!(post(&node, "/flow-keys/serial/pause", json!({})).0, 200);
    keyed_jobs(&node, &receiver, "/serial", flow, 6);
    let all_due = || node.call("GET", "/flow-keys/serial", b"").1["backlog"].as_u64() == Some(6);
    assert!(wait_for(Duration::from_secs(20), all_due).await);
    assert_eq!(post(&node, "/flow-keys/serial/resume", json!({})).0, 200);
    assert!(wait_for(Duration::from_secs(40), || on(&receiver, "/serial").len() >= 7).await);
    let settled = || {
        let key = node.call("GET", "/flow-keys/serial", b"").1;
        key["in_flight"] == 0 && key["backlog"] == 0 && key["active_fires"] == 0
    };
    assert!(wait_for(Duration::from_secs(20), settled).await, "every fire ended");
    let requests = on(&receiver, "/serial");
    assert_eq!(numbers(&requests), [0, 1, 2, 2, 3, 4, 5], "due-time order, the retry before the next fire");
    for pair in requests.windows(2) {
        assert!(pair[1].at_ms >= pair[0].at_ms + 300, "two attempts of the key in flight at once: {pair:?}");
    }
    let (status, key) = node.call("GET", "/flow-keys/serial", b"");
    assert_eq!(status, 200, "{key}");
    assert_eq!(
        (key["parallelism"].as_u64(), key["ordered"].as_bool(), key["jobs"].as_u64()),
        (Some(1), Some(true), Some(6))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_job_that_holds_a_keys_only_slot_lets_the_next_one_go() {
    // /slow answers after 5 s: while its attempt runs, the key's one slot is taken.
    let receiver = Receiver::start(Arc::new(|_, request: &common::Received| {
        Reply::status(200).after_ms(if request.path == "/slow" { 5_000 } else { 0 })
    }))
    .await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let flow = json!({"key": "one-slot", "parallelism": 1});
    let slow = created(&node, json!({"url": to("/slow", &receiver), "delay": 0, "flow": flow}));
    assert!(wait_for(Duration::from_secs(20), || !on(&receiver, "/slow").is_empty()).await);
    created(&node, json!({"url": to("/next", &receiver), "delay": 0, "flow": flow}));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(on(&receiver, "/next").is_empty(), "held while the slot is taken");
    let deleted_ms = now_ms();
    assert_eq!(node.call("DELETE", &format!("/jobs/{slow}"), b"").0, 204);
    assert!(wait_for(Duration::from_secs(20), || !on(&receiver, "/next").is_empty()).await, "released by the delete");
    let next_ms = on(&receiver, "/next")[0].at_ms;
    assert!(next_ms < deleted_ms + 4_000, "not left waiting for the aborted attempt's answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_keys_backfilled_fires_go_one_at_a_time_oldest_first() {
    let receiver = answering(Reply::status(200).after_ms(200)).await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    // Starts tomorrow: it never fires on its own during the test (a backfill ignores start).
    let request = json!({"cron": "0 * * * *", "url": to("/hourly", &receiver), "start_at": now_ms() + 86_400_000,
        "flow": {"key": "hourly", "ordered": true}});
    let id = created(&node, request);
    let hour_ms = 3_600_000;
    let this_hour = now_ms() / hour_ms * hour_ms;
    let range = json!({"from": this_hour - 4 * hour_ms, "to": this_hour - 1});
    let (status, backfilled) = post(&node, &format!("/jobs/{id}/backfill"), range);
    let expected: Vec<u64> = (1..=4).rev().map(|h| this_hour - h * hour_ms).collect();
    assert_eq!((status, backfilled["fires_added"].clone()), (200, json!(expected)), "{backfilled}");
    assert!(wait_for(Duration::from_secs(30), || on(&receiver, "/hourly").len() >= 4).await, "none held forever");
    let requests = on(&receiver, "/hourly");
    let keys: Vec<String> = requests.iter().map(key_of).collect();
    assert_eq!(keys, expected.iter().map(|t| format!("{id}:{t}")).collect::<Vec<_>>(), "oldest first");
    for pair in requests.windows(2) {
        assert!(pair[1].at_ms >= pair[0].at_ms + 200, "one at a time: {pair:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_rate_holds_over_a_run_its_pause_holds_everything_and_nothing_is_dropped() {
    let receiver = answering(Reply::status(200)).await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let flow = json!({"key": "tenant-7", "rate": 3, "period": "1s"});
    // Paused before its jobs come due: nothing goes out until it is resumed.
    assert_eq!(post(&node, "/flow-keys/tenant-7/pause", json!({})).0, 200);
    keyed_jobs(&node, &receiver, "/rated", flow, 12);
    let backlog = || node.call("GET", "/flow-keys/tenant-7", b"").1["backlog"].as_u64() == Some(12);
    assert!(wait_for(Duration::from_secs(10), backlog).await, "12 due and held");
    assert!(on(&receiver, "/rated").is_empty(), "nothing while paused");
    let (status, keys) = node.call("GET", "/flow-keys", b"");
    assert_eq!((status, keys["flow_keys"][0]["paused"].as_bool()), (200, Some(true)), "{keys}");
    assert_eq!(post(&node, "/flow-keys/tenant-7/resume", json!({})).0, 200);
    assert!(wait_for(Duration::from_secs(30), || on(&receiver, "/rated").len() >= 12).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let requests = on(&receiver, "/rated");
    let mut delivered = numbers(&requests);
    delivered.sort_unstable();
    assert_eq!(delivered, (0..12).collect::<Vec<u64>>(), "each once: none dropped, none twice");
    let times: Vec<u64> = requests.iter().map(|r| r.at_ms).collect();
    // At most 3 starts per second: any 4 deliveries span most of a second (half a second
    // of arrival jitter allowed for; without the limit all 12 arrive within a few ms), and
    // 12 take at least 3 periods.
    for window in times.windows(4) {
        assert!(window[3] - window[0] >= 500, "more than 3 within a second: {times:?}");
    }
    assert!(times[11] - times[0] >= 2_500, "{times:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_job_pauses_itself_after_n_failed_fires_and_says_why() {
    let receiver = answering(Reply::status(500)).await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let request = json!({"id": "flaky", "cron": "* * * * * *", "url": to("/flaky", &receiver),
        "retry": {"max_attempts": 1}, "pause_after_failures": 3});
    created(&node, request);
    assert!(wait_for(Duration::from_secs(30), || job(&node, "flaky")["paused"] == true).await);
    let paused = job(&node, "flaky");
    assert_eq!(paused["paused_reason"], "paused itself after 3 failed fires in a row", "{paused}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(on(&receiver, "/flaky").len(), 3, "no fire after the pause");
    let executions = node.call("GET", "/jobs/flaky/executions", b"").1;
    let last = executions["executions"].as_array().and_then(|e| e.last().cloned()).expect("history");
    assert_eq!(last["note"], "paused itself after 3 failed fires in a row");
    let text = node.metrics_text();
    assert!(text.lines().any(|l| l == "sundial_jobs_auto_paused 1"), "the metric counts it");
    assert_eq!(post(&node, "/jobs/flaky/resume", json!({})).0, 200);
    assert_eq!(job(&node, "flaky")["paused_reason"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_now_and_backfill_produce_exactly_the_expected_fires() {
    let receiver = answering(Reply::status(200)).await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    // A yearly job: nothing fires on its own during the test.
    created(&node, json!({"id": "yearly", "cron": "0 0 1 1 *", "url": to("/yearly", &receiver)}));
    let (status, first) = post(&node, "/jobs/yearly/trigger", json!({}));
    assert_eq!(status, 200, "{first}");
    let (_, second) = post(&node, "/jobs/yearly/trigger", json!({}));
    let fired: Vec<u64> =
        [&first, &second].iter().map(|t| t["fires_added"][0].as_u64().expect("a fire time")).collect();
    assert_ne!(fired[0], fired[1], "each trigger is a fire of its own");
    // A daily job backfilled over the three days before today's 03:00.
    let day_ms = 24 * 3600 * 1000;
    // It starts tomorrow, so it never fires on its own during the test.
    let tomorrow = now_ms() + day_ms;
    created(&node, json!({"id": "daily", "cron": "0 3 * * *", "url": to("/daily", &receiver), "start_at": tomorrow}));
    let today_3am = (now_ms() - 3 * 3600 * 1000) / day_ms * day_ms + 3 * 3600 * 1000;
    let range = json!({"from": today_3am - 3 * day_ms, "to": today_3am - 1});
    let (status, backfilled) = post(&node, "/jobs/daily/backfill", range);
    let expected: Vec<u64> = (1..=3).rev().map(|d| today_3am - d * day_ms).collect();
    assert_eq!((status, backfilled["fires_added"].clone()), (200, json!(expected)), "{backfilled}");
    assert!(wait_for(Duration::from_secs(20), || receiver.requests().len() >= 5).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let keys = |path: &str| on(&receiver, path).iter().map(key_of).collect::<BTreeSet<String>>();
    let want = |id: &str, times: &[u64]| times.iter().map(|t| format!("{id}:{t}")).collect::<BTreeSet<String>>();
    assert_eq!(keys("/yearly"), want("yearly", &fired), "two triggers, two fires, nothing else");
    assert_eq!(keys("/daily"), want("daily", &expected), "one fire per past occurrence, each with its key");
    assert_eq!(receiver.requests().len(), 5, "each once");
    // Refusals name the rule: a future range, a range too long, a one-time job, no end.
    let future = post(&node, "/jobs/daily/backfill", json!({"from": now_ms(), "to": now_ms() + day_ms}));
    assert_eq!((future.0, future.1["field"].as_str()), (400, Some("to")), "{}", future.1);
    let years =
        post(&node, "/jobs/daily/backfill", json!({"from": now_ms() - 1_100 * day_ms, "to": now_ms() - day_ms}));
    assert_eq!((years.0, years.1["field"].as_str()), (400, Some("to")), "1,100 fires: {}", years.1);
    assert!(years.1["error"].as_str().is_some_and(|e| e.contains("more than 1000")), "{}", years.1);
    created(&node, json!({"id": "one-time", "run_at": now_ms() + day_ms, "url": to("/x", &receiver)}));
    let once = post(&node, "/jobs/one-time/backfill", json!({"from": 0, "to": 1}));
    assert_eq!((once.0, once.1["field"].as_str()), (400, Some("id")), "{}", once.1);
    let empty = post(&node, "/jobs/yearly/backfill", json!({"from": 0, "to": 1}));
    assert_eq!((empty.0, empty.1["fires_added"].clone()), (200, json!([])), "an empty range adds nothing");
    let missing = post(&node, "/jobs/daily/backfill", json!({"from": 0}));
    assert_eq!((missing.0, missing.1["field"].as_str()), (400, Some("to")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.requests().len(), 5, "and nothing more fired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_replaces_a_schedule_by_id_and_both_apis_have_it() {
    let receiver = answering(Reply::status(200)).await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let soon = json!({"url": to("/old", &receiver), "run_at": now_ms() + 10_000});
    assert_eq!(node.call("PUT", "/jobs/nightly", soon.to_string().as_bytes()).0, 201);
    assert_eq!(node.call("PUT", "/jobs/nightly", soon.to_string().as_bytes()).0, 200, "unchanged");
    // Replaced before it fires: later, elsewhere.
    let later = json!({"url": to("/new", &receiver), "run_at": now_ms() + 12_000});
    let (status, replaced) = node.call("PUT", "/jobs/nightly", later.to_string().as_bytes());
    assert_eq!((status, replaced["webhook_url"].as_str()), (200, Some(to("/new", &receiver).as_str())));
    assert!(wait_for(Duration::from_secs(30), || !on(&receiver, "/new").is_empty()).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(on(&receiver, "/old").is_empty(), "the replaced schedule (due before the new one) never fired");
    assert_eq!(on(&receiver, "/new").len(), 1);
    let wrong_id = json!({"id": "other", "url": to("/new", &receiver), "delay": 0});
    let (status, refused) = node.call("PUT", "/jobs/nightly", wrong_id.to_string().as_bytes());
    assert_eq!((status, refused["field"].as_str()), (400, Some("id")));
    // The binary protocol upserts and triggers too.
    let client = sundial_net::client::Client::connect(node.binary, Default::default()).await.expect("connects");
    let request = json!({"id": "proto", "url": to("/proto", &receiver), "run_at": now_ms() + 3_600_000});
    assert_eq!(client.upsert(&request).await.expect("answered").status, 201);
    let triggered = client.trigger("proto").await.expect("answered");
    assert_eq!(triggered.status, 200, "{}", String::from_utf8_lossy(&triggered.body));
    assert!(wait_for(Duration::from_secs(20), || !on(&receiver, "/proto").is_empty()).await);
    let no_id = client.upsert(&json!({"url": to("/proto", &receiver), "delay": 0})).await.expect("answered");
    assert_eq!(no_id.status, 400, "an upsert names its job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_verbs_by_label_touch_exactly_the_matching_jobs_and_report_it() {
    let receiver = answering(Reply::status(404)).await; // not retryable: straight to the DLQ
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let later = now_ms() + 3_600_000;
    let team =
        |name: &str, n: u64| json!({"url": to("/later", &receiver), "run_at": later + n, "labels": {"team": name}});
    let a: BTreeSet<String> = (0..5).map(|n| created(&node, team("a", n))).collect();
    let b: BTreeSet<String> = (0..3).map(|n| created(&node, team("b", n))).collect();
    let (status, report) = post(&node, "/jobs/bulk", json!({"action": "cancel", "labels": {"team": "a"}}));
    assert_eq!(status, 200, "{report}");
    let done: BTreeSet<String> =
        report["done"].as_array().expect("done").iter().map(|v| v.as_str().expect("id").to_string()).collect();
    assert_eq!((report["matched"].as_u64(), &done, report["more"].as_bool()), (Some(5), &a, Some(false)));
    for id in &a {
        assert_eq!(job(&node, id)["status"], "cancelled");
    }
    for id in &b {
        assert_eq!(job(&node, id)["status"], "pending", "another label: untouched");
    }
    // By ids: each answered, an unknown one reported, not fatal.
    let ids: Vec<&String> = b.iter().collect();
    let (_, report) = post(&node, "/jobs/bulk", json!({"action": "pause", "ids": [ids[0], "no-such-job"]}));
    assert_eq!(report["done"], json!([ids[0]]));
    assert_eq!(
        (report["failed"][0]["id"].as_str(), report["failed"][0]["status"].as_u64()),
        (Some("no-such-job"), Some(404))
    );
    // Dead letters: redriven then purged by label.
    let failing: BTreeSet<String> = (0..3)
        .map(|_| created(&node, json!({"url": to("/gone", &receiver), "delay": 0, "labels": {"batch": "x"}})))
        .collect();
    let dead = || node.call("GET", "/dlq", b"").1["dead_letters"].as_array().map_or(0, Vec::len) == 3;
    assert!(wait_for(Duration::from_secs(20), dead).await);
    let (_, report) = post(&node, "/jobs/bulk", json!({"action": "redrive", "labels": {"batch": "x"}}));
    assert_eq!((report["matched"].as_u64(), report["fires_redriven"].as_u64()), (Some(3), Some(3)), "{report}");
    assert!(
        wait_for(Duration::from_secs(20), || on(&receiver, "/gone").len() == 6 && dead()).await,
        "each again, once"
    );
    let (_, report) = post(&node, "/jobs/bulk", json!({"action": "purge", "labels": {"batch": "x"}, "limit": 10}));
    assert_eq!(report["done"].as_array().map(Vec::len), Some(failing.len()));
    assert_eq!(node.call("GET", "/dlq", b"").1["dead_letters"], json!([]));
    let (status, refused) = post(&node, "/jobs/bulk", json!({"action": "explode", "ids": ["x"]}));
    assert_eq!((status, refused["field"].as_str()), (400, Some("action")));
    let (status, refused) = post(&node, "/jobs/bulk", json!({"action": "cancel", "ids": ["x"], "labels": {"a": "b"}}));
    assert_eq!((status, refused["field"].as_str()), (400, Some("ids")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_key_rotation_deliveries_carry_both_signatures() {
    let receiver = answering(Reply::status(200)).await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(data.path(), &["--secret", "old-secret", "--secret-next", "new-secret"]);
    created(&node, json!({"url": to("/global", &receiver), "delay": 0, "json": {"a": 1}}));
    created(&node, json!({"url": to("/own", &receiver), "delay": 0, "secret": "job-old", "secret_next": "job-new"}));
    assert!(wait_for(Duration::from_secs(20), || receiver.requests().len() >= 2).await);
    let check = |path: &str, good: [&[u8]; 2]| {
        let request = on(&receiver, path).pop().expect("delivered");
        let header = request.header("x-sundial-signature").expect("signed").to_string();
        assert_eq!((header.matches("v1=").count(), header.matches("v2=").count()), (2, 2), "{header}");
        // v2 as a receiver checks it: the method, the URL it was sent to, the Idempotency-Key.
        let url = to(path, &receiver);
        let key = request.header("idempotency-key").expect("keyed").to_string();
        let bound = Bound { method: "POST", url: &url, idempotency_key: &key };
        for secret in good {
            assert!(verify(secret, &header, &request.body, now_ms(), 300_000), "{}", String::from_utf8_lossy(secret));
            assert!(verify_v2(secret, &header, &bound, &request.body, now_ms(), 300_000), "v2 {url}");
            // The same signature, replayed to another URL, does not verify there.
            let elsewhere = Bound { url: "https://payments.example/hook", ..bound };
            assert!(!verify_v2(secret, &header, &elsewhere, &request.body, now_ms(), 300_000), "bound to {url}");
        }
        assert!(!verify(b"retired", &header, &request.body, now_ms(), 300_000), "a third secret does not verify");
    };
    check("/global", [b"old-secret", b"new-secret"]);
    check("/own", [b"job-old", b"job-new"]);
    let (status, refused) = post(&node, "/jobs", json!({"url": to("/x", &receiver), "delay": 0, "secret_next": "n"}));
    assert_eq!((status, refused["field"].as_str()), (400, Some("secret_next")));
}

fn preview(node: &Node, request: Value, from: &str, count: u32) -> Vec<String> {
    let path = format!("/jobs/preview?count={count}&from={from}");
    let (status, answer) = post(node, &path, request);
    assert_eq!(status, 200, "{answer}");
    answer["fires"].as_array().expect("fires").iter().map(|t| t.as_str().expect("time").to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dst_policies_on_a_spring_forward_and_a_fall_back_day_with_real_zone_data() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let url = "https://example.com/hook";
    // Paris, 2026-03-29: 02:30 does not exist. By default it fires after the gap; `skip` does not fire that day.
    let paris = |dst: Value| json!({"cron": "30 2 * * *", "time_zone": "Europe/Paris", "url": url, "dst": dst});
    assert_eq!(
        preview(&node, paris(json!({})), "2026-03-28T12:00:00Z", 2),
        ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]
    );
    assert_eq!(
        preview(&node, paris(json!({"missing": "skip"})), "2026-03-28T12:00:00Z", 2),
        ["2026-03-30T00:30:00Z", "2026-03-31T00:30:00Z"]
    );
    // New York, 2026-11-01: 01:30 happens twice. By default once; `both` fires at each.
    let new_york = |dst: Value| json!({"cron": "30 1 * * *", "time_zone": "America/New_York", "url": url, "dst": dst});
    assert_eq!(
        preview(&node, new_york(json!({})), "2026-10-31T12:00:00Z", 2),
        ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
    );
    assert_eq!(
        preview(&node, new_york(json!({"repeated": "both"})), "2026-10-31T12:00:00Z", 3),
        ["2026-11-01T05:30:00Z", "2026-11-01T06:30:00Z", "2026-11-02T06:30:00Z"]
    );
    // A created job keeps its policy (the job view) and a bad one is named.
    let id = created(
        &node,
        json!({"cron": "30 1 * * *", "time_zone": "America/New_York", "url": url, "dst": {"repeated": "both"}}),
    );
    let shown = job(&node, &id);
    assert_eq!(shown["schedule"]["dst"], json!({"repeated": "both", "missing": "shift"}), "{shown}");
    let (status, refused) = post(&node, "/jobs", new_york(json!({"repeated": "twice"})));
    assert_eq!((status, refused["field"].as_str()), (400, Some("dst.repeated")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_jobs_id_is_refused_as_a_duplicate_for_the_window_across_kill_9() {
    let receiver = answering(Reply::status(200)).await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(data.path(), &["--dedup-window-s", "3600"]);
    let request = json!({"id": "once-only", "url": to("/once", &receiver), "delay": 0});
    created(&node, request.clone());
    assert!(wait_for(Duration::from_secs(20), || job(&node, "once-only")["status"] == "completed").await);
    let (status, refused) = post(&node, "/jobs", request.clone());
    assert_eq!((status, refused["code"].as_str()), (409, Some("duplicate")), "{refused}");
    let until_ms = refused["until_ms"].as_u64().expect("until_ms");
    assert!(until_ms >= now_ms() + 3_500_000, "the window is an hour from the finish");
    assert_eq!(node.call("DELETE", "/jobs/once-only", b"").0, 204);
    node.kill();
    let node = Node::start_with(data.path(), &["--dedup-window-s", "3600"]);
    let (status, refused) = post(&node, "/jobs", request);
    assert_eq!(
        (status, refused["code"].as_str(), refused["until_ms"].as_u64()),
        (409, Some("duplicate"), Some(until_ms))
    );
    assert_eq!(on(&receiver, "/once").len(), 1, "fired once, never again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_leaves_after_the_retention_and_its_id_stays_refused_across_kill_9() {
    let receiver = answering(Reply::status(200)).await;
    let data = tempfile::tempdir().expect("tempdir");
    let flags = ["--retention", "1", "--dedup-window-s", "3600"];
    let node = Node::start_with(data.path(), &flags);
    let request = json!({"id": "short-lived", "url": to("/short", &receiver), "delay": 0});
    created(&node, request.clone());
    let kept = created(&node, json!({"url": to("/later", &receiver), "delay": 3600}));
    assert!(wait_for(Duration::from_secs(20), || job(&node, "short-lived")["status"] == "completed").await);
    let gone = || node.call("GET", "/jobs/short-lived", b"").0 == 404;
    assert!(wait_for(Duration::from_secs(20), gone).await, "expired about a second after it finished");
    assert_eq!(node.call("GET", "/jobs/short-lived/executions", b"").0, 404);
    assert_eq!(job(&node, &kept)["status"], "pending", "a live job is never expired");
    let metrics = node.metrics_text();
    assert!(metrics.lines().any(|line| line == "sundial_jobs_expired 1"), "{metrics}");
    node.kill();
    let node = Node::start_with(data.path(), &flags);
    assert_eq!(node.call("GET", "/jobs/short-lived", b"").0, 404, "still gone after a restart");
    let (status, refused) = post(&node, "/jobs", request);
    assert_eq!((status, refused["code"].as_str()), (409, Some("duplicate")), "{refused}");
    assert_eq!(on(&receiver, "/short").len(), 1, "fired once, never again");
}

/// The CLI has every item: create with callbacks, a flow key, retries, DST and auto-pause
/// flags; upsert, trigger, backfill, redrive, bulk, preview; flow keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_covers_the_lifecycle_verbs_flow_keys_and_the_new_job_settings() {
    let receiver = answering(Reply::status(200)).await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let (hook, callback) = (to("/cli", &receiver), to("/cli-callback", &receiver));
    let (ok, out, err) = node.cli(&[
        "job",
        "create",
        "--url",
        &hook,
        "--cron",
        "0 3 * * *",
        "--flow-key",
        "cli-key",
        "--parallelism",
        "2",
        "--rate",
        "5",
        "--period",
        "2s",
        "--ordered",
        "--on-success",
        &callback,
        "--max-attempts",
        "3",
        "--backoff",
        "100,200",
        "--pause-after-failures",
        "4",
        "--dst-repeated",
        "both",
        "--dst-missing",
        "skip",
        "--label",
        "team=ops",
        "--secret",
        "a",
        "--secret-next",
        "b",
        "--json",
    ]);
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).expect("JSON");
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["flow"]["key"], "cli-key");
    assert_eq!(created["callbacks"]["on_success"], callback);
    let (ok, out, err) = node.cli(&["flow", "list"]);
    assert!(ok && out.contains("cli-key") && out.contains("5/2000ms") && out.contains("ordered"), "{out}{err}");
    let (ok, out, _) = node.cli(&["flow", "pause", "cli-key"]);
    assert!(ok && out.contains("paused"), "{out}");
    assert!(node.cli(&["flow", "resume", "cli-key"]).0);
    let (ok, out, err) = node.cli(&["job", "trigger", &id]);
    assert!(ok && out.starts_with(&format!("triggered {id} (fires ")), "{out}{err}");
    let yesterday = (now_ms() - 24 * 3600 * 1000).to_string();
    let (ok, out, err) = node.cli(&["job", "backfill", &id, "--from", &yesterday, "--to", &now_ms().to_string()]);
    assert!(ok && out.contains("1 fires"), "{out}{err}");
    assert!(wait_for(Duration::from_secs(20), || on(&receiver, "/cli").len() >= 2).await, "trigger and backfill fired");
    assert!(wait_for(Duration::from_secs(20), || on(&receiver, "/cli-callback").len() >= 2).await, "and called back");
    let (ok, out, err) = node.cli(&["job", "upsert", "--id", "cli-up", "--url", &hook, "--delay", "1h"]);
    assert!(ok && out.starts_with("upserted cli-up"), "{out}{err}");
    let (ok, out, err) = node.cli(&["job", "bulk", "cancel", "--label", "team=ops"]);
    assert!(ok && out.starts_with("cancel: 1 matched, 1 done, 0 failed"), "{out}{err}");
    let (ok, out, _) = node.cli(&["job", "bulk", "pause", "--ids", "cli-up,nope"]);
    assert!(ok && out.contains("nope 404"), "{out}");
    assert!(node.cli(&["job", "resume", "cli-up"]).0);
    assert!(node.cli(&["job", "redrive", "cli-up"]).0, "no dead letters: nothing to redrive, not an error");
    let (ok, out, err) = node.cli(&[
        "job",
        "preview",
        "--url",
        &hook,
        "--cron",
        "30 2 * * *",
        "--time-zone",
        "Europe/Paris",
        "--dst-missing",
        "skip",
        "--from",
        "2026-03-28T12:00:00Z",
        "--count",
        "1",
    ]);
    assert!(ok && out == "2026-03-30T00:30:00Z\n", "{out}{err}");
    let (ok, _, err) = node.cli(&["job", "bulk", "cancel"]);
    assert!(!ok && err.contains("--ids or at least one --label"), "{err}");
}

/// What a small receiver saw: connections open now and at most, and each delivery.
#[derive(Default)]
struct SmallServerLog {
    open: usize,
    most_open: usize,
    /// (idempotency key, attempt number, arrival ms).
    deliveries: Vec<(String, String, u64)>,
}

/// A small server on 127.0.0.1: an accept queue of 4 and 4 workers, each request taking
/// 2 ms of one worker; it counts the connections open to it.
async fn small_server() -> (std::net::SocketAddr, Arc<std::sync::Mutex<SmallServerLog>>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("address")).expect("bind");
    let listener = socket.listen(4).expect("listen");
    let addr = listener.local_addr().expect("address");
    let log: Arc<std::sync::Mutex<SmallServerLog>> = Arc::default();
    let workers = Arc::new(tokio::sync::Semaphore::new(4));
    let seen = log.clone();
    tokio::spawn(async move {
        // Bounded by the test's runtime.
        while let Ok((stream, _)) = listener.accept().await {
            {
                let mut log = seen.lock().expect("log");
                log.open += 1;
                log.most_open = log.most_open.max(log.open);
            }
            let (seen, workers) = (seen.clone(), workers.clone());
            tokio::spawn(async move {
                let log = seen.clone();
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let (log, workers) = (log.clone(), workers.clone());
                    async move {
                        let _worker = workers.acquire_owned().await.expect("open");
                        let header = |name: &str| {
                            request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
                        };
                        let (key, attempt) = (header("idempotency-key"), header("x-sundial-attempt"));
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        log.lock().expect("log").deliveries.push((key, attempt, now_ms()));
                        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"ok"));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                seen.lock().expect("log").open -= 1;
            });
        }
    });
    (addr, log)
}

/// 2,000 jobs due in the same second, all to one small server: the node never holds more
/// connections to it than `per_host_concurrency` (one dispatcher and one pool per node,
/// not one per partition), every job arrives, none early, and a job arrives again only as
/// a later attempt (after one that failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_receiver_gets_every_job_over_no_more_connections_than_the_per_host_limit() {
    let (addr, log) = small_server().await;
    let data = tempfile::tempdir().expect("temp dir");
    let node = Node::start_with(data.path(), &["--per-host-concurrency", "8"]);
    let due_ms = (now_ms() / 1000 + 4) * 1000;
    for batch in 0..2 {
        let jobs: Vec<Value> = (0..1000)
            .map(|i| json!({"id": format!("small-{batch}-{i}"), "run_at": due_ms + i % 1000, "url": format!("http://{addr}/hook")}))
            .collect();
        let (status, answer) = post(&node, "/jobs/batch", json!({ "jobs": jobs }));
        assert_eq!(status, 200, "{answer}");
    }
    let arrived = || log.lock().expect("log").deliveries.iter().map(|d| d.0.clone()).collect::<BTreeSet<_>>().len();
    assert!(wait_for(Duration::from_secs(90), || arrived() == 2000).await, "{} of 2000 arrived", arrived());
    let log = log.lock().expect("log");
    assert!(log.most_open <= 8, "{} connections were open at once; the limit is 8", log.most_open);
    let mut attempts: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for (key, attempt, at_ms) in &log.deliveries {
        let fire_ms: u64 = key.rsplit(':').next().and_then(|ms| ms.parse().ok()).expect("key ends with the fire time");
        assert!(*at_ms >= fire_ms, "{key} arrived {} ms early", fire_ms - at_ms);
        attempts.entry(key).or_default().push(attempt);
    }
    for (key, seen) in attempts {
        let distinct: BTreeSet<&&str> = seen.iter().collect();
        assert_eq!(distinct.len(), seen.len(), "{key} arrived again as the same attempt: {seen:?}");
    }
    node.kill();
}

/// A host answering 503 is sent fewer attempts at once: its adaptive limit drops below
/// `per_host_concurrency`, and /metrics shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_answering_503_gets_a_lower_limit_shown_in_the_metrics() {
    let receiver = answering(Reply::status(503)).await;
    let data = tempfile::tempdir().expect("temp dir");
    let node = Node::start_with(data.path(), &["--per-host-concurrency", "8"]);
    let id = created(&node, json!({"url": to("/busy", &receiver), "delay": 0, "retry": {"max_attempts": 1}}));
    assert!(wait_for(Duration::from_secs(30), || job(&node, &id)["status"] == "failed").await);
    let host = receiver.url("");
    let line = node
        .metrics_text()
        .lines()
        .find(|line| line.starts_with("sundial_dispatch_host_limit{") && line.contains(&host))
        .map(str::to_string);
    let limit: u32 = line.as_deref().and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).expect("shown");
    assert!(limit < 8, "the limit after a 503 is {limit}");
    node.kill();
}
