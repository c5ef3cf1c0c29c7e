"""12. What ``coalesce=`` saves for a fast model: events and bytes on the wire, server CPU per token.

A fast model is simulated in-process: 2,000 one-word tokens, a 0.5 ms pause every 5 tokens
(about 4-8k tokens/s, the rate of a small model on a fast provider), through a decorated
endpoint recording to SQLite; the ASGI ``send`` counts the body messages and bytes it is
given. CPU is the process's own (``time.process_time``: the event loop and the SQLite
writer thread) per token, from the request until everything is flushed. Each window size
runs beside the others in alternating rounds.

Over the wire, the same source runs in a uvicorn process (httptools, uvloop when installed)
read by an httpx client on 127.0.0.1; the server's own CPU time (``/proc/<pid>/stat``) per
token is what coalescing saves: one write and one TCP segment per window, not per token.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from .common import alternate, say, summary

TOKENS = 2000
WINDOWS: dict[str, float | None] = {"off": None, "10ms": 0.01, "50ms": 0.05}


async def one_run(window: float | None, tokens: int) -> dict[str, float]:
    from starlette.requests import Request

    from asgi_stream_recorder import SQLiteRecorder, recorded_stream

    folder = tempfile.mkdtemp(prefix="asr-bench-coalesce-")
    try:
        recorder = SQLiteRecorder(os.path.join(folder, "s.db"))

        @recorded_stream(recorder=recorder, coalesce=window, ping=None)
        async def chat(request: Request) -> AsyncIterator[str]:
            for i in range(tokens):
                yield " word"
                if i % 5 == 4:
                    await anyio.sleep(0.0005)

        events = size = 0
        body_read = False

        async def receive() -> dict[str, Any]:
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await anyio.sleep_forever()
            return {}  # pragma: no cover

        async def send(message: dict[str, Any]) -> None:
            nonlocal events, size
            if message["type"] == "http.response.body" and message.get("body"):
                events += message["body"].count(b"\n\n")
                size += len(message["body"])

        scope = {"type": "http", "method": "GET", "path": "/chat", "headers": [], "query_string": b"",
                 "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
        async with recorder:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            response = await chat(Request(scope, receive))
            await response(scope, receive, send)
            await recorder.flush()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        return {"events": events, "bytes": size, "cpu_us_per_token": cpu / tokens * 1e6, "wall_s": wall}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_SERVER = """
import os, anyio, uvicorn
from asgi_stream_recorder import SQLiteRecorder, stream_app
window = float(os.environ["W"]) or None
async def chat(request):
    for i in range({tokens}):
        yield " word"
        if i % 5 == 4:
            await anyio.sleep(0.0005)
app = stream_app(chat, recorder=SQLiteRecorder(os.environ["DB"]), coalesce=window, ping=None)
uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning", access_log=False)
"""


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wire_runs(rounds: int, tokens: int) -> dict[str, Any]:
    """Per window: events and bytes the client read, and the server's CPU per token (median of rounds)."""
    import socket
    import subprocess
    import sys

    import httpx

    out: dict[str, Any] = {}
    folder = tempfile.mkdtemp(prefix="asr-bench-coalesce-wire-")
    try:
        servers = {}
        for name, window in WINDOWS.items():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {**os.environ, "W": str(window or 0), "PORT": str(port), "DB": os.path.join(folder, f"{name}.db")}
            proc = subprocess.Popen([sys.executable, "-c", _SERVER.format(tokens=tokens)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers[name] = (proc, port)
        for name, (proc, port) in servers.items():
            deadline = time.monotonic() + 20
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"the {name} server did not start") from None
                    time.sleep(0.1)
        cpu: dict[str, list[float]] = {name: [] for name in WINDOWS}
        for r in range(rounds):
            for name in list(WINDOWS)[r % len(WINDOWS):] + list(WINDOWS)[:r % len(WINDOWS)]:
                proc, port = servers[name]
                before = _cpu_seconds(proc.pid)
                size = events = 0
                with httpx.stream("GET", f"http://127.0.0.1:{port}/", timeout=30) as response:
                    for data in response.iter_raw():
                        size += len(data)
                        events += data.count(b"\n\n")
                cpu[name].append((_cpu_seconds(proc.pid) - before) / tokens * 1e6)
                out[name] = {"events": events, "bytes": size}
        for name in WINDOWS:
            ordered = sorted(cpu[name])
            out[name]["server_cpu_us_per_token"] = ordered[len(ordered) // 2]
            say(f"  coalesce {name} over uvicorn: {out[name]['events']} events, {out[name]['bytes']} bytes, "
                f"server CPU {out[name]['server_cpu_us_per_token']:.1f} us per token")
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=10)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main(quick: bool) -> dict[str, Any]:
    rounds = 2 if quick else 5
    detail: dict[str, list[dict[str, float]]] = {name: [] for name in WINDOWS}

    def runner(name: str) -> Callable[[], float]:
        def run() -> float:
            result = anyio.run(one_run, WINDOWS[name], TOKENS)
            detail[name].append(result)
            return result["cpu_us_per_token"]
        return run

    cpu = summary(alternate({name: runner(name) for name in WINDOWS}, rounds, say))
    out: dict[str, Any] = {"tokens": TOKENS, "rounds": rounds, "cpu_us_per_token": cpu}
    for name, runs in detail.items():
        out[name] = {"events": runs[-1]["events"], "bytes": runs[-1]["bytes"],
                     "wall_s_median": sorted(r["wall_s"] for r in runs)[len(runs) // 2]}
    out["wire"] = wire_runs(3 if quick else 7, 10_000)
    base = cpu["off"]["median"]
    for name in WINDOWS:
        out[name]["cpu_ratio_to_off"] = cpu[name]["median"] / base
        say(f"  coalesce {name}: {out[name]['events']} events, {out[name]['bytes']} bytes, "
            f"{cpu[name]['median']:.2f} us CPU per token ({out[name]['cpu_ratio_to_off']:.2f}x of off)")
    return out


if __name__ == "__main__":
    main(quick=False)
