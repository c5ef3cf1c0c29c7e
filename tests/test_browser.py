"""End to end in a real browser: the FastAPI example's chat page in headless Chromium.

* Tokens appear one after another; Stop cancels the generation through the streams app
  (``POST /streams/{id}/cancel``) and the answer shows as stopped, the stream as ``cancelled``
  (GET with EventSource, POST with fetch, and a Stop pressed before the first token); a short
  answer ends with its ``done`` event and shows as done.
* Chromium's own ``EventSource`` behind a TCP proxy that drops the connection mid-stream (twice,
  cutting events in half): it reconnects by itself with ``Last-Event-ID``, the page ends with
  the whole answer exactly once, and the server ran one generation (one record, completed).
* "Watch live": a second tab opened from the answer's link joins the running stream and ends
  with the same text; a reloaded page rejoins its conversation's running answer.

The browser is the system's Chromium (Debian's ``chromium`` package): these tests download and
install nothing, and skip (a failure under CI) when there is none. Screenshots go to each
test's temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from asgi_stream_recorder import SQLiteRecorder, StreamRecord, StreamStatus
from examples.fastapi import create_app

from .servers import serve

pytestmark = pytest.mark.anyio

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 8000  # any single wait on the page


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class Browser:
    context: Any
    page: Any
    errors: list[str] = field(default_factory=list)  # uncaught errors in any of its pages

    def watch_errors(self, page: Any) -> None:
        page.on("pageerror", lambda error: self.errors.append(str(error)))


@asynccontextmanager
async def chromium(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Browser]:
    """A headless Chromium page (and its context, for more tabs); skips when there is none."""
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found at /usr/bin/chromium or on PATH: install Debian's `chromium` package")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed: pip install -e '.[dev]'")
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)  # the offline token source, whatever the environment
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True,
                                                   timeout=10_000)
        try:
            context = await browser.new_context(viewport={"width": 1000, "height": 860})
            context.set_default_timeout(TIMEOUT_MS)
            page = await context.new_page()
            out = Browser(context, page)
            out.watch_errors(page)
            yield out
        finally:
            await browser.close()


async def stored(db: Path) -> list[StreamRecord]:
    async with SQLiteRecorder(db) as recorder:
        return await recorder.list_streams(limit=10)


async def watch_tokens(text: Any, until: int) -> list[int]:
    """The distinct lengths of the answer's text, polled until ``until`` of them were seen."""
    lengths: list[int] = []
    with anyio.fail_after(5):
        while len(lengths) < until:
            length = len(await text.text_content() or "")
            if length and (not lengths or length != lengths[-1]):
                lengths.append(length)
            await anyio.sleep(0.02)
    return lengths


async def ask(page: Any, prompt: str, *, max_tokens: int | None = None, transport: str = "GET") -> Any:
    """Send a prompt from the page; the new answer's element."""
    await page.select_option("#transport", transport)
    if max_tokens is not None:
        await page.fill("#max-tokens", str(max_tokens))
    await page.fill("#prompt", prompt)
    await page.press("#prompt", "Enter")
    return page.locator("#transcript .msg.assistant").last


# -- a TCP proxy that drops event streams mid-way ----------------------------------------------
_REQUEST_LINE = re.compile(rb"(GET|POST|HEAD|PUT|DELETE|OPTIONS|PATCH) (\S+) HTTP/1\.[01]\r\n")


@dataclass
class _Connection:
    request: bytes = b""  # the request line of the request in flight
    head: bytes | None = None  # the response head so far, while it is one we may drop
    body: int | None = None  # body bytes relayed of the event stream we will drop


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream`` that drops the connection (closes both
    sockets) of the first ``drops`` event-stream responses to ``/api/chat`` (GET or POST) after
    ``after_bytes`` bytes of their body: wherever that falls, usually in the middle of an event.
    ``chat_requests`` keeps the head of each ``/api/chat`` request it saw."""

    def __init__(self, upstream: str, *, drops: int, after_bytes: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.drops, self.after_bytes = drops, after_bytes
        self.dropped = 0
        self.chat_requests: list[str] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()
            for writer in list(self._writers):
                writer.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_writer)
        server_writer = None
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(server_writer)
            conn = _Connection()
            up = asyncio.ensure_future(self._up(client_reader, server_writer, conn))
            down = asyncio.ensure_future(self._down(server_reader, client_writer, conn))
            try:
                await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()
                down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for writer in (client_writer, server_writer):
                if writer is not None:
                    writer.close()  # both sockets: the end of this connection, dropped or not
                    self._writers.discard(writer)
            self._tasks.discard(task)

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection) -> None:
        while data := await reader.read(65536):
            for match in _REQUEST_LINE.finditer(data):
                conn.request = match.group(0)
                if conn.request.startswith((b"GET /api/chat?", b"POST /api/chat?")):
                    self.chat_requests.append(data[match.start():].decode("latin-1"))
                    conn.head = b"" if self.dropped < self.drops else None
            writer.write(data)
            await writer.drain()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection) -> None:
        while data := await reader.read(65536):
            body = b""
            if conn.head is not None:  # the head of a response we may drop: an event stream?
                conn.head += data
                end = conn.head.find(b"\r\n\r\n")
                if end >= 0:
                    head, body = conn.head[:end].lower(), conn.head[end + 4:]
                    conn.head = None
                    if b"content-type: text/event-stream" in head and self.dropped < self.drops:
                        conn.body = 0
                    else:
                        body = b""
            elif conn.body is not None:
                body = data
            if conn.body is not None and conn.body + len(body) >= self.after_bytes:
                cut = len(data) - len(body) + (self.after_bytes - conn.body)
                writer.write(data[:cut])
                await writer.drain()
                self.dropped += 1
                return  # the caller closes both sockets
            if conn.body is not None:
                conn.body += len(body)
            writer.write(data)
            await writer.drain()


# -- the tests -------------------------------------------------------------------------------------
# Playwright's async API drives the browser through asyncio subprocess pipes: it cannot run
# on trio, so these tests run on asyncio only (the server side is covered on both elsewhere).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_chat_page_streams_tokens_and_stop_cancels_through_the_streams_app(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.async_api import expect

    db = tmp_path / "streams.db"
    app = create_app(db_path=str(db), token_delay=0.15)  # ~130 tokens take ~20 s: far past each stop
    with anyio.fail_after(40):
        async with serve(app) as url, chromium(monkeypatch) as browser:
            page = browser.page
            await page.goto(f"{url}/")
            await expect(page.locator("#source")).to_have_text("tokens: offline")
            rows = page.locator("#streams tr[data-stream-id]")

            # 1. GET through EventSource: tokens arrive one by one; Stop cancels the generation on
            #    the server, whose `done` event (status "cancelled") ends the answer as stopped.
            answer = await ask(page, "How do Server-Sent Events work?")
            lengths = await watch_tokens(answer.locator(".text"), until=6)
            await expect(answer.locator("a.watch")).to_have_text(re.compile("watch live"))
            await expect(page.locator("#stop")).to_be_enabled()
            await page.click("#stop")
            await expect(answer).to_have_class(re.compile(r"\bstopped\b"))
            await expect(answer.locator(".note")).to_contain_text("cancelled on the server")
            shown_get = await answer.locator(".text").text_content() or ""
            get_id = await answer.get_attribute("data-stream-id")
            await expect(rows.first).to_have_attribute("data-status", "cancelled")
            await expect(rows.first.locator(".status")).to_have_text("cancelled")
            await expect(rows.first).to_contain_text("GET")

            # 2. POST through fetch streaming, stopped the same way (the id from X-Stream-Id).
            answer = await ask(page, "Why keep a record of every stream?", transport="POST")
            await watch_tokens(answer.locator(".text"), until=3)
            await page.click("#stop")
            await expect(answer).to_have_class(re.compile(r"\bstopped\b"))
            shown_post = await answer.locator(".text").text_content() or ""
            await expect(rows.first).to_have_attribute("data-status", "cancelled")
            await expect(rows.first).to_contain_text("POST")
            await expect(rows).to_have_count(2)

            # 3. Stop before the first token (no event id yet): found by the conversation's key,
            #    or cancelled as soon as its first event names it.
            answer = await ask(page, "Stop me at once")
            await page.click("#stop")
            await expect(answer).to_have_class(re.compile(r"\bstopped\b"))
            shown_early = await answer.locator(".text").text_content() or ""
            await expect(rows).to_have_count(3)
            await expect(rows.first).to_have_attribute("data-status", "cancelled")

            # 4. A short answer runs to its end: its `done` event says completed; nothing reconnects.
            answer = await ask(page, "Say hello", max_tokens=5)
            await expect(answer).to_have_class(re.compile(r"\bdone\b"))
            await expect(answer.locator(".note")).to_have_text(re.compile(r"^Done · 5 tokens in [\d.]+ s$"))
            shown_done = await answer.locator(".text").text_content() or ""
            await expect(rows.first).to_have_attribute("data-status", "completed")
            await expect(rows).to_have_count(4)
            await expect(page.locator("#stop")).to_be_disabled()
            await expect(rows.first.locator("td").nth(3)).to_have_text(re.compile(r"^\d+ ms$"))  # TTFT
            await expect(rows.first.locator("a")).to_have_text("replay")

            await page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            await anyio.sleep(1.5)  # long enough for an EventSource to reconnect (retry: 1000), if it did
            await expect(rows).to_have_count(4)
            assert browser.errors == []
        records = await stored(db)

    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths
    assert [(r.method, r.status) for r in records] == [
        ("GET", StreamStatus.COMPLETED),
        ("GET", StreamStatus.CANCELLED),
        ("POST", StreamStatus.CANCELLED),
        ("GET", StreamStatus.CANCELLED),
    ]
    done, early, stopped_post, stopped_get = records
    assert stopped_get.id == get_id
    # The page got every token the server sent before its `done`: what it shows is the record.
    for record, shown in ((stopped_get, shown_get), (stopped_post, shown_post), (early, shown_early)):
        assert record.content == shown, (record.content, shown)
        assert record.metadata["cancelled_by"] == "request"
        assert "client_disconnected_at_ms" not in record.metadata  # the page stayed connected to the end
    for record in (stopped_get, stopped_post):
        assert 3 <= record.chunk_count < 60
        assert record.metadata["ttft_ms"] > 0 and record.metadata["duration_ms"] > record.metadata["ttft_ms"]
    assert early.chunk_count <= 1
    assert stopped_get.metadata["prompt"] == "How do Server-Sent Events work?"
    assert done.content == shown_done and done.chunk_count == 5 and done.metadata["finish_reason"] == "length"
    assert len({r.key for r in records}) == 1 and records[0].key  # one conversation: the tab's
    assert (tmp_path / "chat.png").stat().st_size > 10_000


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_eventsource_resumes_by_itself_through_a_proxy_that_drops_the_connection(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.async_api import expect

    db = tmp_path / "streams.db"
    app = create_app(db_path=str(db), token_delay=0.05)
    with anyio.fail_after(40):
        async with serve(app) as url:
            proxy = DroppingProxy(url, drops=2, after_bytes=700)  # about 12 tokens into each connection
            async with proxy.running() as proxied, chromium(monkeypatch) as browser:
                page = browser.page
                await page.goto(f"{proxied}/")
                answer = await ask(page, "Does a dropped connection lose the answer?", max_tokens=90)
                await expect(answer).to_have_class(re.compile(r"\breconnecting\b"))  # the first drop
                await page.screenshot(path=str(tmp_path / "reconnecting.png"), full_page=True)
                await expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=20_000)
                await expect(answer.locator(".note")).to_contain_text("resumed after 2 dropped connections")
                shown = await answer.locator(".text").text_content() or ""
                rows = page.locator("#streams tr[data-stream-id]")
                await expect(rows.first).to_have_attribute("data-status", "completed")
                await page.screenshot(path=str(tmp_path / "resumed.png"), full_page=True)
                await anyio.sleep(1.5)  # an EventSource that reconnected after `done` would show here
                get_requests = list(proxy.chat_requests)

                # The POST transport (fetch) resumes too, through the streams app's join.
                proxy.drops += 1
                answer = await ask(page, "And over fetch?", max_tokens=60, transport="POST")
                await expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=20_000)
                await expect(answer.locator(".note")).to_contain_text("resumed after 1 dropped connection")
                shown_post = await answer.locator(".text").text_content() or ""
                assert browser.errors == []
        records = await stored(db)

    # One generation each: one record per answer, completed, its text shown exactly once.
    post_record, record = records
    assert post_record.method == "POST" and post_record.status is StreamStatus.COMPLETED
    assert post_record.chunk_count == 60 and shown_post == post_record.content
    assert proxy.dropped == 3 and len(proxy.chat_requests) == 4
    assert record.status is StreamStatus.COMPLETED and record.chunk_count == 90
    assert shown == record.content
    assert "client_disconnected_at_ms" in record.metadata  # the server saw its client go, and went on
    # Chromium reconnected by itself to the same URL, saying where it was: `<stream id>:<seq>`,
    # further along each time; after the end it did not come back.
    assert len(get_requests) == 3, get_requests
    first, *again = get_requests
    assert "last-event-id" not in first.lower()
    seqs = []
    for head in again:
        found = re.search(r"(?im)^last-event-id: *(\S+)\r?$", head)
        assert found, head
        stream_id, _, seq = found.group(1).rpartition(":")
        assert stream_id == record.id
        seqs.append(int(seq))
    assert 0 < seqs[0] < seqs[1] < 90, seqs
    assert len({head.split("\r\n", 1)[0] for head in get_requests}) == 1  # the same URL each time


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_watch_live_in_a_second_tab_and_rejoin_after_a_reload(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.async_api import expect

    db = tmp_path / "streams.db"
    app = create_app(db_path=str(db), token_delay=0.05)
    with anyio.fail_after(40):
        async with serve(app) as url, chromium(monkeypatch) as browser:
            page = browser.page
            await page.goto(f"{url}/")

            # 1. The answer's "watch live" link opens a second tab that joins the running stream.
            answer = await ask(page, "Can someone else watch this answer?", max_tokens=60)
            await watch_tokens(answer.locator(".text"), until=5)
            async with browser.context.expect_page() as opened:
                await answer.locator("a.watch").click()
            watcher = await opened.value
            browser.watch_errors(watcher)
            await expect(watcher.locator("#watching")).to_be_visible()
            watched = watcher.locator("#transcript .msg.assistant").last
            await expect(watched).to_have_class(re.compile(r"\bstreaming\b"))
            await expect(watcher.locator("#prompt")).to_be_hidden()
            await watcher.screenshot(path=str(tmp_path / "watching.png"), full_page=True)
            await expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=15_000)
            await expect(watched).to_have_class(re.compile(r"\bdone\b"))
            shown = await answer.locator(".text").text_content() or ""
            shown_watched = await watched.locator(".text").text_content() or ""
            watched_id = await watched.get_attribute("data-stream-id")
            await watcher.screenshot(path=str(tmp_path / "watched.png"), full_page=True)
            await watcher.close()

            # 2. A reload mid-answer: the generation goes on, and the page rejoins it by the tab's
            #    conversation key, from the start.
            answer = await ask(page, "What if I reload the page?", max_tokens=60)
            await watch_tokens(answer.locator(".text"), until=5)
            await page.reload()
            rejoined = page.locator("#transcript .msg.assistant").last
            await expect(rejoined).to_have_class(re.compile(r"\bdone\b"), timeout=15_000)
            shown_rejoined = await rejoined.locator(".text").text_content() or ""
            await expect(page.locator("#transcript .msg.assistant")).to_have_count(1)
            assert browser.errors == []
        records = await stored(db)

    reloaded, first = records  # two generations: watching and rejoining started none
    assert first.status is StreamStatus.COMPLETED and first.chunk_count == 60
    assert shown == shown_watched == first.content and watched_id == first.id
    assert reloaded.status is StreamStatus.COMPLETED and reloaded.chunk_count == 60
    assert shown_rejoined == reloaded.content
    assert reloaded.key == first.key  # the tab's conversation, kept over the reload
