//! The webhook sink's HTTP server: records each delivery (job id, idempotency key, attempt,
//! arrival time, what it answered, whether the signature verified) and answers as its
//! failure injection says. Bounded: beyond `DELIVERIES_MAX` deliveries are counted but not kept.

use crate::faults::{Answer, Faults};
use crate::sink::Delivery;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Deliveries kept at most (a run of 10 million fires fits).
pub const DELIVERIES_MAX: usize = 10_000_000;
/// How far a signature's timestamp may be from the sink's clock.
const SIGNATURE_TOLERANCE_MS: u64 = 300_000;

#[derive(Default)]
pub struct Recorded {
    pub deliveries: Vec<Delivery>,
    pub dropped: u64,
}

/// How the sink behaves.
#[derive(Clone, Debug, Default)]
pub struct SinkOptions {
    pub faults: Faults,
    /// Verify each delivery's signature with this secret.
    pub secret: Option<Vec<u8>>,
}

/// Starts the sink on `addr` (port 0 picks one) on the current tokio runtime.
pub async fn start(addr: SocketAddr, options: SinkOptions) -> std::io::Result<(SocketAddr, Arc<Mutex<Recorded>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let recorded: Arc<Mutex<Recorded>> = Arc::default();
    let log = recorded.clone();
    let options = Arc::new(options);
    tokio::spawn(async move {
        // Bounded by the process: the sink serves until the run ends.
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (log, options) = (log.clone(), options.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let (log, options) = (log.clone(), options.clone());
                    async move { Ok::<_, std::convert::Infallible>(record(request, &log, &options).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    Ok((local, recorded))
}

async fn record(
    request: hyper::Request<hyper::body::Incoming>,
    log: &Mutex<Recorded>,
    options: &SinkOptions,
) -> hyper::Response<Full<Bytes>> {
    let received_us = now_us();
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (job_id, idempotency_key, signature) =
        (header("x-sundial-job-id"), header("idempotency-key"), header("x-sundial-signature"));
    let attempt = header("x-sundial-attempt").parse().unwrap_or(0);
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let signature_ok = options
        .secret
        .as_ref()
        .map(|secret| crate::signature::verify(secret, &signature, &body, now_ms(), SIGNATURE_TOLERANCE_MS));
    let answer = options.faults.answer(&idempotency_key, attempt);
    let status = match answer {
        Answer::Accept => 200,
        Answer::Fail => 500,
        Answer::Throttle { .. } => 429,
    };
    if options.faults.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(options.faults.delay_ms)).await;
    }
    let delivery = Delivery { job_id, idempotency_key, attempt, received_us, status, signature_ok };
    if let Ok(mut recorded) = log.lock() {
        if recorded.deliveries.len() < DELIVERIES_MAX {
            recorded.deliveries.push(delivery);
        } else {
            recorded.dropped += 1;
        }
    }
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Answer::Throttle { retry_after_s } = answer {
        response.headers_mut().insert("retry-after", hyper::header::HeaderValue::from(retry_after_s));
    }
    response
}

pub fn now_ms() -> u64 {
    now_us() / 1_000
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}
