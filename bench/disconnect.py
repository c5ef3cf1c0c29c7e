"""6. Disconnect latency under uvicorn: the client closes its socket, how long until the generator's ``finally``.

The generator yields a token every 20 ms (a model mid-answer) and notes ``time.monotonic()``
in its ``finally``; the client notes ``time.monotonic()`` just before closing the socket
(CLOCK_MONOTONIC is one clock for every process on the machine) and later asks the server
for the ``finally`` times. The close lands at a random phase of the token timer. Peer:
sse-starlette's ``EventSourceResponse`` over the same generator, requests interleaved.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

from .common import RawStream, http_get, median, percentile, say, server

CONTENDERS = {"ours": "/disc_ours", "sse_starlette": "/disc_sse_starlette"}


async def one(port: int, path: str, tag: str) -> float:
    s = RawStream(port, f"{path}?tag={tag}")
    await s.open()
    buf = b""
    while b"hello" not in buf:  # the first event has arrived: the stream is live
        data = await s.read_some()
        if not data:
            raise AssertionError("stream ended early")
        buf += data
    await asyncio.sleep(random.uniform(0, 0.02))
    t_close = time.monotonic()
    s.abort()
    return t_close


async def run(port: int, per: int) -> dict[str, Any]:
    closes: dict[str, dict[str, float]] = {n: {} for n in CONTENDERS}
    names = list(CONTENDERS)
    for i in range(per + 5):
        for name in names[i % 2 :] + names[: i % 2]:
            tag = f"{name}-{i}"
            t = await one(port, CONTENDERS[name], tag)
            if i >= 5:  # the first few warm up
                closes[name][tag] = t
        await asyncio.sleep(0.03)
    await asyncio.sleep(1.0)  # let the last ones finish
    out: dict[str, Any] = {}
    for name, tags in closes.items():
        got: dict[str, float | None] = {}
        keys = list(tags)
        for k in range(0, len(keys), 50):
            got.update(json.loads(await http_get(port, "/finally?tags=" + ",".join(keys[k : k + 50]))))
        lat = [(got[t] - tags[t]) * 1000 for t in keys if got.get(t) is not None]  # type: ignore[operator]
        missing = sum(1 for t in keys if got.get(t) is None)
        out[name] = {"median_ms": median(lat), "p99_ms": percentile(lat, 99), "max_ms": max(lat) if lat else None,
                     "samples": len(lat), "finally_never_ran": missing}
    return out


def main(quick: bool) -> dict[str, Any]:
    per = 25 if quick else 200
    stack = "uvicorn-httptools-uvloop"
    stacks = [stack] if quick else [stack, "uvicorn-h11-asyncio"]
    out: dict[str, Any] = {}
    for st in stacks:
        say(f"  disconnect latency on {st}, {per} closes per contender")
        with server("build_server_app", st, timeout=600) as (port, _pid):
            out.setdefault("stacks", {})[st] = asyncio.run(asyncio.wait_for(run(port, per), 300))
    return out
