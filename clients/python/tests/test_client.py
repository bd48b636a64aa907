"""The Python client against a real node (the `sundial` binary on free loopback ports) and a
real webhook receiver; and against the node's own /openapi.json, so they cannot drift."""

import asyncio
import atexit
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import fields

import pytest

from sundial_client import (
    AsyncClient,
    Client,
    Job,
    SundialError,
    fencing_term,
    fencing_token,
    verify_signature,
    verify_signature_v2,
)
from sundial_client.client import ROUTES

ROOT = pathlib.Path(__file__).resolve().parents[3]
BINARY = os.environ.get("SUNDIAL_BIN", str(ROOT / "target" / "debug" / "sundial"))


def start_node(*flags):
    data = tempfile.mkdtemp(prefix="sundial-py-")
    # Each node preallocates its logs (hundreds of MiB): removed when the tests end.
    atexit.register(shutil.rmtree, data, True)
    process = subprocess.Popen(
        [BINARY, "--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--allow-loopback-targets", "--data", data, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    banner = process.stdout.readline()
    address = banner.split("http://")[1].split()[0]
    # Keep draining stdout so the node never blocks on it.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, f"http://{address}"


@pytest.fixture
def node():
    process, url = start_node()
    yield url
    process.kill()
    process.wait()


class Receiver:
    """A webhook receiver on 127.0.0.1: records every request; paths under /fail get 400."""

    def __init__(self):
        self.hits = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                hits.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status = 400 if self.path.startswith("/fail") else 200
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


def wait_for(done, limit_s=20.0):
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if done():
            return True
        time.sleep(0.05)
    return done()


def test_create_get_list_cancel_in_both_formats(node):
    client = Client(node)
    job = client.create("http://127.0.0.1:9/x", delay="1h", id="py-1", json={"a": 1})
    assert isinstance(job, Job) and job.id == "py-1" and job.status == "pending" and job.type == "unico"
    assert client.get("py-1") == job
    assert client.status("py-1") == "pending"
    legacy = client.create_request(
        {"type": "recurrente", "cron_expression": "*/5 * * * *", "webhook_url": "http://127.0.0.1:9/cron"}
    )
    assert legacy.type == "recurrente" and legacy.schedule["cron_expression"] == "*/5 * * * *"
    assert {j.id for j in client.list()} == {"py-1", legacy.id}
    assert client.cancel("py-1").status == "cancelled"
    assert [j.id for j in client.list(status="cancelled")] == ["py-1"]
    assert client.health()["jobs"]["pending"] == 1


def test_refusals_raise_with_the_api_code_and_field(node):
    client = Client(node)
    with pytest.raises(SundialError) as refused:
        client.create("not a url", delay="1h")
    assert (refused.value.status, refused.value.code, refused.value.field) == (400, "invalid", "url")
    with pytest.raises(SundialError) as missing:
        client.get("nope")
    assert missing.value.status == 404
    assert client.list() == []


def test_a_fire_is_recorded_and_a_failing_one_dead_lettered_then_redriven(node, receiver):
    client = Client(node)
    client.create(receiver.url + "/ok", delay="500ms", id="fires")
    client.create(receiver.url + "/fail", delay="500ms", id="fails", retry={"max_attempts": 1})
    assert wait_for(lambda: client.status("fires") == "completed")
    executions = client.executions("fires")
    assert [e.status_code for e in executions] == [200]
    assert wait_for(lambda: len(client.dead_letters()) == 1)
    letter = client.dead_letters()[0]
    assert letter.id == "fails" and letter.attempts == 1
    client.redrive("fails", letter.fire_ms)
    assert wait_for(lambda: len([h for h in receiver.hits if h["path"] == "/fail"]) == 2), "redriven: fired again"
    assert wait_for(lambda: len(client.dead_letters()) == 1), "and dead-lettered again"
    client.purge("fails")
    assert client.dead_letters() == []


def test_429_is_retried_after_its_retry_after():
    process, url = start_node("--token", "t0k-0123456789abcdef", "--rate-per-token", "2")
    try:
        client = Client(url, token="t0k-0123456789abcdef", retries=5)
        started = time.time()
        for _ in range(5):
            client.health()
            client.list()
        assert time.time() - started >= 1.0, "some calls waited for the bucket to refill"
        with pytest.raises(SundialError) as refused:
            Client(url, token="wrong").list()
        assert refused.value.status == 401
        with pytest.raises(SundialError) as limited:
            impatient = Client(url, token="t0k-0123456789abcdef", retries=0)
            for _ in range(10):
                impatient.list()
        assert limited.value.status == 429
    finally:
        process.kill()
        process.wait()


def test_the_async_client_does_the_same(node):
    async def scenario():
        client = AsyncClient(node)
        job = await client.create("http://127.0.0.1:9/a", delay="1h", id="async-1")
        assert job.status == "pending"
        assert (await client.get("async-1")).id == "async-1"
        assert [j.id for j in await client.list()] == ["async-1"]
        assert (await client.cancel("async-1")).status == "cancelled"
        with pytest.raises(SundialError) as missing:
            await client.get("nope")
        assert missing.value.status == 404
        assert (await client.health())["status"] == "ok"

    asyncio.run(scenario())


def test_signatures_from_a_real_node_verify_and_tampering_does_not(receiver):
    process, url = start_node("--secret", "s3cret")
    try:
        Client(url).create(receiver.url + "/signed", delay="200ms", json={"signed": True})
        assert wait_for(lambda: len(receiver.hits) == 1)
        hit = receiver.hits[0]
        header = {k.lower(): v for k, v in hit["headers"].items()}["x-sundial-signature"]
        assert verify_signature(b"s3cret", header, hit["body"])
        assert not verify_signature(b"s3cret", header, hit["body"] + b" ")
        assert not verify_signature(b"other", header, hit["body"])
        assert not verify_signature(b"s3cret", header, hit["body"], now_ms=int(time.time() * 1000) + 3_600_000)
        assert not verify_signature(b"s3cret", "garbage", hit["body"])
        headers = {k.lower(): v for k, v in hit["headers"].items()}
        key, sent_to = headers["idempotency-key"], receiver.url + "/signed"
        assert verify_signature_v2(b"s3cret", header, hit["body"], "POST", sent_to, key)
        # Bound to where it was sent: the same signature does not verify for another URL or fire.
        assert not verify_signature_v2(b"s3cret", header, hit["body"], "POST", "https://pay.example/hook", key)
        assert not verify_signature_v2(b"s3cret", header, hit["body"], "POST", sent_to, key + "0")
        assert not verify_signature_v2(b"s3cret", header, hit["body"], "PUT", sent_to, key)
        # The fencing token: a leadership term above, a log position below.
        token = fencing_token(hit["headers"])
        assert token is not None and fencing_term(token) >= 1, hit["headers"]
        assert token & ((1 << 40) - 1) >= 1, "a log position"
        assert fencing_token({"X-Sundial-Fencing-Token": "12"}) == 12
        assert fencing_token({"x-sundial-fencing-token": "-1"}) is None
        assert fencing_token({}) is None
    finally:
        process.kill()
        process.wait()


def test_during_a_key_rotation_either_secret_verifies_and_a_retired_one_does_not(receiver):
    process, url = start_node("--secret", "current", "--secret-next", "next")
    try:
        Client(url).create(receiver.url + "/rotating", delay=0, json={"rotating": True})
        assert wait_for(lambda: len(receiver.hits) == 1)
        hit = receiver.hits[0]
        header = {k.lower(): v for k, v in hit["headers"].items()}["x-sundial-signature"]
        assert header.count("v1=") == 2, header
        assert verify_signature(b"current", header, hit["body"])
        assert verify_signature(b"next", header, hit["body"])
        assert not verify_signature(b"retired", header, hit["body"])
        assert not verify_signature(b"next", header, hit["body"] + b" ")
    finally:
        process.kill()
        process.wait()


def test_lifecycle_verbs_and_flow_keys(node, receiver):
    client = Client(node)
    job = client.upsert("py-up", {"url": receiver.url + "/up", "cron": "0 0 1 1 *", "labels": {"team": "py"}})
    assert job.id == "py-up" and job.status == "pending"
    triggered = client.trigger("py-up")
    assert len(triggered.fires_added) == 1
    assert wait_for(lambda: any(h["path"] == "/up" for h in receiver.hits))
    keyed = client.create(receiver.url + "/keyed", delay="1h", flow={"key": "py-key", "parallelism": 1})
    assert keyed.flow["key"] == "py-key"
    assert client.pause_key("py-key")["paused"] is True
    assert [k["key"] for k in client.flow_keys()] == ["py-key"]
    assert client.resume_key("py-key")["paused"] is False
    report = client.bulk("cancel", labels={"team": "py"})
    assert report["done"] == ["py-up"] and report["failed"] == []
    with pytest.raises(SundialError) as refused:
        client.backfill("py-up", 0, 1)
    assert refused.value.code == "conflict"  # a cancelled job is not backfilled


def routes_missing_from(document, routes):
    paths = document["paths"]
    return [(m, p) for m, p in routes if p.split("?")[0] not in paths or m.lower() not in paths[p.split("?")[0]]]


def test_the_client_agrees_with_the_servers_openapi_document(node):
    document = Client(node)._call("GET", "/openapi.json")
    assert routes_missing_from(document, ROUTES) == []
    job_schema = document["components"]["schemas"]["Job"]["properties"]
    assert sorted(f.name for f in fields(Job)) == sorted(job_schema), "Job fields and the document's Job schema"
    # The check is not a rubber stamp: a route the server does not have is reported.
    assert routes_missing_from(document, [("GET", "/jobs/{id}/nonsense"), ("PUT", "/jobs")]) == [
        ("GET", "/jobs/{id}/nonsense"),
        ("PUT", "/jobs"),
    ]
