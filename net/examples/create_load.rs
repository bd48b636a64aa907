//! A quick closed-loop create load over the binary protocol (the load generator of issue 7
//! will do this properly): `cargo run --release -p sundial-net --example create_load --
//! 127.0.0.1:7070 20000 64` creates 20,000 jobs due in an hour with up to 64 calls in
//! flight on one connection (batched by the client) and prints creates per second.

use std::time::Instant;
use sundial_net::{Client, ClientOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let address = args.first().map_or("127.0.0.1:7070", String::as_str).parse().expect("ADDRESS: host:port");
    let total: usize = args.get(1).map_or(Ok(20_000), |n| n.parse()).expect("COUNT: a whole number");
    let window: usize = args.get(2).map_or(Ok(64), |n| n.parse()).expect("WINDOW: a whole number");
    let client = std::sync::Arc::new(Client::connect(address, ClientOptions::default()).await.expect("connect"));
    let run = std::process::id();
    let started = Instant::now();
    let mut created = 0usize;
    let mut sent = 0usize;
    let mut in_flight = tokio::task::JoinSet::new();
    // Bounded by `total`: each pass starts calls up to the window, then waits for one.
    while created < total {
        while sent < total && in_flight.len() < window {
            let client = client.clone();
            let request =
                serde_json::json!({"id": format!("load-{run}-{sent}"), "delay": "1h", "url": "http://127.0.0.1:9/"});
            in_flight.spawn(async move { client.create(&request).await });
            sent += 1;
        }
        match in_flight.join_next().await {
            Some(Ok(Ok(item))) if item.status == 201 => created += 1,
            Some(Ok(Ok(item))) => panic!("create refused: {} {}", item.status, item.json()),
            Some(Ok(Err(e))) => panic!("create failed: {e}"),
            Some(Err(e)) => panic!("task failed: {e}"),
            None => break,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("{created} creates in {seconds:.2} s: {:.0} creates/s (window {window})", created as f64 / seconds);
}
