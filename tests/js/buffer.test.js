"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const { make, fakeFetch, memoryStorage, tick } = require("./fakes.js");

const offline = () => fakeFetch(() => new TypeError("offline"));

test("bounded in events: the oldest are dropped, counted and reported", async () => {
  const { t, errors } = make({ writeKey: "k", fetch: offline(), maxEvents: 3 });
  for (let i = 0; i < 5; i++) t.track("e" + i);
  await t.ready;
  assert.equal(t.stats().queued, 3);
  assert.equal(t.stats().dropped, 2);
  assert.deepEqual(errors.map(e => [e.code, e.count]), [["buffer_full", 1], ["buffer_full", 1]]);
});

test("bounded in bytes", async () => {
  const { t } = make({ writeKey: "k", fetch: offline(), maxBytes: 3000 });
  await t.ready;
  for (let i = 0; i < 10; i++) t.track("e", { pad: "x".repeat(900) });
  const s = t.stats();
  assert.ok(s.bytes <= 3000, `bytes ${s.bytes}`);
  assert.equal(s.queued + s.dropped, 10);
  assert.ok(s.dropped >= 7);
});

test("a flush() waiting for a dropped event rejects 'buffer_full'; a later one can pass", async () => {
  const storage = memoryStorage();
  const { t, clock } = make({ writeKey: "k", fetch: offline(), maxEvents: 2, storage });
  await t.ready;
  t.track("a");
  const p = assert.rejects(t.flush(), { code: "buffer_full" });
  t.track("b"); t.track("c");
  await p;
  t.close();
});

test("persistence round trip: what one page could not send, the next sends with the same ids", async () => {
  const storage = memoryStorage();
  const first = make({ writeKey: "k", fetch: offline(), storage });
  first.t.track("a", { n: 1 }); first.t.identify("u7"); first.t.track("b");
  await first.t.ready;
  await tick();
  first.t.close(); // the tab is gone (crashed or closed): nothing is written at close
  const saved = JSON.parse(storage.map.get("triolytics.q"));
  assert.deepEqual(saved.map(m => m.event || m.type), ["a", "identify", "b"]);

  const second = make({ writeKey: "k", storage });
  await second.t.flush();
  const sent = second.fetch.batches().flatMap(c => c.body.batch);
  assert.deepEqual(sent.map(m => m.messageId), saved.map(m => m.messageId));
  assert.equal(sent[2].userId, "u7");
  assert.equal(JSON.parse(storage.map.get("triolytics.q")).length, 0, "sent, acknowledged, gone");
  assert.equal(second.t.stats().userId, "u7");
  assert.equal(second.t.stats().anonymousId, first.t.stats().anonymousId);
});

test("an async storage adapter (React Native's AsyncStorage shape) works, calls before it answers keep their order and time", async () => {
  const storage = memoryStorage(true);
  await storage.setItem("triolytics.aid", "anon-1");
  const { t, clock, fetch } = make({ writeKey: "k", storage });
  t.track("first");
  clock.t += 1000;
  t.track("second");
  await t.flush();
  const batch = fetch.batches()[0].body.batch;
  assert.deepEqual(batch.map(m => [m.event, m.anonymousId, m.timestamp]), [
    ["first", "anon-1", "2026-01-02T03:04:05.000Z"], ["second", "anon-1", "2026-01-02T03:04:06.000Z"]]);
});

test("a storage that throws (quota, private mode) does not stop tracking", async () => {
  const bad = { getItem() { throw Error("denied") }, setItem() { throw Error("quota") }, removeItem() { throw Error("x") } };
  const { t, fetch } = make({ writeKey: "k", storage: bad });
  t.track("a");
  await t.flush();
  assert.equal(fetch.batches()[0].body.batch[0].event, "a");
});

test("storagePrefix keeps two instances apart", async () => {
  const storage = memoryStorage();
  const a = make({ writeKey: "k", storage, fetch: offline(), storagePrefix: "a" });
  const b = make({ writeKey: "k", storage, fetch: offline(), storagePrefix: "b" });
  a.t.track("x");
  await a.t.ready; await b.t.ready;
  assert.equal(JSON.parse(storage.map.get("a.q")).length, 1);
  assert.equal(JSON.parse(storage.map.get("b.q") ?? "[]").length, 0);
});

test("no storage given and no localStorage: memory, and it still works", async () => {
  const { t, fetch } = make({ writeKey: "k", storage: undefined });
  t.track("a");
  await t.flush();
  assert.equal(fetch.batches().length, 1);
});
