"""Shutdowns and crashes of real server processes, with real signals (issue 3).

Most tests run ``tests.apps.streaming_app`` under ``python -m uvicorn`` in a subprocess,
talk to it with httpx + httpx_sse, signal it, and read the SQLite file it recorded into.
The server process runs its own (asyncio) event loop whatever the test's backend is, so
those tests run the client side on asyncio only (``anyio_backend`` parametrized to
``["asyncio"]``): running them on trio as well would test nothing more. The in-process
``on_disconnect="continue"`` test runs on both backends (uvicorn on asyncio, hypercorn on
trio).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.abc import Process
from httpx_sse import ServerSentEvent, aconnect_sse

from asgi_stream_recorder import Chunk, SQLiteRecorder, StreamRecord, StreamStatus

from .apps.streaming_app import create_app, token
from .servers import free_port, serve, wait_until_answering

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.streaming_app:app"
GRACEFUL_TIMEOUT = 5  # the server's --timeout-graceful-shutdown
# A process stopped by a signal it re-raised (uvicorn re-raises SIGTERM after its
# graceful shutdown, so the parent sees the usual "killed by SIGTERM") or exiting 0.
CLEAN_EXIT = (0, -signal.SIGTERM)

# The client side of subprocess tests: the server's own event loop is what is tested.
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


# -- the server process ----------------------------------------------------------------------
@dataclass
class AppProcess:
    proc: Process
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code, waiting at most ``timeout`` seconds for it."""
        with anyio.fail_after(timeout):
            return await self.proc.wait()


@asynccontextmanager
async def app_process(
    tmp_path: Path,
    db: Path,
    *,
    extra_args: Sequence[str] = (),
    graceful_timeout: float = GRACEFUL_TIMEOUT,
    name: str = "server",
    **env: str,
) -> AsyncIterator[AppProcess]:
    """Run the test app under uvicorn in its own process until it answers; kill it on the way out."""
    port = free_port()
    log = tmp_path / f"{name}.log"
    environ = {**os.environ, "ASR_TEST_DB": str(db), "PYTHONUNBUFFERED": "1", **env}
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        APP,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--timeout-graceful-shutdown",
        str(graceful_timeout),
        *extra_args,
    ]
    with log.open("wb") as out:
        proc = await anyio.open_process(args, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
    server = AppProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        await wait_until_answering(proc, server.url, server.log, "the server", timeout=15)
        yield server
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(10):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()  # reaped: a zombie would still look alive to crash recovery
            await proc.aclose()


# -- reading what the server recorded ----------------------------------------------------------
def read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)


def count_chunks(db: Path, stream_id: str) -> int:
    """Chunks committed for the stream, read through a separate read-only connection."""
    if not db.exists():
        return 0
    con = read_only(db)
    try:
        return int(con.execute("SELECT count(*) FROM chunks WHERE stream_id = ?", (stream_id,)).fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        con.close()


async def wait_for_chunks(db: Path, stream_id: str, at_least: int, timeout: float = 10) -> int:
    with anyio.fail_after(timeout):
        while True:
            if (n := count_chunks(db, stream_id)) >= at_least:
                return n
            await anyio.sleep(0.02)


async def read_records(db: Path, ids: Sequence[str]) -> dict[str, tuple[StreamRecord | None, list[Chunk]]]:
    async with SQLiteRecorder(db) as recorder:
        return {sid: (await recorder.get(sid), await recorder.chunks(sid)) for sid in ids}


# -- the client side --------------------------------------------------------------------------
@dataclass
class Received:
    """What one SSE client saw."""

    stream_id: str = ""
    events: list[ServerSentEvent] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def data_events(self) -> list[ServerSentEvent]:
        return [e for e in self.events if e.event == "message"]

    def seq_data(self) -> list[tuple[int, str]]:
        return [(int(e.id), e.data) for e in self.data_events]


async def consume(
    url: str,
    into: Received,
    *,
    then_signal: anyio.Event | None = None,
    after: int = 3,
    hang_up: bool = False,
) -> None:
    """Read an SSE stream to its end, noting every event. After ``after`` data events,
    call ``then_signal`` (an Event to set), and hang up instead when ``hang_up``."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=10)) as client:
        async with aconnect_sse(client, "GET", url) as source:
            source.response.raise_for_status()
            into.stream_id = source.response.headers["x-stream-id"]
            try:
                async for event in source.aiter_sse():
                    into.events.append(event)
                    if len(into.data_events) == after and event.event == "message":
                        if then_signal is not None:
                            then_signal.set()
                        if hang_up:
                            return
            except httpx.TransportError as exc:  # the server died mid-stream
                into.error = exc


def assert_shutdown_event(received: Received) -> None:
    last = received.events[-1]
    assert last.event == "shutdown", f"last event of {received.stream_id}: {last!r}"
    payload = json.loads(last.data)
    assert payload["stream_id"] == received.stream_id
    data = received.data_events
    assert payload["last_event_id"] == (data[-1].id if data else "0")
    assert last.retry == 1000
    assert all(e.event == "message" for e in received.events[:-1])  # nothing but data before it


# -- 1. SIGTERM with many open streams ----------------------------------------------------------
@asyncio_only
async def test_sigterm_ends_20_open_streams_interrupted_and_exits_promptly(tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    n = 20
    received = [Received() for _ in range(n)]
    async with app_process(tmp_path, db, ASR_TEST_DELAY="0.02") as server:
        readies = [anyio.Event() for _ in range(n)]
        async with anyio.create_task_group() as tg:
            for r, ready in zip(received, readies, strict=True):
                tg.start_soon(partial(consume, f"{server.url}/stream", r, then_signal=ready))
            with anyio.fail_after(10):
                for ready in readies:
                    await ready.wait()
            server.signal(signal.SIGTERM)
            t0 = time.perf_counter()
            code = await server.wait_exit(GRACEFUL_TIMEOUT)
            exit_seconds = time.perf_counter() - t0
        clients_done = time.perf_counter() - t0
        log = server.output()
    print(
        f"\nSIGTERM with {n} open streams: process exited after {exit_seconds:.3f}s "
        f"(returncode {code}); clients done after {clients_done:.3f}s"
    )
    assert code in CLEAN_EXIT, log
    assert exit_seconds < 3, f"took {exit_seconds:.2f}s to exit (graceful timeout {GRACEFUL_TIMEOUT}s)\n{log}"

    records = await read_records(db, [r.stream_id for r in received])
    assert len(set(records)) == n
    for r in received:
        assert r.error is None, r.error
        assert len(r.data_events) >= 3
        assert_shutdown_event(r)
        record, chunks = records[r.stream_id]
        assert record is not None, r.stream_id
        assert record.status is StreamStatus.INTERRUPTED, record
        seen = r.seq_data()
        stored = [(c.seq, c.data) for c in chunks]
        # nothing the client got is missing, in order, same seq and data ...
        assert stored[: len(seen)] == seen
        # ... and a chunk is recorded once sent: the record is exactly what the client saw
        assert stored == seen
        assert seen == [(i + 1, token(i)) for i in range(len(seen))]
        assert record.content == "".join(e.data for e in r.data_events)
        assert record.chunk_count == len(seen) == record.metadata["chunk_count"]
        assert record.completed_at is not None


@asyncio_only
async def test_sigterm_lifespan_shutdown_completes_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    received = Received()
    async with app_process(tmp_path, db) as server:
        ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consume(f"{server.url}/stream", received, then_signal=ready))
            with anyio.fail_after(10):
                await ready.wait()
            server.signal(signal.SIGTERM)
            await server.wait_exit(GRACEFUL_TIMEOUT)
        log = server.output()
    assert "Application shutdown complete" in log, log
    assert "Application shutdown failed" not in log, log
    assert "Traceback" not in log, log


# -- 2. SIGKILL mid-stream, then a restart on the same file ------------------------------------------
@asyncio_only
async def test_sigkill_keeps_flushed_chunks_and_restart_recovers_orphan(tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    received = Received()
    flushed_at_least = 10
    async with app_process(tmp_path, db, name="first", ASR_TEST_DELAY="0.01", ASR_TEST_LEASE="1") as server:
        started = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consume(f"{server.url}/stream", received, then_signal=started, after=1))
            with anyio.fail_after(10):
                await started.wait()
            await wait_for_chunks(db, received.stream_id, flushed_at_least)
            server.signal(signal.SIGKILL)
            assert await server.wait_exit(5) == -signal.SIGKILL
    assert server.proc.returncode is not None  # reaped by app_process: its pid is gone for crash recovery

    con = read_only(db)
    try:
        status, owner = con.execute("SELECT status, owner FROM streams WHERE id = ?", (received.stream_id,)).fetchone()
        flushed = [
            tuple(row)
            for row in con.execute(
                "SELECT seq, data FROM chunks WHERE stream_id = ? ORDER BY seq", (received.stream_id,)
            )
        ]
    finally:
        con.close()
    assert status == "streaming"  # nobody could end it
    assert owner.split(":")[1] == str(server.proc.pid)
    assert len(flushed) >= flushed_at_least
    assert flushed == [(i + 1, token(i)) for i in range(len(flushed))]
    # the client saw at least what was flushed (a chunk is recorded after it is sent), same seq and data
    seen = received.seq_data()
    assert seen[: len(flushed)] == flushed

    async with app_process(tmp_path, db, name="second", ASR_TEST_LEASE="1") as restarted:
        assert restarted.proc.pid != server.proc.pid
        with anyio.fail_after(5):  # its sweep ends the stream once the killed process's lease ran out
            while True:
                records = await read_records(db, [received.stream_id])
                if (found := records[received.stream_id][0]) is not None and found.finished:
                    break
                await anyio.sleep(0.1)
    record, chunks = records[received.stream_id]
    assert record is not None
    assert record.status is StreamStatus.INTERRUPTED
    assert record.metadata.get("recovered") is True
    assert record.error == "process ended mid-stream"
    assert [(c.seq, c.data) for c in chunks] == flushed
    assert record.chunk_count == len(flushed)
    assert record.content == "".join(data for _, data in flushed)


# -- 3. on_disconnect="continue" ------------------------------------------------------------------
async def test_continue_stream_finishes_after_client_left_completed_with_all_chunks(tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    app = create_app(db, handle_signals=False)  # in-process: leave the test runner's signals alone
    received = Received()
    total = 20
    async with serve(app) as url:
        await consume(f"{url}/continue?n={total}&delay=0.02", received, after=3, hang_up=True)
        async with SQLiteRecorder(db) as recorder:
            with anyio.fail_after(10):
                while True:
                    record = await recorder.get(received.stream_id)
                    if record is not None and record.status is not StreamStatus.STREAMING:
                        break
                    await anyio.sleep(0.02)
            chunks = await recorder.chunks(received.stream_id)
    assert received.seq_data() == [(i + 1, token(i)) for i in range(3)]
    assert record.status is StreamStatus.COMPLETED, record
    assert isinstance(record.metadata.get("client_disconnected_at_ms"), (int, float))
    assert [(c.seq, c.data) for c in chunks] == [(i + 1, token(i)) for i in range(total)]
    assert record.chunk_count == total == record.metadata["chunk_count"]
    assert record.content == "".join(token(i) for i in range(total))


@asyncio_only
async def test_sigterm_interrupts_continue_stream_running_in_background(tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    received = Received()
    async with app_process(tmp_path, db, ASR_TEST_DELAY="0.02") as server:
        await consume(f"{server.url}/continue", received, after=3, hang_up=True)
        # the generator goes on without its client: chunks keep arriving in the database
        await wait_for_chunks(db, received.stream_id, len(received.data_events) + 10)
        server.signal(signal.SIGTERM)
        t0 = time.perf_counter()
        code = await server.wait_exit(GRACEFUL_TIMEOUT)
        exit_seconds = time.perf_counter() - t0
        log = server.output()
    assert code in CLEAN_EXIT, log
    assert exit_seconds < 3, log
    records = await read_records(db, [received.stream_id])
    record, chunks = records[received.stream_id]
    assert record is not None
    assert record.status is StreamStatus.INTERRUPTED, record
    assert isinstance(record.metadata.get("client_disconnected_at_ms"), (int, float))
    assert len(chunks) >= len(received.data_events) + 10
    assert [(c.seq, c.data) for c in chunks] == [(i + 1, token(i)) for i in range(len(chunks))]
    assert [(c.seq, c.data) for c in chunks[:3]] == received.seq_data()
    assert record.chunk_count == len(chunks)
    assert record.content == "".join(c.data for c in chunks)


# -- 4. --lifespan off: lazy open, every stream durable when it ends ---------------------------------
@asyncio_only
async def test_lifespan_off_still_records_each_stream_durably(tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    received = [Received() for _ in range(3)]
    async with app_process(
        tmp_path, db, extra_args=["--lifespan", "off"], ASR_TEST_TOKENS="5", ASR_TEST_DELAY="0.01"
    ) as server:
        for r in received:
            await consume(f"{server.url}/stream", r)
            # the stream flushes its records as it ends (nobody will close this recorder)
            with anyio.fail_after(2):
                while True:
                    con = read_only(db)
                    try:
                        row = con.execute(
                            "SELECT status, chunk_count FROM streams WHERE id = ?", (r.stream_id,)
                        ).fetchone()
                    finally:
                        con.close()
                    if row is not None and row[0] != "streaming":
                        break
                    await anyio.sleep(0.01)
        # no shutdown of any kind: what was recorded must already be on disk
        server.signal(signal.SIGKILL)
        await server.wait_exit(5)
        log = server.output()
    assert "Application startup" not in log  # the lifespan really was off
    records = await read_records(db, [r.stream_id for r in received])
    for r in received:
        assert r.seq_data() == [(i + 1, token(i)) for i in range(5)]
        record, chunks = records[r.stream_id]
        assert record is not None
        assert record.status is StreamStatus.COMPLETED, record
        assert [(c.seq, c.data) for c in chunks] == r.seq_data()
        assert record.content == "".join(token(i) for i in range(5))
        assert record.chunk_count == 5


@asyncio_only
async def test_lifespan_off_sigterm_records_open_stream_interrupted(tmp_path: Path) -> None:
    """Without a lifespan, a SIGTERM with an open stream: the stream must still end
    ``interrupted`` (the client told so with a ``shutdown`` event) and be on disk."""
    db = tmp_path / "streams.db"
    received = Received()
    async with app_process(
        tmp_path, db, extra_args=["--lifespan", "off"], graceful_timeout=1, ASR_TEST_DELAY="0.02"
    ) as server:
        ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consume(f"{server.url}/stream", received, then_signal=ready))
            with anyio.fail_after(10):
                await ready.wait()
            server.signal(signal.SIGTERM)
            code = await server.wait_exit(5)
        log = server.output()
    assert code in CLEAN_EXIT, log
    records = await read_records(db, [received.stream_id])
    record, chunks = records[received.stream_id]
    assert record is not None, log
    seen = received.seq_data()
    assert [(c.seq, c.data) for c in chunks][: len(seen)] == seen  # what was flushed is kept either way
    assert record.status is StreamStatus.INTERRUPTED, (record, log)
    assert received.error is None, received.error
    assert_shutdown_event(received)
