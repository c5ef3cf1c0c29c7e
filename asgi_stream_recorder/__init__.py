"""Stream LLM tokens to browsers as Server-Sent Events, and keep a durable record of every stream."""

from __future__ import annotations

from .app import stream_app
from .decorator import recorded_stream
from .join import join_response
from .middleware import StreamRecorderMiddleware
from .recorders import (
    Backend,
    Chunk,
    MemoryBackend,
    MemoryRecorder,
    Recorder,
    RecorderError,
    RecorderTimeout,
    SQLiteBackend,
    SQLiteRecorder,
    StreamRecord,
    StreamStatus,
    default_recorder,
)
from .response import RecordedStreamResponse
from .session import StreamSession, current_stream
from .sse import ServerSentEvent, SSEParser, encode
from .streams import streams_app

__all__ = [
    "Backend",
    "Chunk",
    "MemoryBackend",
    "MemoryRecorder",
    "RecordedStreamResponse",
    "Recorder",
    "RecorderError",
    "RecorderTimeout",
    "SQLiteBackend",
    "SQLiteRecorder",
    "SSEParser",
    "ServerSentEvent",
    "StreamRecord",
    "StreamRecorderMiddleware",
    "StreamSession",
    "StreamStatus",
    "current_stream",
    "default_recorder",
    "encode",
    "join_response",
    "recorded_stream",
    "stream_app",
    "streams_app",
]

__version__ = "0.1.0"
