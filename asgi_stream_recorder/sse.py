"""Server-Sent Events: the event type, a safe encoder and an incremental parser.

The encoder is the only place bytes for the wire are made, so it is the only place that
has to get injection right: data is split on CR, LF and CRLF into ``data:`` lines (never
``str.splitlines``, which also splits on U+2028 and form feed), and the single-line
fields ``event`` and ``id`` refuse line breaks outright.

The parser follows the WHATWG rules (bytes in, events out) and is shared by the
middleware, which records undecorated SSE from the wire, and by the testing client.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PING", "SSEParser", "ServerSentEvent", "encode", "encode_data", "to_text"]

#: A keep-alive comment: it resets proxies' idle timers and is invisible to clients.
PING = b": ping\n\n"

#: The largest ``retry`` (milliseconds) sent or taken: a browser keeps the reconnection time in
#: 64 bits and ignores a value that overflows them.
_MAX_RETRY = 2**64 - 1
_MAX_RETRY_DIGITS = len(str(_MAX_RETRY))


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


def _single_line(name: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError(f"SSE field {name!r} must not contain CR or LF: {value!r}")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One event. ``data`` may be text, UTF-8 bytes or a JSON value; ``None`` sends no data.

    Fields are checked here, once, so an invalid event never reaches the wire: ``event``
    and ``id`` may not hold CR or LF (``id`` may not hold NUL either: clients ignore it),
    and ``retry`` is a whole number of milliseconds from 0 to 2**64 - 1.
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
            isinstance(self.retry, bool) or not isinstance(self.retry, int) or not 0 <= self.retry <= _MAX_RETRY
        ):
            raise ValueError(
                f"SSE field 'retry' must be an int (milliseconds) from 0 to 2**64 - 1, not {self.retry!r}"
            )
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

    Follows the WHATWG rules, and gives the same result however the bytes are split into
    reads: the stream is decoded as one UTF-8 stream (invalid bytes become U+FFFD, one
    leading BOM is dropped), lines end at CR, LF or CRLF (also when the CR ends one read and
    the LF starts the next), comments are counted in ``comments`` and not returned, and an
    event without data is not returned.

    Each event's ``id`` is the id field set within that event, if any. ``last_event_id`` is
    the id a browser would send on reconnect: like a browser's, it only changes when an
    event block is dispatched by its blank line (also a block with an id and no data), so
    the id of an event cut off before its blank line is never taken. ``retry`` is the last
    reconnection time received; like a browser's it changes as soon as its line arrives.
    """

    def __init__(self) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._started = False  # the first character of the stream has been seen (BOM check done)
        self._pending_cr = False  # the last line ended with a CR: an LF right after it belongs to it
        self._partial: list[str] = []  # pieces of a line whose end has not arrived yet
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None  # the id set in the current block (the spec's last event ID buffer)
        self._retry: int | None = None
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume bytes and return the events completed by them, in order."""
        text = self._decode(chunk)
        if not text:  # an empty read, or part of a character: a pending CR still waits for its LF
            return []
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        elif self._pending_cr:
            self._pending_cr = False
            if text[0] == "\n":
                text = text[1:]
        events: list[ServerSentEvent] = []
        start = 0
        n = len(text)
        while start < n:
            lf = text.find("\n", start)
            end = lf if lf >= 0 else n
            cr = text.find("\r", start, end)
            if cr >= 0:
                end, nxt = cr, cr + 1
                if nxt == n:
                    self._pending_cr = True
                elif text[nxt] == "\n":
                    nxt += 1
            elif lf >= 0:
                nxt = lf + 1
            else:
                self._partial.append(text[start:])
                break
            line = text[start:end]
            if self._partial:
                self._partial.append(line)
                line = "".join(self._partial)
                self._partial.clear()
            event = self._line(line)
            if event is not None:
                events.append(event)
            start = nxt
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            retry = _retry_value(value)
            if retry is not None:
                self._retry = self.retry = retry
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event, id_, retry = self._data, self._event, self._id, self._retry
        self._data, self._event, self._id, self._retry = [], None, None, None
        if id_ is not None:  # first, and whether or not the block has data (WHATWG "dispatch the event")
            self.last_event_id = id_
        if not data:
            return None
        return ServerSentEvent("\n".join(data), event=event or None, id=id_, retry=retry)


def _retry_value(value: str) -> int | None:
    """The reconnection time a ``retry`` field gives, or None if the field is to be ignored:
    not only ASCII digits (empty, a sign, spaces), or above 2**64 - 1 (checked on the digit
    count first, so thousands of digits cost nothing)."""
    if not (value.isascii() and value.isdigit()):
        return None
    digits = value.lstrip("0")
    if len(digits) > _MAX_RETRY_DIGITS:
        return None
    retry = int(digits) if digits else 0
    return retry if retry <= _MAX_RETRY else None
