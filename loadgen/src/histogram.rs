//! Latency histograms: HdrHistogram in microseconds (3 significant digits, up to an hour),
//! and the percentile table a run prints and writes.

use hdrhistogram::Histogram;

/// The quantiles every table shows.
pub const QUANTILES: [f64; 7] = [0.5, 0.9, 0.99, 0.999, 0.9999, 1.0, 0.0];

pub struct Latencies {
    histogram: Histogram<u64>,
    /// Values over the histogram's range, recorded as its maximum and counted here.
    clipped: u64,
}

impl Default for Latencies {
    fn default() -> Latencies {
        Latencies::new()
    }
}

impl Latencies {
    pub fn new() -> Latencies {
        let histogram = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid");
        Latencies { histogram, clipped: 0 }
    }

    pub fn record_us(&mut self, value_us: u64) {
        let highest = self.histogram.high();
        if value_us > highest {
            self.clipped += 1;
        }
        // Saturated to the range: never refused.
        self.histogram.saturating_record(value_us.clamp(1, highest));
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The value at `quantile` (0.0 = min, 1.0 = max), µs; 0 when empty.
    pub fn at_us(&self, quantile: f64) -> u64 {
        if self.histogram.is_empty() {
            return 0;
        }
        match quantile {
            q if q <= 0.0 => self.histogram.min(),
            q if q >= 1.0 => self.histogram.max(),
            q => self.histogram.value_at_quantile(q),
        }
    }

    /// `(label, µs)` rows for p50 … max, then min.
    pub fn table(&self) -> Vec<(String, u64)> {
        QUANTILES
            .iter()
            .map(|q| {
                let label = match *q {
                    q if q >= 1.0 => "max".to_string(),
                    q if q <= 0.0 => "min".to_string(),
                    q => format!("p{}", trim(q * 100.0)),
                };
                (label, self.at_us(*q))
            })
            .collect()
    }

    pub fn clipped(&self) -> u64 {
        self.clipped
    }
}

fn trim(percent: f64) -> String {
    let text = format!("{percent:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_spread_are_where_they_should_be() {
        let mut latencies = Latencies::new();
        for value in 1..=10_000u64 {
            latencies.record_us(value);
        }
        let within = |value: u64, expected: u64| value.abs_diff(expected) * 1_000 <= expected; // 0.1 %
        assert!(within(latencies.at_us(0.5), 5_000), "{}", latencies.at_us(0.5));
        assert!(within(latencies.at_us(0.99), 9_900), "{}", latencies.at_us(0.99));
        assert_eq!((latencies.at_us(0.0), latencies.count()), (1, 10_000));
        assert!(within(latencies.at_us(1.0), 10_000));
        let labels: Vec<String> = latencies.table().into_iter().map(|(label, _)| label).collect();
        assert_eq!(labels, ["p50", "p90", "p99", "p99.9", "p99.99", "max", "min"]);
    }

    #[test]
    fn one_slow_outlier_moves_the_max_and_the_tail_only() {
        let mut latencies = Latencies::new();
        for _ in 0..999 {
            latencies.record_us(1_000);
        }
        latencies.record_us(2_000_000);
        assert!(latencies.at_us(0.99).abs_diff(1_000) <= 1);
        assert!(latencies.at_us(1.0).abs_diff(2_000_000) <= 2_000);
        latencies.record_us(u64::MAX);
        assert_eq!(latencies.clipped(), 1, "an impossible value is clipped and counted, not lost");
    }
}
