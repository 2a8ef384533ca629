"""What a group of rows asks of state shared by many writers, and how the answer changes
the group (pure; storage/shared_state.py is the PostgreSQL side).

Rules:
- With many writers (workers, nodes), each writer still assigns sessions and drops
  repeated ids locally (sessions.py, dedup.py), as one writer does; before a group is
  journaled, `summarize` says what the group did to each session it touched and which
  client ids it stores, the shared state answers with the session id each key really
  has (the one another writer opened first, if any) and which ids another writer stored
  already, and `rewrite` makes the group say so: its rows take the shared session id,
  start rows of sessions another writer opened are dropped, repeated events are dropped.
- A session is known by its local id in the group: the id its rows carry. Its key is
  (project, channel, anonymous_id or user_id), as in sessions.py.
- `session_end` rows are the shared reaper's (every writer's local ends are off), so
  they are passed through untouched.
- Work is per row only for rows whose session id or message id varies inside a part;
  a WebSocket batch is one session (one lookup), an HTTP batch by column is one or a
  list.
"""

from __future__ import annotations

from itertools import repeat
from typing import NamedTuple

from triolytics.core.rows import Columns, Part, Row, RtColumns
from triolytics.core.sessions import end_row as session_end_row

_new_row = tuple.__new__
# Row field indexes
_PROJECT, _CHANNEL, _TYPE, _ANON, _USER, _SID, _TS, _RECV = 1, 2, 3, 6, 7, 10, 11, 14
_MID = 0
_SESSION_KINDS = frozenset({"session_start", "session_end"})


class Touch(NamedTuple):
    """What a group did to one session (local id), for the shared state."""

    project: str
    channel: str
    key: str  # anonymous_id, else user_id
    anonymous_id: str | None
    user_id: str | None
    opened: bool  # the group holds its session_start row
    events: int
    first_received: int  # µs
    last_received: int
    first_ts: int  # µs: its events' earliest time (the start row's, if opened here)
    latest_ts: int


class Summary(NamedTuple):
    sessions: dict[str, Touch]  # local session id -> what the group did to it
    ids: list[str]  # dedup keys (project \x1f message_id) of the events stored


def summarize(parts: list[Part]) -> Summary:
    acc: dict[str, list] = {}
    ids: list[str] = []
    for part in parts:
        if type(part) is RtColumns:
            _columns(acc, ids, part.columns())
        elif type(part) is Columns:
            _columns(acc, ids, part)
        else:
            for row in part:
                _row(acc, ids, row)
    return Summary({sid: Touch(*a) for sid, a in acc.items()}, ids)


def _add(acc: dict[str, list], sid: str, project: str, channel: str, anonymous_id, user_id,
         kind: str, received: int, ts: int, n: int = 1) -> None:
    a = acc.get(sid)
    if a is None:
        acc[sid] = [project, channel, anonymous_id or user_id or "", anonymous_id, user_id,
                    kind == "session_start", 0 if kind == "session_start" else n, received,
                    received, ts, ts]
        return
    if kind == "session_start":
        a[5] = True
    else:
        a[6] += n
    if received < a[7]:
        a[7] = received
    if received > a[8]:
        a[8] = received
    if ts < a[9]:
        a[9] = ts
    if ts > a[10]:
        a[10] = ts


def _row(acc, ids, row: Row) -> None:
    kind = row[_TYPE]
    sid = row[_SID]
    if sid is None or kind == "session_end":
        return
    if row[_MID] is not None and kind != "session_start":
        ids.append(f"{row[_PROJECT]}\x1f{row[_MID]}")
    _add(acc, sid, row[_PROJECT], row[_CHANNEL], row[_ANON], row[_USER], kind, row[_RECV],
         row[_TS])


def _columns(acc, ids, part: Columns) -> None:
    v = part.values
    n = part.count
    if not n:
        return
    project = v[_PROJECT]
    mids = v[_MID]
    if type(mids) is list:
        if type(project) is list:
            ids += [f"{p}\x1f{m}" for p, m in zip(project, mids, strict=True) if m is not None]
        else:
            ids += [f"{project}\x1f{m}" for m in mids if m is not None]
    elif mids is not None:
        ids.append(f"{project}\x1f{mids}")
    sid, kind, ts = v[_SID], v[_TYPE], v[_TS]
    plain = kind not in _SESSION_KINDS if type(kind) is not list else \
        _SESSION_KINDS.isdisjoint(kind)
    if plain and type(sid) is not list and type(project) is not list \
            and type(v[_ANON]) is not list and type(v[_USER]) is not list:
        if sid is None:
            return
        recv = v[_RECV]
        low = ts if type(ts) is not list else min(ts)
        high = ts if type(ts) is not list else max(ts)
        r_low = recv if type(recv) is not list else min(recv)
        r_high = recv if type(recv) is not list else max(recv)
        _add(acc, sid, project, v[_CHANNEL], v[_ANON], v[_USER], "track", r_low, low, n)
        _add(acc, sid, project, v[_CHANNEL], v[_ANON], v[_USER], "track", r_high, high, 0)
        return
    # A batch of several sessions or kinds: event by event, over the columns it needs.
    cols = [c if type(c) is list else repeat(c, n) for c in
            (sid, kind, project, v[_CHANNEL], v[_ANON], v[_USER], v[_RECV], ts)]
    for sid_, kind_, project_, channel, anon, user, recv, ts_ in zip(*cols, strict=True):
        if sid_ is None or kind_ == "session_end":
            continue
        a = acc.get(sid_)
        if a is None or kind_ == "session_start":
            _add(acc, sid_, project_, channel, anon, user, kind_, recv, ts_)
            continue
        a[6] += 1  # (as _add, inline: most events of a batch touch a known session)
        if recv < a[7]:
            a[7] = recv
        elif recv > a[8]:
            a[8] = recv
        if ts_ < a[9]:
            a[9] = ts_
        elif ts_ > a[10]:
            a[10] = ts_


def rewrite(parts: list[Part], shared: dict[str, str], repeated: set[str]) -> list[Part]:
    """The group as the shared state says: `shared` maps a local session id to the shared
    one (absent: unchanged); a session_start row whose session maps to another id is
    dropped (another writer opened it); events whose dedup key is in `repeated` are
    dropped. Parts untouched by either are returned as they are."""
    moved = {k: v for k, v in shared.items() if k != v}
    if not moved and not repeated:
        return parts
    out: list[Part] = []
    for part in parts:
        if type(part) is RtColumns:
            if part.session_id not in moved and not repeated:
                out.append(part)
                continue
            part = part.columns()
        if type(part) is Columns:
            if not _touched_columns(part, moved, repeated):
                out.append(part)
                continue
            part = part.rows()
        fixed = [_fix(row, moved, repeated) for row in part]
        if all(a is b for a, b in zip(fixed, part, strict=True)):
            out.append(part)
            continue
        rows = [r for r in fixed if r is not None]
        if rows:
            out.append(rows)
    return out


def _touched_columns(part: Columns, moved: dict[str, str], repeated: set[str]) -> bool:
    v = part.values
    sid = v[_SID]
    if (sid in moved) if type(sid) is not list else any(s in moved for s in sid):
        return True
    if not repeated:
        return False
    project, mids = v[_PROJECT], v[_MID]
    if type(mids) is not list:
        mids = [mids]
    if type(project) is list:
        return any(f"{p}\x1f{m}" in repeated for p, m in zip(project, mids, strict=False))
    return any(f"{project}\x1f{m}" in repeated for m in mids)


def _fix(row: Row, moved: dict[str, str], repeated: set[str]) -> Row | None:
    kind = row[_TYPE]
    if kind == "session_end":
        return row
    if repeated and row[_MID] is not None and kind != "session_start" \
            and f"{row[_PROJECT]}\x1f{row[_MID]}" in repeated:
        return None
    to = moved.get(row[_SID])
    if to is None:
        return row
    if kind == "session_start":
        return None  # another writer opened this key's session
    return row._replace(session_id=to)


def end_row(claim: tuple, timeout_us: int, now_us: int, row_id: str) -> Row:
    """The `session_end` row of a session the shared reaper claimed (shared_state.py's
    claim: session_id, project, channel, anonymous_id, user_id, started, last_seen,
    events, first_ts, latest_ts), stamped as sessions.py stamps one."""
    sid, project, channel, anonymous_id, user_id, started, last_seen, events, _, latest = claim
    return session_end_row(row_id, project, channel, anonymous_id, user_id, sid, started,
                           last_seen, events, latest, timeout_us, now_us)
