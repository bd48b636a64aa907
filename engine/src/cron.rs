//! Cron schedules in a time zone: 5-field (minute precision) or 6-field (with seconds)
//! expressions evaluated by croner on the zone database compiled into the binary (never the
//! host's tzdata), so every replica running the same build computes the same fire times.
//! DST, by default: a wall time that occurs twice fires once, at its first occurrence; a
//! wall time skipped by a spring-forward gap fires at the first instant after the gap. A job
//! may choose otherwise (`DstPolicy`): fire a repeated wall time at both occurrences, or
//! skip a missing one.

use jiff::tz::{TimeZone, TimeZoneDatabase};
use jiff::{Timestamp, Zoned};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// What a schedule does with wall times that a DST change repeats or skips.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DstPolicy {
    pub repeated: Repeated,
    pub missing: Missing,
}

/// A wall time that occurs twice (the clock is set back).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Repeated {
    /// Fires at the first occurrence only.
    #[default]
    First,
    /// Fires at both occurrences.
    Both,
}

/// A wall time that does not occur (the clock jumps forward over it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
/// Gap-shifted candidates skipped per computation at most (one per gap; gaps are months apart).
const SKIPPED_CANDIDATES_MAX: usize = 16;
/// The longest a clock is ever set back (Antarctica/Troll: 2 h), with margin.
const FOLD_MS_MAX: u64 = 3 * 3600 * 1000;

/// Why an expression or a zone was refused (the message names the rule broken).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CronError {
    Expression(String),
    TimeZone(String),
}

impl CronSchedule {
    pub fn parse(expression: &str, time_zone: &str) -> Result<CronSchedule, CronError> {
        let fields = expression.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(CronError::Expression(format!("must have 5 or 6 fields, found {fields}")));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(expression)
            .map_err(|error| CronError::Expression(error.to_string()))?;
        let zone = time_zone_named(time_zone)?;
        Ok(CronSchedule { cron, zone, dst: DstPolicy::default() })
    }

    /// The same schedule under another DST policy.
    pub fn with_dst(self, dst: DstPolicy) -> CronSchedule {
        CronSchedule { dst, ..self }
    }

    /// The last fire at or before `at_ms`, if any within croner's search bound. (A repeated
    /// wall time counts at its first occurrence here, whatever the policy.)
    pub fn last_at_or_before_ms(&self, at_ms: u64) -> Option<u64> {
        let mut at_ms = at_ms;
        for _ in 0..SKIPPED_CANDIDATES_MAX {
            let zoned = Zoned::new(timestamp(at_ms)?, self.zone.clone());
            let previous = self.cron.find_previous_occurrence(&zoned, true).ok()?;
            let previous_ms = u64::try_from(previous.timestamp().as_millisecond()).ok()?;
            if self.dst.missing == Missing::Shift || self.matches_wall_time(previous_ms) {
                return Some(previous_ms);
            }
            at_ms = previous_ms.checked_sub(1)?;
        }
        None
    }

    /// The first fire strictly after `after_ms` (UTC milliseconds), or `None` if there is
    /// none within croner's search bound (e.g. 30 February).
    pub fn next_after_ms(&self, after_ms: u64) -> Option<u64> {
        let mut next = self.croner_next_after_ms(after_ms);
        if self.dst.missing == Missing::Skip {
            // croner moves a wall time that a gap skips to the gap's end; under `Skip` such a
            // fire is dropped (a real match at that instant is kept).
            for _ in 0..SKIPPED_CANDIDATES_MAX {
                match next {
                    Some(at) if !self.matches_wall_time(at) => next = self.croner_next_after_ms(at),
                    _ => break,
                }
            }
            next = next.filter(|at| self.matches_wall_time(*at));
        }
        if self.dst.repeated == Repeated::Both {
            if let Some(second) = self.second_occurrence_after(after_ms, next.unwrap_or(u64::MAX)) {
                return Some(second);
            }
        }
        next
    }

    fn croner_next_after_ms(&self, after_ms: u64) -> Option<u64> {
        let zoned = Zoned::new(timestamp(after_ms)?, self.zone.clone());
        let next = self.cron.find_next_occurrence(&zoned, false).ok()?;
        u64::try_from(next.timestamp().as_millisecond()).ok()
    }

    /// Whether the wall clock at `at_ms` matches the expression (a gap-shifted fire does not).
    fn matches_wall_time(&self, at_ms: u64) -> bool {
        timestamp(at_ms)
            .is_some_and(|at| self.cron.is_time_matching(&Zoned::new(at, self.zone.clone())).unwrap_or(false))
    }

    /// The earliest second occurrence of a repeated wall time that matches, after
    /// `after_ms` and before `before_ms`. croner gives first occurrences only: when the clock
    /// is set back at T by d, the instants [T, T + d) show wall times already shown, and
    /// those are searched here, in the offset after T.
    fn second_occurrence_after(&self, after_ms: u64, before_ms: u64) -> Option<u64> {
        let from = timestamp(after_ms.saturating_sub(FOLD_MS_MAX))?;
        let mut best: Option<u64> = None;
        for transition in self.zone.following(from).take(TRANSITIONS_LOOKED_AT_MAX) {
            let start_ms = u64::try_from(transition.timestamp().as_millisecond()).ok()?;
            if start_ms >= before_ms.min(best.unwrap_or(u64::MAX)) {
                break;
            }
            let offset_after = transition.offset();
            let offset_before = self.zone.to_offset(timestamp(start_ms.checked_sub(1)?)?);
            let fold_ms = (offset_before.seconds() - offset_after.seconds()) as i64 * 1000;
            if fold_ms <= 0 {
                continue; // the clock moved forward: nothing repeats
            }
            let end_ms = start_ms + fold_ms as u64;
            // The first whole second after `after_ms` inside the fold, as a wall time read
            // in UTC (a clock without DST), where croner can search it.
            let first_ms = (after_ms + 1).max(start_ms).div_ceil(1000) * 1000;
            if first_ms >= end_ms {
                continue;
            }
            let offset_ms = i64::from(offset_after.seconds()) * 1000;
            let wall_ms = i64::try_from(first_ms).ok()? + offset_ms;
            let wall = Zoned::new(Timestamp::from_millisecond(wall_ms).ok()?, TimeZone::UTC);
            let Ok(found) = self.cron.find_next_occurrence(&wall, true) else { continue };
            let found_ms = u64::try_from(found.timestamp().as_millisecond() - offset_ms).ok()?;
            if found_ms < end_ms && found_ms < before_ms && found_ms > after_ms {
                best = Some(best.map_or(found_ms, |b| b.min(found_ms)));
            }
        }
        best
    }
}

fn timestamp(at_ms: u64) -> Option<Timestamp> {
    Timestamp::from_millisecond(i64::try_from(at_ms).ok()?).ok()
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
