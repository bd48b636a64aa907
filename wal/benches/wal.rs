//! Criterion micro-benchmarks of the log: group commit, in-place reads, and recovery scans.
//! Figures and method: docs/BENCHMARKS.md. Run: `cargo bench -p sundial-wal`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use sundial_wal::{recovery::scan_segment, TypedWal, Wal, WalOptions};

#[derive(rkyv::Archive, rkyv::Serialize)]
struct Job {
    id: u64,
    due_ms: i64,
    url: String,
    payload: Vec<u8>,
}

fn group_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("commit");
    group.sample_size(20);
    for batch in [1usize, 256] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(dir.path(), WalOptions::default()).expect("open");
        let body = vec![0x5au8; 64];
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("64B_x{batch}"), |b| {
            b.iter(|| {
                for _ in 0..batch {
                    wal.append(1, &body).expect("append");
                }
                wal.commit().expect("commit")
            })
        });
    }
    group.finish();
}

fn reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, _) = TypedWal::<Job>::open(dir.path(), WalOptions::default()).expect("open");
    const RECORDS: u64 = 100_000;
    for id in 1..=RECORDS {
        let job = Job { id, due_ms: id as i64, url: format!("http://127.0.0.1:8080/{id}"), payload: vec![1; 200] };
        wal.append(0, &job).expect("append");
    }
    wal.commit().expect("commit");
    let mut group = c.benchmark_group("read");
    let mut i = 0u64;
    group.bench_function("bytes", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            black_box(wal.wal().get(1 + i % RECORDS).map(|e| e.body.len()))
        })
    });
    group.bench_function("archived", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            black_box(wal.get(1 + i % RECORDS).map(|(_, job)| job.due_ms.to_native()))
        })
    });
    group.finish();
}

fn recovery_scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = WalOptions { segment_size_bytes: 16 << 20, ..WalOptions::default() };
    let (mut wal, _) = Wal::open(dir.path(), options).expect("open");
    let body = vec![0x5au8; 256];
    for _ in 0..50_000 {
        wal.append(1, &body).expect("append");
    }
    wal.commit().expect("commit");
    drop(wal);
    let segment = std::fs::read(dir.path().join(format!("{:020}.wal", 1))).expect("segment");
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(segment.len() as u64));
    group.bench_function("scan_16MiB_segment", |b| {
        b.iter_batched(|| (), |()| scan_segment(black_box(&segment)).map(|s| s.offsets.len()), BatchSize::SmallInput)
    });
    group.finish();
}

criterion_group!(benches, group_commit, reads, recovery_scan);
criterion_main!(benches);
