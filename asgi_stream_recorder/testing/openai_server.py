"""A small OpenAI-compatible server for offline tests: chat completions and responses.

:class:`FakeOpenAI` is a plain ASGI app (stdlib and anyio only) that answers
``POST /v1/chat/completions`` and ``POST /v1/responses`` (with or without the ``/v1``
prefix), streaming or not, from a script given to its constructor::

    fake = FakeOpenAI("Hello, world!", model="gpt-test", fail_after=2, failure="drop")

Serve it with any ASGI server on 127.0.0.1 and point a real client at it with
``AsyncOpenAI(base_url=f"{url}/v1", api_key="test")``. Each request it answered is kept
in :attr:`FakeOpenAI.requests` for assertions; credentials (``Authorization``,
``api-key``, cookies) are never stored.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from ..app import answer_lifespan

__all__ = ["FakeOpenAI", "FakeRequest", "FakeToolCall", "split_tokens"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

Failure = Literal["error", "drop"]

#: Headers that carry credentials: never kept in :attr:`FakeOpenAI.requests`.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"})

#: The message of the scripted mid-stream failure (it names no request data, so no secret).
FAILURE_MESSAGE = "The server had an error while processing your request."

def split_tokens(text: str) -> list[str]:
    """Split text into word-sized tokens that join back to exactly ``text``."""
    tokens: list[str] = re.findall(r"\S+\s*|\s+", text)
    return tokens if "".join(tokens) == text else list(text)


@dataclass(frozen=True)
class FakeToolCall:
    """A function call the fake model makes; ``arguments`` is streamed in ``pieces`` parts."""

    name: str
    arguments: str
    id: str = ""
    pieces: int = 3

    def chunks(self) -> list[str]:
        n = max(1, min(self.pieces, len(self.arguments) or 1))
        size = -(-len(self.arguments) // n) or 1
        return [self.arguments[i : i + size] for i in range(0, len(self.arguments), size)] or [""]


@dataclass(frozen=True)
class FakeRequest:
    """One request as the fake server saw it, minus its credentials."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    authorized: bool | None = None  # None: the server checks no key


@dataclass
class FakeOpenAI:
    """An OpenAI-compatible ASGI app that streams a scripted answer.

    ``text`` (or explicit ``tokens``) is the answer; ``tool_calls`` are made after it.
    ``usage`` overrides the token counts (``prompt_tokens``, ``completion_tokens``;
    ``total_tokens`` is their sum); by default the prompt counts the request's words and
    the completion counts the tokens sent. Chat streams send usage only when asked with
    ``stream_options={"include_usage": True}``, as OpenAI does.

    ``fail_after=N`` ends the stream after N text tokens: ``failure="error"`` sends an
    OpenAI error event, ``failure="drop"`` cuts the connection mid-body. ``delay``
    sleeps between tokens. ``api_key``: when set, requests without
    ``Authorization: Bearer <api_key>`` get a 401. ``completed_streams`` and
    ``disconnects`` count streams sent to the end and streams the client left early.
    """

    text: str = "Hello from the fake model!"
    model: str = "gpt-fake"
    tokens: Sequence[str] | None = None
    usage: Mapping[str, int] | None = None
    tool_calls: Sequence[FakeToolCall] = ()
    finish_reason: str | None = None
    fail_after: int | None = None
    failure: Failure = "error"
    delay: float = 0.0
    system_fingerprint: str = "fp_fake0001"
    response_id: str = "fake0001"
    api_key: str | None = None
    record_requests: bool = True
    requests: list[FakeRequest] = field(default_factory=list)
    #: streams sent to their end, and streams whose client hung up before the end
    completed_streams: int = 0
    disconnects: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

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
        return [
            FakeToolCall(tc.name, tc.arguments, tc.id or f"call_{i}{self.response_id}", tc.pieces)
            for i, tc in enumerate(self.tool_calls)
        ]

    def _usage(self, body: Any) -> dict[str, int]:
        given = dict(self.usage or {})
        prompt = given.get("prompt_tokens")
        if prompt is None:
            prompt = len(_words(body.get("messages", body.get("input", ""))) if isinstance(body, dict) else [])
        sent = len(self.token_list) + sum(len(t.chunks()) for t in self.tool_calls)
        completion = given.get("completion_tokens", sent)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": given.get("total_tokens", prompt + completion)}

    def _finish_reason(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")

    # -- ASGI ------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path, headers, body = await read_request(scope, receive)
        if body is INVALID_JSON:
            await _json(send, 400, _error_body("The request body is not valid JSON.", "invalid_request_error"))
            return
        authorized = None
        if self.api_key is not None:
            authorized = headers.get("authorization") == f"Bearer {self.api_key}"
        if self.record_requests:
            kept = {k: v for k, v in headers.items() if k not in SECRET_HEADERS}
            self.requests.append(FakeRequest(method, scope["path"], kept, body, authorized))
        if authorized is False:
            await _json(send, 401, _error_body("Incorrect API key provided.", "invalid_request_error",
                                               code="invalid_api_key"))
            return
        if method == "GET" and path == "/models":
            await _json(send, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": self.created, "owned_by": "asgi-stream-recorder"}]})
            return
        if method != "POST" or path not in ("/chat/completions", "/responses"):
            await _json(send, 404, _error_body(f"Unknown route {method} {path}.", "invalid_request_error"))
            return
        if not isinstance(body, dict):
            await _json(send, 400, _error_body("Expected a JSON object.", "invalid_request_error"))
            return
        chat = path == "/chat/completions"
        if not body.get("stream"):
            await _json(send, 200, self._chat_completion(body) if chat else self._response(body, "completed"))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache")]})
        events = self._chat_events(body) if chat else self._response_events(body)
        sent_all = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
            for item in events:
                if item is _DROP:
                    # Cut the connection mid-body: returning without the final message makes
                    # the server close the connection, which the client sees as a broken read.
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
        if sent_all:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.completed_streams += 1

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnects += 1
        scope.cancel()

    # -- chat completions ----------------------------------------------------------------------
    def _chat_chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
                    with_usage: bool = False) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{self.response_id}", "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": self.system_fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if with_usage:
            chunk["usage"] = None
        return chunk

    def _chat_events(self, body: dict[str, Any]) -> list[Any]:
        options = body.get("stream_options") or {}
        with_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        out: list[Any] = [_data(self._chat_chunk({"role": "assistant", "content": "", "refusal": None},
                                                 with_usage=with_usage))]
        for i, token in enumerate(self.token_list):
            if self.fail_after is not None and i >= self.fail_after:
                out.append(_DROP if self.failure == "drop" else
                           _data({"error": _error_body(FAILURE_MESSAGE, "server_error")["error"]}))
                return out
            if self.delay:
                out.append(float(self.delay))
            out.append(_data(self._chat_chunk({"content": token}, with_usage=with_usage)))
        for index, call in enumerate(self._tool_calls()):
            for n, piece in enumerate(call.chunks()):
                tc: dict[str, Any] = {"index": index, "function": {"arguments": piece}}
                if n == 0:
                    tc.update(id=call.id, type="function")
                    tc["function"]["name"] = call.name
                out.append(_data(self._chat_chunk({"tool_calls": [tc]}, with_usage=with_usage)))
        out.append(_data(self._chat_chunk({}, self._finish_reason(), with_usage=with_usage)))
        if with_usage:
            final = self._chat_chunk({}, with_usage=False)
            final["choices"] = []
            final["usage"] = self._usage(body)
            out.append(_data(final))
        out.append(b"data: [DONE]\n\n")
        return out

    def _chat_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.full_text, "refusal": None}
        calls = self._tool_calls()
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return {
            "id": f"chatcmpl-{self.response_id}", "object": "chat.completion", "created": self.created,
            "model": self.model, "system_fingerprint": self.system_fingerprint,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish_reason()}],
            "usage": self._usage(body),
        }

    # -- responses ---------------------------------------------------------------------------
    def _output(self, text: str, calls: list[FakeToolCall], status: str) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{
            "type": "message", "id": f"msg_{self.response_id}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }]
        output.extend({"type": "function_call", "id": f"fc_{c.id}", "call_id": c.id, "name": c.name,
                       "arguments": c.arguments, "status": status} for c in calls)
        return output

    def _response(self, body: dict[str, Any], status: str, output: list[dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
        done = status == "completed"
        usage = self._usage(body)
        return {
            "id": f"resp_{self.response_id}", "object": "response", "created_at": float(self.created),
            "status": status, "model": self.model, "error": None, "incomplete_details": None,
            "instructions": None, "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0,
            "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "output": (self._output(self.full_text, self._tool_calls(), "completed") if output is None else output),
            "usage": {
                "input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0,
                                                                                "cache_write_tokens": 0},
                "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"],
            } if done else None,
        }

    def _response_events(self, body: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        seq = 0

        def event(type_: str, **fields: Any) -> None:
            nonlocal seq
            out.append(_data({"type": type_, "sequence_number": seq, **fields}, event=type_))
            seq += 1

        item_id = f"msg_{self.response_id}"
        event("response.created", response=self._response(body, "in_progress", []))
        event("response.in_progress", response=self._response(body, "in_progress", []))
        event("response.output_item.added", output_index=0, item={
            "type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []})
        event("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        for i, token in enumerate(self.token_list):
            if self.fail_after is not None and i >= self.fail_after:
                if self.failure == "drop":
                    out.append(_DROP)
                else:
                    event("error", code="server_error", message=FAILURE_MESSAGE, param=None)
                return out
            if self.delay:
                out.append(float(self.delay))
            event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=token,
                  logprobs=[])
        text = self.full_text
        event("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text,
              logprobs=[])
        event("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
              part={"type": "output_text", "text": text, "annotations": [], "logprobs": []})
        output = self._output(text, self._tool_calls(), "completed")
        event("response.output_item.done", output_index=0, item=output[0])
        for n, call in enumerate(self._tool_calls(), start=1):
            fc_id = f"fc_{call.id}"
            event("response.output_item.added", output_index=n, item={
                "type": "function_call", "id": fc_id, "call_id": call.id, "name": call.name, "arguments": "",
                "status": "in_progress"})
            for piece in call.chunks():
                event("response.function_call_arguments.delta", item_id=fc_id, output_index=n, delta=piece)
            event("response.function_call_arguments.done", item_id=fc_id, output_index=n,
                  arguments=call.arguments)
            event("response.output_item.done", output_index=n, item=output[n])
        event("response.completed", response=self._response(body, "completed", output))
        return out


_DROP = object()


def _data(payload: Any, event: str | None = None) -> bytes:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return ((f"event: {event}\n" if event else "") + f"data: {text}\n\n").encode("utf-8")


def _error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _words(value: Any) -> list[str]:
    """The words of a request's messages or input, however nested."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, dict):
        return [w for v in value.values() for w in _words(v)] if "content" not in value else _words(value["content"])
    if isinstance(value, list):
        return [w for v in value for w in _words(v)]
    return []


#: what :func:`read_request` gives for a body that is not JSON
INVALID_JSON: Any = object()


async def read_request(scope: Scope, receive: Receive) -> tuple[str, str, dict[str, str], Any]:
    """A fake API's view of a request: method, path without a ``/v1`` prefix, lower-cased
    headers, and the JSON body (None when empty, :data:`INVALID_JSON` when not JSON)."""
    path: str = scope["path"]
    if path.startswith("/v1/"):
        path = path[3:]
    raw = await _read_body(receive)
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = INVALID_JSON
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    return scope["method"], path, headers, body


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _json(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
