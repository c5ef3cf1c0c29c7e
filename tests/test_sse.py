"""The SSE wire format: whatever text a generator yields reaches the client unchanged
(line breaks normalised to LF), as exactly one event, whichever parser reads it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import FrozenInstanceError
from typing import Any, Literal

import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_stream_recorder import sse
from asgi_stream_recorder.sse import PING, ServerSentEvent, SSEParser, encode, encode_data, to_text

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
    with pytest.raises(ValueError, match=r"^SSE field 'event' must not contain CR or LF: "):
        ServerSentEvent("x", event=bad)


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "1\r\n", "\n"])
def test_id_with_line_break_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^SSE field 'id' must not contain CR or LF: "):
        ServerSentEvent("x", id=bad)


@pytest.mark.parametrize("bad", ["\0", "a\0b", "1\0"])
def test_id_with_nul_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^SSE field 'id' must not contain NUL: "):
        ServerSentEvent("x", id=bad)


@pytest.mark.parametrize("bad", [True, False, -1, -1000, 1.5, 0.0, 10.0, "100"])
def test_retry_must_be_a_non_negative_int(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^SSE field 'retry' must be an int \(milliseconds\) from 0 to 2\*\*64 - 1, "):
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


# -- last event id: taken when the event is dispatched ---------------------------------------------------


def test_last_event_id_is_empty_before_any_id() -> None:
    parser = SSEParser()
    assert parser.last_event_id == ""
    [event] = parser.feed(b"data: x\n\n")
    assert event.id is None
    assert parser.last_event_id == ""


def test_id_of_an_event_cut_off_before_its_blank_line_is_not_the_last_event_id() -> None:
    # A client resuming with "2" would never get event 2: it was not dispatched.
    parser = SSEParser()
    [one] = parser.feed(b"id: 1\ndata: one\n\nid: 2\ndata: tw")
    assert (one.text, one.id) == ("one", "1")
    assert parser.last_event_id == "1"
    assert parser.feed(b"o\n") == []
    assert parser.last_event_id == "1"  # still no blank line
    [two] = parser.feed(b"\n")
    assert (two.text, two.id) == ("two", "2")
    assert parser.last_event_id == "2"


def test_id_line_alone_changes_nothing_until_the_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 5\n") == []
    assert parser.last_event_id == ""
    # WHATWG "dispatch the event": the id is taken first, even though an event without data is
    # then dropped: a browser would send Last-Event-ID: 5.
    assert parser.feed(b"\n") == []
    assert parser.last_event_id == "5"


def test_empty_id_resets_the_last_event_id_when_dispatched() -> None:
    parser = SSEParser()
    parser.feed(b"id: 1\ndata: a\n\nid\n")
    assert parser.last_event_id == "1"
    [event] = parser.feed(b"data: b\n\n")
    assert (event.id, parser.last_event_id) == ("", "")


def test_the_last_valid_id_line_of_an_event_wins_and_nul_ids_are_skipped() -> None:
    parser = SSEParser()
    [event] = parser.feed(b"id: 1\nid: 2\nid: x\0\ndata: d\n\n")
    assert (event.id, parser.last_event_id) == ("2", "2")


def test_id_given_as_a_number_is_sent_as_text() -> None:
    event = ServerSentEvent("x", id=5)  # type: ignore[arg-type]
    assert event.id == "5"
    assert isinstance(event.id, str)
    assert encode(event) == b"id: 5\ndata: x\n\n"


# -- retry -----------------------------------------------------------------------------------------------


def test_retry_of_thousands_of_digits_is_ignored_and_the_read_keeps_its_events() -> None:
    parser = SSEParser()
    events = parser.feed(b"retry: 70\ndata: a\n\nretry: " + b"9" * 5000 + b"\ndata: b\n\n")
    assert [(e.text, e.retry) for e in events] == [("a", 70), ("b", None)]
    assert parser.retry == 70


def test_retry_with_thousands_of_leading_zeros_is_its_value() -> None:
    parser = SSEParser()
    [event] = parser.feed(b"retry: " + b"0" * 5000 + b"1500\ndata: x\n\n")
    assert event.retry == parser.retry == 1500


@pytest.mark.parametrize(("value", "expected"), [(b"18446744073709551615", 2**64 - 1), (b"18446744073709551616", None)])
def test_retry_beyond_64_bits_is_ignored(value: bytes, expected: int | None) -> None:
    parser = SSEParser()
    [event] = parser.feed(b"retry: " + value + b"\ndata: x\n\n")
    assert event.retry == parser.retry == expected


@pytest.mark.parametrize("line", [b"retry", b"retry:", b"retry:  5", b"retry:5\t", b"retry:0x10", b"retry:1_000"])
def test_retry_that_is_not_only_ascii_digits_is_ignored(line: bytes) -> None:
    parser = SSEParser()
    [event] = parser.feed(b"retry: 9\n\n" + line + b"\ndata: x\n\n")
    assert event.retry is None
    assert parser.retry == 9


def test_retry_applies_at_once_and_belongs_to_its_own_event_only() -> None:
    parser = SSEParser()
    assert parser.feed(b"retry: 5\n") == []
    assert parser.retry == 5  # the reconnection time changes with the line, not with the event
    events = parser.feed(b"data: a\n\ndata: b\n\n")
    assert [e.retry for e in events] == [5, None]
    assert parser.retry == 5


def test_retry_above_64_bits_is_refused_when_sending() -> None:
    with pytest.raises(ValueError, match="retry"):
        ServerSentEvent("x", retry=2**64)
    assert encode(ServerSentEvent(retry=2**64 - 1)) == b"retry: 18446744073709551615\n\n"


# -- UTF-8 -------------------------------------------------------------------------------------------------


def test_invalid_utf8_becomes_replacement_characters() -> None:
    [event] = parse_ours(b"data: a\xffb\xc0\n\n")
    assert event.text == "a\ufffdb\ufffd"


@pytest.mark.parametrize("cut", range(1, 12))
def test_invalid_byte_then_a_character_split_across_reads(cut: int) -> None:
    wire = b"data: \xff\xe2\x82\xac\xff\n\n"
    [event] = parse_ours(wire[:cut], wire[cut:])
    assert event.text == "\ufffd\u20ac\ufffd"


def test_character_cut_off_by_the_end_of_an_event_is_replaced_not_carried() -> None:
    # \xe2\x82 is an unfinished euro sign; the LF after it shows it will never be finished
    [a, b] = parse_ours(b"data: \xe2\x82", b"\n\ndata: \x82\xac\n\n")
    assert (a.text, b.text) == ("\ufffd", "\ufffd\ufffd")


def test_only_one_leading_bom_is_stripped() -> None:
    # the second BOM is the first character of the field name, so there is no data field
    assert [e.text for e in parse_ours(b"\xef\xbb\xbf", b"\xef\xbb\xbfdata: x\n\ndata: y\n\n")] == ["y"]


def test_bom_after_an_invalid_first_byte_is_kept() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xff\n\xef\xbb\xbfdata: x\n\n") == []


def test_bytes_that_only_look_like_a_bom_start_are_data() -> None:
    [event] = parse_ours(b"\xef\xbb", b"\n", b"data: x\n\n")
    assert event.text == "x"


# -- line endings ----------------------------------------------------------------------------------------


def test_read_starting_with_lf_and_holding_a_cr_later() -> None:
    parser = SSEParser()
    assert [e.text for e in parser.feed(b"data: a\n")] == []
    assert [e.text for e in parser.feed(b"\ndata: b\r\rdata: c\r\n\r\n")] == ["a", "b", "c"]


def test_cr_lf_split_across_reads_and_an_lf_first_read_after_it() -> None:
    reads = [b"data: a\r", b"\n\r", b"\ndata: b\n\r", b"data: c\r", b"\n", b"\n"]
    assert [e.text for e in parse_ours(*reads)] == ["a", "b", "c"]


def test_lf_cr_is_two_line_breaks() -> None:
    assert [e.text for e in parse_ours(b"data: a\n\rdata: b\n\r")] == ["a", "b"]


# -- exact bytes on the wire ---------------------------------------------------------------------------------


def test_ping_is_a_comment_and_a_blank_line() -> None:
    assert PING == b": ping\n\n"


@pytest.mark.parametrize(
    ("args", "wire"),
    [
        (("x",), b"data: x\n\n"),
        (("x", "3"), b"id: 3\ndata: x\n\n"),
        (("x", 3), b"id: 3\ndata: x\n\n"),
        (("x", None, "tok"), b"event: tok\ndata: x\n\n"),
        (("x", "3", "tok"), b"id: 3\nevent: tok\ndata: x\n\n"),
        (("a\nb\r\nc\rd",), b"data: a\ndata: b\ndata: c\ndata: d\n\n"),
        (("",), b"data: \n\n"),
        (("\u20ac",), "data: \u20ac\n\n".encode()),
    ],
)
def test_encode_data_bytes(args: tuple[Any, ...], wire: bytes) -> None:
    assert encode_data(*args) == wire


@pytest.mark.parametrize(
    ("event", "wire"),
    [
        (ServerSentEvent(), b""),
        (ServerSentEvent(""), b"data: \n\n"),
        (ServerSentEvent(retry=0), b"retry: 0\n\n"),
        (ServerSentEvent(comment=""), b": \n\n"),
        (ServerSentEvent(id=""), b"id: \n\n"),
        (ServerSentEvent(event=""), b"event: \n\n"),
        (
            ServerSentEvent("a\nb", event="e", id="1", retry=5, comment="c1\r\nc2"),
            b": c1\n: c2\nid: 1\nevent: e\nretry: 5\ndata: a\ndata: b\n\n",
        ),
        (
            ServerSentEvent({"k": "\u00e9", "n": [1, 2.5, None, True]}),
            'data: {"k":"\u00e9","n":[1,2.5,null,true]}\n\n'.encode(),
        ),
        (ServerSentEvent(b"caf\xc3\xa9"), "data: caf\u00e9\n\n".encode()),
    ],
)
def test_encode_bytes(event: ServerSentEvent, wire: bytes) -> None:
    assert encode(event) == wire


# -- payloads ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ("s", "s"),
        (b"b\xc3\xa9", "b\u00e9"),
        (bytearray(b"ba"), "ba"),
        (memoryview(b"mv"), "mv"),
        ({"a": 1}, '{"a":1}'),
        ([1, "\u00e9"], '[1,"\u00e9"]'),
        ((1, 2), "[1,2]"),
        (7, "7"),
        (1.5, "1.5"),
        (False, "false"),
        (None, "null"),
    ],
)
def test_to_text(data: object, text: str) -> None:
    assert to_text(data) == text


@pytest.mark.parametrize("data", [b"\xff", bytearray(b"a\xc3"), memoryview(b"\xed\xa0\x80")])
def test_to_text_of_invalid_utf8_is_a_value_error(data: object) -> None:
    with pytest.raises(ValueError, match="UTF-8") as info:
        to_text(data)
    assert info.type is ValueError


@pytest.mark.parametrize("data", [float("nan"), {"x": float("inf")}, [1, float("-inf")], {"a": [float("nan")]}])
def test_nan_and_infinity_are_refused_not_sent_as_invalid_json(data: object) -> None:
    with pytest.raises(TypeError, match="JSON"):
        to_text(data)
    with pytest.raises(TypeError, match="JSON"):
        ServerSentEvent(data)


def test_payload_of_another_type_is_a_type_error_naming_the_type() -> None:
    with pytest.raises(TypeError, match=r"^cannot send an item of type builtins\.set as an event: yield str, bytes"):
        to_text({1, 2})
    with pytest.raises(TypeError, match="of type dict is not JSON-serialisable"):
        to_text({"k": object()})


def test_event_name_and_comment_must_be_text() -> None:
    with pytest.raises(TypeError, match=r"^event name must be str, not int$"):
        ServerSentEvent("x", event=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^comment must be str, not bytes$"):
        ServerSentEvent("x", comment=b"c")  # type: ignore[arg-type]


def test_text_is_computed_once_and_none_without_data() -> None:
    assert ServerSentEvent().text is None
    assert ServerSentEvent(comment="c").text is None
    assert ServerSentEvent([1]).text == "[1]"
    assert ServerSentEvent("a") == ServerSentEvent("a")


def test_events_are_immutable_and_slotted() -> None:
    event = ServerSentEvent("a", id="1")
    with pytest.raises(FrozenInstanceError):
        event.id = "2"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")  # one per token: no per-instance dict
    assert hash(event) == hash(ServerSentEvent("a", id="1"))


def test_text_is_derived_not_a_constructor_argument_and_not_repeated_in_repr() -> None:
    with pytest.raises(TypeError):
        ServerSentEvent("a", text="b")  # type: ignore[call-arg]
    assert repr(ServerSentEvent("a")) == "ServerSentEvent(data='a', event=None, id=None, retry=None, comment=None)"


def test_public_names() -> None:
    assert sorted(sse.__all__) == ["PING", "SSEParser", "ServerSentEvent", "encode", "encode_data", "to_text"]
    assert all(hasattr(sse, name) for name in sse.__all__)


def test_error_messages_name_the_field_and_the_value() -> None:
    cases: list[tuple[Callable[[], object], type[Exception], str]] = [
        (
            lambda: ServerSentEvent("x", event="a\nb"),
            ValueError,
            r"SSE field 'event' must not contain CR or LF: 'a\nb'",
        ),
        (lambda: ServerSentEvent("x", id="a\rb"), ValueError, r"SSE field 'id' must not contain CR or LF: 'a\rb'"),
        (lambda: ServerSentEvent("x", id="a\0"), ValueError, r"SSE field 'id' must not contain NUL: 'a\x00'"),
        (
            lambda: ServerSentEvent("x", retry=-1),
            ValueError,
            "SSE field 'retry' must be an int (milliseconds) from 0 to 2**64 - 1, not -1",
        ),
        (lambda: ServerSentEvent("x", event=b"e"), TypeError, "event name must be str, not bytes"),
        (lambda: ServerSentEvent("x", comment=1), TypeError, "comment must be str, not int"),
        (
            lambda: to_text(b"\xff"),
            ValueError,
            "bytes payload is not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
        ),
        (
            lambda: to_text({1, 2}),
            TypeError,
            "cannot send an item of type builtins.set as an event: yield str, bytes, dict, list or ServerSentEvent",
        ),
    ]
    for make, kind, message in cases:
        with pytest.raises(kind) as info:
            make()
        assert info.type is kind
        assert str(info.value) == message
    with pytest.raises(TypeError) as json_error:
        to_text([float("nan")])
    # what follows the colon is the json module's own text
    assert str(json_error.value).startswith("payload of type list is not JSON-serialisable: Out of range float")
