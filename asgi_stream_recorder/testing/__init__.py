"""Helpers to test streaming endpoints: an in-process SSE client, fakes, record assertions.

The pytest fixtures (``memory_recorder``, ``sqlite_recorder``, ``sse_client``) come from
:mod:`asgi_stream_recorder.testing.plugin`, registered automatically when the package is
installed. :class:`FakeOpenAI` (an OpenAI-compatible ASGI app to serve) comes from
:mod:`.openai_server`; the fakes here stand in for the ``openai`` client's stream instead.
"""

from __future__ import annotations

from .anthropic_server import FakeAnthropic
from .assertions import assert_recorded, wait_recorded
from .client import ClientDisconnected, LifespanError, SSEClient, SSEClientFactory, SSEStream, sse_client
from .fakes import (
    FakeAsyncOpenAI,
    FakeChatCompletionChunk,
    FakeOpenAIStream,
    FakeStreamError,
    fake_openai_stream,
    fake_token_stream,
    openai_chunks,
    split_tokens,
)
from .openai_server import FakeOpenAI, FakeRequest, FakeToolCall

__all__ = [
    "ClientDisconnected",
    "FakeAnthropic",
    "FakeAsyncOpenAI",
    "FakeChatCompletionChunk",
    "FakeOpenAI",
    "FakeOpenAIStream",
    "FakeRequest",
    "FakeStreamError",
    "FakeToolCall",
    "LifespanError",
    "SSEClient",
    "SSEClientFactory",
    "SSEStream",
    "assert_recorded",
    "fake_openai_stream",
    "fake_token_stream",
    "openai_chunks",
    "split_tokens",
    "sse_client",
    "wait_recorded",
]

