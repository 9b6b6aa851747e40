"""The in-memory store: the library default, for tests and single-process embedding.

It keeps records as JSON, exactly as the durable stores do, so what round-trips here round-trips
there. Nothing survives the process.
"""

from __future__ import annotations

import time

from voicefsm.model import SessionRecord, TranscriptLine
from voicefsm.stores.base import (
    Clock,
    Lease,
    LeaseRow,
    SessionQuery,
    SessionSummary,
    StateFilter,
    StoreBase,
    StoredSession,
    check_expected_version,
    check_ttl,
    check_worker_id,
    check_write,
    grant,
    released,
    renewed,
    version_after_save,
)


class MemoryStore(StoreBase):
    """Sessions, transcripts and leases in dictionaries of this process.

    Every operation completes without awaiting anything, so operations never interleave.
    """

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._records: dict[str, tuple[int, str]] = {}
        self._leases: dict[str, LeaseRow] = {}
        self._transcripts: dict[str, dict[int, str]] = {}

    def __repr__(self) -> str:
        return "MemoryStore()"

    async def load(self, session_id: str) -> StoredSession | None:
        """The session's latest record and version, or ``None``."""
        stored = self._records.get(session_id)
        if stored is None:
            return None
        version, data = stored
        return StoredSession(SessionRecord.model_validate_json(data), version)

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
        check_write(session_id, fencing_token, self._lease_row(session_id), self._clock())
        version, current = self._records.get(session_id, (0, None))
        new_version = version_after_save(session_id, expected_version, version, data, current)
        if new_version != version:
            self._records[session_id] = (new_version, data)
        return new_version

    async def append_transcript(
        self, session_id: str, line: TranscriptLine, *, fencing_token: int | None = None
    ) -> None:
        """Store ``line`` unless its ``seq`` is already stored."""
        check_write(session_id, fencing_token, self._lease_row(session_id), self._clock())
        self._transcripts.setdefault(session_id, {}).setdefault(line.seq, line.model_dump_json())

    async def read_transcript(self, session_id: str) -> list[TranscriptLine]:
        """The transcript sorted by ``seq``."""
        lines = self._transcripts.get(session_id, {})
        return [TranscriptLine.model_validate_json(lines[seq]) for seq in sorted(lines)]

    async def acquire_lease(self, session_id: str, worker_id: str, ttl_s: float) -> Lease | None:
        """Lease the session to ``worker_id``; ``None`` while another worker holds it."""
        check_ttl(ttl_s)
        check_worker_id(worker_id)
        granted = grant(session_id, worker_id, ttl_s, self._lease_row(session_id), self._clock())
        if granted is None:
            return None
        self._leases[session_id], lease = granted
        return lease

    async def renew_lease(self, lease: Lease, ttl_s: float | None = None) -> Lease:
        """Extend ``lease``; :class:`~voicefsm.stores.LeaseLost` if it was lost."""
        ttl = lease.ttl_s if ttl_s is None else ttl_s
        check_ttl(ttl)
        row, new = renewed(lease, ttl, self._lease_row(lease.session_id), self._clock())
        self._leases[lease.session_id] = row
        return new

    async def release_lease(self, lease: Lease) -> None:
        """Give the session up (no-op if ``lease`` is no longer the current one)."""
        row = released(lease, self._lease_row(lease.session_id), self._clock())
        if row is not None:
            self._leases[lease.session_id] = row

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
        return query.apply(
            SessionSummary.of(
                SessionRecord.model_validate_json(data), version, self._leases.get(session_id)
            )
            for session_id, (version, data) in self._records.items()
        )

    def _lease_row(self, session_id: str) -> LeaseRow:
        return self._leases.get(session_id) or LeaseRow()
