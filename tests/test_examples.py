"""The examples under real servers, without a browser: each serves its page, streams over GET
and POST (resumable: ids ``<stream id>:<seq>``, a final ``event: done``), records every
stream, and mounts the streams app at ``/streams``: the list, one record, a live join (the
watch page), a resume after a hang-up, and the Stop button's cancel."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from asgi_stream_recorder import SQLiteRecorder, StreamRecord, StreamStatus
from examples.fastapi import create_app as create_fastapi_app
from examples.litestar import create_app as create_litestar_app

from .servers import serve

pytestmark = pytest.mark.anyio

EXAMPLES: dict[str, Callable[..., Any]] = {"fastapi": create_fastapi_app, "litestar": create_litestar_app}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples pick the OpenAI source when a key is set: these tests use the offline one."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
                 "ANTHROPIC_MODEL"):
        monkeypatch.delenv(name, raising=False)


class Read:
    """What a client read of one event stream: its id, the data events, the final event."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.texts: list[str] = []
        self.ids: list[str] = []
        self.retry: int | None = None
        self.final: ServerSentEvent | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def take(self, event: ServerSentEvent) -> None:
        if event.retry is not None and not event.data:  # the resumable stream's retry hint
            self.retry = event.retry
        elif event.event == "message":
            assert self.final is None, "a data event after the final event"
            self.texts.append(event.data)
            self.ids.append(event.id)
        else:
            assert self.final is None, "two final events"
            self.final = event


async def read_stream(client: httpx.AsyncClient, method: str, url: str, *, stop_after: int | None = None,
                      **kwargs: Any) -> Read:
    """Read an event stream to its end (or hang up after ``stop_after`` data events)."""
    async with aconnect_sse(client, method, url, **kwargs) as source:
        assert source.response.status_code == 200, source.response.status_code
        read = Read(source.response.headers["x-stream-id"])
        async for event in source.aiter_sse():
            read.take(event)
            if stop_after is not None and len(read.texts) == stop_after:
                break
    return read


def assert_resumable_ids(read: Read, first_seq: int = 1) -> None:
    """Each data event's id is ``<stream id>:<seq>``, seqs consecutive from ``first_seq``."""
    assert read.ids == [f"{read.stream_id}:{seq}" for seq in range(first_seq, first_seq + len(read.ids))]


def done_data(read: Read) -> dict[str, Any]:
    assert read.final is not None and read.final.event == "done", read.final
    data: dict[str, Any] = json.loads(read.final.data)
    return data


async def settled(client: httpx.AsyncClient, url: str, count: int) -> list[dict[str, Any]]:
    """The streams app's list once ``count`` streams exist and none is still streaming."""
    with anyio.fail_after(5):
        while True:
            response = await client.get(f"{url}/streams/", params={"limit": 10})
            assert response.status_code == 200
            streams: list[dict[str, Any]] = response.json()
            if len(streams) >= count and all(s["status"] != "streaming" for s in streams):
                return streams
            await anyio.sleep(0.02)


async def stored(db: Path) -> list[StreamRecord]:
    async with SQLiteRecorder(db) as recorder:
        return await recorder.list_streams(limit=10)


@pytest.mark.parametrize("name", EXAMPLES)
async def test_page_is_served(name: str, tmp_path: Path) -> None:
    app = EXAMPLES[name](db_path=str(tmp_path / "streams.db"))
    with anyio.fail_after(10):
        async with serve(app) as url, httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{url}/")
            watch = await client.get(f"{url}/", params={"watch": "0123abcd"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "{{" not in page and ("FastAPI" if name == "fastapi" else "Litestar") in page
    assert "tokens: offline" in page
    for needed in (
        'id="prompt"', 'id="stop"', 'id="streams"', "new EventSource(", "fetch(`/api/chat?",
        'addEventListener("done"', "/cancel`", "/streams/?limit=", "/?watch=", "/events`",
    ):
        assert needed in page, needed
    assert watch.status_code == 200 and watch.text == page  # the watch page is the same page


@pytest.mark.parametrize("name", EXAMPLES)
async def test_recorded_streams_are_only_served_to_authorized_clients(name: str, tmp_path: Path) -> None:
    """The examples' hook on the streams app: listing, reading, following and stopping recorded
    streams is for loopback clients only."""
    app = EXAMPLES[name](db_path=str(tmp_path / "streams.db"))
    outsider = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))  # a scope value only: no traffic
    local = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    sid = "0" * 32
    with anyio.fail_after(10):
        async with httpx.AsyncClient(transport=outsider, base_url="http://demo") as client:
            denied = [await client.get("/streams/"), await client.get(f"/streams/{sid}"),
                      await client.get(f"/streams/{sid}/events"), await client.post(f"/streams/{sid}/cancel")]
        async with httpx.AsyncClient(transport=local, base_url="http://demo") as client:
            allowed = await client.get("/streams/")
            unknown = [await client.get(f"/streams/{sid}"), await client.get(f"/streams/{sid}/events"),
                       await client.post(f"/streams/{sid}/cancel")]
    assert [r.status_code for r in denied] == [403, 403, 403, 403]
    assert allowed.status_code == 200 and allowed.json() == []
    assert [r.status_code for r in unknown] == [404, 404, 404]


@pytest.mark.parametrize("name", EXAMPLES)
async def test_example_streams_over_get_and_post_and_records_every_stream(name: str, tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    app = EXAMPLES[name](db_path=str(db), token_delay=0.02)
    with anyio.fail_after(20):
        async with serve(app) as url, httpx.AsyncClient(timeout=5) as client:
            got = await read_stream(client, "GET", f"{url}/api/chat",
                                    params={"prompt": "What is SSE?", "max_tokens": 6, "conversation": "conv-1"})
            posted = await read_stream(client, "POST", f"{url}/api/chat", params={"conversation": "conv-1"},
                                       json={"prompt": "Why record streams?", "max_tokens": 4})
            listing = await settled(client, url, 2)
        records = await stored(db)

    # Resumable streams: a retry hint first, ids that name the stream, and a final `done`.
    for read, count in ((got, 6), (posted, 4)):
        assert read.retry == 1000 and len(read.texts) == count
        assert_resumable_ids(read)
        assert done_data(read) == {"stream_id": read.stream_id, "status": "completed"}
        assert read.final is not None and read.final.id == read.ids[-1]  # `done` carries no id of its own
    assert got.text.startswith("You asked: \u201cWhat is SSE?\u201d.")

    assert [s["id"] for s in listing] == [posted.stream_id, got.stream_id]
    assert [(s["status"], s["method"], s["key"], s["format"]) for s in listing] == [
        ("completed", "POST", "conv-1", "sse"), ("completed", "GET", "conv-1", "sse")]
    for summary in listing:
        assert 0 < summary["metadata"]["ttft_ms"] <= summary["metadata"]["duration_ms"]
    assert listing[1]["metadata"]["prompt"] == "What is SSE?" and listing[1]["preview"] == got.text

    by_id = {r.id: r for r in records}
    assert set(by_id) == {got.stream_id, posted.stream_id}
    get_record, post_record = by_id[got.stream_id], by_id[posted.stream_id]
    assert get_record.status is StreamStatus.COMPLETED and get_record.content == got.text
    assert post_record.status is StreamStatus.COMPLETED and post_record.content == posted.text
    assert get_record.metadata["prompt"] == "What is SSE?" and get_record.metadata["model"] == "offline-demo"
    assert get_record.metadata["finish_reason"] == "length" and get_record.chunk_count == 6
    assert get_record.key == "conv-1" and post_record.key == "conv-1"


@pytest.mark.parametrize("name", EXAMPLES)
async def test_a_client_that_hangs_up_resumes_on_the_same_url(name: str, tmp_path: Path) -> None:
    """What a browser's EventSource does after a drop: the same URL with Last-Event-ID gets the
    rest of the same answer, from the one generation (which went on meanwhile)."""
    db = tmp_path / "streams.db"
    app = EXAMPLES[name](db_path=str(db), token_delay=0.02)
    params: dict[str, str | int] = {"prompt": "Tell me about resuming", "max_tokens": 25}
    with anyio.fail_after(20):
        async with serve(app) as url, httpx.AsyncClient(timeout=5) as client:
            first = await read_stream(client, "GET", f"{url}/api/chat", params=params, stop_after=3)
            rest = await read_stream(client, "GET", f"{url}/api/chat", params=params,
                                     headers={"Last-Event-ID": first.ids[-1]})
            # Over and fully delivered: a further reconnect gets 204, which stops EventSource for good.
            again = await client.get(f"{url}/api/chat", params=params, headers={"Last-Event-ID": rest.ids[-1]})
            foreign = await client.get(f"{url}/api/chat", params=params, headers={"Last-Event-ID": "3"})
            unknown = await client.get(f"{url}/api/chat", params=params, headers={"Last-Event-ID": f"{'f' * 32}:3"})
            listing = await settled(client, url, 1)
        records = await stored(db)

    assert rest.stream_id == first.stream_id
    assert_resumable_ids(rest, first_seq=4)
    assert len(first.texts) + len(rest.texts) == 25
    assert done_data(rest) == {"stream_id": first.stream_id, "status": "completed"}
    assert (again.status_code, foreign.status_code, unknown.status_code) == (204, 400, 404)
    [record] = records  # one stream: the resume and the refused reconnects started no generation
    assert [s["id"] for s in listing] == [record.id] == [first.stream_id]
    assert record.status is StreamStatus.COMPLETED and record.content == first.text + rest.text
    assert "client_disconnected_at_ms" in record.metadata  # the first client left; the stream went on


@pytest.mark.parametrize("name", EXAMPLES)
async def test_a_second_client_watches_the_running_stream(name: str, tmp_path: Path) -> None:
    """The "watch live" link: ``/streams/{id}/events`` from another client while the answer
    streams gives the same text, in order, from the start, and the same final event; the
    conversation's key finds the running stream; the record reads back as JSON."""
    db = tmp_path / "streams.db"
    app = EXAMPLES[name](db_path=str(db), token_delay=0.03)
    params: dict[str, str | int] = {"prompt": "Watch this", "max_tokens": 30, "conversation": "watched-conv"}
    with anyio.fail_after(20):
        async with serve(app) as url, httpx.AsyncClient(timeout=5) as client:
            watcher: list[Read] = []
            async with aconnect_sse(client, "GET", f"{url}/api/chat", params=params) as source:
                producer = Read(source.response.headers["x-stream-id"])
                async with anyio.create_task_group() as tg:
                    async for event in source.aiter_sse():
                        producer.take(event)
                        if len(producer.texts) == 5:
                            active = (await client.get(f"{url}/streams/", params={
                                "key": "watched-conv", "status": "streaming"})).json()
                            running = (await client.get(f"{url}/streams/{producer.stream_id}")).json()

                            async def watch() -> None:
                                watcher.append(await read_stream(
                                    client, "GET", f"{url}/streams/{producer.stream_id}/events"))

                            tg.start_soon(watch)
            after_end = await read_stream(client, "GET", f"{url}/streams/{producer.stream_id}/events",
                                          params={"after": 10})
            delivered = await client.get(f"{url}/streams/{producer.stream_id}/events",
                                         headers={"Last-Event-ID": producer.ids[-1]})
            listing = await settled(client, url, 1)
            record_json = (await client.get(f"{url}/streams/{producer.stream_id}")).json()
            none_active = (await client.get(f"{url}/streams/", params={
                "key": "watched-conv", "status": "streaming"})).json()

    [watched] = watcher
    assert len(producer.texts) == 30
    assert watched.stream_id == producer.stream_id and watched.texts == producer.texts
    assert watched.ids == producer.ids and done_data(watched) == done_data(producer)
    assert done_data(producer) == {"stream_id": producer.stream_id, "status": "completed"}
    assert after_end.texts == producer.texts[10:] and after_end.ids == producer.ids[10:]
    assert done_data(after_end)["status"] == "completed"
    assert delivered.status_code == 204
    assert [a["id"] for a in active] == [producer.stream_id] and active[0]["status"] == "streaming"
    assert running["status"] == "streaming" and producer.text.startswith(running["content"])
    assert len(running["content"]) >= len("".join(producer.texts[:5]))
    assert [s["id"] for s in listing] == [producer.stream_id]  # watching is not a new stream
    assert record_json["status"] == "completed" and record_json["content"] == producer.text
    assert record_json["chunk_count"] == 30 and record_json["key"] == "watched-conv"
    assert none_active == []


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_stop_cancels_the_generation_through_the_streams_app(name: str, method: str, tmp_path: Path) -> None:
    """The Stop button: ``POST /streams/{id}/cancel`` ends the generation; the producer's
    client gets ``event: done`` with status ``cancelled``; the record says who stopped it."""
    db = tmp_path / "streams.db"
    app = EXAMPLES[name](db_path=str(db), token_delay=0.03)
    with anyio.fail_after(20):
        async with serve(app) as url, httpx.AsyncClient(timeout=5) as client:
            if method == "GET":
                request: dict[str, Any] = {"params": {"prompt": "A long answer, please"}}
            else:
                request = {"json": {"prompt": "A long answer, please"}}
            async with aconnect_sse(client, method, f"{url}/api/chat", **request) as source:
                read = Read(source.response.headers["x-stream-id"])
                async for event in source.aiter_sse():
                    read.take(event)
                    if len(read.texts) == 3 and read.final is None:
                        cancel = await client.post(f"{url}/streams/{read.stream_id}/cancel")
            listing = await settled(client, url, 1)
            again = await client.post(f"{url}/streams/{read.stream_id}/cancel")
        records = await stored(db)

    assert cancel.status_code == 202 and cancel.json() == {"stream_id": read.stream_id, "cancelled": True}
    assert done_data(read) == {"stream_id": read.stream_id, "status": "cancelled"}
    assert again.status_code == 409 and again.json()["status"] == "cancelled"
    assert [(s["id"], s["status"], s["method"]) for s in listing] == [(read.stream_id, "cancelled", method)]
    [record] = records
    assert record.status is StreamStatus.CANCELLED and record.metadata["cancelled_by"] == "request"
    assert record.content == read.text and 3 <= record.chunk_count < 40  # far from the natural end
    assert "client_disconnected_at_ms" not in record.metadata  # the client stayed to the end


@pytest.mark.parametrize("name", EXAMPLES)
async def test_example_streams_an_openai_compatible_model_when_a_key_is_set(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgi_stream_recorder.testing.openai_server import FakeOpenAI

    fake = FakeOpenAI("Streams are recorded, token by token.", model="gpt-test")
    db = tmp_path / "streams.db"
    with anyio.fail_after(20):
        async with serve(fake) as fake_url:
            monkeypatch.setenv("OPENAI_API_KEY", "test-key")
            monkeypatch.setenv("OPENAI_BASE_URL", f"{fake_url}/v1")
            monkeypatch.setenv("OPENAI_MODEL", "gpt-test")
            app = EXAMPLES[name](db_path=str(db))
            async with serve(app) as url, httpx.AsyncClient(timeout=5) as client:
                page = (await client.get(f"{url}/")).text
                read = await read_stream(client, "POST", f"{url}/api/chat", json={"prompt": "Hello?"})
                listing = await settled(client, url, 1)
        records = await stored(db)

    assert read.text == "Streams are recorded, token by token." and len(read.texts) > 1
    assert done_data(read)["status"] == "completed"
    assert "tokens: openai" in page
    assert 'href="/streams/"' in page  # the page links to the viewer
    assert listing[0]["metadata"]["source"] == "openai"
    [record] = records
    assert record.id == read.stream_id and record.status is StreamStatus.COMPLETED
    assert record.content == read.text
    assert record.metadata["model"] == "gpt-test" and record.metadata["source"] == "openai"
    assert record.metadata["usage"]["completion_tokens"] == len(read.texts)
    [request] = fake.requests
    assert request.body["model"] == "gpt-test" and request.body["stream"] is True
    assert request.body["messages"] == [{"role": "user", "content": "Hello?"}]


@pytest.mark.parametrize("name", EXAMPLES)
async def test_example_streams_an_anthropic_model_when_its_key_is_set(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgi_stream_recorder.testing import FakeAnthropic

    fake = FakeAnthropic("Claude streams too, token by token.", model="claude-test", api_key="test-key")
    db = tmp_path / "streams.db"
    with anyio.fail_after(20):
        async with serve(fake) as fake_url:
            monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
            monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_url)
            monkeypatch.setenv("ANTHROPIC_MODEL", "claude-test")
            app = EXAMPLES[name](db_path=str(db))
            async with serve(app) as url, httpx.AsyncClient(timeout=5) as client:
                page = (await client.get(f"{url}/")).text
                read = await read_stream(client, "POST", f"{url}/api/chat", json={"prompt": "Hello?"})
                await settled(client, url, 1)
        records = await stored(db)

    assert read.text == "Claude streams too, token by token." and len(read.texts) > 1
    assert done_data(read)["status"] == "completed"
    assert "tokens: anthropic" in page
    [record] = records
    assert record.content == read.text and record.metadata["source"] == "anthropic"
    assert record.metadata["model"] == "claude-test" and record.metadata["stop_reason"] == "end_turn"
    assert "test-key" not in str(record.metadata)
