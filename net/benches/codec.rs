//! Criterion benchmark of the binary protocol's codec: a Create frame of 256 job requests
//! (~250 B each, as `sundial-loadgen fire` sends them) and the Results frame answering it,
//! each encoded into a reused buffer and decoded back. Figures: docs/BENCHMARKS.md.
//! Run: `cargo bench -p sundial-net --bench codec`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use sundial_net::codec::{decode, encode, Frame, Item, Message};

const ITEMS: usize = 256;
const FRAME_MAX_BYTES: u32 = 16 << 20;

fn create_frame() -> Frame {
    let jobs = (0..ITEMS)
        .map(|i| {
            format!(
                r#"{{"id":"lg19a2b3c4d5e-{i}-0","run_at":1796000000000,"url":"http://127.0.0.1:40000/hook","json":{{"i":{i},"j":0}},"retry":{{"max_attempts":10,"initial_backoff_ms":100,"max_backoff_ms":2000}}}}"#
            )
            .into_bytes()
        })
        .collect();
    Frame::new(7, Message::Create { jobs })
}

fn results_frame() -> Frame {
    let items = (0..ITEMS)
        .map(|i| Item {
            status: 201,
            retry_after_s: 0,
            body: format!(r#"{{"id":"lg19a2b3c4d5e-{i}-0","status":"pending","next_run_at":1796000000000}}"#)
                .into_bytes(),
        })
        .collect();
    Frame::new(7, Message::Results { items })
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(ITEMS as u64));
    for (name, frame) in [("create_256", create_frame()), ("results_256", results_frame())] {
        let mut buffer = Vec::with_capacity(1 << 20);
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                buffer.clear();
                encode(black_box(&frame), FRAME_MAX_BYTES, &mut buffer).expect("fits");
                buffer.len()
            })
        });
        buffer.clear();
        encode(&frame, FRAME_MAX_BYTES, &mut buffer).expect("fits");
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| decode(black_box(&buffer), FRAME_MAX_BYTES).expect("valid").expect("whole").1)
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
