// The TypeScript client against a real node (the `sundial` binary on free loopback ports)
// and a real webhook receiver; and against the node's own /openapi.json.

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type IncomingMessage } from "node:http";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { once } from "node:events";
import { createInterface } from "node:readline";
import { Client, JOB_FIELDS, ROUTES, SundialError, fencingTerm, fencingToken, verifySignature, verifySignatureV2 } from "../src/index.js";

const binary = process.env.SUNDIAL_BIN ?? resolve(process.cwd(), "../../target/debug/sundial");
const started: ChildProcess[] = [];
const dataDirs: string[] = [];
// Each node preallocates its logs (hundreds of MiB): removed when the tests end.
after(() => {
  started.forEach((child) => child.kill("SIGKILL"));
  dataDirs.forEach((dir) => rmSync(dir, { recursive: true, force: true }));
});

async function startNode(...flags: string[]): Promise<string> {
  const data = mkdtempSync(join(tmpdir(), "sundial-ts-"));
  dataDirs.push(data);
  const child = spawn(binary, ["--http", "127.0.0.1:0", "--binary", "127.0.0.1:0", "--allow-loopback-targets", "--data", data, ...flags], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  started.push(child);
  const lines = createInterface({ input: child.stdout! });
  const [banner] = (await once(lines, "line")) as [string];
  lines.on("line", () => {}); // keep draining
  return "http://" + banner.split("http://")[1].split(/\s/)[0];
}

interface Hit { path: string; headers: IncomingMessage["headers"]; body: Buffer }

async function receiver(): Promise<{ url: string; hits: Hit[]; close: () => void }> {
  const hits: Hit[] = [];
  const server = createServer((request, response) => {
    const chunks: Buffer[] = [];
    request.on("data", (chunk: Buffer) => chunks.push(chunk));
    request.on("end", () => {
      hits.push({ path: request.url ?? "", headers: request.headers, body: Buffer.concat(chunks) });
      response.statusCode = request.url?.startsWith("/fail") ? 400 : 200;
      response.end("ok");
    });
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address() as { port: number };
  return { url: `http://127.0.0.1:${address.port}`, hits, close: () => server.close() };
}

async function waitFor(done: () => boolean | Promise<boolean>, limitMs = 20_000): Promise<boolean> {
  const deadline = Date.now() + limitMs;
  while (Date.now() < deadline) {
    if (await done()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return done();
}

test("create in both formats, get, list, cancel, and refusals with the API's field", async () => {
  const client = new Client(await startNode());
  const job = await client.create({ url: "http://127.0.0.1:9/x", delay: "1h", id: "ts-1", json: { a: 1 } });
  assert.equal(job.id, "ts-1");
  assert.equal(job.status, "pending");
  assert.deepEqual(await client.get("ts-1"), job);
  assert.equal(await client.status("ts-1"), "pending");
  const legacy = await client.create({ type: "recurrente", cron_expression: "*/5 * * * *", webhook_url: "http://127.0.0.1:9/c" });
  assert.equal(legacy.type, "recurrente");
  assert.deepEqual((await client.list()).map((j) => j.id).sort(), ["ts-1", legacy.id].sort());
  assert.equal((await client.cancel("ts-1")).status, "cancelled");
  assert.deepEqual((await client.list({ status: "cancelled" })).map((j) => j.id), ["ts-1"]);
  await assert.rejects(client.create({ url: "not a url", delay: "1h" }), (e: unknown) => {
    return e instanceof SundialError && e.status === 400 && e.code === "invalid" && e.field === "url";
  });
  await assert.rejects(client.get("nope"), (e: unknown) => e instanceof SundialError && e.status === 404);
});

test("a fire is recorded; a failing one is dead-lettered, redriven and purged", async () => {
  const target = await receiver();
  const client = new Client(await startNode());
  await client.create({ url: target.url + "/ok", delay: "500ms", id: "fires" });
  await client.create({ url: target.url + "/fail", delay: "500ms", id: "fails", retry: { max_attempts: 1 } });
  assert.ok(await waitFor(async () => (await client.status("fires")) === "completed"));
  assert.deepEqual((await client.executions("fires")).map((e) => e.status_code), [200]);
  assert.ok(await waitFor(async () => (await client.deadLetters()).length === 1));
  const [letter] = await client.deadLetters();
  assert.equal(letter.id, "fails");
  await client.redrive("fails", letter.fire_ms);
  assert.ok(await waitFor(() => target.hits.filter((h) => h.path === "/fail").length === 2), "redriven: fired again");
  assert.ok(await waitFor(async () => (await client.deadLetters()).length === 1));
  await client.purge("fails");
  assert.deepEqual(await client.deadLetters(), []);
  target.close();
});

test("429 is retried after its Retry-After; a wrong token is 401", async () => {
  const url = await startNode("--token", "t0k-0123456789abcdef", "--rate-per-token", "2");
  const client = new Client(url, { token: "t0k-0123456789abcdef", retries: 5 });
  const begun = Date.now();
  for (let i = 0; i < 5; i++) {
    await client.health();
    await client.list();
  }
  assert.ok(Date.now() - begun >= 1000, "some calls waited for the bucket to refill");
  await assert.rejects(new Client(url, { token: "wrong" }).list(), (e: unknown) => e instanceof SundialError && e.status === 401);
  const impatient = new Client(url, { token: "t0k-0123456789abcdef", retries: 0 });
  await assert.rejects(
    (async () => { for (let i = 0; i < 10; i++) await impatient.list(); })(),
    (e: unknown) => e instanceof SundialError && e.status === 429,
  );
});

test("signatures from a real node verify, and tampering does not", async () => {
  const target = await receiver();
  const client = new Client(await startNode("--secret", "s3cret"));
  await client.create({ url: target.url + "/signed", delay: "200ms", json: { signed: true } });
  assert.ok(await waitFor(() => target.hits.length === 1));
  const hit = target.hits[0];
  const header = String(hit.headers["x-sundial-signature"]);
  assert.ok(verifySignature("s3cret", header, hit.body));
  assert.ok(!verifySignature("s3cret", header, Buffer.concat([hit.body, Buffer.from(" ")])));
  assert.ok(!verifySignature("other", header, hit.body));
  assert.ok(!verifySignature("s3cret", header, hit.body, Date.now() + 3_600_000));
  assert.ok(!verifySignature("s3cret", "garbage", hit.body));
  const signed = { method: "POST", url: target.url + "/signed", idempotencyKey: String(hit.headers["idempotency-key"]) };
  assert.ok(verifySignatureV2("s3cret", header, hit.body, signed));
  // Bound to where it was sent: not for another URL, method or fire.
  assert.ok(!verifySignatureV2("s3cret", header, hit.body, { ...signed, url: "https://pay.example/hook" }));
  assert.ok(!verifySignatureV2("s3cret", header, hit.body, { ...signed, method: "PUT" }));
  assert.ok(!verifySignatureV2("s3cret", header, hit.body, { ...signed, idempotencyKey: signed.idempotencyKey + "0" }));
  // The fencing token: a leadership term above, a log position below.
  const token = fencingToken(hit.headers);
  assert.ok(token !== undefined && fencingTerm(token) >= 1n, JSON.stringify(hit.headers));
  assert.ok((token & ((1n << 40n) - 1n)) >= 1n, "a log position");
  assert.equal(fencingToken({ "X-Sundial-Fencing-Token": "12" }), 12n);
  assert.equal(fencingToken({ "x-sundial-fencing-token": "-1" }), undefined);
  assert.equal(fencingToken({}), undefined);
  target.close();
});

test("during a key rotation either secret verifies, and a retired one does not", async () => {
  const target = await receiver();
  const client = new Client(await startNode("--secret", "current", "--secret-next", "next"));
  await client.create({ url: target.url + "/rotating", delay: 0, json: { rotating: true } });
  assert.ok(await waitFor(() => target.hits.length === 1));
  const hit = target.hits[0];
  const header = String(hit.headers["x-sundial-signature"]);
  assert.equal(header.split("v1=").length - 1, 2, header);
  assert.ok(verifySignature("current", header, hit.body));
  assert.ok(verifySignature("next", header, hit.body));
  assert.ok(!verifySignature("retired", header, hit.body));
  assert.ok(!verifySignature("next", header, Buffer.concat([hit.body, Buffer.from(" ")])));
  target.close();
});

test("lifecycle verbs and flow keys", async () => {
  const target = await receiver();
  const client = new Client(await startNode());
  const job = await client.upsert("ts-up", { url: target.url + "/up", cron: "0 0 1 1 *", labels: { team: "ts" } });
  assert.equal(job.status, "pending");
  const triggered = await client.trigger("ts-up");
  assert.equal(triggered.fires_added?.length, 1);
  assert.ok(await waitFor(() => target.hits.some((h) => h.path === "/up")));
  await client.create({ url: target.url + "/keyed", delay: "1h", flow: { key: "ts-key", parallelism: 1 } });
  assert.equal((await client.pauseKey("ts-key")).paused, true);
  assert.deepEqual((await client.flowKeys()).map((k) => k.key), ["ts-key"]);
  assert.equal((await client.resumeKey("ts-key")).paused, false);
  const report = await client.bulk("cancel", { labels: { team: "ts" } });
  assert.deepEqual([report.done, report.failed], [["ts-up"], []]);
  target.close();
});

function routesMissingFrom(document: { paths: Record<string, Record<string, unknown>> }, routes: ReadonlyArray<readonly [string, string]>) {
  return routes.filter(([method, path]) => !document.paths[path]?.[method.toLowerCase()]);
}

test("the client agrees with the server's OpenAPI document", async () => {
  const client = new Client(await startNode());
  const document = await client.call<{ paths: Record<string, Record<string, unknown>>; components: { schemas: { Job: { properties: Record<string, unknown> } } } }>("GET", "/openapi.json");
  assert.deepEqual(routesMissingFrom(document, ROUTES), []);
  assert.deepEqual([...JOB_FIELDS].sort(), Object.keys(document.components.schemas.Job.properties).sort());
  // The check is not a rubber stamp.
  assert.deepEqual(routesMissingFrom(document, [["GET", "/jobs/{id}/nonsense"], ["PUT", "/jobs"]]), [["GET", "/jobs/{id}/nonsense"], ["PUT", "/jobs"]]);
});
