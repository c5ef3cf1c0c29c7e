"""The record types and the :class:`Recorder` every backend subclasses.

A backend is one short file: it says how to connect, how to write a :class:`Batch` in
one transaction, and how to read records back. Everything about *when* to write
(batching, the bounded queue, flushing, retries, the writer task) lives in
:class:`~asgi_stream_recorder.recorders.buffered.BufferedWriter`, written once.
"""

from __future__ import annotations

import abc
import enum
import json
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, NamedTuple

from .buffered import BufferedWriter, Policy

__all__ = [
    "Batch",
    "Chunk",
    "Recorder",
    "StreamEnd",
    "StreamRecord",
    "StreamStart",
    "StreamStatus",
    "is_orphan",
    "process_owner",
]


class StreamStatus(str, enum.Enum):
    """Where a stream's life ended (or ``STREAMING`` while it runs)."""

    STREAMING = "streaming"
    COMPLETED = "completed"  # the source ran to its end
    FAILED = "failed"  # the source raised, or yielded something unsendable
    CANCELLED = "cancelled"  # the client went away and generation was stopped
    INTERRUPTED = "interrupted"  # the server stopped it: shutdown, crash, outside cancellation

    def __str__(self) -> str:
        return self.value


class Chunk(NamedTuple):
    """One recorded event. ``seq`` starts at 1 per stream and is the SSE ``id`` the client saw."""

    stream_id: str
    seq: int
    data: str
    event: str | None
    at_ms: float  # milliseconds since the stream started


@dataclass(slots=True)
class StreamStart:
    """A new stream, written before any of its chunks."""

    id: str
    created_at: float  # epoch seconds
    path: str | None = None
    method: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: chunks with this event name (None: the default ``message``) make up the text content
    text_event: str | None = None
    #: which process runs the stream: crash recovery only touches its own host's dead ones
    owner: str = ""


@dataclass(slots=True)
class StreamEnd:
    """A stream's final state. The backend freezes its content and chunk count: those given
    here (the session knows them) or, when None, computed from the stored chunks."""

    id: str
    status: StreamStatus
    completed_at: float  # epoch seconds
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    content: str | None = None
    chunk_count: int | None = None


@dataclass(slots=True)
class Batch:
    """What the writer hands a backend: written in one transaction, starts then chunks then ends."""

    starts: list[StreamStart] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    ends: list[StreamEnd] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.starts) + len(self.chunks) + len(self.ends)


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """A stream as stored: its state, its text content and its metadata."""

    id: str
    status: StreamStatus
    created_at: datetime
    completed_at: datetime | None
    content: str
    chunk_count: int
    error: str | None
    metadata: dict[str, Any]
    path: str | None = None
    method: str | None = None


def to_datetime(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=timezone.utc)


def dump_metadata(metadata: dict[str, Any]) -> str:
    """JSON for metadata; values JSON can't hold are stored as their ``str`` rather than lost."""
    return json.dumps(metadata, ensure_ascii=False, default=str, separators=(",", ":"))


_HOST = socket.gethostname()
_INCARNATION = uuid.uuid4().hex[:8]


def process_owner() -> str:
    """``host:pid:incarnation``: which process runs a stream, for crash recovery."""
    return f"{_HOST}:{os.getpid()}:{_INCARNATION}"


def is_orphan(owner: str) -> bool:
    """True if the owning process ran on this host and is gone, or was an earlier
    incarnation of our own pid (a restarted container). Other hosts' streams are left
    alone: without a heartbeat nothing here can tell whether they still run."""
    host, _, rest = owner.partition(":")
    pid_text, _, incarnation = rest.partition(":")
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return incarnation != _INCARNATION
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Recorder(abc.ABC):
    """Base of every backend, and the object users hold.

    The record path (``start``, ``append``, ``finish``) only queues; a background writer
    owned by the recorder persists batches. Open it with ``async with recorder:`` (the
    middleware does this in the app's lifespan) or let the first stream open it lazily.

    Tuning: ``batch_size`` chunks (or ``flush_interval`` seconds) trigger a write;
    ``max_pending`` bounds the queue; when it is full an append waits up to ``max_wait``
    seconds for room (``None``: wait forever, ``0``: never wait), then drops the chunk and
    the stream's record counts it in ``metadata["dropped_chunks"]``.
    """

    def __init__(
        self,
        *,
        batch_size: int = 2000,
        flush_interval: float = 0.05,
        max_pending: int = 200_000,
        max_wait: float | None = 5.0,
    ) -> None:
        self._writer = BufferedWriter(
            self.write,
            Policy(batch_size=batch_size, interval=flush_interval, max_pending=max_pending, max_wait=max_wait),
        )
        #: Queue a chunk if there is room; False means the caller must ``await append``.
        self.try_append: Callable[[Chunk], bool] = self._writer.try_put
        self._opened = False
        #: True when opened by the user or the middleware, who will close it; a lazily
        #: opened recorder is flushed at the end of each stream instead.
        self.managed = False

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        """Connect the backend and start the writer. Idempotent."""
        self.managed = True
        await self._ensure_open()

    async def ensure_open(self) -> None:
        """Open lazily on first use (also after the event loop that opened it went away)."""
        if not self._opened or not self._writer.alive:
            await self._ensure_open()

    async def _ensure_open(self) -> None:
        if not self._opened:
            await self.connect()
            self._opened = True
        if not self._writer.alive:
            self._writer.start()

    async def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (retrying for up to ``timeout`` seconds), stop the writer, disconnect."""
        if not self._opened:
            return
        try:
            await self._writer.stop(timeout)
        finally:
            self._opened = False
            self.managed = False
            await self.disconnect()

    async def __aenter__(self) -> Recorder:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the record path: queue only, never touch storage ------------------------------
    def start(self, start: StreamStart) -> None:
        self._writer.put_start(start)


    async def append(self, chunk: Chunk) -> bool:
        """Queue a chunk, waiting for room per the policy; False if it had to be dropped."""
        return await self._writer.put(chunk)

    def finish(self, end: StreamEnd) -> None:
        self._writer.put_end(end)

    async def flush(self) -> None:
        """Return once everything queued before this call is durable in the backend."""
        await self._writer.flush()

    @property
    def stats(self) -> dict[str, Any]:
        """Writer counters: queued, written, pending, dropped, write failures, last error."""
        return self._writer.stats()

    # -- what a backend implements -------------------------------------------------------
    async def connect(self) -> None:
        """Open connections and create the schema. Called once before the first write."""

    async def disconnect(self) -> None:
        """Release connections. Called after the writer has stopped."""

    @abc.abstractmethod
    async def write(self, batch: Batch) -> None:
        """Persist a batch in one transaction: starts, then chunks, then ends.

        An end sets the final status, error and metadata, and freezes the stream's
        ``content`` (its text-event chunks joined in seq order) and ``chunk_count``.
        Must be safe to retry after a failure (a chunk already stored is not doubled).
        """

    @abc.abstractmethod
    async def get(self, stream_id: str) -> StreamRecord | None:
        """One stream's record, or None."""

    @abc.abstractmethod
    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        """The stream's chunks with ``seq > after``, in order."""

    @abc.abstractmethod
    async def list_streams(self, status: StreamStatus | str | None = None, limit: int = 100) -> list[StreamRecord]:
        """Streams, newest first, optionally only those with ``status``."""

    @abc.abstractmethod
    async def recover(self, is_orphan: Callable[[str], bool]) -> int:
        """Mark streams left ``streaming`` whose owner ``is_orphan(owner)`` as interrupted.

        Their chunks stay; content and chunk count are frozen as for any end. Returns how
        many streams were marked.
        """
