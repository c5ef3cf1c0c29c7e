"""``format="ai-sdk"`` read by the Vercel AI SDK's own client code, and one home for wire formats
(issue 14, parts 2 and 3).

The client is the npm package ``ai`` run in Node (``tests/node/chat.mjs``): the ``Chat`` that
``useChat`` runs, over its ``DefaultChatTransport``, in every version ``tests/node/package.json``
pins: 5.0.0 (the first AI SDK 5, whose part schemas are strict and know no ``finishReason``, so
the endpoint for it says ``finish_reason=False``), 5.0.92 (strict, with ``finishReason``: any key
we sent too many would fail it), the latest 6 and the latest 7. Each, against a real server
(uvicorn on asyncio, hypercorn on trio):

* a chat turn: reasoning, text, a tool call and a data part arrive as the message's parts, the
  message id is the stream's id, ``finish`` carries the reason and the chosen metadata only;
* resume while streaming (the AI SDK's ``GET {api}/{chatId}/stream``, served by
  ``join_response(key=chat_id)``): the first client hangs up halfway, the resumed one gets the
  whole message, one generation;
* ``204`` (nothing to resume) before a chat's first stream and after its end;
* a failure and a shutdown: the client's error, a fixed text, never the exception's.

Then the wire itself (headers, parts in order, no ``id:`` lines, keep-alives as comments), an
OpenAI client told of a shutdown in OpenAI's words, and the formats package importing no
integration. Without Node or the installed packages (``npm ci --prefix tests/node``) the Node
tests skip, which CI turns into failures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from asgi_stream_recorder import (
    MemoryRecorder,
    ServerSentEvent,
    StreamRecorderMiddleware,
    StreamStatus,
    current_stream,
    join_response,
    recorded_stream,
)
from asgi_stream_recorder.formats import THINKING_EVENT, TOOL_CALL_EVENT, AISDKFormat, WireFormat, resolve_format
from asgi_stream_recorder.testing import wait_recorded

from .servers import serve

pytestmark = pytest.mark.anyio

WAIT = 20  # seconds: the bound of every wait here (a Node run included)
NODE_DIR = Path(__file__).resolve().parent / "node"
CLIENTS = sorted(json.loads((NODE_DIR / "package.json").read_text())["dependencies"])
WITHOUT_FINISH_REASON = "ai-5.0.0"  # strict schemas from before finishReason

THINKING = "The user says hello. "
FIRST, SECOND = ["Hello", ", "], ["world", "!"]
TEXT = "Hello, world!"
TOOL_CALL = [
    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}},
    {"index": 0, "function": {"arguments": '{"city":'}},
    {"index": 0, "function": {"arguments": '"Paris"}'}},
]
SOURCE = {"url": "https://example.com/paris", "title": "Paris"}
MODEL = "test-model"
USAGE = {"input_tokens": 7, "output_tokens": 5}
PRIVATE = "alice@example.com"  # in the record's metadata, never sent
SECRET = "password=hunter2"  # in the exception's text: recorded, never sent

#: the finished message's parts, as (type, text / input / data, state)
COMPLETE = [("reasoning", THINKING, "done"), ("text", TEXT, "done"),
            ("tool-weather", {"city": "Paris"}, "input-available"), ("data-source", SOURCE, None)]


# -- the server ---------------------------------------------------------------------------------------
def prompt_of(body: dict[str, Any]) -> str:
    """The last user message's text, sent by the AI SDK (``parts``) or an OpenAI client (``content``)."""
    last = body["messages"][-1]
    return str(last.get("content") or last["parts"][0]["text"])


async def chat_id(request: Request) -> str:
    """The stream's key: the chat id ``DefaultChatTransport`` sends with every message."""
    return str((await request.json())["id"])


class Lab:
    """A chat app over one recorder: for each AI SDK client generation, ``{prefix}/api/chat`` and
    its resume route; an OpenAI endpoint; the middleware (whose shutdown a test may start).

    Every generation thinks, writes ``FIRST``, then (prompt ``hold``) waits for ``go_on``, writes
    ``SECOND``, then fails (prompt ``fail``) or calls a tool and cites a source."""

    def __init__(self) -> None:
        self.recorder = MemoryRecorder()
        self.halfway = anyio.Event()
        self.go_on = anyio.Event()
        self.generations = 0
        routes = [Route("/openai/v1/chat/completions", self.endpoint("openai"), methods=["POST"])]
        for prefix, wire in (("", AISDKFormat()), (f"/{WITHOUT_FINISH_REASON}", AISDKFormat(finish_reason=False))):
            routes += [Route(f"{prefix}/api/chat", self.endpoint(wire), methods=["POST"]),
                       Route(f"{prefix}/api/chat/{{chat_id}}/stream", self.resume(wire))]
        self.middleware = StreamRecorderMiddleware(Starlette(routes=routes), recorder=self.recorder,
                                                   handle_signals=False)

    def api(self, url: str, client: str) -> str:
        return f"{url}/{WITHOUT_FINISH_REASON}/api/chat" if client == WITHOUT_FINISH_REASON else f"{url}/api/chat"

    def endpoint(self, wire: str | WireFormat) -> Any:
        key = chat_id if isinstance(wire, AISDKFormat) else None

        @recorded_stream(recorder=self.recorder, format=wire, key=key, on_disconnect="continue", ping=0.05)
        async def answer(request: Request) -> AsyncIterator[str | ServerSentEvent]:
            prompt = prompt_of(await request.json())
            self.generations += 1
            metadata = current_stream().metadata
            metadata.update(model=MODEL, usage=USAGE, user=PRIVATE)
            yield ServerSentEvent(THINKING, event=THINKING_EVENT)
            for word in FIRST:
                yield word
            if prompt == "hold":
                self.halfway.set()
                await self.go_on.wait()
            for word in SECOND:
                yield word
            if prompt == "fail":
                raise RuntimeError(SECRET)
            for call in TOOL_CALL:
                yield ServerSentEvent(call, event=TOOL_CALL_EVENT)
            yield ServerSentEvent(SOURCE, event="source")
            metadata["finish_reason"] = "tool_calls"

        return answer

    def resume(self, wire: AISDKFormat) -> Any:
        async def resume(request: Request) -> Any:
            return join_response(self.recorder, key=request.path_params["chat_id"], format=wire, ping=0.05)

        return resume

    async def followed(self, stream_id: str) -> None:
        """Until a join follows the stream live."""
        with anyio.fail_after(WAIT):
            while not getattr(self.recorder.live.streams.get(stream_id), "followers", None):  # noqa: ASYNC110
                await anyio.sleep(0.01)


def message_body(chat: str, text: str) -> dict[str, Any]:
    """What ``DefaultChatTransport`` POSTs for a new user message."""
    return {"id": chat, "messages": [{"id": "user-1", "role": "user", "parts": [{"type": "text", "text": text}]}],
            "trigger": "submit-message"}


# -- the AI SDK in Node ---------------------------------------------------------------------------------
@pytest.fixture
def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.skip("no `node` on PATH: install Node.js 18 or later (Debian: apt-get install nodejs npm)")
    missing = [c for c in CLIENTS if not (NODE_DIR / "node_modules" / c / "package.json").is_file()]
    if missing:
        pytest.skip(f"the AI SDK packages {missing} are not installed: run `npm ci --prefix tests/node`")
    return path


async def run_chat(node: str, client: str, mode: str, api: str, chat: str, text: str) -> dict[str, Any]:
    """One ``chat.mjs`` run: the chat's status, error, messages and callbacks, as JSON."""
    with anyio.fail_after(WAIT):
        done = await anyio.run_process([node, "chat.mjs", client, mode, api, chat, text], cwd=NODE_DIR, check=False)
    assert done.returncode == 0, f"chat.mjs failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def parts(message: dict[str, Any]) -> list[tuple[str, Any, str | None]]:
    return [(p["type"], p.get("text", p.get("input", p.get("data"))), p.get("state")) for p in message["parts"]]


def finished(client: str) -> dict[str, Any]:
    """What ``onFinish`` is told of a completed turn (5.0.0 tells nothing but the message)."""
    if client == WITHOUT_FINISH_REASON:
        return {}
    return {"isAbort": False, "isDisconnect": False, "isError": False, "finishReason": "tool-calls"}


def user_only(result: dict[str, Any], text: str) -> None:
    """Nothing was resumed: the history is the user's message, and no error."""
    assert result["messages"] == [{"id": "user-1", "role": "user", "parts": [{"type": "text", "text": text}]}]
    assert result["error"] is None and result["errors"] == []


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_chat_turn_arrives_as_the_message_the_stream_recorded(node: str, client: str) -> None:
    lab = Lab()
    async with lab.recorder, serve(lab.middleware) as url:
        result = await run_chat(node, client, "send", lab.api(url, client), "chat-1", "hi")
        user, answer = result["messages"]
        record = await wait_recorded(lab.recorder, answer["id"])  # the message id is the stream id
    assert result["status"] == "ready" and result["error"] is None and result["errors"] == [], result
    assert user["parts"] == [{"type": "text", "text": "hi"}] and answer["role"] == "assistant"
    assert parts(answer) == COMPLETE
    assert answer["metadata"] == {"model": MODEL, "usage": USAGE}  # the chosen keys only
    assert result["finishes"] == [finished(client)]
    assert record.status is StreamStatus.COMPLETED and record.content == TEXT
    assert record.key == "chat-1" and record.format == "ai-sdk" and record.metadata["user"] == PRIVATE
    assert PRIVATE not in json.dumps(result)


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_reloaded_page_resumes_the_running_answer_whole(node: str, client: str) -> None:
    lab = Lab()
    async with lab.recorder, serve(lab.middleware) as url:
        api = lab.api(url, client)
        async with httpx.AsyncClient(timeout=WAIT) as http, http.stream("POST", api,
                                                                        json=message_body("chat-2", "hold")) as first:
            stream_id = first.headers["x-stream-id"]
            async for line in first.aiter_lines():
                if '"text-delta"' in line:
                    break  # the page is reloaded: this client hangs up halfway
        with anyio.fail_after(WAIT):
            await lab.halfway.wait()
        resumed: dict[str, Any] = {}

        async def resume() -> None:
            resumed.update(await run_chat(node, client, "resume", api, "chat-2", "hold"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(resume)
            await lab.followed(stream_id)  # replayed up to here; the rest is live
            lab.go_on.set()
        record = await wait_recorded(lab.recorder, stream_id)
    assert resumed["status"] == "ready" and resumed["error"] is None, resumed
    user, answer = resumed["messages"]
    assert user["id"] == "user-1" and answer["id"] == stream_id
    assert parts(answer) == COMPLETE
    assert answer["metadata"] == {"model": MODEL, "usage": USAGE}
    assert resumed["finishes"] == [finished(client)]
    assert record.status is StreamStatus.COMPLETED and record.content == TEXT and lab.generations == 1


@pytest.mark.parametrize("client", CLIENTS)
async def test_resume_is_204_before_a_chats_first_stream_and_after_its_end(node: str, client: str) -> None:
    lab = Lab()
    async with lab.recorder, serve(lab.middleware) as url:
        api = lab.api(url, client)
        before = await run_chat(node, client, "resume", api, "chat-3", "hi")
        sent = await run_chat(node, client, "send", api, "chat-3", "hi")
        await wait_recorded(lab.recorder, sent["messages"][-1]["id"])
        after = await run_chat(node, client, "resume", api, "chat-3", "hi")
        async with httpx.AsyncClient(timeout=WAIT) as http:
            raw = await http.get(f"{api}/chat-3/stream")
    user_only(before, "hi")
    user_only(after, "hi")
    assert raw.status_code == 204 and raw.content == b""
    assert lab.generations == 1


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_failure_is_the_clients_error_without_the_exceptions_text(node: str, client: str) -> None:
    lab = Lab()
    async with lab.recorder, serve(lab.middleware) as url:
        result = await run_chat(node, client, "send", lab.api(url, client), "chat-4", "fail")
        answer = result["messages"][-1]
        record = await wait_recorded(lab.recorder, answer["id"])
    assert result["status"] == "error" and result["error"] == "stream failed"
    assert result["errors"] == ["stream failed"]
    assert parts(answer) == [("reasoning", THINKING, "done"), ("text", TEXT, "streaming")]
    assert SECRET not in json.dumps(result)
    assert record.status is StreamStatus.FAILED and record.content == TEXT
    assert record.error is not None and SECRET in record.error


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_shutdown_mid_answer_is_the_clients_error(node: str, client: str) -> None:
    lab = Lab()
    async with lab.recorder, serve(lab.middleware) as url:
        result: dict[str, Any] = {}

        async def send() -> None:
            result.update(await run_chat(node, client, "send", lab.api(url, client), "chat-5", "hold"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            with anyio.fail_after(WAIT):
                await lab.halfway.wait()
            lab.middleware.begin_shutdown()
        answer = result["messages"][-1]
        record = await wait_recorded(lab.recorder, answer["id"])
    assert result["status"] == "error" and result["error"] == "server shutting down", result
    assert parts(answer) == [("reasoning", THINKING, "done"), ("text", "".join(FIRST), "streaming")]
    assert record.status is StreamStatus.INTERRUPTED and record.content == "".join(FIRST)


# -- the wire, the other formats, the package -----------------------------------------------------------
def data_of(body: bytes) -> list[Any]:
    """Each event's data, parsed (``[DONE]`` as is); asserts no event carries an ``id``."""
    events: list[Any] = []
    for block in body.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert not any(line.startswith("id:") for line in lines), block
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        text = lines[0].removeprefix("data: ")
        events.append(text if text == "[DONE]" else json.loads(text))
    return events


async def test_the_wire_parts_in_order_without_ids_and_pings_as_comments() -> None:
    lab = Lab()
    async with lab.recorder, serve(lab.middleware) as url, httpx.AsyncClient(timeout=WAIT) as http:
        async with http.stream("POST", f"{url}/api/chat", json=message_body("chat-6", "hold")) as response:
            body = b""
            with anyio.fail_after(WAIT):
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if lab.halfway.is_set() and b": ping\n\n" in body:
                        lab.go_on.set()  # a keep-alive went out while the generation waited
            headers = response.headers
        resume = await http.get(f"{url}/api/chat/chat-6/stream")
    sid = headers["x-stream-id"]
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-vercel-ai-ui-message-stream"] == "v1" and "no-cache" in headers["cache-control"]
    assert resume.status_code == 204
    text = [{"type": "text-delta", "id": "text-2", "delta": word} for word in FIRST + SECOND]
    assert data_of(body) == [
        {"type": "start", "messageId": sid},
        {"type": "reasoning-start", "id": "reasoning-1"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": THINKING},
        {"type": "reasoning-end", "id": "reasoning-1"},
        {"type": "text-start", "id": "text-2"}, *text, {"type": "text-end", "id": "text-2"},
        {"type": "tool-input-start", "toolCallId": "call_1", "toolName": "weather"},
        {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '{"city":'},
        {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '"Paris"}'},
        {"type": "data-source", "data": SOURCE},
        {"type": "tool-input-available", "toolCallId": "call_1", "toolName": "weather", "input": {"city": "Paris"}},
        {"type": "finish", "finishReason": "tool-calls", "messageMetadata": {"model": MODEL, "usage": USAGE}},
        "[DONE]",
    ]


async def test_a_join_while_streaming_has_the_formats_headers_and_starts_the_message() -> None:
    lab = Lab()
    async with lab.recorder, serve(lab.middleware) as url, httpx.AsyncClient(timeout=WAIT) as http:
        async with http.stream("POST", f"{url}/api/chat", json=message_body("chat-7", "hold")) as first:
            sid = first.headers["x-stream-id"]
            with anyio.fail_after(WAIT):
                await lab.halfway.wait()
            async with http.stream("GET", f"{url}/api/chat/chat-7/stream") as joined:
                headers = joined.headers
                lab.go_on.set()
                body = await joined.aread()
            await first.aread()
    assert headers["x-vercel-ai-ui-message-stream"] == "v1" and headers["x-stream-id"] == sid
    events = data_of(body)
    assert events[0] == {"type": "start", "messageId": sid} and events[-1] == "[DONE]"
    assert "".join(e["delta"] for e in events if isinstance(e, dict) and e["type"] == "text-delta") == TEXT


async def test_an_openai_client_is_told_of_a_shutdown_in_openais_words() -> None:
    lab = Lab()
    async with lab.recorder, serve(lab.middleware) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="test", max_retries=0, timeout=WAIT)
        received: list[str] = []
        with anyio.fail_after(WAIT), pytest.raises(openai.APIError) as info:
            stream = await client.chat.completions.create(model="m", stream=True,
                                                          messages=[{"role": "user", "content": "hold"}])
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
                if "".join(received) == "".join(FIRST):
                    lab.middleware.begin_shutdown()
        await client.close()
    assert info.value.message == "server shutting down"
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "server_shutting_down"


def test_formats_are_chosen_by_name_or_object_and_import_no_integration() -> None:
    wire = AISDKFormat(metadata=("usage",))
    assert resolve_format(wire) is wire
    assert type(resolve_format("ai-sdk")) is AISDKFormat and resolve_format("ai-sdk").name == "ai-sdk"
    with pytest.raises(ValueError, match="'ai-sdk'"):
        resolve_format("vercel")
    code = """
import sys
from asgi_stream_recorder.formats import resolve_format
assert [resolve_format(name).name for name in ("sse", "openai", "ai-sdk")] == ["sse", "openai", "ai-sdk"]
loaded = sorted(name for name in sys.modules if name.startswith("asgi_stream_recorder.integrations"))
assert not loaded, loaded
import asgi_stream_recorder.integrations.openai as adapter
from asgi_stream_recorder.formats import TOOL_CALL_EVENT, OpenAIFormat
assert adapter.OpenAIFormat is OpenAIFormat and adapter.TOOL_CALL_EVENT == TOOL_CALL_EVENT
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
