//! The binary protocol v1 server (docs/PROTOCOL.md; codec in sundial-net): a handshake, then
//! pipelined request frames, each answered by request id as soon as it is done. Frames are
//! handled concurrently up to a bound per connection; past it the connection is not read
//! (backpressure). A malformed or oversized frame ends the connection after an Error frame
//! saying why, since the stream cannot be trusted past it.

use crate::api::auth::{Gate, Verdict};
use crate::api::http::json_text;
use crate::config::Scope;
use crate::shard::ops::{Answer, CreateMode, JobOp, Representation};
use crate::shard::router::{CreateRequest, Router};
use std::sync::Arc;
use std::time::Duration;
use sundial_net::codec::{self, Code, DecodeError, Frame, Item, Message, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

#[derive(Clone, Copy, Debug)]
pub struct BinaryConfig {
    /// Frames larger than this are refused (413) and the connection closed.
    pub frame_max_bytes: u32,
    /// Frames of one connection handled at once at most.
    pub in_flight_max: usize,
    /// How long a new connection may take to say Hello.
    pub handshake_timeout: Duration,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub connections_max: usize,
    /// Connections one client address may hold at once (more are refused).
    pub per_address_max: usize,
}

impl Default for BinaryConfig {
    fn default() -> BinaryConfig {
        BinaryConfig {
            frame_max_bytes: codec::FRAME_MAX_BYTES_DEFAULT,
            in_flight_max: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connections_max: 1_024,
            per_address_max: 256,
        }
    }
}

/// Answers waiting to be written per connection.
const ANSWERS_QUEUED_MAX: usize = 256;
/// A Hello's bytes besides its token (header, versions, field lengths), with room to spare:
/// before a client is authenticated it may make the node hold no more than a Hello.
const HELLO_BYTES_BESIDES_TOKEN: usize = 1_024;
/// Bytes read from the socket at once; a connection's buffer is shrunk back to this after
/// a large frame, so an idle connection holds little.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Accepts connections (at most `connections_max` at once), spreading them over the shards'
/// runtimes. Returns only when the listener fails for good, saying why (the node then stops).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Arc<Router>,
    gate: Arc<Gate>,
    shards: Vec<tokio::runtime::Handle>,
    config: BinaryConfig,
) -> String {
    let mut too_many = Vec::new();
    let refused = refusal(0, Code::RateLimited, "this client address holds too many connections");
    if codec::encode(&refused, config.frame_max_bytes, &mut too_many).is_err() {
        too_many.clear(); // then the connection is closed without a word
    }
    let caps = (config.connections_max, config.per_address_max);
    let mut acceptor = crate::api::Acceptor::new(listener, "binary", caps, shards, too_many);
    // Bounded by the process: ends when the listener fails or the task is aborted.
    loop {
        let (permit, stream) = match acceptor.next(&router.metrics).await {
            Ok(accepted) => accepted,
            Err(why) => return why,
        };
        let (router, gate) = (router.clone(), gate.clone());
        acceptor.spawn(stream, move |stream| async move {
            serve_connection(stream, router, gate, config).await;
            drop(permit);
        });
    }
}

async fn serve_connection(stream: TcpStream, router: Arc<Router>, gate: Arc<Gate>, config: BinaryConfig) {
    let (mut reader, mut writer) = stream.into_split();
    let mut buffer = Vec::new();
    let token = match handshake(&mut reader, &mut writer, &mut buffer, &router, &gate, config).await {
        Ok(token) => token,
        Err(refusal) => {
            let _ = write_frame(&mut writer, &refusal, config.frame_max_bytes).await;
            return;
        }
    };
    // Each answer travels with its frame's permit, released once it is written: at most
    // `in_flight_max` frames are handled or waiting to be written.
    let (answers, mut to_write) = mpsc::channel::<(Frame, Option<OwnedSemaphorePermit>)>(ANSWERS_QUEUED_MAX);
    let answer_max_bytes = config.frame_max_bytes.max(codec::FRAME_MAX_BYTES_DEFAULT);
    let writing = tokio::spawn(async move {
        // Bounded by the connection: ends when every sender is gone or a write fails.
        while let Some((frame, permit)) = to_write.recv().await {
            let written = write_frame(&mut writer, &frame, answer_max_bytes).await;
            drop(permit);
            if written.is_err() {
                break;
            }
        }
    });
    let permits = Arc::new(Semaphore::new(config.in_flight_max.max(1)));
    // Bounded by the connection: ends when the client closes it, goes quiet for the idle
    // limit, or sends a bad frame.
    loop {
        let next =
            tokio::time::timeout(config.idle_timeout, read_frame(&mut reader, &mut buffer, config.frame_max_bytes));
        let frame = match next.await {
            Err(_) => {
                let _ = answers.send((refusal(0, Code::BadRequest, "idle for too long; closing"), None)).await;
                break;
            }
            Ok(Ok(Some(frame))) => {
                if buffer.capacity() > 2 * READ_CHUNK_BYTES && buffer.len() <= READ_CHUNK_BYTES {
                    buffer.shrink_to(READ_CHUNK_BYTES);
                }
                frame
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                let _ = answers.send((refusal(0, code_of(&e), format!("{e}; closing the connection")), None)).await;
                break;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let verdict = frame_verdict(&gate, token.as_deref(), &frame);
        let router = router.clone();
        let answers_for_frame = answers.clone();
        tokio::spawn(async move {
            let answer = answer_frame(&router, verdict, frame).await;
            let _ = answers_for_frame.send((answer, Some(permit))).await;
        });
    }
    drop(answers);
    // Answers of frames still being handled are written before the connection closes.
    let _ = writing.await;
}

/// What the gate says of a frame: reads need a read token, everything else a write one.
fn frame_verdict(gate: &Gate, token: Option<&str>, frame: &Frame) -> Verdict {
    let authorization = token.map(|t| format!("Bearer {t}"));
    let reads = matches!(frame.message, Message::Ping | Message::Topology | Message::Get { .. });
    let needed = if reads { Scope::Read } else { Scope::Write };
    gate.check_scope(needed, authorization.as_deref(), sundial_dispatch::now_ms())
}

/// The frame answered, or refused as the gate said.
async fn answer_frame(router: &Router, verdict: Verdict, frame: Frame) -> Frame {
    match verdict {
        Verdict::Allow => handle(router, frame).await,
        Verdict::Limited { .. } => {
            router.metrics.rejected("rate_limited");
            refusal(frame.request_id, Code::RateLimited, "this token's request rate is exceeded")
        }
        Verdict::Unauthorized => unauthorized(router, frame.request_id),
        Verdict::Forbidden { scope, needed } => {
            let (scope, needed) = (scope.as_str(), needed.as_str());
            let message = format!("this token's scope is {scope}; this frame needs the {needed} scope");
            refusal(frame.request_id, Code::Other(403), message)
        }
    }
}

/// The refusal of a missing or wrong token, counted.
fn unauthorized(router: &Router, request_id: u64) -> Frame {
    router.metrics.auth_refused("binary");
    refusal(request_id, Code::Unauthorized, "a valid token is required")
}

/// Reads the Hello and answers Welcome; the refusal to send otherwise.
async fn handshake(
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    buffer: &mut Vec<u8>,
    router: &Router,
    gate: &Gate,
    config: BinaryConfig,
) -> Result<Option<String>, Frame> {
    // The Hello is read with a cap of what a Hello can be, not the frame limit: a client
    // that has not shown a token cannot make the node buffer megabytes.
    let hello_max_bytes = u32::try_from(HELLO_BYTES_BESIDES_TOKEN + gate.longest_token_bytes()).unwrap_or(u32::MAX);
    let hello_max_bytes = hello_max_bytes.min(config.frame_max_bytes);
    let first = tokio::time::timeout(config.handshake_timeout, read_frame(reader, buffer, hello_max_bytes)).await;
    let hello = match first {
        Err(_) => return Err(refusal(0, Code::BadRequest, "no Hello within the handshake timeout")),
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return Err(refusal(0, Code::BadRequest, "closed before the handshake")),
        Ok(Err(e)) => return Err(refusal(0, code_of(&e), format!("{e}"))),
    };
    let Message::Hello { min_version, max_version, token } = hello.message else {
        return Err(refusal(hello.request_id, Code::BadRequest, "the first frame must be Hello"));
    };
    if !(min_version..=max_version).contains(&PROTOCOL_VERSION) {
        let message = format!(
            "unsupported protocol version: this node speaks {PROTOCOL_VERSION}, the client {min_version}..={max_version}"
        );
        return Err(refusal(hello.request_id, Code::UnsupportedVersion, message));
    }
    let token = (!token.is_empty()).then_some(token);
    let authorization = token.as_ref().map(|t| format!("Bearer {t}"));
    let client = crate::api::client_address(reader.peer_addr());
    match gate.check_scope_from(client, Scope::Read, authorization.as_deref(), sundial_dispatch::now_ms()) {
        Verdict::Allow => {}
        // A Hello needs a read token, which every token is: `Forbidden` never comes here.
        Verdict::Unauthorized | Verdict::Forbidden { .. } => return Err(unauthorized(router, hello.request_id)),
        Verdict::Limited { .. } => {
            return Err(refusal(hello.request_id, Code::RateLimited, "this token's request rate is exceeded"))
        }
    }
    let welcome = Frame::new(
        hello.request_id,
        Message::Welcome {
            version: PROTOCOL_VERSION,
            node_id: router.facts.node_id,
            partitions: router.facts.meta.partitions,
            frame_max_bytes: config.frame_max_bytes,
        },
    );
    write_frame(writer, &welcome, config.frame_max_bytes)
        .await
        .map_err(|e| refusal(0, Code::BadRequest, format!("writing Welcome: {e}")))?;
    Ok(token)
}

/// Answers one request frame.
async fn handle(router: &Router, frame: Frame) -> Frame {
    let id = frame.request_id;
    let stale_ok = frame.flags & sundial_net::codec::FLAG_STALE_OK != 0;
    let representation = match frame.flags & sundial_net::codec::FLAG_MINIMAL {
        0 => Representation::Full,
        _ => Representation::Minimal,
    };
    let answers = match frame.message {
        Message::Ping => return Frame::new(id, Message::Pong),
        Message::Topology => vec![router.topology().await],
        Message::Create { jobs } => {
            let requests = jobs.iter().map(|job| json_text(job).map(CreateRequest::new)).collect();
            router.create(requests, None, CreateMode::Create, representation).await
        }
        Message::Get { ids } => router.job_many_read(&ids, JobOp::Get, stale_ok).await,
        Message::Cancel { ids } => router.job_many(&ids, JobOp::Cancel).await,
        Message::Upsert { jobs } => {
            let requests = jobs.iter().map(|job| json_text(job).and_then(with_id)).collect();
            router.create(requests, None, CreateMode::Upsert, representation).await
        }
        Message::Trigger { ids } => router.job_many(&ids, JobOp::Trigger).await,
        other => {
            let kind = format!("{other:?}");
            let name = kind.split([' ', '{', '(']).next().unwrap_or("this frame");
            return refusal(id, Code::BadRequest, format!("{name} is not a request a client sends"));
        }
    };
    Frame::new(id, Message::Results { items: answers.into_iter().map(item).collect() })
}

/// An upsert names the job it replaces: its document must carry an `id`.
fn with_id(request: &str) -> Result<CreateRequest<'_>, Answer> {
    match sundial_engine::request::named_id(request) {
        Some(sundial_engine::request::NamedId::Text(_)) => Ok(CreateRequest::new(request)),
        _ => Err(crate::shard::ops::field_error("id", "id: an upsert must name the job it creates or replaces")),
    }
}

/// The Error code for a frame that cannot be decoded.
fn code_of(error: &DecodeError) -> Code {
    match error {
        DecodeError::TooLarge { .. } => Code::TooLarge,
        _ => Code::BadRequest,
    }
}

fn item(answer: Answer) -> Item {
    Item { status: answer.status, retry_after_s: answer.retry_after_s.unwrap_or(0), body: answer.into_body_bytes() }
}

fn refusal(request_id: u64, code: Code, message: impl Into<String>) -> Frame {
    Frame::new(request_id, Message::Error { code, message: message.into() })
}

/// The next frame, `None` at a clean end of stream. An oversized frame is refused from its
/// length prefix, before its bytes are buffered.
async fn read_frame(
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    buffer: &mut Vec<u8>,
    frame_max_bytes: u32,
) -> Result<Option<Frame>, DecodeError> {
    // Bounded: each pass reads more of one frame, whose size is bounded.
    loop {
        if let Some((frame, used)) = codec::decode(buffer, frame_max_bytes)? {
            buffer.drain(..used);
            return Ok(Some(frame));
        }
        // Read into the buffer's spare room, at most a chunk (or a frame's cap) at a time.
        // (A frame is its 4-byte length prefix and at most `frame_max_bytes` after it.)
        let room = READ_CHUNK_BYTES.min(frame_max_bytes as usize + 4);
        if buffer.capacity() - buffer.len() < room {
            buffer.reserve(room);
        }
        match reader.read_buf(buffer).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

async fn write_frame(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    frame: &Frame,
    frame_max_bytes: u32,
) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    if let Err(e) = codec::encode(frame, frame_max_bytes, &mut bytes) {
        // An answer too large for a frame (a batch of big jobs): say so instead.
        let refused = refusal(frame.request_id, Code::TooLarge, format!("the answer does not fit a frame: {e}"));
        codec::encode(&refused, frame_max_bytes, &mut bytes).map_err(std::io::Error::other)?;
    }
    writer.write_all(&bytes).await
}
