//! A short `fire` run of the real load generator against a real node on loopback: every
//! acknowledged job is delivered to the sink, none early, none repeated with another key.
//! Performance is not asserted (that is docs/BENCHMARKS.md's job).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The `sundial` binary the workspace's test build made (the node package's tests need it).
fn sundial_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let binary = target.join("debug").join("sundial");
    assert!(binary.exists(), "{} is missing: build it with `cargo build -p sundial-node` first", binary.display());
    binary
}

#[test]
fn a_short_fire_run_delivers_every_acknowledged_job() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut node = Command::new(sundial_binary())
        .args(["--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--allow-loopback-targets", "--data"])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sundial");
    let mut banner = String::new();
    BufReader::new(node.stdout.take().expect("piped")).read_line(&mut banner).expect("banner");
    let binary = banner.split("sundial://").nth(1).and_then(|rest| rest.split_whitespace().next()).expect("address");
    let results = data.path().join("results.json");
    let run = Command::new(env!("CARGO_BIN_EXE_sundial-loadgen"))
        .args(["fire", "--node", binary, "--rate", "40", "--seconds", "3", "--due-after-ms", "1000", "--json"])
        .arg(&results)
        .output()
        .expect("run the load generator");
    let _ = node.kill();
    let _ = node.wait();
    let text = String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{text}");
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(&results).expect("results")).expect("JSON");
    assert_eq!((results["missing"].as_u64(), results["early"].as_u64()), (Some(0), Some(0)), "{results}");
    assert!(results["acknowledged"].as_u64().is_some_and(|n| n >= 100), "most of 120 creates acknowledged: {results}");
    assert_eq!(results["delivered"], results["acknowledged"], "{results}");
    assert_eq!(results["pass"], true);
}
