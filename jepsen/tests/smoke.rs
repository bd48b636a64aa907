//! The CI smoke: a real 40 s run of `sundial-jepsen` — three real nodes on 127.0.0.11–13,
//! kill -9 and nftables partitions, the workload and its receiver — must end with a valid
//! verdict and a complete run directory. Then the stored run, broken on purpose (an owed
//! delivery removed, a delivery moved before its time, a read made stale), must be judged
//! invalid by `sundial-jepsen check`: the checker is shown catching what it exists to catch.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `sundial` binary the workspace's test build made (the node package's tests need it).
fn sundial_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let binary = target.join("debug").join("sundial");
    assert!(binary.exists(), "{} is missing: build it with `cargo build -p sundial-node` first", binary.display());
    binary
}

fn jepsen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sundial-jepsen"))
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn write_lines(path: &Path, values: &[Value]) {
    let text: String = values.iter().map(|v| format!("{v}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// Runs `check` on `dir`; its exit code and output.
fn check(dir: &Path) -> (Option<i32>, String) {
    let output = jepsen().arg("check").arg(dir).output().unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

fn copy_run(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["history.jsonl", "deliveries.jsonl", "results.json"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

#[test]
fn a_short_run_with_kills_and_partitions_is_valid_and_a_broken_copy_is_not() {
    let out = tempfile::tempdir().unwrap();
    let output = jepsen()
        .args(["run", "--nodes", "3", "--time", "40s", "--nemesis", "kill,partition", "--rate", "40", "--seed", "1"])
        .args(["--recovery-bound", "10s"])
        .arg("--binary")
        .arg(sundial_binary())
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let runs: Vec<PathBuf> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(runs.len(), 1, "one run directory\n{stdout}\n{stderr}");
    let run = &runs[0];
    let report = std::fs::read_to_string(run.join("report.md")).unwrap_or_default();
    assert_eq!(output.status.code(), Some(0), "the run must pass\n{stdout}\n{stderr}\n{report}");

    // A valid verdict, every property checked and held, both kinds of fault injected.
    let results: Value = serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["valid"], true);
    let properties = results["properties"].as_array().unwrap();
    let names: Vec<&str> = properties.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["lost", "early", "cancel", "keys", "caught-up", "fencing", "linearizable", "progress", "no-crashes"]
    );
    assert!(properties.iter().all(|p| p["valid"] == true), "{properties:?}");
    let faults: Vec<&str> =
        results["faults"].as_array().unwrap().iter().map(|f| f["detail"]["fault"].as_str().unwrap()).collect();
    assert!(faults.contains(&"partition") && faults.iter().any(|f| f.starts_with("kill")), "{faults:?}");
    assert!(results["faults"].as_array().unwrap().iter().all(|f| f["error"].is_null()), "every fault was injected");
    let lost = &properties[0];
    assert!(lost["counts"]["required_fires"].as_u64().unwrap() > 100, "the run owed fires: {lost}");
    assert!(results["operations"]["read"]["ok"].as_u64().unwrap() > 50, "reads were checked");
    for file in ["history.jsonl", "deliveries.jsonl", "timeline.svg", "node-1.log", "node-2.log", "node-3.log"] {
        assert!(run.join(file).metadata().map(|m| m.len() > 0).unwrap_or(false), "{file} was written");
    }
    assert!(!run.join("data").exists(), "a passing run's data directories are removed");
    // The rules are gone: no table of this harness is left.
    let tables = Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("sundial_jepsen_"), "partition rules removed");

    // The stored run checks the same.
    assert_eq!(check(run).0, Some(0));

    // Broken copies: an owed delivery removed is lost; a delivery moved 1 s early is early.
    let history = lines(&run.join("history.jsonl"));
    let deliveries = lines(&run.join("deliveries.jsonl"));
    let cancelled: Vec<&str> =
        history.iter().filter(|e| e["f"] == "cancel").map(|e| e["job"].as_str().unwrap()).collect();
    let owed = history
        .iter()
        .find(|e| e["f"] == "create" && e["type"] == "ok" && !cancelled.contains(&e["job"].as_str().unwrap()))
        .map(|e| e["job"].as_str().unwrap().to_string())
        .expect("an acknowledged, never-cancelled one-time job");
    let lost_copy = out.path().join("broken-lost");
    copy_run(run, &lost_copy);
    let without: Vec<Value> = deliveries.iter().filter(|d| d["job"] != owed.as_str()).cloned().collect();
    assert!(without.len() < deliveries.len());
    write_lines(&lost_copy.join("deliveries.jsonl"), &without);
    let (code, text) = check(&lost_copy);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAILED lost") && text.contains(&owed), "{text}");

    let early_copy = out.path().join("broken-early");
    copy_run(run, &early_copy);
    let mut moved = deliveries.clone();
    let first = moved[0]["received_us"].as_u64().unwrap();
    moved[0]["received_us"] = Value::from(first - 1_500_000);
    write_lines(&early_copy.join("deliveries.jsonl"), &moved);
    let (code, text) = check(&early_copy);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAILED early"), "{text}");

    // A deposed leader's delivery accepted: a delivery of a newer term is recorded just
    // before an accepted one, which then carries an older term than one accepted before it.
    let at = deliveries
        .iter()
        .position(|d| d["status"] == 200 && d["fencing_token"].is_u64())
        .expect("an accepted delivery with a token");
    let mut newer = deliveries[at].clone();
    let term = deliveries[at]["fencing_token"].as_u64().unwrap() >> 40;
    newer["fencing_token"] = Value::from((term + 1) << 40);
    let mut fenced = deliveries.clone();
    fenced.insert(at, newer);
    let fencing_copy = out.path().join("broken-fencing");
    copy_run(run, &fencing_copy);
    write_lines(&fencing_copy.join("deliveries.jsonl"), &fenced);
    let (code, text) = check(&fencing_copy);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAILED fencing"), "{text}");

    // A stale read: a read that began after the job's create was acknowledged now says the
    // job does not exist — no linearization has it.
    let acked: std::collections::HashMap<&str, u64> = history
        .iter()
        .filter(|e| e["f"] == "create" && e["type"] == "ok")
        .map(|e| (e["job"].as_str().unwrap(), e["time_us"].as_u64().unwrap()))
        .collect();
    let stale_at = history
        .iter()
        .position(|e| {
            e["f"] == "read"
                && e["type"] == "invoke"
                && acked.get(e["job"].as_str().unwrap()).is_some_and(|&t| t < e["time_us"].as_u64().unwrap())
        })
        .expect("a read invoked after its job's create was acknowledged");
    let process = history[stale_at]["process"].clone();
    let answer =
        stale_at + history[stale_at..].iter().position(|e| e["process"] == process && e["type"] != "invoke").unwrap();
    let mut stale = history.clone();
    if stale[answer]["type"] != "ok" {
        stale[answer]["type"] = Value::from("ok");
    }
    stale[answer]["value"] = Value::from("absent");
    let stale_copy = out.path().join("broken-stale-read");
    copy_run(run, &stale_copy);
    write_lines(&stale_copy.join("history.jsonl"), &stale);
    let (code, text) = check(&stale_copy);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("FAILED linearizable") && text.contains(history[stale_at]["job"].as_str().unwrap()),
        "{text}"
    );
}
