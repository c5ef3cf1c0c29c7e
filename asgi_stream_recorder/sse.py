"""Server-Sent Events: the event type, a safe encoder and an incremental parser.

The encoder is the only place bytes for the wire are made, so it is the only place that
has to get injection right: data is split on CR, LF and CRLF into ``data:`` lines (never
``str.splitlines``, which also splits on U+2028 and form feed), and the single-line
fields ``event`` and ``id`` refuse line breaks outright.

The parser follows the WHATWG rules (bytes in, events out) and is shared by the
middleware, which records undecorated SSE from the wire, and by the testing client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PING", "SSEParser", "ServerSentEvent", "encode", "encode_data", "to_text"]

#: A keep-alive comment: it resets proxies' idle timers and is invisible to clients.
PING = b": ping\n\n"


def to_text(data: Any) -> str:
    """Turn an event payload into the text that goes on the wire and into the record.

    ``str`` as is, ``bytes`` as UTF-8, ``dict``/``list`` (and other JSON values) as
    compact JSON. Anything else raises ``TypeError`` naming the type.
    """
    if isinstance(data, str):
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"bytes payload is not valid UTF-8: {exc}") from None
    if isinstance(data, (dict, list, tuple, int, float, bool)) or data is None:
        try:
            return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"payload of type {type(data).__name__} is not JSON-serialisable: {exc}") from None
    raise TypeError(
        f"cannot send an item of type {type(data).__module__}.{type(data).__qualname__} as an event: "
        "yield str, bytes, dict, list or ServerSentEvent"
    )


def _single_line(name: str, value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"SSE field {name!r} must not contain CR or LF: {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One event. ``data`` may be text, UTF-8 bytes or a JSON value; ``None`` sends no data.

    Fields are checked here, once, so an invalid event never reaches the wire: ``event``
    and ``id`` may not hold CR or LF (``id`` may not hold NUL either: clients ignore it),
    and ``retry`` is a non-negative whole number of milliseconds.
    """

    data: Any = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None
    #: the payload as text, computed once at construction
    text: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.event is not None:
            if not isinstance(self.event, str):
                raise TypeError(f"event name must be str, not {type(self.event).__name__}")
            _single_line("event", self.event)
        if self.id is not None:
            id_ = self.id if isinstance(self.id, str) else str(self.id)
            _single_line("id", id_)
            if "\0" in id_:
                raise ValueError(f"SSE field 'id' must not contain NUL: {id_!r}")
            object.__setattr__(self, "id", id_)
        if self.retry is not None and (
            isinstance(self.retry, bool) or not isinstance(self.retry, int) or self.retry < 0
        ):
            raise ValueError(f"SSE field 'retry' must be a non-negative int (milliseconds), not {self.retry!r}")
        if self.comment is not None and not isinstance(self.comment, str):
            raise TypeError(f"comment must be str, not {type(self.comment).__name__}")
        if self.data is not None:
            object.__setattr__(self, "text", to_text(self.data))


def _lines(text: str) -> list[str]:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.split("\n")


def encode_data(text: str, id: str | int | None = None, event: str | None = None) -> bytes:
    """Encode a data event. ``id`` and ``event`` must already be validated single lines."""
    if "\n" in text or "\r" in text:
        text = "\ndata: ".join(_lines(text))
    if event is None:
        if id is None:
            return f"data: {text}\n\n".encode()
        return f"id: {id}\ndata: {text}\n\n".encode()
    if id is None:
        return f"event: {event}\ndata: {text}\n\n".encode()
    return f"id: {id}\nevent: {event}\ndata: {text}\n\n".encode()


def encode(event: ServerSentEvent) -> bytes:
    """Encode any event: comment lines, ``event``, ``id``, ``retry``, ``data`` lines."""
    parts: list[str] = []
    if event.comment is not None:
        parts.extend(": " + line for line in _lines(event.comment))
    if event.id is not None:
        parts.append("id: " + event.id)
    if event.event is not None:
        parts.append("event: " + event.event)
    if event.retry is not None:
        parts.append(f"retry: {event.retry}")
    if event.text is not None:
        parts.extend("data: " + line for line in _lines(event.text))
    if not parts:
        return b""
    return ("\n".join(parts) + "\n\n").encode("utf-8")


class SSEParser:
    """Incremental ``text/event-stream`` parser: feed bytes as they arrive, get whole events.

    Handles events split across reads, CR/LF/CRLF line endings (a CR at the end of one
    read and an LF at the start of the next count as one line break), a leading BOM,
    comments (counted in ``comments``, not returned) and the id/retry rules of the spec.
    Each event's ``id`` is the id field set within that event, if any; ``last_event_id``
    is the id a browser would send on reconnect.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._decoder_tail = b""
        self._started = False
        self._pending_cr = False
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume bytes and return the events completed by them, in order."""
        raw = self._decoder_tail + chunk
        try:
            text = raw.decode("utf-8")
            self._decoder_tail = b""
        except UnicodeDecodeError as exc:
            if exc.start >= len(raw) - 3 and exc.reason == "unexpected end of data":
                text = raw[: exc.start].decode("utf-8")
                self._decoder_tail = raw[exc.start :]
            else:
                text = raw.decode("utf-8", errors="replace")
                self._decoder_tail = b""
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if not text:  # an empty read (or only part of a character): a pending CR still waits for its LF
            return []
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = False
        return list(self._consume(self._buffer + text))

    def _consume(self, text: str) -> Iterator[ServerSentEvent]:
        start = 0
        n = len(text)
        while start < n:
            lf = text.find("\n", start)
            cr = text.find("\r", start, lf if lf >= 0 else n)
            if cr >= 0:
                end, nxt = cr, cr + 1
                if nxt < n and text[nxt] == "\n":
                    nxt += 1
                elif nxt == n:
                    self._pending_cr = True
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            event = self._line(text[start:end])
            if event is not None:
                yield event
            start = nxt
        self._buffer = text[start:]

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event, id_, retry = self._data, self._event, self._id, self._retry
        self._data, self._event, self._id, self._retry = [], None, None, None
        if not data:
            return None
        return ServerSentEvent("\n".join(data), event=event or None, id=id_, retry=retry)
