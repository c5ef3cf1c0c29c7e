"""Redis, for apps that already run one: streams shared by every worker and host, on asyncio.

Uses redis-py's asyncio client (``pip install 'asgi-stream-recorder[redis]'``), imported
lazily so that this module imports without it. redis-py runs on asyncio only: under trio,
use :class:`~asgi_stream_recorder.SQLiteRecorder`. A single Redis (or a primary with
replicas / Sentinel); not Redis Cluster (a batch touches many streams at once).

Key layout (every key starts with ``prefix``, which isolates apps sharing a database)::

    {p}schema              string  the layout's version (1)
    {p}s:<id>              hash    the record: status, created_at, completed_at, error, metadata
                                   (JSON), path, method, text_event, owner, key, format, and once
                                   ended chunk_count and content (a field absent means None)
    {p}c:<id>              stream  the chunks, one entry per chunk with id ``<seq>-0``; fields
                                   d (data), t (at_ms), e (event, absent for the default)
    {p}idx:all             zset    every stream id, scored by created_at (listing, newest first)
    {p}idx:<status>        zset    the same, per status (streaming, completed, failed, ...)
    {p}idx:key:<key>       zset    the same, per user key
    {p}idx:expiry          zset    ``[id, status, key]`` of finished streams, scored by when
                                   their keys expire (with ``ttl``): swept from the indexes
    {p}cancels             hash    stream id -> when someone asked to cancel it
    {p}owners              hash    process owner -> its last heartbeat (epoch seconds)
    {p}changes             stream  notifications (capped at about 1000): the ids a batch touched

A batch is ONE Lua script call: one round trip, atomic. A script rather than MULTI/EXEC since
what it writes depends on what is stored: a start whose stream exists is skipped, a chunk whose
seq is not above the stream's last entry is already stored (a retry, or a lost reply), an end
without content joins the stored chunks, and recovery ends a stream only if it is still streaming
with a stale lease (sweepers at once end it once). It checks before writing (a stream never
started is an error of the batch's content): Redis does not roll a script back. It also appends
to ``{p}changes``, on which :meth:`RedisBackend.wait_for_change` blocks (``XREAD BLOCK``, on a
connection of its own), so that followers and owners asked to cancel wake at once. A missed
notification costs latency, never a chunk: readers re-read by seq.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Collection
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import anyio
import sniffio

from .base import Backend, Batch, Chunk, StreamRecord, StreamStatus, recovered_end, to_datetime
from .buffered import RecorderError
from .recorder import Recorder

__all__ = ["SCHEMA_VERSION", "RedisBackend", "RedisRecorder"]

SCHEMA_VERSION = 1
#: a ``redis.asyncio.Redis`` (Any: redis-py's annotations cannot know that replies are decoded to str)
Redis = Any
_NOTIFY = "redis.call('XADD', p .. 'changes', 'MAXLEN', '~', 1000, '*', 'ids', ids)"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
#: error replies that say "not now": a loading or read-only server, a busy script, no memory left
_TRANSIENT_CODES = ("LOADING", "READONLY", "TRYAGAIN", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "OOM")

# ARGV: prefix, batch JSON [starts, segments, ends], ttl ms or "", stale_before or "" (recovery:
# ends only, applied to streams still streaming whose lease ran out), ids to announce.
# Returns how many streams it ended.
_WRITE = """
local p, b, ttl, null = ARGV[1], cjson.decode(ARGV[2]), tonumber(ARGV[3]), cjson.null
local stale_before, ids, known = tonumber(ARGV[4]), ARGV[5], {}
for _, s in ipairs(b[1]) do known[s[1]] = true end
if not stale_before then
  for _, list in ipairs({b[2], b[3]}) do
    for _, r in ipairs(list) do
      if not known[r[1]] and redis.call('EXISTS', p .. 's:' .. r[1]) == 0 then
        return redis.error_reply('stream ' .. r[1] .. ' has records but was never started')
      end
      known[r[1]] = true
    end
  end
end
local names = {'path', 'method', 'text_event', 'owner', 'key', 'format'}
for _, s in ipairs(b[1]) do
  local h = p .. 's:' .. s[1]
  if redis.call('EXISTS', h) == 0 then
    local f = {'status', 'streaming', 'created_at', s[2], 'metadata', s[3]}
    for i, name in ipairs(names) do
      if s[3 + i] ~= null then f[#f + 1] = name; f[#f + 1] = s[3 + i] end
    end
    redis.call('HSET', h, unpack(f))
    redis.call('ZADD', p .. 'idx:all', s[2], s[1])
    redis.call('ZADD', p .. 'idx:streaming', s[2], s[1])
    if s[8] ~= null then redis.call('ZADD', p .. 'idx:key:' .. s[8], s[2], s[1]) end
  end
end
for _, g in ipairs(b[2]) do
  local c = p .. 'c:' .. g[1]
  local top = redis.call('XREVRANGE', c, '+', '-', 'COUNT', 1)[1]
  local last = top and tonumber(string.match(top[1], '^%d+')) or 0
  local seqs, data, events, at = g[2], g[3], g[4], g[5]
  for i = 1, #seqs do
    if seqs[i] > last then
      last = seqs[i]
      local id = string.format('%d-0', last)
      local ev = events ~= null and events[i] or null
      if ev == null then redis.call('XADD', c, id, 'd', data[i], 't', at[i])
      else redis.call('XADD', c, id, 'd', data[i], 't', at[i], 'e', ev) end
    end
  end
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local ended = 0
for _, e in ipairs(b[3]) do
  local h, c = p .. 's:' .. e[1], p .. 'c:' .. e[1]
  local cur = redis.call('HMGET', h, 'status', 'created_at', 'text_event', 'key', 'owner')
  local go = cur[1] ~= false
  if go and stale_before then
    local seen = tonumber(redis.call('HGET', p .. 'owners', cur[5] or '')) or 0
    go = cur[1] == 'streaming' and math.max(seen, tonumber(cur[2])) < stale_before
  end
  if go then
    local content, count = e[6], e[7]
    if content == null or count == null then
      local parts, n = {}, 0
      for _, x in ipairs(redis.call('XRANGE', c, '-', '+')) do
        n = n + 1
        if (x[2][6] or false) == cur[3] then parts[#parts + 1] = x[2][2] end
      end
      content, count = table.concat(parts), n
    end
    redis.call('HSET', h, 'status', e[2], 'completed_at', e[3], 'metadata', e[5], 'content', content,
               'chunk_count', count)
    if e[4] ~= null then redis.call('HSET', h, 'error', e[4]) else redis.call('HDEL', h, 'error') end
    redis.call('ZREM', p .. 'idx:' .. cur[1], e[1])
    redis.call('ZADD', p .. 'idx:' .. e[2], cur[2], e[1])
    redis.call('HDEL', p .. 'cancels', e[1])
    if ttl then
      redis.call('PEXPIRE', h, ttl)
      redis.call('PEXPIRE', c, ttl)
      redis.call('ZADD', p .. 'idx:expiry', now_ms + ttl, cjson.encode({e[1], e[2], cur[4] or null}))
    end
    ended = ended + 1
  end
end
if ttl then
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', p .. 'idx:expiry', '-inf', now_ms, 'LIMIT', 0, 100)) do
    local x = cjson.decode(m)
    local left = redis.call('PTTL', p .. 's:' .. x[1])  -- -2: gone; -1: started again since (no ttl)
    if left == -2 then
      for _, index in ipairs({'all', x[2], x[3] ~= null and 'key:' .. x[3] or nil}) do
        redis.call('ZREM', p .. 'idx:' .. index, x[1])
      end
    end
    if left < 0 then redis.call('ZREM', p .. 'idx:expiry', m) end
  end
end
if stale_before then
  local o = redis.call('HGETALL', p .. 'owners')  -- forget owners whose lease ran out
  for i = 1, #o, 2 do if tonumber(o[i + 1]) < stale_before then redis.call('HDEL', p .. 'owners', o[i]) end end
end
if ended > 0 or not stale_before then """ + _NOTIFY + """ end
return ended
"""

# ARGV: prefix, stream id, requested_at. 1 if the stream is streaming (and the request stored).
_CANCEL = """
local p, ids = ARGV[1], ARGV[2]
if redis.call('HGET', p .. 's:' .. ids, 'status') ~= 'streaming' then return 0 end
redis.call('HSET', p .. 'cancels', ids, ARGV[3])
""" + _NOTIFY + """
return 1
"""

# ARGV: prefix, a finished status, ids from that status's index. Deletes (UNLINK: freed in the
# background, so a long stream does not stall the server) each stream still of that status: its
# hash, its chunks, its index entries and cancel request; every id leaves that index (one that is
# no longer of that status, or expired, was stale there). Returns how many streams it deleted.
_PURGE = """
local p, status, n = ARGV[1], ARGV[2], 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local cur = redis.call('HMGET', p .. 's:' .. id, 'status', 'key')
  if cur[1] == status then
    redis.call('UNLINK', p .. 's:' .. id, p .. 'c:' .. id)
    redis.call('ZREM', p .. 'idx:all', id)
    if cur[2] then redis.call('ZREM', p .. 'idx:key:' .. cur[2], id) end
    redis.call('HDEL', p .. 'cancels', id)
    n = n + 1
  elseif not cur[1] then
    redis.call('ZREM', p .. 'idx:all', id)
  end
  redis.call('ZREM', p .. 'idx:' .. status, id)
end
return n
"""


class RedisBackend(Backend):
    """The Redis at ``url``, keys under ``prefix``; with ``ttl``, finished streams are deleted
    that many seconds after they end (streaming ones are kept). ``socket_timeout`` bounds every
    call and connection attempt, in seconds."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "asr:", ttl: float | None = None,
                 socket_timeout: float = 5.0) -> None:
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds or None, not {ttl!r}")
        self._url = url
        self.prefix = prefix
        self.ttl = ttl
        self.socket_timeout = socket_timeout
        self._client: Redis | None = None
        self._listener: Redis | None = None  # for XREAD BLOCK: a pool of its own
        self._loop: object = None
        self._connected = False
        self._last_change: str | None = None  # the last notification seen
        self._write_script: Any = None
        self._cancel_script: Any = None

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, prefix={self.prefix!r})"

    @property
    def url(self) -> str:
        """The URL with its password masked."""
        return _mask(self._url)

    # -- connections ---------------------------------------------------------------------
    def _open_clients(self) -> None:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        def client(name: str) -> Redis:
            return redis.asyncio.Redis.from_url(
                self._url, decode_responses=True, socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout, client_name=re.sub(r"[^!-~]", "_", name),
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2))

        # Two pools: blocking reads wait on the listener's, never holding a connection a write needs.
        self._client = client(f"asr:{self.prefix}")
        self._listener = client(f"asr:{self.prefix}listen")
        self._loop = asyncio.get_running_loop()

    def _redis(self) -> Redis:
        """The pooled client, made anew when the recorder was reopened on another event loop."""
        if not self._connected:
            raise RuntimeError("RedisRecorder is closed: open it (async with recorder) before use")
        if self._loop is not asyncio.get_running_loop():  # the old loop's connections cannot be used here
            self._open_clients()
        assert self._client is not None
        return self._client

    async def connect(self) -> None:
        if sniffio.current_async_library() != "asyncio":
            raise RecorderError("RedisRecorder runs on asyncio only (redis-py's asyncio client does not run "
                                "under trio): use SQLiteRecorder as the trio backend")
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:
            raise RecorderError("RedisRecorder needs redis: pip install 'asgi-stream-recorder[redis]'") from None
        await self._close_clients()
        try:
            self._open_clients()
            client = self._client
            assert client is not None
            with anyio.fail_after(self.socket_timeout * 2):
                await client.set(f"{self.prefix}schema", SCHEMA_VERSION, nx=True)
                version = int(await client.get(f"{self.prefix}schema") or 0)
                top = await client.xrevrange(f"{self.prefix}changes", count=1)
        except Exception as exc:  # (not chained: the cause could show the password)
            await self._close_clients()
            parts = urlsplit(self._url)
            where = parts.path if parts.scheme == "unix" else f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
            raise RecorderError(f"cannot connect to Redis at {where}: "
                                f"{_scrub(str(exc) or type(exc).__name__, self._url)}") from None
        if version > SCHEMA_VERSION:
            await self._close_clients()
            raise RecorderError(f"Redis keys under {self.prefix!r} have schema version {version}, newer than this "
                                f"library's {SCHEMA_VERSION}: upgrade the library")
        self._last_change = top[0][0] if top else "0-0"
        self._write_script = client.register_script(_WRITE)
        self._cancel_script = client.register_script(_CANCEL)
        self._connected = True

    async def close(self) -> None:
        self._connected = False
        await self._close_clients()

    async def _close_clients(self) -> None:
        clients, self._client, self._listener = (self._client, self._listener), None, None
        # (those of a loop that is gone cannot be closed from here: they are just dropped)
        if clients != (None, None) and self._loop is asyncio.get_running_loop():
            for client in clients:
                if client is not None:
                    await client.aclose()

    def is_transient(self, exc: BaseException) -> bool:
        errors = sys.modules.get("redis.exceptions")  # (not imported: no redis error without redis)
        if errors is not None and isinstance(exc, errors.RedisError):
            if isinstance(exc, (errors.ConnectionError, errors.TimeoutError, errors.ReadOnlyError,  # ConnectionError:
                                errors.OutOfMemoryError, errors.TryAgainError)):  # lost, refused, loading
                return True
            code = getattr(exc, "status_code", None) or str(exc)
            return isinstance(exc, errors.ResponseError) and code.startswith(_TRANSIENT_CODES)
        return super().is_transient(exc)

    # -- writing -----------------------------------------------------------------------
    async def write(self, batch: Batch) -> None:
        await self._run_write(batch, "")

    async def _run_write(self, batch: Batch, stale_before: str) -> int:
        client = self._redis()
        payload = _dumps([
            [[s.id, repr(s.created_at), _dumps(s.metadata), s.path, s.method, s.text_event, s.owner, s.key, s.format]
             for s in batch.starts],
            [[g.stream_id, g.seqs, g.data, g.events, list(map(repr, g.at_ms))] for g in batch.segments],
            [[e.id, str(e.status), repr(e.completed_at), e.error, _dumps(e.metadata), e.content, e.chunk_count]
             for e in batch.ends],
        ])
        ttl = "" if self.ttl is None else str(max(1, round(self.ttl * 1000)))
        ids = " ".join(batch.stream_ids()[:16])  # (a hint for a reader of the stream; nobody relies on it)
        return int(await self._write_script(args=[self.prefix, payload, ttl, stale_before, ids], client=client))

    async def heartbeat(self, owner: str, at: float) -> None:
        await self._redis().hset(f"{self.prefix}owners", owner, repr(at))

    async def recover(self, stale_before: float) -> int:
        client, p = self._redis(), self.prefix
        async with client.pipeline(transaction=False) as pipe:  # (only a stream created before can be stale)
            pipe.zrangebyscore(f"{p}idx:streaming", "-inf", f"({stale_before!r}")
            pipe.hgetall(f"{p}owners")
            ids, owners = await pipe.execute()
        async with client.pipeline(transaction=False) as pipe:
            for sid in ids:
                pipe.hmget(f"{p}s:{sid}", "owner", "created_at", "text_event", "metadata", "status")
            rows = await pipe.execute()
        forget = any(float(seen) < stale_before for seen in owners.values())
        ends = []
        for sid, (owner, created, text_event, metadata, status) in zip(ids, rows, strict=True):
            if status == "streaming" and max(float(owners.get(owner, 0)), float(created)) < stale_before:
                chunks = await self.chunks(sid)
                ends.append(recovered_end(sid, float(created), text_event, json.loads(metadata), chunks))
        if not ends and not forget:
            return 0
        return await self._run_write(Batch(ends=ends), repr(stale_before))

    # -- reading -----------------------------------------------------------------------
    async def get(self, stream_id: str) -> StreamRecord | None:
        fields = await self._redis().hgetall(f"{self.prefix}s:{stream_id}")
        return (await self._records([stream_id], [fields]))[0]

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        client, key = self._redis(), f"{self.prefix}c:{stream_id}"
        result: list[Chunk] = []
        start = f"{after + 1}-0"
        while entries := await client.xrange(key, start, "+", count=10_000):  # in pages: never one huge reply
            result.extend(Chunk(stream_id, int(eid.partition("-")[0]), f["d"], f.get("e"), float(f["t"]))
                          for eid, f in entries)
            start = f"({entries[-1][0]}"
        return result

    async def list_streams(
        self, status: StreamStatus | str | None = None, limit: int = 100, key: str | None = None
    ) -> list[StreamRecord]:
        wanted = None if status is None else str(StreamStatus(status))
        p, client = self.prefix, self._redis()
        index = f"{p}idx:key:{key}" if key is not None else f"{p}idx:{wanted or 'all'}"
        limit = sys.maxsize if limit < 0 else limit
        out: list[StreamRecord] = []
        offset = 0
        while len(out) < limit:
            ids = await client.zrevrange(index, offset, offset + min(max(limit - len(out), 50), 1000) - 1)
            if not ids:
                break
            async with client.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.hgetall(f"{p}s:{sid}")
                rows = await pipe.execute()
            gone = [sid for sid, fields in zip(ids, rows, strict=True) if not fields]
            if gone:  # expired (ttl): drop them from the indexes as they are met
                async with client.pipeline(transaction=False) as pipe:
                    for name in {index, f"{p}idx:all", *(f"{p}idx:{s}" for s in StreamStatus)}:
                        pipe.zrem(name, *gone)
                    await pipe.execute()
            offset += len(ids) - len(gone)
            records = await self._records(ids, rows)
            out.extend(r for r in records if r is not None and (wanted is None or r.status == wanted))
        return out[:limit]

    async def _records(self, ids: list[str], rows: list[dict[str, str]]) -> list[StreamRecord | None]:
        """Records from their hashes; a streaming one's content and count from its chunks."""
        result: list[StreamRecord | None] = []
        for sid, f in zip(ids, rows, strict=True):
            if not f:
                result.append(None)
                continue
            if "chunk_count" in f:
                content, count = f["content"], int(f["chunk_count"])
            else:
                chunks = await self.chunks(sid)
                text_event = f.get("text_event")
                content, count = "".join(c.data for c in chunks if c.event == text_event), len(chunks)
            created = to_datetime(float(f["created_at"]))
            completed = to_datetime(float(f["completed_at"])) if "completed_at" in f else None
            assert created is not None
            result.append(StreamRecord(
                sid, StreamStatus(f["status"]), created, completed,
                content, count, f.get("error"), json.loads(f["metadata"]),
                **{name: f.get(name) for name in ("path", "method", "key", "format", "text_event")}))
        return result

    # -- between processes: cancel requests and change notification -------------------
    async def request_cancel(self, stream_id: str) -> bool:
        client = self._redis()
        return bool(await self._cancel_script(args=[self.prefix, stream_id, repr(time.time())], client=client))

    async def cancel_requests(self, stream_ids: Collection[str]) -> list[str]:
        ids = list(stream_ids)
        if not ids:
            return []
        client, key = self._redis(), f"{self.prefix}cancels"
        asked = [sid for sid, at in zip(ids, await client.hmget(key, ids), strict=True) if at is not None]
        if not asked:  # the usual answer: one read
            return []
        async with client.pipeline(transaction=False) as pipe:
            for sid in asked:
                pipe.hdel(key, sid)
            consumed = await pipe.execute()
        return [sid for sid, n in zip(asked, consumed, strict=True) if n]  # (another watcher may have taken one)

    async def wait_for_change(self, timeout: float) -> None:
        """``XREAD BLOCK`` on ``{prefix}changes`` from the last notification seen, through a pool of
        its own (a blocking read holds no connection a write needs); a killed connection is
        reconnected and the read retried. While Redis cannot be reached it just sleeps out
        ``timeout``. (Redis times a block out on its own clock: up to ~0.1 s late at ``hz 10``.)"""
        deadline = anyio.current_time() + timeout
        self._redis()
        listener = self._listener
        assert listener is not None
        # Each read blocks at most half the socket timeout, so that redis-py's read does not time out.
        most = max(self.socket_timeout / 2, 0.01)
        while (left := deadline - anyio.current_time()) > 0:
            try:
                reply = await listener.xread({f"{self.prefix}changes": self._last_change or "0-0"}, count=1000,
                                             block=max(1, int(min(left, most) * 1000)))
            except Exception as exc:
                if not self.is_transient(exc):
                    raise
                await anyio.sleep(max(deadline - anyio.current_time(), 0))
                return
            if reply:
                self._last_change = reply[0][1][-1][0]
                return

    # -- retention -----------------------------------------------------------------------
    async def purge(self, created_before: float, statuses: Collection[StreamStatus] | None = None, *,
                    batch_size: int = 500, dry_run: bool = False) -> int:
        """Delete finished streams created before ``created_before``: per status, the oldest
        ``batch_size`` ids of its index (scored by creation time), then one script call that
        deletes them atomically; a write waits for one such call at most. ``dry_run`` counts the
        index entries (with ``ttl``, ones expired since the last sweep count too)."""
        wanted = [str(s) for s in (StreamStatus if statuses is None else statuses) if s is not StreamStatus.STREAMING]
        client, p, cut = self._redis(), self.prefix, f"({created_before!r}"
        if dry_run:
            async with client.pipeline(transaction=False) as pipe:
                for status in wanted:
                    pipe.zcount(f"{p}idx:{status}", "-inf", cut)
                return sum(await pipe.execute())
        script, total = client.register_script(_PURGE), 0
        for status in wanted:
            while ids := await client.zrangebyscore(f"{p}idx:{status}", "-inf", cut, start=0, num=batch_size):
                total += int(await script(args=[p, status, *ids], client=client))
        return total


class RedisRecorder(Recorder):
    """Record streams into the Redis at ``url`` (keys under ``prefix``; with ``ttl``, finished
    streams expire after that many seconds): a :class:`Recorder` over a :class:`RedisBackend`.
    Takes the recorder's tuning options. Runs on asyncio only."""

    backend: RedisBackend

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "asr:", ttl: float | None = None,
                 socket_timeout: float = 5.0, **options: Any) -> None:
        super().__init__(RedisBackend(url, prefix=prefix, ttl=ttl, socket_timeout=socket_timeout), **options)

    @property
    def url(self) -> str:
        """The URL, password masked."""
        return self.backend.url


def _mask(url: str) -> str:
    """``url`` with its password (in the userinfo or a ``password=`` parameter) replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = parts.query
    if "password" in query:
        query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _scrub(text: str, url: str) -> str:
    """``text`` with any password of ``url`` in it masked."""
    parts = urlsplit(url)
    secrets = [parts.password or ""] + [v for k, v in parse_qsl(parts.query) if k == "password"]
    for secret in filter(None, {*secrets, *map(unquote, secrets)}):
        text = text.replace(secret, "***")
    return text
