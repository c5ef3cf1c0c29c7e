"""5. Concurrency and memory, under uvicorn (httptools/uvloop) in a subprocess.

* Idle streams: open N streams (one token, then silence with a keep-alive ping every
  second), hold them a few seconds so pings flow, read the server's RSS and peak RSS
  (VmHWM) from /proc. RSS per stream = (RSS with N open - RSS after warm-up) / N. A fresh
  server per contender, all of them the same FastAPI app (``bench.apps.build_server_app``):

  - ``ours``: ``@recorded_stream`` recording to SQLite, behind ``StreamRecorderMiddleware``
    (how the library is meant to be mounted);
  - ``raw_asgi``: the floor, a bare ASGI route that sends one event and waits for the
    disconnect, the app *without* our middleware (uvicorn's and FastAPI's own cost of an
    open streaming connection);
  - ``raw_asgi_via_middleware``: the same route behind our middleware, which then drives it
    as an undecorated event stream (its watch task and keep-alives): the middleware's cost;
  - ``sse_starlette``: sse-starlette with the same generator and ping, without our middleware.

  After the RSS is read, the server counts what is alive (gc objects by type, tasks), and
  the per-stream census is the difference from the census after warm-up, divided by N.
* Loss: M concurrent streams of 500 unique tokens each, all recorded; the client checks every
  stream's ids and data (and its final ``done`` event), then the database is checked: every
  stream completed, exactly 500 chunks with seq 1..500, content equal to what was sent, no
  drops in the writer's stats.

The servers log to a file, never to a pipe nobody reads: a server that logs more than a pipe
holds (64 KiB: a warning per stream at 1000 streams) would block its event loop on the write.
Every wait is bounded: a family run ends in minutes whatever the server does.

``python -m bench.memory serve KIND PORT TIMEOUT`` serves one of the apps (used by the family).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from typing import Any

from .common import HOST, RawStream, dechunk, http_get, median, rotate, rss_kib, say, server_process

STACK = "uvicorn-httptools-uvloop"

#: contender: (the app it is served by, its path)
CONTENDERS = {
    "ours": ("with_middleware", "/idle_ours"),
    "sse_starlette": ("bare", "/idle_sse_starlette"),
    "raw_asgi": ("bare", "/idle_raw"),
    "raw_asgi_via_middleware": ("with_middleware", "/idle_raw"),
}
CENSUS_PATH = "/_bench_census"


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the served apps ---------------------------------------------------------------------------
def census() -> dict[str, Any]:
    """What is alive in this process: gc-tracked objects by type, and event-loop tasks."""
    gc.collect()
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] = counts.get(name, 0) + 1
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:
        tasks = -1
    return {"gc_objects": sum(counts.values()), "tasks": tasks, "by_type": counts}


def build(kind: str) -> Any:
    """``with_middleware``: ``bench.apps.build_server_app()`` as it is; ``bare``: its FastAPI app
    without our middleware. Both answer ``CENSUS_PATH`` (outside the app, so it costs it nothing)."""
    from . import apps

    app = apps.build_server_app()
    if kind == "bare":
        app = getattr(app, "app", app)  # (the middleware keeps the app it wraps as .app)
    elif kind != "with_middleware":
        raise ValueError(kind)

    async def served(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == CENSUS_PATH:
            body = json.dumps(census()).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return served


def serve(kind: str, port: int, timeout: float) -> None:
    threading.Timer(timeout, lambda: os._exit(3)).start()
    import uvicorn

    uvicorn.run(build(kind), host=HOST, port=port, http="httptools", loop="uvloop", log_level="warning",
                access_log=False, backlog=4096, timeout_keep_alive=30, timeout_graceful_shutdown=1)


def server(kind: str, env: dict[str, str] | None = None, timeout: float = 600.0) -> Any:
    """Serve ``build(kind)`` in a subprocess that logs to a file; yield (port, pid, log path).
    The process kills itself after ``timeout`` and is stopped on exit."""
    return server_process(lambda port: ["bench.memory", "serve", kind, str(port), str(timeout)], env, kind)


def log_summary(path: str) -> dict[str, Any]:
    """How much the server logged, and its first lines (a warning per stream shows here)."""
    with open(path, "rb") as f:
        lines = f.read().decode(errors="replace").splitlines()
    os.unlink(path)
    return {"lines": len(lines), "first": lines[:3]}


# -- idle streams ------------------------------------------------------------------------------
async def idle(port: int, pid: int, path: str, n: int, hold: float) -> dict[str, Any]:
    warm = [RawStream(port, path) for _ in range(20)]
    for s in warm:
        await s.open()
        await s.read_some()
    for s in warm:
        await s.close()
    await asyncio.sleep(0.5)
    base_rss, _base_hwm = rss_kib(pid)
    base_census = json.loads(await http_get(port, CENSUS_PATH))
    await asyncio.sleep(0.2)
    streams = [RawStream(port, path) for _ in range(n)]
    t0 = time.perf_counter()
    for k in range(0, n, 250):  # open in waves: the accept backlog is finite
        group = streams[k : k + 250]
        await asyncio.gather(*(s.open() for s in group))
        await asyncio.gather(*(s.read_some() for s in group))  # the first event: the stream is live
    opened = time.perf_counter() - t0
    await asyncio.sleep(hold)  # pings flow meanwhile (not read: the socket buffers hold them)
    rss, hwm = rss_kib(pid)
    ok = sum(1 for s in streams if s.status == 200)
    open_census = json.loads(await http_get(port, CENSUS_PATH))  # after the RSS: its gc pass moves nothing measured
    for s in streams:
        s.abort()
    await asyncio.sleep(0.5)
    per_type = {
        name: (count - base_census["by_type"].get(name, 0)) / n
        for name, count in open_census["by_type"].items()
    }
    top = dict(sorted(((k, round(v, 2)) for k, v in per_type.items() if v >= 0.5), key=lambda kv: -kv[1]))
    return {
        "streams": n, "ok": ok, "open_seconds": opened, "base_rss_kib": base_rss, "rss_kib": rss,
        "peak_rss_kib": hwm, "rss_per_stream_kib": (rss - base_rss) / n,
        "per_stream": {
            "gc_objects": (open_census["gc_objects"] - base_census["gc_objects"]) / n,
            "tasks": (open_census["tasks"] - base_census["tasks"]) / n,
            "by_type": top,
        },
    }


# -- loss --------------------------------------------------------------------------------------
def check_body(body: bytes, tokens: int) -> bool:
    """The client's view of one load stream: ids 1..tokens with the tokens sent, then one
    ``event: done`` saying completed."""
    events = [e for e in body.decode().split("\n\n") if e]
    if not events:
        return False
    *items, last = events
    if not last.startswith("event: done\n") or json.loads(last.split("\ndata: ", 1)[1])["status"] != "completed":
        return False
    ids = [int(line[4:]) for e in items for line in e.split("\n") if line.startswith("id: ")]
    data = [line[6:] for e in items for line in e.split("\n") if line.startswith("data: ")]
    return ids == list(range(1, tokens + 1)) and data == [f"t{i} " for i in range(tokens)]


async def loss(port: int, n_streams: int, tokens: int, read_timeout: float) -> dict[str, Any]:
    streams = [RawStream(port, f"/load?n={tokens}") for _ in range(n_streams)]
    bodies: list[bytes] = []
    sem = asyncio.Semaphore(1000)
    unfinished = 0

    async def one(s: RawStream) -> None:
        nonlocal unfinished
        async with sem:
            try:
                await asyncio.wait_for(s.open(), read_timeout)
                bodies.append(dechunk(await asyncio.wait_for(s.read_all(keep=True), read_timeout)))
            except (TimeoutError, OSError, ValueError):
                unfinished += 1
            await s.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in streams))
    wall = time.perf_counter() - t0
    client_bad = sum(1 for body in bodies if not check_body(body, tokens)) + unfinished
    info = json.loads(await asyncio.wait_for(http_get(port, "/db"), read_timeout))  # flushes the recorder
    ids = [s.headers.get("x-stream-id") for s in streams]
    con = sqlite3.connect(info["path"])
    try:
        q = ",".join("?" * len(ids))
        rows = con.execute(
            f"SELECT stream_id, count(*), count(DISTINCT seq), min(seq), max(seq) FROM chunks"
            f" WHERE stream_id IN ({q}) GROUP BY stream_id", ids).fetchall()
        status = dict(con.execute(f"SELECT id, status FROM streams WHERE id IN ({q})", ids).fetchall())
        contents = dict(con.execute(f"SELECT id, content FROM streams WHERE id IN ({q})", ids).fetchall())
    finally:
        con.close()
    want = "".join(f"t{i} " for i in range(tokens))
    total_chunks = sum(r[1] for r in rows)
    lost = n_streams * tokens - sum(min(r[2], tokens) for r in rows)
    dup = sum(r[1] - r[2] for r in rows)  # the primary key forbids it; counted anyway
    bad_rows = sum(1 for r in rows if not (r[1] == r[2] == tokens and r[3] == 1 and r[4] == tokens))
    return {
        "streams": n_streams, "tokens_per_stream": tokens, "wall_seconds": wall,
        "events_per_s": n_streams * tokens / wall, "chunks_in_db": total_chunks, "lost": lost,
        "duplicated": dup, "streams_in_db": len(rows), "streams_with_wrong_chunks": bad_rows + (n_streams - len(rows)),
        "streams_not_completed": sum(1 for i in ids if status.get(i) != "completed"),
        "content_mismatch": sum(1 for i in ids if contents.get(i) != want),
        "client_saw_wrong_events": client_bad, "client_unfinished": unfinished, "writer_stats": info["stats"],
    }


def main(quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    _raise_nofile()
    n_idle = 300 if quick else 10_000
    rounds = 1  # RSS is not a rate: one fresh server per contender
    hold = 1.0 if quick else 3.0
    out: dict[str, Any] = {"stack": STACK, "idle_rounds": rounds, "ping_seconds": 1.0,
                           "apps": {name: kind for name, (kind, _path) in CONTENDERS.items()}}
    names = [n for n in CONTENDERS if only is None or n in only]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds if names else 0):
        for name in rotate(names, r):
            kind, path = CONTENDERS[name]
            say(f"  {n_idle} idle streams: {name} (round {r + 1}/{rounds})")
            with server(kind, env={"BENCH_PING": "1"}, timeout=400) as (port, pid, log_path):
                res = asyncio.run(asyncio.wait_for(idle(port, pid, path, n_idle, hold), 300))
            res["server_log"] = log_summary(log_path)
            runs[name].append(res)
    out["idle"] = {
        name: {
            "rss_per_stream_kib": median([x["rss_per_stream_kib"] for x in rs]),
            "peak_rss_kib": median([x["peak_rss_kib"] for x in rs]),
            "runs": rs,
        }
        for name, rs in runs.items()
    }
    if "raw_asgi" in out["idle"]:
        floor = out["idle"]["raw_asgi"]["rss_per_stream_kib"]
        out["above_floor_kib"] = {name: e["rss_per_stream_kib"] - floor for name, e in out["idle"].items()
                                  if name != "raw_asgi"}
    if only is not None and "loss" not in only:
        return out
    n_loss = 100 if quick else 1_000
    say(f"  loss check: {n_loss} concurrent streams x 500 tokens, recorded")
    db_dir = tempfile.mkdtemp(prefix="asr-bench-loss-")
    with server("with_middleware", env={"BENCH_DB": os.path.join(db_dir, "loss.db")}, timeout=400) as (
        port, _pid, log_path,
    ):
        out["loss"] = asyncio.run(asyncio.wait_for(loss(port, n_loss, 500, read_timeout=120), 300))
    out["loss"]["server_log"] = log_summary(log_path)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:  # python -m bench.memory [--quick] [NAME ...]: a part of the family, printed
        args = [a for a in sys.argv[1:] if a != "--quick"]
        print(json.dumps(main("--quick" in sys.argv, args or None), indent=1))
