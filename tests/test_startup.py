"""A recorder that cannot open fails the server's startup with one clear line, never a hang."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette

from asgi_stream_recorder import SQLiteRecorder, StreamRecorderMiddleware
from asgi_stream_recorder.app import stream_app

from .servers import free_port
from .test_shutdown import APP, ROOT

pytestmark = pytest.mark.anyio


def not_a_database(tmp_path: Path) -> Path:
    path = tmp_path / "streams.db"
    path.write_bytes(b"this is a text file, not SQLite\n" * 200)
    return path


def newer_schema(tmp_path: Path) -> Path:
    path = tmp_path / "streams.db"
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 999")
    con.close()
    return path


BAD_FILES = {"not-a-database": (not_a_database, "not a database"), "newer-schema": (newer_schema, "newer")}


async def run_lifespan(app: Any) -> list[dict[str, Any]]:
    """Drive an app's lifespan startup as a server does; return what the app sent."""
    sent: list[dict[str, Any]] = []
    inbox = [{"type": "lifespan.startup"}]

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):  # today's bug: the middleware never answered, and the server waited forever
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent


@pytest.mark.parametrize("bad", list(BAD_FILES))
@pytest.mark.parametrize("inner", ["starlette", "stream_app"])
async def test_startup_fails_with_a_message_naming_the_file(tmp_path: Path, bad: str, inner: str) -> None:
    make, words = BAD_FILES[bad]
    path = make(tmp_path)

    async def tokens(request: Any) -> Any:
        yield "x"

    app = Starlette() if inner == "starlette" else stream_app(tokens)
    sent = await run_lifespan(StreamRecorderMiddleware(app, recorder=SQLiteRecorder(path)))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    message = sent[0]["message"]
    assert str(path) in message and words in message
    assert "\n" not in message


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("bad", list(BAD_FILES))
async def test_uvicorn_exits_at_once_naming_the_file(tmp_path: Path, bad: str) -> None:
    make, words = BAD_FILES[bad]
    path = make(tmp_path)
    env = {**os.environ, "ASR_TEST_DB": str(path), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(free_port())]
    proc = await anyio.open_process(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with anyio.fail_after(15):
            code = await proc.wait()
            assert proc.stdout is not None
            output = (await proc.stdout.receive()).decode(errors="replace") if code is not None else ""
            async for more in proc.stdout:
                output += more.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.aclose()
    assert code != 0
    lines = [line for line in output.splitlines() if str(path) in line]
    assert lines, output
    assert words in lines[0]
    assert "Application startup failed" in output


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("url", ["postgresql://app:s3cr3t-pw@127.0.0.1:{port}/app?schema=s",
                                 "redis://:s3cr3t-pw@127.0.0.1:{port}/0"], ids=["postgres", "redis"])
async def test_a_database_server_that_is_down_fails_startup_quickly_without_the_password(url: str) -> None:
    """Our documented choice: a recorder that cannot connect at startup fails it (the server exits
    with one line naming the server), bounded in time; the password in its URL is never shown."""
    down = url.format(port=free_port())  # nothing listens there
    env = {**os.environ, "ASR_TEST_URL": down, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "uvicorn", "tests.apps.scale_app:app", "--host", "127.0.0.1",
            "--port", str(free_port())]
    started = anyio.current_time()
    with anyio.fail_after(30):
        result = await anyio.run_process(args, cwd=ROOT, env=env, check=False, stderr=subprocess.STDOUT)
    elapsed = anyio.current_time() - started
    output = result.stdout.decode(errors="replace")
    assert result.returncode != 0, output
    assert elapsed < 20, f"startup took {elapsed:.1f} s to fail"
    assert "Application startup failed" in output
    assert "s3cr3t-pw" not in output, output
    host_port = down.split("@", 1)[1].split("/", 1)[0]
    assert any(host_port in line for line in output.splitlines()), output
