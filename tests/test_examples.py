"""The examples under real servers, without a browser: each serves its page, streams over GET
and POST, and records every stream (completed, or cancelled when the client hangs up)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from asgi_stream_recorder import SQLiteRecorder, StreamRecord, StreamStatus
from examples.fastapi import create_app as create_fastapi_app
from examples.litestar import create_app as create_litestar_app

from .servers import serve

pytestmark = pytest.mark.anyio

EXAMPLES: dict[str, Callable[..., Any]] = {"fastapi": create_fastapi_app, "litestar": create_litestar_app}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples pick the OpenAI source when a key is set: these tests use the offline one."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)


async def read_stream(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> tuple[str, list[str]]:
    """The stream id and every data event's text; also checks each event's ``id`` is its seq."""
    texts: list[str] = []
    async with aconnect_sse(client, method, url, **kwargs) as source:
        assert source.response.status_code == 200
        stream_id = source.response.headers["x-stream-id"]
        async for event in source.aiter_sse():
            texts.append(event.data)
            assert event.event == "message" and event.id == str(len(texts))
    return stream_id, texts


async def settled(client: httpx.AsyncClient, url: str, count: int) -> list[dict[str, Any]]:
    """The example's recent streams once ``count`` of them exist and none is still streaming."""
    with anyio.fail_after(5):
        while True:
            listing = (await client.get(f"{url}/api/streams")).json()
            streams: list[dict[str, Any]] = listing["streams"]
            if len(streams) >= count and all(s["status"] != "streaming" for s in streams):
                assert listing["source"] == "offline"
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
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "{{" not in page and ("FastAPI" if name == "fastapi" else "Litestar") in page
    for needed in ('id="prompt"', 'id="stop"', 'id="streams"', "new EventSource(", 'fetch("/api/chat"', "/api/streams"):
        assert needed in page


@pytest.mark.parametrize("name", EXAMPLES)
async def test_recorded_streams_are_only_listed_to_authorized_clients(name: str, tmp_path: Path) -> None:
    """The examples' authorization hook: the list of recorded streams is for loopback clients only."""
    app = EXAMPLES[name](db_path=str(tmp_path / "streams.db"))
    outsider = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))  # a scope value only: no traffic
    local = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    with anyio.fail_after(10):
        async with httpx.AsyncClient(transport=outsider, base_url="http://demo") as client:
            denied = await client.get("/api/streams")
        async with httpx.AsyncClient(transport=local, base_url="http://demo") as client:
            allowed = await client.get("/api/streams")
    assert denied.status_code in (401, 403) and "streams" not in denied.json()
    assert allowed.status_code == 200 and allowed.json()["streams"] == []


@pytest.mark.parametrize("name", EXAMPLES)
async def test_example_streams_over_get_and_post_and_records_every_stream(name: str, tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    app = EXAMPLES[name](db_path=str(db), token_delay=0.02)
    with anyio.fail_after(20):
        async with serve(app) as url, httpx.AsyncClient(timeout=5) as client:
            get_id, get_texts = await read_stream(
                client, "GET", f"{url}/api/chat", params={"prompt": "What is SSE?", "max_tokens": 6}
            )
            post_id, post_texts = await read_stream(
                client, "POST", f"{url}/api/chat", json={"prompt": "Why record streams?", "max_tokens": 4}
            )
            # A client that hangs up after three tokens: the generator stops, the record says cancelled.
            async with aconnect_sse(client, "GET", f"{url}/api/chat", params={"prompt": "a long one"}) as source:
                left_id = source.response.headers["x-stream-id"]
                left_texts: list[str] = []
                async for event in source.aiter_sse():
                    left_texts.append(event.data)
                    if len(left_texts) == 3:
                        break
            listing = await settled(client, url, 3)
        records = await stored(db)

    assert len(get_texts) == 6 and len(post_texts) == 4
    assert "".join(get_texts).startswith("You asked: \u201cWhat is SSE?\u201d.")
    assert [s["id"] for s in listing] == [left_id, post_id, get_id]
    assert [s["status"] for s in listing] == ["cancelled", "completed", "completed"]
    assert [s["method"] for s in listing] == ["GET", "POST", "GET"]
    for summary in listing:
        assert 0 < summary["ttft_ms"] <= summary["duration_ms"]

    by_id = {r.id: r for r in records}
    assert set(by_id) == {get_id, post_id, left_id}
    get_record, post_record, left_record = by_id[get_id], by_id[post_id], by_id[left_id]
    assert get_record.status is StreamStatus.COMPLETED and get_record.content == "".join(get_texts)
    assert post_record.status is StreamStatus.COMPLETED and post_record.content == "".join(post_texts)
    assert get_record.metadata["prompt"] == "What is SSE?" and get_record.metadata["model"] == "offline-demo"
    assert get_record.metadata["finish_reason"] == "length" and get_record.chunk_count == 6
    assert left_record.status is StreamStatus.CANCELLED
    assert left_record.content.startswith("".join(left_texts)) and left_record.chunk_count >= 3
    assert "client_disconnected_at_ms" in left_record.metadata


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
                stream_id, texts = await read_stream(client, "POST", f"{url}/api/chat", json={"prompt": "Hello?"})
                listing = (await client.get(f"{url}/api/streams")).json()
        records = await stored(db)

    assert "".join(texts) == "Streams are recorded, token by token." and len(texts) > 1
    assert listing["source"] == "openai"
    [record] = records
    assert record.id == stream_id and record.status is StreamStatus.COMPLETED
    assert record.content == "".join(texts)
    assert record.metadata["model"] == "gpt-test" and record.metadata["source"] == "openai"
    assert record.metadata["usage"]["completion_tokens"] == len(texts)
    [request] = fake.requests
    assert request.body["model"] == "gpt-test" and request.body["stream"] is True
    assert request.body["messages"] == [{"role": "user", "content": "Hello?"}]
