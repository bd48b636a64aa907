"""The admin console in a real browser: headless Chromium driven over WebDriver
(chromedriver), against a real node and a real webhook receiver. Screenshots go to
target/ui-screenshots/. Needs Debian's chromium and chromium-driver (.ci/run installs them)."""

import atexit
import base64
import http.server
import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = os.environ.get("SUNDIAL_BIN", str(ROOT / "target" / "debug" / "sundial"))
SHOTS = ROOT / "target" / "ui-screenshots"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method, url, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, json.loads(text) if text else None


class Driver:
    """Just enough of the W3C WebDriver protocol."""

    def __init__(self):
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="sundial-chromium-")
        driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
        self.process = subprocess.Popen([driver, f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while True:
            try:
                call("GET", self.base + "/status")
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        options = {"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", "--window-size=1280,900"]}
        browser = shutil.which("chromium") or "/usr/bin/chromium"
        options["binary"] = browser
        capabilities = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options, "goog:loggingPrefs": {"browser": "ALL"}}}}
        status, answer = call("POST", self.base + "/session", capabilities)
        assert status == 200, answer
        self.session = f"{self.base}/session/{answer['value']['sessionId']}"

    def command(self, method, path, body=None):
        status, answer = call(method, self.session + path, body if body is not None else ({} if method == "POST" else None))
        assert status == 200, f"{method} {path}: {answer}"
        return answer["value"]

    def open(self, url):
        self.command("POST", "/url", {"url": url})

    def find_all(self, css):
        return [e[ELEMENT] for e in self.command("POST", "/elements", {"using": "css selector", "value": css})]

    def text(self, css):
        return "\n".join(self.command("GET", f"/element/{e}/text") for e in self.find_all(css))

    def click(self, element):
        self.command("POST", f"/element/{element}/click")

    def accept_dialog(self):
        deadline = time.time() + 10
        while True:
            status, _ = call("POST", self.session + "/alert/accept", {})
            if status == 200:
                return
            if time.time() > deadline:
                raise AssertionError("no confirmation dialog")
            time.sleep(0.1)

    def screenshot(self, name):
        SHOTS.mkdir(parents=True, exist_ok=True)
        (SHOTS / name).write_bytes(base64.b64decode(self.command("GET", "/screenshot")))

    def console_errors(self):
        status, answer = call("POST", self.session + "/se/log", {"type": "browser"})
        assert status == 200, answer
        return [entry for entry in answer["value"] if entry.get("level") == "SEVERE"]

    def quit(self):
        call("DELETE", self.session)
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def start_node(*flags):
    data = tempfile.mkdtemp(prefix="sundial-ui-")
    # Each node preallocates its logs (hundreds of MiB): removed when the tests end.
    atexit.register(shutil.rmtree, data, True)
    process = subprocess.Popen(
        [BINARY, "--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--allow-loopback-targets", "--data", data, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    banner = process.stdout.readline()
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, "http://" + banner.split("http://")[1].split()[0]


class Receiver:
    def __init__(self):
        self.hits = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                hits.append(self.path)
                self.send_response(400 if self.path.startswith("/fail") else 200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def wait_for(done, limit_s=20.0):
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if done():
            return True
        time.sleep(0.1)
    return done()


@pytest.fixture
def browser():
    driver = Driver()
    yield driver
    driver.quit()


def test_the_console_lists_shows_and_redrives(browser):
    receiver = Receiver()
    process, node = start_node()
    try:
        assert call("POST", node + "/jobs", {"id": "fires-ok", "delay": "300ms", "url": receiver.url + "/ok"})[0] == 201
        failing = {"id": "fails", "delay": "300ms", "url": receiver.url + "/fail", "retry": {"max_attempts": 1}}
        assert call("POST", node + "/jobs", failing)[0] == 201
        later = {"id": "later", "delay": "1h", "url": receiver.url + "/later", "labels": {"team": "ops"}}
        assert call("POST", node + "/jobs", later)[0] == 201
        assert wait_for(lambda: len(call("GET", node + "/dlq")[1]["dead_letters"]) == 1)
        assert wait_for(lambda: call("GET", node + "/jobs/fires-ok/status")[1]["status"] == "completed")

        browser.open(node + "/ui")
        listed = browser.text("#jobs")
        assert all(job in listed for job in ["fires-ok", "fails", "later"]), listed
        assert wait_for(lambda: "…" not in browser.text("#chart-queue"), 10), "the live charts drew"
        browser.screenshot("jobs.png")
        browser.open(node + "/ui?label=team%3Dops")
        filtered = browser.text("#jobs")
        assert "later" in filtered and "fires-ok" not in filtered, filtered

        browser.open(node + "/ui")
        link = [e for e in browser.find_all("a.job-link") if browser.command("GET", f"/element/{e}/text") == "fires-ok"]
        browser.click(link[0])
        assert wait_for(lambda: "fires-ok" in browser.text("#job-id"))
        assert "completed" in browser.text("#job-status")
        assert "200" in browser.text("#executions"), browser.text("#executions")
        assert len(browser.find_all("svg.timeline rect.attempt")) == 1
        browser.screenshot("job.png")

        browser.open(node + "/ui/dlq")
        assert "fails" in browser.text("#dead-letters")
        browser.screenshot("dlq.png")
        browser.click(browser.find_all("button.redrive")[0])
        browser.accept_dialog()
        assert wait_for(lambda: receiver.hits.count("/fail") == 2), "the redriven fire ran again"
        assert wait_for(lambda: len(call("GET", node + "/dlq")[1]["dead_letters"]) == 1), "and failed into the DLQ again"

        browser.open(node + "/ui/cluster")
        assert len(browser.find_all("#partitions tr.partition")) == 16
        browser.screenshot("cluster.png")
        assert browser.console_errors() == []
    finally:
        process.kill()
        process.wait()
        receiver.server.shutdown()


def test_with_a_token_the_console_asks_for_it(browser):
    process, node = start_node("--token", "s3cret-token-0123456789")
    try:
        browser.open(node + "/ui")
        assert "Token needed" in browser.text("h1")
        browser.open(node + "/ui/login")
        browser.command("POST", "/execute/sync", {"script": "document.querySelector('input[name=token]').value='s3cret-token-0123456789'; login(document.querySelector('form')); return 1;", "args": []})
        assert wait_for(lambda: browser.text("h1") == "Jobs")
        assert "Jobs" in browser.text("h1")
        browser.screenshot("login.png")
    finally:
        process.kill()
        process.wait()
