//! A run over time: per window (one second, or longer for long runs so that at most
//! `WINDOWS_MAX` exist), how many items succeeded and failed and a latency histogram —
//! what the progress line and the "latency over time" plot read.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Windows kept at most: a run longer than this many seconds gets wider windows.
pub const WINDOWS_MAX: usize = 600;

pub struct Window {
    pub ok: u64,
    pub errors: u64,
    /// µs, 2 significant digits (a plot point, not the run's table).
    pub latencies: Histogram<u32>,
}

impl Window {
    fn new() -> Window {
        Window {
            ok: 0,
            errors: 0,
            latencies: Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("static bounds are valid"),
        }
    }

    pub fn at_us(&self, quantile: f64) -> u64 {
        if self.latencies.is_empty() {
            0
        } else {
            self.latencies.value_at_quantile(quantile)
        }
    }
}

pub struct Timeline {
    pub window: Duration,
    pub windows: Vec<Window>,
}

impl Timeline {
    /// For a run expected to last about `run` (it may overrun: the last window takes the rest).
    pub fn new(run: Duration) -> Timeline {
        let seconds = run.as_secs().max(1);
        let window_s = seconds.div_ceil(WINDOWS_MAX as u64).max(1);
        let count = (seconds.div_ceil(window_s) as usize + 1).min(WINDOWS_MAX);
        Timeline { window: Duration::from_secs(window_s), windows: (0..count).map(|_| Window::new()).collect() }
    }

    /// Records one item `since_start` into the run.
    pub fn record(&mut self, since_start: Duration, latency_us: u64, ok: bool) {
        let index = ((since_start.as_nanos() / self.window.as_nanos()) as usize).min(self.windows.len() - 1);
        let window = &mut self.windows[index];
        if ok {
            window.ok += 1;
            window.latencies.saturating_record(latency_us.clamp(1, window.latencies.high()));
        } else {
            window.errors += 1;
        }
    }

    /// The window holding `since_start`.
    pub fn at(&self, since_start: Duration) -> &Window {
        let index = ((since_start.as_nanos() / self.window.as_nanos()) as usize).min(self.windows.len() - 1);
        &self.windows[index]
    }

    /// `(seconds from start, window)` for every window that saw anything.
    pub fn points(&self) -> Vec<(f64, &Window)> {
        self.windows
            .iter()
            .enumerate()
            .filter(|(_, w)| w.ok + w.errors > 0)
            .map(|(i, w)| (i as f64 * self.window.as_secs_f64(), w))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_land_in_their_second_and_long_runs_get_wider_windows() {
        let mut timeline = Timeline::new(Duration::from_secs(10));
        assert_eq!(timeline.window, Duration::from_secs(1));
        timeline.record(Duration::from_millis(500), 1_000, true);
        timeline.record(Duration::from_millis(2_500), 9_000, true);
        timeline.record(Duration::from_millis(2_600), 0, false);
        timeline.record(Duration::from_secs(3_600), 5, true); // an overrun lands in the last window
        let points = timeline.points();
        assert_eq!(points.len(), 3);
        assert_eq!((points[0].0, points[0].1.ok), (0.0, 1));
        assert_eq!((points[1].0, points[1].1.ok, points[1].1.errors), (2.0, 1, 1));
        assert!(points[1].1.at_us(0.5).abs_diff(9_000) <= 90, "2 significant digits");
        let day = Timeline::new(Duration::from_secs(86_400));
        assert_eq!((day.window, day.windows.len()), (Duration::from_secs(144), WINDOWS_MAX));
    }
}
