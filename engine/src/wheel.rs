//! A hierarchical timing wheel with 1 ms resolution: O(1) insert, cancel and expiry through
//! handles, an overflow for deadlines past the horizon, and `next_wakeup_ms` so the runtime
//! sleeps until there is work. Pure: time only moves when the caller calls `advance_to`.
//!
//! Layout: `LEVELS` levels of 64 slots; level `l` slot `s` holds timers whose deadline shares
//! every bit above `6·(l+1)` with the wheel's current time and has `s` in bits `6l..6l+6`.
//! Level 0 slots are single milliseconds; a timer in a higher level is moved down (cascaded)
//! when time reaches the start of its slot. A slot is a vector of entries that carry the
//! timer itself (deadline, value, slab index, generation), so cascading and firing read and
//! write contiguous memory; the slab keeps only a 4-byte state word and the deadline per
//! timer. A 64-bit occupancy mask per level finds the next busy slot in O(1). Cancel frees
//! the timer at once and leaves its entry behind as a tombstone that is skipped when its slot
//! comes up; when tombstones outnumber live timers, one sweep drops them all (amortized O(1)).
//! Deadlines more than 2^36 ms (~2.2 years) ahead wait in an ordered overflow and enter the
//! wheel when time gets within the horizon.
//!
//! A keyed wheel (`TimingWheel::keyed`) names timers by the caller's keys instead of
//! handles: a key is the slab index of its one timer (`set` replaces it, `unset` removes
//! it), so the caller keeps no handles; keys should be dense (every key up to the highest
//! costs 16 bytes of slab).

use std::collections::BTreeMap;

const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const LEVELS: usize = 6;
/// Deadlines differing from the current time at or above this bit go to the overflow.
const HORIZON_BITS: u32 = SLOT_BITS * LEVELS as u32;
/// Tombstones are swept once they pass both this and the number of live timers.
const TOMBSTONES_BEFORE_SWEEP_MIN: usize = 1024;

/// A slab state word: the generation in the low 62 bits (it never wraps: a stale tombstone
/// can never look live again), where the timer is in the top two.
const PLACE_SHIFT: u32 = 62;
const GENERATION_MASK: u64 = (1 << PLACE_SHIFT) - 1;
const PLACE_FREE: u64 = 0;
const PLACE_WHEEL: u64 = 1;
const PLACE_OVERFLOW: u64 = 2;

/// Names one inserted timer; stale once it fired or was cancelled (generation check).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerHandle {
    index: u32,
    generation: u64,
}

/// The wheel holds its maximum number of timers; nothing was inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the timing wheel is full ({capacity} timers)")]
pub struct WheelFull {
    pub capacity: usize,
}

/// A slot's entry: the timer, or a tombstone once the slab's generation moved on.
#[derive(Debug)]
struct SlotEntry<T> {
    deadline_ms: u64,
    generation: u64,
    index: u32,
    value: T,
}

/// A fired timer: its handle, its deadline and the value given at insert.
#[derive(Debug, PartialEq, Eq)]
pub struct Expired<T> {
    pub handle: TimerHandle,
    pub deadline_ms: u64,
    pub value: T,
}

pub struct TimingWheel<T> {
    /// Every timer with a deadline at or before this has fired.
    now_ms: u64,
    /// Per slab index: place and generation (see PLACE_SHIFT), and the deadline.
    states: Vec<u64>,
    deadlines: Vec<u64>,
    /// Free slab indexes, reused before the slab grows.
    free: Vec<u32>,
    slots: Vec<Vec<SlotEntry<T>>>,
    occupied: [u64; LEVELS],
    overflow: BTreeMap<(u64, u32), T>,
    len: usize,
    tombstones: usize,
    tombstones_before_sweep_min: usize,
    capacity: usize,
    /// Timers are named by the caller's keys (`set`, `unset`): a key is the slab index of its
    /// one timer, and freed indexes are not listed (they are the caller's to reuse).
    keyed: bool,
    /// How many keys the slab is expected to reach (`expect_keys`; 0: not said).
    expected_keys: usize,
}

fn state_word(place: u64, generation: u64) -> u64 {
    place << PLACE_SHIFT | (generation & GENERATION_MASK)
}

impl<T> TimingWheel<T> {
    /// An empty wheel at time `now_ms` that holds at most `capacity` timers.
    pub fn new(now_ms: u64, capacity: usize) -> TimingWheel<T> {
        assert!(capacity > 0 && capacity < u32::MAX as usize, "capacity must be within 1..2^32-1");
        TimingWheel {
            now_ms,
            states: Vec::new(),
            deadlines: Vec::new(),
            free: Vec::new(),
            slots: (0..LEVELS * SLOTS).map(|_| Vec::new()).collect(),
            occupied: [0; LEVELS],
            overflow: BTreeMap::new(),
            len: 0,
            tombstones: 0,
            tombstones_before_sweep_min: TOMBSTONES_BEFORE_SWEEP_MIN,
            capacity,
            keyed: false,
            expected_keys: 0,
        }
    }

    /// An empty wheel whose timers are named by the caller's keys (`set`, `unset`): at most
    /// one timer per key, and no handle to keep (a key costs the wheel 16 bytes of slab
    /// whether or not it has a timer, so keys should be dense: slots of a table, say).
    /// `insert` and `cancel` are not for a keyed wheel.
    pub fn keyed(now_ms: u64, capacity: usize) -> TimingWheel<T> {
        TimingWheel { keyed: true, ..TimingWheel::new(now_ms, capacity) }
    }

    /// Room for keys below `keys` without growing the slab as they are set (a take-over
    /// that sets a timer for each slot of a table: one allocation instead of doublings).
    pub fn reserve_keys(&mut self, keys: usize) {
        // Room that cannot be had is not an error: the slab then grows as keys are set.
        let more = keys.saturating_sub(self.states.len());
        let _ = self.states.try_reserve_exact(more);
        let _ = self.deadlines.try_reserve_exact(more);
    }

    /// Keys are expected to reach `keys`: once the slab is large (`room::EXPECTED_ROOM_FROM`),
    /// it grows once to that many instead of doubling.
    pub fn expect_keys(&mut self, keys: usize) {
        self.expected_keys = keys;
    }

    /// Sets the timer of `key` to `deadline_ms` (replacing the one it had). Refused when the
    /// wheel is full and `key` had no timer.
    pub fn set(&mut self, key: u32, deadline_ms: u64, value: T) -> Result<(), WheelFull> {
        debug_assert!(self.keyed, "set is for keyed wheels");
        self.unset(key);
        if self.len == self.capacity {
            return Err(WheelFull { capacity: self.capacity });
        }
        let index = key as usize;
        if self.states.len() <= index {
            crate::room::grow_toward_expected(&mut self.states, index + 1, self.expected_keys);
            crate::room::grow_toward_expected(&mut self.deadlines, index + 1, self.expected_keys);
            self.states.resize(index + 1, state_word(PLACE_FREE, 0));
            self.deadlines.resize(index + 1, 0);
        }
        let generation = self.states[index] & GENERATION_MASK;
        self.deadlines[index] = deadline_ms;
        self.place(SlotEntry { deadline_ms, index: key, generation, value });
        self.len += 1;
        Ok(())
    }

    /// Removes the timer of `key`; false if it had none.
    pub fn unset(&mut self, key: u32) -> bool {
        debug_assert!(self.keyed, "unset is for keyed wheels");
        let Some(&word) = self.states.get(key as usize) else { return false };
        self.cancel(TimerHandle { index: key, generation: word & GENERATION_MASK })
    }

    /// The deadline of the timer of `key`, if it has one.
    pub fn deadline_of(&self, key: u32) -> Option<u64> {
        let &word = self.states.get(key as usize)?;
        self.deadline_ms(TimerHandle { index: key, generation: word & GENERATION_MASK })
    }

    /// Sweeps tombstones sooner (tests use it to exercise the sweep with few timers).
    #[doc(hidden)]
    pub fn set_tombstones_before_sweep_min(&mut self, count: usize) {
        self.tombstones_before_sweep_min = count;
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a timer. A deadline already past fires at the next `advance_to`.
    pub fn insert(&mut self, deadline_ms: u64, value: T) -> Result<TimerHandle, WheelFull> {
        debug_assert!(!self.keyed, "a keyed wheel's timers are set by key");
        if self.len == self.capacity {
            return Err(WheelFull { capacity: self.capacity });
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.states.push(state_word(PLACE_FREE, 0));
                self.deadlines.push(0);
                (self.states.len() - 1) as u32
            }
        };
        let generation = self.states[index as usize] & GENERATION_MASK;
        debug_assert_eq!(self.states[index as usize] >> PLACE_SHIFT, PLACE_FREE, "a free slab entry");
        self.deadlines[index as usize] = deadline_ms;
        self.place(SlotEntry { deadline_ms, index, generation, value });
        self.len += 1;
        Ok(TimerHandle { index, generation })
    }

    /// Removes a pending timer; false if it fired or was cancelled already.
    pub fn cancel(&mut self, handle: TimerHandle) -> bool {
        let Some(&word) = self.states.get(handle.index as usize) else { return false };
        if word & GENERATION_MASK != handle.generation {
            return false;
        }
        match word >> PLACE_SHIFT {
            PLACE_WHEEL => self.tombstones += 1,
            PLACE_OVERFLOW => {
                self.overflow.remove(&(self.deadlines[handle.index as usize], handle.index));
            }
            _ => return false,
        }
        self.release(handle.index);
        if self.tombstones > self.tombstones_before_sweep_min.max(self.len) {
            self.sweep_tombstones();
        }
        true
    }

    /// The deadline of a pending timer.
    pub fn deadline_ms(&self, handle: TimerHandle) -> Option<u64> {
        let word = *self.states.get(handle.index as usize)?;
        let pending = word >> PLACE_SHIFT != PLACE_FREE && word & GENERATION_MASK == handle.generation;
        pending.then(|| self.deadlines[handle.index as usize])
    }

    /// When the runtime should next call `advance_to`: never after the next timer's deadline;
    /// exactly it when that timer is due within 64 ms and no cancelled timer's entry sits
    /// earlier; otherwise an earlier cascade point. `None` when no timer is pending. A runtime
    /// sleeps until this, advances, and asks again.
    pub fn next_wakeup_ms(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        if let Some((_, _, start_ms)) = self.next_slot() {
            return Some(start_ms.max(self.now_ms));
        }
        self.overflow.keys().next().map(|&(deadline_ms, _)| block_start(deadline_ms).max(self.now_ms))
    }

    /// Moves time to `now_ms` (never backwards) and appends every timer due by then to
    /// `expired`, in deadline order. Work is proportional to the timers that fire or cascade,
    /// not to the milliseconds passed.
    pub fn advance_to(&mut self, now_ms: u64, expired: &mut Vec<Expired<T>>) {
        if now_ms < self.now_ms {
            return;
        }
        // Bounded: each pass fires or moves down the entries of one slot, or jumps to the
        // overflow's next block; entries only move down, so passes ≤ entries × LEVELS + blocks.
        loop {
            self.refill_from_overflow();
            if let Some((level, slot, start_ms)) = self.next_slot() {
                if start_ms > now_ms {
                    break;
                }
                self.now_ms = self.now_ms.max(start_ms);
                self.process_slot(level, slot, expired);
                continue;
            }
            match self.overflow.keys().next() {
                Some(&(deadline_ms, _)) if block_start(deadline_ms) <= now_ms => {
                    self.now_ms = block_start(deadline_ms);
                }
                _ => break,
            }
        }
        self.now_ms = now_ms;
        self.refill_from_overflow();
    }

    /// The busy slot that comes first: the lowest busy level holds the earliest timers.
    fn next_slot(&self) -> Option<(usize, usize, u64)> {
        for level in 0..LEVELS {
            let shift = SLOT_BITS * level as u32;
            let current = ((self.now_ms >> shift) as usize) & (SLOTS - 1);
            debug_assert_eq!(self.occupied[level] & !(u64::MAX << current), 0, "no timer sits behind the current slot");
            let busy = self.occupied[level] & (u64::MAX << current);
            if busy != 0 {
                let slot = busy.trailing_zeros() as usize;
                let level_span = 1u64 << (shift + SLOT_BITS);
                let start_ms = (self.now_ms & !(level_span - 1)) + ((slot as u64) << shift);
                return Some((level, slot, start_ms));
            }
        }
        None
    }

    fn is_live(&self, entry: &SlotEntry<T>) -> bool {
        self.states[entry.index as usize] == state_word(PLACE_WHEEL, entry.generation)
    }

    fn process_slot(&mut self, level: usize, slot: usize, expired: &mut Vec<Expired<T>>) {
        let mut entries = std::mem::take(&mut self.slots[level * SLOTS + slot]);
        self.occupied[level] &= !(1u64 << slot);
        for entry in entries.drain(..) {
            if !self.is_live(&entry) {
                self.tombstones -= 1;
                continue;
            }
            if entry.deadline_ms <= self.now_ms {
                let handle = TimerHandle { index: entry.index, generation: entry.generation };
                self.release(entry.index);
                expired.push(Expired { handle, deadline_ms: entry.deadline_ms, value: entry.value });
            } else {
                debug_assert!(level > 0, "level 0 slots are single milliseconds");
                self.place(entry);
            }
        }
        // Entries only move to lower levels, so this slot is still empty: keep its buffer.
        debug_assert!(self.slots[level * SLOTS + slot].is_empty());
        self.slots[level * SLOTS + slot] = entries;
    }

    /// Where a timer due at `deadline_ms` goes now: (level, slot), or `None` for the overflow.
    fn slot_for(&self, deadline_ms: u64) -> Option<(usize, usize)> {
        let deadline_ms = deadline_ms.max(self.now_ms);
        let differing = (deadline_ms ^ self.now_ms) | (SLOTS as u64 - 1);
        let highest_bit = 63 - differing.leading_zeros();
        if highest_bit >= HORIZON_BITS {
            return None;
        }
        let level = (highest_bit / SLOT_BITS) as usize;
        Some((level, ((deadline_ms >> (SLOT_BITS * level as u32)) as usize) & (SLOTS - 1)))
    }

    /// Room for timers due at `deadlines_ms`, about to be set: each slot's buffer grows once
    /// to what it will hold instead of doubling as it fills (a take-over that sets a timer
    /// per job puts most of a large table's into a few far slots).
    pub fn reserve_deadlines(&mut self, deadlines_ms: impl Iterator<Item = u64>) {
        let mut counts = vec![0usize; LEVELS * SLOTS];
        for deadline_ms in deadlines_ms {
            if let Some((level, slot)) = self.slot_for(deadline_ms) {
                counts[level * SLOTS + slot] += 1;
            }
        }
        for (slot, count) in self.slots.iter_mut().zip(counts) {
            slot.reserve_exact(count);
        }
    }

    /// Puts an entry where its deadline belongs relative to `now_ms`.
    fn place(&mut self, entry: SlotEntry<T>) {
        let Some((level, slot)) = self.slot_for(entry.deadline_ms) else {
            self.states[entry.index as usize] = state_word(PLACE_OVERFLOW, entry.generation);
            self.overflow.insert((entry.deadline_ms, entry.index), entry.value);
            return;
        };
        self.states[entry.index as usize] = state_word(PLACE_WHEEL, entry.generation);
        self.slots[level * SLOTS + slot].push(entry);
        self.occupied[level] |= 1u64 << slot;
    }

    /// Frees a slab index; its handle and any slot entry become stale.
    fn release(&mut self, index: u32) {
        let generation = (self.states[index as usize] & GENERATION_MASK).wrapping_add(1);
        self.states[index as usize] = state_word(PLACE_FREE, generation);
        if !self.keyed {
            self.free.push(index);
        }
        self.len -= 1;
    }

    /// Drops every tombstone at once (when they outnumber live timers: amortized O(1)).
    fn sweep_tombstones(&mut self) {
        let states = &self.states;
        for (position, entries) in self.slots.iter_mut().enumerate() {
            entries.retain(|e| states[e.index as usize] == state_word(PLACE_WHEEL, e.generation));
            if entries.is_empty() {
                self.occupied[position / SLOTS] &= !(1u64 << (position % SLOTS));
            }
        }
        self.tombstones = 0;
    }

    /// Moves overflow timers that are now within the horizon into the wheel.
    fn refill_from_overflow(&mut self) {
        // Bounded by the overflow's size.
        while let Some((&(deadline_ms, index), _)) = self.overflow.first_key_value() {
            if (deadline_ms.max(self.now_ms) ^ self.now_ms) >> HORIZON_BITS != 0 {
                break;
            }
            let ((_, _), value) = self.overflow.pop_first().expect("looked at");
            let generation = self.states[index as usize] & GENERATION_MASK;
            self.place(SlotEntry { deadline_ms, index, generation, value });
        }
    }
}

/// The first millisecond of the horizon-sized block holding `deadline_ms`.
fn block_start(deadline_ms: u64) -> u64 {
    deadline_ms & !((1u64 << HORIZON_BITS) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fire(wheel: &mut TimingWheel<u32>, now_ms: u64) -> Vec<(u64, u32)> {
        let mut expired = Vec::new();
        wheel.advance_to(now_ms, &mut expired);
        expired.into_iter().map(|e| (e.deadline_ms, e.value)).collect()
    }

    #[test]
    fn a_full_keyed_wheel_refuses_a_new_key_but_moves_a_key_it_holds() {
        let mut wheel = TimingWheel::keyed(0, 2);
        wheel.set(0, 10, 0).expect("room");
        wheel.set(5, 20, 5).expect("room");
        assert_eq!(wheel.set(3, 30, 3), Err(WheelFull { capacity: 2 }));
        wheel.set(5, 40, 5).expect("moved, not added");
        assert_eq!((wheel.len(), wheel.deadline_of(5), wheel.deadline_of(3)), (2, Some(40), None));
        assert_eq!(fire(&mut wheel, 39), vec![(10, 0)]);
        assert_eq!(fire(&mut wheel, 40), vec![(40, 5)]);
        assert!(wheel.is_empty() && wheel.free.is_empty(), "keys are the caller's: none listed as free");
    }

    #[test]
    fn timers_fire_at_their_millisecond_not_before() {
        let mut wheel = TimingWheel::new(1_000, 100);
        for (value, deadline) in [(1, 1_001), (2, 1_063), (3, 1_064), (4, 5_000), (5, 1_000 + 70_000)] {
            wheel.insert(deadline, value).expect("room");
        }
        assert_eq!(fire(&mut wheel, 1_000), vec![]);
        assert_eq!(fire(&mut wheel, 1_062), vec![(1_001, 1)]);
        assert_eq!(fire(&mut wheel, 1_063), vec![(1_063, 2)]);
        assert_eq!(fire(&mut wheel, 4_999), vec![(1_064, 3)]);
        assert_eq!(fire(&mut wheel, 5_000), vec![(5_000, 4)]);
        assert_eq!(wheel.next_wakeup_ms().map(|at| at <= 71_000), Some(true));
        assert_eq!(fire(&mut wheel, 71_000), vec![(71_000, 5)]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_past_deadline_fires_at_the_next_advance() {
        let mut wheel = TimingWheel::new(10_000, 10);
        wheel.insert(5, 1).expect("room");
        assert_eq!(wheel.next_wakeup_ms(), Some(10_000));
        assert_eq!(fire(&mut wheel, 10_000), vec![(5, 1)]);
    }

    #[test]
    fn cancel_removes_and_stale_handles_do_nothing() {
        let mut wheel = TimingWheel::new(0, 10);
        let a = wheel.insert(100, 1).expect("room");
        let b = wheel.insert(100, 2).expect("room");
        assert!(wheel.cancel(a));
        assert!(!wheel.cancel(a), "already cancelled");
        assert_eq!(fire(&mut wheel, 100), vec![(100, 2)]);
        assert!(!wheel.cancel(b), "already fired");
        let c = wheel.insert(200, 3).expect("room");
        assert_eq!(c.index, b.index, "the slab entry is reused");
        assert!(!wheel.cancel(b), "a stale handle does not cancel the new timer");
        assert_eq!(wheel.deadline_ms(c), Some(200));
    }

    #[test]
    fn a_full_wheel_refuses_and_accepts_again_once_a_timer_fires() {
        let mut wheel = TimingWheel::new(0, 2);
        wheel.insert(1, 1).expect("room");
        wheel.insert(2, 2).expect("room");
        assert_eq!(wheel.insert(3, 3), Err(WheelFull { capacity: 2 }));
        fire(&mut wheel, 1);
        wheel.insert(3, 3).expect("room again");
    }

    #[test]
    fn many_cancels_are_swept_and_the_rest_still_fire() {
        let mut wheel = TimingWheel::new(0, 10_000);
        let handles: Vec<TimerHandle> =
            (0..5_000).map(|i| wheel.insert(100_000 + i, i as u32).expect("room")).collect();
        for handle in &handles[..4_990] {
            assert!(wheel.cancel(*handle), "pending");
        }
        assert!(wheel.tombstones <= TOMBSTONES_BEFORE_SWEEP_MIN, "swept: {} tombstones", wheel.tombstones);
        let fired = fire(&mut wheel, 200_000);
        assert_eq!(fired.iter().map(|f| f.1).collect::<Vec<_>>(), (4_990..5_000).collect::<Vec<u32>>());
        assert_eq!(wheel.tombstones, 0);
    }

    #[test]
    fn deadlines_past_the_horizon_wait_in_the_overflow() {
        let mut wheel = TimingWheel::new(0, 10);
        let far = 3u64 << HORIZON_BITS;
        let handle = wheel.insert(far + 5, 1).expect("room");
        wheel.insert(far + 5 + (1 << HORIZON_BITS), 2).expect("room");
        assert_eq!(wheel.next_wakeup_ms(), Some(far));
        assert_eq!(fire(&mut wheel, far + 4), vec![]);
        assert_eq!(wheel.deadline_ms(handle), Some(far + 5));
        assert_eq!(fire(&mut wheel, u64::MAX), vec![(far + 5, 1), (far + 5 + (1 << HORIZON_BITS), 2)]);
    }
}
