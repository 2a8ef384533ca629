"""Sessions at scale: memory per live session, `touch` per event, and event-loop lag while
100,000 sessions end at the same instant.

In one process, no sockets:
  memory  N (1,000,000) live sessions in a `Sessions`, keyed as the WebSocket keys them,
          `("default", "ws", analytics_id)` with 38-character ids from `Identities.issue`.
          Bytes per session from VmRSS and from tracemalloc (the key and its id counted,
          since the session keeps them alive), and the part that is the key.
  touch   ns per event of `Sessions.touch` on live sessions (random order, no rows made),
          next to a bare `dict.get` loop over the same keys (the floor); and ns per
          session opened (new id, heap push, session_start row).
  lag     one trio run per `session_end_chunk_rows` value: a real `Writer` on a temporary
          data directory (fsync always) and `triolytics.server.reaper.reap_sessions` with an
          injected wall clock derived from `trio.current_time()`. N live sessions, of which
          E (100,000) share one deadline, LEAD seconds into the run. A probe task sleeps
          1 ms in a loop and records the overshoot. Reported: lag p50/p99/max while the E
          sessions end (deadline → every session_end row journaled), the same before the
          deadline (idle) and while the rows load into DuckDB, the time until all are
          journaled, the reaper's steps, full GC collections, and a count check (DuckDB
          holds exactly E session_end rows, one per expired session, stamped at the
          deadline). Target: lag p99 ≤ 20 ms.
The garbage collector is set as `serve` sets it (young threshold 20,000); the sessions are
not frozen (they were made at run time), unless --freeze. The process is pinned to one CPU
(--cpu, default 0); its threads (fsync, DuckDB loads) share it, as in `serve`.
Prints one JSON document (machine, versions, config, results, targets) to stdout;
progress goes to stderr; the exit status is 1 if a count check failed.

    .venv/bin/python bench/sessions.py [--sessions N] [--expiring E] [--chunks 500,2000,10000]
                                       [--repeat R] [--cpu C] [--freeze] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc
from functools import partial
from pathlib import Path

import duckdb
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ws_stream import busy_cpu_seconds, log, machine, percentile  # noqa: E402

from triolytics.core.capture import new_id  # noqa: E402
from triolytics.core.config import Config  # noqa: E402
from triolytics.core.dedup import Dedup  # noqa: E402
from triolytics.core.identity import Identities, new_secret  # noqa: E402
from triolytics.core.journal import Journal  # noqa: E402
from triolytics.core.sessions import Sessions  # noqa: E402
from triolytics.server.app import GC_YOUNG_THRESHOLD  # noqa: E402
from triolytics.server.reaper import reap_sessions  # noqa: E402
from triolytics.storage.store import Store  # noqa: E402
from triolytics.storage.writer import Writer  # noqa: E402

TARGET_LAG_P99_MS = 20.0
TIMEOUT_US = 1800 * 1_000_000  # session_timeout_s default
BASE_US = 1_706_859_000_000_000  # the injected wall clock's start: 2024-02-02T07:30:00Z
PROBE_S = 0.001  # the lag probe's sleep
SETTLE_S = 0.3  # after start-up, before the idle window is measured
ROWS_FLUSH = 10_000  # session_start rows dropped every this many opens (bench only)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def make_ids(n: int) -> list[str]:
    identities = Identities(new_secret(), 0)
    return [identities.issue() for _ in range(n)]


def open_all(sessions: Sessions, ids: list[str], now_of) -> None:
    """One touch per id: each opens a session (its session_start row is dropped)."""
    rows: list = []
    touch = sessions.touch
    for i, aid in enumerate(ids):
        touch(("default", "ws", aid), aid, None, now_of(i), rows)
        if len(rows) >= ROWS_FLUSH:
            rows.clear()


# --- memory and touch ------------------------------------------------------------------


def measure_memory(ids: list[str]) -> dict:
    n = len(ids)
    # Pass 1: RSS. The key tuples and id strings are made inside the build, as each
    # session keeps its own key alive; `ids` are copies.
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    sessions = Sessions(TIMEOUT_US, new_id)
    open_all(sessions, [aid.encode().decode() for aid in ids], lambda i: BASE_US + i)
    build_s = time.perf_counter() - start
    gc.collect()
    rss_per = (rss_bytes() - before) / n
    assert len(sessions) == n
    touch = measure_touch(sessions)
    del sessions
    gc.collect()
    # Pass 2: tracemalloc, the keys apart from the rest.
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    keys = [("default", "ws", aid.encode().decode()) for aid in ids]
    keys_bytes = tracemalloc.get_traced_memory()[0] - base - sys.getsizeof(keys)
    sessions = Sessions(TIMEOUT_US, new_id)
    rows: list = []
    for i, key in enumerate(keys):
        sessions.touch(key, key[2], None, BASE_US + i, rows)
        if len(rows) >= ROWS_FLUSH:
            rows.clear()
    rows.clear()
    gc.collect()
    total = tracemalloc.get_traced_memory()[0] - base - sys.getsizeof(keys)
    tracemalloc.stop()
    del sessions, keys
    gc.collect()
    return {
        "sessions": n,
        "id_chars": len(ids[0]),
        "rss_bytes_per_session": round(rss_per),
        "traced_bytes_per_session": round(total / n),
        "traced_key_bytes_per_session": round(keys_bytes / n),
        "traced_session_bytes_excluding_key": round((total - keys_bytes) / n),
        "rss_mib_total": round(rss_per * n / 2**20, 1),
        "open_ns_per_session": round(build_s / n * 1e9),
        **touch,
    }


def measure_touch(sessions: Sessions, rounds: int = 3) -> dict:
    """ns per `touch` of a live session (no rows made), random key order; best of rounds."""
    keys = list(sessions.live)
    random.Random(1).shuffle(keys)
    live = sessions.live
    touch = sessions.touch
    rows: list = []
    best_touch = best_floor = float("inf")
    for r in range(rounds):
        now = BASE_US + len(keys) + (r + 1) * 1_000_000
        start = time.perf_counter_ns()
        for key in keys:
            touch(key, key[2], None, now, rows)
        best_touch = min(best_touch, time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        for key in keys:
            live.get(key)
        best_floor = min(best_floor, time.perf_counter_ns() - start)
    assert not rows, "a live session was reopened"
    return {"touch_ns_per_event": round(best_touch / len(keys)),
            "dict_get_floor_ns": round(best_floor / len(keys))}


# --- event-loop lag while E sessions end at once -----------------------------------------


def make_writer(data: Path, chunk: int) -> Writer:
    config = Config(data_dir=str(data), fsync="always", session_end_chunk_rows=chunk)
    store = Store(data / "events.duckdb", threads=config.duckdb_threads)
    journal = Journal(data / "journal", config.journal_segment_bytes, sync_on_rotate=True)
    writer = Writer(config, journal, store,
                    Dedup(config.dedup_window_s * 1_000_000, config.dedup_max_ids))
    writer.recover()
    return writer


def summary_ms(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"samples": len(ordered),
            "p50_ms": round(percentile(ordered, 50) * 1e3, 3),
            "p99_ms": round(percentile(ordered, 99) * 1e3, 3),
            "max_ms": round(ordered[-1] * 1e3, 3) if ordered else None}


class GcWatch:
    """Full (generation 2) collections and their pause, by trio time."""

    def __init__(self) -> None:
        self.full: list[tuple[float, float]] = []  # (trio time at end, seconds)
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.full.append((trio.current_time(), time.perf_counter() - self._start))


async def lag_run(sessions: Sessions, writer: Writer, chunk: int, expiring: int,
                  lead_s: float) -> dict:
    samples: list[tuple[float, float, float]] = []  # (sleep start, wake time, overshoot s)
    marks: dict[str, float] = {}
    steps: list[tuple[float, int]] = []  # (time journaled, rows) per reaper step
    store_rows = writer.store_rows
    expire = sessions.expire
    expire_s: list[float] = []  # the reaper's own work per step, on the event loop

    def timed_expire(now, limit):
        start = time.perf_counter()
        try:
            return expire(now, limit)
        finally:
            expire_s.append(time.perf_counter() - start)
    sessions.expire = timed_expire

    async def timed_store_rows(rows, keys=None):
        await store_rows(rows, keys)
        steps.append((trio.current_time(), len(rows)))
        if sum(n for _, n in steps) >= expiring and "journaled" not in marks:
            marks["journaled"] = trio.current_time()
    writer.store_rows = timed_store_rows

    async def probe():
        while True:
            t = trio.current_time()
            await trio.sleep(PROBE_S)
            woke = trio.current_time()
            samples.append((t, woke, woke - t - PROBE_S))
            if "journaled" in marks and writer.stats.loaded_rows >= expiring:
                marks.setdefault("loaded", woke)
            if woke >= marks["deadline"] and "loads_at_deadline" not in marks:
                marks["loads_at_deadline"] = writer.stats.loads
            if "journaled" in marks and "loads_at_journaled" not in marks:
                marks["loads_at_journaled"] = writer.stats.loads + writer._store_lock.locked()

    gc_watch = GcWatch()
    gc.callbacks.append(gc_watch)
    cpu0, busy0 = time.process_time(), busy_cpu_seconds()
    try:
        async with trio.open_nursery() as root:
            await root.start(writer.run)
            async with trio.open_nursery() as tasks:
                t0 = trio.current_time()
                marks["deadline"] = t0 + lead_s

                def clock() -> int:  # the injected wall clock, ns
                    return (BASE_US * 1000) + int((trio.current_time() - t0) * 1e9)
                tasks.start_soon(probe)
                await tasks.start(partial(reap_sessions, sessions, writer, chunk, clock))
                with trio.fail_after(lead_s + 300):
                    while "loaded" not in marks:
                        await trio.sleep(0.05)
                await trio.sleep(0.2)
                tasks.cancel_scope.cancel()
            writer.close()
    finally:
        gc.callbacks.remove(gc_watch)
        writer.store_rows = store_rows
        del sessions.expire
    wall = trio.current_time() - t0
    cpu, busy = time.process_time() - cpu0, busy_cpu_seconds() - busy0
    d, j, loaded = marks["deadline"], marks["journaled"], marks["loaded"]

    def window(lo, hi):  # the probe sleeps that overlap [lo, hi]
        return [lag for t, woke, lag in samples if woke >= lo and t <= hi]
    full_gc = [round(s * 1e3, 1) for t, s in gc_watch.full if d <= t <= loaded]
    steps_ms = sorted(x * 1e3 for x in expire_s)
    return {
        "session_end_chunk_rows": chunk,
        "lag_while_expiring": summary_ms(window(d, j)),
        "lag_idle_before": summary_ms([lag for t, woke, lag in samples
                                       if t >= t0 + SETTLE_S and woke < d]),
        "lag_while_loading_duckdb": summary_ms(window(j, loaded)),
        "journaled_all_s": round(j - d, 3),
        "loaded_all_s": round(loaded - d, 3),
        "reaper_steps": len(steps),
        "rows_per_step_max": max(n for _, n in steps),
        "expire_step_ms": {"p50": round(percentile(steps_ms, 50), 2),
                           "max": round(steps_ms[-1], 2)},
        "expire_us_per_row": round(sum(steps_ms) * 1e3 / expiring, 2),
        "duckdb_loads_during_expiry": marks["loads_at_journaled"] - marks["loads_at_deadline"],
        "full_gc_collections_ms": full_gc,
        "cpu_util": round(cpu / wall, 2),
        "other_cpu_util": round(max(0.0, busy - cpu) / wall, 2),
        "meets_target": summary_ms(window(d, j))["p99_ms"] <= TARGET_LAG_P99_MS,
    }


def count_check(data: Path, expiring: int, deadline_us: int) -> dict:
    conn = duckdb.connect(str(data / "events.duckdb"), read_only=True)
    try:
        rows, sids, aids, lo, hi, props = conn.execute(
            "SELECT count(*), count(DISTINCT session_id), count(DISTINCT anonymous_id), "
            "min(epoch_us(timestamp)), max(epoch_us(timestamp)), "
            "count(*) FILTER (WHERE properties->>'event_count' = '1') "
            "FROM events WHERE type = 'session_end'").fetchone()
        other = conn.execute("SELECT count(*) FROM events WHERE type <> 'session_end'"
                             ).fetchone()[0]
    finally:
        conn.close()
    ok = rows == sids == aids == props == expiring and lo == hi == deadline_us and other == 0
    return {"session_end_rows": rows, "distinct_sessions": sids, "other_rows": other,
            "stamped_at_deadline": lo == hi == deadline_us, "count_ok": ok}


def measure_lag(ids: list[str], expiring: int, chunk: int, lead_s: float,
                freeze: bool) -> dict:
    n, every = len(ids), len(ids) // expiring
    deadline_us = BASE_US + int(lead_s * 1e6)
    # Every `every`-th session went idle one timeout before the deadline; the rest are fresh.
    idle_since = deadline_us - TIMEOUT_US
    sessions = Sessions(TIMEOUT_US, new_id)
    open_all(sessions, ids, lambda i: idle_since if i % every == 0 else BASE_US)
    expected = sum(1 for i in range(n) if i % every == 0)
    with tempfile.TemporaryDirectory(prefix="triolytics-sessions-") as tmp:
        data = Path(tmp)
        writer = make_writer(data, chunk)
        gc.collect()
        if freeze:
            gc.freeze()
        try:
            result = trio.run(lag_run, sessions, writer, chunk, expected, lead_s)
        finally:
            gc.unfreeze()
        result["expired"] = sessions.ended
        result["live_after"] = len(sessions)
        result.update(count_check(data, expected, deadline_us))
        result["count_ok"] = (result["count_ok"] and sessions.ended == expected
                              and len(sessions) == n - expected)
    del sessions
    gc.collect()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=1_000_000, help="live sessions")
    p.add_argument("--expiring", type=int, default=100_000, help="sessions ending at once")
    p.add_argument("--chunks", default="500,2000,10000", help="session_end_chunk_rows values")
    p.add_argument("--lead", type=float, default=1.5,
                   help="seconds from the start of a run to the common deadline")
    p.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    p.add_argument("--freeze", action="store_true",
                   help="gc.freeze() the sessions (as if restored at start-up)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per chunk value; the run with the median p99 is reported")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)  # as `serve` sets it
    log(f"making {args.sessions:,} analytics_ids")
    ids = make_ids(args.sessions)
    results: dict = {}
    if not args.skip_memory:
        log("memory and touch")
        results["memory"] = measure_memory(ids)
        log(json.dumps(results["memory"]))
    results["lag"] = {}
    for chunk in [int(c) for c in args.chunks.split(",")]:
        log(f"lag: {args.expiring:,} of {args.sessions:,} sessions end at once, chunk {chunk}")
        runs = []
        for _ in range(args.repeat):
            runs.append(measure_lag(ids, args.expiring, chunk, args.lead, args.freeze))
            log(json.dumps(runs[-1]))
        runs.sort(key=lambda r: r["lag_while_expiring"]["p99_ms"])
        r = dict(runs[len(runs) // 2])
        r["runs_p99_ms"] = [x["lag_while_expiring"]["p99_ms"] for x in runs]
        r["count_ok"] = all(x["count_ok"] for x in runs)
        results["lag"][f"chunk_{chunk}"] = r
    default_chunk = Config().session_end_chunk_rows
    doc = {
        "machine": machine("triolytics", "trio", "msgspec", "duckdb", "pyarrow"),
        "config": {"sessions": args.sessions, "expiring_at_once": args.expiring,
                   "session_timeout_s": TIMEOUT_US // 1_000_000, "fsync": "always",
                   "lead_s": args.lead, "probe_sleep_ms": PROBE_S * 1e3,
                   "repeat": args.repeat,
                   "pinned_cpu": args.cpu if args.cpu >= 0 else None,
                   "gc_threshold": gc.get_threshold(), "gc_freeze": args.freeze,
                   "default_session_end_chunk_rows": default_chunk},
        "results": results,
        "targets": {"lag_p99_ms_while_expiring": {
            "target": TARGET_LAG_P99_MS,
            "by_chunk": {k: {"p99_ms": v["lag_while_expiring"]["p99_ms"],
                             "met": v["meets_target"], "count_ok": v["count_ok"]}
                         for k, v in results["lag"].items()},
            "met_at_default_chunk": results["lag"].get(f"chunk_{default_chunk}", {})
                                                  .get("meets_target")}},
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not all(r["count_ok"] for r in results["lag"].values()):
        sys.exit(1)  # a session_end row missing, doubled or mis-stamped


if __name__ == "__main__":
    main()
