"""OpenAI streams in, OpenAI-compatible streams out.

In: :func:`openai_text` turns the stream of ``client.chat.completions.create(...,
stream=True)`` or of ``client.responses.create(..., stream=True)`` into the text to
send, and puts ``model``, ``finish_reason``, ``usage``, ``response_id``,
``system_fingerprint`` (and, for the Responses API, ``status``) into the recorded
stream's metadata::

    @recorded_stream
    async def chat(request):
        stream = await client.chat.completions.create(model=..., messages=..., stream=True,
                                                      stream_options={"include_usage": True})
        async for text in openai_text(stream):
            yield text

Tool-call deltas come out as ``ServerSentEvent(<delta as JSON>, event="tool_call")``, so
they are recorded as their own events and stay out of the record's text. A provider
error mid-stream (an ``openai.APIError``, a dropped connection, a Responses ``error``
or ``response.failed`` event) propagates: the stream is recorded ``failed`` with its
partial text, and the client gets the response's safe ``event: error``.

Out: ``format="openai"`` on the decorator or the response sends every recorded text chunk
as a ``chat.completion.chunk`` and ends with ``data: [DONE]``, so any OpenAI client can
consume the endpoint. That format lives in :mod:`asgi_stream_recorder.formats.openai` with
the others; :class:`OpenAIFormat` and the event names are re-exported here, as before.

``openai`` itself is optional: nothing here imports it at run time.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Mapping
from typing import Any

from ..formats.base import REFUSAL_EVENT, TOOL_CALL_EVENT
from ..formats.openai import DEFAULT_MODEL, OpenAIFormat, chat_usage
from ..session import current_stream
from ..sse import ServerSentEvent
from ._provider import close_stream, event_dict

__all__ = [
    "DEFAULT_MODEL",
    "REFUSAL_EVENT",
    "TOOL_CALL_EVENT",
    "OpenAIFormat",
    "ProviderStreamError",
    "openai_text",
]

log = logging.getLogger("asgi_stream_recorder")


class ProviderStreamError(RuntimeError):
    """The provider reported a failure inside the stream (Responses ``error`` / ``response.failed``)."""


# -- in ----------------------------------------------------------------------------------------
async def openai_text(
    stream: AsyncIterable[Any] | Awaitable[AsyncIterable[Any]],
) -> AsyncGenerator[str | ServerSentEvent, None]:
    """Yield the text of an OpenAI stream, recording its metadata on the current stream.

    ``stream`` is what ``await client.chat.completions.create(..., stream=True)`` or
    ``await client.responses.create(..., stream=True)`` returns (the API is told apart
    per event), or that call's un-awaited coroutine. Items may also be plain dicts of
    the same shapes. Outside a recorded stream it only yields. When it is closed early
    (the client left) it closes the provider's stream, which stops the generation.
    """
    if inspect.isawaitable(stream):
        stream = await stream
    try:
        metadata: dict[str, Any] = current_stream().metadata
    except LookupError:
        metadata = {}
    state = _State(metadata)
    iterator = aiter(stream)
    try:
        async for item in iterator:
            data = _as_dict(item)
            type_ = data.get("type")
            if isinstance(type_, str) and ("choices" not in data):
                for out in state.response_event(type_, data):
                    yield out
            else:
                for out in state.chat_chunk(data):
                    yield out
    finally:
        if iterator is not stream:
            await _close(iterator)
        await _close(stream)


async def _close(stream: Any) -> None:
    await close_stream(stream, "OpenAI")


def _as_dict(item: Any) -> dict[str, Any]:
    return event_dict(item, "openai_text", "OpenAI")


class _State:
    """What one adapted stream remembers: the metadata sink and the Responses tool-call indexes."""

    __slots__ = ("metadata", "tool_index", "tool_count", "saw_tool_call")

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata
        self.tool_index: dict[Any, int] = {}  # Responses item id / ("output", index) -> chat tool index
        self.tool_count = 0
        self.saw_tool_call = False

    def _note(self, source: Mapping[str, Any], *fields: tuple[str, str]) -> None:
        """Copy the given fields (and the usage, in one shape for both APIs) into the metadata."""
        for key, name in fields:
            value = source.get(key)
            if value is not None:
                self.metadata[name] = value
        usage = chat_usage(source.get("usage"))
        if usage is not None:
            self.metadata["usage"] = usage

    def chat_chunk(self, chunk: dict[str, Any]) -> list[str | ServerSentEvent]:
        self.metadata["openai_api"] = "chat.completions"
        self._note(chunk, ("model", "model"), ("id", "response_id"), ("system_fingerprint", "system_fingerprint"),
                   ("service_tier", "service_tier"))
        out: list[str | ServerSentEvent] = []
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if index == 0:
                if content:
                    out.append(content)
                if delta.get("refusal"):
                    out.append(ServerSentEvent(delta["refusal"], event=REFUSAL_EVENT))
                for call in delta.get("tool_calls") or ():
                    out.append(ServerSentEvent(call, event=TOOL_CALL_EVENT))
                if delta.get("function_call"):  # the deprecated single function call
                    out.append(ServerSentEvent({"index": 0, "type": "function", "function": delta["function_call"]},
                                               event=TOOL_CALL_EVENT))
                if choice.get("finish_reason"):
                    self.metadata["finish_reason"] = choice["finish_reason"]
            elif content:  # n > 1: further choices are kept, as their own events
                out.append(ServerSentEvent({"index": index, "content": content}, event="choice"))
        return out

    def response_event(self, type_: str, event: dict[str, Any]) -> list[str | ServerSentEvent]:
        meta = self.metadata
        if type_ == "response.output_text.delta":
            delta = event.get("delta")
            return [delta] if delta else []
        meta["openai_api"] = "responses"
        if type_ == "response.refusal.delta":
            return [ServerSentEvent(event["delta"], event=REFUSAL_EVENT)] if event.get("delta") else []
        if type_ == "response.output_item.added":
            item = event.get("item") or {}
            if item.get("type") != "function_call":
                return []
            index = self._next_tool_index(item.get("id"))
            self.tool_index[("output", event.get("output_index"))] = index
            return [ServerSentEvent({"index": index, "id": item.get("call_id") or item.get("id"), "type": "function",
                                     "function": {"name": item.get("name", ""),
                                                  "arguments": item.get("arguments") or ""}},
                                    event=TOOL_CALL_EVENT)]
        if type_ == "response.function_call_arguments.delta":
            by_position = self.tool_index.get(("output", event.get("output_index")))
            known = self.tool_index.get(event.get("item_id"), by_position)
            # arguments for a call we were not told about get the next index
            index = known if known is not None else self._next_tool_index(event.get("item_id"))
            return [ServerSentEvent({"index": index, "function": {"arguments": event.get("delta", "")}},
                                    event=TOOL_CALL_EVENT)]
        if type_ == "error":
            code, message = event.get("code"), event.get("message") or "the provider reported an error"
            raise ProviderStreamError(f"{code}: {message}" if code else message)
        response = event.get("response")
        if isinstance(response, Mapping):
            self._response(response)
            if type_ == "response.failed":
                error = response.get("error") or {}
                message = error.get("message") if isinstance(error, Mapping) else None
                raise ProviderStreamError(message or "the provider reported the response as failed")
        return []

    def _next_tool_index(self, item_id: Any) -> int:
        index = self.tool_index.get(item_id)
        if index is None:
            index = self.tool_index[item_id] = self.tool_count
            self.tool_count += 1
        self.saw_tool_call = True
        return index

    def _response(self, response: Mapping[str, Any]) -> None:
        self._note(response, ("model", "model"), ("id", "response_id"), ("status", "status"),
                   ("service_tier", "service_tier"))
        status = response.get("status")
        if status == "completed":
            self.metadata["finish_reason"] = "tool_calls" if self.saw_tool_call else "stop"
        elif status == "incomplete":
            details = response.get("incomplete_details") or {}
            reason = details.get("reason") if isinstance(details, Mapping) else None
            self.metadata["finish_reason"] = "content_filter" if reason == "content_filter" else "length"
