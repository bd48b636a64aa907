//! A partition on real files: commands reach the state only through the committed WAL log,
//! a reopened partition replays to the same state (across snapshots and log truncation), and
//! after kill -9 every acknowledged job is still there.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};
use sundial_dispatch::runtime::CommandLog;
use sundial_engine::job::JobSpec;
use sundial_engine::request::parse_job_request;
use sundial_engine::spec::PackedSpec;
use sundial_engine::state::{Applied, Command};
use sundial_node::{Partition, PartitionOptions};
use sundial_wal::WalOptions;

const T0: u64 = 1_780_000_000_000;

fn options() -> PartitionOptions {
    PartitionOptions {
        wal: WalOptions { segment_size_bytes: 1 << 20, ..WalOptions::default() },
        snapshot_every_entries: 50,
        ..PartitionOptions::single_node(1)
    }
}

fn job(id: &str) -> JobSpec {
    let request =
        serde_json::json!({"id": id, "run_at": T0 + 60_000, "url": "https://example.com/hook", "json": {"n": id}});
    parse_job_request(&request.to_string(), T0, "unused").expect("valid")
}

/// Proposes a create and processes until its outcome is known (durable by then).
fn create(partition: &mut Partition, id: &str) -> Applied {
    let index = partition
        .propose_one(&Command::Create { spec: PackedSpec::of(&job(id)), now_ms: T0, dedup_window_ms: None })
        .expect("leader accepts");
    let applied = partition.advance().expect("persisted");
    let mine = applied.into_iter().find(|c| c.ticket == Some(index)).expect("applied");
    mine.verdict.expect("created")
}

#[test]
fn a_reopened_partition_replays_to_the_same_state_across_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let digest = {
        let mut partition = Partition::open(dir.path(), options()).expect("open");
        assert!(partition.is_leader(), "a group of one elects itself");
        for i in 0..120 {
            assert_eq!(create(&mut partition, &format!("job-{i}")), Applied::Created);
        }
        assert_eq!(create(&mut partition, "job-7"), Applied::AlreadyExists, "the same spec again");
        assert!(partition.snapshot_index() > 0, "snapshots were taken");
        partition.state().digest()
    };
    let mut reopened = Partition::open(dir.path(), options()).expect("reopen");
    assert_eq!(reopened.state().digest(), digest, "the same state after the restart");
    assert_eq!(reopened.state().jobs().count(), 120);
    assert_eq!(create(&mut reopened, "job-120"), Applied::Created, "and it goes on");
}

/// The child side of the crash test: creates jobs one by one and prints each id once its
/// create is acknowledged (committed, fsync'd, applied). Runs only when the parent starts it.
/// With SUNDIAL_PARTITION_CRASH_ACK_EARLY it is broken on purpose: it acknowledges right
/// after proposing, before the entry is durable.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("SUNDIAL_PARTITION_CRASH_DIR") else { return };
    let ack_early = std::env::var("SUNDIAL_PARTITION_CRASH_ACK_EARLY").is_ok();
    let mut partition = Partition::open(&dir, options()).expect("open");
    let first = partition.state().jobs().count();
    let mut stdout = std::io::stdout().lock();
    // Bounded: the parent kills this process; the bound only stops a forgotten child.
    for i in first..first + 1_000_000 {
        let id = format!("job-{i}");
        if ack_early {
            partition
                .propose_one(&Command::Create { spec: PackedSpec::of(&job(&id)), now_ms: T0, dedup_window_ms: None })
                .expect("leader accepts");
            writeln!(stdout, "ack {id}").expect("parent reads");
            stdout.flush().expect("parent reads");
            // The window a real bug would have, made wide enough for the kill to land in.
            std::thread::sleep(Duration::from_millis(30));
            partition.advance().expect("persisted");
        } else {
            create(&mut partition, &id);
            writeln!(stdout, "ack {id}").expect("parent reads");
            stdout.flush().expect("parent reads");
        }
    }
}

/// Runs `rounds` of: start the child, let it acknowledge creates for a while, kill -9 it,
/// reopen the partition and check every job acknowledged so far is there. Err names the
/// first lost job.
fn crash_rounds(rounds: u64, ack_early: bool) -> Result<usize, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acknowledged = Vec::new();
    for round in 0..rounds {
        let mut child = Process::new(std::env::current_exe().expect("test binary"));
        child
            .args(["--exact", "crash_child", "--nocapture", "--test-threads", "1"])
            .env("SUNDIAL_PARTITION_CRASH_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if ack_early {
            child.env("SUNDIAL_PARTITION_CRASH_ACK_EARLY", "1");
        }
        let mut child = child.spawn().expect("spawn the child");
        let stdout = child.stdout.take().expect("piped");
        let kill_after = Duration::from_millis(100 + (round * 37) % 400);
        let started = Instant::now();
        let mut lines = BufReader::new(stdout).lines();
        let mut acked_this_round = 0;
        // Bounded by the kill time (and 30 s if the child produced nothing).
        while started.elapsed() < kill_after || (acked_this_round == 0 && started.elapsed() < Duration::from_secs(30)) {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(id) = line.strip_prefix("ack ") {
                        acknowledged.push(id.to_string());
                        acked_this_round += 1;
                    }
                }
                _ => break,
            }
        }
        child.kill().expect("kill -9");
        child.wait().expect("reaped");
        assert!(acked_this_round > 0, "round {round}: the child acknowledged nothing");
        let partition = Partition::open(dir.path(), options()).expect("reopen after kill -9");
        if let Some(lost) = acknowledged.iter().find(|id| partition.state().job(id).is_none()) {
            return Err(format!("round {round}: acknowledged {lost} was lost"));
        }
    }
    Ok(acknowledged.len())
}

#[test]
fn every_acknowledged_job_survives_kill_minus_9() {
    let rounds: u64 = std::env::var("SUNDIAL_PARTITION_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let acknowledged = crash_rounds(rounds, false).unwrap_or_else(|lost| panic!("{lost}"));
    assert!(acknowledged > 50, "the rounds did real work: {acknowledged}");
}

/// The check can fail: a child that acknowledges before the entry is durable is caught.
#[test]
fn acknowledging_before_the_fsync_is_caught() {
    assert!(crash_rounds(20, true).is_err(), "20 rounds of early acknowledgements lost nothing");
}

#[test]
fn a_log_whose_snapshot_went_missing_is_refused_not_replayed_into_an_empty_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut partition = Partition::open(dir.path(), options()).expect("open");
        // Entries of 30 KB: ~34 fill a 1 MiB segment, so the snapshots (every 50 entries)
        // cut whole segments of the log away (a cut that frees none is left undone).
        for i in 0..120 {
            let request = serde_json::json!({"id": format!("job-{i}"), "run_at": T0 + 60_000,
                "url": "https://example.com/hook", "body": "x".repeat(30_000)});
            let spec = parse_job_request(&request.to_string(), T0, "unused").expect("valid");
            let command = Command::Create { spec: PackedSpec::of(&spec), now_ms: T0, dedup_window_ms: None };
            partition.propose_one(&command).expect("leader accepts");
            partition.advance().expect("persisted");
        }
        assert!(partition.snapshot_index() > 50, "a snapshot replaced the log's start");
    }
    for entry in std::fs::read_dir(dir.path()).expect("list") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "snap") {
            std::fs::remove_file(&path).expect("remove the snapshot");
        }
    }
    let error = Partition::open(dir.path(), options()).err().expect("refused");
    assert!(error.to_string().contains("no snapshot"), "{error}");
}

/// A group snapshots right after its first entry, so its log never starts at index 1 again:
/// a replica added later (which starts empty, without the group's initial membership) is
/// always sent a snapshot first, never entries from 1.
#[test]
fn a_new_group_snapshots_after_its_first_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut partition = Partition::open(dir.path(), options()).expect("open");
    assert!(partition.snapshot_index() > 0, "the leader's first entry was applied and snapshotted");
    create(&mut partition, "first");
    drop(partition);
    let reopened = Partition::open(dir.path(), options()).expect("reopen");
    assert!(reopened.snapshot_index() > 0);
    assert!(reopened.state().job("first").is_some());
}
