#!/usr/bin/env python3
"""How one node holds many pending jobs: fills a fresh node to each asked count of pending
one-time jobs (due far ahead, so nothing fires), then reports anonymous resident memory
(RssAnon, not page cache) per pending job, data-directory bytes per job, and after kill -9
and a start on the same data: seconds until /health answers, until a list read is served,
and how late a job due 3 s after the kill fired. Measures, never asserts.

    cargo build --release -p sundial-node -p sundial-loadgen
    python3 bench/scale.py --jobs 1000000,3000000 [--sundial target/release/sundial] [--minimal-answers]
"""

import argparse, http.server, json, os, shutil, signal, subprocess, tempfile, threading, time, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "..", "target", "release")


def get(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def rss_anon_bytes(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return None


def disk_bytes(path):
    """Bytes the files take on disk (allocated blocks: preallocated log segments count)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class Receiver:
    """A webhook receiver on 127.0.0.1 that notes when each job id arrived."""

    def __init__(self):
        arrivals = self.arrivals = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                arrivals.setdefault(self.headers.get("x-sundial-job-id"), time.time())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Node:
    def __init__(self, sundial, data, log):
        self.child = subprocess.Popen(
            [sundial, "server", "--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--allow-loopback-targets",
             "--data", data, "--log-level", "warn", "--max-jobs", "100000000"], stdout=subprocess.PIPE, stderr=log)
        banner = self.child.stdout.readline().decode()
        self.http = banner.split("http://")[1].split()[0]
        self.binary = banner.split("sundial://")[1].split()[0]
        self.pid = self.child.pid

    def pending(self):
        _, body = get(f"http://{self.http}/health", timeout=30)
        return json.loads(body)["jobs"]["pending"]


def wait_until(probe, limit_s):
    """Seconds until probe() is true (polled every 10 ms), or None."""
    start = time.time()
    while time.time() - start < limit_s:
        try:
            if probe():
                return time.time() - start
        except Exception:
            pass
        time.sleep(0.01)
    return None


def fill(args, node, jobs, work):
    """Ingests at max until the node holds `jobs` pending jobs; returns the creates/s seen."""
    rates = []
    while True:
        missing = jobs - node.pending()
        if missing <= 0:
            return rates
        seconds = max(2, min(30, int(missing / (rates[-1] if rates else 40000)) + 1))
        out = os.path.join(work, "ingest.json")
        subprocess.run([args.loadgen, "ingest", "--node", node.binary, "--max", "--window", "16", "--batch", "256",
                        "--connections", "2", "--seconds", str(seconds), "--due-in-s", "360000", "--quiet",
                        "--json", out] + (["--minimal-answers"] if args.minimal_answers else []),
                       check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            rates.append(json.load(f)["ok_per_s"])


def measure(args, jobs, receiver):
    work = tempfile.mkdtemp(prefix="scale-", dir=args.work)
    data = os.path.join(work, "data")
    log = open(os.path.join(work, "node.log"), "ab")
    node = Node(args.sundial, data, log)
    try:
        rates = fill(args, node, jobs, work)
        time.sleep(2)  # let the last compactions end
        pending = node.pending()
        rss = rss_anon_bytes(node.pid)
        disk = disk_bytes(data)
        # One job due 3 s after the kill: how late it fires after the restart.
        due_s = time.time() + 3
        created = post(f"http://{node.http}/jobs", {"url": receiver.url, "delay": "3s"})
        node.child.send_signal(signal.SIGKILL)
        node.child.wait()
        start = time.time()
        node = Node(args.sundial, data, log)
        waited = lambda probe: (None if wait_until(probe, 300) is None else time.time() - start)
        health_s = waited(lambda: get(f"http://{node.http}/health")[0] == 200)
        read_s = waited(lambda: get(f"http://{node.http}/jobs?status=pending&limit=1")[0] == 200)
        arrived = wait_until(lambda: created["id"] in receiver.arrivals, 300)
        late_ms = (receiver.arrivals[created["id"]] - due_s) * 1000 if arrived is not None else None
        return {"jobs": pending, "creates_per_s": round(sum(rates) / len(rates)) if rates else None,
                "rss_anon_per_job_b": round(rss / pending), "rss_anon_mib": round(rss / 2**20),
                "disk_per_job_b": round(disk / pending), "restart_to_health_s": round(health_s, 2),
                "restart_to_read_s": round(read_s, 2), "fire_late_after_restart_ms": late_ms,
                "rss_anon_after_restart_per_job_b": round(rss_anon_bytes(node.pid) / pending)}
    finally:
        node.child.kill()
        node.child.wait()
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1000000", help="pending-job counts, comma-separated")
    parser.add_argument("--sundial", default=os.path.join(TARGET, "sundial"))
    parser.add_argument("--loadgen", default=os.path.join(TARGET, "sundial-loadgen"))
    parser.add_argument("--work", default=tempfile.gettempdir(), help="where the data directories go")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--minimal-answers", action="store_true",
                        help="fill as a bulk loader would: creates answered with ids only")
    args = parser.parse_args()
    receiver = Receiver()
    results = []
    for jobs in (int(n) for n in args.jobs.split(",")):
        result = measure(args, jobs, receiver)
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
