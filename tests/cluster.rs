//! Real `sundial` processes as a 3-node cluster on loopback (QUIC between them, mutual TLS
//! with a generated CA), with a real webhook receiver: leaders spread over the members,
//! jobs created through any member fire once, a kill -9 of the busiest leader loses no
//! acknowledged job, creates far past what the cluster holds are each answered at once
//! (accepted and fired, or refused with Retry-After), and a node with a certificate from
//! another CA is refused.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::now_ms;

mod support;
use support::{exchange, listening_addresses, receiver, try_exchange, wait_for, Hit};

const PARTITIONS: u32 = 16;

/// A cluster's members as processes; each killed (SIGKILL) when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    certs: PathBuf,
    /// The founding members, as every member is started with.
    peers: String,
    /// Peer addresses of every node id there are certificates for.
    addresses: BTreeMap<u64, String>,
    members: BTreeMap<u64, Member>,
    /// Partitions of the cluster, and settings every member is started with besides those
    /// `spawn_member` gives.
    partitions: u32,
    settings: Vec<String>,
}

struct Member {
    child: Child,
    http: SocketAddr,
    binary: SocketAddr,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Free UDP ports on loopback for the members' QUIC endpoints (found by binding port 0).
fn free_udp_ports(count: usize) -> Vec<u16> {
    let sockets: Vec<UdpSocket> = (0..count).map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind")).collect();
    sockets.iter().map(|s| s.local_addr().expect("address").port()).collect()
}

fn sundial() -> Command {
    Command::new(support::sundial_bin())
}

/// Makes a CA and node certificates with the CLI (`sundial certs init`).
fn make_certs(dir: &Path, cluster: &str, nodes: &[&str]) {
    let made = sundial()
        .args(["certs", "init", "--cluster", cluster, "--dir"])
        .arg(dir)
        .args(nodes)
        .output()
        .expect("run certs init");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
}

impl Cluster {
    fn start(size: u64) -> Cluster {
        let mut cluster = Cluster::new(size);
        for id in 1..=size {
            cluster.start_member(id);
        }
        cluster
    }

    /// Certificates and addresses for `size` founding members, none started yet.
    fn new(size: u64) -> Cluster {
        Cluster::with_spares(size, 0)
    }

    /// `new`, with certificates and addresses for `spares` more nodes to add later.
    fn with_spares(size: u64, spares: u64) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let names: Vec<String> = (1..=size + spares).map(|i| format!("node-{i}")).collect();
        make_certs(&certs, "test", &names.iter().map(String::as_str).collect::<Vec<_>>());
        let ports = free_udp_ports((size + spares) as usize);
        let addresses: BTreeMap<u64, String> =
            (1..=size + spares).zip(ports).map(|(i, p)| (i, format!("127.0.0.1:{p}"))).collect();
        let peers: Vec<String> = addresses.iter().take(size as usize).map(|(i, a)| format!("{i}@{a}")).collect();
        Cluster {
            dir,
            certs,
            peers: peers.join(","),
            addresses,
            members: BTreeMap::new(),
            partitions: PARTITIONS,
            settings: Vec::new(),
        }
    }

    /// `partitions` instead of 16, and `settings` given to every member started from now on.
    fn with_settings(mut self, partitions: u32, settings: &[&str]) -> Cluster {
        self.partitions = partitions;
        self.settings = settings.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Starts (or restarts, on its data) member `id`; its log goes to `node-ID.log`.
    fn start_member(&mut self, id: u64) {
        let certs = self.certs.clone();
        self.start_member_with(id, &certs);
    }

    fn start_member_with(&mut self, id: u64, certs: &Path) {
        let peers = self.peers.clone();
        self.spawn_member(id, certs, &peers, &[]);
    }

    /// Starts a node that joins the running cluster (it must then be added).
    fn start_joining(&mut self, id: u64, peers: &[u64]) {
        let peers: Vec<String> = peers.iter().map(|i| format!("{i}@{}", self.addresses[i])).collect();
        let certs = self.certs.clone();
        self.spawn_member(id, &certs, &peers.join(","), &["--join"]);
    }

    fn spawn_member(&mut self, id: u64, certs: &Path, peers: &str, extra: &[&str]) {
        let data = self.dir.path().join(format!("node-{id}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .expect("log file");
        let mut child = sundial()
            .args(["server", "--node-id", &id.to_string(), "--peers", peers, "--certs"])
            .arg(certs)
            .args(extra)
            .args(["--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--allow-loopback-targets", "--shards", "2"])
            .args(&self.settings)
            .args(["--partitions", &self.partitions.to_string(), "--data"])
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start sundial");
        let (http, binary) = listening_addresses(&mut child);
        self.members.insert(id, Member { child, http, binary });
    }

    fn kill(&mut self, id: u64) {
        self.members.remove(&id);
    }

    fn http(&self, id: u64) -> SocketAddr {
        self.members[&id].http
    }

    /// The partitions each live member leads, by its own /debug/cluster.
    fn leaders(&self) -> BTreeMap<u64, Vec<u64>> {
        self.members
            .iter()
            .map(|(id, member)| {
                let (_, view) = call(member.http, "GET", "/debug/cluster", b"");
                let led = view["partitions"]
                    .as_array()
                    .map(|ps| {
                        ps.iter().filter(|p| p["role"] == "leader").filter_map(|p| p["partition"].as_u64()).collect()
                    })
                    .unwrap_or_default();
                (*id, led)
            })
            .collect()
    }

    /// Waits until every partition has a leader among the live members.
    async fn wait_for_leaders(&self, limit: Duration) -> bool {
        wait_for(limit, || {
            let mut led: Vec<u64> = self.leaders().into_values().flatten().collect();
            led.sort_unstable();
            led.dedup();
            led.len() == self.partitions as usize
        })
        .await
    }

    /// The last lines of every member's log (for a failing assertion).
    fn logs(&self) -> String {
        let mut text = String::new();
        for id in 1..=4 {
            let log = std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            text += &format!("--- node {id}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        text
    }
}

/// One HTTP call: (status, JSON body).
fn call(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let (status, _, body) = exchange(addr, method, path, body, "");
    (status, body)
}

fn job(id: &str, run_at_ms: u64, target: SocketAddr) -> Value {
    json!({"id": id, "run_at": run_at_ms, "url": format!("http://{target}/hook"), "json": {"id": id}})
}

/// What the receiver saw, by job id: (first receive time, idempotency keys of every delivery).
fn deliveries(hits: &Mutex<Vec<Hit>>) -> HashMap<String, (u64, Vec<String>)> {
    let mut by_id: HashMap<String, (u64, Vec<String>)> = HashMap::new();
    for hit in hits.lock().expect("hits").iter() {
        let id = hit.headers.iter().find(|(n, _)| n == "x-sundial-job-id").map(|(_, v)| v.clone()).unwrap_or_default();
        let entry = by_id.entry(id).or_insert((hit.at_ms, Vec::new()));
        entry.0 = entry.0.min(hit.at_ms);
        entry.1.push(hit.key.clone());
    }
    by_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_spreads_leaders_and_fires_jobs_created_anywhere_once() {
    let (target, hits) = receiver().await;
    let cluster = Cluster::start(3);
    assert!(
        cluster.wait_for_leaders(Duration::from_secs(30)).await,
        "no leader for some partition\n{}",
        cluster.logs()
    );
    // Leadership is handed to each partition's preferred member once it has caught up.
    let spread =
        wait_for(Duration::from_secs(20), || cluster.leaders().values().filter(|led| !led.is_empty()).count() >= 2)
            .await;
    assert!(spread, "leaders stayed on one node: {:?}", cluster.leaders());

    let run_at = now_ms() + 3_000;
    let mut scheduled = HashMap::new();
    for node in 1..=3u64 {
        for i in 0..30 {
            let id = format!("c-{node}-{i}");
            let (status, body) =
                call(cluster.http(node), "POST", "/jobs", job(&id, run_at + i * 10, target).to_string().as_bytes());
            assert_eq!(status, 201, "create {id} through node {node}: {body}");
            scheduled.insert(id, run_at + i * 10);
        }
    }
    let all = wait_for(Duration::from_secs(60), || deliveries(&hits).len() >= scheduled.len()).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // room for a duplicate to show
    let seen = deliveries(&hits);
    assert!(all, "{} of {} fired\n{}", seen.len(), scheduled.len(), cluster.logs());
    for (id, due_ms) in &scheduled {
        let (first_ms, keys) = &seen[id];
        assert_eq!(keys.len(), 1, "{id} delivered {} times", keys.len());
        assert!(first_ms >= due_ms, "{id} fired {} ms early", due_ms - first_ms);
    }
    // A read through any member is linearizable: it sees the fire its leader recorded.
    for node in 1..=3u64 {
        let (status, job) = call(cluster.http(node), "GET", "/jobs/c-1-0", b"");
        assert_eq!((status, job["status"].as_str()), (200, Some("completed")), "through node {node}: {job}");
    }
    // `sundial cluster status` shows the members and every partition's leader.
    let status = sundial()
        .args(["cluster", "status", "--node", &format!("http://{}", cluster.http(1))])
        .output()
        .expect("run cluster status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}{}", String::from_utf8_lossy(&status.stderr));
    assert_eq!(text.lines().filter(|l| l.trim_start().starts_with("node ")).count(), 3, "{text}");
    let rows = text.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()));
    assert_eq!(rows.count(), 16, "{text}");
    // A stale read is served by the local replica as it stands; a bad flag is refused.
    let (status, job) = call(cluster.http(3), "GET", "/jobs/c-2-1?stale=true", b"");
    assert_eq!((status, job["id"].as_str()), (200, Some("c-2-1")), "{job}");
    let (status, refused) = call(cluster.http(3), "GET", "/jobs/c-2-1?stale=maybe", b"");
    assert_eq!((status, refused["code"].as_str()), (400, Some("invalid")), "{refused}");
    let (_, listed) = call(cluster.http(2), "GET", "/jobs?limit=1000", b"");
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(scheduled.len()), "a list covers every partition once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_busiest_leader_loses_no_acknowledged_job() {
    const PENDING: usize = 2_000;
    let (target, hits) = receiver().await;
    let mut cluster = Cluster::start(3);
    assert!(cluster.wait_for_leaders(Duration::from_secs(30)).await, "no leader\n{}", cluster.logs());

    // 2,000 jobs due 8–12 s from now, created in batches through every member.
    let base_ms = now_ms() + 8_000;
    let acknowledged: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    for batch in 0..(PENDING / 200) {
        let jobs: Vec<Value> = (0..200)
            .map(|i| {
                let n = batch * 200 + i;
                job(&format!("p-{n}"), base_ms + (n as u64 * 2), target)
            })
            .collect();
        let node = 1 + (batch as u64 % 3);
        let (status, results) =
            call(cluster.http(node), "POST", "/jobs/batch", json!({"jobs": jobs}).to_string().as_bytes());
        assert_eq!(status, 200, "{results}");
        for (job, result) in jobs.iter().zip(results["results"].as_array().expect("results")) {
            assert!(result["status"] == 201, "{result}");
            acknowledged
                .lock()
                .expect("acks")
                .insert(job["id"].as_str().expect("id").to_string(), job["run_at"].as_u64().expect("due"));
        }
    }

    // Finished jobs on every partition, whose ids the dedup window must keep refusing after
    // the failover (the window is replicated with each create).
    let finished: Vec<String> = (0..32).map(|n| format!("done-{n}")).collect();
    let finished_jobs: Vec<Value> = finished.iter().map(|id| job(id, now_ms(), target)).collect();
    let (status, _) =
        call(cluster.http(1), "POST", "/jobs/batch", json!({"jobs": finished_jobs}).to_string().as_bytes());
    assert_eq!(status, 200);
    let all_completed = wait_for(Duration::from_secs(30), || {
        finished
            .iter()
            .all(|id| call(cluster.http(1), "GET", &format!("/jobs/{id}/status"), b"").1["status"] == "completed")
    })
    .await;
    assert!(
        all_completed,
        "the finished jobs completed
{}",
        cluster.logs()
    );

    // More are created while the leader dies: only acknowledged ones must fire.
    let creating = Arc::new(AtomicBool::new(true));
    let nodes: Vec<SocketAddr> = (1..=3).map(|id| cluster.http(id)).collect();
    let creator = {
        let (creating, acknowledged) = (creating.clone(), acknowledged.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            // Bounded by the flag the test clears.
            while creating.load(Ordering::Relaxed) {
                let id = format!("live-{n}");
                let due = now_ms() + 3_000;
                let node = nodes[n as usize % nodes.len()];
                let body = job(&id, due, target).to_string();
                // A refused connection (the killed member) or a 503 is simply not acknowledged.
                if let Ok((201, _, _)) = try_exchange(node, "POST", "/jobs", body.as_bytes(), "") {
                    acknowledged.lock().expect("acks").insert(id, due);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leaders = cluster.leaders();
    let (&busiest, led) = leaders.iter().max_by_key(|(_, led)| led.len()).expect("members");
    assert!(!led.is_empty(), "someone leads");
    let killed_ms = now_ms();
    cluster.kill(busiest);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // New leaders refuse the finished jobs' ids as duplicates, as the old ones did.
    let survivor = cluster.http(if busiest == 1 { 2 } else { 1 });
    for (id, body) in finished.iter().zip(&finished_jobs) {
        let refused = wait_for(Duration::from_secs(20), || {
            let (status, answer) = call(survivor, "POST", "/jobs", body.to_string().as_bytes());
            status == 409 && answer["code"] == "duplicate"
        })
        .await;
        assert!(
            refused,
            "{id} was not refused as a duplicate after the failover
{}",
            cluster.logs()
        );
    }
    cluster.start_member(busiest);
    tokio::time::sleep(Duration::from_secs(2)).await;
    creating.store(false, Ordering::Relaxed);
    creator.join().expect("creator");
    let acknowledged = acknowledged.lock().expect("acks").clone();
    assert!(
        acknowledged.keys().filter(|id| id.starts_with("live-")).count() > 10,
        "creates went on during the failover"
    );

    let all = wait_for(Duration::from_secs(90), || {
        let seen = deliveries(&hits);
        acknowledged.keys().all(|id| seen.contains_key(id))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = deliveries(&hits);
    let lost: Vec<&String> = acknowledged.keys().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        all && lost.is_empty(),
        "{} acknowledged jobs never fired, e.g. {:?}\n{}",
        lost.len(),
        &lost[..lost.len().min(5)],
        cluster.logs()
    );
    let mut duplicates = 0;
    for (id, due_ms) in &acknowledged {
        let (first_ms, keys) = &seen[id];
        assert!(first_ms >= due_ms, "{id} fired {} ms early", due_ms - first_ms);
        assert!(keys.iter().all(|k| k == &keys[0]), "{id}: a duplicate with another key: {keys:?}");
        duplicates += keys.len() - 1;
    }
    eprintln!(
        "{} acknowledged, all fired; {duplicates} duplicate deliveries (same key); node {busiest} led {} partitions when killed at {killed_ms}",
        acknowledged.len(),
        led.len()
    );

    // The restarted member catches up: each of its replicas applies what its leader committed.
    let caught_up = wait_for(Duration::from_secs(30), || {
        let view = |id: u64| call(cluster.http(id), "GET", "/debug/cluster", b"").1;
        let mine = view(busiest);
        let others: Vec<Value> = (1..=3).filter(|id| *id != busiest).map(view).collect();
        mine["partitions"].as_array().is_some_and(|ps| {
            ps.iter().all(|p| {
                let committed = others
                    .iter()
                    .flat_map(|o| o["partitions"].as_array().cloned().unwrap_or_default())
                    .filter(|q| q["partition"] == p["partition"] && q["role"] == "leader")
                    .filter_map(|q| q["commit_index"].as_u64())
                    .max()
                    .unwrap_or(0);
                p["applied_index"].as_u64().unwrap_or(0) >= committed
            })
        })
    })
    .await;
    assert!(caught_up, "node {busiest} did not catch up\n{}", cluster.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_from_another_ca_cannot_join() {
    // Members 2 and 3 run with the cluster's certificates; member 1 — listed by both, and
    // the one that dials them — presents a certificate from another CA.
    let mut cluster = Cluster::new(3);
    cluster.start_member(2);
    cluster.start_member(3);
    let foreign = cluster.dir.path().join("foreign");
    make_certs(&foreign, "other", &["node-1"]);
    cluster.start_member_with(1, &foreign);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, view) = call(cluster.http(1), "GET", "/debug/cluster", b"");
    let linked: Vec<&Value> =
        view["members"].as_array().map(|ms| ms.iter().filter(|m| m["connected"] == true).collect()).unwrap_or_default();
    assert_eq!(linked.len(), 1, "only itself: no member accepted it\n{view}");
    // The two members refused its handshake, and serve on their own (a quorum of each
    // partition's three replicas).
    let logs = cluster.logs();
    assert!(logs.contains("refused a peer at the handshake"), "{logs}");
    cluster.kill(1);
    let led = cluster.wait_for_leaders(Duration::from_secs(30)).await;
    assert!(led, "members 2 and 3 lead every partition\n{}", cluster.logs());
    let (status, body) = call(
        cluster.http(2),
        "POST",
        "/jobs",
        json!({"delay": "1h", "url": "https://example.com/hook"}).to_string().as_bytes(),
    );
    assert_eq!(status, 201, "{body}");
}

/// The replicas of every partition as their leaders report them.
fn placement(cluster: &Cluster) -> BTreeMap<u64, Vec<u64>> {
    let mut placed = BTreeMap::new();
    for member in cluster.members.values() {
        let (_, view) = call(member.http, "GET", "/debug/cluster", b"");
        for p in view["partitions"].as_array().into_iter().flatten().filter(|p| p["role"] == "leader") {
            let replicas = p["replicas"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
            placed.insert(p["partition"].as_u64().unwrap_or(0), replicas);
        }
    }
    placed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_and_adding_a_fresh_one_loses_no_acknowledged_job() {
    let (target, hits) = receiver().await;
    let mut cluster = Cluster::with_spares(3, 1);
    for id in 1..=3 {
        cluster.start_member(id);
    }
    assert!(cluster.wait_for_leaders(Duration::from_secs(30)).await, "no leader\n{}", cluster.logs());
    let due_ms = now_ms() + 25_000;
    let jobs: Vec<Value> = (0..300).map(|i| job(&format!("m-{i}"), due_ms + i * 5, target)).collect();
    let (status, results) = call(cluster.http(1), "POST", "/jobs/batch", json!({"jobs": jobs}).to_string().as_bytes());
    assert_eq!(status, 200, "{results}");
    assert!(results["results"].as_array().is_some_and(|r| r.iter().all(|r| r["status"] == 201)), "{results}");

    // Remove node 3: its replicas move to the others before it is stopped.
    let node_1 = format!("http://{}", cluster.http(1));
    let cli = |args: &[&str]| {
        let out = sundial().args(args).args(["--node", &node_1]).output().expect("run");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, text) = cli(&["cluster", "remove", "3"]);
    assert!(ok && !text.contains("node 3 "), "{text}");
    let moved = wait_for(Duration::from_secs(30), || {
        let placed = placement(&cluster);
        placed.len() == PARTITIONS as usize && placed.values().all(|r| !r.contains(&3))
    })
    .await;
    assert!(moved, "node 3 still holds replicas: {:?}\n{}", placement(&cluster), cluster.logs());
    cluster.kill(3);

    // Add node 4: it starts empty and receives a snapshot of every partition placed on it.
    cluster.start_joining(4, &[1, 2, 4]);
    let add = format!("4@{}", cluster.addresses[&4]);
    let (ok, text) = cli(&["cluster", "add", &add]);
    assert!(ok && text.contains("node 4 "), "{text}");
    let joined = wait_for(Duration::from_secs(60), || {
        let placed = placement(&cluster);
        placed.len() == PARTITIONS as usize && placed.values().all(|r| r.contains(&4) && r.len() == 3)
    })
    .await;
    assert!(joined, "node 4 is not a replica everywhere: {:?}\n{}", placement(&cluster), cluster.logs());

    // Node 2 goes: every partition now needs node 4's copy for a quorum.
    cluster.kill(2);
    assert!(cluster.wait_for_leaders(Duration::from_secs(30)).await, "no leader without node 2\n{}", cluster.logs());
    let fired = wait_for(Duration::from_secs(60), || deliveries(&hits).len() >= jobs.len()).await;
    let seen = deliveries(&hits);
    assert!(fired, "{} of {} fired\n{}", seen.len(), jobs.len(), cluster.logs());
    for job in &jobs {
        let id = job["id"].as_str().expect("id");
        let (first_ms, _) = &seen[id];
        assert!(*first_ms >= job["run_at"].as_u64().expect("due"), "{id} fired early");
    }
}

/// Each partition of `member` as its /debug/cluster shows it, by partition number.
fn partitions_of(cluster: &Cluster, member: u64) -> BTreeMap<u64, Value> {
    let (_, view) = call(cluster.http(member), "GET", "/debug/cluster", b"");
    let partitions = view["partitions"].as_array().cloned().unwrap_or_default();
    partitions.into_iter().map(|p| (p["partition"].as_u64().unwrap_or(u64::MAX), p)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_its_leaders_linked_snapshots_is_sent_a_whole_one_and_serves_every_job() {
    const JOBS: usize = 4_000;
    let (target, hits) = receiver().await;
    // Small segments and frequent snapshots, so the leaders' logs are cut while node 3 is down.
    let mut cluster = Cluster::new(3).with_settings(2, &["--snapshot-every", "200", "--segment-mb", "1"]);
    for id in 1..=3 {
        cluster.start_member(id);
    }
    assert!(cluster.wait_for_leaders(Duration::from_secs(30)).await, "no leader\n{}", cluster.logs());
    cluster.kill(3);
    assert!(cluster.wait_for_leaders(Duration::from_secs(30)).await, "no leader without 3\n{}", cluster.logs());

    // 4,000 jobs of ~1 KB each, due together 25 s from now, created while node 3 is down.
    let due_ms = now_ms() + 25_000;
    let filler = "x".repeat(1_000);
    for batch in 0..JOBS / 200 {
        let jobs: Vec<Value> = (0..200)
            .map(|i| {
                let id = format!("s-{}", batch * 200 + i);
                json!({"id": id, "run_at": due_ms, "url": format!("http://{target}/hook"), "json": {"f": filler}})
            })
            .collect();
        let (status, results) = call(
            cluster.http(1 + batch as u64 % 2),
            "POST",
            "/jobs/batch",
            json!({"jobs": jobs}).to_string().as_bytes(),
        );
        assert_eq!(status, 200, "{results}");
        assert!(results["results"].as_array().is_some_and(|r| r.iter().all(|r| r["status"] == 201)), "{results}");
    }
    // The replicated partitions take linked snapshots (the specs stay in their files).
    let linked = wait_for(Duration::from_secs(30), || {
        (1..=2).all(|id| partitions_of(&cluster, id).values().all(|p| p["snapshot_linked"] == true))
    })
    .await;
    assert!(linked, "linked snapshots: {:?}\n{}", partitions_of(&cluster, 1), cluster.logs());

    // Node 3 is behind what the leaders' logs hold: each leader makes a whole snapshot for it.
    cluster.start_member(3);
    let caught_up = wait_for(Duration::from_secs(60), || {
        let mine = partitions_of(&cluster, 3);
        let leaders: Vec<Value> = (1..=3)
            .flat_map(|id| partitions_of(&cluster, id).into_values())
            .filter(|p| p["role"] == "leader")
            .collect();
        leaders.len() == 2
            && leaders.iter().all(|leader| {
                mine.get(&leader["partition"].as_u64().unwrap_or(u64::MAX)).is_some_and(|p| {
                    p["snapshots_installed"].as_u64() >= Some(1)
                        && p["applied_index"].as_u64() >= leader["commit_index"].as_u64()
                        && p["jobs"] == leader["jobs"]
                })
            })
    })
    .await;
    assert!(caught_up, "node 3 did not catch up: {:?}\n{}", partitions_of(&cluster, 3), cluster.logs());

    // Node 1 goes: every partition now needs node 3's copy for a quorum.
    cluster.kill(1);
    assert!(cluster.wait_for_leaders(Duration::from_secs(30)).await, "no leader without 1\n{}", cluster.logs());
    let fired = wait_for(Duration::from_secs(90), || deliveries(&hits).len() >= JOBS).await;
    let seen = deliveries(&hits);
    assert!(fired, "{} of {JOBS} fired\n{}", seen.len(), cluster.logs());
    assert!(seen.values().all(|(first_ms, _)| *first_ms >= due_ms), "none fired early");
}

/// Items a member forwarded to another (its `sundial_forwarded_total`).
fn forwarded(member: SocketAddr) -> u64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(member).expect("connect");
    write!(stream, "GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").expect("send");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("read");
    body.lines()
        .find_map(|line| line.strip_prefix("sundial_forwarded_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_client_sends_each_job_to_its_partitions_leader() {
    let cluster = Cluster::start(3);
    assert!(cluster.wait_for_leaders(Duration::from_secs(30)).await, "no leader\n{}", cluster.logs());
    // Leaders settle on their preferred members (the same map twice, a second apart).
    let settled = wait_for(Duration::from_secs(20), || {
        let before = cluster.leaders();
        std::thread::sleep(Duration::from_secs(1));
        before == cluster.leaders() && before.values().all(|led| !led.is_empty())
    })
    .await;
    assert!(settled, "leaders kept moving: {:?}", cluster.leaders());
    let total = || (1..=3).map(|id| forwarded(cluster.http(id))).sum::<u64>();
    let binary: Vec<SocketAddr> = (1..=3).map(|id| cluster.members[&id].binary).collect();
    let jobs = |prefix: &str| -> Vec<Value> {
        (0..90)
            .map(|i| json!({"id": format!("{prefix}-{i}"), "delay": "1h", "url": "https://example.com/hook"}))
            .collect()
    };

    // One connection to member 1: the jobs of partitions led elsewhere are forwarded.
    let before = total();
    let single = sundial_net::Client::connect(binary[0], Default::default()).await.expect("connect");
    let items = single.create_many(&jobs("one")).await.expect("creates");
    assert!(items.iter().all(|item| item.status == 201), "{items:?}");
    let through_one = total() - before;
    assert!(through_one >= 30, "about two thirds of 90 are forwarded, not {through_one}");

    // The cluster client sends each to its leader: nothing is forwarded.
    let before = total();
    let client = sundial_net::ClusterClient::connect(&binary, Default::default()).await.expect("connect");
    let topology = client.topology().await;
    assert_eq!((topology.partitions, topology.members.len()), (PARTITIONS, 3), "{topology:?}");
    let items = client.create_many(&jobs("routed")).await.expect("creates");
    assert!(items.iter().all(|item| item.status == 201), "{items:?}");
    let got = client.get("routed-7").await.expect("get");
    assert_eq!((got.status, got.json()["id"].as_str()), (200, Some("routed-7")));
    let cancelled = client.cancel("routed-8").await.expect("cancel");
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.json());
    assert_eq!(total() - before, 0, "the cluster client's requests all reached leaders");
    let stale = single.get_stale("routed-9").await.expect("a stale read");
    assert_eq!(stale.status, 200);
}

/// One create's answer as the overload test sees it: (job id, due ms, status or the
/// client's error, Retry-After seconds, body).
type Answered = (String, u64, Result<u16, String>, u32, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_driven_past_what_it_holds_answers_every_create_at_once_and_fires_every_acknowledged_one() {
    let (target, hits) = receiver().await;
    let cluster = Cluster::start(3);
    assert!(cluster.wait_for_leaders(Duration::from_secs(30)).await, "no leader\n{}", cluster.logs());
    let binary: Vec<SocketAddr> = (1..=3).map(|id| cluster.members[&id].binary).collect();
    let options = sundial_net::ClientOptions { minimal_answers: true, ..Default::default() };
    let client = Arc::new(sundial_net::ClusterClient::connect(&binary, options).await.expect("connect"));
    // Bursts of 60 batches of 1,000 creates sent at once, without waiting for answers:
    // about 20,000 jobs in flight at each member, past the 16,384 a member admits at
    // first (docs/OPERATIONS.md, "Overload"). A burst is sent again (at most three) until
    // something was refused; every job is due 15 s from the start.
    let due_ms = now_ms() + 15_000;
    let answers: Arc<Mutex<Vec<Answered>>> = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for burst in 0..3 {
        let mut sends = Vec::new();
        for batch in burst * 60..(burst + 1) * 60 {
            let jobs: Vec<Value> = (0..1_000).map(|i| job(&format!("o-{batch}-{i}"), due_ms, target)).collect();
            let (client, answers, refused) = (client.clone(), answers.clone(), refused.clone());
            sends.push(tokio::spawn(async move {
                let outcome = client.create_many(&jobs).await;
                let mut answers = answers.lock().expect("answers");
                for (position, job) in jobs.iter().enumerate() {
                    let id = job["id"].as_str().expect("id").to_string();
                    answers.push(match &outcome {
                        Ok(items) => {
                            let item = &items[position];
                            if !(200..300).contains(&item.status) {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            let body = String::from_utf8_lossy(&item.body).into_owned();
                            (id, due_ms, Ok(item.status), item.retry_after_s, body)
                        }
                        Err(error) => (id, due_ms, Err(error.to_string()), 0, String::new()),
                    });
                }
            }));
        }
        for send in sends {
            send.await.expect("a send task");
        }
        if refused.load(Ordering::Relaxed) > 0 {
            break;
        }
    }
    let answers = std::mem::take(&mut *answers.lock().expect("answers"));
    assert_every_create_answered_definitely(&answers, &cluster);
    let created: Vec<&String> =
        answers.iter().filter(|(_, _, status, _, _)| matches!(status, Ok(200..=299))).map(|a| &a.0).collect();
    let refused = answers.len() - created.len();
    eprintln!("{} creates: {} acknowledged, {refused} refused", answers.len(), created.len());
    assert!(refused > 0, "the cluster held it all ({} created): not an overload", created.len());
    // Every acknowledged job fires, none early.
    let all_fired = wait_for(Duration::from_secs(120), || {
        let seen = deliveries(&hits);
        created.iter().all(|id| seen.contains_key(id.as_str()))
    })
    .await;
    let seen = deliveries(&hits);
    let missing = created.iter().filter(|id| !seen.contains_key(id.as_str())).count();
    assert!(all_fired, "{missing} of {} acknowledged jobs never fired\n{}", created.len(), cluster.logs());
    let early = created.iter().filter(|id| seen[id.as_str()].0 < due_ms).count();
    assert_eq!(early, 0, "fired before their time");
}

/// No create went unanswered or was answered "outcome unknown" (no fault was injected),
/// and every refusal says when to retry.
fn assert_every_create_answered_definitely(answers: &[Answered], cluster: &Cluster) {
    let unanswered: Vec<&Answered> = answers.iter().filter(|a| a.2.is_err()).collect();
    assert!(
        unanswered.is_empty(),
        "{} creates got no answer, e.g. {:?}\n{}",
        unanswered.len(),
        unanswered[0],
        cluster.logs()
    );
    let unknown: Vec<&Answered> = answers.iter().filter(|a| a.4.contains("outcome is unknown")).collect();
    assert!(unknown.is_empty(), "{} answered unknown, e.g. {:?}", unknown.len(), unknown[0]);
    let refused_without_retry =
        answers.iter().find(|(_, _, status, retry_after_s, _)| !matches!(status, Ok(200..=299)) && *retry_after_s == 0);
    assert!(refused_without_retry.is_none(), "a refusal without Retry-After: {refused_without_retry:?}");
}

/// A base port b such that b+1..=b+3 are free for TCP (HTTP, binary) and UDP (peers) on
/// loopback now (the dev cluster takes consecutive ports).
fn free_port_base(taken: &[u16]) -> u16 {
    // Bounded: ports from 20,000 up in steps of 7, with room for three each.
    for base in (20_000u16..60_000).step_by(7) {
        if (base..=base + 4).any(|p| taken.contains(&p)) {
            continue;
        }
        let free = (1..=3).all(|i| {
            std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && UdpSocket::bind(("127.0.0.1", base + i)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free ports");
}

/// `sundial dev-cluster --nodes 3`, then kill -9 of a member: the other two keep serving and
/// fire the jobs of the partitions it led (none lost, none early), and the dev cluster starts
/// it again on its data; SIGTERM stops them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_cluster_member_killed_leaves_the_others_serving_and_is_started_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let http_base = free_port_base(&[]);
    let binary_base = free_port_base(&[http_base]);
    let peer_base = free_port_base(&[http_base, binary_base]);
    let mut dev = sundial()
        .args(["dev-cluster", "--nodes", "3", "--partitions", &PARTITIONS.to_string(), "--dir"])
        .arg(dir.path())
        .args(["--http-port", &http_base.to_string(), "--binary-port", &binary_base.to_string()])
        .args(["--peer-port", &peer_base.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the dev cluster");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(dev.stdout.take().expect("stdout")));
    let mut pids: BTreeMap<u64, String> = BTreeMap::new();
    for line in lines.by_ref().map_while(Result::ok) {
        if let (Some(node), Some(pid)) = (line.trim().strip_prefix("node "), line.rsplit("pid ").next()) {
            if let Some(id) = node.split(':').next().and_then(|n| n.parse().ok()) {
                pids.insert(id, pid.trim().to_string());
            }
        }
        if line.starts_with("stop:") {
            break;
        }
    }
    assert_eq!(pids.len(), 3, "{pids:?}");
    let http = |id: u64| SocketAddr::from(([127, 0, 0, 1], http_base + id as u16));
    let every_partition_led = || {
        let Ok((_, _, view)) = try_exchange(http(1), "GET", "/debug/cluster", b"", "") else { return false };
        view["partitions"]
            .as_array()
            .is_some_and(|ps| ps.len() == PARTITIONS as usize && ps.iter().all(|p| !p["leader"].is_null()))
    };
    assert!(
        wait_for(Duration::from_secs(60), every_partition_led).await,
        "the dev cluster elected no leader for every partition"
    );
    let (target, hits) = receiver().await;
    let due_ms = now_ms() + 4_000;
    let jobs: Vec<Value> = (0..48).map(|i| job(&format!("dev-{i}"), due_ms, target)).collect();
    let created = wait_for(Duration::from_secs(20), || {
        let (status, answer) = call(http(1), "POST", "/jobs/batch", json!({ "jobs": jobs }).to_string().as_bytes());
        status == 200
            && answer["results"]
                .as_array()
                .is_some_and(|rs| rs.iter().all(|r| r["status"] == 201 || r["status"] == 409))
    })
    .await;
    assert!(created, "the jobs were not created");
    let killed = Command::new("kill").args(["-9", &pids[&2]]).status().expect("kill");
    assert!(killed.success());
    assert!(
        wait_for(Duration::from_secs(60), || deliveries(&hits).len() == 48).await,
        "{} of 48 fired",
        deliveries(&hits).len()
    );
    for (id, (first_ms, _)) in deliveries(&hits) {
        assert!(first_ms >= due_ms, "{id} fired {} ms early", due_ms - first_ms);
    }
    // The status of /health, 0 when nothing answers.
    let health = |id: u64| try_exchange(http(id), "GET", "/health", b"", "").map_or(0, |(status, _, _)| status);
    for member in [1, 3] {
        assert_eq!(health(member), 200, "node {member} stopped serving");
    }
    let restarted = wait_for(Duration::from_secs(30), || health(2) == 200).await;
    assert!(restarted, "the killed member was not started again");
    let _ = Command::new("kill").args(["-TERM", &dev.id().to_string()]).status();
    let stopped = wait_for(Duration::from_secs(30), || dev.try_wait().ok().flatten().is_some()).await;
    assert!(stopped, "SIGTERM did not stop the dev cluster");
    assert!(wait_for(Duration::from_secs(10), || (1..=3).all(|id| health(id) == 0)).await, "a member outlived it");
}
