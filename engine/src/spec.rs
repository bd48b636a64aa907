//! Where a job's spec lives: in the heap (`SpecCell::Here` as a value, `SpecCell::Packed` as
//! its archive), or archived in a file-backed store that the shell provides
//! (`SpecCell::Stored`), read back when a decision, a fire or
//! a read needs it. The core sees the store only through `SpecSink` and `SpecSegment`: it
//! does no I/O itself, and a spec reads the same wherever it lives, so replicas whose specs
//! live in different places (or nowhere but the heap) hold equal states with equal digests.

use crate::job::{ArchivedJobSpec, ArchivedOverlap, ArchivedSchedule, JobSpec, Overlap, RetryPolicy, Schedule};
use rkyv::rancor::Fallible;
use rkyv::rancor::Source as _;
use rkyv::with::{ArchiveWith, DeserializeWith, SerializeWith};
use rkyv::Place;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// Archives are placed at this alignment (the archive's own, with rkyv's `aligned` layout):
/// a store must hand out records starting at a multiple of it.
pub const SPEC_ALIGN_BYTES: usize = 16;

/// A region of the store that records are read from.
///
/// # Safety
/// `read(offset, len)` must return the bytes `SpecSink::put` was given for the view it made
/// with that offset and length: written before the view existed, starting at a multiple of
/// `SPEC_ALIGN_BYTES` in memory, and never written again while a view of them lives. Views
/// read them as a `JobSpec` archive without checking it again.
pub unsafe trait SpecSegment: Send + Sync {
    /// The record at `offset`, `len` bytes long, as `SpecSink::put` placed it.
    fn read(&self, offset: u32, len: u32) -> &[u8];
    /// A view of `len` bytes came into being (accounting of live bytes).
    fn retain(&self, len: u32);
    /// A view of `len` bytes went away.
    fn release(&self, len: u32);
    /// Most of the segment is dead: its live specs should be put again elsewhere, so the
    /// segment can go.
    fn wants_repack(&self) -> bool;
    /// The segment's number in its store, unique there for as long as the store's files
    /// live (a linked snapshot names its segments by it).
    fn number(&self) -> u64;
}

/// Where a linked snapshot (`SnapshotCopy::link`) says a job's spec lives: a
/// record of a store's segment, by the segment's number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecRef {
    pub segment: u64,
    pub offset: u32,
    pub len: u32,
}

/// A reference is archived as this many bytes in place of the spec's archive: fewer than
/// any `JobSpec` archive can be (its root alone is larger), so the two never pass for each
/// other. Layout: segment number (8, little-endian), offset (4), length (4).
pub const SPEC_REF_BYTES: usize = 16;

impl SpecRef {
    fn to_bytes(self) -> [u8; SPEC_REF_BYTES] {
        let mut bytes = [0u8; SPEC_REF_BYTES];
        bytes[..8].copy_from_slice(&self.segment.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.offset.to_le_bytes());
        bytes[12..].copy_from_slice(&self.len.to_le_bytes());
        bytes
    }

    fn from_bytes(bytes: &[u8]) -> Option<SpecRef> {
        let bytes: &[u8; SPEC_REF_BYTES] = bytes.try_into().ok()?;
        let (segment, rest) = bytes.split_at(8);
        let (offset, len) = rest.split_at(4);
        Some(SpecRef {
            segment: u64::from_le_bytes(segment.try_into().ok()?),
            offset: u32::from_le_bytes(offset.try_into().ok()?),
            len: u32::from_le_bytes(len.try_into().ok()?),
        })
    }
}

const _: () = assert!(std::mem::size_of::<ArchivedJobSpec>() > SPEC_REF_BYTES, "a reference never reads as a spec");

/// Where the state puts specs it need not keep in the heap.
pub trait SpecSink: Send {
    /// Keeps `archive` (an archived `JobSpec`) and returns a view of it, or `None` when the
    /// store cannot take it (full, or a write failed): the spec then stays in the heap.
    fn put(&mut self, archive: &[u8]) -> Option<SpecView>;
    /// `put` of each archive, in order (a store may write them together).
    fn put_many(&mut self, archives: &[&[u8]]) -> Vec<Option<SpecView>> {
        archives.iter().map(|archive| self.put(archive)).collect()
    }
    /// Some segment asked to be repacked (`SpecSegment::wants_repack`).
    fn repack_wanted(&self) -> bool;
}

/// A spec archived in a store: the segment stays mapped while any view of it lives.
pub struct SpecView {
    segment: Arc<dyn SpecSegment>,
    offset: u32,
    len: u32,
}

impl Clone for SpecView {
    fn clone(&self) -> SpecView {
        // SAFETY: the same record of the same segment as a view that already exists.
        unsafe { SpecView::new(self.segment.clone(), self.offset, self.len) }
    }
}

impl Drop for SpecView {
    fn drop(&mut self) {
        self.segment.release(self.len);
    }
}

impl SpecView {
    /// A view of the record at `offset`, `len` bytes long, in `segment`.
    ///
    /// # Safety
    /// The record must be one `SpecSink::put` placed there, from the archive it was given
    /// (views are read as a `JobSpec` archive without checking it again).
    pub unsafe fn new(segment: Arc<dyn SpecSegment>, offset: u32, len: u32) -> SpecView {
        segment.retain(len);
        SpecView { segment, offset, len }
    }

    /// Where the record lies in its store.
    pub fn reference(&self) -> SpecRef {
        SpecRef { segment: self.segment.number(), offset: self.offset, len: self.len }
    }

    /// The segment the record lies in.
    pub fn segment(&self) -> &Arc<dyn SpecSegment> {
        &self.segment
    }

    /// A view of the record `reference` names in `segment` (a linked snapshot's, restored),
    /// after checking that it lies inside the segment's first `segment_len` bytes, is aligned
    /// and holds a `JobSpec` archive.
    pub fn resolve(segment: Arc<dyn SpecSegment>, segment_len: u64, reference: SpecRef) -> Result<SpecView, String> {
        let SpecRef { offset, len, .. } = reference;
        if u64::from(offset) + u64::from(len) > segment_len || offset as usize % SPEC_ALIGN_BYTES != 0 {
            return Err(format!(
                "a spec at {offset}+{len} of segment {} lies outside its {segment_len} bytes or off alignment",
                reference.segment
            ));
        }
        let bytes = segment.read(offset, len);
        if bytes.as_ptr().align_offset(SPEC_ALIGN_BYTES) != 0 {
            return Err(format!("segment {} is not mapped at the archive's alignment", reference.segment));
        }
        rkyv::access::<ArchivedJobSpec, rkyv::rancor::Error>(bytes)
            .map_err(|error| format!("the spec at {offset} of segment {}: {error}", reference.segment))?;
        // SAFETY: inside the segment and aligned (checked above), a valid JobSpec archive
        // (checked above); segments are never written below the length a snapshot listed.
        Ok(unsafe { SpecView::new(segment, offset, len) })
    }

    /// The archived bytes, as they were put.
    pub fn bytes(&self) -> &[u8] {
        self.segment.read(self.offset, self.len)
    }

    fn archived(&self) -> &ArchivedJobSpec {
        debug_assert_eq!(self.bytes().as_ptr().align_offset(SPEC_ALIGN_BYTES), 0, "records are aligned");
        // SAFETY: the bytes were put by `SpecCell` (the only caller of `put`): an archive it
        // made or checked, at an offset aligned to SPEC_ALIGN_BYTES, never written again
        // while this view lives (SpecSegment's contract).
        unsafe { rkyv::access_unchecked::<ArchivedJobSpec>(self.bytes()) }
    }
}

/// The owned value of an archive (a spec's, or part of one).
fn owned<T, A>(archived: &A) -> T
where
    A: rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    match rkyv::deserialize::<T, rkyv::rancor::Error>(archived) {
        Ok(value) => value,
        // Never fails: the parts of a JobSpec deserialize by allocating and copying only.
        Err(error) => unreachable!("deserializing part of an archived JobSpec failed: {error}"),
    }
}

/// A spec's archive in the heap, made from a spec or checked when it was read, and never
/// changed: what a create command carries, and a restored job's spec until a store takes it.
#[derive(Clone)]
pub struct PackedSpec(rkyv::util::AlignedVec<SPEC_ALIGN_BYTES>);

impl std::ops::Deref for PackedSpec {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// `bytes` copied to the alignment rkyv archives are read at (all of ours: commands, specs,
/// snapshots), for bytes that arrive without it.
pub fn aligned_copy(bytes: &[u8]) -> rkyv::util::AlignedVec<SPEC_ALIGN_BYTES> {
    let mut aligned = rkyv::util::AlignedVec::<SPEC_ALIGN_BYTES>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    aligned
}

/// A packed spec's archive.
fn packed(bytes: &PackedSpec) -> &ArchivedJobSpec {
    // SAFETY: a PackedSpec's bytes are a JobSpec archive, made from a spec (`PackedSpec::of`)
    // or checked as one (`PackedSpec::checked`, the only other maker), and never changed.
    unsafe { rkyv::access_unchecked::<ArchivedJobSpec>(&bytes.0) }
}

impl PackedSpec {
    /// The archive of `spec`: what a create carries through the log and the store keeps.
    pub fn of(spec: &JobSpec) -> PackedSpec {
        match archive(spec) {
            Ok(bytes) => PackedSpec(bytes),
            // Never fails: a JobSpec is owned strings, maps and numbers; archiving it only
            // allocates (which aborts on failure).
            Err(error) => unreachable!("archiving a JobSpec failed: {error}"),
        }
    }

    /// `bytes` copied to the archive's alignment, after checking they hold a JobSpec archive.
    pub fn checked(bytes: &[u8]) -> Result<PackedSpec, rkyv::rancor::Error> {
        let aligned = aligned_copy(bytes);
        // Checked once here; read back unchecked afterwards.
        rkyv::access::<ArchivedJobSpec, rkyv::rancor::Error>(&aligned)?;
        Ok(PackedSpec(aligned))
    }

    /// The job's id, read in place.
    pub fn id(&self) -> &str {
        packed(self).id.as_str()
    }

    /// The spec as a value (decoded: for rare paths and tests).
    pub fn to_spec(&self) -> JobSpec {
        owned(packed(self))
    }
}

impl PartialEq for PackedSpec {
    /// Equal specs, whatever their bytes.
    fn eq(&self, other: &PackedSpec) -> bool {
        self.to_spec() == other.to_spec()
    }
}

impl Eq for PackedSpec {}

impl fmt::Debug for PackedSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_spec().fmt(f)
    }
}

/// In JSON (commands of format 0) a packed spec is the spec itself.
impl serde::Serialize for PackedSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_spec().serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for PackedSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<PackedSpec, D::Error> {
        JobSpec::deserialize(deserializer).map(|spec| PackedSpec::of(&spec))
    }
}

/// Archived (in a command) as the bytes of the spec's own archive, so a command carries
/// the very bytes the store keeps: applying it copies them, decoding nothing. Checked as a
/// JobSpec archive when read back.
impl rkyv::Archive for PackedSpec {
    type Archived = rkyv::vec::ArchivedVec<u8>;
    type Resolver = rkyv::vec::VecResolver;

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        rkyv::vec::ArchivedVec::resolve_from_len(self.0.len(), resolver, out);
    }
}

impl<S: Fallible + rkyv::ser::Writer + rkyv::ser::Allocator + ?Sized> rkyv::Serialize<S> for PackedSpec {
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        rkyv::vec::ArchivedVec::<u8>::serialize_from_slice(&self.0, serializer)
    }
}

impl<D: Fallible + ?Sized> rkyv::Deserialize<PackedSpec, D> for rkyv::vec::ArchivedVec<u8>
where
    D::Error: rkyv::rancor::Source,
{
    fn deserialize(&self, _: &mut D) -> Result<PackedSpec, D::Error> {
        PackedSpec::checked(self.as_slice()).map_err(D::Error::new)
    }
}

/// The archive of a spec as a store keeps it.
fn archive(spec: &JobSpec) -> Result<rkyv::util::AlignedVec<SPEC_ALIGN_BYTES>, rkyv::rancor::Error> {
    rkyv::to_bytes::<rkyv::rancor::Error>(spec)
}

/// A job's spec, wherever it lives.
#[derive(Clone)]
pub enum SpecCell {
    /// In the heap, as a value (a job restored from a JSON snapshot, until a store takes it).
    Here(Box<JobSpec>),
    /// In the heap, as its checked archive: a created job's (the bytes its command carried)
    /// or a restored one's, until a store takes it (where none is attached, for good: its
    /// reads then decode it, as they do a stored spec).
    Packed(PackedSpec),
    /// In a store.
    Stored(SpecView),
    /// In a store, in a copy taken for a linked snapshot: archived as its `SpecRef`.
    Linked(SpecView),
    /// Read from a linked snapshot and not yet resolved (`State::restore_linked` resolves
    /// every one before the state is used; nothing else holds one).
    Unresolved(SpecRef),
}

impl SpecCell {
    pub fn new(spec: JobSpec) -> SpecCell {
        SpecCell::Here(Box::new(spec))
    }

    /// The spec: borrowed from the heap, or read back from the store.
    pub fn get(&self) -> Cow<'_, JobSpec> {
        match self.archive_of() {
            Ok(spec) => Cow::Borrowed(spec),
            Err(archived) => Cow::Owned(owned(archived)),
        }
    }

    /// A one-time job's fire time, read in place (`None`: a cron job).
    pub fn once_at_ms(&self) -> Option<u64> {
        match self.archive_of() {
            Ok(spec) => match spec.schedule {
                Schedule::Once { at_ms } => Some(at_ms),
                Schedule::Cron(_) => None,
            },
            Err(archived) => match &archived.schedule {
                ArchivedSchedule::Once { at_ms } => Some(at_ms.to_native()),
                ArchivedSchedule::Cron(_) => None,
            },
        }
    }

    /// The job's id without decoding the rest of the spec.
    pub fn id(&self) -> &str {
        match self.archive_of() {
            Ok(spec) => &spec.id,
            Err(archived) => archived.id.as_str(),
        }
    }

    /// Moves a spec held in the heap into `sink`; it stays in the heap if the sink refuses.
    pub fn store_in(&mut self, sink: &mut dyn SpecSink) {
        let view = match self {
            SpecCell::Here(spec) => archive(spec).ok().and_then(|bytes| sink.put(&bytes)),
            SpecCell::Packed(bytes) => sink.put(bytes),
            SpecCell::Stored(_) | SpecCell::Linked(_) | SpecCell::Unresolved(_) => None,
        };
        match view {
            Some(view) => *self = SpecCell::Stored(view),
            None => self.keep_in_heap(),
        }
    }

    /// A spec that stays in the heap (no store, or the store refused it) keeps its archive
    /// without the room it was grown with.
    pub fn keep_in_heap(&mut self) {
        if let SpecCell::Packed(bytes) = self {
            bytes.0.shrink_to_fit();
        }
    }

    /// The archive of a spec not held as a value.
    fn archive_of(&self) -> Result<&JobSpec, &ArchivedJobSpec> {
        match self {
            SpecCell::Here(spec) => Ok(spec),
            SpecCell::Packed(bytes) => Err(packed(bytes)),
            SpecCell::Stored(view) | SpecCell::Linked(view) => Err(view.archived()),
            SpecCell::Unresolved(reference) => {
                unreachable!("a restore resolves every spec reference before the state is used ({reference:?})")
            }
        }
    }

    /// Makes a stored spec a link (archived as its reference); other cells stay as they are.
    pub(crate) fn link_in_place(&mut self) {
        if let SpecCell::Stored(view) = self {
            *self = SpecCell::Linked(view.clone());
        }
    }

    /// The reference of a spec read from a linked snapshot, not yet resolved.
    pub(crate) fn unresolved(&self) -> Option<SpecRef> {
        match self {
            SpecCell::Unresolved(reference) => Some(*reference),
            _ => None,
        }
    }

    /// The store's view of a linked spec, if it is one.
    pub(crate) fn link(&self) -> Option<&SpecView> {
        match self {
            SpecCell::Linked(view) => Some(view),
            _ => None,
        }
    }

    // What decisions on every fire read, from the archive in place (no whole decode).

    pub fn flow_key(&self) -> Option<&str> {
        match self.archive_of() {
            Ok(spec) => spec.flow.as_ref().map(|flow| flow.key.as_str()),
            Err(archived) => archived.flow.as_ref().map(|flow| flow.key.as_str()),
        }
    }

    pub fn depends_on(&self) -> Vec<&str> {
        match self.archive_of() {
            Ok(spec) => spec.depends_on.iter().map(String::as_str).collect(),
            Err(archived) => archived.depends_on.iter().map(|id| id.as_str()).collect(),
        }
    }

    /// The job has every one of these labels with these values.
    pub fn has_labels(&self, labels: &[(String, String)]) -> bool {
        match self.archive_of() {
            Ok(spec) => labels.iter().all(|(key, value)| spec.labels.get(key) == Some(value)),
            Err(archived) => labels
                .iter()
                .all(|(key, value)| archived.labels.get(key.as_str()).is_some_and(|found| found.as_str() == value)),
        }
    }

    pub fn is_once(&self) -> bool {
        self.once_at_ms().is_some()
    }

    /// A cron job's overlap policy (`None`: a one-time job).
    pub fn cron_overlap(&self) -> Option<Overlap> {
        match self.archive_of() {
            Ok(spec) => match &spec.schedule {
                Schedule::Cron(cron) => Some(cron.overlap),
                Schedule::Once { .. } => None,
            },
            Err(archived) => match &archived.schedule {
                ArchivedSchedule::Cron(cron) => Some(match cron.overlap {
                    ArchivedOverlap::Skip => Overlap::Skip,
                    ArchivedOverlap::Allow => Overlap::Allow,
                }),
                ArchivedSchedule::Once { .. } => None,
            },
        }
    }

    pub fn retry(&self) -> Cow<'_, RetryPolicy> {
        match self.archive_of() {
            Ok(spec) => Cow::Borrowed(&spec.retry),
            Err(archived) => Cow::Owned(owned(&archived.retry)),
        }
    }

    pub fn deadline_ms(&self) -> Option<u64> {
        match self.archive_of() {
            Ok(spec) => spec.deadline_ms,
            Err(archived) => archived.deadline_ms.as_ref().map(|ms| ms.to_native()),
        }
    }

    /// The URL told of a fire's success (`true`) or of its dead-lettering.
    pub fn callback_url(&self, success: bool) -> Option<String> {
        match self.archive_of() {
            Ok(spec) => if success { &spec.callbacks.on_success } else { &spec.callbacks.on_failure }.clone(),
            Err(archived) => {
                let url = if success { &archived.callbacks.on_success } else { &archived.callbacks.on_failure };
                url.as_ref().map(|url| url.as_str().to_string())
            }
        }
    }

    pub fn is_stored(&self) -> bool {
        matches!(self, SpecCell::Stored(_) | SpecCell::Linked(_))
    }

    /// The archive of a spec held in the heap as one (a created job's, not yet stored).
    pub fn packed_bytes(&self) -> Option<&[u8]> {
        match self {
            SpecCell::Packed(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// The spec now lies in a store (`view`, from `SpecSink::put_many`), or stays in the heap.
    pub fn stored_as(&mut self, view: Option<SpecView>) {
        match view {
            Some(view) => *self = SpecCell::Stored(view),
            None => self.keep_in_heap(),
        }
    }

    /// Puts a stored spec again into `sink` if its segment asked to be repacked (the bytes
    /// are copied as they are: no decoding). True if it moved.
    pub fn repack_into(&mut self, sink: &mut dyn SpecSink) -> bool {
        let SpecCell::Stored(view) = self else { return false };
        if !view.segment.wants_repack() {
            return false;
        }
        match sink.put(view.bytes()) {
            Some(moved) => {
                *self = SpecCell::Stored(moved);
                true
            }
            None => false,
        }
    }
}

impl PartialEq for SpecCell {
    fn eq(&self, other: &SpecCell) -> bool {
        *self.get() == *other.get()
    }
}

impl Eq for SpecCell {}

impl fmt::Debug for SpecCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.get().fmt(f)
    }
}

/// Serialized as the spec itself, wherever it lives: JSON and archived states read the same
/// as before specs could be stored.
impl serde::Serialize for SpecCell {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for SpecCell {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<SpecCell, D::Error> {
        JobSpec::deserialize(deserializer).map(SpecCell::new)
    }
}

/// rkyv wrapper: a `SpecCell` is archived as the bytes of the spec's own archive (what a
/// store keeps), so a snapshot copies stored specs out, and a restore into a store copies them
/// in, without decoding either way. Validated as a `JobSpec` archive when read back.
pub struct AsSpecArchive;

pub struct SpecArchiveResolver {
    bytes: rkyv::vec::VecResolver,
    len: usize,
}

impl ArchiveWith<SpecCell> for AsSpecArchive {
    type Archived = rkyv::vec::ArchivedVec<u8>;
    type Resolver = SpecArchiveResolver;

    fn resolve_with(_: &SpecCell, resolver: Self::Resolver, out: Place<Self::Archived>) {
        rkyv::vec::ArchivedVec::resolve_from_len(resolver.len, resolver.bytes, out);
    }
}

impl<S: Fallible + rkyv::ser::Writer + rkyv::ser::Allocator + ?Sized> SerializeWith<SpecCell, S> for AsSpecArchive
where
    S::Error: rkyv::rancor::Source,
{
    fn serialize_with(field: &SpecCell, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        let write = |bytes: &[u8], serializer: &mut S| {
            let resolver = rkyv::vec::ArchivedVec::<u8>::serialize_from_slice(bytes, serializer)?;
            Ok(SpecArchiveResolver { bytes: resolver, len: bytes.len() })
        };
        match field {
            SpecCell::Here(spec) => {
                let bytes = archive(spec).map_err(S::Error::new)?;
                write(&bytes, serializer)
            }
            SpecCell::Packed(bytes) => write(bytes, serializer),
            SpecCell::Stored(view) => write(view.bytes(), serializer),
            SpecCell::Linked(view) => write(&view.reference().to_bytes(), serializer),
            SpecCell::Unresolved(reference) => write(&reference.to_bytes(), serializer),
        }
    }
}

impl<D: Fallible + ?Sized> DeserializeWith<rkyv::vec::ArchivedVec<u8>, SpecCell, D> for AsSpecArchive
where
    D::Error: rkyv::rancor::Source,
{
    fn deserialize_with(field: &rkyv::vec::ArchivedVec<u8>, _: &mut D) -> Result<SpecCell, D::Error> {
        if let Some(reference) = SpecRef::from_bytes(field.as_slice()) {
            return Ok(SpecCell::Unresolved(reference));
        }
        PackedSpec::checked(field.as_slice()).map(SpecCell::Packed).map_err(D::Error::new)
    }
}
