"""``Recorder(redact=...)``: what is stored is redacted, on every backend; the client still gets
the original stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from starlette.requests import Request

from asgi_stream_recorder import Recorder, StreamStatus, redact_secrets, stream_app
from asgi_stream_recorder.recorders.redaction import REDACTION_FAILED
from asgi_stream_recorder.testing import sse_client
from tests.backends import Place, every_kind, place_fixture  # noqa: F401 - fixtures "kind", "place"

pytestmark = pytest.mark.anyio

KEY = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2"


async def run(recorder: Recorder, tokens: list[str], fail: str | None = None) -> tuple[str, list[str]]:
    async def chat(request: Request) -> AsyncIterator[str]:
        for token in tokens:
            yield token
        if fail:
            raise RuntimeError(fail)

    app = stream_app(chat, recorder=recorder, metadata={"user": {"email": "ann@example.com", "n": 3}}, ping=None)
    async with sse_client(app) as client, client.stream("GET", "/") as s:
        got = [e.data async for e in s.events() if e.event is None]
        sid = s.stream_id
    assert sid is not None
    return sid, got


async def test_the_store_holds_redacted_text_and_the_client_the_original(place: Place) -> None:
    tokens = ["my key is ", KEY, ", mail me at bob@example.com"]
    async with place.recorder(redact=redact_secrets) as recorder:
        with anyio.fail_after(10):
            sid, got = await run(recorder, tokens, fail=f"upstream said Bearer {KEY}")
            await recorder.flush()
        record = await recorder.get(sid)
        chunks = [c.data for c in await recorder.chunks(sid)]
    assert got == tokens  # the client: untouched
    assert chunks == ["my key is ", "[redacted]", ", mail me at [email]"]
    assert record is not None and record.status is StreamStatus.FAILED
    assert record.content == "my key is [redacted], mail me at [email]"
    assert record.error == "RuntimeError: upstream said Bearer [redacted]"
    assert record.metadata["user"] == {"email": "[email]", "n": 3}
    assert KEY not in repr(record) and "bob@example.com" not in repr(record)


async def test_a_secret_split_across_chunks_is_caught_in_the_content(place: Place) -> None:
    """Each chunk is redacted alone, the content as a whole: a key split over two chunks
    survives in the chunks (documented), never in the content."""
    async with place.recorder(redact=redact_secrets) as recorder:
        with anyio.fail_after(10):
            sid, _ = await run(recorder, [KEY[:12], KEY[12:]])
            await recorder.flush()
        record = await recorder.get(sid)
    assert record is not None and record.content == "[redacted]"


async def test_a_failing_redaction_stores_a_marker_never_the_text(
    place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(text: str) -> str:
        if "secret" in text:
            raise ValueError("oops")
        return text

    async with place.recorder(redact=broken) as recorder:
        with anyio.fail_after(10):
            sid, got = await run(recorder, ["fine ", "secret stuff"])
            await recorder.flush()
        record = await recorder.get(sid)
        chunks = [c.data for c in await recorder.chunks(sid)]
    assert got == ["fine ", "secret stuff"]
    assert chunks == ["fine ", REDACTION_FAILED]
    assert record is not None and record.content == REDACTION_FAILED
    assert any("redaction failed" in r.getMessage() for r in caplog.records)
    assert "secret stuff" not in caplog.text


@pytest.mark.parametrize(("given", "stored"), [
    ("key sk-ant-api03-abcdefghijklmnopqrstuv end", "key [redacted] end"),
    ("aws AKIAABCDEFGHIJKLMNOP", "aws [redacted]"),
    ("gh ghp_" + "x" * 36, "gh [redacted]"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", "Authorization: Bearer [redacted]"),
    ("write to Ann.Lee+chat@mail.example.org today", "write to [email] today"),
    ("no secrets here, sk- too short: sk-abc", "no secrets here, sk- too short: sk-abc"),
    ("", ""),
])
def test_redact_secrets(given: str, stored: str) -> None:
    assert redact_secrets(given) == stored
