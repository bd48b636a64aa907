//! The torn-tail fault: on a stopped node, find the log segment written last and damage its
//! end the way a crash in the middle of a write would — garbage where the next record was
//! going, the last record's final bytes overwritten, or cut (zeroed) — so the restart must
//! recover it.

use crate::nemesis::TornMode;
use crate::rng::Rng;
use std::path::{Path, PathBuf};
use sundial_wal::recovery::scan_segment;

/// Record header size in the log format (docs/INTERNALS.md, "On-disk format").
const RECORD_HEADER_BYTES: usize = 32;

/// Every live segment file under `dir` (not the retired `free-*` ones).
fn segments(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            segments(&path, found);
        } else if path.extension().is_some_and(|e| e == "wal")
            && !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("free-"))
        {
            found.push(path);
        }
    }
}

/// Tears the newest segment under a stopped node's data directory; says what it did.
pub fn tear(data: &Path, mode: TornMode, rng: &mut Rng) -> Result<String, String> {
    let mut found = Vec::new();
    segments(data, &mut found);
    let newest = found
        .into_iter()
        .filter_map(|path| Some((std::fs::metadata(&path).ok()?.modified().ok()?, path)))
        .max()
        .map(|(_, path)| path)
        .ok_or_else(|| format!("no log segment under {}", data.display()))?;
    let mut bytes = std::fs::read(&newest).map_err(|e| format!("{}: {e}", newest.display()))?;
    let scan = scan_segment(&bytes).map_err(|e| format!("{}: unreadable header: {e:?}", newest.display()))?;
    let last_record = scan.offsets.last().map(|&offset| offset as usize);
    let (what, start, length) = match (mode, last_record) {
        (TornMode::LastRecord | TornMode::Cut, Some(offset)) => {
            let body_len = u32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().unwrap_or([0; 4])) as usize;
            let cut = rng.between(1, body_len.clamp(1, 16) as u64) as usize;
            let body_end = offset + RECORD_HEADER_BYTES + body_len;
            let what = if mode == TornMode::Cut {
                "zeroed the last bytes of the last record"
            } else {
                "overwrote the last bytes of the last record"
            };
            (what, body_end - cut, cut)
        }
        _ => ("wrote garbage after the last record", scan.end_offset, rng.between(8, 64) as usize),
    };
    let end = (start + length).min(bytes.len());
    if end <= start {
        return Err(format!("{}: no room after the last record to tear", newest.display()));
    }
    let zeroed = mode == TornMode::Cut && last_record.is_some();
    if zeroed && bytes[start..end].iter().all(|&b| b == 0) {
        return Err(format!("{}: the bytes to cut were zeros already", newest.display()));
    }
    for byte in &mut bytes[start..end] {
        // Garbage is never zero: zeros after the last record would read as a clean end.
        *byte = if zeroed { 0 } else { rng.between(1, 255) as u8 };
    }
    let file =
        std::fs::OpenOptions::new().write(true).open(&newest).map_err(|e| format!("{}: {e}", newest.display()))?;
    std::os::unix::fs::FileExt::write_all_at(&file, &bytes[start..end], start as u64)
        .and_then(|()| file.sync_data())
        .map_err(|e| format!("{}: {e}", newest.display()))?;
    Ok(format!("{what}: {} bytes at offset {start} of {}", end - start, newest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_wal::{Wal, WalOptions};

    fn log_with_three_commits(dir: &Path) {
        let options = WalOptions { segment_size_bytes: 64 * 1024, ..WalOptions::default() };
        let (mut wal, _) = Wal::open(dir, options).unwrap();
        for body in [&b"first record"[..], b"second record", b"third record, the newest"] {
            wal.append(1, body).unwrap();
            wal.commit().unwrap();
        }
    }

    fn reopen(dir: &Path) -> sundial_wal::RecoveryReport {
        Wal::open(dir, WalOptions { segment_size_bytes: 64 * 1024, ..WalOptions::default() }).unwrap().1
    }

    #[test]
    fn garbage_after_the_last_record_is_cut_and_every_record_kept() {
        let dir = tempfile::tempdir().unwrap();
        log_with_three_commits(dir.path());
        let done = tear(dir.path(), TornMode::Garbage, &mut Rng::new(1)).unwrap();
        assert!(done.starts_with("wrote garbage after the last record"), "{done}");
        let report = reopen(dir.path());
        assert_eq!(report.last_index, 3);
        assert!(report.torn_tail_bytes > 0, "recovery saw the damage and zeroed it: {report:?}");
    }

    #[test]
    fn a_torn_last_record_is_cut_by_recovery() {
        let dir = tempfile::tempdir().unwrap();
        log_with_three_commits(dir.path());
        let done = tear(dir.path(), TornMode::LastRecord, &mut Rng::new(2)).unwrap();
        assert!(done.starts_with("overwrote the last bytes of the last record"), "{done}");
        let report = reopen(dir.path());
        assert_eq!(report.last_index, 2, "the damaged newest record is gone, the others stay");
        let cut = tempfile::tempdir().unwrap();
        log_with_three_commits(cut.path());
        let done = tear(cut.path(), TornMode::Cut, &mut Rng::new(4)).unwrap();
        assert!(done.starts_with("zeroed the last bytes of the last record"), "{done}");
        assert_eq!(reopen(cut.path()).last_index, 2);
        let empty = tempfile::tempdir().unwrap();
        assert!(tear(empty.path(), TornMode::Garbage, &mut Rng::new(3)).unwrap_err().contains("no log segment"));
    }
}
