"""The WebSocket frame layer, pure: frames built by wsproto's client (the reference
implementation trio-websocket uses) must come out of `FrameReader` as the messages they
were, however the bytes are split; every protocol fault has its close code."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ws_wire import masked
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

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


def read_all(reader: FrameReader, data: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    out = []
    for lo, hi in zip([0, *cuts], [*cuts, len(data)], strict=True):
        reader.feed(data[lo:hi])
        while (got := reader.next()) is not None:
            out.append(got)
    return out


messages = st.lists(st.one_of(
    st.tuples(st.just("text"), st.text(max_size=300), st.integers(1, 4)),
    st.tuples(st.just("bytes"), st.binary(max_size=70_000), st.integers(1, 3)),
    st.tuples(st.just("ping"), st.binary(max_size=125), st.just(1)),
    st.tuples(st.just("pong"), st.binary(max_size=125), st.just(1)),
), max_size=8)


@settings(max_examples=150, deadline=None)
@given(messages, st.lists(st.integers(0, 200_000), max_size=6), st.data())
def test_wsproto_client_frames_come_out_as_sent(items, cuts, data):
    client = Connection(ConnectionType.CLIENT)
    wire, expected = b"", []
    for kind, payload, pieces in items:
        if kind in ("ping", "pong"):
            event = Ping(payload) if kind == "ping" else Pong(payload)
            wire += client.send(event)
            expected.append((PING if kind == "ping" else PONG, payload))
            continue
        step = max(1, len(payload) // pieces)
        chunks = [payload[i:i + step] for i in range(0, len(payload), step)] or [payload[:0]]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            cls = TextMessage if kind == "text" else BytesMessage
            wire += client.send(cls(data=chunk, message_finished=last))
            if not last and data.draw(st.booleans()):  # a control frame between fragments
                wire += client.send(Ping(b"mid"))
                expected.append((PING, b"mid"))
        whole = payload.encode() if kind == "text" else payload
        expected.append((TEXT if kind == "text" else BINARY, whole))
    wire += client.send(CloseConnection(1000, "bye"))
    expected.append((CLOSE, (1000).to_bytes(2, "big") + b"bye"))
    cuts = sorted({c for c in cuts if 0 < c < len(wire)})
    assert reorder_pings(read_all(FrameReader(1 << 20, 256), wire, cuts)) == reorder_pings(expected)


def reorder_pings(events):
    """A ping sent between fragments arrives before the message it interrupts: compare
    the messages in order, and the control frames in order, apart."""
    return ([e for e in events if e[0] in (TEXT, BINARY, CLOSE)],
            [e for e in events if e[0] in (PING, PONG)])


def test_bytes_fed_one_at_a_time():
    client = Connection(ConnectionType.CLIENT)
    wire = client.send(TextMessage("héllo" * 40)) + client.send(BytesMessage(b"\x00" * 70_000))
    reader = FrameReader(1 << 20, 256)
    out = read_all(reader, wire, list(range(1, len(wire))))
    assert out == [(TEXT, ("héllo" * 40).encode()), (BINARY, b"\x00" * 70_000)]
    assert reader.next() is None


@pytest.mark.parametrize("wire, code", [
    (bytes([0x81, 0x02]) + b"hi", 1002),  # not masked
    (masked(0xC1, b"x"), 1002),  # RSV1 without permessage-deflate
    (masked(0x83, b"x"), 1002),  # opcode 3 is reserved
    (masked(0x89, b"x" * 126), 1002),  # a control frame over 125 bytes
    (masked(0x09, b"x"), 1002),  # a fragmented control frame
    (masked(0x80, b"x"), 1002),  # a continuation without a message
    (masked(0x01, b"a") + masked(0x81, b"b"), 1002),  # a new message inside one
    (masked(0x81, b"x", bytes([126, 0, 5])), 1002),  # 2 length bytes for 5
    (masked(0x81, b"\xff\xfe"), 1007),  # text that is not UTF-8
    (masked(0x01, b"\xc3") + masked(0x80, b"\x28"), 1007),  # ... across fragments
    (masked(0x88, b"\x03"), 1002),  # a 1-byte close payload
    (masked(0x88, (1005).to_bytes(2, "big")), 1002),  # a code never sent on the wire
    (masked(0x88, (1000).to_bytes(2, "big") + b"\xff"), 1007),  # a reason not UTF-8
])
def test_faults_have_their_close_codes(wire, code):
    with pytest.raises(Fault) as fault:
        read_all(FrameReader(1 << 20, 256), wire, [])
    assert fault.value.code == code


def test_a_message_too_big_is_refused_at_its_header():
    reader = FrameReader(1000, 256)
    head = masked(0x82, b"x" * 1001)[:8]  # header, length and mask only
    reader.feed(head)
    with pytest.raises(Fault) as fault:
        reader.next()
    assert fault.value.code == 1009
    # fragments count together
    reader = FrameReader(1000, 256)
    reader.feed(masked(0x02, b"x" * 600))
    assert reader.next() is None
    reader.feed(masked(0x80, b"x" * 401)[:8])
    with pytest.raises(Fault):
        reader.next()


def test_fragments_past_the_cap_are_refused_at_the_header():
    """`max_fragments` frames make a message (pings between them do not count); the
    frame that would pass the cap is refused with 1009 from its header alone."""
    reader = FrameReader(1000, 4)
    wire = (masked(0x01, b"a") + masked(0x00, b"b") + masked(0x89, b"p")
            + masked(0x00, b"c") + masked(0x80, b"d"))
    assert read_all(reader, wire, []) == [(PING, b"p"), (TEXT, b"abcd")]
    reader.feed(masked(0x02, b"1") + masked(0x00, b"2") + masked(0x00, b"3")
                + masked(0x00, b"4"))
    assert reader.next() is None
    reader.feed(masked(0x80, b"5")[:2])  # the fifth frame's first two bytes
    with pytest.raises(Fault) as fault:
        reader.next()
    assert fault.value.code == 1009 and "ws_max_fragments" in fault.value.reason


def test_empty_continuations_cannot_pile_up():
    """The audit's case: a flood of empty continuation frames, each within the size cap,
    ends at the cap's frame, not two million frames later."""
    reader = FrameReader(1 << 20, 256)
    flood = masked(0x01, b"{") + masked(0x00, b"") * 2_000_000
    with pytest.raises(Fault) as fault:
        for i in range(0, len(flood), 65536):
            reader.feed(flood[i:i + 65536])
            while reader.next() is not None:
                pass
    assert fault.value.code == 1009
    assert i < 2 * 65536  # refused within the first reads (256 frames are 1.5 KB)


def test_a_fragmented_message_costs_about_its_size():
    """50,000 one-byte fragments held open (a message under way) cost about their
    payload in the reader, not a Python object each: at most twice the payload plus one
    read. (~2 s: tracemalloc traces every allocation of 50,000 frames.)"""
    count, read, fragment = 50_000, 65536, 1
    wire = masked(0x01, b"x" * fragment) + masked(0x00, b"x" * fragment) * (count - 1)
    reads = [wire[i:i + read] for i in range(0, len(wire), read)]
    del wire
    reader = FrameReader(1 << 20, 10 * count)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        while reads:
            reader.feed(reads.pop(0))
            assert reader.next() is None
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    payload = count * fragment
    assert held < 2 * payload + read, (held, payload)
    assert reader.holding() and reader.fragments == count
    reader.feed(masked(0x80, b"!"))
    assert reader.next() == (TEXT, b"x" * payload + b"!")
    assert not reader.holding()


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_server_frames_parse_in_wsproto(size):
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(frame(TEXT, b"a" * size) + close_frame(1001, "é" * 100))
    events = list(client.events())
    assert isinstance(events[0], TextMessage) and events[0].data == "a" * size
    assert isinstance(events[1], CloseConnection) and events[1].code == 1001
    assert len(close_frame(1001, "é" * 100)) <= 127  # a reason cut to fit, whole chars
    assert close_code(b"") == 1005 and close_frame(1005) == b"\x88\x00"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=12),
       st.sampled_from([0x80, 0x81, 0x82, 0x01, 0x00, 0x88, 0x89, 0x8A, 0x83, 0xC1]))
def test_any_bytes_give_messages_or_a_fault_never_another_error(chunks, first):
    """Garbage after a plausible first byte: the reader takes it or refuses it with a
    close code; nothing else escapes, and it never claims more than it was fed."""
    reader = FrameReader(100, 4)
    fed = 0
    try:
        for i, chunk in enumerate(chunks):
            data = bytes([first]) + chunk if i == 0 else chunk
            reader.feed(data)
            fed += len(data)
            while (got := reader.next()) is not None:
                assert got[0] in (TEXT, BINARY, CLOSE, PING, PONG)
                assert len(got[1]) <= fed
    except Fault as fault:
        assert fault.code in (1002, 1007, 1009)
