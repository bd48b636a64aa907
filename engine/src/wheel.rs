//! A hierarchical timing wheel with 1 ms resolution: O(1) insert, cancel and expiry through
//! handles, an overflow for deadlines past the horizon, and `next_wakeup_ms` so the runtime
//! sleeps until there is work. Pure: time only moves when the caller calls `advance_to`.
//!
//! Layout: `LEVELS` levels of 64 slots; level `l` slot `s` holds timers whose deadline shares
//! every bit above `6·(l+1)` with the wheel's current time and has `s` in bits `6l..6l+6`.
//! Level 0 slots are single milliseconds; a timer in a higher level is moved down (cascaded)
//! when time reaches the start of its slot. Each slot is an intrusive doubly-linked list
//! through a slab, so cancel unlinks in O(1); a 64-bit occupancy mask per level finds the
//! next busy slot in O(1). Deadlines more than 2^36 ms (~2.2 years) ahead wait in an ordered
//! overflow and enter the wheel when time gets within the horizon.

use std::collections::BTreeSet;

const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const LEVELS: usize = 6;
/// Deadlines differing from the current time at or above this bit go to the overflow.
const HORIZON_BITS: u32 = SLOT_BITS * LEVELS as u32;
const NIL: u32 = u32::MAX;

/// Names one inserted timer; stale once it fired or was cancelled (generation check).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerHandle {
    index: u32,
    generation: u32,
}

/// The wheel holds its maximum number of timers; nothing was inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the timing wheel is full ({capacity} timers)")]
pub struct WheelFull {
    pub capacity: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Free,
    Slot { level: u8, slot: u8 },
    Overflow,
}

#[derive(Debug)]
struct Node<T> {
    deadline_ms: u64,
    generation: u32,
    place: Place,
    prev: u32,
    next: u32,
    value: Option<T>,
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
    nodes: Vec<Node<T>>,
    /// Free slab entries, reused before the slab grows.
    free: Vec<u32>,
    heads: [[u32; SLOTS]; LEVELS],
    occupied: [u64; LEVELS],
    overflow: BTreeSet<(u64, u32)>,
    len: usize,
    capacity: usize,
}

impl<T> TimingWheel<T> {
    /// An empty wheel at time `now_ms` that holds at most `capacity` timers.
    pub fn new(now_ms: u64, capacity: usize) -> TimingWheel<T> {
        assert!(capacity > 0 && capacity < NIL as usize, "capacity must be within 1..2^32-1");
        TimingWheel {
            now_ms,
            nodes: Vec::new(),
            free: Vec::new(),
            heads: [[NIL; SLOTS]; LEVELS],
            occupied: [0; LEVELS],
            overflow: BTreeSet::new(),
            len: 0,
            capacity,
        }
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
        if self.len == self.capacity {
            return Err(WheelFull { capacity: self.capacity });
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.nodes.push(Node {
                    deadline_ms: 0,
                    generation: 0,
                    place: Place::Free,
                    prev: NIL,
                    next: NIL,
                    value: None,
                });
                (self.nodes.len() - 1) as u32
            }
        };
        let node = &mut self.nodes[index as usize];
        debug_assert_eq!(node.place, Place::Free, "a free slab entry");
        node.deadline_ms = deadline_ms;
        node.value = Some(value);
        let handle = TimerHandle { index, generation: node.generation };
        self.place(index);
        self.len += 1;
        Ok(handle)
    }

    /// Removes a pending timer and returns its value; `None` if it fired or was cancelled.
    pub fn cancel(&mut self, handle: TimerHandle) -> Option<T> {
        let node = self.nodes.get(handle.index as usize)?;
        if node.generation != handle.generation || node.place == Place::Free {
            return None;
        }
        self.unplace(handle.index);
        Some(self.release(handle.index))
    }

    /// The deadline of a pending timer.
    pub fn deadline_ms(&self, handle: TimerHandle) -> Option<u64> {
        let node = self.nodes.get(handle.index as usize)?;
        (node.generation == handle.generation && node.place != Place::Free).then_some(node.deadline_ms)
    }

    /// The earliest time at which `advance_to` has work: exact when the next timer is due
    /// within 64 ms, otherwise the start of the slot that holds it (a cascade point, never
    /// after the true deadline). `None` when empty. A runtime sleeps until this, advances,
    /// and asks again.
    pub fn next_wakeup_ms(&self) -> Option<u64> {
        if let Some((_, _, start_ms)) = self.next_slot() {
            return Some(start_ms.max(self.now_ms));
        }
        self.overflow.first().map(|&(deadline_ms, _)| block_start(deadline_ms).max(self.now_ms))
    }

    /// Moves time to `now_ms` (never backwards) and appends every timer due by then to
    /// `expired`, in deadline order. Work is proportional to the timers that fire or cascade,
    /// not to the milliseconds passed.
    pub fn advance_to(&mut self, now_ms: u64, expired: &mut Vec<Expired<T>>) {
        if now_ms < self.now_ms {
            return;
        }
        // Bounded: each pass fires or moves down the timers of one slot, or jumps to the
        // overflow's next block; levels only go down, so passes ≤ timers × LEVELS + blocks.
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
            match self.overflow.first() {
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
            let busy = self.occupied[level] & (u64::MAX << current);
            debug_assert_eq!(self.occupied[level] & !(u64::MAX << current), 0, "no timer sits behind the current slot");
            if busy != 0 {
                let slot = busy.trailing_zeros() as usize;
                let level_span = 1u64 << (shift + SLOT_BITS);
                let start_ms = (self.now_ms & !(level_span - 1)) + ((slot as u64) << shift);
                return Some((level, slot, start_ms));
            }
        }
        None
    }

    fn process_slot(&mut self, level: usize, slot: usize, expired: &mut Vec<Expired<T>>) {
        let mut index = self.heads[level][slot];
        self.heads[level][slot] = NIL;
        self.occupied[level] &= !(1u64 << slot);
        // Bounded by the slot's list, which this pass empties.
        while index != NIL {
            let next = self.nodes[index as usize].next;
            let node = &mut self.nodes[index as usize];
            node.place = Place::Overflow; // detached; `place` or `release` sets it again
            node.prev = NIL;
            node.next = NIL;
            if node.deadline_ms <= self.now_ms {
                let deadline_ms = node.deadline_ms;
                let handle = TimerHandle { index, generation: node.generation };
                let value = self.release(index);
                expired.push(Expired { handle, deadline_ms, value });
            } else {
                debug_assert!(level > 0, "level 0 slots are single milliseconds");
                self.place(index);
            }
            index = next;
        }
    }

    /// Puts a detached node where its deadline belongs relative to `now_ms`.
    fn place(&mut self, index: u32) {
        let deadline_ms = self.nodes[index as usize].deadline_ms.max(self.now_ms);
        let differing = (deadline_ms ^ self.now_ms) | (SLOTS as u64 - 1);
        let highest_bit = 63 - differing.leading_zeros();
        if highest_bit >= HORIZON_BITS {
            self.nodes[index as usize].place = Place::Overflow;
            self.overflow.insert((self.nodes[index as usize].deadline_ms, index));
            return;
        }
        let level = (highest_bit / SLOT_BITS) as usize;
        let slot = ((deadline_ms >> (SLOT_BITS * level as u32)) as usize) & (SLOTS - 1);
        let head = self.heads[level][slot];
        if head != NIL {
            self.nodes[head as usize].prev = index;
        }
        let node = &mut self.nodes[index as usize];
        node.place = Place::Slot { level: level as u8, slot: slot as u8 };
        node.prev = NIL;
        node.next = head;
        self.heads[level][slot] = index;
        self.occupied[level] |= 1u64 << slot;
    }

    /// Takes a node out of its slot list or the overflow.
    fn unplace(&mut self, index: u32) {
        let (place, prev, next, deadline_ms) = {
            let node = &self.nodes[index as usize];
            (node.place, node.prev, node.next, node.deadline_ms)
        };
        match place {
            Place::Free => unreachable!("checked by the caller"),
            Place::Overflow => {
                self.overflow.remove(&(deadline_ms, index));
            }
            Place::Slot { level, slot } => {
                let (level, slot) = (level as usize, slot as usize);
                if prev == NIL {
                    self.heads[level][slot] = next;
                    if next == NIL {
                        self.occupied[level] &= !(1u64 << slot);
                    }
                } else {
                    self.nodes[prev as usize].next = next;
                }
                if next != NIL {
                    self.nodes[next as usize].prev = prev;
                }
            }
        }
    }

    /// Frees a detached node and returns its value; its handle becomes stale.
    fn release(&mut self, index: u32) -> T {
        let node = &mut self.nodes[index as usize];
        node.place = Place::Free;
        node.generation = node.generation.wrapping_add(1);
        node.prev = NIL;
        node.next = NIL;
        self.free.push(index);
        self.len -= 1;
        node.value.take().expect("a placed node holds its value")
    }

    /// Moves overflow timers that are now within the horizon into the wheel.
    fn refill_from_overflow(&mut self) {
        // Bounded by the overflow's size.
        while let Some(&(deadline_ms, index)) = self.overflow.first() {
            if (deadline_ms.max(self.now_ms) ^ self.now_ms) >> HORIZON_BITS != 0 {
                break;
            }
            self.overflow.pop_first();
            self.place(index);
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
        assert_eq!(wheel.cancel(a), Some(1));
        assert_eq!(wheel.cancel(a), None, "already cancelled");
        assert_eq!(fire(&mut wheel, 100), vec![(100, 2)]);
        assert_eq!(wheel.cancel(b), None, "already fired");
        let c = wheel.insert(200, 3).expect("room");
        assert_eq!(c.index, b.index, "the slab entry is reused");
        assert_eq!(wheel.cancel(b), None, "a stale handle does not cancel the new timer");
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
