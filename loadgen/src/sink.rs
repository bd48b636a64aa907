//! The sink's accounting: which scheduled jobs were delivered (an attempt the sink
//! accepted), which were not, which more than once (and whether every attempt carried the
//! first one's idempotency key), which arrived before their time, and which carried a bad
//! signature. Pure: deliveries in, a report out.

use std::collections::{HashMap, HashSet};

/// One delivery the sink received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub job_id: String,
    pub idempotency_key: String,
    pub attempt: u32,
    /// When it arrived (µs since the epoch: lateness is reported to the microsecond).
    pub received_us: u64,
    /// What the sink answered (2xx accepts the delivery; failure injection answers others).
    pub status: u16,
    /// Whether its signature verified; `None` when the sink was given no secret.
    pub signature_ok: Option<bool>,
    /// Its `X-Sundial-Fencing-Token`, if it carried one.
    pub fencing_token: Option<u64>,
}

/// What a run's deliveries add up to, against what was scheduled.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub scheduled: usize,
    /// Scheduled jobs delivered (an attempt accepted) at least once.
    pub delivered: usize,
    /// Every attempt the sink saw, accepted or not.
    pub attempts: usize,
    /// Attempts the sink answered with a failure (injected 500s and 429s).
    pub refused_by_sink: usize,
    /// Scheduled jobs never delivered, a few of them named.
    pub missing: usize,
    pub missing_examples: Vec<String>,
    /// Accepted deliveries beyond the first of a job (same key: allowed by the contract, counted).
    pub duplicates: usize,
    /// Attempts that carried another key than the job's first attempt: a contract breach.
    pub duplicates_with_another_key: usize,
    /// Jobs whose first attempt came before their due time (beyond `early_margin_ms`).
    pub early: usize,
    /// Attempts whose signature did not verify (only checked when the sink has the secret).
    pub bad_signatures: usize,
    /// Deliveries of jobs this run never asked for, or whose create was refused outright.
    pub unexpected: usize,
    /// Jobs whose create had no definite answer (no answer, or a 5xx) that were delivered
    /// anyway: allowed (the create may have happened), counted, not checked further.
    pub uncertain_delivered: usize,
    /// Lateness of each job's first attempt (received − due), µs, in no order.
    pub lateness_us: Vec<u64>,
    /// Accepted deliveries per second between the first and the last one, of every job this
    /// run may have created (0 for fewer than two).
    pub delivery_rate_per_s: f64,
}

impl Report {
    /// Nothing lost, nothing early, no repeat with another key, nothing unexpected, every
    /// checked signature good.
    pub fn passes(&self) -> bool {
        self.missing == 0
            && self.early == 0
            && self.duplicates_with_another_key == 0
            && self.unexpected == 0
            && self.bad_signatures == 0
    }
}

/// Accounts `deliveries` against `scheduled` (acknowledged job id → due time, ms) and
/// `uncertain` (ids whose create got no definite answer: they may exist). A first attempt
/// earlier than its due time by more than `early_margin_ms` (clock granularity between the
/// scheduler and the sink) counts as early.
pub fn account(
    scheduled: &HashMap<String, u64>,
    uncertain: &HashSet<String>,
    deliveries: &[Delivery],
    early_margin_ms: u64,
) -> Report {
    let mut uncertain_seen: HashSet<&str> = HashSet::new();
    let mut first_attempt: HashMap<&str, &Delivery> = HashMap::new();
    let mut accepted: HashMap<&str, usize> = HashMap::new();
    let mut accepted_us: Vec<u64> = Vec::new();
    let mut report = Report { scheduled: scheduled.len(), attempts: deliveries.len(), ..Report::default() };
    let mut ordered: Vec<&Delivery> = deliveries.iter().collect();
    ordered.sort_by_key(|d| d.received_us);
    for delivery in ordered {
        if delivery.signature_ok == Some(false) {
            report.bad_signatures += 1;
        }
        let is_accepted = (200..300).contains(&delivery.status);
        if !is_accepted {
            report.refused_by_sink += 1;
        }
        if !scheduled.contains_key(&delivery.job_id) {
            if uncertain.contains(&delivery.job_id) {
                uncertain_seen.insert(&delivery.job_id);
                if is_accepted {
                    accepted_us.push(delivery.received_us);
                }
            } else {
                report.unexpected += 1;
            }
            continue;
        }
        match first_attempt.get(delivery.job_id.as_str()) {
            None => {
                first_attempt.insert(&delivery.job_id, delivery);
            }
            Some(earlier) if earlier.idempotency_key != delivery.idempotency_key => {
                report.duplicates_with_another_key += 1;
            }
            Some(_) => {}
        }
        if is_accepted {
            accepted_us.push(delivery.received_us);
            let times = accepted.entry(&delivery.job_id).or_default();
            *times += 1;
            if *times > 1 {
                report.duplicates += 1;
            }
        }
    }
    if let (Some(first_us), Some(last_us)) = (accepted_us.first(), accepted_us.last()) {
        if last_us > first_us {
            report.delivery_rate_per_s = (accepted_us.len() - 1) as f64 * 1e6 / (last_us - first_us) as f64;
        }
    }
    let mut missing: Vec<&String> = Vec::new();
    for (id, due_ms) in scheduled {
        if let Some(attempt) = first_attempt.get(id.as_str()) {
            let due_us = due_ms.saturating_mul(1_000);
            if attempt.received_us.saturating_add(early_margin_ms.saturating_mul(1_000)) < due_us {
                report.early += 1;
            }
            report.lateness_us.push(attempt.received_us.saturating_sub(due_us));
        }
        if accepted.contains_key(id.as_str()) {
            report.delivered += 1;
        } else {
            missing.push(id);
        }
    }
    report.uncertain_delivered = uncertain_seen.len();
    missing.sort();
    report.missing = missing.len();
    report.missing_examples = missing.into_iter().take(10).cloned().collect();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(id: &str, key: &str, at: u64) -> Delivery {
        Delivery {
            job_id: id.into(),
            idempotency_key: key.into(),
            attempt: 1,
            received_us: at * 1_000,
            status: 200,
            signature_ok: None,
            fencing_token: None,
        }
    }

    fn scheduled(jobs: &[(&str, u64)]) -> HashMap<String, u64> {
        jobs.iter().map(|(id, due)| (id.to_string(), *due)).collect()
    }

    #[test]
    fn a_clean_run_passes_with_its_lateness() {
        let plan = scheduled(&[("a", 100), ("b", 200)]);
        let report = account(&plan, &HashSet::new(), &[delivery("a", "ka", 103), delivery("b", "kb", 200)], 0);
        assert!(report.passes(), "{report:?}");
        assert_eq!((report.delivered, report.missing, report.duplicates), (2, 0, 0));
        let mut lateness = report.lateness_us.clone();
        lateness.sort();
        assert_eq!(lateness, [0, 3_000]);
    }

    #[test]
    fn a_lost_job_fails_the_run_and_is_named() {
        let plan = scheduled(&[("a", 100), ("b", 200)]);
        let report = account(&plan, &HashSet::new(), &[delivery("a", "ka", 100)], 0);
        assert!(!report.passes());
        assert_eq!((report.missing, report.missing_examples.clone()), (1, vec!["b".to_string()]));
    }

    #[test]
    fn an_early_delivery_fails_beyond_the_margin_only() {
        let plan = scheduled(&[("a", 100)]);
        assert_eq!(account(&plan, &HashSet::new(), &[delivery("a", "k", 95)], 10).early, 0, "within the margin");
        let report = account(&plan, &HashSet::new(), &[delivery("a", "k", 89)], 10);
        assert_eq!(report.early, 1);
        assert!(!report.passes());
    }

    #[test]
    fn repeats_are_counted_and_only_another_key_fails() {
        let plan = scheduled(&[("a", 100)]);
        let same = account(&plan, &HashSet::new(), &[delivery("a", "k", 100), delivery("a", "k", 150)], 0);
        assert_eq!((same.duplicates, same.duplicates_with_another_key, same.passes()), (1, 0, true));
        // The first delivery is the earliest, whatever order they are reported in.
        let other = account(&plan, &HashSet::new(), &[delivery("a", "k2", 150), delivery("a", "k", 100)], 0);
        assert_eq!((other.duplicates, other.duplicates_with_another_key, other.passes()), (1, 1, false));
    }

    #[test]
    fn a_delivery_nobody_scheduled_fails_the_run() {
        let plan = scheduled(&[("a", 100)]);
        let report = account(&plan, &HashSet::new(), &[delivery("a", "k", 100), delivery("zzz", "k", 100)], 0);
        assert_eq!((report.unexpected, report.passes()), (1, false));
    }

    #[test]
    fn a_create_without_a_definite_answer_may_be_delivered() {
        let plan = scheduled(&[("a", 100)]);
        let uncertain: HashSet<String> = ["timed-out".to_string()].into();
        let report = account(&plan, &uncertain, &[delivery("a", "k", 100), delivery("timed-out", "k2", 100)], 0);
        assert_eq!((report.unexpected, report.uncertain_delivered, report.passes()), (0, 1, true));
        // Its delivery counts in the delivery rate: 2 deliveries 0 and 100 ms apart → 10/s.
        let spread = account(&plan, &uncertain, &[delivery("a", "k", 100), delivery("timed-out", "k2", 200)], 0);
        assert!((spread.delivery_rate_per_s - 10.0).abs() < 1e-9, "{}", spread.delivery_rate_per_s);
    }
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    fn attempt(id: &str, attempt: u32, at: u64, status: u16) -> Delivery {
        Delivery {
            job_id: id.into(),
            idempotency_key: format!("{id}:100"),
            attempt,
            received_us: at * 1_000,
            status,
            signature_ok: None,
            fencing_token: None,
        }
    }

    #[test]
    fn a_job_refused_by_the_sink_then_accepted_counts_once_and_is_late_by_its_first_attempt() {
        let plan: HashMap<String, u64> = [("a".to_string(), 100)].into();
        let report = account(
            &plan,
            &HashSet::new(),
            &[attempt("a", 1, 102, 500), attempt("a", 2, 400, 429), attempt("a", 3, 900, 200)],
            0,
        );
        assert!(report.passes(), "{report:?}");
        assert_eq!((report.delivered, report.attempts, report.refused_by_sink, report.duplicates), (1, 3, 2, 0));
        assert_eq!(report.lateness_us, [2_000]);
    }

    #[test]
    fn a_job_only_ever_refused_is_missing() {
        let plan: HashMap<String, u64> = [("a".to_string(), 100)].into();
        let report = account(&plan, &HashSet::new(), &[attempt("a", 1, 100, 500), attempt("a", 2, 300, 500)], 0);
        assert_eq!((report.delivered, report.missing, report.passes()), (0, 1, false));
    }

    #[test]
    fn a_bad_signature_fails_the_run() {
        let plan: HashMap<String, u64> = [("a".to_string(), 100)].into();
        let mut forged = attempt("a", 1, 100, 200);
        forged.signature_ok = Some(false);
        let report = account(&plan, &HashSet::new(), &[forged], 0);
        assert_eq!((report.bad_signatures, report.passes()), (1, false));
        let mut good = attempt("a", 1, 100, 200);
        good.signature_ok = Some(true);
        assert!(account(&plan, &HashSet::new(), &[good], 0).passes());
    }

    #[test]
    fn the_delivery_rate_spans_the_first_to_the_last_accepted_delivery() {
        let plan: HashMap<String, u64> = (0..101).map(|i| (i.to_string(), 0)).collect();
        let deliveries: Vec<Delivery> = (0..101).map(|i| attempt(&i.to_string(), 1, 1_000 + i * 10, 200)).collect();
        let report = account(&plan, &HashSet::new(), &deliveries, 0);
        assert!((report.delivery_rate_per_s - 100.0).abs() < 1e-9, "{}", report.delivery_rate_per_s);
    }
}
