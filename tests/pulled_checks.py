"""What every framework adapter must do, checked against a served app (``tests/test_django.py``,
``tests/test_quart.py``): both test apps have the same routes (``/chat``, ``/chat/<name>``,
``/post``), served by uvicorn in a process of its own, and are read by a real httpx client; the
record, read from the app's SQLite file afterwards, must say what the client saw."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
from httpx_sse import aconnect_sse

from asgi_stream_recorder import SQLiteRecorder, StreamRecord, StreamStatus
from asgi_stream_recorder.recorders.base import Chunk

from .servers import AppServer

WAIT = 10


@dataclass
class Served:
    """A served test app: its URL, its SQLite file, the folder its routes leave marks in."""

    url: str
    db: Path
    marks: Path
    app: AppServer


async def record_of(served: Served, stream_id: str) -> tuple[StreamRecord, list[Chunk]]:
    """The stream's record and chunks once it has ended (bounded wait)."""
    async with SQLiteRecorder(served.db) as recorder:
        with anyio.fail_after(WAIT):
            while True:
                record = await recorder.get(stream_id)
                if record is not None and record.finished:
                    return record, await recorder.chunks(stream_id)
                await anyio.sleep(0.02)


async def wait_for_file(path: Path) -> None:
    with anyio.fail_after(WAIT):
        while not path.exists():  # noqa: ASYNC110, ASYNC240 - another process writes it
            await anyio.sleep(0.02)


async def incremental_and_exact(served: Served) -> None:
    """The generator waits after its first token until the test opens its gate: the client must
    have the first event by then (nothing buffered by the framework, its middleware or gzip)."""
    async with httpx.AsyncClient(timeout=WAIT) as client, \
            aconnect_sse(client, "GET", f"{served.url}/chat?n=4&gate=1&tag=inc") as source:
        headers = source.response.headers
        assert headers["content-type"].startswith("text/event-stream") and "content-encoding" not in headers
        assert headers["cache-control"] == "no-cache, no-transform"
        stream_id = headers["x-stream-id"]
        events = source.aiter_sse()
        first = await events.__anext__()
        assert (first.id, first.data) == ("1", "token 0 ")
        (served.marks / "inc.gate").write_text("open")
        rest = [event async for event in events]
    data = [(e.id, e.data) for e in rest if e.event == "message"]
    assert data == [("2", "token 1 "), ("3", "token 2 "), ("4", "token 3 ")]
    assert rest[-1].event == "done"
    record, chunks = await record_of(served, stream_id)
    assert record.status is StreamStatus.COMPLETED
    assert [(str(c.seq), c.data) for c in chunks] == [(first.id, first.data), *data]
    assert record.metadata["user_agent"].startswith("python-httpx")
    assert (served.marks / "inc.finally").exists()


async def hang_up_cancels(served: Served) -> None:
    """The client closes its connection after three events: the generator stops, its
    ``finally`` runs, and the record says the client left."""
    async with httpx.AsyncClient(timeout=WAIT) as client, \
            aconnect_sse(client, "GET", f"{served.url}/chat?n=100000&delay=0.02&tag=gone") as source:
        stream_id = source.response.headers["x-stream-id"]
        seen = []
        async for event in source.aiter_sse():
            seen.append(event.data)
            if len(seen) == 3:
                break
    await wait_for_file(served.marks / "gone.finally")
    record, chunks = await record_of(served, stream_id)
    assert record.status is StreamStatus.CANCELLED
    assert "client_disconnected_at_ms" in record.metadata and "cancelled_by" not in record.metadata
    assert [c.data for c in chunks[:3]] == seen
    assert len(chunks) < 1000  # stopped, not run to its end


async def post_body_and_key(served: Served) -> None:
    """A POST's JSON body streamed back as named events; a path parameter as the stream's key."""
    async with httpx.AsyncClient(timeout=WAIT) as client:
        async with aconnect_sse(client, "POST", f"{served.url}/post", json={"words": ["a", "b\nc", "d"]}) as source:
            sid = source.response.headers["x-stream-id"]
            events = [event async for event in source.aiter_sse()]
        assert [(e.event, e.data) for e in events[:-1]] == [("word", "a"), ("word", "b\nc"), ("word", "d")]
        async with aconnect_sse(client, "GET", f"{served.url}/chat/alice") as source:
            named = source.response.headers["x-stream-id"]
            assert [e.data async for e in source.aiter_sse()][:1] == ["hello alice"]
    record, chunks = await record_of(served, sid)
    assert [c.data for c in chunks] == ["a", "b\nc", "d"] and record.text_event == "word"
    record, _ = await record_of(served, named)
    assert record.key == "alice" and record.path == "/chat/alice"


async def sigterm_interrupts(served: Served) -> None:
    """Under the middleware, a SIGTERM mid-stream ends the stream ``interrupted`` with every
    chunk the client got, which gets the shutdown event."""
    async with httpx.AsyncClient(timeout=WAIT) as client, \
            aconnect_sse(client, "GET", f"{served.url}/chat?n=100000&delay=0.02&tag=term") as source:
        running = source.response.headers["x-stream-id"]
        events = source.aiter_sse()
        seen = [(await events.__anext__()).data for _ in range(3)]
        served.app.stop()
        rest = [event async for event in events]
    assert rest[-1].event == "shutdown"
    seen += [e.data for e in rest if e.event == "message"]
    record, chunks = await record_of(served, running)
    assert record.status is StreamStatus.INTERRUPTED
    assert [c.data for c in chunks] == seen
    assert (served.marks / "term.finally").exists()
