//! Criterion benchmark of the timing wheel against BinaryHeap and BTreeMap baselines: steady
//! state with N timers pending, one operation = insert one timer and advance time by 1 ms
//! (which fires about one). Method and figures: docs/BENCHMARKS.md.
//! Run: `cargo bench -p sundial-engine --bench wheel`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::hint::black_box;
use sundial_engine::wheel::{Expired, TimingWheel};

/// xorshift64: the benchmark's deterministic deadlines.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The structures under test, driven the same way.
trait Timers {
    fn insert(&mut self, deadline_ms: u64, id: u64);
    /// Fires everything due by `now_ms`; returns how many fired.
    fn advance_to(&mut self, now_ms: u64) -> usize;
}

struct Wheel(TimingWheel<u64>, Vec<Expired<u64>>);

impl Timers for Wheel {
    fn insert(&mut self, deadline_ms: u64, id: u64) {
        self.0.insert(deadline_ms, id).expect("capacity is sized for the run");
    }
    fn advance_to(&mut self, now_ms: u64) -> usize {
        self.1.clear();
        self.0.advance_to(now_ms, &mut self.1);
        self.1.len()
    }
}

struct Heap(BinaryHeap<Reverse<(u64, u64)>>);

impl Timers for Heap {
    fn insert(&mut self, deadline_ms: u64, id: u64) {
        self.0.push(Reverse((deadline_ms, id)));
    }
    fn advance_to(&mut self, now_ms: u64) -> usize {
        let mut fired = 0;
        while self.0.peek().is_some_and(|Reverse((deadline, _))| *deadline <= now_ms) {
            black_box(self.0.pop());
            fired += 1;
        }
        fired
    }
}

struct Tree(BTreeMap<(u64, u64), ()>);

impl Timers for Tree {
    fn insert(&mut self, deadline_ms: u64, id: u64) {
        self.0.insert((deadline_ms, id), ());
    }
    fn advance_to(&mut self, now_ms: u64) -> usize {
        let mut fired = 0;
        while self.0.first_key_value().is_some_and(|(&(deadline, _), _)| deadline <= now_ms) {
            black_box(self.0.pop_first());
            fired += 1;
        }
        fired
    }
}

/// Fills `timers` with `pending` deadlines spread uniformly over the next 2·pending ms, so
/// one insert per ms keeps the count steady.
fn fill(timers: &mut impl Timers, pending: u64, rng: &mut Rng) {
    for id in 0..pending {
        timers.insert(1 + rng.next() % (2 * pending), id);
    }
}

fn steady_state(c: &mut Criterion) {
    let sizes: Vec<u64> = match std::env::var("SUNDIAL_WHEEL_SIZES") {
        Ok(list) => list.split(',').filter_map(|s| s.parse().ok()).collect(),
        Err(_) => vec![1_000, 100_000, 1_000_000, 10_000_000],
    };
    for pending in sizes {
        let mut group = c.benchmark_group(format!("timers/{pending}_pending"));
        group.throughput(Throughput::Elements(1));
        group.sample_size(20);
        let capacity = (pending * 3) as usize;
        bench_one(&mut group, "wheel", Wheel(TimingWheel::new(0, capacity), Vec::new()), pending);
        bench_one(&mut group, "binary_heap", Heap(BinaryHeap::new()), pending);
        bench_one(&mut group, "btree_map", Tree(BTreeMap::new()), pending);
        group.finish();
    }
}

fn bench_one<M: criterion::measurement::Measurement>(
    group: &mut criterion::BenchmarkGroup<'_, M>,
    name: &str,
    mut timers: impl Timers,
    pending: u64,
) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    fill(&mut timers, pending, &mut rng);
    let mut now_ms = 0u64;
    let mut id = pending;
    group.bench_function(name, |b| {
        b.iter(|| {
            now_ms += 1;
            id += 1;
            timers.insert(now_ms + 1 + rng.next() % (2 * pending), id);
            black_box(timers.advance_to(now_ms))
        })
    });
}

criterion_group!(benches, steady_state);
criterion_main!(benches);
