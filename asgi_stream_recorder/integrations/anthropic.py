"""Anthropic Messages streams in.

:func:`anthropic_text` turns the stream of ``client.messages.create(..., stream=True)``
or of the ``client.messages.stream(...)`` helper into the text to send, and puts
``model``, ``response_id`` (the message id), ``stop_reason`` (also as ``finish_reason``,
so records from OpenAI and Anthropic read alike), ``stop_sequence``, ``usage`` and
``request_id`` into the recorded stream's metadata::

    @recorded_stream
    async def chat(request):
        return anthropic_text(client.messages.create(model=..., max_tokens=..., messages=..., stream=True))

What is not answer text is recorded as its own events and stays out of the record's
text: thinking as ``ServerSentEvent(<thinking text>, event="thinking")``; each tool use,
once its input is complete, as one ``event="tool_call"`` in the OpenAI adapter's shape
(``{"index", "id", "type": "function", "function": {"name", "arguments": <the assembled
input JSON>}}``), so ``format="openai"`` sends it to OpenAI clients as a tool call;
server tool use (web search and the like) the same way as ``event="server_tool_use"``;
citations as ``event="citation"`` (the citation object as JSON).

Usage is the Messages API's own (``input_tokens``, ``output_tokens``, the cache counts
when present): ``message_start`` gives the first counts and each ``message_delta``
replaces them with its cumulative ones (never summed). A mid-stream ``event: error``
(``overloaded_error`` and the like) or a dropped connection propagates: the stream is
recorded ``failed`` with its partial text, the provider's error type goes into
``metadata["error_type"]``, and the client gets the response's safe ``event: error``.
``ping`` events and event types this module does not know are ignored.

``anthropic`` itself is optional: nothing here imports it at run time.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from ..session import current_stream
from ..sse import ServerSentEvent
from ._provider import close_stream, event_dict
from .openai import TOOL_CALL_EVENT, ProviderStreamError

__all__ = [
    "CITATION_EVENT",
    "SERVER_TOOL_USE_EVENT",
    "THINKING_EVENT",
    "TOOL_CALL_EVENT",
    "ProviderStreamError",
    "anthropic_text",
]

log = logging.getLogger("asgi_stream_recorder")

#: Event name of recorded thinking text (``thinking_delta``).
THINKING_EVENT = "thinking"
#: Event name of recorded citations (``citations_delta``), the citation object as JSON.
CITATION_EVENT = "citation"
#: Event name of recorded server tool use (web search, code execution, ...), shaped as a tool call.
SERVER_TOOL_USE_EVENT = "server_tool_use"

#: Content blocks whose input arrives as ``input_json_delta``, and the event each is recorded as.
_TOOL_BLOCKS = {"tool_use": TOOL_CALL_EVENT, "server_tool_use": SERVER_TOOL_USE_EVENT}
#: The raw event types read; every other type (``ping``, the helper's own ``text`` /
#: ``thinking`` / ``input_json`` events, types added later) is ignored.
_HANDLED = frozenset({"message_start", "content_block_start", "content_block_delta", "content_block_stop",
                      "message_delta", "error"})


async def anthropic_text(
    stream: AsyncIterable[Any] | Awaitable[AsyncIterable[Any]] | AbstractAsyncContextManager[AsyncIterable[Any]],
) -> AsyncGenerator[str | ServerSentEvent, None]:
    """Yield the answer text of an Anthropic Messages stream, recording the rest on the current stream.

    ``stream`` is what ``await client.messages.create(..., stream=True)`` returns, or that
    call's un-awaited coroutine; or the stream of ``async with client.messages.stream(...)
    as stream``, or the ``client.messages.stream(...)`` manager itself (entered here and
    exited when done). Items may also be plain dicts of the raw event shapes. Outside a
    recorded stream it only yields. When it is closed early (the client left) it closes
    the provider's stream, which stops the generation.
    """
    if inspect.isawaitable(stream):
        stream = await stream
    manager = None
    if isinstance(stream, AbstractAsyncContextManager) and not isinstance(stream, AsyncIterable):
        manager, stream = stream, await stream.__aenter__()
    try:
        metadata: dict[str, Any] = current_stream().metadata
    except LookupError:
        metadata = {}
    state = _State(metadata)
    iterator = stream
    try:
        request_id = _request_id(stream)
        if request_id:
            metadata["request_id"] = request_id
        iterator = aiter(stream)
        async for item in iterator:
            type_ = item.get("type") if isinstance(item, Mapping) else getattr(item, "type", None)
            if type_ in _HANDLED:
                for out in state.event(type_, _as_dict(item)):
                    yield out
    except Exception as exc:
        error_type = getattr(exc, "type", None)  # anthropic.APIStatusError: the body's error.type
        if isinstance(error_type, str) and "error_type" not in metadata:
            metadata["error_type"] = error_type
        raise
    finally:
        try:
            if iterator is not stream:
                await _close(iterator)
            await _close(stream)
        finally:
            if manager is not None:
                await manager.__aexit__(None, None, None)

def _request_id(stream: Any) -> str | None:
    """The provider's ``request-id`` response header (what its support asks for), if known."""
    headers = getattr(getattr(stream, "response", None), "headers", None)
    value = headers.get("request-id") if headers is not None else None
    return value if isinstance(value, str) else None


async def _close(stream: Any) -> None:
    await close_stream(stream, "Anthropic")


def _as_dict(item: Any) -> dict[str, Any]:
    return event_dict(item, "anthropic_text", "Anthropic")


class _ToolUse:
    """A tool use block being received: its name, id and the input JSON so far."""

    __slots__ = ("event", "id", "name", "start_input", "parts")

    def __init__(self, event: str, block: Mapping[str, Any]) -> None:
        self.event = event
        self.id = str(block.get("id") or "")
        self.name = str(block.get("name") or "")
        self.start_input = block.get("input")
        self.parts: list[str] = []

    def arguments(self) -> str:
        """The assembled input JSON (the block's start input when no delta came, e.g. no arguments)."""
        joined = "".join(self.parts)
        if joined.strip():
            return joined
        return json.dumps(self.start_input if self.start_input is not None else {}, ensure_ascii=False)


class _State:
    """What one adapted stream remembers: the metadata sink, the usage so far, open tool uses."""

    __slots__ = ("metadata", "usage", "tools", "counts")

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata
        self.usage: dict[str, Any] = {}
        self.tools: dict[Any, _ToolUse] = {}  # content block index -> tool use in progress
        self.counts: dict[str, int] = {}  # event name -> tool uses sent (the next call's index)

    def _usage(self, usage: Any) -> None:
        """Take the newest counts: each ``message_delta``'s usage is cumulative, so it replaces."""
        if isinstance(usage, Mapping):
            self.usage.update((k, v) for k, v in usage.items() if v is not None)
            self.metadata["usage"] = dict(self.usage)

    def event(self, type_: str, event: dict[str, Any]) -> list[str | ServerSentEvent]:
        if type_ == "content_block_delta":
            return self._delta(event.get("index"), event.get("delta") or {})
        if type_ == "content_block_start":
            return self._block_start(event.get("index"), event.get("content_block") or {})
        if type_ == "content_block_stop":
            tool = self.tools.pop(event.get("index"), None)
            if tool is None:
                return []
            index = self.counts[tool.event] = self.counts.get(tool.event, -1) + 1
            return [ServerSentEvent({"index": index, "id": tool.id, "type": "function",
                                     "function": {"name": tool.name, "arguments": tool.arguments()}},
                                    event=tool.event)]
        if type_ == "message_start":
            message = event.get("message") or {}
            for key, name in (("model", "model"), ("id", "response_id")):
                if message.get(key):
                    self.metadata[name] = message[key]
            self._usage(message.get("usage"))
        elif type_ == "message_delta":
            delta = event.get("delta") or {}
            if delta.get("stop_reason"):
                self.metadata["stop_reason"] = self.metadata["finish_reason"] = delta["stop_reason"]
            if delta.get("stop_sequence"):
                self.metadata["stop_sequence"] = delta["stop_sequence"]
            self._usage(event.get("usage"))
        elif type_ == "error":
            error = event.get("error") or {}
            error_type = error.get("type") if isinstance(error, Mapping) else None
            message = (error.get("message") if isinstance(error, Mapping) else None) or "the provider reported an error"
            if error_type:
                self.metadata["error_type"] = error_type
            raise ProviderStreamError(f"{error_type}: {message}" if error_type else message)
        return []

    def _block_start(self, index: Any, block: Mapping[str, Any]) -> list[str | ServerSentEvent]:
        kind = block.get("type")
        if kind in _TOOL_BLOCKS:
            self.tools[index] = _ToolUse(_TOOL_BLOCKS[kind], block)
        elif kind == "text" and block.get("text"):
            return [block["text"]]
        elif kind == "thinking" and block.get("thinking"):
            return [ServerSentEvent(block["thinking"], event=THINKING_EVENT)]
        return []

    def _delta(self, index: Any, delta: Mapping[str, Any]) -> list[str | ServerSentEvent]:
        kind = delta.get("type")
        if kind == "text_delta":
            return [delta["text"]] if delta.get("text") else []
        if kind == "thinking_delta":
            return [ServerSentEvent(delta["thinking"], event=THINKING_EVENT)] if delta.get("thinking") else []
        if kind == "input_json_delta":
            tool = self.tools.get(index)
            if tool is None:  # input for a block we were not told about: keep it as a nameless tool use
                tool = self.tools[index] = _ToolUse(TOOL_CALL_EVENT, {})
            tool.parts.append(str(delta.get("partial_json") or ""))
        elif kind == "citations_delta" and delta.get("citation"):
            return [ServerSentEvent(delta["citation"], event=CITATION_EVENT)]
        return []
