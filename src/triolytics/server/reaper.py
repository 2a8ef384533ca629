"""The session reaper: sleeps until the earliest session deadline, then stores the
`session_end` rows of the sessions that timed out.

Rules:
- Deadlines are wall-clock µs from the injected clock (sessions outlive the process);
  the reaper sleeps on trio's clock for the difference, so `autojump_clock` drives tests
  whose wall clock is derived from `trio.current_time()`.
- Work per step is bounded (`session_end_chunk_rows` heap pops) and each step's rows go
  to the writer as one list, so 100,000 sessions ending at once never stall the loop.
- Ended sessions are removed from memory before their rows are durable: if the process
  dies in between, they are still open in storage and end again at the next start.
  A refusal by the writer (busy) is retried; shutting down ends the reaper.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import time_ns

import trio

from triolytics.core.errors import ApiError
from triolytics.core.sessions import Sessions
from triolytics.core.shared import end_row
from triolytics.storage.writer import Writer

log = logging.getLogger("triolytics.sessions")
RETRY_S = 1.0  # after the writer refused session_end rows
MIN_SLEEP_S = 0.001


async def reap_sessions(sessions: Sessions, writer: Writer, chunk: int,
                        clock: Callable[[], int] = time_ns, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    while True:
        now = clock() // 1000
        deadline = sessions.next_deadline()
        if deadline is None or deadline > now:
            wait_us = sessions.timeout if deadline is None else deadline - now
            await trio.sleep(max(wait_us / 1e6, MIN_SLEEP_S))
            continue
        rows = sessions.expire(now, chunk)
        if not rows:
            await trio.lowlevel.checkpoint()
            continue
        if not await _store_ends(writer, rows):
            return  # the sessions are still open in storage: they end next start


async def _store_ends(writer: Writer, rows: list) -> bool:
    """Store `rows` (session ends), trying again while the writer refuses them; False
    if it closes first."""
    while True:
        try:
            await writer.store_rows(rows)
            return True
        except ApiError as exc:
            if writer.closing:
                return False
            log.warning("could not store %d session_end rows (%s); retrying", len(rows),
                        exc.message)
            await trio.sleep(RETRY_S)


async def reap_shared(shared, writer: Writer, chunk: int, timeout_us: int, interval_s: float,
                      new_id: Callable[[], str], stop: trio.Event,
                      clock: Callable[[], int] = time_ns, *,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Many writers (shared_state.py): every `interval_s`, claim the sessions idle for the
    timeout (any writer's), store their `session_end` rows, then forget them; ids past
    the dedup window are dropped once a minute. A claim whose rows could not be stored
    (shutting down) is released for another writer; one that dies with us is settled at
    our next start. Returns on `stop` (what is idle then is ended by whoever runs)."""
    task_status.started()
    forgot_at = 0.0
    while not stop.is_set():
        now = clock() // 1000
        try:
            claimed = await trio.to_thread.run_sync(shared.claim_expired, now, chunk)
            if trio.current_time() - forgot_at >= 60:
                forgot_at = trio.current_time()
                await trio.to_thread.run_sync(shared.forget_ids, now)
        except Exception as exc:
            log.warning("%s; retrying", exc)
            with trio.move_on_after(interval_s):
                await stop.wait()
            continue
        if claimed:
            rows = [end_row(c, timeout_us, now, new_id()) for c in claimed]
            ids = [c[0] for c in claimed]
            if not await _store_ends(writer, rows):
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(shared.release, ids)
                return
            while True:
                try:
                    await trio.to_thread.run_sync(shared.finish, ids)
                    break
                except Exception as exc:  # (stored: settled at the next start at worst)
                    log.warning("%s; retrying", exc)
                    await trio.sleep(RETRY_S)
            if len(claimed) == chunk:
                continue
        with trio.move_on_after(interval_s):
            await stop.wait()
