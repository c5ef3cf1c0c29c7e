"""Real servers for tests: uvicorn on asyncio, hypercorn on trio, both on 127.0.0.1.

``serve(app)`` starts the server that matches the running event loop inside the test's
own loop and yields its base URL; leaving the block shuts it down.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import sniffio

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serve(app: Any, *, lifespan: str = "auto") -> AsyncIterator[str]:
    if sniffio.current_async_library() == "trio":
        async with _hypercorn(app) as url:
            yield url
    else:
        async with _uvicorn(app, lifespan) as url:
            yield url


@asynccontextmanager
async def _uvicorn(app: Any, lifespan: str) -> AsyncIterator[str]:
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
                await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()


@asynccontextmanager
async def _hypercorn(app: Any) -> AsyncIterator[str]:
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    config = Config()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.graceful_timeout = 2
    config.loglevel = "WARNING"
    stop = anyio.Event()

    async def trigger() -> None:
        await stop.wait()

    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(lambda task_status: hypercorn_serve(app, config, shutdown_trigger=trigger,
                                                               task_status=task_status))
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop.set()


async def wait_until_answering(proc: Any, url: str, log: Any, name: str, timeout: float = 15) -> None:
    """Poll ``url``/health until a server subprocess answers 200; fail with its output if it exits."""
    import httpx

    with anyio.fail_after(timeout):
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if proc.returncode is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
                try:
                    if (await client.get(f"{url}/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.05)


@dataclass
class AppServer:
    """An app served by ``python -m uvicorn`` in a process of its own (see :func:`uvicorn_process`)."""

    url: str
    log: Path
    process: Any

    def stop(self) -> None:
        """SIGTERM: what a process manager sends for a graceful shutdown."""
        self.process.terminate()


@asynccontextmanager
async def uvicorn_process(target: str, log: Path, env: dict[str, str]) -> AsyncIterator[AppServer]:
    """``uvicorn <target>`` from the repository root with ``env`` added, until its ``/health``
    answers; stopped on the way out, and its log must hold no traceback."""
    import subprocess
    import sys

    port = free_port()
    args = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
            "--timeout-graceful-shutdown", "2"]
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with log.open("wb") as out:
        proc = await anyio.open_process(args, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}", log, proc)
    try:
        await wait_until_answering(proc, server.url, log, target, timeout=20)
        yield server
    finally:
        with anyio.CancelScope(shield=True), anyio.fail_after(10):
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
            await proc.aclose()
        text = log.read_text(errors="replace")  # noqa: ASYNC240 - the server has exited
        assert "Traceback" not in text, text
