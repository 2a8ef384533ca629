"""Per-event cost of each step of the ingest pipeline, on one core, without HTTP.

Decodes and normalizes `/v1/batch` bodies of 100 events (the `http_capture.py` batch of
100 identical events, and a batch as an SDK sends one, whose events differ),
encodes journal records, builds the Arrow batch and loads DuckDB in row-group-sized
transactions, and prints µs per stored row for each step as JSON: once with batches
taken by column (`batch_columns`, the server's path) and once event by event (`to_row`,
the path every batch took before, and still takes when an event needs a closer look).
Pin it for steadier figures: `taskset -c 0 .venv/bin/python bench/pipeline.py`.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import triolytics.core.collector as collector_module
from triolytics.core.capture import RequestMeta, batch_columns
from triolytics.core.collector import Collector
from triolytics.core.config import Config
from triolytics.core.journal import Position
from triolytics.core.rows import encode_part
from triolytics.storage.store import Store, rows_to_arrow, wide_to_arrow

EVENT = (b'{"type":"track","event":"Button Clicked","anonymousId":'
         b'"550e8400-e29b-41d4-a716-446655440000","properties":{"button_id":"signup_hero",'
         b'"color":"blue"}}')
BODY = b'{"batch":[' + b",".join([EVENT] * 100) + b"]}"
def varied(request: int) -> bytes:
    """A batch as an SDK sends one: each event its own messageId, timestamp, properties."""
    return json.dumps({"sentAt": "2026-01-01T00:00:10Z", "batch": [
        {"type": "track" if i % 4 else "page", "event": f"Event {i % 7}", "name": "Home",
         "anonymousId": "550e8400-e29b-41d4-a716-446655440000", "userId": "u_8823",
         "messageId": f"ajs-next-{request:06d}-{i:04d}",
         "timestamp": f"2026-01-01T00:00:0{i % 10}Z",
         "context": {"library": {"name": "analytics.js", "version": "1.2"},
                     "page": {"path": "/"}},
         "properties": {"button_id": f"b{i}", "value": i * 1.5}} for i in range(100)]}).encode()


HEADERS = {b"x-write-key": b"wk_bench", b"content-type": b"application/json"}
REQUESTS = 1229  # 122,900 events: one DuckDB row group per load


def per_event(seconds: float, events: int) -> float:
    return round(seconds / events * 1e6, 3)


def measure(by_column: bool, bodies: list[bytes]) -> dict:
    """µs per stored row of each step, with `/v1/batch` taken by column or (as every
    batch was before `batch_columns`) event by event."""
    collector = Collector(Config(), {"wk_bench": "default"})
    meta = RequestMeta(time.time_ns() // 1000, "127.0.0.1", "bench/1.0")
    collector_module.batch_columns = batch_columns if by_column else lambda *a, **k: None
    start = time.perf_counter()
    accepted = [collector.batch(HEADERS, body, meta) for body in bodies]
    decode = time.perf_counter() - start
    rows = [r for a in accepted for r in a.rows]
    columns = [a.columns for a in accepted if a.columns is not None]
    count = len(rows) + sum(c.count for c in columns)
    start = time.perf_counter()
    for a in accepted:
        for part in (a.rows, a.columns):
            if part:
                encode_part(part)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    rows_to_arrow(rows)
    if columns:
        wide_to_arrow(columns)
    arrow = time.perf_counter() - start
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "events.duckdb")
        for i in range(5):
            start = time.perf_counter()
            store.load(rows, Position(1, i), columns)
            loads.append(time.perf_counter() - start)
        store.close()
    load = sorted(loads)[len(loads) // 2]
    steps = {"decode_validate_normalize": per_event(decode, count),
             "journal_encode": per_event(encode, count),
             "arrow_batch": per_event(arrow, count),
             "duckdb_load_incl_arrow_median": per_event(load, count)}
    total = steps["decode_validate_normalize"] + steps["journal_encode"] + \
        steps["duckdb_load_incl_arrow_median"]
    return {"rows": count, "us_per_row": steps,
            "sum_us_per_row_without_http": round(total, 3),
            "rows_per_s_bound_without_http": round(1e6 / total)}


def main() -> None:
    report = {"machine": {
        "python": platform.python_version(), "cpu": platform.processor(),
        "versions": {p: version(p) for p in ("msgspec", "duckdb", "pyarrow")}}}
    sdk = [varied(r) for r in range(REQUESTS)]
    for name, bodies in (("bench_batch", [BODY] * REQUESTS), ("sdk_batch", sdk)):
        results = {"by_column": measure(True, bodies), "by_event": measure(False, bodies)}
        report[name] = {
            **results,
            "by_column_speedup": round(results["by_event"]["sum_us_per_row_without_http"]
                                       / results["by_column"]["sum_us_per_row_without_http"],
                                       2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
