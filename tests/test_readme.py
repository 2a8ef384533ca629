"""Every example in README.md and docs/*.md, run as written against a live server.

The server is `python -m triolytics serve --port 0 --write-key wk_123456789` as a
subprocess (bench/crash_loop.py's `Server`, as tests/test_crash.py uses it), one for the
whole module, with its data in `<tmp>/data`. Examples run in `<tmp>`, laid out like a
checkout where `make run ARGS="--write-key wk_123456789"` is serving: `data/` is the
server's data directory (so `triolytics query` and `keys` find it by their default
`./data`), and `.venv` is a link to the environment running these tests (so
`.venv/bin/triolytics` is this install).

What happens to each fenced block, by its language:
- `sh`: run with `bash -e` (the shell examples need curl); `python`: written to a file
  and run with this Python. Either must exit 0.
- `text` directly after a run block: what that block prints, line for line; `…` matches
  any text within a line. (After a block that is not run it is not checked.)
- `json`: must parse. `toml`: must be a valid triolytics config file.
- A block of any language preceded by the line
  `<!-- not run by tests/test_readme.py: <why> -->` is not run (a `make run` starts its
  own server, `make test` is the suite). The test asserts that the blocks not run are
  exactly the marked ones: a block of another language must be marked, and a marker with
  no block under it, or without a reason, fails.

Rewrite rules — the only change made to a block before it runs:
1. `localhost:3000` becomes `127.0.0.1:<port>`, the port the server was given.
No other rewrite: paths need none (the layout above), and `TRIOLYTICS_*` variables are
removed from the examples' environment, as from the server's, so they read no settings
but their own.

After a document's blocks have run, the events they were to store must be in DuckDB
(`STORES`, read through `POST /admin/query`): an example that answers but stores nothing
fails too.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from seed_examples import load_bench_script

from triolytics.core.config import load_config

crash_loop = load_bench_script("crash_loop")

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
WRITE_KEY = "wk_123456789"
RUN = {"sh", "python"}
DATA = {"json", "toml", "text"}
NOT_RUN = re.compile(r"<!-- not run by tests/test_readme\.py:(.*)-->")
FENCE = re.compile(r"^```(\S*)\s*$")
BLOCK_TIMEOUT_S = 30.0
STORED_WITHIN_S = 5.0  # loads run every second (load_interval_ms)

# What each document's examples store: (event name, or type when there is none) -> rows.
STORES = {
    "README.md": {"Button Clicked": 1, "Signed Up": 1, "screen_view": 2, "button_click": 2},
    "docs/collector-api.md": {"Button Clicked": 1, "Order Completed": 1},
    "docs/realtime-api.md": {"screen_view": 1, "button_click": 1},
    "docs/api.md": {},  # its one example reads (POST /admin/query)
    "docs/deployment.md": {},  # its one example reads (triolytics query)
}


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the marker's reason

    def __str__(self) -> str:
        return f"{self.doc}:{self.line} ({self.lang or 'no language'})"


def blocks(doc: str) -> list[Block]:
    """The fenced blocks of a document, each with the not-run marker on the line above."""
    lines = (ROOT / doc).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = NOT_RUN.fullmatch(lines[i - 1].strip()) if i else None
        found.append(Block(doc, i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n",
                           marker.group(1).strip() if marker else None))
        i = end + 1
    return found


def stale_markers(doc: str) -> list[int]:
    """Lines of not-run markers that are not directly above a fence."""
    lines = (ROOT / doc).read_text().splitlines()
    return [n + 1 for n, line in enumerate(lines) if NOT_RUN.search(line)
            and (n + 1 >= len(lines) or not FENCE.match(lines[n + 1]))]


def matches(output: str, expected: str) -> bool:
    """`output` is `expected` line for line, `…` standing for any text within a line."""
    got, want = output.rstrip("\n").splitlines(), expected.rstrip("\n").splitlines()
    return len(got) == len(want) and all(
        re.fullmatch(".*?".join(map(re.escape, w.split("…"))), g.rstrip())
        for g, w in zip(got, want, strict=True))


def rewrite(text: str, port: int) -> str:
    return text.replace("localhost:3000", f"127.0.0.1:{port}")


class Checkout:
    """The examples' working directory and the server they talk to."""

    def __init__(self, where: Path) -> None:
        self.where = where
        (where / ".venv").symlink_to(sys.prefix, target_is_directory=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOLYTICS_")}
        self.server = crash_loop.Server(where / "data", where / "server.log",
                                        write_key=WRITE_KEY, port=0)
        self.server.wait_healthy()

    def run(self, block: Block) -> str:
        code = rewrite(block.text, self.server.port)
        if block.lang == "sh":
            argv = ["bash", "-e", "-c", code]
        else:
            path = self.where / f"example_{Path(block.doc).stem}_{block.line}.py"
            path.write_text(code)
            argv = [sys.executable, str(path)]
        done = subprocess.run(argv, cwd=self.where, env=self.env, capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT_S)
        assert done.returncode == 0, (
            f"{block} exited {done.returncode}\n--- stdout\n{done.stdout}"
            f"--- stderr\n{done.stderr}--- server log\n{self.log()}")
        return done.stdout

    def stored(self) -> dict[str, int]:
        """Rows of clients' events (not session rows), by event name or else type."""
        token = (self.where / "data" / "admin.token").read_text().strip()
        sql = ("SELECT coalesce(event, type), count(*) FROM events "
               "WHERE type NOT IN ('session_start', 'session_end') GROUP BY ALL")
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            conn.request("POST", "/admin/query", body=json.dumps({"sql": sql}),
                         headers={"Authorization": f"Bearer {token}"})
            reply = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        return {name: count for name, count in reply["rows"]}

    def log(self) -> str:
        return self.server.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the shell examples use it")
    where = Checkout(tmp_path_factory.mktemp("checkout"))
    try:
        yield where
    finally:
        code = where.server.terminate()
    assert code == 0, where.log()


def check_data(block: Block) -> None:
    if block.lang == "json":
        json.loads(block.text)
    elif block.lang == "toml":
        load_config(block.text, {}, {})


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_blocks_not_run_are_exactly_the_marked_ones(doc):
    found = blocks(doc)
    unknown = [str(b) for b in found if b.not_run is None and b.lang not in RUN | DATA]
    assert not unknown, f"mark these as not run (and say why), or tag them sh/python: {unknown}"
    assert not [str(b) for b in found if b.not_run == ""], "a marker must say why"
    assert not stale_markers(doc), f"{doc}: markers above no block, lines {stale_markers(doc)}"
    if doc == "README.md":  # only what starts a server or the suite is left out there
        skipped = [b for b in found if b.not_run is not None]
        assert skipped and all(b.text.startswith("make ") for b in skipped), \
            [str(b) for b in skipped]


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_examples_run_as_written(doc, request):
    found = blocks(doc)
    for block in found:
        if block.not_run is None and block.lang in {"json", "toml"}:
            check_data(block)
    runnable = [b for b in found if b.not_run is None and b.lang in RUN]
    if not runnable:
        assert doc not in STORES
        return
    where = request.getfixturevalue("checkout")
    before = where.stored()
    previous: Block | None = None
    output = ""
    for block in found:
        if block.not_run is None and block.lang in RUN:
            output = where.run(block)
        elif block.lang == "text" and previous is not None and previous.not_run is None \
                and previous.lang in RUN:
            assert matches(output, block.text), \
                f"{previous} printed\n{output}\nnot as {block} says:\n{block.text}"
        previous = block
    expected = STORES[doc]
    deadline = time.monotonic() + STORED_WITHIN_S
    while True:
        now = where.stored()
        added = {k: now.get(k, 0) - before.get(k, 0) for k in now}
        added = {k: v for k, v in added.items() if v}
        if added == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # bounded polling: loads run every second
    assert added == expected, f"{doc}'s examples stored {added}, not {expected}\n{where.log()}"


def test_output_check_catches_a_wrong_answer():
    assert matches('{"ok":true,"id":"abc"}\n201\n', '{"ok":true,"id":"…"}\n201\n')
    assert not matches('{"error":{"code":"unknown_write_key"}}\n401\n',
                       '{"ok":true,"id":"…"}\n201\n')
    assert not matches('{"ok":true,"id":"abc"}\n', '{"ok":true,"id":"…"}\n201\n')
