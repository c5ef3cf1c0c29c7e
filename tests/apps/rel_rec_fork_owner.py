"""Which process owns a stream recorded in a forked worker, for ``tests/test_reliability_recorder.py``.

Usage: ``python -m tests.apps.rel_rec_fork_owner DB BACKEND METHOD OUT`` with METHOD ``os.fork``
or ``multiprocessing``. The package is imported and one stream recorded in this process first
(so anything computed at import or on first use is computed here); then a child is forked
(``os.fork()`` or a ``multiprocessing`` "fork" context process) and records one stream into the
same SQLite file. OUT receives JSON: each process's pid, ``process_owner()`` and stream id.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request

from asgi_stream_recorder import SQLiteRecorder, stream_app
from asgi_stream_recorder.recorders.base import process_owner
from asgi_stream_recorder.testing import sse_client


async def record_one(db: str) -> str:
    """Record one short stream into ``db``; its id."""
    recorder = SQLiteRecorder(db)

    async def source(request: Request) -> AsyncIterator[str]:
        yield "hello"

    app = stream_app(source, recorder=recorder, ping=None)
    async with recorder, sse_client(app) as client, client.stream("GET", "/") as s:
        await s.collect()
        stream_id = s.stream_id
    assert stream_id
    return stream_id


def report(db: str, backend: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "owner": process_owner(), "stream": anyio.run(record_one, db, backend=backend)}


def child(db: str, backend: str, out: str) -> None:
    Path(out).write_text(json.dumps(report(db, backend)))


def main(db: str, backend: str, method: str, out: str) -> None:
    parent = report(db, backend)
    child_out = out + ".child"
    if method == "os.fork":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child(db, backend, child_out)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    elif method == "multiprocessing":
        process = multiprocessing.get_context("fork").Process(target=child, args=(db, backend, child_out))
        process.start()
        process.join(60)
        pid, code = process.pid, process.exitcode
    else:
        raise SystemExit(f"unknown METHOD {method!r}")
    if code != 0:
        raise SystemExit(f"the forked child {pid} exited with {code}")
    result = {"parent": parent, "child": json.loads(Path(child_out).read_text()), "forked_pid": pid}
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:5])
