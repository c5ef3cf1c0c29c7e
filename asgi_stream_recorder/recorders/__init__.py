"""Recording: :class:`Recorder` (what users hold) over a :class:`Backend` (what stores),
:func:`open_recorder` (one from a URL), and the process-wide default."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .base import Backend, Batch, Chunk, Segment, StreamEnd, StreamRecord, StreamStart, StreamStatus
from .buffered import RecorderError, RecorderTimeout
from .memory import MemoryBackend, MemoryRecorder
from .recorder import Recorder
from .redaction import redact_secrets
from .sqlite import SQLiteBackend, SQLiteRecorder

if TYPE_CHECKING:
    from .postgres import PostgresBackend, PostgresRecorder
    from .redis import RedisBackend, RedisRecorder

__all__ = [
    "Backend",
    "Batch",
    "Chunk",
    "MemoryBackend",
    "MemoryRecorder",
    "PostgresBackend",
    "PostgresRecorder",
    "Recorder",
    "RecorderError",
    "RecorderTimeout",
    "RedisBackend",
    "RedisRecorder",
    "SQLiteBackend",
    "SQLiteRecorder",
    "Segment",
    "StreamEnd",
    "StreamRecord",
    "StreamStart",
    "StreamStatus",
    "default_recorder",
    "open_recorder",
    "redact_secrets",
]

#: imported on first use: their modules are small, but importing the package should not need them
_LAZY = {"PostgresBackend": "postgres", "PostgresRecorder": "postgres", "RedisBackend": "redis",
         "RedisRecorder": "redis"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: What the ``?name=value`` of a recorder URL may set (the rest goes to the driver), and its type.
_URL_OPTIONS = {"schema": str, "prefix": str, "ttl": float, "lease": float, "batch_size": int,
                "flush_interval": float, "max_pending": int, "max_pending_bytes": int}
#: options only some backends take
_SCHEME_OPTIONS = {"schema": ("postgresql", "postgres"), "prefix": ("redis", "rediss", "unix"),
                   "ttl": ("redis", "rediss", "unix")}


def open_recorder(url: str, **options: Any) -> Recorder:
    """A recorder for ``url`` (not opened yet: the middleware or ``async with`` opens it).

    ``sqlite:///relative.db``, ``sqlite:////absolute/path.db``, ``postgresql://user@host/db``
    (``postgres://`` too), ``redis://host:6379/0`` (``rediss://`` for TLS), ``memory://``.
    Recorder options may be given as keyword arguments or in the query string, e.g.
    ``postgresql://db/app?schema=streams&lease=60`` or ``redis://cache/0?prefix=app:&ttl=604800``;
    other query parameters are left for the database driver.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    driver_query = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _URL_OPTIONS:
            try:
                options.setdefault(name, _URL_OPTIONS[name](value))
            except ValueError:
                kind = _URL_OPTIONS[name].__name__
                raise ValueError(f"recorder URL option {name}={value!r} is not a {kind}") from None
        else:
            driver_query.append((name, value))
    rest = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(driver_query), parts.fragment))
    for name, schemes in _SCHEME_OPTIONS.items():
        if name in options and scheme not in schemes:
            raise ValueError(f"recorder option {name!r} is for {' and '.join(s + '://' for s in schemes)} "
                             f"recorders, not {parts.scheme}://")
    if scheme == "sqlite":
        if parts.netloc or not parts.path.startswith("/") or driver_query:
            raise ValueError("a SQLite recorder URL is sqlite:///relative/path.db or sqlite:////absolute/path.db")
        return SQLiteRecorder(parts.path[1:], **options)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresRecorder

        return PostgresRecorder(rest, **options)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisRecorder

        return RedisRecorder(rest, **options)
    if scheme == "memory":
        if driver_query or parts.netloc or parts.path:
            raise ValueError(f"a memory recorder URL is memory:// (with recorder options only), not {url!r}")
        return MemoryRecorder(**options)
    raise ValueError(f"unknown recorder URL scheme {parts.scheme + ':' if parts.scheme else url!r}: use sqlite:///, "
                     "postgresql://, redis:// or memory://")

_default: Recorder | None = None


def default_recorder() -> Recorder:
    """The recorder used when neither the decorator nor the middleware names one.

    ``open_recorder($ASGI_STREAM_RECORDER_URL)`` when that is set, else a :class:`SQLiteRecorder`
    at ``$ASGI_STREAM_RECORDER_DB`` (default ``./streams.db``); created once per process and
    opened lazily by the first stream.
    """
    global _default
    if _default is None:
        url = os.environ.get("ASGI_STREAM_RECORDER_URL")
        path = os.environ.get("ASGI_STREAM_RECORDER_DB", "streams.db")
        _default = open_recorder(url) if url else SQLiteRecorder(path)
    return _default
