//! What an attacker (or a bad moment) must not do to a real `sundial` process: running it
//! out of file descriptors must not close its ports for good, and clients that have not
//! shown a token must not make it buffer megabytes (issue 25, its two High items), and
//! authentication fails closed: a blank or short token stops the node from starting, a
//! comma is part of a token, not a separator, and an address that guesses is held back.

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
    // 100 clients each announce a 4 MiB Hello and send 1 MiB of it, then wait: before the
    // node capped Hellos, it buffered every byte (≥ 100 MiB in all).
    let mut header = Vec::new();
    header.extend_from_slice(&(4u32 << 20).to_be_bytes());
    header.extend_from_slice(&[0x01, 0]);
    header.extend_from_slice(&1u64.to_be_bytes());
    let chunk = vec![0u8; 1 << 20];
    let mut clients = Vec::new();
    for _ in 0..100 {
        let Ok(mut client) = TcpStream::connect_timeout(&node.binary, Duration::from_secs(2)) else { continue };
        client.set_write_timeout(Some(Duration::from_secs(2))).expect("timeout");
        // A node that refuses the frame closes the connection: the rest of the write fails.
        let _ = client.write_all(&header).and_then(|()| client.write_all(&chunk));
        clients.push(client);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = resident_bytes(pid).saturating_sub(before);
    assert!(grown < 40 << 20, "resident memory grew {} MiB for 100 unfinished Hellos", grown >> 20);
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
