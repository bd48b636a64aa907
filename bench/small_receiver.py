#!/usr/bin/env python3
"""The small-receiver probe: a node fires at a Python ThreadingHTTPServer with its default
accept queue (5), the shape of a small team's webhook endpoint. 1,000 one-time jobs are due
on whole seconds, 120 per second; the probe reports lateness (arrival - due), deliveries
repeated, and the receiver's own capacity, measured after the run with 64 keep-alive
clients, so lateness can be set beside what the receiver could do: a burst of 120 needs at
least 120 / capacity seconds to be served.

Usage: python3 bench/small_receiver.py --node 127.0.0.1:8080 [--jobs 1000] [--per-second 120]
(the node must allow loopback targets: --allow-loopback-targets)."""

import argparse
import http.client
import http.server
import json
import threading
import time


class Log:
    def __init__(self):
        self.lock = threading.Lock()
        self.hits = []  # (arrival ms, idempotency key, fire ms)


def serve(log):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            self.rfile.read(length)
            key = self.headers.get("idempotency-key", "")
            fire_ms = int(self.headers.get("x-sundial-fire-time", "0") or 0)
            with log.lock:
                log.hits.append((time.time() * 1000, key, fire_ms))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # request_queue_size = 5
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def post(node, path, body):
    host, port = node.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"null")


def capacity(port, seconds=3.0, clients=64):
    """Requests per second the receiver serves to `clients` keep-alive connections."""
    done = [0] * clients
    stop = time.time() + seconds

    def client(i):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.time() < stop:
            try:
                connection.request("POST", "/capacity", b"{}", {"content-type": "application/json"})
                connection.getresponse().read()
                done[i] += 1
            except OSError:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.time() - started)


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", default="127.0.0.1:8080", help="the node's HTTP address")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--per-second", type=int, default=120)
    parser.add_argument("--wait-s", type=float, default=180.0, help="give up waiting after this long")
    options = parser.parse_args()
    log = Log()
    server = serve(log)
    port = server.server_address[1]
    first_ms = (int(time.time()) + 4) * 1000
    jobs = [{"id": f"probe-{i}", "run_at": first_ms + (i // options.per_second) * 1000,
             "url": f"http://127.0.0.1:{port}/hook"} for i in range(options.jobs)]
    for start in range(0, len(jobs), 500):
        status, answer = post(options.node, "/jobs/batch", {"jobs": jobs[start:start + 500]})
        if status != 200:
            raise SystemExit(f"batch refused: {status} {answer}")
    deadline = time.time() + options.wait_s
    while time.time() < deadline:
        with log.lock:
            keys = {key for _, key, _ in log.hits}
        if len(keys) >= options.jobs:
            break
        time.sleep(0.2)
    time.sleep(1.0)
    with log.lock:
        hits = list(log.hits)
    first = {}
    for arrival_ms, key, fire_ms in hits:
        if key not in first or arrival_ms < first[key][0]:
            first[key] = (arrival_ms, fire_ms)
    lateness = [arrival - fire for arrival, fire in first.values()]
    rate = capacity(port)
    result = {
        "jobs": options.jobs,
        "delivered": len(first),
        "deliveries": len(hits),
        "repeated": len(hits) - len(first),
        "early": sum(1 for late in lateness if late < 0),
        "lateness_ms": {"p50": percentile(lateness, 0.5), "p99": percentile(lateness, 0.99),
                        "max": max(lateness) if lateness else float("nan")},
        "receiver_capacity_per_s": rate,
        "burst_service_ms": options.per_second / rate * 1000 if rate else float("nan"),
    }
    print(json.dumps(result, indent=1))
    server.shutdown()


if __name__ == "__main__":
    main()
