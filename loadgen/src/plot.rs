//! SVG plots of a run (plotters, SVG backend only): latency over time (p50, p99, max per
//! window), the percentile distribution of each histogram (HdrHistogram style: the x axis
//! counts nines), and items per second over time.

use crate::histogram::Latencies;
use crate::timeline::Timeline;
use plotters::prelude::*;
use std::path::Path;

const SIZE: (u32, u32) = (900, 450);
/// The lowest value a log axis shows, ms (a 0 cannot be drawn on one).
const FLOOR_MS: f64 = 0.01;

/// Latency over time from `timeline`, one line per quantile.
pub fn latency_over_time(path: &Path, title: &str, timeline: &Timeline) -> Result<(), String> {
    let points = timeline.points();
    let series: Vec<(&str, Vec<(f64, f64)>)> = [("p50", 0.5), ("p99", 0.99), ("max", 1.0)]
        .iter()
        .map(|(name, q)| (*name, points.iter().filter(|(_, w)| w.ok > 0).map(|(t, w)| (*t, ms(w.at_us(*q)))).collect()))
        .collect();
    lines(path, title, "seconds into the run", "latency (ms, log)", &series, true, None)
}

/// Items answered ok and failed per second, over time.
pub fn throughput_over_time(path: &Path, title: &str, timeline: &Timeline) -> Result<(), String> {
    let window_s = timeline.window.as_secs_f64();
    let points = timeline.points();
    let ok: Vec<(f64, f64)> = points.iter().map(|(t, w)| (*t, w.ok as f64 / window_s)).collect();
    let errors: Vec<(f64, f64)> = points.iter().map(|(t, w)| (*t, w.errors as f64 / window_s)).collect();
    lines(path, title, "seconds into the run", "items per second", &[("ok", ok), ("failed", errors)], false, None)
}

/// Percentile distributions: x = nines (0 = p0, 1 = p90, 2 = p99, 3 = p99.9 …).
pub fn percentiles(path: &Path, title: &str, histograms: &[(&str, &Latencies)]) -> Result<(), String> {
    let steps = 250;
    let series: Vec<(&str, Vec<(f64, f64)>)> = histograms
        .iter()
        .filter(|(_, l)| l.count() > 0)
        .map(|(name, latencies)| {
            let points = (0..=steps)
                .map(|step| {
                    let nines = 5.0 * f64::from(step) / f64::from(steps);
                    let quantile = 1.0 - 10f64.powf(-nines);
                    (nines, ms(latencies.at_us(quantile.min(0.99999))))
                })
                .collect();
            (*name, points)
        })
        .collect();
    let label = |nines: &f64| match nines.round() as i32 {
        0 => "p0".to_string(),
        1 => "p90".to_string(),
        2 => "p99".to_string(),
        n => format!("p99.{}", "9".repeat(n as usize - 2)),
    };
    lines(path, title, "percentile", "latency (ms, log)", &series, true, Some(&label))
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1e3).max(FLOOR_MS)
}

#[allow(clippy::type_complexity)]
fn lines(
    path: &Path,
    title: &str,
    x_description: &str,
    y_description: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    log_y: bool,
    x_labels: Option<&dyn Fn(&f64) -> String>,
) -> Result<(), String> {
    let all = series.iter().flat_map(|(_, points)| points.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::MAX, 0.0f64);
    for (x, y) in all {
        x_max = x_max.max(*x);
        y_min = y_min.min(*y);
        y_max = y_max.max(*y);
    }
    if y_min > y_max {
        (y_min, y_max) = (FLOOR_MS, 1.0);
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut builder = ChartBuilder::on(&root);
    builder.caption(title, ("sans-serif", 18)).margin(12).x_label_area_size(40).y_label_area_size(70);
    let palette = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189)];
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            let mut mesh = chart.configure_mesh();
            mesh.x_desc(x_description).y_desc(y_description);
            if let Some(format) = x_labels {
                // One tick per nine: 0..=5.
                mesh.x_labels(6).x_label_formatter(format);
            }
            mesh.draw().map_err(|e| e.to_string())?;
            for (i, (name, points)) in series.iter().enumerate() {
                let color = palette[i % palette.len()];
                chart
                    .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }};
    }
    if log_y {
        draw!(builder
            .build_cartesian_2d(0f64..x_max, (y_min.max(FLOOR_MS) * 0.8..y_max * 1.25).log_scale())
            .map_err(|e| e.to_string())?);
    } else {
        draw!(builder.build_cartesian_2d(0f64..x_max, 0f64..(y_max * 1.1).max(1.0)).map_err(|e| e.to_string())?);
    }
    root.present().map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_plot_is_an_svg_with_its_series_named() {
        let directory = tempfile::tempdir().expect("tempdir");
        let mut timeline = Timeline::new(Duration::from_secs(5));
        let mut latencies = Latencies::new();
        for i in 0..5_000u64 {
            timeline.record(Duration::from_millis(i), 500 + i, i % 100 != 0);
            latencies.record_us(500 + i);
        }
        let over_time = directory.path().join("over-time.svg");
        latency_over_time(&over_time, "fire lateness", &timeline).expect("plot");
        let throughput = directory.path().join("throughput.svg");
        throughput_over_time(&throughput, "creates", &timeline).expect("plot");
        let distribution = directory.path().join("percentiles.svg");
        percentiles(&distribution, "latency", &[("create", &latencies), ("empty", &Latencies::new())]).expect("plot");
        for (path, words) in [
            (over_time, &["p50", "p99", "max"][..]),
            (throughput, &["ok", "failed"][..]),
            (distribution, &["create", "p99.9"][..]),
        ] {
            let svg = std::fs::read_to_string(&path).expect("written");
            assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{}", path.display());
            for word in words {
                assert!(svg.contains(word), "{} lacks {word}", path.display());
            }
        }
    }
}
