"""What both upstreams use to know whether the model's server read the audio they wrote.

A chunk written to the websocket is not yet known to have arrived: a peer that stops reading
leaves it in a buffer somewhere. :class:`AudioLedger` keeps the chunks written since the peer
last proved it had read everything (a pong to a later ping, or its close frame);
:func:`check_liveness` pings the peer and turns a missing pong into a resumable close; and
:func:`wait_or_abort` bounds how long a connection's task may take to stop. The ADK upstream
(:mod:`voicefsm.adk`) and the direct genai one (:mod:`voicefsm.genai_live`) share them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from websockets.exceptions import ConnectionClosed

from voicefsm.host import SessionLog
from voicefsm.model import SessionConfig

UNCONFIRMED_MAX_CHUNKS = 1500
"""Most written-but-unconfirmed chunks a connection keeps for re-sending (30 s of 20 ms chunks);
older ones are only counted."""


class AudioLedger:
    """One connection's audio chunks written to its websocket, and how many the peer has read.

    ``unconfirmed`` holds the chunks written since the peer last proved it had read everything
    (at most :data:`UNCONFIRMED_MAX_CHUNKS`; older ones are only counted in
    :attr:`unconfirmed_count`).
    """

    __slots__ = ("confirmed", "dead", "unconfirmed", "written")

    def __init__(self) -> None:
        self.unconfirmed: deque[bytes] = deque(maxlen=UNCONFIRMED_MAX_CHUNKS)
        self.written = 0
        """Audio chunks written to the websocket so far."""
        self.confirmed = 0
        """Of those, how many the peer is known to have read."""
        self.dead = False
        """The liveness check failed: what was written since the last pong may be lost."""

    def wrote(self, data: bytes) -> None:
        """``data`` is being written to the websocket now."""
        self.unconfirmed.append(data)
        self.written += 1

    def unwrote(self, data: bytes) -> None:
        """Writing ``data`` (the last chunk written) failed before it reached the socket."""
        if self.unconfirmed and self.unconfirmed[-1] is data:
            self.unconfirmed.pop()
        self.written -= 1

    def confirm(self, upto: int) -> None:
        """The peer has read the first ``upto`` chunks written."""
        if upto <= self.confirmed:
            return
        self.confirmed = upto
        excess = len(self.unconfirmed) - (self.written - upto)
        for _ in range(max(0, excess)):
            self.unconfirmed.popleft()

    def hand_back(self) -> list[bytes]:
        """The unconfirmed chunks kept, oldest first, for the next connection to send again.

        They stop counting as this connection's: everything written counts as confirmed.
        """
        chunks = list(self.unconfirmed)
        self.confirm(self.written)
        return chunks

    def settle(self, websocket: Any) -> int:
        """The connection has stopped: how many chunks the peer never confirmed reading.

        A close frame the peer answered or sent confirms everything written before it.
        """
        if websocket is not None and getattr(websocket.protocol, "close_rcvd", None) is not None:
            self.confirm(self.written)
        return self.unconfirmed_count

    @property
    def unconfirmed_count(self) -> int:
        """Chunks written and not confirmed (also those too old to be kept for re-sending)."""
        return self.written - self.confirmed


async def check_liveness(
    websocket: Any,
    config: SessionConfig,
    ledger: AudioLedger,
    closing: Callable[[], bool],
    report_closed: Callable[[int | None, str], None],
) -> None:
    """Ping every ``upstream_ping_interval_s`` until ``closing()``; a pong confirms the audio.

    No pong within ``upstream_pong_timeout_s`` marks the ledger dead and reports a resumable
    1006 close. A pong confirms every chunk written before its ping: websockets answers a ping
    only after reading everything that came before it. A closed connection ends the check
    quietly: its receive side reports the close.
    """
    interval = config.upstream_ping_interval_s
    deadline = config.upstream_pong_timeout_s
    while not closing():
        await asyncio.sleep(interval)
        written = ledger.written
        try:
            async with asyncio.timeout(deadline):
                # Sending the ping can block too: a peer that stops reading fills the buffers.
                pong = await websocket.ping()
                await pong
        except TimeoutError:
            ledger.dead = True
            report_closed(1006, f"no pong within {deadline:g} s: the connection went silent")
            return
        except ConnectionClosed:
            return
        ledger.confirm(written)


async def wait_or_abort(
    task: asyncio.Task[None],
    timeout_s: float,
    abort: Callable[[], None],
    log: SessionLog,
    connection_id: int,
) -> None:
    """Wait up to ``timeout_s`` for a connection's (cancelled) task; then abort its socket.

    After an abort the task gets one more second; one still running then is logged as an error.
    """
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        return
    log.warning(
        "upstream #%d did not close in %.1f s; aborting its socket", connection_id, timeout_s
    )
    abort()
    done, _ = await asyncio.wait({task}, timeout=1.0)
    if not done:
        log.error("upstream #%d still running after an abort", connection_id)
