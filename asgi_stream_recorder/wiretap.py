"""One HTTP request through the middleware, and the recording of undecorated SSE from the wire.

For most requests this is a thin pass-through: the app runs in the request's task inside
one cancel scope, and no task group exists (so an app's error reaches outer middleware as
itself). When the app starts an undecorated ``text/event-stream`` response, the tap adds
the SSE headers and hands the stream to a :class:`~asgi_stream_recorder.driver.StreamDriver`:
its watch task (disconnects, keep-alives between events) runs in the middleware's task group,
and, with ``record_all_sse``, the bytes the app sends are parsed and recorded as they pass.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .driver import Host, OnDisconnect, StreamDriver, unwrap_group
from .formats import SSE_HEADERS
from .recorders import Recorder
from .session import StreamSession
from .sse import SSEParser

__all__ = ["WireTap"]

Spawn = Callable[[Callable[[], Awaitable[None]]], None]


def ends_event(tail: bytes) -> bool:
    """Whether bytes sent so far end with a blank line (any mix of CR, LF, CRLF): a keep-alive
    comment may then go in without splitting an event."""
    if tail.endswith(b"\r\n"):
        tail = tail[:-2]
    elif tail.endswith((b"\n", b"\r")):
        tail = tail[:-1]
    else:
        return False
    return tail.endswith((b"\n", b"\r"))


class WireTap:
    """See the module docstring. ``spawn`` starts a task in the middleware's task group (None
    when the server runs no lifespan: the request then opens a task group of its own)."""

    # One per HTTP request through the middleware, alive as long as the request: slots, and
    # what only an undecorated event stream needs is made when one begins (see ``_start``).
    __slots__ = (
        "host", "state", "scope", "receive", "send", "recorder", "ping", "on_disconnect", "spawn", "driver",
        "parser", "gone_early", "_pending", "_disconnected", "_watch_scope", "_done", "_tg", "_tail", "_app_scope",
    )

    def __init__(
        self,
        host: Host,
        state: Any,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        recorder: Recorder | None,
        ping: float | None,
        on_disconnect: OnDisconnect,
        spawn: Spawn | None,
    ) -> None:
        self.host, self.state, self.scope, self.receive, self.send = host, state, scope, receive, send
        self.recorder = recorder  # None: do not record undecorated streams
        self.ping, self.on_disconnect, self.spawn = ping, on_disconnect, spawn
        self.driver: StreamDriver | None = None
        self.parser: SSEParser | None = None
        self.gone_early = False  # the app read a disconnect before its stream began
        # receive messages the watch read for the app, and the client's leaving as the app
        # sees it: made with the driver (a decorated stream or a plain response never needs them)
        self._pending: collections.deque[Message] | None = None
        self._disconnected: anyio.Event | None = None
        self._watch_scope: anyio.CancelScope | None = None
        self._done = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._tail = b""  # the last bytes sent, to know whether they end between events
        self._app_scope: anyio.CancelScope | None = None

    def run(self, app: ASGIApp) -> Awaitable[None]:
        """The request through the tap, to await (one coroutine, not two, for the common case:
        each is a frame kept alive as long as the request)."""
        if self.spawn is not None:
            return self._call(app)
        return self._run_in_group(app)

    async def _run_in_group(self, app: ASGIApp) -> None:
        with unwrap_group():
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._call(app)
                tg.cancel_scope.cancel()

    async def _call(self, app: ASGIApp) -> None:
        raised: Exception | None = None
        with anyio.CancelScope() as scope:
            self._app_scope = scope
            try:
                await app(self.scope, self.app_receive, self.app_send)
                if (driver := self.driver) is not None:
                    if driver.ended or not driver.client_gone:
                        driver.exhausted = True
                    elif not driver.interrupted:  # it stopped early because its client left
                        driver.stopped_for_client = True
            except Exception as exc:
                if self.driver is None:
                    raise
                self.driver.fail(exc, "the app raised after its event stream began")
                raised = exc
            finally:
                if self.driver is not None:
                    self._done = True
                    if self._watch_scope is not None:
                        self._watch_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await self.driver.finish()
        if raised is not None:
            raise raised

    # -- receive: one reader, so the app and the watch do not steal each other's messages ----
    async def app_receive(self) -> Message:
        if self.driver is None:
            message = await self.receive()  # (the stream may have begun while this waited)
            if message["type"] == "http.disconnect":
                if self.driver is not None:
                    self.driver.client_left()
                else:
                    self.gone_early = True
            return message
        if self._pending:
            return self._pending.popleft()
        assert self._disconnected is not None  # (made with the driver)
        await self._disconnected.wait()
        return {"type": "http.disconnect"}

    async def _watch(self) -> None:
        driver = self.driver
        assert driver is not None
        with anyio.CancelScope() as scope:
            self._watch_scope = scope
            if self._done:
                return
            try:
                await driver.watch()
            finally:
                assert self._disconnected is not None
                self._disconnected.set()

    # -- send: headers on the start message, the tap on body messages ------------------------
    async def app_send(self, message: Message) -> None:
        driver = self.driver
        if message["type"] == "http.response.start":
            message = await self._start(message)
            if self.driver is not None:
                await self.driver.start(message)
                return
        elif driver is not None:
            body = message.get("body", b"")
            if body:
                self._tail = (self._tail + body)[-4:]
                driver.at_boundary = ends_event(self._tail)
            if self.parser is not None:
                await self._tap(body)
            if not message.get("more_body", False):
                driver.ended = True
            if driver.client_gone:
                return
            try:
                await self.send(message)
            except OSError:
                driver.client_left()
                assert self._disconnected is not None
                self._disconnected.set()
                raise
            return
        await self.send(message)

    async def _start(self, message: Message) -> Message:
        headers = list(message.get("headers", []))
        content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        if not content_type.lower().startswith(b"text/event-stream"):
            return message
        names = {k.lower() for k, _ in headers}
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        for name, value in SSE_HEADERS.items():
            if name.encode() not in names:
                headers.append((name.encode(), value.encode()))
        if self.scope.get("http_version") == "1.1" and b"connection" not in names:
            headers.append((b"connection", b"keep-alive"))
        if not self.state.decorated:
            session = None
            if self.recorder is not None:
                await self.recorder.ensure_open()
                session = StreamSession(self.recorder, metadata={"recorded_from": "wire"},
                                        path=self.scope.get("path"), method=self.scope.get("method"))
                self.parser = SSEParser()
                headers.append((b"x-stream-id", session.id.encode()))
                session.begin()
            self._pending = collections.deque()
            self._disconnected = anyio.Event()
            driver = self.driver = StreamDriver(session, self.receive, self.send, host=self.host, ping=self.ping,
                                                on_disconnect=self.on_disconnect)
            driver.forward = self._pending.append
            assert self._app_scope is not None
            driver.attach(self._app_scope)
            self.host.track(driver)
            if self.gone_early:
                driver.client_left()
                self._disconnected.set()
            else:
                if self.spawn is not None:
                    self.spawn(self._watch)
                else:
                    assert self._tg is not None
                    self._tg.start_soon(self._watch)
        return {**message, "headers": headers}

    async def _tap(self, body: bytes) -> None:
        assert self.parser is not None and self.driver is not None
        session = self.driver.session
        assert session is not None
        for event in self.parser.feed(body):
            session.stamp()
            text = event.text or ""
            if not session.record_nowait(text, event.event):
                await session.record_waiting(text, event.event)
