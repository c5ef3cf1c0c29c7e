"""pytest plugin (registered through the ``pytest11`` entry point): fixtures for stream tests.

``memory_recorder`` and ``sqlite_recorder`` are async fixtures run by the anyio pytest
plugin, on whichever backend the test runs (they request ``anyio_backend``, so they work
with the parametrised ``anyio_backend`` of a project's conftest). ``sse_client`` is a
factory: ``async with sse_client(app, lifespan=True) as client: ...``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ..recorders import MemoryRecorder, SQLiteRecorder
from .client import SSEClientFactory
from .client import sse_client as _sse_client

__all__ = ["memory_recorder", "sqlite_recorder", "sse_client"]


@pytest.fixture
async def memory_recorder(anyio_backend: Any) -> AsyncIterator[MemoryRecorder]:
    """A fresh, opened :class:`MemoryRecorder`, closed after the test."""
    recorder = MemoryRecorder()
    async with recorder:
        yield recorder


@pytest.fixture
async def sqlite_recorder(anyio_backend: Any, tmp_path: Path) -> AsyncIterator[SQLiteRecorder]:
    """An opened :class:`SQLiteRecorder` on a file in ``tmp_path``, closed after the test."""
    recorder = SQLiteRecorder(tmp_path / "streams.db")
    async with recorder:
        yield recorder


@pytest.fixture
def sse_client() -> SSEClientFactory:
    """The :func:`asgi_stream_recorder.testing.sse_client` factory:
    ``async with sse_client(app, lifespan=True, timeout=5) as client``."""
    return _sse_client
