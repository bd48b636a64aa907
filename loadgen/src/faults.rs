//! The sink's failure injection: which deliveries it answers with a 500, which with a 429
//! and Retry-After, and how long it waits before answering. Decided by a hash of the
//! idempotency key and attempt number, so a run is reproducible and a retried attempt gets
//! a fresh draw (a job is not failed forever by bad luck of its key alone).

/// How the sink misbehaves. The default answers every delivery 200 at once.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Share of attempts answered 500 (0.0 ..= 1.0).
    pub fail_rate: f64,
    /// Share of attempts answered 429 with `Retry-After: retry_after_s` (0.0 ..= 1.0).
    pub throttle_rate: f64,
    pub retry_after_s: u32,
    /// Every answer waits this long first, ms.
    pub delay_ms: u64,
}

/// What the sink answers one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Accept,
    Fail,
    Throttle { retry_after_s: u32 },
}

impl Faults {
    /// The rates, each within 0..=1 and together at most 1, or the rule they break.
    pub fn check(&self) -> Result<(), String> {
        for (name, rate) in [("--sink-fail-rate", self.fail_rate), ("--sink-429-rate", self.throttle_rate)] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name}: must be within 0.0..=1.0 (got {rate})"));
            }
        }
        if self.fail_rate + self.throttle_rate > 1.0 {
            return Err("--sink-fail-rate + --sink-429-rate: must be at most 1.0 together".into());
        }
        Ok(())
    }

    pub fn answer(&self, idempotency_key: &str, attempt: u32) -> Answer {
        let draw = unit_draw(idempotency_key, attempt);
        if draw < self.fail_rate {
            Answer::Fail
        } else if draw < self.fail_rate + self.throttle_rate {
            Answer::Throttle { retry_after_s: self.retry_after_s }
        } else {
            Answer::Accept
        }
    }
}

/// A number in [0, 1) from FNV-1a over the key and attempt, then a 64-bit finalizer (FNV
/// alone leaves neighbouring keys too alike in the high bits).
fn unit_draw(key: &str, attempt: u32) -> f64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes().iter().chain(attempt.to_le_bytes().iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rates_hold_over_many_keys_and_each_answer_is_reproducible() {
        let faults = Faults { fail_rate: 0.1, throttle_rate: 0.05, retry_after_s: 2, delay_ms: 0 };
        let answers: Vec<Answer> = (0..20_000).map(|i| faults.answer(&format!("job-{i}:1700000000000"), 1)).collect();
        let fails = answers.iter().filter(|a| **a == Answer::Fail).count();
        let throttles = answers.iter().filter(|a| **a == Answer::Throttle { retry_after_s: 2 }).count();
        assert!((1_800..=2_200).contains(&fails), "{fails} of 20,000 failed, 2,000 expected");
        assert!((850..=1_150).contains(&throttles), "{throttles} of 20,000 throttled, 1,000 expected");
        assert_eq!(faults.answer("job-7:1", 1), faults.answer("job-7:1", 1));
        // A retry draws again: of the keys failed on attempt 1, about 90 % pass on attempt 2.
        let failed_first: Vec<usize> = (0..20_000).filter(|i| answers[*i] == Answer::Fail).collect();
        let failed_again =
            failed_first.iter().filter(|i| faults.answer(&format!("job-{i}:1700000000000"), 2) == Answer::Fail).count();
        assert!(failed_again * 5 < failed_first.len(), "{failed_again} of {} failed twice", failed_first.len());
    }

    #[test]
    fn no_faults_accepts_everything_and_bad_rates_are_named() {
        assert!((0..1_000).all(|i| Faults::default().answer(&i.to_string(), 1) == Answer::Accept));
        let all = Faults { fail_rate: 1.0, ..Faults::default() };
        assert!((0..1_000).all(|i| all.answer(&i.to_string(), 3) == Answer::Fail));
        let bad = Faults { fail_rate: 1.5, ..Faults::default() };
        assert!(bad.check().unwrap_err().contains("--sink-fail-rate"));
        let over = Faults { fail_rate: 0.6, throttle_rate: 0.6, ..Faults::default() };
        assert!(over.check().unwrap_err().contains("together"));
    }
}
