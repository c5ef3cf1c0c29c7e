"""The viewer pages of ``streams_app``: the same URLs serve pages to browsers, JSON to the rest.

Over HTTP (uvicorn on asyncio, hypercorn on trio; real httpx clients):

* ``Accept: text/html`` gets the page, with a Content-Security-Policy of ``'self'`` and
  ``nosniff``; anything else gets exactly the JSON it got before (the records' ``record_json``);
* the pages' files ship in the package and are served; the ``authorize`` hook guards the pages
  (``list``/``read``), their files (``asset``) and the chunks (``read``), the default hook too;
* ``/{id}/chunks`` gives the chunks with their times; ``q=`` searches the list; ``/{id}/events``
  joins in another format on request; a stream's text and ids never reach a page as markup.

In headless Chromium (the system's, as ``test_browser.py`` drives it; asyncio only): the list
with its badges and filters, refreshing itself while a stream is live; a finished stream's page
with its text, record and token timeline; a live stream growing on its page as a generator
produces tokens. Each page is screenshotted and checked; with ``ASGI_STREAM_RECORDER_SCREENSHOTS=1``
the screenshots replace those kept in ``docs/screenshots/`` for reviewers (``viewer-list.png``,
``viewer-stream.png``, ``viewer-live.png``), else they go to a temporary directory.
"""

from __future__ import annotations

import os
import random
import re
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount, Route

from asgi_stream_recorder import Recorder, SQLiteRecorder, StreamRecord, StreamStatus, recorded_stream, streams_app
from asgi_stream_recorder.streams import record_json

from .servers import serve
from .test_browser import CHROMIUM_ARGS, find_chromium

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds: any single wait in these tests
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
SCREENSHOTS = (Path(__file__).resolve().parent.parent / "docs" / "screenshots"
               if os.environ.get("ASGI_STREAM_RECORDER_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / "asgi-stream-recorder-screenshots")
ASSETS = {"viewer.css": "text/css", "viewer.js": "text/javascript", "list.js": "text/javascript",
          "stream.js": "text/javascript", "favicon.svg": "image/svg+xml"}
XSS = "<img src=x onerror=alert(1)>"

ANSWER = (
    "Server-Sent Events keep one HTTP response open and write each token as a small text event. "
    "The browser's EventSource parses them, remembers the last event id, and reconnects by itself "
    "when the connection drops, sending that id back so the server can resume where it stopped. "
    "Recording every event with its time lets you replay a stream, join it live, and see how fast "
    "the model really answered."
)


def words(text: str) -> list[str]:
    """``text`` as tokens: each word with the space before it."""
    return re.findall(r"\s*\S+", text)


# -- producers: a recorded endpoint whose generations follow a script ---------------------------------
@dataclass
class Script:
    """What one generation yields: ``tokens``, ``first`` seconds before the first, then ``gaps``
    (one per later token, or one for all); ``fail_at``: raise instead of that token. A held
    script yields only as many tokens as :meth:`allow` lets it."""

    tokens: list[str]
    first: float = 0.0
    gaps: list[float] | float = 0.0
    fail_at: int | None = None
    held: bool = False
    allowed: int = 0
    sent: int = 0
    _moved: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        if not self.held:
            self.allowed = len(self.tokens)

    def allow(self, count: int | None = None) -> None:
        self.allowed = len(self.tokens) if count is None else count
        self._kick()

    def _kick(self) -> None:
        self._moved.set()
        self._moved = anyio.Event()

    async def until_sent(self, count: int) -> None:
        with anyio.fail_after(WAIT):
            while self.sent < count:
                await self._moved.wait()

    def gap(self, i: int) -> float:
        if i == 0:
            return self.first
        return self.gaps[i - 1] if isinstance(self.gaps, list) else self.gaps

    async def run(self) -> AsyncIterator[str]:
        for i, token in enumerate(self.tokens):
            while self.allowed <= i:
                await self._moved.wait()
            await anyio.sleep(self.gap(i))
            if self.fail_at == i:
                raise RuntimeError("the model fell over")
            yield token
            self.sent = i + 1
            self._kick()


class Lab:
    """An app over one recorder: ``/chat?script=&key=&prompt=`` streams a script, recorded
    (``format=`` picks the wire format); the streams app at ``/streams``."""

    def __init__(self, recorder: Recorder, *, authorize: Any = None) -> None:
        self.recorder = recorder
        self.scripts: dict[str, Script] = {}

        def metadata(scope: Any) -> dict[str, Any]:
            query = parse_qs(scope["query_string"].decode())
            return {"prompt": query.get("prompt", [""])[0], "model": "scripted-1"}

        def key(request: Request) -> str | None:
            return request.query_params.get("key")

        def endpoint(**options: Any) -> Any:
            @recorded_stream(recorder=recorder, ping=None, metadata=metadata, key=key, resume=True, **options)
            async def chat(request: Request) -> AsyncIterator[str]:
                async for token in self.scripts[request.query_params["script"]].run():
                    yield token

            return chat

        self.app = Starlette(routes=[
            Route("/chat", endpoint()),
            Route("/chat-openai", endpoint(format="openai")),
            Mount("/streams", streams_app(recorder=recorder, authorize=authorize)),
        ])

    def script(self, name: str, tokens: list[str], **options: Any) -> Script:
        self.scripts[name] = Script(tokens, **options)
        return self.scripts[name]


async def produce(url: str, script: str, *, path: str = "/chat", **params: str) -> str:
    """Run a generation to its end as a client would (reading every byte); its stream id."""
    async with httpx.AsyncClient(timeout=WAIT) as client, \
            client.stream("GET", f"{url}{path}", params={"script": script, **params}) as response:
        assert response.status_code == 200
        async for _ in response.aiter_bytes():
            pass
        return response.headers["x-stream-id"]


@asynccontextmanager
async def producing(url: str, script: Script, name: str, **params: str) -> AsyncIterator[str]:
    """A generation running in the background (a client reading it) while the block runs; its id."""
    async with anyio.create_task_group() as tg, httpx.AsyncClient(timeout=WAIT) as client:
        got_id: list[str] = []
        started = anyio.Event()

        async def read() -> None:
            async with client.stream("GET", f"{url}/chat", params={"script": name, **params}) as response:
                got_id.append(response.headers["x-stream-id"])
                started.set()
                async for _ in response.aiter_bytes():
                    pass

        tg.start_soon(read)
        with anyio.fail_after(WAIT):
            await started.wait()
        yield got_id[0]
        tg.cancel_scope.cancel()


async def stored(recorder: Recorder, stream_id: str) -> StreamRecord | None:
    """The stream's record as stored, once the recorder has written what it holds."""
    await recorder.flush()
    return await recorder.get(stream_id)


async def get(url: str, accept: str | None = None, **options: Any) -> httpx.Response:
    headers = {**options.pop("headers", {}), **({"accept": accept} if accept is not None else {})}
    async with httpx.AsyncClient(timeout=WAIT) as client:
        return await client.get(url, headers=headers, **options)


def assert_page(response: httpx.Response, status: int = 200) -> None:
    """A viewer page: HTML, no inline script, a CSP of its own files only, nosniff."""
    assert response.status_code == status, response.text[:200]
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert "unsafe" not in csp and "http" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "accept" in response.headers["vary"].lower()
    elements = Markup.of(response.text)
    scripts = [attrs for tag, attrs in elements.tags if tag == "script"]
    assert scripts and all(a.get("type") == "module" and a.get("src") for a in scripts)
    assert elements.script_text == ""  # no inline script
    for tag, attrs in elements.tags:  # no inline handlers or styles, no images
        assert tag not in ("style", "img", "iframe") and not any(a.startswith("on") or a == "style" for a in attrs), tag


class Markup(HTMLParser):
    """A page's elements, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""

    @classmethod
    def of(cls, text: str) -> Markup:
        parser = cls()
        parser.feed(text)
        parser.close()
        return parser

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.lasttag == "script":
            self.script_text += data.strip()


# -- HTTP ----------------------------------------------------------------------------------------------
async def test_browsers_get_pages_and_api_clients_get_the_json_as_before(tmp_path: Path) -> None:
    async with SQLiteRecorder(tmp_path / "s.db") as recorder:
        lab = Lab(recorder)
        lab.script("a", words("one two three"))
        lab.script("b", words("four five"))
        async with serve(lab.app) as url:
            first = await produce(url, "a", key="conv-1", prompt="count")
            second = await produce(url, "b")
            await recorder.flush()
            rows = [record_json(r, content=False) for r in await recorder.list_streams(limit=50)]
            assert [r["id"] for r in rows] == [second, first]

            page = await get(f"{url}/streams/", BROWSER_ACCEPT)
            assert_page(page)
            assert 'src="/streams/_assets/list.js"' in page.text and 'data-root="/streams"' in page.text
            assert first not in page.text  # the page holds no data: its script reads the JSON
            for accept in (None, "*/*", "application/json", "application/json, text/html;q=0.9", "text/html;q=0"):
                answer = await get(f"{url}/streams/", accept)
                assert answer.status_code == 200 and answer.headers["content-type"] == "application/json", accept
                assert answer.json() == rows, accept
            assert (await get(f"{url}/streams/", "text/html")).headers["content-type"].startswith("text/html")

            page = await get(f"{url}/streams/{first}", BROWSER_ACCEPT)
            assert_page(page)
            assert f'data-stream-id="{first}"' in page.text and "one two" not in page.text
            record = await stored(recorder, first)
            assert record is not None
            for accept in (None, "*/*", "application/json"):
                answer = await get(f"{url}/streams/{first}", accept)
                assert answer.json() == record_json(record) and answer.json()["content"] == "one two three"

            assert_page(await get(f"{url}/streams/nosuch", BROWSER_ACCEPT), 404)
            missing = await get(f"{url}/streams/nosuch")
            assert missing.status_code == 404 and missing.text == "no such stream"
            assert missing.headers["content-type"].startswith("text/plain")
            # the trailing slash some mounts add still finds the page
            assert_page(await get(f"{url}/streams/{first}/", BROWSER_ACCEPT))


async def test_the_pages_files_ship_with_the_package_and_show_data_only_as_text(tmp_path: Path) -> None:
    async with SQLiteRecorder(tmp_path / "s.db") as recorder, serve(Lab(recorder).app) as url:
        pages = [await get(f"{url}/streams/", BROWSER_ACCEPT), await get(f"{url}/streams/x", BROWSER_ACCEPT)]
        linked = {m for p in pages for m in re.findall(r'(?:src|href)="(/streams/_assets/[^"]+)"', p.text)}
        assert linked == {f"/streams/_assets/{name}" for name in ASSETS if name != "viewer.js"}  # (list.js imports it)
        for name, media in ASSETS.items():
            answer = await get(f"{url}/streams/_assets/{name}")
            assert answer.status_code == 200, name
            assert answer.headers["content-type"].split(";")[0] == media
            assert answer.headers["x-content-type-options"] == "nosniff"
            if name.endswith(".js"):
                # no HTML parsing of anything: data goes in as text nodes and attribute values
                assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", answer.text)
                assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", answer.text)  # nothing from elsewhere
        assert (await get(f"{url}/streams/_assets/nope.js")).status_code == 404


async def test_the_authorize_hook_guards_pages_files_and_chunks(tmp_path: Path) -> None:
    calls: list[tuple[str, str | None]] = []

    async def hook(request: Request, action: str, stream_id: str | None) -> bool:
        calls.append((action, stream_id))
        return request.headers.get("authorization") == "Bearer ok"

    async with SQLiteRecorder(tmp_path / "s.db") as recorder:
        lab = Lab(recorder, authorize=hook)
        lab.script("a", words("secret answer"))
        async with serve(lab.app) as url:
            sid = await produce(url, "a")
            urls = [f"{url}/streams/", f"{url}/streams/{sid}", f"{url}/streams/_assets/stream.js",
                    f"{url}/streams/{sid}/chunks"]
            for target in urls:
                refused = await get(target, BROWSER_ACCEPT)
                assert refused.status_code == 403 and "secret" not in refused.text, target
            assert calls == [("list", None), ("read", sid), ("asset", None), ("read", sid)]
            good = {"authorization": "Bearer ok"}
            for target in urls:
                assert (await get(target, BROWSER_ACCEPT, headers=good)).status_code == 200, target
            chunks = (await get(f"{url}/streams/{sid}/chunks", headers=good)).json()
            assert "".join(c["data"] for c in chunks["chunks"]) == "secret answer"

    # The default hook (no authorize): loopback clients only, for the pages and their files too.
    async with SQLiteRecorder(tmp_path / "d.db") as recorder:
        app = streams_app(recorder=recorder)
        for client, allowed in ((("10.1.2.3", 5000), False), (("127.0.0.1", 5000), True)):
            transport = httpx.ASGITransport(app, client=client)
            async with httpx.AsyncClient(transport=transport, base_url="http://viewer.test") as http:
                for path in ("/", "/_assets/list.js", "/nosuch"):
                    answer = await http.get(path, headers={"accept": BROWSER_ACCEPT})
                    expected = (404 if path == "/nosuch" else 200) if allowed else 403
                    assert answer.status_code == expected, (client, path)


async def test_chunks_come_with_their_times(tmp_path: Path) -> None:
    async with SQLiteRecorder(tmp_path / "s.db") as recorder:
        lab = Lab(recorder)
        tokens = words("alpha beta gamma delta epsilon zeta")
        lab.script("a", tokens, first=0.05, gaps=0.02)
        held = lab.script("live", words("one two three four"), held=True)
        async with serve(lab.app) as url:
            sid = await produce(url, "a")
            answer = await get(f"{url}/streams/{sid}/chunks")
            assert answer.status_code == 200
            body = answer.json()
            assert body["status"] == "completed" and body["text_event"] is None and body["more"] is False
            assert [c["seq"] for c in body["chunks"]] == list(range(1, 7))
            assert [c["data"] for c in body["chunks"]] == tokens
            times = [c["at_ms"] for c in body["chunks"]]
            assert times == sorted(times) and times[0] >= 40 and times[-1] - times[0] >= 80
            assert body["elapsed_ms"] >= times[-1]

            page = (await get(f"{url}/streams/{sid}/chunks", params={"after": "2", "limit": "3"})).json()
            assert [c["seq"] for c in page["chunks"]] == [3, 4, 5] and page["more"] is True
            rest = (await get(f"{url}/streams/{sid}/chunks", params={"after": "5"})).json()
            assert [c["seq"] for c in rest["chunks"]] == [6] and rest["more"] is False
            for bad in ({"after": "-1"}, {"after": "x"}, {"limit": "0"}, {"limit": "10001"}):
                assert (await get(f"{url}/streams/{sid}/chunks", params=bad)).status_code == 400, bad
            assert (await get(f"{url}/streams/nosuch/chunks")).status_code == 404

            async with producing(url, held, "live") as live:
                held.allow(2)
                await held.until_sent(2)
                now = (await get(f"{url}/streams/{live}/chunks")).json()  # a live stream: what it has so far
                assert now["status"] == "streaming" and [c["data"] for c in now["chunks"]] == words("one two")
                await anyio.sleep(0.2)
                later = (await get(f"{url}/streams/{live}/chunks")).json()
                assert later["elapsed_ms"] >= now["elapsed_ms"] + 150  # its clock runs
                held.allow()


async def test_q_searches_the_text_id_key_and_metadata(tmp_path: Path) -> None:
    async with SQLiteRecorder(tmp_path / "s.db") as recorder:
        lab = Lab(recorder)
        lab.script("a", words("The Quick brown fox"))
        lab.script("b", words("jumps over the lazy dog"))
        lab.script("c", words("never finishes"), fail_at=1)
        async with serve(lab.app) as url:
            fox = await produce(url, "a", prompt="about animals")
            dog = await produce(url, "b", key="kennel-7", prompt="about dogs")
            failed = await produce(url, "c", prompt="about failing")
            await recorder.flush()  # (a list reads what is stored)

            async def ids(**params: str) -> list[str]:
                answer = await get(f"{url}/streams/", params=params)
                assert answer.status_code == 200, answer.text
                return [r["id"] for r in answer.json()]

            assert await ids(q="quick BROWN") == [fox]  # the text, in any case
            assert await ids(q="lazy") == [dog]
            assert await ids(q="KENNEL") == [dog]  # the key
            assert await ids(q="about") == [failed, dog, fox]  # metadata (the prompt), newest first
            assert await ids(q="about", limit="2") == [failed, dog]
            assert await ids(q="about", status="completed") == [dog, fox]
            assert await ids(q="about", key="kennel-7") == [dog]
            assert await ids(q=fox[-10:]) == [fox]  # the id
            assert await ids(q="no such words") == []
            assert await ids(q="  ") == [failed, dog, fox]  # blank: no filter
            assert (await get(f"{url}/streams/", params={"q": "x" * 201})).status_code == 400


async def test_events_join_in_the_format_asked_for(tmp_path: Path) -> None:
    async with SQLiteRecorder(tmp_path / "s.db") as recorder:
        lab = Lab(recorder)
        lab.script("a", words("hello there"))
        async with serve(lab.app) as url:
            sid = await produce(url, "a", path="/chat-openai")
            native = await get(f"{url}/streams/{sid}/events")
            assert native.status_code == 200 and '"chat.completion.chunk"' in native.text
            plain = await get(f"{url}/streams/{sid}/events", params={"format": "sse"})
            data = re.findall(r"^data: (.*)$", plain.text, re.M)
            assert data[:2] == ["hello", " there"] and "event: done" in plain.text
            assert re.findall(r"^id: (.*)$", plain.text, re.M) == [f"{sid}:1", f"{sid}:2"]
            assert (await get(f"{url}/streams/{sid}/events", params={"format": "html"})).status_code == 400


async def test_a_streams_text_and_id_never_reach_a_page_as_markup(tmp_path: Path) -> None:
    async with SQLiteRecorder(tmp_path / "s.db") as recorder:
        lab = Lab(recorder)
        lab.script("x", [XSS])
        async with serve(lab.app) as url:
            sid = await produce(url, "x", key='"><script>alert(2)</script>', prompt=XSS)
            for target in (f"{url}/streams/", f"{url}/streams/{sid}"):
                page = await get(target, BROWSER_ACCEPT)
                assert_page(page)  # (no img element, no handler)
                assert "alert(" not in page.text
            crafted = await get(f"{url}/streams/%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E", BROWSER_ACCEPT)
            assert_page(crafted, 404)
            body = next(attrs for tag, attrs in Markup.of(crafted.text).tags if tag == "body")
            assert body["data-stream-id"] == '"><img src=x onerror=alert(1)>'  # a value, not markup
            # the JSON gives the text as it is (the page shows it as text: see the Chromium tests)
            assert (await get(f"{url}/streams/{sid}")).json()["content"] == XSS


# -- in Chromium ----------------------------------------------------------------------------------------
@dataclass
class Browser:
    page: Any
    problems: list[str] = field(default_factory=list)  # page errors, console errors, dialogs
    requests: list[str] = field(default_factory=list)


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium page that notes uncaught errors, console errors (a CSP violation is
    one) and dialogs (an injected ``alert`` would be one); skips when there is no Chromium."""
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found at /usr/bin/chromium or on PATH: install Debian's `chromium` package")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed: pip install -e '.[dev]'")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True,
                                                   timeout=10_000)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(8000)
            page = await context.new_page()
            out = Browser(page)
            page.on("pageerror", lambda error: out.problems.append(f"page error: {error}"))
            page.on("console", lambda m: out.problems.append(f"console: {m.text} ({m.location.get('url')})")
                    if m.type == "error" else None)
            page.on("request", lambda request: out.requests.append(request.url))

            async def on_dialog(dialog: Any) -> None:
                out.problems.append(f"dialog: {dialog.message}")
                await dialog.dismiss()

            page.on("dialog", on_dialog)
            yield out
        finally:
            await browser.close()


def png_size(path: Path) -> tuple[int, int]:
    """A PNG file's width and height (from its header), after checking it is one."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    await page.screenshot(path=str(path), full_page=True)
    width, height = png_size(path)
    assert width >= 1000 and height >= 500 and path.stat().st_size > 30_000, (width, height, path.stat().st_size)
    return path


def paced(n: int, seed: int, *, stall_at: int | None = None) -> list[float]:
    """Gaps between tokens as a model's look: mostly 15 to 60 ms, now and then a longer one."""
    rng = random.Random(seed)
    gaps = [rng.choice([0.015, 0.02, 0.025, 0.03, 0.035, 0.045, 0.06, 0.09]) for _ in range(n)]
    if stall_at is not None:
        gaps[stall_at] = 0.45
    return gaps


def token_texts() -> Iterator[list[str]]:
    sentences = [s + "." for s in ANSWER.split(". ") if s]
    while True:
        yield from (words(s) for s in sentences)


# Playwright's async API runs on asyncio only (as in test_browser.py).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_list_page_shows_badges_filters_and_refreshes_while_live(anyio_backend: str,
                                                                          tmp_path: Path) -> None:
    from playwright.async_api import expect

    async with SQLiteRecorder(tmp_path / "s.db") as recorder:
        lab = Lab(recorder)  # the default hook: Chromium is a loopback client
        texts = token_texts()
        for i in range(3):
            lab.script(f"done{i}", next(texts), first=0.05, gaps=0.005)
        lab.script("failed", next(texts), first=0.05, gaps=0.005, fail_at=4)
        stopped = lab.script("stopped", next(texts), held=True)
        lab.script("x", [XSS])
        live = lab.script("live", words(ANSWER), gaps=0.01, held=True)
        with anyio.fail_after(60):
            async with serve(lab.app) as url, chromium() as browser:
                done = [await produce(url, f"done{i}", key="conv-a" if i else "conv-b", prompt=f"question {i}")
                        for i in range(3)]
                failed = await produce(url, "failed", key="conv-b", prompt="a failing one")
                async with producing(url, stopped, "stopped", prompt="stop me") as cancelled:
                    stopped.allow(3)
                    await stopped.until_sent(3)
                    async with httpx.AsyncClient() as client:
                        assert (await client.post(f"{url}/streams/{cancelled}/cancel")).status_code == 202
                xss = await produce(url, "x", prompt="injection")
                async with producing(url, live, "live", key="conv-live", prompt="watch me") as running:
                    live.allow(12)
                    await live.until_sent(12)
                    await recorder.flush()
                    page = browser.page
                    await page.goto(f"{url}/streams/")
                    rows = page.locator("#rows tr[data-stream-id]")
                    await expect(rows).to_have_count(7)
                    order = [await rows.nth(i).get_attribute("data-stream-id") for i in range(7)]
                    assert order == [running, xss, cancelled, failed, *reversed(done)]  # newest first
                    statuses = [await rows.nth(i).get_attribute("data-status") for i in range(7)]
                    assert statuses == ["streaming", "completed", "cancelled", "failed", "completed", "completed",
                                        "completed"]
                    for i, status in enumerate(statuses):
                        await expect(rows.nth(i).locator(".badge")).to_have_text(status)
                        await expect(rows.nth(i).locator(".badge")).to_have_class(re.compile(rf"\b{status}\b"))
                    await expect(page.locator("#summary")).to_contain_text("1 live: refreshing every second")
                    first_done = rows.nth(6)
                    await expect(first_done.locator(".ttft")).to_have_text(re.compile(r"^\d+ ms$"))
                    await expect(first_done.locator(".duration")).to_have_text(re.compile(r"^\d+ ms$"))
                    await expect(first_done.locator(".chunks")).to_have_text(str(len(lab.scripts["done0"].tokens)))
                    await expect(first_done.locator(".key")).to_have_text("conv-b")
                    await expect(first_done.locator(".endpoint")).to_have_text("GET /chat")
                    # the injected text shows as text
                    await expect(rows.nth(1).locator(".preview")).to_have_text(XSS)
                    assert await page.locator("#rows img").count() == 0
                    # the live row refreshes by itself: its chunk count grows without a reload
                    await expect(rows.first.locator(".chunks")).to_have_text("12")
                    live.allow(20)
                    await expect(rows.first.locator(".chunks")).to_have_text("20", timeout=5000)
                    await screenshot(page, "viewer-list.png")

                    # filters: status, key, text search; each kept in the URL
                    await page.select_option("#f-status", "completed")
                    await expect(rows).to_have_count(4)
                    assert "status=completed" in page.url
                    await page.fill("#f-key", "conv-a")
                    await page.press("#f-key", "Enter")
                    await expect(rows).to_have_count(2)
                    assert {await rows.nth(i).get_attribute("data-stream-id") for i in range(2)} == set(done[1:])
                    await page.click("#f-clear")
                    await expect(rows).to_have_count(7)
                    await page.fill("#f-q", "reconnects by itself")  # words in one stream's text
                    await page.press("#f-q", "Enter")
                    await expect(rows).to_have_count(1)
                    assert "q=reconnects+by+itself" in page.url
                    await expect(rows.first).to_have_attribute("data-stream-id", done[1])
                    await page.fill("#f-q", "no stream says this")
                    await page.press("#f-q", "Enter")
                    await expect(page.locator("#rows td.empty")).to_have_text("No stream matches these filters.")
                    await page.click("#f-clear")

                    # the live one ends: its badge turns without a reload, and the refreshing slows down
                    live.allow()
                    await expect(rows.first).to_have_attribute("data-status", "completed", timeout=5000)
                    await expect(page.locator("#summary")).not_to_contain_text("live")
                    assert browser.problems == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_finished_streams_page_shows_its_text_record_and_timeline(anyio_backend: str,
                                                                          tmp_path: Path) -> None:
    from playwright.async_api import expect

    async with SQLiteRecorder(tmp_path / "s.db") as recorder:
        lab = Lab(recorder)
        tokens = words(ANSWER)
        lab.script("answer", tokens, first=0.35, gaps=paced(len(tokens), 3, stall_at=40))
        lab.script("failed", words("This answer stops half way"), gaps=0.02, fail_at=3)
        lab.script("x", [XSS])
        with anyio.fail_after(60):
            async with serve(lab.app) as url, chromium() as browser:
                sid = await produce(url, "answer", key="conv-42", prompt="How do Server-Sent Events work?")
                record = await stored(recorder, sid)
                assert record is not None and record.status is StreamStatus.COMPLETED
                page = browser.page
                await page.goto(f"{url}/streams/{sid}")
                await expect(page.locator("body")).to_have_attribute("data-status", "completed")
                await expect(page.locator("#status")).to_have_text("completed")
                await expect(page.locator("#text")).to_have_text(record.content)
                meta = page.locator("#meta")
                await expect(meta).to_contain_text("conv-42")
                await expect(meta).to_contain_text("GET /chat")
                await expect(meta).to_contain_text(f"message: {len(tokens)}")
                await expect(page.locator("#metadata")).to_contain_text('"prompt": "How do Server-Sent Events work?"')
                await expect(page.locator("#error")).to_be_hidden()

                # the timeline: one step per chunk up to every character, the first token marked
                timeline = page.locator("#timeline-svg")
                await expect(timeline).to_have_attribute("data-points", str(len(tokens)))
                await expect(timeline).to_have_attribute("data-chars", str(len(record.content)))
                await expect(timeline.locator("path.line")).to_have_count(1)
                steps = await timeline.locator("path.line").get_attribute("d") or ""
                assert steps.count(" V ") == len(tokens)
                await expect(timeline.locator("#first-token")).to_have_count(1)
                ttft = record.metadata["ttft_ms"]
                assert ttft >= 340
                await expect(timeline.locator("text.first-label")).to_have_text(f"first token · {int(ttft + 0.5)} ms")
                await expect(page.locator("#gaps-svg rect.gap")).to_have_count(len(tokens) - 1)
                slow = await page.locator("#gaps-svg rect.gap.slow").count()  # the 450 ms stall (and no more,
                assert 1 <= slow <= 3, slow  # unless a loaded machine made a short sleep long)
                bins = page.locator("#histogram-svg rect.bin")
                assert await bins.count() >= 2
                await expect(page.locator("#plot-stats")).to_contain_text("longest gap")
                await screenshot(page, "viewer-stream.png")
                assert browser.problems == []

                # a failed stream shows its error (as text)
                failed = await produce(url, "failed")
                await page.goto(f"{url}/streams/{failed}")
                await expect(page.locator("#status")).to_have_text("failed")
                await expect(page.locator("#error")).to_be_visible()
                await expect(page.locator("#error")).to_contain_text("the model fell over")
                await expect(page.locator("#text")).to_have_text("This answer stops")

                # injected markup in the text, key and metadata shows as text, and runs nothing
                xss = await produce(url, "x", key=XSS, prompt=XSS)
                await page.goto(f"{url}/streams/{xss}")
                await expect(page.locator("#text")).to_have_text(XSS)
                await expect(page.locator("#meta")).to_contain_text(XSS)
                assert await page.locator("main img").count() == 0
                await page.goto(f"{url}/streams/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
                await expect(page.locator("#status")).to_have_text("not found")
                await expect(page.locator("#title-id")).to_have_text(XSS)
                assert await page.locator("main img").count() == 0
                await anyio.sleep(0.3)  # time for an injected handler to have fired, had there been one
                # no dialog, no error: only the missing stream's 404s (the page's, and its JSON's)
                assert [p.split(" (http")[0] for p in browser.problems] == [
                    "console: Failed to load resource: the server responded with a status of 404 (Not Found)"] * 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_live_streams_page_grows_as_it_streams(anyio_backend: str, tmp_path: Path) -> None:
    from playwright.async_api import expect

    async with SQLiteRecorder(tmp_path / "s.db") as recorder:
        lab = Lab(recorder)
        tokens = words(ANSWER)
        script = lab.script("live", tokens, first=0.3, gaps=paced(len(tokens), 5), held=True)
        with anyio.fail_after(60):
            async with serve(lab.app) as url, chromium() as browser, \
                    producing(url, script, "live", key="conv-live", prompt="Stream it live") as sid:
                page = browser.page
                script.allow(5)
                await script.until_sent(5)
                await page.goto(f"{url}/streams/{sid}")
                text = page.locator("#text")
                timeline = page.locator("#timeline-svg")
                await expect(page.locator("body")).to_have_attribute("data-status", "streaming")
                await expect(page.locator("body")).to_have_class(re.compile(r"\blive\b"))
                await expect(text).to_have_text("".join(tokens[:5]))

                # tokens produced now appear on the page, through the join endpoint
                shown = []
                for upto in (12, 25, 40):
                    script.allow(upto)
                    await script.until_sent(upto)
                    await expect(text).to_have_text("".join(tokens[:upto]))
                    await expect(timeline).to_have_attribute("data-points", str(upto))
                    shown.append(upto)
                    if upto == 25:
                        await expect(page.locator("#status")).to_have_text("streaming")
                        await screenshot(page, "viewer-live.png")
                joins = [u for u in browser.requests if "/events?" in u]
                assert len(joins) == 1 and "format=sse" in joins[0] and "after=5" in joins[0], joins

                script.allow()
                await expect(page.locator("body")).to_have_attribute("data-status", "completed", timeout=8000)
                await expect(page.locator("body")).not_to_have_class(re.compile(r"\blive\b"))
                record = await stored(recorder, sid)
                assert record is not None and record.status is StreamStatus.COMPLETED
                await expect(text).to_have_text(record.content)
                await expect(timeline).to_have_attribute("data-points", str(len(tokens)))
                await expect(page.locator("#meta")).to_contain_text(f"message: {len(tokens)}")
                # the times drawn are the recorded ones now, not the browser's arrival times
                await expect(timeline.locator("text.first-label")).to_have_text(
                    f"first token · {int(record.metadata['ttft_ms'] + 0.5)} ms")
                assert browser.problems == []
    assert shown == [12, 25, 40]
