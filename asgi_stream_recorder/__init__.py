"""Stream LLM tokens to browsers as Server-Sent Events, and keep a durable record of every stream."""

from __future__ import annotations

from .decorator import recorded_stream
from .recorders import (
    Chunk,
    MemoryRecorder,
    Recorder,
    RecorderError,
    SQLiteRecorder,
    StreamRecord,
    StreamStatus,
    default_recorder,
)
from .response import RecordedStreamResponse
from .session import StreamSession, current_stream
from .sse import ServerSentEvent, SSEParser, encode

__all__ = [
    "Chunk",
    "MemoryRecorder",
    "RecordedStreamResponse",
    "Recorder",
    "RecorderError",
    "SQLiteRecorder",
    "SSEParser",
    "ServerSentEvent",
    "StreamRecord",
    "StreamSession",
    "StreamStatus",
    "current_stream",
    "default_recorder",
    "encode",
    "recorded_stream",
]

__version__ = "0.1.0"
