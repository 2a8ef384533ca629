"""Per-event cost of each step of the ingest pipeline, on one core, without HTTP.

Decodes and normalizes `/v1/batch` bodies of 100 events (the `http_capture.py` batch),
encodes journal records, builds the Arrow batch and loads DuckDB in row-group-sized
transactions, and prints µs per event for each step as JSON. Pin it for steadier
figures: `taskset -c 0 .venv/bin/python bench/pipeline.py`.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from triolytics.capture import RequestMeta
from triolytics.collector import Collector
from triolytics.config import Config
from triolytics.journal import Position
from triolytics.rows import encode_rows
from triolytics.store import Store, rows_to_arrow

EVENT = (b'{"type":"track","event":"Button Clicked","anonymousId":'
         b'"550e8400-e29b-41d4-a716-446655440000","properties":{"button_id":"signup_hero",'
         b'"color":"blue"}}')
BODY = b'{"batch":[' + b",".join([EVENT] * 100) + b"]}"
HEADERS = {b"x-write-key": b"wk_bench", b"content-type": b"application/json"}
REQUESTS = 1229  # 122,900 events: one DuckDB row group per load


def per_event(seconds: float, events: int) -> float:
    return round(seconds / events * 1e6, 3)


def main() -> None:
    collector = Collector(Config(), {"wk_bench": "default"})
    meta = RequestMeta(time.time_ns() // 1000, "127.0.0.1", "bench/1.0")
    start = time.perf_counter()
    batches = [collector.batch(HEADERS, BODY, meta).rows for _ in range(REQUESTS)]
    decode = time.perf_counter() - start
    rows = [r for b in batches for r in b]
    start = time.perf_counter()
    for b in batches:
        encode_rows(b)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    rows_to_arrow(rows)
    arrow = time.perf_counter() - start
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "events.duckdb")
        for i in range(5):
            start = time.perf_counter()
            store.load(rows, Position(1, i))
            loads.append(time.perf_counter() - start)
        store.close()
    load = sorted(loads)[len(loads) // 2]
    steps = {"decode_validate_normalize": per_event(decode, len(rows)),
             "journal_encode": per_event(encode, len(rows)),
             "arrow_batch": per_event(arrow, len(rows)),
             "duckdb_load_incl_arrow_median": per_event(load, len(rows))}
    total = steps["decode_validate_normalize"] + steps["journal_encode"] + \
        steps["duckdb_load_incl_arrow_median"]
    print(json.dumps({
        "machine": {"python": platform.python_version(), "cpu": platform.processor(),
                    "versions": {p: version(p) for p in ("msgspec", "duckdb", "pyarrow")}},
        "events": len(rows), "us_per_event": steps,
        "sum_us_per_event_without_http": round(total, 3),
        "events_per_s_bound_without_http": round(1e6 / total),
    }, indent=2))


if __name__ == "__main__":
    main()
