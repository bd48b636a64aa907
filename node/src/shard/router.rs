//! The router: what both APIs call. It validates requests where they arrive (so bad input
//! never crosses to a shard), sends each to the shard owning the job's partition over that
//! shard's bounded inbox, fans queries out to every shard and merges their answers.
//! In a cluster, work for a partition this node does not lead is forwarded over the mesh
//! to the node that does (at most `FORWARD_HOPS_MAX` hops), and queries fan out to every
//! member.

use crate::cluster::meta::{partition_of, ClusterMeta};
use crate::obs::metrics::Metrics;
use crate::obs::telemetry::SpanSink;
use crate::shard::admission::Admission;
use crate::shard::ops::{
    answer, field_error, raw_json, retry_later, Answer, CreateMode, JobOp, Refusal, Representation,
};
use crate::shard::{LiveJobs, Scan, Work};
use futures_util::future::join_all as futures_join_all;
use serde_json::{json, Value};
use std::sync::Arc;
use sundial_dispatch::now_ms;
use sundial_engine::job::{new_job_id, JobSpec};
use sundial_engine::request::{parse_job_request_in, RequestContext};
use sundial_engine::state::Status;
use sundial_engine::trace::{SpanRecord, TraceContext};
use tokio::sync::{mpsc, oneshot};

/// Jobs listed per `GET /jobs` at most (`?limit=` within it).
pub const LIST_LIMIT_MAX: usize = 1_000;
/// Jobs created per batch request at most (HTTP `POST /jobs/batch`, a protocol batch).
pub const BATCH_MAX: usize = 1_000;

/// Limits the router enforces before anything reaches a log.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Live jobs (pending or running) the node holds before creates are refused with 507.
    pub max_jobs: usize,
    /// Resident memory (bytes) beyond which creates are refused with 507; 0: no limit.
    pub max_memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_jobs: 1_000_000, max_memory_bytes: 0 }
    }
}

/// What the node is, for /health and /debug/cluster.
#[derive(Clone, Debug)]
pub struct NodeFacts {
    pub node_id: u64,
    pub meta: ClusterMeta,
    pub shards: usize,
    pub runtime: &'static str,
    pub log_backend: &'static str,
    pub http: String,
    pub binary: String,
    pub started_ms: u64,
}

/// Values given to jobs whose request leaves them out (node settings).
#[derive(Clone, Copy, Debug)]
pub struct JobDefaults {
    pub attempt_timeout_ms: u64,
}

impl Default for JobDefaults {
    fn default() -> JobDefaults {
        JobDefaults { attempt_timeout_ms: sundial_engine::job::ATTEMPT_TIMEOUT_MS_DEFAULT }
    }
}

/// One create request as it arrived: its JSON text (read in place by the parser, never
/// built into a tree) and, for `PUT /jobs/{id}`, the id its path gives.
#[derive(Clone, Copy, Debug)]
pub struct CreateRequest<'a> {
    pub text: &'a str,
    pub path_id: Option<&'a str>,
}

impl<'a> CreateRequest<'a> {
    pub fn new(text: &'a str) -> CreateRequest<'a> {
        CreateRequest { text, path_id: None }
    }
}

pub struct Router {
    shards: Vec<mpsc::Sender<Work>>,
    partitions: u32,
    limits: Limits,
    defaults: JobDefaults,
    live: Arc<LiveJobs>,
    pub metrics: Arc<Metrics>,
    pub facts: NodeFacts,
    /// Where request spans go (OTLP configured), else `None`.
    pub spans: Option<SpanSink>,
    /// The node's dispatcher, for its per-host gauges.
    pub dispatcher: Option<sundial_dispatch::SharedDispatcher>,
    /// Serializes the counter updates of concurrent /metrics scrapes (not on the hot path).
    scrape_lock: std::sync::Mutex<()>,
    /// Set when the node is a member of a cluster of several.
    pub cluster: Option<RouterCluster>,
    /// Clients' creates in flight, and how many may be.
    pub admission: Admission,
}

/// How the router reaches the rest of the cluster.
pub struct RouterCluster {
    pub mesh: crate::cluster::mesh::Mesh,
    pub membership: Arc<crate::cluster::members::Membership>,
    pub replication: usize,
}

/// Pauses before trying again items refused for want of a leader (1.5 s in all).
const NO_LEADER_RETRIES_MS: [u64; 5] = [50, 100, 200, 400, 750];

/// Times a request may be forwarded on (a leader that moved meanwhile sends it once more).
const FORWARD_HOPS_MAX: u8 = 2;

/// Work for one partition, as it is forwarded to the node leading it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum PartitionWork {
    Create {
        specs: Vec<JobSpec>,
        now_ms: u64,
        #[serde(default)]
        mode: CreateMode,
        #[serde(default)]
        representation: Representation,
    },
    /// `stale`: a read may be answered from the local replica without confirming it is
    /// current (no round trip to the leader).
    Jobs {
        ids: Vec<String>,
        op: JobOp,
        #[serde(default)]
        stale: bool,
    },
}

impl PartitionWork {
    fn len(&self) -> usize {
        match self {
            PartitionWork::Create { specs, .. } => specs.len(),
            PartitionWork::Jobs { ids, .. } => ids.len(),
        }
    }

    /// The items at `positions`, as work of their own.
    fn select(&self, positions: &[usize]) -> PartitionWork {
        match self {
            PartitionWork::Create { specs, now_ms, mode, representation } => PartitionWork::Create {
                specs: positions.iter().map(|i| specs[*i].clone()).collect(),
                now_ms: *now_ms,
                mode: *mode,
                representation: *representation,
            },
            PartitionWork::Jobs { ids, op, stale } => {
                PartitionWork::Jobs { ids: positions.iter().map(|i| ids[*i].clone()).collect(), op: *op, stale: *stale }
            }
        }
    }
}

/// A request between members.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Forwarded {
    Work { partition: u32, work: PartitionWork, hops: u8 },
    Scan { scan: Scan },
    Members { command: crate::cluster::members::MembersCommand, hops: u8 },
}

/// The format of requests and answers between members: a version byte, then JSON. A member
/// says in its hello which it reads (`MemberFacts::forward_version`); one that says nothing
/// is from before the byte and gets plain JSON (version 0), so a rolling upgrade keeps
/// forwarding. A version this node does not speak is refused, never misread.
pub const FORWARD_VERSION: u8 = 1;

/// Encodes in `version` (0: plain JSON, for members from before the version byte).
fn encode_forwarded_as(value: &impl serde::Serialize, version: u8) -> Vec<u8> {
    let mut bytes = if version == 0 { Vec::new() } else { vec![FORWARD_VERSION] };
    // Never fails: the forwarded types are plain data (no maps with non-string keys).
    serde_json::to_writer(&mut bytes, value).expect("forwarded values serialize");
    bytes
}

fn encode_forwarded(value: &impl serde::Serialize) -> Vec<u8> {
    encode_forwarded_as(value, FORWARD_VERSION)
}

/// Decodes either format; returns the value and the version it came in.
fn decode_forwarded_versioned<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(T, u8), String> {
    let unreadable = |e: serde_json::Error| format!("unreadable: {e}");
    match bytes.split_first() {
        Some((&FORWARD_VERSION, body)) => Ok((serde_json::from_slice(body).map_err(unreadable)?, FORWARD_VERSION)),
        // Plain JSON (an object or a list) from a member before the version byte.
        Some((b'{' | b'[', _)) => Ok((serde_json::from_slice(bytes).map_err(unreadable)?, 0)),
        Some((version, _)) => Err(format!("format version {version}; this node speaks {FORWARD_VERSION}")),
        None => Err("an empty message".to_string()),
    }
}

fn decode_forwarded<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    decode_forwarded_versioned(bytes).map(|(value, _)| value)
}

fn busy() -> Answer {
    Refusal::Overloaded.answer("the node is busy; retry shortly")
}

fn stopping() -> Answer {
    Refusal::Stopping.answer("the node is stopping")
}

/// Why a shard's inbox refused work: full (busy) or closed (stopping).
fn refusal<T>(error: mpsc::error::TrySendError<T>) -> Answer {
    match error {
        mpsc::error::TrySendError::Full(_) => busy(),
        mpsc::error::TrySendError::Closed(_) => stopping(),
    }
}

impl Router {
    pub fn new(
        shards: Vec<mpsc::Sender<Work>>,
        limits: Limits,
        defaults: JobDefaults,
        live: Arc<LiveJobs>,
        metrics: Arc<Metrics>,
        facts: NodeFacts,
    ) -> Router {
        let partitions = facts.meta.partitions;
        Router {
            shards,
            partitions,
            limits,
            defaults,
            live,
            metrics,
            facts,
            spans: None,
            dispatcher: None,
            scrape_lock: std::sync::Mutex::new(()),
            cluster: None,
            admission: Admission::default(),
        }
    }

    /// Runs work on a partition: on this node's shard when it holds a replica, and on the
    /// leader (forwarded) for the items the local replica does not lead. Answers in order.
    pub async fn partition_work(&self, partition: u32, work: PartitionWork, hops: u8) -> Vec<Answer> {
        if self.cluster.is_none() && matches!(work, PartitionWork::Create { .. }) {
            // A single node's partitions elected themselves when they opened (a group of one
            // never steps down), so a create is never forwarded or retried for want of a
            // leader: it goes to the shard as it is, not copied. (A linearizable read not
            // confirmed in time is retried below, even here.)
            return self.shard_work(partition, work).await;
        }
        let mut answers = self.partition_work_once(partition, &work, hops).await;
        if hops > 0 {
            return answers; // the member the request arrived at does the waiting
        }
        // An election or a leadership transfer lasts well under a second: items refused
        // for want of a leader (nothing was proposed) are tried again before answering.
        for backoff_ms in NO_LEADER_RETRIES_MS {
            let waiting: Vec<usize> =
                answers.iter().enumerate().filter(|(_, a)| a.wants_leader()).map(|(position, _)| position).collect();
            if waiting.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(backoff_ms)).await;
            let again = self.partition_work_once(partition, &work.select(&waiting), hops).await;
            for (position, answer) in waiting.into_iter().zip(again) {
                answers[position] = answer;
            }
        }
        answers
    }

    /// `work` once: on the local shard, or forwarded to the leader the shard names. The work
    /// is borrowed and copied once for the shard: what was not done stays here to be retried
    /// or forwarded.
    async fn partition_work_once(&self, partition: u32, work: &PartitionWork, hops: u8) -> Vec<Answer> {
        let count = work.len();
        let me = self.facts.node_id;
        let local = match &self.cluster {
            Some(cluster) => {
                let replicas =
                    crate::cluster::meta::replicas_of(partition, &cluster.membership.ids(), cluster.replication);
                if replicas.contains(&me) {
                    None
                } else {
                    // Not held here: its preferred leader knows (or forwards once more).
                    Some(vec![crate::shard::ops::not_leader(partition, replicas.first().copied()); count])
                }
            }
            None => None,
        };
        let mut answers = match local {
            Some(answers) => answers,
            None => self.shard_work(partition, work.clone()).await,
        };
        let Some(cluster) = &self.cluster else { return answers };
        let mut by_leader: std::collections::BTreeMap<u64, Vec<usize>> = Default::default();
        for (position, answer) in answers.iter().enumerate() {
            if let Some(leader) = answer.leader_named().filter(|l| *l != me) {
                by_leader.entry(leader).or_default().push(position);
            }
        }
        for (leader, positions) in by_leader {
            self.metrics.forwarded.inc_by(positions.len() as u64);
            let forwarded = if hops < FORWARD_HOPS_MAX {
                let request = Forwarded::Work { partition, work: work.select(&positions), hops: hops + 1 };
                let bytes = encode_forwarded_as(&request, cluster.mesh.forward_version_of(leader));
                cluster.mesh.forward(leader, &bytes).await.and_then(|reply| {
                    decode_forwarded::<Vec<Answer>>(&reply).map_err(|e| format!("an answer from node {leader}: {e}"))
                })
            } else {
                Err("the partition's leader moved while the request was forwarded".to_string())
            };
            match forwarded {
                Ok(remote) if remote.len() == positions.len() => {
                    for (position, answer) in positions.into_iter().zip(remote) {
                        answers[position] = answer;
                    }
                }
                Ok(_) => {
                    for position in positions {
                        answers[position] =
                            retry_later(503, "unavailable", format!("node {leader} answered another count"), 1);
                    }
                }
                Err(reason) => {
                    tracing::debug!(partition, leader, %reason, "forwarding failed");
                    for position in positions {
                        answers[position] =
                            retry_later(503, "unavailable", format!("partition {partition}: {reason}"), 1);
                    }
                }
            }
        }
        answers
    }

    /// Adds or removes a member: proposed to the meta group on its leader (forwarded there),
    /// answered once applied with the membership.
    pub async fn change_members(&self, command: crate::cluster::members::MembersCommand, hops: u8) -> Answer {
        let Some(cluster) = &self.cluster else {
            return crate::shard::ops::error(
                409,
                "not_a_cluster",
                "this node runs alone (no --peers): there are no members to change",
            );
        };
        let (reply, answer) = oneshot::channel();
        let local = match self.shards[0].try_send(Work::Members { command: command.clone(), reply }) {
            Ok(()) => answer.await.unwrap_or_else(|_| stopping()),
            Err(error) => return refusal(error),
        };
        let Some(leader) = local.leader_named().filter(|l| *l != self.facts.node_id) else {
            return local;
        };
        if hops >= FORWARD_HOPS_MAX {
            return retry_later(503, "unavailable", "the meta group's leader moved; retry", 1);
        }
        let request = encode_forwarded_as(
            &Forwarded::Members { command, hops: hops + 1 },
            cluster.mesh.forward_version_of(leader),
        );
        match cluster.mesh.forward(leader, &request).await {
            Ok(reply) => decode_forwarded(&reply)
                .unwrap_or_else(|e| retry_later(503, "unavailable", format!("an answer from node {leader}: {e}"), 1)),
            Err(reason) => retry_later(503, "unavailable", reason, 1),
        }
    }

    /// The map a client routes by: partitions, members' binary addresses, each partition's
    /// leader as this node's replicas see it (`null` where it holds none or none is known).
    pub async fn topology(&self) -> Answer {
        let rafts = match self.local_scan(Scan::Raft).await {
            Ok(rafts) => rafts,
            Err(refused) => return refused,
        };
        let mut leaders = vec![Value::Null; self.partitions as usize];
        for raft in &rafts {
            if let Some(slot) = raft["partition"].as_u64().and_then(|p| leaders.get_mut(p as usize)) {
                *slot = raft["leader"].clone();
            }
        }
        let members: Vec<Value> = match &self.cluster {
            Some(cluster) => {
                cluster.mesh.members().into_iter().map(|m| json!({"node_id": m.node_id, "binary": m.binary})).collect()
            }
            None => vec![json!({"node_id": self.facts.node_id, "binary": self.facts.binary})],
        };
        answer(200, json!({"partitions": self.partitions, "members": members, "leaders": leaders}))
    }

    /// The membership as this node last applied it.
    pub fn members(&self) -> Answer {
        match &self.cluster {
            Some(cluster) => {
                let members = cluster.membership.get();
                let nodes: Vec<Value> =
                    members.nodes.iter().map(|(id, raft)| json!({"node_id": id, "raft": raft})).collect();
                answer(200, json!({"members": nodes}))
            }
            None => answer(200, json!({"members": [{"node_id": self.facts.node_id}]})),
        }
    }

    /// Work for a partition on the local shard that owns it.
    async fn shard_work(&self, partition: u32, work: PartitionWork) -> Vec<Answer> {
        let count = work.len();
        let (reply, answer) = oneshot::channel();
        let item = match work {
            PartitionWork::Create { specs, now_ms, mode, representation } => {
                Work::Create { partition, specs, now_ms, mode, representation, reply }
            }
            PartitionWork::Jobs { ids, op, stale } => Work::Jobs { partition, ids, op, stale, reply },
        };
        match self.shard_of(partition).try_send(item) {
            Ok(()) => answer.await.unwrap_or_else(|_| vec![stopping(); count]),
            Err(error) => vec![refusal(error); count],
        }
    }

    /// Serves a request another member forwarded (`encode_forwarded`); the answer goes back
    /// in the same format. A request this node cannot read gets no answers (the sender
    /// answers its client 503).
    pub async fn serve_forwarded(&self, request: &[u8]) -> Vec<u8> {
        let (request, version) = match decode_forwarded_versioned::<Forwarded>(request) {
            Ok(decoded) => decoded,
            Err(reason) => {
                tracing::warn!(%reason, "a forwarded request could not be read");
                return encode_forwarded(&Vec::<Answer>::new());
            }
        };
        // Answered in the format it came in: a member from before the version byte reads JSON.
        match request {
            Forwarded::Work { partition, work, hops } if partition < self.partitions => {
                encode_forwarded_as(&self.partition_work(partition, work, hops).await, version)
            }
            Forwarded::Scan { scan } => encode_forwarded_as(&self.local_scan(scan).await.unwrap_or_default(), version),
            Forwarded::Members { command, hops } => {
                encode_forwarded_as(&self.change_members(command, hops).await, version)
            }
            Forwarded::Work { partition, .. } => {
                tracing::warn!(partition, "a member forwarded work for a partition this cluster does not have");
                encode_forwarded_as(&Vec::<Answer>::new(), version)
            }
        }
    }

    fn shard_of(&self, partition: u32) -> &mpsc::Sender<Work> {
        &self.shards[partition as usize % self.shards.len()]
    }

    /// 128 random bits for a generated job id or a new trace: from the thread's CSPRNG
    /// (ChaCha, seeded from the operating system), so no id tells the next. (A counter
    /// mixed by splitmix64 did, from a single id.) Never blocks, and costs nanoseconds.
    fn next_random(&self) -> u128 {
        rand::random()
    }

    /// Validates one create request and decides its partition: a job that depends on
    /// others lives with them (its generated id is chosen to hash there).
    fn prepare(&self, request: &CreateRequest, now: u64, trace: &TraceContext) -> Result<(u32, JobSpec), Answer> {
        let generated = new_job_id(now, self.next_random());
        let context = RequestContext {
            now_ms: now,
            generated_id: request.path_id.unwrap_or(&generated),
            attempt_timeout_ms: self.defaults.attempt_timeout_ms,
        };
        let mut spec = parse_job_request_in(request.text, &context).map_err(|problems| {
            let first = problems.first().map(|p| p.field.clone()).unwrap_or_default();
            let message = problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ");
            let problems: Vec<Value> = problems.iter().map(|p| json!({"field": p.field, "rule": p.rule})).collect();
            answer(400, json!({"error": message, "code": "invalid", "field": first, "problems": problems}))
        })?;
        spec.trace = Some(trace.clone());
        // A job lives with its flow key (whose limits its partition's leader enforces), or
        // with its dependencies.
        let flow_home = spec.flow.as_ref().map(|flow| partition_of(&flow.key, self.partitions));
        let Some(home) =
            flow_home.or_else(|| spec.depends_on.first().map(|first| partition_of(first, self.partitions)))
        else {
            return Ok((partition_of(&spec.id, self.partitions), spec));
        };
        if spec.depends_on.iter().any(|id| partition_of(id, self.partitions) != home) {
            return Err(field_error(
                "depends_on",
                "depends_on: the jobs must share a partition (and a flow key's), as their ids do when left out (create each with depends_on, or give them ids that hash to one partition)",
            ));
        }
        if partition_of(&spec.id, self.partitions) != home {
            if spec.id != generated {
                let message = format!(
                    "id: a job with flow.key or depends_on lives in that key's or those jobs' partition ({home} of {}), and this id hashes to another; omit id to have one chosen",
                    self.partitions
                );
                return Err(field_error("id", message));
            }
            // Expected `partitions` tries; the bound makes a miss impossible in practice.
            let tries_max = 64 * self.partitions.max(1);
            let found = (0..tries_max)
                .map(|_| new_job_id(now, self.next_random()))
                .find(|id| partition_of(id, self.partitions) == home);
            match found {
                Some(id) => spec.id = id,
                None => return Err(retry_later(503, "unavailable", "no id found for the job's partition", 1)),
            }
        }
        Ok((home, spec))
    }

    /// Creates jobs (one per request, in order): each validated on its own; the admitted
    /// ones of a partition go to its log together. As `mode` says, each job is created, or
    /// created or its spec replaced (an upsert); each answer carries the whole job or its id
    /// (`representation`). `parent` is the caller's trace context (an HTTP `traceparent`);
    /// the jobs belong to this request's span in its trace, or in a new one.
    pub async fn create(
        &self,
        requests: Vec<Result<CreateRequest<'_>, Answer>>,
        parent: Option<TraceContext>,
        mode: CreateMode,
        representation: Representation,
    ) -> Vec<Answer> {
        let count = requests.len();
        let Some(admitted) = self.admission.admit(count as u64, std::time::Instant::now()) else {
            self.metrics.rejected_many("overloaded", count as u64);
            return vec![self.overloaded(); count];
        };
        // Past the room left, the request's last jobs are refused, each on its own (and
        // counted with the other refusals below).
        let admitted_count = usize::try_from(admitted.jobs()).unwrap_or(usize::MAX);
        let refused = (admitted_count < count).then(|| self.overloaded());
        let now = now_ms();
        let random = self.next_random();
        let trace = match &parent {
            Some(parent) => {
                TraceContext { trace_id: parent.trace_id.clone(), span_id: format!("{:016x}", (random as u64).max(1)) }
            }
            None => TraceContext::new(random, (random >> 64) as u64 ^ 0x5bd1_e995),
        };
        let mut answers: Vec<Option<Answer>> = Vec::with_capacity(requests.len());
        let mut by_partition: std::collections::BTreeMap<u32, (Vec<usize>, Vec<JobSpec>)> = Default::default();
        for (position, request) in requests.into_iter().enumerate() {
            if let Some(refused) = refused.as_ref().filter(|_| position >= admitted_count) {
                answers.push(Some(refused.clone()));
                continue;
            }
            let prepared = request.and_then(|request| self.prepare(&request, now, &trace));
            match prepared {
                Ok((partition, spec)) => {
                    let (slots, specs) = by_partition.entry(partition).or_default();
                    slots.push(answers.len());
                    specs.push(spec);
                    answers.push(None);
                }
                Err(refused) => answers.push(Some(refused)),
            }
        }
        let groups = by_partition.into_iter().map(|(partition, (slots, specs))| async move {
            (
                slots,
                self.partition_work(partition, PartitionWork::Create { specs, now_ms: now, mode, representation }, 0)
                    .await,
            )
        });
        for (slots, group_answers) in futures_join_all(groups).await {
            for (slot, answer) in slots.into_iter().zip(group_answers) {
                answers[slot] = Some(answer);
            }
        }
        let answers: Vec<Answer> = answers.into_iter().map(|a| a.expect("every request answered")).collect();
        self.account_creates(&answers, &trace, parent, now);
        answers
    }

    /// Counts a create request's refusals by code, and sends its span (OTLP configured).
    fn account_creates(&self, answers: &[Answer], trace: &TraceContext, parent: Option<TraceContext>, start_ms: u64) {
        for refused in answers.iter().filter(|a| a.status >= 400) {
            let body = refused.body_value();
            let code = body.as_ref().and_then(|b| b["code"].as_str()).unwrap_or("other");
            self.metrics.rejected(code);
        }
        if let Some(spans) = &self.spans {
            let (count, created) = (answers.len(), answers.iter().filter(|a| a.status == 201).count());
            spans.send([SpanRecord {
                name: "request",
                trace_id: trace.trace_id.clone(),
                span_id: trace.span_id.clone(),
                parent_span_id: parent.map(|p| p.span_id),
                start_ms,
                end_ms: now_ms(),
                attributes: vec![("sundial.jobs", count.to_string()), ("sundial.created", created.to_string())],
                failed: created < count,
            }]);
        }
    }

    /// The answer to a create refused at the door: the jobs in flight are at the admission
    /// limit.
    fn overloaded(&self) -> Answer {
        let (limit, in_flight) = self.admission.levels();
        let message = format!(
            "this node has {in_flight} jobs in flight, its limit now ({limit}, lowered while answers take over {} ms); retry shortly",
            crate::shard::admission::SLOW_MS
        );
        Refusal::Overloaded.answer(message)
    }

    /// One operation on the job `id`, on the shard owning its partition.
    pub async fn job(&self, id: &str, op: JobOp) -> Answer {
        self.job_many(&[id.to_string()], op).await.pop().expect("one answer per id")
    }

    /// One operation on each of several jobs: grouped by partition, each group sent to its
    /// shard as one piece of work (one log write for commands), then awaited. Answers in
    /// the order of `ids`.
    pub async fn job_many(&self, ids: &[String], op: JobOp) -> Vec<Answer> {
        self.job_many_read(ids, op, false).await
    }

    /// `job_many`; with `stale`, reads are served by a local replica as it stands (HTTP
    /// `?stale=true`, the protocol's stale-ok flag) instead of linearizably.
    pub async fn job_many_read(&self, ids: &[String], op: JobOp, stale: bool) -> Vec<Answer> {
        let mut by_partition: std::collections::BTreeMap<u32, (Vec<usize>, Vec<String>)> = Default::default();
        for (position, id) in ids.iter().enumerate() {
            let (positions, group) = by_partition.entry(partition_of(id, self.partitions)).or_default();
            positions.push(position);
            group.push(id.clone());
        }
        let groups = by_partition.into_iter().map(|(partition, (positions, group))| async move {
            (positions, self.partition_work(partition, PartitionWork::Jobs { ids: group, op, stale }, 0).await)
        });
        let mut answers: Vec<Option<Answer>> = vec![None; ids.len()];
        for (positions, group_answers) in futures_join_all(groups).await {
            for (position, answer) in positions.into_iter().zip(group_answers) {
                if op == JobOp::Cancel && answer.status == 200 {
                    self.metrics.cancelled.inc();
                }
                answers[position] = Some(answer);
            }
        }
        answers.into_iter().map(|a| a.unwrap_or_else(stopping)).collect()
    }

    /// Runs `scan` on every shard of this node and, in a cluster, of every member it
    /// reaches (each partition is counted by the replica leading it; a member that cannot be
    /// reached adds nothing).
    async fn scan(&self, scan: Scan) -> Result<Vec<Value>, Answer> {
        let mut values = self.local_scan(scan.clone()).await?;
        let Some(cluster) = &self.cluster else { return Ok(values) };
        if matches!(scan, Scan::Raft) {
            return Ok(values);
        }
        let request = Forwarded::Scan { scan };
        let members = cluster.membership.ids();
        let others = members.iter().filter(|m| **m != self.facts.node_id).map(|member| {
            let bytes = encode_forwarded_as(&request, cluster.mesh.forward_version_of(*member));
            async move { cluster.mesh.forward(*member, &bytes).await }
        });
        for reply in futures_join_all(others).await.into_iter().flatten() {
            if let Ok(remote) = decode_forwarded::<Vec<Value>>(&reply) {
                values.extend(remote);
            }
        }
        Ok(values)
    }

    /// Runs `scan` on every shard of this node; one value per partition it covers.
    async fn local_scan(&self, scan: Scan) -> Result<Vec<Value>, Answer> {
        let mut waiting = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let (reply, answer) = oneshot::channel();
            shard.try_send(Work::Scan { scan: scan.clone(), reply }).map_err(refusal)?;
            waiting.push(answer);
        }
        let mut values = Vec::new();
        for answer in waiting {
            values.extend(answer.await.map_err(|_| stopping())?);
        }
        Ok(values)
    }

    /// The items of a scan whose per-partition values are lists, gathered into one.
    async fn scan_items(&self, scan: Scan) -> Result<Vec<Value>, Answer> {
        let per_partition = self.scan(scan).await?;
        Ok(per_partition.into_iter().flat_map(|v| if let Value::Array(items) = v { items } else { vec![] }).collect())
    }

    /// `GET /jobs`: the oldest `limit` jobs (of one status), across partitions.
    pub async fn list(&self, status: Option<Status>, limit: usize) -> Answer {
        let mut jobs = match self.scan_items(Scan::Jobs { status, limit }).await {
            Ok(jobs) => jobs,
            Err(refused) => return refused,
        };
        jobs.sort_by(oldest_first);
        jobs.truncate(limit);
        answer(200, json!({"jobs": jobs}))
    }

    /// Ids of up to `limit` jobs carrying every one of `labels`, oldest first, across
    /// partitions (and members), and whether more match.
    pub async fn labelled(&self, labels: Vec<(String, String)>, limit: usize) -> Result<(Vec<String>, bool), Answer> {
        let mut jobs = self.scan_items(Scan::Labelled { labels, limit: limit + 1 }).await?;
        jobs.sort_by(oldest_first);
        let more = jobs.len() > limit;
        let ids = jobs.iter().take(limit).filter_map(|job| job["id"].as_str().map(String::from)).collect();
        Ok((ids, more))
    }

    /// `GET /flow-keys`: every flow key (at most `LIST_LIMIT_MAX`), by name.
    pub async fn flow_keys(&self) -> Answer {
        let mut keys = match self.scan_items(Scan::FlowKeys { limit: LIST_LIMIT_MAX }).await {
            Ok(keys) => keys,
            Err(refused) => return refused,
        };
        keys.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
        keys.truncate(LIST_LIMIT_MAX);
        answer(200, json!({"flow_keys": keys}))
    }

    /// `GET /dlq`: the oldest dead letters across partitions.
    pub async fn dead_letters(&self) -> Answer {
        let mut letters = match self.scan_items(Scan::DeadLetters { limit: LIST_LIMIT_MAX }).await {
            Ok(letters) => letters,
            Err(refused) => return refused,
        };
        letters.sort_by_key(|l| (l["moved_ms"].as_u64(), l["id"].as_str().map(String::from)));
        letters.truncate(LIST_LIMIT_MAX);
        answer(200, json!({"dead_letters": letters}))
    }

    /// `DELETE /dlq`: every partition drops its dead letters.
    pub async fn purge_dead_letters(&self) -> Answer {
        match self.scan(Scan::PurgeDeadLetters).await {
            Ok(values) => match values.iter().find(|v| v["status"].as_u64() != Some(200)) {
                Some(failed) => Answer {
                    status: failed["status"].as_u64().unwrap_or(503) as u16,
                    body: Some(raw_json(&failed["body"])),
                    retry_after_s: Some(5),
                    refusal: None,
                },
                None => answer(200, json!({"done": true})),
            },
            Err(refused) => refused,
        }
    }

    /// `GET /health`: role, runtime, memory, job counts and limits, execution stats. 503
    /// when a partition's log failed.
    pub async fn health(&self) -> Answer {
        let partitions = match self.scan(Scan::Health).await {
            Ok(values) => values,
            Err(refused) => return refused,
        };
        let mut counts = serde_json::Map::new();
        for status in Status::ALL {
            let total: u64 = partitions.iter().map(|p| p["jobs"][status.as_str()].as_u64().unwrap_or(0)).sum();
            counts.insert(status.as_str().to_string(), json!(total));
        }
        let sum = |field: &str| partitions.iter().map(|p| p[field].as_u64().unwrap_or(0)).sum::<u64>();
        let failures: Vec<&Value> = partitions.iter().filter(|p| !p["log_failure"].is_null()).collect();
        let healthy = failures.is_empty();
        let facts = &self.facts;
        answer(
            if healthy { 200 } else { 503 },
            json!({
                "status": if healthy { "ok" } else { "unavailable" },
                "role": if self.cluster.is_some() { "member" } else { "leader" },
                "node_id": facts.node_id,
                "cluster_id": facts.meta.cluster_id,
                "partitions": facts.meta.partitions,
                "shards": facts.shards,
                "runtime": facts.runtime,
                "log_backend": facts.log_backend,
                "uptime_ms": now_ms().saturating_sub(facts.started_ms),
                "memory": {"resident_bytes": crate::obs::resident_memory_bytes(), "limit_bytes": self.limits.max_memory_bytes},
                "jobs": counts,
                "limits": {"max_jobs": self.limits.max_jobs, "live_jobs": self.live.total()},
                "dead_letters": sum("dead_letters"),
                "dispatch": {"queued": sum("queued"), "running": sum("running")},
                "attempts": {"started": sum("attempts_started"), "finished": sum("attempts_finished"), "queue_full_waits": sum("queue_full_waits")},
                "log_failures": failures,
            }),
        )
    }

    /// `GET /debug/cluster`: members, and per partition its shard, role, term and indexes.
    pub async fn cluster(&self) -> Answer {
        let partitions = match self.scan(Scan::Raft).await {
            Ok(values) => values,
            Err(refused) => return refused,
        };
        let mut partitions: Vec<Value> = partitions
            .into_iter()
            .map(|mut p| {
                let shard = p["partition"].as_u64().unwrap_or(0) as usize % self.shards.len();
                p["shard"] = json!(shard);
                p
            })
            .collect();
        partitions.sort_by_key(|p| p["partition"].as_u64());
        let facts = &self.facts;
        let members = match &self.cluster {
            Some(cluster) => cluster
                .mesh
                .members()
                .into_iter()
                .map(|m| {
                    let state = if m.connected { "up" } else { "unreachable" };
                    json!({"node_id": m.node_id, "http": m.http, "binary": m.binary, "raft": m.raft, "connected": m.connected, "state": state, "last_heard_ms": m.last_heard_ms})
                })
                .collect(),
            None => vec![json!({"node_id": facts.node_id, "http": facts.http, "binary": facts.binary, "state": "up", "connected": true, "shards": facts.shards})],
        };
        answer(
            200,
            json!({
                "cluster_id": facts.meta.cluster_id,
                "created_ms": facts.meta.created_ms,
                "partition_count": facts.meta.partitions,
                "node_id": facts.node_id,
                "members": members,
                "partitions": partitions,
            }),
        )
    }

    /// `GET /metrics`: gauges refreshed from the shards, then the text exposition.
    pub async fn metrics_text(&self) -> Result<String, Answer> {
        let partitions = self.scan(Scan::Health).await?;
        let rafts = self.scan(Scan::Raft).await?;
        for status in Status::ALL {
            let total: u64 = partitions.iter().map(|p| p["jobs"][status.as_str()].as_u64().unwrap_or(0)).sum();
            self.metrics.jobs.get_or_create(&vec![("status", status.as_str().to_string())]).set(total as i64);
        }
        for shard in 0..self.shards.len() {
            let depth: u64 = partitions
                .iter()
                .filter(|p| p["partition"].as_u64().unwrap_or(0) as usize % self.shards.len() == shard)
                .map(|p| p["queued"].as_u64().unwrap_or(0) + p["running"].as_u64().unwrap_or(0))
                .sum();
            self.metrics.queue_depth.get_or_create(&vec![("shard", shard.to_string())]).set(depth as i64);
        }
        self.metrics
            .dead_letters
            .set(partitions.iter().map(|p| p["dead_letters"].as_u64().unwrap_or(0)).sum::<u64>() as i64);
        let sum = |field: &str| partitions.iter().map(|p| p[field].as_u64().unwrap_or(0)).sum::<u64>() as i64;
        self.metrics.auto_paused.set(sum("auto_paused"));
        self.metrics.expired.set(sum("expired"));
        self.metrics.dead_letters_evicted.set(sum("dead_letters_evicted"));
        let led: Vec<&Value> = rafts.iter().filter(|p| p["role"] == "leader").collect();
        self.metrics.partitions_led.set(led.len() as i64);
        let (limit, in_flight) = self.admission.levels();
        self.metrics.admission_limit.set(limit as i64);
        self.metrics.admission_in_flight.set(in_flight as i64);
        self.metrics.replication_lag.clear();
        self.metrics.commit_waiting.clear();
        self.metrics.commit_wait.clear();
        for partition in led {
            let label = vec![("partition", partition["partition"].as_u64().unwrap_or(0).to_string())];
            let gauge = |field: &str| partition[field].as_u64().unwrap_or(0) as i64;
            self.metrics.replication_lag.get_or_create(&label).set(gauge("replication_lag"));
            self.metrics.commit_waiting.get_or_create(&label).set(gauge("commit_waiting"));
            let wait_s = partition["commit_oldest_wait_ms"].as_f64().unwrap_or(0.0) / 1000.0;
            self.metrics.commit_wait.get_or_create(&label).set(wait_s);
        }
        if let Some(dispatcher) = &self.dispatcher {
            self.metrics.host_limit.clear();
            self.metrics.host_connections.clear();
            for host in dispatcher.busiest_hosts(crate::obs::metrics::DISPATCH_HOSTS_SHOWN) {
                let label = vec![("host", host.host)];
                self.metrics.host_limit.get_or_create(&label).set(i64::from(host.limit));
                self.metrics.host_connections.get_or_create(&label).set(host.connections as i64);
            }
        }
        let elections: u64 = rafts.iter().map(|p| p["elections_won"].as_u64().unwrap_or(0)).sum();
        // Two scrapes at once must not both add the same difference.
        let _scraping = self.scrape_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let counted = self.metrics.elections.get();
        if elections > counted {
            self.metrics.elections.inc_by(elections - counted);
        }
        Ok(self.metrics.encode())
    }
}

/// Job views (or `{id, created_ms}`) by creation time, then id: the order lists are in.
fn oldest_first(a: &Value, b: &Value) -> std::cmp::Ordering {
    (a["created_ms"].as_u64(), a["id"].as_str()).cmp(&(b["created_ms"].as_u64(), b["id"].as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_messages_carry_their_version_and_an_unknown_one_is_refused() {
        let request = Forwarded::Scan { scan: Scan::Health };
        let bytes = encode_forwarded(&request);
        assert_eq!(bytes[0], FORWARD_VERSION);
        assert!(matches!(decode_forwarded::<Forwarded>(&bytes), Ok(Forwarded::Scan { scan: Scan::Health })));
        let mut future = bytes.clone();
        future[0] = FORWARD_VERSION + 1;
        let refused = decode_forwarded::<Forwarded>(&future).expect_err("an unknown version is refused");
        assert!(refused.contains("format version 2; this node speaks 1"), "{refused}");
        // Plain JSON from a member before the version byte is read as version 0, and such a
        // member is sent plain JSON.
        let plain = serde_json::to_vec(&request).expect("serializes");
        assert!(matches!(decode_forwarded_versioned::<Forwarded>(&plain), Ok((Forwarded::Scan { .. }, 0))));
        assert_eq!(encode_forwarded_as(&request, 0), plain);
        assert!(decode_forwarded::<Forwarded>(&[]).is_err());
        assert!(decode_forwarded::<Forwarded>(b"\x01not json").is_err());
    }

    #[test]
    fn refusals_are_typed_for_the_router_and_rendered_for_clients() {
        let forward = crate::shard::ops::not_leader(3, Some(2));
        assert_eq!(forward.leader_named(), Some(2));
        assert_eq!(forward.status, crate::shard::ops::NOT_LEADER_STATUS);
        let election = crate::shard::ops::not_leader(3, None);
        assert!(election.wants_leader() && election.leader_named().is_none());
        assert_eq!(election.body_value().map(|b| b["code"].clone()), Some(json!("no_leader")));
        // A refusal read back from another member keeps its type.
        let bytes = encode_forwarded(&vec![forward.clone()]);
        let back: Vec<Answer> = decode_forwarded(&bytes).expect("decodes");
        assert_eq!(back, vec![forward]);
        assert!(!busy().wants_leader() && busy().leader_named().is_none());
    }
}
