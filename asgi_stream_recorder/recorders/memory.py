"""An in-process recorder for tests: the same writer and semantics, kept in dicts."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import Batch, Chunk, Recorder, StreamRecord, StreamStatus, dump_metadata, to_datetime

__all__ = ["MemoryRecorder"]


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
    completed_at: float | None = None
    error: str | None = None
    chunks: dict[int, Chunk] = field(default_factory=dict)


def _stored(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata as a database would give it back (JSON types only)."""
    result: dict[str, Any] = json.loads(dump_metadata(metadata))
    return result


class MemoryRecorder(Recorder):
    """Keeps every stream in memory. Batching, flushing and backpressure behave as for SQLite."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._rows: dict[str, _Row] = {}

    def __repr__(self) -> str:
        return f"MemoryRecorder({len(self._rows)} streams)"

    async def write(self, batch: Batch) -> None:
        rows = self._rows
        for s in batch.starts:
            rows.setdefault(
                s.id,
                _Row(s.id, StreamStatus.STREAMING, s.created_at, s.path, s.method, s.text_event, s.owner,
                     _stored(s.metadata)),
            )
        for c in batch.chunks:
            rows[c.stream_id].chunks.setdefault(c.seq, c)
        for e in batch.ends:
            row = rows[e.id]
            row.status, row.completed_at, row.error = e.status, e.completed_at, e.error
            row.metadata = _stored(e.metadata)

    async def recover(self, is_orphan: Callable[[str], bool]) -> int:
        orphans = [r for r in self._rows.values() if r.status is StreamStatus.STREAMING and is_orphan(r.owner)]
        for row in orphans:
            row.status, row.completed_at = StreamStatus.INTERRUPTED, time.time()
            row.error = "process ended mid-stream"
            row.metadata["recovered"] = True
        return len(orphans)

    def _record(self, row: _Row) -> StreamRecord:
        ordered = [row.chunks[k] for k in sorted(row.chunks)]
        created = to_datetime(row.created_at)
        assert created is not None
        return StreamRecord(
            id=row.id,
            status=row.status,
            created_at=created,
            completed_at=to_datetime(row.completed_at),
            content="".join(c.data for c in ordered if c.event == row.text_event),
            chunk_count=len(ordered),
            error=row.error,
            metadata=copy.deepcopy(row.metadata),
            path=row.path,
            method=row.method,
        )

    async def get(self, stream_id: str) -> StreamRecord | None:
        row = self._rows.get(stream_id)
        return None if row is None else self._record(row)

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        row = self._rows.get(stream_id)
        if row is None:
            return []
        return [row.chunks[k] for k in sorted(row.chunks) if k > after]

    async def list_streams(self, status: StreamStatus | str | None = None, limit: int = 100) -> list[StreamRecord]:
        wanted = None if status is None else StreamStatus(status)
        rows = [r for r in self._rows.values() if wanted is None or r.status is wanted]
        rows.sort(key=lambda r: r.created_at, reverse=True)
        return [self._record(r) for r in rows[:limit]]
