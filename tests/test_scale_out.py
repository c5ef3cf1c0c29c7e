"""Several workers on one backend, for real: ``uvicorn --workers 4`` processes recording into one
SQLite file, one PostgreSQL schema or one Redis prefix.

400 concurrent streams lose nothing and put no lock error in front of a client or in the log;
a worker killed with SIGKILL under load leaves no stream ``streaming``: the other workers end
its streams ``interrupted`` (chunks kept) once its lease runs out, and the rest are untouched.
(Following, resuming and cancelling across processes: ``test_resume_processes.py``.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest

from asgi_stream_recorder import StreamStatus
from asgi_stream_recorder.sse import SSEParser

from .backends import Place, place_fixture, shared_kind  # noqa: F401 - fixtures "kind", "place": each shared backend
from .servers import free_port, wait_until_answering

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4
LEASE = 2.0


@pytest.fixture
def anyio_backend() -> str:
    """The servers run their own (asyncio) loops: the client side runs on asyncio only."""
    return "asyncio"


@dataclass
class Workers:
    url: str
    log: Path
    proc: anyio.abc.Process

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def workers(tmp_path: Path, place: Place) -> AsyncIterator[Workers]:
    """``uvicorn --workers 4`` serving ``tests.apps.scale_app`` on ``place``; stopped on the way out."""
    port = free_port()
    log = tmp_path / "uvicorn.log"
    env = {**os.environ, "ASR_TEST_URL": place.url, "ASR_TEST_LEASE": str(LEASE), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "uvicorn", "tests.apps.scale_app:app", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(WORKERS), "--timeout-graceful-shutdown", "3"]
    with log.open("wb") as out:
        proc = await anyio.open_process(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
    server = Workers(f"http://127.0.0.1:{port}", log, proc)
    try:
        await wait_until_answering(proc, server.url, log, "uvicorn --workers", timeout=30)
        yield server
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with anyio.move_on_after(15):
                    await proc.wait()
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                with anyio.fail_after(10):
                    await proc.wait()
            await proc.aclose()


@dataclass
class Client:
    """One stream as a client read it."""

    stream_id: str = ""
    worker: int = 0
    texts: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    started: anyio.Event = field(default_factory=anyio.Event)
    cut: bool = False  # the connection broke mid-stream


async def read(client: httpx.AsyncClient, url: str, got: Client) -> None:
    parser = SSEParser()
    async with client.stream("GET", url) as response:
        assert response.status_code == 200, await response.aread()
        got.stream_id = response.headers["x-stream-id"]
        got.worker = int(response.headers["x-worker-pid"])
        got.started.set()
        try:
            async for data in response.aiter_raw():
                for event in parser.feed(data):
                    if event.event is None:
                        got.texts.append(event.data)
                        got.ids.append(event.id or "")
        except httpx.RemoteProtocolError:
            got.cut = True


def assert_clean(log: str) -> None:
    """No error of ours or the database's reached the log (the recorder retries quietly)."""
    bad = [line for line in log.splitlines()
           if re.search(r"ERROR|Traceback|locked|busy|lost|dropp", line, re.IGNORECASE)]
    assert not bad, "\n".join(bad[:20])


async def test_400_concurrent_streams_on_4_workers_lose_nothing(tmp_path: Path, place: Place) -> None:
    n_streams, n_tokens = 400, 60
    clients = [Client() for _ in range(n_streams)]
    async with workers(tmp_path, place) as server:
        limits = httpx.Limits(max_connections=n_streams + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for i, got in enumerate(clients):
                        tg.start_soon(read, http, f"{server.url}/chat?n={n_tokens}&delay=0.02", got)
                        if i % 25 == 24:  # in waves, as users arrive: a burst may all go to one worker
                            await anyio.sleep(0.02)
        log = server.output()
    expected = [f"{i} " for i in range(n_tokens)]
    for got in clients:
        assert got.texts == expected and got.ids == [str(i) for i in range(1, n_tokens + 1)], got.stream_id
    assert len({got.worker for got in clients}) > 1, "the streams were not spread over several workers"
    async with place.recorder() as reader:
        for got in clients:
            record = await reader.get(got.stream_id)
            assert record is not None, got.stream_id
            assert (record.status, record.content, record.chunk_count) == (
                StreamStatus.COMPLETED, "".join(expected), n_tokens), record
            assert "dropped_chunks" not in record.metadata
        assert len(await reader.list_streams(limit=1000)) == n_streams
    assert_clean(log)


async def test_a_killed_worker_s_streams_end_interrupted_on_the_others(tmp_path: Path, place: Place) -> None:
    clients: list[Client] = []
    async with workers(tmp_path, place) as server:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            async with anyio.create_task_group() as tg:
                with anyio.fail_after(30):
                    # the kernel may hand a burst of connections to one worker: open streams until
                    # at least two workers run some
                    while len(clients) < 40 or len({got.worker for got in clients}) < 2:
                        assert len(clients) < 400, "every stream landed on one worker"
                        batch = [Client() for _ in range(20)]
                        for got in batch:
                            tg.start_soon(read, http, f"{server.url}/chat?n=0&delay=0.05", got)
                            await got.started.wait()
                        clients += batch
                    while min(len(got.texts) for got in clients) < 5:  # noqa: ASYNC110 - the servers stream
                        await anyio.sleep(0.05)
                victim = clients[0].worker
                os.kill(victim, signal.SIGKILL)
                await anyio.sleep(0.5)  # the victim's clients lose their connections; the others stream on
                tg.cancel_scope.cancel()  # every other client hangs up: those streams end cancelled
        killed = [got for got in clients if got.worker == victim]
        kept = [got for got in clients if got.worker != victim]
        assert killed and kept
        assert all(got.cut for got in killed) and not any(got.cut for got in kept)
        async with place.recorder(lease=LEASE) as reader:
            with anyio.fail_after(LEASE * 4 + 10):  # swept by the surviving workers once the lease ran out
                for got in clients:
                    while (record := await reader.get(got.stream_id)) is None or not record.finished:  # noqa: ASYNC110
                        await anyio.sleep(0.1)
            for got in killed:
                record = await reader.get(got.stream_id)
                assert record is not None and record.status is StreamStatus.INTERRUPTED, record
                assert record.metadata.get("recovered") is True
                stored = [c.data for c in await reader.chunks(got.stream_id)]
                assert len(stored) >= 3 and stored == [f"{i} " for i in range(len(stored))], stored
            for got in kept:
                record = await reader.get(got.stream_id)
                assert record is not None and record.status is StreamStatus.CANCELLED, record
                assert record.content.startswith("".join(got.texts)), record
