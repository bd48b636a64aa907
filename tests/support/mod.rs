//! What the node's black-box tests share: starting the real binary and reading where it
//! listens, plain HTTP calls, a recording webhook receiver, bounded waiting.
#![allow(dead_code)] // each test file uses its own part

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reads the node's banner for the addresses it listens on (HTTP, binary), then keeps
/// draining its stdout so the node never blocks on (or breaks) the pipe.
pub fn listening_addresses(child: &mut Child) -> (SocketAddr, SocketAddr) {
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut first_line = String::new();
    stdout.read_line(&mut first_line).expect("banner");
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stdout.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let after = |scheme: &str| {
        first_line
            .split(scheme)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {scheme} address in {first_line:?}"))
    };
    (after("http://"), after("sundial://"))
}

/// One HTTP/1.1 request on a fresh connection: (status, lower-cased head, JSON body or Null).
pub fn exchange(addr: SocketAddr, method: &str, path: &str, body: &[u8], extra_headers: &str) -> (u16, String, Value) {
    try_exchange(addr, method, path, body, extra_headers).unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

/// `exchange`, with a failed connection as an error (a member that was killed).
pub fn try_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    extra_headers: &str,
) -> std::io::Result<(u16, String, Value)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((status, head.to_ascii_lowercase(), serde_json::from_str(body).unwrap_or(Value::Null)))
}

#[derive(Clone, Debug)]
pub struct Hit {
    pub at_ms: u64,
    pub key: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// A webhook receiver on 127.0.0.1 answering 200 and recording every request.
pub async fn receiver() -> (SocketAddr, Arc<Mutex<Vec<Hit>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let log = hits.clone();
    tokio::spawn(async move {
        // Bounded by the test's runtime.
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let key = request
                            .headers()
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let headers = request
                            .headers()
                            .iter()
                            .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or("").to_string()))
                            .collect();
                        let body =
                            request.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                        log.lock().expect("log").push(Hit { at_ms: now_ms(), key, body, headers });
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, hits)
}

/// Waits (bounded) until `done` holds.
pub async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// A running node; killed (SIGKILL) when dropped.
pub struct Node {
    pub child: Child,
    pub addr: SocketAddr,
    pub binary: SocketAddr,
}

impl Node {
    pub fn start(data: &Path) -> Node {
        Node::start_with(data, &[])
    }

    pub fn start_with(data: &Path, extra: &[&str]) -> Node {
        let mut child = Command::new(sundial_bin())
            .args(["--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--allow-loopback-targets", "--data"])
            .arg(data)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sundial");
        let (addr, binary) = listening_addresses(&mut child);
        Node { child, addr, binary }
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One HTTP/1.1 request on a fresh connection: (status, JSON body or Null).
    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let (status, _, body) = self.call_with_headers(method, path, body);
        (status, body)
    }

    /// `call` with `Authorization: Bearer <token>`.
    pub fn call_authorized(&self, method: &str, path: &str, token: &str) -> (u16, Value) {
        let (status, _, body) = self.exchange(method, path, b"", &format!("authorization: Bearer {token}\r\n"));
        (status, body)
    }

    /// Like `call`, with the response head too.
    pub fn call_with_headers(&self, method: &str, path: &str, body: &[u8]) -> (u16, String, Value) {
        self.exchange(method, path, body, "")
    }

    /// Runs the `sundial` CLI against this node: (succeeded, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(sundial_bin())
            .args(args)
            .env("SUNDIAL_NODE", format!("http://{}", self.addr))
            .output()
            .expect("run the CLI");
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (output.status.success(), text(&output.stdout), text(&output.stderr))
    }

    /// The text of `GET /metrics` (not JSON).
    pub fn metrics_text(&self) -> String {
        self.metrics_text_with("")
    }

    /// `metrics_text`, the request carrying `extra_headers` (each line ending in CRLF).
    pub fn metrics_text_with(&self, extra_headers: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let head = format!("GET /metrics HTTP/1.1\r\nhost: {}\r\n{extra_headers}connection: close\r\n\r\n", self.addr);
        stream.write_all(head.as_bytes()).expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response.split_once("\r\n\r\n").expect("a body").1.to_string()
    }

    pub fn exchange(&self, method: &str, path: &str, body: &[u8], extra_headers: &str) -> (u16, String, Value) {
        exchange(self.addr, method, path, body, extra_headers)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `sundial` binary under test: `$SUNDIAL_BIN`, else the one cargo built beside this
/// test (target/<profile>/sundial; `cargo nextest run --workspace` builds it first).
pub fn sundial_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SUNDIAL_BIN") {
        return PathBuf::from(path);
    }
    let test = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> → target/<profile>/sundial
    let binary = test.parent().and_then(Path::parent).map(|profile| profile.join("sundial"));
    match binary {
        Some(binary) if binary.exists() => binary,
        _ => panic!("target/<profile>/sundial is missing: build it first (cargo build -p sundial-node --bin sundial)"),
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
