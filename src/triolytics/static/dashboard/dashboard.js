/* triolytics dashboard: fills the page server/dashboard_html.py renders.
 *
 * Hand-written, no build step, no framework; uPlot (uPlot.iife.min.js, loaded first) draws
 * the one chart. Rules:
 * - Figures come from GET /dashboard/figures (the range, the project): on load, when the
 *   range or project changes, and every REFRESH_MS while the tab is visible. A newer
 *   request aborts the one in flight, so an old answer never overwrites a new one.
 * - The live panel listens to GET /dashboard/live (Server-Sent Events; the browser
 *   reconnects by itself): no polling. It keeps the newest MAX_LATEST events.
 * - Runs under the server's CSP: no eval, no inline style; text goes in with
 *   textContent, never innerHTML, so nothing from the data becomes markup.
 * - A 401 means the login is gone: reload, and the server shows the login page.
 * - The range and project live in the URL's fragment, so a reload or a link keeps them.
 */
(() => {
  "use strict";
  const REFRESH_MS = 10000;
  const MAX_LATEST = 50;
  const RANGES = ["today", "24h", "7d", "30d", "custom"];
  const MARKERS = ["session_start", "session_end"];
  const SERIES = {visitors: "Visitors", sessions: "Sessions", events: "Events",
                  views: "Pageviews & screen views"};
  const $ = sel => document.querySelector(sel);
  const $$ = sel => Array.from(document.querySelectorAll(sel));

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // --- formatting
  const whole = new Intl.NumberFormat("en-US");
  const compact = new Intl.NumberFormat("en-US", {notation: "compact", maximumFractionDigits: 1});
  const num = v => v === null || v === undefined ? "–" : Math.abs(v) < 10000
    ? whole.format(Math.round(v)) : compact.format(v);
  const pct = v => v === null || v === undefined ? "–" : `${Math.round(v * 1000) / 10}%`;
  function duration(ms) {
    if (ms === null || ms === undefined) return "–";
    const s = Math.round(ms / 1000);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    return `${Math.floor(s / 3600)}h ${Math.floor(s % 3600 / 60)}m`;
  }
  const FORMAT = {bounce_rate: pct, duration_median_ms: duration, duration_mean_ms: duration};
  const LOWER_IS_BETTER = {bounce_rate: true};
  const pad = n => String(n).padStart(2, "0");
  const clock = d => `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const isoDay = d => `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  const MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(" ");
  const DAYS = "Sun Mon Tue Wed Thu Fri Sat".split(" ");
  // Buckets are UTC hours or days: shown as such, whatever the browser's zone.
  function bucketLabel(ts, interval) {
    const d = new Date(ts * 1000);
    const day = `${DAYS[d.getUTCDay()]} ${d.getUTCDate()} ${MONTHS[d.getUTCMonth()]}`;
    return interval === "hour" ? `${day}, ${pad(d.getUTCHours())}:00 UTC` : day;
  }

  // --- state: range, project, charted series (the URL fragment keeps the first two)
  const state = {range: "7d", since: "", until: "", project: "", series: "visitors"};
  function readHash() {
    const h = new URLSearchParams(location.hash.slice(1));
    if (RANGES.includes(h.get("range"))) state.range = h.get("range");
    state.since = h.get("since") || "";
    state.until = h.get("until") || "";
    state.project = h.get("project") || "";
    if (state.range === "custom" && !(state.since && state.until)) state.range = "7d";
  }
  function writeHash() {
    const h = new URLSearchParams({range: state.range});
    if (state.range === "custom") { h.set("since", state.since); h.set("until", state.until); }
    if (state.project) h.set("project", state.project);
    history.replaceState(null, "", "#" + h);
  }
  function query() {
    const q = new URLSearchParams({range: state.range});
    if (state.range === "custom") { q.set("since", state.since); q.set("until", state.until); }
    if (state.project) q.set("project", state.project);
    return q;
  }

  // --- the figures
  let inflight = null;
  let lastFigures = null;

  function showError(message) {
    const e = $("#error");
    e.textContent = message || "";
    e.hidden = !message;
  }

  async function refresh() {
    if (inflight) inflight.abort();
    const ctl = inflight = new AbortController();
    const mine = () => inflight === ctl;  // only the newest request may show its answer
    let answer, body = null;
    try {
      answer = await fetch("/dashboard/figures?" + query(), {
        signal: ctl.signal, credentials: "same-origin", headers: {Accept: "application/json"}});
      body = await answer.json().catch(() => null);
    } catch (err) {
      if (mine()) {
        inflight = null;
        showError("Cannot reach the server; the figures shown may be old.");
      }
      return;
    }
    if (!mine()) return;
    inflight = null;
    if (answer.status === 401) { location.reload(); return; }
    if (!answer.ok || !body) {
      const message = body && body.error && body.error.message;
      showError(message || `The server answered ${answer.status}.`);
      return;
    }
    showError("");
    lastFigures = body;
    render(body);
  }

  function render(f) {
    renderOverview(f.overview || {});
    renderChart(f.series);
    for (const [key, list] of Object.entries(f.top || {})) renderBars(key, list);
    renderProjects(f.projects || []);
    const r = f.range || {};
    const day = s => (s || "").slice(0, 16).replace("T", " ");
    $("#generated").textContent = `${day(r.since)} – ${day(r.until)} UTC, by ${r.interval}` +
      ` · computed ${clock(f.generated_at ? new Date(f.generated_at) : new Date())}`;
    document.body.dataset.range = r.name;
    document.body.dataset.loaded = String(Date.now());
  }

  function renderOverview(overview) {
    for (const card of $$(".card")) {
      const key = card.dataset.figure;
      const fig = overview[key] || {};
      const format = FORMAT[key] || num;
      const value = card.querySelector(".value");
      value.textContent = format(fig.value);
      value.title = fig.value === null || fig.value === undefined ? "" : String(fig.value);
      card.dataset.value = fig.value === null || fig.value === undefined ? "" : fig.value;
      const change = card.querySelector(".change");
      change.className = "change";
      change.textContent = "";
      if (fig.change === null || fig.change === undefined) {
        change.textContent = fig.previous ? "" : "no previous data";
      } else {
        const up = fig.change > 0;
        const arrow = fig.change === 0 ? "" : up ? "▲ " : "▼ ";
        change.textContent = arrow + `${Math.abs(Math.round(fig.change * 1000) / 10)}%`;
        if (fig.change !== 0) change.classList.add(up !== !!LOWER_IS_BETTER[key] ? "good" : "bad");
      }
      change.title = `previous period: ${format(fig.previous)}`;
      if (fig.previous !== null && fig.previous !== undefined && fig.change !== null &&
          fig.change !== undefined) change.append(el("small", "", `vs ${format(fig.previous)}`));
    }
  }

  function renderBars(key, list) {
    const ol = $(`#top-${key}`);
    if (!ol) return;
    const max = Math.max(1, ...list.map(item => item[1]));
    const items = list.map(([name, count]) => {
      const li = el("li");
      const fill = el("span", "fill");
      fill.style.width = `${(count / max) * 100}%`;
      const label = key === "referrers" && name === "" ? "Direct / none" : name || "(none)";
      const k = el("span", name === "" ? "key direct" : "key", label);
      k.title = label;
      li.append(fill, k, el("span", "n", num(count)));
      li.dataset.key = name;
      li.dataset.count = count;
      return li;
    });
    ol.replaceChildren(...(items.length ? items : [el("li", "none", "No data in this range")]));
  }

  function renderProjects(projects) {
    const select = $("#project");
    const have = new Set(Array.from(select.options, o => o.value));
    for (const p of projects) {
      if (!have.has(p)) select.append(new Option(p, p));
    }
    select.value = state.project;
  }

  // --- the chart: one series over UTC hours or days (the server picks)
  let chart = null;
  let chartKey = "";
  let selectedCard = "visitors";  // the card charted (two cards chart "views")
  const tip = el("div", "tip");
  tip.hidden = true;

  function chartSize() {
    const box = $("#chart");
    return {width: Math.max(200, box.clientWidth), height: Math.max(150, box.clientHeight)};
  }

  function renderChart(series) {
    const box = $("#chart");
    $("#chart-title").textContent = SERIES[state.series];
    for (const card of $$(".card[data-series]")) {
      card.classList.toggle("selected", card.dataset.figure === selectedCard);
    }
    if (!series || typeof uPlot === "undefined") return;
    $("#chart-unit").textContent = series.interval === "hour" ? "by hour, UTC" : "by day, UTC";
    const xs = series.buckets.map(b => Date.parse(b) / 1000);
    const ys = series[state.series] || [];
    const key = `${state.series}/${series.interval}`;
    if (chart && key === chartKey) {
      chart.setData([xs, ys]);
      return;
    }
    if (chart) chart.destroy();
    chartKey = key;
    const interval = series.interval;
    const axis = {stroke: "#6b7280", font: "12px system-ui, sans-serif",
                  ticks: {show: false}, grid: {stroke: "#f1f2f4", width: 1}};
    chart = new uPlot({
      ...chartSize(),
      legend: {show: false},
      cursor: {drag: {x: false, y: false}, points: {size: 8, fill: "#4f46e5"}},
      scales: {x: {time: true}, y: {range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1]}},
      tzDate: ts => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      axes: [{...axis, size: 30, grid: {show: false}, splits: u => xTicks(u.data[0], u.width - 60, interval),
              values: (u, ticks) => ticks.map(t => tickLabel(t, interval))},
             {...axis, size: 48, values: (u, ticks) => ticks.map(num)}],
      series: [{}, {label: SERIES[state.series], stroke: "#4f46e5", width: 2,
                    fill: "rgba(79, 70, 229, 0.08)", points: {show: xs.length < 40}}],
      hooks: {setCursor: [u => moveTip(u, interval)]},
    }, [xs, ys], box);
    chart.over.append(tip);
  }

  // Ticks about 80 px apart: hours on a round step (1..24 h, aligned to UTC hours),
  // days every k-th from the first.
  function xTicks(xs, width, interval) {
    const room = Math.max(2, Math.floor(width / 80));
    if (interval !== "hour") {
      const k = Math.ceil(xs.length / room);
      return xs.filter((x, i) => i % k === 0);
    }
    const step = [1, 2, 3, 4, 6, 12, 24].find(k => xs.length / k <= room) || 24;
    return xs.filter(x => Math.round(x / 3600) % step === 0);
  }

  function tickLabel(ts, interval) {
    const d = new Date(ts * 1000);
    const day = `${d.getUTCDate()} ${MONTHS[d.getUTCMonth()]}`;
    return interval === "hour" && d.getUTCHours() ? `${pad(d.getUTCHours())}:00` : day;
  }

  function moveTip(u, interval) {
    const i = u.cursor.idx;
    if (i === null || i === undefined || u.cursor.left < 0) { tip.hidden = true; return; }
    tip.hidden = false;
    tip.replaceChildren(el("b", "", num(u.data[1][i])), bucketLabel(u.data[0][i], interval));
    tip.style.left = `${u.valToPos(u.data[0][i], "x")}px`;
    tip.style.top = `${u.valToPos(u.data[1][i] || 0, "y")}px`;
  }

  function selectSeries(card) {
    state.series = card.dataset.series;
    selectedCard = card.dataset.figure;
    if (lastFigures) renderChart(lastFigures.series);
  }

  // --- the live panel (SSE) and its latest events
  const latest = [];
  let source = null;

  function connectLive() {
    if (source) source.close();
    source = new EventSource("/dashboard/live");
    const stateText = $("#live-state");
    source.onopen = () => {
      $("#live-dot").classList.add("on");
      stateText.textContent = "connected";
    };
    source.onerror = () => {
      $("#live-dot").classList.remove("on");
      if (source.readyState === EventSource.CLOSED) {
        stateText.textContent = "disconnected";
        refresh();  // a 401 there means the login expired: back to the login page
        setTimeout(connectLive, 5000);
      } else {
        stateText.textContent = "reconnecting…";
      }
    };
    source.addEventListener("live", event => {
      let msg;
      try { msg = JSON.parse(event.data); } catch (err) { return; }
      $("#open-sessions").textContent = num(msg.open_sessions);
      $("#events-per-s").textContent = msg.events_per_s === null ||
        msg.events_per_s === undefined ? "–" : msg.events_per_s < 10
          ? String(Math.round(msg.events_per_s * 10) / 10) : num(msg.events_per_s);
      addLatest(msg.latest || []);
    });
  }

  function addLatest(events) {
    if (!events.length) return;
    const seen = new Set(latest.map(e => e.seq));
    // (the server's session_start/session_end rows are bookkeeping, not events)
    const fresh = events.filter(e => !seen.has(e.seq) && !MARKERS.includes(e.type));
    latest.unshift(...fresh);  // the server sends the newest first
    latest.sort((a, b) => b.seq - a.seq);
    latest.length = Math.min(latest.length, MAX_LATEST);
    renderLatest(new Set(fresh.map(e => e.seq)));
  }

  function renderLatest(fresh) {
    const shown = latest.filter(e => !state.project || e.project === state.project);
    const items = shown.map(e => {
      const li = el("li", fresh && fresh.has(e.seq) ? "new" : "");
      const b = el("button");
      b.type = "button";
      b.dataset.session = e.session_id || "";
      b.dataset.project = e.project || "";
      b.dataset.seq = e.seq;
      const when = new Date(e.timestamp);
      const t = el("span", "t", isNaN(when) ? "" : clock(when));
      t.title = e.timestamp;
      const name = e.name || e.type;
      const who = [e.visitor, e.type !== name ? e.type : "", e.project].filter(Boolean);
      b.append(t, el("span", "name", name), el("span", "who", who.join(" · ")));
      b.disabled = !e.session_id;
      li.append(b);
      return li;
    });
    $("#latest").replaceChildren(...(items.length ? items
      : [el("li", "empty", "Waiting for events…")]));
  }

  // --- the session explorer: one session's events, in order
  let explorer = 0;  // which opening of the dialog the answers are for

  async function openSession(sessionId, project, seq) {
    const dialog = $("#session");
    const turn = ++explorer;
    $("#session-meta").textContent = `${sessionId}${project ? " · " + project : ""}`;
    $("#session-events").replaceChildren(el("li", "", "Loading…"));
    if (!dialog.open) dialog.showModal();
    // The live event may be a moment ahead of the database (loads run every second):
    // ask again, a few times, until the session holds it.
    for (let tries = 0; tries < 10 && turn === explorer && dialog.open; tries++) {
      const q = new URLSearchParams({id: sessionId});
      if (project) q.set("project", project);
      let body = null;
      try {
        const answer = await fetch("/dashboard/session?" + q, {credentials: "same-origin"});
        if (answer.status === 401) { location.reload(); return; }
        body = answer.ok ? await answer.json() : null;
      } catch (err) { body = null; }
      if (turn !== explorer) return;
      if (body) {
        renderSession(body, seq);
        if (body.events.some(e => e.seq === seq)) return;
      }
      await new Promise(done => setTimeout(done, 500));
    }
  }

  function renderSession(body, seq) {
    const events = body.events || [];
    const items = events.map(e => {
      const marker = MARKERS.includes(e.type);
      const li = el("li", (marker ? "marker" : "") + (e.seq === seq ? " hit" : ""));
      li.dataset.seq = e.seq;
      const when = new Date(e.timestamp);
      const t = el("span", "t", isNaN(when) ? "" : clock(when));
      t.title = `at ${e.timestamp}, received ${e.received_at}`;
      const what = el("span");
      const p = e.properties || {};
      if (e.type === "session_start") {
        what.append(el("span", "kind", "session started"));
      } else if (e.type === "session_end") {
        const n = p.event_count === undefined ? "" : `, ${p.event_count} events`;
        what.append(el("span", "kind", `session ended (${duration(p.duration_ms)}${n})`));
      } else {
        what.append(el("span", "kind", e.event || e.name || e.type));
        if (e.event || e.name) what.append(el("span", "type", e.type));
      }
      li.append(t, what);
      if (!marker && Object.keys(p).length) li.append(el("pre", "", JSON.stringify(p, null, 2)));
      return li;
    });
    const real = events.filter(e => !MARKERS.includes(e.type));
    $("#session-title").textContent = `Session · ${real.length} event${real.length === 1 ? "" : "s"}`;
    $("#session-events").replaceChildren(...(items.length ? items
      : [el("li", "", "No stored events for this session yet.")]));
    const hit = $("#session-events .hit");
    if (hit) hit.scrollIntoView({block: "nearest"});
  }

  // --- controls
  function setRange(range) {
    state.range = range;
    const custom = $("#custom");
    custom.hidden = range !== "custom";
    for (const b of $$("[data-range]")) {
      b.setAttribute("aria-pressed", String(b.dataset.range === range));
    }
    if (range === "custom") {
      const today = new Date();
      const since = custom.elements.since;
      const until = custom.elements.until;
      if (!since.value) since.value = state.since || isoDay(new Date(today - 6 * 864e5));
      if (!until.value) until.value = state.until || isoDay(today);
      if (!(state.since && state.until)) return;  // until Apply
    }
    writeHash();
    refresh();
  }

  function start() {
    readHash();
    for (const b of $$("[data-range]")) {
      b.addEventListener("click", () => setRange(b.dataset.range));
    }
    $("#custom").addEventListener("submit", event => {
      event.preventDefault();
      const f = event.target.elements;
      if (f.since.value > f.until.value) { showError("The start date is after the end date."); return; }
      state.since = f.since.value;
      state.until = f.until.value;
      setRange("custom");
    });
    $("#project").addEventListener("change", event => {
      state.project = event.target.value;
      writeHash();
      renderLatest(null);
      refresh();
    });
    for (const card of $$(".card[data-series]")) {
      card.addEventListener("click", () => selectSeries(card));
      card.addEventListener("keydown", event => {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); selectSeries(card); }
      });
    }
    $("#latest").addEventListener("click", event => {
      const b = event.target.closest("button[data-session]");
      if (b && b.dataset.session) openSession(b.dataset.session, b.dataset.project, Number(b.dataset.seq));
    });
    $("#session").addEventListener("close", () => { explorer++; });
    new ResizeObserver(() => { if (chart) chart.setSize(chartSize()); }).observe($("#chart"));
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
    setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
    $("#project").value = state.project;
    setRange(state.range);
    connectLive();
  }

  start();
})();
