//! `ingest`: creates of jobs due far in the future; creates per second and latency, and a
//! sample of acknowledged ids read back at the end (any lost fails the run).

use super::run_name;
use crate::cli::Load;
use crate::drive::drive;
use crate::report::{count_status, finish, print_ops, print_tables};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

/// Acknowledged ids an `ingest` run reads back at the end, at most.
const VERIFY_SAMPLE_MAX: usize = 1_000;

pub async fn ingest(load: Load, due_in_s: u64) -> Result<bool, String> {
    let plan = load.plan(10)?;
    if due_in_s > crate::cli::DUE_IN_S_MAX {
        return Err(format!("--due-in-s: at most {} (ten years)", crate::cli::DUE_IN_S_MAX));
    }
    let target = Arc::new(load.target().await?);
    println!("ingest: {}; jobs due in {due_in_s} s", load.describe(&plan));
    let run = run_name();
    let sample: Arc<Mutex<Vec<String>>> = Arc::default();
    let driven = drive(&plan, |i, intended_ms| {
        let requests: Vec<Value> = (0..plan.batch)
            .map(|j| json!({"id": format!("{run}-{i}-{j}"), "run_at": intended_ms + due_in_s * 1_000, "url": "http://127.0.0.1:9/ingest"}))
            .collect();
        let (target, sample) = (target.clone(), sample.clone());
        async move {
            let first_id = requests[0]["id"].as_str().unwrap_or_default().to_string();
            let statuses = target.create_many(requests).await;
            // Every 64th request's first job is remembered (bounded) to be read back.
            if i % 64 == 0 && (200..300).contains(&statuses[0]) {
                if let Ok(mut sample) = sample.lock() {
                    if sample.len() < VERIFY_SAMPLE_MAX {
                        sample.push(first_id);
                    }
                }
            }
            ("create", statuses)
        }
    })
    .await;
    let sample = sample.lock().map(|s| s.clone()).unwrap_or_default();
    let mut lost = Vec::new();
    for id in &sample {
        if target.get(id).await == 404 {
            lost.push(id.clone());
        }
    }
    print_ops(&driven, &target);
    let creates = driven.ops.get("create").map(|s| &s.latencies);
    if let Some(creates) = creates {
        print_tables(&[("create", creates)]);
    }
    let server_errors = count_status(&driven, |s| s >= 500 && s != 503);
    println!("read back {} acknowledged jobs: {} lost; server errors: {server_errors}", sample.len(), lost.len());
    let pass = lost.is_empty() && server_errors == 0;
    let mut results = load.results("ingest", &plan, &driven, &target);
    results.insert("read_back".into(), json!(sample.len()));
    results.insert("lost".into(), json!(lost));
    finish(&load.plots, &load.json, "ingest", &driven, results, pass, &[], None)
}
