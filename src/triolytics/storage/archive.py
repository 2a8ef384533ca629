"""Archive and retention: closed UTC days as Parquet partitions, then old rows out of DuckDB.

Rules (docs/archive.md):
- A day is closed once `archive_grace_s` has passed since the UTC midnight that ends it;
  a month, once its last day is. A partition is a directory `dt=YYYY-MM-DD` (one day) or
  `dt=YYYY-MM` (the small days of a month), with `_manifest.json`: the days it holds
  and their rows, min/max timestamp, every file's rows, bytes and sha256, and
  `ingest_seq_max`. Files are written by DuckDB in arrival order (zstd 3, row groups of
  122,880) and a new file is begun past `archive_max_file_bytes`.
- Which partition: a closed day whose rows would make at least `archive_min_bytes` of
  Parquet (its rows times the bytes per row the archive has measured so far) is archived
  alone as soon as it closes. Smaller days wait for their month to close and are
  archived together as `dt=YYYY-MM`, unless retention would delete them before that:
  then they are archived alone, so retention is never held up by this rule.
- Exactly which rows: a partition holds its days' rows with `ingest_seq <=
  ingest_seq_max`, the table's highest `ingest_seq` in the snapshot (one read
  transaction on a cursor of its own) it was written from.
- Late rows (an old `timestamp` arriving after its day was archived, or a new day of a
  month already archived) stay in DuckDB until there are a row group's worth of them
  for one partition, or retention is due for their day: then they are added to the
  partition as new files (`late-<ingest_seq_max>-<i>.parquet`) and its `ingest_seq_max`
  moves up.
- Atomic: a new partition is written under a hidden `.dt=KEY.partial-*`, fsynced, and
  renamed into place. A partition that changes (late rows added, or forget rewriting it
  without a person's rows) is made whole under a hidden `.dt=KEY.append-*` /
  `.dt=KEY.forget-*` (files kept are hard links), fsynced, then the old directory is
  renamed aside and the new one into its place. A crash leaves hidden directories only,
  or between those two renames a new directory with no `dt=KEY` beside it, which the
  next run renames into place (`finish_swaps`). Readers of the archive as a dataset
  skip hidden names, so nothing is ever seen half written or twice.
- The record: `archived_days(day, rows, archived_at, ingest_seq_max, dt)` in
  DuckDB. A manifest ahead of it (a crash after the rename, before the record) is
  recorded as it is at the next run (`unrecorded`), never written again.
- Retention: rows whose UTC day is more than `retention_days` before today leave DuckDB
  only if their day is archived and its partition verifies (manifest present, every
  file's sha256 matching), up to the partition's `ingest_seq_max`; or all of them with
  `retention_without_archive`. Otherwise nothing is deleted and a warning says why.
  Then the file is compacted if enough of it is free (compact.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import NamedTuple

import msgspec
import pyarrow.parquet as pq
import trio

from triolytics.core.journal import fsync_path
from triolytics.storage.compact import compact_if_needed
from triolytics.storage.export import (
    DAY,
    MANIFEST,
    ExportFile,
    Manifest,
    _fsync_tree,
    _quoted,
    _sha256,
)
from triolytics.storage.store import Archived

log = logging.getLogger("triolytics.archive")
ROW_GROUP = 122_880
GUESS_BYTES_PER_ROW = 60  # before the archive has measured its own (zstd Parquet)
PARQUET = ("FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 3, "
           f"ROW_GROUP_SIZE {ROW_GROUP}")


class PartitionManifest(Manifest):
    day: str  # the partition's key, its dt= value: YYYY-MM-DD, or YYYY-MM for a month
    ingest_seq_max: int  # it holds its days' rows up to this ingest_seq
    days: dict[str, int] = {}  # each UTC day in it and its rows ({}: just `day`)

    def day_rows(self) -> dict[str, int]:
        return self.days or {self.day: self.rows}


def _midnight(now_us: int, back_s: float = 0) -> datetime:
    moment = datetime.fromtimestamp(now_us / 1e6 - back_s, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def closed_before(now_us: int, grace_s: float) -> datetime:
    """Days before this UTC midnight are closed."""
    return _midnight(now_us, grace_s)


def _next_month(day: date) -> date:
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1)


def read_manifest(folder: Path) -> PartitionManifest:
    return msgspec.json.decode((folder / MANIFEST).read_bytes(), type=PartitionManifest)


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
    """Complete or undo the partition swaps a crash left (see the rules)."""
    for kind in ("forget", "append"):
        for fresh in sorted(root.glob(f".dt=*.{kind}-*")):
            target = root / fresh.name[1:].split(f".{kind}-")[0]
            if target.exists() or not (fresh / MANIFEST).exists():
                shutil.rmtree(fresh, ignore_errors=True)
            else:
                fresh.rename(target)
                fsync_path(root)
    for aside in root.glob(".dt=*.old-*"):
        shutil.rmtree(aside, ignore_errors=True)


def tidy(root: Path) -> None:
    """Remove what interrupted runs left; finish their swaps."""
    for old in root.glob(".dt=*.partial-*"):
        shutil.rmtree(old, ignore_errors=True)
    finish_swaps(root)


def partitions(root: Path) -> dict[str, PartitionManifest]:
    """The partitions in the archive by key (those with a readable manifest)."""
    found = {}
    for folder in sorted(root.glob("dt=*")):
        try:
            found[folder.name[3:]] = read_manifest(folder)
        except (OSError, msgspec.DecodeError):
            log.warning("%s has no readable manifest: left alone", folder)
    return found


def unrecorded(root: str | Path, archived: dict[str, Archived]) -> list[PartitionManifest]:
    """Partitions on disk ahead of the record in DuckDB (see the rules)."""
    root = Path(root).absolute()
    if not root.is_dir():
        return []
    tidy(root)
    return [m for m in partitions(root).values()
            if any(d not in archived or archived[d].seq_max < m.ingest_seq_max
                   for d in m.day_rows())]


def bytes_per_row(parts: dict[str, PartitionManifest]) -> float:
    rows = sum(m.rows for m in parts.values())
    size = sum(f.bytes for m in parts.values() for f in m.files)
    return size / rows if rows >= ROW_GROUP else GUESS_BYTES_PER_ROW


class Plan(NamedTuple):
    key: str
    days: dict[str, int | None]  # day -> rows above this ingest_seq go in (None: all)


def plan(pending: list[tuple[str, int]], archived: dict[str, Archived],
         parts: dict[str, PartitionManifest], cutoff: date, retain_before: date | None,
         min_bytes: int) -> tuple[list[Plan], list[Plan]]:
    """From the closed days' rows not in the archive (day, rows): the partitions to write
    and the partitions to add late rows to (see the rules)."""
    per_row = bytes_per_row(parts)
    new: dict[str, dict[str, int | None]] = {}
    late: dict[str, dict[str, int | None]] = {}
    late_rows: dict[str, int] = {}
    for day, rows in pending:
        d, month = date.fromisoformat(day), day[:7]
        due = retain_before is not None and d < retain_before
        if day in archived or (month in parts and day not in archived):
            key = archived[day].partition if day in archived else month
            seq = archived[day].seq_max if day in archived else None
            late.setdefault(key, {})[day] = seq
            late_rows[key] = late_rows.get(key, 0) + rows + (ROW_GROUP if due else 0)
        elif rows * per_row >= min_bytes or (due and _next_month(d) > cutoff):
            new[day] = {day: None}
        elif _next_month(d) <= cutoff:
            new.setdefault(month, {})[day] = None
    return ([Plan(k, v) for k, v in new.items()],
            [Plan(k, v) for k, v in late.items() if late_rows[k] >= ROW_GROUP])


def _where(days: dict[str, int | None]) -> tuple[str, list]:
    """Rows of these days (above each one's ingest_seq, if given)."""
    terms, params = [], []
    for day, seq in sorted(days.items()):
        begins = datetime.fromisoformat(day).replace(tzinfo=UTC)
        terms.append("(timestamp >= ? AND timestamp < ?" + ("" if seq is None else
                                                            " AND ingest_seq > ?") + ")")
        params += [begins, begins + timedelta(days=1)] + ([] if seq is None else [seq])
    return "(" + " OR ".join(terms) + ")", params


def _copy(cursor, into: Path, source: str, where: str, params: list, pattern: str,
          max_file_bytes: int) -> list[ExportFile]:
    """Rows of `source` matching `where`, in arrival order, as Parquet files named
    `pattern` (with {i}) in `into`; the files as a manifest lists them."""
    scratch = into / f".copy-{secrets.token_hex(4)}"
    cursor.execute(f"COPY (SELECT * FROM {source} WHERE {where} ORDER BY ingest_seq) TO "
                   f"'{_quoted(scratch)}' ({PARQUET}, FILE_SIZE_BYTES {max_file_bytes}, "
                   f"FILENAME_PATTERN '{pattern}')", params)
    files = []
    for path in sorted(scratch.iterdir(), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows:
            path = path.rename(into / path.name)
            files.append(ExportFile(path.name, rows, path.stat().st_size, _sha256(path)))
    shutil.rmtree(scratch)
    return files


def _summary(cursor, folder: Path, files: list[ExportFile]) -> tuple[dict[str, int], str,
                                                                      str]:
    names = ", ".join(f"'{_quoted(folder / f.path)}'" for f in files)
    got = cursor.execute(
        f"SELECT {DAY} AS day, count(*), min(timestamp)::VARCHAR, max(timestamp)::VARCHAR "
        f"FROM read_parquet([{names}], hive_partitioning = false) GROUP BY day ORDER BY day"
    ).fetchall()
    return ({day: n for day, n, _, _ in got}, min(g[2] for g in got),
            max(g[3] for g in got))


def _manifest(cursor, folder: Path, key: str, files: list[ExportFile],
              seq_max: int) -> PartitionManifest:
    days, first, last = _summary(cursor, folder, files)
    until = (date.fromisoformat(max(days)) + timedelta(days=1)).isoformat()
    return PartitionManifest(
        "parquet", min(days), until, None, sum(days.values()), first, last, files,
        datetime.now().astimezone().isoformat(timespec="seconds"), key, seq_max, days)


def _write_manifest(folder: Path, manifest: PartitionManifest) -> None:
    (folder / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(manifest))
                                    + b"\n")


def _swap(root: Path, folder: Path, fresh: Path) -> None:
    """`fresh` (whole, fsynced) takes `folder`'s place (see the rules)."""
    _fsync_tree(fresh)
    aside = root / f".{folder.name}.old-{secrets.token_hex(4)}"
    folder.rename(aside)  # (a crash from here to the next rename: finish_swaps)
    fresh.rename(folder)
    fsync_path(root)
    shutil.rmtree(aside, ignore_errors=True)


def archive_closed(cursor, root: str | Path, now_us: int, grace_s: float,
                   archived: dict[str, Archived], *, min_bytes: int = 100 << 20,
                   max_file_bytes: int = 1 << 30,
                   retain_before: date | None = None) -> list[PartitionManifest]:
    """Write the partitions the rules call for, from one snapshot; returns their
    manifests, to record. `archived` must be current (record `unrecorded` first)."""
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    tidy(root)
    parts = partitions(root)
    cutoff = closed_before(now_us, grace_s)
    done: list[PartitionManifest] = []
    cursor.execute("BEGIN")
    try:
        seq_max = cursor.execute(
            "SELECT coalesce(max(ingest_seq), 0) FROM events").fetchone()[0]
        counts = cursor.execute(
            f"SELECT {DAY} AS day, count(*) FROM events WHERE timestamp < ? GROUP BY day "
            f"ORDER BY day", [cutoff]).fetchall()
        pending = []
        for day, rows in counts:  # (late rows are counted apart: few days have them)
            if day in archived:
                where, params = _where({day: archived[day].seq_max})
                rows = cursor.execute(f"SELECT count(*) FROM events WHERE {where}",
                                      params).fetchone()[0]
            if rows:
                pending.append((day, rows))
        new, late = plan(pending, archived, parts, cutoff.date(), retain_before,
                         min_bytes)
        for p in new:
            if (root / f"dt={p.key}").exists():  # (its manifest is unreadable)
                log.warning("dt=%s exists without a readable manifest: not written "
                            "again", p.key)
                continue
            done.append(_write_new(cursor, root, p, seq_max, max_file_bytes))
        for p in late:
            done.append(_add_late(cursor, root, parts[p.key], p, seq_max, max_file_bytes))
    finally:
        cursor.execute("ROLLBACK")
    return done


def _write_new(cursor, root: Path, p: Plan, seq_max: int,
               max_file_bytes: int) -> PartitionManifest:
    hidden = root / f".dt={p.key}.partial-{secrets.token_hex(4)}"
    hidden.mkdir()
    # (an exception or a kill from here on leaves only `hidden`: the next run removes it)
    where, params = _where(p.days)
    files = _copy(cursor, hidden, "events", f"{where} AND ingest_seq <= ?",
                  [*params, seq_max], "part-{i}", max_file_bytes)
    manifest = _manifest(cursor, hidden, p.key, files, seq_max)
    _write_manifest(hidden, manifest)
    _fsync_tree(hidden)
    hidden.rename(root / f"dt={p.key}")
    fsync_path(root)
    return manifest


def _add_late(cursor, root: Path, old: PartitionManifest, p: Plan, seq_max: int,
              max_file_bytes: int) -> PartitionManifest:
    folder = root / f"dt={p.key}"
    fresh = root / f".dt={p.key}.append-{secrets.token_hex(4)}"
    fresh.mkdir()
    for f in old.files:
        os.link(folder / f.path, fresh / f.path)
    where, params = _where(p.days)
    added = _copy(cursor, fresh, "events", f"{where} AND ingest_seq <= ?",
                  [*params, seq_max], f"late-{seq_max}-{{i}}", max_file_bytes)
    manifest = _manifest(cursor, fresh, p.key, [*old.files, *added], seq_max)
    _write_manifest(fresh, manifest)
    _swap(root, folder, fresh)
    return manifest


def forget_archived(cursor, root: str | Path, column: str, value: str,
                    project: str | None, max_file_bytes: int = 1 << 30) -> int:
    """Rewrite every partition holding rows with `column` = `value` (in `project`)
    without them; returns how many rows left the archive."""
    root = Path(root).absolute()
    if not root.is_dir():
        return 0
    tidy(root)
    match = f"{column} = ?" + ("" if project is None else " AND project = ?")
    params = [value] + ([] if project is None else [project])
    removed = 0
    for key, manifest in partitions(root).items():
        folder = root / f"dt={key}"
        names = ", ".join(f"'{_quoted(folder / f.path)}'" for f in manifest.files)
        source = f"read_parquet([{names}], hive_partitioning = false)"
        found = cursor.execute(f"SELECT count(*) FROM {source} WHERE {match}",
                               params).fetchone()[0]
        if found:
            fresh = root / f".dt={key}.forget-{secrets.token_hex(4)}"
            fresh.mkdir()
            files = _copy(cursor, fresh, source, f"({match}) IS NOT TRUE", params,
                          "part-{i}", max_file_bytes)
            _write_manifest(fresh, _manifest(cursor, fresh, key, files,
                                             manifest.ingest_seq_max)
                            if files else msgspec.structs.replace(
                                manifest, rows=0, files=[], min_timestamp=None,
                                max_timestamp=None,
                                days=dict.fromkeys(manifest.day_rows(), 0)))
            _swap(root, folder, fresh)
            removed += found
    return removed


def retention_plan(cursor, root: str | Path | None, now_us: int, days: int,
                   without_archive: bool, archived: dict[str, Archived]
                   ) -> tuple[list[tuple[str, int | None]], list[str]]:
    """What retention may delete: (day, ingest_seq_max or None for the whole day), and
    why other days past retention are kept."""
    cutoff = _midnight(now_us) - timedelta(days=days)
    cursor.execute("BEGIN")
    try:
        old = cursor.execute(
            f"SELECT {DAY} AS day, count(*) FROM events WHERE timestamp < ? GROUP BY day "
            f"ORDER BY day", [cutoff]).fetchall()
        counts = {}
        for day, _ in old:
            if day in archived:
                where, params = _where({day: None})
                counts[day] = cursor.execute(
                    f"SELECT count(*) FROM events WHERE {where} AND ingest_seq <= ?",
                    [*params, archived[day].seq_max]).fetchone()[0]
    finally:
        cursor.execute("ROLLBACK")
    delete: list[tuple[str, int | None]] = []
    refused: list[str] = []
    verified: dict[str, str | None] = {}
    for day, rows in old:
        if without_archive:
            delete.append((day, None))
        elif day not in archived:
            refused.append(f"{day}: {rows} rows not archived")
        elif counts[day]:  # (0: only late rows remain; they wait, see the rules)
            key = archived[day].partition
            if root is None:
                problem = "archive_dir is not set"
            else:
                if key not in verified:
                    verified[key] = verify(Path(root) / f"dt={key}")
                problem = verified[key]
            if problem is None:
                delete.append((day, archived[day].seq_max))
            else:
                refused.append(f"{day}: archive not verified ({problem})")
    return delete, refused


def retain_before(now_us: int, days: int) -> date | None:
    """Days before this one are past retention (None: no retention)."""
    return (_midnight(now_us) - timedelta(days=days)).date() if days else None


# --- the server's task
async def archive_once(config, writer, now_us: int) -> tuple[int, int]:
    """One archive step, then one retention step; returns (partitions written, rows
    deleted)."""
    store = writer.store
    written = 0
    if config.archive_dir:
        await writer.wait_loaded()  # (ApiError if storage fails: tried again next time)
        archived = await writer.run_store(store.archived_days)
        for m in await trio.to_thread.run_sync(unrecorded, config.archive_dir, archived):
            await writer.run_store(store.record_archived, m.day, m.day_rows(),
                                   m.ingest_seq_max)
            log.info("recorded dt=%s from its manifest: %d rows", m.day, m.rows)
        archived = await writer.run_store(store.archived_days)
        cursor = await writer.run_store(store.cursor)
        try:
            manifests = await trio.to_thread.run_sync(partial(
                archive_closed, cursor, config.archive_dir, now_us, config.archive_grace_s,
                archived, min_bytes=config.archive_min_bytes,
                max_file_bytes=config.archive_max_file_bytes,
                retain_before=retain_before(now_us, config.retention_days)))
        finally:
            cursor.close()
        for m in manifests:
            await writer.run_store(store.record_archived, m.day, m.day_rows(),
                                   m.ingest_seq_max)
            log.info("archived dt=%s: %d rows in %d files", m.day, m.rows, len(m.files))
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
        await compact_if_needed(config, writer)  # (when enough of the file is free)
    return written, deleted


async def archive_loop(config, writer, stop: trio.Event, clock, lock: trio.Lock,
                       leads=None) -> None:
    """Every `archive_interval_s` (the first at start), until `stop`; `lock` keeps it
    apart from a forget rewriting partitions. `leads`: with many writers, only the one
    that leads (shared_state.Leader) archives."""
    while not stop.is_set():
        try:
            async with lock:
                if leads is None or leads():
                    await archive_once(config, writer, clock() // 1000)
        except Exception as exc:  # (a full disk, a fault: the next run tries again)
            log.error("archive/retention step failed: %s", exc)
        with trio.move_on_after(config.archive_interval_s):
            await stop.wait()
