//! The Rust client for the binary protocol: one TCP connection reused for every call (and
//! re-opened after a failure), calls made concurrently on it are batched automatically —
//! whatever is queued when the connection's writer runs goes out as one frame per kind — and
//! answers are matched to calls by request id, so many frames can be in flight.

use crate::codec::{self, Code, Frame, Item, Message, BATCH_MAX, FRAME_MAX_BYTES_DEFAULT, PROTOCOL_VERSION};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex};

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Bearer token for nodes that require one.
    pub token: Option<String>,
    pub connect_timeout: Duration,
    /// How long one call waits for its answer.
    pub request_timeout: Duration,
    /// Items per frame at most (≤ the protocol's 1,000).
    pub batch_max: usize,
    /// Frames sent and not yet answered at most; beyond it calls wait (backpressure).
    pub in_flight_max: usize,
    /// Calls waiting for the connection's writer at most; beyond it calls wait.
    pub queue_max: usize,
    /// Creates and upserts are answered with the job's id only (the MINIMAL flag), not
    /// the whole job: for loading jobs in bulk. A node before the flag answers such a frame
    /// with an error and closes the connection (every call in flight on it fails).
    pub minimal_answers: bool,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            token: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            batch_max: 256,
            in_flight_max: 64,
            queue_max: 8_192,
            minimal_answers: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("the node refused: {message} ({})", code.as_u16())]
    Refused { code: Code, message: String },
    #[error("the connection failed: {0}")]
    Connection(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Invalid(String),
}

/// What the node said in its Welcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub version: u16,
    pub node_id: u64,
    pub partitions: u32,
    pub frame_max_bytes: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Create,
    Get,
    Cancel,
    Upsert,
    Trigger,
    Topology,
    /// A get that a replica may answer from its local state (flag STALE_OK).
    GetStale,
}

struct Call {
    kind: Kind,
    /// A job request document (create) or an id (get, cancel).
    argument: Vec<u8>,
    reply: oneshot::Sender<Result<Item, ClientError>>,
}

struct Connection {
    calls: mpsc::Sender<Call>,
    info: NodeInfo,
}

pub struct Client {
    addr: SocketAddr,
    options: ClientOptions,
    connection: Mutex<Option<Connection>>,
}

impl Client {
    /// Connects and shakes hands (so a wrong address, version or token shows at once).
    pub async fn connect(addr: SocketAddr, options: ClientOptions) -> Result<Client, ClientError> {
        let client = Client { addr, options, connection: Mutex::new(None) };
        client.calls().await?;
        Ok(client)
    }

    /// The address this client connects to.
    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// The node's answer to the handshake.
    pub async fn info(&self) -> Result<NodeInfo, ClientError> {
        self.calls().await?;
        let connection = self.connection.lock().await;
        connection.as_ref().map(|c| c.info).ok_or_else(|| ClientError::Connection("the connection closed".into()))
    }

    /// Creates a job from its request document (JSON, as `POST /jobs` takes). The item's
    /// status is HTTP's: 201 created, 200 already there, 400 invalid, 507 full, …
    pub async fn create(&self, request: &serde_json::Value) -> Result<Item, ClientError> {
        self.call(Kind::Create, request.to_string().into_bytes()).await
    }

    pub async fn get(&self, id: &str) -> Result<Item, ClientError> {
        self.call(Kind::Get, id.as_bytes().to_vec()).await
    }

    pub async fn cancel(&self, id: &str) -> Result<Item, ClientError> {
        self.call(Kind::Cancel, id.as_bytes().to_vec()).await
    }

    /// Creates the job, or replaces the spec of the job with its `id` (which it must have):
    /// 201 created, 200 replaced or unchanged.
    pub async fn upsert(&self, request: &serde_json::Value) -> Result<Item, ClientError> {
        self.call(Kind::Upsert, request.to_string().into_bytes()).await
    }

    /// An extra fire of the job now, with its own key; the answer's body has its fire time
    /// in `fires_added`.
    pub async fn trigger(&self, id: &str) -> Result<Item, ClientError> {
        self.call(Kind::Trigger, id.as_bytes().to_vec()).await
    }

    /// The cluster's map as this node sees it (`Message::Topology`).
    pub async fn topology(&self) -> Result<crate::topology::Topology, ClientError> {
        let item = self.call(Kind::Topology, Vec::new()).await?;
        serde_json::from_slice(&item.body)
            .map_err(|e| ClientError::Invalid(format!("a topology that does not decode: {e}")))
    }

    /// Reads a job from the node's replica as it stands (the protocol's STALE_OK flag): no
    /// round trip to the partition's leader, possibly behind it.
    pub async fn get_stale(&self, id: &str) -> Result<Item, ClientError> {
        self.call(Kind::GetStale, id.as_bytes().to_vec()).await
    }

    /// Creates many jobs concurrently (they travel in batches); answers in order.
    pub async fn create_many(&self, requests: &[serde_json::Value]) -> Result<Vec<Item>, ClientError> {
        let mut waiting = Vec::with_capacity(requests.len());
        for request in requests {
            waiting.push(self.submit(Kind::Create, request.to_string().into_bytes()).await?);
        }
        let mut items = Vec::with_capacity(waiting.len());
        for answer in waiting {
            items.push(self.wait(answer).await?);
        }
        Ok(items)
    }

    async fn call(&self, kind: Kind, argument: Vec<u8>) -> Result<Item, ClientError> {
        let answer = self.submit(kind, argument).await?;
        self.wait(answer).await
    }

    async fn wait(&self, answer: oneshot::Receiver<Result<Item, ClientError>>) -> Result<Item, ClientError> {
        match tokio::time::timeout(self.options.request_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Connection("the connection closed before answering".into())),
            Err(_) => Err(ClientError::Timeout(self.options.request_timeout)),
        }
    }

    /// Queues a call on the connection (re-opening it once if it had failed).
    async fn submit(
        &self,
        kind: Kind,
        argument: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<Item, ClientError>>, ClientError> {
        let (reply, answer) = oneshot::channel();
        let mut call = Call { kind, argument, reply };
        for _ in 0..2 {
            let calls = self.calls().await?;
            match calls.send(call).await {
                Ok(()) => return Ok(answer),
                Err(mpsc::error::SendError(returned)) => {
                    call = returned;
                    *self.connection.lock().await = None;
                }
            }
        }
        Err(ClientError::Connection("the connection keeps failing".into()))
    }

    async fn calls(&self) -> Result<mpsc::Sender<Call>, ClientError> {
        let mut connection = self.connection.lock().await;
        if let Some(open) = connection.as_ref().filter(|c| !c.calls.is_closed()) {
            return Ok(open.calls.clone());
        }
        let opened = open(self.addr, &self.options).await?;
        let calls = opened.calls.clone();
        *connection = Some(opened);
        Ok(calls)
    }
}

async fn open(addr: SocketAddr, options: &ClientOptions) -> Result<Connection, ClientError> {
    let connect_error = |message: String| ClientError::Connect { addr, message };
    let stream = tokio::time::timeout(options.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| connect_error(format!("no connection within {:?}", options.connect_timeout)))?
        .map_err(|e| connect_error(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let hello = Frame::new(
        0,
        Message::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            token: options.token.clone().unwrap_or_default(),
        },
    );
    let mut bytes = Vec::new();
    codec::encode(&hello, FRAME_MAX_BYTES_DEFAULT, &mut bytes).map_err(|e| ClientError::Invalid(e.to_string()))?;
    writer.write_all(&bytes).await.map_err(|e| connect_error(e.to_string()))?;
    let mut buffer = Vec::new();
    let welcome =
        tokio::time::timeout(options.connect_timeout, read_frame(&mut reader, &mut buffer, FRAME_MAX_BYTES_DEFAULT))
            .await
            .map_err(|_| connect_error("no handshake answer".into()))??;
    let info = match welcome.message {
        Message::Welcome { version, node_id, partitions, frame_max_bytes } => {
            NodeInfo { version, node_id, partitions, frame_max_bytes }
        }
        Message::Error { code, message } => return Err(ClientError::Refused { code, message }),
        other => return Err(ClientError::Connection(format!("expected Welcome, got {other:?}"))),
    };
    let (calls, queued) = mpsc::channel(options.queue_max.max(1));
    tokio::spawn(drive(reader, writer, buffer, queued, options.clone(), info));
    Ok(Connection { calls, info })
}

async fn read_frame(
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    buffer: &mut Vec<u8>,
    frame_max_bytes: u32,
) -> Result<Frame, ClientError> {
    // Bounded: each pass reads more bytes of a frame whose size is bounded.
    loop {
        match codec::decode(buffer, frame_max_bytes) {
            Ok(Some((frame, used))) => {
                buffer.drain(..used);
                return Ok(frame);
            }
            Ok(None) => {}
            Err(e) => return Err(ClientError::Connection(format!("undecodable frame from the node: {e}"))),
        }
        let mut chunk = [0u8; 64 * 1024];
        let n = reader.read(&mut chunk).await.map_err(|e| ClientError::Connection(e.to_string()))?;
        if n == 0 {
            return Err(ClientError::Connection("the node closed the connection".into()));
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

type Waiting = Vec<oneshot::Sender<Result<Item, ClientError>>>;

/// Frames sent and not yet answered, each with the permit that bounds their number.
type InFlight = Arc<std::sync::Mutex<HashMap<u64, (Waiting, tokio::sync::OwnedSemaphorePermit)>>>;

/// The connection's two loops. The writer batches queued calls into frames and sends them;
/// the reader hands each answer back. They run apart so that a node busy writing answers
/// never waits on a client busy writing requests. Both end when the connection fails or
/// the client is gone, failing whatever still waits.
async fn drive(
    reader: tokio::net::tcp::OwnedReadHalf,
    writer: tokio::net::tcp::OwnedWriteHalf,
    buffer: Vec<u8>,
    queued: mpsc::Receiver<Call>,
    options: ClientOptions,
    info: NodeInfo,
) {
    let in_flight: InFlight = Arc::default();
    let permits = Arc::new(tokio::sync::Semaphore::new(options.in_flight_max.max(1)));
    let mut reading = tokio::spawn(read_answers(reader, buffer, in_flight.clone(), info));
    let failure = tokio::select! {
        failure = write_calls(writer, queued, in_flight.clone(), permits, options.batch_max, options.minimal_answers, info) => failure,
        failure = &mut reading => failure.unwrap_or_else(|e| e.to_string()),
    };
    reading.abort();
    let waiting: Vec<_> = in_flight.lock().map(|mut map| map.drain().collect()).unwrap_or_default();
    for (_, (replies, _permit)) in waiting {
        for reply in replies {
            let _ = reply.send(Err(ClientError::Connection(failure.clone())));
        }
    }
}

async fn write_calls(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    mut queued: mpsc::Receiver<Call>,
    in_flight: InFlight,
    permits: Arc<tokio::sync::Semaphore>,
    batch_max: usize,
    minimal: bool,
    info: NodeInfo,
) -> String {
    let batch_max = batch_max.clamp(1, BATCH_MAX);
    let mut next_id = 1u64;
    // Bounded by the client's life: ends when it is dropped or the connection fails.
    while let Some(call) = queued.recv().await {
        let mut calls = vec![call];
        while calls.len() < batch_max * 3 {
            match queued.try_recv() {
                Ok(more) => calls.push(more),
                Err(_) => break,
            }
        }
        let mut bytes = Vec::new();
        for (message, flags, waiting) in batch(calls, batch_max, minimal) {
            let permit = match frame_permit(&permits, &mut writer, &mut bytes).await {
                Ok(permit) => permit,
                Err(failure) => return failure,
            };
            let frame = Frame { flags, ..Frame::new(next_id, message) };
            if codec::encode(&frame, info.frame_max_bytes, &mut bytes).is_ok() {
                if let Ok(mut map) = in_flight.lock() {
                    map.insert(next_id, (waiting, permit));
                }
                next_id += 1;
                continue;
            }
            drop(permit);
            // A batch that does not encode (too big together, or one bad item) is sent one
            // call per frame, so only the calls that cannot be sent fail.
            for (message, reply) in split(frame.message).into_iter().zip(waiting) {
                let permit = match frame_permit(&permits, &mut writer, &mut bytes).await {
                    Ok(permit) => permit,
                    Err(failure) => return failure,
                };
                let frame = Frame { flags, ..Frame::new(next_id, message) };
                match codec::encode(&frame, info.frame_max_bytes, &mut bytes) {
                    Ok(()) => {
                        if let Ok(mut map) = in_flight.lock() {
                            map.insert(next_id, (vec![reply], permit));
                        }
                        next_id += 1;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ClientError::Invalid(e.to_string())));
                    }
                }
            }
        }
        if let Err(e) = writer.write_all(&bytes).await {
            return e.to_string();
        }
    }
    "the client was dropped".into()
}

/// A permit for one more frame in flight. When none is free, the frames encoded so far are
/// sent first: their answers are what frees permits, so waiting with them unsent (a turn
/// that splits a batch into more frames than `in_flight_max`) would wait for ever.
async fn frame_permit(
    permits: &Arc<tokio::sync::Semaphore>,
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    bytes: &mut Vec<u8>,
) -> Result<tokio::sync::OwnedSemaphorePermit, String> {
    if let Ok(permit) = permits.clone().try_acquire_owned() {
        return Ok(permit);
    }
    if !bytes.is_empty() {
        writer.write_all(bytes).await.map_err(|e| e.to_string())?;
        bytes.clear();
    }
    permits.clone().acquire_owned().await.map_err(|_| "closed".to_string())
}

async fn read_answers(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    mut buffer: Vec<u8>,
    in_flight: InFlight,
    info: NodeInfo,
) -> String {
    // Bounded by the connection: ends when it fails or closes.
    loop {
        let frame = match read_frame(&mut reader, &mut buffer, FRAME_MAX_BYTES_DEFAULT.max(info.frame_max_bytes)).await
        {
            Ok(frame) => frame,
            Err(e) => return e.to_string(),
        };
        let Some((waiting, _permit)) = in_flight.lock().ok().and_then(|mut map| map.remove(&frame.request_id)) else {
            continue;
        };
        match frame.message {
            Message::Results { items } if items.len() == waiting.len() => {
                for (reply, item) in waiting.into_iter().zip(items) {
                    let _ = reply.send(Ok(item));
                }
            }
            Message::Error { code, message } => {
                for reply in waiting {
                    let _ = reply.send(Err(ClientError::Refused { code, message: message.clone() }));
                }
            }
            other => {
                let message = format!("unexpected answer {other:?}");
                for reply in waiting {
                    let _ = reply.send(Err(ClientError::Connection(message.clone())));
                }
            }
        }
    }
}

/// A batch message as one message per item.
fn split(message: Message) -> Vec<Message> {
    match message {
        Message::Create { jobs } => jobs.into_iter().map(|job| Message::Create { jobs: vec![job] }).collect(),
        Message::Get { ids } => ids.into_iter().map(|id| Message::Get { ids: vec![id] }).collect(),
        Message::Cancel { ids } => ids.into_iter().map(|id| Message::Cancel { ids: vec![id] }).collect(),
        Message::Upsert { jobs } => jobs.into_iter().map(|job| Message::Upsert { jobs: vec![job] }).collect(),
        Message::Trigger { ids } => ids.into_iter().map(|id| Message::Trigger { ids: vec![id] }).collect(),
        other => vec![other],
    }
}

/// Groups calls by kind into messages of at most `batch_max` items, each with its flags.
fn batch(calls: Vec<Call>, batch_max: usize, minimal: bool) -> Vec<(Message, u8, Waiting)> {
    let creates_flags = if minimal { codec::FLAG_MINIMAL } else { 0 };
    let mut groups: Vec<(Kind, Vec<Vec<u8>>, Waiting)> = Vec::new();
    for call in calls {
        // A topology request has no items: each is a frame of its own.
        let open = groups
            .iter_mut()
            .rev()
            .find(|(kind, arguments, _)| *kind == call.kind && *kind != Kind::Topology && arguments.len() < batch_max);
        match open {
            Some((_, arguments, waiting)) => {
                arguments.push(call.argument);
                waiting.push(call.reply);
            }
            None => groups.push((call.kind, vec![call.argument], vec![call.reply])),
        }
    }
    groups
        .into_iter()
        .map(|(kind, arguments, waiting)| {
            let ids =
                |arguments: &[Vec<u8>]| arguments.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let (message, flags) = match kind {
                Kind::Create => (Message::Create { jobs: arguments }, creates_flags),
                Kind::Get => (Message::Get { ids: ids(&arguments) }, 0),
                Kind::GetStale => (Message::Get { ids: ids(&arguments) }, codec::FLAG_STALE_OK),
                Kind::Cancel => (Message::Cancel { ids: ids(&arguments) }, 0),
                Kind::Upsert => (Message::Upsert { jobs: arguments }, creates_flags),
                Kind::Trigger => (Message::Trigger { ids: ids(&arguments) }, 0),
                Kind::Topology => (Message::Topology, 0),
            };
            (message, flags, waiting)
        })
        .collect()
}

impl Item {
    /// The answer's JSON body (Null when empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}
