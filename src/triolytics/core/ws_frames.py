"""WebSocket frames, server side (RFC 6455 section 5), sans I/O: bytes in, messages out.

Rules:
- `FrameReader.feed(data)`, then `next()` until it returns None (more bytes needed).
  It returns `(opcode, payload)` for each complete message (TEXT or BINARY, fragments
  joined) and each control frame (CLOSE, PING, PONG), in arrival order.
- Whatever breaks the protocol raises `Fault(code, reason)`; the connection must close
  with that code: 1002 for framing (unmasked client frame, RSV bits without an
  extension, unknown opcode, fragmented or long control frame, a continuation out of
  place, a non-minimal length), 1007 for text or a close reason that is not UTF-8,
  1009 for a message over `max_message_bytes` or in more than `max_fragments` frames,
  refused at the frame header that would pass the cap, before its bytes are read.
- Bytes are kept as received until a frame is complete (a list of chunks, joined once),
  so a large message costs linear time; unmasking is four `translate`s per frame.
- A fragmented message's payloads are appended to one bytearray as they come: it costs
  about its own size however small its fragments (a list of bytes objects would cost
  ~40 bytes more per fragment). `holding()` says whether part of a message is held, for
  the caller's timer on how long a message may take.
- `frame()` and `close_frame()` build server frames (never masked, never fragmented).

Why not wsproto, which trio-websocket is built on: it costs ~19 µs per 1.3 KB frame in
pure Python (a byte buffer copied per step, four slice translations to unmask, an
incremental UTF-8 decoder, an event object per frame); this costs ~3 µs
(docs/performance.md). tests/test_ws_frames.py checks it against wsproto frame by frame.
"""

from __future__ import annotations

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_PROTOCOL, CLOSE_INVALID, CLOSE_TOO_BIG = 1002, 1007, 1009
NO_STATUS = 1005  # a Close without a code (never sent as a code)
_OPCODES = frozenset((CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG))


class Fault(Exception):
    """The peer broke the protocol: close with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 7.4, IANA registry; 3000-4999 are for apps)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


_XOR = [bytes(b ^ k for b in range(256)) for k in range(256)]  # byte -> byte ^ k


def unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR with the 4-byte key: each of the 4 strides translated at once (C speed)."""
    data = bytearray(payload)
    for i in range(4):
        data[i::4] = data[i::4].translate(_XOR[mask[i]])
    return bytes(data)


class FrameReader:
    __slots__ = ("max_message", "max_fragments", "buf", "pos", "chunks", "have", "need",
                 "opcode", "parts", "fragments")

    def __init__(self, max_message_bytes: int, max_fragments: int) -> None:
        self.max_message = max_message_bytes
        self.max_fragments = max_fragments  # frames of one message, the first included
        self.buf = b""  # bytes being parsed, from `pos`
        self.pos = 0
        self.chunks: list[bytes] = []  # bytes received since `buf` was formed
        self.have = 0  # unparsed bytes, in `buf` and `chunks`
        self.need = 2  # unparsed bytes needed before parsing can advance
        self.opcode: int | None = None  # of the fragmented message under way
        self.parts = bytearray()  # its fragments so far, joined
        self.fragments = 0  # ... and how many

    def feed(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.have += len(data)

    def ready(self) -> bool:
        """Whether `next()` can advance without more bytes."""
        return self.have >= self.need

    def holding(self) -> bool:
        """Whether part of a message is held: fragments, or bytes not yet taken."""
        return self.opcode is not None or self.have > 0

    def next(self) -> tuple[int, bytes] | None:
        """The next message or control frame; None until more bytes are fed."""
        while self.have >= self.need:
            if self.chunks:  # one buffer: the unparsed rest and what came since
                chunks = self.chunks
                if self.pos < len(self.buf):
                    chunks.insert(0, self.buf[self.pos:])
                self.buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.pos, self.chunks = 0, []
            got = self._parse(self.buf, self.pos)
            if self.pos == len(self.buf):
                self.buf, self.pos = b"", 0
            if got is not None:
                return got
        return None

    def _parse(self, buf: bytes, p: int) -> tuple[int, bytes] | None:
        """Take one frame at `buf[p:]`: a message or a control frame, or None (a
        fragment taken, or more bytes needed: `need` says how many)."""
        b0, b1 = buf[p], buf[p + 1]
        n, at = b1 & 0x7F, p + 2
        if n >= 126:
            width = 2 if n == 126 else 8
            if self.have < 2 + width:
                self.need = 2 + width
                return None
            n, at = int.from_bytes(buf[at:at + width], "big"), at + width
            if n < (126 if width == 2 else 65536) or n >> 63:
                raise Fault(CLOSE_PROTOCOL, "payload length not in its shortest form")
        opcode = b0 & 0x0F
        self._check(b0, b1, opcode, n)
        end = at + 4 + n
        if self.have < end - p:
            self.need = end - p
            return None
        payload = unmask(buf[at:at + 4], buf[at + 4:end])
        self.pos = end
        self.have -= end - p
        self.need = 2
        return self._complete(b0 & 0x80, opcode, payload)

    def _check(self, b0: int, b1: int, opcode: int, n: int) -> None:
        if not b1 & 0x80:
            raise Fault(CLOSE_PROTOCOL, "client frames must be masked")
        if b0 & 0x70:
            raise Fault(CLOSE_PROTOCOL, "RSV bits set without a negotiated extension")
        if opcode not in _OPCODES:
            raise Fault(CLOSE_PROTOCOL, f"unknown opcode {opcode:#x}")
        if opcode >= CLOSE:
            if not b0 & 0x80 or n > 125:
                raise Fault(CLOSE_PROTOCOL, "control frames are unfragmented, at most 125 "
                            "bytes")
            return
        if opcode == CONTINUATION:
            if self.opcode is None:
                raise Fault(CLOSE_PROTOCOL, "a continuation frame without a message")
            if self.fragments >= self.max_fragments:
                raise Fault(CLOSE_TOO_BIG, f"message in over {self.max_fragments} fragments "
                            "(ws_max_fragments)")
        elif self.opcode is not None:
            raise Fault(CLOSE_PROTOCOL, "a new message inside a fragmented one")
        if len(self.parts) + n > self.max_message:
            raise Fault(CLOSE_TOO_BIG, f"message over {self.max_message} bytes "
                        "(ws_max_message_bytes)")

    def _complete(self, fin: int, opcode: int, payload: bytes) -> tuple[int, bytes] | None:
        if opcode >= CLOSE:
            if opcode == CLOSE:
                _check_close(payload)
            return opcode, payload
        if not fin:  # a fragment: keep it
            if opcode != CONTINUATION:
                self.opcode = opcode
            self.parts += payload
            self.fragments += 1
            return None
        if opcode == CONTINUATION:
            opcode, self.opcode = self.opcode, None
            parts = self.parts
            parts += payload
            payload = bytes(parts)
            self.parts, self.fragments = bytearray(), 0
        if opcode == TEXT and not payload.isascii():
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise Fault(CLOSE_INVALID, "text message is not UTF-8") from None
        return opcode, payload


def _check_close(payload: bytes) -> None:
    if not payload:
        return
    if len(payload) == 1 or not valid_close_code(int.from_bytes(payload[:2], "big")):
        raise Fault(CLOSE_PROTOCOL, "invalid close code")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise Fault(CLOSE_INVALID, "close reason is not UTF-8") from None


def close_code(payload: bytes) -> int:
    """The code of a (checked) Close frame's payload; 1005 when it has none."""
    return int.from_bytes(payload[:2], "big") if payload else NO_STATUS


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final server frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A Close frame; the reason is cut to fit 125 bytes (at a character boundary)."""
    if code == NO_STATUS:
        return frame(CLOSE, b"")
    data = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return frame(CLOSE, code.to_bytes(2, "big") + data)
