//! A real webhook receiver for the tests: a hyper HTTP/1.1 server on 127.0.0.1 that records
//! every request (arrival time, method, path, headers, body) and answers as the test's script
//! says (status, delay, headers).

#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Received {
    pub at_ms: u64,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub delay_ms: u64,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply { status, delay_ms: 0, headers: Vec::new() }
    }

    pub fn after_ms(mut self, delay_ms: u64) -> Reply {
        self.delay_ms = delay_ms;
        self
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// Decides the reply to the n-th request (0-based, counted over all paths).
pub type Script = Arc<dyn Fn(usize, &Received) -> Reply + Send + Sync>;

pub struct Receiver {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    /// Starts on the current tokio runtime; it lives as long as the runtime.
    pub async fn start(script: Script) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("address");
        let log: Arc<Mutex<Vec<Received>>> = Arc::new(Mutex::new(Vec::new()));
        let server_log = log.clone();
        tokio::spawn(async move {
            // Bounded by the test: the runtime ends with it.
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let log = server_log.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        let script = script.clone();
                        async move {
                            let method = request.method().to_string();
                            let path = request.uri().path().to_string();
                            let headers = request
                                .headers()
                                .iter()
                                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
                                .collect();
                            let body =
                                request.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                            let received = Received { at_ms: wall_ms(), method, path, headers, body };
                            let reply = {
                                let mut log = log.lock().expect("log");
                                let reply = script(log.len(), &received);
                                log.push(received);
                                reply
                            };
                            tokio::time::sleep(Duration::from_millis(reply.delay_ms)).await;
                            let mut response = hyper::Response::builder().status(reply.status);
                            for (name, value) in &reply.headers {
                                response = response.header(name.as_str(), value.as_str());
                            }
                            Ok::<_, std::convert::Infallible>(
                                response
                                    .body(Full::new(Bytes::from_static(b"receiver says hi")))
                                    .expect("valid response"),
                            )
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Receiver { addr, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.log.lock().expect("log").clone()
    }
}

/// Wall-clock milliseconds since the Unix epoch (this file is shared by the tests of
/// sundial-dispatch and the black-box suites in tests/, so it names no crate's clock).
fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
