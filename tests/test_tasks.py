"""``cancel_and_wait``: the task's cancellation stays inside, the caller's does not."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from voicefsm.tasks import cancel_and_wait


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_the_tasks_own_cancellation_is_not_raised() -> None:
    task = asyncio.create_task(_forever())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()
    await cancel_and_wait(None)


async def test_an_error_the_task_ended_with_is_raised() -> None:
    async def fail() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fail())
    await asyncio.wait({task})
    with pytest.raises(ValueError, match="broken"):
        await cancel_and_wait(task)


async def test_the_callers_cancellation_while_waiting_is_raised() -> None:
    released = asyncio.Event()
    stopping = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopping.set()
            await released.wait()  # takes its time to clean up
            raise

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait(task))
    await stopping.wait()
    caller.cancel()
    released.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert caller.cancelled()
    assert task.cancelled()


async def test_a_caller_that_swallowed_an_earlier_cancellation_is_not_cancelled_again() -> None:
    """aiohttp's ``run_app`` runs ``on_shutdown`` in a task cancelled once before, on SIGTERM."""
    finished = asyncio.Event()

    async def shutdown_after_a_swallowed_cancel() -> None:
        # Swallowed without uncancel(): cancelling() stays 1, as in aiohttp's main task.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        task = asyncio.create_task(_forever())
        await asyncio.sleep(0)
        await cancel_and_wait(task)
        assert task.cancelled()
        finished.set()

    caller = asyncio.create_task(shutdown_after_a_swallowed_cancel())
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.wait({caller})
    assert finished.is_set(), caller
