"""Stream LLM tokens to browsers as Server-Sent Events, and keep a durable record of every stream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .app import stream_app
from .decorator import recorded_stream
from .join import join_response
from .manual import ManualStream, StreamEnded
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
    open_recorder,
    redact_secrets,
)
from .response import RecordedStreamResponse

if TYPE_CHECKING:
    from .recorders.postgres import PostgresRecorder
    from .recorders.redis import RedisRecorder
from .sentences import sentences
from .session import StreamSession, current_stream
from .sse import ServerSentEvent, SSEParser, encode
from .streams import streams_app

__all__ = [
    "Backend",
    "Chunk",
    "ManualStream",
    "MemoryBackend",
    "MemoryRecorder",
    "PostgresRecorder",
    "RecordedStreamResponse",
    "Recorder",
    "RecorderError",
    "RecorderTimeout",
    "RedisRecorder",
    "SQLiteBackend",
    "SQLiteRecorder",
    "SSEParser",
    "ServerSentEvent",
    "StreamEnded",
    "StreamRecord",
    "StreamRecorderMiddleware",
    "StreamSession",
    "StreamStatus",
    "current_stream",
    "default_recorder",
    "encode",
    "join_response",
    "open_recorder",
    "recorded_stream",
    "redact_secrets",
    "sentences",
    "stream_app",
    "streams_app",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # PostgreSQL and Redis recorders are imported on first use (their drivers are optional extras).
    if name in ("PostgresRecorder", "RedisRecorder"):
        from . import recorders

        return getattr(recorders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
