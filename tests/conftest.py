"""Fixtures shared by the test modules.

`postgres`: one real PostgreSQL for the whole session (bench/pgserver.py's
`PostgresServer`, `fast=True`: fsync off), on 127.0.0.1 at a free port, in its own
throwaway directory; stopped and removed at the end. Tests needing it are skipped when
PostgreSQL is not installed (`make test-tools` installs it). Give each test its own
database: `dsn = postgres.create_database("name")`.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    from seed_examples import load_bench_script

    pgserver = load_bench_script("pgserver")
    if pgserver.find_bin() is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in "
                    "/usr/lib/postgresql/*/bin; `make test-tools` installs it)")
    server = pgserver.PostgresServer(tmp_path_factory.mktemp("postgres"), fast=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
