"""The manual recording API: ``async with recorder.stream(...) as s: await s.append(text)`` (issue 13).

First with no server at all (MemoryRecorder and SQLiteRecorder, asyncio and trio): what is
recorded, how each way of ending becomes a status, bad input, live following and cancel
requests. Then over a real server (uvicorn on asyncio, hypercorn on trio) with the middleware
and ``streams_app``: a real httpx client joins a manual stream live, stops one, and a lifespan
shutdown ends one ``interrupted``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import ObjectReceiveStream
from httpx_sse import aconnect_sse
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_stream_recorder import (
    ManualStream,
    MemoryRecorder,
    Recorder,
    ServerSentEvent,
    SQLiteRecorder,
    StreamRecorderMiddleware,
    StreamStatus,
    current_stream,
    recorded_stream,
    streams_app,
)
from asgi_stream_recorder.manual import StreamEnded
from asgi_stream_recorder.recorders.base import Chunk, StreamRecord

from .servers import serve

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds: the bound of every wait
SLEEP = 0.03


@pytest.fixture(params=["memory", "sqlite"])
def recorder(request: pytest.FixtureRequest, tmp_path: Path) -> Recorder:
    return MemoryRecorder() if request.param == "memory" else SQLiteRecorder(tmp_path / "streams.db")


async def read_back(rec: Recorder, sid: str) -> tuple[StreamRecord, list[Chunk]]:
    with anyio.fail_after(WAIT):
        await rec.flush()
        record = await rec.get(sid)
        assert record is not None
        return record, await rec.chunks(sid)


# -- with no server: what is recorded ----------------------------------------------------------------

async def test_a_manual_stream_records_what_it_appends_with_timings_and_counts(recorder: Recorder) -> None:
    async with recorder as rec:
        s = rec.stream(metadata={"input_method": "voice"}, key="conv-1")
        assert isinstance(s, ManualStream) and s.status is None and s.seq == 0
        sid = s.id  # known before the block: it can be handed out first
        async with s as entered:
            assert entered is s and s.status is StreamStatus.STREAMING and not s.ended
            await anyio.sleep(SLEEP)
            seqs = [await s.append(item) for item in ("Hel", "lo", b" w\xc3\xb6rld", {"a": 1}, [1, "x"])]
            s.metadata["confidence"] = 0.95
            await anyio.sleep(SLEEP)
        assert seqs == [1, 2, 3, 4, 5] and s.seq == 5
        assert s.status is StreamStatus.COMPLETED and s.ended and not s.cancelled and s.error is None
        record, chunks = await read_back(rec, sid)
    texts = ["Hel", "lo", " wörld", '{"a":1}', '[1,"x"]']
    assert [(c.seq, c.data, c.event) for c in chunks] == [(i, t, None) for i, t in enumerate(texts, 1)]
    assert record.status is StreamStatus.COMPLETED and record.error is None
    assert record.content == "Hello wörld{\"a\":1}[1,\"x\"]" and record.chunk_count == 5
    assert (record.key, record.format, record.path, record.method) == ("conv-1", "sse", None, None)
    meta = record.metadata
    assert meta["input_method"] == "voice" and meta["confidence"] == 0.95
    assert meta["chunk_count"] == 5 and meta["char_count"] == sum(map(len, texts))
    assert meta["ttft_ms"] >= SLEEP * 1000 and meta["ttft_ms"] == pytest.approx(chunks[0].at_ms, abs=0.01)
    assert meta["duration_ms"] >= meta["ttft_ms"] + SLEEP * 1000
    assert [c.at_ms for c in chunks] == sorted(c.at_ms for c in chunks)


async def test_server_sent_events_keep_their_names_and_only_text_events_make_the_content(recorder: Recorder) -> None:
    async with recorder as rec:
        async with rec.stream(text_event="token") as s:
            await s.append("a")
            await s.append(ServerSentEvent("b", event="token"))
            await s.append(ServerSentEvent({"tool": "search"}, event="tool", retry=500))
            await s.append(ServerSentEvent("c"))  # no name: the stream's text event
        record, chunks = await read_back(rec, s.id)
    assert [(c.data, c.event) for c in chunks] == [
        ("a", "token"), ("b", "token"), ('{"tool":"search"}', "tool"), ("c", "token")]
    assert record.content == "abc" and record.text_event == "token" and record.chunk_count == 4


async def test_complete_and_fail_merge_keyword_metadata_and_the_first_end_counts(recorder: Recorder) -> None:
    async with recorder as rec:
        done = rec.stream()
        async with done:
            await done.append("answer")
            assert await done.complete(finish_reason="stop", total_tokens=573) is StreamStatus.COMPLETED
            with pytest.raises(StreamEnded, match=rf"^stream {done.id} has ended \(completed\)"):
                await done.append("more")
            assert await done.fail("too late", error_code="LATE") is StreamStatus.COMPLETED
            assert await done.cancel(why="late") is StreamStatus.COMPLETED
        assert done.status is StreamStatus.COMPLETED and done.seq == 1
        failed = rec.stream()
        async with failed:
            await failed.append("half")
            with pytest.raises(TypeError, match="error must be a str or an exception, not int"):
                await failed.fail(42)  # type: ignore[arg-type]
            assert failed.status is StreamStatus.STREAMING
            assert await failed.fail("Connection lost", error_code="NETWORK_ERROR") is StreamStatus.FAILED
        raised = rec.stream()
        async with raised:
            assert await raised.fail(ConnectionError("reset by peer")) is StreamStatus.FAILED
        done_record, done_chunks = await read_back(rec, done.id)
        failed_record, _ = await read_back(rec, failed.id)
        raised_record, _ = await read_back(rec, raised.id)
    assert [c.data for c in done_chunks] == ["answer"] and done_record.chunk_count == 1  # nothing twice
    assert done_record.status is StreamStatus.COMPLETED and done_record.error is None
    assert done_record.metadata["finish_reason"] == "stop" and done_record.metadata["total_tokens"] == 573
    assert not {"error_code", "why"} & done_record.metadata.keys()
    assert failed_record.status is StreamStatus.FAILED and failed_record.error == "Connection lost"
    assert failed_record.metadata["error_code"] == "NETWORK_ERROR" and failed_record.content == "half"
    assert raised_record.error == "ConnectionError: reset by peer" and raised.error == raised_record.error


async def test_an_exception_in_the_block_fails_the_stream_and_is_re_raised(recorder: Recorder) -> None:
    async with recorder as rec:
        s = rec.stream()
        with pytest.raises(ValueError, match="transcriber broke"):
            async with s:
                await s.append("partial")
                raise ValueError("transcriber broke")
        assert s.status is StreamStatus.FAILED
        record, chunks = await read_back(rec, s.id)
    assert record.status is StreamStatus.FAILED and record.error == "ValueError: transcriber broke"
    assert record.content == "partial" and [c.seq for c in chunks] == [1]


async def test_cancellation_from_outside_ends_the_stream_interrupted(recorder: Recorder) -> None:
    async with recorder as rec:
        s = rec.stream()
        with anyio.move_on_after(SLEEP) as scope:  # e.g. a job's deadline
            async with s:
                await s.append("a")
                await anyio.sleep(WAIT)
        assert scope.cancelled_caught and s.status is StreamStatus.INTERRUPTED
        cancelled = rec.stream()
        with anyio.CancelScope() as outer:
            async with cancelled:
                outer.cancel()
                await anyio.sleep(WAIT)
        assert outer.cancelled_caught
        record, _ = await read_back(rec, s.id)
        other, _ = await read_back(rec, cancelled.id)
    assert record.status is StreamStatus.INTERRUPTED and record.error is None and record.content == "a"
    assert "cancelled_by" not in record.metadata and record.metadata["chunk_count"] == 1
    assert other.status is StreamStatus.INTERRUPTED and other.chunk_count == 0


async def test_an_item_that_cannot_be_recorded_raises_and_records_nothing(recorder: Recorder) -> None:
    async with recorder as rec:
        async with rec.stream() as s:
            with pytest.raises(TypeError, match=r"cannot record an item of type builtins\.int"):
                await s.append(42)
            with pytest.raises(TypeError, match=r"builtins\.object"):
                await s.append(object())
            with pytest.raises(ValueError, match=r"ServerSentEvent\.id is assigned by the recorder"):
                await s.append(ServerSentEvent("x", id="7"))
            with pytest.raises(ValueError, match="without data"):
                await s.append(ServerSentEvent(comment="keep-alive"))
            with pytest.raises(ValueError, match="not valid UTF-8"):
                await s.append(b"\xff")
            assert s.seq == 0 and s.status is StreamStatus.STREAMING  # the stream goes on
            assert await s.append("ok") == 1
        record, chunks = await read_back(rec, s.id)
    assert [(c.seq, c.data) for c in chunks] == [(1, "ok")] and record.status is StreamStatus.COMPLETED


async def test_misuse_is_refused_clearly(recorder: Recorder) -> None:
    with pytest.raises(TypeError, match="key must be a str"):
        recorder.stream(key=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metadata must be a mapping"):
        recorder.stream(metadata=[("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not contain"):
        recorder.stream(text_event="to\nken")
    with pytest.raises(ValueError, match="stream id"):
        recorder.stream(id="a/b")
    async with recorder as rec:
        s = rec.stream(id="job-42")
        with pytest.raises(RuntimeError, match="not started"):
            await s.append("early")
        with pytest.raises(RuntimeError, match="not started"):
            await s.complete()
        async with s:
            assert s.id == "job-42"
            with pytest.raises(ValueError, match="exists already"):
                async with rec.stream(id="job-42"):
                    pass
        with pytest.raises(RuntimeError, match="runs once"):
            async with s:
                pass
        with pytest.raises(ValueError, match="exists already"):  # stored (ended): not reused either
            async with rec.stream(id="job-42"):
                pass
        record, _ = await read_back(rec, "job-42")
    assert record.status is StreamStatus.COMPLETED


async def test_current_stream_inside_the_block_and_a_cancel_from_elsewhere_does_not_touch_the_canceller(
    recorder: Recorder,
) -> None:
    async with recorder as rec:
        async with rec.stream() as outer, anyio.create_task_group() as tg:
            current_stream().metadata["set_through"] = "current_stream"
            assert current_stream().id == outer.id and outer.metadata["set_through"] == "current_stream"
            started, leave = anyio.Event(), anyio.Event()
            inner: list[ManualStream] = []

            async def produce() -> None:
                async with rec.stream() as s:
                    inner.append(s)
                    assert current_stream().id == s.id
                    started.set()
                    await leave.wait()
                assert current_stream().id == outer.id  # this task's context had the outer stream

            tg.start_soon(produce)
            with anyio.fail_after(WAIT):
                await started.wait()
            assert await rec.cancel(inner[0].id) is True
            assert current_stream().id == outer.id  # ended from here: our current stream is untouched
            leave.set()
        with pytest.raises(LookupError):
            current_stream()
        record, _ = await read_back(rec, outer.id)
    assert record.metadata["set_through"] == "current_stream" and inner[0].status is StreamStatus.CANCELLED


# -- following and stopping, in-process ---------------------------------------------------------------------

async def test_recorder_follow_gets_each_chunk_as_it_is_appended_then_the_end(recorder: Recorder) -> None:
    async with recorder as rec:
        send, receive = anyio.create_memory_object_stream[Chunk](10)
        async with rec.stream() as s:
            follow = rec.follow(s.id)

            async def follower() -> None:
                async with send:
                    async for chunk in follow:
                        await send.send(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(follower)
                for seq, token in enumerate(["one", " two", " three"], 1):
                    assert await s.append(token) == seq
                    with anyio.fail_after(WAIT):
                        chunk = await receive.receive()
                    assert (chunk.stream_id, chunk.seq, chunk.data) == (s.id, seq, token)
                assert follow.status is None  # still running
                await s.complete()
                with anyio.fail_after(WAIT):
                    rest = [chunk async for chunk in receive]
        assert rest == [] and follow.status is StreamStatus.COMPLETED


async def test_a_cancel_request_ends_it_at_once_and_the_next_append_raises(recorder: Recorder) -> None:
    async with recorder as rec:
        s = rec.stream()
        with pytest.raises(StreamEnded, match=r"has ended \(cancelled\)"):
            async with s:
                await s.append("a")
                assert await rec.cancel(s.id) is True
                assert s.cancelled and s.ended and s.status is StreamStatus.CANCELLED
                record, _ = await read_back(rec, s.id)  # written while the producer still runs
                assert record.status is StreamStatus.CANCELLED
                await s.append("b")
        assert s.status is StreamStatus.CANCELLED  # leaving with StreamEnded changed nothing
        assert await rec.cancel(s.id) is False
        record, chunks = await read_back(rec, s.id)
    assert record.metadata["cancelled_by"] == "request" and record.error is None
    assert [c.data for c in chunks] == ["a"] and record.chunk_count == 1


async def test_with_no_open_recorder_each_end_is_durable_when_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "streams.db"
    rec = SQLiteRecorder(path)  # nobody opens or closes it: a script, a worker
    try:
        s = rec.stream(key="k")
        async with s:
            await s.append("early")
            await s.complete(finish_reason="stop")
            async with SQLiteRecorder(path) as reader:  # another connection sees it: it was flushed
                record = await reader.get(s.id)
            assert record is not None and record.status is StreamStatus.COMPLETED and record.content == "early"
        with pytest.raises(ValueError):
            async with rec.stream() as failing:
                await failing.append("x")
                raise ValueError("worker crashed")
        async with SQLiteRecorder(path) as reader:
            failed = await reader.get(failing.id)
        assert failed is not None and failed.status is StreamStatus.FAILED and failed.content == "x"
    finally:
        await rec.close()


# -- over a real server ---------------------------------------------------------------------------------

TOKENS = ["Hel", "lo", " there"]


class TranscribeApp:
    """An endpoint that starts a manual stream fed by the test and answers its id at once (the
    stream is produced in the request's background task); a decorated twin; ``/streams``."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.feeds: dict[str, ObjectReceiveStream[str]] = {}
        self.made: dict[str, ManualStream] = {}

        async def transcribe(request: Request) -> JSONResponse:
            s = rec.stream(metadata={"input_method": "voice"}, key=request.query_params["conv"])
            self.made[s.id] = s
            feed = self.feeds[request.query_params["feed"]]

            async def produce() -> None:
                async with s, feed:
                    async for text in feed:
                        if s.ended:  # stopped from elsewhere
                            break
                        await s.append(text)

            return JSONResponse({"stream_id": s.id}, background=BackgroundTask(produce))

        @recorded_stream(recorder=rec, ping=None)
        async def decorated(request: Request) -> AsyncIterator[str]:
            for token in TOKENS:
                yield token

        inner = Starlette(routes=[
            Route("/transcribe", transcribe, methods=["POST"]),
            Route("/decorated", decorated),
            Mount("/streams", streams_app(recorder=rec)),
        ])
        self.middleware = StreamRecorderMiddleware(inner, recorder=rec, handle_signals=False)

    def feed(self, name: str) -> anyio.abc.ObjectSendStream[str]:
        send, receive = anyio.create_memory_object_stream[str](10)
        self.feeds[name] = receive
        return send


async def next_event(events: AsyncIterator[Any]) -> Any:
    with anyio.fail_after(WAIT):
        return await events.__anext__()


async def test_a_client_joins_a_manual_stream_live_through_the_streams_app(tmp_path: Path) -> None:
    rec = SQLiteRecorder(tmp_path / "streams.db")
    app = TranscribeApp(rec)
    feed = app.feed("a")
    async with serve(app.middleware) as url, httpx.AsyncClient(timeout=WAIT) as client:
        sid = (await client.post(f"{url}/transcribe?feed=a&conv=c1")).json()["stream_id"]
        async with aconnect_sse(client, "GET", f"{url}/streams/{sid}/events") as source:
            assert source.response.status_code == 200
            events = source.aiter_sse()
            for seq, token in enumerate(TOKENS, 1):
                await feed.send(token)  # the next token only once the client has the last one: live
                event = await next_event(events)
                assert (event.id, event.event, event.data) == (f"{sid}:{seq}", "message", token)
            await feed.aclose()  # the transcription ends: the block is left, completed
            done = await next_event(events)
            assert done.event == "done" and json.loads(done.data) == {"stream_id": sid, "status": "completed"}
        body = (await client.get(f"{url}/streams/{sid}")).json()
        twin = await client.get(f"{url}/decorated")
        assert twin.status_code == 200, twin.text
        twin_record = await rec.get_soon(twin.headers["x-stream-id"])
    assert app.made[sid].status is StreamStatus.COMPLETED
    assert body["status"] == "completed" and body["content"] == "Hello there" and body["key"] == "c1"
    assert body["chunk_count"] == 3 and body["format"] == "sse" and body["metadata"]["input_method"] == "voice"
    # the same record as a decorated stream of the same tokens: content, counts, the same metadata
    assert twin_record is not None and twin_record.content == body["content"]
    assert set(body["metadata"]) - {"input_method"} == set(twin_record.metadata)
    for name in ("chunk_count", "char_count"):
        assert body["metadata"][name] == twin_record.metadata[name]


async def test_a_client_stops_a_manual_stream_through_the_streams_app(tmp_path: Path) -> None:
    rec = SQLiteRecorder(tmp_path / "streams.db")
    app = TranscribeApp(rec)
    feed = app.feed("a")
    async with serve(app.middleware) as url, httpx.AsyncClient(timeout=WAIT) as client:
        sid = (await client.post(f"{url}/transcribe?feed=a&conv=c1")).json()["stream_id"]
        async with aconnect_sse(client, "GET", f"{url}/streams/{sid}/events") as source:
            events = source.aiter_sse()
            await feed.send("Hel")
            assert (await next_event(events)).data == "Hel"
            stop = await client.post(f"{url}/streams/{sid}/cancel")
            assert stop.status_code == 202 and stop.json() == {"stream_id": sid, "cancelled": True}
            done = await next_event(events)  # the joined client hears of it at once
            assert done.event == "done" and json.loads(done.data)["status"] == "cancelled"
        assert app.made[sid].cancelled
        await feed.send("lo")  # the producer sees s.ended and stops
        await feed.aclose()
        body = (await client.get(f"{url}/streams/{sid}")).json()
    assert body["status"] == "cancelled" and body["content"] == "Hel" and body["chunk_count"] == 1
    assert body["metadata"]["cancelled_by"] == "request"


async def read_over_http(client: httpx.AsyncClient, url: str, *, content: str) -> Any:
    """A record as ``GET /streams/{id}`` answers it, once its content is ``content`` (polled, bounded)."""
    with anyio.fail_after(WAIT):
        while True:
            body = (await client.get(url)).json()
            if body["content"] == content:
                return body
            await anyio.sleep(0.02)


async def test_a_lifespan_shutdown_ends_a_running_manual_stream_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "streams.db"
    rec = SQLiteRecorder(path)
    app = TranscribeApp(rec)
    send, receive = anyio.create_memory_object_stream[str](10)
    outcome: list[BaseException] = []
    stopped = anyio.Event()
    s = rec.stream(metadata={"job": "transcribe"})

    async def produce() -> None:  # a job of this process, not a request: the server does not wait for it
        try:
            async with s, receive:
                async for text in receive:
                    await s.append(text)
        except StreamEnded as exc:
            outcome.append(exc)
            stopped.set()

    async with anyio.create_task_group() as tg:
        async with serve(app.middleware) as url, httpx.AsyncClient(timeout=WAIT) as client:
            assert rec.host is app.middleware
            tg.start_soon(produce)
            await send.send("said before")
            body = await read_over_http(client, f"{url}/streams/{s.id}", content="said before")
            assert body["status"] == "streaming"
        # the server is gone: its lifespan shutdown ended the stream, the producer still runs
        assert s.status is StreamStatus.INTERRUPTED and rec.host is None
        await send.send("said after")
        with anyio.fail_after(WAIT):
            await stopped.wait()
        await send.aclose()
    assert "has ended (interrupted)" in str(outcome[0])
    async with SQLiteRecorder(path) as reader:
        record = await reader.get(s.id)
        chunks = await reader.chunks(s.id)
    assert record is not None and record.status is StreamStatus.INTERRUPTED and record.error is None
    assert [c.data for c in chunks] == ["said before"] and record.metadata["job"] == "transcribe"


async def test_no_manual_stream_starts_while_the_middleware_shuts_down(tmp_path: Path) -> None:
    rec = SQLiteRecorder(tmp_path / "streams.db")
    app = TranscribeApp(rec)
    async with serve(app.middleware):
        async with rec.stream() as running:
            app.middleware.begin_shutdown()  # what SIGTERM does, before the server's own shutdown
            assert running.status is StreamStatus.INTERRUPTED
            with pytest.raises(RuntimeError, match="the server is shutting down"):
                async with rec.stream():
                    pass
    async with SQLiteRecorder(tmp_path / "streams.db") as reader:
        record = await reader.get(running.id)
    assert record is not None and record.status is StreamStatus.INTERRUPTED
