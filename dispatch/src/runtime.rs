//! The runtime that runs the life of a fire end to end: commands are proposed to a
//! `CommandLog` (`DirectLog` here, the node's Raft partition over the WAL) and take effect
//! when the log reports them applied; the timing wheel keeps one timer per job at its next
//! due time, and the dispatcher makes the attempts — on the replica that leads, only.
//! Due fire → `FireStarted` proposed → attempt submitted, at once when that is safe (a node
//! alone, nothing ahead in the log for the job: `send_early`), else once the start applies
//! (a full queue leaves it due; it is tried again shortly) → outcome → `AttemptFinished`
//! with a retry time (backoff with jitter, or Retry-After if longer) → the state machine
//! decides retry, success or dead letter. Every step is completion-driven: nothing waits for the log inside a call.

use crate::{now_ms, Attempt, AttemptResult, DispatchConfig, Dispatcher, SharedDispatcher};
// Maps by job id and flow key: fast, and keyed at random per process, so ids a client
// chooses cannot force collisions (none of them is iterated into replicated state).
use ahash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::time::Duration;
use sundial_engine::flow::{self, Gate};
use sundial_engine::state::{
    Applied, ApplyError, Command, Due, Outcome, State, DEAD_LETTERS_MAX, EXPIRE_PER_COMMAND_MAX,
};
use sundial_engine::trace::{attempt_span_id, fire_span_id, fire_trace, SpanRecord};
use sundial_engine::wheel::{Expired, TimingWheel};
use tokio::sync::mpsc;

/// Names a proposed command until the log reports it applied (a log index, for a partition).
pub type Ticket = u64;

/// A command the log applied, as the runtime needs to see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed {
    /// Set when the command was proposed here (and its ticket is still good).
    pub ticket: Option<Ticket>,
    /// The job it touched, if any.
    pub job: Option<String>,
    /// Whether it stops the job's attempts (cancel, delete).
    pub stops_attempts: bool,
    /// The flow key it paused or resumed, if any.
    pub key: Option<String>,
    /// A delete (the job's callbacks stop too) or an upsert (it may move the job off a flow
    /// key): jobs held by any key are looked at again.
    pub reshapes: Reshape,
    pub verdict: Result<Applied, ApplyError>,
}

/// What a command did to the shape of the jobs, beyond its own job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reshape {
    #[default]
    None,
    Deleted,
    Upserted,
}

/// The job a command names, if it names one.
fn job_of(command: &Command) -> Option<String> {
    match command {
        Command::Create { spec, .. } | Command::Upsert { spec, .. } => Some(spec.id().to_string()),
        Command::Cancel { id, .. }
        | Command::Delete { id, .. }
        | Command::Trigger { id, .. }
        | Command::Backfill { id, .. }
        | Command::RedriveJob { id, .. }
        | Command::CallbackStarted { id, .. }
        | Command::CallbackFinished { id, .. }
        | Command::Pause { id }
        | Command::Resume { id, .. }
        | Command::FireStarted { id, .. }
        | Command::AttemptFinished { id, .. }
        | Command::Redrive { id, .. } => Some(id.clone()),
        Command::Purge { .. } | Command::PauseKey { .. } | Command::ResumeKey { .. } | Command::Expire { .. } => None,
    }
}

impl Committed {
    /// What `command` touches, with its verdict.
    pub fn of(command: &Command, ticket: Option<Ticket>, verdict: Result<Applied, ApplyError>) -> Committed {
        let job = job_of(command);
        let key = match command {
            Command::PauseKey { key } | Command::ResumeKey { key, .. } => Some(key.clone()),
            _ => None,
        };
        let stops_attempts = matches!(command, Command::Cancel { .. } | Command::Delete { .. });
        let reshapes = match command {
            Command::Delete { .. } => Reshape::Deleted,
            Command::Upsert { .. } => Reshape::Upserted,
            _ => Reshape::None,
        };
        Committed { ticket, job, stops_attempts, key, reshapes, verdict }
    }

    /// A proposal that will never be applied (leadership moved before it committed): its
    /// ticket is answered with this, so no caller waits forever.
    pub fn abandoned(ticket: Ticket, reason: impl Into<String>) -> Committed {
        Committed {
            ticket: Some(ticket),
            job: None,
            stops_attempts: false,
            key: None,
            reshapes: Reshape::None,
            verdict: Err(ApplyError::Unavailable(reason.into())),
        }
    }
}

/// Where commands go to be applied: straight into a `State` (`DirectLog`: tests, tools), or
/// through a replicated, durable log (the node's partitions). Proposing never blocks; the
/// verdicts come back from `advance` once the commands are committed and applied.
pub trait CommandLog {
    /// Proposes commands, in order; each gets a ticket or is refused (not leading, overload).
    fn propose(&mut self, commands: Vec<Command>) -> Vec<Result<Ticket, ApplyError>>;

    /// Does the log's pending work (persist, exchange with peers, apply what committed) and
    /// returns what was applied since the last call, in log order, including commands other
    /// replicas proposed. An error means the fate of proposals is unknown (the log failed),
    /// and the runtime stops rather than guess.
    fn advance(&mut self) -> Result<Vec<Committed>, LogError>;

    fn state(&self) -> &State;

    /// `Some(term)` while this replica fires the jobs: it leads (in that term) and has
    /// applied everything committed before it took over (so it sees every fire its
    /// predecessors started). A new term is a new leadership, even without a gap.
    fn leadership(&self) -> Option<u64>;

    /// Whether no other replica can be elected while this one leads: it is the group's only
    /// voter (a node alone). Only then may a fire go out before its start commits: in a
    /// group of several, a leader cut off from the others still believes it leads for up to
    /// an election timeout, while they may elect another that acknowledges a cancel.
    fn leads_alone(&self) -> bool {
        false
    }

    /// The log's last index (an attempt's fencing token is made of it and the term).
    fn last_index(&self) -> u64;

    /// The format commands are written in (`sundial_engine::codec`): 0 while a replica of an
    /// older build, which reads only JSON and knows only older commands, follows the log.
    fn command_format(&self) -> u8 {
        sundial_engine::codec::COMMAND_FORMAT
    }
}

/// The log could not take a command (I/O failure): nothing more can be acknowledged until
/// it is fixed.
#[derive(Debug, thiserror::Error)]
#[error("command log: {0}")]
pub struct LogError(pub String);

/// A log that applies each command at once to an in-memory `State`: no durability, no
/// replication. For tests and tools.
#[derive(Default)]
pub struct DirectLog {
    state: State,
    next_ticket: Ticket,
    applied: Vec<Committed>,
}

impl DirectLog {
    pub fn new(state: State) -> DirectLog {
        DirectLog { state, next_ticket: 1, applied: Vec::new() }
    }
}

impl CommandLog for DirectLog {
    fn propose(&mut self, commands: Vec<Command>) -> Vec<Result<Ticket, ApplyError>> {
        commands
            .into_iter()
            .map(|command| {
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                let summary = Committed::of(&command, Some(ticket), Ok(Applied::Done));
                let verdict = self.state.apply(command);
                self.applied.push(Committed { verdict, ..summary });
                Ok(ticket)
            })
            .collect()
    }

    fn advance(&mut self) -> Result<Vec<Committed>, LogError> {
        Ok(std::mem::take(&mut self.applied))
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn leadership(&self) -> Option<u64> {
        Some(1)
    }

    fn last_index(&self) -> u64 {
        self.next_ticket - 1
    }

    fn leads_alone(&self) -> bool {
        true
    }
}

/// Fires started per `fire_due_jobs` call at most, so a burst of due jobs cannot starve
/// requests and outcomes; the rest start on the next turn.
const FIRES_PER_TURN_MAX: usize = 512;
/// A fire refused by a full dispatch queue is tried again after this.
const QUEUE_FULL_RETRY_MS: u64 = 20;
/// How long the log write of the runtime's own commands may wait for more of them, when
/// nothing waits on their commit but the jobs' status: outcomes, expiries, and starts whose
/// attempts already went out. Writing them every few milliseconds rather than every turn
/// cuts a partition's fsyncs under a steady stream of fires; a caller's command, or a start
/// whose attempt waits for its commit, is written at once, with everything before it.
pub const WRITE_WAIT_MS: u64 = 5;

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub node_id: u64,
    /// The partition this runtime drives (stamped on its attempts and their outcomes).
    pub partition: u32,
    pub dispatch: DispatchConfig,
    /// A dispatcher shared with other runtimes (a node runs one for all its partitions:
    /// one connection pool and one set of per-host limits); `None`: one of its own, started
    /// on the current tokio runtime with `dispatch`.
    pub dispatcher: Option<SharedDispatcher>,
    /// Outcomes waiting to be applied.
    pub results_capacity: usize,
    /// Jobs with a pending timer.
    pub timers_max: usize,
    /// Keep a `SpanRecord` of every attempt and fire (for OTLP export), taken with
    /// `take_spans`.
    pub record_spans: bool,
    /// How long a finished job (completed, failed, cancelled, timed out) stays readable
    /// before the leader expires it; 0: at once.
    pub retention_ms: u64,
    /// An expired job's id is refused to creates until this long after it finished.
    pub dedup_window_ms: u64,
    /// The most jobs the partition is expected to hold: once a leader's wheel is large, its
    /// slab of keys grows once to that many rather than doubling. 0: not said.
    pub expected_jobs: usize,
}

impl Default for RuntimeConfig {
    fn default() -> RuntimeConfig {
        RuntimeConfig {
            node_id: 1,
            partition: 0,
            dispatch: DispatchConfig::default(),
            dispatcher: None,
            results_capacity: 4096,
            timers_max: 10_000_000,
            record_spans: false,
            retention_ms: RETENTION_MS_DEFAULT,
            dedup_window_ms: 24 * 3600 * 1000,
            expected_jobs: 0,
        }
    }
}

/// Counters a status page or test reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    pub attempts_started: u64,
    pub attempts_finished: u64,
    /// Times a due fire found the dispatch queue full and waited.
    pub queue_full_waits: u64,
    /// Times this runtime took over firing (became the leader and caught up).
    pub leaderships: u64,
    /// Timers the full wheel refused (`timers_max`): each job is armed again by its next
    /// change or leadership. Admission (`max_jobs`) keeps this at 0.
    pub timers_refused: u64,
}

/// A finished job stays readable this long by default: 7 days.
pub const RETENTION_MS_DEFAULT: u64 = 7 * 24 * 3600 * 1000;
/// The leader proposes an `Expire` at most this often (sooner while a backlog remains).
const EXPIRE_EVERY_MS: u64 = 1_000;

/// The runtime with the state machine applied directly (no log): tests and tools.
pub type LocalRuntime = Runtime<DirectLog>;

/// What the runtime proposed itself, by ticket, until applied.
enum OwnProposal {
    /// `FireStarted` (or `CallbackStarted`) of a fire due at `due_ms`: the attempt is
    /// submitted once it applies, or when proposed (`sent`, see `InLog`). `flow_key`: the
    /// key it counts against until then.
    FireStart {
        id: String,
        fire_ms: u64,
        attempt: u32,
        due_ms: u64,
        callback: bool,
        flow_key: Option<String>,
        sent: bool,
    },
    /// `AttemptFinished`: spans are recorded once it applies.
    Finish { id: String, fire_ms: u64, attempt: u32, started_ms: u64, finished_ms: u64, outcome: Option<Outcome> },
    /// `Expire`: finished jobs past their retention; one at a time.
    Expire,
}

/// Proposals the runtime waits for at most; beyond it, due fires wait for the next turn.
const OWN_PROPOSALS_MAX: usize = 65_536;

/// The commands this leader proposed that are not applied yet, by the jobs whose fires they
/// may stop. A due fire is sent before its start commits only when nothing ahead of the
/// start in the log concerns its job: then applying the start finds the state the leader
/// looked at (`State::starts_as_proposed`). Bounded by the proposals in flight; emptied
/// when the leadership ends.
#[derive(Default)]
struct InLog {
    by_ticket: HashMap<Ticket, Concern>,
    by_job: HashMap<String, u32>,
    /// Proposed commands that concern every job (pausing a flow key).
    every_job: u32,
}

/// What a proposed command may change about a start.
enum Concern {
    Job(String),
    EveryJob,
}

impl Concern {
    fn of(command: &Command) -> Option<Concern> {
        match command {
            Command::PauseKey { .. } => Some(Concern::EveryJob),
            // Expiring removes finished jobs only, and dead letters do not start fires.
            Command::Expire { .. } | Command::Purge { .. } | Command::ResumeKey { .. } => None,
            other => job_of(other).map(Concern::Job),
        }
    }
}

impl InLog {
    fn note(&mut self, ticket: Ticket, concern: Option<Concern>) {
        let Some(concern) = concern else { return };
        match &concern {
            Concern::Job(id) => *self.by_job.entry(id.clone()).or_default() += 1,
            Concern::EveryJob => self.every_job += 1,
        }
        self.by_ticket.insert(ticket, concern);
    }

    fn applied(&mut self, ticket: Ticket) {
        match self.by_ticket.remove(&ticket) {
            Some(Concern::Job(id)) => {
                if let Some(count) = self.by_job.get_mut(&id) {
                    *count -= 1;
                    if *count == 0 {
                        self.by_job.remove(&id);
                    }
                }
            }
            Some(Concern::EveryJob) => self.every_job -= 1,
            None => {}
        }
    }

    /// Whether no proposal in the log may change what a start of `id` finds.
    fn leaves_alone(&self, id: &str) -> bool {
        self.every_job == 0 && !self.by_job.contains_key(id)
    }

    fn clear(&mut self) {
        *self = InLog::default();
    }
}

pub struct Runtime<L: CommandLog> {
    config: RuntimeConfig,
    log: L,
    /// Set when the log failed: nothing is applied any more.
    log_failure: Option<String>,
    /// Whether this runtime fires (its log leads and caught up); timers exist only then.
    leading: bool,
    /// The term of the leadership it fires in.
    leading_term: Option<u64>,
    /// One timer per job, keyed by its slot in the state's job table (no copy of the id, no
    /// map). A job that left the state may leave its timer behind: it moves when the slot's
    /// next job is armed, or finds the slot empty when it fires.
    wheel: TimingWheel<u32>,
    own: HashMap<Ticket, OwnProposal>,
    /// Proposals (callers' and its own) not applied yet, by the jobs they concern.
    in_log: InLog,
    /// Since the last `advance`: a proposal was made that must be written at once.
    must_write: bool,
    /// Since the last `advance`: when the first of its own proposals whose write may wait
    /// (`WRITE_WAIT_MS`) was made.
    write_waits_since_ms: Option<u64>,
    /// Verdicts of callers' proposals, until taken (`take_resolved`).
    resolved: Vec<(Ticket, Result<Applied, ApplyError>)>,
    dispatcher: Dispatcher,
    /// Outcomes of this runtime's attempts; `None` when they go to a channel the caller
    /// shares between several runtimes (a shard routes them back with `finish_many`).
    results: Option<mpsc::Receiver<AttemptResult>>,
    rng: u64,
    stats: RuntimeStats,
    /// Finished spans not yet taken (bounded by `SPANS_KEPT_MAX`; beyond it they are
    /// dropped and counted).
    spans: Vec<SpanRecord>,
    spans_dropped: u64,
    /// Flow key → starts proposed and not yet applied (they count against its limits).
    flow_pending: HashMap<String, u32>,
    /// Flow key → times of the attempts started within its rate period, oldest first
    /// (bounded by the key's rate). This leader's memory only: a new leader starts afresh.
    flow_starts: HashMap<String, std::collections::VecDeque<u64>>,
    /// Flow key → jobs due but held by the key's limits; woken when one of its attempts ends.
    flow_parked: HashMap<String, std::collections::BTreeSet<String>>,
    /// Attempts whose start was applied but that the dispatcher's queue refused: submitted
    /// again each turn (else they would stay in flight until a new leader takes over).
    unsubmitted: Vec<(String, u64, u32, u64, bool)>,
    /// The `Expire` proposed and not yet applied (it counts while `own` holds its ticket).
    expiring: Option<Ticket>,
    /// No `Expire` is proposed before this.
    next_expire_ms: u64,
    /// Dead letters evicted as last reported (a log line says how many more since).
    evictions_reported: u64,
}

/// What a flow key's limits say about starting an attempt now.
enum FlowGate {
    Go,
    /// Wait for an attempt of the key to end (parallelism, order).
    Park,
    /// Wait until the rate period lets another start.
    WaitUntil(u64),
}

/// Spans kept until taken; the node takes them every loop turn.
const SPANS_KEPT_MAX: usize = 65_536;

impl LocalRuntime {
    /// Starts on the current tokio runtime with an empty state (at the wall clock's now:
    /// a local runtime drives itself, see `run_until`).
    pub fn start(config: RuntimeConfig) -> LocalRuntime {
        Runtime::with_log(config, DirectLog::new(State::new()), now_ms())
    }
}

impl<L: CommandLog> Runtime<L> {
    /// Starts on the current tokio runtime over `log`; once the log leads, a timer is armed
    /// for every job it holds and the attempts a previous leader left in flight run again.
    /// `now_ms` is the caller's clock; every method that decides by time takes it so.
    pub fn with_log(config: RuntimeConfig, log: L, now_ms: u64) -> Runtime<L> {
        let (sender, results) = mpsc::channel(config.results_capacity);
        Runtime::build(config, log, sender, Some(results), now_ms)
    }

    /// `with_log`, with attempt outcomes sent to `results`, a channel the caller reads and
    /// may share between runtimes: it hands each outcome back through `finish_many`.
    pub fn with_shared_results(
        config: RuntimeConfig,
        log: L,
        results: mpsc::Sender<AttemptResult>,
        now_ms: u64,
    ) -> Runtime<L> {
        Runtime::build(config, log, results, None, now_ms)
    }

    fn build(
        config: RuntimeConfig,
        log: L,
        sender: mpsc::Sender<AttemptResult>,
        results: Option<mpsc::Receiver<AttemptResult>>,
        now_ms: u64,
    ) -> Runtime<L> {
        let dispatcher = match &config.dispatcher {
            Some(shared) => shared.for_partition(config.partition, sender),
            None => Dispatcher::start(config.dispatch.clone(), config.partition, sender),
        };
        let mut runtime = Runtime {
            wheel: TimingWheel::keyed(now_ms, config.timers_max),
            config,
            log,
            log_failure: None,
            leading: false,
            leading_term: None,
            own: HashMap::new(),
            in_log: InLog::default(),
            must_write: false,
            write_waits_since_ms: None,
            resolved: Vec::new(),
            dispatcher,
            results,
            rng: now_ms | 1,
            stats: RuntimeStats::default(),
            spans: Vec::new(),
            spans_dropped: 0,
            flow_pending: HashMap::new(),
            flow_starts: HashMap::new(),
            expiring: None,
            next_expire_ms: 0,
            evictions_reported: 0,
            flow_parked: HashMap::new(),
            unsubmitted: Vec::new(),
        };
        runtime.advance(now_ms);
        runtime
    }

    /// Takes over firing: a timer for every job, and the attempts a previous leader (or
    /// run) started and never finished run again with the same fire (idempotency key) and
    /// attempt number.
    fn start_leading(&mut self, now_ms: u64) {
        self.leading = true;
        self.stats.leaderships += 1;
        // Evictions before this leadership were reported by whoever led then.
        self.evictions_reported = self.log.state().dead_letters_evicted_total();
        self.wheel = TimingWheel::keyed(now_ms, self.config.timers_max);
        let state = self.log.state();
        let mut due: Vec<(u32, u64)> = Vec::with_capacity(state.job_count());
        due.extend(state.job_slots().filter_map(|(slot, job)| Some((slot, state.next_due_of(job)?.0))));
        // One allocation of each of the wheel's buffers, not doublings: each is a copy.
        self.wheel.reserve_keys(due.last().map_or(0, |&(slot, _)| slot as usize + 1));
        self.wheel.expect_keys(self.config.expected_jobs.min(self.config.timers_max));
        self.wheel.reserve_deadlines(due.iter().map(|&(_, due_ms)| due_ms));
        for (slot, due_ms) in due {
            self.set_timer(slot, due_ms);
        }
        for (id, fire_ms, attempt) in self.log.state().in_flight() {
            // A full queue at take-over: the attempt stays in flight in the state and is
            // re-run at the next take-over (rare: the queue holds thousands).
            if self.submit(&id, fire_ms, attempt, fire_ms, false) {
                self.stats.attempts_started += 1;
            }
        }
        for (id, fire_ms, attempt) in self.log.state().callbacks_in_flight() {
            if self.submit(&id, fire_ms, attempt, fire_ms, true) {
                self.stats.attempts_started += 1;
            }
        }
    }

    /// Stops firing: another replica leads now and re-runs what was in flight here.
    fn stop_leading(&mut self, now_ms: u64) {
        self.leading = false;
        self.wheel = TimingWheel::keyed(now_ms, self.config.timers_max);
        self.own.clear();
        self.in_log.clear();
        self.flow_pending.clear();
        self.flow_starts.clear();
        self.flow_parked.clear();
        self.unsubmitted.clear();
        self.dispatcher.cancel_all();
    }

    /// Submits an attempt of a fire (or of its callback) to the dispatcher; false when its
    /// queue is full.
    fn submit(&mut self, id: &str, fire_ms: u64, attempt: u32, due_ms: u64, callback: bool) -> bool {
        let Some(job) = self.log.state().job(id) else { return false };
        let spec = job.spec();
        let target = if callback {
            let Some(pending) = job.life().callbacks.get(&fire_ms) else { return false };
            let which = if pending.success { "success" } else { "failure" };
            sundial_engine::job::Target {
                url: pending.url.clone(),
                method: sundial_engine::job::Method::Post,
                headers: vec![("x-sundial-callback".to_string(), which.to_string())],
                body: pending.body.clone(),
                content_type: Some("application/json".to_string()),
            }
        } else {
            spec.target.clone()
        };
        let submission = Attempt {
            partition: self.config.partition,
            job_id: id.to_string(),
            fire_ms,
            attempt,
            callback,
            priority: spec.priority,
            due_ms,
            target,
            timeout_ms: spec.attempt_timeout_ms,
            secret: spec.secret.as_ref().map(|s| s.as_bytes().to_vec()),
            secret_next: spec.secret_next.as_ref().map(|s| s.as_bytes().to_vec()),
            traceparent: sundial_engine::trace::attempt_traceparent(spec.trace.as_ref(), id, fire_ms, attempt),
            // Made now, in the term this runtime fires in (the log may have lost leadership
            // during this turn's advance, before the runtime stops): a receiver that saw a
            // newer term's token refuses it.
            fencing_token: sundial_engine::sign::fencing_token(self.leading_term.unwrap_or(0), self.log.last_index()),
        };
        self.dispatcher.submit(submission).is_ok()
    }

    pub fn state(&self) -> &State {
        self.log.state()
    }

    pub fn log(&self) -> &L {
        &self.log
    }

    /// The log, for bookkeeping and for feeding it (ticks, peer messages): a command
    /// proposed through it directly would bypass the runtime.
    pub fn log_mut(&mut self) -> &mut L {
        &mut self.log
    }

    /// Why the runtime stopped applying commands, if it did.
    pub fn log_failure(&self) -> Option<&str> {
        self.log_failure.as_deref()
    }

    /// Commands this runtime proposed (fire starts, outcomes) not yet applied.
    pub fn proposals_waiting(&self) -> usize {
        self.own.len()
    }

    /// Whether this runtime fires the jobs (its log leads).
    pub fn is_leading(&self) -> bool {
        self.leading
    }

    pub fn stats(&self) -> RuntimeStats {
        self.stats
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Proposes client commands (create, cancel, pause, …); their verdicts come back from
    /// `take_resolved` once applied (after an `advance`).
    pub fn propose(&mut self, commands: Vec<Command>) -> Vec<Result<Ticket, ApplyError>> {
        if let Some(failure) = &self.log_failure {
            return commands.iter().map(|_| Err(ApplyError::Unavailable(failure.clone()))).collect();
        }
        let concerns: Vec<Option<Concern>> = commands.iter().map(Concern::of).collect();
        self.must_write = true;
        let tickets = self.log.propose(commands);
        for (ticket, concern) in tickets.iter().zip(concerns) {
            // Noted also before this replica fires (leading, not caught up): a start
            // proposed once it fires must see the callers' commands ahead of it.
            if let Ok(ticket) = ticket {
                self.in_log.note(*ticket, concern);
            }
        }
        tickets
    }

    /// Verdicts of proposals that were applied (or abandoned) since the last call.
    pub fn take_resolved(&mut self) -> Vec<(Ticket, Result<Applied, ApplyError>)> {
        std::mem::take(&mut self.resolved)
    }

    /// Applies a client command and waits for nothing: for logs that apply at once
    /// (`DirectLog`, a partition of one); `Unavailable` when its verdict is not known yet.
    pub fn apply(&mut self, command: Command, now_ms: u64) -> Result<Applied, ApplyError> {
        // Never fails: apply_batch answers one verdict per command.
        self.apply_batch(vec![command], now_ms).pop().expect("one verdict per command")
    }

    /// `apply` for several commands, proposed together (one log write); verdicts in order.
    pub fn apply_batch(&mut self, commands: Vec<Command>, now_ms: u64) -> Vec<Result<Applied, ApplyError>> {
        let tickets = self.propose(commands);
        self.advance(now_ms);
        let mut verdicts: HashMap<Ticket, Result<Applied, ApplyError>> = HashMap::new();
        let wanted: HashSet<Ticket> = tickets.iter().filter_map(|t| t.as_ref().ok().copied()).collect();
        self.resolved.retain(|(ticket, verdict)| {
            if wanted.contains(ticket) {
                verdicts.insert(*ticket, verdict.clone());
                false
            } else {
                true
            }
        });
        tickets
            .into_iter()
            .map(|ticket| {
                let ticket = ticket?;
                verdicts
                    .remove(&ticket)
                    .unwrap_or_else(|| Err(ApplyError::Unavailable("the command is not committed yet".into())))
            })
            .collect()
    }

    /// Drives the log and takes the effects of what it applied: timers re-armed, attempts
    /// of fires this runtime started submitted, cancelled attempts stopped, callers'
    /// verdicts kept for `take_resolved`; and takes over or gives up firing when the log's
    /// leadership changed.
    pub fn advance(&mut self, now_ms: u64) {
        if self.log_failure.is_some() {
            return;
        }
        (self.must_write, self.write_waits_since_ms) = (false, None);
        let applied = match self.log.advance() {
            Ok(applied) => applied,
            Err(error) => {
                tracing::error!(%error, "the command log failed; nothing more is applied");
                self.log_failure = Some(error.to_string());
                self.own.clear();
                self.in_log.clear();
                return;
            }
        };
        for committed in applied {
            self.take_effect(committed, now_ms);
        }
        let leadership = self.log.leadership();
        if leadership != self.leading_term {
            if self.leading {
                self.stop_leading(now_ms);
            }
            // Set first: the attempts a take-over runs again carry the new term's tokens.
            self.leading_term = leadership;
            if leadership.is_some() {
                self.start_leading(now_ms);
            }
        }
    }

    fn take_effect(&mut self, committed: Committed, now_ms: u64) {
        if let Some(ticket) = committed.ticket {
            self.in_log.applied(ticket);
        }
        let own = committed.ticket.and_then(|ticket| self.own.remove(&ticket));
        if own.is_none() {
            if let Some(ticket) = committed.ticket {
                self.resolved.push((ticket, committed.verdict.clone()));
            }
        }
        if !self.leading {
            return; // a follower keeps no timers and makes no attempts
        }
        if let (Some(id), true) = (&committed.job, committed.verdict.is_ok()) {
            if committed.stops_attempts {
                // A cancelled job's callbacks of fires that ended still go out; a deleted
                // job's go with it.
                if committed.reshapes == Reshape::Deleted {
                    self.dispatcher.cancel(id);
                } else {
                    self.dispatcher.cancel_fires(id);
                }
            }
            if committed.reshapes != Reshape::None {
                // The job may have left a key (or the state): whatever it held may go.
                let parked: Vec<String> = self.flow_parked.drain().flat_map(|(_, jobs)| jobs).collect();
                for held in parked {
                    self.arm(&held);
                }
            }
            self.arm(id);
            // A completed job may release jobs that depend on it.
            if self.log.state().job(id).is_some_and(|job| job.status == sundial_engine::state::Status::Completed) {
                for dependent in self.log.state().dependents_of(id) {
                    self.arm(&dependent);
                }
            }
        }
        if let Some(key) = &committed.key {
            // A key paused or resumed: its jobs' timers follow.
            let jobs: Vec<String> =
                self.log.state().flow_key(key).map(|k| k.jobs.iter().cloned().collect()).unwrap_or_default();
            for id in jobs {
                self.arm(&id);
            }
        }
        if let Some(OwnProposal::FireStart { flow_key: Some(key), .. }) = &own {
            if let Some(pending) = self.flow_pending.get_mut(key) {
                *pending = pending.saturating_sub(1);
                if *pending == 0 {
                    self.flow_pending.remove(key);
                }
            }
        }
        // Anything that happened to a job of a flow key may free the key for jobs it holds.
        if let Some(key) = committed.job.as_deref().and_then(|id| self.log.state().flow_key_of(id)).map(|(k, _)| k) {
            if let Some(parked) = self.flow_parked.remove(key) {
                for id in parked {
                    self.arm(&id);
                }
            }
        }
        match own {
            Some(OwnProposal::FireStart { id, fire_ms, sent: true, .. })
                if !matches!(committed.verdict, Ok(Applied::Done)) =>
            {
                // Not expected (`starts_as_proposed` said it would start): the attempt sent
                // is stopped if it still can be, and its outcome will be refused as stale.
                tracing::warn!(job_id = %id, fire_ms, verdict = ?committed.verdict, "a fire sent before its start committed was not started by the log");
                self.dispatcher.cancel_fire(&id, fire_ms);
                self.arm(&id);
            }
            Some(OwnProposal::FireStart { sent: true, .. }) => {}
            Some(OwnProposal::FireStart { id, fire_ms, attempt, due_ms, callback, .. }) => match &committed.verdict {
                Ok(Applied::Missed { count }) => {
                    tracing::warn!(job_id = %id, fire_ms, missed = count, "fires missed (misfire policy or catch-up window)");
                }
                Ok(_) => {
                    tracing::debug!(job_id = %id, fire_ms, attempt, late_ms = now_ms.saturating_sub(due_ms), "attempt starting");
                    // Room was counted when the fire was proposed; a queue filled meanwhile
                    // keeps the attempt (in flight in the state) for the next turns.
                    if self.submit(&id, fire_ms, attempt, due_ms, callback) {
                        self.stats.attempts_started += 1;
                    } else if self.unsubmitted.len() < OWN_PROPOSALS_MAX {
                        self.unsubmitted.push((id, fire_ms, attempt, due_ms, callback));
                    }
                }
                // Refused (no longer due: cancelled, paused) or abandoned (leadership moved
                // before it committed): the job's timer follows its state again.
                Err(_) => self.arm(&id),
            },
            Some(OwnProposal::Finish { id, fire_ms, attempt, started_ms, finished_ms, outcome: Some(outcome) }) => {
                if committed.verdict.is_ok() {
                    self.record_attempt_spans(&id, fire_ms, attempt, started_ms, finished_ms, &outcome);
                }
            }
            Some(OwnProposal::Expire) => {
                // More already due (the batch was full): the next goes at once.
                let first_ms = self.log.state().first_retained_ms();
                if first_ms.is_some_and(|first_ms| first_ms.saturating_add(self.config.retention_ms) <= now_ms) {
                    self.next_expire_ms = now_ms;
                }
                if let Ok(Applied::Expired { count }) = committed.verdict {
                    tracing::debug!(count, "finished jobs expired (retention)");
                }
            }
            Some(OwnProposal::Finish { outcome: None, .. }) | None => {}
        }
    }

    /// Logs dead letters evicted since the last report (the count is replicated; the leader
    /// says it, once).
    fn report_evictions(&mut self) {
        let evicted = self.log.state().dead_letters_evicted_total();
        if evicted > self.evictions_reported {
            tracing::warn!(
                evicted = evicted - self.evictions_reported,
                kept = DEAD_LETTERS_MAX,
                "dead letters evicted, oldest first: the list is full (purge or redrive them)"
            );
            self.evictions_reported = evicted;
        }
    }

    /// Proposes an `Expire` when the job that finished first has outlived the retention (one
    /// at a time, at most every `EXPIRE_EVERY_MS` unless a backlog remains).
    fn expire_finished(&mut self, now_ms: u64) {
        if self.expiring.is_some_and(|ticket| self.own.contains_key(&ticket)) || now_ms < self.next_expire_ms {
            return;
        }
        // A member of an older build would not know the command, skip it and part from
        // its peers: retention waits until every member reads the archived format.
        if self.log.command_format() == 0 {
            return;
        }
        let Some(first_ms) = self.log.state().first_retained_ms() else { return };
        if first_ms.saturating_add(self.config.retention_ms) > now_ms {
            return;
        }
        self.next_expire_ms = now_ms + EXPIRE_EVERY_MS;
        let command = Command::Expire {
            now_ms,
            retention_ms: self.config.retention_ms,
            dedup_window_ms: self.config.dedup_window_ms,
            max: EXPIRE_PER_COMMAND_MAX,
        };
        self.expiring = self.log.propose(vec![command]).pop().and_then(Result::ok);
        if let Some(ticket) = self.expiring {
            self.own.insert(ticket, OwnProposal::Expire);
        }
    }

    /// Sets the job's timer to its next due time (or removes it). A job no longer in the
    /// state has no slot: its timer, if any, is dropped when it fires.
    fn arm(&mut self, id: &str) {
        let state = self.log.state();
        let Some(slot) = state.slot_of(id) else { return };
        let Some(job) = state.job_at(slot) else { return };
        match state.next_due_of(job) {
            Some((due_ms, _)) => self.set_timer(slot, due_ms),
            None => self.clear_timer(slot),
        }
    }

    /// The job in `slot` wakes at `at_ms` (and not at any other time set for it before).
    fn set_timer(&mut self, slot: u32, at_ms: u64) {
        if let Err(full) = self.wheel.set(slot, at_ms, slot) {
            // The job is armed again by its next change or leadership; said in the log at the
            // 1st, 2nd, 4th, 8th… refusal.
            self.stats.timers_refused += 1;
            if self.stats.timers_refused.is_power_of_two() {
                tracing::warn!(refused = self.stats.timers_refused, "{full}: a job's timer was not set");
            }
        }
    }

    fn clear_timer(&mut self, slot: u32) {
        self.wheel.unset(slot);
    }

    /// Runs fires and applies outcomes until `done` holds or `limit` passes; returns whether
    /// `done` held.
    pub async fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&State) -> bool) -> bool {
        self.run_until_with(limit, |runtime| done(runtime.state())).await
    }

    /// `run_until` with the whole runtime in view (the node's loop looks at its inbox).
    pub async fn run_until_with(&mut self, limit: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        // Bounded by `limit`.
        loop {
            if done(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            self.fire_due_jobs(now_ms());
            self.advance(now_ms());
            // Sleeps until the next timer or an outcome; `done` is looked at on each wake-up and
            // at least once a second.
            let wait_ms = self.sleep_ms(now_ms());
            tokio::select! {
                result = self.next_result() => {
                    if let Some(result) = result {
                        self.finish(result, now_ms());
                        self.advance(now_ms());
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            }
        }
    }

    /// How long the runtime may sleep before its next timer or the write of commands that
    /// wait for it (at most a second; none when a command that must be written waits).
    pub fn sleep_ms(&self, now_ms: u64) -> u64 {
        if self.must_write {
            return 0; // proposed after this turn's write: written on the next
        }
        let write_at = self.write_waits_since_ms.map(|since| since + WRITE_WAIT_MS);
        let wake_at = [self.wheel.next_wakeup_ms(), write_at].into_iter().flatten().min();
        wake_at.map_or(1_000, |at| at.saturating_sub(now_ms).clamp(1, 1_000))
    }

    /// When the wheel's next timer is due, if one is set.
    pub fn next_timer_ms(&self) -> Option<u64> {
        self.wheel.next_wakeup_ms()
    }

    /// Whether `advance` may wait (`WRITE_WAIT_MS`): every proposal since the last one is
    /// of the runtime's own whose write may wait, and the first is younger than that.
    pub fn write_may_wait(&self, now_ms: u64) -> bool {
        // A clock stepped back (now before `since`) writes at once rather than wait for it.
        !self.must_write
            && self.write_waits_since_ms.is_some_and(|since| since <= now_ms && now_ms < since + WRITE_WAIT_MS)
    }

    /// The next attempt outcome (for a caller driving its own loop: pass it to `finish`).
    /// With shared results it never resolves: the caller reads the shared channel.
    pub async fn next_result(&mut self) -> Option<AttemptResult> {
        match &mut self.results {
            Some(results) => results.recv().await,
            None => std::future::pending().await,
        }
    }

    /// Proposes a start for every fire due by now (leading only); each attempt is
    /// submitted now when that is safe (`send_early`), else when its start is applied.
    /// Nothing is written here: the caller's next
    /// `advance` persists the starts with whatever else it proposed meanwhile (one log
    /// write for a turn's creates, starts and outcomes).
    pub fn fire_due_jobs(&mut self, now_ms: u64) {
        if !self.leading || self.log_failure.is_some() {
            return;
        }
        self.report_evictions();
        self.expire_finished(now_ms);
        let mut expired: Vec<Expired<u32>> = Vec::new();
        self.wheel.advance_to(now_ms, &mut expired);
        let turn_max = FIRES_PER_TURN_MAX.min(OWN_PROPOSALS_MAX.saturating_sub(self.own.len()));
        if expired.len() > turn_max {
            for timer in expired.split_off(turn_max) {
                if let Some(id) = self.log.state().job_at(timer.value).map(|job| job.id().to_string()) {
                    self.arm(&id);
                }
            }
        }
        // Attempts whose start applied while the queue was full go first.
        let unsubmitted = std::mem::take(&mut self.unsubmitted);
        for (id, fire_ms, attempt, due_ms, callback) in unsubmitted {
            let still_in_flight = self.log.state().job(&id).is_some_and(|job| {
                if callback {
                    job.life().callbacks.get(&fire_ms).is_some_and(|c| c.in_flight && c.attempts + 1 == attempt)
                } else {
                    job.life().active.get(&fire_ms).is_some_and(|f| f.in_flight && f.attempts + 1 == attempt)
                }
            });
            if !still_in_flight {
                continue;
            }
            if self.submit(&id, fire_ms, attempt, due_ms, callback) {
                self.stats.attempts_started += 1;
            } else {
                self.unsubmitted.push((id, fire_ms, attempt, due_ms, callback));
            }
        }
        let now = now_ms;
        let may_send_early = self.log.leads_alone();
        let mut room = self.dispatcher.room();
        let mut starts = Vec::new();
        let mut started_in_turn: HashMap<String, u32> = HashMap::new();
        let mut seen_in_turn: HashSet<u32> = HashSet::new();
        for timer in expired {
            let slot = timer.value;
            if !seen_in_turn.insert(slot) {
                continue; // one start per job per turn
            }
            let state = self.log.state();
            let Some(job) = state.job_at(slot) else { continue };
            let Some((due_ms, due)) = state.next_due_of(job) else { continue };
            let id = job.id().to_string();
            if due_ms > now {
                self.arm(&id); // moved later meanwhile
                continue;
            }
            let (mut fire_ms, mut attempt, mut callback) = match due {
                Due::NewFire { fire_ms } => (fire_ms, 1, false),
                Due::Retry { fire_ms, attempt } => (fire_ms, attempt, false),
                Due::Callback { fire_ms, attempt } => (fire_ms, attempt, true),
            };
            let mut flow_key =
                if callback { None } else { self.log.state().flow_key_of(&id).map(|(key, _)| key.to_string()) };
            if let Some(key) = flow_key.clone() {
                let gate = self.flow_gate(&key, &id, fire_ms, now, started_in_turn.get(&key).copied().unwrap_or(0));
                if !matches!(gate, FlowGate::Go) {
                    // Held by its key. A callback of the job (never held) may go meanwhile:
                    // now if due (and the held fire is looked at again after its verdict),
                    // else the job's timer also wakes for it.
                    let callback_due = self.log.state().next_callback(&id);
                    if let Some((due_ms, Due::Callback { fire_ms: f, attempt: a })) = callback_due {
                        if due_ms <= now {
                            (fire_ms, attempt, callback, flow_key) = (f, a, true, None);
                        }
                    }
                    if !callback {
                        let wake_ms = match gate {
                            FlowGate::WaitUntil(at_ms) => Some(at_ms),
                            _ => None,
                        };
                        if matches!(gate, FlowGate::Park) {
                            self.flow_parked.entry(key).or_default().insert(id.to_string());
                        }
                        let callback_ms = callback_due.map(|(due_ms, _)| due_ms);
                        if let Some(at_ms) = [wake_ms, callback_ms].into_iter().flatten().min() {
                            self.set_timer(slot, at_ms);
                        }
                        continue;
                    }
                }
            }
            if room == 0 {
                // The queue is full: the fire stays due and is tried again shortly.
                self.stats.queue_full_waits += 1;
                self.set_timer(slot, now + QUEUE_FULL_RETRY_MS);
                continue;
            }
            room -= 1;
            if let Some(key) = &flow_key {
                *started_in_turn.entry(key.clone()).or_default() += 1;
                *self.flow_pending.entry(key.clone()).or_default() += 1;
                if let Some(starts) = self.flow_starts.get_mut(key) {
                    starts.push_back(now);
                }
            }
            // Sent now, before its start commits, when applying the start is sure to start it.
            let sent = may_send_early
                && !callback
                && self.in_log.leaves_alone(&id)
                && self.log.state().starts_as_proposed(&id, fire_ms, attempt, now);
            starts.push(OwnProposal::FireStart {
                id: id.to_string(),
                fire_ms,
                attempt,
                due_ms,
                callback,
                flow_key,
                sent,
            });
        }
        if starts.is_empty() {
            return;
        }
        // Proposed together (one log write), ahead of any outcome of theirs, so an outcome
        // always finds its fire and a new leader knows which fires were started; most
        // requests go out now (`send_early`), the rest once their start commits.
        let commands = starts
            .iter()
            .map(|start| match start {
                OwnProposal::FireStart { id, fire_ms, attempt, callback: true, .. } => {
                    Command::CallbackStarted { id: id.clone(), fire_ms: *fire_ms, attempt: *attempt, now_ms: now }
                }
                OwnProposal::FireStart { id, fire_ms, attempt, .. } => Command::FireStarted {
                    id: id.clone(),
                    fire_ms: *fire_ms,
                    attempt: *attempt,
                    node: self.config.node_id,
                    now_ms: now,
                },
                OwnProposal::Finish { .. } | OwnProposal::Expire => {
                    unreachable!("only starts are gathered here")
                }
            })
            .collect();
        self.propose_own(commands, starts, now);
    }

    /// Proposes commands of the runtime's own, remembering each by its ticket. A refused
    /// one (no longer leading, overload) is dropped: its fire stays due, or its attempt in
    /// flight, for whoever leads to run again.
    fn propose_own(&mut self, commands: Vec<Command>, proposals: Vec<OwnProposal>, now_ms: u64) {
        let concerns: Vec<Option<Concern>> = commands.iter().map(Concern::of).collect();
        let tickets = self.log.propose(commands);
        for ((ticket, proposal), concern) in tickets.into_iter().zip(proposals).zip(concerns) {
            match ticket {
                Ok(ticket) => {
                    self.in_log.note(ticket, concern);
                    let proposal = self.send_early(proposal);
                    if matches!(proposal, OwnProposal::FireStart { sent: false, .. }) {
                        self.must_write = true;
                    } else {
                        self.write_waits_since_ms.get_or_insert(now_ms);
                    }
                    self.own.insert(ticket, proposal);
                }
                Err(error) => {
                    if let OwnProposal::FireStart { id, flow_key, .. } = &proposal {
                        tracing::debug!(job_id = %id, %error, "could not start a fire; it stays due");
                        if let Some(key) = flow_key {
                            if let Some(pending) = self.flow_pending.get_mut(key) {
                                *pending = pending.saturating_sub(1);
                            }
                            // The start never happened: its rate slot is given back.
                            if let Some(starts) = self.flow_starts.get_mut(key) {
                                starts.pop_back();
                            }
                        }
                        if let Some(slot) = self.log.state().slot_of(id) {
                            self.set_timer(slot, now_ms + QUEUE_FULL_RETRY_MS);
                        }
                    }
                }
            }
        }
    }

    /// Submits the attempt of a start proposed with `sent` (sure to start it when applied)
    /// now, before the start commits. If the leader dies before the commit, the fire is
    /// still due in the log, and whoever leads next sends it again under the same
    /// idempotency key: at least once, as for an attempt whose outcome was lost. A full
    /// queue leaves it to be submitted when the start applies.
    fn send_early(&mut self, proposal: OwnProposal) -> OwnProposal {
        match proposal {
            OwnProposal::FireStart { id, fire_ms, attempt, due_ms, callback, flow_key, sent: true } => {
                let sent = self.submit(&id, fire_ms, attempt, due_ms, callback);
                if sent {
                    self.stats.attempts_started += 1;
                }
                OwnProposal::FireStart { id, fire_ms, attempt, due_ms, callback, flow_key, sent }
            }
            other => other,
        }
    }

    /// Whether the flow key `key` lets the job `id` start an attempt of its fire `fire_ms`
    /// now (`sundial_engine::flow::gate`, with this runtime's counts); a job waiting behind
    /// the key's first due one wakes that one.
    fn flow_gate(&mut self, key: &str, id: &str, fire_ms: u64, now: u64, started_in_turn: u32) -> FlowGate {
        let pending = started_in_turn + self.flow_pending.get(key).copied().unwrap_or(0);
        let state = self.log.state();
        // The rate window of a key with a rate (its starts are noted in `fire_due_jobs`).
        let rated = state.flow_key(key).is_some_and(|flow| flow.rate.is_some() && flow.period_ms.is_some());
        let starts = rated.then(|| self.flow_starts.entry(key.to_string()).or_default());
        match flow::gate(state, key, id, fire_ms, pending, starts, now) {
            Gate::Go => FlowGate::Go,
            Gate::Park => FlowGate::Park,
            Gate::ParkBehind(first) => {
                self.arm(&first);
                FlowGate::Park
            }
            Gate::WaitUntil(at_ms) => FlowGate::WaitUntil(at_ms),
        }
    }

    /// Proposes an attempt's outcome (with its retry time); `advance` applies it.
    pub fn finish(&mut self, result: AttemptResult, now_ms: u64) {
        self.finish_many(vec![result], now_ms);
    }

    /// Proposes several outcomes, written by the next `advance` (one log write with the
    /// rest of the turn). Outcomes of a runtime that no longer leads are dropped: the new
    /// leader runs those attempts again.
    pub fn finish_many(&mut self, results: Vec<AttemptResult>, now_ms: u64) {
        let mut commands = Vec::with_capacity(results.len());
        let mut proposals = Vec::with_capacity(results.len());
        for result in results {
            self.stats.attempts_finished += 1;
            if !self.leading {
                continue;
            }
            let random = self.next_random();
            let Some(job) = self.log.state().job(&result.job_id) else { continue };
            let retry_after_ms = match &result.outcome {
                Outcome::Response { retry_after_ms: Some(ms), .. } => *ms,
                _ => 0,
            };
            let retry_at_ms = job.spec.retry().retry_at_ms(result.attempt, result.finished_ms, retry_after_ms, random);
            match &result.outcome {
                // A delivered attempt is routine (debug: one line per fire is too many at
                // volume); an answer that is not 2xx is worth an operator's eye.
                Outcome::Response { status, .. } if (200..300).contains(status) => tracing::debug!(
                    job_id = %result.job_id,
                    fire_ms = result.fire_ms,
                    attempt = result.attempt,
                    status,
                    latency_ms = result.finished_ms.saturating_sub(result.started_ms),
                    "attempt answered"
                ),
                Outcome::Response { status, .. } => tracing::info!(
                    job_id = %result.job_id,
                    fire_ms = result.fire_ms,
                    attempt = result.attempt,
                    status,
                    latency_ms = result.finished_ms.saturating_sub(result.started_ms),
                    "attempt answered"
                ),
                Outcome::Error(class) => tracing::warn!(
                    job_id = %result.job_id,
                    fire_ms = result.fire_ms,
                    attempt = result.attempt,
                    error = ?class,
                    latency_ms = result.finished_ms.saturating_sub(result.started_ms),
                    "attempt failed"
                ),
            }
            // Spans are recorded for webhook attempts (callbacks have none).
            let keep_outcome = self.config.record_spans && !result.callback;
            proposals.push(OwnProposal::Finish {
                id: result.job_id.clone(),
                fire_ms: result.fire_ms,
                attempt: result.attempt,
                started_ms: result.started_ms,
                finished_ms: result.finished_ms,
                outcome: keep_outcome.then(|| result.outcome.clone()),
            });
            if result.callback {
                commands.push(Command::CallbackFinished {
                    id: result.job_id,
                    fire_ms: result.fire_ms,
                    attempt: result.attempt,
                    started_ms: result.started_ms,
                    finished_ms: result.finished_ms,
                    outcome: result.outcome,
                    retry_at_ms,
                });
                continue;
            }
            commands.push(Command::AttemptFinished {
                id: result.job_id,
                fire_ms: result.fire_ms,
                attempt: result.attempt,
                node: self.config.node_id,
                started_ms: result.started_ms,
                finished_ms: result.finished_ms,
                outcome: result.outcome,
                retry_at_ms,
            });
        }
        if commands.is_empty() {
            return;
        }
        // A stale outcome (the job was cancelled meanwhile) is refused and changes nothing.
        self.propose_own(commands, proposals, now_ms);
    }

    /// The spans of a finished attempt, and of its fire when that was the last attempt.
    fn record_attempt_spans(
        &mut self,
        id: &str,
        fire_ms: u64,
        attempt: u32,
        started_ms: u64,
        finished_ms: u64,
        outcome: &Outcome,
    ) {
        let Some(job) = self.log.state().job(id) else { return };
        let spec = job.spec();
        let trace = spec.trace.clone();
        let trace_id = fire_trace(trace.as_ref(), id, fire_ms);
        let fire_span = fire_span_id(id, fire_ms);
        let result = match outcome {
            Outcome::Response { status, .. } => ("http.response.status_code", status.to_string()),
            Outcome::Error(class) => ("error.type", format!("{class:?}").to_lowercase()),
        };
        let retrying =
            matches!(self.log.state().next_due(id), Some((_, Due::Retry { fire_ms: f, .. })) if f == fire_ms);
        let mut records = vec![SpanRecord {
            name: "attempt",
            trace_id: trace_id.clone(),
            span_id: attempt_span_id(id, fire_ms, attempt),
            parent_span_id: Some(fire_span.clone()),
            start_ms: started_ms,
            end_ms: finished_ms,
            attributes: vec![
                ("sundial.job_id", id.to_string()),
                ("sundial.fire_ms", fire_ms.to_string()),
                ("sundial.attempt", attempt.to_string()),
                ("url.full", spec.target.url.clone()),
                result.clone(),
            ],
            failed: !outcome.succeeded(),
        }];
        if !retrying {
            records.push(SpanRecord {
                name: "fire",
                trace_id,
                span_id: fire_span,
                parent_span_id: trace.map(|t| t.span_id),
                start_ms: fire_ms.min(started_ms),
                end_ms: finished_ms,
                attributes: vec![
                    ("sundial.job_id", id.to_string()),
                    ("sundial.fire_ms", fire_ms.to_string()),
                    ("sundial.attempts", attempt.to_string()),
                    result,
                ],
                failed: !outcome.succeeded(),
            });
        }
        self.keep_spans(records);
    }

    /// Keeps spans for `take_spans` (only when `record_spans` is on), within the bound.
    pub fn keep_spans(&mut self, records: Vec<SpanRecord>) {
        if !self.config.record_spans {
            return;
        }
        for record in records {
            if self.spans.len() >= SPANS_KEPT_MAX {
                self.spans_dropped += 1;
                continue;
            }
            self.spans.push(record);
        }
    }

    /// The spans finished since the last call, and how many were dropped (the buffer was
    /// full) since the start.
    pub fn take_spans(&mut self) -> (Vec<SpanRecord>, u64) {
        (std::mem::take(&mut self.spans), self.spans_dropped)
    }

    /// Outcomes already waiting, without waiting (at most `max`).
    pub fn ready_results(&mut self, max: usize) -> Vec<AttemptResult> {
        let mut results = Vec::new();
        let Some(receiver) = &mut self.results else { return results };
        while results.len() < max {
            match receiver.try_recv() {
                Ok(result) => results.push(result),
                Err(_) => break,
            }
        }
        results
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}
