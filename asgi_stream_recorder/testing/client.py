"""An in-process SSE client for any ASGI app: events arrive as the app sends them.

No server and no transport that buffers the body: the client calls the app with its own
``receive`` and ``send``. ``send`` is a rendezvous (the app's send returns once the test
has taken the message), so what the test has read is exactly what the app has sent, and
a disconnect after N events leaves exactly N events on the client's side. A disconnect
is what a real server reports: ``receive`` returns ``http.disconnect`` and ``send``
raises ``OSError`` (ASGI spec 2.4).

Works on asyncio and trio (anyio). Every wait is bounded by ``timeout``.

.. code-block:: python

    async with sse_client(app) as client:
        async with client.stream("GET", "/chat?q=hi") as s:
            assert s.status_code == 200
            async for event in s.events():
                ...
        events = await client.collect("/chat", max_events=3)
"""

from __future__ import annotations

import json as jsonlib
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Scope

from ..sse import ServerSentEvent, SSEParser

__all__ = ["ClientDisconnected", "LifespanError", "SSEClient", "SSEClientFactory", "SSEStream", "sse_client"]

HeaderInput = Mapping[str, str] | Sequence[tuple[str, str]] | None
ParamInput = Mapping[str, str | int | float] | Sequence[tuple[str, str | int | float]] | None

DEFAULT_TIMEOUT = 10.0


class ClientDisconnected(OSError):
    """Raised by the client's ``send`` once the client has gone (ASGI spec: an ``OSError``)."""


class LifespanError(RuntimeError):
    """The app's lifespan startup or shutdown failed, or did not answer in time."""


def _encode_headers(headers: HeaderInput) -> list[tuple[bytes, bytes]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items]


def _only_disconnects(exc: BaseException) -> bool:
    """True if ``exc`` is an ``OSError``, or a group of nothing else (what a send raises
    once the client has gone, possibly wrapped by the app's task groups)."""
    group = getattr(exc, "exceptions", None)
    if isinstance(group, tuple) and group:
        return all(_only_disconnects(e) for e in group)
    return isinstance(exc, OSError)


class SSEStream:
    """One request in flight: the response's status and headers, then its events.

    Use it through :meth:`SSEClient.stream`. Leaving the ``async with`` block disconnects
    (if the response is still going) and waits until the app has returned, so the
    stream's record is final by then (a recorder still needs a flush to make it durable:
    :func:`~asgi_stream_recorder.testing.assert_recorded` does that).
    """

    def __init__(
        self,
        app: ASGIApp,
        scope: Scope,
        body: bytes,
        *,
        timeout: float,
        disconnect_after_events: int | None,
        disconnect_after: float | None,
        raise_app_exceptions: bool,
    ) -> None:
        self._app = app
        self._scope = scope
        self._body = body
        self.timeout = timeout
        self._max_events = disconnect_after_events
        self._disconnect_after = disconnect_after
        self._raise_app_exceptions = raise_app_exceptions
        tx, rx = anyio.create_memory_object_stream[Message](0)
        self._tx: MemoryObjectSendStream[Message] = tx
        self._rx: MemoryObjectReceiveStream[Message] = rx
        self._tg: TaskGroup | None = None
        self._disconnected = anyio.Event()
        self._over = anyio.Event()  # the client left or the response is complete
        self._app_done = anyio.Event()
        self._timer_scope: anyio.CancelScope | None = None
        self._body_sent = False
        self._wait_scope: anyio.CancelScope | None = None
        self._parser = SSEParser()
        #: set once the app has sent ``http.response.start``
        self.status_code: int = 0
        self.headers: Headers = Headers()
        #: the raw body bytes received so far
        self.body = b""
        #: every event received so far, in order
        self.received: list[ServerSentEvent] = []
        #: True once the app sent its last body message (``more_body: False``)
        self.complete = False
        #: what the app raised, if it raised (re-raised on exit unless ``raise_app_exceptions=False``)
        self.app_exception: BaseException | None = None

    # -- what the test reads -------------------------------------------------------------
    @property
    def stream_id(self) -> str | None:
        """The ``X-Stream-Id`` response header: the id of the stream's record."""
        return self.headers.get("x-stream-id")

    @property
    def disconnected(self) -> bool:
        return self._disconnected.is_set()

    @property
    def comments(self) -> int:
        """How many SSE comment lines (keep-alive pings) arrived."""
        return self._parser.comments

    @property
    def last_event_id(self) -> str:
        """The id a browser would send as ``Last-Event-ID`` to resume."""
        return self._parser.last_event_id

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """Yield each event as soon as the app has sent it.

        Ends when the response ends or the client disconnects (after
        ``disconnect_after_events`` events, after ``disconnect_after`` seconds, or through
        :meth:`disconnect`). Raises ``TimeoutError`` if the app sends nothing for
        ``timeout`` seconds.
        """
        while not self.complete and not self.disconnected:
            if self._max_events is not None and len(self.received) >= self._max_events:
                await self.disconnect(wait=False)
                return
            message = await self._next_message()
            if message is None:
                return
            for event in self._feed(message):
                yield event
                if self.disconnected:
                    return
                if self._max_events is not None and len(self.received) >= self._max_events:
                    await self.disconnect(wait=False)
                    return

    async def collect(self) -> list[ServerSentEvent]:
        """Read events until the stream ends (or the client disconnects); return all received."""
        async for _ in self.events():
            pass
        return list(self.received)

    async def text(self) -> str:
        """Read until the stream ends; the data of its plain (``message``) events joined: the
        answer as a browser's ``onmessage`` sees it (named events such as ``done``, ``error``
        or ``shutdown`` are in :attr:`received`, not here)."""
        return "".join(e.text or "" for e in await self.collect() if e.event is None)

    @property
    def done(self) -> dict[str, Any] | None:
        """The data of the stream's final ``event: done`` (``{"stream_id", "status"}``), once received."""
        for event in reversed(self.received):
            if event.event == "done" and event.text is not None:
                value = jsonlib.loads(event.text)
                return value if isinstance(value, dict) else None
        return None

    async def read(self) -> bytes:
        """Read the rest of the body (for responses that are not event streams)."""
        while not self.complete and not self.disconnected:
            message = await self._next_message()
            if message is None:
                break
            self._feed(message)
        return self.body

    async def disconnect(self, *, wait: bool = True) -> None:
        """Hang up: the app's ``receive`` returns ``http.disconnect`` and its ``send`` raises.

        With ``wait`` (the default), return once the app has returned (bounded by ``timeout``).
        """
        if not self._disconnected.is_set():
            self._disconnected.set()
            self._over.set()
            if self._wait_scope is not None:
                self._wait_scope.cancel()
            self._rx.close()  # a send blocked on us fails now
        if wait:
            await self.wait_app_done()

    async def wait_app_done(self) -> None:
        """Wait (up to ``timeout`` seconds) until the app has returned."""
        with anyio.move_on_after(self.timeout) as scope:
            await self._app_done.wait()
        if scope.cancelled_caught:
            raise TimeoutError(f"the app did not return within {self.timeout}s of the client leaving")

    # -- internals -------------------------------------------------------------------------
    def _feed(self, message: Message) -> list[ServerSentEvent]:
        if message["type"] != "http.response.body":
            raise AssertionError(f"unexpected ASGI message after the response started: {message['type']!r}")
        chunk = bytes(message.get("body", b""))
        self.body += chunk
        if not message.get("more_body", False):
            self.complete = True
        events = self._parser.feed(chunk) if chunk else []
        self.received.extend(events)
        return events

    async def _next_message(self) -> Message | None:
        """The next message from the app; None when the app is done or the client left."""
        with anyio.CancelScope() as wait_scope:
            self._wait_scope = wait_scope
            try:
                with anyio.fail_after(self.timeout):
                    return await self._rx.receive()
            except TimeoutError:
                raise TimeoutError(
                    f"{self._scope['method']} {self._scope['path']}: the app sent nothing for {self.timeout}s "
                    f"({len(self.received)} events received so far)"
                ) from None
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return None
            finally:
                self._wait_scope = None
        return None  # cancelled by a disconnect

    async def _receive(self) -> Message:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._over.wait()  # like a server: a finished response reads as a disconnect too
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        if self.disconnected:
            raise ClientDisconnected("the client has disconnected")
        try:
            await self._tx.send(message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise ClientDisconnected("the client has disconnected") from None
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._over.set()

    async def _run_app(self) -> None:
        try:
            await self._app(self._scope, self._receive, self._send)
        except Exception as exc:
            if not (self.disconnected and _only_disconnects(exc)):
                # an app failing to send after the client left is the client's doing, not an error
                self.app_exception = exc
        finally:
            self._tx.close()
            self._app_done.set()

    async def _disconnect_later(self, delay: float) -> None:
        with anyio.CancelScope() as scope:
            self._timer_scope = scope
            await anyio.sleep(delay)
            await self.disconnect(wait=False)

    # -- context manager --------------------------------------------------------------------
    async def __aenter__(self) -> SSEStream:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            tg.start_soon(self._run_app)
            if self._disconnect_after is not None:
                tg.start_soon(self._disconnect_later, self._disconnect_after)
            message = await self._next_message()
            if message is None:
                if self.app_exception is not None:
                    raise self.app_exception
                raise AssertionError(
                    f"{self._scope['method']} {self._scope['path']}: the app "
                    + ("was disconnected before" if self.disconnected else "returned without")
                    + " starting a response"
                )
            if message["type"] != "http.response.start":
                raise AssertionError(f"the app's first message is {message['type']!r}, not 'http.response.start'")
            self.status_code = int(message["status"])
            self.headers = Headers(raw=[(bytes(k), bytes(v)) for k, v in message.get("headers", [])])
        except BaseException:
            await self._close(check=False)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close(check=exc is None)
        if exc is None and self.app_exception is not None and self._raise_app_exceptions:
            raise self.app_exception

    async def _close(self, check: bool = True) -> None:
        """Hang up if the app is still going and wait (bounded) until it has returned;
        with ``check``, an app that had to be cancelled is a ``TimeoutError``."""
        tg, self._tg = self._tg, None
        if tg is None:
            return
        if not self._app_done.is_set():
            await self.disconnect(wait=False)
        if self._timer_scope is not None:
            self._timer_scope.cancel()
        tg.cancel_scope.deadline = anyio.current_time() + self.timeout
        # The app's errors are kept in app_exception, so the group only ends; whatever the
        # test's block raised propagates unchanged (not wrapped in an exception group).
        await tg.__aexit__(None, None, None)
        if check and tg.cancel_scope.cancel_called:  # the deadline passed
            raise TimeoutError(f"the app did not return within {self.timeout}s of the client leaving: cancelled")


class SSEClient:
    """Sends requests to an ASGI app in-process and reads the event streams it answers with.

    Make one with :func:`sse_client`, which also runs the app's lifespan if asked.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        base_url: str = "http://testserver",
        headers: HeaderInput = None,
        timeout: float = DEFAULT_TIMEOUT,
        raise_app_exceptions: bool = True,
    ) -> None:
        self.app = app
        parts = urlsplit(base_url)
        self._scheme = parts.scheme or "http"
        self._host = parts.hostname or "testserver"
        self._port = parts.port or (443 if self._scheme == "https" else 80)
        self._root_path = parts.path.rstrip("/")
        self._headers = _encode_headers(headers)
        self.timeout = timeout
        self.raise_app_exceptions = raise_app_exceptions
        #: the lifespan state (``scope["state"]``) each request gets a copy of
        self.state: dict[str, Any] = {}
        self._to_app: MemoryObjectSendStream[Message] | None = None
        self._from_app: MemoryObjectReceiveStream[Message] | None = None
        self._lifespan_error: BaseException | None = None

    def build_scope(
        self,
        method: str,
        url: str,
        *,
        headers: HeaderInput = None,
        params: ParamInput = None,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> Scope:
        """The ASGI ``http`` scope for a request (``url`` may carry a query string)."""
        parts = urlsplit(url)
        path = parts.path or "/"
        query = parts.query
        if params:
            extra = urlencode(list(params.items()) if isinstance(params, Mapping) else list(params))
            query = f"{query}&{extra}" if query else extra
        raw_headers = [(b"host", (self._host if self._port in (80, 443) else f"{self._host}:{self._port}").encode())]
        raw_headers += [(b"accept", b"text/event-stream")]
        names: set[bytes] = set()
        given = self._headers + _encode_headers(headers)
        for name, _ in given:
            names.add(name)
        raw_headers = [(k, v) for k, v in raw_headers if k not in names] + given
        if body or method.upper() not in ("GET", "HEAD", "OPTIONS"):
            if content_type is not None and b"content-type" not in names:
                raw_headers.append((b"content-type", content_type.encode("latin-1")))
            raw_headers.append((b"content-length", str(len(body)).encode()))
        full_path = self._root_path + path
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": method.upper(),
            "scheme": self._scheme,
            "path": unquote(full_path),
            "raw_path": full_path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": self._root_path,
            "headers": raw_headers,
            "client": ("127.0.0.1", 50000),
            "server": (self._host, self._port),
            "state": dict(self.state),
            "extensions": {},
        }

    def stream(
        self,
        method: str,
        url: str,
        *,
        headers: HeaderInput = None,
        params: ParamInput = None,
        json: Any = None,
        content: bytes | str | None = None,
        disconnect_after_events: int | None = None,
        disconnect_after: float | None = None,
        timeout: float | None = None,
    ) -> SSEStream:
        """Start a request; use as ``async with client.stream(...) as s``.

        ``json`` sends a JSON body, ``content`` raw bytes. ``disconnect_after_events``: hang
        up once that many events have been read; ``disconnect_after``: hang up after that
        many seconds. ``timeout`` bounds every wait (default: the client's).
        """
        if json is not None and content is not None:
            raise ValueError("give json or content, not both")
        content_type: str | None = None
        if json is not None:
            body = jsonlib.dumps(json).encode("utf-8")
            content_type = "application/json"
        elif isinstance(content, str):
            body = content.encode("utf-8")
            content_type = "text/plain; charset=utf-8"
        else:
            body = content or b""
        scope = self.build_scope(method, url, headers=headers, params=params, body=body, content_type=content_type)
        return SSEStream(
            self.app,
            scope,
            body,
            timeout=self.timeout if timeout is None else timeout,
            disconnect_after_events=disconnect_after_events,
            disconnect_after=disconnect_after,
            raise_app_exceptions=self.raise_app_exceptions,
        )

    async def collect(
        self,
        url: str,
        *,
        method: str = "GET",
        max_events: int | None = None,
        disconnect_after: float | None = None,
        expect_status: int | None = 200,
        headers: HeaderInput = None,
        params: ParamInput = None,
        json: Any = None,
        content: bytes | str | None = None,
        timeout: float | None = None,
    ) -> list[ServerSentEvent]:
        """Request ``url`` and return its events; with ``max_events``, hang up after that many.

        Checks the status code (``expect_status=None`` to skip). Returns once the app has
        returned, so the stream's record is final.
        """
        async with self.stream(
            method,
            url,
            headers=headers,
            params=params,
            json=json,
            content=content,
            disconnect_after_events=max_events,
            disconnect_after=disconnect_after,
            timeout=timeout,
        ) as s:
            if expect_status is not None and s.status_code != expect_status:
                body = await s.read()
                raise AssertionError(
                    f"{method} {url}: expected status {expect_status}, got {s.status_code}: {body[:500]!r}"
                )
            return await s.collect()

    # -- lifespan ----------------------------------------------------------------------------
    async def _lifespan(self, tg: TaskGroup) -> None:
        to_app_tx, to_app_rx = anyio.create_memory_object_stream[Message](math.inf)
        from_app_tx, from_app_rx = anyio.create_memory_object_stream[Message](math.inf)
        self._to_app = to_app_tx
        self._from_app = from_app_rx
        scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}

        async def send(message: Message) -> None:
            from_app_tx.send_nowait(message)  # no checkpoint: like uvicorn, a reply is never lost to cancellation

        async def run() -> None:
            try:
                await self.app(scope, to_app_rx.receive, send)
            except BaseException as exc:
                self._lifespan_error = exc
                raise
            finally:
                from_app_tx.close()

        async def guarded() -> None:
            try:
                await run()
            except Exception:
                pass  # reported by the startup/shutdown wait

        tg.start_soon(guarded)
        await self._lifespan_step("startup")

    async def _lifespan_step(self, step: str) -> None:
        assert self._to_app is not None and self._from_app is not None
        await self._to_app.send({"type": f"lifespan.{step}"})
        with anyio.move_on_after(self.timeout) as scope:
            try:
                message = await self._from_app.receive()
            except anyio.EndOfStream:
                error = self._lifespan_error
                raise LifespanError(f"the app's lifespan {step} failed: {error!r}") from error
        if scope.cancelled_caught:
            raise LifespanError(f"the app's lifespan {step} did not finish within {self.timeout}s")
        if message["type"] == f"lifespan.{step}.failed":
            raise LifespanError(f"the app's lifespan {step} failed: {message.get('message', '')}")
        if message["type"] != f"lifespan.{step}.complete":
            raise LifespanError(f"unexpected lifespan message {message['type']!r}")


class _ClientContext(AbstractAsyncContextManager["SSEClient"]):
    def __init__(self, client: SSEClient, lifespan: bool) -> None:
        self.client = client
        self.lifespan = lifespan
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> SSEClient:
        if self.lifespan:
            tg = anyio.create_task_group()
            await tg.__aenter__()
            self._tg = tg
            try:
                await self.client._lifespan(tg)
            except BaseException:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
                self._tg = None
                raise
        return self.client

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        tg, self._tg = self._tg, None
        if tg is None:
            return
        error: BaseException | None = None
        try:
            await self.client._lifespan_step("shutdown")
        except BaseException as e:
            error = e
        tg.cancel_scope.deadline = anyio.current_time() + self.client.timeout
        if error is not None:
            tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)
        if error is not None and exc is None:
            raise error


def sse_client(
    app: ASGIApp,
    *,
    lifespan: bool = False,
    base_url: str = "http://testserver",
    headers: HeaderInput = None,
    timeout: float = DEFAULT_TIMEOUT,
    raise_app_exceptions: bool = True,
) -> _ClientContext:
    """An in-process client for ``app``: ``async with sse_client(app) as client: ...``.

    ``lifespan=True`` runs the app's startup on entry and its shutdown on exit (so
    middleware that opens and closes a recorder there does so). ``headers`` are sent with
    every request. ``timeout`` bounds every wait. ``raise_app_exceptions``: re-raise what
    the app raised when the request's block is left.
    """
    return _ClientContext(
        SSEClient(app, base_url=base_url, headers=headers, timeout=timeout, raise_app_exceptions=raise_app_exceptions),
        lifespan,
    )


#: The type of the ``sse_client`` pytest fixture (and of :func:`sse_client` itself).
SSEClientFactory = Callable[..., AbstractAsyncContextManager[SSEClient]]
