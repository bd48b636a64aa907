//! The sink's accounting: which scheduled jobs were delivered, which were not, which more
//! than once (and whether each repeat carried the first delivery's idempotency key), and
//! which arrived before their time. Pure: deliveries in, a report out.

use std::collections::HashMap;

/// One delivery the sink received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub job_id: String,
    pub idempotency_key: String,
    pub attempt: u32,
    /// When it arrived (ms since the epoch).
    pub received_ms: u64,
}

/// What a run's deliveries add up to, against what was scheduled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub scheduled: usize,
    /// Scheduled jobs delivered at least once.
    pub delivered: usize,
    /// Scheduled jobs never delivered, a few of them named.
    pub missing: usize,
    pub missing_examples: Vec<String>,
    /// Deliveries beyond the first of a job (same key: allowed by the contract, counted).
    pub duplicates: usize,
    /// Repeats that carried another key than the job's first delivery: a contract breach.
    pub duplicates_with_another_key: usize,
    /// Jobs whose first delivery came before their due time (beyond `early_margin_ms`).
    pub early: usize,
    /// Deliveries of jobs that were never scheduled by this run.
    pub unexpected: usize,
    /// Lateness of each job's first delivery (received − due), ms, in no order.
    pub lateness_ms: Vec<u64>,
}

impl Report {
    /// Nothing lost, nothing early, no repeat with another key, nothing unexpected.
    pub fn passes(&self) -> bool {
        self.missing == 0 && self.early == 0 && self.duplicates_with_another_key == 0 && self.unexpected == 0
    }
}

/// Accounts `deliveries` against `scheduled` (job id → due time, ms). A first delivery
/// earlier than its due time by more than `early_margin_ms` (clock granularity between
/// the scheduler and the sink) counts as early.
pub fn account(scheduled: &HashMap<String, u64>, deliveries: &[Delivery], early_margin_ms: u64) -> Report {
    let mut first: HashMap<&str, &Delivery> = HashMap::new();
    let mut report = Report { scheduled: scheduled.len(), ..Report::default() };
    let mut ordered: Vec<&Delivery> = deliveries.iter().collect();
    ordered.sort_by_key(|d| d.received_ms);
    for delivery in ordered {
        if !scheduled.contains_key(&delivery.job_id) {
            report.unexpected += 1;
            continue;
        }
        match first.get(delivery.job_id.as_str()) {
            None => {
                first.insert(&delivery.job_id, delivery);
            }
            Some(earlier) => {
                report.duplicates += 1;
                if earlier.idempotency_key != delivery.idempotency_key {
                    report.duplicates_with_another_key += 1;
                }
            }
        }
    }
    let mut missing: Vec<&String> = Vec::new();
    for (id, due_ms) in scheduled {
        match first.get(id.as_str()) {
            Some(delivery) => {
                report.delivered += 1;
                if delivery.received_ms + early_margin_ms < *due_ms {
                    report.early += 1;
                }
                report.lateness_ms.push(delivery.received_ms.saturating_sub(*due_ms));
            }
            None => missing.push(id),
        }
    }
    missing.sort();
    report.missing = missing.len();
    report.missing_examples = missing.into_iter().take(10).cloned().collect();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(id: &str, key: &str, at: u64) -> Delivery {
        Delivery { job_id: id.into(), idempotency_key: key.into(), attempt: 1, received_ms: at }
    }

    fn scheduled(jobs: &[(&str, u64)]) -> HashMap<String, u64> {
        jobs.iter().map(|(id, due)| (id.to_string(), *due)).collect()
    }

    #[test]
    fn a_clean_run_passes_with_its_lateness() {
        let plan = scheduled(&[("a", 100), ("b", 200)]);
        let report = account(&plan, &[delivery("a", "ka", 103), delivery("b", "kb", 200)], 0);
        assert!(report.passes(), "{report:?}");
        assert_eq!((report.delivered, report.missing, report.duplicates), (2, 0, 0));
        let mut lateness = report.lateness_ms.clone();
        lateness.sort();
        assert_eq!(lateness, [0, 3]);
    }

    #[test]
    fn a_lost_job_fails_the_run_and_is_named() {
        let plan = scheduled(&[("a", 100), ("b", 200)]);
        let report = account(&plan, &[delivery("a", "ka", 100)], 0);
        assert!(!report.passes());
        assert_eq!((report.missing, report.missing_examples.clone()), (1, vec!["b".to_string()]));
    }

    #[test]
    fn an_early_delivery_fails_beyond_the_margin_only() {
        let plan = scheduled(&[("a", 100)]);
        assert_eq!(account(&plan, &[delivery("a", "k", 95)], 10).early, 0, "within the margin");
        let report = account(&plan, &[delivery("a", "k", 89)], 10);
        assert_eq!(report.early, 1);
        assert!(!report.passes());
    }

    #[test]
    fn repeats_are_counted_and_only_another_key_fails() {
        let plan = scheduled(&[("a", 100)]);
        let same = account(&plan, &[delivery("a", "k", 100), delivery("a", "k", 150)], 0);
        assert_eq!((same.duplicates, same.duplicates_with_another_key, same.passes()), (1, 0, true));
        // The first delivery is the earliest, whatever order they are reported in.
        let other = account(&plan, &[delivery("a", "k2", 150), delivery("a", "k", 100)], 0);
        assert_eq!((other.duplicates, other.duplicates_with_another_key, other.passes()), (1, 1, false));
    }

    #[test]
    fn a_delivery_nobody_scheduled_fails_the_run() {
        let plan = scheduled(&[("a", 100)]);
        let report = account(&plan, &[delivery("a", "k", 100), delivery("zzz", "k", 100)], 0);
        assert_eq!((report.unexpected, report.passes()), (1, false));
    }
}
