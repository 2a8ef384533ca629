"""identity.py and ratelimit.py, pure: `POST /create`'s ids and its rate limit.

Ids: the format, 400 (malformed) vs 403 (not ours: other secret, relabelled shard, tampered),
upper case accepted and normalized. Rate limit: burst, refill, the wait that becomes
Retry-After, the bounded client table; spending into debt, as the WebSocket's event
rates do. No trio, no sockets, no DuckDB.
"""

from __future__ import annotations

import math
import re
import uuid

import pytest

from triolytics.core.errors import ApiError
from triolytics.core.identity import Identities, new_secret
from triolytics.core.ratelimit import EventRates, RateLimit

SECRET = b"s" * 32
ID_FORMAT = re.compile(r"(\d+)\.([0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-"
                       r"[0-9a-f]{12})")


@pytest.fixture
def ids() -> Identities:
    return Identities(SECRET, 0)


def refusal(ids: Identities, analytics_id) -> ApiError:
    with pytest.raises(ApiError) as info:
        ids.check(analytics_id)
    assert info.value.field == "analytics_id"
    return info.value


# --- issue


def test_issued_ids_have_the_documents_format_and_are_distinct(ids):
    issued = [ids.issue() for _ in range(200)]
    assert len(set(issued)) == 200
    for analytics_id in issued:
        m = ID_FORMAT.fullmatch(analytics_id)
        assert m is not None, analytics_id
        assert m.group(1) == "0"
        assert uuid.UUID(m.group(2)).version == 4
        assert uuid.UUID(m.group(2)).variant == uuid.RFC_4122


def test_issued_ids_carry_the_shard():
    assert Identities(SECRET, 17).issue().startswith("17.")


def test_the_random_half_is_random(ids):
    halves = {ids.issue()[2:20] for _ in range(100)}
    assert len(halves) == 100


def test_new_secret_is_32_random_bytes():
    a, b = new_secret(), new_secret()
    assert len(a) == len(b) == 32 and a != b


# --- check


def test_an_issued_id_is_accepted_as_is(ids):
    analytics_id = ids.issue()
    assert ids.check(analytics_id) == analytics_id


def test_upper_case_is_accepted_and_normalized(ids):
    analytics_id = ids.issue()
    assert ids.check(analytics_id.upper()) == analytics_id


@pytest.mark.parametrize("bad", [
    None, "", "0", "0.", "{uuid}", ".{uuid}",
    "0.8d6f1c2e5b7a4c399e013f2a7b6c5d4e", "0.8d6f1c2e-5b7a-4c39-9e01-3f2a7b6c5d4", "0.{uuid}x",
    " 0.{uuid}", "0.{uuid}\n", "x.{uuid}", "-1.{uuid}", "1234567890.{uuid}",
    "0.8d6f1c2g-5b7a-4c39-9e01-3f2a7b6c5d4e", "0:{uuid}",
])
def test_malformed_ids_are_400(ids, bad):
    if bad is not None:
        bad = bad.replace("{uuid}", ids.issue().split(".", 1)[1])
    exc = refusal(ids, bad)
    assert (exc.code, exc.status) == ("bad_request", 400)


def test_a_well_formed_id_not_issued_here_is_403(ids):
    exc = refusal(ids, "0." + str(uuid.uuid4()))
    assert (exc.code, exc.status) == ("unknown_analytics_id", 403)


def test_an_id_of_another_shard_is_accepted_but_not_relabelled():
    """Nodes of one lake share the secret: an id another node (shard) issued is valid
    here; its shard is under the checksum all the same."""
    mine, other = Identities(SECRET, 0), Identities(SECRET, 1)
    theirs = other.issue()
    assert other.check(theirs) == theirs
    assert mine.check(theirs) == theirs
    # Relabelling the shard does not help: the shard is under the checksum.
    assert refusal(mine, "0." + theirs.split(".", 1)[1]).status == 403
    # Nor does relabelling one of ours with another shard.
    assert refusal(mine, "1." + mine.issue().split(".", 1)[1]).status == 403


def test_an_id_made_with_another_secret_is_403(ids):
    foreign = Identities(b"t" * 32, 0).issue()
    assert refusal(ids, foreign).code == "unknown_analytics_id"


@pytest.mark.parametrize("position", [2, 9, 21, 30, 37])  # random half and checksum half
def test_a_tampered_id_is_403(ids, position):
    analytics_id = ids.issue()
    c = analytics_id[position]
    assert c != "-"
    tampered = analytics_id[:position] + ("0" if c != "0" else "1") + analytics_id[position + 1:]
    assert refusal(ids, tampered).status == 403


def test_every_single_bit_flip_of_the_checksum_is_403(ids):
    analytics_id = ids.issue()
    head, hexes = analytics_id[:21], analytics_id[21:].replace("-", "")
    accepted = 0
    for i in range(len(hexes)):
        for bit in (1, 2, 4, 8):
            flipped = hexes[:i] + format(int(hexes[i], 16) ^ bit, "x") + hexes[i + 1:]
            try:
                ids.check(head + flipped[:4] + "-" + flipped[4:])
                accepted += 1
            except ApiError as exc:
                assert exc.status in (400, 403)
    assert accepted == 0


@pytest.mark.parametrize("shard", ["00", "\u0660", "\uff10"])  # "00", Arabic-Indic 0, full-width 0
def test_only_the_canonical_shard_spelling_names_an_id(ids, shard):
    analytics_id = ids.issue()
    variant = shard + "." + analytics_id.split(".", 1)[1]
    try:
        got = ids.check(variant)
    except ApiError:
        return  # refused: fine
    assert got == analytics_id  # accepted: then it must be the same key


# --- the rate limit of POST /create


def retry_after(wait: float) -> int:
    """The Retry-After value api.py sends for a wait."""
    return max(1, math.ceil(wait))


def test_a_burst_then_refused():
    limit = RateLimit(per_min=60, burst=20)
    assert [limit.take("10.0.0.1", 100.0) for _ in range(20)] == [0.0] * 20
    wait = limit.take("10.0.0.1", 100.0)
    assert wait == pytest.approx(1.0) and retry_after(wait) == 1
    assert limit.take("10.0.0.2", 100.0) == 0.0  # per client


def test_refill_at_the_rate_and_wait_shrinks():
    limit = RateLimit(per_min=6, burst=2)  # one token per 10 s
    assert limit.take("c", 0.0) == 0.0 and limit.take("c", 0.0) == 0.0
    assert limit.take("c", 0.0) == pytest.approx(10.0)
    assert limit.take("c", 4.0) == pytest.approx(6.0)  # refused calls spend nothing
    assert retry_after(limit.take("c", 9.5)) == 1
    assert limit.take("c", 10.0) == 0.0
    assert limit.take("c", 10.0) == pytest.approx(10.0)


def test_refill_stops_at_the_burst():
    limit = RateLimit(per_min=60, burst=3)
    for _ in range(3):
        limit.take("c", 0.0)
    assert [limit.take("c", 3600.0) for _ in range(4)][-1] == pytest.approx(1.0)


def test_retry_after_is_whole_seconds_rounded_up():
    limit = RateLimit(per_min=1, burst=1)
    limit.take("c", 0.0)
    wait = limit.take("c", 0.5)
    assert wait == pytest.approx(59.5) and retry_after(wait) == 60


def test_a_client_that_waits_as_told_is_let_in():
    limit = RateLimit(per_min=7, burst=1)
    limit.take("c", 0.0)
    wait = limit.take("c", 1.0)
    assert limit.take("c", 1.0 + wait + 1e-9) == 0.0


def test_zero_rate_refuses_forever_after_the_burst():
    limit = RateLimit(per_min=0, burst=1)
    assert limit.take("c", 0.0) == 0.0
    assert limit.take("c", 1e9) == math.inf


def test_the_client_table_is_bounded_and_forgets_the_stalest():
    limit = RateLimit(per_min=60, burst=1, max_clients=3)
    for c, t in (("a", 0.0), ("b", 0.0), ("c", 0.0)):
        assert limit.take(c, t) == 0.0
    assert limit.take("a", 0.1) > 0  # "a" is now the most recent; "b" the stalest
    limit.take("d", 0.2)
    assert len(limit) == 3
    assert limit.take("b", 0.3) == 0.0  # forgotten: a full bucket again
    assert limit.take("a", 0.3) > 0  # remembered (and refused)
    assert len(limit) == 3


def test_many_clients_stay_within_the_bound():
    limit = RateLimit(per_min=60, burst=5, max_clients=100)
    for i in range(1000):
        limit.take(f"10.0.{i // 256}.{i % 256}", i / 1000)
    assert len(limit) == 100


def test_spend_runs_into_debt_and_due_says_until_when():
    limit = RateLimit(per_min=600, burst=10)  # 10 tokens/s
    assert limit.due("c", 0.0) == 0.0  # unknown: a full bucket
    assert limit.spend("c", 0.0, 10) == 0.0  # the burst, to zero: not in debt
    assert limit.spend("c", 0.0, 25) == pytest.approx(2.5)  # a batch is taken whole
    assert limit.due("c", 1.0) == pytest.approx(1.5)
    assert limit.due("c", 2.5) == 0.0
    assert limit.take("c", 2.5) == pytest.approx(0.1)  # zero tokens: `take` still refuses
    limit.forget("c")
    assert len(limit) == 0 and limit.take("c", 2.5) == 0.0


def test_event_rates_per_connection_and_per_id_together():
    rates = EventRates(conn_per_s=10, conn_burst=10, id_per_s=5, id_burst=10, max_ids=100)
    rates.spend("conn1", "id", 20, 0.0)  # -10 on the connection, -10 on the id
    assert rates.due("conn1", "id", 0.0) == pytest.approx(2.0)  # the id's: 10 at 5/s
    assert rates.due("conn2", "id", 0.0) == pytest.approx(2.0)  # ... for every connection
    assert rates.due("conn2", "other", 0.0) == 0.0
    rates.forget("conn1")
    assert len(rates.conns) == 0 and len(rates.ids) == 1  # an id outlives a reconnect
    off = EventRates(conn_per_s=0, conn_burst=1, id_per_s=0, id_burst=1, max_ids=1)
    off.spend("c", "id", 10**6, 0.0)
    assert off.due("c", "id", 0.0) == 0.0


def test_event_rates_remember_a_bounded_number_of_ids():
    rates = EventRates(conn_per_s=0, conn_burst=1, id_per_s=1, id_burst=1, max_ids=100)
    for i in range(1000):
        rates.spend(f"conn{i}", f"0.{i}", 5, 0.0)
        rates.forget(f"conn{i}")
    assert len(rates.ids) == 100
    assert rates.due("c", "0.999", 0.0) == pytest.approx(4.0)  # the most recent stay
    assert rates.due("c", "0.0", 0.0) == 0.0  # the stalest went (a full bucket again)
