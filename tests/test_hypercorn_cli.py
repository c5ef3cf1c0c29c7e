"""SIGTERM to the ``hypercorn`` CLI ends every open stream properly (defect 14).

Under the CLI the app never runs in the process that gets the signal: hypercorn spawns
worker processes (one with the default ``--workers 1``), and on SIGTERM/SIGINT the parent
only sets a ``multiprocessing.Event`` that each worker polls. These tests run the real CLI
(``python -m hypercorn``) on ``tests.apps.hypercorn_app`` (endless streams recorded into a
SQLite file), open a few streams (on every worker), send SIGTERM (to the parent alone, or to
the parent and its workers at once), and check what a user relies on: every client's last
event is ``event: shutdown`` (not a broken connection), each record is ``interrupted``
holding exactly the chunks its client got, and the server exits promptly instead of waiting
out its graceful timeout.

The server runs its own event loop (asyncio or trio per ``--worker-class``) whatever the
test's backend is, so the client side runs on asyncio only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.abc import Process
from httpx_sse import aconnect_sse

from asgi_stream_recorder import StreamStatus

from .apps.streaming_app import token
from .servers import free_port, wait_until_answering
from .test_shutdown import Received, assert_shutdown_event, read_records

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.hypercorn_app:app"
GRACEFUL_TIMEOUT = 6  # hypercorn's --graceful-timeout: a prompt exit is well under it
PROMPT_EXIT = 3  # seconds from SIGTERM to the parent's exit
STREAMS_PER_WORKER = 2
AFTER = 3  # data events every client has before the signal


@dataclass
class Server:
    proc: Process
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def hypercorn_cli(tmp_path: Path, db: Path, *args: str) -> AsyncIterator[Server]:
    """``python -m hypercorn`` on the test app, in its own session, until it answers; on the
    way out the whole session (parent and workers) is killed if still there."""
    port = free_port()
    log = tmp_path / "hypercorn.log"
    env = {**os.environ, "ASR_TEST_DB": str(db), "ASR_TEST_DELAY": "0.05", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "hypercorn", APP, "--bind", f"127.0.0.1:{port}",
               "--graceful-timeout", str(GRACEFUL_TIMEOUT), *args]
    with log.open("wb") as out:
        proc = await anyio.open_process(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        await wait_until_answering(proc, server.url, server.log, "hypercorn", timeout=20)
        yield server
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(10):
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the session we started: the parent and its workers
            await proc.wait()
            await proc.aclose()


@dataclass
class WorkerStream(Received):
    worker_pid: int = 0


async def consume(url: str, into: WorkerStream, opened: anyio.Event, ready: anyio.Event) -> None:
    """Read an SSE stream to its end; ``opened`` once the headers are in, ``ready`` after AFTER events."""
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=10)) as client:
            async with aconnect_sse(client, "GET", url) as source:
                source.response.raise_for_status()
                into.stream_id = source.response.headers["x-stream-id"]
                into.worker_pid = int(source.response.headers["x-worker-pid"])
                opened.set()
                async for event in source.aiter_sse():
                    into.events.append(event)
                    if len(into.data_events) == AFTER and event.event == "message":
                        ready.set()
    except httpx.TransportError as exc:  # the connection broke mid-stream: what defect 14 was
        into.error = exc
    finally:
        opened.set()
        ready.set()


@pytest.mark.parametrize(
    ("worker_class", "workers", "to_group"),
    [
        ("asyncio", 0, False),
        ("asyncio", 1, False),
        ("trio", 1, False),
        ("asyncio", 2, False),
        ("trio", 2, False),
        ("asyncio", 2, True),
        ("trio", 1, True),
    ],
    ids=[
        "asyncio-0-workers",
        "asyncio-1-worker",
        "trio-1-worker",
        "asyncio-2-workers",
        "trio-2-workers",
        "asyncio-2-workers-group",
        "trio-1-worker-group",
    ],
)
async def test_sigterm_to_hypercorn_cli_ends_every_stream_with_shutdown_event(
    tmp_path: Path, worker_class: str, workers: int, to_group: bool
) -> None:
    """SIGTERM to the parent alone (``kill <pid>``, a container stop), or ``to_group`` to the
    parent and its workers at once (systemd's default ``KillMode=control-group``, ``kill -TERM
    -<pgid>``). With two workers hypercorn's parent also SIGTERMs the worker still running
    once the first has exited, mid-way through its graceful stop. ``--workers 0`` runs the app
    in the signalled process itself (asyncio only: hypercorn's trio worker run that way
    handles no signal, so SIGTERM kills it at once, with or without the middleware)."""
    db = tmp_path / "streams.db"
    received: list[WorkerStream] = []
    async with hypercorn_cli(tmp_path, db, "--worker-class", worker_class, "--workers", str(workers)) as server:
        async with anyio.create_task_group() as tg:
            # Open streams until every worker runs STREAMS_PER_WORKER of them (the kernel picks
            # the worker per connection), so the signal catches each worker mid-stream.
            readies: list[anyio.Event] = []
            with anyio.fail_after(15):
                while True:
                    per_worker: dict[int, int] = {}
                    for r in received:
                        per_worker[r.worker_pid] = per_worker.get(r.worker_pid, 0) + 1
                    if len(per_worker) == max(workers, 1) and min(per_worker.values()) >= STREAMS_PER_WORKER:
                        break
                    assert len(received) < 8 * max(workers, 1) * STREAMS_PER_WORKER, f"streams per worker: {per_worker}"
                    r, opened, ready = WorkerStream(), anyio.Event(), anyio.Event()
                    received.append(r)
                    readies.append(ready)
                    tg.start_soon(consume, f"{server.url}/stream", r, opened, ready)
                    await opened.wait()
                    assert r.error is None and r.worker_pid, f"stream not opened: {r.error!r}\n{server.output()}"
                for ready in readies:
                    await ready.wait()
            assert all(r.error is None and len(r.data_events) >= AFTER for r in received), server.output()

            if to_group:
                os.killpg(server.proc.pid, signal.SIGTERM)  # the session we started: parent and workers
            else:
                server.proc.send_signal(signal.SIGTERM)
            t0 = time.perf_counter()
            with anyio.fail_after(GRACEFUL_TIMEOUT + 5):
                code = await server.proc.wait()
            exit_seconds = time.perf_counter() - t0
        log = server.output()

    for r in received:
        assert r.error is None, f"stream {r.stream_id} (worker {r.worker_pid}) broke: {r.error!r}\n{log}"
        assert len(r.data_events) >= AFTER
        assert_shutdown_event(r)
    assert code == 0, log
    assert exit_seconds < PROMPT_EXIT, f"exited {exit_seconds:.2f}s after SIGTERM (graceful {GRACEFUL_TIMEOUT}s)\n{log}"
    assert "Traceback" not in log, log

    records = await read_records(db, [r.stream_id for r in received])
    for r in received:
        record, chunks = records[r.stream_id]
        assert record is not None, r.stream_id
        assert record.status is StreamStatus.INTERRUPTED, record
        seen = r.seq_data()
        assert [(c.seq, c.data) for c in chunks] == seen  # exactly what the client got
        assert seen == [(i + 1, token(i)) for i in range(len(seen))]
        assert record.chunk_count == len(seen)
        assert record.completed_at is not None
