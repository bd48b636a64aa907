//! `reference disk` and `reference loopback`: measures the references the macro benchmark
//! divides by, and prints and writes them.

use crate::cli::ReferenceKind;
use crate::reference;
use crate::report::write_json;
use std::time::Duration;

pub async fn run(what: ReferenceKind) -> Result<bool, String> {
    let (result, json_path) = match what {
        ReferenceKind::Disk { dir, record_bytes, batch, seconds, json } => {
            if !(1..=1 << 20).contains(&record_bytes) || !(1..=4_096).contains(&batch) {
                return Err("--record-bytes: 1..=1048576 and --batch: 1..=4096".into());
            }
            let measured = tokio::task::spawn_blocking(move || {
                reference::disk(&dir, record_bytes, batch, Duration::from_secs(seconds.max(1)))
            })
            .await
            .map_err(|e| e.to_string())??;
            println!(
                "disk: {:.0} fdatasyncs/s, {:.0} records/s of {record_bytes} B in batches of {batch}",
                measured["fdatasyncs_per_s"].as_f64().unwrap_or(0.0),
                measured["records_per_s"].as_f64().unwrap_or(0.0)
            );
            (measured, json)
        }
        ReferenceKind::Loopback { connections, seconds, json } => {
            if !(1..=crate::target::HTTP_CONNECTIONS_MAX).contains(&connections) {
                return Err(format!("--connections: must be within 1..=1024 (got {connections})"));
            }
            let measured = reference::loopback(connections, Duration::from_secs(seconds.max(1))).await?;
            println!(
                "loopback: {:.0} HTTP POSTs/s over {connections} connections, round trip p50 {} µs, p99 {} µs",
                measured["posts_per_s"].as_f64().unwrap_or(0.0),
                measured["round_trip_us"]["p50"],
                measured["round_trip_us"]["p99"]
            );
            (measured, json)
        }
    };
    write_json(&json_path, result.as_object().cloned().unwrap_or_default())?;
    Ok(true)
}
