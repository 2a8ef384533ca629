"""Export: the stored events as Parquet, CSV or JSON files, one per UTC day, atomically.

Rules:
- Layout: `DIR/dt=YYYY-MM-DD/part-0.<parquet|csv|json>`, a day being the UTC date of
  the event's `timestamp`, and `DIR/_manifest.json` (a reader of DIR as a dataset skips
  names that start with `_`): the format, the filters, the rows, the earliest and latest
  timestamp, and per file its path, rows, bytes and sha256.
  Every row keeps `message_id`, so a reader can check that nothing is doubled.
- Atomic: everything is written under a hidden `.DIR.partial-*` beside DIR, each file and
  directory fsynced, then renamed to DIR at once. DIR must not exist yet (or be an empty
  directory): an export never mixes with an earlier one, and an interrupted one leaves
  only the hidden directory (removed by the next export to the same DIR).
- Parquet: zstd level 3, row groups of 122,880 rows (DuckDB's own row group size).
  CSV has a header line; JSON is one object per line.
- One snapshot: the export runs in one read transaction on a cursor of its own, so with
  the server running it sees one consistent state while loads go on beside it.
- A day's rows are selected by a `timestamp` range (DuckDB skips row groups outside it),
  not by formatting every row's time: an export reads the table about once.
- Filters: `since` (inclusive) and `until` (exclusive) on `timestamp`, and `project`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import msgspec

from triolytics.core.journal import fsync_path

FORMATS = {
    "parquet": "(FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 3, "
               "ROW_GROUP_SIZE 122880)",
    "csv": "(FORMAT csv, HEADER true)",
    "json": "(FORMAT json)",
}
MANIFEST = "_manifest.json"  # (a leading _: Parquet readers skip it when reading DIR)
DAY = "strftime(timestamp AT TIME ZONE 'UTC', '%Y-%m-%d')"


class ExportError(Exception):
    """The export cannot be made as asked (the message says why); nothing was written."""


class ExportFile(msgspec.Struct):
    path: str
    rows: int
    bytes: int
    sha256: str


class Manifest(msgspec.Struct):
    format: str
    since: str | None
    until: str | None
    project: str | None
    rows: int
    min_timestamp: str | None
    max_timestamp: str | None
    files: list[ExportFile]
    exported_at: str


def _time(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(f"{name} must be a date or an ISO 8601 time, not {text!r}") from None


def _target(to: str | Path) -> Path:
    target = Path(to).absolute()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise ExportError(f"{target} already exists and is not an empty directory; "
                          "export into a new directory")
    if not target.parent.is_dir():
        raise ExportError(f"{target.parent} is not a directory")
    return target


def export(cursor: duckdb.DuckDBPyConnection, to: str | Path, *, fmt: str = "parquet",
           since: str | None = None, until: str | None = None, project: str | None = None,
           progress: Callable[[int, int, str, int], None] | None = None) -> Manifest:
    """Write the export to `to`; returns its manifest. `progress(done, days, day, rows)`
    is called after each day's file."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    start, end = _time(since, "since"), _time(until, "until")
    target = _target(to)
    where, params = ["true"], []
    if start is not None:
        where.append("timestamp >= ?")
        params.append(start)
    if end is not None:
        where.append("timestamp < ?")
        params.append(end)
    if project is not None:
        where.append("project = ?")
        params.append(project)
    condition = " AND ".join(where)
    for old in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(old, ignore_errors=True)  # an interrupted export's leftovers
    partial = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        cursor.execute("BEGIN")
        try:
            manifest = _write(cursor, partial, fmt, condition, params, progress)
        finally:
            cursor.execute("ROLLBACK")
        manifest.since, manifest.until, manifest.project = since, until, project
        (partial / MANIFEST).write_bytes(msgspec.json.format(
            msgspec.json.encode(manifest)) + b"\n")
        _fsync_tree(partial)
        if target.exists():
            target.rmdir()  # (empty: checked above)
        partial.rename(target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _write(cursor, partial: Path, fmt: str, condition: str, params: list,
           progress) -> Manifest:
    days = cursor.execute(
        f"SELECT {DAY} AS day, count(*), min(timestamp)::VARCHAR, max(timestamp)::VARCHAR "
        f"FROM events WHERE {condition} GROUP BY day ORDER BY day", params).fetchall()
    files: list[ExportFile] = []
    for done, (day, rows, _, _) in enumerate(days, 1):
        folder = partial / f"dt={day}"
        folder.mkdir()
        files.append(write_day(cursor, folder / f"part-0.{fmt}", partial, day, rows, fmt,
                               condition, params))
        if progress is not None:
            progress(done, len(days), day, rows)
    return Manifest(fmt, None, None, None, sum(f.rows for f in files),
                    days[0][2] if days else None, days[-1][3] if days else None, files,
                    datetime.now().astimezone().isoformat(timespec="seconds"))


def write_day(cursor, path: Path, root: Path, day: str, rows: int, fmt: str = "parquet",
              condition: str = "true", params: list | tuple = ()) -> ExportFile:
    """Write one UTC day's rows matching `condition` to `path`, in arrival order; the
    file as the manifest lists it (its path relative to `root`)."""
    begins = datetime.fromisoformat(day).replace(tzinfo=UTC)
    cursor.execute(f"COPY (SELECT * FROM events WHERE {condition} AND timestamp >= ? "
                   f"AND timestamp < ? ORDER BY ingest_seq) TO '{_quoted(path)}' "
                   f"{FORMATS[fmt]}", [*params, begins, begins + timedelta(days=1)])
    return ExportFile(str(path.relative_to(root)), rows, path.stat().st_size, _sha256(path))


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def to_json(manifest: Manifest) -> dict:
    return json.loads(msgspec.json.encode(manifest))
