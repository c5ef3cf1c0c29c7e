"""Where a test records: one place per test on each backend (a SQLite file, a PostgreSQL schema,
a Redis key prefix, a MemoryBackend), removed afterwards.

PostgreSQL and Redis are the real servers on 127.0.0.1 (``ASGI_STREAM_RECORDER_TEST_PG`` and
``ASGI_STREAM_RECORDER_TEST_REDIS`` point elsewhere); a test that needs one that is not there
skips with the reason (a failure under CI). Both drivers run on asyncio only, so tests on those
backends run on asyncio (see ``conftest.py``).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from asgi_stream_recorder import Recorder, SQLiteRecorder
from asgi_stream_recorder.recorders import Backend, MemoryBackend, SQLiteBackend

PG_DSN = os.environ.get("ASGI_STREAM_RECORDER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ASGI_STREAM_RECORDER_TEST_REDIS", "redis://127.0.0.1:6379/0")
BACKENDS = ["memory", "sqlite", "postgres", "redis"]
#: backends whose drivers run on asyncio only
ASYNCIO_ONLY = {"postgres", "redis"}


def reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def require(kind: str) -> None:
    """Skip (a failure under CI) when the server ``kind`` needs is not there."""
    if kind == "postgres" and not reachable(PG_DSN, 5432):
        pytest.skip(f"PostgreSQL is not reachable at {urlsplit(PG_DSN).netloc}: start it to test PostgresRecorder")
    if kind == "redis" and not reachable(REDIS_URL, 6379):
        pytest.skip(f"Redis is not reachable at {urlsplit(REDIS_URL).netloc}: start it to test RedisRecorder")


@dataclass
class Place:
    """One test's own place on one backend."""

    kind: str
    tmp_path: Path
    name: str = field(default_factory=lambda: f"asr_test_{uuid.uuid4().hex[:12]}")
    _memory: MemoryBackend = field(default_factory=MemoryBackend)

    @property
    def url(self) -> str:
        """The place as an ``open_recorder`` URL (what a server subprocess is given)."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.tmp_path / 'streams.db'}"
        if self.kind == "postgres":
            return f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}schema={self.name}"
        if self.kind == "redis":
            return f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}prefix={self.name}:"
        return "memory://"

    def backend(self) -> Backend:
        """A new backend over this place (for memory: always the same one, as a reopened file)."""
        if self.kind == "sqlite":
            return SQLiteBackend(self.tmp_path / "streams.db")
        if self.kind == "postgres":
            from asgi_stream_recorder.recorders.postgres import PostgresBackend

            return PostgresBackend(PG_DSN, schema=self.name)
        if self.kind == "redis":
            from asgi_stream_recorder.recorders.redis import RedisBackend

            return RedisBackend(REDIS_URL, prefix=f"{self.name}:")
        return self._memory

    def recorder(self, **options: Any) -> Recorder:
        if self.kind == "sqlite":
            return SQLiteRecorder(self.tmp_path / "streams.db", **options)
        if self.kind == "postgres":
            from asgi_stream_recorder.recorders.postgres import PostgresRecorder

            return PostgresRecorder(PG_DSN, schema=self.name, **options)
        if self.kind == "redis":
            from asgi_stream_recorder.recorders.redis import RedisRecorder

            return RedisRecorder(REDIS_URL, prefix=f"{self.name}:", **options)
        return Recorder(self._memory, **options)

    async def remove(self) -> None:
        """Drop the schema / delete the keys this test made."""
        if self.kind == "postgres":
            import asyncpg

            con = await asyncpg.connect(PG_DSN, timeout=5)
            try:
                await con.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
            finally:
                await con.close()
        elif self.kind == "redis":
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(REDIS_URL)
            try:
                keys = [k async for k in client.scan_iter(match=f"{self.name}:*", count=1000)]
                if keys:
                    await client.delete(*keys)
            finally:
                await client.aclose()


@pytest.fixture(name="kind", params=BACKENDS)
def every_kind(request: pytest.FixtureRequest) -> str:
    """Each backend in turn (import it, with ``place``, into a test module to use it)."""
    return str(request.param)


@pytest.fixture(name="kind", params=[kind for kind in BACKENDS if kind != "memory"])
def shared_kind(request: pytest.FixtureRequest) -> str:
    """Each backend several server processes can share: a file, a schema, a key prefix."""
    return str(request.param)


@pytest.fixture(name="place")
async def place_fixture(kind: str, tmp_path: Path) -> AsyncIterator[Place]:
    """The test's own place on the backend ``kind`` (skipped, or failed under CI, if its server
    is not there), removed afterwards."""
    require(kind)
    where = Place(kind, tmp_path)
    try:
        yield where
    finally:
        await where.remove()
