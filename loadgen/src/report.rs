//! What every scenario prints and writes: percentile tables, status counts with an example
//! answer per failing status, the JSON results file and the SVG plots.

use crate::drive::Driven;
use crate::histogram::Latencies;
use crate::plot;
use crate::target::Target;
use crate::timeline::Timeline;
use serde_json::{json, Value};
use std::path::PathBuf;

pub fn table_json(latencies: &Latencies) -> Value {
    Value::Object(latencies.table().into_iter().map(|(k, v)| (k, json!(v))).collect())
}

/// Prints one column per histogram, ms.
pub fn print_tables(columns: &[(&str, &Latencies)]) {
    let mut header = format!("{:>8}", "");
    for (name, _) in columns {
        header += &format!("  {:>16}", format!("{name} (ms)"));
    }
    println!("{header}");
    let tables: Vec<Vec<(String, u64)>> = columns.iter().map(|(_, l)| l.table()).collect();
    for row in 0..tables.first().map_or(0, Vec::len) {
        let mut line = format!("{:>8}", tables[0][row].0);
        for table in &tables {
            line += &format!("  {:>16.3}", table[row].1 as f64 / 1e3);
        }
        println!("{line}");
    }
}

pub fn print_ops(driven: &Driven, target: &Target) {
    for (op, stats) in &driven.ops {
        println!("{op}: {} ok, {} failed, statuses {:?}", stats.ok(), stats.failed(), stats.statuses);
    }
    for (status, body) in target.error_examples() {
        println!("  e.g. {status}: {body}");
    }
    println!(
        "{} requests in {:.2} s: {:.0} ok items/s",
        driven.requests,
        driven.elapsed.as_secs_f64(),
        driven.ok_per_s()
    );
}

pub fn write_json(path: &Option<PathBuf>, results: serde_json::Map<String, Value>) -> Result<(), String> {
    if let Some(path) = path {
        let text = serde_json::to_vec_pretty(&Value::Object(results)).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The plots every scenario makes, plus `extra` percentile columns; returns the files written.
pub fn write_plots(
    directory: &Option<PathBuf>,
    scenario: &str,
    driven: &Driven,
    extra: &[(&str, &Latencies)],
    extra_timeline: Option<(&str, &Timeline)>,
) -> Result<Vec<PathBuf>, String> {
    let Some(directory) = directory else { return Ok(Vec::new()) };
    std::fs::create_dir_all(directory).map_err(|e| format!("{}: {e}", directory.display()))?;
    let path = |name: &str| directory.join(format!("{scenario}-{name}.svg"));
    let mut written = Vec::new();
    plot::latency_over_time(
        &path("request-latency"),
        &format!("{scenario}: request latency over time"),
        &driven.timeline,
    )?;
    written.push(path("request-latency"));
    plot::throughput_over_time(&path("throughput"), &format!("{scenario}: items per second"), &driven.timeline)?;
    written.push(path("throughput"));
    let mut columns: Vec<(&str, &Latencies)> = driven.ops.iter().map(|(op, s)| (*op, &s.latencies)).collect();
    columns.extend_from_slice(extra);
    plot::percentiles(&path("percentiles"), &format!("{scenario}: latency by percentile"), &columns)?;
    written.push(path("percentiles"));
    if let Some((name, timeline)) = extra_timeline {
        plot::latency_over_time(&path(name), &format!("{scenario}: {name} over time"), timeline)?;
        written.push(path(name));
    }
    Ok(written)
}

/// Ends a run: prints the verdict, writes the plots (`write_plots`) and the results with
/// `pass` and the plots' paths added, and answers the verdict.
#[allow(clippy::too_many_arguments)]
pub fn finish(
    plots: &Option<PathBuf>,
    json_path: &Option<PathBuf>,
    scenario: &str,
    driven: &Driven,
    mut results: serde_json::Map<String, Value>,
    pass: bool,
    extra: &[(&str, &Latencies)],
    extra_timeline: Option<(&str, &Timeline)>,
) -> Result<bool, String> {
    println!("verdict: {}", if pass { "pass" } else { "FAIL" });
    results.insert("pass".into(), json!(pass));
    let written = write_plots(plots, scenario, driven, extra, extra_timeline)?;
    results.insert("plots".into(), json!(written));
    write_json(json_path, results)?;
    Ok(pass)
}

pub fn count_status(driven: &Driven, matches: impl Fn(u16) -> bool) -> u64 {
    driven.ops.values().flat_map(|s| s.statuses.iter()).filter(|(s, _)| matches(**s)).map(|(_, n)| n).sum()
}
