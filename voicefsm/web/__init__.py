"""The web boundary.

Framework adapters (:mod:`~voicefsm.web.starlette`, :mod:`~voicefsm.web.aiohttp`) each turn a
framework's websocket into a :class:`voicefsm.service.Transport` and hand it to
:class:`voicefsm.service.InterviewService`. Beside them: :mod:`~voicefsm.web.decoder` (client
frames in, events or coded violations out), :mod:`~voicefsm.web.logs` (tokens out of logs),
:mod:`~voicefsm.web.headers` (the page's security headers) and
:mod:`~voicefsm.web.uvicorn_server` (a request-head deadline for uvicorn).
"""
