"""The writer between the streams and a backend: one per recorder, written once for all.

Streams hand it starts, chunks and ends without awaiting storage. It keeps them in
order (chunks per stream, as columns) and writes everything pending as one batch when
``batch_size`` chunks are waiting, when ``interval`` has passed since the first one
arrived, or when someone asks to flush.

Failures, by kind:

* **transient** (the backend says so: a lock, a lost connection, a full disk): the
  batch is kept and retried with backoff, logged once per outage. Meanwhile the queue
  is bounded by ``max_pending`` chunks and ``max_pending_bytes`` characters of text;
  past that a chunk is dropped at once and counted (the client's path never waits on
  storage unless ``max_wait`` asks it to). Starts and ends are never dropped.
* **permanent** (anything else: the content of some record): the batch is split by
  stream so every other stream is written; the stream whose records fail is written
  again without its bad part (its metadata says so), and only if even that fails are
  its records given up on (counted in ``lost``). One record never blocks another.

The writer task belongs to the recorder: ``start`` spawns it on the running event loop
(asyncio or trio) and ``stop`` drains and joins it within its deadline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import sniffio

from .base import Batch, Chunk, Segment, StreamEnd, StreamStart
from .redaction import redact_batch
from .storable import UNSTORABLE_KEY, storable_text

if TYPE_CHECKING:
    from .base import Backend

__all__ = ["BufferedWriter", "Policy", "RecorderError", "RecorderTimeout"]

log = logging.getLogger("asgi_stream_recorder")

_OUTAGE_LOG_EVERY = 30.0  # seconds between reminders that writes still fail


class RecorderError(RuntimeError):
    """The backend could not persist what was queued (see the chained cause)."""


class RecorderTimeout(RecorderError, TimeoutError):
    """A flush or close did not finish within its timeout (the backend is down or slow)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """When to write and how much may wait. See :class:`~asgi_stream_recorder.recorders.Recorder`."""

    batch_size: int = 2000
    interval: float = 0.05
    max_pending: int = 200_000
    max_pending_bytes: int = 64 * 1024 * 1024
    max_wait: float | None = 0.0
    #: applied to what a batch stores (see :mod:`.redaction`); None: stored as given
    redact: Callable[[str], str] | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_pending", "max_pending_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
        if not isinstance(self.interval, (int, float)) or not self.interval >= 0:
            raise ValueError(f"flush_interval must be a number of seconds >= 0, not {self.interval!r}")
        if self.max_wait is not None and (not isinstance(self.max_wait, (int, float)) or not self.max_wait >= 0):
            raise ValueError(f"max_wait must be None or a number of seconds >= 0, not {self.max_wait!r}")


def _loop_token() -> object:
    """Identity of the running event loop, to notice a recorder outliving its loop."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    import asyncio

    return asyncio.get_running_loop()


def _spawn(fn: Callable[[], Awaitable[None]]) -> None:
    """Run ``fn`` as a task of the event loop itself; the writer owns it through its state."""
    if sniffio.current_async_library() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(fn, name="asgi_stream_recorder writer")
    else:
        import asyncio

        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            _as_coroutine(fn), name="asgi_stream_recorder writer"
        )
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)


async def _as_coroutine(fn: Callable[[], Awaitable[None]]) -> None:
    await fn()


_TASKS: set[Any] = set()  # asyncio keeps only weak references to tasks


class BufferedWriter:
    """The queue and the task that empties it into a :class:`Backend`."""

    def __init__(self, backend: Backend, policy: Policy) -> None:
        self.backend = backend
        self.policy = policy
        self._max_items, self._max_chars = policy.max_pending, policy.max_pending_bytes
        self._batch_size = policy.batch_size
        # what the next batch will hold
        self._starts: list[StreamStart] = []
        self._segments: dict[str, Segment] = {}
        # Segments of running streams, emptied after their batch was written, for their next
        # batch: in a steady state queueing allocates no object the garbage collector tracks.
        self._spare: dict[str, list[Segment]] = {}
        self._ends: list[StreamEnd] = []
        self._batch_chunks = 0
        self._inflight: Batch | None = None  # the batch being written
        # chunks queued and not yet settled (written or given up on), and their text's size
        self._chunks = 0
        self._chars = 0
        self._queued = 0  # records ever queued
        self._written = 0  # records ever settled: written, or given up on (then also in ``lost``)
        self.dropped = 0
        self.failures = 0
        self.lost = 0
        self.last_error: BaseException | None = None
        self._failing_since: float | None = None
        self._loop: object = None
        self._stop_deadline = math.inf
        self._running = False
        self._stopping = False
        self._abandoned = False
        self._scope: anyio.CancelScope | None = None
        self._arrived: anyio.Event | None = None  # set when the queue stops being empty
        self._hurry: anyio.Event | None = None  # set when a batch is full, or on flush/stop
        self._progress: anyio.Event | None = None  # set after every write, and when the task ends
        self._done: anyio.Event | None = None

    # -- state -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._running and self._loop is _loop_token()

    def stats(self) -> dict[str, Any]:
        return {
            "queued": self._queued,
            "written": self._written - self.lost,
            "pending": self._queued - self._written,
            "dropped": self.dropped,
            "write_failures": self.failures,
            "lost": self.lost,
            "last_error": None if self.last_error is None else repr(self.last_error),
        }

    def start(self) -> None:
        self._loop = _loop_token()
        self._running, self._stopping, self._abandoned = True, False, False
        self._stop_deadline = math.inf
        self._arrived, self._hurry = anyio.Event(), anyio.Event()
        self._progress, self._done = anyio.Event(), anyio.Event()
        if self._queued > self._written:  # records left by a writer whose loop is gone
            self._arrived.set()
        _spawn(self._run)

    async def stop(self, timeout: float) -> None:
        """Write everything pending (retrying failures until ``timeout``), then end the task.

        Returns within about ``timeout`` seconds plus one backend call; raises
        :class:`RecorderError` naming how many records could not be written.
        """
        lost_before = self.lost
        if self._running and self._done is not None:
            self._stopping = True
            self._stop_deadline = anyio.current_time() + timeout
            self._wake(hurry=True)
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(timeout + 0.5):
                    await self._done.wait()
                if self._running and self._scope is not None:  # still inside a backend call: cut it short
                    self._scope.cancel()
                    with anyio.move_on_after(2.0):
                        await self._done.wait()
            if self._running:  # a backend call that cannot be cancelled (a thread): leave it behind
                self._abandoned = True
                self._running = False
        unsettled = self._queued - self._written
        if unsettled:
            self.lost += unsettled
            self._written = self._queued
            self._clear()
        lost = self.lost - lost_before
        if lost:
            why = repr(self.last_error) if self.last_error is not None else (
                "the close was cut short (cancelled, or no time left) before they were written")
            raise RecorderError(f"{lost} queued records could not be written before close: {why}") from self.last_error

    def _clear(self) -> None:
        self._starts, self._segments, self._ends = [], {}, []
        self._batch_chunks = self._chunks = self._chars = 0

    # -- queueing (the hot path) ----------------------------------------------------------
    def _wake(self, hurry: bool = False) -> None:
        if self._arrived is not None and not self._arrived.is_set():
            self._arrived.set()
        if hurry and self._hurry is not None and not self._hurry.is_set():
            self._hurry.set()

    def put_start(self, start: StreamStart) -> None:
        self._starts.append(start)
        self._queued += 1
        self._wake()

    def put_end(self, end: StreamEnd) -> None:
        self._ends.append(end)
        self._queued += 1
        self._wake()

    def put_chunk(self, stream_id: str, seq: int, data: str, event: str | None, at_ms: float) -> bool:
        """Queue one chunk if there is room; False (the caller counts the drop) if not."""
        if self._chunks >= self._max_items or self._chars >= self._max_chars:
            return False
        segment = self._segments.get(stream_id)
        if segment is None:
            spare = self._spare.get(stream_id)
            segment = spare.pop() if spare else Segment(stream_id)
            self._segments[stream_id] = segment
        if event is None and segment.events is None:  # the common case: Segment.add, inlined
            segment.seqs.append(seq)
            segment.data.append(data)
            segment.at_ms.append(at_ms)
        else:
            segment.add(seq, data, event, at_ms)
        self._chunks += 1
        self._chars += len(data)
        self._queued += 1
        self._batch_chunks = n = self._batch_chunks + 1
        if n == 1 or n == self._batch_size:  # later chunks find the writer already woken
            self._wake(hurry=n == self._batch_size)
        return True

    async def put_chunk_waiting(self, stream_id: str, seq: int, data: str, event: str | None, at_ms: float) -> bool:
        """Like :meth:`put_chunk`, but wait up to ``max_wait`` seconds for room (the opt-in policy).

        Returns at once when the writer is not running: nothing would make room."""
        if self.put_chunk(stream_id, seq, data, event, at_ms):
            return True
        wait = self.policy.max_wait
        if not wait and wait is not None:
            return False
        with anyio.move_on_after(math.inf if wait is None else wait):
            while self.alive:
                assert self._progress is not None
                await self._progress.wait()
                if self.put_chunk(stream_id, seq, data, event, at_ms):
                    return True
        return False

    async def flush(self, timeout: float | None) -> None:
        """Wait until every record queued before this call is settled; bounded by ``timeout``."""
        target, lost_before = self._queued, self.lost
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while self._written < target:
                if not self.alive:
                    raise RecorderError("the recorder's writer is not running: open the recorder first")
                self._wake(hurry=True)
                assert self._progress is not None
                await self._progress.wait()
        if self._written < target:
            raise RecorderTimeout(
                f"{target - self._written} records were not written within {timeout}s"
                f" (last error: {self.last_error!r})"
            )
        if self.lost > lost_before:
            raise RecorderError(f"{self.lost - lost_before} records could not be written: {self.last_error!r}")

    def queued_chunks(self, stream_id: str) -> list[Chunk]:
        """A stream's chunks queued or being written (not yet known to be stored)."""
        out: list[Chunk] = []
        for segments in ([s for s in self._inflight.segments if s.stream_id == stream_id]
                         if self._inflight is not None else [], [self._segments.get(stream_id)]):
            for segment in segments:
                if segment is not None:
                    out.extend(segment.chunks())
        return out

    def has_queued(self, stream_id: str) -> bool:
        """Whether any record of the stream waits to be written."""
        batches = [Batch(self._starts, list(self._segments.values()), self._ends)]
        if self._inflight is not None:
            batches.append(self._inflight)
        return any(stream_id in b.stream_ids() for b in batches)

    # -- the writer task ----------------------------------------------------------------
    def _cut(self) -> tuple[Batch, int, int]:
        batch = Batch(self._starts, list(self._segments.values()), self._ends)
        chunks, chars = self._batch_chunks, sum(sum(map(len, s.data)) for s in batch.segments)
        self._starts, self._segments, self._ends, self._batch_chunks = [], {}, [], 0
        return batch, chunks, chars

    async def _run(self) -> None:
        assert self._arrived is not None and self._hurry is not None and self._done is not None
        try:
            with anyio.CancelScope() as self._scope:
                while True:
                    if not (self._starts or self._segments or self._ends):
                        if self._stopping:
                            return
                        await self._arrived.wait()
                        self._arrived = anyio.Event()
                        continue
                    if not self._stopping and not self._hurry.is_set():
                        with anyio.move_on_after(self.policy.interval):
                            await self._hurry.wait()
                    self._hurry = anyio.Event()
                    self._arrived = anyio.Event()
                    batch, chunks, chars = self._cut()
                    n = len(batch)
                    self._inflight = batch
                    try:
                        redact = self.policy.redact
                        await self._store(batch if redact is None else redact_batch(batch, redact))
                    finally:
                        self._inflight = None
                    if self._abandoned:
                        return
                    self._written += n
                    self._chunks -= chunks
                    self._chars -= chars
                    self._recycle(batch)
                    progress, self._progress = self._progress, anyio.Event()
                    assert progress is not None
                    progress.set()
        except Exception:  # a loop-level task must not raise: say what happened instead
            log.exception("recorder writer crashed; %d records unwritten", self._queued - self._written)
        finally:
            self._running = False
            if self._progress is not None:
                self._progress.set()
            self._done.set()

    def _recycle(self, batch: Batch) -> None:
        """Keep the written batch's segments of streams still running, emptied, for their next
        batch (a stream alternates between two: one filling while the other is written)."""
        spares = self._spare
        for end in batch.ends:
            spares.pop(end.id, None)
        ended = {end.id for end in batch.ends} if batch.ends else ()
        for segment in batch.segments:
            sid = segment.stream_id
            if sid not in ended:
                segment.clear()
                spare = spares.get(sid)
                if spare is None:
                    spares[sid] = [segment]
                elif len(spare) < 2:
                    spare.append(segment)

    async def _store(self, batch: Batch, *, whole: bool = True) -> None:
        """Write ``batch``, retrying transient failures; isolate and salvage permanent ones."""
        salvaged = False
        delay = 0.05
        while True:
            try:
                await self.backend.write(batch)
            except Exception as exc:
                self.failures += 1
                self.last_error = exc
                if not self.backend.is_transient(exc):
                    if whole and len(ids := batch.stream_ids()) > 1:
                        for stream_id in ids:
                            await self._store(batch.of_stream(stream_id), whole=False)
                        return
                    if not salvaged:
                        log.error("recorder: the record of stream %s cannot be stored as given (%r); "
                                  "storing it without its metadata and with text made valid",
                                  ",".join(batch.stream_ids()), exc)
                        batch, salvaged = _salvage(batch, exc), True
                        continue
                    self._give_up(batch, exc)
                    return
                if self._stopping and anyio.current_time() >= self._stop_deadline:
                    self._give_up(batch, exc)
                    return
                self._note_outage(exc, delay)
                wait = delay if not self._stopping else max(0.0, min(delay, self._stop_deadline - anyio.current_time()))
                await anyio.sleep(wait)
                delay = min(delay * 2, 2.0)
            else:
                if self._failing_since is not None:
                    log.warning("recorder: writes succeed again after %.1fs of failures",
                                time.monotonic() - self._failing_since)
                    self._failing_since = None
                return

    def _note_outage(self, exc: BaseException, delay: float) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._outage_logged = now
            log.warning("recorder write failed (%r); retrying with backoff, the queue meanwhile drops chunks "
                        "past its bounds (counted in each record)", exc)
        elif now - self._outage_logged >= _OUTAGE_LOG_EVERY:
            self._outage_logged = now
            log.warning("recorder writes still failing after %.0fs (%r); %d records pending",
                        now - self._failing_since, exc, self._queued - self._written)

    _outage_logged = 0.0

    def _give_up(self, batch: Batch, exc: BaseException) -> None:
        n = len(batch)
        self.lost += n
        log.error("recorder gave up on %d records of stream(s) %s: %r", n, ",".join(batch.stream_ids()), exc)


def _salvage(batch: Batch, exc: BaseException) -> Batch:
    """The batch without what may have made it fail: no user metadata (only the recorder's
    own counts, and a note saying why), every string made valid Unicode."""
    note = [f"metadata left out: the backend refused it ({type(exc).__name__}: {exc})"]
    starts = [StreamStart(s.id, s.created_at, _text(s.path), _text(s.method), {UNSTORABLE_KEY: note},
                          _text(s.text_event), s.owner) for s in batch.starts]
    segments = []
    for old in batch.segments:
        seg = Segment(old.stream_id)
        for seq, data, event, at in zip(old.seqs, old.data, old.event_list(), old.at_ms, strict=True):
            seg.add(seq, storable_text(data)[0], _text(event), at)
        segments.append(seg)
    kept = ("ttft_ms", "duration_ms", "chunk_count", "char_count", "dropped_chunks", "client_disconnected_at_ms")
    ends = [StreamEnd(e.id, e.status, e.completed_at, _text(e.error),
                      {**{k: e.metadata[k] for k in kept if isinstance(e.metadata.get(k), (int, float))},
                       UNSTORABLE_KEY: note},
                      _text(e.content), e.chunk_count) for e in batch.ends]
    return Batch(starts, segments, ends)


def _text(value: str | None) -> str | None:
    return None if value is None else storable_text(value)[0]
