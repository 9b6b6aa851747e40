"""The interview state machine, declared once as data.

This file *is* the machine: the states, the transitions between them (with the engine callbacks
they run, by name), the end reasons, and how upstream close codes are treated. The engine
(:mod:`voicefsm.engine`) drives it; ``voicefsm diagram`` draws it from the same declaration.

Only state changes go through ``transitions``. Per-chunk work (audio both ways) never triggers the
machine: the engine forwards audio directly when the state allows it, because a trigger costs
microseconds and an interview moves about a hundred chunks a second.
"""

from __future__ import annotations

import logging
from typing import Any, Final, Literal

from transitions import Machine

from voicefsm.model import EndReason, State

STATES: Final = [
    State.CONNECTING,
    State.LIVE,
    State.WARNING,
    State.RESUMING,
    State.ENDED,
]
"""Every state, in the order of a normal interview."""

INITIAL: Final = State.CONNECTING

RUNNING: Final = frozenset({State.CONNECTING, State.LIVE, State.WARNING, State.RESUMING})
"""States in which the session is not over."""

UPSTREAM_UP: Final = frozenset({State.LIVE, State.WARNING})
"""States in which candidate audio goes straight upstream; otherwise it is buffered."""

TRANSITIONS: Final[list[dict[str, Any]]] = [
    # The upstream answered setup. Back to `warning` if the warning was already given.
    {
        "trigger": "ready",
        "source": [State.CONNECTING, State.RESUMING],
        "dest": State.LIVE,
        "unless": "warning_given",
    },
    {
        "trigger": "ready",
        "source": [State.CONNECTING, State.RESUMING],
        "dest": State.WARNING,
        "conditions": "warning_given",
    },
    # `deadline - warning_before` was reached while audio flows.
    {"trigger": "warn", "source": State.LIVE, "dest": State.WARNING},
    # GoAway rotation, a resumable close, a failed or timed-out first connect.
    {
        "trigger": "lose_upstream",
        "source": [State.CONNECTING, State.LIVE, State.WARNING],
        "dest": State.RESUMING,
    },
    # The single way out; `_on_enter_ended` emits the end effects exactly once.
    {"trigger": "end", "source": sorted(RUNNING), "dest": State.ENDED},
]
"""The transitions as ``transitions`` declarations; conditions and callbacks name engine members."""

END_REASONS: Final = list(EndReason)
"""The five end reasons."""

RESUMABLE_CLOSE_CODES: Final = frozenset({1000, 1001, 1006, 1011, 1012, 1013, 1014})
"""Websocket close codes after which the session resumes (normal close, going away, abnormal
closure, internal error, service restart, try again later, bad gateway)."""

FATAL_CLOSE_CODES: Final = {
    1007: "the model's context window is exhausted (close 1007)",
    1008: "the upstream closed for a policy violation (close 1008)",
}
"""Close codes that end the session with ``error`` at once: retrying cannot help."""


def close_is_resumable(code: int | None) -> bool:
    """Whether an upstream close with ``code`` (``None``: no close frame) is worth resuming."""
    return code is None or code in RESUMABLE_CLOSE_CODES


def build_machine() -> Machine:
    """The shared machine every session is driven by.

    It holds no models: the engine calls ``MACHINE.events[trigger].trigger(session, ...)``, and
    ``transitions`` reads and writes ``session.state`` and resolves callbacks on the session by
    name. One machine serves any number of sessions at no per-session cost and nothing to
    unregister when a session ends.
    """
    return Machine(
        model=None,
        states=STATES,
        transitions=TRANSITIONS,
        initial=INITIAL,
        auto_transitions=False,
        send_event=True,
        after_state_change="_after_state_change",
    )


MACHINE: Final = build_machine()

# `transitions` logs every callback and state entry at INFO; for a machine driven thousands of
# times a session that is noise in the host application's logs. Warnings still show.
logging.getLogger("transitions.core").setLevel(logging.WARNING)

DiagramFormat = Literal["mermaid", "dot"]


def diagram(fmt: DiagramFormat = "mermaid") -> str:
    """The state diagram, drawn by ``transitions`` from :data:`TRANSITIONS`, as text."""
    from transitions.extensions.diagrams import GraphMachine

    engine: Literal["mermaid", "graphviz"] = "mermaid" if fmt == "mermaid" else "graphviz"

    class _Model:
        warning_given = False

    graph_machine = GraphMachine(
        model=_Model(),
        states=STATES,
        transitions=TRANSITIONS,
        initial=INITIAL,
        auto_transitions=False,
        show_conditions=True,
        graph_engine=engine,
        title="voicefsm interview session",
    )
    graph = graph_machine.get_graph()
    text: str = graph.draw(None) if fmt == "mermaid" else graph.source
    return text.rstrip() + "\n"
