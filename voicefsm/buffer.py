"""The resume buffer: client input held while the upstream is not ready.

A session creates one when it first has to hold something during an outage and drops it once
the upstream is ready and the buffer is released, so a session that is not resuming pays nothing
for it. Order is kept across audio and text; audio is bounded in bytes, text is not (a few typed
turns and the wrap-up prompt at most).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from voicefsm.model import PendingItem


class ResumeBuffer:
    """Audio chunks (``bytes``) and text turns (``str``) in arrival order, audio bounded."""

    __slots__ = ("_items", "audio_bytes", "max_audio_bytes")

    def __init__(self, max_audio_bytes: int) -> None:
        self.max_audio_bytes = max_audio_bytes
        """The most audio, in bytes, held at once."""
        self.audio_bytes = 0
        """Audio held now, in bytes."""
        self._items: list[bytes | str] = []

    def hold_audio(self, chunk: bytes) -> bool:
        """Keep ``chunk`` if it fits under the bound; ``False`` (not kept) if it does not."""
        size = len(chunk)
        if self.audio_bytes + size > self.max_audio_bytes:
            return False
        self._items.append(chunk)
        self.audio_bytes += size
        return True

    def hold_text(self, text: str) -> None:
        """Keep a text turn (always: text is not bounded)."""
        self._items.append(text)

    def release(self) -> list[bytes | str]:
        """Everything held, in order; the buffer is empty afterwards."""
        items = self._items
        self._items = []
        self.audio_bytes = 0
        return items

    @property
    def audio_chunks(self) -> int:
        """How many audio chunks are held."""
        return sum(1 for item in self._items if isinstance(item, bytes))

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[bytes | str]:
        return iter(self._items)

    def to_pending(self) -> list[PendingItem]:
        """What the record stores (:attr:`voicefsm.SessionRecord.pending`)."""
        return [
            PendingItem(audio=item) if isinstance(item, bytes) else PendingItem(text=item)
            for item in self._items
        ]

    @classmethod
    def from_pending(cls, items: Iterable[PendingItem], max_audio_bytes: int) -> ResumeBuffer:
        """Rebuild a buffer from a record, keeping everything it held (even past a new bound)."""
        buffer = cls(max_audio_bytes)
        for item in items:
            if item.audio is not None:
                buffer._items.append(item.audio)
                buffer.audio_bytes += len(item.audio)
            elif item.text is not None:
                buffer._items.append(item.text)
        return buffer
