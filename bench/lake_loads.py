"""What a load costs on each store: the DuckDB file, a DuckLake with a local catalog, and
a DuckLake with a PostgreSQL catalog (bench/pgserver.py, fsync on), at several load sizes.
Decides the lake's commit size and freshness (docs/scaling.md, "Commit size").

Each load is `Store.load` of N rows (as the writer calls it: Arrow, one transaction with
the journal mark); per size, `--loads` loads, timed one by one (wall and this process's
CPU). The lake arms also count the data files a load leaves. Prints JSON.

    .venv/bin/python bench/lake_loads.py [--sizes 100,1000,10000,122880] [--loads 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import pgserver  # noqa: E402

from triolytics.core.journal import Position  # noqa: E402
from triolytics.core.rows import Row  # noqa: E402
from triolytics.storage.lake import LakeStore  # noqa: E402
from triolytics.storage.store import Store  # noqa: E402

T0 = 1_764_000_000_000_000


def rows(n: int, base: int) -> list[Row]:
    return [Row(f"m{base + i}", "default", "http", "track", "Order Completed", None,
                f"a{(base + i) % 5000}", None, None, None, f"s{(base + i) % 5000}",
                T0 + base + i, None, None, T0 + base + i,
                '{"revenue":12.5,"currency":"EUR","items":3}', None,
                '{"ip":"10.0.0.1","userAgent":"Mozilla/5.0"}', None) for i in range(n)]


def measure(store, sizes: list[int], loads: int, files) -> dict:
    out = {}
    done = 0
    for n in sizes:
        walls, cpus = [], []
        before = files()
        for _ in range(loads):
            batch = rows(n, done)
            w, c = time.perf_counter(), time.process_time()
            store.load(batch, Position(1, done + n))
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
            done += n
        out[str(n)] = {"load_ms_median": round(1000 * statistics.median(walls), 2),
                       "cpu_ms_median": round(1000 * statistics.median(cpus), 2),
                       "us_per_row": round(1e6 * statistics.median(walls) / n, 2),
                       "files_per_load": None if before is None else
                       round((files() - before) / loads, 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000,10000,122880")
    p.add_argument("--loads", type=int, default=10)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"sizes": sizes, "loads": args.loads, "arms": {}}
    with tempfile.TemporaryDirectory(prefix="lake-loads-") as tmp:
        tmp = Path(tmp)
        store = Store(tmp / "events.duckdb")
        result["arms"]["file"] = measure(store, sizes, args.loads, lambda: None)
        store.close()

        def counter(s):
            return lambda: s.conn.execute(
                "SELECT count(*) FROM ducklake_list_files('lake', 'events')").fetchone()[0]
        lake = LakeStore(str(tmp / "c.ducklake"), str(tmp / "data1"), "w1")
        result["arms"]["lake_local"] = measure(lake, sizes, args.loads, counter(lake))
        lake.close()
        with pgserver.PostgresServer(tmp) as pg:
            pg.start()
            dsn = pg.create_database("lake")
            lake = LakeStore(dsn, str(tmp / "data2"), "w1")
            result["arms"]["lake_postgres"] = measure(lake, sizes, args.loads, counter(lake))
            lake.close()
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
