"""Export throughput: rows/s of `triolytics export` (export.py) per format.

Fills a DuckDB file in a temporary directory with ROWS synthetic events spread over
DAYS days (loaded the server's way, `Store.load`, in batches of 122,880), then exports
it to Parquet, CSV and JSON and prints one JSON document: rows, seconds, rows/s and
bytes per format, and the time taken to fill.

    .venv/bin/python bench/export.py [--rows 10000000] [--days 30] [--formats parquet,csv]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from triolytics.core.journal import Position
from triolytics.core.rows import Row
from triolytics.storage.export import export
from triolytics.storage.store import Store

T0 = 1_714_521_600_000_000  # 2024-05-01T00:00:00Z in µs
BATCH = 122_880


def rows(start: int, n: int, days: int, total: int) -> list[Row]:
    span = days * 86_400_000_000
    out = []
    for i in range(start, start + n):
        t = T0 + span * i // total
        out.append(Row(f"m{i}", "default", "http", "track", f"E{i % 20}", None, f"a{i % 5000}",
                       None, None, None, None, t, None, None, t,
                       f'{{"path":"/pricing","n":{i % 100}}}', None,
                       '{"ip":"10.0.0.1"}', None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--formats", default="parquet,csv,json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "events.duckdb", threads=2)
        began = time.perf_counter()
        for start in range(0, args.rows, BATCH):
            n = min(BATCH, args.rows - start)
            store.load(rows(start, n, args.days, args.rows), Position(1, start + n))
        store.checkpoint()
        fill_s = time.perf_counter() - began
        results = {}
        for fmt in args.formats.split(","):
            began = time.perf_counter()
            manifest = export(store.cursor(), Path(tmp) / f"out-{fmt}", fmt=fmt)
            seconds = time.perf_counter() - began
            results[fmt] = {"rows": manifest.rows, "files": len(manifest.files),
                            "seconds": round(seconds, 2),
                            "rows_per_s": round(manifest.rows / seconds),
                            "bytes": sum(f.bytes for f in manifest.files)}
        store.close()
    print(json.dumps({"machine": {"python": platform.python_version(),
                                  "cpus": __import__("os").cpu_count()},
                      "rows": args.rows, "days": args.days, "fill_s": round(fill_s, 1),
                      "export": results}, indent=2))


if __name__ == "__main__":
    main()
