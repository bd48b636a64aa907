//! The workload's HTTP client: one request per connection (a killed or paused node never
//! leaves a pooled connection behind), with a timeout, telling a request that surely did not
//! reach the node (connection refused) from one whose outcome is unknown.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// The connection was refused: nothing was sent, so nothing happened.
    Refused(String),
    /// Sent (or maybe sent) without an answer in time: it may or may not have happened.
    Unknown(String),
}

/// A node's answer: status and JSON body (`Null` when it had none).
pub type Answer = (u16, Value);

pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Answer, Failure> {
    match tokio::time::timeout(timeout, call_inner(addr, method, path, body)).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Unknown(format!("no answer within {} ms", timeout.as_millis()))),
    }
}

async fn call_inner(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, Failure> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Failure::Refused(format!("connect {addr}: {e}")),
        _ => Failure::Unknown(format!("connect {addr}: {e}")),
    })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| Failure::Unknown(format!("handshake: {e}")))?;
    tokio::spawn(connection);
    let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(payload))
        .map_err(|e| Failure::Refused(format!("request: {e}")))?;
    let response = sender.send_request(request).await.map_err(|e| Failure::Unknown(format!("send: {e}")))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|e| Failure::Unknown(format!("body: {e}")))?.to_bytes();
    let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    Ok((status, value))
}
