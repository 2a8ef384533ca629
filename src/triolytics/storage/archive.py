"""Archive and retention: closed UTC days as Parquet partitions, then old rows out of DuckDB.

Rules (docs/archive.md):
- A day is closed once `archive_grace_s` has passed since the UTC midnight that ends it.
  Each closed day with events and not yet in `archived_days` is written to
  `archive_dir/dt=YYYY-MM-DD/part-0.parquet` + `_manifest.json` (rows, min/max
  timestamp, the file's sha256, `ingest_seq_max`), with export.py's pieces: zstd 3, row
  groups of 122,880, arrival order.
- Atomic per day: written under a hidden `archive_dir/.dt=YYYY-MM-DD.partial-*`, fsynced,
  renamed into place. A run that dies leaves only hidden temps; the next run removes
  them and writes the day again. A `dt=` directory already there is never written
  again; if its day is not recorded yet (a crash between the rename and the record),
  its manifest is recorded as it is.
- One snapshot per run (one read transaction on a cursor of its own). `ingest_seq_max`
  is the table's highest `ingest_seq` in that snapshot: the partition holds exactly the
  day's rows with `ingest_seq <= ingest_seq_max`.
- Late events (an old `timestamp` arriving after its day was archived) have a higher
  `ingest_seq`: they stay in DuckDB only, and retention never deletes them (it deletes a
  day's rows up to `ingest_seq_max` only). Nothing is lost; nothing is doubled.
- Forget (docs/privacy.md): each archived day holding the person's rows is written
  again without them, with a new manifest, under a hidden `.dt=DAY.forget-*`, fsynced;
  then the old `dt=DAY` is renamed aside and the new one into its place. A crash between
  those two renames is finished by the next archive or forget run (`finish_swaps`): a
  whole new directory with no `dt=DAY` beside it is renamed into place; one with a
  `dt=DAY` beside it never started and is removed.
- Retention: rows whose UTC day is more than `retention_days` before today leave DuckDB
  only if their day is archived and its partition verifies (manifest present, every
  file's sha256 matching), or with `retention_without_archive`. Otherwise nothing is
  deleted and a warning says why. One transaction, then a CHECKPOINT.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import trio

from triolytics.core.journal import fsync_path
from triolytics.storage.export import (
    DAY,
    FORMATS,
    MANIFEST,
    ExportFile,
    Manifest,
    _fsync_tree,
    _quoted,
    _sha256,
    write_day,
)

log = logging.getLogger("triolytics.archive")
PART = "part-0.parquet"


class DayManifest(Manifest):
    day: str
    ingest_seq_max: int  # the partition holds the day's rows up to this ingest_seq


def _midnight(now_us: int, back_s: float = 0) -> datetime:
    moment = datetime.fromtimestamp(now_us / 1e6 - back_s, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def closed_before(now_us: int, grace_s: float) -> datetime:
    """Days before this UTC midnight are closed."""
    return _midnight(now_us, grace_s)


def read_manifest(folder: Path) -> DayManifest:
    return msgspec.json.decode((folder / MANIFEST).read_bytes(), type=DayManifest)


def verify(folder: Path) -> str | None:
    """None if the partition is whole (manifest present, every sha256 matching), else why."""
    try:
        manifest = read_manifest(folder)
    except (OSError, msgspec.DecodeError) as exc:
        return f"no readable manifest in {folder}: {exc}"
    for f in manifest.files:
        path = folder / Path(f.path).name
        try:
            digest = _sha256(path)
        except OSError as exc:
            return f"{path}: {exc}"
        if digest != f.sha256:
            return f"{path}: sha256 {digest} does not match the manifest's {f.sha256}"
    return None


def finish_swaps(root: Path) -> None:
    """Complete or undo the partition swaps a crashed forget left (see the rules)."""
    for fresh in sorted(root.glob(".dt=*.forget-*")):
        target = root / fresh.name[1:].split(".forget-")[0]
        if target.exists() or not (fresh / MANIFEST).exists():
            shutil.rmtree(fresh, ignore_errors=True)
        else:
            fresh.rename(target)
            fsync_path(root)
    for aside in root.glob(".dt=*.old-*"):
        shutil.rmtree(aside, ignore_errors=True)


def forget_archived(cursor, root: str | Path, column: str, value: str,
                    project: str | None) -> int:
    """Rewrite every archived day holding rows with `column` = `value` (in `project`)
    without them; returns how many rows left the archive."""
    root = Path(root).absolute()
    if not root.is_dir():
        return 0
    finish_swaps(root)
    match = f"{column} = ?" + ("" if project is None else " AND project = ?")
    params = [value] + ([] if project is None else [project])
    removed = 0
    for folder in sorted(root.glob("dt=*")):
        source = f"read_parquet('{_quoted(folder / PART)}', hive_partitioning = false)"
        if not (folder / PART).exists():
            continue
        found = cursor.execute(f"SELECT count(*) FROM {source} WHERE {match}",
                               params).fetchone()[0]
        if found:
            _rewrite_without(cursor, root, folder, source, match, params)
            removed += found
    return removed


def _rewrite_without(cursor, root: Path, folder: Path, source: str, match: str,
                     params: list) -> None:
    fresh = root / f".{folder.name}.forget-{secrets.token_hex(4)}"
    fresh.mkdir()
    out = fresh / PART
    cursor.execute(f"COPY (SELECT * FROM {source} WHERE ({match}) IS NOT TRUE ORDER BY "
                   f"ingest_seq) TO '{_quoted(out)}' {FORMATS['parquet']}", params)
    rows, first, last = cursor.execute(
        f"SELECT count(*), min(timestamp)::VARCHAR, max(timestamp)::VARCHAR FROM "
        f"read_parquet('{_quoted(out)}', hive_partitioning = false)").fetchone()
    old = read_manifest(folder)
    file = ExportFile(PART, rows, out.stat().st_size, _sha256(out))
    _write_manifest(fresh, msgspec.structs.replace(
        old, rows=rows, min_timestamp=first, max_timestamp=last, files=[file],
        exported_at=datetime.now().astimezone().isoformat(timespec="seconds")))
    _fsync_tree(fresh)
    aside = root / f".{folder.name}.old-{secrets.token_hex(4)}"
    folder.rename(aside)  # (a crash from here to the next rename: finish_swaps)
    fresh.rename(folder)
    fsync_path(root)
    shutil.rmtree(aside, ignore_errors=True)


def archive_closed(cursor, root: str | Path, now_us: int, grace_s: float,
                   archived: set[str]) -> list[DayManifest]:
    """Write every closed day not in `archived` (ISO dates); returns the manifests of the
    days to record (written now, or found whole but unrecorded)."""
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".dt=*.partial-*"):
        shutil.rmtree(old, ignore_errors=True)  # an interrupted run's leftovers
    finish_swaps(root)
    cutoff = closed_before(now_us, grace_s)
    done: list[DayManifest] = []
    cursor.execute("BEGIN")
    try:
        seq_max = cursor.execute(
            "SELECT coalesce(max(ingest_seq), 0) FROM events").fetchone()[0]
        days = cursor.execute(
            f"SELECT {DAY} AS day, count(*), min(timestamp)::VARCHAR, "
            f"max(timestamp)::VARCHAR FROM events WHERE timestamp < ? GROUP BY day "
            f"ORDER BY day", [cutoff]).fetchall()
        for day, rows, first, last in days:
            if day in archived:
                continue
            folder = root / f"dt={day}"
            if folder.exists():  # whole (renamed in at once): record it, never rewrite
                done.append(read_manifest(folder))
                continue
            done.append(_archive_day(cursor, root, folder, day, rows, first, last,
                                     seq_max))
    finally:
        cursor.execute("ROLLBACK")
    return done


def _archive_day(cursor, root: Path, folder: Path, day: str, rows: int, first: str,
                 last: str, seq_max: int) -> DayManifest:
    partial = root / f".{folder.name}.partial-{secrets.token_hex(4)}"
    partial.mkdir()
    # (an exception or a kill from here on leaves only `partial`: the next run removes it)
    file = write_day(cursor, partial / PART, partial, day, rows, "parquet",
                     "ingest_seq <= ?", [seq_max])
    manifest = _manifest(day, file, first, last, seq_max)
    _write_manifest(partial, manifest)
    _fsync_tree(partial)
    partial.rename(folder)
    fsync_path(root)
    return manifest


def _manifest(day: str, file: ExportFile, first: str, last: str,
              seq_max: int) -> DayManifest:
    until = (datetime.fromisoformat(day) + timedelta(days=1)).date().isoformat()
    return DayManifest("parquet", day, until, None, file.rows, first, last, [file],
                       datetime.now().astimezone().isoformat(timespec="seconds"),
                       day, seq_max)


def _write_manifest(folder: Path, manifest: DayManifest) -> None:
    (folder / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest))
                                    + b"\n")


def retention_plan(cursor, root: str | Path | None, now_us: int, days: int,
                   without_archive: bool, archived: dict[str, int]
                   ) -> tuple[list[tuple[str, int | None]], list[str]]:
    """What retention may delete: (day, ingest_seq_max or None for the whole day), and
    why other days past retention are kept. `archived`: day -> its ingest_seq_max."""
    cutoff = _midnight(now_us) - timedelta(days=days)
    cursor.execute("BEGIN")
    try:
        old = cursor.execute(
            f"SELECT {DAY} AS day, count(*), max(ingest_seq) FROM events "
            f"WHERE timestamp < ? GROUP BY day ORDER BY day", [cutoff]).fetchall()
        counts = {}
        for day, _, _ in old:
            if day in archived:
                counts[day] = cursor.execute(
                    "SELECT count(*) FROM events WHERE timestamp >= ? AND timestamp < ? "
                    "AND ingest_seq <= ?",
                    [*_range(day), archived[day]]).fetchone()[0]
    finally:
        cursor.execute("ROLLBACK")
    delete: list[tuple[str, int | None]] = []
    refused: list[str] = []
    for day, rows, _ in old:
        if without_archive:
            delete.append((day, None))
        elif day not in archived:
            refused.append(f"{day}: {rows} rows not archived")
        elif counts[day]:  # (0: only late rows remain; they stay, see the rules)
            problem = None if root is None else verify(Path(root) / f"dt={day}")
            if root is None:
                problem = "archive_dir is not set"
            if problem is None:
                delete.append((day, archived[day]))
            else:
                refused.append(f"{day}: archive not verified ({problem})")
    return delete, refused


def _range(day: str) -> tuple[datetime, datetime]:
    begins = datetime.fromisoformat(day).replace(tzinfo=UTC)
    return begins, begins + timedelta(days=1)


# --- the server's task
async def archive_once(config, writer, now_us: int) -> tuple[int, int]:
    """One archive step, then one retention step; returns (days archived, rows
    deleted)."""
    store = writer.store
    written = 0
    if config.archive_dir:
        await writer.wait_loaded()  # (ApiError if storage fails: tried again next time)
        archived = await writer.run_store(store.archived_days)
        cursor = await writer.run_store(store.cursor)
        try:
            manifests = await trio.to_thread.run_sync(
                archive_closed, cursor, config.archive_dir, now_us, config.archive_grace_s,
                set(archived))
        finally:
            cursor.close()
        for m in manifests:
            await writer.run_store(store.record_archived, m.day, m.rows, m.ingest_seq_max)
            log.info("archived %s: %d rows", m.day, m.rows)
        written = len(manifests)
    deleted = 0
    if config.retention_days:
        archived = await writer.run_store(store.archived_days)
        cursor = await writer.run_store(store.cursor)
        try:
            delete, refused = await trio.to_thread.run_sync(
                retention_plan, cursor, config.archive_dir or None, now_us,
                config.retention_days, config.retention_without_archive, archived)
        finally:
            cursor.close()
        if refused:
            log.warning("retention: keeping rows past %d days (set archive_dir, or "
                        "retention_without_archive = true): %s", config.retention_days,
                        "; ".join(refused))
        if delete:
            deleted = await writer.run_store(store.delete_days, delete)
            log.info("retention: deleted %d rows of %d days", deleted, len(delete))
    return written, deleted


async def archive_loop(config, writer, stop: trio.Event, clock) -> None:
    """Every `archive_interval_s` (the first at start), until `stop`."""
    while not stop.is_set():
        try:
            await archive_once(config, writer, clock() // 1000)
        except Exception as exc:  # (a full disk, a fault: the next run tries again)
            log.error("archive/retention step failed: %s", exc)
        with trio.move_on_after(config.archive_interval_s):
            await stop.wait()
