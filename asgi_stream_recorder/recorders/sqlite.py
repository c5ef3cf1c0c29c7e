"""SQLite, the embedded default: one file, WAL mode, one transaction per batch.

One code path for asyncio and trio: stdlib ``sqlite3`` run in a worker thread through
``anyio.to_thread``. That is what aiosqlite does too (a thread per connection), and it
only runs on asyncio; the thread hop happens once per batch, not per chunk, so it costs
nothing measurable (see ``bench/``). A writer connection and a reader connection, each
used by one thread at a time, let reads run while a batch is being written.
"""

from __future__ import annotations

import array
import itertools
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from .base import Backend, Batch, Chunk, Segment, StreamEnd, StreamRecord, StreamStatus, recovered_end, to_datetime
from .buffered import RecorderError
from .recorder import Recorder

__all__ = ["SCHEMA_VERSION", "SQLiteBackend", "SQLiteRecorder"]

log = logging.getLogger("asgi_stream_recorder")

T = TypeVar("T")

SCHEMA_VERSION = 3

_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS streams (
    id           TEXT PRIMARY KEY,
    status       TEXT NOT NULL,
    created_at   REAL NOT NULL,
    completed_at REAL,
    error        TEXT,
    metadata     TEXT NOT NULL DEFAULT '{}',
    path         TEXT,
    method       TEXT,
    text_event   TEXT,
    owner        TEXT NOT NULL DEFAULT '',
    chunk_count  INTEGER,
    content      TEXT
);
CREATE INDEX IF NOT EXISTS streams_created ON streams (created_at DESC);
CREATE INDEX IF NOT EXISTS streams_status ON streams (status, created_at DESC);
-- A stream's chunks are stored in segments: one row per stream per written batch, holding a
-- run of consecutive seqs (first_seq, first_seq + 1, ...) as column arrays: data and events
-- as JSON (events NULL when all are the default), times as float64 milliseconds. One B-tree
-- insert per segment instead of per chunk, and no per-chunk work in Python, is what lets the
-- recorder keep up with many fast streams. The chunks view shows them one per row.
CREATE TABLE IF NOT EXISTS segments (
    stream_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    data      TEXT NOT NULL,
    events    TEXT,
    at_ms     BLOB NOT NULL,
    PRIMARY KEY (stream_id, first_seq)
) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS chunks AS
    SELECT s.stream_id AS stream_id, s.first_seq + d.key AS seq, d.value AS data,
           CASE WHEN s.events IS NULL THEN NULL ELSE json_extract(s.events, '$[' || d.key || ']') END AS event
    FROM segments AS s, json_each(s.data) AS d;
"""

# Version 2: stream keys and wire formats (resume, follow), and cancel requests between processes.
_SCHEMA_2 = """
ALTER TABLE streams ADD COLUMN key TEXT;
ALTER TABLE streams ADD COLUMN format TEXT;
CREATE INDEX IF NOT EXISTS streams_key ON streams (key, created_at DESC) WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS cancels (
    stream_id    TEXT PRIMARY KEY,
    requested_at REAL NOT NULL
) WITHOUT ROWID;
"""

# Version 3: leases. Each process running streams keeps one heartbeat row fresh.
_SCHEMA_3 = """
CREATE TABLE IF NOT EXISTS owners (
    owner   TEXT PRIMARY KEY,
    seen_at REAL NOT NULL
) WITHOUT ROWID;
"""

#: What takes a database from version ``n - 1`` to ``n`` (applied in order, in one transaction).
_MIGRATIONS = {1: _SCHEMA_1, 2: _SCHEMA_2, 3: _SCHEMA_3}

# The statements, shared by every path that writes or reads.
_INSERT_STREAM = (
    "INSERT OR IGNORE INTO streams (id, status, created_at, metadata, path, method, text_event, owner, key, format)"
    " VALUES (?, 'streaming', ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SEGMENT = (
    "INSERT OR IGNORE INTO segments (stream_id, first_seq, last_seq, data, events, at_ms) VALUES (?, ?, ?, ?, ?, ?)"
)
_SEGMENTS_OF = (
    "SELECT first_seq, data, events, at_ms FROM segments WHERE stream_id = ? AND last_seq > ? ORDER BY first_seq"
)
_END_STREAMS = (  # (UPDATE ... FROM: SQLite 3.33 and later)
    "UPDATE streams SET status = v.column2, completed_at = v.column3, error = v.column4, metadata = v.column5,"
    " chunk_count = v.column6, content = v.column7 FROM (VALUES {values}) AS v WHERE streams.id = v.column1"
)
#: streams left streaming whose process was last heard of (or which started) before the given time
_STALE = (
    "SELECT s.id, s.created_at, s.text_event, s.metadata FROM streams AS s LEFT JOIN owners AS o ON o.owner = s.owner"
    " WHERE s.status = 'streaming' AND max(coalesce(o.seen_at, 0), s.created_at) < ?"
)
_COLUMNS = (
    "id, status, created_at, completed_at, error, metadata, path, method, text_event, chunk_count, content, key, format"
)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _pack(times: Sequence[float]) -> bytes:
    packed = array.array("d", times)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _unpack(blob: bytes) -> array.array[float]:
    times = array.array("d")
    times.frombytes(blob)
    if sys.byteorder == "big":
        times.byteswap()
    return times


class SQLiteBackend(Backend):
    """The SQLite file at ``path`` (created with its schema on connect)."""

    def __init__(self, path: str | Path = "streams.db", *, busy_timeout: float = 1.0) -> None:
        if str(path) == ":memory:":
            raise ValueError("SQLiteRecorder needs a file (it uses two connections): use MemoryRecorder for tests")
        self.path = str(path)
        #: seconds one statement waits on another process's lock before the write fails and is
        #: retried by the recorder (short, so that a flush or close keeps its deadline)
        self.busy_timeout = busy_timeout
        self._wcon: sqlite3.Connection | None = None
        self._rcon: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._connected = False  # between connect() and close(); the connections may be reopened meanwhile
        #: seconds between two looks at the file for changes made by other processes
        self.poll_interval = 0.05
        self._data_version = -1
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()

    def __repr__(self) -> str:
        return repr(self.path)

    # -- connections ---------------------------------------------------------------------
    def _open(self) -> None:
        """Open both connections (schema created or checked); called with the write lock held."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        wcon = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=self.busy_timeout)
        try:
            wcon.execute("PRAGMA journal_mode=WAL")
            wcon.execute("PRAGMA synchronous=NORMAL")
            version = wcon.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this library's {SCHEMA_VERSION}: upgrade the library"
                )
            if version < SCHEMA_VERSION:
                # Look again inside the write lock: another process may have migrated meanwhile.
                wcon.execute("BEGIN IMMEDIATE")
                try:
                    version = wcon.execute("PRAGMA user_version").fetchone()[0]
                    for v in range(version + 1, SCHEMA_VERSION + 1):
                        for statement in _MIGRATIONS[v].split(";"):  # (executescript would commit first)
                            if statement.strip():
                                wcon.execute(statement)
                    wcon.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    wcon.execute("COMMIT")
                except BaseException:
                    if wcon.in_transaction:
                        wcon.execute("ROLLBACK")
                    raise
            rcon = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=self.busy_timeout)
        except BaseException:
            wcon.close()
            raise
        with self._rlock:
            self._wcon, self._rcon = wcon, rcon
        self._identity = _identity(self.path)

    async def connect(self) -> None:
        if sqlite3.sqlite_version_info < (3, 33, 0):  # UPDATE ... FROM, and JSON functions
            raise RecorderError(f"SQLiteRecorder needs SQLite 3.33 or later; this Python has {sqlite3.sqlite_version}")

        def run() -> None:
            with self._wlock:
                self._open()

        try:
            await anyio.to_thread.run_sync(run)
        except (sqlite3.Error, OSError) as exc:
            raise RecorderError(f"cannot open the SQLite database {self.path}: {exc}") from exc
        self._connected = True

    async def close(self) -> None:
        def run() -> None:
            with self._wlock, self._rlock:
                self._connected = False
                cons, self._wcon, self._rcon = (self._wcon, self._rcon), None, None
            for con in cons:
                if con is not None:
                    con.close()

        await anyio.to_thread.run_sync(run)

    def is_transient(self, exc: BaseException) -> bool:
        # Locked, busy, full, I/O errors, a file that is (for now) not a database: worth retrying.
        # Integrity, programming and data errors come from the batch's content.
        return type(exc) in (sqlite3.OperationalError, sqlite3.DatabaseError) or super().is_transient(exc)

    def _check_file(self) -> None:
        """Reopen if the file was deleted or replaced under us (writes would go to an unlinked file)."""
        if self._wcon is None:  # an earlier reopen failed: try again (its error was transient)
            self._open()
        elif _identity(self.path) != self._identity:
            log.error("SQLite database %s was deleted or replaced while in use: reopening it (records written "
                      "since are in the new file; those before are wherever the old file went)", self.path)
            # Close the old connections before anything opens the new file: closing the last
            # connection of a WAL database unlinks "<path>-wal" by name, which must not be the
            # new file's. (Other processes still using the old file can still do that to it:
            # SQLite's own advice is never to delete a database that is in use.)
            with self._rlock:
                cons, self._wcon, self._rcon = (self._wcon, self._rcon), None, None
            for con in cons:
                if con is not None:
                    con.close()
            self._open()

    async def _writing(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._wlock:
                if not self._connected:
                    raise RuntimeError("SQLiteRecorder is closed")
                self._check_file()
                con = self._wcon
                assert con is not None
                con.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(con)
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                        try:
                            con.execute("ROLLBACK")
                        except sqlite3.Error as exc:  # keep the error that happened, not this one
                            log.warning("SQLite rollback failed after a failed write: %r", exc)
                    raise
                return result

        return await anyio.to_thread.run_sync(run)

    async def _reading(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._rlock:
                if self._rcon is None:
                    raise RuntimeError("SQLiteRecorder is closed: open it (async with recorder) before reading")
                return fn(self._rcon)

        return await anyio.to_thread.run_sync(run)

    # -- writing -----------------------------------------------------------------------
    async def write(self, batch: Batch) -> None:
        await self._writing(lambda con: _write_batch(con, batch))

    async def heartbeat(self, owner: str, at: float) -> None:
        def run(con: sqlite3.Connection) -> None:
            con.execute("INSERT OR REPLACE INTO owners (owner, seen_at) VALUES (?, ?)", (owner, at))

        await self._writing(run)

    async def recover(self, stale_before: float) -> int:
        def stale(con: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return con.execute(_STALE, (stale_before,)).fetchall()

        def anything(con: sqlite3.Connection) -> bool:
            forgotten = con.execute("SELECT 1 FROM owners WHERE seen_at < ? LIMIT 1", (stale_before,)).fetchone()
            return forgotten is not None or bool(stale(con))

        if not await self._reading(anything):  # the usual answer, without the write lock
            return 0

        def run(con: sqlite3.Connection) -> int:
            orphans = stale(con)  # again, inside the write lock: another process may have swept
            con.execute("DELETE FROM owners WHERE seen_at < ?", (stale_before,))
            ends = (recovered_end(sid, created_at, text_event, json.loads(metadata), _chunks_of(con, sid, 0))
                    for sid, created_at, text_event, metadata in orphans)
            for group in _groups(ends):
                _freeze(con, group)
            return len(orphans)

        return await self._writing(run)

    # -- reading -----------------------------------------------------------------------
    async def get(self, stream_id: str) -> StreamRecord | None:
        def run(con: sqlite3.Connection) -> StreamRecord | None:
            row = con.execute(f"SELECT {_COLUMNS} FROM streams WHERE id = ?", (stream_id,)).fetchone()
            return None if row is None else _record(con, row)

        return await self._reading(run)

    async def chunks(self, stream_id: str, after: int = 0) -> list[Chunk]:
        def run(con: sqlite3.Connection) -> list[Chunk]:
            return [c for c in _chunks_of(con, stream_id, after) if c.seq > after]

        return await self._reading(run)

    async def list_streams(
        self, status: StreamStatus | str | None = None, limit: int = 100, key: str | None = None
    ) -> list[StreamRecord]:
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(str(StreamStatus(status)))
        if key is not None:
            where.append("key = ?")
            params.append(key)
        sql = f"SELECT {_COLUMNS} FROM streams {'WHERE ' + ' AND '.join(where) if where else ''}"

        def run(con: sqlite3.Connection) -> list[StreamRecord]:
            rows = con.execute(f"{sql} ORDER BY created_at DESC LIMIT ?", (*params, limit))
            return [_record(con, row) for row in rows.fetchall()]

        return await self._reading(run)

    # -- between processes: cancel requests and change notification -------------------
    async def request_cancel(self, stream_id: str) -> bool:
        def run(con: sqlite3.Connection) -> bool:
            row = con.execute("SELECT status FROM streams WHERE id = ?", (stream_id,)).fetchone()
            if row is None or row[0] != "streaming":
                return False
            con.execute("INSERT OR REPLACE INTO cancels (stream_id, requested_at) VALUES (?, ?)",
                        (stream_id, time.time()))
            return True

        return await self._writing(run)

    async def cancel_requests(self, stream_ids: Collection[str]) -> list[str]:
        wanted = set(stream_ids)

        def asked(con: sqlite3.Connection) -> list[str]:
            return [r[0] for r in con.execute("SELECT stream_id FROM cancels").fetchall() if r[0] in wanted]

        if not wanted or not await self._reading(asked):  # the usual answer, without a write lock
            return []

        def consume(con: sqlite3.Connection) -> list[str]:
            found = asked(con)
            con.executemany("DELETE FROM cancels WHERE stream_id = ?", [(sid,) for sid in found])
            return found

        return await self._writing(consume)

    async def wait_for_change(self, timeout: float) -> None:
        """Poll ``PRAGMA data_version`` (it changes when any connection commits) every
        ``poll_interval`` seconds, until it changes or ``timeout`` passes."""

        def version(con: sqlite3.Connection) -> int:
            return int(con.execute("PRAGMA data_version").fetchone()[0])

        deadline = anyio.current_time() + timeout
        while True:
            seen = await self._reading(version)
            if seen != self._data_version:
                self._data_version = seen
                return
            left = deadline - anyio.current_time()
            if left <= 0:
                return
            await anyio.sleep(min(self.poll_interval, left))

    # -- retention -----------------------------------------------------------------------
    async def purge(self, created_before: float, statuses: Collection[StreamStatus] | None = None, *,
                    batch_size: int = 500, dry_run: bool = False) -> int:
        """Delete finished streams created before ``created_before``, oldest first, ``batch_size``
        per transaction: each batch takes the write lock as a batch of records does, so the
        writer waits for one batch at most. (The file does not shrink: SQLite reuses the pages.)"""
        wanted = [str(s) for s in (StreamStatus if statuses is None else statuses) if s is not StreamStatus.STREAMING]
        if not wanted:
            return 0
        where = f"status IN ({', '.join('?' * len(wanted))}) AND created_at < ?"
        params = (*wanted, created_before)

        def count(con: sqlite3.Connection) -> int:
            return int(con.execute(f"SELECT count(*) FROM streams WHERE {where}", params).fetchone()[0])

        def delete(con: sqlite3.Connection) -> int:
            sql = f"SELECT id FROM streams WHERE {where} ORDER BY created_at LIMIT ?"
            ids = con.execute(sql, (*params, batch_size)).fetchall()
            for table, column in (("segments", "stream_id"), ("cancels", "stream_id"), ("streams", "id")):
                con.executemany(f"DELETE FROM {table} WHERE {column} = ?", ids)
            return len(ids)

        if dry_run:
            return await self._reading(count)
        total = 0
        while n := await self._writing(delete):
            total += n
            if n < batch_size:
                break
        return total


class SQLiteRecorder(Recorder):
    """Record streams into the SQLite file at ``path``: a :class:`Recorder` over a
    :class:`SQLiteBackend`. Takes the recorder's tuning options."""

    backend: SQLiteBackend

    def __init__(self, path: str | Path = "streams.db", **options: Any) -> None:
        super().__init__(SQLiteBackend(path), **options)

    def __repr__(self) -> str:
        return f"SQLiteRecorder({self.path!r})"

    @property
    def path(self) -> str:
        return self.backend.path


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _write_batch(con: sqlite3.Connection, batch: Batch) -> None:
    if batch.starts:
        _insert_many(con, _INSERT_STREAM, (
            (s.id, s.created_at, _dumps(s.metadata), s.path, s.method, s.text_event, s.owner, s.key, s.format)
            for s in batch.starts))
    if batch.segments:
        _insert_many(con, _INSERT_SEGMENT, _segment_rows(batch.segments))
    ends = batch.ends
    for end in ends:
        if end.content is None or end.chunk_count is None:
            row = con.execute("SELECT text_event FROM streams WHERE id = ?", (end.id,)).fetchone()
            if row is None:
                raise sqlite3.IntegrityError(f"stream {end.id} ended but was never started")
            chunks = _chunks_of(con, end.id, 0)
            end.content = "".join(c.data for c in chunks if c.event == row[0])
            end.chunk_count = len(chunks)
    for group in _groups(iter(ends)):
        _freeze(con, group)


#: Rows per statement: a batch's rows go in a few multi-row statements, never one per row.
#: Each statement SQLite runs releases the GIL, and a thread that gives the GIL back must wait
#: up to the interpreter's switch interval (5 ms) to get it again while the event loop is
#: busy: a thousand one-row statements then take seconds (measured: 5.5 s instead of 29 ms for
#: 1,000 segments), the queue fills and chunks are dropped. 256 rows of at most 9 columns
#: stay far below SQLite's 32,766 variables per statement.
_GROUP = 256


def _groups(rows: Iterator[T]) -> Iterator[list[T]]:
    """``rows`` in lists of at most :data:`_GROUP`, cut into powers of two (256, 256, ..., 64,
    8, 1), so a handful of statement texts serve every batch size (SQLite caches them)."""
    while group := list(itertools.islice(rows, _GROUP)):
        while group:
            size = 1 << (len(group).bit_length() - 1)  # the largest power of two that fits
            yield group[:size]
            group = group[size:]


def _insert_many(con: sqlite3.Connection, insert: str, rows: Iterator[tuple[Any, ...]]) -> None:
    """Run ``insert`` (a one-row ``INSERT ... VALUES (...)``) for every row, in multi-row statements."""
    head, _, values = insert.partition(" VALUES ")
    for group in _groups(rows):
        con.execute(f"{head} VALUES {','.join([values] * len(group))}", [v for row in group for v in row])


def _freeze(con: sqlite3.Connection, ends: list[StreamEnd]) -> None:
    """Write the ends of streams, in one statement (see :data:`_GROUP`)."""
    params = [v for end in ends for v in (end.id, str(end.status), end.completed_at, end.error, _dumps(end.metadata),
                                          end.chunk_count, end.content)]
    values = ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(ends))
    if con.execute(_END_STREAMS.format(values=values), params).rowcount != len(ends):
        ids = [end.id for end in ends]
        found = {r[0] for r in con.execute(f"SELECT id FROM streams WHERE id IN ({','.join('?' * len(ids))})", ids)}
        missing = ",".join(i for i in ids if i not in found)
        raise sqlite3.IntegrityError(f"stream {missing} ended but was never started")
    con.execute(f"DELETE FROM cancels WHERE stream_id IN ({','.join('?' * len(ends))})", [end.id for end in ends])


def _segment_rows(segments: list[Segment]) -> Iterator[tuple[Any, ...]]:
    """Rows for the segments table: per stream, runs of consecutive seqs, as column arrays.

    Made one at a time as SQLite asks for them (and with no copy of a segment that is one
    run, the usual case), so a batch of many streams never holds a row object per stream."""
    for seg in segments:
        seqs, data, at = seg.seqs, seg.data, seg.at_ms
        events = seg.events
        for lo, hi in seg.runs():
            whole = lo == 0 and hi == len(data)
            names = None if events is None else (events if whole else events[lo:hi])
            yield (seg.stream_id, seqs[lo], seqs[hi - 1], _dumps(data if whole else data[lo:hi]),
                   _dumps(names) if names is not None and any(names) else None, _pack(at if whole else at[lo:hi]))


def _chunks_of(con: sqlite3.Connection, stream_id: str, after: int) -> list[Chunk]:
    """The stream's chunks from the segments holding seqs after ``after`` (whole segments)."""
    result: list[Chunk] = []
    for first, data, events, times in con.execute(_SEGMENTS_OF, (stream_id, after)).fetchall():
        texts = json.loads(data)
        names = json.loads(events) if events is not None else [None] * len(texts)
        result.extend(
            Chunk(stream_id, first + i, text, name, at)
            for i, (text, name, at) in enumerate(zip(texts, names, _unpack(times), strict=True))
        )
    return result


def _text_and_count(con: sqlite3.Connection, stream_id: str, text_event: str | None) -> tuple[str, int]:
    """The stream's text (its chunks of the text event, in order) and how many chunks it has."""
    chunks = _chunks_of(con, stream_id, 0)
    return "".join(c.data for c in chunks if c.event == text_event), len(chunks)


def _record(con: sqlite3.Connection, row: tuple[Any, ...]) -> StreamRecord:
    sid, status, created, completed, error, metadata, path, method, text_event, count, content, key, fmt = row
    if count is None:  # still streaming: read what has been written so far
        content, count = _text_and_count(con, sid, text_event)
    created_dt = to_datetime(created)
    assert created_dt is not None
    return StreamRecord(
        id=sid,
        status=StreamStatus(status),
        created_at=created_dt,
        completed_at=to_datetime(completed),
        content=content,
        chunk_count=count,
        error=error,
        metadata=json.loads(metadata),
        path=path,
        method=method,
        key=key,
        format=fmt,
        text_event=text_event,
    )
