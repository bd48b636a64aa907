//! The command line: `sundial-jepsen run …`, `check DIR`, `clean`. Every bad value is
//! refused with the flag's name and the rule it broke.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "sundial-jepsen",
    version,
    about = "Fault injection against a local Sundial cluster, with a checked verdict"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a cluster on loopback, run the workload under the nemeses, check the history.
    /// Exit 0: every property held; 1: a property failed; 2: the run could not be made.
    Run(Box<RunArgs>),
    /// Check a stored run again (its history.jsonl, deliveries.jsonl and results.json).
    Check {
        /// The run's directory.
        dir: PathBuf,
    },
    /// Remove nftables tables left by runs that were killed before they could clean up.
    Clean,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Cluster members: 3 or 5.
    #[arg(long, default_value_t = 3)]
    pub nodes: u8,
    /// How long the workload runs (e.g. 60s, 2m); the nemesis stops a quiet stretch before the end.
    #[arg(long, default_value = "60s")]
    pub time: String,
    /// Faults to mix, comma-separated: kill, pause, partition, clock, torn (or none).
    #[arg(long, default_value = "kill,partition")]
    pub nemesis: String,
    /// Client operations per second, all clients together.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Seed for every random choice (plan, targets, workload) [default: the time].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 10)]
    pub concurrency: u64,
    /// Partitions of the cluster.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// The `sundial` binary [default: next to this one, else target/release or target/debug].
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Where run directories are made.
    #[arg(long, default_value = "jepsen-runs")]
    pub out: PathBuf,
    /// After the last fault heals, creates must be acknowledged again, and owed fires arrive, within this.
    #[arg(long, default_value = "20s")]
    pub recovery_bound: String,
    /// Largest clock offset the clock nemesis sets (the early-delivery margin it implies).
    #[arg(long, default_value = "2s")]
    pub clock_offset_max: String,
    /// Client request timeout; a request without an answer by then has an unknown outcome.
    #[arg(long, default_value = "3s")]
    pub timeout: String,
    /// Longest wait after the workload for owed fires to arrive.
    #[arg(long, default_value = "60s")]
    pub drain: String,
    /// Node i listens on 127.0.0.<base + i>.
    #[arg(long, default_value_t = 10)]
    pub address_base: u8,
    /// Share of webhook attempts the receiver answers 500 (jobs retry up to 10 times).
    #[arg(long, default_value_t = 0.1)]
    pub receiver_fail_rate: f64,
    /// Keep the nodes' data directories of a passing run (a failing run always keeps them).
    #[arg(long)]
    pub keep_data: bool,
}

/// Limits on what a run may ask for.
pub const TIME_MAX_MS: u64 = 24 * 3600 * 1000;
pub const RATE_MAX: u64 = 10_000;
pub const CONCURRENCY_MAX: u64 = 1_000;

/// Parses `120s`, `2m`, `500ms`, `1h` or a bare number of seconds into ms.
pub fn duration_ms(flag: &str, text: &str) -> Result<u64, String> {
    let text = text.trim();
    let rule = || format!("{flag}: {text:?} is not a duration like 500ms, 30s, 2m or 1h");
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| rule())?;
    let scale = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(rule()),
    };
    number.checked_mul(scale).ok_or_else(rule)
}

/// A run's settings, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    pub nodes: u8,
    pub run_ms: u64,
    pub kinds: Vec<String>,
    pub rate: u64,
    pub seed: u64,
    pub concurrency: u64,
    pub partitions: u32,
    pub recovery_bound_ms: u64,
    pub clock_offset_max_ms: u64,
    pub timeout_ms: u64,
    pub drain_ms: u64,
    pub receiver_fail_rate: f64,
}

impl RunArgs {
    pub fn settings(&self, default_seed: u64) -> Result<Settings, String> {
        if ![3, 5].contains(&self.nodes) {
            return Err(format!("--nodes: must be 3 or 5, not {}", self.nodes));
        }
        let run_ms = duration_ms("--time", &self.time)?;
        if !(20_000..=TIME_MAX_MS).contains(&run_ms) {
            return Err(format!("--time: must be within 20s..=24h, not {}", self.time));
        }
        if !(1..=RATE_MAX).contains(&self.rate) {
            return Err(format!("--rate: must be within 1..={RATE_MAX}"));
        }
        if !(1..=CONCURRENCY_MAX).contains(&self.concurrency) {
            return Err(format!("--concurrency: must be within 1..={CONCURRENCY_MAX}"));
        }
        if !(1..=64).contains(&self.partitions) {
            return Err("--partitions: must be within 1..=64".into());
        }
        if self.address_base == 0 || u16::from(self.address_base) + u16::from(self.nodes) > 254 {
            return Err("--address-base: node addresses must stay within 127.0.0.1..=127.0.0.254".into());
        }
        let clock_offset_max_ms = duration_ms("--clock-offset-max", &self.clock_offset_max)?;
        if clock_offset_max_ms > 60_000 {
            return Err("--clock-offset-max: must be at most 60s".into());
        }
        if !(0.0..=0.5).contains(&self.receiver_fail_rate) {
            return Err(
                "--receiver-fail-rate: must be within 0.0..=0.5 (jobs retry 10 times; more would dead-letter fires)"
                    .into(),
            );
        }
        let timeout_ms = duration_ms("--timeout", &self.timeout)?;
        if !(100..=60_000).contains(&timeout_ms) {
            return Err("--timeout: must be within 100ms..=60s".into());
        }
        Ok(Settings {
            nodes: self.nodes,
            run_ms,
            kinds: crate::nemesis::parse_kinds(&self.nemesis)?,
            rate: self.rate,
            seed: self.seed.unwrap_or(default_seed),
            concurrency: self.concurrency,
            partitions: self.partitions,
            recovery_bound_ms: duration_ms("--recovery-bound", &self.recovery_bound)?.max(1_000),
            clock_offset_max_ms,
            timeout_ms,
            drain_ms: duration_ms("--drain", &self.drain)?.min(3_600_000),
            receiver_fail_rate: self.receiver_fail_rate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Settings, String> {
        let mut argv = vec!["sundial-jepsen", "run"];
        argv.extend_from_slice(extra);
        let Command::Run(args) = Cli::try_parse_from(argv).map_err(|e| e.to_string())?.command else { unreachable!() };
        args.settings(42)
    }

    #[test]
    fn durations_and_limits_name_the_flag() {
        assert_eq!(duration_ms("--time", "120s").unwrap(), 120_000);
        assert_eq!(duration_ms("--time", "2m").unwrap(), 120_000);
        assert_eq!(duration_ms("--time", "500ms").unwrap(), 500);
        assert_eq!(duration_ms("--time", "30").unwrap(), 30_000);
        assert!(duration_ms("--time", "2 weeks").unwrap_err().starts_with("--time:"));
        assert!(duration_ms("--time", "99999999999999999999h").is_err());
        let settings = args(&[
            "--nodes",
            "5",
            "--time",
            "120s",
            "--nemesis",
            "partition,kill,pause,clock",
            "--rate",
            "200",
            "--seed",
            "7",
        ])
        .unwrap();
        assert_eq!((settings.nodes, settings.run_ms, settings.rate, settings.seed), (5, 120_000, 200, 7));
        assert_eq!(settings.kinds, ["partition", "kill", "pause", "clock"]);
        assert_eq!(args(&[]).unwrap().seed, 42);
        assert!(args(&["--nodes", "4"]).unwrap_err().starts_with("--nodes:"));
        assert!(args(&["--time", "5s"]).unwrap_err().starts_with("--time:"));
        assert!(args(&["--rate", "0"]).unwrap_err().starts_with("--rate:"));
        assert!(args(&["--nemesis", "meteor"]).unwrap_err().starts_with("--nemesis:"));
        assert!(args(&["--address-base", "253"]).unwrap_err().starts_with("--address-base:"));
        assert!(args(&["--receiver-fail-rate", "0.9"]).unwrap_err().starts_with("--receiver-fail-rate:"));
    }
}
