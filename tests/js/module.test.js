"use strict";
// The file as a classic script (in a fresh global) and as an ES module (with the footer
// the server appends for /sdk.mjs).
const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const vm = require("node:vm");
const { SDK } = require("./fakes.js");

const FOOTER = "export default triolytics; export const init = triolytics.init;";
const source = fs.readFileSync(SDK, "utf8");

test("the header documents the module footer, byte for byte", () => {
  assert.ok(source.slice(0, 600).includes(FOOTER));
});

test("as a classic script it defines globalThis.triolytics and nothing else", () => {
  const context = vm.createContext({});
  const before = new Set(Object.getOwnPropertyNames(vm.runInContext("globalThis", context)));
  vm.runInContext(source, context);
  const added = Object.getOwnPropertyNames(vm.runInContext("globalThis", context)).filter(k => !before.has(k));
  assert.deepEqual(added, ["triolytics"]);
  assert.equal(typeof vm.runInContext("triolytics.init", context), "function");
});

test("with the footer it is an ES module exporting init and the default", async () => {
  const url = "data:text/javascript;base64," + Buffer.from(source + "\n" + FOOTER + "\n").toString("base64");
  const mod = await import(url);
  assert.equal(typeof mod.init, "function");
  assert.equal(mod.default.init, mod.init);
  const t = mod.init({ host: "http://x.test", writeKey: "k", fetch: async () => ({ status: 200, json: async () => ({}) }), window: null, document: null });
  t.track("a");
  await t.flush();
  t.close();
});
