//! The references every macro-benchmark figure is divided by, measured in the same run on
//! the same machine: the bare disk (`pwrite` + `fdatasync` of a batch, the floor under a
//! durable create) and bare loopback (HTTP/1.1 POSTs to the sink over 127.0.0.1, the floor
//! under a webhook delivery).

use crate::histogram::Latencies;
use crate::receiver::{self, SinkOptions};
use crate::target::HttpPool;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The disk reference's file: written in full first, then overwritten in a cycle (like
/// recycled log segments), so the figure is not about allocating blocks.
const DISK_FILE_BYTES: u64 = 64 << 20;

/// `pwrite` of `record_bytes × batch` then `fdatasync`, repeated for `duration` in a file
/// in `directory` (removed afterwards).
pub fn disk(directory: &Path, record_bytes: usize, batch: usize, duration: Duration) -> Result<Value, String> {
    let path = directory.join(format!("sundial-loadgen-disk-reference-{}", std::process::id()));
    let write_bytes = (record_bytes * batch).clamp(1, DISK_FILE_BYTES as usize);
    let outcome = (|| -> std::io::Result<(u64, Duration)> {
        let mut file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..DISK_FILE_BYTES / chunk.len() as u64 {
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
        let buffer = vec![0x5au8; write_bytes];
        let (mut offset, mut syncs) = (0u64, 0u64);
        let start = Instant::now();
        while start.elapsed() < duration {
            if offset + write_bytes as u64 > DISK_FILE_BYTES {
                offset = 0;
            }
            file.write_all_at(&buffer, offset)?;
            file.sync_data()?;
            offset += write_bytes as u64;
            syncs += 1;
        }
        Ok((syncs, start.elapsed()))
    })();
    let _ = std::fs::remove_file(&path);
    let (syncs, elapsed) = outcome.map_err(|e| format!("disk reference in {}: {e}", directory.display()))?;
    let syncs_per_s = syncs as f64 / elapsed.as_secs_f64();
    Ok(json!({
        "reference": "disk", "directory": directory.display().to_string(), "record_bytes": record_bytes,
        "batch": batch, "seconds": elapsed.as_secs_f64(), "fdatasyncs_per_s": syncs_per_s,
        "records_per_s": syncs_per_s * batch as f64, "mb_per_s": syncs_per_s * write_bytes as f64 / 1e6,
    }))
}

/// HTTP/1.1 POSTs of a small JSON body to the sink on 127.0.0.1 over `connections`
/// keep-alive connections, each waiting for its answer before the next, for `duration`.
pub async fn loopback(connections: usize, duration: Duration) -> Result<Value, String> {
    let (addr, recorded) = receiver::start("127.0.0.1:0".parse().expect("a valid address"), SinkOptions::default())
        .await
        .map_err(|e| format!("sink: {e}"))?;
    let pool = Arc::new(HttpPool::new(vec![addr], connections, None));
    let latencies = Arc::new(Mutex::new(Latencies::new()));
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..connections.max(1))
        .map(|connection| {
            let (pool, latencies, sent) = (pool.clone(), latencies.clone(), sent.clone());
            tokio::spawn(async move {
                // Bounded by the duration.
                while start.elapsed() < duration {
                    let n = sent.fetch_add(1, Ordering::Relaxed);
                    let body =
                        json!({"job_id": format!("reference-{connection}-{n}"), "payload": {"i": n}}).to_string();
                    let began = Instant::now();
                    if pool.send("POST", "/hook", body, connection).await.is_err() {
                        return Err("a loopback POST failed".to_string());
                    }
                    if let Ok(mut latencies) = latencies.lock() {
                        latencies.record_us(began.elapsed().as_micros() as u64);
                    }
                }
                Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let elapsed = start.elapsed();
    let received = recorded.lock().map(|r| r.deliveries.len() + r.dropped as usize).unwrap_or(0);
    let latencies = latencies.lock().map_err(|_| "a reference task panicked".to_string())?;
    Ok(json!({
        "reference": "loopback", "connections": connections, "seconds": elapsed.as_secs_f64(),
        "posts_per_s": received as f64 / elapsed.as_secs_f64(),
        "round_trip_us": latencies.table().into_iter().map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<_, _>>(),
    }))
}
