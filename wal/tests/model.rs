//! Property test: random appends, commits (whole, or begun and finished later by whatever
//! comes next), truncations at both ends and reopens against an in-memory model (a Vec of
//! records), on both durable-write backends.

use proptest::prelude::*;
use sundial_wal::{SyncChoice, Wal, WalOptions};

#[derive(Clone, Debug)]
enum Op {
    /// Append records with these body lengths, then commit once.
    AppendBatch(Vec<usize>),
    /// Append records, then only begin their commit: the next op finishes it (explicitly,
    /// or by changing the log, or by dropping it).
    BeginBatch(Vec<usize>),
    /// Finish a begun commit (nothing when none was begun).
    Finish,
    /// Remove the last `n` records (clamped).
    TruncateSuffix(u64),
    /// Drop the first `n` records (may pass the end: the log empties and continues after it).
    TruncatePrefix(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec(prop_oneof![0usize..64, 64usize..900], 1..24).prop_map(Op::AppendBatch),
        3 => prop::collection::vec(prop_oneof![0usize..64, 64usize..900], 1..24).prop_map(Op::BeginBatch),
        1 => Just(Op::Finish),
        1 => (0u64..40).prop_map(Op::TruncateSuffix),
        1 => (0u64..60).prop_map(Op::TruncatePrefix),
        1 => Just(Op::Reopen),
    ]
}

/// The model: records with indexes `first_index..first_index + records.len()`.
struct Model {
    first_index: u64,
    records: Vec<(u64, Vec<u8>)>,
    /// The last records, whose commit was begun and not finished: not yet readable.
    begun: usize,
}

impl Model {
    fn last_index(&self) -> u64 {
        self.first_index + self.records.len() as u64 - 1
    }

    fn durable(&self) -> &[(u64, Vec<u8>)] {
        &self.records[..self.records.len() - self.begun]
    }
}

fn body_for(index: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (index as usize).wrapping_mul(31).wrapping_add(i) as u8).collect()
}

fn check(wal: &Wal, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(wal.first_index(), model.first_index);
    prop_assert_eq!(wal.last_index(), model.last_index() - model.begun as u64);
    for (position, (tag, body)) in model.durable().iter().enumerate() {
        let index = model.first_index + position as u64;
        let entry = wal.get(index).ok_or_else(|| TestCaseError::fail(format!("index {index} missing")))?;
        prop_assert_eq!(entry.tag, *tag);
        prop_assert_eq!(entry.body, &body[..]);
    }
    prop_assert!(wal.get(model.first_index.wrapping_sub(1)).is_none());
    prop_assert!(wal.get(model.last_index() - model.begun as u64 + 1).is_none());
    Ok(())
}

/// Appends records of these body lengths to the log and the model (staged, not committed).
fn append_all(wal: &mut Wal, model: &mut Model, lens: &[usize]) -> Result<(), TestCaseError> {
    for &len in lens {
        let index = model.last_index() + 1;
        let tag = index * 7;
        let body = body_for(index, len);
        prop_assert_eq!(wal.append(tag, &body).expect("append"), index);
        model.records.push((tag, body));
    }
    Ok(())
}

fn run(ops: Vec<Op>, sync: SyncChoice) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    // Small segments so batches rotate often and truncations cross segment boundaries.
    let options = WalOptions { segment_size_bytes: 8192, sync };
    let (mut wal, _) = match Wal::open(dir.path(), options) {
        Err(sundial_wal::WalError::IoUringUnavailable(e)) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: io_uring unavailable here: {e}");
            return Ok(());
        }
        opened => opened.expect("open new log"),
    };
    let mut model = Model { first_index: 1, records: Vec::new(), begun: 0 };
    for op in ops {
        // Every op but `BeginBatch` finishes a begun commit.
        model.begun = 0;
        match op {
            Op::AppendBatch(lens) => {
                append_all(&mut wal, &mut model, &lens)?;
                prop_assert_eq!(wal.commit().expect("commit"), model.last_index());
            }
            Op::BeginBatch(lens) => {
                append_all(&mut wal, &mut model, &lens)?;
                // Records that did not fit the newest segment were committed when it rotated.
                model.begun = wal.staged_count() as usize;
                wal.commit_begin().expect("commit_begin");
            }
            Op::Finish => {
                prop_assert_eq!(wal.commit_finish().expect("commit_finish"), model.last_index());
            }
            Op::TruncateSuffix(n) => {
                let keep = model.records.len().saturating_sub(n as usize);
                wal.truncate_suffix(model.first_index + keep as u64).expect("truncate_suffix");
                model.records.truncate(keep);
            }
            Op::TruncatePrefix(n) => {
                let upto = (model.first_index + n).saturating_sub(1);
                wal.truncate_prefix(upto).expect("truncate_prefix");
                let drop = (n as usize).min(model.records.len());
                model.records.drain(..drop);
                model.first_index = model.first_index.max(upto + 1);
            }
            Op::Reopen => {
                drop(wal);
                let (reopened, report) = Wal::open(dir.path(), options).expect("reopen");
                prop_assert_eq!(report.torn_tail_bytes, 0, "a clean shutdown leaves no torn tail");
                wal = reopened;
            }
        }
        check(&wal, &model)?;
    }
    // Dropping the log finishes a begun commit: its records are there after a reopen.
    drop(wal);
    model.begun = 0;
    let (wal, _) = Wal::open(dir.path(), options).expect("final reopen");
    check(&wal, &model)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model_with_syscall_sync(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, SyncChoice::Syscall)?;
    }

    #[test]
    fn log_matches_model_with_io_uring_sync(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, SyncChoice::IoUring)?;
    }
}
