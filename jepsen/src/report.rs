//! What a run leaves behind: `results.json` (the verdict per property, the plan, counts),
//! `report.md` (the same for people, with the failing examples) and `timeline.svg` — in the
//! manner of Jepsen's timeline: nemesis windows over every client's operations (ok, fail,
//! unknown), operation latencies and fire lateness on the same time axis.

use crate::checker::deliveries::Received;
use crate::checker::Verdict;
use crate::history::{Call, Kind, Operation};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Operations (and deliveries) drawn at most: a long run is thinned evenly beyond it, so the
/// SVG stays a few MB that a browser renders in seconds.
const DRAWN_MAX: usize = 12_000;

/// A fault as it happened: from the history's nemesis events.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Happened {
    pub start_us: u64,
    pub end_us: u64,
    pub detail: Value,
    pub error: Option<String>,
}

fn label(f: Call) -> &'static str {
    match f {
        Call::Create => "create",
        Call::CreateCron => "create-cron",
        Call::Cancel => "cancel",
        Call::Read => "read",
        Call::Nemesis => "nemesis",
    }
}

fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Invoke => "invoke",
        Kind::Ok => "ok",
        Kind::Fail => "fail",
        Kind::Info => "info",
    }
}

/// Operations per call and outcome.
pub fn counts(operations: &[Operation]) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut table: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for op in operations.iter().filter(|op| op.f != Call::Nemesis) {
        *table.entry(label(op.f).into()).or_default().entry(kind_label(op.outcome).into()).or_default() += 1;
    }
    table
}

/// Latency percentiles (ms) of acknowledged operations per call: p50, p99, max.
pub fn latencies(operations: &[Operation]) -> BTreeMap<String, [f64; 3]> {
    let mut by_call: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for op in operations.iter().filter(|op| op.outcome == Kind::Ok && op.f != Call::Nemesis) {
        if let Some(complete_us) = op.complete_us {
            by_call.entry(label(op.f).into()).or_default().push(complete_us.saturating_sub(op.invoke_us));
        }
    }
    by_call
        .into_iter()
        .map(|(call, mut values)| {
            values.sort_unstable();
            let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize] as f64 / 1_000.0;
            (call, [at(0.5), at(0.99), at(1.0)])
        })
        .collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn fault_name(detail: &Value) -> String {
    let fault = detail["fault"].as_str().unwrap_or("fault");
    match fault {
        "partition" => format!("partition {}", detail["shape"].as_str().unwrap_or("")),
        "clock" => format!("clock n{} {:+} ms", detail["node"], detail["offset_ms"].as_i64().unwrap_or(0)),
        "kill" | "pause" => format!("{fault} {}", detail["nodes"]),
        "torn" => format!("torn n{}", detail["node"]),
        other => match detail.get("target") {
            Some(target) => format!("{other} → {target}"),
            None => other.to_string(),
        },
    }
}

/// The SVG timeline.
pub fn timeline_svg(
    operations: &[Operation],
    faults: &[Happened],
    deliveries: &[Received],
    start_us: u64,
    end_us: u64,
) -> String {
    let processes: Vec<&str> = {
        let mut names: Vec<&str> =
            operations.iter().map(|op| op.process.as_str()).filter(|p| !p.starts_with("nemesis")).collect();
        names.sort_by_key(|name| (name.len(), *name));
        names.dedup();
        names
    };
    let (left, width) = (70.0, 1_100.0);
    let lane = 9.0;
    let nemesis_top = 30.0;
    let lanes_top = nemesis_top + 30.0;
    let latency_top = lanes_top + lane * processes.len() as f64 + 30.0;
    let chart_height = 160.0;
    let lateness_top = latency_top + chart_height + 40.0;
    let height = lateness_top + chart_height + 50.0;
    let span_us = end_us.saturating_sub(start_us).max(1) as f64;
    let x = |t_us: u64| left + (t_us.saturating_sub(start_us) as f64 / span_us).min(1.0) * width;
    // Log scale from 1 ms to 100 s.
    let log_y = |top: f64, ms: f64| top + chart_height - (ms.max(1.0).log10().min(5.0) / 5.0) * chart_height;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
        left + width + 20.0
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="16" font-size="13">sundial-jepsen timeline: faults, operations (green ok, red fail, orange unknown), latency, fire lateness</text>"#
    );
    // Nemesis windows: a band in the lanes, a label in the nemesis row.
    for (i, fault) in faults.iter().enumerate() {
        let (x0, x1) = (x(fault.start_us), x(fault.end_us));
        let _ = writeln!(
            svg,
            r##"<rect x="{x0:.1}" y="{nemesis_top}" width="{:.1}" height="{:.1}" fill="#8888cc" fill-opacity="0.18"><title>{}</title></rect>"##,
            (x1 - x0).max(1.0),
            height - nemesis_top - 40.0,
            escape(&fault.detail.to_string())
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" font-size="9">{}</text>"#,
            x0 + 2.0,
            nemesis_top + 10.0 + 11.0 * (i % 2) as f64,
            escape(&fault_name(&fault.detail))
        );
    }
    let _ = writeln!(svg, r#"<text x="4" y="{}">nemesis</text>"#, nemesis_top + 12.0);
    let step = operations.len().div_ceil(DRAWN_MAX).max(1);
    for (i, name) in processes.iter().enumerate() {
        let _ =
            writeln!(svg, r#"<text x="4" y="{:.1}" font-size="8">{name}</text>"#, lanes_top + lane * i as f64 + 7.0);
    }
    let lane_of: BTreeMap<&str, usize> = processes.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    for op in operations.iter().filter(|op| op.f != Call::Nemesis).step_by(step) {
        let Some(&i) = lane_of.get(op.process.as_str()) else { continue };
        let color = match op.outcome {
            Kind::Ok => "#2a9d3a",
            Kind::Fail => "#d62728",
            _ => "#ff8c00",
        };
        let complete_us = op.complete_us.unwrap_or(end_us);
        let (x0, x1) = (x(op.invoke_us), x(complete_us));
        let _ = writeln!(
            svg,
            r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{}" fill="{color}"><title>{} {} {} on n{}: {} ms</title></rect>"#,
            lanes_top + lane * i as f64,
            (x1 - x0).max(0.8),
            lane - 2.0,
            label(op.f),
            escape(&op.job),
            kind_label(op.outcome),
            op.node,
            complete_us.saturating_sub(op.invoke_us) / 1_000
        );
        let latency_ms = complete_us.saturating_sub(op.invoke_us) as f64 / 1_000.0;
        let _ = writeln!(
            svg,
            r#"<circle cx="{x1:.1}" cy="{:.1}" r="1.3" fill="{color}"/>"#,
            log_y(latency_top, latency_ms)
        );
    }
    for (top, title) in
        [(latency_top, "operation latency (ms, log)"), (lateness_top, "fire lateness: arrival − fire time (ms, log)")]
    {
        let _ = writeln!(
            svg,
            r##"<rect x="{left}" y="{top}" width="{width}" height="{chart_height}" fill="none" stroke="#999"/>"##
        );
        let _ = writeln!(svg, r#"<text x="{left}" y="{:.1}">{title}</text>"#, top - 5.0);
        for decade in 0..=5 {
            let ms = 10f64.powi(decade);
            let y = log_y(top, ms);
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="9">{ms}</text>"##,
                left + width,
                left - 4.0,
                y + 3.0
            );
        }
    }
    let delivery_step = deliveries.len().div_ceil(DRAWN_MAX).max(1);
    for delivery in deliveries.iter().step_by(delivery_step) {
        let fire_ms = delivery.key.rsplit(':').next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let lateness_ms = (delivery.received_us as f64 - fire_ms as f64 * 1_000.0) / 1_000.0;
        let color = if lateness_ms < 0.0 { "#d62728" } else { "#1f77b4" };
        let _ = writeln!(
            svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.3" fill="{color}"/>"#,
            x(delivery.received_us),
            log_y(lateness_top, lateness_ms)
        );
    }
    let seconds = span_us / 1e6;
    let tick_s = if seconds > 300.0 {
        60.0
    } else if seconds > 60.0 {
        10.0
    } else {
        5.0
    };
    let mut t = 0.0;
    while t <= seconds {
        let tx = left + t / seconds * width;
        let _ = writeln!(
            svg,
            r#"<text x="{tx:.1}" y="{:.1}" text-anchor="middle" font-size="9">{t} s</text>"#,
            height - 25.0
        );
        t += tick_s;
    }
    svg.push_str("</svg>\n");
    svg
}

/// The Markdown report.
pub fn markdown(
    results: &Value,
    verdict: &Verdict,
    faults: &[Happened],
    start_us: u64,
    run_error: Option<&str>,
) -> String {
    let mut md = String::new();
    let verdict_word = match run_error {
        Some(error) => format!("**no verdict** — the run itself failed: {error}"),
        None if verdict.valid => "**valid** — every property held".to_string(),
        None => "**INVALID** — a property failed".to_string(),
    };
    let _ = writeln!(md, "# sundial-jepsen run\n");
    let _ = writeln!(md, "`{}`\n", results["command"].as_str().unwrap_or(""));
    let _ = writeln!(
        md,
        "Verdict: {verdict_word}. Seed {}; {} nodes; started {} (ms since the epoch).\n",
        results["seed"],
        results["nodes"],
        start_us / 1_000
    );
    let _ = writeln!(md, "| property | contract | verdict | found |\n| --- | --- | --- | --- |");
    for p in &verdict.properties {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            p.name,
            p.contract,
            if p.valid { "ok" } else { "**FAILED**" },
            p.summary
        );
    }
    for p in verdict.properties.iter().filter(|p| !p.examples.is_empty()) {
        let _ = writeln!(md, "\n## {}: examples\n", p.name);
        for example in &p.examples {
            let _ = writeln!(md, "- {}", example.replace('|', "\\|"));
        }
    }
    let _ = writeln!(md, "\n## Faults\n\n| from (s) | to (s) | fault | detail |\n| --- | --- | --- | --- |");
    for fault in faults {
        let at = |us: u64| us.saturating_sub(start_us) as f64 / 1e6;
        let detail = fault.error.clone().unwrap_or_else(|| fault.detail.to_string());
        let _ = writeln!(
            md,
            "| {:.1} | {:.1} | {} | `{}` |",
            at(fault.start_us),
            at(fault.end_us),
            fault_name(&fault.detail),
            detail.replace('|', "\\|")
        );
    }
    let _ = writeln!(md, "\n## Operations\n\n| call | ok | fail | info (unknown) | latency of ok p50 / p99 / max (ms) |\n| --- | --- | --- | --- | --- |");
    let counts = &results["operations"];
    let latencies = &results["latency_ms"];
    if let Some(calls) = counts.as_object() {
        for (call, by_kind) in calls {
            let n = |k: &str| by_kind[k].as_u64().unwrap_or(0);
            let l = &latencies[call];
            let ms = |i: usize| l[i].as_f64().map(|v| format!("{v:.1}")).unwrap_or_default();
            let _ = writeln!(
                md,
                "| {call} | {} | {} | {} | {} / {} / {} |",
                n("ok"),
                n("fail"),
                n("info"),
                ms(0),
                ms(1),
                ms(2)
            );
        }
    }
    let _ = writeln!(md, "\n![timeline](timeline.svg)\n\nFiles: `history.jsonl` (every invoke / ok / fail / info), `deliveries.jsonl` (what the receiver got), `results.json`, `timeline.svg`, `node-*.log`.");
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_timeline_draws_every_operation_and_fault_and_escapes_text() {
        let op = |process: &str, outcome, invoke_us, complete_us| Operation {
            process: process.into(),
            f: Call::Create,
            job: "j<1>".into(),
            node: 2,
            invoke_us,
            complete_us,
            outcome,
            argument: Value::Null,
            result: Value::Null,
            error: None,
        };
        let ops = [
            op("c0", Kind::Ok, 1_000_000, Some(1_020_000)),
            op("c1", Kind::Info, 2_000_000, None),
            op("c10", Kind::Fail, 3_000_000, Some(3_000_500)),
        ];
        let faults = [Happened {
            start_us: 1_500_000,
            end_us: 4_000_000,
            detail: json!({"fault": "partition", "shape": "halves"}),
            error: None,
        }];
        let deliveries = [Received {
            job: "j".into(),
            key: "j:2000".into(),
            attempt: 1,
            received_us: 2_004_000,
            status: 200,
            fencing_token: None,
        }];
        let svg = timeline_svg(&ops, &faults, &deliveries, 0, 10_000_000);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("fill=\"#2a9d3a\"").count(), 2, "the ok rectangle and its latency dot");
        assert_eq!(svg.matches("fill=\"#ff8c00\"").count(), 2);
        assert!(svg.contains("partition halves") && svg.contains("j&lt;1&gt;") && !svg.contains("j<1>"));
        // Lanes sort c0, c1, c10 (by number, not text).
        assert!(svg.find(">c1<").unwrap() < svg.find(">c10<").unwrap());
        assert_eq!(counts(&ops)["create"]["info"], 1);
        assert_eq!(latencies(&ops)["create"], [20.0, 20.0, 20.0]);
    }
}
