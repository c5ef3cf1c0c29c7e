"""Recorder backends behind one protocol (:class:`Recorder`), and the process-wide default."""

from __future__ import annotations

import os

from .base import Batch, Chunk, Recorder, StreamEnd, StreamRecord, StreamStart, StreamStatus
from .buffered import RecorderError
from .memory import MemoryRecorder
from .sqlite import SQLiteRecorder

__all__ = [
    "Batch",
    "Chunk",
    "MemoryRecorder",
    "Recorder",
    "RecorderError",
    "SQLiteRecorder",
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
