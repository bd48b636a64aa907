#!/usr/bin/env python3
"""Sundial's macro benchmark: the references, then every sundial-loadgen scenario against a
1-node cluster and the ingest and fire scenarios against a 3-node cluster on loopback,
written as a dated results directory whose RESULTS.md puts the figures beside their
ratios to references measured in the same run.

    bash bench/run.sh                      # builds release binaries, then runs this
    python3 bench/macro.py --seconds 10 --out bench/results/2026-11-29
    python3 bench/macro.py --summarize bench/results/2026-11-29   # RESULTS.md again from results.json

References (measured first, same machine, same run):
  - disk:     pwrite + fdatasync of 256 B records in a loop, one record per sync and 256
              per sync (the floor under a durable create: every acknowledged create is on
              disk; a node syncs once per group of creates);
  - loopback: HTTP/1.1 POSTs to the load generator's own sink over 127.0.0.1 on 64
              connections (the floor under a webhook delivery and its round trip).
For each scenario the node processes' CPU time (utime + stime from /proc) is recorded, so a
figure can be read as CPU per item. Nothing here is a test: it measures, it never asserts.
"""
import argparse, datetime, json, os, shutil, subprocess, tempfile, time, urllib.request

from failover import free_udp_ports  # bench/failover.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUNDIAL = os.path.join(ROOT, "target", "release", "sundial")
LOADGEN = os.path.join(ROOT, "target", "release", "sundial-loadgen")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICKS


class Cluster:
    """N members on loopback (N = 1: a plain single node, no peers)."""

    def __init__(self, nodes, work):
        self.work = tempfile.mkdtemp(prefix=f"cluster-{nodes}-", dir=work)
        self.children, self.http, self.binary = [], [], []
        peers_args = []
        if nodes > 1:
            certs = os.path.join(self.work, "certs")
            subprocess.run([SUNDIAL, "certs", "init", "--dir", certs] + [f"node-{i}" for i in range(1, nodes + 1)],
                           check=True, capture_output=True)
            ports = free_udp_ports(nodes)
            peers = ",".join(f"{i}@127.0.0.1:{p}" for i, p in zip(range(1, nodes + 1), ports))
        for i in range(1, nodes + 1):
            args = [SUNDIAL, "server", "--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--allow-loopback-targets",
                    "--data", os.path.join(self.work, f"node-{i}"), "--log-level", "warn"]
            if nodes > 1:
                args += ["--node-id", str(i), "--peers", peers, "--certs", certs]
            log = open(os.path.join(self.work, f"node-{i}.log"), "ab")
            child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log)
            banner = child.stdout.readline().decode()
            self.children.append(child)
            self.http.append(banner.split("http://")[1].split()[0])
            self.binary.append(banner.split("sundial://")[1].split()[0])
        if nodes > 1:
            self.wait_for_leaders(nodes)

    def wait_for_leaders(self, nodes):
        deadline = time.time() + 60
        while time.time() < deadline:
            led = {}
            for i, http in enumerate(self.http):
                try:
                    with urllib.request.urlopen(f"http://{http}/debug/cluster", timeout=2) as response:
                        view = json.load(response)
                    led[i] = [p["partition"] for p in view["partitions"] if p["role"] == "leader"]
                except Exception:
                    pass
            partitions = {p for ps in led.values() for p in ps}
            if len(partitions) == 16 and sum(1 for ps in led.values() if ps) == nodes:
                return
            time.sleep(0.2)
        raise SystemExit("the cluster did not elect a leader for every partition within 60 s")

    def pids(self):
        return [c.pid for c in self.children]

    def elections(self):
        """Elections won, summed over the members (sundial_raft_elections_total)."""
        total = 0
        for http in self.http:
            try:
                with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as response:
                    for line in response.read().decode().splitlines():
                        if line.startswith("sundial_raft_elections_total"):
                            total += int(float(line.split()[-1]))
            except Exception:
                pass
        return total

    def stop(self):
        for child in self.children:
            child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def loadgen(out, name, args):
    """Runs one scenario; returns its results JSON with the node CPU it took."""
    json_path = os.path.join(out, f"{name}.json")
    plots = os.path.join(out, "plots", name)
    command = [LOADGEN] + args + ["--json", json_path]
    if args[0] != "reference":
        command += ["--quiet", "--plots", plots]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    run = subprocess.run(command, capture_output=True, text=True)
    with open(os.path.join(out, f"{name}.txt"), "w") as text:
        text.write(run.stdout + run.stderr)
    print(run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr.strip(), flush=True)
    if run.returncode == 2 or not os.path.exists(json_path):
        return {"error": (run.stderr or run.stdout).strip()[-500:], "exit": run.returncode}
    with open(json_path) as f:
        results = json.load(f)
    results["exit"] = run.returncode
    return results


def scenario(out, name, cluster, args):
    before = cpu_seconds(cluster.pids())
    elections_before = cluster.elections()
    started = time.time()
    results = loadgen(out, name, args)
    results["node_cpu_s"] = cpu_seconds(cluster.pids()) - before
    results["wall_s"] = time.time() - started
    if len(cluster.http) > 1:
        # Elections won during the run: leadership changes (none should happen unless a node dies).
        results["elections"] = cluster.elections() - elections_before
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="sending time per scenario (soak: 6x)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", datetime.date.today().isoformat()))
    parser.add_argument("--skip-cluster", action="store_true", help="the 1-node part only")
    parser.add_argument("--summarize", metavar="DIR", help="only write DIR/RESULTS.md again from DIR/results.json")
    options = parser.parse_args()
    if options.summarize:
        with open(os.path.join(options.summarize, "results.json")) as f:
            results = json.load(f)
        with open(os.path.join(options.summarize, "RESULTS.md"), "w") as f:
            f.write(summary(results))
        return
    for binary in (SUNDIAL, LOADGEN):
        if not os.path.exists(binary):
            raise SystemExit(f"{binary} is missing: run bench/run.sh (it builds release binaries first)")
    out = os.path.abspath(options.out)
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="sundial-bench-")
    s = str(options.seconds)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "seconds": options.seconds, "references": {}, "runs": []}
    try:
        refs = results["references"]
        refs["disk_1"] = loadgen(out, "reference-disk-1", ["reference", "disk", "--dir", work, "--record-bytes", "256", "--batch", "1"])
        refs["disk_256"] = loadgen(out, "reference-disk-256", ["reference", "disk", "--dir", work, "--record-bytes", "256", "--batch", "256"])
        refs["loopback"] = loadgen(out, "reference-loopback", ["reference", "loopback", "--connections", "64"])
        ahead = ["--schedule-ahead-ms", "12000", "--window", "16", "--batch", "256", "--connections", "2"]
        plans = [
            ("ingest-binary-max", ["ingest", "--max", "--window", "16", "--batch", "256", "--connections", "2"]),
            ("ingest-http-max", ["ingest", "--protocol", "http", "--max", "--window", "32", "--batch", "100", "--connections", "32"]),
            ("ingest-binary-one-at-a-time", ["ingest", "--max", "--window", "1"]),
            ("fire-1k", ["fire", "--rate", "1000", "--connections", "2"]),
            # BullMQ's shape: creates at 10k/s, each due 1 s later, so fires at 10k/s beside them.
            ("fire-10k-with-creates", ["fire", "--rate", "10000", "--connections", "2"]),
            ("fires-alone-3k", ["fire", "--rate", "3000"] + ahead),
            ("fires-alone-10k", ["fire", "--rate", "10000"] + ahead),
            ("deliveries-backlog", ["fire", "--rate", "20000", "--batch", "100", "--connections", "2", "--due-together", "--due-after-ms", "3000", "--seconds", "5"]),
            ("mixed-2k", ["mixed", "--rate", "2000", "--connections", "2"]),
            # Twice the capacity it measures first (10 s at max, 16 requests in flight); 8
            # connections per member, so the client's own frame window (64 per connection)
            # is not where requests wait.
            ("overload-2x", ["overload", "--factor", "2", "--batch", "100", "--connections", "8", "--minimal-answers"]),
        ]
        cluster_plans = ("ingest-binary-max", "ingest-http-max", "fire-1k", "fires-alone-3k", "deliveries-backlog",
                         "overload-2x")
        plans.append(("soak", ["soak", "--rate", "1000", "--seconds", str(options.seconds * 6)]))
        for nodes in (1, 3):
            if nodes == 3 and options.skip_cluster:
                break
            # A single node at twice its capacity fills its max_jobs within the run (its
            # capacity is ~70k creates/s here): the overload scenario is the cluster's.
            for name, args in [p for p in plans if p[0] != "overload-2x"] if nodes == 1 else [
                p for p in plans if p[0] in cluster_plans
            ]:
                # A fresh node (or cluster) per scenario: one run's jobs do not load the next.
                cluster = Cluster(nodes, work)
                try:
                    time.sleep(1)
                    members = cluster.http if "--protocol" in args else cluster.binary
                    args = args[:1] + ["--node", ",".join(members)] + args[1:]
                    if "--seconds" not in args:
                        args += ["--seconds", s]
                    if args[0] == "soak":
                        args += ["--pid", ",".join(map(str, cluster.pids()))]
                    run = scenario(out, f"{nodes}node-{name}", cluster, args)
                    run.update({"name": name, "nodes": nodes})
                    results["runs"].append(run)
                finally:
                    cluster.stop()
                    logs = os.path.join(out, "logs", f"{nodes}node-{name}")
                    os.makedirs(logs, exist_ok=True)
                    for log in (f for f in os.listdir(cluster.work) if f.endswith(".log")):
                        shutil.copy(os.path.join(cluster.work, log), logs)
                    shutil.rmtree(cluster.work, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(summary(results))
    print(f"results: {out}/RESULTS.md")


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    memory = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(int(memory) / 2**20, 1),
            "kernel": os.uname().release}


def ms(us):
    return f"{us / 1000:.1f}" if isinstance(us, (int, float)) else "–"


def summary(results):
    refs = results["references"]
    disk_1 = refs["disk_1"].get("fdatasyncs_per_s", 0)
    disk_256 = refs["disk_256"].get("records_per_s", 0)
    loop = refs["loopback"]
    loop_rate = loop.get("posts_per_s", 0)
    loop_p99 = loop.get("round_trip_us", {}).get("p99", 0)
    m = results["machine"]
    lines = [
        f"# Sundial macro benchmark, {results['date']}",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}; "
        f"{results['seconds']} s of load per scenario; nodes and load generator share the machine.",
        "",
        "## References (same run)",
        "",
        f"- bare disk, pwrite + fdatasync of one 256 B record: **{disk_1:,.0f} syncs/s**",
        f"- bare disk, 256 records of 256 B per fdatasync: **{disk_256:,.0f} records/s**",
        f"- bare loopback, HTTP/1.1 POSTs on 64 connections: **{loop_rate:,.0f} POSTs/s**, "
        f"round trip p50 {ms(loop.get('round_trip_us', {}).get('p50'))} ms, p99 {ms(loop_p99)} ms",
        "",
        "## Results",
        "",
        "| nodes | scenario | load | ok items/s | request p50 / p99 ms | fire lateness p50 / p99 ms | deliveries/s | ratio to reference | node CPU s per 1k items | verdict |",
        "|---:|---|---|---:|---|---|---:|---|---:|---|",
    ]
    for run in results["runs"]:
        if "error" in run:
            lines.append(f"| {run['nodes']} | {run['name']} | – | – | – | – | – | – | – | could not run: {run['error'][:120]} |")
            continue
        ops = run.get("ops", {})
        create = ops.get("create", {}).get("latency_us", {})
        ok_items = sum(o.get("ok", 0) for o in ops.values())
        load = f"{run['mode'].replace('_', ' ')} {run['rate_per_s'] or ''}{'/s' if run['rate_per_s'] else ''}".strip()
        load += f", batch {run['batch']}, {run['protocol']}"
        if run["mode"] == "max":
            load += f", window {run['window']}"
        if run.get("schedule_ahead_ms"):
            load = f"fires alone, due {run['fires_due_per_s']}/s (all {run.get('acknowledged', 0):,} created first)"
        if run.get("due_together"):
            load = f"{run.get('acknowledged', 0):,} jobs due at one instant"
        if run["scenario"] == "overload":
            load = f"{run['factor']}× the capacity measured ({run['max_per_s']:,.0f}/s), batch {run['batch']}"
        lateness = run.get("fire_lateness_us")
        late = f"{ms(lateness.get('p50'))} / {ms(lateness.get('p99'))}" if lateness else "–"
        deliveries = run.get("deliveries_per_s")
        ratios = []
        if create.get("p50") and disk_1:
            ratios.append(f"request p50 = {create['p50'] / (1e6 / disk_1):.1f} bare fdatasyncs")
        if run["scenario"] in ("ingest", "mixed"):
            ratios.append(f"{run['ok_per_s'] / disk_256:.2f} of disk×256" if disk_256 else "")
            ratios.append(f"{run['ok_per_s'] / disk_1:.1f}× disk syncs" if disk_1 else "")
        if lateness and loop_p99:
            ratios.append(f"lateness p99 = {lateness.get('p99', 0) / loop_p99:.0f}× loopback p99")
        if deliveries and loop_rate:
            ratios.append(f"{deliveries / loop_rate:.2f} of loopback POSTs/s")
        cpu = run.get("node_cpu_s")
        cpu_per_k = f"{cpu * 1000 / ok_items:.2f}" if cpu is not None and ok_items else "–"
        verdict = "pass" if run.get("pass") else "FAIL"
        if run["scenario"] == "overload":
            answer_p99 = ms(run.get("every_answer_us", {}).get("p99"))
            verdict += f"; {run['ratio_to_max']:.2f} of the capacity created; every answer p99 {answer_p99} ms; {run['by_class']}"
            lag_p99 = run.get("client_lag_us", {}).get("p99")
            if lag_p99 is not None:
                verdict += f"; the client's own lag p99 {ms(lag_p99)} ms"
        if "elections" in run:
            verdict += f"; elections {run['elections']}"
        if run["scenario"] == "soak":
            drift = run.get("lateness_p99_drift") or {}
            rss = run.get("memory_samples") or []
            if rss:
                verdict += f"; RSS {rss[0]['rss_kib'] // 1024} → {rss[-1]['rss_kib'] // 1024} MiB"
            if drift:
                verdict += f"; lateness p99 {ms(drift.get('first_p99_us'))} → {ms(drift.get('last_p99_us'))} ms"
        mixed_ops = ""
        if run["scenario"] == "mixed":
            mixed_ops = " (" + ", ".join(f"{k} p99 {ms(v['latency_us'].get('p99'))}" for k, v in ops.items()) + ")"
        lines.append(
            f"| {run['nodes']} | {run['name']} | {load} | {run['ok_per_s']:,.0f} | {ms(create.get('p50'))} / {ms(create.get('p99'))}{mixed_ops} "
            f"| {late} | {f'{deliveries:,.0f}' if deliveries else '–'} | {'; '.join(r for r in ratios if r) or '–'} | {cpu_per_k} | {verdict} |")
    lines += ["", "Plots: `plots/<nodes>node-<scenario>/`; raw figures: `results.json` and one `.json`/`.txt` per scenario.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
