"""9. A database outage: the client's token gaps while the recorder cannot write, and the record after.

``bench.looplag``'s app under uvicorn (httptools + uvloop), ``ours`` recording to SQLite with
the recorder's default options (printed, and kept in the results). A client in this process
reads one stream at a steady 50 tokens/s and notes when each event arrives. ``BEFORE`` seconds
after its first event, another process (this one, on its own connection: the server is a
separate process) runs ``BEGIN EXCLUSIVE`` on the database file and holds it ``LOCK`` seconds, so
the recorder's writer cannot commit; then ``ROLLBACK``. The stream goes on ``AFTER`` seconds more
(a source that was held up catches up, as a buffered upstream would).

Two scenarios: ``alone`` (just that stream: its queue never fills) and ``bulk`` (``BULK`` more
recorded streams sending flat out from a separate client process until just after the lock,
which fills the recorder's queue during the lock: the case where the queue policy decides
what the reading client sees).

Reported per phase (before / during / after the lock; a gap that touches the lock period
counts as during): the client's inter-token gaps p50/p99/max, and every gap over 100 ms with
its start relative to the lock. After the stream ends, the recorder is flushed and the record
is read back through the recorder: status, chunk_count, metadata ``dropped_chunks``, chunks
actually stored, and whether chunk_count + dropped_chunks equals the events the client got.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import threading
import time
import urllib.request
from typing import Any

from .looplag import (
    HOST,
    client_in_background,
    get_json,
    median,
    open_reader,
    package_info,
    percentile,
    raise_nofile,
    renice,
    say,
    serving,
    wait_first,
)

RATE = 50.0
BEFORE, LOCK, AFTER = 3.0, 8.0, 4.0
BULK = 10
STALL_MS = 100.0
SCENARIOS = {"alone": 0, "bulk": BULK}


def hold_lock(db: str, seconds: float, info: dict[str, Any], ready: threading.Event) -> None:
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        t_ask = time.monotonic()
        con.execute("BEGIN EXCLUSIVE")
        info["t_lock"] = time.monotonic()
        info["acquire_ms"] = (info["t_lock"] - t_ask) * 1000
        ready.set()
        time.sleep(seconds)
        con.execute("ROLLBACK")
        info["t_unlock"] = time.monotonic()
    finally:
        con.close()


def dechunk(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        j = raw.index(b"\r\n", i)
        size = int(raw[i:j].split(b";")[0], 16)
        if size == 0:
            break
        out += raw[j + 2 : j + 2 + size]
        i = j + 2 + size + 2
    return bytes(out)


def gap_stats(gaps: list[float]) -> dict[str, Any]:
    ms = [g * 1000 for g in gaps]
    return {"gaps": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "max_ms": max(ms) if ms else None, "over_100ms": sum(1 for g in ms if g > STALL_MS)}


async def read_through_outage(port: int, db: str, n: int) -> dict[str, Any]:
    times: list[float] = []
    reader = await open_reader(port, f"/ours?n={n}&rate={RATE}&jit=0&seed=1", times=times, keep=True)
    await wait_first([reader], 20)
    assert reader.first is not None
    lock: dict[str, Any] = {}
    ready = threading.Event()
    await asyncio.sleep(max(0.0, reader.first + BEFORE - time.monotonic()))
    locker = asyncio.ensure_future(asyncio.to_thread(hold_lock, db, LOCK, lock, ready))
    await asyncio.wait_for(asyncio.shield(reader.done), n / RATE + 120)
    await asyncio.wait_for(locker, LOCK + 60)
    body = dechunk(b"".join(reader.body))
    ids = [int(line[4:]) for line in body.decode().split("\n") if line.startswith("id: ")]
    return {"times": times, "lock": lock, "ids": ids, "status": reader.status, "ended": reader.ended,
            "stream_id": reader.headers.get("x-stream-id"), "first": reader.first, "end": reader.t_end}


def run_once(port: int, db: str, scenario: str) -> dict[str, Any]:
    n = round(RATE * (BEFORE + LOCK + AFTER))
    bulk = SCENARIOS[scenario]
    t_start = time.monotonic()
    ctx: Any = contextlib.nullcontext(None)
    if bulk:
        ctx = client_in_background({
            "port": port, "candidate": "ours", "streams": bulk, "duration": BEFORE + LOCK + AFTER, "seed": 7,
            "rate_hi": 0, "until": t_start + BEFORE + LOCK + 0.5, "timeout": BEFORE + LOCK + AFTER + 120,
        })
    with ctx as bulk_result:
        got = asyncio.run(read_through_outage(port, db, n))
        bulk_report = bulk_result() if bulk_result is not None else None
    flushed = get_json(port, "/flush?timeout=60", timeout=90)
    record = get_json(port, f"/record?id={got['stream_id']}")
    t_lock, t_unlock = got["lock"]["t_lock"], got["lock"]["t_unlock"]
    times = got["times"]
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    stalls = []
    for a, b in itertools.pairwise(times):
        phase = "before" if b < t_lock else "after" if a >= t_unlock else "during"
        phases[phase].append(b - a)
        if (b - a) * 1000 > STALL_MS:
            stalls.append({"from_lock_s": round(a - t_lock, 3), "gap_ms": round((b - a) * 1000, 1)})
    sent = len(times)
    meta = record.get("metadata") or {}
    dropped = int(meta.get("dropped_chunks", 0))
    count = record.get("chunk_count")
    return {
        "scenario": scenario, "bulk_streams": bulk, "sent": sent, "expected": n,
        "client_ids_ok": got["ids"] == list(range(1, n + 1)) and got["status"] == 200 and got["ended"],
        "stream_seconds": got["end"] - got["first"], "lock_acquire_ms": got["lock"]["acquire_ms"],
        "lock_seconds": t_unlock - t_lock, "lock_started_s": t_lock - got["first"],
        "gaps": {p: gap_stats(g) for p, g in phases.items()}, "stalls": stalls[:30], "stall_count": len(stalls),
        "record": {"status": record.get("status"), "chunk_count": count, "dropped_chunks": dropped,
                   "chunks_stored": record.get("chunks_stored"), "distinct_seqs": record.get("distinct_seqs")},
        "accounted": count is not None and count + dropped == sent,
        "flushed": flushed["flushed"], "flush_seconds": flushed["seconds"], "recorder_stats": flushed["stats"],
        "bulk": None if bulk_report is None else {k: bulk_report[k] for k in ("streams", "events", "streams_bad")},
    }


def main(quick: bool) -> dict[str, Any]:
    raise_nofile()
    reniced = renice()  # the reading client runs in this process
    rounds = 1 if quick else 3
    out: dict[str, Any] = {
        "rate": RATE, "before_s": BEFORE, "lock_s": LOCK, "after_s": AFTER, "bulk_streams": BULK, "rounds": rounds,
        "lock": "BEGIN EXCLUSIVE on another connection, from another process, then ROLLBACK",
        "stall_ms": STALL_MS, "package": package_info(), "renice": reniced, "scenarios": {},
    }
    with serving(env={"BENCH_MONITOR": "0"}, timeout=1200) as (port, _pid):
        state = get_json(port, "/state")
        db = state["db"]
        out["recorder"] = state["options"]
        say(f"  recorder options (defaults): {state['options']}")
        with urllib.request.urlopen(f"http://{HOST}:{port}/ours?n=1", timeout=30) as r:  # warm-up, one stream
            r.read()
        get_json(port, "/flush")
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
        names = list(SCENARIOS)
        for r in range(rounds):
            for scenario in names[r % 2 :] + names[: r % 2]:
                say(f"   {scenario} (round {r + 1}/{rounds}): {RATE:.0f} tokens/s, lock {LOCK:.0f} s after "
                    f"{BEFORE:.0f} s")
                res = run_once(port, db, scenario)
                runs[scenario].append(res)
                g = res["gaps"]
                say("    gaps ms (p50/p99/max): " + ", ".join(
                    f"{p} {g[p]['p50_ms'] or 0:.0f}/{g[p]['p99_ms'] or 0:.0f}/{g[p]['max_ms'] or 0:.0f}"
                    for p in ("before", "during", "after")) + f"; {res['stall_count']} gaps > {STALL_MS:.0f} ms; "
                    f"record {res['record']}, sent {res['sent']}, accounted {res['accounted']}")
        for scenario, rs in runs.items():
            summary: dict[str, Any] = {}
            for phase in ("before", "during", "after"):
                summary[phase] = {
                    k: median([x["gaps"][phase][k] for x in rs if x["gaps"][phase][k] is not None])
                    for k in ("p50_ms", "p99_ms", "max_ms", "over_100ms")
                }
            summary["max_gap_ms_worst"] = max(
                (x["gaps"][p]["max_ms"] or 0) for x in rs for p in ("before", "during", "after"))
            summary["during_max_ms_worst"] = max((x["gaps"]["during"]["max_ms"] or 0) for x in rs)
            summary["chunk_count"] = median([x["record"]["chunk_count"] or 0 for x in rs])
            summary["dropped_chunks"] = median([x["record"]["dropped_chunks"] for x in rs])
            summary["sent"] = median([x["sent"] for x in rs])
            summary["runs_not_accounted"] = sum(1 for x in rs if not x["accounted"])
            summary["runs_client_ids_wrong"] = sum(1 for x in rs if not x["client_ids_ok"])
            out["scenarios"][scenario] = {"summary": summary, "runs": rs}
        out["recorder_stats_at_end"] = get_json(port, "/state")["stats"]
    return out
