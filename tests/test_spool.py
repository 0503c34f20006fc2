"""The spool (edge_agent.spool): bounds, order, expiry, restarts, bad files, threads. Files, no broker."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_common.settings import SettingsError
from edge_agent.config import EdgeConfig, load_edge_config
from edge_agent.spool import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    Spool,
    SpooledTask,
    SpoolError,
    SpoolFileError,
    SpoolFull,
    open_spool,
)

NOW = 1_700_000_000.0
ROOT = Path(__file__).resolve().parents[1]


def task(n: int, *, size: int = 10, deadline: float | None = None, ttl: float | None = None,
         created: float = NOW) -> SpooledTask:
    return SpooledTask(task_id=f"t{n}", name="square", payload=bytes([n % 256]) * size, created=created,
                       deadline=deadline, ttl=ttl, stage=n % 3 or None, policy="ect" if n % 2 else None,
                       origin='{"route": 0, "output": "results/kitchen"}' if n % 4 == 1 else None)


def ids(entries: list[SpooledTask]) -> list[str]:
    return [entry.task_id for entry in entries]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "spool.db"


def test_first_in_first_out_with_every_field_kept(path: Path) -> None:
    with Spool(path) as spool:
        for n in range(5):
            spool.put(task(n, size=n + 1))
        assert len(spool) == 5
        assert spool.bytes_used == 1 + 2 + 3 + 4 + 5
        assert ids(spool.peek(NOW)) == ["t0", "t1", "t2", "t3", "t4"]
        assert ids(spool.peek(NOW, 2)) == ["t0", "t1"]
        assert len(spool) == 5  # peek leaves them
        taken = spool.take_ready(NOW, 3)
        assert taken == [task(0, size=1), task(1, size=2), task(2, size=3)]
        assert "t0" not in spool and "t3" in spool
        assert (len(spool), spool.bytes_used) == (2, 4 + 5)
        assert ids(spool.take_ready(NOW)) == ["t3", "t4"]
        assert spool.take_ready(NOW) == [] and spool.peek(NOW) == []
        assert (len(spool), spool.bytes_used) == (0, 0)


def test_remove_one_entry(path: Path) -> None:
    with Spool(path) as spool:
        for n in range(3):
            spool.put(task(n))
        assert spool.remove("t1") == task(1)
        assert spool.remove("t1") is None
        assert spool.remove("nope") is None
        assert ids(spool.peek(NOW)) == ["t0", "t2"]
        assert (len(spool), spool.bytes_used) == (2, 20)


def test_full_by_count_refuses_with_the_limits_and_keeps_what_it_has(path: Path) -> None:
    with Spool(path, max_tasks=3, max_bytes=10_000) as spool:
        for n in range(3):
            spool.put(task(n))
        with pytest.raises(SpoolFull) as caught:
            spool.put(task(3))
        assert isinstance(caught.value, ValueError)
        message = str(caught.value)
        assert "'t3'" in message and "3 of 3 tasks" in message and "10000 payload bytes" in message
        assert str(path) in message
        assert ids(spool.peek(NOW)) == ["t0", "t1", "t2"]
        spool.take_ready(NOW, 1)
        spool.put(task(3))  # room again
        assert ids(spool.peek(NOW)) == ["t1", "t2", "t3"]


def test_full_by_bytes_and_a_task_larger_than_the_spool(path: Path) -> None:
    with Spool(path, max_tasks=100, max_bytes=100) as spool:
        spool.put(task(0, size=60))
        with pytest.raises(SpoolFull, match=r"'t1' \(41 bytes\).*60 of 100 payload bytes"):
            spool.put(task(1, size=41))
        spool.put(task(2, size=40))  # exactly full
        assert spool.bytes_used == 100
        spool.take_ready(NOW)
        with pytest.raises(SpoolFull, match=r"\(101 bytes\)"):
            spool.put(task(3, size=101))
        assert len(spool) == 0


def test_a_known_task_id_is_refused_but_not_as_full(path: Path) -> None:
    with Spool(path) as spool:
        spool.put(task(0))
        with pytest.raises(ValueError, match="already in the spool") as caught:
            spool.put(task(0, size=3))
        assert not isinstance(caught.value, SpoolFull)
        assert (len(spool), spool.bytes_used) == (1, 10)


def test_entries_expire_at_the_deadline_or_created_plus_ttl_whichever_is_first(path: Path) -> None:
    with Spool(path) as spool:
        spool.put(task(0, deadline=NOW + 10))
        spool.put(task(1))  # never expires
        spool.put(task(2, ttl=5))
        spool.put(task(3, deadline=NOW + 30, ttl=20))  # ttl first: NOW + 20
        spool.put(task(4, deadline=NOW + 3, ttl=20))  # deadline first
        assert [t.expires_at for t in spool.peek(NOW)] == [NOW + 10, None, NOW + 5, NOW + 20, NOW + 3]
        assert spool.next_expiry() == NOW + 3
        assert spool.expire(NOW + 2.9) == []
        # Expired but not yet collected: neither peeked nor taken.
        assert ids(spool.peek(NOW + 5)) == ["t0", "t1", "t3"]
        assert ids(spool.take_ready(NOW + 5, 1)) == ["t0"]
        expired = spool.expire(NOW + 5)  # at the expiry counts as expired
        assert expired == [task(2, ttl=5), task(4, deadline=NOW + 3, ttl=20)]  # oldest first
        assert spool.next_expiry() == NOW + 20
        assert ids(spool.expire(NOW + 1e6)) == ["t3"]
        assert spool.next_expiry() is None
        assert ids(spool.peek(NOW + 1e9)) == ["t1"]
        assert (len(spool), spool.bytes_used) == (1, 10)


def test_reopened_after_close_the_entries_are_there_in_order(path: Path) -> None:
    with Spool(path) as spool:
        for n in range(4):
            spool.put(task(n, deadline=NOW + n))
        spool.take_ready(NOW - 1, 1)
    with Spool(path) as spool:
        assert (len(spool), spool.bytes_used) == (3, 30)
        assert spool.peek(NOW - 1) == [task(n, deadline=NOW + n) for n in (1, 2, 3)]
        spool.put(task(0))  # a new entry goes last, whatever its id
        assert ids(spool.peek(NOW - 1)) == ["t1", "t2", "t3", "t0"]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_smaller_limits_after_a_restart_refuse_puts_until_it_drains(path: Path) -> None:
    with Spool(path) as spool:
        for n in range(5):
            spool.put(task(n))
    with Spool(path, max_tasks=2) as spool:
        assert len(spool) == 5
        with pytest.raises(SpoolFull, match="5 of 2 tasks"):
            spool.put(task(9))
        spool.take_ready(NOW, 4)
        spool.put(task(9))
        assert ids(spool.peek(NOW)) == ["t4", "t9"]


_CRASHING_WRITER = """
import os, sys
from edge_agent.spool import Spool, SpooledTask
spool = Spool(sys.argv[1])
for n in range(20):
    spool.put(SpooledTask(task_id=f"t{n}", name="square", payload=b"x" * n, created=1.0))
spool.take_ready(2.0, 5)
os._exit(0)  # no close(), no checkpoint: the entries are only in the write-ahead log
"""


def test_entries_survive_a_crash_of_the_process_that_wrote_them(path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(path)], check=True, env=env, timeout=60)
    assert Path(f"{path}-wal").exists()
    with Spool(path) as spool:
        assert ids(spool.peek(2.0)) == [f"t{n}" for n in range(5, 20)]
        assert spool.bytes_used == sum(range(5, 20))


def test_one_spool_per_file_at_a_time(path: Path) -> None:
    with Spool(path) as spool:
        spool.put(task(0))
        with pytest.raises(SpoolFileError, match="in use") as caught:
            Spool(path)
        assert caught.value.path == str(path)
        assert ids(spool.peek(NOW)) == ["t0"]
    with Spool(path) as again:  # released at close
        assert len(again) == 1


def test_a_file_that_is_not_a_database_is_named_in_the_error(path: Path) -> None:
    path.write_bytes(b"this is not SQLite\n" * 300)
    with pytest.raises(SpoolFileError, match="not an SQLite database") as caught:
        Spool(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == b"this is not SQLite\n" * 300  # left as it was


def test_a_damaged_spool_is_named_in_the_error(path: Path) -> None:
    with Spool(path) as spool:
        for n in range(200):
            spool.put(task(n, size=300))
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[3 * page:3 * page + 200] = b"\xff" * 200  # a b-tree page of the table
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolFileError, match="damaged") as caught:
        Spool(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_another_applications_database_is_refused(path: Path) -> None:
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE readings (value REAL)")
    other.commit()
    other.close()
    before = path.read_bytes()
    with pytest.raises(SpoolFileError, match="another application") as caught:
        Spool(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before  # not even switched to WAL
    assert sqlite3.connect(path).execute("SELECT count(*) FROM readings").fetchone() == (0,)


def test_a_newer_schema_is_refused_and_left_alone(path: Path) -> None:
    with Spool(path) as spool:
        spool.put(task(0))
    newer = sqlite3.connect(path)
    assert newer.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.commit()
    newer.close()
    with pytest.raises(SpoolFileError, match=rf"newer version \(schema {SCHEMA_VERSION + 1}"):
        Spool(path)
    assert sqlite3.connect(path).execute("SELECT count(*) FROM spool").fetchone() == (1,)


def test_a_new_spool_is_private_to_its_owner(path: Path) -> None:
    with Spool(path) as spool:
        spool.put(task(0))
        assert Path(f"{path}-wal").exists()
        assert (path.stat().st_mode & 0o777, Path(f"{path}-wal").stat().st_mode & 0o777) == (0o600, 0o600)


def test_a_missing_directory_and_a_memory_database(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "spool.db"
    with pytest.raises(SpoolFileError, match="cannot create it: No such file") as caught:
        Spool(missing)
    assert str(missing) in str(caught.value)
    with pytest.raises(ValueError, match="file path"):
        Spool(":memory:")
    with pytest.raises(ValueError, match="positive"):
        Spool(tmp_path / "x.db", max_tasks=0)


def test_a_closed_spool_says_so(path: Path) -> None:
    spool = Spool(path)
    spool.close()
    spool.close()  # idempotent
    with pytest.raises(SpoolError, match="closed"):
        spool.put(task(0))
    with pytest.raises(SpoolError, match="closed"):
        spool.peek(NOW)


def test_spooled_task_validates_itself() -> None:
    with pytest.raises(TypeError, match="bytes"):
        SpooledTask(task_id="a", name="b", payload="text", created=NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        SpooledTask(task_id="a", name="b", payload=b"", created=NOW, ttl=0)
    with pytest.raises(ValueError, match="deadline"):
        SpooledTask(task_id="a", name="b", payload=b"", created=NOW, deadline=float("nan"))
    with pytest.raises(ValueError, match="created"):
        SpooledTask(task_id="a", name="b", payload=b"", created=float("inf"))
    with pytest.raises(ValueError, match="task_id"):
        SpooledTask(task_id="", name="b", payload=b"", created=NOW)


def test_threads_share_one_spool_within_its_bounds(path: Path) -> None:
    threads, each, limit = 8, 40, 100
    accepted: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    with Spool(path, max_tasks=limit) as spool:
        def writer(worker: int) -> None:
            start.wait()
            for n in range(each):
                entry = task(worker * 1000 + n)
                try:
                    spool.put(entry)
                except SpoolFull:
                    with lock:
                        refused.append(entry.task_id)
                else:
                    with lock:
                        accepted.append(entry.task_id)

        workers = [threading.Thread(target=writer, args=(w,)) for w in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(30)
        assert len(accepted) == limit and len(refused) == threads * each - limit
        assert (len(spool), spool.bytes_used) == (limit, 10 * limit)
        in_order = ids(spool.peek(NOW))
        assert sorted(in_order) == sorted(accepted)
        for worker in range(threads):  # each writer's own entries keep its order
            mine = [i for i in in_order if int(i[1:]) // 1000 == worker]
            assert mine == sorted(mine, key=lambda i: int(i[1:]))

        taken: list[str] = []
        drain = threading.Barrier(4)

        def reader() -> None:
            drain.wait()
            while batch := spool.take_ready(NOW, 7):
                with lock:
                    taken.extend(ids(batch))

        readers = [threading.Thread(target=reader) for _ in range(4)]
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join(30)
        assert sorted(taken) == sorted(accepted)  # each entry taken exactly once
        assert (len(spool), spool.bytes_used) == (0, 0)


_OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 40), st.sampled_from([None, 1.0, 5.0, 50.0])),
    st.tuples(st.just("take"), st.integers(0, 4), st.just(None)),
    st.tuples(st.just("remove"), st.integers(0, 40), st.just(None)),
    st.tuples(st.just("expire"), st.integers(0, 60), st.just(None)),
    st.tuples(st.just("reopen"), st.just(0), st.just(None)),
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_behaves_like_a_bounded_list(ops: list[tuple[str, int, float | None]]) -> None:
    """A random mix of operations, compared with a plain list; reopening changes nothing."""
    with tempfile.TemporaryDirectory() as directory:
        file = Path(directory) / "spool.db"
        spool = Spool(file, max_tasks=6, max_bytes=60)
        model: list[SpooledTask] = []
        clock = NOW
        try:
            for op, n, ttl in ops:
                clock += 1.0
                if op == "put":
                    entry = task(n, size=n % 17, ttl=ttl, created=clock)
                    fits = (len(model) < 6 and sum(len(e.payload) for e in model) + n % 17 <= 60)
                    known = any(e.task_id == entry.task_id for e in model)
                    if known:
                        with pytest.raises(ValueError):
                            spool.put(entry)
                    elif not fits:
                        with pytest.raises(SpoolFull):
                            spool.put(entry)
                    else:
                        spool.put(entry)
                        model.append(entry)
                elif op == "take":
                    ready = [e for e in model if e.expires_at is None or e.expires_at > clock][:n]
                    assert spool.take_ready(clock, n) == ready
                    model = [e for e in model if e not in ready]
                elif op == "remove":
                    found = next((e for e in model if e.task_id == f"t{n}"), None)
                    assert spool.remove(f"t{n}") == found
                    model = [e for e in model if e is not found]
                elif op == "expire":
                    at = clock + n
                    gone = [e for e in model if e.expires_at is not None and e.expires_at <= at]
                    assert spool.expire(at) == gone
                    model = [e for e in model if e not in gone]
                else:
                    spool.close()
                    spool = Spool(file, max_tasks=6, max_bytes=60)
                assert spool.peek(clock) == [e for e in model if e.expires_at is None or e.expires_at > clock]
                assert (len(spool), spool.bytes_used) == (len(model), sum(len(e.payload) for e in model))
                expiries = [e.expires_at for e in model if e.expires_at is not None]
                assert spool.next_expiry() == (min(expiries) if expiries else None)
        finally:
            spool.close()


def test_the_edge_config_names_the_spool_and_its_bounds(tmp_path: Path) -> None:
    config = EdgeConfig(id="cam1")
    assert config.spool_path is None  # no spool unless asked for
    assert (config.spool_max_tasks, config.spool_max_bytes, config.spool_ttl) == (1000, 64 * 2**20, 86_400.0)
    file = tmp_path / "device.toml"
    file.write_text(f'id = "cam1"\nspool_path = "{tmp_path / "spool.db"}"\nspool_max_tasks = 50\n')
    loaded = load_edge_config(file, environ={"EDGE_AGENT_SPOOL_MAX_BYTES": "2000000",
                                             "EDGE_AGENT_SPOOL_TTL": "600"})
    assert loaded.spool_path == tmp_path / "spool.db"
    assert (loaded.spool_max_tasks, loaded.spool_max_bytes, loaded.spool_ttl) == (50, 2_000_000, 600.0)
    assert loaded.spool_path is not None
    with Spool(loaded.spool_path, max_tasks=loaded.spool_max_tasks,
               max_bytes=loaded.spool_max_bytes) as spool:
        assert (spool.max_tasks, spool.max_bytes) == (50, 2_000_000)


@pytest.mark.parametrize(("fields", "problem"), [
    ({"spool_path": ""}, "must name a file"),
    ({"spool_path": ":memory:"}, "must name a file"),
    ({"spool_max_tasks": 0}, "greater than or equal to 1"),
    ({"spool_ttl": 0}, "greater than 0"),
    ({"spool_path": "s.db", "spool_max_bytes": 4096}, "smaller than max_payload"),
])
def test_the_edge_config_refuses_a_spool_that_cannot_work(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        load_edge_config(overrides={"id": "cam1", **fields}, environ={})


def test_a_directory_is_not_a_spool_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"is a directory; name a file in it"):
        load_edge_config(overrides={"id": "cam1", "spool_path": str(tmp_path)}, environ={})


@pytest.mark.parametrize("spoil", ["not-sqlite", "foreign"])
def test_open_spool_moves_an_unusable_file_aside_and_starts_afresh(
        path: Path, spoil: str, caplog: pytest.LogCaptureFixture) -> None:
    if spoil == "not-sqlite":
        path.write_bytes(b"this is not SQLite\n" * 300)
    else:
        other = sqlite3.connect(path)
        other.execute("CREATE TABLE readings (value REAL)")
        other.commit()
        other.close()
    before = path.read_bytes()
    caplog.set_level(logging.WARNING, logger="spool-test")
    with open_spool(path, now=1234.5, log=logging.getLogger("spool-test")) as spool:
        spool.put(task(0))
        assert len(spool) == 1
    assert (path.parent / "spool.db.bad-1234").read_bytes() == before  # kept, for a post-mortem
    warnings = [r.getMessage() for r in caplog.records if r.name == "spool-test"]
    assert len(warnings) == 1 and "spool.db.bad-1234" in warnings[0] and str(path) in warnings[0]


def test_open_spool_leaves_a_newer_or_busy_file_alone(path: Path) -> None:
    with Spool(path) as spool:
        spool.put(task(0))
        with pytest.raises(SpoolFileError, match="in use"):
            open_spool(path, now=1.0, log=logging.getLogger("spool-test"))
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.commit()
    newer.close()
    with pytest.raises(SpoolFileError, match="newer version"):
        open_spool(path, now=1.0, log=logging.getLogger("spool-test"))
    assert not list(path.parent.glob("*.bad-*"))
