//! Criterion benchmark of a create's CPU path through the state machine: parsing and
//! validating a job request, the log record (the command as the Raft log stores it, rkyv
//! behind a format byte, encoded and decoded; and as JSON, the format before it), applying
//! a create (then a delete, so the state stays at 100k jobs), and a snapshot of 100k jobs
//! taken and restored (archived, and as JSON, the format before).
//! Figures: docs/BENCHMARKS.md.
//! Run: `cargo bench -p sundial-engine --bench apply`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;
use std::hint::black_box;
use sundial_engine::codec::{decode_command, encode_command};
use sundial_engine::request::parse_job_request;
use sundial_engine::spec::PackedSpec;
use sundial_engine::state::{Command, State};

const NOW_MS: u64 = 1_790_000_000_000;
const JOBS: u64 = 100_000;

fn request(i: u64) -> serde_json::Value {
    json!({
        "id": format!("bench-{i}"), "run_at": NOW_MS + 3_600_000, "url": "http://127.0.0.1:40000/hook",
        "json": {"i": i}, "retry": {"max_attempts": 10, "initial_backoff_ms": 100, "max_backoff_ms": 2000},
    })
}

fn create(i: u64) -> Command {
    let spec = parse_job_request(&request(i).to_string(), NOW_MS, "unused").expect("a valid request");
    Command::Create { spec: PackedSpec::of(&spec), now_ms: NOW_MS, dedup_window_ms: None }
}

fn filled() -> State {
    let mut state = State::new();
    for i in 0..JOBS {
        state.apply(create(i)).expect("created");
    }
    state
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("state");
    group.throughput(Throughput::Elements(1));
    // From the request's JSON text, as a create arrives.
    let text = request(7).to_string();
    group.bench_function("parse_request", |b| b.iter(|| parse_job_request(black_box(&text), NOW_MS, "unused")));
    let command = create(7);
    group.bench_function("log_record_encode_decode", |b| {
        b.iter(|| {
            let bytes = encode_command(black_box(&command));
            decode_command(&bytes).expect("decodes")
        })
    });
    group.bench_function("log_record_encode_decode_json", |b| {
        b.iter(|| {
            let bytes = serde_json::to_vec(black_box(&command)).expect("serializes");
            serde_json::from_slice::<Command>(&bytes).expect("deserializes")
        })
    });
    let mut state = filled();
    let mut next = JOBS;
    group.bench_function("apply_create_then_delete_at_100k_jobs", |b| {
        b.iter_batched(
            || {
                next += 1;
                (create(next), format!("bench-{next}"))
            },
            |(command, id)| {
                state.apply(command).expect("created");
                state.apply(Command::Delete { id, now_ms: 0 }).expect("deleted")
            },
            BatchSize::SmallInput,
        )
    });
    group.throughput(Throughput::Elements(JOBS));
    group.sample_size(10);
    let state = filled();
    let size = state.snapshot().expect("snapshot").len();
    group.bench_function("snapshot_100k_jobs", |b| {
        b.iter(|| state.snapshot_sized(size + size / 8).expect("snapshot").len())
    });
    group.bench_function("snapshot_100k_jobs_json", |b| b.iter(|| serde_json::to_vec(&state).expect("json").len()));
    let bytes = state.snapshot().expect("snapshot");
    group.bench_function("restore_100k_jobs", |b| b.iter(|| State::restore(black_box(&bytes)).expect("restores")));
    let json = serde_json::to_vec(&state).expect("json");
    println!("snapshot of 100k jobs: {} bytes archived, {} bytes JSON", bytes.len(), json.len());
    group.bench_function("restore_100k_jobs_json", |b| b.iter(|| State::restore(black_box(&json)).expect("restores")));
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
