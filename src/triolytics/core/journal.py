"""The write-ahead journal: numbered segment files of checksummed records.

Rules:
- A record is `<u32 length><u32 crc32(payload)><payload>`; the payload is opaque here.
- One thread appends at a time (the writer's); `append` writes a whole group with one
  `write` and returns the `Position` just past it. `sync` makes it durable (fdatasync).
- A `Position` is (segment number, byte offset). Everything before the position that
  DuckDB records as loaded is disposable: `release` deletes whole segments before it.
- Opening truncates a torn tail (a record cut short or failing its checksum in the last
  segment): it was never acknowledged, since acks follow the write.
- No trio, no DuckDB: plain file I/O, so it is tested without an event loop.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

HEADER = struct.Struct("<II")
SUFFIX = ".journal"
MAX_RECORD = 1 << 31


class Position(NamedTuple):
    segment: int
    offset: int


class JournalError(Exception):
    pass


IOV_MAX = 1024  # buffers per writev (the Linux limit)


def scan(data: bytes | memoryview, start: int = 0) -> Iterator[tuple[bytes, int]]:
    """Yield (payload, end offset) for each valid record from `start`; stop at the first
    incomplete or corrupt one."""
    end = len(data)
    at = start
    while at + HEADER.size <= end:
        length, crc = HEADER.unpack_from(data, at)
        stop = at + HEADER.size + length
        if stop > end:
            return
        payload = bytes(data[at + HEADER.size:stop])
        if zlib.crc32(payload) != crc:
            return
        yield payload, stop
        at = stop


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    def __init__(self, directory: str | os.PathLike, segment_bytes: int, *,
                 sync_on_rotate: bool = True) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.sync_on_rotate = sync_on_rotate
        self.fd = -1
        self.segment = 0
        self.offset = 0
        self.torn_bytes = 0  # dropped from the tail when opened
        self.lock = threading.Lock()  # held to sync or to close a segment (rotation)

    # --- lifecycle
    def open(self) -> Position:
        """Open for appending after the last valid record; returns that position."""
        self.dir.mkdir(parents=True, exist_ok=True)
        segments = self.segments()
        self.segment = segments[-1] if segments else 1
        path = self.path(self.segment)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        data = Path(path).read_bytes()
        valid = 0
        for _payload, end in scan(data):
            valid = end
        if valid < len(data):
            self.torn_bytes = len(data) - valid
            os.ftruncate(self.fd, valid)
            os.fsync(self.fd)
        self.offset = valid
        if not segments:
            _fsync_dir(self.dir)
        return self.position

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    @property
    def position(self) -> Position:
        return Position(self.segment, self.offset)

    def path(self, segment: int) -> Path:
        return self.dir / f"{segment:012d}{SUFFIX}"

    def segments(self) -> list[int]:
        return sorted(int(p.name[: -len(SUFFIX)]) for p in self.dir.glob("*" + SUFFIX)
                      if p.name[: -len(SUFFIX)].isdigit())

    # --- writing (one thread at a time)
    def append(self, payloads: list[bytes]) -> Position:
        if not payloads:
            return self.position
        if self.offset >= self.segment_bytes:
            self._rotate()
        # Headers and payloads go out as they are (writev): joining a group into one
        # buffer costs a copy, and page faults for every fresh large buffer.
        parts: list[bytes] = []
        for p in payloads:
            parts.append(HEADER.pack(len(p), zlib.crc32(p)))
            parts.append(p)
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
            if self.sync_on_rotate:
                os.fdatasync(self.fd)
            os.close(self.fd)
            self.segment = segment or self.segment + 1
            self.offset = 0
            self.fd = os.open(self.path(self.segment),
                              os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            if self.sync_on_rotate:
                _fsync_dir(self.dir)

    def skip_past(self, position: Position) -> None:
        """Make the next append land after `position`. DuckDB may hold a mark beyond the
        journal's end when the journal lost an unsynced tail (fsync off/interval and a
        power cut); appending below the mark would hide new records from replay."""
        if position > self.position:
            self._rotate(position.segment + 1)

    # --- reading and releasing
    def records(self, start: Position) -> Iterator[tuple[bytes, Position]]:
        """Every record after `start`, with the position just past it."""
        for segment in self.segments():
            if segment < start.segment:
                continue
            data = self.path(segment).read_bytes()
            begin = start.offset if segment == start.segment else 0
            for payload, end in scan(data, begin):
                yield payload, Position(segment, end)

    def release(self, loaded: Position) -> int:
        """Delete segments wholly before `loaded`; returns how many."""
        removed = 0
        for segment in self.segments():
            if segment < loaded.segment and segment != self.segment:
                self.path(segment).unlink(missing_ok=True)
                removed += 1
        return removed


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
