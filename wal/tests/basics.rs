//! The log's everyday behaviour on real files: group commit and reads, both durable-write
//! backends, typed records, hard state, snapshots, the directory lock, bad options, full disks.

mod common;

use common::*;
use std::fs;
use std::process::Command;
use sundial_wal::{SnapshotDraft, SyncBackend, SyncChoice, TypedWal, Wal, WalError, WalOptions};

#[test]
fn committed_records_survive_reopen_across_segments_on_both_backends() {
    for (sync, backend) in [(SyncChoice::Syscall, SyncBackend::Syscall), (SyncChoice::IoUring, SyncBackend::IoUring)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = WalOptions { segment_size_bytes: 8192, sync };
        let (mut wal, report) = match Wal::open(dir.path(), options) {
            Err(WalError::IoUringUnavailable(e)) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping the io_uring half: {e}");
                continue;
            }
            opened => opened.expect("open"),
        };
        assert_eq!((wal.backend(), report.backend), (backend, Some(backend)));
        assert_eq!((wal.first_index(), wal.last_index()), (1, 0), "a new log is empty");
        for batch in 0..10u64 {
            for index in batch * 20 + 1..=batch * 20 + 20 {
                assert_eq!(wal.append(index, &body(index)).expect("append"), index);
            }
            assert_eq!(wal.commit().expect("commit"), batch * 20 + 20);
        }
        drop(wal);
        let (wal, report) = Wal::open(dir.path(), options).expect("reopen");
        assert_records(&wal, 1, 200);
        assert!(report.segments >= 4, "200 records of 144 bytes span several 8 KiB segments");
        assert_eq!(wal.iter_from(150).map(|e| e.index).collect::<Vec<_>>(), (150..=200).collect::<Vec<_>>());
    }
}

#[test]
fn a_larger_segment_size_replaces_an_empty_smaller_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Wal::open(dir.path(), options(8192)).expect("open with 8 KiB segments"));
    let (mut wal, _) = Wal::open(dir.path(), options(64 << 10)).expect("reopen with 64 KiB segments");
    // Too big for the empty 8 KiB segment 1: a 64 KiB segment 1 takes its place.
    wal.append_batch([(1, &vec![3u8; 20_000][..])]).expect("large record");
    wal.append_batch([(2, &b"small"[..])]).expect("small record");
    drop(wal);
    let (wal, _) = Wal::open(dir.path(), options(64 << 10)).expect("reopen");
    assert_eq!((wal.first_index(), wal.last_index()), (1, 2));
    assert_eq!(wal.get(1).map(|e| e.body.len()), Some(20_000));
    assert_eq!(segment_files(dir.path()), (1, 0));
}

#[test]
fn auto_backend_reports_what_it_chose() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (wal, report) = Wal::open(dir.path(), WalOptions::default()).expect("open");
    assert_eq!(report.backend, Some(wal.backend()));
}

#[test]
fn staged_records_are_invisible_until_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, _) = Wal::open(dir.path(), options(1 << 20)).expect("open");
    wal.append(1, b"staged").expect("append");
    assert_eq!((wal.last_index(), wal.staged_count()), (0, 1));
    assert!(wal.get(1).is_none());
    let error = wal.truncate_suffix(1).expect_err("truncation with staged records");
    assert!(matches!(error, WalError::StagedPending { op: "truncate_suffix", staged: 1 }), "{error}");
    wal.commit().expect("commit");
    assert_eq!(wal.get(1).map(|e| e.body), Some(&b"staged"[..]));
    drop(wal);
    // Staged but never committed records are gone after a reopen.
    let (mut wal, _) = Wal::open(dir.path(), options(1 << 20)).expect("reopen");
    wal.append(2, b"never committed").expect("append");
    drop(wal);
    let (wal, _) = Wal::open(dir.path(), options(1 << 20)).expect("reopen");
    assert_eq!(wal.last_index(), 1);
}

#[test]
fn oversized_record_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, _) = Wal::open(dir.path(), options(8192)).expect("open");
    wal.append_batch([(1, &b"ok"[..])]).expect("small record");
    let max = wal.record_body_max_bytes();
    let error = wal.append(1, &vec![7u8; max + 1]).expect_err("too large");
    assert!(error.to_string().contains(&format!("exceeds the limit of {max} bytes")), "{error}");
    assert_eq!((wal.last_index(), wal.staged_count()), (1, 0));
    wal.append_batch([(1, &vec![7u8; max][..])]).expect("a record of exactly the limit fits a fresh segment");
    assert_eq!(wal.get(2).map(|e| e.body.len()), Some(max));
}

#[test]
fn invalid_segment_size_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    for size in [0, 1000, 4097, 2 << 30] {
        let error = Wal::open(dir.path(), options(size)).err().expect("invalid size refused");
        assert!(error.to_string().starts_with("invalid option segment_size_bytes"), "{error}");
    }
    assert!(fs::read_dir(dir.path()).expect("read dir").next().is_none(), "nothing was created");
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_wal, _) = Wal::open(dir.path(), options(8192)).expect("open");
    let error = Wal::open(dir.path(), options(8192)).err().expect("second open refused");
    assert!(matches!(error, WalError::Locked { .. }), "{error}");
}

#[test]
fn hard_state_and_snapshots_are_kept_atomically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, _) = Wal::open(dir.path(), options(8192)).expect("open");
    assert_eq!(wal.hard_state(), None);
    assert_eq!(wal.load_snapshot().expect("no snapshot"), None);
    wal.save_hard_state(b"term=3 vote=2").expect("save hard state");
    wal.save_snapshot(10, 2, b"state at 10").expect("save snapshot");
    wal.save_snapshot(20, 3, b"state at 20").expect("save newer snapshot");
    let too_big = vec![0u8; sundial_wal::HARD_STATE_MAX_BYTES + 1];
    assert!(matches!(wal.save_hard_state(&too_big), Err(WalError::TooLarge { what: "hard state", .. })));
    drop(wal);
    let (wal, _) = Wal::open(dir.path(), options(8192)).expect("reopen");
    assert_eq!(wal.hard_state(), Some(&b"term=3 vote=2"[..]));
    let snapshot = wal.load_snapshot().expect("load").expect("a snapshot");
    assert_eq!((snapshot.index, snapshot.tag, &snapshot.data[..]), (20, 3, &b"state at 20"[..]));
    assert!(!dir.path().join("snapshot-00000000000000000010.snap").exists(), "the older snapshot was removed");
    let newest = dir.path().join("snapshot-00000000000000000020.snap");
    flip_byte(&newest, 40);
    let error = wal.load_snapshot().expect_err("damaged snapshot refused");
    assert!(error.to_string().contains("snapshot-00000000000000000020.snap"), "{error}");
}

fn temp_files(dir: &std::path::Path) -> usize {
    let names = fs::read_dir(dir).expect("read dir").map(|e| e.expect("entry").file_name());
    names.filter(|name| name.to_string_lossy().ends_with(".tmp")).count()
}

#[test]
fn a_snapshot_written_on_another_thread_counts_only_once_adopted_and_a_dropped_one_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, _) = Wal::open(dir.path(), options(8192)).expect("open");
    wal.save_snapshot(10, 2, b"state at 10").expect("save snapshot");
    let log_dir = wal.dir().to_path_buf();
    let writer = std::thread::spawn(move || SnapshotDraft::write(&log_dir, 20, 3, &[b"state ", b"at 20"]));
    let draft = writer.join().expect("the writer ran").expect("written");
    let second = SnapshotDraft::write(wal.dir(), 20, 3, &[b"the same index again"]).expect("its own file");
    assert_eq!(temp_files(dir.path()), 2, "two drafts of one index do not share a file");
    let newest = wal.load_snapshot().expect("load").expect("a snapshot");
    assert_eq!(newest.index, 10, "a draft is not a snapshot until adopted");
    drop(second);
    assert_eq!(temp_files(dir.path()), 1, "a dropped draft removes its file");
    wal.adopt_snapshot(draft).expect("adopted");
    assert_eq!(temp_files(dir.path()), 0);
    drop(wal);
    let (wal, _) = Wal::open(dir.path(), options(8192)).expect("reopen");
    let snapshot = wal.load_snapshot().expect("load").expect("a snapshot");
    assert_eq!((snapshot.index, snapshot.tag, &snapshot.data[..]), (20, 3, &b"state at 20"[..]));
    assert!(!dir.path().join("snapshot-00000000000000000010.snap").exists(), "the older snapshot was removed");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let (mut other, _) = Wal::open(elsewhere.path(), options(8192)).expect("open");
    let draft = SnapshotDraft::write(wal.dir(), 30, 3, &[b"for the first log"]).expect("written");
    let error = other.adopt_snapshot(draft).expect_err("another log's draft is refused");
    assert!(error.to_string().contains("another log"), "{error}");
    assert_eq!(temp_files(dir.path()), 0, "and its file removed");
}

#[test]
fn prefix_truncation_past_the_end_continues_after_the_snapshot_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_batches(dir.path(), 8192, &[100]);
    let (mut wal, _) = Wal::open(dir.path(), options(8192)).expect("open");
    wal.truncate_prefix(500).expect("truncate past the end");
    assert_eq!((wal.first_index(), wal.last_index()), (501, 500));
    assert_eq!(wal.append_batch([(501, &body(501)[..])]).expect("append"), 501);
    drop(wal);
    let (wal, _) = Wal::open(dir.path(), options(8192)).expect("reopen");
    assert_records(&wal, 501, 501);
    let (segments, free) = segment_files(dir.path());
    assert_eq!(segments, 1, "only the new segment remains");
    assert!(free <= 4, "retired segments are kept for reuse, at most 4 ({free})");
}

/// Counts (segment files, retired segment files kept for reuse) in a log directory.
fn segment_files(dir: &std::path::Path) -> (usize, usize) {
    let names: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".wal"))
        .collect();
    let free = names.iter().filter(|name| name.starts_with("free-")).count();
    (names.len() - free, free)
}

#[test]
fn retired_segments_are_reused_and_their_old_records_never_return() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, _) = Wal::open(dir.path(), options(8192)).expect("open");
    // 20 rounds of 100 records (about 2.5 segments each), keeping only the last 150 records:
    // segments retire and are reused over and over.
    for round in 0..20u64 {
        for index in round * 100 + 1..=round * 100 + 100 {
            wal.append(index, &body(index)).expect("append");
        }
        wal.commit().expect("commit");
        wal.truncate_prefix(wal.last_index().saturating_sub(150)).expect("truncate prefix");
        let (segments, free) = segment_files(dir.path());
        assert!(segments <= 5 && free <= 4, "round {round}: {segments} segments, {free} free");
    }
    drop(wal);
    let (wal, report) = Wal::open(dir.path(), options(8192)).expect("reopen");
    assert_eq!(report.torn_tail_bytes, 0, "old records behind the end are not mistaken for a torn tail");
    assert_records(&wal, 1851, 2000);
    assert!(wal.get(1850).is_none());
}

#[derive(rkyv::Archive, rkyv::Serialize, Debug, PartialEq)]
struct Job {
    id: u64,
    url: String,
    due_ms: i64,
}

#[test]
fn typed_log_reads_archived_values_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, _) = TypedWal::<Job>::open(dir.path(), options(8192)).expect("open");
    for id in 1..=50u64 {
        let job = Job { id, url: format!("http://127.0.0.1:9/{id}"), due_ms: id as i64 * 1000 };
        wal.append(id % 3, &job).expect("append");
    }
    wal.commit().expect("commit");
    drop(wal);
    let (wal, _) = TypedWal::<Job>::open(dir.path(), options(8192)).expect("reopen validates every record");
    let (tag, job) = wal.get(42).expect("record 42");
    assert_eq!(tag, 0);
    assert_eq!((job.id.to_native(), job.url.as_str(), job.due_ms.to_native()), (42, "http://127.0.0.1:9/42", 42_000));
}

#[test]
fn typed_log_refuses_a_record_that_is_not_a_valid_archive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut raw, _) = Wal::open(dir.path(), options(8192)).expect("open");
    // A string whose out-of-line pointer (0x80 marks out-of-line) leads far outside the
    // record: the checksum is valid, the archive is not.
    raw.append_batch([(0, &[0x80u8; 40][..])]).expect("append raw bytes");
    drop(raw);
    let error = TypedWal::<Job>::open(dir.path(), options(8192)).err().expect("invalid archive refused");
    assert!(error.to_string().contains("record 1 is not a valid archived value"), "{error}");
}

/// Mounts a small tmpfs so the disk really fills; needs root (CI runs as root).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(SmallDisk { dir }),
            _ if std::env::var_os("CI").is_some() => panic!("CI must be able to mount a tmpfs for the ENOSPC test"),
            _ => {
                eprintln!("skipping: cannot mount a tmpfs here (not root?)");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn full_disk_is_an_error_and_the_log_stays_readable_and_consistent() {
    let Some(disk) = SmallDisk::mount("256k") else { return };
    let log_dir = disk.dir.path().join("log");
    let ballast = disk.dir.path().join("ballast");
    fs::write(&ballast, vec![1u8; 64 << 10]).expect("ballast");
    let (mut wal, _) = Wal::open(&log_dir, options(64 << 10)).expect("open");
    let mut error = None;
    // Bounded: 256 KiB cannot hold more than a few 64 KiB segments of 144-byte records.
    for index in 1..=10_000u64 {
        let result = wal.append(index, &body(index)).and_then(|_| wal.commit());
        if let Err(e) = result {
            error = Some(e);
            break;
        }
    }
    let error = error.expect("the disk filled up");
    assert!(matches!(error, WalError::NoSpace { .. }), "{error}");
    assert!(error.to_string().contains("no space left on device"), "{error}");
    let durable = wal.last_index();
    assert!(durable > 400, "several segments were filled first ({durable})");
    assert_records(&wal, 1, durable);
    assert!(wal.append(durable + 1, &body(durable + 1)).is_err(), "still full");
    fs::remove_file(&ballast).expect("free space");
    wal.append(durable + 1, &body(durable + 1)).expect("append once space is free");
    wal.commit().expect("commit once space is free");
    drop(wal);
    let (wal, report) = Wal::open(&log_dir, options(64 << 10)).expect("reopen");
    assert_eq!(report.leftover_files_removed, 0);
    assert_records(&wal, 1, durable + 1);
}
