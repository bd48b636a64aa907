//! Cron schedules in a time zone: 5-field (minute precision) or 6-field (with seconds)
//! expressions evaluated by croner on the zone database compiled into the binary (never the
//! host's tzdata), so every replica running the same build computes the same fire times. DST: a wall time that occurs twice fires once, at its first occurrence; a
//! wall time skipped by a spring-forward gap fires at the first instant after the gap.

use jiff::tz::{TimeZone, TimeZoneDatabase};
use jiff::{Timestamp, Zoned};
use std::sync::OnceLock;

/// A parsed schedule, ready to compute fire times.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    cron: croner::Cron,
    zone: TimeZone,
}

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
        Ok(CronSchedule { cron, zone })
    }

    /// The last fire at or before `at_ms`, if any within croner's search bound.
    pub fn last_at_or_before_ms(&self, at_ms: u64) -> Option<u64> {
        let at = Timestamp::from_millisecond(i64::try_from(at_ms).ok()?).ok()?;
        let zoned = Zoned::new(at, self.zone.clone());
        let previous = self.cron.find_previous_occurrence(&zoned, true).ok()?;
        u64::try_from(previous.timestamp().as_millisecond()).ok()
    }

    /// The first fire strictly after `after_ms` (UTC milliseconds), or `None` if there is
    /// none within croner's search bound (e.g. 30 February).
    pub fn next_after_ms(&self, after_ms: u64) -> Option<u64> {
        let after = Timestamp::from_millisecond(i64::try_from(after_ms).ok()?).ok()?;
        let zoned = Zoned::new(after, self.zone.clone());
        let next = self.cron.find_next_occurrence(&zoned, false).ok()?;
        u64::try_from(next.timestamp().as_millisecond()).ok()
    }
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
