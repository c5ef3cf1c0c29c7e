"""An in-process backend for tests: the same recorder and semantics, kept in dicts."""

from __future__ import annotations

import copy
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import anyio

from .base import Backend, Batch, Chunk, StreamRecord, StreamStatus, recovered_end, to_datetime
from .recorder import Recorder

__all__ = ["MemoryBackend", "MemoryRecorder"]


@dataclass(slots=True)
class _Row:
    id: str
    status: StreamStatus
    created_at: float
    path: str | None
    method: str | None
    text_event: str | None
    owner: str
    metadata: dict[str, Any]
    key: str | None = None
    format: str | None = None
    completed_at: float | None = None
    error: str | None = None
    chunks: dict[int, Chunk] = field(default_factory=dict)
    content: str | None = None  # frozen at the end when the end says (else computed from the chunks)


def _stored(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata as a database would give it back (a copy, through JSON: strict, as real backends are)."""
    result: dict[str, Any] = json.loads(json.dumps(metadata, ensure_ascii=False, allow_nan=False))
    return result


class MemoryBackend(Backend):
    """Keeps every stream in a dict."""

    def __init__(self) -> None:
        self.rows: dict[str, _Row] = {}
        self.cancels: set[str] = set()
        #: each process's last heartbeat (epoch seconds)
        self.owners: dict[str, float] = {}
        self._changed: anyio.Event | None = None  # made on first wait (an event needs a running loop)

    def __repr__(self) -> str:
        return f"<{len(self.rows)} streams in memory>"

    async def write(self, batch: Batch) -> None:
        rows = self.rows
        # Check everything first, then apply: a batch is all or nothing, as in a transaction.
        starts = [(s, _stored(s.metadata)) for s in batch.starts if s.id not in rows]
        known = rows.keys() | {s.id for s, _ in starts}
        for sid in [seg.stream_id for seg in batch.segments] + [e.id for e in batch.ends]:
            if sid not in known:
                raise KeyError(f"stream {sid} has records but was never started")
        ends = [(e, _stored(e.metadata)) for e in batch.ends]
        for s, meta in starts:
            rows[s.id] = _Row(s.id, StreamStatus.STREAMING, s.created_at, s.path, s.method, s.text_event, s.owner, meta,
                              s.key, s.format)
        for seg in batch.segments:
            stored = rows[seg.stream_id].chunks
            for chunk in seg.chunks():
                stored.setdefault(chunk.seq, chunk)
        for e, meta in ends:
            row = rows[e.id]
            row.status, row.completed_at, row.error, row.metadata = e.status, e.completed_at, e.error, meta
            row.content = e.content
            self.cancels.discard(e.id)
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for_change(self, timeout: float) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._changed.wait()

    async def request_cancel(self, stream_id: str) -> bool:
        row = self.rows.get(stream_id)
        if row is None or row.status is not StreamStatus.STREAMING:
            return False
        self.cancels.add(stream_id)
        self._notify()
        return True

    async def cancel_requests(self, stream_ids: Collection[str]) -> list[str]:
        found = [sid for sid in stream_ids if sid in self.cancels]
        self.cancels.difference_update(found)
        return found

    async def heartbeat(self, owner: str, at: float) -> None:
        self.owners[owner] = at

    async def recover(self, stale_before: float) -> int:
        owners = self.owners
        orphans = [r for r in self.rows.values() if r.status is StreamStatus.STREAMING
                   and max(owners.get(r.owner, r.created_at), r.created_at) < stale_before]
        for owner in [o for o, seen in owners.items() if seen < stale_before]:
            del owners[owner]
        for row in orphans:
            end = recovered_end(row.id, row.created_at, row.text_event, row.metadata, self._ordered(row))
            row.status, row.completed_at, row.error = end.status, end.completed_at, end.error
            row.metadata = end.metadata
        return len(orphans)

    @staticmethod
    def _ordered(row: _Row) -> list[Chunk]:
        return [row.chunks[k] for k in sorted(row.chunks)]

    def _record(self, row: _Row) -> StreamRecord:
        ordered = self._ordered(row)
        created = to_datetime(row.created_at)
        assert created is not None
        return StreamRecord(
            id=row.id,
            status=row.status,
            created_at=created,
            completed_at=to_datetime(row.completed_at),
            content=row.content if row.content is not None else "".join(
                c.data for c in ordered if c.event == row.text_event),
            chunk_count=len(ordered),
            error=row.error,
            metadata=copy.deepcopy(row.metadata),
            path=row.path,
            method=row.method,
            key=row.key,
            format=row.format,
            text_event=row.text_event,
        )

    async def get(self, stream_id: str) -> StreamRecord | None:
        row = self.rows.get(stream_id)
        return None if row is None else self._record(row)

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        row = self.rows.get(stream_id)
        if row is None:
            return []
        return [row.chunks[k] for k in sorted(row.chunks) if k > after]

    async def list_streams(
        self, status: StreamStatus | str | None = None, limit: int = 100, key: str | None = None
    ) -> list[StreamRecord]:
        wanted = None if status is None else StreamStatus(status)
        rows = [r for r in self.rows.values()
                if (wanted is None or r.status is wanted) and (key is None or r.key == key)]
        rows.sort(key=lambda r: r.created_at, reverse=True)
        return [self._record(r) for r in rows[:limit]]

    async def purge(self, created_before: float, statuses: Collection[StreamStatus] | None = None, *,
                    batch_size: int = 500, dry_run: bool = False) -> int:
        """Delete finished streams created before ``created_before`` (all at once: dicts do not block)."""
        doomed = [r.id for r in self.rows.values() if r.status is not StreamStatus.STREAMING
                  and r.created_at < created_before and (statuses is None or r.status in statuses)]
        if not dry_run:
            for sid in doomed:
                del self.rows[sid]
                self.cancels.discard(sid)
        return len(doomed)


class MemoryRecorder(Recorder):
    """A :class:`Recorder` over a :class:`MemoryBackend`: batching, flushing and backpressure
    behave as for SQLite. Takes the recorder's tuning options."""

    backend: MemoryBackend

    def __init__(self, **options: Any) -> None:
        super().__init__(MemoryBackend(), **options)

    def __repr__(self) -> str:
        return f"MemoryRecorder({len(self.backend.rows)} streams)"
