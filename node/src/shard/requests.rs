//! What a shard does with the work in its inbox: creates of a partition proposed together
//! (one log write), job operations and linearizable reads, purges; each request waits for
//! its commands' verdicts (by ticket) and is answered once all are in.

use super::scan::{scan_covers, scan_one};
use super::*;

impl Shard {
    /// Answers the slot a ticket stands for; a request whose slots are all answered is sent.
    pub(super) fn resolve(&mut self, partition: u32, ticket: Ticket, verdict: Result<Applied, ApplyError>) {
        let now_ms = self.turn_ms;
        let Some(TicketUse { waiting, slot, kind }) = self.tickets.remove(&(partition, ticket)) else { return };
        let Some(replica) = self.replicas.get(&partition) else { return };
        let state = replica.state();
        if let AnswerKind::Read { ids, op } = &kind {
            let answers: Vec<Answer> = ids
                .iter()
                .map(|id| match &verdict {
                    Ok(_) => ops::read_answer(state, id, *op, now_ms),
                    // Nothing happened: the router may retry it on the next leader.
                    Err(ApplyError::Unavailable(reason)) => {
                        ops::no_leader(partition, format!("partition {partition}: {reason}"))
                    }
                    Err(e) => ops::apply_error(e.clone()),
                })
                .collect();
            for (slot, answer) in answers.into_iter().enumerate() {
                self.fill(waiting, slot, answer);
            }
            return;
        }
        let answer = match kind {
            AnswerKind::Create { id, representation } => ops::create_answer(state, &id, verdict, representation),
            AnswerKind::Command { id, op } => ops::command_answer(state, &id, op, verdict, now_ms),
            AnswerKind::Read { .. } => unreachable!("answered above"),
            AnswerKind::Purged => match verdict {
                Ok(_) => ops::answer(200, json!({"done": true})),
                Err(e) => ops::apply_error(e),
            },
        };
        self.fill(waiting, slot, answer);
    }

    pub(super) fn fill(&mut self, waiting: u64, slot: usize, answer: Answer) {
        let Some(request) = self.waiting.get_mut(&waiting) else { return };
        if request.answers[slot].replace(answer).is_none() {
            request.missing -= 1;
        }
        if request.missing == 0 {
            let request = self.waiting.remove(&waiting).expect("present");
            self.send_reply(request.reply, request.answers.into_iter().map(|a| a.unwrap_or_else(lost)).collect());
        }
    }

    /// Registers a request whose `answers` are partly known; `pending` are the slots still
    /// to come, each with its ticket (or its refusal). Sends it at once when complete.
    pub(super) fn wait_for(
        &mut self,
        partition: u32,
        mut answers: Vec<Option<Answer>>,
        pending: Vec<(usize, Result<Ticket, ApplyError>, AnswerKind)>,
        reply: Reply,
    ) {
        let key = self.next_waiting;
        self.next_waiting += 1;
        let mut missing = 0;
        for (slot, ticket, kind) in pending {
            match ticket {
                Ok(ticket) => {
                    missing += 1;
                    self.tickets.insert((partition, ticket), TicketUse { waiting: key, slot, kind });
                }
                Err(refused) => answers[slot] = Some(ops::apply_error(refused)),
            }
        }
        if missing == 0 {
            self.send_reply(reply, answers.into_iter().map(|a| a.unwrap_or_else(lost)).collect());
            return;
        }
        self.waiting.insert(key, Waiting { answers, missing, reply });
    }

    pub(super) fn send_reply(&mut self, reply: Reply, answers: Vec<Answer>) {
        match reply {
            Reply::Answers(reply) => {
                let _ = reply.send(answers);
            }
            Reply::Created(reply, commit) => {
                self.metrics.created(&answers);
                if self.config.spans.is_some() {
                    self.commit_spans(commit);
                }
                let _ = reply.send(answers);
            }
            Reply::Values(reply) => {
                let values = answers.into_iter().map(|a| json!({"status": a.status, "body": a.body})).collect();
                let _ = reply.send(values);
            }
        }
    }

    /// One "commit" span per request trace whose jobs a log write carried.
    pub(super) fn commit_spans(&mut self, commit: CommitSpan) {
        let Some(replica) = self.replicas.get_mut(&commit.partition) else { return };
        let ended_ms = sundial_dispatch::now_ms();
        let traces: std::collections::BTreeSet<(String, String)> = commit.traces.into_iter().collect();
        let spans = traces.into_iter().map(|(trace_id, span_id)| sundial_engine::trace::SpanRecord {
            name: "commit",
            span_id: format!(
                "{:016x}",
                std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), &span_id).max(1)
            ),
            trace_id,
            parent_span_id: Some(span_id),
            start_ms: commit.started_ms,
            end_ms: ended_ms,
            attributes: vec![("sundial.partition", commit.partition.to_string())],
            failed: false,
        });
        replica.keep_spans(spans.collect());
    }

    pub(super) fn handle(&mut self, batch: Vec<Work>) {
        let mut creates: BTreeMap<u32, Vec<CreateRequest>> = BTreeMap::new();
        let mut others = Vec::new();
        for work in batch {
            match work {
                Work::Create { partition, specs, now_ms, mode, representation, reply } => {
                    creates.entry(partition).or_default().push((specs, now_ms, mode, representation, reply))
                }
                other => others.push(other),
            }
        }
        for (partition, requests) in creates {
            self.create(partition, requests);
        }
        for work in others {
            match work {
                Work::Create { .. } => unreachable!("creates were taken above"),
                Work::Jobs { partition, ids, op, stale, reply } => self.job_ops(partition, ids, op, stale, reply),
                Work::Members { command, reply } => self.change_members(command, reply),
                Work::Scan { scan: Scan::PurgeDeadLetters, reply } => self.purge_dead_letters(reply),
                Work::Scan { scan, reply } => {
                    let now_ms = self.turn_ms;
                    let values = self
                        .replicas
                        .iter_mut()
                        .filter(|(_, replica)| scan_covers(&scan, replica))
                        .map(|(partition, replica)| scan_one(*partition, replica, &scan, now_ms));
                    let _ = reply.send(values.collect());
                }
            }
            self.publish_live_jobs();
        }
    }

    /// One operation on some jobs of a partition: commands are proposed together (one log
    /// write) on the leader; reads are linearizable (confirmed with the leader) on any replica.
    pub(super) fn job_ops(
        &mut self,
        partition: u32,
        ids: Vec<String>,
        op: JobOp,
        stale: bool,
        reply: oneshot::Sender<Vec<Answer>>,
    ) {
        let Some(replica) = self.replicas.get_mut(&partition) else {
            let _ = reply.send(ids.iter().map(|_| misrouted(partition)).collect());
            return;
        };
        let now = self.turn_ms;
        let commands: Vec<_> = ids.iter().filter_map(|id| ops::job_command(id, op, now)).collect();
        let answers = vec![None; ids.len()];
        if commands.is_empty() && stale {
            let _ = reply.send(ids.iter().map(|id| ops::read_answer(replica.state(), id, op, now)).collect());
            return;
        }
        if commands.is_empty() {
            // One linearizable read confirms them all.
            match replica.read() {
                Ok(ticket) => {
                    let key = self.next_waiting;
                    self.next_waiting += 1;
                    let count = ids.len();
                    self.tickets.insert(
                        (partition, ticket),
                        TicketUse { waiting: key, slot: 0, kind: AnswerKind::Read { ids, op } },
                    );
                    self.waiting.insert(key, Waiting { answers, missing: count, reply: Reply::Answers(reply) });
                }
                Err(refused) => {
                    let answer = match refused {
                        sundial_consensus::ProposeError::NotLeader { leader } => ops::not_leader(partition, leader),
                        other => ops::Refusal::Overloaded.answer(other.to_string()),
                    };
                    let _ = reply.send(ids.iter().map(|_| answer.clone()).collect());
                }
            }
            return;
        }
        if let Some(leader) = replica.not_accepting() {
            let answer = ops::not_leader(partition, leader);
            let _ = reply.send(ids.iter().map(|_| answer.clone()).collect());
            return;
        }
        if let Some(reason) = replica.backlog_refusal() {
            let answer = ops::Refusal::Overloaded.answer(reason);
            let _ = reply.send(ids.iter().map(|_| answer.clone()).collect());
            return;
        }
        let started = Instant::now();
        let tickets = replica.propose(commands);
        self.metrics.applied(started.elapsed());
        let pending = ids
            .into_iter()
            .zip(tickets)
            .enumerate()
            .map(|(slot, (id, ticket))| (slot, ticket, AnswerKind::Command { id, op }))
            .collect();
        self.wait_for(partition, answers, pending, Reply::Answers(reply));
    }

    /// `DELETE /dlq` on the partitions this shard leads: one purge command each.
    pub(super) fn purge_dead_letters(&mut self, reply: oneshot::Sender<Vec<Value>>) {
        let leading: Vec<u32> = self.replicas.iter().filter(|(_, r)| r.is_leader()).map(|(p, _)| *p).collect();
        if leading.is_empty() {
            let _ = reply.send(Vec::new());
            return;
        }
        let key = self.next_waiting;
        self.next_waiting += 1;
        let mut answers = vec![None; leading.len()];
        let mut missing = 0;
        for (slot, partition) in leading.iter().enumerate() {
            let replica = self.replicas.get_mut(partition).expect("listed above");
            match replica.propose(vec![sundial_engine::state::Command::Purge { id: None }]).pop() {
                Some(Ok(ticket)) => {
                    missing += 1;
                    self.tickets
                        .insert((*partition, ticket), TicketUse { waiting: key, slot, kind: AnswerKind::Purged });
                }
                Some(Err(refused)) => answers[slot] = Some(ops::apply_error(refused)),
                None => answers[slot] = Some(lost()),
            }
        }
        if missing == 0 {
            self.send_reply(Reply::Values(reply), answers.into_iter().map(|a| a.unwrap_or_else(lost)).collect());
        } else {
            self.waiting.insert(key, Waiting { answers, missing, reply: Reply::Values(reply) });
        }
    }

    /// Creates the jobs of several requests for one partition with one log write; each
    /// request is answered once all its creates are applied.
    pub(super) fn create(&mut self, partition: u32, requests: Vec<CreateRequest>) {
        let Some(replica) = self.replicas.get_mut(&partition) else {
            for (specs, _, _, _, reply) in requests {
                let _ = reply.send(specs.iter().map(|_| misrouted(partition)).collect());
            }
            return;
        };
        let refused = match replica.not_accepting() {
            Some(leader) => Some(ops::not_leader(partition, leader)),
            None => replica.backlog_refusal().map(|reason| ops::Refusal::Overloaded.answer(reason)),
        };
        if let Some(answer) = refused {
            for (specs, _, _, _, reply) in requests {
                let _ = reply.send(specs.iter().map(|_| answer.clone()).collect());
            }
            return;
        }
        // Every shard's live jobs as last published (this shard's after its last turn or
        // request): shards admitting at the same moment may overshoot by one batch each.
        let live = self.config.live.total() as usize;
        let mut room = self.config.max_jobs.saturating_sub(live);
        let memory_full = ops::memory_full(self.config.max_memory_bytes);
        let started = Instant::now();
        let started_ms = self.turn_ms;
        let mut plans = Vec::with_capacity(requests.len());
        let mut commands = Vec::new();
        for (specs, now_ms, mode, representation, reply) in requests {
            let traces: Vec<(String, String)> = specs
                .iter()
                .filter_map(|spec| spec.trace.as_ref().map(|t| (t.trace_id.clone(), t.span_id.clone())))
                .collect();
            let how = ops::CreateHow {
                mode,
                dedup_window_ms: self.config.dedup_window_ms,
                max_jobs: self.config.max_jobs,
                room,
                memory_full: memory_full.clone(),
            };
            let mut plan = ops::plan_creates(replica.state(), specs, now_ms, how);
            room = room.saturating_sub(plan.commands.len());
            commands.append(&mut plan.commands);
            plans.push((plan, traces, representation, reply));
        }
        // Proposed together: one log write (group commit) for every request of the turn.
        let mut tickets = replica.propose(commands).into_iter();
        self.metrics.applied(started.elapsed());
        for (plan, traces, representation, reply) in plans {
            let pending = plan
                .waiting
                .into_iter()
                .map(|(slot, id)| {
                    let ticket = tickets.next().unwrap_or_else(|| Err(ApplyError::Unavailable("not proposed".into())));
                    (slot, ticket, AnswerKind::Create { id, representation })
                })
                .collect();
            let commit = CommitSpan { partition, started_ms, traces };
            self.wait_for(partition, plan.answers, pending, Reply::Created(reply, commit));
        }
        self.publish_live_jobs();
    }
}

/// A slot nothing answered (never expected: every ticket is resolved or abandoned).
pub(super) fn lost() -> Answer {
    ops::retry_later(503, "unavailable", "the request's outcome was lost; retry it", 1)
}

fn misrouted(partition: u32) -> Answer {
    ops::retry_later(503, "unavailable", format!("partition {partition} is not served by this shard"), 1)
}
