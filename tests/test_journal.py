"""journal.py: append/read across segments, resuming, torn tails, damage, v1, release."""

from __future__ import annotations

import logging
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triolytics.core import journal as jmod
from triolytics.core.journal import Journal, Position

SEG = 16  # segment header: b"TLJ2", the sync marker, crc32 of those 12 bytes
HDR = 20  # record header: sync, u32 length, u32 crc32(payload), u32 crc32(those 16 bytes)
FRAMED = HDR + 30  # a record of `payloads()`


def opened(path, segment_bytes: int = 1 << 20) -> Journal:
    j = Journal(path, segment_bytes, sync_on_rotate=False)
    j.open()
    return j


@pytest.fixture
def journal(tmp_path):
    j = opened(tmp_path / "j", 150)
    yield j
    j.close()


def payloads(n: int, size: int = 30) -> list[bytes]:
    return [(b"rec%03d-" % i).ljust(size, b"x") for i in range(n)]


def record(sync: bytes, payload: bytes) -> bytes:
    head = sync + struct.pack("<II", len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def v1_record(payload: bytes) -> bytes:
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def seg_path(directory, segment: int):
    return directory / f"{segment:012d}.journal"


def written(directory, n: int, segment_bytes: int = 1 << 20) -> tuple[list[bytes], list[Position]]:
    j = opened(directory, segment_bytes)
    recs = payloads(n)
    ends = [j.append([r]) for r in recs]
    j.close()
    return recs, ends


def flip(path, at: int, count: int = 16) -> None:
    """XOR `count` bytes from `at`: every one changes."""
    data = bytearray(path.read_bytes())
    for i in range(at, at + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def all_payloads(j: Journal) -> list[bytes]:
    return [p for p, _ in j.records(Position(0, 0))]


def errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "triolytics.journal" and r.levelno == logging.ERROR]


# --- layout


def test_empty_journal(tmp_path):
    j = Journal(tmp_path / "new", 100)
    assert j.open() == Position(1, SEG)  # the header is written when a segment is made
    assert list(j.records(Position(0, 0))) == []
    assert j.append([]) == Position(1, SEG)
    assert j.damage == []
    j.close()


def test_segment_and_record_layout(journal):
    journal.append([b"hello"])
    sync = (journal.dir / "marker").read_bytes()
    assert len(sync) == 8
    assert (journal.dir / "marker").stat().st_mode & 0o777 == 0o600
    head = b"TLJ2" + sync
    data = journal.path(1).read_bytes()
    assert data == head + struct.pack("<I", zlib.crc32(head)) + record(sync, b"hello")


def test_the_sync_marker_is_random_per_directory(tmp_path):
    a, b = opened(tmp_path / "a"), opened(tmp_path / "b")
    assert (a.dir / "marker").read_bytes() != (b.dir / "marker").read_bytes()
    a.close()
    b.close()


def test_round_trip_across_rotation(journal):
    recs = payloads(10)  # 50 bytes framed; 150-byte segments take 3 each after the header
    ends = [journal.append([r]) for r in recs]
    assert journal.segments() == [1, 2, 3, 4]
    assert ends[0] == Position(1, SEG + FRAMED)
    assert ends[2] == Position(1, SEG + 3 * FRAMED)  # rotated only once past the limit
    assert ends[3] == Position(2, SEG + FRAMED)
    got = list(journal.records(Position(0, 0)))
    assert [p for p, _ in got] == recs
    assert [pos for _, pos in got] == ends


def test_group_append_is_one_position(journal):
    end = journal.append([b"a", b"bb", b"ccc"])
    assert end == Position(1, SEG + 3 * HDR + 6)
    assert [p for p, _ in journal.records(Position(1, 0))] == [b"a", b"bb", b"ccc"]


@pytest.mark.parametrize("k", range(10))
def test_records_resume_exactly_after_position(journal, k):
    recs = payloads(10)
    ends = [journal.append([r]) for r in recs]
    got = list(journal.records(ends[k]))
    assert [p for p, _ in got] == recs[k + 1:]
    assert [pos for _, pos in got] == ends[k + 1:]


def test_reopen_continues_after_last_record(tmp_path):
    recs, ends = written(tmp_path, 5, 150)
    j = opened(tmp_path, 150)
    assert j.position == ends[-1]
    assert j.torn_bytes == 0
    j.append([b"more"])
    assert all_payloads(j) == recs + [b"more"]
    j.close()


# --- torn tails: the end of the last segment


def _torn(tmp_path, damage) -> tuple[Journal, list[bytes], Position, bytes]:
    recs, ends = written(tmp_path, 4)
    path = seg_path(tmp_path, 1)
    before = path.read_bytes()
    path.write_bytes(damage(bytearray(before)))
    return opened(tmp_path), recs, ends[2], before


@pytest.mark.parametrize("cut", [1, 10, FRAMED - HDR, FRAMED - 3])
def test_truncated_tail_dropped(tmp_path, cut, caplog):
    j, recs, last_good, before = _torn(tmp_path, lambda d: bytes(d[:-cut]))
    assert j.position == last_good
    assert j.torn_bytes == FRAMED - cut
    assert j.path(1).stat().st_size == last_good.offset
    assert all_payloads(j) == recs[:3]
    [d] = j.damage
    assert (d.segment, d.start, d.end, d.kind) == (1, last_good.offset, len(before) - cut, "torn")
    assert d.saved.read_bytes() == before[d.start:d.end]
    warned = [r for r in caplog.records if r.name == "triolytics.journal"]
    assert [r.levelname for r in warned] == ["WARNING"]
    assert "never acknowledged" in warned[0].getMessage()
    j.append([b"after"])  # no garbage between the last good record and the next
    assert all_payloads(j) == recs[:3] + [b"after"]
    j.close()


def test_flipped_byte_in_last_payload_dropped(tmp_path):
    def flip_one(d: bytearray) -> bytes:
        d[-5] ^= 0x40
        return bytes(d)

    j, recs, last_good, _ = _torn(tmp_path, flip_one)
    assert j.position == last_good
    assert j.torn_bytes == FRAMED
    assert j.path(1).stat().st_size == last_good.offset
    assert all_payloads(j) == recs[:3]
    j.close()


def test_garbage_appended_dropped(tmp_path):
    j, recs, _, before = _torn(tmp_path, lambda d: bytes(d) + b"\xff" * 3)
    assert j.torn_bytes == 3
    assert j.position == Position(1, SEG + 4 * FRAMED)
    assert all_payloads(j) == recs
    assert [(d.start, d.end, d.kind) for d in j.damage] == [(len(before), len(before) + 3, "torn")]
    j.close()


@pytest.mark.parametrize("kept", [0, 7, SEG - 1])
def test_a_new_segment_cut_short_in_its_header_is_made_again(tmp_path, kept):
    recs, _ = written(tmp_path, 3)
    sync = (tmp_path / "marker").read_bytes()
    seg_path(tmp_path, 2).write_bytes(b"TLJ2" + sync + b"\0\0\0\0")  # rotated, then cut
    with open(seg_path(tmp_path, 2), "r+b") as f:
        f.truncate(kept)
    j = opened(tmp_path)
    assert j.position == Position(2, SEG)
    assert j.torn_bytes == kept
    assert j.append([b"next"]) == Position(2, SEG + HDR + 4)
    assert all_payloads(j) == recs + [b"next"]
    j.close()


# --- damage: anything else; kept, never truncated, quarantined


@pytest.mark.parametrize("k", [0, 4, 8])  # head, middle, and near the tail with one after
def test_changed_bytes_in_the_last_segment_keep_the_records_after_them(tmp_path, k, caplog):
    recs, ends = written(tmp_path, 10)
    start = SEG + k * FRAMED
    flip(seg_path(tmp_path, 1), start + 10)
    damaged = seg_path(tmp_path, 1).read_bytes()
    j = opened(tmp_path)
    assert all_payloads(j) == recs[:k] + recs[k + 1:]
    assert seg_path(tmp_path, 1).read_bytes() == damaged
    assert j.position == ends[-1]
    assert j.torn_bytes == 0
    [d] = j.damage
    assert (d.segment, d.start, d.end, d.kind) == (1, start, start + FRAMED, "damaged")
    assert d.saved == tmp_path / "quarantine" / f"000000000001-{start}-{start + FRAMED}.bin"
    assert d.saved.read_bytes() == seg_path(tmp_path, 1).read_bytes()[start:start + FRAMED]
    [logged] = errors(caplog)
    assert str(seg_path(tmp_path, 1)) in logged.getMessage()
    assert f"{9 - k} intact records after it" in logged.getMessage()
    j.append([b"after"])
    assert all_payloads(j) == recs[:k] + recs[k + 1:] + [b"after"]
    j.close()


@pytest.mark.parametrize("k", [0, 2, 3])  # head, middle, tail of segment 2 (of 3)
def test_changed_bytes_in_an_earlier_segment(tmp_path, k):
    recs, _ = written(tmp_path, 12, 200)  # 4 records per segment
    path = seg_path(tmp_path, 2)
    start = SEG + k * FRAMED
    flip(path, start + 3)
    damaged = path.read_bytes()
    j = opened(tmp_path, 200)
    assert j.segments() == [1, 2, 3]
    assert all_payloads(j) == recs[:4 + k] + recs[5 + k:]
    assert path.read_bytes() == damaged
    assert [(d.segment, d.start, d.end, d.kind) for d in j.damage] == [
        (2, start, start + FRAMED, "damaged")]
    j.close()


def test_damage_in_a_middle_segment_of_several_is_logged(tmp_path, caplog):
    recs, _ = written(tmp_path, 20, 200)  # segments 1..5
    start = SEG + FRAMED
    flip(seg_path(tmp_path, 3), start + 20, 16)
    j = opened(tmp_path, 200)
    assert all_payloads(j) == recs[:9] + recs[10:]
    [d] = j.damage
    assert (d.segment, d.start, d.end, d.kind) == (3, start, start + FRAMED, "damaged")
    [logged] = errors(caplog)
    message = logged.getMessage()
    assert str(seg_path(tmp_path, 3)) in message
    assert f"{start}-{start + FRAMED}" in message and str(d.saved) in message
    assert "2 intact records after it" in message
    j.close()


@pytest.mark.parametrize("length", [5, FRAMED, 1 << 30, 0xFFFFFFFF])
def test_a_damaged_length_field_loses_only_its_record(tmp_path, length):
    recs, ends = written(tmp_path, 6)
    path = seg_path(tmp_path, 1)
    data = bytearray(path.read_bytes())
    at = SEG + 2 * FRAMED + 8
    data[at:at + 4] = struct.pack("<I", length)
    path.write_bytes(bytes(data))
    j = opened(tmp_path)
    assert all_payloads(j) == recs[:2] + recs[3:]
    assert j.position == ends[-1]
    j.close()


@pytest.mark.parametrize("at", [0, 4, 12])  # the magic, the sync marker, the crc
def test_a_damaged_segment_header_is_read_with_the_marker_file(tmp_path, at):
    recs, _ = written(tmp_path, 12, 200)
    flip(seg_path(tmp_path, 1), at, 4)
    j = opened(tmp_path, 200)
    assert all_payloads(j) == recs
    assert [(d.segment, d.start, d.end, d.kind) for d in j.damage] == [(1, 0, SEG, "damaged")]
    j.close()


def test_appends_after_a_damaged_last_header_go_to_a_new_segment(tmp_path):
    recs, _ = written(tmp_path, 3)
    flip(seg_path(tmp_path, 1), 0, 4)
    damaged = seg_path(tmp_path, 1).read_bytes()
    j = opened(tmp_path)
    assert j.position == Position(2, SEG)
    assert j.append([b"new"]) == Position(2, SEG + HDR + 3)
    assert all_payloads(j) == recs + [b"new"]
    assert seg_path(tmp_path, 1).read_bytes() == damaged
    j.close()


@pytest.mark.parametrize("marker", [b"\x00" * 8, b"abc", None])
def test_a_damaged_marker_file_is_replaced_from_intact_headers(tmp_path, marker):
    recs, _ = written(tmp_path, 12, 200)
    sync = (tmp_path / "marker").read_bytes()
    if marker is None:
        (tmp_path / "marker").unlink()
    else:
        (tmp_path / "marker").write_bytes(marker)
    flip(seg_path(tmp_path, 2), 0, SEG)  # segment 2 can only be read with the real marker
    j = opened(tmp_path, 200)
    assert all_payloads(j) == recs
    j.append([b"later"])
    j.close()
    assert (tmp_path / "marker").read_bytes() == sync
    j = opened(tmp_path, 200)
    assert all_payloads(j) == recs + [b"later"]
    j.close()


def test_garbage_at_the_end_of_an_earlier_segment_is_damage_not_torn(tmp_path, caplog):
    recs, _ = written(tmp_path, 8, 200)
    path = seg_path(tmp_path, 1)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\xff" * 3)
    j = opened(tmp_path, 200)
    assert all_payloads(j) == recs
    assert path.stat().st_size == size + 3
    assert j.torn_bytes == 0
    assert [(d.segment, d.start, d.end, d.kind) for d in j.damage] == [
        (1, size, size + 3, "damaged")]
    assert len(errors(caplog)) == 1
    j.close()


def test_a_forged_record_inside_a_payload_is_not_accepted(tmp_path):
    forged = record(b"guessed!", b"forged event")
    recs = [b"a" * 30, b"prefix-" + forged + b"-suffix", b"b" * 30]
    j = opened(tmp_path)
    for r in recs:
        j.append([r])
    j.close()
    flip(seg_path(tmp_path, 1), SEG + HDR + 30 + 8, 4)  # the length of the one holding it
    j = opened(tmp_path)
    assert all_payloads(j) == [recs[0], recs[2]]
    j.close()


def test_read_segment_finds_records_past_damage():
    sync = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    forged = record(b"guessed!", b"forged")
    data = b"\0" * SEG + record(sync, b"a") + b"junk" + forged + record(sync, b"b")
    first = SEG + HDR + 1
    second = first + 4 + len(forged)
    assert jmod.read_segment(data, sync) == (
        [(SEG, first, b"a"), (second, second + HDR + 1, b"b")], [(first, second)])
    assert jmod.read_segment(data, sync, first) == (
        [(second, second + HDR + 1, b"b")], [(first, second)])


def test_read_shows_a_segment_as_found_without_changing_anything(tmp_path, caplog):
    recs, _ = written(tmp_path, 4)
    flip(seg_path(tmp_path, 1), SEG + FRAMED + 2)
    with open(seg_path(tmp_path, 1), "ab") as f:
        f.write(b"\x01\x02")  # a torn tail, left alone by read
    before = seg_path(tmp_path, 1).read_bytes()
    j = Journal(tmp_path, 1 << 20)  # not opened: a script inspecting a journal
    sync = (tmp_path / "marker").read_bytes()
    assert j.read_marker() == sync
    got = j.read(1)
    assert (got.version, got.sync, got.intact) == (2, sync, True)
    assert [p for _, _, p in got.records] == [recs[0]] + recs[2:]
    assert got.damaged == [(SEG + FRAMED, SEG + 2 * FRAMED), (len(before) - 2, len(before))]
    assert jmod.read_segment(before, sync) == (got.records, got.damaged)
    assert seg_path(tmp_path, 1).read_bytes() == before
    assert j.damage == [] and not (tmp_path / "quarantine").exists() and not caplog.records


# --- version 1 segments


def test_v1_segments_are_replayed_and_appends_go_to_a_v2_segment(tmp_path):
    seg_path(tmp_path, 1).write_bytes(v1_record(b"one") + v1_record(b"two"))
    seg_path(tmp_path, 2).write_bytes(v1_record(b"three"))
    j = opened(tmp_path)
    assert j.position == Position(3, SEG)
    assert list(j.records(Position(0, 0))) == [
        (b"one", Position(1, 11)), (b"two", Position(1, 22)), (b"three", Position(2, 13))]
    assert list(j.records(Position(1, 11))) == [
        (b"two", Position(1, 22)), (b"three", Position(2, 13))]
    assert j.append([b"four"]) == Position(3, SEG + HDR + 4)
    assert all_payloads(j) == [b"one", b"two", b"three", b"four"]
    assert seg_path(tmp_path, 2).read_bytes() == v1_record(b"three")
    assert seg_path(tmp_path, 3).read_bytes()[:4] == b"TLJ2"
    j.close()


def test_a_v1_segment_is_read_up_to_its_first_bad_record(tmp_path):
    good = v1_record(b"one")
    seg_path(tmp_path, 1).write_bytes(good + b"\xff" * 9 + v1_record(b"lost"))
    seg_path(tmp_path, 2).write_bytes(v1_record(b"two") + b"\x01\x02")  # torn tail
    j = opened(tmp_path)
    assert all_payloads(j) == [b"one", b"two"]
    assert j.torn_bytes == 2
    assert [(d.segment, d.start, d.end, d.kind) for d in j.damage] == [
        (2, 11, 13, "torn"), (1, len(good), len(good) + 9 + 12, "damaged")]
    assert j.position == Position(3, SEG)
    j.close()


# --- quarantine, logging, summary


def test_quarantine_is_written_once(tmp_path):
    written(tmp_path, 8, 200)
    flip(seg_path(tmp_path, 1), SEG + 5)
    j = opened(tmp_path, 200)
    all_payloads(j)
    [d] = j.damage
    j.close()
    d.saved.write_bytes(b"the owner's notes")
    j = opened(tmp_path, 200)
    all_payloads(j)
    assert j.damage == [d]
    assert d.saved.read_bytes() == b"the owner's notes"
    assert sorted(p.name for p in d.saved.parent.iterdir()) == [d.saved.name]
    j.close()


def test_damage_is_logged_once_per_process(tmp_path, caplog):
    written(tmp_path, 8, 200)
    flip(seg_path(tmp_path, 1), SEG + FRAMED)
    j = opened(tmp_path, 200)
    assert all_payloads(j) == all_payloads(j)
    list(j.records(Position(1, SEG + FRAMED)))
    assert len(errors(caplog)) == 1
    assert len(j.damage) == 1
    j.close()


def test_damage_summary(tmp_path):
    recs, _ = written(tmp_path, 8, 200)
    flip(seg_path(tmp_path, 1), SEG + 5)
    with open(seg_path(tmp_path, 2), "ab") as f:
        f.write(b"\x07" * 7)
    j = opened(tmp_path, 200)
    assert all_payloads(j) == recs[1:]
    assert j.damage_summary() == {
        "journal_damaged_ranges": 1,
        "journal_damaged_bytes": FRAMED,
        "journal_torn_bytes": 7,
        "journal_quarantine_dir": str(tmp_path / "quarantine"),
    }
    j.close()


# --- any damage: every untouched record comes back, nothing is invented


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bodies=st.lists(st.binary(max_size=70), min_size=1, max_size=30),
       hits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 10**9),
                               st.integers(1, 24), st.integers(1, 255)),
                     min_size=1, max_size=5))
def test_random_damage_loses_only_touched_records(tmp_path_factory, bodies, hits):
    directory = tmp_path_factory.mktemp("j")
    j = opened(directory, 200)
    recs = [b"%d:" % i + body for i, body in enumerate(bodies)]
    spans = []  # (segment, start, end) of each record
    for r in recs:
        before = j.position
        end = j.append([r])
        start = before.offset if before.segment == end.segment else SEG
        spans.append((end.segment, start, end.offset))
    j.close()
    touched: dict[int, list[tuple[int, int]]] = {}
    segments = sorted({s for s, _, _ in spans})
    for which, where, count, xor in hits:
        segment = segments[which % len(segments)]
        data = bytearray(seg_path(directory, segment).read_bytes())
        at = where % len(data)
        stop = min(at + count, len(data))
        for i in range(at, stop):
            data[i] ^= xor
        seg_path(directory, segment).write_bytes(bytes(data))
        touched.setdefault(segment, []).append((at, stop))
    j = opened(directory, 200)
    got = all_payloads(j)
    j.close()
    untouched = [r for r, (s, a, b) in zip(recs, spans, strict=True)
                 if not any(x < b and a < y for x, y in touched.get(s, []))]
    assert set(untouched) <= set(got)
    remaining = iter(recs)
    assert all(any(g == r for r in remaining) for g in got)  # in order, nothing invented
