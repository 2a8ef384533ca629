"""The WebSocket at `/analytics`: the handshake, then one task per connection on our own frames.

Rules:
- The HTTP server calls `check` with the request h11 parsed. A refusal (400, 403, 426,
  503) is an `ApiError`, so h11 answers it as plain HTTP: no client is accepted and then
  closed. `upgrade` then owns the connection: it sends the `101` and runs the connection.
- Frames are parsed and built by `ws_frames`, driven by the connection's own task,
  which reads, validates and submits batches to the writer without waiting for the
  journal, and answers them in order once durable: the writer calls `_Peer.wake` when a
  group the connection waits for is done, which interrupts the task's wait. No second
  task, no message queue: an idle connection is its socket, one task and a frame reader
  (docs/performance.md measures why not trio-websocket).
- At most `ws_max_in_flight` batches wait for the journal; past that, or while the
  writer has no room, the task stops reading (TCP backpressure). Frames already read
  stay in the reader's buffer meanwhile.
- A client that sends no `seq` never receives a message; a batch of it that must be
  refused closes the connection with a close code instead (docs/websocket.md). Any close
  of ours comes after the answers owed for the batches before it.
- Quiet for `ws_ping_interval_s`: a ping; no pong within `ws_pong_timeout_s`: dropped
  without a closing handshake, as is a peer that takes none of our bytes for that long.
  No message for `ws_idle_timeout_s`: closed with 1000.
- A message must be whole within `ws_message_timeout_s` of its first byte (fragments and
  all), or the connection closes with 1008; time the task spends not reading (any
  backpressure) does not count. Fragments per message are capped by the frame reader.
- Event rates (`EventRates`, off by default): each message is charged its events once
  read. A connection in debt reads nothing until it is repaid (a timer, not a poll; ping,
  pong, idle and message timers wait with it), or, with `ws_rate_limit_action = "close"`,
  a message that comes while it is in debt is refused: closed with 1008.
- `drain()` (shutdown) stops every connection reading; the batches already read are
  answered, then the connection closes with 1001.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
from collections.abc import Callable
from time import time_ns
from urllib.parse import parse_qs

import msgspec
import trio

from triolytics.core.config import Config
from triolytics.core.dedup import Dedup
from triolytics.core.errors import ApiError
from triolytics.core.identity import Identities
from triolytics.core.privacy import anonymize_ip, do_not_track
from triolytics.core.ratelimit import EventRates
from triolytics.core.realtime import CLOSE_ERROR, CLOSE_POLICY, Batch, FrameError, Realtime
from triolytics.core.sessions import Intake, Sessions
from triolytics.core.web import Cors, Request
from triolytics.core.ws_frames import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    Fault,
    FrameReader,
    close_code,
    close_frame,
    frame,
)
from triolytics.storage.writer import Writer

log = logging.getLogger("triolytics.ws")
_FAILED = object()  # the answer of a batch without seq that could not be stored


class _Unstored:
    """The stand-in for the journal group of a batch not stored (do not track): done."""

    error = None
    renamed = None

    @property
    def done(self) -> _Unstored:
        return self

    @staticmethod
    def is_set() -> bool:
        return True


_UNSTORED = _Unstored()
CLOSE_TIMEOUT_S = 5.0  # a closing handshake the peer does not finish is cut after this
CLOSE_IDLE, CLOSE_GOING_AWAY = 1000, 1001
PING_PAYLOAD = b"triolytics"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
_ENCODE = msgspec.json.Encoder()


class Ack(msgspec.Struct, tag_field="type", tag="ack"):
    seq: int
    stored: int
    session_id: str | None


class Refusal(msgspec.Struct, tag_field="type", tag="error", omit_defaults=True):
    seq: int
    code: str
    message: str
    field: str | None = None


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


def handshake(request: Request) -> bytes:
    """The 101 answering a valid RFC 6455 opening handshake; ApiError otherwise."""
    h = request.headers
    if request.method != b"GET" or b"websocket" not in _tokens(h.get(b"upgrade", b"")) \
            or b"upgrade" not in _tokens(h.get(b"connection", b"")):
        raise ApiError("bad_request", "expected a WebSocket upgrade (GET with "
                       "Connection: Upgrade and Upgrade: websocket)")
    if h.get(b"sec-websocket-version", b"").strip() != b"13":
        raise ApiError("upgrade_required", "WebSocket version 13 only",
                       headers=((b"sec-websocket-version", b"13"),))
    key = h.get(b"sec-websocket-key", b"").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise ApiError("bad_request", "Sec-WebSocket-Key must be 16 bytes in base64")
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n")


class _Peer:
    """One accepted connection's state, kept small: thousands of them sit idle."""

    __slots__ = ("frames", "open", "pending", "scope", "stop", "close", "sending", "last",
                 "quiet", "pong_due", "since")

    def __init__(self, now: float, stop: bool, frames: FrameReader) -> None:
        self.frames = frames
        self.open = True  # no Close sent yet (ours, or the answer to the peer's)
        # (batch, group) in arrival order; a refused batch is (None, FrameError).
        self.pending: list = []  # (a list: 56 bytes empty, where a deque takes 600)
        self.scope: trio.CancelScope | None = None  # the wait in progress, if any
        self.stop = stop  # read nothing more: answer what is pending, then close
        self.close: tuple[int, str] | None = None  # (code, reason) to close with
        self.sending = False  # a send is in progress (a cancel there cuts a frame)
        self.last = now  # when the last message arrived
        self.quiet = now  # since the last message or ping
        self.pong_due: float | None = None  # a ping is unanswered until then
        self.since: float | None = None  # when the message under way began to arrive

    def wake(self) -> None:
        """Interrupt the connection's wait: a group it waits for is done, or drain."""
        if self.scope is not None:
            self.scope.cancel()


class RealtimeServer:
    def __init__(self, config: Config, writer: Writer, identities: Identities,
                 sessions: Sessions, clock: Callable[[], int] = time_ns) -> None:
        self.config = config
        self.writer = writer
        self.identities = identities
        self.sessions = sessions
        self.clock = clock  # wall clock, ns since epoch
        self.origins = Cors(config.ws_origins or ["*"])  # no list: any Origin
        self.peers: set[_Peer] = set()
        self.draining = False
        c = config
        self.rates = EventRates(c.ws_max_events_per_s, c.ws_burst_events,
                                c.ws_id_max_events_per_s, c.ws_id_burst_events,
                                c.max_connections) \
            if c.ws_max_events_per_s or c.ws_id_max_events_per_s else None
        self.rate_waits = self.rates is not None and c.ws_rate_limit_action == "wait"
        # Counted per message, read at scrape time (server/metrics.py): events answered
        # as stored, and messages refused by error code.
        self.events_received = 0
        self.refused: dict[str, int] = {}

    def _refused(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def drain(self) -> None:
        """Stop reading every connection; each closes with 1001 once answered."""
        self.draining = True
        for peer in self.peers:
            peer.stop = True
            peer.wake()

    # --- the handshake, on the HTTP connection's task
    def check(self, request: Request) -> tuple[Realtime, bytes]:
        """What the connection needs from its request (its analytics_id, the client's
        address and user agent) and the 101 to send; or ApiError (answered as HTTP)."""
        response = handshake(request)
        h = request.headers
        if self.draining or self.writer.closing:
            raise ApiError("unavailable", "server is shutting down; retry",
                           headers=((b"retry-after", b"1"),))
        if not self.origins.allowed(h.get(b"origin")):
            raise ApiError("forbidden_origin", "origin not allowed (ws_origins)")
        ids = parse_qs(request.query.decode("latin-1")).get("analytics_id")
        analytics_id = self.identities.check(ids[-1] if ids else None)
        ua = h.get(b"user-agent")
        ip = anonymize_ip(request.client_ip, self.config.ip_mode)  # (once per connection)
        context = {"ip": ip} if ip is not None else {}
        if ua:
            context["userAgent"] = ua.decode("latin-1")
        rt = Realtime(self.config, self.config.realtime_project, analytics_id,
                      _ENCODE.encode(context).decode())
        rt.untracked = self.config.respect_dnt and do_not_track(h)  # the whole connection
        return rt, response

    async def upgrade(self, stream: trio.abc.Stream, checked: tuple[Realtime, bytes],
                      trailing: bytes) -> None:
        """Own a connection whose request passed `check`: send the 101, then serve it.
        `trailing` holds what the client sent after the request head."""
        rt, response = checked
        peer = _Peer(trio.current_time(), self.draining, self._frame_reader())
        self.peers.add(peer)
        try:
            await stream.send_all(response)
            peer.frames.feed(trailing)
            await self._run(stream, rt, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone
        except Exception:  # a bug here must cost this connection only, never the server
            log.exception("WebSocket connection failed; closing it")
        finally:
            self.peers.discard(peer)
            if self.rates is not None:
                self.rates.forget(peer)

    def _frame_reader(self) -> FrameReader:
        return FrameReader(self.config.ws_max_message_bytes, self.config.ws_max_fragments)

    # --- one connection
    async def _run(self, stream: trio.abc.Stream, rt: Realtime, p: _Peer) -> None:
        """Read, submit, answer, ping, until the connection ends; close it as owed."""
        out: list[bytes] = []
        try:
            while True:
                if p.frames.ready() and not p.stop and self._may_take(rt, p):
                    self._take(rt, p, out)
                self._answers(p, out)
                if out:  # answers, pongs: one write
                    data = b"".join(out)
                    out.clear()
                    p.sending = True
                    with trio.move_on_after(self.config.ws_pong_timeout_s):
                        await stream.send_all(data)
                        p.sending = False
                    if p.sending:  # a peer that takes no bytes for a pong timeout is dead
                        log.info("dropping a WebSocket peer that stopped reading")
                        return
                    continue  # more may have become durable meanwhile
                if p.stop and not p.pending:
                    break
                if not await self._wait(stream, rt, p, out):
                    p.open = False  # the peer is gone, or died: no closing handshake
                    return
        finally:
            if p.open and not p.sending:
                close = p.close or (CLOSE_GOING_AWAY, "server shutting down")
                with trio.move_on_after(CLOSE_TIMEOUT_S) as cs:
                    cs.shield = True
                    await self._close(stream, p, *close)

    def _may_take(self, rt: Realtime, p: _Peer) -> bool:
        """Room for another batch: in this connection's window and in the writer, and
        (when the rate limit waits) tokens."""
        writer = self.writer
        if writer.closing:
            p.stop = True
            return False
        if self.rate_waits and self.rates.due(p, rt.analytics_id, trio.current_time()):
            return False
        return len(p.pending) < self.config.ws_max_in_flight and writer.has_room(1)

    async def _wait(self, stream: trio.abc.Stream, rt: Realtime, p: _Peer, out: list) -> bool:
        """Wait for bytes (when reading), writer room, a durable batch, drain, tokens or
        a timer. False: the peer closed the connection or missed a pong.
        (Locals kept few: an idle connection holds this frame while it waits.)"""
        c, now = self.config, trio.current_time()
        deadline = self._deadline(p, now)
        data = None
        rest = 0.0  # > 0: paused by the event rate for this long
        reading = False
        with trio.CancelScope(deadline=deadline) as scope:
            p.scope = scope
            try:
                if p.stop or len(p.pending) >= c.ws_max_in_flight:
                    await trio.sleep_forever()  # until wake() or a timer
                elif not self.writer.has_room(1):
                    await self.writer.wait_room(give_up=False)
                elif self.rate_waits and (rest := self.rates.due(p, rt.analytics_id, now)):
                    scope.deadline = now + rest  # read nothing until the debt is repaid
                    await trio.sleep_forever()  # (or wake(): a batch to answer)
                elif p.frames.ready():
                    pass  # frames already read, waiting for room that is there now
                else:
                    reading = True
                    if p.since is not None:  # a message under way
                        scope.deadline = min(deadline, p.since + c.ws_message_timeout_s)
                    data = await stream.receive_some(c.ws_receive_buffer_bytes)
            except ApiError:  # the writer is closing
                p.stop = True
            finally:
                p.scope = None
        if not reading:
            self._paused(p, trio.current_time() - now, rest > 0)
            if rest > 0:
                return True
        if data is not None:
            if not data:
                return False  # EOF: the peer is gone
            p.frames.feed(data)
        elif scope.cancelled_caught and trio.current_time() >= scope.deadline:
            return self._timer(p, out)
        return True

    def _deadline(self, p: _Peer, now: float) -> float:
        """When the next timer is due: a pong, a ping or the idle timeout (the message
        timer applies only while reading); starts or ends the message's clock."""
        c = self.config
        if not p.frames.holding():
            p.since = None
        elif p.since is None:  # part of a message came since the last wait: its clock starts
            p.since = now
        if p.pong_due is not None:
            return p.pong_due
        if p.pending or p.stop:
            return math.inf
        return min(p.quiet + c.ws_ping_interval_s, p.last + c.ws_idle_timeout_s)

    def _paused(self, p: _Peer, waited: float, by_rate: bool) -> None:
        """The task did not read for `waited` s: a message under way is not the peer's
        delay; nor, for a rate limit's pause, are its missing pongs and messages."""
        if p.since is not None:
            p.since += waited
        if by_rate:
            p.last += waited
            p.quiet += waited
            if p.pong_due is not None:
                p.pong_due += waited

    def _timer(self, p: _Peer, out: list) -> bool:
        """A deadline passed: a message too slow (close 1008), a missed pong (False: drop
        the peer), the idle timeout, or the next ping."""
        c, now = self.config, trio.current_time()
        if p.since is not None and now >= p.since + c.ws_message_timeout_s:
            p.stop, p.close = True, (CLOSE_POLICY, f"message not whole within "
                                     f"{c.ws_message_timeout_s:g} s (ws_message_timeout_s)")
            return True
        if p.pong_due is not None:
            log.info("dropping a WebSocket peer that did not answer a ping")
            return False
        if now - p.last >= c.ws_idle_timeout_s:
            p.stop, p.close = True, (CLOSE_IDLE, "idle timeout")
        else:
            out.append(frame(PING, PING_PAYLOAD))
            p.pong_due = now + c.ws_pong_timeout_s
            p.quiet = now
        return True

    def _take(self, rt: Realtime, p: _Peer, out: list) -> None:
        """Handle the frames read until none is left or reading must pause."""
        frames = p.frames
        try:
            while (got := frames.next()) is not None:
                opcode, payload = got
                if opcode == TEXT or opcode == BINARY:
                    p.last = p.quiet = trio.current_time()
                    p.since = None  # (the next message's clock starts when it is seen)
                    self._batch(rt, p, payload)
                    if p.stop:
                        return
                    if not self._may_take(rt, p):
                        return  # the rest waits in the frame reader
                elif opcode == PING:
                    out.append(frame(PONG, payload))
                    if frames.opcode is None:  # between messages, not inside one
                        p.since = None
                elif opcode == PONG:
                    p.pong_due = None
                    if frames.opcode is None:
                        p.since = None
                elif opcode == CLOSE:  # the peer closes: answer, echoing its code
                    out.append(close_frame(close_code(payload)))
                    p.stop, p.open = True, False
                    p.pending.clear()  # (stored all the same; no answer can follow a close)
                    return
        except Fault as fault:
            p.stop, p.close = True, (fault.code, fault.reason)

    def _batch(self, rt: Realtime, p: _Peer, data: bytes | str) -> None:
        """Validate one message and submit its rows; a refusal is queued in order."""
        writer, rates = self.writer, self.rates
        if rates is not None:
            now = trio.current_time()
            if not self.rate_waits and rates.due(p, rt.analytics_id, now):
                p.stop, p.close = True, (CLOSE_POLICY, "events over the rate limit "
                                         "(ws_max_events_per_s, ws_id_max_events_per_s)")
                return
        if rt.untracked:  # do not track: validated as usual, acked, nothing stored
            intake = Intake(Dedup(1, 1), Sessions(1, str), self.clock() // 1000)
        else:
            intake = Intake(writer.dedup, self.sessions, self.clock() // 1000)
        try:
            batch = rt.batch(data, intake)
        except FrameError as exc:
            if rates is not None:
                rates.spend(p, rt.analytics_id, 1, now)
            self._refused(exc.error.code)
            if exc.seq is None:
                p.stop, p.close = True, (exc.close_code, exc.error.message)
                return
            p.pending.append((None, exc))
            return
        if rates is not None:
            rates.spend(p, rt.analytics_id, batch.events, now)
        if rt.untracked:
            writer.stats.dnt_skipped += 1
            p.pending.append((Batch([], [], batch.seq, batch.events, None, None), _UNSTORED))
            return
        p.pending.append((batch, writer.submit(batch.system_rows, batch.keys, batch.columns,
                                               notify=p)))

    def _answers(self, p: _Peer, out: list) -> None:
        """Move every answer that is ready, in order, into `out` as frames."""
        pending, done = p.pending, 0
        for batch, group_or_error in pending:
            if batch is not None and not group_or_error.done.is_set():
                break
            done += 1
            answer = self._answer(batch, group_or_error)
            if answer is _FAILED:
                p.stop, p.close = True, (CLOSE_ERROR, "could not store a batch")
                pending.clear()
                return
            if answer is not None:
                out.append(frame(TEXT, answer))
        if done:
            del pending[:done]

    def _answer(self, batch: Batch | None, group_or_error) -> bytes | None:
        """The answer owed for one batch (None: no seq, nothing to say); `_FAILED` if a
        batch without seq could not be stored (the connection must close)."""
        if batch is None:
            e = group_or_error.error
            return _ENCODE.encode(Refusal(group_or_error.seq, e.code, e.message, e.field))
        if group_or_error.error is not None:  # not journaled: its sessions go too
            self._refused("unavailable")
            self.sessions.forget_started(batch.system_rows)
            if batch.seq is None:
                return _FAILED
            return _ENCODE.encode(Refusal(batch.seq, "unavailable",
                                          f"could not journal the events: {group_or_error.error}"))
        self.events_received += batch.events
        if batch.seq is None:
            return None
        sid = batch.session_id  # (many writers: the id the shared state decided)
        return _ENCODE.encode(Ack(batch.seq, batch.events,
                                  group_or_error.renamed.get(sid, sid)
                                  if group_or_error.renamed else sid))

    async def _close(self, stream: trio.abc.Stream, p: _Peer, code: int, reason: str) -> None:
        """Send a Close and wait for the peer's (or EOF): the closing handshake."""
        p.open = False
        frames = p.frames
        try:
            await stream.send_all(close_frame(code, reason))
            while True:
                while (got := frames.next()) is not None:
                    if got[0] == CLOSE:
                        return
                data = await stream.receive_some(self.config.ws_receive_buffer_bytes)
                if not data:
                    return
                frames.feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, Fault):
            pass
