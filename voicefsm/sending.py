"""Writing to a websocket in the caller's turn, shared by the host and both upstreams.

Most sends to a socket with room in its buffer finish without suspending. The host and the
upstreams step such a send by hand, so the common case costs no task and no timeout context,
and only a send that does suspend is finished by awaiting :class:`Resume`.
"""

from __future__ import annotations

import base64
from collections.abc import Coroutine, Generator
from typing import Any, Final

from websockets.protocol import State

INPUT_AUDIO_MIME: Final = "audio/pcm;rate=16000"
"""The MIME type of candidate audio on the Live API: 16 kHz, 16-bit mono PCM."""


def realtime_audio_frame(data: bytes) -> str:
    """The Live API's ``realtimeInput`` message for one chunk of candidate audio.

    The same frame genai's ``send_realtime_input(audio=...)`` sends, built without its
    pydantic conversions.
    """
    encoded = base64.b64encode(data).decode("ascii")
    return f'{{"realtimeInput":{{"audio":{{"mimeType":"{INPUT_AUDIO_MIME}","data":"{encoded}"}}}}}}'


def takes_a_frame_now(ws: Any) -> bool:
    """Whether websockets would write a frame to ``ws`` without suspending.

    True for an open connection whose transport is not closing and not flow-controlled: then
    ``send()`` writes and returns with no await that suspends, and no timeout context (those
    belong to the closing path) is entered.
    """
    try:
        return bool(
            ws.protocol.state is State.OPEN and not ws.transport.is_closing() and not ws.paused
        )
    except AttributeError:  # not the websockets connection this was written for
        return False


def between_messages(ws: Any) -> bool:
    """Whether ``ws`` is not in the middle of sending a fragmented message.

    websockets 15 marks one with ``fragmented_send_waiter``, 16 and later with
    ``send_in_progress``; a connection with neither is treated as busy, so the caller takes
    ``send()``, which waits for the message to finish.
    """
    for name in ("send_in_progress", "fragmented_send_waiter"):
        if hasattr(ws, name):
            return getattr(ws, name) is None
    return False


class Resume:
    """Awaiting it finishes ``coroutine``, stepped by hand until it yielded ``suspended_on``.

    It does what ``await coroutine`` would have done from that point: the awaiting task waits
    on what the coroutine yields, and what the task sends or throws (a result, a cancellation)
    goes back into it.
    """

    __slots__ = ("_coroutine", "_suspended_on")

    def __init__(self, coroutine: Coroutine[Any, Any, None], suspended_on: Any) -> None:
        self._coroutine = coroutine
        self._suspended_on = suspended_on

    def __await__(self) -> Generator[Any, Any, None]:
        coroutine, yielded = self._coroutine, self._suspended_on
        while True:
            try:
                sent = yield yielded
            except BaseException as error:
                try:
                    yielded = coroutine.throw(error)
                except StopIteration:
                    return
            else:
                try:
                    yielded = coroutine.send(sent)
                except StopIteration:
                    return


__all__ = [
    "INPUT_AUDIO_MIME",
    "Resume",
    "between_messages",
    "realtime_audio_frame",
    "takes_a_frame_now",
]
