""":class:`Recorder`: the object users hold, over a :class:`~.base.Backend` that stores.

The recorder owns the queue and its writer (batching, bounds, retries, flushing), makes
every value storable before it is queued, and reads through its backend. ``SQLiteRecorder``
and ``MemoryRecorder`` are recorders over their backends; any other backend is used as
``Recorder(MyBackend(...))``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from .base import Backend, Chunk, StreamEnd, StreamRecord, StreamStart, StreamStatus, process_owner
from .buffered import BufferedWriter, Policy, RecorderError, _loop_token, _spawn
from .live import FOLLOWER_BUFFER, Follow, LiveHub
from .storable import UNSTORABLE_KEY, storable_metadata, storable_text

if TYPE_CHECKING:
    from ..manual import ManualStream, StreamHost

__all__ = ["Recorder"]

log = logging.getLogger("asgi_stream_recorder")


class Recorder:
    """Records streams into ``backend``, off the client's path.

    The record path (``start``, ``put_chunk``, ``finish``) only queues; a background
    writer owned by the recorder persists batches. Open it with ``async with recorder:``
    (the middleware does this in the app's lifespan) or let the first stream open it lazily.

    Tuning: ``batch_size`` chunks (or ``flush_interval`` seconds) trigger a write. The
    queue holds at most ``max_pending`` chunks and ``max_pending_bytes`` characters of
    chunk text; when it is full (the database is down or slower than the streams) a chunk
    is dropped at once and counted in its record's ``metadata["dropped_chunks"]``: the
    client never waits on storage. ``max_wait`` (seconds, or None for no bound) opts in to
    making a stream wait for room instead. Starts and ends are never dropped.

    Leases: while this process runs streams, the recorder refreshes one heartbeat for the
    process every ``lease / 3`` seconds; every recorder that is open sweeps about as often,
    ending as ``interrupted`` (chunks kept) any stream whose process has not been heard of
    for ``lease`` seconds, on any host. A process that dies (SIGKILL, a lost machine) thus
    leaves no stream ``streaming`` for much longer than ``lease``; keep it well above the
    longest database outage you expect a live process to ride out.

    ``redact``: a function of text returning text, run by the writer over what is stored
    (chunk data, content, error, strings in metadata); the client still gets the original.
    :func:`~asgi_stream_recorder.recorders.redaction.redact_secrets` is a ready-made one.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        batch_size: int = 2000,
        flush_interval: float = 0.05,
        max_pending: int = 200_000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        max_wait: float | None = 0.0,
        lease: float = 30.0,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be a positive number of seconds, not {lease!r}")
        self.backend = backend
        #: seconds a process may go unheard of before its streams are ended as ``interrupted``
        self.lease = lease
        self._writer = BufferedWriter(
            backend,
            Policy(batch_size=batch_size, interval=flush_interval, max_pending=max_pending,
                   max_pending_bytes=max_pending_bytes, max_wait=max_wait, redact=redact),
        )
        #: Queue a chunk ``(stream_id, seq, data, event, at_ms)`` if there is room; False: dropped.
        self.put_chunk: Callable[[str, int, str, str | None, float], bool] = self._writer.put_chunk
        #: the streams running in this process, for followers and cancels
        self.live = LiveHub()
        self._changed: anyio.Event | None = None  # set by the watcher when records may have changed
        self._waiters = 0  # tasks waiting for a change
        self._watcher_loop: object = None
        self._wake_watcher: anyio.Event | None = None  # set to end the watcher's idle sleep
        self._generation = 0  # counts closes: a watcher of an earlier opening stops
        self._opened = False
        #: True when opened by the user or the middleware, who will close it; a lazily
        #: opened recorder is flushed at the end of each stream instead.
        self.managed = False
        #: the middleware running with this recorder (during its lifespan), which ends manual streams at shutdown
        self.host: StreamHost | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend!r})"

    @property
    def waits_for_room(self) -> bool:
        """Whether a stream waits (up to ``max_wait``) when the queue is full, rather than drop at once."""
        return self._writer.policy.max_wait != 0

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        """Connect the backend and start the writer. Idempotent."""
        await self._ensure_open()
        self.managed = True
        self._watch()  # sweeps expired leases while open, even with no stream here

    async def ensure_open(self) -> None:
        """Open lazily on first use (also after the event loop that opened it went away)."""
        if not self._opened or not self._writer.alive:
            await self._ensure_open()

    async def _ensure_open(self) -> None:
        if not self._opened:
            await self.backend.connect()
            self._opened = True
        if not self._writer.alive:
            self._writer.start()

    async def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (retrying for up to ``timeout`` seconds), stop the writer, disconnect.

        Raises :class:`~asgi_stream_recorder.RecorderError` naming how many records were lost.
        """
        if not self._opened:
            return
        try:
            await self._writer.stop(timeout)
        finally:
            self._opened = False
            self.managed = False
            self._generation += 1
            self._poke_watcher()
            await self.backend.close()

    async def __aenter__(self) -> Recorder:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def stream(self, *, metadata: Mapping[str, Any] | None = None, key: str | None = None,
               text_event: str | None = None, id: str | None = None) -> ManualStream:
        """A stream recorded by hand: ``async with recorder.stream() as s: await s.append(text)``
        (see :class:`~asgi_stream_recorder.manual.ManualStream`)."""
        from ..manual import ManualStream  # (manual imports the session, which imports this module)

        return ManualStream(self, metadata=metadata, key=key, text_event=text_event, id=id)

    # -- the record path: queue only, never touch storage ------------------------------
    def start(self, start: StreamStart) -> None:
        """Queue a stream's start (its metadata made storable here, on the event loop)."""
        start.metadata = _storable(start.metadata, start.id, log_notes=False)
        start.path, start.method = _text(start.path), _text(start.method)
        self._writer.put_start(start)

    async def put_chunk_waiting(self, stream_id: str, seq: int, data: str, event: str | None, at_ms: float) -> bool:
        """Queue a chunk, waiting for room up to ``max_wait``; False if it had to be dropped."""
        return await self._writer.put_chunk_waiting(stream_id, seq, data, event, at_ms)

    def finish(self, end: StreamEnd) -> None:
        """Queue a stream's end (metadata, error and text made storable here)."""
        end.metadata = _storable(end.metadata, end.id, log_notes=True)
        end.error, end.content = _text(end.error), _text(end.content)
        self._writer.put_end(end)

    def note_dropped(self) -> None:
        """Count a chunk a stream had to drop (in ``stats["dropped"]``; the stream counts its own)."""
        self._writer.dropped += 1

    async def flush(self, timeout: float | None = 10.0) -> None:
        """Return once everything queued before this call is durable in the backend.

        Raises :class:`~asgi_stream_recorder.RecorderTimeout` after ``timeout`` seconds
        (None: no bound) and :class:`~asgi_stream_recorder.RecorderError` if records were lost.
        """
        await self._writer.flush(timeout)

    @property
    def stats(self) -> dict[str, Any]:
        """Writer counters: queued, written, pending, dropped, write failures, lost, last error."""
        return self._writer.stats()

    # -- reading -------------------------------------------------------------------------
    async def get(self, stream_id: str) -> StreamRecord | None:
        """One stream's record, or None."""
        return await self.backend.get(stream_id)

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        """The stream's stored chunks with ``seq > after``, in order."""
        return await self.backend.chunks(stream_id, after)

    async def list_streams(
        self, status: StreamStatus | str | None = None, limit: int = 100, *, key: str | None = None
    ) -> list[StreamRecord]:
        """Streams, newest first, optionally only those with ``status`` and ``key``."""
        return await self.backend.list_streams(status, limit, key)

    # -- following and stopping, from this process or another ------------------------------
    def follow(self, stream_id: str, after: int = 0, *, buffer: int = FOLLOWER_BUFFER) -> Follow:
        """The stream's chunks after seq ``after``: replayed from the record, then live until it
        ends (``async for chunk in recorder.follow(sid)``); then ``.status`` says how it ended.
        Works wherever the stream runs: from memory when here, else through the backend."""
        return Follow(self, stream_id, after, buffer=buffer)

    async def cancel(self, stream_id: str) -> bool:
        """Stop a stream wherever it runs (recorded ``cancelled``, ``metadata["cancelled_by"] =
        "request"``). True if it was running. Here it stops at once; in another process as
        soon as that process's recorder looks for requests (within about a quarter second)."""
        if self.live.cancel(stream_id):
            return True
        await self.ensure_open()
        await self.settle(stream_id)  # a stream that just ended here: its end is written first
        if await self.backend.request_cancel(stream_id):
            return True
        if await self.backend.get(stream_id) is None and await self.get_soon(stream_id) is not None:
            return await self.backend.request_cancel(stream_id)  # it had only just started elsewhere
        return False

    async def get_soon(self, stream_id: str, timeout: float = 2.0) -> StreamRecord | None:
        """The record, waiting up to ``timeout`` for one that was just started (perhaps in
        another process, whose recorder has not written it yet); None if there is none."""
        await self.settle(stream_id)
        deadline = anyio.current_time() + timeout
        while (record := await self.backend.get(stream_id)) is None:
            if not _recent(stream_id) or anyio.current_time() >= deadline:
                return None
            await self.wait_for_change(min(0.1, max(deadline - anyio.current_time(), 0.0)))
        return record

    def queued_chunks(self, stream_id: str) -> list[Chunk]:
        """The stream's chunks this recorder has queued but not yet stored."""
        return self._writer.queued_chunks(stream_id)

    async def settle(self, stream_id: str, timeout: float = 2.0) -> None:
        """Write what this recorder still holds of a stream, so that reading the backend sees it
        (bounded: during an outage the reader sees what is stored)."""
        if self._writer.alive and self._writer.has_queued(stream_id):
            try:
                await self._writer.flush(timeout)
            except RecorderError:
                pass

    async def wait_for_change(self, timeout: float) -> None:
        """Return when records may have changed (here or in another process), or after ``timeout``."""
        self._watch()
        if self._changed is None:
            self._changed = anyio.Event()
        changed = self._changed
        self._waiters += 1
        self._poke_watcher()  # an idle watcher sleeps until its next sweep: it must listen now
        try:
            with anyio.move_on_after(timeout):
                await changed.wait()
        finally:
            self._waiters -= 1

    def stream_started(self) -> None:
        """A stream of this process began: keep its heartbeat and look for cancel requests."""
        self._watch()
        self._poke_watcher()

    def _poke_watcher(self) -> None:
        if self._wake_watcher is not None:
            self._wake_watcher.set()

    def _watch(self) -> None:
        if self._watcher_loop is not _loop_token():
            self._watcher_loop = _loop_token()
            _spawn(self._watcher)

    async def _watcher(self) -> None:
        """One task per recorder, owned by it (it ends when the recorder closes, or a second
        after its last stream and waiter when nobody opened the recorder for good).

        While this process runs streams: refresh their lease (one heartbeat per ``lease / 3``)
        and pass cancel requests from elsewhere on to them. While someone waits for changes:
        ask the backend for changes and wake them. Always: sweep streams whose lease ran out,
        about every ``lease / 3`` (a little jitter keeps workers from sweeping in step)."""
        generation = self._generation
        every = self.lease / 3
        last_cancels = next_beat = 0.0
        next_sweep = anyio.current_time() + every  # (the middleware sweeps at startup itself)
        idle = 0
        try:
            while generation == self._generation:
                busy = bool(self._waiters or self.live.streams)
                idle = 0 if busy else idle + 1
                if not busy and not self.managed and idle > 4:
                    break  # lingers a second after the last stream or waiter, not to restart at once
                try:
                    if busy or not self.managed:
                        await self.backend.wait_for_change(0.25)
                    else:  # open and idle: nothing to poll for until the next sweep, or a stream
                        self._wake_watcher = anyio.Event()
                        with anyio.move_on_after(max(next_sweep - anyio.current_time(), 0.0)):
                            await self._wake_watcher.wait()
                        self._wake_watcher = None
                    changed, self._changed = self._changed, None
                    if changed is not None:
                        changed.set()
                    now = anyio.current_time()
                    if self.live.streams:
                        if now >= next_beat:
                            next_beat = now + every
                            await self.backend.heartbeat(process_owner(), time.time())
                        if now - last_cancels >= 0.2:  # at most 5 looks a second
                            last_cancels = now
                            for stream_id in await self.backend.cancel_requests(list(self.live.streams)):
                                self.live.cancel(stream_id)
                    if now >= next_sweep and self._opened:
                        next_sweep = now + every * random.uniform(0.8, 1.2)
                        await self.recover()
                except Exception as exc:  # the backend is down: try again later
                    log.debug("recorder watcher: %r", exc)
                    await anyio.sleep(0.5)
        finally:
            self._watcher_loop = None

    async def recover(self) -> int:
        """End streams whose lease ran out (their process unheard of for ``lease`` seconds) as
        ``interrupted``, chunks kept; returns how many. Runs at startup and periodically."""
        ended = await self.backend.recover(time.time() - self.lease)
        if ended:
            log.warning("asgi_stream_recorder: %d streams of processes unheard of for %g s ended as interrupted",
                        ended, self.lease)
        return ended

    async def purge(self, older_than: timedelta | float, status: StreamStatus | str | Iterable[StreamStatus | str]
                    | None = None, *, dry_run: bool = False, batch_size: int = 500) -> int:
        """Delete the streams created more than ``older_than`` ago (a timedelta, or seconds), with
        their chunks; only those with ``status`` (one, or several) when given. Returns how many
        (``dry_run``: how many would go, deleting nothing).

        A stream still ``streaming`` is never deleted. The backend deletes ``batch_size`` streams
        per transaction, so the writer, and streams being recorded, never wait for long.
        """
        seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else float(older_than)
        if not seconds >= 0:
            raise ValueError(f"older_than must be a duration of at least 0, not {older_than!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size!r}")
        statuses = None if status is None else {StreamStatus(s) for s in ([status] if isinstance(status, str)
                                                                          else status)}
        if statuses is not None and StreamStatus.STREAMING in statuses:
            raise ValueError("streams still streaming are never purged: name finished statuses "
                             "(completed, failed, cancelled, interrupted)")
        await self.ensure_open()
        purged = await self.backend.purge(time.time() - seconds, statuses, batch_size=batch_size, dry_run=dry_run)
        if purged and not dry_run:
            log.info("asgi_stream_recorder: purged %d streams older than %g s", purged, seconds)
        return purged


def _recent(stream_id: str, window_ms: float = 10_000) -> bool:
    """Whether an id made by ``new_stream_id`` (a millisecond clock prefix) is from the last few seconds."""
    try:
        created_ms = int(stream_id[:12], 16)
    except ValueError:
        return False
    return abs(time.time() * 1000 - created_ms) < window_ms


def _storable(metadata: dict[str, Any], stream_id: str, *, log_notes: bool) -> dict[str, Any]:
    clean, notes = storable_metadata(metadata)
    if notes:
        previous = clean.get(UNSTORABLE_KEY)
        clean[UNSTORABLE_KEY] = [*(previous if isinstance(previous, list) else []), *notes]
        if log_notes:
            log.warning("stream %s: metadata stored with changes: %s", stream_id, "; ".join(notes))
    return clean


def _text(value: str | None) -> str | None:
    return None if value is None else storable_text(value)[0]
