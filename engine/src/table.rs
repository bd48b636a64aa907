//! The jobs of a partition: records in numbered slots, found by id through a hash index.
//!
//! A job is a fixed-size record (`Job`: scheduling fields, a view of its spec, one pointer to
//! what it gains once it fires) stored inline in one vector, so a pending job costs its
//! record and an index entry — no allocation of its own, no tree node, no copy of its id
//! (the id is read from the spec). Slots freed by removals are reused last-freed first, so
//! two replicas that applied the same commands (or restored the same archived snapshot)
//! hold every job in the same slot, and a snapshot carries slots and free list as they are.
//! Nothing replicated depends on slots: a state restored from JSON (format 0) numbers its
//! jobs in id order, and the JSON form and digests know jobs by id only. The table does not
//! shrink: after a peak its empty slots stay (72 bytes each) until new jobs fill them.
//!
//! The index holds, per job, 32 bits of a hash of its id (keyed at random per process: ids
//! cannot be chosen to collide) and its slot — 8 bytes; a match is confirmed by the id read
//! from the spec. It is only looked up, never iterated, and rebuilt after a restore.

use hashbrown::HashTable;
use serde::{Deserialize, Serialize};

use crate::state::Job;

/// Slots are `u32`: a partition holds at most this many jobs (the node's own limits are far
/// below; an insert past it is refused by `insert`).
pub const SLOTS_MAX: usize = u32::MAX as usize;

#[derive(Clone, Debug, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JobTable {
    #[rkyv(with = SlotsWithRoom)]
    slots: Vec<Option<Job>>,
    /// Empty slots, the next one to fill last.
    free: Vec<u32>,
    #[rkyv(with = rkyv::with::Skip)]
    index: HashTable<IndexEntry>,
    #[rkyv(with = rkyv::with::Skip)]
    hasher: ahash::RandomState,
    /// How many slots the table is expected to reach (`expect_slots`; 0: not said).
    #[rkyv(with = rkyv::with::Skip)]
    expected_slots: usize,
}

/// An entry of a compact index: 32 bits of a key's hash, and where the record is (a job's
/// slot here; a tombstone's sequence number in `tombstones`). 8 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndexEntry {
    pub(crate) hash: u32,
    pub(crate) slot: u32,
}

impl IndexEntry {
    /// The hash table's hash of the entry, from the 32 bits it keeps, spread over 64 (an
    /// odd multiplier) so that both the bucket bits and the tag bits the table takes vary.
    pub(crate) fn table_hash(self) -> u64 {
        u64::from(self.hash).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// A restored table has room for this fraction more jobs than it holds, so replaying the
/// log's tail after a linked snapshot (taken every sixteenth of the job count) does not grow
/// it: growing copies the whole table into a new allocation. The room is address space
/// until used (its pages are never touched), not resident memory.
const RESTORED_ROOM_DIVISOR: usize = 8;

/// rkyv wrapper for the slots: archived exactly as a `Vec` (the layout is the same), and
/// deserialized into a vector with room to grow (`RESTORED_ROOM_DIVISOR`).
pub struct SlotsWithRoom;

type Slots = Vec<Option<Job>>;

impl rkyv::with::ArchiveWith<Slots> for SlotsWithRoom {
    type Archived = rkyv::Archived<Slots>;
    type Resolver = rkyv::Resolver<Slots>;

    fn resolve_with(field: &Slots, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::Archive::resolve(field, resolver, out);
    }
}

impl<S: rkyv::rancor::Fallible + ?Sized> rkyv::with::SerializeWith<Slots, S> for SlotsWithRoom
where
    Slots: rkyv::Serialize<S>,
{
    fn serialize_with(field: &Slots, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        rkyv::Serialize::serialize(field, serializer)
    }
}

impl<D: rkyv::rancor::Fallible + ?Sized> rkyv::with::DeserializeWith<rkyv::Archived<Slots>, Slots, D> for SlotsWithRoom
where
    rkyv::Archived<Option<Job>>: rkyv::Deserialize<Option<Job>, D>,
{
    fn deserialize_with(field: &rkyv::Archived<Slots>, deserializer: &mut D) -> Result<Slots, D::Error> {
        let mut slots = Vec::with_capacity(field.len() + field.len() / RESTORED_ROOM_DIVISOR);
        for slot in field.iter() {
            slots.push(rkyv::Deserialize::deserialize(slot, deserializer)?);
        }
        Ok(slots)
    }
}

/// The table holds `SLOTS_MAX` jobs; nothing was inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the partition holds {SLOTS_MAX} jobs, its most")]
pub struct TableFull;

impl JobTable {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The entry `id` would have in `slot` (the hash's low 32 bits).
    fn entry(&self, id: &str, slot: u32) -> IndexEntry {
        IndexEntry { hash: self.hasher.hash_one(id) as u32, slot }
    }

    /// The slot of the job `id`.
    pub fn slot_of(&self, id: &str) -> Option<u32> {
        let (wanted, slots) = (self.entry(id, 0), &self.slots);
        // The kept hash first: the id is read from the spec (maybe from its store's
        // mapping) only for an entry that is almost surely the one.
        let found = self.index.find(wanted.table_hash(), |e| e.hash == wanted.hash && holds(slots, e.slot, id));
        found.map(|e| e.slot)
    }

    pub fn get(&self, id: &str) -> Option<&Job> {
        self.slot_of(id).and_then(|slot| self.at(slot))
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Job> {
        let slot = self.slot_of(id)?;
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.slot_of(id).is_some()
    }

    /// Room for `additional` more jobs without growing (a replay that will insert up to
    /// that many: one allocation of each instead of doublings, each a copy). Memory that
    /// cannot be had is not an error: the table then grows as it fills.
    pub fn reserve(&mut self, additional: usize) {
        let new_slots = additional.saturating_sub(self.free.len());
        let _ = self.slots.try_reserve(new_slots);
        let _ = self.index.try_reserve(additional, |e: &IndexEntry| e.table_hash());
    }

    /// The table is expected to reach `jobs` slots: once large (`room::EXPECTED_ROOM_FROM`),
    /// its slots grow once to that many instead of doubling (the index still doubles: its
    /// entries land anywhere in it, so room reserved there would be memory touched).
    pub fn expect_slots(&mut self, jobs: usize) {
        self.expected_slots = jobs;
    }

    /// The records, slots and free list as they are, without an index: what an archived
    /// snapshot holds (`State::copy_for_snapshot`), copied without hashing any id.
    pub(crate) fn copy_records(&self) -> JobTable {
        JobTable {
            slots: self.slots.clone(),
            free: self.free.clone(),
            index: HashTable::new(),
            hasher: self.hasher.clone(),
            expected_slots: 0,
        }
    }

    /// The job in `slot`, if one is there.
    pub fn at(&self, slot: u32) -> Option<&Job> {
        self.slots.get(slot as usize)?.as_ref()
    }

    pub fn at_mut(&mut self, slot: u32) -> Option<&mut Job> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Puts `job` in the table, replacing a job of the same id in its slot; returns the slot.
    pub fn insert(&mut self, job: Job) -> Result<u32, TableFull> {
        if let Some(slot) = self.slot_of(job.id()) {
            self.slots[slot as usize] = Some(job);
            return Ok(slot);
        }
        // A free slot is empty (`rebuild_index` checks a restored list); one that is not is
        // never overwritten: the job goes to a new slot.
        let slot = match self.free.pop().filter(|&slot| self.at(slot).is_none() && (slot as usize) < self.slots.len()) {
            Some(slot) => slot,
            None if self.slots.len() >= SLOTS_MAX => return Err(TableFull),
            None => {
                let needed = self.slots.len() + 1;
                crate::room::grow_toward_expected(&mut self.slots, needed, self.expected_slots);
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let entry = self.entry(job.id(), slot);
        self.slots[slot as usize] = Some(job);
        self.index.insert_unique(entry.table_hash(), entry, |e| e.table_hash());
        Ok(slot)
    }

    /// Takes the job `id` out; its slot is the next one filled.
    pub fn remove(&mut self, id: &str) -> Option<Job> {
        let (wanted, slots) = (self.entry(id, 0), &self.slots);
        let entry =
            self.index.find_entry(wanted.table_hash(), |e| e.hash == wanted.hash && holds(slots, e.slot, id)).ok()?;
        let (IndexEntry { slot, .. }, _) = entry.remove();
        let job = self.slots[slot as usize].take();
        self.free.push(slot);
        job
    }

    /// Every job with its slot, in slot order (the same on every replica).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Job)> {
        self.slots.iter().enumerate().filter_map(|(slot, job)| job.as_ref().map(|job| (slot as u32, job)))
    }

    pub fn values(&self) -> impl Iterator<Item = &Job> {
        self.slots.iter().flatten()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Job> {
        self.slots.iter_mut().flatten()
    }

    /// Jobs from slot `from` on, with their slots (a cursor that survives changes between
    /// calls: slots do not move).
    pub fn from_slot_mut(&mut self, from: u32) -> impl Iterator<Item = (u32, &mut Job)> {
        let skip = (from as usize).min(self.slots.len());
        self.slots[skip..]
            .iter_mut()
            .enumerate()
            .filter_map(move |(offset, job)| job.as_mut().map(|job| ((skip + offset) as u32, job)))
    }

    /// Makes the index again from the slots (after a restore, which carries no index), and
    /// checks what a restored table must hold: every free slot empty, listed once, and every
    /// other slot a job, each id in one slot only. Says what is wrong otherwise.
    pub fn rebuild_index(&mut self) -> Result<(), String> {
        let mut listed = vec![false; self.slots.len()];
        for &slot in &self.free {
            match listed.get_mut(slot as usize) {
                Some(seen) if !*seen && self.slots[slot as usize].is_none() => *seen = true,
                _ => return Err(format!("free slot {slot} is out of range, listed twice or holds a job")),
            }
        }
        let filled = self.slots.iter().filter(|job| job.is_some()).count();
        if filled + self.free.len() != self.slots.len() {
            return Err(format!("{} slots: {filled} jobs and {} free", self.slots.len(), self.free.len()));
        }
        self.index = HashTable::with_capacity(filled);
        for (slot, job) in self.slots.iter().enumerate() {
            if let Some(job) = job {
                let id = job.id();
                let entry = IndexEntry { hash: self.hasher.hash_one(id) as u32, slot: slot as u32 };
                let slots = &self.slots;
                let same = |e: &IndexEntry| e.hash == entry.hash && holds(slots, e.slot, id);
                if let Some(other) = self.index.find(entry.table_hash(), same) {
                    return Err(format!("job {id} is in slots {} and {slot}", other.slot));
                }
                self.index.insert_unique(entry.table_hash(), entry, |e| e.table_hash());
            }
        }
        Ok(())
    }

    /// Whether slots, free list and index agree (for the state's own check).
    pub fn is_consistent(&self) -> bool {
        let filled = self.slots.iter().filter(|job| job.is_some()).count();
        filled == self.index.len()
            && filled + self.free.len() == self.slots.len()
            && self.free.iter().all(|&slot| self.at(slot).is_none())
            && self.iter().all(|(slot, job)| self.slot_of(job.id()) == Some(slot))
    }
}

fn holds(slots: &[Option<Job>], slot: u32, id: &str) -> bool {
    slots.get(slot as usize).and_then(Option::as_ref).is_some_and(|job| job.id() == id)
}

/// Equal when they hold the same jobs by id, wherever each sits.
impl PartialEq for JobTable {
    fn eq(&self, other: &JobTable) -> bool {
        self.len() == other.len() && self.values().all(|job| other.get(job.id()) == Some(job))
    }
}

impl Eq for JobTable {}

/// JSON (snapshot format 0, digests): a map of id → job in id order, as when jobs were a map.
impl Serialize for JobTable {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut jobs: Vec<&Job> = self.values().collect();
        jobs.sort_unstable_by(|a, b| a.id().cmp(b.id()));
        let mut map = serializer.serialize_map(Some(jobs.len()))?;
        for job in jobs {
            map.serialize_entry(job.id(), job)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for JobTable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<JobTable, D::Error> {
        let jobs = std::collections::BTreeMap::<String, Job>::deserialize(deserializer)?;
        let mut table = JobTable::default();
        for (id, job) in jobs {
            if job.id() != id {
                return Err(serde::de::Error::custom(format!("the job under {id:?} is {:?}", job.id())));
            }
            table.insert(job).map_err(serde::de::Error::custom)?;
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_job_request;
    use crate::state::Status;

    const T0: u64 = 1_800_000_000_000;

    fn job(id: &str) -> Job {
        let request = serde_json::json!({"id": id, "run_at": T0 + 60_000, "url": "https://example.com/hook"});
        let spec = parse_job_request(&request.to_string(), T0, "unused").expect("valid request");
        Job::new(crate::spec::SpecCell::new(spec), Status::Pending, T0, Some(T0 + 60_000))
    }

    #[test]
    fn freed_slots_are_reused_last_freed_first_and_lookups_follow_the_jobs() {
        let mut table = JobTable::default();
        let slots: Vec<u32> = ["a", "b", "c", "d"].map(|id| table.insert(job(id)).expect("room")).to_vec();
        assert_eq!(slots, [0, 1, 2, 3]);
        assert!(table.remove("b").is_some() && table.remove("d").is_some() && table.remove("b").is_none());
        assert_eq!((table.len(), table.get("b"), table.slot_of("c")), (2, None, Some(2)));
        assert_eq!(table.insert(job("e")).expect("room"), 3, "the last freed slot first");
        assert_eq!(table.insert(job("f")).expect("room"), 1);
        assert_eq!(table.insert(job("c")).expect("room"), 2, "the same id replaces its job in place");
        assert_eq!(
            table.iter().map(|(slot, job)| (slot, job.id())).collect::<Vec<_>>(),
            [(0, "a"), (1, "f"), (2, "c"), (3, "e")]
        );
        assert!(table.is_consistent());
        let mut restored = table.clone();
        restored.index = HashTable::new();
        assert!(!restored.is_consistent(), "an index that lost its entries is caught");
        restored.rebuild_index().expect("a sound table");
        assert!(restored.is_consistent() && restored == table);
    }

    #[test]
    fn the_consistency_check_catches_a_free_slot_that_holds_a_job() {
        let mut table = JobTable::default();
        for id in ["a", "b"] {
            table.insert(job(id)).expect("room");
        }
        table.free.push(0);
        assert!(!table.is_consistent());
        let refused = table.clone().rebuild_index().expect_err("a restored free list that names a job");
        assert!(refused.contains("free slot 0"), "{refused}");
        assert_eq!(table.insert(job("c")).expect("room"), 2, "a job is never written over a listed job");
        assert_eq!((table.get("a").map(Job::id), table.get("c").map(Job::id)), (Some("a"), Some("c")));
        let mut twice = JobTable::default();
        twice.insert(job("a")).expect("room");
        twice.slots.push(Some(job("a")));
        assert!(twice.rebuild_index().expect_err("one id in two slots").contains("job a is in slots 0 and 1"));
    }

    #[test]
    fn the_json_form_is_a_map_in_id_order_whatever_the_slots() {
        let mut table = JobTable::default();
        for id in ["b", "c", "a"] {
            table.insert(job(id)).expect("room");
        }
        let json = serde_json::to_value(&table).expect("json");
        assert_eq!(
            json.as_object().map(|map| map.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["a".to_string(), "b".into(), "c".into()])
        );
        let back: JobTable = serde_json::from_value(json).expect("reads back");
        assert!(back == table && back.is_consistent());
        let mut wrong = serde_json::to_value(&table).expect("json");
        wrong["a"] = wrong["b"].clone();
        assert!(serde_json::from_value::<JobTable>(wrong).is_err(), "a job under another id is refused");
    }
}
