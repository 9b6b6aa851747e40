"""The SQLite store: one machine, and a restart loses nothing.

The database runs in WAL mode; every operation is one ``BEGIN IMMEDIATE`` transaction run on a
dedicated thread (the stdlib ``sqlite3`` module, so nothing blocks the event loop), and the
compare-and-set and the fencing check happen inside that transaction. Several processes on the
same machine may share the file: SQLite serialises their writes (``busy_timeout_s``).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar

from voicefsm.model import SessionRecord, TranscriptLine
from voicefsm.stores.base import (
    Clock,
    Lease,
    LeaseRow,
    SessionQuery,
    SessionSummary,
    StateFilter,
    StoreBase,
    StoreClosed,
    StoredSession,
    StoreUnavailable,
    VersionConflict,
    check_expected_version,
    check_ttl,
    check_worker_id,
    check_write,
    grant,
    released,
    renewed,
    version_after_save,
)

_T = TypeVar("_T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    record TEXT NOT NULL,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_started_at ON sessions (started_at);
CREATE TABLE IF NOT EXISTS leases (
    session_id TEXT PRIMARY KEY,
    token INTEGER NOT NULL,
    owner TEXT,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS transcript (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
"""


class SQLiteStore(StoreBase):
    """Sessions, transcripts and leases in one SQLite file.

    ``path`` is created (with its schema) on first use. ``synchronous="FULL"`` (the default) makes
    every commit durable across a power loss; ``"NORMAL"`` is faster and still loses nothing when
    only the process dies. ``busy_timeout_s`` bounds how long a write waits for another process
    holding the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = time.time,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout_s: float = 5.0,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        self.path = Path(path)
        self._clock = clock
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="voicefsm-sqlite"
        )
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # ------------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        executor = self._executor
        if executor is None:
            raise StoreClosed(f"{self!r} was closed; open a new SQLiteStore")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            conn = self._conn if self._conn is not None else self._open()
            return fn(conn)
        except (sqlite3.OperationalError, OSError) as error:
            raise StoreUnavailable(
                f"SQLite database {str(self.path)!r} failed: {error}. Check that the file and "
                "its directory are writable and the disk has room; the write can be retried."
            ) from error

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(
                    f"SQLite database {str(self.path)!r} cannot use WAL mode (got {mode!r}); "
                    "put it on a local file system"
                )
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            user_version = conn.execute("PRAGMA user_version").fetchone()[0]
            if user_version > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise StoreUnavailable(
                    f"SQLite database {str(self.path)!r} has schema version {user_version}, "
                    f"newer than this voicefsm understands ({SCHEMA_VERSION}); upgrade voicefsm"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    @staticmethod
    def _transaction(conn: sqlite3.Connection, fn: Callable[[], _T]) -> _T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    @staticmethod
    def _lease_row(conn: sqlite3.Connection, session_id: str) -> LeaseRow:
        row = conn.execute(
            "SELECT token, owner, expires_at FROM leases WHERE session_id = ?", (session_id,)
        ).fetchone()
        return LeaseRow(row[0], row[1], row[2]) if row is not None else LeaseRow()

    @staticmethod
    def _put_lease(conn: sqlite3.Connection, session_id: str, row: LeaseRow) -> None:
        conn.execute(
            "INSERT INTO leases (session_id, token, owner, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (session_id) DO UPDATE SET token = excluded.token, "
            "owner = excluded.owner, expires_at = excluded.expires_at",
            (session_id, row.token, row.owner, row.expires_at),
        )

    # ------------------------------------------------------------------ records

    async def load(self, session_id: str) -> StoredSession | None:
        """The session's latest record and version, or ``None``."""

        def load(conn: sqlite3.Connection) -> tuple[int, str] | None:
            row = conn.execute(
                "SELECT version, record FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            return (row[0], row[1]) if row is not None else None

        found = await self._run(load)
        if found is None:
            return None
        return StoredSession(SessionRecord.model_validate_json(found[1]), found[0])

    async def save(
        self,
        record: SessionRecord,
        *,
        expected_version: int | None = None,
        fencing_token: int | None = None,
    ) -> int:
        """Store ``record``; see :meth:`voicefsm.stores.SessionStore.save`."""
        check_expected_version(expected_version)
        session_id = record.session_id
        data = record.model_dump_json()
        now = self._clock()

        def save(conn: sqlite3.Connection) -> int:
            def body() -> int:
                check_write(session_id, fencing_token, self._lease_row(conn, session_id), now)
                row = conn.execute(
                    "SELECT version, record FROM sessions WHERE session_id = ?", (session_id,)
                ).fetchone()
                version, current = (row[0], row[1]) if row is not None else (0, None)
                new_version = version_after_save(
                    session_id, expected_version, version, data, current
                )
                if new_version == version:
                    return new_version
                if row is None:
                    conn.execute(
                        "INSERT INTO sessions (session_id, version, record, started_at, "
                        "updated_at) VALUES (?, 1, ?, ?, ?)",
                        (session_id, data, record.started_at, now),
                    )
                    return 1
                cursor = conn.execute(
                    "UPDATE sessions SET version = version + 1, record = ?, started_at = ?, "
                    "updated_at = ? WHERE session_id = ? AND version = ?",
                    (data, record.started_at, now, session_id, version),
                )
                if cursor.rowcount != 1:  # cannot happen inside BEGIN IMMEDIATE; kept as a guard
                    raise VersionConflict(session_id, version, -1)
                return new_version

            return self._transaction(conn, body)

        return await self._run(save)

    # ------------------------------------------------------------------ transcript

    async def append_transcript(
        self, session_id: str, line: TranscriptLine, *, fencing_token: int | None = None
    ) -> None:
        """Store ``line`` unless its ``seq`` is already stored."""
        data = line.model_dump_json()
        now = self._clock()

        def append(conn: sqlite3.Connection) -> None:
            def body() -> None:
                check_write(session_id, fencing_token, self._lease_row(conn, session_id), now)
                conn.execute(
                    "INSERT OR IGNORE INTO transcript (session_id, seq, line) VALUES (?, ?, ?)",
                    (session_id, line.seq, data),
                )

            self._transaction(conn, body)

        await self._run(append)

    async def read_transcript(self, session_id: str) -> list[TranscriptLine]:
        """The transcript sorted by ``seq``."""

        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT line FROM transcript WHERE session_id = ? ORDER BY seq", (session_id,)
            ).fetchall()
            return [row[0] for row in rows]

        return [TranscriptLine.model_validate_json(data) for data in await self._run(read)]

    # ------------------------------------------------------------------ leases

    async def acquire_lease(self, session_id: str, worker_id: str, ttl_s: float) -> Lease | None:
        """Lease the session to ``worker_id``; ``None`` while another worker holds it."""
        check_ttl(ttl_s)
        check_worker_id(worker_id)
        now = self._clock()

        def acquire(conn: sqlite3.Connection) -> Lease | None:
            def body() -> Lease | None:
                granted = grant(
                    session_id, worker_id, ttl_s, self._lease_row(conn, session_id), now
                )
                if granted is None:
                    return None
                self._put_lease(conn, session_id, granted[0])
                return granted[1]

            return self._transaction(conn, body)

        return await self._run(acquire)

    async def renew_lease(self, lease: Lease, ttl_s: float | None = None) -> Lease:
        """Extend ``lease``; :class:`~voicefsm.stores.LeaseLost` if it was lost."""
        ttl = lease.ttl_s if ttl_s is None else ttl_s
        check_ttl(ttl)
        now = self._clock()

        def renew(conn: sqlite3.Connection) -> Lease:
            def body() -> Lease:
                row, new = renewed(lease, ttl, self._lease_row(conn, lease.session_id), now)
                self._put_lease(conn, lease.session_id, row)
                return new

            return self._transaction(conn, body)

        return await self._run(renew)

    async def release_lease(self, lease: Lease) -> None:
        """Give the session up (no-op if ``lease`` is no longer the current one)."""
        now = self._clock()

        def release(conn: sqlite3.Connection) -> None:
            def body() -> None:
                row = released(lease, self._lease_row(conn, lease.session_id), now)
                if row is not None:
                    self._put_lease(conn, lease.session_id, row)

            self._transaction(conn, body)

        await self._run(release)

    # ------------------------------------------------------------------ listing, closing

    async def list_sessions(
        self,
        *,
        state: StateFilter = None,
        owner: str | None = None,
        worker: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[SessionSummary]:
        """The sessions with a record; see :meth:`voicefsm.stores.SessionStore.list_sessions`."""
        query = SessionQuery.of(state, owner, worker, limit, newest_first)
        where: list[str] = []
        params: list[object] = []
        if query.states is not None:
            marks = ", ".join("?" for _ in query.states)
            where.append(f"json_extract(s.record, '$.state') IN ({marks})")
            params.extend(sorted(str(s) for s in query.states))
        if query.owner is not None:
            where.append("json_extract(s.record, '$.owner') = ?")
            params.append(query.owner)
        if query.worker is not None:
            where.append("l.owner = ?")
            params.append(query.worker)
        order = "DESC" if query.newest_first else "ASC"
        sql = (
            "SELECT s.version, s.record, l.token, l.owner, l.expires_at FROM sessions s "
            "LEFT JOIN leases l ON l.session_id = s.session_id"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY s.started_at {order}, s.session_id {order}"
            + (" LIMIT ?" if query.limit is not None else "")
        )
        if query.limit is not None:
            params.append(query.limit)

        def select(conn: sqlite3.Connection) -> list[tuple[int, str, LeaseRow]]:
            rows = conn.execute(sql, params).fetchall()
            return [
                (
                    row[0],
                    row[1],
                    LeaseRow(row[2], row[3], row[4]) if row[2] is not None else LeaseRow(),
                )
                for row in rows
            ]

        found = await self._run(select)
        return query.apply(
            SessionSummary.of(SessionRecord.model_validate_json(data), version, lease)
            for version, data, lease in found
        )

    async def close(self) -> None:
        """Close the database; pending operations finish first."""
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, close)
        finally:
            executor.shutdown(wait=False)
