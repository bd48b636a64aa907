//! A small seeded generator (SplitMix64): every random choice of a run — schedule, targets,
//! workload — comes from the run's seed, so a seed names what was tried.

#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// An independent stream for one purpose (the workload's client `k`, the nemesis), so
    /// adding draws to one does not shift the others.
    pub fn fork(&self, stream: u64) -> Rng {
        let mut forked = Rng::new(self.state ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        forked.next_u64();
        forked
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high` (`low` when the range is empty).
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low + 1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// A uniformly chosen element (`None` when empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        items.get((self.next_u64() % items.len() as u64) as usize)
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_and_streams_differ() {
        let draws = |seed| (0..8).map(|_| Rng::new(seed).fork(1).next_u64()).collect::<Vec<_>>();
        assert_eq!(draws(7), draws(7));
        let mut a = Rng::new(7).fork(1);
        let mut b = Rng::new(7).fork(2);
        assert_ne!(a.next_u64(), b.next_u64());
        let mut rng = Rng::new(3);
        for _ in 0..1_000 {
            let v = rng.between(5, 9);
            assert!((5..=9).contains(&v));
        }
        assert_eq!(rng.between(4, 4), 4);
        let mut items = [1, 2, 3, 4, 5];
        rng.shuffle(&mut items);
        items.sort();
        assert_eq!(items, [1, 2, 3, 4, 5]);
    }
}
