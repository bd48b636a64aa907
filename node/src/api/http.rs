//! The HTTP/JSON API (Scheduled-DB compatible, plus Sundial's own routes): hyper serving,
//! authentication, body limits, and the routing of each path to the router. Errors are
//! `{"error": …, "code": …, "field"?: …, "problems"?: [{field, rule}]}` with the matching
//! status.

use crate::api::auth::{Gate, Verdict};
use crate::api::origin::{self, Admission, OriginPolicy};
use crate::config::Scope;
use crate::shard::ops::{answer, error, field_error, Answer, CreateMode, JobOp, Representation};
use crate::shard::router::{CreateRequest, Router, BATCH_MAX, LIST_LIMIT_MAX};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use std::sync::Arc;
use sundial_engine::request::NamedId;
use sundial_engine::state::Status;
use sundial_engine::trace::TraceContext;

/// Request bodies larger than this are refused with 413.
pub const REQUEST_BODY_MAX_BYTES: usize = 512 * 1024;
/// HTTP connections served at once at most; more wait in the listen backlog. The node lowers
/// it to a share of its file-descriptor limit (`server.rs`).
pub const CONNECTIONS_MAX: usize = 4_096;
/// How long a client has to send a request's headers, counted from when the connection is
/// ready for one (accepted, or done with the previous request): a silent or trickling
/// client is disconnected, and so is a keep-alive connection idle this long.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// What answers say of idle keep-alive connections: a second under `HEADER_READ_TIMEOUT`.
const KEEP_ALIVE: &str = "timeout=9";
/// How long a client has to send a request's body once its headers came; past it, 408.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The OpenAPI document served at /openapi.json (node/openapi.json; a test checks that every
/// route it lists answers).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Accepts connections (`caps`: at most so many at once, and so many per client address),
/// spreading them over the shards'
/// runtimes (round robin) so that parsing and routing run on every core. Returns only when
/// the listener fails for good, saying why (the node then stops).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Arc<Router>,
    gate: Arc<Gate>,
    policy: Arc<OriginPolicy>,
    shards: Vec<tokio::runtime::Handle>,
    caps: (usize, usize),
) -> String {
    let mut acceptor = crate::api::Acceptor::new(listener, "http", caps, shards, too_many_connections());
    // Bounded by the process: ends when the listener fails or the task is aborted.
    loop {
        let (permit, stream) = match acceptor.next(&router.metrics).await {
            Ok(accepted) => accepted,
            Err(why) => return why,
        };
        let (router, gate, policy) = (router.clone(), gate.clone(), policy.clone());
        acceptor.spawn(stream, move |stream| async move {
            let _permit = permit;
            let client = crate::api::client_address(stream.peer_addr());
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (router, gate, policy) = (router.clone(), gate.clone(), policy.clone());
                async move {
                    let mut response = respond(request, &router, &gate, &policy, client).await;
                    // Clients' pools that read it drop an idle connection before the node
                    // does (HEADER_READ_TIMEOUT), instead of reusing one being closed.
                    let idle = hyper::header::HeaderValue::from_static(KEEP_ALIVE);
                    response.headers_mut().entry("keep-alive").or_insert(idle);
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

type Request = hyper::Request<hyper::body::Incoming>;

/// The answer to a connection refused because its address holds its share of connections.
fn too_many_connections() -> Vec<u8> {
    let body = r#"{"error":"this client address holds too many connections","code":"too_many_connections"}"#;
    format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The `Authorization` a request presents. Console pages (GET /ui/…) may carry the token in
/// the console's cookie instead; API calls (the console's too) carry it in the header.
fn presented_authorization(request: &Request, console: bool) -> Option<String> {
    let header_token = request.headers().get("authorization").and_then(|v| v.to_str().ok()).map(String::from);
    let cookie_token = console
        .then(|| request.headers().get("cookie").and_then(|v| v.to_str().ok()))
        .flatten()
        .and_then(|cookies| cookies.split(';').find_map(|c| c.trim().strip_prefix("sundial_token=")))
        .map(|token| format!("Bearer {}", crate::api::ui::decoded(token)));
    header_token.or(cookie_token)
}

/// Answers a request the origin policy admits (with CORS headers for an allowed origin's
/// pages); refuses, before anything else, one from a host name or a page it does not.
async fn respond(
    request: Request,
    router: &Router,
    gate: &Gate,
    policy: &OriginPolicy,
    client: std::net::IpAddr,
) -> hyper::Response<Full<Bytes>> {
    match policy.admit(request.method().as_str(), request.headers()) {
        Admission::Served => answer_request(request, router, gate, client).await,
        Admission::ServedTo(origin) => {
            let mut response = answer_request(request, router, gate, client).await;
            origin::allow_reading(response.headers_mut(), &origin);
            response
        }
        Admission::Preflight(origin) => {
            let mut response = hyper::Response::new(Full::new(Bytes::new()));
            *response.status_mut() = hyper::StatusCode::NO_CONTENT;
            origin::allow_sending(response.headers_mut(), &origin);
            response
        }
        Admission::Refused(code, message) => {
            router.metrics.rejected(code);
            to_response(error(403, code, message))
        }
    }
}

async fn answer_request(
    request: Request,
    router: &Router,
    gate: &Gate,
    client: std::net::IpAddr,
) -> hyper::Response<Full<Bytes>> {
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let console = method == "GET" && (path == "/ui" || path.starts_with("/ui/"));
    let authorization = presented_authorization(&request, console);
    let authorization = authorization.as_deref();
    let parent =
        request.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(TraceContext::parse_traceparent);
    let representation = preferred_representation(request.headers());
    let verdict = if console && path == "/ui/login" {
        Verdict::Allow
    } else {
        gate.check_from(client, &method, &path, authorization, sundial_dispatch::now_ms())
    };
    if console && verdict != Verdict::Allow {
        if verdict == Verdict::Unauthorized {
            router.metrics.auth_refused("http");
        }
        return html_response(crate::api::ui::refused(verdict));
    }
    match verdict {
        Verdict::Allow => {}
        Verdict::Unauthorized => {
            router.metrics.auth_refused("http");
            let mut response = to_response(error(401, "unauthorized", "a valid bearer token is required"));
            response.headers_mut().insert("www-authenticate", hyper::header::HeaderValue::from_static("Bearer"));
            return response;
        }
        Verdict::Limited { retry_after_s } => {
            router.metrics.rejected("rate_limited");
            let limited = error(429, "rate_limited", "this token's request rate is exceeded");
            return to_response(Answer { retry_after_s: Some(retry_after_s), ..limited });
        }
        Verdict::Forbidden { scope, needed } => return to_response(forbidden(scope, needed, &method, &path)),
    }
    let body = match read_body(request, router).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    if let Some(refused) = bulk_scope_refusal(gate, authorization, &method, &path, &body) {
        return to_response(refused);
    }
    if console {
        if let Some(page) = crate::api::ui::route(router, &path, &query).await {
            return html_response(page);
        }
    }
    if method == "GET" && path == "/metrics" {
        return metrics_response(router).await;
    }
    if matches!(method.as_str(), "GET" | "HEAD") && path.trim_end_matches('/') == "/health" {
        return to_response(health(router, gate, authorization, client).await);
    }
    let answer = route(router, &method, &path, &query, &body, parent, representation).await;
    // Applied when a create route answered with what it created (a refusal is the same
    // error either way).
    let applied = representation == Representation::Minimal && answer.status < 300 && creates_jobs(&method, &path);
    let mut response = to_response(answer);
    if applied {
        response.headers_mut().insert("preference-applied", hyper::header::HeaderValue::from_static("return=minimal"));
    }
    response
}

/// The request's body, within `BODY_READ_TIMEOUT` and `REQUEST_BODY_MAX_BYTES`; else the
/// answer that refuses it.
async fn read_body(request: Request, router: &Router) -> Result<Bytes, hyper::Response<Full<Bytes>>> {
    let reading =
        tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(request.into_body(), REQUEST_BODY_MAX_BYTES).collect());
    let Ok(read) = reading.await else {
        router.metrics.rejected("body_timeout");
        let seconds = BODY_READ_TIMEOUT.as_secs();
        let mut response =
            to_response(error(408, "request_timeout", format!("the body did not arrive within {seconds} s")));
        response.headers_mut().insert("connection", hyper::header::HeaderValue::from_static("close"));
        return Err(response);
    };
    match read {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            router.metrics.rejected("too_large");
            Err(to_response(error(413, "too_large", format!("the body exceeds {REQUEST_BODY_MAX_BYTES} bytes"))))
        }
        Err(e) => Err(to_response(error(400, "bad_body", format!("the body could not be read: {e}")))),
    }
}

/// `GET /health` (and `HEAD`, whose answer hyper sends without its body): everything to a
/// node without tokens or to a caller presenting one; to anyone else only whether the node
/// is live (its uptime, job counts, memory and cluster id stay behind the token).
/// A token presented here is checked as on any route: a wrong one counts as a guess (and a
/// guessing address is held back), a right one uses its rate.
async fn health(router: &Router, gate: &Gate, authorization: Option<&str>, client: std::net::IpAddr) -> Answer {
    let verdict = match (gate.enabled(), authorization) {
        (false, _) => Verdict::Allow,
        (true, None) => Verdict::Unauthorized,
        (true, Some(_)) => gate.check_scope_from(client, Scope::Read, authorization, sundial_dispatch::now_ms()),
    };
    if let Verdict::Limited { retry_after_s } = verdict {
        router.metrics.rejected("rate_limited");
        let limited = error(429, "rate_limited", "this token's (or this address's) request rate is exceeded");
        return Answer { retry_after_s: Some(retry_after_s), ..limited };
    }
    let full = router.health().await;
    if verdict == Verdict::Allow {
        return full;
    }
    if authorization.is_some() {
        router.metrics.auth_refused("http");
    }
    let status = full.body_value().and_then(|body| body.get("status").cloned()).unwrap_or(Value::Null);
    answer(full.status, json!({ "status": status }))
}

/// The refusal of a right token whose scope is short of what the request needs.
fn forbidden(scope: Scope, needed: Scope, method: &str, path: &str) -> Answer {
    let (scope, needed) = (scope.as_str(), needed.as_str());
    error(403, "forbidden", format!("this token's scope is {scope}; {method} {path} needs the {needed} scope"))
}

/// A bulk purge or delete needs an admin token (its action is in the body, which the gate
/// does not read); other bulk actions a write one, which the gate checked.
fn bulk_scope_refusal(
    gate: &Gate,
    authorization: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<Answer> {
    if method != "POST" || crate::api::path_segments(path) != ["jobs", "bulk"] {
        return None;
    }
    let action = serde_json::from_slice::<Value>(body).ok()?.get("action")?.as_str()?.to_string();
    let scope = gate.scope_of(authorization)?;
    (matches!(action.as_str(), "purge" | "delete") && scope < Scope::Admin)
        .then(|| forbidden(scope, Scope::Admin, &format!("{method} {path}"), &format!("(action {action})")))
}

/// Whether `method` on `path` is one of the create routes.
fn creates_jobs(method: &str, path: &str) -> bool {
    matches!(
        (method, crate::api::path_segments(path).as_slice()),
        ("POST", ["jobs"] | ["jobs", "batch"]) | ("PUT", ["jobs", _])
    )
}

/// `GET /metrics`: the Prometheus text format.
async fn metrics_response(router: &Router) -> hyper::Response<Full<Bytes>> {
    match router.metrics_text().await {
        Ok(text) => {
            let mut response = hyper::Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Err(refused) => to_response(refused),
    }
}

/// `Prefer: return=minimal` (RFC 7240: preferences are comma-separated, case-insensitive,
/// may have spaces around `=` and quotes around the value, in one header or several):
/// creates answer each job with its id only.
fn preferred_representation(headers: &hyper::HeaderMap) -> Representation {
    let minimal = headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|preference| {
            let preference = preference.split(';').next().unwrap_or("");
            let (name, value) = preference.split_once('=').unwrap_or((preference, ""));
            name.trim().eq_ignore_ascii_case("return") && value.trim().trim_matches('"').eq_ignore_ascii_case("minimal")
        });
    if minimal {
        Representation::Minimal
    } else {
        Representation::Full
    }
}

/// `{"node_id": 4, "raft": "10.0.0.4:7400"}`: the member to add, checked.
fn member_to_add(body: &[u8]) -> Result<crate::cluster::members::MembersCommand, Answer> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| error(400, "invalid", format!("body: not JSON ({e})")))?;
    let node_id = value["node_id"]
        .as_u64()
        .filter(|id| *id > 0)
        .ok_or_else(|| field_error("node_id", "node_id: must be a whole number of 1 or more"))?;
    let raft = value["raft"]
        .as_str()
        .filter(|raft| raft.parse::<std::net::SocketAddr>().is_ok())
        .ok_or_else(|| field_error("raft", "raft: must be the member's peer address as IP:PORT, e.g. 10.0.0.4:7400"))?;
    Ok(crate::cluster::members::MembersCommand::Add { node_id, raft: raft.to_string() })
}

/// A read of one job: linearizable, or with `?stale=true` from a local replica as it stands.
async fn read(router: &Router, id: &str, op: JobOp, query: &str) -> Answer {
    let stale = match query.split('&').find_map(|pair| pair.strip_prefix("stale=")) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return error(400, "invalid", format!("stale: must be true or false, not {other:?}")),
    };
    router.job_many_read(&[id.to_string()], op, stale).await.pop().expect("one answer per id")
}

/// Routes one request to the router; `parent` is its W3C trace context, if it had one.
pub async fn route(
    router: &Router,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    parent: Option<TraceContext>,
    representation: Representation,
) -> Answer {
    match (method, crate::api::path_segments(path).as_slice()) {
        ("GET", ["debug", "cluster"]) => router.cluster().await,
        ("GET", ["cluster", "members"]) => router.members(),
        ("POST", ["cluster", "members"] | ["join"]) => match member_to_add(body) {
            Ok(command) => router.change_members(command, 0).await,
            Err(refused) => refused,
        },
        ("DELETE", ["cluster", "members", id]) => match id.parse::<u64>() {
            Ok(node_id) if node_id > 0 => {
                router.change_members(crate::cluster::members::MembersCommand::Remove { node_id }, 0).await
            }
            _ => field_error("node_id", "node_id: must be a whole number of 1 or more"),
        },
        ("GET", ["openapi.json"]) => answer(200, serde_json::from_str(OPENAPI).expect("the bundled document is JSON")),
        ("POST", ["jobs"]) => {
            let requests = vec![json_text(body).map(CreateRequest::new)];
            router.create(requests, parent, CreateMode::Create, representation).await.pop().expect("one answer")
        }
        ("POST", ["jobs", "batch"]) => batch(router, body, parent, representation).await,
        ("POST", ["jobs", "bulk"]) => bulk(router, body).await,
        ("POST", ["jobs", "preview"]) => preview(body, query),
        ("PUT", ["jobs", id]) => upsert(router, id, body, parent, representation).await,
        ("GET", ["dlq"]) => router.dead_letters().await,
        ("GET", ["flow-keys"]) => router.flow_keys().await,
        ("GET", ["flow-keys", key]) => router.job(key, JobOp::KeyGet).await,
        ("POST", ["flow-keys", key, "pause"]) => router.job(key, JobOp::KeyPause).await,
        ("POST", ["flow-keys", key, "resume"]) => router.job(key, JobOp::KeyResume).await,
        ("POST", ["dlq", id, fire_ms, "redrive"]) => match fire_ms.parse::<u64>() {
            Ok(fire_ms) => router.job(id, JobOp::Redrive { fire_ms }).await,
            Err(_) => error(400, "invalid", "fire_ms: must be a whole number of milliseconds"),
        },
        ("DELETE", ["dlq"]) => router.purge_dead_letters().await,
        ("DELETE", ["dlq", id]) => router.job(id, JobOp::Purge).await,
        ("GET", ["jobs"]) => match list_query(query) {
            Ok((status, limit)) => router.list(status, limit).await,
            Err(refused) => refused,
        },
        ("GET", ["jobs", id]) => read(router, id, JobOp::Get, query).await,
        ("GET", ["jobs", id, "status"]) => read(router, id, JobOp::Status, query).await,
        ("GET", ["jobs", id, "executions"]) => read(router, id, JobOp::Executions, query).await,
        ("POST", ["jobs", id, "cancel"]) => router.job(id, JobOp::Cancel).await,
        ("DELETE", ["jobs", id]) => router.job(id, JobOp::Delete).await,
        ("POST", ["jobs", id, "pause"]) => router.job(id, JobOp::Pause).await,
        ("POST", ["jobs", id, "resume"]) => router.job(id, JobOp::Resume).await,
        ("POST", ["jobs", id, "trigger"]) => router.job(id, JobOp::Trigger).await,
        ("POST", ["jobs", id, "redrive"]) => router.job(id, JobOp::RedriveAll).await,
        ("POST", ["jobs", id, "backfill"]) => {
            let range = json_text(body).and_then(|request| {
                sundial_engine::request::parse_backfill(request).map_err(|problems| invalid(&problems))
            });
            match range {
                Ok((from_ms, to_ms)) => router.job(id, JobOp::Backfill { from_ms, to_ms }).await,
                Err(refused) => refused,
            }
        }
        (
            _,
            ["health"]
            | ["metrics"]
            | ["openapi.json"]
            | ["debug", "cluster"]
            | ["cluster", "members"]
            | ["cluster", "members", _]
            | ["join"]
            | ["jobs"]
            | ["jobs", _]
            | ["jobs", _, "status" | "executions" | "cancel" | "pause" | "resume" | "trigger" | "redrive" | "backfill"]
            | ["dlq"]
            | ["dlq", _]
            | ["flow-keys"]
            | ["flow-keys", _]
            | ["flow-keys", _, "pause" | "resume"]
            | ["dlq", _, _, "redrive"],
        ) => error(405, "method_not_allowed", format!("{method} is not allowed on {path}")),
        _ => error(404, "not_found", format!("no route {path}")),
    }
}

/// `POST /jobs/batch`: `{"jobs": [request, …]}` (at most `BATCH_MAX`), answered in order
/// with each one's status and job or error.
async fn batch(router: &Router, body: &[u8], parent: Option<TraceContext>, representation: Representation) -> Answer {
    use sundial_engine::request::{batch_requests, BatchRefusal};
    let text = match json_text(body) {
        Ok(text) => text,
        Err(refused) => return refused,
    };
    let requests = match batch_requests(text) {
        Ok(requests) if requests.len() <= BATCH_MAX => requests,
        Ok(_) => return error(400, "invalid", format!("jobs: at most {BATCH_MAX} per batch")),
        Err(BatchRefusal::NotAnObject) => return error(400, "invalid", "the body must be an object {\"jobs\": [...]}"),
        Err(BatchRefusal::JobsGivenTwice) => return error(400, "invalid", "jobs: is given more than once"),
        Err(BatchRefusal::JobsNotAnArray) => return error(400, "invalid", "jobs: must be an array of job requests"),
    };
    let requests = requests.into_iter().map(|request| Ok(CreateRequest::new(request))).collect();
    let answers = router.create(requests, parent, CreateMode::Create, representation).await;
    // A refusal to retry says when, as a single create's Retry-After header does.
    let results: Vec<Value> = answers
        .into_iter()
        .map(|a| match a.retry_after_s {
            Some(retry_after_s) => json!({"status": a.status, "body": a.body, "retry_after_s": retry_after_s}),
            None => json!({"status": a.status, "body": a.body}),
        })
        .collect();
    answer(200, json!({"results": results}))
}

/// A 400 naming every problem: the first one's field, and all of them.
fn invalid(problems: &[sundial_engine::job::FieldError]) -> Answer {
    let first = problems.first().map_or_else(|| "(body)".to_string(), |p| p.field.clone());
    let message = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    let list: Vec<Value> = problems.iter().map(|p| json!({"field": p.field, "rule": p.rule})).collect();
    answer(400, json!({"error": message, "code": "invalid", "field": first, "problems": list}))
}

/// `PUT /jobs/{id}`: creates the job or replaces its spec; the body's `id`, if any, must be
/// the path's.
async fn upsert(
    router: &Router,
    id: &str,
    body: &[u8],
    parent: Option<TraceContext>,
    representation: Representation,
) -> Answer {
    let request = json_text(body).and_then(|text| match sundial_engine::request::named_id(text) {
        Some(NamedId::Other) => Err(field_error("id", format!("id: must be the id in the path ({id}) or left out"))),
        Some(NamedId::Text(given)) if given != id => {
            Err(field_error("id", format!("id: must be the id in the path ({id}) or left out")))
        }
        // Not an object: refused with its reason by the parser.
        _ => Ok(CreateRequest { text, path_id: Some(id) }),
    });
    router.create(vec![request], parent, CreateMode::Upsert, representation).await.pop().expect("one answer")
}

/// Fires previewed per request at most.
const PREVIEW_COUNT_MAX: usize = 100;

/// `POST /jobs/preview?count=N&from=T`: the next fires of a job request as if created at
/// `from` (default now), without creating anything.
fn preview(body: &[u8], query: &str) -> Answer {
    let mut count = 10usize;
    let mut from_ms = sundial_dispatch::now_ms();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("count", value)) => match value.parse::<usize>() {
                Ok(n) if (1..=PREVIEW_COUNT_MAX).contains(&n) => count = n,
                _ => return field_error("count", format!("count: must be within 1..={PREVIEW_COUNT_MAX}")),
            },
            Some(("from", value)) => {
                let value = percent_decoded(value);
                match sundial_engine::request::parse_backfill(&json!({"from": value, "to": value}).to_string()) {
                    Ok((at_ms, _)) => from_ms = at_ms,
                    Err(_) => return field_error("from", "from: must be an RFC 3339 time or epoch seconds or ms"),
                }
            }
            _ => return error(400, "invalid", format!("unknown query parameter {pair}")),
        }
    }
    let request = match json_text(body) {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    match sundial_engine::request::parse_job_request(request, from_ms, "preview") {
        Ok(spec) => {
            let fires = sundial_engine::state::upcoming_fires(&spec, from_ms, count);
            let times: Vec<String> = fires
                .iter()
                .filter_map(|ms| jiff::Timestamp::from_millisecond(*ms as i64).ok())
                .map(|t| t.to_string())
                .collect();
            answer(200, json!({"from_ms": from_ms, "fires_ms": fires, "fires": times}))
        }
        Err(problems) => invalid(&problems),
    }
}

/// A query value with its %XX escapes decoded (a client may encode an RFC 3339 time's
/// colons and plus sign); invalid escapes are kept as they are.
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    // Bounded by the value's length.
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Jobs one bulk request touches at most.
const BULK_MAX: usize = BATCH_MAX;

/// `POST /jobs/bulk`: `{"action": …, "ids": [...]}` or `{"action": …, "labels": {k: v},
/// "limit": n}`: the action on each job (at most `BULK_MAX`), and a report of what it did.
async fn bulk(router: &Router, body: &[u8]) -> Answer {
    let request = match parse_body(body) {
        Ok(Value::Object(request)) => request,
        Ok(_) => return error(400, "invalid", "the body must be an object {\"action\": …, \"ids\" | \"labels\": …}"),
        Err(refused) => return refused,
    };
    if let Some(unknown) = request.keys().find(|k| !["action", "ids", "labels", "limit"].contains(&k.as_str())) {
        return field_error(unknown, format!("{unknown}: is not a known field"));
    }
    let op = match request.get("action").and_then(Value::as_str) {
        Some("cancel") => JobOp::Cancel,
        Some("redrive") => JobOp::RedriveAll,
        Some("purge") => JobOp::Purge,
        Some("pause") => JobOp::Pause,
        Some("resume") => JobOp::Resume,
        Some("delete") => JobOp::Delete,
        _ => return field_error("action", "action: must be cancel, redrive, purge, pause, resume or delete"),
    };
    let (ids, more) = match (request.get("ids"), request.get("labels")) {
        (Some(Value::Array(_)), None) if request.contains_key("limit") => {
            return field_error("limit", "limit: applies to labels only (ids name each job)");
        }
        (Some(Value::Array(ids)), None) => {
            if ids.is_empty() || ids.len() > BULK_MAX {
                return field_error("ids", format!("ids: 1..={BULK_MAX} job ids"));
            }
            let Some(ids) = ids.iter().map(|id| id.as_str().map(String::from)).collect::<Option<Vec<String>>>() else {
                return field_error("ids", "ids: each must be a job id string");
            };
            (ids, false)
        }
        (None, Some(Value::Object(labels))) if !labels.is_empty() => {
            let Some(labels) =
                labels.iter().map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect::<Option<Vec<_>>>()
            else {
                return field_error("labels", "labels: each value must be a string");
            };
            let limit = match request.get("limit") {
                None => BULK_MAX,
                Some(value) => match value.as_u64() {
                    Some(n) if (1..=BULK_MAX as u64).contains(&n) => n as usize,
                    _ => return field_error("limit", format!("limit: must be within 1..={BULK_MAX}")),
                },
            };
            match router.labelled(labels, limit).await {
                Ok(found) => found,
                Err(refused) => return refused,
            }
        }
        (Some(_), Some(_)) => return field_error("ids", "ids: give ids or labels, not both"),
        (None, Some(Value::Object(_))) => return field_error("labels", "labels: at least one label"),
        _ => return field_error("ids", "ids: an array of job ids, or labels: an object of label values, is required"),
    };
    let answers = if ids.is_empty() { Vec::new() } else { router.job_many(&ids, op).await };
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let mut fires = 0usize;
    for (id, answer) in ids.iter().zip(&answers) {
        if answer.status < 300 {
            fires += answer.body_value().and_then(|b| b["fires_added"].as_array().map(Vec::len)).unwrap_or(0);
            done.push(json!(id));
        } else {
            let body = answer.body_value().unwrap_or(Value::Null);
            failed.push(json!({"id": id, "status": answer.status, "code": body["code"], "error": body["error"]}));
        }
    }
    let mut report = json!({"matched": ids.len(), "done": done, "failed": failed, "more": more});
    if op == JobOp::RedriveAll {
        report["fires_redriven"] = json!(fires);
    }
    answer(200, report)
}

/// The parsed body of a create, or its refusal.
pub fn parse_body(body: &[u8]) -> Result<Value, Answer> {
    serde_json::from_slice(body).map_err(|e| error(400, "malformed_json", format!("the body is not JSON: {e}")))
}

/// A body that must be JSON, checked without building a tree: its text, read in place by
/// whatever parses it next.
pub fn json_text(body: &[u8]) -> Result<&str, Answer> {
    sundial_engine::request::checked_json(body)
        .map_err(|e| error(400, "malformed_json", format!("the body is not JSON: {e}")))
}

/// `?status=…&limit=…` of `GET /jobs`.
fn list_query(query: &str) -> Result<(Option<Status>, usize), Answer> {
    let mut status_filter = None;
    let mut limit = 100usize;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("status", value)) => match Status::ALL.iter().find(|s| s.as_str() == value) {
                Some(status) => status_filter = Some(*status),
                None => {
                    return Err(error(
                        400,
                        "invalid",
                        "status: must be one of pending, in_progress, completed, failed, cancelled, timeout",
                    ))
                }
            },
            Some(("limit", value)) => match value.parse::<usize>() {
                Ok(n) if (1..=LIST_LIMIT_MAX).contains(&n) => limit = n,
                _ => return Err(error(400, "invalid", format!("limit: must be within 1..={LIST_LIMIT_MAX}"))),
            },
            _ => return Err(error(400, "invalid", format!("unknown query parameter {pair}"))),
        }
    }
    Ok((status_filter, limit))
}

fn html_response(page: crate::api::ui::Page) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from(page.html)));
    *response.status_mut() = hyper::StatusCode::from_u16(page.status).unwrap_or(hyper::StatusCode::OK);
    let headers = response.headers_mut();
    headers.insert("content-type", hyper::header::HeaderValue::from_static("text/html; charset=utf-8"));
    // Everything the console needs is inline in the page: nothing else may load.
    headers.insert(
        "content-security-policy",
        hyper::header::HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src data:; form-action 'self'",
        ),
    );
    response
}

fn to_response(answer: Answer) -> hyper::Response<Full<Bytes>> {
    let (status, retry_after_s) = (answer.status, answer.retry_after_s);
    let mut response = hyper::Response::new(Full::new(Bytes::from(answer.into_body_bytes())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if status != 204 {
        response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    }
    if let Some(seconds) = retry_after_s {
        response.headers_mut().insert("retry-after", hyper::header::HeaderValue::from(seconds));
    }
    response
}
