"""Assertions on what a recorder stored, with failure messages that show the record."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from ..recorders import Recorder, StreamRecord, StreamStatus

__all__ = ["assert_recorded", "wait_recorded"]

_MISSING: Any = object()


async def wait_recorded(
    recorder: Recorder, stream_id: str, *, final: bool = True, timeout: float = 5.0
) -> StreamRecord:
    """Flush ``recorder`` and return the stream's record, waiting (up to ``timeout``
    seconds) until it exists and, with ``final``, until it is no longer ``streaming``."""
    record: StreamRecord | None = None
    with anyio.move_on_after(timeout):
        while True:
            await recorder.flush()
            record = await recorder.get(stream_id)
            if record is not None and (not final or record.status is not StreamStatus.STREAMING):
                return record
            await anyio.sleep(0.01)
    if record is None:
        recent = [r.id for r in await recorder.list_streams(limit=5)]
        raise AssertionError(
            f"no record of stream {stream_id!r} in {recorder!r} after {timeout}s (most recent streams: {recent})"
        )
    raise AssertionError(f"stream {stream_id!r} was still streaming after {timeout}s:\n{_describe(record)}")


def _describe(record: StreamRecord) -> str:
    content = record.content if len(record.content) <= 300 else record.content[:300] + "…"
    return (
        f"  status:      {record.status.value}\n"
        f"  content:     {content!r}\n"
        f"  chunk_count: {record.chunk_count}\n"
        f"  error:       {record.error!r}\n"
        f"  path:        {record.method} {record.path}\n"
        f"  metadata:    {record.metadata!r}"
    )


def _short(items: list[str], limit: int = 10) -> str:
    if len(items) <= limit:
        return repr(items)
    return repr(items[:limit])[:-1] + f", … ({len(items) - limit} more)]"


def _chunks_mismatch(stored: list[str], expected: list[str]) -> str:
    pairs = enumerate(zip(stored, expected, strict=False))
    at = next((i for i, (a, b) in pairs if a != b), min(len(stored), len(expected)))
    return (
        f"chunks differ at index {at} ({len(stored)} stored, {len(expected)} expected): "
        f"stored {_short(stored[at:])}, expected {_short(expected[at:])}"
    )


async def assert_recorded(
    recorder: Recorder,
    stream_id: str | None,
    *,
    status: StreamStatus | str | None = None,
    content: str | None = None,
    chunk_count: int | None = None,
    chunks: Sequence[str] | None = None,
    metadata_includes: Mapping[str, Any] | None = None,
    error: str | None = _MISSING,
    path: str | None = None,
    timeout: float = 5.0,
) -> StreamRecord:
    """Flush ``recorder``, then check stream ``stream_id``'s record; return it.

    Waits (up to ``timeout`` seconds) for the record to exist and, unless ``status`` is
    ``"streaming"``, to be final. Only the given expectations are checked: ``status``,
    ``content`` (the joined text), ``chunk_count``, ``chunks`` (each chunk's data, in
    order), ``metadata_includes`` (these keys with these values), ``error`` (a substring
    of the stored error, or ``None`` for no error), ``path``. Every mismatch is listed in
    one ``AssertionError`` together with the record.
    """
    if not stream_id:
        raise AssertionError("no stream id to check (did the response carry an X-Stream-Id header?)")
    wanted_status = None if status is None else StreamStatus(status)
    record = await wait_recorded(
        recorder, stream_id, final=wanted_status is not StreamStatus.STREAMING, timeout=timeout
    )
    problems: list[str] = []
    if wanted_status is not None and record.status is not wanted_status:
        problems.append(f"status is {record.status.value!r}, expected {wanted_status.value!r}")
    if content is not None and record.content != content:
        problems.append(f"content is {record.content!r}, expected {content!r}")
    if chunk_count is not None and record.chunk_count != chunk_count:
        problems.append(f"chunk_count is {record.chunk_count}, expected {chunk_count}")
    if chunks is not None:
        stored = [c.data for c in await recorder.chunks(stream_id)]
        if stored != list(chunks):
            problems.append(_chunks_mismatch(stored, list(chunks)))
    if metadata_includes is not None:
        for key, value in metadata_includes.items():
            if key not in record.metadata:
                problems.append(f"metadata has no key {key!r} (keys: {sorted(record.metadata)})")
            elif record.metadata[key] != value:
                problems.append(f"metadata[{key!r}] is {record.metadata[key]!r}, expected {value!r}")
    if error is not _MISSING:
        if error is None and record.error is not None:
            problems.append(f"error is {record.error!r}, expected none")
        elif error is not None and (record.error is None or error not in record.error):
            problems.append(f"error is {record.error!r}, expected it to contain {error!r}")
    if path is not None and record.path != path:
        problems.append(f"path is {record.path!r}, expected {path!r}")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise AssertionError(
            f"stream {stream_id} was not recorded as expected:\n{listed}\nrecord:\n{_describe(record)}"
        )
    return record
