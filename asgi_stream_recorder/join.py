"""Joining a recorded stream: replay after the client's last event, then live, then its end.

:func:`join_response` is the join as an ASGI response for your own routes; the streams app
and ``@recorded_stream(resume=True)`` use it. Event ids are ``<stream_id>:<seq>`` (the
resumable form), and a join accepts that form or a plain seq, from the ``Last-Event-ID``
header, an ``after`` argument or an ``?after=`` query parameter. The answer:

* ``200`` and the stream: what is stored after that id (from the start: after the format's
  opening bytes, such as the AI SDK's ``start`` part), then live until the stream ends,
  then the same last event its producer's client got (``done``, ``error``, ``shutdown``),
  in the format the stream was produced in (unless told otherwise);
* ``204`` when the stream is over and the client already has every chunk (what stops a
  browser's ``EventSource`` for good), or, joining by key, when the key has no active stream;
* ``404`` for a stream nobody knows; ``400`` for a malformed or foreign id.
"""

from __future__ import annotations

from starlette.responses import PlainTextResponse, Response
from starlette.types import Message, Receive, Scope, Send

from .driver import SCOPE_KEY, StreamDriver
from .formats import SSE_HEADERS, WireFormat, resolve_format
from .pull import Prepared
from .recorders import Recorder
from .recorders.base import StreamStatus
from .session import StreamSession

__all__ = ["JoinResponse", "join_response", "parse_event_id"]

_MAX_SEQ_DIGITS = 18


def parse_event_id(value: str, stream_id: str | None = None) -> tuple[str | None, int]:
    """``(stream_id or None, seq)`` from ``"<stream_id>:<seq>"`` or ``"<seq>"``.

    Raises ValueError for anything else, or for an id of another stream than ``stream_id``.
    """
    sid, colon, seq_text = value.strip().rpartition(":")
    if not (seq_text.isascii() and seq_text.isdigit()) or len(seq_text) > _MAX_SEQ_DIGITS:
        raise ValueError(f"not an event id of a recorded stream: {value[:80]!r}")
    if colon and not sid:
        raise ValueError(f"not an event id of a recorded stream: {value[:80]!r}")
    found = sid if colon else None
    if found is not None and stream_id is not None and found != stream_id:
        raise ValueError("the event id belongs to another stream")
    return found, int(seq_text)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


class JoinResponse:
    """The ASGI app :func:`join_response` returns."""

    def __init__(
        self,
        recorder: Recorder,
        stream_id: str | None = None,
        *,
        key: str | None = None,
        after: int | str | None = None,
        format: str | WireFormat | None = None,
        ping: float | None = 15.0,
        path: str | None = None,
    ) -> None:
        if (stream_id is None) == (key is None):
            raise ValueError("join a stream by stream_id or by key (one of them)")
        self.recorder, self.stream_id, self.key = recorder, stream_id, key
        self.after, self.format, self.ping = after, format, ping
        #: only join a stream produced at this path (a resuming endpoint joins its own streams)
        self.path = path

    @staticmethod
    def _refuse(status: int, text: str) -> Prepared:
        return Prepared.of(PlainTextResponse(text, status) if status != 204 else Response(status_code=204))

    def _where_from(self, scope: Scope) -> tuple[str | None, int]:
        if self.after is not None:
            if isinstance(self.after, int) and not isinstance(self.after, bool):
                if self.after < 0:
                    raise ValueError("after must not be negative")
                return None, self.after
            return parse_event_id(str(self.after), self.stream_id)
        header = _header(scope, b"last-event-id")
        if header is not None:
            return parse_event_id(header, self.stream_id)
        query = scope.get("query_string", b"").decode("latin-1")
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "after":
                from urllib.parse import unquote

                return parse_event_id(unquote(value), self.stream_id)
        return None, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        prepared = await self.prepare(scope, receive)
        await prepared.app(scope, receive, send)

    async def prepare(self, scope: Scope, receive: Receive) -> Prepared:
        """Decide the answer (the stream, or 204, 400, 404) before anything is sent (see :mod:`.pull`)."""
        state = scope.get(SCOPE_KEY)
        if state is not None:
            state.decorated = True  # driven here: the middleware neither watches nor records it again
        recorder = self.recorder
        await recorder.ensure_open()
        if self.key is not None:  # the key's active stream, from its start
            live = recorder.live.by_key(self.key)
            if live is not None:
                sid: str = live.stream_id
            else:
                active = await recorder.list_streams(StreamStatus.STREAMING, 1, key=self.key)
                if not active:
                    return self._refuse(204, "")
                sid = active[0].id
            after = 0
        else:
            assert self.stream_id is not None
            try:
                found, after = self._where_from(scope)
            except ValueError as exc:
                return self._refuse(400, str(exc))
            sid = found or self.stream_id
        live = recorder.live.streams.get(sid)
        record = None
        if live is None:
            record = await recorder.get_soon(sid)  # (a stream just started elsewhere may not be written yet)
            if record is None:
                return self._refuse(404, "no such stream")
        produced_at = record.path if record is not None else getattr(live.session if live else None, "path", None)
        if self.path is not None and produced_at != self.path:
            return self._refuse(400, "the event id belongs to a stream of another endpoint")
        # Over, and the client has it all; or, joining by key, over at all (it ended since the
        # list was read: the list may lag this recorder's queue, the record read above does not).
        if record is not None and record.finished and (self.key is not None or not await recorder.chunks(sid, after)):
            return self._refuse(204, "")
        # The stream as its format sees it: its id, metadata, start time, text event.
        view = StreamSession(recorder, id=sid, resumable=True)
        name = self.format
        if record is not None:
            view.metadata, view.text_event = dict(record.metadata), record.text_event
            view.created_at = record.created_at.timestamp()
            name = name or record.format
        elif live is not None and live.session is not None:
            source = live.session
            view.metadata, view.text_event, view.created_at = source.metadata, source.text_event, source.created_at
            name = name or source.format
        wire = resolve_format(name or "sse")
        host = getattr(state, "middleware", None)
        opening = wire.begin(view) if after == 0 else b""  # the whole stream again: from the format's opening bytes
        headers = [(k.encode(), v.encode()) for k, v in {**SSE_HEADERS, **wire.headers}.items()]
        headers += [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-stream-id", sid.encode())]
        start_headers = [*headers, (b"connection", b"keep-alive")] if scope.get("http_version") == "1.1" else headers

        async def relay(scope: Scope, receive: Receive, send: Send) -> None:
            driver = StreamDriver(None, receive, _opening(send, opening), host=host, format=wire, ping=self.ping)
            await driver.relay({"type": "http.response.start", "status": 200, "headers": start_headers},
                               recorder.follow(sid, after), view)

        return Prepared(200, headers, relay)


def _opening(send: Send, body: bytes) -> Send:
    """``send`` that follows the response's start with ``body`` (when there is one)."""
    if not body:
        return send

    async def send_opening(message: Message) -> None:
        await send(message)
        if message["type"] == "http.response.start":
            await send({"type": "http.response.body", "body": body, "more_body": True})

    return send_opening


def join_response(
    recorder: Recorder,
    stream_id: str | None = None,
    *,
    key: str | None = None,
    after: int | str | None = None,
    format: str | WireFormat | None = None,
    ping: float | None = 15.0,
) -> JoinResponse:
    """Join a recorded stream, as an ASGI response (return it from any route).

    ``stream_id``: the stream; or ``key``: the key's active stream, from its start (``204``
    when it has none: the AI SDK's resume route). ``after``: the last seq (or
    ``<stream_id>:<seq>``) the client has; by default the ``Last-Event-ID`` header or the
    ``?after=`` query parameter, else from the start. ``format``: the wire format (default:
    the one the stream was produced in). ``ping``: keep-alive comments while idle.
    """
    return JoinResponse(recorder, stream_id, key=key, after=after, format=format, ping=ping)
