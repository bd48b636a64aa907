//! `sundial-wal`: Sundial's durable log. A directory of preallocated, memory-mapped segment
//! files holding `(index, tag, bytes)` records with chained CRC32C checksums; appends are
//! group-committed (one write and one fdatasync per batch, through io_uring where the kernel
//! allows it) and reads are zero-copy from the mapping.
//!
//! Main types: [`Wal`] (bytes), [`TypedWal`] (rkyv-archived values), [`WalOptions`],
//! [`WalError`]. Recovery truncates a torn, never-acknowledged tail and refuses damage to
//! acknowledged records with an error naming the file and offset.
//!
//! This crate knows nothing of Raft or jobs: a tag is just a `u64` (Raft puts the term there)
//! and a body is just bytes. It never writes through the mapping, and never panics on a bad
//! file.
//!
//! ```no_run
//! use sundial_wal::{Wal, WalOptions};
//! let (mut wal, _report) = Wal::open("/tmp/log", WalOptions::default())?;
//! wal.append(1, b"first")?;
//! wal.append(1, b"second")?;
//! let durable = wal.commit()?; // one fdatasync for both
//! assert_eq!(wal.get(durable).map(|e| e.body), Some(&b"second"[..]));
//! # Ok::<(), sundial_wal::WalError>(())
//! ```

mod atomic;
mod error;
pub mod format;
mod log;
pub mod recovery;
mod segment;
mod sync;
mod typed;

pub use error::{Result, WalError};
pub use log::{Entry, RecoveryReport, Snapshot, SnapshotDraft, Wal, WalOptions};
pub use log::{
    HARD_STATE_MAX_BYTES, SEGMENT_SIZE_DEFAULT_BYTES, SEGMENT_SIZE_MAX_BYTES, SEGMENT_SIZE_MIN_BYTES,
    SNAPSHOT_DATA_OFFSET_BYTES, SNAPSHOT_MAX_BYTES,
};
pub use sync::{SyncBackend, SyncChoice};
pub use typed::TypedWal;
