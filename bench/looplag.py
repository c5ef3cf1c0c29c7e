"""7. Event-loop lag under many concurrent streams at LLM pace, under uvicorn (httptools + uvloop).

One server process (``python -m bench.looplag serve``) serves three candidates over the same
token source: ``ours`` (``@recorded_stream`` recording to SQLite in a temp dir, the app wrapped
in ``StreamRecorderMiddleware``), ``plain`` (Starlette's ``StreamingResponse`` yielding
``id: i\\ndata: tok\\n\\n``) and ``sse_starlette`` (its ``EventSourceResponse``). Only ``/ours``
goes through the middleware (a small dispatcher routes the rest around it), so ``plain`` is
really plain. Each stream sends tokens at 30-50 tokens/s (rate drawn per stream, +-50 %
jitter per token, both seeded; the same seeds for every candidate of a round), catching up
after a stall as a buffered upstream would.

Inside the server a task sleeps 10 ms in a loop and notes the lag (actual sleep - 10 ms),
the process CPU time, how long the loop's thread waited for a CPU that another process held
(/proc schedstat: on a shared machine that, not the app, can dominate) and, through
``gc.callbacks``, every collection with its pause. A client in a separate process (asyncio
protocols on uvloop, counting ``data: tok`` lines) opens N streams; each sends one opening event,
then waits until the client, once all N are open, calls ``/go``: every stream then sends its
tokens for the planned seconds. The window runs from ``/go`` to the end of the first stream
(CLOCK_MONOTONIC is one clock for both processes), so opening N connections is not in it. The
client checks that every stream got every event and the chunked terminator, and notes its own
CPU and loop lag (does it keep up?). The server's samples in the window give p50/p99/max lag
and the gen-2 collections. One load at a time, one candidate at a time, in an order rotating
per round; figures are medians over rounds (the worst max is kept too).

On a machine other jobs keep busy, the server waits for a CPU (reported per round, as
"waited for a CPU"), which swamps the lag it causes itself: run with ``BENCH_RENICE=-10``
(and under ``setsid``, for ``bench.outage``'s reading client) to give the benchmark's processes
priority; the value used is kept in the results.

This module also holds the server app and the client shared by ``bench.leaks`` and
``bench.outage``; it imports nothing from ``bench.common`` (so it runs on any package state).
It measures whichever ``asgi_stream_recorder`` this process imports (the path is kept in the
results): put a snapshot first on ``PYTHONPATH``, and run from its directory, to measure it.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import contextlib
import gc
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

HOST = "127.0.0.1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACK = "uvicorn-httptools-uvloop"
CANDIDATES = ["ours", "plain", "sse_starlette"]
LABELS = {
    "ours": "@recorded_stream to SQLite, StreamRecorderMiddleware",
    "plain": "Starlette StreamingResponse (SSE text)",
    "sse_starlette": "sse-starlette EventSourceResponse",
}
SLEEP = 0.010  # the sleeper's period
TOKEN = b"data: tok"  # every candidate's token event, as counted by the client


# -- small helpers (kept here, not in bench.common) ----------------------------------------------
def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return float(ordered[k])


def num(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def rotate(names: list[str], i: int) -> list[str]:
    k = i % len(names)
    return names[k:] + names[:k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def renice() -> str | None:
    """With ``BENCH_RENICE=-10`` (say), this process gets that nice value, and so does its
    session's autogroup if it leads its session (the server and client processes do): on a
    machine that other jobs keep busy, they then get the CPU they need. Opt-in (it takes CPU
    from other sessions); needs the privilege to lower nice values."""
    value = os.environ.get("BENCH_RENICE")
    if not value:
        return None
    try:
        if os.getsid(0) == os.getpid():  # never another session's group (a user's shell)
            with contextlib.suppress(FileNotFoundError), open("/proc/self/autogroup", "w") as f:
                f.write(value)
        os.setpriority(os.PRIO_PROCESS, 0, int(value))
    except (OSError, ValueError) as exc:
        return f"{value} (failed: {exc})"
    return value


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def get_json(port: int, path: str, timeout: float = 60.0) -> Any:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def package_info() -> dict[str, Any]:
    """Which asgi_stream_recorder this run measures (a checkout, or a snapshot put first on PYTHONPATH)."""
    import asgi_stream_recorder

    path = os.path.dirname(os.path.abspath(asgi_stream_recorder.__file__))
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=path, timeout=10).stdout.strip()
    dirty = None
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True,
                             cwd=path, timeout=10)
        dirty = bool(out.stdout.strip()) if out.returncode == 0 else None
    return {"path": path, "git_commit": commit or None, "uncommitted_changes": dirty}


# -- the server side ------------------------------------------------------------------------------
def runqueue_wait() -> float | None:
    """Seconds this thread has spent runnable but waiting for a CPU (other processes had it)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class LoopMonitor:
    """A 10 ms sleeper noting its lag, the process CPU time, and every GC pause (gc.callbacks).
    Every 100 ms it also notes how long the loop's thread waited for a CPU held by another
    process (/proc schedstat): a busy machine, not the app, when that is high."""

    def __init__(self) -> None:
        self.at = array.array("d")  # monotonic time of each wake-up
        self.lag_ms = array.array("d")
        self.cpu = array.array("d")  # process CPU seconds at each wake-up
        self.gc_at = array.array("d")
        self.gc_gen = array.array("b")
        self.gc_ms = array.array("d")
        self._gc_t0 = 0.0
        self.wait_at = array.array("d")
        self.wait_s = array.array("d")

    def _on_gc(self, phase: str, info: Mapping[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_ms.append((time.perf_counter() - self._gc_t0) * 1000.0)
            self.gc_gen.append(info["generation"])
            self.gc_at.append(time.monotonic())

    async def run(self) -> None:
        gc.callbacks.append(self._on_gc)
        try:
            while True:
                t0 = time.perf_counter()
                await asyncio.sleep(SLEEP)
                t1 = time.perf_counter()
                self.at.append(time.monotonic())
                self.lag_ms.append((t1 - t0 - SLEEP) * 1000.0)
                self.cpu.append(time.process_time())
                if not self.wait_at or self.at[-1] - self.wait_at[-1] >= 0.1:
                    waited = runqueue_wait()
                    if waited is not None:
                        self.wait_at.append(self.at[-1])
                        self.wait_s.append(waited)
        finally:
            gc.callbacks.remove(self._on_gc)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        lo, hi = bisect.bisect_left(self.at, t0), bisect.bisect_right(self.at, t1)
        lags = list(self.lag_ms[lo:hi])
        g_lo, g_hi = bisect.bisect_left(self.gc_at, t0), bisect.bisect_right(self.gc_at, t1)
        gens = self.gc_gen[g_lo:g_hi]
        pauses = self.gc_ms[g_lo:g_hi]
        per_gen: dict[str, Any] = {}
        for g in (0, 1, 2):
            ps = [p for k, p in zip(gens, pauses, strict=True) if k == g]
            per_gen[f"gen{g}"] = {"count": len(ps), "total_ms": sum(ps), "max_ms": max(ps) if ps else 0.0}
        span = self.at[hi - 1] - self.at[lo] if hi - lo >= 2 else 0.0
        cpu = (self.cpu[hi - 1] - self.cpu[lo]) / span if span > 0 else None
        w_lo, w_hi = bisect.bisect_left(self.wait_at, t0), bisect.bisect_right(self.wait_at, t1)
        w_span = self.wait_at[w_hi - 1] - self.wait_at[w_lo] if w_hi - w_lo >= 2 else 0.0
        waited = (self.wait_s[w_hi - 1] - self.wait_s[w_lo]) / w_span if w_span > 0 else None
        return {
            "samples": len(lags), "seconds": span,
            "p50_ms": percentile(lags, 50), "p99_ms": percentile(lags, 99), "max_ms": max(lags) if lags else None,
            "mean_ms": statistics.fmean(lags) if lags else None,
            "over_10ms": sum(1 for x in lags if x > 10.0),
            "gc": per_gen, "gen2_collections": per_gen["gen2"]["count"], "server_cpu": cpu,
            "server_waited_for_cpu": waited,
        }


_BARRIERS: dict[str, Any] = {}  # run id -> anyio.Event, in the server process


def barrier(run: str) -> Any:
    import anyio

    event = _BARRIERS.get(run)
    if event is None:
        event = _BARRIERS[run] = anyio.Event()
    return event


async def ticks(q: Mapping[str, str]) -> AsyncIterator[int]:
    """1..n at ``rate`` tokens/s (0: as fast as possible), each interval jittered by +-``jit``,
    seeded by ``seed``; ``until`` (monotonic seconds) ends the stream early. Late tokens catch up.
    With ``run``: first 0 (the stream is open), then nothing until ``/go?run=`` starts every stream
    of the run at once, so that opening many connections is not part of the measured window."""
    import anyio

    if "run" in q:
        yield 0
        await barrier(q["run"]).wait()
    n, rate, jit = int(q.get("n", "10")), float(q.get("rate", "0")), float(q.get("jit", "0"))
    until = float(q.get("until", "0"))
    rng = random.Random(int(q.get("seed", "0")))
    clock = time.monotonic
    period = 1.0 / rate if rate > 0 else 0.0
    due = clock() + (rng.uniform(0.0, period) if jit else 0.0)
    for i in range(1, n + 1):
        if period:
            delay = due - clock()
            if delay > 0:
                await anyio.sleep(delay)
            due += period * (1.0 + jit * rng.uniform(-1.0, 1.0))
        if until and clock() > until:
            return
        yield i


def recorder_options(recorder: Any) -> dict[str, Any]:
    """The recorder's queue options as this package version defines them: keyword defaults of its
    constructors, and the live policy object where one is exposed (best effort, any version)."""
    import dataclasses
    import inspect

    out: dict[str, Any] = {"class": type(recorder).__name__}
    defaults: dict[str, Any] = {}
    for cls in type(recorder).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        with contextlib.suppress(TypeError, ValueError):
            for name, p in inspect.signature(init).parameters.items():
                if p.kind is p.KEYWORD_ONLY and p.default is not p.empty:
                    defaults.setdefault(name, p.default)
    out["constructor_defaults"] = defaults
    for owner in (recorder, getattr(recorder, "_writer", None), getattr(recorder, "writer", None)):
        if owner is None:
            continue
        for attr in ("policy", "_policy", "options"):
            pol = getattr(owner, attr, None)
            if pol is not None and dataclasses.is_dataclass(pol) and not isinstance(pol, type):
                out["policy"] = dataclasses.asdict(pol)
                break
        if "policy" in out:
            break
    return out


def build_app() -> Any:
    """The served app. Env: ``BENCH_DB`` (SQLite file), ``BENCH_MONITOR=0`` (no lag sampler)."""
    import anyio
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    import asgi_stream_recorder
    from asgi_stream_recorder import SQLiteRecorder, StreamRecorderMiddleware, recorded_stream

    db = os.environ.get("BENCH_DB") or os.path.join(tempfile.mkdtemp(prefix="asr-looplag-"), "bench.db")
    recorder = SQLiteRecorder(db)  # the defaults: the figures are for what a user gets
    monitor = LoopMonitor()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            if os.environ.get("BENCH_MONITOR", "1") != "0":
                tg.start_soon(monitor.run)
            yield
            tg.cancel_scope.cancel()

    @recorded_stream(recorder=recorder)
    async def ours(request: Request) -> AsyncIterator[str]:
        async for _ in ticks(request.query_params):
            yield "tok"

    async def plain(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            async for i in ticks(request.query_params):
                yield f"id: {i}\ndata: tok\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def sse_starlette(request: Request) -> EventSourceResponse:
        async def body() -> AsyncIterator[dict[str, Any]]:
            async for i in ticks(request.query_params):
                yield {"id": str(i), "data": "tok"}

        return EventSourceResponse(body(), ping=3600)  # no pings in the window: data events only

    @recorded_stream(recorder=recorder, ping=None)
    async def ours_idle(request: Request) -> AsyncIterator[str]:
        yield "tok"
        await anyio.sleep_forever()

    async def plain_idle(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            yield "data: tok\n\n"
            await anyio.sleep_forever()

        return StreamingResponse(body(), media_type="text/event-stream")

    async def go(request: Request) -> JSONResponse:
        barrier(request.query_params["run"]).set()
        return JSONResponse({"at": time.monotonic()})

    async def lag(request: Request) -> JSONResponse:
        q = request.query_params
        return JSONResponse(monitor.window(float(q["t0"]), float(q["t1"])))

    async def flush(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        with anyio.move_on_after(float(request.query_params.get("timeout", "60"))) as scope:
            await recorder.flush()
        return JSONResponse({"flushed": not scope.cancelled_caught, "seconds": time.perf_counter() - t0,
                             "stats": recorder.stats})

    package_dir = os.path.dirname(os.path.abspath(asgi_stream_recorder.__file__))

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(json.loads(json.dumps({
            "db": db, "stats": recorder.stats, "options": recorder_options(recorder),
            "package": package_dir,
            "tasks": len(asyncio.all_tasks()), "pid": os.getpid(), "renice": os.environ.get("BENCH_RENICED"),
        }, default=repr)))

    async def collect(request: Request) -> JSONResponse:
        collected = gc.collect()
        names = ("StreamSession", "RecordedStreamResponse", "StreamingResponse", "EventSourceResponse",
                 "Request", "_WireTap", "RequestState", "Chunk", "Segment", "Task", "Future")
        counts = dict.fromkeys(names, 0)
        for o in gc.get_objects():
            n = type(o).__name__
            if n in counts:
                counts[n] += 1
        return JSONResponse({"collected": collected, "live": counts, "tasks": len(asyncio.all_tasks()),
                             "gc_objects": len(gc.get_objects())})

    async def record(request: Request) -> JSONResponse:
        sid = request.query_params["id"]
        rec = await recorder.get(sid)
        chunks = await recorder.chunks(sid)
        seqs = [c.seq for c in chunks]
        return JSONResponse(json.loads(json.dumps({
            "found": rec is not None,
            "status": None if rec is None else str(rec.status),
            "chunk_count": None if rec is None else rec.chunk_count,
            "metadata": None if rec is None else rec.metadata,
            "chunks_stored": len(chunks), "distinct_seqs": len(set(seqs)), "max_seq": max(seqs) if seqs else 0,
        }, default=repr)))

    inner = Starlette(lifespan=lifespan, routes=[
        Route("/ours", ours), Route("/ours_idle", ours_idle), Route("/plain", plain),
        Route("/plain_idle", plain_idle), Route("/sse_starlette", sse_starlette), Route("/lag", lag), Route("/go", go),
        Route("/flush", flush), Route("/state", state), Route("/gc", collect), Route("/record", record),
    ])
    wrapped = StreamRecorderMiddleware(inner, recorder=recorder)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or scope.get("path", "").startswith("/ours"):
            await wrapped(scope, receive, send)
        else:
            await inner(scope, receive, send)

    return app


def serve(port: int, timeout: float) -> None:
    timer = threading.Timer(timeout, lambda: os._exit(3))  # a stuck benchmark never leaves it behind
    timer.daemon = True
    timer.start()
    raise_nofile()
    os.environ["BENCH_RENICED"] = str(renice())
    import uvicorn

    uvicorn.run(build_app(), host=HOST, port=port, http="httptools", loop="uvloop", log_level="warning",
                access_log=False, backlog=4096, timeout_keep_alive=30, timeout_graceful_shutdown=2, lifespan="on")


def _package_root() -> str:
    import asgi_stream_recorder

    return os.path.dirname(os.path.dirname(os.path.abspath(asgi_stream_recorder.__file__)))


def _child_env(env: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """(environment, cwd) for a child that imports the same asgi_stream_recorder as this process.

    Children start in their own session: with the kernel's autogroup scheduling (common on
    desktops and VMs) each session shares the CPUs equally, so the server and the client
    each get their own share instead of splitting one with this process."""
    pkg = _package_root()
    proc_env = {**os.environ, **(env or {})}
    paths = [pkg, ROOT, *[p for p in proc_env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    proc_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return proc_env, pkg


@contextlib.contextmanager
def serving(env: dict[str, str] | None = None, timeout: float = 900.0) -> Iterator[tuple[int, int]]:
    """Run the app under uvicorn (httptools, uvloop) in a subprocess; yield (port, pid).

    The SQLite file lives in a temporary directory removed afterwards (``/state`` names it)."""
    port = free_port()
    tmp = tempfile.TemporaryDirectory(prefix="asr-bench-")
    proc_env, cwd = _child_env({"BENCH_DB": os.path.join(tmp.name, "bench.db"), **(env or {})})
    log = tempfile.TemporaryFile()  # not a pipe: a chatty server must never block on a full one
    proc = subprocess.Popen([sys.executable, "-m", "bench.looplag", "serve", str(port), str(timeout)],
                            env=proc_env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    def tail() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {tail()}")
            try:
                with socket.create_connection((HOST, port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {tail()}") from None
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        tmp.cleanup()


# -- the client side ------------------------------------------------------------------------------
def request_bytes(port: int, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: text/event-stream\r\n"
            f"Connection: close\r\n\r\n").encode()


class SSEReader(asyncio.Protocol):
    """Reads one streamed response: status, headers, token events counted (``data: tok`` lines:
    not the other events a response may add, such as an ``event: done`` at the end), the chunked
    end. ``times`` (if given) gets the arrival time of every token; ``keep`` keeps the body."""

    def __init__(self, request: bytes, times: list[float] | None = None, keep: bool = False) -> None:
        self.request = request
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.times, self.keep = times, keep
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.head_done = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.events = 0
        self.tail = b""
        self.first: float | None = None
        self.ended = False  # the chunked terminator arrived
        self.t_end: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass of it
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.head_done:
            self.head += data
            k = self.head.find(b"\r\n\r\n")
            if k < 0:
                return
            lines = self.head[:k].decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            data, self.head, self.head_done = self.head[k + 4 :], b"", True
            if not data:
                return
        if self.first is None:
            self.first = now
        joined = self.tail + data
        new = joined.count(TOKEN) - self.tail.count(TOKEN)
        self.events += new
        if self.times is not None and new:
            self.times.extend([now] * new)
        if self.keep:
            self.body.append(data)
        self.tail = joined[-16:]
        if self.tail.endswith(b"\r\n0\r\n\r\n"):
            self.ended, self.t_end = True, now
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.t_end is None:
            self.t_end = time.monotonic()
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_reader(port: int, path: str, **kw: Any) -> SSEReader:
    loop = asyncio.get_running_loop()
    reader = SSEReader(request_bytes(port, path), **kw)
    await loop.create_connection(lambda: reader, HOST, port)
    return reader


async def open_many(port: int, paths: list[str], wave: int = 250, **kw: Any) -> list[SSEReader]:
    """Open connections ``wave`` at a time (the accept backlog is finite)."""
    readers: list[SSEReader] = []
    for k in range(0, len(paths), wave):
        readers += await asyncio.gather(*(open_reader(port, p, **kw) for p in paths[k : k + wave]))
    return readers


async def wait_first(readers: list[SSEReader], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(r.first is not None for r in readers):
        dead = [r for r in readers if r.first is None and r.done.done()]
        if dead:
            raise AssertionError(f"{len(dead)} streams closed without an event, e.g. status {dead[0].status}")
        if time.monotonic() > deadline:
            missing = sum(1 for r in readers if r.first is None)
            raise AssertionError(f"{missing} of {len(readers)} streams had no first event after {timeout:.0f} s")
        await asyncio.sleep(0.005)


def stream_path(spec: Mapping[str, Any], i: int, run: str) -> tuple[str, int | None]:
    """(path, expected data events or None) of stream ``i``: its rate from the spec's seed, enough
    tokens for ``duration`` seconds, after the opening event and the run's start signal."""
    seed = spec["seed"] * 1_000_003 + i
    if spec.get("rate_hi", 0) > 0:
        rate = random.Random(seed).uniform(spec["rate_lo"], spec["rate_hi"])
        n = max(1, round(rate * spec["duration"]))
        return f"/{spec['candidate']}?n={n}&rate={rate:.4f}&jit={spec.get('jit', 0.5)}&seed={seed}&run={run}", n + 1
    # flat out until a deadline (bulk load), no start signal
    return f"/{spec['candidate']}?n=100000000&rate=0&until={spec['until']:.6f}&seed={seed}", None


async def client_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Open the spec's streams, read them to the end, check them; the window when all were live."""
    port, streams = spec["port"], spec["streams"]
    lags: list[tuple[float, float]] = []

    async def sleeper() -> None:  # the client's own loop lag: does it keep up?
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(SLEEP)
            lags.append((time.monotonic(), (time.perf_counter() - t0 - SLEEP) * 1000.0))

    probe = asyncio.get_running_loop().create_task(sleeper())
    t_start = time.monotonic()
    run = f"{os.getpid()}-{t_start}"
    readers: list[SSEReader] = []
    expected: list[int | None] = []
    for k in range(0, streams, 250):  # in waves: the accept backlog is finite
        plan = [stream_path(spec, i, run) for i in range(k, min(k + 250, streams))]
        readers += await asyncio.gather(*(open_reader(port, p) for p, _ in plan))
        expected += [n for _, n in plan]
    await wait_first(readers, 60)
    t_open = time.monotonic()
    if spec.get("rate_hi", 0) > 0:
        t_live = (await asyncio.to_thread(get_json, port, f"/go?run={run}"))["at"]
    else:
        t_live = max(r.first for r in readers if r.first is not None)
    cpu_live = time.process_time()
    await asyncio.wait_for(asyncio.gather(*(r.done for r in readers)), spec.get("timeout", spec["duration"] + 120))
    t_done = time.monotonic()
    cpu_done = time.process_time()
    probe.cancel()
    ends = [r.t_end for r in readers if r.t_end is not None]
    t_first_end = min(ends) if ends else t_done
    bad = [
        (i, r.status, r.events, n, r.ended)
        for i, (r, n) in enumerate(zip(readers, expected, strict=True))
        if r.status != 200 or not r.ended or (n is not None and r.events != n)
    ]
    window_lags = [lag for t, lag in lags if t_live <= t <= t_first_end]
    return {
        "streams": len(readers), "events": sum(r.events for r in readers),
        "expected_events": sum(n for n in expected if n is not None),
        "streams_bad": len(bad), "bad_examples": bad[:5],
        "open_seconds": t_open - t_start, "window": [t_live, t_first_end], "window_seconds": t_first_end - t_live,
        "wall_seconds": t_done - t_start,
        "client_cpu_in_window": (cpu_done - cpu_live) / (t_done - t_live) if t_done > t_live else None,
        "client_lag_p99_ms": percentile(window_lags, 99), "client_lag_max_ms": max(window_lags, default=None),
    }


def client_main(spec_json: str) -> None:
    raise_nofile()
    renice()
    spec = json.loads(spec_json)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(client_run(spec))), flush=True)


def run_client(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``client_run`` in a separate process (its own core, its own loop) and return its report."""
    proc_env, cwd = _child_env()
    limit = spec.get("timeout", spec.get("duration", 0) + 120) + 60
    out = subprocess.run([sys.executable, "-m", "bench.looplag", "client", json.dumps(spec)], env=proc_env,
                         cwd=cwd, capture_output=True, text=True, timeout=limit, start_new_session=True)
    if out.returncode != 0:
        raise RuntimeError(f"client failed: {out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def client_in_background(spec: dict[str, Any]) -> Iterator[Callable[[], dict[str, Any]]]:
    """Start the client process now; the yielded function waits for its report."""
    proc_env, cwd = _child_env()
    proc = subprocess.Popen([sys.executable, "-m", "bench.looplag", "client", json.dumps(spec)], env=proc_env,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def result() -> dict[str, Any]:
        out, err = proc.communicate(timeout=spec.get("timeout", 120) + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"client failed: {err[-3000:]}")
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return report

    try:
        yield result
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- the benchmark --------------------------------------------------------------------------------
def settle(port: int) -> dict[str, Any]:
    """Let the recorder write everything queued, then let the loop go quiet."""
    flushed: dict[str, Any] = get_json(port, "/flush?timeout=60", timeout=90)
    time.sleep(0.5)
    return flushed


def measure(port: int, candidate: str, streams: int, duration: float, seed: int) -> dict[str, Any]:
    spec = {"port": port, "candidate": candidate, "streams": streams, "duration": duration, "seed": seed,
            "rate_lo": 30.0, "rate_hi": 50.0, "jit": 0.5}
    client = run_client(spec)
    if client["streams_bad"]:
        raise AssertionError(f"{candidate}, {streams} streams: {client['streams_bad']} streams incomplete, e.g. "
                             f"(index, status, events, expected, ended) {client['bad_examples']}")
    t0, t1 = client["window"]
    lag: dict[str, Any] = get_json(port, f"/lag?t0={t0}&t1={t1}")
    load = os.getloadavg()[0]
    settle(port)
    return {**lag, "client": client, "load_average": load}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        return median([r[key] for r in runs if r.get(key) is not None])

    return {
        "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "max_ms": med("max_ms"),
        "max_ms_worst": max((r["max_ms"] for r in runs if r["max_ms"] is not None), default=None),
        "gen2_collections": med("gen2_collections"),
        "gen2_pause_max_ms": median([r["gc"]["gen2"]["max_ms"] for r in runs]),
        "gc_pause_max_ms": median([max(r["gc"][g]["max_ms"] for g in ("gen0", "gen1", "gen2")) for r in runs]),
        "server_cpu": med("server_cpu"), "server_waited_for_cpu": med("server_waited_for_cpu"),
        "load_average": median([r["load_average"] for r in runs]),
        "window_seconds": median([r["client"]["window_seconds"] for r in runs]),
        "events_checked": sum(r["client"]["events"] for r in runs),
        "rounds": runs,
    }


def main(quick: bool) -> dict[str, Any]:
    raise_nofile()
    loads = [500, 1000]
    duration = 4.5 if quick else 12.0  # seconds during which all the streams are live
    rounds = 1 if quick else 3
    out: dict[str, Any] = {"stack": STACK, "loads": loads, "window_seconds_planned": duration, "rounds": rounds,
                           "token_rate": "30-50 tokens/s per stream (seeded), +-50 % jitter per token",
                           "lag_sampler": f"{SLEEP * 1000:.0f} ms sleep, lag = actual - {SLEEP * 1000:.0f} ms",
                           "labels": LABELS, "package": package_info()}
    with serving(timeout=1800) as (port, _pid):
        info = get_json(port, "/state")
        out["recorder"] = info["options"]
        out["served_package"] = info["package"]
        out["renice"] = info["renice"]
        say(f"  recorder options: {json.dumps(info['options'], default=str)}")
        for cand in CANDIDATES:  # warm-up
            run_client({"port": port, "candidate": cand, "streams": 50, "duration": 0.5, "seed": 999,
                        "rate_lo": 30.0, "rate_hi": 50.0, "jit": 0.5})
        settle(port)
        for load in loads:
            runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CANDIDATES}
            for r in range(rounds):
                for cand in rotate(CANDIDATES, r):
                    m = measure(port, cand, load, duration, seed=1000 * load + r)
                    runs[cand].append(m)
                    c = m["client"]
                    say(f"   {load} streams, round {r + 1}/{rounds}, {cand}: lag p50 {num(m['p50_ms'])} p99 "
                        f"{num(m['p99_ms'])} max {num(m['max_ms'])} ms, gen-2 GCs {m['gen2_collections']}, server "
                        f"CPU {num(m['server_cpu'], '.0%')}, waited for a CPU "
                        f"{num(m['server_waited_for_cpu'], '.0%')}; opened in {c['open_seconds']:.1f} s, window "
                        f"{c['window_seconds']:.1f} s, client CPU {num(c['client_cpu_in_window'], '.0%')}, client lag "
                        f"p99 {num(c['client_lag_p99_ms'])} ms; load average {m['load_average']:.1f}")
            s: dict[str, Any] = {c: summarize(rs) for c, rs in runs.items()}
            plain_p99, sse_p99, ours_p99 = s["plain"]["p99_ms"], s["sse_starlette"]["p99_ms"], s["ours"]["p99_ms"]
            s["ratio_p99_ours_to_plain"] = ours_p99 / plain_p99 if plain_p99 else None
            s["ratio_p99_ours_to_sse_starlette"] = ours_p99 / sse_p99 if sse_p99 else None
            out[f"streams_{load}"] = s
        out["recorder_stats_at_end"] = get_json(port, "/state")["stats"]
    return out


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), float(sys.argv[3]))
    elif sys.argv[1] == "client":
        client_main(sys.argv[2])
    else:
        raise SystemExit("usage: python -m bench.looplag serve PORT TIMEOUT | client SPEC_JSON")
