"""A process that records one stream into a SQLite file and then hangs mid-stream, for
``tests/test_reliability_recorder.py`` to SIGKILL (crash recovery).

Usage: ``python -m tests.apps.rel_rec_crash_stream DB TOKENS [BACKEND]``. The stream yields
``TOKENS`` tokens (``tok <i> ``, 10 ms apart), then waits forever; its client reads forever.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request

from asgi_stream_recorder import SQLiteRecorder, stream_app
from asgi_stream_recorder.testing import sse_client


async def main(db: str, tokens: int) -> None:
    recorder = SQLiteRecorder(db, flush_interval=0.01, lease=1.0)

    async def source(request: Request) -> AsyncIterator[str]:
        for i in range(tokens):
            yield f"tok {i} "
            await anyio.sleep(0.01)
        await anyio.sleep_forever()

    app = stream_app(source, recorder=recorder, ping=None)
    async with recorder, sse_client(app, timeout=3600) as client, client.stream("GET", "/") as s:
        async for _ in s.events():
            pass


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]), backend=sys.argv[3] if len(sys.argv) > 3 else "asyncio")
