//! `raft-sim`: runs the deterministic cluster simulator over seeds and prints, for each failure,
//! the options the seed expands to, the broken invariant, and the command that replays it.
//!
//! Usage: raft-sim [--seeds FROM..TO | --seed N]
//!                 [--bug commit-earlier-terms|vote-without-log-check|lease-without-quorum-contact]
//!                 [--threads T]
//!        raft-sim --bench BATCH   (CPU cost per committed entry, 3 nodes, no faults)

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use sundial_consensus::InjectedBug;
use sundial_consensus_sim::{run_seed, SimOptions};

const BUG_NAMES: &str = "--bug: commit-earlier-terms, vote-without-log-check or lease-without-quorum-contact";

struct Args {
    seeds: std::ops::Range<u64>,
    bug: Option<InjectedBug>,
    threads: usize,
}

fn parse() -> Result<Args, String> {
    let mut args = Args { seeds: 0..100, bug: None, threads: 2 };
    let mut rest = std::env::args().skip(1);
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seed" => {
                let seed: u64 = value.parse().map_err(|_| "--seed: must be a number")?;
                args.seeds = seed..seed + 1;
            }
            "--seeds" => {
                let (from, to) = value.split_once("..").ok_or("--seeds: expected FROM..TO")?;
                let from: u64 = from.parse().map_err(|_| "--seeds: FROM must be a number")?;
                let to: u64 = to.parse().map_err(|_| "--seeds: TO must be a number")?;
                if from >= to {
                    return Err("--seeds: FROM must be below TO".into());
                }
                args.seeds = from..to;
            }
            "--bug" => {
                args.bug = Some(match value.as_str() {
                    "commit-earlier-terms" => InjectedBug::CommitEarlierTermsByCounting,
                    "vote-without-log-check" => InjectedBug::VoteWithoutLogCheck,
                    "lease-without-quorum-contact" => InjectedBug::LeaseWithoutQuorumContact,
                    _ => return Err(BUG_NAMES.into()),
                })
            }
            "--threads" => {
                args.threads = value.parse().map_err(|_| "--threads: must be a number")?;
                if !(1..=64).contains(&args.threads) {
                    return Err("--threads: must be within 1..=64".into());
                }
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(args)
}

/// Commits 200k entries of 64 B, `batch` single proposals per simulated ms, and prints entries
/// per second of wall time on one thread.
fn bench(batch: usize) -> ExitCode {
    const ENTRIES: u64 = 200_000;
    let started = Instant::now();
    let simulation = sundial_consensus_sim::Simulation::new(sundial_consensus_sim::Simulation::benchmark_options());
    match simulation.run_commit_benchmark(ENTRIES, batch) {
        Ok((committed, simulated_ms)) => {
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "batch {batch}: {committed} entries committed on 3 nodes in {seconds:.2} s of wall time on one thread ({:.0} entries/s, {:.2} µs each; {simulated_ms} simulated ms)",
                committed as f64 / seconds,
                seconds * 1e6 / committed as f64
            );
            ExitCode::SUCCESS
        }
        Err(violation) => {
            println!("benchmark failed: {violation}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let mut raw = std::env::args().skip(1);
    if raw.next().as_deref() == Some("--bench") {
        return match raw.next().map(|b| b.parse::<usize>()) {
            Some(Ok(batch)) if (1..=100_000).contains(&batch) => bench(batch),
            _ => {
                eprintln!("raft-sim: --bench BATCH, with BATCH within 1..=100000");
                ExitCode::from(2)
            }
        };
    }
    let args = match parse() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("raft-sim: {error}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let next = AtomicU64::new(args.seeds.start);
    let failures = Mutex::new(Vec::new());
    let committed = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..args.threads {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= args.seeds.end {
                    break;
                }
                match run_seed(seed, args.bug) {
                    Ok(report) => {
                        committed.fetch_add(report.committed_entries, Ordering::Relaxed);
                    }
                    Err(violation) => failures.lock().expect("no panics hold it").push((seed, violation)),
                }
            });
        }
    });
    let mut failures = failures.into_inner().expect("no panics hold it");
    failures.sort_by_key(|(seed, _)| *seed);
    let bug = match args.bug {
        Some(InjectedBug::CommitEarlierTermsByCounting) => " --bug commit-earlier-terms",
        Some(InjectedBug::VoteWithoutLogCheck) => " --bug vote-without-log-check",
        Some(InjectedBug::LeaseWithoutQuorumContact) => " --bug lease-without-quorum-contact",
        None => "",
    };
    for (seed, violation) in &failures {
        let mut options = SimOptions::from_seed(*seed);
        options.injected_bug = args.bug;
        println!("FAIL {options}");
        println!("     {violation}");
        // Replay with the same assertions this run had (debug builds check more).
        let profile = if cfg!(debug_assertions) { "" } else { " --release" };
        println!("     replay: cargo run{profile} -p sundial-consensus-sim --bin raft-sim -- --seed {seed}{bug}");
    }
    let count = args.seeds.end - args.seeds.start;
    println!(
        "{} of {count} seeds passed in {:.1} s ({} entries committed in all)",
        count - failures.len() as u64,
        started.elapsed().as_secs_f64(),
        committed.load(Ordering::Relaxed)
    );
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
