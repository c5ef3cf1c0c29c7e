"""PostgreSQL, for several processes and hosts: asyncpg, a connection pool, one transaction per batch.

Install with ``pip install 'asgi-stream-recorder[postgres]'``. asyncpg runs on asyncio only (on
trio, use :class:`~asgi_stream_recorder.SQLiteRecorder`) and is imported on connect, not before.

The tables live in their own schema (``schema=``, created on open; its version in
``schema_version``). Times are ``timestamptz``, so SQL reads them naturally; chunk times
``at_ms`` are milliseconds since the stream started, as everywhere. ``streams`` holds one row per
stream, whose ``content`` and ``chunk_count`` are frozen at its end (NULL while it streams:
readers compute them from its chunks); ``chunks`` one row per chunk, keyed ``(stream_id, seq)``
and written in bulk, ``INSERT ... SELECT FROM unnest(column arrays) ON CONFLICT DO NOTHING``, so
a batch retried after the reply to its commit was lost doubles nothing (starts are inserted the
same way, an end is an ``UPDATE``); ``owners`` the heartbeat of each process running streams
(leases); ``cancels`` cancel requests between processes.

U+0000: PostgreSQL ``text`` and ``jsonb`` cannot hold it. A chunk whose data or event has one,
and a content that does, is stored escaped, losslessly, its row's ``escaped`` true: ``\\`` as
``\\\\`` and U+0000 as ``\\0``. Rows without NUL are stored as given. In metadata, an error, a
path or another label NUL becomes U+FFFD, noted in ``metadata["unstorable"]`` (lossy, but said).

Each commit ``NOTIFY``s a channel named after the schema (payload: the stream ids, ``*`` when
long). A backend listens on one connection of its own, opened on the first wait and again
whenever it drops; meanwhile waiting is polling (readers re-read by seq: no chunk is missed).
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote

import anyio
import sniffio

from .base import Backend, Batch, Chunk, Segment, StreamEnd, StreamRecord, StreamStart, StreamStatus, recovered_end
from .buffered import RecorderError
from .recorder import Recorder
from .storable import UNSTORABLE_KEY

__all__ = ["SCHEMA_VERSION", "PostgresBackend", "PostgresRecorder"]

log = logging.getLogger("asgi_stream_recorder")
T = TypeVar("T")

SCHEMA_VERSION = 1
#: What takes a schema from version ``n - 1`` to ``n`` (applied in order, in one transaction).
_MIGRATIONS = {1: """
CREATE TABLE {s}.streams (
    id text PRIMARY KEY, status text NOT NULL, created_at timestamptz NOT NULL, completed_at timestamptz,
    error text, metadata jsonb NOT NULL DEFAULT '{{}}', path text, method text, text_event text,
    owner text NOT NULL DEFAULT '', key text, format text, chunk_count bigint, content text,
    escaped boolean NOT NULL DEFAULT false);
CREATE INDEX streams_created ON {s}.streams (created_at DESC);
CREATE INDEX streams_status ON {s}.streams (status, created_at DESC);
CREATE INDEX streams_key ON {s}.streams (key, created_at DESC) WHERE key IS NOT NULL;
CREATE TABLE {s}.chunks (
    stream_id text NOT NULL, seq bigint NOT NULL, data text NOT NULL, event text,
    at_ms double precision NOT NULL, escaped boolean NOT NULL DEFAULT false, PRIMARY KEY (stream_id, seq));
CREATE TABLE {s}.owners (owner text PRIMARY KEY, seen_at timestamptz NOT NULL);
CREATE TABLE {s}.cancels (stream_id text PRIMARY KEY, requested_at timestamptz NOT NULL DEFAULT now());
"""}

#: SQLSTATEs worth retrying: connection (08), rollback (40: serialization, deadlock), resources
#: (53), operator intervention (57: shutdown, starting up, cancelled), system (58), lock not
#: available, read-only transaction (a standby after a failover).
_TRANSIENT_STATES = ("08", "40", "53", "57", "58", "55P03", "25006")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# A stream's record; for one still streaming, also its text and chunk count so far (from its chunks).
_SELECT = """SELECT s.id, s.status, s.created_at, s.completed_at, s.error, s.metadata, s.path, s.method,
 s.text_event, s.chunk_count, s.content, s.escaped, s.key, s.format, c.n, c.text, c.esc
 FROM {s}.streams AS s CROSS JOIN LATERAL (
  SELECT count(*) AS n, bool_or(escaped) AS esc,
         string_agg(data, '' ORDER BY seq) FILTER (WHERE event IS NOT DISTINCT FROM s.text_event) AS text
  FROM {s}.chunks WHERE stream_id = s.id AND s.chunk_count IS NULL) AS c"""


def _asyncpg() -> Any:
    try:
        import asyncpg  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise RecorderError("PostgresRecorder needs asyncpg: pip install 'asgi-stream-recorder[postgres]'") from None
    return asyncpg


class PostgresBackend(Backend):
    """The PostgreSQL database at ``dsn`` (a ``postgresql://`` URL), its tables in ``schema``.

    ``min_size``/``max_size`` bound the connection pool (one more connection listens for
    changes); ``command_timeout`` (seconds) bounds connecting and every statement.
    """

    def __init__(self, dsn: str, *, schema: str = "asgi_stream_recorder", min_size: int = 1, max_size: int = 4,
                 command_timeout: float = 10.0) -> None:
        if not _IDENTIFIER.fullmatch(schema):
            raise ValueError(f"schema must be a plain SQL identifier (letters, digits, _; at most 63), not {schema!r}")
        self._dsn, self.schema, self._s = dsn, schema, f'"{schema}"'
        self.min_size, self.max_size, self.command_timeout = min_size, max_size, command_timeout
        self._channel = f"{schema}_changes"[:63]
        self._pool: Any = None
        self._listener: Any = None  # the connection that LISTENs
        self._listening: asyncio.Task[None] | None = None  # opening it
        self._listen_again_at = 0.0
        self._changed: asyncio.Event | None = None
        self._label_notes: dict[str, list[str]] = {}  # streams whose path (...) held NUL, until their end
        #: how chunks are inserted (``bench/`` swaps in the alternatives below to compare them)
        self._insert_chunks = _insert_unnest

    def __repr__(self) -> str:
        return f"PostgresBackend({_masked(self._dsn)!r}, schema={self.schema!r})"

    # -- connections ---------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        """Connection options: bounded, and named after the schema in ``pg_stat_activity``."""
        name = {} if "application_name" in self._dsn else {"application_name": f"asgi_stream_recorder:{self.schema}"}
        return {"timeout": self.command_timeout, "command_timeout": self.command_timeout, "server_settings": name}

    async def connect(self) -> None:
        asyncpg = _asyncpg()
        if sniffio.current_async_library() != "asyncio":
            raise RecorderError("PostgresRecorder needs asyncio: asyncpg runs on asyncio only "
                                "(on trio, SQLiteRecorder records streams)")
        pool = None
        try:
            pool = await asyncpg.create_pool(self._dsn, min_size=self.min_size, max_size=self.max_size,
                                             **self._options())
            async with pool.acquire(timeout=self.command_timeout) as con:
                await self._migrate(con)
        except BaseException as exc:
            if pool is not None:
                await self._close_pool(pool)
            if isinstance(exc, RecorderError) or not isinstance(exc, Exception):
                raise
            message = _scrub(f"cannot connect to PostgreSQL at {_masked(self._dsn)} (schema {self.schema}): "
                             f"{type(exc).__name__}: {exc}", self._dsn)
            raise RecorderError(message) from _safe(exc, self._dsn)
        self._pool, self._changed, self._listen_again_at = pool, asyncio.Event(), 0.0

    async def _migrate(self, con: Any) -> None:
        """Create or update the schema; several processes opening a new database at once take turns."""
        s = self._s
        if await con.fetchval("SELECT to_regclass($1)", f"{s}.schema_version") is not None:
            if await con.fetchval(f"SELECT max(version) FROM {s}.schema_version") == SCHEMA_VERSION:
                return  # the usual case: no DDL, so no privilege to create is needed
        async with con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"asr:{self.schema}")
            await con.execute(f"CREATE SCHEMA IF NOT EXISTS {s}; CREATE TABLE IF NOT EXISTS {s}.schema_version"
                              " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            version = await con.fetchval(f"SELECT coalesce(max(version), 0) FROM {s}.schema_version")
            if version > SCHEMA_VERSION:
                raise RecorderError(f"PostgreSQL schema {self.schema} has version {version}, newer than this "
                                    f"library's {SCHEMA_VERSION}: upgrade asgi-stream-recorder")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                await con.execute(_MIGRATIONS[v].format(s=s))
                await con.execute(f"INSERT INTO {s}.schema_version (version) VALUES ($1)", v)

    async def close(self) -> None:
        pool, listener, listening = self._pool, self._listener, self._listening
        self._pool = self._listener = self._listening = None
        if listening is not None and not listening.done():
            # Let a connection being opened finish and close itself (see _open_listener):
            # cancelling asyncpg mid-handshake leaves an error nobody retrieves.
            with anyio.move_on_after(1.0):
                await asyncio.shield(listening)
            listening.cancel()
        if listener is not None:
            listener.terminate()
        if pool is not None:
            await self._close_pool(pool)

    async def _close_pool(self, pool: Any) -> None:
        with anyio.move_on_after(self.command_timeout):  # (waits for connections in use)
            await pool.close()
        pool.terminate()

    def is_transient(self, exc: BaseException) -> bool:
        """Connection lost, refused or closed, shutdown and restart, too many connections, a full
        disk, serialization failures, deadlocks, lock and statement timeouts, a read-only server
        (a failover), plans invalidated by DDL. Data and integrity errors come from a record.
        The whole chain counts: a connection lost mid-transaction may surface as the rollback's error.
        (InternalClientError: a connection asyncpg cannot use after a FATAL error arrived while idle.)"""
        errors = _asyncpg().exceptions  # (importable: connect succeeded)
        cause: BaseException | None = exc
        for _ in range(8):
            if cause is None:
                return False
            if (isinstance(cause, (asyncio.TimeoutError, errors.InvalidCachedStatementError,
                                   errors.InternalClientError)) or super().is_transient(cause)
                    or (isinstance(cause, errors.InterfaceError) and "connection" in str(cause)
                        and "closed" in str(cause))
                    or (isinstance(cause, errors.PostgresError) and str(cause.sqlstate).startswith(_TRANSIENT_STATES))):
                return True
            cause = cause.__cause__ or cause.__context__
        return False

    def _acquire(self) -> Any:
        if self._pool is None:
            raise RuntimeError("PostgresRecorder is closed: open it (async with recorder) first")
        return self._pool.acquire(timeout=self.command_timeout)

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """``fn(connection)`` on a pooled connection; once more on another if the first was lost
        (the server ended it while it sat in the pool). Only for what is safe to repeat: not
        writes, which the recorder retries with backoff."""
        try:
            async with self._acquire() as con:
                return await fn(con)
        except Exception as exc:
            if isinstance(exc, asyncio.TimeoutError) or not self.is_transient(exc):
                raise
        async with self._acquire() as con:
            return await fn(con)

    # -- writing -----------------------------------------------------------------------
    async def write(self, batch: Batch) -> None:
        s = self._s
        async with self._acquire() as con, con.transaction():
            if batch.starts:
                await con.execute(
                    f"INSERT INTO {s}.streams (id, status, created_at, metadata, path, method, text_event, owner, key,"
                    " format) SELECT u.id, 'streaming', to_timestamp(u.t), u.m::jsonb, u.p, u.v, u.e, u.o, u.k, u.f"
                    " FROM unnest($1::text[], $2::float8[], $3::text[], $4::text[], $5::text[], $6::text[],"
                    " $7::text[], $8::text[], $9::text[]) AS u(id, t, m, p, v, e, o, k, f) ON CONFLICT (id) DO NOTHING",
                    *zip(*(_start_row(st, self._label_notes) for st in batch.starts), strict=True))
            others = ({x.stream_id for x in batch.segments} | {e.id for e in batch.ends}) - {x.id for x in batch.starts}
            if others:
                unknown = await con.fetchval(f"SELECT array_agg(x) FROM unnest($1::text[]) AS x WHERE NOT EXISTS "
                                             f"(SELECT 1 FROM {s}.streams WHERE id = x)", list(others))
                if unknown:
                    raise ValueError(f"stream {unknown[0]} has records but was never started")
            if batch.segments:
                await self._insert_chunks(con, s, _columns(batch.segments))
            for end in batch.ends:
                if end.content is None or end.chunk_count is None:  # frozen from the stored chunks
                    record = await self._get(con, end.id)
                    assert record is not None  # (checked above)
                    end.content, end.chunk_count = record.content, record.chunk_count
            if batch.ends:
                await self._freeze(con, batch.ends)
            ids = ",".join(batch.stream_ids())
            await con.execute("SELECT pg_notify($1, $2)", self._channel, ids if len(ids) <= 1000 else "*")
        for end in batch.ends if self._label_notes else ():
            self._label_notes.pop(end.id, None)

    async def _freeze(self, con: Any, ends: Sequence[StreamEnd]) -> None:
        """Set the ends (status, times, frozen content and count) and drop their cancel requests."""
        await con.execute(
            f"WITH e AS (SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[], $5::text[],"
            " $6::text[], $7::bool[], $8::int8[]) AS e(id, status, t, error, m, content, escaped, n)),"
            f" d AS (DELETE FROM {self._s}.cancels WHERE stream_id IN (SELECT id FROM e))"
            f" UPDATE {self._s}.streams AS s SET status = e.status, completed_at = to_timestamp(e.t),"
            " error = e.error, metadata = e.m::jsonb, content = e.content, escaped = e.escaped, chunk_count = e.n"
            " FROM e WHERE s.id = e.id", *zip(*(_end_row(end, self._label_notes) for end in ends), strict=True))

    async def heartbeat(self, owner: str, at: float) -> None:
        await self._run(lambda con: con.execute(
            f"INSERT INTO {self._s}.owners AS o (owner, seen_at) VALUES ($1, to_timestamp($2))"
            " ON CONFLICT (owner) DO UPDATE SET seen_at = greatest(o.seen_at, excluded.seen_at)", owner, at))

    async def recover(self, stale_before: float) -> int:
        """End streams whose lease ran out. Their rows are locked ``FOR UPDATE SKIP LOCKED``:
        processes sweeping at once end different streams, each stream once."""
        return await self._run(lambda con: self._recover(con, stale_before))

    async def _recover(self, con: Any, stale_before: float) -> int:
        s = self._s
        async with con.transaction():
            rows = await con.fetch(
                f"SELECT s.id, s.created_at, s.text_event, s.metadata FROM {s}.streams AS s"
                f" LEFT JOIN {s}.owners AS o ON o.owner = s.owner WHERE s.status = 'streaming'"
                " AND s.created_at < to_timestamp($1) AND (o.seen_at IS NULL OR o.seen_at < to_timestamp($1))"
                " FOR UPDATE OF s SKIP LOCKED", stale_before)
            ends = [recovered_end(sid, created.timestamp(), text_event, json.loads(meta),
                                  await self._chunks_of(con, sid, 0)) for sid, created, text_event, meta in rows]
            if ends:
                await self._freeze(con, ends)
                await con.execute("SELECT pg_notify($1, '*')", self._channel)
            await con.execute(f"DELETE FROM {s}.owners AS o WHERE o.seen_at < to_timestamp($1) AND NOT EXISTS"
                              f" (SELECT 1 FROM {s}.streams WHERE owner = o.owner AND status = 'streaming')",
                              stale_before)
        return len(ends)

    # -- reading -----------------------------------------------------------------------
    async def get(self, stream_id: str) -> StreamRecord | None:
        return await self._run(lambda con: self._get(con, stream_id))

    async def _get(self, con: Any, stream_id: str) -> StreamRecord | None:
        row = await con.fetchrow(_SELECT.format(s=self._s) + " WHERE s.id = $1", stream_id)
        return None if row is None else await self._record(con, row)

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        return await self._run(lambda con: self._chunks_of(con, stream_id, after))

    async def _chunks_of(self, con: Any, stream_id: str, after: int) -> list[Chunk]:
        rows = await con.fetch(f"SELECT seq, data, event, at_ms, escaped FROM {self._s}.chunks"
                               " WHERE stream_id = $1 AND seq > $2 ORDER BY seq", stream_id, after)
        return [Chunk(stream_id, seq, _unescape(data), event and _unescape(event), at) if escaped
                else Chunk(stream_id, seq, data, event, at) for seq, data, event, at, escaped in rows]

    async def list_streams(
        self, status: StreamStatus | str | None = None, limit: int = 100, key: str | None = None
    ) -> list[StreamRecord]:
        where, params = [], []
        for column, value in (("status", None if status is None else str(StreamStatus(status))), ("key", key)):
            if value is not None:
                params.append(value)
                where.append(f"s.{column} = ${len(params)}")
        sql = _SELECT.format(s=self._s) + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY s.created_at DESC, s.id DESC LIMIT ${len(params) + 1}"

        async def run(con: Any) -> list[StreamRecord]:
            return [await self._record(con, row) for row in await con.fetch(sql, *params, limit)]

        return await self._run(run)

    async def _record(self, con: Any, row: Any) -> StreamRecord:
        (sid, status, created, completed, error, metadata, path, method, text_event, count, content, escaped,
         key, fmt, n, text, esc) = row
        if count is None:  # still streaming: what has been written so far
            count, content = n, text or ""
            if esc:
                content = "".join(c.data for c in await self._chunks_of(con, sid, 0) if c.event == text_event)
        elif escaped:
            content = _unescape(content)
        return StreamRecord(id=sid, status=StreamStatus(status), created_at=created, completed_at=completed,
                            content=content or "", chunk_count=count, error=error, metadata=json.loads(metadata),
                            path=path, method=method, key=key, format=fmt, text_event=text_event)

    # -- between processes: cancel requests and change notification -------------------
    async def request_cancel(self, stream_id: str) -> bool:
        # FOR SHARE: an end being written waits for this request, and then removes it
        return bool(await self._run(lambda con: con.fetchval(
            f"WITH s AS (SELECT id FROM {self._s}.streams WHERE id = $1 AND status = 'streaming' FOR SHARE),"
            f" c AS (INSERT INTO {self._s}.cancels (stream_id) SELECT id FROM s ON CONFLICT (stream_id)"
            " DO UPDATE SET requested_at = now() RETURNING stream_id)"
            " SELECT count(*) FROM (SELECT pg_notify($2, stream_id) FROM c) AS n", stream_id, self._channel)))

    async def cancel_requests(self, stream_ids: Collection[str]) -> list[str]:
        if not stream_ids:
            return []
        rows = await self._run(lambda con: con.fetch(
            f"DELETE FROM {self._s}.cancels WHERE stream_id = ANY($1::text[]) RETURNING stream_id", list(stream_ids)))
        return [r[0] for r in rows]

    async def wait_for_change(self, timeout: float) -> None:
        """Wait for a ``NOTIFY`` on this schema's channel (any process's commit), or ``timeout``.
        A change announced since the last wait returns at once."""
        changed = self._changed
        if self._pool is None or changed is None:
            await anyio.sleep(timeout)
            return
        self._listen()
        with anyio.move_on_after(timeout):
            await changed.wait()
        changed.clear()

    def _listen(self) -> None:
        """Open the listening connection in the background if it is down (at most once a second)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = None
        if (self._listening is None or self._listening.done()) and time.monotonic() >= self._listen_again_at:
            self._listen_again_at = time.monotonic() + 1.0
            self._listening = asyncio.get_running_loop().create_task(self._open_listener())

    async def _open_listener(self) -> None:
        con = None
        try:
            con = await _asyncpg().connect(self._dsn, **self._options())
            await con.add_listener(self._channel, self._notified)
        except Exception as exc:
            log.debug("PostgreSQL listener for %s cannot connect (%s); polling meanwhile", _masked(self._dsn),
                      _scrub(f"{type(exc).__name__}: {exc}", self._dsn))
            if con is not None:
                con.terminate()
            return
        if self._pool is None:  # closed meanwhile
            con.terminate()
            return
        con.add_termination_listener(self._lost)
        self._listener = con
        self._notified()  # whatever changed before LISTEN began went unannounced

    def _notified(self, *_: Any) -> None:
        if self._changed is not None:
            self._changed.set()

    def _lost(self, con: Any) -> None:
        if self._listener is con:
            self._listener = None
            log.warning("PostgreSQL listener connection lost; polling until it is back")
            self._notified()

    # -- retention -----------------------------------------------------------------------
    async def purge(self, created_before: float, statuses: Collection[StreamStatus] | None = None, *,
                    batch_size: int = 500, dry_run: bool = False) -> int:
        """Delete finished streams created before ``created_before``, oldest first: one statement
        (its own transaction) per ``batch_size`` streams, deleting their chunks, cancel requests
        and rows together. The rows are locked ``SKIP LOCKED``: two purges at once delete
        different streams, and the writer (which never touches a finished stream) waits for nothing."""
        wanted = [str(s) for s in (StreamStatus if statuses is None else statuses) if s is not StreamStatus.STREAMING]
        if not wanted:
            return 0
        s, where = self._s, "status = ANY($1::text[]) AND created_at < to_timestamp($2)"
        if dry_run:
            return int(await self._run(lambda con: con.fetchval(f"SELECT count(*) FROM {s}.streams WHERE {where}",
                                                                wanted, created_before)))
        sql = (f"WITH v AS (SELECT id FROM {s}.streams WHERE {where} ORDER BY created_at LIMIT $3"
               " FOR UPDATE SKIP LOCKED),"
               f" c AS (DELETE FROM {s}.chunks WHERE stream_id IN (SELECT id FROM v)),"
               f" x AS (DELETE FROM {s}.cancels WHERE stream_id IN (SELECT id FROM v)),"
               f" d AS (DELETE FROM {s}.streams WHERE id IN (SELECT id FROM v) RETURNING 1)"
               " SELECT count(*) FROM d")
        total = 0
        while True:
            n = int(await self._run(lambda con: con.fetchval(sql, wanted, created_before, batch_size)))
            total += n
            if n < batch_size:
                return total


class PostgresRecorder(Recorder):
    """Record streams into PostgreSQL at ``dsn``, tables in ``schema``: a :class:`Recorder` over a
    :class:`PostgresBackend`. Takes the recorder's tuning options, and the backend's pool options."""

    backend: PostgresBackend

    def __init__(self, dsn: str, *, schema: str = "asgi_stream_recorder", **options: Any) -> None:
        pool = {k: options.pop(k) for k in ("min_size", "max_size", "command_timeout") if k in options}
        super().__init__(PostgresBackend(dsn, schema=schema, **pool), **options)

    def __repr__(self) -> str:
        return f"PostgresRecorder({_masked(self.backend._dsn)!r}, schema={self.backend.schema!r})"


# -- values in and out -----------------------------------------------------------------------------
def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\x00", "\\0")


def _unescape(text: str) -> str:
    return _ESCAPED.sub(lambda m: "\x00" if m[1] == "0" else m[1], text)


def _clean(value: Any, where: str, notes: list[str]) -> Any:
    """``value`` (JSON) with NUL replaced by U+FFFD in every string, each replacement noted."""
    if isinstance(value, str) and "\x00" in value:
        notes.append(f"{where}: U+0000 stored as U+FFFD (PostgreSQL text cannot hold it)")
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_clean(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
    if isinstance(value, dict):
        keys = {k: k.replace("\x00", "\ufffd") for k in value}
        return {_clean(k, f"{where} key {keys[k]!r}", notes): _clean(v, f"{where}.{keys[k]}", notes)
                for k, v in value.items()}
    return value


def _metadata(stream_id: str, metadata: dict[str, Any], notes: list[str]) -> str:
    """Metadata as JSON for ``jsonb``: NUL (``\\u0000``, which jsonb refuses) replaced and noted."""
    text = _dumps(metadata)
    if "\\u0000" not in text and not notes:
        return text
    clean = _clean(metadata, "$", notes)
    if notes:
        previous = clean.get(UNSTORABLE_KEY)
        clean[UNSTORABLE_KEY] = [*(previous if isinstance(previous, list) else []), *notes]
        log.warning("stream %s: metadata stored with changes: %s", stream_id, "; ".join(notes))
    return _dumps(clean)


def _start_row(st: StreamStart, label_notes: dict[str, list[str]]) -> tuple[Any, ...]:
    notes: list[str] = []
    labels = [_clean(getattr(st, name), name, notes) for name in ("path", "method", "text_event", "owner", "key",
                                                                  "format")]
    if notes:  # said again at the end, whose metadata replaces the start's
        label_notes[st.id] = list(notes)
    return (st.id, st.created_at, _metadata(st.id, st.metadata, notes), *labels)


def _end_row(end: StreamEnd, label_notes: dict[str, list[str]]) -> tuple[Any, ...]:
    notes = list(label_notes.get(end.id, ()))
    error = _clean(end.error, "error", notes)
    escaped = end.content is not None and "\x00" in end.content
    content = _escape(end.content) if end.content is not None and escaped else end.content
    return (end.id, str(end.status), end.completed_at, error, _metadata(end.id, end.metadata, notes), content, escaped,
            end.chunk_count)


def _columns(segments: list[Segment]) -> tuple[list[str], array.array[int], list[str], list[str | None],
                                                 array.array[float], list[bool]]:
    """The batch's chunks as columns, with no object per chunk (rows holding NUL escaped).

    ``events`` stays empty while no chunk has an event, ``escaped`` while none holds NUL:
    ``unnest`` pads a shorter array with NULL (read as no event, not escaped), and an array
    not sent is one asyncpg need not encode, element by element."""
    nul = ["\x00" in "".join(seg.data) or any(e and "\x00" in e for e in seg.events or ()) for seg in segments]
    named, any_nul = any(seg.events is not None for seg in segments), any(nul)
    ids: list[str] = []
    seqs, at_ms = array.array("q"), array.array("d")
    data: list[str] = []
    events: list[str | None] = []
    escaped: list[bool] = []
    for seg, has_nul in zip(segments, nul, strict=True):
        n = len(seg)
        ids += [seg.stream_id] * n
        seqs.extend(seg.seqs)
        at_ms.extend(seg.at_ms)
        if not has_nul:
            data += seg.data
            events += seg.event_list() if named else ()
            escaped += [False] * n if any_nul else ()
            continue
        for text, name in zip(seg.data, seg.event_list(), strict=True):  # (rare) escape the rows holding NUL
            flag = "\x00" in text or (name is not None and "\x00" in name)
            data.append(_escape(text) if flag else text)
            events += (name and _escape(name) if flag else name,) if named else ()
            escaped.append(flag)
    return ids, seqs, data, events, at_ms, escaped


def _rows(cols: tuple[Any, ...]) -> Any:
    """The columns as one tuple per chunk (for the alternatives below)."""
    n = len(cols[0])
    ids, seqs, data, events, at_ms, escaped = cols
    return zip(ids, seqs, data, events or [None] * n, at_ms, escaped or [False] * n, strict=True)


_CHUNK_COLUMNS = "stream_id, seq, data, event, at_ms, escaped"


async def _insert_unnest(con: Any, s: str, cols: tuple[Any, ...]) -> None:
    """One statement, the columns as arrays: the fastest (figures in ``bench/``)."""
    await con.execute(f"INSERT INTO {s}.chunks ({_CHUNK_COLUMNS}) SELECT i, q, d, e, a, coalesce(x, false) FROM"
                      " unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::float8[], $6::bool[])"
                      " AS u(i, q, d, e, a, x) ON CONFLICT DO NOTHING", *cols)


async def _insert_executemany(con: Any, s: str, cols: tuple[Any, ...]) -> None:
    """A prepared INSERT per chunk, pipelined (to compare)."""
    await con.executemany(f"INSERT INTO {s}.chunks ({_CHUNK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
                          " ON CONFLICT DO NOTHING", _rows(cols))


async def _insert_copy(con: Any, s: str, cols: tuple[Any, ...]) -> None:
    """COPY into a temporary table, then INSERT ... ON CONFLICT from it (to compare)."""
    await con.execute(f"CREATE TEMP TABLE IF NOT EXISTS asr_chunks_in (LIKE {s}.chunks) ON COMMIT DELETE ROWS")
    await con.copy_records_to_table("asr_chunks_in", records=_rows(cols),
                                    columns=_CHUNK_COLUMNS.split(", "))
    await con.execute(f"INSERT INTO {s}.chunks SELECT * FROM asr_chunks_in ON CONFLICT DO NOTHING")


# -- the password stays out of reprs and messages --------------------------------------------------
def _password(dsn: str) -> str | None:
    found = re.search(r"password=([^&\s]+)", dsn) or re.search(r"^[a-z]+://[^:/@?#]*:([^/?#]*)@", dsn)
    return found[1] if found and found[1] else None


def _scrub(text: str, dsn: str) -> str:
    secret = _password(dsn)
    return text.replace(secret, "***").replace(unquote(secret), "***") if secret else text


def _masked(dsn: str) -> str:
    """The DSN with its password shown as ``***``."""
    secret = _password(dsn)
    return dsn.replace(f":{secret}@", ":***@").replace(f"password={secret}", "password=***") if secret else dsn


def _safe(exc: BaseException, dsn: str) -> BaseException | None:
    """``exc``, to chain to an error, unless the password shows anywhere in its chain."""
    secret, cause = _password(dsn), exc  # type: str | None, BaseException | None
    while cause is not None and secret:
        if secret in str(cause) or unquote(secret) in str(cause):
            return None
        cause = cause.__cause__ or cause.__context__
    return exc
