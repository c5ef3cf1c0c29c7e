"""Regroup a stream of LLM tokens into sentences, for endpoints that send whole sentences
(text-to-speech, moderation per sentence).

.. code-block:: python

    @recorded_stream
    async def speak(request: Request) -> AsyncIterator[str]:
        async with aclosing(sentences(openai_text(...))) as parts:
            async for sentence in parts:
                yield sentence
"""

# ruff: noqa: RUF001, RUF002  (typographic and CJK punctuation is what this module is about)

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterable, Collection

__all__ = ["DEFAULT_ABBREVIATIONS", "sentences"]

#: Words whose period does not end a sentence (compared case-insensitively, a trailing "."
#: ignored). "No" is left out: "No. That is wrong." is a common sentence; pass it in for "No. 5".
DEFAULT_ABBREVIATIONS: frozenset[str] = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "fig", "approx",
     "inc", "ltd", "co", "corp", "dept", "est", "gen", "gov", "lt", "col", "sgt", "capt", "cf", "al"}
)

_CJK_STOPS = "。！？"
_CLOSERS = "\"'”’)]»」』）】"
# A run of terminators, closing quotes/brackets, then whitespace; or a newline and the whitespace after it.
_END = re.compile(rf"([.!?…{_CJK_STOPS}]+)[{re.escape(_CLOSERS)}]*(\s*)|\n\s*")
_OPENERS = "\"'“‘([«「『（【"
_DOTTED = re.compile(r"[^\W\d_](?:\.[^\W\d_])+")  # dotted abbreviations: "U.S", "e.g", "a.m"


def sentences(
    source: AsyncIterable[str],
    *,
    abbreviations: Collection[str] = DEFAULT_ABBREVIATIONS,
    max_chars: int | None = 2000,
) -> AsyncGenerator[str, None]:
    """Yield the text of ``source`` (a stream of tokens) regrouped into sentences.

    Nothing is lost or added: ``"".join(output) == "".join(input)``, and the sentences do not
    depend on where the tokens were split. Each sentence carries the whitespace after it.

    A sentence ends:

    * after ``.``, ``!``, ``?`` or ``…`` (or a run such as ``?!`` or ``...``), optionally
      followed by closing quotes or brackets (``"'”’)]»``), when whitespace follows;
    * at a newline (``"\\n"`` or a paragraph break ``"\\n\\n"``);
    * after a CJK full stop ``。！？`` (and closing brackets such as ``」``), whitespace or not.

    A single period does not end a sentence after a word in ``abbreviations`` ("Dr. Smith"),
    after an initial or dotted abbreviation ("J. R. R. Tolkien", "U.S. Army", "e.g. this"),
    or after a number that opens the sentence (the list marker in "1. First"). A period
    without whitespace after it never ends one: "3.14", "v1.2", "example.com", "file.txt".
    The price: a sentence that really ends with such a word ("Plan A.", "... and so on, etc.")
    runs on into the next one.

    The end of a sentence is only known once the next non-space character arrives (is
    ``"Dr."`` followed by a space? is that space followed by more?), so each sentence is
    held until then. When the source ends, the rest is yielded as the last item, sentence
    or not. Empty tokens are ignored; an empty source yields nothing.

    ``max_chars`` bounds every item, so a model that never ends a sentence still streams:
    a longer sentence is split after the last whitespace within the limit, or at the limit
    if there is none. ``None`` disables the bound.

    Raises ``ValueError`` (at call time) if ``max_chars`` is not positive, and ``TypeError``
    if ``source`` yields something other than a ``str``. The source is closed when the
    returned generator is: wrap it in ``contextlib.aclosing`` when you may stop early.
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be a positive number of characters or None, not {max_chars!r}")
    if isinstance(abbreviations, str):
        raise TypeError("abbreviations must be a collection of words, not one str")
    known = frozenset(word.lower().rstrip(".") for word in abbreviations)
    return _sentences(source, known, max_chars)


def _ends_sentence(text: str, match: re.Match[str], known: frozenset[str]) -> bool:
    """Whether ``match`` (found by ``_END`` in ``text``, which starts a sentence) ends it."""
    terminators, space = match.group(1), match.group(2)
    if terminators is None:  # a newline: ends the sentence unless only whitespace precedes it
        return text[: match.start()].strip() != ""
    if "\n" in space:
        return True
    if not space:
        return any(c in _CJK_STOPS for c in terminators)
    if terminators != ".":
        return True
    start = match.start()
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start : match.start()].lstrip(_OPENERS)  # the word before the period
    if word.lower() in known or (len(word) == 1 and word.isupper()) or _DOTTED.fullmatch(word):
        return False
    return not (word.isdigit() and text[:start].strip() == "")


async def _sentences(
    source: AsyncIterable[str], known: frozenset[str], max_chars: int | None
) -> AsyncGenerator[str, None]:
    tokens = source.__aiter__()
    text = ""  # the pending text; it always starts a sentence
    scan = 0  # where to look for the next end: the text before it holds none
    try:
        async for token in tokens:
            if not isinstance(token, str):
                raise TypeError(f"sentences() expects str tokens, got {type(token).__name__}")
            text += token
            while True:
                end = None
                for match in _END.finditer(text, scan):
                    if match.end() == len(text):  # what follows is not known yet
                        scan = match.start()
                        break
                    if _ends_sentence(text, match, known):
                        end = match.end()
                        break
                else:
                    scan = len(text)
                if end is None and (max_chars is None or len(text) <= max_chars):
                    break
                if max_chars is not None and (end is None or end > max_chars):
                    end = _cut(text, max_chars)
                yield text[:end]
                text, scan = text[end:], 0
        if text:  # the rest: no end in it, and within max_chars (longer text was cut above)
            yield text
    finally:
        aclose = getattr(tokens, "aclose", None)
        if aclose is not None:
            await aclose()


def _cut(text: str, limit: int) -> int:
    """Where to split ``text``, longer than ``limit``: after its last whitespace within the limit."""
    for i in range(limit - 1, 0, -1):
        if text[i].isspace():
            return i + 1
    return limit
