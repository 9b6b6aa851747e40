"""Stopping the background tasks voicefsm's helpers run (the lag sampler, the orphan sweeper,
the lease keeper, the retrying sink's writer)."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (nothing if ``None``) and wait until it has finished.

    The task's own cancellation is not raised here; an exception it ended with before it is. A
    cancellation of the caller while it waits is raised, as it should be: the caller stops too.
    """
    if task is None:
        return
    caller = asyncio.current_task()
    # Compared, not tested for zero: a server may run its shutdown in a task that caught an
    # earlier cancellation without uncancel() (aiohttp's run_app on SIGTERM does).
    cancelling_before = caller.cancelling() if caller is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if caller is not None and caller.cancelling() > cancelling_before:
            raise
