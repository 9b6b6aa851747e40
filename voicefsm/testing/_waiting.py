"""Event-driven waiting for the fake Live server (no polling, no sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["ConditionWaiters"]


class ConditionWaiters:
    """Wakes coroutines waiting for a predicate whenever the owner's state changes.

    The owner calls :meth:`notify` after each change; waiters re-check their predicate. All of
    this runs on one event loop, so no lock is needed.
    """

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        """Create an empty set of waiters."""
        self._futures: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        """Wake every waiter so it re-checks its predicate."""
        futures, self._futures = self._futures, set()
        for future in futures:
            if not future.done():
                future.set_result(None)

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        give_up: Callable[[], Exception | None] | None = None,
    ) -> None:
        """Return once ``predicate()`` is true.

        Args:
            predicate: checked now and after every :meth:`notify`.
            give_up: checked after ``predicate``; a non-None result is raised (used when the
                awaited thing can no longer happen, e.g. the connection closed).
        """
        loop = asyncio.get_running_loop()
        while not predicate():
            if give_up is not None:
                error = give_up()
                if error is not None:
                    raise error
            future: asyncio.Future[None] = loop.create_future()
            self._futures.add(future)
            try:
                await future
            finally:
                self._futures.discard(future)
