//! Room for a vector that will grow large: past a threshold it jumps once to the size it is
//! expected to reach, instead of doubling there (each doubling copies it into a new
//! allocation and leaves the old one to the allocator, which keeps much of it).

/// Below this many elements a vector grows as usual: small tables (most nodes) reserve
/// nothing ahead, so a node's memory at start does not depend on its `max_jobs`.
pub const EXPECTED_ROOM_FROM: usize = 1 << 16;

/// Before `items` grows to hold `needed` elements: if it is past the threshold and expected
/// to hold more, room for `expected` in all (address space until used). Room that cannot be
/// had is not an error: the vector then grows as usual.
pub fn grow_toward_expected<T>(items: &mut Vec<T>, needed: usize, expected: usize) {
    if needed > items.capacity() && items.capacity() >= EXPECTED_ROOM_FROM && expected > needed {
        let _ = items.try_reserve_exact(expected - items.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_vector_jumps_to_its_expected_size_once_and_a_small_one_grows_as_usual() {
        let mut small: Vec<u8> = Vec::with_capacity(16);
        grow_toward_expected(&mut small, 17, 1 << 20);
        assert!(small.capacity() < 1 << 20, "under the threshold nothing is reserved");
        let mut large: Vec<u8> = vec![0; EXPECTED_ROOM_FROM];
        grow_toward_expected(&mut large, EXPECTED_ROOM_FROM + 1, 1 << 20);
        assert_eq!(large.capacity(), 1 << 20);
        let mut beyond: Vec<u8> = vec![0; EXPECTED_ROOM_FROM];
        grow_toward_expected(&mut beyond, EXPECTED_ROOM_FROM + 1, EXPECTED_ROOM_FROM);
        assert!(beyond.capacity() < 1 << 20, "past its expected size a vector grows as usual");
    }
}
