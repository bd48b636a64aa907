//! The history of a run: every client operation's invocation and completion (ok, fail, or
//! info when its outcome is unknown) and every nemesis window, one JSON object per line in
//! `history.jsonl`, in the order they happened, as Jepsen records them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// What an operation was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// Create a one-time job (`value.run_at_ms`).
    Create,
    /// Create a cron job (`value.every_s`, `value.end_ms`).
    CreateCron,
    Cancel,
    /// Read a job's status through a node (linearizable by default).
    Read,
    /// A nemesis window: invoke when the fault starts, ok when it is healed.
    Nemesis,
}

/// Jepsen's event types: an invocation, then ok, fail (definitely did not happen) or info
/// (may or may not have happened).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Invoke,
    Ok,
    Fail,
    Info,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub index: u64,
    /// `c<k>` for client k, `nemesis` for faults.
    pub process: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub f: Call,
    /// The job (empty for nemesis events).
    #[serde(default)]
    pub job: String,
    /// The node the request went to (0 for none).
    #[serde(default)]
    pub node: u8,
    /// Harness wall clock, µs since the epoch.
    pub time_us: u64,
    /// The call's argument on invoke; what was read or answered on completion.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub value: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Events recorded at most; a run past it stops its workload (a bound, not a silent drop).
pub const EVENTS_MAX: usize = 2_000_000;

/// The shared, bounded recorder the clients and the nemesis append to.
#[derive(Clone, Default)]
pub struct Recorder {
    events: Arc<Mutex<Vec<Event>>>,
}

impl Recorder {
    /// Appends an event, stamping its index; false when the history is full.
    pub fn record(&self, mut event: Event) -> bool {
        let Ok(mut events) = self.events.lock() else { return false };
        if events.len() >= EVENTS_MAX {
            return false;
        }
        event.index = events.len() as u64;
        events.push(event);
        true
    }

    pub fn snapshot(&self) -> Vec<Event> {
        self.events.lock().map(|events| events.clone()).unwrap_or_default()
    }
}

pub fn write_jsonl(path: &std::path::Path, events: &[Event]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for event in events {
        serde_json::to_writer(&mut out, event)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

pub fn read_jsonl(path: &std::path::Path) -> Result<Vec<Event>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), n + 1)))
        .collect()
}

/// One operation: an invocation paired with its completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    pub process: String,
    pub f: Call,
    pub job: String,
    pub node: u8,
    pub invoke_us: u64,
    /// `None`: no completion was recorded (the run ended first) — treated as info.
    pub complete_us: Option<u64>,
    pub outcome: Kind,
    pub argument: Value,
    pub result: Value,
    pub error: Option<String>,
}

/// Pairs each process's invocations with their completions (a process has at most one
/// operation open at a time, as in Jepsen).
pub fn operations(events: &[Event]) -> Vec<Operation> {
    let mut open: std::collections::HashMap<&str, Operation> = Default::default();
    let mut done = Vec::new();
    for event in events {
        match event.kind {
            Kind::Invoke => {
                let operation = Operation {
                    process: event.process.clone(),
                    f: event.f,
                    job: event.job.clone(),
                    node: event.node,
                    invoke_us: event.time_us,
                    complete_us: None,
                    outcome: Kind::Info,
                    argument: event.value.clone(),
                    result: Value::Null,
                    error: None,
                };
                if let Some(unfinished) = open.insert(&event.process, operation) {
                    done.push(unfinished);
                }
            }
            kind => {
                if let Some(mut operation) = open.remove(event.process.as_str()) {
                    operation.complete_us = Some(event.time_us);
                    operation.outcome = kind;
                    operation.result = event.value.clone();
                    operation.error = event.error.clone();
                    done.push(operation);
                }
            }
        }
    }
    done.extend(open.into_values());
    done.sort_by_key(|operation| operation.invoke_us);
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(process: &str, kind: Kind, f: Call, time_us: u64, value: Value) -> Event {
        Event { index: 0, process: process.into(), kind, f, job: "j".into(), node: 1, time_us, value, error: None }
    }

    #[test]
    fn invocations_pair_with_their_completions_and_the_file_round_trips() {
        let events = vec![
            event("c1", Kind::Invoke, Call::Create, 10, json!({"run_at_ms": 5})),
            event("c2", Kind::Invoke, Call::Read, 11, Value::Null),
            event("c2", Kind::Ok, Call::Read, 12, json!("pending")),
            event("c1", Kind::Info, Call::Create, 20, Value::Null),
            event("c1", Kind::Invoke, Call::Cancel, 30, Value::Null),
        ];
        let ops = operations(&events);
        assert_eq!(ops.len(), 3);
        assert_eq!((ops[0].f, ops[0].outcome, ops[0].complete_us), (Call::Create, Kind::Info, Some(20)));
        assert_eq!((ops[1].f, ops[1].result.clone()), (Call::Read, json!("pending")));
        assert_eq!((ops[2].f, ops[2].complete_us), (Call::Cancel, None));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        write_jsonl(&path, &events).unwrap();
        assert_eq!(read_jsonl(&path).unwrap(), events);
        std::fs::write(&path, "{not json}\n").unwrap();
        assert!(read_jsonl(&path).unwrap_err().contains(":1:"));
    }
}
