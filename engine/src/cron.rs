//! Cron schedules in a time zone: 5-field (minute precision) or 6-field (with seconds)
//! expressions evaluated by croner on the zone database compiled into the binary (never the
//! host's tzdata), so every replica running the same build computes the same fire times.
//! DST, by default: a wall time that occurs twice fires once, at its first occurrence; the
//! wall times a spring-forward gap skips fire once, at the first instant after the gap. A
//! job may choose otherwise (`DstPolicy`): fire a repeated wall time at both occurrences, or
//! skip missing ones. The policy applies to every wall time an expression names: croner
//! finds matching wall times on a clock without DST, and `instants_of` turns each into the
//! instants the policy gives it (engine/tests/cron_dst.rs checks it against a brute-force
//! reference around every switch of six zones).

use jiff::civil;
use jiff::tz::{AmbiguousOffset, Offset, TimeZone, TimeZoneDatabase};
use jiff::{Timestamp, Zoned};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// What a schedule does with wall times that a DST change repeats or skips.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct DstPolicy {
    pub repeated: Repeated,
    pub missing: Missing,
}

/// A wall time that occurs twice (the clock is set back).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum Repeated {
    /// Fires at the first occurrence only.
    #[default]
    First,
    /// Fires at both occurrences.
    Both,
}

/// A wall time that does not occur (the clock jumps forward over it).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum Missing {
    /// Fires at the first instant after the gap.
    #[default]
    Shift,
    /// Does not fire that day.
    Skip,
}

/// A parsed schedule, ready to compute fire times.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    cron: croner::Cron,
    zone: TimeZone,
    dst: DstPolicy,
}

/// Clock changes looked at per computation at most (zones change at most a few times a year).
const TRANSITIONS_LOOKED_AT_MAX: usize = 8;
/// The longest a clock is ever set back (Antarctica/Troll: 2 h), with margin: clock changes
/// this close to a time are looked at.
const FOLD_MS_MAX: i64 = 3 * 3600 * 1000;
/// Wall times one computation looks at, at most: a fire every second across a fold's
/// length on both sides of the answer (2 h each at most), with room to spare.
const CANDIDATES_MAX: usize = 16_384;
/// How far ahead an expression must have an occurrence to be accepted (see `check_fires`).
pub const OCCURRENCE_HORIZON_YEARS: u64 = 5;
const OCCURRENCE_HORIZON_MS: u64 = OCCURRENCE_HORIZON_YEARS * 366 * 24 * 3600 * 1000;

/// Why an expression or a zone was refused (the message names the rule broken).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CronError {
    Expression(String),
    TimeZone(String),
}

impl CronSchedule {
    pub fn parse(expression: &str, time_zone: &str) -> Result<CronSchedule, CronError> {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        if !(5..=6).contains(&fields.len()) {
            return Err(CronError::Expression(format!("must have 5 or 6 fields, found {}", fields.len())));
        }
        let day_of_week = fields[fields.len() - 1];
        if day_of_week.split(',').any(|item| item.eq_ignore_ascii_case("L")) {
            let rule = "a bare L in the day-of-week field names no day (write 5L for the last Friday, or L in the day-of-month field for the last day)";
            return Err(CronError::Expression(rule.to_string()));
        }
        let mut fields: Vec<String> = fields.iter().map(|field| field.to_string()).collect();
        let last = fields.len() - 1;
        fields[last] = sunday_ranges_end_on_sunday(&fields[last]);
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(&fields.join(" "))
            .map_err(|error| CronError::Expression(error.to_string()))?;
        let zone = time_zone_named(time_zone)?;
        Ok(CronSchedule { cron, zone, dst: DstPolicy::default() })
    }

    /// The same schedule under another DST policy.
    pub fn with_dst(self, dst: DstPolicy) -> CronSchedule {
        CronSchedule { dst, ..self }
    }

    /// Refuses a schedule with no fire in the `OCCURRENCE_HORIZON_YEARS` after `now_ms`
    /// (30 February; a weekday that never falls on the date asked with `#`…): such a job
    /// could never fire.
    pub fn check_fires(&self, now_ms: u64) -> Result<(), CronError> {
        match self.next_after_ms(now_ms) {
            Some(next_ms) if next_ms <= now_ms.saturating_add(OCCURRENCE_HORIZON_MS) => Ok(()),
            _ => Err(CronError::Expression(format!(
                "has no occurrence in the next {OCCURRENCE_HORIZON_YEARS} years, so the job could never fire"
            ))),
        }
    }

    /// The first fire strictly after `after_ms` (UTC milliseconds) under the DST policy, or
    /// `None` if there is none within croner's search bound (e.g. 30 February).
    ///
    /// Candidates are the matching wall times, read on a clock without DST (croner in UTC);
    /// each becomes the instants the policy gives it (`instants_of`). Instants follow wall
    /// times in order except inside a fold, so the search starts a fold's length back on
    /// the wall clock when a fold is near, and stops once no later wall time can come first.
    pub fn next_after_ms(&self, after_ms: u64) -> Option<u64> {
        let after_ms = i64::try_from(after_ms).ok()?;
        let back_ms = self.fold_near(after_ms);
        let mut cursor = wall_clock(self.wall_ms(after_ms)? - back_ms)?;
        let mut inclusive = back_ms > 0;
        // The best instant so far, and the wall time past which no candidate can beat it.
        let mut best: Option<(i64, i64)> = None;
        for _ in 0..CANDIDATES_MAX {
            let candidate = self.cron.find_next_occurrence(&cursor, inclusive).ok()?;
            inclusive = false;
            let wall_ms = candidate.timestamp().as_millisecond();
            if best.is_some_and(|(_, stop_wall_ms)| wall_ms > stop_wall_ms) {
                break;
            }
            for instant_ms in self.instants_of(candidate.datetime()).into_iter().flatten() {
                if instant_ms > after_ms && best.is_none_or(|(best_ms, _)| instant_ms < best_ms) {
                    best = Some((instant_ms, wall_ms + self.fold_near(instant_ms)));
                }
            }
            cursor = candidate;
        }
        best.and_then(|(instant_ms, _)| u64::try_from(instant_ms).ok())
    }

    /// The last fire at or before `at_ms` under the DST policy, if any within croner's
    /// search bound (the mirror of `next_after_ms`).
    pub fn last_at_or_before_ms(&self, at_ms: u64) -> Option<u64> {
        let at_ms = i64::try_from(at_ms).ok()?;
        let ahead_ms = self.fold_near(at_ms);
        let mut cursor = wall_clock(self.wall_ms(at_ms)? + ahead_ms)?;
        let mut inclusive = true;
        // The best instant so far, and the wall time before which no candidate can beat it.
        let mut best: Option<(i64, i64)> = None;
        for _ in 0..CANDIDATES_MAX {
            let candidate = self.cron.find_previous_occurrence(&cursor, inclusive).ok()?;
            inclusive = false;
            let wall_ms = candidate.timestamp().as_millisecond();
            if best.is_some_and(|(_, stop_wall_ms)| wall_ms < stop_wall_ms) {
                break;
            }
            for instant_ms in self.instants_of(candidate.datetime()).into_iter().flatten() {
                if instant_ms <= at_ms && best.is_none_or(|(best_ms, _)| instant_ms > best_ms) {
                    best = Some((instant_ms, wall_ms - self.fold_near(instant_ms)));
                }
            }
            cursor = candidate;
        }
        best.and_then(|(instant_ms, _)| u64::try_from(instant_ms).ok())
    }

    /// The instants at which the wall time `wall` fires, earliest first: its one instant; in
    /// a gap (the clock jumps over it) the instant the gap ends (`shift`, so every wall time
    /// of one gap fires once, there) or none (`skip`); in a fold (the clock shows it twice)
    /// the first occurrence (`first`) or both (`both`).
    fn instants_of(&self, wall: civil::DateTime) -> [Option<i64>; 2] {
        let at = |offset: Offset| offset.to_timestamp(wall).ok().map(|t| t.as_millisecond());
        match self.zone.to_ambiguous_timestamp(wall).offset() {
            AmbiguousOffset::Unambiguous { offset } => [at(offset), None],
            AmbiguousOffset::Gap { before, .. } => match self.dst.missing {
                Missing::Skip => [None, None],
                // The gap's transition is the last one at or before the wall time read in
                // the offset before the gap.
                Missing::Shift => {
                    let read_before = before.to_timestamp(wall).ok();
                    let next_ms = read_before.and_then(|t| t.checked_add(jiff::SignedDuration::from_millis(1)).ok());
                    let transition = next_ms.and_then(|t| self.zone.preceding(t).next());
                    [transition.map(|t| t.timestamp().as_millisecond()), None]
                }
            },
            AmbiguousOffset::Fold { before, after } => match self.dst.repeated {
                Repeated::First => [at(before), None],
                Repeated::Both => [at(before), at(after)],
            },
        }
    }

    /// The wall clock at `at_ms` in this zone, as milliseconds of a clock without DST.
    fn wall_ms(&self, at_ms: i64) -> Option<i64> {
        let wall = self.zone.to_datetime(Timestamp::from_millisecond(at_ms).ok()?);
        Some(wall.to_zoned(TimeZone::UTC).ok()?.timestamp().as_millisecond())
    }

    /// How far the clock is set back by a change within `FOLD_MS_MAX` of `at_ms` (the
    /// longest such, ms); 0 when none is: wall times and instants then go in step.
    fn fold_near(&self, at_ms: i64) -> i64 {
        let Ok(from) = Timestamp::from_millisecond(at_ms - FOLD_MS_MAX) else { return 0 };
        let mut fold_ms = 0;
        for transition in self.zone.following(from).take(TRANSITIONS_LOOKED_AT_MAX) {
            let start_ms = transition.timestamp().as_millisecond();
            if start_ms > at_ms + FOLD_MS_MAX {
                break;
            }
            let Ok(just_before) = Timestamp::from_millisecond(start_ms - 1) else { continue };
            let set_back_s = self.zone.to_offset(just_before).seconds() - transition.offset().seconds();
            fold_ms = fold_ms.max(i64::from(set_back_s) * 1000);
        }
        fold_ms
    }
}

/// A wall time as a `Zoned` in UTC, where croner searches without DST.
fn wall_clock(wall_ms: i64) -> Option<Zoned> {
    Some(Zoned::new(Timestamp::from_millisecond(wall_ms).ok()?, TimeZone::UTC))
}

/// In the day-of-week field, a range that starts on Sunday and ends on `SUN` is Sunday alone
/// (`SUN-SUN`, `0-SUN`); croner reads such an end as 7, which made the range every day.
fn sunday_ranges_end_on_sunday(day_of_week: &str) -> String {
    let items = day_of_week.split(',').map(|item| {
        let (range, step) = item.split_once('/').map_or((item, None), |(range, step)| (range, Some(step)));
        let fixed = match range.split_once('-') {
            Some((start, end))
                if end.eq_ignore_ascii_case("SUN") && (start == "0" || start.eq_ignore_ascii_case("SUN")) =>
            {
                "0".to_string()
            }
            _ => range.to_string(),
        };
        step.map_or(fixed.clone(), |step| format!("{fixed}/{step}"))
    });
    items.collect::<Vec<_>>().join(",")
}

/// The zone of that IANA name, from the database compiled into the binary. (`jiff::tz::db()`
/// would prefer the host's /usr/share/zoneinfo, which differs between machines.)
pub fn time_zone_named(name: &str) -> Result<TimeZone, CronError> {
    static BUNDLED: OnceLock<TimeZoneDatabase> = OnceLock::new();
    BUNDLED
        .get_or_init(TimeZoneDatabase::bundled)
        .get(name)
        .map_err(|_| CronError::TimeZone(format!("unknown IANA time zone {name:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> u64 {
        rfc3339.parse::<Timestamp>().expect("valid").as_millisecond() as u64
    }

    fn fires(schedule: &CronSchedule, from: &str, count: usize) -> Vec<String> {
        let mut at = ms(from);
        let mut out = Vec::new();
        for _ in 0..count {
            at = schedule.next_after_ms(at).expect("a next fire");
            out.push(Timestamp::from_millisecond(at as i64).expect("valid").to_string());
        }
        out
    }

    #[test]
    fn five_and_six_fields_in_utc() {
        let every_5_min = CronSchedule::parse("*/5 * * * *", "UTC").expect("valid");
        assert_eq!(fires(&every_5_min, "2026-03-01T10:02:00Z", 2), ["2026-03-01T10:05:00Z", "2026-03-01T10:10:00Z"]);
        let every_10_s = CronSchedule::parse("*/10 * * * * *", "UTC").expect("valid");
        assert_eq!(fires(&every_10_s, "2026-03-01T10:00:05Z", 2), ["2026-03-01T10:00:10Z", "2026-03-01T10:00:20Z"]);
    }

    #[test]
    fn fall_back_fires_a_repeated_wall_time_once() {
        // New York, 2026-11-01: 01:30 happens at 05:30Z (EDT) and again at 06:30Z (EST).
        let daily = CronSchedule::parse("30 1 * * *", "America/New_York").expect("valid");
        assert_eq!(fires(&daily, "2026-10-31T12:00:00Z", 2), ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]);
    }

    #[test]
    fn spring_forward_fires_a_skipped_wall_time_after_the_gap() {
        // Paris, 2026-03-29: 02:00-03:00 does not exist; 02:30 fires at 03:00 CEST = 01:00Z.
        let daily = CronSchedule::parse("30 2 * * *", "Europe/Paris").expect("valid");
        assert_eq!(fires(&daily, "2026-03-28T12:00:00Z", 2), ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]);
    }

    fn with(expression: &str, zone: &str, repeated: Repeated, missing: Missing) -> CronSchedule {
        CronSchedule::parse(expression, zone).expect("valid").with_dst(DstPolicy { repeated, missing })
    }

    #[test]
    fn fall_back_fires_a_repeated_wall_time_twice_when_asked() {
        let daily = with("30 1 * * *", "America/New_York", Repeated::Both, Missing::Shift);
        let got = fires(&daily, "2026-10-31T12:00:00Z", 3);
        assert_eq!(got, ["2026-11-01T05:30:00Z", "2026-11-01T06:30:00Z", "2026-11-02T06:30:00Z"]);
        // Every 20 minutes through the repeated hour: 01:00, 01:20, 01:40 twice each.
        let often = with("*/20 1 * * *", "America/New_York", Repeated::Both, Missing::Shift);
        let got = fires(&often, "2026-11-01T04:59:00Z", 7);
        let want = ["05:00", "05:20", "05:40", "06:00", "06:20", "06:40"].map(|t| format!("2026-11-01T{t}:00Z"));
        assert_eq!(got[..6], want);
        assert_eq!(got[6], "2026-11-02T06:00:00Z");
    }

    #[test]
    fn spring_forward_skips_a_missing_wall_time_when_asked() {
        let daily = with("30 2 * * *", "Europe/Paris", Repeated::First, Missing::Skip);
        assert_eq!(fires(&daily, "2026-03-28T12:00:00Z", 2), ["2026-03-30T00:30:00Z", "2026-03-31T00:30:00Z"]);
        // A real match at the gap's end still fires: 03:00 exists.
        let half_hourly = with("0,30 2,3 * * *", "Europe/Paris", Repeated::First, Missing::Skip);
        assert_eq!(fires(&half_hourly, "2026-03-29T00:30:00Z", 2), ["2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z"]);
        assert_eq!(daily.last_at_or_before_ms(ms("2026-03-29T12:00:00Z")), Some(ms("2026-03-28T01:30:00Z")));
    }

    #[test]
    fn lord_howe_half_hour_shift() {
        // Lord Howe moves from +11 to +10:30 on 2026-04-05 at 02:00 local: 01:45 repeats.
        let daily = CronSchedule::parse("45 1 * * *", "Australia/Lord_Howe").expect("valid");
        let got = fires(&daily, "2026-04-04T00:00:00Z", 2);
        assert_eq!(got, ["2026-04-04T14:45:00Z", "2026-04-05T15:15:00Z"], "once per day across the shift");
    }

    #[test]
    fn the_last_fire_at_or_before_a_time() {
        let every_5_min = CronSchedule::parse("*/5 * * * *", "UTC").expect("valid");
        assert_eq!(every_5_min.last_at_or_before_ms(ms("2026-03-01T10:07:00Z")), Some(ms("2026-03-01T10:05:00Z")));
        assert_eq!(every_5_min.last_at_or_before_ms(ms("2026-03-01T10:05:00Z")), Some(ms("2026-03-01T10:05:00Z")));
    }

    #[test]
    fn bad_expressions_and_zones_are_named() {
        assert!(matches!(CronSchedule::parse("* * *", "UTC"), Err(CronError::Expression(_))));
        assert!(matches!(CronSchedule::parse("61 * * * *", "UTC"), Err(CronError::Expression(_))));
        assert!(matches!(CronSchedule::parse("* * * * *", "Mars/Olympus"), Err(CronError::TimeZone(_))));
    }
}
