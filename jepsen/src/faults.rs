//! Carries out the nemesis plan on a running cluster: opens each window's fault, heals it at
//! the window's end, and records both in the history (invoke when it starts, ok when healed,
//! with what was done — which node was the busiest leader, which segment was torn).

use crate::cluster::Cluster;
use crate::firewall::Firewall;
use crate::history::{Call, Event, Kind, Recorder};
use crate::nemesis::{Fault, Window};
use crate::rng::Rng;
use serde_json::{json, Value};

/// What a window did, to be undone at its end.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    process: &'static str,
    killed: Vec<u8>,
    paused: Vec<u8>,
    partitioned: bool,
    clock: Option<u8>,
}

pub struct Nemesis {
    pub firewall: Option<Firewall>,
    rng: Rng,
    recorder: Recorder,
}

/// The history's process for a window: each timeline is one process, so its invocations and
/// heals pair up even where the two timelines overlap.
fn process_of(window: &Window) -> &'static str {
    if crate::nemesis::on_clock_timeline(window) {
        "nemesis-clock"
    } else {
        "nemesis"
    }
}

fn event(process: &str, kind: Kind, value: Value, error: Option<String>) -> Event {
    Event {
        index: 0,
        process: process.into(),
        kind,
        f: Call::Nemesis,
        job: String::new(),
        node: 0,
        time_us: crate::now_us(),
        value,
        error,
    }
}

impl Nemesis {
    pub fn new(firewall: Option<Firewall>, seed: u64, recorder: Recorder) -> Nemesis {
        Nemesis { firewall, rng: Rng::new(seed).fork(0x544f524e), recorder }
    }

    /// Opens `window`'s fault. Errors (nft refused a rule, a segment could not be torn) are
    /// recorded and end the run: a fault that was not injected must not pass as survived.
    pub async fn open(&mut self, cluster: &mut Cluster, window: &Window) -> Result<Applied, String> {
        let mut applied = Applied { process: process_of(window), ..Applied::default() };
        let mut detail = serde_json::to_value(window).unwrap_or(Value::Null);
        let outcome = match &window.fault {
            Fault::Kill { nodes } => {
                for &id in nodes {
                    cluster.kill(id);
                    applied.killed.push(id);
                }
                Ok(())
            }
            Fault::KillBusiestLeader | Fault::PauseBusiestLeader => {
                // No node answering as a leader (all electing) still gets a fault: a random node.
                let id = match cluster.busiest_leader().await {
                    Some(id) => id,
                    None => {
                        detail["no_leader_answered"] = json!(true);
                        self.rng.between(1, cluster.nodes.len() as u64) as u8
                    }
                };
                detail["target"] = json!(id);
                if matches!(window.fault, Fault::KillBusiestLeader) {
                    cluster.kill(id);
                    applied.killed.push(id);
                } else {
                    cluster.pause(id);
                    applied.paused.push(id);
                }
                Ok(())
            }
            Fault::Pause { nodes } => {
                for &id in nodes {
                    cluster.pause(id);
                    applied.paused.push(id);
                }
                Ok(())
            }
            Fault::Partition { blocked, .. } => match &self.firewall {
                Some(firewall) => {
                    let pairs: Vec<_> =
                        blocked.iter().map(|&(a, b)| (cluster.node(a).ip, cluster.node(b).ip)).collect();
                    applied.partitioned = true;
                    firewall.block(&pairs)
                }
                None => Err("a partition was planned without a firewall".into()),
            },
            Fault::Clock { node, offset_ms } => {
                applied.clock = Some(*node);
                cluster.set_clock(*node, *offset_ms)
            }
            Fault::Torn { node, mode } => {
                cluster.kill(*node);
                applied.killed.push(*node);
                let data = cluster.node(*node).data().to_path_buf();
                crate::torn::tear(&data, *mode, &mut self.rng).map(|done| {
                    detail["torn"] = json!(done);
                })
            }
        };
        self.recorder.record(event(applied.process, Kind::Invoke, detail, outcome.clone().err()));
        outcome.map(|()| applied)
    }

    /// Heals what `open` did: restarts killed nodes, resumes paused ones, lifts partitions,
    /// resets the clock.
    pub fn heal(&mut self, cluster: &mut Cluster, applied: Applied) -> Result<(), String> {
        let mut errors = Vec::new();
        for id in &applied.paused {
            cluster.resume(*id);
        }
        for id in &applied.killed {
            if let Err(e) = cluster.restart(*id) {
                errors.push(e);
            }
        }
        if applied.partitioned {
            if let Some(firewall) = &self.firewall {
                if let Err(e) = firewall.heal() {
                    errors.push(e);
                }
            }
        }
        if let Some(id) = applied.clock {
            if let Err(e) = cluster.set_clock(id, 0) {
                errors.push(e);
            }
        }
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        self.recorder.record(event(applied.process, Kind::Ok, json!({"healed": true}), error.clone()));
        error.map_or(Ok(()), Err)
    }
}
