//! `mixed`: creates, gets and cancels in a given mix; latency per operation, and a get or
//! cancel of an acknowledged job answered 404 counts as a lost job.

use super::run_name;
use crate::cli::Load;
use crate::drive::drive;
use crate::histogram::Latencies;
use crate::report::{count_status, finish, print_ops, print_tables};
use serde_json::json;
use std::sync::{Arc, Mutex};

/// Ids a `mixed` run remembers for its gets and cancels, at most.
const MIXED_IDS_MAX: usize = 1_000_000;

/// The operations a `mixed` run draws from, by weight: "create=6,get=3,cancel=1".
fn parse_mix(text: &str) -> Result<Vec<(&'static str, u64)>, String> {
    let mut mix = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let Some((name, weight)) = part.split_once('=') else {
            return Err(format!("--mix: {part:?} is not op=weight"));
        };
        let op = match name.trim() {
            "create" => "create",
            "get" => "get",
            "cancel" => "cancel",
            other => return Err(format!("--mix: unknown operation {other:?} (create, get, cancel)")),
        };
        let weight: u64 = weight.trim().parse().map_err(|_| format!("--mix: weight of {op} must be a whole number"))?;
        mix.push((op, weight));
    }
    if mix.iter().all(|(op, w)| *op != "create" || *w == 0) {
        return Err("--mix: needs a create weight above 0 (gets and cancels act on created jobs)".into());
    }
    Ok(mix)
}

pub async fn mixed(load: Load, mix: &str, due_in_s: u64) -> Result<bool, String> {
    let plan = load.plan(10)?;
    if due_in_s > crate::cli::DUE_IN_S_MAX {
        return Err(format!("--due-in-s: at most {} (ten years)", crate::cli::DUE_IN_S_MAX));
    }
    if plan.batch != 1 {
        // The rate and the mix count operations: a request is one get, one cancel or one create.
        return Err("--batch: mixed sends one operation per request (give 1)".into());
    }
    let mix = parse_mix(mix)?;
    let total: u64 = mix.iter().map(|(_, w)| w).sum();
    let target = Arc::new(load.target().await?);
    println!("mixed ({mix:?}): {}", load.describe(&plan));
    let run = run_name();
    let live: Arc<Mutex<Vec<String>>> = Arc::default();
    let driven = drive(&plan, |i, intended_ms| {
        // A fixed spread over the weights (Weyl sequence), the same for every run.
        let mut draw = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % total.max(1);
        let mut op = "create";
        for (name, weight) in &mix {
            if draw < *weight {
                op = name;
                break;
            }
            draw -= weight;
        }
        let existing = match op {
            "create" => None,
            _ => live.lock().ok().and_then(|mut live| {
                if live.is_empty() {
                    return None;
                }
                let at = (i.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 17) as usize % live.len();
                Some(if op == "cancel" { live.swap_remove(at) } else { live[at].clone() })
            }),
        };
        let (target, live, run) = (target.clone(), live.clone(), run.clone());
        let batch = plan.batch;
        async move {
            match (op, existing) {
                ("get", Some(id)) => ("get", vec![target.get(&id).await]),
                ("cancel", Some(id)) => ("cancel", vec![target.cancel(&id).await]),
                _ => {
                    let ids: Vec<String> = (0..batch).map(|j| format!("{run}-{i}-{j}")).collect();
                    let requests = ids
                        .iter()
                        .map(|id| json!({"id": id, "run_at": intended_ms + due_in_s * 1_000, "url": "http://127.0.0.1:9/mixed"}))
                        .collect();
                    let statuses = target.create_many(requests).await;
                    if let Ok(mut live) = live.lock() {
                        for (id, status) in ids.into_iter().zip(&statuses) {
                            if (200..300).contains(status) && live.len() < MIXED_IDS_MAX {
                                live.push(id);
                            }
                        }
                    }
                    ("create", statuses)
                }
            }
        }
    })
    .await;
    print_ops(&driven, &target);
    let columns: Vec<(&str, &Latencies)> = driven.ops.iter().map(|(op, s)| (*op, &s.latencies)).collect();
    print_tables(&columns);
    let lost: u64 = ["get", "cancel"]
        .iter()
        .filter_map(|op| driven.ops.get(op))
        .map(|s| s.statuses.get(&404).copied().unwrap_or(0))
        .sum();
    let server_errors = count_status(&driven, |s| s >= 500 && s != 503);
    println!("acknowledged jobs answered 404: {lost}; server errors: {server_errors}");
    let pass = lost == 0 && server_errors == 0;
    let mut results = load.results("mixed", &plan, &driven, &target);
    results.insert(
        "mix".into(),
        json!(mix.iter().map(|(op, w)| (op.to_string(), json!(w))).collect::<serde_json::Map<_, _>>()),
    );
    results.insert("lost".into(), json!(lost));
    finish(&load.plots, &load.json, "mixed", &driven, results, pass, &[], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_names_its_operations_and_refuses_what_it_cannot_do() {
        assert_eq!(parse_mix("create=6,get=3,cancel=1").unwrap(), [("create", 6), ("get", 3), ("cancel", 1)]);
        assert!(parse_mix("get=1").unwrap_err().contains("create weight"));
        assert!(parse_mix("create=1,delete=1").unwrap_err().contains("unknown operation"));
        assert!(parse_mix("create=x").unwrap_err().contains("whole number"));
    }
}
