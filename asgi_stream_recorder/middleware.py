"""``StreamRecorderMiddleware``: makes event streams behave under real servers, proxies and shutdowns.

Mounted once around the app, it

* opens the recorder at lifespan startup, marks streams orphaned by a dead process as
  ``interrupted``, and at shutdown ends every open stream (``interrupted``, with a final
  event telling the client the server is going away), then drains the recorder;
* learns of a shutdown as soon as the process gets SIGTERM/SIGINT, or, in a hypercorn
  worker, as soon as hypercorn's parent tells it to stop (see :mod:`.signals`), so open
  streams end at once instead of holding the server until its graceful timeout;
* gives every ``text/event-stream`` response the headers that stop caching and proxy
  buffering, and hides ``Accept-Encoding`` from the app for requests that accept
  ``text/event-stream``, so compression middleware cannot buffer the stream;
* bounds how many ``on_disconnect="continue"`` streams may run on after their client
  left (each goes on in its own request's task: a generator never changes task);
* with ``record_all_sse=True``, records any event stream that passes through it, parsed
  from the bytes on the wire, with the same states and timings as decorated streams.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import answer_lifespan
from .manual import Interruptible
from .recorders import Recorder, default_recorder
from .recorders.buffered import RecorderError
from .response import SCOPE_KEY
from .signals import listen_for_shutdown
from .wiretap import WireTap

__all__ = ["StreamRecorderMiddleware"]

log = logging.getLogger("asgi_stream_recorder")



class RequestState:
    """What the middleware leaves in each HTTP scope under ``SCOPE_KEY``."""

    __slots__ = ("decorated", "middleware", "receive", "recorder")

    def __init__(self, middleware: StreamRecorderMiddleware, recorder: Recorder, receive: Receive) -> None:
        self.middleware = middleware
        self.recorder = recorder
        #: the request's ``receive`` as the server gave it: where a pulled stream hears its
        #: client leave when the framework no longer listens (Django 4.2, see :mod:`.pull`)
        self.receive = receive
        #: set by a response this library drives itself (a decorated stream, a join), so the
        #: middleware's wire tap neither watches nor records it a second time
        self.decorated = False


class _StartupFailed(Exception):
    """Our part of the lifespan startup failed; the server has been told."""


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
    ``shutdown_timeout``: the deadline of the whole shutdown: ending the streams, then
    draining the recorder (what cannot be written by then is logged as lost).
    ``recover``: at startup, end streams whose process's lease ran out (see ``Recorder(lease=)``).
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
        self._active: set[Interruptible] = set()  # drivers, and manual streams of our recorder
        self._idle: anyio.Event | None = None
        self._tasks: anyio.abc.TaskGroup | None = None  # ours while the lifespan runs
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
        state = RequestState(self, self.recorder, receive)
        scope = {**scope, SCOPE_KEY: state}
        if _accepts_event_stream(scope):
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
        tap = WireTap(self, state, scope, receive, send, recorder=self.recorder if self.record_all_sse else None,
                      ping=self.ping, on_disconnect=self.on_disconnect,  # type: ignore[arg-type]
                      spawn=self._spawn if self._tasks is not None else None)
        await tap.run(self.app)

    # -- streams in flight -------------------------------------------------------------------
    def track(self, stream: Interruptible) -> None:
        self._active.add(stream)

    def untrack(self, stream: Interruptible) -> None:
        self._active.discard(stream)
        if not self._active and self._idle is not None:
            self._idle.set()

    def reserve_background(self) -> bool:
        """Take a place for a stream to run on after its client left; False if there is none."""
        if self.shutting_down or self._background_count >= self.max_background:
            return False
        self._background_count += 1
        return True

    def release_background(self) -> None:
        """Give back a place taken by :meth:`reserve_background` (each stream does, once)."""
        self._background_count -= 1

    @property
    def background_streams(self) -> int:
        """How many streams run on now after their client left."""
        return self._background_count

    def _spawn(self, run: Callable[[], Awaitable[None]]) -> None:
        """Run a task of a request (its stream's watch) in our task group; the request cancels it."""
        assert self._tasks is not None

        async def owned() -> None:
            try:
                await run()
            except Exception:
                log.exception("asgi_stream_recorder: a stream's watch task failed")

        self._tasks.start_soon(owned)

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
            self._restore_signals = listen_for_shutdown(self, self.begin_shutdown)
        if self.recover:
            await self.recorder.ensure_open()
            await self.recorder.recover()

    async def _startup(self) -> None:
        self._lifespan_seen = True
        self.shutting_down = False
        await self.recorder.open()
        if self.recover:
            await self.recorder.recover()
        if self.handle_signals:
            self._restore_signals = listen_for_shutdown(self, self.begin_shutdown)
        self.recorder.host = self  # manual streams (recorder.stream()) register for our shutdown

    async def _shutdown(self) -> None:
        """End every stream, then drain the recorder: all within ``shutdown_timeout``."""
        deadline = anyio.current_time() + self.shutdown_timeout
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
            try:
                await self.recorder.close(timeout=max(deadline - anyio.current_time(), 0.1))
            except RecorderError as exc:
                log.error("asgi_stream_recorder: %s", exc)
            finally:
                if self.recorder.host is self:
                    self.recorder.host = None

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        phase = "before"

        async def lifespan_receive() -> Message:
            nonlocal phase
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._startup()
                except Exception as exc:
                    text = f"asgi_stream_recorder: cannot start the recorder {self.recorder!r}: {exc}"
                    log.error("%s", text)
                    phase = "failed"
                    await send({"type": "lifespan.startup.failed", "message": text})
                    raise _StartupFailed(text) from exc
                phase = "started"
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                phase = "stopped"
            return message

        async def lifespan_send(message: Message) -> None:
            if phase != "failed":  # the server was told already; the app's own reply would confuse it
                await send(message)

        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            try:
                await self.app(scope, lifespan_receive, lifespan_send)
            except Exception:
                if phase == "failed":
                    return
                if phase != "before":
                    raise
                # The app does not speak lifespan: speak it for our own part.
                try:
                    await answer_lifespan(lifespan_receive, lifespan_send)
                except _StartupFailed:
                    return
            finally:
                if phase == "started":  # the app returned without a shutdown message
                    with anyio.CancelScope(shield=True):
                        await self._shutdown()
                self._tasks = None
                tasks.cancel_scope.cancel()


def _accepts_event_stream(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"accept" and b"text/event-stream" in value:
            return True
    return False
