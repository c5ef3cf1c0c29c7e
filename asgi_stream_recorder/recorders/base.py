"""The record types, and :class:`Backend`: the small interface a storage engine implements.

A backend is one short file: connect, write a :class:`Batch` in one transaction, read
records back, mark orphans. It inherits no machinery: the queue, batching, retries,
storable-value checks and flushing live in :class:`~asgi_stream_recorder.recorders.Recorder`,
the object users hold, written once for every backend (as httpx's client sits over its
transports).
"""

from __future__ import annotations

import abc
import enum
import os
import socket
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

import anyio

__all__ = [
    "Backend",
    "Batch",
    "Chunk",
    "Segment",
    "StreamEnd",
    "StreamRecord",
    "StreamStart",
    "StreamStatus",
    "process_owner",
    "recovered_end",
]


class StreamStatus(str, enum.Enum):
    """Where a stream's life ended (or ``STREAMING`` while it runs)."""

    STREAMING = "streaming"
    COMPLETED = "completed"  # the source ran to its end
    FAILED = "failed"  # the source raised, or an item could not be sent
    CANCELLED = "cancelled"  # the client went away and generation was stopped
    INTERRUPTED = "interrupted"  # the server stopped it: shutdown, crash, outside cancellation

    def __str__(self) -> str:
        return self.value


class Chunk(NamedTuple):
    """One recorded event, as read back. ``seq`` starts at 1 per stream and is the SSE ``id``."""

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
    #: the user's key (a conversation id, ...), to find a stream again
    key: str | None = None
    #: the wire format it was produced in (a join speaks it too)
    format: str | None = None


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


class Segment:
    """A run of one stream's chunks queued together, kept as columns.

    Columns rather than a tuple per chunk: a queued chunk then costs no object the
    garbage collector tracks (strings, ints and floats are untracked), so a full queue
    never makes the collector walk millions of objects (see ``bench/looplag.py``).
    Lists rather than ``array.array``: appending to an array parses its argument, which
    cost about 600 instructions per chunk (``bench/instructions.py``). ``seqs`` rise.
    ``events`` stays None while every chunk has the default event.
    """

    __slots__ = ("at_ms", "data", "events", "seqs", "stream_id")

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.seqs: list[int] = []
        self.data: list[str] = []
        self.events: list[str | None] | None = None
        self.at_ms: list[float] = []

    def __len__(self) -> int:
        return len(self.data)

    def add(self, seq: int, data: str, event: str | None, at_ms: float) -> None:
        if event is not None and self.events is None:
            self.events = [None] * len(self.data)
        self.seqs.append(seq)
        self.data.append(data)
        self.at_ms.append(at_ms)
        if self.events is not None:
            self.events.append(event)

    def clear(self) -> None:
        """Empty it for reuse, in place: no new object for the garbage collector to track."""
        self.seqs.clear()
        self.data.clear()
        self.events = None
        self.at_ms.clear()

    def event_list(self) -> list[str | None]:
        return self.events if self.events is not None else [None] * len(self.data)

    def runs(self) -> Iterator[tuple[int, int]]:
        """``(lo, hi)`` index ranges of consecutive seqs (a dropped chunk leaves a gap)."""
        seqs, lo = self.seqs, 0
        if seqs and seqs[-1] - seqs[0] == len(seqs) - 1:  # the usual case, seqs rising with no gap: one run
            yield 0, len(seqs)
            return
        for i in range(1, len(seqs)):
            if seqs[i] != seqs[i - 1] + 1:
                yield lo, i
                lo = i
        if seqs:
            yield lo, len(seqs)

    def chunks(self) -> list[Chunk]:
        sid = self.stream_id
        return [Chunk(sid, s, d, e, a) for s, d, e, a in zip(self.seqs, self.data, self.event_list(), self.at_ms,
                                                             strict=True)]


@dataclass(slots=True)
class Batch:
    """What the recorder hands a backend: written in one transaction, starts then chunks then ends."""

    starts: list[StreamStart] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    ends: list[StreamEnd] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.starts) + sum(map(len, self.segments)) + len(self.ends)

    @property
    def chunks(self) -> list[Chunk]:
        """Every chunk as a :class:`Chunk` (for simple backends; SQLite writes the columns)."""
        return [c for s in self.segments for c in s.chunks()]

    def stream_ids(self) -> list[str]:
        seen: dict[str, None] = {}
        for start in self.starts:
            seen.setdefault(start.id)
        for end in self.ends:
            seen.setdefault(end.id)
        for s in self.segments:
            seen.setdefault(s.stream_id)
        return list(seen)

    def of_stream(self, stream_id: str) -> Batch:
        """The part of this batch that belongs to one stream (to isolate a record that fails)."""
        return Batch(
            [s for s in self.starts if s.id == stream_id],
            [s for s in self.segments if s.stream_id == stream_id],
            [e for e in self.ends if e.id == stream_id],
        )


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
    key: str | None = None
    format: str | None = None
    #: the event name of the chunks that make up ``content`` (None: the default ``message``)
    text_event: str | None = None

    @property
    def finished(self) -> bool:
        return self.status is not StreamStatus.STREAMING


def to_datetime(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=timezone.utc)


def recovered_end(stream_id: str, created_at: float, text_event: str | None, metadata: dict[str, Any],
                  chunks: list[Chunk]) -> StreamEnd:
    """The end crash recovery gives a stream whose process died: ``interrupted`` at the time of
    its last stored chunk (the process may have lived on idle; that is not known), with the
    same counts a live ending stores."""
    last_ms = chunks[-1].at_ms if chunks else 0.0
    content = "".join(c.data for c in chunks if c.event == text_event)
    meta = {**metadata, "recovered": True, "duration_ms": round(last_ms, 3), "chunk_count": len(chunks),
            "char_count": sum(len(c.data) for c in chunks)}
    if chunks:
        meta["ttft_ms"] = round(chunks[0].at_ms, 3)
    return StreamEnd(stream_id, StreamStatus.INTERRUPTED, created_at + last_ms / 1000.0,
                     "process ended mid-stream", meta, content, len(chunks))


# -- which process runs a stream -----------------------------------------------------------------
_HOST = socket.gethostname()
_owner = ""


def _new_owner() -> None:
    global _owner
    _owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


_new_owner()
if hasattr(os, "register_at_fork"):  # a worker forked after import (gunicorn --preload) is its own owner
    os.register_at_fork(after_in_child=_new_owner)


def process_owner() -> str:
    """``host:pid:incarnation`` naming the calling process: the owner of the streams it runs,
    whose heartbeat keeps them alive (see :meth:`Backend.heartbeat`). Only an identity: no
    decision is taken from the host or pid in it (containers share hostnames and pids)."""
    return _owner


class Backend(abc.ABC):
    """Where records are kept. Implement the abstract methods; that is a whole backend.

    Every method is called from the event loop of the :class:`Recorder` that owns the
    backend; ``write`` is only ever called by its one writer task, one batch at a time.
    """

    async def connect(self) -> None:
        """Open connections and create the schema. Raise a clear error if that cannot be done."""

    async def close(self) -> None:
        """Release connections. Called after the last write."""

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failed ``write`` may succeed if simply tried again (a lock, a lost
        connection, a full disk). Anything else is blamed on the batch's content: the
        recorder then isolates the stream whose records fail and stores it without its
        bad part, so one record never blocks the others."""
        return isinstance(exc, (OSError, TimeoutError, ConnectionError))

    @abc.abstractmethod
    async def write(self, batch: Batch) -> None:
        """Persist a batch in one transaction: starts, then chunks, then ends.

        An end sets the final status, error and metadata, and freezes the stream's
        ``content`` (its text-event chunks joined in seq order) and ``chunk_count``.
        Must be safe to retry after a failure (a chunk already stored is not doubled).
        Values arrive storable: metadata holds only JSON types, strings are valid Unicode.
        """

    @abc.abstractmethod
    async def get(self, stream_id: str) -> StreamRecord | None:
        """One stream's record, or None."""

    @abc.abstractmethod
    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        """The stream's chunks with ``seq > after``, in order."""

    @abc.abstractmethod
    async def list_streams(
        self, status: StreamStatus | str | None = None, limit: int = 100, key: str | None = None
    ) -> list[StreamRecord]:
        """Streams, newest first, optionally only those with ``status`` and ``key``."""

    async def request_cancel(self, stream_id: str) -> bool:
        """Ask the process running a stream to stop it; True if the stream is still streaming.
        (This default cannot reach other processes: it says False.)"""
        return False

    async def cancel_requests(self, stream_ids: Collection[str]) -> list[str]:
        """Which of these (running here) streams someone asked to cancel; the requests are consumed."""
        return []

    async def wait_for_change(self, timeout: float) -> None:
        """Return when records may have changed (written by any process), or after ``timeout``.

        Followers of streams produced elsewhere, and the owners of streams someone may ask
        to cancel, wait here. This default just sleeps (polling); a backend with a way to
        be told (SQLite's ``data_version``, PostgreSQL's ``LISTEN``) returns sooner.
        Missing a change costs latency, never a chunk: waiters re-read by seq."""
        await anyio.sleep(timeout)

    @abc.abstractmethod
    async def heartbeat(self, owner: str, at: float) -> None:
        """Record that process ``owner`` is alive at ``at`` (epoch seconds): one row per
        process, replaced each time. The recorder calls it every ``lease / 3`` seconds while
        the process runs streams, not once per stream."""

    @abc.abstractmethod
    async def recover(self, stale_before: float) -> int:
        """End streams left ``streaming`` whose lease ran out, with :func:`recovered_end`
        (chunks kept); returns how many were ended.

        A stream's lease runs out when both its owner's last heartbeat (none counts as never)
        and its own ``created_at`` are before ``stale_before`` (epoch seconds): a stream that
        has just started is safe until its owner's first heartbeat. Several processes may
        sweep at once: a stream is ended once. Owners whose heartbeat is stale may be forgotten.
        """

    async def purge(self, created_before: float, statuses: Collection[StreamStatus] | None = None, *,
                    batch_size: int = 500, dry_run: bool = False) -> int:
        """Delete the streams created before ``created_before`` (epoch seconds) whose status is one
        of ``statuses`` (None: any), with their chunks and cancel requests; return how many.

        A stream still ``streaming`` is never deleted, whatever ``statuses`` says. At most
        ``batch_size`` streams go per transaction, so that the writer never waits long for its
        turn. ``dry_run`` only counts them. (Not abstract, so that a backend written before
        retention existed still works: it just cannot purge.)
        """
        raise NotImplementedError(f"{type(self).__name__} cannot purge old streams: it does not implement "
                                  "Backend.purge(created_before, statuses, batch_size=, dry_run=)")
