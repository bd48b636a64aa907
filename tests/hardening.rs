//! What an attacker (or a bad moment) must not do to a real `sundial` process: running it
//! out of file descriptors must not close its ports for good, and clients that have not
//! shown a token must not make it buffer megabytes (issue 25, its two High items), and
//! authentication fails closed: a blank or short token stops the node from starting, a
//! comma is part of a token, not a separator, and an address that guesses is held back;
//! silent, trickling and idle HTTP clients are cut off, one address holds at most a
//! quarter of a port's connections, and web pages of other sites (or of a name re-pointed at
//! loopback) cannot drive a node.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

mod support;
use support::{try_exchange, Node};

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|entries| entries.count()).expect("/proc/PID/fd")
}

/// Resident memory of process `pid`, bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|kib| kib.parse::<u64>().ok()).expect("a number") * 1024
}

/// Connections to `addr`, as many of `count` as connect within a second each.
fn hold(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    (0..count).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()).collect()
}

/// Waits (bounded) for `GET /health` to answer 200.
fn health_answers(addr: SocketAddr, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if matches!(try_exchange(addr, "GET", "/health", b"", ""), Ok((200, _, _))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn running_out_of_file_descriptors_does_not_close_the_ports_for_good() {
    let data = tempfile::tempdir().expect("a data directory");
    let node = Node::start(data.path());
    let pid = node.child.id();
    assert!(health_answers(node.addr, Duration::from_secs(30)), "the node serves before the test");
    // Leave the node a handful of descriptors (prlimit, util-linux): its connection caps were
    // sized from the limit it started with, so accepting now runs into EMFILE.
    let limit = open_fds(pid) + 8;
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:{limit}")])
        .status()
        .expect("prlimit runs (util-linux)");
    assert!(limited.success(), "prlimit set the node's descriptor limit");
    let held_http = hold(node.addr, 64);
    let held_binary = hold(node.binary, 32);
    assert!(held_http.len() > 8, "connections waited in the backlog: {}", held_http.len());
    // Long enough for the listeners to hit the limit and back off a few times.
    std::thread::sleep(Duration::from_millis(1_500));
    drop(held_http);
    drop(held_binary);
    assert!(health_answers(node.addr, Duration::from_secs(30)), "/health answers once descriptors are free again");
    let metrics = node.metrics_text();
    let counted = metrics
        .lines()
        .filter(|l| l.starts_with("sundial_accept_errors_total{") && l.contains("listener=\"http\""))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>();
    assert!(counted > 0.0, "the failed accepts were counted:\n{metrics}");
    // The binary port is back too: a connection is taken and answered (a Hello refused for
    // being malformed is an answer).
    let mut binary = TcpStream::connect_timeout(&node.binary, Duration::from_secs(5)).expect("the binary port");
    binary.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    binary.write_all(&[0, 0, 0, 2, 0x7f, 0]).expect("a malformed frame");
    let mut answer = [0u8; 4];
    std::io::Read::read_exact(&mut binary, &mut answer).expect("the node answers on the binary port");
}

#[test]
fn unauthenticated_hellos_cannot_make_the_node_buffer_megabytes() {
    let data = tempfile::tempdir().expect("a data directory");
    let token = "a-long-enough-token-for-this-node";
    let node = Node::start_with(data.path(), &["--token", token]);
    let pid = node.child.id();
    assert!(health_answers(node.addr, Duration::from_secs(30)), "the node serves before the test");
    let before = resident_bytes(pid);
    // 200 clients each announce a 4 MiB Hello and send 1 MiB of it, then wait: before the
    // node capped Hellos, it buffered every byte (≥ 200 MiB in all).
    let mut header = Vec::new();
    header.extend_from_slice(&(4u32 << 20).to_be_bytes());
    header.extend_from_slice(&[0x01, 0]);
    header.extend_from_slice(&1u64.to_be_bytes());
    let chunk = vec![0u8; 1 << 20];
    let mut clients = Vec::new();
    for _ in 0..200 {
        let Ok(mut client) = TcpStream::connect_timeout(&node.binary, Duration::from_secs(2)) else { continue };
        client.set_write_timeout(Some(Duration::from_secs(2))).expect("timeout");
        // A node that refuses the frame closes the connection: the rest of the write fails.
        let _ = client.write_all(&header).and_then(|()| client.write_all(&chunk));
        clients.push(client);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = resident_bytes(pid).saturating_sub(before);
    assert!(clients.len() == 200, "every client connected: {}", clients.len());
    assert!(grown < 40 << 20, "resident memory grew {} MiB for 200 unfinished Hellos", grown >> 20);
    drop(clients);
    // Authenticated work goes on.
    let (status, _, _) =
        try_exchange(node.addr, "GET", "/jobs?status=pending", b"", &format!("authorization: Bearer {token}\r\n"))
            .expect("the API answers");
    assert_eq!(status, 200);
}

/// `sundial server` with these arguments and environment, on a fresh directory: whether it
/// exited (within 20 s) with an error, and what it printed.
fn refused_at_start(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(support::sundial_bin())
        .args(["server", "--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start sundial");
    let started = Instant::now();
    // Bounded: 20 s, then the node is taken as running (not refused).
    while started.elapsed() < Duration::from_secs(20) {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut text).expect("read");
            return (!status.success(), text);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    (false, "still running after 20 s".into())
}

#[test]
fn tokens_fail_closed_stay_whole_and_a_guessing_address_is_held_back() {
    for (args, env) in
        [(vec!["--token", ""], vec![]), (vec![], vec![("SUNDIAL_TOKENS", " , ")]), (vec!["--token", "s3cret"], vec![])]
    {
        let (refused, said) = refused_at_start(&args, &env);
        assert!(refused && said.contains("tokens:"), "{args:?} {env:?}: refused {refused}, said {said}");
    }
    let data = tempfile::tempdir().expect("tempdir");
    let token = "Xq9#mZ2!pL,a-longer-part";
    let node = Node::start_with(data.path(), &["--token", token]);
    let status_with = |given: &str| {
        try_exchange(node.addr, "GET", "/jobs?status=pending", b"", &format!("authorization: Bearer {given}\r\n"))
            .map(|(status, _, _)| status)
            .ok()
    };
    assert_eq!(status_with(token), Some(200), "the whole token is the token");
    assert_eq!(status_with("a-longer-part"), Some(401), "the part after the comma is not a token");
    assert_eq!(status_with("Xq9#mZ2!pL"), Some(401), "nor the part before it");
    let metrics = node.metrics_text_with(&format!("authorization: Bearer {token}\r\n"));
    assert!(metrics.contains("sundial_auth_refusals_total{api=\"http\"} 2"), "both wrong tokens counted");
    // Guessing on: the address runs out of guesses, and then even the right token is
    // answered 429 (so the answers tell a guesser nothing) until its budget refills.
    let statuses: Vec<Option<u16>> = (0..40).map(|n| status_with(&format!("guess-{n:016}"))).collect();
    assert!(statuses.contains(&Some(429)), "{statuses:?}");
    assert_eq!(status_with(token), Some(429), "held back while out of guesses");
    let refilled = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        status_with(token) == Some(200)
    });
    assert!(refilled, "the right token works again once the budget refills");
}

/// A node whose descriptor limit (soft and hard) is `nofile`, so its connection caps are
/// small: HTTP a quarter of it, the binary port an eighth; one address a quarter of each.
fn start_with_descriptors(data: &std::path::Path, nofile: u32) -> Node {
    let mut child = std::process::Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(support::sundial_bin())
        .args(["--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--data"])
        .arg(data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("prlimit runs (util-linux)");
    let (addr, binary) = support::listening_addresses(&mut child);
    Node { child, addr, binary }
}

/// A connection to `to` from the loopback address `from` (another client as far as the
/// node can tell).
fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("a runtime");
    runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.bind(SocketAddr::new(from, 0)).expect("bind a second loopback address");
        let stream = socket.connect(to).await.expect("connect").into_std().expect("a std stream");
        stream.set_nonblocking(false).expect("blocking reads");
        stream
    })
}

/// What the node sends on `stream` until it closes it (or `limit` passes: then `None`).
fn read_until_closed(mut stream: TcpStream, limit: Duration) -> Option<String> {
    stream.set_read_timeout(Some(limit)).expect("timeout");
    let mut seen = Vec::new();
    match std::io::Read::read_to_end(&mut stream, &mut seen) {
        Ok(_) => Some(String::from_utf8_lossy(&seen).into_owned()),
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&seen).into_owned())
        }
        Err(_) => None,
    }
}

#[test]
fn one_address_holds_at_most_a_quarter_of_the_connections() {
    let data = tempfile::tempdir().expect("a data directory");
    // HTTP: 512 / 4 = 128 connections, 32 per address; binary: 64, 16 per address.
    let node = start_with_descriptors(data.path(), 512);
    assert!(health_answers(node.addr, Duration::from_secs(30)), "the node serves before the test");
    let held = hold(node.addr, 32);
    let held_binary = hold(node.binary, 16);
    assert_eq!((held.len(), held_binary.len()), (32, 16), "every connection was taken");
    // The /health calls' connections may still hold their places a moment: the first
    // connection past 32 held may be taken, silently, while they go. One of the next few
    // is refused at once, with a 429 that says why.
    let mut extra = Vec::new();
    let said = (0..4).find_map(|_| {
        let refused = TcpStream::connect_timeout(&node.addr, Duration::from_secs(2)).expect("connects");
        extra.push(refused.try_clone().expect("a second handle"));
        read_until_closed(refused, Duration::from_secs(2))
    });
    let said = said.expect("one of the 4 connections past the 32 held was refused");
    assert!(said.starts_with("HTTP/1.1 429") && said.contains("too_many_connections"), "{said}");
    let refused_binary = TcpStream::connect_timeout(&node.binary, Duration::from_secs(2)).expect("connects");
    let said = read_until_closed(refused_binary, Duration::from_secs(10)).expect("and the 17th binary one");
    assert!(said.contains("too many connections"), "an Error frame says why: {said:?}");
    // Another address is served meanwhile.
    let mut other = connect_from("127.0.0.2".parse().expect("an address"), node.addr);
    other.write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").expect("a request");
    let answer = read_until_closed(other, Duration::from_secs(10)).expect("answered");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Once the address lets its connections go, it is served again.
    drop((held, held_binary, extra));
    assert!(health_answers(node.addr, Duration::from_secs(10)), "served once its connections closed");
    let metrics = node.metrics_text();
    let refusals = |listener: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("sundial_connections_refused_total{") && l.contains(listener))
            .filter(|l| l.contains("reason=\"per_address\""))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>()
    };
    assert!(refusals("listener=\"http\"") >= 1.0 && refusals("listener=\"binary\"") >= 1.0, "counted:\n{metrics}");
}

#[test]
fn silent_trickling_and_idle_http_clients_are_cut_off() {
    let data = tempfile::tempdir().expect("a data directory");
    let node = Node::start(data.path());
    assert!(health_answers(node.addr, Duration::from_secs(30)), "the node serves before the test");
    let connect = || TcpStream::connect_timeout(&node.addr, Duration::from_secs(2)).expect("connects");
    let silent = connect();
    let mut partial = connect();
    partial.write_all(b"POST /jobs HTTP/1.1\r\nhost: 127.0.0.1\r\n").expect("half a head");
    let mut idle = connect();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").expect("a keep-alive request");
    let mut trickle = connect();
    let head =
        "POST /jobs HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
    trickle.write_all(head.as_bytes()).expect("a head and a byte of its body");
    // Each is watched at once on a thread of its own; every one ends well within a minute.
    let started = Instant::now();
    let watch = |stream: TcpStream| {
        std::thread::spawn(move || (read_until_closed(stream, Duration::from_secs(60)), started.elapsed()))
    };
    let watched = [watch(silent), watch(partial), watch(idle), watch(trickle)].map(|t| t.join().expect("joined"));
    let [silent, partial, idle, trickle] =
        watched.map(|(seen, after)| (seen.expect("closed by the node within a minute"), after));
    assert_eq!((silent.0.as_str(), partial.0.as_str()), ("", ""), "no head: closed without a word");
    assert!(idle.0.starts_with("HTTP/1.1 200"), "answered, then closed once idle: {}", idle.0);
    assert!(trickle.0.starts_with("HTTP/1.1 408") && trickle.0.contains("request_timeout"), "{}", trickle.0);
    // Not before their time: 10 s for a head (the idle wait included), 30 s for a body.
    for (what, after) in [("silent", silent.1), ("partial", partial.1), ("idle", idle.1)] {
        assert!(after >= Duration::from_secs(9), "{what} closed after {after:?}");
    }
    assert!(trickle.1 >= Duration::from_secs(29), "the trickling body answered after {:?}", trickle.1);
}

#[test]
fn pages_of_other_sites_and_rebound_names_cannot_drive_a_node() {
    let data = tempfile::tempdir().expect("a data directory");
    let node = Node::start_with(data.path(), &["--allow-origin", "https://admin.example"]);
    assert!(health_answers(node.addr, Duration::from_secs(30)), "the node serves before the test");
    let job = br#"{"id": "from-a-page", "delay": "1h", "url": "http://127.0.0.1:9/hook"}"#;
    // A page of another site posts text/plain (no preflight): refused, nothing created.
    let evil = "origin: https://evil.example\r\ncontent-type: text/plain\r\n";
    let (status, _, body) = support::exchange(node.addr, "POST", "/jobs", job, evil);
    assert_eq!((status, body["code"].as_str()), (403, Some("origin_refused")), "{body}");
    assert_eq!(node.call("GET", "/jobs/from-a-page", b"").0, 404, "nothing was created");
    // A name re-pointed at 127.0.0.1 (DNS rebinding): the page is "same-origin" to itself.
    let mut rebound = TcpStream::connect(node.addr).expect("connects");
    let head = format!(
        "POST /jobs HTTP/1.1\r\nhost: evil.example:{port}\r\norigin: http://evil.example:{port}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        job.len(),
        port = node.addr.port()
    );
    rebound.write_all(head.as_bytes()).and_then(|()| rebound.write_all(job)).expect("a request");
    let said = read_until_closed(rebound, Duration::from_secs(10)).expect("answered");
    assert!(said.starts_with("HTTP/1.1 403") && said.contains("host_refused"), "{said}");
    assert_eq!(node.call("GET", "/jobs/from-a-page", b"").0, 404, "nothing was created");
    // The node's own pages, and an allowed origin's (with CORS answers), are served.
    let own = format!("origin: http://{}\r\n", node.addr);
    assert_eq!(support::exchange(node.addr, "GET", "/jobs?status=pending", b"", &own).0, 200);
    let allowed = "origin: https://admin.example\r\n";
    let preflight = format!("{allowed}access-control-request-method: POST\r\n");
    let (status, head, _) = support::exchange(node.addr, "OPTIONS", "/jobs", b"", &preflight);
    assert_eq!(status, 204, "{head}");
    assert!(head.contains("access-control-allow-origin: https://admin.example"), "{head}");
    assert!(head.contains("access-control-allow-methods:") && head.contains("authorization"), "{head}");
    let (status, head, _) = support::exchange(node.addr, "POST", "/jobs", job, allowed);
    assert_eq!(status, 201, "{head}");
    assert!(head.contains("access-control-allow-origin: https://admin.example"), "{head}");
}

#[test]
fn health_tells_a_caller_without_a_token_only_whether_the_node_is_live() {
    let data = tempfile::tempdir().expect("a data directory");
    let token = "a-long-enough-token-for-health";
    let node = Node::start_with(data.path(), &["--token", token]);
    assert!(health_answers(node.addr, Duration::from_secs(30)), "the node serves before the test");
    let (status, _, body) = support::exchange(node.addr, "GET", "/health", b"", "");
    assert_eq!((status, body.clone()), (200, serde_json::json!({"status": "ok"})), "liveness only");
    let wrong = "authorization: Bearer not-the-token-of-this-node\r\n";
    assert_eq!(support::exchange(node.addr, "GET", "/health", b"", wrong).2, serde_json::json!({"status": "ok"}));
    let authorized = format!("authorization: Bearer {token}\r\n");
    let (status, _, body) = support::exchange(node.addr, "GET", "/health", b"", &authorized);
    assert_eq!(status, 200);
    assert!(body["uptime_ms"].is_u64() && body["cluster_id"].is_string() && body["jobs"].is_object(), "{body}");
    // Tokens tried on /health count as guesses as on any route: an address that guesses is
    // held back (even its right token is answered 429), while probes without one still see
    // whether the node is live.
    let statuses: Vec<u16> = (0..25).map(|_| support::exchange(node.addr, "GET", "/health", b"", wrong).0).collect();
    assert!(statuses.contains(&429), "the guesses were held back: {statuses:?}");
    assert_eq!(support::exchange(node.addr, "GET", "/health", b"", &authorized).0, 429, "held back");
    assert_eq!(support::exchange(node.addr, "GET", "/health", b"", "").0, 200, "liveness for probes");
    // HEAD answers as GET does, without a body.
    let mut head = TcpStream::connect(node.addr).expect("connects");
    head.write_all(b"HEAD /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").expect("a request");
    let said = read_until_closed(head, Duration::from_secs(10)).expect("answered");
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
    assert!(said.ends_with("\r\n\r\n"), "no body: {said:?}");
}

#[test]
fn a_token_does_what_its_scope_allows() {
    let data = tempfile::tempdir().expect("a data directory");
    let (reader, writer, admin) = ("reading-token-0123456789", "writing-token-0123456789", "admin-token-0123456789");
    let node = Node::start_with(
        data.path(),
        &["--token", &format!("read:{reader}"), "--token", &format!("write:{writer}"), "--token", admin],
    );
    assert!(health_answers(node.addr, Duration::from_secs(30)), "the node serves before the test");
    let with = |token: &str| format!("authorization: Bearer {token}\r\n");
    let call = |method: &str, path: &str, body: &[u8], token: &str| {
        let (status, _, body) = support::exchange(node.addr, method, path, body, &with(token));
        (status, body["code"].as_str().unwrap_or("").to_string())
    };
    let job = br#"{"id": "scoped", "delay": "1h", "url": "http://127.0.0.1:9/hook", "labels": {"t": "1"}}"#;
    assert_eq!(call("POST", "/jobs", job, reader), (403, "forbidden".into()), "a reader creates nothing");
    assert_eq!(call("POST", "/jobs", job, writer).0, 201);
    assert_eq!(call("GET", "/jobs/scoped", b"", reader).0, 200, "a reader reads");
    let purge = br#"{"action": "purge", "labels": {"t": "1"}}"#;
    assert_eq!(call("POST", "/jobs/bulk", purge, writer), (403, "forbidden".into()), "a bulk purge is admin's");
    assert_eq!(call("DELETE", "/dlq", b"", writer), (403, "forbidden".into()), "so is emptying the dead letters");
    let cancel = br#"{"action": "cancel", "labels": {"t": "1"}}"#;
    assert_eq!(call("POST", "/jobs/bulk", cancel, writer).0, 200, "a bulk cancel is a writer's");
    assert_eq!(call("DELETE", "/dlq", b"", admin).0, 200, "a token without a scope is an admin one");
}
