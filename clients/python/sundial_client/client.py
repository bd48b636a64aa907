"""Sundial's HTTP API as Python calls.

`Client` (blocking, http.client) and `AsyncClient` (asyncio streams) have the same methods.
Each request has a timeout; answers 429 and 503 are retried after their Retry-After (at most
`retries` times, each wait capped by `retry_wait_max_s`); any other error status raises
`SundialError` with the API's code, message and field.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import time
import urllib.parse
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

# Every (method, path) the clients call; a test checks each against /openapi.json.
ROUTES: List[Tuple[str, str]] = [
    ("POST", "/jobs"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{id}"),
    ("GET", "/jobs/{id}/status"),
    ("GET", "/jobs/{id}/executions"),
    ("POST", "/jobs/{id}/cancel"),
    ("POST", "/jobs/{id}/pause"),
    ("POST", "/jobs/{id}/resume"),
    ("DELETE", "/jobs/{id}"),
    ("GET", "/dlq"),
    ("POST", "/dlq/{id}/{fire_ms}/redrive"),
    ("DELETE", "/dlq"),
    ("DELETE", "/dlq/{id}"),
    ("GET", "/health"),
    ("PUT", "/jobs/{id}"),
    ("POST", "/jobs/{id}/trigger"),
    ("POST", "/jobs/{id}/backfill"),
    ("POST", "/jobs/{id}/redrive"),
    ("POST", "/jobs/bulk"),
    ("GET", "/flow-keys"),
    ("GET", "/flow-keys/{key}"),
    ("POST", "/flow-keys/{key}/pause"),
    ("POST", "/flow-keys/{key}/resume"),
]


class SundialError(Exception):
    """The API refused a request: HTTP status, the API's code, message and field."""

    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


@dataclass
class Job:
    """A job as the API shows it (Scheduled-DB's field names first)."""

    id: str
    type: str
    status: str
    webhook_url: str
    method: str
    schedule: Dict[str, Any]
    next_fire_ms: Optional[int]
    paused: bool
    priority: int
    labels: Dict[str, str]
    created_ms: int
    fires: Dict[str, int]
    paused_reason: Optional[str] = None
    flow: Optional[Dict[str, Any]] = None
    callbacks: Optional[Dict[str, Optional[str]]] = None
    callbacks_pending: int = 0
    retry: Optional[Dict[str, Any]] = None
    signing: Optional[Dict[str, bool]] = None
    # Answers to trigger, backfill and redrive_job: the fire times added or put back.
    fires_added: Optional[List[int]] = None

    @classmethod
    def from_json(cls, value: Dict[str, Any]) -> "Job":
        return cls(**{f.name: value.get(f.name, f.default) for f in fields(cls)})


@dataclass
class Execution:
    fire_ms: int
    attempt: int
    started_ms: int
    finished_ms: Optional[int]
    latency_ms: Optional[int]
    status_code: Optional[int]
    error: Optional[str]
    response_body: str = ""
    node: Optional[int] = None
    missed: bool = False
    # Something that happened to the job rather than an attempt: a callback, an auto-pause.
    note: Optional[str] = None

    @classmethod
    def from_json(cls, value: Dict[str, Any]) -> "Execution":
        return cls(**{f.name: value.get(f.name, f.default) for f in fields(cls)})


@dataclass
class DeadLetter:
    id: str
    fire_ms: int
    attempts: int
    reason: str
    moved_ms: int

    @classmethod
    def from_json(cls, value: Dict[str, Any]) -> "DeadLetter":
        return cls(**{f.name: value.get(f.name) for f in fields(cls)})


def verify_signature(
    secret: bytes, header: str, body: bytes, now_ms: Optional[int] = None, tolerance_ms: int = 300_000
) -> bool:
    """Checks `X-Sundial-Signature: t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
    in constant time, refusing timestamps further than `tolerance_ms` from now (replays).
    Deprecated: v1 covers the body only, so it verifies for any URL; prefer
    `verify_signature_v2`.
    During a key rotation the header carries one `v1=` per secret: any one verifying is
    enough, so a receiver holding either the current or the next secret accepts it."""
    return _any_signature_matches(secret, header, "v1", lambda t: f"{t}.".encode() + body, now_ms, tolerance_ms)


def verify_signature_v2(
    secret: bytes,
    header: str,
    body: bytes,
    method: str,
    url: str,
    idempotency_key: str,
    now_ms: Optional[int] = None,
    tolerance_ms: int = 300_000,
) -> bool:
    """Checks the `v2=` signatures of `X-Sundial-Signature`, which bind the request: HMAC-SHA256
    (secret, "v2\\n<t>\\n<METHOD>\\n<url>\\n<idempotency key>\\n" + body), where `url` is the
    URL the job was created with (the one this receiver was registered as), `method` the
    request's method and `idempotency_key` its `Idempotency-Key` header. A signature made for
    another URL, method or fire does not verify. Timestamps further than `tolerance_ms` from now
    are refused (replays); during a key rotation any one `v2=` verifying is enough."""

    def signed(timestamp: int) -> bytes:
        return f"v2\n{timestamp}\n{method.upper()}\n{url}\n{idempotency_key}\n".encode() + body

    return _any_signature_matches(secret, header, "v2", signed, now_ms, tolerance_ms)


#: Bits of a fencing token that hold the partition's log index; the term holds those above.
FENCING_INDEX_BITS = 40


def fencing_token(headers: Mapping[str, str]) -> Optional[int]:
    """The `X-Sundial-Fencing-Token` of a webhook request (`headers` in any case), or None.
    Every later leadership of the job's partition sends larger tokens than any earlier one
    did, so a receiver that keeps the largest token it accepted per job can refuse a request
    whose term (`fencing_term`) is older: one a deposed leader sent or had in flight. Tokens
    are not signed: check the request's signature first."""
    for name, value in headers.items():
        if name.lower() == "x-sundial-fencing-token":
            try:
                token = int(value)
            except ValueError:
                return None
            return token if 0 <= token < 1 << 64 else None
    return None


def fencing_term(token: int) -> int:
    """The leadership term a fencing token was made in."""
    return token >> FENCING_INDEX_BITS


def _any_signature_matches(
    secret: bytes,
    header: str,
    scheme: str,
    signed: Callable[[int], bytes],
    now_ms: Optional[int],
    tolerance_ms: int,
) -> bool:
    """Whether any `scheme=` value of the header is the HMAC of `signed(t)`, with `t` within
    `tolerance_ms` of now."""
    pairs = [part.strip().split("=", 1) for part in header.split(",") if "=" in part]
    timestamps = [value for name, value in pairs if name == "t"]
    given = [value for name, value in pairs if name == scheme]
    try:
        timestamp = int(timestamps[-1])
    except (IndexError, ValueError):
        return False
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if abs(now - timestamp) > tolerance_ms:
        return False
    expected = hmac.new(secret, signed(timestamp), hashlib.sha256).hexdigest()
    # Every candidate is compared (no early exit on a match's position).
    matches = [hmac.compare_digest(expected, candidate) for candidate in given]
    return any(matches)


def _bulk_body(
    action: str, ids: Optional[List[str]], labels: Optional[Dict[str, str]], limit: Optional[int]
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"action": action}
    if ids is not None:
        body["ids"] = ids
    if labels is not None:
        body["labels"] = labels
    if limit is not None:
        body["limit"] = limit
    return body


def _request_body(
    url: Optional[str], delay: Any, run_at: Any, cron: Optional[str], extra: Dict[str, Any]
) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    if url is not None:
        body["url"] = url
    for name, value in (("delay", delay), ("run_at", run_at), ("cron", cron)):
        if value is not None:
            body[name] = value
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


class _Base:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        token: Optional[str] = None,
        timeout: float = 10.0,
        retries: int = 3,
        retry_wait_max_s: float = 30.0,
    ):
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"base_url: must be http://host[:port], not {base_url!r}")
        self.host = parsed.hostname
        self.port = parsed.port or 80
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.retry_wait_max_s = retry_wait_max_s

    def _headers(self, body: bytes) -> Dict[str, str]:
        headers = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        return headers

    def _wait_s(self, retry_after: Optional[str], attempt: int) -> float:
        try:
            wait = float(retry_after) if retry_after is not None else 0.5 * (2**attempt)
        except ValueError:
            wait = 1.0
        return min(max(wait, 0.0), self.retry_wait_max_s)

    @staticmethod
    def _result(status: int, text: bytes) -> Any:
        value = json.loads(text) if text else None
        if status >= 400:
            value = value if isinstance(value, dict) else {}
            raise SundialError(status, value.get("code", "error"), value.get("error", ""), value.get("field"))
        return value

    @staticmethod
    def _quote(part: str) -> str:
        return urllib.parse.quote(part, safe="")


class Client(_Base):
    """The blocking client."""

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        body = b"" if payload is None else json.dumps(payload).encode()
        for attempt in range(self.retries + 1):
            connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                connection.request(method, path, body=body, headers=self._headers(body))
                response = connection.getresponse()
                text = response.read()
                status, retry_after = response.status, response.getheader("retry-after")
            finally:
                connection.close()
            if status in (429, 503) and attempt < self.retries:
                time.sleep(self._wait_s(retry_after, attempt))
                continue
            return self._result(status, text)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def create(
        self, url: Optional[str] = None, *, delay: Any = None, run_at: Any = None, cron: Optional[str] = None, **extra: Any
    ) -> Job:
        """Creates a job in Sundial's format (`time_zone`, `json`, `headers`, `id`, `retry`,
        … as keyword arguments)."""
        return Job.from_json(self._call("POST", "/jobs", _request_body(url, delay, run_at, cron, extra)))

    def create_request(self, request: Dict[str, Any]) -> Job:
        """Creates a job from a whole request document: Sundial's or Scheduled-DB's
        (`{"type": "unico"|"recurrente", "webhook_url", "timestamp"|"cron_expression", ...}`)."""
        return Job.from_json(self._call("POST", "/jobs", request))

    def get(self, job_id: str) -> Job:
        return Job.from_json(self._call("GET", f"/jobs/{self._quote(job_id)}"))

    def status(self, job_id: str) -> str:
        return self._call("GET", f"/jobs/{self._quote(job_id)}/status")["status"]

    def executions(self, job_id: str) -> List[Execution]:
        answer = self._call("GET", f"/jobs/{self._quote(job_id)}/executions")
        return [Execution.from_json(e) for e in answer["executions"]]

    def cancel(self, job_id: str) -> Job:
        return Job.from_json(self._call("POST", f"/jobs/{self._quote(job_id)}/cancel"))

    def pause(self, job_id: str) -> Job:
        return Job.from_json(self._call("POST", f"/jobs/{self._quote(job_id)}/pause"))

    def resume(self, job_id: str) -> Job:
        return Job.from_json(self._call("POST", f"/jobs/{self._quote(job_id)}/resume"))

    def delete(self, job_id: str) -> None:
        self._call("DELETE", f"/jobs/{self._quote(job_id)}")

    def list(self, status: Optional[str] = None, limit: int = 100) -> List[Job]:
        query = urllib.parse.urlencode({k: v for k, v in (("status", status), ("limit", limit)) if v is not None})
        return [Job.from_json(j) for j in self._call("GET", f"/jobs?{query}")["jobs"]]

    def dead_letters(self) -> List[DeadLetter]:
        return [DeadLetter.from_json(d) for d in self._call("GET", "/dlq")["dead_letters"]]

    def redrive(self, job_id: str, fire_ms: int) -> Job:
        return Job.from_json(self._call("POST", f"/dlq/{self._quote(job_id)}/{int(fire_ms)}/redrive"))

    def purge(self, job_id: Optional[str] = None) -> None:
        self._call("DELETE", "/dlq" if job_id is None else f"/dlq/{self._quote(job_id)}")

    def health(self) -> Dict[str, Any]:
        return self._call("GET", "/health")

    def upsert(self, job_id: str, request: Dict[str, Any]) -> Job:
        """Creates the job `job_id`, or replaces its schedule and target (PUT /jobs/{id})."""
        return Job.from_json(self._call("PUT", f"/jobs/{self._quote(job_id)}", request))

    def trigger(self, job_id: str) -> Job:
        """An extra fire now with its own key; the answer's `fires_added` has its fire time."""
        return Job.from_json(self._call("POST", f"/jobs/{self._quote(job_id)}/trigger"))

    def backfill(self, job_id: str, start: Any, end: Any) -> Job:
        """A fire for each occurrence of a cron job's schedule in [start, end] (RFC 3339 or ms)."""
        return Job.from_json(self._call("POST", f"/jobs/{self._quote(job_id)}/backfill", {"from": start, "to": end}))

    def redrive_job(self, job_id: str) -> Job:
        """Puts every dead-lettered fire of the job back."""
        return Job.from_json(self._call("POST", f"/jobs/{self._quote(job_id)}/redrive"))

    def bulk(
        self,
        action: str,
        ids: Optional[List[str]] = None,
        labels: Optional[Dict[str, str]] = None,
        limit: Optional[int] = None,
    ) -> Dict[str, Any]:
        """cancel, redrive, purge, pause, resume or delete: on `ids`, or on jobs with `labels`.
        Returns the report: matched, done, failed, more."""
        return self._call("POST", "/jobs/bulk", _bulk_body(action, ids, labels, limit))

    def flow_keys(self) -> List[Dict[str, Any]]:
        return self._call("GET", "/flow-keys")["flow_keys"]

    def flow_key(self, key: str) -> Dict[str, Any]:
        return self._call("GET", f"/flow-keys/{self._quote(key)}")

    def pause_key(self, key: str) -> Dict[str, Any]:
        return self._call("POST", f"/flow-keys/{self._quote(key)}/pause")

    def resume_key(self, key: str) -> Dict[str, Any]:
        return self._call("POST", f"/flow-keys/{self._quote(key)}/resume")


class AsyncClient(_Base):
    """The asyncio client (HTTP/1.1 over asyncio streams, one connection per request)."""

    async def _exchange(self, method: str, path: str, body: bytes) -> Tuple[int, Optional[str], bytes]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in self._headers(body).items()) + "\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        header_bytes, _, text = raw.partition(b"\r\n\r\n")
        lines = header_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return status, headers.get("retry-after"), text

    async def _call(self, method: str, path: str, payload: Any = None) -> Any:
        body = b"" if payload is None else json.dumps(payload).encode()
        for attempt in range(self.retries + 1):
            status, retry_after, text = await asyncio.wait_for(self._exchange(method, path, body), self.timeout)
            if status in (429, 503) and attempt < self.retries:
                await asyncio.sleep(self._wait_s(retry_after, attempt))
                continue
            return self._result(status, text)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def create(
        self, url: Optional[str] = None, *, delay: Any = None, run_at: Any = None, cron: Optional[str] = None, **extra: Any
    ) -> Job:
        return Job.from_json(await self._call("POST", "/jobs", _request_body(url, delay, run_at, cron, extra)))

    async def create_request(self, request: Dict[str, Any]) -> Job:
        return Job.from_json(await self._call("POST", "/jobs", request))

    async def get(self, job_id: str) -> Job:
        return Job.from_json(await self._call("GET", f"/jobs/{self._quote(job_id)}"))

    async def status(self, job_id: str) -> str:
        return (await self._call("GET", f"/jobs/{self._quote(job_id)}/status"))["status"]

    async def executions(self, job_id: str) -> List[Execution]:
        answer = await self._call("GET", f"/jobs/{self._quote(job_id)}/executions")
        return [Execution.from_json(e) for e in answer["executions"]]

    async def cancel(self, job_id: str) -> Job:
        return Job.from_json(await self._call("POST", f"/jobs/{self._quote(job_id)}/cancel"))

    async def pause(self, job_id: str) -> Job:
        return Job.from_json(await self._call("POST", f"/jobs/{self._quote(job_id)}/pause"))

    async def resume(self, job_id: str) -> Job:
        return Job.from_json(await self._call("POST", f"/jobs/{self._quote(job_id)}/resume"))

    async def delete(self, job_id: str) -> None:
        await self._call("DELETE", f"/jobs/{self._quote(job_id)}")

    async def list(self, status: Optional[str] = None, limit: int = 100) -> List[Job]:
        query = urllib.parse.urlencode({k: v for k, v in (("status", status), ("limit", limit)) if v is not None})
        return [Job.from_json(j) for j in (await self._call("GET", f"/jobs?{query}"))["jobs"]]

    async def dead_letters(self) -> List[DeadLetter]:
        return [DeadLetter.from_json(d) for d in (await self._call("GET", "/dlq"))["dead_letters"]]

    async def redrive(self, job_id: str, fire_ms: int) -> Job:
        return Job.from_json(await self._call("POST", f"/dlq/{self._quote(job_id)}/{int(fire_ms)}/redrive"))

    async def purge(self, job_id: Optional[str] = None) -> None:
        await self._call("DELETE", "/dlq" if job_id is None else f"/dlq/{self._quote(job_id)}")

    async def health(self) -> Dict[str, Any]:
        return await self._call("GET", "/health")

    async def upsert(self, job_id: str, request: Dict[str, Any]) -> Job:
        return Job.from_json(await self._call("PUT", f"/jobs/{self._quote(job_id)}", request))

    async def trigger(self, job_id: str) -> Job:
        return Job.from_json(await self._call("POST", f"/jobs/{self._quote(job_id)}/trigger"))

    async def backfill(self, job_id: str, start: Any, end: Any) -> Job:
        path = f"/jobs/{self._quote(job_id)}/backfill"
        return Job.from_json(await self._call("POST", path, {"from": start, "to": end}))

    async def redrive_job(self, job_id: str) -> Job:
        return Job.from_json(await self._call("POST", f"/jobs/{self._quote(job_id)}/redrive"))

    async def bulk(
        self,
        action: str,
        ids: Optional[List[str]] = None,
        labels: Optional[Dict[str, str]] = None,
        limit: Optional[int] = None,
    ) -> Dict[str, Any]:
        return await self._call("POST", "/jobs/bulk", _bulk_body(action, ids, labels, limit))

    async def flow_keys(self) -> List[Dict[str, Any]]:
        return (await self._call("GET", "/flow-keys"))["flow_keys"]

    async def flow_key(self, key: str) -> Dict[str, Any]:
        return await self._call("GET", f"/flow-keys/{self._quote(key)}")

    async def pause_key(self, key: str) -> Dict[str, Any]:
        return await self._call("POST", f"/flow-keys/{self._quote(key)}/pause")

    async def resume_key(self, key: str) -> Dict[str, Any]:
        return await self._call("POST", f"/flow-keys/{self._quote(key)}/resume")
