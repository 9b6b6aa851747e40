"""Web framework adapters: each turns a framework's websocket into a
:class:`voicefsm.service.Transport` and hands it to :class:`voicefsm.service.InterviewService`."""
