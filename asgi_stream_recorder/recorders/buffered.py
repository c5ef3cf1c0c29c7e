"""The writer between the streams and a backend: one per recorder, written once for all.

Streams hand it starts, chunks and ends without awaiting storage. It keeps them in
order in three lists and writes everything pending as one batch when ``batch_size``
chunks are waiting, when ``interval`` has passed since the first one arrived, or when
someone asks to flush. A failed write is retried with backoff (the batch is kept, in
order); meanwhile the queue is bounded by ``max_pending`` chunks, and a full queue makes
appends wait up to ``max_wait`` seconds, then drop the chunk and say so (the session
counts it in the stream's metadata). Starts and ends are never dropped.

The writer task belongs to the recorder: ``start`` spawns it on the running event loop
(asyncio or trio) and ``stop`` drains and joins it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import sniffio

if TYPE_CHECKING:
    from .base import Batch, Chunk, StreamEnd, StreamStart

__all__ = ["BufferedWriter", "Policy", "RecorderError"]

log = logging.getLogger("asgi_stream_recorder")


class RecorderError(RuntimeError):
    """The backend could not persist what was queued (see the chained cause)."""


@dataclass(frozen=True, slots=True)
class Policy:
    batch_size: int = 2000
    interval: float = 0.05
    max_pending: int = 200_000
    max_wait: float | None = 5.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_pending < 1:
            raise ValueError("batch_size and max_pending must be at least 1")
        if self.interval < 0 or (self.max_wait is not None and self.max_wait < 0):
            raise ValueError("interval and max_wait must not be negative")


def _loop_token() -> object:
    """Identity of the running event loop, to notice a recorder outliving its loop."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    import asyncio

    return asyncio.get_running_loop()


def _spawn(fn: Callable[[], Awaitable[None]]) -> None:
    """Run ``fn`` as a task of the event loop itself; the caller owns it through its state."""
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
    def __init__(self, write: Callable[[Batch], Awaitable[None]], policy: Policy) -> None:
        from .base import Batch

        self._write = write
        self._batch_type = Batch
        self.policy = policy
        self._max_pending, self._batch_size = policy.max_pending, policy.batch_size
        self._pending: Batch = Batch()
        self._queued = 0  # ops ever queued
        self._written = 0  # ops ever written (or given up on at stop)
        self.dropped = 0
        self.failures = 0
        self.lost = 0
        self.last_error: BaseException | None = None
        self._loop: object = None
        self._stop_deadline = 0.0
        self._running = False
        self._stopping = False
        self._arrived: anyio.Event | None = None  # set when the queue stops being empty
        self._hurry: anyio.Event | None = None  # set when a batch is full, or on flush/stop
        self._progress: anyio.Event | None = None  # set after every write
        self._done: anyio.Event | None = None

    # -- state -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._running and self._loop is _loop_token()

    def stats(self) -> dict[str, Any]:
        return {
            "queued": self._queued,
            "written": self._written,
            "pending": self._queued - self._written,
            "dropped": self.dropped,
            "write_failures": self.failures,
            "lost": self.lost,
            "last_error": None if self.last_error is None else repr(self.last_error),
        }

    def start(self) -> None:
        self._loop = _loop_token()
        self._running = True
        self._stopping = False
        self._arrived, self._hurry = anyio.Event(), anyio.Event()
        self._progress, self._done = anyio.Event(), anyio.Event()
        if self._queued > self._written:  # ops left by a writer whose loop is gone
            self._arrived.set()
        _spawn(self._run)

    async def stop(self, timeout: float) -> None:
        """Write everything pending (retrying failures for up to ``timeout``), then end the task."""
        if not self._running or self._done is None:
            return
        self._stopping = True
        self._stop_deadline = anyio.current_time() + timeout
        self._wake(hurry=True)
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout + 5):
            await self._done.wait()
        if self._running:  # stuck inside a backend call: what is still queued is lost
            self.lost += self._queued - self._written
        if self.lost:
            raise RecorderError(
                f"{self.lost} queued records could not be written before close: {self.last_error!r}"
            ) from self.last_error

    # -- queueing (the hot path) ----------------------------------------------------------
    def _wake(self, hurry: bool = False) -> None:
        if self._arrived is not None and not self._arrived.is_set():
            self._arrived.set()
        if hurry and self._hurry is not None and not self._hurry.is_set():
            self._hurry.set()

    def put_start(self, start: StreamStart) -> None:
        self._pending.starts.append(start)
        self._queued += 1
        self._wake()

    def put_end(self, end: StreamEnd) -> None:
        self._pending.ends.append(end)
        self._queued += 1
        self._wake()

    def try_put(self, chunk: Chunk) -> bool:
        if self._queued - self._written >= self._max_pending:
            return False
        chunks = self._pending.chunks
        chunks.append(chunk)
        self._queued += 1
        n = len(chunks)
        if n == 1 or n == self._batch_size:  # later chunks find the writer already woken
            self._wake(hurry=n == self._batch_size)
        return True

    async def put(self, chunk: Chunk) -> bool:
        """Queue ``chunk``, waiting for room up to ``max_wait``; False (and counted) if dropped."""
        if self.try_put(chunk):
            return True
        wait = self.policy.max_wait
        with anyio.move_on_after(math.inf if wait is None else wait):
            while True:
                assert self._progress is not None
                await self._progress.wait()
                if self.try_put(chunk):
                    return True
        self.dropped += 1
        log.error("recorder queue full for %.1fs: dropped chunk %s of stream %s", wait, chunk.seq, chunk.stream_id)
        return False

    async def flush(self) -> None:
        """Wait until every op queued before this call has been written."""
        target = self._queued
        while self._written < target:
            if not self.alive:
                raise RecorderError("the recorder's writer is not running: open the recorder first")
            self._wake(hurry=True)
            assert self._progress is not None
            await self._progress.wait()

    # -- the writer task ----------------------------------------------------------------
    async def _run(self) -> None:
        assert self._arrived is not None and self._hurry is not None and self._done is not None
        try:
            while True:
                if self._queued == self._written:
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
                batch, self._pending = self._pending, self._batch_type()
                await self._write_with_retry(batch)
                self._written += len(batch)
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

    async def _write_with_retry(self, batch: Batch) -> None:
        delay = 0.05
        while True:
            try:
                await self._write(batch)
                return
            except Exception as exc:
                self.failures += 1
                self.last_error = exc
                if self._stopping and anyio.current_time() >= self._stop_deadline:
                    self.lost += len(batch)
                    log.error("recorder gave up on %d records at close: %r", len(batch), exc)
                    return
                log.warning("recorder write failed (%r); retrying in %.2fs", exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
