"""Resume, follow and stop across processes: two uvicorn processes sharing one backend
(a SQLite file, a PostgreSQL schema, a Redis prefix).

Each process runs ``tests.apps.resume_app`` (a ``resume=True`` endpoint and ``streams_app``,
under the middleware) in its own ``python -m uvicorn``. A stream produced on A is followed,
resumed and cancelled through B; B learns of A's chunks through the backend's notification
(SQLite's ``data_version`` polling, PostgreSQL's ``LISTEN``, Redis's ``XREAD BLOCK``) and A
learns of B's cancel request the same way. A producer killed with SIGKILL mid-stream ends
B's follower once its lease runs out (B sweeps while it runs).

The servers run their own event loops, so the client side runs on asyncio only.
``test_join_latency`` measures (prints, does not assert) how long a chunk takes from A's
generator to a follower in A's own process and to one in B.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from asgi_stream_recorder import Chunk, StreamRecord, StreamStatus
from asgi_stream_recorder.sse import ServerSentEvent

from .apps.resume_app import token
from .backends import Place, place_fixture, shared_kind  # noqa: F401 - fixtures "kind", "place": each shared backend
from .servers import free_port, wait_until_answering
from .test_resume import Wire, assert_final, connect, seq_of
from .test_shutdown import AppProcess

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.resume_app:app"
WAIT = 10
SLOW_FLUSH = "1.0"  # a flush_interval that leaves a new stream unknown to other processes for a while
LEASE = "1.5"  # seconds: a killed producer's streams are ended soon after


@pytest.fixture
def anyio_backend() -> str:
    """The servers run their own (asyncio) loops: the client side runs on asyncio only."""
    return "asyncio"


@asynccontextmanager
async def app_process(tmp_path: Path, place: Place, name: str, **env: str) -> AsyncIterator[AppProcess]:
    """``tests.apps.resume_app`` under uvicorn in its own process, until it answers; killed on the way out."""
    port = free_port()
    log = tmp_path / f"{name}.log"
    environ = {**os.environ, "ASR_TEST_URL": place.url, "ASR_TEST_LEASE": LEASE, "PYTHONUNBUFFERED": "1", **env}
    args = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(port),
            "--timeout-graceful-shutdown", "2"]
    with log.open("wb") as out:
        proc = await anyio.open_process(args, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
    server = AppProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        await wait_until_answering(proc, server.url, server.log, name, timeout=15)
        yield server
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(10):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.aclose()


@asynccontextmanager
async def two_processes(
    tmp_path: Path, place: Place, **env: str
) -> AsyncIterator[tuple[AppProcess, AppProcess]]:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(app_process(tmp_path, place, "A", **env))
        b = await stack.enter_async_context(app_process(tmp_path, place, "B", **env))
        yield a, b


async def counts(server: AppProcess) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        result: dict[str, int] = (await client.get(f"{server.url}/counts")).json()
        return result


async def wait_stored(place: Place, stream_id: str) -> None:
    """Until A has written the stream's start (a process that does not run the stream knows of
    it from then on)."""
    backend = place.backend()
    await backend.connect()
    try:
        with anyio.fail_after(WAIT):
            while await backend.get(stream_id) is None:  # noqa: ASYNC110 - another process writes it
                await anyio.sleep(0.01)
    finally:
        await backend.close()


async def record_of(place: Place, stream_id: str) -> tuple[StreamRecord, list[Chunk]]:
    """The stream's final record and chunks, waiting (bounded) until its process has written its end."""
    async with place.recorder() as recorder:
        with anyio.fail_after(WAIT):
            while (record := await recorder.get(stream_id)) is None or not record.finished:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        return record, await recorder.chunks(stream_id)


def assert_tokens(events: list[ServerSentEvent], sid: str, after: int, n: int) -> None:
    seqs = [seq_of(e, sid) for e in events]
    assert seqs == list(range(after + 1, n + 1)), f"seqs {seqs}, expected {after + 1}..{n}"
    assert [e.text for e in events] == [token(s - 1) for s in seqs]


async def test_follow_on_another_process_gets_every_chunk_then_done(tmp_path: Path, place: Place) -> None:
    n = 30
    async with two_processes(tmp_path, place) as (a, b), connect(f"{a.url}/chat?n={n}&delay=0.02") as producer:
        sid = producer.sid
        await producer.take(2)
        await wait_stored(place, sid)
        async with connect(f"{b.url}/streams/{sid}/events") as follower:
            assert follower.status == 200 and follower.sid == sid
            async with anyio.create_task_group() as tg:
                tg.start_soon(producer.rest)
                events = await follower.rest()
            assert_tokens(events[:-1], sid, 0, n)
            assert_final(events[-1], sid)
        async with httpx.AsyncClient(timeout=WAIT) as client:
            record = (await client.get(f"{b.url}/streams/{sid}")).json()
        assert record["status"] == "completed" and record["chunk_count"] == n
        assert record["content"] == "".join(token(i) for i in range(n))
        assert (await counts(a))["started"] == 1 and (await counts(b))["started"] == 0


async def test_join_on_another_process_right_after_the_headers(tmp_path: Path, place: Place) -> None:
    """A second tab opened on another worker at once (A has not flushed the stream's start yet)
    must still join it, not be told the stream does not exist. (A flushes once a second here,
    so that "not flushed yet" is certain, not a race.)"""
    async with two_processes(tmp_path, place, ASR_TEST_FLUSH_INTERVAL=SLOW_FLUSH) as (a, b), \
            connect(f"{a.url}/chat?n=5&delay=0.02&wait=0.5") as producer:
        sid = producer.sid
        async with connect(f"{b.url}/streams/{sid}/events") as follower:
            assert follower.status == 200, f"B answered {follower.status} for a stream A runs"
            events = await follower.rest()
        assert_tokens(events[:-1], sid, 0, 5)
        assert_final(events[-1], sid)
        await producer.rest()


async def test_cancel_on_another_process_right_after_the_headers(tmp_path: Path, place: Place) -> None:
    """Stop pressed at once, the request reaching another worker before A flushed the start:
    the generation must stop, not go on while the Stop button is told 404."""
    async with two_processes(tmp_path, place, ASR_TEST_FLUSH_INTERVAL=SLOW_FLUSH) as (a, b), \
            connect(f"{a.url}/chat?delay=0.05&wait=0.3") as producer:
        sid = producer.sid
        async with httpx.AsyncClient(timeout=WAIT) as client:
            answer = await client.post(f"{b.url}/streams/{sid}/cancel")
        assert answer.status_code == 202, f"B answered {answer.status_code} for a stream A runs"
        with anyio.fail_after(3):
            rest = await producer.rest()
        assert_final(rest[-1], sid, "cancelled")
        record, _ = await record_of(place, sid)
        assert record.status is StreamStatus.CANCELLED


@pytest.mark.parametrize("k", [0, 5])
async def test_resume_on_another_process_gets_the_rest_and_never_generates_there(
    tmp_path: Path, place: Place, k: int
) -> None:
    n = 25
    async with two_processes(tmp_path, place) as (a, b):
        async with connect(f"{a.url}/chat?n={n}&delay=0.02") as producer:
            sid = producer.sid
            first = await producer.take(k)
        # A's client is gone; the generation goes on in A. Its browser comes back through B.
        await wait_stored(place, sid)
        async with connect(f"{b.url}/chat?n={n}", {"last-event-id": f"{sid}:{k}"}) as resumed:
            assert resumed.status == 200 and resumed.sid == sid
            events = await resumed.rest()
        assert_tokens(events[:-1], sid, k, n)
        assert_final(events[-1], sid)
        assert "".join(e.text or "" for e in [*first, *events[:-1]]) == "".join(token(i) for i in range(n))
        assert await counts(b) == {"started": 0, "finally": 0}, "a resume on B started a generation there"
        assert (await counts(a))["started"] == 1
        async with connect(f"{b.url}/chat?n={n}", {"last-event-id": f"{sid}:{n}"}) as again:
            assert again.status == 204
        record, chunks = await record_of(place, sid)
        assert record.status is StreamStatus.COMPLETED and len(chunks) == n


async def test_cancel_from_another_process_stops_the_generation(tmp_path: Path, place: Place) -> None:
    async with two_processes(tmp_path, place) as (a, b), connect(f"{a.url}/chat?delay=0.05") as producer:
        sid = producer.sid
        await producer.take(3)
        await wait_stored(place, sid)
        async with connect(f"{b.url}/streams/{sid}/events") as follower:
            assert follower.status == 200
            await follower.take(3)
            async with httpx.AsyncClient(timeout=WAIT) as client:
                answer = await client.post(f"{b.url}/streams/{sid}/cancel")
            assert answer.status_code == 202, answer.text
            with anyio.fail_after(2):  # A learns of it by polling the file (~0.25 s), then stops at once
                rest = await producer.rest()
            assert_final(rest[-1], sid, "cancelled")
            assert all(e.event is None for e in rest[:-1])
            followed = await follower.rest()
            assert_final(followed[-1], sid, "cancelled")
            assert [seq_of(e, sid) for e in followed[:-1]] == [seq_of(e, sid) for e in rest[:-1]]
        assert await counts(a) == {"started": 1, "finally": 1}
        record, chunks = await record_of(place, sid)
        assert record.status is StreamStatus.CANCELLED
        assert record.metadata.get("cancelled_by") == "request"
        assert len(chunks) == 3 + len(rest) - 1
        async with httpx.AsyncClient(timeout=WAIT) as client:
            assert (await client.post(f"{b.url}/streams/{sid}/cancel")).status_code == 409


async def test_a_follower_of_a_killed_producer_ends_interrupted(tmp_path: Path, place: Place) -> None:
    async with app_process(tmp_path, place, "B") as b:
        async with app_process(tmp_path, place, "A") as a, connect(f"{a.url}/chat?delay=0.02") as producer:
            sid = producer.sid
            await producer.take(3)
            await wait_stored(place, sid)
            follower_cm = connect(f"{b.url}/streams/{sid}/events")
            follower: Wire = await follower_cm.__aenter__()
            try:
                assert follower.status == 200
                await follower.take(5)
                a.signal(signal.SIGKILL)
                await a.wait_exit(5)
                killed_at = time.monotonic()
                with anyio.fail_after(8):
                    rest = await follower.rest()
                ended_after = time.monotonic() - killed_at
            finally:
                await follower_cm.__aexit__(None, None, None)
        assert rest, "the follower's stream ended without a final event"
        last = rest[-1]
        assert last.event == "shutdown" and last.id is None, last
        data = [*follower.data]
        assert [seq_of(e, sid) for e in data] == list(range(1, len(data) + 1))
        record, chunks = await record_of(place, sid)
        assert record.status is StreamStatus.INTERRUPTED, record
        assert record.metadata.get("recovered") is True
        assert len(chunks) >= len(data)
        print(f"\nfollower on B ended {ended_after:.2f}s after its producer was killed")
        assert ended_after < 5


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def test_join_latency(tmp_path: Path, place: Place) -> None:
    """Time from A's generator yielding a chunk to a client receiving it: A's own client, a
    follower through A's streams app (fed from memory), a follower through B's (from the file).
    Printed, not asserted."""
    n = 200
    async with two_processes(tmp_path, place) as (a, b), \
            connect(f"{a.url}/chat?n={n}&delay=0.01&wait=1&stamp=1") as producer:
        sid = producer.sid
        await wait_stored(place, sid)
        latencies: dict[str, list[float]] = {}

        async def measure(name: str, wire: Wire) -> None:
            got = latencies[name] = []
            while (event := await wire.next()) is not None:
                now = time.monotonic()
                if event.event is None:
                    got.append(now - float((event.text or "").split("@")[1]))

        async with connect(f"{a.url}/streams/{sid}/events") as same, connect(f"{b.url}/streams/{sid}/events") as other:
            assert same.status == 200 and other.status == 200
            async with anyio.create_task_group() as tg:
                tg.start_soon(measure, "producer's client (A)", producer)
                tg.start_soon(measure, "follower in-process (A)", same)
                tg.start_soon(measure, "follower cross-process (B)", other)
    lines = ["", f"join latency over {n} chunks (10 ms apart), ms:"]
    for name, values in latencies.items():
        assert len(values) == n, (name, len(values))
        ms = [v * 1000 for v in values]
        lines.append(f"  {name:30s} median {statistics.median(ms):7.2f}  p99 {_percentile(ms, 0.99):7.2f}"
                     f"  max {max(ms):7.2f}")
    print("\n".join(lines))
