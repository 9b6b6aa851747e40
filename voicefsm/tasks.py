"""Stopping the background tasks voicefsm's helpers run (the lag sampler, the orphan sweeper,
the lease keeper, the retrying sink's writer)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (nothing if ``None``) and wait until it has finished.

    The cancellation is not raised here; an exception the task ended with before it is.
    """
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
