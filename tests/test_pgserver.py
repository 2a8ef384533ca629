"""bench/pgserver.py: a real, throwaway PostgreSQL on loopback.

One server is started and stopped here (and a second start on its port must fail and
leave nothing behind); tests/conftest.py's session-scoped `postgres` fixture is used once.
Skipped when PostgreSQL is not installed (`make test-tools` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from seed_examples import load_bench_script

pgserver = load_bench_script("pgserver")

pytestmark = pytest.mark.skipif(
    pgserver.find_bin() is None,
    reason="PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin; "
           "`make test-tools` installs it)")


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (IPv4 and IPv6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
            family = socket.AF_INET if width == 4 else socket.AF_INET6
            found.add(socket.inet_ntop(family, raw))
    return found


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_start_query_stop(tmp_path):
    server = pgserver.PostgresServer(tmp_path, fast=True, keep=True)
    with server:
        port = server.port
        assert server.dsn == f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        assert server.url == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        assert server.psql("select 1").strip() == "1"
        assert server.psql("show lc_messages").strip() == "C"
        assert server.psql("show fsync").strip() == "off"
        assert listening_addresses(port) == {"127.0.0.1"}
        assert refused("127.0.0.2", port)  # loopback, but not the address it listens on
        if os.geteuid() == 0:  # PostgreSQL refuses root: it runs as nobody
            status = Path(f"/proc/{server.pid}/status").read_text()
            uid = next(line.split()[1] for line in status.splitlines()
                       if line.startswith("Uid:"))
            assert uid != "0"
        # English messages (DuckLake tells retryable errors by their text).
        with pytest.raises(RuntimeError, match="does not exist"):
            server.psql("select * from no_such_table")

        # Its port taken: the start fails, stops what it started, removes its directory.
        clash = pgserver.PostgresServer(tmp_path / "clash", port=port)
        with pytest.raises(RuntimeError, match="already in use"):
            clash.start()
        assert not clash.running()
        assert not clash.dir.exists()

    assert not server.running()
    assert refused("127.0.0.1", port)
    assert listening_addresses(port) == set()
    server.stop()  # idempotent
    assert server.data_dir.exists()  # keep=True
    shutil.rmtree(server.dir)
    assert not server.dir.exists()


def test_fixture_database(postgres):
    dsn = postgres.create_database("lake catalog")
    assert dsn == f"host=127.0.0.1 port={postgres.port} user=postgres dbname='lake catalog'"
    assert postgres.psql("select current_database()", dbname="lake catalog").strip() == (
        "lake catalog")
    assert postgres.psql("show synchronous_commit").strip() == "off"
