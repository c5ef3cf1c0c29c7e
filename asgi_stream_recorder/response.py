"""``RecordedStreamResponse``: the ASGI response of a decorated stream.

It resolves the recorder, opens the stream's session and hands the source to the
:class:`~asgi_stream_recorder.driver.StreamDriver`, which runs it to its end. What the
middleware left in the scope (its shutdown, its background places) reaches the driver
through :data:`SCOPE_KEY`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .driver import SCOPE_KEY, OnDisconnect, StreamDriver, StreamOptions
from .formats import SSE_HEADERS, WireFormat, going_away_event, resolve_format
from .join import JoinResponse, parse_event_id
from .pull import Prepared
from .recorders import Recorder, default_recorder
from .session import StreamSession, new_stream_id
from .sse import ServerSentEvent, encode

__all__ = [
    "SCOPE_KEY",
    "SSE_HEADERS",
    "OnDisconnect",
    "RecordedStreamResponse",
    "WireFormat",
    "check_options",
    "going_away_event",
    "resolve_format",
    "stream_options",
]


Metadata = Mapping[str, Any] | Callable[[Scope], Mapping[str, Any]] | None
#: a stream's key: a string, or a function of the request returning one (sync or async)
Key = str | Callable[[Request], "str | Awaitable[str | None] | None"] | None

_RETRY_HINT = encode(ServerSentEvent(retry=1000))  # a resumable stream's client reconnects after 1 s


def _last_event_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"last-event-id":
            return str(value.decode("latin-1"))
    return None


#: a stream asked for while the server shuts down: 503, try again (elsewhere) in a second
_REFUSAL = PlainTextResponse("server shutting down", 503, headers={"retry-after": "1"})


def check_options(event: str | None, on_disconnect: str, ping: float | None, **seconds: float | None) -> None:
    """Reject bad options where they are given, not on the first request. ``seconds``: other
    options that are a positive number of seconds, or None (timeouts, windows)."""
    if on_disconnect not in ("cancel", "continue"):
        raise ValueError(f"on_disconnect must be 'cancel' or 'continue', not {on_disconnect!r}")
    for name, value in {"ping": ping, **seconds}.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise ValueError(f"{name} must be a positive number of seconds, or None, not {value!r}")
    if event is not None:
        ServerSentEvent(event=event)  # raises on CR/LF


def stream_options(format: WireFormat, *, timeout: float | None = None, idle_timeout: float | None = None,
                   coalesce: float | None = None, progress: float | None = None,
                   fallback: Callable[[], AsyncIterator[Any]] | None = None) -> StreamOptions:
    """The driver's options, checked (each may be None)."""
    check_options(None, "cancel", None, timeout=timeout, idle_timeout=idle_timeout, coalesce=coalesce,
                  progress=progress)
    if progress is not None and format.name not in ("sse", "sse-without-done"):
        raise ValueError(f"progress events are plain SSE events: a {format.name!r} client would not expect them")
    return StreamOptions(timeout, idle_timeout, coalesce, progress, fallback)


class RecordedStreamResponse(Response):
    """A ``text/event-stream`` response that records every event it sends.

    ``content`` is an async iterable of ``str``, ``bytes`` (UTF-8), ``dict``/``list``
    (sent as JSON) or :class:`ServerSentEvent`. Every data event goes out with
    ``id: <seq>``; the ``X-Stream-Id`` header names the record. A ``HEAD`` request gets
    the headers only: the source is never started and nothing is recorded.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterable[Any],
        *,
        recorder: Recorder | None = None,
        metadata: Metadata = None,
        event: str | None = None,
        on_disconnect: OnDisconnect = "cancel",
        ping: float | None = 15.0,
        headers: Mapping[str, str] | None = None,
        status_code: int = 200,
        stream_id: str | None = None,
        background: BackgroundTask | None = None,
        format: str | WireFormat = "sse",
        resume: bool = False,
        key: Key = None,
        done_event: bool = True,
        request: Request | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        coalesce: float | None = None,
        progress: float | None = None,
        fallback: Callable[[], AsyncIterator[Any]] | None = None,
    ) -> None:
        check_options(event, on_disconnect, ping)
        self.format = resolve_format(format, done_event=done_event)
        self.options = stream_options(self.format, timeout=timeout, idle_timeout=idle_timeout, coalesce=coalesce,
                                      progress=progress, fallback=fallback)
        self.resume = resume
        if resume:  # a client that drops comes back for the rest: the generation goes on meanwhile
            on_disconnect = "continue"
        self.key = key
        self.request = request
        self.body_iterator = content
        self.recorder = recorder
        self.metadata = metadata
        self.event = event
        self.on_disconnect = on_disconnect
        self.ping = ping
        self.stream_id = stream_id or new_stream_id()
        self.status_code = status_code
        self.background = background
        # Header names are case-insensitive: a user's "Cache-Control" replaces ours, never doubles it.
        user = {name.lower(): value for name, value in (headers or {}).items()}
        self.init_headers({**SSE_HEADERS, **self.format.headers, **user, "x-stream-id": self.stream_id})
        self._source: AsyncIterator[Any] = aiter(content)

    def _start_message(self, scope: Scope) -> dict[str, Any]:
        headers = self.raw_headers
        if scope.get("http_version") == "1.1" and not any(k == b"connection" for k, _ in headers):
            headers = [*headers, (b"connection", b"keep-alive")]
        return {"type": "http.response.start", "status": self.status_code, "headers": headers}

    async def _never_start(self) -> None:
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()  # never started: none of its code runs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        prepared = await self.prepare(scope, receive)
        await prepared.app(scope, receive, send)

    async def prepare(self, scope: Scope, receive: Receive) -> Prepared:
        """Decide the answer's status and headers, and how its body is made (see :mod:`.pull`).

        ``200`` and the stream; the headers only for ``HEAD``; a resuming client's join (or its
        refusal); ``503`` while the server shuts down. The recorder is opened here, so a
        database that cannot be reached fails the request before anything is sent.
        """
        state = scope.get(SCOPE_KEY)
        if state is not None:
            state.decorated = True  # driven here: the middleware neither watches nor records it again
        start = self._start_message(scope)
        if scope.get("method") == "HEAD":
            await self._never_start()
            return Prepared(self.status_code, self.raw_headers, _head_only(start))
        if self.resume and (last := _last_event_id(scope)) is not None:
            await self._never_start()  # a reconnecting client joins its stream: never a second generation
            return await self._rejoin(last, scope, receive)
        host = None
        if state is not None:
            host = state.middleware
            if host.shutting_down:
                return Prepared.of(_REFUSAL)
        recorder = self.recorder
        if recorder is None:
            recorder = state.recorder if state is not None else default_recorder()
        await recorder.ensure_open()

        async def stream(scope: Scope, receive: Receive, send: Send) -> None:
            metadata = self.metadata(scope) if callable(self.metadata) else self.metadata
            key = await self._key(scope, receive)
            session = StreamSession(recorder, id=self.stream_id, metadata=dict(metadata or {}),
                                    path=scope.get("path"), method=scope.get("method"), text_event=self.event,
                                    key=key, format=self.format.name, resumable=self.resume)
            opening = (_RETRY_HINT if self.resume else b"") + self.format.begin(session)  # (before it is recorded)
            session.begin()
            driver = StreamDriver(session, receive, send, host=host, format=self.format, ping=self.ping,
                                  on_disconnect=self.on_disconnect, options=self.options)
            driver.preamble = opening
            await driver.stream(start, self._source, self.event)
            if self.background is not None:
                await self.background()

        return Prepared(self.status_code, self.raw_headers, stream)

    async def _key(self, scope: Scope, receive: Receive) -> str | None:
        key = self.key
        if key is None or isinstance(key, str):
            return key
        value = key(self.request if self.request is not None else Request(scope, receive))
        if inspect.isawaitable(value):
            value = await value
        if value is not None and not isinstance(value, str):
            raise TypeError(f"a stream's key must be a str or None, not {type(value).__name__}")
        return value

    async def _rejoin(self, last: str, scope: Scope, receive: Receive) -> Prepared:
        try:
            stream_id, seq = parse_event_id(last)
            if stream_id is None:
                raise ValueError("a resumable stream's event id names its stream")
        except ValueError as exc:
            return Prepared.of(PlainTextResponse(f"bad Last-Event-ID: {exc}", 400))
        state = scope.get(SCOPE_KEY)
        recorder = self.recorder or (state.recorder if state is not None else default_recorder())
        join = JoinResponse(recorder, stream_id, after=seq, format=self.format, ping=self.ping, path=scope.get("path"))
        return await join.prepare(scope, receive)


def _head_only(start: Message) -> ASGIApp:
    async def head(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return head
