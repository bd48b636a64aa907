//! The checker: a verdict per property of the contract over a run's history and deliveries.
//! `deliveries` judges what the receiver got, `linearizable` the status reads, and this file
//! whether operations resumed after the faults healed, then joins them into one verdict.

pub mod deliveries;
pub mod linearizable;

use crate::history::{Call, Kind, Operation};
use deliveries::{Property, Received};
use serde::Serialize;

/// What the checker needs besides the history and the deliveries.
#[derive(Clone, Debug, Serialize)]
pub struct Bounds {
    /// How early a delivery may be by the harness clock (the largest forward clock offset).
    pub margin_ms: u64,
    /// The largest clock offset either way (how far before its create a cron fire may fall).
    pub clock_offset_abs_max_ms: u64,
    /// When the last fault was healed (µs since the epoch); the run's start without faults.
    pub healed_us: u64,
    /// How soon after that operations and owed fires must resume.
    pub recovery_bound_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub valid: bool,
    pub properties: Vec<Property>,
}

/// `crashes` lists nodes that exited without being killed by the nemesis.
pub fn check(operations: &[Operation], deliveries: &[Received], bounds: &Bounds, crashes: &[String]) -> Verdict {
    let mut properties = deliveries::check(operations, deliveries, bounds);
    properties.push(deliveries::check_fencing(deliveries));
    properties.push(linearizability(operations));
    properties.push(progress(operations, bounds));
    properties.push(no_crashes(crashes));
    Verdict { valid: properties.iter().all(|p| p.valid), properties }
}

fn no_crashes(crashes: &[String]) -> Property {
    let mut property = Property {
        name: "no-crashes",
        contract: "no node exits on its own (only the nemesis kills)",
        valid: crashes.is_empty(),
        summary: format!("{} unexpected exits", crashes.len()),
        examples: crashes.iter().take(10).cloned().collect(),
        ..Property::default()
    };
    property.counts.insert("crashes", crashes.len() as u64);
    property
}

fn linearizability(operations: &[Operation]) -> Property {
    let verdict = linearizable::check(operations);
    let mut property = Property {
        name: "linearizable",
        contract: "G6: creates, cancels and status reads of each job are linearizable",
        valid: verdict.valid(),
        summary: format!(
            "{} of {} jobs ({} operations) without a linearization{}",
            verdict.failed_jobs,
            verdict.jobs_checked,
            verdict.operations_checked,
            if verdict.unchecked.is_empty() {
                String::new()
            } else {
                format!(", {} not checked", verdict.unchecked.len())
            }
        ),
        ..Property::default()
    };
    property.counts.insert("jobs", verdict.jobs_checked as u64);
    property.counts.insert("operations", verdict.operations_checked as u64);
    property.counts.insert("failed_jobs", verdict.failed_jobs as u64);
    property.examples = verdict.failures.into_iter().chain(verdict.unchecked).collect();
    property
}

/// Whether creates were acknowledged again within the bound after each heal that left no
/// fault open: measured up to the next fault (a heal the next fault follows first is not
/// measured), and required after the final heal.
fn progress(operations: &[Operation], bounds: &Bounds) -> Property {
    let mut property = Property {
        name: "progress",
        contract: "liveness: after faults heal, creates are acknowledged again within the recovery bound",
        valid: true,
        ..Property::default()
    };
    let acks: Vec<(u64, u64)> = operations
        .iter()
        .filter(|op| matches!(op.f, Call::Create | Call::CreateCron) && op.outcome == Kind::Ok)
        .filter_map(|op| Some((op.invoke_us, op.complete_us?)))
        .collect();
    let first_ack_from =
        |from_us: u64| acks.iter().filter(|(invoke, _)| *invoke >= from_us).map(|(_, done)| *done).min();
    let mut faults = deliveries::fault_windows(operations);
    faults.sort_unstable();
    let bound_us = bounds.recovery_bound_ms * 1_000;
    let (mut measured, mut slowest_ms) = (0, 0);
    for &(_, healed_us) in &faults {
        // Measured only when this heal left no fault open (windows of the clock timeline may
        // overlap the others), up to the next fault.
        if faults.iter().any(|&(start, end)| start < healed_us && end > healed_us) {
            continue;
        }
        let next_fault_us =
            faults.iter().map(|&(start, _)| start).filter(|&start| start >= healed_us).min().unwrap_or(u64::MAX);
        match first_ack_from(healed_us) {
            Some(done_us) if done_us <= next_fault_us => {
                measured += 1;
                let after_ms = done_us.saturating_sub(healed_us) / 1_000;
                slowest_ms = slowest_ms.max(after_ms);
                if after_ms * 1_000 > bound_us {
                    property.valid = false;
                    property.examples.push(format!("creates resumed {after_ms} ms after the heal at {healed_us} µs"));
                }
            }
            // The next fault came first (or the run ended): not measured here.
            _ => {}
        }
    }
    property.counts.insert("heals", faults.len() as u64);
    property.counts.insert("heals_measured", measured);
    property.counts.insert("slowest_resume_ms", slowest_ms);
    match first_ack_from(bounds.healed_us) {
        Some(done_us) => {
            let after_ms = done_us.saturating_sub(bounds.healed_us) / 1_000;
            property.counts.insert("first_ack_after_final_heal_ms", after_ms);
            if after_ms > bounds.recovery_bound_ms {
                property.valid = false;
                property.examples.push(format!("after the final heal creates resumed only after {after_ms} ms"));
            }
            property.summary = format!(
                "creates resumed {after_ms} ms after the final heal; slowest of {measured} measured heals {slowest_ms} ms (bound {} ms)",
                bounds.recovery_bound_ms
            );
        }
        None => {
            property.valid = false;
            property.summary = "no create was acknowledged after the final heal".into();
            property.examples.push(property.summary.clone());
        }
    }
    property
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn create(invoke_us: u64, complete_us: u64, outcome: Kind) -> Operation {
        Operation {
            process: "c1".into(),
            f: Call::Create,
            job: format!("j{invoke_us}"),
            node: 1,
            invoke_us,
            complete_us: Some(complete_us),
            outcome,
            argument: json!({"run_at_ms": 1}),
            result: Value::Null,
            error: None,
        }
    }

    #[test]
    fn progress_needs_an_acknowledged_create_within_the_bound_after_the_heal() {
        let bounds =
            Bounds { margin_ms: 0, clock_offset_abs_max_ms: 0, healed_us: 10_000_000, recovery_bound_ms: 5_000 };
        let prompt = [create(9_000_000, 9_500_000, Kind::Ok), create(11_000_000, 12_000_000, Kind::Ok)];
        assert!(progress(&prompt, &bounds).valid);
        let slow = [create(11_000_000, 16_000_001, Kind::Ok)];
        assert!(!progress(&slow, &bounds).valid);
        let none = [create(9_000_000, 9_500_000, Kind::Ok), create(11_000_000, 12_000_000, Kind::Info)];
        assert!(!progress(&none, &bounds).valid);
        // A heal in the middle of the run: creates must resume within the bound before the
        // next fault, unless that fault comes first.
        let fault = |start_us, end_us| Operation {
            f: Call::Nemesis,
            job: String::new(),
            invoke_us: start_us,
            complete_us: Some(end_us),
            outcome: Kind::Ok,
            ..create(0, 0, Kind::Ok)
        };
        let stalled = [
            fault(2_000_000, 4_000_000),
            create(4_500_000, 9_600_000, Kind::Ok),
            fault(9_800_000, 10_000_000),
            create(10_100_000, 10_200_000, Kind::Ok),
        ];
        let verdict = progress(&stalled, &bounds);
        assert!(!verdict.valid && verdict.counts["slowest_resume_ms"] == 5_600, "{verdict:?}");
        let interrupted = [
            fault(2_000_000, 4_000_000),
            fault(6_000_000, 10_000_000),
            create(6_500_000, 12_000_000, Kind::Ok),
            create(10_100_000, 10_200_000, Kind::Ok),
        ];
        let verdict = progress(&interrupted, &bounds);
        assert!(verdict.valid && verdict.counts["heals_measured"] == 1, "{verdict:?}");
        // A heal while another (overlapping) fault is still open is not measured.
        let overlapped = [
            fault(2_000_000, 8_000_000),
            fault(3_000_000, 4_000_000),
            create(4_500_000, 9_600_000, Kind::Ok),
            create(10_100_000, 10_200_000, Kind::Ok),
        ];
        let verdict = progress(&overlapped, &bounds);
        assert!(verdict.valid && verdict.counts["heals_measured"] == 1, "{verdict:?}");
    }
}
