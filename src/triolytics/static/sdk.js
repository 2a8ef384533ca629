/* triolytics SDK — hand-written, no build step; docs/sdk.md. Budget: ≤ 5 KB min+gzip.
 *
 * Classic script (/sdk.js): defines globalThis.triolytics.
 * ES module (/sdk.mjs): this file followed by exactly this one footer line:
 *   export default triolytics; export const init = triolytics.init;
 *
 * Runs unchanged in browsers, Node ≥ 22 and React Native: it needs only fetch (and
 * WebSocket for the realtime transport); every other dependency is feature-checked and
 * every one can be injected through init's options (tests do).
 *
 * Rules it keeps:
 * - One buffer Q of Segment-shaped messages, persisted on every change, bounded in
 *   events and bytes (the oldest are dropped, counted, reported through onError).
 * - A message's id (messageId) is made once, when it is tracked, and persisted with
 *   it: a resend is byte-identical, so the server stores it once.
 * - A message leaves Q only when the server acknowledged it as stored, or refused it
 *   for good (reported); so nothing acknowledged is sent again.
 * - flush() settles when every message tracked before it has left Q.
 */
var triolytics = (() => {
  "use strict";
  const VERSION = "0.1.0", G = globalThis;
  // The origin this file was loaded from, the default host of a classic <script>.
  const SRC = G.document?.currentScript?.src;
  const err = (code, message) => Object.assign(Error(message || code), { code });
  const noop = () => {};

  function init(o = {}) {
    const win = "window" in o ? o.window : G.window, doc = "document" in o ? o.document : G.document;
    const nav = "navigator" in o ? o.navigator : G.navigator, loc = win?.location;
    const fetch = o.fetch || ((...a) => G.fetch(...a)), WS = o.WebSocket || G.WebSocket;
    const now = o.now || Date.now, rnd = o.random || (G.crypto?.getRandomValues
      ? () => G.crypto.getRandomValues(new Uint32Array(1))[0] / 2 ** 32 : Math.random);
    const setT = o.setTimeout || setTimeout, clearT = o.clearTimeout || clearTimeout;
    const later = (fn, ms) => { const t = setT(fn, ms); t?.unref?.(); return t };
    const on = (target, name, fn) => target?.addEventListener?.(name, fn);
    const opt = (k, d) => o[k] ?? d;
    const host = opt("host", SRC && new URL(SRC).origin || "").replace(/\/+$/, "");
    const http = opt("transport", o.writeKey ? "http" : "realtime") == "http";
    const flushAt = opt("flushAt", 20), maxEvents = opt("maxEvents", 1000);
    const maxBytes = opt("maxBytes", 500000), P = opt("storagePrefix", "triolytics") + ".";
    const dnt = o.respectDnt && (nav?.doNotTrack == "1" || win?.doNotTrack == "1" ||
      !!nav?.globalPrivacyControl);
    const uuid = () => "10000000-1000-4000-8000-100000000000".replace(/[018]/g,
      c => (c ^ (rnd() * 16) >> c / 4).toString(16));
    const report = (code, message, count) => {
      try { o.onError?.(Object.assign(err(code, message), { count })) } catch {}
    };

    // Storage: an adapter {getItem, setItem, removeItem} (sync or async), else
    // localStorage when it works, else memory.
    let st = o.storage;
    if (!st) try { st = win.localStorage; st.setItem(P, 1); st.removeItem(P) } catch {
      const m = new Map();
      st = { getItem: k => m.get(k) ?? null, setItem: (k, v) => m.set(k, v), removeItem: k => m.delete(k) };
    }
    const store = (k, v) => {
      if (dnt) return;
      try { (v == null ? st.removeItem(P + k) : st.setItem(P + k, v))?.catch?.(noop) } catch {}
    };

    // The buffer: entries {n: order, m: message, b: bytes, s: in flight (seq or 1)}.
    let Q = [], N = 0, bytes = 0, dropped = 0, waiters = [], closed = false, aid, uid, T;
    const save = () => store("q", JSON.stringify(Q.map(e => e.m)));
    const push = m => {
      const b = JSON.stringify(m).length;
      Q.push({ n: ++N, m, b }); bytes += b;
    };
    const add = m => {
      push(m);
      const gone = [];
      while (Q.length > maxEvents || bytes > maxBytes) { bytes -= Q[0].b; gone.push(Q.shift()) }
      const d = gone.length;
      if (d) { dropped += d; report("buffer_full", `dropped the ${d} oldest events`, d) }
      settle(gone, d && err("buffer_full"));
      T?.send();
    };
    // Take `es` out of Q (acknowledged, or lost for the reason `e`), then settle the
    // flushes: one that waits for a lost message fails, one that waits for none passes.
    const settle = (es, e) => {
      Q = Q.filter(x => !es.includes(x) || (bytes -= x.b, 0));
      save();
      waiters = waiters.filter(w => {
        const bad = e && es.some(x => x.n <= w.mark);
        const ok = !Q.some(x => x.n <= w.mark);
        if (bad || ok) { clearT(w.t); bad ? w.no(e) : w.ok() }
        return !(bad || ok);
      });
    };
    const backoff = (tries, r) => {
      const d = Math.min(opt("maxBackoff", 60000), opt("minBackoff", 1000) * 2 ** tries);
      return Math.max(d / 2 + rnd() * d / 2, 1000 * r?.headers?.get?.("retry-after") || 0);
    };

    // Messages, Segment-shaped; calls made before storage is read wait for it, keeping
    // the time, page and context of the moment they were made.
    const pre = [];
    let loaded = false;
    const call = fn => (...a) => {
      if (dnt || closed) return;
      const at = { ts: now(), c: http && context(), p: page() };
      loaded ? fn(at, ...a) : pre.push(() => fn(at, ...a));
    };
    const msg = (at, type, x) => {
      const m = { type, messageId: uuid(), timestamp: new Date(at.ts).toISOString(), anonymousId: aid, ...x };
      if (uid != null && m.userId === undefined) m.userId = uid;
      if (http) m.context = at.c;
      add(m);
    };
    const page = () => loc ? { path: loc.pathname, referrer: doc?.referrer, search: loc.search,
      title: doc?.title, url: loc.href } : {};
    const context = () => {
      const s = win?.screen, c = { library: { name: "triolytics.js", version: VERSION } };
      if (nav) { c.locale = nav.language; c.userAgent = nav.userAgent }
      try { c.timezone = Intl.DateTimeFormat().resolvedOptions().timeZone } catch {}
      if (loc) c.page = page();
      if (s) c.screen = { width: s.width, height: s.height, density: win.devicePixelRatio };
      return c;
    };
    const named = (type, auto) => call((at, name, properties) => {
      if (typeof name == "object" && name) { properties = name; name = undefined }
      msg(at, type, { name, properties: { ...auto && at.p, ...name != null && { name }, ...properties } });
    });

    const api = {
      VERSION,
      track: call((at, event, properties) => {
        if (typeof event != "string" || !event || event.length > 200 || /^session_(start|end)$/.test(event))
          return report("invalid_event", `event name ${JSON.stringify(event)} is refused`, 1);
        msg(at, "track", { event, properties: { ...properties } });
      }),
      page: named("page", 1),
      screen: named("screen"),
      identify: call((at, userId, traits) => {
        if (typeof userId == "object" && userId) { traits = userId; userId = null }
        if (userId != null) store("uid", uid = String(userId));
        msg(at, "identify", { traits: { ...traits } });
      }),
      reset: call(() => { uid = null; store("uid"); store("aid", aid = uuid()) }),
      flush: () => new Promise((ok, no) => {
        const go = () => {
          if (closed) return no(err("closed"));
          const w = { mark: N, ok, no };
          w.t = later(() => { waiters = waiters.filter(x => x != w); no(err("timeout")) }, opt("flushTimeout", 10000));
          waiters.push(w);
          settle([]);
          T?.send(1);
        };
        loaded ? go() : pre.push(go);
      }),
      // Counters for tests and dashboards; `dropped` counts events lost to the bounds.
      stats: () => ({ queued: Q.length, bytes, dropped, anonymousId: aid, userId: uid, analyticsId: T?.id() }),
      close: () => {
        closed = true; T?.stop();
        waiters.forEach(w => { clearT(w.t); w.no(err("closed")) }); waiters = [];
      },
    };

    // Start: read storage, then take the calls made meanwhile, then a transport.
    const get = k => Promise.resolve().then(() => dnt ? null : st.getItem(P + k)).catch(noop);
    const ready = api.ready = Promise.all(["aid", "uid", "q"].map(get)).then(([a, u, q]) => {
      if (!(aid = a)) store("aid", aid = uuid());
      uid = u;
      try { JSON.parse(q || "[]").forEach(push) } catch {}
      loaded = true;
      if (!dnt && !closed) T = (http ? httpTransport : realtime)();
      pre.splice(0).forEach(f => f());
      T?.send();
    });

    // HTTP: Segment's /v1/batch, text/plain (no preflight), write key in the body.
    function httpTransport() {
      let busy = 0, tries = 0, timer, retry;
      const post = (es, keepalive) => {
        es.forEach(e => e.s = 1); busy++;
        const body = JSON.stringify({ batch: es.map(e => e.m), sentAt: new Date(now()).toISOString(), writeKey: o.writeKey });
        Promise.resolve().then(() => fetch(host + "/v1/batch", {
          method: "POST", body, keepalive: !!keepalive, credentials: "omit", headers: { "content-type": "text/plain" },
        })).then(async r => {
          const s = r.status, a = await r.json().catch(() => ({}));
          if (s == 408 || s == 429 || s > 499) throw r;
          tries = 0;
          const bad = s < 300 || a.rejected ? (a.rejected || []).map(x => es[x.index]).filter(Boolean) : es;
          const why = a.rejected?.[0] || a.error || { code: "http_" + s };
          settle(es.filter(e => !bad.includes(e)));
          if (bad.length) { report(why.code, why.message, bad.length); settle(bad, err(why.code, why.message)) }
        }).catch(r => {
          es.forEach(e => e.s = 0);
          clearT(retry);
          retry = later(() => { retry = 0; send(1) }, backoff(tries++, r));
        }).finally(() => { busy--; send(waiters.length) });
      };
      // now: send what is unsent even if under flushAt; keepalive: all of it, at once.
      const send = (now, keepalive) => {
        const un = Q.filter(e => !e.s);
        if (!un.length || closed || (retry || busy) && !keepalive) return;
        if (!now && !keepalive && un.length < flushAt) {
          timer ||= later(() => { timer = 0; send(1) }, opt("flushInterval", 5000));
          return;
        }
        // Bodies stay under the server's max_request_bytes (500 KB); keepalive bodies
        // share a 64 KB budget per page: chunks of at most ~60 KB.
        const cap = keepalive ? 6e4 : 3e5;
        for (let i = 0, size = 0, j = 0; j <= un.length; j++) {
          if (j == un.length || j - i == flushAt || size + un[j].b > cap && j > i) {
            if (j > i) post(un.slice(i, j), keepalive);
            if (!keepalive) break;
            i = j; size = 0;
          }
          size += un[j]?.b;
        }
      };
      const away = () => send(1, 1);
      on(win, "pagehide", away);
      on(doc, "visibilitychange", () => doc.visibilityState == "hidden" && away());
      on(win, "online", () => { tries = 0; send(1) });
      return { send, id: noop, stop: () => { clearT(timer); clearT(retry) } };
    }

    // Realtime: POST /create once (the id is kept for good), one WebSocket to
    // /analytics, batches with event ids and a seq, resent until acknowledged.
    function realtime() {
      let ws, rid, seq = 0, tries = 0, retry, hidden = doc?.visibilityState == "hidden", sent = {};
      const id = get("rid").then(r => rid = r);
      // Forget the socket; what it had in flight is unsent again.
      const down = () => {
        const s = ws; ws = null;
        Object.values(sent).flat().forEach(e => e.s = 0); sent = {};
        return s;
      };
      const again = r => { clearT(retry); retry = later(() => { retry = 0; connect() }, backoff(tries++, r)) };
      const connect = async () => {
        if (ws || retry || closed || hidden) return;
        const s = ws = {};
        try {
          await id;
          if (!rid) {
            const r = await fetch(host + "/create", { method: "POST", credentials: "omit" });
            if (!r.ok) throw r;
            store("rid", rid = (await r.json()).analytics_id);
          }
          if (ws != s) return;
          ws = new WS(host.replace(/^http/, "ws") + "/analytics?analytics_id=" + encodeURIComponent(rid));
        } catch (r) { if (ws == s) { ws = null; again(r) } return }
        const w = ws;
        w.onopen = () => { tries = 0; send() };
        w.onmessage = ev => {
          let a, es, i;
          try { a = JSON.parse(ev.data); es = sent[a.seq] } catch {}
          if (!es || ws != w) return;
          delete sent[a.seq];
          if (a.type == "ack") settle(es);
          else {
            es.forEach(e => e.s = 0);
            if (a.code == "unavailable") return w.close(1000);
            // A refused event: drop it alone (the field names it), else the batch.
            i = /^\$\.events\[(\d+)\]/.exec(a.field)?.[1];
            const bad = i ? [es[i]] : es;
            report(a.code, a.message, bad.length);
            settle(bad, err(a.code, a.message));
          }
          send();
        };
        w.onclose = ev => {
          if (ws != w) return;
          down();
          if (ev.code != 1000 || Q.length) again();
        };
      };
      const send = () => {
        if (closed || hidden) return;
        if (ws?.readyState != 1) return connect();
        const un = Q.filter(e => !e.s);
        for (let i = 0; i < un.length && Object.keys(sent).length < 16; i += 100) {
          const es = sent[++seq] = un.slice(i, i + 100);
          es.forEach(e => e.s = seq);
          ws.send(JSON.stringify({ events: es.map(e => wire(e.m)), seq }));
        }
      };
      on(doc, "visibilitychange", () => {
        hidden = doc.visibilityState == "hidden";
        if (hidden) { clearT(retry); retry = 0; down()?.close?.(1000) } else { tries = 0; send() }
      });
      on(win, "online", () => { tries = 0; clearT(retry); retry = 0; send() });
      // Calls within one task go as one batch.
      let soon;
      const kick = () => soon ||= Promise.resolve().then(() => { soon = 0; send() });
      return { send: kick, id: () => rid, stop: () => { clearT(retry); down()?.close?.(1000) } };
    }

    // A message as the realtime API takes it: type, ts (ms), payload, id.
    const wire = ({ type, event, name, properties, userId, traits, messageId, timestamp }) => ({
      id: messageId, ts: Date.parse(timestamp), type: event || type,
      payload: type == "identify" ? { userId, traits } : properties,
    });

    // Automatic page views, also for single-page apps (history.pushState, popstate).
    if (o.autoPage && loc) {
      let last;
      const auto = () => { if (loc.href != last) { last = loc.href; api.page() } };
      const h = win.history, ps = h?.pushState;
      if (ps) h.pushState = function () { const r = ps.apply(this, arguments); auto(); return r };
      on(win, "popstate", auto);
      auto();
    }
    return api;
  }

  return G.triolytics = { init, VERSION };
})();
