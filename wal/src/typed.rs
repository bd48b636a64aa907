//! A log of rkyv-archived values: every record is validated once, when the log opens, and then
//! read in place as `&Archived<T>` with no copy and no per-read validation.

use crate::error::{Result, WalError};
use crate::log::{RecoveryReport, Wal, WalOptions};
use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Portable, Serialize};
use std::marker::PhantomData;
use std::path::Path;

/// A [`Wal`] whose records are all archived values of `T`.
///
/// Invariant: every readable record is a valid archive of `T` — checked at [`TypedWal::open`]
/// for what was on disk, and true by construction for what [`TypedWal::append`] archived. That
/// is what lets [`TypedWal::get`] skip validation.
pub struct TypedWal<T> {
    wal: Wal,
    _values: PhantomData<fn() -> T>,
}

impl<T> TypedWal<T>
where
    T: Archive,
    T::Archived: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
{
    /// Opens and recovers the log, then validates every record as an archived `T`.
    pub fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<(TypedWal<T>, RecoveryReport)> {
        // Record bodies start on RECORD_ALIGN boundaries; in-place access needs no more.
        const { assert!(std::mem::align_of::<T::Archived>() <= crate::format::RECORD_ALIGN) };
        let (wal, report) = Wal::open(dir, options)?;
        for entry in wal.iter_from(wal.first_index()) {
            if let Err(error) = rkyv::access::<T::Archived, rancor::Error>(entry.body) {
                let (path, offset) = wal.location(entry.index).expect("the entry was just read");
                let reason = format!("record {} is not a valid archived value: {error}", entry.index);
                return Err(WalError::Corrupt { path, offset, reason });
            }
        }
        Ok((TypedWal { wal, _values: PhantomData }, report))
    }

    /// Archives `value` and stages it; see [`Wal::append`].
    pub fn append(&mut self, tag: u64, value: &T) -> Result<u64>
    where
        T: for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
    {
        let bytes = rkyv::to_bytes::<rancor::Error>(value).map_err(|e| WalError::Encode { reason: e.to_string() })?;
        self.wal.append(tag, &bytes)
    }

    /// See [`Wal::commit`].
    pub fn commit(&mut self) -> Result<u64> {
        self.wal.commit()
    }

    /// The tag and archived value at `index`, read in place.
    pub fn get(&self, index: u64) -> Option<(u64, &T::Archived)> {
        let entry = self.wal.get(index)?;
        // SAFETY: by the type's invariant the body is a valid archive of `T` (validated at open
        // or produced by rkyv at append); bodies start 16-byte aligned in the mapping, and the
        // slice is exactly the archived bytes, so the root (at the end) is where rkyv put it.
        let value = unsafe { rkyv::access_unchecked::<T::Archived>(entry.body) };
        Some((entry.tag, value))
    }

    /// See [`Wal::truncate_suffix`].
    pub fn truncate_suffix(&mut self, from: u64) -> Result<()> {
        self.wal.truncate_suffix(from)
    }

    /// See [`Wal::truncate_prefix`].
    pub fn truncate_prefix(&mut self, upto: u64) -> Result<()> {
        self.wal.truncate_prefix(upto)
    }

    /// The untyped log underneath, read-only (writing raw bytes would break the invariant).
    pub fn wal(&self) -> &Wal {
        &self.wal
    }
}
