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
    let mut properties =
        deliveries::check(operations, deliveries, bounds.margin_ms, bounds.healed_us, bounds.recovery_bound_ms);
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

/// Whether creates were acknowledged again within the bound after the final heal.
fn progress(operations: &[Operation], bounds: &Bounds) -> Property {
    let mut property = Property {
        name: "progress",
        contract: "liveness: after the faults heal, creates are acknowledged again within the recovery bound",
        valid: true,
        ..Property::default()
    };
    let resumed_us = operations
        .iter()
        .filter(|op| matches!(op.f, Call::Create | Call::CreateCron) && op.outcome == Kind::Ok)
        .filter(|op| op.invoke_us >= bounds.healed_us)
        .filter_map(|op| op.complete_us)
        .min();
    match resumed_us {
        Some(resumed_us) => {
            let after_ms = resumed_us.saturating_sub(bounds.healed_us) / 1_000;
            property.counts.insert("first_ack_after_heal_ms", after_ms);
            property.valid = after_ms <= bounds.recovery_bound_ms;
            property.summary = format!(
                "first create acknowledged {after_ms} ms after the final heal (bound {} ms)",
                bounds.recovery_bound_ms
            );
        }
        None => {
            property.valid = false;
            property.summary = "no create was acknowledged after the final heal".into();
        }
    }
    if !property.valid {
        property.examples.push(property.summary.clone());
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
        let bounds = Bounds { margin_ms: 0, healed_us: 10_000_000, recovery_bound_ms: 5_000 };
        let prompt = [create(9_000_000, 9_500_000, Kind::Ok), create(11_000_000, 12_000_000, Kind::Ok)];
        assert!(progress(&prompt, &bounds).valid);
        let slow = [create(11_000_000, 16_000_001, Kind::Ok)];
        assert!(!progress(&slow, &bounds).valid);
        let none = [create(9_000_000, 9_500_000, Kind::Ok), create(11_000_000, 12_000_000, Kind::Info)];
        assert!(!progress(&none, &bounds).valid);
    }
}
