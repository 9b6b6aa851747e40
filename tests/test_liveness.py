"""The audio ledger both upstreams keep (``voicefsm.liveness.AudioLedger``).

The upstreams' own tests (``test_host_adk.py``, ``test_host_genai.py``) drive it through silent
and closing peers; these pin its counting where a connection wrote more than it keeps.
"""

from __future__ import annotations

from voicefsm.liveness import UNCONFIRMED_MAX_CHUNKS, AudioLedger


def chunks(count: int) -> list[bytes]:
    return [i.to_bytes(4, "big") for i in range(count)]


def test_confirming_keeps_exactly_the_chunks_written_after_the_confirmed_ones() -> None:
    written = chunks(UNCONFIRMED_MAX_CHUNKS + 2)
    ledger = AudioLedger()
    for data in written:
        ledger.wrote(data)
    # The two oldest fell out of the kept chunks but still count.
    assert list(ledger.unconfirmed) == written[2:]
    assert ledger.unconfirmed_count == len(written)

    ledger.confirm(1)  # older than anything kept: nothing to drop
    assert list(ledger.unconfirmed) == written[2:]
    assert ledger.unconfirmed_count == len(written) - 1

    ledger.confirm(1000)
    assert list(ledger.unconfirmed) == written[1000:]
    assert ledger.unconfirmed_count == len(written) - 1000

    ledger.confirm(10)  # an older pong arriving late confirms nothing more
    assert list(ledger.unconfirmed) == written[1000:]
    assert ledger.confirmed == 1000


def test_a_failed_write_is_taken_off_and_hand_back_empties_the_ledger() -> None:
    first, second, third = chunks(3)
    ledger = AudioLedger()
    ledger.wrote(first)
    ledger.wrote(second)
    ledger.confirm(1)
    ledger.wrote(third)
    ledger.unwrote(third)
    assert list(ledger.unconfirmed) == [second]
    assert ledger.written == 2

    assert ledger.hand_back() == [second]
    assert list(ledger.unconfirmed) == []
    assert ledger.unconfirmed_count == 0
    assert ledger.settle(None) == 0  # no socket, so no close frame: the count as it is


def test_settle_counts_the_unconfirmed_chunks_of_a_connection_with_no_socket() -> None:
    ledger = AudioLedger()
    for data in chunks(5):
        ledger.wrote(data)
    ledger.confirm(2)
    assert ledger.settle(None) == 3
