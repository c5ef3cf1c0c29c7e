"""A stream's life: its id, sequence numbers, timings, metadata and final status.

Whatever produces a stream (the response, the middleware recording undecorated SSE,
later a manual recording API) drives one :class:`StreamSession`. :meth:`StreamSession.end`
is the one place where how a stream ended becomes a status.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextvars import ContextVar
from typing import Any

from .recorders.base import StreamEnd, StreamStart, StreamStatus, process_owner
from .recorders.live import LiveStream
from .recorders.recorder import Recorder

__all__ = ["StreamSession", "current_stream", "decide_status", "new_stream_id"]

log = logging.getLogger("asgi_stream_recorder")
_current: ContextVar[StreamSession | None] = ContextVar("asgi_stream_recorder_current", default=None)


def new_stream_id() -> str:
    """Random, unguessable and sortable by creation time (millisecond prefix)."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


def current_stream() -> StreamSession:
    """The stream being generated, from inside its generator: ``current_stream().metadata["usage"] = ...``."""
    session = _current.get()
    if session is None or session.status is not StreamStatus.STREAMING:
        raise LookupError("current_stream() is only available inside a recorded stream's generator, while it runs")
    return session


def decide_status(*, error: BaseException | str | None, exhausted: bool, stopped_for_client: bool = False,
                  stopped_by_request: bool = False) -> StreamStatus:
    """The one rule that turns how a stream stopped into its status, facts in this order:

    1. an error anywhere in its pipeline (the source, an item that cannot be sent, the wire): FAILED;
    2. the source ran to its end: COMPLETED (a hang-up or shutdown after the last item changes nothing);
    3. it was stopped because its client left, or because someone asked (a cancel request):
       CANCELLED (whatever happened during the clean-up);
    4. anything else stopped it (shutdown, cancellation from outside, a crash): INTERRUPTED.
    """
    if error is not None:
        return StreamStatus.FAILED
    if exhausted:
        return StreamStatus.COMPLETED
    if stopped_for_client or stopped_by_request:
        return StreamStatus.CANCELLED
    return StreamStatus.INTERRUPTED


class StreamSession:
    """Sequence numbers, timings and metadata of one stream, and its record calls.

    ``metadata`` is the user's dict: the generator may add to it through
    :func:`current_stream` until the stream ends; it is stored with the final status,
    together with ``ttft_ms``, ``duration_ms``, ``chunk_count`` and ``char_count``.
    """

    __slots__ = (
        "id", "metadata", "recorder", "status", "error", "seq", "count", "char_count", "dropped",
        "ttft_ms", "client_left_ms", "text_event", "created_at", "completed_at", "key", "format", "id_prefix",
        "live", "path", "_followers", "_t0", "_at_ms", "_method", "_token", "_put", "_text", "_last_at", "_waits",
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
        key: str | None = None,
        format: str | None = None,
        resumable: bool = False,
    ) -> None:
        self.id = id or new_stream_id()
        self.recorder = recorder
        self._put = recorder.put_chunk
        self._waits = recorder.waits_for_room
        self.key = key
        self.format = format
        #: what goes before the seq in an event's ``id``: ``"<stream_id>:"`` for resumable streams
        self.id_prefix = f"{self.id}:" if resumable else ""
        self.live: LiveStream | None = None
        self._followers: list[Any] = []  # the live stream's followers (the same list), once begun
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
        self._at_ms = 0.0
        self.created_at = time.time()  # epoch seconds
        self.completed_at: float | None = None
        self.path, self._method = path, method
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
        """Queue the stream's start, make it followable in this process, and make it
        :func:`current_stream` in this context."""
        self.recorder.start(
            StreamStart(
                id=self.id,
                created_at=self.created_at,
                path=self.path,
                method=self._method,
                metadata=dict(self.metadata),
                text_event=self.text_event,
                owner=process_owner(),
                key=self.key,
                format=self.format,
            )
        )
        self.live = self.recorder.live.open(self.id, self.key, self)
        self._followers = self.live.followers
        self.recorder.stream_started()
        self._token = _current.set(self)

    def event_id(self, seq: int) -> str:
        """The SSE ``id`` of chunk ``seq``: the seq, or ``<stream_id>:<seq>`` when resumable."""
        return f"{self.id_prefix}{seq}"

    def stamp(self) -> int:
        """Number and time the next chunk; returns its ``seq`` (the SSE id). Record it once sent."""
        self.seq = seq = self.seq + 1
        self._last_at = at = time.perf_counter()
        self._at_ms = at_ms = (at - self._t0) * 1000.0
        if seq == 1:
            self.ttft_ms = at_ms
        return seq

    def record_nowait(self, data: str, event: str | None) -> bool:
        """Hand the chunk last stamped to its followers and the recorder's queue. False only
        when the queue is full and the recorder's policy is to wait: then ``await record_waiting``.
        (A full queue otherwise drops the chunk and counts it in ``metadata["dropped_chunks"]``.)"""
        if self._followers:
            assert self.live is not None
            self.live.publish(self.seq, data, event, self._at_ms)
        if self._put(self.id, self.seq, data, event, self._at_ms):
            self.count += 1
            self.char_count += len(data)
            if event == self.text_event:
                self._text.append(data)
            return True
        if self._waits:
            return False
        self._drop()
        return True

    async def record_waiting(self, data: str, event: str | None) -> None:
        """After :meth:`record_nowait` said False: wait for room (up to the policy's ``max_wait``)."""
        if await self.recorder.put_chunk_waiting(self.id, self.seq, data, event, self._at_ms):
            self.count += 1
            self.char_count += len(data)
            if event == self.text_event:
                self._text.append(data)
        else:
            self._drop()

    async def record(self, data: str, event: str | None) -> None:
        """Both steps: record the chunk last stamped, waiting for room if the policy says so."""
        if not self.record_nowait(data, event):
            await self.record_waiting(data, event)

    def _drop(self) -> None:
        if not self.dropped:
            log.warning("stream %s: the recorder's queue is full (storage down or too slow): dropping chunks "
                        "from seq %d on, counted in metadata['dropped_chunks']", self.id, self.seq)
        self.dropped += 1
        self.recorder.note_dropped()

    def client_left(self) -> None:
        """Note when the client went away (the stream may go on, per ``on_disconnect``)."""
        if self.client_left_ms is None:
            self.client_left_ms = self.elapsed_ms()

    def end(self, *, error: BaseException | str | None = None, exhausted: bool = False,
            stopped_for_client: bool = False, stopped_by_request: bool = False) -> StreamStatus:
        """Decide the final status (:func:`decide_status`) and queue the end. Only the first call counts."""
        if self.status is not StreamStatus.STREAMING:
            return self.status
        self.status = decide_status(error=error, exhausted=exhausted, stopped_for_client=stopped_for_client,
                                    stopped_by_request=stopped_by_request)
        if error is not None:
            self.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        duration = self.elapsed_ms()
        self.completed_at = self.created_at + duration / 1000.0
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
        if stopped_by_request and self.status is StreamStatus.CANCELLED:
            metadata["cancelled_by"] = "request"
        self.recorder.finish(
            StreamEnd(self.id, self.status, self.completed_at, self.error, metadata,
                      content="".join(self._text), chunk_count=self.count)
        )
        self.recorder.live.close(self.id, self.status, self.error)
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:  # ended from another context
                _current.set(None)
            self._token = None
        return self.status
