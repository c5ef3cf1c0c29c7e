"""1. SSE throughput in-process: the ASGI app called directly, ``send`` counting bytes.

No server and no socket: this is the per-event cost of each response class on its own.
For the recorded contender the clock stops only once the recorder has flushed every chunk
to SQLite (the writer runs on the same loop and a worker thread, inside the timed span).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.responses import StreamingResponse

from asgi_stream_recorder import recorded_stream

from . import apps
from .common import alternate_async, median, say, summary


def scope_for(path: str, query: str = "") -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query.encode(), "headers": [(b"host", b"127.0.0.1"), (b"accept", b"text/event-stream")],
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
    }


async def call(app: Any, scope: dict[str, Any]) -> tuple[int, int]:
    """Call an ASGI app; returns (body bytes, body messages). ``receive`` blocks until the response ends."""
    nbytes = 0
    nmsgs = 0
    never = asyncio.Event()
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal nbytes, nmsgs
        if message["type"] == "http.response.body":
            nbytes += len(message.get("body", b""))
            nmsgs += 1

    await app(scope, receive, send)
    return nbytes, nmsgs


async def run(quick: bool) -> dict[str, Any]:
    n = 10_000 if quick else 100_000
    rounds = 3 if quick else 7
    null, sqlite = apps.make_recorders()
    fast = apps.fastapi_app()
    results: dict[str, Any] = {"events_per_run": n, "rounds": rounds, "loop": "asyncio",
                               "labels": apps.LABELS}

    async with null, sqlite:

        @recorded_stream(recorder=null)
        async def ours_null() -> AsyncIterator[str]:
            for i in range(n):
                yield apps.TOKENS[i]

        @recorded_stream(recorder=sqlite)
        async def ours_sqlite() -> AsyncIterator[str]:
            for i in range(n):
                yield apps.TOKENS[i]

        scope = scope_for("/stream")
        stream_only: dict[Any, list[float]] = {}
        fscope = scope_for("/fastapi", f"n={n}")

        def timed(make: Callable[[], Awaitable[Any]], recorder: Any = None) -> Callable[[], Awaitable[float]]:
            async def go() -> float:
                t0 = time.perf_counter()
                app = await make()
                _nbytes, nmsgs = await call(app, scope if app is not fast else fscope)
                streamed = time.perf_counter() - t0
                if recorder is not None:
                    await recorder.flush()
                    stream_only.setdefault(recorder, []).append(n / streamed)
                dt = time.perf_counter() - t0
                if nmsgs < n:
                    raise AssertionError(f"only {nmsgs} body messages for {n} events")
                return n / dt

            return go

        async def mk_raw() -> Any:
            return apps.raw_app(n)

        async def mk_starlette() -> Any:
            return StreamingResponse(apps.bytes_source(n), media_type="text/event-stream")

        async def mk_sse_starlette() -> Any:
            return EventSourceResponse(apps.token_source(n))

        async def mk_fastapi() -> Any:
            return fast

        candidates = {
            "raw": timed(mk_raw),
            "starlette": timed(mk_starlette),
            "sse_starlette": timed(mk_sse_starlette),
            "fastapi": timed(mk_fastapi),
            "ours_null": timed(ours_null, null),
            "ours_sqlite": timed(ours_sqlite, sqlite),
        }
        for c in candidates.values():  # warm-up
            await c()
        stream_only.clear()
        samples = await alternate_async(candidates, rounds, say)
        results["stream_only_events_per_s"] = {
            "note": "until the response returned, before the final flush (what the client saw)",
            "ours_null": median(stream_only[null]), "ours_sqlite": median(stream_only[sqlite]),
        }
        results["sqlite_rows_written"] = sqlite.stats["written"]
    s = summary(samples)
    raw, sse = s["raw"]["median"], s["sse_starlette"]["median"]
    for entry in s.values():
        entry["ratio_to_raw"] = entry["median"] / raw
        entry["ratio_to_sse_starlette"] = entry["median"] / sse
    results["events_per_s"] = s
    results["recorded_vs_unrecorded"] = s["ours_sqlite"]["median"] / s["ours_null"]["median"]
    # The same pair, but as per-round ratios (each round ran both back to back): a steadier figure.
    pairs = [a / b for a, b in zip(samples["ours_sqlite"], samples["ours_null"], strict=True)]
    results["recorded_vs_unrecorded_per_round"] = pairs
    results["recorded_vs_unrecorded_median_of_round_ratios"] = sorted(pairs)[len(pairs) // 2]
    return results


def main(quick: bool) -> dict[str, Any]:
    return asyncio.run(asyncio.wait_for(run(quick), 600))
