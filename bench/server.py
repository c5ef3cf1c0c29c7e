"""2. Throughput under uvicorn over loopback, and 4. time to first byte added by recording.

The server (``bench.apps.build_server_app``) runs under uvicorn in a subprocess, on one of
two stacks (h11 on asyncio, httptools on uvloop); the client runs in this process. The
client is a minimal HTTP/1.1 reader on asyncio sockets (``common.RawStream``): httpx spends
more CPU per event than the servers do, which the ``client_check`` entry shows by reading
the same stream both ways.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import apps
from .common import HOST, STACKS, RawStream, alternate_async, http_get, median, percentile, say, server, summary


async def stream_rate(port: int, name: str, streams: int, total: int) -> float:
    """Total events/s for ``streams`` concurrent streams sharing ``total`` events."""
    per = total // streams
    conns = [RawStream(port, f"/{name}?n={per}") for _ in range(streams)]

    async def one(s: RawStream) -> None:
        await s.open()
        await s.read_all()
        await s.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in conns))
    dt = time.perf_counter() - t0
    for s in conns:
        if s.status != 200 or s.events < per:
            raise AssertionError(f"{name}: status {s.status}, {s.events} events of {per}")
    return per * streams / dt


async def httpx_rate(port: int, name: str, total: int) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        t0 = time.perf_counter()
        n = 0
        last = b""
        async with client.stream("GET", f"http://{HOST}:{port}/{name}?n={total}") as r:
            async for data in r.aiter_raw():
                n += (last + data).count(b"\n\n")  # an event end may straddle two reads
                last = data[-1:]
        dt = time.perf_counter() - t0
    if n < total:
        raise AssertionError(f"httpx read {n} events of {total}")
    return total / dt


async def ttfb_once(port: int, path: str) -> tuple[float, float]:
    """(ms to the response head, ms to the end of the first event) on a fresh connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        t0 = time.perf_counter()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n\r\n".encode())
        buf = b""
        t_head = t_event = None
        while t_event is None:
            data = await reader.read(65536)
            if not data:
                raise AssertionError("connection closed before the first event")
            now = time.perf_counter()
            buf += data
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                if t_head is None:
                    t_head = now
                body = buf[head_end + 4 :]
                if b"\n\n" in body:
                    t_event = now
        while not buf.endswith(b"0\r\n\r\n"):  # drain the short body
            data = await reader.read(65536)
            if not data:
                break
            buf += data
        assert t_head is not None
        return (t_head - t0) * 1000, (t_event - t0) * 1000
    finally:
        writer.close()


async def ttfb(port: int, names: list[str], per: int) -> dict[str, Any]:
    """Interleave requests A, B, C, A, B, C... so that every contender sees the same noise."""
    heads: dict[str, list[float]] = {n: [] for n in names}
    events: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(10):  # warm-up
        for n in names:
            await ttfb_once(port, f"/{n}?n=1")
    for i in range(per):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            h, e = await ttfb_once(port, f"/{n}?n=1")
            heads[n].append(h)
            events[n].append(e)
    return {
        n: {
            "head_ms_median": median(heads[n]), "head_ms_p99": percentile(heads[n], 99),
            "first_event_ms_median": median(events[n]), "first_event_ms_p99": percentile(events[n], 99),
            "samples": len(events[n]),
        }
        for n in names
    }


def main(quick: bool) -> dict[str, Any]:
    total = 10_000 if quick else 50_000
    rounds = 2 if quick else 5
    concurrency = (1, 100) if quick else (1, 10, 100)
    stacks = ["uvicorn-httptools-uvloop"] if quick else list(STACKS)
    out: dict[str, Any] = {"events_per_config": total, "rounds": rounds, "client": "raw asyncio socket reader",
                           "labels": apps.LABELS}
    for stack in stacks:
        say(f"  server stack: {stack}")
        st: dict[str, Any] = {}
        with server("build_server_app", stack, timeout=900) as (port, _pid):

            def bounded(coro_fn: Callable[[], Awaitable[Any]], limit: float = 300) -> Any:
                return asyncio.run(asyncio.wait_for(coro_fn(), limit))

            app_with = bounded(lambda: http_get(port, "/db"))
            st["app"] = app_with.decode()
            for conc in concurrency:

                async def go(conc: int = conc) -> dict[str, list[float]]:
                    for name in apps.NAMES:  # warm-up
                        await stream_rate(port, name, conc, max(conc, total // 10))
                    cands: dict[str, Callable[[], Awaitable[float]]] = {
                        name: (lambda name=name: stream_rate(port, name, conc, total)) for name in apps.NAMES
                    }
                    return await alternate_async(cands, rounds, say)

                say(f"   {conc} concurrent stream(s)")
                s = summary(bounded(go, 900))
                sse = s["sse_starlette"]["median"]
                raw = s["raw"]["median"]
                for entry in s.values():
                    entry["per_stream"] = entry["median"] / conc
                    entry["ratio_to_raw"] = entry["median"] / raw
                    entry["ratio_to_sse_starlette"] = entry["median"] / sse
                st[f"streams_{conc}"] = s

            if stack == stacks[0]:
                say("   client check: httpx vs the raw reader, 1 stream of the raw endpoint")

                async def check() -> dict[str, list[float]]:
                    return await alternate_async(
                        {
                            "raw_reader": lambda: stream_rate(port, "raw", 1, total),
                            "httpx": lambda: httpx_rate(port, "raw", total),
                        },
                        1 if quick else rounds,
                        say,
                    )

                c = summary(bounded(check))
                c["note"] = "events/s of the raw ASGI endpoint read by each client: the lower one is the bottleneck"
                out["client_check"] = c

                say("   time to first byte: recording off vs SQLite (fresh connection per request)")
                per = 20 if quick else 200
                out["ttfb"] = bounded(lambda per=per: ttfb(port, ["raw", "ours_null", "ours_sqlite"], per))
                out["ttfb"]["stack"] = stack
                t = out["ttfb"]
                t["added_by_recording_ms_median"] = (
                    t["ours_sqlite"]["first_event_ms_median"] - t["ours_null"]["first_event_ms_median"]
                )
                t["added_by_recording_ms_p99"] = (
                    t["ours_sqlite"]["first_event_ms_p99"] - t["ours_null"]["first_event_ms_p99"]
                )
        out[stack] = st
    return out
