//! Span export over OTLP (HTTP, protobuf), when an endpoint is configured. Spans are made
//! where the work happens — the router (request), the shards (commit) and the engine's
//! runtimes (fire, attempt) — as plain `SpanRecord`s with ids derived from the job's trace
//! context, and handed to one exporter thread over a bounded channel: a slow or absent
//! collector costs dropped spans (counted), never a stalled shard.

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use opentelemetry_sdk::Resource;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};
use sundial_engine::trace::SpanRecord;

/// Spans waiting for the exporter; beyond it new ones are dropped (and counted).
const SPANS_QUEUED_MAX: usize = 16_384;
/// Spans per export request at most.
const EXPORT_BATCH_MAX: usize = 512;
/// How long spans wait for a batch to fill.
const EXPORT_INTERVAL: Duration = Duration::from_secs(1);
/// One export request's limit (connect, send, answer).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where spans go: cheap to clone, never blocks.
#[derive(Clone)]
pub struct SpanSink {
    spans: SyncSender<SpanRecord>,
    dropped: Arc<AtomicU64>,
}

impl SpanSink {
    pub fn send(&self, records: impl IntoIterator<Item = SpanRecord>) {
        for record in records {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.spans.try_send(record) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Starts the exporter thread for `endpoint` (`http://host:port`, `/v1/traces` added when
/// no path is given). It ends, after a last export, once every sink is dropped.
pub fn start(endpoint: &str) -> Result<(SpanSink, std::thread::JoinHandle<()>), String> {
    let url = if endpoint.trim_end_matches('/').matches('/').count() <= 2 {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    } else {
        endpoint.to_string()
    };
    if !url.starts_with("http://") {
        return Err(format!("otlp_endpoint: must be an http:// URL (a local collector), not {endpoint:?}"));
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(BlockingHttp)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("otlp_endpoint: {e}"))?;
    exporter.set_resource(&Resource::builder().with_service_name("sundial").build());
    let (spans, queued) = std::sync::mpsc::sync_channel(SPANS_QUEUED_MAX);
    let thread = std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || export_loop(exporter, queued, url))
        .map_err(|e| format!("cannot start the OTLP exporter thread: {e}"))?;
    Ok((SpanSink { spans, dropped: Arc::default() }, thread))
}

fn export_loop(exporter: opentelemetry_otlp::SpanExporter, queued: Receiver<SpanRecord>, url: String) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        tracing::error!("the OTLP exporter cannot start its runtime; spans are not exported");
        return;
    };
    let scope = InstrumentationScope::builder("sundial").with_version(env!("CARGO_PKG_VERSION")).build();
    let mut failures_logged_at: Option<Instant> = None;
    let mut open = true;
    // Bounded by the sinks: ends when every one is dropped and the queue is empty.
    while open {
        let mut batch = Vec::new();
        let deadline = Instant::now() + EXPORT_INTERVAL;
        while batch.len() < EXPORT_BATCH_MAX {
            match queued.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(record) => batch.push(span_data(record, &scope)),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(error) = runtime.block_on(exporter.export(batch)) {
            // At most one warning a minute: a missing collector must not flood the logs.
            if failures_logged_at.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(%url, %error, "OTLP export failed; spans are dropped until it works");
                failures_logged_at = Some(Instant::now());
            }
        }
    }
}

fn span_data(record: SpanRecord, scope: &InstrumentationScope) -> SpanData {
    let trace_id = TraceId::from_hex(&record.trace_id).unwrap_or(TraceId::INVALID);
    let span_id = SpanId::from_hex(&record.span_id).unwrap_or(SpanId::INVALID);
    let parent = record.parent_span_id.as_deref().and_then(|p| SpanId::from_hex(p).ok()).unwrap_or(SpanId::INVALID);
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    SpanData {
        span_context: SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, TraceState::default()),
        parent_span_id: parent,
        parent_span_is_remote: record.name == "request",
        span_kind: match record.name {
            "request" => SpanKind::Server,
            "attempt" => SpanKind::Client,
            _ => SpanKind::Internal,
        },
        name: record.name.into(),
        start_time: at(record.start_ms),
        end_time: at(record.end_ms.max(record.start_ms)),
        attributes: record.attributes.into_iter().map(|(key, value)| KeyValue::new(key, value)).collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if record.failed { Status::error("failed") } else { Status::Unset },
        instrumentation_scope: scope.clone(),
    }
}

/// The exporter's HTTP client: one blocking HTTP/1.1 request per export over a plain TCP
/// connection, on the exporter's own thread (a local collector needs no more).
#[derive(Debug)]
struct BlockingHttp;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for BlockingHttp {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<opentelemetry_http::Response<opentelemetry_http::Bytes>, opentelemetry_http::HttpError> {
        let uri = request.uri();
        let host = uri.host().ok_or("the endpoint has no host")?;
        let port = uri.port_u16().unwrap_or(80);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let address =
            std::net::ToSocketAddrs::to_socket_addrs(&(host, port))?.next().ok_or("the endpoint has no address")?;
        let mut stream = std::net::TcpStream::connect_timeout(&address, EXPORT_TIMEOUT)?;
        stream.set_read_timeout(Some(EXPORT_TIMEOUT))?;
        stream.set_write_timeout(Some(EXPORT_TIMEOUT))?;
        let mut head = format!("{} {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n", request.method());
        for (name, value) in request.headers() {
            if name != "host" && name != "content-length" && name != "connection" {
                head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap_or("")));
            }
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", request.body().len()));
        stream.write_all(head.as_bytes())?;
        stream.write_all(request.body())?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let status: u16 =
            answer.get(9..12).and_then(|s| std::str::from_utf8(s).ok()?.parse().ok()).ok_or("not an HTTP answer")?;
        let body_at = answer.windows(4).position(|w| w == b"\r\n\r\n").map_or(answer.len(), |p| p + 4);
        let response = opentelemetry_http::Response::builder()
            .status(status)
            .body(opentelemetry_http::Bytes::copy_from_slice(&answer[body_at..]))?;
        Ok(response)
    }
}
