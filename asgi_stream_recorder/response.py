"""The ASGI response that drives a token source through a :class:`StreamSession`.

Per event, the client's path does only this: turn the item into text, encode it once,
``await send``, and hand the chunk to the recorder's queue. Beside it, in the same task
group, a watcher reads ``receive`` for ``http.disconnect`` and a keep-alive task sends
``: ping`` comments on an idle stream. How the stream stopped is handed to
:meth:`StreamSession.end`, which decides the status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from typing import Any, Literal

import anyio
import anyio.lowlevel
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .recorders import Recorder, default_recorder
from .recorders.base import Chunk
from .session import Ending, StreamSession, new_stream_id
from .sse import PING, ServerSentEvent, encode, encode_data, to_text

__all__ = ["SCOPE_KEY", "SSE_HEADERS", "OnDisconnect", "RecordedStreamResponse", "WireFormat", "going_away_event"]

log = logging.getLogger("asgi_stream_recorder")

#: Where the middleware leaves its state in the ASGI scope for responses to find.
SCOPE_KEY = "asgi_stream_recorder"

#: Headers every event stream needs so that proxies and browsers neither cache nor buffer it.
SSE_HEADERS = {
    "cache-control": "no-cache, no-transform",
    "x-accel-buffering": "no",
}

OnDisconnect = Literal["cancel", "continue"]
Metadata = Mapping[str, Any] | Callable[[Scope], Mapping[str, Any]] | None

_CLOSE_TIMEOUT = 5.0  # how long a source's cleanup (its finally blocks) may take


def going_away_event(stream_id: str, last_seq: int) -> bytes:
    """The last event of a stream ended by a shutdown; the client may reconnect with Last-Event-ID."""
    return encode(
        ServerSentEvent(
            {"message": "server shutting down", "stream_id": stream_id, "last_event_id": str(last_seq)},
            event="shutdown",
            retry=1000,
        )
    )


async def _refuse(send: Send) -> None:
    """A stream asked for while the server shuts down: 503, try again (elsewhere) in a second."""
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": b"server shutting down"})


def check_options(event: str | None, on_disconnect: str, ping: float | None) -> None:
    """Reject bad options where they are given, not on the first request."""
    if on_disconnect not in ("cancel", "continue"):
        raise ValueError(f"on_disconnect must be 'cancel' or 'continue', not {on_disconnect!r}")
    if ping is not None and (isinstance(ping, bool) or ping <= 0):
        raise ValueError(f"ping must be a positive number of seconds, or None, not {ping!r}")
    if event is not None:
        ServerSentEvent(event=event)  # raises on CR/LF


class WireFormat:
    """How recorded chunks look on the wire. This default is plain SSE: ``id: <seq>``, the
    chunk's event name, its text as ``data``. Subclasses (``integrations.openai``'s
    ``OpenAIFormat``) change the bytes the client sees, never what is recorded."""

    def chunk(self, session: StreamSession, chunk: Chunk, extra: ServerSentEvent | None) -> bytes:
        """Bytes for one data chunk; ``extra`` carries a yielded event's ``retry``/``comment``."""
        if extra is None:
            return encode_data(chunk.data, str(chunk.seq), chunk.event)
        return encode(ServerSentEvent(chunk.data, event=chunk.event, id=str(chunk.seq), retry=extra.retry,
                                      comment=extra.comment))

    def end(self, session: StreamSession) -> bytes:
        """Bytes after the last chunk of a stream that completed."""
        return b""

    def error(self, session: StreamSession) -> bytes:
        """What the client is told when the source fails: no error text (it may hold secrets)."""
        return encode(ServerSentEvent({"message": "stream failed", "stream_id": session.id}, event="error"))


def resolve_format(format: str | WireFormat) -> WireFormat:
    if isinstance(format, WireFormat):
        return format
    if format == "sse":
        return _SSE
    if format == "openai":
        from .integrations.openai import OpenAIFormat

        return OpenAIFormat()
    raise ValueError(f"format must be 'sse', 'openai' or a WireFormat, not {format!r}")


_SSE = WireFormat()


class RecordedStreamResponse(Response):
    """A ``text/event-stream`` response that records every event it sends.

    ``content`` is an async iterable of ``str``, ``bytes`` (UTF-8), ``dict``/``list``
    (sent as JSON) or :class:`ServerSentEvent`. Every data event goes out with
    ``id: <seq>``; the ``X-Stream-Id`` header names the record.
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
    ) -> None:
        check_options(event, on_disconnect, ping)
        self.format = resolve_format(format)
        self.body_iterator = content
        self.recorder = recorder
        self.metadata = metadata
        self.event = event
        self.on_disconnect = on_disconnect
        self.ping = ping
        self.stream_id = stream_id or new_stream_id()
        self.status_code = status_code
        self.background = background
        self.init_headers({**SSE_HEADERS, **(headers or {}), "x-stream-id": self.stream_id})
        self._source: AsyncIterator[Any] = aiter(content)
        self._client_gone = False
        self._interrupted = False
        self._continues = on_disconnect == "continue"
        self._reserved = False  # holds a place among the middleware's background streams
        self._last_send = 0.0
        self._scope: anyio.CancelScope | None = None
        self._middleware: Any = None

    # -- set-up ----------------------------------------------------------------------------
    async def _resolve_recorder(self, scope: Scope) -> Recorder:
        recorder = self.recorder
        if recorder is None:
            state = scope.get(SCOPE_KEY)
            recorder = state.recorder if state is not None else default_recorder()
        await recorder.ensure_open()
        return recorder

    def _session(self, recorder: Recorder, scope: Scope) -> StreamSession:
        metadata = self.metadata(scope) if callable(self.metadata) else self.metadata
        return StreamSession(
            recorder,
            id=self.stream_id,
            metadata=dict(metadata or {}),
            path=scope.get("path"),
            method=scope.get("method"),
            text_event=self.event,
        )

    def _start_message(self, scope: Scope) -> dict[str, Any]:
        headers = self.raw_headers
        if scope.get("http_version") == "1.1" and not any(k == b"connection" for k, _ in headers):
            headers = [*headers, (b"connection", b"keep-alive")]
        return {"type": "http.response.start", "status": self.status_code, "headers": headers}

    # -- the ASGI app --------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get(SCOPE_KEY)
        middleware = None
        if state is not None:
            middleware = state.middleware
            if middleware.shutting_down:
                await _refuse(send)
                return
            state.decorated = True
        recorder = await self._resolve_recorder(scope)
        session = self._session(recorder, scope)
        session.begin()
        self._middleware = middleware
        if middleware is not None:
            middleware.track(self)
        ending: Ending | None = Ending.INTERRUPTED  # what it is if we are cancelled from outside
        error: BaseException | None = None
        try:
            self._last_send = time.perf_counter()
            try:
                await send(self._start_message(scope))
            except OSError:
                self._client_left(session)
            if not self._client_gone:
                async with anyio.create_task_group() as tg:
                    self._scope = tg.cancel_scope
                    if self._interrupted:  # shutdown began before we got here
                        tg.cancel_scope.cancel()
                    tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope, session)
                    if self.ping is not None:
                        tg.start_soon(self._keepalive, send, self.ping, session)
                    ending, error = await self._pump(session, send)
                    tg.cancel_scope.cancel()
            if ending is None:  # the client left a "continue" stream: the middleware runs the rest
                assert middleware is not None
                middleware.run_background(lambda: self._continue(session))
                return
            ending = self._ending(ending)
        finally:
            if ending is not None:
                if self._reserved:
                    assert middleware is not None
                    middleware.release_background()
                with anyio.CancelScope(shield=True):
                    await self._end(session, ending, error, send)
        if self.background is not None:
            await self.background()

    def interrupt(self) -> None:
        """End the stream now because the server is going away (recorded ``interrupted``)."""
        self._interrupted = True
        if self._scope is not None:
            self._scope.cancel()

    def _ending(self, ending: Ending) -> Ending:
        if self._interrupted:
            return Ending.INTERRUPTED
        if self._client_gone and ending is Ending.INTERRUPTED:  # our watch cancelled the source
            return Ending.CLIENT_LEFT
        return ending

    def _client_left(self, session: StreamSession) -> bool:
        """Note the client is gone; True if the stream goes on ("continue", with room to)."""
        self._client_gone = True
        session.client_left()
        if self._continues and self._middleware is not None and self._middleware.owns_background:
            self._reserved = self._middleware.reserve_background()
            if not self._reserved:
                session.metadata["continue_refused"] = "no room for background streams, or shutting down"
                self._continues = False
        return self._continues

    async def _continue(self, session: StreamSession) -> None:
        """The rest of a stream whose client left, run by the middleware: record, send nothing."""
        ending, error = Ending.INTERRUPTED, None
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                result, error = await self._pump(session, None)
                ending = self._ending(result or Ending.EXHAUSTED)
        finally:
            with anyio.CancelScope(shield=True):
                await self._end(session, ending, error, None)

    async def _end(
        self, session: StreamSession, ending: Ending, error: BaseException | None, send: Send | None
    ) -> None:
        """Close the source, decide and queue the status, say the last word to the client."""
        await self._close_source()
        session.end(ending, error)
        if send is not None and not self._client_gone:
            if ending is Ending.RAISED:
                body = self.format.error(session)
            elif ending is Ending.EXHAUSTED:
                body = self.format.end(session)
            elif ending is Ending.INTERRUPTED:
                body = going_away_event(session.id, session.seq)
            else:
                body = b""
            with anyio.move_on_after(1.0):
                try:
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                except OSError:
                    pass
        if self._middleware is not None:
            self._middleware.untrack(self)
        if not session.recorder.managed:  # nobody will close this recorder: make the stream durable now
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                await session.recorder.flush()

    async def _pump(self, session: StreamSession, send: Send | None) -> tuple[Ending | None, BaseException | None]:
        """Move items from the source to the client and the record until one side stops.

        Returns how it stopped, or ``None`` when the client left a ``continue`` stream and a
        middleware can take the rest into the background.
        """
        source = self._source
        default_event = self.event
        hand_off = send is not None and self._middleware is not None and self._middleware.owns_background
        wire = self.format
        custom_wire = type(wire) is not WireFormat
        record_nowait = session.record_nowait
        while True:
            if send is not None and self._client_gone:  # seen by the watch (a busy source may not yield to it)
                if not self._continues:
                    return Ending.CLIENT_LEFT, None
                if hand_off:
                    return None, None
            try:
                item = await anext(source)
            except StopAsyncIteration:
                return Ending.EXHAUSTED, None
            except Exception as exc:
                log.warning("stream %s: source raised %r", session.id, exc)
                return Ending.RAISED, exc
            cls = type(item)
            try:
                if cls is str:
                    text, event, extra = item, default_event, None
                elif cls is ServerSentEvent:
                    if item.id is not None:
                        raise ValueError(
                            "ServerSentEvent.id is assigned by the recorder (it is the chunk's seq, "
                            "used for Last-Event-ID resume): leave it None"
                        )
                    if item.text is None:  # a comment or retry hint: sent, not recorded
                        if send is not None:
                            await self._send(send, encode(item))
                        continue
                    text, event = item.text, item.event or default_event
                    extra = item if item.retry is not None or item.comment is not None else None
                else:
                    text, event, extra = _item_text(item), default_event, None
            except (TypeError, ValueError) as exc:
                return Ending.RAISED, exc
            chunk = session.chunk(text, event)
            if send is not None and not self._client_gone:
                if custom_wire or extra is not None:
                    body = wire.chunk(session, chunk, extra)
                elif event is None and "\n" not in text and "\r" not in text:  # the common token: inline
                    body = f"id: {chunk.seq}\ndata: {text}\n\n".encode()
                else:
                    body = encode_data(text, chunk.seq, event)
                try:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                except OSError:
                    if not self._client_left(session):
                        return Ending.CLIENT_LEFT, None
            if not record_nowait(chunk):
                await session.record(chunk)
            if not chunk.seq & 31:  # a source and a send that never suspend would starve the loop
                await anyio.lowlevel.checkpoint()

    async def _send(self, send: Send, body: bytes) -> None:
        if not self._client_gone:
            self._last_send = time.perf_counter()
            try:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            except OSError:
                self._client_gone = True

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope, session: StreamSession) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._client_left(session):
            scope.cancel()

    async def _keepalive(self, send: Send, interval: float, session: StreamSession) -> None:
        while not self._client_gone:
            # Since the last byte sent: a chunk (timed by the session) or a comment/ping (by _send).
            idle = min(time.perf_counter() - self._last_send, session.idle_seconds())
            if idle >= interval:
                await self._send(send, PING)
                idle = 0.0
            await anyio.sleep(interval - idle)

    async def _close_source(self) -> None:
        aclose = getattr(self.body_iterator, "aclose", None)
        if aclose is None:
            return
        with anyio.move_on_after(_CLOSE_TIMEOUT) as scope:
            try:
                await aclose()
            except Exception as exc:
                log.warning("closing the source raised %r", exc)
        if scope.cancelled_caught:
            log.warning("the source's cleanup took over %.0fs and was abandoned", _CLOSE_TIMEOUT)


def _item_text(item: Any) -> str:
    """Text of a yielded item other than str/ServerSentEvent (the str case is inlined above)."""
    if isinstance(item, (str, bytes, bytearray, memoryview, dict, list)):
        return to_text(item)
    raise TypeError(
        f"a recorded stream cannot send an item of type {type(item).__module__}.{type(item).__qualname__}: "
        "yield str, bytes, dict, list or ServerSentEvent"
    )
