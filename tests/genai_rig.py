"""A session host on the direct google-genai upstream against the loopback fake Live server.

Imports no ADK: the genai-upstream tests also run in an environment without it (and with
google-genai 3.x), see ``.ci/run``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loopback import MODEL, HostRig

from voicefsm import SessionConfig
from voicefsm.genai_live import GenaiTool, GenaiUpstream
from voicefsm.testing import FakeLiveServer


class GenaiRig(HostRig):
    """One session host on :class:`GenaiUpstream` against a fake server, in-memory client."""

    wire = "direct"
    """The upstream's wire path for rigs built from now on (tests run both)."""

    def __init__(
        self,
        server: FakeLiveServer,
        config: SessionConfig | None = None,
        tools: Sequence[GenaiTool | Any] = (),
        **upstream_options: Any,
    ) -> None:
        upstream = GenaiUpstream(
            MODEL,
            client=server.genai_client(),
            instruction="Interview.",
            tools=tools,
            **{"wire": self.wire, **upstream_options},
        )
        super().__init__(server, upstream, config)
        self.upstream: GenaiUpstream = upstream
