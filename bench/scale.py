"""10. Scale-out: the shared backends (PostgreSQL, Redis) beside SQLite.

* ``library_<backend>``: chunks/s sustained through the library's path (a ``StreamSession``
  per stream, ``stamp()`` + ``record()`` per chunk, the buffered writer batching into the
  recorder ``open_recorder(url)`` gives), clock stopped once everything is flushed; 1 and
  100 concurrent streams.
* ``per_chunk_<backend>``: the usual chat-persistence loop on the same servers, one awaited
  round trip after another per chunk, no batching. PostgreSQL (asyncpg, a pool of 10, autocommit):
  read the message's ``max(sequence)``, ``INSERT`` the chunk, ``UPDATE`` the message's full
  content. Redis: an ``XADD`` of the chunk, an ``HSET`` of the full content. SQLite: an
  ``INSERT`` and a ``COMMIT`` per chunk (``bench.recorder.naive_rate``).
* ``follow``: two uvicorn processes serve ``tests.apps.resume_app`` on one backend; A runs
  ``/chat?stamp=1`` (each token carries ``time.monotonic()`` taken as it is yielded), and a
  follower on B (``/streams/{id}/events``, fed from the backend) and one on A (fed from
  memory: the floor) measure how late each token reaches them.

Every write run gets a fresh place (SQLite file, PostgreSQL schema, Redis key prefix), removed
afterwards. ``ASR_BENCH_PG`` and ``ASR_BENCH_REDIS`` point at other servers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import httpx

from asgi_stream_recorder import open_recorder
from asgi_stream_recorder.session import StreamSession
from asgi_stream_recorder.sse import SSEParser

from .common import alternate, free_port, percentile, rotate, run_async, say, summary
from .recorder import WORDS, Scratch, naive_rate

PG = os.environ.get("ASR_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("ASR_BENCH_REDIS", "redis://127.0.0.1:6379/0")
KINDS = ["sqlite", "postgres", "redis"]
PORTS = {"postgres": 5432, "redis": 6379}
ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.resume_app:app"
FLUSH_INTERVAL = 0.05  # resume_app's default, the recorder's default


class Place:
    """One run's own place on one backend: a SQLite file, a PostgreSQL schema or a Redis prefix."""

    def __init__(self, kind: str, scratch: Scratch) -> None:
        self.kind = kind
        self.name = f"asr_bench_{uuid.uuid4().hex[:12]}"
        self.path = scratch.path()

    @property
    def url(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.path}"
        if self.kind == "postgres":
            return f"{PG}{'&' if '?' in PG else '?'}schema={self.name}"
        return f"{REDIS}{'&' if '?' in REDIS else '?'}prefix={self.name}:"

    async def remove(self) -> None:
        """Drop the schema / delete the keys (the SQLite file goes with the scratch directory)."""
        if self.kind == "postgres":
            import asyncpg

            con = await asyncpg.connect(PG, timeout=10)
            try:
                await con.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
            finally:
                await con.close()
        elif self.kind == "redis":
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(REDIS)
            try:
                async for key in client.scan_iter(match=f"{self.name}:*", count=1000):
                    await client.delete(key)
            finally:
                await client.aclose()


def reachable(kind: str) -> bool:
    parts = urlsplit(PG if kind == "postgres" else REDIS)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or PORTS[kind]), timeout=2):
            return True
    except OSError:
        return False


async def concurrently(one: Callable[[int], Coroutine[Any, Any, None]], streams: int) -> float:
    """Seconds for ``one(0)`` .. ``one(streams - 1)`` run side by side."""
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for k in range(streams):
            tg.start_soon(one, k)
    return time.perf_counter() - t0


# -- 1. the library's path ----------------------------------------------------------------------
async def library_rate(place: Place, streams: int, total: int) -> float:
    """Chunks/s from the first ``record`` to the last chunk being stored."""
    per = total // streams
    recorder = open_recorder(place.url, max_wait=None)  # a full queue waits: the rate counts every chunk
    async with recorder:
        ids: list[str] = []

        async def one(k: int) -> None:
            session = StreamSession(recorder, metadata={"bench": True})
            ids.append(session.id)
            session.begin()
            record, stamp = session.record, session.stamp
            for i in range(per):
                stamp()
                await record(WORDS[i & 7], None)
                if not i & 63:  # tokens arrive interleaved across streams, as from a model
                    await anyio.lowlevel.checkpoint()
            session.end(exhausted=True)

        t0 = time.perf_counter()
        await concurrently(one, streams)
        await recorder.flush()
        dt = time.perf_counter() - t0
        stats = recorder.stats
        stored = len(await recorder.chunks(ids[-1]))
    if stats["dropped"] or stats["lost"] or stored != per:
        raise AssertionError(f"{place.kind}: {stored} of {per} chunks stored, writer stats {stats}")
    return per * streams / dt


# -- 2. the per-chunk pattern ---------------------------------------------------------------------
async def per_chunk_postgres(place: Place, streams: int, total: int) -> float:
    import asyncpg

    s, per = f'"{place.name}"', total // streams
    pool = await asyncpg.create_pool(PG, min_size=10, max_size=10)  # opened before the clock starts
    try:
        await pool.execute(f"CREATE SCHEMA {s}; "
                           f"CREATE TABLE {s}.messages (id text PRIMARY KEY, content text NOT NULL DEFAULT ''); "
                           f"CREATE TABLE {s}.message_chunks (message_id text NOT NULL, sequence integer NOT NULL, "
                           f"content text NOT NULL, PRIMARY KEY (message_id, sequence))")

        async def one(k: int) -> None:
            mid, content = f"m{k}", ""
            await pool.execute(f"INSERT INTO {s}.messages (id) VALUES ($1)", mid)
            for i in range(per):
                data = WORDS[i & 7]
                seq = await pool.fetchval(f"SELECT max(sequence) FROM {s}.message_chunks WHERE message_id = $1", mid)
                await pool.execute(f"INSERT INTO {s}.message_chunks VALUES ($1, $2, $3)", mid, (seq or 0) + 1, data)
                content += data
                await pool.execute(f"UPDATE {s}.messages SET content = $2 WHERE id = $1", mid, content)

        dt = await concurrently(one, streams)
    finally:
        await pool.close()
    return per * streams / dt


async def per_chunk_redis(place: Place, streams: int, total: int) -> float:
    import redis.asyncio

    client, per, p = redis.asyncio.Redis.from_url(REDIS), total // streams, f"{place.name}:"
    try:

        async def one(k: int) -> None:
            content = ""
            for i in range(per):
                data = WORDS[i & 7]
                await client.xadd(f"{p}c:{k}", {"d": data})
                content += data
                await client.hset(f"{p}m:{k}", "content", content)

        dt = await concurrently(one, streams)
    finally:
        await client.aclose()
    return per * streams / dt


PER_CHUNK: dict[str, Callable[[Place, int, int], Awaitable[float]]] = {
    "sqlite": lambda place, streams, total: naive_rate(place.path, streams, total),
    "postgres": per_chunk_postgres, "redis": per_chunk_redis}


def measure(fn: Callable[[Place, int, int], Awaitable[float]], kind: str, scratch: Scratch, streams: int,
            total: int) -> Callable[[], float]:
    """One run on a fresh place of ``kind``, removed afterwards, bounded in time."""

    async def run() -> float:
        place = Place(kind, scratch)
        try:
            return await fn(place, streams, total)
        finally:
            with anyio.CancelScope(shield=True):
                await place.remove()

    return lambda: float(run_async(run, 600))


# -- 3. follow latency across processes -----------------------------------------------------------
@contextlib.contextmanager
def app_process(url: str, log: Path) -> Iterator[str]:
    """``tests.apps.resume_app`` under uvicorn recording into ``url``; its base URL once /health answers."""
    port = free_port()
    env = {**os.environ, "ASR_TEST_URL": url, "ASR_TEST_FLUSH_INTERVAL": str(FLUSH_INTERVAL)}
    cmd = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(port), "--log-level",
           "warning", "--no-access-log", "--timeout-graceful-shutdown", "2"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{APP} on {url.split('?')[0]} exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{APP} did not answer /health in 30 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield base
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def follow_once(a: str, b: str, n: int) -> dict[str, list[float]]:
    """One stream of ``n`` tokens on A, read by its client, a follower on A and one on B: latencies in ms."""
    got: dict[str, list[float]] = {"producer_client_a": [], "follower_in_process_a": [], "follower_cross_process_b": []}
    sse = {"accept": "text/event-stream"}

    async def read(response: httpx.Response, out: list[float]) -> None:
        parser = SSEParser()
        async for raw in response.aiter_raw():
            now = time.monotonic()
            for event in parser.feed(raw):
                if event.event is None:
                    out.append((now - float((event.text or "").split("@")[1])) * 1000)

    async with httpx.AsyncClient(timeout=httpx.Timeout(15)) as client, \
            client.stream("GET", f"{a}/chat?n={n}&delay=0.01&wait=1&stamp=1", headers=sse) as producer:
        sid, t0 = producer.headers["x-stream-id"], time.monotonic()
        while (await client.get(f"{b}/streams/{sid}")).status_code != 200:  # B knows it once A stored its start
            if time.monotonic() - t0 > 0.8:  # the first token comes at 1 s: every token must be live
                raise RuntimeError(f"B did not know stream {sid} within 0.8 s")
            await anyio.sleep(0.01)
        async with client.stream("GET", f"{a}/streams/{sid}/events", headers=sse) as same, \
                client.stream("GET", f"{b}/streams/{sid}/events", headers=sse) as other:
            if same.status_code != 200 or other.status_code != 200:
                raise RuntimeError(f"follow answered {same.status_code} on A, {other.status_code} on B")
            async with anyio.create_task_group() as tg:
                for response, name in ((producer, "producer_client_a"), (same, "follower_in_process_a"),
                                       (other, "follower_cross_process_b")):
                    tg.start_soon(read, response, got[name])
    for name, values in got.items():
        if len(values) != n:
            raise AssertionError(f"{name} got {len(values)} of {n} tokens")
    return got


def stats_ms(v: list[float]) -> dict[str, Any]:
    return {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99), "max_ms": max(v), "samples": len(v)}


def follow(kinds: list[str], scratch: Scratch, rounds: int, n: int) -> dict[str, Any]:
    """Per backend, two app processes; rounds alternate the backends; latencies pooled over rounds."""
    places = {k: Place(k, scratch) for k in kinds}
    pooled: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    try:
        with contextlib.ExitStack() as stack:
            pairs = {k: (stack.enter_context(app_process(places[k].url, Path(scratch.dir) / f"{k}-A.log")),
                         stack.enter_context(app_process(places[k].url, Path(scratch.dir) / f"{k}-B.log")))
                     for k in kinds}
            for r in range(rounds):
                for k in rotate(kinds, r):
                    got = run_async(functools.partial(follow_once, *pairs[k], n), 60)
                    for name, values in got.items():
                        pooled[k].setdefault(name, []).extend(values)
                    b = got["follower_cross_process_b"]
                    say(f"    round {r + 1}/{rounds} {k}: B p50 {percentile(b, 50):.1f} ms, max {max(b):.1f} ms")
    finally:
        for place in places.values():
            run_async(place.remove, 60)
    out: dict[str, Any] = {k: {name: stats_ms(v) for name, v in pooled[k].items()} for k in kinds}
    out["follower_in_process_a_all"] = stats_ms([v for k in kinds for v in pooled[k]["follower_in_process_a"]])
    return {"tokens": n, "delay_s": 0.01, "rounds": rounds, "flush_interval_s": FLUSH_INTERVAL, **out}


# -- conditions --------------------------------------------------------------------------------------
async def servers(kinds: list[str]) -> dict[str, Any]:
    """Server versions and durability settings: they decide what a commit costs."""
    out: dict[str, Any] = {}
    if "postgres" in kinds:
        import asyncpg

        con = await asyncpg.connect(PG, timeout=10)
        try:
            out["postgres"] = {s: await con.fetchval(f"SHOW {s}") for s in
                               ("server_version", "fsync", "synchronous_commit", "shared_buffers")}
        finally:
            await con.close()
    if "redis" in kinds:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(REDIS, decode_responses=True)
        try:
            out["redis"] = {"version": (await client.info("server"))["redis_version"],
                            **(await client.config_get("append*"))}
        finally:
            await client.aclose()
    return out


def main(quick: bool) -> dict[str, Any]:
    rounds = 2 if quick else 3
    total = 20_000 if quick else 100_000
    per_chunk_total = 1_000 if quick else 5_000
    follow_rounds, follow_tokens = (1, 200) if quick else (5, 200)
    kinds = [k for k in KINDS if k == "sqlite" or reachable(k)]
    if unreachable := [k for k in KINDS if k not in kinds]:
        say(f"  scale: not reachable, left out: {', '.join(unreachable)}")
    out: dict[str, Any] = {"rounds": rounds, "chunks_per_run": total, "per_chunk_chunks_per_run": per_chunk_total,
                           "backends": kinds, "unreachable": unreachable}
    out["servers"] = run_async(lambda: servers(kinds), 30)
    scratch = Scratch()
    try:
        for streams in (1, 100):
            say(f"  scale: write rate, {streams} stream(s)")
            candidates: dict[str, Callable[[], float]] = {}
            for k in kinds:
                candidates[f"library_{k}"] = measure(library_rate, k, scratch, streams, total)
                candidates[f"per_chunk_{k}"] = measure(PER_CHUNK[k], k, scratch, streams, per_chunk_total)
            s: dict[str, Any] = summary(alternate(candidates, rounds, say))
            s["ratio_library_to_per_chunk"] = {k: s[f"library_{k}"]["median"] / s[f"per_chunk_{k}"]["median"]
                                               for k in kinds}
            out[f"streams_{streams}"] = s
        say(f"  scale: follow latency, {follow_tokens} tokens 10 ms apart, {follow_rounds} round(s)")
        out["follow"] = follow(kinds, scratch, follow_rounds, follow_tokens)
    finally:
        scratch.cleanup()
    return out

