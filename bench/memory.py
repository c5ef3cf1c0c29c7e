"""5. Concurrency and memory, under uvicorn (httptools/uvloop) in a subprocess.

* Idle streams (peers: sse-starlette, and a bare ASGI app that only holds the connection,
  which is uvicorn's own floor): open N streams (one token, then silence with a keep-alive ping every second,
  recorded to SQLite), hold them a few seconds so pings flow, read the server's RSS and peak
  RSS (VmHWM) from /proc. RSS per stream = (RSS with N open - RSS after warm-up) / N. Peer:
  sse-starlette with the same generator and ping; a fresh server per measurement.
* Loss: M concurrent streams of 500 unique tokens each, all recorded; the client checks every
  stream's ids and data, then the database is checked: every stream completed, exactly 500
  chunks with seq 1..500, content equal to what was sent, no drops in the writer's stats.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sqlite3
import tempfile
import time
from typing import Any

from .common import RawStream, dechunk, http_get, median, rotate, rss_kib, say, server

STACK = "uvicorn-httptools-uvloop"


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def idle(port: int, pid: int, path: str, n: int, hold: float) -> dict[str, Any]:
    warm = [RawStream(port, path) for _ in range(20)]
    for s in warm:
        await s.open()
        await s.read_some()
    for s in warm:
        await s.close()
    await asyncio.sleep(0.5)
    base_rss, _base_hwm = rss_kib(pid)
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
    for s in streams:
        s.abort()
    await asyncio.sleep(0.5)
    return {
        "streams": n, "ok": ok, "open_seconds": opened, "base_rss_kib": base_rss, "rss_kib": rss,
        "peak_rss_kib": hwm, "rss_per_stream_kib": (rss - base_rss) / n,
    }


async def loss(port: int, n_streams: int, tokens: int) -> dict[str, Any]:
    streams = [RawStream(port, f"/load?n={tokens}") for _ in range(n_streams)]
    bodies: list[bytes] = []
    sem = asyncio.Semaphore(1000)

    async def one(s: RawStream) -> None:
        async with sem:
            await s.open()
            bodies.append(dechunk(await s.read_all(keep=True)))
            await s.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in streams))
    wall = time.perf_counter() - t0
    client_bad = 0
    expected = [f"t{i} " for i in range(tokens)]
    for body in bodies:
        events = [e for e in body.decode().split("\n\n") if e]
        ids = [int(line[4:]) for e in events for line in e.split("\n") if line.startswith("id: ")]
        data = [line[6:] for e in events for line in e.split("\n") if line.startswith("data: ")]
        if ids != list(range(1, tokens + 1)) or data != expected:
            client_bad += 1
    info = json.loads(await http_get(port, "/db"))  # flushes the recorder
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
    want = "".join(expected)
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
        "client_saw_wrong_events": client_bad, "writer_stats": info["stats"],
    }


def main(quick: bool) -> dict[str, Any]:
    _raise_nofile()
    n_idle = 300 if quick else 10_000
    rounds = 1  # RSS is not a rate: one fresh server per contender
    hold = 1.0 if quick else 3.0
    out: dict[str, Any] = {"stack": STACK, "idle_rounds": rounds, "ping_seconds": 1.0}
    paths = {"ours": "/idle_ours", "sse_starlette": "/idle_sse_starlette", "raw_asgi": "/idle_raw"}
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in paths}
    for r in range(rounds):
        for name in rotate(list(paths), r):
            say(f"  {n_idle} idle streams: {name} (round {r + 1}/{rounds})")
            with server("build_server_app", STACK, env={"BENCH_PING": "1"}, timeout=600) as (port, pid):
                runs[name].append(asyncio.run(asyncio.wait_for(idle(port, pid, paths[name], n_idle, hold), 300)))
    out["idle"] = {
        name: {
            "rss_per_stream_kib": median([x["rss_per_stream_kib"] for x in rs]),
            "peak_rss_kib": median([x["peak_rss_kib"] for x in rs]),
            "runs": rs,
        }
        for name, rs in runs.items()
    }
    n_loss = 100 if quick else 1_000
    say(f"  loss check: {n_loss} concurrent streams x 500 tokens, recorded")
    db_dir = tempfile.mkdtemp(prefix="asr-bench-loss-")
    with server("build_server_app", STACK, env={"BENCH_DB": os.path.join(db_dir, "loss.db")}, timeout=600) as (
        port, _pid,
    ):
        out["loss"] = asyncio.run(asyncio.wait_for(loss(port, n_loss, 500), 300))
    return out
