"""The stored event: one `Row` per row of the `events` table.

Rules:
- Every API (HTTP capture, the WebSocket stream, system events) normalizes into `Row`;
  the journal, the loader and the DuckDB schema know only this type.
- Times are integers: microseconds since the Unix epoch, UTC.
- JSON columns hold encoded JSON text (validated, UTF-8 checked), never Python objects, so
  a row costs one copy from the request buffer and nothing more until DuckDB.
- The field order is the journal's wire format (a msgpack array per row): append new
  fields at the end with a default, never reorder.
- `Row` is a NamedTuple rather than a Struct: pyarrow turns a list of tuples into a
  columnar batch in C++ (`rows_to_arrow`), which is the loader's hot path.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec


class Row(NamedTuple):
    message_id: str | None  # None: DuckDB makes a UUID at load
    project: str
    channel: str  # "http", "ws" or "system"
    type: str
    event: str | None
    name: str | None
    anonymous_id: str | None
    user_id: str | None
    group_id: str | None
    previous_id: str | None
    session_id: str | None
    timestamp: int  # event time, skew-corrected (µs since epoch, UTC)
    original_timestamp: int | None  # the client's own timestamp, as sent
    sent_at: int | None
    received_at: int
    properties: str | None  # JSON object (or the WebSocket `payload`)
    traits: str | None
    context: str | None
    integrations: str | None


# Column name -> DuckDB type, in `Row` field order. The one description of the schema.
COLUMNS: dict[str, str] = {
    "message_id": "VARCHAR",
    "project": "VARCHAR",
    "channel": "VARCHAR",
    "type": "VARCHAR",
    "event": "VARCHAR",
    "name": "VARCHAR",
    "anonymous_id": "VARCHAR",
    "user_id": "VARCHAR",
    "group_id": "VARCHAR",
    "previous_id": "VARCHAR",
    "session_id": "VARCHAR",
    "timestamp": "TIMESTAMPTZ",
    "original_timestamp": "TIMESTAMPTZ",
    "sent_at": "TIMESTAMPTZ",
    "received_at": "TIMESTAMPTZ",
    "properties": "JSON",
    "traits": "JSON",
    "context": "JSON",
    "integrations": "JSON",
}

assert tuple(COLUMNS) == Row._fields, "COLUMNS must follow Row's field order"
_new_row = tuple.__new__  # Row(*values) without NamedTuple's Python-level __new__


Value = str | int | None  # one field of one row


class Columns(msgspec.Struct, array_like=True, gc=False):
    """Rows by column, for a batch validated as a whole (HTTP `/v1/batch`): `values`
    holds one entry per `Row` field, in `Row` order, each either a list (a value per
    row) or the one value every row shares. The same rows as `rows()` gives, built,
    journaled and turned into Arrow columns at a fraction of a `Row` each."""

    count: int
    values: list[list[Value] | Value]

    def __len__(self) -> int:
        return self.count

    def rows(self) -> list[Row]:
        n = self.count
        columns = [v if type(v) is list else [v] * n for v in self.values]
        return [_new_row(Row, r) for r in zip(*columns, strict=True)]


class RtColumns(msgspec.Struct, array_like=True, gc=False):
    """The events of one WebSocket batch, by column: what the batch shares, once, and
    what varies per event, as lists. The same rows as `Row`s would be (`rows()`), at a
    fraction of the cost to build, journal and turn into Arrow columns."""

    project: str
    analytics_id: str  # the anonymous_id column
    session_id: str | None
    received_at: int
    context: str | list[str]  # one for all events, or one each (an event's flag)
    message_ids: list[str | None]
    types: list[str]
    timestamps: list[int]
    originals: list[int | None]
    properties: list[str | None]

    def __len__(self) -> int:
        return len(self.types)

    def columns(self) -> Columns:
        """The same rows as `Columns` (the lists are shared, not copied)."""
        return Columns(len(self.types), [
            self.message_ids, self.project, "ws", self.types, None, None, self.analytics_id,
            None, None, None, self.session_id, self.timestamps, self.originals, None,
            self.received_at, self.properties, None, self.context, None])

    def rows(self) -> list[Row]:
        return self.columns().rows()


Part = list[Row] | RtColumns | Columns  # what one journal record holds
ROWS_CODEC = msgspec.msgpack.Encoder()
ROWS_DECODER = msgspec.msgpack.Decoder(list[Row])
COLUMNS_DECODER = msgspec.msgpack.Decoder(RtColumns)
WIDE_DECODER = msgspec.msgpack.Decoder(Columns)
COLUMNS_TAG = b"C"  # before a WebSocket batch (a row record starts with an array header)
WIDE_TAG = b"W"  # before a `Columns` record


def encode_rows(rows: list[Row]) -> bytes:
    """One journal record's payload."""
    return ROWS_CODEC.encode(rows)


def decode_rows(payload: bytes) -> list[Row]:
    return ROWS_DECODER.decode(payload)


def encode_part(part: Part) -> bytes:
    """One journal record's payload: rows, or a tagged batch by column."""
    if type(part) is RtColumns:
        return COLUMNS_TAG + ROWS_CODEC.encode(part)
    if type(part) is Columns:
        return WIDE_TAG + ROWS_CODEC.encode(part)
    return encode_rows(part)


def decode_part(payload: bytes) -> Part:
    tag = payload[:1]
    if tag == COLUMNS_TAG:
        return COLUMNS_DECODER.decode(memoryview(payload)[1:])
    if tag == WIDE_TAG:
        return WIDE_DECODER.decode(memoryview(payload)[1:])
    return decode_rows(payload)
