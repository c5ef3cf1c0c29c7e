"""Recording: :class:`Recorder` (what users hold) over a :class:`Backend` (what stores), and the
process-wide default."""

from __future__ import annotations

import os

from .base import Backend, Batch, Chunk, Segment, StreamEnd, StreamRecord, StreamStart, StreamStatus
from .buffered import RecorderError, RecorderTimeout
from .memory import MemoryBackend, MemoryRecorder
from .recorder import Recorder
from .sqlite import SQLiteBackend, SQLiteRecorder

__all__ = [
    "Backend",
    "Batch",
    "Chunk",
    "MemoryBackend",
    "MemoryRecorder",
    "Recorder",
    "RecorderError",
    "RecorderTimeout",
    "SQLiteBackend",
    "SQLiteRecorder",
    "Segment",
    "StreamEnd",
    "StreamRecord",
    "StreamStart",
    "StreamStatus",
    "default_recorder",
]

_default: Recorder | None = None


def default_recorder() -> Recorder:
    """The recorder used when neither the decorator nor the middleware names one.

    A :class:`SQLiteRecorder` at ``$ASGI_STREAM_RECORDER_DB`` (default ``./streams.db``),
    created once per process and opened lazily by the first stream.
    """
    global _default
    if _default is None:
        _default = SQLiteRecorder(os.environ.get("ASGI_STREAM_RECORDER_DB", "streams.db"))
    return _default
