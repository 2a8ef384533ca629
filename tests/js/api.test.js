"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const { make, fakeBrowser, tick, memoryStorage } = require("./fakes.js");

const sent = async (opts = {}, fn) => {
  const env = make({ writeKey: "k", ...opts });
  fn(env.t);
  await env.t.flush();
  return { ...env, batch: env.fetch.batches().flatMap(c => c.body.batch) };
};

test("track: Segment's shape, with context filled as analytics.js does", async () => {
  const b = fakeBrowser();
  const { batch, t } = await sent(b, t => t.track("Added to Cart", { productId: "p_99", price: 29.99 }));
  const [m] = batch;
  assert.equal(m.type, "track");
  assert.equal(m.event, "Added to Cart");
  assert.deepEqual(m.properties, { productId: "p_99", price: 29.99 });
  assert.equal(m.anonymousId, t.stats().anonymousId);
  assert.equal(m.userId, undefined);
  assert.equal(m.timestamp, "2026-01-02T03:04:05.000Z");
  assert.deepEqual(m.context.library, { name: "triolytics.js", version: globalThis.triolytics.VERSION });
  assert.deepEqual(m.context.page, { path: "/cart", referrer: "https://search.example/", search: "?x=1", title: "Cart", url: "https://shop.example/cart?x=1" });
  assert.equal(m.context.locale, "de-DE");
  assert.equal(m.context.userAgent, "FakeBrowser/1.0");
  assert.deepEqual(m.context.screen, { width: 390, height: 844, density: 3 });
  assert.equal(typeof m.context.timezone, "string");
});

test("page(name?, properties?) and screen(name, properties?)", async () => {
  const b = fakeBrowser("https://shop.example/p/1");
  const { batch } = await sent(b, t => { t.page(); t.page("Product", { sku: "s" }); t.page({ a: 1 }); t.screen("Home", { tab: 2 }) });
  const page = { path: "/p/1", referrer: "https://search.example/", search: "", title: "Cart", url: "https://shop.example/p/1" };
  assert.deepEqual(batch.map(m => [m.type, m.name, m.properties]), [
    ["page", undefined, page],
    ["page", "Product", { ...page, name: "Product", sku: "s" }],
    ["page", undefined, { ...page, a: 1 }],
    ["screen", "Home", { name: "Home", tab: 2 }],
  ]);
});

test("identify(userId, traits) sets userId on later events; reset() forgets it and makes a new anonymousId", async () => {
  const storage = memoryStorage();
  const { batch, t } = await sent({ storage }, t => {
    t.track("before"); t.identify("u1", { email: "a@b.c" }); t.track("after"); t.identify({ plan: "pro" }); t.reset(); t.track("gone");
  });
  assert.deepEqual(batch.map(m => [m.type, m.event, m.userId, m.traits]), [
    ["track", "before", undefined, undefined],
    ["identify", undefined, "u1", { email: "a@b.c" }],
    ["track", "after", "u1", undefined],
    ["identify", undefined, "u1", { plan: "pro" }],
    ["track", "gone", undefined, undefined],
  ]);
  assert.equal(batch[0].anonymousId, batch[3].anonymousId);
  assert.notEqual(batch[4].anonymousId, batch[0].anonymousId);
  assert.equal(storage.map.get("triolytics.uid"), undefined);
  assert.equal(storage.map.get("triolytics.aid"), batch[4].anonymousId);
});

test("identify(traits) before any userId: traits with the anonymousId alone", async () => {
  const { batch } = await sent({}, t => t.identify({ plan: "free" }));
  assert.equal("userId" in batch[0], false);
  assert.deepEqual(batch[0].traits, { plan: "free" });
});

test("track refuses names the server would refuse, reported, not queued", async () => {
  const { t, errors } = make({ writeKey: "k" });
  t.track(""); t.track("session_start"); t.track("x".repeat(201)); t.track(undefined);
  await t.ready;
  assert.equal(t.stats().queued, 0);
  assert.deepEqual(errors.map(e => e.code), Array(4).fill("invalid_event"));
});

test("respectDnt: with Do Not Track or Global Privacy Control nothing is sent or stored", async () => {
  for (const navigator of [{ doNotTrack: "1" }, { globalPrivacyControl: true }]) {
    const storage = memoryStorage();
    const { t, fetch, WebSocket } = make({ respectDnt: true, navigator, storage });
    t.track("a"); t.page(); t.identify("u");
    await t.flush();
    await tick();
    assert.equal(fetch.calls.length, 0);
    assert.equal(WebSocket.sockets.length, 0);
    assert.equal(storage.map.size, 0);
  }
  // Without the option the signal is not read.
  const { t, WebSocket } = make({ navigator: { doNotTrack: "1" } });
  await t.ready; await tick();
  assert.equal(WebSocket.sockets.length, 1);
});

test("autoPage: a page view at start, on history.pushState and on popstate, once per URL", async () => {
  const b = fakeBrowser("https://app.example/");
  const { t, fetch } = make({ writeKey: "k", autoPage: true, ...b });
  b.window.history.pushState({}, "", "/settings");
  b.window.history.pushState({}, "", "/settings");
  b.window.back("/");
  await t.flush();
  const paths = fetch.batches().flatMap(c => c.body.batch).map(m => [m.type, m.properties.path]);
  assert.deepEqual(paths, [["page", "/"], ["page", "/settings"], ["page", "/"]]);
});

test("the default host of a classic <script> is the origin it was loaded from; transport defaults", async () => {
  const { t, WebSocket } = make({ host: undefined, writeKey: undefined });
  await t.ready; await tick();
  assert.equal(WebSocket.sockets.length, 1, "realtime without a writeKey");
  const h = make({ writeKey: "k" });
  h.t.track("a");
  await h.t.flush();
  assert.equal(h.WebSocket.sockets.length, 0, "http with a writeKey");
  assert.equal(h.fetch.calls.length, 1);
});
