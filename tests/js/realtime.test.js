"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const { make, fakeFetch, fakeBrowser, memoryStorage, tick } = require("./fakes.js");

// A started realtime instance whose first socket is open.
async function started(opts = {}) {
  const env = make(opts);
  await env.t.ready;
  await tick();
  const ws = env.WebSocket.last();
  if (ws && !opts.noOpen) ws.open();
  return { ...env, ws };
}

test("POST /create once, keep the id in storage, connect to /analytics with it", async () => {
  const { fetch, ws, storage, t } = await started();
  assert.deepEqual(fetch.calls.map(c => [c.url, c.init.method]), [["http://collector.test/create", "POST"]]);
  assert.equal(ws.url, "ws://collector.test/analytics?analytics_id=0.id-1");
  assert.equal(storage.map.get("triolytics.rid"), "0.id-1");
  assert.equal(t.stats().analyticsId, "0.id-1");
  t.close();
  // A second start with the same storage asks for no new id.
  const again = await started({ storage });
  assert.equal(again.fetch.calls.length, 0);
  assert.equal(again.ws.url, "ws://collector.test/analytics?analytics_id=0.id-1");
});

test("https hosts connect over wss", async () => {
  const { ws } = await started({ host: "https://a.example/" });
  assert.equal(ws.url, "wss://a.example/analytics?analytics_id=0.id-1");
});

test("events go as one batch with ids, ts in ms and a seq; the ack resolves flush()", async () => {
  const { t, ws } = await started();
  t.track("button_click", { btn_id: "play" });
  t.screen("Home");
  const p = t.flush();
  await tick();
  assert.equal(ws.sent.length, 1);
  const [batch] = ws.sent;
  assert.equal(typeof batch.seq, "number");
  assert.deepEqual(batch.events.map(e => [e.type, e.ts, e.payload]), [
    ["button_click", Date.UTC(2026, 0, 2, 3, 4, 5), { btn_id: "play" }],
    ["screen", Date.UTC(2026, 0, 2, 3, 4, 5), { name: "Home" }],
  ]);
  batch.events.forEach(e => assert.match(e.id, /^[0-9a-f-]{36}$/));
  let done = false;
  p.then(() => { done = true });
  await tick();
  assert.equal(done, false, "not before the ack");
  ws.ack(batch.seq);
  await p;
  assert.equal(t.stats().queued, 0);
});

test("flush() rejects with 'timeout' when no ack comes in flushTimeout", async () => {
  const { t, clock } = await started({ flushTimeout: 3000 });
  t.track("a");
  const p = assert.rejects(t.flush(), { code: "timeout" });
  await clock.advance(3000);
  await p;
});

test("events tracked while offline wait in the buffer and go once the socket opens", async () => {
  const { t, WebSocket, ws } = await started({ noOpen: true });
  t.track("a"); t.track("b");
  await tick();
  assert.equal(ws.sent.length, 0);
  ws.open();
  assert.deepEqual(ws.sent[0].events.map(e => e.type), ["a", "b"]);
  assert.equal(WebSocket.sockets.length, 1);
});

test("a dropped connection: reconnect with jittered exponential backoff, resend unacknowledged events byte for byte", async () => {
  const { t, ws, WebSocket, clock } = await started({ flushTimeout: 1e6 });
  t.track("a", { k: 1 }); t.track("b");
  await tick();
  const first = ws.sent[0].events;
  const firstRaw = JSON.stringify(first);
  ws.drop(1006);
  const delays = [];
  for (let i = 0; i < 4; i++) {
    const [d] = clock.pending().filter(x => x < 1e5);
    delays.push(d);
    await clock.advance(d);
    if (i < 3) WebSocket.last().drop(1006); // refused again, before it opens
  }
  delays.forEach((d, i) => assert.ok(d >= 500 * 2 ** i && d <= 1000 * 2 ** i, `delay ${i}: ${d}`));
  assert.equal(WebSocket.sockets.length, 5);
  const last = WebSocket.last();
  last.open();
  assert.equal(JSON.stringify(last.sent[0].events), firstRaw, "the same events, the same ids");
  assert.notEqual(last.sent[0].seq, undefined);
  last.ackAll();
  await t.flush();
});

test("backoff is capped by maxBackoff and reset once a socket opens", async () => {
  const { ws, WebSocket, clock } = await started({ maxBackoff: 4000 });
  ws.drop(1006);
  for (let i = 0; i < 6; i++) {
    const [d] = clock.pending();
    assert.ok(d <= 4000, `delay ${d}`);
    await clock.advance(d);
    WebSocket.last().drop(1006);
  }
  const [d] = clock.pending();
  await clock.advance(d);
  WebSocket.last().open();
  WebSocket.last().drop(1006);
  assert.ok(clock.pending()[0] <= 1000);
});

test("acknowledged events are never sent again, across a reconnect", async () => {
  const { t, ws, WebSocket, clock } = await started();
  t.track("a");
  await tick();
  ws.ackAll();
  t.track("b");
  await tick();
  ws.drop(1006);
  await clock.advance(1000);
  WebSocket.last().open();
  const resent = WebSocket.last().sent.flatMap(m => m.events.map(e => e.type));
  assert.deepEqual(resent, ["b"]);
});

test("an error naming one event drops that event alone (reported); the others are resent", async () => {
  const { t, ws, errors } = await started();
  t.track("ok1"); t.track("ok2");
  await tick();
  const seq = ws.sent[0].seq;
  const p = t.flush();
  ws.reply({ type: "error", seq, code: "invalid_event", message: "payload too deep", field: "$.events[1].payload" });
  await assert.rejects(p, { code: "invalid_event" });
  assert.deepEqual(errors.map(e => [e.code, e.count]), [["invalid_event", 1]]);
  assert.deepEqual(ws.sent[1].events.map(e => e.type), ["ok1"]);
  assert.equal(ws.sent[1].events[0].id, ws.sent[0].events[0].id);
});

test("'unavailable' is not a refusal: the socket is reopened and the batch resent", async () => {
  const { t, ws, WebSocket, clock, errors } = await started();
  t.track("a");
  await tick();
  ws.reply({ type: "error", seq: ws.sent[0].seq, code: "unavailable", message: "disk full" });
  await tick();
  assert.equal(ws.closedWith, 1000);
  await clock.advance(1000);
  WebSocket.last().open();
  assert.equal(WebSocket.last().sent[0].events[0].id, ws.sent[0].events[0].id);
  assert.equal(errors.length, 0);
});

test("the server's idle close (1000) with nothing to send: no reconnect until there is", async () => {
  const { t, ws, WebSocket, clock } = await started();
  ws.drop(1000);
  await clock.advance(120000);
  assert.equal(WebSocket.sockets.length, 1);
  t.track("later");
  await tick();
  assert.equal(WebSocket.sockets.length, 2);
});

test("the page in background closes the socket; visible again reopens it and resends", async () => {
  const b = fakeBrowser();
  const { t, ws, WebSocket, clock } = await started({ ...b });
  t.track("a");
  await tick();
  b.setVisible(false);
  await tick();
  assert.equal(ws.closedWith, 1000);
  t.track("b");
  await clock.advance(60000);
  assert.equal(WebSocket.sockets.length, 1, "nothing opened while hidden");
  b.setVisible(true);
  await tick();
  assert.equal(WebSocket.sockets.length, 2);
  WebSocket.last().open();
  assert.deepEqual(WebSocket.last().sent[0].events.map(e => e.type), ["a", "b"]);
  assert.equal(WebSocket.last().sent[0].events[0].id, ws.sent[0].events[0].id);
});

test("POST /create refused with 429: waits Retry-After, then asks again", async () => {
  let n = 0;
  const fetch = fakeFetch(() => ++n == 1 ? { status: 429, headers: { "retry-after": "30" } } : { json: { analytics_id: "0.later" } });
  const { WebSocket, clock } = await started({ fetch, noOpen: true });
  assert.equal(WebSocket.sockets.length, 0);
  await clock.advance(29999);
  assert.equal(fetch.calls.length, 1);
  await clock.advance(1);
  assert.equal(fetch.calls.length, 2);
  assert.equal(WebSocket.last().url, "ws://collector.test/analytics?analytics_id=0.later");
});

test("identify and page as realtime events", async () => {
  const b = fakeBrowser("https://app.example/a?q=1");
  const { t, ws } = await started({ ...b });
  t.identify("u1", { plan: "pro" });
  t.page();
  await tick();
  const [identify, page] = ws.sent[0].events;
  assert.deepEqual([identify.type, identify.payload], ["identify", { userId: "u1", traits: { plan: "pro" } }]);
  assert.equal(page.type, "page");
  assert.deepEqual(page.payload, { path: "/a", referrer: "https://search.example/", search: "?q=1", title: "Cart", url: "https://app.example/a?q=1" });
});

test("no more than 16 batches in flight; acks let the rest go", async () => {
  const { t, ws } = await started({ maxEvents: 5000, maxBytes: 1e7 });
  await tick();
  for (let i = 0; i < 2000; i++) t.track("e");
  await tick();
  const sentCount = () => ws.sent.reduce((n, m) => n + m.events.length, 0);
  assert.ok(sentCount() < 2000);
  assert.ok(ws.sent.length <= 16 + 2000 / 100);
  for (let i = 0; i < 40 && sentCount() < 2000; i++) { ws.sent.forEach(m => ws.ack(m.seq)); await tick() }
  assert.equal(sentCount(), 2000);
});

test("the browser's online event reconnects at once, without waiting for the backoff", async () => {
  const b = fakeBrowser();
  const { ws, WebSocket, clock } = await started({ ...b, minBackoff: 30000 });
  ws.drop(1006);
  assert.ok(clock.pending()[0] >= 15000);
  b.window.dispatchEvent(new Event("online"));
  await tick();
  assert.equal(WebSocket.sockets.length, 2);
});

test("close() ends the socket and reconnects no more", async () => {
  const { t, ws, WebSocket, clock } = await started();
  t.close();
  await tick();
  assert.equal(ws.closedWith, 1000);
  await clock.advance(600000);
  assert.equal(WebSocket.sockets.length, 1);
});
