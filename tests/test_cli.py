"""The ``asgi-stream-recorder`` command, run as users run it: the installed console script in a
subprocess, against SQLite files filled by recording streams (and real PostgreSQL and Redis)."""

from __future__ import annotations

import json
import os
import pty
import queue
import select
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from asgi_stream_recorder import Recorder, SQLiteRecorder, StreamStatus, open_recorder
from asgi_stream_recorder.recorders.base import StreamEnd, StreamStart, process_owner
from asgi_stream_recorder.session import StreamSession
from tests.backends import Place, require

SCRIPT = Path(sys.executable).with_name("asgi-stream-recorder")
if not SCRIPT.exists():
    SCRIPT = Path(shutil.which("asgi-stream-recorder") or SCRIPT)


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the console script (with no recorder settings from this environment unless given)."""
    assert SCRIPT.exists(), f"{SCRIPT} is missing: pip install -e . installs the console script"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_STREAM_RECORDER_")}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**environ, **(env or {})})


def failed(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one line a failed command says (no traceback), checking its exit status."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("asgi-stream-recorder: ")
    return lines[0]


# -- filling databases ----------------------------------------------------------------------------
async def play(recorder: Recorder, words: Sequence[str], *, events: Sequence[str | None] | None = None,
               error: BaseException | None = None, client_left: bool = False, **options: Any) -> str:
    """Record a stream the way responses do, through a StreamSession."""
    session = StreamSession(recorder, path="/chat", method="POST", **options)
    session.begin()
    for i, word in enumerate(words):
        await anyio.sleep(0.01)
        session.stamp()
        await session.record(word, None if events is None else events[i])
    session.end(error=error, exhausted=error is None and not client_left, stopped_for_client=client_left)
    await anyio.sleep(0.005)  # distinct creation times
    return session.id


@dataclass
class Made:
    """A stream written with chosen times (what a session measures cannot be chosen)."""

    status: StreamStatus | None  # None: still streaming
    age: float = 0.0  # seconds since it was created
    words: Sequence[str] = ("x",)
    at_ms: Sequence[float] | None = None
    ttft_ms: float | None = None
    duration_ms: float | None = None
    id: str = ""


async def write(path: Path, streams: Sequence[Made]) -> list[str]:
    async with SQLiteRecorder(path) as rec:
        for s in streams:
            s.id = uuid.uuid4().hex
            created = time.time() - s.age
            rec.start(StreamStart(s.id, created, "/chat", "POST", {}, owner=process_owner()))
            for seq, word in enumerate(s.words, 1):
                assert rec.put_chunk(s.id, seq, word, None, s.at_ms[seq - 1] if s.at_ms else seq * 10.0)
            if s.status is not None:
                meta = {k: v for k, v in (("ttft_ms", s.ttft_ms), ("duration_ms", s.duration_ms)) if v is not None}
                rec.finish(StreamEnd(s.id, s.status, created + 1.0, "boom" if s.status == "failed" else None, meta))
        await rec.flush()
    return [s.id for s in streams]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A SQLite file with four recorded streams (read-only tests share it)."""
    path = tmp_path_factory.mktemp("cli") / "streams.db"

    async def fill() -> dict[str, str]:
        async with SQLiteRecorder(path) as rec:
            made = {
                "completed": await play(rec, ["Hello", ", ", "world", "!"], metadata={"model": "m-1"}, key="conv-1"),
                "failed": await play(rec, ["part", "ial"], error=RuntimeError("boom")),
                "cancelled": await play(rec, ["bye"], client_left=True),
                "events": await play(rec, ["a", '{"tool": 1}', "b"], events=["token", "tool", "token"],
                                     text_event="token", key="conv-1"),
            }
            await rec.flush()
        return made

    return path, anyio.run(fill)


NEWEST_FIRST = ["events", "cancelled", "failed", "completed"]


# -- reading ----------------------------------------------------------------------------------------
def test_python_m_and_the_console_script_print_help() -> None:
    for command in ([sys.executable, "-m", "asgi_stream_recorder", "--help"], [str(SCRIPT), "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: asgi-stream-recorder")
        for name in ("list", "show", "tail", "export", "replay", "purge", "stats"):
            assert f"\n    {name} " in result.stdout


def test_list_is_a_table_newest_first_with_full_ids(filled: tuple[Path, dict[str, str]]) -> None:
    path, made = filled
    result = cli("list", "--db", str(path))
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "CREATED", "TTFT", "DURATION", "CHUNKS", "TEXT"]
    assert [row.split()[0] for row in rows] == [made[name] for name in NEWEST_FIRST]
    assert [row.split()[1] for row in rows] == ["completed", "cancelled", "failed", "completed"]
    completed = rows[3]
    assert completed.endswith("Hello, world!") and " 4  " in completed and " ms" in completed
    assert rows[0].endswith("ab")  # only the text event's chunks
    assert cli("--db", str(path), "list").stdout == result.stdout  # the option before the command too


def test_list_filters_and_json(filled: tuple[Path, dict[str, str]]) -> None:
    path, made = filled

    def listed(*args: str) -> list[str]:
        result = cli("list", "--db", str(path), "--json", *args)
        assert result.returncode == 0, result.stderr
        return [r["id"] for r in json.loads(result.stdout)]

    assert listed() == [made[name] for name in NEWEST_FIRST]
    assert listed("--status", "failed") == [made["failed"]]
    assert listed("--key", "conv-1") == [made["events"], made["completed"]]
    assert listed("--limit", "2") == [made["events"], made["cancelled"]]
    assert listed("--since", "1h") == [made[name] for name in NEWEST_FIRST]
    assert listed("--since", "1h", "--limit", "1") == [made["events"]]
    assert listed("--since", (datetime.now() + timedelta(days=1)).date().isoformat()) == []
    records = json.loads(cli("list", "--db", str(path), "--json", "--status", "failed").stdout)
    assert records[0]["status"] == "failed" and records[0]["error"] == "RuntimeError: boom"
    assert records[0]["content"] == "partial" and records[0]["metadata"]["chunk_count"] == 2
    empty = cli("list", "--db", str(path), "--status", "interrupted")
    assert empty.returncode == 0 and empty.stdout == "" and "no streams" in empty.stderr
    assert cli("list", "--db", str(path), "--since", "yesterday").returncode == 2
    assert cli("list", "--db", str(path), "--limit", "-1").returncode == 2


def test_show_gives_record_metadata_text_and_chunks(filled: tuple[Path, dict[str, str]]) -> None:
    path, made = filled
    result = cli("show", made["completed"], "--db", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"id         {made['completed']}\n" in out
    assert "status     completed\n" in out and "request    POST /chat\n" in out and "key        conv-1\n" in out
    assert '"model": "m-1"' in out
    assert out.endswith("--- text ---\nHello, world!\n")

    chunked = cli("show", made["events"], "--chunks", "--db", str(path)).stdout
    text, table = chunked.split("--- chunks ---\n")
    assert text.endswith("--- text ---\nab\n")
    header, *rows = table.splitlines()
    assert header.split() == ["SEQ", "OFFSET_MS", "EVENT", "DATA"]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    assert [r.split()[2] for r in rows] == ["token", "tool", "token"]
    offsets = [float(r.split()[1]) for r in rows]
    assert offsets == sorted(offsets) and offsets[0] > 0
    assert rows[1].endswith('"{\\"tool\\": 1}"')

    shown = json.loads(cli("show", made["events"], "--chunks", "--json", "--db", str(path)).stdout)
    assert shown["content"] == "ab" and shown["text_event"] == "token"
    assert [(c["seq"], c["event"], c["data"]) for c in shown["chunks"]] == [
        (1, "token", "a"), (2, "tool", '{"tool": 1}'), (3, "token", "b")]


def test_export_writes_one_stream_per_line_with_its_chunks(filled: tuple[Path, dict[str, str]],
                                                           tmp_path: Path) -> None:
    path, made = filled
    result = cli("export", "--db", str(path))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == [made[name] for name in NEWEST_FIRST]
    for line in lines:
        assert {"id", "status", "content", "metadata", "created_at", "completed_at", "error", "chunks"} <= line.keys()
        assert [c["seq"] for c in line["chunks"]] == list(range(1, len(line["chunks"]) + 1))
        assert line["content"] == "".join(c["data"] for c in line["chunks"] if c["event"] == line["text_event"])
        assert datetime.fromisoformat(line["created_at"]) <= datetime.fromisoformat(line["completed_at"])
    assert lines[3]["content"] == "Hello, world!" and lines[2]["error"] == "RuntimeError: boom"

    out = tmp_path / "out.jsonl"
    to_file = cli("export", "--db", str(path), "--status", "completed", "--out", str(out))
    assert to_file.returncode == 0 and to_file.stdout == ""
    assert "exported 2 streams" in to_file.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [made["events"], made["completed"]]


def test_export_shows_progress_on_a_terminal(filled: tuple[Path, dict[str, str]]) -> None:
    path, _ = filled
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([str(SCRIPT), "export", "--db", str(path)], stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        shown = b""
        while True:  # until the terminal closes (EIO on Linux)
            ready, _, _ = select.select([master], [], [], 20)
            assert ready, "no end to the command's terminal output"
            try:
                piece = os.read(master, 4096)
            except OSError:
                break
            if not piece:
                break
            shown += piece
        out, _ = proc.communicate(timeout=20)
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert b"exported 4/4" in shown
    assert len(out.splitlines()) == 4  # stdout is the data alone


def test_replay_keeps_the_original_timing(tmp_path: Path) -> None:
    path = tmp_path / "streams.db"
    [sid] = anyio.run(write, path, [Made(StreamStatus.COMPLETED, words="abcd", at_ms=[0, 400, 800, 1200])])

    def gap(*args: str) -> float:
        proc = subprocess.Popen([str(SCRIPT), "replay", sid, "--db", str(path), *args], stdout=subprocess.PIPE)
        pieces = timed_output(proc, 20)
        assert proc.returncode == 0
        assert b"".join(p for _, p in pieces) == b"abcd"
        return pieces[-1][0] - pieces[0][0]

    assert 1.1 <= gap() <= 2.5
    assert 0.3 <= gap("--speed", "3") <= 0.9
    assert cli("replay", sid, "--db", str(path), "--speed", "0").returncode == 2


def timed_output(proc: subprocess.Popen[bytes], timeout: float) -> list[tuple[float, bytes]]:
    """What ``proc`` writes to stdout, each piece with when it arrived, until it exits."""
    assert proc.stdout is not None
    pieces, fd = [], proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            proc.kill()
            raise AssertionError(f"{proc.args!r} still running after {timeout} s")
        piece = os.read(fd, 65536)
        if not piece:
            break
        pieces.append((time.monotonic(), piece))
    proc.wait(timeout=10)
    return pieces


# -- following a live stream -----------------------------------------------------------------------
class Producer(threading.Thread):
    """Records a stream into ``path`` from another thread, a word every ``pace`` seconds, flushed each time."""

    def __init__(self, path: Path, words: Sequence[str], *, fail: bool = False, pace: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.path, self.words, self.fail, self.pace = path, words, fail, pace
        self.ids: queue.Queue[str] = queue.Queue()
        self.ended_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            anyio.run(self._produce)
        except BaseException as exc:
            self.error = exc

    async def _produce(self) -> None:
        async with SQLiteRecorder(self.path) as rec:
            session = StreamSession(rec)
            session.begin()
            await rec.flush()
            self.ids.put(session.id)
            for word in self.words:
                await anyio.sleep(self.pace)
                session.stamp()
                await session.record(word, None)
                await rec.flush()
            session.end(error=RuntimeError("model fell over") if self.fail else None, exhausted=not self.fail)
            await rec.flush()
            self.ended_at = time.monotonic()

    def __enter__(self) -> Producer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.join(20)
        assert not self.is_alive() and self.error is None, self.error


@pytest.fixture
def live_db(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "live.db"
    anyio.run(write, path, [Made(StreamStatus.COMPLETED)])  # the file exists before the stream starts
    yield path


def test_tail_follows_a_live_stream_and_exits_0_at_its_end(live_db: Path) -> None:
    words = ["The ", "answer ", "is ", "42."]
    with Producer(live_db, words) as producer:
        sid = producer.ids.get(timeout=10)
        proc = subprocess.Popen([str(SCRIPT), "tail", sid, "--url", f"sqlite:///{live_db}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        pieces = timed_output(proc, 30)
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert b"".join(p for _, p in pieces).decode() == "".join(words)
    assert pieces[0][0] < producer.ended_at - 0.3  # printed while the stream ran, not at its end
    after = cli("tail", sid, "--after", "2", "--db", str(live_db))
    assert after.returncode == 0 and after.stdout == "is 42."


def test_tail_exits_with_the_status_of_a_stream_that_did_not_complete(live_db: Path,
                                                                      filled: tuple[Path, dict[str, str]]) -> None:
    with Producer(live_db, ["half ", "an "], fail=True) as producer:
        sid = producer.ids.get(timeout=10)
        result = cli("tail", sid, "--db", str(live_db))
    assert result.returncode == 3
    assert result.stdout == "half an "
    assert result.stderr.strip() == f"asgi-stream-recorder: stream {sid} failed: RuntimeError: model fell over"

    path, made = filled
    cancelled = cli("tail", made["cancelled"], "--db", str(path))
    assert cancelled.returncode == 4 and cancelled.stdout == "bye" and "cancelled" in cancelled.stderr
    assert cli("tail", made["completed"], "--db", str(path)).stdout == "Hello, world!"


# -- stats and purge ---------------------------------------------------------------------------------
def test_stats_counts_by_status_and_percentiles(tmp_path: Path) -> None:
    path = tmp_path / "streams.db"
    completed = [Made(StreamStatus.COMPLETED, ttft_ms=10.0 * i, duration_ms=100.0 * i) for i in range(1, 11)]
    failures = [Made(StreamStatus.FAILED, duration_ms=2000.0), Made(StreamStatus.FAILED, duration_ms=3000.0)]
    anyio.run(write, path, [*completed, *failures])
    result = cli("stats", "--json", "--db", str(path))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["streams"] == 12
    assert stats["by_status"] == {"streaming": 0, "completed": 10, "failed": 2, "cancelled": 0, "interrupted": 0}
    assert stats["ttft_ms"] == {"count": 10, "p50": 50.0, "p90": 90.0, "p95": 100.0, "p99": 100.0, "max": 100.0}
    assert stats["duration_ms"] == {"count": 12, "p50": 600.0, "p90": 2000.0, "p95": 3000.0, "p99": 3000.0,
                                    "max": 3000.0}
    assert json.loads(cli("stats", "--json", "--status", "failed", "--db", str(path)).stdout)["streams"] == 2

    table = cli("stats", "--db", str(path)).stdout.splitlines()
    assert table[0].split() == ["streams", "12"]
    assert "  completed      10" in table and "  failed          2" in table
    assert table[-3].split() == ["count", "p50", "p90", "p95", "p99", "max"]
    assert table[-2].split() == ["TTFT", "10", "50", "ms", "90", "ms", "100", "ms", "100", "ms", "100", "ms"]
    assert table[-1].split()[:4] == ["duration", "12", "600", "ms"]


def test_purge_dry_run_then_for_real(tmp_path: Path) -> None:
    path = tmp_path / "streams.db"
    old = [Made(StreamStatus.COMPLETED, age=10 * 86400), Made(StreamStatus.COMPLETED, age=9 * 86400),
           Made(StreamStatus.FAILED, age=8 * 86400)]
    kept = [Made(None, age=10 * 86400, words="abc"), Made(StreamStatus.COMPLETED, age=3600)]
    anyio.run(write, path, [*old, *kept])

    def listed() -> set[str]:
        return {r["id"] for r in json.loads(cli("list", "--json", "--db", str(path)).stdout)}

    dry = cli("purge", "--older-than", "7d", "--dry-run", "--db", str(path))
    assert dry.returncode == 0 and dry.stdout.startswith("would purge 3 streams created before ")
    assert len(listed()) == 5
    failed_only = cli("purge", "--older-than", "7d", "--status", "failed", "--db", str(path))
    assert failed_only.stdout.startswith("purged 1 failed stream created before ")
    rest = cli("purge", "--older-than", "6d23h", "--db", str(path))
    assert rest.returncode == 0 and rest.stdout.startswith("purged 2 streams created before ")
    assert listed() == {s.id for s in kept}  # the old one still streaming stays
    with sqlite3.connect(path) as con:
        left = {r[0] for r in con.execute("SELECT DISTINCT stream_id FROM segments")}
    assert left == {s.id for s in kept}  # the purged streams' chunks went with them
    assert cli("purge", "--older-than", "7d", "--dry-run", "--db", str(path)).stdout.startswith("would purge 0 ")

    assert cli("purge", "--db", str(path)).returncode == 2  # --older-than is required
    assert cli("purge", "--older-than", "7w", "--db", str(path)).returncode == 2
    assert cli("purge", "--older-than", "7d", "--status", "streaming", "--db", str(path)).returncode == 2


# -- where, and errors ------------------------------------------------------------------------------
def test_the_environment_names_the_database(filled: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, made = filled
    by_db = cli("list", "--json", env={"ASGI_STREAM_RECORDER_DB": str(path)}, cwd=tmp_path)
    assert len(json.loads(by_db.stdout)) == 4
    by_url = cli("show", made["failed"], env={"ASGI_STREAM_RECORDER_URL": f"sqlite:///{path}"}, cwd=tmp_path)
    assert by_url.returncode == 0 and "status     failed" in by_url.stdout
    beaten = cli("list", "--json", "--db", str(path), env={"ASGI_STREAM_RECORDER_URL": "sqlite:///nowhere.db"},
                 cwd=tmp_path)
    assert len(json.loads(beaten.stdout)) == 4  # --db over the environment
    assert os.listdir(tmp_path) == []


def test_errors_are_one_line_and_create_nothing(filled: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, _ = filled
    assert "no stream 'nope'" in failed(cli("show", "nope", "--db", str(path)))
    assert "no stream 'nope'" in failed(cli("tail", "nope", "--db", str(path)))
    assert "no stream 'nope'" in failed(cli("replay", "nope", "--db", str(path)))

    missing = tmp_path / "sub" / "missing.db"
    for command in (["list"], ["stats"], ["export"], ["purge", "--older-than", "1d"], ["show", "x"]):
        assert f"no database at {missing}" in failed(cli(*command, "--db", str(missing)))
        assert f"no database at {missing}" in failed(cli(*command, "--url", f"sqlite:///{missing}"))
    assert "no database at streams.db" in failed(cli("list", cwd=tmp_path))  # the default, ./streams.db
    assert os.listdir(tmp_path) == []

    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    assert failed(cli("list", "--db", str(text))).endswith(f"{text} is not a SQLite database")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE things (x)")
    con.close()
    assert "not one streams were recorded into" in failed(cli("stats", "--db", str(other)))
    with sqlite3.connect(other) as con:
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["things"]  # left alone
    con.close()
    assert "is a directory" in failed(cli("list", "--db", str(tmp_path)))

    assert "not both" in failed(cli("list", "--db", str(path), "--url", f"sqlite:///{path}"), 2)
    assert "memory://" in failed(cli("list", "--url", "memory://"), 2)
    assert "unknown recorder URL scheme" in failed(cli("list", "--url", "mysql://db/x"), 2)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_server_is_one_line_without_the_password() -> None:
    port = closed_port()
    pg = failed(cli("list", "--url", f"postgresql://postgres:Sup3rSecret@127.0.0.1:{port}/test"))
    assert "cannot connect to PostgreSQL" in pg and f"127.0.0.1:{port}" in pg and "Sup3rSecret" not in pg
    pg_query = failed(cli("stats", "--url", f"postgresql://postgres@127.0.0.1:{port}/test?password=Sup3rSecret"))
    assert "cannot connect to PostgreSQL" in pg_query and "Sup3rSecret" not in pg_query
    redis = failed(cli("export", "--url", f"redis://:Sup3rSecret@127.0.0.1:{port}/0"))
    assert "cannot connect to Redis" in redis and "Sup3rSecret" not in redis


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_the_commands_read_postgres_and_redis(kind: str, tmp_path: Path) -> None:
    require(kind)
    place = Place(kind, tmp_path)

    async def fill() -> list[str]:
        async with open_recorder(place.url) as rec:
            made = [await play(rec, ["Hi ", "there"], key="k"), await play(rec, ["no"], error=RuntimeError("x"))]
            await rec.flush()
        return made

    try:
        ok, bad = anyio.run(fill)
        listed = cli("list", "--url", place.url)
        assert listed.returncode == 0, listed.stderr
        assert [row.split()[:2] for row in listed.stdout.splitlines()[1:]] == [[bad, "failed"], [ok, "completed"]]
        assert cli("show", ok, "--url", place.url).stdout.endswith("--- text ---\nHi there\n")
        assert cli("tail", ok, "--url", place.url).stdout == "Hi there"
        exported = [json.loads(line) for line in cli("export", "--url", place.url).stdout.splitlines()]
        assert [len(line["chunks"]) for line in exported] == [1, 2]
        purged = cli("purge", "--older-than", "0s", "--status", "failed", "--url", place.url)
        assert purged.stdout.startswith("purged 1 failed stream ")
        assert [r["id"] for r in json.loads(cli("list", "--json", "--url", place.url).stdout)] == [ok]
    finally:
        anyio.run(place.remove)
