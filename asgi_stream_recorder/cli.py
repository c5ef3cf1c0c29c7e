"""``asgi-stream-recorder``: the recorded streams from a shell (also ``python -m asgi_stream_recorder``).

::

    asgi-stream-recorder list --status failed --since 2h
    asgi-stream-recorder show ID --chunks
    asgi-stream-recorder tail ID
    asgi-stream-recorder export --out streams.jsonl
    asgi-stream-recorder replay ID --speed 2
    asgi-stream-recorder purge --older-than 30d --dry-run
    asgi-stream-recorder stats --since 1d

Where: ``--db PATH`` (SQLite) or ``--url`` (any URL :func:`~asgi_stream_recorder.open_recorder`
takes), else ``$ASGI_STREAM_RECORDER_URL``, ``$ASGI_STREAM_RECORDER_DB`` or ``./streams.db``:
where the library records by default. No command creates a database (a missing file is an
error). Errors are one line on stderr, passwords masked, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio

from .recorders import (
    Chunk,
    MemoryRecorder,
    Recorder,
    RecorderError,
    SQLiteRecorder,
    StreamRecord,
    StreamStatus,
    open_recorder,
)

__all__ = ["main"]

PROG = "asgi-stream-recorder"
#: exit statuses: 1 an error, 2 a usage error; ``tail`` of a stream that ended otherwise than completed:
EXIT_STATUS = {StreamStatus.FAILED: 3, StreamStatus.CANCELLED: 4, StreamStatus.INTERRUPTED: 5}
_ALL = 1 << 60  # "no limit", as list_streams takes one
_FINISHED = [s.value for s in StreamStatus if s is not StreamStatus.STREAMING]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_SQLITE_HEADER = b"SQLite format 3\x00"


class CLIError(Exception):
    """What went wrong, said in one line, and the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- arguments ---------------------------------------------------------------------------------
def duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``2h``, ``7d`` or a sum of them (``1d12h``)."""
    if not re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+", text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: a number and a unit, s, m, h or d (30m, 7d)")
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(text))


def since(text: str) -> float:
    """The epoch time ``text`` names: a duration ago (``2h``) or an ISO date (local time unless it says)."""
    try:
        return time.time() - duration(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a duration (30m, 2h, 7d) nor an ISO date "
                                         "(2024-05-01, 2024-05-01T12:00)") from None
    return when.timestamp()


def count(text: str) -> int:
    """A whole number of at least 1 (``--limit``)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def positive(text: str) -> float:
    """A finite number above 0 (``--speed``)."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _parser() -> argparse.ArgumentParser:
    def target(parser: argparse.ArgumentParser, default: Any) -> None:
        # On the main parser and on each command (so both ``--db x list`` and ``list --db x`` work;
        # SUPPRESS keeps a command's absent option from hiding the main one's).
        group = parser.add_argument_group("where the streams are")
        group.add_argument("--db", metavar="PATH", default=default,
                           help="a SQLite file (default: $ASGI_STREAM_RECORDER_DB or ./streams.db)")
        group.add_argument("--url", default=default, help="sqlite:///path.db, postgresql://..., redis://... "
                           "(default: $ASGI_STREAM_RECORDER_URL)")

    def filters(parser: argparse.ArgumentParser, limit: int | None) -> None:
        parser.add_argument("--status", choices=[s.value for s in StreamStatus], help="only streams with this status")
        parser.add_argument("--key", help="only streams with this key")
        parser.add_argument("--since", type=since, metavar="WHEN",
                            help="only streams created since then: a duration ago (2h, 7d) or an ISO date")
        parser.add_argument("--limit", type=count, default=limit,
                            help=f"at most this many, newest first (default: {limit or 'all'})")

    main = argparse.ArgumentParser(
        prog=PROG, description="Look at the streams asgi_stream_recorder recorded: list, show, follow, export, "
        "replay, purge, stats.", epilog="Exit status: 0 ok, 1 error, 2 bad usage; tail: 3 failed, 4 cancelled, "
        "5 interrupted.")
    target(main, None)
    commands = main.add_subparsers(title="commands", dest="name", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[Recorder, argparse.Namespace], Awaitable[int]], text: str,
                ) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=text, description=text)
        target(parser, argparse.SUPPRESS)
        parser.set_defaults(run=run)
        return parser

    p = command("list", _list, "streams, newest first: id, status, created, TTFT, duration, chunks, text")
    filters(p, 50)
    p.add_argument("--json", action="store_true", help="a JSON array of the records instead of a table")
    p = command("show", _show, "one stream: its record, metadata and text")
    p.add_argument("id")
    p.add_argument("--chunks", action="store_true", help="also its chunks: seq, offset in ms, event, data")
    p.add_argument("--json", action="store_true", help="the record (and chunks) as JSON")
    p = command("tail", _tail, "print a stream's text as it arrives, until it ends")
    p.add_argument("id")
    p.add_argument("--after", type=int, default=0, metavar="N", help="start after chunk seq N (default: 0)")
    p = command("export", _export, "streams with their chunks as JSON Lines, one stream per line")
    filters(p, None)
    p.add_argument("--out", metavar="FILE", help="write there instead of stdout")
    p = command("replay", _replay, "print a stream's text with its original timing")
    p.add_argument("id")
    p.add_argument("--speed", type=positive, default=1.0, help="times faster than it was (default: 1)")
    p = command("purge", _purge, "delete finished streams older than a duration, chunks included")
    p.add_argument("--older-than", type=duration, required=True, metavar="AGE", help="30m, 12h, 7d, ...")
    p.add_argument("--status", action="append", choices=_FINISHED,
                   help="only streams with this status (repeatable; never streaming ones)")
    p.add_argument("--dry-run", action="store_true", help="count them, delete nothing")
    p = command("stats", _stats, "counts by status, TTFT and duration percentiles")
    filters(p, None)
    p.add_argument("--json", action="store_true", help="as JSON")
    return main


# -- where --------------------------------------------------------------------------------------
def _recorder(args: argparse.Namespace) -> Recorder:
    """The recorder the options and environment name; for SQLite, only a file that holds streams."""
    if args.db and args.url:
        raise CLIError("give --db or --url, not both", 2)
    url = args.url or (None if args.db else os.environ.get("ASGI_STREAM_RECORDER_URL"))
    if url:
        try:
            recorder = open_recorder(url)
        except ValueError as exc:
            raise CLIError(str(exc), 2) from None
        if isinstance(recorder, MemoryRecorder):
            raise CLIError("memory:// keeps streams inside one process: give --db or a sqlite:///, "
                           "postgresql:// or redis:// URL", 2)
    else:
        recorder = SQLiteRecorder(args.db or os.environ.get("ASGI_STREAM_RECORDER_DB") or "streams.db")
    if isinstance(recorder, SQLiteRecorder):
        _check_sqlite(recorder.path)
    return recorder


def _check_sqlite(path: str) -> None:
    """An existing SQLite file with the recorder's tables (opening it would otherwise create one)."""
    file = Path(path)
    try:
        with file.open("rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        raise CLIError(f"no database at {path} (nothing was created): give --db PATH or --url") from None
    except IsADirectoryError:
        raise CLIError(f"{path} is a directory, not a SQLite database") from None
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror or exc}") from None
    if header != _SQLITE_HEADER:
        raise CLIError(f"{path} is not a SQLite database")
    try:
        con = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)
        try:
            found = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'streams'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return  # (cannot look read-only, e.g. no -shm file may be made: the recorder's open says what is wrong)
    if found is None:
        raise CLIError(f"{path} is a SQLite database, but not one streams were recorded into")


def _where(recorder: Recorder) -> str:
    return recorder.path if isinstance(recorder, SQLiteRecorder) else repr(recorder.backend)


async def _record(recorder: Recorder, stream_id: str) -> StreamRecord:
    record = await recorder.get_soon(stream_id)
    if record is None:
        raise CLIError(f"no stream {stream_id!r} in {_where(recorder)}")
    return record


async def _select(recorder: Recorder, args: argparse.Namespace) -> list[StreamRecord]:
    """The records the filters pick, newest first (``--since`` without ``--limit``: read in
    growing pages until one reaches older streams, as listing takes no date)."""
    progress = _Progress("reading streams")
    try:
        if args.since is None or args.limit is not None:
            progress.update(0)
            records = await recorder.list_streams(args.status, _ALL if args.limit is None else args.limit,
                                                  key=args.key)
        else:
            ask = 256
            while True:
                progress.update(0)
                records = await recorder.list_streams(args.status, ask, key=args.key)
                if len(records) < ask or records[-1].created_at.timestamp() < args.since:
                    break
                ask *= 4
    finally:
        progress.close()
    return records if args.since is None else [r for r in records if r.created_at.timestamp() >= args.since]


# -- commands -----------------------------------------------------------------------------------
async def _list(recorder: Recorder, args: argparse.Namespace) -> int:
    records = await _select(recorder, args)
    if args.json:
        _print(json.dumps([_record_json(r) for r in records], ensure_ascii=False, indent=2))
        return 0
    if not records:
        print(f"{PROG}: no streams in {_where(recorder)}", file=sys.stderr)
        return 0
    rows = [[r.id, str(r.status), _when(r.created_at), _ms(r.metadata.get("ttft_ms")), _duration_of(r),
             str(r.chunk_count)] for r in records]
    header = ["ID", "STATUS", "CREATED", "TTFT", "DURATION", "CHUNKS"]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    room = shutil.get_terminal_size((160, 24)).columns - sum(w + 2 for w in widths) if sys.stdout.isatty() else 60
    for cells, record in zip([header, *rows], [None, *records], strict=True):
        text = "TEXT" if record is None else _preview(record.content, max(room, 10))
        line = "  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths,
                                                                                                      strict=True)))
        _print(f"{line}  {text}".rstrip())
    return 0


async def _show(recorder: Recorder, args: argparse.Namespace) -> int:
    record = await _record(recorder, args.id)
    chunks = await recorder.chunks(record.id) if args.chunks else []
    if args.json:
        found = _record_json(record)
        if args.chunks:
            found["chunks"] = [_chunk_json(c) for c in chunks]
        _print(json.dumps(found, ensure_ascii=False, indent=2))
        return 0
    fields = [("id", record.id), ("status", str(record.status)), ("created", _when(record.created_at)),
              ("completed", _when(record.completed_at)), ("ttft", _ms(record.metadata.get("ttft_ms"))),
              ("duration", _duration_of(record)), ("chunks", str(record.chunk_count)),
              ("request", " ".join(filter(None, [record.method, record.path])) or None), ("key", record.key),
              ("format", record.format), ("text event", record.text_event), ("error", record.error)]
    for label, value in fields:
        if value is not None:
            _print(f"{label:<11}{value}")
    metadata = json.dumps(record.metadata, ensure_ascii=False, indent=2, sort_keys=True)
    _print(f"{'metadata':<11}{metadata}".replace("\n", "\n" + " " * 11))
    _print("\n--- text ---")
    _print(record.content)
    if args.chunks:
        _print("--- chunks ---")
        _print(f"{'SEQ':>6}  {'OFFSET_MS':>10}  {'EVENT':<12}  DATA")
        for c in chunks:
            _print(f"{c.seq:>6}  {c.at_ms:>10.1f}  {c.event or '-':<12}  {json.dumps(c.data, ensure_ascii=False)}")
    return 0


async def _tail(recorder: Recorder, args: argparse.Namespace) -> int:
    record = await _record(recorder, args.id)
    follow = recorder.follow(record.id, max(args.after, 0))
    last = ""
    async for chunk in follow:
        if chunk.event == record.text_event and chunk.data:
            sys.stdout.write(chunk.data)
            sys.stdout.flush()
            last = chunk.data
    if sys.stdout.isatty() and last and not last.endswith("\n"):
        _print("")
    if follow.status is StreamStatus.COMPLETED:
        return 0
    status = follow.status or StreamStatus.INTERRUPTED
    print(f"{PROG}: stream {record.id} {status}{': ' + follow.error if follow.error else ''}", file=sys.stderr)
    return EXIT_STATUS.get(status, 1)


async def _export(recorder: Recorder, args: argparse.Namespace) -> int:
    records = await _select(recorder, args)
    # (blocking file writes, as to stdout: the command is the only task on its loop)
    out: TextIO = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: ASYNC230
    progress = _Progress("exported", len(records))
    try:
        for i, record in enumerate(records, 1):
            line = _record_json(record)
            line["chunks"] = [_chunk_json(c) for c in await recorder.chunks(record.id)]
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            progress.update(i)
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
    if args.out:
        print(f"{PROG}: exported {len(records)} streams to {args.out}", file=sys.stderr)
    return 0


async def _replay(recorder: Recorder, args: argparse.Namespace) -> int:
    record = await _record(recorder, args.id)
    start, last = anyio.current_time(), ""
    for chunk in await recorder.chunks(record.id):
        if chunk.event != record.text_event:
            continue
        await anyio.sleep(max(start + chunk.at_ms / 1000.0 / args.speed - anyio.current_time(), 0.0))
        sys.stdout.write(chunk.data)
        sys.stdout.flush()
        last = chunk.data or last
    if sys.stdout.isatty() and last and not last.endswith("\n"):
        _print("")
    return 0


async def _purge(recorder: Recorder, args: argparse.Namespace) -> int:
    count = await recorder.purge(args.older_than, args.status, dry_run=args.dry_run)
    cut = datetime.now() - timedelta(seconds=args.older_than)
    which = f" {'/'.join(args.status)}" if args.status else ""
    verb = "would purge" if args.dry_run else "purged"
    _print(f"{verb} {count}{which} stream{'' if count == 1 else 's'} created before {cut:%Y-%m-%d %H:%M:%S}")
    return 0


async def _stats(recorder: Recorder, args: argparse.Namespace) -> int:
    records = await _select(recorder, args)
    counts = Counter(r.status for r in records)
    figures = {name: _percentiles([r.metadata[f"{name}_ms"] for r in records if _number(r.metadata.get(f"{name}_ms"))])
               for name in ("ttft", "duration")}
    if args.json:
        _print(json.dumps({"streams": len(records), "by_status": {s.value: counts[s] for s in StreamStatus},
                           **{f"{name}_ms": f for name, f in figures.items()}}, indent=2))
        return 0
    _print(f"{'streams':<13}{len(records):>6}")
    for status in StreamStatus:
        if counts[status]:
            _print(f"  {status.value:<11}{counts[status]:>6}")
    _print("")
    columns = ["count", "p50", "p90", "p95", "p99", "max"]
    _print(f"{'':<13}" + "".join(f"{c:>11}" for c in columns))
    for name, label in (("ttft", "TTFT"), ("duration", "duration")):
        f = figures[name]
        _print(f"{label:<13}" + "".join(f"{f['count'] if c == 'count' else _ms(f[c]):>11}" for c in columns))
    return 0


# -- formatting ---------------------------------------------------------------------------------
def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _percentiles(values: list[float]) -> dict[str, Any]:
    """Nearest-rank percentiles (each one a value that occurred), in milliseconds."""
    ordered = sorted(values)

    def rank(p: float) -> float | None:
        return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)] if ordered else None

    return {"count": len(ordered), "p50": rank(50), "p90": rank(90), "p95": rank(95), "p99": rank(99),
            "max": ordered[-1] if ordered else None}


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment.astimezone():%Y-%m-%d %H:%M:%S}"


def _ms(value: Any) -> str:
    if not _number(value):
        return "-"
    if value < 1000:
        return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"
    return f"{value / 1000:.2f} s" if value < 60_000 else f"{value / 60_000:.1f} min"


def _duration_of(record: StreamRecord) -> str:
    if _number(record.metadata.get("duration_ms")):
        return _ms(record.metadata["duration_ms"])
    if record.completed_at is not None:
        return _ms((record.completed_at - record.created_at).total_seconds() * 1000)
    return "-"


def _preview(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _record_json(r: StreamRecord) -> dict[str, Any]:
    return {"id": r.id, "status": r.status.value, "created_at": _iso(r.created_at),
            "completed_at": _iso(r.completed_at), "content": r.content, "chunk_count": r.chunk_count,
            "error": r.error, "metadata": r.metadata, "path": r.path, "method": r.method, "key": r.key,
            "format": r.format, "text_event": r.text_event}


def _chunk_json(c: Chunk) -> dict[str, Any]:
    return {"seq": c.seq, "at_ms": c.at_ms, "event": c.event, "data": c.data}


class _Progress:
    """``label done/total`` on stderr, redrawn at most ten times a second, only on a terminal."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label, self.total = label, total
        self.shown = sys.stderr.isatty()
        self._drawn = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.shown and (now - self._drawn >= 0.1 or done == self.total):
            self._drawn = now
            count = "…" if self.total is None else f" {done}/{self.total}"
            sys.stderr.write(f"\r{self.label}{count}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.shown and self._drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# -- running ------------------------------------------------------------------------------------
def _secrets(url: str | None) -> list[str]:
    if not url:
        return []
    parts = urlsplit(url)
    found = [parts.password or ""] + [v for k, v in parse_qsl(parts.query) if k == "password"]
    return [s for s in {*found, *map(unquote, found)} if s]


def _message(exc: BaseException) -> str:
    if isinstance(exc, (CLIError, RecorderError, LookupError, ValueError, OSError)):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _one_line(text: str, url: str | None) -> str:
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return " ".join(text.split())


async def _run(args: argparse.Namespace) -> int:
    recorder = _recorder(args)
    async with recorder:
        code: int = await args.run(recorder, args)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = _parser().parse_args(argv)
    url = args.url or os.environ.get("ASGI_STREAM_RECORDER_URL")
    logging.basicConfig(format=f"{PROG}: %(message)s", level=logging.WARNING)
    try:
        return anyio.run(_run, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # (``| head``): quiet, as other tools are
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        while len(getattr(exc, "exceptions", ())) == 1:  # an exception group around one error
            exc = exc.exceptions[0]  # type: ignore[attr-defined]
        code = exc.code if isinstance(exc, CLIError) else 1
        print(f"{PROG}: error: {_one_line(_message(exc), url)}", file=sys.stderr)
        return code
