"""What both example apps share: settings from the environment, the token sources, the chat
page, the conversation key and the authorization hook of the mounted streams app.

The token source is an offline generator unless a key is set: with ``OPENAI_API_KEY`` an
OpenAI-compatible model streams the answer (``OPENAI_BASE_URL`` and ``OPENAI_MODEL`` pick
the server and the model), else with ``ANTHROPIC_API_KEY`` an Anthropic model does
(``ANTHROPIC_BASE_URL``, ``ANTHROPIC_MODEL``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from asgi_stream_recorder import ServerSentEvent, current_stream
from asgi_stream_recorder.integrations.anthropic import anthropic_text
from asgi_stream_recorder.integrations.openai import openai_text

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Settings",
    "Token",
    "authorize",
    "chat_page",
    "conversation_key",
    "generate",
    "offline_tokens",
    "openai_tokens",
]

STATIC = Path(__file__).parent / "static"

#: What a token source yields: text, or (from a model) a named event such as a tool call.
Token = str | ServerSentEvent

#: Upper bound on ``max_tokens`` a client may ask for (the page's default is far below).
DEFAULT_MAX_TOKENS = 400
_MAX_TOKENS_LIMIT = 4000


@dataclass
class Settings:
    """Everything an example reads from the environment, overridable by the app factory."""

    db_path: str = field(default_factory=lambda: os.environ.get("ASGI_STREAM_RECORDER_DB", "streams.db"))
    #: seconds between two offline tokens (the first one takes three times as long)
    token_delay: float = field(default_factory=lambda: float(os.environ.get("EXAMPLE_TOKEN_DELAY", "0.05")))
    openai_api_key: str | None = field(default_factory=lambda: os.environ.get("OPENAI_API_KEY") or None)
    openai_base_url: str | None = field(default_factory=lambda: os.environ.get("OPENAI_BASE_URL") or None)
    openai_model: str = field(default_factory=lambda: os.environ.get("OPENAI_MODEL") or "gpt-4o-mini")
    anthropic_api_key: str | None = field(default_factory=lambda: os.environ.get("ANTHROPIC_API_KEY") or None)
    anthropic_base_url: str | None = field(default_factory=lambda: os.environ.get("ANTHROPIC_BASE_URL") or None)
    anthropic_model: str = field(default_factory=lambda: os.environ.get("ANTHROPIC_MODEL") or "claude-sonnet-5")

    _openai_client: Any = field(default=None, init=False, repr=False)
    _anthropic_client: Any = field(default=None, init=False, repr=False)

    @classmethod
    def overridden(cls, *, db_path: str | None = None, token_delay: float | None = None) -> Settings:
        """The environment's settings, with what the app factory was given instead."""
        given = {"db_path": db_path, "token_delay": token_delay}
        return cls(**{name: value for name, value in given.items() if value is not None})

    @property
    def source(self) -> str:
        """``openai`` with ``OPENAI_API_KEY``, else ``anthropic`` with ``ANTHROPIC_API_KEY``, else ``offline``."""
        if self.openai_api_key:
            return "openai"
        return "anthropic" if self.anthropic_api_key else "offline"

    def openai_client(self) -> Any:
        """One ``openai.AsyncOpenAI`` per app (its connection pool is reused), made on first use."""
        if self._openai_client is None:
            import openai

            self._openai_client = openai.AsyncOpenAI(api_key=self.openai_api_key, base_url=self.openai_base_url)
        return self._openai_client

    def anthropic_client(self) -> Any:
        """One ``anthropic.AsyncAnthropic`` per app, made on first use."""
        if self._anthropic_client is None:
            import anthropic

            self._anthropic_client = anthropic.AsyncAnthropic(api_key=self.anthropic_api_key,
                                                              base_url=self.anthropic_base_url)
        return self._anthropic_client

    async def aclose(self) -> None:
        """Close the model clients that were made: call it at the app's shutdown."""
        clients = (self._openai_client, self._anthropic_client)
        self._openai_client = self._anthropic_client = None
        for client in clients:
            if client is not None:
                await client.close()


def clamp_max_tokens(value: int | None) -> int:
    if value is None:
        return DEFAULT_MAX_TOKENS
    return max(1, min(int(value), _MAX_TOKENS_LIMIT))


# -- the offline token source -----------------------------------------------------------------
_ANSWERS = [
    "Streaming a model's answer token by token makes the wait feel shorter: the first words "
    "arrive after a fraction of a second, and the reader starts while the rest is still being "
    "written.\n\nServer-Sent Events are the simplest way to do that over plain HTTP. The server "
    "keeps the response open and writes one small event per token; the browser's EventSource "
    "reads them as they come, and reconnects on its own if the network drops. Each event here "
    "carries an id, the stream and its sequence number, so a browser that lost the connection "
    "asks for the rest of the same answer, and the record can say exactly what was sent.\n\n"
    "Press stop to cancel the generation on the server: the recorded stream is marked "
    "cancelled with everything that was sent so far.",
    "Every stream this page starts is recorded: when it began, each chunk with its sequence "
    "number and its time, how long the first token took, how long the whole answer took, and "
    "how it ended. A stream that runs to its end is completed; one stopped on request is "
    "cancelled; one whose generator raised is failed; one the server itself had to stop is "
    "interrupted. A browser that drops in the middle comes back for the rest, and a second tab "
    "can watch the same answer live.\n\nThe recorder never sits on the path of a token. Chunks go into a bounded "
    "queue, and a writer task stores them in batches, one transaction at a time, in a single "
    "SQLite file by default. That keeps the stream fast for the browser, and the record "
    "complete for whoever reads it later: a support engineer, an evaluation job, or you.",
    "A language model writes its answer one token at a time, and there is no reason to make "
    "the reader wait for the last one. Send each token the moment it exists, and keep a copy.\n\n"
    "The copy matters more than it seems. It tells you how long users waited before anything "
    "appeared, which answers were abandoned half-way, and what exactly each person saw, in "
    "order, even when the connection broke in the middle. With that, a slow model, a flaky "
    "proxy or a confusing answer stops being a guess and becomes a row you can look at.",
]
_TOKEN = re.compile(r"\s*\S+")


async def offline_tokens(prompt: str, *, delay: float, max_tokens: int) -> AsyncIterator[str]:
    """A realistic, deterministic answer for ``prompt``, word by word, with no network."""
    digest = hashlib.sha256(prompt.strip().lower().encode()).digest()
    answer = _ANSWERS[digest[0] % len(_ANSWERS)]
    topic = " ".join(prompt.split()[:8]) or "your question"
    text = f"You asked: \u201c{topic}\u201d. Here is a demo answer, generated offline.\n\n{answer}"
    stream = current_stream()
    stream.metadata.update(model="offline-demo", token_delay_s=delay)
    await anyio.sleep(delay * 3)  # "thinking": the first token takes longer, as with a real model
    for count, token in enumerate(_TOKEN.findall(text), start=1):
        if count > max_tokens:
            stream.metadata["finish_reason"] = "length"
            return
        yield token
        await anyio.sleep(delay)
    stream.metadata["finish_reason"] = "stop"


# -- the OpenAI-compatible token source ---------------------------------------------------------
async def openai_tokens(
    prompt: str, *, settings: Settings, max_tokens: int, client: Any = None
) -> AsyncIterator[Token]:
    """The model's answer as text deltas (``client``: an ``openai.AsyncOpenAI``, the app's if None).

    ``openai_text`` records the model, finish reason and token usage with the stream; a
    tool call or refusal would come out as its own named event (the page shows only text).
    """
    if client is None:
        client = settings.openai_client()
    current_stream().metadata["model"] = settings.openai_model
    response = await client.chat.completions.create(
        model=settings.openai_model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    try:
        async for item in openai_text(response):
            yield item
    finally:
        await response.close()  # when our client leaves, stop the generation upstream too


# -- the Anthropic token source ----------------------------------------------------------------
async def anthropic_tokens(prompt: str, *, settings: Settings, max_tokens: int) -> AsyncIterator[Token]:
    """The model's answer as text (``anthropic_text`` records model, stop reason and usage)."""
    stream = settings.anthropic_client().messages.create(
        model=settings.anthropic_model, max_tokens=max_tokens, stream=True,
        messages=[{"role": "user", "content": prompt}],
    )
    async with aclosing(anthropic_text(stream)) as items:
        async for item in items:
            yield item


def generate(prompt: str, *, settings: Settings, max_tokens: int | None) -> AsyncIterator[Token]:
    """The token source the settings choose; it also records the prompt with the stream."""
    limit = clamp_max_tokens(max_tokens)
    current_stream().metadata.update(prompt=prompt[:500], source=settings.source, max_tokens=limit)
    if settings.source == "openai":
        return openai_tokens(prompt, settings=settings, max_tokens=limit)
    if settings.source == "anthropic":
        return anthropic_tokens(prompt, settings=settings, max_tokens=limit)
    return offline_tokens(prompt, delay=settings.token_delay, max_tokens=limit)


# -- the page, the conversation key and who may use the streams app --------------------------------
def chat_page(framework: str, source: str) -> str:
    """The chat page (one static file for both examples), naming the framework that serves it
    and the token source the settings chose."""
    page = (STATIC / "chat.html").read_text(encoding="utf-8")
    return page.replace("{{framework}}", framework).replace("{{source}}", source)


_CONVERSATION = re.compile(r"[A-Za-z0-9_-]{1,64}")


def conversation_key(request: Any) -> str | None:
    """The stream's key: the page's conversation id (``?conversation=``), so that a reloaded
    page finds the answer still streaming (``GET /streams/?key=...&status=streaming``).
    Anything else than a short id is not a key."""
    value = request.query_params.get("conversation")
    return value if isinstance(value, str) and _CONVERSATION.fullmatch(value) else None


def authorize(request: Any, action: str, stream_id: str | None) -> bool:
    """The streams app's hook (``action``: list, read, follow, cancel, or asset: the viewer
    pages' scripts and style sheet). The demo serves its
    own machine, so only loopback clients may read, follow or stop recorded streams. A real
    app checks the signed-in user here: recorded streams hold what your users typed, and a
    stop request ends someone's answer."""
    host = request.client.host if request.client is not None else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
