//! The delivery properties of the contract, judged from the history and what the webhook
//! receiver got: lost (G3), early (G2), cancel wins (G5), keys and duplicates (G4), and
//! whether fires caught up once the faults were healed. Pure: operations and deliveries in,
//! a verdict per property out.
//!
//! Outcomes that are unknown are read generously: a create with an unknown outcome may be
//! delivered but need not be (unless a read saw the job: then it happened); a cancel with an
//! unknown outcome forbids nothing and excuses the fires that were not yet owed when it was
//! sent. A fire is owed by its *deadline*: its time plus the recovery bound, pushed past the
//! end of every fault window that opens before that deadline. `margin_ms` is how early a
//! delivery may be by the harness clock because a node's clock was set ahead by the clock
//! nemesis (0 without it).

use super::Bounds;
use crate::history::{Call, Kind, Operation};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use sundial_loadgen::receiver::fencing_term;

/// One delivery the receiver got (what `deliveries.jsonl` holds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Received {
    pub job: String,
    pub key: String,
    pub attempt: u32,
    pub received_us: u64,
    pub status: u16,
    /// Its `X-Sundial-Fencing-Token` (none in runs stored before tokens existed).
    #[serde(default)]
    pub fencing_token: Option<u64>,
}

/// Examples kept per property.
const EXAMPLES_MAX: usize = 10;

#[derive(Clone, Debug, PartialEq)]
enum Schedule {
    Once { run_at_ms: u64 },
    Cron { every_ms: u64, end_ms: u64 },
}

/// What the history says about one job.
#[derive(Clone, Debug)]
struct Job {
    schedule: Schedule,
    create: Kind,
    create_invoke_us: u64,
    /// When the create was known to have happened: its acknowledgement, or the first read
    /// that saw the job when its outcome was unknown.
    create_complete_us: u64,
    /// The earliest acknowledgement of a cancel.
    cancel_acked_us: Option<u64>,
    /// The earliest invocation of a cancel that was acknowledged or may have taken effect.
    cancel_invoked_us: Option<u64>,
}

impl Job {
    /// Fire times that must be delivered: the create happened, and no cancel was sent before
    /// the fire was owed.
    fn required_fires(&self, bounds: &Bounds, faults: &[(u64, u64)]) -> Vec<u64> {
        if self.create != Kind::Ok {
            return Vec::new();
        }
        let fires = match self.schedule {
            Schedule::Once { run_at_ms } => vec![run_at_ms],
            Schedule::Cron { every_ms, end_ms } => {
                // The node computes the first fire from its own clock when it applies the
                // create, which may be `margin_ms` ahead of the acknowledgement.
                let after_ms = self.create_complete_us / 1_000 + bounds.margin_ms;
                let first = (after_ms / every_ms + 1) * every_ms;
                (first..=end_ms).step_by(every_ms as usize).collect()
            }
        };
        match self.cancel_invoked_us {
            None => fires,
            Some(cancel_us) => fires.into_iter().filter(|&f| deadline_us(f, bounds, faults) < cancel_us).collect(),
        }
    }

    /// Whether a fire at `fire_ms` is one this job can have (a cron job's after its create was
    /// sent, less the largest clock offset either way).
    fn can_fire_at(&self, fire_ms: u64, bounds: &Bounds) -> bool {
        match self.schedule {
            Schedule::Once { run_at_ms } => fire_ms == run_at_ms,
            Schedule::Cron { every_ms, end_ms } => {
                let earliest_ms = (self.create_invoke_us / 1_000).saturating_sub(bounds.clock_offset_abs_max_ms);
                fire_ms % every_ms == 0 && fire_ms <= end_ms && fire_ms > earliest_ms
            }
        }
    }

    /// Whether an acknowledged cancel forbids the fire at `fire_ms`.
    fn cancelled_before(&self, fire_ms: u64, margin_ms: u64) -> bool {
        self.cancel_acked_us.is_some_and(|acked_us| acked_us / 1_000 + margin_ms < fire_ms)
    }
}

/// When a fire at `fire_ms` must have arrived by: its time plus the recovery bound, pushed
/// to the end of any fault window that opens before then (and on, while faults keep coming).
pub fn deadline_us(fire_ms: u64, bounds: &Bounds, faults: &[(u64, u64)]) -> u64 {
    let bound_us = bounds.recovery_bound_ms * 1_000;
    let mut disturbed_until = fire_ms * 1_000;
    loop {
        let later = faults
            .iter()
            .filter(|&&(start, end)| start <= disturbed_until + bound_us && end > disturbed_until)
            .map(|&(_, end)| end)
            .max();
        match later {
            Some(end) => disturbed_until = end,
            None => return disturbed_until.saturating_add(bound_us),
        }
    }
}

/// The nemesis windows of a history (start, heal) in µs; one still open ends at `u64::MAX`.
pub fn fault_windows(operations: &[Operation]) -> Vec<(u64, u64)> {
    operations
        .iter()
        .filter(|op| op.f == Call::Nemesis)
        .map(|op| (op.invoke_us, op.complete_us.unwrap_or(u64::MAX)))
        .collect()
}

fn jobs_of(operations: &[Operation]) -> HashMap<String, Job> {
    let mut jobs: HashMap<String, Job> = HashMap::new();
    for operation in operations {
        let schedule = match operation.f {
            Call::Create => operation.argument["run_at_ms"].as_u64().map(|run_at_ms| Schedule::Once { run_at_ms }),
            Call::CreateCron => match (operation.argument["every_s"].as_u64(), operation.argument["end_ms"].as_u64()) {
                (Some(every_s), Some(end_ms)) if every_s > 0 => {
                    Some(Schedule::Cron { every_ms: every_s * 1_000, end_ms })
                }
                _ => None,
            },
            _ => None,
        };
        if let Some(schedule) = schedule {
            let job = Job {
                schedule,
                create: operation.outcome,
                create_invoke_us: operation.invoke_us,
                create_complete_us: operation.complete_us.unwrap_or(u64::MAX),
                cancel_acked_us: None,
                cancel_invoked_us: None,
            };
            jobs.insert(operation.job.clone(), job);
        }
    }
    let earliest = |slot: &mut Option<u64>, at: u64| *slot = Some(slot.map_or(at, |earlier| earlier.min(at)));
    for operation in operations {
        let Some(job) = jobs.get_mut(&operation.job) else { continue };
        match (operation.f, operation.outcome) {
            (Call::Cancel, Kind::Ok) => {
                earliest(&mut job.cancel_invoked_us, operation.invoke_us);
                earliest(&mut job.cancel_acked_us, operation.complete_us.unwrap_or(u64::MAX));
            }
            (Call::Cancel, Kind::Info | Kind::Invoke) => earliest(&mut job.cancel_invoked_us, operation.invoke_us),
            // A read that saw the job proves a create with an unknown outcome happened.
            (Call::Read, Kind::Ok) if job.create == Kind::Info && operation.result.as_str() != Some("absent") => {
                job.create = Kind::Ok;
                job.create_complete_us = operation.complete_us.unwrap_or(u64::MAX);
            }
            _ => {}
        }
    }
    jobs
}

/// One property's verdict.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Property {
    pub name: &'static str,
    pub contract: &'static str,
    pub valid: bool,
    /// What was checked and what was found, in one line.
    pub summary: String,
    pub counts: BTreeMap<&'static str, u64>,
    pub examples: Vec<String>,
}

impl Property {
    fn new(name: &'static str, contract: &'static str) -> Property {
        Property { name, contract, valid: true, ..Property::default() }
    }

    fn count(&mut self, what: &'static str, by: u64) {
        *self.counts.entry(what).or_default() += by;
    }

    /// Records a violation: counted, and kept as an example while there is room.
    fn violation(&mut self, what: &'static str, example: String) {
        self.valid = false;
        self.count(what, 1);
        if self.examples.len() < EXAMPLES_MAX {
            self.examples.push(example);
        }
    }
}

/// The fire time a key names (`<job id>:<fire ms>`), if the key is well formed for `job`.
fn fire_ms_of(job: &str, key: &str) -> Option<u64> {
    key.strip_prefix(job)?.strip_prefix(':')?.parse().ok()
}

/// Judges the lost, early, cancel, keys and caught-up properties.
/// Fencing (issue 23): every delivery carries a token, and per job no delivery the receiver
/// accepted carries a term older than one it accepted before (the receiver refuses those
/// with 409, as one that uses the tokens does; a stale one accepted would be a receiver or
/// token that does not order leaderships). "Before" is the order the receiver recorded, and
/// judged, them in — not their timestamps, which are taken when a request arrives, before
/// its body is read, so two racing requests may be judged in the other order.
pub fn check_fencing(deliveries: &[Received]) -> Property {
    let mut fencing = Property::new(
        "fencing",
        "every delivery carries a fencing token; none accepted after a newer leadership's carries an older term",
    );
    let mut by_job: BTreeMap<&str, Vec<&Received>> = BTreeMap::new();
    for delivery in deliveries {
        by_job.entry(delivery.job.as_str()).or_default().push(delivery);
    }
    for arrivals in by_job.values() {
        let mut newest: Option<u64> = None;
        for delivery in arrivals.iter() {
            let Some(token) = delivery.fencing_token else {
                fencing
                    .violation("no_token", format!("{} (attempt {}) carried no token", delivery.key, delivery.attempt));
                continue;
            };
            fencing.count("stale_refused", u64::from(delivery.status == 409));
            if !(200..300).contains(&delivery.status) {
                continue;
            }
            let term = fencing_term(token);
            if let Some(newest_term) = newest.map(fencing_term).filter(|newest| term < *newest) {
                fencing.violation(
                    "older_term_accepted",
                    format!(
                        "{} (attempt {}) of term {term} accepted after one of term {newest_term}",
                        delivery.key, delivery.attempt
                    ),
                );
            }
            newest = newest.max(Some(token));
        }
    }
    fencing.summary = format!(
        "{} deliveries without a token, {} of an older term accepted, {} refused as stale",
        fencing.counts.get("no_token").unwrap_or(&0),
        fencing.counts.get("older_term_accepted").unwrap_or(&0),
        fencing.counts.get("stale_refused").unwrap_or(&0)
    );
    fencing
}

pub fn check(operations: &[Operation], deliveries: &[Received], bounds: &Bounds) -> Vec<Property> {
    let margin_ms = bounds.margin_ms;
    let faults = fault_windows(operations);
    let jobs = jobs_of(operations);
    let mut lost = Property::new("lost", "G3: every acknowledged, uncancelled fire is delivered");
    let mut early = Property::new("early", "G2: no delivery before its fire time");
    let mut cancel = Property::new("cancel", "G5: no delivery of a fire whose cancel was acknowledged before its time");
    let mut keys = Property::new(
        "keys",
        "G4: every delivery belongs to a create that may have happened and carries its fire's key",
    );
    let mut caught_up = Property::new(
        "caught-up",
        "every owed fire arrives within the recovery bound of its time, or of the heal of the faults around it",
    );

    let mut delivered: HashMap<(&str, u64), Vec<&Received>> = HashMap::new();
    for delivery in deliveries {
        let Some(job) = jobs.get(&delivery.job) else {
            keys.violation(
                "unknown_job",
                format!("delivery of {} (key {}): no create was invoked", delivery.job, delivery.key),
            );
            continue;
        };
        if job.create == Kind::Fail {
            keys.violation(
                "refused_create_delivered",
                format!("delivery of {} (key {}): its create was refused", delivery.job, delivery.key),
            );
        }
        let Some(fire_ms) =
            fire_ms_of(&delivery.job, &delivery.key).filter(|fire_ms| job.can_fire_at(*fire_ms, bounds))
        else {
            keys.violation("wrong_key", format!("delivery of {} carries key {:?}", delivery.job, delivery.key));
            continue;
        };
        if delivery.received_us + margin_ms * 1_000 < fire_ms * 1_000 {
            let early_ms = (fire_ms * 1_000 - delivery.received_us) as f64 / 1_000.0;
            early.violation("early", format!("{} arrived {early_ms:.1} ms before its time", delivery.key));
        } else if delivery.received_us < fire_ms * 1_000 {
            // Early by the harness clock, on time by a node clock the nemesis set ahead.
            early.count("early_within_margin", 1);
            let early_ms = (fire_ms * 1_000 - delivery.received_us).div_ceil(1_000);
            let most = early.counts.entry("most_early_within_margin_ms").or_default();
            *most = (*most).max(early_ms);
        }
        if job.cancelled_before(fire_ms, margin_ms) {
            let acked_ms = job.cancel_acked_us.unwrap_or(0) / 1_000;
            cancel.violation(
                "delivered_after_cancel",
                format!(
                    "{} delivered although its cancel was acknowledged {} ms before its time",
                    delivery.key,
                    fire_ms.saturating_sub(acked_ms)
                ),
            );
        }
        delivered.entry((delivery.job.as_str(), fire_ms)).or_default().push(delivery);
    }
    for arrivals in delivered.values() {
        let accepted = arrivals.iter().filter(|d| (200..300).contains(&d.status)).count() as u64;
        if accepted > 1 {
            keys.count("duplicate_deliveries", accepted - 1);
            keys.count("fires_delivered_more_than_once", 1);
        }
        keys.count("attempts_answered_with_an_error", arrivals.len() as u64 - accepted);
    }
    keys.count("fires_delivered", delivered.len() as u64);
    early.count("deliveries", deliveries.len() as u64);
    early.count("margin_ms", margin_ms);

    let mut required_count = 0;
    let mut ids: Vec<&String> = jobs.keys().collect();
    ids.sort();
    for id in ids {
        let job = &jobs[id];
        if job.cancel_acked_us.is_some() {
            cancel.count("acknowledged_cancels", 1);
            let last_fire_ms = match job.schedule {
                Schedule::Once { run_at_ms } => run_at_ms,
                Schedule::Cron { end_ms, .. } => end_ms,
            };
            if job.cancelled_before(last_fire_ms, margin_ms) {
                cancel.count("cancels_before_a_fire", 1);
            }
        }
        for fire_ms in job.required_fires(bounds, &faults) {
            required_count += 1;
            let accepted = delivered.get(&(id.as_str(), fire_ms)).and_then(|arrivals| {
                arrivals.iter().filter(|d| (200..300).contains(&d.status)).map(|d| d.received_us).min()
            });
            match accepted {
                None => lost.violation("lost", format!("{id}:{fire_ms} was acknowledged and never delivered")),
                Some(received_us) => {
                    if received_us > deadline_us(fire_ms, bounds, &faults) {
                        let late_s = (received_us - fire_ms * 1_000) as f64 / 1e6;
                        caught_up.violation(
                            "late_after_heal",
                            format!("{id}:{fire_ms} arrived {late_s:.1} s after its time"),
                        );
                    }
                }
            }
        }
    }
    lost.count("required_fires", required_count);
    lost.summary = format!("{} of {required_count} owed fires missing", lost.counts.get("lost").unwrap_or(&0));
    early.summary = format!(
        "{} of {} deliveries early (margin {margin_ms} ms for clock skew; {} within it)",
        early.counts.get("early").unwrap_or(&0),
        deliveries.len(),
        early.counts.get("early_within_margin").unwrap_or(&0)
    );
    cancel.summary = format!(
        "{} deliveries after {} acknowledged cancels ({} acknowledged before a fire they had to stop)",
        cancel.counts.get("delivered_after_cancel").unwrap_or(&0),
        cancel.counts.get("acknowledged_cancels").unwrap_or(&0),
        cancel.counts.get("cancels_before_a_fire").unwrap_or(&0)
    );
    keys.summary = format!(
        "{} fires delivered ({} attempts answered 5xx first), {} accepted twice or more (same key), {} with a wrong key, {} of unknown or refused jobs",
        delivered.len(),
        keys.counts.get("attempts_answered_with_an_error").unwrap_or(&0),
        keys.counts.get("duplicate_deliveries").unwrap_or(&0),
        keys.counts.get("wrong_key").unwrap_or(&0),
        keys.counts.get("unknown_job").unwrap_or(&0) + keys.counts.get("refused_create_delivered").unwrap_or(&0)
    );
    caught_up.summary = format!(
        "{} owed fires later than {} ms after their time, or after the heal of the faults around it",
        caught_up.counts.get("late_after_heal").unwrap_or(&0),
        bounds.recovery_bound_ms
    );
    vec![lost, early, cancel, keys, caught_up]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use sundial_loadgen::receiver::FENCING_INDEX_BITS;

    fn operation(job: &str, f: Call, outcome: Kind, invoke_us: u64, complete_us: u64, argument: Value) -> Operation {
        Operation {
            process: "c1".into(),
            f,
            job: job.into(),
            node: 1,
            invoke_us,
            complete_us: Some(complete_us),
            outcome,
            argument,
            result: Value::Null,
            error: None,
        }
    }

    #[test]
    fn fencing_catches_a_missing_token_and_an_older_term_accepted_but_not_one_refused() {
        let fenced = |term: u64, index: u64, received_ms: u64, status: u16| Received {
            fencing_token: Some((term << FENCING_INDEX_BITS) | index),
            status,
            ..delivery("a", 100, received_ms)
        };
        let ordered = [fenced(1, 5, 200, 500), fenced(2, 3, 300, 200), fenced(1, 9, 400, 409), fenced(3, 1, 500, 200)];
        let fine = check_fencing(&ordered);
        assert!(fine.valid, "{fine:?}");
        assert_eq!(fine.counts.get("stale_refused"), Some(&1));
        let accepted_stale = [fenced(2, 3, 300, 200), fenced(1, 9, 400, 200)];
        let caught = check_fencing(&accepted_stale);
        assert!(!caught.valid && caught.counts.get("older_term_accepted") == Some(&1), "{caught:?}");
        // The receiver's order decides (it judged them so), not their arrival stamps.
        let judged_first = [fenced(1, 9, 400, 200), fenced(2, 3, 300, 200)];
        assert!(check_fencing(&judged_first).valid);
        let untokened = [Received { fencing_token: None, ..delivery("a", 100, 200) }];
        assert_eq!(check_fencing(&untokened).counts.get("no_token"), Some(&1));
    }

    fn once(job: &str, outcome: Kind, run_at_ms: u64) -> Operation {
        operation(job, Call::Create, outcome, 0, 1_000_000, json!({"run_at_ms": run_at_ms}))
    }

    fn delivery(job: &str, fire_ms: u64, received_ms: u64) -> Received {
        Received {
            job: job.into(),
            key: format!("{job}:{fire_ms}"),
            attempt: 1,
            received_us: received_ms * 1_000,
            status: 200,
            fencing_token: Some(1 << FENCING_INDEX_BITS),
        }
    }

    fn bounds(margin_ms: u64) -> Bounds {
        Bounds { margin_ms, clock_offset_abs_max_ms: margin_ms, healed_us: 0, recovery_bound_ms: 10_000 }
    }

    fn verdicts(operations: &[Operation], deliveries: &[Received], margin_ms: u64) -> BTreeMap<&'static str, Property> {
        check(operations, deliveries, &bounds(margin_ms)).into_iter().map(|p| (p.name, p)).collect()
    }

    fn failing(operations: &[Operation], deliveries: &[Received], margin_ms: u64) -> Vec<&'static str> {
        verdicts(operations, deliveries, margin_ms).into_values().filter(|p| !p.valid).map(|p| p.name).collect()
    }

    #[test]
    fn a_clean_run_passes_every_property() {
        let ops = [
            once("a", Kind::Ok, 5_000),
            once("b", Kind::Info, 5_000),
            once("c", Kind::Ok, 9_000),
            operation("c", Call::Cancel, Kind::Ok, 2_000_000, 3_000_000, Value::Null),
            operation("k", Call::CreateCron, Kind::Ok, 0, 1_000_000, json!({"every_s": 2, "end_ms": 7_000})),
        ];
        // b's create had no answer: delivered or not, both fine; a is delivered twice with one key.
        let deliveries = [
            delivery("a", 5_000, 5_001),
            delivery("a", 5_000, 5_900),
            delivery("k", 2_000, 2_003),
            delivery("k", 4_000, 4_010),
            delivery("k", 6_000, 6_002),
        ];
        assert_eq!(failing(&ops, &deliveries, 0), Vec::<&str>::new());
        let keys = &verdicts(&ops, &deliveries, 0)["keys"];
        assert_eq!(keys.counts["duplicate_deliveries"], 1);
        assert_eq!(verdicts(&ops, &deliveries, 0)["lost"].counts["required_fires"], 4);
        assert_eq!(verdicts(&ops, &deliveries, 0)["cancel"].counts["cancels_before_a_fire"], 1);
    }

    #[test]
    fn each_broken_input_is_caught_by_its_property() {
        let a = [once("a", Kind::Ok, 5_000)];
        assert_eq!(failing(&a, &[], 0), ["lost"]);
        assert_eq!(failing(&a, &[delivery("a", 5_000, 4_990)], 0), ["early"]);
        // The same arrival is within a 20 ms clock-skew margin, and counted as such.
        assert_eq!(failing(&a, &[delivery("a", 5_000, 4_990)], 20), Vec::<&str>::new());
        let early = &verdicts(&a, &[delivery("a", 5_000, 4_990)], 20)["early"];
        assert_eq!((early.counts["early_within_margin"], early.counts["most_early_within_margin_ms"]), (1, 10));
        let wrong_key = Received { key: "a:4000".into(), ..delivery("a", 5_000, 5_001) };
        assert_eq!(failing(&a, &[wrong_key, delivery("a", 5_000, 5_001)], 0), ["keys"]);
        assert_eq!(failing(&a, &[delivery("a", 5_000, 5_001), delivery("ghost", 1, 2)], 0), ["keys"]);
        let refused = [once("r", Kind::Fail, 5_000)];
        assert_eq!(failing(&refused, &[delivery("r", 5_000, 5_001)], 0), ["keys"]);
        let cancelled =
            [once("c", Kind::Ok, 9_000), operation("c", Call::Cancel, Kind::Ok, 2_000_000, 3_000_000, Value::Null)];
        assert_eq!(failing(&cancelled, &[delivery("c", 9_000, 9_001)], 0), ["cancel"]);
        // A cancel acknowledged after the fire's time forbids nothing; a failed one excuses nothing.
        let late_cancel =
            [once("c", Kind::Ok, 2_500), operation("c", Call::Cancel, Kind::Ok, 2_000_000, 3_000_000, Value::Null)];
        assert_eq!(failing(&late_cancel, &[delivery("c", 2_500, 2_501)], 0), Vec::<&str>::new());
        let failed_cancel =
            [once("c", Kind::Ok, 9_000), operation("c", Call::Cancel, Kind::Fail, 2_000_000, 3_000_000, Value::Null)];
        assert_eq!(failing(&failed_cancel, &[], 0), ["lost"]);
        // A cron fire missing from the middle, and one at a time the schedule never has.
        let cron = [operation("k", Call::CreateCron, Kind::Ok, 0, 1_000_000, json!({"every_s": 2, "end_ms": 6_000}))];
        assert_eq!(failing(&cron, &[delivery("k", 2_000, 2_001), delivery("k", 6_000, 6_001)], 0), ["lost"]);
        let odd = [
            delivery("k", 2_000, 2_001),
            delivery("k", 3_000, 3_001),
            delivery("k", 4_000, 4_001),
            delivery("k", 6_000, 6_001),
        ];
        assert_eq!(failing(&cron, &odd, 0), ["keys"]);
        // Delivered, but 15 s after its time with nothing to excuse it.
        assert_eq!(failing(&a, &[delivery("a", 5_000, 20_000)], 0), ["caught-up"]);
        // A cron fire from before the job's create was sent.
        let late_cron =
            [operation("k", Call::CreateCron, Kind::Ok, 3_000_000, 3_100_000, json!({"every_s": 2, "end_ms": 6_000}))];
        assert_eq!(
            failing(
                &late_cron,
                &[delivery("k", 2_000, 2_001), delivery("k", 4_000, 4_001), delivery("k", 6_000, 6_001)],
                0
            ),
            ["keys"]
        );
        // A create with an unknown outcome that a read then saw is owed like an acknowledged one.
        let mut seen = vec![once("u", Kind::Info, 5_000)];
        seen.push(Operation {
            result: json!("pending"),
            ..operation("u", Call::Read, Kind::Ok, 2_000_000, 2_100_000, Value::Null)
        });
        assert_eq!(failing(&seen, &[], 0), ["lost"]);
        assert_eq!(failing(&seen[..1], &[], 0), Vec::<&str>::new());
    }

    #[test]
    fn a_late_cancel_excuses_only_the_fires_not_yet_owed_and_faults_push_deadlines_out() {
        // A cron job every 2 s until 30 s, cancelled at 25 s: the fires due by 14 s (owed 10 s
        // later, before the cancel was sent) must have arrived; the later ones need not.
        let cron = [
            operation("k", Call::CreateCron, Kind::Ok, 0, 1_000_000, json!({"every_s": 2, "end_ms": 30_000})),
            operation("k", Call::Cancel, Kind::Info, 25_000_000, 26_000_000, Value::Null),
        ];
        let by = |last_s: u64| (1..=last_s / 2).map(|i| delivery("k", i * 2_000, i * 2_000 + 5)).collect::<Vec<_>>();
        assert_eq!(failing(&cron, &by(14), 0), Vec::<&str>::new());
        assert_eq!(verdicts(&cron, &by(14), 0)["lost"].counts["required_fires"], 7);
        let mut gap = by(14);
        gap.retain(|d| d.key != "k:8000");
        assert_eq!(failing(&cron, &gap, 0), ["lost"]);
        // A fault from 4 s to 12 s: a fire due at 5 s is owed by 12 s + 10 s.
        let faulted =
            [once("a", Kind::Ok, 5_000), operation("", Call::Nemesis, Kind::Ok, 4_000_000, 12_000_000, Value::Null)];
        assert_eq!(failing(&faulted, &[delivery("a", 5_000, 21_000)], 0), Vec::<&str>::new());
        assert_eq!(failing(&faulted, &[delivery("a", 5_000, 23_000)], 0), ["caught-up"]);
        // Retries answered 500 first are not duplicates; two accepted deliveries are.
        let retried = [Received { status: 500, ..delivery("a", 5_000, 5_001) }, delivery("a", 5_000, 5_200)];
        let keys = &verdicts(&faulted, &retried, 0)["keys"];
        assert_eq!(
            (keys.counts.get("duplicate_deliveries"), keys.counts["attempts_answered_with_an_error"]),
            (None, 1)
        );
    }
}
