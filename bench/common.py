"""Shared helpers: alternating rounds, statistics, a null recorder, a tiny raw HTTP client, servers.

Every figure is measured beside its peers in the same run: each round runs every
candidate once, in an order that rotates from round to round, and the reported figure is
the median over rounds. Ratios are ratios of those medians.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from asgi_stream_recorder.recorders import Backend, Recorder
from asgi_stream_recorder.recorders.base import Batch, Chunk, StreamRecord, StreamStatus

HOST = "127.0.0.1"


# -- statistics ----------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return float(ordered[k])


def rotate(names: list[str], i: int) -> list[str]:
    k = i % len(names)
    return names[k:] + names[:k]


def alternate(
    candidates: dict[str, Callable[[], float]], rounds: int, log: Callable[[str], None] | None = None
) -> dict[str, list[float]]:
    """Run each candidate once per round, rotating the order; return every round's value per name."""
    names = list(candidates)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in rotate(names, r):
            value = candidates[name]()
            out[name].append(value)
            if log is not None:
                log(f"    round {r + 1}/{rounds} {name}: {value:,.0f}")
    return out


async def alternate_async(
    candidates: dict[str, Callable[[], Awaitable[float]]], rounds: int, log: Callable[[str], None] | None = None
) -> dict[str, list[float]]:
    names = list(candidates)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in rotate(names, r):
            value = await candidates[name]()
            out[name].append(value)
            if log is not None:
                log(f"    round {r + 1}/{rounds} {name}: {value:,.0f}")
    return out


def summary(samples: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {n: {"median": median(v), "rounds": v} for n, v in samples.items()}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- a recorder that records nothing (recording "off", same code path) -------------------------
class NullBackend(Backend):
    """A backend that discards batches."""

    async def write(self, batch: Batch) -> None:
        return None

    async def get(self, stream_id: str) -> StreamRecord | None:
        return None

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        return []

    async def list_streams(
        self, status: StreamStatus | str | None = None, limit: int = 100, key: str | None = None
    ) -> list[StreamRecord]:
        return []

    async def heartbeat(self, owner: str, at: float) -> None:
        return None

    async def recover(self, stale_before: float) -> int:
        return 0


def NullRecorder() -> Recorder:
    """The full recorder path (session, queue, writer task) over a backend that discards batches."""
    return Recorder(NullBackend())


def tokens(n: int) -> list[str]:
    """Small LLM-like token strings."""
    words = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
    return [words[i % len(words)] for i in range(n)]


# -- a minimal HTTP/1.1 client for SSE (httpx costs more CPU per event than the servers do) ----
class RawStream:
    """GET a URL over a plain socket and read the chunked body, counting bytes and events."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body_bytes = 0
        self.events = 0
        self.t_first: float | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port, limit=1 << 20)
        self.writer.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                self.headers[k.strip().lower()] = v.strip()

    async def read_some(self) -> bytes:
        """Raw bytes as they arrive (chunk framing included); b'' at EOF."""
        assert self.reader is not None
        data = await self.reader.read(1 << 18)
        if data and self.t_first is None:
            self.t_first = time.perf_counter()
        return data

    async def read_all(self, keep: bool = False) -> bytes:
        """Read to the end of the chunked body. Counts events by their blank-line terminators."""
        assert self.reader is not None
        kept: list[bytes] = []
        tail = b""
        events = 0
        total = 0
        read = self.reader.read
        while True:
            data = await read(1 << 18)
            if not data:
                break
            if self.t_first is None:
                self.t_first = time.perf_counter()
            total += len(data)
            joined = tail + data
            events += joined.count(b"\n\n") + joined.count(b"\r\n\r\n") - tail.count(b"\n\n") - tail.count(b"\r\n\r\n")
            if keep:
                kept.append(data)
            tail = joined[-8:]
            if tail.endswith(b"\r\n0\r\n\r\n") or (total == 5 and data == b"0\r\n\r\n"):
                break
        self.body_bytes, self.events = total, events - 1  # the chunked terminator's blank line
        return b"".join(kept)

    def abort(self) -> None:
        """Close the socket now (RST-free close, as a browser tab does)."""
        if self.writer is not None:
            self.writer.close()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


def dechunk(raw: bytes) -> bytes:
    """Remove HTTP/1.1 chunk framing."""
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        j = raw.index(b"\r\n", i)
        size = int(raw[i:j].split(b";")[0], 16)
        if size == 0:
            break
        out += raw[j + 2 : j + 2 + size]
        i = j + 2 + size + 2
    return bytes(out)


# -- servers as subprocesses ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


STACKS = {
    "uvicorn-httptools-uvloop": {"http": "httptools", "loop": "uvloop"},
    "uvicorn-h11-asyncio": {"http": "h11", "loop": "asyncio"},
}


@contextlib.contextmanager
def server(
    app: str, stack: str, env: dict[str, str] | None = None, timeout: float = 600.0
) -> Iterator[tuple[int, int]]:
    """Run ``bench.apps:<app>`` under uvicorn in a subprocess on 127.0.0.1; yield (port, pid).

    The process is bounded in time by ``timeout`` (killed after it) and stopped on exit.
    """
    opts = STACKS[stack]
    log = ""
    try:
        with server_process(lambda port: ["bench.serve", app, str(port), opts["http"], opts["loop"], str(timeout)],
                            env, app) as (port, pid, log):
            yield port, pid
    finally:
        with contextlib.suppress(FileNotFoundError):
            if log:
                os.unlink(log)


@contextlib.contextmanager
def server_process(
    command: Callable[[int], list[str]], env: dict[str, str] | None, name: str, start_timeout: float = 30.0
) -> Iterator[tuple[int, int, str]]:
    """Run ``python -m <command(port)>`` from the repository root, wait until it listens on
    127.0.0.1:port; yield (port, pid, the path of its log file); stop it on exit.

    The log goes to a file: a pipe nobody reads fills after 64 KiB (a burst of warnings under
    load) and then blocks the server's event loop in write(2). The caller removes the file
    (``server`` does; ``bench.memory.log_summary`` reads it first)."""
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc_env = {**os.environ, **(env or {})}
    proc_env["PYTHONPATH"] = os.pathsep.join(p for p in [proc_env.get("PYTHONPATH", ""), root] if p)
    fd, log_path = tempfile.mkstemp(prefix=f"asr-bench-{name}-", suffix=".log")
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", *command(port)], env=proc_env, cwd=root,
                                stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server {name} exited: {_tail(log_path)}")
            try:
                with socket.create_connection((HOST, port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server {name} did not start: {_tail(log_path)}") from None
                time.sleep(0.05)
        yield port, proc.pid, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: str, n: int = 2000) -> str:
    with open(path, "rb") as f:
        return f.read()[-n:].decode(errors="replace")


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


async def http_get(port: int, path: str) -> bytes:
    """A small non-streaming GET, returning the body."""
    s = RawStream(port, path)
    await s.open()
    if s.headers.get("transfer-encoding") == "chunked":
        raw = await s.read_all(keep=True)
        body = dechunk(raw)
    else:
        assert s.reader is not None
        body = await s.reader.readexactly(int(s.headers.get("content-length", "0")))
    await s.close()
    return body


def run_async(fn: Callable[[], Awaitable[Any]], timeout: float) -> Any:
    """Run a coroutine on a fresh asyncio loop, bounded in time."""

    async def bounded() -> Any:
        return await asyncio.wait_for(fn(), timeout)

    return asyncio.run(bounded())
