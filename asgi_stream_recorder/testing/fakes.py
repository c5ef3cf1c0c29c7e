"""Fake token sources: a plain token stream, and OpenAI-shaped chunks without a server.

``fake_token_stream`` yields word-ish tokens (``split_tokens``: a word with the
whitespace after it, shared with :mod:`.openai_server`) that join back to exactly the
given text.
``fake_openai_stream`` yields objects shaped like ``openai``'s ``ChatCompletionChunk``
(``.id``, ``.model``, ``.choices[0].delta.content``, ``.choices[0].finish_reason``,
``.usage``, ``model_dump()``), in the order the API sends them, so adapters can be
tested without the ``openai`` package or a server. ``FakeAsyncOpenAI`` wraps that in a
client with ``chat.completions.create(..., stream=True)``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

import anyio

from .openai_server import split_tokens

__all__ = [
    "FakeAsyncOpenAI",
    "FakeChatCompletionChunk",
    "FakeChoice",
    "FakeDelta",
    "FakeOpenAIStream",
    "FakeStreamError",
    "FakeUsage",
    "fake_openai_stream",
    "fake_token_stream",
    "openai_chunks",
    "split_tokens",
]

class FakeStreamError(RuntimeError):
    """What a fake source raises when told to fail (``fail_after``)."""


async def fake_token_stream(
    text: str, delay: float = 0, fail_after: int | None = None
) -> AsyncIterator[str]:
    """Yield ``text`` as tokens that join back to exactly ``text``.

    ``delay``: seconds to sleep before each token (0 still yields to the event loop, so
    the stream can be cancelled). ``fail_after``: raise :class:`FakeStreamError` once that
    many tokens have been yielded (0: before the first).
    """
    for n, token in enumerate(split_tokens(text)):
        if fail_after is not None and n >= fail_after:
            raise FakeStreamError(f"fake token stream failed after {n} tokens")
        await anyio.sleep(delay)
        yield token
    if fail_after is not None and fail_after >= len(split_tokens(text)):
        # asked to fail after more tokens than there are: fail at the end, never silently succeed
        raise FakeStreamError(f"fake token stream failed after {len(split_tokens(text))} tokens")


# -- OpenAI-shaped chunks ------------------------------------------------------------------


@dataclass(slots=True)
class FakeDelta:
    content: str | None = None
    role: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None


@dataclass(slots=True)
class FakeChoice:
    index: int
    delta: FakeDelta
    finish_reason: str | None = None
    logprobs: Any = None


@dataclass(slots=True)
class FakeUsage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(slots=True)
class FakeChatCompletionChunk:
    """Shaped like ``openai.types.chat.ChatCompletionChunk``."""

    id: str
    model: str
    created: int
    choices: list[FakeChoice] = field(default_factory=list)
    usage: FakeUsage | None = None
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None
    service_tier: str | None = None

    def model_dump(self, *, exclude_none: bool = False, **_: Any) -> dict[str, Any]:
        """A dict like pydantic's ``model_dump`` of the real chunk."""
        data = asdict(self)
        return _drop_none(data) if exclude_none else data

    def model_dump_json(self, *, exclude_none: bool = False, **_: Any) -> str:
        import json

        return json.dumps(self.model_dump(exclude_none=exclude_none), separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def openai_chunks(
    text: str,
    *,
    model: str = "gpt-fake",
    id: str | None = None,
    finish_reason: str = "stop",
    include_usage: bool = True,
    prompt_tokens: int = 7,
) -> list[FakeChatCompletionChunk]:
    """The chunks the Chat Completions API streams for a reply of ``text``.

    First a chunk with ``role="assistant"`` and empty content, then one per token, then
    one with ``finish_reason`` and no content, then (``include_usage``, as with
    ``stream_options={"include_usage": True}``) one with no choices and ``usage``.
    """
    chunk_id = id or f"chatcmpl-fake{uuid.uuid4().hex[:20]}"
    created = int(time.time())
    tokens = split_tokens(text)

    def chunk(choices: list[FakeChoice], usage: FakeUsage | None = None) -> FakeChatCompletionChunk:
        return FakeChatCompletionChunk(chunk_id, model, created, choices, usage)

    chunks = [chunk([FakeChoice(0, FakeDelta(content="", role="assistant"))])]
    chunks += [chunk([FakeChoice(0, FakeDelta(content=t))]) for t in tokens]
    chunks.append(chunk([FakeChoice(0, FakeDelta(), finish_reason=finish_reason)]))
    if include_usage:
        chunks.append(chunk([], FakeUsage(prompt_tokens, len(tokens), prompt_tokens + len(tokens))))
    return chunks


class FakeOpenAIStream:
    """Like ``openai.AsyncStream[ChatCompletionChunk]``: async-iterable, closable, a context manager.

    ``fail_after``: raise :class:`FakeStreamError` once that many *content* chunks have
    been yielded. ``closed`` tells whether the consumer closed it (as an adapter should
    when the client leaves).
    """

    def __init__(
        self,
        text: str,
        *,
        delay: float = 0,
        fail_after: int | None = None,
        model: str = "gpt-fake",
        id: str | None = None,
        finish_reason: str = "stop",
        include_usage: bool = True,
        prompt_tokens: int = 7,
    ) -> None:
        self.chunks = openai_chunks(
            text, model=model, id=id, finish_reason=finish_reason, include_usage=include_usage,
            prompt_tokens=prompt_tokens,
        )
        self.text = text
        self.delay = delay
        self.fail_after = fail_after
        self.closed = False
        self.yielded = 0
        self._iterator = self._iterate()

    async def _iterate(self) -> AsyncIterator[FakeChatCompletionChunk]:
        content = 0
        for chunk in self.chunks:
            if self.closed:
                return
            is_content = bool(chunk.choices) and bool(chunk.choices[0].delta.content)
            if is_content and self.fail_after is not None and content >= self.fail_after:
                raise FakeStreamError(f"fake OpenAI stream failed after {content} content chunks")
            await anyio.sleep(self.delay)
            content += is_content
            self.yielded += 1
            yield chunk

    def __aiter__(self) -> FakeOpenAIStream:
        return self

    async def __anext__(self) -> FakeChatCompletionChunk:
        if self.closed:
            raise StopAsyncIteration
        return await self._iterator.__anext__()

    async def close(self) -> None:
        self.closed = True
        await self._iterator.aclose()  # type: ignore[attr-defined]

    aclose = close

    async def __aenter__(self) -> FakeOpenAIStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def fake_openai_stream(text: str, **options: Any) -> FakeOpenAIStream:
    """A :class:`FakeOpenAIStream` of ``text`` (options: delay, fail_after, model, id, ...)."""
    return FakeOpenAIStream(text, **options)


class _Completions:
    def __init__(self, owner: FakeAsyncOpenAI) -> None:
        self._owner = owner

    async def create(self, *, stream: bool = False, model: str = "gpt-fake", **kwargs: Any) -> FakeOpenAIStream:
        if not stream:
            raise NotImplementedError("FakeAsyncOpenAI only fakes streaming completions (stream=True)")
        self._owner.requests.append({"model": model, "stream": stream, **kwargs})
        include_usage = bool((kwargs.get("stream_options") or {}).get("include_usage", False))
        return FakeOpenAIStream(
            self._owner.reply, model=model, include_usage=include_usage, **self._owner.options
        )


class _Chat:
    def __init__(self, owner: FakeAsyncOpenAI) -> None:
        self.completions = _Completions(owner)


class FakeAsyncOpenAI:
    """A stand-in for ``openai.AsyncOpenAI`` whose ``chat.completions.create(stream=True)``
    streams ``reply``. ``requests`` keeps the keyword arguments of every call."""

    def __init__(self, reply: str, *, delay: float = 0, fail_after: int | None = None) -> None:
        self.reply = reply
        self.options: dict[str, Any] = {"delay": delay, "fail_after": fail_after}
        self.requests: list[dict[str, Any]] = []
        self.chat = _Chat(self)
