"""The Redis store: several workers behind a load balancer share sessions through one Redis.

Uses redis-py's asyncio client. Every write is one Lua script, so the fencing check, the
compare-and-set and the write happen atomically on the server. Keys, for ``prefix="voicefsm:"``:

* ``voicefsm:session:<id>`` — a hash: ``record`` (JSON), ``version``, and the lease: ``fence``
  (the latest fencing token granted), ``owner`` (empty once released), ``expires_at``;
* ``voicefsm:transcript:<id>`` — a sorted set of transcript lines (JSON), scored by ``seq``;
* ``voicefsm:sessions`` — a sorted set of session ids, scored by ``started_at``;
* ``voicefsm:open`` — the same, for the sessions whose record is not ``ended`` (what the orphan
  sweep and ``list_sessions(state=<running states>)`` read).

The scripts touch keys of one session plus the index, so the store needs a single Redis primary
(standalone or behind Sentinel), not Redis Cluster. Nothing expires by itself: lease expiry is a
time stored in the hash and compared with the store's clock, so a test can inject time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

try:
    import redis.asyncio as aioredis
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "RedisStore needs the redis package (redis-py): pip install 'voicefsm[redis]'"
    ) from error
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from voicefsm.model import SessionRecord, State, TranscriptLine
from voicefsm.stores.base import (
    Clock,
    Lease,
    LeaseLost,
    LeaseRow,
    SessionQuery,
    SessionSummary,
    StaleFencingToken,
    StateFilter,
    StoreBase,
    StoreClosed,
    StoredSession,
    StoreUnavailable,
    VersionConflict,
    check_expected_version,
    check_ttl,
    check_worker_id,
)

# A write's fencing check; returns nil when the write may land, else an error reply.
# ARGV of the caller: token ('' = unfenced) at _TOKEN, now at _NOW.
_FENCE = """
local function fence_check(key, token, now)
  local f = redis.call('HMGET', key, 'fence', 'owner', 'expires_at')
  local fence = tonumber(f[1]) or 0
  local owner = f[2] or ''
  local expires = tonumber(f[3]) or 0
  if token == '' then
    if owner ~= '' and expires > now then
      return {'fenced', tostring(fence), owner}
    end
  elseif tonumber(token) ~= fence then
    return {'stale', tostring(fence), owner}
  end
  return nil
end
"""

# KEYS: session hash, index, open index. ARGV: record json, expected version ('' = any), token,
# now, session id, started_at, '1' if the record is ended.
_SAVE = (
    _FENCE
    + """
local err = fence_check(KEYS[1], ARGV[3], tonumber(ARGV[4]))
if err then return err end
local cur = redis.call('HMGET', KEYS[1], 'version', 'record')
local version = tonumber(cur[1]) or 0
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= version then
  return {'conflict', tostring(version)}
end
if cur[2] == ARGV[1] then
  return {'ok', tostring(version)}
end
version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'record', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
if ARGV[7] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[5])
else
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
end
return {'ok', tostring(version)}
"""
)

# KEYS: session hash, transcript. ARGV: token, now, seq, line json.
_APPEND = (
    _FENCE
    + """
local err = fence_check(KEYS[1], ARGV[1], tonumber(ARGV[2]))
if err then return err end
if redis.call('ZCOUNT', KEYS[2], ARGV[3], ARGV[3]) == 0 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
end
return {'ok'}
"""
)

# KEYS: session hash. ARGV: worker, now, expires_at.
_ACQUIRE = """
local f = redis.call('HMGET', KEYS[1], 'owner', 'expires_at')
local owner = f[1] or ''
local expires = tonumber(f[2]) or 0
if owner ~= '' and owner ~= ARGV[1] and expires > tonumber(ARGV[2]) then
  return {'held', owner}
end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'expires_at', ARGV[3])
return {'ok', tostring(fence)}
"""

# KEYS: session hash. ARGV: token, worker, expires_at.
_RENEW = """
local f = redis.call('HMGET', KEYS[1], 'fence', 'owner')
local fence = tonumber(f[1]) or 0
local owner = f[2] or ''
if fence ~= tonumber(ARGV[1]) then return {'taken', tostring(fence), owner} end
if owner ~= ARGV[2] then return {'released'} end
redis.call('HSET', KEYS[1], 'expires_at', ARGV[3])
return {'ok'}
"""

# KEYS: session hash. ARGV: token, worker, now (kept as expires_at: when it was last driven).
_RELEASE = """
local f = redis.call('HMGET', KEYS[1], 'fence', 'owner')
if (tonumber(f[1]) or 0) == tonumber(ARGV[1]) and (f[2] or '') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'owner', '', 'expires_at', ARGV[3])
end
return {'ok'}
"""

_LIST_BATCH = 500
"""Sessions read per pipeline round trip when listing."""

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)


def _without_credentials(url: str) -> str:
    """``url`` with any user and password cut out (it ends up in logs)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore(StoreBase):
    """Sessions, transcripts and leases in Redis.

    ``client`` is a ``redis.asyncio.Redis`` (the store then leaves closing it to you) or a URL
    such as ``redis://127.0.0.1:6379/0`` (the store makes the client, with short timeouts and one
    quick retry, and closes it in :meth:`close`). ``prefix`` namespaces the keys, so several
    deployments (or tests) can share one Redis.
    """

    def __init__(
        self,
        client: str | aioredis.Redis,
        *,
        prefix: str = "voicefsm:",
        clock: Clock = time.time,
        socket_timeout_s: float = 5.0,
    ) -> None:
        if isinstance(client, str):
            self._url: str | None = client
            self.client = aioredis.Redis.from_url(
                client,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1),
            )
            self._owns_client = True
        else:
            self._url = None
            self.client = client
            self._owns_client = False
        self.prefix = prefix
        self._clock = clock
        self._closed = False
        self._save = self.client.register_script(_SAVE)
        self._append = self.client.register_script(_APPEND)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    def __repr__(self) -> str:
        if self._url is not None:
            where = _without_credentials(self._url)
        else:
            kwargs = self.client.connection_pool.connection_kwargs
            where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        return f"RedisStore({where!r}, prefix={self.prefix!r})"

    # ------------------------------------------------------------------ plumbing

    def _session_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _transcript_key(self, session_id: str) -> str:
        return f"{self.prefix}transcript:{session_id}"

    @property
    def _index_key(self) -> str:
        return f"{self.prefix}sessions"

    @property
    def _open_key(self) -> str:
        return f"{self.prefix}open"

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        if self._closed:
            raise StoreClosed(f"{self!r} was closed; open a new RedisStore")
        try:
            yield
        except _UNAVAILABLE as error:
            raise StoreUnavailable(
                f"Redis is unreachable ({type(error).__name__}: {error}); check that it is "
                "running and reachable from this worker. The write can be retried."
            ) from error

    def _refused(self, reply: Sequence[Any], session_id: str, token: int | None) -> None:
        kind = _text(reply[0])
        if kind in ("fenced", "stale"):
            owner = _text(reply[2]) or None
            raise StaleFencingToken(session_id, token, int(_text(reply[1])), owner)

    # ------------------------------------------------------------------ records

    async def load(self, session_id: str) -> StoredSession | None:
        """The session's latest record and version, or ``None``."""
        async with self._call():
            data, version = await self.client.hmget(
                self._session_key(session_id), ["record", "version"]
            )
        if data is None:
            return None
        return StoredSession(SessionRecord.model_validate_json(data), int(_text(version)))

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
        async with self._call():
            reply = await self._save(
                keys=[self._session_key(session_id), self._index_key, self._open_key],
                args=[
                    record.model_dump_json(),
                    "" if expected_version is None else str(expected_version),
                    "" if fencing_token is None else str(fencing_token),
                    repr(self._clock()),
                    session_id,
                    repr(record.started_at),
                    "1" if record.state is State.ENDED else "0",
                ],
            )
        self._refused(reply, session_id, fencing_token)
        if _text(reply[0]) == "conflict":
            assert expected_version is not None
            raise VersionConflict(session_id, expected_version, int(_text(reply[1])))
        return int(_text(reply[1]))

    # ------------------------------------------------------------------ transcript

    async def append_transcript(
        self, session_id: str, line: TranscriptLine, *, fencing_token: int | None = None
    ) -> None:
        """Store ``line`` unless its ``seq`` is already stored."""
        async with self._call():
            reply = await self._append(
                keys=[self._session_key(session_id), self._transcript_key(session_id)],
                args=[
                    "" if fencing_token is None else str(fencing_token),
                    repr(self._clock()),
                    str(line.seq),
                    line.model_dump_json(),
                ],
            )
        self._refused(reply, session_id, fencing_token)

    async def read_transcript(self, session_id: str) -> list[TranscriptLine]:
        """The transcript sorted by ``seq``."""
        async with self._call():
            members = await self.client.zrange(self._transcript_key(session_id), 0, -1)
        return [TranscriptLine.model_validate_json(_text(member)) for member in members]

    # ------------------------------------------------------------------ leases

    async def acquire_lease(self, session_id: str, worker_id: str, ttl_s: float) -> Lease | None:
        """Lease the session to ``worker_id``; ``None`` while another worker holds it."""
        check_ttl(ttl_s)
        check_worker_id(worker_id)
        now = self._clock()
        expires_at = now + ttl_s
        async with self._call():
            reply = await self._acquire(
                keys=[self._session_key(session_id)],
                args=[worker_id, repr(now), repr(expires_at)],
            )
        if _text(reply[0]) != "ok":
            return None
        return Lease(session_id, worker_id, int(_text(reply[1])), expires_at, ttl_s)

    async def renew_lease(self, lease: Lease, ttl_s: float | None = None) -> Lease:
        """Extend ``lease``; :class:`~voicefsm.stores.LeaseLost` if it was lost."""
        ttl = lease.ttl_s if ttl_s is None else ttl_s
        check_ttl(ttl)
        expires_at = self._clock() + ttl
        async with self._call():
            reply = await self._renew(
                keys=[self._session_key(lease.session_id)],
                args=[str(lease.token), lease.worker_id, repr(expires_at)],
            )
        kind = _text(reply[0])
        if kind == "taken":
            owner = _text(reply[2])
            by = f" by worker {owner!r}" if owner else ""
            raise LeaseLost(lease, f"lease {_text(reply[1])} was granted since{by}")
        if kind == "released":
            raise LeaseLost(lease, "it was released")
        return Lease(lease.session_id, lease.worker_id, lease.token, expires_at, ttl)

    async def release_lease(self, lease: Lease) -> None:
        """Give the session up (no-op if ``lease`` is no longer the current one)."""
        async with self._call():
            await self._release(
                keys=[self._session_key(lease.session_id)],
                args=[str(lease.token), lease.worker_id, repr(self._clock())],
            )

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
        """The sessions with a record; see :meth:`voicefsm.stores.SessionStore.list_sessions`.

        Only running sessions asked for (``state`` without ``ended``): read from the index of
        running sessions, so the cost follows how many run, not how many were ever kept.
        """
        query = SessionQuery.of(state, owner, worker, limit, newest_first)
        index = self._open_key if query.open_only else self._index_key
        found: list[SessionSummary] = []
        async with self._call():
            ids = [_text(i) for i in await self.client.zrange(index, 0, -1, desc=newest_first)]
            for start in range(0, len(ids), _LIST_BATCH):
                batch = ids[start : start + _LIST_BATCH]
                async with self.client.pipeline(transaction=False) as pipe:
                    for session_id in batch:
                        pipe.hmget(
                            self._session_key(session_id),
                            ["record", "version", "fence", "owner", "expires_at"],
                        )
                    rows = await pipe.execute()
                for data, version, fence, holder, expires in rows:
                    if data is None:
                        continue
                    lease = LeaseRow(
                        int(_text(fence)) if fence is not None else 0,
                        (_text(holder) or None) if holder is not None else None,
                        float(_text(expires)) if expires is not None else 0.0,
                    )
                    summary = SessionSummary.of(
                        SessionRecord.model_validate_json(data), int(_text(version)), lease
                    )
                    if query.matches(summary):
                        found.append(summary)
                if query.limit is not None and len(found) >= query.limit:
                    break
        return query.apply(found)

    async def close(self) -> None:
        """Close the client if the store made it."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self.client.aclose()
