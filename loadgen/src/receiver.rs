//! The webhook sink's HTTP server: records each delivery (job id, idempotency key, attempt,
//! arrival time, what it answered, whether the signature verified, its fencing token) and
//! answers as its failure injection says — and, asked to, refuses what a deposed leader sent
//! (a fencing term older than one it accepted for the job). Bounded: beyond `DELIVERIES_MAX`
//! deliveries are counted but not kept.

use crate::faults::{Answer, Faults};
use crate::sink::Delivery;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Deliveries kept at most (a run of 10 million fires fits).
pub const DELIVERIES_MAX: usize = 10_000_000;
/// A fencing token's term is above its low 40 bits (docs/API.md, "Fencing tokens").
pub const FENCING_INDEX_BITS: u32 = 40;

/// The leadership term a fencing token was made in.
pub fn fencing_term(token: u64) -> u64 {
    token >> FENCING_INDEX_BITS
}
/// How far a signature's timestamp may be from the sink's clock.
const SIGNATURE_TOLERANCE_MS: u64 = 300_000;

#[derive(Default)]
pub struct Recorded {
    pub deliveries: Vec<Delivery>,
    pub dropped: u64,
    /// The largest fencing token accepted per job (with `SinkOptions::fencing`; at most
    /// `DELIVERIES_MAX` jobs).
    pub fenced: std::collections::HashMap<String, u64>,
}

/// How the sink behaves.
#[derive(Clone, Debug, Default)]
pub struct SinkOptions {
    pub faults: Faults,
    /// Verify each delivery's signature with this secret.
    pub secret: Option<Vec<u8>>,
    /// Answer 409 to a delivery whose fencing term is older than that of one accepted
    /// before for its job, as a receiver that uses the tokens does.
    pub fencing: bool,
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
    let fencing_token: Option<u64> = header("x-sundial-fencing-token").parse().ok();
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
    let mut status = status;
    if let Ok(mut recorded) = log.lock() {
        if options.fencing {
            status = fenced(&mut recorded.fenced, &job_id, fencing_token, status);
        }
        let delivery = Delivery { job_id, idempotency_key, attempt, received_us, status, signature_ok, fencing_token };
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

/// The answer once fencing is looked at: 409 when the token's term is older than the
/// largest accepted for the job; an accepted one (2xx) raises that largest.
fn fenced(largest: &mut std::collections::HashMap<String, u64>, job_id: &str, token: Option<u64>, status: u16) -> u16 {
    let (Some(token), Some(&kept)) = (token, largest.get(job_id)) else {
        if let Some(token) = token.filter(|_| (200..300).contains(&status) && largest.len() < DELIVERIES_MAX) {
            largest.insert(job_id.to_string(), token);
        }
        return status;
    };
    if fencing_term(token) < fencing_term(kept) {
        return 409;
    }
    if (200..300).contains(&status) && token > kept {
        largest.insert(job_id.to_string(), token);
    }
    status
}

pub fn now_ms() -> u64 {
    now_us() / 1_000
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fencing_receiver_refuses_an_older_term_and_keeps_the_largest_accepted_token() {
        let mut largest = std::collections::HashMap::new();
        let token = |term: u64, index: u64| Some((term << FENCING_INDEX_BITS) | index);
        assert_eq!(fenced(&mut largest, "a", token(2, 10), 500), 500, "a failed attempt sets nothing");
        assert!(largest.is_empty());
        assert_eq!(fenced(&mut largest, "a", token(2, 10), 200), 200);
        assert_eq!(fenced(&mut largest, "a", token(1, 99), 200), 409, "an older term is refused");
        assert_eq!(fenced(&mut largest, "a", token(2, 4), 200), 200, "an older position of the same term is not");
        assert_eq!(fenced(&mut largest, "b", token(1, 1), 200), 200, "per job");
        assert_eq!(fenced(&mut largest, "a", None, 200), 200, "without a token nothing is judged");
        assert_eq!(largest.get("a"), token(2, 10).as_ref());
    }
}
