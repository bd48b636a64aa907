//! The real `sundial` binary on a free loopback port, with a real webhook receiver: a job
//! created over HTTP fires with its body and key; bad input is refused and creates nothing;
//! a cancel prevents the fire; kill -9 with jobs pending, then a restart, fires each once.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::now_ms;

mod support;
use support::{listening_addresses, receiver, wait_for, Hit, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_created_over_http_fires_and_bad_input_creates_nothing() {
    let (target, hits) = receiver().await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let run_at = now_ms() + 1_000;
    let request =
        json!({"id": "hello", "run_at": run_at, "url": format!("http://{target}/hook"), "json": {"hello": "world"}});
    let (status, job) = node.call("POST", "/jobs", request.to_string().as_bytes());
    assert_eq!((status, job["id"].as_str(), job["status"].as_str()), (201, Some("hello"), Some("pending")), "{job}");
    assert!(wait_for(Duration::from_secs(20), || hits.lock().expect("hits").len() == 1).await, "it fired");
    let hit = hits.lock().expect("hits")[0].clone();
    // Not early, and on time within a bound generous enough for a loaded CI machine (the
    // exact lateness is a benchmark's business).
    assert!(hit.at_ms >= run_at && hit.at_ms < run_at + 5_000, "fired {} ms after its time", hit.at_ms - run_at);
    let header = |name: &str| hit.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    assert_eq!(header("x-sundial-job-id").as_deref(), Some("hello"));
    assert_eq!(header("x-sundial-attempt").as_deref(), Some("1"));
    assert!(header("traceparent").is_some_and(|t| t.len() == 55), "{:?}", hit.headers);
    assert_eq!((hit.key, hit.body), (format!("hello:{run_at}"), br#"{"hello":"world"}"#.to_vec()));
    let completed =
        wait_for(Duration::from_secs(10), || node.call("GET", "/jobs/hello/status", b"").1["status"] == "completed")
            .await;
    assert!(completed);
    let (_, executions) = node.call("GET", "/jobs/hello/executions", b"");
    assert_eq!(executions["executions"][0]["status_code"], 200);

    // Bad input: each refused with a 4xx naming the problem; nothing is created.
    let (status, error) = node.call("POST", "/jobs", b"{not json");
    assert_eq!((status, error["code"].as_str()), (400, Some("malformed_json")));
    let bad_cron = json!({"cron": "61 * * * *", "url": format!("http://{target}/")});
    let (status, error) = node.call("POST", "/jobs", bad_cron.to_string().as_bytes());
    assert_eq!((status, error["field"].as_str()), (400, Some("cron")), "{error}");
    let (status, error) = node.call("POST", "/jobs", json!({"delay": 5, "url": "not a url"}).to_string().as_bytes());
    assert_eq!((status, error["field"].as_str()), (400, Some("url")), "{error}");
    let (status, _) = node.call("POST", "/jobs", &vec![b' '; 600 * 1024]);
    assert_eq!(status, 413);
    let past = json!({"run_at": now_ms() - 3 * 24 * 3_600_000, "url": format!("http://{target}/")});
    let (status, error) = node.call("POST", "/jobs", past.to_string().as_bytes());
    assert_eq!((status, error["field"].as_str()), (400, Some("run_at")), "{error}");
    let bad_zone = json!({"cron": "0 9 * * *", "time_zone": "Mars/Olympus_Mons", "url": format!("http://{target}/")});
    let (status, error) = node.call("POST", "/jobs", bad_zone.to_string().as_bytes());
    assert_eq!((status, error["field"].as_str()), (400, Some("time_zone")), "{error}");
    assert_eq!(node.call("GET", "/jobs/hello/nonsense", b"").0, 404, "an unknown route, not a wrong method");
    assert_eq!(node.call("GET", "/jobs", b"").1["jobs"].as_array().map(Vec::len), Some(1), "only the good job exists");
    assert_eq!(node.call("GET", "/jobs/nope", b"").0, 404);

    // A cancel before the fire prevents it.
    let later = json!({"id": "cancelled", "delay": "6s", "url": format!("http://{target}/later")});
    assert_eq!(node.call("POST", "/jobs", later.to_string().as_bytes()).0, 201);
    let (status, job) = node.call("POST", "/jobs/cancelled/cancel", b"");
    assert_eq!((status, job["status"].as_str()), (200, Some("cancelled")));
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(hits.lock().expect("hits").len(), 1, "the cancelled job never fired");
    assert_eq!(node.call("GET", "/health", b"").1["jobs"]["cancelled"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_minus_9_every_acknowledged_job_fires_exactly_once() {
    const JOBS: usize = 1_000;
    let (target, hits) = receiver().await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    // Due well after the creates and the kill: none can fire before the restart.
    let run_at = now_ms() + 10_000;
    let jobs: Vec<Value> = (0..JOBS)
        .map(|i| json!({"id": format!("job-{i}"), "run_at": run_at, "url": format!("http://{target}/")}))
        .collect();
    let (status, results) = node.call("POST", "/jobs/batch", json!({"jobs": jobs}).to_string().as_bytes());
    assert_eq!(status, 200);
    let created = results["results"].as_array().expect("results").iter().filter(|r| r["status"] == 201).count();
    assert_eq!(created, JOBS, "every job acknowledged");
    assert!(now_ms() < run_at, "the creates took too long for this test's premise");
    node.kill();
    assert!(hits.lock().expect("hits").is_empty());
    let node = Node::start(data.path());
    assert_each_fires_once(&hits, JOBS, run_at, Duration::from_secs(60)).await;
    drop(node);
}

/// Waits (up to `limit`) until `jobs` jobs fired, a little longer to see any duplicate, then
/// asserts each fired exactly once (by idempotency key) and none before `run_at`.
async fn assert_each_fires_once(hits: &Arc<Mutex<Vec<support::Hit>>>, jobs: usize, run_at: u64, limit: Duration) {
    let all_fired = wait_for(limit, || hits.lock().expect("hits").len() >= jobs).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hits = hits.lock().expect("hits").clone();
    assert!(all_fired, "{} of {jobs} fired", hits.len());
    let mut keys: Vec<String> = hits.iter().map(|h| h.key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!((keys.len(), hits.len()), (jobs, jobs), "each job fired exactly once");
    assert!(hits.iter().all(|h| h.at_ms >= run_at), "none early");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_in_linked_snapshots_survive_two_kill_9s_and_fire_exactly_once() {
    const ROUNDS: usize = 3;
    const JOBS_PER_ROUND: usize = 400;
    let (target, hits) = receiver().await;
    let data = tempfile::tempdir().expect("tempdir");
    // Two partitions and a snapshot every 50 entries (or an eighth of the jobs): each round
    // takes several linked snapshots, and a kill may land while one is written.
    let options = ["--partitions", "2", "--snapshot-every", "50"];
    // Due well after the creates and both kills: none can fire before the last restart.
    let run_at = now_ms() + 20_000;
    let mut node = Node::start_with(data.path(), &options);
    for round in 0..ROUNDS {
        for batch in 0..JOBS_PER_ROUND / 100 {
            let jobs: Vec<Value> = (0..100)
                .map(|i| {
                    let id = format!("job-{round}-{batch}-{i}");
                    json!({"id": id, "run_at": run_at, "url": format!("http://{target}/"), "body": "x".repeat(200)})
                })
                .collect();
            let (status, results) = node.call("POST", "/jobs/batch", json!({"jobs": jobs}).to_string().as_bytes());
            let created = results["results"].as_array().map_or(0, |r| r.iter().filter(|r| r["status"] == 201).count());
            assert_eq!((status, created), (200, 100), "every job acknowledged");
        }
        if round + 1 < ROUNDS {
            let snapshots =
                node.metrics_text().lines().filter(|l| l.starts_with("sundial_snapshot_seconds_count")).count();
            assert!(snapshots > 0, "snapshots were taken");
            node.kill();
            let specs = data.path().join("partition-0").join("specs");
            assert!(std::fs::read_dir(&specs).map_or(0, Iterator::count) > 0, "spec segments stay on disk");
            node = Node::start_with(data.path(), &options);
        }
    }
    assert!(now_ms() < run_at, "the creates and restarts took too long for this test's premise");
    assert_each_fires_once(&hits, ROUNDS * JOBS_PER_ROUND, run_at, Duration::from_secs(90)).await;
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_refuses_creates_with_507_and_keeps_serving() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(data.path(), &["--max-jobs", "3"]);
    let request = |id: &str| json!({"id": id, "delay": "1h", "url": "http://127.0.0.1:9/"}).to_string();
    for id in ["a", "b", "c"] {
        assert_eq!(node.call("POST", "/jobs", request(id).as_bytes()).0, 201);
    }
    let (status, head, error) = node.call_with_headers("POST", "/jobs", request("d").as_bytes());
    assert_eq!((status, error["code"].as_str()), (507, Some("storage_full")), "{error}");
    assert!(head.contains("retry-after: 30"), "{head}");
    assert_eq!(node.call("GET", "/jobs/a", b"").0, 200, "what was accepted is still served");
    assert_eq!(node.call("GET", "/jobs/d", b"").0, 404, "the refused job does not exist");
    // Invalid input is still named as such on a full node (validation comes first).
    let (status, error) = node.call("POST", "/jobs", json!({"delay": 5, "url": "ftp://bad"}).to_string().as_bytes());
    assert_eq!((status, error["field"].as_str()), (400, Some("url")), "{error}");
    // A batch answers each request in order.
    let batch = json!({"jobs": [{"id": "x", "delay": "1h", "url": "http://127.0.0.1:9/"}]}).to_string();
    let (status, results) = node.call("POST", "/jobs/batch", batch.as_bytes());
    assert_eq!((status, results["results"][0]["status"].as_u64()), (200, Some(507)), "{results}");
    // Finished jobs do not count: cancelling one makes room.
    assert_eq!(node.call("POST", "/jobs/a/cancel", b"").0, 200);
    assert_eq!(node.call("POST", "/jobs", request("d").as_bytes()).0, 201);
    assert_eq!(node.call("GET", "/dlq", b"").1["dead_letters"].as_array().map(Vec::len), Some(0));
    node.kill();

    // The memory limit: a node over it refuses creates the same way and serves the rest.
    let node = Node::start_with(data.path(), &["--max-memory-mb", "1"]);
    let (status, head, error) = node.call_with_headers("POST", "/jobs", request("e").as_bytes());
    assert_eq!((status, error["code"].as_str()), (507, Some("storage_full")), "{error}");
    assert!(error["error"].as_str().is_some_and(|e| e.contains("memory")) && head.contains("retry-after"), "{error}");
    assert_eq!(node.call("GET", "/jobs/d", b"").0, 200);
    assert_eq!(node.call("GET", "/health", b"").1["memory"]["limit_bytes"], 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_creates_each_job_or_names_its_problem() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let batch = json!({"jobs": [
        {"id": "one", "delay": "1h", "url": "http://127.0.0.1:9/"},
        {"id": "two", "delay": "1h", "url": "ftp://bad"},
        {"id": "three", "cron": "*/5 * * * *", "url": "http://127.0.0.1:9/"}
    ]});
    let (status, results) = node.call("POST", "/jobs/batch", batch.to_string().as_bytes());
    assert_eq!(status, 200);
    let statuses: Vec<u64> =
        results["results"].as_array().expect("results").iter().filter_map(|r| r["status"].as_u64()).collect();
    assert_eq!(statuses, [201, 400, 201]);
    assert_eq!(results["results"][1]["body"]["field"], "url");
    assert_eq!(node.call("GET", "/jobs", b"").1["jobs"].as_array().map(Vec::len), Some(2));
}

/// A bulk loader asks for ids only (HTTP `Prefer: return=minimal`, the binary MINIMAL
/// flag): each create is answered `{"id"}` with its usual status, refusals keep their
/// whole error, and the jobs are the same as with full answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_answered_with_ids_only_when_the_client_prefers_it() {
    use sundial_net::{Client, ClientOptions};
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let minimal = "prefer: return=minimal\r\n";
    let run_at = now_ms() + 3_600_000;
    let one = json!({"id": "min-1", "run_at": run_at, "url": "http://127.0.0.1:9/"}).to_string();
    let (status, head, body) = node.exchange("POST", "/jobs", one.as_bytes(), minimal);
    assert_eq!((status, &body), (201, &json!({"id": "min-1"})), "{head}");
    assert!(head.to_ascii_lowercase().contains("preference-applied: return=minimal"), "{head}");
    let (status, _, body) = node.exchange("POST", "/jobs", one.as_bytes(), minimal);
    assert_eq!((status, &body), (200, &json!({"id": "min-1"})), "the same job again");
    let (status, head, full) = node.call_with_headers("POST", "/jobs", one.as_bytes());
    assert_eq!((status, full["status"].as_str()), (200, Some("pending")), "without the preference: the job");
    assert!(!head.to_ascii_lowercase().contains("preference-applied"), "{head}");
    let batch = json!({"jobs": [
        {"delay": "1h", "url": "http://127.0.0.1:9/"},
        {"id": "min-bad", "delay": "1h", "url": "ftp://bad"}
    ]});
    let (status, _, results) = node.exchange("POST", "/jobs/batch", batch.to_string().as_bytes(), minimal);
    assert_eq!(status, 200);
    let chosen = results["results"][0]["body"]["id"].as_str().expect("the chosen id").to_string();
    assert_eq!(results["results"][0]["body"].as_object().map(|o| o.len()), Some(1), "{results}");
    assert_eq!(
        (results["results"][1]["status"].as_u64(), results["results"][1]["body"]["field"].as_str()),
        (Some(400), Some("url"))
    );
    let bad = json!({"id": "min-bad", "delay": "1h", "url": "ftp://bad"}).to_string();
    let (status, head, body) = node.exchange("POST", "/jobs", bad.as_bytes(), minimal);
    assert_eq!((status, body["field"].as_str()), (400, Some("url")), "a refusal keeps its whole error");
    assert!(!head.to_ascii_lowercase().contains("preference-applied"), "{head}");
    let put = json!({"delay": "2h", "url": "http://127.0.0.1:9/put"}).to_string();
    let spaced = "prefer: respond-async, return = \"minimal\"\r\n";
    let (status, _, body) = node.exchange("PUT", "/jobs/min-1/", put.as_bytes(), spaced);
    assert_eq!((status, &body), (200, &json!({"id": "min-1"})), "an upsert");
    let (_, read) = node.call("GET", "/jobs/min-1", b"");
    assert_eq!(read["webhook_url"].as_str(), Some("http://127.0.0.1:9/put"), "{read}");
    assert_eq!(node.call("GET", &format!("/jobs/{chosen}"), b"").0, 200);

    let options = ClientOptions { minimal_answers: true, ..ClientOptions::default() };
    let client = Client::connect(node.binary, options).await.expect("connect");
    let many: Vec<Value> =
        (0..300).map(|i| json!({"id": format!("bin-{i}"), "delay": "1h", "url": "http://127.0.0.1:9/"})).collect();
    let items = client.create_many(&many).await.expect("create many");
    for (i, item) in items.iter().enumerate() {
        assert_eq!((item.status, item.json()), (201, json!({"id": format!("bin-{i}")})));
    }
    let upserted = client.upsert(&json!({"id": "bin-0", "delay": "3h", "url": "http://127.0.0.1:9/u"})).await;
    assert_eq!(upserted.map(|i| (i.status, i.json())).expect("upsert"), (200, json!({"id": "bin-0"})));
    assert_eq!(client.get("bin-299").await.expect("get").json()["status"], "pending", "reads are whole");
    let (_, health) = node.call("GET", "/health", b"");
    assert_eq!(health["jobs"]["pending"], 302, "min-1, the chosen one and 300: {health}");

    // A turn whose batch does not fit one frame is split into a frame per job; with fewer
    // frames allowed in flight than that, the client sends what it has before waiting for
    // room (it used to wait with them unsent, for ever).
    let options = ClientOptions { minimal_answers: true, in_flight_max: 2, ..ClientOptions::default() };
    let client = Client::connect(node.binary, options).await.expect("connect");
    let body = "b".repeat(200 * 1024);
    let large: Vec<Value> = (0..24)
        .map(|i| json!({"id": format!("large-{i}"), "delay": "1h", "url": "http://127.0.0.1:9/", "json": {"b": body}}))
        .collect();
    let items = tokio::time::timeout(Duration::from_secs(60), client.create_many(&large))
        .await
        .expect("answered, not stuck")
        .expect("create many");
    assert!(items.iter().all(|item| item.status == 201), "{:?}", items.iter().map(|i| i.status).collect::<Vec<_>>());
}

#[test]
fn sigterm_stops_the_node_cleanly() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(data.path());
    assert_eq!(node.call("GET", "/health", b"").0, 200);
    let pid = node.child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    assert!(sent.success());
    let started = Instant::now();
    // Bounded: 20 s.
    let status = loop {
        if let Some(status) = node.child.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "still running 20 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

/// The OpenAPI document matches the router: every path and method it lists is routed (no
/// 404 "no route" or 405), and every route the tests use is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_exactly_the_routes_that_answer() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let (status, document) = node.call("GET", "/openapi.json", b"");
    assert_eq!(status, 200);
    let paths = document["paths"].as_object().expect("paths");
    assert!(paths.len() >= 12, "{}", paths.len());
    for (path, methods) in paths {
        let concrete = path.replace("{id}", "no-such-job").replace("{fire_ms}", "1").replace("{key}", "no-such-key");
        for method in methods.as_object().expect("methods").keys() {
            let (status, body) = node.call(&method.to_uppercase(), &concrete, b"{}");
            assert!(
                status != 405 && body["error"].as_str().is_none_or(|e| !e.starts_with("no route")),
                "{method} {path}: {status} {body}"
            );
        }
    }
    for used in [
        "/jobs",
        "/jobs/{id}",
        "/jobs/{id}/status",
        "/jobs/{id}/executions",
        "/jobs/{id}/cancel",
        "/jobs/batch",
        "/jobs/bulk",
        "/jobs/preview",
        "/jobs/{id}/trigger",
        "/jobs/{id}/backfill",
        "/jobs/{id}/redrive",
        "/flow-keys",
        "/flow-keys/{key}",
        "/flow-keys/{key}/pause",
        "/flow-keys/{key}/resume",
        "/dlq",
        "/health",
        "/metrics",
        "/debug/cluster",
    ] {
        assert!(paths.contains_key(used), "{used} is missing from the document");
    }
    assert!(paths["/jobs/{id}"]["put"].is_object(), "upsert is documented");
    // And an unknown route is a 404 naming it.
    assert_eq!(node.call("GET", "/nope", b"").0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_configured_requests_need_it_and_are_rate_limited() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(data.path(), &["--token", "s3cret-token-0123456789", "--rate-per-token", "5"]);
    assert_eq!(node.call("GET", "/jobs", b"").0, 401, "no token");
    assert_eq!(node.call_authorized("GET", "/jobs", "wrong").0, 401, "a wrong token");
    assert_eq!(node.call("GET", "/health", b"").0, 200, "health stays open for probes");
    let statuses: Vec<u16> =
        (0..20).map(|_| node.call_authorized("GET", "/jobs", "s3cret-token-0123456789").0).collect();
    assert_eq!(statuses[0], 200, "the right token");
    assert!(statuses.contains(&429), "20 requests at once pass a burst of 5: {statuses:?}");
}

#[test]
fn json_logs_name_the_job_on_every_line_about_it() {
    let data = tempfile::tempdir().expect("tempdir");
    // Per-job lines for routine events ("job created") are debug: at volume they cost more
    // than the work they describe.
    let mut child = Command::new(support::sundial_bin())
        .args(["--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--log-format", "json", "--log-level", "debug"])
        .arg("--data")
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sundial");
    let (addr, binary) = listening_addresses(&mut child);
    let logs: Arc<Mutex<Vec<String>>> = Arc::default();
    let collected = logs.clone();
    let stderr = child.stderr.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            collected.lock().expect("logs").push(line);
        }
    });
    let node = Node { child, addr, binary };
    let request = json!({"id": "logged", "delay": "1h", "url": "http://127.0.0.1:9/"});
    assert_eq!(node.call("POST", "/jobs", request.to_string().as_bytes()).0, 201);
    let started = Instant::now();
    // Bounded: 10 s for the line to arrive.
    let line = loop {
        let found = logs.lock().expect("logs").iter().find(|l| l.contains("job created")).cloned();
        if let Some(line) = found {
            break line;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no 'job created' line: {:?}", logs.lock().expect("logs"));
        std::thread::sleep(Duration::from_millis(20));
    };
    let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(event["fields"]["job_id"], "logged", "{event}");
    assert_eq!(event["level"], "DEBUG");
    assert!(logs.lock().expect("logs").iter().all(|l| serde_json::from_str::<Value>(l).is_ok()), "every line is JSON");
}

/// `GET /metrics` as text.
/// The sum of a metric's samples (all label sets) in a text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The metrics a fired job leaves behind are there, and the exposition passes
/// `promtool check metrics` (Debian's prometheus package; .ci/run installs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_pass_promtool() {
    let (target, hits) = receiver().await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let request = json!({"delay": "1s", "url": format!("http://{target}/m")});
    assert_eq!(node.call("POST", "/jobs", request.to_string().as_bytes()).0, 201);
    assert_eq!(node.call("POST", "/jobs", b"{bad").0, 400);
    assert!(wait_for(Duration::from_secs(20), || hits.lock().expect("hits").len() == 1).await, "it fired");
    assert!(
        wait_for(Duration::from_secs(10), || node.call("GET", "/health", b"").1["jobs"]["completed"] == 1).await,
        "it completed"
    );
    let text = node.metrics_text();
    assert_eq!(metric_sum(&text, "sundial_jobs_created_total"), 1.0, "{text}");
    assert_eq!(metric_sum(&text, "sundial_jobs_rejected_total"), 1.0);
    assert!(text.contains("sundial_jobs_rejected_total{reason=\"malformed_json\"} 1"), "{text}");
    assert_eq!(metric_sum(&text, "sundial_webhook_outcomes_total"), 1.0);
    assert!(text.contains("sundial_webhook_outcomes_total{class=\"2xx\"} 1"));
    assert_eq!(metric_sum(&text, "sundial_fire_lateness_seconds_count"), 1.0);
    assert_eq!(metric_sum(&text, "sundial_attempt_duration_seconds_count"), 1.0);
    assert!(metric_sum(&text, "sundial_wal_fsync_seconds_count") >= 3.0, "create, start and finish were written");
    assert!(metric_sum(&text, "sundial_apply_latency_seconds_count") >= 1.0);
    assert!(text.contains("sundial_jobs{status=\"completed\"} 1"));
    for name in [
        "sundial_dispatch_queue_depth",
        "sundial_dead_letters",
        "sundial_retries_total",
        "sundial_raft_elections_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }

    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut promtool = promtool.expect("promtool runs (apt-get install prometheus; .ci/run does)");
    promtool.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let checked = promtool.wait_with_output().expect("promtool ends");
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // The checker is not a rubber stamp: a counter without its suffix is refused.
    let mut broken = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let bad = "# HELP sundial_bad A counter named wrongly.\n# TYPE sundial_bad counter\nsundial_bad 1\n";
    broken.stdin.take().expect("stdin").write_all(bad.as_bytes()).expect("write");
    assert!(!broken.wait_with_output().expect("promtool ends").status.success());
}

/// Jobs spread over the partitions (16 by default, on every shard); the count is kept in
/// the cluster's metadata and a start asking for another is refused; a job that depends on
/// another lives in its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_spread_over_partitions_whose_count_is_fixed_at_creation() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(data.path(), &["--shards", "2"]);
    let jobs: Vec<Value> =
        (0..64).map(|i| json!({"id": format!("spread-{i}"), "delay": "1h", "url": "http://127.0.0.1:9/"})).collect();
    let (status, _) = node.call("POST", "/jobs/batch", json!({"jobs": jobs}).to_string().as_bytes());
    assert_eq!(status, 200);
    let (status, cluster) = node.call("GET", "/debug/cluster", b"");
    assert_eq!((status, cluster["partition_count"].as_u64()), (200, Some(16)), "{cluster}");
    let partitions = cluster["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 16);
    let holding = partitions.iter().filter(|p| p["jobs"].as_u64() > Some(0)).count();
    assert!(holding >= 8, "64 jobs landed in only {holding} partitions");
    let shards: std::collections::BTreeSet<u64> = partitions.iter().filter_map(|p| p["shard"].as_u64()).collect();
    assert_eq!(shards.len(), 2, "both shards own partitions");
    assert!(partitions.iter().all(|p| p["role"] == "leader" && p["commit_index"].as_u64() > Some(0)));
    let (_, health) = node.call("GET", "/health", b"");
    assert_eq!((health["jobs"]["pending"].as_u64(), health["shards"].as_u64()), (Some(64), Some(2)), "{health}");
    assert!(health["runtime"].is_string() && health["log_backend"].is_string());
    let listed = node.call("GET", "/jobs?limit=1000", b"").1;
    let listed = listed["jobs"].as_array().expect("jobs").clone();
    assert_eq!(listed.len(), 64);
    let ages: Vec<(u64, String)> = listed
        .iter()
        .map(|j| (j["created_ms"].as_u64().unwrap_or(0), j["id"].as_str().unwrap_or("").to_string()))
        .collect();
    assert!(ages.windows(2).all(|w| w[0] <= w[1]), "oldest first across partitions");
    let (_, first) = node.call("GET", "/jobs?limit=1", b"");
    assert_eq!(first["jobs"][0]["id"].as_str(), Some(ages[0].1.as_str()), "a limit keeps the oldest");

    // A dependent job is placed with its dependency and runs after it.
    let dependent = json!({"delay": "1h", "url": "http://127.0.0.1:9/", "depends_on": ["spread-3"]});
    let (status, job) = node.call("POST", "/jobs", dependent.to_string().as_bytes());
    assert_eq!(status, 201, "{job}");
    let across = json!({"delay": "1h", "url": "http://127.0.0.1:9/", "depends_on": ["spread-0", "spread-1", "spread-2", "spread-3"]});
    let (status, refused) = node.call("POST", "/jobs", across.to_string().as_bytes());
    assert_eq!((status, refused["field"].as_str()), (400, Some("depends_on")), "{refused}");
    node.kill();

    let refused = std::process::Command::new(support::sundial_bin())
        .args(["--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--partitions", "4", "--data"])
        .arg(data.path())
        .output()
        .expect("run sundial");
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("created with 16 partitions"), "{message}");
    let node = Node::start_with(data.path(), &["--shards", "1"]);
    assert_eq!(node.call("GET", "/health", b"").1["jobs"]["pending"], 65, "every job back, on one shard");
}

/// A data directory written in another format is refused at start, naming both versions
/// and what to do — never read as this build's: the directory's own format, and a log
/// segment's.
#[test]
fn a_data_directory_of_another_format_is_refused_naming_both_versions() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(data.path(), &["--partitions", "2"]);
    assert_eq!(node.call("POST", "/jobs", br#"{"id": "kept", "delay": "1h", "url": "http://127.0.0.1:9/"}"#).0, 201);
    node.kill();
    // The node must exit: one that started after all is killed and the test fails.
    let start = || {
        let mut child = std::process::Command::new(support::sundial_bin())
            .args(["--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--data"])
            .arg(data.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run sundial");
        for _ in 0..200 {
            if child.try_wait().expect("wait").is_some() {
                return child.wait_with_output().expect("its output");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = child.kill();
        panic!("the node started on a directory of another format");
    };
    let meta = data.path().join("cluster.json");
    let written = std::fs::read_to_string(&meta).expect("cluster.json");
    assert!(written.contains("\"format\": 1"), "{written}");
    std::fs::write(&meta, written.replace("\"format\": 1", "\"format\": 2")).expect("rewrite");
    let refused = start();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{message}");
    assert!(
        message.contains("format 2, this build reads format 1: run the Sundial version that wrote it"),
        "{message}"
    );
    std::fs::write(&meta, &written).expect("put back");

    let partition = data.path().join("partition-0");
    let segment = std::fs::read_dir(&partition)
        .expect("partition dir")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|e| e == "wal") && !path.to_string_lossy().contains("free-"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("segment");
    let version = bytes[8..12].to_vec();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&segment, &bytes).expect("rewrite");
    let refused = start();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{message}");
    assert!(message.contains("log segment format version 2, this build reads version 1"), "{message}");
    bytes[8..12].copy_from_slice(&version);
    std::fs::write(&segment, &bytes).expect("put back");
    let node = Node::start_with(data.path(), &[]);
    assert_eq!(node.call("GET", "/jobs/kept", b"").0, 200, "the same directory, put back, serves its job");
}

/// The binary protocol end to end with the Rust client: a job created over it fires with its
/// body and headers, a cancel prevents a fire, hundreds of creates travel in batches, and bad
/// input — an invalid job, an unknown protocol version, an oversized frame, a missing token —
/// gets a protocol error that says why while the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_protocol_creates_reads_and_cancels_and_refuses_bad_frames() {
    use sundial_net::codec::{self, Code, Frame, Message};
    use sundial_net::{Client, ClientError, ClientOptions};
    let (target, hits) = receiver().await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let client = Client::connect(node.binary, ClientOptions::default()).await.expect("connect");
    assert_eq!(client.info().await.expect("info").partitions, 16);

    let run_at = now_ms() + 1_000;
    let request = json!({"id": "over-binary", "run_at": run_at, "url": format!("http://{target}/b"),
        "headers": {"x-source": "binary"}, "json": {"via": "binary"}});
    let created = client.create(&request).await.expect("create");
    assert_eq!((created.status, created.json()["id"].as_str()), (201, Some("over-binary")), "{:?}", created.json());
    let again = client.create(&request).await.expect("create again");
    assert_eq!(again.status, 200, "the same id again is the same job: {:?}", again.json());
    let later = json!({"id": "cancel-me", "run_at": run_at, "url": format!("http://{target}/never")});
    assert_eq!(client.create(&later).await.expect("create").status, 201);
    let cancelled = client.cancel("cancel-me").await.expect("cancel");
    assert_eq!((cancelled.status, cancelled.json()["status"].as_str()), (200, Some("cancelled")));
    assert!(wait_for(Duration::from_secs(20), || !hits.lock().expect("hits").is_empty()).await, "it fired");
    // Both were due together: a second more shows whether the cancelled one fires.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(hits.lock().expect("hits").len(), 1, "the cancelled job never fired");
    let hit = hits.lock().expect("hits")[0].clone();
    assert!(hit.at_ms >= run_at && hit.at_ms < run_at + 5_000, "fired {} ms after its time", hit.at_ms - run_at);
    assert_eq!(
        (hit.key.as_str(), hit.body.as_slice()),
        (format!("over-binary:{run_at}").as_str(), br#"{"via":"binary"}"#.as_slice())
    );
    assert!(hit.headers.contains(&("x-source".to_string(), "binary".to_string())), "{:?}", hit.headers);
    let read = client.get("over-binary").await.expect("get");
    assert_eq!(read.status, 200);
    assert_eq!(client.get("no-such-job").await.expect("get").status, 404);

    // Many creates at once: they travel batched and each gets its answer.
    let many: Vec<Value> = (0..500)
        .map(|i| json!({"id": format!("many-{i}"), "delay": "1h", "url": format!("http://{target}/m")}))
        .collect();
    let items = client.create_many(&many).await.expect("create many");
    assert_eq!(items.iter().filter(|i| i.status == 201).count(), 500);
    // An invalid job is that item's 400, naming the field; its batch-mates are unaffected.
    let mixed =
        [json!({"delay": "1h", "url": "not a url"}), json!({"delay": "1h", "url": format!("http://{target}/ok")})];
    let items = client.create_many(&mixed).await.expect("create");
    assert_eq!((items[0].status, items[0].json()["field"].as_str(), items[1].status), (400, Some("url"), 201));

    // Raw frames: an unknown version is refused with 505 and the reason.
    let exchange = |frame: Vec<u8>| {
        let mut stream = TcpStream::connect(node.binary).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        stream.write_all(&frame).expect("send");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        codec::decode(&answer, codec::FRAME_MAX_BYTES_DEFAULT).expect("a frame").expect("whole").0
    };
    let mut hello = Vec::new();
    let future = Message::Hello { min_version: 2, max_version: 3, token: String::new() };
    codec::encode(&Frame::new(0, future), codec::FRAME_MAX_BYTES_DEFAULT, &mut hello).expect("encode");
    match exchange(hello).message {
        Message::Error { code: Code::UnsupportedVersion, message } => {
            assert!(message.contains("speaks 1"), "{message}")
        }
        other => panic!("expected a version refusal, got {other:?}"),
    }
    // An oversized frame after a good handshake: 413, before its bytes are read.
    let mut frames = Vec::new();
    let hello = Message::Hello { min_version: 1, max_version: 1, token: String::new() };
    codec::encode(&Frame::new(0, hello), codec::FRAME_MAX_BYTES_DEFAULT, &mut frames).expect("encode");
    frames.extend_from_slice(&(64u32 << 20).to_be_bytes());
    frames.extend_from_slice(&[0x10, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
    let mut stream = TcpStream::connect(node.binary).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(&frames).expect("send");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let (welcome, used) = codec::decode(&answer, codec::FRAME_MAX_BYTES_DEFAULT).expect("frame").expect("whole");
    assert!(matches!(welcome.message, Message::Welcome { version: 1, .. }), "{welcome:?}");
    let refusal = codec::decode(&answer[used..], codec::FRAME_MAX_BYTES_DEFAULT).expect("frame").expect("whole").0;
    match refusal.message {
        Message::Error { code: Code::TooLarge, message } => assert!(message.contains("exceeds"), "{message}"),
        other => panic!("expected 413, got {other:?}"),
    }
    // The node still serves, and nothing extra was created.
    assert_eq!(client.get("over-binary").await.expect("get").status, 200);
    let (_, health) = node.call("GET", "/health", b"");
    assert_eq!(health["jobs"]["pending"], 501, "500 batched + the valid one of the mixed pair: {health}");
    drop(client);
    node.kill();

    // With a token configured, a client without it is refused at the handshake.
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(data.path(), &["--token", "s3cret-token-0123456789"]);
    match Client::connect(node.binary, ClientOptions::default()).await {
        Err(ClientError::Refused { code: Code::Unauthorized, .. }) => {}
        other => panic!("expected 401, got {:?}", other.map(|_| "a connection")),
    }
    let options = ClientOptions { token: Some("s3cret-token-0123456789".into()), ..ClientOptions::default() };
    let client = Client::connect(node.binary, options).await.expect("with the token");
    assert_eq!(client.get("none").await.expect("get").status, 404);
}

/// Runs `sundial <args>` as the CLI: (exit success, stdout, stderr).
/// The CLI against a real node: create, get, list, cancel, dlq and status, for people and
/// with --json for scripts; a refusal prints the API's message and exits non-zero.
#[test]
fn the_cli_creates_shows_lists_and_cancels_jobs() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let (ok, out, err) =
        node.cli(&["job", "create", "--id", "cli-1", "--url", "http://127.0.0.1:9/x", "--delay", "1h"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("created cli-1") && out.contains("pending"), "{out}");
    let (ok, out, _) = node.cli(&["job", "get", "cli-1", "--json"]);
    let job: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert!(ok);
    assert_eq!((job["id"].as_str(), job["status"].as_str()), (Some("cli-1"), Some("pending")));
    let (ok, out, _) = node.cli(&[
        "job",
        "create",
        "--url",
        "http://127.0.0.1:9/c",
        "--cron",
        "*/5 * * * *",
        "--time-zone",
        "Europe/Paris",
    ]);
    assert!(ok && out.contains("cron \"*/5 * * * *\" in Europe/Paris"), "{out}");
    let (ok, out, _) = node.cli(&["job", "list"]);
    assert!(ok && out.lines().count() == 3 && out.contains("cli-1"), "a header and two jobs: {out}");
    let (ok, out, _) = node.cli(&["job", "cancel", "cli-1"]);
    assert!(ok && out.contains("cancelled cli-1"), "{out}");
    let (ok, out, _) = node.cli(&["job", "list", "--status", "cancelled", "--json"]);
    let listed: Value = serde_json::from_str(&out).expect("JSON");
    assert!(ok);
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(1));
    let (ok, out, _) = node.cli(&["status"]);
    assert!(ok && out.contains("16 partitions") && out.contains("1 pending") && out.contains("1 cancelled"), "{out}");
    let (ok, out, _) = node.cli(&["dlq", "list"]);
    assert!(ok && out.starts_with("ID"), "{out}");

    // Refusals: the API's message and field, a failing exit status, nothing created.
    let (ok, _, err) = node.cli(&["job", "create", "--url", "not a url", "--delay", "1h"]);
    assert!(!ok && err.contains("400 invalid") && err.contains("url"), "{err}");
    let (ok, _, err) = node.cli(&["job", "get", "nope"]);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) =
        node.cli(&["job", "create", "--url", "http://127.0.0.1:9/", "--delay", "1h", "--cron", "* * * * *"]);
    assert!(!ok && err.contains("exactly one of"), "{err}");
    assert_eq!(node.call("GET", "/health", b"").1["jobs"]["pending"], 1, "only the cron job is pending");
    drop(node);
    let (ok, _, err) = Node::start(data.path()).cli(&["job", "get", "x", "--node", "http://127.0.0.1:1"]);
    assert!(!ok && err.contains("cannot reach"), "{err}");
}

/// Settings come from a TOML file, under the environment, under flags; an unknown key or a
/// bad value stops the start with the setting named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_the_file_the_environment_and_flags_in_that_order() {
    let data = tempfile::tempdir().expect("tempdir");
    let config = data.path().join("sundial.toml");
    std::fs::write(&config, "max_jobs = 1\npartitions = 4\n").expect("write config");
    let node = Node::start_with(data.path(), &["--config", config.to_str().expect("utf-8")]);
    let create = |id: &str| json!({"id": id, "delay": "1h", "url": "http://127.0.0.1:9/"}).to_string();
    assert_eq!(node.call("POST", "/jobs", create("a").as_bytes()).0, 201);
    assert_eq!(node.call("POST", "/jobs", create("b").as_bytes()).0, 507, "max_jobs = 1 from the file");
    assert_eq!(node.call("GET", "/health", b"").1["partitions"], 4);
    node.kill();
    // A flag beats the file.
    let node = Node::start_with(data.path(), &["--config", config.to_str().expect("utf-8"), "--max-jobs", "2"]);
    assert_eq!(node.call("POST", "/jobs", create("b").as_bytes()).0, 201, "--max-jobs 2 over the file");
    node.kill();

    std::fs::write(&config, "max_jobz = 1\n").expect("write config");
    let refused = Command::new(support::sundial_bin())
        .args(["--config", config.to_str().expect("utf-8"), "--data"])
        .arg(data.path())
        .output()
        .expect("run");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && message.contains("max_jobz"), "{message}");
    let refused = Command::new(support::sundial_bin())
        .args(["--data"])
        .arg(data.path())
        .env("SUNDIAL_LOG_LEVEL", "loud")
        .output()
        .expect("run");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && message.contains("log_level"), "{message}");
}

/// docs/CONFIGURATION.md documents every setting `sundial server --help` lists, with its
/// flag and its environment variable.
#[test]
fn every_setting_is_documented() {
    let help = Command::new(support::sundial_bin()).args(["server", "--help"]).output().expect("run");
    let help = String::from_utf8_lossy(&help.stdout);
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CONFIGURATION.md")).expect("the page");
    let mut checked = 0;
    for line in help.lines().map(str::trim_start).filter(|l| l.starts_with("--") && !l.starts_with("--help")) {
        let flag = line.split([' ', '[', '<']).next().expect("a flag");
        assert!(page.contains(&format!("`{flag}`")), "{flag} is not in docs/CONFIGURATION.md");
        let key = flag.trim_start_matches("--").replace('-', "_");
        // Repeatable flags name one item; their setting (and variable) all of them.
        let key = match key.as_str() {
            "token" => "tokens".to_string(),
            "allow_origin" => "allowed_origins".to_string(),
            _ => key,
        };
        assert!(
            page.contains(&format!("`SUNDIAL_{}`", key.to_uppercase())),
            "SUNDIAL_{} is not documented",
            key.to_uppercase()
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} settings found in --help:\n{help}");
}

/// The 64 low bits of a UUID's text form (a generated job id's random bits, but for the two
/// variant bits at 62 and 63).
fn low_bits_of(id: &str) -> u64 {
    let hex: String = id.chars().filter(|c| *c != '-').collect();
    u64::from_str_radix(&hex[16..], 16).unwrap_or(0)
}

/// The values splitmix64's finalizer maps to `z`: it is a bijection, undone step by step.
fn splitmix_inverse(z: u64) -> u64 {
    let inverse_of = |a: u64| (0..6).fold(a, |x: u64, _| x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x))));
    let unshift = |z: u64, by: u32| (0..64 / by + 1).fold(z, |x, _| z ^ (x >> by));
    let mut x = unshift(z, 31);
    x = x.wrapping_mul(inverse_of(0x94d0_49bb_1331_11eb));
    x = unshift(x, 27);
    x = x.wrapping_mul(inverse_of(0xbf58_476d_1ce4_e5b9));
    unshift(x, 30)
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn generated_ids_cannot_be_predicted_from_the_ids_before_them() {
    // The predictor of the generator ids came from until 2026-12 (splitmix64 over a counter
    // stepped by the golden ratio): from one id's low bits it finds the counter, then the
    // next ids' bits. Shown to work on the generator itself first.
    let golden = 0x9e37_79b9_7f4a_7c15u64;
    let predict = |id: &str| -> Vec<u64> {
        let low = low_bits_of(id) & ((1 << 62) - 1);
        let mut next = Vec::new();
        for top in 0..4u64 {
            let counter = splitmix_inverse(low | (top << 62)) ^ 0x5555_5555_5555_5555;
            for steps in 1..=4u64 {
                let n = counter.wrapping_add(golden.wrapping_mul(steps)) ^ 0x5555_5555_5555_5555;
                next.push(splitmix(n) & ((1 << 62) - 1));
            }
        }
        next
    };
    let old_id = |n: u64| {
        format!(
            "00000000-0000-7000-{:04x}-{:012x}",
            (splitmix(n ^ 0x5555_5555_5555_5555) >> 48) & 0x3fff | 0x8000,
            splitmix(n ^ 0x5555_5555_5555_5555) & 0xffff_ffff_ffff
        )
    };
    let seed = 1_796_000_000_001u64;
    let (first, second) = (old_id(seed), old_id(seed.wrapping_add(golden.wrapping_mul(2))));
    assert!(predict(&first).contains(&(low_bits_of(&second) & ((1 << 62) - 1))), "the predictor works");

    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(dir.path());
    let ids: Vec<String> = (0..40)
        .map(|_| {
            let (status, body) = node.call(
                "POST",
                "/jobs",
                json!({"delay": "1h", "url": "https://example.com/hook"}).to_string().as_bytes(),
            );
            assert_eq!(status, 201, "{body}");
            body["id"].as_str().expect("an id").to_string()
        })
        .collect();
    let predicted: std::collections::HashSet<u64> = ids.iter().flat_map(|id| predict(id)).collect();
    let hits = ids.iter().filter(|id| predicted.contains(&(low_bits_of(id) & ((1 << 62) - 1)))).count();
    assert_eq!(hits, 0, "{hits} of {} ids were predicted from the ones before them", ids.len());
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A create that carries a W3C `traceparent` puts the job in that trace: its webhook's
/// `traceparent` has the same trace id and names the attempt's own span, and the spans of
/// request → commit → fire → attempt reach an OTLP collector (a real HTTP receiver here;
/// the protobuf payload holds the names and the raw ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_flows_from_the_create_into_the_webhook_and_out_over_otlp() {
    let (target, hits) = receiver().await;
    let (collector, exports) = receiver().await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(data.path(), &["--otlp-endpoint", &format!("http://{collector}")]);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let request = json!({"id": "traced", "delay": "1s", "url": format!("http://{target}/t")}).to_string();
    let header = format!("traceparent: 00-{trace_id}-{caller_span}-01\r\n");
    let (status, _, _) = node.exchange("POST", "/jobs", request.as_bytes(), &header);
    assert_eq!(status, 201);
    assert!(wait_for(Duration::from_secs(20), || !hits.lock().expect("hits").is_empty()).await, "it fired");
    let hit = hits.lock().expect("hits")[0].clone();
    let traceparent =
        hit.headers.iter().find(|(name, _)| name == "traceparent").map(|(_, v)| v.clone()).expect("header");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[1], parts[3]), (4, "00", trace_id, "01"), "{traceparent}");
    let attempt_span = parts[2].to_string();
    assert!(attempt_span.len() == 16 && attempt_span != caller_span, "{traceparent}");

    let exported = || {
        let exports = exports.lock().expect("exports");
        let bytes: Vec<u8> = exports.iter().flat_map(|e| e.body.clone()).collect();
        ["request", "commit", "fire", "attempt"].iter().all(|name| contains(&bytes, name.as_bytes()))
            && contains(&bytes, &unhex(&attempt_span))
    };
    assert!(wait_for(Duration::from_secs(30), exported).await, "the spans reached the collector");
    let exports = exports.lock().expect("exports").clone();
    assert!(exports.iter().all(|e| e.headers.contains(&("content-type".into(), "application/x-protobuf".into()))));
    let bytes: Vec<u8> = exports.iter().flat_map(|e| e.body.clone()).collect();
    assert!(contains(&bytes, &unhex(trace_id)), "the caller's trace id is the spans' trace id");
    assert!(contains(&bytes, &unhex(caller_span)), "the request span's parent is the caller's span");
}

/// A node with a cron job `id` that fires every second at a fresh receiver, once it fired
/// three times (the data directory goes when its handle does, after the node).
async fn every_second_cron_fired_thrice(id: &str) -> (tempfile::TempDir, Node, Arc<Mutex<Vec<Hit>>>) {
    let (target, hits) = receiver().await;
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let request = json!({"id": id, "cron": "* * * * * *", "url": format!("http://{target}/{id}")});
    assert_eq!(node.call("POST", "/jobs", request.to_string().as_bytes()).0, 201);
    assert!(wait_for(Duration::from_secs(30), || hits.lock().expect("hits").len() >= 3).await, "three fires");
    (data, node, hits)
}

/// A cron job fires on its schedule again and again, each fire once (its own idempotency
/// key), and pausing it stops the fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_job_fires_repeatedly_until_paused() {
    let (_data, node, hits) = every_second_cron_fired_thrice("every-second").await;
    let (status, job) = node.call("POST", "/jobs/every-second/pause", b"");
    assert_eq!((status, job["paused"].as_bool()), (200, Some(true)), "{job}");
    // An attempt already started may still land; after that, nothing more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_pause = hits.lock().expect("hits").len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hits = hits.lock().expect("hits").clone();
    assert_eq!(hits.len(), after_pause, "no fire while paused");
    let mut keys: Vec<&str> = hits.iter().map(|h| h.key.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), hits.len(), "each fire once, with its own key");
    for hit in &hits {
        let fire_ms: u64 =
            hit.key.rsplit(':').next().and_then(|ms| ms.parse().ok()).expect("key ends with the fire time");
        assert!(fire_ms % 1_000 == 0 && hit.at_ms >= fire_ms, "on a second boundary and not early: {}", hit.key);
    }
}

/// Every attempt carries a fencing token (`X-Sundial-Fencing-Token`): fire after fire of a
/// cron job it grows, and after a kill -9 and a restart (a new leadership) its term is larger
/// than any before, so a receiver can refuse what the old leader had in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_deliveries_carry_fencing_tokens_that_grow_and_a_restart_raises_their_term() {
    let (data, node, hits) = every_second_cron_fired_thrice("fenced").await;
    node.kill();
    let before = hits.lock().expect("hits").clone();
    let restarted_ms = now_ms();
    let node = Node::start(data.path());
    // Fires due after the restart began: only the new process can have sent them (never
    // early), whenever a request the old one wrote before its death is read.
    let fire_ms = |hit: &Hit| -> u64 { hit.key.rsplit(':').next().and_then(|ms| ms.parse().ok()).unwrap_or(0) };
    let more = || hits.lock().expect("hits").iter().filter(|hit| fire_ms(hit) > restarted_ms).count() >= 3;
    assert!(wait_for(Duration::from_secs(30), more).await, "three fires after the restart");
    node.kill();
    let token = |hit: &Hit| -> u64 {
        let value = hit.headers.iter().find(|(name, _)| name == "x-sundial-fencing-token").map(|(_, v)| v.as_str());
        value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("a fencing token: {:?}", hit.headers))
    };
    let term = |hit: &Hit| token(hit) >> sundial_engine::sign::FENCING_INDEX_BITS;
    let first: Vec<u64> = before.iter().map(token).collect();
    assert!(first.windows(2).all(|pair| pair[1] > pair[0]), "each fire's token above the last: {first:?}");
    let old_term = before.iter().map(term).max().expect("fires before the kill");
    let hits = hits.lock().expect("hits").clone();
    let after: Vec<&Hit> = hits.iter().filter(|hit| fire_ms(hit) > restarted_ms).collect();
    assert!(after.iter().all(|hit| term(hit) > old_term), "a new leadership's term: {old_term} before, {after:?}");
}

/// `sundial certs` makes a cluster CA and node certificates, adds nodes later with the same
/// CA, and never overwrites a file.
#[test]
fn the_certs_command_makes_a_ca_and_node_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let run = |args: &[&str]| Command::new(support::sundial_bin()).args(args).output().expect("run sundial certs");
    let path = certs.to_str().expect("utf-8");
    let made = run(&["certs", "init", "--dir", path, "--cluster", "demo", "node-1", "node-2"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    for file in ["ca.pem", "ca.key", "node-1.pem", "node-1.key", "node-2.pem", "node-2.key"] {
        assert!(certs.join(file).exists(), "{file} missing");
    }
    assert!(run(&["certs", "issue", "--dir", path, "node-3"]).status.success());
    sundial_net::certs::NodeIdentity::load(&certs, "node-3").expect("node-3 loads");
    let again = run(&["certs", "init", "--dir", path, "node-1"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let bad = run(&["certs", "issue", "--dir", path, "no/slashes"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("node name"));
}

/// Whether a text exposition has the metric `name` (a family, or a histogram's
/// `_bucket`/`_count`/`_sum` series).
fn exports_metric(text: &str, name: &str) -> bool {
    let family = ["_bucket", "_count", "_sum"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name);
    text.lines().any(|line| {
        line.starts_with(&format!("# TYPE {name} ")) || line.starts_with(&format!("# TYPE {family} histogram"))
    })
}

/// deploy/grafana/sundial.json names only metrics a real node exports (and names the ones
/// its panels are about); deploy/prometheus/alerts.yml passes `promtool check rules` and
/// names only exported metrics too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_names_only_metrics_a_node_exports() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start(data.path());
    let text = node.metrics_text();
    let dashboard = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/sundial.json"))
        .expect("the dashboard");
    let dashboard: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(start) = rest.find("sundial_") {
                let tail = &rest[start..];
                let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
                names.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    for wanted in [
        "sundial_fire_lateness_seconds_bucket",
        "sundial_dispatch_queue_depth",
        "sundial_webhook_outcomes_total",
        "sundial_raft_elections_total",
        "sundial_wal_fsync_seconds_bucket",
    ] {
        assert!(names.contains(wanted), "the dashboard has no panel on {wanted}");
    }
    for name in &names {
        assert!(exports_metric(&text, name), "{name} is on the dashboard but not in /metrics");
    }
    // The check is not a rubber stamp.
    assert!(!exports_metric(&text, "sundial_no_such_metric"));
    assert!(!exports_metric(&text, "sundial_jobs_bucket"), "a gauge has no buckets");

    // The alerting rules beside it: valid for promtool, and about metrics that exist.
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/alerts.yml");
    let checked = Command::new("promtool").args(["check", "rules", rules]).output().expect("promtool runs");
    assert!(checked.status.success(), "promtool: {}", String::from_utf8_lossy(&checked.stderr));
    let rules_text = std::fs::read_to_string(rules).expect("the rules");
    let mut rest = rules_text.as_str();
    let mut named = 0;
    while let Some(start) = rest.find("sundial_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        assert!(exports_metric(&text, &tail[..end]), "{} is in alerts.yml but not in /metrics", &tail[..end]);
        named += 1;
        rest = &tail[end..];
    }
    assert!(named >= 7, "the rules name {named} metrics");
}

/// deploy/systemd/sundial.service passes `systemd-analyze verify` (with ExecStart pointed
/// at the built binary), and the example configuration beside it starts a node.
#[test]
fn the_systemd_unit_verifies_and_its_example_configuration_starts_a_node() {
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd");
    let unit = std::fs::read_to_string(format!("{deploy}/sundial.service")).expect("the unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/sundial server --config /etc/sundial/sundial.toml"));
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("sundial.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/sundial", &support::sundial_bin().display().to_string()))
        .expect("copy");
    let verify = |path: &Path| {
        Command::new("systemd-analyze")
            .args(["verify", path.to_str().expect("utf-8")])
            .output()
            .expect("systemd-analyze runs (Debian: systemd)")
    };
    let verified = verify(&copy);
    let said = String::from_utf8_lossy(&verified.stderr).into_owned();
    assert!(verified.status.success() && said.trim().is_empty(), "systemd-analyze: {said}");
    // The verifier is not a rubber stamp: an unknown key or a missing binary is reported.
    let broken = dir.path().join("broken.service");
    std::fs::write(&broken, unit.replace("LimitNOFILE=", "LimitNOFILES=")).expect("broken copy");
    let refused = verify(&broken);
    assert!(!refused.status.success() || !refused.stderr.is_empty(), "a broken unit passed");

    let data = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(data.path(), &["--config", &format!("{deploy}/sundial.toml")]);
    let (status, health) = node.call_authorized("GET", "/health", "change-me-to-a-long-random-token");
    assert_eq!((status, health["limits"]["max_jobs"].as_u64()), (200, Some(5_000_000)), "{health}");
    assert_eq!(node.call("GET", "/jobs", b"").0, 401, "the example turns tokens on");
}
