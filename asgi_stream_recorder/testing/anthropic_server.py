"""A small Anthropic-compatible server for offline tests: the Messages API, streaming or not.

:class:`FakeAnthropic` is a plain ASGI app (stdlib and anyio only) that answers
``POST /v1/messages`` (with or without the ``/v1`` prefix) from a script given to its
constructor: thinking, text, citations, tool use, usage, ``ping`` events, a mid-stream
``event: error`` or a dropped connection::

    fake = FakeAnthropic("Hello!", thinking="Let me think.", tool_calls=[FakeToolCall("f", '{"a": 1}')],
                         fail_after=2, failure="error", error_type="overloaded_error")

Serve it with any ASGI server on 127.0.0.1 and point the real client at it with
``AsyncAnthropic(base_url=url, api_key="test")``. The stream has the Messages API's
order: ``message_start``, per content block ``content_block_start`` /
``content_block_delta`` / ``content_block_stop``, ``message_delta`` (the stop reason and
the cumulative usage), ``message_stop``. Each request it answered is kept in
:attr:`FakeAnthropic.requests`; credentials (``x-api-key``, ``Authorization``, cookies)
are never stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..app import answer_lifespan
from .openai_server import (
    INVALID_JSON,
    SECRET_HEADERS,
    Failure,
    FakeRequest,
    FakeToolCall,
    Receive,
    Scope,
    Send,
    _json,
    _words,
    read_request,
    split_tokens,
)

__all__ = ["FAILURE_MESSAGE", "UNKNOWN_EVENT", "FakeAnthropic"]

#: The message of the scripted mid-stream error (it names no request data, so no secret).
FAILURE_MESSAGE = "Overloaded"
#: The event type sent when ``unknown_events`` is set: one no client knows, which clients must ignore.
UNKNOWN_EVENT = "content_block_annotation"

_DROP = object()


@dataclass
class FakeAnthropic:
    """An Anthropic-compatible ASGI app that streams a scripted message.

    ``text`` (or explicit ``tokens``) is the answer, in one text block. ``thinking``, when
    given, comes first in a thinking block (``thinking_delta`` per word, then a
    ``signature_delta``). ``citations`` (citation objects) are sent as ``citations_delta``
    on the text block after its text. ``tool_calls`` become ``tool_use`` blocks after the
    text, their ``arguments`` sent as ``input_json_delta`` pieces.

    ``usage`` sets ``input_tokens``, ``output_tokens`` and, when given,
    ``cache_creation_input_tokens`` / ``cache_read_input_tokens``; by default the input
    counts the request's words and the output the thinking, text and tool input deltas.
    ``message_start`` carries the input counts and ``output_tokens: 1``;
    ``message_delta`` carries the final, cumulative counts, as the API sends them.

    ``fail_after=N`` ends the stream after N text tokens: ``failure="error"`` sends
    ``event: error`` with ``error_type`` (then ends the body, as the API does),
    ``failure="drop"`` cuts the connection mid-body. ``pings`` sends a ``ping`` event
    before each content block (the first right after ``message_start``); ``unknown_events`` adds events of a
    type no client knows (:data:`UNKNOWN_EVENT`). ``delay`` sleeps between deltas.
    ``api_key``: when set, requests without ``x-api-key: <api_key>`` (or
    ``Authorization: Bearer <api_key>``) get a 401. ``completed_streams`` and
    ``disconnects`` count streams sent to the end and streams the client left early.
    """

    text: str = "Hello from the fake model!"
    model: str = "claude-fake"
    tokens: Sequence[str] | None = None
    thinking: str = ""
    signature: str = "c2lnbmF0dXJlLWZha2U="
    citations: Sequence[Mapping[str, Any]] = ()
    tool_calls: Sequence[FakeToolCall] = ()
    usage: Mapping[str, int] | None = None
    stop_reason: str | None = None
    fail_after: int | None = None
    failure: Failure = "error"
    error_type: str = "overloaded_error"
    pings: bool = True
    unknown_events: bool = False
    delay: float = 0.0
    message_id: str = "msg_fake0001"
    api_key: str | None = None
    record_requests: bool = True
    requests: list[FakeRequest] = field(default_factory=list)
    #: streams sent to their end, and streams whose client hung up before the end
    completed_streams: int = 0
    disconnects: int = 0

    def __post_init__(self) -> None:
        if self.failure not in ("error", "drop"):
            raise ValueError(f"failure must be 'error' or 'drop', not {self.failure!r}")

    # -- the script ----------------------------------------------------------------------
    @property
    def token_list(self) -> list[str]:
        return list(self.tokens) if self.tokens is not None else split_tokens(self.text)

    @property
    def full_text(self) -> str:
        return "".join(self.token_list)

    def _tool_calls(self) -> list[FakeToolCall]:
        return [FakeToolCall(tc.name, tc.arguments, tc.id or f"toolu_{i}{self.message_id}", tc.pieces)
                for i, tc in enumerate(self.tool_calls)]

    def _usage(self, body: Mapping[str, Any], *, final: bool) -> dict[str, int]:
        given = dict(self.usage or {})
        words = len(_words(body.get("messages", ""))) + len(_words(body.get("system", "")))
        sent = (len(split_tokens(self.thinking)) if self.thinking else 0) + len(self.token_list) + sum(
            len(t.chunks()) for t in self.tool_calls)
        usage = {"input_tokens": given.get("input_tokens", words)}
        for key in ("cache_creation_input_tokens", "cache_read_input_tokens"):
            if key in given:
                usage[key] = given[key]
        usage["output_tokens"] = given.get("output_tokens", sent) if final else 1
        return usage

    def _stop_reason(self) -> str:
        return self.stop_reason or ("tool_use" if self.tool_calls else "end_turn")

    def _message(self, body: Mapping[str, Any], content: list[dict[str, Any]], *, final: bool) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": self._stop_reason() if final else None,
                "stop_sequence": None, "usage": self._usage(body, final=final)}

    def _content(self) -> list[dict[str, Any]]:
        """The message's content blocks, whole (the non-streaming answer)."""
        blocks: list[dict[str, Any]] = []
        if self.thinking:
            blocks.append({"type": "thinking", "thinking": self.thinking, "signature": self.signature})
        text: dict[str, Any] = {"type": "text", "text": self.full_text}
        if self.citations:
            text["citations"] = [dict(c) for c in self.citations]
        blocks.append(text)
        blocks.extend({"type": "tool_use", "id": c.id, "name": c.name, "input": json.loads(c.arguments or "{}")}
                      for c in self._tool_calls())
        return blocks

    def _events(self, body: Mapping[str, Any]) -> Iterator[Any]:
        """The streamed answer: SSE event bytes, sleeps (floats) and the drop marker."""
        yield _event("message_start", message=self._message(body, [], final=False))
        if self.unknown_events:
            yield _event(UNKNOWN_EVENT, note="an event type no client knows")
        blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        if self.thinking:
            blocks.append(({"type": "thinking", "thinking": "", "signature": ""},
                           [{"type": "thinking_delta", "thinking": t} for t in split_tokens(self.thinking)]
                           + [{"type": "signature_delta", "signature": self.signature}]))
        blocks.append(({"type": "text", "text": ""},
                       [{"type": "text_delta", "text": t} for t in self.token_list]
                       + [{"type": "citations_delta", "citation": dict(c)} for c in self.citations]))
        blocks.extend(({"type": "tool_use", "id": c.id, "name": c.name, "input": {}},
                       [{"type": "input_json_delta", "partial_json": p} for p in c.chunks()])
                      for c in self._tool_calls())
        text_sent = 0
        for index, (start, deltas) in enumerate(blocks):
            if self.pings:
                yield _event("ping")
            yield _event("content_block_start", index=index, content_block=start)
            for delta in deltas:
                if delta["type"] == "text_delta":
                    if self.fail_after is not None and text_sent >= self.fail_after:
                        yield _DROP if self.failure == "drop" else _event(
                            "error", error={"type": self.error_type, "message": FAILURE_MESSAGE})
                        return
                    text_sent += 1
                if self.delay:
                    yield float(self.delay)
                yield _event("content_block_delta", index=index, delta=delta)
                if self.unknown_events and text_sent == 1 and delta["type"] == "text_delta":
                    yield _event(UNKNOWN_EVENT, index=index, note="clients ignore what they do not know")
            yield _event("content_block_stop", index=index)
        yield _event("message_delta", delta={"stop_reason": self._stop_reason(), "stop_sequence": None},
                     usage=self._usage(body, final=True))
        yield _event("message_stop")

    # -- ASGI ------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path, headers, body = await read_request(scope, receive)
        if body is INVALID_JSON:
            await _json(send, 400, _error("invalid_request_error", "The request body is not valid JSON."))
            return
        authorized = None
        if self.api_key is not None:
            authorized = self.api_key in (headers.get("x-api-key"), headers.get("authorization", "")[7:])
        if self.record_requests:
            kept = {k: v for k, v in headers.items() if k not in SECRET_HEADERS}
            self.requests.append(FakeRequest(method, scope["path"], kept, body, authorized))
        if authorized is False:
            await _json(send, 401, _error("authentication_error", "invalid x-api-key"))
            return
        if method != "POST" or path != "/messages":
            await _json(send, 404, _error("not_found_error", f"Unknown route {method} {path}."))
            return
        if not isinstance(body, dict):
            await _json(send, 400, _error("invalid_request_error", "Expected a JSON object."))
            return
        if not body.get("stream"):
            await _json(send, 200, self._message(body, self._content(), final=True))
            return
        await self._stream(body, receive, send)

    async def _stream(self, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"),
                                (b"request-id", f"req_{self.message_id}".encode())]})
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
            sent_all = False
            for item in self._events(body):
                if item is _DROP:  # returning without the final message makes the server cut the connection
                    tg.cancel_scope.cancel()
                    return
                if isinstance(item, float):
                    await anyio.sleep(item)
                    continue
                try:
                    await send({"type": "http.response.body", "body": item, "more_body": True})
                except OSError:  # the client is gone
                    self.disconnects += 1
                    tg.cancel_scope.cancel()
                    return
            sent_all = True
            tg.cancel_scope.cancel()
        if sent_all:  # to the end of the script (which may end in an error event); not when the client left
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if self.fail_after is None or self.fail_after >= len(self.token_list):
                self.completed_streams += 1

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnects += 1
        scope.cancel()


def _event(type_: str, **fields: Any) -> bytes:
    text = json.dumps({"type": type_, **fields}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {type_}\ndata: {text}\n\n".encode()


def _error(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}
