"""A durable, bounded, first-in first-out store of tasks that cannot run anywhere yet.

One SQLite file (stdlib ``sqlite3``) in WAL mode holds the tasks a device accepted while no server was
reachable and it could not run them itself; they are taken out, oldest first, once a server is back.
The spool stores bytes (the task's already-encoded wire payload) and a few plain columns, never
pickles. It knows nothing of MQTT, policies or futures, and reads no clock: every time is an argument.

* Bounded by count and by total payload bytes: :meth:`Spool.put` raises :class:`SpoolFull` (a
  ``ValueError``, with both limits in its message) when a task does not fit. Nothing is dropped.
* Each entry expires at its deadline or at ``created + ttl``, whichever comes first (neither: it
  never expires). :meth:`Spool.take_ready` and :meth:`Spool.peek` skip expired entries;
  :meth:`Spool.expire` removes and returns them, so the caller can answer them ``expired``.
* ``PRAGMA synchronous=FULL``: a task :meth:`Spool.put` accepted survives a power cut, not only a
  crash of the process (NORMAL in WAL mode may lose the last commits on power loss; devices lose power).
  Tasks are spooled only while nothing can run them, so the rate is low and the fsync per write is
  affordable (``bench/spool_bench.py`` measures it).
* One process owns the file (``locking_mode=EXCLUSIVE``): a second agent on the same spool would send
  its tasks twice, so it gets :class:`SpoolFileError` instead. Inside the process one connection,
  behind a lock, serves every thread.
* A file that is not SQLite, is damaged, belongs to another application, or was written by a newer
  schema raises :class:`SpoolFileError` naming the file.

``take_ready`` removes what it returns in the same transaction (a crash before the caller sent them
loses them: at most once); ``peek`` then ``remove`` after sending keeps them until they are handed
over (at least once)::

    spool = Spool(config.spool_path, max_tasks=config.spool_max_tasks, max_bytes=config.spool_max_bytes)
    spool.put(SpooledTask(task_id=tid, name="detect", payload=encoded, created=time.time(),
                          deadline=deadline, ttl=config.spool_ttl))   # SpoolFull: refuse the submit
    for entry in spool.peek(time.time(), limit=16):                   # a server is back
        send(entry)
        spool.remove(entry.task_id)
    for entry in spool.expire(time.time()):                           # a timer at spool.next_expiry()
        answer(entry.task_id, "expired")
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the files this code writes; a larger one is refused."""
APPLICATION_ID = 0x4F46534B  # "OFSK": marks the file as an offload spool (PRAGMA application_id)

_COLUMNS = "task_id, name, payload, stage, policy, created, deadline, ttl, origin"
_SCHEMA = (
    """CREATE TABLE spool (
    seq INTEGER PRIMARY KEY,             -- insertion order: FIFO across restarts
    task_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    payload BLOB NOT NULL,               -- the encoded wire bytes, as given
    stage INTEGER,
    policy TEXT,
    created REAL NOT NULL,               -- Unix time (wall clock: it must survive a restart)
    deadline REAL,                       -- Unix time or NULL
    ttl REAL,                            -- seconds from created, or NULL
    expires_at REAL,                     -- min(deadline, created + ttl), or NULL: never
    origin TEXT                          -- the caller's reference, returned as is
    )""",
    "CREATE INDEX spool_expiry ON spool (expires_at) WHERE expires_at IS NOT NULL",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class SpoolError(Exception):
    """Root of the spool's errors."""


class SpoolFull(SpoolError, ValueError):
    """The task does not fit: too many tasks, too many bytes, or the disk is full."""


class SpoolFileError(SpoolError):
    """The spool file cannot be used (not SQLite, damaged, foreign, newer schema, in use)."""

    def __init__(self, path: str, problem: str, *, replaceable: bool = False) -> None:
        super().__init__(f"spool {path}: {problem}")
        self.path = path
        self.problem = problem
        self.replaceable = replaceable
        """The file is not a usable spool (not SQLite, damaged, foreign): :func:`open_spool` moves it
        aside and starts afresh. Not for a file in use, unwritable, or of a newer version."""


@dataclass(frozen=True, slots=True)
class SpooledTask:
    """One waiting task: what the device needs to send it later, or to answer it ``expired``."""

    task_id: str
    name: str
    payload: bytes
    """The task's encoded wire payload, stored and returned as is."""
    created: float
    """Unix time the task was submitted (wall clock: monotonic time means nothing after a restart)."""
    deadline: float | None = None
    """Unix time by which the task must be answered, or None."""
    ttl: float | None = None
    """Seconds from ``created`` the task may wait in the spool, or None (only the deadline counts)."""
    stage: int | None = None
    policy: str | None = None
    origin: str | None = None
    """Who waits for the answer, in the caller's own terms (say JSON naming a bridge route and its
    output topic), so a restarted agent can answer it; stored and returned as is."""

    def __post_init__(self) -> None:
        if not self.task_id or not self.name:
            raise ValueError("a spooled task needs a task_id and a name")
        if not isinstance(self.payload, bytes):
            raise TypeError(f"payload must be bytes (the encoded task), not {type(self.payload).__name__}")
        if not math.isfinite(self.created):
            raise ValueError(f"created must be a finite Unix time, not {self.created!r}")
        if self.deadline is not None and not math.isfinite(self.deadline):
            raise ValueError(f"deadline must be a finite Unix time or None, not {self.deadline!r}")
        if self.ttl is not None and not (math.isfinite(self.ttl) and self.ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds or None, not {self.ttl!r}")

    @property
    def expires_at(self) -> float | None:
        """When the task stops being worth sending: the deadline or ``created + ttl``, the earlier."""
        ends = [end for end in (self.deadline, None if self.ttl is None else self.created + self.ttl)
                if end is not None]
        return min(ends) if ends else None


_Row = tuple[str, str, bytes, int | None, str | None, float, float | None, float | None, str | None]


def _entry(row: _Row) -> SpooledTask:
    task_id, name, payload, stage, policy, created, deadline, ttl, origin = row
    return SpooledTask(task_id=task_id, name=name, payload=bytes(payload), created=created,
                       deadline=deadline, ttl=ttl, stage=stage, policy=policy, origin=origin)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (the connection is in autocommit mode otherwise)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Spool:
    """The spool file at ``path``: ``max_tasks`` entries and ``max_bytes`` of payload at most.

    Reopening the file after a restart (or a crash) finds its entries, in order. Limits may change
    between runs: a spool that holds more than its new limits refuses puts until it is below them.
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: Path | str, *, max_tasks: int = 1000, max_bytes: int = 64 * 2**20) -> None:
        if max_tasks < 1 or max_bytes < 1:
            raise ValueError(f"spool limits must be positive (max_tasks={max_tasks}, max_bytes={max_bytes})")
        self._path = str(path)
        if self._path == ":memory:" or self._path.startswith("file:"):
            raise ValueError("the spool needs a file path (it exists to survive a restart)")
        self._max_tasks = max_tasks
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        db = self._open()
        try:
            count, size = db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM spool").fetchone()
        except sqlite3.DatabaseError as exc:
            db.close()
            raise self._file_error(exc) from exc
        self._count, self._bytes = int(count), int(size)
        self._db: sqlite3.Connection | None = db

    # ------------------------------------------------------------------------------ opening
    def _file_error(self, exc: sqlite3.Error) -> SpoolFileError:
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_BUSY":
            return SpoolFileError(self._path, "in use by another process or Spool (one agent per spool file)")
        if name == "SQLITE_CANTOPEN":
            return SpoolFileError(self._path, "cannot open it (are it and its directory writable?)")
        if name == "SQLITE_NOTADB":
            return SpoolFileError(self._path, "not an SQLite database (not a spool file?)", replaceable=True)
        if name in ("SQLITE_CORRUPT", "SQLITE_CORRUPT_INDEX", "SQLITE_CORRUPT_SEQUENCE"):
            return SpoolFileError(self._path, "the database is damaged (move it away to start afresh)",
                                  replaceable=True)
        return SpoolFileError(self._path, f"{exc} ({name or type(exc).__name__})")

    def _open(self) -> sqlite3.Connection:
        try:  # a new spool is readable by its owner only (task payloads may be private);
            # SQLite gives the -wal file the database file's permissions
            os.close(os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise SpoolFileError(self._path, f"cannot create it: {exc.strerror or exc}") from exc
        try:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=0)
        except sqlite3.Error as exc:
            raise self._file_error(exc) from exc
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._check_schema(db, create=False)  # a foreign file is refused before WAL touches it
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolFileError(self._path, f"cannot use WAL mode (journal mode stays {mode!r})")
            db.execute("PRAGMA synchronous=FULL")
            with _transaction(db):  # takes the exclusive lock now, held until close
                self._check_schema(db)
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                detail = " ".join(str(problems[-1]).split())[:200]
                raise SpoolFileError(self._path, f"the database is damaged: {detail} "
                                                 "(move it away to start afresh)", replaceable=True)
        except sqlite3.Error as exc:
            db.close()
            raise self._file_error(exc) from exc
        except BaseException:
            db.close()
            raise
        return db

    def _check_schema(self, db: sqlite3.Connection, *, create: bool = True) -> None:
        """Refuse a foreign or newer file; create the schema in an empty one (if ``create``)."""
        application = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if application == 0 and version == 0 and tables == 0:
            if create:
                for statement in _SCHEMA:
                    db.execute(statement)
            return
        if application != APPLICATION_ID:
            raise SpoolFileError(self._path, f"an SQLite database of another application "
                                             f"(application_id {application:#x}), not a spool",
                                 replaceable=True)
        if version > SCHEMA_VERSION:
            raise SpoolFileError(self._path, f"written by a newer version (schema {version}; this one "
                                             f"reads up to {SCHEMA_VERSION})")
        if version < 1:
            raise SpoolFileError(self._path, f"unknown spool schema {version}", replaceable=True)

    # ------------------------------------------------------------------------------ properties
    @property
    def path(self) -> str:
        return self._path

    @property
    def max_tasks(self) -> int:
        return self._max_tasks

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def bytes_used(self) -> int:
        """Total payload bytes of the waiting tasks."""
        return self._bytes

    def __len__(self) -> int:
        return self._count

    def __contains__(self, task_id: object) -> bool:
        if not isinstance(task_id, str):
            return False
        with self._using() as db:
            return db.execute("SELECT 1 FROM spool WHERE task_id = ?", (task_id,)).fetchone() is not None

    def __repr__(self) -> str:
        return (f"Spool({self._path!r}: {self._count}/{self._max_tasks} tasks, "
                f"{self._bytes}/{self._max_bytes} bytes)")

    # ------------------------------------------------------------------------------ operations
    def put(self, task: SpooledTask) -> None:
        """Append ``task``; :class:`SpoolFull` if it does not fit, ``ValueError`` for a known id.

        Durable once it returns. An entry already expired is accepted: the next :meth:`expire`
        returns it (callers usually answer such a task at once instead of spooling it).
        """
        size = len(task.payload)
        with self._using() as db:
            if self._count + 1 > self._max_tasks or self._bytes + size > self._max_bytes:
                raise SpoolFull(f"spool full: task {task.task_id!r} ({size} bytes) does not fit; "
                                f"{self._count} of {self._max_tasks} tasks and {self._bytes} of "
                                f"{self._max_bytes} payload bytes used ({self._path})")
            try:
                db.execute(f"INSERT INTO spool ({_COLUMNS}, expires_at) VALUES ({', '.join('?' * 10)})",
                           (task.task_id, task.name, task.payload, task.stage, task.policy, task.created,
                            task.deadline, task.ttl, task.origin, task.expires_at))
            except sqlite3.IntegrityError:
                raise ValueError(f"task {task.task_id!r} is already in the spool ({self._path})") from None
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
                    raise SpoolFull(f"spool full: the disk holding {self._path} is full "
                                    f"(task {task.task_id!r}, {size} bytes)") from exc
                raise
            self._count += 1
            self._bytes += size

    def peek(self, now: float, limit: int | None = None) -> list[SpooledTask]:
        """The oldest ``limit`` entries (all: None) not expired at ``now``, left in the spool."""
        with self._using() as db:
            return self._ready(db, now, limit)

    def take_ready(self, now: float, limit: int | None = None) -> list[SpooledTask]:
        """Remove and return the oldest ``limit`` entries (all: None) not expired at ``now``."""
        with self._using() as db:
            with _transaction(db):
                taken = self._ready(db, now, limit)
                db.executemany("DELETE FROM spool WHERE task_id = ?", [(t.task_id,) for t in taken])
            self._forget(taken)
            return taken

    def remove(self, task_id: str) -> SpooledTask | None:
        """Remove one entry (sent, or cancelled by its caller); None if it is not here."""
        with self._using() as db:
            with _transaction(db):  # SELECT then DELETE: SQLite before 3.35 has no DELETE ... RETURNING
                row = db.execute(f"SELECT {_COLUMNS} FROM spool WHERE task_id = ?", (task_id,)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM spool WHERE task_id = ?", (task_id,))
            if row is None:
                return None
            entry = _entry(row)
            self._forget([entry])
            return entry

    def expire(self, now: float) -> list[SpooledTask]:
        """Remove and return, oldest first, every entry whose expiry is at or before ``now``."""
        with self._using() as db:
            with _transaction(db):
                rows = db.execute(f"SELECT {_COLUMNS} FROM spool WHERE expires_at <= ? ORDER BY seq",
                                  (now,)).fetchall()
                if rows:
                    db.execute("DELETE FROM spool WHERE expires_at <= ?", (now,))
            expired = [_entry(row) for row in rows]
            self._forget(expired)
            return expired

    def next_expiry(self) -> float | None:
        """The earliest expiry of any entry (when to call :meth:`expire` next), or None."""
        with self._using() as db:
            value: float | None = db.execute("SELECT min(expires_at) FROM spool").fetchone()[0]
            return value

    def close(self) -> None:
        """Close the file (idempotent); the entries stay in it for the next run."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------------------ helpers
    def _ready(self, db: sqlite3.Connection, now: float, limit: int | None) -> list[SpooledTask]:
        rows = db.execute(f"SELECT {_COLUMNS} FROM spool WHERE expires_at IS NULL OR expires_at > ? "
                          "ORDER BY seq LIMIT ?", (now, -1 if limit is None else max(limit, 0))).fetchall()
        return [_entry(row) for row in rows]

    def _forget(self, entries: list[SpooledTask]) -> None:
        self._count -= len(entries)
        self._bytes -= sum(len(entry.payload) for entry in entries)

    @contextlib.contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; SQLite's errors become :class:`SpoolFileError`."""
        with self._lock:
            if self._db is None:
                raise SpoolError(f"spool {self._path} is closed")
            try:
                yield self._db
            except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
                raise  # our mistake or the caller's, not the file's
            except sqlite3.DatabaseError as exc:
                raise self._file_error(exc) from exc


def open_spool(path: Path | str, *, now: float, log: logging.Logger, max_tasks: int = 1000,
               max_bytes: int = 64 * 2**20) -> Spool:
    """The spool at ``path``; a file that is not a usable spool (not SQLite, damaged, foreign) is
    moved aside to ``<path>.bad-<now>`` (with its ``-wal`` and ``-shm``), the reason logged, and a
    fresh spool started there. Other problems (in use, unwritable, a newer version) raise."""
    try:
        return Spool(path, max_tasks=max_tasks, max_bytes=max_bytes)
    except SpoolFileError as exc:
        if not exc.replaceable:
            raise
        aside = f"{path}.bad-{int(now)}"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        log.warning("%s; moved it to %s and started a fresh spool", exc, aside)
        return Spool(path, max_tasks=max_tasks, max_bytes=max_bytes)


__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "Spool", "SpoolError", "SpoolFileError", "SpoolFull",
           "SpooledTask", "open_spool"]
