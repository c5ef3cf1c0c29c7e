"""The SSE wire format: whatever text a generator yields reaches the client unchanged
(line breaks normalised to LF), as exactly one event, whichever parser reads it."""

from __future__ import annotations

from typing import Literal

import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_stream_recorder.sse import PING, ServerSentEvent, SSEParser, encode, encode_data

# -- strategies ----------------------------------------------------------------------------

_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
_ANY_CHAR = st.characters(blacklist_categories=_SURROGATES)  # any Unicode scalar value

#: pieces that look like SSE syntax or are line breaks of every kind the spec knows (and
#: some it does not: U+2028, NEL, form feed must *not* split lines)
_TRICKY = st.sampled_from(
    [
        "\n", "\r\n", "\r", "\n\n", "\r\r", "\r\n\r\n", "\n\r",
        "data:", "data: x", "data", "event: evil", "event:", "id: 999", "id:", "retry: 1", "retry:5",
        ":", ": comment", " ", "  leading", "\ufeff", "\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\0",
        "\N{PILE OF POO}", "é", "\u6f22", "\U0010ffff",
    ]
)

texts = st.lists(st.one_of(st.text(_ANY_CHAR, max_size=8), _TRICKY), max_size=12).map("".join)
single_lines = st.text(_ANY_CHAR.filter(lambda c: c not in "\r\n"), max_size=12)
ids = st.text(_ANY_CHAR.filter(lambda c: c not in "\r\n\0"), max_size=12)


def normalised(text: str) -> str:
    """What a client must see: CRLF and lone CR become LF, nothing else changes."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


# -- parsers under test ----------------------------------------------------------------------


def parse_httpx_sse(wire: bytes) -> list[tuple[str, str, str, int | None]]:
    """httpx_sse's own line decoder and event decoder, as its EventSource uses them."""
    lines = SSELineDecoder()
    decoder = SSEDecoder()
    events = []
    for line in [*lines.decode(wire.decode("utf-8")), *lines.flush()]:
        sse = decoder.decode(line)
        if sse is not None:
            events.append((sse.event, sse.data, sse.id, sse.retry))
    return events


def parse_ours(*chunks: bytes) -> list[ServerSentEvent]:
    parser = SSEParser()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


# -- round trips -------------------------------------------------------------------------------


@given(text=texts, seq=st.integers(min_value=1, max_value=10**9), event=st.none() | single_lines)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_encode_data_round_trips_through_httpx_sse(text: str, seq: int, event: str | None) -> None:
    wire = encode_data(text, str(seq), event)
    assert parse_httpx_sse(wire) == [(event or "message", normalised(text), str(seq), None)]


@given(text=texts, seq=st.integers(min_value=1, max_value=10**9), event=st.none() | single_lines)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_encode_data_round_trips_through_our_parser(text: str, seq: int, event: str | None) -> None:
    wire = encode_data(text, str(seq), event)
    [parsed] = parse_ours(wire)
    assert parsed.text == normalised(text)
    assert parsed.id == str(seq)
    assert parsed.event == (event or None)


@given(
    text=texts,
    event=st.none() | single_lines,
    id_=st.none() | ids,
    retry=st.none() | st.integers(min_value=0, max_value=2**40),
    comment=st.none() | texts,
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_encode_round_trips_every_field(
    text: str, event: str | None, id_: str | None, retry: int | None, comment: str | None
) -> None:
    wire = encode(ServerSentEvent(text, event=event, id=id_, retry=retry, comment=comment))

    assert parse_httpx_sse(wire) == [(event or "message", normalised(text), id_ or "", retry)]

    parser = SSEParser()
    [parsed] = parser.feed(wire)
    assert parsed.text == normalised(text)
    assert parsed.event == (event or None)
    assert parsed.id == id_
    assert parsed.retry == retry
    assert parser.comments == (0 if comment is None else len(normalised(comment).split("\n")))


@given(texts=st.lists(texts, min_size=1, max_size=5))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_consecutive_events_stay_separate(texts: list[str]) -> None:
    wire = b"".join(encode_data(t, str(i)) for i, t in enumerate(texts, 1))
    assert [(d, i) for _, d, i, _ in parse_httpx_sse(wire)] == [
        (normalised(t), str(i)) for i, t in enumerate(texts, 1)
    ]
    assert [(e.text, e.id) for e in parse_ours(wire)] == [(normalised(t), str(i)) for i, t in enumerate(texts, 1)]


@pytest.mark.parametrize(
    "text",
    [
        "line one\nevent: injected\nid: 666\n\ndata: second event",
        "x\r\n\r\nretry: 1\r\nevent: evil\r",
        "\rdata: y\r\r",
        "",
        "\n",
        "   leading spaces",
        ": not a comment",
    ],
)
def test_injection_lookalikes_stay_data(text: str) -> None:
    wire = encode_data(text, "7", "token")
    assert parse_httpx_sse(wire) == [("token", normalised(text), "7", None)]
    [parsed] = parse_ours(wire)
    assert (parsed.text, parsed.event, parsed.id, parsed.retry) == (normalised(text), "token", "7", None)


def test_unicode_line_separators_are_not_line_breaks() -> None:
    text = "a\u2028b\x85c\x0cd\x0be\u2029f"
    wire = encode_data(text, "1")
    assert wire.count(b"data:") == 1
    assert parse_httpx_sse(wire)[0][1] == text
    assert parse_ours(wire)[0].text == text


# -- incremental parsing ---------------------------------------------------------------------------


def _with_line_endings(wire: bytes, ending: bytes) -> bytes:
    return wire.replace(b"\n", ending)


@given(
    parts=st.lists(texts, min_size=1, max_size=3),
    ending=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    bom=st.booleans(),
)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_split_at_every_byte_position_gives_the_same_events(parts: list[str], ending: bytes, bom: bool) -> None:
    # The encoder never emits CR; the wire is rewritten to CRLF or CR line endings so that
    # splits fall between CR and LF, and inside multibyte UTF-8 sequences (and the BOM).
    wire = (b"\xef\xbb\xbf" if bom else b"") + _with_line_endings(
        b"".join(encode_data(t, str(i), "ev") for i, t in enumerate(parts, 1)), ending
    )
    expected = [(normalised(t), str(i), "ev") for i, t in enumerate(parts, 1)]
    whole = [(e.text, e.id, e.event) for e in parse_ours(wire)]
    assert whole == expected
    for cut in range(len(wire) + 1):
        split = [(e.text, e.id, e.event) for e in parse_ours(wire[:cut], wire[cut:])]
        assert split == expected, f"split at byte {cut}"
    one_by_one = [(e.text, e.id, e.event) for e in parse_ours(*(wire[i : i + 1] for i in range(len(wire))))]
    assert one_by_one == expected


@given(parts=st.lists(texts, min_size=1, max_size=3), ending=st.sampled_from([b"\n", b"\r\n", b"\r"]))
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_empty_reads_between_bytes_change_nothing(parts: list[str], ending: bytes) -> None:
    # A transport may hand over an empty chunk at any point, e.g. between a CR and its LF.
    wire = _with_line_endings(b"".join(encode_data(t, str(i)) for i, t in enumerate(parts, 1)), ending)
    chunks: list[bytes] = []
    for i in range(len(wire)):
        chunks += [wire[i : i + 1], b""]
    assert [(e.text, e.id) for e in parse_ours(*chunks)] == [(normalised(t), str(i)) for i, t in enumerate(parts, 1)]


def test_cr_then_lf_in_the_next_read_is_one_line_break() -> None:
    assert [e.text for e in parse_ours(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")] == ["a\nb"]


# -- field validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "\n", "\r", "trailing\n"])
def test_event_name_with_line_break_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="event"):
        ServerSentEvent("x", event=bad)


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "1\r\n", "\n"])
def test_id_with_line_break_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="id"):
        ServerSentEvent("x", id=bad)


@pytest.mark.parametrize("bad", ["\0", "a\0b", "1\0"])
def test_id_with_nul_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="NUL"):
        ServerSentEvent("x", id=bad)


@pytest.mark.parametrize("bad", [True, False, -1, -1000, 1.5, 0.0, 10.0, "100"])
def test_retry_must_be_a_non_negative_int(bad: object) -> None:
    with pytest.raises(ValueError, match="retry"):
        ServerSentEvent("x", retry=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", [0, 1, 3000, 2**40])
def test_valid_retry_goes_on_the_wire(good: int) -> None:
    wire = encode(ServerSentEvent("x", retry=good))
    assert f"retry: {good}\n".encode() in wire
    parser = SSEParser()
    [event] = parser.feed(wire)
    assert event.retry == good == parser.retry


def test_valid_single_line_fields_are_accepted() -> None:
    event = ServerSentEvent("x", event="  spaced\u2028name", id="id with spaces \u6f22")
    [parsed] = parse_ours(encode(event))
    assert (parsed.event, parsed.id) == ("  spaced\u2028name", "id with spaces \u6f22")


# -- parser rules -----------------------------------------------------------------------------------------


def test_comments_are_ignored_and_counted() -> None:
    parser = SSEParser()
    events = parser.feed(b": hello\ndata: a\n:another\n\n" + PING + b":\n\n")
    assert [e.text for e in events] == ["a"]
    assert parser.comments == 4


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"retry: 100", 100),
        (b"retry:0", 0),
        (b"retry: 1a", None),
        (b"retry: -5", None),
        (b"retry: +5", None),
        (b"retry: 1.5", None),
        (b"retry: ", None),
        (b"retry: 5 ", None),
        ("retry: \u0661\u0662".encode(), None),  # Arabic-Indic digits are digits, but not ASCII
        ("retry: \u00b2".encode(), None),  # superscript two: str.isdigit() says yes
    ],
)
def test_retry_only_if_ascii_digits(line: bytes, expected: int | None) -> None:
    parser = SSEParser()
    [event] = parser.feed(line + b"\ndata: x\n\n")
    assert event.retry == expected
    assert parser.retry == expected


def test_event_without_data_is_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: lonely\n\nid: 5\n\nretry: 10\n\n") == []
    [event] = parser.feed(b"data: after\n\n")
    # the lonely event name did not leak into the next event
    assert (event.text, event.event, event.id) == ("after", None, None)
    assert parser.last_event_id == "5"


@pytest.mark.parametrize("chunks", [[b"\xef\xbb\xbfdata: x\n\n"], [b"\xef", b"\xbb", b"\xbfdata: x\n\n"],
                                    [b"\xef\xbb", b"\xbf", b"data: x\n\n"]])
def test_leading_bom_is_stripped(chunks: list[bytes]) -> None:
    [event] = parse_ours(*chunks)
    assert event.text == "x"


def test_bom_later_in_the_stream_is_kept() -> None:
    [a, b] = parse_ours(b"data: a\n\n", "data: \ufeffb\n\n".encode())
    assert (a.text, b.text) == ("a", "\ufeffb")


@pytest.mark.parametrize("wire", [b"data:\n\n", b"data: \n\n", b"data\n\n"])
def test_empty_data_line_dispatches_empty_data(wire: bytes) -> None:
    [event] = parse_ours(wire)
    assert event.text == ""


def test_only_one_leading_space_is_stripped() -> None:
    [event] = parse_ours(b"data:  two spaces\nevent:\tx\n\n")
    assert event.text == " two spaces"
    assert event.event == "\tx"


def test_id_with_nul_on_the_wire_is_ignored() -> None:
    parser = SSEParser()
    [event] = parser.feed(b"id: 3\n\nid: a\0b\ndata: x\n\n")
    assert event.id is None
    assert parser.last_event_id == "3"


def test_unknown_fields_are_ignored() -> None:
    [event] = parse_ours(b"foo: bar\ndata: x\nDATA: y\n\n")
    assert event.text == "x"
