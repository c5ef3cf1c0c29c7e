"""Django: ``integrations.django.recorded_stream`` under uvicorn, in a process of its own.

``tests.apps.django_app`` is served bare (Django's ``get_asgi_application()``, no lifespan)
and wrapped (the streams app mounted next to Django's URLs, under the middleware), on the
installed Django (5.x) and on Django 4.2 LTS (installed with pip into a directory put first
on the server's ``PYTHONPATH``). A real httpx client reads each stream (with its default
``Accept-Encoding: gzip``: the app runs Django's ``GZipMiddleware``), and the record, read
from the SQLite file afterwards, must say what the client saw.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from asgi_stream_recorder import SQLiteRecorder, StreamRecord, StreamStatus
from asgi_stream_recorder.recorders.base import Chunk

from .servers import ROOT, AppServer, uvicorn_process

pytestmark = pytest.mark.anyio

WAIT = 10
DJANGO_42 = Path(os.environ.get("ASR_DJANGO42_DIR", "/tmp/asgi-stream-recorder-django42"))


@pytest.fixture
def anyio_backend() -> str:
    """Django runs on asyncio only (its ASGI handler uses asyncio directly)."""
    return "asyncio"


def django_42() -> Path:
    """A directory holding Django 4.2 LTS, installed once per machine with pip."""
    marker = DJANGO_42 / ".complete"
    if not marker.exists():
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(DJANGO_42),
                                 "--upgrade", "django>=4.2,<5"], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.skip(f"could not install Django 4.2 with pip: {result.stderr[-500:]}")
        marker.write_text("ok")
    return DJANGO_42


@dataclass
class Server:
    url: str
    db: Path
    marks: Path
    app: AppServer

    def stop(self) -> None:
        self.app.stop()


@pytest.fixture(params=["django5", "django42"])
def version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def django_server(tmp_path: Path, version: str, target: str = "application") -> AsyncIterator[Server]:
    db = tmp_path / "streams.db"
    env = {"ASR_TEST_URL": f"sqlite:///{db}", "ASR_TEST_DIR": str(tmp_path)}
    if version == "django42":
        env["PYTHONPATH"] = os.pathsep.join([str(django_42()), str(ROOT)])
    async with uvicorn_process(f"tests.apps.django_app:{target}", tmp_path / "server.log", env) as app:
        async with httpx.AsyncClient(timeout=WAIT) as client:
            answer = (await client.get(f"{app.url}/health")).text
        assert answer.startswith("ok django " + ("4.2" if version == "django42" else "5.")), answer
        yield Server(app.url, db, tmp_path, app)


async def record_of(server: Server, stream_id: str, *, final: bool = True) -> tuple[StreamRecord, list[Chunk]]:
    """The stream's record and chunks once it has ended (bounded wait)."""
    async with SQLiteRecorder(server.db) as recorder:
        with anyio.fail_after(WAIT):
            while True:
                record = await recorder.get(stream_id)
                if record is not None and (record.finished or not final):
                    return record, await recorder.chunks(stream_id)
                await anyio.sleep(0.02)


async def wait_for_file(path: Path) -> None:
    with anyio.fail_after(WAIT):
        while not path.exists():  # noqa: ASYNC110, ASYNC240 - another process writes it
            await anyio.sleep(0.02)


@pytest.mark.parametrize("target", ["application", "wrapped"])
async def test_stream_is_incremental_and_recorded_exactly(tmp_path: Path, version: str, target: str) -> None:
    async with django_server(tmp_path, version, target) as server, httpx.AsyncClient(timeout=WAIT) as client:
        # The generator waits after its first token until the test opens its gate: the client
        # must have the first event by then (nothing buffered, by Django or its GZipMiddleware).
        async with aconnect_sse(client, "GET", f"{server.url}/chat?n=4&gate=1&tag=inc") as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            assert "content-encoding" not in source.response.headers
            stream_id = source.response.headers["x-stream-id"]
            events = source.aiter_sse()
            first = await events.__anext__()
            assert (first.id, first.data) == ("1", "token 0 ")
            (server.marks / "inc.gate").write_text("open")
            rest = [event async for event in events]
    data = [(e.id, e.data) for e in rest if e.event == "message"]
    assert data == [("2", "token 1 "), ("3", "token 2 "), ("4", "token 3 ")]
    assert rest[-1].event == "done"
    record, chunks = await record_of(server, stream_id)
    assert record.status is StreamStatus.COMPLETED
    assert [(str(c.seq), c.data) for c in chunks] == [(first.id, first.data), *data]
    assert record.metadata["user_agent"].startswith("python-httpx")
    assert (server.marks / "inc.finally").exists()


@pytest.mark.parametrize(("version", "target"), [("django5", "application"), ("django5", "wrapped"),
                                                 ("django42", "wrapped")])
async def test_hang_up_cancels_the_generator(tmp_path: Path, version: str, target: str) -> None:
    """Django 5 cancels the response; Django 4.2 does not listen any more, the middleware does
    (bare Django 4.2 cannot tell: that case is documented, not tested)."""
    async with django_server(tmp_path, version, target) as server, httpx.AsyncClient(timeout=WAIT) as client:
        async with aconnect_sse(client, "GET", f"{server.url}/chat?n=100000&delay=0.02&tag=gone") as source:
            stream_id = source.response.headers["x-stream-id"]
            seen = []
            async for event in source.aiter_sse():
                seen.append(event.data)
                if len(seen) == 3:
                    break
        # the connection is closed here: the generator must stop, its finally run
        await wait_for_file(server.marks / "gone.finally")
        record, chunks = await record_of(server, stream_id)
    assert record.status is StreamStatus.CANCELLED
    assert "client_disconnected_at_ms" in record.metadata and "cancelled_by" not in record.metadata
    assert [c.data for c in chunks[:3]] == seen
    assert len(chunks) < 1000  # stopped, not run to its end


async def test_post_body_path_parameters_and_key(tmp_path: Path, version: str) -> None:
    async with django_server(tmp_path, version) as server, httpx.AsyncClient(timeout=WAIT) as client:
        async with aconnect_sse(client, "POST", f"{server.url}/post", json={"words": ["a", "b\nc", "d"]}) as source:
            sid = source.response.headers["x-stream-id"]
            events = [event async for event in source.aiter_sse()]
        assert [(e.event, e.data) for e in events[:-1]] == [("word", "a"), ("word", "b\nc"), ("word", "d")]
        async with aconnect_sse(client, "GET", f"{server.url}/chat/alice") as source:
            named = source.response.headers["x-stream-id"]
            assert [e.data async for e in source.aiter_sse()][:1] == ["hello alice"]
        record, chunks = await record_of(server, sid)
        assert [c.data for c in chunks] == ["a", "b\nc", "d"] and record.text_event == "word"
        record, _ = await record_of(server, named)
        assert record.key == "alice" and record.path == "/chat/alice"


async def test_streams_app_next_to_django_and_shutdown(tmp_path: Path, version: str) -> None:
    """Wrapped: ``/streams`` answers next to Django's URLs; a SIGTERM mid-stream ends the stream
    ``interrupted`` with its chunks, and the client gets the shutdown event."""
    async with django_server(tmp_path, version, "wrapped") as server, httpx.AsyncClient(timeout=WAIT) as client:
        async with aconnect_sse(client, "GET", f"{server.url}/chat?n=3") as source:
            sid = source.response.headers["x-stream-id"]
            [e async for e in source.aiter_sse()]
        with anyio.fail_after(WAIT):
            while (answer := await client.get(f"{server.url}/streams/{sid}")).status_code != 200:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert answer.json()["status"] == "completed"
        chunks = (await client.get(f"{server.url}/streams/{sid}/chunks")).json()["chunks"]
        assert [c["data"] for c in chunks] == ["token 0 ", "token 1 ", "token 2 "]
        # a stream still running when the server is told to stop
        async with aconnect_sse(client, "GET", f"{server.url}/chat?n=100000&delay=0.02&tag=term") as source:
            running = source.response.headers["x-stream-id"]
            events = source.aiter_sse()
            seen = [(await events.__anext__()).data for _ in range(3)]
            server.stop()
            rest = [event async for event in events]
        assert rest[-1].event == "shutdown"
        seen += [e.data for e in rest if e.event == "message"]
        record, chunks = await record_of(server, running)
    assert record.status is StreamStatus.INTERRUPTED
    assert [c.data for c in chunks] == seen
    assert (server.marks / "term.finally").exists()


async def test_resume_with_last_event_id(tmp_path: Path, version: str) -> None:
    """``resume=True``: a client that drops comes back with ``Last-Event-ID`` and gets the rest,
    from the one generation (Django answers the join through the same pull mode)."""
    async with django_server(tmp_path, version, "wrapped") as server, httpx.AsyncClient(timeout=WAIT) as client:
        async with aconnect_sse(client, "GET", f"{server.url}/resume?n=20") as source:
            sid = source.response.headers["x-stream-id"]
            first = []
            async for event in source.aiter_sse():
                if event.id:  # (the retry hint that opens a resumable stream is no event)
                    first.append(event)
                if len(first) == 3:
                    break
        headers = {"Last-Event-ID": first[-1].id}
        async with aconnect_sse(client, "GET", f"{server.url}/resume?n=20", headers=headers) as source:
            assert source.response.headers["x-stream-id"] == sid
            rest = [event async for event in source.aiter_sse()]
        bad = await client.get(f"{server.url}/resume", headers={"Last-Event-ID": "nonsense"})
        record, chunks = await record_of(server, sid)
    assert bad.status_code == 400
    data = [e.data for e in first] + [e.data for e in rest if e.event == "message"]
    assert data == [f"part {i} " for i in range(20)] == [c.data for c in chunks]
    assert rest[-1].event == "done" and record.status is StreamStatus.COMPLETED


def test_djangos_own_async_test_client_reads_a_recorded_stream(tmp_path: Path) -> None:
    """What a Django user tests with: ``django.test.AsyncClient`` and ``streaming_content``."""
    script = tmp_path / "check.py"
    script.write_text(
        "import asyncio\n"
        "import tests.apps.django_app\n"
        "from django.test import AsyncClient\n"
        "async def main():\n"
        "    response = await AsyncClient().get('/chat?n=3')\n"
        "    assert response.status_code == 200 and response['content-type'].startswith('text/event-stream')\n"
        "    body = b''.join([part async for part in response.streaming_content]).decode()\n"
        "    print(response['x-stream-id'])\n"
        "    print(body)\n"
        "asyncio.run(main())\n", encoding="utf-8")
    env = {**os.environ, "ASR_TEST_URL": "memory://", "ASR_TEST_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sid, body = result.stdout.split("\n", 1)
    assert body.startswith("id: 1\ndata: token 0 \n\nid: 2\ndata: token 1 \n\nid: 3\ndata: token 2 \n\n")
    assert f'"stream_id":"{sid}","status":"completed"' in body
