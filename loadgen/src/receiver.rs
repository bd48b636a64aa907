//! The webhook sink's HTTP server: answers 200 and records each delivery (job id,
//! idempotency key, attempt, arrival time). Bounded: beyond `DELIVERIES_MAX` deliveries are
//! counted but not kept.

use crate::sink::Delivery;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Deliveries kept at most (a run of 10 million fires fits).
pub const DELIVERIES_MAX: usize = 10_000_000;

#[derive(Default)]
pub struct Recorded {
    pub deliveries: Vec<Delivery>,
    pub dropped: u64,
}

/// Starts the sink on `addr` (port 0 picks one) on the current tokio runtime.
pub async fn start(addr: SocketAddr) -> std::io::Result<(SocketAddr, Arc<Mutex<Recorded>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let recorded: Arc<Mutex<Recorded>> = Arc::default();
    let log = recorded.clone();
    tokio::spawn(async move {
        // Bounded by the process: the sink serves until the run ends.
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let header = |name: &str| {
                            request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
                        };
                        let delivery = Delivery {
                            job_id: header("x-sundial-job-id"),
                            idempotency_key: header("idempotency-key"),
                            attempt: header("x-sundial-attempt").parse().unwrap_or(0),
                            received_ms: now_ms(),
                        };
                        let _ = request.into_body().collect().await;
                        if let Ok(mut recorded) = log.lock() {
                            if recorded.deliveries.len() < DELIVERIES_MAX {
                                recorded.deliveries.push(delivery);
                            } else {
                                recorded.dropped += 1;
                            }
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    Ok((local, recorded))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
