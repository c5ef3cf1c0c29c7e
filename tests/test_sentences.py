"""``sentences()``: tokens regrouped into sentences, with nothing lost or added, the same
sentences whatever the token boundaries, and the source closed when the consumer stops."""

# ruff: noqa: RUF001  (the texts are full of typographic and CJK punctuation on purpose)

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import aclosing

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from asgi_stream_recorder import MemoryRecorder, recorded_stream
from asgi_stream_recorder.sentences import DEFAULT_ABBREVIATIONS, sentences
from asgi_stream_recorder.testing import assert_recorded, fake_token_stream, sse_client

pytestmark = pytest.mark.anyio

WAIT = 5  # seconds: every test finishes far sooner


async def tokens_of(items: Iterable[object]) -> AsyncGenerator[str, None]:
    for item in items:
        await anyio.lowlevel.checkpoint()  # a real token source awaits between tokens
        yield item  # type: ignore[misc]  # the bad-input tests pass non-str items on purpose


async def regroup(items: Iterable[object], **options: object) -> list[str]:
    with anyio.fail_after(WAIT):
        return [s async for s in sentences(tokens_of(items), **options)]  # type: ignore[arg-type]


async def both_ways(text: str, **options: object) -> list[str]:
    """The sentences of ``text`` sent as one token, checked equal to those of ``text`` sent char by char."""
    whole = await regroup([text], **options)
    assert await regroup(list(text), **options) == whole
    return whole


# -- the invariant: nothing lost, nothing added, token boundaries do not matter ---------------

PIECES = [
    "Hello", " world", ".", "!", "?", "…", "...", "?!", " ", "  ", "\n", "\n\n", "\t", "Dr", "Mr", "e.g",
    "U.S", "J", "3.14", "v1.2", "example.com", '"', "'", "”", "’", ")", "]", "。", "！", "？", "」", "你好",
    "1", "No", " Smith", "x", "\u3000", "\xa0",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=20),
    max_chars=st.sampled_from([None, 1, 2, 7, 20, 2000]),
)
async def test_property_output_joins_to_the_input_whatever_the_token_boundaries(
    pieces: list[str], cuts: list[int], max_chars: int | None
) -> None:
    text = "".join(pieces)
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    tokens = [text[a:b] for a, b in itertools.pairwise(bounds)]
    got = await regroup(tokens, max_chars=max_chars)
    assert "".join(got) == text
    assert got == await regroup([text], max_chars=max_chars)
    assert all(got), "no empty items"
    if max_chars is not None:
        assert all(len(s) <= max_chars for s in got)


async def test_every_token_boundary_gives_the_same_sentences() -> None:
    text = 'Dr. J. Smith paid $3.14 at example.com. "Really?!" she asked… Yes.\n\n你好。再见！ End'
    expected = ["Dr. J. Smith paid $3.14 at example.com. ", '"Really?!" ', "she asked… ", "Yes.\n\n"]
    expected += ["你好。", "再见！ ", "End"]
    assert await regroup([text]) == expected
    for i in range(len(text) + 1):
        assert await regroup([text[:i], text[i:]]) == expected, f"split at {i}: {text[:i]!r} | {text[i:]!r}"
    for i in range(0, len(text), 3):
        assert await regroup([text[:i], text[i : i + 3], text[i + 3 :]]) == expected


# -- each rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The sky is blue. Grass is green! Is it? Yes", ["The sky is blue. ", "Grass is green! ", "Is it? ", "Yes"]),
        ("One.  Two.\tThree.", ["One.  ", "Two.\t", "Three."]),  # the whitespace stays with its sentence
        ("Dr. Smith and Mrs. Jones met Prof. Lee, etc. and left.", [
            "Dr. Smith and Mrs. Jones met Prof. Lee, etc. and left."]),
        ("See Fig. 3 vs. Fig. 4. Then go.", ["See Fig. 3 vs. Fig. 4. ", "Then go."]),
        ("DR. WHO and dr. who. Next", ["DR. WHO and dr. who. ", "Next"]),  # case-insensitive
        ("(Dr. Smith) agreed. Fine", ["(Dr. Smith) agreed. ", "Fine"]),  # an opening bracket before the word
        ("J. R. R. Tolkien wrote it. Next", ["J. R. R. Tolkien wrote it. ", "Next"]),  # initials
        ("The U.S. Army, e.g. this, i.e. that. Next", ["The U.S. Army, e.g. this, i.e. that. ", "Next"]),
        ("Pi is 3.14 and v1.2 is out. Next", ["Pi is 3.14 and v1.2 is out. ", "Next"]),  # decimals, versions
        ("Visit example.com or open file.txt today. Next", ["Visit example.com or open file.txt today. ", "Next"]),
        ("I went to example.com. It was down.", ["I went to example.com. ", "It was down."]),
        ("It cost 5. Then more.", ["It cost 5. ", "Then more."]),  # a number ends a sentence...
        ("1. First item.\n2. Second item", ["1. First item.\n", "2. Second item"]),  # ...but not as list marker
        ('He said "Stop." Then left.', ['He said "Stop." ', "Then left."]),  # closing quotes stay
        ("(Like this.) And ‘this.’ And [that!] Done", ["(Like this.) ", "And ‘this.’ ", "And [that!] ", "Done"]),
        ('"Why?" "Because."', ['"Why?" ', '"Because."']),
        ('"Stop."she said', ['"Stop."she said']),  # no whitespace after: no end
        ("Wait... what?! No… Really?? Yes!!! Ok", ["Wait... ", "what?! ", "No… ", "Really?? ", "Yes!!! ", "Ok"]),
        ("你好。我很好！你呢？好", ["你好。", "我很好！", "你呢？", "好"]),  # CJK: no whitespace needed
        ("「走吧。」他说。 Then", ["「走吧。」", "他说。 ", "Then"]),
        ("Title\n\nA paragraph\nwith lines", ["Title\n\n", "A paragraph\n", "with lines"]),  # newlines end
        ("Dr.\nSmith", ["Dr.\n", "Smith"]),  # a newline ends even after an abbreviation
        ("  \n\nIndented start. Next", ["  \n\nIndented start. ", "Next"]),  # no whitespace-only sentence
        ("Line one  \n  \nLine two", ["Line one  \n  \n", "Line two"]),
        ("A trailing fragment without an end", ["A trailing fragment without an end"]),
        ("Ends here.", ["Ends here."]),
        ("Ends with space. ", ["Ends with space. "]),
        ("   ", ["   "]),
    ],
)
async def test_sentence_rules(text: str, expected: list[str]) -> None:
    assert await both_ways(text) == expected


async def test_no_is_not_an_abbreviation_by_default_but_abbreviations_are_configurable() -> None:
    assert "no" not in DEFAULT_ABBREVIATIONS and "dr" in DEFAULT_ABBREVIATIONS
    assert await regroup(["No. That is wrong."]) == ["No. ", "That is wrong."]
    assert await regroup(["See No. 5 here. Ok"], abbreviations={"No."}) == ["See No. 5 here. ", "Ok"]
    assert await regroup(["Dr. Who. Ok"], abbreviations=()) == ["Dr. ", "Who. ", "Ok"]


async def test_an_end_is_held_until_the_next_token_shows_what_follows() -> None:
    pulled: list[str] = []

    async def source(items: list[str]) -> AsyncIterator[str]:
        for item in items:
            pulled.append(item)
            yield item

    with anyio.fail_after(WAIT):
        parts = sentences(source(["Dr", ".", " Smith", " left", ".", " Then", " more"]))
        assert await anext(parts) == "Dr. Smith left. "
        assert pulled[-1] == " Then"  # " left." and even the space were not enough to decide
        assert [s async for s in parts] == ["Then more"]

        pulled.clear()
        parts = sentences(source(["Hi", ".", " ", "\n", "Next", " one."]))
        assert await anext(parts) == "Hi. \n"
        assert pulled == ["Hi", ".", " ", "\n", "Next"]  # no further than the first character after
        assert [s async for s in parts] == ["Next one."]


async def test_empty_source_and_empty_tokens() -> None:
    assert await regroup([]) == []
    assert await regroup(["", ""]) == []
    assert await regroup(["", "Hi.", "", " ", "", "Yo", ""]) == ["Hi. ", "Yo"]


# -- max_chars ------------------------------------------------------------------------------


async def test_max_chars_splits_at_the_last_whitespace_within_the_limit_or_at_the_limit() -> None:
    assert await both_ways("aaaa bbbb cccc dd", max_chars=10) == ["aaaa bbbb ", "cccc dd"]
    assert await both_ways("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]
    assert await both_ways("Hi. aaaa bbbb cccc", max_chars=10) == ["Hi. ", "aaaa bbbb ", "cccc"]
    assert await both_ways("Short. Then", max_chars=10) == ["Short. ", "Then"]  # a real end wins
    long = "word " * 1000
    assert await regroup([long], max_chars=None) == [long]
    default = await regroup(list(long))
    assert [len(s) for s in default] == [2000, 2000, 1000]  # the default bound: 2000 characters
    assert all(s.endswith(" ") for s in default)


async def test_a_model_that_never_ends_a_sentence_still_streams() -> None:
    closed = anyio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                await anyio.lowlevel.checkpoint()
                yield " la"
        finally:
            closed.set()

    with anyio.fail_after(WAIT):
        async with aclosing(sentences(endless(), max_chars=10)) as parts:
            assert [await anext(parts) for _ in range(3)] == [" la la la ", "la la la ", "la la la "]
        assert closed.is_set()


# -- bad input and closing the source ----------------------------------------------------------


async def test_a_non_str_token_raises_type_error_naming_its_type() -> None:
    with pytest.raises(TypeError, match="got int"):
        await regroup(["Hello. ", 42])
    with pytest.raises(TypeError, match="got bytes"):
        await regroup([b"Hello"])


@pytest.mark.parametrize("max_chars", [0, -1])
async def test_a_non_positive_max_chars_raises_at_call_time(max_chars: int) -> None:
    source = tokens_of(["never read"])
    with pytest.raises(ValueError, match="max_chars"):
        sentences(source, max_chars=max_chars)
    with pytest.raises(TypeError, match="collection of words"):
        sentences(source, abbreviations="Dr")
    await source.aclose()


async def test_stopping_early_closes_the_source() -> None:
    send, receive = anyio.create_memory_object_stream[str](10)
    async with send:
        await send.send("One. Two. ")
        await send.send("Three.")
        with anyio.fail_after(WAIT):
            async with aclosing(sentences(receive)) as parts:
                async for sentence in parts:
                    assert sentence == "One. "
                    break
        with pytest.raises(anyio.BrokenResourceError):  # the receiving end is closed: nobody reads
            await send.send("Four.")


async def test_an_error_closes_the_source_and_a_plain_iterable_needs_no_aclose() -> None:
    closed = anyio.Event()

    async def source() -> AsyncIterator[object]:
        try:
            yield "fine. "
            yield None
        finally:
            closed.set()

    with anyio.fail_after(WAIT):
        with pytest.raises(TypeError, match="got NoneType"):
            async for _ in sentences(source()):  # type: ignore[arg-type]
                pass
        assert closed.is_set()

    class Plain:  # an async iterable whose iterator has no aclose
        def __init__(self) -> None:
            self.items = iter(["Ok. ", "Go"])

        def __aiter__(self) -> Plain:
            return self

        async def __anext__(self) -> str:
            try:
                return next(self.items)
            except StopIteration:
                raise StopAsyncIteration from None

    with anyio.fail_after(WAIT):
        assert [s async for s in sentences(Plain())] == ["Ok. ", "Go"]


# -- end to end, through the decorator ------------------------------------------------------------

TEXT = "Hello there. Dr. Smith is in at 3.30 p.m. today.\n\nNew paragraph! Is it “done?” Almost"
SENTENCES = ["Hello there. ", "Dr. Smith is in at 3.30 p.m. today.\n\n", "New paragraph! ", "Is it “done?” ", "Almost"]


async def test_an_endpoint_sends_one_event_per_sentence_and_records_the_whole_text(
    memory_recorder: MemoryRecorder,
) -> None:
    @recorded_stream(recorder=memory_recorder)
    async def speak(request: Request) -> AsyncIterator[str]:
        async with aclosing(sentences(fake_token_stream(TEXT))) as parts:
            async for sentence in parts:
                yield sentence

    app = Starlette(routes=[Route("/speak", speak)])
    with anyio.fail_after(WAIT):
        async with sse_client(app) as client:
            async with client.stream("GET", "/speak") as s:
                events = await s.collect()
        assert [e.text for e in events if e.event is None] == SENTENCES
        assert events[-1].event == "done"
        await assert_recorded(memory_recorder, s.stream_id, status="completed", content=TEXT, chunks=SENTENCES)
