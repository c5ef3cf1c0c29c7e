"""Wire formats: how a stream's chunks, its end, an error, a ping and a shutdown look to the client.

The record is the same whatever the format; a format only changes the bytes sent. The
protocol is :class:`WireFormat` (whose defaults are plain SSE); the built-in formats, chosen
by name or passed as objects, are:

* ``"sse"``: plain SSE (``id: <seq>``, the chunk's event name, its text as ``data``), ending
  with ``event: done``; ``"sse-without-done"`` without it;
* ``"openai"``: :class:`OpenAIFormat`, ``chat.completion.chunk`` events and ``data: [DONE]``;
* ``"ai-sdk"``: :class:`AISDKFormat`, the Vercel AI SDK's UI message stream (``useChat``).

Adding one is a module here with a :class:`WireFormat` subclass, and its name in
:data:`FORMATS`. The integrations adapt sources (provider streams) and never make bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from .ai_sdk import AISDKFormat
from .base import REFUSAL_EVENT, SSE_HEADERS, THINKING_EVENT, TOOL_CALL_EVENT, WireFormat, going_away_event
from .openai import OpenAIFormat

__all__ = [
    "FORMATS",
    "REFUSAL_EVENT",
    "SSE",
    "SSE_HEADERS",
    "THINKING_EVENT",
    "TOOL_CALL_EVENT",
    "AISDKFormat",
    "OpenAIFormat",
    "WireFormat",
    "going_away_event",
    "resolve_format",
]

SSE = WireFormat()
_SSE_NO_DONE = WireFormat(done_event=False)

#: The formats known by name (what a stream's record stores, so that a join speaks it too).
FORMATS: dict[str, Callable[[], WireFormat]] = {
    "sse": lambda: SSE,
    "sse-without-done": lambda: _SSE_NO_DONE,
    "openai": OpenAIFormat,
    "ai-sdk": AISDKFormat,
}


def resolve_format(format: str | WireFormat, *, done_event: bool = True) -> WireFormat:
    """A format given by name (see :data:`FORMATS`) or as an object."""
    if isinstance(format, WireFormat):
        return format
    if format == "sse" and not done_event:
        return _SSE_NO_DONE
    make = FORMATS.get(format)
    if make is None:
        names = ", ".join(repr(name) for name in FORMATS)
        raise ValueError(f"format must be one of {names} or a WireFormat, not {format!r}")
    return make()
