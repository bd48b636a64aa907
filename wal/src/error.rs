//! The crate's error type: every failure names the file (and offset) it concerns.

use std::io;
use std::path::PathBuf;

/// Result alias for the log's operations.
pub type Result<T, E = WalError> = std::result::Result<T, E>;

/// Everything that can go wrong opening, writing or reading a log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An I/O call failed; `op` says which.
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    /// The disk is full. The log stays readable and consistent; appends fail until space frees.
    #[error("{op} {path}: no space left on device")]
    NoSpace { op: &'static str, path: PathBuf },
    /// Acknowledged data is damaged: never skipped, never returned as data.
    #[error("{path} offset {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    /// A file the log needs is missing, or files disagree about what the log holds.
    #[error("{path}: {reason}")]
    Inconsistent { path: PathBuf, reason: String },
    /// A record, hard state or snapshot over its size limit.
    #[error("{what} of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge { what: &'static str, len_bytes: usize, max_bytes: usize },
    /// An index outside the log's range was asked for in an operation that needs one inside it.
    #[error("index {index} is outside the log's range [{first}, {last}]")]
    OutOfRange { index: u64, first: u64, last: u64 },
    /// An operation that needs no staged records was called with some pending.
    #[error("{op} needs the staged records committed first ({staged} staged)")]
    StagedPending { op: &'static str, staged: u64 },
    /// A value could not be archived with rkyv.
    #[error("cannot archive the value: {reason}")]
    Encode { reason: String },
    /// A write or sync failed earlier; what reached disk is unknown until recovery runs again.
    #[error("the log refuses writes after an earlier write or sync failure; reopen it to recover")]
    Poisoned,
    /// io_uring was asked for explicitly and the kernel refused it.
    #[error("io_uring is not available: {0}")]
    IoUringUnavailable(io::Error),
    /// Another open log (in this or another process) holds the directory.
    #[error("{path} is locked by another open log")]
    Locked { path: PathBuf },
    /// A setting is out of its allowed range.
    #[error("invalid option {field}: {rule}")]
    InvalidOption { field: &'static str, rule: &'static str },
}

impl WalError {
    /// Wraps an I/O error with the operation and path, mapping ENOSPC to [`WalError::NoSpace`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> WalError {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            WalError::NoSpace { op, path }
        } else {
            WalError::Io { op, path, source }
        }
    }
}
