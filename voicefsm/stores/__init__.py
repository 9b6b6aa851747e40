"""Durable session stores: memory, SQLite and Redis, with leases and fencing.

* :class:`MemoryStore` — the library default; nothing survives the process.
* :class:`SQLiteStore` — one machine; WAL mode, one transaction per operation; a restart loses
  nothing.
* :class:`RedisStore` — several workers behind a load balancer (needs the ``redis`` package,
  imported only when this class is first used).

All three implement :class:`SessionStore` and pass one conformance suite. A worker that drives a
session takes a lease (:meth:`SessionStore.acquire_lease`), keeps it with a
:class:`LeaseKeeper`, and writes through ``store.fenced(lease)`` — wrapped in a
:class:`RetryingSink` so a store outage does not stop the interview::

    store = open_store("sqlite:///var/lib/voicefsm/sessions.db")
    lease = await store.acquire_lease(session_id, worker_id, ttl_s=15)
    sink = RetryingSink(store.fenced(lease))
    async with LeaseKeeper(store, lease):
        record = await SessionHost(session, upstream, client=channel, sink=sink).run()
        await sink.flush()
    await store.release_lease(lease)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from voicefsm.stores.base import (
    BacklogFull,
    FencedSink,
    Lease,
    LeaseKeeper,
    LeaseLost,
    SessionQuery,
    SessionStore,
    SessionSummary,
    StaleFencingToken,
    StoreBase,
    StoreClosed,
    StoredSession,
    StoreError,
    StoreUnavailable,
    VersionConflict,
)
from voicefsm.stores.memory import MemoryStore
from voicefsm.stores.retrying import RetryingSink
from voicefsm.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from voicefsm.stores.redis import RedisStore

__all__ = [
    "BacklogFull",
    "FencedSink",
    "Lease",
    "LeaseKeeper",
    "LeaseLost",
    "MemoryStore",
    "RedisStore",
    "RetryingSink",
    "SQLiteStore",
    "SessionQuery",
    "SessionStore",
    "SessionSummary",
    "StaleFencingToken",
    "StoreBase",
    "StoreClosed",
    "StoreError",
    "StoreUnavailable",
    "StoredSession",
    "VersionConflict",
    "check_store_url",
    "open_store",
]


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from voicefsm.stores.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_store_url(url: str | os.PathLike[str]) -> None:
    """Raise :class:`ValueError`, saying what to do, if :func:`open_store` cannot open ``url``.

    It only reads the URL (no file is created, no server is reached); a ``redis://`` URL also
    needs the ``redis`` package.
    """
    kind, _ = _store_kind(os.fspath(url))
    if kind == "redis":
        import importlib.util

        if importlib.util.find_spec("redis") is None:
            raise ValueError(
                f"the store {os.fspath(url)!r} needs the redis package (redis-py), which is not "
                "installed: pip install 'voicefsm[redis]'"
            )


def _store_kind(text: str) -> tuple[str, str]:
    """``("memory" | "sqlite" | "redis", what to open)`` for a store URL."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        if text in ("memory", "memory:"):
            return "memory", ""
        return "sqlite", text
    scheme = scheme.lower()
    if scheme == "memory":
        return "memory", ""
    if scheme == "sqlite":
        if not rest:
            raise ValueError(f"{text!r} names no database file: use sqlite:///absolute/path.db")
        return "sqlite", rest
    if scheme in ("redis", "rediss", "unix"):
        return "redis", text
    raise ValueError(
        f"unknown store URL {text!r}: use memory://, sqlite:///path/to/sessions.db or "
        "redis://host:port/db"
    )


def open_store(url: str | os.PathLike[str], **options: Any) -> SessionStore:
    """A store for ``url``; ``options`` go to the store's constructor (``clock``, ``prefix``...).

    * ``memory://`` — :class:`MemoryStore`;
    * ``sqlite:///var/lib/voicefsm/sessions.db`` (absolute path), ``sqlite://sessions.db``
      (relative), or a plain file path — :class:`SQLiteStore`;
    * ``redis://host:6379/0``, ``rediss://...`` (TLS), ``unix:///run/redis.sock`` —
      :class:`RedisStore`.
    """
    kind, target = _store_kind(os.fspath(url))
    if kind == "memory":
        return MemoryStore(**options)
    if kind == "sqlite":
        return SQLiteStore(target, **options)
    from voicefsm.stores.redis import RedisStore

    return RedisStore(target, **options)
