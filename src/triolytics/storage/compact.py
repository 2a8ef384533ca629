"""Compaction: give the space retention freed back to the file system.

Rules:
- DuckDB reuses the blocks a DELETE frees but does not shorten the file (unless it was
  emptied; docs/archive.md, "The file's size"); `Store.compact` rewrites it into a new
  file and swaps it in.
- It runs through `writer.run_store`, so loads wait for it (3 to 5 s per million rows
  kept, docs/archive.md); only when it pays: at least `compact_free_ratio` of the
  blocks are free and the file is at least `compact_min_bytes`.
  `compact_free_ratio = 0` turns it off.
- A failure is logged and leaves the old file in use (the next call reopens it if the
  connection was closed); the next run tries again.
"""

from __future__ import annotations

import logging
from time import monotonic

import duckdb

from triolytics.core.config import Config

log = logging.getLogger("triolytics.compact")


def should_compact(free_ratio: float, file_bytes: int, min_ratio: float,
                   min_bytes: int) -> bool:
    """Whether a file of `file_bytes` with `free_ratio` of its blocks free is worth
    rewriting. `min_ratio` 0: never."""
    return 0 < min_ratio <= free_ratio and file_bytes >= min_bytes


async def compact_if_needed(config: Config, writer) -> tuple[int, int] | None:
    """Compact the writer's store if the policy says so; (bytes before, after) or None."""
    store = writer.store
    if not config.compact_free_ratio:
        return None
    try:
        free, total, size = await writer.run_store(store.free_space)
        if not should_compact(free / total if total else 0.0, size,
                              config.compact_free_ratio, config.compact_min_bytes):
            return None
        began = monotonic()
        before, after = await writer.run_store(store.compact)
    except (duckdb.Error, OSError, RuntimeError) as exc:
        log.error("compaction failed, the file is kept as it is: %s", exc)
        return None
    log.info("compacted %s: %d -> %d bytes (%d of %d blocks were free) in %.1f s",
             store.path, before, after, free, total, monotonic() - began)
    return before, after
