"""journal.py: append/read across segments, resuming, torn tails, release, backlog."""

from __future__ import annotations

import struct
import zlib

import pytest

from triolytics.core.journal import Journal, Position

HDR = 8  # <u32 length><u32 crc32>


def opened(path, segment_bytes: int = 1 << 20) -> Journal:
    j = Journal(path, segment_bytes, sync_on_rotate=False)
    j.open()
    return j


@pytest.fixture
def journal(tmp_path):
    j = opened(tmp_path / "j", 100)
    yield j
    j.close()


def payloads(n: int, size: int = 30) -> list[bytes]:
    return [(b"rec%03d-" % i).ljust(size, b"x") for i in range(n)]


def test_empty_journal(tmp_path):
    j = Journal(tmp_path / "new", 100)
    assert j.open() == Position(1, 0)
    assert list(j.records(Position(0, 0))) == []
    assert j.append([]) == Position(1, 0)
    j.close()


def test_record_layout(journal):
    journal.append([b"hello"])
    data = journal.path(1).read_bytes()
    assert data == struct.pack("<II", 5, zlib.crc32(b"hello")) + b"hello"


def test_round_trip_across_rotation(journal):
    recs = payloads(10)  # 38 bytes framed; 100-byte segments take 3 each
    ends = [journal.append([r]) for r in recs]
    assert journal.segments() == [1, 2, 3, 4]
    assert ends[0] == Position(1, 38)
    assert ends[2] == Position(1, 114)  # a segment is rotated only once past the limit
    assert ends[3] == Position(2, 38)
    got = list(journal.records(Position(0, 0)))
    assert [p for p, _ in got] == recs
    assert [pos for _, pos in got] == ends


def test_group_append_is_one_position(journal):
    end = journal.append([b"a", b"bb", b"ccc"])
    assert end == Position(1, 3 * HDR + 6)
    assert [p for p, _ in journal.records(Position(1, 0))] == [b"a", b"bb", b"ccc"]


@pytest.mark.parametrize("k", range(10))
def test_records_resume_exactly_after_position(journal, k):
    recs = payloads(10)
    ends = [journal.append([r]) for r in recs]
    got = list(journal.records(ends[k]))
    assert [p for p, _ in got] == recs[k + 1:]
    assert [pos for _, pos in got] == ends[k + 1:]


def test_reopen_continues_after_last_record(tmp_path):
    j = opened(tmp_path, 100)
    recs = payloads(5)
    for r in recs:
        end = j.append([r])
    j.close()
    j = opened(tmp_path, 100)
    assert j.position == end
    assert j.torn_bytes == 0
    j.append([b"more"])
    assert [p for p, _ in j.records(Position(0, 0))] == recs + [b"more"]
    j.close()


def _torn(tmp_path, damage) -> tuple[Journal, list[bytes], Position]:
    j = opened(tmp_path)
    recs = payloads(4)
    ends = [j.append([r]) for r in recs]
    j.close()
    path = j.path(1)
    data = bytearray(path.read_bytes())
    path.write_bytes(damage(data))
    j = opened(tmp_path)
    return j, recs, ends[2]


@pytest.mark.parametrize("cut", [1, 10, 38 - HDR, 38 - 3])
def test_truncated_tail_dropped(tmp_path, cut):
    j, recs, last_good = _torn(tmp_path, lambda d: bytes(d[:-cut]))
    assert j.position == last_good
    assert j.torn_bytes == 38 - cut
    assert j.path(1).stat().st_size == last_good.offset
    assert [p for p, _ in j.records(Position(0, 0))] == recs[:3]
    j.append([b"after"])  # no garbage between the last good record and the next
    assert [p for p, _ in j.records(Position(0, 0))] == recs[:3] + [b"after"]
    j.close()


def test_flipped_byte_in_last_payload_dropped(tmp_path):
    def flip(d: bytearray) -> bytes:
        d[-5] ^= 0x40
        return bytes(d)

    j, recs, last_good = _torn(tmp_path, flip)
    assert j.position == last_good
    assert j.torn_bytes == 38
    assert j.path(1).stat().st_size == last_good.offset
    assert [p for p, _ in j.records(Position(0, 0))] == recs[:3]
    j.close()


def test_garbage_appended_dropped(tmp_path):
    j, recs, _ = _torn(tmp_path, lambda d: bytes(d) + b"\xff" * 3)
    assert j.torn_bytes == 3
    assert j.position == Position(1, 4 * 38)
    assert [p for p, _ in j.records(Position(0, 0))] == recs
    j.close()


def test_release_deletes_only_wholly_loaded_segments(journal):
    ends = [journal.append([r]) for r in payloads(10)]
    assert journal.segments() == [1, 2, 3, 4]
    assert journal.release(Position(1, 114)) == 0
    assert journal.release(ends[4]) == 1  # in segment 2: segment 1 is done
    assert journal.segments() == [2, 3, 4]
    # the remaining records are still readable from the loaded mark
    assert [p for p, _ in journal.records(ends[4])] == payloads(10)[5:]


def test_release_never_deletes_current(journal):
    for r in payloads(10):
        journal.append([r])
    assert journal.release(Position(99, 0)) == 3
    assert journal.segments() == [4]
    journal.append([b"still writable"])
    assert [p for p, _ in journal.records(Position(4, 0))][-1] == b"still writable"


