//! The deterministic simulator over many seeds: every safety check at every step, liveness
//! after the faults heal, linearizability of the key-value history. Plus proof that the
//! checks can fail (a broken Raft is caught) and that a replay is identical.
//!
//! Seeds: SUNDIAL_SIM_SEEDS (default 2000). Any failure prints the replay command.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use sundial_consensus::InjectedBug;
use sundial_consensus_sim::{run_seed, SimOptions};

/// Runs `seeds` on two threads; returns (failing seed, violation) pairs, sorted.
fn run_seeds(seeds: std::ops::Range<u64>, bug: Option<InjectedBug>, stop_at_first: bool) -> Vec<(u64, String)> {
    let next = AtomicU64::new(seeds.start);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= seeds.end {
                    break;
                }
                if let Err(violation) = run_seed(seed, bug) {
                    let mut failures = failures.lock().expect("no panic holds it");
                    failures.push((seed, violation.to_string()));
                    if stop_at_first {
                        next.store(seeds.end, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().expect("no panic holds it");
    failures.sort();
    failures
}

#[test]
fn thousands_of_seeds_pass_every_safety_liveness_and_linearizability_check() {
    let count: u64 = std::env::var("SUNDIAL_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let failures = run_seeds(0..count, None, false);
    for (seed, violation) in &failures {
        eprintln!("FAIL {}\n     {violation}", SimOptions::from_seed(*seed));
        // The dev profile keeps the debug assertions these tests ran with.
        eprintln!("     replay: cargo run -p sundial-consensus-sim --bin raft-sim -- --seed {seed}");
    }
    assert!(failures.is_empty(), "{} of {count} seeds failed", failures.len());
}

#[test]
fn a_replay_of_a_seed_is_identical() {
    for seed in [3, 77, 1234] {
        let first = run_seed(seed, None).expect("seed passes");
        let second = run_seed(seed, None).expect("seed passes");
        // The report includes a digest of every message delivery, not just counts.
        assert_eq!(first, second, "seed {seed} ran differently twice");
        assert_ne!(first.trace_digest, run_seed(seed + 1, None).expect("seed passes").trace_digest);
        assert!(first.committed_entries > 0 && first.reads_ok > 0, "seed {seed} did real work: {first:?}");
    }
}

#[test]
fn a_raft_that_votes_without_the_log_check_is_caught() {
    let failures = run_seeds(0..2000, Some(InjectedBug::VoteWithoutLogCheck), true);
    assert!(!failures.is_empty(), "2000 seeds did not catch votes granted without the log check");
}

#[test]
fn the_workload_exercises_faults_snapshots_and_reads() {
    let mut total = sundial_consensus_sim::SimReport::default();
    for seed in 0..50 {
        let report = run_seed(seed, None).expect("seed passes");
        total.leaders_elected += report.leaders_elected;
        total.snapshots_installed += report.snapshots_installed;
        total.writes_ok += report.writes_ok;
        total.writes_unknown += report.writes_unknown;
        total.reads_ok += report.reads_ok;
        total.membership_changes += report.membership_changes;
    }
    assert!(total.leaders_elected > 100, "faults forced re-elections: {total:?}");
    assert!(total.snapshots_installed > 0, "lagging nodes caught up by snapshot: {total:?}");
    assert!(total.writes_ok > 1000 && total.reads_ok > 1000, "{total:?}");
    assert!(total.membership_changes > 10, "voters were removed and added back: {total:?}");
}

#[test]
fn a_lease_counted_without_quorum_contact_is_caught() {
    let failures = run_seeds(0..2000, Some(InjectedBug::LeaseWithoutQuorumContact), true);
    assert!(!failures.is_empty(), "2000 seeds did not catch a lease counted from unanswered heartbeats");
    assert!(failures[0].1.contains("lease"), "{failures:?}");
}
