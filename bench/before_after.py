#!/usr/bin/env python3
"""Two builds of `sundial` measured back to back in one sitting: the same 1-node scenarios
of bench/macro.py (same load generator, same references), alternating BEFORE and AFTER for
several rounds so that drift of the machine falls on both alike. Prints a markdown table of
each figure's median (and range) per build and the AFTER/BEFORE ratio. Measures, never asserts.

    # the old commit in a worktree beside this one, built in release
    git worktree add ../before <commit> && (cd ../before && cargo build --release -p sundial-node)
    cargo build --release -p sundial-node -p sundial-loadgen
    python3 bench/before_after.py --before ../before/target/release/sundial --rounds 3
"""

import argparse, os, shutil, statistics, tempfile, time

import macro  # bench/macro.py, beside this script

SCENARIOS = {
    "ingest-binary-max": ["ingest", "--max", "--window", "16", "--batch", "256", "--connections", "2"],
    "ingest-binary-one-at-a-time": ["ingest", "--max", "--window", "1"],
    "fire-1k": ["fire", "--rate", "1000", "--connections", "2"],
    "fires-alone-10k": ["fire", "--rate", "10000", "--schedule-ahead-ms", "12000", "--window", "16", "--batch", "256",
                        "--connections", "2"],
}


def figures(run):
    """The figures compared: throughput, latency, lateness, deliveries, CPU per item."""
    if "error" in run:
        return {}
    ops = run.get("ops", {})
    ok_items = sum(o.get("ok", 0) for o in ops.values())
    create = ops.get("create", {}).get("latency_us", {})
    lateness = run.get("fire_lateness_us") or {}
    out = {"ok items/s": run.get("ok_per_s"), "create p50 ms": (create.get("p50") or 0) / 1000 or None,
           "create p99 ms": (create.get("p99") or 0) / 1000 or None,
           "lateness p50 ms": (lateness.get("p50") or 0) / 1000 or None,
           "lateness p99 ms": (lateness.get("p99") or 0) / 1000 or None,
           "deliveries/s": run.get("deliveries_per_s")}
    if run.get("node_cpu_s") is not None and ok_items:
        out["node CPU µs per item"] = run["node_cpu_s"] * 1e6 / ok_items
    return {k: v for k, v in out.items() if v}


def run_once(binary, name, args, seconds, out, work):
    macro.SUNDIAL = binary
    cluster = macro.Cluster(1, work)
    try:
        time.sleep(1)
        full = args[:1] + ["--node", cluster.binary[0]] + args[1:] + ["--seconds", str(seconds)]
        return macro.scenario(out, name, cluster, full)
    finally:
        cluster.stop()
        shutil.rmtree(cluster.work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the sundial binary of the old commit")
    parser.add_argument("--after", default=macro.SUNDIAL, help="the sundial binary of this commit (default: target/release)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    options = parser.parse_args()
    out = tempfile.mkdtemp(prefix="sundial-before-after-")
    work = tempfile.mkdtemp(prefix="sundial-before-after-work-")
    names = options.only.split(",")
    measured = {(name, build): [] for name in names for build in ("before", "after")}
    try:
        for round_index in range(options.rounds):
            for name in names:
                # Alternate which build goes first, so neither always follows the other.
                order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
                for build in order:
                    binary = options.before if build == "before" else options.after
                    run = run_once(os.path.abspath(binary), f"{name}-{build}-{round_index}", SCENARIOS[name],
                                   options.seconds, out, work)
                    measured[(name, build)].append(figures(run))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{options.rounds} rounds of {options.seconds} s per scenario and build, alternating; median (min–max)\n")
    print("| scenario | figure | before | after | after / before |")
    print("|---|---|---:|---:|---:|")
    for name in names:
        keys = sorted({k for runs in (measured[(name, "before")] + measured[(name, "after")]) for k in runs})
        for key in keys:
            cells = []
            medians = []
            for build in ("before", "after"):
                values = [r[key] for r in measured[(name, build)] if key in r]
                if not values:
                    cells.append("–")
                    medians.append(None)
                    continue
                median = statistics.median(values)
                medians.append(median)
                cells.append(f"{median:,.1f} ({min(values):,.1f}–{max(values):,.1f})")
            ratio = f"{medians[1] / medians[0]:.2f}" if all(medians) else "–"
            print(f"| {name} | {key} | {cells[0]} | {cells[1]} | {ratio} |")
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
