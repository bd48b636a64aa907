#!/usr/bin/env python3
"""Failover time of a 3-node Sundial cluster on loopback: kill -9 the node leading the most
partitions while jobs fall due every few milliseconds, and measure how long until fires resume.

    cargo build --release -p sundial-node && python3 bench/failover.py [--rounds 5]

Method: 3 members (16 partitions, replication 3, default Raft timing); jobs due every 5 ms
over 30 s go to a receiver on 127.0.0.1 that records when each arrives. At t = 10 s the node
leading the most partitions is killed with SIGKILL. The jobs of its partitions that fall due
after the kill wait for a new leader; a job's lateness is its arrival minus its due time.
Reported per round:
  - election: kill -> every partition has a leader again (polled on the survivors every 10 ms);
  - resume:   the largest lateness of a job due in the second after the kill (the time fires
              of the killed node's partitions were held up), against the p50 lateness of the
              jobs due before the kill (the steady-state reference of the same run).
Nothing here is a test: it prints figures for docs/BENCHMARKS.md.
"""
import argparse, http.server, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "sundial")


def now_ms():
    return int(time.time() * 1000)


def free_udp_ports(count):
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def call(http, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{http}{path}", data=data, method=method,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


class Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a killed node's connections reset; that is the point of the run

    def __init__(self):
        self.arrivals = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                job = self.headers.get("x-sundial-job-id", "")
                with outer.lock:
                    outer.arrivals.setdefault(job, now_ms())
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def start_member(binary, work, node, peers):
    log = open(os.path.join(work, f"node-{node}.log"), "ab")
    child = subprocess.Popen(
        [binary, "server", "--node-id", str(node), "--peers", peers, "--certs", os.path.join(work, "certs"),
         "--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--allow-loopback-targets",
         "--data", os.path.join(work, f"node-{node}"), "--log-level", "warn"],
        stdout=subprocess.PIPE, stderr=log)
    banner = child.stdout.readline().decode()
    http = banner.split("http://")[1].split()[0]
    threading.Thread(target=lambda: child.stdout.read(), daemon=True).start()
    return child, http


def leaders(https):
    led = {}
    for node, http in https.items():
        try:
            view = call(http, "GET", "/debug/cluster")
        except Exception:
            continue
        led[node] = [p["partition"] for p in view["partitions"] if p["role"] == "leader"]
    return led


def one_round(binary, receiver_addr, receiver):
    work = tempfile.mkdtemp(prefix="sundial-failover-")
    subprocess.run([binary, "certs", "init", "--dir", os.path.join(work, "certs"), "node-1", "node-2", "node-3"],
                   check=True, capture_output=True)
    ports = free_udp_ports(3)
    peers = ",".join(f"{i}@127.0.0.1:{p}" for i, p in zip((1, 2, 3), ports))
    members = {i: start_member(binary, work, i, peers) for i in (1, 2, 3)}
    https = {i: m[1] for i, m in members.items()}
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            led = leaders(https)
            if len({p for ps in led.values() for p in ps}) == 16 and sum(1 for ps in led.values() if ps) == 3:
                break
            time.sleep(0.1)
        start = now_ms() + 3_000
        due = {}
        jobs = []
        for i in range(6_000):
            job_id = f"f-{start}-{i}"
            due[job_id] = start + i * 5
            jobs.append({"id": job_id, "run_at": due[job_id], "url": f"http://{receiver_addr}/hook"})
        for k in range(0, len(jobs), 500):
            call(https[1 + (k // 500) % 3], "POST", "/jobs/batch", {"jobs": jobs[k:k + 500]})
        time.sleep(max(0, (start + 10_000 - now_ms()) / 1000))
        led = leaders(https)
        victim = max(led, key=lambda n: len(led[n]))
        victim_led = len(led[victim])
        killed_ms = now_ms()
        members[victim][0].send_signal(signal.SIGKILL)
        survivors = {n: h for n, h in https.items() if n != victim}
        elected_ms = None
        while now_ms() - killed_ms < 10_000:
            led = leaders(survivors)
            if len({p for ps in led.values() for p in ps}) == 16:
                elected_ms = now_ms()
                break
            time.sleep(0.01)
        # Every job is due by start + 30 s; stragglers get 30 s more before they count as missing.
        time.sleep(max(0, (start + 6_000 * 5 + 1_000 - now_ms()) / 1000))
        deadline = time.time() + 30
        while time.time() < deadline:
            with receiver.lock:
                if all(j in receiver.arrivals for j in due):
                    break
            time.sleep(0.2)
        with receiver.lock:
            arrivals = dict(receiver.arrivals)
        before = sorted(arrivals[j] - d for j, d in due.items() if j in arrivals and d < killed_ms - 1_000)
        after = [arrivals[j] - d for j, d in due.items() if j in arrivals and killed_ms <= d < killed_ms + 1_000]
        missing = sum(1 for j in due if j not in arrivals)
        late = sorted(arrivals[j] - d for j, d in due.items() if j in arrivals)
        return {
            "worst_lateness_ms": late[-1] if late else None,
            "victim": victim,
            "led": victim_led,
            "election_ms": (elected_ms - killed_ms) if elected_ms else None,
            "resume_ms": max(after) if after else None,
            "steady_p50_ms": before[len(before) // 2] if before else None,
            "missing": missing,
        }
    finally:
        for child, _ in members.values():
            child.kill()
            child.wait()
        shutil.rmtree(work, ignore_errors=True)  # three nodes' preallocated logs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--binary", default=BINARY)
    args = parser.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} is missing: cargo build --release -p sundial-node")
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    addr = f"127.0.0.1:{receiver.server_address[1]}"
    results = []
    for round_number in range(args.rounds):
        result = one_round(args.binary, addr, receiver)
        results.append(result)
        print(f"round {round_number + 1}: killed node {result['victim']} (leading {result['led']}); election {result['election_ms']} ms; "
              f"fires resumed within {result['resume_ms']} ms (steady p50 lateness {result['steady_p50_ms']} ms); "
              f"worst lateness of any job {result['worst_lateness_ms']} ms; {result['missing']} jobs missing", flush=True)
    elections = sorted(r["election_ms"] for r in results if r["election_ms"] is not None)
    resumes = sorted(r["resume_ms"] for r in results if r["resume_ms"] is not None)
    if elections and resumes:
        print(f"median election {elections[len(elections) // 2]} ms, median resume {resumes[len(resumes) // 2]} ms, "
              f"worst resume {resumes[-1]} ms over {len(results)} rounds")


if __name__ == "__main__":
    main()
