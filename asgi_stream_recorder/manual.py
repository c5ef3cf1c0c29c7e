"""Recording a stream by hand: ``async with recorder.stream(...) as s: await s.append(text)``.

For what produces a stream outside a decorated endpoint: a voice transcription arriving over
a websocket, a background job, a queue worker, a script with no web framework at all. A
:class:`ManualStream` drives the same :class:`~asgi_stream_recorder.session.StreamSession`
as a decorated stream, so its record, its metadata (``ttft_ms``, ``duration_ms``,
``chunk_count``, ``char_count``), its live followers (``recorder.follow``, ``streams_app``)
and the rule that decides its status are the same. How it ends:

* leaving the block normally: ``completed``; with an exception: ``failed`` (the error stored
  as ``"Type: message"``, the exception re-raised); cancelled (or any other ``BaseException``):
  ``interrupted``;
* ``await s.complete(**metadata)``, ``await s.fail(error, **metadata)`` or
  ``await s.cancel(**metadata)`` end it early, the keyword metadata merged into the record;
* a cancel request from elsewhere (``recorder.cancel(id)``, ``POST /streams/{id}/cancel``)
  ends it at once as ``cancelled`` (``metadata["cancelled_by"] = "request"``), and a
  shutdown of the :class:`~asgi_stream_recorder.StreamRecorderMiddleware` running with this
  recorder ends it at once as ``interrupted``. The producer's code is not interrupted: its
  next :meth:`~ManualStream.append` raises :class:`StreamEnded`, and ``s.ended`` /
  ``s.status`` say so to a producer that checks.

The first end counts; once ended, leaving the block or ending again changes nothing (the
end methods then just return the status).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.lowlevel

from .recorders.base import StreamStatus
from .recorders.buffered import RecorderError
from .session import StreamSession, _current, new_stream_id
from .sse import ServerSentEvent, to_text

if TYPE_CHECKING:
    from .recorders.recorder import Recorder

__all__ = ["Interruptible", "ManualStream", "StreamEnded", "StreamHost"]

log = logging.getLogger("asgi_stream_recorder")

_FLUSH_TIMEOUT = 5.0  # an unmanaged recorder: how long the end may take to become durable


class StreamEnded(RuntimeError):
    """:meth:`ManualStream.append` on a stream that has ended (by its producer, a cancel
    request or a shutdown): nothing was recorded."""


class Interruptible(Protocol):
    """A running stream a shutdown can end (a driver, a manual stream)."""

    def interrupt(self) -> None: ...


class StreamHost(Protocol):
    """What runs with a recorder and ends its streams at shutdown (the middleware, during its
    lifespan, as ``recorder.host``)."""

    shutting_down: bool

    def track(self, stream: Interruptible) -> None: ...

    def untrack(self, stream: Interruptible) -> None: ...


class ManualStream:
    """One stream recorded by hand; see the module docstring. Made by :meth:`Recorder.stream`.

    ``metadata``: stored with the stream (``s.metadata`` may be added to until it ends).
    ``key``: stored with it to find it again (a conversation id). ``text_event``: the event
    name of plain items, and of the chunks that make up the record's ``content``.
    ``id``: the stream's id (default: a new random one); ``s.id`` is known before the block.
    """

    def __init__(
        self,
        recorder: Recorder,
        *,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
        text_event: str | None = None,
        id: str | None = None,
    ) -> None:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping, not {type(metadata).__name__}")
        if key is not None and not isinstance(key, str):
            raise TypeError(f"a stream's key must be a str or None, not {type(key).__name__}")
        if text_event is not None:
            ServerSentEvent(event=text_event)  # raises on a name that is not one line
        if id is not None and (not isinstance(id, str) or not id or not id.isprintable() or "/" in id):
            raise ValueError(f"a stream id must be a non-empty printable str without '/', not {id!r}")
        self.recorder = recorder
        self.id: str = id or new_stream_id()
        self._chosen_id = id is not None
        self.key = key
        self.text_event = text_event
        #: stored with the stream's end; the same dict before, during and after the block
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._session: StreamSession | None = None
        self._host: StreamHost | None = None
        self._token: Any = None  # the current_stream() we set in the producer's context

    def __repr__(self) -> str:
        status = "new" if self.status is None else self.status.value
        return f"<ManualStream {self.id} {status} seq={self.seq}>"

    # -- state -----------------------------------------------------------------------------------
    @property
    def status(self) -> StreamStatus | None:
        """``streaming`` inside the block until it ends, then how it ended; None before the block."""
        return None if self._session is None else self._session.status

    @property
    def seq(self) -> int:
        """The seq of the last chunk appended (0: none yet)."""
        return 0 if self._session is None else self._session.seq

    @property
    def error(self) -> str | None:
        """The stored error of a failed stream."""
        return None if self._session is None else self._session.error

    @property
    def ended(self) -> bool:
        """Whether the stream has ended (by any means); :meth:`append` then raises."""
        return self._session is not None and self._session.status is not StreamStatus.STREAMING

    @property
    def cancelled(self) -> bool:
        """Whether it ended ``cancelled`` (by :meth:`cancel` or a cancel request from elsewhere)."""
        return self.status is StreamStatus.CANCELLED

    # -- the block --------------------------------------------------------------------------------
    async def __aenter__(self) -> ManualStream:
        if self._session is not None:
            raise RuntimeError(f"stream {self.id} was already started: a ManualStream runs once")
        recorder = self.recorder
        host = recorder.host
        if host is not None and host.shutting_down:
            raise RuntimeError(f"cannot start stream {self.id}: the server is shutting down")
        await recorder.ensure_open()
        if self._chosen_id:
            if self.id in recorder.live.streams or await recorder.get_soon(self.id, timeout=0) is not None:
                raise ValueError(f"a stream with id {self.id!r} exists already")
        session = StreamSession(recorder, id=self.id, metadata=self.metadata, key=self.key, format="sse",
                                text_event=self.text_event)
        session.metadata = self.metadata  # the user's dict itself, not a copy
        session.begin()
        # current_stream() is ours to restore, in this context: an end from another task (a cancel
        # request, a shutdown) must not touch that task's current stream.
        self._token, session._token = session._token, None
        self._session = session
        assert session.live is not None
        session.live.on_cancel = self._cancel_requested
        if host is not None:
            host.track(self)
            self._host = host
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session = self._session
        assert session is not None
        if exc is None:
            self._end(exhausted=True)
        elif isinstance(exc, Exception):
            self._end(error=exc)
        else:  # cancelled, KeyboardInterrupt, ...: stopped from outside
            self._end()
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:  # the block was left in another context than it was entered
                pass
            self._token = None
        with anyio.CancelScope(shield=True):
            await self._settle()

    # -- recording ----------------------------------------------------------------------------------
    async def append(self, item: Any) -> int:
        """Record one chunk; returns its seq (1, 2, ...).

        ``str`` as is, ``bytes`` as UTF-8, ``dict``/``list`` as compact JSON, a
        :class:`~asgi_stream_recorder.ServerSentEvent` as its data under its event name (its
        ``id`` must be None: the seq is the id). Plain items get ``text_event``. Raises
        :class:`StreamEnded` once the stream has ended, ``TypeError``/``ValueError`` for an
        item that cannot be recorded; either way nothing is recorded.
        """
        session = self._session
        if session is None:
            raise RuntimeError(f"stream {self.id} is not started: use it as `async with recorder.stream() as s:`")
        if session.status is not StreamStatus.STREAMING:
            raise StreamEnded(f"stream {self.id} has ended ({session.status.value}): nothing more can be appended")
        text, event = _item(item, session.text_event)
        seq = session.stamp()
        if not session.record_nowait(text, event):
            await session.record_waiting(text, event)
        if not seq & 31:  # a producer that never suspends would starve the event loop
            await anyio.lowlevel.checkpoint()
        return seq

    async def complete(self, **metadata: Any) -> StreamStatus:
        """End the stream ``completed``, ``metadata`` merged into the record's. Returns the status
        (after an earlier end: that end's status, and nothing changes)."""
        return await self._end_now(metadata, exhausted=True)

    async def fail(self, error: str | BaseException, **metadata: Any) -> StreamStatus:
        """End the stream ``failed`` with ``error`` stored (an exception as ``"Type: message"``),
        ``metadata`` merged into the record's. Returns the status (see :meth:`complete`)."""
        if not isinstance(error, (str, BaseException)):
            raise TypeError(f"error must be a str or an exception, not {type(error).__name__}")
        return await self._end_now(metadata, error=error)

    async def cancel(self, **metadata: Any) -> StreamStatus:
        """End the stream ``cancelled`` (the producer stopped it: its user left, pressed stop),
        ``metadata`` merged into the record's. Returns the status (see :meth:`complete`)."""
        return await self._end_now(metadata, stopped_for_client=True)

    def interrupt(self) -> None:
        """End the stream now as ``interrupted``: the server is going away (the middleware's shutdown)."""
        self._end()

    # -- the end --------------------------------------------------------------------------------------
    def _cancel_requested(self) -> None:
        """A cancel request from elsewhere: ``cancelled``, ``cancelled_by="request"``."""
        self._end(stopped_by_request=True)

    async def _end_now(self, metadata: dict[str, Any], **facts: Any) -> StreamStatus:
        session = self._session
        if session is None:
            raise RuntimeError(f"stream {self.id} is not started: use it as `async with recorder.stream() as s:`")
        if session.status is StreamStatus.STREAMING:
            self.metadata.update(metadata)
            self._end(**facts)
            await self._settle()
        return session.status

    def _end(self, **facts: Any) -> None:
        """Queue the end, with the facts of how it stopped (the session decides the status). Once."""
        session = self._session
        if session is None or session.status is not StreamStatus.STREAMING:
            return
        session.end(**facts)
        if self._host is not None:
            self._host.untrack(self)
            self._host = None

    async def _settle(self) -> None:
        """A recorder nobody will close (opened lazily): make the end durable now, as a decorated stream does."""
        if not self.recorder.managed:
            try:
                await self.recorder.flush(timeout=_FLUSH_TIMEOUT)
            except RecorderError as exc:
                log.error("stream %s: its record could not be written: %s", self.id, exc)


def _item(item: Any, default_event: str | None) -> tuple[str, str | None]:
    """The text and event name an appended item is recorded as (the driver's rules for items)."""
    if type(item) is str:
        return item, default_event
    if isinstance(item, ServerSentEvent):
        if item.id is not None:
            raise ValueError("ServerSentEvent.id is assigned by the recorder (it is the chunk's seq): leave it None")
        if item.text is None:
            raise ValueError("a ServerSentEvent without data has nothing to record")
        return item.text, item.event or default_event
    if isinstance(item, (str, bytes, bytearray, memoryview, dict, list)):
        return to_text(item), default_event
    raise TypeError(
        f"a manual stream cannot record an item of type {type(item).__module__}.{type(item).__qualname__}: "
        "append str, bytes, dict, list or ServerSentEvent"
    )
