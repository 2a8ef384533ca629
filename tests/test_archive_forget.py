"""forget reaches the archive: each archived day holding the person's rows is written
again without them (atomically, with a new manifest); a crash between the partition
swap's two renames is finished by the next run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import trio
from test_archive import MIDNIGHT_0503, run
from test_e2e_collector import running
from test_export import row

from triolytics.core.journal import Position
from triolytics.storage.archive import finish_swaps, forget_archived, verify
from triolytics.storage.store import Store

DAY_AFTER = MIDNIGHT_0503 + 26 * 3_600_000_000  # 2024-05-04T02:00Z: two days closed


def person(r, i: int):
    """Rows 0, 3, 6 of each day are the victim's; 1, 4, 7 have no user id."""
    return r._replace(user_id="victim" if i % 3 == 0 else None if i % 3 == 1 else f"u{i}")


@pytest.fixture
def archived(tmp_path):
    store = Store(tmp_path / "events.duckdb")
    store.load([person(row(i, d), i) for d in range(2) for i in range(9)], Position(1, 100))
    root = tmp_path / "archive"
    assert run(store, root, DAY_AFTER) == ["2024-05-01", "2024-05-02"]
    yield store, root
    store.close()


def users(root: Path) -> list:
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table(
        columns=["message_id", "user_id"])
    return sorted(zip(table.column("message_id").to_pylist(),
                      table.column("user_id").to_pylist(), strict=True))


def test_the_person_leaves_every_archived_day(archived):
    store, root = archived
    before = users(root)
    assert forget_archived(store.cursor(), root, "user_id", "victim", None) == 6
    after = users(root)
    assert after == [(m, u) for m, u in before if u != "victim"]  # NULL user ids kept
    assert len(after) == 12
    for folder in sorted(root.glob("dt=*")):
        assert verify(folder) is None  # a new manifest matching the new file
        manifest = json.loads((folder / "_manifest.json").read_text())
        assert manifest["rows"] == 6
    assert sorted(p.name for p in root.iterdir()) == ["dt=2024-05-01", "dt=2024-05-02"]
    assert forget_archived(store.cursor(), root, "user_id", "victim", None) == 0


def test_a_project_filter_and_nothing_to_do(archived):
    store, root = archived
    assert forget_archived(store.cursor(), root, "user_id", "victim", "elsewhere") == 0
    assert forget_archived(store.cursor(), root, "user_id", "nobody", None) == 0
    assert forget_archived(store.cursor(), root.parent / "none", "user_id", "x", None) == 0


def test_a_crash_between_the_swap_renames_is_finished(archived, monkeypatch):
    store, root = archived
    renames = []
    real = Path.rename

    def crash_on_the_second(self, target):
        if self.is_dir():  # (the swap's renames, not its files')
            renames.append(target)
        if len(renames) == 2:  # the old day is aside, the new one not yet in place
            raise OSError("killed")
        return real(self, target)
    monkeypatch.setattr(Path, "rename", crash_on_the_second)
    with pytest.raises(OSError):
        forget_archived(store.cursor(), root, "user_id", "victim", None)
    monkeypatch.undo()
    assert not (root / "dt=2024-05-01").exists()  # the moment of the crash
    finish_swaps(root)  # (the next archive or forget run starts with this)
    assert sorted(p.name for p in root.iterdir()) == ["dt=2024-05-01", "dt=2024-05-02"]
    assert [u for _, u in users(root)].count("victim") == 3  # day 1 done, day 2 not yet
    assert forget_archived(store.cursor(), root, "user_id", "victim", None) == 3


def test_a_swap_that_never_started_is_dropped(archived):
    store, root = archived
    stale = root / ".dt=2024-05-01.forget-0000"
    stale.mkdir()
    (stale / "part-0.parquet").write_bytes(b"half")
    finish_swaps(root)
    assert not stale.exists() and verify(root / "dt=2024-05-01") is None


async def test_forget_through_the_server_reaches_the_archive(tmp_path):
    data, root = tmp_path / "data", tmp_path / "archive"
    async with running(data, archive_dir=str(root), archive_grace_s=0.0,
                       archive_interval_s=0.2) as server:
        for i in range(6):
            reply = await server.post("/v1/capture", headers={"x-write-key": "wk_123456789"},
                                      json={"type": "track", "event": "E", "userId": (
                                          "victim" if i % 2 else f"u{i}"),
                                          "timestamp": "2024-05-01T12:00:00Z"})
            assert reply.status_code == 201
        token = (data / "admin.token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        with trio.fail_after(20):
            while not (await server.post("/admin/query", headers=auth, json={
                    "sql": "SELECT count(*) FROM archived_days"})).json()["rows"][0][0]:
                await trio.sleep(0.05)  # (the archiver runs every archive_interval_s)
        forgot = await server.post("/admin/forget", headers=auth,
                                   json={"kind": "user", "id": "victim"})
    assert forgot.status_code == 200, forgot.text
    assert forgot.json()["archived_rows"] == 4  # 3 events and their session_start
    assert "victim" not in [u for _, u in users(root)]
