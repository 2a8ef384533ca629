"""Server-side sessions for both APIs: live sessions and one timer heap (pure).

Rules:
- A session belongs to a key `(project, channel, id)`: the `analytics_id` on the
  WebSocket, `anonymousId` (else `userId`) over HTTP. Connections and requests with the
  same key share its session.
- Times are wall-clock µs passed in (the events' receive time); nothing here reads a clock.
- An event costs O(1): `touch` updates `last_seen` and `count`. Each live session has one
  heap entry, pushed with the deadline it had then; `expire(now)` pops due entries and
  re-pushes those active since (lazy invalidation, as trio's own deadline heap does).
  Only deadlines that pop cost O(log n).
- Opening a session appends its `session_start` row to the caller's row list, just
  before the event that opened it; ending one makes its `session_end` row. Both are
  ordinary rows: the journal makes them durable.
- A session's rows sort as a session by `timestamp` (then `ingest_seq`, the arrival
  order the store assigns), whatever the clients' clocks say:
  - `session_start` is stamped `first` = the earliest event time of the request or frame
    that opened it (for its key), or its receive time if that is earlier;
  - a later event whose time is before `first` is stored at `first` (the client's own
    time stays in `original_timestamp`); ties sort by arrival, and the start arrives
    just before its opening event;
  - `session_end` is stamped last activity + timeout, or the latest event time stored
    in the session (`latest`) if that is later. It arrives after all its events.
  Activity (`started`, `last_seen`, the timeout, `duration_ms`) is receive time only.
"""

from __future__ import annotations

import heapq
from itertools import count

import msgspec

from triolytics.core.dedup import Dedup, dedup_key, dedup_keys
from triolytics.core.rows import Row

Key = tuple[str, str, str]  # (project, channel, id)
Times = int | list[int]  # event times (µs): one for all of some events, or one each
SESSION_TYPES = frozenset({"session_start", "session_end"})  # the rows made here
_new_row = tuple.__new__
_ENCODE = msgspec.json.Encoder()


def start_row(row_id: str, project: str, channel: str, anonymous_id: str | None,
              user_id: str | None, session_id: str, at: int, received: int) -> Row:
    """A `session_start` row, stamped `at` (see Rules), received `received`."""
    return _new_row(Row, (row_id, project, channel, "session_start", None, None, anonymous_id,
                          user_id, None, None, session_id, at, None, None, received, None,
                          None, None, None))


def end_row(row_id: str, project: str, channel: str, anonymous_id: str | None,
            user_id: str | None, session_id: str, started: int, last_seen: int, events: int,
            latest: int, timeout: int, received: int) -> Row:
    """A `session_end` row: stamped at last activity + timeout, or at the latest event
    time stored in the session if that is later; received `received`."""
    at = last_seen + timeout
    if latest > at:
        at = latest
    props = _ENCODE.encode(SessionEnd((last_seen - started) // 1000, events)).decode()
    return _new_row(Row, (row_id, project, channel, "session_end", None, None, anonymous_id,
                          user_id, None, None, session_id, at, None, None, received, props,
                          None, None, None))


class Session:
    __slots__ = ("key", "id", "started", "last_seen", "count", "anonymous_id", "user_id",
                 "first", "latest")

    def __init__(self, key: Key, session_id: str, started: int, anonymous_id: str | None,
                 user_id: str | None, last_seen: int | None = None, events: int = 0,
                 first: int | None = None, latest: int | None = None) -> None:
        self.key = key
        self.id = session_id
        self.started = started  # µs: receive time of its first event
        self.last_seen = started if last_seen is None else last_seen
        self.count = events
        self.anonymous_id = anonymous_id
        self.user_id = user_id
        self.first = started if first is None else first  # µs: its start row's timestamp
        # µs: the latest timestamp stored in the session (never before `first`)
        self.latest = self.first if latest is None else max(latest, self.first)


class SessionEnd(msgspec.Struct):
    """The `properties` of a `session_end` row."""

    duration_ms: int  # receive time of its first event to that of its last
    event_count: int


class Sessions:
    def __init__(self, timeout_us: int, new_id, *, ends: bool = True) -> None:
        self.timeout = timeout_us
        self.new_id = new_id  # () -> str, a fresh session id
        # False with many writers: ends are the shared reaper's (shared_state.py); a
        # local session idle for the timeout is only forgotten, and makes no row.
        self.ends = ends
        self.live: dict[Key, Session] = {}
        self._heap: list[tuple[int, int, Session]] = []  # (deadline, tie-break, session)
        self._stale: list[Session] = []  # restored, superseded by a newer one of its key
        self._ties = count()
        self.opened = 0
        self.ended = 0
        self._forgotten = 0  # sessions dropped by `forget_started` since the heap's rebuild

    def __len__(self) -> int:
        return len(self.live)

    def touch(self, key: Key, anonymous_id: str | None, user_id: str | None, now: int,
              rows: list[Row], events: int = 1, first: int | None = None) -> str:
        """The session id for `events` events of `key` received at `now` (see below)."""
        return self.touch_session(key, anonymous_id, user_id, now, rows, events, first).id

    def touch_session(self, key: Key, anonymous_id: str | None, user_id: str | None,
                      now: int, rows: list[Row], events: int = 1,
                      first: int | None = None) -> Session:
        """The session of `key` for `events` events received at `now`, the earliest of
        them at event time `first` (None: `now`). Opening a session (or replacing one
        that timed out but was not reaped yet) appends its `session_end`/`session_start`
        rows to `rows`; the start is stamped at `first`, or `now` if that is earlier.
        Stamping the events (`Intake.session`) is the caller's part."""
        s = self.live.get(key)
        if s is not None:
            if now - s.last_seen < self.timeout:
                if now > s.last_seen:
                    s.last_seen = now
                s.count += events
                return s
            end = self._end(s, now)
            if end is not None:
                rows.append(end)
        start = now if first is None or first > now else first
        s = Session(key, self.new_id(), now, anonymous_id, user_id, events=events, first=start)
        self.live[key] = s
        self.opened += 1
        self._push(s)
        rows.append(start_row(self.new_id(), key[0], key[1], anonymous_id, user_id, s.id,
                              start, now))
        return s

    def forget_started(self, rows: list[Row]) -> None:
        """`rows` were never stored (their journal write failed): the sessions their
        `session_start` rows opened are dropped, so that refused requests (a full disk)
        leave no live session without a stored start. Their heap entries are skipped
        when popped, and the heap is rebuilt once most of it is such entries."""
        live = self.live
        for row in rows:
            if row.type != "session_start":
                continue
            key = (row.project, row.channel, row.anonymous_id or row.user_id)
            s = live.get(key)
            if s is not None and s.id == row.session_id:
                del live[key]
                self.opened -= 1
                self._forgotten += 1
        if self._forgotten > 1024 and 2 * self._forgotten > len(self._heap):
            self._heap = [e for e in self._heap if live.get(e[2].key) is e[2]]
            heapq.heapify(self._heap)
            self._forgotten = 0

    def forget_person(self, kind: str, value: str, project: str | None) -> int:
        """Drop the live sessions of one person (`triolytics forget`): no `session_end`
        row with their ids is stored later. O(live sessions); returns how many."""
        gone = [k for k, s in self.live.items()
                if (s.user_id if kind == "user" else s.anonymous_id) == value
                and (project is None or k[0] == project)]
        for key in gone:
            del self.live[key]
            self.opened -= 1
            self._forgotten += 1
        return len(gone)

    def current(self, key: Key) -> str | None:
        """The live session id of `key`, touching nothing."""
        s = self.live.get(key)
        return s.id if s is not None else None

    def _push(self, s: Session) -> None:
        heapq.heappush(self._heap, (s.last_seen + self.timeout, next(self._ties), s))

    def next_deadline(self) -> int | None:
        """When the earliest entry pops (it may be re-pushed then); None when empty."""
        if self._stale:
            return self._stale[-1].last_seen + self.timeout
        return self._heap[0][0] if self._heap else None

    def expire(self, now: int, limit: int) -> list[Row]:
        """`session_end` rows of the sessions idle for the timeout at `now`, looking at
        no more than `limit` due heap entries (call again while `next_deadline() <= now`)."""
        heap, live = self._heap, self.live
        ended: list[Row] = []
        while self._stale and limit > 0:
            limit -= 1
            end = self._end(self._stale.pop(), now)
            if end is not None:
                ended.append(end)
        while heap and heap[0][0] <= now and limit > 0:
            limit -= 1
            _, _, s = heapq.heappop(heap)
            if live.get(s.key) is not s:
                continue  # replaced (or ended) since it was pushed
            if s.last_seen + self.timeout > now:
                self._push(s)  # active since: its deadline moved on
                continue
            end = self._end(s, now)
            if end is not None:
                ended.append(end)
        return ended

    def adopt(self, key: Key, local: str, shared: str) -> None:
        """Many writers: the live session `local` of `key` is known to all as `shared`
        (another writer opened the key's session first)."""
        s = self.live.get(key)
        if s is not None and s.id == local:
            s.id = shared

    def _end(self, s: Session, now: int) -> Row | None:
        """Its `session_end` row, received `now`: stamped at last activity + timeout, or
        at the latest event time stored in the session if that is later. None when
        ends are not this tracker's (`ends`): the session is only forgotten."""
        if self.live.get(s.key) is s:
            del self.live[s.key]
        if not self.ends:
            return None
        self.ended += 1
        return end_row(self.new_id(), s.key[0], s.key[1], s.anonymous_id, s.user_id, s.id,
                       s.started, s.last_seen, s.count, s.latest, self.timeout, now)

    def restore(self, sessions: list[Session]) -> None:
        """Sessions found open in storage at start-up (expired ones end at the next
        `expire`). Of two open sessions of one key, the older ends at once."""
        for s in sorted(sessions, key=lambda s: s.last_seen):
            older = self.live.get(s.key)
            if older is not None:  # its end was not durable before the newer one began
                self._stale.append(older)
            self.live[s.key] = s
            self._push(s)


class Intake:
    """One request's (or WebSocket frame's) admission: a repeated client id is dropped
    before it can touch a session; the rows to store collect in order, session starts
    included. Nothing may refuse the rows after this (the caller waited for room first),
    except a journal failure, which forgets `keys` again."""

    __slots__ = ("rows", "keys", "now", "duplicates", "dedup", "sessions", "_last",
                 "_opened")

    def __init__(self, dedup: Dedup, sessions: Sessions, now: int) -> None:
        self.rows: list[Row] = []
        self.keys: list[str] = []  # dedup keys admitted here
        self.now = now  # µs, receive time
        self.duplicates = 0
        self.dedup = dedup
        self.sessions = sessions
        self._last: Session | None = None  # the session the previous event touched
        self._opened: dict[Session, int] | None = None  # opened here -> its start row's index

    def fresh(self, project: str, message_id: str) -> bool:
        """False if `message_id` was stored recently (the event is answered as stored)."""
        key = dedup_key(project, message_id)
        if not self.dedup.admit(key, self.now):
            self.duplicates += 1
            return False
        self.keys.append(key)
        return True

    def fresh_all(self, project: str, message_ids: list[str | None]) -> list[bool]:
        """`fresh` for each id in turn (None: the event has none, so it is fresh), in
        one call: a batch's ids."""
        keys = dedup_keys(project, [m for m in message_ids if m is not None])
        admitted = self.dedup.admit_all(keys, self.now)
        self.keys += [k for k, ok in zip(keys, admitted, strict=True) if ok]
        self.duplicates += admitted.count(False)
        if None not in message_ids:
            return admitted
        given = iter(admitted)
        return [True if m is None else next(given) for m in message_ids]

    def session(self, key: Key, anonymous_id: str | None, user_id: str | None,
                times: Times, events: int = 1) -> tuple[str, Times]:
        """(session id, event times to store) for `events` more events of `key` at event
        times `times`: one value for all of them, or a list, one per event.

        A session opened by this intake starts at the earliest time its events carry
        here (or the receive time, if earlier): when a later event of the same intake is
        earlier still, the start row is restamped, so no event of the opening request is
        moved. In a session opened before, an event earlier than the start is stored at
        the start. Either way the session's `latest` follows. A batch's events mostly
        share one key: the previous event's session is reused without a lookup (same
        receive time, so still live)."""
        if type(times) is int:
            low = high = times
        else:
            low, high = min(times), max(times)
        s = self._last
        if s is not None and s.key == key:
            s.count += events
        else:
            rows = self.rows
            n = len(rows)
            self._last = s = self.sessions.touch_session(key, anonymous_id, user_id, self.now,
                                                         rows, events, low)
            if len(rows) != n:  # it opened here: its start is the last row
                if self._opened is None:
                    self._opened = {}
                self._opened[s] = len(rows) - 1
        if low < s.first:
            at = self._opened.get(s) if self._opened is not None else None
            if at is not None:
                s.first = low
                self.rows[at] = self.rows[at]._replace(timestamp=low)
            else:
                first = s.first
                times = first if type(times) is int else \
                    [t if t >= first else first for t in times]
                if high < first:
                    high = first
        if high > s.latest:
            s.latest = high
        return s.id, times
