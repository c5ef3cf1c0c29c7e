"""``format="ai-sdk"``: the Vercel AI SDK's UI message stream (what ``useChat`` reads, AI SDK 5+).

One ``data: {json}`` event per part, in the order the SDK's own server sends them: ``start``
(``messageId``: the stream id) right after the response's start, then per run of one kind of
chunk a ``text-*`` or ``reasoning-*`` part (``start`` / ``delta``... / ``end``), tool calls as
``tool-input-start`` / ``tool-input-delta`` and, at the end, ``tool-input-available``;
``finish`` (``finishReason``, and chosen metadata such as usage as ``messageMetadata``), then
``data: [DONE]``. Keep-alives are comments; the response carries
``x-vercel-ai-ui-message-stream: v1``.

Parts carry no ``id:`` line: the SDK's resume asks for the chat's stream by its id and gets the
whole message again (``join_response(recorder, key=chat_id)``), so an event id would be bytes
on every token that no AI SDK client reads. The part ids inside the JSON are the format's own.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..recorders.base import Chunk, StreamStatus
from ..sse import ServerSentEvent, encode
from .base import REFUSAL_EVENT, THINKING_EVENT, TOOL_CALL_EVENT, WireFormat

if TYPE_CHECKING:
    from ..session import StreamSession

__all__ = ["AISDKFormat"]

_DONE = b"data: [DONE]\n\n"
#: at most this many connections' message states are kept; beyond, the one idle longest is
#: forgotten (a connection whose client left gets no last word, which is what forgets it)
_MAX_MESSAGES = 10_000
#: finish reasons of the providers (OpenAI, Anthropic) in the SDK's words; others are "other"
_FINISH_REASONS = {
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop",
    "length": "length", "max_tokens": "length",
    "tool_calls": "tool-calls", "function_call": "tool-calls", "tool_use": "tool-calls", "tool-calls": "tool-calls",
    "content_filter": "content-filter", "refusal": "content-filter", "content-filter": "content-filter",
    "error": "error",
}


def _part(part: dict[str, Any]) -> bytes:
    # (JSON never holds a raw CR or LF: one data line is the whole part)
    return b"data: " + json.dumps(part, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n\n"


class _Tool:
    __slots__ = ("arguments", "id", "name")

    def __init__(self, id: str, name: str) -> None:
        self.id, self.name, self.arguments = id, name, ""


class _Message:
    """What one connection's message has open: the text or reasoning part being streamed, and
    the tool calls whose input is still arriving."""

    __slots__ = ("open", "parts", "started", "stream_id", "tools")

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.started = False  # the ``start`` part went out
        self.open: tuple[str, str] | None = None  # (kind, part id)
        self.parts = 0  # parts opened so far (numbers their ids)
        self.tools: dict[Any, _Tool] = {}  # by the tool call's index, in the order they started


class AISDKFormat(WireFormat):
    """The AI SDK UI message stream; see the module docstring.

    What is recorded maps to parts: the text event to ``text-*``; ``thinking`` events to
    ``reasoning-*``; ``tool_call`` events (the OpenAI chat delta shape, which the OpenAI and
    Anthropic adapters record) to ``tool-input-*``, the input parsed from the arguments' JSON
    at the end (the raw text when it is not JSON); ``refusal`` events to text; any other event
    ``name`` to a ``data-<name>`` part whose ``data`` is the chunk's JSON (or its text).

    ``metadata``: the keys of the stream's metadata sent as the ``finish`` part's
    ``messageMetadata`` (default ``model`` and ``usage``; the rest may be private).
    ``finish_reason``: send ``finishReason`` (from ``metadata["finish_reason"]`` or
    ``["stop_reason"]``, in the SDK's words); False for clients older than ``ai`` 5.0.92,
    whose strict schemas reject it. A stream cancelled on request ends with ``abort``; a
    failure with an ``error`` part whose ``errorText`` is fixed (``error_text``, never the
    exception's text), a shutdown likewise (``shutdown_text``), both then ``[DONE]``.
    """

    name = "ai-sdk"
    headers: Mapping[str, str] = MappingProxyType({"x-vercel-ai-ui-message-stream": "v1"})

    def __init__(self, *, metadata: Iterable[str] = ("model", "usage"), finish_reason: bool = True,
                 error_text: str = "stream failed", shutdown_text: str = "server shutting down") -> None:
        self.metadata_keys = tuple(metadata)
        self.finish_reason = finish_reason
        self.error_text = error_text
        self.shutdown_text = shutdown_text
        self._messages: OrderedDict[int, _Message] = OrderedDict()

    # -- one connection's message ----------------------------------------------------------------
    def _message(self, session: StreamSession, *, fresh: bool = False) -> _Message:
        key = id(session)
        message = self._messages.pop(key, None)
        if fresh or message is None or message.stream_id != session.id:
            message = _Message(session.id)
            if len(self._messages) >= _MAX_MESSAGES:
                self._messages.popitem(last=False)
        self._messages[key] = message
        return message

    def _forget(self, session: StreamSession) -> _Message:
        message = self._message(session)
        del self._messages[id(session)]
        return message

    def _start(self, message: _Message) -> bytes:
        if message.started:
            return b""
        message.started = True
        return _part({"type": "start", "messageId": message.stream_id})

    def _close(self, message: _Message) -> bytes:
        if message.open is None:
            return b""
        kind, part_id = message.open
        message.open = None
        return _part({"type": f"{kind}-end", "id": part_id})

    def _delta(self, message: _Message, kind: str, text: str) -> bytes:
        if not text:
            return b""
        out = b""
        if message.open is None or message.open[0] != kind:
            out = self._close(message)
            message.parts += 1
            message.open = (kind, f"{kind}-{message.parts}")
            out += _part({"type": f"{kind}-start", "id": message.open[1]})
        return out + _part({"type": f"{kind}-delta", "id": message.open[1], "delta": text})

    def _tool_call(self, message: _Message, data: str) -> bytes:
        try:
            call = json.loads(data)
        except ValueError:
            return b""
        if not isinstance(call, dict):
            return b""
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        index = call.get("index", 0)
        index = index if isinstance(index, (int, str)) else 0
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else "" if arguments is None else json.dumps(arguments)
        out = b""
        tool = message.tools.get(index)
        if tool is None:
            out = self._close(message)
            tool = message.tools[index] = _Tool(str(call.get("id") or f"{message.stream_id}-{index}"),
                                                str(function.get("name") or "tool"))
            out += _part({"type": "tool-input-start", "toolCallId": tool.id, "toolName": tool.name})
        if arguments:
            tool.arguments += arguments
            out += _part({"type": "tool-input-delta", "toolCallId": tool.id, "inputTextDelta": arguments})
        return out

    def _finish_tools(self, message: _Message) -> bytes:
        out = b""
        for tool in message.tools.values():
            try:
                value: Any = json.loads(tool.arguments) if tool.arguments.strip() else {}
            except ValueError:
                value = tool.arguments
            out += _part({"type": "tool-input-available", "toolCallId": tool.id, "toolName": tool.name,
                          "input": value})
        return out

    # -- the protocol ------------------------------------------------------------------------------
    def begin(self, session: StreamSession) -> bytes:
        """The ``start`` part; a connection that replays the message from its start begins anew."""
        return self._start(self._message(session, fresh=True))

    def chunk(self, session: StreamSession, chunk: Chunk, extra: ServerSentEvent | None) -> bytes:
        message = self._message(session)
        out = self._start(message)
        if extra is not None and extra.comment is not None:
            out += encode(ServerSentEvent(comment=extra.comment))
        event = chunk.event
        if event == session.text_event or event == REFUSAL_EVENT:
            return out + self._delta(message, "text", chunk.data)
        if event == THINKING_EVENT:
            return out + self._delta(message, "reasoning", chunk.data)
        if event == TOOL_CALL_EVENT:
            return out + self._tool_call(message, chunk.data)
        try:
            data: Any = json.loads(chunk.data)
        except ValueError:
            data = chunk.data
        return out + _part({"type": f"data-{event}", "data": data})

    def end(self, session: StreamSession) -> bytes:
        message = self._forget(session)
        out = self._start(message) + self._close(message) + self._finish_tools(message)
        if session.status is StreamStatus.CANCELLED:  # cancelled on request: what the SDK says when stopped
            return out + _part({"type": "abort"}) + _DONE
        finish: dict[str, Any] = {"type": "finish"}
        if self.finish_reason:
            meta = session.metadata
            reason = meta.get("finish_reason") or meta.get("stop_reason")
            if reason is None:
                finish["finishReason"] = "tool-calls" if message.tools else "stop"
            else:
                finish["finishReason"] = _FINISH_REASONS.get(str(reason), "other")
        chosen = {key: session.metadata[key] for key in self.metadata_keys if key in session.metadata}
        if chosen:
            finish["messageMetadata"] = chosen
        return out + _part(finish) + _DONE

    def _last(self, session: StreamSession, text: str) -> bytes:
        return self._start(self._forget(session)) + _part({"type": "error", "errorText": text}) + _DONE

    def error(self, session: StreamSession) -> bytes:
        return self._last(session, self.error_text)

    def shutdown(self, session: StreamSession) -> bytes:
        return self._last(session, self.shutdown_text)
