//! Queries a shard runs on every partition it holds (lists, counts, health, Raft status),
//! each answered from the replica that leads it (Raft status: from every replica).

use super::*;

/// Whether `scan` looks at this partition here: lists and counts come from the replica that
/// leads (each partition counted once across the cluster); Raft status from every replica.
pub(super) fn scan_covers(scan: &Scan, replica: &Replica) -> bool {
    matches!(scan, Scan::Raft) || replica.is_leader()
}

pub(super) fn scan_one(partition: u32, replica: &mut Replica, scan: &Scan, now_ms: u64) -> Value {
    match scan {
        Scan::Jobs { status, limit } => Value::Array(ops::list_jobs(replica.state(), *status, *limit)),
        Scan::FlowKeys { limit } => Value::Array(ops::flow_keys(replica.state(), *limit, now_ms)),
        Scan::Labelled { labels, limit } => Value::Array(ops::labelled_jobs(replica.state(), labels, *limit)),
        Scan::DeadLetters { limit } => Value::Array(ops::dead_letters(replica.state(), *limit)),
        Scan::PurgeDeadLetters => {
            let answer = ops::purge_answer(replica.apply(sundial_engine::state::Command::Purge { id: None }, now_ms));
            json!({"status": answer.status, "body": answer.body})
        }
        Scan::Health => {
            let state = replica.state();
            let counts: serde_json::Map<String, Value> =
                Status::ALL.iter().map(|s| (s.as_str().to_string(), json!(state.count(*s)))).collect();
            let stats = replica.runtime().stats();
            json!({
                "partition": partition,
                "jobs": counts,
                "dead_letters": state.dead_letters().count(),
                "auto_paused": state.auto_paused(),
                "expired": state.expired_total(),
                "dead_letters_evicted": state.dead_letters_evicted_total(),
                "queued": replica.runtime().dispatcher().queued(),
                "running": replica.runtime().dispatcher().running(),
                "attempts_started": stats.attempts_started,
                "attempts_finished": stats.attempts_finished,
                "queue_full_waits": stats.queue_full_waits,
                "log_failure": replica.runtime().log_failure(),
            })
        }
        Scan::Raft => {
            let log = replica.partition();
            let raft = log.raft_status();
            let followers: Vec<Value> = if raft.leader {
                log.voters()
                    .into_iter()
                    .filter(|id| *id != log.node_id())
                    .map(|id| {
                        let matched = log.follower_match(id).unwrap_or(0);
                        json!({"node_id": id, "match_index": matched, "lag": raft.last_index.saturating_sub(matched)})
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let lag = followers.iter().filter_map(|f| f["lag"].as_u64()).max().unwrap_or(0);
            let backlog = log.commit_backlog();
            json!({
                "partition": partition,
                "role": if raft.leader { "leader" } else { "follower" },
                "leader": log.leader(),
                "replicas": log.voters(),
                "followers": followers,
                "replication_lag": lag,
                "commit_waiting": backlog.proposals,
                "commit_oldest_wait_ms": backlog.oldest_wait.as_millis() as u64,
                "term": raft.term,
                "commit_index": raft.commit_index,
                "applied_index": raft.applied_index,
                "last_index": raft.last_index,
                "snapshot_index": raft.snapshot_index,
                "snapshot_linked": raft.snapshot_linked,
                "snapshots_installed": raft.snapshots_installed,
                "elections_won": log.elections_won(),
                "log_backend": log.log_backend(),
                "jobs": replica.state().job_count(),
            })
        }
    }
}
