"""Following a stream: replay from the record, then live, with no gap and no duplicate.

:class:`LiveHub` knows the streams running in this process: their chunks go to in-process
followers straight from memory (no flush latency), each through a bounded buffer so a slow
follower never slows the producer (one that falls too far behind catches up from the record).
:class:`Follow` is what ``recorder.follow(stream_id, after)`` returns: an async iterator of
:class:`~.base.Chunk` that replays what is stored after ``after``, then follows live (from
memory when the producer is here, else from the record as the backend reports changes),
and ends with the stream; ``status`` and ``record`` then say how it ended.

The order that makes it exact: subscribe first, then take what is still queued for the
writer, then read the record; merge by seq, skip what was already yielded.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio

from .base import Chunk, StreamRecord, StreamStatus

if TYPE_CHECKING:
    from .recorder import Recorder

__all__ = ["Follow", "LiveHub", "LiveStream"]

log = logging.getLogger("asgi_stream_recorder")

FOLLOWER_BUFFER = 1000  # chunks a follower may fall behind before it catches up from the record
_REMOTE_WAIT = 1.0  # at most this long between two looks at the record of a stream produced elsewhere


class _Follower:
    """One subscriber's bounded buffer of a live stream."""

    __slots__ = ("buffer", "end", "lagged", "limit", "wake")

    def __init__(self, limit: int) -> None:
        self.buffer: collections.deque[Chunk] = collections.deque()
        self.limit = limit
        self.lagged = False
        self.end: tuple[StreamStatus, str | None] | None = None
        self.wake: anyio.Event | None = None

    def _wake(self) -> None:
        if self.wake is not None:
            self.wake.set()
            self.wake = None

    def push(self, chunk: Chunk) -> None:
        if self.lagged:
            return
        if len(self.buffer) >= self.limit:  # too far behind: it will re-read the record instead
            self.lagged = True
            self.buffer.clear()
        else:
            self.buffer.append(chunk)
        self._wake()

    async def wait(self) -> None:
        if self.buffer or self.lagged or self.end is not None:
            return
        self.wake = anyio.Event()
        await self.wake.wait()


class LiveStream:
    """A stream running in this process: its followers, its key, and how to stop it."""

    __slots__ = ("followers", "key", "on_cancel", "session", "stream_id")

    def __init__(self, stream_id: str, key: str | None, session: Any = None) -> None:
        self.stream_id = stream_id
        self.key = key
        #: the producing StreamSession (its id, metadata, format, text event)
        self.session = session
        self.followers: list[_Follower] = []
        #: set by whatever drives the stream: stop it because someone asked (``cancelled``)
        self.on_cancel: Callable[[], None] | None = None

    def publish(self, seq: int, data: str, event: str | None, at_ms: float) -> None:
        chunk = Chunk(self.stream_id, seq, data, event, at_ms)
        for follower in self.followers:
            follower.push(chunk)

    def subscribe(self, limit: int) -> _Follower:
        follower = _Follower(limit)
        self.followers.append(follower)
        return follower

    def unsubscribe(self, follower: _Follower) -> None:
        if follower in self.followers:
            self.followers.remove(follower)


class LiveHub:
    """The streams this process runs, by id."""

    def __init__(self) -> None:
        self.streams: dict[str, LiveStream] = {}

    def open(self, stream_id: str, key: str | None = None, session: Any = None) -> LiveStream:
        live = self.streams[stream_id] = LiveStream(stream_id, key, session)
        return live

    def close(self, stream_id: str, status: StreamStatus, error: str | None) -> None:
        live = self.streams.pop(stream_id, None)
        if live is None:
            return
        for follower in live.followers:
            follower.end = (status, error)
            follower._wake()

    def by_key(self, key: str) -> LiveStream | None:
        for live in reversed(self.streams.values()):  # the newest first
            if live.key == key:
                return live
        return None

    def cancel(self, stream_id: str) -> bool:
        live = self.streams.get(stream_id)
        if live is None or live.on_cancel is None:
            return False
        live.on_cancel()
        return True


class Follow:
    """What ``recorder.follow(stream_id, after)`` returns: ``async for chunk in ...`` yields the
    stream's chunks (:class:`~.base.Chunk`) with a seq above ``after``, in order and once each:
    replayed from the record, then live (from memory when the stream runs in this process, else
    from the record as the backend reports changes), until the stream ends.

    Then ``status`` and ``error`` say how it ended, and ``record`` holds the stored record when
    it was read from the backend; ``last`` is the seq of the last chunk yielded. ``buffer``:
    the chunks a follower in the producer's process may fall behind before it catches up from
    the record (the producer never waits for it). Raises :class:`LookupError` (from the
    iteration) for a stream nobody knows.
    """

    def __init__(self, recorder: Recorder, stream_id: str, after: int = 0, *, buffer: int = FOLLOWER_BUFFER) -> None:
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError(f"after must be a seq (an int >= 0), not {after!r}")
        self.recorder = recorder
        self.stream_id = stream_id
        self.after = after
        self.buffer = buffer
        #: the seq of the last chunk yielded
        self.last = after
        #: how the stream ended (None until it has)
        self.status: StreamStatus | None = None
        self.error: str | None = None
        #: the stored record at the end, when it was read from the backend
        self.record: StreamRecord | None = None
        self._outage = False  # reading the record failed last time (logged once per outage)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._run()

    def _take(self, chunks: list[Chunk]) -> list[Chunk]:
        """The chunks after ``last``, in order, once each; advances ``last``."""
        out = []
        for chunk in sorted(chunks, key=lambda c: c.seq):
            if chunk.seq > self.last:
                out.append(chunk)
                self.last = chunk.seq
        return out

    async def _run(self) -> AsyncIterator[Chunk]:
        rec, sid = self.recorder, self.stream_id
        while True:
            live = rec.live.streams.get(sid)
            if live is not None:
                follower = live.subscribe(self.buffer)
                try:
                    queued = rec.queued_chunks(sid)  # taken before any await: nothing slips between
                    for chunk in self._take([*await rec.backend.chunks(sid, self.last), *queued]):
                        yield chunk
                    while True:
                        while follower.buffer:
                            chunk = follower.buffer.popleft()
                            if chunk.seq > self.last:
                                self.last = chunk.seq
                                yield chunk
                        if follower.lagged:
                            break  # subscribe again and catch up from the record
                        if follower.end is not None:
                            self.status, self.error = follower.end
                            return
                        await follower.wait()
                finally:
                    live.unsubscribe(follower)
                continue
            # Produced elsewhere, or over: the record is the truth. Read the record before its
            # chunks: once it says the stream ended, every chunk it has is already stored.
            await rec.settle(sid)
            try:
                record = await rec.backend.get(sid)
                stored = [] if record is None else await rec.backend.chunks(sid, self.last)
            except Exception as exc:  # the database is down or restarting: wait for it, as the writer does
                if not rec.backend.is_transient(exc):
                    raise
                if not self._outage:
                    log.warning("following stream %s: cannot read the record (%r); retrying", sid, exc)
                self._outage = True
                await anyio.sleep(_REMOTE_WAIT)
                continue
            self._outage = False
            if record is None:
                if sid in rec.live.streams:
                    continue  # it started here meanwhile
                raise LookupError(f"no stream {sid!r}")
            for chunk in self._take(stored):
                yield chunk
            if record.finished:
                self.status, self.error, self.record = record.status, record.error, record
                return
            await rec.wait_for_change(_REMOTE_WAIT)
