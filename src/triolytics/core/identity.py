"""`analytics_id`s for the real-time API: issued by `POST /create`, checked at connect (pure).

Rules:
- An id is `<shard>.<uuid>`, exactly the document's format. The UUID (version 4 layout)
  holds 60 random bits and a 62-bit keyed checksum (HMAC-SHA256 with the server's
  secret) of the shard and those bits, so the server knows its own ids without a lookup:
  a connect costs one HMAC, whatever the number of ids issued.
- A malformed id is a 400; a well-formed one this server did not issue is a 403.
- Any shard's id made with the secret is accepted: the nodes of one lake share the
  secret (docs/scaling.md), and an id issued by one is valid at every other. The shard
  says which node issued it (a proxy may route by it); it stays under the checksum, so
  relabelling an id's shard makes it unknown.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from triolytics.core.errors import ApiError

_FORMAT = re.compile(r"(0|[1-9][0-9]{0,8})\.([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12})", re.ASCII)  # one spelling per id


def new_secret() -> bytes:
    return secrets.token_bytes(32)


class Identities:
    def __init__(self, secret: bytes, shard: int) -> None:
        self.secret = secret
        self.shard = shard

    def _uuid(self, random_part: bytes, shard: int | None = None) -> str:
        """16 bytes: the random half (version nibble set) and its checksum half."""
        shard = self.shard if shard is None else shard
        mac = hmac.new(self.secret, b"%d." % shard + random_part, hashlib.sha256).digest()
        raw = random_part + bytes([mac[0] & 0x3F | 0x80]) + mac[1:8]  # RFC 4122 variant
        h = raw.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def issue(self) -> str:
        r = bytearray(secrets.token_bytes(8))
        r[6] = r[6] & 0x0F | 0x40  # version 4
        return f"{self.shard}.{self._uuid(bytes(r))}"

    def check(self, analytics_id: str | None) -> str:
        """The id itself (normalized to lower case), or ApiError 400/403."""
        if not analytics_id:
            raise ApiError("bad_request", "analytics_id is required (from POST /create)",
                           field="analytics_id")
        m = _FORMAT.fullmatch(analytics_id)
        if m is None:
            raise ApiError("bad_request", "analytics_id must be <shard>.<uuid> as issued by "
                           "POST /create", field="analytics_id")
        normalized = analytics_id.lower()
        shard, uuid = int(m.group(1)), normalized.split(".", 1)[1]
        random_part = bytes.fromhex(uuid.replace("-", "")[:16])
        if not hmac.compare_digest(self._uuid(random_part, shard), uuid):
            raise ApiError("unknown_analytics_id", "this analytics_id was not issued by this "
                           "server; get one from POST /create", field="analytics_id")
        return normalized
