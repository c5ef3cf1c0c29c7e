"""End to end in a real browser: the FastAPI example's chat page in headless Chromium.

Tokens must appear one after another, the stop button must close the connection, and the
stream must then show as ``cancelled`` both in the page's list and in the database. The
browser is the system's Chromium (Debian's ``chromium`` package): this test downloads and
installs nothing, and skips (a failure under CI) when there is none.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from asgi_stream_recorder import SQLiteRecorder, StreamStatus
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
TOKEN_DELAY = 0.15  # seconds per offline token: a stream of ~130 tokens takes ~20 s, far past the stop
TIMEOUT_MS = 5000  # any single wait on the page


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


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


# Playwright's async API drives the browser through asyncio subprocess pipes: it cannot run
# on trio, so this test runs on asyncio only (the server side is covered on both elsewhere).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_chat_page_streams_tokens_and_stop_records_cancelled(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium found at /usr/bin/chromium or on PATH: install Debian's `chromium` package")
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        pytest.skip("the playwright package is not installed: pip install -e '.[dev]'")
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)  # the offline token source, whatever the environment

    db = tmp_path / "streams.db"
    app = create_app(db_path=str(db), token_delay=TOKEN_DELAY)
    started = time.monotonic()
    with anyio.fail_after(20):
        async with serve(app) as url, async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium, args=CHROMIUM_ARGS, headless=True, timeout=10_000
            )
            try:
                page = await browser.new_page(viewport={"width": 1000, "height": 860})
                page.set_default_timeout(TIMEOUT_MS)
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                await page.goto(f"{url}/")
                await expect(page.locator("#source")).to_have_text("tokens: offline")
                rows = page.locator("#streams tr[data-stream-id]")
                answers = page.locator("#transcript .msg.assistant")

                # 1. GET through EventSource: tokens arrive one by one; stop closes the connection.
                await page.fill("#prompt", "How do Server-Sent Events work?")
                await page.press("#prompt", "Enter")
                answer = answers.last
                lengths = await watch_tokens(answer.locator(".text"), until=6)
                await expect(page.locator("#stop")).to_be_enabled()
                await page.click("#stop")
                await expect(answer).to_have_class(re.compile(r"\bstopped\b"))
                shown_get = await answer.locator(".text").text_content() or ""
                await expect(rows.first).to_have_attribute("data-status", "cancelled")
                await expect(rows.first.locator(".status")).to_have_text("cancelled")
                await expect(rows.first).to_contain_text("GET")

                # 2. POST through fetch streaming, stopped the same way (AbortController).
                await page.select_option("#transport", "POST")
                await page.fill("#prompt", "Why keep a record of every stream?")
                await page.click("#send")
                answer = answers.last
                await watch_tokens(answer.locator(".text"), until=3)
                await page.click("#stop")
                await expect(answer).to_have_class(re.compile(r"\bstopped\b"))
                shown_post = await answer.locator(".text").text_content() or ""
                await expect(rows.first).to_have_attribute("data-status", "cancelled")
                await expect(rows.first).to_contain_text("POST")
                await expect(rows).to_have_count(2)

                # 3. A short answer over GET runs to its end: completed, and EventSource does not reconnect.
                await page.select_option("#transport", "GET")
                await page.fill("#max-tokens", "5")
                await page.fill("#prompt", "Say hello")
                await page.click("#send")
                answer = answers.last
                await expect(answer).to_have_class(re.compile(r"\bdone\b"))
                shown_done = await answer.locator(".text").text_content() or ""
                await expect(rows.first).to_have_attribute("data-status", "completed")
                await expect(rows).to_have_count(3)
                await expect(page.locator("#stop")).to_be_disabled()
                ttft_cell = rows.first.locator("td").nth(3)
                await expect(ttft_cell).to_have_text(re.compile(r"^\d+ ms$"))

                await page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
                assert errors == []
            finally:
                await browser.close()

        async with SQLiteRecorder(db) as recorder:
            records = await recorder.list_streams(limit=10)

    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths
    assert [(r.method, r.status) for r in records] == [
        ("GET", StreamStatus.COMPLETED),
        ("POST", StreamStatus.CANCELLED),
        ("GET", StreamStatus.CANCELLED),
    ]
    done, stopped_post, stopped_get = records
    # The page shows a prefix of what the server sent and recorded (a token may have been on
    # its way when the connection closed); a stopped stream is far from its natural end.
    for record, shown in ((stopped_get, shown_get), (stopped_post, shown_post)):
        assert shown and record.content.startswith(shown), (record.content, shown)
        assert 3 <= record.chunk_count < 60
        assert record.metadata["ttft_ms"] > 0 and record.metadata["duration_ms"] > record.metadata["ttft_ms"]
        assert "client_disconnected_at_ms" in record.metadata
    assert stopped_get.metadata["prompt"] == "How do Server-Sent Events work?"
    assert done.content == shown_done and done.chunk_count == 5 and done.metadata["finish_reason"] == "length"
    assert (tmp_path / "chat.png").stat().st_size > 10_000
    assert time.monotonic() - started < 20
