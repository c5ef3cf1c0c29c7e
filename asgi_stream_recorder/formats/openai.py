"""``format="openai"``: the stream as OpenAI's chat completions API would send it.

Any OpenAI client (the ``openai`` SDKs, LangChain, ...) can consume the endpoint. Nothing
here imports ``openai``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..recorders.base import Chunk
from ..sse import ServerSentEvent, encode, encode_data
from .base import REFUSAL_EVENT, TOOL_CALL_EVENT, WireFormat

if TYPE_CHECKING:
    from ..session import StreamSession

__all__ = ["DEFAULT_MODEL", "OpenAIFormat", "chat_usage"]

#: The model named in ``OpenAIFormat`` chunks when the stream's metadata names none.
DEFAULT_MODEL = "asgi-stream-recorder"
_DONE = b"data: [DONE]\n\n"


def chat_usage(usage: Any) -> dict[str, int] | None:
    """Usage in the chat shape (prompt/completion/total tokens) from either OpenAI API's shape."""
    if not isinstance(usage, Mapping):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    total = usage.get("total_tokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": total if isinstance(total, int) else prompt + completion}


class OpenAIFormat(WireFormat):
    """``chat.completion.chunk`` events and ``data: [DONE]``: the stream as OpenAI would send it.

    Each recorded text chunk becomes ``{"choices": [{"delta": {"content": ...}}]}``
    (the first chunk also carries ``"role": "assistant"``), with the ``id: <seq>`` line
    kept for resume; ``tool_call`` events become ``delta.tool_calls`` and ``refusal``
    events ``delta.refusal``; other events are recorded but not sent. The model is the
    stream's ``metadata["model"]`` (default ``"asgi-stream-recorder"``).

    At the end: a chunk with ``finish_reason`` (``metadata["finish_reason"]``, default
    ``"stop"``), then, when ``metadata["usage"]`` is known, the usage. With
    ``separate_usage_chunk`` (the default) usage comes in its own last chunk with empty
    ``choices``, as OpenAI sends it for ``stream_options={"include_usage": True}``;
    set it False to put usage on the finish chunk instead, for clients that index
    ``choices[0]`` on every chunk. A failed stream ends with an OpenAI error object
    (``event: error``) that OpenAI clients raise as an ``APIError``; its message is
    fixed, never the exception's text. A shutdown is the same error object with
    ``"code": "server_shutting_down"`` (an OpenAI client knows no ``event: shutdown``).
    """

    name = "openai"

    def __init__(self, *, separate_usage_chunk: bool = True, error_message: str = "stream failed") -> None:
        self.separate_usage_chunk = separate_usage_chunk
        self.error_message = error_message

    def _base(self, session: StreamSession) -> dict[str, Any]:
        meta = session.metadata
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{session.id}",
            "object": "chat.completion.chunk",
            "created": int(session.created_at),
            "model": str(meta.get("model") or DEFAULT_MODEL),
        }
        if meta.get("system_fingerprint"):
            chunk["system_fingerprint"] = str(meta["system_fingerprint"])
        return chunk

    def _json(self, session: StreamSession, delta: dict[str, Any], *, seq: int | None,
              finish_reason: str | None = None, usage: dict[str, int] | None = None) -> bytes:
        if seq == 1 or (seq is None and session.seq == 0):
            delta = {"role": "assistant", **delta}
        chunk = self._base(session)
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        if usage is not None:
            chunk["usage"] = usage
        text = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
        return encode_data(text, None if seq is None else session.event_id(seq))

    def chunk(self, session: StreamSession, chunk: Chunk, extra: ServerSentEvent | None) -> bytes:
        event = chunk.event
        if event == session.text_event:
            delta: dict[str, Any] = {"content": chunk.data}
        elif event == TOOL_CALL_EVENT:
            try:
                call = json.loads(chunk.data)
            except ValueError:
                return b""
            if not isinstance(call, dict):
                return b""
            call.setdefault("index", 0)
            delta = {"tool_calls": [call]}
        elif event == REFUSAL_EVENT:
            delta = {"refusal": chunk.data}
        else:
            return b""
        body = self._json(session, delta, seq=chunk.seq)
        if extra is not None and extra.comment is not None:
            body = encode(ServerSentEvent(comment=extra.comment)) + body
        return body

    def end(self, session: StreamSession) -> bytes:
        meta = session.metadata
        finish_reason = str(meta.get("finish_reason") or "stop")
        usage = chat_usage(meta.get("usage"))
        if usage is None or self.separate_usage_chunk:
            body = self._json(session, {}, seq=None, finish_reason=finish_reason)
        else:
            body = self._json(session, {}, seq=None, finish_reason=finish_reason, usage=usage)
        if usage is not None and self.separate_usage_chunk:
            last = self._base(session)
            last["choices"] = []
            last["usage"] = usage
            body += encode_data(json.dumps(last, ensure_ascii=False, separators=(",", ":")))
        return body + _DONE

    def _error(self, session: StreamSession, message: str, code: str) -> bytes:
        payload = {"error": {"message": message, "type": "server_error", "param": None, "code": code,
                             "stream_id": session.id}}
        return encode_data(json.dumps(payload, separators=(",", ":")), event="error")

    def error(self, session: StreamSession) -> bytes:
        return self._error(session, self.error_message, "stream_failed")

    def shutdown(self, session: StreamSession) -> bytes:
        return self._error(session, "server shutting down", "server_shutting_down")
