// Sundial's HTTP API as typed calls (fetch, Node 18+), and the verifier receivers use for
// Sundial's webhook signatures. Each request has a timeout; 429 and 503 are retried after
// their Retry-After (at most `retries` times, each wait capped); other error statuses
// throw SundialError with the API's code, message and field.

import { createHmac, timingSafeEqual } from "node:crypto";

/** Every [method, path] the client calls; a test checks each against /openapi.json. */
export const ROUTES: ReadonlyArray<readonly [string, string]> = [
  ["POST", "/jobs"],
  ["GET", "/jobs"],
  ["GET", "/jobs/{id}"],
  ["GET", "/jobs/{id}/status"],
  ["GET", "/jobs/{id}/executions"],
  ["POST", "/jobs/{id}/cancel"],
  ["POST", "/jobs/{id}/pause"],
  ["POST", "/jobs/{id}/resume"],
  ["DELETE", "/jobs/{id}"],
  ["GET", "/dlq"],
  ["POST", "/dlq/{id}/{fire_ms}/redrive"],
  ["DELETE", "/dlq"],
  ["DELETE", "/dlq/{id}"],
  ["GET", "/health"],
  ["PUT", "/jobs/{id}"],
  ["POST", "/jobs/{id}/trigger"],
  ["POST", "/jobs/{id}/backfill"],
  ["POST", "/jobs/{id}/redrive"],
  ["POST", "/jobs/bulk"],
  ["GET", "/flow-keys"],
  ["GET", "/flow-keys/{key}"],
  ["POST", "/flow-keys/{key}/pause"],
  ["POST", "/flow-keys/{key}/resume"],
];

export type JobStatus = "pending" | "in_progress" | "completed" | "failed" | "cancelled" | "timeout";

/** A job as the API shows it (Scheduled-DB's field names first). */
export interface Job {
  id: string;
  type: "unico" | "recurrente";
  status: JobStatus;
  webhook_url: string;
  method: string;
  schedule: Record<string, unknown>;
  next_fire_ms: number | null;
  paused: boolean;
  priority: number;
  labels: Record<string, string>;
  created_ms: number;
  fires: { succeeded: number; failed: number; missed: number };
  /** Why the job paused itself (pause_after_failures), until resumed. */
  paused_reason: string | null;
  flow: FlowSettings | null;
  callbacks: { on_success: string | null; on_failure: string | null };
  callbacks_pending: number;
  /** The retry policy: max_attempts, backoff, initial_backoff_ms, max_backoff_ms, multiplier, jitter. */
  retry: Record<string, unknown>;
  /** Whether the job signs with its own secret, and is rotating it (secrets are never shown). */
  signing: { own_secret: boolean; rotating: boolean };
  /** In answers to trigger, backfill and redriveJob: the fire times added or put back. */
  fires_added?: number[];
}

/** A job's flow-control key and the limits it gives the key. */
export interface FlowSettings {
  key: string;
  parallelism?: number | null;
  rate?: number | null;
  period_ms?: number | null;
  ordered?: boolean | null;
}

/** A flow key as the API shows it. */
export interface FlowKey {
  key: string;
  parallelism: number | null;
  rate: number | null;
  period_ms: number | null;
  ordered: boolean;
  paused: boolean;
  jobs: number;
  in_flight: number;
  active_fires: number;
  backlog: number;
}

/** What a bulk verb did. */
export interface BulkReport {
  matched: number;
  done: string[];
  failed: { id: string; status: number; code: string; error: string }[];
  more: boolean;
  fires_redriven?: number;
}

/** The Job fields, for checking against the server's document. */
export const JOB_FIELDS: ReadonlyArray<keyof Job> = [
  "id", "type", "status", "webhook_url", "method", "schedule",
  "next_fire_ms", "paused", "priority", "labels", "created_ms", "fires",
  "paused_reason", "flow", "callbacks", "callbacks_pending", "fires_added", "retry", "signing",
];

export interface Execution {
  fire_ms: number;
  attempt: number;
  node: number;
  started_ms: number;
  finished_ms: number | null;
  latency_ms: number | null;
  status_code: number | null;
  error: string | null;
  response_body: string;
  missed: boolean;
  /** Something that happened to the job rather than an attempt: a callback, an auto-pause. */
  note: string | null;
}

export interface DeadLetter {
  id: string;
  fire_ms: number;
  attempts: number;
  reason: string;
  moved_ms: number;
}

/** Sundial's job request (exactly one of run_at, delay, cron); see node/openapi.json. */
export interface SundialJobRequest {
  url: string;
  id?: string;
  run_at?: string | number;
  delay?: string | number;
  cron?: string;
  time_zone?: string;
  method?: "GET" | "POST" | "PUT" | "PATCH" | "DELETE";
  headers?: Record<string, string>;
  json?: unknown;
  body?: string;
  retry?: Record<string, unknown>;
  priority?: number;
  labels?: Record<string, string>;
  [more: string]: unknown;
}

/** Scheduled-DB's request, unchanged. */
export interface ScheduledDbJobRequest {
  type: "unico" | "recurrente";
  webhook_url: string;
  id?: string;
  timestamp?: string;
  cron_expression?: string;
  last_date?: string;
  payload?: unknown;
}

export class SundialError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly field?: string,
  ) {
    super(`${status} ${code}: ${message}`);
    this.name = "SundialError";
  }
}

export interface ClientOptions {
  token?: string;
  /** Per request, milliseconds (default 10,000). */
  timeoutMs?: number;
  /** Retries of 429 and 503 (default 3). */
  retries?: number;
  /** Longest wait before a retry, milliseconds (default 30,000). */
  retryWaitMaxMs?: number;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export class Client {
  private readonly base: string;
  private readonly options: Required<Omit<ClientOptions, "token">> & { token?: string };

  constructor(baseUrl = "http://127.0.0.1:8080", options: ClientOptions = {}) {
    const url = new URL(baseUrl);
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      throw new Error(`baseUrl: must be http(s)://host[:port], not ${baseUrl}`);
    }
    this.base = url.origin;
    this.options = {
      token: options.token,
      timeoutMs: options.timeoutMs ?? 10_000,
      retries: options.retries ?? 3,
      retryWaitMaxMs: options.retryWaitMaxMs ?? 30_000,
    };
  }

  /** One call, with its timeout and the retries of 429 and 503. */
  async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (this.options.token) headers.authorization = `Bearer ${this.options.token}`;
    for (let attempt = 0; ; attempt++) {
      const response = await fetch(this.base + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(this.options.timeoutMs),
      });
      const text = await response.text();
      if ((response.status === 429 || response.status === 503) && attempt < this.options.retries) {
        const seconds = Number(response.headers.get("retry-after"));
        const waitMs = Number.isFinite(seconds) && seconds >= 0 ? seconds * 1000 : 500 * 2 ** attempt;
        await sleep(Math.min(waitMs, this.options.retryWaitMaxMs));
        continue;
      }
      const value = text ? JSON.parse(text) : undefined;
      if (response.status >= 400) {
        throw new SundialError(response.status, value?.code ?? "error", value?.error ?? "", value?.field);
      }
      return value as T;
    }
  }

  private static id(id: string): string {
    return encodeURIComponent(id);
  }

  /** Creates a job from Sundial's request or Scheduled-DB's. */
  create(request: SundialJobRequest | ScheduledDbJobRequest): Promise<Job> {
    return this.call<Job>("POST", "/jobs", request);
  }

  get(id: string): Promise<Job> {
    return this.call<Job>("GET", `/jobs/${Client.id(id)}`);
  }

  async status(id: string): Promise<JobStatus> {
    return (await this.call<{ status: JobStatus }>("GET", `/jobs/${Client.id(id)}/status`)).status;
  }

  async executions(id: string): Promise<Execution[]> {
    return (await this.call<{ executions: Execution[] }>("GET", `/jobs/${Client.id(id)}/executions`)).executions;
  }

  cancel(id: string): Promise<Job> {
    return this.call<Job>("POST", `/jobs/${Client.id(id)}/cancel`);
  }

  pause(id: string): Promise<Job> {
    return this.call<Job>("POST", `/jobs/${Client.id(id)}/pause`);
  }

  resume(id: string): Promise<Job> {
    return this.call<Job>("POST", `/jobs/${Client.id(id)}/resume`);
  }

  async delete(id: string): Promise<void> {
    await this.call<void>("DELETE", `/jobs/${Client.id(id)}`);
  }

  async list(filter: { status?: JobStatus; limit?: number } = {}): Promise<Job[]> {
    const query = new URLSearchParams();
    if (filter.status) query.set("status", filter.status);
    query.set("limit", String(filter.limit ?? 100));
    return (await this.call<{ jobs: Job[] }>("GET", `/jobs?${query}`)).jobs;
  }

  async deadLetters(): Promise<DeadLetter[]> {
    return (await this.call<{ dead_letters: DeadLetter[] }>("GET", "/dlq")).dead_letters;
  }

  redrive(id: string, fireMs: number): Promise<Job> {
    return this.call<Job>("POST", `/dlq/${Client.id(id)}/${Math.trunc(fireMs)}/redrive`);
  }

  async purge(id?: string): Promise<void> {
    await this.call<void>("DELETE", id === undefined ? "/dlq" : `/dlq/${Client.id(id)}`);
  }

  health(): Promise<Record<string, unknown>> {
    return this.call<Record<string, unknown>>("GET", "/health");
  }

  /** Creates the job `id`, or replaces its schedule and target (PUT /jobs/{id}). */
  upsert(id: string, request: SundialJobRequest): Promise<Job> {
    return this.call<Job>("PUT", `/jobs/${Client.id(id)}`, request);
  }

  /** An extra fire now, with its own key: `fires_added` has its fire time. */
  trigger(id: string): Promise<Job> {
    return this.call<Job>("POST", `/jobs/${Client.id(id)}/trigger`);
  }

  /** A fire for each occurrence of a cron job's schedule in [from, to] (RFC 3339 or ms). */
  backfill(id: string, from: string | number, to: string | number): Promise<Job> {
    return this.call<Job>("POST", `/jobs/${Client.id(id)}/backfill`, { from, to });
  }

  /** Puts every dead-lettered fire of the job back. */
  redriveJob(id: string): Promise<Job> {
    return this.call<Job>("POST", `/jobs/${Client.id(id)}/redrive`);
  }

  /** cancel, redrive, purge, pause, resume or delete: on `ids`, or on the jobs with `labels`. */
  bulk(
    action: "cancel" | "redrive" | "purge" | "pause" | "resume" | "delete",
    on: { ids: string[] } | { labels: Record<string, string>; limit?: number },
  ): Promise<BulkReport> {
    return this.call<BulkReport>("POST", "/jobs/bulk", { action, ...on });
  }

  async flowKeys(): Promise<FlowKey[]> {
    return (await this.call<{ flow_keys: FlowKey[] }>("GET", "/flow-keys")).flow_keys;
  }

  flowKey(key: string): Promise<FlowKey> {
    return this.call<FlowKey>("GET", `/flow-keys/${Client.id(key)}`);
  }

  pauseKey(key: string): Promise<FlowKey> {
    return this.call<FlowKey>("POST", `/flow-keys/${Client.id(key)}/pause`);
  }

  resumeKey(key: string): Promise<FlowKey> {
    return this.call<FlowKey>("POST", `/flow-keys/${Client.id(key)}/resume`);
  }
}

/**
 * Checks `X-Sundial-Signature: t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` in
 * constant time, refusing timestamps further than `toleranceMs` from now (replays).
 * During a key rotation the header carries one `v1=` per secret: any one verifying is enough.
 * `body` is the raw request body. Deprecated: v1 covers the body only, so it verifies for any
 * URL; prefer `verifySignatureV2`.
 */
export function verifySignature(
  secret: string | Buffer,
  header: string,
  body: string | Buffer,
  nowMs: number = Date.now(),
  toleranceMs = 300_000,
): boolean {
  return anySignatureMatches(secret, header, "v1", (t) => [`${t}.`, body], nowMs, toleranceMs);
}

/** Whether any `scheme=` value of the header is the HMAC of `signed(t)` (its parts in order), `t` within `toleranceMs` of now. */
function anySignatureMatches(
  secret: string | Buffer,
  header: string,
  scheme: string,
  signed: (timestamp: number) => (string | Buffer)[],
  nowMs: number,
  toleranceMs: number,
): boolean {
  const parts = header.split(",").flatMap((part): [string, string][] => {
    const at = part.indexOf("=");
    return at > 0 ? [[part.slice(0, at).trim(), part.slice(at + 1).trim()]] : [];
  });
  const timestamp = Number(parts.filter(([name]) => name === "t").pop()?.[1]);
  const given = parts.filter(([name]) => name === scheme).map(([, value]) => value);
  if (!Number.isSafeInteger(timestamp) || given.length === 0) return false;
  if (Math.abs(nowMs - timestamp) > toleranceMs) return false;
  const mac = createHmac("sha256", secret);
  for (const part of signed(timestamp)) mac.update(part);
  const expected = Buffer.from(mac.digest("hex"));
  // Every candidate is compared (no early exit on which one matched).
  const matches = given.map((candidate) => {
    const bytes = Buffer.from(candidate);
    return bytes.length === expected.length && timingSafeEqual(bytes, expected);
  });
  return matches.some(Boolean);
}

/** What a `v2=` signature binds besides the timestamp and the body. */
export interface SignedRequest {
  /** The request's method (`POST`). */
  method: string;
  /** The URL the job was created with (the one this receiver was registered as). */
  url: string;
  /** The request's `Idempotency-Key` header. */
  idempotencyKey: string;
}

/**
 * Checks the `v2=` signatures of `X-Sundial-Signature`: HMAC-SHA256(secret,
 * "v2\n<t>\n<METHOD>\n<url>\n<idempotency key>\n" + body). A signature made for another
 * URL, method or fire does not verify; timestamps further than `toleranceMs` from now are
 * refused (replays); during a key rotation any one `v2=` verifying is enough.
 */
export function verifySignatureV2(
  secret: string | Buffer,
  header: string,
  body: string | Buffer,
  request: SignedRequest,
  nowMs: number = Date.now(),
  toleranceMs = 300_000,
): boolean {
  const { method, url, idempotencyKey } = request;
  const signed = (t: number) => [`v2\n${t}\n${method.toUpperCase()}\n${url}\n${idempotencyKey}\n`, body];
  return anySignatureMatches(secret, header, "v2", signed, nowMs, toleranceMs);
}

/** Bits of a fencing token that hold the partition's log index; the term holds those above. */
export const FENCING_INDEX_BITS = 40n;

/**
 * The `X-Sundial-Fencing-Token` of a webhook request (`headers` as Node's `IncomingMessage`
 * has them, or any object of lower- or mixed-case names), or `undefined`. A bigint: tokens
 * use all 64 bits. Every later leadership of the job's partition sends larger tokens than
 * any earlier one did, so a receiver that keeps the largest token it accepted per job can
 * refuse a request whose term (`fencingTerm`) is older: one a deposed leader sent or had in
 * flight. Tokens are not signed: check the request's signature first.
 */
export function fencingToken(headers: Record<string, string | string[] | undefined>): bigint | undefined {
  const name = Object.keys(headers).find((key) => key.toLowerCase() === "x-sundial-fencing-token");
  const value = name === undefined ? undefined : headers[name];
  if (typeof value !== "string" || !/^[0-9]{1,20}$/.test(value)) return undefined;
  const token = BigInt(value);
  return token < 1n << 64n ? token : undefined;
}

/** The leadership term a fencing token was made in. */
export function fencingTerm(token: bigint): bigint {
  return token >> FENCING_INDEX_BITS;
}
