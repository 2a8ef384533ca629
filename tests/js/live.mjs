// Drives sdk.js (as the ES module /sdk.mjs is made: the file and its footer) against a
// live server: node live.mjs <host> <writeKey>. Each transport sends its events, then a
// second instance starts from a copy of the first one's stored queue, as a page reloaded
// before the acks came would, and sends them again: the server must store them once.
// Prints one JSON line. Run by tests/test_sdk_js.py; needs a global WebSocket (Node ≥ 22,
// or --experimental-websocket).
import fs from "node:fs";

const [host, writeKey] = process.argv.slice(2);
const FOOTER = "export default triolytics; export const init = triolytics.init;";
const source = fs.readFileSync(new URL("../../src/triolytics/static/sdk.js", import.meta.url), "utf8");
const { init } = await import("data:text/javascript;base64," + Buffer.from(source + "\n" + FOOTER + "\n").toString("base64"));

const errors = [];
const storage = () => { const m = new Map(); return { m, getItem: k => m.get(k) ?? null, setItem: (k, v) => m.set(k, v), removeItem: k => m.delete(k) } };
const out = {};
for (const transport of ["http", "realtime"]) {
  const s = storage();
  const t = init({ host, writeKey, transport, storage: s, onError: e => errors.push(`${e.code}: ${e.message}`) });
  t.track(`sdk_${transport}`, { n: 1 }); t.page("Home"); t.screen("Main"); t.identify("u-sdk", { plan: "pro" });
  await t.ready;
  const queued = s.m.get("triolytics.q");
  await t.flush();
  t.close();
  s.m.set("triolytics.q", queued); // as if the acks had been lost
  const again = init({ host, writeKey, transport, storage: s, onError: e => errors.push(`${e.code}: ${e.message}`) });
  await again.flush();
  again.close();
  out[transport] = { ids: JSON.parse(queued).map(m => m.messageId), analyticsId: again.stats().analyticsId ?? null };
}
console.log(JSON.stringify({ ...out, errors }));
