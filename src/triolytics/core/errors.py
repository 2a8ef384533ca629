"""Every way a request can be refused, each with its HTTP status, in one table.

Rules:
- Core code raises `ApiError(code, message, field=...)`; the I/O layer turns it into a
  response with `as_body()`; nothing else picks status codes.
- `field` is a JSON path into the request (`$.batch[3].userId`) when one field is at fault.
"""

from __future__ import annotations

import msgspec

# code -> HTTP status
STATUS: dict[str, int] = {
    "invalid_json": 400,
    "invalid_event": 400,
    "bad_request": 400,
    "query_syntax": 400,  # /admin/query: DuckDB's parser refused the SQL
    "query_not_read_only": 400,  # ...: not one read statement; refused before it ran
    "query_failed": 400,  # ...: DuckDB refused it while running (unknown column, ...)
    "missing_write_key": 401,
    "unknown_write_key": 401,
    "unauthorized": 401,
    "forbidden_origin": 403,
    "unknown_analytics_id": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "length_required": 411,
    "payload_too_large": 413,
    "upgrade_required": 426,
    "unsupported_media_type": 415,
    "unsupported_encoding": 415,
    "rate_limited": 429,
    "header_too_large": 431,
    "not_implemented": 501,
    "overloaded": 503,
    "too_many_connections": 503,
    "unavailable": 503,
    # /admin/query ran past query_timeout_s and was interrupted: a limit of the server,
    # hit after the whole request arrived (a 408 says the request did not arrive, and
    # clients may resend it unasked); no Retry-After, as the same query would time out.
    "query_timeout": 503,
}


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    field: str | None = None


class ApiError(Exception):
    """A refusal: `code` names it, `STATUS[code]` is its HTTP status."""

    def __init__(self, code: str, message: str, *, field: str | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def detail(self) -> ErrorBody:
        return ErrorBody(self.code, self.message, self.field)

    def as_body(self) -> bytes:
        return msgspec.json.encode({"error": self.detail()})

    def __repr__(self) -> str:
        return f"ApiError({self.code!r}, {self.message!r}, field={self.field!r})"


def overloaded(retry_after_s: int,
               message: str = "the writer is saturated; retry later") -> ApiError:
    return ApiError("overloaded", message,
                    headers=((b"retry-after", str(retry_after_s).encode()),))
