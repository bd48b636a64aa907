//! The node or cluster under load, over the binary protocol (a `ClusterClient` per
//! connection: each job goes to its partition's leader) or over HTTP/JSON (a fixed number of
//! keep-alive HTTP/1.1 connections, spread over the given members, which forward).
//! Every call answers one HTTP-style status per item; 0 means no answer (transport failure).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use sundial_net::{ClientOptions, ClusterClient};
use tokio::sync::{Mutex, Semaphore};

/// Status for an item that got no answer (connection failed, timed out).
pub const NO_ANSWER: u16 = 0;
/// HTTP connections at most (each one is a socket and a task).
pub const HTTP_CONNECTIONS_MAX: usize = 1_024;
/// How long an HTTP request waits for its answer (the binary client's default too).
const HTTP_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Binary,
    Http,
}

pub struct Target {
    transport: Transport,
    next: AtomicUsize,
    /// The first answer body seen for each status that is not 2xx (0: the transport error),
    /// so a run's report can say what its failures were.
    examples: std::sync::Mutex<BTreeMap<u16, String>>,
}

/// One item's answer, as the overload scenario counts it.
#[derive(Clone, Debug)]
pub struct Answered {
    pub status: u16,
    /// The answer's Retry-After, seconds (0: none).
    pub retry_after_s: u32,
    /// The error's `code` ("overloaded", "no_leader", …; "no_answer" for none), empty for 2xx.
    pub code: String,
    /// No answer, or one saying the outcome is unknown: the client cannot tell whether the
    /// job was created.
    pub unknown: bool,
}

/// Bytes of an example answer kept.
const EXAMPLE_BYTES_MAX: usize = 300;

enum Transport {
    Binary(Vec<Arc<ClusterClient>>),
    Http(HttpPool),
}

impl Target {
    /// Connects `connections` times (binary) or prepares a pool of that many (HTTP).
    pub async fn connect(
        protocol: Protocol,
        members: &[SocketAddr],
        connections: usize,
        token: Option<String>,
        minimal_answers: bool,
    ) -> Result<Target, String> {
        if members.is_empty() {
            return Err("--node: give at least one address".into());
        }
        let connections = connections.clamp(1, HTTP_CONNECTIONS_MAX);
        let transport = match protocol {
            Protocol::Binary => {
                let options = ClientOptions { token, minimal_answers, ..ClientOptions::default() };
                let mut clients = Vec::with_capacity(connections);
                for _ in 0..connections {
                    let client = ClusterClient::connect(members, options.clone()).await.map_err(|e| e.to_string())?;
                    clients.push(Arc::new(client));
                }
                Transport::Binary(clients)
            }
            Protocol::Http => {
                let mut pool = HttpPool::new(members.to_vec(), connections, token);
                pool.minimal_answers = minimal_answers;
                Transport::Http(pool)
            }
        };
        Ok(Target { transport, next: AtomicUsize::new(0), examples: Default::default() })
    }

    /// One example answer per failing status seen so far.
    pub fn error_examples(&self) -> BTreeMap<u16, String> {
        self.examples.lock().map(|e| e.clone()).unwrap_or_default()
    }

    fn note(&self, status: u16, body: &[u8]) -> u16 {
        if !(200..300).contains(&status) {
            if let Ok(mut examples) = self.examples.lock() {
                examples.entry(status).or_insert_with(|| {
                    String::from_utf8_lossy(&body[..body.len().min(EXAMPLE_BYTES_MAX)]).into_owned()
                });
            }
        }
        status
    }

    fn note_item(&self, outcome: Result<sundial_net::Item, sundial_net::ClientError>) -> u16 {
        match outcome {
            Ok(item) => self.note(item.status, &item.body),
            Err(e) => self.note(NO_ANSWER, e.to_string().as_bytes()),
        }
    }

    fn note_http(&self, outcome: Result<(u16, Bytes), String>) -> u16 {
        match outcome {
            Ok((status, body)) => self.note(status, &body),
            Err(e) => self.note(NO_ANSWER, e.as_bytes()),
        }
    }

    fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates the jobs (one frame or one `POST /jobs/batch` for more than one).
    pub async fn create_many(&self, requests: Vec<Value>) -> Vec<u16> {
        self.create_many_answered(requests).await.into_iter().map(|answered| answered.status).collect()
    }

    /// `create_many`, with each answer's `Retry-After` and error `code` kept.
    pub async fn create_many_answered(&self, requests: Vec<Value>) -> Vec<Answered> {
        let count = requests.len();
        match &self.transport {
            Transport::Binary(clients) => match clients[self.pick() % clients.len()].create_many(&requests).await {
                Ok(items) => {
                    items.iter().map(|item| self.answered(item.status, item.retry_after_s, &item.body)).collect()
                }
                Err(e) => vec![self.answered(NO_ANSWER, 0, e.to_string().as_bytes()); count],
            },
            Transport::Http(pool) if count == 1 => {
                let body = requests.into_iter().next().unwrap_or_default().to_string();
                match pool.send_answered("POST", "/jobs", body, self.pick()).await {
                    Ok((status, retry_after_s, answer)) => vec![self.answered(status, retry_after_s, &answer)],
                    Err(e) => vec![self.answered(NO_ANSWER, 0, e.as_bytes())],
                }
            }
            Transport::Http(pool) => {
                let body = json!({ "jobs": requests }).to_string();
                match pool.send_answered("POST", "/jobs/batch", body, self.pick()).await {
                    Ok((200, _, answer)) => {
                        let parsed: Value = serde_json::from_slice(&answer).unwrap_or_default();
                        let results: Vec<Answered> = parsed["results"]
                            .as_array()
                            .map(|results| {
                                results
                                    .iter()
                                    .map(|r| {
                                        let status = r["status"].as_u64().unwrap_or(0) as u16;
                                        let retry_after_s = r["retry_after_s"].as_u64().unwrap_or(0) as u32;
                                        self.answered(status, retry_after_s, r["body"].to_string().as_bytes())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        if results.len() == count {
                            results
                        } else {
                            vec![self.answered(NO_ANSWER, 0, b"the batch answered another count"); count]
                        }
                    }
                    Ok((status, retry_after_s, answer)) => vec![self.answered(status, retry_after_s, &answer); count],
                    Err(e) => vec![self.answered(NO_ANSWER, 0, e.as_bytes()); count],
                }
            }
        }
    }

    fn answered(&self, status: u16, retry_after_s: u32, body: &[u8]) -> Answered {
        self.note(status, body);
        let code = match status {
            200..=299 => String::new(),
            NO_ANSWER => "no_answer".to_string(),
            _ => serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["code"].as_str().map(str::to_string))
                .unwrap_or_else(|| "other".to_string()),
        };
        // Only a failure can leave the outcome unknown: a created job's body is not searched.
        let unknown = status == NO_ANSWER
            || (!(200..300).contains(&status) && String::from_utf8_lossy(body).contains("outcome is unknown"));
        Answered { status, retry_after_s, code, unknown }
    }

    /// Reads a job (linearizable).
    pub async fn get(&self, id: &str) -> u16 {
        match &self.transport {
            Transport::Binary(clients) => self.note_item(clients[self.pick() % clients.len()].get(id).await),
            Transport::Http(pool) => {
                self.note_http(pool.send("GET", &format!("/jobs/{id}"), String::new(), self.pick()).await)
            }
        }
    }

    pub async fn cancel(&self, id: &str) -> u16 {
        match &self.transport {
            Transport::Binary(clients) => self.note_item(clients[self.pick() % clients.len()].cancel(id).await),
            Transport::Http(pool) => {
                self.note_http(pool.send("POST", &format!("/jobs/{id}/cancel"), String::new(), self.pick()).await)
            }
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// At most `connections` HTTP/1.1 connections, each carrying one request at a time (no
/// pipelining); a request waits for a free one. A connection that fails is dropped and a
/// new one opened on the next request.
pub(crate) struct HttpPool {
    members: Vec<SocketAddr>,
    token: Option<String>,
    /// Sends `Prefer: return=minimal`: creates are answered with ids only.
    minimal_answers: bool,
    free: Semaphore,
    idle: Mutex<Vec<Sender>>,
}

impl HttpPool {
    pub(crate) fn new(members: Vec<SocketAddr>, connections: usize, token: Option<String>) -> HttpPool {
        HttpPool {
            members,
            token,
            minimal_answers: false,
            free: Semaphore::new(connections),
            idle: Mutex::new(Vec::with_capacity(connections)),
        }
    }

    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        body: String,
        pick: usize,
    ) -> Result<(u16, Bytes), String> {
        self.send_answered(method, path, body, pick).await.map(|(status, _, answer)| (status, answer))
    }

    /// `send`, with the answer's Retry-After (seconds, 0 for none).
    pub(crate) async fn send_answered(
        &self,
        method: &str,
        path: &str,
        body: String,
        pick: usize,
    ) -> Result<(u16, u32, Bytes), String> {
        match tokio::time::timeout(HTTP_REQUEST_TIMEOUT, self.send_once(method, path, body, pick)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {HTTP_REQUEST_TIMEOUT:?}")),
        }
    }

    async fn send_once(
        &self,
        method: &str,
        path: &str,
        body: String,
        pick: usize,
    ) -> Result<(u16, u32, Bytes), String> {
        let _connection = self.free.acquire().await.map_err(|e| e.to_string())?;
        let reused = self.idle.lock().await.pop();
        let mut sender = match reused {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.open(self.members[pick % self.members.len()]).await?,
        };
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            // A member's address: a node bound to loopback answers loopback names only.
            .header("host", self.members[pick % self.members.len()].to_string())
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if self.minimal_answers {
            request = request.header("prefer", "return=minimal");
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let retry_after_s = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        let answer = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        self.idle.lock().await.push(sender);
        Ok((status, retry_after_s, answer))
    }

    async fn open(&self, addr: SocketAddr) -> Result<Sender, String> {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(connection);
        Ok(sender)
    }
}
