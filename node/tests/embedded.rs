//! `Node::start` as a library, the way the `sundial` binary uses it: a node in this process
//! on a temporary data directory and free loopback ports takes a job over HTTP, shuts down
//! in order, and a second start on the same directory still holds the job.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use sundial_node::config::ServerOptions;
use sundial_node::server::Node;

/// One HTTP/1.1 request on a fresh connection; returns the status and the body.
fn http(address: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connects");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout set");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("sent");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answered");
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

async fn start(data: &std::path::Path) -> Node {
    let options = ServerOptions {
        data: Some(data.to_path_buf()),
        http: Some("127.0.0.1:0".parse().expect("address")),
        binary: Some("127.0.0.1:0".parse().expect("address")),
        ..ServerOptions::default()
    };
    Node::start(options.resolve().expect("valid settings")).await.expect("the node starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_as_a_library_serves_stops_and_restarts_with_its_jobs() {
    let data = tempfile::tempdir().expect("a data directory");
    let node = start(data.path()).await;
    let address = node.http;
    let create = r#"{"id": "embedded", "delay": "1h", "url": "https://example.com/hook"}"#;
    let (status, body) =
        tokio::task::spawn_blocking(move || http(address, "POST", "/jobs", create)).await.expect("ran");
    assert_eq!(status, 201, "{body}");
    assert_eq!(node.jobs_at_start, 0);
    node.shutdown().await.expect("a clean stop");

    let again = start(data.path()).await;
    assert_eq!(again.jobs_at_start, 1, "the acknowledged job is back after the restart");
    let address = again.http;
    let (status, body) =
        tokio::task::spawn_blocking(move || http(address, "GET", "/jobs/embedded", "")).await.expect("ran");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"pending\""), "{body}");
    again.shutdown().await.expect("a clean stop");
}
