"""The parser held to the web-platform-tests ``eventsource/format-*`` cases, and to a plain
reading of the WHATWG event-stream rules for any bytes, however the reads split them.

Each WPT case is restated here as facts: the bytes the WPT test server sends (its
``resources/message.py``, ``last-event-id.py``, ``last-event-id2.py`` and ``message2.py``), how
many times the browser connects, and what the page's listeners must see (event type, data,
``lastEventId``), plus the reconnection time and the ``Last-Event-ID`` the browser would send
next. A case is named after the WPT file it comes from. The ``format-mime-*`` files are about
the response's Content-Type, not about parsing, and have no case here.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_stream_recorder.sse import ServerSentEvent, SSEParser

# -- the WPT server's resources --------------------------------------------------------------------

#: a response body, given the Last-Event-ID header the browser sent ("" for none)
Server = Callable[[str], bytes]


def message_py(message: str | bytes, *, newline: bool = True) -> Server:
    """``resources/message.py``: the message, a blank line unless ``newline=none``, then one LF."""
    raw = message.encode() if isinstance(message, str) else message
    body = raw + (b"\n\n" if newline else b"") + b"\n"
    return lambda last_event_id: body


def last_event_id_py(idvalue: str = "\u2026") -> Server:
    """``resources/last-event-id.py``: echoes a Last-Event-ID header back as data; without one it
    sends ``id: <idvalue>``, ``retry: 200`` and the data ``hello``."""

    def respond(last_event_id: str) -> bytes:
        if last_event_id:
            return b"data: " + last_event_id.encode() + b"\n\n"
        return b"id: " + idvalue.encode() + b"\nretry: 200\ndata: hello\n\n"

    return respond


def fixed(body: bytes) -> Server:
    """A resource that sends the same bytes whatever the request (``last-event-id2.py``, ``message2.py``)."""
    return lambda last_event_id: body


# -- the browser -------------------------------------------------------------------------------------


@dataclass
class Browser:
    """What an EventSource keeps across reconnections (the last event ID string and the
    reconnection time) and what its listeners saw. Every connection gets a fresh parser that
    starts from the id the browser resumes with; when a response ends, whatever was not
    dispatched is dropped with the parser."""

    last_event_id: str = ""
    retry: int | None = None
    comments: int = 0
    #: (event type, data, lastEventId) of every event a listener got
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    #: every response body received
    bodies: list[bytes] = field(default_factory=list)

    def connect(self, server: Server) -> None:
        body = server(self.last_event_id)
        self.bodies.append(body)
        parser = SSEParser()
        parser.last_event_id = self.last_event_id
        # One byte per read: an event is seen with the lastEventId of the moment it is dispatched.
        for i in range(len(body)):
            for event in parser.feed(body[i : i + 1]):
                self.seen.append((event.event or "message", event.text or "", parser.last_event_id))
        self.last_event_id = parser.last_event_id
        if parser.retry is not None:
            self.retry = parser.retry
        self.comments += parser.comments


@dataclass(frozen=True)
class Case:
    server: Server
    seen: list[tuple[str, str, str]]
    #: the Last-Event-ID the browser would send on its next connection
    last_event_id: str = ""
    retry: int | None = None
    connections: int = 1
    comments: int = 0


_LONG = "x" * 2048  # format-comments' long comment lines

CASES = {
    # A leading BOM is dropped; a BOM anywhere else is part of the line (here of a field name).
    "format-bom.any.js": Case(
        message_py("\ufeffdata:1\n\n\ufeffdata:2\n\ndata:3"), [("message", "1", ""), ("message", "3", "")]
    ),
    # Only ONE leading BOM is dropped: the second one spoils the first field name.
    "format-bom-2.any.js": Case(
        message_py("\ufeff\ufeffdata:1\n\ndata:2\n\ndata:3"), [("message", "2", ""), ("message", "3", "")]
    ),
    # Comments end at CR, LF or CRLF like any line, may hold NUL, may look like fields, may be long.
    "format-comments.any.js": Case(
        message_py(f"data:1\r:\0\n:\r\ndata:2\n:{_LONG}\rdata:3\n:data:fail\r:{_LONG}\ndata:4\n", newline=False),
        [("message", "1\n2\n3\n4", "")],
        comments=5,
    ),
    # The response ends inside an event: that event is dropped, AND its id is not taken, so the
    # browser reconnects without a Last-Event-ID and gets test1 again with an empty lastEventId.
    "format-data-before-final-empty-line.any.js": Case(
        message_py("retry:1000\ndata:test1\n\nid:test\ndata:test2", newline=False),
        [("message", "test1", ""), ("message", "test1", "")],
        last_event_id="",
        retry=1000,
        connections=2,
    ),
    # `data:` with an empty value, and `data` without a colon, each add an empty line of data.
    "format-field-data.any.js": Case(
        message_py("data:\n\ndata\ndata\n\ndata:test"),
        [("message", "", ""), ("message", "\n", ""), ("message", "test", "")],
    ),
    "format-field-event-empty.any.js": Case(message_py("event: \ndata:data"), [("message", "data", "")]),
    # A custom type applies to its own event only.
    "format-field-event.any.js": Case(
        message_py("event:test\ndata:x\n\ndata:x"), [("test", "x", ""), ("message", "x", "")]
    ),
    # The id is sent back as Last-Event-ID on reconnection and stays the event's lastEventId.
    "format-field-id.any.js": Case(
        last_event_id_py(),
        [("message", "hello", "\u2026"), ("message", "\u2026", "\u2026")],
        last_event_id="\u2026",
        retry=200,
        connections=2,
    ),
    "format-field-id-2.any.js": Case(
        last_event_id_py(),
        [("message", "hello", "\u2026"), ("message", "\u2026", "\u2026"), ("message", "\u2026", "\u2026")],
        last_event_id="\u2026",
        retry=200,
        connections=3,
    ),
    # An id persists over events without one; an empty id (with or without colon) resets it.
    "format-field-id-3.window.js[persists]": Case(
        fixed(b"id: 1\ndata: 1\n\ndata: 2\n\nid: 2\ndata:3\n\ndata:4\n\n"),
        [("message", "1", "1"), ("message", "2", "1"), ("message", "3", "2"), ("message", "4", "2")],
        last_event_id="2",
    ),
    "format-field-id-3.window.js[resets]": Case(
        fixed(b"id: 1\ndata: 1\n\nid:\ndata:2\n\ndata:3\n\n"),
        [("message", "1", "1"), ("message", "2", ""), ("message", "3", "")],
        last_event_id="",
    ),
    "format-field-id-3.window.js[resets, id without colon]": Case(
        fixed(b"id: 1\ndata: 1\n\nid\ndata:2\n\ndata:3\n\n"),
        [("message", "1", "1"), ("message", "2", ""), ("message", "3", "")],
        last_event_id="",
    ),
    # Every id holding U+0000 is ignored: no lastEventId, no Last-Event-ID, hello again.
    **{
        f"format-field-id-null.window.js[{value!r}]": Case(
            last_event_id_py(value),
            [("message", "hello", ""), ("message", "hello", "")],
            last_event_id="",
            retry=200,
            connections=2,
        )
        for value in ["\0\0", "x\0", "\0x", "x\0x", " \0"]
    },
    # Field names match exactly (case, NUL, leading space, lookalikes); CR, LF and CRLF all end lines.
    "format-field-parsing.any.js": Case(
        message_py(
            "data:\0\ndata:  2\rData:1\ndata\0:2\ndata:1\r\0data:4\nda-ta:3\rdata_5\ndata:3\rdata:\r\n"
            " data:32\ndata:4\n",
            newline=False,
        ),
        [("message", "\0\n 2\n1\n3\n\n4", "")],
    ),
    # A retry that is not all digits is ignored and the earlier one stands.
    "format-field-retry-bogus.any.js": Case(
        message_py("retry:2000\nretry:1000x\ndata:x"), [("message", "x", "")], retry=2000
    ),
    "format-field-retry-empty.any.js": Case(message_py("retry\ndata:test"), [("message", "test", "")], retry=None),
    # Base ten, leading zeros and all (not octal).
    "format-field-retry.any.js": Case(message_py("retry:02000\ndata:x"), [("message", "x", "")], retry=2000),
    "format-field-unknown.any.js": Case(
        message_py("data:test\n data\ndata\nfoobar:xxx\njustsometext\n:thisisacommentyay\ndata:test"),
        [("message", "test\n\ntest", "")],
        comments=1,
    ),
    # Only a space after the colon is dropped (not a tab); a lone CR ends a line too.
    "format-leading-space.any.js": Case(
        message_py("data:\ttest\rdata: \ndata:test"), [("message", "\ttest\n\ntest", "")]
    ),
    # A CR at the end of the message and the server's final LF are one CRLF: one blank line.
    "format-newlines.any.js": Case(
        message_py("data:test\r\ndata\ndata:test\r\n\r", newline=False), [("message", "test\n\ntest", "")]
    ),
    "format-null-character.any.js": Case(message_py("data:\0\n\n"), [("message", "\0", "")]),
    # Always UTF-8, whatever charset the Content-Type names.
    "format-utf-8.any.js": Case(message_py(b"data:ok\xe2\x80\xa6"), [("message", "ok\u2026", "")]),
    # Not a format-* file, same subject ("lines and data parsing"): one pass of resources/message2.py.
    "event-data.any.js": Case(
        fixed(b"data:msg\ndata: msg\n\n:\nfalsefield:msg\n\nfalsefield:msg\nData:data\n\ndata\n\ndata:end\n\n"),
        [("message", "msg\nmsg", ""), ("message", "", ""), ("message", "end", "")],
        comments=1,
    ),
}


def _run(case: Case) -> Browser:
    browser = Browser()
    for _ in range(case.connections):
        browser.connect(case.server)
    return browser


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_wpt_case(case: Case) -> None:
    browser = _run(case)
    assert browser.seen == case.seen
    assert browser.last_event_id == case.last_event_id
    assert browser.retry == case.retry
    assert browser.comments == case.comments * case.connections


# -- read boundaries ------------------------------------------------------------------------------------


#: each event's (type, data, id set in it, retry set in it), then last_event_id, retry, comments
Outcome = tuple[list[tuple[str | None, str | None, str | None, int | None]], str, int | None, int]


def _outcome(*chunks: bytes) -> Outcome:
    parser = SSEParser()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return [(e.event, e.text, e.id, e.retry) for e in events], parser.last_event_id, parser.retry, parser.comments


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_wpt_case_is_the_same_however_the_body_is_split(case: Case) -> None:
    for body in _run(case).bodies:
        whole = _outcome(body)
        for cut in range(len(body) + 1):
            assert _outcome(body[:cut], body[cut:]) == whole, f"split at byte {cut}"


# -- any bytes: against a plain reading of the spec --------------------------------------------------


def reference_parse(stream: bytes) -> Outcome:
    """The WHATWG steps done the slow, obvious way on the whole stream at once: decode it as
    UTF-8 with replacement, drop one leading BOM, cut lines at CRLF, CR or LF (the text after the
    last line break is an unfinished line and is dropped), then run the field rules. Returns the
    same shape as ``_outcome``: each event's (type or None, data, id set in that event or None,
    retry set in that event or None), the last event id, the reconnection time, comments."""
    text = codecs.decode(stream, "utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = re.split(r"\r\n|\r|\n", text)[:-1]
    events: list[tuple[str | None, str | None, str | None, int | None]] = []
    last_event_id, retry, comments = "", None, 0
    data: list[str] = []
    event_type, id_buffer, event_retry = "", None, None
    for line in lines:
        if line == "":
            if id_buffer is not None:
                last_event_id = id_buffer
            if data:
                events.append((event_type or None, "\n".join(data), id_buffer, event_retry))
            data, event_type, id_buffer, event_retry = [], "", None, None
            continue
        if line.startswith(":"):
            comments += 1
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            id_buffer = value
        elif name == "retry" and re.fullmatch("[0-9]+", value) and int(value) < 2**64:
            retry = event_retry = int(value)
    return events, last_event_id, retry, comments


_PIECES = st.sampled_from(
    [
        b"\n", b"\r", b"\r\n", b"\n\n", b"\r\r", b"data:", b"data: x", b"data", b"event:e", b"event: ", b"id:",
        b"id: 7", b"id: \x00", b"id", b"retry: 15", b"retry:007", b"retry:1x", b"retry", b":", b": c", b" ",
        b"\xef\xbb\xbf", b"\xef\xbb", b"\xe2\x82\xac", b"\xe2\x82", b"\xf0\x9f\x92\xa9", b"\xff", b"\xc0\x80",
        b"\xed\xa0\x80", b"\x00",
    ]
)
streams = st.lists(st.one_of(_PIECES, st.binary(max_size=4)), max_size=24).map(b"".join)


@given(stream=streams, data=st.data())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_any_split_of_any_bytes_gives_what_the_whole_stream_gives(stream: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6), label="cuts"))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert _outcome(*chunks) == _outcome(stream) == reference_parse(stream)


@given(stream=streams)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_one_byte_per_read_gives_what_the_whole_stream_gives(stream: bytes) -> None:
    assert _outcome(*(stream[i : i + 1] for i in range(len(stream)))) == reference_parse(stream)
