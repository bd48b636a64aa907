//! Short runs of the real load generator against a real node on loopback: a `fire` run whose
//! sink fails some attempts and checks signatures still gets every acknowledged job
//! delivered (none early, none repeated with another key), and a `mixed` run over HTTP
//! loses no acknowledged job. Performance is not asserted (that is docs/BENCHMARKS.md's job).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The `sundial` binary the workspace's test build made (the node package's tests need it).
fn sundial_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let binary = target.join("debug").join("sundial");
    assert!(binary.exists(), "{} is missing: build it with `cargo build -p sundial-node` first", binary.display());
    binary
}

/// A node on ephemeral ports; its HTTP and binary addresses from the banner.
struct Node {
    process: Child,
    http: String,
    binary: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn start_node(data: &std::path::Path) -> Node {
    let mut process = Command::new(sundial_binary())
        .args(["--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--allow-loopback-targets", "--data"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sundial");
    let mut banner = String::new();
    BufReader::new(process.stdout.take().expect("piped")).read_line(&mut banner).expect("banner");
    let after = |scheme: &str| {
        banner.split(scheme).nth(1).and_then(|rest| rest.split(['/', ' ']).next()).expect("address").to_string()
    };
    let (http, binary) = (after("http://"), after("sundial://"));
    Node { process, http, binary }
}

fn run_loadgen(args: &[&str]) -> String {
    let run = Command::new(env!("CARGO_BIN_EXE_sundial-loadgen")).args(args).output().expect("run the load generator");
    let text = String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{args:?}: {text}");
    text
}

fn results(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("results")).expect("JSON")
}

#[test]
fn a_fire_run_through_a_failing_signed_sink_delivers_every_acknowledged_job() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = start_node(&data.path().join("node"));
    let json = data.path().join("fire.json");
    let plots = data.path().join("plots");
    let (json_arg, plots_arg) = (json.to_string_lossy().to_string(), plots.to_string_lossy().to_string());
    run_loadgen(&[
        "fire",
        "--node",
        &node.binary,
        "--rate",
        "40",
        "--seconds",
        "3",
        "--due-after-ms",
        "1000",
        "--secret",
        "smoke-secret",
        "--sink-fail-rate",
        "0.2",
        "--sink-429-rate",
        "0.05",
        "--json",
        &json_arg,
        "--plots",
        &plots_arg,
    ]);
    let results = results(&json);
    assert_eq!((results["missing"].as_u64(), results["early"].as_u64()), (Some(0), Some(0)), "{results}");
    assert!(results["acknowledged"].as_u64().is_some_and(|n| n >= 100), "most of 120 creates acknowledged: {results}");
    assert_eq!(results["delivered"], results["acknowledged"], "{results}");
    assert_eq!((results["bad_signatures"].as_u64(), results["pass"].as_bool()), (Some(0), Some(true)), "{results}");
    assert!(results["refused_by_sink"].as_u64().is_some_and(|n| n > 0), "the sink failed some attempts: {results}");
    for plot in ["fire-request-latency.svg", "fire-percentiles.svg", "fire-throughput.svg", "fire-lateness.svg"] {
        assert!(std::fs::read_to_string(plots.join(plot)).expect(plot).starts_with("<svg"), "{plot}");
    }
}

#[test]
fn a_mixed_run_over_http_loses_no_acknowledged_job() {
    let data = tempfile::tempdir().expect("tempdir");
    let node = start_node(&data.path().join("node"));
    let json = data.path().join("mixed.json");
    let json_arg = json.to_string_lossy().to_string();
    run_loadgen(&[
        "mixed",
        "--protocol",
        "http",
        "--node",
        &node.http,
        "--rate",
        "60",
        "--seconds",
        "2",
        "--connections",
        "4",
        "--json",
        &json_arg,
    ]);
    let results = results(&json);
    assert_eq!((results["lost"].as_u64(), results["pass"].as_bool()), (Some(0), Some(true)), "{results}");
    for op in ["create", "get", "cancel"] {
        assert!(results["ops"][op]["ok"].as_u64().is_some_and(|n| n > 0), "some {op}s succeeded: {results}");
    }
}
