"""The write-ahead journal: numbered segment files of checksummed records that can be
found again past damage.

Format (version 2):
- A segment `NNNNNNNNNNNN.journal` starts with a 16-byte header: `b"TLJ2"`, the
  journal's 8-byte sync marker, u32 crc32 of those 12 bytes. It is written when the
  segment is made, so a new segment's first record starts at offset 16 and an empty
  journal opens at `Position(1, 16)`.
- A record is `sync(8) | u32 length | u32 crc32(payload) | u32 crc32(those 16 bytes)`,
  then the payload (opaque here). All integers are little-endian.
- The sync marker is random per journal directory, made once in `journal/marker` (0600,
  synced with the directory) and copied into every segment header. It is secret: a
  client cannot put a record into an event's payload that resync would accept. The
  marker is taken from the newest segment header that is intact, else from the marker
  file; a marker file that is missing or disagrees with the headers is written again.
- Version 1 segments (no `TLJ2` at offset 0 and no sync marker anywhere) hold
  `u32 length | u32 crc32(payload) | payload` records from offset 0. They are read (up
  to their first bad record: the rest of the segment is one damaged range) but never
  appended to: `open` starts a new segment after a version 1 segment, and after one
  whose header is damaged.

Reading:
- `read_segment(data, sync, start=16)` is pure: it returns `(records, damaged)`, records
  as `(start, end, payload)` and damaged ranges as `(start, end)`, byte offsets in
  `data`. A record is valid at an offset if its sync matches, its header crc matches, its
  length fits in `data` and its payload crc matches. Past an invalid one the scan looks
  for the next occurrence of the sync where a valid record starts; the bytes between are
  a damaged range.
- For scripts that inspect a journal (nothing on disk changes, nothing is logged):
  `Journal(directory, 0).read(n)` gives segment n as a `Segment` (version, sync, intact
  header, records, damaged ranges, as `read_segment` gives them; any version, a damaged
  header and all), and `Journal(directory, 0).read_marker()` the directory's sync, for
  `read_segment(path.read_bytes(), sync)`.
- `records(start)` yields every intact record after `start`, across segments, and notes
  the damage in each segment once it has been read through.

Damage:
- Torn: invalid bytes at the end of the last segment with no valid record after them,
  a write cut short by `kill -9` or a power cut. They were never acknowledged (acks
  follow the write): `open` truncates them and logs a WARNING.
- Damaged: any other invalid range (with valid records after it in the last segment, or
  anywhere in an earlier segment, its end included). The records before and after it
  are kept and the segment is never truncated or rewritten: DuckDB holds positions in
  it. Logged as an ERROR.
- Both are copied to `journal/quarantine/<segment>-<start>-<end>.bin` (the segment's
  12-digit number; written once: an existing copy is left alone), listed in
  `Journal.damage` and logged once per process. `Journal.damage_summary()` totals them
  for /admin/stats.

Writing and releasing:
- One thread appends at a time (the writer's); `append` writes a whole group with one
  `writev` and returns the `Position` just past it. `sync` makes it durable (fdatasync).
- A `Position` is (segment number, byte offset). Everything before the position that
  DuckDB records as loaded is disposable: `release` deletes whole segments before it.
- No trio, no DuckDB: plain file I/O, so it is tested without an event loop.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

MAGIC = b"TLJ2"
SYNC_SIZE = 8
SEGMENT_HEADER = struct.Struct("<4s8sI")  # magic, sync marker, crc32 of the first 12 bytes
HEADER = struct.Struct("<8sIII")  # a record's: sync, length, crc32(payload), crc32(16 bytes)
V1_HEADER = struct.Struct("<II")  # a version 1 record's: length, crc32(payload)
_SEALED = struct.Struct("<II")  # length, crc32(payload): with the sync, what the header crc covers
_U32 = struct.Struct("<I")
SUFFIX = ".journal"
MARKER = "marker"
QUARANTINE = "quarantine"
MAX_RECORD = 1 << 31

log = logging.getLogger("triolytics.journal")


class Position(NamedTuple):
    segment: int
    offset: int


class Damage(NamedTuple):
    segment: int
    start: int
    end: int
    kind: str  # "torn" or "damaged"
    saved: Path | None  # the quarantine copy (None if it could not be written)


class Segment(NamedTuple):
    version: int  # 2, 1, or 0 for an empty file
    sync: bytes | None  # what its records were read with (version 2)
    intact: bool  # a version 2 header that checks: the segment can be appended to
    records: list[tuple[int, int, bytes]]  # (start, end, payload)
    damaged: list[tuple[int, int]]  # (start, end)


class JournalError(Exception):
    pass


IOV_MAX = 1024  # buffers per writev (the Linux limit)

# A span of a segment: (start, end, payload) of a valid record, (start, end, None) of a
# damaged range.
Span = tuple[int, int, bytes | None]


def segment_header(sync: bytes) -> bytes:
    head = MAGIC + sync
    return head + _U32.pack(zlib.crc32(head))


def header_sync(data: bytes) -> bytes | None:
    """The sync marker of an intact version 2 segment header, else None."""
    if len(data) < SEGMENT_HEADER.size:
        return None
    magic, sync, crc = SEGMENT_HEADER.unpack_from(data)
    if magic != MAGIC or zlib.crc32(data[:12]) != crc:
        return None
    return sync


def _payload_at(data: bytes, sync: bytes, at: int) -> bytes | None:
    """The payload of the valid record at `at`, else None."""
    if at + HEADER.size > len(data):
        return None
    mark, length, crc, sealed = HEADER.unpack_from(data, at)
    end = at + HEADER.size + length
    if mark != sync or end > len(data) or \
            zlib.crc32(_SEALED.pack(length, crc), zlib.crc32(sync)) != sealed:
        return None
    payload = data[at + HEADER.size:end]
    return payload if zlib.crc32(payload) == crc else None


def _resync(data: bytes, sync: bytes, at: int) -> int:
    """The next offset from `at` where a valid record starts, else the end of `data`."""
    while (at := data.find(sync, at)) >= 0:
        if _payload_at(data, sync, at) is not None:
            return at
        at += 1
    return len(data)


def _spans(data: bytes, sync: bytes, start: int) -> Iterator[Span]:
    # `_payload_at` inlined: this runs once per record, and the call costs about a
    # quarter more per record.
    size, seed, unpack, crc32 = len(data), zlib.crc32(sync), HEADER.unpack_from, zlib.crc32
    at = start
    while at < size:
        payload = None
        if at + HEADER.size <= size:
            mark, length, crc, sealed = unpack(data, at)
            end = at + HEADER.size + length
            if mark == sync and end <= size and crc32(_SEALED.pack(length, crc), seed) == sealed:
                payload = data[at + HEADER.size:end]
                if crc32(payload) != crc:
                    payload = None
        if payload is None:
            end = _resync(data, sync, at + 1)
        yield at, end, payload
        at = end


def _spans_v1(data: bytes, start: int) -> Iterator[Span]:
    at = start
    while at + V1_HEADER.size <= len(data):
        length, crc = V1_HEADER.unpack_from(data, at)
        end = at + V1_HEADER.size + length
        if end > len(data):
            break
        payload = data[at + V1_HEADER.size:end]
        if zlib.crc32(payload) != crc:
            break
        yield at, end, payload
        at = end
    if at < len(data):
        yield at, len(data), None


def read_segment(data: bytes, sync: bytes, start: int = SEGMENT_HEADER.size
                 ) -> tuple[list[tuple[int, int, bytes]], list[tuple[int, int]]]:
    """The valid records of a version 2 segment from `start`, as (start, end, payload),
    and the damaged ranges between them, as (start, end)."""
    return _split(_spans(data, sync, start))


def _split(spans: Iterable[Span]) -> tuple[list[tuple[int, int, bytes]], list[tuple[int, int]]]:
    records, damaged = [], []
    for start, end, payload in spans:
        if payload is None:
            damaged.append((start, end))
        else:
            records.append((start, end, payload))
    return records, damaged


def _damaged(spans: Iterable[Span]) -> list[tuple[int, int, int]]:
    """The damaged ranges among `spans`, as (start, end, valid records after it)."""
    ranges, found = [], 0
    for start, end, payload in spans:
        if payload is None:
            ranges.append((start, end, found))
        else:
            found += 1
    return [(start, end, found - before) for start, end, before in ranges]


class _Layout(NamedTuple):
    version: int
    sync: bytes | None
    intact: bool
    spans: Iterator[Span]


def _layout(data: bytes, marker: bytes | None, start: int) -> _Layout:
    """How a segment's bytes read from `start` (see `Segment`); the spans are lazy."""
    if not data:
        return _Layout(0, marker, False, iter(()))
    own = header_sync(data)
    if own is not None:
        return _Layout(2, own, True, _spans(data, own, max(start, SEGMENT_HEADER.size)))
    if data[:len(MAGIC)] == MAGIC or (marker is not None and marker in data):
        if marker is None:  # nothing to resync with
            rest = [(start, len(data), None)] if start < len(data) else []
            return _Layout(2, None, False, iter(rest))
        return _Layout(2, marker, False, _spans(data, marker, start))
    return _Layout(1, None, False, _spans_v1(data, start))


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write `path` whole (0600): a temporary file, fsync, rename, fsync the directory."""
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    fsync_path(path.parent)


class Journal:
    def __init__(self, directory: str | os.PathLike, segment_bytes: int, *,
                 sync_on_rotate: bool = True) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.sync_on_rotate = sync_on_rotate
        self.fd = -1
        self.segment = 0
        self.offset = 0
        self.marker: bytes | None = None  # the sync marker (set by `open`)
        self._marker_crc = 0  # crc32(marker): the start of every record header's crc
        self.torn_bytes = 0  # dropped from the tail when opened
        self.damage: list[Damage] = []  # torn and damaged ranges found, in order found
        self._noted: set[tuple[int, int, int]] = set()
        self.lock = threading.Lock()  # held to sync or to close a segment (rotation)

    # --- lifecycle
    def open(self) -> Position:
        """Open for appending after the last valid record; returns that position."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.marker = self._open_marker()
        self._marker_crc = zlib.crc32(self.marker)
        segments = self.segments()
        if not segments:
            self._create(1)
            return self.position
        last = segments[-1]
        data = self.path(last).read_bytes()
        layout = _layout(data, self.marker, 0)
        damaged = _damaged(layout.spans)
        self._note(last, data, damaged, last=True)
        size = self._cut_torn(last, damaged, len(data))
        if size == 0:
            self._create(last)
        elif layout.intact:
            self.fd = os.open(self.path(last), os.O_RDWR | os.O_APPEND)
            self.segment, self.offset = last, size
        else:
            self._create(last + 1)
        return self.position

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    @property
    def position(self) -> Position:
        return Position(self.segment, self.offset)

    @property
    def quarantine_dir(self) -> Path:
        return self.dir / QUARANTINE

    def path(self, segment: int) -> Path:
        return self.dir / f"{segment:012d}{SUFFIX}"

    def segments(self) -> list[int]:
        return sorted(int(p.name[: -len(SUFFIX)]) for p in self.dir.glob("*" + SUFFIX)
                      if p.name[: -len(SUFFIX)].isdigit())

    def _create(self, segment: int) -> None:
        """Make `segment` (or reuse it, empty) with its header, durably, and append to it."""
        self._start(segment)
        os.fdatasync(self.fd)
        fsync_path(self.dir)

    def _start(self, segment: int) -> None:
        fd = os.open(self.path(segment), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.fd, self.segment, self.offset = fd, segment, 0
        self._write_header()

    def _write_header(self) -> None:
        try:
            self._write_all([segment_header(self.marker)])
        except OSError:
            self._undo(0)
            raise
        self.offset = SEGMENT_HEADER.size

    def _cut_torn(self, segment: int, damaged: list[tuple[int, int, int]], size: int) -> int:
        """Truncate a torn tail (noted already); returns the size left."""
        if not damaged or damaged[-1][1] != size:
            return size
        start = damaged[-1][0]
        self.torn_bytes += size - start
        os.truncate(self.path(segment), start)
        fsync_path(self.path(segment))
        return start

    # --- the sync marker
    def read_marker(self) -> bytes | None:
        """The directory's sync marker, changing nothing: the newest intact segment
        header's, else the marker file's; None if there is neither."""
        return self._marker_in_headers() or self._marker_file()

    def _open_marker(self) -> bytes:
        stored = self._marker_file()
        found = self._marker_in_headers()
        if found is not None and stored != found:
            log.error("journal marker file %s is %s; using the marker of the intact segment "
                      "headers and writing it again", self.dir / MARKER,
                      "missing or unreadable" if stored is None else "damaged")
        marker = found or stored or os.urandom(SYNC_SIZE)
        if marker != stored:
            _write_file(self.dir / MARKER, marker)
        return marker

    def _marker_file(self) -> bytes | None:
        try:
            stored = (self.dir / MARKER).read_bytes()
        except OSError:
            return None
        return stored if len(stored) == SYNC_SIZE else None

    def _marker_in_headers(self) -> bytes | None:
        for segment in reversed(self.segments()):
            try:
                with open(self.path(segment), "rb") as f:
                    sync = header_sync(f.read(SEGMENT_HEADER.size))
            except OSError:
                continue
            if sync is not None:
                return sync
        return None

    # --- writing (one thread at a time)
    def append(self, payloads: list[bytes]) -> Position:
        if not payloads:
            return self.position
        try:
            if self.offset >= self.segment_bytes:
                self._rotate()
            if self.offset == 0:  # a rotation that could not write the header
                self._write_header()
        except OSError as exc:
            raise JournalError(f"journal rotation failed: {exc}") from exc
        # Headers and payloads go out as they are (writev): joining a group into one
        # buffer costs a copy, and page faults for every fresh large buffer.
        sync, seed = self.marker, self._marker_crc
        crc32, pack, seal = zlib.crc32, HEADER.pack, _SEALED.pack
        parts: list[bytes] = []
        add = parts.append
        for p in payloads:
            length, crc = len(p), crc32(p)
            add(pack(sync, length, crc, crc32(seal(length, crc), seed)))
            add(p)
        size = sum(map(len, parts))
        try:
            self._write_all(parts)
        except OSError as exc:
            self._undo(self.offset)
            raise JournalError(f"journal write failed: {exc}") from exc
        self.offset += size
        return self.position

    def _write_all(self, parts: list[bytes]) -> None:
        for i in range(0, len(parts), IOV_MAX):
            chunk = parts[i:i + IOV_MAX]
            want = sum(map(len, chunk))
            written = os.writev(self.fd, chunk)
            if written < want:  # a short write (rare on a file): finish it plainly
                view = memoryview(b"".join(chunk))
                while written < want:
                    written += os.write(self.fd, view[written:])

    def sync(self) -> None:
        with self.lock:
            if self.fd < 0:
                return
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                raise JournalError(f"journal sync failed: {exc}") from exc

    def _undo(self, offset: int) -> None:
        try:
            os.ftruncate(self.fd, offset)
        except OSError:
            pass

    def _rotate(self, segment: int | None = None) -> None:
        with self.lock:
            if self.fd >= 0:  # not when a rotation failed to open the next segment
                if self.sync_on_rotate:
                    os.fdatasync(self.fd)
                os.close(self.fd)
                self.fd = -1
            self._start(segment or self.segment + 1)
            if self.sync_on_rotate:
                fsync_path(self.dir)

    def skip_past(self, position: Position) -> None:
        """Make the next append land after `position`. DuckDB may hold a mark beyond the
        journal's end when the journal lost an unsynced tail (fsync off/interval and a
        power cut); appending below the mark would hide new records from replay."""
        if position > self.position:
            self._rotate(position.segment + 1)

    # --- reading and releasing
    def read(self, segment: int, start: int = 0) -> Segment:
        """Segment `segment` from byte `start`, as found on disk (nothing is noted,
        truncated or quarantined)."""
        data = self.path(segment).read_bytes()
        layout = _layout(data, self.marker or self.read_marker(), start)
        return Segment(layout.version, layout.sync, layout.intact, *_split(layout.spans))

    def records(self, start: Position) -> Iterator[tuple[bytes, Position]]:
        """Every intact record after `start`, with the position just past it; damage
        on the way is noted (see the module docstring)."""
        marker = self.marker or self.read_marker()
        segments = self.segments()
        for segment in segments:
            if segment < start.segment:
                continue
            data = self.path(segment).read_bytes()
            begin = start.offset if segment == start.segment else 0
            damaged, found = [], 0
            for at, end, payload in _layout(data, marker, begin).spans:
                if payload is None:
                    damaged.append((at, end, found))
                    continue
                found += 1
                yield payload, Position(segment, end)
            self._note(segment, data, [(at, end, found - before) for at, end, before in damaged],
                       last=segment == segments[-1])

    def release(self, loaded: Position) -> int:
        """Delete segments wholly before `loaded`; returns how many."""
        removed = 0
        for segment in self.segments():
            if segment < loaded.segment and segment != self.segment:
                self.path(segment).unlink(missing_ok=True)
                removed += 1
        return removed

    # --- damage
    def damage_summary(self) -> dict:
        damaged = [d for d in self.damage if d.kind == "damaged"]
        return {
            "journal_damaged_ranges": len(damaged),
            "journal_damaged_bytes": sum(d.end - d.start for d in damaged),
            "journal_torn_bytes": sum(d.end - d.start for d in self.damage if d.kind == "torn"),
            "journal_quarantine_dir": str(self.quarantine_dir),
        }

    def _note(self, segment: int, data: bytes, damaged: list[tuple[int, int, int]], *,
              last: bool) -> None:
        """Quarantine, list and log each (start, end, valid records after it) not noted
        before."""
        for start, end, after in damaged:
            if (segment, start, end) in self._noted:
                continue
            self._noted.add((segment, start, end))
            kind = "torn" if last and end == len(data) else "damaged"
            found = Damage(segment, start, end, kind, self._quarantine(segment, start, end, data))
            self.damage.append(found)
            self._log(found, after)

    def _quarantine(self, segment: int, start: int, end: int, data: bytes) -> Path | None:
        path = self.quarantine_dir / f"{segment:012d}-{start}-{end}.bin"
        if path.exists():
            return path
        try:
            if not self.quarantine_dir.exists():
                self.quarantine_dir.mkdir(mode=0o700)
                fsync_path(self.dir)
            _write_file(path, data[start:end])
        except OSError as exc:
            log.error("could not quarantine journal bytes %d-%d of %s in %s: %s",
                      start, end, self.path(segment), path, exc)
            return None
        return path

    def _log(self, found: Damage, after: int) -> None:
        size = found.end - found.start
        if found.kind == "torn":
            log.warning("torn journal tail in %s: bytes %d-%d (%d bytes), a write cut short "
                        "(never acknowledged); copy in %s",
                        self.path(found.segment), found.start, found.end, size, found.saved)
        else:
            log.error("journal damage in %s: bytes %d-%d (%d bytes) hold no valid record; "
                      "%d intact records after it in that segment were kept; copy in %s",
                      self.path(found.segment), found.start, found.end, size, after,
                      found.saved)


class Syncer:
    """A thread that makes the journal durable behind the writer.

    The writer appends on its own thread and calls `request(position)`; this thread
    fdatasyncs and calls `notify(position, error)` (from this thread) once everything up
    to `position` is durable. Requests made while a sync runs are merged into the next
    one, so a busy writer costs one sync per sync-duration, and no thread hand-off per
    write. `os.write` and `fdatasync` on one file may run concurrently; only rotation
    (which closes a file) takes `journal.lock`, as the sync does.
    """

    def __init__(self, journal: Journal, notify) -> None:
        self.journal = journal
        self.notify = notify
        self._cond = threading.Condition()
        self._target: Position | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="journal-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request(self, position: Position) -> None:
        with self._cond:
            self._target = position
            self._cond.notify()

    def stop(self) -> None:
        """Finish the pending sync (if any) and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._target is None and not self._stopping:
                    self._cond.wait()
                target, self._target = self._target, None
                if target is None:
                    return
            try:
                self.journal.sync()
            except JournalError as exc:
                self.notify(target, exc)
            else:
                self.notify(target, None)
