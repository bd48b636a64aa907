//! The mesh: this node's links to the other members over QUIC with mutual TLS (one
//! connection per pair: the member with the lower id dials, and redials with backoff). It
//! carries the Raft messages of every partition — each shard hands over its turn's messages
//! at once and the mesh sends one batch per peer — and requests forwarded to the node that
//! leads a partition. Messages: a tag byte, then the body.
//!   0 hello    JSON `Member` facts of the sender (its id, HTTP and binary addresses)
//!   1 raft     `sundial_consensus::wire` batch of (partition, message)
//!   2 request  u64 id, then JSON (a forwarded piece of work)
//!   3 answer   u64 id, then JSON

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use sundial_consensus::{wire, Message, NodeId};
use sundial_net::quic::{Connection, Endpoint};
use tokio::sync::{mpsc, oneshot};

const TAG_HELLO: u8 = 0;
const TAG_RAFT: u8 = 1;
const TAG_REQUEST: u8 = 2;
const TAG_ANSWER: u8 = 3;

/// Batches waiting to be sent to one peer; beyond it Raft messages are dropped (Raft
/// resends what matters) and forwarded requests refused.
const PEER_QUEUE_MAX: usize = 1_024;
/// Raft batches from the shards waiting for the mesh.
pub const OUTBOX_CAPACITY: usize = 4_096;
/// Forwarded requests waiting for their answer, per node.
const FORWARDS_PENDING_MAX: usize = 4_096;
/// A forwarded request not answered by then is answered with 503 by the caller.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages larger than this are sent concurrently with the peer's other messages, at
/// most `LARGE_SENDS_MAX` at once per peer (beyond it, in line).
const LARGE_MESSAGE_BYTES: usize = 64 << 10;
const LARGE_SENDS_MAX: usize = 8;
/// Messages being read from one link at once.
const READS_MAX: usize = 64;
const REDIAL_MIN: Duration = Duration::from_millis(50);
const REDIAL_MAX: Duration = Duration::from_secs(1);

/// What one member tells the others about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberFacts {
    pub node_id: NodeId,
    pub http: String,
    pub binary: String,
    /// The newest format of forwarded requests the member reads (0: a member from before
    /// forwarded requests carried a version, which reads plain JSON only).
    #[serde(default)]
    pub forward_version: u8,
    /// The newest format of replicated commands the member reads (0: JSON only).
    #[serde(default)]
    pub command_format: u8,
}

/// A member as this node sees it.
#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    pub node_id: NodeId,
    pub raft: SocketAddr,
    pub http: Option<String>,
    pub binary: Option<String>,
    pub connected: bool,
    /// Milliseconds since the epoch of the last message from it (0: never).
    pub last_heard_ms: u64,
}

struct Peer {
    raft: SocketAddr,
    facts: Option<MemberFacts>,
    queue: Option<mpsc::Sender<Vec<u8>>>,
    /// Which link the queue belongs to: a member that restarted links anew before the old
    /// link has timed out, and the old one's end must not take the new one's queue.
    link: u64,
    last_heard_ms: u64,
}

struct Shared {
    node_id: NodeId,
    peers: Mutex<BTreeMap<NodeId, Peer>>,
    forwards: Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>,
    next_forward: std::sync::atomic::AtomicU64,
    next_link: std::sync::atomic::AtomicU64,
    me: MemberFacts,
    /// Where incoming Raft batches go: one channel per shard (partition mod shards).
    shards: Vec<mpsc::Sender<Vec<(u32, Message)>>>,
    /// Where forwarded requests go to be served (the router), with the channel for the answer.
    serve: mpsc::Sender<(Vec<u8>, oneshot::Sender<Vec<u8>>)>,
    /// The newest command format this node and every member it knows read (0 for a member
    /// that has not said): what the shards write. Computed once the membership is known
    /// (until then 0, which every build reads).
    command_format: Arc<AtomicU8>,
    /// When each member was last heard from (`PeerContact`).
    contact: Arc<PeerContact>,
    /// Hellos of nodes not (yet) members, kept until they are added (a joining node links
    /// before this node's membership view has it; its hello is not sent again).
    early_facts: Mutex<BTreeMap<NodeId, MemberFacts>>,
}

/// Hellos of non-members kept at most (`Shared::early_facts`).
const EARLY_FACTS_MAX: usize = 64;

/// The mesh, as shards and the router see it.
#[derive(Clone)]
pub struct Mesh {
    shared: Arc<Shared>,
}

pub struct MeshConfig {
    pub node_id: NodeId,
    pub me: MemberFacts,
    /// The members and their peer (QUIC) addresses, as the meta group has them; the mesh
    /// links to members as they are added.
    pub membership: Arc<crate::cluster::members::Membership>,
    /// Kept up to date by the mesh: see `Shared::command_format`.
    pub command_format: Arc<AtomicU8>,
    /// Noted by the mesh on every message from a member.
    pub contact: Arc<PeerContact>,
}

/// When each member was last heard from, whatever it sent: a follower whose leader's
/// heartbeats are late but whose node is heard from waits for it a while rather than
/// replacing it (`Config::leader_patience_tick`).
#[derive(Debug, Default)]
pub struct PeerContact {
    heard: Mutex<HashMap<NodeId, std::time::Instant>>,
}

impl PeerContact {
    pub fn note(&self, peer: NodeId, at: std::time::Instant) {
        self.heard.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, at);
    }

    /// Whether `peer` was heard from within `window` before `now`.
    pub fn heard_within(&self, peer: NodeId, window: Duration, now: std::time::Instant) -> bool {
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.get(&peer).is_some_and(|at| now.saturating_duration_since(*at) <= window)
    }
}

impl Mesh {
    /// Starts the mesh on the current tokio runtime over `endpoint`. Raft batches the shards
    /// produce arrive on `outbox`; incoming ones go to `shards`; forwarded requests to `serve`.
    pub fn start(
        config: MeshConfig,
        endpoint: Arc<Endpoint>,
        outbox: mpsc::Receiver<Vec<(u32, Message)>>,
        shards: Vec<mpsc::Sender<Vec<(u32, Message)>>>,
        serve: mpsc::Sender<(Vec<u8>, oneshot::Sender<Vec<u8>>)>,
    ) -> Mesh {
        let shared = Arc::new(Shared {
            node_id: config.node_id,
            peers: Mutex::new(BTreeMap::new()),
            forwards: Mutex::new(HashMap::new()),
            next_forward: std::sync::atomic::AtomicU64::new(1),
            next_link: std::sync::atomic::AtomicU64::new(1),
            me: config.me,
            shards,
            serve,
            command_format: config.command_format,
            contact: config.contact,
            early_facts: Mutex::new(BTreeMap::new()),
        });
        tokio::spawn(follow_membership(shared.clone(), endpoint.clone(), config.membership));
        tokio::spawn(accept_loop(shared.clone(), endpoint));
        tokio::spawn(send_loop(shared.clone(), outbox));
        Mesh { shared }
    }

    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// Every member, this node first.
    /// The format of forwarded requests `member` said it reads (0 until it said).
    pub fn forward_version_of(&self, member: NodeId) -> u8 {
        let peers = self.shared.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(&member).and_then(|peer| peer.facts.as_ref()).map_or(0, |facts| facts.forward_version)
    }

    pub fn members(&self) -> Vec<MemberView> {
        let me = &self.shared.me;
        let peers = self.shared.peers.lock().unwrap_or_else(|p| p.into_inner());
        let mut views = vec![MemberView {
            node_id: me.node_id,
            raft: SocketAddr::from(([0, 0, 0, 0], 0)),
            http: Some(me.http.clone()),
            binary: Some(me.binary.clone()),
            connected: true,
            last_heard_ms: sundial_dispatch::now_ms(),
        }];
        views.extend(peers.iter().map(|(id, peer)| MemberView {
            node_id: *id,
            raft: peer.raft,
            http: peer.facts.as_ref().map(|f| f.http.clone()),
            binary: peer.facts.as_ref().map(|f| f.binary.clone()),
            connected: peer.queue.is_some(),
            last_heard_ms: peer.last_heard_ms,
        }));
        views
    }

    /// Sends a request to `to` and waits for its answer (at most `FORWARD_TIMEOUT`).
    pub async fn forward(&self, to: NodeId, request: &[u8]) -> Result<Vec<u8>, String> {
        let id = self.shared.next_forward.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut forwards = self.shared.forwards.lock().unwrap_or_else(|p| p.into_inner());
            if forwards.len() >= FORWARDS_PENDING_MAX {
                forwards.retain(|_, waiting| !waiting.is_closed());
                if forwards.len() >= FORWARDS_PENDING_MAX {
                    return Err("too many forwarded requests in flight".into());
                }
            }
            forwards.insert(id, reply);
        }
        let mut message = Vec::with_capacity(9 + request.len());
        message.push(TAG_REQUEST);
        message.extend_from_slice(&id.to_le_bytes());
        message.extend_from_slice(request);
        if !self.shared.enqueue(to, message) {
            self.shared.forwards.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(format!("node {to} is not connected"));
        }
        let outcome = tokio::time::timeout(FORWARD_TIMEOUT, answer).await;
        self.shared.forwards.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        match outcome {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(_)) => Err(format!("node {to} went away")),
            Err(_) => Err(format!("node {to} did not answer within {FORWARD_TIMEOUT:?}")),
        }
    }
}

impl Shared {
    /// Queues a message for `to`; false when it is not connected or its queue is full.
    fn enqueue(&self, to: NodeId, message: Vec<u8>) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match peers.get(&to).and_then(|peer| peer.queue.as_ref()) {
            Some(queue) => queue.try_send(message).is_ok(),
            None => false,
        }
    }

    fn hello(&self) -> Vec<u8> {
        let mut message = vec![TAG_HELLO];
        message.extend(serde_json::to_vec(&self.me).unwrap_or_default());
        message
    }

    /// Takes a connection to a member: its messages are read until it fails, ours sent over
    /// it meanwhile. Returns when it fails.
    async fn run_link(self: &Arc<Shared>, peer: NodeId, connection: Connection) {
        let (queue, queued) = mpsc::channel::<Vec<u8>>(PEER_QUEUE_MAX);
        let link = self.next_link.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let entry = peers.entry(peer).or_insert_with(|| Peer {
                raft: connection.remote_address(),
                facts: None,
                queue: None,
                link: 0,
                last_heard_ms: 0,
            });
            entry.queue = Some(queue);
            entry.link = link;
        }
        tracing::info!(peer, remote = %connection.remote_address(), "linked to a cluster member");
        let writer = tokio::spawn(write_link(connection.clone(), queued));
        // Each message is read on its own task, at most `READS_MAX` at once per link, and
        // handed on in the order the peer opened their streams: Raft expects a peer's
        // messages in the order they were sent, and appends that overtake one another are
        // refused and sent again (measured: nine entries in ten re-sent under load).
        let reads = Arc::new(tokio::sync::Semaphore::new(READS_MAX));
        let mut previous: Option<oneshot::Receiver<()>> = None;
        // Bounded by the connection: `accept_message` fails once it closes.
        while let Ok(incoming) = connection.accept_message().await {
            // Heard from as soon as a message starts, not once it is handed on: one waiting
            // behind a large message still says the peer is alive.
            self.contact.note(peer, std::time::Instant::now());
            let Ok(permit) = reads.clone().acquire_owned().await else { break };
            let (shared, connection) = (self.clone(), connection.clone());
            let (handed_on, this_handed_on) = oneshot::channel();
            let before = previous.replace(this_handed_on);
            tokio::spawn(async move {
                let message = incoming.read().await;
                if let Some(before) = before {
                    // Ok or not (its task ended), the one before is out of the way.
                    let _ = before.await;
                }
                if let Ok(message) = message {
                    shared.receive(peer, &connection, message).await;
                }
                let _ = handed_on.send(());
                drop(permit);
            });
        }
        writer.abort();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = peers.get_mut(&peer).filter(|entry| entry.link == link) {
            entry.queue = None;
        }
        tracing::warn!(peer, "lost the link to a cluster member");
    }

    /// Records what `peer` said in its hello: on its entry if it is a member, else kept until
    /// it becomes one.
    fn note_facts(&self, peer: NodeId, facts: MemberFacts) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match peers.get_mut(&peer) {
            Some(entry) => entry.facts = Some(facts),
            None => {
                drop(peers);
                let mut early = self.early_facts.lock().unwrap_or_else(|p| p.into_inner());
                if early.len() < EARLY_FACTS_MAX || early.contains_key(&peer) {
                    early.insert(peer, facts);
                }
                return;
            }
        }
        drop(peers);
        self.refresh_command_format();
    }

    /// The newest command format every known member reads (a member that has not said
    /// counts as 0): an older member added later brings it down before it is sent any.
    fn refresh_command_format(&self) {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let peers_read = peers.values().map(|peer| peer.facts.as_ref().map_or(0, |facts| facts.command_format));
        let format = peers_read.fold(self.me.command_format, u8::min);
        drop(peers);
        self.command_format.store(format, Ordering::Relaxed);
    }

    async fn receive(self: &Arc<Shared>, peer: NodeId, connection: &Connection, message: Vec<u8>) {
        let Some((&tag, body)) = message.split_first() else { return };
        if let Some(entry) = self.peers.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&peer) {
            entry.last_heard_ms = sundial_dispatch::now_ms();
        }
        match tag {
            TAG_HELLO => {
                if let Ok(facts) = serde_json::from_slice::<MemberFacts>(body) {
                    self.note_facts(peer, facts);
                }
            }
            TAG_RAFT => match wire::decode_batch(body) {
                Ok(batch) => self.deliver(batch),
                Err(error) => tracing::warn!(peer, %error, "a Raft batch from a member did not decode"),
            },
            TAG_REQUEST if body.len() >= 8 => {
                let id = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                let (reply, answer) = oneshot::channel();
                if self.serve.try_send((body[8..].to_vec(), reply)).is_err() {
                    return; // the caller times out and answers 503
                }
                let connection = connection.clone();
                tokio::spawn(async move {
                    if let Ok(bytes) = answer.await {
                        let mut message = Vec::with_capacity(9 + bytes.len());
                        message.push(TAG_ANSWER);
                        message.extend_from_slice(&id.to_le_bytes());
                        message.extend_from_slice(&bytes);
                        let _ = connection.send(message).await;
                    }
                });
            }
            TAG_ANSWER if body.len() >= 8 => {
                let id = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                let waiting = self.forwards.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if let Some(waiting) = waiting {
                    let _ = waiting.send(body[8..].to_vec());
                }
            }
            _ => tracing::warn!(peer, tag, "an unknown message from a member"),
        }
    }

    /// Hands each partition's messages to the shard that owns it (dropped when its inbox is
    /// full: Raft resends).
    fn deliver(&self, batch: Vec<(u32, Message)>) {
        let shards = self.shards.len();
        let mut by_shard: Vec<Vec<(u32, Message)>> = vec![Vec::new(); shards];
        for (partition, message) in batch {
            // The meta group lives on shard 0.
            let shard = if partition == crate::cluster::members::META_GROUP { 0 } else { partition as usize % shards };
            by_shard[shard].push((partition, message));
        }
        for (shard, messages) in by_shard.into_iter().enumerate() {
            if !messages.is_empty() {
                let _ = self.shards[shard].try_send(messages);
            }
        }
    }
}

/// Sends a link's queued messages in order until the queue ends or the link fails.
async fn write_link(sender: Connection, mut queued: mpsc::Receiver<Vec<u8>>) {
    let large = Arc::new(tokio::sync::Semaphore::new(LARGE_SENDS_MAX));
    // Bounded by the queue: it ends when the link is dropped.
    while let Some(message) = queued.recv().await {
        let permit = (message.len() > LARGE_MESSAGE_BYTES).then(|| large.clone().try_acquire_owned().ok()).flatten();
        if let Some(permit) = permit {
            // A large append or snapshot chunk is written beside the rest (QUIC flow
            // control paces it), on a stream opened here, in order: the receiver
            // hands messages on in the order their streams were opened.
            let Ok(stream) = sender.open_message().await else { break };
            tokio::spawn(async move {
                let _ = stream.send(message).await;
                drop(permit);
            });
        } else if sender.send(message).await.is_err() {
            break;
        }
    }
}

/// Keeps the peers in step with the membership: a new member is linked to (dialled when
/// its id is higher), a removed one is dropped.
async fn follow_membership(
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    membership: Arc<crate::cluster::members::Membership>,
) {
    let mut changes = membership.watch();
    // Bounded by the membership: it ends when its sender is gone.
    loop {
        let members = membership.get();
        let mut dial = Vec::new();
        {
            let mut peers = shared.peers.lock().unwrap_or_else(|p| p.into_inner());
            peers.retain(|id, _| members.nodes.contains_key(id));
            for (id, raft) in &members.nodes {
                let Ok(raft) = raft.parse::<SocketAddr>() else {
                    tracing::warn!(member = id, raft, "a member's address does not parse; not linked");
                    continue;
                };
                if *id == shared.node_id || peers.contains_key(id) {
                    continue;
                }
                let facts = shared.early_facts.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
                peers.insert(*id, Peer { raft, facts, queue: None, link: 0, last_heard_ms: 0 });
                if *id > shared.node_id {
                    dial.push((*id, raft));
                }
            }
        }
        shared.refresh_command_format();
        for (peer, addr) in dial {
            tokio::spawn(dial_loop(shared.clone(), endpoint.clone(), peer, addr));
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Dials a member (with a higher id) and keeps the link up, backing off between tries,
/// until it is no longer a member.
async fn dial_loop(shared: Arc<Shared>, endpoint: Arc<Endpoint>, peer: NodeId, addr: SocketAddr) {
    let mut backoff = REDIAL_MIN;
    // Bounded by the membership: it ends once the peer was removed.
    loop {
        if !shared.peers.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&peer) {
            return;
        }
        match endpoint.connect(addr).await {
            Ok(connection) => {
                backoff = REDIAL_MIN;
                if connection.send(shared.hello()).await.is_ok() {
                    shared.run_link(peer, connection).await;
                }
            }
            Err(error) => tracing::debug!(peer, %addr, %error, "cannot reach a cluster member yet"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(REDIAL_MAX);
    }
}

/// Takes links from members with lower ids: the first message names the member.
async fn accept_loop(shared: Arc<Shared>, endpoint: Arc<Endpoint>) {
    // Bounded by the endpoint: `accept` ends when it closes.
    while let Some(connection) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(first) = tokio::time::timeout(Duration::from_secs(5), connection.receive()).await else { return };
            let Ok(first) = first else { return };
            let facts = match first.split_first() {
                Some((&TAG_HELLO, body)) => serde_json::from_slice::<MemberFacts>(body).ok(),
                _ => None,
            };
            let Some(facts) = facts.filter(|f| f.node_id != shared.node_id) else {
                tracing::warn!(remote = %connection.remote_address(), "a member did not introduce itself; closed");
                connection.close();
                return;
            };
            let peer = facts.node_id;
            // A node that is not (yet) a member may link: it is how a joining node hears its
            // partitions' leaders before its own membership view has caught up.
            shared.note_facts(peer, facts);
            if connection.send(shared.hello()).await.is_ok() {
                shared.run_link(peer, connection).await;
            }
        });
    }
}

/// Sends the shards' Raft messages: everything waiting is gathered and each peer gets one
/// batch (the heartbeats of all partitions travel together).
async fn send_loop(shared: Arc<Shared>, mut outbox: mpsc::Receiver<Vec<(u32, Message)>>) {
    // Bounded by the shards: it ends when every sender is gone.
    while let Some(first) = outbox.recv().await {
        let mut by_peer: BTreeMap<NodeId, Vec<(u32, Message)>> = BTreeMap::new();
        let mut add = |batch: Vec<(u32, Message)>| {
            for (partition, message) in batch {
                by_peer.entry(message.to).or_default().push((partition, message));
            }
        };
        add(first);
        for _ in 0..OUTBOX_CAPACITY {
            match outbox.try_recv() {
                Ok(batch) => add(batch),
                Err(_) => break,
            }
        }
        for (peer, batch) in by_peer {
            // Split so no message nears the transport's limit (appends of many partitions).
            let mut part: Vec<(u32, Message)> = Vec::new();
            let mut part_bytes = 0usize;
            for item in batch {
                let bytes = message_bytes(&item.1);
                if !part.is_empty() && part_bytes + bytes > BATCH_BYTES_MAX {
                    shared.enqueue(peer, raft_message(&part));
                    part.clear();
                    part_bytes = 0;
                }
                part_bytes += bytes;
                part.push(item);
            }
            if !part.is_empty() {
                shared.enqueue(peer, raft_message(&part));
            }
        }
    }
}

/// Bytes of Raft messages per transport message at most (the transport allows 16 MiB; a
/// snapshot chunk or an append of 1 MiB fits whole).
const BATCH_BYTES_MAX: usize = 4 << 20;

/// The tag and the batch, encoded once into a buffer sized for them (the transport then
/// takes the buffer as it is).
fn raft_message(batch: &[(u32, Message)]) -> Vec<u8> {
    let mut message = Vec::with_capacity(1 + wire::batch_bytes_max(batch));
    message.push(TAG_RAFT);
    wire::encode_batch_into(batch, &mut message);
    message
}

/// About how many bytes a Raft message takes on the wire.
fn message_bytes(message: &Message) -> usize {
    use sundial_consensus::MessageKind;
    64 + match &message.kind {
        MessageKind::Append { entries, .. } => entries.iter().map(|e| e.size_bytes()).sum(),
        MessageKind::Snapshot { chunk, meta, .. } => {
            chunk.len() + 8 * (meta.conf.voters.len() + meta.conf.learners.len())
        }
        _ => 0,
    }
}
