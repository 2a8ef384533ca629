// Fakes for the SDK's environment: a clock with timers, fetch, WebSocket, storage,
// window/document. `make()` starts an SDK instance with all of them injected.
"use strict";
const path = require("node:path");

const SDK = path.join(__dirname, "../../src/triolytics/static/sdk.js");
require(SDK);
const { triolytics } = globalThis;

// Let promise chains and setImmediate callbacks run.
const tick = async (n = 10) => { for (let i = 0; i < n; i++) await new Promise(r => setImmediate(r)) };

class Clock {
  constructor(t = Date.UTC(2026, 0, 2, 3, 4, 5)) { this.t = t; this.timers = new Map(); this.next = 1 }
  now = () => this.t;
  setTimeout = (fn, ms = 0) => { this.timers.set(this.next, { at: this.t + ms, fn }); return this.next++ };
  clearTimeout = id => { this.timers.delete(id) };
  // Run every timer due within `ms`, in time order, letting promises settle between.
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      await tick();
      let best;
      for (const [id, x] of this.timers) if (x.at <= end && (!best || x.at < best[1].at)) best = [id, x];
      if (!best) break;
      this.timers.delete(best[0]);
      this.t = best[1].at;
      best[1].fn();
    }
    this.t = end;
    await tick();
  }
  pending() { return [...this.timers.values()].map(x => x.at - this.t).sort((a, b) => a - b) }
}

const response = ({ status = 200, json = {}, headers = {} } = {}) => ({
  status, ok: status >= 200 && status < 300,
  headers: { get: k => headers[k.toLowerCase()] ?? null },
  json: async () => json,
});

// fetch answering with handler(call) → {status, json, headers} (or a promise of one, or
// an Error to throw); every call is kept with its body parsed.
function fakeFetch(handler = () => ({})) {
  const f = async (url, init = {}) => {
    const call = { url, init, body: init.body ? JSON.parse(init.body) : undefined };
    f.calls.push(call);
    const r = await handler(call, f.calls.length);
    if (r instanceof Error) throw r;
    return response(r);
  };
  f.calls = [];
  f.batches = () => f.calls.filter(c => c.url.endsWith("/v1/batch"));
  return f;
}

// The server's side of each socket is driven by the test: open(), ack(), reply(),
// drop(code). close() by the SDK is answered by onclose with the same code, later.
function fakeWebSocket() {
  class WS {
    constructor(url) { this.url = url; this.readyState = 0; this.sent = []; this.raw = []; WS.sockets.push(this) }
    send(data) {
      if (this.readyState != 1) throw Error("send on a socket not open");
      this.raw.push(data); this.sent.push(JSON.parse(data));
    }
    close(code = 1000) {
      if (this.readyState > 1) return;
      this.readyState = 2; this.closedWith = code;
      setImmediate(() => this.drop(code));
    }
    open() { this.readyState = 1; this.onopen?.({}) }
    reply(obj) { this.onmessage?.({ data: JSON.stringify(obj) }) }
    ack(seq, extra = {}) { this.reply({ type: "ack", seq, stored: 1, session_id: "s", ...extra }) }
    ackAll() { for (const m of this.sent.splice(0)) this.ack(m.seq) }
    drop(code = 1006) { this.readyState = 3; this.onclose?.({ code }) }
  }
  WS.sockets = [];
  WS.last = () => WS.sockets[WS.sockets.length - 1];
  return WS;
}

function memoryStorage(async = false) {
  const m = new Map();
  const wrap = v => async ? Promise.resolve(v) : v;
  return {
    map: m,
    getItem: k => wrap(m.has(k) ? m.get(k) : null),
    setItem: (k, v) => wrap(void m.set(k, String(v))),
    removeItem: k => wrap(void m.delete(k)),
  };
}

// A browser-like window and document, enough for the SDK.
function fakeBrowser(href = "https://shop.example/cart?x=1") {
  const win = new EventTarget(), doc = new EventTarget();
  // One location object whose fields move, as a browser's does.
  let u = new URL(href);
  win.location = { get href() { return u.href }, get pathname() { return u.pathname }, get search() { return u.search } };
  win.history = { pushState(state, title, url) { u = new URL(url, u) } };
  win.back = url => { u = new URL(url, u); win.dispatchEvent(new Event("popstate")) };
  win.screen = { width: 390, height: 844 };
  win.devicePixelRatio = 3;
  doc.visibilityState = "visible";
  doc.title = "Cart";
  doc.referrer = "https://search.example/";
  const nav = { language: "de-DE", userAgent: "FakeBrowser/1.0" };
  const setVisible = v => { doc.visibilityState = v ? "visible" : "hidden"; doc.dispatchEvent(new Event("visibilitychange")) };
  return { window: win, document: doc, navigator: nav, setVisible };
}

// A seeded random, so jitter is reproducible.
const seeded = (s = 42) => () => (s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;

function make(opts = {}) {
  const clock = opts.clock || new Clock();
  const fetch = opts.fetch || fakeFetch(call => call.url.endsWith("/create")
    ? { json: { analytics_id: "0.id-1", metadata: { region: "global" } } } : { json: { success: true } });
  const WebSocket = opts.WebSocket || fakeWebSocket();
  const storage = opts.storage || memoryStorage();
  const errors = [];
  const t = triolytics.init({
    host: "http://collector.test", window: null, document: null, navigator: null,
    now: clock.now, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, random: seeded(),
    fetch, WebSocket, storage, onError: e => errors.push(e), ...opts,
  });
  return { t, clock, fetch, WebSocket, storage, errors };
}

module.exports = { SDK, triolytics, tick, Clock, fakeFetch, fakeWebSocket, memoryStorage, fakeBrowser, seeded, make, response };
