"""``StreamDriver``: one event stream, from its first byte to its end, in one task.

Both kinds of recorded stream use it: a decorated generator (:meth:`StreamDriver.stream`
pumps its items) and an undecorated SSE response recorded from the wire by the middleware
(:mod:`~asgi_stream_recorder.wiretap` feeds it the app's bytes). The driver owns what
they share:

* the client's leaving, noticed once, by the disconnect watch or by a failed ``send``;
  with ``on_disconnect="continue"`` the stream goes on (in the same task: a generator is
  never resumed in another one), taking one of the host's background places, released once;
* one watch task per stream, which reads ``receive`` for the disconnect and sends the
  keep-alive comments of an idle stream;
* the interruption by a shutdown (:meth:`interrupt`);
* the facts of how the stream stopped (an error, the end of the source, the client, or
  anything else), handed to :func:`~asgi_stream_recorder.session.decide_status`;
* the last word to the client: the format's end, error or shutdown event.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio
import anyio.lowlevel
from starlette.types import Message, Receive, Send

from .formats import SSE, WireFormat
from .recorders.base import Chunk, StreamStatus
from .recorders.buffered import RecorderError
from .recorders.live import Follow
from .session import StreamSession, decide_status
from .sse import ServerSentEvent, encode, encode_data, to_text

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["SCOPE_KEY", "Host", "OnDisconnect", "StreamDriver", "StreamOptions", "unwrap_group"]

log = logging.getLogger("asgi_stream_recorder")

OnDisconnect = Literal["cancel", "continue"]

#: Where the middleware leaves its state in the ASGI scope (its recorder, its shutdown) for
#: responses, joins and the streams app to find.
SCOPE_KEY = "asgi_stream_recorder"

_CLOSE_TIMEOUT = 5.0  # how long a source's cleanup (its finally blocks) may take
_LAST_WORD_TIMEOUT = 1.0  # how long the final event may take to send


class Host(Protocol):
    """What the middleware offers a stream: shutdown, and bounded background places."""

    shutting_down: bool

    def track(self, stream: StreamDriver) -> None: ...

    def untrack(self, stream: StreamDriver) -> None: ...

    def reserve_background(self) -> bool: ...

    def release_background(self) -> None: ...


class _UnwrapGroup:
    """The context manager :func:`unwrap_group` returns: stateless, so one serves every stream
    (a generator-based one would cost each open stream a generator and its frame)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is None or not isinstance(exc, BaseExceptionGroup):
            return False  # nothing, or a plain error: it goes on as it is
        inner: BaseException = exc
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is exc:
            return False
        raise inner from exc.__cause__


_UNWRAP_GROUP = _UnwrapGroup()


def unwrap_group() -> _UnwrapGroup:
    """Re-raise a task group's lone error as itself, so callers (and outer middleware such as
    Sentry's) see the exception that happened, not an ``ExceptionGroup`` around it."""
    return _UNWRAP_GROUP


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """What a decorated stream may add to the driving (each None: off).

    ``timeout``: seconds the whole stream may take; ``idle_timeout``: seconds without an item
    (the first included). Either one fires: the source is cancelled wherever it waits (a
    network read too) and closed, the stream ``failed`` with a ``TimeoutError`` saying which.
    ``coalesce``: seconds; text items arriving within a window go out as one event (its id the
    last seq in it), at most one event per window, the first item after a quiet window at
    once; the record keeps every item with its own seq and time. ``progress``: seconds between
    ``event: progress`` events (counts so far; sent, never recorded, never numbered).
    ``fallback``: makes a second source, used if the first fails before its first item.
    """

    timeout: float | None = None
    idle_timeout: float | None = None
    coalesce: float | None = None
    progress: float | None = None
    fallback: Callable[[], AsyncIterator[Any]] | None = None


_NO_OPTIONS = StreamOptions()


class StreamDriver:
    """Drives one stream for one client; see the module docstring."""

    # One per open stream: slots keep it small (an idle stream is mostly its objects).
    __slots__ = (
        "session", "_receive", "_send", "host", "format", "ping", "continues", "error", "exhausted",
        "stopped_for_client", "stopped_by_request", "interrupted", "client_gone", "started", "ended", "at_boundary",
        "status", "_reserved", "_scope", "_last_send", "forward", "preamble", "options", "_source", "_pending",
        "_more", "_sending",
    )

    def __init__(
        self,
        session: StreamSession | None,
        receive: Receive,
        send: Send,
        *,
        host: Host | None = None,
        format: WireFormat = SSE,
        ping: float | None = 15.0,
        on_disconnect: OnDisconnect = "cancel",
        options: StreamOptions | None = None,
    ) -> None:
        self.session = session
        self._receive = receive
        self._send = send
        self.host = host
        self.format = format
        self.ping = ping
        self.continues = on_disconnect == "continue"
        # the facts of how it stopped, set once each
        self.error: BaseException | None = None
        self.exhausted = False
        self.stopped_for_client = False
        self.stopped_by_request = False
        self.interrupted = False
        self.client_gone = False
        self.started = False  # the response's start message went out
        self.ended = False  # the last body message went out
        self.at_boundary = True  # the bytes sent so far end between events (a ping may go in)
        self.status: StreamStatus | None = None
        self._reserved = False
        self._scope: anyio.CancelScope | None = None
        self._last_send = time.perf_counter()
        #: receive messages the watch read that belong to the app (wire recording only)
        self.forward: Callable[[Message], None] | None = None
        #: bytes sent right after the start (a resumable stream's retry hint)
        self.preamble = b""
        self.options = options or _NO_OPTIONS
        self._source: AsyncIterator[Any] | None = None  # the source pumped now (a fallback's, once used)
        #: coalesced, not yet sent (None until the first: most streams never coalesce)
        self._pending: list[tuple[int, str, str | None] | bytes] | None = None
        self._more: anyio.Event | None = None  # set when something is pending
        self._sending: anyio.Lock | None = None  # (made when first needed: most streams never coalesce)

    # -- facts --------------------------------------------------------------------------
    def attach(self, scope: anyio.CancelScope) -> None:
        """The cancel scope around the producer, cancelled when the stream must stop."""
        self._scope = scope
        if self.interrupted or self.stopped_for_client or self.stopped_by_request:
            scope.cancel()

    def _stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def client_left(self) -> None:
        """The client is gone (noticed by the watch or a failed send). Idempotent."""
        if self.client_gone:
            return
        self.client_gone = True
        if self.ended:  # after the last byte a hang-up is just the end
            return
        if self.session is not None:
            self.session.client_left()
        if self.continues:
            if self.host is None:  # no middleware: nothing bounds it
                return
            if self.host.reserve_background():
                self._reserved = True
                return
            self.continues = False
            if self.session is not None:
                self.session.metadata["continue_refused"] = "no room for background streams, or shutting down"
        if not self.interrupted:
            self.stopped_for_client = True
        self._stop()

    def interrupt(self) -> None:
        """End the stream now because the server is going away (``interrupted``)."""
        if not (self.stopped_for_client or self.stopped_by_request):
            self.interrupted = True
        self._stop()

    def request_stop(self) -> None:
        """End the stream now because someone asked to (``cancelled``, ``cancelled_by="request"``)."""
        if not (self.stopped_for_client or self.interrupted):
            self.stopped_by_request = True
        self._stop()

    def fail(self, exc: BaseException, what: str) -> None:
        """Note an error that ends the stream (the first one counts) and log it once."""
        if self.error is None:
            self.error = exc
            sid = self.session.id if self.session is not None else "(unrecorded)"
            log.error("stream %s failed: %s: %s", sid, what, exc, exc_info=exc)

    # -- sending ------------------------------------------------------------------------------
    async def start(self, message: Message) -> None:
        """Send the response's start; a client already gone is noted."""
        self.started = True
        try:
            await self._send(message)
        except OSError:
            self.client_left()

    async def send_body(self, body: bytes) -> None:
        """Send bytes mid-stream if the client is there; a client that left is noted."""
        if self.client_gone:
            return
        self._last_send = time.perf_counter()
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
        except OSError:
            self.client_left()

    async def watch(self) -> None:
        """Read ``receive`` until the client leaves; keep an idle stream alive with pings, and
        send progress events when asked to."""
        ping, receive, progress = self.ping, self._receive, self.options.progress
        next_progress = anyio.current_time() + progress if progress is not None else math.inf
        while not self.client_gone:
            message: Message | None = None
            wait = next_progress - anyio.current_time()
            if wait <= 0:
                next_progress += progress or 0.0
                if self.at_boundary and not self.ended:
                    await self.send_body(self._progress_event())
                continue
            if ping is not None:
                idle = time.perf_counter() - self._last_send
                if self.session is not None:
                    idle = min(idle, self.session.idle_seconds())
                if idle >= ping:
                    if self.at_boundary and not self.ended:
                        await self.send_body(self.format.ping)
                        continue
                    idle = ping * 0.75  # mid-event: look again soon
                wait = min(wait, ping - idle)
            if wait == math.inf:
                message = await receive()
            else:
                with anyio.move_on_after(wait):
                    message = await receive()
                if message is None:
                    continue
            if message["type"] == "http.disconnect":
                break
            if self.forward is not None:
                self.forward(message)
        self.client_left()

    def _progress_event(self) -> bytes:
        session = self.session
        assert session is not None
        elapsed, chars = session.elapsed_ms(), session.char_count
        rate = round(chars / elapsed * 1000.0, 1) if elapsed > 0 else 0.0
        return encode(ServerSentEvent({"chunks": session.count, "chars": chars, "elapsed_ms": round(elapsed, 1),
                                       "chars_per_s": rate}, event="progress"))

    async def _timer(self) -> None:
        """End the stream when it runs past ``timeout``, or goes ``idle_timeout`` without an item."""
        timeout, idle_timeout, session = self.options.timeout, self.options.idle_timeout, self.session
        assert session is not None
        deadline = anyio.current_time() + timeout if timeout is not None else math.inf
        while True:
            wait = deadline - anyio.current_time()
            if wait <= 0:
                return self._time_out(f"the stream ran past its timeout of {timeout:g} s")
            if idle_timeout is not None:
                idle_left = idle_timeout - session.idle_seconds()
                if idle_left <= 0:
                    return self._time_out(f"no token for {idle_timeout:g} s")
                wait = min(wait, idle_left)
            await anyio.sleep(wait)

    def _time_out(self, why: str) -> None:
        if self.error is not None or self.exhausted:
            return
        self.error = TimeoutError(why)
        log.warning("stream %s: %s: stopping it", self.session.id if self.session else "(unrecorded)", why)
        self._stop()

    # -- a decorated generator ------------------------------------------------------------
    async def stream(self, start: Message, source: AsyncIterator[Any], event: str | None) -> None:
        """Run a decorated stream: the start, the items, the end. Returns when the stream is
        over for the client (and over entirely: a ``continue`` stream finishes first)."""
        assert self.session is not None
        if self.host is not None:
            self.host.track(self)
        if self.session.live is not None:
            self.session.live.on_cancel = self.request_stop
        try:
            await self.start(start)
            if self.preamble:
                await self.send_body(self.preamble)
            if not self.client_gone or self.continues:
                with unwrap_group():
                    async with anyio.create_task_group() as tg:
                        self.attach(tg.cancel_scope)
                        if not self.client_gone:
                            tg.start_soon(self.watch)
                        if self.options.timeout is not None or self.options.idle_timeout is not None:
                            tg.start_soon(self._timer)
                        if self.options.coalesce is not None:
                            tg.start_soon(self._send_coalesced)
                        await self._pump(source, event)
                        await self._send_pending()  # what the last window still holds
                        tg.cancel_scope.cancel()
        except Exception as exc:  # our own machinery failed (not the source: _pump keeps those)
            self.fail(exc, "the stream's machinery raised")
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await _close(self._source or source)
                await self.finish()

    async def _pump(self, source: AsyncIterator[Any], default_event: str | None) -> None:
        """Move items from the source to the client and the record until one side stops."""
        session = self.session
        assert session is not None
        send = self._send
        wire = self.format
        custom_wire = type(wire) is not WireFormat
        record_nowait = session.record_nowait
        prefix = session.id_prefix
        coalesce = self.options.coalesce is not None
        self._source = source
        next_item = source.__anext__
        # The session's numbering, timing and queueing, inlined for the common case: a Python
        # call per event is a large share of its cost (see bench/instructions.py). The same
        # steps as session.stamp() and session.record_nowait(), which the other paths use.
        perf_counter, t0, followers = time.perf_counter, session._t0, session._followers
        put, sid, text_event, keep_text = session._put, session.id, session.text_event, session._text.append
        while True:
            if self.client_gone and not self.continues:  # seen by the watch (a busy source may not yield to it)
                return
            try:
                item = await next_item()
            except StopAsyncIteration:
                self.exhausted = True
                return
            except Exception as exc:
                fallback = self.options.fallback
                if fallback is None or session.seq or source is not self._source:
                    self.fail(exc, "its source raised")
                    return
                # failed before its first item: the fallback answers instead (never spliced after one)
                log.warning("stream %s: its source failed before its first item (%r): using the fallback",
                            session.id, exc)
                session.metadata["fallback"] = f"{type(exc).__name__}: {exc}"
                await _close(source)
                try:
                    self._source = fallback()
                    next_item = aiter(self._source).__anext__
                except Exception as exc2:
                    self.fail(exc2, "its fallback could not start")
                    return
                continue
            try:
                cls = type(item)
                if cls is str:
                    text, event, extra = item, default_event, None
                elif cls is ServerSentEvent:
                    if item.id is not None:
                        raise ValueError(
                            "ServerSentEvent.id is assigned by the recorder (it is the chunk's seq, "
                            "used for Last-Event-ID resume): leave it None"
                        )
                    if item.text is None:  # a comment or retry hint: sent, not recorded
                        if coalesce:
                            self._queue_send(encode(item))
                        else:
                            await self.send_body(encode(item))
                        continue
                    text, event = item.text, item.event or default_event
                    extra = item if item.retry is not None or item.comment is not None else None
                else:
                    text, event, extra = _item_text(item), default_event, None
                session.seq = seq = session.seq + 1
                session._last_at = at = perf_counter()
                session._at_ms = at_ms = (at - t0) * 1000.0
                if seq == 1:
                    session.ttft_ms = at_ms
                if self.client_gone:
                    text.encode()  # what the client could not have been sent is not recorded either
                elif coalesce and extra is None:
                    text.encode()  # (a lone surrogate fails here, as it would when sent)
                    self._queue_send((seq, text, event))
                else:
                    if coalesce:
                        await self._send_pending()  # keep the order
                    if custom_wire or extra is not None:
                        body = wire.chunk(session, Chunk(session.id, seq, text, event, 0.0), extra)
                    elif event is None and "\n" not in text and "\r" not in text:  # the common token: inline
                        body = f"id: {prefix}{seq}\ndata: {text}\n\n".encode()
                    else:
                        body = encode_data(text, f"{prefix}{seq}", event)
                    try:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    except OSError:
                        self.client_left()
                        if not self.continues:
                            return
            except Exception as exc:
                self.fail(exc, "an item could not be sent")
                return
            if not followers and put(sid, seq, text, event, at_ms):
                session.count += 1
                session.char_count += len(text)
                if event == text_event:
                    keep_text(text)
            elif not record_nowait(text, event):
                await session.record_waiting(text, event)
            if not seq & 31:  # a source and a send that never suspend would starve the loop
                await anyio.lowlevel.checkpoint()

    # -- coalescing ----------------------------------------------------------------------------
    def _queue_send(self, entry: tuple[int, str, str | None] | bytes) -> None:
        if self._pending is None:
            self._pending = [entry]
        else:
            self._pending.append(entry)
        if self._more is not None:
            self._more.set()

    async def _send_coalesced(self) -> None:
        """Send what the pump queued: at once after a quiet window, else at the window's end."""
        window = self.options.coalesce or 0.0
        last = -math.inf
        while not self.client_gone:
            if not self._pending:
                self._more = anyio.Event()
                await self._more.wait()
                self._more = None
            wait = last + window - anyio.current_time()
            if wait > 0:
                await anyio.sleep(wait)
            last = anyio.current_time()
            await self._send_pending()

    async def _send_pending(self) -> None:
        """One event per run of text items (their texts joined, the id the run's last seq);
        other entries as they are."""
        if not self._pending:
            return
        if self._sending is None:
            self._sending = anyio.Lock()
        async with self._sending:  # the flusher and the pump's last call: one after the other
            pending, self._pending = self._pending, None
            if pending and self.session is not None:
                await self.send_body(self._coalesced(pending, self.session))

    def _coalesced(self, pending: list[tuple[int, str, str | None] | bytes], session: StreamSession) -> bytes:
        out: list[bytes] = []
        run: list[str] = []
        last = 0
        for entry in [*pending, b""]:  # (a final marker ends the last run)
            if isinstance(entry, tuple) and entry[2] == session.text_event:
                last = entry[0]
                run.append(entry[1])
                continue
            if run:
                out.append(self.format.chunk(session, Chunk(session.id, last, "".join(run), session.text_event, 0.0),
                                             None))
                run = []
            if isinstance(entry, tuple):
                out.append(self.format.chunk(session, Chunk(session.id, entry[0], entry[1], entry[2], 0.0), None))
            elif entry:
                out.append(entry)
        return b"".join(out)

    # -- a followed stream (a join) ----------------------------------------------------------
    async def relay(self, start: Message, follow: Follow, view: StreamSession) -> None:
        """Send a followed stream to this client: what is stored, then live, then the stream's
        own last word (done, error, shutdown). ``view`` is the stream as its format sees it."""
        if self.host is not None:
            self.host.track(self)
        try:
            await self.start(start)
            if not self.client_gone:
                with unwrap_group():
                    async with anyio.create_task_group() as tg:
                        self.attach(tg.cancel_scope)
                        tg.start_soon(self.watch)
                        await self._relay(follow, view)
                        tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    if self.started and not self.client_gone and not self.ended:
                        await self._relay_end(follow, view)
                finally:
                    if self.host is not None:
                        self.host.untrack(self)

    async def _relay(self, follow: Follow, view: StreamSession) -> None:
        wire, send = self.format, self._send
        try:
            async for chunk in follow:
                view.seq = chunk.seq
                body = wire.chunk(view, chunk, None)
                if not body:
                    continue
                self._last_send = time.perf_counter()
                try:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                except OSError:
                    self.client_left()
                    return
        except Exception as exc:
            self.fail(exc, "following it failed")
            return
        self.exhausted = True

    async def _relay_end(self, follow: Follow, view: StreamSession) -> None:
        wire = self.format
        if self.exhausted and follow.status is not None:
            view.status = follow.status
            view.error = follow.error
            record = follow.record
            if record is None:  # followed here from memory: its final metadata is queued, write it
                await view.recorder.settle(view.id)
                record = await view.recorder.get(view.id)
            if record is not None:
                view.metadata = record.metadata
            if view.status is StreamStatus.FAILED:
                body = wire.error(view)
            elif view.status is StreamStatus.INTERRUPTED:
                body = wire.shutdown(view)
            else:
                body = wire.end(view)
        elif self.interrupted:
            body = wire.shutdown(view)
        else:
            body = wire.error(view) if self.error is not None else b""
        self.ended = True
        with anyio.move_on_after(_LAST_WORD_TIMEOUT):
            try:
                await self._send({"type": "http.response.body", "body": body, "more_body": False})
            except OSError:
                pass

    # -- the end ---------------------------------------------------------------------------
    async def finish(self) -> StreamStatus:
        """Decide the status, queue the record's end, say the last word, release what was held.
        Call once, shielded."""
        session = self.session
        if session is not None:
            status = session.end(error=self.error, exhausted=self.exhausted, stopped_for_client=self.stopped_for_client,
                                 stopped_by_request=self.stopped_by_request)
        else:
            status = decide_status(error=self.error, exhausted=self.exhausted,
                                   stopped_for_client=self.stopped_for_client,
                                   stopped_by_request=self.stopped_by_request)
        self.status = status
        try:
            if self.started and not self.client_gone and not self.ended:
                await self._last_word(status)
        finally:
            if self.host is not None:
                self.host.untrack(self)
                if self._reserved:
                    self._reserved = False
                    self.host.release_background()
            if session is not None and not session.recorder.managed:
                # nobody will close this recorder: make the stream durable now
                try:
                    await session.recorder.flush(timeout=_CLOSE_TIMEOUT)
                except RecorderError as exc:
                    log.error("stream %s: its record could not be written: %s", session.id, exc)
        return status

    async def _last_word(self, status: StreamStatus) -> None:
        wire, session = self.format, self.session
        body = b""
        try:
            if status is StreamStatus.FAILED:
                body = wire.error(session) if session is not None else _ERROR_UNRECORDED
            elif status is StreamStatus.COMPLETED or self.stopped_by_request:
                if session is None:
                    return  # an undecorated app ended its own body
                body = wire.end(session)
            elif status is StreamStatus.INTERRUPTED:
                body = wire.shutdown(session) if session is not None else SHUTDOWN_UNRECORDED
        except Exception as exc:  # a custom format failing at the end: the status stands, say it
            log.error("the stream's wire format failed to write its last event: %r", exc)
            body = b""
        self.ended = True
        with anyio.move_on_after(_LAST_WORD_TIMEOUT):
            try:
                await self._send({"type": "http.response.body", "body": body, "more_body": False})
            except OSError:
                pass


_ERROR_UNRECORDED = encode(ServerSentEvent({"message": "stream failed"}, event="error"))
SHUTDOWN_UNRECORDED = encode(ServerSentEvent({"message": "server shutting down"}, event="shutdown", retry=1000))


async def _close(source: AsyncIterator[Any]) -> None:
    """Run the source's cleanup (its ``finally`` blocks), bounded."""
    aclose = getattr(source, "aclose", None)
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
    """Text of a yielded item other than str/ServerSentEvent (the str case is inlined)."""
    if isinstance(item, (str, bytes, bytearray, memoryview, dict, list)):
        return to_text(item)
    raise TypeError(
        f"a recorded stream cannot send an item of type {type(item).__module__}.{type(item).__qualname__}: "
        "yield str, bytes, dict, list or ServerSentEvent"
    )
