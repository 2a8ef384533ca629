"""Answers while start-up waits for disk space: every request gets a 503 that says why.

Rules:
- Used between a start-up that failed for lack of space and the one that succeeds
  (app.py retries it): the listening sockets are open, nothing can be stored.
- One request per connection: `/healthz` 200 (the process is alive), `/readyz` 503
  `{"ready":false,"reason":...}`, anything else 503 `unavailable` with `Retry-After`;
  every answer carries `Connection: close` and the connection is closed after it.
- The request head is read (h11) within `head_timeout_s`; a body is not read, but
  drained briefly after the answer so that a client mid-upload sees the 503.
"""

from __future__ import annotations

import h11
import msgspec
import trio

from triolytics.core.config import Config
from triolytics.core.errors import ApiError
from triolytics.server.http_server import RECV_BYTES, _linger


class Unready:
    """What the answers say; `reason` changes as start-up is retried."""

    def __init__(self, config: Config, reason: str) -> None:
        self.config = config
        self.reason = reason

    def answer(self, target: bytes) -> tuple[int, bytes]:
        path = target.split(b"?", 1)[0]
        if path == b"/healthz":
            return 200, b'{"ok":true}'
        if path == b"/readyz":
            return 503, msgspec.json.encode({"ready": False, "reason": self.reason})
        return 503, ApiError("unavailable", f"the server cannot start yet: {self.reason}; "
                             f"start-up is retried every {self.config.startup_retry_s:g} s"
                             ).as_body()

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Answer one request on `stream`, then close it."""
        try:
            with trio.move_on_after(self.config.head_timeout_s):
                request = await self._head(stream)
                if request is not None:
                    status, body = self.answer(request.target)
                    head = [b"HTTP/1.1 %d %s" % (status, b"OK" if status == 200 else
                                                 b"Service Unavailable"),
                            b"content-type: application/json",
                            b"content-length: %d" % len(body), b"connection: close"]
                    if status == 503:
                        head.append(b"retry-after: %d" % self.config.retry_after_s)
                    await stream.send_all(b"\r\n".join(head) + b"\r\n\r\n"
                                          + (b"" if request.method == b"HEAD" else body))
                    await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _head(self, stream: trio.abc.Stream) -> h11.Request | None:
        conn = h11.Connection(h11.SERVER,
                              max_incomplete_event_size=self.config.max_header_bytes)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return None
            if isinstance(event, h11.Request):
                return event
            if event is not h11.NEED_DATA:
                return None  # (closed before a request)
            data = await stream.receive_some(RECV_BYTES)
            conn.receive_data(data)
