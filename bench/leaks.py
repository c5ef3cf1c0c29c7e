"""8. Leaks: the server's RSS and open file descriptors before and after many streams have come and gone.

A fresh server per candidate (``bench.looplag``'s app under uvicorn, httptools + uvloop, the
lag sampler off): ``ours`` (``@recorded_stream`` recording to SQLite, through
``StreamRecorderMiddleware``) and, for comparison, ``plain`` (Starlette's ``StreamingResponse``).
After a warm-up (500 short streams, then 500 idle ones: first-use allocations and the
memory high-water mark of 500 open connections) the baseline is taken; then, per cycle:

* 2,000 sequential short streams (20 tokens, as fast as they go, a fresh connection each,
  every one checked for all its events and the chunked end), then a checkpoint;
* 500 concurrent idle streams (one event, no pings), held open ~2 s, then all closed by the
  client; once the server's descriptor count has come back down, a checkpoint.

A checkpoint flushes the recorder, reads VmRSS from /proc/PID/status, runs ``gc.collect()``
in the server (and counts live objects of the stream types and the running tasks), reads
VmRSS again and counts /proc/PID/fd. No growth is no leak: each checkpoint's deltas from the
baseline are reported, and growth past a small tolerance (``FD_TOLERANCE`` descriptors,
``RSS_TOLERANCE_KIB``, RSS still growing after cycle 2 by over ``STEADY_TOLERANCE_KIB``, any
stream object or task left alive) is flagged. Two cycles in the quick run, four in the full
one: a leak keeps growing from cycle to cycle, a cache levels off.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from .looplag import (
    HOST,
    TOKEN,
    fd_count,
    get_json,
    open_many,
    package_info,
    raise_nofile,
    request_bytes,
    rss_kib,
    say,
    serving,
    wait_first,
)

CANDIDATES = {"ours": ("/ours?n=20&rate=0", "/ours_idle"), "plain": ("/plain?n=20&rate=0", "/plain_idle")}
LABELS = {"ours": "@recorded_stream to SQLite, StreamRecorderMiddleware",
          "plain": "Starlette StreamingResponse (SSE text)"}
WARM_SEQUENTIAL = 500
FD_TOLERANCE = 2
# What is not a leak: SQLite's page cache (2,000 KiB per connection by default; the recorder
# holds a writer and a reader) fills as the file grows, and the allocators keep some of the
# memory of 500 open connections (the plain response levels off at about +4 MiB too). A leak
# of 600 bytes per stream passes the quick run's 6,000 streams past this; leaks of Python
# objects show much earlier in the live-object and gc-object counts. From the third cycle on,
# RSS that still grows by more than STEADY_TOLERANCE_KIB since the end of cycle 2 is flagged.
RSS_TOLERANCE_KIB = 6144
STEADY_TOLERANCE_KIB = 1024
STREAM_TYPES = ("StreamSession", "RecordedStreamResponse", "StreamingResponse", "Request", "_WireTap", "RequestState")


def sequential(port: int, path: str, n: int, expect: int) -> dict[str, Any]:
    """``n`` streams one after another, each on a fresh connection (``Connection: close``)."""
    req = request_bytes(port, path)
    bad = 0
    t0 = time.perf_counter()
    for _ in range(n):
        with socket.create_connection((HOST, port), timeout=10) as s:
            s.sendall(req)
            buf = bytearray()
            while True:
                data = s.recv(65536)
                if not data:
                    break
                buf += data
        if not buf.startswith(b"HTTP/1.1 200") or buf.count(TOKEN) != expect or not buf.endswith(b"0\r\n\r\n"):
            bad += 1
    return {"streams": n, "bad": bad, "seconds": time.perf_counter() - t0}


def settled_fds(pid: int, floor: int | None = None, limit: float = 10.0) -> int:
    """The descriptor count once it has stopped moving (and is down to ``floor``, if given)."""
    deadline = time.monotonic() + limit
    last = fd_count(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = fd_count(pid)
        if now == last and (floor is None or now <= floor):
            return now
        last = now
    return last


async def idle(port: int, pid: int, path: str, n: int, hold: float, floor: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    readers = await open_many(port, [path] * n)
    await wait_first(readers, 20)
    fds_open, rss_open = fd_count(pid), rss_kib(pid)
    await asyncio.sleep(hold)
    for r in readers:
        r.close()
    await asyncio.wait_for(asyncio.gather(*(r.done for r in readers)), 30)
    t_closed = time.perf_counter()
    fds_after = await asyncio.to_thread(settled_fds, pid, floor)
    return {"streams": n, "ok": sum(1 for r in readers if r.status == 200 and r.events == 1),
            "fds_while_open": fds_open, "rss_kib_while_open": rss_open, "fds_after_close": fds_after,
            "seconds_to_release_fds": time.perf_counter() - t_closed, "seconds": time.perf_counter() - t0}


def checkpoint(port: int, pid: int, floor: int | None = None) -> dict[str, Any]:
    flushed = get_json(port, "/flush?timeout=30")
    time.sleep(0.2)
    rss_before_gc = rss_kib(pid)
    collected = get_json(port, "/gc")
    fds = settled_fds(pid, floor, limit=5.0)
    return {"rss_kib": rss_kib(pid), "rss_kib_before_gc": rss_before_gc, "fds": fds, "tasks": collected["tasks"],
            "live": collected["live"], "gc_objects": collected["gc_objects"], "flushed": flushed["flushed"],
            "recorder": flushed["stats"]}


def delta(cp: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    return {
        "rss_kib": cp["rss_kib"] - base["rss_kib"], "rss_kib_before_gc": cp["rss_kib_before_gc"] - base["rss_kib"],
        "fds": cp["fds"] - base["fds"], "tasks": cp["tasks"] - base["tasks"],
        "gc_objects": cp["gc_objects"] - base["gc_objects"],
        "live": {k: cp["live"].get(k, 0) - base["live"].get(k, 0) for k in STREAM_TYPES},
    }


def run_candidate(name: str, cycles: int, n_seq: int, n_idle: int, hold: float) -> dict[str, Any]:
    short, idle_path = CANDIDATES[name]
    with serving(env={"BENCH_MONITOR": "0"}, timeout=900) as (port, pid):
        options = get_json(port, "/state")["options"]
        fds_start = fd_count(pid)
        warm = sequential(port, short, WARM_SEQUENTIAL, 20)  # warm-up: first-use allocations, the high-water mark
        asyncio.run(asyncio.wait_for(idle(port, pid, idle_path, n_idle, 0.5, fds_start + FD_TOLERANCE), 120))
        base = checkpoint(port, pid)
        say(f"  {name}: baseline RSS {base['rss_kib'] / 1024:.1f} MiB, {base['fds']} fds, {base['tasks']} tasks")
        steps: list[dict[str, Any]] = []
        for c in range(cycles):
            seq = sequential(port, short, n_seq, 20)
            cp = checkpoint(port, pid, base["fds"] + FD_TOLERANCE)
            steps.append({"cycle": c + 1, "after": f"{n_seq} sequential streams", "run": seq, **cp,
                          "delta": delta(cp, base)})
            idl = asyncio.run(asyncio.wait_for(idle(port, pid, idle_path, n_idle, hold, base["fds"] + FD_TOLERANCE),
                                               120))
            cp = checkpoint(port, pid, base["fds"] + FD_TOLERANCE)
            steps.append({"cycle": c + 1, "after": f"{n_idle} idle streams closed", "run": idl, **cp,
                          "delta": delta(cp, base)})
            for s in steps[-2:]:
                d = s["delta"]
                say(f"   cycle {c + 1}, after {s['after']}: RSS {d['rss_kib']:+,} KiB (before gc "
                    f"{d['rss_kib_before_gc']:+,}), fds {d['fds']:+}, tasks {d['tasks']:+}, live stream objects "
                    f"{sum(d['live'].values()):+}, gc-tracked objects {d['gc_objects']:+,} "
                    f"({s['run']['seconds']:.1f} s)")
    bad_runs = warm["bad"] + sum(s["run"].get("bad", 0) for s in steps) + sum(
        s["run"]["streams"] - s["run"]["ok"] for s in steps if "ok" in s["run"])
    last = steps[-1]["delta"]
    first_cycle_end = steps[1]["delta"]
    flags = []
    worst_fd = max(s["delta"]["fds"] for s in steps)
    if worst_fd > FD_TOLERANCE:
        flags.append(f"file descriptors grew by {worst_fd}")
    if last["rss_kib"] > RSS_TOLERANCE_KIB:
        flags.append(f"RSS grew by {last['rss_kib']:,} KiB")
    steady = last["rss_kib"] - steps[3]["delta"]["rss_kib"] if cycles >= 3 else None
    if steady is not None and steady > STEADY_TOLERANCE_KIB:
        flags.append(f"RSS still grew by {steady:,} KiB after cycle 2")
    if last["tasks"] > 0:
        flags.append(f"{last['tasks']} more tasks alive")
    alive = {k: v for k, v in last["live"].items() if v > 0}
    if alive:
        flags.append(f"stream objects alive: {alive}")
    if bad_runs:
        flags.append(f"{bad_runs} streams did not complete as expected")
    return {
        "label": LABELS[name], "recorder": options if name == "ours" else None, "baseline": base,
        "steps": steps, "final_delta": last,
        "rss_growth_kib": last["rss_kib"], "fd_growth": last["fds"], "fd_growth_worst": worst_fd,
        "rss_growth_after_first_cycle_kib": last["rss_kib"] - first_cycle_end["rss_kib"] if cycles > 1 else None,
        "rss_growth_after_second_cycle_kib": steady,
        "rss_growth_bytes_per_stream": last["rss_kib"] * 1024 / (cycles * (n_seq + n_idle)),
        "streams_total": WARM_SEQUENTIAL + n_idle + cycles * (n_seq + n_idle), "bad_streams": bad_runs,
        "flags": flags, "leak_suspected": bool(flags),
    }


def main(quick: bool) -> dict[str, Any]:
    raise_nofile()
    cycles = int(os.environ.get("BENCH_LEAK_CYCLES", "0")) or (2 if quick else 4)
    n_seq, n_idle, hold = 2000, 500, 2.0
    out: dict[str, Any] = {
        "cycles": cycles, "sequential_streams": n_seq, "tokens_per_short_stream": 20, "idle_streams": n_idle,
        "idle_hold_seconds": hold, "fd_tolerance": FD_TOLERANCE, "rss_tolerance_kib": RSS_TOLERANCE_KIB,
        "steady_rss_tolerance_kib": STEADY_TOLERANCE_KIB,
        "package": package_info(), "candidates": {},
    }
    for name in CANDIDATES:
        say(f"  {name}: {cycles} cycle(s) of {n_seq} sequential + {n_idle} idle streams")
        out["candidates"][name] = run_candidate(name, cycles, n_seq, n_idle, hold)
    return out
