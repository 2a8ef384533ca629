"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const { make, fakeFetch, fakeBrowser, tick } = require("./fakes.js");

const http = (opts = {}) => make({ writeKey: "wk_1", ...opts });
const names = call => call.body.batch.map(m => m.event);

test("batches of 20: the 20th event sends at once, as text/plain with the write key in the body", async () => {
  const { t, fetch } = http();
  for (let i = 0; i < 20; i++) t.track("e" + i, { i });
  await tick();
  const [call, ...more] = fetch.batches();
  assert.equal(more.length, 0);
  assert.equal(call.url, "http://collector.test/v1/batch");
  assert.equal(call.init.method, "POST");
  assert.equal(call.init.headers["content-type"], "text/plain");
  assert.equal(call.init.credentials, "omit");
  assert.equal(call.body.writeKey, "wk_1");
  assert.equal(call.body.sentAt, "2026-01-02T03:04:05.000Z");
  assert.deepEqual(names(call), Array.from({ length: 20 }, (_, i) => "e" + i));
  const ids = call.body.batch.map(m => m.messageId);
  assert.equal(new Set(ids).size, 20);
  assert.match(ids[0], /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
});

test("fewer than 20 events wait 5 s (flushInterval), then go in one batch", async () => {
  const { t, fetch, clock } = http();
  t.track("a"); t.track("b");
  await clock.advance(4999);
  assert.equal(fetch.batches().length, 0);
  await clock.advance(1);
  assert.deepEqual(names(fetch.batches()[0]), ["a", "b"]);
});

test("flush() resolves once the batch is answered 2xx, and sends at once", async () => {
  let answer;
  const fetch = fakeFetch(() => new Promise(r => { answer = r }));
  const { t } = http({ fetch });
  t.track("a");
  let done = false;
  const p = t.flush().then(() => { done = true });
  await tick();
  assert.equal(fetch.batches().length, 1);
  assert.equal(done, false);
  answer({ status: 200, json: { success: true } });
  await p;
  assert.equal(t.stats().queued, 0);
});

test("flush() with nothing queued resolves at once; after close() it rejects 'closed'", async () => {
  const { t } = http();
  await t.flush();
  t.close();
  await assert.rejects(t.flush(), { code: "closed" });
});

test("5xx and network faults retry with jittered exponential backoff, same messageIds", async () => {
  let n = 0;
  const fetch = fakeFetch(() => ++n < 4 ? (n == 2 ? new TypeError("network") : { status: 503 }) : {});
  const { t, clock } = http({ fetch, flushTimeout: 1e6 });
  t.track("a");
  const p = t.flush();
  await tick();
  const delays = [];
  for (let i = 0; i < 3; i++) {
    const [d] = clock.pending().filter(x => x < 1e5);
    delays.push(d);
    await clock.advance(d);
  }
  await p;
  // Backoff base 1 s doubling: each delay is within [half, full] of 1, 2, 4 s.
  delays.slice(0, 3).forEach((d, i) => assert.ok(d >= 500 * 2 ** i && d <= 1000 * 2 ** i, `delay ${i}: ${d}`));
  const ids = fetch.batches().map(c => c.body.batch[0].messageId);
  assert.equal(fetch.batches().length, 4);
  assert.equal(new Set(ids).size, 1);
});

test("429 and 503 honour Retry-After (seconds) when it is longer than the backoff", async () => {
  let n = 0;
  const fetch = fakeFetch(() => ++n == 1 ? { status: 429, headers: { "retry-after": "7" } } : {});
  const { t, clock } = http({ fetch, flushTimeout: 1e6 });
  t.track("a");
  const p = t.flush();
  await tick();
  await clock.advance(6999);
  assert.equal(fetch.batches().length, 1);
  await clock.advance(1);
  await p;
  assert.equal(fetch.batches().length, 2);
});

test("408 is retried too", async () => {
  let n = 0;
  const fetch = fakeFetch(() => ++n == 1 ? { status: 408 } : {});
  const { t, clock } = http({ fetch });
  t.track("a");
  const p = t.flush();
  await clock.advance(2000);
  await p;
  assert.equal(fetch.batches().length, 2);
});

test("another 4xx drops the batch, reports it through onError, and flush() rejects", async () => {
  const fetch = fakeFetch(() => ({ status: 401, json: { error: { code: "unknown_write_key", message: "no such key" } } }));
  const { t, clock, errors } = http({ fetch });
  t.track("a"); t.track("b");
  await assert.rejects(t.flush(), { code: "unknown_write_key" });
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, "unknown_write_key");
  assert.equal(errors[0].count, 2);
  assert.equal(t.stats().queued, 0);
  await clock.advance(60000);
  assert.equal(fetch.batches().length, 1, "not retried");
});

test("a partial batch: the rejected events are dropped and reported, the rest acknowledged", async () => {
  const fetch = fakeFetch(() => ({ json: { success: true, stored: 1, rejected: [{ index: 1, code: "invalid_event", message: "bad", field: "$.batch[1].properties" }] } }));
  const { t, errors } = http({ fetch });
  t.track("good"); t.track("bad");
  await assert.rejects(t.flush(), { code: "invalid_event" });
  assert.deepEqual(errors.map(e => [e.code, e.count]), [["invalid_event", 1]]);
  assert.equal(t.stats().queued, 0);
});

test("a 400 naming every event rejected drops them", async () => {
  const fetch = fakeFetch(() => ({ status: 400, json: { rejected: [{ index: 0, code: "invalid_event", message: "x" }] } }));
  const { t, errors } = http({ fetch });
  t.track("a");
  await assert.rejects(t.flush(), { code: "invalid_event" });
  assert.equal(errors[0].count, 1);
});

test("pagehide sends everything unsent at once with fetch keepalive, in bodies under 64 KB", async () => {
  const b = fakeBrowser();
  const { t, fetch } = http({ ...b, flushAt: 1000, maxEvents: 1e4, maxBytes: 1e7 });
  await t.ready;
  for (let i = 0; i < 30; i++) t.track("big", { pad: "x".repeat(5000) });
  await tick();
  assert.equal(fetch.batches().length, 0);
  b.window.dispatchEvent(new Event("pagehide"));
  await tick();
  const calls = fetch.batches();
  assert.ok(calls.length >= 3);
  calls.forEach(c => { assert.equal(c.init.keepalive, true); assert.ok(c.init.body.length < 65536) });
  assert.equal(calls.reduce((n, c) => n + c.body.batch.length, 0), 30);
});

test("the page going to background sends with keepalive too", async () => {
  const b = fakeBrowser();
  const { t, fetch } = http({ ...b });
  await t.ready;
  t.track("a");
  b.setVisible(false);
  await tick();
  assert.equal(fetch.batches()[0].init.keepalive, true);
});

test("a batch stays under the server's 500 KB body limit, however large its events", async () => {
  const { t, fetch } = http({ maxBytes: 1e7 });
  for (let i = 0; i < 20; i++) t.track("big", { pad: "x".repeat(30000) });
  await t.flush();
  const calls = fetch.batches();
  assert.ok(calls.length >= 2);
  calls.forEach(c => assert.ok(c.init.body.length < 512000));
  assert.equal(calls.reduce((n, c) => n + c.body.batch.length, 0), 20);
});
