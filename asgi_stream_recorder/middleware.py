"""``StreamRecorderMiddleware``: makes event streams behave under real servers, proxies and shutdowns.

Mounted once around the app, it

* opens the recorder at lifespan startup, marks streams orphaned by a dead process as
  ``interrupted``, and at shutdown ends every open stream (``interrupted``, with a final
  event telling the client the server is going away), then drains the recorder;
* learns of a shutdown as soon as the process gets SIGTERM/SIGINT, by chaining the
  handler the server installed (and restoring it afterwards), so open streams end at once
  instead of holding the server until its graceful timeout;
* gives every ``text/event-stream`` response the headers that stop caching and proxy
  buffering, and hides ``Accept-Encoding`` from the app for requests that accept
  ``text/event-stream``, so compression middleware cannot buffer the stream;
* owns the background runs of ``on_disconnect="continue"`` streams (bounded in number);
* with ``record_all_sse=True``, records any event stream that passes through it, parsed
  from the bytes on the wire, with the same states and timings as decorated streams.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, Protocol

import anyio
import sniffio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import answer_lifespan
from .recorders import Recorder, default_recorder
from .recorders.base import is_orphan
from .response import SCOPE_KEY, SSE_HEADERS, going_away_event
from .session import Ending, StreamSession
from .sse import PING, SSEParser

__all__ = ["StreamRecorderMiddleware"]

log = logging.getLogger("asgi_stream_recorder")

_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None)) if s is not None)


class Stoppable(Protocol):
    """Something the middleware can end at shutdown: a decorated response or a wire tap."""

    def interrupt(self) -> None: ...


class RequestState:
    """What the middleware leaves in each HTTP scope under ``SCOPE_KEY``."""

    __slots__ = ("decorated", "middleware", "recorder")

    def __init__(self, middleware: StreamRecorderMiddleware, recorder: Recorder) -> None:
        self.middleware = middleware
        self.recorder = recorder
        self.decorated = False  # set by a RecordedStreamResponse, so the tap does not record twice


class StreamRecorderMiddleware:
    """Pure ASGI middleware; see the module docstring. Options:

    ``recorder``: the recorder (default: the process default SQLite file).
    ``record_all_sse``: also record undecorated ``text/event-stream`` responses.
    ``ping``: seconds of silence before an undecorated event stream gets a ``: ping``
    comment (decorated streams use their own ``ping``); None: never.
    ``on_disconnect``: for those recorded from the wire, ``"cancel"`` cancels the app when
    the client leaves (decorated streams use their own option).
    ``max_background``: how many ``on_disconnect="continue"`` streams may run on after
    their client left; past that they are cancelled (and recorded so).
    ``shutdown_timeout``: how long shutdown waits for streams to end and for the recorder
    to drain. ``recover``: mark orphans of dead local processes at startup.
    ``handle_signals``: chain SIGTERM/SIGINT to learn of a shutdown early.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        recorder: Recorder | None = None,
        record_all_sse: bool = False,
        ping: float | None = 15.0,
        on_disconnect: str = "cancel",
        max_background: int = 100,
        shutdown_timeout: float = 10.0,
        recover: bool = True,
        handle_signals: bool = True,
    ) -> None:
        if on_disconnect not in ("cancel", "continue"):
            raise ValueError(f"on_disconnect must be 'cancel' or 'continue', not {on_disconnect!r}")
        self.app = app
        self.recorder = recorder if recorder is not None else default_recorder()
        self.record_all_sse = record_all_sse
        if ping is not None and ping <= 0:
            raise ValueError(f"ping must be a positive number of seconds, or None, not {ping!r}")
        self.ping = ping
        self.on_disconnect = on_disconnect
        self.max_background = max_background
        self.shutdown_timeout = shutdown_timeout
        self.recover = recover
        self.handle_signals = handle_signals
        self.shutting_down = False
        self._active: set[Stoppable] = set()
        self._idle: anyio.Event | None = None
        self._background: anyio.abc.TaskGroup | None = None
        self._background_count = 0
        self._restore_signals: Callable[[], None] | None = None
        self._lifespan_seen = False  # a lifespan startup, or our stand-in for it, has run

    # -- ASGI ------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._lifespan_seen:
            await self._start_without_lifespan()
        state = RequestState(self, self.recorder)
        scope = {**scope, SCOPE_KEY: state}
        if _accepts_event_stream(scope):
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
        tap = _WireTap(self, state, scope, receive, send)
        await tap.run()

    # -- streams in flight -------------------------------------------------------------------
    def track(self, stream: Stoppable) -> None:
        self._active.add(stream)

    def untrack(self, stream: Stoppable) -> None:
        self._active.discard(stream)
        if not self._active and self._idle is not None:
            self._idle.set()

    @property
    def owns_background(self) -> bool:
        """True while the middleware has a task group for streams outliving their request
        (it runs the lifespan); otherwise such streams go on in their request's task."""
        return self._background is not None

    def reserve_background(self) -> bool:
        """Take a place for a stream to run on after its client left; False if there is none."""
        if self._background is None or self.shutting_down or self._background_count >= self.max_background:
            return False
        self._background_count += 1
        return True

    def release_background(self) -> None:
        self._background_count -= 1

    def run_background(self, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a reserved continuation in the middleware's task group; it owns the task."""
        assert self._background is not None

        async def owned() -> None:
            try:
                await run()
            finally:
                self.release_background()

        self._background.start_soon(owned)

    def begin_shutdown(self) -> None:
        """Stop accepting streams and end every open one now (each is recorded ``interrupted``)."""
        if not self.shutting_down:
            log.info("asgi_stream_recorder: shutting down, ending %d open streams", len(self._active))
        self.shutting_down = True
        for stream in list(self._active):
            stream.interrupt()

    # -- lifespan ---------------------------------------------------------------------------
    async def _start_without_lifespan(self) -> None:
        """First request of a server that runs no lifespan: do what startup would have, once
        (the recorder opens lazily and flushes per stream instead of at shutdown)."""
        self._lifespan_seen = True
        if self.handle_signals:
            self._restore_signals = _listen_for_signals(self, self.begin_shutdown)
        if self.recover:
            await self.recorder.ensure_open()
            await self.recorder.recover(is_orphan)

    async def _startup(self) -> None:
        self._lifespan_seen = True
        self.shutting_down = False
        await self.recorder.open()
        if self.recover:
            marked = await self.recorder.recover(is_orphan)
            if marked:
                log.warning("asgi_stream_recorder: marked %d streams of dead processes as interrupted", marked)
        if self.handle_signals:
            self._restore_signals = _listen_for_signals(self, self.begin_shutdown)

    async def _shutdown(self) -> None:
        if self._restore_signals is not None:
            self._restore_signals()
            self._restore_signals = None
        self.begin_shutdown()
        with anyio.move_on_after(self.shutdown_timeout):
            while self._active:
                self._idle = anyio.Event()
                await self._idle.wait()
        if self._active:
            log.error("asgi_stream_recorder: %d streams did not end within the shutdown timeout", len(self._active))
        with anyio.CancelScope(shield=True):  # drain even if the server is cancelling us
            await self.recorder.close(timeout=self.shutdown_timeout)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        phase = "before"

        async def lifespan_receive() -> Message:
            nonlocal phase
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._startup()
                phase = "started"
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                phase = "stopped"
            return message

        async with anyio.create_task_group() as background:
            self._background = background
            try:
                await self.app(scope, lifespan_receive, send)
            except Exception:
                if phase != "before":
                    raise
                # The app does not speak lifespan: speak it for our own part.
                await answer_lifespan(lifespan_receive, send)
            finally:
                if phase == "started":  # the app returned without a shutdown message
                    with anyio.CancelScope(shield=True):
                        await self._shutdown()
                self._background = None
                background.cancel_scope.cancel()


class _WireTap:
    """One HTTP request through the middleware: SSE headers, disconnect watch for
    undecorated event streams, and (``record_all_sse``) their recording from the wire."""

    def __init__(self, mw: StreamRecorderMiddleware, state: RequestState, scope: Scope, receive: Receive,
                 send: Send) -> None:
        self.mw, self.state, self.scope, self.receive, self.send = mw, state, scope, receive, send
        self.sse = False  # the response is an event stream
        self.watching = False  # ... an undecorated one: we watch for disconnects and may record it
        self.session: StreamSession | None = None
        self.parser: SSEParser | None = None
        self.client_gone = False
        self.interrupted = False
        self.ended = False
        self.scope_to_cancel: anyio.CancelScope | None = None
        self.disconnected: anyio.Event | None = None
        self.pending_messages: list[Message] = []
        self.tg: anyio.abc.TaskGroup | None = None
        self.last_send = time.monotonic()
        self.at_boundary = True  # the bytes sent so far end between events: a ping may go in

    def interrupt(self) -> None:
        self.interrupted = True
        if self.scope_to_cancel is not None:
            self.scope_to_cancel.cancel()

    async def run(self) -> None:
        ending, error = Ending.INTERRUPTED, None
        try:
            async with anyio.create_task_group() as tg:
                self.scope_to_cancel = tg.cancel_scope
                self.tg = tg
                try:
                    await self.mw.app(self.scope, self.app_receive, self.app_send)
                    ending = Ending.EXHAUSTED
                except Exception as exc:
                    if self.session is None:
                        raise
                    ending, error = Ending.RAISED, exc
                tg.cancel_scope.cancel()
            if self.interrupted:
                ending = Ending.INTERRUPTED
            elif self.client_gone and (ending is Ending.INTERRUPTED or not self.ended):
                ending = Ending.CLIENT_LEFT  # our watch cancelled the app, or it stopped early on its own
        finally:
            if self.watching:
                with anyio.CancelScope(shield=True):
                    await self.finish(ending, error)

    async def finish(self, ending: Ending, error: BaseException | None) -> None:
        self.mw.untrack(self)
        if self.session is not None:
            if self.parser is not None and ending is not Ending.EXHAUSTED:
                self.parser.feed(b"\n\n")  # an event cut off mid-way is not recorded (clients drop it too)
            self.session.end(ending, error)
            if not self.session.recorder.managed:
                with anyio.move_on_after(5):
                    await self.session.recorder.flush()
        if (self.interrupted or ending is Ending.INTERRUPTED) and not self.client_gone and not self.ended:
            with anyio.move_on_after(1):
                try:
                    sid = self.session.id if self.session is not None else ""
                    last = self.session.seq if self.session is not None else 0
                    await self.send({"type": "http.response.body", "body": going_away_event(sid, last),
                                     "more_body": False})
                except OSError:
                    pass

    # -- receive: one reader, so the app and our watch do not steal each other's messages --
    async def app_receive(self) -> Message:
        if not self.watching:
            message = await self.receive()
            if message["type"] == "http.disconnect":  # the app read it before its stream began
                self.client_left()
            return message
        if self.pending_messages:
            return self.pending_messages.pop(0)
        assert self.disconnected is not None
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
            self.pending_messages.append(message)
        self.client_left()

    def client_left(self) -> None:
        if self.client_gone:
            return
        self.client_gone = True
        if self.disconnected is not None:
            self.disconnected.set()  # the app may be waiting for it (Litestar waits after its last byte)
        if not self.watching or self.ended:  # after the last byte a hang-up is just the end
            return
        if self.session is not None:
            self.session.client_left()
        if self.mw.on_disconnect == "cancel" and self.scope_to_cancel is not None:
            self.scope_to_cancel.cancel()

    # -- send: headers on the start message, the tap on body messages ------------------------
    async def app_send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            message = self.start(message)
        elif self.watching:
            body = message.get("body", b"")
            if body:
                self.last_send = time.monotonic()
                self.at_boundary = body.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))
            if self.parser is not None:
                await self.tap(body)
            if not message.get("more_body", False):
                self.ended = True
            if self.client_gone:
                return
        try:
            await self.send(message)
        except OSError:
            if self.watching:
                self.client_left()
            raise

    def start(self, message: Message) -> Message:
        headers = list(message.get("headers", []))
        content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        if not content_type.lower().startswith(b"text/event-stream"):
            return message
        self.sse = True
        self.disconnected = anyio.Event()
        if self.client_gone:
            self.disconnected.set()
        names = {k.lower() for k, _ in headers}
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        for name, value in SSE_HEADERS.items():
            if name.encode() not in names:
                headers.append((name.encode(), value.encode()))
        if self.scope.get("http_version") == "1.1" and b"connection" not in names:
            headers.append((b"connection", b"keep-alive"))
        if not self.state.decorated:
            self.watching = True
            self.mw.track(self)
            assert self.tg is not None
            if not self.client_gone:
                self.tg.start_soon(self.watch)
            if self.mw.ping is not None:
                self.tg.start_soon(self.keepalive, self.mw.ping)
            if self.mw.record_all_sse:
                self.session = StreamSession(
                    self.state.recorder,
                    metadata={"recorded_from": "wire"},
                    path=self.scope.get("path"),
                    method=self.scope.get("method"),
                )
                self.parser = SSEParser()
                headers.append((b"x-stream-id", self.session.id.encode()))
                self.session.begin()
        return {**message, "headers": headers}

    async def keepalive(self, interval: float) -> None:
        """Ping an idle undecorated stream, only between events (never inside one)."""
        while not self.client_gone and not self.ended:
            idle = time.monotonic() - self.last_send
            if idle >= interval and self.at_boundary:
                with contextlib.suppress(OSError):
                    await self.send({"type": "http.response.body", "body": PING, "more_body": True})
                self.last_send, idle = time.monotonic(), 0.0
            await anyio.sleep(max(interval - idle, 0.01))

    async def tap(self, body: bytes) -> None:
        assert self.session is not None and self.parser is not None
        if not self.session.recorder.managed:
            await self.session.recorder.ensure_open()
        for event in self.parser.feed(body):
            await self.session.record(self.session.chunk(event.text or "", event.event))


def _accepts_event_stream(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"accept" and b"text/event-stream" in value:
            return True
    return False


# -- signals ----------------------------------------------------------------------------------
# One handler per process sits in front of the server's SIGTERM/SIGINT handler: it tells every
# listening middleware (on its own event loop), then calls the server's handler.
_listeners: dict[int, Callable[[], None]] = {}
_previous: dict[int, Any] = {}


def _on_signal(signum: int, frame: FrameType | None) -> None:
    for notify in list(_listeners.values()):
        notify()
    prior = _previous.get(signum)
    if callable(prior):
        prior(signum, frame)
    elif prior == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def _listen_for_signals(key: object, on_signal: Callable[[], None]) -> Callable[[], None] | None:
    """Call ``on_signal`` on this event loop at SIGTERM/SIGINT. Returns the undo (which puts the
    server's handler back once nobody listens), or None where signals cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return None
    for sig in _SIGNALS:
        if signal.getsignal(sig) is not _on_signal:  # (re)install in front of whatever is there now
            _previous[sig] = signal.signal(sig, _on_signal)
    _listeners[id(key)] = _loop_notifier(on_signal)

    def stop() -> None:
        _listeners.pop(id(key), None)
        if not _listeners:
            for sig, prior in list(_previous.items()):
                if signal.getsignal(sig) is _on_signal:
                    signal.signal(sig, prior)
            _previous.clear()

    return stop


def _loop_notifier(fn: Callable[[], None]) -> Callable[[], None]:
    """A thread- and signal-safe way to run ``fn`` on the current event loop."""
    if sniffio.current_async_library() == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()

        def notify_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):  # a listener left behind by a finished run
                token.run_sync_soon(fn)

        return notify_trio
    import asyncio

    loop = asyncio.get_running_loop()

    def notify_asyncio() -> None:
        with contextlib.suppress(RuntimeError):  # a listener left behind by a closed loop
            loop.call_soon_threadsafe(fn)

    return notify_asyncio
