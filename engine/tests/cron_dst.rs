//! Cron on the days clocks change, against a brute-force reference written here: every
//! minute of a window is read on the zone's wall clock and matched with a small field
//! matcher of its own (not croner), and the DST policy is applied by its definition —
//! a repeated wall time fires at its first occurrence (`first`) or at both (`both`); the
//! wall times a gap skips fire once at the gap's end (`shift`) or not at all (`skip`).
//! Real zones: New York, Paris, London, Lord Howe (30-minute shift), Chatham (+12:45/+13:45),
//! Santiago (switches at midnight). Time is an argument everywhere: no clock is read.

use jiff::tz::TimeZone;
use jiff::Timestamp;
use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeSet;
use sundial_engine::cron::{time_zone_named, CronSchedule, DstPolicy, Missing, Repeated};
use sundial_engine::request::parse_job_request;
use sundial_engine::spec::PackedSpec;
use sundial_engine::state::{Command, Due, Outcome, State};

const ZONES: [&str; 6] =
    ["America/New_York", "Europe/Paris", "Europe/London", "Australia/Lord_Howe", "Pacific/Chatham", "America/Santiago"];
const POLICIES: [DstPolicy; 4] = [
    DstPolicy { repeated: Repeated::First, missing: Missing::Shift },
    DstPolicy { repeated: Repeated::First, missing: Missing::Skip },
    DstPolicy { repeated: Repeated::Both, missing: Missing::Shift },
    DstPolicy { repeated: Repeated::Both, missing: Missing::Skip },
];
const MINUTE_MS: i64 = 60_000;

fn ms(rfc3339: &str) -> i64 {
    rfc3339.parse::<Timestamp>().expect("a valid time").as_millisecond()
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).expect("in range")
}

/// The values a cron field allows: `*`, `*/k`, `a`, `a-b`, `a-b/k`, and lists of those.
fn field_values(field: &str, low: u32, high: u32) -> BTreeSet<u32> {
    let mut values = BTreeSet::new();
    for item in field.split(',') {
        let (range, step) = item.split_once('/').map_or((item, 1), |(r, s)| (r, s.parse().expect("a step")));
        let (from, to) = match range {
            "*" => (low, high),
            _ => match range.split_once('-') {
                Some((a, b)) => (a.parse().expect("a number"), b.parse().expect("a number")),
                None => {
                    let single = range.parse().expect("a number");
                    (single, if item.contains('/') { high } else { single })
                }
            },
        };
        values.extend((from..=to).step_by(step as usize));
    }
    values
}

/// A 5-field expression with only its minute and hour fields restricted, as the reference
/// reads it.
struct Reference {
    minutes: BTreeSet<u32>,
    hours: BTreeSet<u32>,
}

impl Reference {
    fn new(expression: &str) -> Reference {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        assert_eq!(&fields[2..], ["*", "*", "*"], "the reference reads minute and hour fields only");
        Reference { minutes: field_values(fields[0], 0, 59), hours: field_values(fields[1], 0, 23) }
    }

    fn matches(&self, wall: jiff::civil::DateTime) -> bool {
        wall.second() == 0
            && self.minutes.contains(&(wall.minute() as u32))
            && self.hours.contains(&(wall.hour() as u32))
    }

    /// The fires in `[from_ms, to_ms)` by the policy's definition, minute by minute.
    fn fires(&self, zone: &TimeZone, dst: DstPolicy, from_ms: i64, to_ms: i64) -> Vec<i64> {
        let mut fires = BTreeSet::new();
        let offset_ms = |t: i64| i64::from(zone.to_offset(at(t)).seconds()) * 1000;
        for t in (from_ms..to_ms).step_by(MINUTE_MS as usize) {
            let (before, now) = (offset_ms(t - 1), offset_ms(t));
            if now > before && dst.missing == Missing::Shift {
                // The clock jumps forward at t: the wall times it skips fire once, at t.
                let skipped = (t + before..t + now).step_by(MINUTE_MS as usize);
                if skipped.map(|wall| at(wall).to_zoned(TimeZone::UTC).datetime()).any(|w| self.matches(w)) {
                    fires.insert(t);
                }
            }
            if !self.matches(zone.to_datetime(at(t))) {
                continue;
            }
            // Shown before? The same wall time an earlier instant showed (the clock went back).
            let wall = t + offset_ms(t);
            let repeat = (1..=180).any(|minutes| {
                let earlier = t - minutes * MINUTE_MS;
                earlier + offset_ms(earlier) == wall
            });
            if !repeat || dst.repeated == Repeated::Both {
                fires.insert(t);
            }
        }
        fires.into_iter().collect()
    }
}

/// What the engine fires in `[from_ms, to_ms)`.
fn engine_fires(schedule: &CronSchedule, from_ms: i64, to_ms: i64) -> Vec<i64> {
    let mut fires = Vec::new();
    let mut after = (from_ms - 1) as u64;
    // Bounded: a window of days holds at most a few thousand fires.
    for _ in 0..10_000 {
        match schedule.next_after_ms(after) {
            Some(next) if (next as i64) < to_ms => {
                fires.push(next as i64);
                after = next;
            }
            _ => break,
        }
    }
    fires
}

/// The clock changes of `zone` in 2024–2030.
fn switches(zone: &TimeZone) -> Vec<i64> {
    let from = at(ms("2024-01-01T00:00:00Z"));
    let until = ms("2031-01-01T00:00:00Z");
    zone.following(from).map(|t| t.timestamp().as_millisecond()).take_while(|t| *t < until).collect()
}

fn check(expression: &str, zone_name: &str, dst: DstPolicy, from_ms: i64, to_ms: i64) -> Result<(), String> {
    let zone = time_zone_named(zone_name).expect("a zone");
    let schedule = CronSchedule::parse(expression, zone_name).expect("valid").with_dst(dst);
    let want = Reference::new(expression).fires(&zone, dst, from_ms, to_ms);
    let got = engine_fires(&schedule, from_ms, to_ms);
    if want != got {
        let show = |v: &[i64]| v.iter().map(|t| zone.to_datetime(at(*t)).to_string()).collect::<Vec<_>>();
        return Err(format!(
            "{expression} in {zone_name} with {dst:?} from {}: want {:?}, got {:?}",
            at(from_ms),
            show(&want),
            show(&got)
        ));
    }
    // The last fire at or before any minute agrees with the same list.
    for probe in (from_ms + 26 * 3600 * 1000 - 4 * 3600 * 1000..from_ms + 26 * 3600 * 1000 + 4 * 3600 * 1000)
        .step_by(15 * MINUTE_MS as usize)
    {
        let expected = want.iter().rev().find(|t| **t <= probe).copied();
        let last = schedule.last_at_or_before_ms(probe as u64).map(|t| t as i64);
        if expected.is_some() && last != expected {
            return Err(format!(
                "{expression} in {zone_name} with {dst:?}: last at or before {}: want {expected:?}, got {last:?}",
                at(probe)
            ));
        }
    }
    Ok(())
}

/// The table: multi-time expressions, ranges and steps, around every switch of every zone
/// in 2026, under each policy, against the reference.
#[test]
fn every_policy_holds_for_every_expression_around_every_switch() {
    let expressions = [
        "0,30 2 * * *",
        "0,30 1 * * *",
        "15,45 0-2 * * *",
        "*/20 1 * * *",
        "*/15 * * * *",
        "0 2 * * *",
        "30 2 * * *",
        "45 1 * * *",
        "0,15,30,45 0-3 * * *",
        "5 23,0 * * *",
        "*/7 0-1 * * *",
        "0 */2 * * *",
    ];
    let mut failures = Vec::new();
    for zone_name in ZONES {
        let zone = time_zone_named(zone_name).expect("a zone");
        let year = switches(&zone)
            .into_iter()
            .filter(|t| (ms("2026-01-01T00:00:00Z")..ms("2027-01-01T00:00:00Z")).contains(t));
        for switch in year {
            for expression in expressions {
                for dst in POLICIES {
                    let from = (switch - 26 * 3600 * 1000) / MINUTE_MS * MINUTE_MS;
                    if let Err(failure) = check(expression, zone_name, dst, from, from + 52 * 3600 * 1000) {
                        failures.push(failure);
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// The cases the differential test of issue 27 found, with their expected fires written out.
#[test]
fn the_cases_that_were_wrong_fire_as_documented() {
    let utc = |times: &[&str]| times.iter().map(|t| ms(t)).collect::<Vec<_>>();
    let fires = |expression: &str, zone: &str, dst: DstPolicy, from: &str, to: &str| {
        let schedule = CronSchedule::parse(expression, zone).expect("valid").with_dst(dst);
        engine_fires(&schedule, ms(from), ms(to))
    };
    let default = DstPolicy::default();
    // New York springs forward at 02:00 EST (07:00Z) on 2026-03-08: 02:00 and 02:30 fire
    // once, at 03:00 EDT — not lost.
    let want = utc(&["2026-03-07T07:00:00Z", "2026-03-07T07:30:00Z", "2026-03-08T07:00:00Z", "2026-03-09T06:00:00Z"]);
    assert_eq!(
        fires("0,30 2 * * *", "America/New_York", default, "2026-03-07T00:00:00Z", "2026-03-09T06:10:00Z"),
        want
    );
    // New York falls back at 02:00 EDT (06:00Z) on 2026-11-01: 01:00 and 01:30 fire twice
    // only when asked.
    let both = DstPolicy { repeated: Repeated::Both, missing: Missing::Shift };
    let first_only = utc(&["2026-11-01T05:00:00Z", "2026-11-01T05:30:00Z"]);
    let twice = utc(&["2026-11-01T05:00:00Z", "2026-11-01T05:30:00Z", "2026-11-01T06:00:00Z", "2026-11-01T06:30:00Z"]);
    let window = ("2026-11-01T04:00:00Z", "2026-11-01T12:00:00Z");
    assert_eq!(fires("0,30 1 * * *", "America/New_York", default, window.0, window.1), first_only);
    assert_eq!(fires("0,30 1 * * *", "America/New_York", both, window.0, window.1), twice);
    // Paris springs forward at 02:00 CET (01:00Z) on 2026-03-29: 02:15 and 02:45 fire once
    // at 03:00 CEST.
    let want = utc(&[
        "2026-03-28T23:15:00Z",
        "2026-03-28T23:45:00Z",
        "2026-03-29T00:15:00Z",
        "2026-03-29T00:45:00Z",
        "2026-03-29T01:00:00Z",
    ]);
    assert_eq!(fires("15,45 0-2 * * *", "Europe/Paris", default, "2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z"), want);
    // London springs forward at 01:00 GMT on 2026-03-29: 01:15:30 and 01:45:30 fire once,
    // at 02:00:00 BST.
    let seconds = fires("30 15,45 1 * * *", "Europe/London", default, "2026-03-29T00:00:00Z", "2026-03-29T12:00:00Z");
    assert_eq!(seconds, utc(&["2026-03-29T01:00:00Z"]));
}

/// A job created just before New York springs forward, with time as an input: its 02:00
/// and 02:30 fires are due once, at 03:00 EDT, and the day after fires as usual.
#[test]
fn a_job_created_before_spring_forward_fires_after_the_gap_and_is_not_lost() {
    let now = ms("2026-03-08T06:50:00Z") as u64; // 01:50 EST
    let request = json!({"id": "nightly", "cron": "0,30 2 * * *", "time_zone": "America/New_York", "url": "https://example.com/n"});
    let spec = parse_job_request(&request.to_string(), now, "unused").expect("a valid job");
    let mut state = State::new();
    state.apply(Command::Create { spec: PackedSpec::of(&spec), now_ms: now, dedup_window_ms: None }).expect("created");
    let due = state.next_due("nightly").expect("a fire is due");
    let fire_ms = ms("2026-03-08T07:00:00Z") as u64;
    assert_eq!(due.0, fire_ms, "03:00 EDT");
    assert!(matches!(due.1, Due::NewFire { fire_ms: f } if f == fire_ms));
    // It fires (started, delivered) at 03:00; the next is 02:00 EDT the day after.
    state
        .apply(Command::FireStarted { id: "nightly".into(), fire_ms, attempt: 1, node: 1, now_ms: fire_ms })
        .expect("started");
    let outcome = Outcome::Response { status: 200, body: Vec::new(), retry_after_ms: None, no_retry: false };
    let finished = Command::AttemptFinished {
        id: "nightly".into(),
        fire_ms,
        attempt: 1,
        node: 1,
        started_ms: fire_ms,
        finished_ms: fire_ms + 5,
        outcome,
        retry_at_ms: fire_ms + 1_000,
    };
    state.apply(finished).expect("delivered");
    assert_eq!(state.next_due("nightly").map(|d| d.0), Some(ms("2026-03-09T06:00:00Z") as u64));
}

#[test]
fn sunday_ranges_and_expressions_that_never_fire() {
    let sundays = CronSchedule::parse("0 12 * * SUN-SUN", "UTC").expect("valid");
    let zero_to_sun = CronSchedule::parse("0 12 * * 0-SUN", "UTC").expect("valid");
    let from = ms("2026-12-01T00:00:00Z"); // a Tuesday
    for schedule in [&sundays, &zero_to_sun] {
        assert_eq!(
            engine_fires(schedule, from, from + 14 * 86_400_000),
            [ms("2026-12-06T12:00:00Z"), ms("2026-12-13T12:00:00Z")]
        );
    }
    let every_day = CronSchedule::parse("0 12 * * MON-SUN", "UTC").expect("valid");
    assert_eq!(engine_fires(&every_day, from, from + 7 * 86_400_000).len(), 7, "MON-SUN is every day");
    let now = from as u64;
    for (expression, rule) in [("0 0 30 2 *", "no occurrence in the next 5 years"), ("0 0 * * L", "bare L")] {
        let request = json!({"cron": expression, "url": "https://example.com/x"});
        let problems = parse_job_request(&request.to_string(), now, "x").expect_err("refused");
        assert!(problems.iter().any(|p| p.field == "cron" && p.rule.contains(rule)), "{expression}: {problems:?}");
    }
}

fn expressions() -> impl Strategy<Value = String> {
    let minute = prop_oneof![
        (0u32..60).prop_map(|m| m.to_string()),
        (1u32..31).prop_map(|k| format!("*/{k}")),
        (0u32..60, 0u32..60).prop_map(|(a, b)| format!("{},{}", a.min(b), a.max(b))),
        (0u32..50, 1u32..10).prop_map(|(a, d)| format!("{a}-{}", a + d)),
    ];
    let hour = prop_oneof![
        Just("*".to_string()),
        (0u32..24).prop_map(|h| h.to_string()),
        (0u32..4, 1u32..3).prop_map(|(a, d)| format!("{a}-{}", a + d)),
        (0u32..24, 0u32..24).prop_map(|(a, b)| format!("{},{}", a.min(b), a.max(b))),
        (2u32..6).prop_map(|k| format!("*/{k}")),
    ];
    (minute, hour).prop_map(|(m, h)| format!("{m} {h} * * *"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Random expressions, zones, policies and switches of 2024–2030, against the reference.
    #[test]
    fn random_expressions_agree_with_the_reference(
        expression in expressions(),
        zone_index in 0usize..ZONES.len(),
        policy_index in 0usize..POLICIES.len(),
        switch_pick in any::<prop::sample::Index>(),
    ) {
        let zone_name = ZONES[zone_index];
        let zone = time_zone_named(zone_name).expect("a zone");
        let all = switches(&zone);
        let switch = all[switch_pick.index(all.len())];
        let from = (switch - 26 * 3600 * 1000) / MINUTE_MS * MINUTE_MS;
        let outcome = check(&expression, zone_name, POLICIES[policy_index], from, from + 52 * 3600 * 1000);
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

/// What was right before issue 27 and stays so (UTC, away from clock changes).
#[test]
fn calendar_rules_that_were_right_stay_right() {
    let next = |expression: &str, from: &str| {
        let schedule = CronSchedule::parse(expression, "UTC").expect("valid");
        schedule.next_after_ms(ms(from) as u64).map(|t| at(t as i64).to_string())
    };
    let cases = [
        ("0 0 29 2 *", "2096-03-01T00:00:00Z", "2104-02-29T00:00:00Z"), // 2100 is not a leap year
        ("0 0 31 * *", "2026-04-01T00:00:00Z", "2026-05-31T00:00:00Z"), // April has no 31st
        ("0 12 * * 7", "2026-12-01T00:00:00Z", "2026-12-06T12:00:00Z"), // 7 is Sunday
        ("0 0 L * *", "2026-02-01T00:00:00Z", "2026-02-28T00:00:00Z"),  // last day
        ("0 0 LW * *", "2026-05-01T00:00:00Z", "2026-05-29T00:00:00Z"), // last weekday (31st is a Sunday)
        ("0 0 15W * *", "2026-08-01T00:00:00Z", "2026-08-14T00:00:00Z"), // the 15th is a Saturday
        ("0 0 * * 1#1", "2026-05-05T00:00:00Z", "2026-06-01T00:00:00Z"), // first Monday (May 4 passed)
        ("0 0 * * 5L", "2026-05-01T00:00:00Z", "2026-05-29T00:00:00Z"), // last Friday
        ("0 0 1 1 *", "2026-12-31T12:00:00Z", "2027-01-01T00:00:00Z"),  // year roll-over
        ("0 0 * * *", "2026-12-01T00:00:00Z", "2026-12-02T00:00:00Z"),  // `from` is exclusive
    ];
    for (expression, from, want) in cases {
        assert_eq!(next(expression, from).as_deref(), Some(want), "{expression} after {from}");
    }
}
