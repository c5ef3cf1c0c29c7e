"""Django: ``integrations.django.recorded_stream`` under uvicorn, in a process of its own.

``tests.apps.django_app`` is served bare (Django's ``get_asgi_application()``, no lifespan)
and wrapped (the streams app mounted next to Django's URLs, under the middleware), on the
installed Django (5.x) and on Django 4.2 LTS (installed with pip into a directory put first
on the server's ``PYTHONPATH``). A real httpx client reads each stream (with its default
``Accept-Encoding: gzip``: the app runs Django's ``GZipMiddleware``); the checks every
adapter must pass are in ``tests/pulled_checks.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from asgi_stream_recorder import StreamStatus

from .pulled_checks import (
    WAIT,
    Served,
    hang_up_cancels,
    incremental_and_exact,
    post_body_and_key,
    record_of,
    sigterm_interrupts,
)
from .servers import ROOT, uvicorn_process

pytestmark = pytest.mark.anyio

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


@pytest.fixture(params=["django5", "django42"])
def version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def django_server(tmp_path: Path, version: str, target: str = "application") -> AsyncIterator[Served]:
    db = tmp_path / "streams.db"
    env = {"ASR_TEST_URL": f"sqlite:///{db}", "ASR_TEST_DIR": str(tmp_path)}
    if version == "django42":
        env["PYTHONPATH"] = os.pathsep.join([str(django_42()), str(ROOT)])
    async with uvicorn_process(f"tests.apps.django_app:{target}", tmp_path / "server.log", env) as app:
        async with httpx.AsyncClient(timeout=WAIT) as client:
            answer = (await client.get(f"{app.url}/health")).text
        assert answer.startswith("ok django " + ("4.2" if version == "django42" else "5.")), answer
        yield Served(app.url, db, tmp_path, app)


@pytest.mark.parametrize("target", ["application", "wrapped"])
async def test_stream_is_incremental_and_recorded_exactly(tmp_path: Path, version: str, target: str) -> None:
    async with django_server(tmp_path, version, target) as served:
        await incremental_and_exact(served)


@pytest.mark.parametrize(("version", "target"), [("django5", "application"), ("django5", "wrapped"),
                                                 ("django42", "wrapped")])
async def test_hang_up_cancels_the_generator(tmp_path: Path, version: str, target: str) -> None:
    """Django 5 cancels the response; Django 4.2 does not listen any more, the middleware does
    (bare Django 4.2 cannot tell: that case is documented, not tested)."""
    async with django_server(tmp_path, version, target) as served:
        await hang_up_cancels(served)


async def test_post_body_path_parameters_and_key(tmp_path: Path, version: str) -> None:
    async with django_server(tmp_path, version) as served:
        await post_body_and_key(served)


async def test_streams_app_next_to_django_and_shutdown(tmp_path: Path, version: str) -> None:
    """Wrapped: ``/streams`` answers next to Django's URLs; a SIGTERM mid-stream ends the stream
    ``interrupted`` with its chunks, and the client gets the shutdown event."""
    async with django_server(tmp_path, version, "wrapped") as served, httpx.AsyncClient(timeout=WAIT) as client:
        async with aconnect_sse(client, "GET", f"{served.url}/chat?n=3") as source:
            sid = source.response.headers["x-stream-id"]
            [e async for e in source.aiter_sse()]
        with anyio.fail_after(WAIT):
            while (answer := await client.get(f"{served.url}/streams/{sid}")).status_code != 200:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert answer.json()["status"] == "completed"
        chunks = (await client.get(f"{served.url}/streams/{sid}/chunks")).json()["chunks"]
        assert [c["data"] for c in chunks] == ["token 0 ", "token 1 ", "token 2 "]
        await sigterm_interrupts(served)


async def test_resume_with_last_event_id(tmp_path: Path, version: str) -> None:
    """``resume=True``: a client that drops comes back with ``Last-Event-ID`` and gets the rest,
    from the one generation (Django answers the join through the same pull mode)."""
    async with django_server(tmp_path, version, "wrapped") as served, httpx.AsyncClient(timeout=WAIT) as client:
        async with aconnect_sse(client, "GET", f"{served.url}/resume?n=20") as source:
            sid = source.response.headers["x-stream-id"]
            first = []
            async for event in source.aiter_sse():
                if event.id:  # (the retry hint that opens a resumable stream is no event)
                    first.append(event)
                if len(first) == 3:
                    break
        headers = {"Last-Event-ID": first[-1].id}
        async with aconnect_sse(client, "GET", f"{served.url}/resume?n=20", headers=headers) as source:
            assert source.response.headers["x-stream-id"] == sid
            rest = [event async for event in source.aiter_sse()]
        bad = await client.get(f"{served.url}/resume", headers={"Last-Event-ID": "nonsense"})
        record, chunks = await record_of(served, sid)
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
