"""Compaction (`Store.compact`): how long loads pause, and what the file gives back.

Fills a DuckDB file with ROWS synthetic events over DAYS days (the server's way,
`Store.load`, as bench/export.py), deletes the oldest KEEP-less days as retention does
(`delete_days`, then CHECKPOINT), and compacts; prints one JSON document: file bytes
full, after the delete and after compaction, free/total blocks, and seconds.

    .venv/bin/python bench/compact.py [--rows 5000000] [--days 30] [--keep 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from export import BATCH, T0, rows

from triolytics.core.journal import Position
from triolytics.storage.store import Store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--keep", type=int, default=6)  # the newest days kept
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.duckdb"
        store = Store(path)
        for start in range(0, args.rows, BATCH):
            n = min(BATCH, args.rows - start)
            store.load(rows(start, n, args.days, args.rows), Position(1, start + n))
        store.checkpoint()
        full = os.path.getsize(path)
        first = datetime.fromtimestamp(T0 / 1e6, UTC)
        old = [((first + timedelta(days=d)).date().isoformat(), None)
               for d in range(args.days - args.keep)]
        began = time.perf_counter()
        deleted = store.delete_days(old)
        delete_s = time.perf_counter() - began
        free, total, deleted_bytes = store.free_space()
        began = time.perf_counter()
        before, after = store.compact()
        compact_s = time.perf_counter() - began
        kept = store.count()
        store.close()
    print(json.dumps({"machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                      "rows": args.rows, "deleted": deleted, "kept": kept,
                      "bytes_full": full, "bytes_after_delete": deleted_bytes,
                      "free_blocks": free, "total_blocks": total, "delete_s": round(delete_s, 2),
                      "bytes_after_compact": after, "compact_s": round(compact_s, 2)}, indent=2))
    assert before == deleted_bytes


if __name__ == "__main__":
    main()
