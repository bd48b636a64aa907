//! G6: are the status reads, creates and cancels of each job linearizable? A WGL-style search
//! (Wing & Gong, with Lowe's memo of visited configurations) per job — jobs are independent
//! registers, so the history splits by job (P-compositionality) and each part stays small.
//!
//! The model: a job is absent, then pending; the scheduler may move it on its own at any
//! moment, as the engine's state machine does — a one-time job pending → in progress →
//! completed, failed or timeout (or pending → failed when its fire was missed), never back;
//! a cron job pending ⇄ in progress, and completed after its last fire — and only an
//! acknowledged cancel makes it cancelled. Because of those spontaneous moves the model's
//! state is the *set* of states the job could be in, closed under them, which keeps the
//! model deterministic for the search. Operations with unknown outcome may take effect at
//! any time after their invocation, or never.

use crate::history::{Call, Kind, Operation};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// Operations per job the search accepts (its visited set is keyed by a 64-bit mask).
pub const OPS_PER_JOB_MAX: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum JobState {
    Absent = 0,
    Pending,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    Timeout,
}

impl JobState {
    pub fn parse(status: &str) -> Option<JobState> {
        Some(match status {
            "absent" => JobState::Absent,
            "pending" => JobState::Pending,
            "in_progress" => JobState::InProgress,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            "timeout" => JobState::Timeout,
            _ => return None,
        })
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

type States = u8;
const LIVE: States = (1 << JobState::Pending as u8) | (1 << JobState::InProgress as u8);
const FINAL: States = (1 << JobState::Completed as u8)
    | (1 << JobState::Failed as u8)
    | (1 << JobState::Cancelled as u8)
    | (1 << JobState::Timeout as u8);
const ENDED_ONCE: States =
    (1 << JobState::Completed as u8) | (1 << JobState::Failed as u8) | (1 << JobState::Timeout as u8);

/// What an operation did, as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Create,
    Cancel,
    /// A cancel answered 404: the job did not exist.
    CancelAbsent,
    /// A cancel answered 409: the job had already ended.
    CancelFinal,
    Read(JobState),
}

/// The states the scheduler can move a job to on its own from `states` (engine/src/state.rs:
/// `fire_started` and `attempt_finished`).
fn closure(states: States, cron: bool) -> States {
    let has = |state: JobState| states & state.bit() != 0;
    let mut closed = states;
    if cron {
        if states & LIVE != 0 {
            closed |= LIVE | JobState::Completed.bit();
        }
    } else {
        if has(JobState::Pending) {
            closed |= JobState::InProgress.bit() | JobState::Failed.bit();
        }
        if closed & JobState::InProgress.bit() != 0 {
            closed |= ENDED_ONCE;
        }
    }
    closed
}

/// The model's transition; `None` when `step` is impossible from every state in `states`.
pub fn apply(states: States, step: Step, cron: bool) -> Option<States> {
    let states = closure(states, cron);
    let next = match step {
        Step::Create if states & JobState::Absent.bit() != 0 => {
            (states & !JobState::Absent.bit()) | JobState::Pending.bit()
        }
        // A create of an existing job answers "already exists" and changes nothing.
        Step::Create => states,
        Step::Cancel if states & LIVE != 0 => JobState::Cancelled.bit(),
        Step::Cancel => 0,
        Step::CancelAbsent => states & JobState::Absent.bit(),
        Step::CancelFinal => states & FINAL,
        Step::Read(seen) => states & seen.bit(),
    };
    (next != 0).then_some(next)
}

/// One operation of one job, ready for the search.
#[derive(Clone, Debug, PartialEq)]
pub struct JobOp {
    pub step: Step,
    pub invoke_us: u64,
    /// `None`: unknown outcome — it may take effect at any time after invocation, or never.
    pub complete_us: Option<u64>,
    pub process: String,
}

/// The model's view of a history operation; `None` for what the model ignores (failed
/// reads, creates refused with a definite error, nemesis windows).
pub fn to_job_op(operation: &Operation) -> Option<JobOp> {
    let definite = matches!(operation.outcome, Kind::Ok | Kind::Fail);
    let complete_us = if definite { operation.complete_us } else { None };
    let step = match (operation.f, operation.outcome) {
        (Call::Create | Call::CreateCron, Kind::Ok | Kind::Info) => Step::Create,
        (Call::Cancel, Kind::Ok | Kind::Info) => Step::Cancel,
        (Call::Cancel, Kind::Fail) => match operation.result.as_str() {
            Some("absent") => Step::CancelAbsent,
            Some("final") => Step::CancelFinal,
            _ => return None,
        },
        (Call::Read, Kind::Ok) => Step::Read(JobState::parse(operation.result.as_str()?)?),
        _ => return None,
    };
    Some(JobOp { step, invoke_us: operation.invoke_us, complete_us, process: operation.process.clone() })
}

/// Whether one job's operations have a linearization (its witness is not kept); `cron` says
/// which of the scheduler's paths the job follows.
pub fn linearizable(ops: &[JobOp], cron: bool) -> Result<bool, String> {
    if ops.len() > OPS_PER_JOB_MAX {
        return Err(format!("{} operations on one job; the checker takes at most {OPS_PER_JOB_MAX}", ops.len()));
    }
    let required: u64 =
        ops.iter().enumerate().filter(|(_, op)| op.complete_us.is_some()).fold(0, |m, (i, _)| m | 1 << i);
    let mut visited = HashSet::new();
    Ok(search(ops, cron, required, 0, JobState::Absent.bit(), &mut visited))
}

/// Depth-first: linearize next any pending operation invoked before the earliest completion
/// of the pending ones (one that completed earlier must come first).
fn search(
    ops: &[JobOp],
    cron: bool,
    required: u64,
    done: u64,
    states: States,
    visited: &mut HashSet<(u64, States)>,
) -> bool {
    if done & required == required {
        return true;
    }
    if !visited.insert((done, states)) {
        return false;
    }
    let pending = |i: usize| done & (1 << i) == 0;
    let horizon = (0..ops.len()).filter(|&i| pending(i)).filter_map(|i| ops[i].complete_us).min().unwrap_or(u64::MAX);
    for i in (0..ops.len()).filter(|&i| pending(i)) {
        if ops[i].invoke_us > horizon {
            continue;
        }
        if let Some(next) = apply(states, ops[i].step, cron) {
            if search(ops, cron, required, done | 1 << i, next, visited) {
                return true;
            }
        }
    }
    false
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    pub jobs_checked: usize,
    pub operations_checked: usize,
    /// Jobs whose history has no linearization, with their operations (at most 10 listed).
    pub failures: Vec<String>,
    pub failed_jobs: usize,
    /// Jobs the search could not take (too many operations): the verdict is then not valid.
    pub unchecked: Vec<String>,
}

impl Verdict {
    pub fn valid(&self) -> bool {
        self.failed_jobs == 0 && self.unchecked.is_empty()
    }
}

/// Checks every job of a history.
pub fn check(operations: &[Operation]) -> Verdict {
    let mut by_job: BTreeMap<&str, Vec<JobOp>> = BTreeMap::new();
    let mut cron_jobs: HashSet<&str> = HashSet::new();
    for operation in operations {
        if operation.f == Call::CreateCron {
            cron_jobs.insert(&operation.job);
        }
        if let Some(op) = to_job_op(operation) {
            by_job.entry(&operation.job).or_default().push(op);
        }
    }
    let mut verdict = Verdict { jobs_checked: by_job.len(), ..Verdict::default() };
    for (job, ops) in by_job {
        verdict.operations_checked += ops.len();
        match linearizable(&ops, cron_jobs.contains(job)) {
            Ok(true) => {}
            Ok(false) => {
                verdict.failed_jobs += 1;
                if verdict.failures.len() < 10 {
                    verdict.failures.push(format!("{job}: {}", describe(&ops)));
                }
            }
            Err(reason) => verdict.unchecked.push(format!("{job}: {reason}")),
        }
    }
    verdict
}

fn describe(ops: &[JobOp]) -> String {
    let parts: Vec<String> = ops
        .iter()
        .map(|op| {
            let end = op.complete_us.map(|c| c.to_string()).unwrap_or_else(|| "?".into());
            format!("{} {:?} [{}, {end}]", op.process, op.step, op.invoke_us)
        })
        .collect();
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;

    fn op(step: Step, invoke_us: u64, complete_us: Option<u64>) -> JobOp {
        JobOp { step, invoke_us, complete_us, process: "c".into() }
    }

    fn ok(step: Step, invoke_us: u64, complete_us: u64) -> JobOp {
        op(step, invoke_us, Some(complete_us))
    }

    fn holds(ops: &[JobOp]) -> bool {
        linearizable(ops, false).unwrap()
    }

    fn holds_cron(ops: &[JobOp]) -> bool {
        linearizable(ops, true).unwrap()
    }

    #[test]
    fn sequential_and_concurrent_histories_that_are_linearizable_pass() {
        // Create, reads as the scheduler moves the job on, a final read.
        assert!(holds(&[
            ok(Step::Create, 0, 10),
            ok(Step::Read(Pending), 20, 30),
            ok(Step::Read(InProgress), 40, 50),
            ok(Step::Read(Completed), 60, 70),
        ]));
        // A read concurrent with the cancel may see either side of it.
        let around_cancel = |seen| [ok(Step::Create, 0, 10), ok(Step::Cancel, 20, 40), ok(Step::Read(seen), 25, 35)];
        assert!(holds(&around_cancel(Pending)));
        assert!(holds(&around_cancel(Cancelled)));
        // A read concurrent with the create may see it absent or present.
        assert!(holds(&[ok(Step::Create, 0, 30), ok(Step::Read(Absent), 10, 20)]));
        assert!(holds(&[ok(Step::Create, 0, 30), ok(Step::Read(Pending), 10, 20)]));
        // An unknown create may have happened later, or never.
        assert!(holds(&[op(Step::Create, 0, None), ok(Step::Read(Absent), 10, 20), ok(Step::Read(Pending), 30, 40)]));
        assert!(holds(&[op(Step::Create, 0, None), ok(Step::Read(Absent), 10, 20)]));
        // A cancel refused because the job had ended, after it completed.
        assert!(holds(&[ok(Step::Create, 0, 10), ok(Step::Read(Completed), 20, 30), ok(Step::CancelFinal, 40, 50)]));
        // An unknown cancel: reads may see it taken or not, as long as they agree in time.
        assert!(holds(&[
            ok(Step::Create, 0, 10),
            op(Step::Cancel, 20, None),
            ok(Step::Read(Pending), 30, 40),
            ok(Step::Read(Cancelled), 50, 60),
        ]));
    }

    #[test]
    fn known_bad_histories_are_caught() {
        // A stale read: the cancel was acknowledged, a later read still sees the job pending.
        assert!(!holds(&[ok(Step::Create, 0, 10), ok(Step::Cancel, 20, 30), ok(Step::Read(Pending), 40, 50)]));
        // A lost create: acknowledged, then read as absent.
        assert!(!holds(&[ok(Step::Create, 0, 10), ok(Step::Read(Absent), 20, 30)]));
        // Time going backwards: completed, then pending again.
        assert!(!holds(&[ok(Step::Create, 0, 10), ok(Step::Read(Completed), 20, 30), ok(Step::Read(Pending), 40, 50)]));
        // Present, then absent, even with the create's outcome unknown.
        assert!(!holds(&[op(Step::Create, 0, None), ok(Step::Read(Pending), 10, 20), ok(Step::Read(Absent), 30, 40)]));
        // A one-time job never goes back from in progress to pending (a retry stays in progress).
        assert!(!holds(&[
            ok(Step::Create, 0, 10),
            ok(Step::Read(InProgress), 20, 30),
            ok(Step::Read(Pending), 40, 50)
        ]));
        // A cron job never fails or times out: a fire ends in the dead-letter queue, the job goes on.
        assert!(!holds_cron(&[ok(Step::Create, 0, 10), ok(Step::Read(Failed), 20, 30)]));
        // Cron jobs do go back to pending between fires, and complete after the last one.
        assert!(holds_cron(&[
            ok(Step::Create, 0, 10),
            ok(Step::Read(InProgress), 20, 30),
            ok(Step::Read(Pending), 40, 50),
            ok(Step::Read(Completed), 60, 70),
        ]));
        assert!(!holds_cron(&[
            ok(Step::Create, 0, 10),
            ok(Step::Read(Completed), 20, 30),
            ok(Step::Read(Pending), 40, 50)
        ]));
        // Cancelled without any cancel.
        assert!(!holds(&[ok(Step::Create, 0, 10), ok(Step::Read(Cancelled), 20, 30)]));
        // An acknowledged cancel of a job that had already completed.
        assert!(!holds(&[ok(Step::Create, 0, 10), ok(Step::Read(Completed), 20, 30), ok(Step::Cancel, 40, 50)]));
        // A cancel answered "not found" after an acknowledged create.
        assert!(!holds(&[ok(Step::Create, 0, 10), ok(Step::CancelAbsent, 20, 30)]));
        // Two reads that disagree about a cancel after both of them saw it.
        assert!(!holds(&[
            ok(Step::Create, 0, 10),
            op(Step::Cancel, 20, None),
            ok(Step::Read(Cancelled), 30, 40),
            ok(Step::Read(Pending), 50, 60),
        ]));
    }

    #[test]
    fn the_history_is_split_by_job_and_failures_are_named() {
        use crate::history::Operation;
        use serde_json::{json, Value};
        let operation = |job: &str, f, outcome, invoke_us, complete_us, result: Value| Operation {
            process: "c1".into(),
            f,
            job: job.into(),
            node: 1,
            invoke_us,
            complete_us: Some(complete_us),
            outcome,
            argument: Value::Null,
            result,
            error: None,
        };
        let history = vec![
            operation("good", Call::Create, Kind::Ok, 0, 10, Value::Null),
            operation("bad", Call::Create, Kind::Ok, 0, 10, Value::Null),
            operation("good", Call::Read, Kind::Ok, 20, 30, json!("pending")),
            operation("bad", Call::Read, Kind::Ok, 20, 30, json!("absent")),
            operation("bad", Call::Read, Kind::Fail, 40, 50, Value::Null),
        ];
        let verdict = check(&history);
        assert_eq!((verdict.jobs_checked, verdict.operations_checked, verdict.failed_jobs), (2, 4, 1));
        assert!(!verdict.valid());
        assert!(verdict.failures[0].starts_with("bad:"), "{:?}", verdict.failures);
        let too_many: Vec<JobOp> = (0..65).map(|i| ok(Step::Read(Absent), i, i + 1)).collect();
        assert!(linearizable(&too_many, false).is_err());
    }
}
