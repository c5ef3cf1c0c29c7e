"""A stream's life: its id, sequence numbers, timings, metadata and final status.

Whatever produces a stream (the response, the middleware recording undecorated SSE,
later a manual recording API) drives one :class:`StreamSession`. :meth:`StreamSession.end`
is the one place where how a stream ended becomes a status.
"""

from __future__ import annotations

import enum
import time
import uuid
from contextvars import ContextVar
from typing import Any

from .recorders.base import Chunk, Recorder, StreamEnd, StreamStart, StreamStatus, process_owner

__all__ = ["Ending", "StreamSession", "current_stream", "new_stream_id"]

_new_chunk = tuple.__new__
_current: ContextVar[StreamSession | None] = ContextVar("asgi_stream_recorder_current", default=None)
_OWNER = process_owner()


def new_stream_id() -> str:
    """Random, unguessable and sortable by creation time (millisecond prefix)."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


def current_stream() -> StreamSession:
    """The stream being generated, from inside its generator: ``current_stream().metadata["usage"] = ...``."""
    session = _current.get()
    if session is None:
        raise LookupError("current_stream() is only available inside a recorded stream's generator")
    return session


class Ending(enum.Enum):
    """How a stream stopped, as seen by whoever drove it."""

    EXHAUSTED = "exhausted"  # the source ran out
    RAISED = "raised"  # the source raised, or gave an item that cannot be sent
    CLIENT_LEFT = "client_left"  # our own disconnect watch stopped it
    INTERRUPTED = "interrupted"  # cancelled from outside: shutdown, server timeout, crash


class StreamSession:
    """Sequence numbers, timings and metadata of one stream, and its record calls.

    ``metadata`` is the user's dict: the generator may add to it through
    :func:`current_stream` until the stream ends; it is stored with the final status,
    together with ``ttft_ms``, ``duration_ms``, ``chunk_count`` and ``char_count``.
    """

    __slots__ = (
        "id", "metadata", "recorder", "status", "error", "seq", "count", "char_count", "dropped",
        "ttft_ms", "client_left_ms", "text_event", "created_at",
        "_t0", "_path", "_method", "_token", "_put", "_text", "_last_at",
    )

    def __init__(
        self,
        recorder: Recorder,
        *,
        id: str | None = None,
        metadata: dict[str, Any] | None = None,
        path: str | None = None,
        method: str | None = None,
        text_event: str | None = None,
    ) -> None:
        self.id = id or new_stream_id()
        self.recorder = recorder
        self._put = recorder.try_append
        self._text: list[str] = []  # the recorded text, so the end needs no read-back
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.text_event = text_event
        self.status = StreamStatus.STREAMING
        self.error: str | None = None
        self.seq = 0
        self.count = 0  # chunks recorded (a chunk never sent is not)
        self.char_count = 0
        self.dropped = 0
        self.ttft_ms: float | None = None
        self.client_left_ms: float | None = None
        self._t0 = self._last_at = time.perf_counter()
        self.created_at = time.time()  # epoch seconds
        self._path, self._method = path, method
        self._token: Any = None

    def __repr__(self) -> str:
        return f"<StreamSession {self.id} {self.status.value} seq={self.seq}>"

    def idle_seconds(self) -> float:
        """Seconds since the last chunk (or the start)."""
        return time.perf_counter() - self._last_at

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self._t0) * 1000.0

    # -- lifecycle ---------------------------------------------------------------------
    def begin(self) -> None:
        """Queue the stream's start and make it :func:`current_stream` in this context."""
        self.recorder.start(
            StreamStart(
                id=self.id,
                created_at=self.created_at,
                path=self._path,
                method=self._method,
                metadata=dict(self.metadata),
                text_event=self.text_event,
                owner=_OWNER,
            )
        )
        self._token = _current.set(self)

    def chunk(self, data: str, event: str | None = None) -> Chunk:
        """The next chunk (its ``seq`` is the SSE id); call :meth:`record` once it is sent."""
        self.seq = seq = self.seq + 1
        self._last_at = at = time.perf_counter()
        at_ms = (at - self._t0) * 1000.0
        if seq == 1:
            self.ttft_ms = at_ms
        return _new_chunk(Chunk, (self.id, seq, data, event, at_ms))  # Chunk(...) without its slow __new__

    def record_nowait(self, chunk: Chunk) -> bool:
        """Queue a sent chunk if the recorder has room (the usual case); False: ``await record``."""
        if self._put(chunk):  # (what _recorded does, inlined: this runs once per event)
            self.count += 1
            self.char_count += len(chunk.data)
            if chunk.event == self.text_event:
                self._text.append(chunk.data)
            return True
        return False

    def _recorded(self, chunk: Chunk) -> None:
        self.count += 1
        self.char_count += len(chunk.data)
        if chunk.event == self.text_event:
            self._text.append(chunk.data)

    async def record(self, chunk: Chunk) -> None:
        """Queue a sent chunk for the record, waiting while the recorder's queue is full (per its policy)."""
        if self.record_nowait(chunk):
            return
        if await self.recorder.append(chunk):
            self._recorded(chunk)
        else:
            self.dropped += 1

    def client_left(self) -> None:
        """Note when the client went away (the stream may go on, per ``on_disconnect``)."""
        if self.client_left_ms is None:
            self.client_left_ms = self.elapsed_ms()

    def end(self, ending: Ending, error: BaseException | str | None = None) -> StreamStatus:
        """Decide the final status from how the stream stopped and queue it. Only the first call counts."""
        if self.status is not StreamStatus.STREAMING:
            return self.status
        self.status = _STATUS[ending]
        if error is not None:
            self.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        duration = self.elapsed_ms()
        metadata = dict(self.metadata)
        metadata.update(
            ttft_ms=None if self.ttft_ms is None else round(self.ttft_ms, 3),
            duration_ms=round(duration, 3),
            chunk_count=self.count,
            char_count=self.char_count,
        )
        if self.dropped:
            metadata["dropped_chunks"] = self.dropped
        if self.client_left_ms is not None:
            metadata["client_disconnected_at_ms"] = round(self.client_left_ms, 3)
        self.recorder.finish(
            StreamEnd(self.id, self.status, self.created_at + duration / 1000.0, self.error, metadata,
                      content="".join(self._text), chunk_count=self.count)
        )
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:  # ended from another context (a background continuation)
                _current.set(None)
            self._token = None
        return self.status


_STATUS = {
    Ending.EXHAUSTED: StreamStatus.COMPLETED,
    Ending.RAISED: StreamStatus.FAILED,
    Ending.CLIENT_LEFT: StreamStatus.CANCELLED,
    Ending.INTERRUPTED: StreamStatus.INTERRUPTED,
}
