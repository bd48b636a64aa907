//! Crash test: a child process appends (and now and then truncates) and reports each durable
//! index over a pipe; the parent kill -9s it at random moments, reopens the log, and checks
//! that every reported index is present with identical bytes and nothing invalid is returned.
//!
//! Rounds: SUNDIAL_WAL_CRASH_ROUNDS (default 50). Seed: SUNDIAL_WAL_CRASH_SEED (default: time),
//! printed so a failing run can be replayed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use sundial_wal::{Wal, WalOptions};

/// Same formula as `crash_body` in src/bin/sundial-wal.rs.
fn crash_body(index: u64) -> Vec<u8> {
    let len = (index.wrapping_mul(37) % 700) as usize + 1;
    (0..len).map(|i| (index as usize).wrapping_mul(131).wrapping_add(i) as u8).collect()
}

/// What the child said before it died.
#[derive(Default)]
struct Acknowledged {
    /// The last durable index reported (lowered by a suffix truncation it announced).
    durable: u64,
    /// The highest prefix truncation it announced (started, maybe finished).
    prefix_upto: u64,
}

impl Acknowledged {
    fn apply(&mut self, line: &str) {
        let (kind, value) = line.split_once(' ').unwrap_or_else(|| panic!("bad child line {line:?}"));
        let value: u64 = value.parse().unwrap_or_else(|_| panic!("bad child line {line:?}"));
        match kind {
            "D" => self.durable = value,
            "P" => self.prefix_upto = self.prefix_upto.max(value),
            "S" => self.durable = self.durable.min(value - 1),
            _ => panic!("bad child line {line:?}"),
        }
    }
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_record() {
    let rounds: u32 = std::env::var("SUNDIAL_WAL_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("SUNDIAL_WAL_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    println!("crash test: {rounds} rounds, SUNDIAL_WAL_CRASH_SEED={seed}");
    let mut rng = seed | 1;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acknowledged = Acknowledged::default();
    let mut total_reported = 0usize;
    for round in 0..rounds {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sundial-wal"))
            .arg("crash-child")
            .arg(dir.path())
            .arg(next(&mut rng).to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn crash child");
        let stdout = child.stdout.take().expect("piped stdout");
        let reader =
            std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(20 + next(&mut rng) % 200));
        child.kill().expect("kill -9");
        let status = child.wait().expect("reap child");
        assert!(status.code().is_none(), "round {round}: the child stopped on its own: {status}");
        let lines = reader.join().expect("reader thread");
        total_reported += lines.len();
        for line in &lines {
            acknowledged.apply(line);
        }
        let (wal, _) = Wal::open(dir.path(), WalOptions { segment_size_bytes: 256 << 10, ..WalOptions::default() })
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): reopen failed: {e}"));
        assert!(
            wal.last_index() >= acknowledged.durable,
            "round {round} (seed {seed}): durable index {} reported, log ends at {}",
            acknowledged.durable,
            wal.last_index()
        );
        assert!(
            wal.first_index() <= acknowledged.prefix_upto + 1,
            "round {round} (seed {seed}): log starts at {} but only records up to {} were truncated",
            wal.first_index(),
            acknowledged.prefix_upto
        );
        for entry in wal.iter_from(wal.first_index()) {
            assert_eq!(entry.tag, entry.index, "round {round} (seed {seed}): tag of {}", entry.index);
            assert!(entry.body == crash_body(entry.index), "round {round} (seed {seed}): body of {}", entry.index);
        }
        assert_eq!(wal.iter_from(0).count() as u64, wal.last_index() + 1 - wal.first_index());
    }
    assert!(total_reported > rounds as usize, "the children made progress ({total_reported} lines)");
}
