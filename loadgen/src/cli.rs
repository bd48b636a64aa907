//! The command line: scenarios, how load is applied (`Load`), what a fire run's sink does
//! (`FireArgs`), and the checks that name the flag a bad value breaks.

use crate::drive::{Driven, Plan};
use crate::report::table_json;
use crate::target::{Protocol, Target};
use clap::Parser;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Items per request at most (the node's batch limit).
pub const BATCH_MAX: usize = 1_000;
/// The longest run, seconds (30 days).
pub const SECONDS_MAX: u64 = 30 * 86_400;
/// How far in the future jobs may be due, seconds (ten years).
pub const DUE_IN_S_MAX: u64 = 10 * 365 * 86_400;

#[derive(Parser, Debug)]
#[command(
    name = "sundial-loadgen",
    version,
    about = "Load for Sundial, and the accounting that says whether it kept its contract under it",
    long_about = "Load for Sundial, and the accounting that says whether it kept its contract under it.\n\n\
Open loop by default: requests go at their intended times whatever happened before, and latency counts \
from the intended time, so a stall cannot hide (coordinated omission). --max switches to max throughput \
with a bounded window in flight. Exit status: 0 pass, 1 the run broke the contract, 2 it could not run."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(clap::Subcommand, Debug)]
pub enum Scenario {
    /// Creates of jobs due far in the future (nothing fires): create latency and acknowledged
    /// creates per second; a sample of acknowledged ids is read back at the end (any lost → exit 1).
    Ingest {
        #[command(flatten)]
        load: Load,
        /// Jobs are due this far in the future, seconds.
        #[arg(long, default_value_t = 3_600)]
        due_in_s: u64,
    },
    /// Jobs due shortly after creation, delivered to the built-in sink: create latency, fire
    /// lateness (arrival − due), deliveries per second, and whether every acknowledged job was
    /// delivered, none early, none repeated with another key, every signature good.
    Fire {
        #[command(flatten)]
        load: Load,
        #[command(flatten)]
        fire: FireArgs,
    },
    /// Creates, gets and cancels in a given mix (jobs due far in the future): latency per
    /// operation; a get or cancel of an acknowledged job answered 404 is a lost job (exit 1).
    Mixed {
        #[command(flatten)]
        load: Load,
        /// Relative weights of the operations.
        #[arg(long, default_value = "create=6,get=3,cancel=1")]
        mix: String,
        #[arg(long, default_value_t = 3_600)]
        due_in_s: u64,
    },
    /// A long steady `fire` run (10 minutes unless --seconds says otherwise) that also samples
    /// the target's resident memory (--pid) and reports latency drift (first vs last tenth).
    Soak {
        #[command(flatten)]
        load: Load,
        #[command(flatten)]
        fire: FireArgs,
        /// Process ids of the node(s) under test, for resident-memory samples (/proc/PID/status).
        #[arg(long, value_delimiter = ',')]
        pid: Vec<u32>,
        /// Seconds between memory samples.
        #[arg(long, default_value_t = 5)]
        sample_s: u64,
    },
    /// Creates at a multiple of what the target holds: its capacity is measured first (creates
    /// at max, 16 requests in flight) unless --capacity gives it, then creates go open loop at
    /// --factor × it (--rate and --max are not used). Counts each answer: accepted, refused (by
    /// code, each with its Retry-After), or unknown (no answer, or "outcome unknown"); latency of
    /// every answer; created per second against the capacity; a sample of acknowledged ids read
    /// back. Any unknown outcome, refusal without Retry-After or lost job → exit 1.
    Overload {
        #[command(flatten)]
        load: Load,
        /// The open-loop rate as a multiple of the capacity (1..=100).
        #[arg(long, default_value_t = 2.0)]
        factor: f64,
        /// The target's capacity, creates/s (default: measured first).
        #[arg(long)]
        capacity: Option<u64>,
        /// How long to measure the capacity, seconds.
        #[arg(long, default_value_t = 10)]
        measure_seconds: u64,
        #[arg(long, default_value_t = 3_600)]
        due_in_s: u64,
    },
    /// The references macro figures are divided by, measured on this machine now.
    Reference {
        #[command(subcommand)]
        what: ReferenceKind,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum ReferenceKind {
    /// Bare disk: pwrite of RECORD_BYTES × BATCH, then fdatasync, in a loop.
    Disk {
        /// Directory on the disk to measure (the node's data disk).
        #[arg(long, default_value = "/tmp")]
        dir: PathBuf,
        #[arg(long, default_value_t = 256)]
        record_bytes: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Bare loopback: HTTP/1.1 POSTs to the built-in sink on 127.0.0.1, one at a time per connection.
    Loopback {
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// How the load is applied (every scenario but `reference`).
#[derive(clap::Args, Debug)]
pub struct Load {
    /// Members to send to, comma-separated: binary-protocol addresses (--protocol binary) or
    /// HTTP addresses (--protocol http).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7070")]
    pub node: Vec<SocketAddr>,
    #[arg(long, value_enum, default_value_t = Protocol::Binary)]
    pub protocol: Protocol,
    /// Items (jobs, or operations) per second, open loop.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Max throughput instead of a rate: keep --window requests in flight.
    #[arg(long)]
    pub max: bool,
    /// Requests in flight in --max mode (1..=100000).
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Items per request (1..=1000): one frame, or one POST /jobs/batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Connections (1..=1024): binary connections per member, or HTTP connections in all.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// How long to send for, seconds (default 10; soak: 600).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write SVG plots into this directory (created if missing).
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Bearer token.
    #[arg(long, env = "SUNDIAL_TOKEN")]
    pub token: Option<String>,
    /// No live progress line (it is never drawn when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Ask for creates to be answered with ids only (the binary protocol's MINIMAL flag,
    /// HTTP's `Prefer: return=minimal`), as a bulk loader would; by default the node
    /// answers each create with the whole job.
    #[arg(long)]
    pub minimal_answers: bool,
}

#[derive(clap::Args, Debug)]
pub struct FireArgs {
    /// Each job is due this long after its intended creation time, ms.
    #[arg(long, default_value_t = 1_000)]
    pub due_after_ms: u64,
    /// Every job due at one instant (--due-after-ms after the last send): measures how fast
    /// a backlog is delivered.
    #[arg(long)]
    pub due_together: bool,
    /// Create all the jobs first, as fast as --window allows, due --rate per second from this
    /// long after the start: fire lateness at that rate with no creates running beside the
    /// fires. (--seconds × --rate jobs; creation must finish before the first is due.)
    #[arg(long)]
    pub schedule_ahead_ms: Option<u64>,
    /// Where the sink listens (the node must be allowed to call it: --allow-loopback-targets).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub sink: SocketAddr,
    /// After the last job is due, stop waiting once no delivery arrived for this long, seconds.
    #[arg(long, default_value_t = 30)]
    pub grace_seconds: u64,
    /// A delivery this much before its due time still counts as on time (clock granularity), ms.
    #[arg(long, default_value_t = 0)]
    pub early_margin_ms: u64,
    /// Share of attempts the sink answers 500 (0.0..=1.0), chosen by a hash of key and attempt.
    #[arg(long, default_value_t = 0.0)]
    pub sink_fail_rate: f64,
    /// Share of attempts the sink answers 429 with Retry-After (0.0..=1.0).
    #[arg(long = "sink-429-rate", default_value_t = 0.0)]
    pub sink_throttle_rate: f64,
    /// The Retry-After of those 429s, seconds.
    #[arg(long, default_value_t = 1)]
    pub sink_retry_after_s: u32,
    /// The sink waits this long before every answer, ms.
    #[arg(long, default_value_t = 0)]
    pub sink_delay_ms: u64,
    /// Sign every job with this secret and verify each delivery's signature in the sink.
    #[arg(long)]
    pub secret: Option<String>,
    /// Attempts per fire before the dead-letter queue (1..=100).
    #[arg(long, default_value_t = 10)]
    pub max_attempts: u32,
}

impl Load {
    /// The plan, or the flag and rule a value breaks.
    pub fn plan(&self, default_seconds: u64) -> Result<Plan, String> {
        if !(1..=BATCH_MAX).contains(&self.batch) {
            return Err(format!("--batch: must be within 1..={BATCH_MAX} (got {})", self.batch));
        }
        if !(1..=crate::target::HTTP_CONNECTIONS_MAX).contains(&self.connections) {
            return Err(format!("--connections: must be within 1..=1024 (got {})", self.connections));
        }
        if !(1..=crate::drive::IN_FLIGHT_MAX).contains(&self.window) {
            return Err(format!("--window: must be within 1..=100000 (got {})", self.window));
        }
        if !self.max && self.rate == 0 {
            return Err("--rate: must be at least 1 (or give --max)".into());
        }
        let seconds = self.seconds.unwrap_or(default_seconds);
        if !(1..=SECONDS_MAX).contains(&seconds) {
            return Err(format!("--seconds: must be within 1..={SECONDS_MAX} (30 days)"));
        }
        Ok(Plan {
            rate_per_s: if self.max { 0 } else { self.rate },
            window: self.window,
            batch: self.batch,
            duration: Duration::from_secs(seconds),
            requests_max: None,
            progress: !self.quiet,
        })
    }

    pub async fn target(&self) -> Result<Target, String> {
        Target::connect(self.protocol, &self.node, self.connections, self.token.clone(), self.minimal_answers).await
    }

    pub fn describe(&self, plan: &Plan) -> String {
        let mode = if plan.rate_per_s == 0 {
            format!("max throughput, {} requests in flight", plan.window)
        } else {
            format!("{}/s open loop", plan.rate_per_s)
        };
        format!(
            "{mode}, {} s, batch {}, {} connection(s), {:?} to {}",
            plan.duration.as_secs(),
            plan.batch,
            self.connections,
            self.protocol,
            self.node.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
        )
    }

    /// The fields every results file has.
    pub fn results(
        &self,
        scenario: &str,
        plan: &Plan,
        driven: &Driven,
        target: &Target,
    ) -> serde_json::Map<String, Value> {
        let examples: serde_json::Map<String, Value> =
            target.error_examples().into_iter().map(|(status, body)| (status.to_string(), json!(body))).collect();
        let ops: serde_json::Map<String, Value> = driven
            .ops
            .iter()
            .map(|(op, stats)| {
                let statuses: serde_json::Map<String, Value> =
                    stats.statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect();
                (op.to_string(), json!({"ok": stats.ok(), "failed": stats.failed(), "statuses": statuses, "latency_us": table_json(&stats.latencies)}))
            })
            .collect();
        let value = json!({
            "scenario": scenario,
            "protocol": format!("{:?}", self.protocol).to_lowercase(),
            "members": self.node.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "mode": if plan.rate_per_s == 0 { "max" } else { "open_loop" },
            "rate_per_s": plan.rate_per_s, "window": plan.window, "batch": plan.batch,
            "connections": self.connections, "seconds": plan.duration.as_secs(),
            "elapsed_s": driven.elapsed.as_secs_f64(), "requests": driven.requests,
            "ok_per_s": driven.ok_per_s(), "ops": ops, "error_examples": examples,
        });
        value.as_object().cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_load_settings_name_the_flag() {
        let load = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["sundial-loadgen", "ingest"][..], args].concat()).expect("parses");
            let Scenario::Ingest { load, .. } = cli.scenario else { unreachable!() };
            load.plan(10)
        };
        assert!(load(&["--batch", "0"]).unwrap_err().contains("--batch"));
        assert!(load(&["--batch", "1001"]).unwrap_err().contains("--batch"));
        assert!(load(&["--connections", "0"]).unwrap_err().contains("--connections"));
        assert!(load(&["--rate", "0"]).unwrap_err().contains("--rate"));
        assert_eq!(load(&["--rate", "0", "--max"]).unwrap().rate_per_s, 0);
        assert_eq!(load(&[]).unwrap().duration, Duration::from_secs(10));
    }
}
